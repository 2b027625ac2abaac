//! What an operator sees: log lines (`tracing`) and metrics (the `metrics` facade), both
//! fed by the handler task from what it already handles (the endpoint's events, the
//! network's notices), so nothing is reported twice and the state machines stay silent.
//!
//! Levels: a successful exchange logs only at `debug`; each problem (a failed exchange, a
//! rejected handshake, a rate limit, a peer's protocol violation, a dropped connection) is
//! one `warn` line naming the peer or address. Problems of one cause (and one peer, where
//! there is one) are throttled: the first line goes out at once, the next ones in the
//! following [`WINDOW`] are counted, and one summary line with the count follows when the
//! window ends. A burst of 2,600 unlisted keys a second is two lines per window, not 2,600.
//!
//! Metrics (names as Prometheus shows them): `p2p_exchanges_total{outcome}` (ours, by how
//! they ended), `p2p_responses_total{outcome}` (peers' requests, by how they ended),
//! `p2p_handshake_failures_total{cause}`, `p2p_peer_errors_total{cause}`,
//! `p2p_rate_limited_total{limit}`, `p2p_notices_total{kind}`, the endpoint's counters
//! (`p2p_dials_total`, `p2p_redials_total`, `p2p_requests_sent_total`, `p2p_resends_total`,
//! `p2p_requests_delivered_total`, `p2p_duplicates_dropped_total`,
//! `p2p_settled_refused_total`,
//! `p2p_replies_from_cache_total`, `p2p_nacks_sent_total`, `p2p_nacks_received_total`,
//! `p2p_ik_dials_total`), what the guard made of inbound IK message 1s
//! (`p2p_first_messages_total{verdict="wrong_mac1"|"cookie_sent"|"cookie_proven"|
//! "ticket_redeemed"|"ticket_unknown"}`, `p2p_tickets_issued_total`),
//! gauges (`p2p_connections_established`, `p2p_connection_tasks`, `p2p_outbound_in_flight`,
//! `p2p_pending_responses`, `p2p_receive_backlog`, `p2p_unread_outcomes`) and, from the
//! connection tasks, `p2p_bytes_sent_total` / `p2p_bytes_received_total` (wire bytes,
//! encryption and framing included). Membership: `p2p_membership_epoch` (gauge),
//! `p2p_membership_applied_total`, `p2p_membership_refused_total{reason}` (by
//! `Refusal::code`), `p2p_membership_forks_total`, `p2p_membership_expired_total`,
//! `p2p_membership_unsendable_total`. Each applied epoch is an `info` line, each refusal a
//! `warn` line (once per copy), a fork, an expired document or a document too large for a
//! member an `error` line (alarms). Address records:
//! `p2p_records_published_total`, `p2p_records_accepted_total`,
//! `p2p_records_refused_total{reason}` (by `Refusal::label`), `p2p_records_inactive_total`
//! and the gauge `p2p_records_inactive_members`; a refusal or a member going inactive is a
//! `warn` line, a node whose record key the membership lacks an `error` line. Without a
//! recorder installed, each costs nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::connection::ConnError;
use crate::endpoint::{
    ConnId, Event, Failure, Installed, LimitKind, MembershipEvent, PeerError, Stats,
};
use crate::identity::PeerId;
use crate::wire::{ExchangeId, Kind, Message};

use super::catalog;
use super::handle::Notice;

/// How long repeated lines of one cause are held back and counted.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);

/// How many exchanges' start times are kept for the duration histogram; an exchange that
/// starts beyond it is not timed (exchanges in flight are bounded far below it anyway).
const MAX_TIMED: usize = 1 << 16;

/// How many distinct causes are throttled at once; beyond it the oldest window is closed
/// (its summary written) early. Bounds memory whatever the peers do.
const MAX_KEYS: usize = 1024;

/// The gauges' inputs, sampled by the handler task.
pub(super) struct Gauges {
    pub(super) established: usize,
    pub(super) tasks: usize,
    pub(super) outbound_in_flight: usize,
    pub(super) pending_responses: usize,
    pub(super) receive_backlog: usize,
    pub(super) unread: usize,
    /// The guard's counters (as of the router's last notice).
    pub(super) first_messages: crate::guard::GuardStats,
}

#[derive(Debug)]
struct Held {
    since: Instant,
    suppressed: u64,
    last: String,
}

/// Throttled logging and metrics for one node.
pub(super) struct Observer {
    held: BTreeMap<(&'static str, Option<PeerId>), Held>,
    /// The endpoint's counters and the gauges, registered once (with the recorder
    /// installed when the node started), so publishing after every step is a few atomic
    /// stores.
    counters: [metrics::Counter; 17],
    gauges: [metrics::Gauge; 6],
    /// When each exchange in flight started, by role (`true`: ours), peer and id, for
    /// [`catalog::EXCHANGE_DURATION`]. At most [`MAX_TIMED`].
    started: BTreeMap<(bool, PeerId, ExchangeId), Instant>,
}

impl Observer {
    pub(super) fn new() -> Self {
        catalog::describe();
        Self {
            held: BTreeMap::new(),
            started: BTreeMap::new(),
            counters: [
                metrics::counter!("p2p_dials_total"),
                metrics::counter!("p2p_redials_total"),
                metrics::counter!("p2p_requests_sent_total"),
                metrics::counter!("p2p_resends_total"),
                metrics::counter!("p2p_requests_delivered_total"),
                metrics::counter!("p2p_duplicates_dropped_total"),
                metrics::counter!("p2p_settled_refused_total"),
                metrics::counter!("p2p_replies_from_cache_total"),
                metrics::counter!("p2p_nacks_sent_total"),
                metrics::counter!("p2p_nacks_received_total"),
                metrics::counter!("p2p_ik_dials_total"),
                metrics::counter!("p2p_first_messages_total", "verdict" => "wrong_mac1"),
                metrics::counter!("p2p_first_messages_total", "verdict" => "cookie_sent"),
                metrics::counter!("p2p_first_messages_total", "verdict" => "cookie_proven"),
                metrics::counter!("p2p_first_messages_total", "verdict" => "ticket_redeemed"),
                metrics::counter!("p2p_first_messages_total", "verdict" => "ticket_unknown"),
                metrics::counter!("p2p_tickets_issued_total"),
            ],
            gauges: [
                metrics::gauge!("p2p_connections_established"),
                metrics::gauge!("p2p_connection_tasks"),
                metrics::gauge!("p2p_outbound_in_flight"),
                metrics::gauge!("p2p_pending_responses"),
                metrics::gauge!("p2p_receive_backlog"),
                metrics::gauge!("p2p_unread_outcomes"),
            ],
        }
    }

    /// An event of the endpoint, before it goes to the application. Lines about one
    /// exchange are written inside an `exchange` span (peer, id), so text logs prefix them
    /// with it and JSON logs carry it as the line's span.
    pub(super) fn event(&mut self, event: &Event) {
        // A problem's span is at info, so the default level shows it with the warn line;
        // a success's at debug, so the common path creates none unless asked for.
        let problem = matches!(
            event,
            Event::Failed { .. }
                | Event::ResponseUnconfirmed { .. }
                | Event::ResponseTimedOut { .. }
                | Event::ResponseAborted { .. }
        );
        let span = match exchange_of(event) {
            Some((peer, exchange)) if problem => {
                tracing::info_span!("exchange", peer = %peer.short(), id = %exchange)
            }
            Some((peer, exchange)) => {
                tracing::debug_span!("exchange", peer = %peer.short(), id = %exchange)
            }
            None => tracing::Span::none(),
        };
        let _entered = span.enter();
        self.count_and_time(event);
        match event {
            Event::Request {
                peer,
                exchange,
                redelivered,
                ..
            } => tracing::debug!(peer = %peer.short(), %exchange, redelivered, "request delivered"),
            Event::Reply { peer, exchange, .. } => {
                tracing::debug!(peer = %peer.short(), %exchange, "reply received");
            }
            Event::Failed {
                peer,
                exchange,
                failure,
                ..
            } => {
                if *failure == Failure::Cancelled {
                    // The application asked for it: not a problem.
                    tracing::debug!(peer = %peer.short(), %exchange, "request cancelled");
                    return;
                }
                self.warn(
                    ("exchange_failed", Some(*peer)),
                    format!("request {exchange} to {} failed: {failure}", peer.short()),
                );
            }
            Event::ResponseDelivered { peer, exchange, .. } => {
                tracing::debug!(peer = %peer.short(), %exchange, "reply confirmed");
            }
            Event::ResponseUnconfirmed { peer, exchange, .. } => {
                self.warn(
                    ("reply_unconfirmed", Some(*peer)),
                    format!(
                        "reply to {exchange} from {} sent but never confirmed",
                        peer.short()
                    ),
                );
            }
            Event::ResponseTimedOut { peer, exchange, .. } => {
                self.warn(
                    ("response_timed_out", Some(*peer)),
                    format!(
                        "request {exchange} from {} was not answered in time",
                        peer.short()
                    ),
                );
            }
            Event::ResponseAborted {
                peer,
                exchange,
                reason,
                ..
            } => {
                self.warn(
                    ("response_aborted", Some(*peer)),
                    format!("request {exchange} from {} aborted: {reason}", peer.short()),
                );
            }
            Event::ResponseCancelled { peer, exchange, .. } => {
                tracing::info!(peer = %peer.short(), %exchange, "request cancelled: the peer was revoked");
            }
            Event::PeerError(error) => {
                let (family, cause) = match error {
                    PeerError::Connection(e) => ("p2p_handshake_failures_total", conn_cause(e)),
                    PeerError::Violation { .. } => ("p2p_peer_errors_total", "violation"),
                    PeerError::RateLimitAbuse { .. } => ("p2p_peer_errors_total", "rate_abuse"),
                    _ => ("p2p_peer_errors_total", "other"),
                };
                metrics::counter!(family, "cause" => cause).increment(1);
                // Keyed by cause only: strangers' keys are unbounded in number.
                self.warn((cause, None), format!("peer error: {error}"));
            }
            Event::RateLimited {
                peer,
                limit,
                disconnected,
            } => {
                let limit_name = match limit {
                    LimitKind::Requests => "requests",
                    LimitKind::Connections => "connections",
                };
                metrics::counter!("p2p_rate_limited_total", "limit" => limit_name).increment(1);
                let action = if *disconnected {
                    "disconnected"
                } else {
                    "Nacked"
                };
                self.warn(
                    ("rate_limited", Some(*peer)),
                    format!("peer {} over its {limit_name} rate: {action}", peer.short()),
                );
            }
            Event::Membership(event) => membership(event),
            Event::Record(event) => record(event),
            _ => {}
        }
    }

    /// One of our requests was accepted: its exchange starts now.
    pub(super) fn request_started(&mut self, peer: PeerId, exchange: ExchangeId) {
        self.start((true, peer, exchange));
    }

    /// Starts timing an exchange, unless [`MAX_TIMED`] are timed already. A keyed request
    /// may name an exchange already started: its first start is kept.
    fn start(&mut self, key: (bool, PeerId, ExchangeId)) {
        if self.started.len() < MAX_TIMED {
            self.started.entry(key).or_insert_with(Instant::now);
        }
    }

    /// An exchange's outcome, counted by role (`p2p_exchanges_total` for ours,
    /// `p2p_responses_total` for peers') and, when this run saw it start, timed; a peer's
    /// request starts being timed at its delivery.
    fn count_and_time(&mut self, event: &Event) {
        let (ours, outcome) = match event {
            Event::Request { peer, exchange, .. } => return self.start((false, *peer, *exchange)),
            Event::Reply { .. } => (true, "reply"),
            Event::Failed { failure, .. } => (true, failure_cause(failure)),
            Event::ResponseDelivered { .. } => (false, "delivered"),
            Event::ResponseUnconfirmed { .. } => (false, "unconfirmed"),
            Event::ResponseTimedOut { .. } => (false, "timed_out"),
            Event::ResponseAborted { .. } => (false, "aborted"),
            Event::ResponseCancelled { .. } => (false, "cancelled"),
            _ => return,
        };
        let (family, role) = if ours {
            ("p2p_exchanges_total", "dialer")
        } else {
            ("p2p_responses_total", "responder")
        };
        metrics::counter!(family, "outcome" => outcome).increment(1);
        let Some((peer, exchange)) = exchange_of(event) else {
            return;
        };
        // An outcome from before a restart was not timed by this run.
        if let Some(since) = self.started.remove(&(ours, peer, exchange)) {
            metrics::histogram!(catalog::EXCHANGE_DURATION, "role" => role, "outcome" => outcome)
                .record(since.elapsed().as_secs_f64());
        }
    }

    /// A notice of the network side (limits, slow or failed sockets, a failed store).
    pub(super) fn notice(&mut self, notice: &Notice) {
        let kind = match notice {
            Notice::Event(_) => return,
            Notice::ConnectionLimit { .. } => "connection_limit",
            Notice::SlowConnection { .. } => "slow_connection",
            Notice::AcceptFailed(_) => "accept_failed",
            Notice::StoreFailed(_) => "store_failed",
        };
        metrics::counter!("p2p_notices_total", "kind" => kind).increment(1);
        self.warn((kind, None), notice.to_string());
    }

    /// Writes `line` now, or counts it if a line of the same key went out within
    /// [`WINDOW`].
    fn warn(&mut self, key: (&'static str, Option<PeerId>), line: String) {
        self.warn_at(Instant::now(), key, line);
    }

    fn warn_at(&mut self, now: Instant, key: (&'static str, Option<PeerId>), line: String) {
        if let Some(held) = self.held.get_mut(&key) {
            held.suppressed += 1;
            held.last = line;
            return;
        }
        tracing::warn!("{line}");
        if self.held.len() >= MAX_KEYS {
            self.close_oldest();
        }
        self.held.insert(
            key,
            Held {
                since: now,
                suppressed: 0,
                last: String::new(),
            },
        );
    }

    fn close_oldest(&mut self) {
        let oldest = self
            .held
            .iter()
            .min_by_key(|(_, h)| h.since)
            .map(|(k, _)| *k);
        if let Some(key) = oldest
            && let Some(held) = self.held.remove(&key)
        {
            summarise(&held);
        }
    }

    /// Publishes the counters and gauges, and closes the windows that ended (writing
    /// their summaries). Called by the handler task after every step.
    pub(super) fn tick(&mut self, stats: &Stats, gauges: &Gauges) {
        self.publish(stats, gauges);
        if !self.held.is_empty() {
            self.close_windows(Instant::now());
        }
    }

    fn close_windows(&mut self, now: Instant) {
        let ended: Vec<_> = self
            .held
            .iter()
            .filter(|(_, h)| now.duration_since(h.since) >= WINDOW)
            .map(|(k, _)| *k)
            .collect();
        for key in ended {
            if let Some(held) = self.held.remove(&key) {
                summarise(&held);
            }
        }
    }

    /// When the first throttling window ends (its summary is then due), if any is open.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.held.values().map(|h| h.since + WINDOW).min()
    }

    /// Writes every pending summary and publishes a last time (at shutdown).
    pub(super) fn flush(&mut self, stats: &Stats, gauges: &Gauges) {
        for held in std::mem::take(&mut self.held).values() {
            summarise(held);
        }
        self.publish(stats, gauges);
    }

    fn publish(&self, stats: &Stats, gauges: &Gauges) {
        let values = [
            stats.dials,
            stats.redials,
            stats.requests_sent,
            stats.resends,
            stats.requests_delivered,
            stats.duplicates_dropped,
            stats.settled_refused,
            stats.replies_from_cache,
            stats.nacks_sent,
            stats.nacks_received,
            stats.ik_dials,
            gauges.first_messages.bad_mac1,
            gauges.first_messages.cookies_sent,
            gauges.first_messages.cookies_proven,
            gauges.first_messages.tickets_redeemed,
            gauges.first_messages.tickets_unknown,
            gauges.first_messages.tickets_issued,
        ];
        for (counter, value) in self.counters.iter().zip(values) {
            counter.absolute(value);
        }
        let sizes = [
            gauges.established,
            gauges.tasks,
            gauges.outbound_in_flight,
            gauges.pending_responses,
            gauges.receive_backlog,
            gauges.unread,
        ];
        for (gauge, size) in self.gauges.iter().zip(sizes) {
            #[allow(clippy::cast_precision_loss)] // Sizes far below 2^52.
            gauge.set(size as f64);
        }
    }
}

fn summarise(held: &Held) {
    if held.suppressed > 0 {
        tracing::warn!(
            "{} more like this in {:?}, the last: {}",
            held.suppressed,
            WINDOW,
            held.last
        );
    }
}

/// The peer and exchange an event is about, if it is about one.
fn exchange_of(event: &Event) -> Option<(PeerId, ExchangeId)> {
    match event {
        Event::Request { peer, exchange, .. }
        | Event::Reply { peer, exchange, .. }
        | Event::Failed { peer, exchange, .. }
        | Event::ResponseDelivered { peer, exchange, .. }
        | Event::ResponseUnconfirmed { peer, exchange, .. }
        | Event::ResponseTimedOut { peer, exchange, .. }
        | Event::ResponseAborted { peer, exchange, .. }
        | Event::ResponseCancelled { peer, exchange, .. } => Some((*peer, *exchange)),
        _ => None,
    }
}

/// A message sent or received, at `debug`, with the connection, the peer, the exchange and
/// the attempt as fields (what a log shipper indexes). Resends and redials show here:
/// recovered trouble is not a problem until the exchange fails.
pub(super) fn message(sent: bool, conn: ConnId, peer: Option<PeerId>, message: &Message) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let peer = peer.map(|p| p.short().to_string()).unwrap_or_default();
    let exchange = message
        .exchange()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let attempt = message.attempt().unwrap_or(0);
    let kind = message.kind();
    let what = match (sent, kind, attempt) {
        (true, Kind::Request, a) if a > 1 => "resend",
        (true, _, _) => "sent",
        (false, _, _) => "received",
    };
    let span = tracing::debug_span!("exchange", %peer, id = %exchange, attempt);
    let _entered = span.enter();
    tracing::debug!(%conn, ?kind, "{what}");
}

/// A dial, at `debug` (a redial is a dial for an exchange that already tried).
/// A membership event: never throttled (each is reported once by the endpoint already).
fn membership(event: &MembershipEvent) {
    match event {
        MembershipEvent::Applied { epoch, .. } => {
            metrics::counter!("p2p_membership_applied_total").increment(1);
            metrics::gauge!("p2p_membership_epoch").set(*epoch as f64);
            tracing::info!("{event}");
        }
        MembershipEvent::Refused { refused, .. } => {
            let reason = refused.reason().map_or("unknown", |r| r.code());
            metrics::counter!("p2p_membership_refused_total", "reason" => reason).increment(1);
            tracing::warn!("{event}");
        }
        MembershipEvent::Fork { .. } => {
            metrics::counter!("p2p_membership_forks_total").increment(1);
            tracing::error!("{event}");
        }
        MembershipEvent::Expired { .. } => {
            metrics::counter!("p2p_membership_expired_total").increment(1);
            tracing::error!("{event}");
        }
        MembershipEvent::Unsendable { .. } => {
            metrics::counter!("p2p_membership_unsendable_total").increment(1);
            tracing::error!("{event}");
        }
        _ => tracing::info!("{event}"),
    }
}

/// What happened to an address record: a line, and metrics.
fn record(event: &crate::endpoint::RecordEvent) {
    use crate::endpoint::RecordEvent as R;
    match event {
        R::Published { seq, expires, .. } => {
            metrics::counter!("p2p_records_published_total").increment(1);
            tracing::info!(seq, expires, "{event}");
        }
        R::Accepted {
            peer, moved, first, ..
        } => {
            metrics::counter!("p2p_records_accepted_total").increment(1);
            // A refresh is routine; a member heard of, back, or moved is news.
            if *moved || *first {
                tracing::info!(peer = %peer.short(), "{event}");
            } else {
                tracing::debug!(peer = %peer.short(), "{event}");
            }
        }
        R::Refused { refusal, .. } => {
            metrics::counter!("p2p_records_refused_total", "reason" => refusal.label())
                .increment(1);
            tracing::warn!("{event}");
        }
        R::Inactive { peer } => {
            metrics::counter!("p2p_records_inactive_total").increment(1);
            tracing::warn!(peer = %peer.short(), "{event}");
        }
        R::Unlisted { .. } | R::CannotPublish { .. } => tracing::error!("{event}"),
        _ => tracing::info!("{event}"),
    }
}

/// The members without an unexpired address record: a gauge of how many, and a line
/// naming them when the set changes (at `info`; each one going inactive is a `warn`).
pub(super) fn inactive_members(inactive: &[PeerId]) {
    metrics::gauge!("p2p_records_inactive_members").set(inactive.len() as f64);
    let names: Vec<String> = inactive.iter().map(PeerId::short).collect();
    tracing::debug!(count = inactive.len(), members = ?names, "inactive members");
}

/// The membership a node starts with.
pub(super) fn membership_installed(installed: &Installed) {
    metrics::gauge!("p2p_membership_epoch").set(installed.epoch as f64);
    tracing::info!(
        epoch = installed.epoch,
        digest = %installed.digest.short(),
        resumed = installed.resumed,
        "membership in force"
    );
    if let Some(note) = &installed.note {
        tracing::warn!("membership: {note}");
    }
}

/// What a durable node found in its store at start: one `info` line with the counts, and
/// at `debug` one line per exchange it resumes or delivers again.
pub(super) fn resumed(location: &str, fresh: bool, recovered: &crate::durable::Recovered) {
    use crate::durable::InboundStage;
    if fresh {
        tracing::info!("store {location}: new, nothing to resume");
        return;
    }
    let redeliver = recovered
        .inbound
        .iter()
        .filter(|(_, r)| matches!(r.stage, InboundStage::Pending { payload: Some(_) }))
        .count();
    let awaiting_ack = recovered
        .inbound
        .iter()
        .filter(|(_, r)| matches!(r.stage, InboundStage::Replied { .. }))
        .count();
    let unacked = recovered.outbound.iter().filter(|(_, r)| !r.acked).count();
    tracing::info!(
        resumed = recovered.outbound.len(),
        redelivered = redeliver,
        outcomes = recovered.outcomes.len() + recovered.responses.len(),
        "store {location}: resuming {} of ours ({} not yet acknowledged by the peer, sent \
         again); delivering {} from peers again (acknowledged, not answered); {} awaiting \
         the peer's Ack; {} not taken before the stop, handed out again (flagged redelivered)",
        counted(recovered.outbound.len(), "request", "requests"),
        unacked,
        counted(redeliver, "request", "requests"),
        counted(awaiting_ack, "reply", "replies"),
        counted(
            recovered.outcomes.len() + recovered.responses.len(),
            "outcome",
            "outcomes"
        )
    );
    for (exchange, record) in &recovered.outbound {
        tracing::debug!(peer = %record.peer.short(), %exchange, acked = record.acked, "resuming our request");
    }
    for ((peer, exchange), record) in &recovered.inbound {
        if matches!(record.stage, InboundStage::Pending { payload: Some(_) }) {
            tracing::debug!(peer = %peer.short(), %exchange, "delivering a peer's request again");
        }
    }
}

/// "1 request", "2 requests".
fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub(super) fn dial(conn: ConnId, peer: PeerId, addr: std::net::SocketAddr) {
    tracing::debug!(%conn, peer = %peer.short(), %addr, "dial");
}

/// A connection's handshake completed, at `debug`.
pub(super) fn established(conn: ConnId, peer: PeerId, addr: Option<std::net::SocketAddr>) {
    match addr {
        Some(addr) => tracing::debug!(%conn, peer = %peer.short(), %addr, "connection established"),
        None => tracing::debug!(%conn, peer = %peer.short(), "connection established"),
    }
}

/// A label for how one of our exchanges failed.
fn failure_cause(failure: &Failure) -> &'static str {
    match failure {
        Failure::Exhausted { .. } => "exhausted",
        Failure::Refused(_) => "refused",
        Failure::Aborted(_) => "aborted",
        Failure::Rejected(_) => "rejected",
        Failure::Connection(_) => "connection",
        Failure::TooLarge { .. } => "too_large",
        Failure::Revoked => "revoked",
        Failure::ShuttingDown => "shutting_down",
        Failure::Cancelled => "cancelled",
        Failure::DeadlineExceeded => "deadline_exceeded",
        Failure::Inactive => "inactive",
        _ => "other",
    }
}

/// A label for a connection-level error.
fn conn_cause(error: &ConnError) -> &'static str {
    match error {
        ConnError::Handshake { .. } => "handshake",
        ConnError::IncompatibleVersion { .. } => "version",
        ConnError::Impostor { .. } => "impostor",
        ConnError::NotAllowed { .. } => "not_allowed",
        ConnError::HandshakeTimeout { .. } => "timeout",
        ConnError::Decrypt { .. } => "decrypt",
        ConnError::Protocol { .. } => "protocol",
        ConnError::BadFrame { .. } => "bad_frame",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(f: impl FnOnce()) -> Vec<String> {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn a_burst_of_one_cause_is_one_line_and_one_summary() {
        let t0 = Instant::now();
        let lines = logged(|| {
            let mut observer = Observer::new();
            for i in 0..2_600 {
                observer.warn_at(t0, ("not_allowed", None), format!("stranger {i} refused"));
            }
            // Another cause is not held back by the first.
            observer.warn_at(t0, ("impostor", None), "impostor".into());
            observer.close_windows(t0 + WINDOW - Duration::from_millis(1));
            observer.close_windows(t0 + WINDOW);
            // The window closed: the next line of that cause goes out at once.
            observer.warn_at(t0 + WINDOW, ("not_allowed", None), "stranger again".into());
        });
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[0].contains("WARN") && lines[0].contains("stranger 0 refused"));
        assert!(lines[1].contains("impostor"));
        assert!(
            lines[2].contains("2599 more like this") && lines[2].contains("stranger 2599"),
            "{}",
            lines[2]
        );
        assert!(lines[3].contains("stranger again"));
    }

    #[test]
    fn causes_are_keyed_by_peer_where_there_is_one() {
        let t0 = Instant::now();
        let [a, b] = [1u64, 2].map(|seed| {
            use rand_core::SeedableRng;
            crate::Keypair::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed)).peer_id()
        });
        let lines = logged(|| {
            let mut observer = Observer::new();
            observer.warn_at(t0, ("exchange_failed", Some(a)), "a failed".into());
            observer.warn_at(t0, ("exchange_failed", Some(b)), "b failed".into());
            observer.warn_at(t0, ("exchange_failed", Some(a)), "a failed again".into());
            // Nothing suppressed for b: no summary for it.
            observer.close_windows(t0 + WINDOW);
        });
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines[2].contains("1 more like this") && lines[2].contains("a failed again"));
    }

    #[test]
    fn the_number_of_held_causes_is_bounded() {
        let t0 = Instant::now();
        let lines = logged(|| {
            let mut observer = Observer::new();
            let peers: Vec<PeerId> = (0..MAX_KEYS as u64 + 5)
                .map(|seed| {
                    use rand_core::SeedableRng;
                    crate::Keypair::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed))
                        .peer_id()
                })
                .collect();
            for (i, peer) in peers.iter().enumerate() {
                let at = t0 + Duration::from_millis(i as u64);
                observer.warn_at(at, ("exchange_failed", Some(*peer)), format!("{i}"));
                observer.warn_at(at, ("exchange_failed", Some(*peer)), format!("{i} again"));
            }
            assert!(observer.held.len() <= MAX_KEYS);
        });
        // Every first line, and a summary for each window closed early.
        assert_eq!(lines.len(), MAX_KEYS + 5 + 5, "{}", lines.len());
    }
}
