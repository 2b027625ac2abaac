//! Which handshake an endpoint asks its driver for: IK when it knows the responder's key and
//! the responder is not known to lack IK, XX otherwise, and back to IK once a hello says the
//! responder takes it.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::allow_list::AllowList;
use crate::config::Config;
use crate::connection::{Closed, ConnEvent};
use crate::endpoint::{ConnId, Endpoint, Output};
use crate::harness::Net;
use crate::identity::{KEY_LEN, PeerId};
use crate::wire::{FEATURE_IK, FEATURE_MEMBERSHIP, Message, NackReason};

/// The dials since the last call: (connection, key given).
fn dials(ep: &mut Endpoint) -> Vec<(ConnId, Option<[u8; KEY_LEN]>)> {
    std::iter::from_fn(|| ep.poll_output())
        .filter_map(|o| match o {
            Output::Dial { conn, key, .. } => Some((conn, key)),
            _ => None,
        })
        .collect()
}

fn established(peer: PeerId, features: u32) -> ConnEvent {
    ConnEvent::Established {
        peer,
        key: [0; 32],
        ticket: None,
        remote_max_message_size: 1 << 20,
        remote_features: features,
    }
}

#[test]
fn ik_when_the_key_is_known_xx_after_an_ik_dial_fails_and_ik_again_once_a_hello_offers_it() {
    let net = Net::new(3, &["a", "b", "c"], Config::default());
    let (b, b_key) = (net.id(1), *net.nodes[1].keypair.public_bytes());
    let c = net.id(2);
    let mut now = Instant::now();
    // b's key is listed; c is listed by peer id alone.
    let mut allow = AllowList::from_keys([b_key]);
    allow.insert(c, crate::allow_list::AllowedPeer::default());
    let mut ep = Endpoint::new(Config::default(), net.id(0), allow, [5; 32]).unwrap();
    let addr = net.nodes[1].addr;
    ep.request(c, net.nodes[2].addr, Bytes::from_static(b"c"), now)
        .unwrap();
    assert_eq!(
        dials(&mut ep).first().map(|d| d.1),
        Some(None),
        "no key for c"
    );
    ep.request(b, addr, Bytes::from_static(b"b"), now).unwrap();
    let first = dials(&mut ep);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].1, Some(b_key), "b's key is known: IK");
    assert_eq!(ep.stats().ik_dials, 1);
    // The IK dial fails before the handshake finished (a responder that predates IK hangs
    // up): the retry uses XX.
    let closed = ConnEvent::Closed(Closed::Io("reset by peer".into()));
    ep.handle_conn_event(first[0].0, closed, now);
    let retry = loop {
        now += Duration::from_millis(50);
        ep.handle_timeout(now);
        let d = dials(&mut ep);
        if !d.is_empty() {
            break d;
        }
        assert!(
            now < Instant::now() + Duration::from_secs(60),
            "never retried"
        );
    };
    assert_eq!(retry[0].1, None, "retried with IK after IK failed");
    // Its hello lacks IK: XX stays.
    ep.handle_conn_event(retry[0].0, established(b, FEATURE_MEMBERSHIP), now);
    ep.handle_conn_event(
        retry[0].0,
        ConnEvent::Closed(Closed::Io("gone".into())),
        now,
    );
    // The connection drops before the Request was answered: the exchange dials again.
    let next = loop {
        now += Duration::from_millis(50);
        ep.handle_timeout(now);
        let d = dials(&mut ep);
        if !d.is_empty() {
            break d;
        }
    };
    assert_eq!(
        next[0].1, None,
        "a peer whose hello lacks IK was dialed with IK"
    );
    // Upgraded: its hello now offers IK, so the next dial is IK again.
    ep.handle_conn_event(
        next[0].0,
        established(b, FEATURE_MEMBERSHIP | FEATURE_IK),
        now,
    );
    ep.handle_conn_event(next[0].0, ConnEvent::Closed(Closed::Io("gone".into())), now);
    let after = loop {
        now += Duration::from_millis(50);
        ep.handle_timeout(now);
        let d = dials(&mut ep);
        if !d.is_empty() {
            break d;
        }
    };
    assert_eq!(after[0].1, Some(b_key));
}

#[test]
fn a_network_of_known_keys_runs_its_exchanges_over_ik() {
    let mut net = Net::new(4, &["a", "b", "c"], Config::default());
    let ids: Vec<_> = [(0, 1), (1, 2), (2, 0)]
        .iter()
        .map(|&(from, to)| (from, net.request(from, to, b"over ik")))
        .collect();
    net.run(Duration::from_secs(30));
    for (from, id) in ids {
        assert!(net.replies(from).iter().any(|(x, _)| *x == id), "{id}");
    }
    let ik = net.trace.iter().filter(|l| l.contains("(IK)")).count();
    let xx = net.trace.iter().filter(|l| l.contains("(XX)")).count();
    assert!(ik >= 3 && xx == 0, "IK {ik}, XX {xx}");
    assert!((0..3).all(|n| net.nodes[n].endpoint.stats().ik_dials >= 1));
}

/// The virtual time at which node 0's first exchange with node 1 got its reply, and the
/// stats of both ends.
fn first_exchange(net: &mut Net) -> (Duration, crate::endpoint::Stats, crate::endpoint::Stats) {
    let id = net.request(0, 1, b"fresh");
    let replied = net.run_until(Duration::from_secs(10), |n| {
        n.replies(0).iter().any(|(x, _)| *x == id)
    });
    assert!(replied, "{}", net.trace.join("\n"));
    let at = net.elapsed();
    let stats = |n: usize| net.nodes[n].endpoint.stats().clone();
    (at, stats(0), stats(1))
}

#[test]
fn a_fresh_exchange_sends_its_request_in_message_1_and_ends_a_round_trip_sooner() {
    let mut xx = Net::new(6, &["a", "b"], Config::default());
    for n in &mut xx.nodes {
        // Known by peer id alone: XX.
        n.allow = AllowList::from_peers(n.allow.peers().map(|(p, _)| *p).collect::<Vec<_>>());
    }
    let mut xx = xx;
    for i in 0..2 {
        let allow = xx.nodes[i].allow.clone();
        xx.nodes[i].endpoint.set_allow_list(allow, xx.now);
    }
    let (t_xx, _, _) = first_exchange(&mut xx);
    let mut early = Net::new(6, &["a", "b"], Config::default()).with_wall_clocks();
    let (t_early, dialer, responder) = first_exchange(&mut early);
    assert!(
        early.trace.iter().any(|l| l.contains("(IK+request)")),
        "{}",
        early.trace.join("\n")
    );
    assert_eq!(
        (
            dialer.early_requests_sent,
            dialer.requests_sent,
            dialer.resends
        ),
        (1, 1, 0)
    );
    assert_eq!(
        (
            responder.early_requests_taken,
            responder.early_requests_refused
        ),
        (1, 0)
    );
    eprintln!("fresh exchange: XX {t_xx:?}, IK with the request {t_early:?}");
    // XX: msg1, msg2, msg3 with the Request, the Ack and Reply back: 4 one-way trips.
    // IK with the Request in msg1: msg1, then msg2 with the Ack and Reply: 2.
    let one_way = early.latency;
    assert!(
        t_early + 2 * one_way <= t_xx,
        "early {t_early:?}, XX {t_xx:?}, one way {one_way:?}"
    );
}

/// Bob's endpoint, with a wall clock from `WALL` on, allowing Alice (by key).
struct Responder {
    ep: Endpoint,
    alice: PeerId,
    addr: std::net::SocketAddr,
    now: Instant,
    next: u64,
}

const WALL: u64 = 1_800_000_000_000;

impl Responder {
    fn new() -> Self {
        let net = Net::new(8, &["alice", "bob"], Config::default());
        let allow = AllowList::from_keys([*net.nodes[0].keypair.public_bytes()]);
        let now = Instant::now();
        let mut ep = Endpoint::new(Config::default(), net.id(1), allow, [3; 32]).unwrap();
        ep.set_wall_clock(now, WALL);
        Self {
            ep,
            alice: net.id(0),
            addr: net.nodes[0].addr,
            now: now + Duration::from_secs(1),
            next: 1,
        }
    }

    /// A new connection from Alice whose message 1 carried `exchange` stamped `stamp`:
    /// what Bob's application received and what Bob sent.
    fn early(&mut self, exchange: u64, stamp: u64) -> (usize, Vec<Message>) {
        let conn = ConnId::inbound(self.next);
        self.next += 1;
        self.ep
            .handle_accepted(conn, self.alice, self.addr, 1 << 20, FEATURE_IK, self.now);
        let request = Message::Request {
            exchange: crate::wire::ExchangeId(exchange),
            attempt: 1,
            payload: Bytes::from_static(b"pay me"),
        };
        let early = ConnEvent::Early {
            sent_unix_ms: stamp,
            message: request,
        };
        self.ep.handle_conn_event(conn, early, self.now);
        let delivered = std::iter::from_fn(|| self.ep.poll_event())
            .filter(|e| matches!(e, crate::endpoint::Event::Request { .. }))
            .count();
        let sent = std::iter::from_fn(|| self.ep.poll_output())
            .filter_map(|o| match o {
                Output::Send { message, .. } => Some(message),
                _ => None,
            })
            .collect();
        (delivered, sent)
    }

    fn wall(&self) -> u64 {
        WALL + 1_000
    }
}

fn refused(sent: &[Message]) -> bool {
    matches!(
        sent,
        [Message::Nack {
            reason: NackReason::EarlyRefused,
            retry_after_ms: 0,
            ..
        }]
    )
}

#[test]
fn a_replayed_message_1_never_delivers_its_request_again() {
    let mut bob = Responder::new();
    let now = bob.wall();
    let (delivered, sent) = bob.early(1, now - 5);
    assert_eq!(delivered, 1);
    assert!(!refused(&sent), "{sent:?}");
    // The same message 1 again, on another connection: refused, nothing delivered.
    let (delivered, sent) = bob.early(1, now - 5);
    assert_eq!(delivered, 0);
    assert!(refused(&sent), "{sent:?}");
    // Even for an exchange Bob no longer remembers: the stamp is not after the last.
    let (delivered, sent) = bob.early(99, now - 5);
    assert_eq!(delivered, 0);
    assert!(refused(&sent), "{sent:?}");
    let s = bob.ep.stats();
    assert_eq!((s.early_requests_taken, s.early_requests_refused), (1, 2));
    assert_eq!(s.nacks_sent, 2);
}

#[test]
fn stamps_from_before_the_start_far_off_or_stepped_back_cost_a_round_trip_never_a_lockout() {
    let mut bob = Responder::new();
    let now = bob.wall();
    // Recorded before Bob started (a restart): refused.
    assert!(refused(&bob.early(1, WALL - 1).1));
    assert!(refused(&bob.early(2, WALL).1));
    // Far in the future: refused, and it does not raise the floor.
    let window = u64::try_from(crate::endpoint::EARLY_WINDOW.as_millis()).unwrap();
    assert!(refused(&bob.early(3, now + window + 1).1));
    assert_eq!(
        bob.early(4, now + 1).0,
        1,
        "a far-future stamp locked Alice out"
    );
    // Alice's clock steps back: refused (she resends on the session), and once her clock
    // is past the last stamp taken, taken again.
    assert!(refused(&bob.early(5, now - 1_000).1));
    assert_eq!(bob.early(6, now + 2).0, 1);
    // Far in the past (beyond the window) but after the start: refused.
    bob.now += Duration::from_secs(60);
    assert!(refused(&bob.early(7, now + 3).1));
    assert_eq!(bob.early(8, now + 60_000).0, 1);
}

/// Alice's endpoint, knowing Bob's key, with a wall clock from `WALL` a second ago.
fn alice_knowing_bob(seed: u64) -> (Net, Endpoint, Instant) {
    let net = Net::new(seed, &["alice", "bob"], Config::default());
    let bob_key = *net.nodes[1].keypair.public_bytes();
    let now = Instant::now();
    let allow = AllowList::from_keys([bob_key]);
    let mut ep = Endpoint::new(Config::default(), net.id(0), allow, [4; 32]).unwrap();
    ep.set_wall_clock(now, WALL);
    (net, ep, now + Duration::from_secs(1))
}

#[test]
fn a_refused_early_request_is_sent_again_at_once_on_the_session() {
    let (net, mut ep, now) = alice_knowing_bob(9);
    let id = ep
        .request(net.id(1), net.nodes[1].addr, Bytes::from_static(b"x"), now)
        .unwrap();
    let outputs: Vec<Output> = std::iter::from_fn(|| ep.poll_output()).collect();
    let [
        Output::Dial {
            conn,
            key: Some(_),
            early: Some((stamp, Message::Request { attempt: 1, .. })),
            ..
        },
    ] = outputs.as_slice()
    else {
        panic!("{outputs:?}");
    };
    assert_eq!(*stamp, WALL + 1_000);
    let conn = *conn;
    ep.handle_conn_event(conn, established(net.id(1), FEATURE_IK), now);
    assert!(
        std::iter::from_fn(|| ep.poll_output()).next().is_none(),
        "the Request was sent again although it rode in message 1"
    );
    let nack = Message::Nack {
        exchange: id,
        attempt: 1,
        reason: NackReason::EarlyRefused,
        retry_after_ms: 0,
    };
    ep.handle_conn_event(conn, ConnEvent::Message(nack), now);
    let outputs: Vec<Output> = std::iter::from_fn(|| ep.poll_output()).collect();
    assert!(
        matches!(
            outputs.as_slice(),
            [Output::Send { conn: c, message: Message::Request { attempt: 2, .. }, .. }] if *c == conn
        ),
        "{outputs:?}"
    );
    assert_eq!(ep.stats().early_requests_sent, 1);
}

#[test]
fn a_request_too_large_for_message_1_waits_for_the_session_and_a_cancelled_dial_is_closed() {
    let (net, mut ep, now) = alice_knowing_bob(10);
    let big = Bytes::from(vec![1; crate::wire::EARLY_MAX_LEN]);
    let id = ep.request(net.id(1), net.nodes[1].addr, big, now).unwrap();
    let outputs: Vec<Output> = std::iter::from_fn(|| ep.poll_output()).collect();
    let [
        Output::Dial {
            conn,
            key: Some(_),
            early: None,
            ..
        },
    ] = outputs.as_slice()
    else {
        panic!("{outputs:?}");
    };
    let conn = *conn;
    assert_eq!(ep.stats().early_requests_sent, 0);
    // Cancelled while dialing: once the handshake finishes, the connection is closed.
    assert!(ep.cancel(id, now));
    ep.handle_conn_event(conn, established(net.id(1), FEATURE_IK), now);
    let outputs: Vec<Output> = std::iter::from_fn(|| ep.poll_output()).collect();
    assert!(
        outputs
            .iter()
            .any(|o| matches!(o, Output::Close { conn: c, .. } if *c == conn)),
        "{outputs:?}"
    );
}

/// The next dial (connection, key, ticket) after `conn` drops, the exchange retrying.
fn redial(
    ep: &mut Endpoint,
    conn: ConnId,
    now: &mut Instant,
) -> (ConnId, Option<[u8; KEY_LEN]>, Option<crate::guard::Ticket>) {
    ep.handle_conn_event(conn, ConnEvent::Closed(Closed::Io("gone".into())), *now);
    redial_after(ep, now)
}

fn established_with(peer: PeerId, key: [u8; KEY_LEN], ticket: u8) -> ConnEvent {
    ConnEvent::Established {
        peer,
        key,
        ticket: Some(crate::guard::Ticket::derive(&[ticket; 32])),
        remote_max_message_size: 1 << 20,
        remote_features: FEATURE_IK,
    }
}

#[test]
fn a_key_learned_in_a_handshake_makes_later_dials_ik_and_tickets_are_redeemed_newest_first() {
    let net = Net::new(3, &["a", "c"], Config::default());
    let (c, c_key) = (net.id(1), *net.nodes[1].keypair.public_bytes());
    let mut now = Instant::now();
    // c is listed by peer id alone: the first dial is XX.
    let config = Config {
        max_attempts: 100,
        ..Config::default()
    };
    let mut ep = Endpoint::new(config, net.id(0), AllowList::from_peers([c]), [5; 32]).unwrap();
    ep.request(c, net.nodes[1].addr, Bytes::from_static(b"x"), now)
        .unwrap();
    let first = dials(&mut ep);
    assert_eq!(first[0].1, None);
    // A handshake c dialed to us teaches nothing here (only ours do: the key is the one
    // we reached, and a ticket is for dialing c).
    let inbound = ConnId::inbound(1);
    ep.handle_accepted(inbound, c, net.nodes[1].addr, 1 << 20, FEATURE_IK, now);
    ep.handle_conn_event(inbound, established_with(c, c_key, 3), now);
    // A key that is not c's is not kept (a driver's bug, not trusted), nor its ticket.
    ep.handle_conn_event(first[0].0, established_with(c, [9; KEY_LEN], 1), now);
    let (conn, key, ticket) = redial(&mut ep, first[0].0, &mut now);
    assert_eq!((key, ticket), (None, None), "a wrong key was learned");
    // The XX handshake tells c's key and hands over a ticket: IK from now on, with it.
    ep.handle_conn_event(conn, established_with(c, c_key, 2), now);
    let (conn, key, ticket) = redial(&mut ep, conn, &mut now);
    assert_eq!(key, Some(c_key), "the learned key");
    assert_eq!(ticket, Some(crate::guard::Ticket::derive(&[2; 32])));
    // That dial fails before its handshake: XX next (no key, no ticket), and the ticket
    // goes back, since the responder may never have seen it.
    let (conn, key, none) = redial(&mut ep, conn, &mut now);
    assert_eq!((key, none), (None, None));
    // The XX handshake's hello offers IK: IK again, redeeming the ticket given back.
    let plain = ConnEvent::Established {
        peer: c,
        key: c_key,
        ticket: None,
        remote_max_message_size: 1 << 20,
        remote_features: FEATURE_IK,
    };
    ep.handle_conn_event(conn, plain, now);
    let (conn, key, back) = redial(&mut ep, conn, &mut now);
    assert_eq!(key, Some(c_key));
    assert_eq!(
        back,
        Some(crate::guard::Ticket::derive(&[2; 32])),
        "given back"
    );
    let plain = ConnEvent::Established {
        peer: c,
        key: c_key,
        ticket: None,
        remote_max_message_size: 1 << 20,
        remote_features: FEATURE_IK,
    };
    ep.handle_conn_event(conn, plain, now);
    // Tickets pile up (a driver reporting six, as six handshakes would); the four newest
    // are kept, the newest used first, each once.
    for n in 10..16u8 {
        ep.handle_conn_event(conn, established_with(c, c_key, n), now);
    }
    let mut conn = conn;
    let mut used = Vec::new();
    for _ in 0..5 {
        let (next, _, ticket) = redial(&mut ep, conn, &mut now);
        used.push(ticket);
        // Established, handing over no ticket (so IK stays, and no new one arrives).
        let ev = ConnEvent::Established {
            peer: c,
            key: c_key,
            ticket: None,
            remote_max_message_size: 1 << 20,
            remote_features: FEATURE_IK,
        };
        ep.handle_conn_event(next, ev, now);
        conn = next;
    }
    let derive = |n: u8| Some(crate::guard::Ticket::derive(&[n; 32]));
    assert_eq!(
        used,
        vec![derive(15), derive(14), derive(13), derive(12), None]
    );
}

#[test]
fn an_ik_dial_the_connect_timeout_gives_up_on_is_retried_with_xx() {
    // A responder that holds a message 1 whose mac1 it refuses (it no longer has the key
    // we know) never answers: the connect timeout ends the dial, and XX names who is there.
    let net = Net::new(3, &["a", "b"], Config::default());
    let (b, b_key) = (net.id(1), *net.nodes[1].keypair.public_bytes());
    let mut now = Instant::now();
    let mut ep = Endpoint::new(
        Config::default(),
        net.id(0),
        AllowList::from_keys([b_key]),
        [5; 32],
    )
    .unwrap();
    ep.request(b, net.nodes[1].addr, Bytes::from_static(b"x"), now)
        .unwrap();
    assert_eq!(dials(&mut ep)[0].1, Some(b_key));
    let retry = loop {
        now += Duration::from_millis(100);
        ep.handle_timeout(now);
        let d = dials(&mut ep);
        if !d.is_empty() {
            break d;
        }
        assert!(
            now < Instant::now() + Duration::from_secs(120),
            "never retried"
        );
    };
    assert_eq!(
        retry[0].1, None,
        "retried with IK after the connect timeout"
    );
    // That says nothing of IK (a partition would do the same): once XX, then IK again.
    let (conn, key, _) = redial_after(&mut ep, &mut now);
    assert_eq!(key, Some(b_key), "XX stuck after a timeout");
    // The Connection's own handshake timeout counts the same.
    let remote = crate::connection::Remote {
        addr: net.nodes[1].addr,
        peer: Some(b),
    };
    let timeout = crate::connection::ConnError::HandshakeTimeout { remote };
    ep.handle_conn_event(conn, ConnEvent::Closed(Closed::Error(timeout)), now);
    let (_, key, _) = redial_after(&mut ep, &mut now);
    assert_eq!(key, None, "XX once after a handshake timeout");
    let (_, key, _) = redial_after(&mut ep, &mut now);
    assert_eq!(key, Some(b_key), "then IK again");
}

/// The next dial, after time passes (the connect timeout ends the one before).
fn redial_after(
    ep: &mut Endpoint,
    now: &mut Instant,
) -> (ConnId, Option<[u8; KEY_LEN]>, Option<crate::guard::Ticket>) {
    let limit = *now + Duration::from_secs(60);
    loop {
        *now += Duration::from_millis(50);
        ep.handle_timeout(*now);
        let dial = std::iter::from_fn(|| ep.poll_output()).find_map(|o| match o {
            Output::Dial {
                conn, key, ticket, ..
            } => Some((conn, key, ticket)),
            _ => None,
        });
        if let Some(dial) = dial {
            return dial;
        }
        assert!(*now < limit, "never dialed again");
    }
}

#[test]
fn a_resend_that_rides_in_message_1_counts_as_a_resend() {
    // Alice reuses connections and knows Bob's key. Her second exchange's first try goes on
    // the connection the first left open and is lost; the connection is cut, so her next
    // try is her exchange's first dial, its Request in IK message 1 as attempt 2: a resend.
    let config = Config {
        reuse_connections: true,
        ..Config::default()
    };
    let mut net = Net::new(6, &["a", "b"], config).with_wall_clocks();
    first_exchange(&mut net);
    net.rules.push(
        crate::harness::Rule::new(
            0,
            1,
            crate::wire::Kind::Request,
            crate::harness::Action::Drop,
        )
        .times(1),
    );
    let id = net.request(0, 1, b"second");
    let replied = net.run_until(Duration::from_secs(30), |n| {
        n.replies(0).iter().any(|(x, _)| *x == id)
    });
    assert!(replied, "{}", net.trace.join("\n"));
    assert!(
        net.trace
            .iter()
            .any(|l| l.contains("Early {") && l.contains(" #2,")),
        "the resend rode in message 1: {}",
        net.trace.join("\n")
    );
    let stats = net.nodes[0].endpoint.stats();
    // Two exchanges, each ended: every try beyond each one's first is a resend.
    assert_eq!(stats.resends, stats.requests_sent - 2, "{stats:?}");
    assert!(stats.resends >= 1);
}
