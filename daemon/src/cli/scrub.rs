//! `forkd scrub`: ask the daemon to read every stored block and check it against its crc32,
//! print what it checked and every reference to a damaged block (`db@3 offset 8192`), and
//! exit non-zero when there is damage. While it runs, a terminal sees its progress on stderr
//! (polled from `GET /v1/scrub`); `--json` prints the daemon's answer only.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::bail;

use super::commands::emit;
use crate::api::client::Client;
use crate::api::scrub::ScrubAnswer;
use crate::units::{human_duration_ms, humanize};

/// How often a terminal's progress line is refreshed.
const POLL: Duration = Duration::from_secs(1);

/// Run `forkd scrub`.
pub fn run(client: &Client, json_out: bool) -> anyhow::Result<()> {
    let progress = (!json_out && std::io::stderr().is_terminal()).then(|| Progress::start(client.clone()));
    let answer = client.scrub();
    if let Some(p) = progress {
        p.stop();
    }
    let answer = answer?;
    if json_out {
        emit(&serde_json::to_string_pretty(&answer)?)?;
    } else {
        emit(&render(&answer))?;
    }
    if answer.damaged_blocks > 0 {
        bail!(
            "scrub found {} damaged block{} ({} reference{}): re-ingest the sources that hold them from intact \
             images to repair their newest snapshots",
            answer.damaged_blocks,
            plural(answer.damaged_blocks),
            answer.failures_total,
            plural(answer.failures_total)
        );
    }
    Ok(())
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The summary line, then one line per reference to a damaged block.
fn render(a: &ScrubAnswer) -> String {
    let damage = match a.damaged_blocks {
        0 => "no damage".to_string(),
        n => format!("{n} damaged block{} in {} reference{}", plural(n), a.failures_total, plural(a.failures_total)),
    };
    let mut out = format!(
        "scrubbed {} ({} block{}) of {} volume{} and snapshot{} in {}: {damage}\n",
        humanize(a.checked_bytes),
        a.checked_blocks,
        plural(a.checked_blocks),
        a.checked_references,
        plural(a.checked_references),
        plural(a.checked_references),
        human_duration_ms(a.duration_ms)
    );
    for f in &a.failures {
        out.push_str(&format!("  {} offset {}\n", f.reference, f.offset));
    }
    let unlisted = a.failures_total.saturating_sub(a.failures.len() as u64);
    if unlisted > 0 {
        out.push_str(&format!("  ... and {unlisted} more (the daemon's log names every one)\n"));
    }
    out
}

/// A terminal's progress line, refreshed from `GET /v1/scrub` until stopped.
#[derive(Debug)]
struct Progress {
    done: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Progress {
    fn start(client: Client) -> Progress {
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let thread = std::thread::spawn(move || {
            let mut shown = false;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(POLL);
                // The first polls may come before the scrub starts; errors are the POST's to tell.
                let Ok(s) = client.scrub_status() else { continue };
                if s.running && !stop.load(Ordering::Relaxed) {
                    let pct = (s.checked_bytes.saturating_mul(100)).checked_div(s.total_bytes).unwrap_or(0).min(100);
                    let mut e = std::io::stderr();
                    let _ = write!(
                        e,
                        "\r{pct:3}%  checked {} of {}  damaged blocks {}   ",
                        humanize(s.checked_bytes),
                        humanize(s.total_bytes),
                        s.damaged_blocks
                    );
                    let _ = e.flush();
                    shown = true;
                }
            }
            if shown {
                eprintln!();
            }
        });
        Progress { done, thread }
    }

    fn stop(self) {
        self.done.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::scrub::ScrubFailure;

    #[test]
    fn renders_clean_and_damaged() {
        let clean = ScrubAnswer {
            checked_blocks: 3,
            checked_bytes: 12288,
            checked_references: 1,
            duration_ms: 5,
            ..Default::default()
        };
        assert_eq!(render(&clean), "scrubbed 12.0 KiB (3 blocks) of 1 volume and snapshot in 5ms: no damage\n");
        let damaged = ScrubAnswer {
            damaged_blocks: 1,
            failures: vec![
                ScrubFailure { reference: "db@3".into(), offset: 8192 },
                ScrubFailure { reference: "clone1".into(), offset: 8192 },
            ],
            failures_total: 3,
            ..clean
        };
        let text = render(&damaged);
        assert!(
            text.starts_with(
                "scrubbed 12.0 KiB (3 blocks) of 1 volume and snapshot in 5ms: 1 damaged block in 3 references\n"
            ),
            "{text}"
        );
        assert!(text.contains("\n  db@3 offset 8192\n  clone1 offset 8192\n  ... and 1 more"), "{text}");
    }
}
