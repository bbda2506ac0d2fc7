//! Hook scripts with a real daemon and real clients: every event fires with the documented
//! variables; a `configure-clone` hook reaches its clone by its capability name while hosts are
//! refused; a failing `pre-*` or `configure-clone` hook changes nothing; a hanging hook is
//! killed with its children at its timeout; scripts that cannot be trusted are refused when
//! set and again when run; the hook metrics count every run.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use forkd_tests::{hooks_dir, metric_value, write_script, Daemon};
use serde_json::Value;

/// A daemon running hooks from `hooks` (as root when the tests run as root).
fn daemon(root: &Path, hooks: &Path) -> Daemon {
    let dir = hooks.to_str().expect("utf-8 path");
    Daemon::start_with(root, "127.0.0.1", &["--hooks-dir", dir, "--hook-user", "root"])
}

/// A source `prod` of 4 MiB ingested once from an image holding `text` at offset 0.
fn source(d: &Daemon, root: &Path, text: &[u8]) {
    let img = root.join("prod.img");
    let mut data = vec![0u8; 4 << 20];
    data[..text.len()].copy_from_slice(text);
    std::fs::write(&img, &data).expect("image");
    d.cli_ok(&["source", "create", "prod", "--size", "4M"]);
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
}

/// The CLI's stderr for a command that must fail.
fn fails(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args);
    assert!(!out.status.success(), "forkd {} should have failed", args.join(" "));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

/// The recorded fields of each run: event, volume, snapshot, origin, NBD URI, iSCSI target,
/// portal, and for `configure-clone` whether the hook and a host could connect.
fn record_body(log: &Path) -> String {
    format!(
        "extra=''\n\
         if [ \"$FORKD_EVENT\" = configure-clone ]; then\n\
           nbdinfo --size \"$FORKD_NBD_URI\" >/dev/null 2>&1 && h=hook-ok || h=hook-refused\n\
           nbdinfo --size \"${{FORKD_NBD_URI%%:key-*}}\" >/dev/null 2>&1 && o=host-ok || o=host-refused\n\
           extra=\"|$h|$o\"\n\
         fi\n\
         echo \"$FORKD_EVENT|$FORKD_VOLUME|$FORKD_SNAPSHOT|$FORKD_ORIGIN|$FORKD_NBD_URI|$FORKD_ISCSI_TARGET|$FORKD_ISCSI_PORTAL$extra\" >> {}",
        log.display()
    )
}

#[test]
fn every_event_fires_in_order_with_its_variables() {
    let t = tempfile::tempdir().expect("tempdir");
    let log = t.path().join("events.log");
    let hooks = hooks_dir(t.path(), &[("record", &record_body(&log))]);
    let d = daemon(t.path(), &hooks);
    d.cli_ok(&["source", "create", "prod", "--size", "4M"]);
    for event in ["post-ingest", "configure-clone"] {
        d.cli_ok(&["hook", "set", "prod", event, "record"]);
    }
    let img = t.path().join("prod.img");
    std::fs::write(&img, vec![7u8; 4 << 20]).expect("image");
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
    d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
    d.cli_ok(&["clone", "prod@1", "dev1"]);
    // The clone inherited configure-clone; the clone's own events are set on it.
    for event in
        ["pre-snapshot", "post-snapshot", "pre-rewind", "post-rewind", "pre-refresh", "post-refresh", "pre-delete"]
    {
        d.cli_ok(&["hook", "set", "dev1", event, "record", "--timeout", "60s"]);
    }
    let listed = d.cli_json(&["hook", "list", "dev1"]);
    let events: Vec<&str> =
        listed["hooks"].as_array().expect("hooks").iter().filter_map(|h| h["event"].as_str()).collect();
    assert_eq!(events.len(), 8, "{listed}");
    assert!(events.contains(&"configure-clone") && !events.contains(&"post-ingest"), "inherited: {events:?}");
    d.cli_ok(&["snapshot", "dev1"]);
    d.cli_ok(&["rewind", "dev1", "--to", "prod@1"]);
    d.cli_ok(&["refresh", "dev1"]);
    d.cli_ok(&["delete", "dev1"]);

    let (nbd, iscsi) = (d.nbd_addr(), format!("127.0.0.1:{}", d.iscsi_port()));
    let got = lines(&log);
    let fields: Vec<Vec<&str>> = got.iter().map(|l| l.split('|').collect()).collect();
    let events: Vec<&str> = fields.iter().map(|f| f[0]).collect();
    assert_eq!(
        events,
        [
            "post-ingest",
            "post-ingest",
            "configure-clone",
            "pre-snapshot",
            "post-snapshot",
            "pre-rewind",
            "configure-clone",
            "post-rewind",
            "pre-refresh",
            "configure-clone",
            "post-refresh",
            "pre-delete"
        ],
        "{got:#?}"
    );
    assert_eq!(&fields[0][1..4], ["prod", "prod@1", ""], "post-ingest: {}", got[0]);
    assert_eq!(fields[1][2], "prod@2", "second ingest: {}", got[1]);
    assert_eq!(&fields[2][1..4], ["dev1", "prod@1", "prod@1"], "configure-clone: {}", got[2]);
    assert_eq!(fields[4][2], "dev1@1", "post-snapshot names the new snapshot: {}", got[4]);
    assert_eq!(&fields[7][2..4], ["prod@1", "prod@1"], "post-rewind: {}", got[7]);
    assert_eq!(&fields[10][2..4], ["prod@2", "prod@2"], "post-refresh goes to the newest: {}", got[10]);
    for (f, line) in fields.iter().zip(&got) {
        assert_eq!(f[6], iscsi, "portal: {line}");
        if f[0] == "configure-clone" {
            // Only the hook reaches the clone, by its capability name; hosts are refused.
            assert!(f[4].starts_with(&format!("nbd://{nbd}/dev1:key-")), "capability URI: {line}");
            assert!(f[5].starts_with("iqn.2026-11.dev.forkd:dev1:key-"), "capability target: {line}");
            assert_eq!(&f[7..9], ["hook-ok", "host-refused"], "{line}");
        } else {
            assert_eq!(f[4], format!("nbd://{nbd}/{}", f[1]), "{line}");
            assert_eq!(f[5], format!("iqn.2026-11.dev.forkd:{}", f[1]), "{line}");
        }
    }
    let m = d.metrics();
    assert_eq!(metric_value(&m, "forkd_hook_runs_total{event=\"configure-clone\",result=\"ok\"}"), 3.0);
    assert_eq!(metric_value(&m, "forkd_hook_duration_seconds_count{event=\"post-ingest\"}"), 2.0);
    // Every run is in the operation log, in order, as `hook EVENT` on its volume.
    let log = d.cli_json(&["log"]);
    let runs: Vec<String> = log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["who"] == "hook")
        .map(|e| format!("{} {} {}", e["what"].as_str().unwrap_or(""), e["target"].as_str().unwrap_or(""), e["result"]))
        .collect();
    let want: Vec<String> = fields.iter().map(|f| format!("hook {} {} \"ok\"", f[0], f[1])).collect();
    assert_eq!(runs, want);
}

/// `forkd show NAME --json` without the parts a failed operation may legitimately touch.
fn state(d: &Daemon, name: &str) -> Value {
    let mut v = d.cli_json(&["show", name]);
    v.as_object_mut().expect("object").remove("unique_bytes");
    v
}

#[test]
fn a_failing_pre_or_configure_hook_changes_nothing() {
    let t = tempfile::tempdir().expect("tempdir");
    let marker = t.path().join("pre-delete-ran");
    let touch = format!("touch {}", marker.display());
    let hooks = hooks_dir(t.path(), &[("fail", "echo 'not today' >&2; exit 3"), ("ok", "exit 0"), ("touch", &touch)]);
    let d = daemon(t.path(), &hooks);
    source(&d, t.path(), b"first");
    d.cli_ok(&["clone", "prod@1", "dev1"]);
    d.api().write("dev1", 0, b"dev1 data");
    d.cli_ok(&["snapshot", "dev1"]);
    d.api().write("dev1", 0, b"newer data");

    d.cli_ok(&["hook", "set", "dev1", "pre-snapshot", "fail"]);
    let before = state(&d, "dev1");
    let err = fails(&d, &["snapshot", "dev1"]);
    assert!(err.contains("pre-snapshot hook `fail` of `dev1` exited with status 3: not today"), "{err}");
    assert_eq!(state(&d, "dev1"), before, "no snapshot taken");

    d.cli_ok(&["hook", "set", "dev1", "pre-rewind", "fail"]);
    fails(&d, &["rewind", "dev1", "--to", "@1"]);
    d.cli_ok(&["hook", "unset", "dev1", "pre-rewind"]);
    // configure-clone failing after the switch: the head and its data come back.
    d.cli_ok(&["hook", "set", "dev1", "configure-clone", "fail"]);
    for args in [&["rewind", "dev1", "--to", "@1"][..], &["refresh", "dev1"][..]] {
        let err = fails(&d, args);
        assert!(err.contains("configure-clone hook `fail`"), "{err}");
        assert_eq!(state(&d, "dev1"), before, "{args:?} changed dev1");
        assert_eq!(d.api().read("dev1", 0, 10), b"newer data");
    }

    // A clone whose configure-clone fails is removed, with the snapshot taken to make it.
    let err = fails(&d, &["clone", "dev1", "dev2"]);
    assert!(err.contains("configure-clone hook `fail` of `dev2`"), "{err}");
    assert_eq!(state(&d, "dev1"), before, "the snapshot taken to clone from is gone again");
    let list = d.cli_json(&["list"]);
    let names: Vec<&str> =
        list["volumes"].as_array().expect("list").iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["dev1", "prod"]);

    // A delete that would be refused anyway does not run its pre-delete hook.
    d.cli_ok(&["hook", "set", "prod", "pre-delete", "touch"]);
    let err = fails(&d, &["delete", "prod"]);
    assert!(err.contains("clones depend on it"), "{err}");
    assert!(!marker.exists(), "pre-delete ran for a delete that was refused");

    d.cli_ok(&["hook", "set", "dev1", "pre-delete", "fail"]);
    fails(&d, &["delete", "dev1"]);
    assert_eq!(state(&d, "dev1"), before);
    d.cli_ok(&["hook", "set", "dev1", "pre-delete", "ok"]);
    d.cli_ok(&["delete", "dev1"]);
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[test]
fn a_hanging_hook_is_killed_with_its_children_at_its_timeout() {
    let t = tempfile::tempdir().expect("tempdir");
    let pidfile = t.path().join("child.pid");
    let body =
        format!("sleep 300 & echo $! > {}\nhead -c 3000000 /dev/zero | tr '\\0' x\nsleep 300", pidfile.display());
    let hooks = hooks_dir(t.path(), &[("hang", &body)]);
    let d = daemon(t.path(), &hooks);
    source(&d, t.path(), b"x");
    d.cli_ok(&["clone", "prod@1", "dev1"]);
    d.cli_ok(&["hook", "set", "dev1", "pre-snapshot", "hang", "--timeout", "2s"]);
    let started = Instant::now();
    let err = fails(&d, &["snapshot", "dev1"]);
    assert!(err.contains("timed out after"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "the timeout was not kept");
    let pid: i32 = std::fs::read_to_string(&pidfile).expect("pid").trim().parse().expect("pid number");
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pid_alive(pid), "the hook's child {pid} outlived the timeout");
    assert_eq!(d.cli_json(&["show", "dev1"])["snapshots"].as_array().map(Vec::len), Some(0));
    let m = d.metrics();
    assert_eq!(metric_value(&m, "forkd_hook_runs_total{event=\"pre-snapshot\",result=\"timeout\"}"), 1.0);
    // The log keeps the run with a bounded piece of its 3 MB of output.
    let log = d.cli_json(&["log", "--volume", "dev1"]);
    let entries = log["entries"].as_array().expect("entries");
    let run = entries.iter().find(|e| e["what"] == "hook pre-snapshot").expect("the hook run is logged");
    assert_eq!(run["result"], "failed");
    assert!(run["error"].as_str().is_some_and(|e| e.contains("timed out")), "{run}");
    let detail = run["detail"].as_str().expect("detail");
    assert!(
        detail.len() < 16 << 10 && detail.contains("bytes of output dropped"),
        "{} bytes: {}",
        detail.len(),
        &detail[..200.min(detail.len())]
    );
    let op = entries.iter().find(|e| e["what"] == "snapshot").expect("the snapshot operation is logged");
    assert_eq!(op["result"], "failed");
}

#[test]
fn untrustworthy_scripts_are_refused_when_set_and_when_run() {
    let t = tempfile::tempdir().expect("tempdir");
    let hooks = hooks_dir(t.path(), &[("ok", "exit 0"), ("open", "exit 0")]);
    std::fs::write(hooks.join("plain"), "#!/bin/sh\n").expect("plain");
    std::fs::set_permissions(hooks.join("plain"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::set_permissions(hooks.join("open"), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let outside = t.path().join("outside.sh");
    write_script(t.path(), "outside.sh", "exit 0");
    std::os::unix::fs::symlink(&outside, hooks.join("link")).expect("symlink");
    let d = daemon(t.path(), &hooks);
    source(&d, t.path(), b"x");
    d.cli_ok(&["clone", "prod@1", "dev1"]);
    for (script, why) in [
        ("missing", "no such script"),
        ("plain", "not executable"),
        ("open", "writable by others"),
        ("link", "outside"),
        ("../outside.sh", "not a path"),
        ("/bin/true", "not a path"),
    ] {
        let err = fails(&d, &["hook", "set", "dev1", "pre-snapshot", script]);
        assert!(err.contains(why), "{script}: {err}");
    }
    for (args, why) in [
        (&["hook", "set", "dev1", "pre-snapshots", "ok"][..], "not a hook event"),
        (&["hook", "set", "nope", "pre-snapshot", "ok"][..], "no volume named `nope`"),
        (&["hook", "set", "dev1", "pre-snapshot", "ok", "--timeout", "0s"][..], "timeout_secs must be 1"),
        (&["hook", "unset", "dev1", "post-snapshot"][..], "has no `post-snapshot` hook"),
    ] {
        let err = fails(&d, args);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // Set while fine, then changed: refused at the run, and the operation with it.
    d.cli_ok(&["hook", "set", "dev1", "pre-snapshot", "ok"]);
    std::fs::set_permissions(hooks.join("ok"), std::fs::Permissions::from_mode(0o757)).expect("chmod");
    let err = fails(&d, &["snapshot", "dev1"]);
    assert!(err.contains("could not run") && err.contains("writable by others"), "{err}");
    std::fs::remove_file(hooks.join("ok")).expect("rm");
    let err = fails(&d, &["snapshot", "dev1"]);
    assert!(err.contains("no such script"), "{err}");
    assert_eq!(d.cli_json(&["show", "dev1"])["snapshots"].as_array().map(Vec::len), Some(0));
    assert!(Command::new("true").status().is_ok());
}
