//! Exploration that seeks what no run has reached yet (Antithesis's idea, on our seeds).
//!
//! A uniform sweep draws every run afresh. Guided exploration keeps a *corpus*: each run
//! that reached an item no earlier run reached (a transition, a pair of transitions of one
//! exchange, a transition under a combination of faults in force, a message kind or
//! reason: [`crate::run::Outcome::explored`]) is kept, written down as explicit steps
//! ([`crate::shrink::materialise`]), and later runs are derived from kept ones by small
//! changes: another seed under the same steps, a step moved in time, other latencies, the
//! storage fault switched. Fresh runs and derived ones are chosen in proportion to how
//! often each lately reached something new (each at least a fifth of the time).
//!
//! Deterministic: inputs are drawn in batches from one seeded stream before the batch
//! runs, and results are merged in input order, so the same `seed`, runs and scenarios
//! give the same corpus on any number of jobs.
//!
//! A failing run is kept whole (its written-down scenario and seed), so `p2p-sim run`
//! replays it.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

use crate::run::{Outcome, run};
use crate::scenario::{ActionKind, Scenario};
use crate::shrink::materialise;

/// Runs per batch: inputs of a batch are drawn from the corpus as it stood when the batch
/// began. Fixed, not per job, so the result does not depend on the number of jobs (more
/// jobs than this run no faster).
const BATCH: usize = 16;

/// Each kind of run (fresh, derived) is chosen at least this often, in percent, so that
/// neither stops being tried once the other is ahead.
const FLOOR_PERCENT: u64 = 20;

/// What an exploration (or a uniform sweep of the same size) reached.
#[derive(Debug, Default)]
pub struct Report {
    /// Runs made.
    pub runs: usize,
    /// Distinct items reached.
    pub items: BTreeSet<String>,
    /// (runs so far, distinct items so far) after each batch.
    pub growth: Vec<(usize, usize)>,
    /// Runs kept for reaching something new (guided only).
    pub kept: usize,
    /// Failing runs: (scenario name, seed, failures, the scenario as run).
    pub failures: Vec<(String, u64, Vec<String>, Scenario)>,
}

impl Report {
    /// Failing runs that broke an invariant of safety or the model (a duplicate, a lost or
    /// doubled outcome, a leak, `model (...)`): what no derivation can excuse. A derived
    /// run that fails only on liveness may have been made unlivable by the derivation (a
    /// fault added where the file's own timing left no room for it): see [`Self::suspect`].
    pub fn broken(&self) -> impl Iterator<Item = &(String, u64, Vec<String>, Scenario)> {
        self.failures.iter().filter(|f| !suspect(&f.2))
    }

    /// Failing runs that failed only on liveness: each worth a look, not yet a defect.
    pub fn suspect(&self) -> impl Iterator<Item = &(String, u64, Vec<String>, Scenario)> {
        self.failures.iter().filter(|f| suspect(&f.2))
    }
}

/// Whether every failure is of liveness (including a probe that failed).
fn suspect(failures: &[String]) -> bool {
    failures.iter().all(|f| f.starts_with("liveness"))
}

/// One run to make.
#[derive(Clone)]
enum Input {
    /// Scenario `i` under `seed` in swarm mode, as a sweep runs it.
    Fresh { scenario: usize, seed: u64 },
    /// A written-down scenario (derived from a kept run) under `seed`, as `run` runs it.
    Derived { scenario: Box<Scenario>, seed: u64 },
}

impl Input {
    fn run(&self, scenarios: &[Scenario]) -> Outcome {
        match self {
            Input::Fresh { scenario, seed } => run(&scenarios[*scenario], *seed, true),
            Input::Derived { scenario, seed } => run(scenario, *seed, false),
        }
    }

    /// The run written down: what a kept run is derived from, or a failure replayed by.
    fn written(&self, scenarios: &[Scenario]) -> Scenario {
        match self {
            Input::Fresh { scenario, seed } => {
                let mut s = materialise(&scenarios[*scenario], *seed, true);
                // Derived runs move steps: none of them may fail a run for not applying.
                for step in &mut s.steps {
                    step.get_mut().may_not_apply = true;
                }
                anchor_restarts(&mut s);
                // A request moved into a revocation is refused, rightly: not a failure here.
                s.expect.refused = Some(crate::scenario::Count::Range {
                    min: None,
                    max: None,
                });
                s
            }
            Input::Derived { scenario, seed } => {
                let mut s = (**scenario).clone();
                s.seed = *seed;
                s
            }
        }
    }
}

/// The `n`th fresh run of a uniform sweep over `count` scenarios, seed by seed.
fn fresh(n: u64, count: usize) -> Input {
    let count = count.max(1) as u64;
    Input::Fresh {
        scenario: (n % count) as usize,
        seed: n / count,
    }
}

/// `runs` runs of a uniform sweep: every scenario at seed 0, then at seed 1, ...
pub fn uniform(scenarios: &[Scenario], runs: usize, jobs: usize) -> Report {
    let mut report = Report::default();
    let mut n = 0u64;
    while report.runs < runs {
        let size = BATCH.min(runs - report.runs);
        let batch: Vec<Input> = (0..size)
            .map(|_| {
                n += 1;
                fresh(n - 1, scenarios.len())
            })
            .collect();
        for (input, outcome) in batch.iter().zip(run_batch(scenarios, &batch, jobs)) {
            absorb(&mut report, scenarios, input, &outcome);
        }
        report.growth.push((report.runs, report.items.len()));
    }
    report
}

/// `runs` runs of guided exploration from the stream `seed`.
pub fn guided(scenarios: &[Scenario], runs: usize, jobs: usize, seed: u64) -> Report {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut report = Report::default();
    let mut corpus: Vec<Scenario> = Vec::new();
    let mut fresh_made = 0u64;
    // Runs made and runs that reached something new, for fresh and derived runs: each
    // kind is chosen in proportion to how often it found something lately.
    let mut tally = [(1u64, 1u64), (1u64, 1u64)];
    while report.runs < runs {
        let size = BATCH.min(runs - report.runs);
        let rate = |(made, found): (u64, u64)| found * 1_000 / made;
        let fresh_share = (rate(tally[0]) * 100 / (rate(tally[0]) + rate(tally[1])).max(1))
            .clamp(FLOOR_PERCENT, 100 - FLOOR_PERCENT);
        let batch: Vec<Input> = (0..size)
            .map(|_| {
                if corpus.is_empty() || rng.next_u64() % 100 < fresh_share {
                    fresh_made += 1;
                    return fresh(fresh_made - 1, scenarios.len());
                }
                // Newer kept runs reached rarer items: favour them (the later half of the
                // corpus is drawn as often as the whole of it).
                let len = corpus.len() as u64;
                let pick = if rng.next_u64().is_multiple_of(2) {
                    len / 2 + rng.next_u64() % len.div_ceil(2)
                } else {
                    rng.next_u64() % len
                };
                let parent = &corpus[pick.min(len - 1) as usize];
                derive(parent, &mut rng)
            })
            .collect();
        for (input, outcome) in batch.iter().zip(run_batch(scenarios, &batch, jobs)) {
            let kind = usize::from(matches!(input, Input::Derived { .. }));
            let new = absorb(&mut report, scenarios, input, &outcome);
            // Recent batches weigh most: halve the old counts once they grow.
            if tally[kind].0 > 200 {
                tally[kind] = (tally[kind].0 / 2, tally[kind].1 / 2 + 1);
            }
            tally[kind].0 += 1;
            if new {
                tally[kind].1 += 1;
                report.kept += 1;
                corpus.push(input.written(scenarios));
            }
        }
        report.growth.push((report.runs, report.items.len()));
    }
    report
}

/// Takes one run's result in; whether it reached an item no earlier run had.
fn absorb(report: &mut Report, scenarios: &[Scenario], input: &Input, outcome: &Outcome) -> bool {
    report.runs += 1;
    let before = report.items.len();
    report.items.extend(outcome.explored.iter().cloned());
    if !outcome.passed() {
        report.failures.push((
            outcome.scenario.clone(),
            outcome.seed,
            outcome.failures.clone(),
            input.written(scenarios),
        ));
    }
    report.items.len() > before
}

/// A run derived from a kept one: one to three small changes.
fn derive(parent: &Scenario, rng: &mut ChaCha20Rng) -> Input {
    let mut s = parent.clone();
    let mut seed = s.seed;
    for _ in 0..1 + rng.next_u64() % 3 {
        match rng.next_u64() % 5 {
            // The same steps under another seed: other latencies drawn per message, other
            // exchange ids and jitter, another order of equal-time events.
            0 => seed = rng.next_u64(),
            1 => shift_a_step(&mut s, rng),
            2 => {
                let min = 1 + rng.next_u64() % 20;
                let max = min + rng.next_u64() % 41;
                s.network.min_latency = Duration::from_millis(min);
                s.network.max_latency = Duration::from_millis(max);
                s.network.tick = Duration::from_millis(min.min(5));
            }
            3 => {
                s.storage_fault = !s.storage_fault;
                s.commit_latency = Duration::from_millis(1 + rng.next_u64() % 10);
            }
            _ => add_a_fault(&mut s, rng),
        }
    }
    Input::Derived {
        scenario: Box::new(s),
        seed,
    }
}

/// A crash (or stop) fired by a message, and the timed restart after it: once faults are
/// added, the message may come later than the restart was written for, and the node would
/// stay down for good, failing the run for what the change did. So the restart is made to
/// follow the crash (half a second after it) whenever the crash comes.
fn anchor_restarts(s: &mut Scenario) {
    for i in 0..s.steps.len() {
        let step = s.steps[i].get_ref();
        let stops = matches!(
            step.action,
            ActionKind::Crash | ActionKind::Stop | ActionKind::DiskFull
        );
        if step.on.is_none() || !stops {
            continue;
        }
        let node = step.node.clone();
        let Some(j) = (0..s.steps.len()).find(|&j| {
            let r = s.steps[j].get_ref();
            r.action == ActionKind::Restart && r.node == node && r.after.is_none() && r.on.is_none()
        }) else {
            continue;
        };
        let name = s.steps[i]
            .get_mut()
            .name
            .get_or_insert_with(|| format!("explore-crash-{i}"))
            .clone();
        let restart = s.steps[j].get_mut();
        restart.after = Some(name);
        restart.at = Some(Duration::from_millis(500));
    }
}

/// One more fault and its heal, of any kind swarm mode draws, while the run's steps are
/// still running.
fn add_a_fault(s: &mut Scenario, rng: &mut ChaCha20Rng) {
    let last = (0..s.steps.len())
        .filter_map(|i| s.nominal_time(i))
        .max()
        .unwrap_or_default();
    // Not a revocation: the run's own requests to the revoked peer would be refused, which
    // only a scenario's `refused = N` may expect. (Stops are not drawn by default either.)
    let plan = crate::swarm::SwarmPlan {
        faults: 1,
        requests: 0,
        window: last.max(Duration::from_secs(1)),
        probes: false,
        kinds: (crate::scenario::tables::ALL.iter().copied())
            .filter(|k| *k != crate::swarm::FaultKind::Revoke)
            .collect(),
        ..crate::swarm::SwarmPlan::default()
    };
    for mut step in crate::swarm::draw(s, &plan, rng.next_u64()) {
        step.may_not_apply = true;
        s.push_drawn(step);
    }
}

/// Moves one timed step by up to half a second either way (within the run). Not a fault
/// or its heal, nor a revoke or allow: moved apart, a partition could outlive its repair,
/// and the run would fail for what the change did rather than for what the handler did.
fn shift_a_step(s: &mut Scenario, rng: &mut ChaCha20Rng) {
    let movable = |step: &crate::scenario::Step| {
        step.at.is_some()
            && step.after.is_none()
            && !step.action.is_fault()
            && !step.action.is_heal()
            && !matches!(step.action, ActionKind::Revoke | ActionKind::Allow)
    };
    let timed: Vec<usize> = (0..s.steps.len())
        .filter(|&i| movable(s.steps[i].get_ref()))
        .collect();
    if timed.is_empty() {
        return;
    }
    let i = timed[(rng.next_u64() % timed.len() as u64) as usize];
    let limit = s.duration.saturating_sub(Duration::from_millis(1));
    let step = s.steps[i].get_mut();
    let at = step.at.unwrap_or_default();
    let by = Duration::from_millis(1 + rng.next_u64() % 500);
    step.at = Some(if rng.next_u64().is_multiple_of(2) {
        (at + by).min(limit)
    } else {
        at.saturating_sub(by)
    });
}

/// Runs `batch` on `jobs` threads; outcomes in input order.
fn run_batch(scenarios: &[Scenario], batch: &[Input], jobs: usize) -> Vec<Outcome> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; batch.len()]);
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some(input) = batch.get(n) else {
                        break;
                    };
                    let outcome = input.run(scenarios);
                    if let Ok(mut r) = results.lock() {
                        r[n] = Some(outcome);
                    }
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect()
}
