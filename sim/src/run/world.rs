//! What the hosts and the simulator share: names, keys, each node's state, the trace and
//! every count the judge reads.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use p2p_handler::wire::{ExchangeId, Message};
use p2p_handler::{Keypair, MemoryStore, PeerId};
use tokio::sync::mpsc;

use super::node::NodeCommand;
use super::tap::{Rule, Waiting};
use crate::scenario::Scenario;
use crate::trace::{Trace, What};

#[derive(Default)]
pub(super) struct NodeState {
    pub(super) incarnation: u64,
    /// Its disk, when the node is durable.
    pub(super) store: Option<MemoryStore>,
    /// Whether its disk is full (a `disk_full` step; a restart makes room).
    pub(super) disk_full: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub(super) up: bool,
    pub(super) commands: Option<mpsc::UnboundedSender<NodeCommand>>,
    /// Set before the node is crashed or bounced: its streams then close in order.
    pub(super) crash_switch: Option<crate::transport::CrashSwitch>,
    /// Request copies seen by a `refuse` app, and requests by a `crash_prone` app.
    pub(super) refused: u32,
    pub(super) received: u32,
    /// Requests this incarnation's application was handed (redelivered ones too): what
    /// the handler's `Stats::requests_delivered` must say.
    pub(super) requests_seen: u64,
    /// This incarnation's Request copies, as the tap saw them: what its duplicate and
    /// resend counters are checked against.
    pub(super) copies: Copies,
    /// Membership `Applied` events this incarnation's application heard (each applies one
    /// document or more).
    pub(super) membership_applied: u64,
}

/// Request copies one incarnation of a node sent and received (see the `counters` rule).
#[derive(Default)]
pub(super) struct Copies {
    /// Copies handed to its endpoint (not Nacked or dropped by a fault).
    pub(super) received: u64,
    /// Of those, copies of a request its application already had (a record of it exists
    /// from then on: a duplicate, unless the record was evicted or the copy rate-limited).
    pub(super) after_delivery: u64,
    /// The distinct (peer, exchange) among them.
    pub(super) distinct: BTreeSet<(PeerId, ExchangeId)>,
    /// Requests it sent with an attempt above 1.
    pub(super) resent: u64,
    /// Requests it sent (every copy the tap saw leave, message 1's included).
    pub(super) requests_out: u64,
    /// Dials it made (every one the tap saw).
    pub(super) dials: u64,
    /// Nacks it sent, and those of them the simulator injected for it.
    pub(super) nacks_out: u64,
    pub(super) nacks_injected: u64,
    /// Nacks that reached it.
    pub(super) nacks_in: u64,
    /// Replies it sent, and the exchanges they answered.
    pub(super) replies_out: u64,
    pub(super) replied: BTreeSet<(PeerId, ExchangeId)>,
    /// Its dials not established yet: a Request on one rides in IK message 1.
    pub(super) dialing: BTreeSet<p2p_handler::ConnId>,
    /// Requests it sent in IK message 1.
    pub(super) early_out: u64,
    /// Requests in IK message 1 that reached its endpoint (not dropped or Nacked by a
    /// fault).
    pub(super) early_in: u64,
    /// Nacks it sent refusing a Request in IK message 1 (`EarlyRefused`).
    pub(super) early_refused_out: u64,
}

/// Everything hosts and the simulator share. Single-threaded in practice (turmoil runs
/// hosts one at a time); the mutex satisfies the handler's `Send + Sync` tap bound.
pub(super) struct Shared {
    pub(super) names: Vec<String>,
    pub(super) keys: Vec<Keypair>,
    pub(super) by_peer: BTreeMap<PeerId, usize>,
    pub(super) scenario: Scenario,
    pub(super) seed: u64,
    pub(super) nodes: Vec<NodeState>,
    pub(super) trace: Trace,
    pub(super) rules: Vec<Rule>,
    pub(super) waiting: Vec<Waiting>,
    pub(super) fired: VecDeque<usize>,
    pub(super) crash_requests: VecDeque<usize>,
    /// Nodes whose handler stopped on its own (its store failed), with their incarnation:
    /// their process exits, which the main loop carries out as a crash.
    pub(super) exits: VecDeque<(usize, u64)>,
    /// Exchange labels for the trace: (dialer, id) -> "alice#3".
    pub(super) labels: BTreeMap<(usize, ExchangeId), String>,
    pub(super) issued_count: Vec<u32>,
    /// (dialer, incarnation, id) -> outcome count. A durable node's exchanges outlive its
    /// incarnations: their incarnation is 0. Outcomes flagged `redelivered` count only when
    /// no outcome came before (the application may have taken it just before a crash).
    pub(super) outcomes: BTreeMap<(usize, u64, ExchangeId), u32>,
    /// (responder, incarnation, dialer peer, id) -> deliveries not flagged `redelivered`
    /// (incarnation 0 for durable responders, as for outcomes).
    pub(super) delivered: BTreeMap<(usize, u64, PeerId, ExchangeId), u32>,
    /// (responder, dialer peer, id) -> flagged redeliveries.
    pub(super) redelivered: BTreeMap<(usize, PeerId, ExchangeId), u32>,
    /// (responder, dialer peer, id) answered by the application (respond returned Ok).
    pub(super) answered: BTreeSet<(usize, PeerId, ExchangeId)>,
    /// (dialer, responder, id) whose Request the dialer saw acknowledged.
    pub(super) acked: BTreeSet<(usize, usize, ExchangeId)>,
    pub(super) replied: u64,
    pub(super) failures: Vec<String>,
    /// Steps the handler refused, with the reason.
    pub(super) refused: Vec<String>,
    /// What the run exercised.
    pub(super) coverage: BTreeSet<String>,
    /// Finer items, for exploration only (see [`crate::coverage::pair`] and
    /// [`crate::coverage::under`]): transition pairs, and transitions under a fault state.
    pub(super) explored: BTreeSet<String>,
    /// The last state of each exchange, per node and side: (node, outbound, peer, id).
    pub(super) last_state: BTreeMap<(usize, bool, PeerId, ExchangeId), &'static str>,
    /// Links cut by a partition or hold step and not repaired or released yet.
    pub(super) cut: BTreeSet<(String, String)>,
    /// Whether some link's (or the network's) fail rate is above zero (the main loop's
    /// copy of the timeline's view, for the fault state of exploration items).
    pub(super) lossy: bool,
    /// The healing phase's probe requests, and how those that failed failed.
    pub(super) probes: BTreeSet<(usize, ExchangeId)>,
    pub(super) probe_failures: Vec<String>,
    /// Deliveries of probes (not counted in `delivered` expectations).
    pub(super) probe_deliveries: BTreeSet<(usize, u64, PeerId, ExchangeId)>,
    pub(super) peer_errors: u64,
    pub(super) rate_limited: u64,
    /// Replies reported unconfirmed.
    pub(super) unconfirmed: u64,
    /// (node, dialer peer) -> requests its `manual` or `never` application holds, oldest
    /// first (what `respond` and `reject` steps act on).
    pub(super) pending: BTreeMap<(usize, PeerId), Vec<ExchangeId>>,
    /// Steps that did nothing (respond or reject with nothing pending, cancel of a finished
    /// exchange), with why: in a scenario's own run, a step that tested nothing fails it.
    pub(super) idle_steps: Vec<(usize, String)>,
    pub(super) last_outcome: Duration,
    /// When a message fault (drop, delay, corrupt, duplicate, Nack) last applied: for the
    /// liveness clock, a fault as much as a partition (a Reply dropped late costs the
    /// dialer a whole reply timeout).
    pub(super) last_message_fault: Duration,
    pub(super) errors: Vec<String>,
    /// Incarnations of memory-only nodes that stopped gracefully: unlike a crash, a stop
    /// hands every unfinished exchange back, so each still owes exactly one outcome.
    pub(super) stopped: BTreeSet<(usize, u64)>,
    /// Signed membership, with a `[membership]` table.
    pub(super) membership: Option<crate::membership::Registry>,
    pub(super) membership_refused: u64,
    pub(super) membership_forks: u64,
    /// Virtual time a node last applied a membership document.
    pub(super) last_membership: Duration,
    /// Virtual time a `membership` step last handed one over.
    pub(super) last_handed: Duration,
    /// Address records, with a `[records]` table.
    pub(super) records: Option<crate::records::Tracker>,
    /// The reference model every exchange is checked against.
    pub(super) model: super::model::Model,
    /// The hostile host's inbox (once it runs), and every attack of the run.
    pub(super) attacker: Option<mpsc::UnboundedSender<super::hostile::Attack>>,
    pub(super) attacks: Vec<super::hostile::AttackRecord>,
    /// Every peer error a node reported: when, which node, naming which peer.
    pub(super) peer_error_log: Vec<(Duration, usize, Option<PeerId>)>,
}

pub(super) fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

impl Shared {
    /// The state of a run that has not started: nodes down, nothing counted.
    pub(super) fn new(scenario: &Scenario, keys: Vec<Keypair>, seed: u64) -> Self {
        Self {
            by_peer: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.peer_id(), i))
                .collect(),
            names: scenario.nodes.iter().map(|n| n.name.clone()).collect(),
            keys,
            seed,
            nodes: scenario
                .nodes
                .iter()
                .map(|_| NodeState::default())
                .collect(),
            trace: Trace::default(),
            rules: Vec::new(),
            waiting: Vec::new(),
            fired: VecDeque::new(),
            crash_requests: VecDeque::new(),
            exits: VecDeque::new(),
            redelivered: BTreeMap::new(),
            answered: BTreeSet::new(),
            acked: BTreeSet::new(),
            labels: BTreeMap::new(),
            issued_count: vec![0; scenario.nodes.len()],
            outcomes: BTreeMap::new(),
            delivered: BTreeMap::new(),
            replied: 0,
            failures: Vec::new(),
            refused: Vec::new(),
            coverage: BTreeSet::new(),
            explored: BTreeSet::new(),
            last_state: BTreeMap::new(),
            cut: BTreeSet::new(),
            lossy: false,
            probes: BTreeSet::new(),
            probe_failures: Vec::new(),
            probe_deliveries: BTreeSet::new(),
            peer_errors: 0,
            rate_limited: 0,
            unconfirmed: 0,
            pending: BTreeMap::new(),
            idle_steps: Vec::new(),
            last_outcome: Duration::ZERO,
            errors: Vec::new(),
            last_message_fault: Duration::ZERO,
            stopped: BTreeSet::new(),
            membership: None,
            membership_refused: 0,
            membership_forks: 0,
            last_membership: Duration::ZERO,
            last_handed: Duration::ZERO,
            records: None,
            model: super::model::Model::new(
                scenario.nodes.iter().map(|n| n.name.clone()).collect(),
            ),
            attacker: None,
            attacks: Vec::new(),
            peer_error_log: Vec::new(),
            scenario: scenario.clone(),
        }
    }

    /// The incarnation exchanges of `node` are keyed by: 0 for a durable node, whose
    /// exchanges outlive its incarnations.
    pub(super) fn incarnation_key(&self, node: usize) -> u64 {
        if self.scenario.durable_of(node) {
            0
        } else {
            self.nodes[node].incarnation
        }
    }

    /// Step `step` found nothing to act on, for `why`: kept for the judge (a failure in the
    /// scenario's own run); returns `why` for the trace.
    pub(super) fn did_nothing(&mut self, step: usize, why: String) -> String {
        self.idle_steps.push((step, why.clone()));
        why
    }

    /// Which nodes are up, by index.
    pub(super) fn up(&self) -> Vec<bool> {
        self.nodes.iter().map(|n| n.up).collect()
    }

    /// The oldest request `node`'s application holds from `peer`.
    pub(super) fn oldest_pending(&self, node: usize, peer: PeerId) -> Option<ExchangeId> {
        self.pending.get(&(node, peer))?.first().copied()
    }

    /// `node`'s application no longer holds `peer`'s request `id` (answered, refused,
    /// timed out, aborted or cancelled).
    pub(super) fn settle_pending(&mut self, node: usize, peer: PeerId, id: ExchangeId) {
        if let Some(ids) = self.pending.get_mut(&(node, peer)) {
            ids.retain(|x| *x != id);
        }
    }

    /// Records an outcome; a redelivered one counts only if none came before. Returns
    /// whether it counted.
    /// Counts an outcome; false for a redelivered one already counted. A probe's outcome
    /// counts for exactly-once but not for the scenario's own counters and timing.
    pub(super) fn count_outcome(
        &mut self,
        node: usize,
        inc: u64,
        exchange: ExchangeId,
        again: bool,
    ) -> bool {
        let probe = self.probes.contains(&(node, exchange));
        let n = self.outcomes.entry((node, inc, exchange)).or_default();
        if again && *n > 0 {
            return false;
        }
        *n += 1;
        if probe {
            return false;
        }
        self.last_outcome = now();
        true
    }
}

impl Shared {
    pub(super) fn name(&self, peer: &PeerId) -> String {
        self.by_peer
            .get(peer)
            .map_or_else(|| peer.short(), |i| self.names[*i].clone())
    }

    /// The label of `dialer`'s exchange `id`, assigning the next one on first sight.
    pub(super) fn label_or_assign(&mut self, dialer: usize, id: ExchangeId) -> String {
        if let Some(label) = self.labels.get(&(dialer, id)) {
            return label.clone();
        }
        self.issued_count[dialer] += 1;
        let label = format!("{}#{}", self.names[dialer], self.issued_count[dialer]);
        self.labels.insert((dialer, id), label.clone());
        label
    }

    /// The label of `peer`'s exchange `id`, as seen by `node`, its responder.
    pub(super) fn inbound_label(&self, node: usize, peer: &PeerId, id: ExchangeId) -> String {
        self.label(self.by_peer.get(peer).copied().unwrap_or(node), id)
    }

    pub(super) fn label(&self, dialer: usize, id: ExchangeId) -> String {
        self.labels
            .get(&(dialer, id))
            .cloned()
            .unwrap_or_else(|| format!("{}:{id}", self.names[dialer]))
    }

    /// Describes a message, naming its exchange by label. `dialer` is the node that owns
    /// the exchange (the sender of Requests).
    pub(super) fn describe(&self, dialer: usize, message: &Message) -> String {
        let ex = |id: &ExchangeId| self.label(dialer, *id);
        match message {
            Message::Request {
                exchange,
                attempt,
                payload,
            } => format!(
                "Request {} try {attempt} ({} B)",
                ex(exchange),
                payload.len()
            ),
            Message::Ack {
                exchange,
                attempt,
                of,
            } => format!("Ack({of:?}) {} try {attempt}", ex(exchange)),
            Message::Nack {
                exchange,
                attempt,
                reason,
                ..
            } => format!("Nack({reason:?}) {} try {attempt}", ex(exchange)),
            Message::Reply {
                exchange,
                attempt,
                payload,
            } => format!("Reply {} try {attempt} ({} B)", ex(exchange), payload.len()),
            Message::Abort {
                exchange,
                attempt,
                reason,
            } => format!("Abort({reason:?}) {} try {attempt}", ex(exchange)),
            Message::Close { reason } => format!("Close({reason:?})"),
            Message::Progress {
                exchange,
                attempt,
                received,
            } => format!("Progress {} try {attempt} ({received} B in)", ex(exchange)),
            Message::Epoch { epoch, digest } => {
                format!(
                    "Epoch {epoch} ({})",
                    p2p_handler::membership::Digest(*digest).short()
                )
            }
            Message::Fetch { after } => format!("Fetch after {after}"),
            Message::Documents { docs } => format!("Documents ({} docs)", docs.len()),
            Message::RecordSeqs { seqs } => format!("RecordSeqs ({} held)", seqs.len()),
            Message::Records { records } => format!("Records ({})", records.len()),
        }
    }

    /// The faults in force, for exploration items: "" when none, else some of `cut`,
    /// `down`, `lossy`, `message` (a message fault still to apply), joined by `+`.
    pub(super) fn fault_state(&self) -> String {
        let mut parts = Vec::new();
        if !self.cut.is_empty() {
            parts.push("cut");
        }
        if self.nodes.iter().any(|n| !n.up) {
            parts.push("down");
        }
        if self.lossy {
            parts.push("lossy");
        }
        if self.rules.iter().any(|r| r.remaining > 0) {
            parts.push("message");
        }
        parts.join("+")
    }

    pub(super) fn push(&mut self, node: usize, what: What) {
        let name = self.names[node].clone();
        self.trace.push(now(), &name, what);
    }

    pub(super) fn rule_text(&self, step: usize) -> String {
        match self.scenario.step_lines.get(step).copied().unwrap_or(0) {
            0 => format!("step {}, drawn by [swarm]", step + 1),
            line => format!("step {}, line {line}", step + 1),
        }
    }

    /// Counts a message against waiting triggers; fired steps run after this tick.
    pub(super) fn count_triggers(&mut self, from: usize, to: usize, message: &Message, sent: bool) {
        for w in &mut self.waiting {
            if w.sent == sent && w.seen < w.nth && w.matches.matches(from, to, message) {
                w.seen += 1;
                if w.seen == w.nth {
                    self.fired.push_back(w.step);
                }
            }
        }
    }
}

/// Locks the shared state; a poisoned lock means a host panicked, which the run reports.
pub(super) fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
