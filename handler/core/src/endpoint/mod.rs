//! The exchange state machine for every peer of one node. No I/O, no clock, no OS randomness.
//!
//! # Call order (for drivers)
//!
//! Methods fall in four kinds, as in quinn-proto:
//!
//! * getters: [`Endpoint::local_peer_id`], [`Endpoint::stats`], ...;
//! * commands from the application: [`Endpoint::request`], [`Endpoint::respond`],
//!   [`Endpoint::allow`], [`Endpoint::revoke`], [`Endpoint::shutdown`];
//! * inputs from the network and the clock, each carrying `now`:
//!   [`Endpoint::handle_accepted`], [`Endpoint::handle_conn_event`],
//!   [`Endpoint::handle_rejected`], [`Endpoint::handle_timeout`];
//! * outputs, polled after every command or input until they return `None`:
//!   [`Endpoint::poll_output`] (dial, send, close: perform in order),
//!   [`Endpoint::poll_event`] (for the application), then [`Endpoint::poll_timeout`] (call
//!   `handle_timeout` at that instant at the latest).
//!
//! # Roles
//!
//! The node that dials a connection is its *dialer* and sends Requests on it; the node that
//! accepted it is the *responder* and sends Replies. A node is both at once, on different
//! connections. Each role has its own file with its state diagram beside its transitions:
//! `dialer.rs` (our exchanges) and `responder.rs` (a peer's). `conns.rs` keeps the
//! connection bookkeeping both share, `events.rs` what the endpoint reports, and
//! `invariants.rs` the cross-table checks the tests run after every step.

mod conns;
mod dialer;
mod events;
#[cfg(any(test, feature = "invariants"))]
mod invariants;
mod membership;
mod records;
mod recovery;
mod responder;

pub use dialer::Deadline;
pub use events::{
    Event, Failure, KeyedExchange, LimitKind, MembershipEvent, PeerError, PeerSummary, Progress,
    Receipt, RecordEvent, RequestError, RespondError, RetryCause, Source, Stats,
};
pub use membership::{
    InstallError, Installed, MAX_DOCUMENTS_BYTES, MAX_DOCUMENTS_PER_MESSAGE, MAX_SYNC_DIALS,
    MEMBERSHIP_HISTORY, START_CONTACTS, SYNC_BACKOFF_INITIAL, SYNC_BACKOFF_MAX,
};
pub use records::{
    DEFAULT_RECORD_TTL, MAX_RECORDS_BYTES, MIN_RECORD_TTL, REFRESH_AT_QUARTERS, RecordSettings,
    RecordsError,
};
pub use responder::{DEDUPE_RECORD_COST, SETTLED_WINDOW};

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

use crate::allow_list::{AllowList, AllowedPeer};
use crate::config::{Config, ConfigError};
use crate::connection::{ConnError, ConnEvent};
use crate::durable::{self, KvOp};
use crate::identity::PeerId;
use crate::rate::Bucket;
use crate::timers::Timers;
use crate::wire::{AbortReason, CloseReason, ExchangeId, Message};

use dialer::{OutState, Outbound};
use responder::{InState, Inbound};

/// The longest idempotency key ([`Endpoint::request_with`]), in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// How far from our wall clock the timestamp of a Request in an IK message 1 may be for it
/// to be taken at once (farther, it is Nacked `EarlyRefused` and sent again on the
/// session). It bounds how long a replay is worth keeping, and how far a stamp can move a
/// dialer's replay floor ahead of our clock.
pub const EARLY_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Names one connection for the lifetime of an [`Endpoint`].
///
/// Two id spaces, so the two sides that open connections never collide: the endpoint numbers
/// the connections it dials (in [`Output::Dial`]); the driver numbers the ones it accepts with
/// [`ConnId::inbound`] and passes them to [`Endpoint::handle_accepted`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(u64);

const INBOUND_BIT: u64 = 1 << 63;

impl ConnId {
    /// The `n`th connection the driver accepted.
    pub fn inbound(n: u64) -> Self {
        Self(n | INBOUND_BIT)
    }

    fn outbound(n: u64) -> Self {
        Self(n & !INBOUND_BIT)
    }

    /// The id the endpoint gives its `n`th dial (tests forge events for it).
    #[cfg(test)]
    pub(crate) fn outbound_for_tests(n: u64) -> Self {
        Self::outbound(n)
    }

    /// Whether this id names an accepted connection.
    pub fn is_inbound(self) -> bool {
        self.0 & INBOUND_BIT != 0
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = if self.is_inbound() { 'i' } else { 'c' };
        write!(f, "{prefix}{}", self.0 & !INBOUND_BIT)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Who opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    /// We dialed it: we are the dialer, we send Requests.
    Outbound,
    /// We accepted it: we are the responder, we send Replies.
    Inbound,
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Open a connection to `peer` at `addr` and run the dialer handshake expecting `peer`.
    /// Report the result with [`Endpoint::handle_conn_event`] on `conn`.
    Dial {
        /// The id the endpoint gave this connection.
        conn: ConnId,
        /// Expected peer.
        peer: PeerId,
        /// Where.
        addr: SocketAddr,
        /// The peer's static public key, when the endpoint knows it (an allow-list entry or
        /// a membership document gives it) and the peer is not known to lack IK: dial with
        /// [`crate::Connection::dial_ik`]; otherwise with [`crate::Connection::dial`].
        key: Option<[u8; crate::identity::KEY_LEN]>,
        /// With a key: the exchange's Request to carry in IK message 1, and its timestamp
        /// (the endpoint's wall clock, Unix ms): `Connection::dial_ik`'s `early`.
        early: Option<(u64, Message)>,
        /// With a key: a ticket the peer gave us, to redeem in message 1.
        ticket: Option<crate::guard::Ticket>,
    },
    /// Send a message on an established connection.
    Send {
        /// Where.
        conn: ConnId,
        /// To whom (the connection's peer: the driver may no longer find it through
        /// [`Endpoint::peer_of`] when the same input also closed the connection).
        peer: PeerId,
        /// What.
        message: Message,
    },
    /// Send `Close{reason}` (if established), flush, and drop the connection. The endpoint
    /// has already forgotten it; later events for it are ignored.
    Close {
        /// Which.
        conn: ConnId,
        /// Its peer, when the connection is established: a Close message to it then goes
        /// first, and passes the driver's tap like any other.
        peer: Option<PeerId>,
        /// Why.
        reason: CloseReason,
    },
    /// The allow list changed by itself (a membership document was applied, or a member
    /// expired): handshakes must check this one from now on.
    AllowList(AllowList),
}

/// Timer kinds; one slot each per exchange or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    Outbound(ExchangeId),
    Inbound(PeerId, ExchangeId),
    /// A held Ack (see `Config::ack_delay`) is due.
    Ack(PeerId, ExchangeId),
    /// Our exchange's deadline ([`Endpoint::request_with_deadline`]).
    Deadline(ExchangeId),
    Idle(ConnId),
    /// Sync dials to members are due.
    MembershipSync,
    /// A member, or the membership document, expires.
    MembershipExpiry,
    /// Our address record is due for a refresh.
    RecordRefresh,
    /// A member's address record expires.
    RecordExpiry,
}

#[derive(Debug)]
pub(super) struct Conn {
    pub(super) peer: PeerId,
    pub(super) addr: SocketAddr,
    pub(super) direction: Direction,
    pub(super) established: bool,
    /// The exchange in progress on this connection: ours (outbound) or the peer's (inbound).
    pub(super) exchange: Option<ExchangeId>,
    /// The remote's advertised maximum payload.
    pub(super) remote_max: usize,
    /// A large message is arriving on it (`ConnEvent::Receiving`, until it is complete):
    /// the timers that wait for it, and its idle timer, wait on; the connection's own stall
    /// guard bounds the transfer.
    pub(super) receiving: bool,
    /// The optional features the peer announced in its hello (`wire::FEATURES` bits).
    pub(super) features: u32,
    /// Dialed only to spread or learn the membership (no exchange ever uses it).
    pub(super) sync: bool,
    /// Our epoch was sent on it (each end answers the other's first `Epoch` with its own).
    pub(super) epoch_sent: bool,
    /// Dialed with the IK pattern (the responder's key was known).
    pub(super) ik: bool,
    /// Its exchange's Request rode in IK message 1 (0-RTT).
    pub(super) early: bool,
    /// The ticket its IK message 1 redeems: back to the peer's tickets if the dial fails
    /// before its handshake (the responder may never have seen it).
    pub(super) ticket: Option<crate::guard::Ticket>,
    /// Our `RecordSeqs` was sent on it.
    pub(super) records_sent: bool,
    /// The peer's `RecordSeqs` arrived on it.
    pub(super) records_heard: bool,
}

impl Conn {
    /// A connection we are dialing, for exchange `exchange` or (`sync`) for membership.
    pub(super) fn dialing(
        peer: PeerId,
        addr: SocketAddr,
        exchange: Option<ExchangeId>,
        sync: bool,
    ) -> Self {
        Self {
            peer,
            addr,
            direction: Direction::Outbound,
            established: false,
            exchange,
            remote_max: 0,
            receiving: false,
            features: 0,
            sync,
            epoch_sent: false,
            ik: false,
            early: false,
            ticket: None,
            records_sent: false,
            records_heard: false,
        }
    }
}

#[derive(Debug)]
pub(super) struct Peer {
    /// Our exchange in progress with this peer (one at a time).
    pub(super) active: Option<ExchangeId>,
    /// Our exchanges waiting for it, oldest first.
    pub(super) queue: VecDeque<ExchangeId>,
    /// An idle outbound connection kept for reuse.
    pub(super) reusable: Option<ConnId>,
    /// Open connections, both directions.
    pub(super) conns: usize,
    /// Inbound exchange ids remembered for deduplication, oldest first. They outlive a
    /// revocation (a re-allowed peer cannot replay them); they go when evicted to make room
    /// (`dedupe_per_peer`, `dedupe_bytes`) or with the peer's whole state when the peer is
    /// evicted from tracking (`max_tracked_peers`).
    pub(super) seen: VecDeque<ExchangeId>,
    pub(super) requests: Bucket,
    pub(super) connections: Bucket,
    pub(super) strikes: u32,
    /// An IK dial to it failed before the handshake finished, or its hello lacked
    /// `FEATURE_IK`: dial it with XX until a hello says it takes IK.
    pub(super) xx_only: bool,
    /// An IK dial to it timed out: dial it with XX once (see `ik_dial_failed`).
    pub(super) xx_next: bool,
    /// Dialer: the timestamp of the last Request we sent it in an IK message 1 (Unix ms);
    /// the next is later, even if our clock is not.
    pub(super) early_sent: u64,
    /// Responder: the timestamp of the last Request in an IK message 1 taken from it as
    /// fresh; a message 1 stamped at or before it is a replay (or reordered).
    pub(super) early_floor: u64,
    /// Its static key, learned from a handshake (an XX one tells it): dial it with IK from
    /// now on even if the allow list gives no key.
    pub(super) learned_key: Option<[u8; crate::identity::KEY_LEN]>,
    /// Dialer: tickets it gave us in IK message 2s, oldest first (at most
    /// [`crate::guard::TICKETS_PER_PEER`]); the next IK dial redeems the newest.
    pub(super) tickets: VecDeque<crate::guard::Ticket>,
}

/// A defect planted on purpose in an endpoint, so that a checker can be seen to catch it.
/// Only [`Endpoint::sabotage`] (feature `sabotage`) plants one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sabotage {
    /// A resent request reaches the application again (dedupe off).
    NoDedupe,
    /// Every outcome of ours is reported twice.
    DoubleOutcome,
    /// Requests are acknowledged but never handed to the application.
    SwallowDelivery,
    /// One attempt more than `max_attempts`.
    ExtraResend,
    /// Idle connections are never closed.
    KeepIdleConnections,
    /// Retries wait a hundred times longer than configured.
    SlowRetries,
    /// A membership document refused for its signatures is applied all the same.
    MembershipIgnoresSignatures,
    /// A node that applies a membership document tells no one.
    MembershipNoSpread,
    /// Address records whose signature is not their owner's are taken all the same.
    RecordsIgnoreSignatures,
    /// Address records are never passed to other members (own or relayed).
    RecordsNoSpread,
    /// A peer's queued exchanges start newest first.
    QueueOutOfOrder,
    /// A Request sent on a reused connection repeats the previous attempt number.
    AttemptRepeated,
    /// A Reply of an exchange already finished (a repeat) is not acknowledged.
    NoAckOfRepeatedReply,
    /// A reply whose Ack never came is dropped without telling the application.
    SilentUnconfirmed,
    /// Revoking a peer keeps its connections open.
    RevokeKeepsConnections,
    /// A request of exactly `max_message_size` bytes is refused as too large.
    OffByOneMaxSize,
    /// The dedupe table keeps one record more than `dedupe_bytes` allows.
    DedupeOverBound,
    /// Requests handed to the application are not counted in `Stats::requests_delivered`.
    UncountedDelivery,
    /// A peer that breaks the protocol is disconnected without a word to the application.
    UnreportedViolation,
    /// A Request taken from IK message 1 is not counted in `Stats::early_requests_taken`.
    UncountedEarlyRequest,
}

impl Sabotage {
    /// Every defect, for tools that plant each in turn.
    pub const ALL: [Sabotage; 20] = [
        Sabotage::NoDedupe,
        Sabotage::DoubleOutcome,
        Sabotage::SwallowDelivery,
        Sabotage::ExtraResend,
        Sabotage::KeepIdleConnections,
        Sabotage::SlowRetries,
        Sabotage::MembershipIgnoresSignatures,
        Sabotage::MembershipNoSpread,
        Sabotage::RecordsIgnoreSignatures,
        Sabotage::RecordsNoSpread,
        Sabotage::QueueOutOfOrder,
        Sabotage::AttemptRepeated,
        Sabotage::NoAckOfRepeatedReply,
        Sabotage::SilentUnconfirmed,
        Sabotage::RevokeKeepsConnections,
        Sabotage::OffByOneMaxSize,
        Sabotage::DedupeOverBound,
        Sabotage::UncountedDelivery,
        Sabotage::UnreportedViolation,
        Sabotage::UncountedEarlyRequest,
    ];
}

/// The exchange state machine of one node. See the module docs for the call order.
pub struct Endpoint {
    config: Config,
    local: PeerId,
    allow: AllowList,
    rng: ChaCha20Rng,
    next_exchange: u64,
    next_conn: u64,
    shutting_down: bool,
    /// A graceful stop began ([`Endpoint::drain`]): new work is refused, started work goes on.
    draining: bool,
    /// A defect planted on purpose ([`Endpoint::sabotage`]).
    #[cfg(feature = "sabotage")]
    sabotage: Option<Sabotage>,
    outbound: BTreeMap<ExchangeId, Outbound>,
    inbound: BTreeMap<(PeerId, ExchangeId), Inbound>,
    peers: BTreeMap<PeerId, Peer>,
    conns: BTreeMap<ConnId, Conn>,
    /// Inbound requests handed to the application and not answered yet.
    pending_inbound: usize,
    /// Bytes of replies held for resending, and the records holding them, oldest first.
    cache_bytes: usize,
    cache_order: VecDeque<(PeerId, ExchangeId)>,
    /// Every inbound record, oldest first (lazily compacted): the global eviction order of
    /// `dedupe_bytes`.
    dedupe_order: VecDeque<(PeerId, ExchangeId)>,
    /// Each peer's settled floor: the highest exchange id of it whose record was forgotten.
    /// A request at or below it (within [`SETTLED_WINDOW`]) that no record remembers is a
    /// stale copy of a settled exchange, refused rather than delivered again. Outlives the
    /// records and the peer's tracking state, bounded by `4 * max_tracked_peers` floors.
    settled: BTreeMap<PeerId, responder::Floor>,
    /// Idempotency keys in use: of our unfinished exchanges, and of finished ones whose
    /// outcome the application has not settled yet.
    keys: BTreeMap<(PeerId, Bytes), ExchangeId>,
    /// Outcomes of finished keyed exchanges, until the application settles them
    /// ([`Endpoint::outcome_settled`]), so that [`Endpoint::lookup`] can tell them. Bounded
    /// by the driver's `max_unread_outcomes`.
    keyed_outcomes: BTreeMap<ExchangeId, (Bytes, Event)>,
    /// Durable mode: responder outcomes the application has not taken yet, and the seq
    /// each is stored under (so that a restart hands them out again). At most
    /// `max_unread_outcomes`: past that, the oldest is no longer kept for a restart.
    unread_responses: BTreeMap<(PeerId, ExchangeId), u64>,
    /// Order of acceptance of records, kept across restarts (durable mode).
    next_seq: u64,
    /// Durable mode: the writes the driver must commit before acting on this step's outputs.
    journal: Option<Vec<KvOp>>,
    /// Exchange ids left in the block reserved in the store (durable mode).
    ids_left: u64,
    timers: Timers<Timer>,
    outputs: VecDeque<Output>,
    events: VecDeque<Event>,
    stats: Stats,
    /// The driver's wall clock: Unix milliseconds at an instant.
    wall: Option<(Instant, u64)>,
    /// The wall clock (Unix ms) when this endpoint first had one: a Request in an IK
    /// message 1 stamped earlier is never taken as fresh (it may be a recording of a
    /// message 1 sent to an earlier incarnation).
    early_epoch: Option<u64>,
    /// Signed membership, once installed: it governs the allow list.
    membership: Option<Box<membership::Membership>>,
    /// Documents the store held, until [`Endpoint::install_membership`] takes them.
    stored_membership: Vec<crate::membership::Signed>,
    /// Address records, once installed (they need the membership).
    records: Option<Box<records::Records>>,
    /// Records the store held (owner, seq, sealed), until [`Endpoint::install_records`]
    /// takes them.
    stored_records: Vec<(PeerId, u64, Bytes)>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("local", &self.local)
            .field("outbound", &self.outbound.len())
            .field("inbound", &self.inbound.len())
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// A new endpoint for the node `local`, in memory only. All randomness (exchange ids,
    /// jitter) comes from `rng_seed`: a driver that restarts a node without a store must
    /// give each incarnation another seed (the async driver mixes in an incarnation nonce),
    /// or the new incarnation would reuse the exchange ids of the old one. Call
    /// [`Endpoint::restore`] before anything else to make it durable.
    pub fn new(
        config: Config,
        local: PeerId,
        allow: AllowList,
        rng_seed: [u8; 32],
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut rng = ChaCha20Rng::from_seed(rng_seed);
        Ok(Self {
            next_exchange: rng.next_u64(),
            rng,
            config,
            local,
            allow,
            next_conn: 1,
            shutting_down: false,
            draining: false,
            #[cfg(feature = "sabotage")]
            sabotage: None,
            outbound: BTreeMap::new(),
            inbound: BTreeMap::new(),
            peers: BTreeMap::new(),
            conns: BTreeMap::new(),
            pending_inbound: 0,
            cache_bytes: 0,
            cache_order: VecDeque::new(),
            dedupe_order: VecDeque::new(),
            settled: BTreeMap::new(),
            keys: BTreeMap::new(),
            keyed_outcomes: BTreeMap::new(),
            unread_responses: BTreeMap::new(),
            next_seq: 0,
            journal: None,
            ids_left: 0,
            timers: Timers::new(),
            outputs: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            wall: None,
            early_epoch: None,
            membership: None,
            stored_membership: Vec::new(),
            records: None,
            stored_records: Vec::new(),
        })
    }

    /// Mixes `nonce` into where this endpoint's exchange ids start. A driver that may
    /// restart a node without a store calls it with a value that differs per incarnation, so
    /// that a restart with the same seed never reuses an id (a responder that remembers an
    /// id takes a reuse for a resend). Jitter and everything else still come from the seed
    /// alone. A durable endpoint's ids come from its store instead. Call before any request.
    pub fn vary_exchange_ids(&mut self, nonce: u64) {
        // SplitMix64 of the xor: any change of the nonce moves the start far away.
        let mut z = (self.next_exchange ^ nonce).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.next_exchange = z ^ (z >> 31);
    }

    // ----- getters -----

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The allow list in force.
    pub fn allow_list(&self) -> &AllowList {
        &self.allow
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Open (or opening) connections.
    pub fn open_connections(&self) -> usize {
        self.conns.len()
    }

    /// The peer on connection `conn`, if the endpoint knows the connection.
    pub fn peer_of(&self, conn: ConnId) -> Option<PeerId> {
        self.conns.get(&conn).map(|c| c.peer)
    }

    /// Every exchange's state, for tracing: (direction, peer, exchange, state name).
    /// Outbound states are the dialer's (`Queued`, `Connecting`, `AwaitingAck`,
    /// `AwaitingReply`, `Backoff`); inbound ones the responder's (`AwaitingResponse`,
    /// `AwaitingReplyAck`, `Unconfirmed`, `Done`, `Aborted`). Finished outbound exchanges are
    /// absent. Allocates: meant for simulators and debugging, not hot paths.
    pub fn exchange_states(&self) -> Vec<(Direction, PeerId, ExchangeId, &'static str)> {
        let outbound = self
            .outbound
            .iter()
            .map(|(id, ex)| (Direction::Outbound, ex.peer, *id, ex.state.name()));
        let inbound = self.inbound.iter().map(|((peer, id), r)| {
            let state = match r.state {
                InState::AwaitingResponse => "AwaitingResponse",
                InState::AwaitingReplyAck { .. } => "AwaitingReplyAck",
                InState::Unconfirmed { .. } => "Unconfirmed",
                InState::Done => "Done",
                InState::Aborted(_) => "Aborted",
            };
            (Direction::Inbound, *peer, *id, state)
        });
        outbound.chain(inbound).collect()
    }

    /// How our exchange `id` stands, while it is unfinished.
    pub fn progress(&self, id: ExchangeId) -> Option<Progress> {
        let ex = self.outbound.get(&id)?;
        Some(Progress {
            state: ex.state.name(),
            failed_tries: ex.failures + ex.unreached,
            acked: ex.acked,
            last_cause: ex.extras.as_ref().and_then(|e| e.last_cause.clone()),
        })
    }

    /// Per peer, what is open and in flight now, ascending by peer: every allowed peer,
    /// and any other with a connection or an exchange (a revoked peer's last records).
    /// Allocates: for status pages, not hot paths.
    pub fn peer_summaries(&self) -> Vec<PeerSummary> {
        let mut peers: BTreeMap<PeerId, PeerSummary> = BTreeMap::new();
        fn entry(peers: &mut BTreeMap<PeerId, PeerSummary>, peer: PeerId) -> &mut PeerSummary {
            peers.entry(peer).or_insert_with(|| PeerSummary::new(peer))
        }
        for (peer, allowed) in self.allow.peers() {
            let summary = entry(&mut peers, *peer);
            summary.allowed = true;
            summary.name.clone_from(&allowed.name);
        }
        for conn in self.conns.values() {
            let summary = entry(&mut peers, conn.peer);
            if conn.established {
                summary.connections += 1;
            } else {
                summary.connecting += 1;
            }
        }
        for ex in self.outbound.values() {
            let summary = entry(&mut peers, ex.peer);
            if matches!(ex.state, OutState::Queued) {
                summary.queued += 1;
            } else {
                summary.active += 1;
            }
        }
        for ((peer, _), record) in &self.inbound {
            match record.state {
                InState::AwaitingResponse => entry(&mut peers, *peer).awaiting_answer += 1,
                InState::AwaitingReplyAck { .. } => entry(&mut peers, *peer).awaiting_ack += 1,
                _ => {}
            }
        }
        peers.into_values().collect()
    }

    /// `peer`'s settled floor: its exchanges whose records were forgotten end at or below
    /// this id, and a late copy of one is refused (`Abort{Settled}`).
    pub fn settled_floor(&self, peer: &PeerId) -> Option<ExchangeId> {
        self.settled.get(peer).map(|floor| floor.id)
    }

    /// Our exchanges not finished yet (active or queued).
    pub fn outbound_in_flight(&self) -> usize {
        self.outbound.len()
    }

    /// Inbound requests awaiting our application's answer.
    pub fn pending_responses(&self) -> usize {
        self.pending_inbound
    }

    /// The oldest request from `peer` still awaiting our answer.
    pub fn pending_request_from(&self, peer: &PeerId) -> Option<ExchangeId> {
        let seen = &self.peers.get(peer)?.seen;
        seen.iter().copied().find(|id| {
            self.inbound
                .get(&(*peer, *id))
                .is_some_and(|r| r.state == InState::AwaitingResponse)
        })
    }

    /// Whether nothing is in flight: no exchange, no connection, no pending response.
    pub fn is_idle(&self) -> bool {
        self.outbound.is_empty() && self.conns.is_empty() && self.pending_inbound == 0
    }

    // ----- commands -----

    /// Starts an exchange: sends `payload` to `peer` at `addr`, dialing, or queues it behind
    /// the peer's current exchange. The outcome arrives as [`Event::Reply`] or
    /// [`Event::Failed`] carrying the returned id.
    pub fn request(
        &mut self,
        peer: PeerId,
        addr: SocketAddr,
        payload: impl Into<Bytes>,
        now: Instant,
    ) -> Result<ExchangeId, RequestError> {
        self.request_with_deadline(peer, addr, payload, None, now)
    }

    /// [`Endpoint::request`] that ends by `deadline` at the latest: if it has not ended by
    /// then (queued, in flight or backing off), it fails with `DeadlineExceeded` and its
    /// payload back, and its connection is closed. Until then it is retried whatever
    /// `max_attempts` says. This deadline lives in memory only: see
    /// [`Endpoint::request_with`] for one a durable node keeps across restarts.
    pub fn request_with_deadline(
        &mut self,
        peer: PeerId,
        addr: SocketAddr,
        payload: impl Into<Bytes>,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<ExchangeId, RequestError> {
        let deadline = deadline.map(|at| Deadline { at, unix_ms: None });
        self.request_with(peer, addr, payload, None, deadline, now)
    }

    /// The most general request.
    ///
    /// * `key`, an idempotency key the application chooses (1 to [`MAX_KEY_LEN`] bytes,
    ///   made from its own data): a second request with the same key to the same peer is
    ///   refused (`RequestError::KeyInUse`) while the first is unfinished or its outcome
    ///   unsettled; a durable node keeps the key with the exchange, and
    ///   [`Endpoint::lookup`] finds the exchange by it, also after a restart. So an
    ///   application killed inside `request` learns, once restarted, whether the request was
    ///   made, and never makes it twice.
    /// * `deadline`: the exchange ends by then at the latest (`DeadlineExceeded`, payload
    ///   back) and is retried until then whatever `max_attempts` and the exchange budget
    ///   say, with backoffs capped at `backoff_max`. Given with its wall-clock time, a
    ///   durable node stores it, so a deadline of hours outlives restarts.
    pub fn request_with(
        &mut self,
        peer: PeerId,
        addr: SocketAddr,
        payload: impl Into<Bytes>,
        key: Option<Bytes>,
        deadline: Option<Deadline>,
        now: Instant,
    ) -> Result<ExchangeId, RequestError> {
        let payload = payload.into();
        if self.shutting_down || self.draining {
            return Err(RequestError::ShuttingDown);
        }
        if peer == self.local {
            return Err(RequestError::SelfRequest);
        }
        if !self.allow.contains(&peer) {
            return Err(RequestError::NotAllowed(peer));
        }
        if payload.len() > self.config.max_message_size {
            return Err(RequestError::TooLarge {
                len: payload.len(),
                max: self.config.max_message_size,
            });
        }
        if let Some(key) = &key {
            if key.is_empty() || key.len() > MAX_KEY_LEN {
                return Err(RequestError::BadKey {
                    len: key.len(),
                    max: MAX_KEY_LEN,
                });
            }
            if let Some(&exchange) = self.keys.get(&(peer, key.clone())) {
                return Err(RequestError::KeyInUse {
                    peer,
                    key: events::key_text(key),
                    exchange,
                    finished: !self.outbound.contains_key(&exchange),
                });
            }
        }
        let limit = self.config.max_queued_per_peer;
        let state = self.peer_mut(peer, now).ok_or(RequestError::TooManyPeers)?;
        if state.active.is_some() && state.queue.len() >= limit {
            return Err(RequestError::QueueFull { peer, limit });
        }
        let id = self.alloc_exchange();
        let seq = self.alloc_seq();
        let exchange = Outbound {
            seq,
            peer,
            addr,
            payload,
            attempt: 0,
            failures: 0,
            unreached: 0,
            started: None,
            dials: 0,
            acked: false,
            extras: dialer::Extras::new(key, deadline),
            state: OutState::Queued,
        };
        if let Some(journal) = &mut self.journal {
            journal.push(durable::put_outbound(id, &exchange.record()));
        }
        if let Some(key) = exchange.key() {
            self.keys.insert((peer, key.clone()), id);
        }
        self.outbound.insert(id, exchange);
        let state = self
            .peers
            .get_mut(&peer)
            .ok_or(RequestError::TooManyPeers)?;
        if state.active.is_some() {
            state.queue.push_back(id);
        } else {
            state.active = Some(id);
            self.begin(id, now);
        }
        if let Some(deadline) = deadline
            && self.outbound.contains_key(&id)
        {
            self.timers.set(Timer::Deadline(id), deadline.at.max(now));
        }
        Ok(id)
    }

    /// Finds our exchange with `peer` that carries idempotency key `key`: unfinished, or
    /// finished with an outcome the application has not settled. `None`: no such request
    /// was made (or its outcome was settled, which the application did itself).
    pub fn lookup(&self, peer: PeerId, key: &[u8]) -> Option<KeyedExchange> {
        let id = *self.keys.get(&(peer, Bytes::copy_from_slice(key)))?;
        if let Some(ex) = self.outbound.get(&id) {
            return Some(match ex.state {
                OutState::Queued => KeyedExchange::Queued { exchange: id },
                _ => KeyedExchange::InFlight {
                    exchange: id,
                    acked: ex.acked,
                },
            });
        }
        let (_, event) = self.keyed_outcomes.get(&id)?;
        Some(KeyedExchange::Finished(event.clone()))
    }

    /// The application settled the outcome of our exchange `id`: it took it (or, in the
    /// driver's confirm mode, confirmed it stored it). A durable node forgets its stored
    /// copy, and its idempotency key is free again.
    pub fn outcome_settled(&mut self, id: ExchangeId) {
        if let Some(journal) = &mut self.journal {
            journal.push(durable::outcome_taken(id));
        }
        if let Some((key, event)) = self.keyed_outcomes.remove(&id)
            && let Event::Reply { peer, .. } | Event::Failed { peer, .. } = event
        {
            self.keys.remove(&(peer, key));
        }
    }

    /// The application took the outcome of `peer`'s exchange `exchange` (delivered,
    /// unconfirmed, timed out, aborted or cancelled): a durable node forgets its stored
    /// copy, which a restart would otherwise hand out again.
    pub fn response_outcome_taken(&mut self, peer: PeerId, exchange: ExchangeId) {
        if let Some(seq) = self.unread_responses.remove(&(peer, exchange))
            && let Some(journal) = &mut self.journal
        {
            journal.push(durable::delete_response(seq));
        }
    }

    /// Responder outcomes a durable node keeps until the application takes them.
    pub fn unread_responses(&self) -> usize {
        self.unread_responses.len()
    }

    /// Hands the application a responder outcome; a durable node keeps it until the
    /// application takes it ([`Endpoint::response_outcome_taken`]), so that a crash in
    /// between does not lose it: a restart hands it out again, flagged `redelivered`.
    pub(super) fn response_outcome(&mut self, event: Event) {
        if let (Some(key), Some(_)) = (event.response_of(), &self.journal) {
            if self.unread_responses.len() >= self.config.max_unread_outcomes
                && !self.unread_responses.contains_key(&key)
                && let Some((&oldest, _)) = self.unread_responses.iter().min_by_key(|(_, s)| **s)
            {
                // An application that reads nothing: the oldest outcome is handed out
                // (it may still be read), but no longer kept for a restart.
                self.response_outcome_taken(oldest.0, oldest.1);
            }
            let seq = self.alloc_seq();
            let old = self.unread_responses.insert(key, seq);
            if let Some(journal) = &mut self.journal {
                journal.extend(old.map(durable::delete_response));
                journal.push(durable::put_response(seq, &event));
            }
        }
        self.events.push_back(event);
    }

    /// The application confirms it stored `peer`'s request `exchange` (the driver's
    /// confirm mode): a durable node drops its stored copy of the request and no longer
    /// delivers it again after a restart; it stays answerable. Returns whether the request
    /// awaited an answer (and was not confirmed before).
    pub fn confirm_request(&mut self, peer: PeerId, exchange: ExchangeId) -> bool {
        self.confirm_inbound(peer, exchange)
    }

    /// Cancels our exchange `id`, queued or in flight: it fails with `Cancelled` and its
    /// payload back, and its connection (if it had one) is closed. A request already sent
    /// may have reached the responder's application. Returns whether `id` was unfinished.
    pub fn cancel(&mut self, id: ExchangeId, now: Instant) -> bool {
        if !self.outbound.contains_key(&id) {
            return false;
        }
        self.finish(id, Err(Failure::Cancelled), now);
        true
    }

    /// Refuses `peer`'s request `exchange` instead of answering it: the dialer is told at
    /// once (Abort `Refused`; its exchange fails with its payload back) rather than after
    /// `response_timeout`, a resend of it gets the same answer, and the refusal is
    /// reported as `ResponseAborted { reason: Refused }`. A peer built before `Refused`
    /// existed reads it as its class's default (an abort), so older peers keep working.
    pub fn reject(
        &mut self,
        peer: PeerId,
        exchange: ExchangeId,
        now: Instant,
    ) -> Result<(), RespondError> {
        let record = self
            .inbound
            .get(&(peer, exchange))
            .filter(|r| r.state == InState::AwaitingResponse)
            .ok_or(RespondError::NotPending { peer, exchange })?;
        let (conn, attempt) = (record.conn, record.attempt);
        self.abort_inbound(peer, exchange, conn, attempt, AbortReason::Refused, now);
        Ok(())
    }

    /// Answers `peer`'s request `exchange`.
    pub fn respond(
        &mut self,
        peer: PeerId,
        exchange: ExchangeId,
        payload: impl Into<Bytes>,
        now: Instant,
    ) -> Result<(), RespondError> {
        let payload = payload.into();
        let key = (peer, exchange);
        let record = self
            .inbound
            .get(&key)
            .filter(|r| r.state == InState::AwaitingResponse)
            .ok_or(RespondError::NotPending { peer, exchange })?;
        let (conn, attempt, max) = (record.conn, record.attempt, record.remote_max);
        if payload.len() > max {
            // The dialer could not take it: tell it, so it fails at once instead of
            // resending into the same wall, and end the exchange here too.
            self.abort_inbound(
                peer,
                exchange,
                conn,
                attempt,
                AbortReason::ReplyTooLarge,
                now,
            );
            return Err(RespondError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        if record.ack_held {
            // The Ack goes right before the Reply: one write for both.
            self.send_held_ack(peer, exchange);
        }
        self.pending_inbound -= 1;
        self.cache_bytes += payload.len();
        self.cache_order.push_back(key);
        if let Some(record) = self.inbound.get_mut(&key) {
            record.state = InState::AwaitingReplyAck {
                reply: Some(payload.clone()),
            };
        }
        self.persist_inbound(key, None);
        self.timers.set(
            Timer::Inbound(peer, exchange),
            now + self.config.reply_ack_timeout,
        );
        self.send(
            conn,
            Message::Reply {
                exchange,
                attempt,
                payload,
            },
        );
        self.trim_reply_cache();
        Ok(())
    }

    /// Adds or updates a peer on the allow list.
    pub fn allow(&mut self, peer: PeerId, entry: AllowedPeer) {
        self.allow.insert(peer, entry);
    }

    /// Removes a peer from the allow list, closes its connections, fails our exchanges
    /// with it and cancels its requests awaiting our answer. Its dedupe records stay (within
    /// their bounds), so that allowing it again cannot replay an old exchange. Returns
    /// whether it was listed.
    pub fn revoke(&mut self, peer: &PeerId, now: Instant) -> bool {
        let listed = self.allow.remove(peer);
        if listed {
            self.fail_peer_exchanges(*peer, &Failure::Revoked, now);
            let conns: Vec<ConnId> = self.conns_of(peer);
            if !self.sabotaged(Sabotage::RevokeKeepsConnections) {
                for conn in conns {
                    self.close(conn, CloseReason::NotAllowed, now);
                }
            }
            self.cancel_inbound_of(*peer, now);
        }
        listed
    }

    /// Replaces the allow list as a whole (a reloaded allow-list file). A peer the new list
    /// no longer allows is treated as [`Endpoint::revoke`] treats it: connections closed
    /// (`NotAllowed`), our exchanges with it failed (`Revoked`, payload back), its requests
    /// awaiting our answer cancelled. A peer still listed but no longer from the address of
    /// one of its connections loses that connection only. Returns the peers the old list
    /// allowed and the new one does not, in id order.
    pub fn set_allow_list(&mut self, list: AllowList, now: Instant) -> Vec<PeerId> {
        let mut known: Vec<PeerId> = self.allow.peers().map(|(p, _)| *p).collect();
        known.extend(self.peers.keys().copied());
        known.extend(self.conns.values().map(|c| c.peer));
        known.sort_unstable();
        known.dedup();
        let dropped: Vec<PeerId> = known
            .into_iter()
            .filter(|peer| !list.contains(peer))
            .collect();
        // Reported: the peers the old list allowed. (A stranger we merely heard from is
        // cleaned up below too, but was never "removed".)
        let removed: Vec<PeerId> = dropped
            .iter()
            .copied()
            .filter(|peer| self.allow.contains(peer))
            .collect();
        self.allow = list;
        for peer in &dropped {
            self.fail_peer_exchanges(*peer, &Failure::Revoked, now);
            for conn in self.conns_of(peer) {
                self.close(conn, CloseReason::NotAllowed, now);
            }
            self.cancel_inbound_of(*peer, now);
        }
        // Addresses say where a peer may connect *from*: only its inbound connections are
        // checked (as the handshake checks them); ours go to wherever we dialed.
        let moved: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.direction == Direction::Inbound && self.allow.check(&c.peer, c.addr.ip()).is_err()
            })
            .map(|(conn, _)| *conn)
            .collect();
        for conn in moved {
            self.close(conn, CloseReason::NotAllowed, now);
        }
        removed
    }

    /// Plants a defect (feature `sabotage`, for the simulator's tests of its invariants).
    #[cfg(feature = "sabotage")]
    pub fn sabotage(&mut self, defect: Sabotage) {
        self.sabotage = Some(defect);
    }

    /// Whether `defect` was planted.
    #[cfg(feature = "sabotage")]
    pub(super) fn sabotaged(&self, defect: Sabotage) -> bool {
        self.sabotage == Some(defect)
    }

    /// Without the feature, never.
    #[cfg(not(feature = "sabotage"))]
    #[inline(always)]
    pub(super) fn sabotaged(&self, _defect: Sabotage) -> bool {
        false
    }

    /// Begins a graceful stop: new work is refused (our [`Endpoint::request`] returns
    /// `ShuttingDown`, a peer's new Request is Nacked `ShuttingDown`) while work already
    /// started goes on: our exchanges, queued ones included, and requests our application
    /// has yet to answer. [`Endpoint::is_drained`] says when none is left; the driver then
    /// calls [`Endpoint::shutdown`] (or calls it when its grace period ends).
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Whether a graceful stop began.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// No exchange of ours is unfinished and no peer's request awaits our answer or the
    /// Ack of our reply: stopping now loses nothing and leaves no dialer waiting.
    pub fn is_drained(&self) -> bool {
        self.outbound.is_empty()
            && !self.inbound.values().any(|r| {
                matches!(
                    r.state,
                    InState::AwaitingResponse | InState::AwaitingReplyAck { .. }
                )
            })
    }

    /// Stops: closes every connection and refuses new work. In memory only, it also fails
    /// every exchange of ours (payloads handed back) and tells dialers waiting on us
    /// (Abort `ShuttingDown`). A durable endpoint does neither: its exchanges, ours and the
    /// peers', stay in the store and resume when the node starts again.
    pub fn shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
        if self.journal.is_some() {
            let conns: Vec<ConnId> = self.conns.keys().copied().collect();
            for conn in conns {
                if let Some(c) = self.conns.get_mut(&conn) {
                    // Unbound, so that closing does not schedule a retry.
                    if c.direction == Direction::Outbound {
                        c.exchange = None;
                    }
                }
                self.close(conn, CloseReason::ShuttingDown, now);
            }
            self.timers = Timers::new();
            return;
        }
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        for peer in &peers {
            self.fail_peer_exchanges(*peer, &Failure::ShuttingDown, now);
        }
        let waiting: Vec<((PeerId, ExchangeId), ConnId, u32)> = self
            .inbound
            .iter()
            .filter(|(_, r)| r.state == InState::AwaitingResponse)
            .map(|(k, r)| (*k, r.conn, r.attempt))
            .collect();
        for ((peer, exchange), conn, attempt) in waiting {
            self.abort_inbound(
                peer,
                exchange,
                conn,
                attempt,
                AbortReason::ShuttingDown,
                now,
            );
        }
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            self.close(conn, CloseReason::ShuttingDown, now);
        }
        debug_assert!(self.outbound.is_empty());
    }

    // ----- inputs -----

    /// Input: the inbound connection `conn` (numbered by the driver with
    /// [`ConnId::inbound`]) finished its handshake and passed the allow list. If the peer is
    /// over its connection rate (or the endpoint cannot track it), a `Close` is queued at once.
    pub fn handle_accepted(
        &mut self,
        conn: ConnId,
        peer: PeerId,
        addr: SocketAddr,
        remote_max_message_size: usize,
        remote_features: u32,
        now: Instant,
    ) {
        if !conn.is_inbound() || self.conns.contains_key(&conn) {
            // A driver bug; refuse the connection rather than corrupt our tables.
            self.outputs.push_back(Output::Close {
                conn,
                peer: Some(peer),
                reason: CloseReason::ProtocolViolation,
            });
            return;
        }
        let limit = self.config.connection_rate;
        let verdict = if self.shutting_down {
            Err(CloseReason::ShuttingDown)
        } else if self.allow.check(&peer, addr.ip()).is_err() {
            // Revoked while the handshake ran.
            Err(CloseReason::NotAllowed)
        } else if self.conns.len() >= self.config.max_connections {
            // Told why, so that it backs off and tries again rather than guessing.
            Err(CloseReason::TooManyConnections)
        } else {
            match self.peer_mut(peer, now) {
                None => Err(CloseReason::TooManyConnections),
                Some(state) => state
                    .connections
                    .take(limit, now)
                    .map_err(|_| CloseReason::RateLimited),
            }
        };
        if let Err(reason) = verdict {
            if reason == CloseReason::RateLimited {
                self.events.push_back(Event::RateLimited {
                    peer,
                    limit: LimitKind::Connections,
                    disconnected: true,
                });
            }
            self.outputs.push_back(Output::Close {
                conn,
                peer: Some(peer),
                reason,
            });
            return;
        }
        self.conns.insert(
            conn,
            Conn {
                peer,
                addr,
                direction: Direction::Inbound,
                established: true,
                exchange: None,
                remote_max: remote_max_message_size.min(self.config.max_message_size.max(1)),
                receiving: false,
                features: remote_features,
                sync: false,
                epoch_sent: false,
                ik: false,
                early: false,
                ticket: None,
                records_sent: false,
                records_heard: false,
            },
        );
        if let Some(state) = self.peers.get_mut(&peer) {
            state.conns += 1;
        }
        self.arm_idle(conn, now);
        self.membership_established(conn, now);
        self.records_established(conn);
    }

    /// Input: an inbound connection failed before it was established (bad handshake,
    /// rejected peer). Reported to the application; nothing else depends on it.
    pub fn handle_rejected(&mut self, error: ConnError, _now: Instant) {
        self.events
            .push_back(Event::PeerError(PeerError::Connection(error)));
    }

    /// Input: an event from the [`crate::Connection`] behind `conn`. For an outbound
    /// connection, a failure to dial is `ConnEvent::Closed(Closed::Io(..))`.
    pub fn handle_conn_event(&mut self, conn: ConnId, event: ConnEvent, now: Instant) {
        if !self.conns.contains_key(&conn) {
            return; // Already closed by us; late events are moot.
        }
        match event {
            ConnEvent::Established {
                peer,
                key,
                remote_max_message_size,
                remote_features,
                ticket,
            } => {
                self.learn(conn, peer, key, ticket);
                self.on_established(conn, peer, remote_max_message_size, remote_features, now);
            }
            ConnEvent::Message(message) => self.on_message(conn, message, now),
            ConnEvent::Early {
                sent_unix_ms,
                message,
            } => self.on_early(conn, sent_unix_ms, message, now),
            ConnEvent::Receiving { .. } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.receiving = true;
                }
            }
            ConnEvent::Oversized {
                kind,
                exchange,
                attempt,
                len: _,
            } => self.on_oversized(conn, kind, exchange, attempt, now),
            ConnEvent::Closed(closed) => self.on_closed(conn, closed, now),
        }
    }

    /// Input: the time is `now`; fires every timer due.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.timers.pop_expired(now) {
            match timer {
                Timer::Outbound(id) => self.on_outbound_timer(id, now),
                Timer::Deadline(id) => self.finish(id, Err(Failure::DeadlineExceeded), now),
                Timer::Inbound(peer, id) => self.on_inbound_timer(peer, id, now),
                Timer::Ack(peer, id) => {
                    if self.inbound.get(&(peer, id)).is_some_and(|r| r.ack_held) {
                        self.send_held_ack(peer, id);
                    }
                }
                Timer::MembershipSync => self.on_sync_timer(now),
                Timer::MembershipExpiry => self.apply_membership_allow_list(now),
                Timer::RecordRefresh => self.on_record_refresh(now),
                Timer::RecordExpiry => self.on_record_expiry(now),
                Timer::Idle(conn) => {
                    let Some(c) = self.conns.get(&conn) else {
                        continue;
                    };
                    if c.receiving {
                        // A message still arriving is activity, however long it takes.
                        self.arm_idle(conn, now);
                    } else if c.exchange.is_none() && !self.sabotaged(Sabotage::KeepIdleConnections)
                    {
                        self.close(conn, CloseReason::Idle, now);
                    }
                }
            }
        }
    }

    // ----- outputs -----

    /// Output: the next thing for the driver to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Output: the next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Output: when [`Endpoint::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Output (durable mode): the writes to commit, in one transaction, before performing
    /// any output or handing out any event polled since the last call. Empty in memory
    /// mode.
    pub fn poll_journal(&mut self) -> Vec<KvOp> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Whether outputs, events or journal writes wait to be polled: what the endpoint
    /// decided has not all left it yet.
    pub fn has_pending_effects(&self) -> bool {
        !self.outputs.is_empty()
            || !self.events.is_empty()
            || self.journal.as_ref().is_some_and(|j| !j.is_empty())
    }

    /// Whether the endpoint keeps a journal ([`Endpoint::restore`] was called).
    pub fn is_durable(&self) -> bool {
        self.journal.is_some()
    }

    // ----- helpers shared by the roles -----

    fn alloc_exchange(&mut self) -> ExchangeId {
        if let Some(journal) = &mut self.journal {
            if self.ids_left == 0 {
                // Reserve a block in the store: a restart resumes past it, so no id is
                // ever handed out twice, whatever the seed.
                self.ids_left = durable::ID_BLOCK;
                let next = self.next_exchange.wrapping_add(durable::ID_BLOCK);
                journal.push(durable::reserve_ids(next));
            }
            self.ids_left -= 1;
        }
        let id = ExchangeId(self.next_exchange);
        self.next_exchange = self.next_exchange.wrapping_add(1);
        id
    }

    pub(super) fn alloc_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }
}
