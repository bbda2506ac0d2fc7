//! What a replication run sends, decided from the source's catalog and what the target says
//! it holds: the volumes in lineage order (the named one, then its clones, then theirs), and
//! for each the snapshots newer than the newest one the target already has, each with its
//! base (the snapshot before it, or for a clone's first snapshot its origin, when the target
//! holds it) and the header the target records. Only snapshots whose data may flow downstream
//! are ever considered (`Catalog::downstream`: a `clone_from = "masked"` source sends only
//! masked snapshots).

use std::collections::{HashSet, VecDeque};

use catalog::{Catalog, CatalogError, IncomingHeader, SnapshotId, SnapshotMeta, Volume, VolumeMeta};

/// `volume` and every clone descending from it, origins before their clones.
pub(super) fn lineage_order(cat: &Catalog, volume: &str) -> Result<Vec<String>, CatalogError> {
    cat.volume(volume)?;
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    let mut todo = VecDeque::from([volume.to_string()]);
    while let Some(name) = todo.pop_front() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let clones = cat.volumes().values().filter(|c| c.origin.as_ref().is_some_and(|o| o.volume == name));
        todo.extend(clones.map(|c| c.name.clone()));
        order.push(name);
    }
    Ok(order)
}

/// Whether snapshot `id` of `v` may leave this site.
fn sendable(cat: &Catalog, v: &Volume, id: u64) -> bool {
    cat.downstream(&format!("{}@{id}", v.name)).is_ok()
}

/// One snapshot to send.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    /// The snapshot.
    pub snap: SnapshotId,
    /// What its blocks are the difference from.
    pub base: Option<SnapshotId>,
    /// What the target records (its digest filled in just before it is sent).
    pub header: IncomingHeader,
}

/// `name` as the target records it, given the guids the target holds (its origin counts only
/// when the target holds it).
pub(super) fn volume_meta(cat: &Catalog, name: &str, on_target: &HashSet<String>) -> Result<VolumeMeta, CatalogError> {
    let v = cat.volume(name)?;
    let origin = v.origin.as_ref().and_then(|o| cat.snapshot_guid(o)).filter(|g| on_target.contains(g));
    Ok(VolumeMeta {
        site: cat.site().to_string(),
        kind: v.kind,
        created_at: v.created_at,
        origin,
        masked_from: v.masked_from.clone(),
        clone_from_masked: v.clone_from_masked,
    })
}

/// The snapshots of `name` to send, oldest first, given the guids the target holds
/// (`on_target`, which this extends with them as if they were sent).
pub(super) fn volume_plan(
    cat: &Catalog,
    name: &str,
    on_target: &mut HashSet<String>,
) -> Result<Vec<Outgoing>, CatalogError> {
    let meta = volume_meta(cat, name, on_target)?;
    let v = cat.volume(name)?;
    let origin = v.origin.clone().filter(|_| meta.origin.is_some());
    let snaps: Vec<_> = v.snapshots.iter().filter(|s| sendable(cat, v, s.id)).collect();
    // Start after the newest snapshot the target holds: older gaps stay gaps.
    let held = snaps.iter().rposition(|s| on_target.contains(&cat.guid(v, s)));
    let mut base = match held {
        Some(i) => Some(SnapshotId { volume: v.name.clone(), id: snaps[i].id }),
        None => origin,
    };
    let mut out = Vec::new();
    for s in &snaps[held.map_or(0, |i| i + 1)..] {
        let guid = cat.guid(v, s);
        let header = IncomingHeader {
            volume: meta.clone(),
            base: base.as_ref().and_then(|b| cat.snapshot_guid(b)),
            snapshot: SnapshotMeta::of(guid.clone(), s),
            digest: String::new(),
        };
        let snap = SnapshotId { volume: v.name.clone(), id: s.id };
        out.push(Outgoing { snap: snap.clone(), base: base.replace(snap), header });
        on_target.insert(guid);
    }
    Ok(out)
}

/// `todo` (each volume's snapshots in order, origins' volumes first) in the order they were
/// taken, each after its base and its volume's origin: a clone's snapshots interleave with its
/// origin's newer ones as they happened.
pub(super) fn oldest_first(todo: Vec<Outgoing>) -> Vec<Outgoing> {
    let planned: HashSet<String> = todo.iter().map(|o| o.header.snapshot.guid.clone()).collect();
    let mut pending = todo;
    pending.sort_by_key(|o| o.header.snapshot.created_at);
    let mut sent: HashSet<String> = HashSet::new();
    let mut out = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let ready = |o: &Outgoing| {
            [&o.header.base, &o.header.volume.origin]
                .into_iter()
                .flatten()
                .all(|g| !planned.contains(g) || sent.contains(g))
        };
        // The oldest whose dependencies went first; there always is one (a base is older than
        // what it is the base of), but never loop on a surprise: take the oldest then.
        let i = pending.iter().position(ready).unwrap_or(0);
        let o = pending.remove(i);
        sent.insert(o.header.snapshot.guid.clone());
        out.push(o);
    }
    out
}
