//! Putting volumes back as they were before an operation whose hook then failed: a
//! `configure-clone` hook that fails after a clone, rewind or refresh, or a `mask` hook that
//! fails, leaves nothing changed.
//!
//! The operation's own commit already happened (the hook needed the new contents), so undoing
//! is a second atomic commit: each volume's earlier record comes back and the volumes the
//! operation created go. Roots are counted: every root of an earlier record gains a reference
//! before every root of the current one loses its own, so nothing either holds is freed in
//! between, and what only the failed attempt wrote (the hook's writes) is freed.

use crate::{Catalog, CatalogError, Result, Volume};

impl Catalog {
    /// Bring back the records `before` (volumes that existed) and delete `created` (volumes
    /// the operation made), in one commit.
    pub fn restore(&mut self, before: &[Volume], created: &[String]) -> Result<()> {
        let current: Vec<Volume> = before.iter().map(|b| self.volume(&b.name).cloned()).collect::<Result<_>>()?;
        let gone: Vec<Volume> = created.iter().map(|n| self.volume(n).cloned()).collect::<Result<_>>()?;
        for v in &gone {
            let deps: Vec<String> = self
                .volumes
                .values()
                .filter(|c| c.origin.as_ref().is_some_and(|o| o.volume == v.name))
                .map(|c| c.name.clone())
                .collect();
            if !deps.is_empty() {
                return Err(CatalogError::HasDependents { what: v.name.clone(), dependents: deps });
            }
        }
        self.commit_with(|cat| {
            for root in before.iter().flat_map(Volume::roots) {
                cat.map.share(root)?;
            }
            for root in current.iter().chain(&gone).flat_map(Volume::roots) {
                cat.drop_root(root)?;
            }
            Ok((before.to_vec(), created.to_vec(), ()))
        })
    }
}
