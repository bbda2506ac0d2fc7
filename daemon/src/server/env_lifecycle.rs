//! What an operation on an environment does around its one catalog step (PRODUCT.md,
//! "environment", "Hook events"), for the API's handlers and the scheduler alike; the
//! counterpart of [`crate::server::lifecycle`] for volumes.
//!
//! Every operation that changes something is the same short sequence: claim the environment
//! and its member volumes ([`Store::claim_busy`]: a second operation on them is refused with
//! 409 until the first ended), run the environment's `pre-*` hook, fence and drain the member
//! exports it switches (rewind, refresh, delete), run ONE catalog operation (all members in one
//! transaction), run `configure-clone` (clone, rewind, refresh: the members open to the hook
//! alone; a failure undoes the operation) and `post-*`.
//!
//! - snapshot: `pre-snapshot`, `ENV@N`, `post-snapshot`, then each member's retention.
//! - clone: the new members (gated), `configure-clone`; on failure the new environment goes.
//! - rewind and refresh: `pre-*`, fence and switch (gated), `configure-clone` (on failure every
//!   member's record before the switch comes back), `post-*`.
//! - delete: `pre-delete`, fence (unless the volumes are kept), delete; also what an
//!   environment's lease does when it is due ([`crate::server::leases`]).
//!
//! Hooks run under the claim, never under the catalog lock. Every function runs on a blocking
//! thread.

use catalog::{Catalog, CatalogError, EnvPoint, Environment, MemberMove};

use crate::server::events::{Events, Facts, Member};
use crate::server::http::ApiError;
use crate::server::lifecycle::{self, Move, DRAIN};
use crate::store::busy::{env_key, BusyGuard};
use crate::store::exports::{Fence, HookGate, Scope};
use crate::store::{Store, StoreError};

type Result<T> = std::result::Result<T, ApiError>;

/// Claim environment `env` and its member volumes. Returns the claim and the member volumes.
fn claim<'a>(st: &'a Store, env: &str) -> std::result::Result<(BusyGuard<'a>, Vec<String>), StoreError> {
    let volumes: Vec<String> = st.catalog().environment(env)?.members.values().cloned().collect();
    let mut keys = vec![env_key(env)];
    keys.extend(volumes.iter().cloned());
    Ok((st.claim_busy(&keys)?, volumes))
}

/// Fence and drain the exports of every volume in `volumes` (all fenced before any switch).
fn fence_all<'a>(st: &'a Store, volumes: &[String], scope: Scope) -> Vec<Fence<'a>> {
    volumes.iter().map(|v| st.exports.fence_and_drain(v, scope, DRAIN)).collect()
}

/// Take `ENV@N` of environment `name` (one snapshot of every member at one instant) between its
/// `pre-snapshot` and `post-snapshot` hooks, then apply each member's retention.
pub fn snapshot(st: &Store, ev: &Events, name: &str, bookmark: Option<&str>) -> Result<EnvPoint> {
    let _claim = claim(st, name)?;
    let mut facts = env_facts(st, name, &[])?;
    ev.fire(st, "pre-snapshot", &facts)?;
    let point = st.op(|cat| cat.env_snapshot(name, bookmark))?;
    facts.snapshot = Some(point.label.clone());
    lifecycle::post(ev, st, "post-snapshot", &facts);
    for member in point.members.values() {
        crate::server::retention::after_snapshot(st, &member.volume);
    }
    Ok(point)
}

/// Clone environment snapshot `from` (`ENV`, `ENV@N`, `ENV@BOOKMARK`, `ENV@TIME`) as the new
/// environment `name`, holding a lease of `lease_ms` from `now` (none: its sources' default, if
/// any) from the same commit, then run `configure-clone` while only the hook can reach the new
/// members; a failing hook removes the new environment again. Refused while the pool is low on
/// space.
pub fn clone(
    st: &Store,
    ev: &Events,
    from: &str,
    name: &str,
    lease_ms: Option<u64>,
    now: i64,
) -> Result<(Environment, EnvPoint)> {
    // The source is only read (in one transaction): clones of one environment may run at once.
    let _claim = st.claim_busy(&[env_key(name)])?;
    st.check_pool("clones")?;
    // Every new member is open to the configure-clone hook alone until it succeeded.
    let members: Vec<String> = st.catalog().env_resolve(from)?.members.into_keys().collect();
    let volumes: Vec<String> = members.iter().map(|m| format!("{name}.{m}")).collect();
    let gates = volumes.iter().map(|v| lifecycle::gate(st, v)).collect::<Result<Vec<_>>>()?;
    let (e, point) = st.op(|cat| {
        let lease = cat.lease_for_env_clone(from, name, lease_ms, now)?;
        cat.env_clone_leased(from, name, lease)
    })?;
    let mut facts = env_facts(st, name, &gates)?;
    (facts.snapshot, facts.origin) = (Some(point.label.clone()), Some(point.label.clone()));
    if let Err(err) = ev.fire(st, "configure-clone", &facts) {
        lifecycle::undo(st, &volumes, |cat| cat.env_delete(name, false).map(drop));
        return Err(err.into());
    }
    Ok((e, point))
}

/// Rewind every member of `name` to its snapshot in environment snapshot `to` (`ENV@N`, a
/// bookmark, a time), as one operation. Returns the target's label and what each member did.
pub fn rewind(st: &Store, ev: &Events, name: &str, to: &str) -> Result<(Option<String>, Vec<MemberMove>)> {
    let step = |cat: &mut Catalog| cat.env_rewind(name, to).map(|(point, moves)| (Some(point.label), moves));
    move_members(st, ev, name, Some(to), Move::Rewind, step)
}

/// Refresh every member of `name` to the newest snapshot of its origin volume, as one operation.
pub fn refresh(st: &Store, ev: &Events, name: &str) -> Result<Vec<MemberMove>> {
    let step = |cat: &mut Catalog| cat.env_refresh(name).map(|moves| (None, moves));
    move_members(st, ev, name, None, Move::Refresh, step).map(|(_, moves)| moves)
}

/// Rewind or refresh every member of `name` as one operation, between the environment's
/// hooks: `pre-*`; fence, switch (members open to hooks alone), `configure-clone` (on failure
/// every member's record before the switch comes back); `post-*`.
fn move_members(
    st: &Store,
    ev: &Events,
    name: &str,
    to: Option<&str>,
    kind: Move,
    step: impl FnOnce(&mut Catalog) -> std::result::Result<(Option<String>, Vec<MemberMove>), CatalogError>,
) -> Result<(Option<String>, Vec<MemberMove>)> {
    let (_claim, volumes) = claim(st, name)?;
    let before: Vec<catalog::Volume> =
        volumes.iter().map(|v| st.catalog().volume(v).cloned()).collect::<std::result::Result<_, CatalogError>>()?;
    let mut facts = env_facts(st, name, &[])?;
    facts.snapshot = to.map(str::to_string);
    ev.fire(st, &format!("pre-{}", kind.name()), &facts)?;
    let gates = volumes.iter().map(|v| lifecycle::gate(st, v)).collect::<Result<Vec<_>>>()?;
    let (target, moves) = {
        let _fences = fence_all(st, &volumes, Scope::Head);
        st.op(step)?
    };
    let mut configure = env_facts(st, name, &gates)?;
    configure.snapshot = target.clone();
    if let Err(e) = ev.fire(st, "configure-clone", &configure) {
        lifecycle::undo(st, &volumes, |cat| cat.restore(&before, &[]));
        return Err(e.into());
    }
    drop(gates);
    facts.snapshot = target.clone();
    lifecycle::post(ev, st, &format!("post-{}", kind.name()), &facts);
    Ok((target, moves))
}

/// Delete environment `name` and, unless `keep_volumes`, its member volumes, after its
/// `pre-delete` hook. Returns the volumes deleted and the bytes that gives back: the sum of
/// their unique bytes just before the delete, which garbage collection frees after the answer.
pub fn delete(st: &Store, ev: &Events, name: &str, keep_volumes: bool) -> Result<(Vec<String>, u64)> {
    let (_claim, volumes) = claim(st, name)?;
    st.catalog().check_env_delete(name, keep_volumes)?;
    ev.fire(st, "pre-delete", &env_facts(st, name, &[])?)?;
    let _fences = if keep_volumes { Vec::new() } else { fence_all(st, &volumes, Scope::Volume) };
    let freed = st.catalog().env_unique_bytes(name, keep_volumes)?;
    let volumes = st.op_freeing(|cat: &mut Catalog| cat.env_delete(name, keep_volumes))?;
    Ok((volumes, freed))
}

/// What environment `name`'s hooks are told outside an operation (the reaper's
/// `lease-expiring`): its members by their own names.
pub fn facts(st: &Store, name: &str) -> std::result::Result<Facts, StoreError> {
    env_facts(st, name, &[])
}

/// What environment `name`'s hooks are told: its members, reached through `gates` where the
/// operation holds them (else by their own names).
fn env_facts(st: &Store, name: &str, gates: &[HookGate<'_>]) -> std::result::Result<Facts, StoreError> {
    let cat = st.catalog();
    let env = cat.environment(name)?;
    let members = env
        .members
        .iter()
        .map(|(m, v)| {
            let gate = gates.iter().find(|g| g.volume() == v);
            Member { name: m.clone(), volume: v.clone(), export: gate.map_or_else(|| v.clone(), |g| g.export.clone()) }
        })
        .collect();
    Ok(Facts { env: Some(name.to_string()), origin: env.origin.clone(), members, ..Facts::default() })
}
