//! Signed membership documents as a peer (or a file) may present them: decoding never
//! panics; whatever decodes re-encodes to itself and survives its human (TOML) form; and a
//! ledger offered a chain of such documents never panics, applies only documents that
//! follow each other under the signing rules (checked again here, independently), and
//! never moves backwards.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2p_handler_core::Keypair;
use p2p_handler_core::membership::{
    Digest, Document, GovernanceKey, Ledger, Member, Signed, check_successor,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// A genesis of network "fuzz", 2 of 3, signed by keys 0 and 1.
fn genesis() -> Signed {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let keys: Vec<GovernanceKey> = (0..3).map(|_| GovernanceKey::generate(&mut rng)).collect();
    let doc = Document {
        network: "fuzz".into(),
        epoch: 1,
        previous: Digest::NONE,
        expires: None,
        threshold: 2,
        committee: keys.iter().map(GovernanceKey::id).collect(),
        members: vec![Member {
            key: *Keypair::from_private_bytes([3; 32]).public_bytes(),
            name: Some("n".into()),
            address: None,
            allowed: Vec::new(),
            expires: None,
            record_key: None,
        }],
    };
    let mut signed = Signed::new(doc).expect("a valid genesis");
    signed.sign(&keys[0], &mut rng);
    signed.sign(&keys[1], &mut rng);
    signed
}

fuzz_target!(|data: &[u8]| {
    // Documents: a 2-byte length, then that many bytes, up to 4 of them.
    let mut chain = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 && chain.len() < 4 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        let bytes = &rest[..len.min(rest.len())];
        rest = &rest[bytes.len()..];
        if let Ok(doc) = Signed::decode(bytes) {
            assert_eq!(Signed::decode(&doc.encode()).as_ref(), Ok(&doc));
            let text = doc.to_toml();
            let back = Signed::from_toml(&text, "fuzz").expect("its own TOML reads back");
            assert_eq!(back.digest(), doc.digest());
            chain.push(doc);
        }
    }
    let mut ledger = Ledger::trusting(genesis(), 8);
    let before = ledger.epoch();
    let offered = ledger.offer(&chain, 1_800_000_000, false);
    let mut tip = genesis();
    for doc in &offered.applied {
        assert!(
            check_successor(&tip, doc).is_empty(),
            "applied a document that does not follow"
        );
        tip = doc.clone();
    }
    assert!(ledger.epoch() >= before);
});
