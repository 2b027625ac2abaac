//! `p2p-sim`: run scenarios, sweep seeds, write traces.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use p2p_handler::endpoint::Sabotage;
use p2p_sim::report::{RunRecord, parse_lines, summary};
use p2p_sim::run::{Outcome, run};
use p2p_sim::scenario::Scenario;

#[derive(Parser)]
#[command(
    name = "p2p-sim",
    version,
    about = "Deterministic simulation of p2p-handler nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run scenario files (or every .toml in the given directories) under their default seed.
    Run {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Use this seed instead of each scenario's own.
        #[arg(long)]
        seed: Option<u64>,
        /// Randomise latency and step timing from the seed (invariants only).
        #[arg(long)]
        swarm: bool,
    },
    /// Run every scenario over many seeds in swarm mode, in parallel.
    Sweep {
        /// Files or directories (default: scenarios/).
        paths: Vec<PathBuf>,
        /// Seeds per scenario (at least 1).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
        seeds: u64,
        /// First seed.
        #[arg(long, default_value_t = 0)]
        first_seed: u64,
        /// Parallel jobs (default: the number of cores; 1 to 1024).
        #[arg(long, value_parser = parse_jobs)]
        jobs: Option<usize>,
        /// Run only shard K of M (as K/M, 1-based): split a sweep across machines.
        #[arg(long, value_parser = parse_shard)]
        shard: Option<(u64, u64)>,
        /// Also write one JSON line per run to this file (`-`: stdout, the report then goes
        /// to stderr). `p2p-sim merge` combines the files of a sharded sweep.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Report how many runs hit each state transition, message kind, reason and step,
        /// and what no run reached.
        #[arg(long)]
        coverage: bool,
        /// Plant this defect in every node's handler (one of `p2p-sim defects`): how a
        /// sweep is seen to catch a bug no scenario was written for.
        #[arg(long, value_parser = parse_defect)]
        plant: Option<Sabotage>,
    },
    /// Guided exploration: keep the runs that reach an item no run reached before
    /// (transitions, pairs of transitions, transitions under each combination of faults,
    /// messages, reasons) and derive the next runs from them. Failing runs are written
    /// down as scenario files `p2p-sim run` replays.
    Explore {
        /// Files or directories (default: scenarios/).
        paths: Vec<PathBuf>,
        /// Runs to make (at least 1).
        #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..))]
        runs: u64,
        /// Parallel jobs (default: the number of cores; 1 to 1024). The result does not
        /// depend on it.
        #[arg(long, value_parser = parse_jobs)]
        jobs: Option<usize>,
        /// Seed of the exploration's own choices.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also make as many runs of a uniform sweep and compare the items reached.
        #[arg(long)]
        compare: bool,
        /// Plant this defect in every node's handler (one of `p2p-sim defects`).
        #[arg(long, value_parser = parse_defect)]
        plant: Option<Sabotage>,
        /// Where failing runs are written.
        #[arg(long, default_value = "traces/explore")]
        out: PathBuf,
    },
    /// List the defects `sweep --plant` can plant.
    Defects,
    /// Turn a failing run into the smallest scenario file that still fails the same way
    /// (its random choices written down as explicit steps, then steps, nodes and values
    /// removed while the failure persists). `p2p-sim run` replays the result.
    Shrink {
        /// Scenario file.
        file: PathBuf,
        /// The failing seed.
        #[arg(long)]
        seed: u64,
        /// The failure came from a sweep (swarm mode).
        #[arg(long)]
        swarm: bool,
        /// Where to write the result (default: traces/<scenario>-seed<N>-shrunk.toml).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The failure came from a sweep with this defect planted (`sweep --plant`).
        #[arg(long, value_parser = parse_defect)]
        plant: Option<Sabotage>,
    },
    /// Combine the `sweep --json` files of a sharded sweep into the report an unsharded
    /// sweep prints.
    Merge {
        /// JSON-lines files written by `sweep --json`.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Include the coverage report.
        #[arg(long)]
        coverage: bool,
        /// Merge even if a shard of the sweep is missing (the report then says so).
        #[arg(long)]
        allow_missing: bool,
    },
    /// Write one run's trace (text) and sequence diagram (Mermaid).
    Trace {
        /// Scenario file.
        file: PathBuf,
        /// Seed (default: the scenario's own).
        #[arg(long)]
        seed: Option<u64>,
        /// Randomise as in a sweep.
        #[arg(long)]
        swarm: bool,
        /// Output directory.
        #[arg(long, default_value = "traces")]
        out: PathBuf,
    },
}

fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ 1..=1024) => Ok(n),
        _ => Err(format!("{s:?}: jobs must be 1 to 1024")),
    }
}

fn parse_shard(s: &str) -> Result<(u64, u64), String> {
    let (k, m) = s.split_once('/').ok_or("shard is K/M, e.g. 2/8")?;
    let k: u64 = k.parse().map_err(|_| "K must be a number")?;
    let m: u64 = m.parse().map_err(|_| "M must be a number")?;
    if m == 0 || k == 0 || k > m {
        return Err("need 1 <= K <= M".into());
    }
    Ok((k, m))
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Run { paths, seed, swarm } => cmd_run(&paths, seed, swarm),
        Cmd::Sweep {
            paths,
            seeds,
            first_seed,
            jobs,
            shard,
            json,
            coverage,
            plant,
        } => cmd_sweep(
            &paths,
            &SweepPlan {
                seeds,
                first_seed,
                jobs,
                shard,
                plant,
            },
            json.as_deref(),
            coverage,
        ),
        Cmd::Explore {
            paths,
            runs,
            jobs,
            seed,
            compare,
            plant,
            out,
        } => cmd_explore(&paths, runs as usize, jobs, seed, compare, plant, &out),
        Cmd::Defects => {
            for defect in Sabotage::ALL {
                println!("{defect:?}");
            }
            ExitCode::SUCCESS
        }
        Cmd::Merge {
            files,
            coverage,
            allow_missing,
        } => cmd_merge(&files, coverage, allow_missing),
        Cmd::Shrink {
            file,
            seed,
            swarm,
            out,
            plant,
        } => cmd_shrink(&file, seed, swarm, out, plant),
        Cmd::Trace {
            file,
            seed,
            swarm,
            out,
        } => cmd_trace(&file, seed, swarm, &out),
    }
}

/// Scenario files under `paths`, sorted, each loaded (or the error that stops the run).
fn load_all(paths: &[PathBuf]) -> Result<Vec<(PathBuf, Scenario)>, String> {
    let mut files = Vec::new();
    let paths: Vec<PathBuf> = if paths.is_empty() {
        vec![PathBuf::from("scenarios")]
    } else {
        paths.to_vec()
    };
    for path in &paths {
        if path.is_dir() {
            let found = p2p_sim::scenario::files_in(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    if files.is_empty() {
        return Err("no scenario files found".into());
    }
    files
        .into_iter()
        .map(|f| {
            Scenario::load(&f)
                .map(|s| (f, s))
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// A command that replays one run with its trace, valid from where this one was started:
/// this very executable (by its absolute path) and the scenario path as given.
/// This program's path, as a shell word.
fn reproduce_exe() -> String {
    std::env::current_exe().map_or_else(|_| "p2p-sim".to_owned(), |p| shell_word(&p))
}

fn reproduce(path: &Path, seed: u64, swarm: bool) -> String {
    let exe = reproduce_exe();
    format!(
        "{exe} trace {} --seed {seed}{}",
        shell_word(path),
        if swarm { " --swarm" } else { "" }
    )
}

/// `path` as one word of a POSIX shell: as it is when that is safe, else single-quoted.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

fn cmd_run(paths: &[PathBuf], seed: Option<u64>, swarm: bool) -> ExitCode {
    let scenarios = match load_all(paths) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("p2p-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{:<34} {:>7} {:>9} {:>7} {:>7} {:>7} {:>9} {:>8}",
        "scenario", "verdict", "exchanges", "refused", "resends", "redials", "virtual", "wall"
    );
    let mut failed = Vec::new();
    for (path, scenario) in &scenarios {
        let seed = seed.unwrap_or(scenario.seed);
        let outcome = run(scenario, seed, swarm);
        print_row(&outcome);
        if !outcome.passed() {
            failed.push((path.clone(), outcome));
        }
    }
    for (path, outcome) in &failed {
        println!("\nFAILED {} (seed {}):", outcome.scenario, outcome.seed);
        for f in &outcome.failures {
            println!("  - {f}");
        }
        println!(
            "  reproduce: {}",
            reproduce(path, outcome.seed, outcome.swarm)
        );
    }
    println!(
        "\n{} passed, {} failed",
        scenarios.len() - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_row(o: &Outcome) {
    println!(
        "{:<34} {:>7} {:>9} {:>7} {:>7} {:>7} {:>9} {:>8}",
        o.scenario,
        if o.passed() { "pass" } else { "FAIL" },
        o.exchanges,
        o.refused,
        o.resends,
        o.redials,
        secs(o.virtual_time),
        secs(o.wall_time)
    );
}

/// Which runs a sweep makes.
struct SweepPlan {
    seeds: u64,
    first_seed: u64,
    jobs: Option<usize>,
    shard: Option<(u64, u64)>,
    plant: Option<Sabotage>,
}

fn parse_defect(s: &str) -> Result<Sabotage, String> {
    Sabotage::ALL
        .into_iter()
        .find(|d| format!("{d:?}").eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("no defect {s:?}: `p2p-sim defects` lists them"))
}

fn cmd_explore(
    paths: &[PathBuf],
    runs: usize,
    jobs: Option<usize>,
    seed: u64,
    compare: bool,
    plant: Option<Sabotage>,
    out: &Path,
) -> ExitCode {
    let scenarios: Vec<Scenario> = match load_all(paths) {
        Ok(s) => s
            .into_iter()
            .map(|(_, mut s)| {
                s.sabotage = plant;
                s
            })
            .collect(),
        Err(e) => {
            eprintln!("p2p-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let jobs = jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let started = std::time::Instant::now();
    let guided = p2p_sim::explore::guided(&scenarios, runs, jobs, seed);
    println!(
        "guided: {} items in {} runs ({} kept; failed: {} broke an invariant or the model, {} only liveness), {:.1}s",
        guided.items.len(),
        guided.runs,
        guided.kept,
        guided.broken().count(),
        guided.suspect().count(),
        started.elapsed().as_secs_f64()
    );
    if compare {
        let started = std::time::Instant::now();
        let uniform = p2p_sim::explore::uniform(&scenarios, runs, jobs);
        println!(
            "uniform: {} items in {} runs ({} failed), {:.1}s",
            uniform.items.len(),
            uniform.runs,
            uniform.failures.len(),
            started.elapsed().as_secs_f64()
        );
        let only = |a: &p2p_sim::explore::Report, b: &p2p_sim::explore::Report| {
            a.items.difference(&b.items).count()
        };
        println!(
            "reached only by guided: {}; only by uniform: {}",
            only(&guided, &uniform),
            only(&uniform, &guided)
        );
        for (label, report) in [("guided", &guided), ("uniform", &uniform)] {
            let points: Vec<String> = report
                .growth
                .iter()
                .filter(|(n, _)| n.is_power_of_two() || *n == report.runs)
                .map(|(n, items)| format!("{n}:{items}"))
                .collect();
            println!("{label} growth (runs:items): {}", points.join(" "));
        }
    }
    if guided.failures.is_empty() {
        return ExitCode::SUCCESS;
    }
    if let Err(e) = std::fs::create_dir_all(out) {
        eprintln!("p2p-sim: cannot create {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    let runs = guided.broken().map(|f| ("FAILED", f));
    let runs = runs.chain(guided.suspect().map(|f| ("SUSPECT (liveness only)", f)));
    for (n, (label, (name, seed, failures, scenario))) in runs.enumerate() {
        let path = out.join(format!("{name}-explore{n}.toml"));
        let written = p2p_sim::shrink::to_toml(scenario)
            .and_then(|text| std::fs::write(&path, text).map_err(|e| e.to_string()));
        match written {
            Ok(()) => println!(
                "{label} {name} (seed {seed}): {}\n  reproduce: p2p-sim run {}",
                failures.join("; "),
                path.display()
            ),
            Err(e) => eprintln!("p2p-sim: cannot write {}: {e}", path.display()),
        }
    }
    if guided.broken().next().is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn cmd_sweep(paths: &[PathBuf], plan: &SweepPlan, json: Option<&Path>, coverage: bool) -> ExitCode {
    let mut scenarios = match load_all(paths) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("p2p-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (_, scenario) in &mut scenarios {
        scenario.sabotage = plan.plant;
    }
    // Every (scenario, seed) pair, seed by seed (the first runs cover every scenario, so a
    // sweep stopped early or split into shards has tried each), then this shard's share.
    let mut work: Vec<(usize, u64)> = Vec::new();
    for seed in plan.first_seed..plan.first_seed + plan.seeds {
        for i in 0..scenarios.len() {
            work.push((i, seed));
        }
    }
    if let Some((k, m)) = plan.shard {
        // A contiguous share: whole seeds of every scenario, so that shards cost alike
        // whatever the scenarios cost (a stride would give each shard the same scenarios
        // whenever M divides their number).
        let len = work.len() as u64;
        let (from, to) = ((k - 1) * len / m, k * len / m);
        work = work
            .into_iter()
            .enumerate()
            .filter(|(n, _)| (from..to).contains(&(*n as u64)))
            .map(|(_, w)| w)
            .collect();
    }
    if work.is_empty() {
        eprintln!("p2p-sim: this sweep has no runs (its shard gets none of them)");
        return ExitCode::FAILURE;
    }
    let jobs = plan
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let bar = indicatif::ProgressBar::new(work.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} runs, {msg} failed, eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("0");
    let next = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let records: Mutex<Vec<RunRecord>> = Mutex::new(Vec::new());
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(i, seed)) = work.get(n) else {
                        break;
                    };
                    let (path, scenario) = &scenarios[i];
                    let outcome = run(scenario, seed, true);
                    if !outcome.passed() {
                        let f = failed.fetch_add(1, Ordering::Relaxed) + 1;
                        bar.set_message(f.to_string());
                    }
                    let mut record = RunRecord::new(
                        &path.display().to_string(),
                        &outcome,
                        reproduce(path, seed, true),
                    );
                    record.shard = plan.shard.map(|(k, m)| format!("{k}/{m}"));
                    if let Ok(mut r) = records.lock() {
                        r.push(record);
                    }
                    bar.inc(1);
                }
            });
        }
    });
    bar.finish();
    let mut records = records.into_inner().unwrap_or_default();
    records.sort_by(|a, b| (&a.scenario, a.seed, &a.file).cmp(&(&b.scenario, b.seed, &b.file)));
    let elapsed = started.elapsed().as_secs_f64();
    let timing = format!(
        "{} runs in {:.1}s ({:.1} seeds/s)",
        work.len(),
        elapsed,
        work.len() as f64 / elapsed.max(1e-9),
    );
    let report = summary(&records, coverage);
    let to_stdout = json.is_some_and(|p| p == Path::new("-"));
    if let Some(path) = json {
        let mut lines = String::new();
        for r in &records {
            match serde_json::to_string(r) {
                Ok(line) => {
                    lines.push_str(&line);
                    lines.push('\n');
                }
                Err(e) => {
                    eprintln!("p2p-sim: cannot encode a run: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let written = if to_stdout {
            std::io::Write::write_all(&mut std::io::stdout(), lines.as_bytes())
        } else {
            std::fs::write(path, lines)
        };
        if let Err(e) = written {
            eprintln!("p2p-sim: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if to_stdout {
        eprintln!("{timing}\n{report}");
    } else {
        println!("{timing}\n{report}");
    }
    if records.iter().all(RunRecord::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn cmd_shrink(
    file: &Path,
    seed: u64,
    swarm: bool,
    out: Option<PathBuf>,
    plant: Option<Sabotage>,
) -> ExitCode {
    let mut scenario = match Scenario::load(file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("p2p-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    scenario.sabotage = plant;
    let shrunk = match p2p_sim::shrink::shrink(&scenario, seed, swarm) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("p2p-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = out.unwrap_or_else(|| {
        PathBuf::from("traces").join(format!("{}-seed{seed}-shrunk.toml", scenario.name))
    });
    let written = p2p_sim::shrink::to_toml(&shrunk.scenario).and_then(|text| {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        std::fs::write(&out, text).map_err(|e| e.to_string())
    });
    if let Err(e) = written {
        eprintln!("p2p-sim: cannot write {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    println!(
        "fails with {}: {} of {} steps and {} of {} nodes kept ({} runs)",
        shrunk.signature,
        shrunk.steps.1,
        shrunk.steps.0,
        shrunk.nodes.1,
        shrunk.nodes.0,
        shrunk.runs
    );
    for f in &shrunk.failures {
        println!("  - {f}");
    }
    println!("written: {}", out.display());
    println!("replay: {} run {}", reproduce_exe(), shell_word(&out));
    ExitCode::SUCCESS
}

fn cmd_merge(files: &[PathBuf], coverage: bool, allow_missing: bool) -> ExitCode {
    let mut records = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("p2p-sim: cannot read {}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        };
        match parse_lines(&text, &file.display().to_string()) {
            Ok(r) => records.extend(r),
            Err(e) => {
                eprintln!("p2p-sim: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // The same run in two files means overlapping shards: say so rather than count twice.
    let mut seen = std::collections::BTreeSet::new();
    for r in &records {
        if !seen.insert((&r.file, r.seed, r.swarm)) {
            eprintln!(
                "p2p-sim: {} seed {} appears twice: overlapping shards?",
                r.file, r.seed
            );
            return ExitCode::FAILURE;
        }
    }
    if let Err(e) = p2p_sim::report::check_complete(&records, allow_missing) {
        eprintln!("p2p-sim: {e}");
        return ExitCode::FAILURE;
    }
    print!("{}", summary(&records, coverage));
    if records.iter().all(RunRecord::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn cmd_trace(file: &Path, seed: Option<u64>, swarm: bool, out: &Path) -> ExitCode {
    let scenario = match Scenario::load(file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("p2p-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let seed = seed.unwrap_or(scenario.seed);
    let outcome = run(&scenario, seed, swarm);
    let stem = format!("{}-seed{seed}", scenario.name);
    let text = out.join(format!("{stem}.txt"));
    let diagram = out.join(format!("{stem}.mmd"));
    let picture = out.join(format!("{stem}.svg"));
    let written = std::fs::create_dir_all(out)
        .and_then(|()| std::fs::write(&text, outcome.trace.text()))
        .and_then(|()| std::fs::write(&diagram, outcome.trace.mermaid(&outcome.nodes)))
        .and_then(|()| std::fs::write(&picture, outcome.trace.svg(&outcome.nodes)));
    if let Err(e) = written {
        eprintln!("p2p-sim: cannot write to {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    print_row(&outcome);
    for f in &outcome.failures {
        println!("  - {f}");
    }
    println!(
        "trace: {}\ndiagram: {} (Mermaid), {} (SVG)",
        text.display(),
        diagram.display(),
        picture.display()
    );
    if outcome.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
