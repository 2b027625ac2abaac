//! Three `p2p-node serve` processes and a client find each other from a shared records
//! folder and peer ids alone (the membership document gives no address); one node restarts
//! on another port and is reached there, and the others log that it moved. Loopback only;
//! every wait is for a line a node prints, bounded by a deadline; nothing is timed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

mod support;

use std::path::PathBuf;

use support::{Running, governance_key, keygen, node, output, public_key};

struct Network {
    dir: PathBuf,
}

impl Network {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
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

    fn record_key(&self, name: &str) -> String {
        output(
            node()
                .args(["id", "--record-key", "--key"])
                .arg(self.path(&format!("{name}.key"))),
        )
        .trim()
        .to_owned()
    }

    fn serve(&self, name: &str) -> Running {
        Running::spawn(
            node()
                .args(["serve", "--listen", "127.0.0.1:0", "--key"])
                .arg(self.path(&format!("{name}.key")))
                .arg("--membership")
                .arg(self.path("signed.toml"))
                .arg("--records")
                .arg(self.path("records"))
                .args(["--records-interval", "200ms", "--record-ttl", "10m"])
                .env("RUST_LOG", "info"),
        )
    }

    /// The client d sends `text` to `name` by peer id alone, through the records folder.
    fn send(&self, name: &str, text: &str) -> String {
        output(
            node()
                .args(["send", "--to", &self.id(name), "--key"])
                .arg(self.path("d.key"))
                .arg("--membership")
                .arg(self.path("signed.toml"))
                .arg("--records")
                .arg(self.path("records"))
                .arg(text),
        )
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn serving_nodes_find_each_other_from_a_records_folder_and_follow_a_move() {
    let dir = std::env::temp_dir().join(format!("p2p-records-net-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("records")).unwrap();
    let net = Network { dir };
    let gov = governance_key(&net.dir, "gov.key");
    let mut members = String::new();
    for name in ["a", "b", "c", "d"] {
        keygen(&net.dir, &format!("{name}.key"));
        members.push_str(&format!(
            "[[peer]]\nkey = \"{}\"\nrecord_key = \"{}\"\nname = \"{name}\"\n\n",
            public_key(&net.dir, &format!("{name}.key")),
            net.record_key(name)
        ));
    }
    std::fs::write(net.path("members.toml"), members).unwrap();
    let membership = |args: &[&str]| {
        output(node().arg("membership").args(args).current_dir(&net.dir));
    };
    membership(&[
        "init",
        "--network",
        "records-net",
        "--threshold",
        "1",
        "--committee",
        &gov,
        "--members",
        "members.toml",
        "--out",
        "doc.toml",
    ]);
    membership(&["sign", "--key", "gov.key", "doc.toml", "--out", "doc.sig"]);
    membership(&["combine", "doc.toml", "doc.sig", "--out", "signed.toml"]);

    let mut a = net.serve("a");
    let mut b = net.serve("b");
    let mut c = net.serve("c");
    for running in [&mut a, &mut b, &mut c] {
        running.wait_for(&["published our address record"]);
    }
    // a learns b's and c's addresses (from the folder, or from them directly).
    let (b_id, c_id) = (net.id("b"), net.id("c"));
    a.wait_for(&["address record", &b_id[..8], &b.addr]);
    a.wait_for(&["address record", &c_id[..8], &c.addr]);
    // The client knows peer ids only.
    for name in ["a", "b", "c"] {
        let reply = net.send(name, &format!("hello {name}"));
        assert!(reply.contains(&format!("hello {name}")), "{reply}");
    }

    // c restarts on another port; a and b follow, and so does the client.
    let old = c.addr.clone();
    drop(c);
    let mut c = net.serve("c");
    assert_ne!(c.addr, old);
    c.wait_for(&["published our address record"]);
    a.wait_for(&["address record", &c_id[..8], &c.addr, "(it moved)"]);
    b.wait_for(&["address record", &c_id[..8], &c.addr, "(it moved)"]);
    let reply = net.send("c", "after the move");
    assert!(reply.contains("after the move"), "{reply}");
}

#[test]
fn records_without_a_membership_and_an_address_less_target_without_one_are_refused() {
    let dir = std::env::temp_dir().join(format!("p2p-records-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let id = keygen(&dir, "a.key");
    std::fs::write(dir.join("allow.toml"), format!("[[peer]]\nid = \"{id}\"\n")).unwrap();
    let out = node()
        .args(["serve", "--listen", "127.0.0.1:0", "--key"])
        .arg(dir.join("a.key"))
        .arg("--allow")
        .arg(dir.join("allow.toml"))
        .arg("--records")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--records needs --membership"), "{err}");
    let out = node()
        .args(["send", "--to", &id, "--key"])
        .arg(dir.join("a.key"))
        .arg("hi")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without an address, give --membership"),
        "{err}"
    );
    let out = node()
        .args(["serve", "--record-ttl", "1s", "--key"])
        .arg(dir.join("a.key"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outside"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
