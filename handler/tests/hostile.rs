//! A node under attack over real TCP on 127.0.0.x: strangers holding sockets open or
//! stalling handshakes must never lock allowed peers out. Counts completions, never times
//! anything; every wait is bounded by a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test helpers may panic: that is a failed test.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::RawPeer;
use p2p_handler::noise::{HandshakeRole, handshake};
use p2p_handler::wire::{Hello, PROTOCOL_VERSION};
use p2p_handler::{AllowList, Config, Event, Handler, Keypair, P2pHandler, TcpTransport};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// Deadline for the whole protected workload; generous for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(120);
/// Sockets the attacker holds at once.
const SOCKETS: usize = 1_500;
/// Source addresses the attacker spreads them over (127.0.1.1 ...).
const SOURCES: usize = 64;
/// Exchanges the allowed peer must complete during the attack.
const EXCHANGES: usize = 100;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Attack {
    /// Connect and never send a byte.
    Silent,
    /// Send a valid Noise message 1, then nothing.
    StalledAfterMsg1,
}

fn keys(seed: u64, n: usize) -> Vec<Keypair> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n).map(|_| Keypair::generate(&mut rng)).collect()
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
struct Tally {
    connects: AtomicU64,
    closed_by_target: AtomicU64,
}

/// Holds `SOCKETS` connections to `target`, each re-opened as soon as the target closes it,
/// until `stop` turns true. Returns once all of them are open for the first time.
async fn start_attack(
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

/// An allowed peer completes `EXCHANGES` fresh-connection exchanges with a node under
/// `attack`; every one must end in a Reply.
async fn allowed_peer_gets_through(attack: Attack) {
    let k = keys(40, 2);
    let localhost: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (bob, mut bob_inbox) = Handler::spawn(
        TcpTransport,
        localhost,
        k[1].clone(),
        AllowList::from_peers([k[0].peer_id()]),
        Config::default(),
        [2; 32],
    )
    .await
    .unwrap();
    let (alice, mut alice_inbox) = Handler::spawn(
        TcpTransport,
        localhost,
        k[0].clone(),
        AllowList::from_peers([k[1].peer_id()]),
        Config::default(),
        [1; 32],
    )
    .await
    .unwrap();
    // Bob's application echoes.
    let responder = bob.clone();
    let echo = tokio::spawn(async move {
        while let Some(event) = bob_inbox.received.recv().await {
            if let Event::Request {
                peer,
                exchange,
                payload,
                ..
            } = event
            {
                let _ = responder.response_to(peer, exchange, payload).await;
            }
        }
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (tally, mut attackers) = start_attack(bob.local_addr(), attack, stop_rx).await;

    let run = async {
        let mut replies = 0;
        let mut failures = Vec::new();
        for i in 0..EXCHANGES {
            let id = alice
                .request(bob.local_peer_id(), bob.local_addr(), format!("{i}"))
                .await
                .unwrap();
            // Exactly one outcome, on the receive channel: a Reply or a Failed. Alice never
            // reads her priority channel, as an application may not.
            loop {
                match alice_inbox.received.recv().await {
                    Some(Event::Reply { exchange, .. }) => {
                        assert_eq!(exchange, id);
                        replies += 1;
                        break;
                    }
                    Some(Event::Failed {
                        exchange, failure, ..
                    }) => {
                        assert_eq!(exchange, id);
                        failures.push(failure);
                        break;
                    }
                    Some(_) => {}
                    None => panic!("Alice's handler stopped"),
                }
            }
        }
        (replies, failures)
    };
    let (replies, failures) = tokio::time::timeout(WAIT, run)
        .await
        .expect("the allowed peer's exchanges finish");
    let status = bob.status().await.unwrap();
    stop_tx.send(true).unwrap();
    while attackers.join_next().await.is_some() {}

    assert_eq!(
        (replies, failures),
        (EXCHANGES, vec![]),
        "every exchange of the allowed peer ends in a Reply under {attack:?}"
    );
    assert!(
        tally.connects.load(Ordering::Relaxed) >= SOCKETS as u64,
        "the attack held its sockets"
    );
    // The unauthenticated budget did the work: strangers were evicted to make room.
    assert!(status.evicted_unauthenticated > 0, "{status:?}");
    // Once the attacker lets go, nothing of it stays behind.
    let gone = async {
        while bob.status().await.unwrap().connection_tasks > 0 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(WAIT, gone)
        .await
        .expect("every connection task ends after the attack");
    echo.abort();
}

// One test for both attacks, run one after the other: two attackers at once would measure
// the machine, not the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_holding_sockets_or_stalling_handshakes_do_not_lock_out_allowed_peers() {
    allowed_peer_gets_through(Attack::Silent).await;
    allowed_peer_gets_through(Attack::StalledAfterMsg1).await;
}

/// Bob completes the handshake and then never reads again, holding his socket open. Alice's
/// 64 MiB request fills the socket buffers and her connection task blocks writing. Whatever
/// ends her exchange first, the connection task must end with it, not when the kernel gives
/// up on a socket the peer keeps open.
fn a_peer_that_stops_reading(config: Config) {
    let k = keys(41, 2);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let bob_addr = listener.local_addr().unwrap();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let bob_key = k[1].clone();
    let bob = std::thread::spawn(move || {
        let peer = RawPeer::accept(&listener, &bob_key, 1 << 30);
        release_rx.recv().ok();
        drop(peer);
    });
    let alice = P2pHandler::with_seed(
        "127.0.0.1:0",
        k[0].clone(),
        AllowList::from_peers([k[1].peer_id()]),
        config,
        [5; 32],
    )
    .unwrap();
    let id = alice
        .request(k[1].peer_id(), bob_addr, vec![7u8; 64 << 20])
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match alice.receive_timeout(left) {
            Some(Event::Failed { exchange, .. }) if exchange == id => break,
            Some(_) => continue,
            None => panic!("the exchange with a peer that does not read never failed"),
        }
    }
    // Bob still holds the socket; Alice's task for it must be gone all the same.
    while alice.status().unwrap().connection_tasks > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection task stayed blocked in its write"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    release_tx.send(()).unwrap();
    bob.join().unwrap();
}

/// The exchange gives up first (ack timeout): the endpoint's close reaches the task blocked
/// in its write. The stall deadline is out of reach here, so only the close can free it.
#[test]
fn a_peer_that_stops_reading_is_abandoned_when_the_exchange_gives_up() {
    a_peer_that_stops_reading(Config {
        max_message_size: 64 << 20,
        max_attempts: 1,
        write_stall_timeout: Duration::from_secs(3_600),
        ..Config::default()
    });
}

/// No timer of the exchange fires for a long time (a patient dialer): the write stall
/// deadline frees the connection, and the exchange fails as a lost connection.
#[test]
fn a_peer_that_stops_reading_is_abandoned_when_the_write_stalls() {
    a_peer_that_stops_reading(Config {
        max_message_size: 64 << 20,
        max_attempts: 1,
        ack_timeout: Duration::from_secs(3_600),
        write_stall_timeout: Duration::from_secs(1),
        ..Config::default()
    });
}
