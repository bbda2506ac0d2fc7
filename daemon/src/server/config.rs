//! The daemon's settings: built-in defaults, then the TOML file given with `--config`, then
//! the command line (`forkd serve` flags, [`ServeArgs`]).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches};
use serde::Deserialize;

/// Daemon settings (the `--config` file uses the same keys).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the catalog, map and extents live.
    pub data_dir: PathBuf,
    /// Address of the HTTP API.
    pub api: String,
    /// Address of the NBD listener.
    pub nbd: String,
    /// Address of the iSCSI listener.
    pub iscsi: String,
    /// File holding the API token (required unless the API listens on loopback).
    pub token_file: Option<PathBuf>,
    /// File of named API tokens with roles, `NAME ROLE TOKEN` per line
    /// ([`crate::server::roles`]).
    pub tokens_file: Option<PathBuf>,
    /// Who may log in to which iSCSI target ([`crate::server::iscsi::access`]).
    pub iscsi_access: crate::server::iscsi::access::IscsiAccess,
    /// Connection limit and handshake timeout of the NBD listener (`[nbd_limits]`).
    pub nbd_limits: crate::server::listener::LimitSettings,
    /// Connection limit and login timeout of the iSCSI listener (`[iscsi_limits]`).
    pub iscsi_limits: crate::server::listener::LimitSettings,
    /// Metadata engine: a new data directory is created with it, an existing one converted
    /// to it. Unset: a new directory gets the default, an existing one keeps its own.
    pub meta_engine: Option<String>,
    /// Where hook scripts are (PRODUCT.md, "hook"): the API names a file in it, never a path.
    pub hooks_dir: PathBuf,
    /// The user hooks run as when the daemon runs as root (unset: `nobody` where it exists).
    pub hook_user: Option<String>,
    /// How long operation log entries are kept: a span such as `30d`, `12h` or `90m`.
    pub log_retention: String,
    /// At most this many operation log entries are kept (the oldest go first).
    pub log_max_entries: u64,
    /// How long before a lease's expiry its `lease-expiring` hook runs: a span such as `1h`.
    pub lease_warning: String,
    /// How often the lease reaper looks at leases: a span such as `5s`.
    pub lease_tick: String,
    /// For tests: the daemon's "now" is the time written in this file ([`crate::server::clock`]).
    pub clock_file: Option<PathBuf>,
    /// Below this much free space new clones and ingests are refused: `5%` of the filesystem,
    /// a size such as `10G`, or `0` for no threshold ([`crate::store::pool`]).
    pub low_space_threshold: String,
    /// Garbage tree nodes one step of garbage collection dismantles under the catalog's write
    /// lock: smaller steps stall other volumes' I/O for less, and collect more slowly.
    pub gc_step_nodes: usize,
    /// How long the collector waits between two steps: a span such as `0s` or `5ms`.
    pub gc_step_pause: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./forkd-data"),
            api: "127.0.0.1:7480".into(),
            nbd: "0.0.0.0:10809".into(),
            iscsi: "0.0.0.0:3260".into(),
            token_file: None,
            tokens_file: None,
            iscsi_access: Default::default(),
            nbd_limits: Default::default(),
            iscsi_limits: Default::default(),
            meta_engine: None,
            hooks_dir: PathBuf::from("/etc/forkd/hooks"),
            hook_user: None,
            log_retention: "30d".into(),
            log_max_entries: 100_000,
            lease_warning: "1h".into(),
            lease_tick: "5s".into(),
            clock_file: None,
            low_space_threshold: "5%".into(),
            gc_step_nodes: catalog::GC_STEP_NODES,
            gc_step_pause: "0s".into(),
        }
    }
}

impl Config {
    /// Defaults, overlaid with the config file, overlaid with the command line.
    pub fn load(args: &ServeArgs) -> anyhow::Result<Config> {
        let mut c = match &args.config {
            Some(p) => Self::from_file(p)?,
            None => Config::default(),
        };
        if let Some(d) = &args.data_dir {
            c.data_dir = d.clone();
        }
        if let Some(a) = &args.listen_api {
            c.api = a.clone();
        }
        if let Some(a) = &args.nbd {
            c.nbd = a.clone();
        }
        if let Some(a) = &args.iscsi {
            c.iscsi = a.clone();
        }
        if let Some(t) = &args.token_file {
            c.token_file = Some(t.clone());
        }
        if let Some(t) = &args.tokens_file {
            c.tokens_file = Some(t.clone());
        }
        if let Some(e) = &args.meta_engine {
            c.meta_engine = Some(e.clone());
        }
        if let Some(d) = &args.hooks_dir {
            c.hooks_dir = d.clone();
        }
        if let Some(u) = &args.hook_user {
            c.hook_user = Some(u.clone());
        }
        if let Some(r) = &args.log_retention {
            c.log_retention = r.clone();
        }
        if let Some(n) = args.log_max_entries {
            c.log_max_entries = n;
        }
        if let Some(w) = &args.lease_warning {
            c.lease_warning = w.clone();
        }
        if let Some(t) = &args.lease_tick {
            c.lease_tick = t.clone();
        }
        if let Some(f) = &args.clock_file {
            c.clock_file = Some(f.clone());
        }
        if let Some(t) = &args.low_space_threshold {
            c.low_space_threshold = t.clone();
        }
        if let Some(n) = args.gc_step_nodes {
            c.gc_step_nodes = n;
        }
        if let Some(p) = &args.gc_step_pause {
            c.gc_step_pause = p.clone();
        }
        Ok(c)
    }

    fn from_file(p: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read config {}", p.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {}", p.display(), e.message()))
    }
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
    /// File of named API tokens with roles (`--tokens-file FILE`).
    pub tokens_file: Option<PathBuf>,
    /// Metadata engine (`--meta-engine NAME`).
    pub meta_engine: Option<String>,
    /// Hook scripts' directory (`--hooks-dir DIR`).
    pub hooks_dir: Option<PathBuf>,
    /// The user hooks run as (`--hook-user USER`).
    pub hook_user: Option<String>,
    /// How long operation log entries are kept (`--log-retention SPAN`).
    pub log_retention: Option<String>,
    /// How many operation log entries are kept (`--log-max-entries N`).
    pub log_max_entries: Option<u64>,
    /// How long before a lease's expiry its hook runs (`--lease-warning SPAN`).
    pub lease_warning: Option<String>,
    /// How often leases are looked at (`--lease-tick SPAN`).
    pub lease_tick: Option<String>,
    /// The file the daemon's time is read from, for tests (`--clock-file FILE`).
    pub clock_file: Option<PathBuf>,
    /// Free space below which new clones and ingests are refused (`--low-space-threshold`).
    pub low_space_threshold: Option<String>,
    /// Garbage tree nodes per collection step (`--gc-step-nodes N`).
    pub gc_step_nodes: Option<usize>,
    /// The collector's wait between two steps (`--gc-step-pause SPAN`).
    pub gc_step_pause: Option<String>,
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
    /// File of named API tokens with roles: `NAME ROLE TOKEN` per line, ROLE one of reader,
    /// operator, admin; mode 600
    #[arg(long, value_name = "FILE")]
    tokens_file: Option<PathBuf>,
    /// Address for the NBD server [default: 0.0.0.0:10809]
    #[arg(long, value_name = "ADDR")]
    nbd: Option<String>,
    /// Address for the iSCSI target [default: 0.0.0.0:3260]
    #[arg(long, value_name = "ADDR")]
    iscsi: Option<String>,
    /// Metadata engine of a new data directory, or to convert an existing one to (sled, or
    /// one of redb, fjall, rocksdb when built with it) [default: the directory's own; new: redb]
    #[arg(long, value_name = "NAME", env = "FORKD_META_ENGINE")]
    meta_engine: Option<String>,
    /// Directory of hook scripts [default: /etc/forkd/hooks]
    #[arg(long, value_name = "DIR", env = "FORKD_HOOKS_DIR")]
    hooks_dir: Option<PathBuf>,
    /// User hooks run as when the daemon runs as root [default: nobody]
    #[arg(long, value_name = "USER", env = "FORKD_HOOK_USER")]
    hook_user: Option<String>,
    /// How long operation log entries are kept, e.g. 30d, 12h, 90m [default: 30d]
    #[arg(long, value_name = "SPAN", env = "FORKD_LOG_RETENTION")]
    log_retention: Option<String>,
    /// How many operation log entries are kept, the oldest going first [default: 100000]
    #[arg(long, value_name = "N", env = "FORKD_LOG_MAX_ENTRIES")]
    log_max_entries: Option<u64>,
    /// How long before a lease's expiry the lease-expiring hook runs, e.g. 1h [default: 1h]
    #[arg(long, value_name = "SPAN", env = "FORKD_LEASE_WARNING")]
    lease_warning: Option<String>,
    /// How often expired leases are looked for [default: 5s] (tests make it short)
    #[arg(long, value_name = "SPAN", hide = true)]
    lease_tick: Option<String>,
    /// A test aid: read the daemon's "now" from FILE (RFC 3339 or unix ms) at every tick
    #[arg(long, value_name = "FILE", env = "FORKD_CLOCK_FILE", hide = true)]
    clock_file: Option<PathBuf>,
    /// Refuse new clones and ingests below this much free space: a share of the filesystem
    /// (5%), a size (10G), or 0 for none [default: 5%]
    #[arg(long, value_name = "SIZE|PCT", env = "FORKD_LOW_SPACE_THRESHOLD")]
    low_space_threshold: Option<String>,
    /// Garbage tree nodes one step of garbage collection dismantles while it holds the catalog's
    /// lock [default: 64] (tests make it 1, so a collection lasts)
    #[arg(long, value_name = "N", env = "FORKD_GC_STEP_NODES", hide = true)]
    gc_step_nodes: Option<usize>,
    /// How long the garbage collector waits between two steps [default: 0s] (tests make a
    /// collection last)
    #[arg(long, value_name = "SPAN", env = "FORKD_GC_STEP_PAUSE", hide = true)]
    gc_step_pause: Option<String>,
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
            tokens_file: flags.tokens_file,
            meta_engine: flags.meta_engine,
            hooks_dir: flags.hooks_dir,
            hook_user: flags.hook_user,
            log_retention: flags.log_retention,
            log_max_entries: flags.log_max_entries,
            lease_warning: flags.lease_warning,
            lease_tick: flags.lease_tick,
            clock_file: flags.clock_file,
            low_space_threshold: flags.low_space_threshold,
            gc_step_nodes: flags.gc_step_nodes,
            gc_step_pause: flags.gc_step_pause,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_from_config_and_command_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("forkd.toml");
        std::fs::write(&cfg, "token_file = \"/etc/forkd/token\"\n").expect("write");
        let args = ServeArgs { config: Some(cfg), ..ServeArgs::default() };
        assert_eq!(Config::load(&args).expect("load").token_file, Some(PathBuf::from("/etc/forkd/token")));
        let args = ServeArgs { token_file: Some(PathBuf::from("/x")), ..args };
        assert_eq!(Config::load(&args).expect("load").token_file, Some(PathBuf::from("/x")));
    }

    #[test]
    fn log_retention_from_defaults_config_and_command_line() {
        let c = Config::load(&ServeArgs::default()).expect("defaults");
        assert_eq!((c.log_retention.as_str(), c.log_max_entries), ("30d", 100_000));
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("forkd.toml");
        std::fs::write(&cfg, "log_retention = \"12h\"\nlog_max_entries = 50\n").expect("write");
        let args = ServeArgs { config: Some(cfg), ..ServeArgs::default() };
        let c = Config::load(&args).expect("load");
        assert_eq!((c.log_retention.as_str(), c.log_max_entries), ("12h", 50));
        let args = ServeArgs { log_retention: Some("1d".into()), log_max_entries: Some(7), ..args };
        let c = Config::load(&args).expect("load");
        assert_eq!((c.log_retention.as_str(), c.log_max_entries), ("1d", 7));
    }
}
