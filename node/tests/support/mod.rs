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

/// Runs `cmd`, which must fail; its standard error.
pub(crate) fn failure(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
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

/// A serving node whose log lines (stderr) a test reads; killed when dropped.
pub(crate) struct Running {
    pub(crate) child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line read so far.
    seen: Vec<String>,
    /// Where it listens (from its first line).
    pub(crate) addr: String,
}

/// Generous for a loaded 2-core machine: waits end as soon as the line arrives.
pub(crate) const LINE_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

impl Running {
    /// Spawns `cmd` (a `serve` with `RUST_LOG` set) and reads its first line, "listening on
    /// ADDR as PEER_ID"; its other stdout is discarded, its stderr collected.
    pub(crate) fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut first).unwrap();
        // Keep reading (and discarding) what else it prints.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let words: Vec<&str> = first.split_whitespace().collect();
        assert_eq!(words.first(), Some(&"listening"), "{first}");
        let addr = words[2].to_owned();
        let (tx, lines) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            addr,
        }
    }

    /// Waits for a line containing every one of `words`; returns it.
    pub(crate) fn wait_for(&mut self, words: &[&str]) -> String {
        let found = |line: &String| words.iter().all(|w| line.contains(w));
        if let Some(line) = self.seen.iter().find(|l| found(l)) {
            return line.clone();
        }
        let deadline = std::time::Instant::now() + LINE_WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if found(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {words:?} within {LINE_WAIT:?}; the node said:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
