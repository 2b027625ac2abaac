//! Membership the committee signs: the allow list as a chain of signed documents.
//!
//! A [`Document`] says, for one network and one *epoch*, who the members are (what an allow
//! list holds, plus each member's static public key and where it listens) and which
//! *committee* of governance keys, with what threshold `k`, approves the next epoch. It
//! names the digest of the epoch before it, so the documents form a hash chain:
//!
//! ```text
//!   epoch 1 (genesis)            epoch 2                      epoch 3
//!   committee C1, k1     <--     previous = digest(1)   <--   previous = digest(2)
//!   signed by k1 of C1           committee C2, k2             ...
//!   (itself)                     signed by k1 of C1 and,
//!                                if C2 != C1, by k2 of C2
//! ```
//!
//! A node trusts one document the operator installs (its *anchor*, normally the genesis)
//! and from then on moves only forward, one epoch at a time, to a document signed by a
//! threshold of the committee it already trusts ([`Ledger::offer`]). As in TUF's root
//! metadata, a document that changes the committee also needs a threshold of the *new*
//! committee, so a typo in a new key cannot leave the network with a committee that can
//! never sign again; and the expiry of the newest document is checked, that of the
//! documents it supersedes is not.
//!
//! Signatures are BIP-340 Schnorr over secp256k1 (the `secp256k1` binding of Bitcoin
//! Core's library), each by a governance key of its own (never a node's Noise key), over a
//! tagged hash of the document's canonical encoding, never over its TOML text:
//!
//! ```text
//!   digest  = SHA-256(SHA-256(DIGEST_TAG) || SHA-256(DIGEST_TAG) || document bytes)
//!   message = SHA-256(SHA-256(SIGNATURE_TAG) || SHA-256(SIGNATURE_TAG) || digest)
//!   signature = BIP-340 sign(governance key, message, aux = 32 bytes of the injected RNG)
//! ```
//!
//! The digest of an epoch never changes once written, so it could be anchored on a
//! blockchain later. The byte layout is in `docs/PROTOCOL.md`, section 8; operators read and
//! write the TOML form ([`Document::from_toml`], [`Signed::to_toml`]).
//!
//! Everything here is pure: no clock (times come in as Unix seconds), no randomness but
//! the RNG a caller passes, no I/O but the files a caller asks to load. Decoding never
//! panics and accepts exactly the canonical encoding: `encode(decode(b)) == b`.

mod encoding;
mod human;
mod ledger;
mod ops;
mod verify;

#[cfg(test)]
pub(crate) mod tests;

pub use encoding::DecodeError;
pub use human::{HumanError, SignatureFile};
pub use ledger::{Fork, Ledger, Offered, Refused};
pub use ops::CombineError;
pub use verify::{
    Refusal, SignatureCheck, check_expiry, check_genesis, check_signatures, check_successor,
};

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use bytes::Bytes;
use rand_core::Rng;

use crate::allow_list::{AllowList, AllowedPeer, Expiry};
use crate::identity::{KEY_LEN, PeerId};
use crate::records::RecordKeyId;

/// First bytes of an encoded document.
pub const DOCUMENT_MAGIC: [u8; 4] = *b"P2PM";
/// First bytes of an encoded signed document.
pub const SIGNED_MAGIC: [u8; 4] = *b"P2PS";
/// Version of both encodings (a document none of whose members has a record key).
pub const FORMAT_VERSION: u8 = 1;
/// Version of a document some of whose members have a record key: each member's entry
/// ends in one more field. A document's content decides its version, so it has one
/// encoding and one digest, and documents written before record keys keep theirs.
pub const FORMAT_VERSION_RECORD_KEYS: u8 = 2;
/// Tag of the tagged hash that names a document (its digest).
pub const DIGEST_TAG: &[u8] = b"p2p-handler/membership/document/v1";
/// Tag of the tagged hash a committee member signs (over the digest): a signature of a
/// membership document can never be taken for one over anything else.
pub const SIGNATURE_TAG: &[u8] = b"p2p-handler/membership/signature/v1";
/// Tag of the hash that names one copy of a signed document (local use only).
const COPY_TAG: &[u8] = b"p2p-handler/membership/signed-copy/v1";
pub use crate::canonical::MAX_NETWORK_LEN;
/// The most governance keys in a committee.
pub const MAX_COMMITTEE: usize = 32;
/// The most members in a document.
pub const MAX_MEMBERS: usize = 1024;
/// The longest member name, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 64;
/// The most IPs a member may be restricted to.
pub const MAX_ALLOWED_IPS: usize = 8;
/// The most signatures a signed document carries (old and new committee, when it changes).
pub const MAX_SIGNATURES: usize = 2 * MAX_COMMITTEE;
/// The longest encoded document: every field at its bound.
pub const MAX_DOCUMENT_LEN: usize = 4
    + 1
    + 1
    + MAX_NETWORK_LEN
    + 8
    + 32
    + 8
    + 1
    + 1
    + MAX_COMMITTEE * 32
    + 2
    + MAX_MEMBERS * (KEY_LEN + 1 + MAX_NAME_LEN + 8 + 1 + 18 + 1 + MAX_ALLOWED_IPS * 17 + 33);
/// The longest encoded signed document.
pub const MAX_SIGNED_LEN: usize = 4 + 1 + 4 + MAX_DOCUMENT_LEN + 1 + MAX_SIGNATURES * (32 + 64);

/// A SHA-256 digest of a document (see the module docs). All zeros means "none" (the
/// `previous` of a genesis).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest a genesis names as its previous one.
    pub const NONE: Digest = Digest([0; 32]);

    /// The first 8 hex digits, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

use crate::canonical::tagged_hash;

/// A committee member's public governance key: a BIP-340 x-only secp256k1 key. Its text
/// form is 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GovernanceId(pub [u8; 32]);

impl GovernanceId {
    /// Parses 64 hex digits naming a valid x-only key.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        crate::canonical::xonly_from_hex(text).map(Self)
    }

    /// The first 8 hex digits, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for GovernanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for GovernanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GovernanceId({})", self.short())
    }
}

/// The first line of a governance key file, so that a node's key is never taken for one
/// (and the reverse: a node refuses this file as its key, since it is not bare hex).
pub const GOVERNANCE_KEY_HEADER: &str =
    "# p2p-node governance key (secp256k1, BIP-340): signs membership documents. Keep it offline.";

/// A committee member's private governance key. Never shown in `Debug` output.
#[derive(Clone)]
pub struct GovernanceKey {
    keypair: secp256k1::Keypair,
}

/// Why a governance key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum GovernanceKeyError {
    /// The file could not be read.
    #[error("cannot read governance key {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a governance key.
    #[error("{path} is not a governance key: {why}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

impl GovernanceKey {
    /// Draws a key from `rng` (the OS in `p2p-node membership keygen`, a seed in tests).
    pub fn generate(rng: &mut impl Rng) -> Self {
        loop {
            let mut secret = [0u8; 32];
            rng.fill_bytes(&mut secret);
            // Fails only for zero or a value beyond the group order: about 2^-128.
            if let Ok(keypair) = secp256k1::Keypair::from_secret_bytes(secret) {
                return Self { keypair };
            }
        }
    }

    /// A key from its 32 secret bytes.
    pub fn from_secret_bytes(secret: [u8; 32]) -> Result<Self, String> {
        secp256k1::Keypair::from_secret_bytes(secret)
            .map(|keypair| Self { keypair })
            .map_err(|_| "not a valid secp256k1 secret key".to_owned())
    }

    /// The key file's text: [`GOVERNANCE_KEY_HEADER`], then the secret as 64 hex digits.
    pub fn to_file_text(&self) -> String {
        format!(
            "{GOVERNANCE_KEY_HEADER}\n{}\n",
            hex::encode(self.keypair.to_secret_bytes())
        )
    }

    /// Reads the key file's text (`origin` names it in errors).
    pub fn from_file_text(text: &str, origin: &str) -> Result<Self, GovernanceKeyError> {
        let invalid = |why: String| GovernanceKeyError::Invalid {
            path: origin.to_owned(),
            why,
        };
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        if lines.next() != Some(GOVERNANCE_KEY_HEADER) {
            return Err(invalid(
                "it lacks the governance key header (a node's key is not a governance key; \
                 make one with `p2p-node membership keygen`)"
                    .into(),
            ));
        }
        let hex_text = lines
            .next()
            .ok_or_else(|| invalid("the secret is missing".into()))?;
        if lines.next().is_some() {
            return Err(invalid("more than one secret".into()));
        }
        let mut secret = [0u8; 32];
        if hex_text.len() != 64 {
            return Err(invalid(format!(
                "expected 64 hex digits, found {}",
                hex_text.len()
            )));
        }
        hex::decode_to_slice(hex_text, &mut secret)
            .map_err(|e| invalid(format!("not hex: {e}")))?;
        Self::from_secret_bytes(secret).map_err(invalid)
    }

    /// Loads a key file written by [`GovernanceKey::to_file_text`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, GovernanceKeyError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| GovernanceKeyError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::from_file_text(&text, &shown)
    }

    /// Its public key.
    pub fn id(&self) -> GovernanceId {
        GovernanceId(self.keypair.x_only_public_key().0.to_byte_array())
    }

    /// Signs the document with digest `digest`, the auxiliary randomness of BIP-340 drawn
    /// from `rng`.
    pub fn sign(&self, digest: &Digest, rng: &mut impl Rng) -> Signature {
        let mut aux = [0u8; 32];
        rng.fill_bytes(&mut aux);
        let message = tagged_hash(SIGNATURE_TAG, &digest.0);
        let sig = secp256k1::schnorr::sign_with_aux_rand(&message, &self.keypair, &aux);
        Signature {
            signer: self.id(),
            signature: sig.to_byte_array(),
        }
    }
}

impl fmt::Debug for GovernanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GovernanceKey")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

/// One committee member's signature of a document's digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature {
    /// Who signed.
    pub signer: GovernanceId,
    /// The 64-byte BIP-340 signature.
    pub signature: [u8; 64],
}

impl Signature {
    /// Whether this is a valid signature by `signer` of the document with digest `digest`.
    pub fn is_valid_for(&self, digest: &Digest) -> bool {
        let Ok(key) = secp256k1::XOnlyPublicKey::from_byte_array(self.signer.0) else {
            return false;
        };
        let message = tagged_hash(SIGNATURE_TAG, &digest.0);
        let sig = secp256k1::schnorr::Signature::from_byte_array(self.signature);
        secp256k1::schnorr::verify(&sig, &message, &key).is_ok()
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature(by {})", self.signer.short())
    }
}

/// One member of the network: what an allow-list entry holds, and its static key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its static X25519 public key (its peer id is derived from it).
    pub key: [u8; KEY_LEN],
    /// A label for people, if any.
    pub name: Option<String>,
    /// Where it listens, if published here: members offer new epochs to it there.
    pub address: Option<SocketAddr>,
    /// The IPs it may connect from; empty: any.
    pub allowed: Vec<IpAddr>,
    /// When it stops being a member (Unix seconds), if ever.
    pub expires: Option<u64>,
    /// The key that signs its address records (`crate::records`), if it publishes them.
    pub record_key: Option<RecordKeyId>,
}

impl Member {
    /// Its peer id.
    pub fn peer_id(&self) -> PeerId {
        PeerId::from_public_key(&self.key)
    }
}

/// One epoch of a network's membership. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The network's name: a document of one network is never accepted by another.
    pub network: String,
    /// Counts up by one per change, from 1 (the genesis).
    pub epoch: u64,
    /// The digest of epoch `epoch - 1`; [`Digest::NONE`] for the genesis.
    pub previous: Digest,
    /// When this document stops being acceptable as the newest (Unix seconds), if ever.
    pub expires: Option<u64>,
    /// How many committee signatures the next epoch needs.
    pub threshold: u8,
    /// The governance keys that approve the next epoch, ascending.
    pub committee: Vec<GovernanceId>,
    /// The members, ascending by key.
    pub members: Vec<Member>,
}

impl Document {
    /// Its canonical encoding (`docs/PROTOCOL.md` section 8). Members and committee are
    /// written in ascending order whatever order they are held in; call
    /// [`Document::check`] first: a document that breaks a bound encodes to bytes no
    /// decoder accepts.
    pub fn encode(&self) -> Vec<u8> {
        encoding::encode_document(self)
    }

    /// Decodes the canonical encoding; anything else is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        encoding::decode_document(bytes)
    }

    /// Its digest, the name the next epoch gives it.
    pub fn digest(&self) -> Digest {
        Digest(tagged_hash(DIGEST_TAG, &self.encode()))
    }

    /// Sorts members and committee into canonical order and checks every bound and rule
    /// a decoder checks, so that what is signed is what every node will decode.
    pub fn check(&mut self) -> Result<(), DecodeError> {
        self.committee.sort_unstable();
        self.members.sort_unstable_by_key(|m| m.key);
        for member in &mut self.members {
            member.allowed.sort_unstable();
        }
        encoding::check_document(self)
    }

    /// The peer ids of the members, ascending by key (not by id).
    pub fn member_ids(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.members.iter().map(Member::peer_id)
    }

    /// The member with peer id `peer`.
    pub fn member(&self, peer: &PeerId) -> Option<&Member> {
        self.members.iter().find(|m| m.peer_id() == *peer)
    }

    /// Whether 2k <= n: two disjoint sets of signers could each sign a different
    /// document for the next epoch (a fork needs no dishonest signer then).
    pub fn fork_prone(&self) -> bool {
        2 * usize::from(self.threshold) <= self.committee.len()
    }

    /// The allow list it stands for: every member, with its allowed IPs and expiry.
    /// Expiry is applied by the list's owner ([`AllowList::in_force_at`]).
    pub fn allow_list(&self) -> AllowList {
        let mut list = AllowList::new();
        for member in &self.members {
            list.insert(
                member.peer_id(),
                AllowedPeer {
                    name: member.name.clone(),
                    addresses: member.allowed.clone(),
                    expires: member.expires.map(|secs| {
                        Expiry::At(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
                    }),
                    public_key: Some(member.key),
                    address: member.address,
                    record_key: member.record_key,
                },
            );
        }
        list
    }

    /// A template for the next epoch: same network, committee and threshold, epoch + 1,
    /// `previous` this document's digest, no expiry, members to be filled in.
    pub fn successor_template(&self) -> Document {
        Document {
            network: self.network.clone(),
            epoch: self.epoch.saturating_add(1),
            previous: self.digest(),
            expires: None,
            threshold: self.threshold,
            committee: self.committee.clone(),
            members: Vec::new(),
        }
    }
}

/// A document with its signatures, as it travels and as nodes keep it.
#[derive(Clone, PartialEq, Eq)]
pub struct Signed {
    document: Document,
    /// The canonical encoding of `document`, which the signatures are over.
    bytes: Bytes,
    digest: Digest,
    /// In the order given; a signer twice is kept so that it can be refused by name.
    signatures: Vec<Signature>,
}

impl fmt::Debug for Signed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Signed({} epoch {} {} with {} signatures)",
            self.document.network,
            self.document.epoch,
            self.digest.short(),
            self.signatures.len()
        )
    }
}

impl Signed {
    /// A document (put into canonical order and checked) with no signatures yet.
    pub fn new(mut document: Document) -> Result<Self, DecodeError> {
        document.check()?;
        let bytes = Bytes::from(document.encode());
        let digest = Digest(tagged_hash(DIGEST_TAG, &bytes));
        Ok(Self {
            document,
            bytes,
            digest,
            signatures: Vec::new(),
        })
    }

    /// The document.
    pub fn document(&self) -> &Document {
        &self.document
    }

    /// Its epoch.
    pub fn epoch(&self) -> u64 {
        self.document.epoch
    }

    /// The document's digest.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The document's canonical encoding.
    pub fn document_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The signatures, in the order they were added.
    pub fn signatures(&self) -> &[Signature] {
        &self.signatures
    }

    /// Adds `key`'s signature (drawing BIP-340's auxiliary randomness from `rng`).
    pub fn sign(&mut self, key: &GovernanceKey, rng: &mut impl Rng) {
        let signature = key.sign(&self.digest, rng);
        self.add_signature(signature);
    }

    /// Adds a signature made elsewhere (`p2p-node membership combine`). Nothing is checked
    /// here: the acceptance rules check every signature, and refuse the document if one is
    /// bad, unknown or repeated.
    pub fn add_signature(&mut self, signature: Signature) {
        if self.signatures.len() < MAX_SIGNATURES {
            self.signatures.push(signature);
        }
    }

    /// Names this copy, signatures included (two copies of one document with different
    /// signatures differ): what a node remembers of a copy it refused.
    pub(crate) fn fingerprint(&self) -> [u8; 32] {
        tagged_hash(COPY_TAG, &self.encode())
    }

    /// Its encoding, as it travels and as a node stores it.
    pub fn encode(&self) -> Vec<u8> {
        encoding::encode_signed(self)
    }

    /// Decodes [`Signed::encode`]'s output; anything else is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        encoding::decode_signed(bytes)
    }
}
