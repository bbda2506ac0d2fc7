//! `forkd retention set`, `forkd prune` and `forkd detach`: a volume's retention rules, applying
//! them now, and cutting a clone loose from its origin, each one call to the daemon's API.

use anyhow::anyhow;
use clap::Subcommand;

use super::commands::report;
use crate::api::client::Client;
use crate::api::retention::{PruneAnswer, RetentionRules};

/// `forkd retention ...`
#[derive(Debug, Subcommand)]
pub enum RetentionCmd {
    /// Set a volume's retention rules, applied after every snapshot and by `forkd prune`
    /// (bookmarked snapshots always stay; so does the newest, unless --keep-last 0)
    Set {
        /// The volume
        #[arg(value_name = "VOLUME")]
        volume: String,
        /// Keep the newest N snapshots
        #[arg(long, value_name = "N")]
        keep_last: Option<u32>,
        /// Keep the newest snapshot of each of the N most recent hours (UTC) with snapshots
        #[arg(long, value_name = "N")]
        keep_hourly: Option<u32>,
        /// Keep the newest snapshot of each of the N most recent days (UTC) with snapshots
        #[arg(long, value_name = "N")]
        keep_daily: Option<u32>,
        /// Keep the newest snapshot of each of the N most recent ISO weeks with snapshots
        #[arg(long, value_name = "N")]
        keep_weekly: Option<u32>,
        /// Remove every rule: nothing is pruned any more
        #[arg(long, conflicts_with_all = ["keep_last", "keep_hourly", "keep_daily", "keep_weekly"])]
        none: bool,
    },
}

/// `forkd retention ...`.
pub fn retention(client: &Client, json: bool, cmd: &RetentionCmd) -> anyhow::Result<()> {
    let RetentionCmd::Set { volume, keep_last, keep_hourly, keep_daily, keep_weekly, none } = cmd;
    let rules = RetentionRules {
        keep_daily: *keep_daily,
        keep_hourly: *keep_hourly,
        keep_last: *keep_last,
        keep_weekly: *keep_weekly,
    };
    if rules == RetentionRules::default() && !none {
        return Err(anyhow!(
            "retention set {volume}: give at least one of --keep-last, --keep-hourly, --keep-daily, --keep-weekly, or --none"
        ));
    }
    let v = client.set_retention(volume, &rules)?;
    report(json, &v, || match &v.retention {
        Some(r) => format!("{volume}: retention {}", describe(r)),
        None => format!("{volume}: no retention rules"),
    })
}

/// `keep-last 3, keep-daily 7`.
pub fn describe(r: &RetentionRules) -> String {
    let rules = [
        ("keep-last", r.keep_last),
        ("keep-hourly", r.keep_hourly),
        ("keep-daily", r.keep_daily),
        ("keep-weekly", r.keep_weekly),
    ];
    let set: Vec<String> = rules.iter().filter_map(|(name, n)| n.map(|n| format!("{name} {n}"))).collect();
    if set.is_empty() {
        "none".into()
    } else {
        set.join(", ")
    }
}

/// `forkd prune VOLUME`.
pub fn prune(client: &Client, json: bool, volume: &str) -> anyhow::Result<()> {
    let a = client.prune(volume)?;
    report(json, &a, || render_pruned(&a, volume))
}

fn render_pruned(a: &PruneAnswer, volume: &str) -> String {
    if a.pruned.is_empty() {
        return format!("{volume}: nothing to prune");
    }
    let lines: Vec<String> = a.pruned.iter().map(|p| format!("deleted {} ({})", p.snapshot, p.rule)).collect();
    lines.join("\n")
}

/// `forkd detach CLONE`.
pub fn detach(client: &Client, json: bool, clone: &str) -> anyhow::Result<()> {
    let v = client.detach(clone)?;
    report(json, &v, || {
        let from = v.detached_from.as_deref().unwrap_or("its origin");
        format!("detached {clone} from {from}: nothing was copied; {from} can now be deleted")
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn retention_prune_detach_parse() {
        let cli = Cli::try_parse_from(["forkd", "retention", "set", "prod", "--keep-last", "3", "--keep-daily", "7"])
            .expect("set");
        assert!(matches!(
            cli.command,
            Command::Retention {
                cmd: RetentionCmd::Set {
                    keep_last: Some(3),
                    keep_daily: Some(7),
                    keep_hourly: None,
                    keep_weekly: None,
                    none: false,
                    ..
                }
            }
        ));
        assert!(Cli::try_parse_from(["forkd", "retention", "set", "prod", "--none", "--keep-last", "1"]).is_err());
        assert!(Cli::try_parse_from(["forkd", "retention", "set", "prod", "--keep-last", "-1"]).is_err());
        assert!(matches!(
            Cli::try_parse_from(["forkd", "prune", "prod"]).expect("prune").command,
            Command::Prune { .. }
        ));
        assert!(matches!(
            Cli::try_parse_from(["forkd", "detach", "dev1"]).expect("detach").command,
            Command::Detach { .. }
        ));
        let r = RetentionRules { keep_last: Some(3), keep_weekly: Some(4), ..RetentionRules::default() };
        assert_eq!(describe(&r), "keep-last 3, keep-weekly 4");
    }
}
