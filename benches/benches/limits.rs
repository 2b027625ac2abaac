//! The physical limits every handler figure is compared with, measured in the same run:
//! a bare Noise XX handshake, bare Noise encryption, a bare TCP round trip, and a hand-rolled
//! request/ack/reply/ack over an open Noise session, with no handler around any of them; and
//! a synced commit to the store a durable node uses, on the same disk as its benchmarks.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use p2p_bench::{
    keys, noise_exchange_pair, noise_ik_pair, noise_pair, noise_stream, tcp_echo_server,
};
use p2p_handler::wire::MAX_FRAME_LEN;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn handshake(c: &mut Criterion) {
    let k = keys(2);
    c.bench_function("limit/noise_xx_handshake", |b| {
        b.iter(|| noise_pair(&k[0], &k[1]));
    });
    c.bench_function("limit/noise_ik_handshake", |b| {
        b.iter(|| noise_ik_pair(&k[0], &k[1]));
    });
}

fn transport(c: &mut Criterion) {
    let k = keys(2);
    let (mut tx, mut rx) = noise_pair(&k[0], &k[1]);
    let mut group = c.benchmark_group("limit/noise_encrypt_decrypt");
    for size in [64usize, 1024, MAX_FRAME_LEN - 16] {
        let plain = vec![9u8; size];
        let mut sealed = vec![0u8; MAX_FRAME_LEN];
        let mut out = vec![0u8; MAX_FRAME_LEN];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter(|| {
                let n = tx.write_message(&plain, &mut sealed).unwrap();
                rx.read_message(&sealed[..n], &mut out).unwrap()
            });
        });
    }
    group.finish();
}

fn tcp_rtt(c: &mut Criterion) {
    let rt = runtime();
    let addr = rt.block_on(tcp_echo_server());
    let mut stream = rt.block_on(async {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    });
    c.bench_function("limit/tcp_rtt_64b", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [1u8; 64];
                let start = Instant::now();
                for _ in 0..iters {
                    stream.write_all(&buf).await.unwrap();
                    stream.read_exact(&mut buf).await.unwrap();
                }
                start.elapsed()
            })
        });
    });
}

fn noise_exchange(c: &mut Criterion) {
    // On one thread (client and server tasks share it: no hand-off between threads), and
    // with the server on a worker of the two-worker runtime the handler's figures use while
    // the client runs on the calling thread, as the handler's application does there: then
    // every message wakes the other thread, as between two processes.
    let two_workers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (name, rt) in [
        ("limit/noise_exchange_open_session", runtime()),
        ("limit/noise_exchange_open_session_two_threads", two_workers),
    ] {
        let mut client = rt.block_on(noise_exchange_pair(64));
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        client.exchange().await;
                    }
                    start.elapsed()
                })
            });
        });
    }
}

fn noise_stream_16mib(c: &mut Criterion) {
    // Sender and receiver on two worker threads, as the handler runs: encryption and
    // decryption can overlap, so this is the limit for a two-core pipeline.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("limit/noise_stream");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(16 << 20));
    group.bench_function("16MiB", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(async { tokio::spawn(noise_stream(16 << 20)).await.unwrap() });
            }
            total
        });
    });
    group.finish();
}

fn store_commit(c: &mut Criterion) {
    use p2p_handler::store::{KvOp, RedbStore, Store, Table};
    let rt = runtime();
    let dir = std::env::temp_dir().join(format!("p2p-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut store = RedbStore::open(&dir).unwrap();
    let mut group = c.benchmark_group("limit/store_commit");
    let mut seq = 0u64;
    // Rows shaped like a busy node's: keys that grow with time, values of a record holding
    // a 64-byte message. 96 rows: about what one commit carries with 100 peers.
    for rows in [1usize, 96] {
        group.bench_function(BenchmarkId::from_parameter(rows), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let ops = (0..rows)
                        .map(|_| {
                            seq += 1;
                            KvOp::Put {
                                table: Table::Inbound,
                                key: seq.to_be_bytes().to_vec(),
                                value: vec![7; 160],
                            }
                        })
                        .collect();
                    rt.block_on(store.commit(ops)).unwrap();
                }
                start.elapsed()
            });
        });
    }
    group.finish();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(
    limits,
    store_commit,
    handshake,
    transport,
    tcp_rtt,
    noise_exchange,
    noise_stream_16mib
);
criterion_main!(limits);
