//! Connection bookkeeping: which connection belongs to which peer and exchange, closes,
//! idle timers, and the per-peer records both roles share.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use crate::connection::{Closed, ConnError, Remote};
use crate::identity::PeerId;
use crate::rate::Bucket;
use crate::wire::{CloseReason, EARLY_MAX_LEN, ExchangeId, Message, NackReason};

use super::dialer::OutState;
use super::events::{Event, Failure, PeerError, RetryCause};
use super::responder::InState;
use super::{Conn, ConnId, Direction, EARLY_WINDOW, Endpoint, Output, Peer, Timer};

impl Endpoint {
    pub(super) fn on_message(&mut self, conn: ConnId, message: Message, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        // Whatever was arriving on it has arrived (or was abandoned for this message).
        if !matches!(message, Message::Progress { .. }) {
            c.receiving = false;
        }
        let (peer, direction) = (c.peer, c.direction);
        if !c.established {
            return self.violation(conn, "message before the handshake finished", now);
        }
        if matches!(
            message,
            Message::Epoch { .. } | Message::Fetch { .. } | Message::Documents { .. }
        ) {
            return self.on_membership_message(conn, peer, message, now);
        }
        if matches!(
            message,
            Message::RecordSeqs { .. } | Message::Records { .. }
        ) {
            return self.on_records_message(conn, peer, message, now);
        }
        match direction {
            Direction::Outbound => self.on_outbound_message(conn, peer, message, now),
            Direction::Inbound => self.on_inbound_message(conn, peer, message, now),
        }
    }

    /// A handshake on `conn`, one we dialed, authenticated `peer` with static key `key`:
    /// keep the key (IK from now on) and the ticket it handed over, if any.
    pub(super) fn learn(
        &mut self,
        conn: ConnId,
        peer: PeerId,
        key: [u8; crate::identity::KEY_LEN],
        ticket: Option<crate::guard::Ticket>,
    ) {
        let ours = self
            .conns
            .get(&conn)
            .is_some_and(|c| c.direction == Direction::Outbound && c.peer == peer);
        if !ours || PeerId::from_public_key(&key) != peer {
            return;
        }
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.learned_key = Some(key);
        if let Some(ticket) = ticket {
            if p.tickets.len() >= crate::guard::TICKETS_PER_PEER {
                p.tickets.pop_front();
            }
            p.tickets.push_back(ticket);
        }
    }

    pub(super) fn on_closed(&mut self, conn: ConnId, closed: Closed, now: Instant) {
        let Some(c) = self.forget_conn(conn) else {
            return;
        };
        // A timeout says nothing of IK (a partition, a busy responder, or one holding a
        // message 1 whose mac1 it refuses): XX once. A stream that ended does.
        let timed_out = matches!(closed, Closed::Error(ConnError::HandshakeTimeout { .. }));
        self.ik_dial_failed(c.ik && !c.established, c.peer, c.ticket, !timed_out);
        self.membership_conn_closed(conn);
        if c.sync {
            self.sync_closed(conn, c.peer, now);
        }
        // Errors the peer caused (or that name it) are reported once, here. A handshake that
        // timed out is the network's doing, not the peer's: it is a retry cause instead.
        let report = match &closed {
            Closed::Error(ConnError::HandshakeTimeout { .. }) => None,
            Closed::Error(ConnError::Protocol { .. } | ConnError::BadFrame { .. })
                if self.sabotaged(super::Sabotage::UnreportedViolation) =>
            {
                None
            }
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
            // Refused as it connected, before any Request was read: like a refused dial,
            // retried for as long as the exchange budget lasts.
            (
                OutState::Connecting { .. } | OutState::AwaitingAck { .. },
                Closed::ByPeer(CloseReason::TooManyConnections),
            ) => RetryCause::DialFailed("the peer has too many connections".into()),
            (OutState::Connecting { .. }, why) => RetryCause::DialFailed(describe(why)),
            (_, why) => RetryCause::ConnectionLost(describe(why)),
        };
        self.retry(id, cause, None, now);
    }

    pub(super) fn violation(&mut self, conn: ConnId, detail: &'static str, now: Instant) {
        let remote = self.remote_of(conn);
        if !self.sabotaged(super::Sabotage::UnreportedViolation) {
            self.events
                .push_back(Event::PeerError(PeerError::Violation { remote, detail }));
        }
        self.close(conn, CloseReason::ProtocolViolation, now);
    }

    /// Asks the driver to dial `conn` (already registered as dialing `peer` at `addr`),
    /// with IK when the peer's key is known and the peer is not known to lack it. `early`:
    /// a Request to carry in IK message 1 (the caller counted it as sent), taken only with
    /// IK and a wall clock; returns whether it was.
    pub(super) fn push_dial(
        &mut self,
        conn: ConnId,
        peer: PeerId,
        addr: SocketAddr,
        early: Option<Message>,
        now: Instant,
    ) -> bool {
        // A one-shot XX (after a timed-out IK dial) is spent by this dial.
        let (xx_only, learned) = match self.peers.get_mut(&peer) {
            Some(p) => (p.xx_only || std::mem::take(&mut p.xx_next), p.learned_key),
            None => (false, None),
        };
        let key = self
            .allow
            .get(&peer)
            .and_then(|entry| entry.public_key)
            .or(learned)
            .filter(|key| !xx_only && PeerId::from_public_key(key) == peer);
        let ticket = match (key, self.peers.get_mut(&peer)) {
            (Some(_), Some(p)) => p.tickets.pop_back(),
            _ => None,
        };
        let wall = self.unix_ms(now);
        let early = match (key, wall, early, self.peers.get_mut(&peer)) {
            (Some(_), Some(wall), Some(message), Some(p))
                if message.encoded_len() <= EARLY_MAX_LEN =>
            {
                let stamp = wall.max(p.early_sent.saturating_add(1));
                p.early_sent = stamp;
                Some((stamp, message))
            }
            _ => None,
        };
        let sent = early.is_some();
        if let Some(c) = self.conns.get_mut(&conn) {
            c.ik = key.is_some();
            c.early = sent;
            c.ticket = ticket;
        }
        self.stats.ik_dials += u64::from(key.is_some());
        self.stats.early_requests_sent += u64::from(sent);
        self.outputs.push_back(Output::Dial {
            conn,
            peer,
            addr,
            key,
            early,
            ticket,
        });
        sent
    }

    /// Responder: a Request rode in IK message 1 on `conn`, stamped `sent_unix_ms` by the
    /// dialer. Taken as if it came on the session if it cannot be a replay: stamped after
    /// this endpoint first had a clock, after the last one taken from this dialer, and
    /// within [`EARLY_WINDOW`] of our clock. Otherwise Nacked `EarlyRefused`: the dialer
    /// sends it again on the session at once (a clock stepped back, or one far off, costs
    /// a round trip, never a lockout; a far-future stamp is refused, so it cannot raise
    /// the floor beyond our clock plus the window).
    pub(super) fn on_early(
        &mut self,
        conn: ConnId,
        sent_unix_ms: u64,
        message: Message,
        now: Instant,
    ) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let peer = c.peer;
        let window = u64::try_from(EARLY_WINDOW.as_millis()).unwrap_or(u64::MAX);
        let (wall, epoch) = (self.unix_ms(now), self.early_epoch);
        let floor = self.peer_mut(peer, now).map(|p| p.early_floor);
        let fresh = match (wall, epoch, floor) {
            (Some(wall), Some(epoch), Some(floor)) => {
                sent_unix_ms > epoch
                    && sent_unix_ms > floor
                    && sent_unix_ms.abs_diff(wall) <= window
            }
            _ => false,
        };
        if fresh {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.early_floor = sent_unix_ms;
            }
            if !self.sabotaged(super::Sabotage::UncountedEarlyRequest) {
                self.stats.early_requests_taken += 1;
            }
            return self.on_message(conn, message, now);
        }
        self.stats.early_requests_refused += 1;
        if let Message::Request {
            exchange, attempt, ..
        } = message
        {
            let nack = Message::Nack {
                exchange,
                attempt,
                reason: NackReason::EarlyRefused,
                retry_after_ms: 0,
            };
            self.send_nack(conn, nack);
        }
    }

    /// Closes a connection we decided to drop: tells the driver, and moves any outbound
    /// exchange on it to a retry.
    pub(super) fn close(&mut self, conn: ConnId, reason: CloseReason, now: Instant) {
        let Some(c) = self.forget_conn(conn) else {
            return;
        };
        self.outputs.push_back(Output::Close {
            conn,
            peer: c.established.then_some(c.peer),
            reason,
        });
        self.membership_conn_closed(conn);
        if c.sync {
            self.sync_closed(conn, c.peer, now);
        }
        if c.direction == Direction::Outbound
            && let Some(id) = c.exchange
            && self.outbound.contains_key(&id)
        {
            let lost = RetryCause::ConnectionLost(format!("closed locally: {reason:?}"));
            self.retry(id, lost, None, now);
        }
    }

    /// Closes an outbound connection whose exchange will be retried elsewhere. The exchange
    /// is unbound first so that closing does not count as a second failure.
    /// An IK dial to `peer` ended before its handshake finished (`failed`). A responder that
    /// predates IK fails our first message and closes without a word: with `sticky`, dial
    /// it with XX until a hello says it takes IK. A dial that timed out (a partition, a busy
    /// responder, or one holding a message 1 whose mac1 it refuses because it no longer
    /// has the key we know) says nothing of IK: XX once, which names who is there, then IK
    /// again.
    /// Its `ticket` goes back to the peer's (if the responder did redeem it, the next IK
    /// message 1 naming it is merely unproven).
    pub(super) fn ik_dial_failed(
        &mut self,
        failed: bool,
        peer: PeerId,
        ticket: Option<crate::guard::Ticket>,
        sticky: bool,
    ) {
        if failed && let Some(p) = self.peers.get_mut(&peer) {
            if sticky {
                p.xx_only = true;
            } else {
                p.xx_next = true;
            }
            if let Some(ticket) = ticket
                && p.tickets.len() < crate::guard::TICKETS_PER_PEER
            {
                p.tickets.push_back(ticket);
            }
        }
    }

    pub(super) fn abandon_conn(&mut self, conn: ConnId, now: Instant) {
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

    pub(super) fn arm_idle(&mut self, conn: ConnId, now: Instant) {
        self.timers
            .set(Timer::Idle(conn), now + self.config.idle_timeout);
    }

    pub(super) fn send(&mut self, conn: ConnId, message: Message) {
        if let Some(c) = self.conns.get(&conn).filter(|c| c.established) {
            let peer = c.peer;
            self.outputs.push_back(Output::Send {
                conn,
                peer,
                message,
            });
        }
    }

    pub(super) fn send_nack(&mut self, conn: ConnId, nack: Message) {
        self.stats.nacks_sent += 1;
        self.send(conn, nack);
    }

    pub(super) fn remote_of(&self, conn: ConnId) -> Remote {
        let c = self.conns.get(&conn);
        Remote {
            addr: c.map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.addr),
            peer: c.map(|c| c.peer),
        }
    }

    pub(super) fn conns_of(&self, peer: &PeerId) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.peer == *peer)
            .map(|(id, _)| *id)
            .collect()
    }

    pub(super) fn alloc_conn(&mut self) -> ConnId {
        let id = ConnId::outbound(self.next_conn);
        self.next_conn += 1;
        id
    }

    pub(super) fn fail_peer_exchanges(&mut self, peer: PeerId, failure: &Failure, now: Instant) {
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

    /// Charges one token of `peer`'s request budget for work that is not an exchange (a
    /// membership Fetch, an address-record message). False, and a `RateLimited` event,
    /// when the budget is spent (or the peer cannot be tracked): skip the work.
    pub(super) fn take_request_token(&mut self, peer: PeerId, now: Instant) -> bool {
        let rate = self.config.request_rate;
        let Some(state) = self.peer_mut(peer, now) else {
            return false;
        };
        if state.requests.take(rate, now).is_err() {
            self.events.push_back(Event::RateLimited {
                peer,
                limit: super::LimitKind::Requests,
                disconnected: false,
            });
            return false;
        }
        true
    }

    /// The state for `peer`, created on first use. Bounded by `max_tracked_peers`: an idle
    /// peer (nothing in flight, no connection) is evicted to make room; `None` if none is.
    pub(super) fn peer_mut(&mut self, peer: PeerId, now: Instant) -> Option<&mut Peer> {
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
                    xx_only: false,
                    xx_next: false,
                    early_sent: 0,
                    early_floor: 0,
                    learned_key: None,
                    tickets: VecDeque::new(),
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
}

fn describe(closed: &Closed) -> String {
    match closed {
        Closed::ByPeer(reason) => format!("closed by peer: {reason:?}"),
        Closed::Locally(reason) => format!("closed: {reason:?}"),
        Closed::Error(e) => e.to_string(),
        Closed::Io(e) => e.clone(),
    }
}
