//! The source-side ingest agent (`forkd ingest`), which runs on production hosts: it reads a
//! volume (a file, a block device, an LVM snapshot or an NBD export), compares it block by
//! block with what the daemon holds and streams only the changed blocks through the typed API.
//!
//! - [`ingest`]: one ingest run (plan, scan, stream, report);
//! - [`changed_blocks`]: `--changed-blocks FILE`, `thin_delta` XML or `OFFSET LENGTH` lines;
//! - [`nbd_source`]: a blocking NBD client for `--from nbd://…` (`--dirty-bitmap NAME`);
//! - [`consistent`]: `--lvm VG/LV` / `--freeze MOUNTPOINT`, undone on exit, error or signal.

use std::path::PathBuf;

pub mod changed_blocks;
pub mod consistent;
pub mod ingest;
pub mod nbd_source;

/// `forkd ingest` options.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// Source volume to feed
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Block device or image file to read (required unless --abort or --lvm)
    #[arg(long, value_name = "PATH", required_unless_present_any = ["abort", "lvm"], conflicts_with = "lvm")]
    pub from: Option<PathBuf>,
    /// File of the ranges changed since the last ingest, read instead of the whole image:
    /// thin_delta XML, or `OFFSET LENGTH` lines in bytes
    #[arg(long, value_name = "FILE")]
    pub changed_blocks: Option<PathBuf>,
    /// LVM logical volume to snapshot and read from
    #[arg(long, value_name = "VG/LV")]
    pub lvm: Option<String>,
    /// Mount point to freeze (fsfreeze): for the instant of lvcreate with --lvm, else for the
    /// whole read of --from
    #[arg(long, value_name = "MOUNTPOINT")]
    pub freeze: Option<PathBuf>,
    /// Size of the LVM snapshot (an `lvcreate -L` value): room for writes during the ingest
    #[arg(long, value_name = "SIZE", default_value = "1G", requires = "lvm")]
    pub lvm_snapshot_size: String,
    /// Name prefix of the LVM snapshot (PREFIX-YYYYMMDDTHHMMSS)
    #[arg(long, value_name = "PREFIX", default_value = "forkd-ingest", requires = "lvm")]
    pub lvm_prefix: String,
    /// With `--from nbd://HOST:PORT/EXPORT`: read only the ranges qemu dirty bitmap NAME marks
    /// (NBD block status on the `qemu:dirty-bitmap:NAME` context)
    #[arg(long, value_name = "NAME", conflicts_with = "changed_blocks")]
    pub dirty_bitmap: Option<String>,
    /// Abandon the ingest running for NAME instead of starting one
    #[arg(long, conflicts_with_all = ["from", "changed_blocks", "lvm", "freeze"])]
    pub abort: bool,
    /// Grow the source to the image's size first when the image is larger (never shrinks)
    #[arg(long, conflicts_with = "abort")]
    pub resize: bool,
}

/// A schedule's `ingest SOURCE --from FROM` step, as the daemon runs it: `forkd ingest SOURCE
/// --from FROM --json` against the daemon's own API at `api` (with its token), on the calling
/// thread. The daemon's binary hands this to the server (`server::scheduler::IngestRunner`).
pub fn ingest_step(api: &str, token: Option<String>, source: &str, from: &str) -> anyhow::Result<()> {
    let client = crate::api::client::Client::with_token(api, token);
    let args = IngestArgs {
        name: source.to_string(),
        from: Some(PathBuf::from(from)),
        changed_blocks: None,
        lvm: None,
        freeze: None,
        lvm_snapshot_size: "1G".into(),
        lvm_prefix: "forkd-ingest".into(),
        dirty_bitmap: None,
        abort: false,
        resize: false,
    };
    ingest::run(&client, &args, true)
}
