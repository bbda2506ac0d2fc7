//! forkd's catalog: sources, clones, snapshots, timeflows, origins and bookmarks, kept in the
//! same metadata engine as the extent map so every operation commits as one atomic batch.
//!
//! Each volume owns one reference on its head root and one on each snapshot's root (see the
//! `blockmap` crate); a running ingest owns one on its staging root. Operations build new
//! records on copies, commit map changes and records together, and only then replace the
//! in-memory copies, so a failed operation changes nothing. Durability (fsync of data, flush
//! of the store) is the caller's job once an operation returns: see docs/durability.md.
//!
//! Locking: `Catalog` is not synchronised; the daemon keeps it behind one `RwLock`.

#![forbid(unsafe_code)]

mod detach;
mod env_lease;
mod environment;
mod hooks;
mod lease;
mod masking;
mod oplog;
mod quota;
mod records;
mod reference;
mod replica;
mod retention;
mod schedule;
mod undo;
mod unique;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub use blockmap::{self, BlockMap, BlockMapError, Entry, GcStep, KvError, MetaKv, NodeId, BLOCK_SIZE};
pub use environment::{EnvPoint, EnvSnapshot, Environment, MemberMove};
pub use hooks::{check_event, HookSetting, HOOK_EVENTS};
pub use lease::{format_span, Expiry, Lease, LeaseChange, LeasePolicy};
pub use masking::MaskRecord;
pub use oplog::{parse_span, LogEntry, LogQuery, LogRetention};
pub use quota::QuotaUse;
pub use reference::{check_size, format_size, format_time, parse_size, parse_time, validate_name, Reference, SnapSel};
pub use replica::{
    digest_hex, Incoming, IncomingHeader, ReplicaOf, ReplicaState, Replication, SnapshotMeta, VolumeMeta,
};
pub use retention::{plan as retention_plan, Pruned, Retention};
pub use schedule::{CatchUp, Schedule, ScheduleRun, Step};
use serde::{Deserialize, Serialize};
pub use unique::Kept;

/// Errors of catalog operations. Each is one line a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The extent map failed.
    #[error(transparent)]
    Map(#[from] BlockMapError),
    /// No volume has this name.
    #[error("no volume named `{0}`")]
    UnknownVolume(String),
    /// The volume exists but the snapshot does not.
    #[error("no snapshot `{0}`")]
    UnknownSnapshot(String),
    /// A reference that does not parse.
    #[error("`{reference}` is not a valid reference: {why}")]
    BadReference {
        /// The text given.
        reference: String,
        /// What is wrong with it.
        why: String,
    },
    /// A name that is not allowed.
    #[error("`{name}` is not a valid name: {why}")]
    InvalidName {
        /// The text given.
        name: String,
        /// What is allowed.
        why: String,
    },
    /// A size that is not allowed.
    #[error("size `{size}` is not valid: {why}")]
    InvalidSize {
        /// The text given.
        size: String,
        /// What is allowed.
        why: String,
    },
    /// The name is already used by a volume.
    #[error("a volume named `{0}` already exists")]
    NameTaken(String),
    /// A bookmark name is already used on this volume.
    #[error("bookmark `{bookmark}` already names {on}")]
    BookmarkTaken {
        /// The bookmark.
        bookmark: String,
        /// The snapshot it names.
        on: String,
    },
    /// Clones depend on what was to be deleted.
    #[error("cannot delete {what}: clones depend on it: {}", dependents.join(", "))]
    HasDependents {
        /// The snapshot or volume.
        what: String,
        /// The dependent clones.
        dependents: Vec<String>,
    },
    /// The operation needs a clone.
    #[error("`{0}` is a source; only clones can be {1}")]
    NotAClone(String, &'static str),
    /// The operation needs a source.
    #[error("`{0}` is a clone; only sources are fed by ingest")]
    NotASource(String),
    /// Snapshots are read-only.
    #[error("`{0}` is read-only")]
    ReadOnly(String),
    /// A rewind or refresh target outside the clone's lineage.
    #[error("cannot move `{clone}` to {target}: it is neither one of its own snapshots nor a snapshot of its origin")]
    NotInLineage {
        /// The clone.
        clone: String,
        /// The target snapshot.
        target: String,
    },
    /// A time before any snapshot that could answer it.
    #[error("no snapshot of `{volume}` at or before {time}")]
    BeforeFirstSnapshot {
        /// The volume searched.
        volume: String,
        /// The time asked for.
        time: String,
    },
    /// An ingest already runs on this source.
    #[error("an ingest into `{0}` is already running")]
    IngestRunning(String),
    /// No ingest runs on this source.
    #[error("no ingest is running into `{0}`")]
    NoIngest(String),
    /// A range beyond the end of the volume.
    #[error("range {offset}+{length} is beyond the end of `{volume}` ({size} bytes)")]
    OutOfRange {
        /// The volume.
        volume: String,
        /// Start of the range in bytes.
        offset: u64,
        /// Length in bytes.
        length: u64,
        /// The volume's size in bytes.
        size: u64,
    },
    /// A stored record that cannot be parsed.
    #[error("corrupt catalog record `{0}`")]
    Corrupt(String),
    /// No environment has this name.
    #[error("no environment named `{0}`")]
    UnknownEnvironment(String),
    /// No schedule has this name.
    #[error("no schedule named `{0}`")]
    UnknownSchedule(String),
    /// The name is already used by a schedule.
    #[error("a schedule named `{0}` already exists")]
    ScheduleTaken(String),
    /// A schedule's cron expression, step or setting is not valid.
    #[error("{0}")]
    BadSchedule(String),
    /// The name is already used by an environment.
    #[error("an environment named `{0}` already exists")]
    EnvironmentTaken(String),
    /// The volume already belongs to an environment.
    #[error("`{volume}` is a member of environment `{environment}`{hint}")]
    InEnvironment {
        /// The volume.
        volume: String,
        /// Its environment.
        environment: String,
        /// What to do about it, if anything.
        hint: &'static str,
    },
    /// An environment member has no snapshot that answers the request.
    #[error("member `{member}` of `{environment}` (volume `{volume}`) has no snapshot {when}")]
    MemberWithoutSnapshot {
        /// The environment.
        environment: String,
        /// The member.
        member: String,
        /// Its volume.
        volume: String,
        /// `yet`, or `at or before TIME`.
        when: String,
    },
    /// An environment request that is not well formed.
    #[error("{0}")]
    BadEnvironment(String),
    /// Not one of the hook events.
    #[error("`{0}` is not a hook event; the events are {}", hooks::HOOK_EVENTS.join(", "))]
    UnknownEvent(String),
    /// No hook of this event is set.
    #[error("`{owner}` has no `{event}` hook")]
    NoHook {
        /// The volume or environment.
        owner: String,
        /// The event.
        event: String,
    },
    /// The head of a masked volume: only its mask hook reaches it.
    #[error("`{0}` is a masked volume: only its mask hook can reach its head; clone one of its masked snapshots (`{0}@latest`)")]
    MaskedVolume(String),
    /// Unmasked data of a source whose policy is `clone_from = "masked"`.
    #[error("`{what}` holds unmasked data of `{policy_source}`, whose policy is clone_from=masked: {}", masked_hint(.policy_source, .masked))]
    MaskedOnly {
        /// The volume or snapshot refused.
        what: String,
        /// The source with the policy.
        policy_source: String,
        /// Its masked volumes.
        masked: Vec<String>,
    },
    /// An operation a masked volume does not take.
    #[error("`{volume}` is a masked volume and cannot be {what}; use `forkd mask`")]
    MaskedVolumeOp {
        /// The masked volume.
        volume: String,
        /// What was refused.
        what: &'static str,
    },
    /// `forkd mask --into` names a volume that is not a masked volume of that source.
    #[error("`{volume}` exists and is not a masked volume of `{of}`: choose another name for --into")]
    NotMaskedVolume {
        /// The volume named.
        volume: String,
        /// The source being masked.
        of: String,
    },
    /// A clone cut loose from its origin (`forkd detach`).
    #[error("`{clone}` was detached from {from}: {why}")]
    Detached {
        /// The clone.
        clone: String,
        /// The snapshot it came from.
        from: String,
        /// What it therefore cannot do.
        why: &'static str,
    },
    /// A lease that would end at or before now.
    #[error("the lease of `{clone}` cannot end at {at}: that is not in the future")]
    LeaseInPast {
        /// The clone.
        clone: String,
        /// The time asked for.
        at: String,
    },
    /// A lease longer than the source's `max_lease`.
    #[error("a lease of {asked} for `{clone}` is longer than max_lease={max} of `{policy_source}`")]
    LeaseTooLong {
        /// The clone.
        clone: String,
        /// The lease asked for, from now.
        asked: String,
        /// The source with the policy.
        policy_source: String,
        /// Its maximum.
        max: String,
    },
    /// A write would take a clone past its quota on unique bytes.
    #[error(
        "`{volume}` is at its quota: it holds {} alone, its quota is {}, and this write needs {} more; \
         trim, delete its snapshots or raise the quota (`forkd quota`)",
        format_size(*used), format_size(*limit), format_size(*needed)
    )]
    QuotaExceeded {
        /// The clone.
        volume: String,
        /// Its unique bytes.
        used: u64,
        /// Its quota.
        limit: u64,
        /// The unique bytes the write would add.
        needed: u64,
    },
    /// Removing the lease of a clone whose source has a `max_lease`.
    #[error("`{clone}` must keep a lease: `{policy_source}` has max_lease={max}; extend or shorten it instead")]
    LeaseRequired {
        /// The clone.
        clone: String,
        /// The source with the policy.
        policy_source: String,
        /// Its maximum.
        max: String,
    },
    /// A lease policy that contradicts itself.
    #[error("lease policy: {0}")]
    BadLeasePolicy(String),
    /// A replica's contents change only by replication.
    #[error("`{0}` is a replica: read-only until `forkd promote {0}` on this site")]
    Replica(String),
    /// An incoming replicated snapshot this site cannot take.
    #[error("replication refused: {0}")]
    Replication(String),
}

fn masked_hint(source: &str, masked: &[String]) -> String {
    match masked {
        [] => format!("mask a snapshot first (`forkd mask {source}@latest --with SCRIPT --into {source}-masked`)"),
        _ => format!("clone a masked snapshot of {} instead", masked.join(" or ")),
    }
}

type Result<T> = std::result::Result<T, CatalogError>;

/// Garbage nodes one collection step dismantles by default, in one commit under the owner's
/// lock: the first step right after an operation that queued garbage, and each step of the
/// owner's background collector (`unique`).
pub const GC_STEP_NODES: usize = 64;

/// Whether a volume is fed by ingest or written by hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Fed only by ingest; read-only to hosts.
    Source,
    /// Writable copy of a snapshot.
    Clone,
}

/// A snapshot's identity: `VOLUME@N`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotId {
    /// The volume.
    pub volume: String,
    /// Its number on that volume.
    pub id: u64,
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.volume, self.id)
    }
}

/// What an ingest did, kept on the snapshot it produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestSummary {
    /// Bytes of the source image read.
    pub scanned_bytes: u64,
    /// Bytes found different from the previous snapshot.
    pub changed_bytes: u64,
    /// Payload bytes received (block data).
    pub sent_bytes: u64,
    /// Every byte of the ingest stream received: payload, crc32s and frame headers.
    #[serde(default)]
    pub wire_bytes: u64,
    /// Wall time of the ingest.
    pub duration_ms: u64,
}

/// An immutable point in time of a volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Number on its volume, counting up from 1.
    pub id: u64,
    /// Root of its pointer tree (one reference held).
    pub root: NodeId,
    /// Creation time, unix milliseconds.
    pub created_at: i64,
    /// The timeflow of the volume when it was taken.
    pub timeflow: u32,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Blocks holding data.
    pub allocated_blocks: u64,
    /// Names for it.
    pub bookmarks: Vec<String>,
    /// Why it was taken (`ingest`, `snapshot`, `clone`, `rewind`, `refresh`).
    pub reason: String,
    /// Set when an ingest produced it.
    pub ingest: Option<IngestSummary>,
    /// Set on a snapshot of a masked volume taken after its mask hook succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked: Option<MaskRecord>,
    /// Its identity on every site, kept when it arrived by replication (else derived: see
    /// `replica`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
    /// Its content digest (`BlockMap::content_digest`, hex), kept when it arrived by
    /// replication, so the next snapshot's is found from what changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl Snapshot {
    /// Its kept content digest, if any.
    pub fn digest_value(&self) -> Option<u128> {
        self.digest.as_deref().and_then(|d| u128::from_str_radix(d, 16).ok())
    }
}

/// A running ingest: writes land in a staging tree that becomes the next snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Staging {
    /// Root of the staging tree (one reference held).
    pub root: NodeId,
    /// Blocks holding data in it.
    pub allocated_blocks: u64,
    /// Set when it receives a replicated snapshot rather than an ingest (see `replica`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<Incoming>,
}

/// A named virtual block device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Volume {
    /// Its name.
    pub name: String,
    /// Source or clone.
    pub kind: Kind,
    /// Size in bytes (a multiple of 4096).
    pub size_bytes: u64,
    /// Root of the head's pointer tree (one reference held).
    pub root: NodeId,
    /// The snapshot a clone currently derives from.
    pub origin: Option<SnapshotId>,
    /// Creation time, unix milliseconds.
    pub created_at: i64,
    /// Current timeflow; a rewind or refresh starts the next.
    pub timeflow: u32,
    /// Number the next snapshot gets.
    pub next_snapshot: u64,
    /// Its snapshots, oldest first. Stored under their own keys, not in the record (`records`);
    /// read from records written before format 3.
    #[serde(default, skip_serializing)]
    pub snapshots: Vec<Snapshot>,
    /// Hook scripts by event (a clone starts with its parent's: see `hooks`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hooks: BTreeMap<String, HookSetting>,
    /// Set on a masked volume: the source whose data it masks (see `masking`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked_from: Option<String>,
    /// The policy `clone_from = "masked"` on a source: only masked data flows downstream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clone_from_masked: bool,
    /// Retention rules applied after every snapshot and by `prune` (see `retention`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// The origin a detached clone came from (see `detach`); its `origin` is then `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached_from: Option<SnapshotId>,
    /// A clone's lease (see `lease`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// A source's lease policy: default and maximum leases of clones made from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_policy: Option<LeasePolicy>,
    /// A clone's quota on its unique bytes (see `quota`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
    /// A source's `default_quota`: the quota new clones made from it get.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_quota: Option<u64>,
    /// The blocks it holds alone, kept across writes, stale after operations that may change
    /// them and counted again when read (see `unique`). Not stored.
    #[serde(skip)]
    pub unique: Kept,
    /// Blocks holding data in the head (stored under its own key, updated with every write).
    #[serde(skip)]
    pub allocated_blocks: u64,
    /// The running ingest (stored under its own key).
    #[serde(skip)]
    pub staging: Option<Staging>,
    /// Set on a replica: the site and volume it follows; read-only until promoted (see
    /// `replica`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_of: Option<ReplicaOf>,
}

impl Volume {
    /// A new volume with no snapshots, no data counted, no origin and no settings.
    fn new(name: &str, kind: Kind, size_bytes: u64, root: NodeId, created_at: i64) -> Volume {
        Volume {
            name: name.to_string(),
            kind,
            size_bytes,
            root,
            origin: None,
            created_at,
            timeflow: 1,
            next_snapshot: 1,
            snapshots: Vec::new(),
            allocated_blocks: 0,
            staging: None,
            hooks: BTreeMap::new(),
            masked_from: None,
            clone_from_masked: false,
            retention: None,
            detached_from: None,
            lease: None,
            lease_policy: None,
            quota_bytes: None,
            default_quota: None,
            unique: Kept::default(),
            replica_of: None,
        }
    }

    /// Blocks in the volume.
    pub fn nblocks(&self) -> u64 {
        self.size_bytes / BLOCK_SIZE
    }

    /// Find a snapshot by selector.
    pub fn find(&self, sel: &SnapSel) -> Result<&Snapshot> {
        select(&self.name, &self.snapshots, sel)
    }

    /// Every root this volume holds a reference on.
    pub fn roots(&self) -> Vec<NodeId> {
        let mut r: Vec<NodeId> = self.snapshots.iter().map(|s| s.root).collect();
        r.push(self.root);
        r.extend(self.staging.as_ref().map(|s| s.root));
        r
    }
}

/// A point in time of a volume or an environment, as a selector finds it.
pub(crate) trait Point {
    /// Its number.
    fn id(&self) -> u64;
    /// When it was taken, unix milliseconds.
    fn created_at(&self) -> i64;
    /// Its bookmark names.
    fn bookmarks(&self) -> &[String];
}

impl Point for Snapshot {
    fn id(&self) -> u64 {
        self.id
    }
    fn created_at(&self) -> i64 {
        self.created_at
    }
    fn bookmarks(&self) -> &[String] {
        &self.bookmarks
    }
}

/// The point of `points` (oldest first) that `sel` names, on volume or environment `name`:
/// by number, the newest, by bookmark, or the newest at or before a time.
pub(crate) fn select<'a, P: Point>(name: &str, points: &'a [P], sel: &SnapSel) -> Result<&'a P> {
    let missing = || CatalogError::UnknownSnapshot(format!("{name}@{}", sel_text(sel)));
    match sel {
        SnapSel::Id(n) => points.iter().find(|s| s.id() == *n).ok_or_else(missing),
        SnapSel::Latest => points.last().ok_or_else(missing),
        SnapSel::Bookmark(b) => points.iter().find(|s| s.bookmarks().contains(b)).ok_or_else(missing),
        SnapSel::At(t) => points
            .iter()
            .rev()
            .find(|s| s.created_at() <= *t)
            .ok_or_else(|| CatalogError::BeforeFirstSnapshot { volume: name.to_string(), time: format_time(*t) }),
    }
}

fn sel_text(sel: &SnapSel) -> String {
    match sel {
        SnapSel::Id(n) => n.to_string(),
        SnapSel::Latest => "latest".into(),
        SnapSel::Bookmark(b) => b.clone(),
        SnapSel::At(t) => format_time(*t),
    }
}

/// What a delete removes (see [`Catalog::check_delete`]).
#[derive(Clone, Debug)]
pub enum Deletion {
    /// One snapshot of a volume (the volume's record as it is).
    Snapshot(Volume, Box<Snapshot>),
    /// A volume with its snapshots.
    Volume(Volume),
}

/// What a reference resolves to for I/O.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `VOLUME` or `VOLUME@N`.
    pub name: String,
    /// Root of the tree to read.
    pub root: NodeId,
    /// Size in bytes.
    pub size_bytes: u64,
    /// True for snapshots and sources.
    pub read_only: bool,
}

fn k(prefix: &[u8], name: &str) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The catalog and the extent map it owns.
#[derive(Debug)]
pub struct Catalog {
    map: BlockMap,
    volumes: BTreeMap<String, Volume>,
    /// Volumes whose stored record still carries their snapshots (`records`).
    legacy: BTreeSet<String>,
    /// Last timestamp handed out, so snapshot times never go backwards.
    last_time: i64,
    /// Volumes changed by staged writes not yet committed (and whether a root moved).
    staged: BTreeMap<String, (Volume, bool)>,
    /// The operation log's index and retention (`oplog`).
    log: oplog::OpLog,
    /// Environments, by name (`environment.rs`).
    environments: BTreeMap<String, Environment>,
    /// Environment records the open `commit_with` commits with its volumes (None: removed).
    env_pending: Vec<(String, Option<Environment>)>,
    /// Schedules, by name (`schedule.rs`).
    schedules: BTreeMap<String, Schedule>,
    /// A shallow copy the open `commit_with` commits, holding only the snapshots it adds
    /// (`records`).
    appending: Option<Volume>,
    /// Set when a root was released: garbage may wait in the queue (`unique`).
    garbage_due: bool,
    /// Volumes whose unique blocks collection steps may change (`unique`).
    gc_affected: BTreeSet<String>,
    /// Volumes whose unique blocks the open `commit_with` counted itself (`unique`).
    counted: BTreeSet<String>,
    /// Nodes of the collection step an operation that queued garbage takes itself (`unique`).
    gc_step: usize,
    /// This data directory's site id (`replica`).
    site: String,
    /// Whether the site id is stored.
    site_kept: bool,
}

impl Catalog {
    /// Load the catalog from `tree`, abandoning ingests a crash interrupted.
    pub fn open(kv: std::sync::Arc<dyn blockmap::MetaKv>) -> Result<Catalog> {
        let map = BlockMap::open(kv)?;
        let (site, site_kept) = replica::load_site(&map)?;
        let (volumes, legacy) = records::load(&map)?;
        let last_time = volumes
            .values()
            .flat_map(|v| v.snapshots.iter().map(|s| s.created_at).chain([v.created_at]))
            .fold(0, i64::max);
        let log = oplog::OpLog::load(&map)?;
        let environments = environment::load(&map)?;
        let schedules = schedule::load(&map)?;
        let mut cat = Catalog {
            map,
            volumes,
            legacy,
            last_time,
            staged: BTreeMap::new(),
            log,
            environments,
            env_pending: Vec::new(),
            schedules,
            appending: None,
            garbage_due: false,
            gc_affected: BTreeSet::new(),
            counted: BTreeSet::new(),
            gc_step: GC_STEP_NODES,
            site,
            site_kept,
        };
        for v in cat.volumes.values().filter(|v| v.staging.is_some()) {
            tracing::info!(source = %v.name, "an interrupted ingest is waiting: re-run it to resume, or abort it");
        }
        // Garbage a crash left waiting is collected by the owner's steps, as any other.
        cat.garbage_at_open()?;
        Ok(cat)
    }

    /// The extent map, for reads.
    pub fn map(&self) -> &BlockMap {
        &self.map
    }

    /// The extent map, for slot allocation and the flush protocol.
    pub fn map_mut(&mut self) -> &mut BlockMap {
        &mut self.map
    }

    /// All volumes, by name.
    pub fn volumes(&self) -> &BTreeMap<String, Volume> {
        &self.volumes
    }

    /// One volume.
    pub fn volume(&self, name: &str) -> Result<&Volume> {
        self.volumes.get(name).ok_or_else(|| CatalogError::UnknownVolume(name.to_string()))
    }

    fn now(&mut self) -> i64 {
        self.last_time = now_ms().max(self.last_time);
        self.last_time
    }

    /// Resolve a reference to what I/O should read or write.
    pub fn target(&self, reference: &str) -> Result<Target> {
        let r = Reference::parse(reference)?;
        let v = self.volume(&r.volume)?;
        Ok(match &r.snapshot {
            None => Target {
                name: v.name.clone(),
                root: v.root,
                size_bytes: v.size_bytes,
                read_only: v.kind == Kind::Source || v.replica_of.is_some(),
            },
            Some(sel) => {
                let s = v.find(sel)?;
                Target { name: format!("{}@{}", v.name, s.id), root: s.root, size_bytes: s.size_bytes, read_only: true }
            }
        })
    }

    /// Resolve a snapshot reference (it must name a snapshot).
    pub fn snapshot_of(&self, reference: &str) -> Result<(&Volume, &Snapshot)> {
        let r = Reference::parse(reference)?;
        let v = self.volume(&r.volume)?;
        let sel = r.snapshot.ok_or_else(|| CatalogError::BadReference {
            reference: reference.to_string(),
            why: "this names a volume; name a snapshot as VOLUME@N".into(),
        })?;
        Ok((v, v.find(&sel)?))
    }

    /// Clones whose origin is `snap`.
    pub fn dependents(&self, snap: &SnapshotId) -> Vec<String> {
        self.volumes.values().filter(|v| v.origin.as_ref() == Some(snap)).map(|v| v.name.clone()).collect()
    }

    /// Data-holding blocks only `roots` reference, as bytes.
    pub fn unique_bytes(&self, roots: &[NodeId]) -> Result<u64> {
        Ok(self.map.unique_blocks(roots)? * BLOCK_SIZE)
    }

    // ----- committing ---------------------------------------------------------------

    /// Commit map changes made by `build` with the volumes it returns (and removes), or
    /// roll everything back if any step fails.
    fn commit_with<T>(&mut self, build: impl FnOnce(&mut Self) -> Result<(Vec<Volume>, Vec<String>, T)>) -> Result<T> {
        let result = build(self).and_then(|(changed, removed, out)| {
            // A volume returned twice is staged once, as it is last (as it is kept in memory).
            let last: BTreeMap<&str, &Volume> = changed.iter().map(|v| (v.name.as_str(), v)).collect();
            for v in last.into_values() {
                self.stage_record(v)?;
                self.stage_snapshots(v)?;
            }
            for name in &removed {
                self.stage_removal(name);
            }
            self.stage_environments()?;
            self.stage_appending()?;
            self.map.commit()?;
            Ok((changed, removed, out))
        });
        match result {
            Ok((changed, removed, out)) => {
                self.committed(changed, removed);
                Ok(out)
            }
            Err(e) => {
                self.env_pending.clear();
                self.appending = None;
                self.counted.clear();
                self.map.rollback();
                Err(e)
            }
        }
    }

    /// Make a committed operation's records the in-memory ones, mark the unique blocks it may
    /// have changed, and take a first step of collecting the garbage it queued (the owner
    /// runs the rest: `unique`).
    fn committed(&mut self, changed: Vec<Volume>, removed: Vec<String>) {
        let names = changed.iter().map(|v| &v.name).chain(&removed).chain(self.appending.as_ref().map(|v| &v.name));
        let touched: BTreeSet<String> = names.cloned().collect();
        let before: BTreeSet<String> = touched
            .iter()
            .filter_map(|n| self.volumes.get(n))
            .flat_map(|v| [&v.origin, &v.detached_from].into_iter().flatten().map(|o| o.volume.clone()))
            .collect();
        self.recorded(changed.iter().map(|v| &v.name).chain(&removed));
        for name in removed {
            self.volumes.remove(&name);
        }
        for v in changed {
            self.volumes.insert(v.name.clone(), v);
        }
        self.apply_environments();
        self.apply_appending();
        self.mark_changed(&touched, &before);
        // The operation is committed whatever happens here: a failed step is tried again, and
        // what a failed hand-off leaves in the write-back layer goes at the next flush.
        if self.garbage_due {
            if let Err(e) = self.collect_garbage_step(self.gc_step) {
                tracing::warn!(error = %e, "garbage collection step failed; it will be tried again");
            }
        }
        // Operations hand the write-back layer to the engine, as they did when each one
        // collected its garbage to the end (which began with that hand-off).
        if let Err(e) = self.map.spill() {
            tracing::warn!(error = %e, "handing committed changes to the metadata engine failed");
        }
    }

    fn new_name(&self, name: &str) -> Result<()> {
        self.unused_name("volume", name)
    }

    /// Check a new volume's or environment's name: valid, and neither a volume's nor an
    /// environment's (`kind` says which, for the error).
    fn unused_name(&self, kind: &str, name: &str) -> Result<()> {
        validate_name(kind, name)?;
        if self.volumes.contains_key(name) {
            return Err(CatalogError::NameTaken(name.to_string()));
        }
        if self.environments.contains_key(name) {
            return Err(CatalogError::EnvironmentTaken(name.to_string()));
        }
        Ok(())
    }

    /// Take a snapshot of `v`'s head into `v` (in the open transaction).
    fn take_snapshot(&mut self, v: &mut Volume, reason: &str, bookmark: Option<&str>) -> Result<SnapshotId> {
        if let Some(b) = bookmark {
            reference::validate_bookmark(b)?;
            // `v` may be a shallow copy (`records`): the committed snapshots count too.
            let committed = self.volumes.get(&v.name).map_or(&[][..], |c| &c.snapshots[..]);
            if let Some(s) = v.snapshots.iter().chain(committed).find(|s| s.bookmarks.iter().any(|x| x == b)) {
                return Err(CatalogError::BookmarkTaken { bookmark: b.into(), on: format!("{}@{}", v.name, s.id) });
            }
        }
        self.map.share(v.root)?;
        let id = v.next_snapshot;
        v.next_snapshot += 1;
        let created_at = self.now();
        v.snapshots.push(Snapshot {
            id,
            root: v.root,
            created_at,
            timeflow: v.timeflow,
            size_bytes: v.size_bytes,
            allocated_blocks: v.allocated_blocks,
            bookmarks: bookmark.map(|b| vec![b.to_string()]).unwrap_or_default(),
            reason: reason.to_string(),
            ingest: None,
            masked: None,
            guid: None,
            digest: None,
        });
        Ok(SnapshotId { volume: v.name.clone(), id })
    }

    // ----- operations ---------------------------------------------------------------

    /// Create an empty source volume.
    pub fn create_source(&mut self, name: &str, size_bytes: u64) -> Result<Volume> {
        self.new_name(name)?;
        check_size(size_bytes)?;
        let v = Volume::new(name, Kind::Source, size_bytes, 0, self.now());
        self.commit_with(|_| Ok((vec![v.clone()], vec![], ())))?;
        Ok(v)
    }

    /// Snapshot a volume's current contents.
    pub fn snapshot(&mut self, volume: &str, bookmark: Option<&str>) -> Result<SnapshotId> {
        Self::not_masked(self.volume(volume)?, "snapshotted")?;
        Self::not_replica(self.volume(volume)?)?;
        let v = self.shallow(volume)?;
        self.commit_appending(v, |cat, v| cat.take_snapshot(v, "snapshot", bookmark))
    }

    /// Add a bookmark to a snapshot.
    pub fn bookmark(&mut self, snapshot: &str, name: &str) -> Result<SnapshotId> {
        reference::validate_bookmark(name)?;
        let (v, s) = self.snapshot_of(snapshot)?;
        let id = SnapshotId { volume: v.name.clone(), id: s.id };
        let mut v = v.clone();
        if let Some(other) = v.snapshots.iter().find(|x| x.bookmarks.iter().any(|b| b == name)) {
            return Err(CatalogError::BookmarkTaken { bookmark: name.into(), on: format!("{}@{}", v.name, other.id) });
        }
        if let Some(s) = v.snapshots.iter_mut().find(|x| x.id == id.id) {
            s.bookmarks.push(name.to_string());
        }
        self.commit_with(|_| Ok((vec![v], vec![], id)))
    }

    /// Create a clone of a snapshot, or of a volume (which is snapshotted first, atomically).
    /// Returns the clone and the snapshot it was made from. Refused for data that may not
    /// flow downstream (see `masking`).
    pub fn clone_volume(&mut self, from: &str, name: &str) -> Result<(Volume, SnapshotId)> {
        self.clone_volume_leased(from, name, None, None)
    }

    /// [`Catalog::clone_volume`], the clone holding `lease` from its first commit (see
    /// [`Catalog::lease_for_clone`]).
    pub fn clone_volume_leased(
        &mut self,
        from: &str,
        name: &str,
        lease: Option<Lease>,
        quota_bytes: Option<u64>,
    ) -> Result<(Volume, SnapshotId)> {
        self.new_name(name)?;
        self.downstream(from)?;
        let r = Reference::parse(from)?;
        let mut parent = self.volume(&r.volume)?.clone();
        self.commit_with(|cat| {
            let mut changed = Vec::new();
            let snap_id = match &r.snapshot {
                Some(sel) => SnapshotId { volume: parent.name.clone(), id: parent.find(sel)?.id },
                None => {
                    let id = cat.take_snapshot(&mut parent, "clone", None)?;
                    changed.push(parent.clone());
                    id
                }
            };
            let mut clone = cat.clone_in(&parent, snap_id.id, name)?;
            clone.lease = lease;
            clone.quota_bytes = quota_bytes.or(clone.quota_bytes);
            changed.push(clone.clone());
            Ok((changed, vec![], (clone, snap_id)))
        })
    }

    /// A new clone `name` of snapshot `id` of `parent` (in the open transaction; the caller
    /// checked the name and commits the clone).
    fn clone_in(&mut self, parent: &Volume, id: u64, name: &str) -> Result<Volume> {
        let snap = parent.find(&SnapSel::Id(id))?;
        self.map.share(snap.root)?;
        let mut clone = Volume {
            origin: Some(SnapshotId { volume: parent.name.clone(), id }),
            allocated_blocks: snap.allocated_blocks,
            hooks: hooks::inherited(&parent.hooks),
            quota_bytes: self.default_quota_for(parent),
            ..Volume::new(name, Kind::Clone, snap.size_bytes, snap.root, self.now())
        };
        self.counted_new(&mut clone);
        Ok(clone)
    }

    /// Volumes a clone may move to: itself and every volume up its origin chain.
    fn lineage(&self, clone: &Volume) -> Vec<String> {
        let mut out = vec![clone.name.clone()];
        let mut cur = clone.origin.clone();
        while let Some(o) = cur {
            if out.contains(&o.volume) {
                break;
            }
            out.push(o.volume.clone());
            cur = self.volumes.get(&o.volume).and_then(|v| v.origin.clone());
        }
        out
    }

    /// Resolve a rewind target: `VOLUME@SEL`, `@SEL` or `N` (the clone's own), or a time
    /// (the newest of the clone's own snapshots and its origin at or before it).
    fn resolve_move_target(&self, clone: &Volume, to: &str) -> Result<SnapshotId> {
        if let Some(t) = parse_time(to) {
            let own =
                clone.snapshots.iter().filter(|s| s.created_at <= t).map(|s| (s.created_at, clone.name.clone(), s.id));
            let origin = clone.origin.as_ref().and_then(|o| {
                let s = self.volumes.get(&o.volume)?.snapshots.iter().find(|s| s.id == o.id)?;
                (s.created_at <= t).then(|| (s.created_at, o.volume.clone(), s.id))
            });
            let best = own.chain(origin).max_by_key(|(at, _, _)| *at);
            return best
                .map(|(_, volume, id)| SnapshotId { volume, id })
                .ok_or_else(|| CatalogError::BeforeFirstSnapshot { volume: clone.name.clone(), time: format_time(t) });
        }
        let full = if let Some(rest) = to.strip_prefix('@') {
            format!("{}@{rest}", clone.name)
        } else if !to.is_empty() && to.bytes().all(|c| c.is_ascii_digit()) {
            format!("{}@{to}", clone.name)
        } else {
            to.to_string()
        };
        let (v, s) = self.snapshot_of(&full)?;
        let id = SnapshotId { volume: v.name.clone(), id: s.id };
        if !self.lineage(clone).contains(&v.name) {
            return Err(CatalogError::NotInLineage { clone: clone.name.clone(), target: id.to_string() });
        }
        Ok(id)
    }

    /// Point a clone's head at `target`, keeping the state before as a snapshot.
    fn repoint(&mut self, clone: &str, target: SnapshotId, reason: &'static str) -> Result<SnapshotId> {
        let mut v = self.volume(clone)?.clone();
        if v.kind != Kind::Clone {
            return Err(CatalogError::NotAClone(v.name, if reason == "rewind" { "rewound" } else { "refreshed" }));
        }
        Self::not_masked(&v, if reason == "rewind" { "rewound" } else { "refreshed" })?;
        Self::not_replica(&v)?;
        self.commit_with(|cat| {
            let kept = cat.repoint_in(&mut v, &target, reason)?;
            Ok((vec![v], vec![], kept))
        })
    }

    /// The body of a rewind or refresh of clone `v` (in the open transaction; the caller
    /// checked it is a clone and commits it): keep its head as a snapshot, point the head at
    /// `target` (one of `v`'s own snapshots or a committed volume's) and start a new timeflow.
    fn repoint_in(&mut self, v: &mut Volume, target: &SnapshotId, reason: &str) -> Result<SnapshotId> {
        let kept = self.take_snapshot(v, reason, None)?;
        let t = if target.volume == v.name {
            v.find(&SnapSel::Id(target.id))?.clone()
        } else {
            self.volume(&target.volume)?.find(&SnapSel::Id(target.id))?.clone()
        };
        self.map.share(t.root)?;
        self.drop_root(v.root)?;
        v.root = t.root;
        v.size_bytes = t.size_bytes;
        v.allocated_blocks = t.allocated_blocks;
        v.timeflow += 1;
        if target.volume != v.name {
            v.origin = Some(target.clone());
        }
        Ok(kept)
    }

    /// Make a clone's contents those of an earlier snapshot. Returns the snapshot that keeps
    /// the pre-rewind state.
    pub fn rewind(&mut self, clone: &str, to: &str) -> Result<(SnapshotId, SnapshotId)> {
        let v = self.volume(clone)?;
        if v.kind != Kind::Clone {
            return Err(CatalogError::NotAClone(v.name.clone(), "rewound"));
        }
        let target = self.resolve_move_target(v, to)?;
        let kept = self.repoint(clone, target.clone(), "rewind")?;
        Ok((target, kept))
    }

    /// Re-point a clone at the newest snapshot of its origin volume (or `to`). Returns the
    /// target and the snapshot that keeps the pre-refresh state.
    pub fn refresh(&mut self, clone: &str, to: Option<&str>) -> Result<(SnapshotId, SnapshotId)> {
        let v = self.volume(clone)?;
        let origin = Self::refresh_origin(v)?;
        let target = match to {
            Some(to) => self.resolve_move_target(v, to)?,
            None => {
                let src = self.volume(&origin.volume)?;
                let s = src.find(&SnapSel::Latest)?;
                SnapshotId { volume: src.name.clone(), id: s.id }
            }
        };
        let kept = self.repoint(clone, target.clone(), "refresh")?;
        Ok((target, kept))
    }

    /// Delete a volume (with its snapshots) or one snapshot. Refused, naming them, while
    /// clones depend on what would go.
    pub fn delete(&mut self, reference: &str) -> Result<()> {
        match self.check_delete(reference)? {
            Deletion::Snapshot(mut v, s) => {
                v.snapshots.retain(|x| x.id != s.id);
                self.commit_with(|cat| {
                    cat.drop_root(s.root)?;
                    Ok((vec![v], vec![], ()))
                })
            }
            Deletion::Volume(v) => self.commit_with(|cat| {
                for root in v.roots() {
                    cat.drop_root(root)?;
                }
                Ok((vec![], vec![v.name.clone()], ()))
            }),
        }
    }

    /// What deleting `reference` would delete, or why it is refused (unknown, clones depend
    /// on it, a member of an environment), without changing anything: so a `pre-delete` hook
    /// runs only for a delete that will happen.
    pub fn check_delete(&self, reference: &str) -> Result<Deletion> {
        let r = Reference::parse(reference)?;
        let v = self.volume(&r.volume)?.clone();
        if let Some(sel) = &r.snapshot {
            let s = v.find(sel)?.clone();
            let sid = SnapshotId { volume: v.name.clone(), id: s.id };
            let deps = self.dependents(&sid);
            if !deps.is_empty() {
                return Err(CatalogError::HasDependents { what: sid.to_string(), dependents: deps });
            }
            return Ok(Deletion::Snapshot(v, Box::new(s)));
        }
        if let Some(env) = self.environment_of(&v.name) {
            return Err(CatalogError::InEnvironment {
                volume: v.name.clone(),
                environment: env.name.clone(),
                hint: "; delete the environment first (with --keep-volumes to keep its volumes)",
            });
        }
        let deps: Vec<String> = self
            .volumes
            .values()
            .filter(|c| c.name != v.name && c.origin.as_ref().is_some_and(|o| o.volume == v.name))
            .map(|c| c.name.clone())
            .collect();
        if !deps.is_empty() {
            return Err(CatalogError::HasDependents { what: v.name.clone(), dependents: deps });
        }
        Ok(Deletion::Volume(v))
    }

    // ----- data plane ---------------------------------------------------------------

    fn check_range(v: &Volume, first: u64, count: u64) -> Result<()> {
        if first.checked_add(count).is_none_or(|end| end > v.nblocks()) {
            return Err(CatalogError::OutOfRange {
                volume: v.name.clone(),
                offset: first.saturating_mul(BLOCK_SIZE),
                length: count.saturating_mul(BLOCK_SIZE),
                size: v.size_bytes,
            });
        }
        Ok(())
    }

    /// Map `entries` (one per block from `first`; `None` unmaps) into a clone's head, or,
    /// with `staging`, into a source's running ingest, and commit. Data must already be in
    /// its slots. See [`Catalog::stage_write`] to combine several writes in one commit.
    pub fn write(&mut self, volume: &str, first: u64, entries: &[Option<Entry>], staging: bool) -> Result<()> {
        let r = self.stage_write(volume, first, entries, staging).and_then(|()| self.commit_staged());
        if r.is_err() {
            self.rollback_staged();
        }
        r
    }

    /// The volume as the open transaction sees it.
    fn staged_volume(&self, name: &str) -> Result<&Volume> {
        match self.staged.get(name) {
            Some((v, _)) => Ok(v),
            None => self.volume(name),
        }
    }

    /// Stage a write (see [`Catalog::write`]) in the open transaction without committing it.
    /// Later staged writes see earlier ones. On error the caller must roll back.
    pub fn stage_write(&mut self, volume: &str, first: u64, entries: &[Option<Entry>], staging: bool) -> Result<()> {
        let v = self.staged_volume(volume)?;
        let incoming = v.staging.as_ref().is_some_and(|s| s.incoming.is_some());
        if !staging {
            Self::not_replica(v)?;
        }
        match (staging, v.kind, v.staging.is_some()) {
            (true, _, true) if incoming => {}
            (false, Kind::Clone, _) | (true, Kind::Source, true) => {}
            (false, Kind::Source, _) => return Err(CatalogError::ReadOnly(v.name.clone())),
            (true, Kind::Clone, _) => return Err(CatalogError::NotASource(v.name.clone())),
            (true, Kind::Source, false) => return Err(CatalogError::NoIngest(v.name.clone())),
        }
        Self::check_range(v, first, entries.len() as u64)?;
        let (mut v, mut moved) = match self.staged.remove(volume) {
            Some(x) => x,
            None => (self.write_copy(volume)?, false),
        };
        let nblocks = v.nblocks();
        let freed_before = self.map.freed_in_transaction();
        let rewritten_before = self.map.rewritten_in_transaction();
        let result = {
            let (root, allocated) = match &mut v.staging {
                Some(s) if staging => (&mut s.root, &mut s.allocated_blocks),
                _ => (&mut v.root, &mut v.allocated_blocks),
            };
            let before = *root;
            let r = self.map.set_range(root, nblocks, first, entries, staging);
            if let Ok(delta) = r {
                *allocated = allocated.saturating_add_signed(delta);
            }
            moved |= *root != before;
            r
        };
        if result.is_ok() {
            // A block rewritten in place keeps its slot: it adds nothing.
            let rewritten = self.map.rewritten_in_transaction().saturating_sub(rewritten_before);
            let added =
                entries.iter().filter(|e| e.is_some_and(|e| e.has_data())).count().saturating_sub(rewritten) as u64;
            let freed = self.map.freed_in_transaction().saturating_sub(freed_before) as u64;
            self.count_write(&v, added, freed);
        }
        self.staged.insert(v.name.clone(), (v, moved));
        result.map(|_| ()).map_err(CatalogError::from)
    }

    /// Commit every staged write as one batch.
    pub fn commit_staged(&mut self) -> Result<()> {
        let staged = std::mem::take(&mut self.staged);
        for (v, moved) in staged.values() {
            // The hot path: unless a root moved, only the small counters are rewritten.
            // Staged writes change no snapshot: only a legacy record's are written (`records`).
            if *moved {
                self.stage_record(v)?;
            } else {
                self.stage_counters(v)?;
            }
        }
        self.map.commit()?;
        self.recorded(staged.iter().filter(|(_, (_, moved))| *moved).map(|(name, _)| name));
        for (name, (mut v, _)) in staged {
            // The committed snapshots, unchanged by writes, go back into the (shallow) copy.
            if let Some(committed) = self.volumes.get_mut(&name) {
                v.snapshots = std::mem::take(&mut committed.snapshots);
            }
            self.volumes.insert(name, v);
        }
        Ok(())
    }

    /// Forget every staged write.
    pub fn rollback_staged(&mut self) {
        self.staged.clear();
        self.map.rollback();
    }

    /// Turn every block of `first..first+count` that is mapped into a known-zero block
    /// (holes stay holes, so trimming never copies shared nodes for nothing): in a clone's head,
    /// or, with `staging`, in a source's running ingest (blocks that became zero).
    pub fn zero(&mut self, volume: &str, first: u64, count: u64, staging: bool) -> Result<()> {
        let v = self.volume(volume)?;
        if !staging {
            Self::not_replica(v)?;
        }
        let root = match (staging, v.kind, &v.staging) {
            (true, _, Some(s)) if s.incoming.is_some() => s.root,
            (false, Kind::Clone, _) => v.root,
            (false, Kind::Source, _) => return Err(CatalogError::ReadOnly(v.name.clone())),
            (true, Kind::Source, Some(s)) => s.root,
            (true, Kind::Source, None) => return Err(CatalogError::NoIngest(v.name.clone())),
            (true, Kind::Clone, _) => return Err(CatalogError::NotASource(v.name.clone())),
        };
        Self::check_range(v, first, count)?;
        let entries = self.map.lookup(root, first, count)?;
        let mut writes: Vec<(u64, Option<Entry>)> = Vec::new();
        for (i, e) in entries.into_iter().enumerate() {
            if e.is_some_and(|e| e.has_data()) {
                writes.push((first + i as u64, Some(Entry::ZERO)));
            }
        }
        for run in writes.chunk_by(|a, b| a.0 + 1 == b.0) {
            let es: Vec<Option<Entry>> = run.iter().map(|w| w.1).collect();
            self.write(volume, run[0].0, &es, staging)?;
        }
        Ok(())
    }

    /// Start an ingest into a source: a staging tree that starts as the latest contents. If an
    /// interrupted ingest left its staging tree, it is resumed instead: returns true then.
    pub fn begin_ingest(&mut self, source: &str) -> Result<bool> {
        let mut v = self.volume(source)?.clone();
        if v.kind != Kind::Source {
            return Err(CatalogError::NotASource(v.name));
        }
        Self::not_replica(&v)?;
        if v.staging.is_some() {
            return Ok(true);
        }
        self.commit_with(|cat| {
            cat.map.share(v.root)?;
            v.staging = Some(Staging { root: v.root, allocated_blocks: v.allocated_blocks, incoming: None });
            Ok((vec![v], vec![], false))
        })
    }

    /// Finish an ingest: its staging tree becomes the head and a new snapshot.
    pub fn finish_ingest(&mut self, source: &str, summary: IngestSummary) -> Result<SnapshotId> {
        let mut v = self.shallow(source)?;
        let staging = v.staging.take().ok_or_else(|| CatalogError::NoIngest(v.name.clone()))?;
        self.commit_appending(v, |cat, v| {
            cat.drop_root(v.root)?;
            v.root = staging.root;
            v.allocated_blocks = staging.allocated_blocks;
            let id = cat.take_snapshot(v, "ingest", None)?;
            if let Some(s) = v.snapshots.last_mut() {
                s.ingest = Some(summary);
            }
            Ok(id)
        })
    }

    /// Abandon an ingest: its staging tree and every block only it held are freed.
    pub fn abort_ingest(&mut self, source: &str) -> Result<()> {
        let mut v = self.volume(source)?.clone();
        Self::not_replica(&v)?;
        let staging = v.staging.take().ok_or_else(|| CatalogError::NoIngest(v.name.clone()))?;
        self.commit_with(|cat| {
            cat.drop_root(staging.root)?;
            Ok((vec![v], vec![], ()))
        })
    }

    /// The tree an ingest compares against: an interrupted ingest's staging tree (so a resumed
    /// ingest sends nothing the daemon already has), else the source's latest contents.
    pub fn ingest_base(&self, source: &str) -> Result<(NodeId, u64)> {
        let v = self.volume(source)?;
        if v.kind != Kind::Source {
            return Err(CatalogError::NotASource(v.name.clone()));
        }
        Ok((v.staging.as_ref().map_or(v.root, |s| s.root), v.size_bytes))
    }

    /// Grow a source to `new_size` bytes (a multiple of 4096, at most 1 PiB), for an image
    /// that grew. Its snapshots keep their own sizes; the new blocks read as zeros (the head's
    /// tree gains levels on its next write). Refused for clones, while an ingest runs or
    /// waits to be resumed, and for a smaller size; the same size changes nothing. Returns the
    /// previous size.
    pub fn resize(&mut self, source: &str, new_size: u64) -> Result<u64> {
        let mut v = self.volume(source)?.clone();
        if v.kind != Kind::Source {
            return Err(CatalogError::NotASource(v.name));
        }
        Self::not_replica(&v)?;
        if v.staging.is_some() {
            return Err(CatalogError::IngestRunning(v.name));
        }
        check_size(new_size)?;
        let old = v.size_bytes;
        if new_size < old {
            return Err(CatalogError::InvalidSize {
                size: new_size.to_string(),
                why: format!("`{}` is {old} bytes and a source can only grow", v.name),
            });
        }
        if new_size == old {
            return Ok(old);
        }
        v.size_bytes = new_size;
        self.commit_with(|_| Ok((vec![v], vec![], old)))
    }
}

#[cfg(test)]
mod replica_tests;
#[cfg(test)]
mod tests;
