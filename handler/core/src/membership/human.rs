//! The TOML forms operators read and write: a document (with or without signatures), a
//! single signature, and a members file (the allow list's format). Signatures are never
//! over this text: the tools convert it to the canonical encoding, and a document written
//! by them carries its `digest` so that an edit is caught when it is read back.
//!
//! ```toml
//! network = "bitvmx-main"
//! epoch = 2
//! previous = "…64 hex digits: the digest of epoch 1…"
//! digest = "…64 hex digits…"          # optional; checked when present
//! expires = 2027-06-01T00:00:00Z      # optional
//! threshold = 2
//! committee = ["…x-only key…", "…", "…"]
//!
//! [[peer]]
//! key = "…static X25519 public key…"   # required
//! id = "…peer id…"                     # optional; checked against the key
//! name = "alice"                       # optional
//! address = "10.0.0.1:7000"            # optional: where it listens
//! addresses = ["10.0.0.1"]             # optional: IPs it may connect from
//! expires = 2027-01-01T00:00:00Z       # optional: a date-time, never a duration
//! record_key = "…x-only key…"          # optional: signs its address records
//!                                      # (`p2p-node id --key FILE --record-key`)
//!
//! [[signature]]                        # a signed document: one per signer
//! signer = "…x-only key…"
//! signature = "…128 hex digits…"
//! ```

use std::fmt::Write as _;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::{Digest, Document, GovernanceId, Member, Signature, Signed};
use crate::allow_list::{
    AllowList, Expiry, FilePeer, datetime_to_unix, line_of, parse_key, unix_to_datetime,
};
use crate::identity::PeerId;
use crate::records::RecordKeyId;

/// Why a TOML form could not be read. Names the file, and the line and field when known.
#[derive(Debug, thiserror::Error)]
pub enum HumanError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The text is not a valid form.
    #[error("invalid {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, with line and field.
        message: String,
    },
}

fn read(path: &Path) -> Result<(String, String), HumanError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| HumanError::Io {
        path: shown.clone(),
        source,
    })?;
    Ok((text, shown))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentForm {
    network: String,
    epoch: u64,
    #[serde(default)]
    previous: Option<Spanned<String>>,
    #[serde(default)]
    digest: Option<Spanned<String>>,
    #[serde(default)]
    expires: Option<Spanned<toml::value::Datetime>>,
    threshold: u8,
    committee: Vec<Spanned<String>>,
    #[serde(default)]
    peer: Vec<Spanned<FilePeer>>,
    #[serde(default)]
    signature: Vec<Spanned<SignatureForm>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureForm {
    signer: Spanned<String>,
    signature: Spanned<String>,
}

/// Parses `len` bytes of hex, naming line and field on error.
fn hex_field<const N: usize>(
    value: &Spanned<String>,
    field: &str,
    text: &str,
) -> Result<[u8; N], String> {
    let line = line_of(text, value.span().start);
    let digits = value.get_ref().trim();
    if digits.len() != 2 * N {
        return Err(format!(
            "line {line}: {field}: expected {} hex digits, found {}",
            2 * N,
            digits.len()
        ));
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(digits, &mut out)
        .map_err(|e| format!("line {line}: {field}: not hex: {e}"))?;
    Ok(out)
}

fn governance_id(value: &Spanned<String>, field: &str, text: &str) -> Result<GovernanceId, String> {
    GovernanceId::from_hex(value.get_ref())
        .map_err(|why| format!("line {}: {field}: {why}", line_of(text, value.span().start)))
}

fn signature_of(form: &SignatureForm, text: &str) -> Result<Signature, String> {
    Ok(Signature {
        signer: governance_id(&form.signer, "signer", text)?,
        signature: hex_field::<64>(&form.signature, "signature", text)?,
    })
}

fn member_of(form: Spanned<FilePeer>, text: &str) -> Result<Member, String> {
    let line = line_of(text, form.span().start);
    let form = form.into_inner();
    let Some(key) = &form.key else {
        return Err(format!(
            "line {line}: a member needs `key`, its static public key (`p2p-node id --key FILE \
             --public` prints it)"
        ));
    };
    let key = parse_key(key, text)?;
    if let Some(id) = form.id
        && id != PeerId::from_public_key(&key)
    {
        return Err(format!(
            "line {line}: id {id} is not the peer id of its key ({})",
            PeerId::from_public_key(&key)
        ));
    }
    let expires = form
        .expires
        .map(|value| {
            let at = line_of(text, value.span().start);
            match value.get_ref() {
                toml::Value::Datetime(dt) => {
                    datetime_to_unix(dt).map_err(|why| format!("line {at}: expires: {why}"))
                }
                _ => Err(format!(
                    "line {at}: expires: a signed document holds a date-time \
                     (2027-01-01T00:00:00Z), not a duration"
                )),
            }
        })
        .transpose()?;
    let record_key = form
        .record_key
        .as_ref()
        .map(|k| {
            RecordKeyId::from_hex(k.get_ref())
                .map_err(|why| format!("line {}: record_key: {why}", line_of(text, k.span().start)))
        })
        .transpose()?;
    Ok(Member {
        key,
        name: form.name,
        address: form.address,
        allowed: form.addresses,
        expires,
        record_key,
    })
}

fn parse_document(text: &str) -> Result<Signed, String> {
    let form: DocumentForm = toml::from_str(text).map_err(|e| e.to_string())?;
    let previous = match &form.previous {
        Some(p) => Digest(hex_field::<32>(p, "previous", text)?),
        None => Digest::NONE,
    };
    let expires = form
        .expires
        .as_ref()
        .map(|e| {
            datetime_to_unix(e.get_ref())
                .map_err(|why| format!("line {}: expires: {why}", line_of(text, e.span().start)))
        })
        .transpose()?;
    let committee = form
        .committee
        .iter()
        .map(|k| governance_id(k, "committee", text))
        .collect::<Result<Vec<_>, _>>()?;
    let members = form
        .peer
        .into_iter()
        .map(|p| member_of(p, text))
        .collect::<Result<Vec<_>, _>>()?;
    let document = Document {
        network: form.network,
        epoch: form.epoch,
        previous,
        expires,
        threshold: form.threshold,
        committee,
        members,
    };
    let mut signed = Signed::new(document).map_err(|e| e.to_string())?;
    if let Some(written) = &form.digest {
        let written = Digest(hex_field::<32>(written, "digest", text)?);
        if written != signed.digest() {
            return Err(format!(
                "line {}: digest: the file says {written}, its contents give {}: it was edited \
                 after it was written (signatures made before the edit are void)",
                line_of(text, form.digest.as_ref().map_or(0, |d| d.span().start)),
                signed.digest()
            ));
        }
    }
    for sig in &form.signature {
        signed.add_signature(signature_of(sig.get_ref(), text)?);
    }
    Ok(signed)
}

impl Signed {
    /// Reads the TOML form (see the module docs of `human`); `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, HumanError> {
        parse_document(text).map_err(|message| HumanError::Invalid {
            path: origin.to_owned(),
            message,
        })
    }

    /// Loads a document file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, HumanError> {
        let (text, shown) = read(path.as_ref())?;
        Self::from_toml(&text, &shown)
    }

    /// The TOML form, with its digest and signatures.
    pub fn to_toml(&self) -> String {
        let doc = self.document();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Membership of network {:?}, epoch {}. Signatures are over the digest of the\n\
             # canonical encoding (docs/PROTOCOL.md section 8), not over this text: an edit\n\
             # changes the digest and voids them.",
            doc.network, doc.epoch
        );
        let _ = writeln!(out, "network = {}", quoted(&doc.network));
        let _ = writeln!(out, "epoch = {}", doc.epoch);
        if doc.previous != Digest::NONE {
            let _ = writeln!(out, "previous = \"{}\"", doc.previous);
        }
        let _ = writeln!(out, "digest = \"{}\"", self.digest());
        if let Some(expires) = doc.expires {
            let _ = writeln!(out, "expires = {}", unix_to_datetime(expires));
        }
        let _ = writeln!(out, "threshold = {}", doc.threshold);
        out.push_str("committee = [\n");
        for key in &doc.committee {
            let _ = writeln!(out, "    \"{key}\",");
        }
        out.push_str("]\n");
        for member in &doc.members {
            out.push_str("\n[[peer]]\n");
            let _ = writeln!(out, "id = \"{}\"", member.peer_id());
            let _ = writeln!(out, "key = \"{}\"", hex::encode(member.key));
            if let Some(name) = &member.name {
                let _ = writeln!(out, "name = {}", quoted(name));
            }
            if let Some(address) = member.address {
                let _ = writeln!(out, "address = \"{address}\"");
            }
            if !member.allowed.is_empty() {
                let list: Vec<String> = member
                    .allowed
                    .iter()
                    .map(|ip| format!("\"{ip}\""))
                    .collect();
                let _ = writeln!(out, "addresses = [{}]", list.join(", "));
            }
            if let Some(expires) = member.expires {
                let _ = writeln!(out, "expires = {}", unix_to_datetime(expires));
            }
            if let Some(key) = member.record_key {
                let _ = writeln!(out, "record_key = \"{key}\"");
            }
        }
        for sig in self.signatures() {
            out.push_str("\n[[signature]]\n");
            let _ = writeln!(out, "signer = \"{}\"", sig.signer);
            let _ = writeln!(out, "signature = \"{}\"", hex::encode(sig.signature));
        }
        out
    }
}

/// A TOML basic string with its escapes.
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// One committee member's signature, as `p2p-node membership sign` writes it: it names the
/// document it signs, so `combine` can refuse a signature of another one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureFile {
    /// The document's network.
    pub network: String,
    /// Its epoch.
    pub epoch: u64,
    /// Its digest.
    pub digest: Digest,
    /// The signature.
    pub signature: Signature,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureFileForm {
    network: String,
    epoch: u64,
    digest: Spanned<String>,
    signer: Spanned<String>,
    signature: Spanned<String>,
}

impl SignatureFile {
    /// The TOML form.
    pub fn to_toml(&self) -> String {
        format!(
            "# Signature of membership epoch {} of network {:?}.\n\
             network = {}\nepoch = {}\ndigest = \"{}\"\nsigner = \"{}\"\nsignature = \"{}\"\n",
            self.epoch,
            self.network,
            quoted(&self.network),
            self.epoch,
            self.digest,
            self.signature.signer,
            hex::encode(self.signature.signature)
        )
    }

    /// Reads the TOML form; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, HumanError> {
        let parse = || -> Result<Self, String> {
            let form: SignatureFileForm = toml::from_str(text).map_err(|e| e.to_string())?;
            Ok(Self {
                network: form.network,
                epoch: form.epoch,
                digest: Digest(hex_field::<32>(&form.digest, "digest", text)?),
                signature: signature_of(
                    &SignatureForm {
                        signer: form.signer,
                        signature: form.signature,
                    },
                    text,
                )?,
            })
        };
        parse().map_err(|message| HumanError::Invalid {
            path: origin.to_owned(),
            message,
        })
    }

    /// Loads a signature file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, HumanError> {
        let (text, shown) = read(path.as_ref())?;
        Self::from_toml(&text, &shown)
    }
}

impl Document {
    /// The members listed in a file of the allow list's format (`[[peer]]` with `key`,
    /// optional `address`, `addresses`, `name`, `expires`). An expiry given as a duration
    /// is turned into a date from `now` (Unix seconds): a signed document holds dates.
    pub fn members_from_toml(
        text: &str,
        origin: &str,
        now: u64,
    ) -> Result<Vec<Member>, HumanError> {
        let invalid = |message: String| HumanError::Invalid {
            path: origin.to_owned(),
            message,
        };
        let list = AllowList::from_toml_str(text, origin).map_err(|e| match e {
            crate::allow_list::AllowListError::Invalid { message, .. } => invalid(message),
            crate::allow_list::AllowListError::Io { path, source } => {
                HumanError::Io { path, source }
            }
        })?;
        list.peers()
            .map(|(id, entry)| {
                let key = entry.public_key.ok_or_else(|| {
                    invalid(format!(
                        "peer {id}: a member needs `key`, its static public key \
                         (`p2p-node id --key FILE --public` prints it)"
                    ))
                })?;
                let expires = entry.expires.map(|expiry| match expiry {
                    Expiry::At(at) => at
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(1, |d| d.as_secs().max(1)),
                    Expiry::AfterLoad(after) => now.saturating_add(after.as_secs()).max(1),
                });
                Ok(Member {
                    key,
                    name: entry.name.clone(),
                    address: entry.address,
                    allowed: entry.addresses.clone(),
                    expires,
                    record_key: entry.record_key,
                })
            })
            .collect()
    }

    /// [`Document::members_from_toml`] of a file.
    pub fn members_from_file(path: impl AsRef<Path>, now: u64) -> Result<Vec<Member>, HumanError> {
        let (text, shown) = read(path.as_ref())?;
        Self::members_from_toml(&text, &shown, now)
    }
}
