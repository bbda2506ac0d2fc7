//! The store as the SCSI model's block device, and the batch the commands of one socket read
//! run in.
//!
//! A [`Batch`] holds its LUN's lock (reservations, mode parameters) while its
//! commands run, in order; their writes are queued in the [`VolumeLun`] and committed together
//! (one group commit) before anything else touches the volume, so the model always sees its
//! own writes; the answers are built once the writes are done, so a failed write still fails
//! its command.

use std::cell::RefCell;

use bytes::Bytes;
use iscsi::scsi::{self, Backend, BackendError, LunState, ScsiOutcome};
use iscsi::session::{Command, Session};
use iscsi::Digests;

use super::full_feature::{Export, Out};
use crate::store::{BlockState, Store, StoreError};

/// The commands of one read from the socket: they run in order under the LUN's lock, their
/// writes are committed together (one group commit) before anything else touches the volume,
/// and their answers are built once those writes are done, so a failed write still fails its
/// command.
pub(super) struct Batch<'a> {
    store: &'a Store,
    export: Option<&'a Export>,
    dev: Option<VolumeLun<'a>>,
    state: Option<std::sync::MutexGuard<'a, LunState>>,
    pending: Vec<(Command, Option<ScsiOutcome>, std::ops::Range<usize>)>,
}

impl<'a> Batch<'a> {
    pub(super) fn new(store: &'a Store, export: Option<&'a Export>) -> Batch<'a> {
        Batch { store, export, dev: None, state: None, pending: Vec::new() }
    }

    /// Run a command (a failed one just waits for its answer with the others).
    pub(super) fn run(&mut self, cmd: Command, nexus: &str) {
        let Some(x) = self.export.filter(|_| cmd.fail.is_none()) else {
            self.pending.push((cmd, None, 0..0));
            return;
        };
        let dev = self.dev.get_or_insert_with(|| VolumeLun::new(self.store, &x.reference));
        let state = self.state.get_or_insert_with(|| x.lun.lock().unwrap_or_else(|p| p.into_inner()));
        let start = dev.writes();
        let o = scsi::execute(&cmd.cdb, &cmd.data_out, cmd.lun, nexus, dev, state);
        let end = dev.writes();
        self.pending.push((cmd, Some(o), start..end));
    }

    /// Commits the batch's writes, appends every pending command's answer to `out` and lets go
    /// of the LUN; returns how many were answered with CHECK CONDITION.
    pub(super) fn finish(&mut self, session: &mut Session, out: &mut Out, digests: Digests) -> u64 {
        if let Some(dev) = &self.dev {
            let _ = dev.commit();
        }
        let mut failed = 0;
        for (cmd, mut outcome, writes) in self.pending.drain(..) {
            if let Some(e) = self.dev.as_ref().and_then(|d| d.failure(writes)) {
                outcome = Some(scsi::failed_write(e));
            }
            if let Some(sense) = outcome.as_ref().and_then(|o| o.sense.as_ref()) {
                failed += 1;
                let key = format!("{:#04x}", sense.key);
                self.store.metrics.iscsi_check_conditions.with_label_values(&[&key]).inc();
            }
            for p in session.complete(cmd, outcome) {
                out.push(&p, digests);
            }
        }
        self.state = None;
        failed
    }
}

/// A volume or snapshot as the SCSI model's [`Backend`]. Writes are queued and committed
/// together ([`VolumeLun::commit`]) before any other operation, so the model always sees its
/// own writes.
struct VolumeLun<'a> {
    store: &'a Store,
    reference: &'a str,
    blocks: u64,
    read_only: bool,
    queued: RefCell<Vec<(String, u64, Bytes)>>,
    /// One entry per committed write: its error, if it failed.
    results: RefCell<Vec<Option<BackendError>>>,
}

impl<'a> VolumeLun<'a> {
    fn new(store: &'a Store, reference: &'a str) -> VolumeLun<'a> {
        let (blocks, read_only) = match store.catalog().target(reference) {
            Ok(t) => (t.size_bytes / u64::from(scsi::LOGICAL_BLOCK_SIZE), t.read_only),
            Err(_) => (0, true),
        };
        VolumeLun { store, reference, blocks, read_only, queued: RefCell::default(), results: RefCell::default() }
    }

    /// Writes queued or committed so far (indexes for [`VolumeLun::failure`]).
    fn writes(&self) -> usize {
        self.results.borrow().len() + self.queued.borrow().len()
    }

    /// Commits the queued writes as one group; `Err` if any of them failed.
    fn commit(&self) -> Result<(), BackendError> {
        let queued = std::mem::take(&mut *self.queued.borrow_mut());
        if queued.is_empty() {
            return Ok(());
        }
        let mut first = None;
        let mut results = self.results.borrow_mut();
        for r in self.store.write_many(queued) {
            let e = r.err().map(|e| backend_error(&e));
            first = first.or(e);
            results.push(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// The first failure among the writes with these indexes.
    fn failure(&self, writes: std::ops::Range<usize>) -> Option<BackendError> {
        self.results.borrow().get(writes).and_then(|r| r.iter().flatten().next().copied())
    }
}

fn backend_error(e: &StoreError) -> BackendError {
    match e {
        e if crate::store::is_enospc(e) => BackendError::NoSpace,
        StoreError::Catalog(catalog::CatalogError::QuotaExceeded { .. }) => BackendError::NoSpace,
        StoreError::Catalog(catalog::CatalogError::ReadOnly(_)) => BackendError::ReadOnly,
        _ => {
            tracing::warn!(error = %e, "iSCSI I/O failed");
            BackendError::Io
        }
    }
}

const LB: u64 = scsi::LOGICAL_BLOCK_SIZE as u64;

impl Backend for VolumeLun<'_> {
    fn read(&self, lba: u64, _blocks: u32, buf: &mut [u8]) -> Result<(), BackendError> {
        // A failed queued write fails its own command; the read goes on.
        let _ = self.commit();
        self.store.read(self.reference, lba * LB, buf).map_err(|e| backend_error(&e))
    }

    fn write(&self, lba: u64, data: &[u8]) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        self.queued.borrow_mut().push((self.reference.to_string(), lba * LB, Bytes::copy_from_slice(data)));
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.commit()?;
        self.store.flush().map_err(|e| backend_error(&e))
    }

    fn unmap(&self, ranges: &[(u64, u32)]) -> Result<(), BackendError> {
        let _ = self.commit();
        for &(lba, blocks) in ranges {
            self.store.zero_range(self.reference, lba * LB, u64::from(blocks) * LB).map_err(|e| backend_error(&e))?;
        }
        Ok(())
    }

    fn block_status(&self, lba: u64) -> Result<(bool, u64), BackendError> {
        let _ = self.commit();
        let off = lba * LB;
        let len = (self.blocks - lba.min(self.blocks)) * LB;
        let runs = self.store.block_status(self.reference, off, len, 1 << 30).map_err(|e| backend_error(&e))?;
        let Some(&(run, state)) = runs.first() else { return Ok((false, 1)) };
        Ok((state == BlockState::Data, (run / LB).max(1)))
    }

    fn capacity_blocks(&self) -> u64 {
        self.blocks
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}
