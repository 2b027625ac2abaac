//! Shrinking: from a failing run to the smallest scenario that still fails the same way.
//!
//! [`materialise`] writes the run's random choices down: swarm mode's latency, step timing
//! and storage fault, and the steps a `[swarm]` table draws, become explicit fields and
//! timed steps, and the seed becomes the scenario's own, so that a plain `p2p-sim run` of
//! the result replays the run. [`shrink`] then removes steps (delta debugging: halves,
//! quarters, ... then single steps), then nodes with every step that names them, then
//! simplifies what is left (request counts to one, payload sizes to the default), keeping
//! each change only while the run still fails with the same kind of failure (its
//! [`signature`]): the same invariant or model rule, or the same expectation.
//!
//! A shrinker that deletes its way to a scenario it broke itself lies: the file then fails
//! on a sound handler too. So a candidate counts only if
//! * it fails with the wanted kind and with no kind the original run did not fail with
//!   (a fault left with nothing to apply to, a step refused, a broken invariant the
//!   original kept: each means the candidate is a different scenario, not a smaller one);
//! * every fault it keeps is still healed as in the original (a partition without its
//!   repair, a crash without its restart would fail liveness on any handler);
//! * it keeps the requests the failure is about: all of them for a count expectation
//!   (the count is about them), and those of each node whose exchange a failure names
//!   (its labels, `alice#2`, count that node's requests).
//!
//! The result keeps only the expectations the original run failed (the others were met,
//! and the smaller scenario need not meet them), and steps swarm drew blind say
//! `may_not_apply`.

use std::collections::BTreeSet;

use crate::run::{Outcome, run};
use crate::scenario::{Expect, Scenario, Step};
use crate::swarm::draw;
use crate::swarm::{randomise, swarm_rng};

/// The kind of a failure, for "fails the same way": the invariant's tag (`duplicate`,
/// `lost`, `leak`, `liveness`, `exactly once`, `attempts`, `refused`, `status`), the
/// model's rule (`model (order)`), `unapplied` for a step that did nothing or, for an
/// unmet expectation, `expected <field>`.
pub fn signature(failure: &str) -> String {
    if failure.starts_with("model (") {
        return failure.split(':').next().unwrap_or("model").to_owned();
    }
    if failure.contains("never applied")
        || failure.contains("never fired")
        || failure.contains("did nothing")
    {
        return "unapplied".into();
    }
    for tag in ["duplicate", "lost", "leak", "liveness"] {
        if failure.starts_with(&format!("{tag}:")) {
            return tag.to_owned();
        }
    }
    if failure.contains("(exactly once expected)") {
        return "exactly once".into();
    }
    if failure.contains("; max_attempts is") {
        return "attempts".into();
    }
    if failure.starts_with("step refused") {
        return "refused".into();
    }
    if failure.contains("did not report its status") {
        return "status".into();
    }
    if let Some(rest) = failure.strip_prefix("expected ") {
        let field = rest.split([' ', ',']).next().unwrap_or("");
        return format!("expected {field}");
    }
    if failure.starts_with("open connections at the end") {
        return "expected open_connections".into();
    }
    if failure.starts_with("last exchange ended at") {
        return "expected completion time".into();
    }
    failure.split_whitespace().next().unwrap_or("").to_owned()
}

/// The run's random choices written down: replaying the result with `run(_, seed, false)`
/// repeats the run `run(scenario, seed, swarm)`. A swarm run checked invariants only, so
/// its count expectations are dropped.
pub fn materialise(scenario: &Scenario, seed: u64, swarm: bool) -> Scenario {
    let mut s = scenario.clone();
    if swarm {
        randomise(&mut s, &mut swarm_rng(seed));
        // Counts were not checked; the declarations (`refused`, `open_connections`) were.
        s.expect = wanted_expectation(&s.expect, "");
    }
    if let Some(plan) = s.swarm.take() {
        for mut step in draw(&s, &plan, seed) {
            // Drawn blind: written down, it must not fail for never applying.
            step.may_not_apply = true;
            s.push_drawn(step);
        }
    }
    s.seed = seed;
    s
}

/// What shrinking found.
#[derive(Debug)]
pub struct Shrunk {
    /// The smallest failing scenario found.
    pub scenario: Scenario,
    /// How it fails (see [`signature`]).
    pub signature: String,
    /// Its failures.
    pub failures: Vec<String>,
    /// Steps and nodes before and after.
    pub steps: (usize, usize),
    /// Nodes before and after.
    pub nodes: (usize, usize),
    /// Runs it took.
    pub runs: usize,
}

/// Shrinks the failing run `run(scenario, seed, swarm)`. Errors if it does not fail, or if
/// its written-down form does not fail the same way (which would be a bug here).
pub fn shrink(scenario: &Scenario, seed: u64, swarm: bool) -> Result<Shrunk, String> {
    let original = run(scenario, seed, swarm);
    let Some(first) = original.failures.first() else {
        return Err(format!(
            "{} passes under seed {seed}: nothing to shrink",
            scenario.name
        ));
    };
    let want = signature(first);
    let mut start = materialise(scenario, seed, swarm);
    start.expect = wanted_expectation(&start.expect, &want);
    // The kinds the written-down run fails with (expectations not kept cannot fail).
    let written = run(&start, start.seed, false);
    let allowed: BTreeSet<String> = written.failures.iter().map(|f| signature(f)).collect();
    let counts = is_count(&want);
    let same_way = |outcome: &Outcome| {
        let kinds: BTreeSet<String> = outcome.failures.iter().map(|f| signature(f)).collect();
        // A count must come out as wrong as it did ("expected replied = 2, got 1"): a
        // different count is a different scenario's.
        let same = !counts || outcome.failures.iter().any(|f| f == first);
        same && kinds.contains(&want) && kinds.is_subset(&allowed)
    };
    if start.validate().is_err() || !same_way(&written) {
        return Err(format!(
            "the written-down run does not fail with {want:?} (a replay bug in the \
             simulator): {:?}",
            written.failures
        ));
    }
    let guard = Guard::new(&start, counts, &original.failures);
    let mut runs = 2;
    let mut fails = |candidate: &Scenario| -> Option<Outcome> {
        if candidate.validate().is_err() || !guard.keeps(candidate) {
            return None;
        }
        runs += 1;
        let outcome = run(candidate, candidate.seed, false);
        same_way(&outcome).then_some(outcome)
    };
    let before = (start.steps.len(), start.nodes.len());
    let mut best = start;
    // 1. Steps, by delta debugging: try removing chunks, halving the chunk size, and at
    // size one repeat while anything goes.
    let mut chunk = best.steps.len().div_ceil(2).max(1);
    loop {
        let mut removed = false;
        let mut at = 0;
        while at < best.steps.len() {
            let candidate = without_steps(&best, at, chunk);
            if fails(&candidate).is_some() {
                best = candidate;
                removed = true;
            } else {
                at += chunk;
            }
        }
        if chunk == 1 {
            if !removed {
                break;
            }
        } else {
            chunk /= 2;
        }
    }
    // 2. Nodes, with every step that names them.
    let mut i = best.nodes.len();
    while i > 0 {
        i -= 1;
        if best.nodes.len() <= 2 {
            break;
        }
        if let Some(candidate) = without_node(&best, i)
            && fails(&candidate).is_some()
        {
            best = candidate;
        }
    }
    // 3. Simpler values.
    for i in 0..best.steps.len() {
        for simpler in simpler_steps(best.steps[i].get_ref()) {
            let candidate = with_step(&best, i, simpler);
            if fails(&candidate).is_some() {
                best = candidate;
            }
        }
    }
    let last = fails(&best).ok_or("the shrunk scenario stopped failing")?;
    best.description = format!(
        "Shrunk from {} (seed {seed}{}): fails with {want}. {} of {} steps and {} of {} nodes kept.",
        scenario.name,
        if swarm { ", swarm" } else { "" },
        best.steps.len(),
        before.0,
        best.nodes.len(),
        before.1
    );
    Ok(Shrunk {
        steps: (before.0, best.steps.len()),
        nodes: (before.1, best.nodes.len()),
        scenario: best,
        signature: want,
        failures: last.failures,
        runs,
    })
}

/// A step made simpler: a request count of one, the default payload size.
fn simpler_steps(step: &Step) -> Vec<Step> {
    let mut out = Vec::new();
    if step.count.is_some_and(|c| c > 1) {
        out.push(Step {
            count: Some(1),
            ..step.clone()
        });
    }
    if step.size.is_some() {
        out.push(Step {
            size: None,
            ..step.clone()
        });
    }
    out
}

/// The expectation the failure is about, if it is one, and the two that are declarations
/// more than checks (`refused`, which allows refused steps, and `open_connections`, which
/// replaces the leak invariant). The others are not what the failure is about: a smaller
/// scenario need not meet them (and one that fails an invariant fails it whatever its
/// counts).
fn wanted_expectation(expect: &Expect, want: &str) -> Expect {
    let Ok(toml::Value::Table(mut table)) = toml::Value::try_from(expect) else {
        return expect.clone();
    };
    table.retain(|field, _| {
        field == "refused"
            || field == "open_connections"
            || want == format!("expected {field}")
            || (want == "expected completion time" && field.starts_with("completes_"))
            || (want == "expected failures" && field == "failure")
    });
    toml::Value::Table(table)
        .try_into()
        .unwrap_or_else(|_| expect.clone())
}

/// What every candidate must keep: the requests the failure is about, and a heal for every
/// fault it keeps.
struct Guard {
    /// (fault, heal) step pairs of the start, compared as written.
    pairs: Vec<(Step, Step)>,
    /// Protected request steps, as written.
    protected: Vec<Step>,
}

impl Guard {
    fn new(start: &Scenario, counts: bool, failures: &[String]) -> Self {
        // Nodes whose request steps stay, with their counts (`None`: every step that is
        // not a fault: the work a count is about, requests, answers, documents, records).
        let requests_of: Option<BTreeSet<String>> = if counts {
            None
        } else {
            Some(
                failures
                    .iter()
                    .flat_map(|f| labels_in(f))
                    .filter(|node| start.node_index(node).is_some())
                    .collect(),
            )
        };
        let steps: Vec<&Step> = start.steps.iter().map(|s| s.get_ref()).collect();
        let protected = steps
            .iter()
            .filter(|s| match &requests_of {
                None => !is_fault(s),
                Some(nodes) => {
                    s.action == crate::scenario::ActionKind::Request
                        && s.from.as_ref().is_some_and(|f| nodes.contains(f))
                }
            })
            .map(|s| (*s).clone())
            .collect();
        let mut pairs = Vec::new();
        for (i, fault) in steps.iter().enumerate() {
            if let Some(heal) = steps[i + 1..].iter().find(|h| heals(fault, h)) {
                pairs.push(((*fault).clone(), (*heal).clone()));
            }
        }
        Self { pairs, protected }
    }

    fn keeps(&self, candidate: &Scenario) -> bool {
        let steps: Vec<&Step> = candidate.steps.iter().map(|s| s.get_ref()).collect();
        let has = |step: &Step| steps.contains(&step);
        self.protected.iter().all(has)
            && self
                .pairs
                .iter()
                .all(|(fault, heal)| !has(fault) || has(heal))
    }
}

/// Whether a failure is a count expectation ("expected replied = 2, got 1").
fn is_count(want: &str) -> bool {
    want.starts_with("expected ")
        && !matches!(
            want,
            "expected completion time" | "expected open_connections" | "expected failures"
        )
}

/// Whether a step injects or heals a fault (rather than doing the work counts are about).
fn is_fault(step: &Step) -> bool {
    use crate::scenario::ActionKind as A;
    step.action.is_fault()
        || step.action.is_heal()
        || matches!(
            step.action,
            A::Latency | A::Drop | A::Delay | A::Duplicate | A::Corrupt | A::Nack
        )
}

/// Whether `heal` undoes `fault` (same link or node).
fn heals(fault: &Step, heal: &Step) -> bool {
    use crate::scenario::ActionKind as A;
    let same_link = fault.a == heal.a && fault.b == heal.b;
    let same_way = fault.from == heal.from && fault.to == heal.to;
    match (fault.action, heal.action) {
        (A::Partition, A::Repair) | (A::Hold, A::Release) => same_link,
        (A::PartitionOneway, A::RepairOneway) => same_way,
        (A::Crash | A::Stop | A::DiskFull, A::Restart) => fault.node == heal.node,
        (A::FailRate, A::FailRate) => {
            same_link && fault.rate.unwrap_or(0.0) > 0.0 && heal.rate.unwrap_or(0.0) == 0.0
        }
        (A::Revoke, A::Allow) => fault.node == heal.node && fault.to == heal.to,
        _ => false,
    }
}

/// The nodes whose exchanges a failure names by label (`alice#2` -> `alice`).
fn labels_in(failure: &str) -> Vec<String> {
    failure
        .split(|c: char| !(c.is_alphanumeric() || c == '#' || c == '_' || c == '-'))
        .filter_map(|word| {
            let (node, n) = word.split_once('#')?;
            (!node.is_empty() && n.parse::<u32>().is_ok()).then(|| node.to_owned())
        })
        .collect()
}

/// The scenario as a file `p2p-sim run` reads.
pub fn to_toml(scenario: &Scenario) -> Result<String, String> {
    toml::to_string(scenario).map_err(|e| format!("cannot write the scenario: {e}"))
}

fn without_steps(s: &Scenario, at: usize, len: usize) -> Scenario {
    let mut c = s.clone();
    let end = (at + len).min(c.steps.len());
    c.steps.drain(at..end);
    if c.step_lines.len() >= end {
        c.step_lines.drain(at..end);
    }
    c
}

fn with_step(s: &Scenario, i: usize, step: Step) -> Scenario {
    let mut c = s.clone();
    c.steps[i] = toml::Spanned::new(0..0, step);
    c
}

/// Removes node `i`, every step naming it, and it from the allow lists. `None` if a step's
/// trigger or match names it in a way that cannot be dropped alone.
fn without_node(s: &Scenario, i: usize) -> Option<Scenario> {
    let name = s.nodes.get(i)?.name.clone();
    let mut c = s.clone();
    c.nodes.remove(i);
    let names = |step: &Step| {
        let mut all = vec![
            &step.node, &step.from, &step.to, &step.a, &step.b, &step.via,
        ];
        if let Some(m) = &step.matches {
            all.push(&m.from);
            all.push(&m.to);
        }
        if let Some(t) = &step.on {
            all.push(&t.message.from);
            all.push(&t.message.to);
        }
        all.into_iter().any(|n| n.as_deref() == Some(name.as_str()))
            || step.peers.iter().flatten().any(|p| *p == name)
    };
    let keep: Vec<bool> = c.steps.iter().map(|st| !names(st.get_ref())).collect();
    let mut k = keep.iter();
    c.steps.retain(|_| *k.next().unwrap_or(&true));
    let mut k = keep.iter();
    c.step_lines.retain(|_| *k.next().unwrap_or(&true));
    for node in &mut c.nodes {
        if let Some(allow) = &mut node.allow {
            allow.retain(|n| *n != name);
        }
    }
    c.network.links.retain(|l| l.a != name && l.b != name);
    c.reload_configs().ok()?;
    Some(c)
}
