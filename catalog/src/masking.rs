//! Masking and the policy that makes a source fail closed.
//!
//! A masked volume (`Volume::masked_from`) is a clone whose head only the `mask` hook
//! reaches: [`Catalog::mask_begin`] puts a snapshot's data in it (creating it on first use),
//! and, once the hook succeeded, [`Catalog::mask_finish`] snapshots it and marks that snapshot
//! masked, recording the source snapshot, the script and the script's digest. Hosts, snapshots
//! and clones of its head are refused; clones of its masked snapshots work normally.
//!
//! A source with `clone_from_masked` set lets no unmasked data out: [`Catalog::downstream`]
//! refuses any volume or snapshot whose data comes from it without passing through a masked
//! volume (the source itself, its snapshots, and clones made from them, even before the
//! policy was set). Cloning, exports, dumps and reads call it.

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::{Catalog, CatalogError, Environment, Kind, Result, SnapSel, SnapshotId, Volume};

/// What a masked snapshot was made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskRecord {
    /// The snapshot whose data was masked.
    pub source: SnapshotId,
    /// The `mask` script's name.
    pub script: String,
    /// SHA-256 of the script's contents when it ran, hex.
    pub script_sha256: String,
}

impl Catalog {
    /// Set or clear the policy `clone_from = "masked"` on a source.
    pub fn set_clone_from_masked(&mut self, source: &str, masked_only: bool) -> Result<()> {
        let mut v = self.volume(source)?.clone();
        if v.kind != Kind::Source {
            return Err(CatalogError::NotASource(v.name));
        }
        v.clone_from_masked = masked_only;
        self.commit_with(|_| Ok((vec![v], vec![], ())))
    }

    /// Refuse `reference` (a volume or `VOLUME@N`) when its data may not flow downstream: the
    /// head of a masked volume, or data of a `clone_from_masked` source that did not pass
    /// through a masked volume.
    pub fn downstream(&self, reference: &str) -> Result<()> {
        let r = crate::Reference::parse(reference)?;
        let v = self.volume(&r.volume)?;
        if v.masked_from.is_some() {
            let masked = match &r.snapshot {
                Some(sel) => v.find(sel)?.masked.is_some(),
                None => false,
            };
            return if masked { Ok(()) } else { Err(CatalogError::MaskedVolume(v.name.clone())) };
        }
        match self.unmasked_source(v) {
            Some(source) => Err(CatalogError::MaskedOnly {
                what: reference.to_string(),
                policy_source: source.name.clone(),
                masked: self.masked_volumes_of(&source.name),
            }),
            None => Ok(()),
        }
    }

    /// The policy source `v`'s data comes from without passing through a masked volume.
    fn unmasked_source<'a>(&'a self, v: &'a Volume) -> Option<&'a Volume> {
        let mut cur = v;
        for _ in 0..=self.volumes.len() {
            if cur.masked_from.is_some() {
                return None;
            }
            if cur.kind == Kind::Source {
                return cur.clone_from_masked.then_some(cur);
            }
            cur = self.volumes.get(&cur.origin.as_ref().or(cur.detached_from.as_ref())?.volume)?;
        }
        None
    }

    /// The masked volumes holding masked data of `source`.
    pub fn masked_volumes_of(&self, source: &str) -> Vec<String> {
        self.volumes.values().filter(|v| v.masked_from.as_deref() == Some(source)).map(|v| v.name.clone()).collect()
    }

    /// Refuse operations other than masking on a masked volume.
    pub(crate) fn not_masked(v: &Volume, what: &'static str) -> Result<()> {
        match v.masked_from {
            Some(_) => Err(CatalogError::MaskedVolumeOp { volume: v.name.clone(), what }),
            None => Ok(()),
        }
    }

    /// Put the data of `snapshot` into the masked volume `into` (created on first use; an
    /// existing one must be a masked volume of the same source). Its head is replaced without
    /// keeping a snapshot: before a run it holds either its latest masked snapshot or what a
    /// failed run left. Returns the snapshot and `into`'s record before (None if created),
    /// for [`Catalog::restore`] should the hook fail.
    pub fn mask_begin(&mut self, snapshot: &str, into: &str) -> Result<(SnapshotId, Option<Volume>)> {
        let (sv, s) = self.snapshot_of(snapshot)?;
        let id = SnapshotId { volume: sv.name.clone(), id: s.id };
        if sv.masked_from.is_some() {
            return Err(CatalogError::MaskedVolumeOp { volume: sv.name.clone(), what: "masked again" });
        }
        let source = self.root_source(sv);
        let Some(existing) = self.volumes.get(into).cloned() else {
            self.new_name(into)?;
            let parent = sv.clone();
            self.commit_with(|cat| {
                let mut v = cat.clone_in(&parent, id.id, into)?;
                v.masked_from = Some(source);
                v.hooks.clear();
                // The pipeline's own volume: a source's default_quota is for its users' clones.
                v.quota_bytes = None;
                Ok((vec![v], vec![], ()))
            })?;
            return Ok((id, None));
        };
        if existing.masked_from.as_deref() != Some(source.as_str()) {
            return Err(CatalogError::NotMaskedVolume { volume: into.to_string(), of: source });
        }
        let mut v = existing.clone();
        let (root, size, allocated) = (s.root, s.size_bytes, s.allocated_blocks);
        self.commit_with(|cat| {
            cat.map.share(root)?;
            cat.drop_root(v.root)?;
            (v.root, v.size_bytes, v.allocated_blocks) = (root, size, allocated);
            v.origin = Some(id.clone());
            v.timeflow += 1;
            Ok((vec![v], vec![], ()))
        })?;
        Ok((id, Some(existing)))
    }

    /// Snapshot the masked volume `into` after its mask hook succeeded, marked masked.
    pub fn mask_finish(&mut self, into: &str, record: MaskRecord) -> Result<SnapshotId> {
        let mut v = self.volume(into)?.clone();
        if v.masked_from.is_none() {
            return Err(CatalogError::NotMaskedVolume { volume: into.to_string(), of: record.source.volume });
        }
        self.commit_with(|cat| {
            let id = cat.take_snapshot(&mut v, "mask", None)?;
            if let Some(s) = v.snapshots.last_mut() {
                s.masked = Some(record);
            }
            Ok((vec![v], vec![], id))
        })
    }

    /// Snapshot the masked volumes of an environment's members after their hooks succeeded
    /// (`members`: member, masked volume, record), and make them environment `env` (created
    /// on first use, from `origin`), in one commit.
    pub fn mask_finish_env(
        &mut self,
        env: &str,
        origin: &str,
        members: Vec<(String, String, MaskRecord)>,
    ) -> Result<Vec<SnapshotId>> {
        let names: BTreeMap<String, String> = members.iter().map(|(m, v, _)| (m.clone(), v.clone())).collect();
        let record = match self.environments().get(env) {
            Some(e) if e.members == names => e.clone(),
            Some(_) => {
                return Err(CatalogError::BadEnvironment(format!(
                    "`{env}` exists with other members: choose another name to mask into"
                )))
            }
            None => {
                self.new_env_name(env)?;
                Environment {
                    name: env.to_string(),
                    members: names,
                    created_at: self.now(),
                    origin: Some(origin.to_string()),
                    next_snapshot: 1,
                    snapshots: Vec::new(),
                    hooks: BTreeMap::new(),
                    lease: None,
                }
            }
        };
        let mut volumes: Vec<Volume> =
            members.iter().map(|(_, v, _)| self.volume(v).cloned()).collect::<Result<_>>()?;
        self.commit_with(|cat| {
            let mut ids = Vec::new();
            for (v, (_, _, rec)) in volumes.iter_mut().zip(members) {
                ids.push(cat.take_snapshot(v, "mask", None)?);
                if let Some(s) = v.snapshots.last_mut() {
                    s.masked = Some(rec);
                }
            }
            cat.stage_env(env, Some(record));
            Ok((volumes, vec![], ids))
        })
    }

    /// The source at the top of `v`'s origin chain (`v` itself for a source).
    fn root_source(&self, v: &Volume) -> String {
        let mut cur = v;
        for _ in 0..=self.volumes.len() {
            match cur.origin.as_ref().and_then(|o| self.volumes.get(&o.volume)) {
                Some(parent) => cur = parent,
                None => break,
            }
        }
        cur.name.clone()
    }

    /// Whether `snap` of `volume` is a masked snapshot.
    pub fn is_masked(&self, snap: &SnapshotId) -> bool {
        self.volumes
            .get(&snap.volume)
            .and_then(|v| v.find(&SnapSel::Id(snap.id)).ok())
            .is_some_and(|s| s.masked.is_some())
    }
}
