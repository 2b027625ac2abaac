//! Integration tests over real TCP on 127.0.0.1: port 0, no fixed ports, and no sleeps used
//! as synchronisation (every wait is for an event or a condition, bounded by a deadline
//! generous enough for a loaded machine).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test helpers may panic: that is a failed test.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use p2p_handler::endpoint::{Failure, PeerError};
use p2p_handler::wire::{AbortReason, CloseReason};
use p2p_handler::{
    AllowList, Config, ConnError, Event, Handler, Keypair, Notice, P2pHandler, TcpTransport,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const WAIT: Duration = Duration::from_secs(30);

fn keys(seed: u64, n: usize) -> Vec<Keypair> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n).map(|_| Keypair::generate(&mut rng)).collect()
}

fn allow(peers: &[&Keypair]) -> AllowList {
    AllowList::from_peers(peers.iter().map(|k| k.peer_id()))
}

fn node(key: &Keypair, peers: &[&Keypair], config: Config) -> P2pHandler {
    P2pHandler::with_seed("127.0.0.1:0", key.clone(), allow(peers), config, [7; 32]).unwrap()
}

/// Waits for a priority notice matching `pred`, skipping others.
fn wait_notice(node: &P2pHandler, mut pred: impl FnMut(&Notice) -> bool) -> Notice {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let notice = node
            .priority_timeout(left)
            .expect("notice before the deadline");
        if pred(&notice) {
            return notice;
        }
    }
}

/// Waits for an event on the receive channel matching `pred`, skipping others. Outcomes
/// (replies and failures) come there.
fn wait_event(node: &P2pHandler, mut pred: impl FnMut(&Event) -> bool) -> Event {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = node
            .receive_timeout(left)
            .expect("event before the deadline");
        if pred(&event) {
            return event;
        }
    }
}

/// Waits until `cond` holds, checking after every scheduler turn of a few milliseconds.
fn eventually(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "condition not reached in {WAIT:?}"
        );
        std::thread::yield_now();
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The next request or reply, skipping confirmations that our own replies arrived.
fn next_received(node: &P2pHandler) -> Option<Event> {
    loop {
        match node.receive_timeout(WAIT) {
            Some(Event::ResponseDelivered { .. }) => continue,
            other => return other,
        }
    }
}

fn expect_request(node: &P2pHandler) -> (p2p_handler::PeerId, p2p_handler::ExchangeId, Bytes) {
    match next_received(node) {
        Some(Event::Request {
            peer,
            exchange,
            payload,
            ..
        }) => (peer, exchange, payload),
        other => panic!("expected a request, got {other:?}"),
    }
}

fn expect_reply(node: &P2pHandler) -> (p2p_handler::ExchangeId, Bytes) {
    match next_received(node) {
        Some(Event::Reply {
            exchange, payload, ..
        }) => (exchange, payload),
        other => panic!("expected a reply, got {other:?}"),
    }
}

/// One exchange from `from` to `to`, whose application echoes; checks the ids line up.
fn echo_exchange(from: &P2pHandler, to: &P2pHandler, payload: String) {
    let id = from
        .request(to.local_peer_id(), to.local_address(), payload)
        .unwrap();
    let (peer, exchange, payload) = expect_request(to);
    assert_eq!(exchange, id);
    to.response_to(peer, exchange, payload).unwrap();
    assert_eq!(expect_reply(from).0, id);
}

#[test]
fn request_and_reply_over_tcp() {
    let k = keys(1, 2);
    let alice = node(&k[0], &[&k[1]], Config::default());
    let bob = node(&k[1], &[&k[0]], Config::default());
    assert_ne!(
        bob.local_address().port(),
        0,
        "port 0 reports the bound port"
    );
    let id = alice
        .request(bob.local_peer_id(), bob.local_address(), &b"ping"[..])
        .unwrap();
    let Some(Event::Request {
        peer,
        exchange,
        payload,
        addr,
        redelivered: false,
    }) = bob.receive_timeout(WAIT)
    else {
        panic!("no request");
    };
    assert_eq!(
        (peer, exchange, &payload[..]),
        (alice.local_peer_id(), id, &b"ping"[..])
    );
    assert_eq!(addr.ip(), alice.local_address().ip());
    assert_eq!(bob.response(peer, &b"pong"[..]).unwrap(), id);
    let Some(Event::Reply {
        peer,
        exchange,
        payload,
        addr,
        redelivered: false,
    }) = alice.receive_timeout(WAIT)
    else {
        panic!("no reply");
    };
    assert_eq!(
        (peer, exchange, payload),
        (bob.local_peer_id(), id, Bytes::from_static(b"pong"))
    );
    assert_eq!(addr, bob.local_address());
    // The responder learns its reply arrived.
    assert!(matches!(
        bob.receive_timeout(WAIT),
        Some(Event::ResponseDelivered { exchange, .. }) if exchange == id
    ));
    assert!(alice.check_receive().is_none(), "exactly one outcome");
    let report = alice.shutdown();
    assert!(report.failed.is_empty());
    bob.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_peers_times_twenty_exchanges_none_lost_or_duplicated() {
    const PEERS: usize = 50;
    const EACH: usize = 20;
    let k = keys(2, PEERS + 1);
    let server_key = k[PEERS].clone();
    let clients: Vec<Keypair> = k[..PEERS].to_vec();
    let localhost: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (server, mut server_inbox) = Handler::spawn(
        TcpTransport,
        localhost,
        server_key.clone(),
        AllowList::from_peers(clients.iter().map(Keypair::peer_id)),
        Config::default(),
        [1; 32],
    )
    .await
    .unwrap();
    // The server application: answer every request with its payload reversed.
    let responder = server.clone();
    let serve = tokio::spawn(async move {
        let mut seen = BTreeSet::new();
        while let Some(event) = server_inbox.received.recv().await {
            if let Event::Request {
                peer,
                exchange,
                payload,
                ..
            } = event
            {
                assert!(seen.insert((peer, exchange)), "duplicate delivery");
                let mut reply = payload.to_vec();
                reply.reverse();
                responder.response_to(peer, exchange, reply).await.unwrap();
                if seen.len() == PEERS * EACH {
                    return seen.len();
                }
            }
        }
        seen.len()
    });
    let mut tasks = Vec::new();
    for (i, key) in clients.into_iter().enumerate() {
        let server_id = server_key.peer_id();
        let server_addr = server.local_addr();
        tasks.push(tokio::spawn(async move {
            let (client, mut inbox) = Handler::spawn(
                TcpTransport,
                localhost,
                key,
                AllowList::from_peers([server_id]),
                Config::default(),
                [i as u8; 32],
            )
            .await
            .unwrap();
            let mut expected = std::collections::BTreeMap::new();
            for j in 0..EACH {
                let payload = format!("{i}:{j}");
                let id = client
                    .request(server_id, server_addr, payload.clone())
                    .await
                    .unwrap();
                expected.insert(id, payload.chars().rev().collect::<String>());
            }
            while !expected.is_empty() {
                match tokio::time::timeout(WAIT, inbox.received.recv()).await {
                    Ok(Some(Event::Reply {
                        exchange, payload, ..
                    })) => {
                        let want = expected.remove(&exchange).expect("one reply per exchange");
                        assert_eq!(payload, Bytes::from(want));
                    }
                    other => panic!("client {i}: {other:?}"),
                }
            }
            assert!(
                inbox.priority.try_recv().is_err(),
                "no failure for client {i}"
            );
            client.shutdown().await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(serve.await.unwrap(), PEERS * EACH);
    let status = server.status().await.unwrap();
    assert_eq!(status.stats.requests_delivered, (PEERS * EACH) as u64);
    assert_eq!(status.stats.duplicates_dropped, 0);
    server.shutdown().await.unwrap();
}

#[test]
fn requests_queued_to_a_busy_peer_arrive_in_order() {
    let k = keys(3, 2);
    let alice = node(&k[0], &[&k[1]], Config::default());
    let bob = node(&k[1], &[&k[0]], Config::default());
    let ids: Vec<_> = (0..5)
        .map(|i| {
            alice
                .request(bob.local_peer_id(), bob.local_address(), format!("m{i}"))
                .unwrap()
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let (peer, exchange, payload) = expect_request(&bob);
        assert_eq!((exchange, payload), (*id, Bytes::from(format!("m{i}"))));
        // One exchange at a time: the next request waits for this answer.
        assert!(!matches!(bob.check_receive(), Some(Event::Request { .. })));
        bob.response(peer, format!("r{i}")).unwrap();
        assert_eq!(expect_reply(&alice), (*id, Bytes::from(format!("r{i}"))));
    }
}

#[test]
fn full_inbox_nacks_and_the_resend_gets_through() {
    let k = keys(4, 3);
    let small_inbox = Config {
        max_pending_inbound: 1,
        ..Config::default()
    };
    let bob = node(&k[1], &[&k[0], &k[2]], small_inbox);
    let alice = node(&k[0], &[&k[1]], Config::default());
    let carol = node(&k[2], &[&k[1]], Config::default());
    let a = alice
        .request(bob.local_peer_id(), bob.local_address(), &b"first"[..])
        .unwrap();
    let (from, exchange, _) = expect_request(&bob);
    assert_eq!((from, exchange), (alice.local_peer_id(), a));
    // Bob's inbox is full: Carol is Nacked and keeps retrying.
    let c = carol
        .request(bob.local_peer_id(), bob.local_address(), &b"second"[..])
        .unwrap();
    eventually(|| carol.status().unwrap().stats.nacks_received >= 1);
    bob.response(from, &b"done"[..]).unwrap();
    let (from, exchange, payload) = expect_request(&bob);
    assert_eq!(
        (from, exchange, &payload[..]),
        (carol.local_peer_id(), c, &b"second"[..])
    );
    bob.response(from, &b"done too"[..]).unwrap();
    assert_eq!(expect_reply(&carol).0, c);
    assert_eq!(expect_reply(&alice).0, a);
    assert!(carol.status().unwrap().stats.resends >= 1);
}

#[test]
fn responder_restarted_mid_exchange_redial_and_completion() {
    let k = keys(5, 2);
    let patient = Config {
        max_attempts: 40,
        backoff_max: Duration::from_millis(200),
        ..Config::default()
    };
    let alice = node(&k[0], &[&k[1]], patient);
    // Bob runs on a runtime we can kill without a graceful shutdown: a crash.
    let start_bob = |addr: SocketAddr| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (handler, inbox) = rt
            .block_on(Handler::spawn(
                TcpTransport,
                addr,
                k[1].clone(),
                allow(&[&k[0]]),
                Config::default(),
                [2; 32],
            ))
            .unwrap();
        (rt, handler, inbox)
    };
    let (rt, bob, mut inbox) = start_bob("127.0.0.1:0".parse().unwrap());
    let bob_addr = bob.local_addr();
    let id = alice
        .request(bob.local_peer_id(), bob_addr, &b"survive"[..])
        .unwrap();
    let got = rt.block_on(async { tokio::time::timeout(WAIT, inbox.received.recv()).await });
    assert!(matches!(got, Ok(Some(Event::Request { .. }))));
    // Crash: every task is dropped where it stands, no goodbye sent. (Waiting for the
    // worker threads only makes sure the listening socket is gone before the restart.)
    rt.shutdown_timeout(WAIT);
    let (rt, bob, mut inbox) = start_bob(bob_addr);
    let answered = rt.block_on(async {
        let event = tokio::time::timeout(WAIT, inbox.received.recv()).await;
        let Ok(Some(Event::Request { peer, exchange, .. })) = event else {
            panic!("restarted bob got {event:?}");
        };
        bob.response_to(peer, exchange, &b"back"[..]).await.unwrap();
        exchange
    });
    assert_eq!(answered, id, "the same exchange, redialed");
    assert_eq!(expect_reply(&alice), (id, Bytes::from_static(b"back")));
    assert!(alice.status().unwrap().stats.redials >= 1);
    rt.block_on(bob.shutdown()).unwrap();
}

#[test]
fn idle_connection_is_closed() {
    let k = keys(6, 2);
    let reuse = Config {
        reuse_connections: true,
        idle_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let alice = node(&k[0], &[&k[1]], reuse.clone());
    let bob = node(&k[1], &[&k[0]], reuse);
    alice
        .request(bob.local_peer_id(), bob.local_address(), &b"x"[..])
        .unwrap();
    let (peer, _, _) = expect_request(&bob);
    bob.response(peer, &b"y"[..]).unwrap();
    expect_reply(&alice);
    assert_eq!(
        alice.status().unwrap().open_connections,
        1,
        "kept for reuse"
    );
    eventually(|| alice.status().unwrap().open_connections == 0);
    eventually(|| bob.status().unwrap().open_connections == 0);
    eventually(|| alice.status().unwrap().connection_tasks == 0);
}

#[test]
fn peer_not_on_the_allow_list_is_rejected() {
    let k = keys(7, 2);
    let carol = node(&k[0], &[&k[1]], Config::default());
    let bob = node(&k[1], &[], Config::default());
    let id = carol
        .request(bob.local_peer_id(), bob.local_address(), &b"let me in"[..])
        .unwrap();
    let failed = wait_event(&carol, |e| matches!(e, Event::Failed { .. }));
    let Event::Failed {
        exchange,
        failure,
        payload,
        ..
    } = failed
    else {
        unreachable!()
    };
    assert_eq!(exchange, id);
    assert_eq!(failure, Failure::Rejected(CloseReason::NotAllowed));
    assert_eq!(payload, Bytes::from_static(b"let me in"));
    let error = wait_notice(&bob, |n| matches!(n, Notice::Event(Event::PeerError(_))));
    let text = format!("{error:?}");
    assert!(text.contains(&carol.local_peer_id().short()), "{text}");
    assert!(bob.check_receive().is_none());
}

#[test]
fn impostor_key_at_a_dialed_address_is_rejected() {
    let k = keys(8, 3);
    let alice = node(&k[0], &[&k[1], &k[2]], Config::default());
    let mallory = node(&k[2], &[&k[0]], Config::default());
    // Alice believes Bob lives at Mallory's address.
    let bob_id = k[1].peer_id();
    let id = alice
        .request(bob_id, mallory.local_address(), &b"secret"[..])
        .unwrap();
    let failed = wait_event(&alice, |e| matches!(e, Event::Failed { .. }));
    let Event::Failed {
        exchange,
        failure: Failure::Connection(ConnError::Impostor { actual, remote }),
        payload,
        ..
    } = failed
    else {
        panic!("{failed:?}");
    };
    assert_eq!((exchange, actual), (id, mallory.local_peer_id()));
    assert_eq!(remote.peer, Some(bob_id));
    assert_eq!(payload, Bytes::from_static(b"secret"));
    assert!(
        mallory.check_receive().is_none(),
        "the impostor never sees it"
    );
}

/// A node whose allow list carries its peers' keys (as a membership document's does).
fn node_knowing_keys(key: &Keypair, peers: &[&Keypair]) -> P2pHandler {
    let allow = AllowList::from_keys(peers.iter().map(|k| *k.public_bytes()));
    P2pHandler::with_seed(
        "127.0.0.1:0",
        key.clone(),
        allow,
        Config::default(),
        [7; 32],
    )
    .unwrap()
}

#[test]
fn nodes_that_know_each_others_keys_exchange_over_ik() {
    let k = keys(21, 2);
    let alice = node_knowing_keys(&k[0], &[&k[1]]);
    let bob = node_knowing_keys(&k[1], &[&k[0]]);
    for i in 0..3 {
        echo_exchange(&alice, &bob, format!("over ik {i}"));
        echo_exchange(&bob, &alice, format!("back {i}"));
    }
    let (a, b) = (alice.status().unwrap().stats, bob.status().unwrap().stats);
    assert_eq!((a.ik_dials, b.ik_dials), (a.dials, b.dials), "{a:?} {b:?}");
    assert!(a.dials >= 1 && b.dials >= 1);
    // Each fresh connection's Request rode in message 1, and each was taken, or refused
    // and sent again on the session (one sent in the very millisecond the responder
    // started is refused: it cannot be told from a recording made before a restart).
    assert_eq!(a.early_requests_sent, a.dials, "{a:?}");
    assert_eq!(
        b.early_requests_taken + b.early_requests_refused,
        a.early_requests_sent,
        "{b:?}"
    );
    assert!(b.early_requests_taken >= 1, "{b:?}");
    alice.shutdown();
    bob.shutdown();
}

#[test]
fn an_impostor_at_a_known_keys_address_fails_ik_silently_and_is_named_by_xx() {
    let k = keys(22, 3);
    let alice = node_knowing_keys(&k[0], &[&k[1], &k[2]]);
    let mallory = node(&k[2], &[&k[0]], Config::default());
    let bob_id = k[1].peer_id();
    let id = alice
        .request(bob_id, mallory.local_address(), &b"secret"[..])
        .unwrap();
    let failed = wait_event(&alice, |e| matches!(e, Event::Failed { .. }));
    let Event::Failed {
        exchange,
        failure: Failure::Connection(ConnError::Impostor { actual, .. }),
        payload,
        ..
    } = failed
    else {
        panic!("{failed:?}");
    };
    assert_eq!((exchange, actual), (id, mallory.local_peer_id()));
    assert_eq!(payload, Bytes::from_static(b"secret"));
    let stats = alice.status().unwrap().stats;
    assert_eq!((stats.ik_dials, stats.dials), (1, 2), "{stats:?}");
    assert!(mallory.check_receive().is_none());
}

#[test]
fn revoking_a_peer_at_runtime_disconnects_it() {
    let k = keys(9, 2);
    // The idle timeout is out of reach: only the revocation can close the kept connection.
    let reuse = Config {
        reuse_connections: true,
        idle_timeout: Duration::from_secs(3_600),
        ..Config::default()
    };
    let alice = node(&k[0], &[&k[1]], reuse.clone());
    let bob = node(&k[1], &[&k[0]], reuse);
    alice
        .request(bob.local_peer_id(), bob.local_address(), &b"1"[..])
        .unwrap();
    let (peer, _, _) = expect_request(&bob);
    bob.response(peer, &b"ok"[..]).unwrap();
    expect_reply(&alice);
    assert_eq!(bob.status().unwrap().open_connections, 1);
    assert!(bob.revoke(alice.local_peer_id()).unwrap());
    eventually(|| alice.status().unwrap().open_connections == 0);
    let id = alice
        .request(bob.local_peer_id(), bob.local_address(), &b"2"[..])
        .unwrap();
    let failed = wait_event(&alice, |e| matches!(e, Event::Failed { .. }));
    assert!(
        matches!(failed, Event::Failed { exchange, failure: Failure::Rejected(CloseReason::NotAllowed), .. } if exchange == id),
        "{failed:?}"
    );
}

#[test]
fn sixteen_mib_message_both_ways() {
    let k = keys(10, 2);
    let alice = node(&k[0], &[&k[1]], Config::default());
    let bob = node(&k[1], &[&k[0]], Config::default());
    let big: Vec<u8> = (0..16 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let id = alice
        .request(bob.local_peer_id(), bob.local_address(), big.clone())
        .unwrap();
    let (peer, exchange, payload) = expect_request(&bob);
    assert_eq!(exchange, id);
    assert!(payload == big[..], "request intact");
    bob.response(peer, payload).unwrap();
    let (exchange, reply) = expect_reply(&alice);
    assert_eq!(exchange, id);
    assert!(reply == big[..], "reply intact");
}

#[test]
fn garbage_and_bad_length_prefixes_are_reported_and_do_not_disturb_others() {
    let k = keys(11, 2);
    let alice = node(&k[0], &[&k[1]], Config::default());
    let bob = node(&k[1], &[&k[0]], Config::default());
    // An exchange in progress while the garbage arrives.
    let id = alice
        .request(bob.local_peer_id(), bob.local_address(), &b"legit"[..])
        .unwrap();
    let (peer, exchange, _) = expect_request(&bob);
    assert_eq!(exchange, id);
    let junk: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        // Largest length prefix, then the stream ends early.
        &[0xff, 0xff, 1, 2, 3],
        // A zero-length frame.
        &[0x00, 0x00],
    ];
    for bytes in junk {
        let mut s = std::net::TcpStream::connect(bob.local_address()).unwrap();
        let from = s.local_addr().unwrap();
        s.write_all(bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let notice = wait_notice(&bob, |n| matches!(n, Notice::Event(Event::PeerError(_))));
        let Notice::Event(Event::PeerError(PeerError::Connection(error))) = &notice else {
            panic!("{notice:?}");
        };
        assert_eq!(error.remote().addr, from, "names the address: {error}");
        assert!(error.to_string().contains(&from.to_string()), "{error}");
    }
    // The legitimate exchange is unaffected.
    bob.response(peer, &b"fine"[..]).unwrap();
    assert_eq!(expect_reply(&alice), (id, Bytes::from_static(b"fine")));
}

#[test]
fn slow_application_loses_nothing() {
    // Tiny channels: requests pile up while Bob's application does not read; all of them
    // arrive once it does.
    let k = keys(12, 7);
    let tiny = Config {
        channel_capacity: 2,
        ..Config::default()
    };
    let peers: Vec<&Keypair> = k[1..].iter().collect();
    let bob = node(&k[0], &peers, tiny);
    let clients: Vec<P2pHandler> = k[1..]
        .iter()
        .map(|key| node(key, &[&k[0]], Config::default()))
        .collect();
    for (i, c) in clients.iter().enumerate() {
        c.request(bob.local_peer_id(), bob.local_address(), format!("{i}"))
            .unwrap();
    }
    // Bob's handler accepts what fits in the channel and its backlog, then stops reading
    // the network: the rest waits in the connections (back-pressure), not dropped.
    eventually(|| bob.status().unwrap().pending_responses >= 2);
    assert!(bob.status().unwrap().pending_responses < clients.len());
    let mut got = BTreeSet::new();
    for _ in 0..clients.len() {
        let (peer, _, payload) = expect_request(&bob);
        got.insert(payload);
        bob.response(peer, &b"ok"[..]).unwrap();
    }
    assert_eq!(got.len(), clients.len());
    for c in &clients {
        expect_reply(c);
    }
}

#[test]
fn shutdown_hands_back_pending_exchanges_and_frees_the_port() {
    let k = keys(13, 2);
    let alice = node(&k[0], &[&k[1]], Config::default());
    let bob = node(&k[1], &[&k[0]], Config::default());
    let ids: Vec<_> = (0..3)
        .map(|i| {
            alice
                .request(bob.local_peer_id(), bob.local_address(), format!("{i}"))
                .unwrap()
        })
        .collect();
    expect_request(&bob);
    let addr = alice.local_address();
    let report = alice.shutdown();
    let mut failed: Vec<_> = report.failed.iter().map(|(_, id, _)| *id).collect();
    failed.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(failed, want, "every pending exchange handed back");
    // No socket left behind: the port can be bound again at once.
    std::net::TcpListener::bind(addr).expect("port free after shutdown");
    // Bob's pending request is aborted towards the gone dialer, or times out; his app is
    // told either way and nothing stays open.
    eventually(|| bob.status().unwrap().open_connections == 0);
    let _ = AbortReason::ShuttingDown;
}

#[test]
fn connection_limit_tells_excess_peers_why_and_the_dialer_retries() {
    let k = keys(14, 3);
    let one = Config {
        max_connections: 1,
        ..Config::default()
    };
    let bob = node(&k[1], &[&k[0], &k[2]], one);
    let alice = node(&k[0], &[&k[1]], Config::default());
    let carol = node(&k[2], &[&k[1]], Config::default());
    let a = alice
        .request(bob.local_peer_id(), bob.local_address(), &b"a"[..])
        .unwrap();
    let (from, exchange, _) = expect_request(&bob);
    assert_eq!((from, exchange), (alice.local_peer_id(), a));
    // Bob's only connection slot is taken: a peer that authenticates is told why
    // (Close{TooManyConnections}) and disconnected, as PROTOCOL.md says.
    let mut raw = common::RawPeer::dial(bob.local_address(), &k[2], 1 << 20);
    assert_eq!(
        raw.drain(),
        vec![p2p_handler::wire::Message::Close {
            reason: CloseReason::TooManyConnections
        }]
    );
    wait_notice(&bob, |n| matches!(n, Notice::ConnectionLimit { .. }));
    // Carol's node hears the same, and retries.
    let c = carol
        .request(bob.local_peer_id(), bob.local_address(), &b"c"[..])
        .unwrap();
    wait_notice(&bob, |n| matches!(n, Notice::ConnectionLimit { .. }));
    bob.response(from, &b"ok"[..]).unwrap();
    assert_eq!(expect_reply(&alice).0, a);
    // The slot frees when Alice hangs up; Carol's retry gets in.
    let (from, exchange, _) = expect_request(&bob);
    assert_eq!((from, exchange), (carol.local_peer_id(), c));
    bob.response(from, &b"ok"[..]).unwrap();
    assert_eq!(expect_reply(&carol).0, c);
    assert!(carol.status().unwrap().stats.redials >= 1);
}

#[test]
fn channels_of_capacity_one_still_complete_exchanges() {
    // Each exchange puts two messages on a connection at once (Ack and Reply; final Ack and
    // Close): a per-connection queue sized by `channel_capacity` dropped every connection.
    let k = keys(15, 2);
    // Timers out of a busy machine's reach: a redial then means a dropped connection.
    let patient = Duration::from_secs(120);
    let one = Config {
        channel_capacity: 1,
        connect_timeout: patient,
        handshake_timeout: patient,
        ack_timeout: patient,
        reply_timeout: patient,
        reply_ack_timeout: patient,
        ..Config::default()
    };
    let alice = node(&k[0], &[&k[1]], one.clone());
    let bob = node(&k[1], &[&k[0]], one);
    for i in 0..5 {
        echo_exchange(&alice, &bob, format!("{i}"));
    }
    assert_eq!(
        alice.status().unwrap().stats.redials,
        0,
        "no connection was dropped"
    );
}

#[test]
fn an_application_that_never_reads_notices_is_never_stalled() {
    // Written to `request`, `response` and `check_receive` alone, as the API is designed
    // around. Ten times the channel capacity of failures and of notices later, it still
    // gets every outcome and every request.
    const CAP: usize = 4;
    const MANY: usize = 10 * CAP;
    let k = keys(16, 3);
    let small = Config {
        channel_capacity: CAP,
        max_attempts: 1,
        ..Config::default()
    };
    let alice = node(&k[0], &[&k[1], &k[2]], small.clone());
    let bob = node(&k[1], &[&k[0]], small);
    // Notices for Bob: streams that send an invalid frame, each a peer error.
    for _ in 0..MANY {
        let mut s = std::net::TcpStream::connect(bob.local_address()).unwrap();
        s.write_all(&[0, 0]).unwrap();
    }
    // Failures for Alice: she expects someone else at Bob's address (an impostor, final).
    let stranger = k[2].peer_id();
    for i in 0..MANY {
        let id = alice
            .request(stranger, bob.local_address(), format!("{i}"))
            .unwrap();
        let failed = wait_event(&alice, |e| matches!(e, Event::Failed { .. }));
        assert!(
            matches!(failed, Event::Failed { exchange, .. } if exchange == id),
            "{failed:?}"
        );
    }
    // Exchanges go on.
    for i in 0..5 {
        echo_exchange(&alice, &bob, format!("{i}"));
    }
    assert!(
        bob.status().unwrap().notices_dropped > 0,
        "the unread notices overflowed"
    );
}

#[test]
fn a_peer_allowed_at_runtime_gets_in() {
    let k = keys(17, 2);
    let alice = node(&k[0], &[&k[1]], Config::default());
    let bob = node(&k[1], &[], Config::default());
    let refused = alice
        .request(bob.local_peer_id(), bob.local_address(), &b"1"[..])
        .unwrap();
    let failed = wait_event(&alice, |e| matches!(e, Event::Failed { .. }));
    assert!(
        matches!(failed, Event::Failed { exchange, failure: Failure::Rejected(CloseReason::NotAllowed), .. } if exchange == refused),
        "{failed:?}"
    );
    bob.allow(alice.local_peer_id(), p2p_handler::AllowedPeer::default())
        .unwrap();
    let id = alice
        .request(bob.local_peer_id(), bob.local_address(), &b"2"[..])
        .unwrap();
    let (peer, exchange, _) = expect_request(&bob);
    assert_eq!((peer, exchange), (alice.local_peer_id(), id));
    bob.response_to(peer, exchange, &b"in"[..]).unwrap();
    assert_eq!(expect_reply(&alice), (id, Bytes::from_static(b"in")));
}

#[test]
fn draining_closes_the_listener_refuses_new_requests_and_finishes_started_ones() {
    let k = keys(31, 3);
    let alice = node(&k[0], &[&k[1]], Config::default());
    let bob = node(&k[1], &[&k[0], &k[2]], Config::default());
    // A dial that is refused is retried for Carol's whole exchange budget: a short one.
    let carol = node(
        &k[2],
        &[&k[1]],
        Config {
            max_attempts: 1,
            connect_timeout: Duration::from_millis(300),
            ack_timeout: Duration::from_millis(300),
            reply_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_millis(400),
            ..Config::default()
        },
    );
    let started = alice
        .request(bob.local_peer_id(), bob.local_address(), &b"started"[..])
        .unwrap();
    let (peer, exchange, _) = expect_request(&bob);
    bob.drain().unwrap();
    let status = bob.status().unwrap();
    assert!(status.draining && !status.drained, "{status:?}");
    // Bob's own new work is refused at once.
    assert!(matches!(
        bob.request(alice.local_peer_id(), alice.local_address(), &b"x"[..]),
        Err(p2p_handler::HandlerError::Request(
            p2p_handler::RequestError::ShuttingDown
        ))
    ));
    // The listener is closed: a new connection is refused at the socket.
    eventually(|| std::net::TcpStream::connect(bob.local_address()).is_err());
    // Carol's request cannot get in; she hears of it as a failed dial, payload back.
    let refused = carol
        .request(bob.local_peer_id(), bob.local_address(), &b"late"[..])
        .unwrap();
    // The exchange already started ends normally on its open connection.
    bob.response_to(peer, exchange, &b"answer"[..]).unwrap();
    let (id, payload) = expect_reply(&alice);
    assert_eq!((id, &payload[..]), (started, &b"answer"[..]));
    eventually(|| bob.status().unwrap().drained);
    let failed = wait_event(&carol, |e| matches!(e, Event::Failed { .. }));
    assert!(
        matches!(&failed, Event::Failed { exchange, payload, .. } if *exchange == refused && &payload[..] == b"late"),
        "{failed:?}"
    );
    let report = bob.shutdown();
    assert_eq!(report.unanswered_requests, 0);
    assert!(report.failed.is_empty());
}

#[test]
fn replacing_the_allow_list_disconnects_removed_peers_and_fails_their_exchanges() {
    let k = keys(32, 3);
    let reuse = Config {
        reuse_connections: true,
        idle_timeout: Duration::from_secs(3_600),
        ..Config::default()
    };
    let alice = node(&k[0], &[&k[1]], reuse.clone());
    let bob = node(&k[1], &[&k[0], &k[2]], reuse.clone());
    let carol = node(&k[2], &[&k[1]], reuse);
    echo_exchange(&alice, &bob, "one".into());
    echo_exchange(&carol, &bob, "one".into());
    assert_eq!(bob.status().unwrap().open_connections, 2);
    // Bob queues a request to Alice that she will not answer, then drops her from his list.
    let pending = bob
        .request(
            alice.local_peer_id(),
            alice.local_address(),
            &b"to alice"[..],
        )
        .unwrap();
    expect_request(&alice);
    let removed = bob.set_allow_list(allow(&[&k[2]])).unwrap();
    assert_eq!(removed, vec![alice.local_peer_id()]);
    let failed = wait_event(&bob, |e| matches!(e, Event::Failed { .. }));
    assert!(
        matches!(&failed, Event::Failed { exchange, failure: Failure::Revoked, payload, .. } if *exchange == pending && &payload[..] == b"to alice"),
        "{failed:?}"
    );
    eventually(|| alice.status().unwrap().open_connections == 0);
    // Carol, still listed, goes on over her kept connection.
    echo_exchange(&carol, &bob, "two".into());
    // Alice's new handshakes are refused.
    let id = alice
        .request(bob.local_peer_id(), bob.local_address(), &b"again"[..])
        .unwrap();
    let failed = wait_event(
        &alice,
        |e| matches!(e, Event::Failed { exchange, .. } if *exchange == id),
    );
    assert!(
        matches!(
            failed,
            Event::Failed {
                failure: Failure::Rejected(CloseReason::NotAllowed),
                ..
            }
        ),
        "{failed:?}"
    );
}

#[test]
fn a_rejected_request_fails_the_dialer_at_once_with_its_payload() {
    let k = keys(33, 2);
    let alice = node(&k[0], &[&k[1]], Config::default());
    let bob = node(&k[1], &[&k[0]], Config::default());
    let id = alice
        .request(bob.local_peer_id(), bob.local_address(), &b"unwanted"[..])
        .unwrap();
    let (peer, exchange, _) = expect_request(&bob);
    let started = Instant::now();
    bob.reject(peer, exchange).unwrap();
    let failed = wait_event(&alice, |e| matches!(e, Event::Failed { .. }));
    assert!(
        matches!(&failed, Event::Failed { exchange, failure: Failure::Aborted(AbortReason::Refused), payload, .. } if *exchange == id && &payload[..] == b"unwanted"),
        "{failed:?}"
    );
    // Not the 25 s response timeout.
    assert!(started.elapsed() < Config::default().response_timeout);
    // Refused once; it cannot be answered after.
    assert!(bob.response_to(peer, exchange, &b"late"[..]).is_err());
}

#[test]
fn cancelled_and_expired_requests_hand_their_payloads_back() {
    let k = keys(34, 2);
    let alice = node(&k[0], &[&k[1]], Config::default());
    let bob = node(&k[1], &[&k[0]], Config::default());
    let (to, at) = (bob.local_peer_id(), bob.local_address());
    let in_flight = alice.request(to, at, &b"in flight"[..]).unwrap();
    let queued = alice.request(to, at, &b"queued"[..]).unwrap();
    let expiring = alice
        .request_with_deadline(to, at, &b"expiring"[..], Duration::from_millis(200))
        .unwrap();
    let (_, first, _) = expect_request(&bob);
    assert!(alice.cancel(queued).unwrap());
    assert!(alice.cancel(in_flight).unwrap());
    assert!(!alice.cancel(in_flight).unwrap(), "already ended");
    let mut outcomes = Vec::new();
    while outcomes.len() < 3 {
        if let Event::Failed {
            exchange,
            failure,
            payload,
            ..
        } = wait_event(&alice, |e| matches!(e, Event::Failed { .. }))
        {
            outcomes.push((exchange, failure, payload));
        }
    }
    outcomes.sort_by_key(|(id, _, _)| *id);
    let mut want = vec![
        (
            in_flight,
            Failure::Cancelled,
            Bytes::from_static(b"in flight"),
        ),
        (queued, Failure::Cancelled, Bytes::from_static(b"queued")),
        (
            expiring,
            Failure::DeadlineExceeded,
            Bytes::from_static(b"expiring"),
        ),
    ];
    want.sort_by_key(|(id, _, _)| *id);
    assert_eq!(outcomes, want);
    // Bob saw the first request only: the cancelled one may have arrived, the others never left.
    assert_eq!(first, in_flight);
    assert_eq!(alice.status().unwrap().outbound_in_flight, 0);
}

#[test]
fn events_handed_back_at_shutdown_are_not_handed_out_again() {
    let k = keys(33, 2);
    let dir = std::env::temp_dir().join(format!("p2p-unread-once-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let durable = || {
        P2pHandler::with_options(
            "127.0.0.1:0",
            k[0].clone(),
            allow(&[&k[1]]),
            p2p_handler::Options::new(Config::default(), [7; 32])
                .data_dir(&dir)
                .unwrap(),
        )
        .unwrap()
    };
    let alice = durable();
    let bob = node(&k[1], &[&k[0]], Config::default());
    let id = alice
        .request(bob.local_peer_id(), bob.local_address(), &b"q"[..])
        .unwrap();
    let (peer, exchange, _) = expect_request(&bob);
    bob.response_to(peer, exchange, &b"a"[..]).unwrap();
    // Alice's reply arrives; her application never reads it before stopping.
    eventually(|| alice.status().unwrap().outbound_in_flight == 0);
    let report = alice.shutdown();
    assert!(
        matches!(&report.unread[..], [Event::Reply { exchange, .. }] if *exchange == id),
        "{:?}",
        report.unread
    );
    // Handed back once: the next start does not hand it out again.
    let alice = durable();
    alice.status().unwrap();
    let again = alice.check_receive();
    assert!(again.is_none(), "handed out again: {again:?}");
    drop(alice);
    let _ = std::fs::remove_dir_all(&dir);
}
