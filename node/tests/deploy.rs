//! The deployment files under `deploy/` stay true: the systemd unit passes
//! `systemd-analyze verify` (where the tool exists) against the binary just built and the
//! example config, and the container image definition keeps its shape (multi-stage,
//! non-root, the data directory as a volume, the config it names shipped). Building the
//! image needs a Docker daemon and base images, which CI machines here do not have.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(deploy(name)).unwrap()
}

/// `data_dir` of deploy/node.toml.
fn data_dir() -> String {
    let config: toml::Table = toml::from_str(&read("node.toml")).unwrap();
    config["data_dir"].as_str().unwrap().to_owned()
}

#[test]
fn the_systemd_unit_verifies_and_runs_the_example_config() {
    let unit = read("p2p-node.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    assert_eq!(
        exec,
        "/usr/local/bin/p2p-node serve --config /etc/p2p-node/node.toml"
    );
    // The state directory systemd creates is the config's data directory.
    let state = unit
        .lines()
        .find_map(|l| l.strip_prefix("StateDirectory="))
        .unwrap();
    assert_eq!(format!("/var/lib/{state}"), data_dir());
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    // Readiness comes from the node itself (READY=1 once it listens), and the config's
    // [log] level is not overridden behind the operator's back.
    assert!(unit.contains("\nType=notify\n"), "{unit}");
    assert!(
        !unit.lines().any(|l| l.starts_with("Environment=RUST_LOG")),
        "the unit overrides [log] level"
    );
    // Every Documentation= file is one the install steps above it put there, from a
    // file this repository has.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for doc in unit
        .lines()
        .filter_map(|l| l.strip_prefix("Documentation="))
    {
        let path = doc
            .strip_prefix("file://")
            .unwrap_or_else(|| panic!("{doc}"));
        let words: Vec<&str> = unit
            .lines()
            .filter(|l| l.starts_with("#   install "))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|words| words.contains(&path))
            .unwrap_or_else(|| panic!("nothing installs {path}"));
        let at = words.iter().position(|w| *w == path).unwrap();
        let source = words[at - 1];
        assert!(root.join(source).is_file(), "{words:?}: no {source}");
    }
    // The example config it names loads (with its relative key and allow paths).
    let out = Command::new(env!("CARGO_BIN_EXE_p2p-node"))
        .args(["serve", "--config"])
        .arg(deploy("node.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // It gets as far as the key file, which the example leaves to the operator.
    assert!(
        !out.status.success() && err.contains("node.key"),
        "the example config should parse and then miss only its key: {err}"
    );
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not found: unit not verified on this machine");
        return;
    }
    let dir = std::env::temp_dir().join(format!("p2p-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let local = unit
        .replace("/usr/local/bin/p2p-node", env!("CARGO_BIN_EXE_p2p-node"))
        .replace(
            "/etc/p2p-node/node.toml",
            deploy("node.toml").to_str().unwrap(),
        );
    let path = dir.join("p2p-node.service");
    std::fs::write(&path, local).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings to systemd: fail on any output.
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

#[test]
fn the_systemd_unit_is_rated_2_5_or_better_by_systemd_analyze_security() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not found: unit not rated on this machine");
        return;
    }
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager", "--threshold=25"])
        .arg(deploy("p2p-node.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    let rating: f64 = text
        .lines()
        .chain(err.lines())
        .find_map(|l| {
            l.split("Overall exposure level for p2p-node.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rating: {text}{err}"));
    assert!(rating <= 2.5, "rated {rating}:\n{text}");
    assert!(out.status.success(), "over the threshold:\n{text}{err}");
}

#[test]
fn the_container_image_is_multi_stage_non_root_with_the_data_dir_as_a_volume() {
    let dockerfile = read("Dockerfile");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "build and runtime stages: {stages:?}");
    assert!(stages[0].ends_with(" AS build"));
    assert!(dockerfile.contains("COPY --from=build /src/target/release/p2p-node"));
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .unwrap();
    assert!(user != "root" && user != "0", "runs as {user}");
    assert!(
        dockerfile.contains(&format!("VOLUME [\"{}\"]", data_dir())),
        "the config's data_dir is the volume"
    );
    assert!(dockerfile.contains("COPY deploy/node.toml /etc/p2p-node/node.toml"));
    assert!(dockerfile.contains("\"--config\", \"/etc/p2p-node/node.toml\""));
    // The build uses the lock file, as CI does.
    assert!(dockerfile.contains("cargo build --release --locked -p p2p-node"));
}
