//! Environments on a real daemon, driven by the real CLI and a raw NBD client: a group of
//! sources ingested at different times cloned by time (each member gets its own newest
//! snapshot then), one-instant environment snapshots under a writer that alternates between
//! two members, rewind and refresh of every member as one operation, a failing member that
//! changes nothing, bad input refused with one line each, and two operations at once.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use forkd_tests::rawnbd::Client;
use forkd_tests::{Daemon, BS};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// Ingest into `src` an image of `size` bytes whose first block is filled with `fill`.
fn ingest_fill(d: &Daemon, dir: &Path, src: &str, fill: u8) {
    let mut img = vec![0u8; 1 << 20];
    img[..BS].fill(fill);
    let path = dir.join(format!("{src}-{fill}.img"));
    std::fs::write(&path, &img).expect("write image");
    d.cli_ok(&["ingest", src, "--from", path.to_str().expect("utf-8")]);
    // The next snapshot gets a later millisecond.
    std::thread::sleep(Duration::from_millis(20));
}

/// The byte every byte of block 0 of `reference` holds (panics if not uniform).
fn fill(d: &Daemon, reference: &str) -> u8 {
    let b = d.api().read(reference, 0, BS as u64);
    assert!(b.iter().all(|&x| x == b[0]), "{reference}: block 0 is not uniform");
    b[0]
}

/// `created_at` of snapshot `name` of `volume`.
fn created_at(d: &Daemon, volume: &str, name: &str) -> String {
    let v = d.cli_json(&["show", volume]);
    let s = v["snapshots"].as_array().expect("snapshots").iter().find(|s| s["name"] == name);
    s.unwrap_or_else(|| panic!("{name} not in {v}"))["created_at"].as_str().expect("created_at").to_string()
}

/// Run a CLI command that must fail; returns its one-line stderr.
fn cli_err(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args);
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success(), "forkd {} succeeded: {}", args.join(" "), String::from_utf8_lossy(&out.stdout));
    assert_eq!(err.lines().count(), 1, "forkd {}: not one line: {err}", args.join(" "));
    err
}

/// `show --json` of each volume with the parts an operation could change.
fn states(d: &Daemon, volumes: &[&str]) -> Vec<Value> {
    volumes
        .iter()
        .map(|v| {
            let s = d.cli_json(&["show", v]);
            json!({"timeflow": s["timeflow"], "origin": s["origin"], "snapshots": s["snapshots"],
                "allocated": s["allocated_bytes"]})
        })
        .collect()
}

/// Sources `db` and `app` fed at different times, grouped as `src`. Returns the time of
/// `app@1` (after `db@1`, before `db@2`).
fn sources(d: &Daemon, dir: &Path) -> String {
    d.cli_ok(&["source", "create", "db", "--size", "1M"]);
    d.cli_ok(&["source", "create", "app", "--size", "1M"]);
    d.cli_ok(&["env", "create", "src", "db=db", "app=app"]);
    ingest_fill(d, dir, "db", 0x11);
    ingest_fill(d, dir, "app", 0x21);
    ingest_fill(d, dir, "db", 0x12);
    created_at(d, "app", "app@1")
}

#[test]
fn clone_by_time_rewind_refresh_and_delete() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(tmp.path());
    let t = sources(&d, tmp.path());
    // By time: db@1 and app@1; latest: db@2 and app@1.
    let c = d.cli_json(&["env", "clone", &format!("src@{t}"), "dev"]);
    assert_eq!(c["made_from"], json!({"db": "db@1", "app": "app@1"}), "{c}");
    assert_eq!(c["environment"]["members"], json!({"db": "dev.db", "app": "dev.app"}));
    assert_eq!((fill(&d, "dev.db"), fill(&d, "dev.app")), (0x11, 0x21));
    d.cli_ok(&["env", "clone", "src@latest", "qa"]);
    assert_eq!((fill(&d, "qa.db"), fill(&d, "qa.app")), (0x12, 0x21));
    assert_eq!(d.cli_json(&["show", "dev.db"])["environment"], "dev");
    assert!(d.cli_json(&["show", "db"])["environment"] == "src");

    // Snapshot, write, snapshot, rewind to the first and back to the second.
    let s1 = d.cli_json(&["env", "snapshot", "dev", "--bookmark", "golden"]);
    assert_eq!(s1["snapshot"], "dev@1", "{s1}");
    d.api().write("dev.db", 0, &[0x55; BS]);
    d.api().write("dev.app", 0, &[0x56; BS]);
    d.cli_ok(&["env", "snapshot", "dev"]);
    let r = d.cli_json(&["env", "rewind", "dev", "--to", "@golden"]);
    assert_eq!(r["target"], "dev@1", "{r}");
    assert_eq!((fill(&d, "dev.db"), fill(&d, "dev.app")), (0x11, 0x21));
    d.cli_ok(&["env", "rewind", "dev", "--to", "2"]);
    assert_eq!((fill(&d, "dev.db"), fill(&d, "dev.app")), (0x55, 0x56));
    assert_eq!(d.cli_json(&["show", "dev.app"])["timeflow"], 3);

    // Refresh after a new ingest of db: every member to its origin's newest snapshot.
    ingest_fill(&d, tmp.path(), "db", 0x13);
    let r = d.cli_json(&["env", "refresh", "dev"]);
    assert_eq!(r["members"]["db"]["target"], "db@3", "{r}");
    assert_eq!((fill(&d, "dev.db"), fill(&d, "dev.app")), (0x13, 0x21));

    // List, show, tree.
    let list = d.cli_json(&["env", "list"]);
    let names: Vec<&str> =
        list["environments"].as_array().expect("list").iter().map(|e| e["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["dev", "qa", "src"]);
    let show = d.cli_json(&["env", "show", "dev"]);
    assert_eq!(show["snapshots"][0]["members"], json!({"db": "dev.db@1", "app": "dev.app@1"}), "{show}");
    assert_eq!(show["origin"], format!("src@{t}"));
    let tree = d.cli_ok(&["tree"]);
    assert!(tree.contains("environment dev: app=dev.app, db=dev.db"), "{tree}");

    // Delete: the members go with it; --keep-volumes keeps them.
    let del = d.cli_json(&["env", "delete", "qa"]);
    assert_eq!(del["volumes"], json!(["qa.app", "qa.db"]), "{del}");
    assert!(d.cli(&["show", "qa.db"]).status.code() != Some(0));
    d.cli_ok(&["env", "delete", "dev", "--keep-volumes"]);
    assert!(d.cli_json(&["show", "dev.db"]).get("environment").is_none());
    d.cli_ok(&["delete", "dev.db"]);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(tmp.path());
    let t = sources(&d, tmp.path());
    let e = cli_err(&d, &["env", "create", "x", "a=nope"]);
    assert!(e.contains("no volume named `nope`"), "{e}");
    let e = cli_err(&d, &["env", "create", "x", "a=db"]);
    assert!(e.contains("member of environment `src`"), "{e}");
    let e = cli_err(&d, &["env", "create", "db", "a=app"]);
    assert!(e.contains("already exists"), "{e}");
    let e = cli_err(&d, &["env", "create", "x", "a.b=db"]);
    assert!(e.contains("no `.`"), "{e}");
    let e = cli_err(&d, &["env", "create", "x", "db"]);
    assert!(e.contains("MEMBER=VOLUME"), "{e}");
    let e = cli_err(&d, &["delete", "db"]);
    assert!(e.contains("environment `src`"), "{e}");
    let e = cli_err(&d, &["source", "create", "src", "--size", "1M"]);
    assert!(e.contains("environment named `src` already exists"), "{e}");
    // Before app's first snapshot: the error names app.
    let before = created_at(&d, "db", "db@1");
    let e = cli_err(&d, &["env", "clone", &format!("src@{before}"), "dev"]);
    assert!(e.contains("member `app`"), "{e}");
    let e = cli_err(&d, &["env", "clone", "nope@latest", "dev"]);
    assert!(e.contains("no environment named `nope`"), "{e}");
    // A member name taken: nothing is created.
    d.cli_ok(&["clone", "db@1", "dev.app"]);
    let e = cli_err(&d, &["env", "clone", &format!("src@{t}"), "dev"]);
    assert!(e.contains("dev.app"), "{e}");
    let list = d.cli_json(&["list"]);
    assert!(!list.to_string().contains("dev.db"), "a clone was left behind: {list}");
    assert!(d.cli_json(&["env", "list"])["environments"].as_array().expect("list").len() == 1);
    let e = cli_err(&d, &["env", "show", "dev"]);
    assert!(e.contains("no environment named `dev`"), "{e}");

    // A failing member (a source) makes rewind and refresh fail whole.
    d.cli_ok(&["source", "create", "lone", "--size", "1M"]);
    d.cli_ok(&["env", "create", "mixed", "c=dev.app", "s=lone"]);
    d.cli_ok(&["env", "snapshot", "mixed"]);
    d.api().write("dev.app", 0, &[0x77; BS]);
    let before = states(&d, &["dev.app", "lone"]);
    let e = cli_err(&d, &["env", "rewind", "mixed", "--to", "mixed@1"]);
    assert!(e.contains("`lone` is a source"), "{e}");
    let e = cli_err(&d, &["env", "refresh", "mixed"]);
    assert!(e.contains("`lone` is a source"), "{e}");
    assert_eq!(states(&d, &["dev.app", "lone"]), before, "a failed environment operation changed a member");
    assert_eq!(fill(&d, "dev.app"), 0x77);
    let e = cli_err(&d, &["env", "rewind", "mixed", "--to", "2020-01-01T00:00:00Z"]);
    assert!(e.contains("no snapshot of `mixed`"), "{e}");
    // Clones outside an environment depend on a member: delete refused, naming them.
    let e = cli_err(&d, &["env", "delete", "src"]);
    assert!(e.contains("dev.app"), "{e}");
    assert_eq!(d.cli_json(&["env", "show", "src"])["members"], json!({"db": "db", "app": "app"}));
}

/// Write `seq` (8 bytes, little endian, repeated) into block `slot` of `c`, waiting for the
/// acknowledgement.
fn write_seq(c: &mut Client, slot: u64, seq: u64) {
    let block: Vec<u8> = seq.to_le_bytes().iter().copied().cycle().take(BS).collect();
    c.write(slot * BS as u64, &block).unwrap_or_else(|e| panic!("NBD write of seq {seq} failed with errno {e}"));
}

/// The sequence numbers in `image`, block by block, up to the first empty block; panics if
/// anything follows a gap.
fn seqs(image: &[u8], what: &str) -> Vec<u64> {
    let vals: Vec<u64> = image.chunks(BS).map(|b| u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))).collect();
    let n = vals.iter().position(|&v| v == 0).unwrap_or(vals.len());
    assert!(vals[n..].iter().all(|&v| v == 0), "{what}: a write after a missing one is in the snapshot");
    vals[..n].to_vec()
}

#[test]
fn an_environment_snapshot_is_one_instant_for_every_member() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(tmp.path());
    d.cli_ok(&["source", "create", "zero", "--size", "64M"]);
    d.cli_ok(&["snapshot", "zero"]);
    d.cli_ok(&["clone", "zero@1", "pair.a"]);
    d.cli_ok(&["clone", "zero@1", "pair.b"]);
    d.cli_ok(&["env", "create", "pair", "a=pair.a", "b=pair.b"]);
    let addr = d.nbd_addr();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut a = Client::open(&addr, "pair.a", false);
            let mut b = Client::open(&addr, "pair.b", false);
            let mut seq = 0u64;
            // Odd numbers go to a, even ones to b, each into the next block of its member.
            while !stop.load(Ordering::SeqCst) && seq < 32000 {
                seq += 1;
                let c = if seq % 2 == 1 { &mut a } else { &mut b };
                write_seq(c, (seq - 1) / 2, seq);
                acked.store(seq, Ordering::SeqCst);
            }
            seq
        })
    };
    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(60));
        let before = acked.load(Ordering::SeqCst);
        let taken = d.api().post_json_ok("/v1/environments/pair/snapshots", &json!({}));
        let after = acked.load(Ordering::SeqCst);
        // Blocks past the one write in flight at the answer cannot hold anything.
        let len = ((after.div_ceil(2) + 8) * BS as u64).min(64 * MIB);
        let a = seqs(&d.api().read(taken["members"]["a"].as_str().expect("a"), 0, len), "a");
        let b = seqs(&d.api().read(taken["members"]["b"].as_str().expect("b"), 0, len), "b");
        assert!(a.iter().enumerate().all(|(i, &s)| s == 2 * i as u64 + 1), "round {round}: a holds the wrong values");
        assert!(b.iter().enumerate().all(|(i, &s)| s == 2 * i as u64 + 2), "round {round}: b holds the wrong values");
        let (ma, mb) = (a.last().copied().unwrap_or(0), b.last().copied().unwrap_or(0));
        let m = ma.max(mb);
        // The union of both is 1..=m: a and b are cut at the same point of the sequence.
        assert!(ma.abs_diff(mb) == 1 || m == 0, "round {round}: a ends at {ma}, b at {mb}: not one instant");
        assert!(m >= before, "round {round}: write {before} was acknowledged before the snapshot but is not in it");
        assert!(m <= after + 1, "round {round}: write {m} was acknowledged after the snapshot answered ({after})");
        println!("round {round}: cut at {m} (acknowledged before the request: {before}, at the answer: {after})");
    }
    stop.store(true, Ordering::SeqCst);
    let total = writer.join().expect("writer");
    assert!(total > 10, "the writer made too little progress to test anything: {total} writes");
}

#[test]
fn two_operations_on_one_environment_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(tmp.path());
    d.cli_ok(&["source", "create", "db", "--size", "1M"]);
    ingest_fill(&d, tmp.path(), "db", 0x11);
    d.cli_ok(&["clone", "db@1", "e.a"]);
    d.cli_ok(&["clone", "db@1", "e.b"]);
    d.cli_ok(&["env", "create", "e", "a=e.a", "b=e.b"]);
    d.cli_ok(&["env", "snapshot", "e"]);
    // Snapshots and rewinds from several threads at once: each either succeeds whole or is
    // refused with 409, and the members agree on what happened.
    let results: Vec<(bool, u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let api = d.api().clone();
                s.spawn(move || {
                    let mut out = Vec::new();
                    for _ in 0..6 {
                        let rewind = i % 2 == 1;
                        let r = if rewind {
                            api.post_json("/v1/environments/e/rewind", &json!({"to": "1"}))
                        } else {
                            api.post_json("/v1/environments/e/snapshots", &json!({}))
                        };
                        out.push((rewind, r.status, r.text()));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("thread")).collect()
    });
    let (mut snaps, mut rewinds) = (0u64, 0u64);
    for (rewind, status, text) in &results {
        match status {
            200 | 201 if *rewind => rewinds += 1,
            200 | 201 => snaps += 1,
            409 => assert!(text.contains("an operation on environment `e` is running"), "{text}"),
            _ => panic!("unexpected answer {status}: {text}"),
        }
    }
    println!("{snaps} snapshots, {rewinds} rewinds, {} refused", results.len() as u64 - snaps - rewinds);
    let env = d.cli_json(&["env", "show", "e"]);
    assert_eq!(env["snapshots"].as_array().expect("snapshots").len() as u64, 1 + snaps);
    for m in ["e.a", "e.b"] {
        let v = d.cli_json(&["show", m]);
        assert_eq!(v["timeflow"], 1 + rewinds, "{m}: {v}");
        // Each environment snapshot and each rewind's kept state is one snapshot of each.
        assert_eq!(v["snapshots"].as_array().expect("snapshots").len() as u64, 1 + snaps + rewinds, "{m}");
    }
    // Nothing is left claimed.
    d.cli_ok(&["env", "snapshot", "e"]);
    d.cli_ok(&["env", "delete", "e"]);
}
