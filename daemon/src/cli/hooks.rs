//! `forkd hook`, `forkd mask` and `forkd policy`: hook settings, masking runs and a source's
//! policy (`clone_from`, `default_lease`, `max_lease`), each one call to the daemon's API.

use anyhow::anyhow;
use clap::Subcommand;

use super::commands::report;
use crate::api::client::Client;
use crate::api::hooks::{HookList, HookRequest, MaskRequest, PolicyRequest};
use crate::units::human_duration_ms;

/// `forkd hook ...`
#[derive(Debug, Subcommand)]
pub enum HookCmd {
    /// Run SCRIPT (a file name in the daemon's hooks directory) at EVENT of a volume
    Set {
        /// Volume (or environment) the hook is for
        #[arg(value_name = "VOLUME_OR_ENV")]
        owner: String,
        /// pre-snapshot, post-snapshot, configure-clone, pre-refresh, post-refresh,
        /// pre-rewind, post-rewind, pre-delete, post-ingest, mask or lease-expiring
        #[arg(value_name = "EVENT")]
        event: String,
        /// The script's file name in the hooks directory
        #[arg(value_name = "SCRIPT_NAME")]
        script: String,
        /// Kill the script (and its process group) after this long: 300s, 5m, 1h
        #[arg(long, value_name = "DURATION", default_value = "300s")]
        timeout: String,
    },
    /// List hook settings, of every volume or one
    List {
        /// Only this volume's (or environment's) hooks
        #[arg(value_name = "VOLUME_OR_ENV")]
        owner: Option<String>,
    },
    /// Remove the hook of EVENT from a volume
    Unset {
        /// Volume (or environment)
        #[arg(value_name = "VOLUME_OR_ENV")]
        owner: String,
        /// The event
        #[arg(value_name = "EVENT")]
        event: String,
    },
}

/// `forkd policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Set a source's policy: clone_from=masked lets only masked snapshots flow downstream;
    /// default_lease=72h gives new clones a lease; max_lease=30d bounds every clone's lease;
    /// default_quota=20G gives new clones a quota on their unique bytes
    Set {
        /// The source
        #[arg(value_name = "SOURCE")]
        source: String,
        /// clone_from=masked|any, default_lease=DURATION|none, max_lease=DURATION|none,
        /// default_quota=SIZE|none
        #[arg(value_name = "SETTING", required = true)]
        settings: Vec<String>,
    },
}

/// The arguments of `forkd mask`.
#[derive(Debug, clap::Args)]
pub struct MaskArgs {
    /// Snapshot to mask (VOLUME@N, @latest, @BOOKMARK, @TIME)
    #[arg(value_name = "SNAPSHOT")]
    pub snapshot: String,
    /// The masking script's file name in the hooks directory [default: the snapshot's volume's
    /// mask hook; for an environment, each member's]
    #[arg(long = "with", value_name = "SCRIPT_NAME")]
    pub script: Option<String>,
    /// The masked volume to put the result in (created on first use)
    #[arg(long, value_name = "MASKED_VOLUME")]
    pub into: String,
    /// Kill the script (and its process group) after this long: 300s, 5m, 1h
    #[arg(long, value_name = "DURATION", default_value = "300s")]
    pub timeout: String,
}

/// `forkd hook ...`.
pub fn hook(client: &Client, json: bool, cmd: &HookCmd) -> anyhow::Result<()> {
    match cmd {
        HookCmd::Set { owner, event, script, timeout } => {
            let req = HookRequest { script: script.clone(), timeout_secs: Some(seconds(timeout)?) };
            let h = client.set_hook(owner, event, &req)?;
            report(json, &h, || format!("{owner}: {event} runs {} (timeout {}s)", h.script, h.timeout_secs))
        }
        HookCmd::List { owner } => {
            let list = client.hooks(owner.as_deref())?;
            report(json, &list, || render(&list))
        }
        HookCmd::Unset { owner, event } => {
            let h = client.unset_hook(owner, event)?;
            report(json, &h, || format!("{owner}: {event} no longer runs {}", h.script))
        }
    }
}

/// `forkd mask ...`.
pub fn mask(client: &Client, json: bool, args: &MaskArgs) -> anyhow::Result<()> {
    let req = MaskRequest {
        snapshot: args.snapshot.clone(),
        script: args.script.clone(),
        into: args.into.clone(),
        timeout_secs: Some(seconds(&args.timeout)?),
    };
    let a = client.mask(&req)?;
    report(json, &a, || {
        if a.members.is_empty() {
            format!("masked {} into {} with {} in {}", a.source, a.snapshot, a.script, human_duration_ms(a.duration_ms))
        } else {
            let members: Vec<String> = a.members.iter().map(|(m, s)| format!("{m}: {s}")).collect();
            format!(
                "masked {} into {} ({}) in {}",
                a.source,
                args.into,
                members.join(", "),
                human_duration_ms(a.duration_ms)
            )
        }
    })
}

/// `forkd policy ...`.
pub fn policy(client: &Client, json: bool, cmd: &PolicyCmd) -> anyhow::Result<()> {
    let PolicyCmd::Set { source, settings } = cmd;
    let mut req = PolicyRequest::default();
    for setting in settings {
        let slot = match setting.split_once('=') {
            Some(("clone_from", v)) if v == "masked" || v == "any" => &mut req.clone_from,
            Some(("default_lease", _)) => &mut req.default_lease,
            Some(("max_lease", _)) => &mut req.max_lease,
            Some(("default_quota", _)) => &mut req.default_quota,
            _ => {
                return Err(anyhow!(
                    "policy `{setting}`: give clone_from=masked|any, default_lease=DURATION|none, \
                     max_lease=DURATION|none or default_quota=SIZE|none"
                ))
            }
        };
        *slot = setting.split_once('=').map(|(_, v)| v.to_string());
    }
    let v = client.set_policy(source, &req)?;
    report(json, &v, || format!("{source}: {}", settings.join(" ")))
}

fn render(list: &HookList) -> String {
    if list.hooks.is_empty() {
        return "no hooks set".into();
    }
    let mut out = format!("{:<24} {:<16} {:<24} {}\n", "VOLUME", "EVENT", "SCRIPT", "TIMEOUT");
    for h in &list.hooks {
        out.push_str(&format!("{:<24} {:<16} {:<24} {}s\n", h.owner, h.event, h.script, h.timeout_secs));
    }
    out
}

/// Seconds in a duration such as `300`, `300s`, `5m`, `2h` or `1d`.
pub fn seconds(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => 0,
    };
    match num.parse::<u64>() {
        Ok(n) if scale > 0 => n.checked_mul(scale).ok_or_else(|| anyhow!("duration `{text}` is too long")),
        _ => Err(anyhow!("duration `{text}`: give a number with s, m, h or d (e.g. 300s, 5m)")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::seconds("300s").ok(), Some(300));
        assert_eq!(super::seconds("5m").ok(), Some(300));
        assert_eq!(super::seconds("2h").ok(), Some(7200));
        assert_eq!(super::seconds("45").ok(), Some(45));
        assert!(super::seconds("5 minutes").is_err());
        assert!(super::seconds("s").is_err());
        assert!(super::seconds("-5s").is_err());
    }
}
