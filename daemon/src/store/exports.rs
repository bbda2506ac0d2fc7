//! Who is connected to which export, so that rewind, refresh and delete can close those
//! connections before they change what the export shows.
//!
//! The rule (docs/api.md, "Exports"): before a rewind or refresh of a clone, or a delete of a
//! volume or snapshot, forkd fences the affected exports (new connections to them are refused
//! as unknown exports for the moment of the switch), asks every connection to them to close,
//! and waits until each has answered the requests it had already received and hung up. Only
//! then does the operation run. New connections afterwards see the new contents.
//!
//! It lives with the store because it guards the store's head switches, as the ingest claim
//! does: every protocol listener (NBD, iSCSI) registers its connections here, and the catalog
//! routes fence before they switch. A connection registers the volume name behind its export
//! (`dev1` for both `dev1` and `dev1@3`) and its exact export name. It knows nothing of any
//! protocol: names and cancellation tokens only.
//!
//! It also decides who may connect at all ([`Store::admit_export`]): a volume a hook is
//! preparing (a new clone before its `configure-clone` hook succeeded, a masked volume during
//! its `mask` hook) is open only to that hook, which reaches it by a capability name,
//! `VOLUME:key-KEY` (NBD) or `iqn.2026-11.dev.forkd:VOLUME:key-KEY` (iSCSI), with a random
//! key made for that run ([`ExportRegistry::open_for_hook`]); and data that may not flow
//! downstream (the head of a masked volume, unmasked data of a `clone_from = "masked"`
//! source) is refused with the catalog's reason.
//!
//! For idle leases it tells which volumes have a connection open ([`ExportRegistry::connected`])
//! and which had one close since the lease reaper last asked ([`ExportRegistry::take_activity`]).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use catalog::CatalogError;
use tokio_util::sync::CancellationToken;

/// Which exports an operation affects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The writable head only (`dev1`): rewind, refresh.
    Head,
    /// The head and every snapshot export of the volume (`dev1`, `dev1@N`): delete a volume.
    Volume,
}

#[derive(Debug)]
struct Conn {
    volume: String,
    export: String,
    token: CancellationToken,
    expired: CancellationToken,
}

/// The registry of live export connections.
#[derive(Debug, Default)]
pub struct ExportRegistry {
    conns: Mutex<HashMap<u64, Conn>>,
    next: Mutex<u64>,
    fenced: Mutex<HashSet<String>>,
    /// Volumes open only to a hook, with the key of its capability name.
    gates: Mutex<HashMap<String, String>>,
    /// Volumes a connection to closed, or that had other I/O, since the lease reaper last
    /// looked ([`ExportRegistry::take_activity`]); an open connection counts as activity by
    /// itself, so requests never touch this.
    activity: Mutex<HashSet<String>>,
}

/// A volume open only to a hook (see [`ExportRegistry::open_for_hook`]); dropping it ends that.
#[derive(Debug)]
pub struct HookGate<'a> {
    reg: &'a ExportRegistry,
    volume: String,
    /// The export name the hook connects with (NBD; iSCSI appends it to the IQN prefix).
    pub export: String,
}

impl HookGate<'_> {
    /// The volume it opens to a hook.
    pub fn volume(&self) -> &str {
        &self.volume
    }
}

impl Drop for HookGate<'_> {
    fn drop(&mut self) {
        self.reg.gates.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.volume);
    }
}

/// The marker between a volume's name and a hook's key in a capability export name.
pub const KEY_MARK: &str = ":key-";

/// Split `VOLUME:key-KEY` into the reference and the key.
pub fn split_key(export: &str) -> (&str, Option<&str>) {
    match export.split_once(KEY_MARK) {
        Some((name, key)) => (name, Some(key)),
        None => (export, None),
    }
}

/// A registered connection; dropping it unregisters.
#[derive(Debug)]
pub struct ConnGuard<'a> {
    reg: &'a ExportRegistry,
    id: u64,
    /// Cancelled when the connection must close: stop reading requests, answer the ones
    /// received, hang up.
    pub token: CancellationToken,
    /// Cancelled when the switch stopped waiting for this connection: from then on no request
    /// may run (it would see the new contents).
    pub expired: CancellationToken,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.reg.lock_conns().remove(&self.id) {
            self.reg.touch(&c.volume);
        }
    }
}

/// Fenced exports; dropping it lets connections in again.
#[derive(Debug)]
pub struct Fence<'a> {
    reg: &'a ExportRegistry,
    names: Vec<String>,
}

impl Drop for Fence<'_> {
    fn drop(&mut self) {
        let mut f = self.reg.fenced.lock().unwrap_or_else(|p| p.into_inner());
        for n in &self.names {
            f.remove(n);
        }
    }
}

fn volume_of(export: &str) -> &str {
    export.split('@').next().unwrap_or(export)
}

impl ExportRegistry {
    fn lock_conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while `export` is fenced (a switch is under way).
    pub fn is_fenced(&self, export: &str) -> bool {
        let f = self.fenced.lock().unwrap_or_else(|p| p.into_inner());
        f.contains(export) || f.contains(&format!("{}@*", volume_of(export)))
    }

    /// Register a connection to `export`; `None` while it is fenced.
    pub fn register(&self, export: &str) -> Option<ConnGuard<'_>> {
        if self.is_fenced(export) {
            return None;
        }
        let id = {
            let mut n = self.next.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            *n
        };
        let (token, expired) = (CancellationToken::new(), CancellationToken::new());
        self.lock_conns().insert(
            id,
            Conn {
                volume: volume_of(export).to_string(),
                export: export.to_string(),
                token: token.clone(),
                expired: expired.clone(),
            },
        );
        Some(ConnGuard { reg: self, id, token, expired })
    }

    /// Open `volume` only to a hook: until the gate drops, a connection must name it with the
    /// returned gate's capability name. One operation at a time holds a volume's gate: `None`
    /// while another does.
    pub fn open_for_hook(&self, volume: &str) -> Option<HookGate<'_>> {
        let key = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        if gates.contains_key(volume) {
            return None;
        }
        gates.insert(volume.to_string(), key.clone());
        Some(HookGate { reg: self, volume: volume.to_string(), export: format!("{volume}{KEY_MARK}{key}") })
    }

    /// Whether a connection naming `export` passes the hook gates: `Ok(Some(reference))` for a
    /// hook's capability name, `Ok(None)` for a plain name of an ungated volume (other checks
    /// follow), `Err` with the reason otherwise.
    fn pass_gate<'n>(&self, export: &'n str) -> Result<Option<&'n str>, Denied> {
        let (name, key) = split_key(export);
        let gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        match (gates.get(volume_of(name)), key) {
            (Some(k), Some(given)) if k == given => Ok(Some(name)),
            (Some(_), None) => Err(Denied::Refused(format!(
                "`{name}` is being prepared by a hook: it opens when the operation finishes"
            ))),
            (_, Some(_)) => Err(Denied::Unknown),
            (None, None) => Ok(None),
        }
    }

    /// Whether any connection to `volume` (its head or a snapshot) is open right now.
    pub fn connected(&self, volume: &str) -> bool {
        self.lock_conns().values().any(|c| c.volume == volume)
    }

    /// Note I/O on `volume` outside a registered connection (and a connection's close).
    pub fn touch(&self, volume: &str) {
        self.activity.lock().unwrap_or_else(|p| p.into_inner()).insert(volume_of(volume).to_string());
    }

    /// The volumes active since the last call (see `activity`).
    pub fn take_activity(&self) -> HashSet<String> {
        std::mem::take(&mut *self.activity.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Connections to `export` right now.
    pub fn count(&self, export: &str) -> usize {
        self.lock_conns().values().filter(|c| c.export == export).count()
    }

    /// Fence the exports `reference` affects, close their connections and wait (up to
    /// `timeout`) until they are gone. Blocking: call from a blocking thread.
    pub fn fence_and_drain(&self, reference: &str, scope: Scope, timeout: Duration) -> Fence<'_> {
        let volume = volume_of(reference).to_string();
        let exact = reference.contains('@');
        let names = match (exact, scope) {
            (true, _) => vec![reference.to_string()],
            (false, Scope::Head) => vec![volume.clone()],
            (false, Scope::Volume) => vec![volume.clone(), format!("{volume}@*")],
        };
        self.fenced.lock().unwrap_or_else(|p| p.into_inner()).extend(names.iter().cloned());
        let fence = Fence { reg: self, names };
        let hit = |c: &Conn| {
            if exact {
                c.export == reference
            } else {
                c.volume == volume && (scope == Scope::Volume || c.export == volume)
            }
        };
        let mut closed = 0;
        for c in self.lock_conns().values().filter(|c| hit(c)) {
            c.token.cancel();
            closed += 1;
        }
        if closed > 0 {
            tracing::info!(export = reference, connections = closed, "closing connections before the switch");
        }
        let start = Instant::now();
        while self.lock_conns().values().any(hit) && start.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(5));
        }
        let late: Vec<String> = self.lock_conns().values().filter(|c| hit(c)).map(|c| c.export.clone()).collect();
        for c in self.lock_conns().values().filter(|c| hit(c)) {
            c.expired.cancel();
        }
        if !late.is_empty() {
            tracing::warn!(
                export = reference,
                connections = late.len(),
                "switching while connections still close: their remaining requests are refused"
            );
        }
        fence
    }
}

/// Why a connection is not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No such export (as far as this client may know).
    Unknown,
    /// The export exists but may not be reached: the reason, for the client and the log.
    Refused(String),
}

impl super::Store {
    /// Who may connect to `export`, as a protocol listener asks before a session: the
    /// reference to serve, or why not (see the module documentation).
    pub fn admit_export(&self, export: &str) -> Result<String, Denied> {
        if let Some(reference) = self.exports.pass_gate(export)? {
            return Ok(reference.to_string());
        }
        match self.catalog().downstream(export) {
            Ok(()) => Ok(export.to_string()),
            Err(e @ (CatalogError::MaskedOnly { .. } | CatalogError::MaskedVolume(_))) => {
                Err(Denied::Refused(e.to_string()))
            }
            Err(_) => Err(Denied::Unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_closes_and_blocks_the_right_exports() {
        let r = ExportRegistry::default();
        let head = r.register("dev1").expect("register");
        let snap = r.register("dev1@2").expect("register");
        let other = r.register("dev2").expect("register");
        let t = std::thread::scope(|s| {
            let h = s.spawn(|| {
                let _f = r.fence_and_drain("dev1", Scope::Head, Duration::from_secs(5));
                assert!(r.register("dev1").is_none(), "fenced during the switch");
                assert!(r.register("dev1@2").is_some(), "snapshot exports are not affected by a rewind");
            });
            while !head.token.is_cancelled() {
                std::thread::yield_now();
            }
            drop(head);
            h.join().is_ok()
        });
        assert!(t);
        assert!(!snap.token.is_cancelled() && !other.token.is_cancelled());
        assert!(r.register("dev1").is_some(), "unfenced after the switch");
        let _f = r.fence_and_drain("dev1", Scope::Volume, Duration::from_millis(50));
        assert!(snap.token.is_cancelled(), "a volume delete closes its snapshot exports too");
        assert!(r.register("dev1@7").is_none());
    }
}
