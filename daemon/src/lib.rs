//! forkd's daemon crate: the `forkd` binary's parts, as a library so tests and benches can
//! drive the store directly.
//!
//! - [`store`]: catalog + extent map + data engine, the one place data and metadata meet;
//! - [`engine`]: io_uring data I/O on the extent file (pread/pwrite fallback);
//! - [`api`], [`api_resize`], [`ingest_proto`]: the HTTP API and the ingest stream it receives;
//! - [`auth`]: the API's bearer token;
//! - [`serve`]: configuration and the daemon's life cycle;
//! - [`cli`], [`client`], [`ingest`], [`dump`]: the command line, a client of the API;
//! - [`consistent`]: `ingest --lvm VG/LV` / `--freeze MOUNTPOINT`, undone on exit, error or signal;
//! - [`changed_blocks`]: `ingest --changed-blocks FILE`, `thin_delta` XML or `OFFSET LENGTH` lines;
//! - [`nbd_client`]: a blocking NBD client for `ingest --from nbd://…` (`--dirty-bitmap NAME`);
//! - [`nbd_server`]: the NBD listener, driving the `nbd` protocol crate over tokio;
//! - [`exports`]: live connections per export, closed before rewind/refresh/delete;
//! - [`metrics`]: Prometheus counters.

pub mod api;
pub mod api_resize;
pub mod auth;
pub mod changed_blocks;
pub mod cli;
pub mod client;
pub mod consistent;
pub mod dump;
pub mod engine;
pub mod exports;
pub mod ingest;
pub mod ingest_proto;
pub mod iscsi_access;
pub mod iscsi_server;
pub mod metrics;
pub mod nbd_client;
pub mod nbd_server;
pub mod serve;
pub mod store;
