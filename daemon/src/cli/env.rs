//! `forkd env ...`: environments from the command line, one typed API call each, shown as a
//! line or table for people or, with `--json`, as the daemon's JSON answer.

use std::collections::BTreeMap;

use anyhow::anyhow;
use clap::Subcommand;

use super::commands::{or, report};
use crate::api::client::Client;
use crate::api::environments::{EnvMoved, Environment, EnvironmentList};
use crate::units::humanize;

/// `forkd env ...`
#[derive(Debug, Subcommand)]
pub enum EnvCmd {
    /// Group existing volumes as an environment: `forkd env create shop db=prod-db app=prod-app`
    Create {
        /// Name of the new environment
        #[arg(value_name = "ENV")]
        name: String,
        /// Members, each MEMBER=VOLUME
        #[arg(value_name = "MEMBER=VOLUME", required = true, num_args = 1..)]
        members: Vec<String>,
    },
    /// Take one snapshot of every member at one instant: ENV@N
    Snapshot {
        /// Environment to snapshot
        #[arg(value_name = "ENV")]
        name: String,
        /// Bookmark name for the environment snapshot
        #[arg(long, value_name = "NAME")]
        bookmark: Option<String>,
    },
    /// Clone every member (as NEWENV.MEMBER) into a new environment
    Clone {
        /// ENV (newest of each member), ENV@N, ENV@BOOKMARK, ENV@latest or ENV@TIME (newest
        /// snapshot of each member at or before it)
        #[arg(value_name = "ENV[@N|@BOOKMARK|@TIME|@latest]")]
        from: String,
        /// Name of the new environment
        #[arg(value_name = "NEWENV")]
        name: String,
        /// Delete the whole environment this long from now: 72h, 30d [default: the smallest
        /// default_lease of the members' sources, if any]; change it with `forkd lease NEWENV`
        #[arg(long, value_name = "DURATION")]
        lease: Option<String>,
    },
    /// Rewind every member to an environment snapshot, as one operation
    Rewind {
        /// Environment to rewind
        #[arg(value_name = "ENV")]
        name: String,
        /// ENV@N, @N, N, @BOOKMARK, or an RFC 3339 time (the newest environment snapshot at or
        /// before it)
        #[arg(long, value_name = "ENV@N|N|TIME")]
        to: String,
    },
    /// Refresh every member to the newest snapshot of its origin, as one operation
    Refresh {
        /// Environment to refresh
        #[arg(value_name = "ENV")]
        name: String,
    },
    /// List environments with their members
    List,
    /// Show one environment, its members and its snapshots
    Show {
        /// Environment to show
        #[arg(value_name = "ENV")]
        name: String,
    },
    /// Delete an environment and its member volumes
    Delete {
        /// Environment to delete
        #[arg(value_name = "ENV")]
        name: String,
        /// Delete the environment only; keep its member volumes
        #[arg(long)]
        keep_volumes: bool,
    },
}

/// Run `forkd env CMD` against the daemon.
pub(super) fn run(client: &Client, json: bool, cmd: &EnvCmd) -> anyhow::Result<()> {
    match cmd {
        EnvCmd::Create { name, members } => {
            let e = client.env_create(name, parse_members(members)?)?;
            report(json, &e, || format!("created environment {} ({})", or(&e.name, name), member_list(&e.members)))
        }
        EnvCmd::Snapshot { name, bookmark } => {
            let t = client.env_snapshot(name, bookmark.as_deref())?;
            report(json, &t, || format!("created snapshot {} ({})", or(&t.snapshot, name), member_list(&t.members)))
        }
        EnvCmd::Clone { from, name, lease } => {
            let c = client.env_clone(from, name, lease.as_deref())?;
            let origin = c.environment.origin.clone().unwrap_or_else(|| from.clone());
            let expires = c.environment.lease.as_ref().and_then(|l| l.expires_at.as_deref());
            let expires = expires.map(|at| format!("; expires {at}")).unwrap_or_default();
            report(json, &c, || {
                format!(
                    "created environment {} from {origin} ({}){expires}",
                    or(&c.environment.name, name),
                    member_list(&c.made_from)
                )
            })
        }
        EnvCmd::Rewind { name, to } => {
            let m = client.env_rewind(name, to)?;
            report(json, &m, || moved_text("rewound", &m, name))
        }
        EnvCmd::Refresh { name } => {
            let m = client.env_refresh(name)?;
            report(json, &m, || moved_text("refreshed", &m, name))
        }
        EnvCmd::List => {
            let l = client.environments()?;
            report(json, &l, || render_list(&l))
        }
        EnvCmd::Show { name } => {
            let e = client.environment(name)?;
            report(json, &e, || render_show(&e))
        }
        EnvCmd::Delete { name, keep_volumes } => {
            let d = client.env_delete(name, *keep_volumes)?;
            report(json, &d, || {
                let kept = if *keep_volumes { "volumes kept".to_string() } else { d.volumes.join(", ") };
                format!("deleted environment {} ({kept}; freed {})", or(&d.deleted, name), humanize(d.freed_bytes))
            })
        }
    }
}

/// `db=prod-db app=prod-app` as a map; a word without `=` is a one-line error.
fn parse_members(words: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for w in words {
        let (member, volume) = w
            .split_once('=')
            .filter(|(m, v)| !m.is_empty() && !v.is_empty())
            .ok_or_else(|| anyhow!("`{w}` is not MEMBER=VOLUME (e.g. db=prod-db)"))?;
        if out.insert(member.to_string(), volume.to_string()).is_some() {
            return Err(anyhow!("member `{member}` is given twice"));
        }
    }
    Ok(out)
}

/// `app=shop.app, db=shop.db`.
fn member_list(members: &BTreeMap<String, String>) -> String {
    members.iter().map(|(m, v)| format!("{m}={v}")).collect::<Vec<_>>().join(", ")
}

/// `rewound shop to shop@1: db shop.db -> shop.db@1 (kept shop.db@3), ...`, one member a line.
fn moved_text(verb: &str, m: &EnvMoved, name: &str) -> String {
    let to = m.target.as_deref().map(|t| format!(" to {t}")).unwrap_or_default();
    let mut out = format!("{verb} {}{to}\n", or(&m.environment, name));
    for (member, mv) in &m.members {
        out.push_str(&format!(
            "  {member}: {} now shows {} (previous state kept as {})\n",
            mv.volume, mv.target, mv.kept
        ));
    }
    out
}

/// The `forkd env list` lines.
fn render_list(l: &EnvironmentList) -> String {
    if l.environments.is_empty() {
        return "no environments".to_string();
    }
    let line = |e: &Environment| {
        let origin = e.origin.as_deref().map(|o| format!("  from {o}")).unwrap_or_default();
        let lease = e.lease.as_ref().map(|l| format!("  lease: {}", super::lease::text(l))).unwrap_or_default();
        format!("{}  {}  {} snapshots{origin}{lease}", e.name, member_list(&e.members), e.snapshots.len())
    };
    l.environments.iter().map(line).collect::<Vec<_>>().join("\n")
}

/// The `forkd env show` text.
fn render_show(e: &Environment) -> String {
    let mut out = format!(
        "name:     {}\ncreated:  {}\norigin:   {}\nmembers:\n",
        e.name,
        e.created_at,
        e.origin.as_deref().unwrap_or("-")
    );
    for (m, v) in &e.members {
        out.push_str(&format!("  {m}: {v}\n"));
    }
    if let Some(l) = &e.lease {
        out.push_str(&format!("lease:    {}\n", super::lease::text(l)));
    }
    if e.snapshots.is_empty() {
        out.push_str("no snapshots\n");
    }
    for s in &e.snapshots {
        let marks = if s.bookmarks.is_empty() { String::new() } else { format!("  [{}]", s.bookmarks.join(", ")) };
        out.push_str(&format!("{}  {}  {}{marks}\n", s.name, s.created_at, member_list(&s.members)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse() {
        let m = parse_members(&["db=prod-db".into(), "app=prod-app".into()]).expect("parse");
        assert_eq!(member_list(&m), "app=prod-app, db=prod-db");
        assert!(parse_members(&["db".into()]).unwrap_err().to_string().contains("MEMBER=VOLUME"));
        assert!(parse_members(&["=x".into()]).is_err());
        assert!(parse_members(&["a=x".into(), "a=y".into()]).unwrap_err().to_string().contains("twice"));
    }
}
