//! `forkd dump VOLUME_OR_SNAPSHOT FILE`: write the raw image of a volume or snapshot to a
//! file, sparse where zero. Only the ranges the daemon reports as holding data are fetched,
//! and all-zero blocks inside them are skipped, so holes stay holes in FILE.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::Context;

use crate::api::client::{enc, Client};
use crate::units::humanize;

/// Bytes fetched per request.
const PIECE: u64 = 16 << 20;

/// Run `forkd dump`.
pub fn run(client: &Client, reference: &str, file: &Path, json_out: bool) -> anyhow::Result<()> {
    let ext = client.get_json(&format!("/v1/volumes/{}/extents", enc(reference)))?;
    let size = ext["size_bytes"].as_u64().context("the daemon sent no size")?;
    let ranges: Vec<(u64, u64)> = ext["extents"]
        .as_array()
        .context("the daemon sent no extent list")?
        .iter()
        .filter_map(|r| Some((r.get(0)?.as_u64()?, r.get(1)?.as_u64()?)))
        .collect();
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
            let data = client.get_bytes(&format!("/v1/volumes/{}/data?offset={off}&length={n}", enc(reference)))?;
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
        println!("{}", serde_json::json!({"file": file, "size_bytes": size, "data_bytes": written}));
    } else {
        println!("dumped {reference} to {} ({}, {} of data)", file.display(), humanize(size), humanize(written));
    }
    Ok(())
}
