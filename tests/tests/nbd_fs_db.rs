//! A real filesystem and a real database on forkd clones over NBD.
//!
//! There is no kernel NBD client here, so a volume is attached as TESTING.md describes:
//! qemu-storage-daemon connects to forkd's NBD export and exposes it as a file through its FUSE
//! export, and a loop device turns the file into a block device. On it: ext4 and PostgreSQL 15
//! loaded by `pgbench -i -s 5` plus some transactions. Then `forkd snapshot` and `forkd clone`
//! give a copy that must hold exactly the same database, whose own changes must not reach the
//! snapshot it came from.
//!
//! Needs root, /dev/fuse, loop devices, qemu-storage-daemon, e2fsprogs and PostgreSQL 15 under
//! /usr/lib/postgresql/15/bin with a `postgres` user; a missing piece fails the test with a
//! message saying what to install. Everything the test sets up (postgres, mounts, loop devices,
//! qemu-storage-daemon, forkd) is torn down by Drop guards, also when it fails.

use std::process::Command;

use forkd_tests::fsdb::*;
use forkd_tests::Daemon;

#[test]
fn ext4_and_postgres_on_a_clone_then_on_a_clone_of_its_snapshot() {
    preflight("nbd_fs_db");
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    chmod(root, 0o755); // the postgres user must reach the mounts and the socket directory
    let sock = root.join("sock");
    std::fs::create_dir(&sock).expect("socket dir");
    chmod(&sock, 0o777);
    let d = Daemon::start_in(root);
    let port = d.nbd_port();
    d.cli_ok(&["source", "create", "base", "--size", "1G"]);
    d.cli_ok(&["clone", "base", "pgdata"]);

    // 1. pgdata: ext4, initdb, pgbench -i -s 5 and some transactions.
    let mnt = root.join("mnt-pgdata");
    let pgdir = mnt.join("pg");
    let datadir = pgdir.join("data");
    let original = {
        let qsd = Qsd::start(port, "pgdata", &root.join("pgdata.img"), true, GIB);
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

    // 2. Snapshot it and clone the snapshot.
    let out = d.cli_ok(&["snapshot", "pgdata"]);
    assert!(out.contains("pgdata@1"), "forkd snapshot pgdata: {out}");
    d.cli_ok(&["clone", "pgdata@1", "pgcopy"]);

    // 3. pgcopy holds the same database; then change it.
    let mnt = root.join("mnt-pgcopy");
    let datadir = mnt.join("pg").join("data");
    {
        let qsd = Qsd::start(port, "pgcopy", &root.join("pgcopy.img"), true, GIB);
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

    // 4. The snapshot is unaffected: read-only mount of pgdata@1 ...
    let mnt = root.join("mnt-snap");
    {
        let qsd = Qsd::start(port, "pgdata@1", &root.join("pgdata1.img"), false, GIB);
        let lo = Loop::attach(&qsd.file, true);
        let m = Mount::new(lo.dev(), &mnt, Some("ro,noload"));
        let version = std::fs::read_to_string(mnt.join("pg/data/PG_VERSION")).expect("PG_VERSION on pgdata@1");
        assert_eq!(version.trim(), "15");
        assert!(!mnt.join("pg/data/postmaster.pid").exists(), "pgdata@1 was snapshotted with postgres stopped");
        m.unmount();
        lo.detach();
        qsd.stop();
    }
    // ... and a fresh clone of it has the original database, without pgcopy's changes.
    d.cli_ok(&["clone", "pgdata@1", "pgcheck"]);
    let mnt = root.join("mnt-pgcheck");
    let datadir = mnt.join("pg").join("data");
    {
        let qsd = Qsd::start(port, "pgcheck", &root.join("pgcheck.img"), true, GIB);
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
    assert!(metrics.contains("forkd_nbd_connections"), "no NBD metrics:\n{metrics}");
}
