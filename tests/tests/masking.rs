//! Masking fails closed, with a real daemon, real NBD and iSCSI clients and real scripts:
//! - while the `mask` hook runs, only the hook reaches the masked volume (NBD, iSCSI and the
//!   HTTP data routes refuse everyone else);
//! - the masked snapshot records its source, script and the script's digest, and clones of it
//!   see only masked addresses;
//! - with `clone_from=masked`, cloning, NBD and iSCSI exports and dumps of the source's data
//!   (its snapshots, and a clone made before the policy) are refused, naming the masked volume;
//! - a mask hook that exits 1, times out or is killed leaves no masked snapshot and changes
//!   nothing downstream.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use forkd_tests::iscsi_raw::{target_name, Initiator, LoginOptions};
use forkd_tests::{write_script, Daemon};

const ADDRESSES: &[u8] = b"alice@example.com,bob.smith@corp.example.org;carol+x@mail.test";

/// The masking script: says it is ready, waits for the test's go (bounded), then replaces every
/// character of every e-mail address but the `@` with `x`, over the NBD URI it was given.
fn masker(flags: &Path) -> String {
    let wait = format!(
        "touch {f}/ready\ni=0; while [ ! -e {f}/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n",
        f = flags.display()
    );
    format!("{wait}{}", forkd_tests::MASK_EMAILS)
}

fn setup(root: &Path) -> (Daemon, PathBuf, PathBuf) {
    let hooks = root.join("hooks");
    let flags = root.join("flags");
    std::fs::create_dir_all(&hooks).expect("hooks");
    std::fs::create_dir_all(&flags).expect("flags");
    std::fs::set_permissions(&hooks, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&flags, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    write_script(&hooks, "masker", &masker(&flags));
    write_script(&hooks, "fail", "echo 'masking rules missing' >&2; exit 1");
    write_script(&hooks, "slow", "sleep 300");
    write_script(&hooks, "killed", "kill -9 $$");
    let d =
        Daemon::start_with(root, "127.0.0.1", &["--hooks-dir", hooks.to_str().expect("utf-8"), "--hook-user", "root"]);
    let mut img = vec![0u8; 4 << 20];
    img[..ADDRESSES.len()].copy_from_slice(ADDRESSES);
    img[1 << 20..(1 << 20) + ADDRESSES.len()].copy_from_slice(ADDRESSES);
    std::fs::write(root.join("prod.img"), &img).expect("image");
    d.cli_ok(&["source", "create", "prod", "--size", "4M"]);
    d.cli_ok(&["ingest", "prod", "--from", root.join("prod.img").to_str().expect("utf-8")]);
    (d, hooks, flags)
}

fn fails(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args);
    assert!(!out.status.success(), "forkd {} should have failed", args.join(" "));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Whether an NBD client can open `export` (nbdinfo, with the server's answer when refused).
fn nbd_opens(d: &Daemon, export: &str) -> bool {
    let out = Command::new("nbdinfo").arg("--size").arg(d.nbd_uri(export)).output().expect("nbdinfo");
    out.status.success()
}

fn iscsi_opens(d: &Daemon, volume: &str) -> bool {
    let addr = format!("127.0.0.1:{}", d.iscsi_port());
    Initiator::try_open(&addr, &LoginOptions::new("iqn.2026-11.test:masking", &target_name(volume))).is_ok()
}

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

fn snapshot_count(d: &Daemon, volume: &str) -> usize {
    d.cli_json(&["show", volume])["snapshots"].as_array().map_or(0, Vec::len)
}

#[test]
fn masking_fails_closed() {
    let t = tempfile::tempdir().expect("tempdir");
    let (d, hooks, flags) = setup(t.path());
    d.cli_ok(&["clone", "prod@1", "before-policy"]);
    d.cli_ok(&["policy", "set", "prod", "clone_from=masked"]);
    assert_eq!(d.cli_json(&["show", "prod"])["clone_from"], "masked");

    // Before any masking, the refusal says how to get masked data.
    let err = fails(&d, &["clone", "prod@1", "dev0"]);
    assert!(err.contains("clone_from=masked") && err.contains("forkd mask prod@latest"), "{err}");

    // The mask hook runs: while it waits, nobody else reaches the masked volume.
    let bin = d.bin().to_path_buf();
    let url = d.url();
    let run = std::thread::spawn(move || {
        Command::new(bin)
            .args(["--api", &url, "mask", "prod@1", "--with", "masker", "--into", "prod-masked", "--json"])
            .output()
            .expect("forkd mask")
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !flags.join("ready").exists() {
        assert!(Instant::now() < deadline, "the mask hook never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!nbd_opens(&d, "prod-masked"), "a host reached the masked volume over NBD during masking");
    assert!(!nbd_opens(&d, "prod-masked:key-00000000000000000000000000000000"), "a guessed key worked");
    assert!(!iscsi_opens(&d, "prod-masked"), "a host reached the masked volume over iSCSI during masking");
    assert!(!d.api().get("/v1/volumes/prod-masked/data?offset=0&length=4096").ok(), "HTTP read of the masked head");
    std::fs::write(flags.join("go"), b"").expect("go");
    let out = run.join().expect("mask thread");
    assert!(out.status.success(), "forkd mask failed: {}", String::from_utf8_lossy(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("mask --json");
    assert_eq!(answer["snapshot"], "prod-masked@1", "{answer}");
    assert_eq!(answer["source"], "prod@1");

    let shown = d.cli_json(&["show", "prod-masked"]);
    let snap = &shown["snapshots"][0];
    assert_eq!((snap["masked"].as_bool(), snap["mask"]["source"].as_str()), (Some(true), Some("prod@1")), "{shown}");
    assert_eq!(snap["mask"]["script"], "masker");
    assert_eq!(snap["mask"]["script_sha256"].as_str(), Some(sha256_hex(&hooks.join("masker")).as_str()));
    assert_eq!(shown["masked_from"], "prod");

    // Downstream: clones of the masked snapshot see only masked addresses.
    d.cli_ok(&["clone", "prod-masked@latest", "dev1"]);
    for off in [0u64, 1 << 20] {
        let got = d.api().read("dev1", off, ADDRESSES.len() as u64);
        let want: Vec<u8> =
            ADDRESSES.iter().map(|&c| if c == b',' || c == b';' || c == b'@' { c } else { b'x' }).collect();
        assert_eq!(got, want, "at {off}: {}", String::from_utf8_lossy(&got));
    }
    let dump = t.path().join("dev1.img");
    let out = Command::new("nbdcopy").arg(d.nbd_uri("dev1")).arg(&dump).output().expect("nbdcopy");
    assert!(out.status.success(), "nbdcopy of a clone of the masked snapshot: {out:?}");
    let bytes = std::fs::read(&dump).expect("dump");
    assert!(!bytes.windows(9).any(|w| w == b"@example."), "an address survived in the clone");
    assert!(iscsi_opens(&d, "dev1"), "a clone of a masked snapshot is served normally");

    // Fail closed: the source's own data goes nowhere, by any path, and the error names the
    // masked volume to use.
    let err = fails(&d, &["clone", "prod@1", "dev2"]);
    assert!(err.contains("prod-masked"), "{err}");
    for export in ["prod", "prod@1", "before-policy", "prod-masked"] {
        assert!(!nbd_opens(&d, export), "NBD served {export}");
    }
    assert!(!iscsi_opens(&d, "before-policy"), "iSCSI served a clone made before the policy");
    for what in ["prod@1", "before-policy"] {
        let err = fails(&d, &["dump", what, t.path().join("x.img").to_str().expect("utf-8")]);
        assert!(err.contains("clone_from=masked"), "dump {what}: {err}");
    }
    assert!(!d.api().get("/v1/volumes/prod/data?offset=0&length=4096").ok());
    let err = fails(&d, &["snapshot", "prod-masked"]);
    assert!(err.contains("masked volume"), "{err}");

    // A mask hook that fails, times out or is killed leaves no masked snapshot.
    for (script, timeout, why) in
        [("fail", "300s", "exited with status 1"), ("slow", "2s", "timed out"), ("killed", "300s", "signal 9")]
    {
        let err = fails(&d, &["mask", "prod@1", "--with", script, "--into", "prod-masked", "--timeout", timeout]);
        assert!(err.contains(why), "{script}: {err}");
        assert_eq!(snapshot_count(&d, "prod-masked"), 1, "{script} left a masked snapshot");
        let err = fails(&d, &["mask", "prod@1", "--with", script, "--into", "fresh-masked", "--timeout", timeout]);
        assert!(err.contains(why), "{script}: {err}");
        assert!(!d.cli(&["show", "fresh-masked"]).status.success(), "{script} left a masked volume behind");
    }
    assert_eq!(d.api().read("dev1", 0, 5), b"xxxxx", "downstream changed");
    let err = fails(&d, &["mask", "prod@1", "--with", "masker", "--into", "dev1"]);
    assert!(err.contains("is not a masked volume of `prod`"), "{err}");

    // The policy can be lifted again.
    d.cli_ok(&["policy", "set", "prod", "clone_from=any"]);
    d.cli_ok(&["clone", "prod@1", "dev3"]);
    assert_eq!(d.api().read("dev3", 0, 5), b"alice");
    mask_an_environment(&d);
}

/// An environment is masked member by member, with each member volume's mask hook; a member
/// without one is copied as is, unless its source lets only masked data out: then nothing is
/// done at all.
fn mask_an_environment(d: &Daemon) {
    d.cli_ok(&["source", "create", "crm", "--size", "1M"]);
    d.cli_ok(&["snapshot", "crm"]);
    d.cli_ok(&["env", "create", "sys", "prod=prod", "crm=crm"]);
    d.cli_ok(&["policy", "set", "prod", "clone_from=masked"]);
    let err = fails(d, &["mask", "sys@latest", "--into", "sys-masked"]);
    assert!(err.contains("member `prod` has no mask hook"), "{err}");
    assert!(
        !d.cli(&["env", "show", "sys-masked"]).status.success(),
        "a refused environment masking left an environment"
    );
    assert!(!d.cli(&["show", "sys-masked.crm"]).status.success(), "a refused environment masking left a member");
    let err = fails(d, &["mask", "sys@latest", "--with", "masker", "--into", "sys-masked"]);
    assert!(err.contains("leave out --with"), "{err}");

    d.cli_ok(&["hook", "set", "prod", "mask", "masker"]);
    let a = d.cli_json(&["mask", "sys@latest", "--into", "sys-masked"]);
    assert_eq!(a["members"]["prod"], "sys-masked.prod@1", "{a}");
    assert_eq!(a["members"]["crm"], "sys-masked.crm@1", "{a}");
    d.cli_ok(&["env", "clone", "sys-masked@latest", "sysdev"]);
    assert_eq!(d.api().read("sysdev.prod", 0, 5), b"xxxxx", "the masked environment's clone is masked");
    let err = fails(d, &["env", "clone", "sys@latest", "sysraw"]);
    assert!(err.contains("clone_from=masked"), "{err}");
}
