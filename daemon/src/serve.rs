//! `forkd serve`: configuration, start-up and shutdown of the daemon.
//!
//! Settings come from built-in defaults, then the TOML file given with `--config`, then the
//! command line. On SIGINT or SIGTERM the API stops accepting requests, running ones finish,
//! and the store is flushed before exit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;

use crate::cli::ServeArgs;
use crate::store::Store;

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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./forkd-data"),
            api: "127.0.0.1:7480".into(),
            nbd: "0.0.0.0:10809".into(),
            iscsi: "0.0.0.0:3260".into(),
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
        Ok(c)
    }

    fn from_file(p: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read config {}", p.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {}", p.display(), e.message()))
    }
}

/// Run the daemon until a shutdown signal.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args)?;
    let api: SocketAddr = config
        .api
        .parse()
        .map_err(|_| anyhow::anyhow!("--api {}: not an address such as 127.0.0.1:7480", config.api))?;
    let store = Arc::new(Store::open(&config.data_dir)?);
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    rt.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(api).await.with_context(|| format!("cannot listen on {api} for the API"))?;
        if !api.ip().is_loopback() {
            tracing::warn!(%api, "the API is reachable from other hosts and has no authentication yet");
        }
        let nbd_addr: SocketAddr = config
            .nbd
            .parse()
            .map_err(|_| anyhow::anyhow!("--nbd {}: not an address such as 0.0.0.0:10809", config.nbd))?;
        let nbd_listener = tokio::net::TcpListener::bind(nbd_addr)
            .await
            .with_context(|| format!("cannot listen on {nbd_addr} for NBD"))?;
        tracing::info!(
            api = %listener.local_addr()?,
            nbd = %nbd_listener.local_addr()?,
            data_dir = %config.data_dir.display(),
            "forkd serving (iSCSI {} is not served by this build yet)",
            config.iscsi
        );
        let shutdown = tokio_util::sync::CancellationToken::new();
        let nbd = tokio::spawn(crate::nbd_server::serve(
            nbd_listener,
            store.clone(),
            crate::nbd_server::NbdConfig::default(),
            shutdown.clone(),
        ));
        let signal = shutdown.clone();
        let api_result = axum::serve(listener, crate::api::router(store.clone()))
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                signal.cancel();
            })
            .await
            .context("API server failed");
        shutdown.cancel();
        let _ = nbd.await;
        api_result
    })?;
    store.flush().context("final flush")?;
    tracing::info!("forkd stopped cleanly");
    Ok(())
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
