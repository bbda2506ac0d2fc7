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
use crate::store::exports::Scope;
use crate::store::Store;

/// Run one masking (see the module documentation).
pub fn mask(st: &Store, ev: &Events, req: &MaskRequest) -> Result<MaskAnswer, ApiError> {
    let timeout = req.timeout_secs.map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let script_sha256 = script_digest(ev, &req.script).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let gate = gate(st, &req.into)?;
    let (source, before) = st.op(|cat| cat.mask_begin(&req.snapshot, &req.into))?;
    let facts = Facts {
        volume: req.into.clone(),
        snapshot: Some(source.to_string()),
        origin: Some(source.to_string()),
        export: Some(gate.export.clone()),
        ..Facts::default()
    };
    let run = ev.run(st, "mask", &req.script, timeout, &facts);
    // Whatever the hook left connected goes before the snapshot is taken or the volume put back.
    drop(st.exports.fence_and_drain(&req.into, Scope::Volume, DRAIN));
    let run = match run {
        Ok(run) => run,
        Err(e) => {
            undo(st, &[&req.into], |cat| match &before {
                Some(b) => cat.restore(std::slice::from_ref(b), &[]),
                None => cat.restore(&[], std::slice::from_ref(&req.into)),
            });
            tracing::warn!(into = %req.into, error = %e, "masking failed: no masked snapshot was taken");
            return Err(e.into());
        }
    };
    let record =
        MaskRecord { source: source.clone(), script: req.script.clone(), script_sha256: script_sha256.clone() };
    let id = st.op(|cat| cat.mask_finish(&req.into, record))?;
    drop(gate);
    Ok(MaskAnswer {
        snapshot: id.to_string(),
        source: source.to_string(),
        script: req.script.clone(),
        script_sha256,
        duration_ms: run.duration_ms,
    })
}

/// The script, checked, and the SHA-256 of its contents, hex.
fn script_digest(ev: &Events, script: &str) -> Result<String, String> {
    let path = ev.check(script).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(&path).map_err(|e| format!("hook `{script}`: cannot read it: {e}"))?;
    Ok(iscsi::digest::sha256(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}
