//! Replication between two sites, each a real daemon in its own network namespace joined by a
//! veth pair (`forkd_tests::twosite`).
//!
//! `two_sites_harness_works` checks the harness itself: both daemons answer, data ingested on
//! A dumps back, what A's CLI says to B's API crosses the link and is counted there, a cut
//! link stops it and a restored one carries it again, and A keeps its data across a SIGKILL.

use std::path::Path;
use std::time::Duration;

use forkd_tests::twosite::{namespaces, Side, TwoSites};
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

/// A `size`-byte image: zeros, with `data` random bytes (from `seed`) at its start.
fn sparse_image(path: &Path, size: u64, data: u64, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut img = vec![0u8; usize::try_from(size).expect("size")];
    rng.fill(&mut img[..usize::try_from(data).expect("data")]);
    std::fs::write(path, &img).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    img
}

#[test]
fn two_sites_harness_works() {
    let mut ts = TwoSites::new("harness");
    let names = [ts.a().namespace().to_string(), ts.b().namespace().to_string()];
    for side in [Side::A, Side::B] {
        let l = ts.site(side).cli_json(&["list"]);
        assert!(l["volumes"].as_array().is_some_and(Vec::is_empty), "site {side:?}: a fresh daemon lists {l}");
    }

    // A source ingested on A dumps back byte for byte.
    let img = ts.scratch().join("db.img");
    let data = sparse_image(&img, 64 * MIB, 24 * MIB, 1);
    ts.a().create_source("db", "64M");
    assert_eq!(ts.a().ingest("db", &img), "db@1");
    let dumped = ts.scratch().join("db-1.img");
    ts.a().dump("db@1", &dumped);
    forkd_tests::assert_same_image("db@1 dumped on A", &std::fs::read(&dumped).expect("read dump"), &data);
    std::fs::remove_file(&dumped).expect("rm dump");
    assert!(ts.a().extents_allocated() >= 24 * MIB, "A's extent file holds the ingested data");

    // A's CLI talking to B's API crosses the link, both ways, and the counters see it.
    let (tx_a, rx_b, rx_a) = (ts.tx_bytes(Side::A), ts.rx_bytes(Side::B), ts.rx_bytes(Side::A));
    let out = ts.cli_across(Side::A, Side::B, &["list", "--json"]);
    assert!(out.status.success(), "A's CLI against B's API: {}", String::from_utf8_lossy(&out.stderr));
    assert!(ts.tx_bytes(Side::A) > tx_a && ts.rx_bytes(Side::B) > rx_b, "the request did not cross the link");
    assert!(ts.rx_bytes(Side::A) > rx_a, "the answer did not cross the link");
    // B's own token is what lets A in: A's token is refused.
    let out =
        ts.a().cli_at(&ts.url(Side::B), &ts.a().token_file(), &["list"], Duration::from_secs(30)).expect("bounded");
    assert!(!out.status.success(), "B's API accepted A's token");

    // A bulk transfer over the link is counted with little overhead: an ingest from A's
    // namespace into B. What the replication tests bound by the counters rests on this.
    ts.b().create_source("over", "64M");
    let tx_before = ts.tx_bytes(Side::A);
    let out = ts.cli_across(Side::A, Side::B, &["ingest", "over", "--from", img.to_str().expect("utf-8")]);
    assert!(out.status.success(), "ingest across the link: {}", String::from_utf8_lossy(&out.stderr));
    let tx = ts.tx_bytes(Side::A) - tx_before;
    let shown = ts.b().show("over");
    let wire = shown["snapshots"][0]["ingest"]["wire_bytes"].as_u64().expect("wire_bytes");
    println!("ingest across the link: {wire} bytes on the wire, {tx} counted on A's end of the link");
    assert!(wire >= 24 * MIB && tx >= wire, "the link carried less ({tx}) than the ingest sent ({wire})");
    assert!(tx <= wire + wire / 20 + MIB, "the link counted {tx} bytes for an ingest of {wire}: too much overhead");
    assert_eq!(ts.b().snapshots("over"), ["over@1"], "B's ingested source");
    ts.b().dump("over@1", &dumped);
    forkd_tests::assert_same_image("over@1 dumped on B", &std::fs::read(&dumped).expect("read dump"), &data);

    // A cut link stops the same call (it fails or hangs until killed), both ways; a restored
    // one carries it again.
    ts.cut_link();
    let limit = Duration::from_secs(20);
    for (from, to) in [(Side::A, Side::B), (Side::B, Side::A)] {
        match ts.cli_across_within(from, to, &["list"], limit) {
            Ok(out) => assert!(!out.status.success(), "{from:?} reached {to:?} over a cut link"),
            Err(_) => println!("{from:?} -> {to:?} over the cut link hung until killed after {limit:?}"),
        }
    }
    // Each site still answers locally.
    ts.a().cli_ok(&["list"]);
    ts.b().cli_ok(&["list"]);
    ts.restore_link();
    let started = std::time::Instant::now();
    loop {
        let ok = ts
            .cli_across_within(Side::A, Side::B, &["list"], Duration::from_secs(10))
            .is_ok_and(|o| o.status.success());
        if ok {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the restored link does not carry A's call to B");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = ts.cli_across(Side::B, Side::A, &["list"]);
    assert!(out.status.success(), "B's call to A over the restored link: {}", String::from_utf8_lossy(&out.stderr));

    // A SIGKILL of A's daemon, a restart on the same address and port: A keeps its data.
    ts.kill9(Side::A);
    assert!(!ts.site_mut(Side::A).running(), "A's daemon still runs after a SIGKILL");
    let out = ts.a().cli_within(&["list"], Duration::from_secs(30)).expect("bounded");
    assert!(!out.status.success(), "A answered after a SIGKILL");
    ts.restart(Side::A);
    assert_eq!(ts.a().snapshots("db"), ["db@1"], "A's snapshots after a restart");
    ts.a().dump("db@1", &dumped);
    forkd_tests::assert_same_image("db@1 on A after a restart", &std::fs::read(&dumped).expect("read"), &data);

    // Dropping the sites removes the namespaces.
    drop(ts);
    let left: Vec<String> = namespaces().into_iter().filter(|n| names.contains(n)).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}
