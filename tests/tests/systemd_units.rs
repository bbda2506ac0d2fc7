//! The systemd units as shipped (`systemd/`), checked with systemd's own tool without systemd
//! running: `systemd-analyze security --offline=true` must rate `forkd.service` at 2.0 or
//! lower, and `systemd-analyze verify` must find nothing in the service and its three sockets
//! (copied with only `ExecStart`'s binary pointed at the built `forkd`, which verify wants to
//! exist). The sockets must name themselves as the daemon takes them, and the system call
//! filter must let io_uring through whether or not `@system-service` holds its calls, and every
//! call a real daemon makes under `strace` (start-up, ingest, clone, HTTP writes, an NBD read,
//! SIGTERM and the final flush): the sandbox itself needs systemd as PID 1, which tests lack.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use forkd_tests::{forkd_bin, free_port, run_bounded, wait_or_kill, Api, CLI_TIMEOUT, READY_TIMEOUT, STOP_TIMEOUT};

/// The highest `systemd-analyze security` exposure the service may have.
const MAX_EXPOSURE: f64 = 2.0;
/// Longest one `systemd-analyze` run may take.
const ANALYZE_TIMEOUT: Duration = Duration::from_secs(60);
/// The units shipped in `systemd/`.
const UNITS: [&str; 4] = ["forkd.service", "forkd.socket", "forkd-nbd.socket", "forkd-iscsi.socket"];
/// Where the shipped service expects the binary.
const INSTALLED_BIN: &str = "/usr/local/bin/forkd";

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("systemd")
}

fn read_unit(name: &str) -> String {
    let p = units_dir().join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn analyze(args: &[&str]) -> Output {
    let mut cmd = Command::new("systemd-analyze");
    cmd.args(args).env("SYSTEMD_PAGER", "").env("SYSTEMD_COLORS", "0");
    run_bounded(&mut cmd, ANALYZE_TIMEOUT)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The values of `key=` lines in a unit's text.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines().filter_map(|l| l.strip_prefix(key)?.strip_prefix('=')).collect()
}

#[test]
fn the_service_is_rated_at_most_2() {
    let service = units_dir().join("forkd.service");
    let out = analyze(&["security", "--offline=true", "--no-pager", service.to_str().expect("utf-8 path")]);
    let report = text(&out);
    assert!(out.status.success(), "systemd-analyze security: {}\n{report}", out.status);
    let level = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for forkd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{report}"));
    assert!(level <= MAX_EXPOSURE, "exposure {level} > {MAX_EXPOSURE}:\n{report}");
}

#[test]
fn verify_finds_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = forkd_bin().canonicalize().expect("forkd binary");
    let mut paths = Vec::new();
    for name in UNITS {
        let shipped = read_unit(name);
        let unit = if name == "forkd.service" {
            assert_eq!(values(&shipped, "ExecStart").len(), 1, "one ExecStart");
            assert!(shipped.contains(&format!("ExecStart={INSTALLED_BIN} ")), "ExecStart runs {INSTALLED_BIN}");
            shipped.replace(INSTALLED_BIN, bin.to_str().expect("utf-8 path"))
        } else {
            shipped
        };
        let p = tmp.path().join(name);
        std::fs::write(&p, unit).expect("write unit");
        paths.push(p.to_str().expect("utf-8 path").to_string());
    }
    let mut args = vec!["verify", "--no-pager"];
    args.extend(paths.iter().map(String::as_str));
    let out = analyze(&args);
    let report = text(&out);
    assert!(out.status.success() && report.trim().is_empty(), "systemd-analyze verify: {}\n{report}", out.status);
}

#[test]
fn sockets_are_named_as_the_daemon_takes_them() {
    let service = read_unit("forkd.service");
    assert_eq!(values(&service, "Type"), ["notify"], "READY=1 is what the daemon sends");
    assert_eq!(values(&service, "WatchdogSec").len(), 1, "keep-alives are sent only when asked for");
    let mut named = Vec::new();
    for (unit, listen) in [
        ("forkd.socket", "127.0.0.1:7480"),
        ("forkd-nbd.socket", "0.0.0.0:10809"),
        ("forkd-iscsi.socket", "0.0.0.0:3260"),
    ] {
        let text = read_unit(unit);
        assert_eq!(values(&text, "ListenStream"), [listen], "{unit}: the daemon's default address");
        assert_eq!(values(&text, "Service"), ["forkd.service"], "{unit}");
        named.extend(values(&text, "FileDescriptorName").into_iter().map(String::from));
        assert!(values(&service, "Requires").iter().any(|r| r.split_whitespace().any(|u| u == unit)), "{unit}");
    }
    assert_eq!(named, ["api", "nbd", "iscsi"]);
}

#[test]
fn the_system_call_filter_lets_io_uring_through() {
    let service = read_unit("forkd.service");
    let allowed: Vec<&str> = values(&service, "SystemCallFilter")
        .into_iter()
        .filter(|v| !v.starts_with('~'))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(allowed.contains(&"@system-service"), "{allowed:?}");
    let group = text(&analyze(&["syscall-filter", "--no-pager", "@system-service"]));
    for call in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        let in_group = group.split_whitespace().any(|w| w == call);
        assert!(in_group || allowed.contains(&call), "{call} is neither in @system-service nor allowed: {allowed:?}");
        let denied = values(&service, "SystemCallFilter")
            .into_iter()
            .filter_map(|v| v.strip_prefix('~'))
            .flat_map(str::split_whitespace)
            .any(|w| w == call || w == "@io-uring");
        assert!(!denied, "{call} is denied");
    }
}

/// Every system call in `group` (an `@` set, expanded through the sets it holds).
fn expand(group: &str, into: &mut BTreeSet<String>) {
    let listing = text(&analyze(&["syscall-filter", "--no-pager", group]));
    let mut members = listing.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    assert_eq!(members.next(), Some(group), "systemd-analyze syscall-filter {group}:\n{listing}");
    for m in members {
        if m.starts_with('@') {
            expand(m, into);
        } else {
            into.insert(m.to_string());
        }
    }
}

/// The system calls `forkd.service`'s `SystemCallFilter=` lines allow: the first is an
/// allow-list, each `~` line takes from it (systemd.exec(5)).
fn allowed_calls() -> BTreeSet<String> {
    let mut allowed = BTreeSet::new();
    for line in values(&read_unit("forkd.service"), "SystemCallFilter") {
        let (deny, items) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let mut calls = BTreeSet::new();
        for item in items.split_whitespace() {
            if item.starts_with('@') {
                expand(item, &mut calls);
            } else {
                calls.insert(item.to_string());
            }
        }
        if deny {
            allowed.retain(|c| !calls.contains(c));
        } else {
            allowed.extend(calls);
        }
    }
    allowed
}

/// The system calls named in an `strace -c` summary.
fn traced_calls(summary: &str) -> BTreeSet<String> {
    let mut rules = 0;
    let mut calls = BTreeSet::new();
    for line in summary.lines() {
        if line.starts_with("------") {
            rules += 1;
        } else if rules == 1 {
            calls.extend(line.split_whitespace().last().map(String::from));
        }
    }
    calls
}

/// The daemon's first child process of `parent` (strace's tracee).
fn child_of(parent: u32) -> Option<i32> {
    let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// Run a daemon under `strace -f -c` through start-up, an ingest, a clone, writes over HTTP,
/// a read over NBD and a SIGTERM with its final flush, and check that every system call it
/// made is one the unit's filter allows (the sandbox itself needs systemd as PID 1).
#[test]
fn the_daemon_calls_only_what_the_filter_allows() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let trace = tmp.path().join("strace.txt");
    let port = free_port();
    let nbd = free_port();
    let mut strace = Command::new("strace")
        .args(["-f", "-c", "-o"])
        .arg(&trace)
        .arg(forkd_bin())
        .args(["serve", "--data-dir"])
        .arg(tmp.path().join("data"))
        .args(["--api", &format!("127.0.0.1:{port}"), "--nbd", &format!("127.0.0.1:{nbd}"), "--iscsi", "127.0.0.1:0"])
        .env("FORKD_LOW_SPACE_THRESHOLD", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run strace (package strace)");
    let api = Api::new(port);
    let started = Instant::now();
    while !api.ready() {
        assert!(started.elapsed() < READY_TIMEOUT, "forkd under strace did not answer");
        std::thread::sleep(Duration::from_millis(50));
    }
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(forkd_bin());
        cmd.arg("--api").arg(api.base()).args(args).env_remove("FORKD_API");
        let out = run_bounded(&mut cmd, CLI_TIMEOUT);
        assert!(out.status.success(), "forkd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let img = tmp.path().join("src.img");
    std::fs::write(&img, vec![0x3cu8; 4 << 20]).expect("image");
    cli(&["source", "create", "prod", "--size", "4M"]);
    cli(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
    cli(&["clone", "prod@1", "dev"]);
    api.write("dev", 0, &[0xa5; 1 << 20]);
    let copy = tmp.path().join("copy.img");
    let mut nbdcopy = Command::new("nbdcopy");
    nbdcopy.arg(format!("nbd://127.0.0.1:{nbd}/dev")).arg(&copy);
    let out = run_bounded(&mut nbdcopy, CLI_TIMEOUT);
    assert!(out.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&copy).expect("copy")[..1 << 20], [0xa5; 1 << 20]);

    let daemon = child_of(strace.id()).expect("the daemon under strace");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let (status, exited) = wait_or_kill(&mut strace, STOP_TIMEOUT, "strace forkd serve");
    assert!(exited && status.success(), "forkd serve under strace after SIGTERM: {status}");
    let used = traced_calls(&std::fs::read_to_string(&trace).expect("strace summary"));
    assert!(used.contains("io_uring_enter") && used.contains("accept4"), "a summary of the daemon's calls: {used:?}");
    let allowed = allowed_calls();
    let refused: Vec<&String> = used.iter().filter(|c| !allowed.contains(*c)).collect();
    assert!(refused.is_empty(), "calls forkd made that forkd.service's SystemCallFilter refuses: {refused:?}");
}
