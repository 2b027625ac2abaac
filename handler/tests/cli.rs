//! The `p2p-node` program end to end: keygen, id, serve and send on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

fn node() -> Command {
    Command::new(env!("CARGO_BIN_EXE_p2p-node"))
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn keygen(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    let id = output(node().args(["keygen", "--out"]).arg(&path));
    assert_eq!(output(node().args(["id", "--key"]).arg(&path)), id);
    id.trim().to_owned()
}

#[test]
fn two_nodes_exchange_a_message_through_a_command() {
    let dir = std::env::temp_dir().join(format!("p2p-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let alice = keygen(&dir, "alice.key");
    let bob = keygen(&dir, "bob.key");
    // keygen refuses to overwrite a key.
    assert!(
        !node()
            .args(["keygen", "--out"])
            .arg(dir.join("bob.key"))
            .status()
            .unwrap()
            .success()
    );
    std::fs::write(
        dir.join("allow.toml"),
        format!("[[peer]]\nid = \"{alice}\"\n"),
    )
    .unwrap();

    let mut server = node()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--count",
            "1",
            "--exec",
            "tr a-z A-Z",
        ])
        .arg("--key")
        .arg(dir.join("bob.key"))
        .arg("--allow")
        .arg(dir.join("allow.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // "listening on 127.0.0.1:PORT as PEER_ID"
    let words: Vec<&str> = first.split_whitespace().collect();
    assert_eq!((words[0], words[4]), ("listening", bob.as_str()), "{first}");
    let target = format!("{bob}@{}", words[2]);

    let reply = output(
        node()
            .args(["send", "--to", &target, "hello bob"])
            .arg("--key")
            .arg(dir.join("alice.key")),
    );
    assert_eq!(reply, "HELLO BOB\n");
    assert!(
        server.wait().unwrap().success(),
        "serve --count 1 exits after one answer"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let out = node()
        .args(["send", "--key", "/nonexistent.key", "--to", "nope", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PEER_ID@HOST:PORT"), "{err}");
}
