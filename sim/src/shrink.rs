//! Shrinking: from a failing run to the smallest scenario that still fails the same way.
//!
//! [`materialise`] writes the run's random choices down: swarm mode's latency, step timing
//! and storage fault, and the steps a `[swarm]` table draws, become explicit fields and
//! timed steps, and the seed becomes the scenario's own, so that a plain `p2p-sim run` of
//! the result replays the run. [`shrink`] then removes steps (delta debugging: halves,
//! quarters, ... then single steps), then nodes with every step that names them, then
//! simplifies what is left (request counts to one, payload sizes to the default), keeping
//! each change only while the run still fails with the same kind of failure (its
//! [`signature`]): the same invariant, or the same expectation.

use crate::run::{Outcome, run};
use crate::scenario::{Expect, Scenario, Step};
use crate::swarm::draw;
use crate::swarm::{randomise, swarm_rng};

/// The kind of a failure, for "fails the same way": the invariant's tag (`duplicate`,
/// `lost`, `leak`, `liveness`, `exactly once`, `attempts`, `refused`, `status`) or, for an
/// unmet expectation, `expected <field>`.
pub fn signature(failure: &str) -> String {
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
    if failure.starts_with("last exchange ended at") {
        return "expected completion time".into();
    }
    failure.split_whitespace().next().unwrap_or("").to_owned()
}

/// The run's random choices written down: replaying the result with `run(_, seed, false)`
/// repeats the run `run(scenario, seed, swarm)`. A swarm run checked invariants only, so
/// its expectations are dropped.
pub fn materialise(scenario: &Scenario, seed: u64, swarm: bool) -> Scenario {
    let mut s = scenario.clone();
    if swarm {
        randomise(&mut s, &mut swarm_rng(seed));
        s.expect = Expect::default();
    }
    if let Some(plan) = s.swarm.take() {
        for step in draw(&s, &plan, seed) {
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
    let start = materialise(scenario, seed, swarm);
    let mut runs = 1;
    let mut fails = |candidate: &Scenario| -> Option<Outcome> {
        if candidate.validate().is_err() {
            return None;
        }
        runs += 1;
        let outcome = run(candidate, candidate.seed, false);
        outcome
            .failures
            .iter()
            .any(|f| signature(f) == want)
            .then_some(outcome)
    };
    if fails(&start).is_none() {
        return Err(format!(
            "the written-down run does not fail with {want:?} (a replay bug in the simulator)"
        ));
    }
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
        let step = best.steps[i].get_ref().clone();
        if step.count.is_some_and(|c| c > 1) {
            let candidate = with_step(
                &best,
                i,
                Step {
                    count: Some(1),
                    ..step.clone()
                },
            );
            if fails(&candidate).is_some() {
                best = candidate;
            }
        }
        let step = best.steps[i].get_ref().clone();
        if step.size.is_some() {
            let candidate = with_step(&best, i, Step { size: None, ..step });
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
