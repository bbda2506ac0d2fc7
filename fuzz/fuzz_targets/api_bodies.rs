//! The API's request bodies: arbitrary bytes parsed as every JSON request type of
//! `forkd::api` the way the server's extractor does (`serde_path_to_error` over
//! `serde_json`, trailing bytes refused), the query types through `serde_urlencoded` as axum's
//! `Query` does, and the text fields of what parses through the catalog's parsers the routes
//! apply to them (names, references, sizes, spans, times). The first byte picks the type.
#![no_main]

use catalog::{parse_size, parse_span, parse_time, validate_name, Reference};
use forkd::api::data::Range;
use forkd::api::environments::{
    CreateEnvironment, EnvCloneRequest, EnvDeleteQuery, EnvMoveRequest, EnvSnapshotRequest,
};
use forkd::api::hooks::{HookQuery, HookRequest, MaskRequest, PolicyRequest};
use forkd::api::ingest::ResizeRequest;
use forkd::api::leases::LeaseRequest;
use forkd::api::log::LogQuery;
use forkd::api::quotas::QuotaRequest;
use forkd::api::replication::{IncomingDone, IncomingStart, ReplicateRequest};
use forkd::api::retention::RetentionRules;
use forkd::api::schedules::ScheduleRequest;
use forkd::api::volumes::{BookmarkRequest, CloneRequest, CreateSource, MoveRequest, ShowQuery, Size, SnapshotRequest};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

/// What `server::http::extract`'s `parse_json` does, without the error mapping.
fn body<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(v) => de.end().ok().map(|()| v),
        Err(e) => {
            let _ = (e.path().to_string(), e.into_inner().classify());
            None
        }
    }
}

fn query<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_urlencoded::from_bytes(bytes).ok()
}

fn size(s: &Size) {
    if let Size::Text(t) = s {
        let _ = parse_size(t);
    }
}

fn opt(text: &Option<String>, f: impl Fn(&str)) {
    if let Some(t) = text {
        f(t);
    }
}

fn span(t: &str) {
    let _ = parse_span(t);
}

fn time(t: &str) {
    let _ = parse_time(t);
}

fn name(t: &str) {
    let _ = validate_name("volume", t);
}

fn reference(t: &str) {
    let _ = Reference::parse(t);
}

fn sized(t: &str) {
    let _ = parse_size(t);
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, b)) = data.split_first() else { return };
    match kind % 24 {
        0 => {
            if let Some(r) = body::<CreateSource>(b) {
                name(&r.name);
                size(&r.size);
            }
        }
        1 => {
            if let Some(r) = body::<SnapshotRequest>(b) {
                opt(&r.bookmark, name);
            }
        }
        2 => {
            if let Some(r) = body::<CloneRequest>(b) {
                reference(&r.from);
                name(&r.name);
                opt(&r.lease, span);
                opt(&r.quota, sized);
            }
        }
        3 => {
            if let Some(r) = body::<MoveRequest>(b) {
                opt(&r.to, reference);
            }
        }
        4 => {
            if let Some(r) = body::<BookmarkRequest>(b) {
                name(&r.name);
            }
        }
        5 => {
            if let Some(r) = body::<ResizeRequest>(b) {
                size(&r.size);
            }
        }
        6 => {
            let _ = body::<HookRequest>(b);
        }
        7 => {
            if let Some(r) = body::<MaskRequest>(b) {
                reference(&r.snapshot);
                name(&r.into);
            }
        }
        8 => {
            if let Some(r) = body::<PolicyRequest>(b) {
                opt(&r.default_lease, span);
                opt(&r.max_lease, span);
                opt(&r.default_quota, sized);
            }
        }
        9 => {
            if let Some(r) = body::<LeaseRequest>(b) {
                opt(&r.extend, span);
                opt(&r.idle, span);
                opt(&r.expires, time);
            }
        }
        10 => {
            if let Some(r) = body::<QuotaRequest>(b) {
                sized(&r.quota);
            }
        }
        11 => {
            if let Some(r) = body::<ReplicateRequest>(b) {
                opt(&r.continuous, span);
            }
        }
        12 => {
            let _ = body::<IncomingStart>(b);
        }
        13 => {
            let _ = body::<IncomingDone>(b);
        }
        14 => {
            let _ = body::<RetentionRules>(b);
        }
        15 => {
            if let Some(r) = body::<ScheduleRequest>(b) {
                name(&r.name);
                opt(&r.catch_up, span);
            }
        }
        16 => {
            if let Some(r) = body::<CreateEnvironment>(b) {
                name(&r.name);
                r.members.values().for_each(|v| reference(v));
            }
        }
        17 => {
            if let Some(r) = body::<EnvSnapshotRequest>(b) {
                opt(&r.bookmark, name);
            }
        }
        18 => {
            if let Some(r) = body::<EnvCloneRequest>(b) {
                name(&r.name);
                opt(&r.lease, span);
            }
        }
        19 => {
            let _ = body::<EnvMoveRequest>(b);
        }
        20 => {
            let _ = query::<ShowQuery>(b);
            let _ = query::<EnvDeleteQuery>(b);
        }
        21 => {
            let _ = query::<HookQuery>(b);
        }
        22 => {
            if let Some(q) = query::<LogQuery>(b) {
                opt(&q.since, time);
                opt(&q.since, span);
            }
        }
        _ => {
            let _ = query::<Range>(b);
        }
    }
});
