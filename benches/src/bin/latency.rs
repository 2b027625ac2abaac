//! Latency percentiles, which criterion does not give: each exchange timed on its own,
//! p50 and p99, beside the bare limit. Printed as JSON for `benches/report.py`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use bytes::Bytes;
use p2p_bench::{client, handler_exchange, keys, noise_exchange_pair, percentiles, server};

const SAMPLES: usize = 3000;

/// `latency --only reuse|fresh N [--one-thread]`: run only that workload N times (for
/// `perf record`), the application a task, on the two-worker runtime or with everything on
/// one thread.
fn only(kind: &str, n: usize, one_thread: bool) {
    let rt = if one_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    let reuse = kind == "reuse";
    let kind = kind.to_string();
    rt.block_on(async {
        let k = keys(2);
        let srv = server(k[1].clone(), &k[..1], Bytes::from_static(&[1u8; 64]), reuse).await;
        let (cl, mut inbox) = client(k[0].clone(), srv.peer, reuse, 9).await;
        tokio::spawn(async move {
            let t = Instant::now();
            for _ in 0..n {
                handler_exchange(&cl, &mut inbox, &srv, Bytes::from_static(&[7u8; 64])).await;
            }
            eprintln!(
                "{kind}: {:.1} us per exchange",
                t.elapsed().as_secs_f64() * 1e6 / n as f64
            );
        })
        .await
        .unwrap();
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let (Some("--only"), Some(kind), Some(n)) =
        (args.get(1).map(String::as_str), args.get(2), args.get(3))
    {
        let one_thread = args.get(4).map(String::as_str) == Some("--one-thread");
        return only(kind, n.parse().unwrap(), one_thread);
    }
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Limit: the bare exchange on an open Noise session, on one thread and across two (the
    // server on a worker, the client on the calling thread, as the handler's figures run).
    let bare_on = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let mut c = noise_exchange_pair(64).await;
            for _ in 0..200 {
                c.exchange().await;
            }
            let mut times = Vec::with_capacity(SAMPLES);
            for _ in 0..SAMPLES {
                let t = Instant::now();
                c.exchange().await;
                times.push(t.elapsed());
            }
            times
        })
    };
    let bare = bare_on(&current);
    let bare_two_threads = bare_on(&multi);

    // The handler, reused and fresh connections, on the runtime the facade uses.
    let mut handler = Vec::new();
    for reuse in [true, false] {
        let times = multi.block_on(async {
            let k = keys(2);
            let srv = server(k[1].clone(), &k[..1], Bytes::from_static(&[1u8; 64]), reuse).await;
            let (cl, mut inbox) = client(k[0].clone(), srv.peer, reuse, 9).await;
            let payload = Bytes::from_static(&[7u8; 64]);
            for _ in 0..200 {
                handler_exchange(&cl, &mut inbox, &srv, payload.clone()).await;
            }
            let n = if reuse { SAMPLES } else { SAMPLES / 3 };
            let mut times = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                handler_exchange(&cl, &mut inbox, &srv, payload.clone()).await;
                times.push(t.elapsed());
            }
            times
        });
        handler.push(percentiles(times));
    }

    // The handler on one thread, its application a task there (see `benches/handler.rs`).
    let one_thread = current.block_on(async {
        let k = keys(2);
        let srv = server(k[1].clone(), &k[..1], Bytes::from_static(&[1u8; 64]), true).await;
        let (cl, mut inbox) = client(k[0].clone(), srv.peer, true, 9).await;
        tokio::spawn(async move {
            let payload = Bytes::from_static(&[7u8; 64]);
            for _ in 0..200 {
                handler_exchange(&cl, &mut inbox, &srv, payload.clone()).await;
            }
            let mut times = Vec::with_capacity(SAMPLES);
            for _ in 0..SAMPLES {
                let t = Instant::now();
                handler_exchange(&cl, &mut inbox, &srv, payload.clone()).await;
                times.push(t.elapsed());
            }
            times
        })
        .await
        .unwrap()
    });

    println!(
        "{{\"bare_noise_exchange\": {}, \"bare_noise_exchange_two_threads\": {}, \"handler_reuse\": {}, \"handler_reuse_one_thread\": {}, \"handler_fresh\": {}}}",
        percentiles(bare),
        percentiles(bare_two_threads),
        handler[0],
        percentiles(one_thread),
        handler[1]
    );
}
