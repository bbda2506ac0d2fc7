//! Quotas: a limit on a clone's unique bytes (PRODUCT.md, "quota"), and the per-source
//! `default_quota` that new clones of a source get.
//!
//! The limit lives in the clone's record (`quota_bytes`), the default in its source's
//! (`default_quota`). For every clone with a quota the catalog keeps its unique blocks
//! (`Volume::quota_used`, in memory only) so the store can check a write against the limit
//! without walking trees:
//! - a write to the head adds one block per new data block and takes away every slot whose
//!   last reference it dropped (`stage_write`): exact, since a slot that loses its last
//!   reference was the volume's alone, and one that keeps a reference stays as unique as it was;
//! - every other catalog operation can change who shares what (a deleted snapshot, a deleted
//!   relative, a new clone of one of its snapshots, a rewind), so after each commit the figure
//!   is counted afresh ([`Catalog::recount`]) for the quota'd volumes it touched and the
//!   relatives whose sharing it can change: the volume a touched clone came from, and clones
//!   detached from a touched volume (a clone's origin snapshot outlives it, so what is done to
//!   its origin volume leaves it alone). The walk costs what those volumes hold alone, not
//!   their size. It is also counted at open.
//!
//! A quota below current use is allowed: writes that add blocks fail, trims and deletes work.

use std::collections::BTreeSet;

use crate::{Catalog, CatalogError, Kind, Result, Volume, BLOCK_SIZE};

/// A clone's unique bytes next to its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaUse {
    /// What the clone holds alone, in bytes.
    pub used_bytes: u64,
    /// Its quota, in bytes.
    pub limit_bytes: u64,
}

impl QuotaUse {
    /// Whether adding `blocks` more unique blocks stays within the limit.
    pub fn admits(&self, blocks: u64) -> bool {
        blocks == 0 || self.used_bytes.saturating_add(blocks.saturating_mul(BLOCK_SIZE)) <= self.limit_bytes
    }
}

impl QuotaUse {
    /// Refuse a write to `volume` that adds `blocks` unique blocks when that passes the limit.
    pub fn check(&self, volume: &str, blocks: u64) -> Result<()> {
        if self.admits(blocks) {
            return Ok(());
        }
        Err(CatalogError::QuotaExceeded {
            volume: volume.to_string(),
            used: self.used_bytes,
            limit: self.limit_bytes,
            needed: blocks.saturating_mul(BLOCK_SIZE),
        })
    }
}

impl Catalog {
    /// Set (or with `None` remove) a clone's quota on its unique bytes.
    pub fn set_quota(&mut self, clone: &str, quota_bytes: Option<u64>) -> Result<()> {
        let mut v = self.volume(clone)?.clone();
        if v.kind != Kind::Clone {
            return Err(CatalogError::NotAClone(v.name, "given a quota"));
        }
        v.quota_bytes = quota_bytes;
        self.commit_with(|_| Ok((vec![v], vec![], ())))
    }

    /// Set (or with `None` remove) the quota new clones of `source` get.
    pub fn set_default_quota(&mut self, source: &str, quota_bytes: Option<u64>) -> Result<()> {
        let mut v = self.volume(source)?.clone();
        if v.kind != Kind::Source {
            return Err(CatalogError::NotASource(v.name));
        }
        v.default_quota = quota_bytes;
        self.commit_with(|_| Ok((vec![v], vec![], ())))
    }

    /// The quota a new clone of `parent` gets: the nearest `default_quota` up its origin chain.
    pub(crate) fn default_quota_for(&self, parent: &Volume) -> Option<u64> {
        let mut cur = parent;
        for _ in 0..=self.volumes.len() {
            if cur.default_quota.is_some() {
                return cur.default_quota;
            }
            cur = self.volumes.get(&cur.origin.as_ref()?.volume)?;
        }
        None
    }

    /// A clone's unique bytes and quota; `None` when it has no quota (or does not exist).
    pub fn quota_use(&self, volume: &str) -> Option<QuotaUse> {
        let v = self.staged_volume(volume).ok()?;
        Some(QuotaUse { used_bytes: v.quota_used?.saturating_mul(BLOCK_SIZE), limit_bytes: v.quota_bytes? })
    }

    /// Every clone with a quota and its use, by name.
    pub fn quotas(&self) -> Vec<(String, QuotaUse)> {
        self.volumes.keys().filter_map(|n| Some((n.clone(), self.quota_use(n)?))).collect()
    }

    /// Count afresh the unique blocks of the quota'd volumes among `names`, the volumes their
    /// clones come from (a new clone or a moved head changes what those share), the clones
    /// detached from them, and `gone` (the origins of volumes just removed); forget the figure
    /// of volumes without a quota.
    pub(crate) fn recount(&mut self, names: &BTreeSet<String>, gone: &BTreeSet<String>) -> Result<()> {
        // A clone's origin snapshot outlives it, so nothing done to its origin volume changes
        // what the clone holds alone; only the snapshot a detached clone came from can go.
        let near = |v: &Volume| {
            names.contains(&v.name)
                || gone.contains(&v.name)
                || v.detached_from.as_ref().is_some_and(|o| names.contains(&o.volume))
        };
        let parents: BTreeSet<String> = names
            .iter()
            .filter_map(|n| self.volumes.get(n))
            .flat_map(|v| [&v.origin, &v.detached_from].into_iter().flatten().map(|o| o.volume.clone()))
            .collect();
        let todo: Vec<String> = self
            .volumes
            .values()
            .filter(|v| v.quota_bytes.is_some() != v.quota_used.is_some() || near(v) || parents.contains(&v.name))
            .map(|v| v.name.clone())
            .collect();
        for name in todo {
            let Some(v) = self.volumes.get(&name) else { continue };
            let used = match v.quota_bytes {
                Some(_) => Some(self.map.unique_blocks(&v.roots())?),
                None => None,
            };
            if let Some(v) = self.volumes.get_mut(&name) {
                v.quota_used = used;
            }
        }
        Ok(())
    }

    /// Keep a quota'd volume's unique blocks across a write to its head: `added` new data
    /// blocks, `freed` slots whose last reference went.
    pub(crate) fn count_write(v: &mut Volume, added: u64, freed: u64) {
        if let Some(used) = &mut v.quota_used {
            *used = used.saturating_add(added).saturating_sub(freed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Entry;

    fn catalog() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let cat = crate::tests::open(dir.path());
        (dir, cat)
    }

    fn write(cat: &mut Catalog, volume: &str, first: u64, n: u64) {
        let slots = cat.map_mut().alloc(usize::try_from(n).unwrap()).unwrap();
        let es: Vec<Option<Entry>> = slots.into_iter().map(|slot| Some(Entry { slot, crc: 1, digest: 0 })).collect();
        cat.write(volume, first, &es, false).unwrap();
    }

    fn used(cat: &Catalog, v: &str) -> u64 {
        cat.quota_use(v).unwrap().used_bytes / BLOCK_SIZE
    }

    /// The kept figure always equals a fresh walk.
    fn check(cat: &Catalog, v: &str) {
        let truth = cat.unique_bytes(&cat.volume(v).unwrap().roots()).unwrap() / BLOCK_SIZE;
        assert_eq!(used(cat, v), truth, "{v}: kept figure against a walk");
    }

    #[test]
    fn unique_blocks_follow_writes_trims_snapshots_and_deletes() {
        let (_d, mut cat) = catalog();
        cat.create_source("db", 64 * BLOCK_SIZE).unwrap();
        cat.begin_ingest("db").unwrap();
        write_staged(&mut cat, "db", 0, 16);
        cat.finish_ingest("db", crate::IngestSummary::default()).unwrap();
        cat.clone_volume("db@1", "dev").unwrap();
        assert!(cat.quota_use("dev").is_none());
        cat.set_quota("dev", Some(10 * BLOCK_SIZE)).unwrap();
        assert_eq!(used(&cat, "dev"), 0, "a new clone shares everything");
        write(&mut cat, "dev", 0, 4);
        check(&cat, "dev");
        assert_eq!(used(&cat, "dev"), 4);
        write(&mut cat, "dev", 2, 4); // two overwrite its own blocks, two are new
        assert_eq!(used(&cat, "dev"), 6);
        cat.snapshot("dev", None).unwrap();
        write(&mut cat, "dev", 0, 2); // the snapshot keeps the old ones: both count
        assert_eq!(used(&cat, "dev"), 8);
        check(&cat, "dev");
        cat.zero("dev", 0, 6, false).unwrap(); // frees only what the snapshot does not hold
        check(&cat, "dev");
        assert_eq!(used(&cat, "dev"), 6);
        cat.delete("dev@1").unwrap();
        check(&cat, "dev");
        assert_eq!(used(&cat, "dev"), 0);
        assert!(cat.quota_use("dev").unwrap().admits(10));
        assert!(!cat.quota_use("dev").unwrap().admits(11));
    }

    #[test]
    fn relatives_are_counted_again_when_sharing_changes() {
        let (_d, mut cat) = catalog();
        cat.create_source("db", 64 * BLOCK_SIZE).unwrap();
        cat.begin_ingest("db").unwrap();
        write_staged(&mut cat, "db", 0, 8);
        cat.finish_ingest("db", crate::IngestSummary::default()).unwrap();
        cat.clone_volume("db@1", "dev").unwrap();
        cat.set_quota("dev", Some(64 * BLOCK_SIZE)).unwrap();
        write(&mut cat, "dev", 10, 5);
        // The source moving on and pruning leaves dev's figure alone (and right).
        cat.begin_ingest("db").unwrap();
        write_staged(&mut cat, "db", 0, 2);
        cat.finish_ingest("db", crate::IngestSummary::default()).unwrap();
        cat.snapshot("db", None).unwrap();
        cat.delete("db@2").unwrap();
        check(&cat, "dev");
        assert_eq!(used(&cat, "dev"), 5);
        // A clone of dev's snapshot shares dev's blocks: dev holds none of them alone.
        cat.clone_volume("dev", "qa").unwrap();
        check(&cat, "dev");
        assert_eq!(used(&cat, "dev"), 0);
        // Deleting it makes them dev's alone again (its snapshot still holds them).
        cat.delete("qa").unwrap();
        check(&cat, "dev");
        assert_eq!(used(&cat, "dev"), 5);
        // The source moves on; detach dev and delete its origin: the origin's blocks that
        // the source no longer holds become dev's alone.
        cat.begin_ingest("db").unwrap();
        write_staged(&mut cat, "db", 0, 8);
        cat.finish_ingest("db", crate::IngestSummary::default()).unwrap();
        cat.detach("dev").unwrap();
        cat.delete("db@3").unwrap();
        check(&cat, "dev");
        cat.delete("db@1").unwrap();
        check(&cat, "dev");
        assert_eq!(used(&cat, "dev"), 13);
        // Removing the quota forgets the figure; a default quota reaches new clones.
        cat.set_quota("dev", None).unwrap();
        assert!(cat.quota_use("dev").is_none());
        cat.set_default_quota("db", Some(8 * BLOCK_SIZE)).unwrap();
        cat.snapshot("db", None).unwrap();
        cat.clone_volume("db@latest", "ci").unwrap();
        assert_eq!(cat.quota_use("ci"), Some(QuotaUse { used_bytes: 0, limit_bytes: 8 * BLOCK_SIZE }));
        assert!(cat.set_quota("db", Some(1)).is_err(), "sources take no quota");
    }

    fn write_staged(cat: &mut Catalog, volume: &str, first: u64, n: u64) {
        let slots = cat.map_mut().alloc(usize::try_from(n).unwrap()).unwrap();
        let es: Vec<Option<Entry>> = slots.into_iter().map(|slot| Some(Entry { slot, crc: 1, digest: 7 })).collect();
        cat.write(volume, first, &es, true).unwrap();
    }
}
