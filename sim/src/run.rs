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

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use p2p_handler::{Keypair, Status};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use tokio::sync::oneshot;

use crate::scenario::Scenario;
use crate::swarm::{randomise, swarm_rng};
use crate::trace::Trace;

mod app;
mod disk;
mod hostile;
mod judge;
mod model;
mod node;
mod steps;
mod tap;
mod timeline;
mod world;

use judge::check;
use node::{collect_statuses, node_main, request_statuses};
use timeline::{Timeline, pending_exchanges, run_due_steps};
use world::{Shared, lock};

/// The port every node listens on.
pub const PORT: u16 = 7000;

/// Extra virtual time after the last exchange, for idle connections to close.
const SETTLE_MARGIN: Duration = Duration::from_secs(2);

/// How often a quiet run asks the nodes whether anything is still open.
const PROBE_EVERY: Duration = Duration::from_millis(100);

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
    /// `coverage` and the finer items exploration steers by: transition pairs and
    /// transitions under each combination of faults in force ([`crate::coverage::pair`],
    /// [`crate::coverage::under`]).
    pub explored: BTreeSet<String>,
}

impl Outcome {
    /// Whether every invariant and expectation held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Runs `scenario` under `seed`. With `swarm`, latency, loss and step timing are
/// randomised from the seed too.
pub fn run(scenario: &Scenario, seed: u64, swarm: bool) -> Outcome {
    let started = Instant::now();
    let scenario = prepare(scenario, seed, swarm);
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let keys: Vec<Keypair> = scenario
        .nodes
        .iter()
        .map(|_| Keypair::generate(&mut rng))
        .collect();
    let names: Vec<String> = scenario.nodes.iter().map(|n| n.name.clone()).collect();
    let shared = Arc::new(Mutex::new(Shared::new(&scenario, keys, seed)));
    let settle = settle_time(&scenario);
    let mut sim = build_sim(&scenario, seed, settle);
    for (i, name) in names.iter().enumerate() {
        let shared = shared.clone();
        sim.host(name.as_str(), move || node_main(shared.clone(), i));
    }
    if scenario.has_attacks() {
        let shared = shared.clone();
        sim.host(hostile::HOST, move || hostile::mallory_main(shared.clone()));
    }
    let mut failures = Vec::new();
    install_tables(&sim, &shared, &scenario, seed, &mut failures);
    let mut timeline = Timeline::new(&scenario, &mut lock(&shared));
    start_nodes(&mut sim, &shared, &mut failures);
    let mut watch = Watch::default();
    let mut quietly = false;
    loop {
        let now = sim.elapsed();
        run_due_steps(&mut sim, &shared, &scenario, &mut timeline, now);
        timeline.tick(now);
        let (pending, busy) = {
            let mut s = lock(&shared);
            s.lossy = timeline.is_lossy();
            // Which nodes are up, once per tick for every check below.
            let up = s.up();
            if s.model.owes() {
                s.model.overdue(Some(now), &up);
            }
            let busy = timeline.busy(&s, &up)
                | watch.records(&s, &up, &scenario, &timeline, now, &mut failures);
            (pending_exchanges(&s), busy)
        };
        if pending == 0 && !busy {
            if watch.quiet(&shared, now, settle) {
                quietly = true;
                break;
            }
        } else {
            watch.noisy();
        }
        if now >= scenario.duration {
            if pending > 0 {
                failures.push(format!(
                    "liveness: {pending} exchange(s) still pending at the time limit ({:?})",
                    scenario.duration
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
    let mut s = lock(&shared);
    check(
        &scenario,
        &mut s,
        &statuses,
        &timeline,
        !swarm,
        quietly,
        &mut failures,
    );
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
        explored: s.coverage.union(&s.explored).cloned().collect(),
    }
}

/// The scenario as this seed runs it: swarm's randomisation, its drawn steps, and the
/// healing phase's probes written out as ordinary steps.
fn prepare(scenario: &Scenario, seed: u64, swarm: bool) -> Scenario {
    let mut scenario = scenario.clone();
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
        let last = (0..scenario.steps.len())
            .filter_map(|i| scenario.nominal_time(i))
            .max()
            .unwrap_or_default();
        for step in crate::swarm::probe_steps(&scenario, last + Duration::from_millis(500)) {
            scenario.push_drawn(step);
        }
        scenario.probes = false;
    }
    scenario
}

/// The longest a connection can legitimately stay open once nothing is pending: a reply
/// waiting for its Ack, then the idle timeout. Runs end early when nothing is open.
fn settle_time(scenario: &Scenario) -> Duration {
    (0..scenario.nodes.len())
        .map(|i| {
            let c = scenario.config_of(i);
            c.response_timeout + c.reply_ack_timeout + c.idle_timeout + c.connect_timeout
        })
        .max()
        .unwrap_or_default()
        + SETTLE_MARGIN
}

/// Turmoil, seeded and clocked by the run, with the scenario's network and links.
fn build_sim(scenario: &Scenario, seed: u64, settle: Duration) -> turmoil::Sim<'static> {
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        .tick_duration(scenario.network.tick)
        .simulation_duration(scenario.duration + settle + Duration::from_secs(60))
        .min_message_latency(scenario.network.min_latency)
        .max_message_latency(scenario.network.max_latency)
        .fail_rate(scenario.network.fail_rate)
        .repair_rate(scenario.network.repair_rate)
        .build();
    for link in &scenario.network.links {
        if let Some(latency) = link.latency {
            sim.set_link_latency(link.a.as_str(), link.b.as_str(), latency);
        }
        if let Some(rate) = link.fail_rate {
            sim.set_link_fail_rate(link.a.as_str(), link.b.as_str(), rate);
        }
    }
    sim
}

/// The `[membership]` and `[records]` tables' trackers, which need the hosts' addresses.
fn install_tables(
    sim: &turmoil::Sim<'_>,
    shared: &Arc<Mutex<Shared>>,
    scenario: &Scenario,
    seed: u64,
    failures: &mut Vec<String>,
) {
    let Some(plan) = &scenario.membership else {
        return;
    };
    let addrs: Vec<SocketAddr> = scenario
        .nodes
        .iter()
        .map(|n| SocketAddr::new(sim.lookup(n.name.as_str()), PORT))
        .collect();
    let mut s = lock(shared);
    match crate::membership::Registry::new(plan, scenario, &s.keys, &addrs, seed) {
        Ok(registry) => s.membership = Some(registry),
        Err(e) => failures.push(e),
    }
    if let Some(plan) = &scenario.records {
        let ips = addrs.iter().map(SocketAddr::ip).collect();
        s.records = Some(crate::records::Tracker::new(plan, ips, PORT));
    }
}

/// Lets every node bind its listener before the timeline starts.
fn start_nodes(
    sim: &mut turmoil::Sim<'_>,
    shared: &Arc<Mutex<Shared>>,
    failures: &mut Vec<String>,
) {
    for _ in 0..1_000 {
        if lock(shared).nodes.iter().all(|n| n.commands.is_some()) {
            break;
        }
        if let Err(e) = sim.step() {
            failures.push(format!("simulation error while starting: {e}"));
            break;
        }
    }
}

/// Each node's (up, incarnation): what a probe's answers stand for.
fn nodes_now(shared: &Arc<Mutex<Shared>>) -> Vec<(bool, u64)> {
    let s = lock(shared);
    s.nodes.iter().map(|n| (n.up, n.incarnation)).collect()
}

/// What the main loop watches across ticks: the records liveness clock, and the quiet
/// phase in which the run asks the nodes whether anything is still open.
#[derive(Default)]
struct Watch {
    quiet_since: Option<Duration>,
    records_behind_since: Option<Duration>,
    records_late: bool,
    probe: Option<Vec<Option<oneshot::Receiver<Status>>>>,
    probe_clean: bool,
    /// Which nodes were up (with their incarnations) when the probe was asked: a node
    /// that came up (or restarted) since was not asked, so the probe says nothing of it.
    probe_nodes: Vec<(bool, u64)>,
    last_probe: Duration,
}

impl Watch {
    /// Whether some node still lacks another's newest record (which keeps the run going
    /// until the time limit). Invariant (records, liveness): once faults heal, a record
    /// reaches every node up within `liveness` (a refresh makes nodes briefly behind: each
    /// episode is measured from its start, or from the last fault if later).
    fn records(
        &mut self,
        s: &Shared,
        up: &[bool],
        scenario: &Scenario,
        timeline: &Timeline,
        now: Duration,
        failures: &mut Vec<String>,
    ) -> bool {
        let behind = match s.records.as_ref().map(|r| r.behind(up)) {
            Some(behind) if !behind.is_empty() => behind,
            _ => {
                self.records_behind_since = None;
                return false;
            }
        };
        let since = *self.records_behind_since.get_or_insert(now);
        let from = since.max(timeline.last_fault);
        if now > from + scenario.liveness && !self.records_late {
            self.records_late = true;
            let (receiver, owner) = behind[0];
            failures.push(format!(
                "liveness: {} still lacked {}'s newest record at {now:?}, more than {:?} \
                 after {from:?}",
                s.names[receiver], s.names[owner], scenario.liveness
            ));
        }
        true
    }

    /// Nothing pending and nothing due: whether the run may end. It ends once `settle`
    /// passed, or as soon as every node reports nothing open, rather than always waiting
    /// out the idle timeout.
    fn quiet(&mut self, shared: &Arc<Mutex<Shared>>, now: Duration, settle: Duration) -> bool {
        let since = *self.quiet_since.get_or_insert(now);
        if now >= since + settle {
            return true;
        }
        match &mut self.probe {
            Some(receivers) if receivers.iter().all(|r| r.is_none()) => {
                if self.probe_clean && self.probe_nodes == nodes_now(shared) {
                    return true;
                }
                self.probe = None;
            }
            Some(receivers) => {
                for r in receivers.iter_mut() {
                    if let Some(rx) = r
                        && let Ok(status) = rx.try_recv()
                    {
                        // `drained`: no reply still awaits its Ack either, so every
                        // responder-side outcome (unconfirmed too) is in before the end.
                        // No membership sync planned either: a member that applied an
                        // epoch dials the others after a random delay.
                        self.probe_clean &= status.open_connections == 0
                            && status.connection_tasks == 0
                            && status.pending_responses == 0
                            && status.drained
                            && !status.settling
                            && status.membership_syncs == 0;
                        *r = None;
                    }
                }
            }
            None if now >= self.last_probe + PROBE_EVERY => {
                self.last_probe = now;
                self.probe_clean = true;
                self.probe_nodes = nodes_now(shared);
                self.probe = Some(request_statuses(shared));
            }
            None => {}
        }
        false
    }

    /// Something is pending or due: the quiet phase starts over.
    fn noisy(&mut self) {
        self.quiet_since = None;
        self.probe = None;
    }
}
