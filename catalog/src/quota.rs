//! Quotas: a limit on a clone's unique bytes (PRODUCT.md, "quota"), and the per-source
//! `default_quota` that new clones of a source get.
//!
//! The limit lives in the clone's record (`quota_bytes`), the default in its source's
//! (`default_quota`). The use is the clone's unique blocks as the catalog keeps them for every
//! volume (`unique`): exact across writes, counted again after an operation or a garbage
//! collection step that may have changed it, so the store checks a write against the limit
//! without walking trees (but on the first write after such a change).
//!
//! A quota below current use is allowed: writes that add blocks fail, trims and deletes work.

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

    /// A committed clone's unique bytes and quota; `None` when it has no quota (or does not
    /// exist). Counts the unique bytes when their kept figure is stale (`unique`). Writes
    /// staged and not committed yet are not in it (the store checks a write before staging it).
    pub fn quota_use(&self, volume: &str) -> Result<Option<QuotaUse>> {
        let Ok(v) = self.volume(volume) else { return Ok(None) };
        let Some(limit_bytes) = v.quota_bytes else { return Ok(None) };
        let used_bytes = self.unique_blocks_of(v)?.saturating_mul(BLOCK_SIZE);
        Ok(Some(QuotaUse { used_bytes, limit_bytes }))
    }

    /// Every clone with a quota and its use, by name.
    pub fn quotas(&self) -> Result<Vec<(String, QuotaUse)>> {
        let mut out = Vec::new();
        for name in self.volumes.keys() {
            if let Some(q) = self.quota_use(name)? {
                out.push((name.clone(), q));
            }
        }
        Ok(out)
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

    fn quota(cat: &Catalog, v: &str) -> Option<QuotaUse> {
        cat.quota_use(v).unwrap()
    }

    fn used(cat: &Catalog, v: &str) -> u64 {
        quota(cat, v).unwrap().used_bytes / BLOCK_SIZE
    }

    /// Every kept figure equals a fresh walk (`unique`).
    fn check(cat: &Catalog, _: &str) {
        crate::unique::tests::check_all(cat);
    }

    #[test]
    fn unique_blocks_follow_writes_trims_snapshots_and_deletes() {
        let (_d, mut cat) = catalog();
        cat.create_source("db", 64 * BLOCK_SIZE).unwrap();
        cat.begin_ingest("db").unwrap();
        write_staged(&mut cat, "db", 0, 16);
        cat.finish_ingest("db", crate::IngestSummary::default()).unwrap();
        cat.clone_volume("db@1", "dev").unwrap();
        assert!(quota(&cat, "dev").is_none());
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
        assert!(quota(&cat, "dev").unwrap().admits(10));
        assert!(!quota(&cat, "dev").unwrap().admits(11));
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
        assert!(quota(&cat, "dev").is_none());
        cat.set_default_quota("db", Some(8 * BLOCK_SIZE)).unwrap();
        cat.snapshot("db", None).unwrap();
        cat.clone_volume("db@latest", "ci").unwrap();
        assert_eq!(quota(&cat, "ci"), Some(QuotaUse { used_bytes: 0, limit_bytes: 8 * BLOCK_SIZE }));
        assert!(cat.set_quota("db", Some(1)).is_err(), "sources take no quota");
    }

    fn write_staged(cat: &mut Catalog, volume: &str, first: u64, n: u64) {
        let slots = cat.map_mut().alloc(usize::try_from(n).unwrap()).unwrap();
        let es: Vec<Option<Entry>> = slots.into_iter().map(|slot| Some(Entry { slot, crc: 1, digest: 7 })).collect();
        cat.write(volume, first, &es, true).unwrap();
    }
}
