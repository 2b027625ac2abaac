//! The peers this node talks to.
//!
//! Every connection, in either direction, is checked against the allow list once the Noise
//! handshake has authenticated the remote static key: a responder rejects a peer that is not
//! listed, or that connects from an address its entry does not allow; a dialer refuses to
//! send a request to a peer that is not listed. Allowing every peer exists only as
//! [`AllowList::allow_any_peer_insecure`], a name meant to stand out in review.
//!
//! File format (TOML):
//!
//! ```toml
//! [[peer]]
//! id = "3b0c…64 hex digits…"   # the peer id, or:
//! key = "8520…64 hex digits…"  # its static public key (the id is derived from it; with
//!                               # both, they must agree). One of the two is required.
//! name = "bob"                  # optional: a label for logs
//! address = "10.0.0.7:7000"     # optional: where it listens (membership offers go there)
//! addresses = ["10.0.0.7"]      # optional: IPs it may connect from; absent = any
//! expires = 2027-01-01T00:00:00Z  # optional: a date-time with its offset, or a duration
//!                               # after the file is loaded, e.g. "30d"
//! ```
//!
//! The list never reads a clock: [`AllowList::check`] ignores `expires`. Whoever loads the
//! file applies expiry by replacing the list with [`AllowList::in_force_at`] when
//! [`AllowList::next_expiry`] comes (`p2p-node serve` does).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::identity::{KEY_LEN, PeerId};

/// What the list knows about one allowed peer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowedPeer {
    /// A label for logs, if given.
    pub name: Option<String>,
    /// The IPs it may connect from; empty means any address.
    pub addresses: Vec<IpAddr>,
    /// When the entry stops allowing the peer, if ever (applied by the list's owner, see
    /// the module docs).
    pub expires: Option<Expiry>,
    /// Its static public key, when the entry gave it (`key = ...`, or a membership
    /// document, which always does).
    pub public_key: Option<[u8; KEY_LEN]>,
    /// Where it listens, if known: a membership node offers new epochs to it there.
    pub address: Option<SocketAddr>,
    /// The key that signs its address records (`record_key = ...`; membership members
    /// files only).
    pub record_key: Option<crate::records::RecordKeyId>,
}

/// When an allow-list entry ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// At this moment (`expires = 2027-01-01T00:00:00Z`).
    At(SystemTime),
    /// This long after the file is loaded (`expires = "30d"`).
    AfterLoad(Duration),
}

impl Expiry {
    /// The moment it ends, for a list loaded at `loaded`.
    pub fn deadline(&self, loaded: SystemTime) -> SystemTime {
        match *self {
            Self::At(at) => at,
            Self::AfterLoad(d) => loaded.checked_add(d).unwrap_or(loaded),
        }
    }
}

/// The set of peers allowed to talk to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    mode: Mode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// Only the listed peers. A `BTreeMap` so iteration (e.g. when listing) is ordered.
    Only(BTreeMap<PeerId, AllowedPeer>),
    /// Any authenticated peer. Explicit and loudly named: see `allow_any_peer_insecure`.
    AnyPeerInsecure,
}

/// Why a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The peer id is not on the list.
    #[error("peer is not on the allow list")]
    NotListed,
    /// The peer is listed, but not for the address it connected from.
    #[error("peer connected from {0}, which its allow-list entry does not include")]
    AddressNotAllowed(IpAddr),
}

/// Why an allow-list file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    /// The file could not be read.
    #[error("cannot read allow list {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a valid allow list. The message names line, column and field.
    #[error("invalid allow list {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// The parser's message, with line, column and the offending field.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    peer: Vec<toml::Spanned<FilePeer>>,
}

/// One `[[peer]]` entry as written (allow-list files and membership members files share it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilePeer {
    #[serde(default)]
    pub(crate) id: Option<PeerId>,
    #[serde(default)]
    pub(crate) key: Option<toml::Spanned<String>>,
    #[serde(default)]
    pub(crate) name: Option<String>,
    #[serde(default)]
    pub(crate) address: Option<SocketAddr>,
    #[serde(default)]
    pub(crate) addresses: Vec<IpAddr>,
    #[serde(default)]
    pub(crate) expires: Option<toml::Spanned<toml::Value>>,
    #[serde(default)]
    pub(crate) record_key: Option<toml::Spanned<String>>,
}

/// The line (from 1) of byte offset `at` in `text`.
pub(crate) fn line_of(text: &str, at: usize) -> usize {
    text.get(..at).map_or(0, |t| t.matches('\n').count() + 1)
}

/// Seconds since the Unix epoch of a TOML date-time, which must carry its offset.
pub(crate) fn datetime_to_unix(dt: &toml::value::Datetime) -> Result<u64, String> {
    let (Some(date), Some(offset)) = (dt.date, dt.offset) else {
        return Err("a date-time needs its offset (2027-01-01T00:00:00Z)".into());
    };
    let time = dt.time.unwrap_or(toml::value::Time {
        hour: 0,
        minute: 0,
        second: None,
        nanosecond: None,
    });
    let offset_minutes = match offset {
        toml::value::Offset::Z => 0,
        toml::value::Offset::Custom { minutes } => i64::from(minutes),
    };
    let days = days_from_civil(
        i64::from(date.year),
        i64::from(date.month),
        i64::from(date.day),
    );
    let secs = days * 86_400
        + i64::from(time.hour) * 3_600
        + i64::from(time.minute) * 60
        + i64::from(time.second.unwrap_or(0))
        - offset_minutes * 60;
    u64::try_from(secs).map_err(|_| "before 1970".to_owned())
}

/// The TOML date-time (UTC, whole seconds) of a Unix time.
pub(crate) fn unix_to_datetime(secs: u64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Reads `expires`: an offset date-time, or a humantime duration string.
fn parse_expiry(value: &toml::Spanned<toml::Value>, text: &str) -> Result<Expiry, String> {
    let line = line_of(text, value.span().start);
    let bad = |why: &str| format!("line {line}: expires: {why}");
    match value.get_ref() {
        toml::Value::Datetime(dt) => datetime_to_unix(dt)
            .map(|secs| Expiry::At(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)))
            .map_err(|why| bad(&why)),
        toml::Value::String(s) => humantime::parse_duration(s)
            .map(Expiry::AfterLoad)
            .map_err(|e| bad(&format!("{s:?} is neither a date-time nor a duration: {e}"))),
        _ => Err(bad(
            "expected a date-time (2027-01-01T00:00:00Z) or a duration string (\"30d\")",
        )),
    }
}

/// Reads a static public key written as 64 hex digits, naming its line on error.
pub(crate) fn parse_key(
    value: &toml::Spanned<String>,
    text: &str,
) -> Result<[u8; KEY_LEN], String> {
    let line = line_of(text, value.span().start);
    let mut key = [0u8; KEY_LEN];
    let hex_text = value.get_ref().trim();
    if hex_text.len() != 2 * KEY_LEN {
        return Err(format!(
            "line {line}: key: expected {} hex digits, found {}",
            2 * KEY_LEN,
            hex_text.len()
        ));
    }
    hex::decode_to_slice(hex_text, &mut key)
        .map_err(|e| format!("line {line}: key: not hex: {e}"))?;
    Ok(key)
}

/// The peer id of an entry: its `id`, or the one its `key` derives; both must agree.
fn entry_id(
    entry: &FilePeer,
    line: usize,
    text: &str,
) -> Result<(PeerId, Option<[u8; KEY_LEN]>), String> {
    let key = entry.key.as_ref().map(|k| parse_key(k, text)).transpose()?;
    match (entry.id, key) {
        (Some(id), Some(key)) if PeerId::from_public_key(&key) != id => {
            let line = entry
                .key
                .as_ref()
                .map_or(0, |k| line_of(text, k.span().start));
            Err(format!(
                "line {line}: key: it derives peer id {}, not the entry's id {id}",
                PeerId::from_public_key(&key)
            ))
        }
        (Some(id), key) => Ok((id, key)),
        (None, Some(key)) => Ok((PeerId::from_public_key(&key), Some(key))),
        (None, None) => Err(format!(
            "line {line}: an entry needs its `id` (the peer id) or its `key` (its public key)"
        )),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl AllowList {
    /// An empty list: nobody is allowed until added.
    pub fn new() -> Self {
        Self {
            mode: Mode::Only(BTreeMap::new()),
        }
    }

    /// Allows every authenticated peer from any address. Peers are still authenticated by
    /// Noise, but anyone who can reach the port can use this node. Use only in tests or
    /// behind another access control.
    pub fn allow_any_peer_insecure() -> Self {
        Self {
            mode: Mode::AnyPeerInsecure,
        }
    }

    /// A list of the given peers, each allowed from any address.
    pub fn from_peers(peers: impl IntoIterator<Item = PeerId>) -> Self {
        let mut list = Self::new();
        for peer in peers {
            list.insert(peer, AllowedPeer::default());
        }
        list
    }

    /// A list of the peers whose static public keys are `keys`, from any address. Knowing
    /// a peer's key lets the endpoint dial it with IK (one handshake message before the
    /// first request, instead of two).
    pub fn from_keys(keys: impl IntoIterator<Item = [u8; KEY_LEN]>) -> Self {
        let mut list = Self::new();
        for key in keys {
            let entry = AllowedPeer {
                public_key: Some(key),
                ..AllowedPeer::default()
            };
            list.insert(PeerId::from_public_key(&key), entry);
        }
        list
    }

    /// Parses the TOML form; `origin` names the source in errors (a path, or e.g. `"<inline>"`).
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, AllowListError> {
        let file: FileFormat = toml::from_str(text).map_err(|e| AllowListError::Invalid {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        let mut list = Self::new();
        for entry in file.peer {
            let line = line_of(text, entry.span().start);
            let entry = entry.into_inner();
            let (id, public_key) =
                entry_id(&entry, line, text).map_err(|message| AllowListError::Invalid {
                    path: origin.to_owned(),
                    message,
                })?;
            if list.contains(&id) {
                return Err(AllowListError::Invalid {
                    path: origin.to_owned(),
                    message: format!("peer {id} is listed twice"),
                });
            }
            let expires = entry
                .expires
                .as_ref()
                .map(|v| parse_expiry(v, text))
                .transpose()
                .map_err(|message| AllowListError::Invalid {
                    path: origin.to_owned(),
                    message,
                })?;
            let record_key = entry
                .record_key
                .as_ref()
                .map(|k| {
                    crate::records::RecordKeyId::from_hex(k.get_ref()).map_err(|why| {
                        AllowListError::Invalid {
                            path: origin.to_owned(),
                            message: format!(
                                "line {}: record_key: {why}",
                                line_of(text, k.span().start)
                            ),
                        }
                    })
                })
                .transpose()?;
            list.insert(
                id,
                AllowedPeer {
                    name: entry.name,
                    addresses: entry.addresses,
                    expires,
                    public_key,
                    address: entry.address,
                    record_key,
                },
            );
        }
        Ok(list)
    }

    /// Loads the TOML file at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, AllowListError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AllowListError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::from_toml_str(&text, &shown)
    }

    /// Adds or replaces a peer. Turns nothing off in allow-any mode (everyone is in already).
    pub fn insert(&mut self, peer: PeerId, entry: AllowedPeer) {
        if let Mode::Only(peers) = &mut self.mode {
            peers.insert(peer, entry);
        }
    }

    /// Removes a peer; returns whether it was listed. Revoking one peer of "everyone" is not
    /// expressible, so in allow-any mode this returns `false` and changes nothing: callers
    /// that need revocation use an explicit list.
    pub fn remove(&mut self, peer: &PeerId) -> bool {
        match &mut self.mode {
            Mode::Only(peers) => peers.remove(peer).is_some(),
            Mode::AnyPeerInsecure => false,
        }
    }

    /// Whether the peer may talk to us at all (from some address).
    pub fn contains(&self, peer: &PeerId) -> bool {
        match &self.mode {
            Mode::Only(peers) => peers.contains_key(peer),
            Mode::AnyPeerInsecure => true,
        }
    }

    /// Whether this list allows any peer.
    pub fn is_allow_any(&self) -> bool {
        matches!(self.mode, Mode::AnyPeerInsecure)
    }

    /// The entry for a peer, if listed explicitly.
    pub fn get(&self, peer: &PeerId) -> Option<&AllowedPeer> {
        match &self.mode {
            Mode::Only(peers) => peers.get(peer),
            Mode::AnyPeerInsecure => None,
        }
    }

    /// Listed peers in id order (empty in allow-any mode).
    pub fn peers(&self) -> impl Iterator<Item = (&PeerId, &AllowedPeer)> {
        let map = match &self.mode {
            Mode::Only(peers) => Some(peers),
            Mode::AnyPeerInsecure => None,
        };
        map.into_iter().flat_map(|m| m.iter())
    }

    /// Whether some entry lists `ip` among the addresses its peer may connect from: a
    /// stream from there is admitted ahead of strangers, before any cryptography (see
    /// `admission`). A linear scan: lists are a few hundred entries at most, and it runs
    /// once per accepted stream.
    pub fn lists_address(&self, ip: IpAddr) -> bool {
        self.peers().any(|(_, entry)| entry.addresses.contains(&ip))
    }

    /// Checks an authenticated peer connecting from `ip`.
    pub fn check(&self, peer: &PeerId, ip: IpAddr) -> Result<(), Rejection> {
        match &self.mode {
            Mode::AnyPeerInsecure => Ok(()),
            Mode::Only(peers) => {
                let entry = peers.get(peer).ok_or(Rejection::NotListed)?;
                if entry.addresses.is_empty() || entry.addresses.contains(&ip) {
                    Ok(())
                } else {
                    Err(Rejection::AddressNotAllowed(ip))
                }
            }
        }
    }
}

impl AllowList {
    /// The entries still in force at `now` for a list loaded at `loaded`, and the peers
    /// whose entry expired, in id order. In allow-any mode, the list as it is.
    pub fn in_force_at(&self, now: SystemTime, loaded: SystemTime) -> (AllowList, Vec<PeerId>) {
        let Mode::Only(peers) = &self.mode else {
            return (self.clone(), Vec::new());
        };
        let mut kept = BTreeMap::new();
        let mut expired = Vec::new();
        for (peer, entry) in peers {
            if entry.expires.is_some_and(|e| e.deadline(loaded) <= now) {
                expired.push(*peer);
            } else {
                kept.insert(*peer, entry.clone());
            }
        }
        (
            Self {
                mode: Mode::Only(kept),
            },
            expired,
        )
    }

    /// The earliest moment an entry expires, for a list loaded at `loaded`.
    pub fn next_expiry(&self, loaded: SystemTime) -> Option<SystemTime> {
        self.peers()
            .filter_map(|(_, e)| e.expires.map(|x| x.deadline(loaded)))
            .min()
    }
}

impl Default for AllowList {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Keypair;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn id(seed: u64) -> PeerId {
        Keypair::generate(&mut ChaCha20Rng::seed_from_u64(seed)).peer_id()
    }

    #[test]
    fn loads_peers_with_and_without_addresses() {
        let (a, b) = (id(1), id(2));
        let text = format!(
            "[[peer]]\nid = \"{a}\"\nname = \"alice\"\naddresses = [\"10.0.0.1\", \"::1\"]\n\n[[peer]]\nid = \"{b}\"\n"
        );
        let list = AllowList::from_toml_str(&text, "allow.toml").unwrap();
        assert_eq!(list.get(&a).unwrap().name.as_deref(), Some("alice"));
        assert_eq!(list.check(&a, "10.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(list.check(&a, "::1".parse().unwrap()), Ok(()));
        assert_eq!(
            list.check(&a, "10.0.0.2".parse().unwrap()),
            Err(Rejection::AddressNotAllowed("10.0.0.2".parse().unwrap()))
        );
        assert_eq!(list.check(&b, "192.0.2.9".parse().unwrap()), Ok(()));
        assert_eq!(
            list.check(&id(3), "10.0.0.1".parse().unwrap()),
            Err(Rejection::NotListed)
        );
        assert_eq!(list.peers().count(), 2);
    }

    #[test]
    fn bad_files_name_origin_line_and_field() {
        let a = id(1);
        let cases = [
            // Unknown field.
            (
                format!("[[peer]]\nid = \"{a}\"\nadress = []\n"),
                "adress",
                "line 3",
            ),
            // Bad peer id.
            (
                "[[peer]]\nid = \"beef\"\n".to_owned(),
                "64 hex digits",
                "line 2",
            ),
            // Bad address.
            (
                format!("[[peer]]\nid = \"{a}\"\naddresses = [\"10.0.0.300\"]\n"),
                "address",
                "line 3",
            ),
            // Missing id.
            ("[[peer]]\nname = \"x\"\n".to_owned(), "id", "line 1"),
        ];
        for (text, field, line) in cases {
            let err = AllowList::from_toml_str(&text, "nodes/allow.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains("nodes/allow.toml"), "{err}");
            assert!(err.contains(field), "expected {field:?} in {err}");
            assert!(err.contains(line), "expected {line:?} in {err}");
        }
        let dup = format!("[[peer]]\nid = \"{a}\"\n[[peer]]\nid = \"{a}\"\n");
        let err = AllowList::from_toml_str(&dup, "x").unwrap_err().to_string();
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn runtime_changes() {
        let (a, b) = (id(1), id(2));
        let mut list = AllowList::from_peers([a]);
        assert!(!list.is_allow_any());
        assert!(AllowList::allow_any_peer_insecure().is_allow_any());
        let ip = "127.0.0.1".parse().unwrap();
        assert!(list.check(&b, ip).is_err());
        list.insert(b, AllowedPeer::default());
        assert_eq!(list.check(&b, ip), Ok(()));
        assert!(list.remove(&a));
        assert!(!list.remove(&a));
        assert_eq!(list.check(&a, ip), Err(Rejection::NotListed));
    }

    #[test]
    fn allow_any_is_explicit() {
        assert!(!AllowList::default().contains(&id(1)));
        let any = AllowList::allow_any_peer_insecure();
        assert!(any.is_allow_any());
        assert_eq!(any.check(&id(1), "192.0.2.1".parse().unwrap()), Ok(()));
    }

    #[test]
    fn expiry_takes_a_date_time_with_offset_or_a_duration_after_load() {
        let (a, b, c) = (id(1), id(2), id(3));
        let text = format!(
            "[[peer]]\nid = \"{a}\"\nexpires = 2027-01-01T01:00:00+01:00\n\n\
             [[peer]]\nid = \"{b}\"\nexpires = \"1h\"\n\n[[peer]]\nid = \"{c}\"\n"
        );
        let list = AllowList::from_toml_str(&text, "allow.toml").unwrap();
        // 2027-01-01T00:00:00Z is 1,798,761,600 s after the epoch.
        let new_year = SystemTime::UNIX_EPOCH + Duration::from_secs(1_798_761_600);
        assert_eq!(list.get(&a).unwrap().expires, Some(Expiry::At(new_year)));
        assert_eq!(
            list.get(&b).unwrap().expires,
            Some(Expiry::AfterLoad(Duration::from_secs(3_600)))
        );
        let loaded = new_year - Duration::from_secs(7_200);
        assert_eq!(
            list.next_expiry(loaded),
            Some(loaded + Duration::from_secs(3_600))
        );
        let (in_force, expired) = list.in_force_at(loaded + Duration::from_secs(3_599), loaded);
        assert_eq!((in_force.peers().count(), expired.len()), (3, 0));
        let (in_force, expired) = list.in_force_at(loaded + Duration::from_secs(3_600), loaded);
        assert_eq!(expired, vec![b]);
        assert!(in_force.contains(&a) && in_force.contains(&c) && !in_force.contains(&b));
        let (in_force, mut expired) = list.in_force_at(new_year, loaded);
        expired.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!((expired, in_force.peers().count()), (want, 1));
        // Minutes and seconds count too.
        let text = format!("[[peer]]\nid = \"{a}\"\nexpires = 2027-01-01T00:01:02Z\n");
        let precise = AllowList::from_toml_str(&text, "allow.toml").unwrap();
        assert_eq!(
            precise.get(&a).unwrap().expires,
            Some(Expiry::At(new_year + Duration::from_secs(62)))
        );
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn a_bad_expiry_names_its_line() {
        let a = id(1);
        for (value, why) in [
            ("2027-01-01T00:00:00", "offset"),
            ("\"soon\"", "soon"),
            ("12", "date-time"),
            ("1960-01-01T00:00:00Z", "1970"),
        ] {
            let text = format!("[[peer]]\nid = \"{a}\"\nexpires = {value}\n");
            let err = AllowList::from_toml_str(&text, "allow.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("line 3") && err.contains(why),
                "{value}: {err}"
            );
        }
    }

    #[test]
    fn file_errors_name_the_path() {
        let err = AllowList::from_file("/nonexistent/allow.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/allow.toml"), "{err}");
    }
}
