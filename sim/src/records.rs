//! Address records in the simulator: the plan, what each node published and holds, and
//! the invariants every run with a `[records]` table checks.
//!
//! ```toml
//! [membership]             # records need it: members' keys and record keys
//! [records]
//! ttl = "60s"              # each record's life (refreshed at half)
//!
//! [[step]]
//! at = "5s"
//! do = "restart"
//! node = "c"
//! port = 7100              # c comes back listening elsewhere: it moved
//!
//! [[step]]
//! at = "8s"
//! do = "offer_record"      # hand a record to a node as its records directory would
//! node = "a"
//! to = "c"                 # whose record
//! record = "previous"      # c's record before its newest (a replay), or "forged": one
//! from = "b"               # naming c as owner, signed by b's record key, naming b's host
//! ```
//!
//! Every member publishes its host's address and current port; requests go by peer id
//! alone (`request_to`), so a node that moved is found only through its records. The
//! membership document still names each member's first address, as an operator's file
//! would.
//!
//! Invariants (built in):
//! 1. No node dials a peer at an address that peer never published (or that the document
//!    does not give it): a record its owner did not sign never steers a dial.
//! 2. Convergence: once faults heal, every node that is up holds the newest record of every
//!    other node that is up, within `liveness` (the run goes on until then).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;

use p2p_handler::endpoint::RecordEvent;

pub use crate::scenario::RecordsPlan;

/// What one run's nodes published and hold.
pub(crate) struct Tracker {
    pub(crate) ttl: Duration,
    ips: Vec<IpAddr>,
    /// Each node's listening port now.
    ports: Vec<u16>,
    /// Every address each node listened on or the document gives it.
    genuine: Vec<BTreeSet<SocketAddr>>,
    /// Every record each node published, oldest first: (seq, sealed).
    published: Vec<Vec<(u64, Bytes)>>,
    /// What each node took of each other's: receiver -> owner -> seq.
    held: Vec<BTreeMap<usize, u64>>,
    pub(crate) refused: u64,
    pub(crate) inactive: u64,
    /// Virtual time a node last took a record (or published one).
    pub(crate) last_change: Duration,
    pub(crate) violations: Vec<String>,
}

impl Tracker {
    /// A tracker for nodes at `ips`, all listening on `port` (the document's addresses).
    pub(crate) fn new(plan: &RecordsPlan, ips: Vec<IpAddr>, port: u16) -> Self {
        let n = ips.len();
        Self {
            ttl: plan.ttl,
            genuine: ips
                .iter()
                .map(|ip| BTreeSet::from([SocketAddr::new(*ip, port)]))
                .collect(),
            ips,
            ports: vec![port; n],
            published: vec![Vec::new(); n],
            held: vec![BTreeMap::new(); n],
            refused: 0,
            inactive: 0,
            last_change: Duration::ZERO,
            violations: Vec::new(),
        }
    }

    /// Where `node` listens now.
    pub(crate) fn listen_addr(&self, node: usize) -> SocketAddr {
        SocketAddr::new(self.ips[node], self.ports[node])
    }

    /// `node` listens on `port` from its next start on.
    pub(crate) fn move_to(&mut self, node: usize, port: u16) {
        self.ports[node] = port;
        let addr = self.listen_addr(node);
        self.genuine[node].insert(addr);
    }

    /// A node starts: it publishes its record anew (others' are learned again unless it
    /// is durable, but the invariant compares with events, which a restarted node emits
    /// again as it takes records).
    pub(crate) fn on_start(&mut self, node: usize, durable: bool) {
        if !durable {
            self.held[node].clear();
        }
    }

    /// A record event of `node`: traced, counted, tracked. Returns the trace text.
    pub(crate) fn on_event(
        &mut self,
        node: usize,
        event: &RecordEvent,
        names: &[String],
        index_of: impl Fn(&p2p_handler::PeerId) -> Option<usize>,
        now: Duration,
    ) -> String {
        let name_of = |peer: &p2p_handler::PeerId| {
            index_of(peer).map_or_else(|| peer.short(), |i| names[i].clone())
        };
        match event {
            RecordEvent::Published {
                seq,
                addresses,
                sealed,
                ..
            } => {
                self.published[node].push((*seq, sealed.clone()));
                self.last_change = now;
                format!("record published ({})", list(addresses))
            }
            RecordEvent::Accepted {
                peer,
                source,
                seq,
                addresses,
                moved,
                ..
            } => {
                if let Some(owner) = index_of(peer) {
                    let before = self.held[node].insert(owner, *seq);
                    if before.is_some_and(|held| held > *seq) {
                        self.violations.push(format!(
                            "records: {} took {}'s record seq {seq} though it held seq {} \
                             (a rollback)",
                            names[node],
                            names[owner],
                            before.unwrap_or_default()
                        ));
                    }
                }
                self.last_change = now;
                let from = match source {
                    p2p_handler::Source::Peer(p) => name_of(p),
                    p2p_handler::Source::Directory => "the directory".to_owned(),
                    p2p_handler::Source::Local => "its operator".to_owned(),
                };
                format!(
                    "record of {} from {from}: {}{}",
                    name_of(peer),
                    list(addresses),
                    if *moved { " (moved)" } else { "" }
                )
            }
            RecordEvent::Refused { owner, refusal, .. } => {
                self.refused += 1;
                let whose = owner.as_ref().map_or_else(|| "?".to_owned(), name_of);
                format!("record of {whose} refused ({})", refusal.label())
            }
            RecordEvent::Inactive { peer } => {
                self.inactive += 1;
                if let Some(owner) = index_of(peer) {
                    self.held[node].remove(&owner);
                }
                format!("{} inactive (its record expired)", name_of(peer))
            }
            RecordEvent::Unlisted { epoch, .. } => {
                format!("cannot publish: epoch {epoch} lists no record key for it")
            }
            other => format!("{other}"),
        }
    }

    /// Invariant 1: `node` dials `peer` at `addr`.
    pub(crate) fn on_dial(&mut self, node: usize, peer: usize, addr: SocketAddr, names: &[String]) {
        if !self.genuine[peer].contains(&addr) {
            self.violations.push(format!(
                "records: {} dialed {} at {addr}, an address {} never published \
                 (a record its owner did not sign steered a dial)",
                names[node], names[peer], names[peer]
            ));
        }
    }

    /// The records of `owner` it published, oldest first.
    pub(crate) fn published(&self, owner: usize) -> &[(u64, Bytes)] {
        &self.published[owner]
    }

    /// Invariant 2: the (receiver, owner) pairs, both up, where the receiver does not hold
    /// the owner's newest record.
    pub(crate) fn behind(&self, up: &[bool]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (receiver, held) in self.held.iter().enumerate() {
            if !up[receiver] {
                continue;
            }
            for (owner, records) in self.published.iter().enumerate() {
                if owner == receiver || !up[owner] {
                    continue;
                }
                if let Some((seq, _)) = records.last()
                    && held.get(&owner) != Some(seq)
                {
                    out.push((receiver, owner));
                }
            }
        }
        out
    }
}

fn list(addresses: &[SocketAddr]) -> String {
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use p2p_handler::endpoint::Source;
    use p2p_handler::{Keypair, PeerId};

    #[test]
    fn a_node_that_goes_back_to_an_older_record_is_a_violation() {
        let ips = vec![IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])];
        let plan = RecordsPlan {
            ttl: Duration::from_secs(60),
        };
        let mut tracker = Tracker::new(&plan, ips, 7000);
        let owner = Keypair::from_private_bytes([2; 32]).peer_id();
        let index_of = |p: &PeerId| (*p == owner).then_some(1);
        let names = ["a".to_owned(), "b".to_owned()];
        let accepted = |seq| RecordEvent::Accepted {
            peer: owner,
            source: Source::Local,
            seq,
            addresses: Vec::new(),
            moved: false,
            first: false,
        };
        for seq in [5, 7] {
            tracker.on_event(0, &accepted(seq), &names, index_of, Duration::ZERO);
        }
        assert!(tracker.violations.is_empty());
        tracker.on_event(0, &accepted(6), &names, index_of, Duration::ZERO);
        assert_eq!(
            tracker.violations,
            ["records: a took b's record seq 6 though it held seq 7 (a rollback)"]
        );
    }
}
