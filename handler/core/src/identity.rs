//! Node identity: a static X25519 keypair and the [`PeerId`] derived from its public key.
//!
//! A peer id is `BLAKE2s-256("p2p-handler peer id v1" || public_key)`. It is what the
//! application uses to name a peer, what the allow list holds, and what a dialer expects the
//! responder's Noise static key to hash to. Its text form is 64 lowercase hex digits.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use blake2::{Blake2s256, Digest};
use rand_core::Rng;

/// Domain separation for peer ids, so a hash of the key used elsewhere is never a peer id.
const PEER_ID_DOMAIN: &[u8] = b"p2p-handler peer id v1";

/// Length in bytes of an X25519 key, private or public.
pub const KEY_LEN: usize = 32;

/// The identity of a node: the BLAKE2s-256 hash of its static public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId([u8; 32]);

impl PeerId {
    /// Derives the peer id of a static X25519 public key.
    pub fn from_public_key(public_key: &[u8; KEY_LEN]) -> Self {
        let mut hasher = Blake2s256::new();
        hasher.update(PEER_ID_DOMAIN);
        hasher.update(public_key);
        Self(hasher.finalize().into())
    }

    /// The raw 32 bytes of the id.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Builds a peer id from its raw bytes (as found in a serialized form, not a public key).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The first 8 hex digits, for logs and traces where the full id is noise.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

/// Why a text could not be read as a [`PeerId`] or a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseIdError {
    /// The text is not hex.
    #[error("not hex: {0}")]
    NotHex(String),
    /// The text is hex but of the wrong length.
    #[error("expected {expected} hex digits, found {found}")]
    WrongLength {
        /// Digits expected.
        expected: usize,
        /// Digits found.
        found: usize,
    },
}

fn parse_hex32(text: &str) -> Result<[u8; 32], ParseIdError> {
    let text = text.trim();
    if text.len() != 64 {
        return Err(ParseIdError::WrongLength {
            expected: 64,
            found: text.len(),
        });
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).map_err(|e| ParseIdError::NotHex(e.to_string()))?;
    Ok(out)
}

impl FromStr for PeerId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s).map(Self)
    }
}

impl serde::Serialize for PeerId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PeerId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The key text is malformed.
    #[error("bad private key{}: {source}", .path.as_ref().map(|p| format!(" in {p}")).unwrap_or_default())]
    Parse {
        /// The file, when the key came from one.
        path: Option<String>,
        /// The cause.
        source: ParseIdError,
    },
}

/// A static X25519 keypair. The private key never appears in `Debug` output.
#[derive(Clone)]
pub struct Keypair {
    private: [u8; KEY_LEN],
    public: [u8; KEY_LEN],
    peer_id: PeerId,
}

impl Keypair {
    /// Builds a keypair from a 32-byte X25519 private key (clamping is applied by X25519 itself).
    pub fn from_private_bytes(private: [u8; KEY_LEN]) -> Self {
        let public = x25519_public(&private);
        Self {
            private,
            public,
            peer_id: PeerId::from_public_key(&public),
        }
    }

    /// Parses a private key written as 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        parse_hex32(text)
            .map(Self::from_private_bytes)
            .map_err(|source| KeyError::Parse { path: None, source })
    }

    /// Loads a key file: the private key as 64 hex digits, as written by [`Keypair::to_hex`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: shown.clone(),
            source,
        })?;
        parse_hex32(&text)
            .map(Self::from_private_bytes)
            .map_err(|source| KeyError::Parse {
                path: Some(shown),
                source,
            })
    }

    /// Generates a keypair from the given RNG (seeded in tests and simulations).
    pub fn generate(rng: &mut impl Rng) -> Self {
        let mut private = [0u8; KEY_LEN];
        rng.fill_bytes(&mut private);
        Self::from_private_bytes(private)
    }

    /// The private key as 64 hex digits: the key file format.
    pub fn to_hex(&self) -> String {
        hex::encode(self.private)
    }

    /// The private key bytes (needed by the Noise layer).
    pub fn private_bytes(&self) -> &[u8; KEY_LEN] {
        &self.private
    }

    /// The public key bytes.
    pub fn public_bytes(&self) -> &[u8; KEY_LEN] {
        &self.public
    }

    /// This key's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keypair")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

/// X25519 base-point multiplication (RFC 7748), with the same curve25519-dalek snow uses for
/// its Diffie-Hellman, so the public key we advertise is the one Noise will present.
fn x25519_public(private: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    curve25519_dalek::MontgomeryPoint::mul_base_clamped(*private).to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn peer_id_text_round_trips() {
        let key = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(7));
        let id = key.peer_id();
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<PeerId>(), Ok(id));
        assert_eq!(format!("{id:?}"), format!("PeerId({})", &text[..8]));
    }

    #[test]
    fn peer_id_serde_round_trips_as_string() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Doc {
            id: PeerId,
        }
        let id = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(1)).peer_id();
        let text = toml::to_string(&Doc { id }).unwrap();
        assert_eq!(text.trim(), format!("id = \"{id}\""));
        assert_eq!(toml::from_str::<Doc>(&text).unwrap(), Doc { id });
    }

    #[test]
    fn bad_peer_id_text_is_a_clear_error() {
        assert_eq!(
            "abc".parse::<PeerId>(),
            Err(ParseIdError::WrongLength {
                expected: 64,
                found: 3
            })
        );
        let err = "zz".repeat(32).parse::<PeerId>().unwrap_err();
        assert!(matches!(err, ParseIdError::NotHex(_)), "{err}");
    }

    #[test]
    fn generation_is_deterministic_per_seed() {
        let a = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(42));
        let b = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(42));
        let c = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(43));
        assert_eq!(a.peer_id(), b.peer_id());
        assert_ne!(a.peer_id(), c.peer_id());
    }

    #[test]
    fn key_loads_from_hex_and_file() {
        let key = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(3));
        let again = Keypair::from_hex(&format!("  {}\n", key.to_hex())).unwrap();
        assert_eq!(again.peer_id(), key.peer_id());
        assert_eq!(again.public_bytes(), key.public_bytes());

        let dir = std::env::temp_dir().join(format!("p2p-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.key");
        std::fs::write(&path, key.to_hex()).unwrap();
        assert_eq!(Keypair::from_file(&path).unwrap().peer_id(), key.peer_id());
        std::fs::write(&path, "not a key").unwrap();
        let err = Keypair::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("node.key"), "{err}");
        let missing = Keypair::from_file(dir.join("missing.key"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("missing.key"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn public_key_matches_known_x25519_vector() {
        // RFC 7748 section 6.1, Alice's key pair.
        let private: [u8; 32] =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .try_into()
                .unwrap();
        let key = Keypair::from_private_bytes(private);
        assert_eq!(
            hex::encode(key.public_bytes()),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn peer_id_matches_the_documented_formula() {
        // PROTOCOL.md section 1: BLAKE2s-256("p2p-handler peer id v1" || public key), here
        // for RFC 7748's Alice, computed independently (Python's hashlib.blake2s).
        let private: [u8; 32] =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .try_into()
                .unwrap();
        let id = Keypair::from_private_bytes(private).peer_id();
        let expected = "ac7e37a90c4b17dfae6065a5324cb4344ea23c7f501374d3daf7447721f5b506";
        assert_eq!(id.to_string(), expected);
        assert_eq!(hex::encode(id.as_bytes()), expected);
        assert_eq!(PeerId::from_bytes(*id.as_bytes()), id);
    }
}
