//! An allowed dialer's IK message 1 with an arbitrary payload after the encryption (its
//! hello, and whatever rides after it: a stamp and a Request, or garbage): the responder
//! never panics, reports an early Request only after `Established` and only a Request, and
//! fails the handshake on anything else.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use p2p_handler_core::connection::{ConnEvent, Connection};
use p2p_handler_core::guard;
use p2p_handler_core::noise::{HandshakeRole, handshake_ik};
use p2p_handler_core::wire::{FEATURES, Hello, Message, PROTOCOL_VERSION};
use p2p_handler_core::{AllowList, Config, Keypair};

fuzz_target!(|input: (bool, u64, Vec<u8>)| {
    // Mostly a valid hello and a stamp, then arbitrary bytes where the Request goes; or the
    // whole payload arbitrary.
    let (raw, stamp, rest) = input;
    let payload = if raw {
        rest
    } else {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            max_message_size: 1 << 20,
            progress_ms: 500,
            features: FEATURES,
        };
        [&hello.encode()[..], &stamp.to_be_bytes(), &rest].concat()
    };
    let responder = Keypair::from_private_bytes([7; 32]);
    let dialer = Keypair::from_private_bytes([8; 32]);
    let allow = AllowList::from_peers([dialer.peer_id()]);
    let now = Instant::now();
    let config = Config::default();
    let Ok(mut hs) = handshake_ik(
        &dialer,
        HandshakeRole::Initiator,
        [2; 32],
        Some(responder.public_bytes()),
    ) else {
        return;
    };
    let mut frame = vec![0u8; payload.len() + 128];
    let Ok(n) = hs.write_message(&payload, &mut frame) else {
        return;
    };
    frame.truncate(n);
    // In its envelope, with a right mac1 (a wrong one is `guard_first_frame`'s).
    let frame = guard::seal_message_1(&frame, responder.public_bytes(), None, None);
    let addr = "10.0.0.1:5".parse().expect("address");
    let Ok(mut conn) = Connection::accept(&responder, addr, [1; 32], &config, now) else {
        return;
    };
    conn.handle_frame(&frame, &allow, now);
    let mut established = false;
    while let Some(event) = conn.poll_event() {
        match event {
            ConnEvent::Established { peer, .. } => {
                assert_eq!(peer, dialer.peer_id());
                established = true;
            }
            ConnEvent::Early { message, .. } => {
                assert!(established, "an early request before Established");
                assert!(matches!(message, Message::Request { .. }), "{message:?}");
            }
            _ => {}
        }
    }
});
