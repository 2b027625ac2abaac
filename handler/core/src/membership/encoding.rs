//! The canonical byte encoding of documents and signed documents (`docs/PROTOCOL.md`
//! section 8). The decoder accepts exactly what the encoder writes for a document that
//! passes [`check_document`]: one document has one encoding, so one digest.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::records::RecordKeyId;

use super::{
    DIGEST_TAG, DOCUMENT_MAGIC, Digest, Document, FORMAT_VERSION, FORMAT_VERSION_RECORD_KEYS,
    GovernanceId, MAX_ALLOWED_IPS, MAX_COMMITTEE, MAX_DOCUMENT_LEN, MAX_MEMBERS, MAX_NAME_LEN,
    MAX_SIGNATURES, MAX_SIGNED_LEN, Member, SIGNED_MAGIC, Signature, Signed, tagged_hash,
};

pub use crate::canonical::DecodeError;
use crate::canonical::{Reader, check_network, invalid, put_ip};

/// Checks every rule the decoder checks, on a document built in memory (members and
/// committee already in canonical order).
pub(super) fn check_document(doc: &Document) -> Result<(), DecodeError> {
    check_network(&doc.network)?;
    if doc.epoch == 0 {
        return Err(invalid("epoch", "epochs count from 1"));
    }
    if (doc.epoch == 1) != (doc.previous == Digest::NONE) {
        return Err(invalid(
            "previous",
            if doc.epoch == 1 {
                "the genesis (epoch 1) names no previous document"
            } else {
                "every epoch after the first names the digest of the one before"
            },
        ));
    }
    if doc.expires == Some(0) {
        return Err(invalid(
            "expires",
            "0 is not a time (leave it out for never)",
        ));
    }
    let n = doc.committee.len();
    if n == 0 || n > MAX_COMMITTEE {
        return Err(invalid(
            "committee",
            format!("{n} keys; a committee has 1 to {MAX_COMMITTEE}"),
        ));
    }
    if doc.threshold == 0 || usize::from(doc.threshold) > n {
        return Err(invalid(
            "threshold",
            format!(
                "{} of {n}: it must be 1 to the committee's size",
                doc.threshold
            ),
        ));
    }
    for pair in doc.committee.windows(2) {
        if pair[0] >= pair[1] {
            return Err(invalid("committee", format!("{} is listed twice", pair[1])));
        }
    }
    for key in &doc.committee {
        if secp256k1::XOnlyPublicKey::from_byte_array(key.0).is_err() {
            return Err(invalid(
                "committee",
                format!("{key} is not a secp256k1 x-only public key"),
            ));
        }
    }
    if doc.members.len() > MAX_MEMBERS {
        return Err(invalid(
            "members",
            format!("{} members; at most {MAX_MEMBERS}", doc.members.len()),
        ));
    }
    for pair in doc.members.windows(2) {
        if pair[0].key >= pair[1].key {
            return Err(invalid(
                "members",
                format!("peer {} is listed twice", pair[1].peer_id()),
            ));
        }
    }
    doc.members.iter().try_for_each(check_member)
}

fn check_member(member: &Member) -> Result<(), DecodeError> {
    let peer = member.peer_id();
    if let Some(name) = &member.name {
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(invalid(
                "name",
                format!(
                    "peer {peer}: 1 to {MAX_NAME_LEN} bytes, found {}",
                    name.len()
                ),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(invalid(
                "name",
                format!("peer {peer}: control characters are not allowed"),
            ));
        }
    }
    if member.expires == Some(0) {
        return Err(invalid(
            "expires",
            format!("peer {peer}: 0 is not a time (leave it out for never)"),
        ));
    }
    if member.address.is_some_and(|a| a.port() == 0) {
        return Err(invalid("address", format!("peer {peer}: port 0")));
    }
    if member.allowed.len() > MAX_ALLOWED_IPS {
        return Err(invalid(
            "addresses",
            format!(
                "peer {peer}: {} addresses; at most {MAX_ALLOWED_IPS}",
                member.allowed.len()
            ),
        ));
    }
    for pair in member.allowed.windows(2) {
        if pair[0] >= pair[1] {
            return Err(invalid(
                "addresses",
                format!("peer {peer}: {} is listed twice", pair[1]),
            ));
        }
    }
    if let Some(key) = member.record_key
        && secp256k1::XOnlyPublicKey::from_byte_array(key.0).is_err()
    {
        return Err(invalid(
            "record key",
            format!("peer {peer}: not a secp256k1 x-only public key"),
        ));
    }
    Ok(())
}

pub(super) fn encode_document(doc: &Document) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + doc.members.len() * 64);
    out.extend_from_slice(&DOCUMENT_MAGIC);
    let with_record_keys = doc.members.iter().any(|m| m.record_key.is_some());
    out.push(if with_record_keys {
        FORMAT_VERSION_RECORD_KEYS
    } else {
        FORMAT_VERSION
    });
    // Lengths are within their bounds for a checked document; a longer one is cut to the
    // byte the length field can hold and the decoder refuses the result.
    out.push(doc.network.len().min(255) as u8);
    out.extend_from_slice(doc.network.as_bytes());
    out.extend_from_slice(&doc.epoch.to_be_bytes());
    out.extend_from_slice(&doc.previous.0);
    out.extend_from_slice(&doc.expires.unwrap_or(0).to_be_bytes());
    out.push(doc.threshold);
    let mut committee = doc.committee.clone();
    committee.sort_unstable();
    out.push(committee.len().min(255) as u8);
    for key in &committee {
        out.extend_from_slice(&key.0);
    }
    let mut members: Vec<&Member> = doc.members.iter().collect();
    members.sort_unstable_by_key(|m| m.key);
    out.extend_from_slice(&(members.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    for member in members {
        out.extend_from_slice(&member.key);
        let name = member.name.as_deref().unwrap_or("");
        out.push(name.len().min(255) as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&member.expires.unwrap_or(0).to_be_bytes());
        match member.address {
            None => out.push(0),
            Some(addr) => {
                put_ip(&mut out, addr.ip());
                out.extend_from_slice(&addr.port().to_be_bytes());
            }
        }
        let mut allowed = member.allowed.clone();
        allowed.sort_unstable();
        out.push(allowed.len().min(255) as u8);
        for ip in allowed {
            put_ip(&mut out, ip);
        }
        if with_record_keys {
            match member.record_key {
                None => out.push(0),
                Some(key) => {
                    out.push(1);
                    out.extend_from_slice(&key.0);
                }
            }
        }
    }
    out
}

/// Reads the magic and version of `what`; returns the version (one of `versions`).
fn magic(
    r: &mut Reader<'_>,
    magic: [u8; 4],
    what: &'static str,
    versions: &[u8],
) -> Result<u8, DecodeError> {
    if r.array::<4>("magic")? != magic {
        return Err(invalid("magic", format!("not a {what}")));
    }
    let version = r.u8("version")?;
    if !versions.contains(&version) {
        return Err(invalid(
            "version",
            format!("{version}; this build reads versions {versions:?}"),
        ));
    }
    Ok(version)
}

fn optional_time(value: u64) -> Option<u64> {
    (value != 0).then_some(value)
}

pub(super) fn decode_document(bytes: &[u8]) -> Result<Document, DecodeError> {
    if bytes.len() > MAX_DOCUMENT_LEN {
        return Err(DecodeError::TooLong {
            len: bytes.len(),
            max: MAX_DOCUMENT_LEN,
        });
    }
    let mut r = Reader::new(bytes);
    let version = magic(
        &mut r,
        DOCUMENT_MAGIC,
        "membership document",
        &[FORMAT_VERSION, FORMAT_VERSION_RECORD_KEYS],
    )?;
    let with_record_keys = version == FORMAT_VERSION_RECORD_KEYS;
    let network = r.text("network")?.to_owned();
    let epoch = r.u64("epoch")?;
    let previous = Digest(r.array("previous")?);
    let expires = optional_time(r.u64("expires")?);
    let threshold = r.u8("threshold")?;
    let committee_len = usize::from(r.u8("committee")?);
    if committee_len > MAX_COMMITTEE {
        return Err(invalid(
            "committee",
            format!("{committee_len} keys; a committee has 1 to {MAX_COMMITTEE}"),
        ));
    }
    let mut committee = Vec::with_capacity(committee_len);
    for _ in 0..committee_len {
        committee.push(GovernanceId(r.array("committee")?));
    }
    let member_count = usize::from(r.u16("members")?);
    if member_count > MAX_MEMBERS {
        return Err(invalid(
            "members",
            format!("{member_count} members; at most {MAX_MEMBERS}"),
        ));
    }
    let mut members = Vec::with_capacity(member_count);
    for _ in 0..member_count {
        let key = r.array("member key")?;
        let name = r.text("name")?;
        let name = (!name.is_empty()).then(|| name.to_owned());
        let member_expires = optional_time(r.u64("member expires")?);
        let address = match r.u8("address")? {
            0 => None,
            tag => {
                let ip = r.ip(tag, "address")?;
                Some(SocketAddr::new(ip, r.u16("address port")?))
            }
        };
        let allowed_count = usize::from(r.u8("addresses")?);
        if allowed_count > MAX_ALLOWED_IPS {
            return Err(invalid(
                "addresses",
                format!("{allowed_count} addresses; at most {MAX_ALLOWED_IPS}"),
            ));
        }
        let mut allowed = Vec::with_capacity(allowed_count);
        for _ in 0..allowed_count {
            let tag = r.u8("addresses")?;
            allowed.push(r.ip(tag, "addresses")?);
        }
        let record_key = if with_record_keys {
            match r.u8("record key")? {
                0 => None,
                1 => Some(RecordKeyId(r.array("record key")?)),
                other => return Err(invalid("record key", format!("presence {other} (0 or 1)"))),
            }
        } else {
            None
        };
        members.push(Member {
            key,
            name,
            address,
            allowed,
            expires: member_expires,
            record_key,
        });
    }
    r.finish()?;
    if with_record_keys && members.iter().all(|m| m.record_key.is_none()) {
        return Err(invalid(
            "version",
            format!(
                "{FORMAT_VERSION_RECORD_KEYS} but no member has a record key (that is version {FORMAT_VERSION})"
            ),
        ));
    }
    let doc = Document {
        network,
        epoch,
        previous,
        expires,
        threshold,
        committee,
        members,
    };
    check_document(&doc)?;
    Ok(doc)
}

pub(super) fn encode_signed(signed: &Signed) -> Vec<u8> {
    let doc = &signed.bytes;
    let mut out = Vec::with_capacity(4 + 1 + 4 + doc.len() + 1 + signed.signatures.len() * 96);
    out.extend_from_slice(&SIGNED_MAGIC);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&(doc.len() as u32).to_be_bytes());
    out.extend_from_slice(doc);
    out.push(signed.signatures.len().min(MAX_SIGNATURES) as u8);
    for sig in signed.signatures.iter().take(MAX_SIGNATURES) {
        out.extend_from_slice(&sig.signer.0);
        out.extend_from_slice(&sig.signature);
    }
    out
}

pub(super) fn decode_signed(bytes: &[u8]) -> Result<Signed, DecodeError> {
    if bytes.len() > MAX_SIGNED_LEN {
        return Err(DecodeError::TooLong {
            len: bytes.len(),
            max: MAX_SIGNED_LEN,
        });
    }
    let mut r = Reader::new(bytes);
    magic(
        &mut r,
        SIGNED_MAGIC,
        "signed membership document",
        &[FORMAT_VERSION],
    )?;
    let doc_len = r.u32("document length")? as usize;
    if doc_len > MAX_DOCUMENT_LEN {
        return Err(DecodeError::TooLong {
            len: doc_len,
            max: MAX_DOCUMENT_LEN,
        });
    }
    let doc_bytes = r.take(doc_len, "document")?;
    let document = decode_document(doc_bytes)?;
    let count = usize::from(r.u8("signatures")?);
    if count > MAX_SIGNATURES {
        return Err(invalid(
            "signatures",
            format!("{count} signatures; at most {MAX_SIGNATURES}"),
        ));
    }
    let mut signatures = Vec::with_capacity(count);
    for _ in 0..count {
        signatures.push(Signature {
            signer: GovernanceId(r.array("signer")?),
            signature: r.array("signature")?,
        });
    }
    r.finish()?;
    let bytes = Bytes::copy_from_slice(doc_bytes);
    let digest = Digest(tagged_hash(DIGEST_TAG, &bytes));
    Ok(Signed {
        document,
        bytes,
        digest,
        signatures,
    })
}
