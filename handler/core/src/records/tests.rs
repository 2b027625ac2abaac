//! Records: sealing, opening, and every refusal, one by one.

use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng as _;

use super::*;
use crate::membership::{Digest, Document, Member};

const NOW: u64 = 1_800_000_000;

fn keypair(seed: u8) -> Keypair {
    Keypair::from_private_bytes([seed; 32])
}

fn signer(seed: u8) -> RecordSigner {
    RecordSigner::new(&keypair(seed))
}

fn member(seed: u8, with_record_key: bool) -> Member {
    Member {
        key: *keypair(seed).public_bytes(),
        name: Some(format!("node-{seed}")),
        address: None,
        allowed: Vec::new(),
        expires: None,
        record_key: with_record_key.then(|| signer(seed).record_key()),
    }
}

/// Epoch `epoch` of network "test" with members 1, 2, 3 (record keys) and 4 (none).
fn document(epoch: u64) -> Document {
    let mut doc = Document {
        network: "test".into(),
        epoch,
        previous: if epoch == 1 {
            Digest::NONE
        } else {
            Digest([7; 32])
        },
        expires: None,
        threshold: 1,
        committee: vec![
            crate::membership::GovernanceKey::from_secret_bytes([1; 32])
                .unwrap()
                .id(),
        ],
        members: vec![
            member(1, true),
            member(2, true),
            member(3, true),
            member(4, false),
        ],
    };
    doc.check().unwrap();
    doc
}

fn record(seq: u64, port: u16) -> Record {
    Record {
        seq,
        issued: NOW,
        expires: NOW + 3600,
        addresses: vec![SocketAddr::from(([10, 0, 0, 1], port))],
    }
}

/// The entry of member `seed` in `doc` (members are kept in key order, not seed order).
fn entry(doc: &mut Document, seed: u8) -> &mut Member {
    let key = *keypair(seed).public_bytes();
    doc.members.iter_mut().find(|m| m.key == key).unwrap()
}

fn rng() -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(9)
}

fn sealed_by(seed: u8, rec: &Record, doc: &Document) -> SealedRecord {
    seal(&signer(seed), rec, doc, &mut rng()).unwrap()
}

#[test]
fn every_member_opens_what_another_sealed() {
    let doc = document(1);
    let sealed = sealed_by(1, &record(5, 7000), &doc);
    assert_eq!(sealed.owner_id(), keypair(1).peer_id());
    assert_eq!(sealed.owner_key(), keypair(1).public_bytes());
    assert_eq!((sealed.network(), sealed.epoch()), ("test", 1));
    let later = sealed_by(2, &record(5, 7000), &document(3));
    assert_eq!(
        (later.epoch(), later.owner_key()),
        (3, keypair(2).public_bytes())
    );
    for reader in [1, 2, 3, 4] {
        assert_eq!(
            open(&sealed, &doc, &signer(reader)).unwrap(),
            record(5, 7000),
            "member {reader}"
        );
    }
    // Its bytes decode to the same thing.
    assert_eq!(SealedRecord::decode(sealed.bytes()).unwrap(), sealed);
}

#[test]
fn an_outsider_learns_the_owner_and_sizes_only() {
    let doc = document(1);
    let sealed = sealed_by(1, &record(5, 7000), &doc);
    assert_eq!(
        open(&sealed, &doc, &signer(9)),
        Err(Refusal::Undecryptable(keypair(1).peer_id()))
    );
    // Neither the address nor the sequence number appears in the clear.
    let bytes = sealed.bytes();
    assert!(!bytes.windows(6).any(|w| w == [10, 0, 0, 1, 0x1b, 0x58]));
    assert!(!bytes.windows(8).any(|w| w == 5u64.to_be_bytes()));
}

#[test]
fn a_node_the_membership_lists_without_its_record_key_cannot_seal() {
    let doc = document(1);
    assert_eq!(
        seal(&signer(4), &record(1, 7000), &doc, &mut rng()),
        Err(SealError::NotListed {
            epoch: 1,
            key: signer(4).record_key()
        })
    );
    assert!(matches!(
        seal(&signer(9), &record(1, 7000), &doc, &mut rng()),
        Err(SealError::NotListed { .. })
    ));
}

#[test]
fn seal_refuses_records_no_one_should_take() {
    let doc = document(1);
    let mut none = record(1, 7000);
    none.addresses.clear();
    assert_eq!(
        seal(&signer(1), &none, &doc, &mut rng()),
        Err(SealError::Addresses(0))
    );
    let mut many = record(1, 7000);
    many.addresses = (1..=9)
        .map(|p| SocketAddr::from(([10, 0, 0, 1], p)))
        .collect();
    assert_eq!(
        seal(&signer(1), &many, &doc, &mut rng()),
        Err(SealError::Addresses(9))
    );
    let mut port0 = record(1, 0);
    assert!(matches!(
        seal(&signer(1), &port0, &doc, &mut rng()),
        Err(SealError::Undialable(_))
    ));
    port0.addresses = vec![SocketAddr::from(([0, 0, 0, 0], 7000))];
    assert!(matches!(
        seal(&signer(1), &port0, &doc, &mut rng()),
        Err(SealError::Undialable(_))
    ));
    let mut long = record(1, 7000);
    long.expires = long.issued + MAX_RECORD_TTL + 1;
    assert_eq!(
        seal(&signer(1), &long, &doc, &mut rng()),
        Err(SealError::Lifetime(MAX_RECORD_TTL + 1))
    );
    long.expires = long.issued + MAX_RECORD_TTL;
    assert!(seal(&signer(1), &long, &doc, &mut rng()).is_ok());
    long.expires = long.issued;
    assert_eq!(
        seal(&signer(1), &long, &doc, &mut rng()),
        Err(SealError::Lifetime(0))
    );
}

#[test]
fn a_record_not_signed_by_its_owner_is_refused() {
    let doc = document(1);
    // Member 2 writes a record naming member 1 as its owner, signed with its own key.
    let mut forger = signer(2);
    forger.static_private = *keypair(1).private_bytes();
    forger.static_public = *keypair(1).public_bytes();
    let forged = seal_unchecked(&forger, &record(99, 6666), &doc, &mut rng()).unwrap();
    assert_eq!(forged.owner_id(), keypair(1).peer_id());
    assert_eq!(
        open(&forged, &doc, &signer(3)),
        Err(Refusal::BadSignature(keypair(1).peer_id()))
    );
}

#[test]
fn any_byte_changed_breaks_the_signature() {
    let doc = document(1);
    let sealed = sealed_by(1, &record(5, 7000), &doc);
    let owner = keypair(1).peer_id();
    let bytes = sealed.bytes().to_vec();
    // After the owner key: slots, body length, body, signature (a change before it names
    // another owner or network, refused by its own rule).
    let owner_end = 4 + 1 + 1 + 4 + 8 + 32;
    for at in (owner_end..bytes.len()).step_by(7) {
        let mut changed = bytes.clone();
        changed[at] ^= 0x20;
        match SealedRecord::decode(&changed) {
            Err(_) => {}
            Ok(s) => assert_eq!(
                open(&s, &doc, &signer(2)),
                Err(Refusal::BadSignature(owner)),
                "byte {at}"
            ),
        }
    }
    // The epoch in the header is signed too.
    let mut changed = bytes.clone();
    changed[4 + 1 + 1 + 4 + 7] ^= 2;
    let s = SealedRecord::decode(&changed).unwrap();
    assert_eq!(
        open(&s, &doc, &signer(2)),
        Err(Refusal::BadSignature(owner))
    );
}

#[test]
fn records_of_non_members_other_networks_and_other_epochs_are_refused() {
    let doc = document(1);
    // Node 9 is not a member; it seals for a document of its own that lists it.
    let mut theirs = document(1);
    theirs.members.push(member(9, true));
    theirs.check().unwrap();
    let stranger = sealed_by(9, &record(1, 7000), &theirs);
    assert_eq!(
        open(&stranger, &doc, &signer(2)),
        Err(Refusal::NotMember(keypair(9).peer_id()))
    );
    // Member 4 has no record key: whatever it signs is refused.
    let mut four = document(1);
    entry(&mut four, 4).record_key = Some(signer(4).record_key());
    let unkeyed = sealed_by(4, &record(1, 7000), &four);
    assert_eq!(
        open(&unkeyed, &doc, &signer(2)),
        Err(Refusal::NoRecordKey(keypair(4).peer_id()))
    );
    let mut other = document(1);
    other.network = "other".into();
    let elsewhere = sealed_by(1, &record(1, 7000), &other);
    assert_eq!(
        open(&elsewhere, &doc, &signer(2)),
        Err(Refusal::OtherNetwork("other".into()))
    );
    let later = sealed_by(1, &record(1, 7000), &document(2));
    assert_eq!(
        open(&later, &doc, &signer(2)),
        Err(Refusal::OtherEpoch {
            peer: keypair(1).peer_id(),
            record: 2,
            ours: 1
        })
    );
}

#[test]
fn a_record_sealed_for_fewer_members_does_not_open() {
    // Sealed for epoch 1 as another membership had it (members 1, 2, 3 only): the slots
    // do not line up with ours, whoever reads.
    let mut smaller = document(1);
    smaller.members.truncate(3);
    let sealed = sealed_by(1, &record(1, 7000), &smaller);
    assert_eq!(
        open(&sealed, &document(1), &signer(2)),
        Err(Refusal::Undecryptable(keypair(1).peer_id()))
    );
}

#[test]
fn addresses_the_membership_forbids_are_refused() {
    let mut doc = document(1);
    entry(&mut doc, 1).allowed = vec![IpAddr::from([10, 0, 0, 1])];
    let ok = sealed_by(1, &record(1, 7000), &doc);
    assert!(open(&ok, &doc, &signer(2)).is_ok());
    let mut elsewhere = record(2, 7000);
    elsewhere
        .addresses
        .push(SocketAddr::from(([10, 0, 0, 2], 7000)));
    let sealed = sealed_by(1, &elsewhere, &doc);
    assert_eq!(
        open(&sealed, &doc, &signer(2)),
        Err(Refusal::ForbiddenAddress {
            peer: keypair(1).peer_id(),
            address: SocketAddr::from(([10, 0, 0, 2], 7000))
        })
    );
    // Port 0 and unspecified addresses, which only an unchecked sealer writes.
    let doc = document(1);
    for bad in [
        SocketAddr::from(([10, 0, 0, 1], 0)),
        SocketAddr::from(([0, 0, 0, 0], 7000)),
    ] {
        let mut rec = record(1, 7000);
        rec.addresses = vec![bad];
        let sealed = seal_unchecked(&signer(1), &rec, &doc, &mut rng()).unwrap();
        assert!(matches!(
            open(&sealed, &doc, &signer(2)),
            Err(Refusal::ForbiddenAddress { .. })
        ));
    }
}

#[test]
fn the_book_keeps_the_freshest_and_refuses_replays_and_rollbacks() {
    let doc = document(1);
    let reader = signer(2);
    let mut book = RecordBook::new();
    let peer = keypair(1).peer_id();
    let first = sealed_by(1, &record(5, 7000), &doc);
    assert_eq!(
        book.offer(first.clone(), &doc, &reader, NOW),
        Ok(Offer::Accepted {
            peer,
            previous: None
        })
    );
    // The same bytes again: a duplicate, not a refusal.
    assert_eq!(
        book.offer(first.clone(), &doc, &reader, NOW),
        Ok(Offer::Duplicate)
    );
    let moved = sealed_by(1, &record(6, 7001), &doc);
    assert_eq!(
        book.offer(moved, &doc, &reader, NOW),
        Ok(Offer::Accepted {
            peer,
            previous: Some(vec![SocketAddr::from(([10, 0, 0, 1], 7000))])
        })
    );
    assert_eq!(book.active(&peer, NOW).unwrap().addresses[0].port(), 7001);
    // The old one replayed (a rollback), and another with the same seq.
    assert_eq!(
        book.offer(first, &doc, &reader, NOW),
        Err(Refusal::Stale {
            peer,
            offered: 5,
            held: 6
        })
    );
    let same_seq = sealed_by(1, &record(6, 7002), &doc);
    assert_eq!(
        book.offer(same_seq, &doc, &reader, NOW),
        Err(Refusal::Stale {
            peer,
            offered: 6,
            held: 6
        })
    );
    assert_eq!(book.active(&peer, NOW).unwrap().addresses[0].port(), 7001);
    assert_eq!(book.seqs().collect::<Vec<_>>(), vec![(peer, 6)]);
}

#[test]
fn expired_and_future_records_are_refused_and_held_ones_expire() {
    let doc = document(1);
    let reader = signer(2);
    let peer = keypair(1).peer_id();
    let mut book = RecordBook::new();
    let rec = record(1, 7000);
    let sealed = sealed_by(1, &rec, &doc);
    assert!(matches!(
        book.offer(sealed.clone(), &doc, &reader, rec.expires),
        Err(Refusal::Expired { .. })
    ));
    let mut future = record(2, 7000);
    future.issued = NOW + MAX_CLOCK_SKEW + 1;
    future.expires = future.issued + 60;
    assert!(matches!(
        book.offer(sealed_by(1, &future, &doc), &doc, &reader, NOW),
        Err(Refusal::Expired { .. })
    ));
    // A record a careless owner gave a life beyond the bound.
    let mut long = record(3, 7000);
    long.expires = long.issued + MAX_RECORD_TTL + 1;
    let sealed_long = seal_unchecked(&signer(1), &long, &doc, &mut rng()).unwrap();
    assert!(matches!(
        book.offer(sealed_long, &doc, &reader, NOW),
        Err(Refusal::Expired { .. })
    ));
    assert!(book.is_empty());
    // One taken, then it expires: gone, and its floor stays.
    assert!(book.offer(sealed.clone(), &doc, &reader, NOW).is_ok());
    assert_eq!(book.next_expiry(), Some(rec.expires));
    assert!(book.active(&peer, rec.expires - 1).is_some());
    assert!(book.active(&peer, rec.expires).is_none());
    assert_eq!(book.expire(rec.expires - 1), Vec::<PeerId>::new());
    assert_eq!(book.expire(rec.expires), vec![peer]);
    assert!(book.is_empty());
    assert_eq!(book.floor(&peer), Some(1));
    let mut again = rec.clone();
    again.issued += 10;
    again.expires += 10;
    assert!(matches!(
        book.offer(sealed_by(1, &again, &doc), &doc, &reader, NOW + 20),
        Err(Refusal::Stale { .. })
    ));
}

#[test]
fn a_raised_floor_refuses_what_was_accepted_before_a_restart() {
    let doc = document(1);
    let mut book = RecordBook::new();
    let peer = keypair(1).peer_id();
    book.raise_floor(peer, 7);
    book.raise_floor(peer, 3);
    assert_eq!(book.floor(&peer), Some(7));
    assert!(matches!(
        book.offer(sealed_by(1, &record(7, 7000), &doc), &doc, &signer(2), NOW),
        Err(Refusal::Stale { held: 7, .. })
    ));
    assert!(
        book.offer(sealed_by(1, &record(8, 7000), &doc), &doc, &signer(2), NOW)
            .is_ok()
    );
    book.retain(|p| *p != peer);
    assert_eq!((book.len(), book.floor(&peer)), (0, None));
}

#[test]
fn the_decoder_refuses_every_malformation_by_name() {
    let doc = document(1);
    let bytes = sealed_by(1, &record(5, 7000), &doc).bytes().to_vec();
    for cut in 0..bytes.len() {
        assert!(
            SealedRecord::decode(&bytes[..cut]).is_err(),
            "a prefix of {cut} bytes"
        );
    }
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(SealedRecord::decode(&long), Err(DecodeError::Trailing(1)));
    let mut version = bytes.clone();
    version[4] = 2;
    assert!(matches!(
        SealedRecord::decode(&version),
        Err(DecodeError::Invalid {
            field: "version",
            ..
        })
    ));
    let huge = vec![0u8; MAX_RECORD_LEN + 1];
    assert!(matches!(
        SealedRecord::decode(&huge),
        Err(DecodeError::TooLong { .. })
    ));
    let mut epoch0 = bytes.clone();
    epoch0[10..18].fill(0);
    assert!(matches!(
        SealedRecord::decode(&epoch0),
        Err(DecodeError::Invalid { field: "epoch", .. })
    ));
}

#[test]
fn the_largest_record_is_within_the_bound() {
    let mut doc = document(1);
    doc.members = (0..crate::membership::MAX_MEMBERS)
        .map(|i| {
            let mut m = member(1, true);
            let seed = u16::try_from(i).unwrap().to_be_bytes();
            let mut private = [3u8; 32];
            private[2..4].copy_from_slice(&seed);
            m.key = *Keypair::from_private_bytes(private).public_bytes();
            m.record_key = None;
            m
        })
        .chain(std::iter::once(member(1, true)))
        .take(crate::membership::MAX_MEMBERS)
        .collect();
    doc.members[0] = member(1, true);
    doc.network = "n".repeat(crate::membership::MAX_NETWORK_LEN);
    doc.check().unwrap();
    let mut rec = record(u64::MAX, 7000);
    rec.addresses = (1..=MAX_RECORD_ADDRESSES as u16)
        .map(|p| SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 1], p)))
        .collect();
    let sealed = sealed_by(1, &rec, &doc);
    assert_eq!(sealed.bytes().len(), MAX_RECORD_LEN);
    assert_eq!(open(&sealed, &doc, &signer(1)).unwrap(), rec);
}

#[test]
fn sealing_is_deterministic_given_the_rng() {
    let doc = document(1);
    assert_eq!(
        sealed_by(1, &record(5, 7000), &doc).bytes(),
        sealed_by(1, &record(5, 7000), &doc).bytes()
    );
}

#[test]
fn a_record_key_is_the_nodes_own_and_differs_from_its_static_key() {
    assert_ne!(signer(1).record_key(), signer(2).record_key());
    assert_eq!(signer(1).record_key(), signer(1).record_key());
    assert_ne!(&signer(1).record_key().0, keypair(1).public_bytes());
    let text = signer(1).record_key().to_string();
    assert_eq!(RecordKeyId::from_hex(&text), Ok(signer(1).record_key()));
    assert!(RecordKeyId::from_hex("00").is_err());
}

proptest! {
    #[test]
    fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = SealedRecord::decode(&bytes);
        let _ = encoding::decode_body(&bytes);
    }

    #[test]
    fn changed_bytes_never_open_as_another_record(at in 0usize..400, bit in 0u8..8) {
        let doc = document(1);
        let sealed = sealed_by(1, &record(5, 7000), &doc);
        let mut bytes = sealed.bytes().to_vec();
        let at = at % bytes.len();
        bytes[at] ^= 1 << bit;
        if let Ok(s) = SealedRecord::decode(&bytes) {
            prop_assert!(open(&s, &doc, &signer(2)).is_err());
        }
    }
}

/// The test vector of `docs/PROTOCOL.md` section 9: printed by this test, and the document
/// must hold exactly it, so that a change of the format shows in review.
#[test]
fn the_protocol_document_gives_this_test_vector() {
    let mut doc = Document {
        network: "demo".into(),
        epoch: 1,
        previous: Digest::NONE,
        expires: None,
        threshold: 1,
        committee: vec![
            crate::membership::GovernanceKey::from_secret_bytes([1; 32])
                .unwrap()
                .id(),
        ],
        members: vec![member(3, true), member(4, true)],
    };
    for m in &mut doc.members {
        m.name = None;
    }
    doc.check().unwrap();
    let rec = Record {
        seq: 1_800_000_000_000,
        issued: 1_800_000_000,
        expires: 1_800_003_600,
        addresses: vec![SocketAddr::from(([10, 0, 0, 3], 7000))],
    };
    let sealed = seal(&signer(3), &rec, &doc, &mut ChaCha20Rng::from_seed([0; 32])).unwrap();
    let hex_text = hex::encode(sealed.bytes());
    let record_key = signer(3).record_key().to_string();
    println!("record key {record_key}\nsealed {hex_text}");
    let protocol = include_str!("../../../../docs/PROTOCOL.md").replace(['\n', ' '], "");
    for (what, value) in [("record key", &record_key), ("sealed record", &hex_text)] {
        assert!(
            protocol.contains(value.as_str()),
            "PROTOCOL.md lacks the {what}: {value}"
        );
    }
    assert_eq!(open(&sealed, &doc, &signer(4)).unwrap(), rec);
}

#[test]
fn the_protocol_bounds_are_those_section_9_states() {
    // Peers must agree on these: PROTOCOL.md section 9 gives them in words.
    assert_eq!(MAX_RECORD_TTL, 7 * 24 * 60 * 60);
    assert_eq!(MAX_CLOCK_SKEW, 10 * 60);
    assert_eq!(MAX_RECORD_ADDRESSES, 8);
    assert_eq!(SLOT_LEN, 80);
    assert_eq!(MAX_BODY_PLAIN + 16, 193);
}

#[test]
fn debug_output_names_records_and_keys_without_their_secrets() {
    let doc = document(1);
    let sealed = sealed_by(1, &record(5, 7000), &doc);
    let text = format!("{sealed:?}");
    assert!(text.contains(&keypair(1).peer_id().short()), "{text}");
    assert!(text.contains("test epoch 1"), "{text}");
    let signer_text = format!("{:?}", signer(1));
    assert!(
        signer_text.contains(&keypair(1).peer_id().short()),
        "{signer_text}"
    );
    assert!(!signer_text.contains(&hex::encode(keypair(1).private_bytes())));
    let key_text = format!("{:?}", signer(1).record_key());
    assert!(key_text.starts_with("RecordKeyId("), "{key_text}");
    assert!(key_text.contains(&hex::encode(&signer(1).record_key().0[..4])));
}

#[test]
fn every_refusal_has_the_label_protocol_md_names() {
    let peer = keypair(1).peer_id();
    let address = SocketAddr::from(([10, 0, 0, 1], 1));
    let all = [
        Refusal::Malformed(DecodeError::Trailing(1)),
        Refusal::OtherNetwork("x".into()),
        Refusal::NotMember(peer),
        Refusal::NoRecordKey(peer),
        Refusal::BadSignature(peer),
        Refusal::OtherEpoch {
            peer,
            record: 1,
            ours: 2,
        },
        Refusal::Undecryptable(peer),
        Refusal::Expired {
            peer,
            why: String::new(),
        },
        Refusal::Stale {
            peer,
            offered: 1,
            held: 1,
        },
        Refusal::ForbiddenAddress { peer, address },
    ];
    let protocol = include_str!("../../../../docs/PROTOCOL.md");
    let section = &protocol[protocol.find("## 9.").unwrap()..];
    let mut labels: Vec<&str> = all.iter().map(Refusal::label).collect();
    for label in &labels {
        assert!(
            section.contains(&format!("`{label}`")),
            "PROTOCOL.md section 9 does not name `{label}`"
        );
    }
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), all.len());
}

/// A sealed record's layout by hand (nothing sealed or signed): for the decoder's bounds.
fn layout(network: &[u8], slots: u16, body_len: u16) -> Vec<u8> {
    let mut out = b"P2PR\x01".to_vec();
    out.push(network.len() as u8);
    out.extend_from_slice(network);
    out.extend_from_slice(&1u64.to_be_bytes());
    out.extend_from_slice(&[7; 32]);
    out.extend_from_slice(&slots.to_be_bytes());
    out.extend(std::iter::repeat_n(0u8, usize::from(slots) * SLOT_LEN));
    out.extend_from_slice(&body_len.to_be_bytes());
    out.extend(std::iter::repeat_n(0u8, usize::from(body_len)));
    out.extend_from_slice(&[0; 64]);
    out
}

fn field_of(result: Result<SealedRecord, DecodeError>) -> &'static str {
    match result {
        Err(DecodeError::Invalid { field, .. }) => field,
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_layout_bounds_are_exact() {
    assert!(SealedRecord::decode(&layout(b"net", 1, 41)).is_ok());
    assert!(SealedRecord::decode(&layout(b"net", 1, 193)).is_ok());
    assert!(SealedRecord::decode(&layout(b"net", 1024, 41)).is_ok());
    assert_eq!(
        field_of(SealedRecord::decode(&layout(b"net", 1, 40))),
        "body"
    );
    assert_eq!(
        field_of(SealedRecord::decode(&layout(b"net", 1, 194))),
        "body"
    );
    assert_eq!(
        field_of(SealedRecord::decode(&layout(b"net", 0, 41))),
        "slots"
    );
    assert_eq!(
        field_of(SealedRecord::decode(&layout(b"net", 1025, 41))),
        "slots"
    );
    assert_eq!(
        field_of(SealedRecord::decode(&layout(b"", 1, 41))),
        "network"
    );
    assert_eq!(
        field_of(SealedRecord::decode(&layout(b"te$t", 1, 41))),
        "network"
    );
    assert_eq!(
        field_of(SealedRecord::decode(&layout(&[b'n'; 65], 1, 41))),
        "network"
    );
}

#[test]
fn a_body_without_an_address_or_with_too_many_is_malformed() {
    let doc = document(1);
    for count in [0usize, MAX_RECORD_ADDRESSES + 1] {
        let mut rec = record(1, 7000);
        rec.addresses = (0..count)
            .map(|p| SocketAddr::from(([10, 0, 0, 1], 7000 + p as u16)))
            .collect();
        let sealed = seal_unchecked(&signer(1), &rec, &doc, &mut rng());
        match sealed {
            // Nine addresses no longer fit a body: the layout refuses it at once.
            Err(SealError::Encoding(_)) => assert_eq!(count, MAX_RECORD_ADDRESSES + 1),
            Ok(sealed) => assert!(matches!(
                open(&sealed, &doc, &signer(2)),
                Err(Refusal::Malformed(DecodeError::Invalid {
                    field: "addresses",
                    ..
                }))
            )),
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn the_books_time_bounds_are_inclusive_where_the_protocol_says() {
    let doc = document(1);
    let reader = signer(2);
    // Exactly the longest life, and issued exactly the allowed skew ahead: taken.
    let mut longest = record(1, 7000);
    longest.expires = longest.issued + MAX_RECORD_TTL;
    let mut book = RecordBook::new();
    assert!(
        book.offer(
            seal_unchecked(&signer(1), &longest, &doc, &mut rng()).unwrap(),
            &doc,
            &reader,
            NOW
        )
        .is_ok()
    );
    assert_eq!((book.len(), book.is_empty()), (1, false));
    let mut ahead = record(2, 7000);
    ahead.issued = NOW + MAX_CLOCK_SKEW;
    ahead.expires = ahead.issued + 60;
    assert!(
        book.offer(sealed_by(1, &ahead, &doc), &doc, &reader, NOW)
            .is_ok()
    );
}
