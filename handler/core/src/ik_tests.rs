//! Which handshake an endpoint asks its driver for: IK when it knows the responder's key and
//! the responder is not known to lack IK, XX otherwise, and back to IK once a hello says the
//! responder takes it.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::allow_list::AllowList;
use crate::config::Config;
use crate::connection::{Closed, ConnEvent};
use crate::endpoint::{ConnId, Endpoint, Output};
use crate::harness::Net;
use crate::identity::{KEY_LEN, PeerId};
use crate::wire::{FEATURE_IK, FEATURE_MEMBERSHIP};

/// The dials since the last call: (connection, key given).
fn dials(ep: &mut Endpoint) -> Vec<(ConnId, Option<[u8; KEY_LEN]>)> {
    std::iter::from_fn(|| ep.poll_output())
        .filter_map(|o| match o {
            Output::Dial { conn, key, .. } => Some((conn, key)),
            _ => None,
        })
        .collect()
}

fn established(peer: PeerId, features: u32) -> ConnEvent {
    ConnEvent::Established {
        peer,
        remote_max_message_size: 1 << 20,
        remote_features: features,
    }
}

#[test]
fn ik_when_the_key_is_known_xx_after_an_ik_dial_fails_and_ik_again_once_a_hello_offers_it() {
    let net = Net::new(3, &["a", "b", "c"], Config::default());
    let (b, b_key) = (net.id(1), *net.nodes[1].keypair.public_bytes());
    let c = net.id(2);
    let mut now = Instant::now();
    // b's key is listed; c is listed by peer id alone.
    let mut allow = AllowList::from_keys([b_key]);
    allow.insert(c, crate::allow_list::AllowedPeer::default());
    let mut ep = Endpoint::new(Config::default(), net.id(0), allow, [5; 32]).unwrap();
    let addr = net.nodes[1].addr;
    ep.request(c, net.nodes[2].addr, Bytes::from_static(b"c"), now)
        .unwrap();
    assert_eq!(
        dials(&mut ep).first().map(|d| d.1),
        Some(None),
        "no key for c"
    );
    ep.request(b, addr, Bytes::from_static(b"b"), now).unwrap();
    let first = dials(&mut ep);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].1, Some(b_key), "b's key is known: IK");
    assert_eq!(ep.stats().ik_dials, 1);
    // The IK dial fails before the handshake finished (a responder that predates IK hangs
    // up): the retry uses XX.
    let closed = ConnEvent::Closed(Closed::Io("reset by peer".into()));
    ep.handle_conn_event(first[0].0, closed, now);
    let retry = loop {
        now += Duration::from_millis(50);
        ep.handle_timeout(now);
        let d = dials(&mut ep);
        if !d.is_empty() {
            break d;
        }
        assert!(
            now < Instant::now() + Duration::from_secs(60),
            "never retried"
        );
    };
    assert_eq!(retry[0].1, None, "retried with IK after IK failed");
    // Its hello lacks IK: XX stays.
    ep.handle_conn_event(retry[0].0, established(b, FEATURE_MEMBERSHIP), now);
    ep.handle_conn_event(
        retry[0].0,
        ConnEvent::Closed(Closed::Io("gone".into())),
        now,
    );
    // The connection drops before the Request was answered: the exchange dials again.
    let next = loop {
        now += Duration::from_millis(50);
        ep.handle_timeout(now);
        let d = dials(&mut ep);
        if !d.is_empty() {
            break d;
        }
    };
    assert_eq!(
        next[0].1, None,
        "a peer whose hello lacks IK was dialed with IK"
    );
    // Upgraded: its hello now offers IK, so the next dial is IK again.
    ep.handle_conn_event(
        next[0].0,
        established(b, FEATURE_MEMBERSHIP | FEATURE_IK),
        now,
    );
    ep.handle_conn_event(next[0].0, ConnEvent::Closed(Closed::Io("gone".into())), now);
    let after = loop {
        now += Duration::from_millis(50);
        ep.handle_timeout(now);
        let d = dials(&mut ep);
        if !d.is_empty() {
            break d;
        }
    };
    assert_eq!(after[0].1, Some(b_key));
}

#[test]
fn a_network_of_known_keys_runs_its_exchanges_over_ik() {
    let mut net = Net::new(4, &["a", "b", "c"], Config::default());
    let ids: Vec<_> = [(0, 1), (1, 2), (2, 0)]
        .iter()
        .map(|&(from, to)| (from, net.request(from, to, b"over ik")))
        .collect();
    net.run(Duration::from_secs(30));
    for (from, id) in ids {
        assert!(net.replies(from).iter().any(|(x, _)| *x == id), "{id}");
    }
    let ik = net.trace.iter().filter(|l| l.contains("(IK)")).count();
    let xx = net.trace.iter().filter(|l| l.contains("(XX)")).count();
    assert!(ik >= 3 && xx == 0, "IK {ik}, XX {xx}");
    assert!((0..3).all(|n| net.nodes[n].endpoint.stats().ik_dials >= 1));
}
