//! Large messages over a slow link, over real TCP on 127.0.0.1: a relay between the two
//! nodes passes bytes at a fixed rate in each direction, so a message takes many times the
//! handler's timeouts to cross. A message still arriving must count as activity (no
//! `Close{Idle}`, no retry), and the exchange must complete once. Counts outcomes, asserts no
//! timing.
//!
//! The quick test runs in the README's test command; the one with the figures (16
//! MiB at 100 KiB/s, the default settings, nearly three minutes) is ignored by default and
//! run by `.ci/run`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use p2p_handler::{AllowList, Config, Event, Handler, Inbox, Keypair, Options, TcpTransport};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Copies `from` to `to` at `rate` bytes a second: reads at most a twentieth of a second's
/// worth at a time, and waits as long as those bytes take at that rate (a quiet spell saves
/// up nothing). Shaping, not synchronisation: the test waits for outcomes, never for this.
async fn throttle(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rate: usize,
) {
    let mut buf = vec![0u8; (rate / 20).max(1)];
    let mut next = tokio::time::Instant::now();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        next =
            next.max(tokio::time::Instant::now()) + Duration::from_secs_f64(n as f64 / rate as f64);
        tokio::time::sleep_until(next).await;
    }
    let _ = to.shutdown().await;
}

/// A relay listening on 127.0.0.1 that forwards each connection to `target` at `rate` bytes
/// a second each way. Returns its address.
async fn slow_link(target: SocketAddr, rate: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = TcpStream::connect(target).await else {
                continue;
            };
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::spawn(throttle(in_read, out_write, rate));
            tokio::spawn(throttle(out_read, in_write, rate));
        }
    });
    addr
}

async fn node(key: &Keypair, peer: &Keypair, config: &Config, seed: u8) -> (Handler, Inbox) {
    Handler::spawn_with(
        TcpTransport,
        "127.0.0.1:0".parse().unwrap(),
        key.clone(),
        AllowList::from_peers([peer.peer_id()]),
        Options::new(config.clone(), [seed; 32]).incarnation(u64::from(seed)),
    )
    .await
    .unwrap()
}

/// Alice sends `request` bytes to Bob through a link of `rate` bytes a second; Bob answers
/// with `reply` bytes. Both must arrive once, with no retry and no connection lost.
async fn across(config: Config, rate: usize, request: usize, reply: usize) {
    let mut rng = ChaCha20Rng::seed_from_u64(80);
    let (alice_key, bob_key) = (Keypair::generate(&mut rng), Keypair::generate(&mut rng));
    let (bob, mut bob_in) = node(&bob_key, &alice_key, &config, 2).await;
    let (alice, mut alice_in) = node(&alice_key, &bob_key, &config, 1).await;
    let link = slow_link(bob.local_addr(), rate).await;
    let payload = Bytes::from(vec![7u8; request]);
    let id = alice
        .request(bob.local_peer_id(), link, payload.clone())
        .await
        .unwrap();
    // Nothing else may come first: no failure, no second delivery.
    let Event::Request {
        peer,
        exchange,
        payload: delivered,
        ..
    } = bob_in.received.recv().await.unwrap()
    else {
        panic!("Bob's first event is not the request");
    };
    bob.response_to(peer, exchange, Bytes::from(vec![9u8; reply]))
        .await
        .unwrap();
    assert_eq!(delivered, payload, "the request arrived whole");
    let event = alice_in.received.recv().await.unwrap();
    let Event::Reply {
        exchange,
        payload: answer,
        ..
    } = event
    else {
        panic!("Alice: {event:?}");
    };
    assert_eq!(exchange, id);
    assert_eq!(answer.len(), reply);
    // Bob hears that his reply was taken, not that it went unconfirmed.
    loop {
        match bob_in.received.recv().await.unwrap() {
            Event::ResponseDelivered { exchange, .. } if exchange == id => break,
            Event::ResponseDelivered { .. } => {}
            other => panic!("Bob: {other:?}"),
        }
    }
    let (a, b) = (alice.status().await.unwrap(), bob.status().await.unwrap());
    assert_eq!(
        (a.stats.resends, a.stats.redials, b.stats.requests_delivered),
        (0, 0, 1),
        "one attempt, one connection, one delivery: {a:?} {b:?}"
    );
}

/// Through 1 MiB/s, 8 MiB one way and 3 MiB back: transfers of eight and three seconds,
/// against an ack timeout of half a second and idle, reply, reply-ack and write-stall
/// timeouts of one. The request is larger than the kernel's buffers, so the sender's
/// write waits on the relay for seconds while the relay keeps taking bytes: progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_many_timeouts_long_crosses_a_slow_link_both_ways() {
    let config = Config {
        max_message_size: 8 << 20,
        ack_timeout: Duration::from_millis(500),
        reply_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_millis(800),
        reply_ack_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        write_stall_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    tokio::time::timeout(
        Duration::from_secs(300),
        across(config, 1 << 20, 8 << 20, 3 << 20),
    )
    .await
    .expect("the exchange ends");
}

/// The figure: 16 MiB at 100 KiB/s, with the default settings (about 165 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: .ci/run runs it (cargo test -p p2p-handler --test slow_link -- --ignored)"]
async fn sixteen_mib_at_100_kib_per_second_with_the_defaults() {
    tokio::time::timeout(
        Duration::from_secs(900),
        across(Config::default(), 100 << 10, 16 << 20, 16),
    )
    .await
    .expect("the exchange ends");
}
