//! Address records: where a member listens, signed by that member, readable by members only,
//! and expiring.
//!
//! A [`Record`] says, for one member, its addresses, a sequence number that only grows, when
//! it was issued and when it expires. Its owner *seals* it ([`seal`]) for the members of the
//! membership epoch in force, and anyone may carry the [`SealedRecord`]: other members over
//! their connections, a shared folder, later a blockchain. A member *opens* it ([`open`])
//! and keeps the freshest one per peer ([`RecordBook`]).
//!
//! ```text
//!  P2PR | version | network | epoch | owner's static key          header (clear)
//!  slot per member of that epoch, in the document's member order:  HPKE (RFC 9180, base
//!      encapsulated key (32) | content key sealed (32 + 16)      mode, X25519, HKDF-SHA256,
//!                                                                ChaCha20-Poly1305)
//!  body: seq | issued | expires | addresses, sealed under the content key (ChaCha20-
//!      Poly1305, aad = header and slots)
//!  signature: BIP-340 by the owner's record key over a tagged hash of all the above
//! ```
//!
//! **Who can forge or alter one.** Only the holder of the owner's *record key*: a secp256k1
//! key each member derives from its Noise static key (a tagged hash of the private key,
//! [`RecordSigner`]) and whose public half the committee lists beside its static key in the
//! membership document (`record_key`). So the binding of record key to peer id carries the
//! committee's threshold signature, as the static key does; a member cannot sign for
//! another, and whoever stores or relays records can drop them but not change them.
//! Signatures are BIP-340 (the `secp256k1` binding, as the membership documents use) over
//! a tagged hash of their own ([`SIGNATURE_TAG`]), so a record signature can never be taken
//! for any other.
//!
//! **Who can read one.** The members of the epoch it was sealed for, each through its own
//! slot (HPKE to its static key, with `info` naming the network, epoch and owner). A reader
//! outside that membership learns the network, the epoch, the owner's key (so its peer id)
//! and sizes (the body's length says how many addresses); not the addresses, the sequence
//! number or the times. A member removed later can still read what was sealed for it;
//! every node seals its record anew when an epoch is applied, so it cannot read what comes
//! after.
//!
//! **Which one counts.** [`RecordBook::offer`] takes a record only if it opens, its owner is
//! a member, it has not expired, it lives no longer than [`MAX_RECORD_TTL`], its sequence
//! number is higher than the one held (a replay or rollback is refused by name), and its
//! addresses are ones the membership lets that member use. The owner keeps its sequence
//! number growing across restarts by taking at least its wall clock in milliseconds.
//!
//! Everything here is pure: no clock (times come in as Unix seconds), no randomness but the
//! RNG a caller passes.

mod book;
mod encoding;

#[cfg(test)]
mod tests;

pub use book::{Offer, RecordBook};
pub use encoding::DecodeError;

use std::fmt;
use std::net::SocketAddr;

use bytes::Bytes;
use chacha20poly1305::aead::{AeadInPlace as _, KeyInit as _};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hpke::{Deserializable as _, Serializable as _};
use rand_core::CryptoRng;

use crate::identity::{KEY_LEN, Keypair, PeerId};
use crate::membership::{Document, Member};

/// First bytes of a sealed record.
pub const RECORD_MAGIC: [u8; 4] = *b"P2PR";
/// Version of the sealed record's encoding.
pub const RECORD_VERSION: u8 = 1;
/// Tag of the tagged hash a record key signs.
pub const SIGNATURE_TAG: &[u8] = b"p2p-handler/record/signature/v1";
/// Tag of the tagged hash that turns a node's Noise private key into its record key.
pub const RECORD_KEY_TAG: &[u8] = b"p2p-handler/record/signing-key/v1";
/// First bytes of HPKE's `info` for a slot (then network, epoch and the owner's key).
pub const HPKE_INFO_LABEL: &[u8] = b"p2p-handler/record/content-key/v1";
/// The most addresses one record holds.
pub const MAX_RECORD_ADDRESSES: usize = 8;
/// The longest a record may live, from issue to expiry, in seconds (7 days): a record
/// signed with a far expiry and then leaked cannot speak for its owner for ever.
pub const MAX_RECORD_TTL: u64 = 7 * 24 * 3600;
/// How far ahead of the reader's clock a record's issue time may be, in seconds (clocks
/// differ).
pub const MAX_CLOCK_SKEW: u64 = 600;
/// One slot: HPKE's encapsulated key and the content key sealed.
pub const SLOT_LEN: usize = 32 + 32 + 16;
/// The body's plaintext at its longest: seq, issued, expires, count, addresses.
pub const MAX_BODY_PLAIN: usize = 8 + 8 + 8 + 1 + MAX_RECORD_ADDRESSES * (1 + 16 + 2);
/// The longest sealed record: every field at its bound.
pub const MAX_RECORD_LEN: usize = 4
    + 1
    + 1
    + crate::membership::MAX_NETWORK_LEN
    + 8
    + KEY_LEN
    + 2
    + crate::membership::MAX_MEMBERS * SLOT_LEN
    + 2
    + MAX_BODY_PLAIN
    + 16
    + 64;

use crate::canonical::tagged_hash;

/// A member's public record key: a BIP-340 x-only secp256k1 key. Text form: 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordKeyId(pub [u8; 32]);

impl RecordKeyId {
    /// Parses 64 hex digits naming a valid x-only key.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        crate::canonical::xonly_from_hex(text).map(Self)
    }
}

impl fmt::Display for RecordKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RecordKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordKeyId({})", hex::encode(&self.0[..4]))
    }
}

/// What a node needs to seal its own records and open others': its static key pair and the
/// record key derived from it. Never shown in `Debug` output.
#[derive(Clone)]
pub struct RecordSigner {
    static_private: [u8; KEY_LEN],
    static_public: [u8; KEY_LEN],
    signing: secp256k1::Keypair,
}

impl fmt::Debug for RecordSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordSigner")
            .field("peer", &PeerId::from_public_key(&self.static_public))
            .field("record_key", &self.record_key())
            .finish_non_exhaustive()
    }
}

impl RecordSigner {
    /// The signer of the node whose static key pair is `keypair`. The record key is
    /// `tagged_hash(RECORD_KEY_TAG, private key)` taken as a secp256k1 secret: one key file
    /// to keep, and the tag keeps the two uses of the secret apart. A hash that is not a
    /// valid secret (zero or beyond the group order, about 2^-128) is hashed again.
    pub fn new(keypair: &Keypair) -> Self {
        let mut secret = tagged_hash(RECORD_KEY_TAG, keypair.private_bytes());
        let signing = loop {
            match secp256k1::Keypair::from_secret_bytes(secret) {
                Ok(k) => break k,
                Err(_) => secret = tagged_hash(RECORD_KEY_TAG, &secret),
            }
        };
        Self {
            static_private: *keypair.private_bytes(),
            static_public: *keypair.public_bytes(),
            signing,
        }
    }

    /// The public record key: what the membership document lists as `record_key`.
    pub fn record_key(&self) -> RecordKeyId {
        RecordKeyId(self.signing.x_only_public_key().0.to_byte_array())
    }

    /// Its node's peer id.
    pub fn peer_id(&self) -> PeerId {
        PeerId::from_public_key(&self.static_public)
    }
}

/// One member's record, as its owner writes it and a member reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Grows with every record its owner issues (across restarts too).
    pub seq: u64,
    /// When it was issued (Unix seconds).
    pub issued: u64,
    /// When it stops being valid (Unix seconds).
    pub expires: u64,
    /// Where its owner listens, most preferred first (1 to [`MAX_RECORD_ADDRESSES`]).
    pub addresses: Vec<SocketAddr>,
}

/// A sealed record as it travels and is stored: the bytes and what the clear header says.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedRecord {
    bytes: Bytes,
    network: String,
    epoch: u64,
    owner: [u8; KEY_LEN],
    /// Where the slots start and how many there are.
    slots_at: usize,
    slot_count: usize,
    /// Where the body (length-prefixed) starts and ends.
    body_at: usize,
    body_end: usize,
}

impl fmt::Debug for SealedRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SealedRecord({} of {} epoch {}, {} bytes)",
            self.owner_id().short(),
            self.network,
            self.epoch,
            self.bytes.len()
        )
    }
}

impl SealedRecord {
    /// Decodes a sealed record (its layout only: nothing is verified or decrypted).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        encoding::decode(Bytes::copy_from_slice(bytes))
    }

    /// Decodes a sealed record held in `bytes` without copying it.
    pub fn decode_bytes(bytes: Bytes) -> Result<Self, DecodeError> {
        encoding::decode(bytes)
    }

    /// Its bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The network it was sealed for.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// The membership epoch it was sealed for.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Its owner's static public key.
    pub fn owner_key(&self) -> &[u8; KEY_LEN] {
        &self.owner
    }

    /// Its owner's peer id.
    pub fn owner_id(&self) -> PeerId {
        PeerId::from_public_key(&self.owner)
    }

    /// Everything the signature covers.
    fn signed_part(&self) -> &[u8] {
        &self.bytes[..self.body_end]
    }

    /// The associated data of the body: header and slots.
    fn body_aad(&self) -> &[u8] {
        &self.bytes[..self.body_at - 2]
    }

    fn slot(&self, index: usize) -> Option<&[u8]> {
        if index >= self.slot_count {
            return None;
        }
        let at = self.slots_at + index * SLOT_LEN;
        self.bytes.get(at..at + SLOT_LEN)
    }

    fn body(&self) -> &[u8] {
        &self.bytes[self.body_at..self.body_end]
    }

    fn signature(&self) -> [u8; 64] {
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&self.bytes[self.body_end..]);
        sig
    }
}

/// Why a record cannot be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The document does not list the signer, or lists another record key for it.
    #[error(
        "the membership (epoch {epoch}) does not list this node with its record key {key}: \
         ask the committee to add `record_key = \"{key}\"` to its entry"
    )]
    NotListed {
        /// The epoch.
        epoch: u64,
        /// This node's record key.
        key: RecordKeyId,
    },
    /// No address, or more than [`MAX_RECORD_ADDRESSES`].
    #[error("a record holds 1 to {MAX_RECORD_ADDRESSES} addresses, not {0}")]
    Addresses(usize),
    /// An address with port 0 or an unspecified IP, which nobody can dial.
    #[error("{0} cannot be dialled")]
    Undialable(SocketAddr),
    /// Expiry not after issue, or further than [`MAX_RECORD_TTL`].
    #[error("a record lives 1 s to {MAX_RECORD_TTL} s; this one {0} s")]
    Lifetime(u64),
    /// What was sealed does not encode as a record (only a body made by hand can).
    #[error("the sealed record does not encode: {0}")]
    Encoding(DecodeError),
    /// The HPKE library refused a member's key.
    #[error("member {0}: its static key cannot receive an HPKE message")]
    MemberKey(PeerId),
}

/// Why a record was refused: each says what is wrong, and who sent it is named by the
/// caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Not a record, or breaks a bound.
    #[error("malformed record: {0}")]
    Malformed(DecodeError),
    /// Sealed for another network.
    #[error("a record of network {0:?}, not ours")]
    OtherNetwork(String),
    /// Its owner is not a member.
    #[error("{0} is not a member")]
    NotMember(PeerId),
    /// The membership lists no record key for its owner.
    #[error("the membership lists no record key for {0}")]
    NoRecordKey(PeerId),
    /// The signature is not its owner's.
    #[error("the record of {0} is not signed by its owner")]
    BadSignature(PeerId),
    /// Sealed for another epoch than the one in force here (its owner seals again when it
    /// applies an epoch; a reader behind fetches the membership).
    #[error("the record of {peer} was sealed for epoch {record}; ours is {ours}")]
    OtherEpoch {
        /// Its owner.
        peer: PeerId,
        /// Its epoch.
        record: u64,
        /// Ours.
        ours: u64,
    },
    /// Not one slot per member, or ours does not open.
    #[error("the record of {0} does not decrypt for us")]
    Undecryptable(PeerId),
    /// Expired (or lived longer than allowed, or was issued in the future).
    #[error("the record of {peer} {why}")]
    Expired {
        /// Its owner.
        peer: PeerId,
        /// What is wrong with its times.
        why: String,
    },
    /// Its sequence number is not above the one held: a replay or a rollback.
    #[error(
        "the record of {peer} has seq {offered}, not above the {held} held (replay or rollback)"
    )]
    Stale {
        /// Its owner.
        peer: PeerId,
        /// Its sequence number.
        offered: u64,
        /// The one held.
        held: u64,
    },
    /// An address the membership does not let its owner use.
    #[error("the record of {peer} names {address}, which the membership does not allow it")]
    ForbiddenAddress {
        /// Its owner.
        peer: PeerId,
        /// The address.
        address: SocketAddr,
    },
}

impl Refusal {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::OtherNetwork(_) => "other_network",
            Self::NotMember(_) => "not_member",
            Self::NoRecordKey(_) => "no_record_key",
            Self::BadSignature(_) => "bad_signature",
            Self::OtherEpoch { .. } => "other_epoch",
            Self::Undecryptable(_) => "undecryptable",
            Self::Expired { .. } => "expired",
            Self::Stale { .. } => "stale",
            Self::ForbiddenAddress { .. } => "forbidden_address",
        }
    }
}

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type HpkeAead = hpke::aead::ChaCha20Poly1305;

fn hpke_info(network: &str, epoch: u64, owner: &[u8; KEY_LEN]) -> Vec<u8> {
    let mut info = Vec::with_capacity(HPKE_INFO_LABEL.len() + 1 + network.len() + 8 + KEY_LEN);
    info.extend_from_slice(HPKE_INFO_LABEL);
    info.push(network.len().min(255) as u8);
    info.extend_from_slice(network.as_bytes());
    info.extend_from_slice(&epoch.to_be_bytes());
    info.extend_from_slice(owner);
    info
}

/// Whether a member may name `address` in its record: a dialable address, from the IPs
/// the membership restricts it to (if it does).
fn address_allowed(member: &Member, address: &SocketAddr) -> bool {
    address.port() != 0
        && !address.ip().is_unspecified()
        && (member.allowed.is_empty() || member.allowed.contains(&address.ip()))
}

/// Seals `record` by `signer` for the members of `document` (the epoch in force): one
/// slot per member, in the document's order, the signer's own included.
pub fn seal(
    signer: &RecordSigner,
    record: &Record,
    document: &Document,
    rng: &mut impl CryptoRng,
) -> Result<SealedRecord, SealError> {
    let me = document
        .members
        .iter()
        .find(|m| m.key == signer.static_public);
    if me.and_then(|m| m.record_key) != Some(signer.record_key()) {
        return Err(SealError::NotListed {
            epoch: document.epoch,
            key: signer.record_key(),
        });
    }
    if record.addresses.is_empty() || record.addresses.len() > MAX_RECORD_ADDRESSES {
        return Err(SealError::Addresses(record.addresses.len()));
    }
    if let Some(bad) = record
        .addresses
        .iter()
        .find(|a| a.port() == 0 || a.ip().is_unspecified())
    {
        return Err(SealError::Undialable(*bad));
    }
    let life = record.expires.saturating_sub(record.issued);
    if record.expires <= record.issued || life > MAX_RECORD_TTL {
        return Err(SealError::Lifetime(life));
    }
    seal_unchecked(signer, record, document, rng)
}

/// A forgery, for the simulator's hostile steps (feature `sabotage`): a record that names
/// `owner` (its static public key) as its owner but is signed by `signer`'s record key,
/// sealed correctly for the members of `document`. Every honest node refuses it
/// (`BadSignature`); a node that took it would dial an address its owner never published.
#[cfg(feature = "sabotage")]
#[allow(clippy::missing_errors_doc)]
pub fn forge(
    owner: &[u8; KEY_LEN],
    signer: &RecordSigner,
    record: &Record,
    document: &Document,
    rng: &mut impl CryptoRng,
) -> Result<SealedRecord, SealError> {
    let mut forger = signer.clone();
    forger.static_public = *owner;
    seal_unchecked(&forger, record, document, rng)
}

/// [`seal`] without its checks of the record: tests make the records a careless or hostile
/// member could send.
pub(crate) fn seal_unchecked(
    signer: &RecordSigner,
    record: &Record,
    document: &Document,
    rng: &mut impl CryptoRng,
) -> Result<SealedRecord, SealError> {
    seal_body(signer, encoding::body(record), document, rng)
}

/// Seals any body plaintext, correctly signed: what a member with a broken encoder would
/// send. For the fuzz targets (feature `invariants`), which must reach the body decoder
/// and the book's rules through records that open.
#[cfg(feature = "invariants")]
pub fn seal_plaintext_for_fuzzing(
    signer: &RecordSigner,
    plaintext: Vec<u8>,
    document: &Document,
    rng: &mut impl CryptoRng,
) -> Result<SealedRecord, SealError> {
    seal_body(signer, plaintext, document, rng)
}

fn seal_body(
    signer: &RecordSigner,
    mut body: Vec<u8>,
    document: &Document,
    rng: &mut impl CryptoRng,
) -> Result<SealedRecord, SealError> {
    let mut content_key = [0u8; 32];
    rng.fill_bytes(&mut content_key);
    let info = hpke_info(&document.network, document.epoch, &signer.static_public);
    let mut members: Vec<&Member> = document.members.iter().collect();
    members.sort_unstable_by_key(|m| m.key);
    let mut out = encoding::header(&document.network, document.epoch, &signer.static_public);
    out.extend_from_slice(&(members.len() as u16).to_be_bytes());
    for member in members {
        let to = <Kem as hpke::Kem>::PublicKey::from_bytes(&member.key)
            .map_err(|_| SealError::MemberKey(member.peer_id()))?;
        let (encapped, sealed) = hpke::single_shot_seal_with_rng::<HpkeAead, Kdf, Kem>(
            &hpke::OpModeS::Base,
            &to,
            &info,
            &content_key,
            &[],
            rng,
        )
        .map_err(|_| SealError::MemberKey(member.peer_id()))?;
        out.extend_from_slice(&encapped.to_bytes());
        out.extend_from_slice(&sealed);
    }
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&content_key));
    // The content key is used once, so a fixed nonce is safe.
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&[0u8; 12]), &out, &mut body)
        .map_err(|_| {
            SealError::Encoding(DecodeError::TooLong {
                len: body.len(),
                max: MAX_BODY_PLAIN,
            })
        })?;
    body.extend_from_slice(&tag);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    let digest = tagged_hash(SIGNATURE_TAG, &out);
    let mut aux = [0u8; 32];
    rng.fill_bytes(&mut aux);
    let sig = secp256k1::schnorr::sign_with_aux_rand(&digest, &signer.signing, &aux);
    out.extend_from_slice(&sig.to_byte_array());
    // Our own encoder's output: it decodes (a test holds it to that).
    encoding::decode(Bytes::from(out)).map_err(SealError::Encoding)
}

/// Opens `sealed` as the member `reader` of `document` (the epoch in force): checks the
/// network, the owner's membership and signature, the epoch, and decrypts the reader's
/// slot. Times, sequence numbers and addresses are the [`RecordBook`]'s to judge.
pub fn open(
    sealed: &SealedRecord,
    document: &Document,
    reader: &RecordSigner,
) -> Result<Record, Refusal> {
    open_with(sealed, document, reader, true)
}

/// [`open`], checking the signature only if `verify` (false only for a defect planted on
/// purpose: `Sabotage::RecordsIgnoreSignatures`).
pub(crate) fn open_with(
    sealed: &SealedRecord,
    document: &Document,
    reader: &RecordSigner,
    verify: bool,
) -> Result<Record, Refusal> {
    let peer = sealed.owner_id();
    if sealed.network != document.network {
        return Err(Refusal::OtherNetwork(sealed.network.clone()));
    }
    let owner = document
        .members
        .iter()
        .find(|m| m.key == sealed.owner)
        .ok_or(Refusal::NotMember(peer))?;
    let record_key = owner.record_key.ok_or(Refusal::NoRecordKey(peer))?;
    let key = secp256k1::XOnlyPublicKey::from_byte_array(record_key.0)
        .map_err(|_| Refusal::NoRecordKey(peer))?;
    let digest = tagged_hash(SIGNATURE_TAG, sealed.signed_part());
    let sig = secp256k1::schnorr::Signature::from_byte_array(sealed.signature());
    if verify && secp256k1::schnorr::verify(&sig, &digest, &key).is_err() {
        return Err(Refusal::BadSignature(peer));
    }
    if sealed.epoch != document.epoch {
        return Err(Refusal::OtherEpoch {
            peer,
            record: sealed.epoch,
            ours: document.epoch,
        });
    }
    let undecryptable = || Refusal::Undecryptable(peer);
    if document.members.len() != sealed.slot_count
        || !document
            .members
            .iter()
            .any(|m| m.key == reader.static_public)
    {
        return Err(undecryptable());
    }
    // Our slot: our place in ascending key order (how `seal` lays slots out), counted
    // without sorting a copy of the members.
    let index = document
        .members
        .iter()
        .filter(|m| m.key < reader.static_public)
        .count();
    let slot = sealed.slot(index).ok_or_else(undecryptable)?;
    let encapped =
        <Kem as hpke::Kem>::EncappedKey::from_bytes(&slot[..32]).map_err(|_| undecryptable())?;
    let private = <Kem as hpke::Kem>::PrivateKey::from_bytes(&reader.static_private)
        .map_err(|_| undecryptable())?;
    let info = hpke_info(&sealed.network, sealed.epoch, &sealed.owner);
    let content_key = hpke::single_shot_open::<HpkeAead, Kdf, Kem>(
        &hpke::OpModeR::Base,
        &private,
        &encapped,
        &info,
        &slot[32..],
        &[],
    )
    .map_err(|_| undecryptable())?;
    if content_key.len() != 32 {
        return Err(undecryptable());
    }
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&content_key));
    let body = sealed.body();
    let (cipher_text, tag) = body.split_at(body.len().saturating_sub(16));
    let mut plain = cipher_text.to_vec();
    cipher
        .decrypt_in_place_detached(
            Nonce::from_slice(&[0u8; 12]),
            sealed.body_aad(),
            &mut plain,
            chacha20poly1305::Tag::from_slice(tag),
        )
        .map_err(|_| undecryptable())?;
    let record = encoding::decode_body(&plain).map_err(Refusal::Malformed)?;
    if let Some(address) = record.addresses.iter().find(|a| !address_allowed(owner, a)) {
        return Err(Refusal::ForbiddenAddress {
            peer,
            address: *address,
        });
    }
    Ok(record)
}
