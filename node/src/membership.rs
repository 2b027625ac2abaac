//! `p2p-node membership`: the committee's tools. Thin wrappers over the library's
//! `membership` module; every file they write is TOML an operator can read before signing.
//!
//! ```text
//! p2p-node membership keygen --out gov.key
//! p2p-node membership init --network NAME --threshold K --committee HEX,HEX,... --members FILE --out DOC
//! p2p-node membership propose --current SIGNED --members FILE [--threshold K] [--committee ...] --out DOC
//! p2p-node membership sign --key gov.key DOC --out SIG
//! p2p-node membership combine DOC SIG... --out SIGNED
//! p2p-node membership verify SIGNED [--current SIGNED]
//! p2p-node membership show SIGNED
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use p2p_handler::membership::{Document, GovernanceId, GovernanceKey, SignatureFile, Signed};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Subcommand)]
pub(crate) enum MembershipCmd {
    /// Generate a governance key (secp256k1, for signing membership documents; not a
    /// node key) and print its public key.
    Keygen {
        /// Where to write the key (readable by the owner only).
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Write a network's first document (epoch 1), for its committee to sign.
    Init {
        /// The network's name (letters, digits, '.', '_', '-').
        #[arg(long)]
        network: String,
        /// How many committee signatures a change needs.
        #[arg(long)]
        threshold: u8,
        /// The committee's governance public keys, comma-separated.
        #[arg(long, value_delimiter = ',')]
        committee: Vec<String>,
        /// The members: a file in the allow list's format, each entry with its `key`.
        #[arg(long)]
        members: PathBuf,
        /// When the document stops being acceptable as the newest: a date-time
        /// (2027-01-01T00:00:00Z) or a duration from now ("180d").
        #[arg(long)]
        expires: Option<String>,
        /// Where to write the document.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the next epoch's document, for the current committee to sign.
    Propose {
        /// The signed document in force.
        #[arg(long)]
        current: PathBuf,
        /// The members of the next epoch (allow-list format, each entry with its `key`).
        #[arg(long)]
        members: PathBuf,
        /// A new threshold (default: the current one).
        #[arg(long)]
        threshold: Option<u8>,
        /// A new committee, comma-separated (default: the current one). A change needs the
        /// signatures of both the current and the new committee's thresholds.
        #[arg(long, value_delimiter = ',')]
        committee: Option<Vec<String>>,
        /// When it stops being acceptable as the newest (date-time, or duration from now).
        #[arg(long)]
        expires: Option<String>,
        /// Where to write the document.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a document with a governance key; write the signature to a file.
    Sign {
        /// The governance key file.
        #[arg(long)]
        key: PathBuf,
        /// The document (as `init` or `propose` wrote it).
        doc: PathBuf,
        /// The signed document in force, to check that this key may sign.
        #[arg(long)]
        current: Option<PathBuf>,
        /// Where to write the signature.
        #[arg(long)]
        out: PathBuf,
    },
    /// Put signatures into a document: the signed document nodes accept.
    Combine {
        /// The document.
        doc: PathBuf,
        /// Signature files, from `sign`.
        #[arg(required = true)]
        sigs: Vec<PathBuf>,
        /// Where to write the signed document.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a signed document as a node would: exit 0 if it would be accepted, otherwise
    /// 1 with every reason.
    Verify {
        /// The signed document.
        signed: PathBuf,
        /// The signed document in force (required for any epoch after the first).
        #[arg(long)]
        current: Option<PathBuf>,
    },
    /// Print a document: members, committee, signatures and whether each verifies.
    Show {
        /// The document, signed or not.
        signed: PathBuf,
    },
}

pub(crate) fn run(cmd: MembershipCmd) -> Result<()> {
    let now = unix_now();
    match cmd {
        MembershipCmd::Keygen { out, force } => keygen(&out, force),
        MembershipCmd::Init {
            network,
            threshold,
            committee,
            members,
            expires,
            out,
        } => {
            let committee = parse_committee(&committee)?;
            let members = Document::members_from_file(&members, now)?;
            let expires = expires.map(|e| parse_when(&e, now)).transpose()?;
            let doc = Signed::genesis(&network, threshold, committee, members, expires)
                .map_err(|e| format!("cannot make the document: {e}"))?;
            write_document(&doc, &out)
        }
        MembershipCmd::Propose {
            current,
            members,
            threshold,
            committee,
            expires,
            out,
        } => {
            let current = Signed::from_file(&current)?;
            let committee = committee.as_deref().map(parse_committee).transpose()?;
            let members = Document::members_from_file(&members, now)?;
            let expires = expires.map(|e| parse_when(&e, now)).transpose()?;
            let doc = current
                .propose(members, threshold, committee, expires)
                .map_err(|e| format!("cannot make the document: {e}"))?;
            let (old, new) = (current.document(), doc.document());
            if old.committee != new.committee || old.threshold != new.threshold {
                println!(
                    "this changes the committee: it needs {} signatures of the current committee \
                     and {} of the new one",
                    old.threshold, new.threshold
                );
            }
            write_document(&doc, &out)
        }
        MembershipCmd::Sign {
            key,
            doc,
            current,
            out,
        } => sign(&key, &doc, current.as_deref(), &out),
        MembershipCmd::Combine { doc, sigs, out } => combine(&doc, &sigs, &out),
        MembershipCmd::Verify { signed, current } => {
            let signed = Signed::from_file(&signed)?;
            let current = current.map(Signed::from_file).transpose()?;
            match signed.verify(current.as_ref(), now) {
                Ok(()) => {
                    println!(
                        "acceptable: epoch {} of network {:?}, digest {}",
                        signed.epoch(),
                        signed.document().network,
                        signed.digest()
                    );
                    Ok(())
                }
                Err(reasons) => {
                    let mut text = format!(
                        "epoch {} ({}) would be refused:",
                        signed.epoch(),
                        signed.digest()
                    );
                    for reason in reasons {
                        text.push_str(&format!("\n  - {reason}"));
                    }
                    Err(text.into())
                }
            }
        }
        MembershipCmd::Show { signed } => {
            print!("{}", show(&Signed::from_file(&signed)?));
            Ok(())
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A ChaCha20 stream seeded from the OS: the RNG the library's signing draws from.
fn os_rng() -> Result<ChaCha20Rng> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no OS randomness: {e}"))?;
    Ok(ChaCha20Rng::from_seed(seed))
}

fn parse_committee(keys: &[String]) -> Result<Vec<GovernanceId>> {
    keys.iter()
        .filter(|k| !k.trim().is_empty())
        .map(|k| {
            GovernanceId::from_hex(k)
                .map_err(|e| format!("--committee: {:?}: {e}", k.trim()).into())
        })
        .collect()
}

/// A date-time, or a duration from `now`, as Unix seconds.
fn parse_when(text: &str, now: u64) -> Result<u64> {
    if let Ok(at) = humantime::parse_rfc3339(text) {
        return Ok(at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| "--expires: before 1970")?
            .as_secs());
    }
    let after = humantime::parse_duration(text).map_err(|_| {
        format!("--expires: {text:?} is neither a date-time (2027-01-01T00:00:00Z) nor a duration (\"180d\")")
    })?;
    Ok(now.saturating_add(after.as_secs()))
}

/// Writes `text` to `path` through a temporary file and a rename, so that a node watching
/// the file never reads half of it.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| format!("{} is not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })?;
    Ok(())
}

fn write_document(doc: &Signed, out: &Path) -> Result<()> {
    write_atomically(out, &doc.to_toml())?;
    let d = doc.document();
    println!(
        "wrote epoch {} of network {:?} to {}: {} members, committee {} of {}, digest {}",
        d.epoch,
        d.network,
        out.display(),
        d.members.len(),
        d.threshold,
        d.committee.len(),
        doc.digest()
    );
    if d.fork_prone() {
        println!(
            "warning: a threshold of {} of {} lets two disjoint groups of signers each sign a \
             different next epoch (a fork); more than half ({}) prevents that",
            d.threshold,
            d.committee.len(),
            d.committee.len() / 2 + 1
        );
    }
    Ok(())
}

fn keygen(out: &Path, force: bool) -> Result<()> {
    let key = GovernanceKey::generate(&mut os_rng()?);
    crate::write_secret(out, force, &key.to_file_text())?;
    println!("{}", key.id());
    Ok(())
}

fn sign(key: &Path, doc: &Path, current: Option<&Path>, out: &Path) -> Result<()> {
    let key = GovernanceKey::from_file(key)?;
    let signed = Signed::from_file(doc)?;
    let id = key.id();
    let d = signed.document();
    let in_own = d.committee.contains(&id);
    match current.map(Signed::from_file).transpose()? {
        Some(current) => {
            let c = current.document();
            if c.network != d.network || c.epoch + 1 != d.epoch {
                return Err(format!(
                    "{} is epoch {} of network {:?}; the current document is epoch {} of {:?}",
                    doc.display(),
                    d.epoch,
                    d.network,
                    c.epoch,
                    c.network
                )
                .into());
            }
            let changes = c.committee != d.committee || c.threshold != d.threshold;
            let may_sign = c.committee.contains(&id) || (changes && in_own);
            if !may_sign {
                return Err(format!(
                    "key {id} is not in the committee of epoch {} (nor in the new one): its \
                     signature would be refused",
                    c.epoch
                )
                .into());
            }
        }
        None if d.epoch == 1 && !in_own => {
            return Err(format!(
                "key {id} is not in this genesis' committee: its signature would be refused"
            )
            .into());
        }
        None if !in_own => println!(
            "note: key {id} is not in this document's committee; it must be in the current \
             one (check with --current)"
        ),
        None => {}
    }
    let signature = key.sign(&signed.digest(), &mut os_rng()?);
    let file = SignatureFile {
        network: d.network.clone(),
        epoch: d.epoch,
        digest: signed.digest(),
        signature,
    };
    write_atomically(out, &file.to_toml())?;
    println!(
        "signed epoch {} of network {:?} (digest {}) as {id}",
        d.epoch,
        d.network,
        signed.digest()
    );
    Ok(())
}

fn combine(doc: &Path, sigs: &[PathBuf], out: &Path) -> Result<()> {
    let mut signed = Signed::from_file(doc)?;
    for path in sigs {
        let file = SignatureFile::from_file(path)?;
        signed
            .combine(&file)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    write_atomically(out, &signed.to_toml())?;
    let d = signed.document();
    println!(
        "wrote {} with {} signatures (epoch {}, digest {}); check it with `p2p-node \
         membership verify {}{}`",
        out.display(),
        signed.signatures().len(),
        d.epoch,
        signed.digest(),
        out.display(),
        if d.epoch > 1 {
            " --current CURRENT"
        } else {
            ""
        }
    );
    Ok(())
}

/// What `show` prints.
fn show(signed: &Signed) -> String {
    let d = signed.document();
    let when = |t: Option<u64>| {
        t.map_or_else(
            || "never".to_owned(),
            |secs| {
                humantime::format_rfc3339_seconds(
                    SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
                )
                .to_string()
            },
        )
    };
    let mut out = format!(
        "network    {}\nepoch      {}\ndigest     {}\nprevious   {}\nexpires    {}\n",
        d.network,
        d.epoch,
        signed.digest(),
        if d.epoch == 1 {
            "none (genesis)".to_owned()
        } else {
            d.previous.to_string()
        },
        when(d.expires)
    );
    out.push_str(&format!(
        "committee  {} of {} (signs epoch {})\n",
        d.threshold,
        d.committee.len(),
        d.epoch + 1
    ));
    for key in &d.committee {
        out.push_str(&format!("  {key}\n"));
    }
    out.push_str(&format!("members    {}\n", d.members.len()));
    for m in &d.members {
        let mut line = format!("  {}", m.peer_id());
        if let Some(name) = &m.name {
            line.push_str(&format!("  {name}"));
        }
        if let Some(address) = m.address {
            line.push_str(&format!("  at {address}"));
        }
        if !m.allowed.is_empty() {
            let ips: Vec<String> = m.allowed.iter().map(ToString::to_string).collect();
            line.push_str(&format!("  from {}", ips.join(",")));
        }
        if m.expires.is_some() {
            line.push_str(&format!("  until {}", when(m.expires)));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!("signatures {}\n", signed.signatures().len()));
    for sig in signed.signatures() {
        let valid = if sig.is_valid_for(&signed.digest()) {
            "valid"
        } else {
            "INVALID"
        };
        let whose = if d.committee.contains(&sig.signer) {
            "in this document's committee"
        } else {
            "not in this document's committee"
        };
        out.push_str(&format!("  {}  {valid}, {whose}\n", sig.signer));
    }
    out
}
