//! Runs one scenario under one seed on turmoil and judges it.
//!
//! Each node is a turmoil host running the real handler (driver, Noise sessions, framing,
//! state machines) over [`TurmoilTransport`], plus a small simulated application. The
//! simulator drives turmoil step by step from outside: it executes timed steps, applies
//! faults, and relays step actions to the hosts through channels. A [`Tap`] in each node
//! records every message into the trace, counts triggers and applies message faults.
//!
//! One seed controls everything: turmoil's `rng_seed` (latency, loss), a fixed epoch, the
//! node keys, each handler's seed (exchange ids, jitter, ephemeral keys) and, in swarm mode,
//! the randomised latency, loss and step timing. Same scenario, same seed, same trace.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use p2p_handler::endpoint::Failure;
use p2p_handler::store::{Commit, KvOp, Row};
use p2p_handler::wire::{AckOf, ExchangeId, Message};
use p2p_handler::{
    AllowList, AllowedPeer, Arrival, ConnError, ConnEvent, Event, Handler, Inbox, Keypair,
    MemoryStore, Notice, Options, PeerId, Status, Store, StoreError, Tap, Verdict,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};

use crate::coverage;
use crate::scenario::{ActionKind, App, MessageMatch, MsgKind, NACK_REASON, Scenario, Step};
use crate::trace::{Trace, What};
use crate::transport::TurmoilTransport;

/// The port every node listens on.
pub const PORT: u16 = 7000;

/// Length of a simulation tick (turmoil's default).
const TICK: Duration = Duration::from_millis(1);

/// Extra virtual time after the last exchange, for idle connections to close.
const SETTLE_MARGIN: Duration = Duration::from_secs(2);

/// How often a quiet run asks the nodes whether anything is still open.
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// A node's simulated disk: survives crashes and restarts of its host. Under the storage
/// fault a commit takes virtual time, and a crash meanwhile drops it unapplied.
struct SimStore {
    rows: MemoryStore,
    latency: Option<Duration>,
}

impl Store for SimStore {
    fn load(&mut self) -> Result<Vec<Row>, StoreError> {
        self.rows.load()
    }

    fn commit(&mut self, ops: Vec<KvOp>) -> Commit {
        let mut rows = self.rows.clone();
        match self.latency {
            None => rows.commit(ops),
            Some(latency) => Box::pin(async move {
                tokio::time::sleep(latency).await;
                rows.commit(ops).await
            }),
        }
    }

    fn location(&self) -> String {
        "simulated disk".into()
    }
}

/// How a run went.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Scenario name.
    pub scenario: String,
    /// Seed used.
    pub seed: u64,
    /// Whether swarm randomisation was on.
    pub swarm: bool,
    /// Broken invariants and unmet expectations; empty when the run passed.
    pub failures: Vec<String>,
    /// Requests issued.
    pub exchanges: usize,
    /// Steps the handler refused (a request to oneself, a payload over the maximum...).
    pub refused: usize,
    /// Requests resent, all nodes.
    pub resends: u64,
    /// Redials, all nodes.
    pub redials: u64,
    /// Virtual time simulated.
    pub virtual_time: Duration,
    /// Wall-clock time taken.
    pub wall_time: Duration,
    /// What happened.
    pub trace: Trace,
    /// Node names, in order (for the diagram).
    pub nodes: Vec<String>,
    /// What the run exercised (see [`crate::coverage`]).
    pub coverage: BTreeSet<String>,
}

impl Outcome {
    /// Whether every invariant and expectation held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// A message fault armed by a step.
#[derive(Debug, Clone)]
struct Rule {
    step: usize,
    action: ActionKind,
    matches: Matcher,
    delay: Duration,
    remaining: u32,
}

/// A trigger waiting for its nth message.
#[derive(Debug, Clone)]
struct Waiting {
    step: usize,
    matches: Matcher,
    sent: bool,
    nth: u32,
    seen: u32,
}

/// A `MessageMatch` with node names resolved to indices.
#[derive(Debug, Clone)]
struct Matcher {
    kind: MsgKind,
    from: Option<usize>,
    to: Option<usize>,
    of: Option<MsgKind>,
    resend: Option<bool>,
}

impl Matcher {
    fn new(m: &MessageMatch, scenario: &Scenario) -> Self {
        let idx = |n: &Option<String>| n.as_deref().and_then(|n| scenario.node_index(n));
        Self {
            kind: m.kind,
            from: idx(&m.from),
            to: idx(&m.to),
            of: m.of,
            resend: m.resend,
        }
    }

    fn matches(&self, from: usize, to: usize, message: &Message) -> bool {
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

enum NodeCommand {
    Request {
        to: PeerId,
        /// `None`: by peer id alone (`request_to`), the address from records.
        addr: Option<SocketAddr>,
        payload: Bytes,
    },
    /// Records as the node's records directory would hand them over.
    OfferRecords {
        records: Vec<Bytes>,
    },
    Respond {
        peer: PeerId,
    },
    /// Allow the peer whose static key this is (nodes of one network know each other's
    /// keys, so they dial each other with IK).
    Allow {
        key: [u8; 32],
    },
    Revoke {
        peer: PeerId,
    },
    SetAllowList {
        keys: Vec<[u8; 32]>,
    },
    OfferMembership {
        document: Box<p2p_handler::membership::Signed>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    /// A graceful stop: drain, let started work finish within `grace`, shut down.
    Stop {
        grace: Duration,
    },
}

#[derive(Default)]
struct NodeState {
    incarnation: u64,
    /// Its disk, when the node is durable.
    store: Option<MemoryStore>,
    up: bool,
    commands: Option<mpsc::UnboundedSender<NodeCommand>>,
    /// Set before the node is crashed or bounced: its streams then close in order.
    crash_switch: Option<crate::transport::CrashSwitch>,
    /// Request copies seen by a `refuse` app, and requests by a `crash_prone` app.
    refused: u32,
    received: u32,
}

/// Everything hosts and the simulator share. Single-threaded in practice (turmoil runs
/// hosts one at a time); the mutex satisfies the handler's `Send + Sync` tap bound.
struct Shared {
    names: Vec<String>,
    keys: Vec<Keypair>,
    by_peer: BTreeMap<PeerId, usize>,
    scenario: Scenario,
    seed: u64,
    nodes: Vec<NodeState>,
    trace: Trace,
    rules: Vec<Rule>,
    waiting: Vec<Waiting>,
    fired: VecDeque<usize>,
    crash_requests: VecDeque<usize>,
    /// Exchange labels for the trace: (dialer, id) -> "alice#3".
    labels: BTreeMap<(usize, ExchangeId), String>,
    issued_count: Vec<u32>,
    /// (dialer, incarnation, id) -> outcome count. A durable node's exchanges outlive its
    /// incarnations: their incarnation is 0. Outcomes flagged `redelivered` count only when
    /// no outcome came before (the application may have taken it just before a crash).
    outcomes: BTreeMap<(usize, u64, ExchangeId), u32>,
    /// (responder, incarnation, dialer peer, id) -> deliveries not flagged `redelivered`
    /// (incarnation 0 for durable responders, as for outcomes).
    delivered: BTreeMap<(usize, u64, PeerId, ExchangeId), u32>,
    /// (responder, dialer peer, id) -> flagged redeliveries.
    redelivered: BTreeMap<(usize, PeerId, ExchangeId), u32>,
    /// (responder, dialer peer, id) answered by the application (respond returned Ok).
    answered: BTreeSet<(usize, PeerId, ExchangeId)>,
    /// (dialer, responder, id) whose Request the dialer saw acknowledged.
    acked: BTreeSet<(usize, usize, ExchangeId)>,
    /// (dialer, id) -> highest attempt sent.
    attempts: BTreeMap<(usize, ExchangeId), u32>,
    replied: u64,
    failures: Vec<String>,
    /// Steps the handler refused, with the reason.
    refused: Vec<String>,
    /// What the run exercised.
    coverage: BTreeSet<String>,
    /// The healing phase's probe requests, and how those that failed failed.
    probes: BTreeSet<(usize, ExchangeId)>,
    probe_failures: Vec<String>,
    /// Deliveries of probes (not counted in `delivered` expectations).
    probe_deliveries: BTreeSet<(usize, u64, PeerId, ExchangeId)>,
    peer_errors: u64,
    rate_limited: u64,
    last_outcome: Duration,
    errors: Vec<String>,
    /// Incarnations of memory-only nodes that stopped gracefully: unlike a crash, a stop
    /// hands every unfinished exchange back, so each still owes exactly one outcome.
    stopped: BTreeSet<(usize, u64)>,
    /// Signed membership, with a `[membership]` table.
    membership: Option<crate::membership::Registry>,
    membership_refused: u64,
    membership_forks: u64,
    /// Virtual time a node last applied a membership document.
    last_membership: Duration,
    /// Virtual time a `membership` step last handed one over.
    last_handed: Duration,
    /// Address records, with a `[records]` table.
    records: Option<crate::records::Tracker>,
}

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

impl Shared {
    /// The incarnation exchanges of `node` are keyed by: 0 for a durable node, whose
    /// exchanges outlive its incarnations.
    fn incarnation_key(&self, node: usize) -> u64 {
        if self.scenario.durable_of(node) {
            0
        } else {
            self.nodes[node].incarnation
        }
    }

    /// Records an outcome; a redelivered one counts only if none came before. Returns
    /// whether it counted.
    /// Counts an outcome; false for a redelivered one already counted. A probe's outcome
    /// counts for exactly-once but not for the scenario's own counters and timing.
    fn count_outcome(&mut self, node: usize, inc: u64, exchange: ExchangeId, again: bool) -> bool {
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
    fn name(&self, peer: &PeerId) -> String {
        self.by_peer
            .get(peer)
            .map_or_else(|| peer.short(), |i| self.names[*i].clone())
    }

    /// The label of `dialer`'s exchange `id`, assigning the next one on first sight.
    fn label_or_assign(&mut self, dialer: usize, id: ExchangeId) -> String {
        if let Some(label) = self.labels.get(&(dialer, id)) {
            return label.clone();
        }
        self.issued_count[dialer] += 1;
        let label = format!("{}#{}", self.names[dialer], self.issued_count[dialer]);
        self.labels.insert((dialer, id), label.clone());
        label
    }

    /// The label of `peer`'s exchange `id`, as seen by `node`, its responder.
    fn inbound_label(&self, node: usize, peer: &PeerId, id: ExchangeId) -> String {
        self.label(self.by_peer.get(peer).copied().unwrap_or(node), id)
    }

    fn label(&self, dialer: usize, id: ExchangeId) -> String {
        self.labels
            .get(&(dialer, id))
            .cloned()
            .unwrap_or_else(|| format!("{}:{id}", self.names[dialer]))
    }

    /// Describes a message, naming its exchange by label. `dialer` is the node that owns
    /// the exchange (the sender of Requests).
    fn describe(&self, dialer: usize, message: &Message) -> String {
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

    fn push(&mut self, node: usize, what: What) {
        let name = self.names[node].clone();
        self.trace.push(now(), &name, what);
    }

    fn rule_text(&self, step: usize) -> String {
        match self.scenario.step_lines.get(step).copied().unwrap_or(0) {
            0 => format!("step {}, drawn by [swarm]", step + 1),
            line => format!("step {}, line {line}", step + 1),
        }
    }

    /// Counts a message against waiting triggers; fired steps run after this tick.
    fn count_triggers(&mut self, from: usize, to: usize, message: &Message, sent: bool) {
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
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The node that owns the exchange a message belongs to: the dialer sends Requests and the
/// Ack of a Reply; everything else comes from the responder.
fn dialer_of(from: usize, to: usize, message: &Message) -> usize {
    match message {
        Message::Request { .. }
        | Message::Ack {
            of: AckOf::Reply, ..
        } => from,
        _ => to,
    }
}

struct SimTap {
    shared: Arc<Mutex<Shared>>,
    node: usize,
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
        if let Message::Request {
            exchange, attempt, ..
        } = message
        {
            let max = s.attempts.entry((from, *exchange)).or_insert(0);
            *max = (*max).max(*attempt);
        }
        let text = s.describe(dialer, message);
        let rule = s.rules.iter_mut().find(|r| {
            r.remaining > 0 && r.action != ActionKind::Nack && r.matches.matches(from, to, message)
        });
        let verdict = match rule {
            None => Verdict::Pass,
            Some(rule) => {
                rule.remaining -= 1;
                let (verdict, what) = match rule.action {
                    ActionKind::Drop => (Verdict::Drop, format!("drop {text}")),
                    ActionKind::Corrupt => (Verdict::Corrupt, format!("corrupt {text}")),
                    ActionKind::Duplicate => (
                        Verdict::Duplicate(rule.delay),
                        format!("duplicate {text} after {:?}", rule.delay),
                    ),
                    _ => (
                        Verdict::Delay(rule.delay),
                        format!("delay {text} by {:?}", rule.delay),
                    ),
                };
                let step = rule.step;
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
        if let Message::Ack {
            exchange,
            of: AckOf::Request,
            ..
        } = message
        {
            s.acked.insert((to, from, *exchange));
        }
        if !matches!(message, Message::Request { .. }) {
            return Arrival::Pass;
        }
        // A `refuse` application, or a `nack` step, answers with a Nack.
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
            return Arrival::Nack(NACK_REASON);
        }
        let rule = s.rules.iter_mut().find(|r| {
            r.remaining > 0 && r.action == ActionKind::Nack && r.matches.matches(from, to, message)
        });
        if let Some(rule) = rule {
            rule.remaining -= 1;
            let step = rule.step;
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
            return Arrival::Nack(NACK_REASON);
        }
        Arrival::Pass
    }

    fn dial(&self, conn: p2p_handler::ConnId, peer: PeerId, addr: SocketAddr) {
        let mut s = lock(&self.shared);
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
        let name = peer.map_or_else(|| "?".to_owned(), |p| s.name(&p));
        let text = match event {
            ConnEvent::Established { .. } => format!("{conn} established with {name}"),
            ConnEvent::Closed(closed) => {
                s.coverage.extend(coverage::closed(closed));
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
        s.push(self.node, What::State(text));
    }

    fn rejected(&self, error: &ConnError) {
        let mut s = lock(&self.shared);
        let text = error_text(&s, error);
        s.push(self.node, What::Conn(format!("rejected: {text}")));
    }
}

fn closed_text(closed: &p2p_handler::Closed) -> String {
    match closed {
        p2p_handler::Closed::ByPeer(r) => format!("by peer, {r:?}"),
        p2p_handler::Closed::Locally(r) => format!("locally, {r:?}"),
        p2p_handler::Closed::Error(e) => format!("error: {}", short_error(e)),
        p2p_handler::Closed::Io(e) => format!("io: {e}"),
    }
}

/// Error kinds without addresses or ids (which vary), for stable traces.
fn short_error(e: &ConnError) -> String {
    let text = format!("{e:?}");
    text.split([' ', '{', '('])
        .next()
        .unwrap_or("error")
        .to_owned()
}

fn error_text(s: &Shared, e: &ConnError) -> String {
    let who = e
        .remote()
        .peer
        .map_or_else(|| "unknown peer".to_owned(), |p| s.name(&p));
    format!("{} from {who}", short_error(e))
}

/// The turmoil host name at `addr` (inside a host, reverse lookup gives it).
fn host_of(addr: SocketAddr) -> String {
    turmoil::reverse_lookup(addr.ip()).unwrap_or_else(|| addr.ip().to_string())
}

fn failure_kind(failure: &Failure) -> String {
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

async fn node_main(shared: Arc<Mutex<Shared>>, node: usize) -> turmoil::Result {
    let (tx, mut commands) = mpsc::unbounded_channel();
    let (key, allow, config, seed, app, incarnation, store, sabotage) = {
        let mut s = lock(&shared);
        let durable = s.scenario.durable_of(node);
        let latency = s
            .scenario
            .storage_fault
            .then_some(s.scenario.commit_latency);
        let state = &mut s.nodes[node];
        state.incarnation += 1;
        state.up = true;
        state.received = 0;
        let incarnation = state.incarnation;
        let store = durable.then(|| SimStore {
            rows: state.store.get_or_insert_with(MemoryStore::new).clone(),
            latency,
        });
        let mut rng = ChaCha20Rng::seed_from_u64(s.seed);
        rng.set_stream(1 + node as u64 * 1000 + incarnation);
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let spec = &s.scenario.nodes[node];
        let allowed: Vec<[u8; 32]> = match &spec.allow {
            Some(names) => names
                .iter()
                .filter_map(|n| s.scenario.node_index(n))
                .map(|i| *s.keys[i].public_bytes())
                .collect(),
            None => s
                .keys
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != node)
                .map(|(_, k)| *k.public_bytes())
                .collect(),
        };
        // Members of one network know each other's keys: they dial each other with IK.
        let allow = if spec.know_keys {
            AllowList::from_keys(allowed)
        } else {
            AllowList::from_peers(allowed.iter().map(p2p_handler::PeerId::from_public_key))
        };
        let app = spec.app.clone();
        let config = s.scenario.config_of(node);
        let sabotage = s.scenario.sabotage;
        s.push(node, What::Start);
        let genesis = s.membership.as_mut().map(|m| {
            m.on_start(node, durable);
            m.genesis().clone()
        });
        let records = s.records.as_mut().map(|r| {
            r.on_start(node, durable);
            (r.listen_addr(node), r.ttl)
        });
        (
            s.keys[node].clone(),
            allow,
            config,
            seed,
            app,
            incarnation,
            store,
            (sabotage, genesis, records),
        )
    };
    let (sabotage, genesis, records) = sabotage;
    let tap = Arc::new(SimTap {
        shared: shared.clone(),
        node,
    });
    let port = records.map_or(PORT, |(addr, _)| addr.port());
    let listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
    // The wall clock is virtual too: a fixed epoch plus simulated time, so stored deadlines
    // replay identically.
    let wall: p2p_handler::WallClock =
        Arc::new(|| std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + now());
    let mut options = Options::new(config, seed)
        .incarnation(incarnation)
        .tap(tap)
        .wall_clock(wall);
    options.sabotage = sabotage;
    if let Some(genesis) = genesis {
        options = options.membership(genesis);
    }
    if let Some((addr, ttl)) = records {
        // No directory: members find each other from the document's first addresses and
        // pass records on among themselves.
        options = options.records(p2p_handler::records::RecordOptions {
            addresses: vec![addr],
            ttl,
            ..Default::default()
        });
    }
    if let Some(store) = store {
        options = options.store(store);
    }
    let transport = TurmoilTransport::new();
    lock(&shared).nodes[node].crash_switch = Some(transport.crashing());
    let (handler, mut inbox) = Handler::spawn_with(transport, listen, key, allow, options)
        .await
        .map_err(|e| e.to_string())?;
    // Listening: from now on the simulator may send this node commands.
    lock(&shared).nodes[node].commands = Some(tx);
    loop {
        tokio::select! {
            biased;
            command = commands.recv() => match command {
                Some(NodeCommand::Stop { grace }) => {
                    let node = Node { shared: &shared, index: node, handler: &handler, app: &app };
                    return stop(node, &mut commands, &mut inbox, grace).await;
                }
                Some(command) => run_command(&shared, node, &handler, command).await,
                None => break,
            },
            Some(event) = inbox.received.recv() => on_event(&shared, node, &handler, &app, event),
            Some(notice) = inbox.priority.recv() => on_notice(&shared, node, notice),
        }
    }
    Ok(())
}

/// How long a `stop` step lets started work finish when it names no grace.
const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// What a node's loop works with.
#[derive(Clone, Copy)]
struct Node<'a> {
    shared: &'a Arc<Mutex<Shared>>,
    index: usize,
    handler: &'a Handler,
    app: &'a App,
}

/// A graceful stop, as `p2p-node` does on SIGTERM: drain (new work is refused, started work
/// goes on, and the application goes on answering and taking steps), wait until nothing is
/// left or `grace` ran out, shut down. The application then reads what is left in its
/// inbox; our exchanges the shutdown failed come back in its report and count as their
/// outcomes. The node is down until a `restart`.
async fn stop(
    node: Node<'_>,
    commands: &mut mpsc::UnboundedReceiver<NodeCommand>,
    inbox: &mut Inbox,
    grace: Duration,
) -> turmoil::Result {
    let Node {
        shared,
        index,
        handler,
        app,
    } = node;
    let _ = handler.drain().await;
    let deadline = tokio::time::Instant::now() + grace;
    // Checked after each input, and every 10 ms of virtual time when none comes.
    while !handler.status().await.is_ok_and(|status| status.drained) {
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => break,
            Some(command) = commands.recv() => {
                // A second stop while stopping changes nothing.
                if !matches!(command, NodeCommand::Stop { .. }) {
                    run_command(shared, index, handler, command).await;
                }
            }
            Some(event) = inbox.received.recv() => on_event(shared, index, handler, app, event),
            Some(notice) = inbox.priority.recv() => on_notice(shared, index, notice),
            () = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    let report = handler.shutdown().await.map_err(|e| e.to_string())?;
    while let Ok(event) = inbox.received.try_recv() {
        on_event(shared, index, handler, app, event);
    }
    while let Ok(notice) = inbox.priority.try_recv() {
        on_notice(shared, index, notice);
    }
    for (peer, exchange, payload) in report.failed {
        let failed = Event::Failed {
            peer,
            exchange,
            payload,
            failure: Failure::ShuttingDown,
            redelivered: false,
        };
        on_notice(shared, index, Notice::Event(failed));
    }
    let mut s = lock(shared);
    let durable = s.scenario.durable_of(index);
    if !durable {
        let incarnation = s.incarnation_key(index);
        s.stopped.insert((index, incarnation));
    }
    let state = &mut s.nodes[index];
    state.up = false;
    state.commands = None;
    state.crash_switch = None;
    let unanswered = if durable {
        "kept for the next start"
    } else {
        "aborted"
    };
    s.push(
        index,
        What::App(format!(
            "stopped: {} unanswered request(s) {unanswered}, {} exchange(s) of ours kept",
            report.unanswered_requests, report.kept
        )),
    );
    Ok(())
}

async fn run_command(
    shared: &Arc<Mutex<Shared>>,
    node: usize,
    handler: &Handler,
    command: NodeCommand,
) {
    match command {
        NodeCommand::Request { to, addr, payload } => {
            let len = payload.len();
            let probe = payload == crate::swarm::PROBE.as_bytes();
            let result = match addr {
                Some(addr) => handler.request(to, addr, payload).await,
                None => handler.request_to(to, payload).await,
            };
            let mut s = lock(shared);
            let to_name = s.name(&to);
            match result {
                Ok(id) => {
                    if probe {
                        s.probes.insert((node, id));
                    }
                    let label = s.label_or_assign(node, id);
                    let incarnation = s.incarnation_key(node);
                    s.outcomes.insert((node, incarnation, id), 0);
                    s.push(
                        node,
                        What::App(format!("request {label} to {to_name} ({len} B)")),
                    );
                }
                Err(e) => {
                    let why = format!("request to {to_name} refused: {e}");
                    let who = s.names[node].clone();
                    s.refused.push(format!("{who}: {why}"));
                    s.push(node, What::App(why));
                }
            }
        }
        NodeCommand::Respond { peer } => {
            let result = handler
                .response(peer, Bytes::from_static(b"manual reply"))
                .await;
            let mut s = lock(shared);
            let name = s.name(&peer);
            let text = match result {
                Ok(id) => format!("respond to {}", s.inbound_label(node, &peer, id)),
                Err(e) => format!("respond to {name} failed: {e}"),
            };
            s.push(node, What::App(text));
        }
        NodeCommand::Allow { key } => {
            let entry = AllowedPeer {
                public_key: Some(key),
                ..AllowedPeer::default()
            };
            let _ = handler
                .allow(p2p_handler::PeerId::from_public_key(&key), entry)
                .await;
        }
        NodeCommand::Revoke { peer } => {
            let _ = handler.revoke(peer).await;
        }
        NodeCommand::SetAllowList { keys } => {
            if let Ok(removed) = handler.set_allow_list(AllowList::from_keys(keys)).await {
                let mut s = lock(shared);
                let names: Vec<String> = removed.iter().map(|p| s.name(p)).collect();
                if !names.is_empty() {
                    s.push(
                        node,
                        What::App(format!("allow list removed {}", names.join(", "))),
                    );
                }
            }
        }
        NodeCommand::Status { reply } => {
            if let Ok(status) = handler.status().await {
                let _ = reply.send(status);
            }
        }
        NodeCommand::OfferMembership { document } => {
            let epoch = document.epoch();
            let text = match handler.offer_membership(*document).await {
                Ok(applied) if applied.is_empty() => {
                    format!("membership epoch {epoch}: held already")
                }
                Ok(_) => format!("membership epoch {epoch} offered: accepted"),
                Err(p2p_handler::HandlerError::MembershipRefused(refused)) => format!(
                    "membership epoch {epoch} offered: refused ({})",
                    refused
                        .reasons
                        .iter()
                        .map(|r| r.code())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Err(e) => format!("membership epoch {epoch} offered: {e}"),
            };
            lock(shared).push(node, What::App(text));
        }
        NodeCommand::OfferRecords { records } => {
            let count = records.len();
            let text = match handler.offer_records(records).await {
                Ok(taken) => format!("offered {count} record(s) as its directory: {taken} taken"),
                Err(e) => format!("offered {count} record(s): {e}"),
            };
            lock(shared).push(node, What::App(text));
        }
        // Handled by the node's loop, which ends with it.
        NodeCommand::Stop { .. } => {}
    }
}

fn on_event(shared: &Arc<Mutex<Shared>>, node: usize, handler: &Handler, app: &App, event: Event) {
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
            let again = if redelivered { ", redelivered" } else { "" };
            s.push(
                node,
                What::Event(format!("request {label} ({} B{again})", payload.len())),
            );
            s.nodes[node].received += 1;
            let mut reply = b"re:".to_vec();
            reply.extend_from_slice(&payload);
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
                App::Never | App::Manual => None,
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
        Event::ResponseDelivered { peer, exchange } => {
            let label = s.inbound_label(node, &peer, exchange);
            s.push(node, What::Event(format!("reply {label} delivered")));
        }
        other => {
            drop(s);
            on_notice(shared, node, Notice::Event(other));
        }
    }
}

fn on_notice(shared: &Arc<Mutex<Shared>>, node: usize, notice: Notice) {
    let mut s = lock(shared);
    let incarnation = s.incarnation_key(node);
    let text = match notice {
        Notice::Event(Event::Failed {
            exchange,
            failure,
            payload,
            redelivered,
            ..
        }) => {
            let label = s.label(node, exchange);
            let kind = failure_kind(&failure);
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
        Notice::Event(Event::ResponseTimedOut { peer, exchange }) => {
            format!(
                "response timed out for {}",
                s.inbound_label(node, &peer, exchange)
            )
        }
        Notice::Event(Event::ResponseAborted {
            peer,
            exchange,
            reason,
        }) => {
            format!(
                "response aborted for {} ({reason:?})",
                s.inbound_label(node, &peer, exchange)
            )
        }
        Notice::Event(Event::ResponseCancelled { peer, exchange }) => {
            format!(
                "response cancelled for {}",
                s.inbound_label(node, &peer, exchange)
            )
        }
        Notice::Event(Event::ResponseUnconfirmed { peer, exchange }) => {
            format!(
                "reply {} unconfirmed",
                s.inbound_label(node, &peer, exchange)
            )
        }
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
fn membership_event(s: &mut Shared, node: usize, event: &p2p_handler::MembershipEvent) -> String {
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
        other => format!("{other}"),
    }
}

/// A timed or triggered step, ready to run.
struct Timeline {
    /// (virtual time, step index), in time order.
    timed: VecDeque<(Duration, usize)>,
    /// (virtual time, node) restarts scheduled by crash-prone apps.
    restarts: Vec<(Duration, usize)>,
    /// Virtual time of the last fault or heal.
    last_fault: Duration,
}

/// Runs `scenario` under `seed`. With `swarm`, latency, loss and step timing are
/// randomised from the seed too.
pub fn run(scenario: &Scenario, seed: u64, swarm: bool) -> Outcome {
    let started = Instant::now();
    let mut scenario = scenario.clone();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    if swarm {
        // From a stream of its own: the keys and everything after them are the same with
        // and without swarm, so a swarm run written out as explicit steps replays exactly.
        randomise(&mut scenario, &mut swarm_rng(seed));
    }
    if let Some(plan) = scenario.swarm.clone() {
        for step in crate::swarm::draw(&scenario, &plan, seed) {
            scenario.push_drawn(step);
        }
    }
    if scenario.probes {
        // After the last timed step: by then every fault the file writes is healed.
        let last = scenario
            .steps
            .iter()
            .filter_map(|s| s.get_ref().at)
            .max()
            .unwrap_or_default();
        for step in crate::swarm::probe_steps(&scenario, last + Duration::from_millis(500)) {
            scenario.push_drawn(step);
        }
        scenario.probes = false;
    }
    let keys: Vec<Keypair> = scenario
        .nodes
        .iter()
        .map(|_| Keypair::generate(&mut rng))
        .collect();
    let names: Vec<String> = scenario.nodes.iter().map(|n| n.name.clone()).collect();
    let shared = Arc::new(Mutex::new(Shared {
        by_peer: keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.peer_id(), i))
            .collect(),
        names: names.clone(),
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
        redelivered: BTreeMap::new(),
        answered: BTreeSet::new(),
        acked: BTreeSet::new(),
        labels: BTreeMap::new(),
        issued_count: vec![0; scenario.nodes.len()],
        outcomes: BTreeMap::new(),
        delivered: BTreeMap::new(),
        attempts: BTreeMap::new(),
        replied: 0,
        failures: Vec::new(),
        refused: Vec::new(),
        coverage: BTreeSet::new(),
        probes: BTreeSet::new(),
        probe_failures: Vec::new(),
        probe_deliveries: BTreeSet::new(),
        peer_errors: 0,
        rate_limited: 0,
        last_outcome: Duration::ZERO,
        errors: Vec::new(),
        stopped: BTreeSet::new(),
        membership: None,
        membership_refused: 0,
        membership_forks: 0,
        last_membership: Duration::ZERO,
        last_handed: Duration::ZERO,
        records: None,
        scenario: scenario.clone(),
    }));
    // The longest a connection can legitimately stay open once nothing is pending: a reply
    // waiting for its Ack, then the idle timeout. Runs end early when nothing is open.
    let settle = (0..scenario.nodes.len())
        .map(|i| {
            let c = scenario.config_of(i);
            c.response_timeout + c.reply_ack_timeout + c.idle_timeout + c.connect_timeout
        })
        .max()
        .unwrap_or_default()
        + SETTLE_MARGIN;
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        .tick_duration(TICK)
        .simulation_duration(scenario.duration + settle + Duration::from_secs(60))
        .min_message_latency(scenario.network.min_latency)
        .max_message_latency(scenario.network.max_latency)
        .fail_rate(scenario.network.fail_rate)
        .repair_rate(scenario.network.repair_rate)
        .build();
    for (i, name) in names.iter().enumerate() {
        let shared = shared.clone();
        sim.host(name.as_str(), move || node_main(shared.clone(), i));
    }
    let mut failures = Vec::new();
    if let Some(plan) = &scenario.membership {
        let addrs: Vec<SocketAddr> = names
            .iter()
            .map(|n| SocketAddr::new(sim.lookup(n.as_str()), PORT))
            .collect();
        let mut s = lock(&shared);
        match crate::membership::Registry::new(plan, &scenario, &s.keys, &addrs, seed) {
            Ok(registry) => s.membership = Some(registry),
            Err(e) => failures.push(e),
        }
        if let Some(plan) = &scenario.records {
            let ips = addrs.iter().map(SocketAddr::ip).collect();
            s.records = Some(crate::records::Tracker::new(plan, ips, PORT));
        }
    }
    for link in &scenario.network.links {
        if let Some(latency) = link.latency {
            sim.set_link_latency(link.a.as_str(), link.b.as_str(), latency);
        }
        if let Some(rate) = link.fail_rate {
            sim.set_link_fail_rate(link.a.as_str(), link.b.as_str(), rate);
        }
    }
    let mut timeline = Timeline {
        timed: VecDeque::new(),
        restarts: Vec::new(),
        last_fault: Duration::ZERO,
    };
    {
        let mut s = lock(&shared);
        let mut timed: Vec<(Duration, usize)> = Vec::new();
        for (i, step) in scenario.steps.iter().enumerate() {
            let step = step.get_ref();
            match &step.on {
                Some(trigger) => s.waiting.push(Waiting {
                    step: i,
                    matches: Matcher::new(&trigger.message, &scenario),
                    sent: trigger.sent,
                    nth: trigger.nth.max(1),
                    seen: 0,
                }),
                None => timed.push((step.at.unwrap_or_default(), i)),
            }
        }
        timed.sort_by_key(|(at, i)| (*at, *i));
        timeline.timed = timed.into();
    }
    // Let every node bind its listener before the timeline starts.
    for _ in 0..1_000 {
        if lock(&shared).nodes.iter().all(|n| n.commands.is_some()) {
            break;
        }
        if let Err(e) = sim.step() {
            failures.push(format!("simulation error while starting: {e}"));
            break;
        }
    }
    let mut quiet_since: Option<Duration> = None;
    let mut records_behind_since: Option<Duration> = None;
    let mut records_late = false;
    let mut probe: Option<Vec<Option<oneshot::Receiver<Status>>>> = None;
    let mut probe_clean = true;
    let mut last_probe = Duration::ZERO;
    let limit = scenario.duration;
    loop {
        let now = sim.elapsed();
        run_due_steps(&mut sim, &shared, &scenario, &mut timeline, now);
        let (pending, busy) = {
            let s = lock(&shared);
            let pending = pending_exchanges(&s);
            let up: Vec<bool> = s.nodes.iter().map(|n| n.up).collect();
            // Members still behind the newest document keep the run going (until the
            // time limit, where the convergence invariant reports them).
            let records_behind = s.records.as_ref().map(|r| r.behind(&up));
            let spreading = s
                .membership
                .as_ref()
                .is_some_and(|m| !m.behind(&up).is_empty())
                || records_behind.as_ref().is_some_and(|b| !b.is_empty());
            // Invariant (records, liveness): once faults heal, a record reaches every node
            // up within `liveness` (a refresh makes nodes briefly behind: each episode is
            // measured from its start, or from the last fault if later).
            match records_behind {
                Some(behind) if !behind.is_empty() => {
                    let since = *records_behind_since.get_or_insert(now);
                    let from = since.max(timeline.last_fault);
                    if now > from + scenario.liveness && !records_late {
                        records_late = true;
                        let (receiver, owner) = behind[0];
                        failures.push(format!(
                            "liveness: {} still lacked {}'s newest record at {now:?}, more \
                             than {:?} after {from:?}",
                            s.names[receiver], s.names[owner], scenario.liveness
                        ));
                    }
                }
                _ => records_behind_since = None,
            }
            let busy = !timeline.timed.is_empty()
                || !timeline.restarts.is_empty()
                || !s.fired.is_empty()
                || !s.crash_requests.is_empty()
                || spreading;
            (pending, busy)
        };
        if pending == 0 && !busy {
            let since = *quiet_since.get_or_insert(now);
            if now >= since + settle {
                break;
            }
            // Quiet: stop as soon as every node reports nothing open, rather than always
            // waiting out the idle timeout.
            match &mut probe {
                Some(receivers) if receivers.iter().all(|r| r.is_none()) => {
                    if probe_clean {
                        break;
                    }
                    probe = None;
                }
                Some(receivers) => {
                    for r in receivers.iter_mut() {
                        if let Some(rx) = r
                            && let Ok(status) = rx.try_recv()
                        {
                            probe_clean &= status.open_connections == 0
                                && status.connection_tasks == 0
                                && status.pending_responses == 0;
                            *r = None;
                        }
                    }
                }
                None if now >= last_probe + PROBE_EVERY => {
                    last_probe = now;
                    probe_clean = true;
                    probe = Some(request_statuses(&shared));
                }
                None => {}
            }
        } else {
            quiet_since = None;
            probe = None;
        }
        if now >= limit {
            if pending > 0 {
                failures.push(format!(
                    "liveness: {pending} exchange(s) still pending at the time limit ({limit:?})"
                ));
            }
            break;
        }
        if let Err(e) = sim.step() {
            failures.push(format!("simulation error: {e}"));
            break;
        }
    }
    let end = sim.elapsed();
    let statuses = collect_statuses(&mut sim, &shared);
    let s = lock(&shared);
    check(&scenario, &s, &statuses, &timeline, !swarm, &mut failures);
    failures.extend(s.errors.iter().cloned());
    Outcome {
        scenario: scenario.name.clone(),
        seed,
        swarm,
        failures,
        exchanges: s.outcomes.len(),
        refused: s.refused.len(),
        resends: statuses.iter().flatten().map(|st| st.stats.resends).sum(),
        redials: statuses.iter().flatten().map(|st| st.stats.redials).sum(),
        virtual_time: end,
        wall_time: started.elapsed(),
        trace: s.trace.clone(),
        nodes: names,
        coverage: s.coverage.clone(),
    }
}

/// Exchanges issued by live incarnations that have no outcome yet.
fn pending_exchanges(s: &Shared) -> usize {
    s.outcomes
        .iter()
        .filter(|((node, inc, _), n)| {
            **n == 0 && s.nodes[*node].up && s.incarnation_key(*node) == *inc
        })
        .count()
}

fn run_due_steps(
    sim: &mut turmoil::Sim<'_>,
    shared: &Arc<Mutex<Shared>>,
    scenario: &Scenario,
    timeline: &mut Timeline,
    now: Duration,
) {
    let mut due: Vec<usize> = Vec::new();
    while timeline.timed.front().is_some_and(|(at, _)| *at <= now) {
        if let Some((_, i)) = timeline.timed.pop_front() {
            due.push(i);
        }
    }
    let (fired, crashes): (Vec<usize>, Vec<usize>) = {
        let mut s = lock(shared);
        (
            s.fired.drain(..).collect(),
            s.crash_requests.drain(..).collect(),
        )
    };
    due.extend(fired);
    for i in due {
        if let Some(step) = scenario.steps.get(i) {
            execute(sim, shared, scenario, timeline, i, step.get_ref(), now);
        }
    }
    for node in crashes {
        let restart_after = match scenario.nodes[node].app {
            App::CrashProne { restart_after, .. } => restart_after,
            _ => Duration::ZERO,
        };
        crash(sim, shared, node, "app is crash-prone".into());
        timeline.restarts.push((now + restart_after, node));
        timeline.last_fault = now;
    }
    let (ready, later): (Vec<_>, Vec<_>) = timeline.restarts.iter().partition(|(at, _)| *at <= now);
    timeline.restarts = later;
    for (_, node) in ready {
        restart(sim, shared, node, "crash-prone app restarts".into());
        timeline.last_fault = now;
    }
}

fn crash(sim: &mut turmoil::Sim<'_>, shared: &Arc<Mutex<Shared>>, node: usize, rule: String) {
    let name = {
        let mut s = lock(shared);
        s.nodes[node].up = false;
        s.nodes[node].commands = None;
        if let Some(switch) = s.nodes[node].crash_switch.take() {
            switch.set();
        }
        let name = s.names[node].clone();
        s.trace.push(
            sim.elapsed(),
            "sim",
            What::Fault {
                what: format!("crash {name}"),
                rule,
                link: None,
            },
        );
        name
    };
    sim.crash(name.as_str());
}

fn restart(sim: &mut turmoil::Sim<'_>, shared: &Arc<Mutex<Shared>>, node: usize, rule: String) {
    let name = {
        let mut s = lock(shared);
        // A node still up is crashed by the bounce: its streams close in order too.
        if let Some(switch) = s.nodes[node].crash_switch.take() {
            switch.set();
        }
        let name = s.names[node].clone();
        s.trace.push(
            sim.elapsed(),
            "sim",
            What::Fault {
                what: format!("restart {name}"),
                rule,
                link: None,
            },
        );
        name
    };
    sim.bounce(name.as_str());
}

/// The record an `offer_record` step hands over, and how the trace says it.
fn offer_record(
    s: &mut Shared,
    step: &Step,
    owner: usize,
    forger: usize,
) -> Result<(String, Bytes), String> {
    let tracker = s.records.as_ref().ok_or("no [records] table")?;
    let owner_name = s.names[owner].clone();
    match step.record.as_deref() {
        Some("previous") => {
            let published = tracker.published(owner);
            let [.., (seq, bytes), _] = published else {
                return Err(format!(
                    "{owner_name} published {} record(s): no previous one to replay",
                    published.len()
                ));
            };
            Ok((
                format!("hand {owner_name}'s previous record (seq {seq}) again"),
                bytes.clone(),
            ))
        }
        _ => {
            let document = s
                .membership
                .as_ref()
                .ok_or("no [membership] table")?
                .newest()
                .document()
                .clone();
            let signer = p2p_handler::records::RecordSigner::new(&s.keys[forger]);
            let issued = 1_700_000_000 + now().as_secs();
            let mut addr = tracker.listen_addr(forger);
            addr.set_port(addr.port().wrapping_add(1).max(1));
            let record = p2p_handler::records::Record {
                seq: u64::MAX / 2,
                issued,
                expires: issued + 600,
                addresses: vec![addr],
            };
            let mut rng = ChaCha20Rng::seed_from_u64(s.seed);
            rng.set_stream(0x7265_636f);
            let owner_key = *s.keys[owner].public_bytes();
            let sealed =
                p2p_handler::records::forge(&owner_key, &signer, &record, &document, &mut rng)
                    .map_err(|e| e.to_string())?;
            Ok((
                format!(
                    "hand a record of {owner_name} forged by {} (naming {addr})",
                    s.names[forger]
                ),
                sealed.bytes().clone(),
            ))
        }
    }
}

fn execute(
    sim: &mut turmoil::Sim<'_>,
    shared: &Arc<Mutex<Shared>>,
    scenario: &Scenario,
    timeline: &mut Timeline,
    index: usize,
    step: &Step,
    now: Duration,
) {
    let idx = |n: &Option<String>| {
        n.as_deref()
            .and_then(|n| scenario.node_index(n))
            .unwrap_or(0)
    };
    let name = |n: &Option<String>| n.clone().unwrap_or_default();
    let rule = lock(shared).rule_text(index);
    lock(shared).coverage.insert(coverage::step(step.action));
    if step.action.is_fault() || step.action.is_heal() {
        timeline.last_fault = now;
    }
    let fault = |what: String| {
        let mut s = lock(shared);
        s.trace.push(
            now,
            "sim",
            What::Fault {
                what,
                rule: rule.clone(),
                link: None,
            },
        );
    };
    let send = |node: usize, command: NodeCommand| {
        let s = lock(shared);
        match &s.nodes[node].commands {
            Some(tx) if s.nodes[node].up => tx.send(command).is_ok(),
            _ => false,
        }
    };
    let peer = |i: usize| lock(shared).keys[i].peer_id();
    let key = |i: usize| *lock(shared).keys[i].public_bytes();
    let addr = |i: usize| SocketAddr::new(sim.lookup(scenario.nodes[i].name.as_str()), PORT);
    // With records, requests go by peer id alone: the address comes from records.
    let by_id = scenario.records.is_some();
    use ActionKind as A;
    match step.action {
        A::Request => {
            let (from, to) = (idx(&step.from), idx(&step.to));
            let target = step.via.as_ref().map_or(to, |v| idx(&Some(v.clone())));
            let payload = match (step.size, &step.payload) {
                (Some(n), _) => Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>()),
                (None, Some(p)) => Bytes::from(p.clone()),
                (None, None) => Bytes::from(format!("hello from {}", name(&step.from))),
            };
            for _ in 0..step.count.unwrap_or(1) {
                let command = NodeCommand::Request {
                    to: peer(to),
                    addr: (!by_id || step.via.is_some()).then(|| addr(target)),
                    payload: payload.clone(),
                };
                if !send(from, command) {
                    fault(format!(
                        "request from {} skipped: node is down",
                        name(&step.from)
                    ));
                }
            }
        }
        A::Respond => {
            let _ = send(
                idx(&step.node),
                NodeCommand::Respond {
                    peer: peer(idx(&step.to)),
                },
            );
        }
        A::Allow => {
            let _ = send(
                idx(&step.node),
                NodeCommand::Allow {
                    key: key(idx(&step.to)),
                },
            );
            lock(shared).trace.push(
                now,
                &name(&step.node),
                What::App(format!("allow {}", name(&step.to))),
            );
        }
        A::Revoke => {
            let _ = send(
                idx(&step.node),
                NodeCommand::Revoke {
                    peer: peer(idx(&step.to)),
                },
            );
            lock(shared).trace.push(
                now,
                &name(&step.node),
                What::App(format!("revoke {}", name(&step.to))),
            );
        }
        A::AllowList => {
            let names: Vec<String> = step.peers.iter().flatten().cloned().collect();
            let keys = names.iter().map(|n| key(idx(&Some(n.clone())))).collect();
            let _ = send(idx(&step.node), NodeCommand::SetAllowList { keys });
            lock(shared).trace.push(
                now,
                &name(&step.node),
                What::App(format!("allow list [{}]", names.join(", "))),
            );
        }
        A::Partition => {
            fault(format!("partition {} | {}", name(&step.a), name(&step.b)));
            sim.partition(name(&step.a).as_str(), name(&step.b).as_str());
        }
        A::PartitionOneway => {
            fault(format!(
                "partition {} -> {}",
                name(&step.from),
                name(&step.to)
            ));
            sim.partition_oneway(name(&step.from).as_str(), name(&step.to).as_str());
        }
        A::Hold => {
            fault(format!("hold {} | {}", name(&step.a), name(&step.b)));
            sim.hold(name(&step.a).as_str(), name(&step.b).as_str());
        }
        A::Release => {
            fault(format!("release {} | {}", name(&step.a), name(&step.b)));
            sim.release(name(&step.a).as_str(), name(&step.b).as_str());
        }
        A::Repair => {
            fault(format!("repair {} | {}", name(&step.a), name(&step.b)));
            sim.repair(name(&step.a).as_str(), name(&step.b).as_str());
        }
        A::RepairOneway => {
            fault(format!("repair {} -> {}", name(&step.from), name(&step.to)));
            sim.repair_oneway(name(&step.from).as_str(), name(&step.to).as_str());
        }
        A::Membership => {
            let node = idx(&step.node);
            let made = {
                let mut s = lock(shared);
                match s.membership.as_mut() {
                    Some(m) => m.make(step, scenario),
                    None => Err("no [membership] table".to_owned()),
                }
            };
            match made {
                Ok(document) => {
                    let text = format!(
                        "hand membership epoch {} ({}) signed by {} to {}",
                        document.epoch(),
                        document.digest().short(),
                        document.signatures().len(),
                        name(&step.node)
                    );
                    let mut s = lock(shared);
                    s.trace.push(now, &name(&step.node), What::App(text));
                    s.last_handed = now;
                    drop(s);
                    let document = Box::new(document);
                    if !send(node, NodeCommand::OfferMembership { document }) {
                        fault(format!(
                            "membership for {} skipped: node is down",
                            name(&step.node)
                        ));
                    }
                }
                Err(e) => lock(shared).errors.push(format!("step {}: {e}", index + 1)),
            }
        }
        A::Crash => crash(sim, shared, idx(&step.node), rule.clone()),
        A::Stop => {
            let grace = step.grace.unwrap_or(DEFAULT_GRACE);
            if send(idx(&step.node), NodeCommand::Stop { grace }) {
                fault(format!("stop {} (grace {grace:?})", name(&step.node)));
            }
        }
        A::Restart => {
            if let Some(port) = step.port
                && let Some(r) = lock(shared).records.as_mut()
            {
                r.move_to(idx(&step.node), port);
            }
            restart(sim, shared, idx(&step.node), rule.clone())
        }
        A::OfferRecord => {
            let (receiver, owner) = (idx(&step.node), idx(&step.to));
            let record = {
                let mut s = lock(shared);
                offer_record(&mut s, step, owner, idx(&step.from))
            };
            match record {
                Ok((text, bytes)) => {
                    lock(shared)
                        .trace
                        .push(now, &name(&step.node), What::App(text));
                    if !send(
                        receiver,
                        NodeCommand::OfferRecords {
                            records: vec![bytes],
                        },
                    ) {
                        fault(format!(
                            "record for {} skipped: node is down",
                            name(&step.node)
                        ));
                    }
                }
                Err(e) => lock(shared).errors.push(format!("step {}: {e}", index + 1)),
            }
        }
        A::Latency => {
            let latency = step.latency.unwrap_or_default();
            fault(format!(
                "latency {} | {} = {latency:?}",
                name(&step.a),
                name(&step.b)
            ));
            sim.set_link_latency(name(&step.a).as_str(), name(&step.b).as_str(), latency);
        }
        A::FailRate => {
            let rate = step.rate.unwrap_or_default();
            fault(format!(
                "fail rate {} | {} = {rate}",
                name(&step.a),
                name(&step.b)
            ));
            sim.set_link_fail_rate(name(&step.a).as_str(), name(&step.b).as_str(), rate);
        }
        A::Drop | A::Delay | A::Duplicate | A::Corrupt | A::Nack => {
            if let Some(m) = &step.matches {
                let mut s = lock(shared);
                s.rules.push(Rule {
                    step: index,
                    action: step.action,
                    matches: Matcher::new(m, scenario),
                    delay: step.by.unwrap_or_default(),
                    remaining: step.count.unwrap_or(1),
                });
            }
        }
    }
}

/// Sends a status request to every running node.
fn request_statuses(shared: &Arc<Mutex<Shared>>) -> Vec<Option<oneshot::Receiver<Status>>> {
    let s = lock(shared);
    s.nodes
        .iter()
        .map(|n| {
            let tx = n.commands.as_ref().filter(|_| n.up)?;
            let (reply, rx) = oneshot::channel();
            tx.send(NodeCommand::Status { reply }).ok()?;
            Some(rx)
        })
        .collect()
}

/// Asks every running node for its status, stepping the simulation until they answer.
fn collect_statuses(
    sim: &mut turmoil::Sim<'_>,
    shared: &Arc<Mutex<Shared>>,
) -> Vec<Option<Status>> {
    let mut receivers = request_statuses(shared);
    let mut statuses: Vec<Option<Status>> = vec![None; receivers.len()];
    for _ in 0..10_000 {
        for (i, rx) in receivers.iter_mut().enumerate() {
            if let Some(r) = rx
                && let Ok(status) = r.try_recv()
            {
                statuses[i] = Some(status);
                *rx = None;
            }
        }
        if receivers.iter().all(Option::is_none) || sim.step().is_err() {
            break;
        }
    }
    statuses
}

fn check(
    scenario: &Scenario,
    s: &Shared,
    statuses: &[Option<Status>],
    timeline: &Timeline,
    expectations: bool,
    failures: &mut Vec<String>,
) {
    // Invariant: no request reaches an application twice.
    for ((node, _, peer, exchange), n) in &s.delivered {
        if *n > 1 {
            let dialer = s.by_peer.get(peer).copied().unwrap_or(*node);
            failures.push(format!(
                "duplicate: {} delivered {} times to {}",
                s.label(dialer, *exchange),
                n,
                s.names[*node]
            ));
        }
    }
    // Invariant: every request ends in exactly one reply or failure (unless its node died).
    for ((node, inc, exchange), n) in &s.outcomes {
        // A durable node's exchange outlives a crash: its outcome is owed after a restart.
        // A memory node's dies with a crash, but a graceful stop hands it back.
        let alive = (s.nodes[*node].up && s.incarnation_key(*node) == *inc)
            || s.stopped.contains(&(*node, *inc));
        if *n > 1 || (*n == 0 && alive) {
            failures.push(format!(
                "exchange {} ended {} times (exactly once expected)",
                s.label(*node, *exchange),
                n
            ));
        }
    }
    // Invariant: nothing acknowledged is lost: a request the dialer saw acknowledged by a
    // durable responder reached that responder's application (in some incarnation).
    for (dialer, responder, exchange) in &s.acked {
        let peer = s.keys[*dialer].peer_id();
        let reached = s
            .delivered
            .keys()
            .any(|(n, _, p, x)| n == responder && *p == peer && x == exchange);
        if s.scenario.durable_of(*responder) && !reached {
            failures.push(format!(
                "lost: {} was acknowledged by {} but never reached its application",
                s.label(*dialer, *exchange),
                s.names[*responder]
            ));
        }
    }
    // Invariant: resends stay within the configured bound.
    for ((node, exchange), attempt) in &s.attempts {
        let max = scenario.config_of(*node).max_attempts;
        if *attempt > max {
            failures.push(format!(
                "{} was sent {attempt} times; max_attempts is {max}",
                s.label(*node, *exchange)
            ));
        }
    }
    // Invariant: no connection or task leaks at the end.
    let open: u64 = statuses
        .iter()
        .flatten()
        .map(|st| st.open_connections as u64)
        .sum();
    let tasks: u64 = statuses
        .iter()
        .flatten()
        .map(|st| st.connection_tasks as u64)
        .sum();
    match scenario.expect.open_connections {
        Some(count) if !count.holds(open) => failures.push(format!(
            "open connections at the end: {open}, expected {count}"
        )),
        Some(_) => {}
        None if open > 0 || tasks > 0 => failures.push(format!(
            "leak: {open} connection(s) and {tasks} connection task(s) still open at the end"
        )),
        None => {}
    }
    for (i, status) in statuses.iter().enumerate() {
        if status.is_none() && s.nodes[i].up {
            failures.push(format!("{} did not report its status", s.names[i]));
        }
    }
    // Invariant: progress once healed. Probes sent after the last heal must be answered:
    // a failure ends an exchange but is not progress.
    for f in &s.probe_failures {
        failures.push(format!(
            "liveness: probe {f} (sent after the last heal) failed"
        ));
    }
    // Invariant: liveness once healed.
    if s.last_outcome > timeline.last_fault + scenario.liveness {
        failures.push(format!(
            "liveness: last exchange ended at {:?}, more than {:?} after the last fault ({:?})",
            s.last_outcome, scenario.liveness, timeline.last_fault
        ));
    }
    // Invariant (membership): every member of the newest document reached it, within
    // `liveness` of the last fault.
    if let Some(m) = &s.membership {
        let up: Vec<bool> = s.nodes.iter().map(|n| n.up).collect();
        let behind = m.behind(&up);
        if let Some(target) = m.target()
            && !behind.is_empty()
        {
            let names: Vec<String> = behind
                .iter()
                .map(|&i| format!("{} (epoch {})", s.names[i], m.held(i).0))
                .collect();
            failures.push(format!(
                "membership: not every member reached epoch {} by the end: {}",
                target.epoch(),
                names.join(", ")
            ));
        }
        let since = timeline.last_fault.max(s.last_handed);
        if s.last_membership > since + scenario.liveness {
            failures.push(format!(
                "liveness: the last membership document was applied at {:?}, more than {:?} \
                 after the last fault or document handed over ({since:?})",
                s.last_membership, scenario.liveness
            ));
        }
    }
    // Invariants (records): no dial steered by a record its owner did not sign; every node
    // up holds every other's newest record, within `liveness` of the last fault.
    if let Some(r) = &s.records {
        failures.extend(r.violations.iter().take(10).cloned());
        let up: Vec<bool> = s.nodes.iter().map(|n| n.up).collect();
        let behind = r.behind(&up);
        if !behind.is_empty() {
            let pairs: Vec<String> = behind
                .iter()
                .map(|(receiver, owner)| {
                    format!("{} lacks {}'s newest", s.names[*receiver], s.names[*owner])
                })
                .collect();
            failures.push(format!(
                "records: not every node holds every other's newest record by the end: {}",
                pairs.join(", ")
            ));
        }
    }
    // A step the handler refused is a mistake in the scenario unless it says it expects
    // refusals (`refused = N`): otherwise it would pass having tested nothing.
    if scenario.expect.refused.is_none() {
        for why in &s.refused {
            failures.push(format!(
                "step refused by the handler ({why}); add `refused = N` to [expect] if intended"
            ));
        }
    }
    // Scenario expectations (they assume the scenario's own timing, so a swarm run, which
    // shifts timing and latency, checks only the invariants above).
    if !expectations {
        return;
    }
    let sum = |f: fn(&Status) -> u64| -> u64 { statuses.iter().flatten().map(f).sum() };
    let delivered = s
        .delivered
        .iter()
        .filter(|(k, _)| !s.probe_deliveries.contains(k))
        .map(|(_, n)| u64::from(*n))
        .sum::<u64>();
    let e = &scenario.expect;
    let redelivered = s.redelivered.values().map(|n| u64::from(*n)).sum::<u64>();
    let counts: [(&str, Option<crate::scenario::Count>, u64); 13] = [
        ("delivered", e.delivered, delivered),
        ("refused", e.refused, s.refused.len() as u64),
        ("redelivered", e.redelivered, redelivered),
        ("replied", e.replied, s.replied),
        ("failed", e.failed, s.failures.len() as u64),
        ("resends", e.resends, sum(|st| st.stats.resends)),
        ("redials", e.redials, sum(|st| st.stats.redials)),
        (
            "duplicates_dropped",
            e.duplicates_dropped,
            sum(|st| st.stats.duplicates_dropped),
        ),
        (
            "settled_refused",
            e.settled_refused,
            sum(|st| st.stats.settled_refused),
        ),
        (
            "replies_from_cache",
            e.replies_from_cache,
            sum(|st| st.stats.replies_from_cache),
        ),
        ("nacks", e.nacks, sum(|st| st.stats.nacks_received)),
        ("peer_errors", e.peer_errors, s.peer_errors),
        ("rate_limited", e.rate_limited, s.rate_limited),
    ];
    let membership_counts = [
        (
            "membership_refused",
            e.membership_refused,
            s.membership_refused,
        ),
        ("membership_forks", e.membership_forks, s.membership_forks),
        (
            "records_refused",
            e.records_refused,
            s.records.as_ref().map_or(0, |r| r.refused),
        ),
        (
            "records_inactive",
            e.records_inactive,
            s.records.as_ref().map_or(0, |r| r.inactive),
        ),
    ];
    if let (Some(want), Some(m)) = (e.membership_epoch, &s.membership) {
        let up: Vec<bool> = s.nodes.iter().map(|n| n.up).collect();
        for i in (0..s.names.len()).filter(|&i| up[i]) {
            let member = m
                .target()
                .is_none_or(|t| t.document().member(&s.keys[i].peer_id()).is_some());
            if member && m.held(i).0 != want {
                failures.push(format!(
                    "expected membership_epoch = {want} at {}, got {}",
                    s.names[i],
                    m.held(i).0
                ));
            }
        }
    }
    for (what, want, got) in counts.into_iter().chain(membership_counts) {
        if let Some(want) = want
            && !want.holds(got)
        {
            failures.push(format!("expected {what} = {want}, got {got}"));
        }
    }
    if let Some(kind) = &e.failure {
        for f in &s.failures {
            if !f.starts_with(kind.as_str()) {
                failures.push(format!("expected failures of kind {kind}, got {f}"));
            }
        }
    }
    if let Some(within) = e.completes_within
        && s.last_outcome > within
    {
        failures.push(format!(
            "last exchange ended at {:?}, expected by {within:?}",
            s.last_outcome
        ));
    }
    if let Some(after) = e.completes_after
        && s.last_outcome < after
    {
        failures.push(format!(
            "last exchange ended at {:?}, expected after {after:?}",
            s.last_outcome
        ));
    }
}

/// The random stream swarm mode draws from.
pub(crate) fn swarm_rng(seed: u64) -> ChaCha20Rng {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(u64::MAX);
    rng
}

/// Swarm mode: latency, loss, step timing and the storage fault drawn from the seed.
pub(crate) fn randomise(scenario: &mut Scenario, rng: &mut ChaCha20Rng) {
    let mut pick = |lo: u64, hi: u64| lo + rng.next_u64() % (hi - lo + 1);
    let min = pick(1, 20);
    let max = min + pick(0, 40);
    scenario.network.min_latency = Duration::from_millis(min);
    scenario.network.max_latency = Duration::from_millis(max);
    for step in &mut scenario.steps {
        let step = step.get_mut();
        if let Some(at) = step.at {
            // Shift each timed step by up to +-25% (at least +-50 ms).
            let spread = (at.as_millis() as u64 / 4).max(50);
            let shift = pick(0, 2 * spread);
            let at_ms = (at.as_millis() as u64 + shift).saturating_sub(spread);
            step.at = Some(Duration::from_millis(at_ms));
        }
    }
    // Half the seeds run with the storage fault (commits take 1-10 ms, and a crash during
    // one loses it), unless the scenario asks for it always.
    if pick(0, 1) == 1 {
        scenario.storage_fault = true;
        scenario.commit_latency = Duration::from_millis(pick(1, 10));
    }
}
