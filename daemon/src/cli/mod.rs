//! The `forkd` command line: clap definitions for every command, and the implementations of
//! the client commands that are plain calls to the daemon's HTTP API (`docs/api.md`).
//!
//! `serve` is the [`crate::server`], `ingest` the [`crate::agent`], `dump` is [`dump`], `scrub`
//! is [`scrub`];
//! [`commands::run_client`] handles the rest, [`render`] draws their answers. Output is a
//! human-readable table or line by default and the daemon's JSON answer, pretty-printed,
//! with `--json`.
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

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::agent::IngestArgs;
use crate::api::client::Client;
use crate::server::config::ServeArgs;

pub mod commands;
pub mod dump;
pub mod env;
pub mod hooks;
pub mod lease;
pub mod quota;
pub mod render;
pub mod replicate;
pub mod retention;
pub mod schedule;
pub mod scrub;

pub use commands::run_client;

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
// Parsed once per process: the size of `serve`'s flags costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
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
        /// Delete it this long from now (after its pre-delete hook): 72h, 90m, 7d [default:
        /// the source's default_lease, if any]
        #[arg(long, value_name = "DURATION")]
        lease: Option<String>,
        /// Limit its unique bytes: 20G, 512M [default: the source's default_quota, if any]
        #[arg(long, value_name = "SIZE")]
        quota: Option<String>,
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

    /// Cut a clone loose from its origin snapshot (nothing is copied; the origin can then go)
    Detach {
        /// Clone to detach
        #[arg(value_name = "CLONE")]
        clone: String,
    },

    /// Set a volume's retention rules
    Retention {
        /// What to do with retention
        #[command(subcommand)]
        cmd: retention::RetentionCmd,
    },

    /// Apply a volume's retention rules now, listing what goes and why
    Prune {
        /// The volume
        #[arg(value_name = "VOLUME")]
        volume: String,
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

    /// Set, list and remove hook scripts run at a volume's events
    Hook {
        /// What to do with hooks
        #[command(subcommand)]
        cmd: hooks::HookCmd,
    },

    /// Mask a snapshot into a masked volume with a masking script (fails closed)
    Mask(hooks::MaskArgs),

    /// Change a clone's or an environment's lease: --extend 24h, --expires TIME, --none or --idle 2h
    Lease(lease::LeaseArgs),

    /// Limit a clone's unique bytes (20G), or remove the limit (--none)
    Quota(quota::QuotaArgs),

    /// Send a volume's snapshots (and its clones') to another forkd, once or --continuous
    Replicate(replicate::ReplicateArgs),

    /// Make a replica writable on this site (after a failover)
    Promote {
        /// The replica
        #[arg(value_name = "VOLUME")]
        volume: String,
    },

    /// Set a source's policy (clone_from=masked|any, default_lease=DURATION, max_lease=DURATION,
    /// default_quota=SIZE)
    Policy {
        /// What to set
        #[command(subcommand)]
        cmd: hooks::PolicyCmd,
    },

    /// Show the operation log: who did what to which volume, when, how long, and the result
    Log {
        /// Only operations on this volume or its snapshots
        #[arg(long, value_name = "NAME")]
        volume: Option<String>,
        /// Only operations since this time: RFC 3339 (2026-11-21T10:00:00Z) or a span back
        /// from now (30m, 1h, 7d)
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// At most this many, the newest ones [default: 1000]
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Show every entry's detail, not only those of failed operations and hooks
        #[arg(long, short)]
        verbose: bool,
    },

    /// Schedules: cron expressions (UTC) whose steps the daemon runs in order
    Schedule {
        /// What to do with schedules
        #[command(subcommand)]
        cmd: schedule::ScheduleCmd,
    },

    /// Manage environments: groups of volumes snapshotted, cloned, rewound, refreshed and
    /// deleted as one
    Env {
        /// What to do with environments
        #[command(subcommand)]
        cmd: env::EnvCmd,
    },

    /// Read every stored block and check its checksum; list damaged ones by volume or snapshot
    /// and offset (exit status 1 when there is damage)
    Scrub,

    /// Check a stopped daemon's data directory: its metadata, every tree, what a rolled-back
    /// metadata store lost (exit status 1 when there is a problem)
    Check {
        /// The data directory [default: ./forkd-data]
        #[arg(long, value_name = "DIR", default_value = "./forkd-data")]
        data_dir: PathBuf,
    },

    /// Compact a stopped daemon's metadata store: give back the space deletes freed (the
    /// daemon does it on its own while meta/ is at most 128 MiB)
    Compact {
        /// The data directory [default: ./forkd-data]
        #[arg(long, value_name = "DIR", default_value = "./forkd-data")]
        data_dir: PathBuf,
    },

    /// Accept a metadata store that came back older than its last flush, after a check that
    /// reports what is lost (nothing changes without --accept-loss)
    Repair {
        /// The data directory [default: ./forkd-data]
        #[arg(long, value_name = "DIR", default_value = "./forkd-data")]
        data_dir: PathBuf,
        /// Accept the loss the check reports, so the daemon starts with what meta/ holds
        #[arg(long)]
        accept_loss: bool,
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

/// The API client for `cli.api`, sending the token from `--token-file` or `FORKD_TOKEN`.
pub fn client(cli: &Cli) -> anyhow::Result<Client> {
    let token = crate::api::token::client_token(cli.token_file.as_deref())?;
    Ok(Client::with_token(&cli.api, token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::path::PathBuf;

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
        assert!(matches!(cli.command, Command::Clone { ref from, ref name, lease: None, quota: None }
            if from == "prod@3" && name == "dev1"));
        let cli = Cli::try_parse_from(["forkd", "clone", "prod@3", "dev1", "--lease", "72h"]).expect("clone");
        assert!(matches!(cli.command, Command::Clone { lease: Some(ref l), .. } if l == "72h"));
        let cli = Cli::try_parse_from(["forkd", "clone", "prod@3", "dev1", "--quota", "20G"]).expect("clone");
        assert!(matches!(cli.command, Command::Clone { quota: Some(ref q), .. } if q == "20G"));
        let cli = Cli::try_parse_from(["forkd", "quota", "dev1", "20G"]).expect("quota");
        assert!(matches!(cli.command, Command::Quota(ref a) if a.size.as_deref() == Some("20G")));
        assert!(Cli::try_parse_from(["forkd", "quota", "dev1"]).is_err(), "a size or --none is required");
        assert!(Cli::try_parse_from(["forkd", "quota", "dev1", "1G", "--none"]).is_err());
        let cli = Cli::try_parse_from(["forkd", "lease", "dev1", "--idle", "2h"]).expect("lease");
        assert!(matches!(cli.command, Command::Lease(ref a) if a.idle.as_deref() == Some("2h")));
        assert!(Cli::try_parse_from(["forkd", "lease", "dev1"]).is_err(), "a change is required");
        assert!(Cli::try_parse_from(["forkd", "lease", "dev1", "--none", "--extend", "1h"]).is_err());
        let cli = Cli::try_parse_from(["forkd", "env", "clone", "shop@latest", "qa", "--lease", "72h"]).expect("env");
        assert!(matches!(cli.command,
            Command::Env { cmd: env::EnvCmd::Clone { lease: Some(ref l), .. } } if l == "72h"));
        let cli = Cli::try_parse_from(["forkd", "source", "create", "prod", "--size", "10G"]).expect("source");
        assert!(matches!(cli.command,
            Command::Source { cmd: SourceCmd::Create { ref size, .. } } if size == "10G"));
        let cli = Cli::try_parse_from(["forkd", "rewind", "dev1", "--to", "@2"]).expect("rewind");
        assert!(matches!(cli.command, Command::Rewind { ref to, .. } if to == "@2"));
        assert!(Cli::try_parse_from(["forkd", "rewind", "dev1"]).is_err());
        let cli = Cli::try_parse_from(["forkd", "dump", "prod@1", "/tmp/x"]).expect("dump");
        assert!(matches!(cli.command, Command::Dump { .. }));
        let cli = Cli::try_parse_from(["forkd", "scrub", "--json"]).expect("scrub");
        assert!(matches!(cli.command, Command::Scrub) && cli.json);
        assert!(Cli::try_parse_from(["forkd", "scrub", "db"]).is_err());
        let cli = Cli::try_parse_from(["forkd", "log", "--volume", "db", "--since", "1h", "--json"]).expect("log");
        assert!(
            matches!(cli.command, Command::Log { ref volume, ref since, limit: None, verbose: false }
            if volume.as_deref() == Some("db") && since.as_deref() == Some("1h"))
                && cli.json
        );
    }
}
