//! Leases of environments: an environment of clones holds one lease in its record, under the
//! rules of `lease.rs`, and is deleted as a whole when it is due (PRODUCT.md, "lease").
//!
//! Its members take no lease of their own, so the policy that bounds the environment's lease is
//! the strictest of its members' governing policies ([`Catalog::lease_policy_of`]): the
//! smallest `max_lease`, and as default the smallest `default_lease` (never longer than that
//! maximum), else that maximum. Errors name the source whose maximum applies. Only an
//! environment whose members are all clones takes a lease: a group of sources is what the
//! clones come from, and a lease would delete the sources.

use crate::lease::{changed, new_lease};
use crate::{Catalog, CatalogError, Environment, Kind, Lease, LeaseChange, LeasePolicy, Result, SnapshotId};

/// The strictest of several `(source, policy)` pairs, named by the source whose maximum (else
/// default) it takes; `None` when none sets anything.
pub(crate) fn strictest(policies: impl IntoIterator<Item = (String, LeasePolicy)>) -> Option<(String, LeasePolicy)> {
    let mut max: Option<(String, u64)> = None;
    let mut default: Option<(String, u64)> = None;
    for (source, p) in policies {
        if let Some(m) = p.max_ms.filter(|m| max.as_ref().is_none_or(|(_, cur)| m < cur)) {
            max = Some((source.clone(), m));
        }
        if let Some(d) = p.default_ms.filter(|d| default.as_ref().is_none_or(|(_, cur)| d < cur)) {
            default = Some((source, d));
        }
    }
    let max_ms = max.as_ref().map(|(_, m)| *m);
    let default_ms = default.as_ref().map(|(_, d)| max_ms.map_or(*d, |m| (*d).min(m)));
    let (source, _) = max.or(default)?;
    Some((source, LeasePolicy { default_ms, max_ms }))
}

impl Catalog {
    /// The policy governing environment `env`'s lease: the strictest of its members'.
    pub fn env_lease_policy(&self, env: &Environment) -> Option<(String, LeasePolicy)> {
        let members = env.members.values().filter_map(|v| self.volumes.get(v));
        strictest(members.filter_map(|v| self.lease_policy_of(v)))
    }

    /// The lease a new environment clone `name` of `from` (`ENV@...`) gets at `now`: as
    /// [`Catalog::lease_for_clone`], under the strictest policy of the snapshots' volumes.
    pub fn lease_for_env_clone(
        &self,
        from: &str,
        name: &str,
        requested_ms: Option<u64>,
        now: i64,
    ) -> Result<Option<Lease>> {
        let point = self.env_resolve(from)?;
        let parents = point.members.values().filter_map(|s: &SnapshotId| self.volumes.get(&s.volume));
        let policy = strictest(parents.filter_map(|v| self.lease_policy_of(v)));
        new_lease(name, requested_ms, policy.as_ref(), now)
    }

    /// Change environment `name`'s lease at `now` and return it (`None` once removed).
    pub fn set_env_lease(&mut self, name: &str, change: LeaseChange, now: i64) -> Result<Option<Lease>> {
        let mut env = self.env_leasable(name)?;
        let policy = self.env_lease_policy(&env);
        env.lease = changed(&env.name, env.lease.take(), change, policy.as_ref(), now)?;
        let out = env.lease.clone();
        self.commit_with(|cat| {
            cat.stage_env(name, Some(env));
            Ok((vec![], vec![], out))
        })
    }

    /// An environment that may hold a lease (every member a clone), to change.
    fn env_leasable(&self, name: &str) -> Result<Environment> {
        let env = self.environment(name)?;
        for (member, volume) in &env.members {
            if self.volume(volume)?.kind != Kind::Clone {
                return Err(CatalogError::BadEnvironment(format!(
                    "environment `{name}` cannot be leased: its member `{member}` is the source `{volume}`; \
                     only an environment of clones (`forkd env clone`) takes a lease"
                )));
            }
        }
        Ok(env.clone())
    }

    /// Record that the `lease-expiring` hook ran for environment `name`'s expiry `at` (nothing
    /// changes if the lease changed meanwhile, or the environment went).
    pub fn mark_env_lease_warned(&mut self, name: &str, at: i64) -> Result<()> {
        let Some(mut env) = self.environments.get(name).cloned() else { return Ok(()) };
        if !crate::lease::mark_warned(&mut env.lease, at) {
            return Ok(());
        }
        self.commit_with(|cat| {
            cat.stage_env(name, Some(env));
            Ok((vec![], vec![], ()))
        })
    }

    /// Every environment's lease, by environment name.
    pub fn env_leases(&self) -> Vec<(String, Lease)> {
        self.environments.values().filter_map(|e| Some((e.name.clone(), e.lease.clone()?))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::open;
    use crate::IngestSummary;
    use std::collections::BTreeMap;

    const H: u64 = 3_600_000;
    const T0: i64 = 1_800_000_000_000;

    fn policy(default: Option<u64>, max: Option<u64>) -> LeasePolicy {
        LeasePolicy { default_ms: default.map(|h| h * H), max_ms: max.map(|h| h * H) }
    }

    #[test]
    fn the_strictest_policy_wins() {
        let p = |s: &str, d, m| (s.to_string(), policy(d, m));
        assert_eq!(strictest([]), None);
        assert_eq!(strictest([p("a", Some(72), Some(100)), p("b", None, Some(50))]), Some(p("b", Some(50), Some(50))));
        assert_eq!(strictest([p("a", Some(72), None), p("b", Some(24), Some(700))]), Some(p("b", Some(24), Some(700))));
        assert_eq!(strictest([p("a", Some(72), None), p("b", Some(96), None)]), Some(p("a", Some(72), None)));
        assert_eq!(strictest([p("a", None, Some(10)), p("b", None, Some(20))]), Some(p("a", None, Some(10))));
    }

    /// Sources `db` and `app` with policies, one snapshot each, grouped as `shop`.
    fn shop(dir: &std::path::Path, db: LeasePolicy, app: LeasePolicy) -> Catalog {
        let mut cat = open(dir);
        for (name, p) in [("db", db), ("app", app)] {
            cat.create_source(name, 1 << 20).unwrap();
            cat.begin_ingest(name).unwrap();
            cat.finish_ingest(name, IngestSummary::default()).unwrap();
            cat.set_lease_policy(name, p).unwrap();
        }
        let members = BTreeMap::from([("db".to_string(), "db".to_string()), ("app".to_string(), "app".to_string())]);
        cat.env_create("shop", &members).unwrap();
        cat
    }

    #[test]
    fn environment_clones_take_the_strictest_members_policy() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = shop(dir.path(), policy(Some(72), Some(100)), policy(None, Some(50)));
        let lease = cat.lease_for_env_clone("shop@latest", "qa", None, T0).unwrap().unwrap();
        assert_eq!(lease.expires_at, Some(T0 + 50 * 3_600_000), "app's max is the smaller, and caps db's default");
        let e = cat.lease_for_env_clone("shop", "qa", Some(51 * H), T0).unwrap_err();
        assert!(e.to_string().contains("max_lease=50h of `app`"), "{e}");
        let (env, _) = cat.env_clone_leased("shop@latest", "qa", Some(lease)).unwrap();
        assert!(env.lease.is_some());
        assert!(matches!(cat.set_env_lease("qa", LeaseChange::None, T0), Err(CatalogError::LeaseRequired { .. })));
        assert!(matches!(cat.set_env_lease("qa", LeaseChange::Expires(T0), T0), Err(CatalogError::LeaseInPast { .. })));
        assert!(matches!(cat.set_env_lease("qa", LeaseChange::Extend(H), T0), Err(CatalogError::LeaseTooLong { .. })));
        let l = cat.set_env_lease("qa", LeaseChange::Idle(2 * H), T0).unwrap().unwrap();
        assert_eq!((l.idle_ms, l.expires_at), (Some(2 * H), Some(T0 + 50 * 3_600_000)));
        cat.mark_env_lease_warned("qa", T0 + 50 * 3_600_000).unwrap();
        assert_eq!(cat.env_leases().len(), 1);
        assert!(cat.env_leases()[0].1.warned);
        // The members take none of their own, and the environment of sources none at all.
        assert!(matches!(cat.set_lease("qa.db", LeaseChange::Idle(H), T0), Err(CatalogError::InEnvironment { .. })));
        let e = cat.set_env_lease("shop", LeaseChange::Idle(H), T0).unwrap_err();
        assert!(e.to_string().contains("only an environment of clones"), "{e}");
        drop(cat);
        let mut cat = open(dir.path());
        assert_eq!(cat.environment("qa").unwrap().lease.as_ref().and_then(|l| l.idle_ms), Some(2 * H));
        cat.set_lease_policy("app", LeasePolicy::default()).unwrap();
        cat.set_lease_policy("db", LeasePolicy::default()).unwrap();
        assert_eq!(cat.set_env_lease("qa", LeaseChange::None, T0).unwrap(), None);
        assert!(cat.env_leases().is_empty());
    }

    #[test]
    fn without_policies_an_environment_clone_has_no_lease_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let cat = shop(dir.path(), LeasePolicy::default(), LeasePolicy::default());
        assert_eq!(cat.lease_for_env_clone("shop", "qa", None, T0).unwrap(), None);
        let l = cat.lease_for_env_clone("shop", "qa", Some(72 * H), T0).unwrap().unwrap();
        assert_eq!(l.expires_at, Some(T0 + 72 * 3_600_000));
    }
}
