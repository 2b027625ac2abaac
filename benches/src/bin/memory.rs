//! Heap bytes per idle connection and per queued request: the exact live heap, through
//! dhat's allocator (in its own process: the allocator slows everything down). Printed as
//! JSON for `benches/report.py`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use p2p_bench::{client, handler_exchange, keys, server};
use p2p_handler::Event;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn heap() -> u64 {
    dhat::HeapStats::get().curr_bytes as u64
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Memory: N clients each holding an idle (reused) connection to one server.
    const IDLE: usize = 100;
    let idle_bytes = multi.block_on(async {
        let k = keys(IDLE + 1);
        let srv = server(k[IDLE].clone(), &k[..IDLE], Bytes::from_static(b"ok"), true).await;
        let mut clients = Vec::new();
        for (i, key) in k[..IDLE].iter().enumerate() {
            clients.push(client(key.clone(), srv.peer, true, i as u8).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = heap();
        for (cl, inbox) in &mut clients {
            handler_exchange(cl, inbox, &srv, Bytes::from_static(b"x")).await;
        }
        let mut open = 0;
        for _ in 0..100 {
            open = srv.handler.status().await.unwrap().open_connections;
            if open == IDLE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(open, IDLE, "every client holds one idle connection");
        (heap().saturating_sub(before)) / IDLE as u64
    });

    // Memory: requests queued behind one that is never answered.
    const QUEUED: usize = 1000;
    let queued_bytes = multi.block_on(async {
        let k = keys(2);
        let (srv, mut srv_inbox) = p2p_handler::Handler::spawn(
            p2p_handler::TcpTransport,
            "127.0.0.1:0".parse().unwrap(),
            k[1].clone(),
            p2p_handler::AllowList::from_peers([k[0].peer_id()]),
            p2p_bench::bench_config(false),
            [3; 32],
        )
        .await
        .unwrap();
        let (cl, _inbox) = client(k[0].clone(), srv.local_peer_id(), false, 9).await;
        cl.request(
            srv.local_peer_id(),
            srv.local_addr(),
            Bytes::from_static(&[7u8; 64]),
        )
        .await
        .unwrap();
        // Wait until the first request is being served (and never answered).
        loop {
            if let Some(Event::Request { .. }) = srv_inbox.received.recv().await {
                break;
            }
        }
        let before = heap();
        for _ in 0..QUEUED {
            cl.request(
                srv.local_peer_id(),
                srv.local_addr(),
                Bytes::from_static(&[7u8; 64]),
            )
            .await
            .unwrap();
        }
        (heap().saturating_sub(before)) / QUEUED as u64
    });

    println!(
        "{{\"idle_connection_both_ends_bytes\": {idle_bytes}, \"queued_request_64b_bytes\": {queued_bytes}}}"
    );
}
