//! Bad input: every mistake gives exit code 1, exactly one line on stderr starting with
//! `forkd: error:`, and changes nothing. Damaged data directories and a second daemon on the
//! same directory are refused with one clear error line and no panic.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use forkd_tests::{enc, free_port, run_bounded, run_with_deadline, Daemon, CLI_TIMEOUT};
use rand::{RngCore, SeedableRng};
use serde_json::Value;

const SRC_SIZE: usize = 256 << 10;

/// Everything a client can observe about the catalog: the list and every volume's details.
fn state(d: &Daemon) -> Value {
    let list = d.api().get_json("/v1/volumes");
    let mut shows = serde_json::Map::new();
    for v in list["volumes"].as_array().expect("volumes") {
        let name = v["name"].as_str().expect("name");
        shows.insert(name.to_string(), d.api().get_json(&format!("/v1/volumes/{}", enc(name))));
    }
    serde_json::json!({ "list": list, "volumes": shows })
}

/// Check an output is a clean failure: exit code 1 and exactly one stderr line starting with
/// `forkd: error:`. Returns that line, or a description of what is wrong.
fn clean_failure(out: &Output) -> Result<String, String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let describe = || {
        format!("exit {:?}, stdout {:?}, stderr {:?}", out.status.code(), String::from_utf8_lossy(&out.stdout), stderr)
    };
    if out.status.code() != Some(1) {
        return Err(format!("expected exit code 1: {}", describe()));
    }
    if lines.len() != 1 || !lines[0].starts_with("forkd: error:") {
        return Err(format!("expected exactly one stderr line starting with `forkd: error:`: {}", describe()));
    }
    if stderr.contains("panicked") {
        return Err(format!("panicked: {}", describe()));
    }
    Ok(lines[0].to_string())
}

/// A running daemon with source `prod` (one ingest, prod@1) and clone `dev7` of prod@1.
fn setup(root: &Path) -> Daemon {
    let d = Daemon::start(&root.join("data"), &root.join("daemon.log"));
    let mut img = vec![0u8; SRC_SIZE];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut img[..SRC_SIZE / 2]);
    let img_path = root.join("prod.img");
    std::fs::write(&img_path, &img).expect("write image");
    d.cli_ok(&["source", "create", "prod", "--size", "256K"]);
    d.cli_ok(&["ingest", "prod", "--from", img_path.to_str().expect("utf-8")]);
    d.cli_ok(&["clone", "prod@1", "dev7"]);
    d
}

#[test]
fn bad_input_fails_cleanly_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let d = setup(root);
    let wrong_size = root.join("wrong-size.img");
    std::fs::write(&wrong_size, vec![1u8; 100 << 10]).expect("write");
    let missing = root.join("does-not-exist.img");
    let a_dir = root.join("a-directory");
    std::fs::create_dir(&a_dir).expect("mkdir");
    let (wrong_size, missing, a_dir) =
        (wrong_size.to_str().expect("utf-8"), missing.to_str().expect("utf-8"), a_dir.to_str().expect("utf-8"));

    // (arguments, a word the error line must contain)
    let cases: Vec<(Vec<&str>, Option<&str>)> = vec![
        (vec!["show", "nope"], Some("nope")),
        (vec!["clone", "nope@1", "x"], Some("nope")),
        (vec!["clone", "prod@99", "x"], None),
        (vec!["clone", "prod@", "x"], None),
        (vec!["clone", "prod@2026-13-45", "x"], None),
        (vec!["source", "create", "y", "--size", "1000"], None),
        (vec!["source", "create", "y", "--size", "10X"], None),
        (vec!["rewind", "dev7", "--to", "2000-01-01T00:00:00Z"], None),
        (vec!["clone", "prod@1", "dev7"], Some("dev7")),
        (vec!["source", "create", "dev7", "--size", "64K"], Some("dev7")),
        (vec!["delete", "prod@1"], Some("dev7")),
        (vec!["ingest", "prod", "--from", missing], None),
        (vec!["ingest", "prod", "--from", a_dir], None),
        (vec!["ingest", "prod", "--from", wrong_size], None),
        (vec!["delete", "nope"], Some("nope")),
    ];
    let mut failures = Vec::new();
    for (args, must_name) in &cases {
        let before = state(&d);
        let out = d.cli(args);
        let after = state(&d);
        let cmd = format!("forkd {}", args.join(" "));
        match clean_failure(&out) {
            Ok(line) => {
                if let Some(word) = must_name {
                    if !line.contains(word) {
                        failures.push(format!("{cmd}: the error does not name `{word}`: {line}"));
                    }
                }
                println!("{cmd}\n    {line}");
            }
            Err(e) => failures.push(format!("{cmd}: {e}")),
        }
        if before != after {
            failures.push(format!("{cmd}: changed the catalog\nbefore: {before:#}\nafter: {after:#}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad commands misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// PUT `len` bytes to `reference` through the API: must be refused with 403 and a one-line
/// JSON error, changing nothing.
fn write_is_forbidden(reference: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = setup(tmp.path());
    let before = state(&d);
    let content = d.api().read(reference, 0, SRC_SIZE as u64);
    let path = format!("/v1/volumes/{}/data?offset=4096", enc(reference));
    let r = d.api().put_bytes(&path, &[0xAB; 8192]);
    assert_eq!(r.status, 403, "PUT {path}: HTTP {} {}", r.status, r.text());
    let body = r.json();
    let msg = body["error"].as_str().unwrap_or_else(|| panic!("no error text: {body}"));
    assert!(!msg.is_empty() && !msg.contains('\n'), "error text: {msg:?}");
    assert_eq!(state(&d), before, "a refused write changed the catalog");
    assert_eq!(d.api().read(reference, 0, SRC_SIZE as u64), content, "a refused write changed {reference}");
}

#[test]
fn writing_to_a_source_is_forbidden() {
    write_is_forbidden("prod");
}

/// docs/api.md: 403 for a "write to a read-only volume or snapshot".
#[test]
fn writing_to_a_snapshot_is_forbidden() {
    write_is_forbidden("prod@1");
}

#[test]
fn client_without_a_daemon_says_it_cannot_reach_it() {
    let bin = forkd_tests::forkd_bin();
    let port = free_port();
    let api = format!("http://127.0.0.1:{port}");
    for args in [vec!["list"], vec!["show", "prod"], vec!["clone", "prod@1", "x"]] {
        let out =
            run_bounded(Command::new(&bin).arg("--api").arg(&api).args(&args).env_remove("FORKD_API"), CLI_TIMEOUT);
        let line = clean_failure(&out).unwrap_or_else(|e| panic!("forkd {}: {e}", args.join(" ")));
        let l = line.to_lowercase();
        assert!(
            l.contains("reach") || l.contains("connect"),
            "forkd {}: the error does not say the daemon cannot be reached: {line}",
            args.join(" ")
        );
    }
    // FORKD_API is honoured the same way.
    let out = run_bounded(Command::new(&bin).arg("list").env("FORKD_API", &api), CLI_TIMEOUT);
    let line = clean_failure(&out).unwrap_or_else(|e| panic!("FORKD_API forkd list: {e}"));
    assert!(line.contains(&port.to_string()), "the error does not name the address: {line}");
}

/// Run `forkd serve` on `data_dir`, expecting it to refuse to start. Returns its one error
/// line, or panics describing what happened instead.
fn serve_must_fail(what: &str, data_dir: &Path) -> String {
    let port = free_port();
    let result = run_with_deadline(
        Command::new(forkd_tests::forkd_bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--api")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--nbd")
            .arg("127.0.0.1:0")
            .arg("--iscsi")
            .arg("127.0.0.1:0")
            .env_remove("FORKD_API"),
        Duration::from_secs(15),
    );
    let out = match result {
        Ok(out) => out,
        Err(out) => panic!(
            "{what}: forkd serve started anyway (still running after 15 s)\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: forkd serve exited 0\nstderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: forkd serve panicked\nstderr: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("forkd: error:")).collect();
    assert_eq!(errors.len(), 1, "{what}: expected one `forkd: error:` line\nstderr: {stderr}");
    println!("{what}: {}", errors[0]);
    errors[0].to_string()
}

/// A data directory with a source holding data, made by a daemon that then stopped cleanly.
fn prepared_dir(root: &Path) -> std::path::PathBuf {
    let mut d = setup(root);
    let st = d.stop();
    assert!(st.success(), "forkd serve exited with {st} after SIGTERM");
    root.join("data")
}

fn copy_dir(from: &Path, to: &Path) {
    let out = run_bounded(Command::new("cp").arg("-a").arg(from).arg(to), Duration::from_secs(60));
    assert!(out.status.success(), "cp -a: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn serve_refuses_a_damaged_data_dir() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let good = prepared_dir(root);
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);

    // `meta` replaced by a file of garbage.
    let dir = root.join("meta-is-a-file");
    copy_dir(&good, &dir);
    std::fs::remove_dir_all(dir.join("meta")).expect("rm meta");
    let mut junk = vec![0u8; 64 << 10];
    rng.fill_bytes(&mut junk);
    std::fs::write(dir.join("meta"), &junk).expect("write garbage");
    serve_must_fail("meta replaced by a garbage file", &dir);

    // Every file inside `meta` overwritten with garbage of the same length.
    let dir = root.join("meta-garbage");
    copy_dir(&good, &dir);
    let mut overwritten = 0;
    let mut stack = vec![dir.join("meta")];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).expect("read meta").flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let len = std::fs::metadata(&path).expect("stat").len().max(4096);
                let mut junk = vec![0u8; usize::try_from(len).expect("len")];
                rng.fill_bytes(&mut junk);
                std::fs::write(&path, &junk).expect("overwrite");
                overwritten += 1;
            }
        }
    }
    assert!(overwritten > 0, "test bug: meta held no files");
    serve_must_fail("meta files overwritten with garbage", &dir);

    // extents.0 deleted.
    let dir = root.join("no-extents");
    copy_dir(&good, &dir);
    std::fs::remove_file(dir.join("extents.0")).expect("rm extents.0");
    let line = serve_must_fail("extents.0 deleted", &dir);
    assert!(line.contains("extents"), "the error does not say what is missing: {line}");

    // The untouched copy still works.
    let mut d = Daemon::start(&good, &root.join("good.log"));
    assert_eq!(d.api().get_json("/v1/volumes/prod")["snapshots"].as_array().map(Vec::len), Some(1));
    let st = d.stop();
    assert!(st.success());
}

#[test]
fn second_daemon_on_the_same_data_dir_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut d = setup(tmp.path());
    let before = state(&d);
    serve_must_fail("a second serve on a data dir in use", d.data_dir());
    assert!(d.running(), "the first daemon died");
    assert_eq!(state(&d), before, "the refused daemon changed the catalog");
    d.cli_ok(&["snapshot", "dev7"]);
    let st = d.stop();
    assert!(st.success(), "forkd serve exited with {st} after SIGTERM");
}
