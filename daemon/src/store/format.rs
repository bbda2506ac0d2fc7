//! The data directory's format: which version wrote it and which metadata engine holds `meta/`,
//! and the conversion of `meta/` from one engine to another (issue 10, item 6).
//!
//! The file `format` at the top of the data directory reads, for example:
//!
//! ```text
//! forkd data directory
//! format 3
//! engine redb
//! ```
//!
//! The formats:
//! - 1: no `format` file, sled; snapshots inside their volume's record.
//! - 2: the `format` file names the engine (redb by default); snapshots still inside their
//!   volume's record.
//! - 3: each snapshot under its own key (`catalog/src/records.rs`, issue 12), so a new snapshot
//!   writes one small key instead of the whole list. A forkd that reads only 2 would find no
//!   snapshots in the records and lose them, hence the new number that makes it refuse.
//!
//! This forkd reads all three: format 1 and 2 directories open as they are (converted first to
//! the default engine if they are format 1), the file is rewritten as format 3, and the catalog
//! moves a volume's snapshots to their own keys at the first commit that writes its record. A
//! newer format, or an engine this binary was not built with, is refused with a message saying
//! so.
//!
//! Conversion (an old directory on the first start of a forkd whose default engine differs,
//! or an explicit `--meta-engine`): every record is copied into `meta.new/` with progress
//! lines, made durable there, and only then does the switch happen, in steps that a crash at any
//! point leaves recoverable. The file `converting` (naming the target engine) is written once
//! `meta.new/` is complete and durable; from then on every start finishes the switch:
//! `meta/` becomes `meta.old/`, `meta.new/` becomes `meta/`, `format` names the new engine,
//! `meta.old/` is removed, then `converting`. Without `converting`, a `meta.new/` is an
//! unfinished copy and is removed; the old metadata is untouched until the switch.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use metakv::{Batch, Engine, MetaKv};

/// The format this forkd writes (and the newest it reads).
pub(super) const CURRENT: u32 = 3;
/// Records copied per batch while converting.
const COPY_BATCH: usize = 50_000;

/// What the `format` file says (format 1, sled, when it is absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Format {
    pub(super) version: u32,
    pub(super) engine: Engine,
}

/// Read `DIR/format`. `Ok(None)`: there is none (a new directory, or one of format 1).
pub(super) fn read(dir: &Path) -> Result<Option<Format>, String> {
    let path = dir.join("format");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let field =
        |name: &str| text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' '))).map(str::trim);
    let version: u32 = field("format")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{} is damaged: it names no format version", path.display()))?;
    if version > CURRENT {
        return Err(format!(
            "it was written by a newer forkd (data directory format {version}); this forkd reads formats 1 to \
             {CURRENT}: upgrade forkd"
        ));
    }
    let name = field("engine").ok_or_else(|| format!("{} is damaged: it names no metadata engine", path.display()))?;
    let engine =
        Engine::from_name(name).ok_or_else(|| format!("its metadata engine `{name}` is unknown to this forkd"))?;
    Ok(Some(Format { version, engine }))
}

/// Write `DIR/format` for `engine`, durably (a new file, renamed into place, directory synced).
pub(super) fn write(dir: &Path, engine: Engine) -> std::io::Result<()> {
    let tmp = dir.join("format.tmp");
    let mut f = File::create(&tmp)?;
    write!(f, "forkd data directory\nformat {CURRENT}\nengine {engine}\n")?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join("format"))?;
    File::open(dir)?.sync_all()
}

/// Open `meta/` with the engine the directory records, converting it first to `wanted` if
/// that was asked for explicitly, or if it is a format-1 directory and the default engine is
/// another. A new directory gets `wanted` or the default.
/// Call [`finish_conversion`] first.
pub(super) fn open_meta(dir: &Path, wanted: Option<Engine>) -> Result<Arc<dyn MetaKv>, String> {
    let meta = dir.join("meta");
    let recorded = read(dir)?;
    let fresh = !meta.exists();
    let current = match recorded {
        Some(f) => f.engine,
        None if fresh => wanted.unwrap_or(Engine::DEFAULT),
        None => format_1(&meta)?,
    };
    let target = match (wanted, recorded) {
        (Some(w), _) => w,
        (None, None) if !fresh => Engine::DEFAULT,
        _ => current,
    };
    for e in [current, target] {
        if !e.is_built() {
            return Err(format!("its metadata engine is {e}, and this forkd was built without it"));
        }
    }
    if fresh {
        write(dir, target).map_err(|e| format!("cannot write its format file: {e}"))?;
    } else if target != current {
        convert(dir, current, target)?;
    } else if recorded.is_none_or(|f| f.version < CURRENT) {
        write(dir, current).map_err(|e| format!("cannot write its format file: {e}"))?;
    }
    metakv::open(target, &meta).map_err(|e| {
        format!(
            "cannot open its metadata store ({target}): {e}. If meta/ is damaged, restore it from a backup \
             together with extents.0 from the same time"
        )
    })
}

/// A `meta/` without a `format` file beside it must be format 1's sled store (sled's `conf`
/// or `db`, or nothing yet). Anything else means `format` was lost (a copy that left it
/// behind): opening it as sled would start an empty catalog, so it is refused.
fn format_1(meta: &Path) -> Result<Engine, String> {
    let names: Vec<String> = fs::read_dir(meta)
        .map_err(|e| format!("cannot read {}: {e}", meta.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() || names.iter().any(|n| n == "conf" || n == "db") {
        return Ok(Engine::Sled);
    }
    Err(format!(
        "its `format` file is missing, and meta/ is not the sled store of a format-1 directory (it holds {}): \
         copy `format` back from where this directory came from (for a redb store it reads \
         `forkd data directory`, `format {CURRENT}`, `engine redb` on three lines)",
        names.join(", ")
    ))
}

/// The engine of an existing `meta/`: what `format` records, or format 1's sled (checked).
/// For the commands that open a stopped daemon's directory as it is (`check`, `compact`).
pub(super) fn existing_engine(dir: &Path) -> Result<Engine, String> {
    match read(dir)? {
        Some(f) => Ok(f.engine),
        None => format_1(&dir.join("meta")),
    }
}

/// Copy every record of `meta/` (engine `from`) into `meta.new/` (engine `to`), make it durable,
/// then switch (see the module documentation).
fn convert(dir: &Path, from: Engine, to: Engine) -> Result<(), String> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| format!("converting its metadata from {from} to {to}: {what}: {e}");
    let new = dir.join("meta.new");
    if new.exists() {
        fs::remove_dir_all(&new).map_err(|e| fail("cannot remove an unfinished meta.new", &e))?;
    }
    tracing::info!(%from, %to, "converting the metadata store; the old one is kept until the new one is durable");
    let t = Instant::now();
    let copied = {
        let old = metakv::open(from, &dir.join("meta")).map_err(|e| fail("cannot open meta/", &e))?;
        let target = metakv::open(to, &new).map_err(|e| fail("cannot create meta.new", &e))?;
        let n = copy_all(old.as_ref(), target.as_ref()).map_err(|e| fail("copy", &e))?;
        target.commit().map_err(|e| fail("cannot make meta.new durable", &e))?;
        n
    };
    let mut f = File::create(dir.join("converting")).map_err(|e| fail("cannot write `converting`", &e))?;
    writeln!(f, "{to}").and_then(|()| f.sync_all()).map_err(|e| fail("cannot write `converting`", &e))?;
    sync_dir(dir).map_err(|e| fail("cannot sync the data directory", &e))?;
    finish_conversion(dir)?;
    tracing::info!(records = copied, seconds = t.elapsed().as_secs_f64(), %to, "converted the metadata store");
    Ok(())
}

/// Copy every record, in batches, with a progress line every million records.
fn copy_all(from: &dyn MetaKv, to: &dyn MetaKv) -> metakv::Result<u64> {
    let mut batch = Batch::default();
    let mut n = 0u64;
    let mut result = Ok(());
    from.scan_prefix(b"", &mut |k, v| {
        if result.is_err() {
            return;
        }
        batch.put(k, v);
        n += 1;
        if batch.ops().len() >= COPY_BATCH {
            result = to.apply(&std::mem::take(&mut batch));
        }
        if n.is_multiple_of(1_000_000) {
            tracing::info!(records = n, "converting the metadata store");
        }
    })?;
    result?;
    to.apply(&batch)?;
    Ok(n)
}

/// If `converting` exists, `meta.new/` (or, after a crash part-way, `meta/`) holds the complete
/// converted store: finish the switch. Each step can be repeated. Otherwise remove a stale
/// `meta.new/`. Runs at start before anything else looks at `meta/`.
pub(super) fn finish_conversion(dir: &Path) -> Result<(), String> {
    let (meta, new, old) = (dir.join("meta"), dir.join("meta.new"), dir.join("meta.old"));
    let marker = dir.join("converting");
    let fail = |what: &str, e: std::io::Error| format!("finishing the conversion of its metadata: {what}: {e}");
    let Ok(text) = fs::read_to_string(&marker) else {
        if new.exists() {
            fs::remove_dir_all(&new).map_err(|e| fail("cannot remove an unfinished meta.new", e))?;
        }
        return Ok(());
    };
    let to =
        Engine::from_name(text.trim()).ok_or_else(|| format!("its file `converting` names no engine: {text:?}"))?;
    if new.exists() {
        if meta.exists() {
            fs::rename(&meta, &old).map_err(|e| fail("meta/ to meta.old/", e))?;
        }
        fs::rename(&new, &meta).map_err(|e| fail("meta.new/ to meta/", e))?;
        sync_dir(dir).map_err(|e| fail("sync", e))?;
    }
    write(dir, to).map_err(|e| fail("cannot write the format file", e))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(|e| fail("cannot remove meta.old/", e))?;
    }
    fs::remove_file(&marker).map_err(|e| fail("cannot remove `converting`", e))?;
    sync_dir(dir).map_err(|e| fail("sync", e))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
