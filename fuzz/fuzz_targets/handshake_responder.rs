//! The responder's side of a connection fed arbitrary frames from an unauthenticated
//! stranger: never panics, never reports an established peer it did not authenticate, and
//! after its first error it is closed for good.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use p2p_handler_core::connection::{ConnEvent, Connection};
use p2p_handler_core::{AllowList, Config, Keypair};

fuzz_target!(|frames: Vec<Vec<u8>>| {
    let key = Keypair::from_private_bytes([7; 32]);
    let allow = AllowList::from_peers([Keypair::from_private_bytes([8; 32]).peer_id()]);
    let now = Instant::now();
    let config = Config::default();
    let addr = "10.0.0.1:5".parse().expect("address");
    let Ok(mut conn) = Connection::accept(&key, addr, [1; 32], &config, now) else {
        return;
    };
    for frame in &frames {
        conn.handle_frame(frame, &allow, now);
        while conn.poll_transmit().is_some() {}
        while let Some(event) = conn.poll_event() {
            // Arbitrary bytes cannot complete a Noise XX handshake with an allowed key.
            assert!(!matches!(event, ConnEvent::Established { .. }), "{event:?}");
        }
    }
    conn.handle_timeout(now + Duration::from_secs(3600));
    assert!(conn.is_closed() || frames.is_empty());
});
