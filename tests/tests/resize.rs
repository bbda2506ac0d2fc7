//! `forkd ingest --resize` and `POST /v1/sources/{name}/resize` on a real daemon: a grown image
//! is refused without `--resize` (the error names it) and ingested with it; the source grows,
//! each snapshot keeps its own size and contents, shrinking and odd sizes are refused, and it
//! all survives a restart.

use std::path::Path;

use forkd_tests::{assert_same_image, Daemon, BS};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde_json::{json, Value};

const MIB: usize = 1 << 20;

fn dump(d: &Daemon, reference: &str, file: &Path) -> Vec<u8> {
    d.cli_ok(&["dump", reference, file.to_str().expect("utf-8 path")]);
    std::fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()))
}

/// Run a CLI command that must fail with one error line on stderr; returns that line.
fn cli_err(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "forkd {} succeeded; stdout: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(err.trim().lines().count(), 1, "forkd {}: {err}", args.join(" "));
    err.trim().to_string()
}

fn snapshot_sizes(show: &Value) -> Vec<(String, u64)> {
    show["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .map(|s| (s["name"].as_str().expect("name").to_string(), s["size_bytes"].as_u64().expect("size")))
        .collect()
}

#[test]
fn ingest_resize_grows_the_source_and_keeps_snapshots() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let mut d = Daemon::start_in(root);
    let mut rng = StdRng::seed_from_u64(4242);
    let img_path = root.join("img.raw");
    let img = img_path.to_str().expect("utf-8");

    // prod@1: a 1 MiB image.
    let mut v1 = vec![0u8; MIB];
    rng.fill_bytes(&mut v1[..MIB / 2]);
    std::fs::write(&img_path, &v1).expect("write image");
    d.cli_ok(&["source", "create", "prod", "--size", "1M"]);
    d.cli_ok(&["ingest", "prod", "--from", img]);
    d.cli_ok(&["clone", "prod@1", "dev"]);

    // The image grows to 2 MiB (and changes in its first half).
    let mut v2 = v1.clone();
    v2.resize(2 * MIB, 0);
    rng.fill_bytes(&mut v2[MIB / 4..MIB / 4 + 8 * BS]);
    rng.fill_bytes(&mut v2[MIB + 4 * BS..2 * MIB - 16 * BS]);
    std::fs::write(&img_path, &v2).expect("write image");
    let err = cli_err(&d, &["ingest", "prod", "--from", img]);
    assert!(err.contains("--resize") && err.contains("2097152") && err.contains("1048576"), "{err}");
    assert_eq!(d.cli_json(&["show", "prod"])["size_bytes"], MIB as u64, "a refused ingest changes nothing");

    let out = d.cli_ok(&["ingest", "prod", "--from", img, "--resize"]);
    assert!(out.contains("grew source prod from 1.0 MiB to 2.0 MiB"), "{out}");
    assert!(out.contains("prod@2"), "{out}");
    let show = d.cli_json(&["show", "prod"]);
    assert_eq!(show["size_bytes"], 2 * MIB as u64, "{show}");
    assert_eq!(snapshot_sizes(&show), vec![("prod@1".into(), MIB as u64), ("prod@2".into(), 2 * MIB as u64)]);
    assert_same_image("prod@1", &dump(&d, "prod@1", &root.join("p1.img")), &v1);
    assert_same_image("prod@2", &dump(&d, "prod@2", &root.join("p2.img")), &v2);
    assert_same_image("prod", &dump(&d, "prod", &root.join("p.img")), &v2);

    // The same image again: no resize, nothing changed.
    let out = d.cli_ok(&["ingest", "prod", "--from", img, "--resize", "--json"]);
    assert!(!out.contains("\"resized\""), "{out}");

    // A clone of the old snapshot keeps its size until it is refreshed.
    assert_eq!(d.cli_json(&["show", "dev"])["size_bytes"], MIB as u64);
    d.cli_ok(&["refresh", "dev"]);
    assert_eq!(d.cli_json(&["show", "dev"])["size_bytes"], 2 * MIB as u64);
    assert_same_image("dev", &dump(&d, "dev", &root.join("dev.img")), &v2);

    // Shrinking is refused, with or without --resize.
    std::fs::write(&img_path, &v1).expect("write image");
    for extra in [&[][..], &["--resize"][..]] {
        let mut args = vec!["ingest", "prod", "--from", img];
        args.extend(extra);
        let err = cli_err(&d, &args);
        assert!(err.contains("never shrink"), "{err}");
    }
    // An image that is not whole 4 KiB blocks is refused, saying so.
    let mut odd = v2.clone();
    odd.extend_from_slice(&[7u8; 100]);
    std::fs::write(&img_path, &odd).expect("write image");
    let err = cli_err(&d, &["ingest", "prod", "--from", img, "--resize"]);
    assert!(err.contains("not a multiple of 4096"), "{err}");
    assert_eq!(d.cli_json(&["show", "prod"])["size_bytes"], 2 * MIB as u64);

    // Restart: sizes and contents are durable.
    d.stop();
    d.restart();
    let show = d.cli_json(&["show", "prod"]);
    let sizes =
        vec![("prod@1".into(), MIB as u64), ("prod@2".into(), 2 * MIB as u64), ("prod@3".into(), 2 * MIB as u64)];
    assert_eq!(snapshot_sizes(&show), sizes);
    assert_same_image("prod@1 after restart", &dump(&d, "prod@1", &root.join("p1b.img")), &v1);
    assert_same_image("prod@2 after restart", &dump(&d, "prod@2", &root.join("p2b.img")), &v2);
}

#[test]
fn resize_endpoint_validates() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_in(tmp.path());
    let api = d.api();
    d.cli_ok(&["source", "create", "prod", "--size", "1M"]);
    let resize = |name: &str, body: Value| api.post_json(&format!("/v1/sources/{name}/resize"), &body);

    let r = resize("prod", json!({"size": "4M"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["name"].clone(), v["size_bytes"].clone(), v["previous_size_bytes"].clone()),
        (json!("prod"), json!(4 * MIB), json!(MIB))
    );
    let r = resize("prod", json!({"size": 4 * MIB}));
    assert_eq!((r.status, r.json()["previous_size_bytes"].clone()), (200, json!(4 * MIB)), "same size: no change");

    for (body, status, want) in [
        (json!({"size": MIB}), 400, "only grow"),
        (json!({"size": 8 * MIB + 1}), 400, "multiple of 4096"),
        (json!({"size": (1u64 << 50) + 4096}), 400, "at most 1P"),
        (json!({"size": 0}), 400, "multiple of 4096"),
        (json!({"size": -4096}), 400, "whole number"),
        (json!({"size": true}), 400, "size must be"),
        (json!({}), 400, "resize needs a JSON body"),
    ] {
        let r = resize("prod", body.clone());
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let e = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(e.contains(want), "{body}: {e}");
    }
    assert_eq!(resize("nope", json!({"size": "8M"})).status, 404);
    d.cli_ok(&["snapshot", "prod"]);
    d.cli_ok(&["clone", "prod@1", "dev"]);
    let r = resize("dev", json!({"size": "8M"}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(d.cli_json(&["show", "prod"])["size_bytes"], 4 * MIB as u64);
    assert_eq!(d.cli_json(&["show", "dev"])["size_bytes"], 4 * MIB as u64);
}
