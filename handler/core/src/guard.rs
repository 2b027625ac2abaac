//! What a responder checks of an IK message 1 before any Diffie-Hellman: WireGuard's two
//! MACs (its paper, section 5.4.4) and cookie (5.4.7), and tickets that let a dialer it
//! authenticated before prove who it is without any.
//!
//! An IK message 1 ends in a 48-byte *envelope*, outside the Noise message:
//!
//! ```text
//! noise message 1 | ticket id (16) | mac1 (16) | mac2 (16)
//! ```
//!
//! * **mac1** = MAC(HASH("p2p-handler v2 mac1" ‖ responder's static key), everything before
//!   it). Only a dialer that knows the responder's public key can make it, so a scanner
//!   (and any garbage) is turned away after one keyed hash: no key generation, no
//!   Diffie-Hellman.
//! * **mac2** proves one of two things, or nothing (sixteen zeros):
//!   - a **ticket**: the responder handed the dialer `(id, key)` inside an earlier
//!     handshake, encrypted, after it had authenticated and allowed it. A message 1 that
//!     names a ticket the responder holds and whose mac2 = MAC(ticket key, …) comes from
//!     that peer (or from someone it gave the ticket to): the responder lets it ahead of
//!     every unproven handshake, from the same address too, and charges it nothing. Tickets
//!     are single use, so a recorded message 1 replayed is unproven again.
//!   - a **cookie**: under load, the responder answers an unproven message 1 with a cookie
//!     reply instead of Diffie-Hellman work: a cookie = MAC(secret rotated every two
//!     minutes, the dialer's IP address and port), encrypted under a key derived from the
//!     responder's public key with the message's mac1 as associated data (so only the
//!     dialer that sent it can use it). The dialer sends message 1 again with mac2 =
//!     MAC(cookie, …), proving it receives at that address.
//!
//! On TCP the connection's own handshake already proves the address, so the cookie costs
//! an attacker a round trip and no more; it is here so a responder under load never does
//! Diffie-Hellman for a message 1 it could not yet attribute, and for transports where an
//! address can be spoofed. What sorts an allowed peer from strangers on a shared address is
//! the ticket.
//!
//! The [`Guard`] is the responder's table (sans-IO: the driver holds it and asks it about
//! each first frame); the free functions are the dialer's side. Every key and MAC is
//! domain-separated by a label naming this protocol and its purpose.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac as _};
use blake2::{Blake2s256, Blake2sMac, Digest as _};
use chacha20poly1305::aead::AeadInPlace as _;
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng as _, SeedableRng as _};

use crate::identity::{KEY_LEN, PeerId};
use crate::wire::{HELLO_MAGIC, Hello, TAG_LEN};

/// Length of a MAC, of a ticket id and of a cookie.
pub const MAC_LEN: usize = 16;
/// The envelope after an IK message 1: ticket id, mac1, mac2.
pub const ENVELOPE_LEN: usize = 3 * MAC_LEN;
/// The shortest IK message 1 with its envelope: an ephemeral key, the encrypted static key,
/// the encrypted hello, the envelope.
pub const IK_MESSAGE_1_MIN: usize =
    KEY_LEN + (KEY_LEN + TAG_LEN) + (Hello::LEN + TAG_LEN) + ENVELOPE_LEN;
/// A cookie reply: `"P2PC"`, a 24-byte nonce, the encrypted cookie and its tag.
pub const COOKIE_REPLY_LEN: usize = 4 + 24 + MAC_LEN + TAG_LEN;
/// The first bytes of a cookie reply.
pub const COOKIE_MAGIC: [u8; 4] = *b"P2PC";
/// How long a cookie secret lasts; a cookie of the current or the previous one is valid.
pub const COOKIE_PERIOD: Duration = Duration::from_secs(120);
/// Tickets a responder holds for one peer (the oldest goes first).
pub const TICKETS_PER_PEER: usize = 4;
/// Tickets a responder holds in all (the oldest goes first).
pub const MAX_TICKETS: usize = 65_536;
/// How long a ticket may be redeemed after it was issued.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(600);

const LABEL_MAC1: &[u8] = b"p2p-handler v2 mac1";
const LABEL_COOKIE_KEY: &[u8] = b"p2p-handler v2 cookie key";
const LABEL_COOKIE_SECRET: &[u8] = b"p2p-handler v2 cookie secret";
const LABEL_TICKET: &[u8] = b"p2p-handler v2 ticket";

/// A ticket: what a dialer names in a later message 1 (`id`) and keys its mac2 with
/// (`key`). 48 bytes on the wire, in IK message 2's payload after the hello.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// Names the ticket; sent in clear.
    pub id: [u8; MAC_LEN],
    /// Keys mac2; never sent in clear.
    pub key: [u8; KEY_LEN],
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({})", hex::encode(self.id))
    }
}

impl Ticket {
    /// Encoded length.
    pub const LEN: usize = MAC_LEN + KEY_LEN;

    /// The ticket a responder hands out on the connection whose randomness is `seed`: a
    /// domain-separated hash of it, so tickets come from the injected RNG like everything
    /// else, and reveal nothing of the ephemeral key the same seed makes.
    pub fn derive(seed: &[u8; 32]) -> Self {
        let mut hash = Blake2s256::new();
        hash.update(LABEL_TICKET);
        hash.update(seed);
        let first: [u8; 32] = hash.finalize().into();
        let mut hash = Blake2s256::new();
        hash.update(LABEL_TICKET);
        hash.update(first);
        let key: [u8; 32] = hash.finalize().into();
        let mut id = [0u8; MAC_LEN];
        id.copy_from_slice(&first[..MAC_LEN]);
        Self { id, key }
    }

    /// `id ‖ key`.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..MAC_LEN].copy_from_slice(&self.id);
        out[MAC_LEN..].copy_from_slice(&self.key);
        out
    }

    /// Reads `id ‖ key`; `None` unless exactly [`Ticket::LEN`] bytes.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::LEN] = bytes.try_into().ok()?;
        let (id, key) = bytes.split_at(MAC_LEN);
        Some(Self {
            id: id.try_into().ok()?,
            key: key.try_into().ok()?,
        })
    }
}

fn hash(label: &[u8], data: &[u8]) -> [u8; 32] {
    let mut hash = Blake2s256::new();
    hash.update(label);
    hash.update(data);
    hash.finalize().into()
}

/// Keyed BLAKE2s-128, as WireGuard's MAC. Every key here is 16 or 32 bytes, which keyed
/// BLAKE2s always takes (it refuses only keys over 32 bytes).
fn mac(key: &[u8], data: &[u8]) -> [u8; MAC_LEN] {
    debug_assert!(key.len() <= 32);
    let Ok(mut m) = <Blake2sMac<U16> as KeyInit>::new_from_slice(key) else {
        return [0; MAC_LEN];
    };
    m.update(data);
    m.finalize().into_bytes().into()
}

fn mac_matches(key: &[u8], data: &[u8], tag: &[u8]) -> bool {
    let Ok(mut m) = <Blake2sMac<U16> as KeyInit>::new_from_slice(key) else {
        return false;
    };
    m.update(data);
    m.verify_slice(tag).is_ok()
}

/// The key mac1 is made with for a responder whose static public key is `responder`.
pub fn mac1_key(responder: &[u8; KEY_LEN]) -> [u8; 32] {
    hash(LABEL_MAC1, responder)
}

fn cookie_key(responder: &[u8; KEY_LEN]) -> [u8; 32] {
    hash(LABEL_COOKIE_KEY, responder)
}

/// Whether a first frame is an XX message 1 (an ephemeral key, then the hello in clear)
/// rather than an IK one (whose encrypted static key follows the ephemeral key).
pub fn is_xx_message_1(frame: &[u8]) -> bool {
    frame.get(KEY_LEN..KEY_LEN + HELLO_MAGIC.len()) == Some(&HELLO_MAGIC[..])
}

/// Whether a frame a dialer reads where IK message 2 belongs is a cookie reply. An IK
/// message 2 is never this short (an ephemeral key, then the encrypted hello).
pub fn is_cookie_reply(frame: &[u8]) -> bool {
    frame.len() == COOKIE_REPLY_LEN && frame.starts_with(&COOKIE_MAGIC)
}

/// An IK message 1 taken apart.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// The Noise message.
    pub noise: &'a [u8],
    /// The ticket it redeems (zeros: none).
    pub ticket_id: [u8; MAC_LEN],
    /// MAC by the responder's public key.
    pub mac1: [u8; MAC_LEN],
    /// MAC by a ticket's key or a cookie (zeros: neither).
    pub mac2: [u8; MAC_LEN],
}

/// An IK message 1's parts. `None` if it is too short to hold an envelope after the
/// shortest Noise message 1.
pub fn split_message_1(frame: &[u8]) -> Option<Envelope<'_>> {
    if frame.len() < IK_MESSAGE_1_MIN {
        return None;
    }
    let (noise, envelope) = frame.split_at(frame.len() - ENVELOPE_LEN);
    let part = |i: usize| -> Option<[u8; MAC_LEN]> {
        envelope
            .get(i * MAC_LEN..(i + 1) * MAC_LEN)?
            .try_into()
            .ok()
    };
    Some(Envelope {
        noise,
        ticket_id: part(0)?,
        mac1: part(1)?,
        mac2: part(2)?,
    })
}

/// Whether `frame`'s mac1 is right for the responder whose mac1 key is `key`.
pub fn mac1_matches(frame: &[u8], key: &[u8; 32]) -> bool {
    frame.len() >= IK_MESSAGE_1_MIN
        && mac_matches(
            key,
            &frame[..frame.len() - 2 * MAC_LEN],
            &frame[frame.len() - 2 * MAC_LEN..frame.len() - MAC_LEN],
        )
}

/// Dialer: wraps a Noise IK message 1 in its envelope for `responder`. mac2 is keyed by
/// the ticket if there is one, else by the cookie if there is one, else zeros.
pub fn seal_message_1(
    noise: &[u8],
    responder: &[u8; KEY_LEN],
    ticket: Option<&Ticket>,
    cookie: Option<&[u8; MAC_LEN]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(noise.len() + ENVELOPE_LEN);
    out.extend_from_slice(noise);
    out.extend_from_slice(&ticket.map_or([0; MAC_LEN], |t| t.id));
    let mac1 = mac(&mac1_key(responder), &out);
    out.extend_from_slice(&mac1);
    let mac2 = match (ticket, cookie) {
        (Some(ticket), _) => mac(&ticket.key, &out),
        (None, Some(cookie)) => mac(cookie, &out),
        (None, None) => [0; MAC_LEN],
    };
    out.extend_from_slice(&mac2);
    out
}

/// Dialer: the cookie in a cookie reply to the message 1 `sent` (with its envelope), from
/// the responder whose static key is `responder`. Fails unless that responder made it for
/// that message.
pub fn open_cookie_reply(
    frame: &[u8],
    responder: &[u8; KEY_LEN],
    sent: &[u8],
) -> Result<[u8; MAC_LEN], &'static str> {
    if !is_cookie_reply(frame) {
        return Err("not a cookie reply");
    }
    let Some(Envelope { mac1, .. }) = split_message_1(sent) else {
        return Err("no message 1 to answer");
    };
    let nonce = XNonce::from_slice(&frame[4..28]);
    let mut cookie = [0u8; MAC_LEN];
    cookie.copy_from_slice(&frame[28..28 + MAC_LEN]);
    let tag = chacha20poly1305::Tag::from_slice(&frame[28 + MAC_LEN..]);
    XChaCha20Poly1305::new(&cookie_key(responder).into())
        .decrypt_in_place_detached(nonce, &mac1, &mut cookie, tag)
        .map_err(|_| "a cookie reply that does not decrypt")?;
    Ok(cookie)
}

/// What a first frame is, as far as can be told without Diffie-Hellman.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstMessage {
    /// An XX message 1 (a dialer that does not know our key, or predates IK): no MACs to
    /// check; it is unproven.
    Xx,
    /// Not a message 1 for us: too short, or a wrong mac1 (garbage, a scanner, a dialer
    /// that has the wrong key for us). Close it; it cost one hash.
    Garbage(&'static str),
    /// An IK message 1 with a right mac1 and no ticket we hold; `cookie` if its mac2
    /// proves a cookie we gave its address within the last two periods.
    Unproven {
        /// Whether mac2 proves a cookie.
        cookie: bool,
    },
    /// An IK message 1 redeeming a ticket we issued to `peer` (now spent).
    Proven(PeerId),
}

/// Counters, since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardStats {
    /// First frames turned away for a wrong mac1 or a short length.
    pub bad_mac1: u64,
    /// Cookie replies sent.
    pub cookies_sent: u64,
    /// Message 1s whose mac2 proved a cookie.
    pub cookies_proven: u64,
    /// Tickets handed to authenticated peers.
    pub tickets_issued: u64,
    /// Tickets redeemed (each once).
    pub tickets_redeemed: u64,
    /// Message 1s naming a ticket we do not hold (spent, expired, forgotten, or made up).
    pub tickets_unknown: u64,
}

#[derive(Debug, Clone, Copy)]
struct Issued {
    peer: PeerId,
    key: [u8; KEY_LEN],
    at: Instant,
}

/// The responder's side: mac1 key, cookie secrets, tickets issued. See the module docs.
#[derive(Debug)]
pub struct Guard {
    mac1_key: [u8; 32],
    cookie_key: [u8; 32],
    secret: [u8; 32],
    started: Instant,
    rng: ChaCha20Rng,
    tickets: BTreeMap<[u8; MAC_LEN], Issued>,
    per_peer: BTreeMap<PeerId, VecDeque<[u8; MAC_LEN]>>,
    /// Ticket ids in the order they were issued; may name spent ones (skipped).
    order: VecDeque<[u8; MAC_LEN]>,
    stats: GuardStats,
}

impl Guard {
    /// The guard of the node whose static public key is `public_key`; its cookie secret and
    /// nonces come from `seed`.
    pub fn new(public_key: &[u8; KEY_LEN], seed: [u8; 32], now: Instant) -> Self {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self {
            mac1_key: mac1_key(public_key),
            cookie_key: cookie_key(public_key),
            secret,
            started: now,
            rng,
            tickets: BTreeMap::new(),
            per_peer: BTreeMap::new(),
            order: VecDeque::new(),
            stats: GuardStats::default(),
        }
    }

    /// Counters since the start.
    pub fn stats(&self) -> GuardStats {
        self.stats
    }

    /// Tickets held (issued, not spent, not dropped).
    pub fn tickets(&self) -> usize {
        self.tickets.len()
    }

    /// Sorts a first frame from `from` before any Diffie-Hellman. A ticket it redeems is
    /// spent, whatever happens to the handshake next.
    pub fn classify(&mut self, frame: &[u8], from: SocketAddr, now: Instant) -> FirstMessage {
        if is_xx_message_1(frame) {
            return FirstMessage::Xx;
        }
        let Some(Envelope {
            ticket_id, mac2, ..
        }) = split_message_1(frame)
        else {
            self.stats.bad_mac1 += 1;
            return FirstMessage::Garbage("too short for an IK message 1");
        };
        if !mac1_matches(frame, &self.mac1_key) {
            self.stats.bad_mac1 += 1;
            return FirstMessage::Garbage("wrong mac1 (not made with our public key)");
        }
        let signed = &frame[..frame.len() - MAC_LEN];
        if ticket_id != [0; MAC_LEN] {
            if let Some(issued) = self.tickets.get(&ticket_id).copied()
                && now.saturating_duration_since(issued.at) < TICKET_LIFETIME
                && mac_matches(&issued.key, signed, &mac2)
            {
                self.spend(&ticket_id, issued.peer);
                self.stats.tickets_redeemed += 1;
                return FirstMessage::Proven(issued.peer);
            }
            self.stats.tickets_unknown += 1;
            return FirstMessage::Unproven { cookie: false };
        }
        let period = self.period(now);
        let cookie = [Some(period), period.checked_sub(1)]
            .into_iter()
            .flatten()
            .any(|p| mac_matches(&self.cookie(p, from), signed, &mac2));
        self.stats.cookies_proven += u64::from(cookie);
        FirstMessage::Unproven { cookie }
    }

    /// A cookie reply to the message 1 `frame` from `from` (whose mac1 was checked by
    /// [`Guard::classify`]); `None` if it has no envelope.
    pub fn cookie_reply(
        &mut self,
        frame: &[u8],
        from: SocketAddr,
        now: Instant,
    ) -> Option<Vec<u8>> {
        let Envelope { mac1, .. } = split_message_1(frame)?;
        let mut cookie = self.cookie(self.period(now), from);
        let mut nonce = [0u8; 24];
        self.rng.fill_bytes(&mut nonce);
        let tag = XChaCha20Poly1305::new(&self.cookie_key.into())
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), &mac1, &mut cookie)
            .ok()?;
        let mut out = Vec::with_capacity(COOKIE_REPLY_LEN);
        out.extend_from_slice(&COOKIE_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&cookie);
        out.extend_from_slice(&tag);
        self.stats.cookies_sent += 1;
        Some(out)
    }

    /// Input: `ticket` went to `peer` in an IK message 2, and the handshake authenticated
    /// and allowed `peer`. It keeps the newest [`TICKETS_PER_PEER`] of a peer and the
    /// newest [`MAX_TICKETS`] in all.
    pub fn issue(&mut self, peer: PeerId, ticket: Ticket, now: Instant) {
        if self.tickets.contains_key(&ticket.id) {
            return;
        }
        let held = self.per_peer.entry(peer).or_default();
        if held.len() >= TICKETS_PER_PEER
            && let Some(oldest) = held.pop_front()
        {
            self.tickets.remove(&oldest);
        }
        held.push_back(ticket.id);
        self.tickets.insert(
            ticket.id,
            Issued {
                peer,
                key: ticket.key,
                at: now,
            },
        );
        self.order.push_back(ticket.id);
        self.stats.tickets_issued += 1;
        while self.tickets.len() > MAX_TICKETS {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(issued) = self.tickets.get(&oldest).copied() {
                self.spend(&oldest, issued.peer);
            }
        }
        // Spent ids linger in `order` until they reach its front; keep it within twice
        // the tickets held.
        if self.order.len() > 2 * self.tickets.len().max(TICKETS_PER_PEER) {
            let tickets = &self.tickets;
            self.order.retain(|id| tickets.contains_key(id));
        }
    }

    /// Input: `peer` may no longer connect; its tickets go.
    pub fn forget(&mut self, peer: &PeerId) {
        if let Some(held) = self.per_peer.remove(peer) {
            for id in held {
                self.tickets.remove(&id);
            }
        }
    }

    fn spend(&mut self, id: &[u8; MAC_LEN], peer: PeerId) {
        self.tickets.remove(id);
        if let Some(held) = self.per_peer.get_mut(&peer) {
            held.retain(|held| held != id);
            if held.is_empty() {
                self.per_peer.remove(&peer);
            }
        }
    }

    fn period(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs() / COOKIE_PERIOD.as_secs()
    }

    /// The cookie of `from` in `period`: MAC(HASH(label ‖ secret ‖ period), ip ‖ port).
    fn cookie(&self, period: u64, from: SocketAddr) -> [u8; MAC_LEN] {
        let mut keyed = self.secret.to_vec();
        keyed.extend_from_slice(&period.to_be_bytes());
        let key = hash(LABEL_COOKIE_SECRET, &keyed);
        let ip = match from.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let mut address = ip.octets().to_vec();
        address.extend_from_slice(&from.port().to_be_bytes());
        mac(&key, &address)
    }
}

#[cfg(test)]
mod tests;
