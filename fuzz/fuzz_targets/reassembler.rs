//! The reassembler fed arbitrary chunks: never panics, never yields a message over its
//! limit, and anything it yields survives chunking and reassembly again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2p_handler_core::wire::{MAX_MESSAGE_OVERHEAD, Reassembled, Reassembler, chunk_message};

const MAX: usize = 300;

fuzz_target!(|chunks: Vec<Vec<u8>>| {
    let mut r = Reassembler::new(MAX);
    for chunk in &chunks {
        match r.push(chunk) {
            // A connection closes on the first error; nothing after it is read.
            Err(_) => return,
            Ok(Reassembled::Message(message)) => {
                assert!(message.encoded_len() <= MAX + MAX_MESSAGE_OVERHEAD);
                let mut again = Reassembler::new(MAX);
                let mut out = None;
                for c in chunk_message(&message) {
                    if let Ok(Reassembled::Message(m)) = again.push(&c) {
                        out = Some(m);
                    }
                }
                assert_eq!(out.as_ref(), Some(&message));
            }
            Ok(_) => {}
        }
    }
});
