//! `forkd dump VOLUME_OR_SNAPSHOT FILE`: write the raw image of a volume or snapshot to a
//! file, sparse where zero. Only the ranges the daemon reports as holding data are fetched,
//! and all-zero blocks inside them are skipped, so holes stay holes in FILE.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::api::client::Client;
use crate::api::data::Extents;
use crate::units::humanize;

/// Bytes fetched per request.
const PIECE: u64 = 16 << 20;

/// The `--json` line of `forkd dump`.
#[derive(Debug, Serialize)]
struct Dumped<'a> {
    /// Bytes of data written (the rest of the file is holes).
    data_bytes: u64,
    /// The file written.
    file: &'a Path,
    /// The image's size.
    size_bytes: u64,
}

/// Run `forkd dump`.
pub fn run(client: &Client, reference: &str, file: &Path, json_out: bool) -> anyhow::Result<()> {
    let Extents { extents: ranges, size_bytes: size } = client.extents(reference)?;
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(file)
        .with_context(|| format!("cannot create {}", file.display()))?;
    out.set_len(size).with_context(|| format!("cannot size {} to {size} bytes", file.display()))?;
    let mut written = 0u64;
    for (start, len) in ranges {
        let mut off = start;
        while off < start + len {
            let n = PIECE.min(start + len - off);
            let data = client.read(reference, off, n)?;
            if data.len() as u64 != n {
                anyhow::bail!("the daemon returned {} bytes for a {n}-byte read at {off}", data.len());
            }
            for (i, block) in data.chunks(4096).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    let at = off + i as u64 * 4096;
                    out.write_all_at(block, at).with_context(|| format!("writing {} at {at}", file.display()))?;
                    written += block.len() as u64;
                }
            }
            off += n;
        }
    }
    out.sync_all().with_context(|| format!("syncing {}", file.display()))?;
    if json_out {
        let done = Dumped { data_bytes: written, file, size_bytes: size };
        println!("{}", serde_json::to_string(&done)?);
    } else {
        println!("dumped {reference} to {} ({}, {} of data)", file.display(), humanize(size), humanize(written));
    }
    Ok(())
}
