//! The responder's side: a peer's exchanges, from its Request to the Ack of our Reply, and
//! the records that deduplicate them.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;

use crate::durable::{self, InboundRecord, InboundStage};
use crate::identity::PeerId;
use crate::wire::{AbortReason, AckOf, CloseReason, ExchangeId, Kind, Message, NackReason};

use super::events::{Event, LimitKind, PeerError};
use super::{ConnId, Direction, Endpoint, Timer};

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
///                                             the cached reply still answers resends;
///                                             a late Ack of the Reply -> Done)
///
///   A durable node's records come back after a restart in the state they were stored in
///   (AwaitingResponse, AwaitingReplyAck or Done). A finished record is forgotten when the
///   dedupe bounds need its room, or with its idle peer when room is needed to track another.
///   A resent Request for a known id is Acked and answered from the record; it never
///   reaches the application again.
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum InState {
    AwaitingResponse,
    AwaitingReplyAck { reply: Option<Bytes> },
    Unconfirmed { reply: Option<Bytes> },
    Done,
    Aborted(AbortReason),
}

#[derive(Debug)]
pub(super) struct Inbound {
    /// The connection the latest copy of the Request came on (may be gone).
    pub(super) conn: ConnId,
    /// Attempt number of that copy, echoed in our answers.
    pub(super) attempt: u32,
    pub(super) state: InState,
    /// The Ack of this Request is being held (`Config::ack_delay`), not sent yet.
    pub(super) ack_held: bool,
    /// The largest payload the dialer accepts, as its latest connection advertised. Kept
    /// here because that connection may be gone when the application answers.
    pub(super) remote_max: usize,
    /// Digest of the request's payload: a resend must carry the same payload.
    pub(super) digest: u128,
    /// Order of acceptance (eviction goes oldest first; kept across restarts).
    pub(super) seq: u64,
    /// Where the request came from.
    pub(super) addr: SocketAddr,
    /// The application confirmed it stored the request (confirm mode): a durable node no
    /// longer keeps the request's bytes, nor delivers it again after a restart.
    pub(super) confirmed: bool,
}

/// How far below a peer's settled floor an exchange id still counts as settled, in serial
/// number arithmetic (RFC 1982) over the 64-bit id space. One dialer incarnation's ids
/// count up by one per exchange, so every id it used before the floor lies within this
/// window; a memory-only dialer that restarts draws a new random start, which lands in the
/// window with a chance of 2^-32.
pub const SETTLED_WINDOW: u64 = 1 << 32;

/// A peer's settled floor (see `Endpoint::settled`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Floor {
    pub(super) id: ExchangeId,
    /// The acceptance sequence number it was raised at: the key of its stored row, and
    /// the age that picks which floor goes when there are too many.
    pub(super) seq: u64,
}

/// Whether `id` lies at or below `floor`, within the settled window.
fn at_or_below(floor: ExchangeId, id: ExchangeId) -> bool {
    floor.0.wrapping_sub(id.0) < SETTLED_WINDOW
}

/// What a dedupe record costs in memory, for `Config::dedupe_bytes`: the record, its keys in
/// the maps and queues that index it, and allocator overhead (measured at about 250 B).
/// Cached replies are counted apart, in `reply_cache_bytes`.
pub const DEDUPE_RECORD_COST: usize = 256;

impl Inbound {
    /// Whether the exchange still needs its record: awaiting our answer, or our reply's Ack.
    pub(super) fn is_live(&self) -> bool {
        matches!(
            self.state,
            InState::AwaitingResponse | InState::AwaitingReplyAck { .. }
        )
    }
}

impl Endpoint {
    pub(super) fn on_inbound_message(
        &mut self,
        conn: ConnId,
        peer: PeerId,
        message: Message,
        now: Instant,
    ) {
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
            // Our large Reply is still arriving there: wait on for its Ack.
            Message::Progress { exchange, .. } => {
                let waiting = self.inbound.get(&(peer, exchange)).is_some_and(|r| {
                    r.conn == conn && matches!(r.state, InState::AwaitingReplyAck { .. })
                });
                if waiting {
                    self.timers.set(
                        Timer::Inbound(peer, exchange),
                        now + self.config.reply_ack_timeout,
                    );
                }
            }
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
            return self.on_duplicate_request(conn, key, attempt, &payload, now);
        }
        if self.is_settled(peer, exchange) && !self.sabotaged(super::Sabotage::NoDedupe) {
            // A copy of an exchange whose record was forgotten to make room: it ended here
            // long ago. Delivering it would deliver it twice; the dialer is told it is over.
            self.stats.settled_refused += 1;
            return self.send(
                conn,
                Message::Abort {
                    exchange,
                    attempt,
                    reason: AbortReason::Settled,
                },
            );
        }
        if self.shutting_down || self.draining {
            return self.send_nack(conn, nack(NackReason::ShuttingDown, 0));
        }
        // A dialer sends its next Request on a connection only after the previous exchange
        // ended, so a new Request proves our Reply on it arrived, even if its Ack was lost:
        // without this, the connection would stay bound to the old exchange (and Nack the
        // dialer Busy) until the reply-ack timeout.
        let previous = self
            .conns
            .get(&conn)
            .and_then(|c| c.exchange)
            .filter(|previous| *previous != exchange);
        if let Some(previous) = previous {
            let replied = self
                .inbound
                .get(&(peer, previous))
                .is_some_and(|r| matches!(r.state, InState::AwaitingReplyAck { .. }));
            if replied {
                self.on_reply_ack(conn, peer, previous, now);
            }
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
        let limit = if self.sabotaged(super::Sabotage::OffByOneMaxSize) {
            self.config.max_message_size.saturating_sub(1)
        } else {
            self.config.max_message_size
        };
        if payload.len() > limit {
            return self.send_nack(conn, nack(NackReason::TooLarge, 0));
        }
        if self.pending_inbound >= self.config.max_pending_inbound || !self.make_room(peer) {
            return self.send_nack(conn, nack(NackReason::Busy, 0));
        }
        // Accept: remember (durably, before the Ack leaves), acknowledge, deliver once.
        let hold = !self.config.ack_delay.is_zero();
        let remote_max = self.remote_max_of(conn);
        let addr = self.remote_of(conn).addr;
        let seq = self.alloc_seq();
        self.inbound.insert(
            key,
            Inbound {
                conn,
                attempt,
                state: InState::AwaitingResponse,
                ack_held: hold,
                remote_max,
                digest: durable::digest(&payload),
                seq,
                addr,
                confirmed: false,
            },
        );
        self.remember(key);
        self.persist_inbound(key, Some(&payload));
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
        if self.sabotaged(super::Sabotage::SwallowDelivery) {
            return;
        }
        if !self.sabotaged(super::Sabotage::UncountedDelivery) {
            self.stats.requests_delivered += 1;
        }
        self.events.push_back(Event::Request {
            peer,
            addr,
            exchange,
            payload,
            redelivered: false,
        });
    }

    /// See [`Endpoint::confirm_request`].
    pub(super) fn confirm_inbound(&mut self, peer: PeerId, exchange: ExchangeId) -> bool {
        let key = (peer, exchange);
        let Some(record) = self.inbound.get_mut(&key) else {
            return false;
        };
        if record.state != InState::AwaitingResponse || record.confirmed {
            return false;
        }
        record.confirmed = true;
        self.persist_inbound(key, None);
        true
    }

    /// Indexes a new record for deduplication and eviction.
    pub(super) fn remember(&mut self, key: (PeerId, ExchangeId)) {
        if let Some(p) = self.peers.get_mut(&key.0) {
            p.seen.push_back(key.1);
        }
        self.dedupe_order.push_back(key);
    }

    /// Durable mode: journals the record's current state. `pending` is the request's
    /// payload, needed (and only given) while the record awaits the application's answer.
    pub(super) fn persist_inbound(&mut self, key: (PeerId, ExchangeId), pending: Option<&Bytes>) {
        let Some(journal) = &mut self.journal else {
            return;
        };
        let Some(r) = self.inbound.get(&key) else {
            return;
        };
        let stage = match (&r.state, pending) {
            (InState::AwaitingResponse, _) if r.confirmed => {
                InboundStage::Pending { payload: None }
            }
            (InState::AwaitingResponse, Some(payload)) => InboundStage::Pending {
                payload: Some(payload.clone()),
            },
            // Still pending and already stored with its payload: nothing changed.
            (InState::AwaitingResponse, None) => return,
            (InState::AwaitingReplyAck { reply }, _) => InboundStage::Replied {
                reply: reply.clone(),
            },
            (InState::Unconfirmed { reply }, _) => InboundStage::Unconfirmed {
                reply: reply.clone(),
            },
            (InState::Done, _) => InboundStage::Done,
            (InState::Aborted(reason), _) => InboundStage::Aborted(*reason),
        };
        let record = InboundRecord {
            seq: r.seq,
            digest: r.digest,
            addr: r.addr,
            remote_max: r.remote_max as u64,
            stage,
        };
        journal.push(durable::put_inbound(key.0, key.1, &record));
    }

    /// A Request we already know: answer from the record, never from the application.
    fn on_duplicate_request(
        &mut self,
        conn: ConnId,
        key: (PeerId, ExchangeId),
        attempt: u32,
        payload: &Bytes,
        now: Instant,
    ) {
        let (_, exchange) = key;
        let remote_max = self.remote_max_of(conn);
        let no_dedupe = self.sabotaged(super::Sabotage::NoDedupe);
        let Some(record) = self.inbound.get_mut(&key) else {
            return;
        };
        if record.digest != durable::digest(payload) {
            // Not a resend: another request under an id we remember. Acknowledging it would
            // lose it (the application would never see it), so refuse it loudly.
            return self.violation(
                conn,
                "request reuses an exchange id with a different payload",
                now,
            );
        }
        self.stats.duplicates_dropped += 1;
        if no_dedupe && record.state == InState::AwaitingResponse {
            // The defect: the application gets the resend as a new request.
            let addr = record.addr;
            self.events.push_back(Event::Request {
                peer: key.0,
                addr,
                exchange,
                payload: payload.clone(),
                redelivered: false,
            });
        }
        let Some(record) = self.inbound.get_mut(&key) else {
            return;
        };
        let old = std::mem::replace(&mut record.conn, conn);
        record.attempt = attempt;
        record.remote_max = remote_max;
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
    pub(super) fn send_held_ack(&mut self, peer: PeerId, exchange: ExchangeId) {
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
        let reply_conn = record.conn;
        if let Some(reply) = reply {
            self.cache_bytes -= reply.len();
        }
        self.persist_inbound(key, None);
        self.timers.cancel(Timer::Inbound(peer, exchange));
        if confirm {
            self.response_outcome(Event::ResponseDelivered {
                peer,
                exchange,
                redelivered: false,
            });
        }
        // The Ack may come on another connection than the Reply's (the dialer redialed):
        // release both, or the Reply's would stay bound to a finished exchange forever.
        self.unbind_inbound(conn, exchange, now);
        self.unbind_inbound(reply_conn, exchange, now);
    }

    pub(super) fn on_inbound_timer(&mut self, peer: PeerId, exchange: ExchangeId, now: Instant) {
        let Some(record) = self.inbound.get_mut(&(peer, exchange)) else {
            return;
        };
        match &mut record.state {
            InState::AwaitingResponse => {
                let (conn, attempt) = (record.conn, record.attempt);
                self.abort_inbound(peer, exchange, conn, attempt, AbortReason::NoResponse, now);
            }
            InState::AwaitingReplyAck { reply } => {
                record.state = InState::Unconfirmed {
                    reply: reply.take(),
                };
                let conn = record.conn;
                // Stored as reported, so that a restart does not raise it again.
                self.persist_inbound((peer, exchange), None);
                self.unbind_inbound(conn, exchange, now);
                if !self.sabotaged(super::Sabotage::SilentUnconfirmed) {
                    self.response_outcome(Event::ResponseUnconfirmed {
                        peer,
                        exchange,
                        redelivered: false,
                    });
                }
            }
            _ => {}
        }
    }

    /// Gives up on a request the application has and tells the dialer (Abort) and the
    /// application (the exchange's outcome event).
    pub(super) fn abort_inbound(
        &mut self,
        peer: PeerId,
        exchange: ExchangeId,
        conn: ConnId,
        attempt: u32,
        reason: AbortReason,
        now: Instant,
    ) {
        // The application had the request, so the dialer hears it was received (the held
        // Ack, if still held) before it hears it was given up.
        if self
            .inbound
            .get(&(peer, exchange))
            .is_some_and(|r| r.ack_held)
        {
            self.send_held_ack(peer, exchange);
        }
        if let Some(record) = self.inbound.get_mut(&(peer, exchange)) {
            debug_assert_eq!(record.state, InState::AwaitingResponse);
            record.state = InState::Aborted(reason);
            self.pending_inbound -= 1;
        }
        self.persist_inbound((peer, exchange), None);
        self.timers.cancel(Timer::Inbound(peer, exchange));
        self.send(
            conn,
            Message::Abort {
                exchange,
                attempt,
                reason,
            },
        );
        self.unbind_inbound(conn, exchange, now);
        self.response_outcome(match reason {
            AbortReason::NoResponse => Event::ResponseTimedOut {
                peer,
                exchange,
                redelivered: false,
            },
            reason => Event::ResponseAborted {
                peer,
                exchange,
                reason,
                redelivered: false,
            },
        });
    }

    pub(super) fn remote_max_of(&self, conn: ConnId) -> usize {
        self.conns
            .get(&conn)
            .map_or(self.config.max_message_size, |c| c.remote_max)
    }

    pub(super) fn on_oversized(
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
            // Only an exchange of the peer on this connection can be failed by it: exchange
            // ids are easy to guess, and another peer's must stay untouched.
            (Some(Direction::Outbound), Kind::Reply, Some(id), _)
                if self.peer_of(conn).is_some_and(|peer| {
                    self.outbound.get(&id).is_some_and(|ex| ex.peer == peer)
                }) =>
            {
                self.reply_too_large(conn, id, now);
            }
            _ => self.violation(conn, "oversized message", now),
        }
    }

    /// Keeps the dedupe memory within bounds, per peer (`dedupe_per_peer`) and in all
    /// (`dedupe_bytes`), by forgetting the oldest finished records; false if every record
    /// that could go is still live.
    pub(super) fn make_room(&mut self, peer: PeerId) -> bool {
        let limit = self.config.dedupe_per_peer;
        loop {
            let Some(p) = self.peers.get(&peer) else {
                return false;
            };
            if p.seen.len() < limit {
                break;
            }
            let victim = p
                .seen
                .iter()
                .copied()
                .find(|id| self.inbound.get(&(peer, *id)).is_none_or(|r| !r.is_live()));
            let Some(id) = victim else {
                return false;
            };
            self.forget_record((peer, id));
        }
        let mut records = (self.config.dedupe_bytes / DEDUPE_RECORD_COST).max(1);
        if self.sabotaged(super::Sabotage::DedupeOverBound) {
            records += 1;
        }
        while self.inbound.len() >= records {
            // The order is compacted lazily: keys of forgotten records are skipped.
            while self
                .dedupe_order
                .front()
                .is_some_and(|key| !self.inbound.contains_key(key))
            {
                self.dedupe_order.pop_front();
            }
            let victim = self
                .dedupe_order
                .iter()
                .copied()
                .find(|key| self.inbound.get(key).is_some_and(|r| !r.is_live()));
            let Some(key) = victim else {
                return false;
            };
            self.forget_record(key);
        }
        if self.dedupe_order.len() > 2 * self.inbound.len() + 64 {
            let inbound = &self.inbound;
            self.dedupe_order.retain(|k| inbound.contains_key(k));
        }
        true
    }

    /// Whether `peer`'s exchange `id` is at or below its settled floor.
    pub(super) fn is_settled(&self, peer: PeerId, id: ExchangeId) -> bool {
        self.settled
            .get(&peer)
            .is_some_and(|floor| at_or_below(floor.id, id))
    }

    /// The record of `peer`'s exchange `id` is being forgotten: the floor rises to it. An id
    /// far from the floor (outside the window below it) means the dialer restarted into a
    /// new id space without a store: the floor follows it there.
    pub(super) fn raise_floor(&mut self, peer: PeerId, id: ExchangeId) {
        let old = self.settled.get(&peer).copied();
        if old.is_some_and(|floor| at_or_below(floor.id, id)) {
            return;
        }
        let limit = self.config.max_tracked_peers.saturating_mul(4);
        if old.is_none() && self.settled.len() >= limit {
            // Too many floors: the one raised longest ago goes.
            let oldest = self
                .settled
                .iter()
                .min_by_key(|(_, floor)| floor.seq)
                .map(|(peer, floor)| (*peer, floor.seq));
            if let Some((victim, seq)) = oldest {
                self.settled.remove(&victim);
                if let Some(journal) = &mut self.journal {
                    journal.push(durable::delete_settled(seq));
                }
            }
        }
        let seq = self.alloc_seq();
        if let Some(journal) = &mut self.journal {
            if let Some(old) = old {
                journal.push(durable::delete_settled(old.seq));
            }
            journal.push(durable::put_settled(seq, peer, id));
        }
        self.settled.insert(peer, Floor { id, seq });
    }

    /// Removes one dedupe record from every table (and from the store), raising its peer's
    /// settled floor so that a late copy of it is still refused.
    fn forget_record(&mut self, key: (PeerId, ExchangeId)) {
        let (peer, id) = key;
        if self.inbound.contains_key(&key) {
            self.raise_floor(peer, id);
        }
        if let Some(p) = self.peers.get_mut(&peer)
            && let Some(index) = p.seen.iter().position(|x| *x == id)
        {
            p.seen.remove(index);
        }
        if let Some(record) = self.inbound.remove(&key) {
            // Every caller picks finished records (a live one still owes its peer an
            // answer); the accounting below keeps a release build consistent regardless.
            debug_assert!(!record.is_live(), "forgetting a live exchange {key:?}");
            match &record.state {
                InState::Unconfirmed { reply: Some(r) }
                | InState::AwaitingReplyAck { reply: Some(r) } => self.cache_bytes -= r.len(),
                InState::AwaitingResponse => self.pending_inbound -= 1,
                _ => {}
            }
            self.timers.cancel(Timer::Inbound(peer, id));
            self.timers.cancel(Timer::Ack(peer, id));
            if let Some(journal) = &mut self.journal {
                journal.push(durable::delete_inbound(record.seq));
            }
        }
    }

    /// Drops cached replies, oldest first, until the cache fits its byte budget.
    pub(super) fn trim_reply_cache(&mut self) {
        while self.cache_bytes > self.config.reply_cache_bytes {
            let Some(key) = self.cache_order.pop_front() else {
                break;
            };
            let mut dropped = false;
            if let Some(record) = self.inbound.get_mut(&key)
                && let InState::AwaitingReplyAck { reply } | InState::Unconfirmed { reply } =
                    &mut record.state
                && let Some(r) = reply.take()
            {
                self.cache_bytes -= r.len();
                dropped = true;
            }
            if dropped {
                self.persist_inbound(key, None);
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

    /// Forgets every record of `peer` (it is no longer tracked). Only peers with nothing
    /// live are dropped this way.
    pub(super) fn drop_inbound_of(&mut self, peer: PeerId) {
        let keys = self.inbound_keys_of(peer);
        for key in keys {
            if self
                .inbound
                .get(&key)
                .is_some_and(|r| r.state == InState::AwaitingResponse)
            {
                self.response_outcome(Event::ResponseCancelled {
                    peer: key.0,
                    exchange: key.1,
                    redelivered: false,
                });
            }
            self.forget_record(key);
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.seen.clear();
        }
    }

    /// The peer was revoked: its requests awaiting our answer are cancelled (resends get
    /// Abort `NoResponse`), and every record stays, so a re-allowed peer cannot replay them.
    pub(super) fn cancel_inbound_of(&mut self, peer: PeerId, now: Instant) {
        for key in self.inbound_keys_of(peer) {
            let Some(record) = self.inbound.get_mut(&key) else {
                continue;
            };
            match record.state {
                InState::AwaitingResponse => {
                    record.state = InState::Aborted(AbortReason::NoResponse);
                    record.ack_held = false;
                    self.pending_inbound -= 1;
                    self.response_outcome(Event::ResponseCancelled {
                        peer: key.0,
                        exchange: key.1,
                        redelivered: false,
                    });
                    self.persist_inbound(key, None);
                }
                InState::AwaitingReplyAck { .. } => {
                    // Its connections are closed; it ends as if the Ack never came.
                    self.on_inbound_timer(key.0, key.1, now);
                }
                _ => {}
            }
            self.timers.cancel(Timer::Inbound(key.0, key.1));
            self.timers.cancel(Timer::Ack(key.0, key.1));
        }
    }

    fn inbound_keys_of(&self, peer: PeerId) -> Vec<(PeerId, ExchangeId)> {
        self.inbound
            .range((peer, ExchangeId(0))..=(peer, ExchangeId(u64::MAX)))
            .map(|(k, _)| *k)
            .collect()
    }

    fn bind_inbound(&mut self, conn: ConnId, exchange: ExchangeId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.exchange = Some(exchange);
            self.timers.cancel(Timer::Idle(conn));
        }
    }

    fn unbind_inbound(&mut self, conn: ConnId, exchange: ExchangeId, now: Instant) {
        if let Some(c) = self.conns.get_mut(&conn)
            && c.exchange == Some(exchange)
        {
            c.exchange = None;
            self.arm_idle(conn, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use bytes::Bytes;

    use crate::allow_list::AllowList;
    use crate::config::Config;
    use crate::connection::ConnEvent;
    use crate::endpoint::{ConnId, Endpoint};
    use crate::identity::Keypair;
    use crate::wire::{AckOf, ExchangeId, Message};

    #[test]
    fn the_order_of_cached_replies_never_outgrows_the_records() {
        // Replies that were acknowledged leave their key behind in the order queue; the
        // queue is compacted so that it never holds more keys than there are records.
        let peer = Keypair::from_private_bytes([2; 32]).peer_id();
        let config = Config {
            ack_delay: Duration::ZERO,
            dedupe_per_peer: 4,
            ..Config::default()
        };
        let me = Keypair::from_private_bytes([1; 32]).peer_id();
        let mut ep = Endpoint::new(config, me, AllowList::from_peers([peer]), [0; 32]).unwrap();
        let (addr, now): (SocketAddr, Instant) = ("10.0.0.2:1".parse().unwrap(), Instant::now());
        let mut conn = ConnId::inbound(1);
        ep.handle_accepted(conn, peer, addr, 1 << 20, 0, now);
        for n in 1..50u64 {
            if n == 20 {
                // Revoking drops the peer's records at once, keys left in the queue.
                ep.revoke(&peer, now);
                ep.allow(peer, crate::allow_list::AllowedPeer::default());
                conn = ConnId::inbound(2);
                ep.handle_accepted(conn, peer, addr, 1 << 20, 0, now);
            }
            let exchange = ExchangeId(n);
            let request = Message::Request {
                exchange,
                attempt: 1,
                payload: Bytes::from_static(b"q"),
            };
            ep.handle_conn_event(conn, ConnEvent::Message(request), now);
            ep.respond(peer, exchange, &b"r"[..], now).unwrap();
            let ack = Message::Ack {
                exchange,
                attempt: 1,
                of: AckOf::Reply,
            };
            ep.handle_conn_event(conn, ConnEvent::Message(ack), now);
            while ep.poll_output().is_some() {}
            while ep.poll_event().is_some() {}
            assert!(
                ep.cache_order.len() <= ep.inbound.len(),
                "{} keys for {} records",
                ep.cache_order.len(),
                ep.inbound.len()
            );
        }
    }
}
