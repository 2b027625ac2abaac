//! The dialer's side: our exchanges, from `request()` to a Reply or a Failure.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_core::Rng;

use crate::durable;
use crate::identity::PeerId;
use crate::wire::{AbortReason, AckOf, CloseReason, ExchangeId, FEATURE_IK, Message, NackReason};

use super::events::{Event, Failure, RetryCause};
use super::{Conn, ConnId, Direction, Endpoint, Timer};

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
pub(super) enum OutState {
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
    pub(super) fn conn(self) -> Option<ConnId> {
        match self {
            Self::Queued => None,
            Self::Connecting { conn }
            | Self::AwaitingAck { conn }
            | Self::AwaitingReply { conn } => Some(conn),
            Self::Backoff { conn } => conn,
        }
    }

    /// The state's name, as traces and [`super::Endpoint::progress`] show it.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Queued => "Queued",
            Self::Connecting { .. } => "Connecting",
            Self::AwaitingAck { .. } => "AwaitingAck",
            Self::AwaitingReply { .. } => "AwaitingReply",
            Self::Backoff { .. } => "Backoff",
        }
    }
}

#[derive(Debug)]
pub(super) struct Outbound {
    /// Order of acceptance, kept in the store so a restart resumes the queue in order.
    pub(super) seq: u64,
    pub(super) peer: PeerId,
    pub(super) addr: SocketAddr,
    pub(super) payload: Bytes,
    /// Number of the last Request transmission (0 before the first).
    pub(super) attempt: u32,
    /// Failed tries that reached the peer (or may have): Nacks, timeouts after the
    /// Request left, lost connections. Reaching `max_attempts` ends the exchange.
    pub(super) failures: u32,
    /// Failed tries that never reached the peer: the dial or the handshake failed. They
    /// are bounded by time (`Config::exchange_budget` from the first try), not by count,
    /// so a peer that is down for a while is waited for.
    pub(super) unreached: u32,
    /// When the first try began (this incarnation).
    pub(super) started: Option<Instant>,
    /// Dials made for this exchange.
    pub(super) dials: u32,
    /// The responder acknowledged the Request (kept in the store once true).
    pub(super) acked: bool,
    /// What few requests carry, boxed so that a plain queued request stays small.
    pub(super) extras: Option<Box<Extras>>,
    pub(super) state: OutState,
}

/// An exchange's idempotency key and deadline ([`Endpoint::request_with`]), and why its
/// last try failed: what only some exchanges carry.
#[derive(Debug, Default)]
pub(super) struct Extras {
    pub(super) key: Option<Bytes>,
    /// Then tries are bounded by it alone, not by `max_attempts` or the exchange budget.
    pub(super) deadline: Option<Deadline>,
    /// Why the last try failed, once one has ([`Endpoint::progress`]).
    pub(super) last_cause: Option<RetryCause>,
}

impl Extras {
    /// Boxed, or nothing when there is nothing to keep.
    pub(super) fn new(key: Option<Bytes>, deadline: Option<Deadline>) -> Option<Box<Self>> {
        (key.is_some() || deadline.is_some()).then(|| {
            Box::new(Self {
                key,
                deadline,
                last_cause: None,
            })
        })
    }
}

/// When an exchange must end: the instant the endpoint's timer fires at, and (for a
/// durable node) the same moment on the wall clock, stored so a restart keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// On the endpoint's clock.
    pub at: Instant,
    /// In milliseconds since the Unix epoch, if the driver can tell (it is stored with the
    /// exchange; without it the deadline does not survive a restart).
    pub unix_ms: Option<u64>,
}

impl Outbound {
    /// Its idempotency key.
    pub(super) fn key(&self) -> Option<&Bytes> {
        self.extras.as_ref()?.key.as_ref()
    }

    /// Its deadline.
    pub(super) fn deadline(&self) -> Option<Deadline> {
        self.extras.as_ref()?.deadline
    }

    /// The row that stores it.
    pub(super) fn record(&self) -> durable::OutboundRecord {
        durable::OutboundRecord {
            seq: self.seq,
            peer: self.peer,
            addr: self.addr,
            payload: self.payload.clone(),
            acked: self.acked,
            key: self.key().cloned(),
            deadline_ms: self.deadline().and_then(|d| d.unix_ms),
        }
    }
}

impl Endpoint {
    /// Moves an exchange that just became its peer's active one forward.
    pub(super) fn begin(&mut self, id: ExchangeId, now: Instant) {
        let Some(ex) = self.outbound.get_mut(&id) else {
            return;
        };
        ex.started.get_or_insert(now);
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
        // A peer gone inactive (its address record expired) is not redialed: an exchange
        // it never acknowledged fails now instead of retrying for its whole budget. (The
        // first dial goes where the application said; one the peer acknowledged keeps
        // retrying for its reply.)
        if let Some(ex) = self.outbound.get(&id)
            && ex.dials > 0
            && !ex.acked
            && self.lapsed(&ex.peer)
        {
            return self.finish(id, Err(Failure::Inactive), now);
        }
        let conn = self.alloc_conn();
        let Some(ex) = self.outbound.get_mut(&id) else {
            return;
        };
        ex.dials += 1;
        ex.state = OutState::Connecting { conn };
        let (peer, addr, redial) = (ex.peer, ex.addr, ex.dials > 1);
        self.stats.dials += 1;
        self.stats.redials += u64::from(redial);
        self.conns
            .insert(conn, Conn::dialing(peer, addr, Some(id), false));
        if let Some(p) = self.peers.get_mut(&peer) {
            p.conns += 1;
        }
        self.timers
            .set(Timer::Outbound(id), now + self.config.connect_timeout);
        // The Request rides in IK message 1 when it can (the driver is told the key): on
        // the exchange's first dial only, so that dials failing through an outage do not
        // spend its attempts.
        let early = self
            .outbound
            .get(&id)
            .filter(|ex| ex.dials == 1)
            .map(|ex| Message::Request {
                exchange: id,
                attempt: ex.attempt + 1,
                payload: ex.payload.clone(),
            });
        if self.push_dial(conn, peer, addr, early, now)
            && let Some(ex) = self.outbound.get_mut(&id)
        {
            // The exchange's first dial; a resend all the same when its first try went on
            // a reused connection.
            ex.attempt += 1;
            self.stats.requests_sent += 1;
            self.stats.resends += u64::from(ex.attempt > 1);
        }
    }

    /// The Request rode in IK message 1 and the handshake finished: it waits for its Ack
    /// as if just sent on the session.
    fn early_request_sent(&mut self, id: ExchangeId, conn: ConnId, now: Instant) {
        let Some(ex) = self.outbound.get_mut(&id) else {
            return;
        };
        ex.state = OutState::AwaitingAck { conn };
        self.timers
            .set(Timer::Outbound(id), now + self.config.ack_timeout);
    }

    fn send_request(&mut self, id: ExchangeId, conn: ConnId, now: Instant) {
        let repeat_attempts = self.sabotaged(super::Sabotage::AttemptRepeated);
        let Some(ex) = self.outbound.get_mut(&id) else {
            return;
        };
        // The exchange holds the connection from here on, whether it was dialed for it or
        // reused, so whatever ends the exchange releases it.
        if let Some(c) = self.conns.get_mut(&conn) {
            c.exchange = Some(id);
        }
        let max = self.conns.get(&conn).map_or(0, |c| c.remote_max);
        if ex.payload.len() > max {
            let failure = Failure::TooLarge {
                len: ex.payload.len(),
                max,
            };
            ex.state = OutState::Backoff { conn: Some(conn) };
            self.finish(id, Err(failure), now);
            return;
        }
        // (Sabotage: a resend repeats the attempt number it had.)
        if !(repeat_attempts && ex.attempt > 0) {
            ex.attempt += 1;
        }
        ex.state = OutState::AwaitingAck { conn };
        let message = Message::Request {
            exchange: id,
            attempt: ex.attempt,
            payload: ex.payload.clone(),
        };
        self.stats.requests_sent += 1;
        self.stats.resends += u64::from(ex.attempt > 1);
        self.timers
            .set(Timer::Outbound(id), now + self.config.ack_timeout);
        self.send(conn, message);
    }

    /// One try failed: back off and retry, or give up.
    pub(super) fn retry(
        &mut self,
        id: ExchangeId,
        cause: RetryCause,
        conn: Option<ConnId>,
        now: Instant,
    ) {
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
        let max = if self.sabotaged(super::Sabotage::ExtraResend) {
            self.config.max_attempts + 1
        } else {
            self.config.max_attempts
        };
        let budget = self.config.exchange_budget();
        let Some(ex) = self.outbound.get_mut(&id) else {
            return;
        };
        let unreached = matches!(
            cause,
            RetryCause::DialFailed(_) | RetryCause::ConnectTimeout
        );
        if unreached {
            ex.unreached += 1;
        } else {
            ex.failures += 1;
        }
        ex.state = OutState::Backoff { conn };
        ex.extras.get_or_insert_default().last_cause = Some(cause.clone());
        let (tries, deadline, started) = (ex.failures + ex.unreached, ex.deadline(), ex.started);
        let delay = self.backoff(tries).max(hint.min(self.config.backoff_max));
        let Some(ex) = self.outbound.get_mut(&id) else {
            return;
        };
        // With a deadline, only the deadline ends the tries. Without one, tries that reached
        // the peer are counted, and tries that never reached it are bounded by time: the
        // next would start after the exchange budget ran out.
        let exhausted = deadline.is_none()
            && if unreached {
                started.is_some_and(|started| now + delay >= started + budget)
            } else {
                ex.failures >= max
            };
        if exhausted {
            let failure = Failure::Exhausted {
                attempts: tries,
                last: cause,
                request_acked: ex.acked,
            };
            return self.finish(id, Err(failure), now);
        }
        self.timers.set(Timer::Outbound(id), now + delay);
    }

    /// Exponential backoff with "equal jitter": half fixed, half drawn from the seeded RNG.
    fn backoff(&mut self, tries: u32) -> Duration {
        let mut half = self.config.backoff_base(tries) / 2;
        if self.sabotaged(super::Sabotage::SlowRetries) {
            half *= 100;
        }
        let half_micros = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
        let jitter = if half_micros == 0 {
            0
        } else {
            self.rng.next_u64() % (half_micros + 1)
        };
        half + Duration::from_micros(jitter)
    }

    pub(super) fn on_outbound_timer(&mut self, id: ExchangeId, now: Instant) {
        let Some(ex) = self.outbound.get(&id) else {
            return;
        };
        if let OutState::AwaitingAck { conn } | OutState::AwaitingReply { conn } = ex.state
            && self.conns.get(&conn).is_some_and(|c| c.receiving)
        {
            // Its Reply is arriving, slowly: the connection's stall guard watches it.
            let wait = if matches!(ex.state, OutState::AwaitingAck { .. }) {
                self.config.ack_timeout
            } else {
                self.config.reply_timeout
            };
            self.timers.set(Timer::Outbound(id), now + wait);
            return;
        }
        match ex.state {
            OutState::Queued => {}
            OutState::Connecting { conn } => {
                if let Some(c) = self.conns.get(&conn) {
                    self.ik_dial_failed(c.ik && !c.established, c.peer, c.ticket, false);
                }
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
    pub(super) fn finish(&mut self, id: ExchangeId, outcome: Result<Bytes, Failure>, now: Instant) {
        let Some(ex) = self.outbound.remove(&id) else {
            return;
        };
        self.timers.cancel(Timer::Outbound(id));
        self.timers.cancel(Timer::Deadline(id));
        let peer = ex.peer;
        if let Some(conn) = ex.state.conn() {
            // A request too large for the peer never touched the connection: it stays
            // as good as a successful one.
            let healthy = matches!(&outcome, Ok(_) | Err(Failure::TooLarge { .. }));
            self.release_outbound_conn(conn, id, healthy, now);
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
        let key = ex.extras.and_then(|extras| extras.key);
        let event = match outcome {
            Ok(payload) => Event::Reply {
                peer,
                addr: ex.addr,
                exchange: id,
                payload,
                redelivered: false,
            },
            Err(failure) => Event::Failed {
                peer,
                exchange: id,
                payload: ex.payload,
                failure,
                redelivered: false,
            },
        };
        if let Some(journal) = &mut self.journal {
            journal.extend(durable::finish_outbound(id, ex.seq, &event, key.as_ref()));
        }
        if let Some(key) = key {
            // Kept until the application settles the outcome (`outcome_settled`), so that
            // it can still look it up by its key.
            self.keyed_outcomes.insert(id, (key, event.clone()));
        }
        if self.sabotaged(super::Sabotage::DoubleOutcome) {
            self.events.push_back(event.clone());
        }
        self.events.push_back(event);
        if was_active {
            self.start_next(peer, now);
        }
    }

    /// The responder acknowledged our Request: its application has it. Stored the first
    /// time, so that a restarted node still says so if the exchange later fails.
    fn mark_acked(&mut self, id: ExchangeId) {
        let Some(ex) = self.outbound.get_mut(&id) else {
            return;
        };
        if std::mem::replace(&mut ex.acked, true) {
            return;
        }
        if let Some(journal) = &mut self.journal {
            journal.push(durable::put_outbound(id, &ex.record()));
        }
    }

    pub(super) fn start_next(&mut self, peer: PeerId, now: Instant) {
        let newest_first = self.sabotaged(super::Sabotage::QueueOutOfOrder);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        debug_assert!(p.active.is_none());
        let next = if newest_first {
            p.queue.pop_back()
        } else {
            p.queue.pop_front()
        };
        if let Some(next) = next {
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
        // A burst to one peer rides one connection: the next queued request takes it (in
        // the same step, `finish` starts it), and the last one closes it unless connections
        // are reused.
        let queued = self.peers.get(&c.peer).is_some_and(|p| !p.queue.is_empty());
        let keep = healthy
            && c.established
            && (self.config.reuse_connections || queued)
            && !self.shutting_down;
        if keep {
            let peer = c.peer;
            if let Some(p) = self.peers.get_mut(&peer)
                && let Some(old) = p.reusable.replace(conn)
                && old != conn
            {
                self.close(old, CloseReason::Done, now);
            }
            self.arm_idle(conn, now);
        } else if healthy && !self.shutting_down && self.membership_asking_on(conn) {
            // Our question about the peer's membership is still open on it: it stays,
            // as a sync connection, until answered (or idle).
            if let Some(c) = self.conns.get_mut(&conn) {
                c.sync = true;
            }
            self.arm_idle(conn, now);
        } else {
            self.close(conn, CloseReason::Done, now);
        }
    }

    pub(super) fn on_established(
        &mut self,
        conn: ConnId,
        peer: PeerId,
        remote_max: usize,
        features: u32,
        now: Instant,
    ) {
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
        c.features = features;
        let sync = c.sync;
        if let Some(p) = self.peers.get_mut(&peer) {
            // Its hello says whether it takes IK (it did, if this was an IK handshake).
            p.xx_only = features & FEATURE_IK == 0;
        }
        self.membership_established(conn, now);
        self.records_established(conn);
        let early = self.conns.get(&conn).is_some_and(|c| c.early);
        match self.conns.get(&conn).and_then(|c| c.exchange) {
            Some(id) if early => self.early_request_sent(id, conn, now),
            Some(id) => self.send_request(id, conn, now),
            None if sync => {}
            None => self.close(conn, CloseReason::Done, now),
        }
    }

    /// The responder sent a Reply larger than we advertised: it broke the protocol. The
    /// connection closes with `ProtocolViolation` and the error names the peer; then the
    /// exchange fails, its payload handed back. In that order: finishing first would
    /// release the connection (`Close{Done}`) before the violation could name it.
    pub(super) fn reply_too_large(&mut self, conn: ConnId, id: ExchangeId, now: Instant) {
        // Unbound first, so that closing the connection does not schedule a retry.
        if let Some(c) = self.conns.get_mut(&conn)
            && c.exchange == Some(id)
        {
            c.exchange = None;
        }
        self.violation(conn, "reply exceeds our advertised maximum", now);
        self.finish(id, Err(Failure::Aborted(AbortReason::ReplyTooLarge)), now);
    }

    pub(super) fn on_outbound_message(
        &mut self,
        conn: ConnId,
        peer: PeerId,
        message: Message,
        now: Instant,
    ) {
        let id = match &message {
            Message::Ack {
                of: AckOf::Request,
                exchange,
                ..
            }
            | Message::Nack { exchange, .. }
            | Message::Reply { exchange, .. }
            | Message::Abort { exchange, .. }
            | Message::Progress { exchange, .. } => *exchange,
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
                if let Message::Reply { attempt, .. } = message
                    && !self.sabotaged(super::Sabotage::NoAckOfRepeatedReply)
                {
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
                self.reply_too_large(conn, id, now);
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
                    // Its row gives way to the outcome's in this step: nothing to store.
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
                self.mark_acked(id);
                if let Some(ex) = self.outbound.get_mut(&id)
                    && bound
                    && waiting
                    && attempt <= ex.attempt
                {
                    ex.state = OutState::AwaitingReply { conn };
                    self.timers
                        .set(Timer::Outbound(id), now + self.config.reply_timeout);
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
                if reason == NackReason::EarlyRefused {
                    // Not taken from IK message 1: again at once, on the session.
                    return self.send_request(id, conn, now);
                }
                let hint = Duration::from_millis(u64::from(retry_after_ms));
                self.retry_after(id, RetryCause::Nacked(reason), Some(conn), hint, now);
            }
            Message::Abort { reason, .. } => self.finish(id, Err(Failure::Aborted(reason)), now),
            // Our large Request is still arriving there: wait on for its Ack.
            Message::Progress { attempt, .. } => {
                let current = matches!(state, OutState::AwaitingAck { conn: c } if c == conn)
                    && self
                        .outbound
                        .get(&id)
                        .is_some_and(|ex| ex.attempt == attempt);
                if current {
                    self.timers
                        .set(Timer::Outbound(id), now + self.config.ack_timeout);
                }
            }
            _ => {}
        }
    }
}
