//! Address records across a network of endpoints (the deterministic harness): records
//! travel between members, a node that moves is reached at its new address, a node that
//! stops refreshing becomes inactive, and forged, replayed or malformed records change
//! nothing.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

use crate::config::Config;
use crate::endpoint::{Event, Failure, RecordEvent, RequestError, Source};
use crate::harness::Net;
use crate::membership::tests::{gov, sign_with};
use crate::membership::{Document, GovernanceKey, Member, Signed};
use crate::records::{RecordSigner, Refusal};
use crate::wire::Message;
use rand_core::SeedableRng as _;

const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const TTL: Duration = Duration::from_secs(120);

pub(crate) fn member(net: &Net, node: usize, with_address: bool) -> Member {
    Member {
        key: *net.nodes[node].keypair.public_bytes(),
        name: Some(net.nodes[node].name.to_owned()),
        address: with_address.then_some(net.nodes[node].addr),
        allowed: Vec::new(),
        expires: None,
        record_key: Some(RecordSigner::new(&net.nodes[node].keypair).record_key()),
    }
}

/// A genesis of network "test" with `members`, 2-of-3, signed by keys 0 and 1.
pub(crate) fn genesis(members: Vec<Member>) -> Signed {
    let keys: Vec<GovernanceKey> = (0..3).map(gov).collect();
    let doc = Document {
        network: "test".into(),
        epoch: 1,
        previous: crate::membership::Digest::NONE,
        expires: None,
        threshold: 2,
        committee: keys.iter().map(GovernanceKey::id).collect(),
        members,
    };
    sign_with(Signed::new(doc).unwrap(), &keys, &[0, 1])
}

/// Four members, each with a record key; `addressed` ones also have a static address in
/// the document. Membership and records installed on every node.
fn network(seed: u64, addressed: &[usize]) -> (Net, Signed) {
    let mut net = Net::new(seed, &NAMES, Config::default());
    let g = genesis(
        (0..4)
            .map(|n| member(&net, n, addressed.contains(&n)))
            .collect(),
    );
    for node in 0..4 {
        let _ = net.install_membership(node, g.clone());
        net.install_records(node, TTL);
    }
    (net, g)
}

fn record_events(net: &Net, node: usize) -> Vec<&RecordEvent> {
    net.nodes[node]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Record(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn refusals(net: &Net, node: usize) -> Vec<&Refusal> {
    record_events(net, node)
        .into_iter()
        .filter_map(|e| match e {
            RecordEvent::Refused { refusal, .. } => Some(refusal),
            _ => None,
        })
        .collect()
}

/// Whether `node` holds an unexpired record of every other member naming its address.
fn knows_everyone(net: &Net, node: usize) -> bool {
    (0..4).filter(|&o| o != node).all(|o| {
        net.nodes[node]
            .endpoint
            .record_of(&net.id(o), net.now)
            .is_some_and(|r| r.addresses == vec![net.nodes[o].addr])
    })
}

fn sealed_of(net: &Net, node: usize) -> Bytes {
    net.nodes[node]
        .endpoint
        .own_record()
        .unwrap()
        .bytes()
        .clone()
}

const WINDOW: Duration = Duration::from_secs(60);

#[test]
fn every_members_record_reaches_every_member_and_request_to_needs_no_address() {
    // Only a has a static address: the others are found through records alone.
    let (mut net, _) = network(1, &[0]);
    assert!(net.run_until(WINDOW, |n| (0..4).all(|node| knows_everyone(n, node))));
    for node in 0..4 {
        assert!(
            net.nodes[node]
                .endpoint
                .inactive_members(net.now)
                .is_empty()
        );
        assert!(refusals(&net, node).is_empty(), "{node}");
    }
    // Each asks each by peer id alone.
    let mut ids = Vec::new();
    for from in 0..4 {
        for to in (0..4).filter(|&t| t != from) {
            ids.push((from, net.request_to(from, to, b"hi").unwrap()));
        }
    }
    assert!(net.run_until(WINDOW, |n| {
        ids.iter()
            .all(|(from, id)| n.replies(*from).iter().any(|(x, _)| x == id))
    }));
    // Sync connections close once both ends agree: no connection stays open, and no
    // dial happens until the first refresh (at half the records' life).
    net.run_for(Duration::from_secs(20));
    assert_eq!(net.open_links(), 0);
    let mark = net.trace.len();
    net.run_for((TTL / 2).saturating_sub(net.elapsed() + Duration::from_secs(1)));
    assert!(
        !net.trace[mark..].iter().any(|l| l.contains(" dial ")),
        "{:#?}",
        &net.trace[mark..]
    );
}

#[test]
fn a_node_that_moves_is_reached_at_its_new_address() {
    let (mut net, _) = network(2, &[0, 1, 2, 3]);
    assert!(net.run_until(WINDOW, |n| (0..4).all(|node| knows_everyone(n, node))));
    // d goes down; a asks it something, which backs off at the old address.
    net.crash(3);
    let id = net.request_to(0, 3, b"where are you").unwrap();
    net.run_for(Duration::from_secs(3));
    assert!(!net.has_outcome(0, id));
    // d comes back on another address (its document entry still names the old one).
    net.nodes[3].addr = SocketAddr::from(([10, 0, 1, 4], 7100));
    net.restart(3);
    assert!(net.run_until(WINDOW, |n| n.replies(0).iter().any(|(x, _)| *x == id)));
    // Everyone took the move; nobody needed the application.
    for node in 0..3 {
        assert!(
            record_events(&net, node).iter().any(|e| matches!(
                e,
                RecordEvent::Accepted { moved: true, addresses, .. }
                    if addresses == &vec![SocketAddr::from(([10, 0, 1, 4], 7100))]
            )),
            "{node}"
        );
    }
    assert!(net.run_until(WINDOW, |n| (0..4).all(|node| knows_everyone(n, node))));
    let again = net.request_to(1, 3, b"and now").unwrap();
    net.run(WINDOW);
    assert!(net.replies(1).iter().any(|(x, _)| *x == again));
}

#[test]
fn a_node_that_stops_refreshing_becomes_inactive_and_is_not_dialled() {
    let (mut net, _) = network(3, &[0, 1, 2, 3]);
    assert!(net.run_until(WINDOW, |n| (0..4).all(|node| knows_everyone(n, node))));
    net.crash(3);
    // A request made while d is down backs off; once d's record expires it fails at once
    // instead of retrying for its whole budget.
    let id = net.request_to(0, 3, b"anyone?").unwrap();
    let queued = net.request_to(0, 3, b"queued behind it").unwrap();
    assert!(net.run_until(TTL + WINDOW, |n| n.has_outcome(0, id)));
    // Both at once: the queued one never dials a peer known inactive.
    for x in [id, queued] {
        assert!(
            net.failures(0)
                .iter()
                .any(|(y, f, _)| *y == x && *f == Failure::Inactive),
            "{:?}",
            net.failures(0)
        );
    }
    for node in 0..3 {
        assert_eq!(
            net.nodes[node].endpoint.inactive_members(net.now),
            vec![net.id(3)]
        );
        assert!(
            record_events(&net, node)
                .iter()
                .any(|e| matches!(e, RecordEvent::Inactive { peer } if *peer == net.id(3)))
        );
        assert_eq!(
            net.request_to(node, 3, b"x"),
            Err(RequestError::Inactive(net.id(3)))
        );
    }
    // Nothing dials it any more, however long we wait (the others keep refreshing).
    let mark = net.trace.len();
    net.run_for(Duration::from_secs(600));
    let d_addr = net.nodes[3].addr.to_string();
    let dials: Vec<&String> = net.trace[mark..]
        .iter()
        .filter(|l| l.contains(" dial ") && l.contains(&d_addr))
        .collect();
    assert!(dials.is_empty(), "{dials:#?}");
    // It comes back: active again, reachable by id.
    net.restart(3);
    assert!(net.run_until(WINDOW, |n| {
        n.nodes[0].endpoint.inactive_members(n.now).is_empty()
    }));
    let back = net.request_to(0, 3, b"welcome back").unwrap();
    net.run(WINDOW);
    assert!(net.replies(0).iter().any(|(x, _)| *x == back));
}

#[test]
fn replayed_forged_and_malformed_records_change_nothing() {
    let (mut net, _) = network(4, &[0, 1, 2, 3]);
    assert!(net.run_until(WINDOW, |n| (0..4).all(|node| knows_everyone(n, node))));
    let old = sealed_of(&net, 0);
    // a moves (a new record, a higher sequence number).
    net.nodes[0].addr = SocketAddr::from(([10, 0, 1, 1], 7100));
    let now = net.now;
    let new_addr = net.nodes[0].addr;
    net.nodes[0]
        .endpoint
        .set_record_addresses(vec![new_addr], now)
        .unwrap();
    assert!(net.run_until(WINDOW, |n| (1..4).all(|node| {
        n.nodes[node]
            .endpoint
            .record_of(&n.id(0), n.now)
            .is_some_and(|r| r.addresses == vec![new_addr])
    })));
    // c replays a's old record to b (a rollback), and a forgery of it, on a connection an
    // exchange holds open.
    net.nodes[1].app = crate::harness::App::Manual;
    net.request(2, 1, b"hold");
    net.run(Duration::from_millis(100));
    let mut forged = old.to_vec();
    let at = forged.len() - 70;
    forged[at] ^= 1;
    assert!(net.inject(
        2,
        1,
        Message::Records {
            records: vec![old.clone(), Bytes::from(forged)],
        }
    ));
    net.run_for(Duration::from_secs(1));
    let b = refusals(&net, 1);
    assert!(
        b.iter()
            .any(|r| matches!(r, Refusal::Stale { peer, .. } if *peer == net.id(0))),
        "{b:?}"
    );
    assert!(
        b.iter()
            .any(|r| matches!(r, Refusal::BadSignature(p) if *p == net.id(0))),
        "{b:?}"
    );
    assert_eq!(
        net.nodes[1]
            .endpoint
            .record_of(&net.id(0), net.now)
            .map(|r| r.addresses.clone()),
        Some(vec![new_addr])
    );
    // The same replay again is not reported again (once per copy), though counted.
    let refused_before = net.nodes[1].endpoint.stats().records_refused;
    let reported = refusals(&net, 1).len();
    assert!(net.inject(2, 1, Message::Records { records: vec![old] }));
    net.run_for(Duration::from_secs(1));
    assert_eq!(refusals(&net, 1).len(), reported);
    assert_eq!(
        net.nodes[1].endpoint.stats().records_refused,
        refused_before + 1
    );
    // A malformed record is a violation: reported, and the connection closed.
    assert!(net.inject(
        2,
        1,
        Message::Records {
            records: vec![Bytes::from_static(b"P2PR garbage")],
        }
    ));
    net.run_for(Duration::from_secs(1));
    assert!(
        refusals(&net, 1)
            .iter()
            .any(|r| matches!(r, Refusal::Malformed(_)))
    );
    assert!(net.nodes[1].events.iter().any(|e| matches!(
        e,
        Event::PeerError(crate::endpoint::PeerError::Violation { remote, .. })
            if remote.peer == Some(net.id(2))
    )));
}

#[test]
fn a_directory_introduces_nodes_that_know_no_address() {
    // No static addresses at all: without the directory nobody can reach anybody.
    let (mut net, _) = network(5, &[]);
    net.run_for(Duration::from_secs(5));
    assert!(!knows_everyone(&net, 0));
    assert_eq!(
        net.request_to(0, 1, b"x"),
        Err(RequestError::NoAddress(net.id(1)))
    );
    // Every node wrote its record to the directory; each reads the folder.
    let folder: Vec<Bytes> = (0..4).map(|n| sealed_of(&net, n)).collect();
    for node in 0..4 {
        assert_eq!(net.offer_records(node, folder.clone()), 3);
        assert!(record_events(&net, node).iter().any(|e| matches!(
            e,
            RecordEvent::Accepted {
                source: Source::Directory,
                ..
            }
        )));
    }
    let id = net.request_to(0, 1, b"found you").unwrap();
    assert!(net.run_until(WINDOW, |n| n.replies(0).iter().any(|(x, _)| *x == id)));
    // Reading the same folder again takes nothing and reports nothing.
    let before = record_events(&net, 2).len();
    assert_eq!(net.offer_records(2, folder), 0);
    assert_eq!(record_events(&net, 2).len(), before);
}

#[test]
fn a_durable_node_remembers_records_and_refuses_an_old_one_after_a_restart() {
    let mut net = Net::new(6, &NAMES, Config::default());
    net.make_durable(1);
    let g = genesis((0..4).map(|n| member(&net, n, true)).collect());
    for node in 0..4 {
        let _ = net.install_membership(node, g.clone());
        net.install_records(node, TTL);
    }
    assert!(net.run_until(WINDOW, |n| knows_everyone(n, 1)));
    let old = sealed_of(&net, 0);
    let now = net.now;
    let moved = SocketAddr::from(([10, 0, 1, 1], 7100));
    net.nodes[0].addr = moved;
    net.nodes[0]
        .endpoint
        .set_record_addresses(vec![moved], now)
        .unwrap();
    assert!(net.run_until(WINDOW, |n| {
        n.nodes[1]
            .endpoint
            .record_of(&n.id(0), n.now)
            .is_some_and(|r| r.addresses == vec![moved])
    }));
    net.crash(1);
    net.restart(1);
    // It resumed a's newest record (no one had to send it again) ...
    assert_eq!(
        net.nodes[1]
            .endpoint
            .record_of(&net.id(0), net.now)
            .map(|r| r.addresses.clone()),
        Some(vec![moved])
    );
    // ... and the old one, replayed from the directory, is stale.
    assert_eq!(net.offer_records(1, vec![old]), 0);
    assert!(
        refusals(&net, 1)
            .iter()
            .any(|r| matches!(r, Refusal::Stale { .. }))
    );
}

#[test]
fn a_node_whose_record_key_is_not_listed_says_so_and_publishes_nothing() {
    let mut net = Net::new(7, &NAMES, Config::default());
    let mut members: Vec<Member> = (0..4).map(|n| member(&net, n, true)).collect();
    members[2].record_key = None;
    let g = genesis(members);
    let _ = net.install_membership(2, g);
    net.install_records(2, TTL);
    assert!(net.nodes[2].endpoint.own_record().is_none());
    let key = RecordSigner::new(&net.nodes[2].keypair).record_key();
    assert!(
        record_events(&net, 2)
            .iter()
            .any(|e| matches!(e, RecordEvent::Unlisted { epoch: 1, key: k } if *k == key))
    );
}

#[test]
fn a_peer_cannot_make_a_node_resend_its_book_or_take_unbounded_work() {
    let (mut net, _) = network(8, &[0, 1, 2, 3]);
    assert!(net.run_until(WINDOW, |n| (0..4).all(|node| knows_everyone(n, node))));
    // An exchange holds a connection from c to b open.
    net.nodes[1].app = crate::harness::App::Manual;
    net.request(2, 1, b"hold");
    net.run(Duration::from_millis(100));
    // c asks again and again for everything b holds, on that one connection.
    let mark = net.trace.len();
    for _ in 0..5 {
        assert!(net.inject(2, 1, Message::RecordSeqs { seqs: Vec::new() }));
    }
    net.run_for(Duration::from_millis(200));
    let answers = net.trace[mark..]
        .iter()
        .filter(|l| l.contains(" b ") && l.contains("-> Records("))
        .count();
    assert!(answers <= 1, "{:#?}", &net.trace[mark..]);
    // A flood of Records messages runs into c's request budget.
    let known = sealed_of(&net, 0);
    for _ in 0..100 {
        assert!(net.inject(
            2,
            1,
            Message::Records {
                records: vec![known.clone()],
            }
        ));
    }
    net.run_for(Duration::from_millis(200));
    assert!(net.nodes[1].events.iter().any(|e| matches!(
        e,
        Event::RateLimited { peer, .. } if *peer == net.id(2)
    )));
}

#[test]
fn a_node_publishing_an_address_the_membership_forbids_it_is_told_why() {
    let mut net = Net::new(9, &NAMES, Config::default());
    let mut members: Vec<Member> = (0..4).map(|n| member(&net, n, true)).collect();
    // b may only use 10.9.9.9; it listens on 10.0.0.2.
    members[1].allowed = vec![std::net::IpAddr::from([10, 9, 9, 9])];
    let g = genesis(members);
    let _ = net.install_membership(1, g);
    net.install_records(1, TTL);
    assert!(net.nodes[1].endpoint.own_record().is_none());
    assert!(record_events(&net, 1).iter().any(|e| matches!(
        e,
        RecordEvent::CannotPublish { why } if why.contains("does not allow")
    )));
}

#[test]
fn counters_and_getters_say_what_the_book_holds() {
    let mut net = Net::new(10, &NAMES, Config::default());
    assert!(!net.nodes[0].endpoint.records_installed());
    let g = genesis((0..4).map(|n| member(&net, n, true)).collect());
    for node in 0..4 {
        let _ = net.install_membership(node, g.clone());
        net.install_records(node, TTL);
    }
    assert!(net.nodes[0].endpoint.records_installed());
    assert!(net.run_until(WINDOW, |n| (0..4).all(|node| knows_everyone(n, node))));
    for node in 0..4 {
        let e = &net.nodes[node].endpoint;
        assert_eq!(e.records_held(), 4);
        assert_eq!(e.stats().records_published, 1);
        assert_eq!(e.stats().records_accepted, 3);
        assert_eq!(e.stats().records_refused, 0);
    }
}

#[test]
fn records_taken_from_a_directory_alone_expire_too() {
    // Only a runs records; the others' records come from the directory, never over the
    // network (the others keep none), so only the directory's offer can arm a's expiry.
    let mut net = Net::new(11, &NAMES, Config::default());
    let g = genesis((0..4).map(|n| member(&net, n, false)).collect());
    let _ = net.install_membership(0, g.clone());
    net.install_records(0, TTL);
    let document = g.document().clone();
    let issued = net.wall_ms() / 1000;
    let folder: Vec<Bytes> = (1..4)
        .map(|n| {
            let record = crate::records::Record {
                seq: 1,
                issued,
                expires: issued + 20,
                addresses: vec![net.nodes[n].addr],
            };
            let signer = RecordSigner::new(&net.nodes[n].keypair);
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(n as u64);
            crate::records::seal(&signer, &record, &document, &mut rng)
                .unwrap()
                .bytes()
                .clone()
        })
        .collect();
    assert_eq!(net.offer_records(0, folder), 3);
    net.run_for(Duration::from_secs(25));
    let inactive = record_events(&net, 0)
        .iter()
        .filter(|e| matches!(e, RecordEvent::Inactive { .. }))
        .count();
    assert_eq!(inactive, 3);
    assert_eq!(net.nodes[0].endpoint.inactive_members(net.now).len(), 3);
}

#[test]
fn a_record_is_passed_on_over_open_connections_to_a_member_its_owner_cannot_reach() {
    let (mut net, _) = network(12, &[0, 1, 2, 3]);
    assert!(net.run_until(WINDOW, |n| (0..4).all(|node| knows_everyone(n, node))));
    // b cannot reach c (nor c b); an exchange holds a connection from a to b open.
    net.partition(1, 2);
    net.nodes[1].app = crate::harness::App::Manual;
    net.request(0, 1, b"hold");
    net.run(Duration::from_millis(100));
    // c moves: its record reaches a (c dials it), and a passes it on to b at once.
    let moved = SocketAddr::from(([10, 0, 1, 3], 7100));
    net.nodes[2].addr = moved;
    let now = net.now;
    net.nodes[2]
        .endpoint
        .set_record_addresses(vec![moved], now)
        .unwrap();
    assert!(net.run_until(Duration::from_secs(3), |n| {
        n.nodes[1]
            .endpoint
            .record_of(&n.id(2), n.now)
            .is_some_and(|r| r.addresses == vec![moved])
    }));
    // Passed on by a: never back to c, the owner.
    assert!(record_events(&net, 1).iter().any(|e| matches!(
        e,
        RecordEvent::Accepted { source: Source::Peer(p), moved: true, .. } if *p == net.id(0)
    )));
}

#[test]
fn an_exchange_in_contact_when_its_peer_goes_inactive_is_not_redialed_after() {
    // a's request reaches d, whose Ack is lost and whose application sits on it; d stops
    // publishing records. When d's record expires the exchange is still waiting for that
    // Ack (in contact: not failed then); when the Ack timeout sends it to retry, d is
    // inactive: it fails instead of redialing.
    let config = Config {
        ack_timeout: Duration::from_secs(40),
        response_timeout: Duration::from_secs(150),
        reply_timeout: Duration::from_secs(200),
        ..Config::default()
    };
    let mut net = Net::new(13, &NAMES, config);
    let g = genesis((0..4).map(|n| member(&net, n, true)).collect());
    let ttl = crate::endpoint::MIN_RECORD_TTL * 2;
    for node in 0..4 {
        let _ = net.install_membership(node, g.clone());
        net.install_records(node, ttl);
    }
    assert!(net.run_until(WINDOW, |n| (0..4).all(|node| knows_everyone(n, node))));
    net.nodes[3].app = crate::harness::App::Manual;
    net.rules.push(
        crate::harness::Rule::new(3, 0, crate::wire::Kind::Ack, crate::harness::Action::Drop)
            .ack_of(crate::wire::AckOf::Request),
    );
    let now = net.now;
    net.nodes[3]
        .endpoint
        .set_record_addresses(Vec::new(), now)
        .unwrap();
    let mark = net.trace.len();
    let id = net.request_to(0, 3, b"lost ack").unwrap();
    assert!(net.run_until(ttl + WINDOW, |n| {
        n.nodes[0]
            .endpoint
            .inactive_members(n.now)
            .contains(&n.id(3))
    }));
    assert!(!net.has_outcome(0, id), "in contact: not failed at expiry");
    let d_addr = net.nodes[3].addr.to_string();
    assert!(net.run_until(Duration::from_secs(120), |n| n.has_outcome(0, id)));
    assert!(
        net.failures(0)
            .iter()
            .any(|(x, f, _)| *x == id && *f == Failure::Inactive),
        "{:?}",
        net.failures(0)
    );
    let dials = net.trace[mark..]
        .iter()
        .filter(|l| l.contains("a dial") && l.contains(&d_addr))
        .count();
    assert_eq!(dials, 1, "only the request's first dial");
}

#[test]
fn a_new_epoch_drops_a_removed_members_record_and_every_member_seals_anew() {
    let (mut net, g) = network(14, &[0, 1, 2, 3]);
    assert!(net.run_until(WINDOW, |n| (0..4).all(|node| knows_everyone(n, node))));
    let keys: Vec<GovernanceKey> = (0..3).map(gov).collect();
    let mut doc = g.document().successor_template();
    doc.members = (0..3).map(|n| member(&net, n, true)).collect();
    let e2 = sign_with(Signed::new(doc).unwrap(), &keys, &[0, 1]);
    assert!(net.offer_membership(0, e2).is_ok());
    assert!(net.run_until(WINDOW, |n| (0..3).all(|node| n.epoch(node) == 2)));
    assert!(net.run_until(WINDOW, |n| (0..3).all(|node| {
        let e = &n.nodes[node].endpoint;
        e.records_held() == 3 && e.stats().records_published == 2
    })));
    for node in 0..3 {
        assert!(
            net.nodes[node]
                .endpoint
                .record_of(&net.id(3), net.now)
                .is_none()
        );
        // Each holds the others' records sealed for epoch 2.
        for other in (0..3).filter(|&o| o != node) {
            assert!(
                net.nodes[node]
                    .endpoint
                    .record_of(&net.id(other), net.now)
                    .is_some()
            );
        }
    }
}
