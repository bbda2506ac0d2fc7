//! `forkd ingest NAME --from PATH`: the agent side of ingest.
//!
//! It reads the image front to back, hashes every 4 KiB block, compares it with the digest the
//! daemon holds for the source's latest snapshot (fetched once, in block order, and walked in
//! step with the image) and streams only the changed blocks, each with its crc32. Reading and
//! hashing run on a few worker threads, sending on the caller's: they overlap through small
//! bounded queues of encoded frames. Zero blocks are never sent; a block that became zero is
//! sent as a zero frame without payload.
//!
//! With `--changed-blocks FILE` (see [`crate::agent::changed_blocks`]) only the listed ranges
//! are read, still compared block by block with the daemon's digests, so a listed block that
//! did not change is not sent either. With `--from nbd://HOST:PORT/EXPORT` the image is read
//! through [`crate::agent::nbd_source`]; adding `--dirty-bitmap NAME` reads only the ranges
//! qemu's dirty bitmap NAME marks (NBD block status), fed to the same ranges-only scan.
//!
//! One run has four parts, each in its own file: [`plan`] (open the image, check it against
//! the source, grow the source if asked, fetch the digests to compare with), [`scan`] (read,
//! hash, compare and encode frames, on worker threads), the stream (here: the frames go to the
//! daemon as one HTTP body while the scan runs) and [`report`] (progress, then the summary).

use std::sync::Arc;
use std::time::Instant;

use super::IngestArgs;
use crate::api::client::Client;
use crate::api::ingest::IngestAnswer;

mod plan;
mod report;
mod scan;

pub use scan::ReadAt;

const BS: usize = 4096;

/// Run `forkd ingest`.
pub fn run(client: &Client, args: &IngestArgs, json_out: bool) -> anyhow::Result<()> {
    if args.abort {
        client.abort_ingest(&args.name)?;
        println!("abandoned the running ingest into {}", args.name);
        return Ok(());
    }
    // --lvm/--freeze: the guards undo the snapshot/freeze when `consistent` is dropped.
    let consistent = crate::agent::consistent::prepare(
        args.from.as_deref(),
        args.lvm.as_deref(),
        args.freeze.as_deref(),
        &args.lvm_snapshot_size,
        &args.lvm_prefix,
    )?;
    let path = consistent.path.clone();
    let plan = plan::Plan::make(client, args, &path, json_out)?;
    let outcome = stream(client, &args.name, plan, json_out);
    drop(consistent);
    report::summary(args, &path, &outcome?, json_out);
    Ok(())
}

/// What a finished stream leaves for the summary.
#[derive(Debug)]
struct Outcome {
    /// The daemon's answer: the new snapshot and its summary.
    answer: IngestAnswer,
    /// How many byte ranges were read (1 for a whole-image scan).
    ranges: usize,
    /// When the scan started.
    started: Instant,
}

/// Scan on worker threads, report progress on another, and send the frames as the body of
/// `POST /v1/sources/NAME/ingest` on this one; the daemon's answer ends the run.
fn stream(client: &Client, name: &str, plan: plan::Plan, json_out: bool) -> anyhow::Result<Outcome> {
    let plan::Plan { reader, size, ranges, old } = plan;
    let progress = Arc::new(report::Progress::default());
    let (to_scan, nranges) = (ranges.iter().map(|r| r.1).sum::<u64>(), ranges.len());
    let input = scan::Input { reader: Arc::from(reader), ranges, old: Arc::new(old) };
    let started = Instant::now();
    let (body, workers) = scan::start(input, &progress);
    let reporter = report::Reporter::start(progress, size, to_scan, started, json_out);
    // The body is dropped when the upload ends, however it ends: the workers then stop.
    let result = client.ingest(name, body);
    reporter.stop();
    for w in workers {
        let _ = w.join();
    }
    Ok(Outcome { answer: result?, ranges: nranges, started })
}
