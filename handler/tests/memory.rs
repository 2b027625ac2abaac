//! The same driver on the in-memory transport: what benchmarks and the simulator rely on.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::time::Duration;

use bytes::Bytes;
use p2p_handler::{AllowList, Config, Event, Handler, Keypair, MemoryTransport};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

#[tokio::test]
async fn exchange_over_the_memory_transport_on_one_thread() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let (ka, kb) = (Keypair::generate(&mut rng), Keypair::generate(&mut rng));
    let net = MemoryTransport::new();
    let spawn = |key: &Keypair, other: &Keypair, addr: &str, seed: u8| {
        Handler::spawn(
            net.clone(),
            addr.parse().unwrap(),
            key.clone(),
            AllowList::from_peers([other.peer_id()]),
            Config::default(),
            [seed; 32],
        )
    };
    let (alice, mut alice_in) = spawn(&ka, &kb, "10.0.0.1:7000", 1).await.unwrap();
    let (bob, mut bob_in) = spawn(&kb, &ka, "10.0.0.2:7000", 2).await.unwrap();
    let id = alice
        .request(bob.local_peer_id(), bob.local_addr(), &b"over memory"[..])
        .await
        .unwrap();
    let wait = Duration::from_secs(10);
    let Ok(Some(Event::Request { peer, exchange, .. })) =
        tokio::time::timeout(wait, bob_in.received.recv()).await
    else {
        panic!("no request");
    };
    bob.response_to(peer, exchange, &b"ack"[..]).await.unwrap();
    let Ok(Some(Event::Reply {
        exchange, payload, ..
    })) = tokio::time::timeout(wait, alice_in.received.recv()).await
    else {
        panic!("no reply");
    };
    assert_eq!((exchange, payload), (id, Bytes::from_static(b"ack")));
    let report = alice.shutdown().await.unwrap();
    assert!(report.failed.is_empty());
    bob.shutdown().await.unwrap();
}
