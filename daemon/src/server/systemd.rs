//! systemd integration, written here because the build is offline and neither `sd-notify` nor
//! `libsystemd` is in its registry (both protocols are a few lines):
//!
//! - the notify protocol (sd_notify(3)): [`Notifier`] sends `READY=1`, `STATUS=...`,
//!   `STOPPING=1` and `WATCHDOG=1` as datagrams to `NOTIFY_SOCKET` (a path, or an abstract
//!   socket when it starts with `@`); without `NOTIFY_SOCKET` it does nothing;
//! - the watchdog: [`watchdog_interval`] (half of `WATCHDOG_USEC`, when `WATCHDOG_PID` is unset
//!   or this process) and [`keep_alive`], which sends `WATCHDOG=1` only while [`Health`] says
//!   the store is healthy: the periodic flush's last round succeeded and no round has been
//!   running for longer than the watchdog's timeout;
//! - socket activation (sd_listen_fds(3)): [`Activated::from_env`] takes the listening sockets
//!   systemd passed (`LISTEN_PID` must be this process, `LISTEN_FDS` of them from fd 3 on,
//!   named by `LISTEN_FDNAMES`), and [`Activated::take`] hands each one out by name (`api`,
//!   `nbd`, `iscsi`). Taking ownership of an inherited descriptor has no safe interface, so
//!   [`adopt`] holds the crate's only unsafe code outside the io_uring engine.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Where notifications go: `NOTIFY_SOCKET`, or nowhere.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// A notifier for `NOTIFY_SOCKET`; one that does nothing when it is unset, empty or
    /// unusable (then with a warning).
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|p| !p.is_empty()) else {
            return Notifier { target: None };
        };
        match Self::open(&path) {
            Ok(target) => Notifier { target: Some(target) },
            Err(e) => {
                tracing::warn!(socket = ?path, error = %e, "NOTIFY_SOCKET is not usable: systemd will not hear from forkd");
                Notifier { target: None }
            }
        }
    }

    fn open(path: &std::ffi::OsStr) -> std::io::Result<(UnixDatagram, std::os::unix::net::SocketAddr)> {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
            None => std::os::unix::net::SocketAddr::from_pathname(path)?,
        };
        Ok((UnixDatagram::unbound()?, addr))
    }

    /// Send `state` (newline-separated `KEY=VALUE` assignments); failures are logged only.
    pub fn notify(&self, state: &str) {
        if let Some((socket, addr)) = &self.target {
            if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
                tracing::warn!(error = %e, state, "cannot notify systemd");
            }
        }
    }

    /// `STATUS=text`: what `systemctl status` shows.
    pub fn status(&self, text: &str) {
        self.notify(&format!("STATUS={text}"));
    }
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when it is set (and
/// `WATCHDOG_PID`, if set, is this process).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().filter(|p| !p.is_empty()) {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// The store's health as the periodic flush sees it.
#[derive(Debug)]
pub struct Health {
    state: parking_lot::Mutex<HealthState>,
}

#[derive(Debug)]
struct HealthState {
    /// Whether the last finished round succeeded (true before the first).
    last_ok: bool,
    /// When the round now running began.
    running_since: Option<Instant>,
}

impl Default for Health {
    fn default() -> Self {
        Health { state: parking_lot::Mutex::new(HealthState { last_ok: true, running_since: None }) }
    }
}

impl Health {
    /// A round of the periodic flush begins.
    pub fn round_started(&self) {
        self.state.lock().running_since = Some(Instant::now());
    }

    /// A round of the periodic flush ended, with success or not.
    pub fn round_ended(&self, ok: bool) {
        let mut s = self.state.lock();
        s.last_ok = ok;
        s.running_since = None;
    }

    /// Healthy: the last round succeeded and the one running (if any) has run for less than
    /// `stuck_after`.
    pub fn healthy(&self, stuck_after: Duration) -> bool {
        let s = self.state.lock();
        s.last_ok && s.running_since.is_none_or(|t| t.elapsed() < stuck_after)
    }
}

/// Send `WATCHDOG=1` every `interval` while `health` is healthy, until `stop`. A round stuck
/// for twice `interval` (the watchdog's whole timeout) counts as unhealthy.
pub async fn keep_alive(notifier: Arc<Notifier>, health: Arc<Health>, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    let mut was_healthy = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let healthy = health.healthy(interval * 2);
        if healthy {
            notifier.notify("WATCHDOG=1");
        } else if was_healthy {
            tracing::error!(
                "the periodic flush is failing or stuck: no more watchdog keep-alives, systemd will restart forkd"
            );
        }
        was_healthy = healthy;
    }
}

/// The listening sockets systemd passed, by name.
#[derive(Debug, Default)]
pub struct Activated {
    fds: Vec<(String, OwnedFd)>,
}

impl Activated {
    /// The sockets of `LISTEN_FDS` when `LISTEN_PID` is this process; none otherwise. Every
    /// one must be named (`LISTEN_FDNAMES`, systemd's `FileDescriptorName=`) `api`, `nbd` or
    /// `iscsi` and be a listening TCP socket.
    pub fn from_env() -> anyhow::Result<Activated> {
        let pid = std::env::var("LISTEN_PID").ok();
        if pid.and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
            return Ok(Activated::default());
        }
        let count: RawFd = match std::env::var("LISTEN_FDS") {
            Ok(n) => n.parse().map_err(|_| anyhow::anyhow!("LISTEN_FDS={n}: not a number"))?,
            Err(_) => return Ok(Activated::default()),
        };
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        let names: Vec<&str> = names.split(':').collect();
        let mut fds = Vec::new();
        for (i, fd) in (LISTEN_FDS_START..LISTEN_FDS_START.saturating_add(count)).enumerate() {
            let name = names.get(i).copied().unwrap_or("unknown");
            let owned = adopt(fd)?;
            if !matches!(name, "api" | "nbd" | "iscsi") {
                anyhow::bail!(
                    "socket activation: descriptor {fd} is named {name:?}; name each socket api, nbd or iscsi \
                     (FileDescriptorName= in forkd.socket, --fdname= of systemd-socket-activate)"
                );
            }
            check_listening(&owned, fd, name)?;
            fds.push((name.to_string(), owned));
        }
        Ok(Activated { fds })
    }

    /// The socket named `name`, ready for tokio (non-blocking), if systemd passed one.
    pub fn take(&mut self, name: &str) -> anyhow::Result<Option<std::net::TcpListener>> {
        let Some(at) = self.fds.iter().position(|(n, _)| n == name) else {
            return Ok(None);
        };
        let (_, fd) = self.fds.remove(at);
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(Some(listener))
    }

    /// Names passed but not taken (a second socket of the same name, say).
    pub fn left_over(&self) -> Vec<String> {
        self.fds.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// Check that `fd` is a listening stream socket.
fn check_listening(fd: &OwnedFd, raw: RawFd, name: &str) -> anyhow::Result<()> {
    use nix::sys::socket::{getsockopt, sockopt};
    let listening = getsockopt(fd, sockopt::AcceptConn).unwrap_or(false);
    let stream = getsockopt(fd, sockopt::SockType).is_ok_and(|t| t == nix::sys::socket::SockType::Stream);
    if !(listening && stream) {
        anyhow::bail!("socket activation: descriptor {raw} ({name}) is not a listening stream socket");
    }
    Ok(())
}

/// Take ownership of descriptor `fd`, passed by systemd, and mark it close-on-exec (hooks must
/// not inherit it).
#[allow(unsafe_code)]
fn adopt(fd: RawFd) -> anyhow::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // Check it is open before claiming it.
    fcntl(fd, FcntlArg::F_GETFD).map_err(|e| anyhow::anyhow!("socket activation: descriptor {fd}: {e}"))?;
    // SAFETY: `fd` is open (checked above) and systemd passed it to this process (LISTEN_PID)
    // for it to own; `from_env` runs once, before anything else in the process opens or
    // claims descriptors 3 and up as its own, so nothing else owns or closes it.
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    fcntl(owned.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| anyhow::anyhow!("socket activation: descriptor {fd}: {e}"))?;
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_flush() {
        let h = Health::default();
        assert!(h.healthy(Duration::from_secs(60)), "healthy before the first round");
        h.round_started();
        assert!(h.healthy(Duration::from_secs(60)), "a round just begun");
        assert!(!h.healthy(Duration::ZERO), "a round running longer than the bound");
        h.round_ended(false);
        assert!(!h.healthy(Duration::from_secs(60)), "the last round failed");
        h.round_started();
        h.round_ended(true);
        assert!(h.healthy(Duration::from_secs(60)), "the last round succeeded");
    }

    #[test]
    fn notifier_sends_to_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier { target: Some(Notifier::open(path.as_os_str()).expect("open")) };
        n.status("testing");
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"STATUS=testing");
        Notifier { target: None }.notify("READY=1");
    }
}
