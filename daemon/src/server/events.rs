//! The hook events of operations: which script runs, with which `FORKD_*` variables, and what
//! its outcome means for the operation (PRODUCT.md, "Hook events").
//!
//! An operation asks [`Events::fire`] at each of its events. The hook set on the volume for
//! that event (see `catalog::hooks`) runs through the [`HookRunner`]; with none set, nothing
//! runs. A run that does not exit 0 in time, or a script refused at run time (gone, no longer
//! executable, writable by others), is a [`HookFailed`]: `pre-*`, `configure-clone` and `mask`
//! callers abort on it and undo what they did; `post-*` callers only report it, their
//! operation having succeeded. Every run is counted in `forkd_hook_runs_total{event,result}`
//! and `forkd_hook_duration_seconds{event}` and written to the operation log.
//!
//! Variables: `FORKD_EVENT`, `FORKD_VOLUME`, `FORKD_SNAPSHOT`, `FORKD_ORIGIN`, and where hosts
//! (or, for a volume only the hook may reach, the hook alone) attach it: `FORKD_NBD_URI`,
//! `FORKD_ISCSI_TARGET`, `FORKD_ISCSI_PORTAL`. An environment's operation runs the
//! environment's hooks with `FORKD_ENV` and, per member M (upper-cased, other characters as
//! `_`), `FORKD_M_VOLUME`, `FORKD_M_NBD_URI`, `FORKD_M_ISCSI_TARGET`; its `FORKD_VOLUME` is
//! empty. Listener addresses bound to every interface are given as loopback: hooks run on the
//! daemon's host.

use std::path::PathBuf;
use std::time::Duration;

use crate::server::hooks::{HookError, HookRun, HookRunner};
use crate::server::iscsi::access::target_name;
use crate::store::Store;

/// An operation's hook failed (or could not run): the operation stops here.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HookFailed(pub String);

/// What a hook is told about the operation.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The volume acted on.
    pub volume: String,
    /// The snapshot involved (taken, targeted, or masked), if any.
    pub snapshot: Option<String>,
    /// The snapshot the volume derives from, if any.
    pub origin: Option<String>,
    /// The export name to reach the volume by, when it differs from the volume's name (a
    /// hook-only capability name).
    pub export: Option<String>,
    /// The environment acted on, for an environment's operation (its hooks run, and
    /// `FORKD_ENV` and the members' variables are set).
    pub env: Option<String>,
    /// The environment's members.
    pub members: Vec<Member>,
}

/// An environment member as its hooks see it.
#[derive(Debug, Clone, Default)]
pub struct Member {
    /// The member's name in the environment (`db`).
    pub name: String,
    /// Its volume (`dev.db`).
    pub volume: String,
    /// The export name to reach it by (the volume's, or a hook-only capability name).
    pub export: String,
}

impl Facts {
    /// Whose hooks run: the environment's, else the volume's.
    pub fn owner(&self) -> &str {
        self.env.as_deref().unwrap_or(&self.volume)
    }
}

/// Hooks of this daemon: the runner and the addresses hooks attach volumes at.
#[derive(Debug)]
pub struct Events {
    runner: HookRunner,
    nbd: String,
    iscsi: String,
}

impl Events {
    /// Hooks run by `runner`; `nbd` and `iscsi` are the listeners' bound addresses.
    pub fn new(runner: HookRunner, nbd: std::net::SocketAddr, iscsi: std::net::SocketAddr) -> Events {
        Events { runner, nbd: reachable(nbd), iscsi: reachable(iscsi) }
    }

    /// Check a script before it is set (again at every run).
    pub fn check(&self, script: &str) -> Result<PathBuf, HookError> {
        self.runner.resolve(script)
    }

    /// Run the hook set for `event` on the operation's volume or environment, if one is set.
    pub fn fire(&self, store: &Store, event: &str, facts: &Facts) -> Result<Option<HookRun>, HookFailed> {
        let Some(setting) = store.catalog().hook(facts.owner(), event).cloned() else {
            return Ok(None);
        };
        let timeout = Duration::from_secs(setting.timeout_secs);
        self.run(store, event, &setting.script, timeout, facts).map(Some)
    }

    /// Run `script` for `event` (the `mask` hook names its script itself).
    pub fn run(
        &self,
        store: &Store,
        event: &str,
        script: &str,
        timeout: Duration,
        facts: &Facts,
    ) -> Result<HookRun, HookFailed> {
        let vars = self.variables(event, facts);
        let what = format!("the {event} hook `{script}` of `{}`", facts.owner());
        let at = crate::store::now_ms();
        let run = match self.runner.run(script, &vars, timeout) {
            Ok(run) => run,
            Err(e) => {
                store.metrics.hook_runs.with_label_values(&[event, "refused"]).inc();
                tracing::warn!(event, owner = facts.owner(), error = %e, "hook refused");
                let failed = HookFailed(format!("{what} could not run: {e}"));
                store.log_operation(log_entry(at, event, facts, script, None, Some(&failed)));
                return Err(failed);
            }
        };
        let result = match (run.succeeded(), run.timed_out) {
            (true, _) => "ok",
            (false, true) => "timeout",
            (false, false) => "failed",
        };
        store.metrics.hook_runs.with_label_values(&[event, result]).inc();
        store.metrics.hook_seconds.with_label_values(&[event]).observe(run.duration_ms as f64 / 1000.0);
        tracing::info!(event, owner = facts.owner(), script, result, ms = run.duration_ms, "hook ran");
        let failed = (!run.succeeded()).then(|| {
            let last = run.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
            let last: String = last.chars().take(300).collect();
            let said = if last.is_empty() { String::new() } else { format!(": {last}") };
            HookFailed(format!("{what} {}{said}", run.outcome()))
        });
        store.log_operation(log_entry(at, event, facts, script, Some(&run), failed.as_ref()));
        match failed {
            None => Ok(run),
            Some(f) => Err(f),
        }
    }

    /// The `FORKD_*` variables of one run.
    fn variables(&self, event: &str, f: &Facts) -> Vec<(String, String)> {
        let export = f.export.clone().unwrap_or_else(|| f.volume.clone());
        let mut vars = vec![
            ("FORKD_EVENT".to_string(), event.to_string()),
            ("FORKD_VOLUME".to_string(), f.volume.clone()),
            ("FORKD_SNAPSHOT".to_string(), f.snapshot.clone().unwrap_or_default()),
            ("FORKD_ORIGIN".to_string(), f.origin.clone().unwrap_or_default()),
            ("FORKD_NBD_URI".to_string(), self.nbd_uri(&export)),
            ("FORKD_ISCSI_TARGET".to_string(), target_name(&export)),
            ("FORKD_ISCSI_PORTAL".to_string(), self.iscsi.clone()),
        ];
        if let Some(env) = &f.env {
            vars.push(("FORKD_ENV".to_string(), env.clone()));
        }
        for m in &f.members {
            let key: String =
                m.name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
            vars.push((format!("FORKD_{key}_VOLUME"), m.volume.clone()));
            vars.push((format!("FORKD_{key}_NBD_URI"), self.nbd_uri(&m.export)));
            vars.push((format!("FORKD_{key}_ISCSI_TARGET"), target_name(&m.export)));
        }
        vars
    }

    /// The NBD URI of `export` on this daemon.
    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.nbd)
    }

    /// The iSCSI portal hooks reach.
    pub fn iscsi_portal(&self) -> &str {
        &self.iscsi
    }
}

/// Bytes of each output stream a log entry keeps (the runner keeps more; the log is for people).
const LOGGED_OUTPUT: usize = 4096;

/// The operation log's entry for one hook run (or one refused before it ran).
fn log_entry(
    at: i64,
    event: &str,
    facts: &Facts,
    script: &str,
    run: Option<&HookRun>,
    failed: Option<&HookFailed>,
) -> catalog::LogEntry {
    let detail = match run {
        Some(r) => format!(
            "script {script} {}; stdout: {}; stderr: {}{}",
            r.outcome(),
            clip(&r.stdout),
            clip(&r.stderr),
            if r.dropped_bytes > 0 {
                format!(" ({} more bytes of output dropped)", r.dropped_bytes)
            } else {
                String::new()
            }
        ),
        None => format!("script {script} was refused"),
    };
    catalog::LogEntry {
        at,
        who: "hook".into(),
        what: format!("hook {event}"),
        target: Some(facts.owner().to_string()),
        duration_ms: run.map_or(0, |r| r.duration_ms),
        result: if failed.is_some() { "failed" } else { "ok" }.into(),
        error: failed.map(|f| f.0.clone()),
        detail: Some(detail),
        ..catalog::LogEntry::default()
    }
}

/// The first [`LOGGED_OUTPUT`] bytes of `text` (on a character boundary), trimmed.
fn clip(text: &str) -> String {
    let mut end = text.len().min(LOGGED_OUTPUT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let more = if end < text.len() { " [...]" } else { "" };
    format!("{:?}{more}", text[..end].trim_end())
}

/// `addr` as a hook on this host reaches it: an unspecified address becomes loopback.
fn reachable(addr: std::net::SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, addr.port()).to_string()
}
