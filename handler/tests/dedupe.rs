//! Deduplication seen from a dialer written by hand from `docs/PROTOCOL.md`, over real TCP:
//! a copy of an exchange that arrives after newer exchanges pushed its record out of the
//! responder's memory is refused with `Abort{Settled}`, never delivered again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::RawPeer;
use p2p_handler::wire::{AbortReason, AckOf, ExchangeId, Message};
use p2p_handler::{AllowList, Config, Event, Keypair, P2pHandler};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const WAIT: Duration = Duration::from_secs(30);

fn request(id: u64, attempt: u32) -> Message {
    Message::Request {
        exchange: ExchangeId(id),
        attempt,
        payload: Bytes::from(format!("request {id}")),
    }
}

/// Sends Request `id`, takes its Ack and Reply (the node's application echoes), and Acks the
/// Reply: one whole exchange.
fn exchange(dialer: &mut RawPeer, bob: &P2pHandler, id: u64) {
    dialer.send(&request(id, 1));
    match bob.receive_timeout(WAIT) {
        Some(Event::Request {
            peer,
            exchange,
            payload,
            ..
        }) => bob.response_to(peer, exchange, payload).unwrap(),
        other => panic!("request {id} not delivered: {other:?}"),
    }
    let ack = dialer.recv();
    assert!(
        matches!(
            ack,
            Some(Message::Ack {
                of: AckOf::Request,
                ..
            })
        ),
        "{ack:?}"
    );
    let reply = dialer.recv();
    assert!(matches!(reply, Some(Message::Reply { .. })), "{reply:?}");
    dialer.send(&Message::Ack {
        exchange: ExchangeId(id),
        attempt: 1,
        of: AckOf::Reply,
    });
    match bob.receive_timeout(WAIT) {
        Some(Event::ResponseDelivered { exchange, .. }) => assert_eq!(exchange, ExchangeId(id)),
        other => panic!("exchange {id} not confirmed: {other:?}"),
    }
}

#[test]
fn a_late_copy_of_a_forgotten_exchange_is_refused_not_delivered_again() {
    let mut rng = ChaCha20Rng::seed_from_u64(60);
    let (alice, bob_key) = (Keypair::generate(&mut rng), Keypair::generate(&mut rng));
    let bob = P2pHandler::with_seed(
        "127.0.0.1:0",
        bob_key,
        AllowList::from_peers([alice.peer_id()]),
        Config {
            dedupe_per_peer: 1,
            ack_delay: Duration::ZERO,
            ..Config::default()
        },
        [8; 32],
    )
    .unwrap();
    let mut dialer = RawPeer::dial(bob.local_address(), &alice, 1 << 20);
    for id in [100, 101, 102] {
        exchange(&mut dialer, &bob, id);
    }
    // 100 and 101 are forgotten; their copies are stale. 102 is remembered: a duplicate.
    for stale in [100, 101] {
        dialer.send(&request(stale, 2));
        assert_eq!(
            dialer.recv(),
            Some(Message::Abort {
                exchange: ExchangeId(stale),
                attempt: 2,
                reason: AbortReason::Settled,
            })
        );
    }
    dialer.send(&request(102, 2));
    assert_eq!(
        dialer.recv(),
        Some(Message::Ack {
            exchange: ExchangeId(102),
            attempt: 2,
            of: AckOf::Request,
        })
    );
    // Nothing reached the application again (the answers above came after the node had
    // handled each copy, so its counters are final).
    assert!(bob.check_receive().is_none());
    let status = bob.status().unwrap();
    assert_eq!(status.stats.requests_delivered, 3);
    assert_eq!(status.stats.settled_refused, 2);
}
