//! The handler: one exchange through the state machines alone, exchanges per second over TCP
//! loopback (fresh connection per exchange, and reused), for 1 and 100 concurrent peers (and for 1 on one thread), 100
//! requests queued to one peer, and 16 MiB throughput. `docs/BENCHMARKS.md` sets each beside its limit from `limits.rs`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use p2p_bench::{client, client_with, handler_exchange, keys, on_own_thread, server, server_with};
use p2p_handler::wire::{AckOf, ExchangeId, Message};
use p2p_handler::{AllowList, ConnEvent, ConnId, Endpoint, Event, Output};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One full exchange driven through two endpoints by direct calls: no I/O, no crypto.
fn state_machine(c: &mut Criterion) {
    let k = keys(2);
    let (a, b) = (k[0].peer_id(), k[1].peer_id());
    let addr: SocketAddr = "10.0.0.2:7000".parse().unwrap();
    let from: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let config = p2p_bench::bench_config(false);
    let mut alice = Endpoint::new(config.clone(), a, AllowList::from_peers([b]), [1; 32]).unwrap();
    let mut bob = Endpoint::new(config, b, AllowList::from_peers([a]), [2; 32]).unwrap();
    let mut now = Instant::now();
    let payload = Bytes::from_static(&[7u8; 64]);
    let mut accepted = 0;
    c.bench_function("handler/state_machine_exchange", |bench| {
        bench.iter(|| {
            // Time moves (1 µs per exchange) so rate buckets refill as they would.
            now += std::time::Duration::from_micros(1);
            alice.request(b, addr, payload.clone(), now).unwrap();
            let Some(Output::Dial { conn: ac, .. }) = alice.poll_output() else {
                panic!()
            };
            accepted += 1;
            let bc = ConnId::inbound(accepted);
            bob.handle_accepted(bc, a, from, 1 << 24, 0, now);
            alice.handle_conn_event(
                ac,
                ConnEvent::Established {
                    peer: b,
                    key: *k[1].public_bytes(),
                    remote_max_message_size: 1 << 24,
                    remote_features: 0,
                    ticket: None,
                },
                now,
            );
            let mut pending_a: Vec<Message> = Vec::new();
            let mut pending_b: Vec<Message> = Vec::new();
            let mut id = ExchangeId(0);
            while let Some(o) = alice.poll_output() {
                if let Output::Send { message, .. } = o {
                    pending_b.push(message);
                }
            }
            assert!(!pending_b.is_empty(), "alice sent nothing");
            for m in pending_b.drain(..) {
                bob.handle_conn_event(bc, ConnEvent::Message(m), now);
            }
            while let Some(e) = bob.poll_event() {
                if let Event::Request { exchange, .. } = e {
                    id = exchange;
                }
            }
            bob.respond(a, id, payload.clone(), now).unwrap();
            while let Some(o) = bob.poll_output() {
                if let Output::Send { message, .. } = o {
                    pending_a.push(message);
                }
            }
            for m in pending_a.drain(..) {
                alice.handle_conn_event(ac, ConnEvent::Message(m), now);
            }
            while let Some(o) = alice.poll_output() {
                if let Output::Send {
                    message:
                        m @ Message::Ack {
                            of: AckOf::Reply, ..
                        },
                    ..
                } = o
                {
                    bob.handle_conn_event(bc, ConnEvent::Message(m), now);
                }
            }
            bob.handle_conn_event(
                bc,
                ConnEvent::Closed(p2p_handler::Closed::ByPeer(
                    p2p_handler::wire::CloseReason::Done,
                )),
                now,
            );
            while alice.poll_event().is_some() {}
            while bob.poll_event().is_some() {}
            while bob.poll_output().is_some() {}
        });
    });
}

fn tcp_exchanges(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("handler/tcp_exchange");
    // Durable nodes keep their data directories here (a disk, not tmpfs, on the machine
    // BENCHMARKS.md was measured on); each node has its own, as in production.
    let root = std::env::temp_dir().join(format!("p2p-bench-durable-{}", std::process::id()));
    for (reuse, durable) in [(false, false), (true, false), (false, true), (true, true)] {
        let mode = match (reuse, durable) {
            (false, false) => "fresh",
            (true, false) => "reuse",
            (false, true) => "fresh_durable",
            (true, true) => "reuse_durable",
        };
        let dir = durable.then_some(root.as_path());
        // One peer, sequential exchanges.
        let k = keys(2);
        let (srv, (cl, mut inbox)) = rt.block_on(async {
            let reply = Bytes::from_static(&[1u8; 64]);
            let srv = server_with(k[1].clone(), &k[..1], reply, reuse, dir).await;
            let cl = client_with(k[0].clone(), srv.peer, reuse, 9, dir).await;
            (srv, cl)
        });
        let payload = Bytes::from_static(&[7u8; 64]);
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new(mode, 1), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        handler_exchange(&cl, &mut inbox, &srv, payload.clone()).await;
                    }
                    start.elapsed()
                })
            });
        });
        // 100 peers at once against one node.
        const PEERS: usize = 100;
        let k = keys(PEERS + 1);
        let (srv, clients) = rt.block_on(async {
            let reply = Bytes::from_static(&[1u8; 64]);
            // The node under test is durable; its 100 peers stand for other machines, each
            // with its own disk, so they keep theirs in memory rather than make one disk
            // serve 101 nodes' syncs.
            let srv = server_with(k[PEERS].clone(), &k[..PEERS], reply, reuse, dir).await;
            let mut clients = Vec::new();
            for (i, key) in k[..PEERS].iter().enumerate() {
                clients.push(client(key.clone(), srv.peer, reuse, i as u8).await);
            }
            (srv, clients)
        });
        let srv = std::sync::Arc::new(srv);
        let mut clients: Vec<_> = clients.into_iter().map(Some).collect();
        group.throughput(Throughput::Elements(PEERS as u64));
        group.sample_size(10);
        group.bench_function(BenchmarkId::new(mode, PEERS), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut tasks = Vec::new();
                    for slot in clients.iter_mut() {
                        let (cl, mut inbox) = slot.take().unwrap();
                        let srv = srv.clone();
                        tasks.push(tokio::spawn(async move {
                            for _ in 0..iters {
                                handler_exchange(
                                    &cl,
                                    &mut inbox,
                                    &srv,
                                    Bytes::from_static(&[7u8; 64]),
                                )
                                .await;
                            }
                            (cl, inbox)
                        }));
                    }
                    for (slot, task) in clients.iter_mut().zip(tasks) {
                        *slot = Some(task.await.unwrap());
                    }
                    start.elapsed()
                })
            });
        });
        group.sample_size(100);
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&root);
}

/// The reused exchange with both nodes and the application on one thread, like the bare
/// exchange it is compared with: the handler's own overhead without hand-offs between
/// threads. The application is a task, as an async application's would be: the future given
/// to `block_on` is woken through the runtime's event fd, a cost of the harness (the bare
/// client, woken by its socket alone, does not pay it either).
fn one_thread(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let k = keys(2);
    let (srv, cl) = rt.block_on(async {
        let srv = server(k[1].clone(), &k[..1], Bytes::from_static(&[1u8; 64]), true).await;
        let cl = client(k[0].clone(), srv.peer, true, 9).await;
        (std::sync::Arc::new(srv), cl)
    });
    let mut slot = Some(cl);
    let mut group = c.benchmark_group("handler/tcp_exchange");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("reuse_one_thread", 1), |b| {
        b.iter_custom(|iters| {
            let (cl, mut inbox) = slot.take().unwrap();
            let srv = srv.clone();
            let (elapsed, cl) = rt.block_on(async move {
                tokio::spawn(async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        handler_exchange(&cl, &mut inbox, &srv, Bytes::from_static(&[7u8; 64]))
                            .await;
                    }
                    (start.elapsed(), (cl, inbox))
                })
                .await
                .unwrap()
            });
            slot = Some(cl);
            elapsed
        });
    });
    group.finish();
}

/// One 16 MiB request on an open connection: both nodes on the shared two-worker runtime,
/// and each node on a thread of its own. On the shared runtime the figure depends on where
/// the scheduler puts the two connection tasks: on two workers the sender's encryption and
/// the receiver's decryption overlap, on one they take turns (runs of this benchmark fall
/// into one mode or the other). The raw Noise stream it is compared with has its sender and
/// receiver on two threads, as do two nodes in two processes.
fn throughput_16mib(c: &mut Criterion) {
    let rt = runtime();
    let k = keys(2);
    let (srv, (cl, inbox)) = rt.block_on(async {
        let srv = server(k[1].clone(), &k[..1], Bytes::from_static(b"ok"), true).await;
        let cl = client(k[0].clone(), srv.peer, true, 9).await;
        (srv, cl)
    });
    let k2 = k.clone();
    let own_srv = on_own_thread(move || async move {
        server(k2[1].clone(), &k2[..1], Bytes::from_static(b"ok"), true).await
    });
    let (peer, k3) = (own_srv.peer, k.clone());
    let own_cl = on_own_thread(move || async move { client(k3[0].clone(), peer, true, 9).await });
    let big = Bytes::from(vec![3u8; 16 << 20]);
    let mut group = c.benchmark_group("handler/request");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(16 << 20));
    for (name, srv, (cl, mut inbox)) in [
        ("16MiB", srv, (cl, inbox)),
        ("16MiB_own_threads", own_srv, own_cl),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        handler_exchange(&cl, &mut inbox, &srv, big.clone()).await;
                    }
                    start.elapsed()
                })
            });
        });
    }
    group.finish();
}

/// 100 requests queued to one peer at once, without connection reuse: they follow each other
/// on the first one's connection.
fn burst_to_one_peer(c: &mut Criterion) {
    const BURST: usize = 100;
    let rt = runtime();
    let k = keys(2);
    let (srv, (cl, mut inbox)) = rt.block_on(async {
        let srv = server(k[1].clone(), &k[..1], Bytes::from_static(&[1u8; 64]), false).await;
        let cl = client(k[0].clone(), srv.peer, false, 9).await;
        (srv, cl)
    });
    let mut group = c.benchmark_group("handler/tcp_exchange");
    group.throughput(Throughput::Elements(BURST as u64));
    group.bench_function(BenchmarkId::new("burst", BURST), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut ids = std::collections::BTreeSet::new();
                    for _ in 0..BURST {
                        let payload = Bytes::from_static(&[7u8; 64]);
                        ids.insert(cl.request(srv.peer, srv.addr, payload).await.unwrap());
                    }
                    while !ids.is_empty() {
                        match inbox.received.recv().await {
                            Some(Event::Reply { exchange, .. }) => {
                                ids.remove(&exchange);
                            }
                            Some(_) => {}
                            None => panic!("client stopped"),
                        }
                    }
                }
                start.elapsed()
            })
        });
    });
    group.finish();
}

criterion_group!(
    handler,
    state_machine,
    tcp_exchanges,
    one_thread,
    burst_to_one_peer,
    throughput_16mib
);
criterion_main!(handler);
