//! What an ingest run tells its user: progress while it runs (a status line on a terminal,
//! JSON lines with `--json`, nothing otherwise) and one summary at the end.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use super::Outcome;
use crate::agent::IngestArgs;
use crate::units::humanize;

/// Progress shared between the scan and the reporter.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Bytes of the image read so far.
    pub(super) scanned: AtomicU64,
    /// Bytes found changed so far.
    pub(super) changed: AtomicU64,
}

/// The progress reporter's thread, until [`Reporter::stop`].
#[derive(Debug)]
pub(super) struct Reporter {
    done: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// What the progress lines describe.
#[derive(Debug)]
struct Job {
    progress: Arc<Progress>,
    /// The image's size.
    size: u64,
    /// What this run reads: `size`, unless only some ranges are read.
    to_scan: u64,
    started: Instant,
    json_out: bool,
}

impl Reporter {
    /// Report `progress` every so often until stopped.
    pub(super) fn start(
        progress: Arc<Progress>,
        size: u64,
        to_scan: u64,
        started: Instant,
        json_out: bool,
    ) -> Reporter {
        let done = Arc::new(AtomicBool::new(false));
        let job = Job { progress, size, to_scan, started, json_out };
        let stop = done.clone();
        Reporter { done, thread: std::thread::spawn(move || job.run(&stop)) }
    }

    /// Stop reporting (ending a terminal's status line).
    pub(super) fn stop(self) {
        self.done.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

impl Job {
    fn run(&self, done: &AtomicBool) {
        let tty = std::io::stderr().is_terminal();
        if !tty && !self.json_out {
            return;
        }
        let every = Duration::from_millis(if self.json_out { 1000 } else { 250 });
        let mut last = Instant::now();
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            if last.elapsed() >= every {
                last = Instant::now();
                self.line();
            }
        }
        if tty && !self.json_out {
            eprintln!();
        }
    }

    /// One progress line.
    fn line(&self) {
        let p = &self.progress;
        let (scanned, changed) = (p.scanned.load(Ordering::Relaxed), p.changed.load(Ordering::Relaxed));
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = scanned as f64 / secs;
        let to_scan = self.to_scan;
        let eta = if rate > 0.0 { (to_scan.saturating_sub(scanned)) as f64 / rate } else { 0.0 };
        if self.json_out {
            println!(
                "{}",
                json!({"event": "progress", "scanned_bytes": scanned, "size_bytes": self.size, "scan_bytes": to_scan, "changed_bytes": changed, "bytes_per_second": whole(rate), "eta_seconds": whole(eta)})
            );
            return;
        }
        let pct = (scanned * 100).checked_div(to_scan).unwrap_or(100);
        let mut e = std::io::stderr();
        let _ = write!(
            e,
            "\r{pct:3}%  scanned {} of {}  changed {}  {}/s  ETA {:.0}s   ",
            humanize(scanned),
            humanize(to_scan),
            humanize(changed),
            humanize(whole(rate)),
            eta
        );
        let _ = e.flush();
    }
}

/// A non-negative rate or duration as a whole number (saturating; NaN is 0).
fn whole(x: f64) -> u64 {
    if x.is_finite() && x > 0.0 {
        // Rates and seconds are far below 2^53, where f64 stops being exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = x.min(u64::MAX as f64) as u64;
        n
    } else {
        0
    }
}

/// The last line of a run: the new snapshot and what was scanned, changed and sent.
pub(super) fn summary(args: &IngestArgs, path: &Path, outcome: &Outcome, json_out: bool) {
    let (answer, nranges) = (&outcome.answer, outcome.ranges);
    let s = &answer.summary;
    if json_out {
        let mut done = json!({"event": "done", "snapshot": answer.snapshot, "summary": s});
        if args.changed_blocks.is_some() || args.dirty_bitmap.is_some() {
            done["ranges"] = json!(nranges);
        }
        println!("{done}");
        return;
    }
    let plural = if nranges == 1 { "" } else { "s" };
    let read = match (&args.changed_blocks, &args.dirty_bitmap) {
        (Some(list), _) => format!(" ({nranges} range{plural} from {})", list.display()),
        (None, Some(b)) => format!(" ({nranges} range{plural} from dirty bitmap {b})"),
        (None, None) => String::new(),
    };
    println!(
        "ingested {} into {}: scanned {}{read}, changed {}, sent {} in {:.1}s",
        path.display(),
        answer.snapshot,
        humanize(s.scanned_bytes),
        humanize(s.changed_bytes),
        humanize(s.sent_bytes),
        outcome.started.elapsed().as_secs_f64()
    );
}
