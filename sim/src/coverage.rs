//! What a run exercised: state transitions of the dialer and the responder (those drawn in
//! the diagrams of `endpoint/dialer.rs` and `endpoint/responder.rs`), message kinds sent,
//! Nack/Abort/Close reasons sent, and the steps (fault verbs among them) executed.
//!
//! Close reasons count whichever side closed.
//!
//! Items are plain strings (`dialer Connecting -> AwaitingAck`, `message Ack(Reply)`,
//! `nack Busy`, `step partition`), so runs on different machines merge by set union and a
//! report needs no schema. [`universe`] lists every item worth reaching; an item a run hits
//! outside it (a transition no diagram draws) is reported too, so a drifting diagram shows.

use std::collections::BTreeSet;

use p2p_handler::wire::{AbortReason, AckOf, CloseReason, Message, NackReason};
use p2p_handler::{Closed, Direction};

use crate::scenario::ActionKind;

/// An exploration item: two transitions of one exchange in a row, on one side
/// (`pair dialer AwaitingAck -> Backoff -> Connecting`). `before` is the state the
/// exchange entered last; `from` is normally the same.
pub fn pair(direction: Direction, before: &str, from: Option<&str>, to: Option<&str>) -> String {
    let side = side(direction);
    let from = from.unwrap_or("new");
    let to = to.unwrap_or("finished");
    if from == before {
        format!("pair {side} {before} -> {from} -> {to}")
    } else {
        format!("pair {side} {before} => {from} -> {to}")
    }
}

/// An exploration item: a transition while faults are in force (`dialer AwaitingAck ->
/// Backoff under cut+down`).
pub fn under(direction: Direction, from: Option<&str>, to: Option<&str>, faults: &str) -> String {
    format!(
        "{} {} -> {} under {faults}",
        side(direction),
        from.unwrap_or("new"),
        to.unwrap_or("finished")
    )
}

fn side(direction: Direction) -> &'static str {
    match direction {
        Direction::Outbound => "dialer",
        Direction::Inbound => "responder",
    }
}

/// The dialer's transitions, as its diagram draws them ("new" before the first state,
/// "finished" after the last).
const DIALER: &[(&str, &str)] = &[
    ("new", "Queued"),
    ("new", "Connecting"),
    ("new", "AwaitingAck"),
    ("Queued", "Connecting"),
    ("Queued", "AwaitingAck"),
    ("Queued", "finished"),
    ("Connecting", "AwaitingAck"),
    ("Connecting", "Backoff"),
    ("Connecting", "finished"),
    ("Backoff", "Connecting"),
    ("Backoff", "AwaitingAck"),
    ("Backoff", "finished"),
    ("AwaitingAck", "AwaitingReply"),
    ("AwaitingAck", "Backoff"),
    ("AwaitingAck", "finished"),
    ("AwaitingReply", "Backoff"),
    ("AwaitingReply", "finished"),
];

/// The responder's transitions, as its diagram draws them (a record restored after a
/// restart starts in the state it was stored in; a finished record is forgotten when the
/// dedupe bounds or the eviction of an idle peer need its room).
const RESPONDER: &[(&str, &str)] = &[
    ("new", "AwaitingResponse"),
    ("new", "AwaitingReplyAck"),
    ("new", "Done"),
    ("AwaitingResponse", "AwaitingReplyAck"),
    ("AwaitingResponse", "Aborted"),
    ("AwaitingReplyAck", "Done"),
    ("AwaitingReplyAck", "Unconfirmed"),
    ("Unconfirmed", "Done"),
    ("Done", "finished"),
];

const MESSAGES: &[&str] = &[
    "Request",
    "Request resend",
    "Ack(Request)",
    "Ack(Reply)",
    "Nack",
    "Reply",
    "Abort",
    "Close",
    "Progress",
    "Epoch",
    "Fetch",
    "Documents",
    "RecordSeqs",
    "Records",
];

const NACKS: &[NackReason] = &[
    NackReason::Busy,
    NackReason::RateLimited,
    NackReason::TooLarge,
    NackReason::ShuttingDown,
];

const ABORTS: &[AbortReason] = &[
    AbortReason::NoResponse,
    AbortReason::ReplyExpired,
    AbortReason::ShuttingDown,
    AbortReason::ReplyTooLarge,
    AbortReason::Refused,
    AbortReason::Settled,
];

const CLOSES: &[CloseReason] = &[
    CloseReason::Done,
    CloseReason::Idle,
    CloseReason::NotAllowed,
    CloseReason::ProtocolViolation,
    CloseReason::RateLimited,
    CloseReason::ShuttingDown,
    CloseReason::TooManyConnections,
];

const STEPS: &[ActionKind] = &[
    ActionKind::Request,
    ActionKind::Respond,
    ActionKind::Reject,
    ActionKind::Cancel,
    ActionKind::Allow,
    ActionKind::Revoke,
    ActionKind::AllowList,
    ActionKind::Partition,
    ActionKind::PartitionOneway,
    ActionKind::Hold,
    ActionKind::Release,
    ActionKind::Repair,
    ActionKind::RepairOneway,
    ActionKind::Crash,
    ActionKind::DiskFull,
    ActionKind::Restart,
    ActionKind::Stop,
    ActionKind::Membership,
    ActionKind::OfferRecord,
    ActionKind::Attack,
    ActionKind::Latency,
    ActionKind::FailRate,
    ActionKind::Drop,
    ActionKind::Delay,
    ActionKind::Duplicate,
    ActionKind::Corrupt,
    ActionKind::Nack,
];

/// Every item worth reaching.
pub fn universe() -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for (from, to) in DIALER {
        all.insert(transition(Direction::Outbound, Some(from), Some(to)));
    }
    for (from, to) in RESPONDER {
        all.insert(transition(Direction::Inbound, Some(from), Some(to)));
    }
    for m in MESSAGES {
        all.insert(format!("message {m}"));
    }
    all.extend(NACKS.iter().map(|r| format!("nack {r:?}")));
    all.extend(ABORTS.iter().map(|r| format!("abort {r:?}")));
    all.extend(CLOSES.iter().map(|r| format!("close {r:?}")));
    all.extend(STEPS.iter().map(|s| step(*s)));
    all
}

/// The item of a state transition (`None` before the first state and after the last).
pub fn transition(direction: Direction, from: Option<&str>, to: Option<&str>) -> String {
    format!(
        "{} {} -> {}",
        side(direction),
        from.unwrap_or("new"),
        to.unwrap_or("finished")
    )
}

/// The items of a message sent: its kind, and its reason if it carries one. (A Close's
/// reason also counts from [`closed`], whichever side closed.)
pub fn message(message: &Message) -> Vec<String> {
    match message {
        Message::Request { attempt, .. } if *attempt > 1 => vec!["message Request resend".into()],
        Message::Request { .. } => vec!["message Request".into()],
        Message::Ack { of, .. } => vec![match of {
            AckOf::Request => "message Ack(Request)".into(),
            AckOf::Reply => "message Ack(Reply)".into(),
        }],
        Message::Nack { reason, .. } => vec!["message Nack".into(), format!("nack {reason:?}")],
        Message::Reply { .. } => vec!["message Reply".into()],
        Message::Abort { reason, .. } => {
            vec!["message Abort".into(), format!("abort {reason:?}")]
        }
        Message::Close { reason } => vec!["message Close".into(), format!("close {reason:?}")],
        Message::Progress { .. } => vec!["message Progress".into()],
        Message::Epoch { .. } => vec!["message Epoch".into()],
        Message::Fetch { .. } => vec!["message Fetch".into()],
        Message::Documents { .. } => vec!["message Documents".into()],
        Message::RecordSeqs { .. } => vec!["message RecordSeqs".into()],
        Message::Records { .. } => vec!["message Records".into()],
    }
}

/// The item of a connection closed with a reason (by either side).
pub fn closed(closed: &Closed) -> Option<String> {
    match closed {
        Closed::ByPeer(reason) | Closed::Locally(reason) => Some(format!("close {reason:?}")),
        Closed::Error(_) | Closed::Io(_) => None,
    }
}

/// The item of a step executed.
pub fn step(action: ActionKind) -> String {
    let name = format!("{action:?}");
    // CamelCase to the snake_case scenario files use.
    let mut snake = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            snake.push('_');
        }
        snake.push(c.to_ascii_lowercase());
    }
    format!("step {snake}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_named_as_scenario_files_and_traces_name_them() {
        assert_eq!(step(ActionKind::PartitionOneway), "step partition_oneway");
        assert_eq!(step(ActionKind::AllowList), "step allow_list");
        assert_eq!(
            transition(Direction::Outbound, None, Some("Connecting")),
            "dialer new -> Connecting"
        );
        let all = universe();
        assert!(all.contains("responder AwaitingReplyAck -> Unconfirmed"));
        assert!(all.contains("close TooManyConnections"));
        assert_eq!(
            all.len(),
            DIALER.len()
                + RESPONDER.len()
                + MESSAGES.len()
                + NACKS.len()
                + ABORTS.len()
                + CLOSES.len()
                + STEPS.len()
        );
    }
}
