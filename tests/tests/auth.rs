//! The API token on real daemons: a daemon whose API other hosts can reach refuses to start
//! without one; with one, every request without the right `Authorization: Bearer TOKEN` gets
//! 401 (logged with the peer, never the token), and the CLI works with `--token-file` or
//! `FORKD_TOKEN`; on loopback without a token everything stays open.

use std::path::Path;
use std::time::Duration;

use forkd_tests::{assert_same_image, run_forkd, strip_ansi, Daemon, BS};
use rand::{RngCore, SeedableRng};

const TOKEN: &str = "c0ffee-7f3a9d2e41b8c6f05e9a1d3b7c2f8e64";

fn write_token(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write token file");
    p.to_str().expect("utf-8 path").to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `forkd serve ARGS` must exit non-zero within a few seconds with one error line on stderr
/// that contains every one of `want`; returns that line.
fn refuses_to_start(args: &[&str], want: &[&str]) -> String {
    let out = run_forkd(args, Duration::from_secs(20))
        .unwrap_or_else(|out| panic!("forkd {} started instead of refusing\nstderr: {}", args.join(" "), stderr(&out)));
    assert!(!out.status.success(), "forkd {} exited with {}", args.join(" "), out.status);
    let err = strip_ansi(&stderr(&out));
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "forkd {}: expected one error line, got:\n{err}", args.join(" "));
    let line = lines[0];
    assert!(line.starts_with("forkd: error: "), "{line}");
    for w in want {
        assert!(line.contains(w), "forkd {}: error line lacks `{w}`: {line}", args.join(" "));
    }
    line.to_string()
}

#[test]
fn remote_api_without_a_valid_token_refuses_to_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let data_s = data.to_str().expect("utf-8");
    let port = forkd_tests::free_port().to_string();
    let api = format!("0.0.0.0:{port}");
    let base = ["serve", "--data-dir", data_s, "--api", &api, "--nbd", "127.0.0.1:0", "--iscsi", "127.0.0.1:0"];

    refuses_to_start(&base, &["0.0.0.0", "needs a token", "--token-file"]);
    assert!(!data.exists(), "the refusal comes before the data directory is touched");

    // The global flag placement does not matter, and a config file cannot skip the rule.
    let cfg = tmp.path().join("forkd.toml");
    std::fs::write(&cfg, format!("api = \"{api}\"\n")).expect("write config");
    let cfg_s = cfg.to_str().expect("utf-8");
    refuses_to_start(&["serve", "--config", cfg_s, "--data-dir", data_s, "--nbd", "127.0.0.1:0"], &["needs a token"]);

    let short = write_token(tmp.path(), "short", "0123456789abcde\n");
    let mut args = base.to_vec();
    args.extend(["--token-file", &short]);
    refuses_to_start(&args, &["at least 16"]);

    let missing = tmp.path().join("no-such-token").to_str().expect("utf-8").to_string();
    let mut args = base.to_vec();
    args.extend(["--token-file", &missing]);
    refuses_to_start(&args, &["cannot read token file", "no-such-token"]);

    let blank = write_token(tmp.path(), "blank", "\n");
    let mut args = vec!["--token-file", &blank];
    args.extend(base);
    refuses_to_start(&args, &["is empty"]);

    // On loopback a short token is refused just the same.
    let loopback = format!("127.0.0.1:{port}");
    refuses_to_start(
        &["serve", "--data-dir", data_s, "--api", &loopback, "--nbd", "127.0.0.1:0", "--token-file", &short],
        &["at least 16"],
    );
}

#[test]
fn token_is_required_checked_and_used_by_the_cli() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let token_file = write_token(root, "token", &format!("{TOKEN}\n"));
    let d = Daemon::start_with(root, "0.0.0.0", &["--token-file", &token_file]);
    let api = d.api();
    let bearer = format!("Bearer {TOKEN}");
    let wrong_same_len = format!("Bearer {}0", &TOKEN[..TOKEN.len() - 1]);

    // Raw HTTP: nothing gets through without the right token, not even /metrics or 404s.
    for path in ["/v1/volumes", "/v1/tree", "/metrics", "/v1/no-such-endpoint"] {
        for headers in [
            vec![],
            vec![("Authorization", "Bearer wrong-token-0123456789")],
            vec![("Authorization", wrong_same_len.as_str())],
            vec![("Authorization", TOKEN)],
            vec![("Authorization", "Basic dXNlcjpwYXNz")],
        ] {
            let r = api.get_with(path, &headers);
            assert_eq!(r.status, 401, "GET {path} with {headers:?}: {}", r.text());
            let e = r.json();
            assert!(e["error"].as_str().is_some_and(|s| !s.is_empty()), "GET {path}: {e}");
        }
    }
    let r = api.request_with("POST", "/v1/sources", &[], Some(("application/json", br#"{"name":"x","size":4096}"#)));
    assert_eq!(r.expect("POST").status, 401);
    assert_eq!(api.get_with("/v1/volumes", &[("Authorization", &bearer)]).status, 200);
    assert_eq!(api.get_with("/metrics", &[("Authorization", &bearer)]).status, 200);
    assert_eq!(api.get_with("/v1/no-such-endpoint", &[("Authorization", &bearer)]).status, 404);

    // The CLI without a token, and with a wrong one.
    let out = d.cli_env(&["list"], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("the daemon refused the token") && err.contains("FORKD_TOKEN"), "{err}");
    let out = d.cli_env(&["list"], &[("FORKD_TOKEN", "wrong-token-0123456789")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("the daemon refused the token: wrong token"), "{}", stderr(&out));
    let wrong_file = write_token(root, "wrong", "wrong-token-0123456789\n");
    let out = d.cli_env(&["--token-file", &wrong_file, "source", "create", "prod", "--size", "1M"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("the daemon refused the token"), "{}", stderr(&out));
    let out = d.cli_env(&["list", "--token-file", root.join("absent").to_str().expect("utf-8")], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot read token file"), "{}", stderr(&out));

    // The CLI with the right token: --token-file (before or after the command), then FORKD_TOKEN.
    let ok = |args: &[&str], env: &[(&str, &str)]| -> String {
        let out = d.cli_env(args, env);
        assert!(out.status.success(), "forkd {} failed: {}", args.join(" "), stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut img = vec![0u8; 256 * BS];
    rng.fill_bytes(&mut img[..128 * BS]);
    let img_path = root.join("img.raw");
    std::fs::write(&img_path, &img).expect("write image");
    let img_s = img_path.to_str().expect("utf-8");
    ok(&["--token-file", &token_file, "source", "create", "prod", "--size", "1M"], &[]);
    ok(&["ingest", "prod", "--from", img_s, "--token-file", &token_file], &[]);
    let list = ok(&["list", "--json", "--token-file", &token_file], &[]);
    assert!(list.contains("\"prod\""), "{list}");
    let env = [("FORKD_TOKEN", TOKEN)];
    img[200 * BS..201 * BS].fill(0xab);
    std::fs::write(&img_path, &img).expect("write image");
    ok(&["ingest", "prod", "--from", img_s], &env);
    let list: serde_json::Value = serde_json::from_str(&ok(&["list", "--json"], &env)).expect("list json");
    let prod = list["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == "prod").expect("prod");
    assert_eq!(prod["snapshot_count"], 2, "{list}");
    let dump = root.join("prod-2.img");
    ok(&["dump", "prod@2", dump.to_str().expect("utf-8")], &env);
    assert_same_image("prod@2", &std::fs::read(&dump).expect("read dump"), &img);
    // --token-file wins over FORKD_TOKEN.
    let out = d.cli_env(&["list", "--token-file", &wrong_file], &env);
    assert!(!out.status.success(), "the wrong --token-file must be used");

    // Every refusal was logged with the peer address, and the token never was.
    let log = strip_ansi(&d.log());
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("refused an API request")).collect();
    assert!(refusals.len() >= 20, "expected the refusals in the log:\n{log}");
    assert!(refusals.iter().all(|l| l.contains("WARN") && l.contains("peer=127.0.0.1:")), "{refusals:#?}");
    assert!(!log.contains(TOKEN) && !log.contains("wrong-token-0123456789"), "a token reached the log:\n{log}");
}

#[test]
fn loopback_without_a_token_is_open_and_with_one_enforced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let open_root = tmp.path().join("open");
    std::fs::create_dir_all(&open_root).expect("mkdir");
    let open = Daemon::start_in(&open_root);
    let out = open.cli_env(&["source", "create", "prod", "--size", "1M"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(open.api().get("/metrics").status, 200);
    assert_eq!(open.api().get("/v1/volumes").status, 200);
    // A token sent to a daemon without one is simply not looked at.
    let out = open.cli_env(&["list"], &[("FORKD_TOKEN", TOKEN)]);
    assert!(out.status.success(), "{}", stderr(&out));

    let root = tmp.path().join("closed");
    std::fs::create_dir_all(&root).expect("mkdir");
    let token_file = write_token(&root, "token", TOKEN);
    let closed = Daemon::start_with(&root, "127.0.0.1", &["--token-file", &token_file]);
    assert_eq!(closed.api().get("/v1/volumes").status, 401);
    assert_eq!(closed.api().get("/metrics").status, 401);
    let out = closed.cli_env(&["list"], &[("FORKD_TOKEN", TOKEN)]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Named tokens with roles (`--tokens-file`): a reader lists and reads but cannot snapshot, an
/// operator snapshots and clones but cannot set a policy, an admin can; refusals are `403`
/// naming the token and the role needed; the operation log names the token that did each
/// operation; a tokens file others may read is refused at start.
#[test]
fn named_tokens_have_roles_and_names_in_the_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let (reader, operator, admin) =
        ("r3ad3r-0123456789abcdef01", "0p3rat0r-0123456789abcdef01", "adm1n-0123456789abcdef0123");
    let tokens = root.join("tokens");
    std::fs::write(
        &tokens,
        format!("# name role token\nrita reader {reader}\nolga operator {operator}\nadam admin {admin}\n"),
    )
    .expect("write tokens");
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
    let tokens_s = tokens.to_str().expect("utf-8");
    let data = root.join("refused-data");
    let port = forkd_tests::free_port().to_string();
    let api = format!("127.0.0.1:{port}");
    let args = ["serve", "--data-dir", data.to_str().expect("utf-8"), "--api", &api, "--tokens-file", tokens_s];
    refuses_to_start(&args, &["tokens file", "chmod 600"]);
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");

    let d = Daemon::start_with(root, "127.0.0.1", &["--tokens-file", tokens_s]);
    let as_token = |token: &str, args: &[&str]| {
        let mut cmd = std::process::Command::new(d.bin());
        cmd.args(["--api", &d.url()]).args(args).env_remove("FORKD_API").env("FORKD_TOKEN", token);
        forkd_tests::run_bounded(&mut cmd, Duration::from_secs(60))
    };
    let ok = |token: &str, args: &[&str]| {
        let out = as_token(token, args);
        assert!(out.status.success(), "forkd {}: {}", args.join(" "), stderr(&out));
    };
    let refused = |token: &str, args: &[&str], want: &str| {
        let out = as_token(token, args);
        let err = stderr(&out);
        assert!(!out.status.success(), "forkd {} succeeded with a token of too small a role", args.join(" "));
        assert!(err.contains(want), "forkd {}: {err}", args.join(" "));
    };
    ok(operator, &["source", "create", "db", "--size", "16M"]);
    ok(reader, &["list"]);
    ok(reader, &["show", "db"]);
    refused(reader, &["snapshot", "db"], "token `rita` has role reader; this request needs operator");
    ok(operator, &["snapshot", "db"]);
    ok(operator, &["clone", "db@1", "dev"]);
    refused(
        operator,
        &["policy", "set", "db", "clone_from=masked"],
        "token `olga` has role operator; this request needs admin",
    );
    ok(admin, &["policy", "set", "db", "clone_from=masked"]);
    refused("not-a-token-0123456789abcdef", &["list"], "wrong token");
    let log = as_token(reader, &["log", "--json"]);
    assert!(log.status.success(), "forkd log: {}", stderr(&log));
    let entries: serde_json::Value = serde_json::from_slice(&log.stdout).expect("log JSON");
    let who: Vec<String> = entries["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["who"].as_str().unwrap_or("").split('@').next().unwrap_or("").to_string())
        .collect();
    assert_eq!(who, ["olga", "olga", "olga", "adam"], "who did each operation: {entries:#}");
    assert!(
        d.log().contains("token=rita") && !d.log().contains(reader),
        "the refusal is logged by name, never the token"
    );
}
