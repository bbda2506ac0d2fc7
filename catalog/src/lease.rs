//! Leases: a clone's expiry time and idle timeout, and the per-source policy that gives new
//! clones a default lease and bounds every lease (PRODUCT.md, "lease").
//!
//! A [`Lease`] lives in its clone's record (only clones have one) and a [`LeasePolicy`] in its
//! source's, so both commit, and go, with their volume. Nothing here reads a clock: every
//! operation is given "now" (unix milliseconds) by the daemon, whose clock tests can set. The
//! daemon's reaper asks [`Lease::due`] and [`Lease::warn_due`] at each tick and deletes what is
//! due through its ordinary delete; this module only decides.
//!
//! Rules: a lease ending at or before now is refused; a clone whose source (the nearest volume
//! up its origin chain with a policy) has `max_lease` may not hold a longer lease and may not
//! drop its lease; a new clone gets `default_lease`, else `max_lease`, unless it asks for its
//! own. A policy set later changes no existing lease. Environment members take no lease: the
//! environment is deleted as a whole, so an environment of clones holds one lease, in its
//! record, under the same rules (`env_lease.rs`).

use serde::{Deserialize, Serialize};

use crate::{Catalog, CatalogError, Kind, Reference, Result, Volume};

/// A clone's lease. Times are unix milliseconds by the daemon's clock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// When the clone expires; `None`: no fixed expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// The clone expires after this long with no connection and no I/O; `None`: never idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
    /// When the idle timeout was set: idleness is counted from no earlier than this.
    #[serde(default)]
    pub set_at: i64,
    /// The `lease-expiring` hook ran for the current `expires_at`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warned: bool,
}

/// Why a lease is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Its expiry time has come.
    Time,
    /// No connection and no I/O for its idle timeout.
    Idle,
}

impl Expiry {
    /// `expired` or `idle`, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Expiry::Time => "expired",
            Expiry::Idle => "idle",
        }
    }
}

impl Lease {
    /// True when it neither expires nor idles.
    pub fn is_empty(&self) -> bool {
        self.expires_at.is_none() && self.idle_ms.is_none()
    }

    /// Whether it is due at `now`: its time came, or (`connected` false) nothing was active on
    /// the clone since `last_active` (or since the timeout was set) for its idle timeout. A
    /// clock that went back makes nothing due until the time comes again.
    pub fn due(&self, now: i64, last_active: Option<i64>, connected: bool) -> Option<Expiry> {
        if self.expires_at.is_some_and(|at| at <= now) {
            return Some(Expiry::Time);
        }
        let since = last_active.unwrap_or(self.set_at).max(self.set_at);
        let idle_for = u64::try_from(now.saturating_sub(since)).unwrap_or(0);
        match self.idle_ms {
            Some(idle) if !connected && idle_for >= idle => Some(Expiry::Idle),
            _ => None,
        }
    }

    /// Whether the `lease-expiring` hook is due: not yet run for this expiry, which is at most
    /// `warning_ms` away and not yet passed.
    pub fn warn_due(&self, now: i64, warning_ms: u64) -> bool {
        let Some(at) = self.expires_at else { return false };
        let left = at.saturating_sub(now);
        !self.warned && left > 0 && u64::try_from(left).is_ok_and(|l| l <= warning_ms)
    }
}

/// A source's lease policy: what new clones get and the longest lease any clone may hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasePolicy {
    /// The lease a new clone gets when it asks for none (`default_lease`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_ms: Option<u64>,
    /// The longest lease, from now, a clone may hold (`max_lease`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<u64>,
}

impl LeasePolicy {
    /// True when it sets nothing.
    pub fn is_empty(&self) -> bool {
        self.default_ms.is_none() && self.max_ms.is_none()
    }
}

/// A change to a clone's lease (`forkd lease CLONE ...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseChange {
    /// Move the expiry this much later (from now if it has none or it passed).
    Extend(u64),
    /// Expire at this time.
    Expires(i64),
    /// Set the idle timeout.
    Idle(u64),
    /// Remove the lease.
    None,
}

/// A span in milliseconds as the largest whole unit: `72h`, `30d`, `90m`, `45s`, `500ms`.
pub fn format_span(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1000, "s")];
    match UNITS.iter().find(|(unit, _)| ms >= *unit && ms.is_multiple_of(*unit)) {
        Some((unit, name)) => format!("{}{name}", ms / unit),
        None => format!("{ms}ms"),
    }
}

/// Mark `lease` warned for its expiry `at`; false (nothing changed) when the lease changed
/// meanwhile or was warned already.
pub(crate) fn mark_warned(lease: &mut Option<Lease>, at: i64) -> bool {
    match lease {
        Some(l) if l.expires_at == Some(at) && !l.warned => {
            l.warned = true;
            true
        }
        _ => false,
    }
}

fn add_ms(at: i64, ms: u64) -> i64 {
    at.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))
}

impl Catalog {
    /// The policy that governs `v`'s leases: the nearest volume up its origin chain (itself
    /// first) with one, and that volume's name.
    pub fn lease_policy_of(&self, v: &Volume) -> Option<(String, LeasePolicy)> {
        let mut cur = v;
        for _ in 0..=self.volumes.len() {
            if let Some(p) = cur.lease_policy {
                return Some((cur.name.clone(), p));
            }
            cur = self.volumes.get(&cur.origin.as_ref()?.volume)?;
        }
        None
    }

    /// The lease a new clone `name` of `from` gets at `now`: `requested_ms` from now, else the
    /// policy's default, else its maximum; refused beyond the maximum.
    pub fn lease_for_clone(
        &self,
        from: &str,
        name: &str,
        requested_ms: Option<u64>,
        now: i64,
    ) -> Result<Option<Lease>> {
        let parent = self.volume(&Reference::parse(from)?.volume)?;
        new_lease(name, requested_ms, self.lease_policy_of(parent).as_ref(), now)
    }

    /// Change `clone`'s lease at `now` and return it (`None` once removed).
    pub fn set_lease(&mut self, clone: &str, change: LeaseChange, now: i64) -> Result<Option<Lease>> {
        let mut v = self.leasable(clone)?;
        let policy = self.lease_policy_of(&v);
        v.lease = changed(&v.name, v.lease.take(), change, policy.as_ref(), now)?;
        let out = v.lease.clone();
        self.commit_with(|_| Ok((vec![v], vec![], out)))
    }

    /// A clone that may hold a lease (not a source, not an environment member), to change.
    fn leasable(&self, clone: &str) -> Result<Volume> {
        let v = self.volume(clone)?;
        if v.kind != Kind::Clone {
            return Err(CatalogError::NotAClone(v.name.clone(), "leased"));
        }
        if let Some(env) = self.environment_of(clone) {
            return Err(CatalogError::InEnvironment {
                volume: v.name.clone(),
                environment: env.name.clone(),
                hint: ": an environment's members take no lease of their own; lease the environment",
            });
        }
        Ok(v.clone())
    }

    /// Record that the `lease-expiring` hook ran for `clone`'s expiry `at` (nothing changes if
    /// the lease changed meanwhile, or the clone went).
    pub fn mark_lease_warned(&mut self, clone: &str, at: i64) -> Result<()> {
        let Some(mut v) = self.volumes.get(clone).cloned() else { return Ok(()) };
        if !mark_warned(&mut v.lease, at) {
            return Ok(());
        }
        self.commit_with(|_| Ok((vec![v], vec![], ())))
    }

    /// Every clone's lease, by clone name.
    pub fn leases(&self) -> Vec<(String, Lease)> {
        self.volumes.values().filter_map(|v| Some((v.name.clone(), v.lease.clone()?))).collect()
    }

    /// Clones whose expiry time has come at `now` (idle timeouts need the daemon's view of
    /// connections: see [`Lease::due`]).
    pub fn leases_due(&self, now: i64) -> Vec<String> {
        self.leases().into_iter().filter(|(_, l)| l.due(now, None, true).is_some()).map(|(n, _)| n).collect()
    }

    /// Set a source's lease policy (an empty one removes it); a default longer than the
    /// maximum is refused.
    pub fn set_lease_policy(&mut self, source: &str, policy: LeasePolicy) -> Result<()> {
        let mut v = self.volume(source)?.clone();
        if v.kind != Kind::Source {
            return Err(CatalogError::NotASource(v.name));
        }
        if let (Some(d), Some(m)) = (policy.default_ms, policy.max_ms) {
            if d > m {
                return Err(CatalogError::BadLeasePolicy(format!(
                    "default_lease={} is longer than max_lease={}",
                    format_span(d),
                    format_span(m)
                )));
            }
        }
        v.lease_policy = (!policy.is_empty()).then_some(policy);
        self.commit_with(|_| Ok((vec![v], vec![], ())))
    }
}

/// The lease a new clone (or environment clone) `name` gets at `now` under `policy`:
/// `requested_ms` from now, else the policy's default, else its maximum; refused beyond the
/// maximum.
pub(crate) fn new_lease(
    name: &str,
    requested_ms: Option<u64>,
    policy: Option<&(String, LeasePolicy)>,
    now: i64,
) -> Result<Option<Lease>> {
    let p = policy.map(|(_, p)| *p).unwrap_or_default();
    let Some(ms) = requested_ms.or(p.default_ms).or(p.max_ms) else { return Ok(None) };
    let lease = Lease { expires_at: Some(add_ms(now, ms)), set_at: now, ..Lease::default() };
    check_max(name, &lease, policy, now)?;
    Ok(Some(lease))
}

/// `name`'s lease (`None`: it has none) after `change` at `now`, under `policy` (the name of
/// the source it comes from, and the policy).
pub(crate) fn changed(
    name: &str,
    lease: Option<Lease>,
    change: LeaseChange,
    policy: Option<&(String, LeasePolicy)>,
    now: i64,
) -> Result<Option<Lease>> {
    let mut lease = lease.unwrap_or(Lease { set_at: now, ..Lease::default() });
    match change {
        LeaseChange::Extend(ms) => {
            let from = lease.expires_at.filter(|&at| at > now).unwrap_or(now);
            lease.expires_at = Some(add_ms(from, ms));
            lease.warned = false;
        }
        LeaseChange::Expires(at) if at <= now => {
            return Err(CatalogError::LeaseInPast { clone: name.to_string(), at: crate::format_time(at) })
        }
        LeaseChange::Expires(at) => {
            lease.expires_at = Some(at);
            lease.warned = false;
        }
        LeaseChange::Idle(ms) => {
            lease.idle_ms = Some(ms);
            lease.set_at = now;
        }
        LeaseChange::None => {
            if let Some((source, LeasePolicy { max_ms: Some(max), .. })) = policy {
                return Err(CatalogError::LeaseRequired {
                    clone: name.to_string(),
                    policy_source: source.clone(),
                    max: format_span(*max),
                });
            }
            lease = Lease::default();
        }
    }
    check_max(name, &lease, policy, now)?;
    Ok((!lease.is_empty()).then_some(lease))
}

/// Refuse `lease` when it ends more than the policy's maximum after `now`.
fn check_max(clone: &str, lease: &Lease, policy: Option<&(String, LeasePolicy)>, now: i64) -> Result<()> {
    let (Some((source, LeasePolicy { max_ms: Some(max), .. })), Some(at)) = (policy, lease.expires_at) else {
        return Ok(());
    };
    let asked = u64::try_from(at.saturating_sub(now)).unwrap_or(0);
    if asked > *max {
        return Err(CatalogError::LeaseTooLong {
            clone: clone.to_string(),
            asked: format_span(asked),
            policy_source: source.clone(),
            max: format_span(*max),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::open;
    use crate::IngestSummary;

    const H: u64 = 3_600_000;
    const T0: i64 = 1_800_000_000_000;

    fn setup(dir: &std::path::Path) -> Catalog {
        let mut cat = open(dir);
        cat.create_source("db", 1 << 20).unwrap();
        cat.begin_ingest("db").unwrap();
        cat.finish_ingest("db", IngestSummary::default()).unwrap();
        cat
    }

    #[test]
    fn due_and_warnings() {
        let l = Lease { expires_at: Some(T0 + 10), idle_ms: Some(100), set_at: T0, warned: false };
        assert_eq!(l.due(T0 + 9, None, false), None);
        assert_eq!(l.due(T0 + 10, None, true), Some(Expiry::Time));
        let idle = Lease { expires_at: None, ..l.clone() };
        assert_eq!(idle.due(T0 + 100, None, false), Some(Expiry::Idle));
        assert_eq!(idle.due(T0 + 100, None, true), None, "a connected clone is not idle");
        assert_eq!(idle.due(T0 + 100, Some(T0 + 50), false), None);
        assert_eq!(idle.due(T0 - 1000, None, false), None, "a clock that went back");
        assert!(l.warn_due(T0 + 5, 5) && !l.warn_due(T0 + 4, 5) && !l.warn_due(T0 + 10, 5));
        assert!(!Lease { warned: true, ..l }.warn_due(T0 + 5, 5));
        assert_eq!(
            (format_span(72 * H), format_span(30 * 24 * H), format_span(1500)),
            ("3d".into(), "30d".into(), "1500ms".into())
        );
    }

    #[test]
    fn policy_defaults_maximum_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = setup(dir.path());
        let policy = LeasePolicy { default_ms: Some(72 * H), max_ms: Some(100 * H) };
        assert!(matches!(
            cat.set_lease_policy("db", LeasePolicy { default_ms: Some(2 * H), max_ms: Some(H) }),
            Err(CatalogError::BadLeasePolicy(_))
        ));
        cat.set_lease_policy("db", policy).unwrap();
        let lease = cat.lease_for_clone("db@1", "dev", None, T0).unwrap().unwrap();
        assert_eq!(lease.expires_at, Some(T0 + 72 * 3_600_000));
        let (_, _) = cat.clone_volume_leased("db@1", "dev", Some(lease), None).unwrap();
        assert!(matches!(
            cat.lease_for_clone("dev", "dev2", Some(101 * H), T0),
            Err(CatalogError::LeaseTooLong { .. })
        ));
        assert!(matches!(cat.set_lease("dev", LeaseChange::None, T0), Err(CatalogError::LeaseRequired { .. })));
        assert!(matches!(
            cat.set_lease("dev", LeaseChange::Extend(30 * H), T0),
            Err(CatalogError::LeaseTooLong { .. })
        ));
        assert!(matches!(cat.set_lease("dev", LeaseChange::Expires(T0), T0), Err(CatalogError::LeaseInPast { .. })));
        assert!(matches!(cat.set_lease("db", LeaseChange::Idle(H), T0), Err(CatalogError::NotAClone(..))));
        let l = cat.set_lease("dev", LeaseChange::Extend(H), T0).unwrap().unwrap();
        assert_eq!(l.expires_at, Some(T0 + 73 * 3_600_000));
        assert_eq!(cat.leases_due(T0 + 73 * 3_600_000), vec!["dev".to_string()]);
        cat.mark_lease_warned("dev", T0 + 73 * 3_600_000).unwrap();
        assert!(cat.volume("dev").unwrap().lease.as_ref().unwrap().warned);
        cat.set_lease_policy("db", LeasePolicy::default()).unwrap();
        assert_eq!(cat.set_lease("dev", LeaseChange::None, T0).unwrap(), None);
        drop(cat);
        let cat = open(dir.path());
        assert!(cat.volume("dev").unwrap().lease.is_none() && cat.volume("db").unwrap().lease_policy.is_none());
    }
}
