//! A real filesystem and a real database on forkd clones over iSCSI, and space given back by
//! discards.
//!
//! There is no kernel iSCSI initiator here, so a target is attached as TESTING.md describes:
//! qemu-storage-daemon logs in with qemu's iSCSI driver (libiscsi) and exposes the LUN as a file
//! through its FUSE export, and a loop device turns the file into a block device. On it: ext4
//! and PostgreSQL 15 loaded by `pgbench -i -s 5` plus some transactions; `forkd snapshot` and
//! `forkd clone` give a copy that must hold exactly the same database; the snapshot itself,
//! exported read-only (`snapshots = true`), is mounted to check it did not change.
//!
//! Discards: deleting a file and trimming the filesystem must give the clone's space back
//! (its `unique_bytes` drop). qemu's FUSE export turns a hole punch (what the loop device does
//! for a discard) into a write-zeroes request with BDRV_REQ_NO_FALLBACK, and qemu 10.0's iSCSI
//! driver does not claim that flag, so the hole punch fails with EOPNOTSUPP whatever the target
//! supports (even with `discard=unmap` on the blockdev). The loop device then turns discards
//! off, and `fstrim` either says "the discard operation is not supported" or, worse, reports
//! the bytes as trimmed while nothing reached forkd. So the test runs `fstrim` and looks at
//! forkd: if the space did not come back and the loop device has turned discards off, it trims
//! the way fstrim would, from the outside: it reads the free extents of the unmounted
//! filesystem (`dumpe2fs`) and discards them over iSCSI with qemu-io (SCSI UNMAP). If a later
//! qemu passes the discards, `fstrim` itself does the job and the fallback is not used; if the
//! discards stay on and the space does not come back, the test fails.
//!
//! Needs root, /dev/fuse, loop devices, qemu-storage-daemon with qemu-block-extra's iSCSI
//! driver, e2fsprogs and PostgreSQL 15 under /usr/lib/postgresql/15/bin with a `postgres`
//! user; a missing piece fails the test with a message saying what to install. Everything the
//! test sets up is torn down by Drop guards, also when it fails.

use std::path::Path;
use std::process::Command;

use forkd_tests::fsdb::*;
use forkd_tests::{iscsi_target, run_bounded, Daemon};

const MIB: u64 = 1 << 20;

/// `preflight` of the NBD tests plus qemu's iSCSI driver, dumpe2fs, fstrim and qemu-io.
fn iscsi_preflight(test: &str) {
    preflight(test);
    let dirs =
        ["/usr/lib/x86_64-linux-gnu/qemu", "/usr/lib/aarch64-linux-gnu/qemu", "/usr/lib/qemu", "/usr/lib64/qemu"];
    assert!(
        dirs.iter().any(|d| Path::new(d).join("block-iscsi.so").is_file()),
        "{test} needs qemu's iSCSI driver (block-iscsi.so): install qemu-block-extra of the same version as \
         qemu-utils (see /work/shared/TESTING.md)"
    );
    for (bin, package) in
        [("dumpe2fs", "e2fsprogs"), ("e2fsck", "e2fsprogs"), ("fstrim", "util-linux"), ("qemu-io", "qemu-utils")]
    {
        assert!(in_path(bin), "{test} needs {bin}: apt-get install -y {package}");
    }
}

#[test]
fn ext4_and_postgres_on_a_clone_over_iscsi_then_on_a_clone_of_its_snapshot() {
    iscsi_preflight("iscsi_fs_db");
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    chmod(root, 0o755); // the postgres user must reach the mounts and the socket directory
    let sock = root.join("sock");
    std::fs::create_dir(&sock).expect("socket dir");
    chmod(&sock, 0o777);
    let d = Daemon::start_with_config(root, "[iscsi_access]\nsnapshots = true\n");
    let port = d.iscsi_port();
    d.cli_ok(&["source", "create", "base", "--size", "1G"]);
    d.cli_ok(&["clone", "base", "pgdata"]);

    // 1. pgdata over iSCSI: ext4, initdb, pgbench -i -s 5 and some transactions.
    let mnt = root.join("mnt-pgdata");
    let pgdir = mnt.join("pg");
    let datadir = pgdir.join("data");
    let original = {
        let qsd = Qsd::start_iscsi(port, &iscsi_target("pgdata"), &root.join("pgdata.img"), true, GIB, "");
        let lo = Loop::attach(&qsd.file, false);
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(lo.dev()), SLOW);
        let m = Mount::new(lo.dev(), &mnt, None);
        std::fs::create_dir(&pgdir).expect("mkdir pg");
        run_ok(Command::new("chown").arg("postgres:").arg(&pgdir), QUICK);
        chmod(&pgdir, 0o700);
        run_ok(as_postgres("initdb", &sock).arg("-D").arg(&datadir).args(["-A", "trust", "-U", "postgres"]), SLOW);
        let pg = Postgres::start(&datadir, &sock);
        pg.pgbench(&["-i", "-s", "5", "-q"]);
        let out = pg.pgbench(&["-n", "-c", "2", "-t", "150"]);
        assert!(out.contains("number of failed transactions: 0"), "pgbench on pgdata:\n{out}");
        let state = db_state(&pg);
        println!("pgdata: {state:?}");
        assert_eq!(state.accounts, "500000", "pgbench -i -s 5 makes 500000 accounts");
        assert_eq!(state.history, "300", "2 clients x 150 transactions");
        pg.query("checkpoint");
        pg.stop();
        m.unmount();
        lo.detach();
        run_ok(&mut Command::new("sync"), QUICK);
        qsd.stop();
        state
    };
    let v = d.cli_json(&["show", "pgdata"]);
    let written = v["unique_bytes"].as_u64().unwrap_or_else(|| panic!("no unique_bytes: {v}"));
    assert!(written > 64 * MIB, "pgdata holds a 500000-account database but only {written} bytes of its own: {v}");

    // 2. Snapshot it and clone the snapshot.
    let out = d.cli_ok(&["snapshot", "pgdata"]);
    assert!(out.contains("pgdata@1"), "forkd snapshot pgdata: {out}");
    d.cli_ok(&["clone", "pgdata@1", "pgcopy"]);

    // 3. pgcopy over iSCSI holds the same database; then change it.
    let mnt = root.join("mnt-pgcopy");
    let datadir = mnt.join("pg").join("data");
    {
        let qsd = Qsd::start_iscsi(port, &iscsi_target("pgcopy"), &root.join("pgcopy.img"), true, GIB, "");
        let lo = Loop::attach(&qsd.file, false);
        let m = Mount::new(lo.dev(), &mnt, None);
        let pg = Postgres::start(&datadir, &sock);
        let copy = db_state(&pg);
        assert_eq!(copy, original, "the clone of pgdata@1 holds another database");
        let out = pg.pgbench(&["-n", "-c", "2", "-t", "100"]);
        assert!(out.contains("number of failed transactions: 0"), "pgbench on pgcopy:\n{out}");
        let changed = db_state(&pg);
        println!("pgcopy after pgbench: {changed:?}");
        assert_eq!(changed.accounts, "500000");
        assert_eq!(changed.history, "500", "300 + 2 clients x 100 transactions");
        pg.query("create table only_in_pgcopy(x int)");
        pg.stop();
        m.unmount();
        lo.detach();
        run_ok(&mut Command::new("sync"), QUICK);
        qsd.stop();
    }

    // 4. The snapshot target, read-only over iSCSI, is unaffected.
    let mnt = root.join("mnt-snap");
    {
        let qsd = Qsd::start_iscsi(port, &iscsi_target("pgdata@1"), &root.join("pgdata1.img"), false, GIB, "");
        let lo = Loop::attach(&qsd.file, true);
        let m = Mount::new(lo.dev(), &mnt, Some("ro,noload"));
        let version = std::fs::read_to_string(mnt.join("pg/data/PG_VERSION")).expect("PG_VERSION on pgdata@1");
        assert_eq!(version.trim(), "15");
        assert!(!mnt.join("pg/data/postmaster.pid").exists(), "pgdata@1 was snapshotted with postgres stopped");
        m.unmount();
        lo.detach();
        qsd.stop();
    }
    // ... and a fresh clone of it, over iSCSI, has the original database without pgcopy's changes.
    d.cli_ok(&["clone", "pgdata@1", "pgcheck"]);
    let mnt = root.join("mnt-pgcheck");
    let datadir = mnt.join("pg").join("data");
    {
        let qsd = Qsd::start_iscsi(port, &iscsi_target("pgcheck"), &root.join("pgcheck.img"), true, GIB, "");
        let lo = Loop::attach(&qsd.file, false);
        let m = Mount::new(lo.dev(), &mnt, None);
        let pg = Postgres::start(&datadir, &sock);
        assert_eq!(db_state(&pg), original, "pgdata@1 changed after pgbench ran on its clone pgcopy");
        assert_eq!(pg.query("select count(*) from pg_tables where tablename = 'only_in_pgcopy'"), "0");
        pg.stop();
        m.unmount();
        lo.detach();
        qsd.stop();
    }
    assert!(d.api().ready(), "the daemon stopped answering");
    let metrics = d.metrics();
    assert!(metrics.contains("forkd_iscsi_connections_closed_total"), "no iSCSI metrics:\n{metrics}");
}

/// `unique_bytes` of a volume.
fn unique(d: &Daemon, volume: &str) -> u64 {
    let v = d.cli_json(&["show", volume]);
    v["unique_bytes"].as_u64().unwrap_or_else(|| panic!("no unique_bytes for {volume}: {v}"))
}

/// The free extents of an (unmounted) ext4 filesystem as byte ranges, from `dumpe2fs`.
fn free_extents(dev: &str) -> Vec<(u64, u64)> {
    let out = run_ok(Command::new("dumpe2fs").arg(dev), QUICK);
    let block: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("Block size:").map(|v| v.trim().parse().expect("block size")))
        .unwrap_or_else(|| panic!("dumpe2fs {dev}: no block size:\n{out}"));
    let mut ranges = Vec::new();
    for l in out.lines().filter_map(|l| l.trim_start().strip_prefix("Free blocks:")) {
        for r in l.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let (a, b): (u64, u64) = (a.parse().expect("block"), b.parse().expect("block"));
            ranges.push((a * block, (b - a + 1) * block));
        }
    }
    assert!(!ranges.is_empty(), "dumpe2fs {dev}: no free blocks listed:\n{out}");
    ranges
}

/// `discard_max_bytes` of a block device (0: it does not take discards).
fn discard_max_bytes(dev: &str) -> u64 {
    let name = Path::new(dev).file_name().and_then(|n| n.to_str()).expect("device name");
    let p = format!("/sys/block/{name}/queue/discard_max_bytes");
    let v = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {p}: {e}"));
    v.trim().parse().unwrap_or_else(|e| panic!("{p}: {v:?}: {e}"))
}

/// The xxh3 of a file's contents.
fn digest(p: &Path) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())))
}

#[test]
fn deleting_a_file_and_trimming_gives_the_clones_space_back() {
    iscsi_preflight("iscsi_fs_db (trim)");
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let d = Daemon::start_in(root);
    let port = d.iscsi_port();
    d.cli_ok(&["source", "create", "base", "--size", "1G"]);
    d.cli_ok(&["clone", "base", "fs1"]);
    let target = iscsi_target("fs1");
    let img = root.join("fs1.img");
    let mnt = root.join("mnt");
    // discard=unmap lets qemu's block layer pass discards at all (the default drops them).
    let opts = ",discard=unmap";

    // ext4 with a 96 MiB file of random data and a small one to keep.
    let keep_digest = {
        let qsd = Qsd::start_iscsi(port, &target, &img, true, GIB, opts);
        let lo = Loop::attach(&qsd.file, false);
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(lo.dev()), SLOW);
        let m = Mount::new(lo.dev(), &mnt, None);
        let seed = 0x7e57_0001u64;
        let mut data = vec![0u8; 96 << 20];
        let mut x = seed;
        for chunk in data.chunks_mut(8) {
            // xorshift: incompressible, cheap, reproducible.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(mnt.join("big"), &data).expect("write big");
        std::fs::write(mnt.join("keep"), &data[..3 << 20]).expect("write keep");
        run_ok(&mut Command::new("sync"), QUICK);
        let keep = digest(&mnt.join("keep"));
        m.unmount();
        lo.detach();
        qsd.stop();
        keep
    };
    let full = unique(&d, "fs1");
    println!("fs1 with the big file: {full} unique bytes");
    assert!(full >= 99 * MIB, "fs1 holds 99 MiB of files but only {full} bytes of its own");

    // Delete the big file and trim. fstrim's exit status proves nothing here: the loop device
    // completes a discard its backing file refused as done (the kernel logs "operation not
    // supported error ... DISCARD") and turns discards off. So: fstrim, then look at forkd.
    let trimmed_by_fstrim = {
        let qsd = Qsd::start_iscsi(port, &target, &img, true, GIB, opts);
        let lo = Loop::attach(&qsd.file, false);
        let m = Mount::new(lo.dev(), &mnt, None);
        std::fs::remove_file(mnt.join("big")).expect("rm big");
        run_ok(&mut Command::new("sync"), QUICK);
        let out = run_bounded(Command::new("fstrim").arg("-v").arg(&mnt), SLOW);
        println!("fstrim -v: {} {}", out.status, text(&out));
        let freed = full.saturating_sub(unique(&d, "fs1"));
        let discards_on = discard_max_bytes(lo.dev()) > 0;
        m.unmount();
        let by_fstrim = freed >= 90 * MIB;
        let extents = if by_fstrim {
            Vec::new()
        } else {
            assert!(
                !discards_on,
                "fstrim ran with discards enabled on {} but forkd gave back only {freed} bytes of a deleted 96 MiB file",
                lo.dev()
            );
            free_extents(lo.dev())
        };
        lo.detach();
        qsd.stop();
        if !by_fstrim {
            eprintln!(
                "NOTE: the loop device turned discards off (qemu's FUSE export cannot pass them to its iSCSI driver: a \
                 hole punch needs BDRV_REQ_NO_FALLBACK); trimming the {} free extents over iSCSI with qemu-io (SCSI \
                 UNMAP) instead",
                extents.len()
            );
            let mut cmd = Command::new("qemu-io");
            cmd.args(["-f", "raw"]);
            for (off, len) in &extents {
                cmd.arg("-c").arg(format!("discard {off} {len}"));
            }
            let url = format!("iscsi://127.0.0.1:{port}/{target}/0");
            let out = run_ok(cmd.arg(&url), SLOW);
            assert!(!out.contains("failed"), "qemu-io discards over iSCSI:\n{out}");
        }
        by_fstrim
    };
    let after = unique(&d, "fs1");
    println!("fs1 after rm and trim ({}): {after} unique bytes", if trimmed_by_fstrim { "fstrim" } else { "UNMAP" });
    assert!(
        after + 90 * MIB <= full,
        "deleting a 96 MiB file and trimming gave back only {} bytes ({full} unique bytes before, {after} after)",
        full.saturating_sub(after)
    );

    // The filesystem and the file kept are intact.
    let qsd = Qsd::start_iscsi(port, &target, &img, true, GIB, opts);
    let lo = Loop::attach(&qsd.file, false);
    let out = run_bounded(Command::new("e2fsck").args(["-f", "-n"]).arg(lo.dev()), SLOW);
    assert!(out.status.success(), "e2fsck -fn after the trim: {}\n{}", out.status, text(&out));
    let m = Mount::new(lo.dev(), &mnt, None);
    assert_eq!(digest(&mnt.join("keep")), keep_digest, "the file kept changed after the trim");
    assert!(!mnt.join("big").exists());
    m.unmount();
    lo.detach();
    qsd.stop();
}
