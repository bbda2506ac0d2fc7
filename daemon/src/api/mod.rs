//! The typed contract between `forkd serve` and its clients (the CLI and the ingest agent):
//! the ingest stream's frame codec, the API token file, the blocking HTTP client and its
//! streamed upload.

pub mod client;
pub mod frames;
pub mod token;
mod upload;
