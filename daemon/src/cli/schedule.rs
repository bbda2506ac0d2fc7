//! `forkd schedule add|list|run|delete`: schedules, one call to the daemon's API each
//! (docs/api.md, "Schedules"). The daemon checks the cron expression and the steps.

use clap::Subcommand;

use super::commands::report;
use super::render::left_table;
use crate::api::client::Client;
use crate::api::schedules::{Schedule, ScheduleRequest, ScheduleRunInfo};

/// `forkd schedule ...`
#[derive(Debug, Subcommand)]
pub enum ScheduleCmd {
    /// Add a schedule: a cron expression (5 fields, UTC) and steps run in order
    Add {
        /// The schedule's name
        #[arg(value_name = "NAME")]
        name: String,
        /// When it runs, in UTC: "0 2 * * *" is 02:00 every day
        #[arg(long, value_name = "EXPR")]
        cron: String,
        /// A step, repeated in order: "ingest SOURCE --from PATH_OR_NBD_URI",
        /// "mask SNAPSHOT --into VOLUME [--with SCRIPT]", "snapshot VOLUME_OR_ENV",
        /// "refresh CLONE_OR_ENV...", "prune VOLUME"
        #[arg(long = "step", value_name = "STEP", required = true)]
        steps: Vec<String>,
        /// A run missed while the daemon was down: run it once at start-up, or skip it
        #[arg(long, value_name = "once|skip", default_value = "once")]
        catch_up: String,
    },
    /// List schedules with their next run, last run and its result
    List,
    /// Run a schedule now and wait for its result
    Run {
        /// The schedule
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Delete a schedule
    Delete {
        /// The schedule
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// `forkd schedule ...`.
pub(super) fn run(client: &Client, json: bool, cmd: &ScheduleCmd) -> anyhow::Result<()> {
    match cmd {
        ScheduleCmd::Add { name, cron, steps, catch_up } => {
            let req = ScheduleRequest {
                catch_up: Some(catch_up.clone()),
                cron: cron.clone(),
                name: name.clone(),
                steps: steps.clone(),
            };
            let s = client.add_schedule(&req)?;
            report(json, &s, || format!("{name}: next run {}", s.next_run.as_deref().unwrap_or("never")))
        }
        ScheduleCmd::List => {
            let list = client.schedules()?;
            report(json, &list, || table(&list.schedules))
        }
        ScheduleCmd::Run { name } => {
            let r = client.run_schedule(name)?;
            report(json, &r, || line(name, &r))?;
            match r.error {
                Some(e) => Err(anyhow::anyhow!("schedule {name} failed: {e}")),
                None => Ok(()),
            }
        }
        ScheduleCmd::Delete { name } => {
            let d = client.delete_schedule(name)?;
            report(json, &d, || format!("deleted schedule {}", d.deleted))
        }
    }
}

/// NAME, CRON, NEXT, LAST, RESULT.
fn table(schedules: &[Schedule]) -> String {
    let rows: Vec<Vec<String>> = schedules
        .iter()
        .map(|s| {
            let (last, result) = match (&s.last_run, s.running) {
                (_, true) => ("-".to_string(), "running".to_string()),
                (Some(r), false) => (r.started_at.clone(), r.result.clone()),
                (None, false) => ("-".to_string(), "-".to_string()),
            };
            vec![s.name.clone(), s.cron.clone(), s.next_run.clone().unwrap_or_else(|| "-".into()), last, result]
        })
        .collect();
    left_table(&["NAME", "CRON", "NEXT", "LAST", "RESULT"], &rows)
}

/// `nightly: ok (2026-12-01T02:00:00.000Z .. 2026-12-01T02:00:03.000Z)`.
fn line(name: &str, r: &ScheduleRunInfo) -> String {
    format!("{name}: {} ({} .. {})", r.result, r.started_at, r.finished_at)
}
