//! `forkd lease CLONE --extend 24h | --expires TIME | --none | --idle 2h`: one change to a
//! clone's lease, one call to the daemon's API (docs/api.md, "Leases").

use crate::api::client::Client;
use crate::api::leases::LeaseRequest;
use crate::api::volumes::Volume;

use super::commands::report;

/// The arguments of `forkd lease`: exactly one change.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("change").required(true).args(["extend", "expires", "none", "idle"])))]
pub struct LeaseArgs {
    /// The clone
    #[arg(value_name = "CLONE")]
    pub clone: String,
    /// Move the expiry this much later (from now if there is none): 24h, 90m, 7d
    #[arg(long, value_name = "DURATION")]
    pub extend: Option<String>,
    /// Expire at this time (RFC 3339, e.g. 2026-12-31T18:00:00Z)
    #[arg(long, value_name = "TIME")]
    pub expires: Option<String>,
    /// Remove the lease (refused while the source has a max_lease)
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
    let v = client.set_lease(&args.clone, &req)?;
    report(json, &v, || line(&args.clone, &v))
}

/// `dev1: expires 2026-12-10T18:00:00.000Z, idle 2h`, or `dev1: no lease`.
pub fn line(name: &str, v: &Volume) -> String {
    let Some(l) = &v.lease else { return format!("{name}: no lease") };
    let mut parts = Vec::new();
    if let Some(at) = &l.expires_at {
        parts.push(format!("expires {at}"));
    }
    if let Some(idle) = &l.idle {
        parts.push(format!("idle {idle}"));
    }
    format!("{name}: {}", parts.join(", "))
}
