//! The flush generation: how the store notices that the metadata engine recovered to an
//! earlier point than its last completed flush (a damaged or truncated log that an engine
//! "recovers" silently, as sled does, noting only at DEBUG that it cut recovery short).
//!
//! Every flush takes the next generation number and writes it into the engine (key
//! [`metakv::GENERATION_KEY`]) after the map's batch and before the engine's commit; once that
//! commit returns, the number is written to the small file `flushed` beside `meta/`. So the
//! file never runs ahead of what a completed commit held. It is not fsynced (that would make a flush
//! several times slower): after a power cut it may hold an older number, which weakens the
//! check for that one start but never raises a false alarm. At start, if the engine holds a
//! smaller generation than the file, it lost flushed changes, and the store refuses to open
//! rather than serve an older catalog and map (whose slots new writes would reuse).
//!
//! Invariants: the engine's generation only grows (numbers are taken and written under `next`);
//! the file's only grows (written under `written`, never with a smaller number). A missing
//! file (a data directory from before it existed, or a crash before the first flush wrote
//! it) only skips the check once; a new metadata store starts the count again. A file that does not read back (wrong size or checksum) is
//! reported and rewritten, not trusted.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use metakv::{MetaKv, GENERATION_KEY as KEY};

/// The generation file: the number (8 bytes LE) and its crc32 (4 bytes LE).
#[derive(Debug)]
pub(super) struct Generation {
    file: File,
    /// The last number taken, under the lock that orders writes of it into the engine.
    next: Mutex<u64>,
    /// The largest number written to the file.
    written: Mutex<u64>,
}

impl Generation {
    /// Check the engine's generation against the file's (`Err` says what was found and what to do)
    /// and open the file for the flushes to come.
    /// A `fresh` metadata store (just created) has nothing to check: the file is reset.
    pub(super) fn open(dir: &Path, kv: &dyn MetaKv, fresh: bool) -> Result<Generation, String> {
        let in_meta = in_meta(kv)?;
        let path = dir.join("flushed");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let on_file = if fresh { None } else { read(&mut file) };
        if let Some(flushed) = on_file {
            if in_meta < flushed {
                return Err(format!(
                    "its metadata store (meta/) recovered to flush {in_meta}, but flush {flushed} had \
                     completed: meta/ is damaged or was replaced by an older copy, and what was written \
                     since is lost from it. Restore meta/ from a backup (with extents.0 from the same \
                     time), or, to accept the loss and start from what meta/ holds, remove the file \
                     `flushed`"
                ));
            }
        } else if !fresh && file.metadata().is_ok_and(|m| m.len() > 0) {
            tracing::warn!("the flush generation file does not read back; it is rewritten at the next flush");
        }
        Ok(Generation { file, next: Mutex::new(in_meta), written: Mutex::new(on_file.unwrap_or(0)) })
    }

    /// Take the next generation and write it into the engine (before the commit that makes it
    /// durable). Returns the number, for [`Generation::completed`].
    pub(super) fn stamp(&self, kv: &dyn MetaKv) -> metakv::Result<u64> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let g = *next + 1;
        let mut batch = metakv::Batch::default();
        batch.put(KEY, &g.to_le_bytes());
        kv.apply(&batch)?;
        *next = g;
        Ok(g)
    }

    /// Record that the commit covering generation `g` completed.
    pub(super) fn completed(&self, g: u64) -> std::io::Result<()> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if g <= *written {
            return Ok(());
        }
        let buf = encode(g);
        // 12 bytes at offset 0: within one sector, so a cut leaves the old or the new number.
        // Not fsynced: the file only has to never run ahead of the engine, and it is written
        // after its commit returned. Lost in a power cut, it merely checks against an older
        // number; an fdatasync here would cost several times the rest of the flush.
        self.file.write_all_at(&buf, 0)?;
        *written = g;
        Ok(())
    }
}

/// The generation the engine holds (0 for a store that never flushed).
pub(super) fn in_meta(kv: &dyn MetaKv) -> Result<u64, String> {
    match kv.get(KEY).map_err(|e| format!("cannot read its flush generation: {e}"))? {
        Some(v) => Ok(u64::from_le_bytes(v[..].try_into().map_err(|_| "its flush generation is damaged")?)),
        None => Ok(0),
    }
}

/// The file's 12 bytes for generation `g`.
fn encode(g: u64) -> [u8; 12] {
    let mut buf = [0u8; 12];
    buf[..8].copy_from_slice(&g.to_le_bytes());
    let crc = crc32fast::hash(&buf[..8]);
    buf[8..].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// The generation `flushed` in `dir` holds, if it reads back whole (for `forkd check`).
pub(super) fn read_file(dir: &Path) -> Option<u64> {
    read(&mut File::open(dir.join("flushed")).ok()?)
}

/// Accept a metadata store at generation `g` (`forkd repair --accept-loss`): `flushed` is
/// replaced, durably, by one holding `g`.
pub(super) fn accept(dir: &Path, g: u64) -> std::io::Result<()> {
    let tmp = dir.join("flushed.tmp");
    let f = File::create(&tmp)?;
    f.write_all_at(&encode(g), 0)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("flushed"))?;
    File::open(dir)?.sync_all()
}

/// The number in the generation file, if it reads back whole.
fn read(file: &mut File) -> Option<u64> {
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).ok()?;
    let (num, crc) = (buf.get(..8)?, buf.get(8..12)?);
    if buf.len() != 12 || crc32fast::hash(num).to_le_bytes() != crc {
        return None;
    }
    Some(u64::from_le_bytes(num.try_into().ok()?))
}
