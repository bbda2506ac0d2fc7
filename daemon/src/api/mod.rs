//! The typed contract between `forkd serve` and its clients (the CLI and the ingest agent):
//! the ingest stream's frame codec, the API token file, and the blocking HTTP client.

pub mod client;
pub mod frames;
pub mod token;
