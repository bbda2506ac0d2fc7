//! The first part of an ingest run: open the image (a file, a block device or an NBD export),
//! decide which byte ranges to read, check the image against the source (kind, earlier
//! ingests, size; `--resize` grows the source first) and fetch the digests the scan compares
//! with. Nothing is sent to the daemon's ingest stream yet; every refusal happens here.

use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use serde_json::json;

use super::scan::ReadAt;
use super::BS;
use crate::agent::changed_blocks;
use crate::agent::nbd_source::NbdClient;
use crate::agent::IngestArgs;
use crate::api::client::Client;
use crate::api::volumes::{Size, VolumeKind};
use crate::units::humanize;

/// What the scan needs: where to read, what to read, and what the daemon already holds.
pub(super) struct Plan {
    /// The image.
    pub(super) reader: Box<dyn ReadAt>,
    /// The image's size in bytes.
    pub(super) size: u64,
    /// Byte ranges to read: whole blocks, sorted, disjoint.
    pub(super) ranges: Vec<(u64, u64)>,
    /// (block, digest) of the source's latest contents in those ranges, in block order.
    pub(super) old: Vec<(u64, u64)>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan").field("size", &self.size).field("ranges", &self.ranges.len()).finish()
    }
}

impl Plan {
    /// Open the image at `path` and prepare the run, or say why it cannot run.
    pub(super) fn make(client: &Client, args: &IngestArgs, path: &Path, json_out: bool) -> anyhow::Result<Plan> {
        let (reader, size, dirty) = open_image(path, args)?;
        // The byte ranges to read: those --changed-blocks lists or the dirty bitmap marks, else all.
        let ranges = match (&args.changed_blocks, dirty) {
            (Some(list), _) => read_changed_blocks(list, size)?,
            (None, Some(dirty)) => dirty,
            (None, None) => vec![(0, size)],
        };
        let vol_size = check_source(client, args)?;
        if size != vol_size {
            fit_size(client, args, path, size, vol_size, json_out)?;
        }
        let old = fetch_digests(client, &args.name, &ranges, size)?;
        Ok(Plan { reader, size, ranges, old })
    }
}

/// The image's reader, its size and, with `--dirty-bitmap`, the ranges the bitmap marks.
type Opened = (Box<dyn ReadAt>, u64, Option<Vec<(u64, u64)>>);

/// `--from nbd://HOST:PORT/EXPORT` reads an NBD export (with `--dirty-bitmap` only where it
/// changed); anything else is a file or block device.
fn open_image(path: &Path, args: &IngestArgs) -> anyhow::Result<Opened> {
    let nbd_url = path.to_str().filter(|s| s.starts_with("nbd://"));
    if args.dirty_bitmap.is_some() && nbd_url.is_none() {
        bail!(
            "--dirty-bitmap needs --from nbd://HOST:PORT/EXPORT (qemu dirty bitmaps are read over NBD), not {}",
            path.display()
        );
    }
    if let Some(url) = nbd_url {
        let nbd = NbdClient::connect(url, args.dirty_bitmap.as_deref())?;
        let size = nbd.size();
        let dirty = match &args.dirty_bitmap {
            Some(b) => Some(nbd.dirty_ranges(BS as u64).with_context(|| format!("reading dirty bitmap {b} of {url}"))?),
            None => None,
        };
        return Ok((Box::new(nbd), size, dirty));
    }
    if path.is_dir() {
        bail!("cannot read {}: it is a directory", path.display());
    }
    let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let size = image_size(&file, path)?;
    Ok((Box::new(file), size, None))
}

/// Size of a file or block device.
fn image_size(f: &File, path: &Path) -> anyhow::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::End(0)).with_context(|| format!("cannot find the size of {}", path.display()))
}

/// Read and parse a `--changed-blocks` file; errors are `FILE:LINE: what is wrong`.
fn read_changed_blocks(list: &Path, size: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let bytes = std::fs::read(list).with_context(|| format!("cannot read {}", list.display()))?;
    changed_blocks::parse(&String::from_utf8_lossy(&bytes), size)
        .map_err(|e| anyhow!("{}:{}: {}", list.display(), e.line, e.kind))
}

/// The source must be a source, with an earlier ingest when only changes are read; returns
/// its size. No space accounting: that walks the whole tree, and the agent does not need it.
fn check_source(client: &Client, args: &IngestArgs) -> anyhow::Result<u64> {
    let name = &args.name;
    let vol = client.volume_without_space(name)?;
    match vol.kind {
        VolumeKind::Source => {}
        VolumeKind::Clone => bail!("`{name}` is a clone; only sources are fed by ingest"),
        VolumeKind::Unknown => bail!("`{name}` is not a source; only sources are fed by ingest"),
    }
    let never_ingested = vol.snapshots.as_ref().is_some_and(Vec::is_empty);
    if args.changed_blocks.is_some() && never_ingested {
        bail!("--changed-blocks lists changes since an earlier ingest, but `{name}` has none: ingest the whole image first");
    }
    if args.dirty_bitmap.is_some() && never_ingested {
        bail!("--dirty-bitmap marks changes since an earlier ingest, but `{name}` has none: ingest the whole export first");
    }
    Ok(vol.size_bytes)
}

/// An image whose size differs from the source's: grow the source with `--resize`, else refuse.
fn fit_size(
    client: &Client,
    args: &IngestArgs,
    path: &Path,
    size: u64,
    vol_size: u64,
    json_out: bool,
) -> anyhow::Result<()> {
    let (name, img) = (&args.name, path.display());
    if !size.is_multiple_of(BS as u64) {
        bail!("{img} is {size} bytes, not a multiple of 4096: forkd volumes are whole 4 KiB blocks");
    }
    if size < vol_size {
        bail!("{img} is {size} bytes but source `{name}` is {vol_size} bytes: sizes must match (sources never shrink)");
    }
    if !args.resize {
        bail!("{img} is {size} bytes but source `{name}` is {vol_size} bytes: give --resize to grow the source first");
    }
    client.resize(name, Size::Bytes(size))?;
    if json_out {
        println!("{}", json!({"event": "resized", "previous_size_bytes": vol_size, "size_bytes": size}));
    } else {
        println!("grew source {name} from {} to {}", humanize(vol_size), humanize(size));
    }
    Ok(())
}

/// The digests of the latest snapshot, (block, digest) in block order: all of them for a full
/// scan, only those of the ranges to read otherwise (the cost then follows the ranges, not the
/// volume).
fn fetch_digests(client: &Client, name: &str, ranges: &[(u64, u64)], size: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    if ranges.len() == 1 && ranges[0] == (0, size) {
        return client.digests(name);
    }
    let blocks: Vec<(u64, u64)> = ranges.iter().map(|&(off, len)| (off / BS as u64, len / BS as u64)).collect();
    client.digests_in(name, &blocks)
}
