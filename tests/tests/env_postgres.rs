//! The database and its application travel together, with real software end to end:
//! - a source environment `shop` of PostgreSQL 15 on ext4 (`db`) and an application volume
//!   (`app`: ext4 with `app.conf`, which names the database's volume and port, and some files),
//!   both ingested three times while the database changes, each at its own moment;
//! - `forkd env clone shop@TIME dev` at a time between the second and third ingests gets each
//!   member's second snapshot; the environment's `configure-clone` hook attaches the app clone
//!   (by the capability URI only it is given), and rewrites `app.conf` to name the clone's
//!   database; the test reads that config from the app clone, attaches the database it names
//!   and connects to it on the port it names;
//! - a `mask` hook attaches the masked volume, starts PostgreSQL on it and replaces every
//!   e-mail address; with `clone_from=masked` on `db`, clones of the masked snapshot see only
//!   masked addresses and an environment clone of `shop` is refused.
//!
//! Attaching is as in the other database tests (TESTING.md): qemu-storage-daemon's FUSE
//! export (the test) or `nbdfuse` (the hooks), a loop device, a mount. Needs root.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use forkd_tests::fsdb::*;
use forkd_tests::{free_port, Daemon};

const MIB: u64 = 1 << 20;
const DB_SIZE: u64 = 256 * MIB;
const APP_SIZE: u64 = 64 * MIB;

/// Shell functions the hooks share: attach an NBD URI at DIR/mnt (nbdfuse, loop, mount) and
/// detach it again.
const LIB: &str = r#"
attach() {
  mkdir -p "$2/fuse" "$2/mnt"
  nbdfuse "$2/fuse" "$1" &
  i=0; while [ ! -e "$2/fuse/nbd" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
  LO=$(losetup -f --show "$2/fuse/nbd")
  mount "$LO" "$2/mnt"
}
detach() {
  sync
  umount "$1/mnt"
  losetup -d "$LO"
  fusermount3 -u "$1/fuse"
  wait
}
"#;

/// The environment's configure-clone hook: point the app clone's config at the clone's database.
fn configure(port: u16) -> String {
    format!(
        r#"#!/bin/bash
set -eu
. ./lib.sh
w=$(mktemp -d /tmp/forkd-configure.XXXXXX)
attach "$FORKD_APP_NBD_URI" "$w"
sed -i -e "s/^db_volume=.*/db_volume=$FORKD_DB_VOLUME/" -e "s/^db_port=.*/db_port={port}/" "$w/mnt/app.conf"
echo "configured_for=$FORKD_ENV" >> "$w/mnt/app.conf"
detach "$w"
rmdir "$w/fuse" "$w/mnt" "$w"
"#
    )
}

/// The db's mask hook: start PostgreSQL on the masked volume and replace every address.
fn mask_db(port: u16) -> String {
    format!(
        r#"#!/bin/bash
set -eu
. ./lib.sh
w=$(mktemp -d /tmp/forkd-mask.XXXXXX)
chmod 755 "$w"
attach "$FORKD_NBD_URI" "$w"
mkdir "$w/sock"; chmod 777 "$w/sock"; cd "$w/sock"
pg=/usr/lib/postgresql/15/bin
runuser -u postgres -- $pg/pg_ctl -D "$w/mnt/pg/data" -l "$w/sock/log" -w -t 120 \
  -o "-k $w/sock -p {port} -c listen_addresses=''" start
runuser -u postgres -- $pg/psql -h "$w/sock" -p {port} -U postgres -X -q -v ON_ERROR_STOP=1 \
  -c "update users set email = 'user' || id || '@masked.invalid'" -c "vacuum full users" -c "checkpoint" postgres
runuser -u postgres -- $pg/pg_ctl -D "$w/mnt/pg/data" -m fast -w stop
cd /
detach "$w"
rm -rf "$w/sock"; rmdir "$w/fuse" "$w/mnt" "$w"
"#
    )
}

fn write_hook(dir: &Path, name: &str, text: &str, mode: u32) {
    std::fs::write(dir.join(name), text).expect("hook");
    std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The test's side of the source host: images changed between ingests.
struct Host<'a> {
    root: &'a Path,
    sock: &'a Path,
}

impl Host<'_> {
    /// Round `round` of the database: the first creates ext4, PostgreSQL and the tables; every
    /// round adds 100 users with real-looking addresses and a row in `rounds`.
    fn change_db(&self, round: u32) {
        let img = self.root.join("db.img");
        if round == 1 {
            std::fs::File::create(&img).and_then(|f| f.set_len(DB_SIZE)).expect("db.img");
        }
        let lo = Loop::attach(&img, false);
        if round == 1 {
            run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(lo.dev()), SLOW);
        }
        let mnt = self.root.join("mnt-db");
        let m = Mount::new(lo.dev(), &mnt, None);
        let data = mnt.join("pg").join("data");
        if round == 1 {
            std::fs::create_dir(mnt.join("pg")).expect("mkdir pg");
            run_ok(Command::new("chown").arg("postgres:").arg(mnt.join("pg")), QUICK);
            chmod(&mnt.join("pg"), 0o700);
            run_ok(as_postgres("initdb", self.sock).arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres"]), SLOW);
        }
        let pg = Postgres::start(&data, self.sock);
        if round == 1 {
            pg.query("create table users (id int primary key, email text not null)");
            pg.query("create table rounds (round int)");
        }
        let first = (round - 1) * 100 + 1;
        pg.query(&format!(
            "insert into users select i, 'person' || i || '@corp.example.com' from generate_series({first}, {}) i",
            first + 99
        ));
        pg.query(&format!("insert into rounds values ({round})"));
        pg.query("checkpoint");
        pg.stop();
        m.unmount();
        lo.detach();
    }

    /// Round `round` of the application: its config names the production database.
    fn change_app(&self, round: u32) {
        let img = self.root.join("app.img");
        if round == 1 {
            std::fs::File::create(&img).and_then(|f| f.set_len(APP_SIZE)).expect("app.img");
        }
        let lo = Loop::attach(&img, false);
        if round == 1 {
            run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(lo.dev()), SLOW);
        }
        let m = Mount::new(lo.dev(), &self.root.join("mnt-app"), None);
        let dir = self.root.join("mnt-app");
        std::fs::write(dir.join("app.conf"), "db_volume=db\ndb_port=5432\n").expect("app.conf");
        std::fs::write(dir.join("round"), round.to_string()).expect("round");
        std::fs::write(dir.join(format!("upload-{round}.txt")), format!("round {round}\n").repeat(30_000))
            .expect("file");
        m.unmount();
        lo.detach();
    }
}

/// Attach `volume` of `d` read-write at `root/mnt-NAME` (qemu-storage-daemon, loop, mount).
fn attach(d: &Daemon, root: &Path, volume: &str, size: u64) -> (Qsd, Loop, Mount) {
    let qsd = Qsd::start(d.nbd_port(), volume, &root.join(format!("{volume}.attach")), true, size);
    let lo = Loop::attach(&qsd.file, false);
    let m = Mount::new(lo.dev(), &root.join(format!("mnt-{volume}")), None);
    (qsd, lo, m)
}

fn config_value(conf: &str, key: &str) -> String {
    let line = conf.lines().find_map(|l| l.strip_prefix(&format!("{key}=")));
    line.unwrap_or_else(|| panic!("{key} missing from app.conf:\n{conf}")).to_string()
}

#[test]
fn database_and_application_cloned_configured_and_masked_together() {
    preflight("env_postgres");
    assert!(in_path("nbdfuse"), "env_postgres needs nbdfuse: apt-get install -y libnbd-bin");
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    chmod(root, 0o755);
    let sock = root.join("sock");
    std::fs::create_dir(&sock).expect("sock");
    chmod(&sock, 0o777);
    let hooks = root.join("hooks");
    std::fs::create_dir(&hooks).expect("hooks");
    chmod(&hooks, 0o755);
    let (clone_port, mask_port) = (free_port(), free_port());
    write_hook(&hooks, "lib.sh", LIB, 0o644);
    write_hook(&hooks, "configure", &configure(clone_port), 0o755);
    write_hook(&hooks, "mask-db", &mask_db(mask_port), 0o755);
    let d =
        Daemon::start_with(root, "127.0.0.1", &["--hooks-dir", hooks.to_str().expect("utf-8"), "--hook-user", "root"]);

    // Three rounds, each volume ingested at its own moment.
    d.cli_ok(&["source", "create", "db", "--size", "256M"]);
    d.cli_ok(&["source", "create", "app", "--size", "64M"]);
    let host = Host { root, sock: &sock };
    for round in 1..=3 {
        host.change_db(round);
        d.cli_ok(&["ingest", "db", "--from", root.join("db.img").to_str().expect("utf-8")]);
        host.change_app(round);
        d.cli_ok(&["ingest", "app", "--from", root.join("app.img").to_str().expect("utf-8")]);
    }
    d.cli_ok(&["env", "create", "shop", "db=db", "app=app"]);
    d.cli_ok(&["hook", "set", "shop", "configure-clone", "configure", "--timeout", "120s"]);

    // A time between the second and the third ingests: after app@2, before db@3.
    let app = d.cli_json(&["show", "app"]);
    let between = app["snapshots"][1]["created_at"].as_str().expect("app@2 time").to_string();
    let cloned = d.cli_json(&["env", "clone", &format!("shop@{between}"), "dev"]);
    assert_eq!(cloned["made_from"]["db"], "db@2", "{cloned}");
    assert_eq!(cloned["made_from"]["app"], "app@2", "{cloned}");

    // The app clone's config names the clone's database; connect to it as the app would.
    let (db_volume, db_port) = {
        let (qsd, lo, m) = attach(&d, root, "dev.app", APP_SIZE);
        let dir = root.join("mnt-dev.app");
        let conf = std::fs::read_to_string(dir.join("app.conf")).expect("app.conf");
        assert_eq!(std::fs::read_to_string(dir.join("round")).expect("round"), "2");
        assert!(conf.contains("configured_for=dev"), "{conf}");
        let found = (config_value(&conf, "db_volume"), config_value(&conf, "db_port"));
        m.unmount();
        lo.detach();
        qsd.stop();
        found
    };
    assert_eq!((db_volume.as_str(), db_port.clone()), ("dev.db", clone_port.to_string()));
    {
        let (qsd, lo, m) = attach(&d, root, &db_volume, DB_SIZE);
        let data = root.join(format!("mnt-{db_volume}")).join("pg").join("data");
        let pg = Postgres::start_on(&data, &sock, db_port.parse().expect("port"));
        assert_eq!(pg.query("select max(round) from rounds"), "2", "the clone's database is at the second ingest");
        assert_eq!(pg.query("select count(*) from users"), "200");
        pg.stop();
        m.unmount();
        lo.detach();
        qsd.stop();
    }

    // Masking: the hook runs PostgreSQL on the masked volume; downstream sees masked data only.
    d.cli_ok(&["mask", "db@3", "--with", "mask-db", "--into", "db-masked", "--timeout", "300s"]);
    d.cli_ok(&["policy", "set", "db", "clone_from=masked"]);
    let out = d.cli(&["env", "clone", "shop@latest", "dev2"]);
    assert!(!out.status.success(), "an environment clone of unmasked data was allowed");
    assert!(String::from_utf8_lossy(&out.stderr).contains("db-masked"), "{out:?}");
    d.cli_ok(&["clone", "db-masked@latest", "masked-dev"]);
    let (qsd, lo, m) = attach(&d, root, "masked-dev", DB_SIZE);
    let pg = Postgres::start(&root.join("mnt-masked-dev").join("pg").join("data"), &sock);
    assert_eq!(pg.query("select count(*) from users"), "300");
    assert_eq!(pg.query("select count(*) from users where email not like '%@masked.invalid'"), "0");
    assert_eq!(pg.query("select max(round) from rounds"), "3");
    pg.stop();
    m.unmount();
    lo.detach();
    qsd.stop();

    // The whole environment: db through its mask hook, app (no policy, no hook) as is; its
    // clone is a masked database with its application.
    d.cli_ok(&["hook", "set", "db", "mask", "mask-db", "--timeout", "300s"]);
    let masked = d.cli_json(&["mask", "shop@latest", "--into", "shop-masked"]);
    assert_eq!(masked["members"]["db"], "shop-masked.db@1", "{masked}");
    d.cli_ok(&["env", "clone", "shop-masked@latest", "mqa"]);
    let (qsd, lo, m) = attach(&d, root, "mqa.db", DB_SIZE);
    let pg = Postgres::start(&root.join("mnt-mqa.db").join("pg").join("data"), &sock);
    assert_eq!(pg.query("select count(*) from users where email like '%@masked.invalid'"), "300");
    pg.stop();
    m.unmount();
    lo.detach();
    qsd.stop();
}
