//! Address records as a peer (or a shared folder) may present them. Two ways in, chosen by
//! the first byte: arbitrary bytes decoded as a sealed record and offered to a book (the
//! layout decoder and the checks before decryption); or an arbitrary body plaintext sealed
//! and signed correctly by a member (what a member with a broken encoder sends), so that
//! the body decoder and the book's rules on times, sequence numbers and addresses are
//! reached. Never a panic; whatever the book takes opens again to the same record, is
//! unexpired, lives within the bound, and its sequence number only grows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2p_handler_core::Keypair;
use p2p_handler_core::membership::{Digest, Document, GovernanceKey, Member};
use p2p_handler_core::records::{
    MAX_RECORD_TTL, Offer, RecordBook, RecordSigner, SealedRecord, open, seal_plaintext_for_fuzzing,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const NOW: u64 = 1_800_000_000;

fn document() -> Document {
    let members = (1u8..=3)
        .map(|seed| {
            let keypair = Keypair::from_private_bytes([seed; 32]);
            Member {
                key: *keypair.public_bytes(),
                name: None,
                address: None,
                // Member 3 may only use 10.0.0.3.
                allowed: if seed == 3 {
                    vec![[10, 0, 0, 3].into()]
                } else {
                    Vec::new()
                },
                expires: None,
                record_key: Some(RecordSigner::new(&keypair).record_key()),
            }
        })
        .collect();
    let mut doc = Document {
        network: "fuzz".into(),
        epoch: 1,
        previous: Digest::NONE,
        expires: None,
        threshold: 1,
        committee: vec![
            GovernanceKey::from_secret_bytes([1; 32])
                .expect("a key")
                .id(),
        ],
        members,
    };
    doc.check().expect("a valid document");
    doc
}

/// A body whose times sit near `NOW` and whose addresses are mostly well formed, from
/// arbitrary bytes: seq (1 byte), issue offset (i8 minutes), life (u16 minutes), then
/// addresses of 3 bytes each (last octet of 10.0.0.x and a port).
fn structured(bytes: &[u8]) -> Vec<u8> {
    let get = |i: usize| bytes.get(i).copied().unwrap_or(0);
    let issued = NOW.wrapping_add_signed(i64::from(get(1) as i8) * 60);
    let life = u64::from(u16::from_be_bytes([get(2), get(3)])) * 60;
    let mut out = Vec::new();
    out.extend_from_slice(&u64::from(get(0)).to_be_bytes());
    out.extend_from_slice(&issued.to_be_bytes());
    out.extend_from_slice(&issued.saturating_add(life).to_be_bytes());
    let addresses: Vec<&[u8]> = bytes.get(4..).unwrap_or(&[]).chunks(3).take(9).collect();
    out.push(addresses.len() as u8);
    for a in addresses {
        out.extend_from_slice(&[4, 10, 0, 0, a[0]]);
        out.extend_from_slice(&[
            a.get(1).copied().unwrap_or(0),
            a.get(2).copied().unwrap_or(0),
        ]);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let doc = document();
    let reader = RecordSigner::new(&Keypair::from_private_bytes([2; 32]));
    let mut book = RecordBook::new();
    let mut offers = Vec::new();
    if mode % 2 == 0 {
        if let Ok(sealed) = SealedRecord::decode(rest) {
            assert_eq!(SealedRecord::decode(sealed.bytes()).as_ref(), Ok(&sealed));
            offers.push(sealed);
        }
    } else {
        // Up to three bodies, each a 1-byte length then its bytes, sealed by member 1 or 3.
        let mut rng = ChaCha20Rng::seed_from_u64(u64::from(mode));
        let mut rest = rest;
        while let Some((&len, tail)) = rest.split_first() {
            let take = usize::from(len).min(tail.len());
            let (body, tail) = tail.split_at(take);
            rest = tail;
            // Mode 3 (mod 4): the bytes give fields near a valid record's instead.
            let body = if mode % 4 == 3 {
                structured(body)
            } else {
                body.to_vec()
            };
            let owner = if len % 2 == 0 { 1 } else { 3 };
            let signer = RecordSigner::new(&Keypair::from_private_bytes([owner; 32]));
            if let Ok(sealed) = seal_plaintext_for_fuzzing(&signer, body, &doc, &mut rng) {
                offers.push(sealed);
            }
            if offers.len() == 3 {
                break;
            }
        }
    }
    for sealed in offers {
        let peer = sealed.owner_id();
        let before = book.floor(&peer);
        if let Ok(Offer::Accepted { .. }) = book.offer(sealed.clone(), &doc, &reader, NOW) {
            let record = open(&sealed, &doc, &reader).expect("what the book took opens");
            assert_eq!(book.active(&peer, NOW), Some(&record));
            assert!(record.expires > NOW && record.expires - record.issued <= MAX_RECORD_TTL);
            assert!(before.is_none_or(|b| record.seq > b));
            assert!(!record.addresses.is_empty());
        }
    }
});
