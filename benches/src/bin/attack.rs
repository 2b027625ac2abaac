//! An allowed peer's latency while strangers attack its responder: each fresh-connection
//! exchange timed on its own, p50 and p99, with no attack and under 1,500 attacking sockets
//! (the attacker of the hardening tests, each socket re-opened as soon as it is closed):
//! silent, stalled after a valid message 1, or sending garbage first messages at full
//! speed; from 64 addresses of their own, or from the allowed peer's own address (which
//! the responder's allow list names). One more row: a flood of connections that each
//! send garbage and close at once, from the 64 addresses (from the peer's own address, the
//! flood measures the kernel's search for a free port of that address, which the peer's
//! own connects share, not the node). The allowed peer knows the responder's key, as a
//! member does: IK, its request in message 1, a ticket from each handshake for the next.
//! One row without an attack dials with XX, for comparison. Printed as JSON for
//! `benches/report.py`. `attack ROW` runs one row; with `ATTACK_DEBUG=1` each exchange
//! slower than 50 ms is printed with the node's first-message counters and the client's.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

// The same attacker `handler/tests/hostile.rs` uses, so the figures describe what it tests.
#[path = "../../../handler/tests/common/attack.rs"]
mod attack;

use std::time::Instant;

use attack::{Attack, Sources, start_attack};
use bytes::Bytes;
use p2p_bench::{client, client_ik, keys, percentiles, server_opts};
use p2p_handler::{AllowList, AllowedPeer, Event, Handler};
use tokio::sync::watch;

const SAMPLES: usize = 300;

/// A row: its name in the JSON, the attack (if any), and whether the client dials with IK.
type Row = (&'static str, Option<(Attack, Sources)>, bool);

async fn measure(attack: Option<(Attack, Sources)>, ik: bool) -> String {
    let k = keys(2);
    // The client's address is listed, so an attacker sharing it shares its lane.
    let mut allow = AllowList::new();
    allow.insert(
        k[0].peer_id(),
        AllowedPeer {
            addresses: vec!["127.0.0.1".parse().unwrap()],
            ..AllowedPeer::default()
        },
    );
    let srv = server_opts(
        k[1].clone(),
        &[],
        Bytes::from_static(&[1u8; 64]),
        p2p_bench::bench_options(false, 3, None),
    )
    .await;
    srv.handler.set_allow_list(allow).await.unwrap();
    let (cl, mut inbox): (Handler, _) = if ik {
        client_ik(k[0].clone(), srv.key, false, 9).await
    } else {
        client(k[0].clone(), srv.peer, false, 9).await
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let attackers = match attack {
        Some((kind, sources)) => Some(start_attack(srv.addr, kind, sources, stop_rx).await),
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
        if std::env::var_os("ATTACK_DEBUG").is_some() && started.elapsed().as_millis() > 50 {
            let (b, c) = (
                srv.handler.status().await.unwrap(),
                cl.status().await.unwrap(),
            );
            eprintln!(
                "slow #{}: {:?}; node {:?} parked {} tasks {}; client ik {} dials {} early {}/{}",
                samples.len(),
                started.elapsed(),
                b.first_messages,
                b.parked_connections,
                b.connection_tasks,
                c.stats.ik_dials,
                c.stats.dials,
                c.stats.early_requests_sent,
                c.stats.redials,
            );
        }
    }
    stop_tx.send(true).unwrap();
    if let Some((_, attacker)) = attackers {
        attacker.join().await;
    }
    cl.shutdown().await.unwrap();
    srv.handler.shutdown().await.unwrap();
    percentiles(samples)
}

fn main() {
    let only: Option<String> = std::env::args().nth(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rows: [Row; 9] = [
        ("none_xx", None, false),
        ("none", None, true),
        ("silent", Some((Attack::Silent, Sources::Spread)), true),
        (
            "stalled_msg1",
            Some((Attack::StalledAfterMsg1, Sources::Spread)),
            true,
        ),
        ("garbage", Some((Attack::Garbage, Sources::Spread)), true),
        (
            "shared_silent",
            Some((Attack::Silent, Sources::Shared)),
            true,
        ),
        (
            "shared_stalled_msg1",
            Some((Attack::StalledAfterMsg1, Sources::Shared)),
            true,
        ),
        (
            "shared_garbage",
            Some((Attack::Garbage, Sources::Shared)),
            true,
        ),
        ("flood", Some((Attack::GarbageFlood, Sources::Spread)), true),
    ];
    runtime.block_on(async {
        let mut out = Vec::new();
        for (name, attack, ik) in rows {
            if only.as_deref().is_some_and(|o| o != name) {
                continue;
            }
            let figures = measure(attack, ik).await;
            eprintln!("{name}: {figures}");
            out.push(format!("\"{name}\": {figures}"));
        }
        println!("{{{}}}", out.join(", "));
    });
}
