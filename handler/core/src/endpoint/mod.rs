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
//! connections. See [`OutState`] and [`InState`] for each role's diagram.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

use crate::allow_list::{AllowList, AllowedPeer};
use crate::config::{Config, ConfigError};
use crate::connection::{Closed, ConnError, ConnEvent, Remote};
use crate::identity::PeerId;
use crate::rate::Bucket;
use crate::timers::Timers;
use crate::wire::{AbortReason, AckOf, CloseReason, ExchangeId, Kind, Message, NackReason};

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
    },
    /// Send a message on an established connection.
    Send {
        /// Where.
        conn: ConnId,
        /// What.
        message: Message,
    },
    /// Send `Close{reason}` (if established), flush, and drop the connection. The endpoint
    /// has already forgotten it; later events for it are ignored.
    Close {
        /// Which.
        conn: ConnId,
        /// Why.
        reason: CloseReason,
    },
}

/// Why an outbound exchange was retried (and, once attempts run out, why it failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryCause {
    /// The connection could not be opened or its handshake failed.
    DialFailed(String),
    /// Dial and handshake did not finish within `connect_timeout`.
    ConnectTimeout,
    /// The connection broke during the exchange.
    ConnectionLost(String),
    /// No Ack within `ack_timeout`.
    AckTimeout,
    /// No Reply within `reply_timeout` after the Ack.
    ReplyTimeout,
    /// The responder Nacked the request.
    Nacked(NackReason),
}

/// Why an outbound exchange failed. Its payload comes back with it in [`Event::Failed`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// Every attempt failed. `request_acked` tells whether the responder ever confirmed
    /// receipt (then its application has the request); otherwise delivery is unknown unless
    /// every attempt was Nacked or never sent.
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last cause.
        last: RetryCause,
        /// Whether any attempt was acknowledged.
        request_acked: bool,
    },
    /// The responder refused for good (Nack `TooLarge`). Not delivered.
    Refused(NackReason),
    /// The responder gave up after accepting it (e.g. its application never answered).
    Aborted(AbortReason),
    /// The responder closed the connection for a reason that retrying cannot fix
    /// (it does not allow us). Not delivered.
    Rejected(CloseReason),
    /// A connection error that retrying cannot fix: impostor key, incompatible version.
    Connection(ConnError),
    /// The payload exceeds the responder's advertised maximum. Not delivered.
    TooLarge {
        /// Payload length.
        len: usize,
        /// The responder's limit.
        max: usize,
    },
    /// The peer was removed from our allow list before the exchange completed.
    Revoked,
    /// The endpoint is shutting down.
    ShuttingDown,
}

/// Errors a peer caused, reported with [`Event::PeerError`]; the peer is disconnected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// A connection-level failure (handshake, decryption, framing, identity, allow list).
    #[error(transparent)]
    Connection(ConnError),
    /// A well-formed message that breaks the exchange protocol.
    #[error("{remote}: protocol violation: {detail}")]
    Violation {
        /// Who.
        remote: Remote,
        /// What.
        detail: &'static str,
    },
    /// The peer kept exceeding its request rate after being Nacked.
    #[error("{remote}: disconnected after {strikes} rate-limited requests in a row")]
    RateLimitAbuse {
        /// Who.
        remote: Remote,
        /// Consecutive rate-limited requests.
        strikes: u32,
    },
}

impl PeerError {
    /// The peer (and address) at fault.
    pub fn remote(&self) -> Remote {
        match self {
            Self::Connection(e) => e.remote(),
            Self::Violation { remote, .. } | Self::RateLimitAbuse { remote, .. } => *remote,
        }
    }
}

/// Which rate limit a peer hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Incoming requests.
    Requests,
    /// Incoming connections.
    Connections,
}

/// What the application learns. Every exchange ends in exactly one outcome event:
/// outbound in `Reply` or `Failed`; inbound in `ResponseDelivered`, `ResponseUnconfirmed` or
/// `ResponseTimedOut`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer's request, delivered once. Answer with [`Endpoint::respond`].
    Request {
        /// From.
        peer: PeerId,
        /// The address the request came from.
        addr: SocketAddr,
        /// Its exchange (unique per peer).
        exchange: ExchangeId,
        /// Application bytes.
        payload: Bytes,
    },
    /// The reply to one of our requests.
    Reply {
        /// From.
        peer: PeerId,
        /// The address the reply came from (the one dialed).
        addr: SocketAddr,
        /// The id [`Endpoint::request`] returned.
        exchange: ExchangeId,
        /// Application bytes.
        payload: Bytes,
    },
    /// One of our requests failed; its payload is handed back.
    Failed {
        /// To.
        peer: PeerId,
        /// The id [`Endpoint::request`] returned.
        exchange: ExchangeId,
        /// The original payload.
        payload: Bytes,
        /// Why.
        failure: Failure,
    },
    /// The peer acknowledged our reply.
    ResponseDelivered {
        /// To.
        peer: PeerId,
        /// Exchange.
        exchange: ExchangeId,
    },
    /// Our reply was not acknowledged within `reply_ack_timeout`. It stays cached for a
    /// resent request, but no further event follows.
    ResponseUnconfirmed {
        /// To.
        peer: PeerId,
        /// Exchange.
        exchange: ExchangeId,
    },
    /// We did not answer within `response_timeout`; the dialer was told (Abort).
    ResponseTimedOut {
        /// From.
        peer: PeerId,
        /// Exchange.
        exchange: ExchangeId,
    },
    /// A peer misbehaved or a connection failed in a way worth reporting; it is disconnected.
    PeerError(PeerError),
    /// A peer exceeded a rate limit and was Nacked (or disconnected).
    RateLimited {
        /// Who.
        peer: PeerId,
        /// Which limit.
        limit: LimitKind,
        /// Whether the peer was disconnected for it.
        disconnected: bool,
    },
}

impl Event {
    /// Whether this event belongs on the priority channel (failures, errors, limits) rather
    /// than the receive channel (requests, replies, and confirmations that our replies
    /// arrived: the normal outcomes of exchanges).
    pub fn is_priority(&self) -> bool {
        !matches!(
            self,
            Self::Request { .. } | Self::Reply { .. } | Self::ResponseDelivered { .. }
        )
    }
}

/// Why [`Endpoint::request`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The peer is not on the allow list.
    #[error("peer {0} is not on the allow list")]
    NotAllowed(PeerId),
    /// The payload exceeds `max_message_size`.
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The peer's queue is full.
    #[error("queue for peer {peer} is full ({limit} requests waiting)")]
    QueueFull {
        /// Peer.
        peer: PeerId,
        /// `max_queued_per_peer`.
        limit: usize,
    },
    /// A node cannot exchange with itself.
    #[error("cannot send a request to ourselves")]
    SelfRequest,
    /// Too many distinct peers are tracked (`max_tracked_peers`).
    #[error("too many peers tracked")]
    TooManyPeers,
    /// The endpoint is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

/// Why [`Endpoint::respond`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RespondError {
    /// No request with that id from that peer awaits an answer (never was, already answered,
    /// or timed out).
    #[error("no pending request {exchange} from peer {peer}")]
    NotPending {
        /// Peer.
        peer: PeerId,
        /// Exchange.
        exchange: ExchangeId,
    },
    /// The peer has no request awaiting an answer.
    #[error("no pending request from peer {peer}")]
    NoPendingRequest {
        /// Peer.
        peer: PeerId,
    },
    /// The reply exceeds what the dialer accepts. The request stays pending.
    #[error("reply of {len} bytes exceeds the peer's maximum of {max}")]
    TooLarge {
        /// Reply length.
        len: usize,
        /// Peer's limit.
        max: usize,
    },
}

/// Counters, for tests, the simulator and monitoring.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections dialed.
    pub dials: u64,
    /// Dials beyond an exchange's first.
    pub redials: u64,
    /// Requests sent, first attempts included.
    pub requests_sent: u64,
    /// Requests sent again (attempt > 1).
    pub resends: u64,
    /// Inbound requests handed to the application.
    pub requests_delivered: u64,
    /// Duplicate requests recognised and not handed to the application.
    pub duplicates_dropped: u64,
    /// Replies re-sent from the cache for a resent request.
    pub replies_from_cache: u64,
    /// Nacks sent.
    pub nacks_sent: u64,
    /// Nacks received.
    pub nacks_received: u64,
}

/// Timer kinds; one slot each per exchange or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Outbound(ExchangeId),
    Inbound(PeerId, ExchangeId),
    /// A held Ack (see `Config::ack_delay`) is due.
    Ack(PeerId, ExchangeId),
    Idle(ConnId),
}

/// The dialer's side of one exchange.
///
/// ```text
///   request()            peer busy
///  ----------> Queued ----------------+
///      |          | peer free         |
///      |          v                   |
///      +-----> Connecting --(connected)-----+       (reused idle connection: skip)
///                 |  ^                      v
///   connect fail  |  |  redial         AwaitingAck --(Reply)----------+
///   or timeout    v  |                  |      |                      |
///              Backoff <--(Nack / ack timeout / lost)   (Ack)         |
///                 ^  |                         v                      |
///                 |  +--(after a Nack: -> AwaitingReply --(Reply)-----+-> done: Ack the
///                 |     same conn)             |                        Reply, Event::Reply
///                 +--(reply timeout / lost)----+
///
///   A timeout abandons the connection (a black-holed stream never errors): the retry
///   redials. A Nack proves the connection alive: the retry reuses it.
///
///   any state --(attempts exhausted, Abort, final Nack, rejection)--> done: Event::Failed
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutState {
    /// Waiting behind the peer's current exchange.
    Queued,
    /// A dial for this exchange is in progress.
    Connecting { conn: ConnId },
    /// Request sent on `conn`, waiting for its Ack.
    AwaitingAck { conn: ConnId },
    /// Request acknowledged, waiting for the Reply.
    AwaitingReply { conn: ConnId },
    /// Waiting to retry; keeps the connection if it is still usable.
    Backoff { conn: Option<ConnId> },
}

impl OutState {
    fn conn(self) -> Option<ConnId> {
        match self {
            Self::Queued => None,
            Self::Connecting { conn }
            | Self::AwaitingAck { conn }
            | Self::AwaitingReply { conn } => Some(conn),
            Self::Backoff { conn } => conn,
        }
    }
}

#[derive(Debug)]
struct Outbound {
    peer: PeerId,
    addr: SocketAddr,
    payload: Bytes,
    /// Number of the last Request transmission (0 before the first).
    attempt: u32,
    /// Failed tries so far; reaching `max_attempts` ends the exchange.
    failures: u32,
    /// Dials made for this exchange.
    dials: u32,
    acked: bool,
    state: OutState,
}

/// The responder's side of one exchange (one record per (peer, exchange id), kept after the
/// exchange for deduplication).
///
/// ```text
///   Request (new)                respond()                    Ack of Reply
///  -------------> AwaitingResponse ------> AwaitingReplyAck ---------------> Done
///   (Ack it,          |                        |      ^ resent Request:     (Event::
///    Event::Request)  | response timeout       |      | resend cached Reply  ResponseDelivered)
///                     v                        | reply ack timeout
///                 Aborted (Abort NoResponse,   v
///                  Event::ResponseTimedOut)  Unconfirmed (Event::ResponseUnconfirmed;
///                                             the cached reply still answers resends)
///
///   A resent Request for a known id is Acked and answered from the record; it never
///   reaches the application again.
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
enum InState {
    AwaitingResponse,
    AwaitingReplyAck { reply: Option<Bytes> },
    Unconfirmed { reply: Option<Bytes> },
    Done,
    Aborted(AbortReason),
}

#[derive(Debug)]
struct Inbound {
    /// The connection the latest copy of the Request came on (may be gone).
    conn: ConnId,
    /// Attempt number of that copy, echoed in our answers.
    attempt: u32,
    state: InState,
    /// The Ack of this Request is being held (`Config::ack_delay`), not sent yet.
    ack_held: bool,
}

#[derive(Debug)]
struct Conn {
    peer: PeerId,
    addr: SocketAddr,
    direction: Direction,
    established: bool,
    /// The exchange in progress on this connection: ours (outbound) or the peer's (inbound).
    exchange: Option<ExchangeId>,
    /// The remote's advertised maximum payload.
    remote_max: usize,
}

#[derive(Debug)]
struct Peer {
    /// Our exchange in progress with this peer (one at a time).
    active: Option<ExchangeId>,
    /// Our exchanges waiting for it, oldest first.
    queue: VecDeque<ExchangeId>,
    /// An idle outbound connection kept for reuse.
    reusable: Option<ConnId>,
    /// Open connections, both directions.
    conns: usize,
    /// Inbound exchange ids remembered for deduplication, oldest first.
    seen: VecDeque<ExchangeId>,
    requests: Bucket,
    connections: Bucket,
    strikes: u32,
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
    outbound: BTreeMap<ExchangeId, Outbound>,
    inbound: BTreeMap<(PeerId, ExchangeId), Inbound>,
    peers: BTreeMap<PeerId, Peer>,
    conns: BTreeMap<ConnId, Conn>,
    /// Inbound requests handed to the application and not answered yet.
    pending_inbound: usize,
    /// Bytes of replies held for resending, and the records holding them, oldest first.
    cache_bytes: usize,
    cache_order: VecDeque<(PeerId, ExchangeId)>,
    timers: Timers<Timer>,
    outputs: VecDeque<Output>,
    events: VecDeque<Event>,
    stats: Stats,
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
    /// A new endpoint for the node `local`. All randomness (exchange ids, jitter) comes from
    /// `rng_seed`.
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
            outbound: BTreeMap::new(),
            inbound: BTreeMap::new(),
            peers: BTreeMap::new(),
            conns: BTreeMap::new(),
            pending_inbound: 0,
            cache_bytes: 0,
            cache_order: VecDeque::new(),
            timers: Timers::new(),
            outputs: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        })
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
        let outbound = self.outbound.iter().map(|(id, ex)| {
            let state = match ex.state {
                OutState::Queued => "Queued",
                OutState::Connecting { .. } => "Connecting",
                OutState::AwaitingAck { .. } => "AwaitingAck",
                OutState::AwaitingReply { .. } => "AwaitingReply",
                OutState::Backoff { .. } => "Backoff",
            };
            (Direction::Outbound, ex.peer, *id, state)
        });
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
        let payload = payload.into();
        if self.shutting_down {
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
        let limit = self.config.max_queued_per_peer;
        let state = self.peer_mut(peer, now).ok_or(RequestError::TooManyPeers)?;
        if state.active.is_some() && state.queue.len() >= limit {
            return Err(RequestError::QueueFull { peer, limit });
        }
        let id = ExchangeId(self.next_exchange);
        self.next_exchange = self.next_exchange.wrapping_add(1);
        self.outbound.insert(
            id,
            Outbound {
                peer,
                addr,
                payload,
                attempt: 0,
                failures: 0,
                dials: 0,
                acked: false,
                state: OutState::Queued,
            },
        );
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
        Ok(id)
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
        let conn = record.conn;
        let attempt = record.attempt;
        let max = self
            .conns
            .get(&conn)
            .map_or(self.config.max_message_size, |c| c.remote_max);
        if payload.len() > max {
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

    /// Removes a peer from the allow list, closes its connections and fails our exchanges
    /// with it. Returns whether it was listed.
    pub fn revoke(&mut self, peer: &PeerId, now: Instant) -> bool {
        let listed = self.allow.remove(peer);
        if listed {
            self.fail_peer_exchanges(*peer, &Failure::Revoked, now);
            let conns: Vec<ConnId> = self.conns_of(peer);
            for conn in conns {
                self.close(conn, CloseReason::NotAllowed, now);
            }
            self.drop_inbound_of(*peer);
        }
        listed
    }

    /// Fails every exchange of ours (payloads handed back), tells dialers waiting on us,
    /// closes every connection, and refuses new work.
    pub fn shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
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
        now: Instant,
    ) {
        if !conn.is_inbound() || self.conns.contains_key(&conn) {
            // A driver bug; refuse the connection rather than corrupt our tables.
            self.outputs.push_back(Output::Close {
                conn,
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
            self.outputs.push_back(Output::Close { conn, reason });
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
            },
        );
        if let Some(state) = self.peers.get_mut(&peer) {
            state.conns += 1;
        }
        self.arm_idle(conn, now);
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
                remote_max_message_size,
            } => self.on_established(conn, peer, remote_max_message_size, now),
            ConnEvent::Message(message) => self.on_message(conn, message, now),
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
                Timer::Inbound(peer, id) => self.on_inbound_timer(peer, id, now),
                Timer::Ack(peer, id) => {
                    if self.inbound.get(&(peer, id)).is_some_and(|r| r.ack_held) {
                        self.send_held_ack(peer, id);
                    }
                }
                Timer::Idle(conn) => {
                    if self.conns.get(&conn).is_some_and(|c| c.exchange.is_none()) {
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

    // ----- dialer side -----

    /// Moves an exchange that just became its peer's active one forward.
    fn begin(&mut self, id: ExchangeId, now: Instant) {
        let Some(ex) = self.outbound.get(&id) else {
            return;
        };
        let peer = ex.peer;
        let reusable = self
            .peers
            .get_mut(&peer)
            .and_then(|p| p.reusable.take())
            .filter(|c| self.conns.get(c).is_some_and(|c| c.established));
        match reusable {
            Some(conn) => {
                self.timers.cancel(Timer::Idle(conn));
                self.send_request(id, conn, now);
            }
            None => self.dial(id, now),
        }
    }

    fn dial(&mut self, id: ExchangeId, now: Instant) {
        let conn = self.alloc_conn();
        let Some(ex) = self.outbound.get_mut(&id) else {
            return;
        };
        ex.dials += 1;
        ex.state = OutState::Connecting { conn };
        let (peer, addr, redial) = (ex.peer, ex.addr, ex.dials > 1);
        self.stats.dials += 1;
        self.stats.redials += u64::from(redial);
        self.conns.insert(
            conn,
            Conn {
                peer,
                addr,
                direction: Direction::Outbound,
                established: false,
                exchange: Some(id),
                remote_max: 0,
            },
        );
        if let Some(p) = self.peers.get_mut(&peer) {
            p.conns += 1;
        }
        self.timers
            .set(Timer::Outbound(id), now + self.config.connect_timeout);
        self.outputs.push_back(Output::Dial { conn, peer, addr });
    }

    fn send_request(&mut self, id: ExchangeId, conn: ConnId, now: Instant) {
        let Some(ex) = self.outbound.get_mut(&id) else {
            return;
        };
        let max = self.conns.get(&conn).map_or(0, |c| c.remote_max);
        if ex.payload.len() > max {
            let failure = Failure::TooLarge {
                len: ex.payload.len(),
                max,
            };
            ex.state = OutState::Backoff { conn: Some(conn) };
            return self.finish(id, Err(failure), now);
        }
        ex.attempt += 1;
        ex.state = OutState::AwaitingAck { conn };
        let message = Message::Request {
            exchange: id,
            attempt: ex.attempt,
            payload: ex.payload.clone(),
        };
        self.stats.requests_sent += 1;
        self.stats.resends += u64::from(ex.attempt > 1);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.exchange = Some(id);
        }
        self.timers
            .set(Timer::Outbound(id), now + self.config.ack_timeout);
        self.send(conn, message);
    }

    /// One try failed: back off and retry, or give up.
    fn retry(&mut self, id: ExchangeId, cause: RetryCause, conn: Option<ConnId>, now: Instant) {
        self.retry_after(id, cause, conn, Duration::ZERO, now);
    }

    /// [`Self::retry`] waiting at least `hint` (a Nack's retry-after), capped by `backoff_max`.
    fn retry_after(
        &mut self,
        id: ExchangeId,
        cause: RetryCause,
        conn: Option<ConnId>,
        hint: Duration,
        now: Instant,
    ) {
        let Some(ex) = self.outbound.get_mut(&id) else {
            return;
        };
        ex.failures += 1;
        if ex.failures >= self.config.max_attempts {
            let failure = Failure::Exhausted {
                attempts: ex.failures,
                last: cause,
                request_acked: ex.acked,
            };
            ex.state = OutState::Backoff { conn };
            return self.finish(id, Err(failure), now);
        }
        let failures = ex.failures;
        ex.state = OutState::Backoff { conn };
        let delay = self
            .backoff(failures)
            .max(hint.min(self.config.backoff_max));
        self.timers.set(Timer::Outbound(id), now + delay);
    }

    /// Exponential backoff with "equal jitter": half fixed, half drawn from the seeded RNG.
    fn backoff(&mut self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        let base = self
            .config
            .backoff_initial
            .saturating_mul(1 << exp)
            .min(self.config.backoff_max);
        let half = base / 2;
        let half_micros = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
        let jitter = if half_micros == 0 {
            0
        } else {
            self.rng.next_u64() % (half_micros + 1)
        };
        half + Duration::from_micros(jitter)
    }

    fn on_outbound_timer(&mut self, id: ExchangeId, now: Instant) {
        let Some(ex) = self.outbound.get(&id) else {
            return;
        };
        match ex.state {
            OutState::Queued => {}
            OutState::Connecting { conn } => {
                self.abandon_conn(conn, now);
                self.retry(id, RetryCause::ConnectTimeout, None, now);
            }
            // A timeout makes the connection suspect: a black-holed stream never reports an
            // error, so the retry goes out on a fresh connection. (A Nack, in contrast,
            // proves the connection alive and the retry reuses it.)
            OutState::AwaitingAck { conn } => {
                self.abandon_conn(conn, now);
                self.retry(id, RetryCause::AckTimeout, None, now);
            }
            OutState::AwaitingReply { conn } => {
                self.abandon_conn(conn, now);
                self.retry(id, RetryCause::ReplyTimeout, None, now);
            }
            OutState::Backoff { conn } => {
                match conn.filter(|c| self.conns.get(c).is_some_and(|c| c.established)) {
                    Some(conn) => self.send_request(id, conn, now),
                    None => self.dial(id, now),
                }
            }
        }
    }

    /// Ends an outbound exchange: event, connection release, next queued exchange.
    fn finish(&mut self, id: ExchangeId, outcome: Result<Bytes, Failure>, now: Instant) {
        let Some(ex) = self.outbound.remove(&id) else {
            return;
        };
        self.timers.cancel(Timer::Outbound(id));
        let peer = ex.peer;
        if let Some(conn) = ex.state.conn() {
            self.release_outbound_conn(conn, id, outcome.is_ok(), now);
        }
        let was_active = match self.peers.get_mut(&peer) {
            Some(p) if p.active == Some(id) => {
                p.active = None;
                true
            }
            Some(p) => {
                p.queue.retain(|q| *q != id);
                false
            }
            None => false,
        };
        self.events.push_back(match outcome {
            Ok(payload) => Event::Reply {
                peer,
                addr: ex.addr,
                exchange: id,
                payload,
            },
            Err(failure) => Event::Failed {
                peer,
                exchange: id,
                payload: ex.payload,
                failure,
            },
        });
        if was_active {
            self.start_next(peer, now);
        }
    }

    fn start_next(&mut self, peer: PeerId, now: Instant) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        debug_assert!(p.active.is_none());
        if let Some(next) = p.queue.pop_front() {
            p.active = Some(next);
            self.begin(next, now);
        }
    }

    fn release_outbound_conn(&mut self, conn: ConnId, id: ExchangeId, healthy: bool, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.exchange != Some(id) {
            return;
        }
        c.exchange = None;
        let keep = healthy && c.established && self.config.reuse_connections && !self.shutting_down;
        if keep {
            let peer = c.peer;
            if let Some(p) = self.peers.get_mut(&peer) {
                if let Some(old) = p.reusable.replace(conn) {
                    if old != conn {
                        self.close(old, CloseReason::Done, now);
                    }
                }
            }
            self.arm_idle(conn, now);
        } else {
            self.close(conn, CloseReason::Done, now);
        }
    }

    fn on_established(&mut self, conn: ConnId, peer: PeerId, remote_max: usize, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.direction != Direction::Outbound || c.established {
            return; // Inbound connections are registered by `handle_accepted`.
        }
        if c.peer != peer {
            // The Connection checks the dialed identity; a driver passing another peer is a
            // bug, handled as an impostor rather than trusted.
            return self.violation(conn, "established with an unexpected identity", now);
        }
        c.established = true;
        c.remote_max = remote_max;
        match c.exchange {
            Some(id) => self.send_request(id, conn, now),
            None => self.close(conn, CloseReason::Done, now),
        }
    }

    fn on_outbound_message(&mut self, conn: ConnId, peer: PeerId, message: Message, now: Instant) {
        let id = match &message {
            Message::Ack {
                of: AckOf::Request,
                exchange,
                ..
            }
            | Message::Nack { exchange, .. }
            | Message::Reply { exchange, .. }
            | Message::Abort { exchange, .. } => *exchange,
            _ => {
                return self.violation(
                    conn,
                    "responder sent a message only a dialer may send",
                    now,
                );
            }
        };
        let state = match self.outbound.get(&id) {
            Some(ex) if ex.peer == peer => ex.state,
            _ => {
                // Unknown or finished exchange. A duplicate Reply still deserves an Ack so the
                // responder can stop waiting; anything else is stale and ignored.
                if let Message::Reply { attempt, .. } = message {
                    self.send(
                        conn,
                        Message::Ack {
                            exchange: id,
                            attempt,
                            of: AckOf::Reply,
                        },
                    );
                }
                return;
            }
        };
        match message {
            Message::Reply { payload, .. } if payload.len() > self.config.max_message_size => {
                // We advertised our limit; a responder exceeding it broke the protocol.
                self.finish(id, Err(Failure::Aborted(AbortReason::ReplyTooLarge)), now);
                self.violation(conn, "reply exceeds our advertised maximum", now);
            }
            Message::Reply {
                attempt, payload, ..
            } => {
                self.send(
                    conn,
                    Message::Ack {
                        exchange: id,
                        attempt,
                        of: AckOf::Reply,
                    },
                );
                if let Some(ex) = self.outbound.get_mut(&id) {
                    ex.acked = true;
                }
                self.finish(id, Ok(payload), now);
            }
            Message::Ack { attempt, .. } => {
                let bound = state.conn() == Some(conn);
                let waiting = matches!(
                    state,
                    OutState::AwaitingAck { .. } | OutState::Backoff { .. }
                );
                if let Some(ex) = self.outbound.get_mut(&id) {
                    ex.acked = true;
                    if bound && waiting && attempt <= ex.attempt {
                        ex.state = OutState::AwaitingReply { conn };
                        self.timers
                            .set(Timer::Outbound(id), now + self.config.reply_timeout);
                    }
                }
            }
            Message::Nack {
                attempt,
                reason,
                retry_after_ms,
                ..
            } => {
                let current = matches!(state, OutState::AwaitingAck { conn: c } if c == conn)
                    && self
                        .outbound
                        .get(&id)
                        .is_some_and(|ex| ex.attempt == attempt);
                if !current {
                    return;
                }
                self.stats.nacks_received += 1;
                if reason == NackReason::TooLarge {
                    return self.finish(id, Err(Failure::Refused(reason)), now);
                }
                let hint = Duration::from_millis(u64::from(retry_after_ms));
                self.retry_after(id, RetryCause::Nacked(reason), Some(conn), hint, now);
            }
            Message::Abort { reason, .. } => self.finish(id, Err(Failure::Aborted(reason)), now),
            _ => {}
        }
    }

    // ----- responder side -----

    fn on_inbound_message(&mut self, conn: ConnId, peer: PeerId, message: Message, now: Instant) {
        match message {
            Message::Request {
                exchange,
                attempt,
                payload,
            } => self.on_request(conn, peer, exchange, attempt, payload, now),
            Message::Ack {
                exchange,
                of: AckOf::Reply,
                ..
            } => self.on_reply_ack(conn, peer, exchange, now),
            _ => self.violation(conn, "dialer sent a message only a responder may send", now),
        }
    }

    fn on_request(
        &mut self,
        conn: ConnId,
        peer: PeerId,
        exchange: ExchangeId,
        attempt: u32,
        payload: Bytes,
        now: Instant,
    ) {
        let nack = |reason, retry_after_ms| Message::Nack {
            exchange,
            attempt,
            reason,
            retry_after_ms,
        };
        // The rate limit applies to every copy, duplicates included: a resend can make us
        // send a cached reply of up to `max_message_size` again.
        let limit = self.config.request_rate;
        let strikes_max = self.config.rate_limit_strikes;
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if let Err(wait) = p.requests.take(limit, now) {
            p.strikes += 1;
            let strikes = p.strikes;
            let disconnect = strikes >= strikes_max;
            self.events.push_back(Event::RateLimited {
                peer,
                limit: LimitKind::Requests,
                disconnected: disconnect,
            });
            let ms = u32::try_from(wait.as_millis().max(1)).unwrap_or(u32::MAX);
            self.send_nack(conn, nack(NackReason::RateLimited, ms));
            if disconnect {
                let remote = self.remote_of(conn);
                self.events
                    .push_back(Event::PeerError(PeerError::RateLimitAbuse {
                        remote,
                        strikes,
                    }));
                self.close(conn, CloseReason::RateLimited, now);
            }
            return;
        }
        p.strikes = 0;
        let key = (peer, exchange);
        if self.inbound.contains_key(&key) {
            return self.on_duplicate_request(conn, key, attempt, now);
        }
        if self.shutting_down {
            return self.send_nack(conn, nack(NackReason::ShuttingDown, 0));
        }
        // One exchange per connection at a time; a correct dialer never overlaps them.
        let busy_conn = self
            .conns
            .get(&conn)
            .and_then(|c| c.exchange)
            .is_some_and(|other| other != exchange);
        if busy_conn {
            return self.send_nack(conn, nack(NackReason::Busy, 0));
        }
        // The reassembler bounds the encoded message; the payload bound is checked here.
        if payload.len() > self.config.max_message_size {
            return self.send_nack(conn, nack(NackReason::TooLarge, 0));
        }
        if self.pending_inbound >= self.config.max_pending_inbound || !self.make_room(peer) {
            return self.send_nack(conn, nack(NackReason::Busy, 0));
        }
        // Accept: remember, acknowledge, deliver once.
        let hold = !self.config.ack_delay.is_zero();
        self.inbound.insert(
            key,
            Inbound {
                conn,
                attempt,
                state: InState::AwaitingResponse,
                ack_held: hold,
            },
        );
        if let Some(p) = self.peers.get_mut(&peer) {
            p.seen.push_back(exchange);
        }
        self.pending_inbound += 1;
        self.bind_inbound(conn, exchange);
        self.timers.set(
            Timer::Inbound(peer, exchange),
            now + self.config.response_timeout,
        );
        if hold {
            self.timers
                .set(Timer::Ack(peer, exchange), now + self.config.ack_delay);
        } else {
            self.send_held_ack(peer, exchange);
        }
        self.stats.requests_delivered += 1;
        let addr = self.remote_of(conn).addr;
        self.events.push_back(Event::Request {
            peer,
            addr,
            exchange,
            payload,
        });
    }

    /// A Request we already know: answer from the record, never from the application.
    fn on_duplicate_request(
        &mut self,
        conn: ConnId,
        key: (PeerId, ExchangeId),
        attempt: u32,
        now: Instant,
    ) {
        self.stats.duplicates_dropped += 1;
        let (_, exchange) = key;
        let Some(record) = self.inbound.get_mut(&key) else {
            return;
        };
        let old = std::mem::replace(&mut record.conn, conn);
        record.attempt = attempt;
        let state = record.state.clone();
        if old != conn {
            // The dialer moved to a new connection; the old one no longer carries this
            // exchange and may idle out (it may be a black hole that never closes itself).
            self.unbind_inbound(old, exchange, now);
        }
        let ack = Message::Ack {
            exchange,
            attempt,
            of: AckOf::Request,
        };
        let awaiting_ack = matches!(state, InState::AwaitingReplyAck { .. });
        match state {
            InState::AwaitingResponse => {
                self.bind_inbound(conn, exchange);
                self.timers.cancel(Timer::Ack(key.0, exchange));
                if let Some(record) = self.inbound.get_mut(&key) {
                    record.ack_held = false;
                }
                self.send(conn, ack);
            }
            InState::AwaitingReplyAck { reply } | InState::Unconfirmed { reply } => match reply {
                Some(payload) => {
                    // Only an exchange still waiting for its reply's Ack holds the
                    // connection (its timer releases it). An unconfirmed one has no timer
                    // left, so binding would keep the connection from ever idling out.
                    if awaiting_ack {
                        self.bind_inbound(conn, exchange);
                    }
                    self.send(conn, ack);
                    self.stats.replies_from_cache += 1;
                    self.send(
                        conn,
                        Message::Reply {
                            exchange,
                            attempt,
                            payload,
                        },
                    );
                }
                None => self.send(
                    conn,
                    Message::Abort {
                        exchange,
                        attempt,
                        reason: AbortReason::ReplyExpired,
                    },
                ),
            },
            // The dialer already acknowledged our reply: this copy is stale. Ack it so a
            // confused dialer stops resending, but say nothing more.
            InState::Done => self.send(conn, ack),
            InState::Aborted(reason) => self.send(
                conn,
                Message::Abort {
                    exchange,
                    attempt,
                    reason,
                },
            ),
        }
    }

    /// Sends the Ack of `peer`'s Request `exchange` now, on the connection its latest copy
    /// came on, and stops holding it.
    fn send_held_ack(&mut self, peer: PeerId, exchange: ExchangeId) {
        let Some(record) = self.inbound.get_mut(&(peer, exchange)) else {
            return;
        };
        record.ack_held = false;
        let (conn, attempt) = (record.conn, record.attempt);
        self.timers.cancel(Timer::Ack(peer, exchange));
        self.send(
            conn,
            Message::Ack {
                exchange,
                attempt,
                of: AckOf::Request,
            },
        );
    }

    fn on_reply_ack(&mut self, conn: ConnId, peer: PeerId, exchange: ExchangeId, now: Instant) {
        let key = (peer, exchange);
        let Some(record) = self.inbound.get_mut(&key) else {
            return;
        };
        let (reply, confirm) = match std::mem::replace(&mut record.state, InState::Done) {
            InState::AwaitingReplyAck { reply } => (reply, true),
            InState::Unconfirmed { reply } => (reply, false),
            other => {
                record.state = other;
                return;
            }
        };
        if let Some(reply) = reply {
            self.cache_bytes -= reply.len();
        }
        self.timers.cancel(Timer::Inbound(peer, exchange));
        if confirm {
            self.events
                .push_back(Event::ResponseDelivered { peer, exchange });
        }
        self.unbind_inbound(conn, exchange, now);
    }

    fn on_inbound_timer(&mut self, peer: PeerId, exchange: ExchangeId, now: Instant) {
        let Some(record) = self.inbound.get_mut(&(peer, exchange)) else {
            return;
        };
        match &mut record.state {
            InState::AwaitingResponse => {
                let (conn, attempt) = (record.conn, record.attempt);
                self.abort_inbound(peer, exchange, conn, attempt, AbortReason::NoResponse, now);
                self.events
                    .push_back(Event::ResponseTimedOut { peer, exchange });
            }
            InState::AwaitingReplyAck { reply } => {
                record.state = InState::Unconfirmed {
                    reply: reply.take(),
                };
                let conn = record.conn;
                self.unbind_inbound(conn, exchange, now);
                self.events
                    .push_back(Event::ResponseUnconfirmed { peer, exchange });
            }
            _ => {}
        }
    }

    fn abort_inbound(
        &mut self,
        peer: PeerId,
        exchange: ExchangeId,
        conn: ConnId,
        attempt: u32,
        reason: AbortReason,
        now: Instant,
    ) {
        if let Some(record) = self.inbound.get_mut(&(peer, exchange)) {
            debug_assert_eq!(record.state, InState::AwaitingResponse);
            record.state = InState::Aborted(reason);
            record.ack_held = false;
            self.pending_inbound -= 1;
        }
        self.timers.cancel(Timer::Inbound(peer, exchange));
        self.timers.cancel(Timer::Ack(peer, exchange));
        self.send(
            conn,
            Message::Abort {
                exchange,
                attempt,
                reason,
            },
        );
        self.unbind_inbound(conn, exchange, now);
    }

    fn on_oversized(
        &mut self,
        conn: ConnId,
        kind: Kind,
        exchange: Option<ExchangeId>,
        attempt: Option<u32>,
        now: Instant,
    ) {
        let direction = self.conns.get(&conn).map(|c| c.direction);
        match (direction, kind, exchange, attempt) {
            (Some(Direction::Inbound), Kind::Request, Some(exchange), Some(attempt)) => {
                self.send_nack(
                    conn,
                    Message::Nack {
                        exchange,
                        attempt,
                        reason: NackReason::TooLarge,
                        retry_after_ms: 0,
                    },
                );
            }
            (Some(Direction::Outbound), Kind::Reply, Some(id), _) => {
                // We advertised our limit; a responder exceeding it broke the protocol.
                self.finish(id, Err(Failure::Aborted(AbortReason::ReplyTooLarge)), now);
                self.violation(conn, "reply exceeds our advertised maximum", now);
            }
            _ => self.violation(conn, "oversized message", now),
        }
    }

    /// Keeps the per-peer dedupe memory within bounds; false if every slot is still live.
    fn make_room(&mut self, peer: PeerId) -> bool {
        let limit = self.config.dedupe_per_peer;
        let Some(p) = self.peers.get_mut(&peer) else {
            return false;
        };
        while p.seen.len() >= limit {
            let victim = p.seen.iter().position(|id| {
                self.inbound.get(&(peer, *id)).is_none_or(|r| {
                    !matches!(
                        r.state,
                        InState::AwaitingResponse | InState::AwaitingReplyAck { .. }
                    )
                })
            });
            let Some(index) = victim else {
                return false;
            };
            let Some(id) = p.seen.remove(index) else {
                return false;
            };
            if let Some(record) = self.inbound.remove(&(peer, id)) {
                if let InState::Unconfirmed { reply: Some(r) } = record.state {
                    self.cache_bytes -= r.len();
                }
                self.timers.cancel(Timer::Inbound(peer, id));
                self.timers.cancel(Timer::Ack(peer, id));
            }
        }
        true
    }

    /// Drops cached replies, oldest first, until the cache fits its byte budget.
    fn trim_reply_cache(&mut self) {
        while self.cache_bytes > self.config.reply_cache_bytes {
            let Some(key) = self.cache_order.pop_front() else {
                break;
            };
            if let Some(record) = self.inbound.get_mut(&key) {
                if let InState::AwaitingReplyAck { reply } | InState::Unconfirmed { reply } =
                    &mut record.state
                {
                    if let Some(r) = reply.take() {
                        self.cache_bytes -= r.len();
                    }
                }
            }
        }
        // Entries whose reply is gone are dropped from the order lazily above; keep the queue
        // from growing past the record count.
        if self.cache_order.len() > self.inbound.len() {
            let inbound = &self.inbound;
            self.cache_order.retain(|k| {
                inbound.get(k).is_some_and(|r| {
                    matches!(
                        r.state,
                        InState::AwaitingReplyAck { reply: Some(_) }
                            | InState::Unconfirmed { reply: Some(_) }
                    )
                })
            });
        }
    }

    fn drop_inbound_of(&mut self, peer: PeerId) {
        let keys: Vec<(PeerId, ExchangeId)> = self
            .inbound
            .range((peer, ExchangeId(0))..=(peer, ExchangeId(u64::MAX)))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if let Some(record) = self.inbound.remove(&key) {
                match record.state {
                    InState::AwaitingResponse => self.pending_inbound -= 1,
                    InState::AwaitingReplyAck { reply: Some(r) }
                    | InState::Unconfirmed { reply: Some(r) } => self.cache_bytes -= r.len(),
                    _ => {}
                }
            }
            self.timers.cancel(Timer::Inbound(key.0, key.1));
            self.timers.cancel(Timer::Ack(key.0, key.1));
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.seen.clear();
        }
    }

    fn bind_inbound(&mut self, conn: ConnId, exchange: ExchangeId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.exchange = Some(exchange);
            self.timers.cancel(Timer::Idle(conn));
        }
    }

    fn unbind_inbound(&mut self, conn: ConnId, exchange: ExchangeId, now: Instant) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if c.exchange == Some(exchange) {
                c.exchange = None;
                self.arm_idle(conn, now);
            }
        }
    }

    // ----- connections -----

    fn on_message(&mut self, conn: ConnId, message: Message, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let (peer, direction) = (c.peer, c.direction);
        if !c.established {
            return self.violation(conn, "message before the handshake finished", now);
        }
        match direction {
            Direction::Outbound => self.on_outbound_message(conn, peer, message, now),
            Direction::Inbound => self.on_inbound_message(conn, peer, message, now),
        }
    }

    fn on_closed(&mut self, conn: ConnId, closed: Closed, now: Instant) {
        let Some(c) = self.forget_conn(conn) else {
            return;
        };
        // Errors the peer caused (or that name it) are reported once, here. A handshake that
        // timed out is the network's doing, not the peer's: it is a retry cause instead.
        let report = match &closed {
            Closed::Error(ConnError::HandshakeTimeout { .. }) => None,
            Closed::Error(e) => Some(PeerError::Connection(e.clone())),
            _ => None,
        };
        if let Some(error) = report {
            self.events.push_back(Event::PeerError(error));
        }
        let Some(id) = c.exchange.filter(|_| c.direction == Direction::Outbound) else {
            // Inbound: records keep the (now dead) connection id; a resent Request on a new
            // connection rebinds them.
            return;
        };
        let definite = match &closed {
            Closed::ByPeer(CloseReason::NotAllowed) => {
                Some(Failure::Rejected(CloseReason::NotAllowed))
            }
            Closed::Error(e) if e.is_definite() => Some(Failure::Connection(e.clone())),
            _ => None,
        };
        if let Some(failure) = definite {
            return self.finish(id, Err(failure), now);
        }
        let Some(ex) = self.outbound.get(&id) else {
            return;
        };
        let cause = match (&ex.state, &closed) {
            (OutState::Backoff { .. }, _) => {
                // Already waiting to retry; just forget the connection.
                if let Some(ex) = self.outbound.get_mut(&id) {
                    ex.state = OutState::Backoff { conn: None };
                }
                return;
            }
            (OutState::Connecting { .. }, Closed::Error(ConnError::HandshakeTimeout { .. })) => {
                RetryCause::ConnectTimeout
            }
            (OutState::Connecting { .. }, why) => RetryCause::DialFailed(describe(why)),
            (_, why) => RetryCause::ConnectionLost(describe(why)),
        };
        self.retry(id, cause, None, now);
    }

    fn violation(&mut self, conn: ConnId, detail: &'static str, now: Instant) {
        let remote = self.remote_of(conn);
        self.events
            .push_back(Event::PeerError(PeerError::Violation { remote, detail }));
        self.close(conn, CloseReason::ProtocolViolation, now);
    }

    /// Closes a connection we decided to drop: tells the driver, and moves any outbound
    /// exchange on it to a retry.
    fn close(&mut self, conn: ConnId, reason: CloseReason, now: Instant) {
        let Some(c) = self.forget_conn(conn) else {
            return;
        };
        self.outputs.push_back(Output::Close { conn, reason });
        if c.direction == Direction::Outbound {
            if let Some(id) = c.exchange {
                if self.outbound.contains_key(&id) {
                    let lost = RetryCause::ConnectionLost(format!("closed locally: {reason:?}"));
                    self.retry(id, lost, None, now);
                }
            }
        }
    }

    /// Closes an outbound connection whose exchange will be retried elsewhere. The exchange
    /// is unbound first so that closing does not count as a second failure.
    fn abandon_conn(&mut self, conn: ConnId, now: Instant) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.exchange = None;
        }
        self.close(conn, CloseReason::Done, now);
    }

    /// Removes a connection from every table. Returns it if it was known.
    fn forget_conn(&mut self, conn: ConnId) -> Option<Conn> {
        let c = self.conns.remove(&conn)?;
        self.timers.cancel(Timer::Idle(conn));
        if let Some(p) = self.peers.get_mut(&c.peer) {
            p.conns = p.conns.saturating_sub(1);
            if p.reusable == Some(conn) {
                p.reusable = None;
            }
        }
        Some(c)
    }

    fn arm_idle(&mut self, conn: ConnId, now: Instant) {
        self.timers
            .set(Timer::Idle(conn), now + self.config.idle_timeout);
    }

    fn send(&mut self, conn: ConnId, message: Message) {
        if self.conns.get(&conn).is_some_and(|c| c.established) {
            self.outputs.push_back(Output::Send { conn, message });
        }
    }

    fn send_nack(&mut self, conn: ConnId, nack: Message) {
        self.stats.nacks_sent += 1;
        self.send(conn, nack);
    }

    fn remote_of(&self, conn: ConnId) -> Remote {
        let c = self.conns.get(&conn);
        Remote {
            addr: c.map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.addr),
            peer: c.map(|c| c.peer),
        }
    }

    fn conns_of(&self, peer: &PeerId) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.peer == *peer)
            .map(|(id, _)| *id)
            .collect()
    }

    fn alloc_conn(&mut self) -> ConnId {
        let id = ConnId::outbound(self.next_conn);
        self.next_conn += 1;
        id
    }

    fn fail_peer_exchanges(&mut self, peer: PeerId, failure: &Failure, now: Instant) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        // Queued ones first (so finishing the active one does not start them), then active.
        let queued: Vec<ExchangeId> = p.queue.drain(..).collect();
        let active = p.active;
        for id in queued.into_iter().chain(active) {
            self.finish(id, Err(failure.clone()), now);
        }
    }

    /// The state for `peer`, created on first use. Bounded by `max_tracked_peers`: an idle
    /// peer (nothing in flight, no connection) is evicted to make room; `None` if none is.
    fn peer_mut(&mut self, peer: PeerId, now: Instant) -> Option<&mut Peer> {
        if !self.peers.contains_key(&peer) {
            if self.peers.len() >= self.config.max_tracked_peers {
                let victim = self.peers.iter().find(|(id, p)| {
                    p.active.is_none()
                        && p.queue.is_empty()
                        && p.conns == 0
                        && !self.has_live_inbound(id)
                });
                let victim = *victim?.0;
                self.drop_inbound_of(victim);
                self.peers.remove(&victim);
            }
            self.peers.insert(
                peer,
                Peer {
                    active: None,
                    queue: VecDeque::new(),
                    reusable: None,
                    conns: 0,
                    seen: VecDeque::new(),
                    requests: Bucket::full(self.config.request_rate, now),
                    connections: Bucket::full(self.config.connection_rate, now),
                    strikes: 0,
                },
            );
        }
        self.peers.get_mut(&peer)
    }

    fn has_live_inbound(&self, peer: &PeerId) -> bool {
        self.inbound
            .range((*peer, ExchangeId(0))..=(*peer, ExchangeId(u64::MAX)))
            .any(|(_, r)| {
                matches!(
                    r.state,
                    InState::AwaitingResponse | InState::AwaitingReplyAck { .. }
                )
            })
    }

    /// Checks the cross-table invariants. Called by tests after every step; cheap enough
    /// for debug builds only.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let pending = self
            .inbound
            .values()
            .filter(|r| r.state == InState::AwaitingResponse)
            .count();
        assert_eq!(pending, self.pending_inbound, "pending count");
        let cached: usize = self
            .inbound
            .values()
            .map(|r| match &r.state {
                InState::AwaitingReplyAck { reply: Some(r) }
                | InState::Unconfirmed { reply: Some(r) } => r.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(cached, self.cache_bytes, "cache bytes");
        for (id, ex) in &self.outbound {
            let p = &self.peers[&ex.peer];
            let queued = p.queue.contains(id);
            assert_eq!(
                ex.state == OutState::Queued,
                queued,
                "{id} queued iff in the peer queue"
            );
            assert!(queued || p.active == Some(*id), "{id} is active or queued");
            assert!(
                ex.failures < self.config.max_attempts,
                "{id} within attempts"
            );
            if let Some(conn) = ex.state.conn() {
                if !matches!(ex.state, OutState::Backoff { .. }) {
                    assert_eq!(
                        self.conns[&conn].exchange,
                        Some(*id),
                        "{id} bound to {conn}"
                    );
                }
            }
        }
        for (peer, p) in &self.peers {
            if let Some(active) = p.active {
                assert!(
                    self.outbound.contains_key(&active),
                    "active exchange exists"
                );
            }
            assert!(p.seen.len() <= self.config.dedupe_per_peer);
            assert!(p.queue.len() <= self.config.max_queued_per_peer);
            let conns = self.conns.values().filter(|c| c.peer == *peer).count();
            assert_eq!(conns, p.conns, "conn count of {peer:?}");
        }
        assert!(self.cache_bytes <= self.config.reply_cache_bytes);
        for ((peer, id), r) in &self.inbound {
            assert!(
                !r.ack_held || r.state == InState::AwaitingResponse,
                "{id} of {peer:?}: a held Ack only while awaiting the response"
            );
        }
    }
}

fn describe(closed: &Closed) -> String {
    match closed {
        Closed::ByPeer(reason) => format!("closed by peer: {reason:?}"),
        Closed::Locally(reason) => format!("closed: {reason:?}"),
        Closed::Error(e) => e.to_string(),
        Closed::Io(e) => e.clone(),
    }
}
