//! The deployment files under `deploy/` stay true: the systemd unit passes
//! `systemd-analyze verify` (where the tool exists) against the binary just built and the
//! example config, and the container image definition keeps its shape (multi-stage,
//! non-root, the data directory as a volume, the config it names shipped). Building the
//! image needs a Docker daemon and base images, which CI machines here do not have.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::Server;

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
    let out = support::node()
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

/// Starts `p2p-node serve ARGS`; returns it, its address and its metrics address.
fn serve(args: &[&str]) -> (Server, String, String) {
    use std::io::BufRead;
    let mut child = support::node()
        .arg("serve")
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let node = Server(child);
    let mut metrics = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "serve ended early"
        );
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["metrics", "on", url] => {
                metrics = url
                    .trim_start_matches("http://")
                    .trim_end_matches("/metrics")
                    .to_owned();
            }
            ["listening", "on", addr, "as", _] => return (node, (*addr).to_owned(), metrics),
            _ => {}
        }
    }
}

#[test]
fn the_compose_files_scripts_make_three_nodes_that_talk() {
    let compose = read("compose.yaml");
    let dir = std::env::temp_dir().join(format!("p2p-compose-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("conf");
    // init.sh, as compose runs it, on the host: keys, allow lists, configs.
    let init = |what: &str| {
        let status = Command::new("sh")
            .arg(deploy("compose/init.sh"))
            .env("CONF", &conf)
            .env("P2P_NODE", env!("CARGO_BIN_EXE_p2p-node"))
            .status()
            .unwrap();
        assert!(status.success(), "init.sh failed {what}");
    };
    init("the first time");
    let key_a = std::fs::read(conf.join("a/node.key")).unwrap();
    init("again");
    assert_eq!(
        std::fs::read(conf.join("a/node.key")).unwrap(),
        key_a,
        "a second run replaced a key"
    );
    // Each service serves the config init.sh wrote for it, from the conf volume.
    for n in ["a", "b", "c"] {
        let config = conf.join(n).join("node.toml");
        assert!(config.is_file());
        assert!(
            compose.contains(&format!(
                "[\"serve\", \"--config\", \"/conf/{n}/node.toml\"]"
            )),
            "service {n}"
        );
        let check = support::node()
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    assert!(compose.contains("condition: service_completed_successfully"));
    // The three nodes, on loopback ports of their own (flags override the configs').
    let mut nodes = Vec::new();
    let mut env = Vec::new();
    for n in ["a", "b", "c"] {
        let config = conf.join(n).join("node.toml");
        let data = dir.join(format!("data-{n}"));
        let (node, addr, metrics) = serve(&[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ]);
        nodes.push((node, metrics));
        env.push((format!("ADDR_{}", n.to_uppercase()), addr));
    }
    // talk.sh, as the compose `talk` service runs it: a -> b -> c -> a.
    let out = Command::new("sh")
        .arg(deploy("compose/talk.sh"))
        .env("CONF", &conf)
        .env("P2P_NODE", env!("CARGO_BIN_EXE_p2p-node"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let replies = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{replies}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for pair in ["a to b", "b to c", "c to a"] {
        assert!(replies.contains(&format!("hello from {pair}")), "{replies}");
    }
    // The image's health check command, against a running node.
    let dockerfile = read("Dockerfile");
    let healthcheck = dockerfile
        .lines()
        .find(|l| l.contains("CMD [\"/usr/local/bin/p2p-node\", \"status\""))
        .unwrap();
    assert!(healthcheck.contains("\"--probe\""), "{healthcheck}");
    let probe = support::node()
        .args(["status", "--probe", "--metrics", &nodes[0].1])
        .output()
        .unwrap();
    assert!(probe.status.success());
    assert_eq!(String::from_utf8_lossy(&probe.stdout), "ok\n");
    drop(nodes);
    // With the node gone the probe fails, as Docker must see it.
    let probe = support::node()
        .args(["status", "--probe", "--metrics", &env[0].1])
        .output()
        .unwrap();
    assert!(!probe.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_images_build_from_a_small_context_and_the_sim_image_serves_the_sweep_job() {
    let ignore =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.dockerignore"))
            .unwrap();
    for kept_out in ["**/target", ".git", "/fuzz/corpus"] {
        assert!(ignore.lines().any(|l| l == kept_out), "{kept_out}");
    }
    let sim = read("sim.Dockerfile");
    assert!(sim.contains("cargo build --release --locked -p p2p-sim"));
    assert!(sim.contains("COPY scenarios /scenarios"));
    let user = sim.lines().find_map(|l| l.strip_prefix("USER ")).unwrap();
    assert!(user != "root" && user != "0");
    // The sweep job runs that image's p2p-sim on its /scenarios.
    let job = read("sweep/k8s-indexed-job.yaml");
    assert!(job.contains("image: p2p-sim:latest") && job.contains("p2p-sim sweep /scenarios"));
    assert!(job.contains("deploy/sim.Dockerfile"));
}
