//! Store rows, as read back from a data directory after a crash, a disk fault or tampering:
//! decoding never panics, whatever the tables, keys and values. A row set that decodes
//! restores an endpoint that then passes its invariants.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use p2p_handler_core::durable::{Table, decode};
use p2p_handler_core::{AllowList, Config, Endpoint, Keypair};

fuzz_target!(|data: &[u8]| {
    let me = Keypair::from_private_bytes([1; 32]).peer_id();
    let peer = Keypair::from_private_bytes([2; 32]).peer_id();
    // Rows: table (1 byte), key length (1), value length (2), key, value.
    let mut rows = Vec::new();
    let mut rest = data;
    while rest.len() >= 4 {
        let table = Table::ALL[usize::from(rest[0]) % Table::ALL.len()];
        let (klen, vlen) = (
            usize::from(rest[1]),
            usize::from(u16::from_be_bytes([rest[2], rest[3]])),
        );
        rest = &rest[4..];
        let key = rest[..klen.min(rest.len())].to_vec();
        rest = &rest[key.len()..];
        let value = rest[..vlen.min(rest.len())].to_vec();
        rest = &rest[value.len()..];
        rows.push((table, key, value));
    }
    if let Ok(recovered) = decode(me, rows) {
        let config = Config {
            dedupe_per_peer: 8,
            ..Config::default()
        };
        if let Ok(mut ep) = Endpoint::new(config, me, AllowList::from_peers([peer]), [0; 32]) {
            ep.restore(recovered, Instant::now(), 1_700_000_000_000);
            ep.check_invariants();
            let _ = ep.poll_journal();
        }
    }
});
