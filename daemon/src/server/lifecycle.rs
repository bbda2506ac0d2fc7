//! What an operation on a volume does around its catalog step: its hooks in order, the gate
//! that keeps hosts off a volume until its `configure-clone` hook succeeded, the fences that
//! close connections before a head switches, and the undo when a hook fails (PRODUCT.md,
//! "Hook events").
//!
//! - snapshot: `pre-snapshot`, the snapshot, `post-snapshot`, then retention (`retention`).
//! - clone: the clone (gated to its hook), `configure-clone`; on failure the clone is removed
//!   (and a snapshot taken only to clone from is dropped again).
//! - rewind and refresh: `pre-*`, fence and switch (gated), `configure-clone`, `post-*`; on
//!   failure the clone's record before the switch comes back.
//! - delete: `pre-delete`, fence, delete.
//! - ingest: `post-ingest` once the new snapshot is recorded, then retention.
//!
//! A `post-*` hook that fails does not undo its operation, which succeeded: the failure is
//! logged and counted. Every function runs on a blocking thread.

use catalog::{Catalog, CatalogError, SnapshotId};

use crate::server::events::{Events, Facts};
use crate::server::http::ApiError;
use crate::store::exports::Scope;
use crate::store::Store;

/// How long a rewind, refresh or delete waits for connected clients to be closed.
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

type Result<T> = std::result::Result<T, ApiError>;

/// Run a `post-*` hook: its failure is reported, not returned.
pub fn post(ev: &Events, st: &Store, event: &str, facts: &Facts) {
    if let Err(e) = ev.fire(st, event, facts) {
        tracing::warn!(event, owner = facts.owner(), error = %e, "post hook failed; the operation stands");
    }
}

/// After an ingest made `snapshot` of `source`: its `post-ingest` hook.
pub fn post_ingest(st: &Store, ev: &Events, source: &str, snapshot: &str) {
    let facts = Facts { volume: source.to_string(), snapshot: Some(snapshot.to_string()), ..Facts::default() };
    post(ev, st, "post-ingest", &facts);
    crate::server::retention::after_snapshot(st, source);
}

/// Snapshot `volume` between its `pre-snapshot` and `post-snapshot` hooks.
pub fn snapshot(st: &Store, ev: &Events, volume: &str, bookmark: Option<&str>) -> Result<SnapshotId> {
    st.catalog().volume(volume)?;
    let mut facts = Facts { volume: volume.to_string(), ..Facts::default() };
    ev.fire(st, "pre-snapshot", &facts)?;
    let id = st.op(|cat| cat.snapshot(volume, bookmark))?;
    facts.snapshot = Some(id.to_string());
    post(ev, st, "post-snapshot", &facts);
    crate::server::retention::after_snapshot(st, volume);
    Ok(id)
}

/// The lease and quota a new clone asks for (none: its source's defaults, if any), and "now"
/// by the daemon's clock.
#[derive(Debug, Clone, Copy)]
pub struct CloneAsk {
    /// Its lease, milliseconds from now.
    pub lease_ms: Option<u64>,
    /// Now, unix milliseconds.
    pub now: i64,
    /// Its quota on unique bytes.
    pub quota_bytes: Option<u64>,
}

/// Clone `from` as `name` (with its lease and quota, in the same commit), then run its
/// `configure-clone` hook while only the hook can reach it; a failing hook removes the clone
/// again. Refused while the pool is below its low-space threshold.
pub fn clone(st: &Store, ev: &Events, from: &str, name: &str, ask: CloneAsk) -> Result<SnapshotId> {
    let implicit = catalog::Reference::parse(from)?.snapshot.is_none();
    st.check_pool("clones")?;
    let gate = gate(st, name)?;
    let (_, made_from) = st.op(|cat| {
        let l = cat.lease_for_clone(from, name, ask.lease_ms, ask.now)?;
        cat.clone_volume_leased(from, name, l, ask.quota_bytes)
    })?;
    let facts = Facts {
        volume: name.to_string(),
        snapshot: Some(made_from.to_string()),
        origin: Some(made_from.to_string()),
        export: Some(gate.export.clone()),
        ..Facts::default()
    };
    if let Err(e) = ev.fire(st, "configure-clone", &facts) {
        // The clone goes, and with it a snapshot taken only to clone from (unless something
        // else uses it by now).
        undo(st, &[name], |cat| {
            cat.restore(&[], &[name.to_string()])?;
            if implicit && cat.dependents(&made_from).is_empty() {
                cat.delete(&made_from.to_string())?;
            }
            Ok(())
        });
        return Err(e.into());
    }
    Ok(made_from)
}

/// Which head switch [`move_head`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// `forkd rewind`.
    Rewind,
    /// `forkd refresh`.
    Refresh,
}

impl Move {
    /// `rewind` or `refresh`, as in the hook events' names.
    pub fn name(self) -> &'static str {
        match self {
            Move::Rewind => "rewind",
            Move::Refresh => "refresh",
        }
    }
}

/// Rewind or refresh clone `name` (`step` does the catalog part and returns the target and the
/// snapshot that kept the state it left), between its hooks.
pub fn move_head(
    st: &Store,
    ev: &Events,
    name: &str,
    kind: Move,
    to: Option<&str>,
    step: impl FnOnce(&mut Catalog, &str) -> std::result::Result<(SnapshotId, SnapshotId), CatalogError>,
) -> Result<(SnapshotId, SnapshotId)> {
    let before = st.catalog().volume(name)?.clone();
    let mut facts = Facts {
        volume: name.to_string(),
        snapshot: to.map(str::to_string),
        origin: before.origin.as_ref().map(ToString::to_string),
        ..Facts::default()
    };
    ev.fire(st, &format!("pre-{}", kind.name()), &facts)?;
    let gate = gate(st, name)?;
    let (target, kept) = {
        let _fence = st.exports.fence_and_drain(name, Scope::Head, DRAIN);
        st.op(|cat| step(cat, name))?
    };
    facts.snapshot = Some(target.to_string());
    facts.origin = st.catalog().volume(name).ok().and_then(|v| v.origin.as_ref().map(ToString::to_string));
    let configure = Facts { export: Some(gate.export.clone()), ..facts.clone() };
    if let Err(e) = ev.fire(st, "configure-clone", &configure) {
        undo(st, &[name], |cat| cat.restore(std::slice::from_ref(&before), &[]));
        return Err(e.into());
    }
    drop(gate);
    post(ev, st, &format!("post-{}", kind.name()), &facts);
    Ok((target, kept))
}

/// Delete a volume or snapshot after its `pre-delete` hook. Returns the bytes it gives back:
/// its unique bytes just before the delete, which garbage collection frees after the answer
/// (`store::gc`).
pub fn delete(st: &Store, ev: &Events, reference: &str) -> Result<u64> {
    let r = catalog::Reference::parse(reference)?;
    st.catalog().check_delete(reference)?;
    let facts = Facts {
        volume: r.volume.clone(),
        snapshot: r.snapshot.is_some().then(|| reference.to_string()),
        ..Facts::default()
    };
    ev.fire(st, "pre-delete", &facts)?;
    let _fence = st.exports.fence_and_drain(reference, Scope::Volume, DRAIN);
    let freed = st.catalog().unique_bytes_of_reference(reference)?;
    st.op_freeing(|cat| cat.delete(reference))?;
    Ok(freed)
}

/// Open `volume` to its hooks alone for the length of an operation; refused while another
/// operation holds it.
pub fn gate<'a>(st: &'a Store, volume: &str) -> Result<crate::store::exports::HookGate<'a>> {
    st.exports.open_for_hook(volume).ok_or_else(|| {
        ApiError(
            axum::http::StatusCode::CONFLICT,
            format!("another operation on `{volume}` is running its hooks: try again when it has finished"),
        )
    })
}

/// Put things back after a failed hook: close what the hook left connected to `volumes`,
/// then `restore`. A failure here is logged: the hook's error is what the caller reports.
pub fn undo<S: AsRef<str>>(
    st: &Store,
    volumes: &[S],
    restore: impl FnOnce(&mut Catalog) -> std::result::Result<(), CatalogError>,
) {
    let _fences: Vec<_> =
        volumes.iter().map(|v| st.exports.fence_and_drain(v.as_ref(), Scope::Volume, DRAIN)).collect();
    if let Err(e) = st.op_freeing(restore) {
        let volumes: Vec<&str> = volumes.iter().map(AsRef::as_ref).collect();
        tracing::error!(?volumes, error = %e, "could not undo after a failed hook");
    }
}
