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

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
        self.reg.lock_conns().remove(&self.id);
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
