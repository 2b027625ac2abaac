//! Shrinking, from outside: failing runs become smaller scenario files that still fail the
//! same way, and replay as plain scenarios under their own seed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::path::Path;
use std::process::Command;

use p2p_handler::endpoint::Sabotage;
use p2p_sim::run::run;
use p2p_sim::scenario::{App, Scenario};
use p2p_sim::shrink::{shrink, signature, to_toml};

#[test]
fn a_wrong_expectation_shrinks_to_a_file_that_run_replays() {
    let dir = std::env::temp_dir().join(format!("p2p-shrink-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wrong.toml");
    std::fs::write(
        &file,
        "[[node]]\nname = \"alice\"\n[[node]]\nname = \"bob\"\n[[node]]\nname = \"carol\"\n\n\
         [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\ncount = 3\n\n\
         [[step]]\nat = \"100ms\"\ndo = \"partition\"\na = \"carol\"\nb = \"bob\"\n\n\
         [[step]]\nat = \"200ms\"\ndo = \"request\"\nfrom = \"carol\"\nto = \"alice\"\nsize = 5000\n\n\
         [[step]]\nat = \"300ms\"\ndo = \"repair\"\na = \"carol\"\nb = \"bob\"\n\n\
         [expect]\nreplied = 2\n",
    )
    .unwrap();
    let out = dir.join("shrunk.toml");
    let sim = || Command::new(env!("CARGO_BIN_EXE_p2p-sim"));
    let done = sim()
        .arg("shrink")
        .arg(&file)
        .args(["--seed", "4", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(text.contains("fails with expected replied"), "{text}");
    let shrunk = Scenario::load(&out).unwrap();
    let original = Scenario::load(&file).unwrap();
    assert!(shrunk.steps.len() < original.steps.len(), "{text}");
    assert!(shrunk.nodes.len() <= original.nodes.len());
    assert_eq!(shrunk.seed, 4, "the failing seed is the file's own");
    // Replayed by a plain run, under its own seed, it fails the same way.
    let replay = sim().arg("run").arg(&out).output().unwrap();
    let replayed = String::from_utf8_lossy(&replay.stdout);
    assert!(!replay.status.success());
    assert!(replayed.contains("expected replied = 2, got"), "{replayed}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_invariant_broken_in_a_fault_swarm_shrinks_to_fewer_steps_that_still_break_it() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/swarm-two-nodes.toml");
    let mut scenario = Scenario::load(&file).unwrap();
    // A handler with dedupe off, behind a slow application: a resend that arrives while
    // Bob's application still has the request is delivered again, in some of the swarm's
    // schedules.
    scenario.nodes[1].app = App::Slow {
        reply_after: std::time::Duration::from_secs(1),
    };
    scenario.sabotage = Some(Sabotage::NoDedupe);
    let seed = (0..100)
        .find(|&seed| {
            run(&scenario, seed, true)
                .failures
                .iter()
                .any(|f| signature(f) == "duplicate")
        })
        .expect("a seed where dedupe matters");
    let shrunk = shrink(&scenario, seed, true).unwrap();
    assert_eq!(shrunk.signature, "duplicate");
    eprintln!(
        "seed {seed}: {} -> {} steps, {} -> {} nodes, {} runs",
        shrunk.steps.0, shrunk.steps.1, shrunk.nodes.0, shrunk.nodes.1, shrunk.runs
    );
    assert!(
        shrunk.steps.1 < shrunk.steps.0,
        "{} of {} steps",
        shrunk.steps.1,
        shrunk.steps.0
    );
    // The written file, read back (the defect is not part of a file: plant it again),
    // replays under its own seed without swarm mode and fails the same way.
    let text = to_toml(&shrunk.scenario).unwrap();
    let mut replay = Scenario::parse(&text, "<shrunk>", "shrunk").unwrap();
    assert!(replay.swarm.is_none(), "the drawn steps are written out");
    replay.sabotage = Some(Sabotage::NoDedupe);
    let outcome = run(&replay, replay.seed, false);
    assert!(
        outcome.failures.iter().any(|f| f.starts_with("duplicate:")),
        "{:?}\n{text}",
        outcome.failures
    );
    // And on the real handler the same file passes: the failure is the defect's.
    replay.sabotage = None;
    let sound = run(&replay, replay.seed, false);
    assert!(sound.passed(), "{:?}", sound.failures);
}

/// Every scenario file, in name order.
fn scenario_files() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// Plants `defect`, finds the first failing run (seed by seed over every scenario, in
/// swarm mode or at each file's own seed), shrinks it, and replays the shrunk file as
/// written: on the broken handler it fails the same way, on the sound one it passes.
/// Returns what it shrank, for the report.
fn shrink_never_lies(defect: Sabotage, swarm: bool, seeds: u64) -> Option<String> {
    let files = scenario_files();
    let mut found = None;
    'search: for seed in 0..seeds {
        for file in &files {
            let mut scenario = Scenario::load(file).unwrap();
            scenario.sabotage = Some(defect);
            let seed = if swarm { seed } else { scenario.seed };
            if !run(&scenario, seed, swarm).passed() {
                found = Some((scenario, seed));
                break 'search;
            }
        }
        if !swarm {
            break;
        }
    }
    let (scenario, seed) = found?;
    let shrunk = shrink(&scenario, seed, swarm)
        .unwrap_or_else(|e| panic!("{defect:?}, {} seed {seed}: {e}", scenario.name));
    let text = to_toml(&shrunk.scenario).unwrap();
    let mut replay = Scenario::parse(&text, "<shrunk>", "shrunk").unwrap();
    replay.sabotage = Some(defect);
    let broken = run(&replay, replay.seed, false);
    assert!(
        broken
            .failures
            .iter()
            .any(|f| signature(f) == shrunk.signature),
        "{defect:?}: the shrunk file no longer fails with {}: {:?}\n{text}",
        shrunk.signature,
        broken.failures
    );
    replay.sabotage = None;
    let sound = run(&replay, replay.seed, false);
    assert!(
        sound.passed(),
        "{defect:?}: the shrunk file of {} (seed {seed}) fails on the sound handler: {:?}\n{text}",
        scenario.name,
        sound.failures
    );
    Some(format!(
        "{defect:?}: {} seed {seed}{}: {} -> {} steps, {}",
        scenario.name,
        if swarm { " swarm" } else { "" },
        shrunk.steps.0,
        shrunk.steps.1,
        shrunk.signature
    ))
}

#[test]
fn a_shrunk_double_outcome_fails_only_on_the_broken_handler() {
    let done = shrink_never_lies(Sabotage::DoubleOutcome, false, 1);
    assert!(done.is_some(), "no scenario caught the defect");
}

#[test]
#[ignore = "heavy: .ci/run runs it (cargo test --release -p p2p-sim --test shrink -- --ignored)"]
fn every_defect_shrinks_to_a_file_that_fails_only_on_the_broken_handler() {
    let mut report = Vec::new();
    for defect in Sabotage::ALL {
        // The scenarios' own runs (expectations too), then the sweeps (invariants and model).
        for swarm in [false, true] {
            if let Some(line) = shrink_never_lies(defect, swarm, 10) {
                report.push(line);
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(report.len() >= Sabotage::ALL.len(), "{report:#?}");
}
