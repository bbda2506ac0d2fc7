//! `forkd mask`: turning a snapshot into one that may flow downstream (PRODUCT.md, "masking").
//!
//! In order: the script is checked; the masked volume is opened to the hook alone (a
//! capability export name, see `store::exports`); the snapshot's data is put into the masked
//! volume (created on first use); the `mask` hook runs against it; every connection it left is
//! closed; and only if it exited 0 in time is the masked volume snapshotted and that snapshot
//! marked masked, with the source snapshot, the script's name and the SHA-256 of the script as
//! it was just before the run. A hook that fails, times out or is killed leaves no masked
//! snapshot: the masked volume is put back as it was (or removed, if this run created it), so
//! nothing downstream changes. The head of a masked volume is never served to hosts.

use std::time::Duration;

use axum::http::StatusCode;
use catalog::MaskRecord;

use crate::api::hooks::{MaskAnswer, MaskRequest};
use crate::server::events::{Events, Facts};
use crate::server::hooks::DEFAULT_TIMEOUT;
use crate::server::http::ApiError;
use crate::server::lifecycle::{gate, undo, DRAIN};
use crate::store::exports::{HookGate, Scope};
use crate::store::Store;

/// Run one masking (see the module documentation): of a volume's snapshot, or of every member
/// of an environment's (`ENV@N`, `ENV@latest`, `ENV@TIME`).
pub fn mask(st: &Store, ev: &Events, req: &MaskRequest) -> Result<MaskAnswer, ApiError> {
    let timeout = req.timeout_secs.map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let named = catalog::Reference::parse(&req.snapshot)?.volume;
    if st.catalog().environments().contains_key(&named) {
        return mask_environment(st, ev, req, timeout);
    }
    let script = match (&req.script, st.catalog().hook(&named, "mask")) {
        (Some(s), _) => s.clone(),
        (None, Some(h)) => h.script.clone(),
        (None, None) => return Err(bad(format!("give --with SCRIPT, or set a mask hook on `{named}`"))),
    };
    let p = prepare(st, ev, &req.snapshot, &req.into, Some(&script), timeout)?;
    let record = p.record.clone();
    let id = st.op(|cat| cat.mask_finish(&req.into, record)).inspect_err(|_| p.undo(st))?;
    Ok(answer(id.to_string(), &p.record, p.duration_ms))
}

/// A masked volume filled and masked, its snapshot not yet taken.
struct Prepared<'a> {
    into: String,
    before: Option<catalog::Volume>,
    record: MaskRecord,
    duration_ms: u64,
    gate: HookGate<'a>,
}

impl Prepared<'_> {
    /// Put the masked volume back as it was (or remove it, if this run created it).
    fn undo(&self, st: &Store) {
        undo(st, &[&self.into], |cat| match &self.before {
            Some(b) => cat.restore(std::slice::from_ref(b), &[]),
            None => cat.restore(&[], std::slice::from_ref(&self.into)),
        });
        tracing::warn!(into = %self.into, "masking failed: no masked snapshot was taken");
    }
}

/// Put `snapshot`'s data into the masked volume `into` and run `script` on it (none: copied as
/// is). A failure leaves `into` as it was.
fn prepare<'a>(
    st: &'a Store,
    ev: &Events,
    snapshot: &str,
    into: &str,
    script: Option<&str>,
    timeout: Duration,
) -> Result<Prepared<'a>, ApiError> {
    let script_sha256 = match script {
        Some(s) => script_digest(ev, s).map_err(bad)?,
        None => String::new(),
    };
    let gate = gate(st, into)?;
    let (source, before) = st.op(|cat| cat.mask_begin(snapshot, into))?;
    let record = MaskRecord { source: source.clone(), script: script.unwrap_or_default().to_string(), script_sha256 };
    let mut p = Prepared { into: into.to_string(), before, record, duration_ms: 0, gate };
    let Some(script) = script else { return Ok(p) };
    let facts = Facts {
        volume: into.to_string(),
        snapshot: Some(source.to_string()),
        origin: Some(source.to_string()),
        export: Some(p.gate.export.clone()),
        ..Facts::default()
    };
    let run = ev.run(st, "mask", script, timeout, &facts);
    // Whatever the hook left connected goes before the snapshot is taken or the volume put back.
    drop(st.exports.fence_and_drain(into, Scope::Volume, DRAIN));
    match run {
        Ok(run) => {
            p.duration_ms = run.duration_ms;
            Ok(p)
        }
        Err(e) => {
            p.undo(st);
            Err(e.into())
        }
    }
}

/// Mask every member of an environment's point in time into environment `req.into` (members
/// `INTO.MEMBER`), each with the `mask` hook of its member volume; a member without one is
/// copied as is, unless its data may not flow downstream. All members or none.
fn mask_environment(st: &Store, ev: &Events, req: &MaskRequest, timeout: Duration) -> Result<MaskAnswer, ApiError> {
    if req.script.is_some() {
        return Err(bad("an environment is masked with each member's own mask hook: leave out --with"));
    }
    let _claim = st.claim_busy(&[crate::store::busy::env_key(&req.into)])?;
    let (point, plan) = mask_plan(st, &req.snapshot, &req.into)?;
    let mut done: Vec<(String, Prepared<'_>)> = Vec::new();
    for (member, sid, script) in &plan {
        let into = format!("{}.{member}", req.into);
        match prepare(st, ev, &sid.to_string(), &into, script.as_deref(), timeout) {
            Ok(p) => done.push((member.clone(), p)),
            Err(e) => {
                done.iter().for_each(|(_, p)| p.undo(st));
                return Err(e);
            }
        }
    }
    let members: Vec<(String, String, MaskRecord)> =
        done.iter().map(|(m, p)| (m.clone(), p.into.clone(), p.record.clone())).collect();
    let ids = st
        .op(|cat| cat.mask_finish_env(&req.into, &point.label, members))
        .inspect_err(|_| done.iter().for_each(|(_, p)| p.undo(st)))?;
    Ok(MaskAnswer {
        snapshot: format!("{}@latest", req.into),
        source: point.label,
        duration_ms: done.iter().map(|(_, p)| p.duration_ms).sum(),
        members: done.iter().zip(ids).map(|((m, _), id)| (m.clone(), id.to_string())).collect(),
        ..MaskAnswer::default()
    })
}

/// For each member of the environment point `snapshot`: its snapshot and its mask script;
/// refused as a whole when a member has no script and its data may not flow downstream.
type MaskPlan = (catalog::EnvPoint, Vec<(String, catalog::SnapshotId, Option<String>)>);

fn mask_plan(st: &Store, snapshot: &str, into: &str) -> Result<MaskPlan, ApiError> {
    let cat = st.catalog();
    let point = cat.env_resolve(snapshot)?;
    let env = cat.environment(&point.environment)?;
    let mut plan = Vec::new();
    for (member, sid) in &point.members {
        let volume = env.members.get(member).map_or(sid.volume.as_str(), String::as_str);
        let script = cat.hook(volume, "mask").map(|h| h.script.clone());
        if script.is_none() {
            cat.downstream(&sid.to_string()).map_err(|e| {
                bad(format!("member `{member}` has no mask hook (forkd hook set {volume} mask SCRIPT) and {e}"))
            })?;
        }
        plan.push((member.clone(), sid.clone(), script));
    }
    if plan.is_empty() {
        return Err(bad(format!("`{into}`: the environment has no members")));
    }
    Ok((point, plan))
}

fn answer(snapshot: String, r: &MaskRecord, duration_ms: u64) -> MaskAnswer {
    MaskAnswer {
        snapshot,
        source: r.source.to_string(),
        script: r.script.clone(),
        script_sha256: r.script_sha256.clone(),
        duration_ms,
        members: Default::default(),
    }
}

fn bad(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, why.into())
}

/// The script, checked, and the SHA-256 of its contents, hex.
fn script_digest(ev: &Events, script: &str) -> Result<String, String> {
    let path = ev.check(script).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(&path).map_err(|e| format!("hook `{script}`: cannot read it: {e}"))?;
    Ok(iscsi::digest::sha256(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}
