//! The operation log on a real daemon, read with the real CLI: catalog operations (and a
//! failing one) are recorded with the client's address, the result and the error the client
//! got; reads and data writes are not; `--volume` and `--since` filter; entries survive a
//! `kill -9` right after the operation answered; `log_max_entries` and `log_retention` bound
//! the log.

use std::time::Duration;

use forkd_tests::Daemon;
use serde_json::Value;

/// `forkd log --json ARGS...`: the entries.
fn log(d: &Daemon, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["log"];
    a.extend_from_slice(args);
    let v = d.cli_json(&a);
    v["entries"].as_array().unwrap_or_else(|| panic!("forkd log --json has no entries array: {v}")).clone()
}

fn field<'a>(entries: &'a [Value], key: &str) -> Vec<&'a str> {
    entries.iter().map(|e| e[key].as_str().unwrap_or("null")).collect()
}

fn seqs(entries: &[Value]) -> Vec<u64> {
    entries.iter().map(|e| e["seq"].as_u64().expect("seq")).collect()
}

/// A command that must fail: its one-line error on stderr.
fn cli_err(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args);
    assert!(!out.status.success(), "forkd {} succeeded", args.join(" "));
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn operations_are_logged_filtered_and_survive_kill_9() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start_in(tmp.path());
    assert!(log(&d, &[]).is_empty(), "a new daemon has an empty log");

    d.cli_ok(&["source", "create", "db", "--size", "1M"]);
    d.cli_ok(&["snapshot", "db"]);
    d.cli_ok(&["clone", "db@1", "dev"]);
    d.cli_ok(&["snapshot", "dev"]);
    let refused = cli_err(&d, &["clone", "db@9", "ghost"]);
    d.cli_ok(&["delete", "dev@1"]);
    // Reads and data I/O are not operations.
    d.cli_ok(&["list"]);
    d.cli_ok(&["show", "dev"]);
    d.api().write("dev", 0, &[7u8; 4096]);
    assert!(d.api().post_json("/v1/volumes/dev/zero?offset=0&length=4096", &Value::Null).ok());

    let all = log(&d, &[]);
    assert_eq!(field(&all, "what"), ["create source", "snapshot", "clone", "snapshot", "clone", "delete"]);
    assert_eq!(field(&all, "target"), ["db", "db", "dev", "dev", "ghost", "dev@1"]);
    assert_eq!(field(&all, "result"), ["ok", "ok", "ok", "ok", "failed", "ok"]);
    assert_eq!(
        all[4]["error"].as_str(),
        Some(refused.trim_start_matches("forkd: error: ")),
        "the error the client got"
    );
    assert!(refused.contains("db@9"), "{refused}");
    assert_eq!(all[2]["detail"].as_str(), Some("from db@1"));
    assert!(all.iter().filter(|e| e["result"] == "ok").all(|e| e["error"].is_null()), "{all:?}");
    assert!(seqs(&all).windows(2).all(|w| w[0] < w[1]), "seq increases: {:?}", seqs(&all));
    for e in &all {
        let who = e["who"].as_str().expect("who");
        let port: u16 = who.strip_prefix("127.0.0.1:").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("{e}"));
        assert_ne!(port, d.port(), "who is the client's address, not the daemon's: {e}");
        assert!(e["duration_ms"].is_u64() && e["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
    }

    // --volume: the volume and its snapshots, not other volumes.
    assert_eq!(field(&log(&d, &["--volume", "db"]), "what"), ["create source", "snapshot"]);
    assert_eq!(field(&log(&d, &["--volume", "dev"]), "target"), ["dev", "dev", "dev@1"]);
    assert!(log(&d, &["--volume", "nothing"]).is_empty());
    // --since: exactly the entries that started at or after it (RFC 3339 compares as text).
    let since = all[3]["at"].as_str().expect("at");
    let want: Vec<u64> = all
        .iter()
        .filter(|e| e["at"].as_str().unwrap_or("") >= since)
        .map(|e| e["seq"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(seqs(&log(&d, &["--since", since])), want);
    assert!(want.len() >= 3 && want.len() < all.len(), "{want:?}");
    assert_eq!(seqs(&log(&d, &["--since", "1h"])), seqs(&all));
    assert_eq!(seqs(&log(&d, &["--limit", "2"])), seqs(&all[4..]));
    std::thread::sleep(Duration::from_millis(3000));
    d.cli_ok(&["snapshot", "db", "--bookmark", "late"]);
    assert_eq!(field(&log(&d, &["--since", "2s"]), "what"), ["snapshot"], "only what happened in the last 2 s");
    let err = cli_err(&d, &["log", "--since", "yesterday"]);
    assert!(err.contains("since `yesterday`"), "{err}");
    let table = d.cli_ok(&["log", "--volume", "db"]);
    assert!(table.starts_with("TIME") && table.contains("create source") && table.contains("127.0.0.1:"), "{table}");

    // kill -9 right after an operation answered: it is in the log after the restart.
    d.cli_ok(&["clone", "db@1", "dev2"]);
    d.cli_ok(&["delete", "dev2"]);
    d.cli_ok(&["snapshot", "dev"]);
    let before = log(&d, &[]);
    d.kill9();
    d.restart();
    let after = log(&d, &[]);
    assert_eq!(after, before, "the log after kill -9 and a restart");
    assert_eq!(field(&after[after.len() - 1..], "what"), ["snapshot"]);
    d.cli_ok(&["snapshot", "db"]);
    let last = *seqs(&log(&d, &[])).last().expect("entry");
    assert_eq!(last, seqs(&before).last().expect("entry") + 1, "numbering goes on after the restart");
}

#[test]
fn retention_bounds_the_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let flags = ["--log-max-entries", "3", "--log-retention", "2s"];
    let d = Daemon::start_with(tmp.path(), "127.0.0.1", &flags);
    d.cli_ok(&["source", "create", "db", "--size", "1M"]);
    for _ in 0..4 {
        d.cli_ok(&["snapshot", "db"]);
    }
    let kept = log(&d, &[]);
    assert_eq!(seqs(&kept), [3, 4, 5], "the newest 3 of 5");
    assert_eq!(field(&kept, "what"), ["snapshot"; 3]);
    drop(d);

    // Again after a kill -9 (the bounds are kept, not only shown), then by age.
    let d = Daemon::start_with(tmp.path(), "127.0.0.1", &flags);
    assert_eq!(seqs(&log(&d, &[])), [3, 4, 5]);
    std::thread::sleep(Duration::from_millis(2500));
    d.cli_ok(&["snapshot", "db"]);
    assert_eq!(seqs(&log(&d, &[])), [6], "entries older than 2 s are gone");
}
