//! Message decoding: never panics, and whatever decodes encodes back to the same bytes'
//! meaning (decode(encode(m)) == m).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use p2p_handler_core::wire::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::decode(Bytes::copy_from_slice(data)) {
        let again = Message::decode(Bytes::from(message.encode()));
        assert_eq!(again.as_ref(), Ok(&message), "round trip of {message:?}");
    }
});
