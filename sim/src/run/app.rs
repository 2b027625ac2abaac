//! The simulated application: what each node does with the events its handler hands up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use p2p_handler::endpoint::Failure;
use p2p_handler::wire::NackReason;
use p2p_handler::{Event, Handler, Notice, PeerId};

use super::tap::short_error;
use super::world::{Shared, lock, now};
use crate::scenario::App;
use crate::trace::What;

pub(super) fn failure_kind(failure: &Failure) -> String {
    match failure {
        Failure::Connection(e) => format!("Connection({})", short_error(e)),
        other => {
            let text = format!("{other:?}");
            // Exhausted carries details that vary run to run (the last cause text).
            match text.find(" {") {
                Some(i) if text.starts_with("Exhausted") => {
                    let last = match failure {
                        Failure::Exhausted { last, .. } => format!("{last:?}"),
                        _ => String::new(),
                    };
                    let last = last.split('(').next().unwrap_or("").to_owned();
                    format!("{}(last: {last})", &text[..i])
                }
                _ => text,
            }
        }
    }
}

pub(super) fn on_event(
    shared: &Arc<Mutex<Shared>>,
    node: usize,
    handler: &Handler,
    app: &App,
    event: Event,
) {
    let mut s = lock(shared);
    let incarnation = s.incarnation_key(node);
    match event {
        Event::Request {
            peer,
            exchange,
            payload,
            redelivered,
            ..
        } => {
            s.nodes[node].requests_seen += 1;
            drop(s);
            let request = Delivery {
                peer,
                exchange,
                payload,
                redelivered,
            };
            on_request(shared, node, handler, app, request);
        }
        Event::Reply {
            exchange,
            payload,
            redelivered,
            ..
        } => {
            let label = s.label(node, exchange);
            let again = if redelivered { ", redelivered" } else { "" };
            s.push(
                node,
                What::Event(format!("reply {label} ({} B{again})", payload.len())),
            );
            if s.count_outcome(node, incarnation, exchange, redelivered) {
                s.replied += 1;
            }
        }
        Event::ResponseDelivered {
            peer,
            exchange,
            redelivered,
        } => {
            responder_outcome(
                &mut s,
                node,
                (peer, exchange),
                "reply delivered",
                redelivered,
            );
            let label = s.inbound_label(node, &peer, exchange);
            let again = if redelivered { ", redelivered" } else { "" };
            s.push(node, What::Event(format!("reply {label} delivered{again}")));
        }
        other => {
            drop(s);
            on_notice(shared, node, Notice::Event(other));
        }
    }
}

/// A request the handler delivered to a node's application.
struct Delivery {
    peer: PeerId,
    exchange: p2p_handler::wire::ExchangeId,
    payload: bytes::Bytes,
    redelivered: bool,
}

/// Counts a delivery (invariants: no duplicate, nothing redelivered once answered) and
/// answers it as the node's application does.
fn on_request(
    shared: &Arc<Mutex<Shared>>,
    node: usize,
    handler: &Handler,
    app: &App,
    request: Delivery,
) {
    let Delivery {
        peer,
        exchange,
        payload,
        redelivered,
    } = request;
    let mut s = lock(shared);
    let incarnation = s.incarnation_key(node);
    let dialer = s.by_peer.get(&peer).copied().unwrap_or(node);
    let label = s.label(dialer, exchange);
    if redelivered {
        *s.redelivered.entry((node, peer, exchange)).or_default() += 1;
        if s.answered.contains(&(node, peer, exchange)) {
            let name = s.names[node].clone();
            s.errors.push(format!(
                "{label} redelivered to {name} after its application answered it"
            ));
        }
    } else {
        *s.delivered
            .entry((node, incarnation, peer, exchange))
            .or_default() += 1;
        if payload == crate::swarm::PROBE.as_bytes() {
            s.probe_deliveries
                .insert((node, incarnation, peer, exchange));
        }
    }
    s.model.delivered(node, incarnation, peer, exchange);
    let again = if redelivered { ", redelivered" } else { "" };
    s.push(
        node,
        What::Event(format!("request {label} ({} B{again})", payload.len())),
    );
    s.nodes[node].received += 1;
    let mut reply = b"re:".to_vec();
    reply.extend_from_slice(&payload);
    // A request at the size limit gets a reply at the limit, not over it.
    reply.truncate(s.scenario.max_message_size_of(node));
    let delay = match app {
        App::Echo | App::Refuse { .. } => Some(Duration::ZERO),
        App::Slow { reply_after } => Some(*reply_after),
        App::CrashProne { after, .. } => {
            if s.nodes[node].received >= *after {
                s.crash_requests.push_back(node);
                None
            } else {
                Some(Duration::ZERO)
            }
        }
        App::Never | App::Manual => {
            s.pending.entry((node, peer)).or_default().push(exchange);
            None
        }
        App::Reject => {
            let handler = handler.clone();
            tokio::spawn(async move {
                let _ = handler.reject(peer, exchange).await;
            });
            None
        }
    };
    drop(s);
    if let Some(delay) = delay {
        let handler = handler.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if handler.response_to(peer, exchange, reply).await.is_ok() {
                lock(&shared).answered.insert((node, peer, exchange));
            }
        });
    }
}

pub(super) fn on_notice(shared: &Arc<Mutex<Shared>>, node: usize, notice: Notice) {
    let mut s = lock(shared);
    let incarnation = s.incarnation_key(node);
    let text = match notice {
        Notice::Event(Event::Failed {
            peer,
            exchange,
            failure,
            payload,
            redelivered,
        }) => {
            let label = s.label(node, exchange);
            let kind = failure_kind(&failure);
            if matches!(
                failure,
                Failure::TooLarge { .. } | Failure::Refused(NackReason::TooLarge)
            ) && let Some(&responder) = s.by_peer.get(&peer)
            {
                let fits = s
                    .scenario
                    .max_message_size_of(node)
                    .min(s.scenario.max_message_size_of(responder));
                s.model.too_large(node, exchange, payload.len(), fits);
            }
            if s.count_outcome(node, incarnation, exchange, redelivered) {
                s.failures.push(kind.clone());
            }
            if s.probes.contains(&(node, exchange)) {
                s.probe_failures.push(format!("{label}: {failure}"));
            }
            let again = if redelivered { ", redelivered" } else { "" };
            format!(
                "failed {label}: {kind} ({} B handed back{again})",
                payload.len()
            )
        }
        Notice::Event(Event::PeerError(e)) => {
            s.peer_errors += 1;
            s.peer_error_log.push((now(), node, e.remote().peer));
            let who = e
                .remote()
                .peer
                .map_or_else(|| "unknown peer".to_owned(), |p| s.name(&p));
            let kind = match &e {
                p2p_handler::endpoint::PeerError::Connection(c) => short_error(c),
                other => format!("{other:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap_or("")
                    .to_owned(),
            };
            format!("peer error: {kind} from {who}")
        }
        Notice::Event(Event::RateLimited {
            peer,
            limit,
            disconnected,
        }) => {
            s.rate_limited += 1;
            let name = s.name(&peer);
            format!("rate limited {name} ({limit:?}, disconnected: {disconnected})")
        }
        Notice::Event(
            event @ (Event::ResponseTimedOut { .. }
            | Event::ResponseAborted { .. }
            | Event::ResponseCancelled { .. }
            | Event::ResponseUnconfirmed { .. }),
        ) => responder_notice(&mut s, node, event),
        Notice::Event(Event::Membership(event)) => membership_event(&mut s, node, &event),
        Notice::Event(Event::Record(event)) => {
            let names = s.names.clone();
            let by_peer = s.by_peer.clone();
            match s.records.as_mut() {
                Some(r) => r.on_event(node, &event, &names, |p| by_peer.get(p).copied(), now()),
                None => format!("{event}"),
            }
        }
        Notice::ConnectionLimit { direction, .. } => format!("connection limit ({direction:?})"),
        Notice::SlowConnection { .. } => "slow connection dropped".to_owned(),
        Notice::AcceptFailed(e) => format!("accept failed: {e}"),
        other => format!("{other:?}"),
    };
    s.push(node, What::Event(text));
}

/// A membership event: traced, counted, and checked against the invariants.
pub(super) fn membership_event(
    s: &mut Shared,
    node: usize,
    event: &p2p_handler::MembershipEvent,
) -> String {
    use p2p_handler::MembershipEvent as M;
    let from = |s: &Shared, source: &p2p_handler::Source| match source {
        p2p_handler::Source::Local => "its operator".to_owned(),
        p2p_handler::Source::Peer(peer) => s.name(peer),
        p2p_handler::Source::Directory => "the records directory".to_owned(),
    };
    match event {
        M::Applied {
            epoch,
            digest,
            source,
            added,
            removed,
        } => {
            s.nodes[node].membership_applied += 1;
            let broken = s
                .membership
                .as_mut()
                .map(|m| m.on_applied(node, *epoch, *digest))
                .unwrap_or_default();
            s.errors.extend(broken);
            s.last_membership = now();
            let names = |peers: &[PeerId]| {
                peers
                    .iter()
                    .map(|p| s.name(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(
                "membership epoch {epoch} ({}) applied, from {}; added [{}], removed [{}]",
                digest.short(),
                from(s, source),
                names(added),
                names(removed)
            )
        }
        M::Refused { source, refused } => {
            s.membership_refused += 1;
            let codes: Vec<&str> = refused.reasons.iter().map(|r| r.code()).collect();
            format!(
                "membership epoch {} from {} refused ({})",
                refused.epoch,
                from(s, source),
                codes.join(", ")
            )
        }
        M::Fork { source, fork } => {
            s.membership_forks += 1;
            format!(
                "ALARM membership fork at epoch {} shown by {}: holds {}, other {}",
                fork.epoch,
                from(s, source),
                fork.ours.short(),
                fork.theirs.short()
            )
        }
        M::Expired { epoch, .. } => format!("ALARM membership epoch {epoch} expired"),
        M::Unsendable {
            peer,
            epoch,
            size,
            max,
        } => format!(
            "membership epoch {epoch} ({size} B) unsendable to {}: at most {max} B",
            s.name(peer)
        ),
        other => format!("{other}"),
    }
}

/// Hands a responder-side outcome to the model.
fn responder_outcome(
    s: &mut Shared,
    node: usize,
    (peer, id): (PeerId, p2p_handler::wire::ExchangeId),
    what: &str,
    redelivered: bool,
) {
    let inc = s.incarnation_key(node);
    let dialer = s.by_peer.get(&peer).copied().unwrap_or(node);
    s.model
        .responder_outcome((node, inc), (peer, id, dialer), what, redelivered);
}

/// How a request of a peer ended at this responder (not answered in time, aborted,
/// cancelled, unconfirmed): traced, and handed to the model.
fn responder_notice(s: &mut Shared, node: usize, event: Event) -> String {
    let Some((peer, exchange)) = event.response_of() else {
        return format!("{event:?}");
    };
    let (what, text, redelivered) = match event {
        Event::ResponseTimedOut { redelivered, .. } => (
            "timed out",
            "response timed out for {}".to_owned(),
            redelivered,
        ),
        Event::ResponseAborted {
            reason,
            redelivered,
            ..
        } => (
            "aborted",
            format!("response aborted for {{}} ({reason:?})"),
            redelivered,
        ),
        Event::ResponseCancelled { redelivered, .. } => (
            "cancelled",
            "response cancelled for {}".to_owned(),
            redelivered,
        ),
        Event::ResponseUnconfirmed { redelivered, .. } => {
            s.unconfirmed += u64::from(!redelivered);
            (
                "unconfirmed",
                "reply {} unconfirmed".to_owned(),
                redelivered,
            )
        }
        other => return format!("{other:?}"),
    };
    s.settle_pending(node, peer, exchange);
    responder_outcome(s, node, (peer, exchange), what, redelivered);
    let again = if redelivered { ", redelivered" } else { "" };
    text.replace("{}", &s.inbound_label(node, &peer, exchange)) + again
}
