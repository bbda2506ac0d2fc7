//! The `forkd` command line: clap definitions for every command, and the implementations of
//! the client commands that are plain calls to the daemon's HTTP API (`docs/api.md`).
//!
//! `serve`, `ingest` and `dump` are defined here but implemented elsewhere; [`run_client`]
//! handles the rest. Output is a human-readable table or line by default and the daemon's JSON
//! answer, pretty-printed, with `--json`.
//!
//! The `--api` flag: it is one global flag (`forkd --api URL list` and `forkd list --api URL`
//! both work, default from `FORKD_API`, then `http://127.0.0.1:7480`). For `serve`, the same
//! flag is the address to listen on: [`ServeArgs::listen_api`] is `Some` only when `--api` was
//! given on the command line (before or after `serve`), never from `FORKD_API` or the default,
//! so the daemon's config file and defaults still apply when it is absent.
//!
//! The `--token-file FILE` flag works the same way: global, and for `serve` the token the API
//! requires ([`ServeArgs::token_file`]); for client commands the token they send, with the
//! `FORKD_TOKEN` environment variable (the token itself) as the fallback ([`client`]).

use std::io::Write;
use std::path::PathBuf;

use anyhow::anyhow;
use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches, Parser, Subcommand};
use serde_json::{json, Value};

use crate::client::{enc, Client};

/// Default address of the daemon's HTTP API, as a client URL.
pub const DEFAULT_API: &str = "http://127.0.0.1:7480";

/// forkd: instant, writable, space-sharing copies of block volumes, served over NBD and iSCSI.
#[derive(Debug, Parser)]
#[command(name = "forkd", version, long_about = None)]
pub struct Cli {
    /// URL of the forkd HTTP API (for `serve`, given here: the address to listen on)
    #[arg(
        long,
        env = "FORKD_API",
        default_value = DEFAULT_API,
        global = true,
        value_name = "URL"
    )]
    pub api: String,

    /// Print the daemon's JSON answer instead of human-readable output
    #[arg(long, global = true)]
    pub json: bool,

    /// File holding the API token: sent by client commands (else FORKD_TOKEN, the token
    /// itself), required by `serve` on every request
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// The command to run
    #[command(subcommand)]
    pub command: Command,
}

/// Every `forkd` command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: HTTP API, NBD and iSCSI servers
    Serve(ServeArgs),

    /// Manage source volumes
    Source {
        /// What to do with sources
        #[command(subcommand)]
        cmd: SourceCmd,
    },

    /// Feed a source volume from a device or image (only changed blocks after the first run)
    Ingest(IngestArgs),

    /// Record a snapshot of a volume
    Snapshot {
        /// Volume to snapshot
        #[arg(value_name = "VOLUME")]
        volume: String,
        /// Bookmark name to attach to the new snapshot
        #[arg(long, value_name = "NAME")]
        bookmark: Option<String>,
    },

    /// Create a writable clone of a snapshot (a volume is snapshotted first)
    Clone {
        /// Snapshot (VOLUME@N, @latest, @BOOKMARK, @TIME) or volume to clone
        #[arg(value_name = "SNAPSHOT_OR_VOLUME")]
        from: String,
        /// Name of the new clone
        #[arg(value_name = "NEWNAME")]
        name: String,
    },

    /// Make a clone's contents those of an earlier snapshot (the current state is kept)
    Rewind {
        /// Clone to rewind
        #[arg(value_name = "CLONE")]
        clone: String,
        /// Snapshot (dev1@2, @2, 2, @BOOKMARK, an origin snapshot) or RFC 3339 time
        #[arg(long, value_name = "SNAPSHOT_OR_TIME")]
        to: String,
    },

    /// Re-point a clone at the newest snapshot of its source (the current state is kept)
    Refresh {
        /// Clone to refresh
        #[arg(value_name = "CLONE")]
        clone: String,
        /// Snapshot to refresh to instead of the newest one
        #[arg(long, value_name = "SNAPSHOT")]
        to: Option<String>,
    },

    /// Add a bookmark name to an existing snapshot
    Bookmark {
        /// Snapshot to bookmark
        #[arg(value_name = "SNAPSHOT")]
        snapshot: String,
        /// Bookmark name
        #[arg(value_name = "NAME")]
        name: String,
    },

    /// List volumes with their sizes and space use
    List,

    /// Show the lineage of sources, snapshots and clones
    Tree,

    /// Show one volume and its snapshots
    Show {
        /// Volume to show
        #[arg(value_name = "NAME")]
        name: String,
    },

    /// Copy a volume's or snapshot's contents into a file
    Dump {
        /// Volume or snapshot to read
        #[arg(value_name = "VOLUME_OR_SNAPSHOT")]
        reference: String,
        /// File to write
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },

    /// Delete a volume with its snapshots, or one snapshot
    Delete {
        /// Volume or snapshot to delete
        #[arg(value_name = "NAME_OR_SNAPSHOT")]
        reference: String,
    },
}

/// `forkd source ...`
#[derive(Debug, Subcommand)]
pub enum SourceCmd {
    /// Create an empty source volume
    Create {
        /// Name of the new source
        #[arg(value_name = "NAME")]
        name: String,
        /// Size in bytes or with a K/M/G/T suffix, a multiple of 4096 (e.g. 10G)
        #[arg(long, value_name = "SIZE")]
        size: String,
    },
}

/// `forkd serve` options. Every field is `None` when not given on the command line.
///
/// `listen_api` is the global `--api` flag, taken only when it was given on the command line
/// (not from `FORKD_API` nor the client default), with a leading `http://` and trailing `/`
/// removed, so it is a bare `HOST:PORT`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeArgs {
    /// Configuration file (`--config FILE`).
    pub config: Option<PathBuf>,
    /// Data directory (`--data-dir DIR`).
    pub data_dir: Option<PathBuf>,
    /// Address for the HTTP API (`--api ADDR`).
    pub listen_api: Option<String>,
    /// Address for the NBD server (`--nbd ADDR`).
    pub nbd: Option<String>,
    /// Address for the iSCSI target (`--iscsi ADDR`).
    pub iscsi: Option<String>,
    /// File holding the API token (the global `--token-file FILE`).
    pub token_file: Option<PathBuf>,
}

/// The flags `serve` defines itself; `--api` comes from the global flag.
#[derive(Debug, clap::Args)]
struct ServeFlags {
    /// Configuration file (TOML)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory holding the store and catalog [default: ./forkd-data]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address for the NBD server [default: 0.0.0.0:10809]
    #[arg(long, value_name = "ADDR")]
    nbd: Option<String>,
    /// Address for the iSCSI target [default: 0.0.0.0:3260]
    #[arg(long, value_name = "ADDR")]
    iscsi: Option<String>,
}

/// The global `--api` value, only when given on the command line, as `HOST:PORT`.
fn listen_api_from(m: &ArgMatches) -> Option<String> {
    let value = m.try_get_one::<String>("api").ok().flatten()?.clone();
    if m.value_source("api") != Some(ValueSource::CommandLine) {
        return None;
    }
    let bare = value.trim();
    let bare = bare.strip_prefix("http://").unwrap_or(bare);
    Some(bare.trim_end_matches('/').to_string())
}

impl FromArgMatches for ServeArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut matches.clone())
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, clap::Error> {
        let listen_api = listen_api_from(matches);
        let token_file = matches.try_get_one::<PathBuf>("token_file").ok().flatten().cloned();
        let flags = ServeFlags::from_arg_matches_mut(matches)?;
        Ok(ServeArgs {
            config: flags.config,
            data_dir: flags.data_dir,
            listen_api,
            nbd: flags.nbd,
            iscsi: flags.iscsi,
            token_file,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.update_from_arg_matches_mut(&mut matches.clone())
    }

    fn update_from_arg_matches_mut(&mut self, matches: &mut ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches_mut(matches)?;
        Ok(())
    }
}

impl clap::Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        ServeFlags::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        ServeFlags::augment_args_for_update(cmd)
    }
}

/// `forkd ingest` options.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// Source volume to feed
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Block device or image file to read (required unless --abort or --lvm)
    #[arg(long, value_name = "PATH", required_unless_present_any = ["abort", "lvm"], conflicts_with = "lvm")]
    pub from: Option<PathBuf>,
    /// File of the ranges changed since the last ingest, read instead of the whole image:
    /// thin_delta XML, or `OFFSET LENGTH` lines in bytes
    #[arg(long, value_name = "FILE")]
    pub changed_blocks: Option<PathBuf>,
    /// LVM logical volume to snapshot and read from
    #[arg(long, value_name = "VG/LV")]
    pub lvm: Option<String>,
    /// Mount point to freeze (fsfreeze): for the instant of lvcreate with --lvm, else for the
    /// whole read of --from
    #[arg(long, value_name = "MOUNTPOINT")]
    pub freeze: Option<PathBuf>,
    /// Size of the LVM snapshot (an `lvcreate -L` value): room for writes during the ingest
    #[arg(long, value_name = "SIZE", default_value = "1G", requires = "lvm")]
    pub lvm_snapshot_size: String,
    /// Name prefix of the LVM snapshot (PREFIX-YYYYMMDDTHHMMSS)
    #[arg(long, value_name = "PREFIX", default_value = "forkd-ingest", requires = "lvm")]
    pub lvm_prefix: String,
    /// With `--from nbd://HOST:PORT/EXPORT`: read only the ranges qemu dirty bitmap NAME marks
    /// (NBD block status on the `qemu:dirty-bitmap:NAME` context)
    #[arg(long, value_name = "NAME", conflicts_with = "changed_blocks")]
    pub dirty_bitmap: Option<String>,
    /// Abandon the ingest running for NAME instead of starting one
    #[arg(long, conflicts_with_all = ["from", "changed_blocks", "lvm", "freeze"])]
    pub abort: bool,
    /// Grow the source to the image's size first when the image is larger (never shrinks)
    #[arg(long, conflicts_with = "abort")]
    pub resize: bool,
}

/// The API client for `cli.api`, sending the token from `--token-file` or `FORKD_TOKEN`.
pub fn client(cli: &Cli) -> anyhow::Result<Client> {
    let token = crate::auth::client_token(cli.token_file.as_deref())?;
    Ok(Client::with_token(&cli.api, token))
}

/// Run a client command (everything except `serve`, `ingest` and `dump`) against the daemon
/// at `cli.api`, printing its result on stdout.
pub fn run_client(cli: &Cli) -> anyhow::Result<()> {
    let client = client(cli)?;
    match &cli.command {
        Command::Serve(_) | Command::Ingest(_) | Command::Dump { .. } => Err(anyhow!("internal: not a client command")),
        Command::Source { cmd: SourceCmd::Create { name, size } } => {
            let size_value = match size.trim().parse::<u64>() {
                Ok(n) => json!(n),
                Err(_) => json!(size),
            };
            let v = client.post_json("/v1/sources", &json!({"name": name, "size": size_value}))?;
            report(cli.json, &v, || {
                format!("created source {} ({})", str_or(&v, "name", name), humanize(u64_of(&v, "size_bytes")))
            })
        }
        Command::Snapshot { volume, bookmark } => {
            let body = match bookmark {
                Some(b) => json!({ "bookmark": b }),
                None => json!({}),
            };
            let v = client.post_json(&format!("/v1/volumes/{}/snapshots", enc(volume)), &body)?;
            report(cli.json, &v, || {
                let snap = str_or(&v, "snapshot", volume);
                match bookmark {
                    Some(b) => format!("created snapshot {snap} (bookmark {b})"),
                    None => format!("created snapshot {snap}"),
                }
            })
        }
        Command::Clone { from, name } => {
            let v = client.post_json("/v1/clones", &json!({"from": from, "name": name}))?;
            report(cli.json, &v, || {
                let made_from = v
                    .get("made_from")
                    .and_then(Value::as_str)
                    .or_else(|| v.get("origin").and_then(Value::as_str))
                    .unwrap_or(from);
                format!("created clone {} from {made_from}", str_or(&v, "name", name))
            })
        }
        Command::Rewind { clone, to } => {
            let v = client.post_json(&format!("/v1/volumes/{}/rewind", enc(clone)), &json!({ "to": to }))?;
            report(cli.json, &v, || moved_line("rewound", &v, clone, to))
        }
        Command::Refresh { clone, to } => {
            let body = match to {
                Some(t) => json!({ "to": t }),
                None => json!({}),
            };
            let v = client.post_json(&format!("/v1/volumes/{}/refresh", enc(clone)), &body)?;
            let fallback = to.as_deref().unwrap_or("the newest snapshot");
            report(cli.json, &v, || moved_line("refreshed", &v, clone, fallback))
        }
        Command::Bookmark { snapshot, name } => {
            let v =
                client.post_json(&format!("/v1/snapshots/{}/bookmarks", enc(snapshot)), &json!({ "name": name }))?;
            report(cli.json, &v, || format!("bookmarked {} as {name}", str_or(&v, "snapshot", snapshot)))
        }
        Command::List => {
            let v = client.get_json("/v1/volumes")?;
            report(cli.json, &v, || render_list(&v))
        }
        Command::Tree => {
            let v = client.get_json("/v1/tree")?;
            report(cli.json, &v, || render_tree(&v))
        }
        Command::Show { name } => {
            let v = client.get_json(&format!("/v1/volumes/{}", enc(name)))?;
            report(cli.json, &v, || render_show(&v))
        }
        Command::Delete { reference } => {
            let v = client.delete_json(&format!("/v1/volumes/{}", enc(reference)))?;
            report(cli.json, &v, || {
                format!("deleted {} (freed {})", str_or(&v, "deleted", reference), humanize(u64_of(&v, "freed_bytes")))
            })
        }
    }
}

/// Print `v` as pretty JSON, or the human text `human` builds.
fn report(json: bool, v: &Value, human: impl FnOnce() -> String) -> anyhow::Result<()> {
    let text = if json { serde_json::to_string_pretty(v)? } else { human() };
    emit(&text)
}

/// Write `text` (plus a final newline if missing) to stdout; a closed pipe is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let result =
        out.write_all(text.as_bytes()).and_then(|()| if text.ends_with('\n') { Ok(()) } else { out.write_all(b"\n") });
    match result.and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow!("cannot write to stdout: {e}")),
    }
}

/// `rewound dev1 to dev1@2 (previous state kept as dev1@4)`.
fn moved_line(verb: &str, v: &Value, clone: &str, to: &str) -> String {
    let volume = str_or(v, "volume", clone);
    let target = str_or(v, "target", to);
    match v.get("kept").and_then(Value::as_str) {
        Some(kept) => format!("{verb} {volume} to {target} (previous state kept as {kept})"),
        None => format!("{verb} {volume} to {target}"),
    }
}

/// The string field `key` of `v`, or `default`.
fn str_or<'a>(v: &'a Value, key: &str, default: &'a str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or(default)
}

/// The unsigned field `key` of `v`, or 0.
fn u64_of(v: &Value, key: &str) -> u64 {
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

/// A size in binary units with one decimal: `0 B`, `1023 B`, `4.0 KiB`, `10.0 GiB`.
pub fn humanize(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    // 1023.96 KiB would print as "1024.0 KiB": move to the next unit instead.
    if (value * 10.0).round() >= 10240.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration in milliseconds, short: `850ms`, `3.2s`, `12m05s`, `2h03m`.
fn human_duration_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        let s = ms / 1000;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = ms / 60_000;
        format!("{}h{:02}m", m / 60, m % 60)
    }
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
fn render_list(v: &Value) -> String {
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
fn render_show(v: &Value) -> String {
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
fn render_tree(tree: &Value) -> String {
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
    use clap::CommandFactory;

    #[test]
    fn humanize_sizes() {
        assert_eq!(humanize(0), "0 B");
        assert_eq!(humanize(1023), "1023 B");
        assert_eq!(humanize(1024), "1.0 KiB");
        assert_eq!(humanize(4096), "4.0 KiB");
        assert_eq!(humanize(1536), "1.5 KiB");
        assert_eq!(humanize(12 * 1024 * 1024), "12.0 MiB");
        assert_eq!(humanize(10 * 1024 * 1024 * 1024), "10.0 GiB");
        assert_eq!(humanize(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(humanize(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration_ms(850), "850ms");
        assert_eq!(human_duration_ms(3_200), "3.2s");
        assert_eq!(human_duration_ms(725_000), "12m05s");
        assert_eq!(human_duration_ms(7_380_000), "2h03m");
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

    #[test]
    fn clap_definitions_are_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_api_flag() {
        let cli = Cli::try_parse_from(["forkd", "serve", "--api", "0.0.0.0:7480", "--nbd", "x:1"]).expect("parse");
        match cli.command {
            Command::Serve(s) => {
                assert_eq!(s.listen_api.as_deref(), Some("0.0.0.0:7480"));
                assert_eq!(s.nbd.as_deref(), Some("x:1"));
                assert_eq!(s.config, None);
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from(["forkd", "--api", "http://1.2.3.4:5/", "serve"]).expect("parse");
        match cli.command {
            Command::Serve(s) => assert_eq!(s.listen_api.as_deref(), Some("1.2.3.4:5")),
            other => panic!("unexpected {other:?}"),
        }
        // Not given: None, whatever FORKD_API or the client default say.
        let cli = Cli::try_parse_from(["forkd", "serve", "--data-dir", "/d"]).expect("parse");
        match cli.command {
            Command::Serve(s) => {
                assert_eq!(s.listen_api, None);
                assert_eq!(s.data_dir, Some(PathBuf::from("/d")));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn token_file_flag() {
        for args in [&["forkd", "serve", "--token-file", "/t"][..], &["forkd", "--token-file", "/t", "serve"][..]] {
            let cli = Cli::try_parse_from(args).expect("parse");
            match cli.command {
                Command::Serve(s) => assert_eq!(s.token_file, Some(PathBuf::from("/t")), "{args:?}"),
                other => panic!("unexpected {other:?}"),
            }
        }
        let cli = Cli::try_parse_from(["forkd", "serve"]).expect("parse");
        assert!(matches!(cli.command, Command::Serve(ServeArgs { token_file: None, .. })));
        let cli = Cli::try_parse_from(["forkd", "list", "--token-file", "/t"]).expect("parse");
        assert_eq!(cli.token_file, Some(PathBuf::from("/t")));
        let cli = Cli::try_parse_from(["forkd", "--token-file", "/t", "list"]).expect("parse");
        assert_eq!(cli.token_file, Some(PathBuf::from("/t")));
    }

    #[test]
    fn ingest_resize_flag() {
        let cli = Cli::try_parse_from(["forkd", "ingest", "prod", "--from", "/x", "--resize"]).expect("parse");
        assert!(matches!(cli.command, Command::Ingest(IngestArgs { resize: true, .. })));
        let cli = Cli::try_parse_from(["forkd", "ingest", "prod", "--from", "/x"]).expect("parse");
        assert!(matches!(cli.command, Command::Ingest(IngestArgs { resize: false, .. })));
        assert!(Cli::try_parse_from(["forkd", "ingest", "prod", "--abort", "--resize"]).is_err());
    }

    #[test]
    fn client_api_flag_before_or_after() {
        let a = Cli::try_parse_from(["forkd", "--api", "h:1", "list"]).expect("parse");
        assert_eq!(a.api, "h:1");
        let b = Cli::try_parse_from(["forkd", "list", "--api", "h:2", "--json"]).expect("parse");
        assert_eq!(b.api, "h:2");
        assert!(b.json);
    }

    #[test]
    fn ingest_from_required_unless_abort() {
        assert!(Cli::try_parse_from(["forkd", "ingest", "prod"]).is_err());
        let cli = Cli::try_parse_from(["forkd", "ingest", "prod", "--abort"]).expect("abort");
        assert!(matches!(cli.command, Command::Ingest(IngestArgs { abort: true, .. })));
        // --lvm replaces --from (the snapshot is what is read).
        assert!(Cli::try_parse_from(["forkd", "ingest", "prod", "--from", "/dev/sdb", "--lvm", "vg/lv"]).is_err());
        let cli = Cli::try_parse_from(["forkd", "ingest", "prod", "--lvm", "vg/lv", "--freeze", "/mnt"]).expect("lvm");
        match cli.command {
            Command::Ingest(i) => {
                assert_eq!(i.from, None);
                assert_eq!(i.lvm.as_deref(), Some("vg/lv"));
                assert_eq!(i.freeze, Some(PathBuf::from("/mnt")));
                assert_eq!((i.lvm_snapshot_size.as_str(), i.lvm_prefix.as_str()), ("1G", "forkd-ingest"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli =
            Cli::try_parse_from(["forkd", "ingest", "prod", "--from", "/dev/sdb", "--freeze", "/mnt"]).expect("freeze");
        assert!(matches!(cli.command, Command::Ingest(IngestArgs { lvm: None, freeze: Some(_), .. })));
        assert!(Cli::try_parse_from(["forkd", "ingest", "prod", "--abort", "--from", "/x"]).is_err());
    }

    #[test]
    fn other_commands_parse() {
        let cli = Cli::try_parse_from(["forkd", "clone", "prod@3", "dev1"]).expect("clone");
        assert!(matches!(cli.command, Command::Clone { ref from, ref name }
            if from == "prod@3" && name == "dev1"));
        let cli = Cli::try_parse_from(["forkd", "source", "create", "prod", "--size", "10G"]).expect("source");
        assert!(matches!(cli.command,
            Command::Source { cmd: SourceCmd::Create { ref size, .. } } if size == "10G"));
        let cli = Cli::try_parse_from(["forkd", "rewind", "dev1", "--to", "@2"]).expect("rewind");
        assert!(matches!(cli.command, Command::Rewind { ref to, .. } if to == "@2"));
        assert!(Cli::try_parse_from(["forkd", "rewind", "dev1"]).is_err());
        let cli = Cli::try_parse_from(["forkd", "dump", "prod@1", "/tmp/x"]).expect("dump");
        assert!(matches!(cli.command, Command::Dump { .. }));
    }

    #[test]
    fn not_a_client_command() {
        let cli = Cli::try_parse_from(["forkd", "serve"]).expect("parse");
        let err = run_client(&cli).expect_err("serve");
        assert_eq!(err.to_string(), "internal: not a client command");
    }
}
