//! Replication, the source's side (docs/replication.md): `forkd replicate VOLUME --to URL`
//! sends every snapshot of VOLUME and of the clones descending from it that the target lacks,
//! oldest first, each as the blocks that differ from a snapshot the target already holds.
//!
//! - [`plan`]: which snapshots, in which order, against which base;
//! - [`send`]: one snapshot: its header, then its frames, produced as they are sent.
//!
//! The [`Replicator`] keeps one job per volume: a one-shot run (the API answers when it is
//! done) or a continuous one, a task that every interval snapshots the volume's head if it was
//! written since its latest snapshot and runs again; continuous replications are kept in the
//! catalog and start again with the daemon. A failed run keeps what arrived: the target
//! records its progress after every frame, so the next run resumes there.

mod plan;
mod send;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use catalog::Catalog;

use crate::api::client::Client;
use crate::api::replication::{ReplicateReport, ReplicationStatus};
use crate::store::Store;
pub use catalog::Replication;
use send::Link;

/// How long a stalled link is waited for by default.
pub const DEFAULT_STALL: Duration = Duration::from_secs(30);

/// Where a job stands, for `show`.
#[derive(Debug, Clone, Default)]
struct Job {
    to: String,
    continuous_ms: Option<u64>,
    running: bool,
    last_error: Option<String>,
    last_sent: Option<catalog::SnapshotId>,
    last_run_at: Option<i64>,
    last_report: Option<ReplicateReport>,
    /// Stops a continuous job.
    stop: Option<CancellationToken>,
}

/// The replication jobs of this daemon, by volume.
#[derive(Debug)]
pub struct Replicator {
    store: Arc<Store>,
    jobs: Mutex<HashMap<String, Job>>,
    shutdown: CancellationToken,
    /// The target's side: which transfer may write each incoming snapshot.
    pub incoming: IncomingClaims,
    /// Digests of snapshots sent.
    digests: send::Digests,
}

/// Why a replication could not start.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// A job already runs for the volume.
    #[error("a replication of `{0}` is already running (stop a continuous one with `forkd replicate {0} --stop`)")]
    Busy(String),
    /// Nothing to stop.
    #[error("no continuous replication of `{0}` is running")]
    NotRunning(String),
}

impl Replicator {
    /// The replicator of `store`; its continuous jobs end with `shutdown`.
    pub fn new(store: Arc<Store>, shutdown: CancellationToken) -> Arc<Replicator> {
        Arc::new(Replicator {
            store,
            jobs: Mutex::new(HashMap::new()),
            shutdown,
            incoming: IncomingClaims::default(),
            digests: send::Digests::default(),
        })
    }

    /// Start the continuous replications kept in the catalog.
    pub fn resume_kept(self: &Arc<Self>) {
        let kept = self.store.catalog().replications();
        match kept {
            Ok(kept) => {
                for (volume, r) in kept {
                    tracing::info!(%volume, to = %r.to, "continuing a continuous replication");
                    if let Err(e) = self.start_continuous(&volume, r, false) {
                        tracing::warn!(%volume, error = %e, "cannot continue a replication");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the kept replications"),
        }
    }

    /// Run one replication of `volume` to `to` now, on this thread; its report.
    pub fn run_once(
        &self,
        volume: &str,
        to: &str,
        token: Option<String>,
        stall: Duration,
    ) -> anyhow::Result<ReplicateReport> {
        self.claim(volume, to, None, None)?;
        let result = self.run(volume, &link(to, token, stall));
        self.finished(volume, &result);
        result
    }

    /// Start replicating `volume` every `r.interval_ms` in the background (and keep it in
    /// the catalog, with `keep`).
    pub fn start_continuous(self: &Arc<Self>, volume: &str, r: Replication, keep: bool) -> anyhow::Result<()> {
        let stop = self.shutdown.child_token();
        self.claim(volume, &r.to, Some(r.interval_ms), Some(stop.clone()))?;
        if keep {
            if let Err(e) = self.store.op(|cat| cat.set_replication(volume, Some(&r))) {
                self.jobs.lock().remove(volume);
                return Err(e.into());
            }
        }
        let me = self.clone();
        let volume = volume.to_string();
        tokio::spawn(async move { me.continuous(volume, r, stop).await });
        Ok(())
    }

    /// Stop `volume`'s continuous replication (a run under way ends first).
    pub fn stop(&self, volume: &str) -> anyhow::Result<()> {
        let stop = self.jobs.lock().get(volume).and_then(|j| j.stop.clone());
        let stop = stop.ok_or_else(|| Refused::NotRunning(volume.to_string()))?;
        stop.cancel();
        self.store.op_freeing(|cat| cat.set_replication(volume, None))?;
        let mut jobs = self.jobs.lock();
        if let Some(j) = jobs.get_mut(volume) {
            j.stop = None;
            j.continuous_ms = None;
        }
        Ok(())
    }

    /// `volume`'s replication as `show` reports it, if it has one; `now` in unix ms.
    pub fn status(&self, volume: &str, now: i64) -> Option<ReplicationStatus> {
        let job = self.jobs.lock().get(volume).cloned()?;
        let (last_sent, lag_ms) = self.lag(volume, job.last_sent.as_ref(), now);
        let state = match (job.running, &job.last_error) {
            (true, _) => "running",
            (false, Some(_)) => "failed",
            (false, None) => "idle",
        };
        Some(ReplicationStatus {
            to: job.to,
            continuous_ms: job.continuous_ms,
            state: state.into(),
            last_error: job.last_error,
            last_sent: last_sent.or(job.last_sent.map(|s| s.to_string())),
            lag_ms,
            last_run_at: job.last_run_at.map(catalog::format_time),
            last_report: job.last_report,
        })
    }

    /// The last snapshot sent, and how far behind the target is: 0 when the head has not
    /// changed since that snapshot, else the time since it was taken.
    fn lag(&self, volume: &str, sent: Option<&catalog::SnapshotId>, now: i64) -> (Option<String>, Option<u64>) {
        let cat = self.store.catalog();
        let Some(sent) = sent else { return (None, None) };
        let Ok(v) = cat.volume(volume) else { return (None, None) };
        let Some(s) = v.snapshots.iter().find(|s| s.id == sent.id) else { return (Some(sent.to_string()), None) };
        let lag = if s.root == v.root { 0 } else { u64::try_from(now - s.created_at).unwrap_or(0) };
        (Some(sent.to_string()), Some(lag))
    }

    fn claim(&self, volume: &str, to: &str, every: Option<u64>, stop: Option<CancellationToken>) -> anyhow::Result<()> {
        self.store.catalog().volume(volume)?;
        let mut jobs = self.jobs.lock();
        let job = jobs.entry(volume.to_string()).or_default();
        if job.running || job.stop.is_some() {
            return Err(Refused::Busy(volume.to_string()).into());
        }
        let last_sent = if job.to == to { job.last_sent.take() } else { None };
        *job = Job {
            to: to.to_string(),
            continuous_ms: every,
            running: stop.is_none(),
            last_sent,
            stop,
            ..Job::default()
        };
        Ok(())
    }

    fn finished(&self, volume: &str, result: &anyhow::Result<ReplicateReport>) {
        let mut jobs = self.jobs.lock();
        let Some(job) = jobs.get_mut(volume) else { return };
        job.running = false;
        job.last_run_at = Some(now_ms());
        match result {
            Ok(report) => {
                job.last_error = None;
                job.last_report = Some(report.clone());
            }
            Err(e) => job.last_error = Some(format!("{e:#}")),
        }
    }

    /// One run: every volume of the lineage, every snapshot the target lacks, oldest first.
    fn run(&self, volume: &str, link: &Link) -> anyhow::Result<ReplicateReport> {
        let started = Instant::now();
        // Guids derived from this site's id are about to leave it: the id must outlive a restart.
        if !self.store.catalog().site_is_kept() {
            self.store.op(Catalog::keep_site)?;
        }
        let order = plan::lineage_order(&self.store.catalog(), volume)?;
        let mut report = ReplicateReport { volume: volume.into(), to: link.client.base().into(), ..Default::default() };
        let (mut held, mut todo, mut bare) = (HashSet::new(), Vec::new(), Vec::new());
        for name in order {
            let state = link.client.replica_state(&name)?;
            held.extend(state.snapshots.iter().cloned());
            if name == volume {
                self.note_latest_held(volume, &held);
            }
            let mut planned = held.clone();
            let out = plan::volume_plan(&self.store.catalog(), &name, &mut planned)?;
            if out.is_empty() && !state.exists {
                bare.push(name);
            }
            todo.extend(out);
            held = planned;
        }
        for out in plan::oldest_first(todo) {
            let snap = out.snap.clone();
            let sent = send::send(&self.store, link, &self.digests, out)
                .map_err(|e| anyhow::anyhow!("sending {snap} to {}: {e:#}", link.client.base()))?;
            report.payload_bytes += sent.payload_bytes;
            report.wire_bytes += sent.wire_bytes;
            report.snapshots.push(sent);
            if snap.volume == volume {
                if let Some(job) = self.jobs.lock().get_mut(volume) {
                    job.last_sent = Some(snap);
                }
            }
        }
        for name in bare {
            self.declare_volume(&name, &held, link)?;
        }
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(report)
    }

    /// Make `name`, a volume with nothing to send (a clone not snapshotted yet), exist on the
    /// target as a clone of its origin, so the lineage there matches; volumes whose origin the
    /// target does not hold (it may not leave this site) are left out.
    fn declare_volume(&self, name: &str, on_target: &HashSet<String>, link: &Link) -> anyhow::Result<()> {
        let (meta, size) = {
            let cat = self.store.catalog();
            let v = cat.volume(name)?;
            (plan::volume_meta(&cat, name, on_target)?, v.size_bytes)
        };
        if meta.origin.is_none() {
            return Ok(());
        }
        let body = serde_json::json!({ "volume": meta, "size_bytes": size });
        link.client.replica_declare(name, &body)?;
        Ok(())
    }

    /// Record the newest snapshot of `volume` the target holds (for the lag).
    fn note_latest_held(&self, volume: &str, on_target: &HashSet<String>) {
        let latest = {
            let cat = self.store.catalog();
            let Ok(v) = cat.volume(volume) else { return };
            let held = v.snapshots.iter().rev().find(|s| on_target.contains(&cat.guid(v, s)));
            held.map(|s| catalog::SnapshotId { volume: volume.into(), id: s.id })
        };
        if let Some(job) = self.jobs.lock().get_mut(volume) {
            job.last_sent = latest.or(job.last_sent.take());
        }
    }

    async fn continuous(self: Arc<Self>, volume: String, r: Replication, stop: CancellationToken) {
        let link = link(&r.to, r.token.clone(), Duration::from_millis(r.stall_ms));
        loop {
            let me = self.clone();
            let (v, l) = (volume.clone(), link.clone());
            if let Some(j) = self.jobs.lock().get_mut(&volume) {
                j.running = true;
            }
            let result = tokio::task::spawn_blocking(move || me.cycle(&v, &l))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("replication task failed: {e}")));
            if let Err(e) = &result {
                tracing::warn!(%volume, error = %format!("{e:#}"), "replication run failed; trying again next interval");
            }
            let gone = self.store.catalog().volume(&volume).is_err();
            self.finished(&volume, &result);
            if gone {
                tracing::info!(%volume, "the volume is gone: its replication ends");
                let _ = self.store.op_freeing(|cat| cat.set_replication(&volume, None));
                self.jobs.lock().remove(&volume);
                return;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(r.interval_ms)) => {}
            }
        }
    }

    /// One continuous run: snapshot the head if it changed and the target holds the latest
    /// snapshot (so an outage leaves one snapshot waiting, not one per interval), then send.
    fn cycle(&self, volume: &str, link: &Link) -> anyhow::Result<ReplicateReport> {
        let sent = self.jobs.lock().get(volume).and_then(|j| j.last_sent.clone());
        let changed = {
            let cat = self.store.catalog();
            let v = cat.volume(volume)?;
            let latest = v.snapshots.last();
            let caught_up = latest.is_none_or(|s| sent.as_ref().is_some_and(|x| x.id == s.id));
            v.replica_of.is_none() && latest.is_none_or(|s| s.root != v.root) && v.root != 0 && caught_up
        };
        if changed {
            self.store.op(|cat| cat.snapshot_for_replication(volume))?;
            crate::server::retention::after_snapshot(&self.store, volume);
        }
        self.run(volume, link)
    }
}

/// Unix milliseconds by the system clock, which also stamps snapshots (so a lag is their
/// difference).
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn link(to: &str, token: Option<String>, stall: Duration) -> Link {
    Link { client: Client::with_timeout(to, token, stall), stall }
}

/// Who may write a volume's incoming snapshot: the newest transfer into it. A sender that
/// reconnects after a cut link takes over from its old connection (which the target may not
/// have seen die): each declaration or stream takes a new ticket, and a frame is written only
/// while its stream's ticket is the volume's newest, checked under the same lock.
#[derive(Debug, Default)]
pub struct IncomingClaims(Mutex<HashMap<String, Arc<Mutex<u64>>>>);

impl IncomingClaims {
    /// A new ticket for `volume`: every older transfer's next frame is refused.
    pub fn take(&self, volume: &str) -> IncomingTicket {
        let lock = self.0.lock().entry(volume.to_string()).or_default().clone();
        let ticket = {
            let mut t = lock.lock();
            *t += 1;
            *t
        };
        IncomingTicket { lock, ticket }
    }
}

/// A transfer's right to write a volume's incoming snapshot, while it is the newest.
#[derive(Debug, Clone)]
pub struct IncomingTicket {
    lock: Arc<Mutex<u64>>,
    ticket: u64,
}

impl IncomingTicket {
    /// Run `f` if this is still the newest transfer (holding off newer ones meanwhile);
    /// `None` when a newer one took over.
    pub fn while_newest<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let t = self.lock.lock();
        (*t == self.ticket).then(f)
    }
}
