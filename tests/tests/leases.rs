//! Leases with a real daemon whose time the test sets (`--clock-file`), never sleeping for
//! hours: the `lease-expiring` hook runs before the expiry and the clone survives it; at the
//! expiry the clone is deleted after its `pre-delete` hook and a connected NBD client is
//! disconnected; a failing `pre-delete` hook keeps the clone; an idle timeout spares a clone
//! with an open connection and takes the one without; a clock that jumps forward expires what
//! is due by then, one that jumps back expires nothing; bad leases are refused with one line.
//! An environment clone's lease does the same for the whole environment: its own hooks, every
//! member deleted in one operation, idleness over all its members.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use forkd_tests::rawnbd::Client;
use forkd_tests::{metric_value, wait_until, write_script, Daemon, TestClock};
use serde_json::Value;

const H: i64 = TestClock::H;
const T0: i64 = TestClock::T0;
/// How long a test waits for the reaper (which ticks every 100 ms here) to act.
const WAIT: Duration = Duration::from_secs(20);

/// A daemon with hooks from `root/hooks` (each script records its event and volume in
/// `root/events.log`, `fail-delete` fails) and its time read from `root/now`, set to `T0`.
struct Env {
    d: Daemon,
    root: PathBuf,
    clock: TestClock,
}

impl Env {
    fn start(root: &Path) -> Env {
        let hooks = root.join("hooks");
        std::fs::create_dir_all(&hooks).expect("hooks dir");
        std::fs::set_permissions(&hooks, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let log = root.join("events.log");
        let record = format!("echo \"$FORKD_EVENT|$FORKD_VOLUME\" >> {}", log.display());
        write_script(&hooks, "record", &record);
        write_script(&hooks, "record-env", &format!("echo \"$FORKD_EVENT|env:$FORKD_ENV\" >> {}", log.display()));
        write_script(&hooks, "fail-delete", &format!("{record}\necho 'the database is still in use' >&2\nexit 1"));
        let clock = TestClock::new(&root.join("now"));
        let flags = [
            "--hooks-dir",
            hooks.to_str().expect("utf-8"),
            "--hook-user",
            "root",
            "--clock-file",
            clock.path().to_str().expect("utf-8"),
            "--lease-tick",
            "100ms",
        ];
        let d = Daemon::start_with(root, "127.0.0.1", &flags);
        let env = Env { d, root: root.to_path_buf(), clock };
        env.source();
        env
    }

    /// Set the daemon's time to `T0 + offset`.
    fn at(&self, offset: i64) {
        self.clock.at(offset);
    }

    /// A source `prod` with one snapshot; every clone inherits its `record` hooks.
    fn source(&self) {
        let img = self.root.join("prod.img");
        std::fs::write(&img, vec![7u8; 1 << 20]).expect("image");
        self.d.cli_ok(&["source", "create", "prod", "--size", "1M"]);
        self.d.cli_ok(&["ingest", "prod", "--from", img.to_str().expect("utf-8")]);
        for event in ["lease-expiring", "pre-delete"] {
            self.d.cli_ok(&["hook", "set", "prod", event, "record"]);
        }
    }

    /// A second source `app` and environment `shop` (`db=prod`, `app=app`) whose
    /// `lease-expiring` and `pre-delete` hooks record `EVENT|env:ENV`; its clones inherit them.
    fn shop(&self) {
        let img = self.root.join("app.img");
        std::fs::write(&img, vec![9u8; 1 << 20]).expect("image");
        self.d.cli_ok(&["source", "create", "app", "--size", "1M"]);
        self.d.cli_ok(&["ingest", "app", "--from", img.to_str().expect("utf-8")]);
        self.d.cli_ok(&["env", "create", "shop", "db=prod", "app=app"]);
        for event in ["lease-expiring", "pre-delete"] {
            self.d.cli_ok(&["hook", "set", "shop", event, "record-env"]);
        }
    }

    fn env_exists(&self, env: &str) -> bool {
        self.d.cli(&["env", "show", env]).status.success()
    }

    fn events(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.root.join("events.log")).unwrap_or_default();
        text.lines().map(str::to_string).collect()
    }

    fn exists(&self, volume: &str) -> bool {
        self.d.cli(&["show", volume]).status.success()
    }

    /// Wait (bounded) until `cond` holds.
    fn wait(&self, what: &str, cond: impl Fn() -> bool) {
        wait_until(&self.d, what, WAIT, cond);
    }

    /// The operation log's entries of the lease reaper on `volume`.
    fn reaper_log(&self, volume: &str) -> Vec<Value> {
        let log = self.d.api().get_json(&format!("/v1/log?volume={volume}"));
        let entries = log["entries"].as_array().cloned().unwrap_or_default();
        entries.into_iter().filter(|e| e["who"] == "lease").collect()
    }

    /// The CLI's stderr for a command that must fail, checked to be one line.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.d.cli(args);
        assert!(!out.status.success(), "forkd {} should have failed", args.join(" "));
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        err
    }
}

fn time(ms: i64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{}", ms / 1000), "+%Y-%m-%dT%H:%M:%S.000Z"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn expiry_warns_then_deletes_after_pre_delete_and_disconnects() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let d = &env.d;
    d.cli_ok(&["clone", "prod@1", "dev", "--lease", "72h"]);
    let shown = d.cli_json(&["show", "dev"]);
    assert_eq!(shown["lease"]["expires_at"], time(T0 + 72 * H), "{shown}");
    assert_eq!(shown["lease"]["idle"], Value::Null);
    let mut client = Client::open(&d.nbd_addr(), "dev", false);
    assert!(client.read(0, 4096).is_ok());

    env.at(70 * H);
    std::thread::sleep(Duration::from_millis(500));
    assert!(env.events().is_empty(), "nothing runs 2h before the expiry: {:?}", env.events());
    env.at(71 * H);
    env.wait("the lease-expiring hook", || env.events().contains(&"lease-expiring|dev".to_string()));
    assert!(env.exists("dev"), "a warning deletes nothing");
    assert_eq!(metric_value(&d.metrics(), "forkd_leases_expiring"), 1.0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(env.events(), vec!["lease-expiring|dev".to_string()], "the warning runs once");

    env.at(72 * H + 1000);
    env.wait("the expiry", || !env.exists("dev"));
    assert_eq!(env.events(), vec!["lease-expiring|dev".to_string(), "pre-delete|dev".to_string()]);
    assert!(client.wait_closed(Duration::from_secs(10)), "the NBD client was disconnected");
    let logged = env.reaper_log("dev");
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!((logged[0]["what"].as_str(), logged[0]["result"].as_str()), (Some("delete"), Some("ok")));
    let m = d.metrics();
    assert_eq!(metric_value(&m, "forkd_lease_expiries_total{reason=\"expired\"}"), 1.0);
    assert_eq!(metric_value(&m, "forkd_leases_expiring"), 0.0);
    assert!(env.exists("prod"));
}

#[test]
fn a_failing_pre_delete_hook_keeps_the_clone() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let d = &env.d;
    d.cli_ok(&["clone", "prod@1", "dev", "--lease", "1h"]);
    d.cli_ok(&["hook", "set", "dev", "pre-delete", "fail-delete"]);
    env.at(2 * H);
    env.wait("a failed expiry in the operation log", || !env.reaper_log("dev").is_empty());
    let logged = env.reaper_log("dev");
    assert_eq!(logged[0]["result"], "failed", "{logged:?}");
    assert!(logged[0]["error"].as_str().is_some_and(|e| e.contains("still in use")), "{logged:?}");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(env.exists("dev"), "the clone stays");
    assert_eq!(env.reaper_log("dev").len(), 1, "not tried again at every tick");
    assert!(d.log().contains("could not be deleted"), "logged");
    // Extending the lease makes it no longer due; the clone keeps serving.
    let out = d.cli_ok(&["lease", "dev", "--extend", "24h"]);
    assert!(out.contains(&time(T0 + 26 * H)), "{out}");
}

#[test]
fn idle_expiry_spares_a_clone_with_an_open_connection() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let d = &env.d;
    for name in ["busy", "quiet"] {
        d.cli_ok(&["clone", "prod@1", name]);
        d.cli_ok(&["lease", name, "--idle", "1h"]);
        assert_eq!(d.cli_json(&["show", name])["lease"]["idle"], "1h");
    }
    let client = Client::open(&d.nbd_addr(), "busy", false);
    idle_expiries(&env, client, &|name| env.exists(name));
    assert_eq!(env.events(), vec!["pre-delete|quiet".to_string(), "pre-delete|busy".to_string()]);
}

/// With `busy` (reached by `client`) and `quiet` on a 1 h idle lease since T0 (`alive` says
/// whether one still exists): `quiet` expires at +2h, `busy` not while `client` is connected,
/// and an hour after it disconnects.
fn idle_expiries(env: &Env, mut client: Client, alive: &dyn Fn(&str) -> bool) {
    env.at(30 * 60_000);
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive("quiet"), "not idle long enough yet");
    env.at(2 * H);
    env.wait("the idle expiry", || !alive("quiet"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive("busy"), "an open connection is not idle");
    assert!(client.read(0, 4096).is_ok(), "and its client still reads");
    assert_eq!(metric_value(&env.d.metrics(), "forkd_lease_expiries_total{reason=\"idle\"}"), 1.0);
    // Idleness counts from the connection's close.
    client.disconnect();
    std::thread::sleep(Duration::from_millis(500));
    env.at(2 * H + 50 * 60_000);
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive("busy"), "50 minutes after its last connection");
    env.at(3 * H + 10 * 60_000);
    env.wait("the expiry an hour after the close", || !alive("busy"));
}

#[test]
fn bad_leases_are_refused_with_one_line() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let d = &env.d;
    d.cli_ok(&["clone", "prod@1", "free"]);
    let err = env.fails(&["lease", "free", "--expires", &time(T0 - H)]);
    assert!(err.contains("not in the future"), "{err}");
    let err = env.fails(&["lease", "prod", "--idle", "1h"]);
    assert!(err.contains("is a source"), "{err}");
    let err = env.fails(&["lease", "free", "--extend", "soon"]);
    assert!(err.contains("72h"), "{err}");
    let err = env.fails(&["clone", "prod@1", "zero", "--lease", "0h"]);
    assert!(err.contains("positive"), "{err}");
    let err = env.fails(&["lease", "free", "--expires", "tomorrow"]);
    assert!(err.contains("RFC 3339"), "{err}");
    let two =
        d.api().request("PUT", "/v1/volumes/free/lease", Some(("application/json", br#"{"none":true,"idle":"1h"}"#)));
    assert_eq!(two.expect("answer").status, 400);

    let err = env.fails(&["policy", "set", "prod", "default_lease=40d", "max_lease=30d"]);
    assert!(err.contains("longer than max_lease"), "{err}");
    let src = d.cli_json(&["policy", "set", "prod", "default_lease=72h", "max_lease=30d"]);
    assert_eq!((src["default_lease"].as_str(), src["max_lease"].as_str()), (Some("3d"), Some("30d")));
    let err = env.fails(&["clone", "prod@1", "long", "--lease", "31d"]);
    assert!(err.contains("longer than max_lease=30d of `prod`"), "{err}");
    assert!(!env.exists("long"), "nothing was made");
    d.cli_ok(&["clone", "prod@1", "dev"]);
    assert_eq!(d.cli_json(&["show", "dev"])["lease"]["expires_at"], time(T0 + 72 * H));
    d.cli_ok(&["clone", "dev", "dev2"]);
    assert_eq!(d.cli_json(&["show", "dev2"])["lease"]["expires_at"], time(T0 + 72 * H), "up the origin chain");
    let err = env.fails(&["lease", "dev", "--none"]);
    assert!(err.contains("must keep a lease"), "{err}");
    let err = env.fails(&["lease", "dev", "--extend", "30d"]);
    assert!(err.contains("longer than max_lease"), "{err}");
    d.cli_ok(&["lease", "dev", "--expires", &time(T0 + 24 * H)]);
    // The clone made before the policy keeps no lease; it may not take one beyond the maximum.
    assert!(d.cli_json(&["show", "free"]).get("lease").is_none());
    d.cli_ok(&["policy", "set", "prod", "max_lease=none"]);
    d.cli_ok(&["lease", "dev", "--none"]);
    assert!(d.cli_json(&["show", "dev"]).get("lease").is_none());
}

#[test]
fn the_clock_jumping_forward_expires_what_is_due_and_back_nothing() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let d = &env.d;
    d.cli_ok(&["clone", "prod@1", "short", "--lease", "72h"]);
    d.cli_ok(&["clone", "prod@1", "long", "--lease", "10d"]);
    env.at(5 * 24 * H);
    env.wait("the expiry after the jump", || !env.exists("short"));
    assert_eq!(env.events(), vec!["lease-expiring|short".to_string(), "pre-delete|short".to_string()], "warned first");
    assert!(env.exists("long"));
    env.at(-10 * 24 * H);
    env.wait("the jump back in the daemon's log", || d.log().contains("the clock went back"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(env.exists("long"), "nothing is due after a jump back");
    assert_eq!(env.events().len(), 2);
    // A clock file that cannot be read: logged, and the system clock (before T0) is used.
    std::fs::write(t.path().join("now"), "next tuesday").expect("clock");
    env.wait("the bad clock file in the daemon's log", || d.log().contains("not a time"));
    assert!(env.exists("long"));
    env.at(10 * 24 * H);
    env.wait("the second expiry", || !env.exists("long"));
}

#[test]
fn an_environment_lease_warns_then_deletes_the_whole_environment() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let d = &env.d;
    env.shop();
    let out = d.cli_ok(&["env", "clone", "shop@latest", "qa", "--lease", "72h"]);
    assert!(out.contains(&time(T0 + 72 * H)), "{out}");
    let shown = d.cli_json(&["env", "show", "qa"]);
    assert_eq!(shown["lease"]["expires_at"], time(T0 + 72 * H), "{shown}");
    assert!(d.cli_ok(&["env", "show", "qa"]).contains("lease:"));
    let listed = d.cli_ok(&["env", "list"]);
    let qa = listed.lines().find(|l| l.starts_with("qa ")).unwrap_or_default();
    assert!(qa.contains("lease: expires"), "env list shows the lease: {listed}");
    let shop = listed.lines().find(|l| l.starts_with("shop ")).unwrap_or_default();
    assert!(!shop.contains("lease"), "{listed}");
    let mut client = Client::open(&d.nbd_addr(), "qa.db", false);
    assert!(client.read(0, 4096).is_ok());

    env.at(70 * H);
    std::thread::sleep(Duration::from_millis(500));
    assert!(env.events().is_empty(), "nothing runs 2h before the expiry: {:?}", env.events());
    env.at(71 * H);
    env.wait("the environment's lease-expiring hook", || env.events().contains(&"lease-expiring|env:qa".to_string()));
    assert!(env.env_exists("qa") && env.exists("qa.db"), "a warning deletes nothing");
    assert_eq!(metric_value(&d.metrics(), "forkd_leases_expiring"), 1.0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(env.events(), vec!["lease-expiring|env:qa".to_string()], "the warning runs once");

    env.at(72 * H + 1000);
    env.wait("the environment's expiry", || !env.env_exists("qa"));
    assert!(!env.exists("qa.db") && !env.exists("qa.app"), "both members went with it");
    assert_eq!(env.events(), vec!["lease-expiring|env:qa".to_string(), "pre-delete|env:qa".to_string()]);
    assert!(client.wait_closed(Duration::from_secs(10)), "the member's NBD client was disconnected");
    let logged = env.reaper_log("qa");
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!((logged[0]["what"].as_str(), logged[0]["result"].as_str()), (Some("env delete"), Some("ok")));
    let m = d.metrics();
    assert_eq!(metric_value(&m, "forkd_lease_expiries_total{reason=\"expired\"}"), 1.0);
    assert_eq!(metric_value(&m, "forkd_leases_expiring"), 0.0);
    assert!(env.env_exists("shop") && env.exists("prod") && env.exists("app"));
}

#[test]
fn an_idle_environment_lease_spares_it_while_a_member_is_connected() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let d = &env.d;
    env.shop();
    for name in ["busy", "quiet"] {
        d.cli_ok(&["env", "clone", "shop", name]);
        let shown = d.cli_json(&["lease", name, "--idle", "1h"]);
        assert_eq!(shown["lease"]["idle"], "1h", "{shown}");
    }
    let client = Client::open(&d.nbd_addr(), "busy.app", false);
    idle_expiries(&env, client, &|name| env.env_exists(name));
    assert!(!env.exists("quiet.db") && !env.exists("quiet.app"), "the members went with it");
    assert_eq!(env.events(), vec!["pre-delete|env:quiet".to_string(), "pre-delete|env:busy".to_string()]);
}

#[test]
fn bad_environment_leases_are_refused_with_one_line() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let d = &env.d;
    env.shop();
    d.cli_ok(&["env", "clone", "shop", "qa"]);
    assert!(d.cli_json(&["env", "show", "qa"]).get("lease").is_none(), "no policy, no lease");
    let err = env.fails(&["lease", "qa", "--expires", &time(T0 - H)]);
    assert!(err.contains("not in the future"), "{err}");
    let err = env.fails(&["lease", "shop", "--idle", "1h"]);
    assert!(err.contains("only an environment of clones"), "{err}");
    let err = env.fails(&["lease", "qa.db", "--idle", "1h"]);
    assert!(err.contains("take no lease of their own"), "{err}");
    let err = env.fails(&["env", "clone", "shop", "zero", "--lease", "0h"]);
    assert!(err.contains("positive"), "{err}");
    let two = d.api().request(
        "PUT",
        "/v1/environments/qa/lease",
        Some(("application/json", br#"{"none":true,"idle":"1h"}"#)),
    );
    assert_eq!(two.expect("answer").status, 400);

    // The strictest of the members' sources' policies: app's max_lease and default.
    d.cli_ok(&["policy", "set", "prod", "default_lease=72h", "max_lease=30d"]);
    d.cli_ok(&["policy", "set", "app", "default_lease=24h", "max_lease=10d"]);
    let err = env.fails(&["env", "clone", "shop", "long", "--lease", "11d"]);
    assert!(err.contains("longer than max_lease=10d of `app`"), "{err}");
    assert!(!env.env_exists("long") && !env.exists("long.db"), "nothing was made");
    d.cli_ok(&["env", "clone", "shop", "dev"]);
    assert_eq!(d.cli_json(&["env", "show", "dev"])["lease"]["expires_at"], time(T0 + 24 * H));
    let err = env.fails(&["lease", "dev", "--none"]);
    assert!(err.contains("must keep a lease"), "{err}");
    let err = env.fails(&["lease", "dev", "--extend", "10d"]);
    assert!(err.contains("longer than max_lease=10d"), "{err}");
    let out = d.cli_ok(&["lease", "dev", "--extend", "24h"]);
    assert!(out.contains(&time(T0 + 48 * H)), "{out}");
    // The environment made before the policies keeps no lease; it may not drop one it takes.
    assert!(d.cli_json(&["env", "show", "qa"]).get("lease").is_none());
    d.cli_ok(&["lease", "qa", "--extend", "1h"]);
    let err = env.fails(&["lease", "qa", "--none"]);
    assert!(err.contains("must keep a lease"), "{err}");
}

#[test]
fn a_failing_pre_delete_hook_keeps_the_environment() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let d = &env.d;
    env.shop();
    d.cli_ok(&["env", "clone", "shop", "qa", "--lease", "1h"]);
    d.cli_ok(&["hook", "set", "qa", "pre-delete", "fail-delete"]);
    env.at(2 * H);
    env.wait("a failed expiry in the operation log", || !env.reaper_log("qa").is_empty());
    let logged = env.reaper_log("qa");
    assert_eq!(logged[0]["result"], "failed", "{logged:?}");
    assert!(logged[0]["error"].as_str().is_some_and(|e| e.contains("still in use")), "{logged:?}");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(env.env_exists("qa") && env.exists("qa.db") && env.exists("qa.app"), "the environment stays whole");
    assert_eq!(env.reaper_log("qa").len(), 1, "not tried again at every tick");
}
