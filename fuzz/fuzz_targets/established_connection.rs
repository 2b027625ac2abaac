//! An established connection fed arbitrary chunks through a real Noise session (so they
//! reach the reassembler and the decoder), sometimes with raw garbage frames in between:
//! never panics; the first error closes the connection, with `Close{ProtocolViolation}`
//! sent back whenever the session was still usable.
#![no_main]

use std::time::Instant;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use p2p_handler_core::connection::{Closed, ConnEvent, Connection};
use p2p_handler_core::noise::{HandshakeRole, handshake};
use p2p_handler_core::wire::{Hello, PROTOCOL_VERSION, TAG_LEN};
use p2p_handler_core::{AllowList, Config, Keypair};

#[derive(Arbitrary, Debug)]
enum Frame {
    /// A chunk plaintext, encrypted by the peer's session.
    Sealed(Vec<u8>),
    /// Bytes as they are: a frame no session produced.
    Raw(Vec<u8>),
}

fuzz_target!(|frames: Vec<Frame>| {
    let (ours, theirs) = (
        Keypair::from_private_bytes([7; 32]),
        Keypair::from_private_bytes([8; 32]),
    );
    let allow = AllowList::from_peers([theirs.peer_id()]);
    let now = Instant::now();
    let config = Config {
        max_message_size: 1000,
        ..Config::default()
    };
    let addr = "10.0.0.1:5".parse().expect("address");
    let Ok(mut conn) = Connection::accept(&ours, addr, [1; 32], &config, now) else {
        return;
    };
    // The peer: a raw Noise initiator.
    let Ok(mut hs) = handshake(&theirs, HandshakeRole::Initiator, [2; 32]) else {
        return;
    };
    let mut buf = vec![0u8; 65_535];
    let hello = Hello {
        version: PROTOCOL_VERSION,
        max_message_size: 1000,
        progress_ms: 0,
        features: 0,
    }
    .encode();
    let Ok(n) = hs.write_message(&hello, &mut buf) else {
        return;
    };
    conn.handle_frame(&buf[..n], &allow, now);
    let Some(msg2) = conn.poll_transmit() else {
        return;
    };
    if hs.read_message(&msg2, &mut buf).is_err() {
        return;
    }
    let Ok(n) = hs.write_message(&[], &mut buf) else {
        return;
    };
    conn.handle_frame(&buf[..n], &allow, now);
    let Ok(mut session) = hs.into_transport_mode() else {
        return;
    };
    assert!(conn.is_established(), "a genuine handshake establishes");
    while conn.poll_event().is_some() {}
    let mut sealed_ok = true;
    for frame in frames {
        let bytes = match frame {
            Frame::Sealed(plain) => {
                let plain = &plain[..plain.len().min(65_535 - TAG_LEN)];
                let mut out = vec![0u8; plain.len() + TAG_LEN];
                match session.write_message(plain, &mut out) {
                    Ok(n) => {
                        out.truncate(n);
                        out
                    }
                    Err(_) => return,
                }
            }
            Frame::Raw(raw) => {
                // Raw bytes in an established session fail decryption (or are empty).
                sealed_ok = raw.is_empty();
                raw
            }
        };
        let usable = conn.is_established();
        conn.handle_frame(&bytes, &allow, now);
        let mut transmits = Vec::new();
        while let Some(t) = conn.poll_transmit() {
            transmits.push(t);
        }
        while let Some(event) = conn.poll_event() {
            if let ConnEvent::Closed(Closed::Error(error)) = event {
                assert_eq!(
                    error.remote().peer,
                    Some(theirs.peer_id()),
                    "names the peer"
                );
                // A violation on a usable session is answered (one sealed Close).
                if usable && sealed_ok {
                    let mut plain = vec![0u8; 65_535];
                    let told = transmits
                        .iter()
                        .any(|t| session.read_message(t, &mut plain).is_ok());
                    assert!(told, "{error}: closed without Close{{ProtocolViolation}}");
                }
            }
        }
        if conn.is_closed() {
            return;
        }
    }
});
