//! A real database source for `forkd ingest --freeze`: PostgreSQL 15 on ext4 on a loop-device
//! file, running throughout. It is ingested (filesystem frozen for the read), pgbench runs,
//! it is ingested again, pgbench runs, and again. Every snapshot is then cloned, attached
//! (qemu-storage-daemon FUSE + loop, as in `nbd_fs_db.rs`, whose helpers are copied here), and
//! PostgreSQL started on it (crash recovery from a frozen, hence consistent, image) must show
//! exactly the row counts and pgbench history the source had at that ingest.
//!
//! Needs what `nbd_fs_db.rs` needs (root, /dev/fuse, loop devices, qemu-storage-daemon,
//! e2fsprogs, PostgreSQL 15 with a `postgres` user) plus `fsfreeze`.

use std::process::Command;

use forkd_tests::fsdb::*;
use forkd_tests::Daemon;

/// Size of the source filesystem.
const SIZE: u64 = 512 << 20;

#[test]
fn postgres_source_ingested_with_freeze_clones_hold_each_state() {
    preflight("agent_postgres");
    assert!(in_path("fsfreeze"), "agent_postgres needs fsfreeze: apt-get install -y util-linux");
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    chmod(root, 0o755); // the postgres user must reach the mounts and the socket directory
    let sock = root.join("sock");
    std::fs::create_dir(&sock).expect("socket dir");
    chmod(&sock, 0o777);
    let d = Daemon::start_in(root);
    let port = d.nbd_port();
    d.cli_ok(&["source", "create", "pgsrc", "--size", &SIZE.to_string()]);

    // The source host: ext4 on a loop device over a file, PostgreSQL running on it.
    let file = root.join("source.img");
    std::fs::File::create(&file).and_then(|f| f.set_len(SIZE)).expect("source image");
    let lo = Loop::attach(&file, false);
    run_ok(
        Command::new("mkfs.ext4").args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]).arg(lo.dev()),
        SLOW,
    );
    let mnt = root.join("mnt-source");
    let m = Mount::new(lo.dev(), &mnt, None);
    let pgdir = mnt.join("pg");
    std::fs::create_dir(&pgdir).expect("mkdir pg");
    run_ok(Command::new("chown").arg("postgres:").arg(&pgdir), QUICK);
    chmod(&pgdir, 0o700);
    let datadir = pgdir.join("data");
    run_ok(as_postgres("initdb", &sock).arg("-D").arg(&datadir).args(["-A", "trust", "-U", "postgres"]), SLOW);
    let pg = Postgres::start(&datadir, &sock);
    pg.pgbench(&["-i", "-s", "5", "-q"]);

    let ingest = |n: usize| {
        let out = d.cli(&["ingest", "pgsrc", "--from", lo.dev(), "--freeze", mnt.to_str().expect("utf-8")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ingest {n} failed: {}", text(&out));
        assert!(err.contains("froze ") && err.contains("thawed "), "ingest {n}: {err}");
        println!("ingest {n}: {}", String::from_utf8_lossy(&out.stdout).trim());
    };
    let mut states = Vec::new();
    // Ingest 1: just after pgbench -i.
    states.push(db_state(&pg));
    ingest(1);
    // Ingest 2 and 3: after transactions (the database keeps running through every ingest).
    for (n, t) in [(2, "100"), (3, "50")] {
        let out = pg.pgbench(&["-n", "-c", "2", "-t", t]);
        assert!(out.contains("number of failed transactions: 0"), "pgbench:\n{out}");
        states.push(db_state(&pg));
        ingest(n);
    }
    println!("source states at each ingest: {states:?}");
    // Bytes on the wire for each incremental ingest: at most 1.05x the changed bytes + 1 MiB.
    let show = d.cli_json(&["show", "pgsrc"]);
    let snaps = show["snapshots"].as_array().expect("snapshots");
    for s in snaps.iter().skip(1) {
        let changed = s["ingest"]["changed_bytes"].as_u64().expect("changed_bytes");
        let wire = s["ingest"]["wire_bytes"].as_u64().expect("wire_bytes");
        let limit = 1.05 * changed as f64 + 1048576.0;
        println!("{}: changed {changed} bytes, {wire} bytes on the wire", s["name"]);
        assert!(wire as f64 <= limit, "{}: {wire} bytes on the wire for {changed} changed (limit {limit})", s["name"]);
        assert!(changed < 64 << 20, "{}: an incremental ingest found {changed} changed bytes", s["name"]);
    }
    assert_eq!(states[0].history, "0");
    assert_eq!(states[1].history, "200");
    assert_eq!(states[2].history, "300");
    // The source is thawed and still works.
    assert_eq!(pg.query("select count(*) from pgbench_accounts"), "500000");
    // Stop the source postgres: a clone's stale postmaster.pid would otherwise name a live
    // postmaster on this host.
    pg.stop();
    m.unmount();
    lo.detach();

    for (i, want) in states.iter().enumerate() {
        let n = i + 1;
        let clone = format!("pgclone{n}");
        d.cli_ok(&["clone", &format!("pgsrc@{n}"), &clone]);
        let qsd = Qsd::start(port, &clone, &root.join(format!("{clone}.img")), true, SIZE);
        let lo = Loop::attach(&qsd.file, false);
        let cmnt = root.join(format!("mnt-{clone}"));
        let m = Mount::new(lo.dev(), &cmnt, None);
        let cdata = cmnt.join("pg").join("data");
        // The image was taken with the source running: drop its pid file, as any restore would.
        let _ = std::fs::remove_file(cdata.join("postmaster.pid"));
        let pg = Postgres::start(&cdata, &sock);
        let got = db_state(&pg);
        assert_eq!(&got, want, "the clone of pgsrc@{n} does not hold the database as of ingest {n}");
        pg.stop();
        m.unmount();
        lo.detach();
        run_ok(&mut Command::new("sync"), QUICK);
        qsd.stop();
    }
    assert!(d.api().ready(), "the daemon stopped answering");
}
