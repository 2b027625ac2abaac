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
