//! The lease reaper: the periodic task that deletes clones and environment clones whose lease
//! came, and warns of it before (PRODUCT.md, "lease"; docs/api.md, "Leases").
//!
//! Every tick (`lease_tick`, 5 s by default) it reads "now" from the daemon's [`Clock`] and,
//! for each clone with a lease (an environment with a lease is handled the same way, as a
//! whole: [`env_lifecycle::delete`] with the environment's hooks, its members' connections and
//! I/O counting as its own):
//! - due ([`catalog::Lease::due`]): its time came, or it has no connection open and saw no
//!   connection close and no API I/O for its idle timeout: it is deleted as `forkd delete`
//!   deletes ([`lifecycle::delete`]: its `pre-delete` hook, then connected hosts are
//!   disconnected, then the delete), counted in `forkd_lease_expiries_total{reason}` and
//!   written to the operation log as `who: lease`. A failing `pre-delete` hook (or any other
//!   refusal) keeps the clone: the failure is logged once per attempt and the next attempt
//!   waits, doubling from 30 s up to 30 min of real time, so a broken hook is not run every
//!   tick. A clone deleted meanwhile by someone else is simply gone.
//! - `lease_warning` (1 h by default) or less before its expiry time: its `lease-expiring`
//!   hook runs once (`warned` is recorded with the lease; changing the expiry re-arms it). A
//!   failing `lease-expiring` hook is logged and not retried. `forkd_leases_expiring` counts
//!   warned clones not yet expired.
//!
//! Idleness is tracked here, in clock time: a volume is active at a tick when a connection to
//! it is open, or one closed (or API I/O happened) since the last tick
//! ([`crate::store::exports::ExportRegistry::take_activity`]). After a restart idleness counts
//! from the daemon's start (or from when the idle timeout was set, if later).
//!
//! The clock jumping: forward, whatever is due by the new time expires at the next tick (with
//! the warning first when the hook has not run yet); backward, nothing is due until the time
//! comes again; both are logged once per jump.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use catalog::{Expiry, Lease};
use tokio_util::sync::CancellationToken;

use crate::server::clock::Clock;
use crate::server::events::{Events, Facts};
use crate::server::{env_lifecycle, lifecycle};
use crate::store::Store;

/// The first wait before an expiry that failed is tried again; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(30);
/// The longest wait between attempts to expire a clone.
const MAX_RETRY: Duration = Duration::from_secs(30 * 60);
/// A clock that moved further than this between two ticks jumped (logged).
const JUMP_MS: i64 = 3_600_000;

/// What the reaper remembers between ticks (in memory: a restart forgets it).
#[derive(Debug, Default)]
struct State {
    /// Clock time of the daemon's start: idleness counts from no earlier.
    started: i64,
    /// The clock at the last tick.
    last_now: Option<i64>,
    /// Clock time each clone (or environment: any member) was last seen active.
    last_active: HashMap<String, i64>,
    /// Clones and environments whose expiry failed: attempts so far and when to try again.
    failures: HashMap<String, (u32, Instant)>,
}

/// A lease and what holds it: a clone, or an environment with its member volumes.
#[derive(Debug)]
struct Held {
    /// The clone's or the environment's name.
    name: String,
    lease: Lease,
    /// The volumes whose connections and I/O keep it from idling: the clone, or the members.
    volumes: Vec<String>,
    environment: bool,
}

impl Held {
    /// `clone` or `environment`, for logs.
    fn what(&self) -> &'static str {
        if self.environment {
            "environment"
        } else {
            "clone"
        }
    }
}

/// The reaper and what it works with.
#[derive(Debug)]
pub struct Reaper {
    store: Arc<Store>,
    events: Arc<Events>,
    clock: Arc<Clock>,
    warning_ms: u64,
    state: Mutex<State>,
}

impl Reaper {
    /// A reaper warning `warning_ms` before expiries.
    pub fn new(store: Arc<Store>, events: Arc<Events>, clock: Arc<Clock>, warning_ms: u64) -> Reaper {
        let started = clock.now_ms();
        let state = Mutex::new(State { started, ..State::default() });
        Reaper { store, events, clock, warning_ms, state }
    }

    /// Tick every `interval` until `stop`.
    pub async fn run(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let r = self.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || r.tick()).await {
                tracing::warn!(error = %e, "lease reaper task failed");
            }
        }
    }

    /// One pass over every lease (blocking: hooks run and deletes drain connections).
    pub fn tick(&self) {
        let now = self.clock.now_ms();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        note_jump(&mut state, now);
        let activity = self.store.exports.take_activity();
        let held = self.held();
        state.last_active.retain(|name, _| held.iter().any(|h| h.name == *name));
        state.failures.retain(|name, _| held.iter().any(|h| h.name == *name));
        let mut expiring = 0;
        for h in held {
            let connected = h.volumes.iter().any(|v| self.store.exports.connected(v));
            if connected || h.volumes.iter().any(|v| activity.contains(v)) {
                state.last_active.insert(h.name.clone(), now);
            }
            let active = state.last_active.get(&h.name).copied().unwrap_or(state.started);
            if let Some(why) = h.lease.due(now, Some(active), connected) {
                if why == Expiry::Time && !h.lease.warned {
                    // The clock jumped past the warning (or the daemon was down): warn first.
                    self.warn(&h);
                }
                self.expire(&mut state, &h, why);
                continue;
            }
            if h.lease.warn_due(now, self.warning_ms) {
                self.warn(&h);
            }
            if h.lease.warned || h.lease.warn_due(now, self.warning_ms) {
                expiring += 1;
            }
        }
        self.store.metrics.leases_expiring.set(expiring);
    }

    /// Every lease: clones' and environments' (whose names never collide).
    fn held(&self) -> Vec<Held> {
        let cat = self.store.catalog();
        let clones = cat.leases().into_iter().map(|(name, lease)| Held {
            volumes: vec![name.clone()],
            name,
            lease,
            environment: false,
        });
        let envs = cat.env_leases().into_iter().map(|(name, lease)| Held {
            volumes: cat.environment(&name).map(|e| e.members.values().cloned().collect()).unwrap_or_default(),
            name,
            lease,
            environment: true,
        });
        clones.chain(envs).collect()
    }

    /// Run the `lease-expiring` hook of what `h` is and record that it ran.
    fn warn(&self, h: &Held) {
        let Some(at) = h.lease.expires_at else { return };
        let name = h.name.as_str();
        tracing::info!(leased = name, expires_at = %catalog::format_time(at), "lease expiring");
        let fired = match self.facts(h) {
            Ok(facts) => self.events.fire(&self.store, "lease-expiring", &facts).map(drop).map_err(|e| e.0),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = fired {
            tracing::warn!(leased = name, error = %e, "the lease-expiring hook failed; it is not run again");
        }
        let marked = if h.environment {
            self.store.op(|cat| cat.mark_env_lease_warned(name, at))
        } else {
            self.store.op(|cat| cat.mark_lease_warned(name, at))
        };
        if let Err(e) = marked {
            tracing::warn!(leased = name, error = %e, "could not record the lease warning");
        }
    }

    /// Delete what `h` is, whose lease is due, unless a failed attempt asks to wait.
    fn expire(&self, state: &mut State, h: &Held, why: Expiry) {
        let name = h.name.as_str();
        if state.failures.get(name).is_some_and(|(_, retry)| Instant::now() < *retry) {
            return;
        }
        tracing::info!(leased = name, reason = why.name(), "lease due: deleting the {}", h.what());
        let start = Instant::now();
        let at = crate::store::now_ms();
        let result = if h.environment {
            env_lifecycle::delete(&self.store, &self.events, name, false).map(drop)
        } else {
            lifecycle::delete(&self.store, &self.events, name).map(drop)
        };
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let error = match result {
            Ok(()) => {
                state.failures.remove(name);
                state.last_active.remove(name);
                self.store.metrics.lease_expiries.with_label_values(&[why.name()]).inc();
                None
            }
            Err(e) if e.0 == StatusCode::NOT_FOUND => {
                tracing::info!(leased = name, "the {} was deleted meanwhile", h.what());
                return;
            }
            Err(e) => {
                let attempts = state.failures.get(name).map_or(1, |(n, _)| n + 1);
                let wait = retry_wait(attempts);
                state.failures.insert(name.to_string(), (attempts, Instant::now() + wait));
                tracing::warn!(leased = name, attempts, retry_in_s = wait.as_secs(), error = %e.1, "lease due but the {} could not be deleted; it stays", h.what());
                Some(e.1)
            }
        };
        self.store.log_operation(catalog::LogEntry {
            at,
            who: "lease".into(),
            what: if h.environment { "env delete" } else { "delete" }.into(),
            target: Some(name.to_string()),
            duration_ms: ms,
            result: if error.is_some() { "failed" } else { "ok" }.into(),
            detail: Some(format!("lease {}", why.name())),
            error,
            ..catalog::LogEntry::default()
        });
    }

    /// What the hooks of what `h` is are told.
    fn facts(&self, h: &Held) -> Result<Facts, crate::store::StoreError> {
        if h.environment {
            return env_lifecycle::facts(&self.store, &h.name);
        }
        let origin = self.store.catalog().volume(&h.name).ok().and_then(|v| v.origin.as_ref().map(ToString::to_string));
        Ok(Facts { volume: h.name.clone(), origin, ..Facts::default() })
    }
}

/// How long to wait after the `attempts`-th failed expiry.
fn retry_wait(attempts: u32) -> Duration {
    FIRST_RETRY.saturating_mul(1u32.checked_shl(attempts.saturating_sub(1)).unwrap_or(u32::MAX)).min(MAX_RETRY)
}

/// Log a clock that jumped since the last tick.
fn note_jump(state: &mut State, now: i64) {
    if let Some(last) = state.last_now {
        if now < last {
            tracing::warn!(from = %catalog::format_time(last), to = %catalog::format_time(now), "the clock went back: leases wait until their time comes again");
        } else if now - last > JUMP_MS {
            tracing::info!(from = %catalog::format_time(last), to = %catalog::format_time(now), "the clock jumped forward: leases due by now expire");
        }
    }
    state.last_now = Some(now);
}

/// A lease duration from the API (`72h`, `30d`, `90m`): positive, with a unit.
pub fn span(what: &str, text: &str) -> Result<u64, String> {
    match catalog::parse_span(text) {
        Some(0) => Err(format!("{what} `{text}` ends now: give a positive duration such as 72h")),
        Some(ms) => Ok(ms),
        None => Err(format!("{what} `{text}`: give a duration such as 90m, 72h or 30d")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_and_spans_are_checked() {
        assert_eq!(retry_wait(1), FIRST_RETRY);
        assert_eq!(retry_wait(2), FIRST_RETRY * 2);
        assert_eq!(retry_wait(40), MAX_RETRY);
        assert_eq!(span("lease", "72h"), Ok(72 * 3_600_000));
        assert!(span("lease", "0h").expect_err("zero").contains("positive"));
        assert!(span("lease", "72").expect_err("no unit").contains("72h"));
    }
}
