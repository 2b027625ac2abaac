//! The reference model: what each exchange may do, checked as the run goes, in every run
//! (sweeps too). The invariants in `judge.rs` say nothing is lost or doubled; the model
//! says each exchange behaved as the protocol documents, step by step:
//!
//! * **order**: per dialer and peer, Requests leave in the order the application made
//!   the exchanges, and one only after every earlier exchange to that peer ended (one
//!   exchange in flight per peer; the rest wait in its queue);
//! * **attempts**: each Request copy of an exchange carries a higher attempt number than
//!   the copy before it;
//! * **responder outcome**: every request delivered to an application ends in exactly one
//!   responder-side outcome (reply delivered, unconfirmed, timed out, aborted or refused,
//!   cancelled);
//! * **final Ack**: every Reply a dialer receives, a repeat too, is acknowledged at once
//!   (the responder stops waiting only then);
//! * **revoked**: a revoked peer's connections close, and no new one is established while
//!   it stays revoked;
//! * **size limit**: a request no larger than both ends' `max_message_size` is never
//!   refused as too large (swarm mode draws a limit for some seeds and sends requests at
//!   exactly it).
//!
//! The model sees what the tap sees (messages, connection events, state transitions: all
//! in the handler task's own order) and what the application sees. It keeps its own
//! tables, so a defect in the handler cannot hide from it by corrupting them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use p2p_handler::PeerId;
use p2p_handler::wire::{ExchangeId, Message};

/// How long a node may take to do what the model expects of it at once (an Ack of a
/// Reply, closing a revoked peer's connections): the handler does it in the same step, so
/// any virtual time at all means it did not.
const PROMPT: Duration = Duration::from_secs(1);

/// A rule broken, with the exchange it concerns (labelled by the judge).
#[derive(Debug, Clone)]
pub(super) struct Violation {
    pub(super) rule: &'static str,
    /// The dialer that owns the exchange, and its id; `None` for a connection rule.
    pub(super) exchange: Option<(usize, ExchangeId)>,
    /// What happened; `{other}` stands for `other`'s label.
    pub(super) detail: String,
    pub(super) other: Option<(usize, ExchangeId)>,
}

/// The model's tables. Keys carry the node's incarnation key (0 for a durable node, whose
/// exchanges outlive its incarnations), as the judge's do.
#[derive(Default)]
pub(super) struct Model {
    /// Node names, for the details.
    names: Vec<String>,
    /// (dialer, incarnation, peer) -> its exchanges to that peer, in the order they began.
    issued: BTreeMap<(usize, u64, usize), Vec<ExchangeId>>,
    /// (dialer, incarnation, id) of exchanges that ended.
    ended: BTreeSet<(usize, u64, ExchangeId)>,
    /// (dialer, incarnation, id) -> the highest attempt sent. The real incarnation, even
    /// for a durable node: an exchange resumed after a restart starts again from attempt
    /// 1 (PROTOCOL.md, "Exchanges").
    attempts: BTreeMap<(usize, u64, ExchangeId), u32>,
    /// (dialer, id) -> the attempt numbers of its Requests the responder read.
    received: BTreeMap<(usize, ExchangeId), BTreeSet<u32>>,
    /// (responder, incarnation, dialer peer, id) -> responder-side outcomes seen.
    responder: BTreeMap<(usize, u64, PeerId, ExchangeId), u32>,
    /// (dialer, id, attempt) -> when a Reply arrived that is not acknowledged yet.
    owed_acks: BTreeMap<(usize, ExchangeId, u32), Duration>,
    /// (node, peer) -> when the node revoked the peer, and whether a connection it kept
    /// was reported (once per revocation).
    revoked: BTreeMap<(usize, usize), (Duration, bool)>,
    /// (node, peer) -> connections established between them and not closed.
    open: BTreeMap<(usize, usize), BTreeSet<p2p_handler::ConnId>>,
    /// (node, connection) -> the features the peer's hello offered (rule `wire`).
    features: BTreeMap<(usize, p2p_handler::ConnId), u32>,
    /// (node, connection) -> the epoch it last told on it.
    epochs_sent: BTreeMap<(usize, p2p_handler::ConnId), u64>,
    violations: Vec<Violation>,
}

impl Model {
    /// A model of a run of the nodes named `names`.
    pub(super) fn new(names: Vec<String>) -> Self {
        Self {
            names,
            ..Self::default()
        }
    }

    /// A node (re)started: what its last incarnation owed it can no longer do, and of the
    /// exchanges it began only those its application was handed (`handed`: `request`
    /// returned, so committed when durable) resume; the others died with it.
    pub(super) fn started(&mut self, node: usize, handed: impl Fn(ExchangeId) -> bool) {
        for ((dialer, inc, _), list) in &mut self.issued {
            if *dialer == node {
                list.retain(|id| handed(*id) || self.ended.contains(&(node, *inc, *id)));
            }
        }
        self.owed_acks.retain(|(n, _, _), _| *n != node);
        self.open.retain(|(n, _), _| *n != node);
        self.revoked.retain(|(n, _), _| *n != node);
        // Connection ids start again with each incarnation.
        self.features.retain(|(n, _), _| *n != node);
        self.epochs_sent.retain(|(n, _), _| *n != node);
    }

    /// An exchange of `dialer` to `peer` began (or, after a durable restart, resumed).
    pub(super) fn began(&mut self, dialer: usize, inc: u64, peer: usize, id: ExchangeId) {
        let list = self.issued.entry((dialer, inc, peer)).or_default();
        if !list.contains(&id) {
            list.push(id);
        }
    }

    /// An exchange of `dialer` ended (an outcome is on its way to the application).
    pub(super) fn ended(&mut self, dialer: usize, inc: u64, id: ExchangeId) {
        self.ended.insert((dialer, inc, id));
    }

    /// `dialer` (in incarnation `incarnation`; `inc` its key) sends a copy of its Request
    /// `id` to `peer`: rules order and attempts.
    pub(super) fn request_sent(
        &mut self,
        dialer: (usize, u64, u64),
        peer: usize,
        id: ExchangeId,
        attempt: u32,
    ) {
        let (dialer, inc, incarnation) = dialer;
        let list = self.issued.get(&(dialer, inc, peer));
        let earlier = list
            .and_then(|l| l.iter().position(|x| *x == id).map(|i| &l[..i]))
            .unwrap_or_default();
        if let Some(waiting) = earlier
            .iter()
            .find(|x| !self.ended.contains(&(dialer, inc, **x)))
        {
            self.violations.push(Violation {
                rule: "order",
                exchange: Some((dialer, id)),
                detail: format!(
                    "sent (try {attempt}) while {{other}} to the same peer, begun earlier, \
                     had not ended"
                ),
                other: Some((dialer, *waiting)),
            });
        }
        let last = self.attempts.entry((dialer, incarnation, id)).or_insert(0);
        if attempt <= *last {
            self.violations.push(Violation {
                rule: "attempts",
                exchange: Some((dialer, id)),
                detail: format!("a copy with try {attempt} after one with try {last}"),
                other: None,
            });
        }
        *last = (*last).max(attempt);
    }

    /// A request reached `responder`'s application (not a flagged redelivery: that one
    /// already counts).
    pub(super) fn delivered(&mut self, responder: usize, inc: u64, peer: PeerId, id: ExchangeId) {
        self.responder
            .entry((responder, inc, peer, id))
            .or_insert(0);
    }

    /// A responder-side outcome of `peer`'s request `id` at `responder` (incarnation key
    /// `inc`), `redelivered` when handed out again after a restart.
    pub(super) fn responder_outcome(
        &mut self,
        (responder, inc): (usize, u64),
        (peer, id, dialer): (PeerId, ExchangeId, usize),
        what: &str,
        redelivered: bool,
    ) {
        let n = self
            .responder
            .entry((responder, inc, peer, id))
            .or_insert(0);
        // A durable responder hands an outcome out again after a restart, flagged, when
        // the application may not have taken it: it counts only if none came before.
        if redelivered && *n > 0 {
            return;
        }
        *n += 1;
        if *n > 1 {
            self.violations.push(Violation {
                rule: "responder outcome",
                exchange: Some((dialer, id)),
                detail: format!("a second responder-side outcome ({what})"),
                other: None,
            });
        }
    }

    /// `dialer` received a Reply: it owes an Ack of it (unless too large to take).
    pub(super) fn reply_received(
        &mut self,
        dialer: usize,
        id: ExchangeId,
        attempt: u32,
        now: Duration,
    ) {
        self.owed_acks.entry((dialer, id, attempt)).or_insert(now);
    }

    /// `dialer` acknowledged a Reply.
    pub(super) fn reply_acked(&mut self, dialer: usize, id: ExchangeId, attempt: u32) {
        self.owed_acks.remove(&(dialer, id, attempt));
    }

    /// `dialer`'s exchange failed as too large, its payload `len` bytes where both ends take
    /// `fits`.
    pub(super) fn too_large(&mut self, dialer: usize, id: ExchangeId, len: usize, fits: usize) {
        if len <= fits {
            self.violations.push(Violation {
                rule: "size limit",
                exchange: Some((dialer, id)),
                detail: format!("{len} B refused as too large, though both ends take {fits} B"),
                other: None,
            });
        }
    }

    /// The dialer's Request `id`, try `attempt`, reached its responder.
    pub(super) fn request_received(&mut self, dialer: usize, id: ExchangeId, attempt: u32) {
        self.received
            .entry((dialer, id))
            .or_default()
            .insert(attempt);
    }

    /// (dialer, id) -> the tries of it that reached the responder (each attempt number
    /// once; a resumed exchange starts again at 1, so restarts add no numbers).
    pub(super) fn tries_received(&self) -> &BTreeMap<(usize, ExchangeId), BTreeSet<u32>> {
        &self.received
    }

    /// `node` revoked `peer` (or dropped it from its allow list).
    pub(super) fn revoked(&mut self, node: usize, peer: usize, now: Duration) {
        self.revoked.entry((node, peer)).or_insert((now, false));
    }

    /// `node` allows `peer` again. Called before the handler is told (it may accept the
    /// peer's connection before the caller hears back); returns what to put back with
    /// [`Model::still_revoked`] if the handler refuses.
    pub(super) fn allowed(&mut self, node: usize, peer: usize) -> Option<(Duration, bool)> {
        self.revoked.remove(&(node, peer))
    }

    /// An allow [`Model::allowed`] announced did not happen: `peer` stays revoked.
    pub(super) fn still_revoked(
        &mut self,
        node: usize,
        peer: usize,
        was: Option<(Duration, bool)>,
    ) {
        if let Some(was) = was {
            self.revoked.insert((node, peer), was);
        }
    }

    /// The peer of `node`'s open connection `conn` (a connection closed locally is reported
    /// without its peer: the endpoint forgot it first).
    pub(super) fn peer_of_conn(&self, node: usize, conn: p2p_handler::ConnId) -> Option<usize> {
        self.open
            .iter()
            .find(|((n, _), conns)| *n == node && conns.contains(&conn))
            .map(|((_, peer), _)| *peer)
    }

    /// `node`'s connection `conn` closed.
    pub(super) fn closed(&mut self, node: usize, conn: p2p_handler::ConnId) {
        if let Some(peer) = self.peer_of_conn(node, conn)
            && let Some(open) = self.open.get_mut(&(node, peer))
        {
            open.remove(&conn);
        }
    }

    /// `node`'s connection `conn` is established; the peer's hello offered `features`.
    pub(super) fn features(&mut self, node: usize, conn: p2p_handler::ConnId, features: u32) {
        self.features.insert((node, conn), features);
        self.epochs_sent.remove(&(node, conn));
    }

    /// Rule `wire`: what `from` sends `to` on `conn` keeps PROTOCOL.md's rules about whom
    /// to send what: membership and record messages only to a peer whose hello has that
    /// feature, and an epoch told once per connection (again only once it changed).
    pub(super) fn wire(
        &mut self,
        from: usize,
        to: usize,
        conn: p2p_handler::ConnId,
        message: &Message,
    ) {
        use p2p_handler::wire::{FEATURE_MEMBERSHIP, FEATURE_RECORDS};
        let needs = match message {
            Message::Epoch { .. } | Message::Fetch { .. } | Message::Documents { .. } => {
                Some((FEATURE_MEMBERSHIP, "membership"))
            }
            Message::RecordSeqs { .. } | Message::Records { .. } => {
                Some((FEATURE_RECORDS, "records"))
            }
            _ => None,
        };
        let features = self.features.get(&(from, conn)).copied();
        if let (Some((bit, what)), Some(features)) = (needs, features)
            && features & bit == 0
        {
            self.violations.push(Violation {
                rule: "wire",
                exchange: None,
                detail: format!(
                    "{conn}: {} sent {:?} to {}, whose hello lacks the {what} feature",
                    self.name(from),
                    message.kind(),
                    self.name(to)
                ),
                other: None,
            });
        }
        if let Message::Epoch { epoch, .. } = message
            && self.epochs_sent.insert((from, conn), *epoch) == Some(*epoch)
        {
            self.violations.push(Violation {
                rule: "wire",
                exchange: None,
                detail: format!(
                    "{conn}: {} told {} its epoch {epoch} twice on one connection",
                    self.name(from),
                    self.name(to)
                ),
                other: None,
            });
        }
    }

    /// A connection of `node` with `peer` was established.
    pub(super) fn established(
        &mut self,
        node: usize,
        peer: usize,
        conn: p2p_handler::ConnId,
        now: Duration,
    ) {
        self.open.entry((node, peer)).or_default().insert(conn);
        if let Some((since, _)) = self.revoked.get(&(node, peer)) {
            self.violations.push(Violation {
                rule: "revoked",
                exchange: None,
                detail: format!(
                    "{conn}: {} established a connection with {} at {now:?}, though it \
                     revoked it at {since:?}",
                    self.name(node),
                    self.name(peer)
                ),
                other: None,
            });
        }
    }

    /// What a node should have done by `now` and did not. Called as the run goes (cheap
    /// when nothing is owed) and at its end (`now` = `None`: whatever is still owed then
    /// was never done).
    pub(super) fn overdue(&mut self, now: Option<Duration>, up: &[bool]) {
        let late_by = |since: Duration| now.is_none_or(|now| now > since + PROMPT);
        let late: Vec<(usize, ExchangeId, u32)> = self
            .owed_acks
            .iter()
            .filter(|(_, since)| late_by(**since))
            .map(|(k, _)| *k)
            .collect();
        for (dialer, id, attempt) in late {
            self.owed_acks.remove(&(dialer, id, attempt));
            if up.get(dialer).copied().unwrap_or(false) {
                self.violations.push(Violation {
                    rule: "final Ack",
                    exchange: Some((dialer, id)),
                    detail: format!("its Reply (try {attempt}) was never acknowledged"),
                    other: None,
                });
            }
        }
        let kept: Vec<((usize, usize), Duration)> = self
            .revoked
            .iter()
            .filter(|(key, (since, reported))| {
                !reported && late_by(*since) && self.open.get(key).is_some_and(|c| !c.is_empty())
            })
            .map(|(k, (since, _))| (*k, *since))
            .collect();
        let when = now.map_or_else(|| "at the end".to_owned(), |now| format!("at {now:?}"));
        for ((node, peer), since) in kept {
            self.revoked.insert((node, peer), (since, true));
            self.violations.push(Violation {
                rule: "revoked",
                exchange: None,
                detail: format!(
                    "{} still connected to {} {when}, though it revoked it at {since:?}",
                    self.name(node),
                    self.name(peer)
                ),
                other: None,
            });
        }
    }

    /// Whether anything is owed: the main loop checks `overdue` only then.
    pub(super) fn owes(&self) -> bool {
        !self.owed_acks.is_empty() || self.revoked.values().any(|(_, reported)| !reported)
    }

    /// The end of the run: delivered requests without a responder-side outcome, at
    /// responders that are up in the incarnation that took them (`live`). Only when the
    /// run ended quietly: at the time limit, work may legitimately still be open.
    pub(super) fn finish(
        &mut self,
        live: impl Fn(usize, u64) -> bool,
        dialer_of: impl Fn(&PeerId) -> Option<usize>,
    ) {
        let missing: Vec<(usize, PeerId, ExchangeId)> = self
            .responder
            .iter()
            .filter(|((node, inc, _, _), n)| **n == 0 && live(*node, *inc))
            .map(|((node, _, peer, id), _)| (*node, *peer, *id))
            .collect();
        for (node, peer, id) in missing {
            let dialer = dialer_of(&peer).unwrap_or(node);
            self.violations.push(Violation {
                rule: "responder outcome",
                exchange: Some((dialer, id)),
                detail: format!(
                    "delivered to {}, which never reported how it ended",
                    self.name(node)
                ),
                other: None,
            });
        }
    }

    fn name(&self, node: usize) -> &str {
        self.names.get(node).map_or("?", String::as_str)
    }

    /// The rules broken so far.
    pub(super) fn violations(&self) -> &[Violation] {
        &self.violations
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_handler::ConnId;
    use p2p_handler::wire::{FEATURE_MEMBERSHIP, FEATURE_RECORDS};

    fn rules(model: &Model) -> Vec<String> {
        model
            .violations()
            .iter()
            .map(|v| v.detail.clone())
            .collect()
    }

    #[test]
    fn the_wire_rule_holds_senders_to_their_peers_features_and_one_epoch_per_connection() {
        let mut model = Model::new(vec!["a".into(), "b".into()]);
        let (bare, full) = (ConnId::inbound(1), ConnId::inbound(2));
        model.features(0, bare, 0);
        model.features(0, full, FEATURE_MEMBERSHIP | FEATURE_RECORDS);
        let epoch = |epoch| Message::Epoch {
            epoch,
            digest: [0; 32],
        };
        model.wire(0, 1, full, &epoch(1));
        model.wire(0, 1, full, &epoch(2));
        model.wire(0, 1, full, &Message::Records { records: vec![] });
        assert!(rules(&model).is_empty(), "{:?}", rules(&model));
        model.wire(0, 1, full, &epoch(2));
        model.wire(0, 1, bare, &epoch(2));
        model.wire(0, 1, bare, &Message::RecordSeqs { seqs: vec![] });
        assert_eq!(
            rules(&model),
            [
                "i2: a told b its epoch 2 twice on one connection",
                "i1: a sent Epoch to b, whose hello lacks the membership feature",
                "i1: a sent RecordSeqs to b, whose hello lacks the records feature",
            ]
        );
    }
}
