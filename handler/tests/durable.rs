//! Durable nodes through the async driver: restarts on the same store resume exchanges,
//! redeliver what was acknowledged and not answered, and hand out dead letters; exchange ids
//! never repeat across incarnations; a bad store is a clear error, a failing one stops the
//! node. On the in-memory transport, with `MemoryStore` and the `redb` data directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use p2p_handler::durable::Table;
use p2p_handler::store::{Commit, KvOp, Row};
use p2p_handler::{
    AllowList, Config, Event, Failure, Handler, HandlerError, Inbox, KeyedExchange, Keypair,
    MemoryStore, MemoryTransport, Notice, Options, RedbStore, RequestError, RequestOptions, Store,
    StoreError,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const WAIT: Duration = Duration::from_secs(20);

struct Net {
    transport: MemoryTransport,
    alice: Keypair,
    bob: Keypair,
}

const ALICE: &str = "10.0.0.1:7000";
const BOB: &str = "10.0.0.2:7000";

fn config() -> Config {
    Config {
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        connect_timeout: Duration::from_millis(500),
        max_attempts: 50,
        ..Config::default()
    }
}

impl Net {
    fn new() -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        Self {
            transport: MemoryTransport::new(),
            alice: Keypair::generate(&mut rng),
            bob: Keypair::generate(&mut rng),
        }
    }

    async fn start(&self, who: &str, options: Options) -> Result<(Handler, Inbox), HandlerError> {
        let (key, other, addr) = match who {
            "alice" => (&self.alice, &self.bob, ALICE),
            _ => (&self.bob, &self.alice, BOB),
        };
        Handler::spawn_with(
            self.transport.clone(),
            addr.parse().unwrap(),
            key.clone(),
            AllowList::from_peers([other.peer_id()]),
            options,
        )
        .await
    }

    fn bob_addr(&self) -> SocketAddr {
        BOB.parse().unwrap()
    }
}

/// One attempt, and a small exchange budget: an exchange to a peer nobody listens for
/// fails within about a second (dials that never reach the peer are retried for the whole
/// budget).
fn quick() -> Config {
    Config {
        max_attempts: 1,
        ack_timeout: Duration::from_millis(200),
        reply_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(250),
        connect_timeout: Duration::from_millis(200),
        ..config()
    }
}

fn options() -> Options {
    Options::new(config(), [1; 32]).incarnation(0)
}

async fn next(inbox: &mut Inbox) -> Event {
    tokio::time::timeout(WAIT, inbox.received.recv())
        .await
        .expect("an event in time")
        .expect("handler running")
}

/// The next request or outcome of ours, skipping the fates of our replies.
async fn next_exchange_event(inbox: &mut Inbox) -> Event {
    loop {
        let event = next(inbox).await;
        if matches!(
            event,
            Event::Request { .. } | Event::Reply { .. } | Event::Failed { .. }
        ) {
            return event;
        }
    }
}

#[tokio::test]
async fn a_restart_with_the_same_seed_never_reuses_an_exchange_id() {
    // The reported loss: a node restarted with the same fixed seed (no store) sent a new
    // request under an old id; the responder took it for a resend and never delivered it.
    let net = Net::new();
    let (bob, mut bob_in) = net
        .start("bob", Options::new(config(), [2; 32]))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for text in ["first life", "second life"] {
        // No incarnation given: drawn from the operating system, as in production.
        let (alice, mut alice_in) = net
            .start("alice", Options::new(config(), [1; 32]))
            .await
            .unwrap();
        let id = alice
            .request(net.bob.peer_id(), net.bob_addr(), Bytes::from(text))
            .await
            .unwrap();
        let Event::Request {
            peer,
            exchange,
            payload,
            ..
        } = next_exchange_event(&mut bob_in).await
        else {
            panic!("bob got no request");
        };
        assert_eq!((exchange, &payload[..]), (id, text.as_bytes()));
        bob.response_to(peer, exchange, &b"ok"[..]).await.unwrap();
        assert!(
            matches!(next(&mut alice_in).await, Event::Reply { exchange, .. } if exchange == id)
        );
        alice.shutdown().await.unwrap();
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
}

#[tokio::test]
async fn a_durable_dialer_resumes_its_request_after_a_restart() {
    let net = Net::new();
    let store = MemoryStore::new();
    let (alice, _inbox) = net
        .start("alice", options().store(store.clone()))
        .await
        .unwrap();
    // Bob is not up yet: the request waits, retrying.
    let id = alice
        .request(net.bob.peer_id(), net.bob_addr(), &b"keep me"[..])
        .await
        .unwrap();
    assert_eq!(
        store.rows(Table::Outbound),
        1,
        "durable before request() returned"
    );
    let report = alice.shutdown().await.unwrap();
    assert_eq!((report.kept, report.failed.len()), (1, 0));
    let (bob, mut bob_in) = net.start("bob", options()).await.unwrap();
    let (alice, mut alice_in) = net
        .start("alice", options().store(store.clone()))
        .await
        .unwrap();
    let Event::Request {
        peer,
        exchange,
        redelivered,
        ..
    } = next(&mut bob_in).await
    else {
        panic!("no request");
    };
    assert_eq!((exchange, redelivered), (id, false));
    bob.response_to(peer, exchange, &b"done"[..]).await.unwrap();
    let Event::Reply {
        exchange, payload, ..
    } = next(&mut alice_in).await
    else {
        panic!("no reply");
    };
    assert_eq!((exchange, &payload[..]), (id, &b"done"[..]));
    // Taken by the application: forgotten by the store with the next commit that happens
    // anyway, or, on a node with nothing else to commit, by one of its own shortly after.
    // Polled (bounded: a hang fails the test).
    assert_eq!(store.rows(Table::Outbound), 0);
    for _ in 0..6_000 {
        if store.rows(Table::Outcomes) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        store.rows(Table::Outcomes),
        0,
        "forgotten without a shutdown"
    );
    drop(alice);
}

async fn redelivery_after_restart(bob_options: impl Fn() -> Options) {
    let net = Net::new();
    let (alice, mut alice_in) = net.start("alice", options()).await.unwrap();
    let (bob, mut bob_in) = net.start("bob", bob_options()).await.unwrap();
    let id = alice
        .request(net.bob.peer_id(), net.bob_addr(), &b"answer me later"[..])
        .await
        .unwrap();
    let Event::Request { redelivered, .. } = next(&mut bob_in).await else {
        panic!("no request");
    };
    assert!(!redelivered);
    // Bob stops with the request acknowledged and unanswered.
    let report = bob.shutdown().await.unwrap();
    assert_eq!(report.unanswered_requests, 1);
    drop(bob_in);
    let (bob, mut bob_in) = net.start("bob", bob_options()).await.unwrap();
    let Event::Request {
        peer,
        exchange,
        payload,
        redelivered,
        ..
    } = next(&mut bob_in).await
    else {
        panic!("no redelivery");
    };
    assert_eq!(
        (exchange, &payload[..], redelivered),
        (id, &b"answer me later"[..], true)
    );
    bob.response_to(peer, exchange, &b"later"[..])
        .await
        .unwrap();
    let Event::Reply {
        exchange, payload, ..
    } = next(&mut alice_in).await
    else {
        panic!("no reply");
    };
    assert_eq!((exchange, &payload[..]), (id, &b"later"[..]));
    bob.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_acknowledged_unanswered_request_is_redelivered_after_a_restart() {
    let store = MemoryStore::new();
    redelivery_after_restart(|| options().store(store.clone())).await;
}

#[tokio::test]
async fn the_redb_data_directory_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("p2p-durable-redb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    redelivery_after_restart(|| options().data_dir(&dir).unwrap()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn dead_letters_survive_a_restart_and_go_once_taken() {
    let net = Net::new();
    let store = MemoryStore::new();
    let quick = quick();
    let start = || Options::new(quick.clone(), [1; 32]).store(store.clone());
    let (alice, alice_in) = net.start("alice", start()).await.unwrap();
    let id = alice
        .request(net.bob.peer_id(), net.bob_addr(), &b"nobody home"[..])
        .await
        .unwrap();
    // The failure is recorded; the application does not read it before stopping.
    // Polled for up to 30 s: a bound against a hang, generous for a loaded machine.
    for _ in 0..6000 {
        if store.rows(Table::Outcomes) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(store.rows(Table::Outcomes), 1);
    alice.shutdown().await.unwrap();
    drop(alice_in);
    let (alice, mut alice_in) = net.start("alice", start()).await.unwrap();
    let Event::Failed {
        exchange,
        payload,
        redelivered,
        failure,
        ..
    } = next(&mut alice_in).await
    else {
        panic!("no dead letter");
    };
    assert_eq!(
        (exchange, &payload[..], redelivered),
        (id, &b"nobody home"[..], true)
    );
    assert!(matches!(failure, Failure::Exhausted { .. }), "{failure:?}");
    alice.shutdown().await.unwrap();
    drop(alice_in);
    assert_eq!(store.rows(Table::Outcomes), 0, "taken: gone for good");
    let (_alice, mut alice_in) = net.start("alice", start()).await.unwrap();
    assert!(alice_in.received.try_recv().is_err());
}

#[tokio::test]
async fn the_fate_of_a_reply_the_application_did_not_read_survives_a_restart() {
    // Bob answers Alice; "Alice has your reply" is stored with the step that raises it. Bob's
    // application stops before reading it (a kill would lose the inbox): after the restart
    // it comes again, flagged; once read, never again.
    let net = Net::new();
    let store = MemoryStore::new();
    let start = || options().store(store.clone());
    let (bob, mut bob_in) = net.start("bob", start()).await.unwrap();
    let (alice, mut alice_in) = net.start("alice", options()).await.unwrap();
    let id = alice
        .request(net.bob.peer_id(), net.bob_addr(), &b"sign this"[..])
        .await
        .unwrap();
    let Event::Request { peer, exchange, .. } = next(&mut bob_in).await else {
        panic!("no request");
    };
    bob.response_to(peer, exchange, &b"signed"[..])
        .await
        .unwrap();
    assert!(
        matches!(next_exchange_event(&mut alice_in).await, Event::Reply { exchange, .. } if exchange == id)
    );
    // Bob's fate-of-reply row is written before the event is handed out; wait for it,
    // bounded (a hang fails the test).
    for _ in 0..2_000 {
        if store.rows(Table::Responses) == 1 {
            break;
        }
        bob.status().await.unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(store.rows(Table::Responses), 1);
    bob.shutdown().await.unwrap();
    drop(bob_in);
    let (bob, mut bob_in) = net.start("bob", start()).await.unwrap();
    let again = next(&mut bob_in).await;
    assert_eq!(
        again,
        Event::ResponseDelivered {
            peer: net.alice.peer_id(),
            exchange: id,
            redelivered: true
        }
    );
    bob.shutdown().await.unwrap();
    drop(bob_in);
    assert_eq!(store.rows(Table::Responses), 0, "read: gone for good");
    let (_bob, mut bob_in) = net.start("bob", start()).await.unwrap();
    assert!(bob_in.received.try_recv().is_err());
}

#[tokio::test]
async fn unread_outcomes_are_bounded() {
    let net = Net::new();
    let config = Config {
        max_unread_outcomes: 2,
        ..quick()
    };
    let (alice, mut alice_in) = net
        .start("alice", Options::new(config, [1; 32]))
        .await
        .unwrap();
    let to = (net.bob.peer_id(), net.bob_addr());
    for _ in 0..2 {
        alice.request(to.0, to.1, &b"x"[..]).await.unwrap();
    }
    // Both fail (nobody listens at Bob's address); nobody reads the failures.
    // Polled for up to 30 s: a bound against a hang, generous for a loaded machine.
    for _ in 0..6000 {
        if alice.status().await.unwrap().outbound_in_flight == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = alice.request(to.0, to.1, &b"x"[..]).await;
    assert!(
        matches!(
            refused,
            Err(HandlerError::Request(RequestError::Unread { limit: 2 }))
        ),
        "{refused:?}"
    );
    // Reading one makes room for one.
    assert!(matches!(next(&mut alice_in).await, Event::Failed { .. }));
    alice.status().await.unwrap();
    alice.request(to.0, to.1, &b"x"[..]).await.unwrap();
}

#[tokio::test]
async fn a_store_of_another_node_is_refused_by_name() {
    let net = Net::new();
    let store = MemoryStore::new();
    let (alice, _inbox) = net
        .start("alice", options().store(store.clone()))
        .await
        .unwrap();
    alice.shutdown().await.unwrap();
    let err = net
        .start("bob", options().store(store.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HandlerError::Store(StoreError::Corrupt { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("belongs to node"), "{err}");
}

#[tokio::test]
async fn a_damaged_data_directory_is_an_error_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("p2p-durable-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("node.redb"), vec![0x5a; 8192]).unwrap();
    let err = RedbStore::open(&dir).unwrap_err();
    assert!(err.to_string().contains("node.redb"), "{err}");
    // A second process on the same directory is refused too, not silently shared.
    let _ = std::fs::remove_dir_all(&dir);
    let first = RedbStore::open(&dir).unwrap();
    let second = RedbStore::open(&dir);
    assert!(second.is_err(), "opened twice");
    drop(first);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A store whose disk fails after `good` commits.
struct FailingStore {
    inner: MemoryStore,
    good: usize,
}

impl Store for FailingStore {
    fn load(&mut self) -> Result<Vec<Row>, StoreError> {
        self.inner.load()
    }

    fn commit(&mut self, ops: Vec<KvOp>) -> Commit {
        if self.good == 0 {
            return Box::pin(std::future::ready(Err(StoreError::Io {
                path: "test disk".into(),
                detail: "no space left on device".into(),
            })));
        }
        self.good -= 1;
        self.inner.commit(ops)
    }

    fn location(&self) -> String {
        "test disk".into()
    }
}

#[tokio::test]
async fn a_failing_store_stops_the_node_before_it_acts() {
    let net = Net::new();
    let failing = FailingStore {
        inner: MemoryStore::new(),
        good: 0,
    };
    let (alice, mut inbox) = net.start("alice", options().store(failing)).await.unwrap();
    let result = alice
        .request(net.bob.peer_id(), net.bob_addr(), &b"x"[..])
        .await;
    assert!(
        matches!(result, Err(HandlerError::Stopped)),
        "no id for a request that is not durable: {result:?}"
    );
    let notice = tokio::time::timeout(WAIT, inbox.priority.recv())
        .await
        .unwrap();
    assert!(
        matches!(&notice, Some(Notice::StoreFailed(e)) if e.contains("no space left")),
        "{notice:?}"
    );
}

/// Waits until `store` holds `rows` outcome rows (commits run behind the answers they
/// release). Bounded: a hang fails the test.
async fn outcome_rows(store: &MemoryStore, handler: &Handler, rows: usize) {
    for _ in 0..2_000 {
        if store.rows(Table::Outcomes) == rows {
            return;
        }
        handler.status().await.unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(store.rows(Table::Outcomes), rows);
}

#[tokio::test]
async fn an_idempotency_key_finds_the_exchange_after_the_application_lost_its_id() {
    let net = Net::new();
    let store = MemoryStore::new();
    let (alice, _inbox) = net
        .start("alice", options().store(store.clone()))
        .await
        .unwrap();
    let bob_id = net.bob.peer_id();
    // The request is committed; the process dies before the application stored the id.
    let id = alice
        .request_with(
            bob_id,
            net.bob_addr(),
            &b"transfer 10"[..],
            RequestOptions::new().key("transfer/2026-12-05/17"),
        )
        .await
        .unwrap();
    alice.shutdown().await.unwrap();
    let (alice, mut alice_in) = net
        .start("alice", options().store(store.clone()))
        .await
        .unwrap();
    // Restarted, the application asks before sending again: the request was made.
    let found = alice
        .lookup(bob_id, "transfer/2026-12-05/17")
        .await
        .unwrap();
    assert!(
        matches!(found, Some(KeyedExchange::Queued { exchange } | KeyedExchange::InFlight { exchange, .. }) if exchange == id),
        "{found:?}"
    );
    let again = alice
        .request_with(
            bob_id,
            net.bob_addr(),
            &b"transfer 10"[..],
            RequestOptions::new().key("transfer/2026-12-05/17"),
        )
        .await;
    assert!(
        matches!(again, Err(HandlerError::Request(RequestError::KeyInUse { exchange, .. })) if exchange == id),
        "{again:?}"
    );
    assert_eq!(alice.lookup(bob_id, "never-made").await.unwrap(), None);
    // Bob comes up and answers; the outcome comes under the same id.
    let (bob, mut bob_in) = net.start("bob", options()).await.unwrap();
    let Event::Request { peer, exchange, .. } = next(&mut bob_in).await else {
        panic!("no request");
    };
    bob.response_to(peer, exchange, &b"done"[..]).await.unwrap();
    let Event::Reply { exchange, .. } = next(&mut alice_in).await else {
        panic!("no reply");
    };
    assert_eq!(exchange, id);
    // Taken (default mode): settled, the key is free again (its row goes with the next
    // commit). The handler hears of the taking on a channel of its own: polled, bounded.
    let mut found = None;
    for _ in 0..2_000 {
        found = alice
            .lookup(bob_id, "transfer/2026-12-05/17")
            .await
            .unwrap();
        if found.is_none() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(found, None);
    alice.shutdown().await.unwrap();
    assert_eq!(
        store.rows(Table::Outcomes),
        0,
        "forgotten in the last commit"
    );
}

#[tokio::test]
async fn in_confirm_mode_an_outcome_taken_but_not_confirmed_comes_back_flagged() {
    let net = Net::new();
    let store = MemoryStore::new();
    let confirming = || options().store(store.clone()).confirm_outcomes();
    let (bob, mut bob_in) = net.start("bob", options()).await.unwrap();
    let (alice, mut alice_in) = net.start("alice", confirming()).await.unwrap();
    let id = alice
        .request_with(
            net.bob.peer_id(),
            net.bob_addr(),
            &b"q"[..],
            RequestOptions::new().key("k"),
        )
        .await
        .unwrap();
    let Event::Request { peer, exchange, .. } = next(&mut bob_in).await else {
        panic!("no request");
    };
    bob.response_to(peer, exchange, &b"a"[..]).await.unwrap();
    let reply = next(&mut alice_in).await;
    assert!(matches!(&reply, Event::Reply { exchange, redelivered: false, .. } if *exchange == id));
    // Taken, but the application dies before it stored it: the outcome stays.
    outcome_rows(&store, &alice, 1).await;
    let found = alice.lookup(net.bob.peer_id(), "k").await.unwrap();
    assert!(
        matches!(found, Some(KeyedExchange::Finished(Event::Reply { .. }))),
        "{found:?}"
    );
    alice.shutdown().await.unwrap();
    drop(alice_in);
    let (alice, mut alice_in) = net.start("alice", confirming()).await.unwrap();
    let again = next(&mut alice_in).await;
    assert!(
        matches!(&again, Event::Reply { exchange, redelivered: true, .. } if *exchange == id),
        "{again:?}"
    );
    // Stored by the application now: confirmed, gone for good, its key free.
    assert!(alice.confirm(again.receipt().unwrap()).await.unwrap());
    assert!(
        !alice.confirm(again.receipt().unwrap()).await.unwrap(),
        "once"
    );
    assert_eq!(alice.lookup(net.bob.peer_id(), "k").await.unwrap(), None);
    alice.shutdown().await.unwrap();
    drop(alice_in);
    let (_alice, mut alice_in) = net.start("alice", confirming()).await.unwrap();
    assert!(alice_in.received.try_recv().is_err());
}

#[tokio::test]
async fn in_confirm_mode_unconfirmed_outcomes_count_against_the_unread_bound() {
    let net = Net::new();
    let config = Config {
        max_unread_outcomes: 1,
        ..quick()
    };
    let (alice, mut alice_in) = net
        .start("alice", Options::new(config, [1; 32]).confirm_outcomes())
        .await
        .unwrap();
    let to = (net.bob.peer_id(), net.bob_addr());
    alice.request(to.0, to.1, &b"x"[..]).await.unwrap();
    let failed = next(&mut alice_in).await;
    assert!(matches!(failed, Event::Failed { .. }), "{failed:?}");
    // Taken, not confirmed: still unread as far as the bound goes.
    let refused = alice.request(to.0, to.1, &b"y"[..]).await;
    assert!(
        matches!(
            refused,
            Err(HandlerError::Request(RequestError::Unread { limit: 1 }))
        ),
        "{refused:?}"
    );
    assert!(alice.confirm(failed.receipt().unwrap()).await.unwrap());
    alice.request(to.0, to.1, &b"y"[..]).await.unwrap();
}
