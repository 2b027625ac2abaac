//! The `p2p-sim` program: exit codes, the reproduce line, traces on disk, file errors.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::process::Command;

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_p2p-sim"))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("p2p-sim-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const TWO_NODES: &str = "[[node]]\nname = \"alice\"\n[[node]]\nname = \"bob\"\n\n[[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n";

#[test]
fn a_failing_expectation_exits_non_zero_with_a_reproduce_command() {
    let dir = temp_dir("fail");
    let file = dir.join("wrong.toml");
    std::fs::write(&file, format!("{TWO_NODES}\n[expect]\nreplied = 2\n")).unwrap();
    let out = sim().arg("run").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("expected replied = 2, got 1"), "{text}");
    assert!(text.contains("--seed 1"), "{text}");
    // Run from another directory, with a relative path and a space in it, as a user would:
    // the printed command works from there and replays the failure.
    let spaced = dir.join("my scenarios");
    std::fs::create_dir_all(&spaced).unwrap();
    std::fs::copy(&file, spaced.join("wrong.toml")).unwrap();
    let out = sim()
        .current_dir(&dir)
        .args(["run", "my scenarios/wrong.toml"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let command = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("reproduce: "))
        .unwrap_or_else(|| panic!("no reproduce command in {text}"));
    let replay = Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(&dir)
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let replayed = String::from_utf8_lossy(&replay.stdout);
    assert!(
        replayed.contains("expected replied = 2, got 1"),
        "{command}: {replayed}{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn trace_writes_text_and_mermaid() {
    let dir = temp_dir("trace");
    let file = dir.join("ok.toml");
    std::fs::write(&file, TWO_NODES).unwrap();
    let out = sim()
        .args(["trace"])
        .arg(&file)
        .args(["--seed", "5", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = std::fs::read_to_string(dir.join("ok-seed5.txt")).unwrap();
    assert!(text.contains("Request alice#1 try 1"), "{text}");
    let mermaid = std::fs::read_to_string(dir.join("ok-seed5.mmd")).unwrap();
    assert!(mermaid.starts_with("sequenceDiagram"), "{mermaid}");
    assert!(mermaid.contains("alice->>bob"), "{mermaid}");
    let svg = std::fs::read_to_string(dir.join("ok-seed5.svg")).unwrap();
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.contains(">c1 Request alice#1 try 1 (16 B)<"), "{svg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_scenario_files_name_file_line_and_field() {
    let dir = temp_dir("bad");
    let file = dir.join("bad.toml");
    std::fs::write(&file, format!("{TWO_NODES}speed = 3\n")).unwrap();
    let out = sim().arg("run").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("speed"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sweep_shards_split_the_work() {
    let dir = temp_dir("sweep");
    std::fs::write(dir.join("a.toml"), TWO_NODES).unwrap();
    let run = |shard: &str| {
        let out = sim()
            .arg("sweep")
            .arg(&dir)
            .args(["--seeds", "6", "--jobs", "2", "--shard", shard])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(run("1/2").contains("3 runs"));
    assert!(run("2/2").contains("3 runs"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_refused_step_shows_in_the_table_and_fails_unless_expected() {
    let dir = temp_dir("refused");
    let file = dir.join("self.toml");
    std::fs::write(
        &file,
        "[[node]]\nname = \"alice\"\n[[node]]\nname = \"bob\"\n\n\
         [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"alice\"\n",
    )
    .unwrap();
    let out = sim().arg("run").arg(&file).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    let row = text.lines().find(|l| l.starts_with("self ")).unwrap();
    let columns: Vec<&str> = row.split_whitespace().collect();
    // scenario, verdict, exchanges, refused, ...
    assert_eq!(&columns[1..4], ["FAIL", "0", "1"], "{row}");
    assert!(
        text.contains("step refused by the handler (alice: request to alice refused")
            && text.contains("add `refused = N`"),
        "{text}"
    );
    // Expected, it passes (and a wrong count fails).
    std::fs::write(
        dir.join("expected.toml"),
        format!(
            "{}\n[expect]\nrefused = 1\n",
            std::fs::read_to_string(&file).unwrap()
        ),
    )
    .unwrap();
    let out = sim()
        .arg("run")
        .arg(dir.join("expected.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn merged_shards_report_what_an_unsharded_sweep_reports() {
    let dir = temp_dir("merge");
    std::fs::write(dir.join("a.toml"), TWO_NODES).unwrap();
    std::fs::write(
        dir.join("b.toml"),
        format!("{TWO_NODES}\n[[step]]\nat = \"5ms\"\ndo = \"drop\"\nmatch = {{ kind = \"reply\" }}\ncount = 1\n"),
    )
    .unwrap();
    // A failing one too (a refused step fails swarm runs as well), so failures and their
    // reproduce commands merge as well.
    std::fs::write(
        dir.join("c.toml"),
        format!("{TWO_NODES}\n[[step]]\ndo = \"request\"\nfrom = \"bob\"\nto = \"bob\"\n"),
    )
    .unwrap();
    let sweep = |extra: &[&str], json: &std::path::Path| {
        let out = sim()
            .arg("sweep")
            .arg(&dir)
            .args(["--seeds", "5", "--jobs", "2", "--coverage", "--json"])
            .arg(json)
            .args(extra)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The report, without the timing line the sweep prints first.
    let report = |text: &str| text.lines().skip(1).collect::<Vec<_>>().join("\n");
    let whole = sweep(&[], &dir.join("whole.jsonl"));
    assert!(
        whole.contains("15 runs of 3 scenarios: 10 passed, 5 failed"),
        "{whole}"
    );
    assert!(whole.contains("dialer AwaitingReply -> Backoff"), "{whole}");
    // Three shards, as three machines would run them, each in its own process.
    let shards: Vec<std::path::PathBuf> = (1..=3)
        .map(|k| {
            let json = dir.join(format!("shard-{k}.jsonl"));
            sweep(&["--shard", &format!("{k}/3")], &json);
            json
        })
        .collect();
    let out = sim()
        .arg("merge")
        .args(&shards)
        .arg("--coverage")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let merged = String::from_utf8_lossy(&out.stdout);
    assert_eq!(merged.trim_end(), report(&whole).trim_end());
    // One JSON object per run.
    let lines = std::fs::read_to_string(dir.join("whole.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 15);
    assert!(
        lines
            .lines()
            .all(|l| l.starts_with('{') && l.contains("\"seed\":"))
    );
    // A shard given twice is refused rather than counted twice.
    let out = sim()
        .arg("merge")
        .args([&shards[0], &shards[0]])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("appears twice"));
    // A shard missing is refused, unless asked for; an empty file has nothing to merge.
    let out = sim().arg("merge").args(&shards[..2]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shard 3/3 missing"), "{err}");
    let out = sim()
        .arg("merge")
        .args(&shards[..2])
        .arg("--allow-missing")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("runs of 3 scenarios"));
    std::fs::write(dir.join("empty.jsonl"), "").unwrap();
    let out = sim()
        .arg("merge")
        .arg(dir.join("empty.jsonl"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no runs"));
    // A sweep of no seeds is an error, not a pass.
    let out = sim()
        .arg("sweep")
        .arg(&dir)
        .args(["--seeds", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seeds"));
    std::fs::remove_dir_all(&dir).unwrap();
}
