//! How a volume is stored (data directory format 3): its record under `cV` + name (JSON,
//! without its snapshots), the head's allocated-block counter under `cA` + name, a running
//! ingest under `cI` + name, and each snapshot under `cS` + name + `\0` + its id big-endian
//! (JSON). Names never hold `\0` (`validate_name`), so one volume's snapshot keys never mix
//! with those of a volume whose name extends its own, and they scan in id order: oldest first.
//!
//! A commit writes only the snapshot keys that changed: the staged volume's snapshots are
//! compared by id with the committed in-memory copy, which is exactly what the keys hold (the
//! invariant this module keeps). So a new snapshot costs one small key whatever the number of
//! snapshots; before format 3 every commit rewrote the record with all of them, O(N) bytes per
//! snapshot and O(N^2) to build N (issue 12).
//!
//! Records written before format 3 carry their snapshots in a `snapshots` array. They are read
//! as they are, and the volume stays in `Catalog::legacy` until the first commit that writes
//! its record: that commit writes every snapshot under its own key and the record without the
//! array, in the same batch. A volume with both is refused as corrupt: nothing writes that.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::{k, BlockMap, Catalog, CatalogError, Result, Snapshot, Volume};

/// Volume records.
const K_VOLUME: &[u8] = b"cV";
/// The head's allocated-block counter, rewritten with every write batch.
const K_ALLOCATED: &[u8] = b"cA";
/// A running ingest.
const K_STAGING: &[u8] = b"cI";
/// Snapshots: `cS` + volume + `\0` + id (big-endian).
const K_SNAPSHOT: &[u8] = b"cS";

fn snapshot_key(volume: &str, id: u64) -> Vec<u8> {
    let mut key = k(K_SNAPSHOT, volume);
    key.push(0);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The volume and id a snapshot key names; `None` when it is not well formed.
fn parse_snapshot_key(key: &[u8]) -> Option<(&str, u64)> {
    let rest = key.strip_prefix(K_SNAPSHOT)?;
    let sep = rest.iter().position(|&b| b == 0)?;
    let (name, id) = rest.split_at(sep);
    let id: [u8; 8] = id.get(1..)?.try_into().ok()?;
    Some((std::str::from_utf8(name).ok()?, u64::from_be_bytes(id)))
}

/// The stored volumes with their snapshots (oldest first), and the names of those whose record
/// still carries them (written before format 3).
pub(crate) fn load(map: &BlockMap) -> Result<(BTreeMap<String, Volume>, BTreeSet<String>)> {
    let mut volumes = BTreeMap::new();
    let mut legacy = BTreeSet::new();
    for (key, val) in map.scan_meta(K_VOLUME)? {
        let name = String::from_utf8_lossy(&key[K_VOLUME.len()..]).into_owned();
        let v = load_volume(map, &name, &val)?;
        if !v.snapshots.is_empty() {
            legacy.insert(name.clone());
        }
        volumes.insert(name, v);
    }
    for (key, val) in map.scan_meta(K_SNAPSHOT)? {
        let (name, id) = parse_snapshot_key(&key)
            .ok_or_else(|| CatalogError::Corrupt(String::from_utf8_lossy(&key).into_owned()))?;
        let corrupt = |why: &str| CatalogError::Corrupt(format!("{name}@{id} ({why})"));
        let s: Snapshot = serde_json::from_slice(&val).map_err(|_| corrupt("snapshot record"))?;
        if s.id != id {
            return Err(corrupt("its record names another id"));
        }
        if legacy.contains(name) {
            return Err(corrupt("the volume's record holds its snapshots too"));
        }
        let v = volumes.get_mut(name).ok_or_else(|| corrupt("a snapshot of no volume"))?;
        v.snapshots.push(s);
    }
    Ok((volumes, legacy))
}

/// One volume's record, with its counter and running ingest.
fn load_volume(map: &BlockMap, name: &str, record: &[u8]) -> Result<Volume> {
    let mut v: Volume = serde_json::from_slice(record).map_err(|_| CatalogError::Corrupt(name.to_string()))?;
    if v.name != name {
        return Err(CatalogError::Corrupt(name.to_string()));
    }
    if let Some(a) = map.get_meta(&k(K_ALLOCATED, name))? {
        v.allocated_blocks = u64::from_le_bytes(
            a.as_slice().try_into().map_err(|_| CatalogError::Corrupt(format!("{name} (allocation)")))?,
        );
    }
    if let Some(s) = map.get_meta(&k(K_STAGING, name))? {
        v.staging = Some(serde_json::from_slice(&s).map_err(|_| CatalogError::Corrupt(format!("{name} (ingest)")))?);
    }
    Ok(v)
}

/// The snapshots of `new` that `old` lacks or holds otherwise, and the ids of `old` that `new`
/// lacks. Both lists are normally in id order and are then merged; otherwise compared by map.
fn diff<'a>(old: &[Snapshot], new: &'a [Snapshot]) -> (Vec<&'a Snapshot>, Vec<u64>) {
    let sorted = |s: &[Snapshot]| s.windows(2).all(|w| w[0].id < w[1].id);
    if !sorted(old) || !sorted(new) {
        let before: HashMap<u64, &Snapshot> = old.iter().map(|s| (s.id, s)).collect();
        let after: HashMap<u64, &Snapshot> = new.iter().map(|s| (s.id, s)).collect();
        let put = new.iter().filter(|s| before.get(&s.id) != Some(s)).collect();
        let gone = old.iter().map(|s| s.id).filter(|id| !after.contains_key(id)).collect();
        return (put, gone);
    }
    let (mut put, mut gone) = (Vec::new(), Vec::new());
    let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => break,
            (Some(a), Some(b)) if a.id == b.id => {
                if a != b {
                    put.push(*b);
                }
                o.next();
                n.next();
            }
            (Some(a), Some(b)) if a.id < b.id => gone.extend(o.next().map(|s| s.id)),
            (Some(_), None) => gone.extend(o.next().map(|s| s.id)),
            (_, Some(_)) => put.extend(n.next()),
        }
    }
    (put, gone)
}

impl Catalog {
    /// Stage `v`'s record (without its snapshots), its counter and its running ingest. A volume
    /// whose stored record still carries its snapshots gets every one under its own key here, in
    /// the same batch: call [`Catalog::recorded`] once the commit succeeded.
    pub(crate) fn stage_record(&mut self, v: &Volume) -> Result<()> {
        let json = serde_json::to_vec(v).map_err(|_| CatalogError::Corrupt(v.name.clone()))?;
        self.map.put_meta(&k(K_VOLUME, &v.name), json);
        self.stage_counters(v)?;
        if v.staging.is_none() {
            self.map.remove_meta(&k(K_STAGING, &v.name));
        }
        if self.legacy.contains(&v.name) {
            for s in &v.snapshots {
                self.put_snapshot(&v.name, s)?;
            }
        }
        Ok(())
    }

    /// Stage the head's allocated-block counter and the running ingest of `v`, if any: all a
    /// write batch that moved no root changes.
    pub(crate) fn stage_counters(&mut self, v: &Volume) -> Result<()> {
        self.map.put_meta(&k(K_ALLOCATED, &v.name), v.allocated_blocks.to_le_bytes().to_vec());
        if let Some(s) = &v.staging {
            let json = serde_json::to_vec(s).map_err(|_| CatalogError::Corrupt(v.name.clone()))?;
            self.map.put_meta(&k(K_STAGING, &v.name), json);
        }
        Ok(())
    }

    /// Stage volume `name`'s running ingest or incoming snapshot alone (`replica`'s progress).
    pub(crate) fn put_staging(&mut self, name: &str, s: &crate::Staging) -> Result<()> {
        let json = serde_json::to_vec(s).map_err(|_| CatalogError::Corrupt(name.to_string()))?;
        self.map.put_meta(&k(K_STAGING, name), json);
        Ok(())
    }

    /// Stage the snapshot keys of `v` that differ from the committed copy: new or changed ones
    /// written, gone ones removed. After [`Catalog::stage_record`] in the same batch.
    pub(crate) fn stage_snapshots(&mut self, v: &Volume) -> Result<()> {
        if self.legacy.contains(&v.name) {
            return Ok(()); // stage_record wrote them all
        }
        let committed = self.volumes.get(&v.name).map_or(&[][..], |c| &c.snapshots[..]);
        let (put, gone) = diff(committed, &v.snapshots);
        for id in gone {
            self.map.remove_meta(&snapshot_key(&v.name, id));
        }
        for s in put {
            self.put_snapshot(&v.name, s)?;
        }
        Ok(())
    }

    fn put_snapshot(&mut self, volume: &str, s: &Snapshot) -> Result<()> {
        let json = serde_json::to_vec(s).map_err(|_| CatalogError::Corrupt(format!("{volume}@{}", s.id)))?;
        self.map.put_meta(&snapshot_key(volume, s.id), json);
        Ok(())
    }

    /// A copy of committed volume `name` without its snapshots, for an operation that only
    /// adds snapshots (a snapshot, the end of an ingest): [`Catalog::commit_appending`] commits
    /// it without the O(N) copy, comparison and drop of the whole list that a full copy costs.
    pub(crate) fn shallow(&mut self, name: &str) -> Result<Volume> {
        let v = self.volumes.get_mut(name).ok_or_else(|| CatalogError::UnknownVolume(name.to_string()))?;
        let snapshots = std::mem::take(&mut v.snapshots);
        let copy = v.clone();
        v.snapshots = snapshots;
        Ok(copy)
    }

    /// The copy a staged write works on: without its snapshots, which no write changes
    /// (`commit_staged` puts the committed ones back), unless its stored record still carries
    /// them, so that the commit that rewrites the record writes them all.
    pub(crate) fn write_copy(&mut self, name: &str) -> Result<Volume> {
        if self.legacy.contains(name) {
            return self.volume(name).cloned();
        }
        self.shallow(name)
    }

    /// Commit the map changes `build` makes with `v`, a [`Catalog::shallow`] copy to which it
    /// only adds snapshots, or roll everything back.
    pub(crate) fn commit_appending<T>(
        &mut self,
        mut v: Volume,
        build: impl FnOnce(&mut Self, &mut Volume) -> Result<T>,
    ) -> Result<T> {
        self.commit_with(|cat| {
            let out = build(cat, &mut v)?;
            cat.appending = Some(v);
            Ok((vec![], vec![], out))
        })
    }

    /// Stage the shallow copy being committed: its record and its new snapshots (all of them
    /// if the stored record still carries the old ones). Called by `commit_with`.
    pub(crate) fn stage_appending(&mut self) -> Result<()> {
        let Some(v) = self.appending.take() else { return Ok(()) };
        let result = self.stage_record(&v).and_then(|()| {
            if self.legacy.contains(&v.name) {
                let committed = self.volumes.get(&v.name).map(|c| c.snapshots.clone()).unwrap_or_default();
                committed.iter().try_for_each(|s| self.put_snapshot(&v.name, s))
            } else {
                v.snapshots.iter().try_for_each(|s| self.put_snapshot(&v.name, s))
            }
        });
        self.appending = Some(v);
        result
    }

    /// The shallow copy was committed: it replaces the committed volume, with the committed
    /// snapshots followed by its own. Called by `commit_with`.
    pub(crate) fn apply_appending(&mut self) {
        let Some(mut v) = self.appending.take() else { return };
        if let Some(committed) = self.volumes.get_mut(&v.name) {
            let mut snapshots = std::mem::take(&mut committed.snapshots);
            snapshots.append(&mut v.snapshots);
            v.snapshots = snapshots;
        }
        self.legacy.remove(&v.name);
        self.volumes.insert(v.name.clone(), v);
    }

    /// Stage the removal of volume `name`: its record, counter, ingest and snapshot keys.
    pub(crate) fn stage_removal(&mut self, name: &str) {
        for p in [K_VOLUME, K_ALLOCATED, K_STAGING] {
            self.map.remove_meta(&k(p, name));
        }
        if self.legacy.contains(name) {
            return;
        }
        let ids: Vec<u64> =
            self.volumes.get(name).map(|v| v.snapshots.iter().map(|s| s.id).collect()).unwrap_or_default();
        for id in ids {
            self.map.remove_meta(&snapshot_key(name, id));
        }
    }

    /// The records of `names` were committed (or removed): none carries snapshots any more.
    pub(crate) fn recorded<'a>(&mut self, names: impl IntoIterator<Item = &'a String>) {
        for name in names {
            self.legacy.remove(name);
        }
    }
}

#[cfg(test)]
#[path = "records_tests.rs"]
mod tests;
