//! forkd's daemon crate: the `forkd` binary's parts, as a library so tests and benches can
//! drive the store directly. Three programs share it, each in its own room:
//!
//! - [`server`]: `forkd serve`, the daemon (HTTP API, NBD and iSCSI listeners, exports, auth);
//! - [`agent`]: `forkd ingest`, the source-side agent that runs on production hosts;
//! - [`cli`]: every other command, a client of the HTTP API, and the binary's entry point.
//!
//! Below them: [`store`] (catalog + extent map + data engine, the one place data and metadata
//! meet; the io_uring engine in it holds the crate's unsafe code, but for taking a socket systemd
//! passed, in `server::systemd`), [`api`] (the typed
//! contract between the server and its clients: routes' bodies, the error body, the ingest
//! stream's frames, the HTTP client), [`metrics`] (Prometheus counters, written by the store
//! and the listeners) and [`units`] (sizes and durations for people).
//!
//! Dependencies point one way: `cli` → `server`, `agent`, `api`; `agent` → `api`; `server` →
//! `store`, `api`; `store` → `catalog`, `blockmap`. The protocol crates (`nbd`, `iscsi`) are
//! leaves used only by `server` (and `agent`'s NBD source, which speaks the client side).

pub mod agent;
pub mod api;
pub mod cli;
pub mod metrics;
pub mod server;
pub mod store;
pub mod units;
