//! Address records in one endpoint, driven by hand: to whom records and summaries go, and
//! when (the network tests check outcomes; these check the choices behind them).

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use rand_core::SeedableRng as _;

use crate::allow_list::AllowList;
use crate::config::Config;
use crate::connection::{Closed, ConnEvent};
use crate::endpoint::{ConnId, Endpoint, Output, RecordSettings};
use crate::harness::Net;
use crate::membership::tests::{gov, sign_with};
use crate::membership::{Document, GovernanceKey, Signed};
use crate::records::{Record, RecordSigner, seal};
use crate::records_net_tests::{genesis, member};
use crate::wire::{FEATURE_IK, FEATURE_MEMBERSHIP, FEATURES, Message};

const NAMES: [&str; 4] = ["us", "b", "c", "d"];
/// What a peer that predates records announces.
const NO_RECORDS: u32 = FEATURE_MEMBERSHIP | FEATURE_IK;

struct Fx {
    keys: Net,
    ep: Endpoint,
    now: Instant,
    document: Document,
    next_inbound: u64,
}

impl Fx {
    fn new() -> Self {
        let keys = Net::new(51, &NAMES, Config::default());
        let now = keys.now;
        let genesis = genesis((0..4).map(|n| member(&keys, n, true)).collect());
        let mut ep =
            Endpoint::new(Config::default(), keys.id(0), AllowList::new(), [9; 32]).unwrap();
        ep.set_wall_clock(now, keys.wall_ms());
        ep.install_membership(Some(genesis.clone()), now).unwrap();
        let settings = RecordSettings {
            addresses: vec![keys.nodes[0].addr],
            ..RecordSettings::default()
        };
        ep.install_records(RecordSigner::new(&keys.nodes[0].keypair), settings, now)
            .unwrap();
        let mut fx = Self {
            keys,
            ep,
            now,
            document: genesis.document().clone(),
            next_inbound: 1,
        };
        fx.sent();
        fx
    }

    /// Record messages sent since the last call, with their connections.
    fn sent(&mut self) -> Vec<(ConnId, Message)> {
        std::iter::from_fn(|| self.ep.poll_output())
            .filter_map(|o| match o {
                Output::Send { conn, message, .. }
                    if matches!(
                        message,
                        Message::Records { .. } | Message::RecordSeqs { .. }
                    ) =>
                {
                    Some((conn, message))
                }
                _ => None,
            })
            .collect()
    }

    fn accept(&mut self, node: usize, features: u32) -> ConnId {
        let conn = ConnId::inbound(self.next_inbound);
        self.next_inbound += 1;
        let (peer, addr) = (self.keys.id(node), self.keys.nodes[node].addr);
        self.ep
            .handle_accepted(conn, peer, addr, 1 << 20, features, self.now);
        conn
    }

    fn deliver(&mut self, conn: ConnId, message: Message) {
        self.ep
            .handle_conn_event(conn, ConnEvent::Message(message), self.now);
    }

    fn close(&mut self, conn: ConnId) {
        let closed = ConnEvent::Closed(Closed::Io("reset".into()));
        self.ep.handle_conn_event(conn, closed, self.now);
    }

    /// `node`'s record number `seq`, naming port `port`.
    fn record_of(&self, node: usize, seq: u64, port: u16) -> Bytes {
        let issued = self.keys.wall_ms() / 1000;
        let record = Record {
            seq,
            issued,
            expires: issued + 3600,
            addresses: vec![SocketAddr::new(self.keys.nodes[node].addr.ip(), port)],
        };
        let signer = RecordSigner::new(&self.keys.nodes[node].keypair);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seq);
        seal(&signer, &record, &self.document, &mut rng)
            .unwrap()
            .bytes()
            .clone()
    }
}

fn records_on(sent: &[(ConnId, Message)], conn: ConnId) -> usize {
    sent.iter()
        .filter(|(c, m)| *c == conn && matches!(m, Message::Records { .. }))
        .count()
}

fn seqs_on(sent: &[(ConnId, Message)], conn: ConnId) -> usize {
    sent.iter()
        .filter(|(c, m)| *c == conn && matches!(m, Message::RecordSeqs { .. }))
        .count()
}

#[test]
fn records_go_only_to_peers_that_announced_the_feature() {
    let mut fx = Fx::new();
    let old = fx.accept(1, NO_RECORDS);
    let new = fx.accept(2, FEATURES);
    let sent = fx.sent();
    assert_eq!((seqs_on(&sent, old), seqs_on(&sent, new)), (0, 1));
    // A record of d arrives from c: passed on to nobody (b cannot take it, c sent it).
    let record = fx.record_of(3, 5, 7000);
    fx.deliver(
        new,
        Message::Records {
            records: vec![record],
        },
    );
    let sent = fx.sent();
    assert_eq!(records_on(&sent, old), 0);
    assert_eq!(records_on(&sent, new), 0);
    // Even when b asks (it should not), it gets nothing.
    fx.deliver(old, Message::RecordSeqs { seqs: Vec::new() });
    assert!(fx.sent().is_empty());
}

#[test]
fn a_record_is_passed_on_to_members_that_lack_it_never_to_its_source_or_owner() {
    let mut fx = Fx::new();
    let from_b = fx.accept(1, FEATURES);
    let from_c = fx.accept(2, FEATURES);
    let from_d = fx.accept(3, FEATURES);
    // A second connection from b: b still gets each record once.
    let from_b_again = fx.accept(1, FEATURES);
    fx.sent();
    // c says it holds d's record 5 already; b says nothing of d.
    let d = *fx.keys.id(3).as_bytes();
    fx.deliver(from_c, Message::RecordSeqs { seqs: vec![(d, 5)] });
    fx.deliver(from_b, Message::RecordSeqs { seqs: Vec::new() });
    fx.sent();
    // d's record 5 arrives from d itself: b gets it, c holds it, d is its owner.
    let record = fx.record_of(3, 5, 7000);
    fx.deliver(
        from_d,
        Message::Records {
            records: vec![record],
        },
    );
    let sent = fx.sent();
    assert_eq!(
        (
            records_on(&sent, from_b) + records_on(&sent, from_b_again),
            records_on(&sent, from_c),
            records_on(&sent, from_d)
        ),
        (1, 0, 0),
        "{sent:?}"
    );
    // Record 6 of d, from b: c gets it now (it holds only 5), b sent it, d owns it.
    let newer = fx.record_of(3, 6, 7100);
    fx.deliver(
        from_b,
        Message::Records {
            records: vec![newer],
        },
    );
    let sent = fx.sent();
    assert_eq!(
        (
            records_on(&sent, from_b),
            records_on(&sent, from_c),
            records_on(&sent, from_d)
        ),
        (0, 1, 0),
        "{sent:?}"
    );
    assert_eq!(records_on(&sent, from_b_again), 0);
}

#[test]
fn a_summary_goes_to_a_peer_once_per_change_of_the_book() {
    let mut fx = Fx::new();
    let first = fx.accept(1, FEATURES);
    let sent = fx.sent();
    assert_eq!(seqs_on(&sent, first), 1);
    fx.close(first);
    // A second connection from b: nothing changed since b was told.
    let second = fx.accept(1, FEATURES);
    assert_eq!(seqs_on(&fx.sent(), second), 0);
    fx.close(second);
    // A record of c is taken (from the directory): b is told again on its next connection.
    let record = fx.record_of(2, 5, 7000);
    assert_eq!(fx.ep.offer_records(vec![record], fx.now), 1);
    fx.sent();
    let third = fx.accept(1, FEATURES);
    assert_eq!(seqs_on(&fx.sent(), third), 1);
    // The record of c is sent to b when b's summary lacks it, once.
    fx.deliver(third, Message::RecordSeqs { seqs: Vec::new() });
    let sent = fx.sent();
    assert_eq!(records_on(&sent, third), 1);
    assert_eq!(fx.ep.stats().records_published, 1);
    fx.close(third);
    // We publish anew (we moved): b is told on its next connection.
    let moved = SocketAddr::new(fx.keys.nodes[0].addr.ip(), 7100);
    fx.ep.set_record_addresses(vec![moved], fx.now).unwrap();
    fx.sent();
    let fourth = fx.accept(1, FEATURES);
    assert_eq!(seqs_on(&fx.sent(), fourth), 1);
    assert_eq!(fx.ep.stats().records_published, 2);
}

#[test]
fn settings_outside_the_protocols_bounds_are_refused_naming_the_setting() {
    let keys = Net::new(52, &NAMES, Config::default());
    let fx = Fx::new();
    let signer = RecordSigner::new(&keys.nodes[0].keypair);
    let addr = keys.nodes[0].addr;
    let install = |addresses: Vec<SocketAddr>, ttl: std::time::Duration| {
        let mut ep =
            Endpoint::new(Config::default(), keys.id(0), AllowList::new(), [9; 32]).unwrap();
        ep.set_wall_clock(fx.now, keys.wall_ms());
        let committee: Vec<GovernanceKey> = (0..3).map(gov).collect();
        let genesis = sign_with(
            Signed::new(fx.document.clone()).unwrap(),
            &committee,
            &[0, 1],
        );
        ep.install_membership(Some(genesis), fx.now).unwrap();
        ep.install_records(signer.clone(), RecordSettings { addresses, ttl }, fx.now)
    };
    let day = std::time::Duration::from_secs(24 * 3600);
    let min = crate::endpoint::MIN_RECORD_TTL;
    assert!(install(vec![addr], min).is_ok());
    assert!(install(vec![addr], 7 * day).is_ok());
    assert!(install(vec![addr; 8], min).is_ok());
    assert!(install(Vec::new(), min).is_ok());
    let refused = |r: Result<(), crate::endpoint::RecordsError>, what: &str| match r {
        Err(crate::endpoint::RecordsError::Settings(why)) => assert!(why.contains(what), "{why}"),
        other => panic!("{other:?}"),
    };
    refused(
        install(vec![addr], min - std::time::Duration::from_secs(1)),
        "record_ttl",
    );
    refused(
        install(vec![addr], 7 * day + std::time::Duration::from_secs(1)),
        "record_ttl",
    );
    refused(install(vec![addr; 9], min), "at most 8");
    refused(
        install(vec![SocketAddr::from(([0, 0, 0, 0], 7000))], min),
        "cannot be published",
    );
    refused(
        install(vec![SocketAddr::new(addr.ip(), 0)], min),
        "cannot be published",
    );
}

#[test]
fn our_own_record_echoed_back_is_neither_taken_nor_refused() {
    let mut fx = Fx::new();
    let from_b = fx.accept(1, FEATURES);
    fx.sent();
    // Our record before the newest: offered to our book it would be refused as stale.
    let ours = fx.ep.own_record().unwrap().bytes().clone();
    let moved = SocketAddr::new(fx.keys.nodes[0].addr.ip(), 7100);
    fx.ep.set_record_addresses(vec![moved], fx.now).unwrap();
    fx.sent();
    while fx.ep.poll_event().is_some() {}
    fx.deliver(
        from_b,
        Message::Records {
            records: vec![ours],
        },
    );
    let events: Vec<_> = std::iter::from_fn(|| fx.ep.poll_event()).collect();
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(fx.ep.stats().records_refused, 0);
}

#[test]
fn a_summary_is_answered_with_what_fits_the_peer_our_own_first_never_its_own() {
    let mut fx = Fx::new();
    // Records of b, c and d in our book.
    let records: Vec<Bytes> = (1..4).map(|n| fx.record_of(n, 5, 7000)).collect();
    let len = records[0].len();
    assert_eq!(fx.ep.offer_records(records, fx.now), 3);
    fx.sent();
    // b holds nothing: it gets c's, d's and ours, not its own.
    let from_b = fx.accept(1, FEATURES);
    fx.sent();
    fx.deliver(from_b, Message::RecordSeqs { seqs: Vec::new() });
    let sent = fx.sent();
    let got: Vec<usize> = sent
        .iter()
        .filter_map(|(_, m)| match m {
            Message::Records { records } => Some(records.len()),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![3], "{sent:?}");
    // c can take about one record per message: it gets ours, first.
    let conn = ConnId::inbound(99);
    let (peer, addr) = (fx.keys.id(2), fx.keys.nodes[2].addr);
    fx.ep
        .handle_accepted(conn, peer, addr, len + 10, FEATURES, fx.now);
    fx.sent();
    fx.deliver(conn, Message::RecordSeqs { seqs: Vec::new() });
    let ours = fx.ep.own_record().unwrap().bytes().clone();
    let sent = fx.sent();
    let first: Vec<&Vec<Bytes>> = sent
        .iter()
        .filter_map(|(_, m)| match m {
            Message::Records { records } => Some(records),
            _ => None,
        })
        .collect();
    assert_eq!(first.len(), 1, "{sent:?}");
    assert_eq!(first[0].first(), Some(&ours));
    assert_eq!(first[0].len(), 1);
    // d takes exactly two (kind and count, then two records with their lengths).
    let conn = ConnId::inbound(100);
    let (peer, addr) = (fx.keys.id(3), fx.keys.nodes[3].addr);
    fx.ep
        .handle_accepted(conn, peer, addr, 3 + 2 * (len + 4), FEATURES, fx.now);
    fx.sent();
    fx.deliver(conn, Message::RecordSeqs { seqs: Vec::new() });
    let sent = fx.sent();
    let counts: Vec<usize> = sent
        .iter()
        .filter_map(|(_, m)| match m {
            Message::Records { records } => Some(records.len()),
            _ => None,
        })
        .collect();
    assert_eq!(counts, vec![2], "{sent:?}");
}

#[test]
fn a_sync_connection_to_a_member_without_records_closes_once_epochs_agree() {
    let mut fx = Fx::new();
    // A starting node dials a few members to compare epochs (and records).
    fx.ep
        .handle_timeout(fx.now + std::time::Duration::from_secs(1));
    let dials: Vec<(ConnId, crate::identity::PeerId)> = std::iter::from_fn(|| fx.ep.poll_output())
        .filter_map(|o| match o {
            Output::Dial { conn, peer, .. } => Some((conn, peer)),
            _ => None,
        })
        .collect();
    let (conn, peer) = *dials.first().expect("a start contact");
    let event = ConnEvent::Established {
        peer,
        key: [0; 32],
        ticket: None,
        remote_max_message_size: 1 << 20,
        remote_features: NO_RECORDS,
    };
    fx.ep.handle_conn_event(conn, event, fx.now);
    let epoch = fx.ep.membership().unwrap();
    let (e, d) = (epoch.epoch(), epoch.digest().0);
    fx.deliver(
        conn,
        Message::Epoch {
            epoch: e,
            digest: d,
        },
    );
    let closed = std::iter::from_fn(|| fx.ep.poll_output())
        .any(|o| matches!(o, Output::Close { conn: c, .. } if c == conn));
    assert!(
        closed,
        "nothing of records to wait for from a peer without them"
    );
}
