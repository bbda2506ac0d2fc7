//! Who may hold a listener's handshake slots (NBD option haggling, iSCSI login), kept apart
//! from the slots of established connections ([`crate::server::listener`]).
//!
//! A connection in its handshake costs the daemon a socket (and, for iSCSI, a thread) while it
//! has proven nothing; a flood of idle sockets must not be able to hold the slots a real
//! client needs. So, at every accept, before the new connection is registered:
//! - a peer (IP address) at `max_connections_per_peer` connections (handshaking and
//!   established together) gives up its oldest handshaking connection for the new one, or is
//!   refused when all of its connections are established ([`Ended::PeerLimit`]);
//! - a peer at `max_handshakes_per_peer` handshaking connections gives up its oldest one;
//! - when `max_handshakes` connections are handshaking, the oldest of all gives way.
//!
//! The connection that gives way is the oldest one that has not sent a byte yet
//! ([`Handshaking::spoke`]), or the oldest when every one has: a client in the middle of its
//! handshake is pushed out only after every idle socket. It is told through its
//! [`Handshaking::evicted`] token and closed ([`Ended::HandshakeEvicted`]). Evicting rather than refusing is what keeps a real client
//! getting through a flood: the newcomer always gets a handshake slot, and a client finishes
//! its handshake in milliseconds, while the flood's idle sockets only push out each other
//! (from one address they push out only that address's own, so a flood from one peer never
//! evicts another peer's handshake).
//!
//! Invariant: a connection is in `handshaking` from its admission until its handshake ends
//! (done, failed, or evicted); an established connection counts in `established` of its peer
//! until it ends. [`Handshaking`] gives both back when dropped.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

use crate::server::listener::{Ended, Limits};

/// The handshake slots and per-peer counts of one listener.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Id of the next connection (ids grow: the smallest is the oldest).
    next: u64,
    /// Connections in their handshake, oldest first.
    handshaking: BTreeMap<u64, Entry>,
    /// Established connections per peer (peers with none are left out).
    established: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Entry {
    peer: IpAddr,
    evicted: CancellationToken,
    spoke: Arc<AtomicBool>,
    /// The connection's socket, to look for bytes the protocol has not read yet.
    fd: Option<RawFd>,
}

impl Entry {
    /// Whether the client has sent anything: bytes the protocol read, or bytes waiting in the
    /// socket (a client whose reply the daemon has not read yet is not idle). The descriptor
    /// may already be closed (and even reused) when its connection is ending: that can only
    /// change which connection is evicted, never what is read.
    fn spoke(&self) -> bool {
        let waiting = |fd: RawFd| {
            use nix::sys::socket::{recv, MsgFlags};
            recv(fd, &mut [0u8; 1], MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).is_ok_and(|n| n > 0)
        };
        self.spoke.load(Ordering::SeqCst) || self.fd.is_some_and(waiting)
    }
}

impl State {
    /// Take the oldest handshaking connection (of `peer`, or of anyone) out and tell it: the
    /// oldest that never sent a byte if there is one, else the oldest.
    fn evict_oldest(&mut self, peer: Option<IpAddr>) -> bool {
        let candidates = || self.handshaking.iter().filter(|(_, e)| peer.is_none_or(|p| e.peer == p));
        let idle = candidates().find(|(_, e)| !e.spoke());
        let id = idle.or_else(|| candidates().next()).map(|(id, _)| *id);
        match id.and_then(|id| self.handshaking.remove(&id)) {
            Some(e) => {
                e.evicted.cancel();
                true
            }
            None => false,
        }
    }
}

impl Admission {
    /// The slots of a listener with `limits`.
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission { limits, state: Mutex::default() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Register a new connection from `peer` in its handshake, evicting older handshakes to
    /// make room (see the module comment); refused only when `peer` has
    /// `max_connections_per_peer` established connections.
    /// `fd` is its socket, looked at (never read) to tell idle connections from others.
    pub fn admit(self: &Arc<Self>, peer: IpAddr, fd: Option<RawFd>) -> Result<Handshaking, Ended> {
        let mut s = self.lock();
        let peer_handshakes = s.handshaking.values().filter(|e| e.peer == peer).count();
        let peer_established = s.established.get(&peer).copied().unwrap_or(0);
        if peer_handshakes + peer_established >= self.limits.max_connections_per_peer {
            if !s.evict_oldest(Some(peer)) {
                return Err(Ended::PeerLimit);
            }
        } else if peer_handshakes >= self.limits.max_handshakes_per_peer {
            s.evict_oldest(Some(peer));
        } else if s.handshaking.len() >= self.limits.max_handshakes {
            s.evict_oldest(None);
        }
        let id = s.next;
        s.next += 1;
        let evicted = CancellationToken::new();
        let spoke = Arc::new(AtomicBool::new(false));
        s.handshaking.insert(id, Entry { peer, evicted: evicted.clone(), spoke: spoke.clone(), fd });
        Ok(Handshaking { admission: self.clone(), id, peer, evicted, spoke, established: AtomicBool::new(false) })
    }

    /// Evict the oldest handshaking connection (an idle one first) to make room for a new one
    /// when the caller's own bound is full; false when none is handshaking.
    pub fn evict_one(&self) -> bool {
        self.lock().evict_oldest(None)
    }

    /// Connections in their handshake now.
    #[cfg(test)]
    fn handshaking(&self) -> usize {
        self.lock().handshaking.len()
    }
}

/// One connection's hold on the handshake slots, then on its peer's count of established
/// connections; given back when dropped.
#[derive(Debug)]
pub struct Handshaking {
    admission: Arc<Admission>,
    id: u64,
    peer: IpAddr,
    /// Cancelled when the connection has to give way to a newer one.
    pub evicted: CancellationToken,
    /// Set once the client has sent a byte: such connections are evicted after idle ones.
    pub spoke: Arc<AtomicBool>,
    established: AtomicBool,
}

impl Handshaking {
    /// The handshake is done: leave the handshake slots for the peer's established count.
    /// Fails when the connection was evicted in the meantime.
    pub fn establish(&self) -> Result<(), Ended> {
        let mut s = self.admission.lock();
        if s.handshaking.remove(&self.id).is_none() {
            return Err(Ended::HandshakeEvicted);
        }
        *s.established.entry(self.peer).or_default() += 1;
        self.established.store(true, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut s = self.admission.lock();
        s.handshaking.remove(&self.id);
        if self.established.load(Ordering::SeqCst) {
            if let Some(n) = s.established.get_mut(&self.peer) {
                *n -= 1;
                if *n == 0 {
                    s.established.remove(&self.peer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const LIMITS: Limits = Limits {
        max_connections: 100,
        handshake_timeout: Duration::from_secs(10),
        max_handshakes: 4,
        max_handshakes_per_peer: 2,
        max_connections_per_peer: 3,
    };

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_peer_over_its_handshakes_evicts_only_its_own_oldest() {
        let a = Admission::new(LIMITS);
        let other = a.admit(ip(2), None).expect("admit");
        let first = a.admit(ip(1), None).expect("admit");
        let second = a.admit(ip(1), None).expect("admit");
        let third = a.admit(ip(1), None).expect("admit");
        assert!(first.evicted.is_cancelled(), "the peer's oldest handshake gives way");
        assert!(!second.evicted.is_cancelled() && !third.evicted.is_cancelled());
        assert!(!other.evicted.is_cancelled(), "another peer's handshake is left alone");
        assert_eq!(first.establish(), Err(Ended::HandshakeEvicted));
        assert_eq!(a.handshaking(), 3);
    }

    #[test]
    fn idle_handshakes_give_way_before_clients_that_have_spoken() {
        let a = Admission::new(LIMITS);
        let talking = a.admit(ip(1), None).expect("admit");
        talking.spoke.store(true, Ordering::SeqCst);
        let idle = a.admit(ip(1), None).expect("admit");
        let newest = a.admit(ip(1), None).expect("admit");
        assert!(idle.evicted.is_cancelled(), "the idle one gives way although it is newer");
        assert!(!talking.evicted.is_cancelled() && !newest.evicted.is_cancelled());
        talking.establish().expect("the client that spoke finishes its handshake");
    }

    #[test]
    fn full_handshake_slots_evict_the_oldest_of_all() {
        let a = Admission::new(LIMITS);
        let held: Vec<_> = (1..=4).map(|i| a.admit(ip(i), None).expect("admit")).collect();
        let newest = a.admit(ip(5), None).expect("admit");
        assert!(held[0].evicted.is_cancelled());
        assert!(held[1..].iter().all(|h| !h.evicted.is_cancelled()) && !newest.evicted.is_cancelled());
        assert_eq!(a.handshaking(), 4);
    }

    #[test]
    fn a_peer_with_all_its_connections_established_is_refused_until_one_ends() {
        let a = Admission::new(LIMITS);
        let est: Vec<_> = (0..3)
            .map(|_| {
                let h = a.admit(ip(1), None).expect("admit");
                h.establish().expect("establish");
                h
            })
            .collect();
        assert_eq!(a.admit(ip(1), None).err(), Some(Ended::PeerLimit));
        assert!(a.admit(ip(2), None).is_ok(), "other peers are not limited");
        drop(est);
        assert!(a.admit(ip(1), None).is_ok(), "a peer's count falls when its connections end");
    }
}
