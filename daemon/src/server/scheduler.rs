//! The scheduler: runs each schedule's steps in order when its cron expression (5 fields, UTC)
//! fires, and on `forkd schedule run` (PRODUCT.md, "schedule"; docs/api.md, "Schedules").
//!
//! Every tick (the lease reaper's `lease_tick`, 5 s by default) it reads "now" from the daemon's [`Clock`]; a
//! schedule is due when the first fire time after its `last_fire` (or after it was added) is at
//! or before now. That fire time depends only on the cron expression and the time it counts
//! from, so it is kept in memory and worked out again only when one of them changed: parsing
//! every schedule's expression on every tick was nearly all of an idle daemon's CPU with 100
//! schedules (bench/scheduler-results.md). Several fire times passed at once (the clock jumped
//! forward, or a tick came late) make one run. A clock that goes back runs nothing until it
//! passes `last_fire` again. Each due schedule runs on its own blocking thread, so a long ingest
//! does not hold up others.
//!
//! A run: claim the name in memory (a second run of the same schedule is refused: 409), write
//! `running` (and the fire time it covers) durably, run the steps in order, each with its own
//! operation-log entry (`who: schedule NAME`, `what`: the step), stop at the first failure,
//! then record `last_run` and write one more entry: `schedule-ok` or `schedule-failed`. Runs are
//! counted in `forkd_schedule_runs_total{schedule,result}`; a success sets
//! `forkd_schedule_last_success_timestamp_seconds{schedule}`.
//!
//! Steps act as the API's operations do, with their hooks: snapshot ([`lifecycle::snapshot`],
//! or [`env_lifecycle::snapshot`] for an environment), refresh ([`lifecycle::move_head`], or
//! [`env_lifecycle::refresh`] for an environment), mask ([`masking::mask`]), prune
//! ([`retention::apply`]). Whether a step's name is an environment or a volume was recorded
//! when the schedule was added (`Schedule::environments`).
//! An ingest step is the agent's ingest run against this daemon's own API (with its token),
//! given to the scheduler by the binary's entry point ([`IngestRunner`]) because this room does
//! not use the agent's. Each step's volumes and environments are checked again just before it
//! runs ([`catalog::Catalog::check_scheduled_step`]): a name that is gone, changed kind (an
//! environment then, a volume now, or the other way), or no longer suits the step (a clone
//! become a source, an environment whose members are not all clones) fails the step.
//!
//! Shutdown: once the daemon is told to stop, no run starts (503) and a run in progress stops
//! before its next step (`interrupted`); the scheduler's task ends when no run is left, before
//! the daemon's final flush. A step in progress finishes first (an ingest step is an API request,
//! which the API's drain lets finish).
//!
//! At start-up ([`Scheduler::new`]): a schedule still marked `running` was cut short by a stop or
//! a crash; it is recorded as `interrupted` (logged as `schedule-failed`, counted). A fire time
//! missed while the daemon was down runs once at the first tick (`catch_up = "once"`) or is
//! skipped (`"skip"`: `last_fire` moves to the latest missed one).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use catalog::{CatchUp, LogEntry, Schedule, ScheduleRun, Step};
use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use tokio_util::sync::CancellationToken;

use crate::api::hooks::MaskRequest;
use crate::server::clock::Clock;
use crate::server::events::Events;
use crate::server::http::ApiError;
use crate::server::lifecycle::{self, Move};
use crate::server::{env_lifecycle, masking, retention};
use crate::store::{now_ms, Store};

/// Runs an `ingest SOURCE --from FROM` step against the daemon's API at `api` with `token`.
pub type IngestRunner = fn(api: &str, token: Option<String>, source: &str, from: &str) -> anyhow::Result<()>;

/// Parse a 5-field cron expression (UTC); the error is one line.
pub fn parse_cron(text: &str) -> Result<Cron, String> {
    let parser = CronParser::builder().seconds(Seconds::Disallowed).year(Year::Disallowed).build();
    parser.parse(text).map_err(|e| format!("cron `{text}` is not a valid 5-field cron expression: {e}"))
}

fn datetime(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

/// The first fire time strictly after `ms`.
pub fn next_after(cron: &Cron, ms: i64) -> Option<i64> {
    cron.find_next_occurrence(&datetime(ms)?, false).ok().map(|t| t.timestamp_millis())
}

/// The latest fire time at or before `ms`.
fn last_at_or_before(cron: &Cron, ms: i64) -> Option<i64> {
    cron.find_previous_occurrence(&datetime(ms)?, true).ok().map(|t| t.timestamp_millis())
}

/// The next fire time of `s` (after its last fire, or after it was added).
pub fn next_fire(s: &Schedule) -> Option<i64> {
    next_after(&parse_cron(&s.cron).ok()?, s.last_fire.unwrap_or(s.created_at))
}

/// The scheduler and what its runs work with.
#[derive(Debug)]
pub struct Scheduler {
    store: Arc<Store>,
    events: Arc<Events>,
    clock: Arc<Clock>,
    /// The daemon's API as a client URL, and its token.
    api: String,
    token: Option<String>,
    ingest: IngestRunner,
    /// The daemon's shutdown.
    stop: CancellationToken,
    /// Schedules with a run in progress (claimed before the run's thread starts).
    running: Arc<Mutex<HashSet<String>>>,
    /// Each schedule's next fire time, by name (only the tick uses it).
    next: Mutex<HashMap<String, NextFire>>,
}

/// A schedule's next fire time and what it was worked out from.
#[derive(Debug)]
struct NextFire {
    cron: String,
    /// `last_fire`, or when the schedule was added.
    from: i64,
    at: Option<i64>,
}

/// A schedule's name claimed for one run; released when dropped.
struct Claim {
    set: Arc<Mutex<HashSet<String>>>,
    name: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.name);
    }
}

impl Scheduler {
    /// A scheduler for the daemon whose API is at `api` (URL and token), until `stop`; records
    /// runs a stop interrupted and skips missed fire times of `catch_up = "skip"` schedules.
    pub fn new(
        store: Arc<Store>,
        events: Arc<Events>,
        clock: Arc<Clock>,
        api: (String, Option<String>),
        ingest: IngestRunner,
        stop: CancellationToken,
    ) -> Scheduler {
        let (api, token) = api;
        let running = Arc::new(Mutex::new(HashSet::new()));
        let next = Mutex::new(HashMap::new());
        let s = Scheduler { store, events, clock, api, token, ingest, stop, running, next };
        s.recover();
        s
    }

    /// Whether a run of `name` is in progress.
    pub fn is_running(&self, name: &str) -> bool {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).contains(name)
    }

    /// Tick every `interval` until the daemon stops, then wait for the runs in progress.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            for (name, fire) in self.due() {
                // Claimed here, not on the run's thread: the next tick cannot start it again.
                let Ok(claim) = self.claim(&name) else { continue };
                let s = self.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = s.run_claimed(claim, Some(fire)) {
                        tracing::warn!(schedule = %name, error = %e.1, "scheduled run not started");
                    }
                });
            }
        }
        while !self.running.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The schedules due now, not running, with the latest fire time each run covers.
    fn due(&self) -> Vec<(String, i64)> {
        let now = self.clock.now_ms();
        let cat = self.store.catalog();
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        next.retain(|name, _| cat.schedules().contains_key(name));
        let mut out = Vec::new();
        for s in cat.schedules().values().filter(|s| !self.is_running(&s.name)) {
            let from = s.last_fire.unwrap_or(s.created_at);
            let at = match next.get(&s.name) {
                Some(n) if n.cron == s.cron && n.from == from => n.at,
                _ => {
                    let at = next_fire(s);
                    next.insert(s.name.clone(), NextFire { cron: s.cron.clone(), from, at });
                    at
                }
            };
            if at.is_some_and(|t| t <= now) {
                let Ok(cron) = parse_cron(&s.cron) else { continue };
                out.push((s.name.clone(), last_at_or_before(&cron, now).unwrap_or(now)));
            }
        }
        out
    }

    /// Run `name` now (`fire`: the fire time it covers, none for `forkd schedule run`) and
    /// return how it ended; refused (409) while a run of it is in progress.
    pub fn run_schedule(&self, name: &str, fire: Option<i64>) -> Result<ScheduleRun, ApiError> {
        self.run_claimed(self.claim(name)?, fire)
    }

    /// [`Scheduler::run_schedule`] once its name is claimed (released at the end).
    fn run_claimed(&self, claim: Claim, fire: Option<i64>) -> Result<ScheduleRun, ApiError> {
        let name = claim.name.as_str();
        let started_at = self.clock.now_ms();
        let schedule = self.start(name, fire, started_at)?;
        tracing::info!(schedule = name, "schedule run started");
        let (result, error) = match self.steps(&schedule) {
            Ok(()) => ("ok", None),
            Err(e) if self.stop.is_cancelled() => ("interrupted", Some(e)),
            Err(e) => ("failed", Some(e)),
        };
        let run = ScheduleRun { started_at, finished_at: self.clock.now_ms(), result: result.into(), error };
        self.finish(name, &run);
        Ok(run)
    }

    fn claim(&self, name: &str) -> Result<Claim, ApiError> {
        let mut set = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if self.stop.is_cancelled() {
            return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "the daemon is stopping".into()));
        }
        if !set.insert(name.to_string()) {
            return Err(ApiError(StatusCode::CONFLICT, format!("schedule `{name}` is already running")));
        }
        Ok(Claim { set: self.running.clone(), name: name.to_string() })
    }

    /// Mark the run durably (so a kill is seen at the next start); the schedule as it starts.
    fn start(&self, name: &str, fire: Option<i64>, started_at: i64) -> Result<Schedule, ApiError> {
        let schedule = self.store.op(|cat| {
            let mut s = cat.schedule(name)?.clone();
            s.running = Some(started_at);
            if let Some(f) = fire {
                s.last_fire = Some(s.last_fire.map_or(f, |l| l.max(f)));
            }
            cat.put_schedule(s.clone())?;
            Ok(s)
        })?;
        self.store.flush()?;
        Ok(schedule)
    }

    /// Run the steps of `schedule` in order, each logged; the first failure ends the run.
    fn steps(&self, schedule: &Schedule) -> Result<(), String> {
        let (name, steps) = (&schedule.name, &schedule.steps);
        for (i, step) in steps.iter().enumerate() {
            if self.stop.is_cancelled() {
                return Err(format!("interrupted: the daemon stopped before step {} of {}", i + 1, steps.len()));
            }
            let (at, t) = (now_ms(), Instant::now());
            let result = self.step(schedule, step);
            self.store.log_operation(LogEntry {
                at,
                who: format!("schedule {name}"),
                what: step.to_string(),
                target: step.target().map(str::to_string),
                duration_ms: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
                result: if result.is_ok() { "ok" } else { "failed" }.into(),
                error: result.as_ref().err().cloned(),
                ..LogEntry::default()
            });
            if let Err(e) = result {
                return Err(format!("step {} of {} (`{step}`): {e}", i + 1, steps.len()));
            }
        }
        Ok(())
    }

    /// One step of `schedule`, as its API operation does it: on an environment when its name was
    /// one when the schedule was added (and, checked first, still is).
    fn step(&self, schedule: &Schedule, step: &Step) -> Result<(), String> {
        let (st, ev) = (&*self.store, &*self.events);
        st.catalog().check_scheduled_step(schedule, step).map_err(|e| e.to_string())?;
        let is_environment = |name: &String| schedule.environments.contains(name);
        let api = |e: ApiError| e.1;
        match step {
            Step::Ingest { source, from } => {
                (self.ingest)(&self.api, self.token.clone(), source, from).map_err(|e| format!("{e:#}"))
            }
            Step::Mask { snapshot, into, script } => {
                let req = MaskRequest {
                    snapshot: snapshot.clone(),
                    script: script.clone(),
                    into: into.clone(),
                    timeout_secs: None,
                };
                masking::mask(st, ev, &req).map(drop).map_err(api)
            }
            Step::Snapshot { volume } if is_environment(volume) => {
                env_lifecycle::snapshot(st, ev, volume, None).map(drop).map_err(api)
            }
            Step::Snapshot { volume } => lifecycle::snapshot(st, ev, volume, None).map(drop).map_err(api),
            Step::Refresh { clones } => clones.iter().try_for_each(|c| {
                let refreshed = if is_environment(c) {
                    env_lifecycle::refresh(st, ev, c).map(drop)
                } else {
                    lifecycle::move_head(st, ev, c, Move::Refresh, None, |cat, n| cat.refresh(n, None)).map(drop)
                };
                refreshed.map_err(|e| format!("{c}: {}", e.1))
            }),
            Step::Prune { volume } => retention::apply(st, volume).map(drop).map_err(|e| e.to_string()),
        }
    }

    /// Record how the run ended: the schedule's record, the log, the metrics.
    fn finish(&self, name: &str, run: &ScheduleRun) {
        let recorded = self.store.op(|cat| {
            let Ok(s) = cat.schedule(name) else { return Ok(()) };
            let mut s = s.clone();
            s.running = None;
            if run.result == "ok" {
                s.last_success_at = Some(run.finished_at);
            }
            s.last_run = Some(run.clone());
            cat.put_schedule(s)
        });
        if let Err(e) = recorded {
            tracing::warn!(schedule = name, error = %e, "could not record the schedule's run");
        }
        self.outcome(name, run);
    }

    /// The run's log entry and metrics.
    fn outcome(&self, name: &str, run: &ScheduleRun) {
        let ok = run.result == "ok";
        self.store.log_operation(LogEntry {
            at: now_ms(),
            who: format!("schedule {name}"),
            what: if ok { "schedule-ok" } else { "schedule-failed" }.into(),
            duration_ms: u64::try_from(run.finished_at.saturating_sub(run.started_at)).unwrap_or(0),
            result: if ok { "ok".into() } else { "failed".into() },
            error: run.error.clone(),
            detail: Some(format!("schedule {name}: {}", run.result)),
            ..LogEntry::default()
        });
        let m = &self.store.metrics;
        m.schedules.runs.with_label_values(&[name, &run.result]).inc();
        if ok {
            m.schedules.last_success.with_label_values(&[name]).set(run.finished_at.div_euclid(1000));
        }
        match &run.error {
            Some(e) => tracing::warn!(schedule = name, result = %run.result, error = %e, "schedule run failed"),
            None => tracing::info!(schedule = name, "schedule run succeeded"),
        }
    }

    /// At start-up: interrupted runs recorded, missed fire times of `skip` schedules skipped,
    /// the last-success gauge set from the records.
    fn recover(&self) {
        let now = self.clock.now_ms();
        let schedules: Vec<Schedule> = self.store.catalog().schedules().values().cloned().collect();
        for s in schedules {
            if let Some(at) = s.last_success_at {
                self.store.metrics.schedules.last_success.with_label_values(&[&s.name]).set(at.div_euclid(1000));
            }
            if let Some(started_at) = s.running {
                let error = Some("interrupted: the daemon stopped during the run".to_string());
                let run = ScheduleRun { started_at, finished_at: now, result: "interrupted".into(), error };
                self.finish(&s.name, &run);
            }
            if s.catch_up == CatchUp::Skip {
                self.skip_missed(&s.name, now);
            }
        }
    }

    /// Move `last_fire` past every fire time at or before `now` without running.
    fn skip_missed(&self, name: &str, now: i64) {
        let skipped = self.store.op(|cat| {
            let mut s = cat.schedule(name)?.clone();
            let Ok(cron) = parse_cron(&s.cron) else { return Ok(None) };
            if next_fire(&s).is_none_or(|t| t > now) {
                return Ok(None);
            }
            s.last_fire = last_at_or_before(&cron, now);
            let fire = s.last_fire;
            cat.put_schedule(s)?;
            Ok(fire)
        });
        match skipped {
            Ok(Some(fire)) => {
                tracing::info!(schedule = name, fire = %catalog::format_time(fire), "missed run skipped (catch_up = skip)");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(schedule = name, error = %e, "could not skip the missed run"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_is_five_fields_in_utc() {
        let cron = parse_cron("0 2 * * *").expect("valid");
        // 2027-01-15T08:00:00Z: the next 02:00 UTC is the next day's.
        let t0 = 1_800_000_000_000;
        let next = next_after(&cron, t0).expect("next");
        assert_eq!(catalog::format_time(next), "2027-01-16T02:00:00.000Z");
        assert_eq!(next_after(&cron, next), Some(next + 86_400_000));
        assert_eq!(last_at_or_before(&cron, next + 1000), Some(next));
        for bad in ["0 2 * *", "61 2 * * *", "0 2 * * * *", "nightly", ""] {
            let err = parse_cron(bad).expect_err(bad);
            assert!(err.starts_with("cron `"), "{err}");
        }
    }
}
