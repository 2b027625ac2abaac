//! The acceptance rules one by one, the encoding's canonicity, and the TOML forms.

use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use super::*;
use crate::identity::Keypair;

pub(crate) fn gov(seed: u64) -> GovernanceKey {
    GovernanceKey::generate(&mut ChaCha20Rng::seed_from_u64(1_000 + seed))
}

fn node(seed: u64) -> Keypair {
    Keypair::generate(&mut ChaCha20Rng::seed_from_u64(seed))
}

fn member(seed: u64) -> Member {
    Member {
        key: *node(seed).public_bytes(),
        name: Some(format!("node-{seed}")),
        address: Some(SocketAddr::from(([10, 0, 0, seed as u8], 7000))),
        allowed: Vec::new(),
        expires: None,
        record_key: None,
    }
}

/// A genesis of network "test" with committee `keys` (threshold `k`) and members
/// `members`, signed by the committee keys at positions `signers`.
pub(crate) fn genesis(keys: &[GovernanceKey], k: u8, members: &[u64], signers: &[usize]) -> Signed {
    let doc = Document {
        network: "test".into(),
        epoch: 1,
        previous: Digest::NONE,
        expires: None,
        threshold: k,
        committee: keys.iter().map(GovernanceKey::id).collect(),
        members: members.iter().map(|&s| member(s)).collect(),
    };
    sign_with(Signed::new(doc).unwrap(), keys, signers)
}

pub(crate) fn sign_with(mut signed: Signed, keys: &[GovernanceKey], signers: &[usize]) -> Signed {
    let mut rng = ChaCha20Rng::seed_from_u64(signed.epoch());
    for &i in signers {
        signed.sign(&keys[i], &mut rng);
    }
    signed
}

/// The successor of `current` with `members`, signed by `keys[signers]`.
pub(crate) fn next(
    current: &Signed,
    members: &[u64],
    keys: &[GovernanceKey],
    signers: &[usize],
) -> Signed {
    let mut doc = current.document().successor_template();
    doc.members = members.iter().map(|&s| member(s)).collect();
    sign_with(Signed::new(doc).unwrap(), keys, signers)
}

fn committee(n: u64) -> Vec<GovernanceKey> {
    (0..n).map(gov).collect()
}

fn codes(refused: &Refused) -> Vec<&'static str> {
    refused.reasons.iter().map(Refusal::code).collect()
}

const NOW: u64 = 1_800_000_000;

#[test]
fn encoding_round_trips_and_is_canonical() {
    let keys = committee(3);
    let mut g = genesis(&keys, 2, &[1, 2, 3], &[0, 1]);
    let bytes = g.document().encode();
    assert_eq!(Document::decode(&bytes).unwrap(), *g.document());
    let signed = g.encode();
    let back = Signed::decode(&signed).unwrap();
    assert_eq!(back, g);
    assert_eq!(back.encode(), signed);
    assert_eq!(back.digest(), g.digest());

    // Every strict prefix is truncated, never a panic; a byte more is trailing.
    for len in 0..bytes.len() {
        assert!(Document::decode(&bytes[..len]).is_err(), "prefix {len}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(Document::decode(&longer), Err(DecodeError::Trailing(1)));

    // Members out of order: one document has one encoding.
    let mut doc = g.document().clone();
    doc.members.swap(0, 1);
    let unsorted = encoding::encode_document(&doc);
    assert_eq!(unsorted, bytes, "the encoder sorts");
    let mut raw = bytes.clone();
    // Swap the first two member records in the raw bytes: the decoder refuses.
    let start = bytes.len() - 3 * member_len(&doc.members[0]);
    let len = member_len(&doc.members[0]);
    let (a, b) = (
        raw[start..start + len].to_vec(),
        raw[start + len..start + 2 * len].to_vec(),
    );
    raw[start..start + len].copy_from_slice(&b);
    raw[start + len..start + 2 * len].copy_from_slice(&a);
    let err = Document::decode(&raw).unwrap_err();
    assert!(err.to_string().contains("members"), "{err}");

    // Wrong magic, wrong version, oversized.
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(
        Document::decode(&bad)
            .unwrap_err()
            .to_string()
            .contains("magic")
    );
    let mut bad = bytes.clone();
    bad[4] = 3;
    assert!(
        Document::decode(&bad)
            .unwrap_err()
            .to_string()
            .contains("version")
    );
    let huge = vec![0u8; MAX_SIGNED_LEN + 1];
    assert!(matches!(
        Signed::decode(&huge),
        Err(DecodeError::TooLong { .. })
    ));

    // Signing changes nothing of the document.
    let before = g.digest();
    g.sign(&keys[2], &mut ChaCha20Rng::seed_from_u64(9));
    assert_eq!(g.digest(), before);
}

fn member_len(m: &Member) -> usize {
    32 + 1 + m.name.as_ref().map_or(0, String::len) + 8 + 1 + 6 + 1 + m.allowed.len() * 5
}

#[test]
fn bounds_of_every_field_are_checked() {
    let keys = committee(2);
    let good = genesis(&keys, 1, &[1], &[0]).document().clone();
    type Breaker = fn(&mut Document);
    let cases: Vec<(Breaker, &str)> = vec![
        (|d| d.network = String::new(), "network"),
        (|d| d.network = "a b".into(), "network"),
        (|d| d.network = "x".repeat(MAX_NETWORK_LEN + 1), "network"),
        (|d| d.epoch = 0, "epoch"),
        (|d| d.previous = Digest([1; 32]), "previous"),
        (|d| d.threshold = 0, "threshold"),
        (|d| d.threshold = 3, "threshold"),
        (|d| d.committee.clear(), "committee"),
        (|d| d.committee.push(d.committee[0]), "committee"),
        (|d| d.committee[0] = GovernanceId([0xff; 32]), "committee"),
        (|d| d.expires = Some(0), "expires"),
        (|d| d.members[0].name = Some("\n".into()), "name"),
        (
            |d| d.members[0].name = Some("n".repeat(MAX_NAME_LEN + 1)),
            "name",
        ),
        (
            |d| d.members[0].address = Some("10.0.0.1:0".parse().unwrap()),
            "address",
        ),
        (
            |d| {
                d.members[0].allowed = (0..=MAX_ALLOWED_IPS as u8)
                    .map(|i| IpAddr::from([10, 0, 0, i]))
                    .collect()
            },
            "addresses",
        ),
        (|d| d.members.push(d.members[0].clone()), "members"),
    ];
    for (break_it, field) in cases {
        let mut doc = good.clone();
        break_it(&mut doc);
        let err = Signed::new(doc.clone()).unwrap_err();
        assert!(err.to_string().contains(field), "{field}: {err}");
        // And what the encoder writes for it, the decoder refuses (an expiry of 0 is
        // written as "never", the one value the encoding cannot tell apart).
        if field != "expires" {
            assert!(
                Document::decode(&encoding::encode_document(&doc)).is_err(),
                "{field}"
            );
        }
    }
    let mut later = good.clone();
    later.epoch = 2;
    assert!(
        Signed::new(later)
            .unwrap_err()
            .to_string()
            .contains("previous")
    );
    let mut many = good;
    many.members = (0..=MAX_MEMBERS as u64).map(member).collect();
    assert!(
        Signed::new(many)
            .unwrap_err()
            .to_string()
            .contains("members")
    );
}

#[test]
fn the_signature_is_over_a_tagged_digest_only() {
    let keys = committee(1);
    let g = genesis(&keys, 1, &[1], &[0]);
    let sig = g.signatures()[0];
    assert!(sig.is_valid_for(&g.digest()));
    // Not valid for another digest, and not a signature of the raw digest (domain separated).
    assert!(!sig.is_valid_for(&Digest([7; 32])));
    let raw = secp256k1::schnorr::Signature::from_byte_array(sig.signature);
    let key = secp256k1::XOnlyPublicKey::from_byte_array(sig.signer.0).unwrap();
    assert!(secp256k1::schnorr::verify(&raw, &g.digest().0, &key).is_err());
    assert!(secp256k1::schnorr::verify(&raw, g.document_bytes(), &key).is_err());
    // The digest is the tagged hash of the encoding, so the encoding decides it.
    assert_eq!(
        g.digest().0,
        tagged_hash(DIGEST_TAG, &g.document().encode())
    );
    assert_ne!(
        g.digest().0,
        tagged_hash(SIGNATURE_TAG, &g.document().encode())
    );
}

#[test]
fn a_genesis_anchors_only_with_its_own_threshold() {
    let keys = committee(3);
    assert!(Ledger::with_anchor(genesis(&keys, 2, &[1], &[0, 2]), NOW, 8).is_ok());
    let err = Ledger::with_anchor(genesis(&keys, 2, &[1], &[1]), NOW, 8).unwrap_err();
    assert_eq!(codes(&err), ["under_threshold"]);
    // A later epoch is trusted as installed (its signers' committee is not in it).
    let g = genesis(&keys, 2, &[1], &[0, 1]);
    let e2 = next(&g, &[1, 2], &keys, &[]);
    assert_eq!(Ledger::with_anchor(e2, NOW, 8).unwrap().epoch(), 2);
    // Never an expired one.
    let mut doc = g.document().clone();
    doc.expires = Some(NOW - 1);
    let expired = sign_with(Signed::new(doc).unwrap(), &keys, &[0, 1]);
    let err = Ledger::with_anchor(expired, NOW, 8).unwrap_err();
    assert_eq!(codes(&err), ["expired"]);
}

#[test]
fn every_refusal_one_by_one() {
    let keys = committee(3);
    let stranger = gov(99);
    let g = genesis(&keys, 2, &[1, 2], &[0, 1]);
    let mut ledger = Ledger::with_anchor(g.clone(), NOW, 8).unwrap();

    let refuse = |ledger: &mut Ledger, doc: &Signed| {
        let out = ledger.offer(std::slice::from_ref(doc), NOW, false);
        assert!(out.applied.is_empty(), "{doc:?} applied");
        out
    };

    // Under threshold.
    let under = next(&g, &[1, 2, 3], &keys, &[0]);
    let out = refuse(&mut ledger, &under);
    assert_eq!(codes(&out.refused.unwrap()), ["under_threshold"]);
    // A signer outside the committee (even with the threshold met).
    let mut outsider = next(&g, &[1, 2, 3], &keys, &[0, 1]);
    outsider.sign(&stranger, &mut ChaCha20Rng::seed_from_u64(5));
    let out = refuse(&mut ledger, &outsider);
    assert_eq!(codes(&out.refused.unwrap()), ["unknown_signer"]);
    // The same signer twice does not count twice.
    let twice = next(&g, &[1, 2, 4], &keys, &[0, 0]);
    let out = refuse(&mut ledger, &twice);
    assert_eq!(
        codes(&out.refused.unwrap()),
        ["duplicate_signer", "under_threshold"]
    );
    // A bad signature: a signature of another document, relabelled.
    let mut bad = next(&g, &[1, 2, 5], &keys, &[0]);
    let other = next(&g, &[9], &keys, &[1]);
    bad.add_signature(other.signatures()[0]);
    let out = refuse(&mut ledger, &bad);
    assert_eq!(
        codes(&out.refused.unwrap()),
        ["bad_signature", "under_threshold"]
    );
    // Another network.
    let mut doc = g.document().successor_template();
    doc.network = "other".into();
    let foreign = sign_with(Signed::new(doc).unwrap(), &keys, &[0, 1]);
    let out = refuse(&mut ledger, &foreign);
    assert_eq!(codes(&out.refused.unwrap()), ["wrong_network"]);
    // A wrong previous digest.
    let mut doc = g.document().successor_template();
    doc.previous = Digest([3; 32]);
    let unchained = sign_with(Signed::new(doc).unwrap(), &keys, &[0, 1]);
    let out = refuse(&mut ledger, &unchained);
    assert_eq!(codes(&out.refused.unwrap()), ["wrong_previous"]);
    // Expired.
    let mut doc = g.document().successor_template();
    doc.expires = Some(NOW);
    let expired = sign_with(Signed::new(doc).unwrap(), &keys, &[0, 1]);
    let out = refuse(&mut ledger, &expired);
    assert_eq!(codes(&out.refused.unwrap()), ["expired"]);
    // A gap: epoch 3 while at 1; the node wants epoch 2.
    let e2 = next(&g, &[1, 2, 3], &keys, &[0, 1]);
    let e3 = next(&e2, &[1, 2, 3, 4], &keys, &[1, 2]);
    let out = refuse(&mut ledger, &e3);
    assert_eq!(codes(&out.refused.unwrap()), ["gap"]);
    assert_eq!(out.wanted, Some(2));
    assert_eq!(ledger.epoch(), 1, "nothing refused touched the ledger");

    // The good one, then the same again (a replay: nothing), then the genesis (rollback).
    let out = ledger.offer(std::slice::from_ref(&e2), NOW, false);
    assert_eq!(out.applied, vec![e2.clone()]);
    let out = ledger.offer(std::slice::from_ref(&e2), NOW, false);
    assert!(out.applied.is_empty() && out.refused.is_none() && out.fork.is_none());
    let elsewhere = next(&g, &[7], &keys, &[0, 2]);
    let out = ledger.offer(std::slice::from_ref(&e3), NOW, false);
    assert_eq!(out.applied, vec![e3.clone()]);
    // Rollback: an old, valid document the node moved past; and one it never held.
    let mut fresh = Ledger::with_anchor(e3.clone(), NOW, 8).unwrap();
    let out = fresh.offer(std::slice::from_ref(&e2), NOW, false);
    assert_eq!(codes(&out.refused.unwrap()), ["stale"]);
    // A fork: a second epoch 2, validly signed by epoch 1's committee.
    let out = ledger.offer(std::slice::from_ref(&elsewhere), NOW, false);
    let fork = out.fork.expect("a fork");
    assert_eq!(
        (fork.epoch, fork.ours, fork.theirs),
        (2, e2.digest(), elsewhere.digest())
    );
    assert!(out.applied.is_empty() && ledger.epoch() == 3);
    // Raised once.
    let out = ledger.offer(std::slice::from_ref(&elsewhere), NOW, false);
    assert!(out.fork.is_none() && out.refused.is_none());
    assert_eq!(ledger.forks().count(), 1);
    // A second epoch 2 *not* validly signed is no fork, just refused.
    let fake = next(&g, &[8], &keys, &[0]);
    let out = ledger.offer(std::slice::from_ref(&fake), NOW, false);
    assert!(out.fork.is_none());
    assert_eq!(codes(&out.refused.unwrap()), ["under_threshold"]);
}

#[test]
fn a_refusal_is_reported_once() {
    let keys = committee(2);
    let g = genesis(&keys, 2, &[1], &[0, 1]);
    let mut ledger = Ledger::with_anchor(g.clone(), NOW, 8).unwrap();
    let under = next(&g, &[2], &keys, &[0]);
    assert!(
        ledger
            .offer(std::slice::from_ref(&under), NOW, false)
            .refused
            .is_some()
    );
    let again = ledger.offer(std::slice::from_ref(&under), NOW, false);
    assert!(again.refused.is_none() && again.applied.is_empty());
    // A gap is not final: once the missing epoch is in, the same document passes.
    let e2 = next(&g, &[2], &keys, &[0, 1]);
    let e3 = next(&e2, &[3], &keys, &[0, 1]);
    assert!(
        ledger
            .offer(std::slice::from_ref(&e3), NOW, false)
            .refused
            .is_some()
    );
    assert!(
        ledger
            .offer(std::slice::from_ref(&e3), NOW, false)
            .refused
            .is_some()
    );
    let out = ledger.offer(&[e2, e3.clone()], NOW, false);
    assert_eq!(out.applied.last(), Some(&e3));
}

#[test]
fn a_committee_change_needs_both_thresholds() {
    let old = committee(3);
    let new: Vec<GovernanceKey> = (10..13).map(gov).collect();
    let g = genesis(&old, 2, &[1], &[0, 1]);
    let mut doc = g.document().successor_template();
    doc.committee = new.iter().map(GovernanceKey::id).collect();
    doc.members = vec![member(1)];
    let unsigned = Signed::new(doc).unwrap();

    let mut ledger = Ledger::with_anchor(g.clone(), NOW, 8).unwrap();
    // The old committee alone: refused, the new committee never agreed.
    let only_old = sign_with(unsigned.clone(), &old, &[0, 1]);
    let out = ledger.offer(std::slice::from_ref(&only_old), NOW, false);
    assert_eq!(
        codes(&out.refused.unwrap()),
        ["new_committee_under_threshold"]
    );
    // The new committee alone: refused, the old one never approved.
    let only_new = sign_with(unsigned.clone(), &new, &[0, 1, 2]);
    let out = ledger.offer(std::slice::from_ref(&only_new), NOW, false);
    assert_eq!(codes(&out.refused.unwrap()), ["under_threshold"]);
    // Both: accepted, and from then on only the new committee signs.
    let both = sign_with(sign_with(unsigned, &old, &[1, 2]), &new, &[0, 2]);
    assert_eq!(
        ledger
            .offer(std::slice::from_ref(&both), NOW, false)
            .applied
            .len(),
        1
    );
    let by_old = next(&both, &[1, 2], &old, &[0, 1, 2]);
    let out = ledger.offer(std::slice::from_ref(&by_old), NOW, false);
    assert_eq!(codes(&out.refused.unwrap())[0], "unknown_signer");
    let by_new = next(&both, &[1, 2], &new, &[1, 2]);
    assert_eq!(
        ledger
            .offer(std::slice::from_ref(&by_new), NOW, false)
            .applied
            .len(),
        1
    );
    // A threshold change alone is a committee change too.
    let mut doc = by_new.document().successor_template();
    doc.threshold = 3;
    let stricter = sign_with(Signed::new(doc).unwrap(), &new, &[0, 1]);
    let out = ledger.offer(std::slice::from_ref(&stricter), NOW, false);
    assert_eq!(
        codes(&out.refused.unwrap()),
        ["new_committee_under_threshold"]
    );
}

#[test]
fn chains_catch_up_and_expiry_binds_only_the_newest() {
    let keys = committee(2);
    let g = genesis(&keys, 1, &[1], &[0]);
    let mut chain = vec![g.clone()];
    for epoch in 2..=6u64 {
        let prev = chain.last().unwrap();
        let mut doc = prev.document().successor_template();
        doc.members = vec![member(epoch)];
        // Epochs 2..=5 expired long ago: superseded, that is fine.
        doc.expires = (epoch < 6).then_some(NOW - 100);
        chain.push(sign_with(Signed::new(doc).unwrap(), &keys, &[1]));
    }
    let mut ledger = Ledger::with_anchor(g.clone(), NOW, 4).unwrap();
    let out = ledger.offer(&chain[1..], NOW, false);
    assert_eq!(out.applied.len(), 5);
    assert!(out.refused.is_none());
    assert_eq!(ledger.epoch(), 6);
    // The history keeps the newest 4.
    let held: Vec<u64> = ledger.history().map(Signed::epoch).collect();
    assert_eq!(held, [3, 4, 5, 6]);
    assert_eq!(ledger.chain_after(2, usize::MAX).len(), 4);
    assert!(
        ledger.chain_after(1, usize::MAX).is_empty(),
        "epoch 2 is gone"
    );
    assert!(ledger.chain_after(6, usize::MAX).is_empty());
    let one = chain[3].encode().len();
    assert_eq!(ledger.chain_after(2, one).len(), 1);
    assert!(ledger.chain_after(2, one - 1).is_empty());

    // A chain whose newest expired: the prefix up to the last unexpired one is applied.
    let mut fresh = Ledger::with_anchor(g.clone(), NOW, 8).unwrap();
    let mut doc = chain[1].document().clone();
    doc.expires = None;
    let e2 = sign_with(Signed::new(doc).unwrap(), &keys, &[0]);
    let mut doc = e2.document().successor_template();
    doc.expires = Some(NOW - 1);
    let e3 = sign_with(Signed::new(doc).unwrap(), &keys, &[0]);
    let out = fresh.offer(&[e2.clone(), e3.clone()], NOW, false);
    assert_eq!(out.applied, vec![e2]);
    assert_eq!(codes(&out.refused.unwrap()), ["expired"]);
    // Unless the sender holds a newer epoch still: then it is the start of a longer chain.
    let out = fresh.offer(std::slice::from_ref(&e3), NOW, true);
    assert_eq!(out.applied, vec![e3]);
}

#[test]
fn restore_checks_every_link_of_the_stored_chain() {
    let keys = committee(2);
    let g = genesis(&keys, 2, &[1], &[0, 1]);
    let e2 = next(&g, &[2], &keys, &[0, 1]);
    let e3 = next(&e2, &[3], &keys, &[0, 1]);
    let ledger = Ledger::restore(vec![e3.clone(), g.clone(), e2.clone()], 8)
        .unwrap()
        .unwrap();
    assert_eq!((ledger.epoch(), ledger.digest()), (3, e3.digest()));
    assert!(Ledger::restore(Vec::new(), 8).unwrap().is_none());
    // A stored document that does not follow: named.
    let forged = next(&e2, &[9], &keys, &[0]);
    let err = Ledger::restore(vec![g, e2, forged], 8).unwrap_err();
    assert_eq!((err.epoch, codes(&err)[0]), (3, "under_threshold"));
}

#[test]
fn the_toml_form_round_trips_and_catches_edits() {
    let keys = committee(3);
    let mut g = genesis(&keys, 2, &[1, 2], &[0, 2]);
    let mut doc = g.document().clone();
    doc.expires = Some(1_798_761_600);
    doc.members[0].allowed = vec!["10.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
    doc.members[1].expires = Some(1_798_761_662);
    doc.members[1].name = Some("quote \" and ünïcode".into());
    g = sign_with(Signed::new(doc).unwrap(), &keys, &[0, 2]);
    let text = g.to_toml();
    assert!(text.contains("expires = 2027-01-01T00:00:00Z"), "{text}");
    let back = Signed::from_toml(&text, "doc.toml").unwrap();
    assert_eq!(back, g);

    // An edit after writing: the digest no longer matches, and the error says so.
    let edited = text.replace("threshold = 2", "threshold = 1");
    let err = Signed::from_toml(&edited, "doc.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("doc.toml") && err.contains("digest") && err.contains("edited"),
        "{err}"
    );
    // Without its digest line, it reads (and its old signatures would then fail to verify).
    let undigested: String = edited
        .lines()
        .filter(|l| !l.starts_with("digest"))
        .map(|l| format!("{l}\n"))
        .collect();
    let changed = Signed::from_toml(&undigested, "doc.toml").unwrap();
    assert_ne!(changed.digest(), g.digest());
    assert!(
        changed
            .signatures()
            .iter()
            .all(|s| !s.is_valid_for(&changed.digest()))
    );

    // Errors name file, line and field.
    let k = keys[0].id();
    let cases = [
        (
            format!(
                "network = \"n\"\nepoch = 1\nthreshold = 1\ncommittee = [\"{k}\"]\n[[peer]]\nid = \"{}\"\n",
                node(1).peer_id()
            ),
            "line 5",
            "key",
        ),
        (
            "network = \"n\"\nepoch = 1\nthreshold = 1\ncommittee = [\"abc\"]\n".to_owned(),
            "line 4",
            "committee",
        ),
        (
            format!(
                "network = \"n\"\nepoch = 1\nthreshold = 1\ncommittee = [\"{k}\"]\n[[peer]]\nkey = \"{}\"\nexpires = \"30d\"\n",
                hex::encode(node(1).public_bytes())
            ),
            "line 7",
            "date-time",
        ),
        (
            format!(
                "network = \"n\"\nepoch = 1\nthreshold = 1\ncommittee = [\"{k}\"]\nmembers = 3\n"
            ),
            "line 5",
            "members",
        ),
        (
            format!("network = \"n\"\nepoch = 1\nthreshold = 2\ncommittee = [\"{k}\"]\n"),
            "",
            "threshold",
        ),
        (
            format!(
                "network = \"n\"\nepoch = 1\nthreshold = 1\ncommittee = [\"{k}\"]\n[[signature]]\nsigner = \"{k}\"\nsignature = \"00\"\n"
            ),
            "line 7",
            "signature",
        ),
        (
            format!(
                "network = \"n\"\nepoch = 1\nthreshold = 1\ncommittee = [\"{k}\"]\n[[peer]]\nkey = \"{}\"\nid = \"{}\"\n",
                hex::encode(node(1).public_bytes()),
                node(2).peer_id()
            ),
            "line 5",
            "id",
        ),
    ];
    for (text, line, field) in cases {
        let err = Signed::from_toml(&text, "doc.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("doc.toml") && err.contains(line) && err.contains(field),
            "{line} {field}: {err}"
        );
    }
}

#[test]
fn signature_files_and_members_files() {
    let keys = committee(2);
    let g = genesis(&keys, 1, &[1], &[0]);
    let file = SignatureFile {
        network: "test".into(),
        epoch: 1,
        digest: g.digest(),
        signature: g.signatures()[0],
    };
    let text = file.to_toml();
    assert_eq!(SignatureFile::from_toml(&text, "sig.toml").unwrap(), file);
    let err = SignatureFile::from_toml(&text.replace("epoch = 1", "epoch = -1"), "sig.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("sig.toml") && err.contains("epoch"), "{err}");

    let (a, b) = (node(1), node(2));
    let text = format!(
        "[[peer]]\nkey = \"{}\"\nname = \"a\"\naddress = \"10.0.0.1:7000\"\nexpires = \"1h\"\n\n\
         [[peer]]\nkey = \"{}\"\nid = \"{}\"\naddresses = [\"10.0.0.2\"]\n",
        hex::encode(a.public_bytes()),
        hex::encode(b.public_bytes()),
        b.peer_id()
    );
    let members = Document::members_from_toml(&text, "members.toml", NOW).unwrap();
    assert_eq!(members.len(), 2);
    let ma = members.iter().find(|m| m.peer_id() == a.peer_id()).unwrap();
    assert_eq!(ma.expires, Some(NOW + 3_600));
    assert_eq!(ma.address, Some("10.0.0.1:7000".parse().unwrap()));
    // An entry with only an id cannot be a member: its key is needed.
    let err = Document::members_from_toml(
        &format!("[[peer]]\nid = \"{}\"\n", a.peer_id()),
        "m.toml",
        NOW,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("m.toml") && err.contains("key"), "{err}");
}

#[test]
fn governance_key_files_are_not_node_keys() {
    let key = gov(1);
    let text = key.to_file_text();
    let back = GovernanceKey::from_file_text(&text, "gov.key").unwrap();
    assert_eq!(back.id(), key.id());
    // A node's key file (bare hex) is refused, and a governance key is no node key.
    let err = GovernanceKey::from_file_text(&node(1).to_hex(), "node.key")
        .unwrap_err()
        .to_string();
    assert!(err.contains("node.key") && err.contains("keygen"), "{err}");
    assert!(Keypair::from_hex(&text).is_err());
    assert!(format!("{key:?}").contains(&key.id().short()));
    assert!(!format!("{key:?}").contains(&hex::encode(key.keypair.to_secret_bytes())));
    let err = GovernanceKey::from_file_text(
        &format!("{GOVERNANCE_KEY_HEADER}\n{}\n", "00".repeat(32)),
        "z.key",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a valid"), "{err}");
}

#[test]
fn fork_prone_committees_are_flagged() {
    let keys = committee(4);
    assert!(genesis(&keys, 2, &[], &[0, 1]).document().fork_prone());
    assert!(!genesis(&keys, 3, &[], &[0, 1, 2]).document().fork_prone());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any committee size, threshold and set of signers: accepted exactly when the distinct
    /// valid signers reach the threshold and every signature is good.
    #[test]
    fn acceptance_is_exactly_the_threshold_rule(
        n in 1usize..=6,
        k_seed in 0usize..6,
        signers in proptest::collection::vec(0usize..6, 0..8),
        corrupt in proptest::option::of(0usize..8),
    ) {
        let keys = committee(n as u64);
        let k = (k_seed % n + 1) as u8;
        let signers: Vec<usize> = signers.into_iter().map(|s| s % n).collect();
        let g = genesis(&keys, k, &[1], &(0..usize::from(k)).collect::<Vec<_>>());
        let mut ledger = Ledger::with_anchor(g.clone(), NOW, 8).unwrap();
        let mut e2 = next(&g, &[1, 2], &keys, &signers);
        let mut corrupted = false;
        if let Some(i) = corrupt.filter(|&i| i < e2.signatures.len()) {
            e2.signatures[i].signature[7] ^= 1;
            corrupted = true;
        }
        let distinct: std::collections::BTreeSet<usize> = signers.iter().copied().collect();
        let duplicated = distinct.len() != signers.len();
        let should = !corrupted && !duplicated && distinct.len() >= usize::from(k);
        let out = ledger.offer(std::slice::from_ref(&e2), NOW, false);
        prop_assert_eq!(out.applied.len() == 1, should, "{:?}", out.refused);
        prop_assert_eq!(ledger.epoch(), if should { 2 } else { 1 });
    }

    /// Decoding arbitrary bytes never panics, and whatever decodes re-encodes to itself.
    #[test]
    fn decoding_is_total_and_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(doc) = Document::decode(&bytes) {
            prop_assert_eq!(doc.encode(), bytes.clone());
        }
        if let Ok(signed) = Signed::decode(&bytes) {
            prop_assert_eq!(signed.encode(), bytes);
        }
    }

    /// Mutating one byte of a valid signed document never yields an accepted successor
    /// with other contents.
    #[test]
    fn a_flipped_byte_never_passes(at in 0usize..2000, bit in 0u8..8) {
        let keys = committee(3);
        let g = genesis(&keys, 2, &[1], &[0, 1]);
        let e2 = next(&g, &[1, 2], &keys, &[1, 2]);
        let mut bytes = e2.encode();
        let at = at % bytes.len();
        bytes[at] ^= 1 << bit;
        if let Ok(mutated) = Signed::decode(&bytes) {
            let mut ledger = Ledger::with_anchor(g, NOW, 8).unwrap();
            let out = ledger.offer(std::slice::from_ref(&mutated), NOW, false);
            if !out.applied.is_empty() {
                // Only the signatures' bytes outside the document may differ; the document
                // is exactly the one the committee signed.
                prop_assert_eq!(mutated.document(), e2.document());
            }
        }
    }
}

/// The test vector of `docs/PROTOCOL.md` section 8: a genesis of network "demo", committee
/// of the governance keys with secrets 0x01..01 and 0x02..02 (threshold 1), one member (the
/// node key with private bytes 0x03..03, named "n1", at 10.0.0.1:7000), signed by the first
/// key with auxiliary randomness 0x00..00. A second implementation must get the same bytes.
#[test]
fn the_protocol_documents_test_vector_holds() {
    let k1 = GovernanceKey::from_secret_bytes([1; 32]).unwrap();
    let k2 = GovernanceKey::from_secret_bytes([2; 32]).unwrap();
    let doc = Document {
        network: "demo".into(),
        epoch: 1,
        previous: Digest::NONE,
        expires: None,
        threshold: 1,
        committee: vec![k1.id(), k2.id()],
        members: vec![Member {
            key: *Keypair::from_private_bytes([3; 32]).public_bytes(),
            name: Some("n1".into()),
            address: Some(SocketAddr::from(([10, 0, 0, 1], 7000))),
            allowed: Vec::new(),
            expires: None,
            record_key: None,
        }],
    };
    let mut signed = Signed::new(doc).unwrap();
    struct Zeros;
    impl rand_core::TryRng for Zeros {
        type Error = core::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            Ok(0)
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            Ok(0)
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
            dst.fill(0);
            Ok(())
        }
    }
    signed.sign(&k1, &mut Zeros);
    let document = hex::encode(signed.document_bytes());
    let digest = signed.digest().to_string();
    let encoded = hex::encode(signed.encode());
    let protocol = include_str!("../../../../docs/PROTOCOL.md").replace(['\n', ' '], "");
    for (what, value) in [
        ("document", &document),
        ("digest", &digest),
        ("signed", &encoded),
    ] {
        assert!(
            protocol.contains(value.as_str()),
            "PROTOCOL.md lacks the {what}: {value}"
        );
    }
}

/// A document with every field at its bound: the longest there can be.
fn largest() -> Document {
    let keys = committee(MAX_COMMITTEE as u64);
    let record_key =
        crate::records::RecordSigner::new(&Keypair::from_private_bytes([5; 32])).record_key();
    let members = (0..MAX_MEMBERS)
        .map(|i| {
            let mut key = [0u8; KEY_LEN];
            key[..2].copy_from_slice(&u16::try_from(i).unwrap().to_be_bytes());
            Member {
                key,
                name: Some("n".repeat(MAX_NAME_LEN)),
                address: Some(SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 1], 7000))),
                allowed: (0..MAX_ALLOWED_IPS as u16)
                    .map(|j| IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, j]))
                    .collect(),
                expires: Some(NOW),
                record_key: Some(record_key),
            }
        })
        .collect();
    Document {
        network: "n".repeat(MAX_NETWORK_LEN),
        epoch: 2,
        previous: Digest([1; 32]),
        expires: Some(NOW),
        threshold: 1,
        committee: keys.iter().map(GovernanceKey::id).collect(),
        members,
    }
}

#[test]
fn every_bound_is_reached_exactly_and_one_more_is_refused() {
    let doc = Signed::new(largest()).unwrap().document().clone();
    let bytes = doc.encode();
    assert_eq!(
        bytes.len(),
        MAX_DOCUMENT_LEN,
        "the bound is the largest document"
    );
    assert!(Document::decode(&bytes).unwrap() == doc);
    let mut signed = Signed::new(doc.clone()).unwrap();
    let keys = committee(MAX_COMMITTEE as u64);
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    for key in keys.iter().chain(&keys).chain(&keys[..1]) {
        signed.sign(key, &mut rng);
    }
    assert_eq!(
        signed.signatures().len(),
        MAX_SIGNATURES,
        "one over is dropped"
    );
    assert_eq!(signed.encode().len(), MAX_SIGNED_LEN);
    assert!(Signed::decode(&signed.encode()).unwrap() == signed);
    assert!(signed.document_bytes().as_ref() == bytes.as_slice());

    // One more of anything is refused, naming the field.
    let over = |edit: &dyn Fn(&mut Document), field: &str| {
        let mut d = doc.clone();
        edit(&mut d);
        let err = Signed::new(d).unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
    };
    over(&|d| d.network.push('n'), "network");
    over(&|d| d.committee.push(gov(99).id()), "committee");
    over(
        &|d| {
            let mut m = d.members[0].clone();
            m.key = [0xff; KEY_LEN];
            d.members.push(m);
        },
        "members",
    );
    over(&|d| d.members[0].name.as_mut().unwrap().push('n'), "name");
    over(
        &|d| d.members[0].allowed.push(IpAddr::from([10, 0, 0, 1])),
        "addresses",
    );
    over(&|d| d.network.clear(), "network");
    over(
        &|d| d.previous = Digest::NONE,
        "names the digest of the one before",
    );
    over(
        &|d| {
            d.epoch = 1;
        },
        "names no previous document",
    );
    over(&|d| d.committee.clear(), "committee");
    over(&|d| d.members[0].name = Some(String::new()), "name");
}

#[test]
fn names_for_people_and_the_allow_list_a_document_stands_for() {
    let keys = committee(3);
    let g = genesis(&keys, 2, &[1, 2], &[0, 1]);
    let digest = g.digest();
    assert_eq!(digest.short(), hex::encode(&digest.0[..4]));
    assert_eq!(format!("{digest:?}"), format!("Digest({})", digest.short()));
    assert_eq!(keys[0].id().short(), hex::encode(&keys[0].id().0[..4]));
    let ids: Vec<PeerId> = g.document().member_ids().collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|id| g.document().member(id).is_some()));
    // The allow list: every member, its key, address, allowed IPs and expiry.
    let mut doc = g.document().clone();
    doc.members[0].expires = Some(NOW);
    doc.members[0].allowed = vec![IpAddr::from([10, 9, 9, 9])];
    let list = doc.allow_list();
    let first = list.get(&doc.members[0].peer_id()).unwrap();
    assert_eq!(first.public_key, Some(doc.members[0].key));
    assert_eq!(first.address, doc.members[0].address);
    assert_eq!(first.addresses, vec![IpAddr::from([10, 9, 9, 9])]);
    assert_eq!(
        first.expires,
        Some(crate::allow_list::Expiry::At(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(NOW)
        ))
    );
    assert!(list.get(&doc.members[1].peer_id()).is_some());
    // Fork-prone: two disjoint sets of signers can each reach the threshold.
    let prone = |k: u8, n: u64| {
        let mut d = doc.clone();
        d.threshold = k;
        d.committee = committee(n).iter().map(GovernanceKey::id).collect();
        d.committee.sort_unstable();
        d.fork_prone()
    };
    assert!(prone(1, 2) && prone(2, 4) && prone(1, 3));
    assert!(!prone(2, 3) && !prone(3, 4) && !prone(1, 1));
}

#[test]
fn files_are_read_and_named_in_errors_and_a_refusal_lists_every_reason() {
    let dir = std::env::temp_dir().join(format!("p2p-membership-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = committee(3);
    let g = genesis(&keys, 2, &[1, 2], &[0, 1]);
    let e2 = next(&g, &[1, 2, 3], &keys, &[0, 1]);
    // The genesis names no previous document; its successor does.
    assert!(!g.to_toml().contains("previous ="));
    assert!(
        e2.to_toml()
            .contains(&format!("previous = \"{}\"", g.digest()))
    );
    let doc_path = dir.join("epoch-2.toml");
    std::fs::write(&doc_path, e2.to_toml()).unwrap();
    assert_eq!(Signed::from_file(&doc_path).unwrap(), e2);
    let members_path = dir.join("members.toml");
    std::fs::write(
        &members_path,
        format!(
            "[[peer]]\nkey = \"{}\"\nname = \"a\"\n",
            hex::encode(node(7).public_bytes())
        ),
    )
    .unwrap();
    let members = Document::members_from_file(&members_path, NOW).unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].name.as_deref(), Some("a"));
    let missing = dir.join("missing.toml");
    let err = Signed::from_file(&missing).unwrap_err().to_string();
    assert!(err.contains("missing.toml"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);

    // Every reason is told, in order, after the epoch and digest.
    let refused = Refused {
        epoch: 2,
        digest: e2.digest(),
        reasons: vec![
            Refusal::Gap {
                epoch: 3,
                current: 1,
            },
            Refusal::Expired {
                expires: NOW,
                now: NOW + 1,
            },
        ],
    };
    let prefix = format!("epoch 2 ({}) refused: ", e2.digest().short());
    let (first, second) = (&refused.reasons[0], &refused.reasons[1]);
    assert_eq!(refused.to_string(), format!("{prefix}{first}; {second}"));
    let single = Refused {
        reasons: refused.reasons[..1].to_vec(),
        ..refused.clone()
    };
    assert_eq!(single.to_string(), format!("{prefix}{first}"));
}

#[test]
fn forks_are_remembered_each_once_and_a_genesis_can_fork_too() {
    let keys = committee(3);
    let g = genesis(&keys, 1, &[1, 2], &[0]);
    let e2 = next(&g, &[1, 2], &keys, &[0]);
    let mut ledger = Ledger::with_anchor(g.clone(), NOW, 8).unwrap();
    assert_eq!(
        ledger
            .offer(std::slice::from_ref(&e2), NOW, false)
            .applied
            .len(),
        1
    );
    // Two other documents for epoch 2, each validly signed: two forks, both remembered.
    let f1 = next(&g, &[1], &keys, &[1]);
    let f2 = next(&g, &[2], &keys, &[2]);
    for fork in [&f1, &f2] {
        let out = ledger.offer(std::slice::from_ref(fork), NOW, false);
        assert_eq!(out.fork.map(|f| f.theirs), Some(fork.digest()));
    }
    assert_eq!(ledger.forks().count(), 2);
    // The first fork again, with one more signature (another copy): known, not raised.
    let mut again = f1.clone();
    again.sign(&keys[2], &mut ChaCha20Rng::seed_from_u64(5));
    let out = ledger.offer(&[again], NOW, false);
    assert!(out.fork.is_none() && out.refused.is_none(), "{out:?}");
    assert_eq!(ledger.forks().count(), 2);
    // Another genesis, signed by the genesis committee: a fork of epoch 1.
    let mut other = g.document().clone();
    other.members.pop();
    let g2 = sign_with(Signed::new(other).unwrap(), &keys, &[1]);
    let out = ledger.offer(std::slice::from_ref(&g2), NOW, false);
    assert_eq!(
        out.fork.map(|f| (f.epoch, f.theirs)),
        Some((1, g2.digest()))
    );
}

#[test]
fn a_chain_may_repeat_a_document_and_is_served_from_the_epoch_asked() {
    let keys = committee(3);
    let g = genesis(&keys, 1, &[1, 2], &[0]);
    let e2 = next(&g, &[1, 2], &keys, &[0]);
    let e3 = next(&e2, &[1, 2, 3], &keys, &[0]);
    let e4 = next(&e3, &[1, 3], &keys, &[0]);
    let mut ledger = Ledger::with_anchor(g.clone(), NOW, 8).unwrap();
    let out = ledger.offer(
        &[e2.clone(), e3.clone(), e3.clone(), e4.clone()],
        NOW,
        false,
    );
    assert_eq!(out.applied.len(), 3, "{out:?}");
    assert!(out.refused.is_none() && out.fork.is_none(), "{out:?}");
    let served: Vec<u64> = ledger
        .chain_after(2, usize::MAX)
        .iter()
        .map(Signed::epoch)
        .collect();
    assert_eq!(served, vec![3, 4]);
}

#[test]
fn refused_copies_are_remembered_together_not_only_the_last() {
    let keys = committee(3);
    let g = genesis(&keys, 2, &[1], &[0, 1]);
    let mut ledger = Ledger::with_anchor(g.clone(), NOW, 8).unwrap();
    let a = next(&g, &[2], &keys, &[0]);
    let b = next(&g, &[3], &keys, &[1]);
    for copy in [&a, &b] {
        let out = ledger.offer(std::slice::from_ref(copy), NOW, false);
        assert!(out.refused.is_some());
    }
    for copy in [&a, &b] {
        let out = ledger.offer(std::slice::from_ref(copy), NOW, false);
        assert!(out.refused.is_none(), "reported again: {out:?}");
    }
}

/// The signature file `key` makes for `doc`.
fn signature_file(doc: &Signed, key: &GovernanceKey) -> SignatureFile {
    let mut alone = Signed::new(doc.document().clone()).unwrap();
    alone.sign(key, &mut ChaCha20Rng::seed_from_u64(3));
    SignatureFile {
        network: doc.document().network.clone(),
        epoch: doc.epoch(),
        digest: doc.digest(),
        signature: alone.signatures()[0],
    }
}

#[test]
fn combining_takes_only_valid_signatures_of_this_document() {
    let keys = committee(3);
    let g = genesis(&keys, 2, &[1], &[0, 1]);
    let mut e2 = Signed::new({
        let mut d = g.document().successor_template();
        d.members = vec![member(2)];
        d
    })
    .unwrap();
    let file = signature_file(&e2, &keys[0]);
    e2.combine(&file).unwrap();
    assert_eq!(e2.signatures().len(), 1);
    // The same file twice: added once.
    e2.combine(&file).unwrap();
    assert_eq!(e2.signatures().len(), 1);
    // Another signature by the same signer: refused by name.
    let mut other = file.clone();
    let mut resigned = Signed::new(e2.document().clone()).unwrap();
    resigned.sign(&keys[0], &mut ChaCha20Rng::seed_from_u64(77));
    other.signature = resigned.signatures()[0];
    assert_ne!(other.signature, file.signature);
    assert!(matches!(e2.combine(&other), Err(CombineError::Repeated(_))));
    // Of another document: each field is checked.
    let second = signature_file(&e2, &keys[1]);
    for edit in [
        &(|f: &mut SignatureFile| f.network = "other".into()) as &dyn Fn(&mut SignatureFile),
        &|f| f.epoch = 3,
        &|f| f.digest = Digest([7; 32]),
    ] {
        let mut wrong = second.clone();
        edit(&mut wrong);
        assert!(
            matches!(e2.combine(&wrong), Err(CombineError::OtherDocument { .. })),
            "{wrong:?}"
        );
    }
    // A signature that does not verify.
    let mut forged = second.clone();
    forged.signature.signature[0] ^= 1;
    assert!(matches!(e2.combine(&forged), Err(CombineError::Invalid(_))));
    assert_eq!(e2.signatures().len(), 1);
    e2.combine(&second).unwrap();
    assert_eq!(e2.signatures().len(), 2);

    // What a node would say of it.
    assert_eq!(e2.verify(Some(&g), NOW), Ok(()));
    let under = next(&g, &[2], &keys, &[2]);
    assert_eq!(
        under.verify(Some(&g), NOW).map_err(|r| r[0].code()),
        Err("under_threshold")
    );
    assert_eq!(
        e2.verify(None, NOW).map_err(|r| r[0].code()),
        Err("needs_current")
    );
    assert_eq!(g.verify(None, NOW), Ok(()));
    let weak = genesis(&keys, 2, &[1], &[0]);
    assert_eq!(
        weak.verify(None, NOW).map_err(|r| r[0].code()),
        Err("under_threshold")
    );
}

#[test]
fn a_full_committee_can_hand_over_to_another_full_committee() {
    // Every old key and every new key must sign: the most signatures a document needs.
    let old: Vec<GovernanceKey> = (0..MAX_COMMITTEE as u64).map(gov).collect();
    let new: Vec<GovernanceKey> = (100..100 + MAX_COMMITTEE as u64).map(gov).collect();
    let all: Vec<usize> = (0..MAX_COMMITTEE).collect();
    let g = genesis(&old, MAX_COMMITTEE as u8, &[1], &all);
    let mut doc = g.document().successor_template();
    doc.members = g.document().members.clone();
    doc.committee = new.iter().map(GovernanceKey::id).collect();
    doc.threshold = MAX_COMMITTEE as u8;
    let mut e2 = sign_with(Signed::new(doc).unwrap(), &old, &all);
    e2 = sign_with(e2, &new, &all);
    assert_eq!(e2.signatures().len(), 2 * MAX_COMMITTEE);
    let e2 = Signed::decode(&e2.encode()).unwrap();
    let mut ledger = Ledger::with_anchor(g, NOW, 8).unwrap();
    let out = ledger.offer(&[e2], NOW, false);
    assert_eq!(out.applied.len(), 1, "{:?}", out.refused);
}

#[test]
fn record_keys_make_a_version_2_document_and_leave_others_as_they_were() {
    let keys = committee(3);
    let plain = genesis(&keys, 2, &[1, 2, 3], &[0, 1]);
    assert_eq!(plain.document().encode()[4], FORMAT_VERSION);
    let mut doc = plain.document().clone();
    let record_key =
        crate::records::RecordSigner::new(&Keypair::from_private_bytes([5; 32])).record_key();
    doc.members[1].record_key = Some(record_key);
    let bytes = doc.encode();
    assert_eq!(bytes[4], FORMAT_VERSION_RECORD_KEYS);
    let back = Document::decode(&bytes).unwrap();
    assert_eq!(back, doc);
    assert_eq!(back.encode(), bytes);
    assert_ne!(back.digest(), plain.digest());
    // Its TOML form carries the key too.
    let signed = Signed::new(doc.clone()).unwrap();
    let again = Signed::from_toml(&signed.to_toml(), "<test>").unwrap();
    assert_eq!(again.document(), &doc);
    // Version 2 with no record key is not canonical (that document is version 1).
    let mut none = plain.document().encode();
    none[4] = FORMAT_VERSION_RECORD_KEYS;
    let members_at = none.len() - 3 * (32 + 1 + 6 + 8 + 1 + 6 + 1);
    let mut padded = none[..members_at].to_vec();
    for member in none[members_at..].chunks(32 + 1 + 6 + 8 + 1 + 6 + 1) {
        padded.extend_from_slice(member);
        padded.push(0);
    }
    assert!(matches!(
        Document::decode(&padded),
        Err(DecodeError::Invalid {
            field: "version",
            ..
        })
    ));
    // A presence byte other than 0 or 1, and a key that is not on the curve.
    let mut bad = bytes.clone();
    let last = bad.len() - 1;
    bad[last] = 2;
    assert!(Document::decode(&bad).is_err());
    let mut off_curve = doc.clone();
    off_curve.members[1].record_key = Some(crate::records::RecordKeyId([0xff; 32]));
    assert!(matches!(
        off_curve.check(),
        Err(DecodeError::Invalid {
            field: "record key",
            ..
        })
    ));
}
