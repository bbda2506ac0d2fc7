//! A small blocking HTTP client for the forkd API (`docs/api.md`), used by every CLI command
//! other than `serve`.
//!
//! One typed method per route ([`Client::list`], [`Client::volume`], [`Client::create_source`],
//! ...) sends the request types of [`crate::api`] and returns its answer types, the same ones
//! the server builds its answers from. The untyped `*_json`/`*_bytes` calls below them are
//! private: the plumbing of the typed ones.
//!
//! Errors are made for humans: when the daemon answers with a non-2xx status and a
//! `{"error": "..."}` body, the returned [`anyhow::Error`] displays exactly that text (it is an
//! [`ApiError`], so callers can downcast to look at the status); when the daemon cannot be
//! reached at all, the error says so and tells how to point the CLI elsewhere.
//!
//! With a token ([`Client::with_token`]) every request carries `Authorization: Bearer TOKEN`;
//! a `401` answer becomes `the daemon refused the token: ...`.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use anyhow::anyhow;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::upload::{Chunks, UploadError};
use crate::api::data::{Empty, Extents, Written, Zeroed};
use crate::api::environments::{
    CreateEnvironment, EnvCloneRequest, EnvCloned, EnvDeleted, EnvMoveRequest, EnvMoved, EnvSnapshotRequest,
    EnvSnapshotTaken, Environment, EnvironmentList,
};
use crate::api::hooks::{Hook, HookList, HookRequest, MaskAnswer, MaskRequest, PolicyRequest};
use crate::api::ingest::{decode_pairs, encode_pairs, IngestAnswer, ResizeAnswer, ResizeRequest};
use crate::api::log::{LogEntries, LogQuery};
use crate::api::replication::{
    IncomingDone, IncomingStart, Promoted, ReplicaState, ReplicateRequest, ReplicationStatus,
};
use crate::api::retention::{PruneAnswer, RetentionRules};
use crate::api::schedules::{Schedule, ScheduleDeleted, ScheduleList, ScheduleRequest, ScheduleRunInfo};
use crate::api::scrub::{ScrubAnswer, ScrubStatus};
use crate::api::volumes::{
    BookmarkRequest, CloneAnswer, CloneRequest, CreateSource, Deleted, MoveRequest, Moved, Size, SnapshotRequest,
    SnapshotTaken, Tree, Volume, VolumeList,
};

/// How long to wait for a TCP connection to the daemon. Reads and writes have no timeout:
/// an ingest or a dump can legitimately take hours.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest error body we read when the daemon answers with a non-2xx status.
const MAX_ERROR_BODY: u64 = 64 * 1024;

/// The daemon answered with a non-2xx status. Displays as the daemon's own error text only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP status code (404, 409, ...).
    pub status: u16,
    /// The `error` field of the response body (or a short description when there was none).
    pub message: String,
}

/// A blocking client for one forkd daemon.
#[derive(Clone)]
pub struct Client {
    /// `http://HOST:PORT`, without a trailing '/'.
    base: String,
    agent: ureq::Agent,
    /// `Bearer TOKEN`, sent as `Authorization` with every request.
    authorization: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for the daemon at `api`: `http://HOST:PORT` or bare `HOST:PORT`.
    pub fn new(api: &str) -> Client {
        Client::with_token(api, None)
    }

    /// A client for the daemon at `api` that sends `token` (if any) as a bearer token.
    pub fn with_token(api: &str, token: Option<String>) -> Client {
        let trimmed = api.trim().trim_end_matches('/');
        let base = if trimmed.contains("://") { trimmed.to_string() } else { format!("http://{trimmed}") };
        let agent = ureq::AgentBuilder::new().timeout_connect(CONNECT_TIMEOUT).build();
        Client { base, agent, authorization: token.map(|t| format!("Bearer {}", t.trim())) }
    }

    /// [`Client::with_token`] whose reads and writes fail after `io` without progress: for one
    /// daemon talking to another, which must notice a cut link (replication).
    pub fn with_timeout(api: &str, token: Option<String>, io: Duration) -> Client {
        let mut c = Client::with_token(api, token);
        c.agent = ureq::AgentBuilder::new().timeout_connect(CONNECT_TIMEOUT).timeout_read(io).timeout_write(io).build();
        c
    }

    /// The daemon's base URL, e.g. `http://127.0.0.1:7480`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /v1/volumes`: every volume, with snapshot counts.
    pub fn list(&self) -> anyhow::Result<VolumeList> {
        self.get("/v1/volumes")
    }

    /// `GET /v1/volumes/{name}`: one volume with its snapshots and space accounting.
    pub fn volume(&self, name: &str) -> anyhow::Result<Volume> {
        self.get(&format!("/v1/volumes/{}", enc(name)))
    }

    /// `GET /v1/volumes/{name}?space=false`: [`Client::volume`] without computing unique bytes
    /// (null then), which walks everything the volume holds alone.
    pub fn volume_without_space(&self, name: &str) -> anyhow::Result<Volume> {
        self.get(&format!("/v1/volumes/{}?space=false", enc(name)))
    }

    /// `POST /v1/sources`: create an empty source.
    pub fn create_source(&self, name: &str, size: Size) -> anyhow::Result<Volume> {
        self.post("/v1/sources", &CreateSource { name: name.to_string(), size })
    }

    /// `POST /v1/volumes/{name}/snapshots`, with a bookmark for the new snapshot if given.
    pub fn snapshot(&self, volume: &str, bookmark: Option<&str>) -> anyhow::Result<SnapshotTaken> {
        let body = SnapshotRequest { bookmark: bookmark.map(str::to_string) };
        self.post(&format!("/v1/volumes/{}/snapshots", enc(volume)), &body)
    }

    /// `POST /v1/clones`: a writable clone `name` of `from` (a snapshot, or a volume that is
    /// snapshotted first). Not `clone`: that would shadow [`Clone::clone`].
    pub fn clone_volume(&self, from: &str, name: &str) -> anyhow::Result<CloneAnswer> {
        self.clone_with(&CloneRequest { from: from.to_string(), name: name.to_string(), lease: None, quota: None })
    }

    /// [`Client::clone_volume`] with a lease (`72h`) and a quota (`20G`) instead of the source's
    /// defaults.
    pub fn clone_with(&self, req: &CloneRequest) -> anyhow::Result<CloneAnswer> {
        self.post("/v1/clones", req)
    }

    /// `PUT /v1/volumes/{name}/quota`: set or remove a clone's quota.
    pub fn set_quota(&self, clone: &str, req: &crate::api::quotas::QuotaRequest) -> anyhow::Result<Volume> {
        self.send("PUT", &format!("/v1/volumes/{}/quota", enc(clone)), req)
    }

    /// `PUT /v1/volumes/{name}/lease`: one change to a clone's lease.
    pub fn set_lease(&self, clone: &str, req: &crate::api::leases::LeaseRequest) -> anyhow::Result<Volume> {
        self.send("PUT", &format!("/v1/volumes/{}/lease", enc(clone)), req)
    }

    /// `POST /v1/volumes/{name}/rewind` to a snapshot or a time.
    pub fn rewind(&self, clone: &str, to: &str) -> anyhow::Result<Moved> {
        self.post(&format!("/v1/volumes/{}/rewind", enc(clone)), &MoveRequest { to: Some(to.to_string()) })
    }

    /// `POST /v1/volumes/{name}/refresh` to `to`, or to the newest snapshot of the origin.
    pub fn refresh(&self, clone: &str, to: Option<&str>) -> anyhow::Result<Moved> {
        self.post(&format!("/v1/volumes/{}/refresh", enc(clone)), &MoveRequest { to: to.map(str::to_string) })
    }

    /// `POST /v1/snapshots/{ref}/bookmarks`: name a snapshot.
    pub fn bookmark(&self, snapshot: &str, name: &str) -> anyhow::Result<SnapshotTaken> {
        self.post(&format!("/v1/snapshots/{}/bookmarks", enc(snapshot)), &BookmarkRequest { name: name.to_string() })
    }

    /// `DELETE /v1/volumes/{ref}`: a volume with its snapshots, or one snapshot.
    pub fn delete(&self, reference: &str) -> anyhow::Result<Deleted> {
        self.delete_as(&format!("/v1/volumes/{}", enc(reference)))
    }

    /// `GET /v1/tree`: every volume with its snapshots, flat.
    pub fn tree(&self) -> anyhow::Result<Tree> {
        self.get("/v1/tree")
    }

    /// `GET /v1/log`: the operation log entries `query` selects, oldest first.
    pub fn log(&self, query: &LogQuery) -> anyhow::Result<LogEntries> {
        let params = [
            query.volume.as_deref().map(|v| format!("volume={}", enc(v))),
            query.since.as_deref().map(|t| format!("since={}", enc(t))),
            query.limit.map(|n| format!("limit={n}")),
        ];
        let params: Vec<String> = params.into_iter().flatten().collect();
        if params.is_empty() {
            self.get("/v1/log")
        } else {
            self.get(&format!("/v1/log?{}", params.join("&")))
        }
    }

    /// `GET /v1/environments`: every environment.
    pub fn environments(&self) -> anyhow::Result<EnvironmentList> {
        self.get("/v1/environments")
    }

    /// `GET /v1/environments/{name}`: one environment with its members and snapshots.
    pub fn environment(&self, name: &str) -> anyhow::Result<Environment> {
        self.get(&format!("/v1/environments/{}", enc(name)))
    }

    /// `POST /v1/environments`: group existing volumes (member name to volume).
    pub fn env_create(&self, name: &str, members: BTreeMap<String, String>) -> anyhow::Result<Environment> {
        self.post("/v1/environments", &CreateEnvironment { members, name: name.to_string() })
    }

    /// `POST /v1/environments/{name}/snapshots`: one snapshot of every member at one instant.
    pub fn env_snapshot(&self, name: &str, bookmark: Option<&str>) -> anyhow::Result<EnvSnapshotTaken> {
        let body = EnvSnapshotRequest { bookmark: bookmark.map(str::to_string) };
        self.post(&format!("/v1/environments/{}/snapshots", enc(name)), &body)
    }

    /// `POST /v1/environments/clones`: clone every member of `from` as `NAME.MEMBER`, with
    /// `lease` (`72h`) instead of the sources' default, if given.
    pub fn env_clone(&self, from: &str, name: &str, lease: Option<&str>) -> anyhow::Result<EnvCloned> {
        let body = EnvCloneRequest { from: from.to_string(), lease: lease.map(str::to_string), name: name.to_string() };
        self.post("/v1/environments/clones", &body)
    }

    /// `PUT /v1/environments/{name}/lease`: one change to an environment clone's lease.
    pub fn set_env_lease(&self, env: &str, req: &crate::api::leases::LeaseRequest) -> anyhow::Result<Environment> {
        self.send("PUT", &format!("/v1/environments/{}/lease", enc(env)), req)
    }

    /// `POST /v1/environments/{name}/rewind` to an environment snapshot or a time.
    pub fn env_rewind(&self, name: &str, to: &str) -> anyhow::Result<EnvMoved> {
        self.post(&format!("/v1/environments/{}/rewind", enc(name)), &EnvMoveRequest { to: Some(to.to_string()) })
    }

    /// `POST /v1/environments/{name}/refresh`: every member to the newest snapshot of its origin.
    pub fn env_refresh(&self, name: &str) -> anyhow::Result<EnvMoved> {
        self.post(&format!("/v1/environments/{}/refresh", enc(name)), &serde_json::json!({}))
    }

    /// `DELETE /v1/environments/{name}`, with its member volumes unless `keep_volumes`.
    pub fn env_delete(&self, name: &str, keep_volumes: bool) -> anyhow::Result<EnvDeleted> {
        self.delete_as(&format!("/v1/environments/{}?keep_volumes={keep_volumes}", enc(name)))
    }

    /// `GET /v1/volumes/{ref}/extents`: the byte ranges holding data.
    pub fn extents(&self, reference: &str) -> anyhow::Result<Extents> {
        self.get(&format!("/v1/volumes/{}/extents", enc(reference)))
    }

    /// `GET /v1/volumes/{ref}/data`: `length` bytes (at most 64 MiB) from `offset`.
    pub fn read(&self, reference: &str, offset: u64, length: u64) -> anyhow::Result<Vec<u8>> {
        self.get_bytes(&format!("/v1/volumes/{}/data?offset={offset}&length={length}", enc(reference)))
    }

    /// `PUT /v1/volumes/{name}/data`: write `data` (at most 64 MiB) at `offset` of a clone.
    pub fn write(&self, name: &str, offset: u64, data: &[u8]) -> anyhow::Result<Written> {
        let req = self.request("PUT", &format!("/v1/volumes/{}/data?offset={offset}", enc(name)));
        let resp = self.call(req.set("Content-Type", "application/octet-stream").send_bytes(data))?;
        self.answer(resp)
    }

    /// `POST /v1/volumes/{name}/zero`: zero `length` bytes at `offset` (4096-aligned).
    pub fn zero(&self, name: &str, offset: u64, length: u64) -> anyhow::Result<Zeroed> {
        let resp = self.call(
            self.request("POST", &format!("/v1/volumes/{}/zero?offset={offset}&length={length}", enc(name))).call(),
        )?;
        self.answer(resp)
    }

    /// `POST /v1/volumes/{name}/flush`: every write answered before is durable.
    pub fn flush(&self, name: &str) -> anyhow::Result<Empty> {
        let resp = self.call(self.request("POST", &format!("/v1/volumes/{}/flush", enc(name))).call())?;
        self.answer(resp)
    }

    /// `POST /v1/sources/{name}/resize`: grow a source.
    pub fn resize(&self, name: &str, size: Size) -> anyhow::Result<ResizeAnswer> {
        self.post(&format!("/v1/sources/{}/resize", enc(name)), &ResizeRequest { size })
    }

    /// `GET /v1/sources/{name}/digests`: (block, xxh3-64 digest) of every block holding data.
    pub fn digests(&self, name: &str) -> anyhow::Result<Vec<(u64, u64)>> {
        let raw = self.get_bytes(&format!("/v1/sources/{}/digests", enc(name)))?;
        self.pairs(&raw)
    }

    /// `POST /v1/sources/{name}/digests`: the digests of the blocks in `ranges` only, given as
    /// (first block, count).
    pub fn digests_in(&self, name: &str, ranges: &[(u64, u64)]) -> anyhow::Result<Vec<(u64, u64)>> {
        let raw = self.post_bytes(&format!("/v1/sources/{}/digests", enc(name)), &encode_pairs(ranges))?;
        self.pairs(&raw)
    }

    /// `POST /v1/sources/{name}/ingest`: send an ingest stream (frames: [`crate::api::frames`]).
    pub fn ingest(&self, name: &str, stream: impl Chunks) -> anyhow::Result<IngestAnswer> {
        let v = self.post_stream(&format!("/v1/sources/{}/ingest", enc(name)), stream)?;
        serde_json::from_value(v).map_err(|e| self.not_understood(&e))
    }

    /// `DELETE /v1/sources/{name}/ingest`: abandon an interrupted ingest.
    pub fn abort_ingest(&self, name: &str) -> anyhow::Result<Empty> {
        self.delete_as(&format!("/v1/sources/{}/ingest", enc(name)))
    }

    /// `POST /v1/volumes/{name}/replicate`: replicate once (answers when done) or start a
    /// continuous replication (answers at once).
    pub fn replicate(&self, name: &str, req: &ReplicateRequest) -> anyhow::Result<ReplicationStatus> {
        self.post(&format!("/v1/volumes/{}/replicate", enc(name)), req)
    }

    /// `GET /v1/volumes/{name}/replication`.
    pub fn replication(&self, name: &str) -> anyhow::Result<ReplicationStatus> {
        self.get(&format!("/v1/volumes/{}/replication", enc(name)))
    }

    /// `DELETE /v1/volumes/{name}/replication`: stop a continuous replication.
    pub fn stop_replication(&self, name: &str) -> anyhow::Result<ReplicationStatus> {
        self.delete_as(&format!("/v1/volumes/{}/replication", enc(name)))
    }

    /// `POST /v1/volumes/{name}/promote`: make a replica writable.
    pub fn promote(&self, name: &str) -> anyhow::Result<Promoted> {
        self.post(&format!("/v1/volumes/{}/promote", enc(name)), &serde_json::json!({}))
    }

    /// `GET /v1/replicas/{name}`: what this daemon holds of a volume name (a replication
    /// target's side).
    pub fn replica_state(&self, name: &str) -> anyhow::Result<ReplicaState> {
        self.get(&format!("/v1/replicas/{}", enc(name)))
    }

    /// `PUT /v1/replicas/{name}`: make a replica exist (a clone with no snapshot yet).
    pub fn replica_declare(&self, name: &str, volume: &Value) -> anyhow::Result<ReplicaState> {
        self.send("PUT", &format!("/v1/replicas/{}", enc(name)), volume)
    }

    /// `PUT /v1/replicas/{name}/incoming`: declare a snapshot about to be sent; where to start.
    pub fn replica_incoming(&self, name: &str, header: &Value) -> anyhow::Result<IncomingStart> {
        self.send("PUT", &format!("/v1/replicas/{}/incoming", enc(name)), header)
    }

    /// `POST /v1/replicas/{name}/incoming`: send the declared snapshot's frames; fails when
    /// the link makes no progress for `stall`.
    pub fn replica_send(&self, name: &str, stream: impl Chunks, stall: Duration) -> anyhow::Result<IncomingDone> {
        let v = self.post_stream_stalling(&format!("/v1/replicas/{}/incoming", enc(name)), stream, Some(stall))?;
        serde_json::from_value(v).map_err(|e| self.not_understood(&e))
    }

    /// `POST /v1/scrub`: read and check every stored block; answers when the scrub is done
    /// (hours for a large store: there is no read timeout).
    pub fn scrub(&self) -> anyhow::Result<ScrubAnswer> {
        let resp = self.call(self.request("POST", "/v1/scrub").call())?;
        self.answer(resp)
    }

    /// `GET /v1/scrub`: the running scrub's progress, or the last one's.
    pub fn scrub_status(&self) -> anyhow::Result<ScrubStatus> {
        self.get("/v1/scrub")
    }

    /// `GET /v1/openapi.json`: the API's OpenAPI 3 document.
    pub fn openapi(&self) -> anyhow::Result<Value> {
        self.get_json("/v1/openapi.json")
    }

    /// `GET /v1/hooks[?owner=NAME]`.
    pub fn hooks(&self, owner: Option<&str>) -> anyhow::Result<HookList> {
        match owner {
            Some(o) => self.get(&format!("/v1/hooks?owner={}", enc(o))),
            None => self.get("/v1/hooks"),
        }
    }

    /// `PUT /v1/hooks/{owner}/{event}`.
    pub fn set_hook(&self, owner: &str, event: &str, req: &HookRequest) -> anyhow::Result<Hook> {
        self.send("PUT", &format!("/v1/hooks/{}/{}", enc(owner), enc(event)), req)
    }

    /// `DELETE /v1/hooks/{owner}/{event}`.
    pub fn unset_hook(&self, owner: &str, event: &str) -> anyhow::Result<Hook> {
        self.delete_as(&format!("/v1/hooks/{}/{}", enc(owner), enc(event)))
    }

    /// `POST /v1/mask`.
    pub fn mask(&self, req: &MaskRequest) -> anyhow::Result<MaskAnswer> {
        self.post("/v1/mask", req)
    }

    /// `PUT /v1/volumes/{name}/policy`.
    pub fn set_policy(&self, name: &str, req: &PolicyRequest) -> anyhow::Result<Volume> {
        self.send("PUT", &format!("/v1/volumes/{}/policy", enc(name)), req)
    }

    /// `PUT /v1/volumes/{name}/retention`: set (no rule: clear) a volume's retention rules.
    pub fn set_retention(&self, volume: &str, rules: &RetentionRules) -> anyhow::Result<Volume> {
        self.send("PUT", &format!("/v1/volumes/{}/retention", enc(volume)), rules)
    }

    /// `POST /v1/volumes/{name}/prune`: apply its retention rules now.
    pub fn prune(&self, volume: &str) -> anyhow::Result<PruneAnswer> {
        self.post(&format!("/v1/volumes/{}/prune", enc(volume)), &serde_json::json!({}))
    }

    /// `POST /v1/volumes/{name}/detach`: cut a clone loose from its origin.
    pub fn detach(&self, clone: &str) -> anyhow::Result<Volume> {
        self.post(&format!("/v1/volumes/{}/detach", enc(clone)), &serde_json::json!({}))
    }

    /// `POST /v1/schedules`: add a schedule.
    pub fn add_schedule(&self, req: &ScheduleRequest) -> anyhow::Result<Schedule> {
        self.post("/v1/schedules", req)
    }

    /// `GET /v1/schedules`: every schedule with its next and last runs.
    pub fn schedules(&self) -> anyhow::Result<ScheduleList> {
        self.get("/v1/schedules")
    }

    /// `POST /v1/schedules/{name}/run`: run a schedule now; answers when the run ended.
    pub fn run_schedule(&self, name: &str) -> anyhow::Result<ScheduleRunInfo> {
        self.post(&format!("/v1/schedules/{}/run", enc(name)), &serde_json::json!({}))
    }

    /// `DELETE /v1/schedules/{name}`: remove a schedule.
    pub fn delete_schedule(&self, name: &str) -> anyhow::Result<ScheduleDeleted> {
        self.delete_as(&format!("/v1/schedules/{}", enc(name)))
    }

    /// `GET path` and read the answer as `T`.
    fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self.call(self.request("GET", path).call())?;
        self.answer(resp)
    }

    /// `POST path` with `body` as JSON and read the answer as `T`.
    fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.send("POST", path, body)
    }

    /// `METHOD path` with `body` as JSON and read the answer as `T`.
    fn send<B: Serialize, T: DeserializeOwned>(&self, method: &str, path: &str, body: &B) -> anyhow::Result<T> {
        let body = serde_json::to_value(body).map_err(|e| anyhow!("internal: cannot encode the request: {e}"))?;
        let resp = self.call(self.request(method, path).send_json(body))?;
        self.answer(resp)
    }

    /// `DELETE path` and read the answer as `T`.
    fn delete_as<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self.call(self.request("DELETE", path).call())?;
        self.answer(resp)
    }

    /// Read a 2xx JSON body as `T`.
    fn answer<T: DeserializeOwned>(&self, resp: ureq::Response) -> anyhow::Result<T> {
        let v = self.json_body(resp)?;
        serde_json::from_value(v).map_err(|e| self.not_understood(&e))
    }

    fn not_understood(&self, e: &serde_json::Error) -> anyhow::Error {
        anyhow!("the forkd daemon at {} sent an answer this forkd does not understand: {e}", self.base)
    }

    fn pairs(&self, raw: &[u8]) -> anyhow::Result<Vec<(u64, u64)>> {
        decode_pairs(raw).ok_or_else(|| anyhow!("the forkd daemon at {} sent a malformed digest list", self.base))
    }

    /// `GET path` and parse the JSON answer.
    fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self.call(self.request("GET", path).call())?;
        self.json_body(resp)
    }

    /// `GET path` and return the whole raw body.
    fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let mut reader = self.get_reader(path)?;
        let mut buf = Vec::new();
        reader.read_to_end(&mut buf).map_err(|e| self.io_error(&e))?;
        Ok(buf)
    }

    /// `GET path` and return the body as a stream, for large transfers.
    fn get_reader(&self, path: &str) -> anyhow::Result<Box<dyn Read + Send>> {
        let resp = self.call(self.request("GET", path).call())?;
        Ok(Box::new(resp.into_reader()))
    }

    /// `POST path` with a streamed `application/octet-stream` body (sent chunked) and parse
    /// the JSON answer. The answer is read while the body is still going out, so a daemon
    /// that refuses the stream part-way is heard (see [`super::upload`]).
    fn post_stream(&self, path: &str, body: impl Chunks) -> anyhow::Result<Value> {
        self.post_stream_stalling(path, body, None)
    }

    /// [`Client::post_stream`] with [`super::upload::post`]'s stall timeout.
    fn post_stream_stalling(&self, path: &str, body: impl Chunks, stall: Option<Duration>) -> anyhow::Result<Value> {
        let mut headers = vec![("Content-Type", "application/octet-stream")];
        if let Some(a) = &self.authorization {
            headers.push(("Authorization", a.as_str()));
        }
        let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
        match super::upload::post(&self.base, &path, &headers, body, stall) {
            Ok(a) if (200..300).contains(&a.status) => self.parse_json(&String::from_utf8_lossy(&a.body)),
            Ok(a) => Err(self.refused(error_from_body(a.status, &a.reason, &String::from_utf8_lossy(&a.body)))),
            Err(UploadError::Connect(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err(self.unreachable())
            }
            Err(UploadError::Connect(e)) => Err(anyhow!("cannot reach the forkd daemon at {}: {e}", self.base)),
            Err(UploadError::Lost(why)) => {
                Err(anyhow!("lost the connection to the forkd daemon at {}: {why}", self.base))
            }
            Err(e) => Err(anyhow!("{e}")),
        }
    }

    /// `POST path` with a raw `application/octet-stream` body and return the raw answer.
    fn post_bytes(&self, path: &str, body: &[u8]) -> anyhow::Result<Vec<u8>> {
        let req = self.request("POST", path).set("Content-Type", "application/octet-stream");
        let resp = self.call(req.send_bytes(body))?;
        let mut buf = Vec::new();
        resp.into_reader().read_to_end(&mut buf).map_err(|e| self.io_error(&e))?;
        Ok(buf)
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let url =
            if path.starts_with('/') { format!("{}{}", self.base, path) } else { format!("{}/{}", self.base, path) };
        let req = self.agent.request(method, &url);
        match &self.authorization {
            Some(a) => req.set("Authorization", a),
            None => req,
        }
    }

    /// Turn a ureq result into a response or a human-readable error.
    fn call(&self, result: Result<ureq::Response, ureq::Error>) -> anyhow::Result<ureq::Response> {
        match result {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(status, resp)) => Err(self.refused(status_error(status, resp))),
            Err(ureq::Error::Transport(t)) => Err(self.transport_error(&t)),
        }
    }

    /// A non-2xx answer as an error; a `401` says how the token failed.
    fn refused(&self, mut e: ApiError) -> anyhow::Error {
        if e.status == 401 {
            e.message = match &self.authorization {
                Some(_) => format!("the daemon refused the token: {}", e.message),
                None => "the daemon refused the token: none was given (use --token-file FILE or set FORKD_TOKEN)"
                    .to_string(),
            };
        }
        e.into()
    }

    fn transport_error(&self, t: &ureq::Transport) -> anyhow::Error {
        use ureq::ErrorKind;
        match t.kind() {
            ErrorKind::ConnectionFailed | ErrorKind::Dns => self.unreachable(),
            ErrorKind::InvalidUrl | ErrorKind::UnknownScheme => {
                anyhow!("invalid forkd API URL {}: {t} (set --api or FORKD_API)", self.base)
            }
            _ => {
                // A refused connection can also surface as a plain I/O error.
                let refused = std::error::Error::source(t)
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
                if refused {
                    self.unreachable()
                } else {
                    anyhow!("lost the connection to the forkd daemon at {}: {t}", self.base)
                }
            }
        }
    }

    fn unreachable(&self) -> anyhow::Error {
        anyhow!("cannot reach the forkd daemon at {}: is `forkd serve` running? (set --api or FORKD_API)", self.base)
    }

    fn io_error(&self, e: &std::io::Error) -> anyhow::Error {
        anyhow!("lost the connection to the forkd daemon at {}: {e}", self.base)
    }

    /// Parse a 2xx body as JSON; an empty body is `null`.
    fn json_body(&self, resp: ureq::Response) -> anyhow::Result<Value> {
        let mut text = String::new();
        resp.into_reader().read_to_string(&mut text).map_err(|e| self.io_error(&e))?;
        self.parse_json(&text)
    }

    fn parse_json(&self, text: &str) -> anyhow::Result<Value> {
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(text)
            .map_err(|e| anyhow!("the forkd daemon at {} sent an answer that is not valid JSON: {e}", self.base))
    }
}

/// Build the error for a non-2xx answer: the body's `error` text when there is one.
fn status_error(status: u16, resp: ureq::Response) -> ApiError {
    let status_text = resp.status_text().to_string();
    let mut body = String::new();
    // The body is best effort: if it cannot be read we still know the status.
    let _ = resp.into_reader().take(MAX_ERROR_BODY).read_to_string(&mut body);
    error_from_body(status, &status_text, &body)
}

/// The error for a non-2xx answer with this body.
fn error_from_body(status: u16, status_text: &str, body: &str) -> ApiError {
    let from_json = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string));
    let message = match from_json {
        Some(m) => m,
        None => {
            let first_line = body.lines().map(str::trim).find(|l| !l.is_empty());
            match first_line {
                Some(line) => format!("HTTP {status} {status_text}: {line}"),
                None => format!("HTTP {status} {status_text}"),
            }
        }
    };
    ApiError { status, message }
}

/// Percent-encode one path segment: everything except `A-Z a-z 0-9 - . _ ~` is encoded
/// (so `@`, `:` and `/` in references are safe to put in a path).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    #[test]
    fn enc_encodes_reserved() {
        assert_eq!(enc("prod@3"), "prod%403");
        assert_eq!(enc("prod@2026-11-21T10:00:00Z"), "prod%402026-11-21T10%3A00%3A00Z");
        assert_eq!(enc("a-b.c_d~e"), "a-b.c_d~e");
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
        assert_eq!(enc("é"), "%C3%A9");
    }

    #[test]
    fn new_normalizes_base() {
        assert_eq!(Client::new("127.0.0.1:7480").base(), "http://127.0.0.1:7480");
        assert_eq!(Client::new("http://127.0.0.1:7480/").base(), "http://127.0.0.1:7480");
        assert_eq!(Client::new("http://h:1//").base(), "http://h:1");
    }

    /// Serve one canned HTTP answer on a local port; returns the address.
    fn one_shot_server(status_line: &'static str, body: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                let mut body_len = 0usize;
                // Read the request head, then its body: a server that closes with unread
                // input resets the connection, and the client may then lose the answer.
                while reader.read_line(&mut line).is_ok() {
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        body_len = v.trim().parse().unwrap_or(0);
                    }
                    line.clear();
                }
                let mut body_in = vec![0u8; body_len];
                let _ = std::io::Read::read_exact(&mut reader, &mut body_in);
                let mut stream = reader.into_inner();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status_line}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        addr
    }

    #[test]
    fn error_body_becomes_the_message() {
        let addr = one_shot_server("404 Not Found", r#"{"error":"no volume named dev9"}"#);
        let err = Client::new(&addr).get_json("/v1/volumes/dev9").expect_err("404");
        assert_eq!(err.to_string(), "no volume named dev9");
        let api = err.downcast_ref::<ApiError>().expect("ApiError");
        assert_eq!(api.status, 404);
    }

    #[test]
    fn non_json_error_body_keeps_status() {
        let addr = one_shot_server("502 Bad Gateway", "upstream gone\n");
        let err = Client::new(&addr).get_json("/x").expect_err("502");
        assert_eq!(err.to_string(), "HTTP 502 Bad Gateway: upstream gone");
    }

    /// Serve one canned answer and hand back the request head it received.
    fn recording_server(status_line: &'static str, body: &'static str) -> (String, std::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok() {
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    head.push_str(&line);
                    line.clear();
                }
                let _ = tx.send(head);
                let mut stream = reader.into_inner();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status_line}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (addr, rx)
    }

    #[test]
    fn token_is_sent_and_refusal_explained() {
        let (addr, head) = recording_server("200 OK", r#"{"volumes":[]}"#);
        Client::with_token(&addr, Some("s3cret-token-0123456789".into())).get_json("/v1/volumes").expect("ok");
        let head = head.recv().expect("head").to_ascii_lowercase();
        assert!(head.contains("authorization: bearer s3cret-token-0123456789\r\n"), "{head}");

        let (addr, head) = recording_server("200 OK", "{}");
        Client::new(&addr).get_json("/v1/volumes").expect("ok");
        assert!(!head.recv().expect("head").to_ascii_lowercase().contains("authorization"));

        let (addr, _) = recording_server("401 Unauthorized", r#"{"error":"wrong token"}"#);
        let err = Client::with_token(&addr, Some("x".repeat(20))).get_json("/v1/volumes").expect_err("401");
        assert_eq!(err.to_string(), "the daemon refused the token: wrong token");
        assert_eq!(err.downcast_ref::<ApiError>().expect("ApiError").status, 401);

        let (addr, _) = recording_server("401 Unauthorized", r#"{"error":"this API needs a token"}"#);
        let err = Client::new(&addr).get_json("/v1/volumes").expect_err("401");
        assert!(err.to_string().starts_with("the daemon refused the token: none was given"), "{err}");
        assert!(!format!("{:?}", Client::with_token(&addr, Some("hidden-token-value".into()))).contains("hidden"));
    }

    #[test]
    fn ok_body_is_parsed() {
        let addr = one_shot_server("201 Created", r#"{"snapshot":"prod@3"}"#);
        let v = Client::new(&addr).snapshot("prod", None).expect("ok");
        assert_eq!(v.snapshot, "prod@3");
    }

    #[test]
    fn refused_connection_is_explained() {
        // Bind then drop to get a port nobody listens on.
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        let err = Client::new(&addr).get_json("/v1/volumes").expect_err("refused");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot reach the forkd daemon at http://{addr}: is `forkd serve` running? (set --api or FORKD_API)"
            )
        );
    }
}
