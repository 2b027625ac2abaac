//! Every metric family the handler records, with its help text, type and unit: the one
//! place an operator (or a test) reads what `/metrics` means.
//!
//! [`describe`] hands the descriptions to whatever `metrics` recorder is installed, so a
//! Prometheus exporter writes `# HELP` for each family. It also registers every label value
//! of the labelled families at zero, so a family exists from the start (a node that only
//! serves still shows `p2p_exchanges_total`, at zero, instead of no series at all), and
//! `rate()` over a label that first appears later does not miss its first increment.
//!
//! Conventions (Prometheus' own): base units (seconds, bytes), `_total` for counters, one
//! meaning per family (a sum over a label is meaningful), labels from small fixed sets.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// How our exchanges end: `reply`, or the failure's cause (`Failure` in the core).
pub(super) const EXCHANGE_OUTCOMES: [&str; 13] = [
    "reply",
    "exhausted",
    "refused",
    "aborted",
    "rejected",
    "connection",
    "too_large",
    "revoked",
    "shutting_down",
    "cancelled",
    "deadline_exceeded",
    "inactive",
    "other",
];

/// How peers' requests end on our side.
pub(super) const RESPONSE_OUTCOMES: [&str; 5] = [
    "delivered",
    "unconfirmed",
    "timed_out",
    "aborted",
    "cancelled",
];

/// Handshake failures, by cause (`ConnError` in the core).
pub(super) const HANDSHAKE_CAUSES: [&str; 9] = [
    "handshake",
    "version",
    "impostor",
    "not_allowed",
    "timeout",
    "decrypt",
    "protocol",
    "bad_frame",
    "other",
];

/// Peer errors past the handshake, by cause.
pub(super) const PEER_ERROR_CAUSES: [&str; 3] = ["violation", "rate_abuse", "other"];

/// The rate limits.
pub(super) const LIMITS: [&str; 2] = ["requests", "connections"];

/// Notices of the network side.
pub(super) const NOTICE_KINDS: [&str; 4] = [
    "connection_limit",
    "slow_connection",
    "accept_failed",
    "store_failed",
];

/// The exchange-duration histogram.
pub const EXCHANGE_DURATION: &str = "p2p_exchange_duration_seconds";

/// Upper bounds of [`EXCHANGE_DURATION`]'s buckets, in seconds: a loopback exchange takes
/// about a millisecond, one that retries through an outage minutes.
pub const EXCHANGE_DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The counters without labels: name and help.
const COUNTERS: [(&str, &str); 22] = [
    ("p2p_dials_total", "Outbound connections started."),
    (
        "p2p_redials_total",
        "Outbound connections started for an exchange that had already tried one.",
    ),
    (
        "p2p_requests_sent_total",
        "Requests written to the network, resends included.",
    ),
    (
        "p2p_resends_total",
        "Requests written again (attempt 2 or later).",
    ),
    (
        "p2p_requests_delivered_total",
        "Peers' requests handed to the application (once each).",
    ),
    (
        "p2p_duplicates_dropped_total",
        "Copies of a peer's request already delivered, acknowledged and not delivered again.",
    ),
    (
        "p2p_settled_refused_total",
        "Peers' requests refused because their exchange had already ended here.",
    ),
    (
        "p2p_replies_from_cache_total",
        "Replies sent again from the reply cache to a resent request.",
    ),
    ("p2p_nacks_sent_total", "Nacks sent to peers."),
    ("p2p_nacks_received_total", "Nacks received from peers."),
    (
        "p2p_ik_dials_total",
        "Dials that carried the request in the first handshake message (IK).",
    ),
    (
        "p2p_tickets_issued_total",
        "Resumption tickets issued to peers.",
    ),
    (
        "p2p_membership_applied_total",
        "Membership documents applied (each a newer epoch).",
    ),
    (
        "p2p_membership_forks_total",
        "Two documents of one epoch signed by the committee (an alarm).",
    ),
    (
        "p2p_membership_expired_total",
        "Times the membership in force expired (an alarm).",
    ),
    (
        "p2p_membership_unsendable_total",
        "Membership documents too large for a member to take (an alarm).",
    ),
    (
        "p2p_records_published_total",
        "Address records this node published.",
    ),
    (
        "p2p_records_accepted_total",
        "Members' address records accepted.",
    ),
    (
        "p2p_records_inactive_total",
        "Members that went inactive (no unexpired address record).",
    ),
    (
        "p2p_membership_refused_total",
        "Membership documents refused, by reason.",
    ),
    (
        "p2p_records_refused_total",
        "Address records refused, by reason.",
    ),
    (
        "p2p_first_messages_total",
        "Inbound IK first messages, by what the guard made of them before any Diffie-Hellman.",
    ),
];

/// The gauges: name and help.
const GAUGES: [(&str, &str); 8] = [
    (
        "p2p_connections_established",
        "Connections the handler knows, established or being dialed.",
    ),
    (
        "p2p_connection_tasks",
        "Connection tasks alive on the network side (handshaking ones included).",
    ),
    ("p2p_outbound_in_flight", "Our exchanges not finished yet."),
    (
        "p2p_pending_responses",
        "Peers' requests waiting for our answer or for the Ack of our reply.",
    ),
    (
        "p2p_receive_backlog",
        "Events waiting for room in the application's receive channel.",
    ),
    (
        "p2p_unread_outcomes",
        "Outcomes handed to the application and not taken yet.",
    ),
    (
        "p2p_membership_epoch",
        "Epoch of the membership document in force.",
    ),
    (
        "p2p_records_inactive_members",
        "Members without an unexpired address record.",
    ),
];

/// Describes every family to the installed recorder and registers each label value at
/// zero. Idempotent; without a recorder it does nothing.
pub(super) fn describe() {
    for (name, help) in COUNTERS {
        describe_counter!(name, Unit::Count, help);
    }
    for (name, help) in GAUGES {
        describe_gauge!(name, help);
    }
    describe_counter!(
        "p2p_bytes_sent_total",
        Unit::Bytes,
        "Bytes written to connections, encryption and framing included."
    );
    describe_counter!(
        "p2p_bytes_received_total",
        Unit::Bytes,
        "Bytes read from connections, encryption and framing included."
    );
    describe_counter!(
        "p2p_exchanges_total",
        Unit::Count,
        "Our exchanges, by how they ended: reply, or the cause of the failure."
    );
    describe_counter!(
        "p2p_responses_total",
        Unit::Count,
        "Peers' requests delivered here, by how they ended on our side."
    );
    describe_counter!(
        "p2p_handshake_failures_total",
        Unit::Count,
        "Connections that failed before or during the handshake, by cause."
    );
    describe_counter!(
        "p2p_peer_errors_total",
        Unit::Count,
        "Authenticated peers disconnected for misbehaving, by cause."
    );
    describe_counter!(
        "p2p_rate_limited_total",
        Unit::Count,
        "Requests or connections over a peer's rate limit, by limit."
    );
    describe_counter!(
        "p2p_notices_total",
        Unit::Count,
        "Problems of the network side (limits, slow or failed sockets, a failed store), by kind."
    );
    describe_histogram!(
        EXCHANGE_DURATION,
        Unit::Seconds,
        "Time from a request to its outcome, by role (dialer: request to reply or failure; \
         responder: delivery to the outcome) and outcome."
    );
    register_labels();
}

/// Every label value of the labelled counters, at zero.
fn register_labels() {
    for outcome in EXCHANGE_OUTCOMES {
        let _ = metrics::counter!("p2p_exchanges_total", "outcome" => outcome);
    }
    for outcome in RESPONSE_OUTCOMES {
        let _ = metrics::counter!("p2p_responses_total", "outcome" => outcome);
    }
    for cause in HANDSHAKE_CAUSES {
        let _ = metrics::counter!("p2p_handshake_failures_total", "cause" => cause);
    }
    for cause in PEER_ERROR_CAUSES {
        let _ = metrics::counter!("p2p_peer_errors_total", "cause" => cause);
    }
    for limit in LIMITS {
        let _ = metrics::counter!("p2p_rate_limited_total", "limit" => limit);
    }
    for kind in NOTICE_KINDS {
        let _ = metrics::counter!("p2p_notices_total", "kind" => kind);
    }
}
