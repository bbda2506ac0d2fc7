//! The layout is checked, not hoped for (ARCHITECTURE.md, "Rooms"):
//! - the daemon's rooms depend on each other in one direction only;
//! - every source file starts with a `//!` comment and is named in ARCHITECTURE.md, and every
//!   source file ARCHITECTURE.md names exists;
//! - unsafe code is allowed in exactly two places: the io_uring engine, and the one function
//!   that takes ownership of a socket systemd passed (socket activation);
//! - no function of the shipped code is longer than a reader can see at once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = entry.expect("dir entry").path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The source files of the shipped crates, relative to the workspace root.
fn shipped_sources() -> Vec<String> {
    let root = root();
    ["metakv", "blockmap", "catalog", "nbd", "iscsi", "daemon", "bench"]
        .iter()
        .flat_map(|c| rust_files(&root.join(c).join("src")))
        .map(|p| p.strip_prefix(&root).expect("under root").to_string_lossy().into_owned())
        .collect()
}

/// The room of a daemon source file: its first directory under `daemon/src`, or its module.
fn room(rel: &str) -> &str {
    let inside = rel.strip_prefix("daemon/src/").expect("a daemon source");
    let first = inside.split('/').next().unwrap_or(inside);
    first.strip_suffix(".rs").unwrap_or(first)
}

/// Which rooms each room may use (`crate::ROOM`), besides itself.
const ALLOWED: &[(&str, &[&str])] = &[
    ("main", &["agent", "api", "cli", "server", "store", "metrics", "units"]),
    ("lib", &["agent", "api", "cli", "server", "store", "metrics", "units"]),
    ("cli", &["agent", "api", "server", "units"]),
    ("agent", &["api", "units"]),
    ("server", &["api", "store", "metrics", "units"]),
    ("store", &["metrics"]),
    ("api", &[]),
    ("metrics", &[]),
    ("units", &[]),
];

#[test]
fn the_daemons_rooms_depend_one_way() {
    let mut wrong = Vec::new();
    for rel in shipped_sources().iter().filter(|r| r.starts_with("daemon/src/")) {
        let from = room(rel);
        let allowed = ALLOWED
            .iter()
            .find(|(r, _)| *r == from)
            .unwrap_or_else(|| panic!("{rel}: room `{from}` is not in the table of this test"))
            .1;
        let text = std::fs::read_to_string(root().join(rel)).expect("read source");
        for (n, line) in text.lines().enumerate() {
            for used in line.split("crate::").skip(1) {
                let to: String = used.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if to != from && !allowed.contains(&to.as_str()) {
                    wrong.push(format!("{rel}:{}: `{from}` uses `crate::{to}`", n + 1));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "dependencies against the direction of ARCHITECTURE.md:\n{}", wrong.join("\n"));
}

#[test]
fn every_source_file_says_what_it_is_for() {
    let missing: Vec<String> = shipped_sources()
        .into_iter()
        .filter(|rel| {
            let text = std::fs::read_to_string(root().join(rel)).expect("read source");
            !text.trim_start().starts_with("//!")
        })
        .collect();
    assert!(missing.is_empty(), "source files without a `//!` comment at the top:\n{}", missing.join("\n"));
}

#[test]
fn architecture_md_names_every_source_file_and_no_other() {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let sources = shipped_sources();
    let unnamed: Vec<&String> = sources.iter().filter(|rel| !doc.contains(rel.as_str())).collect();
    assert!(unnamed.is_empty(), "source files ARCHITECTURE.md does not name:\n{unnamed:#?}");
    let named: BTreeSet<&str> = doc
        .split(|c: char| c.is_whitespace() || "`|()[],".contains(c))
        .filter(|w| w.ends_with(".rs") && w.contains("/src/"))
        .collect();
    let gone: Vec<&&str> = named.iter().filter(|w| !root().join(w).is_file()).collect();
    assert!(gone.is_empty(), "ARCHITECTURE.md names files that do not exist:\n{gone:#?}");
}

#[test]
fn unsafe_code_is_allowed_in_the_engine_and_socket_activation_only() {
    let mut allowing = Vec::new();
    for rel in shipped_sources() {
        let text = std::fs::read_to_string(root().join(&rel)).expect("read source");
        allowing.extend(text.lines().filter(|l| l.contains("allow(unsafe_code)")).map(|_| rel.clone()));
    }
    allowing.sort();
    let expected = ["daemon/src/server/systemd.rs", "daemon/src/store/mod.rs"].map(String::from);
    assert_eq!(allowing, expected, "where unsafe code is allowed");
    let next_line = |rel: &str| {
        let text = std::fs::read_to_string(root().join(rel)).expect("source");
        let allow = text.find("allow(unsafe_code)").expect("the allow");
        text[allow..].lines().nth(1).map(|l| l.trim().to_string()).unwrap_or_default()
    };
    assert_eq!(next_line("daemon/src/store/mod.rs"), "pub mod engine;", "the allow is on the engine");
    assert_eq!(
        next_line("daemon/src/server/systemd.rs"),
        "fn adopt(fd: RawFd) -> anyhow::Result<OwnedFd> {",
        "the allow is on the one function that takes a descriptor systemd passed"
    );
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    assert!(manifest.contains("unsafe_code = \"deny\""), "the workspace denies unsafe code");
}

/// Longest function (lines from `fn` to its closing brace) in shipped code, tests excluded.
const MAX_FN_LINES: usize = 80;

/// (start line, name, length) of every function in `text` outside `#[cfg(test)]` modules,
/// told by a `fn` line and the first later line that closes at the same indent.
fn functions(text: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let test_mod = lines.iter().position(|l| l.trim() == "#[cfg(test)]").unwrap_or(lines.len());
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate().take(test_mod) {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let Some(at) = trimmed.find("fn ") else { continue };
        let before = &trimmed[..at];
        let is_fn = before
            .split_whitespace()
            .all(|w| ["pub", "async", "const", "unsafe", "extern"].contains(&w) || w.starts_with("pub("));
        if !is_fn || trimmed.ends_with(';') {
            continue;
        }
        let name: String = trimmed[at + 3..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let close = format!("{indent}}}");
        if let Some(end) = lines[i + 1..].iter().position(|l| *l == close) {
            out.push((i + 1, name, end + 2));
        }
    }
    out
}

#[test]
fn no_shipped_function_is_longer_than_a_screen() {
    let mut long = Vec::new();
    for rel in shipped_sources() {
        let text = std::fs::read_to_string(root().join(&rel)).expect("read source");
        for (line, name, len) in functions(&text) {
            if len > MAX_FN_LINES {
                long.push(format!("{rel}:{line}: `{name}` is {len} lines"));
            }
        }
    }
    assert!(long.is_empty(), "functions over {MAX_FN_LINES} lines:\n{}", long.join("\n"));
}
