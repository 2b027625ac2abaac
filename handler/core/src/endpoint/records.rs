//! Address records in the endpoint: this node's own record, the book of members' records,
//! and how records travel between members (PROTOCOL.md, "Address records").
//!
//! ```text
//!  install / new addresses / new epoch / refresh timer (ttl x REFRESH_AT)
//!        └──> seal our record (seq = max(last + 1, wall clock ms)), take it into our book,
//!             Records{ours} to connected members that lack it, sync dials to the others
//!  connection to a member established ──> RecordSeqs{what we hold}  (once per peer and
//!                                         book version; always on a sync connection)
//!  RecordSeqs{theirs} ──> Records{every record we hold newer than theirs}; our RecordSeqs
//!                         if not sent on this connection yet (the first word is answered)
//!  Records{...}       ──> book.offer each: accepted ──> exchanges with a peer that moved
//!                                                      dial its new address; passed on to
//!                                                      connected members that lack it
//!                                        refused  ──> event (once per copy), counted;
//!                                                      a malformed one is a violation
//!  expiry timer       ──> a member's record expired: inactive (event), not dialled, its
//!                         exchanges that cannot reach it fail with `Inactive`
//! ```
//!
//! Records need membership: members' static keys (to seal to) and record keys (to check
//! signatures) come from the document in force. The addresses a record names take the
//! place of the document's `address` for that member: sync dials, `request_to` and every
//! exchange with it use them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::durable;
use crate::identity::PeerId;
use crate::records::{Offer, Record, RecordBook, RecordSigner, Refusal, SealedRecord};
use crate::wire::{FEATURE_RECORDS, Message};

use super::dialer::OutState;
use super::events::{Event, Failure, RecordEvent, RequestError, Source};
use super::{ConnId, Endpoint, Timer};

/// How long a record lives unless configured otherwise.
pub const DEFAULT_RECORD_TTL: Duration = Duration::from_secs(3600);
/// The shortest record life a node may configure.
pub const MIN_RECORD_TTL: Duration = Duration::from_secs(10);
/// A node seals a fresh record when this fraction of its current one's life has passed
/// (numerator over 4: at half its life), so one lost refresh leaves time for the next.
pub const REFRESH_AT_QUARTERS: u32 = 2;
/// Bytes of records in one `Records` message, at most (and within the peer's limit).
pub const MAX_RECORDS_BYTES: usize = 1 << 20;
/// Copies of refused records remembered, so that each is reported once.
const REFUSALS_REMEMBERED: usize = 256;
/// Framing of a `Records` message around its records: kind and count.
const RECORDS_OVERHEAD: usize = 3;
/// Framing of each record in it: its length.
const RECORD_OVERHEAD: usize = 4;

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSettings {
    /// Where it listens, most preferred first (0 to 8; none: it reads records but
    /// publishes none).
    pub addresses: Vec<SocketAddr>,
    /// How long each record it seals lives ([`MIN_RECORD_TTL`] to the protocol's 7 days);
    /// it seals a new one at half that.
    pub ttl: Duration,
}

impl Default for RecordSettings {
    fn default() -> Self {
        Self {
            addresses: Vec::new(),
            ttl: DEFAULT_RECORD_TTL,
        }
    }
}

/// Why records cannot be installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordsError {
    /// Records need a membership (members' keys); install it first.
    #[error("address records need a membership document: install one first")]
    NoMembership,
    /// The signer is another node's.
    #[error("the record signer is {signer}'s, not this node's ({local})")]
    OtherNode {
        /// Whose it is.
        signer: PeerId,
        /// Ours.
        local: PeerId,
    },
    /// A bad setting.
    #[error("{0}")]
    Settings(String),
}

/// The endpoint's record state (present once [`Endpoint::install_records`] ran).
#[derive(Debug)]
pub(super) struct Records {
    signer: RecordSigner,
    pub(super) book: RecordBook,
    settings: RecordSettings,
    /// Counts changes of the book: what `told` compares.
    version: u64,
    /// The book version we last told each peer (`RecordSeqs`).
    told: BTreeMap<PeerId, u64>,
    /// What each peer holds, as it told us or as we sent it.
    heard: BTreeMap<PeerId, BTreeMap<PeerId, u64>>,
    /// Members whose record expired with no newer one: inactive.
    lapsed: BTreeSet<PeerId>,
    /// Fingerprints of refused copies already reported.
    refused: VecDeque<[u8; 32]>,
    /// The epoch whose missing record key was reported.
    unlisted: Option<u64>,
}

impl Endpoint {
    /// Makes this node publish its address record and read members' records (needs a
    /// membership: [`Endpoint::install_membership`] first). A durable endpoint resumes
    /// the records it stored. Seals and spreads our record at once if `settings` names
    /// addresses.
    pub fn install_records(
        &mut self,
        signer: RecordSigner,
        settings: RecordSettings,
        now: Instant,
    ) -> Result<(), RecordsError> {
        if self.membership.is_none() {
            return Err(RecordsError::NoMembership);
        }
        if signer.peer_id() != self.local {
            return Err(RecordsError::OtherNode {
                signer: signer.peer_id(),
                local: self.local,
            });
        }
        check_settings(&settings)?;
        let mut book = RecordBook::new();
        let stored = std::mem::take(&mut self.stored_records);
        let unix = self.unix_secs(now);
        if let Some(document) = self.current_document() {
            // Each as a peer's would be: one that expired while the node was down, or that
            // no longer opens under the current membership, is dropped (its floor stays).
            for (_, _, bytes) in &stored {
                if let Ok(sealed) = SealedRecord::decode(bytes) {
                    let _ = book.offer(sealed, document, &signer, unix);
                }
            }
        }
        for (peer, seq, _) in &stored {
            book.raise_floor(*peer, *seq);
        }
        self.records = Some(Box::new(Records {
            signer,
            book,
            settings,
            version: 1,
            told: BTreeMap::new(),
            heard: BTreeMap::new(),
            lapsed: BTreeSet::new(),
            refused: VecDeque::new(),
            unlisted: None,
        }));
        self.publish_record(now);
        self.arm_record_expiry(now);
        Ok(())
    }

    /// How many address records are held (ours included).
    pub fn records_held(&self) -> usize {
        self.records.as_deref().map_or(0, |r| r.book.len())
    }

    /// Whether address records are installed.
    pub fn records_installed(&self) -> bool {
        self.records.is_some()
    }

    /// Publishes `addresses` from now on (a node that moved): a new record is sealed and
    /// spread at once.
    pub fn set_record_addresses(
        &mut self,
        addresses: Vec<SocketAddr>,
        now: Instant,
    ) -> Result<(), RecordsError> {
        let Some(r) = self.records.as_deref_mut() else {
            return Err(RecordsError::NoMembership);
        };
        let settings = RecordSettings {
            addresses,
            ttl: r.settings.ttl,
        };
        check_settings(&settings)?;
        r.settings = settings;
        self.publish_record(now);
        Ok(())
    }

    /// Offers records from outside the network (a records directory): each is judged as
    /// one from a peer would be. Returns how many were taken.
    pub fn offer_records(&mut self, records: Vec<Bytes>, now: Instant) -> usize {
        let mut taken = 0;
        for bytes in records {
            taken += usize::from(matches!(
                self.offer_record(Source::Directory, bytes, now),
                Ok(Some(_))
            ));
        }
        if taken > 0 {
            self.arm_record_expiry(now);
        }
        taken
    }

    /// Our own sealed record, if we publish one.
    pub fn own_record(&self) -> Option<&SealedRecord> {
        self.records.as_deref()?.book.sealed(&self.local)
    }

    /// The unexpired record of `peer`, if one is held.
    pub fn record_of(&self, peer: &PeerId, now: Instant) -> Option<&Record> {
        let unix = self.unix_secs(now);
        self.records.as_deref()?.book.active(peer, unix)
    }

    /// The members that are inactive: those with a record key whose record expired, or
    /// that never published one this node has seen. Ascending.
    pub fn inactive_members(&self, now: Instant) -> Vec<PeerId> {
        let (Some(r), Some(document)) = (self.records.as_deref(), self.current_document()) else {
            return Vec::new();
        };
        let unix = self.unix_secs(now);
        let mut out: Vec<PeerId> = document
            .members
            .iter()
            .filter(|m| m.record_key.is_some())
            .map(crate::membership::Member::peer_id)
            .filter(|p| *p != self.local && r.book.active(p, unix).is_none())
            .collect();
        out.sort_unstable();
        out
    }

    /// Where to reach `peer`: the first address of its unexpired record, else the address
    /// the membership document gives, else the one its allow-list entry gives.
    pub fn resolve(&self, peer: &PeerId, now: Instant) -> Option<SocketAddr> {
        if let Some(record) = self.record_of(peer, now) {
            return record.addresses.first().copied();
        }
        if self.lapsed(peer) {
            return None;
        }
        self.allow.get(peer).and_then(|entry| entry.address)
    }

    /// [`Endpoint::request`] to the address [`Endpoint::resolve`] finds: fails at once
    /// with `Inactive` for an inactive peer, `NoAddress` for one no record or entry gives an
    /// address (the payload is not sent).
    pub fn request_to(
        &mut self,
        peer: PeerId,
        payload: impl Into<Bytes>,
        now: Instant,
    ) -> Result<crate::wire::ExchangeId, RequestError> {
        self.request_to_with(peer, payload, None, None, now)
    }

    /// [`Endpoint::request_with`] to the address [`Endpoint::resolve`] finds.
    pub fn request_to_with(
        &mut self,
        peer: PeerId,
        payload: impl Into<Bytes>,
        key: Option<Bytes>,
        deadline: Option<super::Deadline>,
        now: Instant,
    ) -> Result<crate::wire::ExchangeId, RequestError> {
        if peer == self.local {
            return Err(RequestError::SelfRequest);
        }
        if !self.allow.contains(&peer) {
            return Err(RequestError::NotAllowed(peer));
        }
        let addr = match self.resolve(&peer, now) {
            Some(addr) => addr,
            None if self.lapsed(&peer) => return Err(RequestError::Inactive(peer)),
            None => return Err(RequestError::NoAddress(peer)),
        };
        self.request_with(peer, addr, payload, key, deadline, now)
    }

    // ----- within the endpoint -----

    fn current_document(&self) -> Option<&crate::membership::Document> {
        self.membership
            .as_deref()
            .map(|m| m.ledger.current().document())
    }

    /// The members of the document in force, in its order (ascending keys).
    fn member_ids(&self) -> Vec<PeerId> {
        self.current_document()
            .map(|d| d.member_ids().collect())
            .unwrap_or_default()
    }

    /// Whether `peer`'s record expired with no newer one (it is not dialled).
    pub(super) fn lapsed(&self, peer: &PeerId) -> bool {
        self.records
            .as_deref()
            .is_some_and(|r| r.lapsed.contains(peer))
    }

    /// Whether `peer` has not heard our current record yet (a sync dial is owed to it).
    pub(super) fn owes_record(&self, peer: &PeerId) -> bool {
        let Some(r) = self.records.as_deref() else {
            return false;
        };
        let Some(ours) = r.book.seq(&self.local) else {
            return false;
        };
        r.heard
            .get(peer)
            .and_then(|h| h.get(&self.local))
            .is_none_or(|seq| *seq < ours)
    }

    /// Seals our record anew (if we publish and the membership lists our record key),
    /// takes it, spreads it, and sets the refresh timer.
    pub(super) fn publish_record(&mut self, now: Instant) {
        let unix_ms = self.unix_ms(now).unwrap_or(0);
        let unix = unix_ms / 1000;
        let local = self.local;
        let (Some(m), Some(r)) = (self.membership.as_deref(), self.records.as_deref_mut()) else {
            return;
        };
        let document = m.ledger.current().document();
        if r.settings.addresses.is_empty() {
            self.timers.cancel(Timer::RecordRefresh);
            return;
        }
        let record = Record {
            seq: r
                .book
                .floor(&local)
                .map_or(1, |f| f.saturating_add(1))
                .max(unix_ms),
            issued: unix,
            expires: unix.saturating_add(r.settings.ttl.as_secs()),
            addresses: r.settings.addresses.clone(),
        };
        let sealed = match crate::records::seal(&r.signer, &record, document, &mut self.rng) {
            Ok(sealed) => sealed,
            Err(crate::records::SealError::NotListed { epoch, key }) => {
                if r.unlisted != Some(epoch) {
                    r.unlisted = Some(epoch);
                    self.events
                        .push_back(Event::Record(RecordEvent::Unlisted { epoch, key }));
                }
                self.timers.cancel(Timer::RecordRefresh);
                return;
            }
            Err(e) => {
                // Settings were checked; a member key HPKE refuses is the document's doing.
                let why = e.to_string();
                self.events
                    .push_back(Event::Record(RecordEvent::CannotPublish { why }));
                return;
            }
        };
        let bytes = sealed.bytes().clone();
        match r.book.offer(sealed, document, &r.signer, unix) {
            Ok(Offer::Accepted { .. }) => {}
            // What every member would refuse (an address the membership does not allow
            // us): the operator must hear it, nobody else would.
            Err(refusal) => {
                let why = format!("every member would refuse it: {refusal}");
                self.events
                    .push_back(Event::Record(RecordEvent::CannotPublish { why }));
                return;
            }
            Ok(Offer::Duplicate) => return,
        }
        r.version += 1;
        self.stats.records_published += 1;
        if let Some(journal) = &mut self.journal {
            journal.push(durable::put_record(local, record.seq, &bytes));
        }
        let refresh = r.settings.ttl * REFRESH_AT_QUARTERS / 4;
        self.timers.set(Timer::RecordRefresh, now + refresh);
        self.events.push_back(Event::Record(RecordEvent::Published {
            seq: record.seq,
            expires: record.expires,
            addresses: record.addresses,
            sealed: bytes.clone(),
        }));
        self.pass_on(local, record.seq, bytes, None);
        self.plan_record_sync(now);
    }

    /// Plans sync dials to every member we can reach that has not heard our record.
    fn plan_record_sync(&mut self, now: Instant) {
        let owed: Vec<PeerId> = self
            .member_ids()
            .into_iter()
            .filter(|p| *p != self.local && self.owes_record(p) && self.resolve(p, now).is_some())
            .collect();
        self.plan_sync(owed, now);
    }

    /// Sends `Records{sealed}` to every connected member with the records feature that
    /// has not heard this record (or a newer one), except `except`.
    fn pass_on(&mut self, owner: PeerId, seq: u64, sealed: Bytes, except: Option<PeerId>) {
        if self.sabotaged(super::Sabotage::RecordsNoSpread) {
            return;
        }
        let Some(r) = self.records.as_deref_mut() else {
            return;
        };
        let mut to = Vec::new();
        for (conn, c) in &self.conns {
            if c.established
                && c.features & FEATURE_RECORDS != 0
                && Some(c.peer) != except
                && c.peer != owner
                && !to.iter().any(|(_, p)| *p == c.peer)
                && r.heard
                    .get(&c.peer)
                    .and_then(|h| h.get(&owner))
                    .is_none_or(|s| *s < seq)
            {
                to.push((*conn, c.peer));
            }
        }
        for (_, peer) in &to {
            r.heard.entry(*peer).or_default().insert(owner, seq);
        }
        for (conn, _) in to {
            self.send(
                conn,
                Message::Records {
                    records: vec![sealed.clone()],
                },
            );
        }
    }

    /// A connection to a member is up: tell it what we hold, once per book version (always
    /// on a sync connection).
    pub(super) fn records_established(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let Some(r) = self.records.as_deref() else {
            return;
        };
        // (`send_record_seqs` sends only to a peer that announced records.)
        if c.sync || r.told.get(&c.peer) != Some(&r.version) {
            self.send_record_seqs(conn);
        }
    }

    fn send_record_seqs(&mut self, conn: ConnId) {
        let Some(r) = self.records.as_deref_mut() else {
            return;
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.records_sent || !c.established || c.features & FEATURE_RECORDS == 0 {
            return;
        }
        c.records_sent = true;
        r.told.insert(c.peer, r.version);
        let seqs = r.book.seqs().map(|(p, s)| (*p.as_bytes(), s)).collect();
        self.send(conn, Message::RecordSeqs { seqs });
    }

    /// A record message (`RecordSeqs`, `Records`) from `peer` on `conn`.
    pub(super) fn on_records_message(
        &mut self,
        conn: ConnId,
        peer: PeerId,
        message: Message,
        now: Instant,
    ) {
        if self.conns.get(&conn).is_some_and(|c| c.sync) {
            self.arm_idle(conn, now);
        }
        if self.records.is_none() {
            return; // We keep no records: nothing to say, nothing to take.
        }
        if self
            .conns
            .get(&conn)
            .is_none_or(|c| c.features & FEATURE_RECORDS == 0)
        {
            // It did not announce records: it gets none, whatever it sends.
            return;
        }
        // Each costs us signature checks and decryption, or an answer of up to
        // MAX_RECORDS_BYTES: it draws on the peer's request budget.
        if !self.take_request_token(peer, now) {
            return;
        }
        match message {
            // Only the first on a connection is answered: a peer cannot make us send our
            // whole book again and again on one connection.
            Message::RecordSeqs { .. }
                if self.conns.get(&conn).is_some_and(|c| c.records_heard) => {}
            Message::RecordSeqs { seqs } => self.on_record_seqs(conn, peer, seqs),
            Message::Records { records } => {
                for bytes in records {
                    if self.offer_record(Source::Peer(peer), bytes, now).is_err() {
                        return self.violation(conn, "malformed address record", now);
                    }
                }
                self.arm_record_expiry(now);
            }
            _ => {}
        }
        self.close_sync_if_done(conn, now);
    }

    fn on_record_seqs(&mut self, conn: ConnId, peer: PeerId, seqs: Vec<([u8; 32], u64)>) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.records_heard = true;
        }
        let local = self.local;
        let remote_max = self.conns.get(&conn).map_or(0, |c| c.remote_max);
        // Only members' entries are kept: a peer cannot fill our memory with made-up ids.
        let members: BTreeSet<PeerId> = self.member_ids().into_iter().collect();
        let Some(r) = self.records.as_deref_mut() else {
            return;
        };
        let theirs: BTreeMap<PeerId, u64> = seqs
            .into_iter()
            .map(|(p, s)| (PeerId::from_bytes(p), s))
            .filter(|(p, _)| members.contains(p))
            .collect();
        let budget = remote_max
            .min(MAX_RECORDS_BYTES)
            .saturating_sub(RECORDS_OVERHEAD);
        let mut used = 0usize;
        let mut records = Vec::new();
        let mut sent = Vec::new();
        // Our own record first, so that a move is never held back by others'; then the
        // rest in peer-id order while they fit. What does not fit goes in the next round
        // (the next connection, or the next summary).
        let ours = r.book.seq(&local).map(|seq| (local, seq));
        let others = r.book.seqs().filter(|(owner, _)| *owner != local);
        for (owner, seq) in ours.into_iter().chain(others) {
            if owner == peer || theirs.get(&owner).is_some_and(|s| *s >= seq) {
                continue;
            }
            let Some(sealed) = r.book.sealed(&owner) else {
                continue;
            };
            let cost = sealed.bytes().len() + RECORD_OVERHEAD;
            if used + cost > budget {
                break;
            }
            used += cost;
            records.push(sealed.bytes().clone());
            sent.push((owner, seq));
        }
        let heard = r.heard.entry(peer).or_default();
        *heard = theirs;
        for (owner, seq) in sent {
            heard.insert(owner, seq);
        }
        if !records.is_empty() && !self.sabotaged(super::Sabotage::RecordsNoSpread) {
            self.send(conn, Message::Records { records });
        }
        // Each end answers the other's first word on a connection with its own.
        self.send_record_seqs(conn);
        let ours = self.membership().map(crate::membership::Ledger::epoch);
        if !self.owes_record(&peer)
            && self.heard_epoch(&peer) >= ours
            && let Some(m) = self.membership.as_deref_mut()
        {
            m.sync.remove(&peer);
        }
    }

    /// Offers one record from `source`; reports a refusal once per copy. Returns the owner
    /// if it was taken, and `Err` if the bytes are not a record at all (refused as
    /// malformed; from a peer, a protocol violation).
    fn offer_record(
        &mut self,
        source: Source,
        bytes: Bytes,
        now: Instant,
    ) -> Result<Option<PeerId>, ()> {
        let unix = self.unix_secs(now);
        let verify = !self.sabotaged(super::Sabotage::RecordsIgnoreSignatures);
        let (Some(m), Some(r)) = (self.membership.as_deref(), self.records.as_deref_mut()) else {
            return Ok(None);
        };
        let document = m.ledger.current().document();
        let decoded = SealedRecord::decode_bytes(bytes.clone());
        let malformed = decoded.is_err();
        let owner = decoded.as_ref().ok().map(SealedRecord::owner_id);
        let outcome = match decoded {
            Ok(sealed) if sealed.owner_id() == self.local => return Ok(None), // Our own, echoed.
            Ok(sealed) => r
                .book
                .offer_with(sealed, document, &r.signer, unix, verify)
                .map_err(|refusal| (refusal, owner)),
            Err(e) => Err((Refusal::Malformed(e), None)),
        };
        let taken = match outcome {
            Ok(Offer::Duplicate) => {
                if let (Source::Peer(from), Some(owner)) = (source, owner)
                    && let Some(seq) = r.book.seq(&owner)
                {
                    r.heard.entry(from).or_default().insert(owner, seq);
                }
                None
            }
            Ok(Offer::Accepted { peer, previous }) => {
                r.version += 1;
                let Some(record) = r.book.active(&peer, unix).cloned() else {
                    return Ok(None);
                };
                if let Source::Peer(from) = source {
                    r.heard.entry(from).or_default().insert(peer, record.seq);
                }
                r.lapsed.remove(&peer);
                let first = previous.is_none();
                let moved = previous.is_some_and(|p| p != record.addresses);
                self.stats.records_accepted += 1;
                if let Some(journal) = &mut self.journal {
                    journal.push(durable::put_record(peer, record.seq, &bytes));
                }
                self.events.push_back(Event::Record(RecordEvent::Accepted {
                    peer,
                    source,
                    seq: record.seq,
                    addresses: record.addresses.clone(),
                    moved,
                    first,
                }));
                if let Some(addr) = record.addresses.first() {
                    self.follow_record(peer, *addr, now);
                }
                let except = match source {
                    Source::Peer(from) => Some(from),
                    _ => None,
                };
                self.pass_on(peer, record.seq, bytes, except);
                // A member we can now reach that has not heard our record: we owe it a
                // dial (only the owner dials to publish; others pass on over open
                // connections, so a refresh costs each member one dial, not one per
                // relay).
                if self.owes_record(&peer) {
                    self.plan_sync(vec![peer], now);
                }
                Some(peer)
            }
            Err((refusal, owner)) => {
                let fingerprint = fingerprint(&bytes);
                self.stats.records_refused += 1;
                if !r.refused.contains(&fingerprint) {
                    if r.refused.len() >= REFUSALS_REMEMBERED {
                        r.refused.pop_front();
                    }
                    r.refused.push_back(fingerprint);
                    self.events.push_back(Event::Record(RecordEvent::Refused {
                        source,
                        owner,
                        refusal,
                    }));
                }
                None
            }
        };
        if malformed { Err(()) } else { Ok(taken) }
    }

    /// `peer`'s freshest record names `addr` first: our exchanges with it dial there from
    /// now on, and one waiting to redial does so at once.
    fn follow_record(&mut self, peer: PeerId, addr: SocketAddr, now: Instant) {
        let ids: Vec<crate::wire::ExchangeId> = self
            .outbound
            .iter()
            .filter(|(_, ex)| ex.peer == peer && ex.addr != addr)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(ex) = self.outbound.get_mut(&id) else {
                continue;
            };
            ex.addr = addr;
            let waiting = matches!(ex.state, OutState::Backoff { conn: None });
            if let Some(journal) = &mut self.journal {
                journal.push(durable::put_outbound(id, &ex.record()));
            }
            if waiting {
                self.timers.set(Timer::Outbound(id), now);
            }
        }
    }

    /// The refresh timer fired: seal our record anew.
    pub(super) fn on_record_refresh(&mut self, now: Instant) {
        if self.shutting_down {
            return;
        }
        self.publish_record(now);
    }

    /// The expiry timer fired: drop expired records; their members are inactive.
    pub(super) fn on_record_expiry(&mut self, now: Instant) {
        let unix = self.unix_secs(now);
        let local = self.local;
        let Some(r) = self.records.as_deref_mut() else {
            return;
        };
        let gone = r.book.expire(unix);
        if !gone.is_empty() {
            r.version += 1;
        }
        let mut republish = false;
        for peer in gone {
            if peer == local {
                republish = true;
                continue;
            }
            if let Some(r) = self.records.as_deref_mut() {
                r.lapsed.insert(peer);
            }
            if let Some(m) = self.membership.as_deref_mut() {
                m.sync.remove(&peer);
            }
            self.events
                .push_back(Event::Record(RecordEvent::Inactive { peer }));
            self.fail_unreachable(peer, now);
        }
        if republish {
            self.publish_record(now);
        }
        self.arm_record_expiry(now);
    }

    /// `peer` became inactive: our exchanges with it that are not in contact with it
    /// (queued, dialing, backing off) fail with `Inactive`, payload back.
    fn fail_unreachable(&mut self, peer: PeerId, now: Instant) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        let in_contact = p
            .active
            .and_then(|id| self.outbound.get(&id))
            .is_some_and(|ex| {
                matches!(
                    ex.state,
                    OutState::AwaitingAck { .. } | OutState::AwaitingReply { .. }
                ) || ex.acked
            });
        if !in_contact {
            self.fail_peer_exchanges(peer, &Failure::Inactive, now);
        }
    }

    fn arm_record_expiry(&mut self, now: Instant) {
        let unix = self.unix_secs(now);
        let Some(r) = self.records.as_deref() else {
            return;
        };
        match r.book.next_expiry() {
            Some(at) => {
                let wait = Duration::from_secs(at.saturating_sub(unix));
                self.timers.set(Timer::RecordExpiry, now + wait);
            }
            None => self.timers.cancel(Timer::RecordExpiry),
        }
    }

    /// A new epoch is in force: records of members that left go, and ours is sealed anew
    /// for the new members.
    pub(super) fn records_after_epoch(&mut self, now: Instant) {
        let members: BTreeSet<PeerId> = self.member_ids().into_iter().collect();
        let Some(r) = self.records.as_deref_mut() else {
            return;
        };
        r.book.retain(|p| members.contains(p));
        r.lapsed.retain(|p| members.contains(p));
        r.heard.retain(|p, _| members.contains(p));
        r.version += 1;
        self.publish_record(now);
    }

    /// Whether the records part of a sync connection still has work: we have not heard
    /// the peer's `RecordSeqs` on it yet, or it holds records newer than ours that it is
    /// sending (the answer to our `RecordSeqs`).
    pub(super) fn records_pending_on(&self, conn: ConnId) -> bool {
        let Some(r) = self.records.as_deref() else {
            return false;
        };
        let Some(c) = self.conns.get(&conn) else {
            return false;
        };
        if c.features & FEATURE_RECORDS == 0 {
            return false;
        }
        if !c.records_heard {
            return true;
        }
        r.heard.get(&c.peer).is_some_and(|theirs| {
            theirs.iter().any(|(owner, seq)| {
                *owner != self.local && r.book.seq(owner).is_none_or(|ours| ours < *seq)
            })
        })
    }

    /// Records (encoded) the store held, to be resumed by [`Endpoint::install_records`].
    pub(super) fn restore_records(&mut self, stored: Vec<(PeerId, u64, Bytes)>) {
        self.stored_records = stored;
    }
}

fn check_settings(settings: &RecordSettings) -> Result<(), RecordsError> {
    if settings.addresses.len() > crate::records::MAX_RECORD_ADDRESSES {
        return Err(RecordsError::Settings(format!(
            "{} addresses to publish; a record holds at most {}",
            settings.addresses.len(),
            crate::records::MAX_RECORD_ADDRESSES
        )));
    }
    if let Some(bad) = settings
        .addresses
        .iter()
        .find(|a| a.port() == 0 || a.ip().is_unspecified())
    {
        return Err(RecordsError::Settings(format!(
            "{bad} cannot be published: peers cannot dial it (give the address they reach \
             this node at)"
        )));
    }
    let max = Duration::from_secs(crate::records::MAX_RECORD_TTL);
    if settings.ttl < MIN_RECORD_TTL || settings.ttl > max {
        return Err(RecordsError::Settings(format!(
            "record_ttl {:?} is outside {MIN_RECORD_TTL:?} to {max:?}",
            settings.ttl
        )));
    }
    Ok(())
}

fn fingerprint(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}
