//! Property tests: no sequence of inputs makes an endpoint panic, break its invariants or
//! deliver a request twice; under random faults, every request ends in exactly one outcome
//! and nothing leaks once the faults heal.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::allow_list::{AllowList, AllowedPeer};
use crate::config::{Config, RateLimit};
use crate::connection::{Closed, ConnError, ConnEvent, Remote};
use crate::endpoint::{ConnId, Endpoint, Event};
use crate::harness::{Action, App, Net, Rule};
use crate::identity::{Keypair, PeerId};
use crate::wire::{AbortReason, AckOf, CloseReason, ExchangeId, Kind, Message, NackReason};

#[derive(Debug, Clone)]
enum Input {
    Accept { peer: u8 },
    Established { conn: u8, peer: u8 },
    Message { conn: u8, message: Message },
    Oversized { conn: u8, kind: u8, id: u8 },
    Closed { conn: u8, how: u8 },
    Rejected { peer: u8 },
    Request { peer: u8, len: u16 },
    Respond { peer: u8, id: u8, len: u16 },
    Advance { ms: u16 },
    Revoke { peer: u8 },
    Allow { peer: u8 },
    Shutdown,
}

fn message() -> impl Strategy<Value = Message> {
    let id = (0u64..12).prop_map(ExchangeId);
    let attempt = 0u32..4;
    prop_oneof![
        (id.clone(), attempt.clone(), 0usize..64).prop_map(|(exchange, attempt, n)| {
            Message::Request {
                exchange,
                attempt,
                payload: Bytes::from(vec![1; n]),
            }
        }),
        (id.clone(), attempt.clone(), any::<bool>()).prop_map(|(exchange, attempt, r)| {
            Message::Ack {
                exchange,
                attempt,
                of: if r { AckOf::Reply } else { AckOf::Request },
            }
        }),
        (id.clone(), attempt.clone(), 0u8..6, 0u32..3000).prop_map(
            |(exchange, attempt, r, retry_after_ms)| Message::Nack {
                exchange,
                attempt,
                reason: NackReason::from_code(r),
                retry_after_ms,
            }
        ),
        (id.clone(), attempt.clone(), 0usize..64).prop_map(|(exchange, attempt, n)| {
            Message::Reply {
                exchange,
                attempt,
                payload: Bytes::from(vec![2; n]),
            }
        }),
        (id, attempt, 0u8..6).prop_map(|(exchange, attempt, r)| Message::Abort {
            exchange,
            attempt,
            reason: AbortReason::from_code(r),
        }),
        (0u8..8).prop_map(|r| Message::Close {
            reason: CloseReason::from_code(r)
        }),
    ]
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        2 => (0u8..4).prop_map(|peer| Input::Accept { peer }),
        2 => (0u8..10, 0u8..4).prop_map(|(conn, peer)| Input::Established { conn, peer }),
        8 => (0u8..10, message()).prop_map(|(conn, message)| Input::Message { conn, message }),
        1 => (0u8..10, 0u8..7, 0u8..12).prop_map(|(conn, kind, id)| Input::Oversized { conn, kind, id }),
        2 => (0u8..10, 0u8..4).prop_map(|(conn, how)| Input::Closed { conn, how }),
        1 => (0u8..4).prop_map(|peer| Input::Rejected { peer }),
        3 => (0u8..4, 0u16..300).prop_map(|(peer, len)| Input::Request { peer, len }),
        3 => (0u8..4, 0u8..12, 0u16..300).prop_map(|(peer, id, len)| Input::Respond { peer, id, len }),
        4 => (0u16..5000).prop_map(|ms| Input::Advance { ms }),
        1 => (0u8..4).prop_map(|peer| Input::Revoke { peer }),
        1 => (0u8..4).prop_map(|peer| Input::Allow { peer }),
        1 => Just(Input::Shutdown),
    ]
}

/// Inputs name connections 0..10: even ones dialed by the endpoint, odd ones accepted.
fn conn_id(n: u8) -> ConnId {
    let k = u64::from(n / 2) + 1;
    if n.is_multiple_of(2) {
        ConnId::outbound_for_tests(k)
    } else {
        ConnId::inbound(k)
    }
}

/// Feeds inputs to one endpoint, checking invariants and exactly-once delivery throughout.
fn drive(inputs: Vec<Input>) {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let me = Keypair::generate(&mut rng).peer_id();
    let peers: Vec<PeerId> = (0..4)
        .map(|_| Keypair::generate(&mut rng).peer_id())
        .collect();
    let config = Config {
        max_queued_per_peer: 3,
        max_pending_inbound: 4,
        dedupe_per_peer: 8,
        reply_cache_bytes: 400,
        max_message_size: 200,
        request_rate: RateLimit {
            burst: 6,
            per_second: 3,
        },
        rate_limit_strikes: 4,
        max_tracked_peers: 3,
        ..Config::default()
    };
    let mut ep = Endpoint::new(config, me, AllowList::from_peers(peers.clone()), [5; 32])
        .expect("valid config");
    let addr: SocketAddr = "10.0.0.9:1".parse().expect("addr");
    let mut now = Instant::now();
    let mut delivered: BTreeMap<(PeerId, ExchangeId), u32> = BTreeMap::new();
    let mut accepted = 0;
    for input in inputs {
        let peer_of = |i: u8| peers[usize::from(i) % peers.len()];
        match input {
            Input::Accept { peer } => {
                accepted += 1;
                ep.handle_accepted(ConnId::inbound(accepted), peer_of(peer), addr, 1000, 0, now);
            }
            Input::Established { conn, peer } => ep.handle_conn_event(
                conn_id(conn),
                ConnEvent::Established {
                    peer: peer_of(peer),
                    key: [0; 32],
                    ticket: None,
                    remote_max_message_size: 150,
                    remote_features: 0,
                },
                now,
            ),
            Input::Message { conn, message } => {
                ep.handle_conn_event(conn_id(conn), ConnEvent::Message(message), now)
            }
            Input::Oversized { conn, kind, id } => ep.handle_conn_event(
                conn_id(conn),
                ConnEvent::Oversized {
                    kind: [
                        Kind::Request,
                        Kind::Ack,
                        Kind::Nack,
                        Kind::Reply,
                        Kind::Abort,
                        Kind::Close,
                    ][usize::from(kind) % 6],
                    exchange: (kind < 6).then_some(ExchangeId(u64::from(id))),
                    attempt: (kind < 6).then_some(1),
                    len: 1 << 20,
                },
                now,
            ),
            Input::Closed { conn, how } => {
                let closed = match how {
                    0 => Closed::Io("reset".to_owned()),
                    1 => Closed::ByPeer(CloseReason::NotAllowed),
                    2 => Closed::ByPeer(CloseReason::Done),
                    _ => Closed::Error(ConnError::Decrypt {
                        remote: Remote { addr, peer: None },
                    }),
                };
                ep.handle_conn_event(conn_id(conn), ConnEvent::Closed(closed), now)
            }
            Input::Rejected { peer } => ep.handle_rejected(
                ConnError::Handshake {
                    remote: Remote {
                        addr,
                        peer: Some(peer_of(peer)),
                    },
                    detail: "x".to_owned(),
                },
                now,
            ),
            Input::Request { peer, len } => {
                let _ = ep.request(peer_of(peer), addr, vec![0; usize::from(len)], now);
            }
            Input::Respond { peer, id, len } => {
                let _ = ep.respond(
                    peer_of(peer),
                    ExchangeId(u64::from(id)),
                    vec![0; usize::from(len)],
                    now,
                );
            }
            Input::Advance { ms } => {
                now += Duration::from_millis(u64::from(ms));
                ep.handle_timeout(now);
            }
            Input::Revoke { peer } => {
                // Revoking forgets the peer's exchanges, so re-allowing starts afresh.
                let p = peer_of(peer);
                ep.revoke(&p, now);
                delivered.retain(|(q, _), _| *q != p);
            }
            Input::Allow { peer } => ep.allow(peer_of(peer), AllowedPeer::default()),
            Input::Shutdown => ep.shutdown(now),
        }
        while ep.poll_output().is_some() {}
        while let Some(event) = ep.poll_event() {
            if let Event::Request { peer, exchange, .. } = event {
                let n = delivered.entry((peer, exchange)).or_default();
                *n += 1;
                assert_eq!(*n, 1, "request {exchange} from {peer:?} delivered twice");
            }
        }
        ep.check_invariants();
        if let Some(t) = ep.poll_timeout() {
            assert!(
                t >= now || ep.poll_timeout().is_some(),
                "timeouts are well-formed"
            );
        }
    }
}

/// Under random faults on a small network, every request ends in exactly one outcome, no
/// request reaches an application twice, and once faults are healed nothing stays open.
fn swarm(
    seed: u64,
    requests: Vec<(u8, u8)>,
    rules: Vec<(u8, u8, u8, u8, u8)>,
    cuts: Vec<(u8, u8, u16)>,
) {
    let config = Config {
        ack_timeout: Duration::from_millis(300),
        reply_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_millis(1500),
        reply_ack_timeout: Duration::from_millis(800),
        connect_timeout: Duration::from_millis(600),
        handshake_timeout: Duration::from_millis(600),
        idle_timeout: Duration::from_secs(3),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(800),
        reuse_connections: seed.is_multiple_of(2),
        ..Config::default()
    };
    let mut net = Net::new(seed, &["a", "b", "c"], config);
    net.nodes[2].app = App::EchoAfter(Duration::from_millis(200));
    let kinds = [Kind::Request, Kind::Ack, Kind::Reply, Kind::Nack];
    for (from, to, kind, action, count) in rules {
        let (from, to) = (usize::from(from % 3), usize::from(to % 3));
        let action = match action % 4 {
            0 => Action::Drop,
            1 => Action::Delay(Duration::from_millis(400)),
            2 => Action::Corrupt,
            _ => Action::Nack(NackReason::Busy),
        };
        let kind = kinds[usize::from(kind) % kinds.len()];
        net.rules
            .push(Rule::new(from, to, kind, action).times(u32::from(count % 3) + 1));
    }
    let mut ids = Vec::new();
    for (from, to) in requests {
        let (from, to) = (usize::from(from % 3), usize::from(to % 3));
        if from != to
            && let Ok(id) = net.try_request(from, to, &[from as u8, to as u8])
        {
            ids.push((from, id));
        }
    }
    for (a, b, ms) in cuts {
        let (a, b) = (usize::from(a % 3), usize::from(b % 3));
        if a != b {
            net.partition(a, b);
            net.run_for(Duration::from_millis(u64::from(ms % 3000)));
            net.repair(a, b);
        }
    }
    net.rules.clear();
    assert!(net.run(Duration::from_secs(600)), "settles once healed");
    for (node, id) in ids {
        assert_eq!(net.outcomes(node, id), 1, "exchange {id} of node {node}");
    }
    assert_eq!(net.open_links(), 0, "no connection leaks");
    for n in &net.nodes {
        assert!(n.endpoint.is_idle(), "{} idle", n.name);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn endpoint_survives_any_input_sequence(inputs in proptest::collection::vec(input(), 0..120)) {
        drive(inputs);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_request_ends_exactly_once_under_faults(
        seed in 0u64..1_000_000,
        requests in proptest::collection::vec((0u8..3, 0u8..3), 1..10),
        rules in proptest::collection::vec((0u8..3, 0u8..3, 0u8..4, 0u8..4, 0u8..3), 0..5),
        cuts in proptest::collection::vec((0u8..3, 0u8..3, 0u16..3000), 0..3),
    ) {
        swarm(seed, requests, rules, cuts);
    }
}

/// Found by the swarm: a resent Request arriving after the reply went unconfirmed bound the
/// new connection to the exchange with no timer left to release it, so that connection
/// never idled out. Corrupted Acks keep the dialer from ever confirming.
#[test]
fn duplicate_after_unconfirmed_reply_does_not_pin_the_connection() {
    let config = Config {
        ack_timeout: Duration::from_millis(300),
        reply_ack_timeout: Duration::from_millis(800),
        connect_timeout: Duration::from_millis(600),
        handshake_timeout: Duration::from_millis(600),
        idle_timeout: Duration::from_secs(3),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(800),
        reuse_connections: true,
        ..Config::default()
    };
    let mut net = Net::new(2092, &["a", "b"], config);
    net.rules
        .push(Rule::new(0, 1, Kind::Ack, Action::Corrupt).times(3));
    net.rules
        .push(Rule::new(1, 0, Kind::Request, Action::Drop).times(3));
    let id = net.try_request(1, 0, &[1]).expect("request accepted");
    assert!(net.run(Duration::from_secs(600)));
    assert_eq!(net.outcomes(1, id), 1);
    assert_eq!(net.open_links(), 0, "every connection closed");
    assert!(net.nodes.iter().all(|n| n.endpoint.is_idle()));
}
