//! Sweep results as data: one JSON line per run ([`RunRecord`]), and the report built from
//! any set of them ([`summary`]), so that the shards of a sweep run on many machines merge
//! into the same report an unsharded sweep prints.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::run::Outcome;

/// One run, as `sweep --json` writes it (one object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Scenario name.
    pub scenario: String,
    /// The scenario file, as given on the command line.
    pub file: String,
    /// Seed.
    pub seed: u64,
    /// Whether swarm randomisation was on.
    pub swarm: bool,
    /// `pass` or `fail`.
    pub verdict: String,
    /// Requests issued.
    pub exchanges: u64,
    /// Steps the handler refused.
    pub refused: u64,
    /// Resends, all nodes.
    pub resends: u64,
    /// Redials, all nodes.
    pub redials: u64,
    /// Virtual time simulated, in milliseconds.
    pub virtual_ms: u64,
    /// What broke; empty when the run passed.
    pub failures: Vec<String>,
    /// The command that replays a failing run.
    pub reproduce: Option<String>,
    /// What the run exercised (see [`crate::coverage`]), sorted.
    pub coverage: Vec<String>,
    /// The shard of the sweep that made the run, as `K/M` (absent: an unsharded sweep), so
    /// that `merge` can tell a complete set of shards from one with a shard missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
}

impl RunRecord {
    /// The record of `outcome`, run from `file`; `reproduce` is set for failures only.
    pub fn new(file: &str, outcome: &Outcome, reproduce: String) -> Self {
        Self {
            scenario: outcome.scenario.clone(),
            file: file.to_owned(),
            seed: outcome.seed,
            swarm: outcome.swarm,
            verdict: if outcome.passed() { "pass" } else { "fail" }.to_owned(),
            exchanges: outcome.exchanges as u64,
            refused: outcome.refused as u64,
            resends: outcome.resends,
            redials: outcome.redials,
            virtual_ms: u64::try_from(outcome.virtual_time.as_millis()).unwrap_or(u64::MAX),
            failures: outcome.failures.clone(),
            reproduce: (!outcome.passed()).then_some(reproduce),
            coverage: outcome.coverage.iter().cloned().collect(),
            shard: None,
        }
    }

    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        self.verdict == "pass"
    }
}

/// Checks that `records` (from `merge`'s files) are a whole sweep: at least one run, all
/// of one sharding, and every shard K of M present (unless `allow_missing`). Errors say
/// what is missing.
pub fn check_complete(records: &[RunRecord], allow_missing: bool) -> Result<(), String> {
    if records.is_empty() {
        return Err("no runs in the files: nothing to merge".into());
    }
    let mut shards: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut unsharded = false;
    for r in records {
        match &r.shard {
            None => unsharded = true,
            Some(text) => {
                let (k, m) = text
                    .split_once('/')
                    .and_then(|(k, m)| Some((k.parse::<u64>().ok()?, m.parse::<u64>().ok()?)))
                    .filter(|(k, m)| *k >= 1 && k <= m)
                    .ok_or_else(|| {
                        format!("{} seed {}: shard {text:?} is not K/M", r.file, r.seed)
                    })?;
                shards.entry(m).or_default().insert(k);
            }
        }
    }
    if unsharded && !shards.is_empty() || shards.len() > 1 {
        return Err("the files mix sweeps sharded differently (or not at all)".into());
    }
    if let Some((m, present)) = shards.iter().next() {
        let missing: Vec<String> = (1..=*m)
            .filter(|k| !present.contains(k))
            .map(|k| format!("{k}/{m}"))
            .collect();
        if !missing.is_empty() && !allow_missing {
            return Err(format!(
                "shard {} missing: the report would not cover the sweep \
                 (give --allow-missing to merge what is here)",
                missing.join(", ")
            ));
        }
    }
    Ok(())
}

/// Parses `sweep --json` output: one record per non-empty line; errors name the line.
pub fn parse_lines(text: &str, origin: &str) -> Result<Vec<RunRecord>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("{origin}: line {}: {e}", i + 1)))
        .collect()
}

/// The report of a set of runs, the same whatever order they came in: totals, each failure
/// with its reproduce command, and with `coverage`, how many runs hit each item, the items
/// no run reached, and items hit outside the known set.
pub fn summary(records: &[RunRecord], coverage: bool) -> String {
    let mut records: Vec<&RunRecord> = records.iter().collect();
    records.sort_by(|a, b| (&a.scenario, a.seed, &a.file).cmp(&(&b.scenario, b.seed, &b.file)));
    let failed: Vec<&&RunRecord> = records.iter().filter(|r| !r.passed()).collect();
    let scenarios: BTreeSet<&str> = records.iter().map(|r| r.scenario.as_str()).collect();
    let mut out = String::new();
    let sum = |f: fn(&RunRecord) -> u64| records.iter().map(|r| f(r)).sum::<u64>();
    let _ = writeln!(
        out,
        "{} runs of {} scenarios: {} passed, {} failed ({} exchanges, {} resends, {} redials)",
        records.len(),
        scenarios.len(),
        records.len() - failed.len(),
        failed.len(),
        sum(|r| r.exchanges),
        sum(|r| r.resends),
        sum(|r| r.redials),
    );
    for r in &failed {
        let _ = writeln!(
            out,
            "FAILED {} seed {}: {}",
            r.scenario,
            r.seed,
            r.failures.join("; ")
        );
        if let Some(command) = &r.reproduce {
            let _ = writeln!(out, "  reproduce: {command}");
        }
    }
    if coverage {
        out.push_str(&coverage_report(&records));
    }
    out
}

fn coverage_report(records: &[&RunRecord]) -> String {
    let mut hits: BTreeMap<&str, u64> = BTreeMap::new();
    for r in records {
        for item in &r.coverage {
            *hits.entry(item.as_str()).or_insert(0) += 1;
        }
    }
    let universe = crate::coverage::universe();
    let mut out = format!(
        "\ncoverage over {} runs (runs that hit each item):\n",
        records.len()
    );
    for item in &universe {
        let n = hits.get(item.as_str()).copied().unwrap_or(0);
        let _ = writeln!(out, "{n:>8}  {item}");
    }
    let missed: Vec<&String> = universe
        .iter()
        .filter(|i| !hits.contains_key(i.as_str()))
        .collect();
    let _ = writeln!(out, "not reached by any run: {}", missed.len());
    for item in missed {
        let _ = writeln!(out, "  {item}");
    }
    let outside: Vec<(&&str, &u64)> = hits
        .iter()
        .filter(|(i, _)| !universe.contains(**i))
        .collect();
    if !outside.is_empty() {
        let _ = writeln!(
            out,
            "hit but not in the diagrams (update them, or the list in coverage.rs):"
        );
        for (item, n) in outside {
            let _ = writeln!(out, "{n:>8}  {item}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn record(scenario: &str, seed: u64, passed: bool, coverage: &[&str]) -> RunRecord {
        RunRecord {
            scenario: scenario.into(),
            file: format!("scenarios/{scenario}.toml"),
            seed,
            swarm: true,
            verdict: if passed { "pass" } else { "fail" }.into(),
            exchanges: 2,
            refused: 0,
            resends: 1,
            redials: 0,
            virtual_ms: 100,
            failures: if passed { vec![] } else { vec!["boom".into()] },
            reproduce: (!passed).then(|| format!("p2p-sim trace x --seed {seed}")),
            coverage: coverage.iter().map(|s| (*s).to_owned()).collect(),
            shard: None,
        }
    }

    #[test]
    fn the_report_does_not_depend_on_the_order_of_runs_and_json_round_trips() {
        let runs = vec![
            record("b", 2, true, &["message Request", "step drop"]),
            record("a", 1, false, &["message Request", "dialer Odd -> State"]),
            record("a", 3, true, &[]),
        ];
        let mut reversed = runs.clone();
        reversed.reverse();
        assert_eq!(summary(&runs, true), summary(&reversed, true));
        let text = summary(&runs, true);
        assert!(
            text.starts_with("3 runs of 2 scenarios: 2 passed, 1 failed"),
            "{text}"
        );
        assert!(text.contains("FAILED a seed 1: boom\n  reproduce: p2p-sim trace x --seed 1"));
        assert!(text.contains("       2  message Request"), "{text}");
        assert!(text.contains("       1  step drop"), "{text}");
        assert!(
            text.contains("  step partition\n"),
            "unreached items are listed: {text}"
        );
        assert!(text.contains("       1  dialer Odd -> State"), "{text}");
        let lines: String = runs
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        assert_eq!(parse_lines(&lines, "x").unwrap(), runs);
        let e = parse_lines("{\"scenario\": 1}\n", "shard-2.jsonl").unwrap_err();
        assert!(e.starts_with("shard-2.jsonl: line 1:"), "{e}");
    }
}
