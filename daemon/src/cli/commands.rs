//! The client commands that are plain calls to the daemon's HTTP API (`docs/api.md`): each
//! sends one request and prints the answer, as a line or table for people or as the daemon's
//! JSON with `--json`.

use std::io::Write;

use anyhow::anyhow;
use serde_json::{json, Value};

use super::render::{render_list, render_show, render_tree, str_or, u64_of};
use super::{client, Cli, Command, SourceCmd};
use crate::api::client::enc;
use crate::units::humanize;

/// Run a client command (everything except `serve`, `ingest` and `dump`) against the daemon
/// at `cli.api`, printing its result on stdout.
pub fn run_client(cli: &Cli) -> anyhow::Result<()> {
    let client = client(cli)?;
    match &cli.command {
        Command::Serve(_) | Command::Ingest(_) | Command::Dump { .. } => Err(anyhow!("internal: not a client command")),
        Command::Source { cmd: SourceCmd::Create { name, size } } => {
            let size_value = match size.trim().parse::<u64>() {
                Ok(n) => json!(n),
                Err(_) => json!(size),
            };
            let v = client.post_json("/v1/sources", &json!({"name": name, "size": size_value}))?;
            report(cli.json, &v, || {
                format!("created source {} ({})", str_or(&v, "name", name), humanize(u64_of(&v, "size_bytes")))
            })
        }
        Command::Snapshot { volume, bookmark } => {
            let body = match bookmark {
                Some(b) => json!({ "bookmark": b }),
                None => json!({}),
            };
            let v = client.post_json(&format!("/v1/volumes/{}/snapshots", enc(volume)), &body)?;
            report(cli.json, &v, || {
                let snap = str_or(&v, "snapshot", volume);
                match bookmark {
                    Some(b) => format!("created snapshot {snap} (bookmark {b})"),
                    None => format!("created snapshot {snap}"),
                }
            })
        }
        Command::Clone { from, name } => {
            let v = client.post_json("/v1/clones", &json!({"from": from, "name": name}))?;
            report(cli.json, &v, || {
                let made_from = v
                    .get("made_from")
                    .and_then(Value::as_str)
                    .or_else(|| v.get("origin").and_then(Value::as_str))
                    .unwrap_or(from);
                format!("created clone {} from {made_from}", str_or(&v, "name", name))
            })
        }
        Command::Rewind { clone, to } => {
            let v = client.post_json(&format!("/v1/volumes/{}/rewind", enc(clone)), &json!({ "to": to }))?;
            report(cli.json, &v, || moved_line("rewound", &v, clone, to))
        }
        Command::Refresh { clone, to } => {
            let body = match to {
                Some(t) => json!({ "to": t }),
                None => json!({}),
            };
            let v = client.post_json(&format!("/v1/volumes/{}/refresh", enc(clone)), &body)?;
            let fallback = to.as_deref().unwrap_or("the newest snapshot");
            report(cli.json, &v, || moved_line("refreshed", &v, clone, fallback))
        }
        Command::Bookmark { snapshot, name } => {
            let v =
                client.post_json(&format!("/v1/snapshots/{}/bookmarks", enc(snapshot)), &json!({ "name": name }))?;
            report(cli.json, &v, || format!("bookmarked {} as {name}", str_or(&v, "snapshot", snapshot)))
        }
        Command::List => {
            let v = client.get_json("/v1/volumes")?;
            report(cli.json, &v, || render_list(&v))
        }
        Command::Tree => {
            let v = client.get_json("/v1/tree")?;
            report(cli.json, &v, || render_tree(&v))
        }
        Command::Show { name } => {
            let v = client.get_json(&format!("/v1/volumes/{}", enc(name)))?;
            report(cli.json, &v, || render_show(&v))
        }
        Command::Delete { reference } => {
            let v = client.delete_json(&format!("/v1/volumes/{}", enc(reference)))?;
            report(cli.json, &v, || {
                format!("deleted {} (freed {})", str_or(&v, "deleted", reference), humanize(u64_of(&v, "freed_bytes")))
            })
        }
    }
}

/// Print `v` as pretty JSON, or the human text `human` builds.
fn report(json: bool, v: &Value, human: impl FnOnce() -> String) -> anyhow::Result<()> {
    let text = if json { serde_json::to_string_pretty(v)? } else { human() };
    emit(&text)
}

/// Write `text` (plus a final newline if missing) to stdout; a closed pipe is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
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
fn moved_line(verb: &str, v: &Value, clone: &str, to: &str) -> String {
    let volume = str_or(v, "volume", clone);
    let target = str_or(v, "target", to);
    match v.get("kept").and_then(Value::as_str) {
        Some(kept) => format!("{verb} {volume} to {target} (previous state kept as {kept})"),
        None => format!("{verb} {volume} to {target}"),
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
