//! What an [`Endpoint`](super::Endpoint) tells its driver and application: events,
//! failures and their causes, refusals, and counters.

use std::fmt;
use std::net::SocketAddr;

use bytes::Bytes;

#[cfg(doc)]
use super::Endpoint;
use crate::connection::{ConnError, Remote};
use crate::identity::PeerId;
use crate::membership::{Digest, Fork, Refused};
use crate::wire::{AbortReason, CloseReason, ExchangeId, NackReason};

/// Why an outbound exchange was retried (and, once attempts run out, why it failed).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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

impl fmt::Display for RetryCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DialFailed(why) => write!(f, "could not connect: {why}"),
            Self::ConnectTimeout => f.write_str("connecting took longer than connect_timeout"),
            Self::ConnectionLost(why) => write!(f, "connection lost: {why}"),
            Self::AckTimeout => f.write_str("no Ack within ack_timeout"),
            Self::ReplyTimeout => f.write_str("no Reply within reply_timeout"),
            Self::Nacked(reason) => write!(f, "refused for now: {reason}"),
        }
    }
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
    /// Our application cancelled it ([`crate::endpoint::Endpoint::cancel`]). If it was in
    /// flight, the responder may have received it.
    Cancelled,
    /// Its deadline passed before it ended. If it was in flight, the responder may have
    /// received it.
    DeadlineExceeded,
    /// The peer became inactive (its address record expired and no newer one came) while
    /// the exchange could not reach it. Not delivered: it was queued, dialing or backing
    /// off, never in contact.
    Inactive,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exhausted {
                attempts,
                last,
                request_acked,
            } => {
                write!(f, "gave up after {attempts} attempts (last: {last}); ")?;
                f.write_str(if *request_acked {
                    "the peer had acknowledged the request, so its application has it"
                } else {
                    "the peer never acknowledged it"
                })
            }
            Self::Refused(reason) => write!(f, "refused by the peer: {reason}"),
            Self::Aborted(reason) => write!(f, "the peer gave up after accepting it: {reason}"),
            Self::Rejected(reason) => write!(f, "rejected by the peer: {reason}"),
            Self::Connection(error) => error.fmt(f),
            Self::TooLarge { len, max } => {
                write!(f, "{len} bytes is more than the peer accepts ({max})")
            }
            Self::Revoked => f.write_str("the peer was removed from the allow list"),
            Self::ShuttingDown => f.write_str("the node is shutting down"),
            Self::Cancelled => f.write_str("cancelled by our application"),
            Self::DeadlineExceeded => f.write_str("its deadline passed"),
            Self::Inactive => f.write_str(
                "the peer is inactive: its address record expired and it published no newer one",
            ),
        }
    }
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
/// outbound in `Reply` or `Failed`; inbound in `ResponseDelivered`, `ResponseUnconfirmed`,
/// `ResponseTimedOut`, `ResponseAborted` or `ResponseCancelled`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
        /// This request was delivered before a restart and not answered: the node had
        /// acknowledged it, so it comes again (durable nodes only). Answer it as usual.
        redelivered: bool,
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
        /// Recovered from the store after a restart: the application may have taken this
        /// outcome just before the node stopped (durable nodes only).
        redelivered: bool,
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
        /// Recovered from the store after a restart (a dead letter): the application may
        /// have taken this outcome just before the node stopped (durable nodes only).
        redelivered: bool,
    },
    /// The peer acknowledged our reply.
    ResponseDelivered {
        /// To.
        peer: PeerId,
        /// Exchange.
        exchange: ExchangeId,
        /// Recovered from the store after a restart: the application may have taken this
        /// outcome just before the node stopped (durable nodes only).
        redelivered: bool,
    },
    /// Our reply was not acknowledged within `reply_ack_timeout`. It stays cached for a
    /// resent request, but no further event follows.
    ResponseUnconfirmed {
        /// To.
        peer: PeerId,
        /// Exchange.
        exchange: ExchangeId,
        /// Recovered from the store after a restart: the application may have taken this
        /// outcome just before the node stopped (durable nodes only).
        redelivered: bool,
    },
    /// We did not answer within `response_timeout`; the dialer was told (Abort).
    ResponseTimedOut {
        /// From.
        peer: PeerId,
        /// Exchange.
        exchange: ExchangeId,
        /// Recovered from the store after a restart: the application may have taken this
        /// outcome just before the node stopped (durable nodes only).
        redelivered: bool,
    },
    /// We gave up on a request the application had received, and told the dialer with an
    /// Abort carrying `reason`: the reply was larger than the dialer accepts
    /// (`ReplyTooLarge`, also returned by [`Endpoint::respond`]), or we are shutting down
    /// (`ShuttingDown`). A lapsed response timeout is `ResponseTimedOut` instead.
    ResponseAborted {
        /// From.
        peer: PeerId,
        /// Exchange.
        exchange: ExchangeId,
        /// What the dialer was told.
        reason: AbortReason,
        /// Recovered from the store after a restart: the application may have taken this
        /// outcome just before the node stopped (durable nodes only).
        redelivered: bool,
    },
    /// The peer was revoked while its request awaited our answer: it was disconnected
    /// (`Close{NotAllowed}`) and the request forgotten; an answer now is refused.
    ResponseCancelled {
        /// From.
        peer: PeerId,
        /// Exchange.
        exchange: ExchangeId,
        /// Recovered from the store after a restart: the application may have taken this
        /// outcome just before the node stopped (durable nodes only).
        redelivered: bool,
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
    /// The signed membership moved, or a document was refused, or an alarm went off.
    Membership(MembershipEvent),
    /// Address records: published, accepted, refused, peers gone inactive or back.
    Record(RecordEvent),
}

/// Where a membership document came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This node's operator or application ([`Endpoint::offer_membership`]).
    ///
    /// [`Endpoint::offer_membership`]: super::Endpoint::offer_membership
    Local,
    /// A peer, over its authenticated connection.
    Peer(PeerId),
    /// The records directory the driver reads ([`Endpoint::offer_records`]).
    ///
    /// [`Endpoint::offer_records`]: super::Endpoint::offer_records
    Directory,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local => f.write_str("this node's operator"),
            Self::Directory => f.write_str("the records directory"),
            Self::Peer(peer) => write!(f, "{peer}"),
        }
    }
}

/// What happened to address records (see the endpoint's `records` module).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordEvent {
    /// This node sealed a new record of its own (at start, on a new address or epoch, or
    /// to refresh it): a driver with a directory writes `sealed` there.
    Published {
        /// Its sequence number.
        seq: u64,
        /// When it expires (Unix seconds).
        expires: u64,
        /// The addresses it names.
        addresses: Vec<std::net::SocketAddr>,
        /// The sealed record.
        sealed: Bytes,
    },
    /// A member's record was taken as its freshest.
    Accepted {
        /// Its owner.
        peer: PeerId,
        /// Who passed it on.
        source: Source,
        /// Its sequence number.
        seq: u64,
        /// The addresses it names.
        addresses: Vec<std::net::SocketAddr>,
        /// The owner named other addresses before (it moved): our exchanges with it now
        /// dial the new ones.
        moved: bool,
        /// No record of it was held before (first heard of, or back after being inactive).
        first: bool,
    },
    /// A record was refused (reported once per copy).
    Refused {
        /// Who passed it on.
        source: Source,
        /// Its owner as its header names it, if it decoded that far.
        owner: Option<PeerId>,
        /// Why.
        refusal: crate::records::Refusal,
    },
    /// A member's record expired and no newer one came: it is inactive, nothing dials it,
    /// and our exchanges with it that could not reach it failed with `Inactive`.
    Inactive {
        /// The member.
        peer: PeerId,
    },
    /// This node cannot publish its record for another reason (an address the membership
    /// does not allow it, a member key the document gives that cannot receive HPKE).
    CannotPublish {
        /// Why.
        why: String,
    },
    /// This node cannot publish: the membership does not list its record key.
    Unlisted {
        /// The epoch in force.
        epoch: u64,
        /// Our record key, which the committee must add.
        key: crate::records::RecordKeyId,
    },
}

impl fmt::Display for RecordEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |a: &[std::net::SocketAddr]| {
            a.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Self::Published {
                seq,
                expires,
                addresses,
                ..
            } => write!(
                f,
                "published our address record {seq} ({}), expiring at {expires}",
                list(addresses)
            ),
            Self::Accepted {
                peer,
                source,
                seq,
                addresses,
                moved,
                ..
            } => write!(
                f,
                "address record {seq} of {peer} from {source}: {}{}",
                list(addresses),
                if *moved { " (it moved)" } else { "" }
            ),
            Self::Refused {
                source, refusal, ..
            } => {
                write!(f, "refused an address record from {source}: {refusal}")
            }
            Self::Inactive { peer } => write!(
                f,
                "{peer} is inactive: its address record expired and no newer one came"
            ),
            Self::CannotPublish { why } => write!(f, "cannot publish our address record: {why}"),
            Self::Unlisted { epoch, key } => write!(
                f,
                "cannot publish our address record: membership epoch {epoch} does not list our \
                 record key {key}"
            ),
        }
    }
}

/// What the membership did (see the endpoint's `membership` module).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MembershipEvent {
    /// Documents were accepted; `epoch` is in force and the allow list follows it.
    Applied {
        /// The epoch now in force.
        epoch: u64,
        /// Its digest.
        digest: Digest,
        /// Who gave it.
        source: Source,
        /// Peers the allow list gained.
        added: Vec<PeerId>,
        /// Peers it lost (disconnected, their exchanges failed with `Revoked`).
        removed: Vec<PeerId>,
    },
    /// A document was refused (reported once per copy); nothing changed.
    Refused {
        /// Who gave it.
        source: Source,
        /// The document and every reason.
        refused: Refused,
    },
    /// Alarm: a threshold of the committee signed two documents for one epoch. This node
    /// keeps its own.
    Fork {
        /// Who showed the other one.
        source: Source,
        /// Both digests.
        fork: Fork,
    },
    /// Alarm: the document in force has expired and no newer one arrived. It stays in
    /// force (cutting every peer off would stop the network that must sign the next).
    Expired {
        /// Its epoch.
        epoch: u64,
        /// Its digest.
        digest: Digest,
    },
    /// A member asked for a document this node holds but cannot send it: the document is
    /// larger than the member's (or this node's) `max_message_size` allows. The member
    /// stays behind until the limit is raised. Reported once per member and epoch.
    Unsendable {
        /// The member.
        peer: PeerId,
        /// The epoch it needs next.
        epoch: u64,
        /// The document's encoded size.
        size: usize,
        /// The most one Documents message to that member may carry.
        max: usize,
    },
}

impl fmt::Display for MembershipEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Applied {
                epoch,
                digest,
                source,
                added,
                removed,
            } => write!(
                f,
                "membership epoch {epoch} ({}) applied, from {source}: {} peers added, {} removed",
                digest.short(),
                added.len(),
                removed.len()
            ),
            Self::Refused { source, refused } => {
                write!(f, "membership document from {source} refused: {refused}")
            }
            Self::Fork { source, fork } => {
                write!(f, "ALARM: membership {fork} (shown by {source})")
            }
            Self::Unsendable {
                peer,
                epoch,
                size,
                max,
            } => write!(
                f,
                "membership epoch {epoch} ({size} B) cannot be sent to {peer}: a Documents message to it carries at most {max} B (raise max_message_size on both nodes)"
            ),
            Self::Expired { epoch, digest } => write!(
                f,
                "ALARM: membership epoch {epoch} ({}) has expired and no newer one arrived; \
                 it stays in force",
                digest.short()
            ),
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Requests => "request",
            Self::Connections => "connection",
        })
    }
}

/// One line for people: what happened, to which exchange of which peer.
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let again = |redelivered: bool| if redelivered { ", redelivered" } else { "" };
        match self {
            Self::Request {
                peer,
                exchange,
                payload,
                redelivered,
                ..
            } => write!(
                f,
                "request {exchange} from {peer} ({} bytes{})",
                payload.len(),
                again(*redelivered)
            ),
            Self::Reply {
                peer,
                exchange,
                payload,
                redelivered,
                ..
            } => write!(
                f,
                "reply to {exchange} from {peer} ({} bytes{})",
                payload.len(),
                again(*redelivered)
            ),
            Self::Failed {
                peer,
                exchange,
                failure,
                redelivered,
                ..
            } => write!(
                f,
                "request {exchange} to {peer} failed{}: {failure}",
                again(*redelivered)
            ),
            Self::ResponseDelivered {
                peer,
                exchange,
                redelivered,
            } => write!(
                f,
                "{peer} acknowledged our reply to {exchange}{}",
                again(*redelivered)
            ),
            Self::ResponseUnconfirmed {
                peer,
                exchange,
                redelivered,
            } => write!(
                f,
                "{peer} did not acknowledge our reply to {exchange}{}",
                again(*redelivered)
            ),
            Self::ResponseTimedOut {
                peer,
                exchange,
                redelivered,
            } => write!(
                f,
                "request {exchange} from {peer} was not answered within response_timeout{}",
                again(*redelivered)
            ),
            Self::ResponseAborted {
                peer,
                exchange,
                reason,
                redelivered,
            } => write!(
                f,
                "request {exchange} from {peer} abandoned{}: {reason}",
                again(*redelivered)
            ),
            Self::ResponseCancelled {
                peer,
                exchange,
                redelivered,
            } => write!(
                f,
                "request {exchange} from {peer} cancelled{}: the peer was revoked",
                again(*redelivered)
            ),
            Self::PeerError(error) => error.fmt(f),
            Self::RateLimited {
                peer,
                limit,
                disconnected,
            } => write!(
                f,
                "{peer} went over its {limit} rate{}",
                if *disconnected {
                    " and was disconnected"
                } else {
                    ""
                }
            ),
            Self::Membership(event) => event.fmt(f),
            Self::Record(event) => event.fmt(f),
        }
    }
}

impl Event {
    /// The peer and exchange of a responder outcome (`ResponseDelivered`,
    /// `ResponseUnconfirmed`, `ResponseTimedOut`, `ResponseAborted`, `ResponseCancelled`).
    pub fn response_of(&self) -> Option<(PeerId, ExchangeId)> {
        match self {
            Self::ResponseDelivered { peer, exchange, .. }
            | Self::ResponseUnconfirmed { peer, exchange, .. }
            | Self::ResponseTimedOut { peer, exchange, .. }
            | Self::ResponseAborted { peer, exchange, .. }
            | Self::ResponseCancelled { peer, exchange, .. } => Some((*peer, *exchange)),
            _ => None,
        }
    }

    /// Whether this event is only informational (a peer error, a rate limit), rather than
    /// a request or the outcome of an exchange. Drivers may deliver informational events on
    /// a separate channel and drop them when nobody reads it; outcomes must never be
    /// dropped.
    pub fn is_priority(&self) -> bool {
        matches!(
            self,
            Self::PeerError(_) | Self::RateLimited { .. } | Self::Membership(_) | Self::Record(_)
        )
    }

    /// What the application hands back to confirm it stored this event, in the driver's
    /// confirm mode: the outcome of one of our exchanges (`Reply`, `Failed`) or a peer's
    /// request (`Request`). `None` for events there is nothing to confirm of.
    pub fn receipt(&self) -> Option<Receipt> {
        match self {
            Self::Reply { exchange, .. } | Self::Failed { exchange, .. } => {
                Some(Receipt::Outcome(*exchange))
            }
            Self::Request { peer, exchange, .. } => Some(Receipt::Request {
                peer: *peer,
                exchange: *exchange,
            }),
            _ => None,
        }
    }
}

/// Names an event the application confirms it has stored ([`Event::receipt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Receipt {
    /// The outcome of our exchange.
    Outcome(ExchangeId),
    /// A peer's request.
    Request {
        /// From.
        peer: PeerId,
        /// Its exchange.
        exchange: ExchangeId,
    },
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
    /// No address is known for the peer: no address record of it has reached this node
    /// (yet), and its membership or allow-list entry gives none.
    #[error(
        "no address is known for {0}: no address record of it has reached this node and its \
         membership entry gives none"
    )]
    NoAddress(PeerId),
    /// The peer is inactive: its address record expired and no newer one came. Nothing
    /// dials it until it publishes again.
    #[error("{0} is inactive: its address record expired and it published no newer one")]
    Inactive(PeerId),
    /// Too many distinct peers are tracked (`max_tracked_peers`).
    #[error("too many peers tracked")]
    TooManyPeers,
    /// The endpoint is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// The application has not taken `limit` outcomes of earlier exchanges
    /// (`Config::max_unread_outcomes`); read them first.
    #[error("{limit} outcomes of earlier exchanges are unread")]
    Unread {
        /// `max_unread_outcomes`.
        limit: usize,
    },
    /// Another exchange with this peer carries the same idempotency key and is not
    /// settled yet: unfinished, or finished with an outcome the application has not taken
    /// (or, in confirm mode, confirmed). Look it up by its key instead of sending again.
    #[error("idempotency key {key} is in use by exchange {exchange} with peer {peer} ({})",
        if *finished { "finished, outcome not settled" } else { "unfinished" })]
    KeyInUse {
        /// Peer.
        peer: PeerId,
        /// The key, as text (UTF-8 where it is, hex otherwise).
        key: String,
        /// The exchange that holds it.
        exchange: ExchangeId,
        /// Whether that exchange has finished (its outcome waits for the application).
        finished: bool,
    },
    /// An idempotency key must be 1 to `MAX_KEY_LEN` bytes long.
    #[error("an idempotency key must be 1 to {max} bytes long, not {len}")]
    BadKey {
        /// Its length.
        len: usize,
        /// The longest allowed.
        max: usize,
    },
}

/// Where an exchange looked up by its idempotency key stands
/// ([`Endpoint::lookup`](super::Endpoint::lookup)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyedExchange {
    /// Waiting behind an earlier exchange with the same peer.
    Queued {
        /// Its id.
        exchange: ExchangeId,
    },
    /// Being tried.
    InFlight {
        /// Its id.
        exchange: ExchangeId,
        /// The responder acknowledged it: its application has the request.
        acked: bool,
    },
    /// Over: its outcome (`Event::Reply` or `Event::Failed`), not yet settled by the
    /// application.
    Finished(Event),
}

/// A key as people read it: its text when it is UTF-8, its hex digits otherwise.
pub(crate) fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => format!("{text:?}"),
        Err(_) => hex::encode(key),
    }
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
    /// The reply exceeds what the dialer accepts. The exchange is over: the dialer was told
    /// (Abort `ReplyTooLarge`), and `Event::ResponseAborted` follows.
    #[error("reply of {len} bytes exceeds the peer's maximum of {max}")]
    TooLarge {
        /// Reply length.
        len: usize,
        /// Peer's limit.
        max: usize,
    },
}

/// How one of our exchanges stands ([`crate::Endpoint::progress`]): for an application
/// that waited long and wants to say why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Its state (`Queued`, `Connecting`, `AwaitingAck`, `AwaitingReply`, `Backoff`).
    pub state: &'static str,
    /// Tries that failed so far.
    pub failed_tries: u32,
    /// The responder acknowledged the request: its application has it.
    pub acked: bool,
    /// Why the last try failed, if one has.
    pub last_cause: Option<RetryCause>,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tries = match self.failed_tries {
            1 => "1 failed try".to_owned(),
            n => format!("{n} failed tries"),
        };
        write!(f, "{}, {tries}", self.state)?;
        if self.acked {
            f.write_str(", acknowledged by the peer")?;
        }
        if let Some(cause) = &self.last_cause {
            write!(f, "; the last: {cause}")?;
        }
        Ok(())
    }
}

/// One peer as a status page shows it ([`crate::Endpoint::peer_summaries`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerSummary {
    /// Who.
    pub peer: PeerId,
    /// Its allow-list (or membership) entry's label, if any.
    pub name: Option<String>,
    /// The allow list in force lets it talk to us.
    pub allowed: bool,
    /// Established connections with it.
    pub connections: usize,
    /// Connections with it still dialing or handshaking.
    pub connecting: usize,
    /// Our exchanges with it waiting their turn (one runs per peer at a time).
    pub queued: usize,
    /// Our exchanges with it under way (dialing, awaiting an Ack or a reply, backing off).
    pub active: usize,
    /// Its requests delivered to our application and not answered yet.
    pub awaiting_answer: usize,
    /// Our replies to it not acknowledged yet.
    pub awaiting_ack: usize,
}

impl PeerSummary {
    /// `peer`, with nothing open.
    pub fn new(peer: PeerId) -> Self {
        Self {
            peer,
            name: None,
            allowed: false,
            connections: 0,
            connecting: 0,
            queued: 0,
            active: 0,
            awaiting_answer: 0,
            awaiting_ack: 0,
        }
    }
}

/// Counters, for tests, the simulator and monitoring.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Stale copies of exchanges already settled and forgotten (their id at or below the
    /// peer's settled floor), refused with `Abort{Settled}` instead of delivered again.
    pub settled_refused: u64,
    /// Replies re-sent from the cache for a resent request.
    pub replies_from_cache: u64,
    /// Nacks sent.
    pub nacks_sent: u64,
    /// Nacks received.
    pub nacks_received: u64,
    /// Membership documents accepted.
    pub membership_applied: u64,
    /// Membership documents refused (each copy counted once).
    pub membership_refused: u64,
    /// Members that asked for a document too large to send them (`Unsendable`).
    pub membership_unsendable: u64,
    /// Membership forks found.
    pub membership_forks: u64,
    /// Connections dialed only to spread or learn the membership (or address records).
    pub membership_sync_dials: u64,
    /// Address records of our own sealed.
    pub records_published: u64,
    /// Members' address records taken.
    pub records_accepted: u64,
    /// Address records refused (every copy counted; each reported once).
    pub records_refused: u64,
    /// Dials made with the IK pattern (the responder's key known; the rest use XX).
    pub ik_dials: u64,
    /// Our Requests sent in IK message 1 (0-RTT).
    pub early_requests_sent: u64,
    /// Peers' Requests in IK message 1 taken as fresh.
    pub early_requests_taken: u64,
    /// Peers' Requests in IK message 1 that could have been replays: Nacked
    /// `EarlyRefused`, so the dialer sent them again on the session.
    pub early_requests_refused: u64,
}
