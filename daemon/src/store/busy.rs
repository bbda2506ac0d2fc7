//! Names an operation is working on right now, so that two operations on one environment (or
//! on its member volumes) never overlap: the second is refused with a clear error rather than
//! waiting behind the first.
//!
//! An environment operation claims the environment and its member volumes before it resolves
//! anything and holds the claim to its answer. That matters once hooks (long-running scripts)
//! run inside environment operations without the catalog lock held: the claim, not the lock,
//! keeps a second operation out. A claim is all or nothing and released on drop, so an
//! operation that fails or panics leaves nothing stuck. Environments are claimed as `env:NAME`
//! so they never collide with a volume of the same text.

use std::collections::HashSet;
use std::sync::Mutex;

use super::{Store, StoreError};

/// The names claimed right now.
#[derive(Debug, Default)]
pub struct Busy(Mutex<HashSet<String>>);

/// Held by an operation; dropping it releases its names.
#[derive(Debug)]
pub struct BusyGuard<'a> {
    busy: &'a Busy,
    names: Vec<String>,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut set = self.busy.0.lock().unwrap_or_else(|e| e.into_inner());
        for n in &self.names {
            set.remove(n);
        }
    }
}

/// The claim key of environment `name`.
pub fn env_key(name: &str) -> String {
    format!("env:{name}")
}

/// How a claimed name reads in an error.
fn describe(key: &str) -> String {
    match key.strip_prefix("env:") {
        Some(env) => format!("environment `{env}`"),
        None => format!("volume `{key}`"),
    }
}

impl Store {
    /// Claim every name in `names` (environments as [`env_key`]), or none of them: refused
    /// with [`StoreError::Busy`] when another operation holds one.
    pub fn claim_busy(&self, names: &[String]) -> Result<BusyGuard<'_>, StoreError> {
        let mut set = self.busy.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(taken) = names.iter().find(|n| set.contains(*n)) {
            return Err(StoreError::Busy(describe(taken)));
        }
        set.extend(names.iter().cloned());
        Ok(BusyGuard { busy: &self.busy, names: names.to_vec() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_all_or_nothing_and_released_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let a = store.claim_busy(&[env_key("shop"), "shop.db".into()]).expect("first claim");
        let e = store.claim_busy(&["other".into(), env_key("shop")]).expect_err("overlap");
        assert_eq!(e.to_string(), "an operation on environment `shop` is running");
        let e = store.claim_busy(&["shop.db".into()]).expect_err("member");
        assert_eq!(e.to_string(), "an operation on volume `shop.db` is running");
        drop(store.claim_busy(&["other".into()]).expect("`other` was not left claimed"));
        drop(a);
        drop(store.claim_busy(&[env_key("shop")]).expect("released"));
    }
}
