//! Schedules with a real daemon whose time the test sets (`--clock-file`), never sleeping until
//! a cron time: a nightly `ingest` + `refresh` runs at its time and the clone sees the new data;
//! a failing step ends the run, in the operation log and `schedule list`; a run missed while
//! the daemon was down catches up exactly once after a restart (or is skipped); `schedule run`
//! runs now and a second run of the same schedule is refused (409); a daemon killed during a
//! run reports it interrupted at its next start, one stopped ends it before its next step;
//! snapshot, mask and prune steps run as their operations; snapshot and refresh steps naming an
//! environment run its operation (every member as one), other steps refuse one, and one gone
//! or turned into a volume since fails its step; an ingest step reaches a daemon that requires a token (listening on
//! 0.0.0.0); bad input is refused with one line.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use forkd_tests::{hooks_dir, metric_value, wait_until, Daemon, TestClock};
use serde_json::{json, Value};

const H: i64 = TestClock::H;
const T0: i64 = TestClock::T0;
/// How long a test waits for the scheduler (which ticks every 100 ms here).
const WAIT: Duration = Duration::from_secs(30);

/// A daemon with its time read from `root/now` (set to `T0`), hooks from `root/hooks` (`slow`
/// sleeps 3 s, `noop` succeeds), a source `prod` fed from `root/prod.img` (all 7s) and a clone `dev1`.
struct Env {
    d: Daemon,
    root: PathBuf,
    flags: Vec<String>,
    clock: TestClock,
}

impl Env {
    fn start(root: &Path) -> Env {
        let hooks = hooks_dir(root, &[("slow", "sleep 3"), ("noop", "exit 0")]);
        let clock = TestClock::new(&root.join("now"));
        let flags: Vec<String> = [
            "--hooks-dir",
            hooks.to_str().expect("utf-8"),
            "--hook-user",
            "root",
            "--clock-file",
            clock.path().to_str().expect("utf-8"),
            "--lease-tick",
            "100ms",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        let args: Vec<&str> = flags.iter().map(String::as_str).collect();
        let d = Daemon::start_with(root, "127.0.0.1", &args);
        let env = Env { d, root: root.to_path_buf(), flags, clock };
        std::fs::write(env.image(), vec![7u8; 1 << 20]).expect("image");
        env.d.cli_ok(&["source", "create", "prod", "--size", "1M"]);
        env.d.cli_ok(&["ingest", "prod", "--from", &env.image_str()]);
        env.d.cli_ok(&["clone", "prod@1", "dev1"]);
        env
    }

    fn image(&self) -> PathBuf {
        self.root.join("prod.img")
    }

    fn image_str(&self) -> String {
        self.image().to_str().expect("utf-8").to_string()
    }

    fn restart(&mut self) {
        let args: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        self.d.restart_with("127.0.0.1", &args);
    }

    /// Set the daemon's time to `T0 + offset`.
    fn at(&self, offset: i64) {
        self.clock.at(offset);
    }

    /// Wait (bounded) until `cond` holds.
    fn wait(&self, what: &str, cond: impl Fn() -> bool) {
        wait_until(&self.d, what, WAIT, cond);
    }

    /// Schedule `name` as `forkd schedule list --json` shows it.
    fn schedule(&self, name: &str) -> Value {
        let list = self.d.cli_json(&["schedule", "list"]);
        let all = list["schedules"].as_array().cloned().unwrap_or_default();
        all.into_iter().find(|s| s["name"] == name).unwrap_or(Value::Null)
    }

    fn runs(&self, name: &str, result: &str) -> f64 {
        let series = format!("forkd_schedule_runs_total{{result=\"{result}\",schedule=\"{name}\"}}");
        metric_value(&self.d.metrics(), &series)
    }

    fn snapshots(&self, volume: &str) -> usize {
        self.d.cli_json(&["show", volume])["snapshots"].as_array().map_or(0, Vec::len)
    }

    /// The operation log's entries of schedule `name`: (what, result).
    fn logged(&self, name: &str) -> Vec<(String, String)> {
        let log = self.d.cli_json(&["log"]);
        let entries = log["entries"].as_array().cloned().unwrap_or_default();
        let who = format!("schedule {name}");
        entries
            .iter()
            .filter(|e| e["who"] == who.as_str())
            .map(|e| (e["what"].as_str().unwrap_or("").into(), e["result"].as_str().unwrap_or("").into()))
            .collect()
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

fn pair(what: &str, result: &str) -> (String, String) {
    (what.to_string(), result.to_string())
}

#[test]
fn a_nightly_ingest_and_refresh_run_at_their_time() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let d = &env.d;
    let mut image = vec![7u8; 1 << 20];
    image[..4096].fill(9);
    std::fs::write(env.image(), &image).expect("new data");
    let ingest = format!("ingest prod --from {}", env.image_str());
    let out =
        d.cli_ok(&["schedule", "add", "nightly", "--cron", "0 2 * * *", "--step", &ingest, "--step", "refresh dev1"]);
    assert!(out.contains("2027-01-16T02:00:00.000Z"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(env.schedule("nightly")["last_run"], Value::Null, "not before its time");

    env.at(18 * H + 1000);
    env.wait("the nightly run", || env.schedule("nightly")["last_run"]["result"] == "ok");
    assert_eq!(env.snapshots("prod"), 2, "the ingest made a snapshot");
    assert_eq!(d.api().read("dev1", 0, 4096), vec![9u8; 4096], "dev1 sees the new data");
    assert_eq!(d.api().read("dev1", 4096, 4096), vec![7u8; 4096]);
    let s = env.schedule("nightly");
    assert_eq!(s["next_run"], "2027-01-17T02:00:00.000Z", "{s}");
    assert_eq!(s["last_success_at"], "2027-01-16T02:00:01.000Z", "{s}");
    assert_eq!(env.logged("nightly"), [pair(&ingest, "ok"), pair("refresh dev1", "ok"), pair("schedule-ok", "ok")]);
    let m = d.metrics();
    let gauge = metric_value(&m, "forkd_schedule_last_success_timestamp_seconds{schedule=\"nightly\"}");
    assert_eq!(gauge, ((T0 + 18 * H + 1000) / 1000) as f64);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(env.runs("nightly", "ok"), 1.0, "one run per fire time");
    let table = d.cli_ok(&["schedule", "list"]);
    assert!(table.starts_with("NAME") && table.contains("nightly") && table.contains(" ok"), "{table}");
}

#[test]
fn a_failing_step_ends_the_run() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let d = &env.d;
    d.cli_ok(&[
        "schedule",
        "add",
        "nightly",
        "--cron",
        "0 2 * * *",
        "--step",
        "refresh dev1",
        "--step",
        "snapshot prod",
    ]);
    d.cli_ok(&["delete", "dev1"]);
    let err = env.fails(&["schedule", "run", "nightly"]);
    assert!(err.contains("no volume named `dev1`"), "{err}");
    assert_eq!(env.snapshots("prod"), 1, "the step after the failure did not run");
    assert_eq!(env.logged("nightly"), [pair("refresh dev1", "failed"), pair("schedule-failed", "failed")]);
    let s = env.schedule("nightly");
    assert_eq!(s["last_run"]["result"], "failed", "{s}");
    assert!(s["last_run"]["error"].as_str().is_some_and(|e| e.contains("step 1 of 2")), "{s}");
    assert_eq!(s["last_success_at"], Value::Null);
    assert_eq!(env.runs("nightly", "failed"), 1.0);
    assert!(d.cli_ok(&["schedule", "list"]).contains("failed"));
}

#[test]
fn a_missed_run_catches_up_once_after_a_restart() {
    let t = tempfile::tempdir().expect("tempdir");
    let mut env = Env::start(t.path());
    env.d.cli_ok(&["schedule", "add", "hourly", "--cron", "30 * * * *", "--step", "snapshot prod"]);
    let skip =
        ["schedule", "add", "hourly-skip", "--cron", "30 * * * *", "--step", "snapshot dev1", "--catch-up", "skip"];
    env.d.cli_ok(&skip);
    env.d.stop();
    env.at(3 * H);
    env.restart();
    env.wait("the catch-up run", || env.runs("hourly", "ok") == 1.0);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(env.runs("hourly", "ok"), 1.0, "three missed fire times make one run");
    assert_eq!(env.snapshots("prod"), 2);
    assert_eq!(env.snapshots("dev1"), 0, "catch_up = skip skipped it");
    assert_eq!(env.schedule("hourly-skip")["next_run"], "2027-01-15T11:30:00.000Z");
    // The clock going back runs nothing; reaching the next fire time runs again.
    env.at(H);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(env.runs("hourly", "ok"), 1.0);
    env.at(3 * H + 31 * 60_000);
    env.wait("the next run", || env.runs("hourly", "ok") == 2.0 && env.runs("hourly-skip", "ok") == 1.0);
}

#[test]
fn runs_never_overlap_and_a_killed_run_is_reported_interrupted() {
    let t = tempfile::tempdir().expect("tempdir");
    let mut env = Env::start(t.path());
    env.d.cli_ok(&["hook", "set", "prod", "pre-snapshot", "slow"]);
    env.d.cli_ok(&["schedule", "add", "slow", "--cron", "0 2 * * *", "--step", "snapshot prod"]);
    let mut first = Command::new(env.d.bin())
        .args(["--api", &env.d.url(), "schedule", "run", "slow"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("schedule run");
    env.wait("the run in progress", || env.schedule("slow")["running"] == true);
    let second = env.d.api().post_json("/v1/schedules/slow/run", &json!({}));
    assert_eq!(second.status, 409, "{}", second.text());
    let err = env.fails(&["schedule", "run", "slow"]);
    assert!(err.contains("already running"), "{err}");
    assert!(env.fails(&["schedule", "delete", "slow"]).contains("running"));
    env.d.kill9();
    let _ = first.wait();
    env.restart();
    let s = env.schedule("slow");
    assert_eq!(s["last_run"]["result"], "interrupted", "{s}");
    assert_eq!(s["running"], false);
    assert_eq!(env.logged("slow"), [pair("schedule-failed", "failed")]);
    assert_eq!(env.runs("slow", "interrupted"), 1.0);
    // Run now, to the end.
    let out = env.d.cli_ok(&["schedule", "run", "slow"]);
    assert!(out.contains("slow: ok"), "{out}");
    assert_eq!(env.snapshots("prod"), 2);
    env.d.cli_ok(&["schedule", "delete", "slow"]);
    assert_eq!(env.d.cli_json(&["schedule", "list"])["schedules"], json!([]));
}

#[test]
fn bad_schedules_are_refused_with_one_line() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let add =
        |name: &str, cron: &str, step: &str| env.fails(&["schedule", "add", name, "--cron", cron, "--step", step]);
    let err = add("n", "61 2 * * *", "snapshot prod");
    assert!(err.contains("cron `61 2 * * *` is not a valid 5-field cron expression"), "{err}");
    assert!(add("n", "0 2 * * * *", "snapshot prod").contains("5-field"));
    assert!(add("n", "0 2 * * *", "refresh nope").contains("no volume named `nope`"));
    assert!(add("n", "0 2 * * *", "refresh prod").contains("only clones"));
    assert!(add("n", "0 2 * * *", "backup prod").contains("`backup` is not a step"));
    assert!(add("bad name", "0 2 * * *", "snapshot prod").contains("not a valid name"));
    let err =
        env.fails(&["schedule", "add", "n", "--cron", "0 2 * * *", "--step", "prune prod", "--catch-up", "never"]);
    assert!(err.contains("give once or skip"), "{err}");
    env.d.cli_ok(&["schedule", "add", "n", "--cron", "0 2 * * *", "--step", "prune prod"]);
    assert!(add("n", "0 2 * * *", "prune prod").contains("already exists"));
    assert!(env.fails(&["schedule", "run", "nope"]).contains("no schedule named `nope`"));
    assert!(env.fails(&["schedule", "delete", "nope"]).contains("no schedule named `nope`"));
    assert_eq!(env.d.cli_json(&["schedule", "list"])["schedules"].as_array().map(Vec::len), Some(1));
}

#[test]
fn a_stop_during_a_run_ends_it_before_its_next_step() {
    let t = tempfile::tempdir().expect("tempdir");
    let mut env = Env::start(t.path());
    env.d.cli_ok(&["hook", "set", "prod", "pre-snapshot", "slow"]);
    let steps = ["--step", "snapshot prod", "--step", "snapshot prod"];
    env.d.cli_ok(&[&["schedule", "add", "twice", "--cron", "0 2 * * *"][..], &steps].concat());
    let mut run = Command::new(env.d.bin())
        .args(["--api", &env.d.url(), "schedule", "run", "twice"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("schedule run");
    env.wait("the run in progress", || env.schedule("twice")["running"] == true);
    assert!(env.d.stop().success(), "a clean stop");
    let _ = run.wait();
    env.restart();
    let s = env.schedule("twice");
    assert_eq!(s["last_run"]["result"], "interrupted", "{s}");
    assert!(s["last_run"]["error"].as_str().is_some_and(|e| e.contains("before step 2 of 2")), "{s}");
    assert_eq!(env.snapshots("prod"), 2, "the step in progress finished, the next one did not start");
}

#[test]
fn an_ingest_step_uses_the_daemons_token() {
    const TOKEN: &str = "schedule-test-token-0123456789";
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    let token = root.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let d = Daemon::start_with(root, "0.0.0.0", &["--token-file", token.to_str().expect("utf-8")]);
    let image = root.join("prod.img");
    std::fs::write(&image, vec![5u8; 1 << 20]).expect("image");
    let cli = |args: &[&str]| {
        let out = d.cli_env(args, &[("FORKD_TOKEN", TOKEN)]);
        assert!(out.status.success(), "forkd {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    cli(&["source", "create", "prod", "--size", "1M"]);
    let ingest = format!("ingest prod --from {}", image.display());
    cli(&["schedule", "add", "nightly", "--cron", "0 2 * * *", "--step", &ingest]);
    let out = cli(&["schedule", "run", "nightly"]);
    assert!(out.contains("nightly: ok"), "{out}");
    let shown: Value = serde_json::from_str(&cli(&["show", "prod", "--json"])).expect("json");
    assert_eq!(shown["snapshots"].as_array().map(Vec::len), Some(1), "{shown}");
}

#[test]
fn snapshot_mask_and_prune_steps_run_as_their_operations() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let d = &env.d;
    d.cli_ok(&["retention", "set", "prod", "--keep-last", "1"]);
    let steps = ["snapshot prod", "snapshot prod", "mask prod@latest --into prodm --with noop", "prune prod"];
    let mut args = vec!["schedule", "add", "weekly", "--cron", "0 3 * * 0"];
    for s in &steps {
        args.extend(["--step", s]);
    }
    d.cli_ok(&args);
    let run = d.cli_json(&["schedule", "run", "weekly"]);
    assert_eq!(run["result"], "ok", "{run}");
    assert_eq!(env.snapshots("prod"), 2, "the newest, and prod@1 that dev1 was made from");
    assert_eq!(env.snapshots("prodm"), 1, "the masked snapshot");
    let shown = d.cli_json(&["show", "prodm"]);
    assert_eq!(shown["snapshots"][0]["masked"], true, "{shown}");
    assert_eq!(shown["snapshots"][0]["mask"]["source"], "prod@3", "{shown}");
    let mut want: Vec<_> = steps.iter().map(|s| pair(s, "ok")).collect();
    want.push(pair("schedule-ok", "ok"));
    assert_eq!(env.logged("weekly"), want);
}

#[test]
fn snapshot_and_refresh_steps_take_environments() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = Env::start(t.path());
    let d = &env.d;
    let app_image = env.root.join("app.img");
    std::fs::write(&app_image, vec![3u8; 1 << 20]).expect("image");
    let app_from = app_image.to_str().expect("utf-8").to_string();
    d.cli_ok(&["source", "create", "app", "--size", "1M"]);
    d.cli_ok(&["ingest", "app", "--from", &app_from]);
    d.cli_ok(&["env", "create", "shop", "db=prod", "app=app"]);
    d.cli_ok(&["env", "clone", "shop@latest", "shopdev"]);
    // New data in both sources' images, ingested by the run itself.
    let mut image = vec![7u8; 1 << 20];
    image[..4096].fill(9);
    std::fs::write(env.image(), &image).expect("new data");
    let mut image = vec![3u8; 1 << 20];
    image[..4096].fill(4);
    std::fs::write(&app_image, &image).expect("new data");
    let steps = [
        format!("ingest prod --from {}", env.image_str()),
        format!("ingest app --from {app_from}"),
        "snapshot shop".to_string(),
        "refresh shopdev".to_string(),
    ];
    let mut args = vec!["schedule", "add", "shop-nightly", "--cron", "0 2 * * *"];
    for s in &steps {
        args.extend(["--step", s.as_str()]);
    }
    d.cli_ok(&args);
    d.cli_ok(&["schedule", "add", "refresh-only", "--cron", "0 3 * * *", "--step", "refresh shopdev"]);

    let run = d.cli_json(&["schedule", "run", "shop-nightly"]);
    assert_eq!(run["result"], "ok", "{run}");
    let shop = d.cli_json(&["env", "show", "shop"]);
    assert_eq!(shop["snapshots"].as_array().map(Vec::len), Some(1), "{shop}");
    assert_eq!(shop["snapshots"][0]["name"], "shop@1", "{shop}");
    assert_eq!(shop["snapshots"][0]["members"], json!({"db": "prod@3", "app": "app@3"}), "{shop}");
    assert_eq!(d.api().read("shopdev.db", 0, 4096), vec![9u8; 4096], "the db member sees the new data");
    assert_eq!(d.api().read("shopdev.db", 4096, 4096), vec![7u8; 4096]);
    assert_eq!(d.api().read("shopdev.app", 0, 4096), vec![4u8; 4096], "the app member sees the new data");
    assert_eq!(d.cli_json(&["show", "shopdev.app"])["origin"], "app@3");
    assert_eq!(env.schedule("shop-nightly")["last_run"]["result"], "ok");
    let mut want: Vec<_> = steps.iter().map(|s| pair(s, "ok")).collect();
    want.push(pair("schedule-ok", "ok"));
    assert_eq!(env.logged("shop-nightly"), want);

    // Only snapshot and refresh take an environment; refresh needs clones in it.
    let add = |step: &str| env.fails(&["schedule", "add", "bad", "--cron", "0 2 * * *", "--step", step]);
    let err = add("prune shop");
    assert!(err.contains("`shop` is an environment: the prune step acts on one volume"), "{err}");
    assert!(add("mask shop@latest --into shopm").contains("the mask step acts on one volume"));
    assert!(add("ingest shopdev --from /x").contains("`shopdev` is an environment: the ingest step"));
    let err = add("refresh shop");
    assert!(err.contains("environment `shop` cannot be refreshed: its member `app` is a source"), "{err}");

    // An environment gone since the schedule was added fails the step, logged; so does a
    // volume that took its name.
    d.cli_ok(&["env", "delete", "shopdev"]);
    let err = env.fails(&["schedule", "run", "refresh-only"]);
    assert!(err.contains("step 1 of 1 (`refresh shopdev`): no environment named `shopdev`"), "{err}");
    assert_eq!(env.schedule("refresh-only")["last_run"]["result"], "failed");
    assert_eq!(env.logged("refresh-only"), [pair("refresh shopdev", "failed"), pair("schedule-failed", "failed")]);
    d.cli_ok(&["clone", "prod@1", "shopdev"]);
    let err = env.fails(&["schedule", "run", "refresh-only"]);
    let changed = "`shopdev` was an environment when schedule `refresh-only` was added and is a volume now";
    assert!(err.contains(changed), "{err}");
    assert_eq!(env.runs("refresh-only", "failed"), 2.0);
}
