//! The operation log: who did what to which volume, when, for how long, and how it ended.
//!
//! Entries live in the same metadata engine as the catalog, under `cL` + the entry's sequence
//! number (8 bytes, big-endian, so a scan returns them in order), as JSON; the next sequence
//! number is kept under `cL` itself, so numbers never go back even when retention removed every
//! entry. An append is committed into the map like any catalog operation (one batch: the entry,
//! the counter and the entries retention removes); it is durable at the store's next flush.
//!
//! An in-memory index (sequence, start time, target) of every stored entry is loaded at open:
//! retention removes the oldest entries from its front without reading them, and a query reads
//! only the entries it returns (through the map, which sees the write-back layer, so an entry
//! is readable as soon as it is appended). Retention is applied on append, oldest first: an
//! entry goes when there are more than `max_entries`, or when it started more than `max_age_ms`
//! before the append (the front is checked in sequence order, so an old-started entry behind a
//! younger one waits for it; an ingest that ran for hours is the only way to get one).
//!
//! Locking: part of the [`Catalog`], behind the store's lock; append with no transaction open.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::{Catalog, CatalogError, Result};

/// Key prefix of log entries; the key of the counter.
const K_LOG: &[u8] = b"cL";

/// One operation, from the API or the daemon's own work.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Assigned when appended; strictly increasing, survives a restart.
    pub seq: u64,
    /// Start, unix milliseconds.
    pub at: i64,
    /// Peer address (`127.0.0.1:51234`), or `daemon` for the daemon's own work.
    pub who: String,
    /// `clone`, `snapshot`, `delete`, `rewind`, `hook configure-clone`, ...
    pub what: String,
    /// The volume, snapshot or environment acted on.
    pub target: Option<String>,
    /// Wall time of the operation.
    pub duration_ms: u64,
    /// `ok` or `failed`.
    pub result: String,
    /// Why it failed.
    pub error: Option<String>,
    /// Free text, e.g. a hook's script, exit status and (bounded) output.
    pub detail: Option<String>,
}

/// How much of the log is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRetention {
    /// Entries that started longer ago than this (milliseconds) are removed.
    pub max_age_ms: u64,
    /// At most this many entries are kept.
    pub max_entries: u64,
}

impl Default for LogRetention {
    /// 30 days, 100,000 entries.
    fn default() -> Self {
        LogRetention { max_age_ms: 30 * DAY_MS, max_entries: 100_000 }
    }
}

/// Which entries a query returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogQuery {
    /// Only entries whose target is this volume or one of its snapshots (`VOLUME@...`).
    pub volume: Option<String>,
    /// Only entries that started at or after this instant (unix milliseconds).
    pub since: Option<i64>,
    /// At most this many: the newest ones.
    pub limit: Option<usize>,
}

/// What the index keeps of one stored entry.
#[derive(Clone, Debug)]
struct Row {
    seq: u64,
    at: i64,
    target: Option<String>,
}

/// The log's in-memory index and settings, one field of the [`Catalog`].
#[derive(Debug, Default)]
pub(crate) struct OpLog {
    rows: VecDeque<Row>,
    next_seq: u64,
    retention: LogRetention,
}

const DAY_MS: u64 = 86_400_000;

fn entry_key(seq: u64) -> Vec<u8> {
    let mut key = K_LOG.to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// True when an entry about `target` concerns `volume`: the volume itself or one of its
/// snapshots.
fn concerns(target: Option<&str>, volume: &str) -> bool {
    target.is_some_and(|t| t == volume || t.strip_prefix(volume).is_some_and(|rest| rest.starts_with('@')))
}

impl OpLog {
    /// Load the index from the engine (at open, before any change).
    pub(crate) fn load(map: &blockmap::BlockMap) -> Result<OpLog> {
        let mut log = OpLog { next_seq: 1, ..OpLog::default() };
        for (key, val) in map.scan_meta(K_LOG)? {
            let Some(seq) = key.get(K_LOG.len()..).and_then(|s| <[u8; 8]>::try_from(s).ok()) else {
                if key.len() == K_LOG.len() {
                    log.next_seq = log.next_seq.max(decode_counter(&val)?);
                }
                continue;
            };
            let seq = u64::from_be_bytes(seq);
            let e: LogEntry = serde_json::from_slice(&val)
                .map_err(|_| CatalogError::Corrupt(format!("operation log entry {seq}")))?;
            log.rows.push_back(Row { seq, at: e.at, target: e.target });
            log.next_seq = log.next_seq.max(seq + 1);
        }
        Ok(log)
    }
}

fn decode_counter(val: &[u8]) -> Result<u64> {
    let bytes = <[u8; 8]>::try_from(val).map_err(|_| CatalogError::Corrupt("operation log counter".into()))?;
    Ok(u64::from_le_bytes(bytes))
}

/// Parse a span such as `30d`, `12h`, `30m`, `45s`, `2w` or `500ms` into milliseconds.
pub fn parse_span(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => DAY_MS,
        "w" => 7 * DAY_MS,
        _ => return None,
    };
    n.checked_mul(ms)
}

impl Catalog {
    /// Set how much of the operation log is kept (applied at the next append).
    pub fn set_log_retention(&mut self, retention: LogRetention) {
        self.log.retention = retention;
    }

    /// Append `entry` (its `seq` is assigned and returned) and remove what retention no longer
    /// keeps at `now` (unix milliseconds), in one commit. Call with no transaction open.
    pub fn append_log(&mut self, mut entry: LogEntry, now: i64) -> Result<u64> {
        let seq = self.log.next_seq;
        entry.seq = seq;
        let json =
            serde_json::to_vec(&entry).map_err(|_| CatalogError::Corrupt(format!("operation log entry {seq}")))?;
        self.map.put_meta(&entry_key(seq), json);
        self.map.put_meta(K_LOG, (seq + 1).to_le_bytes().to_vec());
        let expired = self.log.expired(now, 1);
        for row in self.log.rows.iter().take(expired) {
            self.map.remove_meta(&entry_key(row.seq));
        }
        if let Err(e) = self.map.commit() {
            self.map.rollback();
            return Err(e.into());
        }
        self.log.rows.drain(..expired);
        self.log.rows.push_back(Row { seq, at: entry.at, target: entry.target });
        self.log.next_seq = seq + 1;
        Ok(seq)
    }

    /// The entries `query` selects, oldest first (the newest `limit` of them).
    pub fn log_entries(&self, query: &LogQuery) -> Result<Vec<LogEntry>> {
        let selected = self.log.rows.iter().rev().filter(|r| {
            query.since.is_none_or(|t| r.at >= t)
                && query.volume.as_deref().is_none_or(|v| concerns(r.target.as_deref(), v))
        });
        let mut out = Vec::new();
        for row in selected.take(query.limit.unwrap_or(usize::MAX)) {
            let corrupt = || CatalogError::Corrupt(format!("operation log entry {}", row.seq));
            let val = self.map.get_meta(&entry_key(row.seq))?.ok_or_else(corrupt)?;
            out.push(serde_json::from_slice(&val).map_err(|_| corrupt())?);
        }
        out.reverse();
        Ok(out)
    }
}

impl OpLog {
    /// How many entries from the front retention removes at `now`, making room for `adding`
    /// more.
    fn expired(&self, now: i64, adding: u64) -> usize {
        let keep = usize::try_from(self.retention.max_entries.saturating_sub(adding)).unwrap_or(usize::MAX);
        let over = self.rows.len().saturating_sub(keep);
        let oldest = now.saturating_sub(i64::try_from(self.retention.max_age_ms).unwrap_or(i64::MAX));
        let old = self.rows.iter().skip(over).take_while(|r| r.at < oldest).count();
        over + old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> Catalog {
        let kv = metakv::open(metakv::Engine::DEFAULT, &dir.join("meta")).expect("open meta");
        Catalog::open(kv).expect("open catalog")
    }

    fn entry(at: i64, what: &str, target: Option<&str>) -> LogEntry {
        LogEntry {
            at,
            who: "127.0.0.1:4000".into(),
            what: what.into(),
            target: target.map(str::to_string),
            result: "ok".into(),
            ..LogEntry::default()
        }
    }

    /// What the store's flush does before a restart.
    fn close(mut cat: Catalog) {
        cat.map_mut().flush_store().expect("flush");
    }

    fn whats(entries: &[LogEntry]) -> Vec<&str> {
        entries.iter().map(|e| e.what.as_str()).collect()
    }

    fn all() -> LogQuery {
        LogQuery::default()
    }

    #[test]
    fn entries_are_ordered_filtered_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cat = open(dir.path());
        let s1 = cat.append_log(entry(1000, "create source", Some("db")), 1000).expect("append");
        let s2 = cat.append_log(entry(2000, "snapshot", Some("db")), 2000).expect("append");
        cat.append_log(entry(3000, "clone", Some("db2")), 3000).expect("append");
        cat.append_log(entry(4000, "delete", Some("db@1")), 4000).expect("append");
        cat.append_log(entry(5000, "scrub", None), 5000).expect("append");
        assert!(s1 < s2);
        let got = cat.log_entries(&all()).expect("entries");
        assert_eq!(whats(&got), ["create source", "snapshot", "clone", "delete", "scrub"]);
        assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
        let db = LogQuery { volume: Some("db".into()), ..all() };
        assert_eq!(whats(&cat.log_entries(&db).expect("db")), ["create source", "snapshot", "delete"]);
        let since = LogQuery { since: Some(3000), ..all() };
        assert_eq!(whats(&cat.log_entries(&since).expect("since")), ["clone", "delete", "scrub"]);
        let newest = LogQuery { limit: Some(2), ..all() };
        assert_eq!(whats(&cat.log_entries(&newest).expect("limit")), ["delete", "scrub"]);
        let last = got.last().expect("last").seq;
        close(cat);

        let mut cat = open(dir.path());
        let again = cat.log_entries(&all()).expect("entries after reopen");
        assert_eq!(again, got, "the log is the same after a reopen");
        let next = cat.append_log(entry(6000, "rewind", Some("db2")), 6000).expect("append");
        assert_eq!(next, last + 1, "numbers go on from where they were");
    }

    #[test]
    fn retention_removes_the_oldest_by_count_and_age() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cat = open(dir.path());
        cat.set_log_retention(LogRetention { max_age_ms: 10_000, max_entries: 3 });
        for i in 0..5 {
            cat.append_log(entry(1000 + i, &format!("op{i}"), Some("v")), 1000 + i).expect("append");
        }
        assert_eq!(whats(&cat.log_entries(&all()).expect("entries")), ["op2", "op3", "op4"], "at most 3");
        // At 11,003 op2 (started 1002) is older than 10 s; op3 and op4 are not.
        cat.append_log(entry(11_003, "late", None), 11_003).expect("append");
        assert_eq!(whats(&cat.log_entries(&all()).expect("entries")), ["op3", "op4", "late"]);
        cat.append_log(entry(30_000, "later", None), 30_000).expect("append");
        assert_eq!(whats(&cat.log_entries(&all()).expect("entries")), ["later"], "everything else is too old");
        let last = cat.log_entries(&all()).expect("entries")[0].seq;
        close(cat);

        // The removals were committed, and numbering survives a log that retention emptied.
        let mut cat = open(dir.path());
        assert_eq!(whats(&cat.log_entries(&all()).expect("entries")), ["later"]);
        cat.set_log_retention(LogRetention { max_age_ms: 1, max_entries: 1 });
        let seq = cat.append_log(entry(90_000, "alone", None), 90_000).expect("append");
        assert_eq!(seq, last + 1);
        close(cat);
        let cat = open(dir.path());
        assert_eq!(whats(&cat.log_entries(&all()).expect("entries")), ["alone"]);
    }

    #[test]
    fn volume_filter_matches_the_volume_and_its_snapshots_only() {
        assert!(concerns(Some("db"), "db"));
        assert!(concerns(Some("db@3"), "db"));
        assert!(concerns(Some("db@latest"), "db"));
        assert!(!concerns(Some("db2"), "db"));
        assert!(!concerns(Some("db2@1"), "db"));
        assert!(!concerns(None, "db"));
    }

    #[test]
    fn spans() {
        assert_eq!(parse_span("30d"), Some(30 * DAY_MS));
        assert_eq!(parse_span("1h"), Some(3_600_000));
        assert_eq!(parse_span("30m"), Some(1_800_000));
        assert_eq!(parse_span("45s"), Some(45_000));
        assert_eq!(parse_span("500ms"), Some(500));
        assert_eq!(parse_span("2w"), Some(14 * DAY_MS));
        for bad in ["", "d", "30", "3x", "-1h", "1.5h", "99999999999999999999d"] {
            assert_eq!(parse_span(bad), None, "{bad}");
        }
    }
}
