//! `forkd serve`: the daemon. It owns the listeners (HTTP API, NBD, iSCSI) and who may reach
//! them; every data and catalog operation, and the fence of live exports around a head switch
//! (`store::exports`), goes to the [`crate::store`].
//!
//! - [`serve`]: start-up, the periodic flush and shutdown; [`config`]: settings;
//! - [`systemd`]: notifications (ready, status, stopping, watchdog) and socket activation;
//! - [`collector`]: the background garbage collector, one bounded step at a time;
//! - [`http`]: the HTTP JSON API by resource (volumes, data, ingest, resize);
//! - [`nbd`]: the NBD listener; [`iscsi`]: the iSCSI listener and its access rules;
//! - [`listener`]: the life cycle both protocol listeners share (limit, handshake timeout,
//!   spans, close reasons, drain on shutdown);
//! - [`auth`]: the API's bearer token; [`hooks`]: finding and running hook scripts;
//! - [`leases`]: the lease reaper; [`clock`]: the daemon's "now" (injectable for tests);
//! - [`offline`]: `forkd check` and `forkd repair`, on the data directory of a stopped daemon;
//! - [`retention`]: applying retention rules after snapshots and on `forkd prune`;
//! - [`lifecycle`] and [`env_lifecycle`]: what an operation on a volume or an environment does
//!   around its catalog step (hooks, gates, fences, undo), for the API and the scheduler.

pub mod auth;
pub mod clock;
pub mod collector;
pub mod config;
pub mod env_lifecycle;
pub mod events;
pub mod hooks;
pub mod http;
pub mod iscsi;
pub mod leases;
pub mod lifecycle;
pub mod listener;
pub mod masking;
pub mod nbd;
pub mod offline;
pub mod replication;
pub mod retention;
pub mod roles;
pub mod scheduler;
pub mod serve;
pub mod systemd;
