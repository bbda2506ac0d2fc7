//! `forkd replicate VOLUME --to URL` and `forkd promote VOLUME` (docs/replication.md): one call
//! each to the daemon's API. A one-shot replicate answers when the run is done; its report is
//! printed one line per snapshot sent. `--continuous` starts a background replication on the
//! daemon and returns; `--stop` ends it.

use std::path::PathBuf;

use crate::api::client::Client;
use crate::api::replication::{ReplicateReport, ReplicateRequest, ReplicationStatus};
use crate::units::{human_duration_ms, humanize};

use super::commands::report;

/// The arguments of `forkd replicate`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["to", "stop"])))]
pub struct ReplicateArgs {
    /// The volume: its snapshots, its clones' and theirs travel
    #[arg(value_name = "VOLUME")]
    pub volume: String,
    /// The target daemon's API URL (http://HOST:PORT)
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,
    /// File holding the target's API token [default: the token of --token-file / FORKD_TOKEN,
    /// for sites that share one]
    #[arg(long, value_name = "FILE")]
    pub to_token_file: Option<PathBuf>,
    /// Keep replicating every DURATION in the background (10s, 5m): the volume's head is
    /// snapshotted when it was written since its latest snapshot
    #[arg(long, value_name = "DURATION")]
    pub continuous: Option<String>,
    /// Stop the volume's continuous replication
    #[arg(long, conflicts_with_all = ["to", "continuous"])]
    pub stop: bool,
    /// Fail a run when the link makes no progress for this long [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub stall_timeout: Option<String>,
}

/// `forkd replicate ...` or `forkd promote ...`.
pub fn run(client: &Client, cli: &super::Cli, cmd: &super::Command) -> anyhow::Result<()> {
    match cmd {
        super::Command::Replicate(args) => replicate(client, cli, args),
        super::Command::Promote { volume } => promote(client, cli.json, volume),
        other => Err(anyhow::anyhow!("internal: {other:?} is not a replication command")),
    }
}

/// `forkd replicate ...`.
fn replicate(client: &Client, cli: &super::Cli, args: &ReplicateArgs) -> anyhow::Result<()> {
    let json = cli.json;
    if args.stop {
        let s = client.stop_replication(&args.volume)?;
        return report(json, &s, || format!("{}: continuous replication to {} stopped", args.volume, s.to));
    }
    let token = match &args.to_token_file {
        Some(f) => Some(crate::api::token::read_token_file(f)?),
        // The token this command sends to its own daemon, for sites that share one.
        None => crate::api::token::client_token(cli.token_file.as_deref())?,
    };
    let req = ReplicateRequest {
        to: args.to.clone().unwrap_or_default(),
        token,
        continuous: args.continuous.clone(),
        stall_timeout: args.stall_timeout.clone(),
    };
    let s = client.replicate(&args.volume, &req)?;
    match (&args.continuous, &s.last_report) {
        (None, Some(r)) => report(json, r, || render_report(r)),
        _ => report(json, &s, || render_started(&args.volume, &s)),
    }
}

fn render_report(r: &ReplicateReport) -> String {
    if r.snapshots.is_empty() {
        return format!("{} is up to date on {}", r.volume, r.to);
    }
    let mut out = String::new();
    for s in &r.snapshots {
        let base = s.base.as_deref().map_or_else(|| "in full".to_string(), |b| format!("from {b}"));
        let resumed = if s.resumed_from_block > 0 {
            format!(", resumed at block {}", s.resumed_from_block)
        } else {
            String::new()
        };
        out.push_str(&format!("sent {} {base}: {}{resumed}\n", s.snapshot, humanize(s.payload_bytes)));
    }
    out.push_str(&format!(
        "{} snapshot(s) of {} to {}: {} of data, {} on the wire, {}",
        r.snapshots.len(),
        r.volume,
        r.to,
        humanize(r.payload_bytes),
        humanize(r.wire_bytes),
        human_duration_ms(r.duration_ms)
    ));
    out
}

fn render_started(volume: &str, s: &ReplicationStatus) -> String {
    let every = s.continuous_ms.map_or_else(String::new, |ms| format!(" every {}", human_duration_ms(ms)));
    format!("{volume}: replicating to {}{every} (`forkd show {volume}` for its state)", s.to)
}

/// `forkd promote VOLUME`.
fn promote(client: &Client, json: bool, volume: &str) -> anyhow::Result<()> {
    let p = client.promote(volume)?;
    report(json, &p, || format!("{} is writable on this site (it followed site {})", p.volume, p.was_replica_of))
}
