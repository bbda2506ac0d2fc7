//! How the CLI shows the daemon's answers to people: tables, the `show` text and the lineage
//! tree. `--json` bypasses all of this and prints the answer as it came.

use serde_json::Value;

use crate::units::{human_duration_ms, humanize};

/// The string field `key` of `v`, or `default`.
pub(super) fn str_or<'a>(v: &'a Value, key: &str, default: &'a str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or(default)
}

/// The unsigned field `key` of `v`, or 0.
pub(super) fn u64_of(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// A field shown in a table: strings as-is, numbers printed, null or missing as `-`.
fn cell(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => "-".to_string(),
    }
}

/// The elements of the array field `key`, or none.
fn items<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

/// The bookmark names of a snapshot, comma-separated (empty when none).
fn bookmarks(snap: &Value) -> String {
    items(snap, "bookmarks").iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")
}

/// The short ingest summary of a snapshot, if it was made by ingest.
fn ingest_summary(snap: &Value) -> Option<String> {
    let ingest = snap.get("ingest").filter(|i| i.is_object())?;
    Some(format!(
        "scanned {}, changed {}, sent {} in {}",
        humanize(u64_of(ingest, "scanned_bytes")),
        humanize(u64_of(ingest, "changed_bytes")),
        humanize(u64_of(ingest, "sent_bytes")),
        human_duration_ms(u64_of(ingest, "duration_ms")),
    ))
}

/// How a table column is aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A table with a header row, columns two spaces apart and as wide as their widest cell, no
/// trailing spaces. `align` gives each column's alignment (missing entries are left).
fn render_table(headers: &[&str], align: &[Align], rows: &[Vec<String>]) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, c) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            let text = row.get(i).map(String::as_str).unwrap_or("");
            if i > 0 {
                line.push_str("  ");
            }
            // Format widths count chars, as the widths above do.
            if align.get(i) == Some(&Align::Right) {
                line.push_str(&format!("{text:>width$}"));
            } else {
                line.push_str(&format!("{text:<width$}"));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `forkd list` table from `{"volumes":[...]}`.
pub(super) fn render_list(v: &Value) -> String {
    let volumes = items(v, "volumes");
    if volumes.is_empty() {
        return "no volumes".to_string();
    }
    use Align::{Left, Right};
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|vol| {
            let snapshots =
                vol.get("snapshot_count").and_then(Value::as_u64).unwrap_or(items(vol, "snapshots").len() as u64);
            vec![
                cell(vol, "name"),
                cell(vol, "kind"),
                humanize(u64_of(vol, "size_bytes")),
                humanize(u64_of(vol, "allocated_bytes")),
                humanize(u64_of(vol, "unique_bytes")),
                cell(vol, "origin"),
                snapshots.to_string(),
            ]
        })
        .collect();
    render_table(
        &["NAME", "KIND", "SIZE", "ALLOCATED", "UNIQUE", "ORIGIN", "SNAPSHOTS"],
        &[Left, Left, Right, Right, Right, Left, Right],
        &rows,
    )
}

/// The `forkd show` text from a `Volume` object.
pub(super) fn render_show(v: &Value) -> String {
    let exports = v.get("exports").cloned().unwrap_or(Value::Null);
    let size = u64_of(v, "size_bytes");
    let mut fields: Vec<(&str, String)> = vec![
        ("name", cell(v, "name")),
        ("kind", cell(v, "kind")),
        ("size", format!("{} ({size} bytes)", humanize(size))),
        ("origin", cell(v, "origin")),
        ("timeflow", cell(v, "timeflow")),
        ("created", cell(v, "created_at")),
        ("allocated", humanize(u64_of(v, "allocated_bytes"))),
        ("unique", humanize(u64_of(v, "unique_bytes"))),
        ("nbd export", cell(&exports, "nbd")),
        ("iscsi target", cell(&exports, "iscsi")),
    ];
    if v.get("ingest_running").and_then(Value::as_bool) == Some(true) {
        fields.push(("ingest", "running".to_string()));
    }
    let key_width = fields.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in &fields {
        out.push_str(&format!("{:<key_width$}  {value}\n", format!("{key}:")));
    }

    let snapshots = items(v, "snapshots");
    out.push('\n');
    if snapshots.is_empty() {
        out.push_str("no snapshots\n");
        return out;
    }
    use Align::{Left, Right};
    let with_ingest = snapshots.iter().any(|s| ingest_summary(s).is_some());
    let mut headers = vec!["ID", "NAME", "CREATED", "TIMEFLOW", "BOOKMARKS", "REASON", "ALLOCATED", "UNIQUE"];
    let mut align = vec![Right, Left, Left, Right, Left, Left, Right, Right];
    if with_ingest {
        headers.push("INGEST");
        align.push(Left);
    }
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            let marks = bookmarks(s);
            let mut row = vec![
                cell(s, "id"),
                cell(s, "name"),
                cell(s, "created_at"),
                cell(s, "timeflow"),
                if marks.is_empty() { "-".to_string() } else { marks },
                cell(s, "reason"),
                humanize(u64_of(s, "allocated_bytes")),
                humanize(u64_of(s, "unique_bytes")),
            ];
            if with_ingest {
                row.push(ingest_summary(s).unwrap_or_else(|| "-".to_string()));
            }
            row
        })
        .collect();
    out.push_str(&render_table(&headers, &align, &rows));
    out
}

/// A node of the lineage tree: a volume (children: its snapshots) or a snapshot (children:
/// the clones whose origin it is).
#[derive(Debug, Clone, Copy)]
enum TreeItem<'a> {
    Volume(&'a Value),
    Snapshot(&'a Value),
}

impl TreeItem<'_> {
    fn label(self) -> String {
        match self {
            TreeItem::Volume(v) => {
                format!("{}  {}  {}", cell(v, "name"), cell(v, "kind"), humanize(u64_of(v, "size_bytes")))
            }
            TreeItem::Snapshot(s) => {
                let mut label = format!("{}  {}", cell(s, "name"), cell(s, "created_at"));
                let marks = bookmarks(s);
                if !marks.is_empty() {
                    label.push_str(&format!("  [{marks}]"));
                }
                label
            }
        }
    }
}

/// Draw the flat `{"volumes":[...]}` of `GET /v1/tree` (see `docs/api.md`) as a lineage tree
/// with box-drawing characters. Iterative, so any number of clone generations draws.
pub(super) fn render_tree(tree: &Value) -> String {
    let vols = items(tree, "volumes");
    if vols.is_empty() {
        return "no volumes\n".to_string();
    }
    let mut clones_of: std::collections::HashMap<&str, Vec<&Value>> = std::collections::HashMap::new();
    let mut roots = Vec::new();
    for v in vols {
        match v.get("origin").and_then(Value::as_str) {
            Some(o) => clones_of.entry(o).or_default().push(v),
            None => roots.push(v),
        }
    }
    fn children<'a>(item: TreeItem<'a>, clones_of: &std::collections::HashMap<&str, Vec<&'a Value>>) -> Vec<&'a Value> {
        match item {
            TreeItem::Volume(v) => items(v, "snapshots").iter().collect(),
            TreeItem::Snapshot(s) => clones_of.get(str_or(s, "name", "")).cloned().unwrap_or_default(),
        }
    }
    let mut out = String::new();
    // (item, prefix of its line, connector, prefix for its children)
    let mut stack: Vec<(TreeItem<'_>, String, &str, String)> =
        roots.iter().rev().map(|r| (TreeItem::Volume(r), String::new(), "", String::new())).collect();
    while let Some((item, prefix, connector, child_prefix)) = stack.pop() {
        out.push_str(&prefix);
        out.push_str(connector);
        out.push_str(&item.label());
        out.push('\n');
        let kids = children(item, &clones_of);
        let n = kids.len();
        for (i, kid) in kids.into_iter().enumerate().rev() {
            let last = i + 1 == n;
            let kid_item = match item {
                TreeItem::Volume(_) => TreeItem::Snapshot(kid),
                TreeItem::Snapshot(_) => TreeItem::Volume(kid),
            };
            let next = format!("{child_prefix}{}", if last { "    " } else { "│   " });
            stack.push((kid_item, child_prefix.clone(), if last { "└── " } else { "├── " }, next));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_alignment() {
        let rows = vec![
            vec!["prod".to_string(), "10.0 GiB".to_string(), "x".to_string()],
            vec!["dev1-long".to_string(), "0 B".to_string(), "-".to_string()],
        ];
        let t = render_table(&["NAME", "SIZE", "ORIGIN"], &[Align::Left, Align::Right, Align::Left], &rows);
        assert_eq!(
            t,
            "NAME           SIZE  ORIGIN\n\
             prod       10.0 GiB  x\n\
             dev1-long       0 B  -\n"
        );
        // Widths count characters, not bytes; no trailing spaces.
        let t = render_table(&["A", "B"], &[], &[vec!["├é".to_string(), String::new()]]);
        assert_eq!(t, "A   B\n├é\n");
    }

    #[test]
    fn tree_drawing() {
        let tree = json!({"volumes": [
            {"name": "dev1", "kind": "clone", "size_bytes": 10u64 << 30, "origin": "prod@1", "snapshots": [
                {"name": "dev1@1", "created_at": "T2", "bookmarks": []}
            ]},
            {"name": "dev2", "kind": "clone", "size_bytes": 10u64 << 30, "origin": "prod@1", "snapshots": []},
            {"name": "prod", "kind": "source", "size_bytes": 10u64 << 30, "origin": null, "snapshots": [
                {"name": "prod@1", "created_at": "2026-11-21T10:00:00.000Z", "bookmarks": ["nightly"]},
                {"name": "prod@2", "created_at": "T3", "bookmarks": ["a", "b"]}
            ]},
            {"name": "other", "kind": "source", "size_bytes": 4096, "snapshots": []}
        ]});
        let expected = "\
prod  source  10.0 GiB
├── prod@1  2026-11-21T10:00:00.000Z  [nightly]
│   ├── dev1  clone  10.0 GiB
│   │   └── dev1@1  T2
│   └── dev2  clone  10.0 GiB
└── prod@2  T3  [a, b]
other  source  4.0 KiB
";
        assert_eq!(render_tree(&tree), expected);
        assert_eq!(render_tree(&json!({"volumes": []})), "no volumes\n");
        // Missing fields do not panic.
        assert_eq!(render_tree(&json!({"volumes": [{}]})), "-  -  0 B\n");
    }

    #[test]
    fn list_and_show_render() {
        let list = json!({"volumes": [
            {"name": "prod", "kind": "source", "size_bytes": 1u64 << 30, "origin": null,
             "allocated_bytes": 8192, "unique_bytes": 4096, "snapshot_count": 2},
        ]});
        let text = render_list(&list);
        assert!(text.starts_with("NAME  KIND    "), "{text}");
        assert!(text.contains("prod  source  1.0 GiB"), "{text}");

        let vol = json!({"name": "prod", "kind": "source", "size_bytes": 4096,
            "origin": null, "timeflow": 1, "created_at": "T",
            "allocated_bytes": 4096, "unique_bytes": 0,
            "exports": {"nbd": "prod", "iscsi": "iqn.2026-11.dev.forkd:prod"},
            "snapshots": [{"id": 1, "name": "prod@1", "created_at": "T", "timeflow": 1,
                "bookmarks": [], "reason": "ingest", "allocated_bytes": 4096,
                "unique_bytes": 0, "ingest": {"scanned_bytes": 8192, "changed_bytes": 4096,
                "sent_bytes": 4096, "duration_ms": 1500}}]});
        let text = render_show(&vol);
        assert!(text.contains("iscsi target:  iqn.2026-11.dev.forkd:prod\n"), "{text}");
        assert!(text.contains("origin:        -\n"), "{text}");
        assert!(text.contains("scanned 8.0 KiB, changed 4.0 KiB, sent 4.0 KiB in 1.5s"), "{text}");
    }
}
