//! Guided exploration: deterministic whatever the number of jobs, keeps what reached new
//! items, derives runs that replay from their written-down form, and reports a planted
//! defect as a broken run (not as a suspect one).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::path::Path;

use p2p_handler::endpoint::Sabotage;
use p2p_sim::explore::guided;
use p2p_sim::scenario::Scenario;

fn load(names: &[&str]) -> Vec<Scenario> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    names
        .iter()
        .map(|n| Scenario::load(&dir.join(format!("{n}.toml"))).unwrap())
        .collect()
}

#[test]
fn the_same_seed_explores_the_same_way_on_one_job_or_two() {
    let scenarios = load(&["lost-ack", "partition-repair"]);
    let one = guided(&scenarios, 24, 1, 7);
    let two = guided(&scenarios, 24, 2, 7);
    assert_eq!(one.runs, 24);
    assert_eq!(one.items, two.items);
    assert_eq!(one.kept, two.kept);
    assert_eq!(one.growth, two.growth);
    // It kept runs, and derived later ones from them: items beyond the first batch's.
    assert!(one.kept > 2, "kept {}", one.kept);
    assert!(one.growth.windows(2).all(|w| w[0].1 <= w[1].1));
    assert!(
        one.items.iter().any(|i| i.starts_with("pair dialer")),
        "{:?}",
        one.items
    );
    assert!(
        one.items.iter().any(|i| i.contains(" under ")),
        "{:?}",
        one.items
    );
    assert!(one.failures.is_empty(), "{:?}", one.failures);
}

#[test]
fn a_planted_defect_is_reported_as_broken_and_its_file_replays_the_failure() {
    let mut scenarios = load(&["lost-ack"]);
    scenarios[0].sabotage = Some(Sabotage::NoDedupe);
    let report = guided(&scenarios, 16, 2, 1);
    let (name, seed, failures, written) = report.broken().next().expect("a broken run");
    assert_eq!(name, "lost-ack");
    assert!(
        failures.iter().any(|f| f.starts_with("duplicate:")),
        "{failures:?}"
    );
    // The written-down run replays the failure (the defect is planted again: it is not
    // part of a file), and passes on the sound handler.
    let text = p2p_sim::shrink::to_toml(written).unwrap();
    let mut replay = Scenario::parse(&text, "<explored>", "explored").unwrap();
    replay.sabotage = Some(Sabotage::NoDedupe);
    let again = p2p_sim::run::run(&replay, *seed, false);
    assert!(
        again.failures.iter().any(|f| f.starts_with("duplicate:")),
        "{:?}",
        again.failures
    );
    replay.sabotage = None;
    let sound = p2p_sim::run::run(&replay, *seed, false);
    assert!(sound.passed(), "{:?}", sound.failures);
}
