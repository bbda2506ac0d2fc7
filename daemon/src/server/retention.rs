//! Applying retention on the daemon (PRODUCT.md, "retention"): after every snapshot, after an
//! ingest's snapshot, after an environment snapshot (each member), and on `forkd prune`.
//!
//! The plan and the deletion are the catalog's ([`catalog::Catalog::prune`]): one commit per
//! volume. Around it the daemon does two things. It fences and drains the read-only export of
//! every snapshot the plan names before deleting it (as `forkd delete VOLUME@N` does), and it
//! deletes nothing it did not fence: every other snapshot is pinned for that commit. Then each
//! deletion goes to the operation log with the rule that let it go (`who`: `retention`).
//!
//! Pins: the catalog already keeps an ingest's base and what a mask in progress reads (see
//! `catalog/src/retention.rs`); the daemon pins nothing else yet. Retention runs no hooks:
//! it deletes snapshots, never volumes, and a hook that failed would leave a rule half applied.
//!
//! After a snapshot, a failure to prune is logged, never returned: the snapshot stands.

use std::collections::BTreeSet;

use catalog::{LogEntry, Pruned, SnapshotId};

use crate::server::lifecycle::DRAIN;
use crate::store::exports::Scope;
use crate::store::{now_ms, Store, StoreError};

/// Apply `volume`'s retention rules now; returns what went and why (nothing without rules).
pub fn apply(st: &Store, volume: &str) -> Result<Vec<Pruned>, StoreError> {
    let (planned, all) = {
        let cat = st.catalog();
        let v = cat.volume(volume)?;
        let all: BTreeSet<u64> = v.snapshots.iter().map(|s| s.id).collect();
        (cat.prune_plan(volume, &BTreeSet::new())?, all)
    };
    if planned.is_empty() {
        return Ok(planned);
    }
    let fenced: BTreeSet<u64> = planned.iter().map(|p| p.snapshot.id).collect();
    let _fences: Vec<_> =
        planned.iter().map(|p| st.exports.fence_and_drain(&p.snapshot.to_string(), Scope::Volume, DRAIN)).collect();
    let pinned: BTreeSet<SnapshotId> =
        all.difference(&fenced).map(|&id| SnapshotId { volume: volume.to_string(), id }).collect();
    let at = now_ms();
    let pruned = st.op_freeing(|cat| cat.prune(volume, &pinned))?;
    for p in &pruned {
        log(st, at, p);
    }
    Ok(pruned)
}

/// [`apply`] after a snapshot of `volume` was taken: a failure is a warning.
pub fn after_snapshot(st: &Store, volume: &str) {
    if let Err(e) = apply(st, volume) {
        tracing::warn!(volume, error = %e, "retention could not prune; the snapshot stands");
    }
}

fn log(st: &Store, at: i64, p: &Pruned) {
    st.log_operation(LogEntry {
        at,
        who: "retention".into(),
        what: "prune".into(),
        target: Some(p.snapshot.to_string()),
        result: "ok".into(),
        detail: Some(p.rule.clone()),
        ..LogEntry::default()
    });
}
