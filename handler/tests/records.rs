//! Address records over real TCP on 127.0.0.1 (port 0, no sleeps as synchronisation):
//! nodes that know each other's peer ids only find each other through a shared records
//! backend, a node that restarts on another port is reached there, and the directory
//! backend stores and reads records safely.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test helpers may panic: that is a failed test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use p2p_handler::endpoint::RecordEvent;
use p2p_handler::membership::{Digest, Document, GovernanceKey, Member, Signed};
use p2p_handler::records::{
    DirectoryBackend, MAX_RECORD_LEN, MemoryBackend, RecordBackend, RecordOptions, RecordSigner,
};
use p2p_handler::{
    AllowList, Config, Event, Handler, HandlerError, Inbox, Keypair, Notice, Options, PeerId,
    RequestError, TcpTransport,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const WAIT: Duration = Duration::from_secs(30);

fn keys(n: usize) -> Vec<Keypair> {
    let mut rng = ChaCha20Rng::seed_from_u64(23);
    (0..n).map(|_| Keypair::generate(&mut rng)).collect()
}

/// A genesis listing `keys` with their record keys and no addresses, signed 1 of 1.
fn genesis(keys: &[Keypair]) -> Signed {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let gov = GovernanceKey::generate(&mut rng);
    let doc = Document {
        network: "records-test".into(),
        epoch: 1,
        previous: Digest::NONE,
        expires: None,
        threshold: 1,
        committee: vec![gov.id()],
        members: keys
            .iter()
            .map(|k| Member {
                key: *k.public_bytes(),
                name: None,
                address: None,
                allowed: Vec::new(),
                expires: None,
                record_key: Some(RecordSigner::new(k).record_key()),
            })
            .collect(),
    };
    let mut signed = Signed::new(doc).unwrap();
    signed.sign(&gov, &mut rng);
    signed
}

async fn start(
    key: &Keypair,
    doc: &Signed,
    backend: &MemoryBackend,
    seed: u8,
) -> (Handler, Inbox, SocketAddr) {
    let records = RecordOptions {
        backend: Some(Arc::new(backend.clone())),
        poll_interval: Duration::from_millis(50),
        ..RecordOptions::default()
    };
    let options = Options::new(Config::default(), [seed; 32])
        .membership(doc.clone())
        .records(records);
    let (handler, inbox) = Handler::spawn_with(
        TcpTransport,
        "127.0.0.1:0".parse().unwrap(),
        key.clone(),
        AllowList::new(),
        options,
    )
    .await
    .unwrap();
    let addr = handler.local_addr();
    (handler, inbox, addr)
}

/// Waits until `inbox` reports the record of each `(peer, addr)` accepted, in any order.
async fn accepted(inbox: &mut Inbox, expected: &[(PeerId, SocketAddr)]) -> bool {
    let mut left: Vec<(PeerId, SocketAddr)> = expected.to_vec();
    let found = async {
        while let Some(notice) = inbox.priority.recv().await {
            if let Notice::Event(Event::Record(RecordEvent::Accepted {
                peer, addresses, ..
            })) = &notice
            {
                left.retain(|(p, a)| !(p == peer && addresses == &vec![*a]));
                if left.is_empty() {
                    return true;
                }
            }
        }
        false
    };
    tokio::time::timeout(WAIT, found).await.unwrap_or(false)
}

/// Serves `inbox`: answers every request with "re:" + payload.
fn serve(handler: Handler, mut inbox: Inbox) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(event) = inbox.received.recv().await {
            if let Event::Request { peer, payload, .. } = event {
                let mut answer = b"re:".to_vec();
                answer.extend_from_slice(&payload);
                let _ = handler.response(peer, answer).await;
            }
        }
    })
}

async fn reply_to(inbox: &mut Inbox, id: p2p_handler::ExchangeId) -> Option<Bytes> {
    let found = async {
        while let Some(event) = inbox.received.recv().await {
            match event {
                Event::Reply {
                    exchange, payload, ..
                } if exchange == id => return Some(payload),
                Event::Failed {
                    exchange, failure, ..
                } if exchange == id => panic!("{id} failed: {failure}"),
                _ => {}
            }
        }
        None
    };
    tokio::time::timeout(WAIT, found).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_find_each_other_by_peer_id_and_follow_one_that_moves() {
    let keys = keys(3);
    let doc = genesis(&keys);
    let backend = MemoryBackend::new();
    let (a, mut a_inbox, _) = start(&keys[0], &doc, &backend, 1).await;
    let (b, b_inbox, b_addr) = start(&keys[1], &doc, &backend, 2).await;
    let (c, c_inbox, c_addr) = start(&keys[2], &doc, &backend, 3).await;
    // Nobody was given an address: a learns b's and c's from the backend.
    assert!(
        accepted(
            &mut a_inbox,
            &[(keys[1].peer_id(), b_addr), (keys[2].peer_id(), c_addr)]
        )
        .await
    );
    let _b = serve(b, b_inbox);
    let c_task = serve(c.clone(), c_inbox);
    let id = a.request_to(keys[2].peer_id(), "hello c").await.unwrap();
    assert_eq!(
        reply_to(&mut a_inbox, id).await.as_deref(),
        Some(&b"re:hello c"[..])
    );
    // c stops and comes back on another port, with the same key.
    c.shutdown().await.unwrap();
    c_task.abort();
    let (c2, c2_inbox, c2_addr) = start(&keys[2], &doc, &backend, 4).await;
    assert_ne!(c2_addr, c_addr);
    let _c2 = serve(c2, c2_inbox);
    assert!(accepted(&mut a_inbox, &[(keys[2].peer_id(), c2_addr)]).await);
    let id = a.request_to(keys[2].peer_id(), "moved?").await.unwrap();
    assert_eq!(
        reply_to(&mut a_inbox, id).await.as_deref(),
        Some(&b"re:moved?"[..])
    );
    let status = a.status().await.unwrap();
    assert!(status.inactive_members.is_empty());
    assert_eq!(status.records_held, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_no_record_is_refused_at_once_with_the_payload_unsent() {
    let keys = keys(2);
    let doc = genesis(&keys);
    let (a, _a_inbox, _) = start(&keys[0], &doc, &MemoryBackend::new(), 1).await;
    match a.request_to(keys[1].peer_id(), "anyone?").await {
        Err(HandlerError::Request(RequestError::NoAddress(p))) => {
            assert_eq!(p, keys[1].peer_id());
        }
        other => panic!("{other:?}"),
    }
    let status = a.status().await.unwrap();
    assert_eq!(status.inactive_members, vec![keys[1].peer_id()]);
    // A stranger is not a member at all.
    let stranger = Keypair::from_private_bytes([9; 32]).peer_id();
    assert!(matches!(
        a.request_to(stranger, "x").await,
        Err(HandlerError::Request(RequestError::NotAllowed(_)))
    ));
}

#[tokio::test]
async fn records_need_a_membership() {
    let key = Keypair::from_private_bytes([1; 32]);
    let options = Options::new(Config::default(), [1; 32]).records(RecordOptions::default());
    let result = Handler::spawn_with(
        TcpTransport,
        "127.0.0.1:0".parse().unwrap(),
        key,
        AllowList::new(),
        options,
    )
    .await;
    assert!(
        matches!(result, Err(HandlerError::Records(_))),
        "{:?}",
        result.err()
    );
}

#[test]
fn the_directory_backend_writes_whole_files_and_reads_only_record_files() {
    let dir = std::env::temp_dir().join(format!("p2p-records-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let backend = DirectoryBackend::new(&dir).unwrap();
    let owner = Keypair::from_private_bytes([3; 32]).peer_id();
    backend.publish(owner, b"first").unwrap();
    backend.publish(owner, b"second").unwrap();
    assert_eq!(
        std::fs::read(backend.file_of(&owner)).unwrap(),
        b"second".to_vec()
    );
    // Not a record file name, an oversized file, a stray temporary file: skipped.
    std::fs::write(dir.join("notes.txt"), b"hello").unwrap();
    std::fs::write(dir.join("zz.record"), b"not a peer id").unwrap();
    let big = Keypair::from_private_bytes([4; 32]).peer_id();
    std::fs::write(backend.file_of(&big), vec![0u8; MAX_RECORD_LEN + 1]).unwrap();
    std::fs::write(dir.join(format!(".{owner}.record.1.tmp")), b"half").unwrap();
    assert_eq!(
        backend.fetch().unwrap(),
        vec![Bytes::from_static(b"second")]
    );
    assert!(DirectoryBackend::new(dir.join("notes.txt")).is_err());
    assert!(DirectoryBackend::new(dir.join("missing")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_to_can_wait_for_a_peer_that_has_not_published_yet() {
    let keys = keys(3);
    let doc = genesis(&keys);
    let backend = MemoryBackend::new();
    let (a, mut a_inbox, _) = start(&keys[0], &doc, &backend, 1).await;
    // b has not started: a's request waits for its record instead of failing.
    let waiting = {
        let a = a.clone();
        let peer = keys[1].peer_id();
        tokio::spawn(async move {
            a.request_to_with(
                peer,
                "are you up yet?",
                p2p_handler::RequestOptions::new().wait_for_address(WAIT),
            )
            .await
        })
    };
    let (b, b_inbox, _) = start(&keys[1], &doc, &backend, 2).await;
    let _b = serve(b, b_inbox);
    let id = tokio::time::timeout(WAIT, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        reply_to(&mut a_inbox, id).await.as_deref(),
        Some(&b"re:are you up yet?"[..])
    );
    // c never starts: the wait ends with the error, payload unsent.
    let result = a
        .request_to_with(
            keys[2].peer_id(),
            "nobody",
            p2p_handler::RequestOptions::new().wait_for_address(Duration::from_millis(200)),
        )
        .await;
    assert!(
        matches!(
            result,
            Err(HandlerError::Request(RequestError::NoAddress(_)))
        ),
        "{result:?}"
    );
}
