//! The simulator: virtual seconds per wall second for a two-node scenario, and the time for
//! one seed of the whole `scenarios/` set (seeds per second = 1 / that).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use p2p_sim::run::run;
use p2p_sim::scenario::Scenario;

/// Two nodes exchanging back to back for 20 virtual seconds (200 requests, 100 ms replies).
pub const TWO_NODES: &str = r#"
duration = "60s"
config = { max_queued_per_peer = 256 }
[[node]]
name = "alice"
[[node]]
name = "bob"
app = { slow = { reply_after = "100ms" } }
[[step]]
do = "request"
from = "alice"
to = "bob"
count = 200
"#;

fn two_nodes(c: &mut Criterion) {
    let scenario = Scenario::parse(TWO_NODES, "two-nodes", "two-nodes").unwrap();
    let outcome = run(&scenario, 1, false);
    assert!(outcome.passed(), "{:?}", outcome.failures);
    assert_eq!(outcome.exchanges, 200, "every request was accepted");
    // The report divides this run's virtual time by the measured wall time.
    println!(
        "sim/two_nodes virtual_seconds {:.3}",
        outcome.virtual_time.as_secs_f64()
    );
    let mut group = c.benchmark_group("sim");
    group.sample_size(10);
    group.bench_function("two_nodes_run", |b| b.iter(|| run(&scenario, 1, false)));
    group.finish();
}

fn all_scenarios(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let files = p2p_sim::scenario::files_in(&dir).unwrap();
    let scenarios: Vec<Scenario> = files.iter().map(|f| Scenario::load(f).unwrap()).collect();
    let mut group = c.benchmark_group("sim");
    group.sample_size(10);
    group.bench_function("all_scenarios_one_seed", |b| {
        let mut seed = 0;
        b.iter(|| {
            seed += 1;
            for s in &scenarios {
                run(s, seed, true);
            }
        });
    });
    group.finish();
}

criterion_group!(sim, two_nodes, all_scenarios);
criterion_main!(sim);
