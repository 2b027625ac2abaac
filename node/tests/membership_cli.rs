//! `p2p-node membership`: the committee's tools, as an operator runs them, including the
//! operator who signs the wrong file.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use support::{governance_key, keygen, node, output, public_key};

/// A scratch directory with three governance keys and three node keys.
struct Committee {
    dir: PathBuf,
    gov: Vec<String>,
}

impl Committee {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("p2p-membership-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let gov = (1..=3)
            .map(|i| governance_key(&dir, &format!("gov{i}.key")))
            .collect();
        for name in ["a", "b", "c"] {
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

    /// A members file listing the given nodes by key.
    fn members(&self, file: &str, names: &[&str]) -> PathBuf {
        let mut text = String::new();
        for name in names {
            text.push_str(&format!(
                "[[peer]]\nkey = \"{}\"\nname = \"{name}\"\n\n",
                self.public(name)
            ));
        }
        let path = self.path(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn run(&self, args: &[&str]) -> Output {
        node()
            .arg("membership")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Fails, and says `why` on stderr.
    fn fails(&self, args: &[&str], why: &[&str]) {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        for w in why {
            assert!(err.contains(w), "{args:?}: expected {w:?} in {err}");
        }
    }

    /// Signs `doc` with each of `signers` (1-based) and combines into `out`.
    fn sign_all(&self, doc: &str, signers: &[usize], out: &str) {
        let mut sigs = Vec::new();
        for &i in signers {
            let sig = format!("{doc}.sig{i}");
            self.ok(&["sign", "--key", &format!("gov{i}.key"), doc, "--out", &sig]);
            sigs.push(sig);
        }
        let mut args = vec!["combine", doc];
        args.extend(sigs.iter().map(String::as_str));
        args.extend(["--out", out]);
        self.ok(&args);
    }

    fn genesis(&self) {
        self.members("m1.toml", &["a", "b"]);
        let committee = self.gov.join(",");
        self.ok(&[
            "init",
            "--network",
            "demo",
            "--threshold",
            "2",
            "--committee",
            &committee,
            "--members",
            "m1.toml",
            "--out",
            "e1.toml",
        ]);
        self.sign_all("e1.toml", &[1, 3], "e1.signed.toml");
    }
}

impl Drop for Committee {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn a_committee_starts_a_network_and_changes_it() {
    let c = Committee::new("flow");
    c.genesis();
    let verified = c.ok(&["verify", "e1.signed.toml"]);
    assert!(verified.contains("acceptable: epoch 1"), "{verified}");
    let shown = c.ok(&["show", "e1.signed.toml"]);
    assert!(shown.contains("committee  2 of 3"), "{shown}");
    assert_eq!(
        shown.matches("valid, in this document's committee").count(),
        2,
        "{shown}"
    );
    assert!(
        shown.contains("members    2") && shown.contains("  a\n") && shown.contains("  b\n"),
        "{shown}"
    );

    // Epoch 2 adds c; one signature is not enough, two are.
    c.members("m2.toml", &["a", "b", "c"]);
    c.ok(&[
        "propose",
        "--current",
        "e1.signed.toml",
        "--members",
        "m2.toml",
        "--out",
        "e2.toml",
    ]);
    c.sign_all("e2.toml", &[2], "e2.under.toml");
    c.fails(
        &["verify", "e2.under.toml", "--current", "e1.signed.toml"],
        &[
            "would be refused",
            "only 1 of the committee of epoch 1 signed validly; its threshold is 2",
        ],
    );
    c.sign_all("e2.toml", &[2, 3], "e2.signed.toml");
    c.ok(&["verify", "e2.signed.toml", "--current", "e1.signed.toml"]);
    // Without the current document a later epoch cannot be checked, and it says why.
    c.fails(
        &["verify", "e2.signed.toml"],
        &["cannot be checked on its own", "epoch 1"],
    );
    // Epoch 1 offered to a node at epoch 2: a rollback.
    c.fails(
        &["verify", "e1.signed.toml", "--current", "e2.signed.toml"],
        &["not newer", "rollback"],
    );

    // Epoch 3 replaces the committee: a new key for member 1. It needs 2 of the old
    // committee *and* 2 of the new one; the new key's holder signs too.
    let new_key = c.ok(&["keygen", "--out", "gov4.key"]).trim().to_owned();
    let new_committee = format!("{},{},{new_key}", c.gov[1], c.gov[2]);
    let note = c.ok(&[
        "propose",
        "--current",
        "e2.signed.toml",
        "--members",
        "m2.toml",
        "--committee",
        &new_committee,
        "--out",
        "e3.toml",
    ]);
    assert!(note.contains("changes the committee"), "{note}");
    c.sign_all("e3.toml", &[1, 2], "e3.old-only.toml");
    c.fails(
        &["verify", "e3.old-only.toml", "--current", "e2.signed.toml"],
        &["only 1 of the new committee signed validly"],
    );
    c.sign_all("e3.toml", &[1, 2, 4], "e3.signed.toml");
    c.ok(&["verify", "e3.signed.toml", "--current", "e2.signed.toml"]);
}

#[test]
fn the_operator_who_signs_the_wrong_file_is_stopped() {
    let c = Committee::new("wrong");
    c.genesis();
    c.members("m2.toml", &["a", "b", "c"]);
    c.ok(&[
        "propose",
        "--current",
        "e1.signed.toml",
        "--members",
        "m2.toml",
        "--out",
        "e2.toml",
    ]);

    // A node's key is not a governance key.
    c.fails(
        &["sign", "--key", "a.key", "e2.toml", "--out", "x"],
        &["a.key", "not a governance key"],
    );
    // A key outside the committee, caught before it signs.
    c.ok(&["keygen", "--out", "stranger.key"]);
    c.fails(
        &[
            "sign",
            "--key",
            "stranger.key",
            "e2.toml",
            "--current",
            "e1.signed.toml",
            "--out",
            "x",
        ],
        &["not in the committee of epoch 1"],
    );
    // A signature of epoch 1 combined into epoch 2.
    c.fails(
        &["combine", "e2.toml", "e1.toml.sig1", "--out", "x"],
        &["e1.toml.sig1", "signs epoch 1"],
    );
    // A document edited after it was written (and after it was signed).
    c.ok(&["sign", "--key", "gov1.key", "e2.toml", "--out", "s1"]);
    let edited = read(&c.path("e2.toml")).replace("threshold = 2", "threshold = 1");
    std::fs::write(c.path("e2.edited.toml"), edited).unwrap();
    c.fails(
        &["combine", "e2.edited.toml", "s1", "--out", "x"],
        &["e2.edited.toml", "edited"],
    );
    // A forged signature (one hex digit changed).
    let sig = read(&c.path("s1"));
    let at = sig.find("signature = \"").unwrap() + 20;
    let mut forged = sig.clone();
    let flipped = if &sig[at..=at] == "0" { "1" } else { "0" };
    forged.replace_range(at..=at, flipped);
    std::fs::write(c.path("forged"), forged).unwrap();
    c.fails(
        &["combine", "e2.toml", "forged", "--out", "x"],
        &["forged", "does not verify"],
    );
    // A bad committee key and an impossible threshold, named.
    c.fails(
        &[
            "init",
            "--network",
            "demo",
            "--threshold",
            "1",
            "--committee",
            "beef",
            "--members",
            "m2.toml",
            "--out",
            "x",
        ],
        &["--committee", "64 hex digits"],
    );
    c.fails(
        &[
            "init",
            "--network",
            "demo",
            "--threshold",
            "4",
            "--committee",
            &c.gov.join(","),
            "--members",
            "m2.toml",
            "--out",
            "x",
        ],
        &["threshold", "4 of 3"],
    );
    // A members file entry without its key.
    std::fs::write(
        c.path("ids.toml"),
        format!("[[peer]]\nid = \"{}\"\n", "ab".repeat(32)),
    )
    .unwrap();
    c.fails(
        &[
            "init",
            "--network",
            "demo",
            "--threshold",
            "1",
            "--committee",
            &c.gov[0],
            "--members",
            "ids.toml",
            "--out",
            "x",
        ],
        &["ids.toml", "needs `key`"],
    );
    // A fork-prone threshold is written, with a warning.
    let warned = c.ok(&[
        "init",
        "--network",
        "demo",
        "--threshold",
        "1",
        "--committee",
        &c.gov.join(","),
        "--members",
        "m2.toml",
        "--out",
        "weak.toml",
        "--expires",
        "30d",
    ]);
    assert!(
        warned.contains("warning") && warned.contains("fork"),
        "{warned}"
    );
    assert!(read(&c.path("weak.toml")).contains("expires = 20"));
    c.fails(
        &[
            "init",
            "--network",
            "demo",
            "--threshold",
            "1",
            "--committee",
            &c.gov[0],
            "--members",
            "m2.toml",
            "--out",
            "x",
            "--expires",
            "soon",
        ],
        &["--expires", "soon"],
    );
    // Nothing was written where a command failed.
    assert!(!c.path("x").exists());
}

#[test]
fn expired_documents_are_refused() {
    let c = Committee::new("expired");
    c.members("m1.toml", &["a"]);
    c.ok(&[
        "init",
        "--network",
        "demo",
        "--threshold",
        "1",
        "--committee",
        &c.gov[0],
        "--members",
        "m1.toml",
        "--out",
        "old.toml",
        "--expires",
        "2020-01-01T00:00:00Z",
    ]);
    c.sign_all("old.toml", &[1], "old.signed.toml");
    c.fails(&["verify", "old.signed.toml"], &["expired"]);
}

#[test]
fn id_prints_the_public_key_a_document_lists() {
    let c = Committee::new("id");
    let public = c.public("a");
    assert_eq!(public.len(), 64);
    let id = output(node().args(["id", "--key"]).arg(c.path("a.key")));
    // The allow list takes the key in place of the id, and derives the same id.
    let allow = c.path("allow.toml");
    std::fs::write(
        &allow,
        format!("[[peer]]\nkey = \"{public}\"\nid = \"{}\"\n", id.trim()),
    )
    .unwrap();
    let list = p2p_handler::AllowList::from_file(&allow).unwrap();
    assert!(list.contains(&id.trim().parse().unwrap()));
}
