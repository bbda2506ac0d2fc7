//! `forkd quota CLONE 20G | --none`: set or remove a clone's quota on its unique bytes, one
//! call to the daemon's API (docs/api.md, "Quotas").

use crate::api::client::Client;
use crate::api::quotas::QuotaRequest;
use crate::units::humanize;

use super::commands::report;

/// The arguments of `forkd quota`: a size or `--none`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("limit").required(true).args(["size", "none"])))]
pub struct QuotaArgs {
    /// The clone
    #[arg(value_name = "CLONE")]
    pub clone: String,
    /// The limit on its unique bytes: 20G, 512M
    #[arg(value_name = "SIZE")]
    pub size: Option<String>,
    /// Remove the quota
    #[arg(long)]
    pub none: bool,
}

/// `forkd quota ...`.
pub fn quota(client: &Client, json: bool, args: &QuotaArgs) -> anyhow::Result<()> {
    let req = QuotaRequest { quota: args.size.clone().unwrap_or_else(|| "none".into()) };
    let v = client.set_quota(&args.clone, &req)?;
    report(json, &v, || match v.quota_bytes {
        Some(q) => format!("{}: quota {}, {} used", v.name, humanize(q), humanize(v.unique_bytes.unwrap_or(0))),
        None => format!("{}: no quota", v.name),
    })
}
