//! What the handler records through the `metrics` facade, read back with a debugging
//! recorder: each exchange counted once by outcome on both sides, and timed by role.
//! (The node's tests check the Prometheus exposition; this checks the dialer's side,
//! which a serving node never shows.) Its own binary: the recorder is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::net::SocketAddr;

use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use p2p_handler::{AllowList, Config, Event, Handler, Keypair, TcpTransport};

/// The value of `name` with every label `key=value` given, of `kind`.
fn value<'a>(
    snapshot: &'a [(metrics_util::CompositeKey, DebugValue)],
    kind: MetricKind,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a DebugValue> {
    snapshot.iter().find_map(|(key, value)| {
        let k = key.key();
        let matches = key.kind() == kind
            && k.name() == name
            && labels
                .iter()
                .all(|(l, v)| k.labels().any(|x| x.key() == *l && x.value() == *v));
        matches.then_some(value)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_exchange_is_counted_once_by_outcome_and_timed_on_both_sides() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let localhost: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (alice_key, bob_key) = (
        Keypair::from_private_bytes([1; 32]),
        Keypair::from_private_bytes([2; 32]),
    );
    let (bob, mut bob_inbox) = Handler::spawn(
        TcpTransport,
        localhost,
        bob_key.clone(),
        AllowList::from_keys([*alice_key.public_bytes()]),
        Config::default(),
        [2; 32],
    )
    .await
    .unwrap();
    let (alice, mut alice_inbox) = Handler::spawn(
        TcpTransport,
        localhost,
        alice_key,
        AllowList::from_keys([*bob_key.public_bytes()]),
        Config::default(),
        [1; 32],
    )
    .await
    .unwrap();
    alice
        .request(bob.local_peer_id(), bob.local_addr(), "hi")
        .await
        .unwrap();
    // Bob answers, then hears his reply was confirmed; Alice gets the reply.
    loop {
        match bob_inbox.received.recv().await.unwrap() {
            Event::Request {
                peer,
                exchange,
                payload,
                ..
            } => bob.response_to(peer, exchange, payload).await.unwrap(),
            Event::ResponseDelivered { .. } => break,
            _ => {}
        }
    }
    assert!(matches!(
        alice_inbox.received.recv().await,
        Some(Event::Reply { .. })
    ));

    let snapshot: Vec<_> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| (key, value))
        .collect();
    let counter =
        |name, labels: &[(&str, &str)]| value(&snapshot, MetricKind::Counter, name, labels);
    assert_eq!(
        counter("p2p_exchanges_total", &[("outcome", "reply")]),
        Some(&DebugValue::Counter(1))
    );
    assert_eq!(
        counter("p2p_responses_total", &[("outcome", "delivered")]),
        Some(&DebugValue::Counter(1))
    );
    // Every outcome is registered from the start, at zero.
    assert_eq!(
        counter("p2p_exchanges_total", &[("outcome", "exhausted")]),
        Some(&DebugValue::Counter(0))
    );
    for (role, outcome) in [("dialer", "reply"), ("responder", "delivered")] {
        let timed = value(
            &snapshot,
            MetricKind::Histogram,
            "p2p_exchange_duration_seconds",
            &[("role", role), ("outcome", outcome)],
        );
        match timed {
            Some(DebugValue::Histogram(samples)) => {
                assert_eq!(samples.len(), 1, "{role}: {samples:?}");
                assert!(samples[0].into_inner() >= 0.0);
            }
            other => panic!("{role} not timed: {other:?}"),
        }
    }
}
