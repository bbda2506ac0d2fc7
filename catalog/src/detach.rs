//! Detach: cutting a clone loose from its origin snapshot (PRODUCT.md, "detach").
//!
//! Constant time and nothing copied: a clone's head and snapshots already hold their own
//! references on every tree node they share with the origin (see the `blockmap` crate), so
//! the origin snapshot, and its whole volume, can then be deleted or expire while the clone
//! reads the same bytes; shared blocks stay shared until the last reference goes. Only the
//! record changes: `origin` becomes `None` and `detached_from` remembers where it came from.
//! A detached clone has no lineage above itself, so rewinds reach only its own snapshots and
//! a refresh is refused with the reason.
//!
//! Masked data stays fail-closed: a masked volume is not detached (its origin is what it
//! masks), a clone holding unmasked data of a `clone_from = "masked"` source is not detached
//! (`downstream` would stop seeing where its data came from), and the policy check follows
//! `detached_from` for clones detached before the policy was set.

use crate::{Catalog, CatalogError, Kind, Result, SnapshotId, Volume};

impl Catalog {
    /// Detach clone `clone` from its origin (see the module documentation). Returns its
    /// record, with `origin` `None` and `detached_from` set.
    pub fn detach(&mut self, clone: &str) -> Result<Volume> {
        let mut v = self.volume(clone)?.clone();
        if v.kind != Kind::Clone {
            return Err(CatalogError::NotAClone(v.name, "detached"));
        }
        Self::not_masked(&v, "detached")?;
        if v.origin.is_none() {
            return Err(Self::detached_error(&v, "it has no origin to detach from"));
        }
        self.downstream(&v.name)?;
        v.detached_from = v.origin.take();
        self.commit_with(|_| Ok((vec![v.clone()], vec![], v)))
    }

    /// The origin a refresh of clone `v` starts from; a clear error for a source or a
    /// detached clone.
    pub(crate) fn refresh_origin(v: &Volume) -> Result<SnapshotId> {
        match (&v.kind, &v.origin) {
            (Kind::Clone, Some(o)) => Ok(o.clone()),
            (Kind::Clone, None) => Err(Self::detached_error(v, "it has no origin to refresh from")),
            _ => Err(CatalogError::NotAClone(v.name.clone(), "refreshed")),
        }
    }

    fn detached_error(v: &Volume, why: &'static str) -> CatalogError {
        let from = v.detached_from.as_ref().map_or_else(|| "its origin".to_string(), ToString::to_string);
        CatalogError::Detached { clone: v.name.clone(), from, why }
    }
}
