//! The operation log on the store: appending an entry durably and reading entries back (the
//! entries, their keys and retention are the catalog's: `catalog/src/oplog.rs`).
//!
//! Logging never fails an operation: an entry that cannot be written is a warning in the
//! daemon's own log, and on a full disk (low-space mode) nothing is written at all, so the log
//! never takes the room that deletes and trims need. An appended entry is flushed at once, so
//! an operation the API answered is in the log even after a `kill -9`.
//!
//! Locking: the append takes the catalog's write lock for the commit only; the flush runs as
//! every flush does. Reads take the shared lock.

use std::sync::atomic::Ordering;

use catalog::{LogEntry, LogQuery, LogRetention};

use super::{Result, Store};

impl Store {
    /// Append `entry` to the operation log (its `seq` is assigned) and make it durable. A
    /// failure is logged as a warning, never returned: the operation it describes stands.
    pub fn log_operation(&self, entry: LogEntry) {
        if self.low_space.load(Ordering::SeqCst) {
            tracing::warn!(what = %entry.what, target = ?entry.target, "the disk is full: operation not logged");
            return;
        }
        let what = entry.what.clone();
        let appended = self.catalog_mut().append_log(entry, now_ms());
        if let Err(e) = appended.map_err(Into::into).and_then(|_| self.flush()) {
            tracing::warn!(%what, error = %e, "could not write the operation log");
        }
    }

    /// The operation log entries `query` selects, oldest first.
    pub fn operation_log(&self, query: &LogQuery) -> Result<Vec<LogEntry>> {
        Ok(self.catalog().log_entries(query)?)
    }

    /// How much of the operation log is kept (applied at the next append).
    pub fn set_log_retention(&self, retention: LogRetention) {
        self.catalog_mut().set_log_retention(retention);
    }
}

/// Now, in unix milliseconds.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
