//! Protocol violations from a peer written by hand from `docs/PROTOCOL.md`, one at a time
//! over real TCP. For each, on a session that is still usable, the node must answer
//! `Close{ProtocolViolation}`, report an error naming the peer, hang up, and go on serving
//! everyone else.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

mod common;

use std::time::{Duration, Instant};

use common::{RawPeer, write_frame};
use p2p_handler::wire::{CloseReason, ExchangeId, Message};
use p2p_handler::{AllowList, Config, Event, Keypair, Notice, P2pHandler};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const WAIT: Duration = Duration::from_secs(30);
const FIRST: u8 = 0b01;
const LAST: u8 = 0b10;

/// One FIRST|LAST chunk announcing exactly `body`.
fn whole(body: &[u8]) -> Vec<u8> {
    let mut chunk = vec![FIRST | LAST];
    chunk.extend_from_slice(&(body.len() as u32).to_be_bytes());
    chunk.extend_from_slice(body);
    chunk
}

/// A FIRST chunk announcing `total` bytes and carrying `body`.
fn first(total: u32, body: &[u8]) -> Vec<u8> {
    let mut chunk = vec![FIRST];
    chunk.extend_from_slice(&total.to_be_bytes());
    chunk.extend_from_slice(body);
    chunk
}

/// An Ack's encoding: kind, exchange id, attempt, acknowledged kind (Request).
fn ack_body() -> Vec<u8> {
    let mut body = vec![2];
    body.extend_from_slice(&7u64.to_be_bytes());
    body.extend_from_slice(&1u32.to_be_bytes());
    body.push(1);
    body
}

/// What a violating peer sends after the handshake, in order.
enum Send {
    Chunk(Vec<u8>),
    /// A frame of zero bytes (no Noise message can be empty).
    EmptyFrame,
}

fn cases() -> Vec<(&'static str, Vec<Send>)> {
    use Send::{Chunk, EmptyFrame};
    let mut trailing_ack = ack_body();
    trailing_ack.push(0);
    vec![
        ("unknown kind 0", vec![Chunk(whole(&[0]))]),
        ("unknown kind 7", vec![Chunk(whole(&[7, 0, 0]))]),
        (
            "trailing bytes after an Ack",
            vec![Chunk(whole(&trailing_ack))],
        ),
        (
            "trailing bytes after a Close",
            vec![Chunk(whole(&[6, 0, 0]))],
        ),
        (
            "truncated exchange header",
            vec![Chunk(whole(&[1, 0, 0, 0, 0, 0]))],
        ),
        (
            "interleaved chunks (FIRST inside a message)",
            vec![Chunk(first(100, &[1; 10])), Chunk(first(100, &[1; 10]))],
        ),
        (
            "reserved flag bits",
            vec![Chunk(vec![0b100 | FIRST | LAST, 0, 0, 0, 1, 6])],
        ),
        ("total_len 0", vec![Chunk(whole(&[]))]),
        (
            "chunk lengths that do not add up",
            vec![
                Chunk(first(20, &[1; 10])),
                Chunk([&[LAST][..], &[0; 5]].concat()),
            ],
        ),
        (
            "an empty continuation chunk",
            vec![Chunk(first(20, &[1; 10])), Chunk(vec![0])],
        ),
        (
            "total reached without LAST",
            vec![Chunk(first(ack_body().len() as u32, &ack_body()))],
        ),
        (
            "a Reply sent by the dialer",
            vec![Chunk(
                p2p_handler::wire::chunk_message(&Message::Reply {
                    exchange: ExchangeId(9),
                    attempt: 1,
                    payload: bytes::Bytes::from_static(b"x"),
                })
                .remove(0),
            )],
        ),
        ("an empty frame", vec![EmptyFrame]),
    ]
}

#[test]
fn every_violation_on_a_usable_session_is_answered_with_close_protocol_violation() {
    let mut rng = ChaCha20Rng::seed_from_u64(50);
    let (alice, bob_key, carol) = (
        Keypair::generate(&mut rng),
        Keypair::generate(&mut rng),
        Keypair::generate(&mut rng),
    );
    let bob = P2pHandler::with_seed(
        "127.0.0.1:0",
        bob_key.clone(),
        AllowList::from_peers([alice.peer_id(), carol.peer_id()]),
        Config::default(),
        [8; 32],
    )
    .unwrap();
    let carol_node = P2pHandler::with_seed(
        "127.0.0.1:0",
        carol.clone(),
        AllowList::from_peers([bob_key.peer_id()]),
        Config::default(),
        [9; 32],
    )
    .unwrap();
    for (name, sends) in cases() {
        let mut peer = RawPeer::dial(bob.local_address(), &alice, 1 << 20);
        for send in sends {
            match send {
                Send::Chunk(chunk) => peer.send_chunk(&chunk),
                Send::EmptyFrame => write_frame(&mut peer.stream, &[]).unwrap(),
            }
        }
        let got = peer.drain();
        assert_eq!(
            got,
            vec![Message::Close {
                reason: CloseReason::ProtocolViolation
            }],
            "{name}: the peer is told why, then the stream ends"
        );
        // The node reports it, naming the peer.
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match bob.priority_timeout(left) {
                Some(Notice::Event(Event::PeerError(error))) => {
                    assert_eq!(
                        error.remote().peer,
                        Some(alice.peer_id()),
                        "{name}: {error}"
                    );
                    break;
                }
                Some(_) => {}
                None => panic!("{name}: no error reported"),
            }
        }
        // And goes on serving others.
        let id = carol_node
            .request(bob.local_peer_id(), bob.local_address(), name)
            .unwrap();
        let Some(Event::Request { peer, exchange, .. }) = bob.receive_timeout(WAIT) else {
            panic!("{name}: Bob stopped serving");
        };
        bob.response_to(peer, exchange, &b"ok"[..]).unwrap();
        let reply = loop {
            match carol_node.receive_timeout(WAIT) {
                Some(Event::Reply { exchange, .. }) => break exchange,
                Some(_) => {}
                None => panic!("{name}: no reply for Carol"),
            }
        };
        assert_eq!(reply, id);
        // Bob's confirmation that Carol has the reply, so the next case starts clean.
        // Waited for by name, not by a short timeout: under load it can come late.
        match bob.receive_timeout(WAIT) {
            Some(Event::ResponseDelivered { exchange: x, .. }) if x == exchange => {}
            Some(event) => panic!("{name}: unexpected {event:?}"),
            None => panic!("{name}: Bob never confirmed Carol's reply"),
        }
    }
}
