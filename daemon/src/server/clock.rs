//! The daemon's clock: the "now" that leases (and anything else that runs on a schedule)
//! are measured by.
//!
//! By default it is the system clock. For tests, `forkd serve --clock-file FILE` (or
//! `FORKD_CLOCK_FILE`) injects time: "now" is the time written in FILE, as RFC 3339
//! (`2026-12-07T18:00:00Z`) or unix milliseconds, read again at every [`Clock::now_ms`], so a
//! test moves the daemon's time by rewriting the file and never sleeps for hours. A missing or
//! unreadable file falls back to the system clock with one logged error per distinct problem
//! (not one per read). Nothing here sleeps or keeps time itself.
//!
//! A clock that jumps forward makes everything due by then happen at the next tick; one that
//! jumps back makes nothing happen until the time comes again (docs/api.md, "Leases").

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where "now" comes from.
#[derive(Debug, Default)]
pub struct Clock {
    /// The clock file, when time is injected.
    file: Option<PathBuf>,
    /// The last problem logged with the file, so it is logged once.
    last_error: Mutex<Option<String>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// Time read from `file` at every call (see the module documentation).
    pub fn from_file(file: &Path) -> Clock {
        Clock { file: Some(file.to_path_buf()), last_error: Mutex::new(None) }
    }

    /// The clock file, when time is injected.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Now, in unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        let Some(file) = &self.file else { return crate::store::now_ms() };
        let read = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read the clock file {}: {e}", file.display()))
            .and_then(|text| {
                parse(&text).ok_or_else(|| {
                    format!(
                        "the clock file {} holds `{}`, not a time (RFC 3339 or unix milliseconds)",
                        file.display(),
                        text.trim()
                    )
                })
            });
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        match read {
            Ok(ms) => {
                *last = None;
                ms
            }
            Err(e) => {
                if last.as_deref() != Some(e.as_str()) {
                    tracing::error!(error = %e, "the system clock is used instead");
                    *last = Some(e);
                }
                crate::store::now_ms()
            }
        }
    }
}

/// A time as RFC 3339 or unix milliseconds.
pub fn parse(text: &str) -> Option<i64> {
    let t = text.trim();
    t.parse::<i64>().ok().or_else(|| catalog::parse_time(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_time_falls_back_to_the_system_clock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("now");
        let c = Clock::from_file(&f);
        let system = crate::store::now_ms();
        assert!(c.now_ms() >= system, "a missing file: the system clock");
        std::fs::write(&f, "1800000000000\n").expect("write");
        assert_eq!(c.now_ms(), 1_800_000_000_000);
        std::fs::write(&f, "2027-01-15T08:00:00Z").expect("write");
        assert_eq!(Some(c.now_ms()), catalog::parse_time("2027-01-15T08:00:00Z"));
        std::fs::write(&f, "soon").expect("write");
        assert!(c.now_ms() >= system);
        assert!(Clock::system().file().is_none());
    }
}
