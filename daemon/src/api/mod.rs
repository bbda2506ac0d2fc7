//! The typed contract between `forkd serve` and its clients (the CLI and the ingest agent):
//! every route's request and answer bodies and the error body (the server builds its answers
//! from these types, the client returns them, and the OpenAPI document is derived from them),
//! the ingest stream's frame codec, the API token file, the blocking HTTP client and its
//! streamed upload.

pub mod client;
pub mod data;
pub mod environments;
pub mod error;
pub mod frames;
pub mod hooks;
pub mod ingest;
pub mod leases;
pub mod log;
pub mod pool;
pub mod quotas;
pub mod replication;
pub mod retention;
pub mod schedules;
pub mod scrub;
pub mod token;
pub mod upload;
pub mod volumes;
