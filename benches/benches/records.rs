//! Address records: what sealing our record costs as the membership grows (one HPKE seal
//! per member), what opening one costs (one signature check, one HPKE open), and the whole
//! acceptance of a record by a member's book; beside the limit measured in the same run, a
//! bare Noise IK handshake (the Diffie-Hellman work a node does for one connection).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use p2p_bench::{keys, noise_ik_pair};
use p2p_handler::membership::{Digest, Document, GovernanceKey, Member};
use p2p_handler::records::{Record, RecordBook, RecordSigner, SealedRecord, open, seal};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const NOW: u64 = 1_800_000_000;

fn document(n: usize) -> (Document, Vec<p2p_handler::Keypair>) {
    let k = keys(n);
    let mut doc = Document {
        network: "bench".into(),
        epoch: 1,
        previous: Digest::NONE,
        expires: None,
        threshold: 1,
        committee: vec![GovernanceKey::from_secret_bytes([1; 32]).unwrap().id()],
        members: k
            .iter()
            .map(|key| Member {
                key: *key.public_bytes(),
                name: None,
                address: None,
                allowed: Vec::new(),
                expires: None,
                record_key: Some(RecordSigner::new(key).record_key()),
            })
            .collect(),
    };
    doc.check().unwrap();
    (doc, k)
}

fn record(seq: u64) -> Record {
    Record {
        seq,
        issued: NOW,
        expires: NOW + 3600,
        addresses: vec![SocketAddr::from(([10, 0, 0, 1], 7000))],
    }
}

/// A record of member 0, sealed for the members of `doc`.
fn sealed_by_first(doc: &Document, keys: &[p2p_handler::Keypair]) -> SealedRecord {
    seal(
        &RecordSigner::new(&keys[0]),
        &record(1),
        doc,
        &mut ChaCha20Rng::seed_from_u64(1),
    )
    .unwrap()
}

fn records(c: &mut Criterion) {
    let k = keys(2);
    c.bench_function("records/limit_noise_ik_handshake", |b| {
        b.iter(|| noise_ik_pair(&k[0], &k[1]));
    });
    let mut seal_group = c.benchmark_group("records/seal");
    seal_group.sample_size(10);
    for n in [4usize, 100, 1000] {
        let (doc, keys) = document(n);
        let signer = RecordSigner::new(&keys[0]);
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        seal_group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| seal(&signer, &record(1), &doc, &mut rng).unwrap());
        });
    }
    seal_group.finish();
    let mut open_group = c.benchmark_group("records/open");
    for n in [4usize, 100, 1000] {
        let (doc, keys) = document(n);
        let sealed = sealed_by_first(&doc, &keys);
        let reader = RecordSigner::new(&keys[1]);
        open_group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| open(&sealed, &doc, &reader).unwrap());
        });
    }
    open_group.finish();
    // The whole acceptance by a book (decode, open, times, seq), fresh book each time.
    let (doc, keys) = document(100);
    let sealed = sealed_by_first(&doc, &keys);
    let reader = RecordSigner::new(&keys[1]);
    c.bench_function("records/book_offer/100", |b| {
        b.iter(|| {
            let mut book = RecordBook::new();
            let copy = SealedRecord::decode(sealed.bytes()).unwrap();
            book.offer(copy, &doc, &reader, NOW).unwrap()
        });
    });
}

criterion_group!(benches, records);
criterion_main!(benches);
