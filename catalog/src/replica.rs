//! Replicas: read-only copies of another site's volumes, received one snapshot at a time.
//!
//! Every snapshot has an identity that holds on every site, its `guid`: a snapshot that
//! arrived by replication keeps the one it had on the site it came from; any other's is
//! derived from this site's id (`cG`, made once per data directory), its volume and number.
//! Sites compare guids to find what a target lacks and the newest snapshot both hold.
//!
//! A snapshot arrives like an ingest: [`Catalog::begin_incoming`] opens a staging tree that
//! starts as a snapshot the target already holds (the base: the volume's latest, or for a
//! clone's first snapshot its origin), the blocks that differ are written into it (with
//! [`Catalog::incoming_progress`] committed after each frame, so a resumed transfer starts at
//! the first block not yet received), and [`Catalog::finish_incoming`] compares the digest of
//! what arrived (its base's, kept with each arrived snapshot, plus what changed) with the sender's and makes it a snapshot with the sender's number, time,
//! bookmarks and guid; the head follows it. A volume whose latest snapshot is the base of an
//! incoming one follows the sender whether it is a replica or not (so a returning old source
//! takes back what was written at the promoted site), unless it has writes or snapshots the
//! sender lacks: it is refused then, with the reason. [`Catalog::promote`] makes a replica
//! writable.

use serde::{Deserialize, Serialize};

use crate::{Catalog, CatalogError, Kind, MaskRecord, NodeId, Result, Snapshot, SnapshotId, Staging, Volume};

/// Key of this site's id.
const K_SITE: &[u8] = b"cG";

/// Which site and volume a replica follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaOf {
    /// The sending site's id.
    pub site: String,
    /// The volume's name there.
    pub volume: String,
}

/// A snapshot as it travels: what the target records about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Identity on every site.
    pub guid: String,
    /// Its number (kept on the target).
    pub id: u64,
    /// Creation time, unix milliseconds.
    pub created_at: i64,
    /// Timeflow it was taken in.
    pub timeflow: u32,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Its bookmarks.
    pub bookmarks: Vec<String>,
    /// Why it was taken.
    pub reason: String,
    /// Set on a masked snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked: Option<MaskRecord>,
}

impl SnapshotMeta {
    /// Snapshot `s`, whose guid is `guid`, as it travels.
    pub fn of(guid: String, s: &Snapshot) -> SnapshotMeta {
        SnapshotMeta {
            guid,
            id: s.id,
            created_at: s.created_at,
            timeflow: s.timeflow,
            size_bytes: s.size_bytes,
            bookmarks: s.bookmarks.clone(),
            reason: s.reason.clone(),
            masked: s.masked.clone(),
        }
    }
}

/// A replicated volume as its sender describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// The sending site.
    pub site: String,
    /// Source or clone, as on the sender.
    pub kind: Kind,
    /// The volume's creation time on the sender.
    pub created_at: i64,
    /// Guid of the snapshot the volume is a clone of, when the target holds it.
    pub origin: Option<String>,
    /// The sender's `masked_from` of the volume.
    #[serde(default)]
    pub masked_from: Option<String>,
    /// The sender's `clone_from = "masked"` policy of the volume.
    #[serde(default)]
    pub clone_from_masked: bool,
}

/// What a sender declares before the blocks of one snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IncomingHeader {
    /// The volume.
    #[serde(flatten)]
    pub volume: VolumeMeta,
    /// Guid of the snapshot the blocks are a difference from (`None`: from nothing).
    pub base: Option<String>,
    /// The snapshot.
    pub snapshot: SnapshotMeta,
    /// [`blockmap::BlockMap::content_digest`] of the snapshot on the sender, hex.
    pub digest: String,
}

/// A snapshot being received, kept with the staging tree it is written into.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Incoming {
    /// What the sender declared.
    pub header: IncomingHeader,
    /// Every block below this one has arrived.
    pub next_block: u64,
}

/// What a target holds of one volume name, for a sender to plan against.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// A volume of that name exists.
    pub exists: bool,
    /// It follows this site and volume.
    pub replica_of: Option<ReplicaOf>,
    /// Guids of its snapshots, oldest first.
    pub snapshots: Vec<String>,
    /// The snapshot being received and the first block not yet received.
    pub receiving: Option<(String, u64)>,
}

/// A digest as it travels.
pub fn digest_hex(d: u128) -> String {
    format!("{d:032x}")
}

/// A new site id: 128 bits from the clock, the process and the standard library's random
/// hasher keys (no randomness crate needed for an identity that only has to be unique).
fn new_site_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    let a = h.finish();
    let b = std::collections::hash_map::RandomState::new().hash_one(a);
    format!("{a:016x}{b:016x}")
}

/// This data directory's site id and whether it is stored: a new one is made in memory and
/// stored only with the first commit that lets a guid leave the site ([`Catalog::keep_site`]),
/// so a store that never replicates writes nothing for it.
pub(crate) fn load_site(map: &blockmap::BlockMap) -> Result<(String, bool)> {
    match map.get_meta(K_SITE)? {
        Some(v) => Ok((String::from_utf8(v).map_err(|_| CatalogError::Corrupt("the site id".into()))?, true)),
        None => Ok((new_site_id(), false)),
    }
}

fn refused(why: String) -> CatalogError {
    CatalogError::Replication(why)
}

impl Catalog {
    /// This site's id.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// Whether this site's id is stored.
    pub fn site_is_kept(&self) -> bool {
        self.site_kept
    }

    /// Store this site's id if it is not yet (durable with the next flush): before guids
    /// derived from it go to another site.
    pub fn keep_site(&mut self) -> Result<()> {
        if self.site_kept {
            return Ok(());
        }
        self.stage_site();
        if let Err(e) = self.map.commit() {
            self.map.rollback();
            return Err(e.into());
        }
        self.site_kept = true;
        Ok(())
    }

    /// Stage this site's id in the open transaction if it is not stored yet.
    fn stage_site(&mut self) {
        if !self.site_kept {
            self.map.put_meta(K_SITE, self.site.clone().into_bytes());
        }
    }

    /// The guid of snapshot `s` of `v`.
    pub fn guid(&self, v: &Volume, s: &Snapshot) -> String {
        s.guid.clone().unwrap_or_else(|| format!("{}/{}/{}/{}", self.site, v.name, v.created_at, s.id))
    }

    /// The snapshot with guid `guid`, if this site holds it.
    pub fn find_guid(&self, guid: &str) -> Option<(&Volume, &Snapshot)> {
        self.volumes.values().find_map(|v| v.snapshots.iter().find(|s| self.guid(v, s) == guid).map(|s| (v, s)))
    }

    /// What this site holds of volume `name` (see [`ReplicaState`]).
    pub fn replica_state(&self, name: &str) -> ReplicaState {
        let Some(v) = self.volumes.get(name) else { return ReplicaState::default() };
        let receiving = v
            .staging
            .as_ref()
            .and_then(|s| s.incoming.as_ref())
            .map(|i| (i.header.snapshot.guid.clone(), i.next_block));
        ReplicaState {
            exists: true,
            replica_of: v.replica_of.clone(),
            snapshots: v.snapshots.iter().map(|s| self.guid(v, s)).collect(),
            receiving,
        }
    }

    /// Refuse a change to a replica's contents.
    pub(crate) fn not_replica(v: &Volume) -> Result<()> {
        match v.replica_of {
            Some(_) => Err(CatalogError::Replica(v.name.clone())),
            None => Ok(()),
        }
    }

    /// Start (or resume) receiving a snapshot into volume `name`; returns the first block still
    /// to send. See the module note for what is accepted.
    pub fn begin_incoming(&mut self, name: &str, h: &IncomingHeader) -> Result<u64> {
        if let Some(v) = self.volumes.get(name) {
            if let Some(i) = v.staging.as_ref().and_then(|s| s.incoming.as_ref()) {
                if i.header == *h {
                    return Ok(i.next_block);
                }
            }
        }
        crate::check_size(h.snapshot.size_bytes)?;
        if h.snapshot.id == 0 {
            return Err(refused("snapshot numbers start at 1".into()));
        }
        if self.find_guid(&h.snapshot.guid).is_some() {
            return Err(refused(format!("this site already holds snapshot {}", h.snapshot.guid)));
        }
        let base = match &h.base {
            Some(g) => Some(self.find_guid(g).map(|(v, s)| (v.name.clone(), s.clone())).ok_or_else(|| {
                refused(format!("the base snapshot {g} of `{name}` is not on this site: replicate it first"))
            })?),
            None => None,
        };
        let fresh = !self.volumes.contains_key(name);
        let mut v = match self.volumes.get(name) {
            Some(v) => self.follow_existing(v, h, base.as_ref())?,
            None => self.new_replica(name, &h.volume, h.snapshot.size_bytes)?,
        };
        let (root, allocated) = base.as_ref().map_or((0, 0), |(_, s)| (s.root, s.allocated_blocks));
        let out = self.commit_with(|cat| {
            cat.stage_site();
            if fresh {
                cat.map.share(v.root)?;
            }
            if let Some(old) = v.staging.take() {
                cat.drop_root(old.root)?;
            }
            cat.map.share(root)?;
            v.size_bytes = h.snapshot.size_bytes;
            v.replica_of = Some(ReplicaOf { site: h.volume.site.clone(), volume: name.to_string() });
            let incoming = Some(Incoming { header: h.clone(), next_block: 0 });
            v.staging = Some(Staging { root, allocated_blocks: allocated, incoming });
            Ok((vec![v], vec![], 0))
        })?;
        self.site_kept = true;
        Ok(out)
    }

    /// Check that existing volume `v` may take the incoming snapshot `h` (based on `base`):
    /// its latest snapshot is the base (or, with none, the base is its origin or nothing), and
    /// its head has no writes since. Returns a copy to change.
    fn follow_existing(&self, v: &Volume, h: &IncomingHeader, base: Option<&(String, Snapshot)>) -> Result<Volume> {
        let name = &v.name;
        if v.staging.as_ref().is_some_and(|s| s.incoming.is_none()) {
            return Err(CatalogError::IngestRunning(name.clone()));
        }
        let base_guid = base.map(|(bv, s)| self.guid(self.volumes.get(bv).unwrap_or(v), s));
        match v.snapshots.last() {
            Some(last) => {
                let latest = self.guid(v, last);
                if base_guid.as_deref() != Some(latest.as_str()) {
                    let ours = format!("{name}@{}", last.id);
                    return Err(refused(format!(
                        "`{name}` on this site has {ours}, which the sender does not have as its latest common \
                         snapshot: delete the snapshots the sender lacks (or the volume) to follow it"
                    )));
                }
                if v.replica_of.is_none() && last.root != v.root {
                    return Err(refused(format!(
                        "`{name}` on this site has writes since {name}@{}: snapshot it and replicate the other \
                         way, or rewind it, before it can follow the sender",
                        last.id
                    )));
                }
            }
            None => {
                let origin = v.origin.as_ref().and_then(|o| self.snapshot_guid(o));
                if base_guid.is_some() && base_guid != origin {
                    return Err(refused(format!("`{name}` on this site does not derive from the sender's base")));
                }
                let origin_root = v.origin.as_ref().and_then(|o| self.snapshot_root_of(o)).unwrap_or(0);
                if v.replica_of.is_none() && v.root != origin_root {
                    return Err(refused(format!(
                        "`{name}` on this site has writes of its own: delete it, or choose another name, for it to                          follow the sender"
                    )));
                }
            }
        }
        if h.snapshot.id <= v.snapshots.last().map_or(0, |s| s.id) {
            return Err(refused(format!("`{name}` on this site already has a snapshot numbered {}", h.snapshot.id)));
        }
        Ok(v.clone())
    }

    /// A new replica volume described by `m`, `size_bytes` long: a clone of its origin when
    /// this site holds it, else a volume of its own.
    fn new_replica(&self, name: &str, m: &VolumeMeta, size_bytes: u64) -> Result<Volume> {
        self.new_name(name)?;
        let origin = m.origin.as_deref().and_then(|g| self.find_guid(g));
        let mut v = Volume::new(name, m.kind, size_bytes, 0, m.created_at);
        if let Some((ov, os)) = origin {
            v.origin = Some(SnapshotId { volume: ov.name.clone(), id: os.id });
            v.root = os.root;
            v.allocated_blocks = os.allocated_blocks;
            v.size_bytes = os.size_bytes;
        }
        v.masked_from = m.masked_from.clone();
        v.clone_from_masked = m.clone_from_masked;
        v.replica_of = Some(ReplicaOf { site: m.site.clone(), volume: name.to_string() });
        Ok(v)
    }

    /// Make replica `name` exist, as described by `m`, without a snapshot yet (a clone the
    /// sender has not snapshotted: its head is its origin's). Nothing changes when a volume of
    /// that name exists. Returns whether it was created.
    pub fn ensure_replica(&mut self, name: &str, m: &VolumeMeta, size_bytes: u64) -> Result<bool> {
        if self.volumes.contains_key(name) {
            return Ok(false);
        }
        crate::check_size(size_bytes)?;
        let v = self.new_replica(name, m, size_bytes)?;
        self.commit_with(|cat| {
            cat.stage_site();
            cat.map.share(v.root)?;
            Ok((vec![v], vec![], true))
        })?;
        self.site_kept = true;
        Ok(true)
    }

    fn snapshot_root_of(&self, id: &SnapshotId) -> Option<NodeId> {
        let v = self.volumes.get(&id.volume)?;
        v.snapshots.iter().find(|s| s.id == id.id).map(|s| s.root)
    }

    /// The guid of snapshot `id`, if this site holds it.
    pub fn snapshot_guid(&self, id: &SnapshotId) -> Option<String> {
        let v = self.volumes.get(&id.volume)?;
        v.snapshots.iter().find(|s| s.id == id.id).map(|s| self.guid(v, s))
    }

    /// Record that every block below `next_block` of the snapshot being received into `name`
    /// has been written (after those writes were committed, so a flush never makes the mark
    /// durable without them).
    pub fn incoming_progress(&mut self, name: &str, next_block: u64) -> Result<()> {
        let v = self.volume(name)?;
        let mut staging = v.staging.clone().ok_or_else(|| CatalogError::NoIngest(name.to_string()))?;
        let incoming = staging.incoming.as_mut().ok_or_else(|| CatalogError::NoIngest(name.to_string()))?;
        incoming.next_block = next_block;
        self.put_staging(name, &staging)?;
        if let Err(e) = self.map.commit() {
            self.map.rollback();
            return Err(e.into());
        }
        if let Some(v) = self.volumes.get_mut(name) {
            v.staging = Some(staging);
        }
        Ok(())
    }

    /// Finish receiving into `name`: the staging tree must hold what the sender declared (its
    /// digest), then it becomes the head and a snapshot with the sender's number, time and
    /// guid. On a digest mismatch the staging tree is dropped (the next run sends it again).
    pub fn finish_incoming(&mut self, name: &str) -> Result<SnapshotId> {
        let mut v = self.shallow(name)?;
        let staging = v.staging.take().ok_or_else(|| CatalogError::NoIngest(v.name.clone()))?;
        let incoming = staging.incoming.clone().ok_or_else(|| CatalogError::NoIngest(v.name.clone()))?;
        let digest = digest_hex(self.incoming_digest(&incoming.header, staging.root)?);
        if digest != incoming.header.digest {
            let dropped = v.clone();
            self.commit_appending(dropped, |cat, _| cat.drop_root(staging.root))?;
            return Err(refused(format!(
                "snapshot {} arrived with digest {digest}, the sender has {}: it was dropped; run again",
                incoming.header.snapshot.guid, incoming.header.digest
            )));
        }
        let m = incoming.header.snapshot;
        self.commit_appending(v, |cat, v| {
            cat.drop_root(v.root)?;
            cat.map.share(staging.root)?;
            v.root = staging.root;
            v.allocated_blocks = staging.allocated_blocks;
            v.size_bytes = m.size_bytes;
            v.timeflow = m.timeflow;
            v.next_snapshot = v.next_snapshot.max(m.id + 1);
            v.snapshots.push(Snapshot {
                id: m.id,
                root: staging.root,
                created_at: m.created_at,
                timeflow: m.timeflow,
                size_bytes: m.size_bytes,
                allocated_blocks: staging.allocated_blocks,
                bookmarks: m.bookmarks,
                reason: m.reason,
                ingest: None,
                masked: m.masked,
                guid: Some(m.guid),
                digest: Some(digest),
            });
            Ok(SnapshotId { volume: v.name.clone(), id: m.id })
        })
    }

    /// The digest of the staging tree at `root` of an incoming snapshot: its base's, kept, plus
    /// what changed since (read where the trees differ only), else the whole tree's.
    fn incoming_digest(&self, h: &IncomingHeader, root: NodeId) -> Result<u128> {
        let base = h.base.as_deref().and_then(|g| self.find_guid(g));
        let known = base.and_then(|(_, s)| s.digest_value().map(|d| (s.root, d)));
        Ok(match known {
            Some((base_root, d)) => d.wrapping_add(self.map.digest_change(base_root, root)?),
            None => self.map.content_digest(root)?,
        })
    }

    /// Make replica `name` writable on this site (a failover): it stops following its sender,
    /// and a snapshot half received is dropped.
    pub fn promote(&mut self, name: &str) -> Result<ReplicaOf> {
        let mut v = self.volume(name)?.clone();
        let of = v.replica_of.take().ok_or_else(|| refused(format!("`{name}` is not a replica")))?;
        let staging = v.staging.take_if(|s| s.incoming.is_some());
        self.commit_with(|cat| {
            if let Some(s) = staging {
                cat.drop_root(s.root)?;
            }
            Ok((vec![v], vec![], of))
        })
    }
}

/// Key prefix of continuous replications, by volume.
const K_REPLICATION: &[u8] = b"cP";

/// A continuous replication the source daemon keeps running (and starts again after a
/// restart).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    /// The target's API URL.
    pub to: String,
    /// The target's API token (the data directory is readable by its owner only).
    pub token: Option<String>,
    /// A run every this many milliseconds.
    pub interval_ms: u64,
    /// A run fails when the link makes no progress for this long.
    pub stall_ms: u64,
}

impl Catalog {
    /// Snapshot `volume` for replication (reason `replicate`): continuous mode's snapshot of
    /// a head written since the last one.
    pub fn snapshot_for_replication(&mut self, volume: &str) -> Result<SnapshotId> {
        let v = self.volume(volume)?;
        Self::not_masked(v, "snapshotted")?;
        Self::not_replica(v)?;
        let v = self.shallow(volume)?;
        self.commit_appending(v, |cat, v| cat.take_snapshot(v, "replicate", None))
    }

    /// The continuous replications, by volume, as the engine holds them: for start-up only
    /// (see `BlockMap::scan_meta`).
    pub fn replications(&self) -> Result<Vec<(String, Replication)>> {
        let mut out = Vec::new();
        for (k, v) in self.map.scan_meta(K_REPLICATION)? {
            let name = String::from_utf8_lossy(&k[K_REPLICATION.len()..]).into_owned();
            let r = serde_json::from_slice(&v).map_err(|_| CatalogError::Corrupt(format!("replication of {name}")))?;
            out.push((name, r));
        }
        Ok(out)
    }

    /// Keep (or, with `None`, forget) `volume`'s continuous replication.
    pub fn set_replication(&mut self, volume: &str, r: Option<&Replication>) -> Result<()> {
        let key = [K_REPLICATION, volume.as_bytes()].concat();
        match r {
            Some(r) => {
                self.volume(volume)?;
                let json = serde_json::to_vec(r).map_err(|_| CatalogError::Corrupt(volume.to_string()))?;
                self.map.put_meta(&key, json);
            }
            None => self.map.remove_meta(&key),
        }
        if let Err(e) = self.map.commit() {
            self.map.rollback();
            return Err(e.into());
        }
        Ok(())
    }
}
