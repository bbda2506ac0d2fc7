//! `forkd check`, `forkd repair` and `forkd compact`: the commands that work on a stopped daemon's data
//! directory rather than through the API (the store's `check` does the work; this prints it).

use std::path::Path;

use crate::store::{self, CheckReport};
use crate::units::humanize;

/// `forkd check --data-dir DIR`: print the report; an error (exit 1) when it found problems.
pub fn check(dir: &Path, json: bool) -> anyhow::Result<()> {
    let r = store::check(dir)?;
    print(&r, json)?;
    if !r.problems.is_empty() {
        anyhow::bail!("{} problem(s) found in {}", r.problems.len(), dir.display());
    }
    Ok(())
}

/// `forkd repair --data-dir DIR [--accept-loss]`.
pub fn repair(dir: &Path, accept_loss: bool, json: bool) -> anyhow::Result<()> {
    let r = store::repair(dir, accept_loss)?;
    print(&r, json)?;
    match (r.rolled_back(), accept_loss) {
        (false, _) => {
            eprintln!("nothing to repair: meta/ is at its last completed flush");
            Ok(())
        }
        (true, false) => anyhow::bail!(
            "nothing changed: run `forkd repair --data-dir {} --accept-loss` to start from what meta/ holds, or \
             restore meta/ and extents.0 from a backup",
            dir.display()
        ),
        (true, true) => {
            eprintln!(
                "accepted: the daemon starts from flush {}; the data past the map is given back at start",
                r.meta_generation
            );
            Ok(())
        }
    }
}

/// `forkd compact --data-dir DIR`: give back the space of `meta/` that the engine holds free.
pub fn compact(dir: &Path, json: bool) -> anyhow::Result<()> {
    let (before, after) = store::compact(dir)?;
    if json {
        println!("{}", serde_json::json!({ "before_bytes": before, "after_bytes": after }));
    } else {
        println!("meta/ compacted: {} -> {}", humanize(before), humanize(after));
    }
    Ok(())
}

fn print(r: &CheckReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!("metadata engine     {}", r.engine);
    let flushed = r.flushed_generation.map_or("unknown".into(), |g| g.to_string());
    println!("flush generation    {} in meta/, {} in `flushed`", r.meta_generation, flushed);
    println!("catalog             {} volumes, {} snapshots", r.volumes, r.snapshots);
    println!("blocks referenced   {} ({})", r.referenced_slots, humanize(r.referenced_slots * 4096));
    println!("extents.0 past map  {}", humanize(r.orphaned_bytes));
    if r.garbage_nodes > 0 {
        println!("garbage queued      {} tree nodes, collected by the daemon after its start", r.garbage_nodes);
    }
    for p in &r.problems {
        println!("problem: {p}");
    }
    if r.problems.is_empty() {
        println!("no problems found");
    }
    Ok(())
}
