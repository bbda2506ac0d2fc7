//! The client commands that are plain calls to the daemon's HTTP API (`docs/api.md`): each
//! sends one request and prints the answer, as a line or table for people or, with `--json`,
//! as the typed answer in the daemon's JSON (see [`super::render`]).

use std::io::Write;

use anyhow::anyhow;
use serde::Serialize;

use super::render::{render_list, render_log, render_show, render_tree};
use super::{client, Cli, Command, SourceCmd};
use crate::api::log::LogQuery;
use crate::api::volumes::{CloneRequest, Moved, Size};
use crate::units::humanize;

/// Run a client command (everything except `serve`, `ingest`, `dump` and `scrub`) against the daemon
/// at `cli.api`, printing its result on stdout.
pub fn run_client(cli: &Cli) -> anyhow::Result<()> {
    let client = client(cli)?;
    match &cli.command {
        Command::Serve(_)
        | Command::Ingest(_)
        | Command::Dump { .. }
        | Command::Scrub
        | Command::Check { .. }
        | Command::Compact { .. }
        | Command::Repair { .. } => Err(anyhow!("internal: not a client command")),
        Command::Source { cmd: SourceCmd::Create { name, size } } => {
            let v = client.create_source(name, Size::from_text(size))?;
            report(cli.json, &v, || format!("created source {} ({})", or(&v.name, name), humanize(v.size_bytes)))
        }
        Command::Snapshot { volume, bookmark } => {
            let v = client.snapshot(volume, bookmark.as_deref())?;
            report(cli.json, &v, || {
                let snap = or(&v.snapshot, volume);
                match bookmark {
                    Some(b) => format!("created snapshot {snap} (bookmark {b})"),
                    None => format!("created snapshot {snap}"),
                }
            })
        }
        Command::Clone { from, name, lease, quota } => {
            let req =
                CloneRequest { from: from.clone(), name: name.clone(), lease: lease.clone(), quota: quota.clone() };
            let v = client.clone_with(&req)?;
            report(cli.json, &v, || {
                let made_from =
                    if v.made_from.is_empty() { v.volume.origin.as_deref().unwrap_or(from) } else { &v.made_from };
                let expires = v.volume.lease.as_ref().and_then(|l| l.expires_at.as_deref());
                let expires = expires.map(|at| format!(", expires {at}")).unwrap_or_default();
                format!("created clone {} from {made_from}{expires}", or(&v.volume.name, name))
            })
        }
        Command::Rewind { clone, to } => {
            let v = client.rewind(clone, to)?;
            report(cli.json, &v, || moved_line("rewound", &v, clone, to))
        }
        Command::Refresh { clone, to } => {
            let v = client.refresh(clone, to.as_deref())?;
            let fallback = to.as_deref().unwrap_or("the newest snapshot");
            report(cli.json, &v, || moved_line("refreshed", &v, clone, fallback))
        }
        Command::Bookmark { snapshot, name } => {
            let v = client.bookmark(snapshot, name)?;
            report(cli.json, &v, || format!("bookmarked {} as {name}", or(&v.snapshot, snapshot)))
        }
        Command::List => {
            let v = client.list()?;
            report(cli.json, &v, || render_list(&v))
        }
        Command::Tree => {
            let v = client.tree()?;
            report(cli.json, &v, || render_tree(&v))
        }
        Command::Show { name } => {
            let v = client.volume(name)?;
            report(cli.json, &v, || render_show(&v))
        }
        Command::Hook { cmd } => super::hooks::hook(&client, cli.json, cmd),
        Command::Mask(args) => super::hooks::mask(&client, cli.json, args),
        Command::Lease(args) => super::lease::lease(&client, cli.json, args),
        Command::Quota(args) => super::quota::quota(&client, cli.json, args),
        cmd @ (Command::Replicate(_) | Command::Promote { .. }) => super::replicate::run(&client, cli, cmd),
        Command::Policy { cmd } => super::hooks::policy(&client, cli.json, cmd),
        Command::Log { volume, since, limit, verbose } => {
            let query = LogQuery { volume: volume.clone(), since: since.clone(), limit: *limit };
            let v = client.log(&query)?;
            report(cli.json, &v, || render_log(&v, *verbose))
        }
        Command::Env { cmd } => super::env::run(&client, cli.json, cmd),
        Command::Schedule { cmd } => super::schedule::run(&client, cli.json, cmd),
        Command::Retention { cmd } => super::retention::retention(&client, cli.json, cmd),
        Command::Prune { volume } => super::retention::prune(&client, cli.json, volume),
        Command::Detach { clone } => super::retention::detach(&client, cli.json, clone),
        Command::Delete { reference } => delete(&client, cli.json, reference),
    }
}

/// `forkd delete NAME_OR_SNAPSHOT`.
fn delete(client: &crate::api::client::Client, json: bool, reference: &str) -> anyhow::Result<()> {
    let v = client.delete(reference)?;
    report(json, &v, || format!("deleted {} (freed {})", or(&v.deleted, reference), humanize(v.freed_bytes)))
}

/// `text`, or `default` when the daemon left it empty.
pub(super) fn or<'a>(text: &'a str, default: &'a str) -> &'a str {
    if text.is_empty() {
        default
    } else {
        text
    }
}

/// Print the daemon's answer `v` as pretty JSON, or the human text `human` builds.
pub(super) fn report<T: Serialize>(json: bool, v: &T, human: impl FnOnce() -> String) -> anyhow::Result<()> {
    let text = if json { serde_json::to_string_pretty(v)? } else { human() };
    emit(&text)
}

/// Write `text` (plus a final newline if missing) to stdout; a closed pipe is not an error.
pub(super) fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let result =
        out.write_all(text.as_bytes()).and_then(|()| if text.ends_with('\n') { Ok(()) } else { out.write_all(b"\n") });
    match result.and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow!("cannot write to stdout: {e}")),
    }
}

/// `rewound dev1 to dev1@2 (previous state kept as dev1@4)`.
fn moved_line(verb: &str, v: &Moved, clone: &str, to: &str) -> String {
    let (volume, target) = (or(&v.volume, clone), or(&v.target, to));
    if v.kept.is_empty() {
        format!("{verb} {volume} to {target}")
    } else {
        format!("{verb} {volume} to {target} (previous state kept as {})", v.kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn not_a_client_command() {
        let cli = Cli::try_parse_from(["forkd", "serve"]).expect("parse");
        let err = run_client(&cli).expect_err("serve");
        assert_eq!(err.to_string(), "internal: not a client command");
    }
}
