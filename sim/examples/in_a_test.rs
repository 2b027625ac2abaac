//! A simulation written in code, as turmoil's users write theirs inside a `#[test]`: the
//! same handler on virtual TCP, the same invariants and reference model as the TOML
//! scenarios of `scenarios/`, and the same trace for the same seed.
//!
//! ```text
//! cargo run -p p2p-sim --example in_a_test      # prints the trace
//! cargo test -p p2p-sim --example in_a_test     # runs the tests below
//! ```
//!
//! Alice sends five requests to Bob; the link between them is cut 20 ms in and mended 2 s
//! later. Every request must be answered exactly once all the same (Alice resends and
//! redials; Bob's dedupe keeps his application from seeing a request twice), and the
//! simulator's built-in invariants check the rest: one outcome per exchange, order per
//! peer, nothing leaked, the model of what each exchange may do.

use std::time::Duration;

use p2p_sim::run::{Outcome, run};
use p2p_sim::scenario::{ActionKind, Count, Scenario, Step};

fn main() -> Result<(), String> {
    let outcome = simulate(7)?;
    print!("{}", outcome.trace.text());
    if outcome.passed() {
        println!(
            "passed: {} exchanges, {} resends",
            outcome.exchanges, outcome.resends
        );
        Ok(())
    } else {
        Err(format!("failed: {:#?}", outcome.failures))
    }
}

/// The scenario, in code; run under `seed`.
fn simulate(seed: u64) -> Result<Outcome, String> {
    let mut scenario = Scenario::with_nodes(["alice", "bob"])?;
    scenario
        .push(Step::request("alice", "bob").count(5))?
        .push(Step::link(ActionKind::Partition, "alice", "bob").at(Duration::from_millis(20)))?
        .push(Step::link(ActionKind::Repair, "alice", "bob").at(Duration::from_secs(2)))?;
    scenario.expect.delivered = Some(Count::Exactly(5));
    scenario.expect.replied = Some(Count::Exactly(5));
    scenario.expect.failed = Some(Count::Exactly(0));
    Ok(run(&scenario, seed, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_is_answered_once_across_a_partition() {
        let outcome = simulate(7).unwrap();
        assert!(
            outcome.passed(),
            "{:#?}\n{}",
            outcome.failures,
            outcome.trace.text()
        );
        assert!(
            outcome.trace.text().contains("partition"),
            "the fault happened"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_trace_byte_for_byte() {
        let (a, b) = (simulate(11).unwrap(), simulate(11).unwrap());
        assert_eq!(a.trace.text(), b.trace.text());
    }

    #[test]
    fn a_step_that_names_no_node_is_refused_when_pushed() {
        let mut scenario = Scenario::with_nodes(["alice", "bob"]).unwrap();
        let err = scenario
            .push(Step::request("alice", "carol"))
            .err()
            .unwrap();
        assert!(err.contains("carol"), "{err}");
        assert!(scenario.steps.is_empty(), "the refused step was kept");
    }
}
