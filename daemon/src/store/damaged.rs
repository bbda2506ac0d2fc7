//! The register of damaged slots, and how it reaches the ingest agent.
//!
//! The register (`damaged-slots` in the data directory, fsynced at every change) holds the
//! slots a scrub or a read found damaged. The digests answered to the ingest agent carry
//! a poisoned digest (its bitwise complement, which no content matching the stored digest can
//! have) for every block in a registered slot that still fails its crc when the route checks
//! it again, so the agent sends that block again and the next snapshot holds a good copy.
//! A registered slot whose data checks out again (freed and reused since) leaves the register
//! there; a complete scrub replaces what it checked with what it found. Kept in its own small
//! file, so it survives a restart without touching the metadata store's format.
//!
//! Locking: the register has its own mutex, taken briefly and never while waiting for the
//! catalog lock.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use catalog::Entry;

use super::{Result, Store};

/// Damaged slots a scrub registers (4 GiB of data): beyond that, a disk is lost rather than
/// damaged, and the register would only cost memory.
pub(super) const MAX_REGISTERED: usize = 1 << 20;
/// The register's file in the data directory.
const REGISTER_FILE: &str = "damaged-slots";
const BS: usize = 4096;

impl Store {
    /// A list of `(block, digest)` for the ingest agent, for [`Store::finish_digests`].
    pub(super) fn digest_list(&self) -> DigestList {
        DigestList { damaged: self.scrub.register.snapshot(), out: Vec::new(), marked: Vec::new() }
    }

    /// The digests of `list`, each block in a registered damaged slot that fails its crc now
    /// poisoned so the agent sends it again. The caller holds the catalog lock the entries
    /// were found under.
    pub(super) fn finish_digests(&self, source: &str, list: DigestList) -> Result<Vec<(u64, u64)>> {
        let DigestList { mut out, mut marked, .. } = list;
        if marked.is_empty() {
            return Ok(out);
        }
        marked.sort_unstable_by_key(|(i, e)| (e.slot, *i));
        let slots: Vec<(u64, u32)> = marked.iter().map(|(_, e)| (e.slot, e.crc)).collect();
        let mut buf = vec![0u8; slots.len() * BS];
        let bad = self.check_slots(&slots, &mut buf);
        let (mut poisoned, mut healed) = (0u64, Vec::new());
        for ((i, e), bad) in marked.iter().zip(bad) {
            if bad {
                out[*i].1 = !e.digest;
                poisoned += 1;
            } else {
                healed.push(e.slot);
            }
        }
        self.scrub.register.remove(&healed);
        if poisoned > 0 {
            tracing::warn!(source, blocks = poisoned, "damaged blocks offered to the ingest agent for re-sending");
        }
        Ok(out)
    }
}

/// `(block, digest)` pairs being collected for the ingest agent, with the blocks whose slot
/// the register names (checked again by [`Store::finish_digests`]).
#[derive(Debug)]
pub(super) struct DigestList {
    damaged: BTreeSet<u64>,
    out: Vec<(u64, u64)>,
    marked: Vec<(usize, Entry)>,
}

impl DigestList {
    /// Add block `block` holding `e` (a data entry).
    pub(super) fn push(&mut self, block: u64, e: Entry) {
        if !self.damaged.is_empty() && self.damaged.contains(&e.slot) {
            self.marked.push((self.out.len(), e));
        }
        self.out.push((block, e.digest));
    }
}

/// The slots found damaged, in memory and in `damaged-slots`: one decimal slot number a line,
/// appended (and `fdatasync`ed) as reads find damage, rewritten whole (a temporary file, fsync,
/// rename) when slots leave it. A line torn by a crash is skipped when read back (or names a
/// wrong slot, which is checked and dropped like any healed one).
#[derive(Debug)]
pub(super) struct Register {
    path: PathBuf,
    slots: Mutex<BTreeSet<u64>>,
}

impl Register {
    /// The register as last written; an unreadable file is reported and starts empty (the next
    /// scrub finds the damage again).
    pub(super) fn load(dir: &Path) -> Register {
        let path = dir.join(REGISTER_FILE);
        let slots = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let (slots, bad) = parse_register(&text);
                if bad > 0 {
                    tracing::warn!(path = %path.display(), lines = bad, "skipping malformed lines of the register of damaged slots");
                }
                slots
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the register of damaged slots");
                BTreeSet::new()
            }
        };
        if !slots.is_empty() {
            tracing::warn!(
                slots = slots.len(),
                "slots were found damaged before: `forkd scrub` lists what still references them"
            );
        }
        Register { path, slots: Mutex::new(slots) }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn snapshot(&self) -> BTreeSet<u64> {
        self.lock().clone()
    }

    pub(super) fn add(&self, slots: &[u64]) {
        let mut set = self.lock();
        let new: Vec<u64> = slots.iter().copied().filter(|&s| set.insert(s)).collect();
        if !new.is_empty() {
            if let Err(e) = append_register(&self.path, &new) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot write the register of damaged slots");
            }
        }
    }

    pub(super) fn remove(&self, slots: &[u64]) {
        let mut set = self.lock();
        let before = set.len();
        slots.iter().for_each(|s| {
            set.remove(s);
        });
        if set.len() != before {
            self.save(&set);
        }
    }

    /// After a complete scrub: the slots registered when it started that it did not find
    /// damaged leave, those it found stay (and whatever reads added meanwhile).
    pub(super) fn replace_checked(&self, before: &BTreeSet<u64>, found: &BTreeSet<u64>) {
        let mut set = self.lock();
        let old = set.clone();
        set.retain(|s| !before.contains(s) || found.contains(s));
        set.extend(found);
        if *set != old {
            self.save(&set);
        }
    }

    /// Write the register durably (a temporary file, fsync, rename, fsync of the directory).
    /// A failure is logged: the register is a help for repair, the damage itself is found again.
    fn save(&self, set: &BTreeSet<u64>) {
        if let Err(e) = write_register(&self.path, set) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the register of damaged slots");
        }
    }
}

/// The slots a register file names, and how many of its lines are not slot numbers.
fn parse_register(text: &str) -> (BTreeSet<u64>, usize) {
    let (mut slots, mut bad) = (BTreeSet::new(), 0);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        match line.parse() {
            Ok(s) => {
                slots.insert(s);
            }
            Err(_) => bad += 1,
        }
    }
    (slots, bad)
}

const REGISTER_HEADER: &str = "# forkd: slots of extents.0 found damaged (see `forkd scrub`)\n";

fn slot_lines(text: &mut String, slots: impl IntoIterator<Item = u64>) {
    for s in slots {
        text.push_str(&s.to_string());
        text.push('\n');
    }
}

/// Append `slots` to the register file (created with its header if missing), durably.
fn append_register(path: &Path, slots: &[u64]) -> std::io::Result<()> {
    let created = !path.exists();
    let mut f = std::fs::OpenOptions::new().read(true).create(true).append(true).open(path)?;
    let mut text = if created { REGISTER_HEADER.to_string() } else { String::new() };
    // After a line torn by a crash, start a new line rather than extend it.
    let len = f.metadata()?.len();
    let mut last = [b'\n'];
    if len > 0 {
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut last, len - 1)?;
    }
    if last[0] != b'\n' {
        text.push('\n');
    }
    slot_lines(&mut text, slots.iter().copied());
    f.write_all(text.as_bytes())?;
    f.sync_data()?;
    if created {
        std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()?;
    }
    Ok(())
}

fn write_register(path: &Path, set: &BTreeSet<u64>) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if set.is_empty() {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    } else {
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        let mut text = REGISTER_HEADER.to_string();
        slot_lines(&mut text, set.iter().copied());
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
    }
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_round_trips_and_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Register::load(dir.path());
        assert!(r.snapshot().is_empty());
        r.add(&[7, 3, 7]);
        assert_eq!(Register::load(dir.path()).snapshot(), BTreeSet::from([3, 7]));
        // A scrub that found 9 and not 3 (registered before it) keeps 7 only if a read added it
        // meanwhile: here 7 was registered before too, so it leaves.
        r.replace_checked(&BTreeSet::from([3, 7]), &BTreeSet::from([9]));
        assert_eq!(Register::load(dir.path()).snapshot(), BTreeSet::from([9]));
        r.remove(&[9]);
        assert!(!dir.path().join(REGISTER_FILE).exists());
        assert!(Register::load(dir.path()).snapshot().is_empty());
    }

    #[test]
    fn malformed_lines_of_a_register_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(REGISTER_FILE), "# header\n12\nnot a slot\n\n5\n4x").expect("write");
        assert_eq!(Register::load(dir.path()).snapshot(), BTreeSet::from([5, 12]));
        // What is appended after a torn line starts a line of its own.
        let r = Register::load(dir.path());
        r.add(&[12, 99]);
        let text = std::fs::read_to_string(dir.path().join(REGISTER_FILE)).expect("read");
        assert!(text.ends_with("\n4x\n99\n"), "{text:?}");
        assert_eq!(Register::load(dir.path()).snapshot(), BTreeSet::from([5, 12, 99]));
    }
}
