//! Which hook script runs at which event of a volume: the settings `forkd hook set` records.
//!
//! A setting names a script in the daemon's hooks directory (never code, never a path; the
//! daemon checks the file when it is set and again when it runs) and a timeout. Settings live
//! in the volume's (or environment's) record, so they commit, and go, with it. A clone starts
//! with a copy of its parent's settings (an environment clone, of its source environment's) (a `configure-clone` set on a source configures every clone made
//! from it), except `post-ingest` and `mask`, which only a source's own operations fire.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Catalog, CatalogError, Result};

/// Every hook event, in the order PRODUCT.md lists them.
pub const HOOK_EVENTS: &[&str] = &[
    "pre-snapshot",
    "post-snapshot",
    "configure-clone",
    "pre-refresh",
    "post-refresh",
    "pre-rewind",
    "post-rewind",
    "pre-delete",
    "post-ingest",
    "mask",
    "lease-expiring",
];

/// Events a clone does not inherit from its parent.
const NOT_INHERITED: &[&str] = &["post-ingest", "mask"];

/// One hook: the script's name in the hooks directory and its timeout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookSetting {
    /// A file name in the daemon's hooks directory.
    pub script: String,
    /// Seconds before the script is killed with its process group.
    pub timeout_secs: u64,
}

/// The settings a new clone of a volume with `parent` settings starts with.
pub(crate) fn inherited(parent: &BTreeMap<String, HookSetting>) -> BTreeMap<String, HookSetting> {
    parent.iter().filter(|(e, _)| !NOT_INHERITED.contains(&e.as_str())).map(|(e, s)| (e.clone(), s.clone())).collect()
}

/// Refuse a name that is not a hook event.
pub fn check_event(event: &str) -> Result<()> {
    if HOOK_EVENTS.contains(&event) {
        return Ok(());
    }
    Err(CatalogError::UnknownEvent(event.to_string()))
}

impl Catalog {
    /// Set the hook of `event` on `owner`, a volume or an environment (replacing one set
    /// before). The caller has checked the script.
    pub fn set_hook(&mut self, owner: &str, event: &str, setting: HookSetting) -> Result<()> {
        check_event(event)?;
        self.change_hooks(owner, |hooks| {
            hooks.insert(event.to_string(), setting);
            Ok(())
        })
    }

    /// Remove the hook of `event` from `owner`; an error if none was set.
    pub fn unset_hook(&mut self, owner: &str, event: &str) -> Result<()> {
        check_event(event)?;
        self.change_hooks(owner, |hooks| match hooks.remove(event) {
            Some(_) => Ok(()),
            None => Err(CatalogError::NoHook { owner: owner.to_string(), event: event.to_string() }),
        })
    }

    /// Change the hook settings of volume or environment `owner` and commit them.
    fn change_hooks(
        &mut self,
        owner: &str,
        change: impl FnOnce(&mut BTreeMap<String, HookSetting>) -> Result<()>,
    ) -> Result<()> {
        if let Some(env) = self.environments().get(owner) {
            let mut env = env.clone();
            change(&mut env.hooks)?;
            return self.commit_with(|cat| {
                cat.stage_env(owner, Some(env));
                Ok((vec![], vec![], ()))
            });
        }
        let mut v = self.volume(owner)?.clone();
        change(&mut v.hooks)?;
        self.commit_with(|_| Ok((vec![v], vec![], ())))
    }

    /// The hook settings of volume or environment `owner`.
    pub fn hooks_of(&self, owner: &str) -> Result<&BTreeMap<String, HookSetting>> {
        match self.environments().get(owner) {
            Some(env) => Ok(&env.hooks),
            None => Ok(&self.volume(owner)?.hooks),
        }
    }

    /// The hook of `event` on volume or environment `owner`, if one is set.
    pub fn hook(&self, owner: &str, event: &str) -> Option<&HookSetting> {
        self.hooks_of(owner).ok().and_then(|h| h.get(event))
    }
}
