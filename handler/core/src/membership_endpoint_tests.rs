//! Signed membership in one endpoint, driven by hand: every message, dial, timer and close
//! the membership protocol makes is observed directly (the network tests check outcomes;
//! these check the choices behind them: whom to tell, whom to ask, when to dial, when to
//! stop, what to count).

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::allow_list::AllowList;
use crate::config::Config;
use crate::connection::{Closed, ConnEvent};
use crate::endpoint::{
    ConnId, Endpoint, Event, MembershipEvent, Output, SYNC_BACKOFF_INITIAL, Source,
};
use crate::harness::Net;
use crate::identity::PeerId;
use crate::membership::tests::{gov, sign_with};
use crate::membership::{Document, GovernanceKey, Refusal, Signed};
use crate::membership_net_tests::member_of;
use crate::wire::{AckOf, CloseReason, Message};

const NAMES: [&str; 6] = ["us", "b", "c", "d", "e", "f"];

/// Node 0's endpoint, a member of a 2-of-3 committee's network whose other members are
/// nodes 1.. (keys and addresses from a harness that is otherwise unused).
struct Fx {
    keys: Net,
    ep: Endpoint,
    now: Instant,
    genesis: Signed,
    /// Outputs polled so far and not yet looked at.
    out: Vec<Output>,
    next_inbound: u64,
}

fn committee() -> Vec<GovernanceKey> {
    (0..3).map(gov).collect()
}

impl Fx {
    fn new(members: &[usize]) -> Self {
        Self::with(members, |_| {})
    }

    fn with(members: &[usize], edit: impl FnOnce(&mut Document)) -> Self {
        Self::with_config(members, Config::default(), edit)
    }

    fn with_config(members: &[usize], config: Config, edit: impl FnOnce(&mut Document)) -> Self {
        let keys = Net::new(41, &NAMES, Config::default());
        let now = keys.now;
        let mut doc = Document {
            network: "test".into(),
            epoch: 1,
            previous: crate::membership::Digest::NONE,
            expires: None,
            threshold: 2,
            committee: committee().iter().map(GovernanceKey::id).collect(),
            members: members.iter().map(|&n| member_of(&keys, n)).collect(),
        };
        edit(&mut doc);
        let genesis = sign_with(Signed::new(doc).unwrap(), &committee(), &[0, 1]);
        let mut ep = Endpoint::new(config, keys.id(0), AllowList::new(), [9; 32]).unwrap();
        ep.set_wall_clock(now, keys.wall_ms());
        ep.install_membership(Some(genesis.clone()), now).unwrap();
        let mut fx = Self {
            keys,
            ep,
            now,
            genesis,
            out: Vec::new(),
            next_inbound: 1,
        };
        fx.take();
        fx
    }

    fn id(&self, node: usize) -> PeerId {
        self.keys.id(node)
    }

    fn unix(&self) -> u64 {
        self.keys.wall_ms() / 1000 + (self.now - self.keys.now).as_secs()
    }

    /// Every output since the last call.
    fn take(&mut self) -> Vec<Output> {
        self.out
            .extend(std::iter::from_fn(|| self.ep.poll_output()));
        std::mem::take(&mut self.out)
    }

    /// The membership messages sent since the last call, with their connections.
    fn said(&mut self) -> Vec<(ConnId, Message)> {
        self.take()
            .into_iter()
            .filter_map(|o| match o {
                Output::Send { conn, message, .. } if is_membership(&message) => {
                    Some((conn, message))
                }
                _ => None,
            })
            .collect()
    }

    fn dials(&mut self) -> Vec<(ConnId, PeerId)> {
        self.take()
            .into_iter()
            .filter_map(|o| match o {
                Output::Dial { conn, peer, .. } => Some((conn, peer)),
                _ => None,
            })
            .collect()
    }

    fn events(&mut self) -> Vec<MembershipEvent> {
        std::iter::from_fn(|| self.ep.poll_event())
            .filter_map(|e| match e {
                Event::Membership(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    /// An inbound connection from `node`, established, announcing `features`.
    fn accept(&mut self, node: usize, features: u32) -> ConnId {
        self.accept_max(node, features, 1 << 20)
    }

    fn accept_max(&mut self, node: usize, features: u32, max: usize) -> ConnId {
        let conn = ConnId::inbound(self.next_inbound);
        self.next_inbound += 1;
        let (peer, addr) = (self.id(node), self.keys.nodes[node].addr);
        self.ep
            .handle_accepted(conn, peer, addr, max, features, self.now);
        conn
    }

    fn establish(&mut self, conn: ConnId, node: usize, features: u32) {
        let event = ConnEvent::Established {
            peer: self.id(node),
            key: [0; 32],
            ticket: None,
            remote_max_message_size: 1 << 20,
            remote_features: features,
        };
        self.ep.handle_conn_event(conn, event, self.now);
    }

    fn deliver(&mut self, conn: ConnId, message: Message) {
        self.ep
            .handle_conn_event(conn, ConnEvent::Message(message), self.now);
    }

    fn epoch_msg(&self, doc: &Signed) -> Message {
        Message::Epoch {
            epoch: doc.epoch(),
            digest: doc.digest().0,
        }
    }

    fn lose(&mut self, conn: ConnId) {
        let closed = ConnEvent::Closed(Closed::Io("reset".into()));
        self.ep.handle_conn_event(conn, closed, self.now);
    }

    /// Moves the clock on by `d`, firing every timer due on the way.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(at) = self.ep.poll_timeout().filter(|at| *at <= end) {
            self.now = self.now.max(at);
            self.ep.handle_timeout(self.now);
            self.out
                .extend(std::iter::from_fn(|| self.ep.poll_output()));
        }
        self.now = end;
        self.ep.handle_timeout(self.now);
    }

    /// The dials made over the next `d`, with the instant each was made.
    fn dials_over(&mut self, d: Duration) -> Vec<(Instant, ConnId, PeerId)> {
        let end = self.now + d;
        let mut dials = Vec::new();
        self.ep.handle_timeout(self.now);
        loop {
            for (conn, peer) in self.dials() {
                dials.push((self.now, conn, peer));
            }
            match self.ep.poll_timeout().filter(|at| *at <= end) {
                Some(at) => {
                    self.now = self.now.max(at);
                    self.ep.handle_timeout(self.now);
                }
                None => break,
            }
        }
        self.now = end;
        dials
    }

    /// The successor of `current` with `members`, signed by `signers` of the committee.
    fn next(&self, current: &Signed, members: &[usize], signers: &[usize]) -> Signed {
        let mut doc = current.document().successor_template();
        doc.members = members.iter().map(|&n| member_of(&self.keys, n)).collect();
        sign_with(Signed::new(doc).unwrap(), &committee(), signers)
    }

    /// A chain of `count` successors of the genesis with the same members.
    fn chain(&self, count: usize) -> Vec<Signed> {
        let members: Vec<usize> = (0..self.genesis.document().members.len()).collect();
        let mut chain: Vec<Signed> = Vec::new();
        for _ in 0..count {
            let tip = chain.last().unwrap_or(&self.genesis).clone();
            chain.push(self.next(&tip, &members, &[0, 1]));
        }
        chain
    }
}

fn is_membership(message: &Message) -> bool {
    matches!(
        message,
        Message::Epoch { .. } | Message::Fetch { .. } | Message::Documents { .. }
    )
}

fn fetches(said: &[(ConnId, Message)]) -> Vec<(ConnId, u64)> {
    said.iter()
        .filter_map(|(c, m)| match m {
            Message::Fetch { after } => Some((*c, *after)),
            _ => None,
        })
        .collect()
}

fn epochs_told(said: &[(ConnId, Message)]) -> Vec<ConnId> {
    said.iter()
        .filter_map(|(c, m)| matches!(m, Message::Epoch { .. }).then_some(*c))
        .collect()
}

fn documents(docs: &[Signed]) -> Message {
    Message::Documents {
        docs: docs.iter().map(|d| Bytes::from(d.encode())).collect(),
    }
}

#[test]
fn a_new_epoch_is_told_once_to_each_connected_member_that_understands_it() {
    let mut fx = Fx::new(&[0, 1, 2, 3, 4]);
    // b: two connections with the feature; c: one without; d: a dial not yet established;
    // e: one connection with the feature.
    let b1 = fx.accept(1, 1);
    let b2 = fx.accept(1, 1);
    let c = fx.accept(2, 0);
    let e = fx.accept(4, 1);
    let g = fx.genesis.clone();
    for conn in [b1, e] {
        let m = fx.epoch_msg(&g);
        fx.deliver(conn, m);
    }
    fx.take();
    // A sync dial to d is open (not established) when the new epoch comes.
    let d = fx
        .ep
        .request(fx.id(3), fx.keys.nodes[3].addr, Bytes::new(), fx.now);
    assert!(d.is_ok());
    let d_dials = fx.dials();
    assert_eq!(d_dials.len(), 1);
    let e2 = fx.next(&g, &[0, 1, 2, 3, 4], &[0, 1]);
    assert_eq!(fx.ep.offer_membership(e2, fx.now).map(|v| v.len()), Ok(1));
    let told = epochs_told(&fx.said());
    assert_eq!(told.len(), 2, "once to b and once to e: {told:?}");
    assert!(told.contains(&e));
    assert!(told.contains(&b1) != told.contains(&b2));
    assert!(!told.contains(&c) && !told.contains(&d_dials[0].0));
    assert_eq!(fx.ep.stats().membership_applied, 1);
}

#[test]
fn spread_dials_are_jittered_and_a_member_that_holds_the_epoch_is_not_dialed() {
    let mut fx = Fx::new(&[0, 1, 2, 3, 4]);
    // The start contacts come first (within half a second, not all at once).
    let start = fx.now;
    let dials = fx.dials_over(Duration::from_millis(500));
    assert_eq!(dials.len(), 3, "three start contacts");
    assert!(
        dials.iter().all(|(at, _, _)| *at > start) && dials[0].0 != dials[2].0,
        "the start contacts were not spread over time"
    );
    for (_, conn, _) in dials {
        fx.lose(conn);
    }
    assert_eq!(fx.ep.stats().membership_sync_dials, 3);
    fx.take();
    // Everyone says it holds epoch 1, so nothing more is dialed.
    let g = fx.genesis.clone();
    for node in 1..5 {
        let conn = fx.accept(node, 1);
        let m = fx.epoch_msg(&g);
        fx.deliver(conn, m);
        fx.lose(conn);
    }
    fx.advance(Duration::from_secs(120));
    assert!(fx.dials().is_empty());
    assert!(fx.now > start);
    // b says it holds epoch 2 already (and is asked for it); the operator's copy arrives
    // first. The others are dialed, within 200 ms of each other, b is not.
    let e2 = fx.next(&g, &[0, 1, 2, 3, 4], &[0, 1]);
    let b = fx.accept(1, 1);
    let m = fx.epoch_msg(&e2);
    fx.deliver(b, m);
    assert_eq!(fetches(&fx.said()), vec![(b, 1)]);
    fx.ep.offer_membership(e2, fx.now).unwrap();
    fx.take();
    let applied = fx.now;
    let dials = fx.dials_over(Duration::from_millis(200));
    assert_eq!(dials.len(), 3, "{dials:?}");
    assert!(
        dials.iter().all(|(at, _, _)| *at > applied) && dials[0].0 != dials[2].0,
        "the spread dials were not jittered"
    );
    assert!(
        !dials.iter().any(|(_, _, p)| *p == fx.id(1)),
        "dialed a member that holds the epoch"
    );
}

#[test]
fn a_member_that_stays_behind_is_dialed_again_with_growing_waits() {
    let mut fx = Fx::new(&[0, 1]);
    fx.advance(Duration::from_millis(500));
    let dials = fx.dials();
    assert_eq!(dials.len(), 1);
    let (conn, peer) = dials[0];
    assert_eq!(peer, fx.id(1));
    // The dial fails: again after 1 s, not before.
    fx.lose(conn);
    fx.advance(SYNC_BACKOFF_INITIAL - Duration::from_millis(1));
    assert!(fx.dials().is_empty(), "redialed before the backoff");
    fx.advance(Duration::from_millis(1));
    let dials = fx.dials();
    assert_eq!(dials.len(), 1, "not redialed after the backoff");
    // This time it connects and says it is behind (epoch 0), then drops: 2 s next time.
    let conn = dials[0].0;
    fx.establish(conn, 1, 1);
    assert_eq!(epochs_told(&fx.said()), vec![conn]);
    fx.deliver(
        conn,
        Message::Epoch {
            epoch: 0,
            digest: [0; 32],
        },
    );
    fx.lose(conn);
    fx.advance(2 * SYNC_BACKOFF_INITIAL - Duration::from_millis(1));
    assert!(fx.dials().is_empty());
    fx.advance(Duration::from_millis(1));
    assert_eq!(fx.dials().len(), 1, "a member behind was given up");
    assert_eq!(fx.ep.stats().membership_sync_dials, 3);
}

#[test]
fn a_sync_connection_closes_once_both_ends_agree_and_stops_the_dials() {
    let mut fx = Fx::new(&[0, 1]);
    fx.advance(Duration::from_millis(500));
    let (conn, _) = fx.dials()[0];
    fx.establish(conn, 1, 1);
    fx.take();
    let m = fx.epoch_msg(&fx.genesis.clone());
    fx.deliver(conn, m);
    let closes: Vec<_> = fx
        .take()
        .into_iter()
        .filter(|o| matches!(o, Output::Close { .. }))
        .collect();
    assert!(
        matches!(
            closes.as_slice(),
            [Output::Close {
                reason: CloseReason::Done,
                ..
            }]
        ),
        "{closes:?}"
    );
    fx.advance(Duration::from_secs(300));
    assert!(fx.dials().is_empty(), "dialed a member that agreed");
}

#[test]
fn a_sync_dial_that_reaches_a_member_without_the_feature_is_closed_and_not_repeated() {
    let mut fx = Fx::new(&[0, 1]);
    fx.advance(Duration::from_millis(500));
    let (conn, _) = fx.dials()[0];
    fx.establish(conn, 1, 0);
    let out = fx.take();
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Close { conn: c, reason: CloseReason::Done, .. } if *c == conn
        )),
        "{out:?}"
    );
    assert!(!out.iter().any(|o| matches!(o, Output::Send { .. })));
    fx.advance(Duration::from_secs(300));
    assert!(fx.dials().is_empty());
}

#[test]
fn no_sync_dial_while_draining() {
    let mut fx = Fx::new(&[0, 1, 2]);
    fx.ep.drain();
    fx.advance(Duration::from_secs(5));
    assert!(fx.dials().is_empty());
    assert_eq!(fx.ep.stats().membership_sync_dials, 0);
}

#[test]
fn a_question_lost_with_its_connection_is_asked_again_on_the_next() {
    let mut fx = Fx::new(&[0, 1]);
    let e2 = fx.chain(1).remove(0);
    let a = fx.accept(1, 1);
    let m = fx.epoch_msg(&e2);
    fx.deliver(a, m.clone());
    assert_eq!(fetches(&fx.said()), vec![(a, 1)]);
    fx.lose(a);
    let b = fx.accept(1, 1);
    fx.take();
    fx.deliver(b, m);
    assert_eq!(fetches(&fx.said()), vec![(b, 1)]);
}

#[test]
fn a_connection_whose_exchange_ended_stays_open_while_our_question_on_it_is() {
    let mut fx = Fx::new(&[0, 1]);
    fx.advance(Duration::from_secs(1));
    let (sync, _) = fx.dials()[0];
    fx.lose(sync);
    fx.take();
    let e2 = fx.chain(1).remove(0);
    // Our exchange to b on a fresh connection; b claims epoch 2 on it and is asked.
    let id = fx
        .ep
        .request(
            fx.id(1),
            fx.keys.nodes[1].addr,
            Bytes::from_static(b"x"),
            fx.now,
        )
        .unwrap();
    let (conn, _) = fx.dials()[0];
    fx.establish(conn, 1, 1);
    let m = fx.epoch_msg(&e2);
    fx.deliver(conn, m);
    assert_eq!(fetches(&fx.said()), vec![(conn, 1)]);
    // The exchange ends: the connection stays for the answer.
    let attempt = 1;
    fx.deliver(
        conn,
        Message::Ack {
            exchange: id,
            attempt,
            of: AckOf::Request,
        },
    );
    fx.deliver(
        conn,
        Message::Reply {
            exchange: id,
            attempt,
            payload: Bytes::from_static(b"y"),
        },
    );
    let out = fx.take();
    assert!(
        !out.iter()
            .any(|o| matches!(o, Output::Close { conn: c, .. } if *c == conn)),
        "closed with a question open: {out:?}"
    );
    // Answered: both hold epoch 2, the connection has done its work.
    fx.deliver(conn, documents(&[e2]));
    let out = fx.take();
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Close { conn: c, .. } if *c == conn)),
        "{out:?}"
    );
}

#[test]
fn an_epoch_for_a_known_fork_is_not_fetched_again_but_another_fork_is() {
    let mut fx = Fx::new(&[0, 1, 2]);
    let g = fx.genesis.clone();
    let ours = fx.next(&g, &[0, 1, 2], &[0, 1]);
    let theirs = fx.next(&g, &[0, 1], &[0, 1]);
    let third = fx.next(&g, &[0, 2], &[1, 2]);
    fx.ep.offer_membership(ours.clone(), fx.now).unwrap();
    let a = fx.accept(1, 1);
    fx.take();
    let m = fx.epoch_msg(&theirs);
    fx.deliver(a, m.clone());
    assert_eq!(fetches(&fx.said()), vec![(a, 1)], "a fork check");
    fx.deliver(a, documents(std::slice::from_ref(&theirs)));
    assert!(
        fx.events()
            .iter()
            .any(|e| matches!(e, MembershipEvent::Fork { .. }))
    );
    assert_eq!(fx.ep.stats().membership_forks, 1);
    // The same fork again, on another connection: known, not fetched.
    let b = fx.accept(1, 1);
    fx.take();
    fx.deliver(b, m);
    assert!(fetches(&fx.said()).is_empty(), "fetched a known fork again");
    // Another document at our epoch: fetched.
    let m3 = fx.epoch_msg(&third);
    fx.deliver(b, m3);
    assert_eq!(fetches(&fx.said()), vec![(b, 1)]);
    // The operator offering the fork gets the fork as the reason.
    let err = fx.ep.offer_membership(theirs, fx.now).unwrap_err();
    assert_eq!(err.reason().map(Refusal::code), Some("fork"));
}

#[test]
fn documents_are_sent_within_the_peers_limit_with_their_framing_counted() {
    let mut fx = Fx::new(&[0, 1]);
    let chain = fx.chain(3);
    for doc in &chain {
        fx.ep.offer_membership(doc.clone(), fx.now).unwrap();
    }
    let g = fx.genesis.clone();
    // Room for the first two with their framing, and one byte short of the third.
    let framed: Vec<usize> = chain.iter().map(|d| d.encode().len() + 4).collect();
    let max = 3 + framed[0] + framed[1] + framed[2] - 1;
    let conn = fx.accept_max(1, 1, max);
    fx.take();
    let m = fx.epoch_msg(&g);
    fx.deliver(conn, m);
    fx.deliver(conn, Message::Fetch { after: 1 });
    let sent: Vec<Message> = fx
        .said()
        .into_iter()
        .filter_map(|(_, m)| matches!(m, Message::Documents { .. }).then_some(m))
        .collect();
    assert_eq!(sent.len(), 1);
    let Message::Documents { docs } = &sent[0] else {
        unreachable!()
    };
    assert_eq!(docs.len(), 2);
    assert!(sent[0].encoded_len() <= max);
    assert_eq!(sent[0].encoded_len(), max + 1 - framed[2]);
}

#[test]
fn a_chain_that_skips_ahead_is_filled_in_from_the_same_peer() {
    let mut fx = Fx::new(&[0, 1]);
    let chain = fx.chain(3);
    let conn = fx.accept(1, 1);
    let m = fx.epoch_msg(&chain[2]);
    fx.deliver(conn, m);
    fx.take();
    // It answers with epoch 4 alone: asked again for what follows 1.
    fx.deliver(conn, documents(&chain[2..]));
    assert_eq!(fetches(&fx.said()), vec![(conn, 1)]);
    fx.deliver(conn, documents(&chain));
    assert_eq!(fx.ep.membership().unwrap().epoch(), 4);
    assert_eq!(fx.ep.stats().membership_applied, 3);
}

#[test]
fn a_peer_that_claims_more_than_it_gives_is_no_longer_believed_but_one_at_our_epoch_is() {
    let mut fx = Fx::new(&[0, 1, 2]);
    let chain = fx.chain(2);
    let a = fx.accept(1, 1);
    let m = fx.epoch_msg(&chain[1]);
    fx.deliver(a, m);
    fx.deliver(a, documents(&[]));
    assert_eq!(fx.ep.membership_heard(&fx.id(1)), None);
    // c holds another document at our epoch and sends nothing when asked: still heard.
    let mut doc = fx.genesis.document().clone();
    doc.members.pop();
    let other = sign_with(Signed::new(doc).unwrap(), &committee(), &[1, 2]);
    let c = fx.accept(2, 1);
    let m = fx.epoch_msg(&other);
    fx.deliver(c, m);
    fx.deliver(c, documents(&[]));
    assert_eq!(fx.ep.membership_heard(&fx.id(2)), Some(1));
}

/// The genesis expires in `secs`; its successors carry the same expiry.
fn expiring_chain(fx: &Fx, count: usize, expires: u64) -> Vec<Signed> {
    let mut chain: Vec<Signed> = Vec::new();
    for _ in 0..count {
        let tip = chain.last().unwrap_or(&fx.genesis).clone();
        let mut doc = tip.document().successor_template();
        doc.members = fx.genesis.document().members.clone();
        doc.expires = Some(expires);
        chain.push(sign_with(Signed::new(doc).unwrap(), &committee(), &[0, 1]));
    }
    chain
}

#[test]
fn an_expired_document_is_taken_only_from_a_peer_that_holds_a_later_one() {
    let mut fx = Fx::new(&[0, 1, 2]);
    let past = fx.unix() - 10;
    let chain = expiring_chain(&fx, 2, past);
    // c holds epoch 2 (expired) as its newest: refused as expired.
    let c = fx.accept(2, 1);
    let m = fx.epoch_msg(&chain[0]);
    fx.deliver(c, m);
    fx.deliver(c, documents(&chain[..1]));
    assert_eq!(fx.ep.membership().unwrap().epoch(), 1);
    let codes: Vec<_> = fx
        .events()
        .iter()
        .filter_map(|e| match e {
            MembershipEvent::Refused { refused, .. } => refused.reason().map(Refusal::code),
            _ => None,
        })
        .collect();
    assert_eq!(codes, vec!["expired"]);
    // b holds epoch 3 and sends epoch 2 first: moving on to 2 is taken.
    let b = fx.accept(1, 1);
    let m = fx.epoch_msg(&chain[1]);
    fx.deliver(b, m);
    fx.deliver(b, documents(&chain[..1]));
    assert_eq!(fx.ep.membership().unwrap().epoch(), 2);
}

#[test]
fn an_operators_document_that_skips_ahead_waits_for_the_epochs_between() {
    let mut fx = Fx::new(&[0, 1, 2, 3]);
    let chain = fx.chain(4);
    // b and c say they hold epoch 3 (b's question is answered with a refusal, c's with
    // nothing; d is at ours).
    let b_old = fx.accept(1, 0);
    let b = fx.accept(1, 1);
    let c = fx.accept(2, 1);
    let d = fx.accept(3, 1);
    let m3 = fx.epoch_msg(&chain[1]);
    fx.deliver(b, m3.clone());
    fx.deliver(c, m3);
    let g = fx.genesis.clone();
    let m1 = fx.epoch_msg(&g);
    fx.deliver(d, m1);
    let weak = sign_with(
        Signed::new(chain[0].document().clone()).unwrap(),
        &committee(),
        &[2],
    );
    fx.deliver(b, documents(&[weak]));
    fx.lose(c);
    let c2 = fx.accept(2, 1);
    fx.take();
    fx.events();
    // The operator offers epoch 5: kept, and every connected member ahead of us is asked
    // (once, on a connection that understands it).
    let refused = fx
        .ep
        .offer_membership(chain[3].clone(), fx.now)
        .unwrap_err();
    assert_eq!(refused.reason().map(Refusal::code), Some("gap"));
    assert_eq!(fx.ep.membership_pending(), Some(5));
    fx.events();
    let mut asked = fetches(&fx.said());
    asked.sort();
    assert_eq!(asked, vec![(b, 1), (c2, 1)]);
    assert!(!asked.iter().any(|(conn, _)| *conn == b_old || *conn == d));
    // Epoch 2 arrives: 5 still waits, nothing refused.
    fx.deliver(c2, documents(&chain[..1]));
    assert_eq!(fx.ep.membership().unwrap().epoch(), 2);
    assert_eq!(fx.ep.membership_pending(), Some(5));
    let events = fx.events();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, MembershipEvent::Refused { .. })),
        "{events:?}"
    );
    // 3 and 4: then 5 follows at once.
    fx.deliver(c2, documents(&chain[1..3]));
    assert_eq!(fx.ep.membership().unwrap().epoch(), 5);
    assert_eq!(fx.ep.membership_pending(), None);
}

#[test]
fn a_pending_document_overtaken_by_the_peers_chain_is_dropped() {
    let mut fx = Fx::new(&[0, 1]);
    let chain = fx.chain(3);
    let b = fx.accept(1, 1);
    let m = fx.epoch_msg(&chain[2]);
    fx.deliver(b, m);
    fx.lose(b);
    fx.ep
        .offer_membership(chain[2].clone(), fx.now)
        .unwrap_err();
    assert_eq!(fx.ep.membership_pending(), Some(4));
    let b = fx.accept(1, 1);
    fx.deliver(b, documents(&chain));
    assert_eq!(fx.ep.membership().unwrap().epoch(), 4);
    assert_eq!(fx.ep.membership_pending(), None);
}

#[test]
fn refusals_are_counted_and_a_stale_offer_says_why() {
    let mut fx = Fx::new(&[0, 1]);
    let chain = fx.chain(1);
    fx.ep.offer_membership(chain[0].clone(), fx.now).unwrap();
    let g = fx.genesis.clone();
    let err = fx.ep.offer_membership(g, fx.now).unwrap_err();
    assert_eq!(err.reason().map(Refusal::code), Some("stale"));
    assert_eq!(fx.ep.stats().membership_refused, 1);
    let b = fx.accept(1, 1);
    fx.deliver(
        b,
        Message::Documents {
            docs: vec![Bytes::from_static(b"garbage")],
        },
    );
    assert_eq!(fx.ep.stats().membership_refused, 2);
    let weak = fx.next(&chain[0], &[0, 1], &[2]);
    fx.ep.offer_membership(weak, fx.now).unwrap_err();
    assert_eq!(fx.ep.stats().membership_refused, 3);
}

#[test]
fn a_removed_member_is_forgotten() {
    let mut fx = Fx::new(&[0, 1, 2]);
    let chain = fx.chain(1);
    let b = fx.accept(1, 1);
    let m = fx.epoch_msg(&chain[0]);
    fx.deliver(b, m);
    assert_eq!(fx.ep.membership_heard(&fx.id(1)), Some(2));
    let g = fx.genesis.clone();
    let without_b = fx.next(&g, &[0, 2], &[0, 1]);
    fx.ep.offer_membership(without_b, fx.now).unwrap();
    assert_eq!(fx.ep.membership_heard(&fx.id(1)), None);
    assert!(
        fx.events().iter().any(|e| matches!(
            e,
            MembershipEvent::Applied { source: Source::Local, removed, .. } if removed == &vec![fx.id(1)]
        ))
    );
}

#[test]
fn an_expiring_document_raises_its_alarm_once_and_only_when_it_expires() {
    let mut fx = Fx::new(&[0, 1, 2]);
    let unix = fx.unix();
    // Epoch 2 expires in 60 s; member c in 120 s (which fires the timer again).
    let mut doc = fx.genesis.document().successor_template();
    doc.members = fx.genesis.document().members.clone();
    let c = fx.id(2);
    for member in &mut doc.members {
        if member.peer_id() == c {
            member.expires = Some(unix + 120);
        }
    }
    doc.expires = Some(unix + 60);
    let e2 = sign_with(Signed::new(doc).unwrap(), &committee(), &[0, 1]);
    fx.ep.offer_membership(e2, fx.now).unwrap();
    let expired = |fx: &mut Fx| {
        fx.events()
            .iter()
            .filter(|e| matches!(e, MembershipEvent::Expired { .. }))
            .count()
    };
    assert_eq!(expired(&mut fx), 0, "an alarm before the expiry");
    fx.advance(Duration::from_secs(59));
    assert_eq!(expired(&mut fx), 0);
    fx.advance(Duration::from_secs(2));
    assert_eq!(expired(&mut fx), 1);
    fx.advance(Duration::from_secs(120));
    assert!(!fx.ep.allow_list().contains(&fx.id(2)));
    assert_eq!(expired(&mut fx), 0, "the alarm repeated");
}

#[test]
fn a_document_no_member_could_receive_from_us_is_refused_before_it_takes_effect() {
    let size = {
        let fx = Fx::new(&[0, 1]);
        fx.chain(1)[0].encode().len()
    };
    // A Documents message frames the list (3 bytes) and each document (4 bytes).
    for (max_message_size, fits) in [(size + 6, false), (size + 7, true)] {
        let config = Config {
            max_message_size,
            ..Config::default()
        };
        let mut fx = Fx::with_config(&[0, 1], config, |_| {});
        let doc = fx.chain(1).remove(0);
        assert_eq!(doc.encode().len(), size);
        let result = fx.ep.offer_membership(doc, fx.now);
        let events = fx.events();
        if fits {
            assert!(result.is_ok(), "{result:?}");
            assert_eq!(fx.ep.membership().unwrap().epoch(), 2);
            continue;
        }
        let err = result.unwrap_err();
        assert_eq!(err.reason().map(Refusal::code), Some("too_large"));
        assert!(
            err.to_string().contains(&format!("it is {size} bytes")),
            "{err}"
        );
        assert_eq!(
            fx.ep.membership().unwrap().epoch(),
            1,
            "nothing took effect"
        );
        assert_eq!(fx.ep.stats().membership_refused, 1);
        assert!(
            matches!(
                &events[..],
                [MembershipEvent::Refused {
                    source: Source::Local,
                    ..
                }]
            ),
            "{events:?}"
        );
    }
}

#[test]
fn a_member_asking_for_a_document_too_large_for_it_is_told_nothing_and_we_say_why_once() {
    let mut fx = Fx::new(&[0, 1]);
    let doc = fx.chain(1).remove(0);
    let size = doc.encode().len();
    fx.ep.offer_membership(doc, fx.now).unwrap();
    fx.events();
    let conn = fx.accept_max(1, 1, size + 6);
    fx.take();
    let g = fx.genesis.clone();
    let m = fx.epoch_msg(&g);
    fx.deliver(conn, m);
    for round in 0..2 {
        fx.deliver(conn, Message::Fetch { after: 1 });
        let docs: Vec<Message> = fx
            .said()
            .into_iter()
            .filter_map(|(_, m)| matches!(m, Message::Documents { .. }).then_some(m))
            .collect();
        assert!(
            matches!(&docs[..], [Message::Documents { docs }] if docs.is_empty()),
            "{docs:?}"
        );
        let events = fx.events();
        if round == 0 {
            let peer = fx.id(1);
            assert_eq!(
                events,
                vec![MembershipEvent::Unsendable {
                    peer,
                    epoch: 2,
                    size,
                    max: size - 1
                }]
            );
        } else {
            assert!(events.is_empty(), "reported once: {events:?}");
        }
    }
    assert_eq!(fx.ep.stats().membership_unsendable, 1);
}
