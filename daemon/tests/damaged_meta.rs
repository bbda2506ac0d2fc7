//! Damaged metadata is never served silently (issue 10, item 4): every file of `meta/` is
//! truncated at several points, overwritten with random bytes at several places, or removed,
//! and each time the store either refuses to open with a clear error or opens with every
//! volume, snapshot and byte it had. Opening with less (a rolled-back catalog) fails the test,
//! and so does a panic.

use std::path::{Path, PathBuf};

use forkd::store::Store;

const MIB: usize = 1 << 20;

/// What the store holds: 3 volumes, 6 snapshots, distinct data in each clone.
fn populate(dir: &Path) {
    let store = Store::open(dir).expect("open");
    store.op(|c| c.create_source("src", 16 << 20)).expect("source");
    for (i, name) in [1u8, 2].into_iter().zip(["a", "b"]) {
        store.op(|c| c.clone_volume("src", name)).expect("clone");
        for s in 0..3u8 {
            store.write(name, u64::from(s) * MIB as u64, &vec![0x10 * i + s; MIB]).expect("write");
            store.op(|c| c.snapshot(name, None)).expect("snapshot");
        }
    }
}

/// Everything `populate` wrote, read back; `Err` names the first thing missing or wrong.
fn intact(store: &Store) -> Result<(), String> {
    let cat = store.catalog();
    let names: Vec<&String> = cat.volumes().keys().collect();
    if names != ["a", "b", "src"] {
        return Err(format!("volumes {names:?}"));
    }
    for name in ["a", "b"] {
        let snaps = cat.volume(name).map_err(|e| e.to_string())?.snapshots.len();
        if snaps != 3 {
            return Err(format!("{name} has {snaps} snapshots"));
        }
    }
    drop(cat);
    let mut buf = vec![0u8; MIB];
    for (i, name) in [1u8, 2].into_iter().zip(["a", "b"]) {
        for s in 0..3u8 {
            store.read(&format!("{name}@3"), u64::from(s) * MIB as u64, &mut buf).map_err(|e| e.to_string())?;
            if buf.iter().any(|&b| b != 0x10 * i + s) {
                return Err(format!("{name}@3 at {s} MiB"));
            }
        }
    }
    Ok(())
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        if e.path().is_dir() {
            out.extend(files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

/// The damage done to one file, by name.
/// One kind of damage done to a file, and its name.
type Injection = (String, Box<dyn Fn(&Path)>);

fn injections(len: u64) -> Vec<Injection> {
    let mut v: Vec<Injection> = vec![("removed".into(), Box::new(|p: &Path| std::fs::remove_file(p).expect("remove")))];
    for pct in [0u64, 10, 50, 90] {
        let at = len * pct / 100;
        v.push((format!("truncated to {pct} %"), Box::new(move |p: &Path| truncate(p, at))));
    }
    for pct in [5u64, 30, 60, 95] {
        let at = len * pct / 100;
        v.push((format!("64 random bytes at {pct} %"), Box::new(move |p: &Path| scribble(p, at))));
    }
    v
}

fn truncate(p: &Path, len: u64) {
    std::fs::OpenOptions::new().write(true).open(p).expect("open").set_len(len).expect("truncate");
}

fn scribble(p: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let bytes: Vec<u8> = (0..64u64).map(|i| (at.wrapping_mul(31).wrapping_add(i * 131) % 251) as u8 ^ 0xa5).collect();
    std::fs::OpenOptions::new().write(true).open(p).expect("open").write_all_at(&bytes, at).expect("write");
}

#[test]
fn damaged_metadata_is_refused_or_harmless_never_silent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base");
    populate(&base);
    intact(&Store::open(&base).expect("reopen")).expect("the undamaged store is intact");
    let (mut refused, mut harmless) = (0, 0);
    for file in files(&base.join("meta")) {
        let rel = file.strip_prefix(&base).expect("inside").to_path_buf();
        let len = std::fs::metadata(&file).expect("stat").len();
        for (what, damage) in injections(len) {
            let d = dir.path().join("case");
            let _ = std::fs::remove_dir_all(&d);
            let status = std::process::Command::new("cp").arg("-a").arg(&base).arg(&d).status().expect("cp");
            assert!(status.success());
            damage(&d.join(&rel));
            let case = format!("{} {what}", rel.display());
            match std::panic::catch_unwind(|| Store::open(&d)) {
                Err(_) => panic!("{case}: opening panicked"),
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    assert!(msg.contains("data directory") && msg.len() > 40, "{case}: unclear refusal: {msg}");
                    eprintln!("{case}: refused: {msg}");
                    refused += 1;
                }
                Ok(Ok(store)) => {
                    if let Err(lost) = intact(&store) {
                        panic!("{case}: opened silently without everything: {lost}");
                    }
                    harmless += 1;
                }
            }
        }
    }
    eprintln!("{refused} refused, {harmless} harmless (opened with everything)");
    assert!(refused > 0, "no injected damage was noticed at all");
}
