//! `forkd serve`: the daemon. It owns the listeners (HTTP API, NBD, iSCSI), the exports they
//! serve and who may reach them; every data and catalog operation goes to the [`crate::store`].
//!
//! - [`serve`]: start-up, the periodic flush and shutdown; [`config`]: settings;
//! - [`http`]: the HTTP JSON API by resource (volumes, data, ingest, resize);
//! - [`nbd`]: the NBD listener; [`iscsi`]: the iSCSI listener and its access rules;
//! - [`listener`]: the life cycle both protocol listeners share (limit, handshake timeout,
//!   spans, close reasons, drain on shutdown);
//! - [`exports`]: live connections per export, closed before rewind/refresh/delete;
//! - [`auth`]: the API's bearer token.

pub mod auth;
pub mod config;
pub mod exports;
pub mod http;
pub mod iscsi;
pub mod listener;
pub mod nbd;
pub mod serve;
