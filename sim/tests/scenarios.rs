//! Every scenario file: passes under its default seed, gives a byte-identical trace when run
//! twice, and matches its reviewed snapshot (a behaviour change shows up as a trace diff).
//! Review changed snapshots with `cargo insta review` or rerun with `INSTA_UPDATE=always`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::path::Path;

use p2p_sim::run::run;
use p2p_sim::scenario::Scenario;

fn scenario_files() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    p2p_sim::scenario::files_in(&dir).unwrap()
}

#[test]
fn there_are_at_least_fifteen_scenarios() {
    assert!(scenario_files().len() >= 15);
}

#[test]
fn every_scenario_passes_and_is_deterministic() {
    for file in scenario_files() {
        let scenario = Scenario::load(&file).unwrap();
        let first = run(&scenario, scenario.seed, false);
        assert!(
            first.passed(),
            "{}: {:?}\n{}",
            file.display(),
            first.failures,
            first.trace.text()
        );
        let second = run(&scenario, scenario.seed, false);
        assert_eq!(
            first.trace.text(),
            second.trace.text(),
            "{}: same seed, different trace",
            file.display()
        );
    }
}

#[test]
fn swarm_runs_are_deterministic_too() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/partition-repair.toml");
    let scenario = Scenario::load(&file).unwrap();
    let a = run(&scenario, 77, true);
    let b = run(&scenario, 77, true);
    assert!(a.passed(), "{:?}", a.failures);
    assert_eq!(a.trace, b.trace);
    let c = run(&scenario, 78, true);
    assert_ne!(a.trace, c.trace, "another seed, another run");
}

#[test]
fn traces_match_snapshots() {
    insta::glob!("../../scenarios", "*.toml", |path| {
        let scenario = Scenario::load(path).unwrap();
        let outcome = run(&scenario, scenario.seed, false);
        insta::assert_snapshot!(outcome.trace.text());
    });
}

/// A responder that crashes while a large request streams to it leaves the dialer writing
/// into a connection nobody reads. The endpoint's close must reach that connection's task
/// whatever it is doing, so no run may end with a task still open. 1,000 swarm seeds, as
/// the hardening issue asks; split over two threads.
#[test]
fn crash_during_large_transfer_never_leaks_a_connection_task() {
    const SEEDS: u64 = 1_000;
    let file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/crash-during-large-transfer.toml");
    let scenario = Scenario::load(&file).unwrap();
    let failures: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let scenario = &scenario;
                s.spawn(move || {
                    (0..SEEDS)
                        .filter(|seed| seed % 2 == w)
                        .flat_map(|seed| {
                            let outcome = run(scenario, seed, true);
                            outcome
                                .failures
                                .into_iter()
                                .map(move |f| format!("seed {seed}: {f}"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "{failures:#?}");
}
