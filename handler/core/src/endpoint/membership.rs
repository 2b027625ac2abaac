//! Membership in the endpoint: the ledger in force, what each peer said of its own, and how
//! signed documents travel between nodes (PROTOCOL.md, "Membership").
//!
//! ```text
//!  connection established ──> Epoch{ours}   (once per peer and epoch: told[peer];
//!                             always on a sync connection)
//!  Epoch{theirs} received ──> theirs > ours: Fetch{after: ours}
//!                             same epoch, other digest: Fetch{after: ours - 1} (fork check)
//!                             either way, Epoch{ours} if not sent on this connection
//!                             yet (so the first word on a connection is always answered)
//!  Fetch{after}        ──> Documents{ledger.chain_after(after)} (rate limited)
//!  Documents{chain}    ──> ledger.offer: applied ──> allow list replaced, stored, Epoch to
//!                                                    every connected member, sync dials
//!                                        refused / fork ──> event (once), nothing changes
//! ```
//!
//! *Sync dials* carry no exchange: a node that applied a new epoch dials every member with
//! an address that has not said it holds that epoch (backing off to
//! [`SYNC_BACKOFF_MAX`]), and a node that starts dials a few members to learn whether it
//! missed one. A sync connection closes once both ends hold the same epoch, or when idle.
//!
//! The endpoint's allow list is the current document's members still unexpired at the
//! wall-clock time the driver gave ([`Endpoint::set_wall_clock`]); a timer re-applies it
//! when a member expires. An expired current document raises an alarm and stays in force:
//! cutting every peer off would only stop the network that must sign the next one.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_core::Rng;

use crate::durable;
use crate::identity::PeerId;
use crate::membership::{Digest, Ledger, Refusal, Refused, Signed};
use crate::wire::{CloseReason, FEATURE_MEMBERSHIP, Message};

use super::events::{Event, MembershipEvent, Source};
use super::{Conn, ConnId, Endpoint, Output, Timer};

/// Epochs a node keeps (to serve peers that are behind, and to tell forks).
pub const MEMBERSHIP_HISTORY: usize = 64;
/// First wait before a sync dial to a member is retried.
pub const SYNC_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Longest wait between sync dials to one member: after a partition heals, every member
/// hears of the newest epoch within about this long.
pub const SYNC_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Members a starting node dials to learn whether it missed an epoch.
pub const START_CONTACTS: usize = 3;
/// Sync connections open at once, at most.
pub const MAX_SYNC_DIALS: usize = 16;
/// Documents sent in one `Documents` message, at most (a peer further behind asks again).
pub const MAX_DOCUMENTS_PER_MESSAGE: usize = 64;
/// Bytes of documents in one `Documents` message, at most (and within the peer's limit).
pub const MAX_DOCUMENTS_BYTES: usize = 1 << 20;
/// Framing of a `Documents` message around its documents: kind and count.
const DOCUMENTS_OVERHEAD: usize = 3;
/// Framing of each document in it: its length.
const DOCUMENT_OVERHEAD: usize = 4;

/// What a peer said of its ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Heard {
    epoch: u64,
    digest: Digest,
}

/// Sync dials to one member.
#[derive(Debug, Clone, Copy)]
pub(super) struct SyncState {
    /// Not before this instant.
    next: Instant,
    backoff: Duration,
    /// The sync connection open to it, if any.
    conn: Option<ConnId>,
}

/// The endpoint's membership state (present once [`Endpoint::install_membership`] ran).
#[derive(Debug)]
pub(super) struct Membership {
    pub(super) ledger: Ledger,
    /// What each peer last said it holds.
    heard: BTreeMap<PeerId, Heard>,
    /// The epoch we last told each peer (on any connection).
    told: BTreeMap<PeerId, u64>,
    /// Peers asked for documents and not answered yet: on which connection, and the epoch
    /// asked after. Forgotten when that connection closes (the answer cannot come).
    asked: BTreeMap<PeerId, (ConnId, u64)>,
    /// Members to dial, and how soon.
    pub(super) sync: BTreeMap<PeerId, SyncState>,
    /// A document the application offered that skips ahead: offered again once the ledger
    /// catches up to the epoch before it.
    pending: Option<Signed>,
    /// Whether the expiry of the current document was reported.
    expiry_reported: bool,
    /// Members told about a document too large to send them (`Unsendable`), and its epoch:
    /// reported once each.
    unsendable: BTreeMap<PeerId, u64>,
}

/// What installing a membership found, for the driver to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The epoch in force.
    pub epoch: u64,
    /// Its digest.
    pub digest: Digest,
    /// The store held a ledger (it was resumed, the document given is checked against it).
    pub resumed: bool,
    /// What happened to the document the operator gave, when it was not simply installed.
    pub note: Option<String>,
}

/// Why a membership cannot be installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// The document given is not acceptable as a starting point.
    #[error("{0}")]
    Refused(Refused),
    /// The stored documents do not form a chain (a damaged or edited store).
    #[error("the stored membership is damaged: {0}")]
    Store(Refused),
    /// Neither a document nor a stored ledger.
    #[error("no membership document given and none stored")]
    Nothing,
}

/// The bytes of documents one Documents message may carry to a peer that takes messages
/// of at most `max_message_size` bytes.
fn documents_budget(max_message_size: usize) -> usize {
    max_message_size
        .min(MAX_DOCUMENTS_BYTES)
        .saturating_sub(DOCUMENTS_OVERHEAD)
}

impl Endpoint {
    /// The driver's wall clock: `unix_ms` (milliseconds since the Unix epoch) at `now`.
    /// Membership expiry is judged by it; call it when the endpoint starts (and whenever
    /// the wall clock may have jumped).
    pub fn set_wall_clock(&mut self, now: Instant, unix_ms: u64) {
        self.wall = Some((now, unix_ms));
        // Requests in IK message 1 sent before this endpoint first had a clock may be
        // recordings from before a restart: never taken as fresh.
        self.early_epoch.get_or_insert(unix_ms);
    }

    /// Unix seconds at `now`, by the reference [`Endpoint::set_wall_clock`] gave (0 without
    /// one: then nothing expires... except what expired before 1970).
    pub(super) fn unix_secs(&self, now: Instant) -> u64 {
        self.unix_ms(now).map_or(0, |ms| ms / 1000)
    }

    /// The wall clock at `now`, in Unix milliseconds, if the driver gave one.
    pub(super) fn unix_ms(&self, now: Instant) -> Option<u64> {
        let (at, ms) = self.wall?;
        let later = now.saturating_duration_since(at).as_millis();
        let earlier = at.saturating_duration_since(now).as_millis();
        let ms = u128::from(ms).saturating_add(later).saturating_sub(earlier);
        Some(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// Makes the allow list follow signed membership documents from now on: `document` is
    /// the one the operator installed (see [`Ledger::with_anchor`]); a durable endpoint
    /// resumes the ledger it stored (restored by [`Endpoint::restore`]), and `document` must
    /// then not be older than it nor fork from it (the stored one wins, and `note` says
    /// so). The allow list is replaced at once, and from then on only accepted documents
    /// change it.
    pub fn install_membership(
        &mut self,
        document: Option<Signed>,
        now: Instant,
    ) -> Result<Installed, InstallError> {
        let unix = self.unix_secs(now);
        let history = MEMBERSHIP_HISTORY;
        let stored = std::mem::take(&mut self.stored_membership);
        let resumed = Ledger::restore(stored, history).map_err(InstallError::Store)?;
        let mut note = None;
        let mut pending = None;
        let (ledger, resumed) = match (resumed, document) {
            (None, None) => return Err(InstallError::Nothing),
            (None, Some(doc)) => (
                Ledger::with_anchor(doc, unix, history).map_err(InstallError::Refused)?,
                false,
            ),
            (Some(ledger), None) => (ledger, true),
            (Some(mut ledger), Some(doc)) => {
                let (epoch, digest) = (doc.epoch(), doc.digest());
                let held = ledger.get(epoch).map(Signed::digest);
                if epoch == ledger.epoch() && held == Some(digest) {
                    // The same document.
                } else if epoch < ledger.epoch() && held.is_none_or(|h| h == digest) {
                    note = Some(format!(
                        "the document given (epoch {epoch}) is older than the stored epoch {}: \
                         kept the stored one",
                        ledger.epoch()
                    ));
                } else {
                    let offered = ledger.offer(std::slice::from_ref(&doc), unix, false);
                    if let Some(fork) = offered.fork {
                        note = Some(format!("{fork}: kept the stored one"));
                    } else if let Some(refused) = offered.refused {
                        if offered.wanted.is_some() {
                            pending = Some(doc);
                            note = Some(format!("{refused}; asking peers for the epochs between"));
                        } else {
                            note = Some(format!("{refused}: kept the stored epoch"));
                        }
                    }
                }
                (ledger, true)
            }
        };
        let installed = Installed {
            epoch: ledger.epoch(),
            digest: ledger.digest(),
            resumed,
            note,
        };
        if let Some(journal) = &mut self.journal {
            for doc in ledger.history() {
                journal.push(durable::put_membership(doc));
            }
        }
        self.membership = Some(Box::new(Membership {
            ledger,
            heard: BTreeMap::new(),
            told: BTreeMap::new(),
            asked: BTreeMap::new(),
            sync: BTreeMap::new(),
            pending,
            expiry_reported: false,
            unsendable: BTreeMap::new(),
        }));
        self.apply_membership_allow_list(now);
        self.plan_start_contacts(now);
        Ok(installed)
    }

    /// Whether signed membership documents govern the allow list.
    pub fn membership_managed(&self) -> bool {
        self.membership.is_some()
    }

    /// The ledger in force, if membership governs the allow list.
    pub fn membership(&self) -> Option<&Ledger> {
        self.membership.as_deref().map(|m| &m.ledger)
    }

    /// The epoch of a document the application offered that skips ahead, kept until the
    /// epochs between arrive from peers (then applied, or dropped if they overtake it).
    pub fn membership_pending(&self) -> Option<u64> {
        self.membership
            .as_deref()
            .and_then(|m| m.pending.as_ref())
            .map(Signed::epoch)
    }

    /// Members this node still means to dial (or is connected to) to spread or learn the
    /// membership: zero once every member it knows of has said it holds our epoch.
    pub fn membership_syncs(&self) -> usize {
        self.membership.as_deref().map_or(0, |m| m.sync.len())
    }

    /// What `peer` last said it holds (epoch), if it said.
    pub fn membership_heard(&self, peer: &PeerId) -> Option<u64> {
        self.membership
            .as_deref()
            .and_then(|m| m.heard.get(peer))
            .map(|h| h.epoch)
    }

    /// Offers a document (the operator's, from a file or the API): applied if it is the
    /// next epoch and acceptable, and spread to the members. A document that skips ahead
    /// is kept and applied once the epochs between arrive from peers. The outcome is also
    /// reported as an [`Event::Membership`].
    pub fn offer_membership(
        &mut self,
        document: Signed,
        now: Instant,
    ) -> Result<Vec<Signed>, Refused> {
        let Some(m) = self.membership.as_deref_mut() else {
            return Err(Refused {
                epoch: document.epoch(),
                digest: document.digest(),
                reasons: vec![Refusal::NeedsCurrent {
                    epoch: document.epoch(),
                }],
            });
        };
        if m.ledger.epoch() == document.epoch() && m.ledger.digest() == document.digest() {
            return Ok(Vec::new()); // In force already: nothing to do, nothing to report.
        }
        let (epoch, digest) = (document.epoch(), document.digest());
        // One this node could never pass on: refused before anything changes, so that an
        // operator's document never takes effect here while no member can receive it.
        let size = document.encode().len();
        let max = documents_budget(self.config.max_message_size).saturating_sub(DOCUMENT_OVERHEAD);
        if size > max {
            let refused = Refused {
                epoch,
                digest,
                reasons: vec![Refusal::TooLarge { size, max }],
            };
            self.stats.membership_refused += 1;
            self.events
                .push_back(Event::Membership(MembershipEvent::Refused {
                    source: Source::Local,
                    refused: refused.clone(),
                }));
            return Err(refused);
        }
        let out = self.offer_chain(Source::Local, std::slice::from_ref(&document), false, now);
        if out.wanted.is_some()
            && let Some(m) = self.membership.as_deref_mut()
        {
            m.pending = Some(document);
            self.fetch_from_ahead(now);
        }
        match (out.applied.is_empty(), out.refused, out.fork) {
            (false, _, _) => Ok(out.applied),
            (true, Some(refused), _) => Err(refused),
            (true, None, Some(fork)) => Err(Refused {
                epoch: fork.epoch,
                digest: fork.theirs,
                reasons: vec![Refusal::Fork {
                    epoch: fork.epoch,
                    ours: fork.ours,
                    theirs: fork.theirs,
                }],
            }),
            // An older epoch this node held (a rollback to it), or a copy refused before
            // (a fork of an epoch we hold, or stale): the operator hears why, every time.
            (true, None, None) => {
                let ledger = self.membership();
                let current = ledger.map_or(0, Ledger::epoch);
                let reason = match ledger.and_then(|l| l.get(epoch)).map(Signed::digest) {
                    Some(ours) if ours != digest => Refusal::Fork {
                        epoch,
                        ours,
                        theirs: digest,
                    },
                    _ => Refusal::Stale { epoch, current },
                };
                let refused = Refused {
                    epoch,
                    digest,
                    reasons: vec![reason],
                };
                self.stats.membership_refused += 1;
                self.events
                    .push_back(Event::Membership(MembershipEvent::Refused {
                        source: Source::Local,
                        refused: refused.clone(),
                    }));
                Err(refused)
            }
        }
    }

    // ----- the protocol -----

    /// A connection to `peer` is up (either direction): tell it our epoch, once per epoch.
    pub(super) fn membership_established(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let (peer, sync) = (c.peer, c.sync);
        if c.features & FEATURE_MEMBERSHIP == 0 {
            if sync {
                // A member that predates membership cannot learn an epoch: the dial was
                // for nothing, and another would be too.
                if let Some(m) = self.membership.as_deref_mut() {
                    m.sync.remove(&peer);
                }
                self.close(conn, CloseReason::Done, now);
                self.arm_sync_timer();
            }
            return;
        }
        let Some(m) = self.membership.as_deref_mut() else {
            return;
        };
        if sync || m.told.get(&peer) != Some(&m.ledger.epoch()) {
            self.send_epoch(conn);
        }
        if sync {
            self.arm_idle(conn, now);
        }
    }

    /// Sends our epoch on `conn` (once per connection).
    fn send_epoch(&mut self, conn: ConnId) {
        let Some(m) = self.membership.as_deref_mut() else {
            return;
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.epoch_sent || !c.established || c.features & FEATURE_MEMBERSHIP == 0 {
            return;
        }
        c.epoch_sent = true;
        let (epoch, digest) = (m.ledger.epoch(), m.ledger.digest());
        m.told.insert(c.peer, epoch);
        self.send(
            conn,
            Message::Epoch {
                epoch,
                digest: digest.0,
            },
        );
    }

    /// A membership message (`Epoch`, `Fetch`, `Documents`) from `peer` on `conn`.
    pub(super) fn on_membership_message(
        &mut self,
        conn: ConnId,
        peer: PeerId,
        message: Message,
        now: Instant,
    ) {
        if self.conns.get(&conn).is_some_and(|c| c.sync) {
            self.arm_idle(conn, now);
        }
        if self.membership.is_none() {
            return; // Not governed by documents: nothing to say, nothing to take.
        }
        match message {
            Message::Epoch { epoch, digest } => {
                self.on_epoch(conn, peer, epoch, Digest(digest), now)
            }
            Message::Fetch { after } => self.on_fetch(conn, peer, after, now),
            Message::Documents { docs } => self.on_documents(conn, peer, docs, now),
            _ => {}
        }
    }

    fn on_epoch(&mut self, conn: ConnId, peer: PeerId, epoch: u64, digest: Digest, now: Instant) {
        let owes_record = self.owes_record(&peer);
        let Some(m) = self.membership.as_deref_mut() else {
            return;
        };
        m.heard.insert(peer, Heard { epoch, digest });
        let (ours, our_digest) = (m.ledger.epoch(), m.ledger.digest());
        if epoch >= ours && !owes_record {
            // It holds ours (or newer), and our address record: no need to dial it any
            // more (a sync connection still open to it closes once both ends agree, or
            // when idle).
            m.sync.remove(&peer);
        }
        let known_fork = m
            .ledger
            .forks()
            .any(|f| f.epoch == epoch && f.theirs == digest);
        if epoch > ours {
            self.ask(conn, peer, ours);
        } else if epoch == ours && digest != our_digest && !known_fork {
            // Same epoch, another document: fetch theirs to see whether it is a fork.
            self.ask(conn, peer, ours.saturating_sub(1));
        }
        // Each end answers the other's first word on a connection with its own: a sync
        // dial always learns where the other stands, and one behind learns it is.
        self.send_epoch(conn);
        self.close_sync_if_done(conn, now);
    }

    fn on_fetch(&mut self, conn: ConnId, peer: PeerId, after: u64, now: Instant) {
        // Each Fetch costs us encoding and bandwidth: it draws on the peer's request budget.
        if !self.take_request_token(peer, now) {
            return;
        }
        let remote_max = self.conns.get(&conn).map_or(0, |c| c.remote_max);
        let Some(m) = self.membership.as_deref() else {
            return;
        };
        let budget = documents_budget(remote_max);
        let mut used = 0usize;
        let chain = m.ledger.chain_after(after, budget);
        let docs: Vec<Bytes> = chain
            .iter()
            .take(MAX_DOCUMENTS_PER_MESSAGE)
            .map(|doc| Bytes::from(doc.encode()))
            .take_while(|bytes| {
                used = used.saturating_add(bytes.len() + DOCUMENT_OVERHEAD);
                used <= budget
            })
            .collect();
        // The peer is behind and the next document does not fit: it can never catch up
        // through us, so say so (once per peer and epoch) rather than answer "nothing".
        // (Encoded again only then: every other answer encodes each document once.)
        if docs.is_empty()
            && let Some((epoch, size)) = chain.first().map(|d| (d.epoch(), d.encode().len()))
            && let Some(m) = self.membership.as_deref_mut()
            && m.unsendable.get(&peer) != Some(&epoch)
        {
            m.unsendable.insert(peer, epoch);
            self.stats.membership_unsendable += 1;
            self.events
                .push_back(Event::Membership(MembershipEvent::Unsendable {
                    peer,
                    epoch,
                    size,
                    max: budget.saturating_sub(DOCUMENT_OVERHEAD),
                }));
        }
        self.send(conn, Message::Documents { docs });
    }

    fn on_documents(&mut self, conn: ConnId, peer: PeerId, docs: Vec<Bytes>, now: Instant) {
        let mut chain = Vec::with_capacity(docs.len());
        for bytes in &docs {
            match Signed::decode(bytes) {
                Ok(doc) => chain.push(doc),
                Err(e) => {
                    let refused = Refused {
                        epoch: 0,
                        digest: Digest::NONE,
                        reasons: vec![Refusal::Malformed(e)],
                    };
                    self.events
                        .push_back(Event::Membership(MembershipEvent::Refused {
                            source: Source::Peer(peer),
                            refused,
                        }));
                    self.stats.membership_refused += 1;
                    return self.violation(conn, "malformed membership document", now);
                }
            }
        }
        let Some(m) = self.membership.as_deref_mut() else {
            return;
        };
        m.asked.remove(&peer);
        let claimed = m.heard.get(&peer).map_or(0, |h| h.epoch);
        let newer_exists = chain.last().is_some_and(|d| claimed > d.epoch());
        let out = self.offer_chain(Source::Peer(peer), &chain, newer_exists, now);
        if let Some(first) = out.wanted
            && let Some(m) = self.membership.as_deref_mut()
            && claimed >= first
        {
            // It skipped ahead: ask the same peer for the epochs between.
            let _ = m;
            self.ask(conn, peer, first.saturating_sub(1));
        } else if out.applied.is_empty()
            && let Some(m) = self.membership.as_deref_mut()
            && claimed > m.ledger.epoch()
            && chain.is_empty()
        {
            // It claims more than it can give (its history does not reach back to us):
            // another member must serve us.
            m.heard.remove(&peer);
        }
        self.close_sync_if_done(conn, now);
    }

    /// Offers `chain` to the ledger and acts on the result: applies, stores, reports.
    fn offer_chain(
        &mut self,
        source: Source,
        chain: &[Signed],
        newer_exists: bool,
        now: Instant,
    ) -> crate::membership::Offered {
        let unix = self.unix_secs(now);
        let Some(m) = self.membership.as_deref_mut() else {
            return crate::membership::Offered::default();
        };
        let oldest_before = m.ledger.history().next().map_or(0, Signed::epoch);
        let mut out = m.ledger.offer(chain, unix, newer_exists);
        if self.sabotaged(super::Sabotage::MembershipIgnoresSignatures)
            && out.applied.is_empty()
            && let Some(refused) = out.refused.take()
            && let Some(doc) = chain.iter().find(|d| d.digest() == refused.digest)
            && let Some(m) = self.membership.as_deref_mut()
        {
            m.ledger = Ledger::trusting(doc.clone(), MEMBERSHIP_HISTORY);
            out.applied = vec![doc.clone()];
        }
        if let Some(refused) = &out.refused {
            self.stats.membership_refused += 1;
            self.events
                .push_back(Event::Membership(MembershipEvent::Refused {
                    source,
                    refused: refused.clone(),
                }));
        }
        if let Some(fork) = out.fork {
            self.stats.membership_forks += 1;
            self.events
                .push_back(Event::Membership(MembershipEvent::Fork { source, fork }));
        }
        if !out.applied.is_empty() {
            self.applied(source, &out.applied, oldest_before, now);
        }
        out
    }

    /// Documents were accepted: store them, replace the allow list, report, spread.
    fn applied(&mut self, source: Source, applied: &[Signed], oldest_before: u64, now: Instant) {
        let Some(m) = self.membership.as_deref_mut() else {
            return;
        };
        m.expiry_reported = false;
        let (epoch, digest) = (m.ledger.epoch(), m.ledger.digest());
        let oldest_now = m.ledger.history().next().map_or(0, Signed::epoch);
        if let Some(journal) = &mut self.journal {
            for doc in applied {
                journal.push(durable::put_membership(doc));
            }
            for gone in oldest_before..oldest_now {
                journal.push(durable::delete_membership(gone));
            }
        }
        self.stats.membership_applied += applied.len() as u64;
        let before: Vec<PeerId> = self.allow.peers().map(|(p, _)| *p).collect();
        self.apply_membership_allow_list(now);
        let after: Vec<PeerId> = self.allow.peers().map(|(p, _)| *p).collect();
        let added = after
            .iter()
            .filter(|p| before.binary_search(p).is_err())
            .copied()
            .collect();
        let removed: Vec<PeerId> = before
            .iter()
            .filter(|p| after.binary_search(p).is_err())
            .copied()
            .collect();
        for peer in &removed {
            self.forget_membership_peer(peer);
        }
        self.events
            .push_back(Event::Membership(MembershipEvent::Applied {
                epoch,
                digest,
                source,
                added,
                removed,
            }));
        self.spread(now);
        self.records_after_epoch(now);
        // A document the application gave that waited for these epochs may follow now.
        let pending = self.membership.as_deref_mut().and_then(|m| {
            let next = m.ledger.epoch().saturating_add(1);
            match &m.pending {
                Some(doc) if doc.epoch() == next => m.pending.take(),
                Some(doc) if doc.epoch() < next => {
                    m.pending = None;
                    None
                }
                _ => None,
            }
        });
        if let Some(doc) = pending {
            self.offer_chain(Source::Local, &[doc], false, now);
        }
    }

    /// Tells every connected member our new epoch, and plans sync dials to every member
    /// with an address that has not said it holds it.
    fn spread(&mut self, now: Instant) {
        if self.sabotaged(super::Sabotage::MembershipNoSpread) {
            return;
        }
        let dialable = self.dialable(now);
        let Some(m) = self.membership.as_deref_mut() else {
            return;
        };
        let (ours, digest) = (m.ledger.epoch(), m.ledger.digest());
        let mut told = Vec::new();
        for (conn, c) in &self.conns {
            if c.established
                && c.features & FEATURE_MEMBERSHIP != 0
                && m.told.get(&c.peer) != Some(&ours)
                && !told.iter().any(|(_, p)| *p == c.peer)
            {
                told.push((*conn, c.peer));
            }
        }
        for (_, peer) in &told {
            m.told.insert(*peer, ours);
        }
        let behind: Vec<PeerId> = dialable
            .into_iter()
            .filter(|peer| m.heard.get(peer).is_none_or(|h| h.epoch < ours))
            .collect();
        for (conn, _) in told {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.epoch_sent = true;
            }
            self.send(
                conn,
                Message::Epoch {
                    epoch: ours,
                    digest: digest.0,
                },
            );
        }
        self.plan_sync(behind, now);
    }

    /// Plans sync dials to `peers`, soon: every member that applies an epoch (or publishes
    /// a record) dials the others, and the jitter keeps them from all dialing in the same
    /// instant. A dial already due stays due.
    pub(super) fn plan_sync(&mut self, peers: Vec<PeerId>, now: Instant) {
        let Some(m) = self.membership.as_deref_mut() else {
            return;
        };
        for peer in peers {
            let jitter = Duration::from_millis(self.rng.next_u64() % 200);
            let entry = m.sync.entry(peer).or_insert(SyncState {
                next: now + jitter,
                backoff: SYNC_BACKOFF_INITIAL,
                conn: None,
            });
            entry.next = entry.next.min(now + jitter);
            entry.backoff = SYNC_BACKOFF_INITIAL;
        }
        self.arm_sync_timer();
    }

    /// The members this node can dial (an address from a record or the document; not
    /// inactive), itself excepted. In the document's order.
    fn dialable(&self, now: Instant) -> Vec<PeerId> {
        let Some(m) = self.membership.as_deref() else {
            return Vec::new();
        };
        m.ledger
            .current()
            .document()
            .members
            .iter()
            .map(crate::membership::Member::peer_id)
            .filter(|peer| *peer != self.local && self.member_address(peer, now).is_some())
            .collect()
    }

    /// Where to dial member `peer`: its record's address, else the document's (never an
    /// inactive member's).
    fn member_address(&self, peer: &PeerId, now: Instant) -> Option<std::net::SocketAddr> {
        if let Some(record) = self.record_of(peer, now) {
            return record.addresses.first().copied();
        }
        if self.lapsed(peer) {
            return None;
        }
        self.membership
            .as_deref()?
            .ledger
            .current()
            .document()
            .member(peer)
            .and_then(|member| member.address)
    }

    /// A starting node asks a few members (chosen by the seeded RNG) whether it missed an
    /// epoch.
    fn plan_start_contacts(&mut self, now: Instant) {
        let mut candidates: Vec<PeerId> = self.dialable(now);
        let Some(m) = self.membership.as_deref_mut() else {
            return;
        };
        for _ in 0..START_CONTACTS.min(candidates.len()) {
            let i = usize::try_from(self.rng.next_u64() % candidates.len() as u64).unwrap_or(0);
            let peer = candidates.swap_remove(i);
            let jitter = Duration::from_millis(self.rng.next_u64() % 500);
            m.sync.insert(
                peer,
                SyncState {
                    next: now + jitter,
                    backoff: SYNC_BACKOFF_INITIAL,
                    conn: None,
                },
            );
        }
        self.arm_sync_timer();
    }

    fn arm_sync_timer(&mut self) {
        let Some(m) = self.membership.as_deref() else {
            return;
        };
        match m
            .sync
            .values()
            .filter(|s| s.conn.is_none())
            .map(|s| s.next)
            .min()
        {
            Some(at) => self.timers.set(Timer::MembershipSync, at),
            None => self.timers.cancel(Timer::MembershipSync),
        }
    }

    /// The sync timer fired: dial the members that are due (within [`MAX_SYNC_DIALS`]).
    pub(super) fn on_sync_timer(&mut self, now: Instant) {
        if self.shutting_down || self.draining {
            return;
        }
        let Some(m) = self.membership.as_deref() else {
            return;
        };
        let open = m.sync.values().filter(|s| s.conn.is_some()).count();
        let due: Vec<PeerId> = m
            .sync
            .iter()
            .filter(|(_, s)| s.conn.is_none() && s.next <= now)
            .map(|(p, _)| *p)
            .take(MAX_SYNC_DIALS.saturating_sub(open))
            .collect();
        for peer in due {
            let Some(addr) = self.member_address(&peer, now) else {
                if let Some(m) = self.membership.as_deref_mut() {
                    m.sync.remove(&peer);
                }
                continue;
            };
            // Tracked like any peer we talk to (bounded by `max_tracked_peers`).
            let Some(state) = self.peer_mut(peer, now) else {
                continue;
            };
            state.conns += 1;
            let conn = self.alloc_conn();
            self.conns
                .insert(conn, Conn::dialing(peer, addr, None, true));
            self.stats.membership_sync_dials += 1;
            // The idle timer bounds the dial too (a black hole never answers).
            self.timers
                .set(Timer::Idle(conn), now + self.config.connect_timeout);
            if let Some(s) = self
                .membership
                .as_deref_mut()
                .and_then(|m| m.sync.get_mut(&peer))
            {
                s.conn = Some(conn);
            }
            self.push_dial(conn, peer, addr, None, now);
        }
        self.arm_sync_timer();
    }

    /// A sync connection ended: if its member still has not said it holds our epoch, dial
    /// again after a longer wait.
    pub(super) fn sync_closed(&mut self, conn: ConnId, peer: PeerId, now: Instant) {
        let Some(m) = self.membership.as_deref_mut() else {
            return;
        };
        if let Some(s) = m.sync.get_mut(&peer)
            && s.conn == Some(conn)
        {
            s.conn = None;
            s.next = now + s.backoff;
            s.backoff = (s.backoff * 2).min(SYNC_BACKOFF_MAX);
        }
        self.arm_sync_timer();
    }

    /// Asks `peer` on `conn` for the documents after `after`, unless that question is
    /// already open.
    fn ask(&mut self, conn: ConnId, peer: PeerId, after: u64) {
        let Some(m) = self.membership.as_deref_mut() else {
            return;
        };
        if m.asked.get(&peer).is_some_and(|(_, a)| *a == after) {
            return;
        }
        m.asked.insert(peer, (conn, after));
        self.send(conn, Message::Fetch { after });
    }

    /// Whether a question we asked on `conn` is still open.
    pub(super) fn membership_asking_on(&self, conn: ConnId) -> bool {
        self.membership
            .as_deref()
            .is_some_and(|m| m.asked.values().any(|(c, _)| *c == conn))
    }

    /// A connection closed: a question asked on it will not be answered.
    pub(super) fn membership_conn_closed(&mut self, conn: ConnId) {
        if let Some(m) = self.membership.as_deref_mut() {
            m.asked.retain(|_, (c, _)| *c != conn);
        }
    }

    /// A sync connection whose two ends hold the same epoch (and have told each other
    /// their address records) has done its work.
    pub(super) fn close_sync_if_done(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if !c.sync {
            return;
        }
        let peer = c.peer;
        if self.records_pending_on(conn) {
            return;
        }
        let Some(m) = self.membership.as_deref() else {
            return;
        };
        // The same epoch: the same document, or a fork already reported.
        let same = m
            .heard
            .get(&peer)
            .is_some_and(|h| h.epoch == m.ledger.epoch());
        if same && !m.asked.contains_key(&peer) {
            if let Some(m) = self.membership.as_deref_mut() {
                m.sync.remove(&peer);
            }
            self.close(conn, CloseReason::Done, now);
            self.arm_sync_timer();
        }
    }

    /// Asks every connected peer that claims a later epoch for what we lack.
    fn fetch_from_ahead(&mut self, _now: Instant) {
        let Some(m) = self.membership.as_deref_mut() else {
            return;
        };
        let ours = m.ledger.epoch();
        let mut asks = Vec::new();
        for (conn, c) in &self.conns {
            if c.established
                && c.features & FEATURE_MEMBERSHIP != 0
                && m.heard.get(&c.peer).is_some_and(|h| h.epoch > ours)
                && !asks.iter().any(|(_, p)| *p == c.peer)
            {
                asks.push((*conn, c.peer));
            }
        }
        for (conn, peer) in asks {
            self.ask(conn, peer, ours);
        }
    }

    /// Replaces the allow list with the current document's members unexpired now, tells
    /// the driver, and sets the timer for the next expiry (of a member, or the document).
    pub(super) fn apply_membership_allow_list(&mut self, now: Instant) {
        let unix = self.unix_secs(now);
        let Some(m) = self.membership.as_deref_mut() else {
            return;
        };
        let document = m.ledger.current().document();
        let full = document.allow_list();
        let mut list = crate::allow_list::AllowList::new();
        let mut next: Option<u64> = None;
        for member in &document.members {
            match member.expires {
                Some(at) if at <= unix => continue,
                Some(at) => next = Some(next.map_or(at, |n| n.min(at))),
                None => {}
            }
            let peer = member.peer_id();
            let mut entry = full.get(&peer).cloned().unwrap_or_default();
            entry.expires = None; // Judged here, by the endpoint's clock.
            list.insert(peer, entry);
        }
        let expired_doc = document.expires.is_some_and(|at| at <= unix);
        if let Some(at) = document.expires.filter(|at| *at > unix) {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        let report_expiry = expired_doc && !m.expiry_reported;
        m.expiry_reported |= expired_doc;
        let (epoch, digest) = (m.ledger.epoch(), m.ledger.digest());
        if report_expiry {
            self.events
                .push_back(Event::Membership(MembershipEvent::Expired {
                    epoch,
                    digest,
                }));
        }
        match next {
            Some(at) => {
                let wait = Duration::from_secs(at.saturating_sub(unix));
                self.timers.set(Timer::MembershipExpiry, now + wait);
            }
            None => self.timers.cancel(Timer::MembershipExpiry),
        }
        if list != self.allow {
            self.set_allow_list(list.clone(), now);
            self.outputs.push_back(Output::AllowList(list));
        }
    }

    /// What `peer` last said of its epoch.
    pub(super) fn heard_epoch(&self, peer: &PeerId) -> Option<u64> {
        self.membership.as_deref()?.heard.get(peer).map(|h| h.epoch)
    }

    /// A peer left the membership: what we knew of its ledger goes with it.
    pub(super) fn forget_membership_peer(&mut self, peer: &PeerId) {
        if let Some(m) = self.membership.as_deref_mut() {
            m.heard.remove(peer);
            m.told.remove(peer);
            m.asked.remove(peer);
            m.sync.remove(peer);
        }
    }
}
