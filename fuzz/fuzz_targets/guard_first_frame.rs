//! What a stranger controls before any Diffie-Hellman: the first frame a responder's guard
//! sorts (mac1, ticket id, mac2), and the frame a dialer reads where IK message 2 or a
//! cookie reply belongs. Neither may panic; the guard calls nothing Garbage that has a
//! right mac1 and proves nothing without one; a dialer follows no cookie reply it did not
//! get from the responder for the message 1 it sent.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use p2p_handler_core::connection::{Closed, ConnEvent, Connection, IkDial};
use p2p_handler_core::guard::{self, FirstMessage, Guard, Ticket};
use p2p_handler_core::{AllowList, Config, Keypair};

fuzz_target!(|input: (u8, u16, Vec<u8>, Vec<u8>)| {
    let (mode, seconds, first, answer) = input;
    let responder = Keypair::from_private_bytes([7; 32]);
    let dialer = Keypair::from_private_bytes([8; 32]);
    let now = Instant::now();
    let later = now + Duration::from_secs(u64::from(seconds));
    let from = "10.0.0.1:5".parse().expect("address");
    let mut g = Guard::new(responder.public_bytes(), [3; 32], now);
    let ticket = Ticket::derive(&[9; 32]);
    g.issue(dialer.peer_id(), ticket, now);

    // The guard on an arbitrary first frame, raw or wrapped in an envelope with a right
    // mac1 (and a ticket id or not).
    let frame = match mode % 3 {
        0 => first.clone(),
        1 => guard::seal_message_1(&first, responder.public_bytes(), None, None),
        _ => guard::seal_message_1(&first, responder.public_bytes(), Some(&ticket), None),
    };
    let sorted = g.classify(&frame, from, later);
    let mac1 = guard::mac1_matches(&frame, &guard::mac1_key(responder.public_bytes()));
    match sorted {
        FirstMessage::Xx => assert!(guard::is_xx_message_1(&frame)),
        FirstMessage::Garbage(_) => assert!(!mac1),
        FirstMessage::Unproven { .. } => assert!(mac1),
        FirstMessage::Proven(peer) => {
            assert!(mac1 && mode % 3 == 2, "proven without the ticket");
            assert_eq!(peer, dialer.peer_id());
        }
    }
    if let Some(reply) = g.cookie_reply(&frame, from, later) {
        assert_eq!(reply.len(), guard::COOKIE_REPLY_LEN);
        assert!(guard::open_cookie_reply(&reply, responder.public_bytes(), &frame).is_ok());
    }

    // A dialer reading an arbitrary answer to its IK message 1.
    let config = Config::default();
    let Ok(mut d) = Connection::dial_ik(
        &dialer,
        "10.0.0.2:7".parse().expect("address"),
        [1; 32],
        &config,
        now,
        IkDial {
            key: responder.public_bytes(),
            early: None,
            ticket: None,
        },
    ) else {
        return;
    };
    let Some(sent) = d.poll_transmit() else {
        return;
    };
    let followed = guard::open_cookie_reply(&answer, responder.public_bytes(), &sent).is_ok();
    assert!(
        !followed,
        "a cookie reply forged without the responder's guard"
    );
    d.handle_frame(&answer, &AllowList::new(), now);
    let events: Vec<ConnEvent> = std::iter::from_fn(|| d.poll_event()).collect();
    // An arbitrary answer cannot be message 2 from the holder of the responder's key.
    assert!(
        matches!(events.as_slice(), [ConnEvent::Closed(Closed::Error(_))]),
        "{events:?}"
    );
    assert_eq!(
        d.poll_transmit(),
        None,
        "no message 1 again without a real cookie"
    );
});
