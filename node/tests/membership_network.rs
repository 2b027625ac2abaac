//! Five `p2p-node serve` processes governed by a 2-of-3 committee: a new epoch handed to one
//! node reaches the other four through the nodes themselves, the peer it adds exchanges
//! with all of them, an under-signed document is refused by every node, and a restarted
//! node stays at the newest epoch although its file is older. Loopback only; every wait is
//! for a line a node prints, bounded by a deadline; nothing is timed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

mod support;

use std::path::{Path, PathBuf};

use support::{Running, governance_key, keygen, node, output, public_key};

const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

trait Hup {
    fn hup(&self);
}

impl Hup for Running {
    fn hup(&self) {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

struct Network {
    dir: PathBuf,
    gov: Vec<String>,
}

impl Network {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("p2p-membership-net-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let gov = (1..=3)
            .map(|i| governance_key(&dir, &format!("gov{i}.key")))
            .collect();
        for name in NAMES {
            keygen(&dir, &format!("{name}.key"));
        }
        Self { dir, gov }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn public(&self, name: &str) -> String {
        public_key(&self.dir, &format!("{name}.key"))
    }

    /// e (added by epoch 2) sends `text` to `target` (`PEER_ID@ADDR`); returns the output.
    fn send_from_e(&self, target: &str, text: &str) -> String {
        output(
            node()
                .args(["send", "--to", target, "--key"])
                .arg(self.path("e.key"))
                .arg("--membership")
                .arg(self.path("e2.signed.toml"))
                .arg(text),
        )
    }

    fn id(&self, name: &str) -> String {
        output(
            node()
                .args(["id", "--key"])
                .arg(self.path(&format!("{name}.key"))),
        )
        .trim()
        .to_owned()
    }

    fn membership(&self, args: &[&str]) -> String {
        let out = node()
            .arg("membership")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A members file: each of `names`, with its listening address when known.
    fn members(&self, file: &str, names: &[(&str, Option<&str>)]) {
        let mut text = String::new();
        for (name, addr) in names {
            text.push_str(&format!(
                "[[peer]]\nkey = \"{}\"\nname = \"{name}\"\n",
                self.public(name)
            ));
            if let Some(addr) = addr {
                text.push_str(&format!("address = \"{addr}\"\n"));
            }
            text.push('\n');
        }
        std::fs::write(self.path(file), text).unwrap();
    }

    fn sign_all(&self, doc: &str, signers: &[usize], out: &str) {
        let mut args = vec!["combine".to_owned(), doc.to_owned()];
        for &i in signers {
            let sig = format!("{doc}.sig{i}");
            self.membership(&["sign", "--key", &format!("gov{i}.key"), doc, "--out", &sig]);
            args.push(sig);
        }
        args.extend(["--out".to_owned(), out.to_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.membership(&args);
    }

    /// Starts `name` serving with its own copy of `doc` as its membership file.
    fn serve(&self, name: &str, doc: &Path, listen: &str) -> Running {
        let file = self.path(&format!("{name}.membership.toml"));
        if !file.exists() {
            std::fs::copy(doc, &file).unwrap();
        }
        Running::spawn(
            node()
                .args(["serve", "--listen", listen, "--key"])
                .arg(self.path(&format!("{name}.key")))
                .arg("--membership")
                .arg(&file)
                .arg("--data-dir")
                .arg(self.path(&format!("{name}.data")))
                .env("RUST_LOG", "info"),
        )
    }

    /// Hands `doc` to `node` the way its operator would: replaces its file, then SIGHUP.
    fn hand(&self, name: &str, running: &Running, doc: &str) {
        let file = self.path(&format!("{name}.membership.toml"));
        let tmp = self.path(&format!("{name}.membership.toml.new"));
        std::fs::copy(self.path(doc), &tmp).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        running.hup();
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_committee_governs_five_serving_nodes() {
    let net = Network::new();
    // Genesis: a, b, c, d (no addresses yet: the ports are not known before they listen).
    net.members(
        "m1.toml",
        &[("a", None), ("b", None), ("c", None), ("d", None)],
    );
    let committee = net.gov.join(",");
    net.membership(&[
        "init",
        "--network",
        "test-net",
        "--threshold",
        "2",
        "--committee",
        &committee,
        "--members",
        "m1.toml",
        "--out",
        "e1.toml",
    ]);
    net.sign_all("e1.toml", &[1, 2], "e1.signed.toml");
    let e1 = net.path("e1.signed.toml");
    let mut nodes: Vec<Running> = NAMES
        .iter()
        .map(|name| net.serve(name, &e1, "127.0.0.1:0"))
        .collect();
    for running in &mut nodes {
        running.wait_for(&["membership in force", "epoch=1"]);
    }

    // Epoch 2 adds e, with every node's address; signed by 2 and 3, handed to a alone.
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let with_addrs: Vec<(&str, Option<&str>)> = NAMES
        .iter()
        .zip(&addrs)
        .map(|(name, addr)| (*name, Some(addr.as_str())))
        .collect();
    net.members("m2.toml", &with_addrs);
    net.membership(&[
        "propose",
        "--current",
        "e1.signed.toml",
        "--members",
        "m2.toml",
        "--out",
        "e2.toml",
    ]);
    net.sign_all("e2.toml", &[2, 3], "e2.signed.toml");
    net.hand("a", &nodes[0], "e2.signed.toml");
    nodes[0].wait_for(&["membership epoch 2", "applied", "this node's operator"]);
    for running in &mut nodes[1..] {
        running.wait_for(&["membership epoch 2", "applied"]);
    }

    // The added peer exchanges with every other node.
    for (name, running) in NAMES.iter().zip(&nodes).take(4) {
        let target = format!("{}@{}", net.id(name), running.addr);
        let reply = net.send_from_e(&target, &format!("hello {name}"));
        assert!(reply.contains(&format!("hello {name}")), "{reply}");
    }

    // An under-signed epoch 3 (one signature) is refused by every node it is handed to.
    net.members("m3.toml", &with_addrs[..3]);
    net.membership(&[
        "propose",
        "--current",
        "e2.signed.toml",
        "--members",
        "m3.toml",
        "--out",
        "e3.toml",
    ]);
    net.sign_all("e3.toml", &[1], "e3.under.toml");
    for (name, running) in NAMES.iter().zip(&mut nodes) {
        net.hand(name, running, "e3.under.toml");
        running.wait_for(&[
            "refused",
            "only 1 of the committee of epoch 2",
            "keeps epoch 2",
        ]);
    }

    // c restarts with its first file again (epoch 1): its data directory says epoch 2.
    let c = nodes.remove(2);
    let addr = c.addr.clone();
    drop(c);
    std::fs::copy(&e1, net.path("c.membership.toml")).unwrap();
    let mut c = net.serve("c", &e1, &addr);
    let line = c.wait_for(&["membership in force"]);
    assert!(line.contains("epoch=2"), "{line}");
    c.wait_for(&["older than the stored epoch 2", "kept the stored one"]);
    // And it still answers e, whom only epoch 2 allows.
    let target = format!("{}@{}", net.id("c"), addr);
    let reply = net.send_from_e(&target, "after restart");
    assert!(reply.contains("after restart"), "{reply}");
}
