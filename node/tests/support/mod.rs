//! What the end-to-end tests of `p2p-node` share: the program, key files, a scratch
//! directory, a serving node that is killed when the test ends.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // Each test uses a part.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub(crate) fn node() -> Command {
    Command::new(env!("CARGO_BIN_EXE_p2p-node"))
}

pub(crate) fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub(crate) fn keygen(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    let id = output(node().args(["keygen", "--out"]).arg(&path));
    assert_eq!(output(node().args(["id", "--key"]).arg(&path)), id);
    id.trim().to_owned()
}

/// `p2p-node id --public` of the key file `file` in `dir`: what a members file lists.
pub(crate) fn public_key(dir: &Path, file: &str) -> String {
    output(node().args(["id", "--public", "--key"]).arg(dir.join(file)))
        .trim()
        .to_owned()
}

/// `p2p-node membership keygen` into `dir/file`; returns the public key it prints.
pub(crate) fn governance_key(dir: &Path, file: &str) -> String {
    output(
        node()
            .args(["membership", "keygen", "--out"])
            .arg(dir.join(file)),
    )
    .trim()
    .to_owned()
}

/// A scratch directory with keys for Bob (the server), Alice and Carol, both allowed.
pub(crate) struct Setup {
    pub(crate) dir: PathBuf,
    pub(crate) bob: String,
}

impl Setup {
    pub(crate) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("p2p-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bob = keygen(&dir, "bob.key");
        let mut allow = String::new();
        for client in ["alice", "carol"] {
            let id = keygen(&dir, &format!("{client}.key"));
            allow.push_str(&format!("[[peer]]\nid = \"{id}\"\n"));
        }
        std::fs::write(dir.join("allow.toml"), allow).unwrap();
        Self { dir, bob }
    }

    /// Starts `serve` with `args`; returns it (killed when dropped, even by a failing
    /// test) and its target (`PEER_ID@ADDR`).
    pub(crate) fn serve(&self, args: &[&str]) -> (Server, String) {
        self.serve_on("127.0.0.1:0", args)
    }

    /// [`Setup::serve`] on a given address.
    pub(crate) fn serve_on(&self, listen: &str, args: &[&str]) -> (Server, String) {
        let mut server = node()
            .args(["serve", "--listen", listen])
            .args(args)
            .arg("--key")
            .arg(self.dir.join("bob.key"))
            .arg("--allow")
            .arg(self.dir.join("allow.toml"))
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
        assert_eq!(
            (words[0], words[4]),
            ("listening", self.bob.as_str()),
            "{first}"
        );
        (Server(server), format!("{}@{}", self.bob, words[2]))
    }

    pub(crate) fn send(&self, client: &str, target: &str) -> Command {
        let mut cmd = node();
        cmd.args(["send", "--to", target])
            .arg("--key")
            .arg(self.dir.join(format!("{client}.key")));
        cmd
    }

    /// A script that echoes its input, but first waits on the FIFO `gate` when the input
    /// starts with "slow": the test decides when a slow command finishes, no clock does.
    pub(crate) fn gated_echo(&self) -> String {
        let gate = self.dir.join("gate");
        assert!(
            Command::new("mkfifo")
                .arg(&gate)
                .status()
                .unwrap()
                .success()
        );
        format!(
            "x=$(cat); case \"$x\" in slow*) read _ < '{}';; esac; printf '%s\\n' \"$x\"",
            gate.display()
        )
    }

    pub(crate) fn open_gate(&self) {
        let mut gate = std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("gate"))
            .unwrap();
        writeln!(gate, "go").unwrap();
    }
}

/// A running `p2p-node serve`, stopped when dropped.
pub(crate) struct Server(pub(crate) Child);

impl Server {
    /// Whether it is still running.
    pub(crate) fn running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
