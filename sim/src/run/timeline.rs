//! Which steps are due: timed steps, fired triggers and a crash-prone app's restarts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::steps::{crash, execute, restart};
use super::tap::{Matcher, Waiting};
use super::world::{Shared, lock};
use crate::scenario::{App, Scenario};

/// A timed or triggered step, ready to run.
pub(super) struct Timeline {
    /// (virtual time, step index), in time order.
    pub(super) timed: VecDeque<(Duration, usize)>,
    /// (virtual time, node) restarts scheduled by crash-prone apps.
    pub(super) restarts: Vec<(Duration, usize)>,
    /// Virtual time of the last fault or heal.
    pub(super) last_fault: Duration,
    /// Links whose fail rate is above zero (names sorted), and whether the whole network's
    /// is: while any is, connections break at random, and every tick counts as a fault.
    pub(super) lossy: BTreeSet<(String, String)>,
    pub(super) lossy_everywhere: bool,
    /// Step name -> the steps that run `after` it, in file order.
    pub(super) dependents: BTreeMap<String, Vec<usize>>,
}

impl Timeline {
    /// Timed steps in time order; triggered steps wait in `s.waiting` for their message.
    pub(super) fn new(scenario: &Scenario, s: &mut Shared) -> Self {
        let mut timed: Vec<(Duration, usize)> = Vec::new();
        let mut dependents: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, step) in scenario.steps.iter().enumerate() {
            let step = step.get_ref();
            if let Some(after) = &step.after {
                dependents.entry(after.clone()).or_default().push(i);
                continue;
            }
            match &step.on {
                Some(trigger) => s.waiting.push(Waiting {
                    step: i,
                    matches: Matcher::new(&trigger.message, scenario),
                    sent: trigger.sent,
                    nth: trigger.nth.max(1),
                    seen: 0,
                }),
                None => timed.push((step.at.unwrap_or_default(), i)),
            }
        }
        timed.sort_by_key(|(at, i)| (*at, *i));
        let mut timeline = Self {
            timed: timed.into(),
            restarts: Vec::new(),
            last_fault: Duration::ZERO,
            lossy: BTreeSet::new(),
            lossy_everywhere: scenario.network.fail_rate > 0.0,
            dependents,
        };
        for link in &scenario.network.links {
            if let Some(rate) = link.fail_rate {
                timeline.set_fail_rate(&link.a, &link.b, rate);
            }
        }
        timeline
    }

    /// A link's fail rate changed.
    pub(super) fn set_fail_rate(&mut self, a: &str, b: &str, rate: f64) {
        let link = if a <= b { (a, b) } else { (b, a) };
        let link = (link.0.to_owned(), link.1.to_owned());
        if rate > 0.0 {
            self.lossy.insert(link);
        } else {
            self.lossy.remove(&link);
        }
    }

    /// Step `i` ran at `now`: the steps `after` it are due their `at` later.
    fn ran(&mut self, scenario: &Scenario, i: usize, now: Duration) {
        let Some(name) = scenario
            .steps
            .get(i)
            .and_then(|s| s.get_ref().name.as_ref())
        else {
            return;
        };
        for &j in self.dependents.get(name).into_iter().flatten() {
            let at = now + scenario.steps[j].get_ref().at.unwrap_or_default();
            let pos = self.timed.partition_point(|&(t, k)| (t, k) <= (at, j));
            self.timed.insert(pos, (at, j));
        }
    }

    /// A tick passed: while a fail rate breaks connections, the liveness clock measures
    /// from now.
    pub(super) fn tick(&mut self, now: Duration) {
        if self.is_lossy() {
            self.last_fault = now;
        }
    }

    /// Whether a fail rate above zero breaks connections somewhere.
    pub(super) fn is_lossy(&self) -> bool {
        self.lossy_everywhere || !self.lossy.is_empty()
    }

    /// Whether anything is still to run: a step, a restart, a fired trigger, a crash an
    /// app asked for, or a membership document still spreading (members behind the newest
    /// keep the run going until the time limit, where the convergence invariant reports
    /// them).
    pub(super) fn busy(&self, s: &Shared, up: &[bool]) -> bool {
        !self.timed.is_empty()
            || !self.restarts.is_empty()
            || !s.fired.is_empty()
            || !s.crash_requests.is_empty()
            || !s.exits.is_empty()
            || s.attacks.iter().any(|a| a.open > 0)
            || s.membership
                .as_ref()
                .is_some_and(|m| !m.behind(up).is_empty())
    }
}

/// Exchanges issued by live incarnations that have no outcome yet.
pub(super) fn pending_exchanges(s: &Shared) -> usize {
    s.outcomes
        .iter()
        .filter(|((node, inc, _), n)| {
            **n == 0 && s.nodes[*node].up && s.incarnation_key(*node) == *inc
        })
        .count()
}

pub(super) fn run_due_steps(
    sim: &mut turmoil::Sim<'_>,
    shared: &Arc<Mutex<Shared>>,
    scenario: &Scenario,
    timeline: &mut Timeline,
    now: Duration,
) {
    let (mut fired, crashes, exits): (Vec<usize>, Vec<usize>, Vec<(usize, u64)>) = {
        let mut s = lock(shared);
        (
            s.fired.drain(..).collect(),
            s.crash_requests.drain(..).collect(),
            s.exits.drain(..).collect(),
        )
    };
    // Processes whose handler stopped exit first: a restart due in this tick then brings
    // them back, rather than being cut short by the exit.
    for (node, incarnation) in exits {
        let current = {
            let s = lock(shared);
            s.nodes[node].up && s.nodes[node].incarnation == incarnation
        };
        if current {
            crash(
                sim,
                shared,
                node,
                "its handler stopped (store failed)".into(),
            );
            timeline.last_fault = now;
        }
    }
    // Until nothing is due: a step `after` another with no delay runs in the same tick.
    loop {
        let mut due: Vec<usize> = Vec::new();
        while timeline.timed.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, i)) = timeline.timed.pop_front() {
                due.push(i);
            }
        }
        due.append(&mut fired);
        if due.is_empty() {
            break;
        }
        for i in due {
            if let Some(step) = scenario.steps.get(i) {
                execute(sim, shared, scenario, timeline, i, step.get_ref(), now);
                timeline.ran(scenario, i, now);
            }
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
