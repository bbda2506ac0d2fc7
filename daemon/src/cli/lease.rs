//! `forkd lease CLONE|ENV --extend 24h | --expires TIME | --none | --idle 2h`: one change to a
//! clone's or an environment clone's lease (docs/api.md, "Leases"). Environment and volume
//! names never collide, so the name is looked up as an environment first, then taken as a
//! clone.

use crate::api::client::Client;
use crate::api::leases::{LeaseInfo, LeaseRequest};

use super::commands::report;

/// The arguments of `forkd lease`: exactly one change.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("change").required(true).args(["extend", "expires", "none", "idle"])))]
pub struct LeaseArgs {
    /// The clone, or the environment clone (deleted as a whole; its members take no lease of
    /// their own)
    #[arg(value_name = "CLONE|ENV")]
    pub clone: String,
    /// Move the expiry this much later (from now if there is none): 24h, 90m, 7d
    #[arg(long, value_name = "DURATION")]
    pub extend: Option<String>,
    /// Expire at this time (RFC 3339, e.g. 2026-12-31T18:00:00Z)
    #[arg(long, value_name = "TIME")]
    pub expires: Option<String>,
    /// Remove the lease (refused while the source, or a member's source, has a max_lease)
    #[arg(long)]
    pub none: bool,
    /// Expire after this long with no connection and no I/O: 2h
    #[arg(long, value_name = "DURATION")]
    pub idle: Option<String>,
}

/// `forkd lease ...`.
pub fn lease(client: &Client, json: bool, args: &LeaseArgs) -> anyhow::Result<()> {
    let req = LeaseRequest {
        extend: args.extend.clone(),
        expires: args.expires.clone(),
        none: args.none,
        idle: args.idle.clone(),
    };
    if client.environment(&args.clone).is_ok() {
        let e = client.set_env_lease(&args.clone, &req)?;
        return report(json, &e, || line(&format!("environment {}", args.clone), e.lease.as_ref()));
    }
    let v = client.set_lease(&args.clone, &req)?;
    report(json, &v, || line(&args.clone, v.lease.as_ref()))
}

/// `dev1: expires 2026-12-10T18:00:00.000Z, idle 2h`, or `dev1: no lease`.
pub fn line(name: &str, lease: Option<&LeaseInfo>) -> String {
    match lease {
        Some(l) => format!("{name}: {}", text(l)),
        None => format!("{name}: no lease"),
    }
}

/// `expires 2026-12-10T18:00:00.000Z, idle 2h`.
pub fn text(l: &LeaseInfo) -> String {
    let expires = l.expires_at.as_deref().map(|at| format!("expires {at}"));
    let idle = l.idle.as_deref().map(|i| format!("idle {i}"));
    [expires, idle].into_iter().flatten().collect::<Vec<_>>().join(", ")
}
