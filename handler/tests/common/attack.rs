//! The attacker of the hardening tests and of the benchmark that measures an allowed peer
//! under attack: strangers holding many sockets open, silent or stalled after a valid
//! handshake message 1, or sending garbage first messages as fast as the target closes
//! them; each socket is re-opened as soon as the target closes it. From 64 addresses of
//! their own, or from the allowed peer's own address (one NAT, one cloud egress).
//! Loopback only.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use p2p_handler::Keypair;
use p2p_handler::noise::{HandshakeRole, handshake};
use p2p_handler::wire::{Hello, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// Sockets the attacker holds at once.
pub(crate) const SOCKETS: usize = 1_500;
/// Source addresses the attacker spreads them over (127.0.1.1 ...).
pub(crate) const SOURCES: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Attack {
    /// Connect and never send a byte.
    Silent,
    /// Send a valid Noise message 1, then nothing.
    StalledAfterMsg1,
    /// Send a first message of garbage, and again on a new socket once it is closed.
    Garbage,
    /// Send a first message of garbage, close at once, and again on a new socket: a flood
    /// of connections as fast as the attacker's thread can open them.
    GarbageFlood,
}

/// Where the attacking sockets come from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Sources {
    /// [`SOURCES`] addresses of their own (127.0.1.1 ...).
    Spread,
    /// 127.0.0.1, the allowed peer's own address.
    Shared,
}

fn source(i: usize, sources: Sources) -> IpAddr {
    match sources {
        Sources::Spread => IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + (i % SOURCES) as u8)),
        Sources::Shared => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

/// A first message of garbage with its length prefix: no Noise message, no valid mac1.
fn garbage(seed: u8) -> Vec<u8> {
    let mut out = 200u16.to_be_bytes().to_vec();
    out.extend((0..200u32).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    out
}

/// A valid handshake message 1 with its length prefix, from a throwaway key.
fn msg1(seed: u8) -> Vec<u8> {
    let key = Keypair::from_private_bytes([seed.max(1); 32]);
    let mut hs = handshake(&key, HandshakeRole::Initiator, [seed; 32]).unwrap();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        max_message_size: 1024,
        progress_ms: 0,
        features: 0,
    }
    .encode();
    let mut buf = [0u8; 256];
    let n = hs.write_message(&hello, &mut buf).unwrap();
    let mut out = (n as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&buf[..n]);
    out
}

async fn connect_from(ip: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    if ip == target.ip() {
        // The kernel picks the port knowing the destination: no bind, no early exhaustion.
        return TcpStream::connect(target).await;
    }
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(target).await
}

/// What the attacker managed.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) connects: AtomicU64,
    pub(crate) closed_by_target: AtomicU64,
}

/// The attacker's thread: its own single-threaded runtime, so that at full speed it takes
/// at most one core's worth of the machine (as an attacker elsewhere would take the node's
/// network stack, not its scheduler) and never queues the target's tasks behind its own.
pub(crate) struct Attacker {
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Attacker {
    /// Waits for every attacking task to end (after `stop` turned true).
    pub(crate) async fn join(self) {
        let _ = self.done.await;
    }
}

/// Holds `SOCKETS` connections to `target` from `sources`, each re-opened as soon as the
/// target closes it, until `stop` turns true. Returns once all of them are open for the
/// first time.
pub(crate) async fn start_attack(
    target: SocketAddr,
    attack: Attack,
    sources: Sources,
    stop: watch::Receiver<bool>,
) -> (Arc<Tally>, Attacker) {
    let tally = Arc::new(Tally::default());
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<()>(SOCKETS);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let counts = tally.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the attacker's runtime");
        runtime.block_on(attack_all(target, attack, sources, stop, counts, opened_tx));
        let _ = done_tx.send(());
    });
    for _ in 0..SOCKETS {
        opened_rx
            .recv()
            .await
            .expect("every attacking socket opens once");
    }
    (tally, Attacker { done })
}

async fn attack_all(
    target: SocketAddr,
    attack: Attack,
    sources: Sources,
    stop: watch::Receiver<bool>,
    tally: Arc<Tally>,
    opened_tx: tokio::sync::mpsc::Sender<()>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..SOCKETS {
        let (tally, mut stop, opened) = (tally.clone(), stop.clone(), opened_tx.clone());
        let first = match attack {
            Attack::Silent => Vec::new(),
            Attack::StalledAfterMsg1 => msg1(i as u8),
            Attack::Garbage | Attack::GarbageFlood => garbage(i as u8),
        };
        tasks.spawn(async move {
            let mut opening = true;
            while !*stop.borrow() {
                let Ok(mut stream) = connect_from(source(i, sources), target).await else {
                    // The target's accept queue overflowed; try again.
                    tokio::task::yield_now().await;
                    continue;
                };
                tally.connects.fetch_add(1, Ordering::Relaxed);
                if !first.is_empty() {
                    let _ = stream.write_all(&first).await;
                }
                if std::mem::take(&mut opening) {
                    let _ = opened.send(()).await;
                }
                if attack == Attack::GarbageFlood {
                    drop(stream);
                    tokio::task::yield_now().await;
                    continue;
                }
                let mut sink = [0u8; 512];
                loop {
                    tokio::select! {
                        biased;
                        _ = stop.changed() => return,
                        read = stream.read(&mut sink) => match read {
                            // Message 2 of a stalled handshake: keep reading.
                            Ok(n) if n > 0 => continue,
                            _ => break,
                        },
                    }
                }
                tally.closed_by_target.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    drop(opened_tx);
    while tasks.join_next().await.is_some() {}
}
