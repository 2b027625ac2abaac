//! The byte layout of a sealed record and of its body (`docs/PROTOCOL.md`, section 9). The
//! decoder checks the layout and every bound, never panics, and accepts nothing after the
//! signature; what the bytes mean is checked by `open`.

use std::net::SocketAddr;

use bytes::Bytes;

use super::{
    KEY_LEN, MAX_BODY_PLAIN, MAX_RECORD_ADDRESSES, MAX_RECORD_LEN, RECORD_MAGIC, RECORD_VERSION,
    Record, SLOT_LEN, SealedRecord,
};
use crate::membership::MAX_MEMBERS;

pub use crate::canonical::DecodeError;
use crate::canonical::{Reader, check_network, invalid, put_ip};

/// The clear header: magic, version, network, epoch, owner's key.
pub(super) fn header(network: &str, epoch: u64, owner: &[u8; KEY_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 1 + 1 + network.len() + 8 + KEY_LEN);
    out.extend_from_slice(&RECORD_MAGIC);
    out.push(RECORD_VERSION);
    out.push(network.len().min(255) as u8);
    out.extend_from_slice(network.as_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(owner);
    out
}

/// The body's plaintext: seq, issued, expires, address count, addresses.
pub(super) fn body(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_BODY_PLAIN);
    out.extend_from_slice(&record.seq.to_be_bytes());
    out.extend_from_slice(&record.issued.to_be_bytes());
    out.extend_from_slice(&record.expires.to_be_bytes());
    out.push(record.addresses.len().min(255) as u8);
    for address in &record.addresses {
        put_ip(&mut out, address.ip());
        out.extend_from_slice(&address.port().to_be_bytes());
    }
    out
}

/// Decodes a sealed record's layout.
pub(super) fn decode(bytes: Bytes) -> Result<SealedRecord, DecodeError> {
    if bytes.len() > MAX_RECORD_LEN {
        return Err(DecodeError::TooLong {
            len: bytes.len(),
            max: MAX_RECORD_LEN,
        });
    }
    let mut r = Reader::new(&bytes);
    if r.array::<4>("magic")? != RECORD_MAGIC {
        return Err(invalid("magic", "not an address record"));
    }
    let version = r.u8("version")?;
    if version != RECORD_VERSION {
        return Err(invalid(
            "version",
            format!("{version}; this build reads version {RECORD_VERSION}"),
        ));
    }
    let network = r.text("network")?.to_owned();
    check_network(&network)?;
    let epoch = r.u64("epoch")?;
    if epoch == 0 {
        return Err(invalid("epoch", "epochs count from 1"));
    }
    let owner = r.array::<KEY_LEN>("owner key")?;
    let slot_count = usize::from(r.u16("slots")?);
    if slot_count == 0 || slot_count > MAX_MEMBERS {
        return Err(invalid(
            "slots",
            format!("{slot_count} slots; one per member, 1 to {MAX_MEMBERS}"),
        ));
    }
    let slots_at = r.pos();
    r.take(slot_count * SLOT_LEN, "slots")?;
    let body_len = usize::from(r.u16("body")?);
    // The body is the plaintext and a 16-byte tag; its plaintext has room for 1 to
    // MAX_RECORD_ADDRESSES addresses.
    if !(8 + 8 + 8 + 1 + 16..=MAX_BODY_PLAIN + 16).contains(&body_len) {
        return Err(invalid(
            "body",
            format!(
                "{body_len} bytes; a body has {} to {}",
                8 + 8 + 8 + 1 + 16,
                MAX_BODY_PLAIN + 16
            ),
        ));
    }
    let body_at = r.pos();
    r.take(body_len, "body")?;
    let body_end = r.pos();
    r.take(64, "signature")?;
    r.finish()?;
    Ok(SealedRecord {
        bytes,
        network,
        epoch,
        owner,
        slots_at,
        slot_count,
        body_at,
        body_end,
    })
}

/// Decodes a body's plaintext (after it decrypted: its owner signed it, but a member with
/// a bad encoder is still refused by name).
pub(super) fn decode_body(plain: &[u8]) -> Result<Record, DecodeError> {
    let mut r = Reader::new(plain);
    let seq = r.u64("seq")?;
    let issued = r.u64("issued")?;
    let expires = r.u64("expires")?;
    let count = usize::from(r.u8("addresses")?);
    if count == 0 || count > MAX_RECORD_ADDRESSES {
        return Err(invalid(
            "addresses",
            format!("{count} addresses; 1 to {MAX_RECORD_ADDRESSES}"),
        ));
    }
    let mut addresses = Vec::with_capacity(count);
    for _ in 0..count {
        let tag = r.u8("address family")?;
        let ip = r.ip(tag, "address")?;
        addresses.push(SocketAddr::new(ip, r.u16("port")?));
    }
    r.finish()?;
    Ok(Record {
        seq,
        issued,
        expires,
        addresses,
    })
}
