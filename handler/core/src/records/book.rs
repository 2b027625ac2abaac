//! The records one member holds: the freshest valid one per peer, and the floor under each
//! peer's sequence numbers.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::{MAX_CLOCK_SKEW, MAX_RECORD_TTL, Record, RecordSigner, Refusal, SealedRecord};
use crate::identity::PeerId;
use crate::membership::Document;

/// What [`RecordBook::offer`] did with a record it did not refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// It is now the freshest record of `peer`.
    Accepted {
        /// Its owner.
        peer: PeerId,
        /// The addresses of the record it replaced, if one was held.
        previous: Option<Vec<SocketAddr>>,
    },
    /// The very record held already (it came by another way).
    Duplicate,
}

#[derive(Debug, Clone)]
struct Held {
    record: Record,
    sealed: SealedRecord,
}

/// The freshest valid record of each member, and for each peer the highest sequence number
/// ever accepted (kept after its record expires, so an older one replayed later is still
/// refused as stale; a durable node stores it).
#[derive(Debug, Clone, Default)]
pub struct RecordBook {
    held: BTreeMap<PeerId, Held>,
    floors: BTreeMap<PeerId, u64>,
}

impl RecordBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers a sealed record, read as the member `reader` of `document` (the epoch in
    /// force) at `now` (Unix seconds). A record is taken only if it opens (see
    /// [`open`]), lives within [`MAX_RECORD_TTL`], was not issued more than
    /// [`MAX_CLOCK_SKEW`] ahead of `now`, has not expired, and its sequence number is
    /// above every one accepted from its owner before.
    pub fn offer(
        &mut self,
        sealed: SealedRecord,
        document: &Document,
        reader: &RecordSigner,
        now: u64,
    ) -> Result<Offer, Refusal> {
        self.offer_with(sealed, document, reader, now, true)
    }

    /// [`RecordBook::offer`], checking signatures only if `verify` (see `open_with`).
    pub(crate) fn offer_with(
        &mut self,
        sealed: SealedRecord,
        document: &Document,
        reader: &RecordSigner,
        now: u64,
        verify: bool,
    ) -> Result<Offer, Refusal> {
        let peer = sealed.owner_id();
        if let Some(held) = self.held.get(&peer)
            && held.sealed.bytes() == sealed.bytes()
        {
            return Ok(Offer::Duplicate);
        }
        let record = super::open_with(&sealed, document, reader, verify)?;
        let expired = |why: String| Refusal::Expired { peer, why };
        if record.expires <= record.issued
            || record.expires.saturating_sub(record.issued) > MAX_RECORD_TTL
        {
            return Err(expired(format!(
                "lives {} s; a record lives 1 to {MAX_RECORD_TTL} s",
                record.expires.saturating_sub(record.issued)
            )));
        }
        if record.issued > now.saturating_add(MAX_CLOCK_SKEW) {
            return Err(expired(format!(
                "was issued {} s in the future (clocks may differ by {MAX_CLOCK_SKEW} s)",
                record.issued - now
            )));
        }
        if record.expires <= now {
            return Err(expired(format!(
                "expired {} s ago",
                now.saturating_sub(record.expires)
            )));
        }
        if let Some(&held) = self.floors.get(&peer)
            && record.seq <= held
        {
            return Err(Refusal::Stale {
                peer,
                offered: record.seq,
                held,
            });
        }
        self.floors.insert(peer, record.seq);
        let previous = self
            .held
            .insert(peer, Held { record, sealed })
            .map(|h| h.record.addresses);
        Ok(Offer::Accepted { peer, previous })
    }

    /// The record held for `peer`, if it has not expired at `now`.
    pub fn active(&self, peer: &PeerId, now: u64) -> Option<&Record> {
        self.held
            .get(peer)
            .map(|h| &h.record)
            .filter(|r| r.expires > now)
    }

    /// The sealed record held for `peer` (expired or not), to pass on.
    pub fn sealed(&self, peer: &PeerId) -> Option<&SealedRecord> {
        self.held.get(peer).map(|h| &h.sealed)
    }

    /// Every peer a record is held for, with its sequence number, ascending by peer.
    pub fn seqs(&self) -> impl Iterator<Item = (PeerId, u64)> + '_ {
        self.held.iter().map(|(p, h)| (*p, h.record.seq))
    }

    /// The sequence number held for `peer`, if any.
    pub fn seq(&self, peer: &PeerId) -> Option<u64> {
        self.held.get(peer).map(|h| h.record.seq)
    }

    /// The highest sequence number ever accepted from `peer`.
    pub fn floor(&self, peer: &PeerId) -> Option<u64> {
        self.floors.get(peer).copied()
    }

    /// Raises `peer`'s floor (restored from a store): records at or below it are stale.
    pub fn raise_floor(&mut self, peer: PeerId, seq: u64) {
        let floor = self.floors.entry(peer).or_insert(seq);
        *floor = (*floor).max(seq);
    }

    /// Drops the records expired at `now`, returning their owners (ascending).
    pub fn expire(&mut self, now: u64) -> Vec<PeerId> {
        let gone: Vec<PeerId> = self
            .held
            .iter()
            .filter(|(_, h)| h.record.expires <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in &gone {
            self.held.remove(peer);
        }
        gone
    }

    /// The earliest expiry of a record held (Unix seconds).
    pub fn next_expiry(&self) -> Option<u64> {
        self.held.values().map(|h| h.record.expires).min()
    }

    /// Forgets every peer `keep` says no to (members removed from the membership).
    pub fn retain(&mut self, mut keep: impl FnMut(&PeerId) -> bool) {
        self.held.retain(|p, _| keep(p));
        self.floors.retain(|p, _| keep(p));
    }

    /// How many records are held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}
