//! An allowed peer's latency while strangers attack its responder: each fresh-connection
//! exchange timed on its own, p50 and p99, with no attack, with 1,500 silent sockets held
//! open, and with 1,500 handshakes stalled after msg1 (the attacker of the hardening tests,
//! each socket re-opened as soon as it is closed). Printed as JSON for `benches/report.py`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

// The same attacker `handler/tests/hostile.rs` uses, so the figures describe what it tests.
#[path = "../../../handler/tests/common/attack.rs"]
mod attack;

use std::time::Instant;

use attack::{Attack, start_attack};
use bytes::Bytes;
use p2p_bench::{client, keys, percentiles, server};
use p2p_handler::Event;
use tokio::sync::watch;

const SAMPLES: usize = 300;

async fn measure(attack: Option<Attack>) -> String {
    let k = keys(2);
    let srv = server(k[1].clone(), &k[..1], Bytes::from_static(&[1u8; 64]), false).await;
    let (cl, mut inbox) = client(k[0].clone(), srv.peer, false, 9).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let attackers = match attack {
        Some(kind) => Some(start_attack(srv.addr, kind, stop_rx).await),
        None => None,
    };
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let started = Instant::now();
        let id = cl
            .request(srv.peer, srv.addr, Bytes::from_static(&[7u8; 64]))
            .await
            .unwrap();
        loop {
            match inbox.received.recv().await {
                Some(Event::Reply { exchange, .. }) if exchange == id => break,
                Some(Event::Failed {
                    exchange, failure, ..
                }) if exchange == id => panic!("an allowed exchange failed: {failure:?}"),
                Some(_) => {}
                None => panic!("client stopped"),
            }
        }
        samples.push(started.elapsed());
    }
    stop_tx.send(true).unwrap();
    if let Some((_, mut tasks)) = attackers {
        while tasks.join_next().await.is_some() {}
    }
    cl.shutdown().await.unwrap();
    srv.handler.shutdown().await.unwrap();
    percentiles(samples)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let none = measure(None).await;
        let silent = measure(Some(Attack::Silent)).await;
        let stalled = measure(Some(Attack::StalledAfterMsg1)).await;
        println!("{{\"none\": {none}, \"silent\": {silent}, \"stalled_msg1\": {stalled}}}");
    });
}
