//! A crowd of allowed peers on one host, over real TCP on 127.0.0.1, every node with the
//! default `Config`: their handshakes look like strangers' until they authenticate, and
//! must never be taken for an attack. Counts completions; never times anything (the full
//! figure, 1,000 peers x 10 exchanges, is in docs/BENCHMARKS.md: `scaling crowd`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

mod common;

use std::time::Duration;

use bytes::Bytes;
use p2p_handler::{AllowList, Config, Event, Handler, Keypair, Options, TcpTransport};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// Clients, each on a node of its own, all dialing from 127.0.0.1.
const PEERS: usize = 120;
/// Exchanges each, one after another: each on a fresh connection, so a handshake each.
const EACH: usize = 4;
/// A bound against a hang, generous for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_allowed_peers_on_one_address_all_gets_through_with_the_defaults() {
    let mut rng = ChaCha20Rng::seed_from_u64(70);
    let keys: Vec<Keypair> = (0..=PEERS).map(|_| Keypair::generate(&mut rng)).collect();
    let (server_key, client_keys) = keys.split_last().unwrap();
    let localhost = "127.0.0.1:0".parse().unwrap();
    let (server, server_inbox) = Handler::spawn_with(
        TcpTransport,
        localhost,
        server_key.clone(),
        AllowList::from_peers(client_keys.iter().map(Keypair::peer_id)),
        Options::new(Config::default(), [1; 32]),
    )
    .await
    .unwrap();
    let echo = common::echo(server.clone(), server_inbox);
    let (to, at) = (server.local_peer_id(), server.local_addr());
    let mut clients = tokio::task::JoinSet::new();
    for (i, key) in client_keys.iter().enumerate() {
        let options = Options::new(Config::default(), [2; 32]).incarnation(i as u64);
        let (client, mut inbox) = Handler::spawn_with(
            TcpTransport,
            localhost,
            key.clone(),
            AllowList::from_peers([to]),
            options,
        )
        .await
        .unwrap();
        clients.spawn(async move {
            let mut outcomes = Vec::new();
            for n in 0..EACH {
                let id = client
                    .request(to, at, Bytes::from(format!("{i}/{n}")))
                    .await
                    .unwrap();
                loop {
                    match inbox.received.recv().await {
                        Some(Event::Reply { exchange, .. }) if exchange == id => {
                            outcomes.push(Ok(()));
                            break;
                        }
                        Some(Event::Failed {
                            exchange, failure, ..
                        }) if exchange == id => {
                            outcomes.push(Err(failure.to_string()));
                            break;
                        }
                        Some(_) => {}
                        None => panic!("client {i} stopped"),
                    }
                }
            }
            client.shutdown().await.unwrap();
            outcomes
        });
    }
    let all = async {
        let mut outcomes = Vec::new();
        while let Some(done) = clients.join_next().await {
            outcomes.extend(done.unwrap());
        }
        outcomes
    };
    let outcomes = tokio::time::timeout(WAIT, all)
        .await
        .expect("the crowd's exchanges end");
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert_eq!(outcomes.len(), PEERS * EACH);
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        failures.first()
    );
    let status = server.status().await.unwrap();
    assert_eq!(status.stats.requests_delivered, (PEERS * EACH) as u64);
    // A crowd that progresses is never taken for a flood.
    assert_eq!(status.evicted_unauthenticated, 0, "{status:?}");
    echo.abort();
}
