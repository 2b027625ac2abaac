//! Signed membership across a network of endpoints (the deterministic harness): documents
//! travel between the nodes themselves, every node checks each one, nothing refused
//! touches an allow list, and nothing goes backwards.

use std::time::Duration;

use bytes::Bytes;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::config::Config;
use crate::endpoint::{Event, Failure, MembershipEvent, Source};
use crate::harness::Net;
use crate::membership::tests::{gov, sign_with};
use crate::membership::{Document, GovernanceKey, Member, Refusal, Signed};
use crate::wire::Message;

const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

fn committee() -> Vec<GovernanceKey> {
    (0..3).map(gov).collect()
}

pub(crate) fn member_of(net: &Net, node: usize) -> Member {
    Member {
        key: *net.nodes[node].keypair.public_bytes(),
        name: Some(net.nodes[node].name.to_owned()),
        address: Some(net.nodes[node].addr),
        allowed: Vec::new(),
        expires: None,
        record_key: None,
    }
}

/// A genesis whose members are `nodes`, 2-of-3, signed by keys 0 and 1.
fn genesis(net: &Net, keys: &[GovernanceKey], nodes: &[usize]) -> Signed {
    let doc = Document {
        network: "test".into(),
        epoch: 1,
        previous: crate::membership::Digest::NONE,
        expires: None,
        threshold: 2,
        committee: keys.iter().map(GovernanceKey::id).collect(),
        members: nodes.iter().map(|&n| member_of(net, n)).collect(),
    };
    sign_with(Signed::new(doc).unwrap(), keys, &[0, 1])
}

fn successor(net: &Net, current: &Signed, nodes: &[usize], signers: &[usize]) -> Signed {
    let keys = committee();
    let mut doc = current.document().successor_template();
    doc.members = nodes.iter().map(|&n| member_of(net, n)).collect();
    sign_with(Signed::new(doc).unwrap(), &keys, signers)
}

/// Five nodes; the first four are members of the genesis, installed on each of them.
fn network(seed: u64) -> (Net, Signed) {
    let mut net = Net::new(seed, &NAMES, Config::default());
    let g = genesis(&net, &committee(), &[0, 1, 2, 3]);
    for node in 0..4 {
        let _ = net.install_membership(node, g.clone());
    }
    (net, g)
}

fn epochs(net: &Net, nodes: &[usize]) -> Vec<u64> {
    nodes.iter().map(|&n| net.epoch(n)).collect()
}

fn membership_events(net: &Net, node: usize) -> Vec<&MembershipEvent> {
    net.nodes[node]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Membership(m) => Some(m),
            _ => None,
        })
        .collect()
}

fn refusal_codes(net: &Net, node: usize) -> Vec<&'static str> {
    membership_events(net, node)
        .into_iter()
        .filter_map(|e| match e {
            MembershipEvent::Refused { refused, .. } => refused.reason().map(Refusal::code),
            _ => None,
        })
        .collect()
}

const WINDOW: Duration = Duration::from_secs(60);

#[test]
fn a_document_handed_to_one_node_reaches_every_member_and_the_added_peer_talks() {
    let (mut net, g) = network(1);
    net.run(Duration::from_secs(5));
    // Epoch 2 adds node e; it is handed to a alone.
    let e2 = successor(&net, &g, &[0, 1, 2, 3, 4], &[1, 2]);
    let _ = net.install_membership(4, g.clone());
    assert_eq!(net.offer_membership(0, e2.clone()).map(|v| v.len()), Ok(1));
    assert!(net.run_until(WINDOW, |n| epochs(n, &[0, 1, 2, 3, 4]) == vec![2; 5]));
    for node in 0..5 {
        assert_eq!(
            net.nodes[node].endpoint.membership().unwrap().digest(),
            e2.digest()
        );
        assert!(net.nodes[node].endpoint.allow_list().contains(&net.id(4)) || node == 4);
    }
    // The applied event names where each node had it from.
    assert!(membership_events(&net, 0).iter().any(|e| matches!(
        e,
        MembershipEvent::Applied { epoch: 2, source: Source::Local, added, .. } if added == &vec![net.id(4)]
    )));
    assert!(membership_events(&net, 2).iter().any(|e| matches!(
        e,
        MembershipEvent::Applied {
            epoch: 2,
            source: Source::Peer(_),
            ..
        }
    )));
    // The added node exchanges with every other.
    let ids: Vec<_> = (0..4).map(|to| net.request(4, to, b"hi")).collect();
    net.run(WINDOW);
    for id in ids {
        assert!(net.replies(4).iter().any(|(x, _)| *x == id), "{id}");
    }
    // Sync connections close once both ends agree: the network goes quiet.
    let quiet = net.run(Duration::from_secs(120));
    assert!(
        quiet,
        "{}",
        net.trace[net.trace.len().saturating_sub(40)..].join("\n")
    );
}

#[test]
fn an_under_signed_document_is_refused_everywhere_and_changes_nothing() {
    let (mut net, g) = network(2);
    net.run(Duration::from_secs(5));
    let weak = successor(&net, &g, &[0, 1], &[2]);
    let refused = net.offer_membership(0, weak).unwrap_err();
    assert_eq!(refused.reason().map(Refusal::code), Some("under_threshold"));
    net.run(WINDOW);
    assert_eq!(epochs(&net, &[0, 1, 2, 3]), vec![1; 4]);
    // Nothing removed: node 2 still talks to node 0.
    let id = net.request(2, 0, b"still here");
    net.run(WINDOW);
    assert!(net.replies(2).iter().any(|(x, _)| *x == id));
    assert_eq!(refusal_codes(&net, 0), vec!["under_threshold"]);
}

#[test]
fn a_rollback_and_a_replay_are_refused() {
    let (mut net, g) = network(3);
    let e2 = successor(&net, &g, &[0, 1, 2], &[0, 2]);
    net.offer_membership(0, e2.clone()).unwrap();
    net.run_until(WINDOW, |n| epochs(n, &[0, 1, 2]) == vec![2; 3]);
    let old = net.offer_membership(0, g).unwrap_err();
    assert_eq!(old.reason().map(Refusal::code), Some("stale"));
    // The same document again is no news.
    assert_eq!(net.offer_membership(0, e2), Ok(Vec::new()));
    assert_eq!(net.epoch(0), 2);
}

#[test]
fn members_offline_catch_up_across_several_epochs_when_they_return() {
    let (mut net, g) = network(4);
    for node in [0, 1, 2, 3] {
        net.make_durable(node);
    }
    net.run(Duration::from_secs(2));
    net.crash(3);
    let mut current = g;
    for signers in [[0, 1], [1, 2], [0, 2]] {
        current = successor(&net, &current, &[0, 1, 2, 3], &signers);
        net.offer_membership(0, current.clone()).unwrap();
        net.run(Duration::from_secs(5));
    }
    assert_eq!(epochs(&net, &[0, 1, 2]), vec![4; 3]);
    // Node 3 comes back (its operator's file still says epoch 1): it asks and catches up.
    net.run(Duration::from_secs(60));
    net.restart(3);
    assert!(net.run_until(WINDOW, |n| n.epoch(3) == 4));
    // And a restart of a durable node keeps the epoch, whatever its file says.
    net.crash(1);
    net.restart(1);
    assert_eq!(net.epoch(1), 4);
}

#[test]
fn a_fork_raises_an_alarm_and_each_node_keeps_its_own() {
    let (mut net, g) = network(5);
    net.partition(0, 1);
    for other in [2, 3] {
        net.partition(0, other);
        net.partition(1, other);
    }
    let left = successor(&net, &g, &[0, 1, 2, 3], &[0, 1]);
    let right = successor(&net, &g, &[0, 1, 2], &[1, 2]);
    assert_ne!(left.digest(), right.digest());
    net.offer_membership(0, left.clone()).unwrap();
    net.offer_membership(1, right.clone()).unwrap();
    net.run(Duration::from_secs(5));
    net.repair(0, 1);
    // They meet through an exchange.
    net.request(0, 1, b"hello");
    net.run(WINDOW);
    for (node, held) in [(0, &left), (1, &right)] {
        assert_eq!(
            net.nodes[node].endpoint.membership().unwrap().digest(),
            held.digest()
        );
        assert!(
            membership_events(&net, node)
                .iter()
                .any(|e| matches!(e, MembershipEvent::Fork { fork, .. } if fork.epoch == 2)),
            "node {node} raised no alarm: {}",
            net.trace
                .iter()
                .filter(|l| l.contains("Epoch")
                    || l.contains("Fetch")
                    || l.contains("Documents")
                    || l.contains("embership"))
                .take(60)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn a_member_removed_mid_exchange_gets_its_exchanges_failed_with_the_payload_back() {
    let (mut net, g) = network(6);
    net.nodes[1].app = crate::harness::App::Manual;
    let id = net.request(0, 1, b"never answered");
    net.run(Duration::from_secs(1));
    let e2 = successor(&net, &g, &[0, 2, 3], &[0, 1]);
    net.offer_membership(0, e2).unwrap();
    net.run(Duration::from_secs(5));
    let failures = net.failures(0);
    assert!(
        failures.iter().any(|(x, f, payload)| *x == id
            && *f == Failure::Revoked
            && payload.as_ref() == b"never answered"),
        "{failures:?}"
    );
    // Node 1 is out of everyone's list; node 1 itself learns nothing from the others.
    net.run(WINDOW);
    for node in [0, 2, 3] {
        assert!(!net.nodes[node].endpoint.allow_list().contains(&net.id(1)));
    }
}

#[test]
fn a_committee_change_needs_both_thresholds_and_then_the_new_committee_signs() {
    let (mut net, g) = network(7);
    let keys: Vec<GovernanceKey> = (0..5).map(gov).collect();
    // Committee {2, 3, 4}, threshold 2: signed by the old threshold (0, 1) and the new (3, 4).
    let mut doc = g.document().successor_template();
    doc.members = g.document().members.clone();
    doc.committee = keys[2..].iter().map(GovernanceKey::id).collect();
    let only_old = sign_with(Signed::new(doc.clone()).unwrap(), &keys, &[0, 1]);
    let refused = net.offer_membership(0, only_old).unwrap_err();
    assert_eq!(
        refused.reason().map(Refusal::code),
        Some("new_committee_under_threshold")
    );
    let both = sign_with(Signed::new(doc).unwrap(), &keys, &[0, 1, 3, 4]);
    net.offer_membership(0, both.clone()).unwrap();
    assert!(net.run_until(WINDOW, |n| epochs(n, &[0, 1, 2, 3]) == vec![2; 4]));
    // The old committee alone can no longer move it.
    let mut next = both.document().successor_template();
    next.members = both.document().members.clone();
    let by_old = sign_with(Signed::new(next.clone()).unwrap(), &keys, &[0, 1]);
    assert_eq!(
        net.offer_membership(2, by_old)
            .unwrap_err()
            .reason()
            .map(Refusal::code),
        Some("unknown_signer")
    );
    let by_new = sign_with(Signed::new(next).unwrap(), &keys, &[2, 4]);
    net.offer_membership(2, by_new).unwrap();
    assert!(net.run_until(WINDOW, |n| epochs(n, &[0, 1, 2, 3]) == vec![3; 4]));
}

#[test]
fn a_peer_sending_garbage_documents_is_refused_named_and_disconnected() {
    let (mut net, _) = network(8);
    net.run(Duration::from_secs(5));
    // An exchange holds a connection open between them.
    net.nodes[0].app = crate::harness::App::Manual;
    net.request(1, 0, b"hold");
    net.run(Duration::from_millis(100));
    let garbage = Message::Documents {
        docs: vec![Bytes::from_static(b"P2PS not a document")],
    };
    assert!(net.inject(1, 0, garbage));
    net.run(Duration::from_secs(5));
    assert_eq!(refusal_codes(&net, 0), vec!["malformed"]);
    assert!(net.nodes[0].events.iter().any(|e| matches!(
        e,
        Event::PeerError(crate::endpoint::PeerError::Violation { detail, remote })
            if detail.contains("membership") && remote.peer == Some(net.id(1))
    )));
    assert_eq!(net.epoch(0), 1);
}

#[test]
fn a_forged_document_signed_by_strangers_is_refused() {
    let (mut net, g) = network(9);
    let strangers: Vec<GovernanceKey> = (10..13).map(gov).collect();
    let mut doc = g.document().successor_template();
    doc.members = vec![member_of(&net, 4)];
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let mut forged = Signed::new(doc).unwrap();
    for key in &strangers {
        forged.sign(key, &mut rng);
    }
    let refused = net.offer_membership(0, forged).unwrap_err();
    assert!(refused.reasons.iter().any(|r| r.code() == "unknown_signer"));
    assert!(
        refused
            .reasons
            .iter()
            .any(|r| r.code() == "under_threshold")
    );
    assert_eq!(net.epoch(0), 1);
}

/// Unix seconds at the harness's start (its virtual wall clock).
fn start_secs(net: &Net) -> u64 {
    net.wall_ms() / 1000
}

#[test]
fn a_member_leaves_the_allow_list_when_it_expires_and_an_expired_document_raises_an_alarm() {
    let mut net = Net::new(10, &NAMES, Config::default());
    let at = start_secs(&net);
    let mut doc = Document {
        network: "test".into(),
        epoch: 1,
        previous: crate::membership::Digest::NONE,
        expires: Some(at + 100),
        threshold: 2,
        committee: committee().iter().map(GovernanceKey::id).collect(),
        members: (0..3).map(|n| member_of(&net, n)).collect(),
    };
    doc.members[2].expires = Some(at + 30);
    let g = sign_with(Signed::new(doc).unwrap(), &committee(), &[0, 1]);
    for node in 0..3 {
        let _ = net.install_membership(node, g.clone());
    }
    let c = net.id(2);
    assert!(net.nodes[0].endpoint.allow_list().contains(&c));
    net.run_for(Duration::from_secs(29));
    assert!(
        net.nodes[0].endpoint.allow_list().contains(&c),
        "expired early"
    );
    net.run_for(Duration::from_secs(2));
    assert!(
        !net.nodes[0].endpoint.allow_list().contains(&c),
        "not expired at its time"
    );
    // c cannot reach a any more.
    let id = net.request(2, 0, b"late");
    net.run(WINDOW);
    assert!(net.failures(2).iter().any(|(x, _, _)| *x == id));
    // The document itself expires at +100 s: an alarm, once, and it stays in force.
    net.run_for(Duration::from_secs(100));
    let alarms = membership_events(&net, 0)
        .iter()
        .filter(|e| matches!(e, MembershipEvent::Expired { epoch: 1, .. }))
        .count();
    assert_eq!(alarms, 1);
    assert!(net.nodes[0].endpoint.allow_list().contains(&net.id(1)));
}

#[test]
fn a_restart_with_an_older_or_a_forked_file_keeps_the_stored_epoch_and_says_why() {
    let mut net = Net::new(11, &NAMES, Config::default());
    // Durable from the start, as a driver restores before it installs.
    net.make_durable(0);
    let g = genesis(&net, &committee(), &[0, 1, 2, 3]);
    for node in 0..4 {
        let _ = net.install_membership(node, g.clone());
    }
    let e2 = successor(&net, &g, &[0, 1, 2, 3], &[0, 1]);
    net.offer_membership(0, e2.clone()).unwrap();
    net.run(Duration::from_secs(5));
    let restart = |net: &mut Net, file: Signed| {
        net.crash(0);
        net.nodes[0].membership = None;
        net.restart(0);
        net.install_membership(0, file)
    };
    // The older file: kept the stored epoch, and says so.
    let installed = restart(&mut net, g.clone());
    assert_eq!((installed.epoch, installed.resumed), (2, true));
    assert!(
        installed
            .note
            .as_deref()
            .is_some_and(|n| n.contains("older")),
        "{installed:?}"
    );
    // The same document: nothing to say.
    let installed = restart(&mut net, e2.clone());
    assert_eq!((installed.epoch, installed.note), (2, None));
    // Another epoch 2, validly signed: a fork; the stored one stays.
    let other = successor(&net, &g, &[0, 1], &[1, 2]);
    let installed = restart(&mut net, other);
    assert_eq!(installed.digest, e2.digest());
    assert!(
        installed
            .note
            .as_deref()
            .is_some_and(|n| n.contains("fork")),
        "{installed:?}"
    );
    // Epoch 4 while the store holds 2: kept, asked for, applied once 3 arrives.
    let e3 = successor(&net, &e2, &[0, 1, 2, 3], &[0, 2]);
    let e4 = successor(&net, &e3, &[0, 1, 2, 3], &[1, 2]);
    let installed = restart(&mut net, e4.clone());
    assert_eq!(installed.epoch, 2);
    assert!(
        installed
            .note
            .as_deref()
            .is_some_and(|n| n.contains("asking peers")),
        "{installed:?}"
    );
    net.offer_membership(0, e3).unwrap();
    assert_eq!(net.epoch(0), 4, "the kept epoch 4 follows epoch 3 at once");
}

#[test]
fn nodes_at_the_same_epoch_say_it_once_not_on_every_connection() {
    let (mut net, _) = network(12);
    net.run(WINDOW);
    let epochs_before = net.trace.iter().filter(|l| l.contains("Epoch(")).count();
    for _ in 0..5 {
        net.request(0, 1, b"again");
        net.run(WINDOW);
    }
    let epochs_after = net.trace.iter().filter(|l| l.contains("Epoch(")).count();
    assert_eq!(
        epochs_after, epochs_before,
        "five more exchanges, no more Epoch"
    );
    assert!(net.nodes[0].endpoint.membership_managed());
    assert_eq!(net.nodes[0].endpoint.membership_heard(&net.id(1)), Some(1));
    assert!(
        !Net::new(13, &NAMES[..2], Config::default()).nodes[0]
            .endpoint
            .membership_managed()
    );
}

#[test]
fn epochs_go_only_to_peers_that_understand_them_and_once_per_connection() {
    use crate::connection::ConnEvent;
    use crate::endpoint::{ConnId, Endpoint, Output};
    let net = Net::new(14, &NAMES[..2], Config::default());
    let g = genesis(&net, &committee(), &[0, 1]);
    let now = std::time::Instant::now();
    let mut ep = Endpoint::new(
        Config::default(),
        net.id(0),
        crate::allow_list::AllowList::new(),
        [1; 32],
    )
    .unwrap();
    ep.set_wall_clock(now, net.wall_ms());
    ep.install_membership(Some(g.clone()), now).unwrap();
    let epochs = |ep: &mut Endpoint| {
        std::iter::from_fn(|| ep.poll_output())
            .filter(|o| {
                matches!(
                    o,
                    Output::Send {
                        message: Message::Epoch { .. } | Message::Fetch { .. },
                        ..
                    }
                )
            })
            .collect::<Vec<_>>()
    };
    let _ = epochs(&mut ep);
    let addr = "10.0.0.2:7000".parse().unwrap();
    // A peer that predates membership (features 0) is told nothing.
    ep.handle_accepted(ConnId::inbound(1), net.id(1), addr, 1 << 20, 0, now);
    assert!(epochs(&mut ep).is_empty());
    ep.handle_conn_event(
        ConnId::inbound(1),
        ConnEvent::Message(Message::Epoch {
            epoch: 1,
            digest: g.digest().0,
        }),
        now,
    );
    assert!(
        epochs(&mut ep).is_empty(),
        "answered a peer without the feature"
    );
    // One that has it: told once on connecting, not again when it answers.
    let c2 = ConnId::inbound(2);
    ep.handle_accepted(c2, net.id(1), addr, 1 << 20, 1, now);
    assert_eq!(epochs(&mut ep).len(), 1);
    let epoch = |n: u64| {
        ConnEvent::Message(Message::Epoch {
            epoch: n,
            digest: if n == 1 { g.digest().0 } else { [7; 32] },
        })
    };
    ep.handle_conn_event(c2, epoch(1), now);
    assert!(
        epochs(&mut ep).is_empty(),
        "said its epoch twice on one connection"
    );
    assert_eq!(ep.membership_heard(&net.id(1)), Some(1));
    // It claims epoch 2: heard, and asked for what we lack, once.
    ep.handle_conn_event(c2, epoch(2), now);
    assert_eq!(ep.membership_heard(&net.id(1)), Some(2));
    assert!(matches!(
        epochs(&mut ep).as_slice(),
        [Output::Send {
            message: Message::Fetch { after: 1 },
            ..
        }]
    ));
    ep.handle_conn_event(c2, epoch(2), now);
    assert!(epochs(&mut ep).is_empty(), "asked twice");
}
