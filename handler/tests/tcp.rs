//! Integration tests over real TCP on 127.0.0.1 (port 0; no fixed ports, no sleeps used as
//! synchronisation: every wait is for an event, bounded by a generous timeout).

use std::time::Duration;

use bytes::Bytes;
use p2p_handler::{AllowList, Config, Event, Keypair, P2pHandler};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const WAIT: Duration = Duration::from_secs(20);

fn keys(seed: u64, n: usize) -> Vec<Keypair> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n).map(|_| Keypair::generate(&mut rng)).collect()
}

fn node(key: &Keypair, allow: &[&Keypair], config: Config) -> P2pHandler {
    let allow = AllowList::from_peers(allow.iter().map(|k| k.peer_id()));
    P2pHandler::with_seed("127.0.0.1:0", key.clone(), allow, config, [7; 32]).unwrap()
}

#[test]
fn request_and_reply_over_tcp() {
    let k = keys(1, 2);
    let alice = node(&k[0], &[&k[1]], Config::default());
    let bob = node(&k[1], &[&k[0]], Config::default());
    let id = alice
        .request(bob.local_peer_id(), bob.local_address(), &b"ping"[..])
        .unwrap();
    let Some(Event::Request {
        peer,
        exchange,
        payload,
        addr,
    }) = bob.receive_timeout(WAIT)
    else {
        panic!("no request");
    };
    assert_eq!(
        (peer, exchange, &payload[..]),
        (alice.local_peer_id(), id, &b"ping"[..])
    );
    assert_eq!(addr.ip(), alice.local_address().ip());
    assert_eq!(bob.response(peer, &b"pong"[..]).unwrap(), id);
    let Some(Event::Reply {
        peer,
        exchange,
        payload,
        addr,
    }) = alice.receive_timeout(WAIT)
    else {
        panic!("no reply");
    };
    assert_eq!(
        (peer, exchange, payload),
        (bob.local_peer_id(), id, Bytes::from_static(b"pong"))
    );
    assert_eq!(addr, bob.local_address());
    let report = alice.shutdown();
    assert!(report.failed.is_empty());
    bob.shutdown();
}
