//! Hostile peers inside the simulation: a host of its own, `mallory`, that connects to a
//! node and misbehaves, as a stranger or as an allowed peer whose software (or stolen key)
//! turned bad. It speaks the protocol from `docs/PROTOCOL.md` with the handler's own
//! wire and Noise helpers, and writes down what the node did about each connection; the
//! judge's `hostile` rule holds the node to what the handler promises:
//!
//! * every hostile connection is closed by the node within `handshake_timeout` (plus the
//!   time the bytes take), however slowly it sends or if it never sends at all, and an
//!   allowed peer's session that says nothing within `idle_timeout`;
//! * a protocol violation on an established session is answered with
//!   `Close{ProtocolViolation}` before the stream ends, and reported to the application
//!   as a peer error naming the peer;
//! * a replayed address record never takes a node back to an older one (the records
//!   judge);
//! * and, as in every run, the allowed peers' own exchanges keep every invariant.
//!
//! A target that is down, crashes or restarts while attacked excuses the connection (its
//! streams end however a crash ends them), and so does a network-wide fail rate.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p2p_handler::Keypair;
use p2p_handler::noise::{HandshakeRole, handshake};
use p2p_handler::wire::{
    CloseReason, ExchangeId, Hello, Message, PROTOCOL_VERSION, Reassembled, Reassembler, TAG_LEN,
    chunk_message,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use turmoil::net::TcpStream;

use super::world::{Shared, lock, now};
use crate::scenario::AttackKind;
use crate::trace::What;

/// The attacker's host name.
pub(super) const HOST: &str = "mallory";

/// What the time a node may take to close a hostile connection adds to its
/// `handshake_timeout`: the bytes' way there and back, and a tick or two.
const SLACK: Duration = Duration::from_secs(2);

/// How long a `slow` attacker waits between the bytes of its first message.
const SLOW_EVERY: Duration = Duration::from_millis(400);

/// Connections of a `flood` when the step gives no `count`.
pub(crate) const FLOOD: u32 = 32;

/// One attack the simulator asks for.
#[derive(Debug, Clone)]
pub(super) struct Attack {
    /// Its entry in [`Shared::attacks`].
    pub(super) record: usize,
    pub(super) kind: AttackKind,
    pub(super) addr: SocketAddr,
    pub(super) target_name: String,
    /// The allowed peer's key an insider holds (`violation`).
    pub(super) key: Option<Keypair>,
    pub(super) connections: u32,
    /// How long the node may take to close each connection.
    pub(super) bound: Duration,
    /// Which violation (an index into [`violations`]), and the strangers' keys.
    pub(super) seed: u64,
    /// `replay`: the sealed record to send again.
    pub(super) record_bytes: Option<bytes::Bytes>,
}

/// What became of an attack's connections.
#[derive(Debug, Clone)]
pub(super) struct AttackRecord {
    /// The step (0-based).
    pub(super) step: usize,
    pub(super) kind: AttackKind,
    pub(super) target: usize,
    pub(super) insider: Option<usize>,
    pub(super) started: Duration,
    /// The target's incarnation when the attack started.
    pub(super) incarnation: u64,
    pub(super) bound: Duration,
    /// The violation sent (`violation`).
    pub(super) violation: Option<&'static str>,
    /// Connections not finished yet.
    pub(super) open: u32,
    /// Connections the node closed in time.
    pub(super) closed: u32,
    /// Connections that never got through (the target was unreachable or refused).
    pub(super) unreachable: u32,
    /// Connections still open when the bound ran out.
    pub(super) kept_open: u32,
    /// Insider: the last message the node sent before its stream ended (`None`: none,
    /// or one the attacker could not read).
    pub(super) last_message: Option<Message>,
    /// Insider: a message failed to decrypt (a message fault corrupted it).
    pub(super) unreadable: bool,
}

impl AttackRecord {
    pub(super) fn new(step: usize, kind: AttackKind, target: usize, bound: Duration) -> Self {
        Self {
            step,
            kind,
            target,
            insider: None,
            started: now(),
            incarnation: 0,
            bound,
            violation: None,
            open: 0,
            closed: 0,
            unreachable: 0,
            kept_open: 0,
            last_message: None,
            unreadable: false,
        }
    }
}

/// How one connection ended.
enum End {
    Closed(Option<Message>, bool),
    /// The attacker hung up itself, its work done (`replay`).
    Left,
    Unreachable,
    KeptOpen,
}

/// The attacker's host: runs each attack it is handed, concurrently.
pub(super) async fn mallory_main(shared: Arc<Mutex<Shared>>) -> turmoil::Result {
    let (tx, mut attacks) = mpsc::unbounded_channel();
    lock(&shared).attacker = Some(tx);
    while let Some(attack) = attacks.recv().await {
        for n in 0..attack.connections {
            let (shared, attack) = (shared.clone(), attack.clone());
            tokio::spawn(async move {
                let end = tokio::time::timeout(attack.bound, connection(&attack, n)).await;
                let end = end.unwrap_or(End::KeptOpen);
                finish(&shared, &attack, end);
            });
        }
    }
    Ok(())
}

/// Writes down how one connection ended.
fn finish(shared: &Arc<Mutex<Shared>>, attack: &Attack, end: End) {
    let mut s = lock(shared);
    let target = attack.target_name.clone();
    let Some(r) = s.attacks.get_mut(attack.record) else {
        return;
    };
    r.open = r.open.saturating_sub(1);
    let what = match end {
        End::Closed(last, unreadable) => {
            r.closed += 1;
            r.unreadable |= unreadable;
            if last.is_some() {
                r.last_message = last;
            }
            "closed by the node"
        }
        End::Left => {
            r.closed += 1;
            "done, mallory hung up"
        }
        End::Unreachable => {
            r.unreachable += 1;
            "never got through"
        }
        End::KeptOpen => {
            r.kept_open += 1;
            "still open: given up"
        }
    };
    let text = format!(
        "mallory's {} connection to {target}: {what}",
        attack.kind.name()
    );
    let rule = format!("step {}", r.step + 1);
    s.trace.push(
        now(),
        "sim",
        What::Fault {
            what: text,
            rule,
            link: None,
        },
    );
}

/// One hostile connection, until the node ends it.
async fn connection(attack: &Attack, n: u32) -> End {
    let Ok(mut stream) = TcpStream::connect(attack.addr).await else {
        return End::Unreachable;
    };
    let mut rng = ChaCha20Rng::seed_from_u64(attack.seed ^ u64::from(n));
    match attack.kind {
        AttackKind::Silent => {}
        AttackKind::Garbage => {
            let len = 1 + (rng.next_u32() % 200) as usize;
            let mut frame = (len as u16).to_be_bytes().to_vec();
            frame.extend((0..len).map(|_| rng.next_u32() as u8));
            if stream.write_all(&frame).await.is_err() {
                return End::Closed(None, false);
            }
        }
        AttackKind::Slow => return slow(&mut stream, &mut rng).await,
        AttackKind::Stranger | AttackKind::Flood => {
            let key = Keypair::generate(&mut rng);
            // Refused at any point of the handshake: the stream ending is what counts.
            let _ = handshake_as(&mut stream, &key, &mut rng).await;
        }
        AttackKind::Idle => {
            let Some(key) = &attack.key else {
                return End::Unreachable;
            };
            let _ = handshake_as(&mut stream, key, &mut rng).await;
        }
        AttackKind::Violation => {
            let Some(key) = &attack.key else {
                return End::Unreachable;
            };
            return violate(&mut stream, key, attack.seed, &mut rng).await;
        }
        AttackKind::Replay => {
            let (Some(key), Some(record)) = (&attack.key, &attack.record_bytes) else {
                return End::Unreachable;
            };
            return replay(&mut stream, key, record.clone(), &mut rng).await;
        }
    }
    drain(&mut stream).await;
    End::Closed(None, false)
}

/// Reads until the stream ends.
async fn drain(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// A valid first handshake message, one byte at a time: a slow upload.
async fn slow(stream: &mut TcpStream, rng: &mut ChaCha20Rng) -> End {
    let key = Keypair::generate(rng);
    let Ok(mut hs) = handshake(&key, HandshakeRole::Initiator, seed_of(rng)) else {
        return End::Unreachable;
    };
    let mut buf = vec![0u8; 1024];
    let Ok(len) = hs.write_message(&hello(), &mut buf) else {
        return End::Unreachable;
    };
    let mut frame = (len as u16).to_be_bytes().to_vec();
    frame.extend_from_slice(&buf[..len]);
    let mut byte = [0u8; 1];
    for b in frame {
        if stream.write_all(&[b]).await.is_err() {
            return End::Closed(None, false);
        }
        // The node ending the stream meanwhile ends the attack.
        let read = tokio::time::timeout(SLOW_EVERY, stream.read(&mut byte)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            return End::Closed(None, false);
        }
    }
    drain(stream).await;
    End::Closed(None, false)
}

/// This attacker's hello: no features, so the node sends it nothing but exchanges.
fn hello() -> [u8; Hello::LEN] {
    hello_with(0)
}

fn hello_with(features: u32) -> [u8; Hello::LEN] {
    Hello {
        version: PROTOCOL_VERSION,
        max_message_size: 1 << 20,
        progress_ms: 0,
        features,
    }
    .encode()
}

fn seed_of(rng: &mut ChaCha20Rng) -> [u8; 32] {
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    seed
}

async fn write_frame(stream: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(body.len()).map_err(std::io::Error::other)?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(body);
    stream.write_all(&out).await
}

async fn read_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.ok()?;
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).await.ok()?;
    Some(body)
}

/// The Noise session of a completed XX handshake as the dialer `key`.
async fn handshake_as(
    stream: &mut TcpStream,
    key: &Keypair,
    rng: &mut ChaCha20Rng,
) -> Option<snow::TransportState> {
    handshake_with(stream, key, rng, hello()).await
}

async fn handshake_with(
    stream: &mut TcpStream,
    key: &Keypair,
    rng: &mut ChaCha20Rng,
    hello: [u8; Hello::LEN],
) -> Option<snow::TransportState> {
    let mut hs = handshake(key, HandshakeRole::Initiator, seed_of(rng)).ok()?;
    let mut buf = vec![0u8; 65_535];
    let n = hs.write_message(&hello, &mut buf).ok()?;
    write_frame(stream, &buf[..n]).await.ok()?;
    let msg2 = read_frame(stream).await?;
    hs.read_message(&msg2, &mut buf).ok()?;
    let n = hs.write_message(&[], &mut buf).ok()?;
    write_frame(stream, &buf[..n]).await.ok()?;
    hs.into_transport_mode().ok()
}

fn seal(session: &mut snow::TransportState, plain: &[u8]) -> Option<Vec<u8>> {
    let mut frame = vec![0u8; plain.len() + TAG_LEN];
    let n = session.write_message(plain, &mut frame).ok()?;
    frame.truncate(n);
    Some(frame)
}

fn open(session: &mut snow::TransportState, frame: &[u8]) -> Option<Vec<u8>> {
    let mut plain = vec![0u8; frame.len()];
    let n = session.read_message(frame, &mut plain).ok()?;
    plain.truncate(n);
    Some(plain)
}

const FIRST: u8 = 0b01;
const LAST: u8 = 0b10;

/// One FIRST|LAST chunk announcing exactly `body`.
fn whole(body: &[u8]) -> Vec<u8> {
    let mut chunk = vec![FIRST | LAST];
    chunk.extend_from_slice(&(body.len() as u32).to_be_bytes());
    chunk.extend_from_slice(body);
    chunk
}

/// An Ack's encoding (of a Request).
fn ack_body() -> Vec<u8> {
    let mut body = vec![2];
    body.extend_from_slice(&7u64.to_be_bytes());
    body.extend_from_slice(&1u32.to_be_bytes());
    body.push(1);
    body
}

/// The violation an attack with `seed` sends: its name, and what goes on the wire (see
/// [`violations`]). The trace names it when the attack starts, the attacker sends it.
pub(super) fn violation(seed: u64) -> (&'static str, Option<Vec<u8>>) {
    let mut all = violations();
    all.swap_remove(((seed >> 32) % all.len() as u64) as usize)
}

/// What a violating insider sends after the handshake: one chunk's plaintext, or `None`
/// for a frame of zero bytes (no Noise message is empty). Each breaks `docs/PROTOCOL.md`
/// at a different layer: framing, chunking, message encoding, roles.
fn violations() -> Vec<(&'static str, Option<Vec<u8>>)> {
    let mut trailing = ack_body();
    trailing.push(0);
    let mut first = vec![FIRST];
    first.extend_from_slice(&(ack_body().len() as u32).to_be_bytes());
    first.extend_from_slice(&ack_body());
    let reply = chunk_message(&Message::Reply {
        exchange: ExchangeId(9),
        attempt: 1,
        payload: bytes::Bytes::from_static(b"x"),
    })
    .remove(0);
    vec![
        ("an empty frame", None),
        (
            "reserved flag bits",
            Some(vec![0b100 | FIRST | LAST, 0, 0, 0, 1, 6]),
        ),
        ("a total length of 0", Some(whole(&[]))),
        ("the total reached without LAST", Some(first)),
        ("unknown message kind 7", Some(whole(&[7, 0, 0]))),
        (
            "a truncated exchange header",
            Some(whole(&[1, 0, 0, 0, 0, 0])),
        ),
        ("trailing bytes after an Ack", Some(whole(&trailing))),
        ("a Reply sent by the dialer", Some(reply)),
    ]
}

/// An insider's session: a valid handshake with an allowed key, then one violation; reads
/// what the node sends until the stream ends.
async fn violate(stream: &mut TcpStream, key: &Keypair, seed: u64, rng: &mut ChaCha20Rng) -> End {
    let Some(mut session) = handshake_as(stream, key, rng).await else {
        // Refused during the handshake (revoked meanwhile, too many connections).
        return End::Closed(None, false);
    };
    let (_, send) = violation(seed);
    let frame = match send {
        None => Some(Vec::new()),
        Some(plain) => seal(&mut session, &plain),
    };
    let Some(frame) = frame else {
        return End::Unreachable;
    };
    if write_frame(stream, &frame).await.is_err() {
        return End::Closed(None, false);
    }
    let mut reassembler = Reassembler::new(1 << 20);
    let mut last = None;
    while let Some(frame) = read_frame(stream).await {
        let Some(plain) = open(&mut session, &frame) else {
            drain(stream).await;
            return End::Closed(None, true);
        };
        match reassembler.push(&plain) {
            Ok(Reassembled::Message(m)) => last = Some(m),
            Ok(Reassembled::Pending) => {}
            Ok(Reassembled::Oversized { .. }) | Err(_) => {
                drain(stream).await;
                return End::Closed(None, true);
            }
        }
    }
    End::Closed(last, false)
}

/// An insider replays an old address record: a valid session whose hello speaks records,
/// one Records message, then a while to let the node take (or refuse) it, then hangs up.
/// The records judge checks that no node ever goes back to an older record.
async fn replay(
    stream: &mut TcpStream,
    key: &Keypair,
    record: bytes::Bytes,
    rng: &mut ChaCha20Rng,
) -> End {
    use p2p_handler::wire::{FEATURE_MEMBERSHIP, FEATURE_RECORDS};
    let hello = hello_with(FEATURE_MEMBERSHIP | FEATURE_RECORDS);
    let Some(mut session) = handshake_with(stream, key, rng, hello).await else {
        return End::Closed(None, false);
    };
    let message = Message::Records {
        records: vec![record],
    };
    for chunk in chunk_message(&message) {
        let Some(frame) = seal(&mut session, &chunk) else {
            return End::Unreachable;
        };
        if write_frame(stream, &frame).await.is_err() {
            return End::Closed(None, false);
        }
    }
    // Whatever the node answers (its own seqs, records), read for a while, then go.
    let _ = tokio::time::timeout(REPLAY_LINGER, drain(stream)).await;
    End::Left
}

/// How long a replaying insider stays after sending its record.
const REPLAY_LINGER: Duration = Duration::from_millis(500);

/// The judge's `hostile` rule over every attack of the run.
pub(super) fn judge(s: &Shared, lossy: bool, failures: &mut Vec<String>) {
    for r in &s.attacks {
        let target = &s.names[r.target];
        let what = format!("step {} ({} attack on {target})", r.step + 1, r.kind.name());
        // A crash or restart meanwhile ends streams its own way.
        let excused = lossy || s.nodes[r.target].incarnation != r.incarnation;
        if excused {
            continue;
        }
        if r.kept_open > 0 {
            failures.push(format!(
                "hostile: {what}: {target} kept {} of mallory's connections open for {:?} \
                 (its handshake or idle timeout, and {SLACK:?})",
                r.kept_open, r.bound
            ));
        }
        let (Some(insider), Some(violation)) = (r.insider, r.violation) else {
            continue;
        };
        if r.closed == 0 || r.unreadable {
            continue;
        }
        let told = matches!(
            r.last_message,
            Some(Message::Close {
                reason: CloseReason::ProtocolViolation
            })
        );
        if !told {
            failures.push(format!(
                "hostile: {what}: {target} ended {}'s session after {violation} without \
                 Close(ProtocolViolation) (last message: {})",
                s.names[insider],
                r.last_message
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), |m| format!("{m:?}"))
            ));
        }
        let peer = s.keys[insider].peer_id();
        let reported = s
            .peer_error_log
            .iter()
            .any(|&(at, node, p)| node == r.target && p == Some(peer) && at >= r.started);
        if !reported {
            failures.push(format!(
                "hostile: {what}: {target} reported no peer error naming {} after {violation}",
                s.names[insider]
            ));
        }
    }
}

/// The bound a node has to close a hostile connection.
pub(super) fn bound(handshake_timeout: Duration, max_latency: Duration) -> Duration {
    handshake_timeout + SLACK + 4 * max_latency
}
