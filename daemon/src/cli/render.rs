//! How the CLI shows the daemon's answers to people: tables, the `show` text and the lineage
//! tree, from the typed answers of [`crate::api`]. `--json` bypasses all of this and prints
//! the typed answer as JSON, keys sorted as the daemon sends them (a field this CLI does not
//! know, from a newer daemon, is not shown).

use std::collections::HashMap;

use crate::api::log::{LogEntries, LogEntry};
use crate::api::volumes::{IngestSummary, Snapshot, Tree, TreeSnapshot, TreeVolume, Volume, VolumeList};
use crate::units::{human_duration_ms, humanize};

/// A text shown in a table: as-is, or `-` when empty.
fn cell(text: &str) -> String {
    if text.is_empty() {
        "-".to_string()
    } else {
        text.to_string()
    }
}

/// A value that may be null, shown in a table (`-` when null or empty).
fn cell_opt(text: Option<&str>) -> String {
    cell(text.unwrap_or(""))
}

/// Bookmark names, comma-separated (empty when none).
fn bookmarks(marks: &[String]) -> String {
    marks.join(", ")
}

/// The short ingest summary of a snapshot made by ingest.
fn ingest_summary(ingest: &IngestSummary) -> String {
    format!(
        "scanned {}, changed {}, sent {} in {}",
        humanize(ingest.scanned_bytes),
        humanize(ingest.changed_bytes),
        humanize(ingest.sent_bytes),
        human_duration_ms(ingest.duration_ms),
    )
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
    render_columns(headers, align, rows)
}

/// A table whose columns are all left-aligned (for the other client commands' modules).
pub(super) fn left_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    render_columns(headers, &[], rows)
}

fn render_columns(headers: &[&str], align: &[Align], rows: &[Vec<String>]) -> String {
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

/// The `forkd list` table.
pub(super) fn render_list(list: &VolumeList) -> String {
    if list.volumes.is_empty() {
        return "no volumes".to_string();
    }
    use Align::{Left, Right};
    let rows: Vec<Vec<String>> = list
        .volumes
        .iter()
        .map(|vol| {
            vec![
                cell(&vol.name),
                cell(vol.kind.as_str()),
                humanize(vol.size_bytes),
                humanize(vol.allocated_bytes),
                humanize(vol.unique_bytes.unwrap_or(0)),
                cell_opt(vol.origin.as_deref()),
                vol.snapshot_total().to_string(),
            ]
        })
        .collect();
    render_table(
        &["NAME", "KIND", "SIZE", "ALLOCATED", "UNIQUE", "ORIGIN", "SNAPSHOTS"],
        &[Left, Left, Right, Right, Right, Left, Right],
        &rows,
    )
}

/// The `forkd log` table, oldest first. An entry's detail is shown indented under its row
/// when it failed or ran a hook, or for every entry with `verbose`.
pub(super) fn render_log(log: &LogEntries, verbose: bool) -> String {
    if log.entries.is_empty() {
        return "no operations logged".to_string();
    }
    use Align::{Left, Right};
    let rows: Vec<Vec<String>> = log.entries.iter().map(log_row).collect();
    let table = render_table(
        &["TIME", "WHO", "WHAT", "TARGET", "DURATION", "RESULT", "ERROR"],
        &[Left, Left, Left, Left, Right, Left, Left],
        &rows,
    );
    let mut out = String::new();
    let mut lines = table.lines();
    out.extend(lines.next().map(|header| format!("{header}\n")));
    for (line, e) in lines.zip(&log.entries) {
        out.push_str(line);
        out.push('\n');
        let shown = verbose || e.result != "ok" || e.what.starts_with("hook");
        for detail in e.detail.iter().filter(|_| shown).flat_map(|d| d.lines()) {
            out.push_str(&format!("    {detail}\n"));
        }
    }
    out
}

fn log_row(e: &LogEntry) -> Vec<String> {
    // `2026-11-21T10:00:00.123Z` is shown to the second: `2026-11-21T10:00:00Z`.
    let at = match (e.at.get(..19), e.at.len()) {
        (Some(seconds), 24) => format!("{seconds}Z"),
        _ => e.at.clone(),
    };
    vec![
        cell(&at),
        cell(&e.who),
        cell(&e.what),
        cell_opt(e.target.as_deref()),
        human_duration_ms(e.duration_ms),
        cell(&e.result),
        cell_opt(e.error.as_deref()),
    ]
}

/// The `forkd show` text of a volume.
/// A replica's `replica of` line: what it follows, read-only, and a snapshot half received.
fn replica_text(r: &crate::api::replication::ReplicaOfInfo) -> String {
    let receiving = r
        .receiving
        .as_ref()
        .map_or_else(String::new, |x| format!("; receiving {} (at block {})", x.snapshot, x.next_block));
    let latest = match (&r.latest, r.lag_ms) {
        (Some(l), Some(ms)) => format!("; holds {l}, taken {} ago", human_duration_ms(ms)),
        _ => String::new(),
    };
    format!("{} on site {} (read-only until `forkd promote`){latest}{receiving}", r.volume, r.site)
}

/// A source's `replication` line: target, mode, state, the last snapshot sent and the lag.
fn replication_text(r: &crate::api::replication::ReplicationStatus) -> String {
    let mode = r.continuous_ms.map_or_else(|| "once".to_string(), |ms| format!("every {}", human_duration_ms(ms)));
    let sent = r.last_sent.as_deref().map_or_else(String::new, |s| format!(", target holds {s}"));
    let lag = r.lag_ms.map_or_else(String::new, |ms| format!(", lag {}", human_duration_ms(ms)));
    let error = r.last_error.as_deref().map_or_else(String::new, |e| format!(": {e}"));
    format!("to {} {mode}, {}{sent}{lag}{error}", r.to, r.state)
}

pub(super) fn render_show(v: &Volume) -> String {
    let size = v.size_bytes;
    let mut fields: Vec<(&str, String)> = vec![
        ("name", cell(&v.name)),
        ("kind", cell(v.kind.as_str())),
        ("size", format!("{} ({size} bytes)", humanize(size))),
        ("origin", cell_opt(v.origin.as_deref())),
        ("timeflow", v.timeflow.to_string()),
        ("created", cell(&v.created_at)),
        ("allocated", humanize(v.allocated_bytes)),
        ("unique", humanize(v.unique_bytes.unwrap_or(0))),
        ("nbd export", cell(&v.exports.nbd)),
        ("iscsi target", cell(&v.exports.iscsi)),
    ];
    if v.ingest_running {
        fields.push(("ingest", "running".to_string()));
    }
    if let Some(l) = &v.lease {
        fields.push(("lease", super::lease::text(l)));
    }
    if let Some(q) = v.quota_bytes {
        fields.push(("quota", format!("{} ({} used)", humanize(q), humanize(v.unique_bytes.unwrap_or(0)))));
    }
    if let Some(q) = v.default_quota_bytes {
        fields.push(("default quota", humanize(q)));
    }
    if let Some(env) = &v.environment {
        fields.push(("environment", env.clone()));
    }
    if let Some(policy) = &v.clone_from {
        fields.push(("policy", format!("clone_from={policy}")));
    }
    if let Some(source) = &v.masked_from {
        fields.push(("masked from", format!("{source} (only its masked snapshots are served)")));
    }
    if let Some(from) = &v.detached_from {
        fields.push(("detached from", from.clone()));
    }
    if let Some(r) = &v.retention {
        fields.push(("retention", super::retention::describe(r)));
    }
    if let Some(r) = &v.replica_of {
        fields.push(("replica of", replica_text(r)));
    }
    if let Some(r) = &v.replication {
        fields.push(("replication", replication_text(r)));
    }
    let key_width = fields.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in &fields {
        out.push_str(&format!("{:<key_width$}  {value}\n", format!("{key}:")));
    }
    out.push('\n');
    let snapshots = v.snapshots.as_deref().unwrap_or(&[]);
    if snapshots.is_empty() {
        out.push_str("no snapshots\n");
        return out;
    }
    out.push_str(&snapshot_table(snapshots));
    out
}

/// The snapshots of `forkd show`, with an INGEST column when any was made by ingest.
fn snapshot_table(snapshots: &[Snapshot]) -> String {
    use Align::{Left, Right};
    let with_ingest = snapshots.iter().any(|s| s.ingest.is_some());
    let mut headers = vec!["ID", "NAME", "CREATED", "TIMEFLOW", "BOOKMARKS", "REASON", "ALLOCATED", "UNIQUE"];
    let mut align = vec![Right, Left, Left, Right, Left, Left, Right, Right];
    if with_ingest {
        headers.push("INGEST");
        align.push(Left);
    }
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            let mut row = vec![
                s.id.to_string(),
                cell(&s.name),
                cell(&s.created_at),
                s.timeflow.to_string(),
                cell(&bookmarks(&s.bookmarks)),
                match &s.mask {
                    Some(m) => format!(
                        "mask of {} by {}",
                        m.source,
                        if m.script.is_empty() { "(copied as is)" } else { &m.script }
                    ),
                    None => cell(&s.reason),
                },
                humanize(s.allocated_bytes),
                humanize(s.unique_bytes.unwrap_or(0)),
            ];
            if with_ingest {
                row.push(s.ingest.as_ref().map_or_else(|| "-".to_string(), ingest_summary));
            }
            row
        })
        .collect();
    render_table(&headers, &align, &rows)
}

/// A node of the lineage tree: a volume (children: its snapshots) or a snapshot (children:
/// the clones whose origin it is).
#[derive(Debug, Clone, Copy)]
enum TreeItem<'a> {
    Volume(&'a TreeVolume),
    Snapshot(&'a TreeSnapshot),
}

impl<'a> TreeItem<'a> {
    fn label(self) -> String {
        match self {
            TreeItem::Volume(v) => format!("{}  {}  {}", cell(&v.name), cell(v.kind.as_str()), humanize(v.size_bytes)),
            TreeItem::Snapshot(s) => {
                let mut label = format!("{}  {}", cell(&s.name), cell(&s.created_at));
                let marks = bookmarks(&s.bookmarks);
                if !marks.is_empty() {
                    label.push_str(&format!("  [{marks}]"));
                }
                label
            }
        }
    }

    /// Its children, in drawing order.
    fn children(self, clones_of: &HashMap<&str, Vec<&'a TreeVolume>>) -> Vec<TreeItem<'a>> {
        match self {
            TreeItem::Volume(v) => v.snapshots.iter().map(TreeItem::Snapshot).collect(),
            TreeItem::Snapshot(s) => clones_of
                .get(s.name.as_str())
                .map_or_else(Vec::new, |c| c.iter().map(|v| TreeItem::Volume(v)).collect()),
        }
    }
}

/// Draw the flat answer of `GET /v1/tree` (see `docs/api.md`) as a lineage tree with
/// box-drawing characters. Iterative, so any number of clone generations draws.
pub(super) fn render_tree(tree: &Tree) -> String {
    if tree.volumes.is_empty() {
        return "no volumes\n".to_string();
    }
    let mut clones_of: HashMap<&str, Vec<&TreeVolume>> = HashMap::new();
    let mut roots = Vec::new();
    for v in &tree.volumes {
        match &v.origin {
            Some(o) => clones_of.entry(o.as_str()).or_default().push(v),
            None => roots.push(v),
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
        let kids = item.children(&clones_of);
        let n = kids.len();
        for (i, kid) in kids.into_iter().enumerate().rev() {
            let last = i + 1 == n;
            let next = format!("{child_prefix}{}", if last { "    " } else { "│   " });
            stack.push((kid, child_prefix.clone(), if last { "└── " } else { "├── " }, next));
        }
    }
    out.push_str(&render_environments(tree));
    out
}

/// The environments under the tree: a line each, with its members.
fn render_environments(tree: &Tree) -> String {
    let mut out = String::new();
    for e in &tree.environments {
        let members: Vec<String> = e.members.iter().map(|(m, v)| format!("{m}={v}")).collect();
        let origin = e.origin.as_deref().map(|o| format!("  (from {o})")).unwrap_or_default();
        out.push_str(&format!("environment {}: {}{origin}\n", cell(&e.name), members.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The answer type a JSON literal reads as, as the CLI reads the daemon's answers.
    fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("the literal reads as the answer type")
    }

    #[test]
    fn log_table_shows_details_of_failures_and_hooks() {
        let entry = |what: &str, result: &str, error: Option<&str>, detail: &str| {
            json!({"seq": 1, "at": "2026-11-21T10:00:00.123Z", "who": "127.0.0.1:5000", "what": what,
                "target": "dev1", "duration_ms": 1500, "result": result, "error": error, "detail": detail})
        };
        let log: LogEntries = typed(json!({"entries": [
            entry("clone", "ok", None, "from prod@3"),
            entry("clone", "failed", Some("no snapshot `prod@9`"), "from prod@9"),
            entry("hook configure-clone", "ok", None, "configure.sh exit 0\nrestarted app"),
        ]}));
        let text = render_log(&log, false);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("TIME") && lines[0].ends_with("ERROR"), "{text}");
        assert!(
            lines[1].starts_with("2026-11-21T10:00:00Z  127.0.0.1:5000  clone") && lines[1].contains("1.5s"),
            "{text}"
        );
        assert!(lines[2].ends_with("failed  no snapshot `prod@9`"), "{text}");
        assert_eq!(lines[3], "    from prod@9", "{text}");
        assert!(lines[4].contains("hook configure-clone"), "{text}");
        assert_eq!(lines[5..], ["    configure.sh exit 0", "    restarted app"], "{text}");
        assert_eq!(
            render_log(&log, true).lines().filter(|l| l.starts_with("    ")).count(),
            4,
            "verbose: every detail"
        );
        assert_eq!(render_log(&LogEntries::default(), false), "no operations logged");
    }

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
        assert_eq!(render_tree(&typed(tree)), expected);
        assert_eq!(render_tree(&typed(json!({"volumes": []}))), "no volumes\n");
        // Missing fields do not panic.
        assert_eq!(render_tree(&typed(json!({"volumes": [{}]}))), "-  -  0 B\n");
    }

    #[test]
    fn list_and_show_render() {
        let list = json!({"volumes": [
            {"name": "prod", "kind": "source", "size_bytes": 1u64 << 30, "origin": null,
             "allocated_bytes": 8192, "unique_bytes": 4096, "snapshot_count": 2},
        ]});
        let text = render_list(&typed(list));
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
        let text = render_show(&typed(vol));
        assert!(text.contains("iscsi target:  iqn.2026-11.dev.forkd:prod\n"), "{text}");
        assert!(text.contains("origin:        -\n"), "{text}");
        assert!(text.contains("scanned 8.0 KiB, changed 4.0 KiB, sent 4.0 KiB in 1.5s"), "{text}");
    }
}
