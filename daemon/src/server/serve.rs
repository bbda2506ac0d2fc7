//! `forkd serve`: start-up and shutdown of the daemon (settings: [`super::config`]).
//!
//! Start-up, in order: the sockets systemd passed are taken (socket activation, see
//! [`crate::server::systemd`]), every setting is checked ([`Plan`]), the store is opened, the
//! three listeners are bound or taken from systemd by name ([`Listeners`]), systemd is told
//! `READY=1` (with a `STATUS=` line at each step before), then the NBD and iSCSI listeners, the periodic flush, the
//! garbage collector ([`crate::server::collector`]), the lease reaper ([`crate::server::leases`]),
//! the scheduler ([`crate::server::scheduler`], which reaches the API at its bound address) and
//! the HTTP API run until SIGINT or SIGTERM. The collector stops between two steps; what it
//! leaves waits in the durable garbage queue for the next start.
//!
//! Shutdown: the API stops accepting requests and running ones finish (a running scrub stops at
//! its next batch, a schedule's run before its next step); every NBD and iSCSI connection is told to stop, answers what it had
//! received and closes, and both listeners wait for all of them (threads joined; bounded by [`crate::server::listener::DRAIN_TIMEOUT`]);
//! only then is the store flushed, so every write acknowledged before the exit is durable.
//! systemd hears `STOPPING=1` when the signal comes. While the daemon serves, each round of the
//! periodic flush reports to the watchdog's [`Health`]: keep-alives stop when a round fails or
//! hangs, so systemd restarts a daemon whose store no longer flushes.
//!
//! The API token (`token_file`, see [`crate::server::auth`]): required whenever the API listens on
//! anything but a loopback address (the daemon refuses to start without one), optional on
//! loopback, and enforced on every request whenever it is configured.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::config::{Config, ServeArgs};
use crate::server::auth::{Token, Tokens};
use crate::server::clock::Clock;
use crate::server::events::Events;
use crate::server::hooks::HookRunner;
use crate::server::iscsi::access::AccessRules;
use crate::server::leases::Reaper;
use crate::server::listener::Limits;
use crate::server::replication::Replicator;
use crate::server::roles::Role;
use crate::server::scheduler::{IngestRunner, Scheduler};
use crate::server::systemd::{Activated, Health, Notifier};
use crate::server::{iscsi, nbd};
use crate::store::Store;

/// How often the daemon flushes on its own when something was written.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Run the daemon until a shutdown signal.
/// `ingest` runs a schedule's ingest steps (the agent's run; see [`IngestRunner`]).
pub fn run(args: &ServeArgs, ingest: IngestRunner) -> anyhow::Result<()> {
    // Taken first: the descriptors systemd passed are this process's before anything opens files.
    let activated = Activated::from_env()?;
    let notifier = Arc::new(Notifier::from_env());
    let plan = Plan::new(&Config::load(args)?)?;
    notifier.status("opening the store");
    let store = Arc::new(Store::open_with(&plan.data_dir, plan.meta_engine)?);
    store.set_log_retention(plan.log_retention);
    store.set_low_space_threshold(plan.low_space_threshold);
    store.set_gc_step_nodes(plan.gc.step_nodes);
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    rt.block_on(serve(plan, store.clone(), ingest, Systemd { notifier: notifier.clone(), activated }))?;
    // The listeners have drained (every connection ended, or the drain's bound passed with a
    // warning): what was acknowledged before now is made durable here.
    notifier.status("stopping: final flush");
    store.flush().context("final flush")?;
    tracing::info!("forkd stopped cleanly");
    Ok(())
}

/// The settings, checked before anything starts.
struct Plan {
    data_dir: PathBuf,
    api: SocketAddr,
    nbd: SocketAddr,
    iscsi: SocketAddr,
    token: Option<Arc<Tokens>>,
    iscsi_rules: AccessRules,
    nbd_limits: Limits,
    iscsi_limits: Limits,
    meta_engine: Option<crate::store::MetaEngine>,
    hooks: HookRunner,
    log_retention: catalog::LogRetention,
    leases: LeaseSettings,
    low_space_threshold: crate::store::pool::Threshold,
    gc: GcSettings,
}

impl Plan {
    fn new(config: &Config) -> anyhow::Result<Plan> {
        let api = address(&config.api, "--api", "127.0.0.1:7480")?;
        Ok(Plan {
            data_dir: config.data_dir.clone(),
            api,
            token: api_token(config, api)?,
            iscsi_rules: AccessRules::new(&config.iscsi_access).map_err(|e| anyhow::anyhow!("config: {e:#}"))?,
            nbd: address(&config.nbd, "--nbd", "0.0.0.0:10809")?,
            iscsi: address(&config.iscsi, "--iscsi", "0.0.0.0:3260")?,
            nbd_limits: config.nbd_limits.resolve(nbd::DEFAULT_LIMITS, "nbd_limits")?,
            iscsi_limits: config.iscsi_limits.resolve(iscsi::DEFAULT_LIMITS, "iscsi_limits")?,
            meta_engine: config.meta_engine.as_deref().map(meta_engine).transpose()?,
            hooks: HookRunner::new(&config.hooks_dir, config.hook_user.as_deref())
                .map_err(|e| anyhow::anyhow!("config: {e}"))?,
            log_retention: log_retention(config)?,
            leases: lease_settings(config)?,
            low_space_threshold: crate::store::pool::Threshold::parse(&config.low_space_threshold)
                .map_err(|e| anyhow::anyhow!("config: {e}"))?,
            gc: gc_settings(config)?,
        })
    }
}

fn meta_engine(name: &str) -> anyhow::Result<crate::store::MetaEngine> {
    use crate::store::MetaEngine;
    let built: Vec<&str> = MetaEngine::ALL.into_iter().filter(|e| e.is_built()).map(MetaEngine::name).collect();
    match MetaEngine::from_name(name) {
        Some(e) if e.is_built() => Ok(e),
        Some(e) => anyhow::bail!("--meta-engine {e}: this forkd was built without it (built: {})", built.join(", ")),
        None => anyhow::bail!("--meta-engine {name}: unknown engine (built: {})", built.join(", ")),
    }
}

/// The operation log's retention from `log_retention` and `log_max_entries`.
fn log_retention(config: &Config) -> anyhow::Result<catalog::LogRetention> {
    let span = &config.log_retention;
    let max_age_ms = catalog::parse_span(span)
        .filter(|&ms| ms > 0)
        .ok_or_else(|| anyhow::anyhow!("log_retention {span}: not a span such as 30d, 12h or 90m"))?;
    if config.log_max_entries == 0 {
        anyhow::bail!("log_max_entries 0: keep at least 1 entry");
    }
    Ok(catalog::LogRetention { max_age_ms, max_entries: config.log_max_entries })
}

/// The lease reaper's settings and the daemon's clock.
struct LeaseSettings {
    warning_ms: u64,
    tick: std::time::Duration,
    clock: Arc<Clock>,
}

/// `lease_warning`, `lease_tick` and `clock_file`, checked.
fn lease_settings(config: &Config) -> anyhow::Result<LeaseSettings> {
    let span = |key: &str, text: &str| {
        catalog::parse_span(text).ok_or_else(|| anyhow::anyhow!("{key} {text}: not a span such as 1h, 5s or 200ms"))
    };
    let tick = span("lease_tick", &config.lease_tick)?;
    if tick == 0 {
        anyhow::bail!("lease_tick {}: give a positive span such as 5s", config.lease_tick);
    }
    let clock = match &config.clock_file {
        Some(f) => {
            tracing::warn!(file = %f.display(), "the daemon's time is read from a clock file (a test aid)");
            Clock::from_file(f)
        }
        None => Clock::system(),
    };
    Ok(LeaseSettings {
        warning_ms: span("lease_warning", &config.lease_warning)?,
        tick: std::time::Duration::from_millis(tick),
        clock: Arc::new(clock),
    })
}

/// How the garbage collector steps.
struct GcSettings {
    /// Nodes per step.
    step_nodes: usize,
    /// Wait between two steps.
    pause: std::time::Duration,
}

/// `gc_step_nodes` and `gc_step_pause`, checked.
fn gc_settings(config: &Config) -> anyhow::Result<GcSettings> {
    if config.gc_step_nodes == 0 {
        anyhow::bail!("gc_step_nodes 0: a step dismantles at least 1 node");
    }
    let pause = catalog::parse_span(&config.gc_step_pause)
        .ok_or_else(|| anyhow::anyhow!("gc_step_pause {}: not a span such as 0s or 5ms", config.gc_step_pause))?;
    Ok(GcSettings { step_nodes: config.gc_step_nodes, pause: std::time::Duration::from_millis(pause) })
}

fn address(value: &str, flag: &str, example: &str) -> anyhow::Result<SocketAddr> {
    value.parse().map_err(|_| anyhow::anyhow!("{flag} {value}: not an address such as {example}"))
}

/// What systemd gave the daemon: where to notify, and the sockets of socket activation.
struct Systemd {
    notifier: Arc<Notifier>,
    activated: Activated,
}

/// The three bound listeners.
struct Listeners {
    api: TcpListener,
    nbd: TcpListener,
    iscsi: TcpListener,
}

impl Listeners {
    /// Each listener from the socket systemd passed under its name (`api`, `nbd`, `iscsi`),
    /// else bound to its configured address. An API socket from systemd off loopback needs
    /// the token as a configured one does.
    async fn bind(plan: &Plan, activated: &mut Activated) -> anyhow::Result<Listeners> {
        let mut bind = |name: &'static str, addr: SocketAddr, what: &'static str| {
            let passed = activated.take(name);
            async move {
                match passed? {
                    Some(l) => TcpListener::from_std(l).with_context(|| format!("the {name} socket from systemd")),
                    None => {
                        TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} for {what}"))
                    }
                }
            }
        };
        let listeners = Listeners {
            api: bind("api", plan.api, "the API").await?,
            nbd: bind("nbd", plan.nbd, "NBD").await?,
            iscsi: bind("iscsi", plan.iscsi, "iSCSI").await?,
        };
        let extra = activated.left_over();
        if !extra.is_empty() {
            anyhow::bail!("socket activation: more than one socket named {}", extra.join(", "));
        }
        let api = listeners.api.local_addr()?;
        if plan.token.is_none() && !api.ip().is_loopback() {
            return Err(token_needed(api));
        }
        Ok(listeners)
    }

    /// The start-up log line (tests read the ports from it), and the open-target warning.
    fn announce(&self, plan: &Plan) -> anyhow::Result<()> {
        let iscsi = self.iscsi.local_addr()?;
        if plan.iscsi_rules.is_open() && !iscsi.ip().is_loopback() {
            tracing::warn!(
                %iscsi,
                "iSCSI targets are open to every initiator on the network (no CHAP, no allow-list): \
                 see [iscsi_access] in docs/iscsi.md"
            );
        }
        tracing::info!(
            api = %self.api.local_addr()?,
            nbd = %self.nbd.local_addr()?,
            iscsi = %self.iscsi.local_addr()?,
            data_dir = %plan.data_dir.display(),
            token = plan.token.is_some(),
            "forkd serving"
        );
        Ok(())
    }
}

/// Serve until a shutdown signal, then wait for every listener and connection to end.
async fn serve(plan: Plan, store: Arc<Store>, ingest: IngestRunner, mut systemd: Systemd) -> anyhow::Result<()> {
    systemd.notifier.status("binding the listeners");
    let listeners = Listeners::bind(&plan, &mut systemd.activated).await?;
    listeners.announce(&plan)?;
    let (nbd_addr, iscsi_addr) = (listeners.nbd.local_addr()?, listeners.iscsi.local_addr()?);
    let shutdown = CancellationToken::new();
    let health = Arc::new(Health::default());
    let nbd_cfg = nbd::NbdConfig::default();
    let nbd = tokio::spawn(nbd::serve(listeners.nbd, store.clone(), nbd_cfg, plan.nbd_limits, shutdown.clone()));
    let iscsi = tokio::spawn(iscsi::serve(
        listeners.iscsi,
        store.clone(),
        plan.iscsi_rules,
        plan.iscsi_limits,
        shutdown.clone(),
    ));
    let periodic = tokio::spawn(periodic_flush(store.clone(), health.clone(), shutdown.clone()));
    let ticks = (FLUSH_INTERVAL, plan.gc.pause);
    let collector = tokio::spawn(crate::server::collector::run(store.clone(), ticks, shutdown.clone()));
    let events = Arc::new(Events::new(plan.hooks, nbd_addr, iscsi_addr));
    let clock = plan.leases.clock.clone();
    let reaper = Arc::new(Reaper::new(store.clone(), events.clone(), clock.clone(), plan.leases.warning_ms));
    let reaper = tokio::spawn(reaper.run(plan.leases.tick, shutdown.clone()));
    let own_api =
        (own_api_url(listeners.api.local_addr()?), plan.token.as_ref().and_then(|t| t.text_for(Role::Operator)));
    let scheduler =
        Arc::new(Scheduler::new(store.clone(), events.clone(), clock.clone(), own_api, ingest, shutdown.clone()));
    let schedules = tokio::spawn(scheduler.clone().run(plan.leases.tick));
    let replicator = Replicator::new(store.clone(), shutdown.clone());
    replicator.resume_kept();
    let api = Api { token: plan.token, events, clock, scheduler, replicator };
    let api_addr = listeners.api.local_addr()?;
    systemd.notifier.notify(&format!("READY=1\nSTATUS=serving: api {api_addr}, nbd {nbd_addr}, iscsi {iscsi_addr}"));
    let watchdog = crate::server::systemd::watchdog_interval().map(|every| {
        tokio::spawn(crate::server::systemd::keep_alive(systemd.notifier.clone(), health, every, shutdown.clone()))
    });
    let api_result = serve_api(listeners.api, store, api, systemd.notifier.clone(), shutdown.clone()).await;
    shutdown.cancel();
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    let tasks = [
        ("NBD listener", nbd),
        ("iSCSI listener", iscsi),
        ("periodic flush", periodic),
        ("garbage collector", collector),
        ("lease reaper", reaper),
        ("scheduler", schedules),
    ];
    for (what, task) in tasks {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "the {what} failed");
        }
    }
    api_result
}

/// The daemon's own API as a client reaches it: a wildcard address becomes loopback.
fn own_api_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// What the API's handlers share besides the store.
struct Api {
    token: Option<Arc<Tokens>>,
    events: Arc<Events>,
    clock: Arc<Clock>,
    scheduler: Arc<Scheduler>,
    replicator: Arc<Replicator>,
}

/// The HTTP API until a shutdown signal (which it passes on to `shutdown`).
async fn serve_api(
    listener: TcpListener,
    store: Arc<Store>,
    api: Api,
    notifier: Arc<Notifier>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app =
        crate::server::http::router(store.clone(), api.token, api.events, api.clock, api.scheduler, api.replicator)
            .into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            notifier.notify("STOPPING=1\nSTATUS=stopping: draining connections");
            shutdown.cancel();
            // A scrub can take hours: it stops (answering 503) so the API can drain.
            store.stop_scrub();
        })
        .await
        .context("API server failed")
}

/// Like a filesystem's commit interval: writes of clients that never flush become durable
/// within [`FLUSH_INTERVAL`], and the slots they freed become reusable. The same tick runs
/// the metadata upkeep ([`Store::maintain`]).
/// Each round's outcome goes to `health` (the watchdog's keep-alives follow it).
async fn periodic_flush(store: Arc<Store>, health: Arc<Health>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let s = store.clone();
        health.round_started();
        let ok = match tokio::task::spawn_blocking(move || s.flush_if_needed().and_then(|_| s.maintain())).await {
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "periodic flush or metadata upkeep failed");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "periodic flush task failed");
                false
            }
            Ok(Ok(_)) => true,
        };
        health.round_ended(ok);
    }
}

/// The API's tokens: the shared one of `config.token_file` (named `token`, role admin) and the
/// named ones of `config.tokens_file`; refuses to go on without any when `api` is not a
/// loopback address.
fn api_token(config: &Config, api: SocketAddr) -> anyhow::Result<Option<Arc<Tokens>>> {
    let mut tokens = Vec::new();
    if let Some(p) = &config.token_file {
        tokens.extend(Tokens::single(Token::from_file(p)?).0);
    }
    if let Some(p) = &config.tokens_file {
        tokens.extend(crate::server::roles::load(p)?);
    }
    match tokens.is_empty() {
        false => Ok(Some(Arc::new(Tokens(tokens)))),
        true if api.ip().is_loopback() => Ok(None),
        true => Err(token_needed(api)),
    }
}

/// The refusal of an API off loopback without a token.
fn token_needed(api: SocketAddr) -> anyhow::Error {
    anyhow::anyhow!(
        "the API address {api} is reachable from other hosts, so it needs a token: give --token-file FILE \
         or --tokens-file FILE (or token_file, tokens_file in the config), or listen on 127.0.0.1"
    )
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn log_retention_is_checked() {
        let r = log_retention(&Config::default()).expect("defaults");
        assert_eq!((r.max_age_ms, r.max_entries), (30 * 86_400_000, 100_000));
        for (span, max) in [("3x", 10), ("0d", 10), ("30d", 0)] {
            let c = Config { log_retention: span.into(), log_max_entries: max, ..Config::default() };
            let err = log_retention(&c).expect_err(span).to_string();
            assert!(err.starts_with("log_"), "{err}");
        }
    }

    #[test]
    fn lease_settings_are_checked() {
        let s = lease_settings(&Config::default()).expect("defaults");
        assert_eq!((s.warning_ms, s.tick), (3_600_000, std::time::Duration::from_secs(5)));
        assert!(s.clock.file().is_none());
        for (warning, tick) in [("1x", "5s"), ("1h", "0s"), ("1h", "soon")] {
            let c = Config { lease_warning: warning.into(), lease_tick: tick.into(), ..Config::default() };
            let err = lease_settings(&c).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.starts_with("lease_"), "{warning} {tick}: {err}");
        }
    }

    #[test]
    fn token_required_off_loopback() {
        let c = Config::default();
        assert!(api_token(&c, addr("127.0.0.1:7480")).expect("loopback").is_none());
        assert!(api_token(&c, addr("[::1]:7480")).expect("loopback v6").is_none());
        for a in ["0.0.0.0:7480", "[::]:7480", "192.0.2.1:7480"] {
            let err = api_token(&c, addr(a)).expect_err(a).to_string();
            assert!(err.contains("needs a token") && err.contains("--token-file"), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }

    #[test]
    fn token_file_is_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("token");
        std::fs::write(&p, "0123456789abcdef0123456789abcdef\n").expect("write");
        let c = Config { token_file: Some(p.clone()), ..Config::default() };
        let t = api_token(&c, addr("0.0.0.0:7480")).expect("remote with token").expect("token");
        assert!(t.find(b"0123456789abcdef0123456789abcdef").is_some());
        assert!(api_token(&c, addr("127.0.0.1:7480")).expect("loopback with token").is_some());
        std::fs::write(&p, "tooshort\n").expect("write");
        let err = api_token(&c, addr("127.0.0.1:7480")).expect_err("short").to_string();
        assert!(err.contains("at least 16"), "{err}");
    }
}
