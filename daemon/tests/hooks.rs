//! The hook runner with real scripts: variables in, exit status and bounded output out, the
//! timeout and left-behind children killed with the process group, and every unsafe script
//! refused by name.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use forkd::server::hooks::{HookError, HookRunner, OUTPUT_LIMIT};

/// A hooks directory the hook user can enter, with `scripts` (name, body) made executable.
fn hooks_dir(scripts: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    for (name, body) in scripts {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    dir
}

fn runner(dir: &Path) -> HookRunner {
    HookRunner::new(dir, None).expect("runner")
}

fn vars() -> Vec<(String, String)> {
    vec![("FORKD_EVENT".into(), "configure-clone".into()), ("FORKD_VOLUME".into(), "dev1".into())]
}

#[test]
fn a_hook_gets_its_variables_and_nothing_else() {
    let d = hooks_dir(&[("show", "echo \"$FORKD_EVENT $FORKD_VOLUME home=${HOME:-unset}\"; echo oops >&2; exit 3")]);
    let run = runner(d.path()).run("show", &vars(), Duration::from_secs(30)).expect("run");
    assert_eq!(run.stdout, "configure-clone dev1 home=unset\n", "{run:?}");
    assert_eq!(run.stderr, "oops\n");
    assert_eq!(run.exit_code, Some(3));
    assert!(!run.succeeded() && run.outcome().contains("status 3"), "{}", run.outcome());
    let ok = hooks_dir(&[("ok", "id -u")]);
    let run = runner(ok.path()).run("ok", &[], Duration::from_secs(30)).expect("run");
    assert!(run.succeeded(), "{run:?}");
    if nix::unistd::geteuid().is_root() {
        assert_ne!(run.stdout.trim(), "0", "a daemon running as root runs hooks as another user");
    }
}

#[test]
fn a_hanging_hook_is_killed_with_its_children_at_the_timeout() {
    let d = hooks_dir(&[("hang", "sleep 300 & echo $!; sleep 300")]);
    let run = runner(d.path()).run("hang", &[], Duration::from_millis(300)).expect("run");
    assert!(run.timed_out && !run.succeeded(), "{run:?}");
    assert!(run.outcome().contains("timed out"));
    let pid: i32 = run.stdout.trim().parse().expect("the child's pid on stdout");
    assert!(gone(pid), "the hook's child {pid} outlived the timeout");
}

#[test]
fn a_child_left_behind_by_a_hook_that_exited_is_killed() {
    let d = hooks_dir(&[("leave", "sleep 300 & echo $!; exit 0")]);
    let run = runner(d.path()).run("leave", &[], Duration::from_secs(30)).expect("run");
    assert!(run.succeeded(), "{run:?}");
    let pid: i32 = run.stdout.trim().parse().expect("the child's pid on stdout");
    assert!(gone(pid), "the child {pid} the hook left behind is still running");
}

/// True once `pid` no longer runs (a zombie waiting for init counts as gone).
fn gone(pid: i32) -> bool {
    for _ in 0..200 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(s) if s.split(' ').nth(2) == Some("Z") => return true,
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    false
}

#[test]
fn megabytes_of_output_are_bounded_and_do_not_block_the_hook() {
    let d = hooks_dir(&[("chatty", "head -c 5000000 /dev/zero | tr '\\0' x; head -c 3000000 /dev/zero >&2; exit 0")]);
    let run = runner(d.path()).run("chatty", &[], Duration::from_secs(60)).expect("run");
    assert!(run.succeeded(), "{}", run.outcome());
    assert_eq!((run.stdout.len(), run.stderr.len()), (OUTPUT_LIMIT, OUTPUT_LIMIT));
    assert_eq!(run.dropped_bytes, 8_000_000 - 2 * OUTPUT_LIMIT as u64);
}

#[test]
fn unsafe_or_missing_scripts_are_refused_by_name() {
    let d = hooks_dir(&[("good", "exit 0"), ("open", "exit 0"), ("noexec", "exit 0")]);
    std::fs::set_permissions(d.path().join("open"), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    std::fs::set_permissions(d.path().join("noexec"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let outside = tempfile::tempdir().expect("tempdir");
    let target = outside.path().join("evil");
    std::fs::write(&target, "#!/bin/sh\nexit 0\n").expect("write");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::symlink(&target, d.path().join("link")).expect("symlink");
    std::fs::create_dir(d.path().join("sub")).expect("mkdir");
    let r = runner(d.path());
    assert!(r.resolve("good").is_ok());
    for (name, why) in [
        ("open", "writable by others"),
        ("noexec", "not executable"),
        ("link", "outside"),
        ("sub", "not a regular file"),
        ("missing", "no such script"),
    ] {
        let e = r.run(name, &[], Duration::from_secs(5)).expect_err(name);
        assert!(matches!(e, HookError::Refused { .. }) && e.to_string().contains(why), "{name}: {e}");
    }
    for name in ["../good", "/bin/sh", "", ".", ".."] {
        assert!(matches!(r.resolve(name), Err(HookError::BadName(_))), "{name:?} is not a plain name");
    }
    // A script deleted after it was checked is refused at the run.
    std::fs::remove_file(d.path().join("good")).expect("rm");
    assert!(r.run("good", &[], Duration::from_secs(5)).is_err());
    // A hooks directory writable by others makes every script unsafe.
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod dir");
    assert!(r.resolve("noexec").expect_err("open dir").to_string().contains("hooks directory"));
}
