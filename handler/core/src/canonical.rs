//! What the canonical binary encodings (membership documents, address records) share: the
//! error that names the field, a bounds-checked reader that never panics, the network name
//! rule, and BIP-340's tagged hash.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sha2::{Digest as _, Sha256};

/// The longest network name, in bytes (ASCII letters, digits, `.`, `_`, `-`).
pub const MAX_NETWORK_LEN: usize = 64;

/// Why bytes (or a value built in memory) are not a valid encoding. Names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended inside a field.
    #[error("truncated: the input ends inside {0}")]
    Truncated(&'static str),
    /// Bytes after the end.
    #[error("{0} bytes after the end")]
    Trailing(usize),
    /// Longer than any valid encoding.
    #[error("{len} bytes, more than the {max} a valid encoding can have")]
    TooLong {
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A field breaks a rule.
    #[error("{field}: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The rule it breaks.
        why: String,
    },
}

/// A [`DecodeError::Invalid`].
pub(crate) fn invalid(field: &'static str, why: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        field,
        why: why.into(),
    }
}

/// BIP-340's tagged hash: `SHA-256(SHA-256(tag) || SHA-256(tag) || data)`.
pub(crate) fn tagged_hash(tag: &[u8], data: &[u8]) -> [u8; 32] {
    let tag_hash = Sha256::digest(tag);
    let mut hasher = Sha256::new();
    hasher.update(tag_hash);
    hasher.update(tag_hash);
    hasher.update(data);
    hasher.finalize().into()
}

/// 64 hex digits naming a valid BIP-340 x-only secp256k1 public key.
pub(crate) fn xonly_from_hex(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    if text.len() != 64 {
        return Err(format!("expected 64 hex digits, found {}", text.len()));
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text, &mut bytes).map_err(|e| format!("not hex: {e}"))?;
    secp256k1::XOnlyPublicKey::from_byte_array(bytes)
        .map_err(|_| "not a secp256k1 x-only public key".to_owned())?;
    Ok(bytes)
}

/// A network name: 1 to [`MAX_NETWORK_LEN`] ASCII letters, digits, `.`, `_` or `-`.
pub(crate) fn check_network(network: &str) -> Result<(), DecodeError> {
    if network.is_empty() || network.len() > MAX_NETWORK_LEN {
        return Err(invalid(
            "network",
            format!("1 to {MAX_NETWORK_LEN} characters, found {}", network.len()),
        ));
    }
    if let Some(c) = network
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(
            "network",
            format!("{c:?} is not allowed (ASCII letters, digits, '.', '_', '-')"),
        ));
    }
    Ok(())
}

/// Appends an IP as its family tag (4 or 6) and its bytes.
pub(crate) fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
}

/// Reads fields off a byte slice, every read bounds-checked and naming its field.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }
    /// Where the next read starts.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::Truncated(what))?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(DecodeError::Truncated(what))?;
        self.pos = end;
        Ok(slice)
    }
    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    /// A u8 length, then that many bytes of UTF-8.
    pub(crate) fn text(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let len = usize::from(self.u8(what)?);
        std::str::from_utf8(self.take(len, what)?).map_err(|_| invalid(what, "not UTF-8"))
    }
    /// An IP after its family tag (already read as `tag`).
    pub(crate) fn ip(&mut self, tag: u8, what: &'static str) -> Result<IpAddr, DecodeError> {
        match tag {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.array::<4>(what)?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.array::<16>(what)?))),
            other => Err(invalid(what, format!("address family {other} (4 or 6)"))),
        }
    }
    /// Nothing may follow.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.bytes.len().saturating_sub(self.pos) {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}
