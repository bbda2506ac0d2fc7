//! `forkd serve`: start-up and shutdown of the daemon (settings: [`super::config`]).
//!
//! On SIGINT or SIGTERM the API stops accepting requests, running ones finish,
//! and the store is flushed before exit.
//!
//! The API token (`token_file`, see [`crate::server::auth`]): required whenever the API listens on
//! anything but a loopback address (the daemon refuses to start without one), optional on
//! loopback, and enforced on every request whenever it is configured.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use super::config::{Config, ServeArgs};
use crate::store::Store;

/// How often the daemon flushes on its own when something was written.
const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Run the daemon until a shutdown signal.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args)?;
    let api: SocketAddr = config
        .api
        .parse()
        .map_err(|_| anyhow::anyhow!("--api {}: not an address such as 127.0.0.1:7480", config.api))?;
    let token = api_token(&config, api)?;
    let iscsi_rules = crate::server::iscsi::access::AccessRules::new(&config.iscsi_access)
        .map_err(|e| anyhow::anyhow!("config: {e:#}"))?;
    let store = Arc::new(Store::open(&config.data_dir)?);
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    rt.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(api).await.with_context(|| format!("cannot listen on {api} for the API"))?;
        let nbd_addr: SocketAddr = config
            .nbd
            .parse()
            .map_err(|_| anyhow::anyhow!("--nbd {}: not an address such as 0.0.0.0:10809", config.nbd))?;
        let nbd_listener = tokio::net::TcpListener::bind(nbd_addr)
            .await
            .with_context(|| format!("cannot listen on {nbd_addr} for NBD"))?;
        let iscsi_addr: SocketAddr = config
            .iscsi
            .parse()
            .map_err(|_| anyhow::anyhow!("--iscsi {}: not an address such as 0.0.0.0:3260", config.iscsi))?;
        let iscsi_listener = tokio::net::TcpListener::bind(iscsi_addr)
            .await
            .with_context(|| format!("cannot listen on {iscsi_addr} for iSCSI"))?;
        if iscsi_rules.is_open() && !iscsi_addr.ip().is_loopback() {
            tracing::warn!(
                iscsi = %iscsi_addr,
                "iSCSI targets are open to every initiator on the network (no CHAP, no allow-list): \
                 see [iscsi_access] in docs/iscsi.md"
            );
        }
        tracing::info!(
            api = %listener.local_addr()?,
            nbd = %nbd_listener.local_addr()?,
            iscsi = %iscsi_listener.local_addr()?,
            data_dir = %config.data_dir.display(),
            token = token.is_some(),
            "forkd serving"
        );
        let shutdown = tokio_util::sync::CancellationToken::new();
        let nbd = tokio::spawn(crate::server::nbd::serve(
            nbd_listener,
            store.clone(),
            crate::server::nbd::NbdConfig::default(),
            shutdown.clone(),
        ));
        let iscsi =
            tokio::spawn(crate::server::iscsi::serve(iscsi_listener, store.clone(), iscsi_rules, shutdown.clone()));
        // Like a filesystem's commit interval: writes of clients that never flush become
        // durable within FLUSH_INTERVAL, and the slots they freed become reusable.
        let periodic = {
            let (store, stop) = (store.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(FLUSH_INTERVAL);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let s = store.clone();
                    match tokio::task::spawn_blocking(move || s.flush_if_needed()).await {
                        Ok(Err(e)) => tracing::warn!(error = %e, "periodic flush failed"),
                        Err(e) => tracing::warn!(error = %e, "periodic flush task failed"),
                        Ok(Ok(_)) => {}
                    }
                }
            })
        };
        let signal = shutdown.clone();
        let app = crate::server::http::router(store.clone(), token).into_make_service_with_connect_info::<SocketAddr>();
        let api_result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                signal.cancel();
            })
            .await
            .context("API server failed");
        shutdown.cancel();
        let _ = nbd.await;
        let _ = iscsi.await;
        let _ = periodic.await;
        api_result
    })?;
    store.flush().context("final flush")?;
    tracing::info!("forkd stopped cleanly");
    Ok(())
}

/// The API token from `config.token_file`; refuses to go on without one when `api` is not a
/// loopback address.
fn api_token(config: &Config, api: SocketAddr) -> anyhow::Result<Option<Arc<crate::server::auth::Token>>> {
    match &config.token_file {
        Some(p) => Ok(Some(Arc::new(crate::server::auth::Token::from_file(p)?))),
        None if api.ip().is_loopback() => Ok(None),
        None => Err(anyhow::anyhow!(
            "the API address {api} is reachable from other hosts, so it needs a token: give --token-file FILE \
             (or token_file in the config), or listen on 127.0.0.1"
        )),
    }
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
        assert!(t.matches(b"0123456789abcdef0123456789abcdef"));
        assert!(api_token(&c, addr("127.0.0.1:7480")).expect("loopback with token").is_some());
        std::fs::write(&p, "tooshort\n").expect("write");
        let err = api_token(&c, addr("127.0.0.1:7480")).expect_err("short").to_string();
        assert!(err.contains("at least 16"), "{err}");
    }
}
