//! The attacker of the hardening tests and of the benchmark that measures an allowed peer
//! under attack: strangers holding many sockets open, silent or stalled after a valid
//! handshake message 1, each re-opened as soon as the target closes it. Loopback only.

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
}

fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + (i % SOURCES) as u8))
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

/// Holds `SOCKETS` connections to `target`, each re-opened as soon as the target closes it,
/// until `stop` turns true. Returns once all of them are open for the first time.
pub(crate) async fn start_attack(
    target: SocketAddr,
    attack: Attack,
    stop: watch::Receiver<bool>,
) -> (Arc<Tally>, tokio::task::JoinSet<()>) {
    let tally = Arc::new(Tally::default());
    let mut tasks = tokio::task::JoinSet::new();
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<()>(SOCKETS);
    for i in 0..SOCKETS {
        let (tally, mut stop, opened) = (tally.clone(), stop.clone(), opened_tx.clone());
        let hello = msg1(i as u8);
        tasks.spawn(async move {
            let mut first = true;
            while !*stop.borrow() {
                let Ok(mut stream) = connect_from(source(i), target).await else {
                    // The target's accept queue overflowed; try again.
                    tokio::task::yield_now().await;
                    continue;
                };
                tally.connects.fetch_add(1, Ordering::Relaxed);
                if attack == Attack::StalledAfterMsg1 {
                    let _ = stream.write_all(&hello).await;
                }
                if std::mem::take(&mut first) {
                    let _ = opened.send(()).await;
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
    for _ in 0..SOCKETS {
        opened_rx
            .recv()
            .await
            .expect("every attacking socket opens once");
    }
    (tally, tasks)
}
