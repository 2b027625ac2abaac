//! The trace pictures a person reads: every scenario's SVG parsed as a viewer would, with
//! no text outside the canvas, faults drawn as bands over the time they lasted, plain
//! reasons in labels, and Mermaid that shows `bob#1` as written. The rendered example in
//! `docs/trace-example.svg` is the picture of `scenarios/partition-repair.toml` as this
//! build draws it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::path::Path;

use p2p_sim::run::run;
use p2p_sim::scenario::Scenario;

mod svg_check;
use svg_check::problems;

#[test]
fn a_fault_is_a_band_over_the_time_it_lasted_and_the_docs_example_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let scenario = Scenario::load(&root.join("scenarios/partition-repair.toml")).unwrap();
    let outcome = run(&scenario, scenario.seed, false);
    let svg = outcome.trace.svg(&outcome.nodes);
    assert!(problems(&svg).is_empty(), "{:?}", problems(&svg));
    let doc = roxmltree::Document::parse(&svg).unwrap();
    // The partition's band reaches from its row down to the repair's.
    let band = doc
        .descendants()
        .find(|n| n.has_tag_name("rect") && n.attribute("fill") == Some("#fde2e2"))
        .expect("a fault band");
    let rows: f64 = band.attribute("height").unwrap().parse().unwrap();
    assert!(
        rows > 60.0,
        "a band of {rows} px is one row, not the partition's time"
    );
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .collect();
    assert!(
        texts.iter().any(|t| t.starts_with("partition ")),
        "{texts:?}"
    );
    assert!(texts.iter().any(|t| t.starts_with("repair ")), "{texts:?}");
    let mermaid = outcome.trace.mermaid(&outcome.nodes);
    assert!(mermaid.contains("(until "), "{mermaid}");
    assert!(mermaid.contains("alice#35;1"), "{mermaid}");
    // The example in the docs is this very picture.
    let shown = root.join("docs/trace-example.svg");
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&shown, &svg).unwrap();
    }
    let current = std::fs::read_to_string(&shown).unwrap_or_default();
    assert!(
        current == svg,
        "docs/trace-example.svg is out of date: run `UPDATE_DOCS=1 cargo test -p p2p-sim \
         --test pictures` and look at it"
    );
}
