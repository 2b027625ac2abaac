//! The tap in each node: every message through it is traced, counted against triggers
//! and offered to the step's message faults.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p2p_handler::wire::{AckOf, ExchangeId, Message, NackReason};
use p2p_handler::{Arrival, ConnError, ConnEvent, PeerId, Tap, Verdict};

use super::world::{Shared, lock, now};
use crate::coverage;
use crate::scenario::{ActionKind, App, MessageMatch, MsgKind, NACK_REASON, Scenario};
use crate::trace::What;

/// A message fault armed by a step.
#[derive(Debug, Clone)]
pub(super) struct Rule {
    pub(super) step: usize,
    pub(super) action: ActionKind,
    pub(super) matches: Matcher,
    pub(super) delay: Duration,
    pub(super) remaining: u32,
    /// Times it applied.
    pub(super) applied: u32,
}

/// A trigger waiting for its nth message.
#[derive(Debug, Clone)]
pub(super) struct Waiting {
    pub(super) step: usize,
    pub(super) matches: Matcher,
    pub(super) sent: bool,
    pub(super) nth: u32,
    pub(super) seen: u32,
}

/// A `MessageMatch` with node names resolved to indices.
#[derive(Debug, Clone)]
pub(super) struct Matcher {
    pub(super) kind: MsgKind,
    pub(super) from: Option<usize>,
    pub(super) to: Option<usize>,
    pub(super) of: Option<MsgKind>,
    pub(super) resend: Option<bool>,
}

impl Matcher {
    pub(super) fn new(m: &MessageMatch, scenario: &Scenario) -> Self {
        let idx = |n: &Option<String>| n.as_deref().and_then(|n| scenario.node_index(n));
        Self {
            kind: m.kind,
            from: idx(&m.from),
            to: idx(&m.to),
            of: m.of,
            resend: m.resend,
        }
    }

    pub(super) fn matches(&self, from: usize, to: usize, message: &Message) -> bool {
        let kind = match message {
            Message::Request { .. } => MsgKind::Request,
            Message::Ack { .. } => MsgKind::Ack,
            Message::Nack { .. } => MsgKind::Nack,
            Message::Reply { .. } => MsgKind::Reply,
            Message::Abort { .. } => MsgKind::Abort,
            Message::Close { .. } => MsgKind::Close,
            Message::Progress { .. } => MsgKind::Progress,
            Message::Epoch { .. } => MsgKind::Epoch,
            Message::Fetch { .. } => MsgKind::Fetch,
            Message::Documents { .. } => MsgKind::Documents,
            Message::RecordSeqs { .. } => MsgKind::RecordSeqs,
            Message::Records { .. } => MsgKind::Records,
        };
        let of = match message {
            Message::Ack {
                of: AckOf::Request, ..
            } => Some(MsgKind::Request),
            Message::Ack {
                of: AckOf::Reply, ..
            } => Some(MsgKind::Reply),
            _ => None,
        };
        let resend = message.attempt().map(|a| a > 1);
        kind == self.kind
            && self.from.is_none_or(|f| f == from)
            && self.to.is_none_or(|t| t == to)
            && (self.of.is_none() || self.of == of)
            && (self.resend.is_none() || self.resend == resend)
    }
}

/// The node that owns the exchange a message belongs to: the dialer sends Requests and the
/// Ack of a Reply; everything else comes from the responder.
pub(super) fn dialer_of(from: usize, to: usize, message: &Message) -> usize {
    match message {
        Message::Request { .. }
        | Message::Ack {
            of: AckOf::Reply, ..
        } => from,
        _ => to,
    }
}

pub(super) struct SimTap {
    pub(super) shared: Arc<Mutex<Shared>>,
    pub(super) node: usize,
}

impl Tap for SimTap {
    fn outgoing(&self, conn: p2p_handler::ConnId, peer: PeerId, message: &Message) -> Verdict {
        let mut s = lock(&self.shared);
        let Some(&to) = s.by_peer.get(&peer) else {
            return Verdict::Pass;
        };
        let from = self.node;
        let dialer = dialer_of(from, to, message);
        s.coverage.extend(coverage::message(message));
        s.model.wire(from, to, conn, message);
        match message {
            Message::Request {
                exchange, attempt, ..
            } => {
                let dialer = (from, s.incarnation_key(from), s.nodes[from].incarnation);
                s.model.request_sent(dialer, to, *exchange, *attempt);
                s.nodes[from].copies.resent += u64::from(*attempt > 1);
                let copies = &mut s.nodes[from].copies;
                copies.requests_out += 1;
                copies.early_out += u64::from(copies.dialing.contains(&conn));
            }
            Message::Nack { reason, .. } => {
                let copies = &mut s.nodes[from].copies;
                copies.nacks_out += 1;
                copies.early_refused_out += u64::from(*reason == NackReason::EarlyRefused);
            }
            Message::Reply { exchange, .. } => {
                let copies = &mut s.nodes[from].copies;
                copies.replies_out += 1;
                copies.replied.insert((peer, *exchange));
            }
            Message::Ack {
                exchange,
                attempt,
                of: AckOf::Reply,
            } => s.model.reply_acked(from, *exchange, *attempt),
            _ => {}
        }
        let text = s.describe(dialer, message);
        let rule = s.rules.iter().position(|r| {
            r.remaining > 0 && r.action != ActionKind::Nack && r.matches.matches(from, to, message)
        });
        let verdict = match rule {
            None => Verdict::Pass,
            Some(i) => {
                let rule = &mut s.rules[i];
                rule.remaining -= 1;
                rule.applied += 1;
                let (action, delay, step) = (rule.action, rule.delay, rule.step);
                s.last_message_fault = now();
                let (verdict, what) = match action {
                    ActionKind::Drop => (Verdict::Drop, format!("drop {text}")),
                    ActionKind::Corrupt => (Verdict::Corrupt, format!("corrupt {text}")),
                    ActionKind::Duplicate => (
                        Verdict::Duplicate(delay),
                        format!("duplicate {text} after {delay:?}"),
                    ),
                    _ => (Verdict::Delay(delay), format!("delay {text} by {delay:?}")),
                };
                let rule = s.rule_text(step);
                let link = Some((s.names[from].clone(), s.names[to].clone()));
                s.push(from, What::Fault { what, rule, link });
                verdict
            }
        };
        if verdict != Verdict::Drop {
            let to_name = s.names[to].clone();
            s.push(
                from,
                What::Send {
                    to: to_name,
                    message: format!("{conn} {text}"),
                },
            );
            s.count_triggers(from, to, message, true);
        }
        verdict
    }

    fn incoming(&self, conn: p2p_handler::ConnId, peer: PeerId, message: &Message) -> Arrival {
        let mut s = lock(&self.shared);
        let Some(&from) = s.by_peer.get(&peer) else {
            return Arrival::Pass;
        };
        let to = self.node;
        let dialer = match message {
            // Either side sends it; the connection says who dialed it.
            Message::Progress { .. } if conn.is_inbound() => from,
            Message::Progress { .. } => to,
            _ => dialer_of(from, to, message),
        };
        if let Message::Progress { .. } = message {
            // Sent by the connection itself, so never seen going out.
            s.coverage.extend(coverage::message(message));
        }
        let text = s.describe(dialer, message);
        let from_name = s.names[from].clone();
        s.push(
            to,
            What::Recv {
                from: from_name,
                message: format!("{conn} {text}"),
            },
        );
        s.count_triggers(from, to, message, false);
        if let Message::Nack { .. } = message {
            s.nodes[to].copies.nacks_in += 1;
        }
        if let Message::Request {
            exchange, attempt, ..
        } = message
        {
            s.model.request_received(from, *exchange, *attempt);
        }
        if let Message::Reply {
            exchange,
            attempt,
            payload,
        } = message
            && payload.len() <= s.scenario.max_message_size_of(to)
            // A Reply from the peer that dialed is a protocol violation (a hostile peer's),
            // never acknowledged.
            && !conn.is_inbound()
        {
            s.model.reply_received(to, *exchange, *attempt, now());
        }
        if let Message::Ack {
            exchange,
            of: AckOf::Request,
            ..
        } = message
        {
            s.acked.insert((to, from, *exchange));
        }
        let Message::Request { exchange, .. } = message else {
            return Arrival::Pass;
        };
        if let Some(nack) = injected_nack(&mut s, (from, to), message, &text) {
            return nack;
        }
        // Handed to the endpoint: what its duplicate counter is checked against.
        let inc = s.incarnation_key(to);
        let delivered = s.delivered.contains_key(&(to, inc, peer, *exchange))
            || s.redelivered.contains_key(&(to, peer, *exchange));
        let copies = &mut s.nodes[to].copies;
        copies.received += 1;
        copies.after_delivery += u64::from(delivered);
        copies.distinct.insert((peer, *exchange));
        Arrival::Pass
    }

    fn early(&self, conn: p2p_handler::ConnId, peer: PeerId, message: &Message) -> Arrival {
        let arrival = self.incoming(conn, peer, message);
        if arrival == Arrival::Pass {
            lock(&self.shared).nodes[self.node].copies.early_in += 1;
        }
        arrival
    }

    fn dial(&self, conn: p2p_handler::ConnId, peer: PeerId, addr: SocketAddr) {
        let mut s = lock(&self.shared);
        s.nodes[self.node].copies.dials += 1;
        s.nodes[self.node].copies.dialing.insert(conn);
        if let Some(target) = s.by_peer.get(&peer).copied() {
            let names = s.names.clone();
            if let Some(r) = s.records.as_mut() {
                r.on_dial(self.node, target, addr, &names);
            }
        }
        let name = s.name(&peer);
        let host = host_of(addr);
        s.push(
            self.node,
            What::Conn(format!("{conn} dial {name} at {host}")),
        );
    }

    fn connection(&self, conn: p2p_handler::ConnId, peer: Option<PeerId>, event: &ConnEvent) {
        let mut s = lock(&self.shared);
        // Established or gone: what it carries from now on is not message 1's.
        s.nodes[self.node].copies.dialing.remove(&conn);
        let other = peer
            .and_then(|p| s.by_peer.get(&p).copied())
            .or_else(|| s.model.peer_of_conn(self.node, conn));
        let name = match (other, peer) {
            (Some(i), _) => s.names[i].clone(),
            (None, Some(p)) => s.name(&p),
            (None, None) => "?".to_owned(),
        };
        match (event, other) {
            (
                ConnEvent::Established {
                    remote_features, ..
                },
                Some(other),
            ) => {
                s.model.established(self.node, other, conn, now());
                s.model.features(self.node, conn, *remote_features);
            }
            (ConnEvent::Closed(_), _) => s.model.closed(self.node, conn),
            _ => {}
        }
        let text = match event {
            ConnEvent::Established { .. } => format!("{conn} established with {name}"),
            ConnEvent::Closed(closed) => {
                s.coverage.extend(coverage::closed(closed));
                // A Close received ends the connection rather than arriving as a message:
                // it counts for `sent = false` triggers here.
                if let (p2p_handler::Closed::ByPeer(reason), Some(from)) =
                    (closed, peer.and_then(|p| s.by_peer.get(&p).copied()))
                {
                    let close = Message::Close { reason: *reason };
                    s.count_triggers(from, self.node, &close, false);
                }
                format!("{conn} closed ({name}): {}", closed_text(closed))
            }
            ConnEvent::Oversized { len, .. } => {
                format!("{conn} oversized message of {len} B from {name}")
            }
            ConnEvent::Receiving { kind, .. } => {
                format!("{conn} a large {kind:?} from {name} arriving")
            }
            // Traced as messages (sent, received), as on the session.
            ConnEvent::Early { .. } | ConnEvent::Message(_) => return,
        };
        s.push(self.node, What::Conn(text));
    }

    fn wants_transitions(&self) -> bool {
        true
    }

    fn transition(
        &self,
        direction: p2p_handler::Direction,
        peer: PeerId,
        exchange: ExchangeId,
        from: Option<&'static str>,
        to: Option<&'static str>,
    ) {
        let mut s = lock(&self.shared);
        let other = s.by_peer.get(&peer).copied().unwrap_or(self.node);
        let dialer = match direction {
            p2p_handler::Direction::Outbound => self.node,
            p2p_handler::Direction::Inbound => other,
        };
        let label = match direction {
            p2p_handler::Direction::Outbound => s.label_or_assign(dialer, exchange),
            p2p_handler::Direction::Inbound => s.label(dialer, exchange),
        };
        let text = format!(
            "{label} {} -> {}",
            from.unwrap_or("new"),
            to.unwrap_or("finished")
        );
        s.coverage.insert(coverage::transition(direction, from, to));
        let key = (
            self.node,
            direction == p2p_handler::Direction::Outbound,
            peer,
            exchange,
        );
        let before = match to {
            Some(to) => s.last_state.insert(key, to),
            None => s.last_state.remove(&key),
        };
        if let Some(before) = before {
            s.explored
                .insert(coverage::pair(direction, before, from, to));
        }
        let state = s.fault_state();
        if !state.is_empty() {
            s.explored
                .insert(coverage::under(direction, from, to, &state));
        }
        s.push(self.node, What::State(text));
        if direction == p2p_handler::Direction::Outbound {
            let inc = s.incarnation_key(self.node);
            match (from, to) {
                (None, Some(_)) => s.model.began(self.node, inc, other, exchange),
                (Some(_), None) => s.model.ended(self.node, inc, exchange),
                _ => {}
            }
        }
    }

    fn rejected(&self, error: &ConnError) {
        let mut s = lock(&self.shared);
        let text = error_text(&s, error);
        s.push(self.node, What::Conn(format!("rejected: {text}")));
    }

    fn broken_invariant(&self, what: &str) {
        let mut s = lock(&self.shared);
        let name = s.names[self.node].clone();
        let at = now();
        s.errors.push(format!(
            "model (tables): {name} at {:.3}s: {what}",
            at.as_secs_f64()
        ));
    }
}

/// A `refuse` application, or a `nack` step, answers a Request with a Nack instead of
/// handing it to the endpoint.
fn injected_nack(
    s: &mut Shared,
    (from, to): (usize, usize),
    message: &Message,
    text: &str,
) -> Option<Arrival> {
    let refuse_first = match s.scenario.nodes[to].app {
        App::Refuse { first } => first,
        _ => 0,
    };
    if s.nodes[to].refused < refuse_first {
        s.nodes[to].refused += 1;
        s.push(
            to,
            What::App(format!(
                "refuse {text} (app refuses the first {refuse_first})"
            )),
        );
        s.nodes[to].copies.nacks_injected += 1;
        return Some(Arrival::Nack(NACK_REASON));
    }
    let rule = s.rules.iter_mut().find(|r| {
        r.remaining > 0 && r.action == ActionKind::Nack && r.matches.matches(from, to, message)
    })?;
    rule.remaining -= 1;
    rule.applied += 1;
    let step = rule.step;
    s.last_message_fault = now();
    let rule = s.rule_text(step);
    let link = Some((s.names[to].clone(), s.names[from].clone()));
    s.push(
        to,
        What::Fault {
            what: format!("answer {text} with Nack({NACK_REASON:?})"),
            rule,
            link,
        },
    );
    s.nodes[to].copies.nacks_injected += 1;
    Some(Arrival::Nack(NACK_REASON))
}

pub(super) fn closed_text(closed: &p2p_handler::Closed) -> String {
    match closed {
        p2p_handler::Closed::ByPeer(r) => format!("by peer, {r:?}"),
        p2p_handler::Closed::Locally(r) => format!("locally, {r:?}"),
        p2p_handler::Closed::Error(e) => format!("error: {}", short_error(e)),
        p2p_handler::Closed::Io(e) => format!("io: {e}"),
    }
}

/// Error kinds without addresses or ids (which vary), for stable traces.
pub(super) fn short_error(e: &ConnError) -> String {
    let text = format!("{e:?}");
    text.split([' ', '{', '('])
        .next()
        .unwrap_or("error")
        .to_owned()
}

pub(super) fn error_text(s: &Shared, e: &ConnError) -> String {
    let who = e
        .remote()
        .peer
        .map_or_else(|| "unknown peer".to_owned(), |p| s.name(&p));
    format!("{} from {who}", short_error(e))
}

/// The turmoil host name at `addr` (inside a host, reverse lookup gives it).
pub(super) fn host_of(addr: SocketAddr) -> String {
    turmoil::reverse_lookup(addr.ip()).unwrap_or_else(|| addr.ip().to_string())
}
