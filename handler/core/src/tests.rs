//! Exchange tests: endpoints driven against each other by the harness on a virtual clock,
//! through real encrypted connections, with scripted faults. One test per behaviour.

use std::time::Duration;

use bytes::Bytes;

use crate::config::{Config, RateLimit};
use crate::connection::ConnError;
use crate::endpoint::{Event, Failure, PeerError, RequestError, RespondError, RetryCause};
use crate::harness::{Action, App, Net, Rule};
use crate::identity::PeerId;
use crate::wire::{AbortReason, AckOf, CloseReason, ExchangeId, Kind, NackReason};

const ALICE: usize = 0;
const BOB: usize = 1;
const CAROL: usize = 2;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Short timeouts so tests reach their interesting parts quickly in virtual time.
fn config() -> Config {
    Config {
        ack_timeout: Duration::from_millis(500),
        reply_timeout: secs(3),
        response_timeout: secs(2),
        reply_ack_timeout: secs(1),
        connect_timeout: secs(1),
        handshake_timeout: secs(1),
        idle_timeout: secs(5),
        backoff_initial: Duration::from_millis(100),
        backoff_max: secs(1),
        ..Config::default()
    }
}

fn net(names: &[&'static str]) -> Net {
    Net::new(7, names, config())
}

fn pair() -> Net {
    net(&["alice", "bob"])
}

#[test]
fn happy_path_request_ack_reply_ack() {
    let mut net = pair();
    let id = net.request(ALICE, BOB, b"hello");
    assert!(net.run(secs(60)));
    assert_eq!(
        net.replies(ALICE),
        vec![(id, Bytes::from_static(b"re:hello"))]
    );
    let seen = net.requests_seen(BOB);
    assert_eq!(
        seen,
        vec![(net.id(ALICE), id, Bytes::from_static(b"hello"))]
    );
    assert!(net.nodes[BOB].events.contains(&Event::ResponseDelivered {
        peer: net.id(ALICE),
        exchange: id,
        redelivered: false
    }));
    // Without reuse the dialer disconnects after the exchange; nothing is left open.
    assert_eq!(net.open_links(), 0);
    for n in &net.nodes {
        assert!(n.endpoint.is_idle(), "{} idle", n.name);
    }
    let s = net.nodes[ALICE].endpoint.stats();
    assert_eq!(
        (s.dials, s.redials, s.requests_sent, s.resends),
        (1, 0, 1, 0)
    );
    // Two network round trips plus the handshake: well under a second of virtual time.
    assert!(net.trace.iter().any(|l| l.contains("Reply")));
}

#[test]
fn one_exchange_gives_each_application_exactly_its_events() {
    // Acks, Nacks and Closes are the handler's business: each application sees exactly the
    // request or reply it is owed, and the responder the fate of its reply, nothing more.
    let mut net = pair();
    let id = net.request(ALICE, BOB, b"x");
    net.run(secs(60));
    let (alice, bob) = (net.id(ALICE), net.id(BOB));
    let alice_events: Vec<(PeerId, ExchangeId, &str)> = net.nodes[ALICE]
        .events
        .iter()
        .map(|e| match e {
            Event::Reply { peer, exchange, .. } => (*peer, *exchange, "reply"),
            other => panic!("Alice's application saw {other:?}"),
        })
        .collect();
    assert_eq!(alice_events, vec![(bob, id, "reply")]);
    let bob_events: Vec<(PeerId, ExchangeId, &str)> = net.nodes[BOB]
        .events
        .iter()
        .map(|e| match e {
            Event::Request { peer, exchange, .. } => (*peer, *exchange, "request"),
            Event::ResponseDelivered { peer, exchange, .. } => (*peer, *exchange, "delivered"),
            other => panic!("Bob's application saw {other:?}"),
        })
        .collect();
    assert_eq!(
        bob_events,
        vec![(alice, id, "request"), (alice, id, "delivered")]
    );
}

#[test]
fn nack_then_resend_succeeds_on_the_same_connection() {
    let mut net = pair();
    net.rules
        .push(Rule::new(ALICE, BOB, Kind::Request, Action::Nack(NackReason::Busy)).times(2));
    let id = net.request(ALICE, BOB, b"retry me");
    net.run(secs(60));
    assert_eq!(
        net.replies(ALICE),
        vec![(id, Bytes::from_static(b"re:retry me"))]
    );
    let s = net.nodes[ALICE].endpoint.stats();
    assert_eq!(s.nacks_received, 2);
    assert_eq!(s.resends, 2);
    assert_eq!(s.dials, 1, "a Nack proves the connection alive: no redial");
    assert_eq!(net.requests_seen(BOB).len(), 1);
}

#[test]
fn nacks_until_attempts_run_out_fail_with_payload_returned() {
    let mut net = pair();
    net.rules
        .push(Rule::new(ALICE, BOB, Kind::Request, Action::Nack(NackReason::Busy)).times(100));
    let id = net.request(ALICE, BOB, b"precious");
    net.run(secs(60));
    let failures = net.failures(ALICE);
    assert_eq!(failures.len(), 1);
    let (fid, failure, payload) = &failures[0];
    assert_eq!(*fid, id);
    assert_eq!(payload, &Bytes::from_static(b"precious"));
    assert_eq!(
        *failure,
        Failure::Exhausted {
            attempts: config().max_attempts,
            last: RetryCause::Nacked(NackReason::Busy),
            request_acked: false
        }
    );
    assert!(net.requests_seen(BOB).is_empty());
    assert_eq!(net.outcomes(ALICE, id), 1);
    assert_eq!(net.open_links(), 0);
}

#[test]
fn backoff_grows_and_is_bounded() {
    let mut net = pair();
    net.rules
        .push(Rule::new(ALICE, BOB, Kind::Request, Action::Nack(NackReason::Busy)).times(100));
    net.request(ALICE, BOB, b"x");
    net.run(secs(60));
    let resend_times: Vec<f64> = net
        .trace
        .iter()
        .filter(|l| l.contains("alice") && l.contains("-> Request"))
        .map(|l| {
            l.trim_start()
                .split('s')
                .next()
                .unwrap()
                .parse::<f64>()
                .unwrap()
        })
        .collect();
    let gaps: Vec<f64> = resend_times.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps.len(), 5);
    // Equal jitter: each delay lies in [base/2, base], base = 100 ms * 2^(n-1) capped at 1 s,
    // plus one 20 ms round trip for the Nack.
    let bases = [0.1, 0.2, 0.4, 0.8, 1.0];
    for (gap, base) in gaps.iter().zip(bases) {
        assert!(
            *gap >= base / 2.0 + 0.019 && *gap <= base + 0.021,
            "{gaps:?}"
        );
    }
}

#[test]
fn final_nack_fails_at_once() {
    let mut net = pair();
    net.rules.push(Rule::new(
        ALICE,
        BOB,
        Kind::Request,
        Action::Nack(NackReason::TooLarge),
    ));
    let id = net.request(ALICE, BOB, b"x");
    net.run(secs(60));
    assert_eq!(
        net.failures(ALICE),
        vec![(
            id,
            Failure::Refused(NackReason::TooLarge),
            Bytes::from_static(b"x")
        )]
    );
    assert_eq!(net.nodes[ALICE].endpoint.stats().requests_sent, 1);
}

#[test]
fn lost_ack_resend_is_not_delivered_twice() {
    let mut net = pair();
    // Bob answers after the ack timeout, so Alice resends first.
    net.nodes[BOB].app = App::EchoAfter(Duration::from_millis(1500));
    net.rules
        .push(Rule::new(BOB, ALICE, Kind::Ack, Action::Drop).ack_of(AckOf::Request));
    let id = net.request(ALICE, BOB, b"once");
    net.run(secs(60));
    assert_eq!(
        net.replies(ALICE),
        vec![(id, Bytes::from_static(b"re:once"))]
    );
    assert_eq!(net.requests_seen(BOB).len(), 1, "delivered exactly once");
    assert_eq!(net.nodes[BOB].endpoint.stats().duplicates_dropped, 1);
    assert_eq!(net.nodes[ALICE].endpoint.stats().resends, 1);
    assert_eq!(
        net.nodes[ALICE].endpoint.stats().redials,
        1,
        "a timeout redials"
    );
}

#[test]
fn lost_reply_is_resent_from_the_responders_cache() {
    let mut net = pair();
    net.rules
        .push(Rule::new(BOB, ALICE, Kind::Reply, Action::Drop));
    let id = net.request(ALICE, BOB, b"answer me");
    net.run(secs(60));
    assert_eq!(
        net.replies(ALICE),
        vec![(id, Bytes::from_static(b"re:answer me"))]
    );
    assert_eq!(
        net.requests_seen(BOB).len(),
        1,
        "the app was not asked again"
    );
    let bob = net.nodes[BOB].endpoint.stats();
    assert_eq!(bob.replies_from_cache, 1);
    assert_eq!(bob.duplicates_dropped, 1);
    // The first reply was never acknowledged in time; the cached copy was, later.
    let bob_events = &net.nodes[BOB].events;
    assert!(bob_events.contains(&Event::ResponseUnconfirmed {
        peer: net.id(ALICE),
        exchange: id,
        redelivered: false
    }));
    assert!(!bob_events.contains(&Event::ResponseDelivered {
        peer: net.id(ALICE),
        exchange: id,
        redelivered: false
    }));
}

#[test]
fn lost_reply_ack_reports_unconfirmed_once() {
    let mut net = pair();
    net.rules
        .push(Rule::new(ALICE, BOB, Kind::Ack, Action::Drop).ack_of(AckOf::Reply));
    let id = net.request(ALICE, BOB, b"x");
    net.run(secs(60));
    assert_eq!(net.replies(ALICE).len(), 1);
    let outcomes: Vec<&Event> = net.nodes[BOB]
        .events
        .iter()
        .filter(|e| !matches!(e, Event::Request { .. }))
        .collect();
    assert_eq!(
        outcomes,
        vec![&Event::ResponseUnconfirmed {
            peer: net.id(ALICE),
            exchange: id,
            redelivered: false
        }]
    );
}

#[test]
fn revoking_a_peer_whose_reply_awaits_its_ack_reports_the_reply_unconfirmed_at_once() {
    let mut net = pair();
    net.rules
        .push(Rule::new(ALICE, BOB, Kind::Ack, Action::Drop).ack_of(AckOf::Reply));
    let id = net.request(ALICE, BOB, b"x");
    net.run_until(secs(10), |n| n.replies(ALICE).len() == 1);
    let before = net.elapsed();
    let alice = net.id(ALICE);
    assert!(net.nodes[BOB].endpoint.revoke(&alice, net.now));
    net.run(secs(60));
    assert_eq!(
        net.nodes[BOB]
            .events
            .iter()
            .filter(|e| matches!(e, Event::ResponseUnconfirmed { exchange, .. } if *exchange == id))
            .count(),
        1
    );
    // Not after the reply-ack timeout: the revocation ended it.
    assert!(net.elapsed() - before < config().reply_ack_timeout);
    net.nodes[BOB].endpoint.check_invariants();
}

#[test]
fn delayed_request_overtaken_by_its_resend_is_delivered_once() {
    let mut net = pair();
    net.rules.push(Rule::new(
        ALICE,
        BOB,
        Kind::Request,
        Action::Delay(Duration::from_millis(800)),
    ));
    let id = net.request(ALICE, BOB, b"slow");
    net.run(secs(60));
    assert_eq!(
        net.replies(ALICE),
        vec![(id, Bytes::from_static(b"re:slow"))]
    );
    assert_eq!(net.requests_seen(BOB).len(), 1);
    assert_eq!(net.outcomes(ALICE, id), 1);
}

#[test]
fn a_copy_delayed_past_the_eviction_of_its_record_is_never_delivered_again() {
    // One dedupe record per peer, and a reused connection that carries a copy of the first
    // Request long after newer exchanges pushed its record out.
    let mut net = Net::new(
        7,
        &["alice", "bob"],
        Config {
            dedupe_per_peer: 1,
            reuse_connections: true,
            ..config()
        },
    );
    net.rules
        .push(Rule::new(ALICE, BOB, Kind::Request, Action::Duplicate(secs(2))).times(1));
    let first = net.request(ALICE, BOB, b"once");
    net.run_until(secs(1), |n| n.has_outcome(ALICE, first));
    let later: Vec<ExchangeId> = (0..3).map(|_| net.request(ALICE, BOB, b"next")).collect();
    net.run(secs(60));
    let seen: Vec<ExchangeId> = net.requests_seen(BOB).iter().map(|r| r.1).collect();
    assert_eq!(
        seen.iter().filter(|id| **id == first).count(),
        1,
        "{seen:?}"
    );
    assert_eq!(seen.len(), 4);
    assert_eq!(net.nodes[BOB].endpoint.stats().settled_refused, 1);
    for id in later.into_iter().chain([first]) {
        assert_eq!(net.outcomes(ALICE, id), 1);
    }
    assert!(net.replies(ALICE).len() == 4);
}

#[test]
fn partition_mid_exchange_then_repair_redials_and_completes() {
    let mut net = pair();
    net.nodes[BOB].app = App::EchoAfter(Duration::from_millis(300));
    let id = net.request(ALICE, BOB, b"through the storm");
    // Let the request be acknowledged, then cut the network before the reply.
    net.run_until(secs(5), |n| n.trace.iter().any(|l| l.contains("<- Ack")));
    net.partition(ALICE, BOB);
    net.run_for(secs(4));
    assert!(!net.has_outcome(ALICE, id), "still retrying");
    net.repair(ALICE, BOB);
    net.run(secs(120));
    assert_eq!(
        net.replies(ALICE),
        vec![(id, Bytes::from_static(b"re:through the storm"))]
    );
    assert_eq!(net.requests_seen(BOB).len(), 1);
    assert!(net.nodes[ALICE].endpoint.stats().redials >= 1);
    assert!(net.nodes[BOB].endpoint.stats().replies_from_cache >= 1);
    assert_eq!(net.open_links(), 0);
}

#[test]
fn permanent_partition_fails_after_bounded_attempts() {
    // Dials that never reach the peer are bounded by the exchange budget (time), not by
    // the attempt count: the peer may be down for a while, and is waited for.
    let mut net = pair();
    net.partition(ALICE, BOB);
    let id = net.request(ALICE, BOB, b"void");
    let budget = config().exchange_budget();
    net.run_until(budget * 2, |n| n.has_outcome(ALICE, id));
    let took = net.elapsed();
    assert!(took <= budget, "{took:?} within {budget:?}");
    // The last try starts no later than the budget allows: one more backoff would
    // overrun it.
    assert!(
        took + config().backoff_max + config().connect_timeout > budget,
        "{took:?} used the budget of {budget:?}"
    );
    net.run(secs(10));
    let failures = net.failures(ALICE);
    assert_eq!(failures.len(), 1);
    assert!(matches!(
        failures[0].1,
        Failure::Exhausted {
            last: RetryCause::ConnectTimeout,
            request_acked: false,
            ..
        }
    ));
    assert!(net.nodes[ALICE].endpoint.stats().dials > u64::from(config().max_attempts));
    assert_eq!(net.outcomes(ALICE, id), 1);
    assert!(net.nodes[ALICE].endpoint.is_idle());
}

#[test]
fn responder_crash_and_restart_redial_and_completion() {
    let mut net = pair();
    net.nodes[BOB].app = App::Manual;
    let id = net.request(ALICE, BOB, b"survive");
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    net.crash(BOB);
    net.run_for(Duration::from_millis(400));
    net.restart(BOB);
    net.nodes[BOB].app = App::Echo;
    net.run(secs(60));
    assert_eq!(
        net.replies(ALICE),
        vec![(id, Bytes::from_static(b"re:survive"))]
    );
    assert!(net.nodes[ALICE].endpoint.stats().redials >= 1);
}

#[test]
fn requests_to_a_busy_peer_queue_and_complete_in_order() {
    let mut net = pair();
    let ids: Vec<_> = (0..5)
        .map(|i| net.request(ALICE, BOB, format!("m{i}").as_bytes()))
        .collect();
    assert_eq!(
        net.nodes[ALICE].endpoint.stats().dials,
        1,
        "one exchange at a time"
    );
    net.run(secs(60));
    let replies: Vec<_> = net.replies(ALICE).into_iter().map(|(id, _)| id).collect();
    assert_eq!(replies, ids);
    let order: Vec<Bytes> = net
        .requests_seen(BOB)
        .into_iter()
        .map(|(_, _, p)| p)
        .collect();
    let expected: Vec<Bytes> = (0..5).map(|i| Bytes::from(format!("m{i}"))).collect();
    assert_eq!(order, expected);
}

#[test]
fn peer_summaries_count_what_is_open_and_in_flight_on_each_side() {
    let mut net = pair();
    net.nodes[BOB].app = App::Manual;
    let ids: Vec<_> = (0..3)
        .map(|i| net.request(ALICE, BOB, format!("q{i}").as_bytes()))
        .collect();
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    let bob = net.id(BOB);
    let alice = net.id(ALICE);
    let ours = net.nodes[ALICE].endpoint.peer_summaries();
    let at_bob = ours
        .iter()
        .find(|s| s.peer == bob)
        .expect("bob is summarised");
    assert!(at_bob.allowed);
    assert_eq!(
        (
            at_bob.connections,
            at_bob.connecting,
            at_bob.active,
            at_bob.queued
        ),
        (1, 0, 1, 2),
        "one exchange runs on one connection, two wait: {at_bob:?}"
    );
    assert_eq!((at_bob.awaiting_answer, at_bob.awaiting_ack), (0, 0));
    let theirs = net.nodes[BOB].endpoint.peer_summaries();
    let at_alice = theirs.iter().find(|s| s.peer == alice).expect("alice too");
    assert_eq!(
        (
            at_alice.connections,
            at_alice.awaiting_answer,
            at_alice.awaiting_ack
        ),
        (1, 1, 0)
    );
    assert_eq!((at_alice.active, at_alice.queued), (0, 0));
    let awaiting_ack = |n: &Net| {
        n.nodes[BOB]
            .endpoint
            .peer_summaries()
            .iter()
            .find(|s| s.peer == alice)
            .map(|s| (s.awaiting_answer, s.awaiting_ack))
    };
    net.respond(BOB, alice, ids[0], b"r0");
    assert_eq!(
        awaiting_ack(&net),
        Some((0, 1)),
        "the reply waits for its Ack"
    );
    net.run_until(secs(5), |n| {
        n.replies(ALICE).len() == 1 && awaiting_ack(n) == Some((1, 0))
    });
    assert_eq!(
        awaiting_ack(&net),
        Some((1, 0)),
        "acknowledged; the next request came"
    );
    let ours = net.nodes[ALICE].endpoint.peer_summaries();
    let at_bob = ours.iter().find(|s| s.peer == bob).expect("bob");
    assert_eq!((at_bob.active, at_bob.queued), (1, 1));
}

#[test]
fn progress_says_how_an_unfinished_exchange_stands_and_why_its_last_try_failed() {
    let mut net = pair();
    net.nodes[BOB].app = App::Manual;
    net.partition(ALICE, BOB);
    let id = net.request(ALICE, BOB, b"anyone?");
    let fresh = net.nodes[ALICE].endpoint.progress(id).expect("unfinished");
    assert_eq!((fresh.failed_tries, fresh.last_cause.clone()), (0, None));
    net.run_until(secs(30), |n| {
        n.nodes[ALICE]
            .endpoint
            .progress(id)
            .is_some_and(|p| p.failed_tries >= 2)
    });
    let stuck = net.nodes[ALICE]
        .endpoint
        .progress(id)
        .expect("still unfinished");
    assert!(stuck.failed_tries >= 2, "{stuck:?}");
    assert!(!stuck.acked);
    assert!(
        matches!(
            stuck.last_cause,
            Some(RetryCause::DialFailed(_) | RetryCause::ConnectTimeout)
        ),
        "{stuck:?}"
    );
    assert!(
        stuck.to_string().contains("failed tries; the last: "),
        "{stuck}"
    );
    net.repair(ALICE, BOB);
    net.run_until(secs(60), |n| {
        n.nodes[ALICE]
            .endpoint
            .progress(id)
            .is_some_and(|p| p.acked)
    });
    let bob_has_it = net.nodes[ALICE]
        .endpoint
        .progress(id)
        .expect("not answered yet");
    assert!(bob_has_it.acked, "{bob_has_it:?}");
    let alice = net.id(ALICE);
    net.respond(BOB, alice, id, b"here");
    net.run_until(secs(10), |n| n.replies(ALICE).len() == 1);
    assert_eq!(net.nodes[ALICE].endpoint.progress(id), None, "ended");
}

#[test]
fn a_burst_to_one_peer_rides_one_connection_closed_after_the_last() {
    // Without reuse, requests already queued behind an exchange follow it on its
    // connection; the last one closes it.
    let mut net = pair();
    assert!(!config().reuse_connections);
    for i in 0..5 {
        net.request(ALICE, BOB, format!("b{i}").as_bytes());
    }
    net.run_until(secs(10), |n| n.replies(ALICE).len() == 5);
    assert_eq!(net.nodes[ALICE].endpoint.stats().dials, 1, "one connection");
    let before = net.elapsed();
    assert!(net.run(secs(60)));
    assert_eq!(net.open_links(), 0, "closed after the last exchange");
    assert!(net.elapsed() - before < config().idle_timeout);
    assert!(!net.trace.iter().any(|l| l.contains("(Idle)")));
    // A request after the burst dials afresh: nothing was kept.
    net.request(ALICE, BOB, b"later");
    net.run_until(secs(10), |n| n.replies(ALICE).len() == 6);
    assert_eq!(net.nodes[ALICE].endpoint.stats().dials, 2);
}

#[test]
fn full_queue_is_a_clear_error() {
    let mut net = Net::new(
        1,
        &["alice", "bob"],
        Config {
            max_queued_per_peer: 2,
            ..config()
        },
    );
    for _ in 0..3 {
        net.request(ALICE, BOB, b"x"); // one active, two queued
    }
    let err = net.try_request(ALICE, BOB, b"x").unwrap_err();
    assert_eq!(
        err,
        RequestError::QueueFull {
            peer: net.id(BOB),
            limit: 2
        }
    );
    assert!(err.to_string().contains("full"));
    net.run(secs(60));
    assert_eq!(net.replies(ALICE).len(), 3);
}

#[test]
fn reused_connection_carries_consecutive_exchanges_then_idles_out() {
    let mut net = Net::new(
        3,
        &["alice", "bob"],
        Config {
            reuse_connections: true,
            ..config()
        },
    );
    for i in 0..3 {
        net.request(ALICE, BOB, format!("r{i}").as_bytes());
    }
    net.run_until(secs(10), |n| n.replies(ALICE).len() == 3);
    assert_eq!(
        net.nodes[ALICE].endpoint.stats().dials,
        1,
        "one connection for all three"
    );
    assert_eq!(net.open_links(), 1, "kept open for reuse");
    // A later request reuses it too, without dialing.
    net.run_for(secs(1));
    net.request(ALICE, BOB, b"later");
    net.run_until(secs(10), |n| n.replies(ALICE).len() == 4);
    assert_eq!(net.nodes[ALICE].endpoint.stats().dials, 1);
    // Then the idle timeout closes it.
    let before = net.elapsed();
    assert!(net.run(secs(60)));
    assert_eq!(net.open_links(), 0);
    assert!(net.elapsed() - before >= config().idle_timeout);
    assert!(net.trace.iter().any(|l| l.contains("(Idle)")));
}

#[test]
fn responder_closes_idle_inbound_connections() {
    // A dialer that keeps its connection (reuse) but then goes quiet is cut by the responder
    // too, whichever idle timer fires first.
    let mut net = Net::new(
        3,
        &["alice", "bob"],
        Config {
            reuse_connections: true,
            ..config()
        },
    );
    net.nodes[BOB].endpoint = crate::endpoint::Endpoint::new(
        Config {
            idle_timeout: secs(2),
            ..config()
        },
        net.id(BOB),
        net.nodes[BOB].allow.clone(),
        [9; 32],
    )
    .unwrap();
    net.request(ALICE, BOB, b"x");
    assert!(net.run(secs(60)));
    assert_eq!(net.open_links(), 0);
    assert!(
        net.trace
            .iter()
            .any(|l| l.starts_with("   2") && l.contains("bob close") && l.contains("(Idle)"))
    );
}

#[test]
fn application_that_never_replies_times_out_on_both_sides() {
    let mut net = pair();
    net.nodes[BOB].app = App::Manual;
    let id = net.request(ALICE, BOB, b"anyone?");
    net.run(secs(60));
    let alice = net.id(ALICE);
    assert!(net.nodes[BOB].events.contains(&Event::ResponseTimedOut {
        peer: alice,
        exchange: id,
        redelivered: false
    }));
    assert_eq!(
        net.failures(ALICE),
        vec![(
            id,
            Failure::Aborted(AbortReason::NoResponse),
            Bytes::from_static(b"anyone?")
        )]
    );
    // Answering late is an error, not a silent drop.
    let late = net.nodes[BOB]
        .endpoint
        .respond(alice, id, Bytes::from_static(b"sorry"), net.now);
    assert_eq!(
        late,
        Err(RespondError::NotPending {
            peer: alice,
            exchange: id
        })
    );
}

#[test]
fn responder_answers_by_peer_and_by_exchange() {
    let mut net = pair();
    net.nodes[BOB].app = App::Manual;
    let id = net.request(ALICE, BOB, b"q");
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    let alice = net.id(ALICE);
    assert_eq!(
        net.nodes[BOB].endpoint.pending_request_from(&alice),
        Some(id)
    );
    assert_eq!(net.nodes[BOB].endpoint.pending_responses(), 1);
    net.respond(BOB, alice, id, b"a");
    assert_eq!(net.nodes[BOB].endpoint.pending_request_from(&alice), None);
    net.run(secs(60));
    assert_eq!(net.replies(ALICE), vec![(id, Bytes::from_static(b"a"))]);
}

#[test]
fn peer_not_on_the_allow_list_is_rejected() {
    let mut net = net(&["alice", "bob", "carol"]);
    let carol = net.id(CAROL);
    // Bob no longer lists Carol; Carol still lists Bob.
    net.nodes[BOB].endpoint.revoke(&carol, net.now);
    let id = net.request(CAROL, BOB, b"let me in");
    net.run(secs(60));
    assert_eq!(
        net.failures(CAROL),
        vec![(
            id,
            Failure::Rejected(CloseReason::NotAllowed),
            Bytes::from_static(b"let me in")
        )]
    );
    assert!(net.requests_seen(BOB).is_empty());
    let errors: Vec<String> = net.nodes[BOB]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::PeerError(PeerError::Connection(e @ ConnError::NotAllowed { .. })) => {
                Some(e.to_string())
            }
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains(&carol.short()), "{}", errors[0]);
    // The rejected peer gets no retry storm: one dial.
    assert_eq!(net.nodes[CAROL].endpoint.stats().dials, 1);
}

#[test]
fn request_to_unlisted_peer_is_refused_locally() {
    let mut net = pair();
    let bob = net.id(BOB);
    net.nodes[ALICE].endpoint.revoke(&bob, net.now);
    assert_eq!(
        net.try_request(ALICE, BOB, b"x"),
        Err(RequestError::NotAllowed(bob))
    );
    assert_eq!(
        net.try_request(ALICE, ALICE, b"x"),
        Err(RequestError::SelfRequest)
    );
}

#[test]
fn impostor_key_at_a_known_address_is_rejected() {
    let mut net = net(&["alice", "bob", "mallory"]);
    // Mallory sits at Bob's address: the key answering there is not Bob's.
    let bob_addr = net.nodes[BOB].addr;
    net.nodes[BOB].addr = "10.9.9.9:1".parse().unwrap();
    net.nodes[2].addr = bob_addr;
    let bob = net.id(BOB);
    let now = net.now;
    let id = net.nodes[ALICE]
        .endpoint
        .request(bob, bob_addr, Bytes::from_static(b"secret"), now)
        .unwrap();
    net.run(secs(60));
    let failures = net.failures(ALICE);
    assert_eq!(failures.len(), 1);
    let (fid, Failure::Connection(err @ ConnError::Impostor { actual, .. }), payload) =
        &failures[0]
    else {
        panic!("{failures:?}");
    };
    assert_eq!((*fid, *actual), (id, net.id(2)));
    assert_eq!(payload, &Bytes::from_static(b"secret"));
    assert!(err.to_string().contains(&bob.short()));
    assert!(
        net.requests_seen(2).is_empty(),
        "the impostor never sees the request"
    );
    assert!(
        net.nodes[ALICE]
            .events
            .iter()
            .any(|e| matches!(e, Event::PeerError(_)))
    );
}

#[test]
fn corrupted_frame_names_the_peer_disconnects_and_the_exchange_recovers() {
    let mut net = pair();
    net.rules
        .push(Rule::new(ALICE, BOB, Kind::Request, Action::Corrupt));
    let id = net.request(ALICE, BOB, b"intact");
    net.run(secs(60));
    let alice = net.id(ALICE);
    let decrypt = net.nodes[BOB].events.iter().find_map(|e| match e {
        Event::PeerError(PeerError::Connection(e @ ConnError::Decrypt { .. })) => Some(e.clone()),
        _ => None,
    });
    let decrypt = decrypt.expect("decrypt error reported");
    assert_eq!(decrypt.remote().peer, Some(alice));
    assert_eq!(
        net.replies(ALICE),
        vec![(id, Bytes::from_static(b"re:intact"))]
    );
    assert_eq!(net.requests_seen(BOB).len(), 1);
}

#[test]
fn rate_limited_requests_are_nacked_then_get_through() {
    let limited = Config {
        request_rate: RateLimit {
            burst: 2,
            per_second: 2,
        },
        ..config()
    };
    let mut net = Net::new(5, &["alice", "bob"], config());
    net.nodes[BOB].endpoint =
        crate::endpoint::Endpoint::new(limited, net.id(BOB), net.nodes[BOB].allow.clone(), [4; 32])
            .unwrap();
    let ids: Vec<_> = (0..5).map(|i| net.request(ALICE, BOB, &[i])).collect();
    net.run(secs(60));
    let replies: Vec<_> = net.replies(ALICE).into_iter().map(|(id, _)| id).collect();
    assert_eq!(replies, ids, "all complete, in order");
    let limited_events = net.nodes[BOB]
        .events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::RateLimited {
                    limit: crate::endpoint::LimitKind::Requests,
                    disconnected: false,
                    ..
                }
            )
        })
        .count();
    assert!(limited_events >= 1);
    assert!(net.nodes[ALICE].endpoint.stats().nacks_received >= 1);
}

#[test]
fn connection_rate_limit_closes_excess_connections() {
    let limited = Config {
        connection_rate: RateLimit {
            burst: 1,
            per_second: 1,
        },
        ..config()
    };
    let mut net = Net::new(5, &["alice", "bob"], config());
    net.nodes[BOB].endpoint =
        crate::endpoint::Endpoint::new(limited, net.id(BOB), net.nodes[BOB].allow.clone(), [4; 32])
            .unwrap();
    // One after the other, each on a connection of its own (queued requests would share
    // the first one's).
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(net.request(ALICE, BOB, &[i]));
        net.run_until(secs(60), |n| n.replies(ALICE).len() == ids.len());
    }
    net.run(secs(60));
    let replies: Vec<_> = net.replies(ALICE).into_iter().map(|(id, _)| id).collect();
    assert_eq!(replies, ids);
    assert!(net.nodes[BOB].events.iter().any(|e| matches!(
        e,
        Event::RateLimited {
            limit: crate::endpoint::LimitKind::Connections,
            disconnected: true,
            ..
        }
    )));
    assert!(net.nodes[ALICE].endpoint.stats().redials >= 1);
}

#[test]
fn large_fragmented_message_survives_a_lost_reply() {
    let mut net = pair();
    net.rules
        .push(Rule::new(BOB, ALICE, Kind::Reply, Action::Drop));
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let id = net.request(ALICE, BOB, &payload);
    net.run(secs(60));
    let replies = net.replies(ALICE);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, id);
    assert_eq!(&replies[0].1[..3], b"re:");
    assert_eq!(&replies[0].1[3..], &payload[..]);
    assert_eq!(net.nodes[BOB].endpoint.stats().replies_from_cache, 1);
}

#[test]
fn sixteen_mib_message_at_the_default_limit() {
    let mut net = pair();
    net.nodes[BOB].app = App::Manual;
    let payload = vec![0x5a_u8; 16 * 1024 * 1024];
    let id = net.request(ALICE, BOB, &payload);
    net.run_until(secs(10), |n| !n.requests_seen(BOB).is_empty());
    assert_eq!(net.requests_seen(BOB)[0].2.len(), payload.len());
    net.respond(BOB, net.id(ALICE), id, &payload);
    net.run(secs(60));
    assert_eq!(net.replies(ALICE)[0].1.len(), payload.len());
    let too_big = vec![0u8; 16 * 1024 * 1024 + 1];
    assert!(matches!(
        net.try_request(ALICE, BOB, &too_big),
        Err(RequestError::TooLarge { .. })
    ));
}

#[test]
fn payload_over_the_responders_limit_fails_without_being_sent() {
    let mut net = Net::new(5, &["alice", "bob"], config());
    let small = Config {
        max_message_size: 1000,
        ..config()
    };
    net.nodes[BOB].config = small.clone();
    net.nodes[BOB].endpoint =
        crate::endpoint::Endpoint::new(small, net.id(BOB), net.nodes[BOB].allow.clone(), [4; 32])
            .unwrap();
    let id = net.request(ALICE, BOB, &[1u8; 2000]);
    net.run(secs(60));
    let failures = net.failures(ALICE);
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].0, id);
    assert_eq!(
        failures[0].1,
        Failure::TooLarge {
            len: 2000,
            max: 1000
        }
    );
    assert_eq!(net.nodes[ALICE].endpoint.stats().requests_sent, 0);
}

#[test]
fn revoking_a_peer_at_runtime_disconnects_it() {
    let mut net = pair();
    net.nodes[BOB].app = App::Manual;
    let id = net.request(ALICE, BOB, b"in flight");
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    let alice = net.id(ALICE);
    let now = net.now;
    assert!(net.nodes[BOB].endpoint.revoke(&alice, now));
    assert_eq!(net.nodes[BOB].endpoint.pending_responses(), 0);
    net.run(secs(60));
    assert_eq!(
        net.failures(ALICE),
        vec![(
            id,
            Failure::Rejected(CloseReason::NotAllowed),
            Bytes::from_static(b"in flight")
        )]
    );
    assert_eq!(net.open_links(), 0);
}

#[test]
fn draining_refuses_new_work_and_lets_started_work_finish() {
    let mut net = net(&["alice", "bob", "carol"]);
    net.nodes[BOB].app = App::Manual;
    let started = net.request(ALICE, BOB, b"started");
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    assert!(!net.nodes[BOB].endpoint.is_draining());
    net.nodes[BOB].endpoint.drain();
    assert!(net.nodes[BOB].endpoint.is_draining());
    assert!(
        !net.nodes[BOB].endpoint.is_drained(),
        "a request awaits our answer"
    );
    // Our own new work is refused at once.
    assert_eq!(
        net.try_request(BOB, ALICE, b"new"),
        Err(RequestError::ShuttingDown)
    );
    // A peer's new request is Nacked ShuttingDown, not delivered.
    let refused = net.request(CAROL, BOB, b"late");
    net.run_until(secs(1), |n| {
        n.nodes[CAROL].endpoint.stats().nacks_received > 0
    });
    assert!(net.nodes[CAROL].endpoint.stats().nacks_received > 0);
    assert!(
        net.trace.iter().any(|l| l.contains("ShuttingDown")),
        "the Nack says why"
    );
    assert_eq!(
        net.requests_seen(BOB).len(),
        1,
        "only the started request reached bob"
    );
    assert!(!net.has_outcome(CAROL, refused));
    // The started exchange ends normally, and then nothing is left.
    let alice = net.id(ALICE);
    net.respond(BOB, alice, started, b"answer");
    net.run_until(secs(10), |n| n.replies(ALICE).len() == 1);
    net.run_until(secs(10), |n| n.nodes[BOB].endpoint.is_drained());
    assert!(net.nodes[BOB].endpoint.is_drained());
    assert_eq!(
        net.replies(ALICE),
        vec![(started, Bytes::from_static(b"answer"))]
    );
    net.nodes[BOB].endpoint.check_invariants();
}

#[test]
fn a_drained_endpoint_waits_for_its_own_queued_exchanges() {
    let mut net = pair();
    net.nodes[BOB].app = App::Manual;
    let ids: Vec<_> = (0..3).map(|i| net.request(ALICE, BOB, &[i])).collect();
    net.nodes[ALICE].endpoint.drain();
    assert!(!net.nodes[ALICE].endpoint.is_drained());
    let alice = net.id(ALICE);
    for id in &ids {
        net.run_until(secs(10), |n| {
            n.requests_seen(BOB).iter().any(|(_, e, _)| e == id)
        });
        net.respond(BOB, alice, *id, b"ok");
    }
    net.run_until(secs(10), |n| n.replies(ALICE).len() == 3);
    assert_eq!(net.replies(ALICE).len(), 3, "queued exchanges still ran");
    assert!(net.nodes[ALICE].endpoint.is_drained());
}

#[test]
fn replacing_the_allow_list_revokes_the_peers_it_drops() {
    let mut net = net(&["alice", "bob", "carol"]);
    net.nodes[BOB].app = App::Manual;
    let from_alice = net.request(ALICE, BOB, b"alice's");
    let from_carol = net.request(CAROL, BOB, b"carol's");
    net.run_until(secs(5), |n| n.requests_seen(BOB).len() == 2);
    let (alice, carol) = (net.id(ALICE), net.id(CAROL));
    // Bob's new list keeps Carol only.
    let now = net.now;
    let list = crate::allow_list::AllowList::from_peers([carol]);
    let removed = net.nodes[BOB].endpoint.set_allow_list(list.clone(), now);
    assert_eq!(removed, vec![alice]);
    // The same list again removes no one: Alice, still tracked, was not on the old list.
    assert!(net.nodes[BOB].endpoint.set_allow_list(list, now).is_empty());
    assert_eq!(net.nodes[BOB].endpoint.pending_responses(), 1);
    net.respond(BOB, carol, from_carol, b"kept");
    net.run(secs(60));
    assert_eq!(
        net.failures(ALICE),
        vec![(
            from_alice,
            Failure::Rejected(CloseReason::NotAllowed),
            Bytes::from_static(b"alice's")
        )]
    );
    assert_eq!(
        net.replies(CAROL),
        vec![(from_carol, Bytes::from_static(b"kept"))]
    );
    // A request to a peer no longer listed is refused.
    assert_eq!(
        net.try_request(BOB, ALICE, b"x"),
        Err(RequestError::NotAllowed(alice))
    );
    net.nodes[BOB].endpoint.check_invariants();
}

#[test]
fn replacing_the_allow_list_closes_connections_from_addresses_no_longer_allowed() {
    let mut net = pair();
    net.nodes[BOB].app = App::Manual;
    let id = net.request(ALICE, BOB, b"x");
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    let alice = net.id(ALICE);
    let elsewhere: std::net::IpAddr = "192.0.2.1".parse().unwrap();
    let mut list = crate::allow_list::AllowList::new();
    list.insert(
        alice,
        crate::allow_list::AllowedPeer {
            addresses: vec![elsewhere],
            ..Default::default()
        },
    );
    let now = net.now;
    assert!(
        net.nodes[BOB]
            .endpoint
            .set_allow_list(list.clone(), now)
            .is_empty()
    );
    net.run_for(Duration::from_millis(100));
    assert_eq!(
        net.open_links(),
        0,
        "alice's connection came from elsewhere"
    );
    // The dialer hears why, with its payload back; bob still lists her, so her request
    // stays his application's to answer (or to time out) rather than vanishing.
    assert_eq!(
        net.failures(ALICE),
        vec![(
            id,
            Failure::Rejected(CloseReason::NotAllowed),
            Bytes::from_static(b"x")
        )]
    );
    assert_eq!(net.nodes[BOB].endpoint.pending_responses(), 1);
    // A connection Bob dials to Alice is not checked against where she may connect from.
    net.nodes[ALICE].app = App::Manual;
    let bobs = net.request(BOB, ALICE, b"to alice");
    net.run_until(secs(5), |n| {
        n.requests_seen(ALICE).iter().any(|(_, e, _)| *e == bobs)
    });
    let now = net.now;
    let dials = net.nodes[BOB].endpoint.stats().dials;
    assert!(net.nodes[BOB].endpoint.set_allow_list(list, now).is_empty());
    net.run_for(Duration::from_millis(100));
    assert_eq!(net.open_links(), 1);
    assert_eq!(
        net.nodes[BOB].endpoint.stats().dials,
        dials,
        "bob's own connection to alice stays: no redial"
    );
    assert!(!net.has_outcome(BOB, bobs));
    net.nodes[BOB].endpoint.check_invariants();
}

#[test]
fn a_rejected_request_fails_the_dialer_at_once_and_a_resend_gets_the_same_answer() {
    let mut net = pair();
    net.nodes[BOB].app = App::Manual;
    // The first Abort is lost: the dialer resends, and must hear the same refusal.
    net.rules
        .push(Rule::new(BOB, ALICE, Kind::Abort, Action::Drop).times(1));
    let id = net.request(ALICE, BOB, b"unwanted");
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    let alice = net.id(ALICE);
    let now = net.now;
    assert_eq!(net.nodes[BOB].endpoint.reject(alice, id, now), Ok(()));
    assert_eq!(net.nodes[BOB].endpoint.pending_responses(), 0);
    // Refusing twice, or answering after refusing, is an error.
    assert_eq!(
        net.nodes[BOB].endpoint.reject(alice, id, now),
        Err(RespondError::NotPending {
            peer: alice,
            exchange: id
        })
    );
    let before = net.elapsed();
    net.run_until(secs(20), |n| n.has_outcome(ALICE, id));
    assert_eq!(
        net.failures(ALICE),
        vec![(
            id,
            Failure::Aborted(AbortReason::Refused),
            Bytes::from_static(b"unwanted")
        )]
    );
    // Well before the response timeout the dialer would otherwise have waited for.
    assert!(net.elapsed() - before < config().response_timeout);
    assert_eq!(
        net.requests_seen(BOB).len(),
        1,
        "the resend was not delivered again"
    );
    assert!(net.nodes[BOB].events.iter().any(|e| matches!(
        e,
        Event::ResponseAborted { reason: AbortReason::Refused, exchange, .. } if *exchange == id
    )));
    net.nodes[BOB].endpoint.check_invariants();
}

#[test]
fn cancelling_a_queued_or_an_in_flight_request_hands_its_payload_back() {
    let mut net = pair();
    net.nodes[BOB].app = App::Manual;
    let in_flight = net.request(ALICE, BOB, b"first");
    let queued = net.request(ALICE, BOB, b"second");
    let kept = net.request(ALICE, BOB, b"third");
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    let now = net.now;
    assert!(net.nodes[ALICE].endpoint.cancel(queued, now));
    assert!(
        !net.nodes[ALICE].endpoint.cancel(queued, now),
        "already ended"
    );
    assert!(net.nodes[ALICE].endpoint.cancel(in_flight, now));
    net.run_until(secs(5), |n| {
        n.requests_seen(BOB).iter().any(|(_, e, _)| *e == kept)
    });
    let mut failures = net.failures(ALICE);
    failures.sort_by_key(|(id, _, _)| *id);
    let mut want = vec![
        (in_flight, Failure::Cancelled, Bytes::from_static(b"first")),
        (queued, Failure::Cancelled, Bytes::from_static(b"second")),
    ];
    want.sort_by_key(|(id, _, _)| *id);
    assert_eq!(failures, want);
    // The next queued request went on, once.
    let alice = net.id(ALICE);
    net.respond(BOB, alice, kept, b"ok");
    net.run_until(secs(5), |n| n.has_outcome(ALICE, kept));
    assert_eq!(net.replies(ALICE), vec![(kept, Bytes::from_static(b"ok"))]);
    assert_eq!(net.outcomes(ALICE, in_flight), 1);
    net.nodes[ALICE].endpoint.check_invariants();
}

#[test]
fn a_deadline_ends_an_exchange_that_has_not_ended() {
    let mut net = pair();
    net.nodes[BOB].app = App::Manual;
    let (peer, addr, now) = (net.id(BOB), net.nodes[BOB].addr, net.now);
    let deadline = now + Duration::from_millis(700);
    let id = net.nodes[ALICE]
        .endpoint
        .request_with_deadline(peer, addr, Bytes::from_static(b"soon"), Some(deadline), now)
        .unwrap();
    // Queued behind it, with a deadline it never reaches in the queue.
    let queued = net.nodes[ALICE]
        .endpoint
        .request_with_deadline(
            peer,
            addr,
            Bytes::from_static(b"later"),
            Some(deadline),
            now,
        )
        .unwrap();
    let free = net.request(ALICE, BOB, b"free");
    net.run_until(secs(5), |n| {
        n.has_outcome(ALICE, id) && n.has_outcome(ALICE, queued)
    });
    assert!(net.elapsed() >= Duration::from_millis(700));
    assert!(net.elapsed() < Duration::from_millis(800));
    let mut failures = net.failures(ALICE);
    failures.sort_by_key(|(id, _, _)| *id);
    let mut want = vec![
        (id, Failure::DeadlineExceeded, Bytes::from_static(b"soon")),
        (
            queued,
            Failure::DeadlineExceeded,
            Bytes::from_static(b"later"),
        ),
    ];
    want.sort_by_key(|(id, _, _)| *id);
    assert_eq!(failures, want);
    // A request without a deadline is not touched by the others'.
    net.run_until(secs(5), |n| {
        n.requests_seen(BOB).iter().any(|(_, e, _)| *e == free)
    });
    assert!(!net.has_outcome(ALICE, free));
    net.nodes[ALICE].endpoint.check_invariants();
}

#[test]
fn a_deadline_of_an_exchange_that_ended_first_does_nothing() {
    let mut net = pair();
    let (peer, addr, now) = (net.id(BOB), net.nodes[BOB].addr, net.now);
    let id = net.nodes[ALICE]
        .endpoint
        .request_with_deadline(
            peer,
            addr,
            Bytes::from_static(b"quick"),
            Some(now + secs(5)),
            now,
        )
        .unwrap();
    net.run(secs(10));
    assert_eq!(
        net.replies(ALICE),
        vec![(id, Bytes::from_static(b"re:quick"))]
    );
    assert_eq!(net.outcomes(ALICE, id), 1);
    assert!(net.failures(ALICE).is_empty());
}

#[test]
fn shutdown_reports_every_pending_exchange_and_closes_everything() {
    let mut net = net(&["alice", "bob", "carol"]);
    net.nodes[BOB].app = App::Manual;
    let queued: Vec<_> = (0..3).map(|i| net.request(ALICE, BOB, &[i])).collect();
    let other = net.request(ALICE, CAROL, b"c");
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    net.shutdown(ALICE);
    // Drain the outputs and events shutdown produced.
    net.run(secs(60));
    let mut failed: Vec<_> = net
        .failures(ALICE)
        .into_iter()
        .filter(|(_, f, _)| *f == Failure::ShuttingDown)
        .map(|(id, _, _)| id)
        .collect();
    failed.sort();
    let mut expected = queued.clone();
    if !net.has_outcome(ALICE, other) || net.failures(ALICE).iter().any(|(id, _, _)| *id == other) {
        expected.push(other);
    }
    expected.sort();
    assert_eq!(failed, expected);
    for id in queued {
        assert_eq!(net.outcomes(ALICE, id), 1);
    }
    assert!(net.nodes[ALICE].endpoint.is_idle());
    assert_eq!(
        net.try_request(ALICE, BOB, b"x"),
        Err(RequestError::ShuttingDown)
    );
}

#[test]
fn responder_shutdown_aborts_pending_requests() {
    let mut net = pair();
    net.nodes[BOB].app = App::Manual;
    let id = net.request(ALICE, BOB, b"x");
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    net.shutdown(BOB);
    net.run(secs(60));
    assert_eq!(
        net.failures(ALICE),
        vec![(
            id,
            Failure::Aborted(AbortReason::ShuttingDown),
            Bytes::from_static(b"x")
        )]
    );
}

#[test]
fn many_nodes_exchange_at_once_without_loss_or_duplicates() {
    let names: Vec<&'static str> = vec!["n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9"];
    let mut net = Net::new(11, &names, config());
    let mut ids = Vec::new();
    for from in 0..names.len() {
        for k in 1..=4 {
            let to = (from + k) % names.len();
            ids.push((
                from,
                net.request(from, to, format!("{from}->{to}").as_bytes()),
            ));
        }
    }
    assert!(net.run(secs(120)));
    for (from, id) in ids {
        assert_eq!(net.outcomes(from, id), 1);
        assert!(net.replies(from).iter().any(|(r, _)| *r == id));
    }
    let delivered: usize = (0..names.len()).map(|n| net.requests_seen(n).len()).sum();
    assert_eq!(delivered, names.len() * 4);
    assert_eq!(net.open_links(), 0);
}

#[test]
fn same_seed_same_trace_byte_for_byte() {
    fn run(seed: u64) -> Vec<String> {
        let mut net = Net::new(seed, &["alice", "bob", "carol"], config());
        net.rules
            .push(Rule::new(BOB, ALICE, Kind::Reply, Action::Drop));
        net.rules
            .push(Rule::new(ALICE, CAROL, Kind::Request, Action::Nack(NackReason::Busy)).times(2));
        for i in 0..3 {
            net.request(ALICE, BOB, &[i]);
            net.request(ALICE, CAROL, &[i]);
            net.request(CAROL, BOB, &[i]);
        }
        net.run(secs(120));
        net.trace
    }
    let a = run(42);
    assert_eq!(a, run(42));
    assert_ne!(a, run(43), "the seed matters (ids, jitter, keys)");
}

mod endpoint_unit {
    //! Transitions driven by hand, for paths a correct peer never takes.

    use super::*;
    use crate::allow_list::AllowList;
    use crate::connection::ConnEvent;
    use crate::endpoint::{ConnId, Direction, Endpoint, LimitKind, Output};
    use crate::identity::{Keypair, PeerId};
    use crate::wire::{ExchangeId, Message};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;
    use std::net::SocketAddr;
    use std::time::Instant;

    struct Fixture {
        ep: Endpoint,
        peer: PeerId,
        addr: SocketAddr,
        now: Instant,
    }

    fn fixture(config: Config) -> Fixture {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let me = Keypair::generate(&mut rng).peer_id();
        let peer = Keypair::generate(&mut rng).peer_id();
        Fixture {
            ep: Endpoint::new(config, me, AllowList::from_peers([peer]), [0; 32]).unwrap(),
            peer,
            addr: "10.0.0.2:1234".parse().unwrap(),
            now: Instant::now(),
        }
    }

    fn outputs(ep: &mut Endpoint) -> Vec<Output> {
        std::iter::from_fn(|| ep.poll_output()).collect()
    }

    fn events(ep: &mut Endpoint) -> Vec<Event> {
        std::iter::from_fn(|| ep.poll_event()).collect()
    }

    fn request(id: u64, attempt: u32) -> ConnEvent {
        ConnEvent::Message(Message::Request {
            exchange: ExchangeId(id),
            attempt,
            payload: Bytes::from_static(b"p"),
        })
    }

    #[test]
    fn inbound_request_is_acked_and_delivered() {
        let mut f = fixture(Config {
            ack_delay: Duration::ZERO,
            ..config()
        });
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c, request(7, 1), f.now);
        assert_eq!(
            outputs(&mut f.ep),
            vec![Output::Send {
                conn: c,
                peer: f.peer,
                message: Message::Ack {
                    exchange: ExchangeId(7),
                    attempt: 1,
                    of: AckOf::Request
                }
            }]
        );
        assert_eq!(
            events(&mut f.ep),
            vec![Event::Request {
                peer: f.peer,
                addr: f.addr,
                exchange: ExchangeId(7),
                payload: Bytes::from_static(b"p"),
                redelivered: false,
            }]
        );
        assert_eq!(f.ep.poll_timeout(), Some(f.now + config().response_timeout));
    }

    #[test]
    fn held_ack_leaves_with_the_reply_or_when_its_delay_ends() {
        let mut f = fixture(config());
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        // Answered quickly: Ack and Reply back to back, the Ack first.
        f.ep.handle_conn_event(c, request(7, 1), f.now);
        assert!(outputs(&mut f.ep).is_empty(), "the Ack is held");
        f.ep.respond(f.peer, ExchangeId(7), Bytes::from_static(b"r"), f.now)
            .unwrap();
        let kinds: Vec<Kind> = outputs(&mut f.ep)
            .into_iter()
            .filter_map(|o| match o {
                Output::Send { message, .. } => Some(message.kind()),
                _ => None,
            })
            .collect();
        assert_eq!(kinds, vec![Kind::Ack, Kind::Reply]);
        // Answered slowly: the Ack leaves when the delay ends.
        let c2 = ConnId::inbound(2);
        f.ep.handle_accepted(c2, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c2, request(8, 1), f.now);
        let due = f.now + config().ack_delay;
        f.ep.handle_timeout(due - Duration::from_micros(1));
        assert!(outputs(&mut f.ep).is_empty());
        f.ep.handle_timeout(due);
        assert_eq!(
            outputs(&mut f.ep),
            vec![Output::Send {
                conn: c2,
                peer: f.peer,
                message: Message::Ack {
                    exchange: ExchangeId(8),
                    attempt: 1,
                    of: AckOf::Request
                }
            }]
        );
        // A resent copy is acknowledged at once.
        let c3 = ConnId::inbound(3);
        f.ep.handle_accepted(c3, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c3, request(9, 1), f.now);
        f.ep.handle_conn_event(c3, request(9, 2), f.now);
        assert!(matches!(
            outputs(&mut f.ep).as_slice(),
            [Output::Send {
                message: Message::Ack { attempt: 2, .. },
                ..
            }]
        ));
        f.ep.check_invariants();
    }

    #[test]
    fn responder_sending_requests_is_a_violation() {
        let mut f = fixture(config());
        f.ep.request(f.peer, f.addr, Bytes::from_static(b"x"), f.now)
            .unwrap();
        let Some(Output::Dial { conn, .. }) = f.ep.poll_output() else {
            panic!()
        };
        f.ep.handle_conn_event(
            conn,
            ConnEvent::Established {
                peer: f.peer,
                key: [0; 32],
                ticket: None,
                remote_max_message_size: 1 << 20,
                remote_features: 0,
            },
            f.now,
        );
        outputs(&mut f.ep);
        f.ep.handle_conn_event(conn, request(1, 1), f.now);
        let evs = events(&mut f.ep);
        assert!(
            matches!(
                evs.as_slice(),
                [Event::PeerError(PeerError::Violation { remote, .. })] if remote.peer == Some(f.peer)
            ),
            "{evs:?}"
        );
        assert!(outputs(&mut f.ep).contains(&Output::Close {
            conn,
            peer: Some(f.peer),
            reason: CloseReason::ProtocolViolation
        }));
    }

    #[test]
    fn dialer_sending_replies_is_a_violation() {
        let mut f = fixture(config());
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(
            c,
            ConnEvent::Message(Message::Reply {
                exchange: ExchangeId(1),
                attempt: 1,
                payload: Bytes::new(),
            }),
            f.now,
        );
        assert!(matches!(
            events(&mut f.ep).as_slice(),
            [Event::PeerError(PeerError::Violation { .. })]
        ));
        assert_eq!(
            outputs(&mut f.ep),
            vec![Output::Close {
                conn: c,
                peer: Some(f.peer),
                reason: CloseReason::ProtocolViolation
            }]
        );
        assert_eq!(f.ep.open_connections(), 0);
    }

    #[test]
    fn oversized_request_is_nacked_too_large() {
        let mut f = fixture(config());
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(
            c,
            ConnEvent::Oversized {
                kind: Kind::Request,
                exchange: Some(ExchangeId(3)),
                attempt: Some(1),
                len: 1 << 30,
            },
            f.now,
        );
        assert_eq!(
            outputs(&mut f.ep),
            vec![Output::Send {
                conn: c,
                peer: f.peer,
                message: Message::Nack {
                    exchange: ExchangeId(3),
                    attempt: 1,
                    reason: NackReason::TooLarge,
                    retry_after_ms: 0
                }
            }]
        );
        assert!(events(&mut f.ep).is_empty());
    }

    #[test]
    fn request_just_over_the_payload_limit_is_nacked_too_large() {
        // The encoded-size bound leaves room for headers; the payload bound is exact.
        let max = config().max_message_size;
        let mut f = fixture(config());
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        let over = ConnEvent::Message(Message::Request {
            exchange: ExchangeId(1),
            attempt: 1,
            payload: Bytes::from(vec![0u8; max + 5]),
        });
        f.ep.handle_conn_event(c, over, f.now);
        assert!(matches!(
            outputs(&mut f.ep).as_slice(),
            [Output::Send {
                message: Message::Nack {
                    reason: NackReason::TooLarge,
                    ..
                },
                ..
            }]
        ));
        assert!(events(&mut f.ep).is_empty());
    }

    #[test]
    fn second_request_on_a_busy_connection_is_nacked_busy() {
        let mut f = fixture(config());
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c, request(1, 1), f.now);
        outputs(&mut f.ep);
        f.ep.handle_conn_event(c, request(2, 1), f.now);
        assert!(matches!(
            outputs(&mut f.ep).as_slice(),
            [Output::Send {
                message: Message::Nack {
                    reason: NackReason::Busy,
                    ..
                },
                ..
            }]
        ));
        assert_eq!(events(&mut f.ep).len(), 1, "only the first was delivered");
    }

    #[test]
    fn full_inbox_nacks_busy() {
        let mut f = fixture(Config {
            max_pending_inbound: 1,
            ..config()
        });
        let c1 = ConnId::inbound(1);
        f.ep.handle_accepted(c1, f.peer, f.addr, 1 << 20, 0, f.now);
        let c2 = ConnId::inbound(2);
        f.ep.handle_accepted(c2, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c1, request(1, 1), f.now);
        f.ep.handle_conn_event(c2, request(2, 1), f.now);
        let outs = outputs(&mut f.ep);
        assert!(
            matches!(
                outs.last(),
                Some(Output::Send { conn, message: Message::Nack { reason: NackReason::Busy, .. }, .. }) if *conn == c2
            ),
            "{outs:?}"
        );
    }

    #[test]
    fn rate_limit_abuse_disconnects_the_peer() {
        let mut f = fixture(Config {
            request_rate: RateLimit {
                burst: 1,
                per_second: 1,
            },
            rate_limit_strikes: 3,
            ..config()
        });
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c, request(1, 1), f.now);
        for id in 2..=4 {
            f.ep.handle_conn_event(c, request(id, 1), f.now);
        }
        let evs = events(&mut f.ep);
        let limited: Vec<bool> = evs
            .iter()
            .filter_map(|e| match e {
                Event::RateLimited {
                    limit: LimitKind::Requests,
                    disconnected,
                    ..
                } => Some(*disconnected),
                _ => None,
            })
            .collect();
        assert_eq!(limited, vec![false, false, true]);
        assert!(evs.iter().any(|e| matches!(
            e,
            Event::PeerError(PeerError::RateLimitAbuse { strikes: 3, .. })
        )));
        let outs = outputs(&mut f.ep);
        let retry_after = outs.iter().find_map(|o| match o {
            Output::Send {
                message:
                    Message::Nack {
                        reason: NackReason::RateLimited,
                        retry_after_ms,
                        ..
                    },
                ..
            } => Some(*retry_after_ms),
            _ => None,
        });
        assert_eq!(retry_after, Some(1000));
        assert!(outs.contains(&Output::Close {
            conn: c,
            peer: Some(f.peer),
            reason: CloseReason::RateLimited
        }));
    }

    #[test]
    fn dedupe_memory_is_bounded_per_peer() {
        let mut f = fixture(Config {
            dedupe_per_peer: 4,
            ..config()
        });
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        for id in 0..10u64 {
            f.ep.handle_conn_event(c, request(id, 1), f.now);
            f.ep.respond(f.peer, ExchangeId(id), Bytes::from_static(b"r"), f.now)
                .unwrap();
            f.ep.handle_conn_event(
                c,
                ConnEvent::Message(Message::Ack {
                    exchange: ExchangeId(id),
                    attempt: 1,
                    of: AckOf::Reply,
                }),
                f.now,
            );
            f.ep.check_invariants();
        }
        let delivered = events(&mut f.ep)
            .iter()
            .filter(|e| matches!(e, Event::Request { .. }))
            .count();
        assert_eq!(delivered, 10);
        // The most recent ids are still recognised.
        f.ep.handle_conn_event(c, request(9, 2), f.now);
        assert!(events(&mut f.ep).is_empty());
    }

    /// Settles exchange `id` on `c`: request, answer, the Ack of the answer.
    fn settle(f: &mut Fixture, c: ConnId, id: u64) {
        f.ep.handle_conn_event(c, request(id, 1), f.now);
        f.ep.respond(f.peer, ExchangeId(id), Bytes::from_static(b"r"), f.now)
            .unwrap();
        let ack = Message::Ack {
            exchange: ExchangeId(id),
            attempt: 1,
            of: AckOf::Reply,
        };
        f.ep.handle_conn_event(c, ConnEvent::Message(ack), f.now);
        f.ep.check_invariants();
    }

    /// A responder that remembers one exchange per peer, and a connection of that peer.
    fn one_record_per_peer() -> (Fixture, ConnId) {
        let mut f = fixture(Config {
            dedupe_per_peer: 1,
            ack_delay: Duration::ZERO,
            ..config()
        });
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        (f, c)
    }

    #[test]
    fn a_stale_copy_of_an_evicted_exchange_is_refused_not_delivered_again() {
        let (mut f, c) = one_record_per_peer();
        for id in [10, 11, 12] {
            settle(&mut f, c, id);
        }
        outputs(&mut f.ep);
        assert_eq!(events_of_kind(&mut f.ep, "Request"), 3);
        // Records of 10 and 11 were forgotten for room. A late copy of either is refused
        // with Abort{Settled} (no Ack: it is not accepted), never delivered.
        for stale in [10, 11] {
            f.ep.handle_conn_event(c, request(stale, 3), f.now);
            assert_eq!(
                outputs(&mut f.ep),
                vec![Output::Send {
                    conn: c,
                    peer: f.peer,
                    message: Message::Abort {
                        exchange: ExchangeId(stale),
                        attempt: 3,
                        reason: AbortReason::Settled
                    }
                }]
            );
            assert!(events(&mut f.ep).is_empty());
        }
        assert_eq!(f.ep.stats().settled_refused, 2);
        // 12 is still remembered: a copy is a duplicate, answered from its record.
        f.ep.handle_conn_event(c, request(12, 2), f.now);
        assert!(events(&mut f.ep).is_empty());
        assert_eq!(f.ep.stats().duplicates_dropped, 1);
        // The next exchange is new.
        f.ep.handle_conn_event(c, request(13, 1), f.now);
        assert_eq!(events_of_kind(&mut f.ep, "Request"), 1);
        f.ep.check_invariants();
    }

    #[test]
    fn the_settled_window_follows_a_dialer_that_restarted_into_new_ids() {
        let (mut f, c) = one_record_per_peer();
        let old = 1u64 << 40;
        settle(&mut f, c, old);
        settle(&mut f, c, old + 1);
        // Far below the floor, outside the window: a restarted dialer's new ids (without a
        // store, it starts at a new random place). They are new exchanges.
        let new = old - crate::endpoint::SETTLED_WINDOW - 5;
        settle(&mut f, c, new);
        settle(&mut f, c, new + 1);
        assert_eq!(events_of_kind(&mut f.ep, "Request"), 4);
        assert_eq!(f.ep.stats().settled_refused, 0);
        // The floor followed the new incarnation: a stale copy of its first exchange is
        // refused. Ids wrap: an incarnation that counts past u64::MAX keeps its floor.
        f.ep.handle_conn_event(c, request(new, 2), f.now);
        assert_eq!(f.ep.stats().settled_refused, 1);
        for id in [u64::MAX - 1, u64::MAX, 0, 1] {
            settle(&mut f, c, id);
        }
        f.ep.handle_conn_event(c, request(u64::MAX, 2), f.now);
        f.ep.handle_conn_event(c, request(0, 2), f.now);
        assert_eq!(f.ep.stats().settled_refused, 3);
        assert_eq!(events_of_kind(&mut f.ep, "Request"), 4);
    }

    #[test]
    fn the_settled_window_ends_exactly_at_its_width_and_floors_are_bounded() {
        let (mut f, c) = one_record_per_peer();
        let floor = 1u64 << 40;
        settle(&mut f, c, floor);
        settle(&mut f, c, floor + 1);
        // The last id inside the window is settled; the first outside is new.
        let inside = floor - crate::endpoint::SETTLED_WINDOW + 1;
        f.ep.handle_conn_event(c, request(inside, 2), f.now);
        assert_eq!(f.ep.stats().settled_refused, 1);
        let outside = floor - crate::endpoint::SETTLED_WINDOW;
        f.ep.handle_conn_event(c, request(outside, 1), f.now);
        assert_eq!(f.ep.stats().settled_refused, 1);
        assert_eq!(events_of_kind(&mut f.ep, "Request"), 3);
        // Floors of at most 4 x max_tracked_peers peers: the one raised longest ago goes.
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let peers: Vec<PeerId> = (0..5)
            .map(|_| Keypair::generate(&mut rng).peer_id())
            .collect();
        let mut f = fixture(Config {
            dedupe_per_peer: 1,
            max_tracked_peers: 1,
            ack_delay: Duration::ZERO,
            ..config()
        });
        for (i, peer) in peers.iter().enumerate() {
            f.ep.allow(*peer, crate::allow_list::AllowedPeer::default());
            f.peer = *peer;
            let c = ConnId::inbound(10 + i as u64);
            f.ep.handle_accepted(c, *peer, f.addr, 1 << 20, 0, f.now);
            for id in [1, 2] {
                settle(&mut f, c, id);
            }
            f.ep.handle_conn_event(
                c,
                ConnEvent::Closed(crate::connection::Closed::Io("x".into())),
                f.now,
            );
        }
        let floors: Vec<bool> = peers
            .iter()
            .map(|p| f.ep.settled_floor(p).is_some())
            .collect();
        assert_eq!(
            floors,
            vec![false, true, true, true, true],
            "the oldest floor went"
        );
    }

    fn events_of_kind(ep: &mut Endpoint, kind: &str) -> usize {
        events(ep)
            .iter()
            .filter(|e| format!("{e:?}").starts_with(kind))
            .count()
    }

    #[test]
    fn reply_cache_is_bounded_and_expired_replies_abort() {
        let mut f = fixture(Config {
            reply_cache_bytes: 10,
            ..config()
        });
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c, request(1, 1), f.now);
        f.ep.respond(
            f.peer,
            ExchangeId(1),
            Bytes::from_static(b"0123456789abc"),
            f.now,
        )
        .unwrap();
        f.ep.check_invariants();
        outputs(&mut f.ep);
        // The reply was sent but could not be kept; a resend gets a definite Abort.
        f.ep.handle_conn_event(c, request(1, 2), f.now);
        assert!(outputs(&mut f.ep).contains(&Output::Send {
            conn: c,
            peer: f.peer,
            message: Message::Abort {
                exchange: ExchangeId(1),
                attempt: 2,
                reason: AbortReason::ReplyExpired
            }
        }));
    }

    #[test]
    fn connect_timeout_closes_the_half_open_connection_and_redials() {
        let mut f = fixture(config());
        f.ep.request(f.peer, f.addr, Bytes::from_static(b"x"), f.now)
            .unwrap();
        let Some(Output::Dial { conn, .. }) = f.ep.poll_output() else {
            panic!()
        };
        let deadline = f.ep.poll_timeout().unwrap();
        assert_eq!(deadline, f.now + config().connect_timeout);
        f.ep.handle_timeout(deadline);
        assert_eq!(
            outputs(&mut f.ep),
            // Never established: no Close message goes first, so no peer to name.
            vec![Output::Close {
                conn,
                peer: None,
                reason: CloseReason::Done
            }]
        );
        let retry_at = f.ep.poll_timeout().unwrap();
        let wait = retry_at - deadline;
        assert!(
            wait >= Duration::from_millis(50) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        f.ep.handle_timeout(retry_at);
        assert!(
            matches!(outputs(&mut f.ep).as_slice(), [Output::Dial { conn: c2, .. }] if *c2 != conn)
        );
        assert_eq!(f.ep.stats().redials, 1);
    }

    #[test]
    fn events_for_unknown_connections_are_ignored() {
        let mut f = fixture(config());
        f.ep.handle_conn_event(ConnId::inbound(99), request(1, 1), f.now);
        assert!(outputs(&mut f.ep).is_empty());
        assert!(events(&mut f.ep).is_empty());
    }

    /// Dials `peer` for a new exchange and establishes the connection; returns both ids.
    fn dial_established(f: &mut Fixture, peer: PeerId, addr: SocketAddr) -> (ExchangeId, ConnId) {
        let id = f.ep.request(peer, addr, &b"q"[..], f.now).unwrap();
        let Some(Output::Dial { conn, .. }) = f.ep.poll_output() else {
            panic!("dial")
        };
        f.ep.handle_conn_event(
            conn,
            ConnEvent::Established {
                peer,
                key: [0; 32],
                ticket: None,
                remote_max_message_size: 1 << 20,
                remote_features: 0,
            },
            f.now,
        );
        outputs(&mut f.ep);
        (id, conn)
    }

    fn retried(ep: &mut Endpoint) -> bool {
        outputs(ep)
            .iter()
            .any(|o| matches!(o, Output::Close { .. } | Output::Dial { .. }))
    }

    #[test]
    fn progress_from_the_responder_keeps_the_ack_timer_waiting_for_a_slow_request() {
        let mut f = fixture(config());
        let (id, conn) = {
            let (p, a) = (f.peer, f.addr);
            dial_established(&mut f, p, a)
        };
        let ack = config().ack_timeout;
        // The Request takes many ack timeouts to cross; the responder says it is arriving.
        for step in 1..=10u32 {
            let at = f.now + ack * step / 2;
            f.ep.handle_conn_event(
                conn,
                ConnEvent::Message(Message::Progress {
                    exchange: id,
                    attempt: 1,
                    received: u64::from(step) << 16,
                }),
                at,
            );
            f.ep.handle_timeout(at);
            assert!(
                !retried(&mut f.ep),
                "step {step}: no retry while it arrives"
            );
        }
        // Progress about another attempt changes nothing; silence for ack_timeout after the
        // last one is a lost Request again.
        let last = f.now + ack * 5;
        f.ep.handle_conn_event(
            conn,
            ConnEvent::Message(Message::Progress {
                exchange: id,
                attempt: 7,
                received: 1,
            }),
            last + ack / 2,
        );
        f.ep.handle_timeout(last + ack);
        assert!(retried(&mut f.ep), "silence after the last Progress");
        f.ep.check_invariants();
    }

    #[test]
    fn a_message_still_arriving_keeps_idle_and_reply_timers_waiting() {
        // Responder: a large Request arriving keeps its connection from idling out.
        let mut f = fixture(config());
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(
            c,
            ConnEvent::Receiving {
                kind: Kind::Request,
                exchange: ExchangeId(5),
                attempt: 1,
            },
            f.now,
        );
        let idle = config().idle_timeout;
        f.ep.handle_timeout(f.now + idle * 3);
        assert!(outputs(&mut f.ep).is_empty(), "not closed Idle");
        f.ep.handle_conn_event(c, request(5, 1), f.now + idle * 3);
        assert!(
            events(&mut f.ep)
                .iter()
                .any(|e| matches!(e, Event::Request { .. }))
        );
        // Dialer: a large Reply arriving keeps the reply timer from giving up on it.
        let mut f = fixture(config());
        let (id, conn) = {
            let (p, a) = (f.peer, f.addr);
            dial_established(&mut f, p, a)
        };
        let ack = Message::Ack {
            exchange: id,
            attempt: 1,
            of: AckOf::Request,
        };
        f.ep.handle_conn_event(conn, ConnEvent::Message(ack), f.now);
        f.ep.handle_conn_event(
            conn,
            ConnEvent::Receiving {
                kind: Kind::Reply,
                exchange: id,
                attempt: 1,
            },
            f.now,
        );
        let wait = config().reply_timeout;
        f.ep.handle_timeout(f.now + wait * 3);
        assert!(!retried(&mut f.ep), "no retry while the Reply arrives");
        let reply = Message::Reply {
            exchange: id,
            attempt: 1,
            payload: Bytes::from_static(b"slowly"),
        };
        f.ep.handle_conn_event(conn, ConnEvent::Message(reply), f.now + wait * 3);
        assert!(
            events(&mut f.ep)
                .iter()
                .any(|e| matches!(e, Event::Reply { exchange, .. } if *exchange == id))
        );
        f.ep.check_invariants();
    }

    #[test]
    fn progress_from_the_dialer_keeps_the_reply_unconfirmed_timer_waiting() {
        let mut f = fixture(Config {
            ack_delay: Duration::ZERO,
            ..config()
        });
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c, request(3, 1), f.now);
        f.ep.respond(
            f.peer,
            ExchangeId(3),
            Bytes::from(vec![1u8; 1 << 18]),
            f.now,
        )
        .unwrap();
        let wait = config().reply_ack_timeout;
        for step in 1..=6u32 {
            let at = f.now + wait * step / 2;
            let progress = Message::Progress {
                exchange: ExchangeId(3),
                attempt: 1,
                received: u64::from(step) << 15,
            };
            f.ep.handle_conn_event(c, ConnEvent::Message(progress), at);
            f.ep.handle_timeout(at);
        }
        assert!(
            !events(&mut f.ep)
                .iter()
                .any(|e| matches!(e, Event::ResponseUnconfirmed { .. })),
            "the Reply is still arriving"
        );
        f.ep.handle_timeout(f.now + wait * 3 + wait);
        assert!(
            events(&mut f.ep)
                .iter()
                .any(|e| matches!(e, Event::ResponseUnconfirmed { .. }))
        );
    }

    #[test]
    fn an_oversized_notice_cannot_fail_another_peers_exchange() {
        let mut f = fixture(config());
        let other = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(9)).peer_id();
        f.ep.allow(other, crate::allow_list::AllowedPeer::default());
        let other_addr: SocketAddr = "10.0.0.3:1234".parse().unwrap();
        let (ours, _) = {
            let (p, a) = (f.peer, f.addr);
            dial_established(&mut f, p, a)
        };
        let (_, theirs) = dial_established(&mut f, other, other_addr);
        // The other peer names our exchange with the first peer.
        f.ep.handle_conn_event(
            theirs,
            ConnEvent::Oversized {
                kind: Kind::Reply,
                exchange: Some(ours),
                attempt: Some(1),
                len: 1 << 30,
            },
            f.now,
        );
        let evs = events(&mut f.ep);
        assert!(
            !evs.iter()
                .any(|e| matches!(e, Event::Failed { exchange, .. } if *exchange == ours)),
            "{evs:?}"
        );
        assert!(
            evs.iter()
                .any(|e| matches!(e, Event::PeerError(err) if err.remote().peer == Some(other))),
            "{evs:?}"
        );
        assert!(outputs(&mut f.ep).contains(&Output::Close {
            conn: theirs,
            peer: Some(other),
            reason: CloseReason::ProtocolViolation
        }));
        assert_eq!(f.ep.outbound_in_flight(), 2, "both exchanges live on");
        f.ep.check_invariants();
    }

    #[test]
    fn a_reply_over_our_limit_is_a_violation_naming_the_peer() {
        let mut f = fixture(Config {
            max_message_size: 100,
            ..config()
        });
        let (id, conn) = {
            let (p, a) = (f.peer, f.addr);
            dial_established(&mut f, p, a)
        };
        f.ep.handle_conn_event(
            conn,
            ConnEvent::Message(Message::Reply {
                exchange: id,
                attempt: 1,
                payload: Bytes::from(vec![0u8; 101]),
            }),
            f.now,
        );
        let evs = events(&mut f.ep);
        assert!(
            matches!(
                evs.as_slice(),
                [Event::PeerError(PeerError::Violation { remote, .. }), Event::Failed { failure: Failure::Aborted(AbortReason::ReplyTooLarge), .. }]
                    if remote.peer == Some(f.peer) && remote.addr == f.addr
            ),
            "{evs:?}"
        );
        assert_eq!(
            outputs(&mut f.ep),
            vec![Output::Close {
                conn,
                peer: Some(f.peer),
                reason: CloseReason::ProtocolViolation
            }]
        );
        f.ep.check_invariants();
    }

    #[test]
    fn an_oversized_reply_notice_is_a_violation_naming_the_peer() {
        let mut f = fixture(config());
        let (id, conn) = {
            let (p, a) = (f.peer, f.addr);
            dial_established(&mut f, p, a)
        };
        f.ep.handle_conn_event(
            conn,
            ConnEvent::Oversized {
                kind: Kind::Reply,
                exchange: Some(id),
                attempt: Some(1),
                len: 1 << 30,
            },
            f.now,
        );
        let evs = events(&mut f.ep);
        assert!(
            matches!(
                evs.as_slice(),
                [Event::PeerError(PeerError::Violation { remote, .. }), Event::Failed { .. }]
                    if remote.peer == Some(f.peer) && remote.addr == f.addr
            ),
            "{evs:?}"
        );
        assert_eq!(
            outputs(&mut f.ep),
            vec![Output::Close {
                conn,
                peer: Some(f.peer),
                reason: CloseReason::ProtocolViolation
            }]
        );
    }

    #[test]
    fn a_queued_request_too_large_for_a_reused_connection_does_not_orphan_it() {
        let mut f = fixture(Config {
            reuse_connections: true,
            ..config()
        });
        let (peer, addr) = (f.peer, f.addr);
        let first = f.ep.request(peer, addr, &b"q"[..], f.now).unwrap();
        let Some(Output::Dial { conn, .. }) = f.ep.poll_output() else {
            panic!("dial")
        };
        f.ep.handle_conn_event(
            conn,
            ConnEvent::Established {
                peer,
                key: [0; 32],
                ticket: None,
                remote_max_message_size: 10,
                remote_features: 0,
            },
            f.now,
        );
        f.ep.handle_conn_event(
            conn,
            ConnEvent::Message(Message::Reply {
                exchange: first,
                attempt: 1,
                payload: Bytes::from_static(b"r"),
            }),
            f.now,
        );
        outputs(&mut f.ep);
        // Too large for what the peer advertised on the connection kept for reuse.
        let big = f.ep.request(peer, addr, vec![0u8; 20], f.now).unwrap();
        let evs = events(&mut f.ep);
        assert!(
            evs.iter().any(|e| matches!(e, Event::Failed { exchange, failure: Failure::TooLarge { .. }, .. } if *exchange == big)),
            "{evs:?}"
        );
        f.ep.check_invariants();
        // The connection is still there for the next exchange, and idles out like any.
        assert_eq!(f.ep.open_connections(), 1);
        let later = f.now + config().idle_timeout + Duration::from_secs(1);
        f.ep.handle_timeout(later);
        assert!(outputs(&mut f.ep).contains(&Output::Close {
            conn,
            peer: Some(f.peer),
            reason: CloseReason::Idle
        }));
        assert_eq!(f.ep.open_connections(), 0);
    }

    #[test]
    fn a_new_request_on_a_connection_proves_the_previous_reply_arrived() {
        // With reuse, the dialer's Ack of our Reply is lost, and its next Request comes on
        // the same connection: it must be served, not Nacked Busy until the reply-ack
        // timeout, and the previous reply counts as delivered.
        let mut f = fixture(Config {
            ack_delay: Duration::ZERO,
            ..config()
        });
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c, request(1, 1), f.now);
        f.ep.respond(f.peer, ExchangeId(1), &b"r"[..], f.now)
            .unwrap();
        events(&mut f.ep);
        outputs(&mut f.ep);
        f.ep.handle_conn_event(c, request(2, 1), f.now);
        let evs = events(&mut f.ep);
        assert!(
            evs.contains(&Event::ResponseDelivered {
                peer: f.peer,
                exchange: ExchangeId(1),
                redelivered: false
            }),
            "{evs:?}"
        );
        assert!(
            evs.iter().any(
                |e| matches!(e, Event::Request { exchange, .. } if *exchange == ExchangeId(2))
            ),
            "{evs:?}"
        );
        assert!(!outputs(&mut f.ep).iter().any(|o| matches!(
            o,
            Output::Send {
                message: Message::Nack { .. },
                ..
            }
        )));
        f.ep.check_invariants();
    }

    #[test]
    fn getters_report_what_is_in_flight() {
        let cfg = config();
        let mut f = fixture(cfg.clone());
        assert_eq!(f.ep.config(), &cfg);
        assert!(f.ep.is_idle());
        let (id, conn) = {
            let (p, a) = (f.peer, f.addr);
            dial_established(&mut f, p, a)
        };
        assert!(!f.ep.is_idle(), "an exchange and a connection");
        assert_eq!(
            f.ep.exchange_states(),
            vec![(Direction::Outbound, f.peer, id, "AwaitingAck")]
        );
        assert_eq!(f.ep.peer_of(conn), Some(f.peer));
        // Only the connection is left once the exchange fails: still not idle.
        f.ep.handle_conn_event(
            conn,
            ConnEvent::Message(Message::Abort {
                exchange: id,
                attempt: 1,
                reason: AbortReason::NoResponse,
            }),
            f.now,
        );
        assert!(f.ep.exchange_states().is_empty());
        // An accepted request alone keeps it busy too.
        let mut g = fixture(Config {
            ack_delay: Duration::ZERO,
            ..config()
        });
        let c = ConnId::inbound(1);
        g.ep.handle_accepted(c, g.peer, g.addr, 1 << 20, 0, g.now);
        g.ep.handle_conn_event(c, request(3, 1), g.now);
        assert_eq!(
            g.ep.exchange_states(),
            vec![(
                Direction::Inbound,
                g.peer,
                ExchangeId(3),
                "AwaitingResponse"
            )]
        );
        g.ep.handle_conn_event(
            c,
            ConnEvent::Closed(crate::connection::Closed::Io("gone".into())),
            g.now,
        );
        assert_eq!(g.ep.open_connections(), 0);
        assert!(!g.ep.is_idle(), "a request still awaits the application");
    }

    #[test]
    fn an_accepted_connection_must_be_new_and_inbound() {
        let mut f = fixture(config());
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        outputs(&mut f.ep);
        // The driver handing over an outbound id, or the same id twice, is refused.
        for bad in [ConnId::outbound_for_tests(1), c] {
            f.ep.handle_accepted(bad, f.peer, f.addr, 1 << 20, 0, f.now);
            assert_eq!(
                outputs(&mut f.ep),
                vec![Output::Close {
                    conn: bad,
                    peer: Some(f.peer),
                    reason: CloseReason::ProtocolViolation
                }]
            );
        }
        assert_eq!(f.ep.open_connections(), 1);
        assert!(c.is_inbound() && !ConnId::outbound_for_tests(1).is_inbound());
        assert_eq!(
            (
                c.to_string(),
                format!("{:?}", ConnId::outbound_for_tests(7))
            ),
            ("i1".to_owned(), "c7".to_owned())
        );
    }

    #[test]
    fn an_abort_code_we_do_not_know_still_ends_the_exchange() {
        // How a peer built before `Refused` (code 5) reads it: as `Other`, and final.
        let mut f = fixture(config());
        let (peer, addr) = (f.peer, f.addr);
        let (id, conn) = dial_established(&mut f, peer, addr);
        f.ep.handle_conn_event(
            conn,
            ConnEvent::Message(Message::Abort {
                exchange: id,
                attempt: 1,
                reason: AbortReason::from_code(200),
            }),
            f.now,
        );
        let failed: Vec<Event> = events(&mut f.ep)
            .into_iter()
            .filter(|e| matches!(e, Event::Failed { .. }))
            .collect();
        assert!(
            matches!(
                failed.as_slice(),
                [Event::Failed { exchange, failure: Failure::Aborted(AbortReason::Other(200)), .. }]
                    if *exchange == id
            ),
            "{failed:?}"
        );
        assert_eq!(f.ep.outbound_in_flight(), 0);
    }

    fn fail_msg(exchange: ExchangeId, attempt: u32) -> ConnEvent {
        ConnEvent::Message(Message::Nack {
            exchange,
            attempt,
            reason: NackReason::Busy,
            retry_after_ms: 0,
        })
    }

    #[test]
    fn a_handshake_timeout_is_a_retry_not_a_peer_error() {
        let mut f = fixture(config());
        let id = f.ep.request(f.peer, f.addr, &b"q"[..], f.now).unwrap();
        let Some(Output::Dial { conn, .. }) = f.ep.poll_output() else {
            panic!("dial")
        };
        let remote = crate::connection::Remote {
            addr: f.addr,
            peer: Some(f.peer),
        };
        let closed =
            crate::connection::Closed::Error(crate::connection::ConnError::HandshakeTimeout {
                remote,
            });
        f.ep.handle_conn_event(conn, ConnEvent::Closed(closed), f.now);
        assert!(
            events(&mut f.ep).is_empty(),
            "no peer error, no failure yet"
        );
        assert_eq!(f.ep.outbound_in_flight(), 1);
        let _ = id;
    }

    #[test]
    fn counters_count() {
        let mut f = fixture(Config {
            ack_delay: Duration::ZERO,
            max_pending_inbound: 1,
            ..config()
        });
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c, request(1, 1), f.now);
        let c2 = ConnId::inbound(2);
        f.ep.handle_accepted(c2, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c2, request(2, 1), f.now); // Busy: the inbox holds one.
        let stats = f.ep.stats().clone();
        assert_eq!((stats.requests_delivered, stats.nacks_sent), (1, 1));
    }

    #[test]
    fn a_peer_with_a_live_request_is_not_forgotten_to_track_another() {
        let mut f = fixture(Config {
            ack_delay: Duration::ZERO,
            max_tracked_peers: 1,
            ..config()
        });
        let other = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(9)).peer_id();
        f.ep.allow(other, crate::allow_list::AllowedPeer::default());
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c, request(1, 1), f.now);
        f.ep.handle_conn_event(
            c,
            ConnEvent::Closed(crate::connection::Closed::Io("x".into())),
            f.now,
        );
        outputs(&mut f.ep);
        // The first peer has no connection but its request awaits our answer: the other
        // peer cannot be tracked, and the answer still goes through.
        let c2 = ConnId::inbound(2);
        f.ep.handle_accepted(c2, other, f.addr, 1 << 20, 0, f.now);
        assert_eq!(f.ep.peer_of(c2), None, "no room for another peer");
        assert_eq!(f.ep.pending_request_from(&f.peer), Some(ExchangeId(1)));
        f.ep.respond(f.peer, ExchangeId(1), &b"r"[..], f.now)
            .unwrap();
        f.ep.check_invariants();
        // Once it is done, the slot can go to the other peer.
        let now = f.now + Duration::from_secs(60);
        f.ep.handle_timeout(now);
        events(&mut f.ep);
        let c3 = ConnId::inbound(3);
        f.ep.handle_accepted(c3, other, f.addr, 1 << 20, 0, now);
        assert_eq!(f.ep.peer_of(c3), Some(other));
        // Forgetting the first peer's finished exchange cancels nothing.
        assert!(
            !events(&mut f.ep)
                .iter()
                .any(|e| matches!(e, Event::ResponseCancelled { .. }))
        );
    }

    #[test]
    fn backoff_is_jittered_within_half_to_full_base() {
        let mut delays = Vec::new();
        for seed in 0..6u8 {
            // Each endpoint draws its jitter from its own seed.
            let mut f = fixture(config());
            f.ep = Endpoint::new(
                config(),
                f.ep.local_peer_id(),
                AllowList::from_peers([f.peer]),
                [seed; 32],
            )
            .unwrap();
            let (id, conn) = {
                let (p, a) = (f.peer, f.addr);
                dial_established(&mut f, p, a)
            };
            f.ep.handle_conn_event(conn, fail_msg(id, 1), f.now);
            let delay = f.ep.poll_timeout().unwrap() - f.now;
            let base = config().backoff_initial;
            assert!(delay >= base / 2 && delay <= base, "{delay:?}");
            delays.push(delay);
        }
        delays.dedup();
        assert!(delays.len() > 1, "jitter varies: {delays:?}");
    }

    #[test]
    fn revoking_a_peer_fails_its_active_and_queued_exchanges_without_dialing() {
        let mut f = fixture(config());
        let (peer, addr) = (f.peer, f.addr);
        let ids: Vec<ExchangeId> = (0..3)
            .map(|_| f.ep.request(peer, addr, &b"q"[..], f.now).unwrap())
            .collect();
        outputs(&mut f.ep);
        f.ep.revoke(&peer, f.now);
        assert!(
            !outputs(&mut f.ep)
                .iter()
                .any(|o| matches!(o, Output::Dial { .. })),
            "nothing new starts"
        );
        let mut failed: Vec<ExchangeId> = events(&mut f.ep)
            .into_iter()
            .filter_map(|e| match e {
                Event::Failed {
                    exchange,
                    failure: Failure::Revoked,
                    ..
                } => Some(exchange),
                _ => None,
            })
            .collect();
        failed.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(failed, want);
        f.ep.check_invariants();
    }

    #[test]
    fn a_reply_over_our_limit_fails_as_such_even_on_the_last_attempt() {
        let mut f = fixture(Config {
            max_message_size: 100,
            max_attempts: 1,
            ..config()
        });
        let (id, conn) = {
            let (p, a) = (f.peer, f.addr);
            dial_established(&mut f, p, a)
        };
        let big = ConnEvent::Message(Message::Reply {
            exchange: id,
            attempt: 1,
            payload: Bytes::from(vec![0u8; 101]),
        });
        f.ep.handle_conn_event(conn, big, f.now);
        assert!(events(&mut f.ep).iter().any(|e| matches!(
            e,
            Event::Failed {
                failure: Failure::Aborted(AbortReason::ReplyTooLarge),
                ..
            }
        )));
    }

    #[test]
    fn a_peer_cannot_answer_for_another_peers_exchange() {
        let mut f = fixture(config());
        let other = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(9)).peer_id();
        f.ep.allow(other, crate::allow_list::AllowedPeer::default());
        let (ours, _) = {
            let (p, a) = (f.peer, f.addr);
            dial_established(&mut f, p, a)
        };
        let (_, theirs) = dial_established(&mut f, other, "10.0.0.3:1".parse().unwrap());
        for message in [
            Message::Abort {
                exchange: ours,
                attempt: 1,
                reason: AbortReason::NoResponse,
            },
            Message::Reply {
                exchange: ours,
                attempt: 1,
                payload: Bytes::from_static(b"forged"),
            },
            Message::Nack {
                exchange: ours,
                attempt: 1,
                reason: NackReason::TooLarge,
                retry_after_ms: 0,
            },
        ] {
            f.ep.handle_conn_event(theirs, ConnEvent::Message(message), f.now);
        }
        assert!(
            !events(&mut f.ep).iter().any(|e| matches!(
                e,
                Event::Failed { exchange, .. } | Event::Reply { exchange, .. } if *exchange == ours
            )),
            "the other peer ended our exchange with the first"
        );
    }

    #[test]
    fn only_an_ack_of_a_sent_attempt_on_its_connection_moves_the_exchange_on() {
        let mut f = fixture(config());
        let (id, conn) = {
            let (p, a) = (f.peer, f.addr);
            dial_established(&mut f, p, a)
        };
        let ack = |attempt| {
            ConnEvent::Message(Message::Ack {
                exchange: id,
                attempt,
                of: AckOf::Request,
            })
        };
        let state = |f: &Fixture| f.ep.exchange_states()[0].3;
        // A future attempt, and a stale Nack, change nothing.
        f.ep.handle_conn_event(conn, ack(5), f.now);
        f.ep.handle_conn_event(conn, fail_msg(id, 7), f.now);
        assert_eq!(state(&f), "AwaitingAck");
        assert_eq!(f.ep.stats().nacks_received, 0);
        // The Ack of the attempt sent does.
        f.ep.handle_conn_event(conn, ack(1), f.now);
        assert_eq!(state(&f), "AwaitingReply");
    }

    #[test]
    fn informational_events_are_only_peer_errors_and_rate_limits() {
        let peer = fixture(config()).peer;
        let x = ExchangeId(1);
        assert!(
            Event::RateLimited {
                peer,
                limit: LimitKind::Requests,
                disconnected: false
            }
            .is_priority()
        );
        assert!(
            Event::PeerError(PeerError::RateLimitAbuse {
                remote: crate::connection::Remote {
                    addr: "10.0.0.1:1".parse().unwrap(),
                    peer: None
                },
                strikes: 1
            })
            .is_priority()
        );
        for outcome in [
            Event::ResponseDelivered {
                peer,
                exchange: x,
                redelivered: false,
            },
            Event::ResponseTimedOut {
                peer,
                exchange: x,
                redelivered: false,
            },
            Event::ResponseCancelled {
                peer,
                exchange: x,
                redelivered: false,
            },
            Event::Failed {
                peer,
                exchange: x,
                payload: Bytes::new(),
                failure: Failure::Revoked,
                redelivered: false,
            },
        ] {
            assert!(!outcome.is_priority(), "{outcome:?}");
        }
    }

    #[test]
    fn a_resent_request_on_a_new_connection_frees_the_old_one() {
        let mut f = fixture(Config {
            ack_delay: Duration::ZERO,
            ..config()
        });
        let (c1, c2) = (ConnId::inbound(1), ConnId::inbound(2));
        f.ep.handle_accepted(c1, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c1, request(1, 1), f.now);
        f.ep.handle_accepted(c2, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c2, request(1, 2), f.now);
        f.ep.check_invariants();
        // The same copy again on the same connection keeps it.
        f.ep.handle_conn_event(c2, request(1, 3), f.now);
        f.ep.check_invariants();
        let later = f.now + config().idle_timeout + Duration::from_millis(1);
        f.ep.handle_timeout(later);
        let closed: Vec<ConnId> = outputs(&mut f.ep)
            .into_iter()
            .filter_map(|o| match o {
                Output::Close { conn, .. } => Some(conn),
                _ => None,
            })
            .collect();
        assert!(closed.contains(&c1) && !closed.contains(&c2), "{closed:?}");
    }

    #[test]
    fn the_reply_cache_keeps_exactly_its_budget() {
        // Two 10-byte replies fit a 20-byte budget; a third evicts the oldest.
        let mut f = fixture(Config {
            ack_delay: Duration::ZERO,
            reply_cache_bytes: 20,
            ..config()
        });
        for n in 1..=3u64 {
            let c = ConnId::inbound(n);
            f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
            f.ep.handle_conn_event(c, request(n, 1), f.now);
            f.ep.respond(f.peer, ExchangeId(n), vec![0u8; 10], f.now)
                .unwrap();
            f.ep.check_invariants();
            outputs(&mut f.ep);
            if n == 2 {
                // Both still answer a resend from the cache.
                f.ep.handle_conn_event(c, request(1, 2), f.now);
                assert!(outputs(&mut f.ep).iter().any(|o| matches!(o, Output::Send { message: Message::Reply { exchange, .. }, .. } if *exchange == ExchangeId(1))));
            }
        }
        let c = ConnId::inbound(9);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c, request(1, 3), f.now);
        assert!(outputs(&mut f.ep).iter().any(|o| matches!(
            o,
            Output::Send {
                message: Message::Abort {
                    reason: AbortReason::ReplyExpired,
                    ..
                },
                ..
            }
        )));
    }

    #[test]
    fn a_failure_says_how_the_connection_ended() {
        let mut f = fixture(Config {
            max_attempts: 1,
            ..config()
        });
        let (_, conn) = {
            let (p, a) = (f.peer, f.addr);
            dial_established(&mut f, p, a)
        };
        let closed = crate::connection::Closed::ByPeer(CloseReason::ShuttingDown);
        f.ep.handle_conn_event(conn, ConnEvent::Closed(closed), f.now);
        let evs = events(&mut f.ep);
        assert!(
            matches!(
                evs.as_slice(),
                [Event::Failed { failure: Failure::Exhausted { last: RetryCause::ConnectionLost(why), .. }, .. }]
                    if why == "closed by peer: ShuttingDown"
            ),
            "{evs:?}"
        );
    }

    #[test]
    fn another_connection_closing_does_not_lose_the_one_kept_for_reuse() {
        let mut f = fixture(Config {
            reuse_connections: true,
            ..config()
        });
        let (id, conn) = {
            let (p, a) = (f.peer, f.addr);
            dial_established(&mut f, p, a)
        };
        let reply = ConnEvent::Message(Message::Reply {
            exchange: id,
            attempt: 1,
            payload: Bytes::from_static(b"r"),
        });
        f.ep.handle_conn_event(conn, reply, f.now);
        outputs(&mut f.ep);
        // The peer dials us too, and that connection ends.
        let inbound = ConnId::inbound(1);
        f.ep.handle_accepted(inbound, f.peer, f.addr, 1 << 20, 0, f.now);
        let gone = crate::connection::Closed::Io("reset".into());
        f.ep.handle_conn_event(inbound, ConnEvent::Closed(gone), f.now);
        // Our next request still goes on the kept connection, without a dial.
        f.ep.request(f.peer, f.addr, &b"again"[..], f.now).unwrap();
        let outs = outputs(&mut f.ep);
        assert!(
            matches!(outs.as_slice(), [Output::Send { conn: c, message: Message::Request { .. }, .. }] if *c == conn),
            "{outs:?}"
        );
    }

    #[test]
    fn forgetting_an_unconfirmed_reply_for_dedupe_room_releases_its_cache() {
        let mut f = fixture(Config {
            ack_delay: Duration::ZERO,
            dedupe_per_peer: 1,
            ..config()
        });
        let c = ConnId::inbound(1);
        f.ep.handle_accepted(c, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c, request(1, 1), f.now);
        f.ep.respond(f.peer, ExchangeId(1), vec![0u8; 10], f.now)
            .unwrap();
        // No Ack of the Reply: it becomes unconfirmed, still cached.
        let later = f.now + config().reply_ack_timeout + Duration::from_millis(1);
        f.ep.handle_timeout(later);
        f.ep.check_invariants();
        // A new request needs the one dedupe slot: the unconfirmed record goes, and its
        // cached reply with it.
        f.ep.handle_conn_event(c, request(2, 1), later);
        f.ep.check_invariants();
        assert!(
            events(&mut f.ep).iter().any(
                |e| matches!(e, Event::Request { exchange, .. } if *exchange == ExchangeId(2))
            )
        );
    }

    #[test]
    fn an_ack_of_our_reply_on_another_connection_releases_the_replys_connection() {
        let mut f = fixture(Config {
            ack_delay: Duration::ZERO,
            ..config()
        });
        let (c1, c2) = (ConnId::inbound(1), ConnId::inbound(2));
        f.ep.handle_accepted(c1, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(c1, request(7, 1), f.now);
        f.ep.respond(f.peer, ExchangeId(7), &b"r"[..], f.now)
            .unwrap();
        outputs(&mut f.ep);
        // The dialer redialed and acknowledges the Reply on its new connection.
        f.ep.handle_accepted(c2, f.peer, f.addr, 1 << 20, 0, f.now);
        f.ep.handle_conn_event(
            c2,
            ConnEvent::Message(Message::Ack {
                exchange: ExchangeId(7),
                attempt: 1,
                of: AckOf::Reply,
            }),
            f.now,
        );
        f.ep.check_invariants();
        // Both connections now idle out.
        let later = f.now + config().idle_timeout + Duration::from_secs(1);
        f.ep.handle_timeout(later);
        let closes: Vec<ConnId> = outputs(&mut f.ep)
            .into_iter()
            .filter_map(|o| match o {
                Output::Close { conn, .. } => Some(conn),
                _ => None,
            })
            .collect();
        assert_eq!(closes, vec![c1, c2]);
        assert_eq!(f.ep.open_connections(), 0);
    }
}

/// A node whose endpoint (and config) is replaced by one with `config`.
fn reconfigure(net: &mut Net, node: usize, config: Config) {
    net.nodes[node].config = config.clone();
    net.nodes[node].endpoint = crate::endpoint::Endpoint::new(
        config,
        net.id(node),
        net.nodes[node].allow.clone(),
        [node as u8 + 40; 32],
    )
    .unwrap();
}

#[test]
fn reply_over_the_dialers_limit_is_aborted_and_both_sides_told() {
    let mut net = net(&["alice", "bob"]);
    reconfigure(
        &mut net,
        ALICE,
        Config {
            max_message_size: 4,
            ..config()
        },
    );
    net.nodes[BOB].app = App::Manual;
    let id = net.request(ALICE, BOB, b"ping");
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    let alice = net.id(ALICE);
    let refused = net.try_respond(BOB, alice, id, b"too long");
    assert_eq!(refused, Err(RespondError::TooLarge { len: 8, max: 4 }));
    net.run(secs(30));
    // The dialer fails at once with the documented reason, without resending.
    assert_eq!(
        net.failures(ALICE)
            .into_iter()
            .map(|(x, f, _)| (x, f))
            .collect::<Vec<_>>(),
        vec![(id, Failure::Aborted(AbortReason::ReplyTooLarge))]
    );
    assert_eq!(net.outcomes(ALICE, id), 1);
    assert_eq!(net.nodes[ALICE].endpoint.stats().resends, 0);
    // The responder's application gets the exchange's one outcome.
    let ends: Vec<&Event> = net.nodes[BOB]
        .events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::ResponseAborted { .. }
                    | Event::ResponseDelivered { .. }
                    | Event::ResponseTimedOut { .. }
                    | Event::ResponseUnconfirmed { .. }
            )
        })
        .collect();
    assert_eq!(
        ends,
        vec![&Event::ResponseAborted {
            peer: net.id(ALICE),
            exchange: id,
            reason: AbortReason::ReplyTooLarge,
            redelivered: false
        }]
    );
    // It is over: a second answer is refused.
    assert_eq!(
        net.try_respond(BOB, alice, id, b"ok"),
        Err(RespondError::NotPending {
            peer: alice,
            exchange: id
        })
    );
}

#[test]
fn reply_limit_is_the_dialers_even_after_its_connection_closed() {
    // Alice accepts 4 bytes; her connection is gone when Bob's application answers. The
    // check must still use what Alice advertised, not Bob's own (much larger) limit.
    let mut net = net(&["alice", "bob"]);
    reconfigure(
        &mut net,
        ALICE,
        Config {
            max_message_size: 4,
            ..config()
        },
    );
    net.nodes[BOB].app = App::Manual;
    let id = net.request(ALICE, BOB, b"ping");
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    net.crash(ALICE);
    assert_eq!(net.nodes[BOB].endpoint.open_connections(), 0);
    let alice = net.id(ALICE);
    let refused = net.try_respond(BOB, alice, id, b"too long");
    assert_eq!(refused, Err(RespondError::TooLarge { len: 8, max: 4 }));
}

/// The inbound outcome events `node` saw for `exchange`.
fn inbound_outcomes(net: &Net, node: usize, exchange: ExchangeId) -> Vec<Event> {
    net.nodes[node]
        .events
        .iter()
        .filter(|e| match e {
            Event::ResponseAborted { exchange: x, .. }
            | Event::ResponseCancelled { exchange: x, .. }
            | Event::ResponseDelivered { exchange: x, .. }
            | Event::ResponseTimedOut { exchange: x, .. }
            | Event::ResponseUnconfirmed { exchange: x, .. } => *x == exchange,
            _ => false,
        })
        .cloned()
        .collect()
}

#[test]
fn shutdown_gives_a_delivered_request_its_one_outcome() {
    let mut net = net(&["alice", "bob"]);
    net.nodes[BOB].app = App::Manual;
    let id = net.request(ALICE, BOB, b"ping");
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    net.shutdown(BOB);
    net.run(secs(30));
    assert_eq!(
        inbound_outcomes(&net, BOB, id),
        vec![Event::ResponseAborted {
            peer: net.id(ALICE),
            exchange: id,
            reason: AbortReason::ShuttingDown,
            redelivered: false
        }]
    );
    assert_eq!(
        net.failures(ALICE)[0].1,
        Failure::Aborted(AbortReason::ShuttingDown)
    );
}

#[test]
fn revoking_a_peer_gives_its_delivered_request_its_one_outcome() {
    let mut net = net(&["alice", "bob"]);
    net.nodes[BOB].app = App::Manual;
    let id = net.request(ALICE, BOB, b"ping");
    net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
    let (alice, now) = (net.id(ALICE), net.now);
    assert!(net.nodes[BOB].endpoint.revoke(&alice, now));
    net.run(secs(30));
    assert_eq!(
        inbound_outcomes(&net, BOB, id),
        vec![Event::ResponseCancelled {
            peer: alice,
            exchange: id,
            redelivered: false
        }]
    );
    assert_eq!(
        net.try_respond(BOB, alice, id, b"late"),
        Err(RespondError::NotPending {
            peer: alice,
            exchange: id
        })
    );
}

/// Durable nodes: crashes at each point of an exchange, on each side.
mod durable {
    use super::*;
    use crate::allow_list::{AllowList, AllowedPeer};
    use crate::connection::ConnEvent;
    use crate::durable::{self as store, Recovered};
    use crate::endpoint::{ConnId, Endpoint};
    use crate::identity::Keypair;
    use crate::wire::Message;
    use std::net::SocketAddr;
    use std::time::Instant;

    fn durable_pair() -> Net {
        let mut net = pair();
        net.make_durable(ALICE);
        net.make_durable(BOB);
        net
    }

    fn delivered(net: &Net, node: usize, id: ExchangeId) -> (usize, usize) {
        let mut fresh = 0;
        let mut again = 0;
        for e in &net.nodes[node].events {
            if let Event::Request {
                exchange,
                redelivered,
                ..
            } = e
                && *exchange == id
            {
                if *redelivered {
                    again += 1;
                } else {
                    fresh += 1;
                }
            }
        }
        (fresh, again)
    }

    #[test]
    fn a_responder_down_for_a_minute_does_not_fail_an_exchange_with_the_defaults() {
        let mut net = Net::new(7, &["alice", "bob"], Config::default());
        net.crash(BOB);
        let id = net.request(ALICE, BOB, b"patience");
        net.run_for(secs(60));
        assert!(!net.has_outcome(ALICE, id), "still trying after 60 s");
        net.restart(BOB);
        net.run(secs(120));
        assert_eq!(
            net.replies(ALICE),
            vec![(id, Bytes::from_static(b"re:patience"))]
        );
        // Dials every few seconds meanwhile, backoff capped at backoff_max.
        let dials = net.nodes[ALICE].endpoint.stats().dials;
        assert!((10..=40).contains(&dials), "{dials} dials");
    }

    #[test]
    fn a_deadline_of_hours_outlives_attempts_and_restarts_of_the_dialer() {
        let mut net = durable_pair();
        net.partition(ALICE, BOB);
        let id = net
            .request_with(ALICE, BOB, b"eventually", None, Some(secs(3 * 3600)))
            .unwrap();
        // Far past max_attempts and the exchange budget: still trying.
        net.run_for(secs(1800));
        assert!(!net.has_outcome(ALICE, id));
        net.crash(ALICE);
        net.run_for(secs(1800));
        net.restart(ALICE);
        net.run_for(secs(60));
        assert!(
            !net.has_outcome(ALICE, id),
            "the deadline came back with it"
        );
        // Down past the deadline: it fails at once when the node comes back.
        net.crash(ALICE);
        net.run_for(secs(2 * 3600));
        net.restart(ALICE);
        net.run_for(secs(1));
        let failures = net.failures(ALICE);
        assert!(
            matches!(&failures[..], [(x, Failure::DeadlineExceeded, p)] if *x == id && &p[..] == b"eventually"),
            "{failures:?}"
        );
        net.repair(ALICE, BOB);
        net.run(secs(60));
        assert!(net.requests_seen(BOB).is_empty());
    }

    #[test]
    fn an_acknowledgment_is_remembered_across_a_restart_of_the_dialer() {
        let mut net = durable_pair();
        net.nodes[BOB].app = App::Manual;
        let id = net.request(ALICE, BOB, b"q");
        net.run_until(secs(5), |n| n.trace.iter().any(|l| l.contains("<- Ack")));
        net.crash(ALICE);
        net.partition(ALICE, BOB);
        net.restart(ALICE);
        net.run(secs(600));
        let failures = net.failures(ALICE);
        assert!(
            matches!(
                &failures[..],
                [(x, Failure::Exhausted { request_acked: true, .. }, _)] if *x == id
            ),
            "Bob's application has it, and Alice still knows: {failures:?}"
        );
    }

    #[test]
    fn an_idempotency_key_names_an_exchange_across_a_crash_of_its_dialer() {
        let mut net = durable_pair();
        net.nodes[BOB].app = App::Manual;
        let (alice, bob) = (net.id(ALICE), net.id(BOB));
        let id = net
            .request_with(ALICE, BOB, b"pay 5", Some(b"invoice-9"), None)
            .unwrap();
        // A second live request with the key is refused, naming the first.
        let again = net.request_with(ALICE, BOB, b"pay 5", Some(b"invoice-9"), None);
        assert!(
            matches!(&again, Err(RequestError::KeyInUse { exchange, finished: false, .. }) if *exchange == id),
            "{again:?}"
        );
        // Other keys, and the same key to another peer, are other exchanges.
        let queued = net
            .request_with(ALICE, BOB, b"pay 6", Some(b"invoice-10"), None)
            .unwrap();
        assert_eq!(
            net.nodes[ALICE].endpoint.lookup(bob, b"invoice-10"),
            Some(crate::endpoint::KeyedExchange::Queued { exchange: queued })
        );
        assert_eq!(net.nodes[ALICE].endpoint.lookup(alice, b"invoice-9"), None);
        net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
        // The application dies right after `request` returned, before it stored the id.
        net.crash(ALICE);
        net.restart(ALICE);
        assert!(matches!(
            net.nodes[ALICE].endpoint.lookup(bob, b"invoice-9"),
            Some(crate::endpoint::KeyedExchange::InFlight { exchange, .. }) if exchange == id
        ));
        // Finished: the outcome is told by key until the application settles it (here it
        // never takes it, as if it died each time before it could).
        net.nodes[ALICE].takes_outcomes = false;
        net.respond(BOB, alice, id, b"paid");
        net.run_until(secs(30), |n| n.has_outcome(ALICE, id));
        net.crash(ALICE);
        net.restart(ALICE);
        let found = net.nodes[ALICE].endpoint.lookup(bob, b"invoice-9");
        assert!(
            matches!(&found, Some(crate::endpoint::KeyedExchange::Finished(Event::Reply { exchange, payload, .. })) if *exchange == id && &payload[..] == b"paid"),
            "{found:?}"
        );
        let again = net.request_with(ALICE, BOB, b"pay 5", Some(b"invoice-9"), None);
        assert!(matches!(
            again,
            Err(RequestError::KeyInUse { finished: true, .. })
        ));
        net.nodes[ALICE].endpoint.outcome_settled(id);
        net.commit(ALICE);
        assert_eq!(net.nodes[ALICE].endpoint.lookup(bob, b"invoice-9"), None);
        net.crash(ALICE);
        net.restart(ALICE);
        assert_eq!(net.nodes[ALICE].endpoint.lookup(bob, b"invoice-9"), None);
        assert!(
            net.request_with(ALICE, BOB, b"pay 7", Some(b"invoice-9"), None)
                .is_ok()
        );
        // Keys are 1 to MAX_KEY_LEN bytes.
        for bad in [&b""[..], &[b'k'; crate::endpoint::MAX_KEY_LEN + 1][..]] {
            let key = Box::leak(bad.to_vec().into_boxed_slice());
            let refused = net.request_with(ALICE, BOB, b"x", Some(key), None);
            assert!(
                matches!(refused, Err(RequestError::BadKey { .. })),
                "{refused:?}"
            );
        }
        let longest = Box::leak(vec![b'k'; crate::endpoint::MAX_KEY_LEN].into_boxed_slice());
        assert!(
            net.request_with(ALICE, BOB, b"x", Some(longest), None)
                .is_ok()
        );
    }

    #[test]
    fn an_unconfirmed_reply_is_reported_once_whatever_the_restarts() {
        let mut net = durable_pair();
        net.rules.push(
            Rule::new(ALICE, BOB, Kind::Ack, Action::Drop)
                .ack_of(AckOf::Reply)
                .times(100),
        );
        let id = net.request(ALICE, BOB, b"q");
        net.run(secs(30));
        let unconfirmed = |net: &Net| {
            net.nodes[BOB]
                .events
                .iter()
                .filter(
                    |e| matches!(e, Event::ResponseUnconfirmed { exchange, .. } if *exchange == id),
                )
                .count()
        };
        assert_eq!(unconfirmed(&net), 1);
        for _ in 0..3 {
            net.crash(BOB);
            net.restart(BOB);
            net.run(secs(30));
        }
        assert_eq!(unconfirmed(&net), 1);
    }

    #[test]
    fn a_request_the_application_confirmed_is_answerable_but_not_redelivered() {
        let mut net = durable_pair();
        net.nodes[BOB].app = App::Manual;
        let alice = net.id(ALICE);
        let id = net.request(ALICE, BOB, b"store me");
        net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
        assert!(net.nodes[BOB].endpoint.confirm_request(alice, id));
        assert!(!net.nodes[BOB].endpoint.confirm_request(alice, id), "once");
        net.commit(BOB);
        net.crash(BOB);
        net.restart(BOB);
        let (fresh, again) = delivered(&net, BOB, id);
        assert_eq!((fresh, again), (1, 0), "not delivered again");
        net.respond(BOB, alice, id, b"from my own storage");
        net.run(secs(30));
        assert_eq!(
            net.replies(ALICE),
            vec![(id, Bytes::from_static(b"from my own storage"))]
        );
    }

    #[test]
    fn the_settled_floor_survives_a_restart_of_the_responder() {
        let mut net = Net::new(
            7,
            &["alice", "bob"],
            Config {
                dedupe_per_peer: 1,
                ..config()
            },
        );
        net.make_durable(BOB);
        let ids: Vec<ExchangeId> = (0..3).map(|_| net.request(ALICE, BOB, b"q")).collect();
        net.run(secs(30));
        let alice = net.id(ALICE);
        assert_eq!(net.nodes[BOB].endpoint.settled_floor(&alice), Some(ids[1]));
        net.crash(BOB);
        net.restart(BOB);
        assert_eq!(net.nodes[BOB].endpoint.settled_floor(&alice), Some(ids[1]));
        // Raised again after the restart: the old row gives way to the new one.
        net.request(ALICE, BOB, b"q");
        net.run(secs(30));
        assert_eq!(net.nodes[BOB].endpoint.settled_floor(&alice), Some(ids[2]));
        net.crash(BOB);
        net.restart(BOB);
        assert_eq!(net.nodes[BOB].endpoint.settled_floor(&alice), Some(ids[2]));
    }

    #[test]
    fn a_request_acknowledged_but_unanswered_is_redelivered_after_the_responder_restarts() {
        let mut net = durable_pair();
        net.nodes[BOB].app = App::Manual;
        let id = net.request(ALICE, BOB, b"q");
        net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
        net.crash(BOB);
        net.restart(BOB);
        assert_eq!(
            delivered(&net, BOB, id),
            (1, 1),
            "delivered, then redelivered"
        );
        net.respond(BOB, net.id(ALICE), id, b"answer");
        net.run(secs(60));
        assert_eq!(
            net.replies(ALICE),
            vec![(id, Bytes::from_static(b"answer"))]
        );
        assert_eq!(net.outcomes(ALICE, id), 1);
    }

    #[test]
    fn a_request_answered_before_the_crash_is_answered_from_the_store_and_never_redelivered() {
        let mut net = durable_pair();
        net.nodes[BOB].app = App::Manual;
        // The Reply is lost, then Bob dies: only his store remembers the answer.
        net.rules
            .push(Rule::new(BOB, ALICE, Kind::Reply, Action::Drop).times(1));
        let id = net.request(ALICE, BOB, b"q");
        net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
        net.respond(BOB, net.id(ALICE), id, b"stored answer");
        net.crash(BOB);
        net.restart(BOB);
        net.run(secs(60));
        assert_eq!(delivered(&net, BOB, id), (1, 0));
        assert_eq!(
            net.replies(ALICE),
            vec![(id, Bytes::from_static(b"stored answer"))]
        );
        assert!(net.nodes[BOB].endpoint.stats().replies_from_cache >= 1);
    }

    #[test]
    fn the_dialer_resumes_its_exchange_under_the_same_id_after_a_restart() {
        let mut net = durable_pair();
        net.partition(ALICE, BOB);
        let id = net.request(ALICE, BOB, b"survive me");
        net.run_for(Duration::from_millis(300));
        net.crash(ALICE);
        net.repair(ALICE, BOB);
        net.restart(ALICE);
        net.run(secs(60));
        assert_eq!(
            net.replies(ALICE),
            vec![(id, Bytes::from_static(b"re:survive me"))]
        );
        assert_eq!(delivered(&net, BOB, id), (1, 0));
    }

    #[test]
    fn a_dialer_restarted_after_the_responder_had_its_request_gets_the_one_reply() {
        // Bob has the request (and answers it); Alice dies before the Reply reaches her and
        // resends the same id when she is back: Bob answers from his record.
        let mut net = durable_pair();
        net.rules
            .push(Rule::new(BOB, ALICE, Kind::Reply, Action::Drop).times(1));
        let id = net.request(ALICE, BOB, b"q");
        net.run_until(secs(5), |n| !n.requests_seen(BOB).is_empty());
        net.run_for(Duration::from_millis(100));
        net.crash(ALICE);
        net.restart(ALICE);
        net.run(secs(60));
        assert_eq!(net.outcomes(ALICE, id), 1);
        assert_eq!(net.replies(ALICE), vec![(id, Bytes::from_static(b"re:q"))]);
        assert_eq!(delivered(&net, BOB, id), (1, 0));
    }

    #[test]
    fn an_outcome_the_application_did_not_take_is_handed_out_after_a_restart() {
        let mut net = durable_pair();
        net.nodes[ALICE].takes_outcomes = false;
        net.crash(BOB);
        let id = net.request(ALICE, BOB, b"to nobody");
        net.run(secs(120));
        assert_eq!(net.failures(ALICE).len(), 1);
        net.crash(ALICE);
        net.restart(ALICE);
        let again: Vec<&Event> = net.nodes[ALICE]
            .events
            .iter()
            .filter(|e| matches!(e, Event::Failed { exchange, redelivered: true, .. } if *exchange == id))
            .collect();
        assert_eq!(again.len(), 1, "the dead letter comes back once, flagged");
        if let Event::Failed { payload, .. } = again[0] {
            assert_eq!(payload, &Bytes::from_static(b"to nobody"));
        }
    }

    /// Bob's outcomes of Alice's exchanges, `(redelivered, what)` in order.
    fn responder_outcomes(net: &Net, id: ExchangeId) -> Vec<(bool, &'static str)> {
        net.nodes[BOB]
            .events
            .iter()
            .filter(|e| e.response_of().is_some_and(|(_, x)| x == id))
            .map(|e| match e {
                Event::ResponseDelivered { redelivered, .. } => (*redelivered, "delivered"),
                Event::ResponseUnconfirmed { redelivered, .. } => (*redelivered, "unconfirmed"),
                Event::ResponseTimedOut { redelivered, .. } => (*redelivered, "timed out"),
                Event::ResponseAborted { redelivered, .. } => (*redelivered, "aborted"),
                Event::ResponseCancelled { redelivered, .. } => (*redelivered, "cancelled"),
                _ => (false, "?"),
            })
            .collect()
    }

    #[test]
    fn a_responder_outcome_the_application_did_not_take_is_handed_out_after_a_restart() {
        // Bob's application has not read "Alice has our reply" when he crashes: whether the
        // event was lost in his inbox or the commit landed as he died, it must come again.
        let mut net = durable_pair();
        net.nodes[BOB].takes_outcomes = false;
        let id = net.request(ALICE, BOB, b"q");
        net.run(secs(5));
        assert_eq!(responder_outcomes(&net, id), vec![(false, "delivered")]);
        net.crash(BOB);
        net.restart(BOB);
        assert_eq!(
            responder_outcomes(&net, id),
            vec![(false, "delivered"), (true, "delivered")]
        );
        // Taken now (the harness's application takes what it is handed): forgotten.
        net.nodes[BOB].takes_outcomes = true;
        let alice = net.id(ALICE);
        net.nodes[BOB].endpoint.response_outcome_taken(alice, id);
        net.commit(BOB);
        net.crash(BOB);
        net.restart(BOB);
        assert_eq!(responder_outcomes(&net, id).len(), 2, "not a third time");
        // Every kind of outcome is kept the same way: a timed-out one too.
        net.nodes[BOB].takes_outcomes = false;
        net.nodes[BOB].app = App::Manual;
        let late = net.request(ALICE, BOB, b"never answered");
        net.run(secs(60));
        assert_eq!(responder_outcomes(&net, late), vec![(false, "timed out")]);
        net.crash(BOB);
        net.restart(BOB);
        assert_eq!(
            responder_outcomes(&net, late),
            vec![(false, "timed out"), (true, "timed out")]
        );
    }

    #[test]
    fn responder_outcomes_kept_for_a_restart_stay_within_max_unread_outcomes() {
        let mut net = durable_pair();
        net.nodes[BOB].config.max_unread_outcomes = 2;
        net.nodes[BOB].takes_outcomes = false;
        net.crash(BOB);
        net.restart(BOB);
        let ids: Vec<ExchangeId> = (0..3).map(|_| net.request(ALICE, BOB, b"q")).collect();
        net.run(secs(10));
        assert_eq!(net.nodes[BOB].endpoint.unread_responses(), 2);
        net.crash(BOB);
        net.restart(BOB);
        let again: Vec<usize> = ids
            .iter()
            .map(|id| responder_outcomes(&net, *id).len())
            .collect();
        assert_eq!(
            again,
            [1, 2, 2],
            "the oldest is no longer kept; the two newest come again"
        );
    }

    #[test]
    fn exchange_ids_are_never_reused_by_a_restart_with_the_same_seed() {
        let me = Keypair::from_private_bytes([1; 32]).peer_id();
        let peer = Keypair::from_private_bytes([2; 32]).peer_id();
        let addr: SocketAddr = "10.0.0.2:1".parse().unwrap();
        let now = Instant::now();
        let mut table = std::collections::BTreeMap::new();
        store::apply(&mut table, store::header(me));
        let mut used = std::collections::BTreeSet::new();
        for _incarnation in 0..3 {
            let mut ep =
                Endpoint::new(config(), me, AllowList::from_peers([peer]), [9; 32]).unwrap();
            let recovered = store::decode(
                me,
                table.iter().map(|((t, k), v)| (*t, k.clone(), v.clone())),
            )
            .unwrap();
            ep.restore(recovered, now, 0);
            for _ in 0..3 {
                let id = ep.request(peer, addr, &b"x"[..], now).unwrap();
                assert!(used.insert(id), "{id} reused");
            }
            store::apply(&mut table, ep.poll_journal());
        }
        // Memory mode, same seed: the same ids. The driver must vary the seed (it mixes in
        // an incarnation nonce); this is what it guards against.
        let first = |seed| {
            let mut ep = Endpoint::new(config(), me, AllowList::from_peers([peer]), seed).unwrap();
            ep.request(peer, addr, &b"x"[..], now).unwrap()
        };
        assert_eq!(first([9; 32]), first([9; 32]));
    }

    struct Responder {
        ep: Endpoint,
        peer: PeerId,
        conn: ConnId,
        now: Instant,
    }

    fn responder(config: Config) -> Responder {
        let me = Keypair::from_private_bytes([1; 32]).peer_id();
        let peer = Keypair::from_private_bytes([2; 32]).peer_id();
        let config = Config {
            ack_delay: Duration::ZERO,
            ..config
        };
        let mut ep = Endpoint::new(config, me, AllowList::from_peers([peer]), [0; 32]).unwrap();
        let now = Instant::now();
        let conn = ConnId::inbound(1);
        ep.handle_accepted(conn, peer, "10.0.0.2:1".parse().unwrap(), 1 << 20, 0, now);
        Responder {
            ep,
            peer,
            conn,
            now,
        }
    }

    impl Responder {
        fn request(&mut self, id: u64, payload: &'static [u8]) -> (Vec<crate::Output>, Vec<Event>) {
            let request = Message::Request {
                exchange: ExchangeId(id),
                attempt: 1,
                payload: Bytes::from_static(payload),
            };
            self.ep
                .handle_conn_event(self.conn, ConnEvent::Message(request), self.now);
            self.drain()
        }

        fn drain(&mut self) -> (Vec<crate::Output>, Vec<Event>) {
            let outputs = std::iter::from_fn(|| self.ep.poll_output()).collect();
            let events = std::iter::from_fn(|| self.ep.poll_event()).collect();
            (outputs, events)
        }

        fn reconnect(&mut self, n: u64) {
            self.conn = ConnId::inbound(n);
            let addr = "10.0.0.2:1".parse().unwrap();
            self.ep
                .handle_accepted(self.conn, self.peer, addr, 1 << 20, 0, self.now);
        }
    }

    #[test]
    fn a_reused_id_with_another_payload_is_a_violation_not_a_duplicate() {
        let mut r = responder(config());
        let (_, events) = r.request(5, b"first");
        assert_eq!(events.len(), 1, "{events:?}");
        let (outputs, events) = r.request(5, b"something else");
        assert!(
            !outputs.iter().any(|o| matches!(
                o,
                crate::Output::Send {
                    message: Message::Ack { .. },
                    ..
                }
            )),
            "not acknowledged: {outputs:?}"
        );
        assert!(
            matches!(
                events.as_slice(),
                [Event::PeerError(PeerError::Violation { detail, .. })] if detail.contains("different payload")
            ),
            "{events:?}"
        );
        r.ep.check_invariants();
    }

    #[test]
    fn revoking_and_allowing_again_does_not_reopen_the_door_to_duplicates() {
        let mut r = responder(config());
        r.ep.restore(Recovered::default(), r.now, 0);
        let (_, events) = r.request(1, b"answered");
        assert_eq!(events.len(), 1, "{events:?}");
        r.ep.respond(r.peer, ExchangeId(1), &b"r"[..], r.now)
            .unwrap();
        let (_, events) = r.request(2, b"unanswered");
        assert!(events.iter().any(|e| matches!(e, Event::Request { .. })));
        r.ep.revoke(&r.peer, r.now);
        let (_, events) = r.drain();
        assert!(events.contains(&Event::ResponseCancelled {
            peer: r.peer,
            exchange: ExchangeId(2),
            redelivered: false
        }));
        r.ep.allow(r.peer, AllowedPeer::default());
        r.reconnect(2);
        for (id, payload) in [(1, &b"answered"[..]), (2, &b"unanswered"[..])] {
            let (outputs, events) = r.request(id, payload);
            assert!(
                !events.iter().any(|e| matches!(e, Event::Request { .. })),
                "{id} delivered again: {events:?}"
            );
            assert!(!outputs.is_empty(), "{id} answered from its record");
        }
        r.ep.check_invariants();
    }

    #[test]
    fn dedupe_records_are_bounded_in_bytes_over_all_peers() {
        let mut r = responder(Config {
            dedupe_bytes: 4 * crate::endpoint::DEDUPE_RECORD_COST,
            ..config()
        });
        for id in 1..=20u64 {
            r.request(id, b"q");
            r.ep.respond(r.peer, ExchangeId(id), &b"r"[..], r.now)
                .unwrap();
            let ack = Message::Ack {
                exchange: ExchangeId(id),
                attempt: 1,
                of: AckOf::Reply,
            };
            r.ep.handle_conn_event(r.conn, ConnEvent::Message(ack), r.now);
            r.drain();
            r.ep.check_invariants();
        }
        // Four live requests fill the budget: the fifth is refused, not a record evicted.
        for id in 100..104u64 {
            r.reconnect(id);
            let (outputs, events) = r.request(id, b"live");
            assert_eq!(events.len(), 1, "{id}: {outputs:?}");
        }
        r.reconnect(200);
        let (outputs, events) = r.request(200, b"one too many");
        assert!(events.is_empty());
        assert!(outputs.iter().any(|o| matches!(
            o,
            crate::Output::Send {
                message: Message::Nack {
                    reason: NackReason::Busy,
                    ..
                },
                ..
            }
        )));
        r.ep.check_invariants();
    }

    /// Restores `records` of peer `[2; 32]` into a fresh durable endpoint of `[1; 32]`.
    fn restored(
        config: Config,
        allowed: bool,
        records: Vec<(u64, store::InboundStage)>,
    ) -> (Endpoint, PeerId, Vec<store::KvOp>, Vec<Event>, Instant) {
        let me = Keypair::from_private_bytes([1; 32]).peer_id();
        let peer = Keypair::from_private_bytes([2; 32]).peer_id();
        let allow = if allowed {
            AllowList::from_peers([peer])
        } else {
            AllowList::from_peers([])
        };
        let addr: SocketAddr = "10.0.0.2:7000".parse().unwrap();
        let recovered = Recovered {
            inbound: records
                .into_iter()
                .map(|(seq, stage)| {
                    let record = store::InboundRecord {
                        seq,
                        digest: store::digest(b"q"),
                        addr,
                        remote_max: 1 << 20,
                        stage,
                    };
                    ((peer, ExchangeId(seq)), record)
                })
                .collect(),
            ..Recovered::default()
        };
        let mut ep = Endpoint::new(config, me, allow, [0; 32]).unwrap();
        let now = Instant::now();
        ep.restore(recovered, now, 0);
        ep.check_invariants();
        let journal = ep.poll_journal();
        let events = std::iter::from_fn(|| ep.poll_event()).collect();
        (ep, peer, journal, events, now)
    }

    fn deleted(journal: &[store::KvOp]) -> Vec<u64> {
        journal
            .iter()
            .filter_map(|op| match op {
                store::KvOp::Delete {
                    table: store::Table::Inbound,
                    key,
                } => Some(u64::from_be_bytes(key.as_slice().try_into().unwrap())),
                _ => None,
            })
            .collect()
    }

    /// The stage a journal's last write gives record `seq`, read back through the decoder.
    fn stage_written(journal: &[store::KvOp], seq: u64) -> Option<store::InboundStage> {
        let me = Keypair::from_private_bytes([1; 32]).peer_id();
        let mut rows = store::Rows::new();
        store::apply(&mut rows, store::header(me));
        let key = seq.to_be_bytes().to_vec();
        let ops = journal.iter().filter(|op| match op {
            store::KvOp::Put { table, key: k, .. } => *table == store::Table::Inbound && *k == key,
            _ => false,
        });
        store::apply(&mut rows, ops.cloned().collect());
        let rows = rows.into_iter().map(|((t, k), v)| (t, k, v));
        let recovered = store::decode(me, rows).unwrap();
        recovered.inbound.into_iter().next().map(|(_, r)| r.stage)
    }

    #[test]
    fn restoring_under_lowered_bounds_forgets_the_oldest_finished_records_only() {
        let config = Config {
            dedupe_per_peer: 2,
            ..config()
        };
        let pending = store::InboundStage::Pending {
            payload: Some(Bytes::from_static(b"q")),
        };
        let mut records: Vec<_> = (1..=4)
            .map(|seq| (seq, store::InboundStage::Done))
            .collect();
        records.push((5, pending));
        let (ep, _, journal, events, now) = restored(config.clone(), true, records);
        // Finished records make room, oldest first; the unanswered request stays, and is
        // delivered again.
        assert_eq!(deleted(&journal), vec![1, 2, 3]);
        let kept: Vec<u64> = ep
            .exchange_states()
            .into_iter()
            .map(|(_, _, id, _)| id.0)
            .collect();
        assert_eq!(kept, vec![4, 5]);
        assert!(matches!(
            &events[..],
            [Event::Request {
                exchange: ExchangeId(5),
                redelivered: true,
                ..
            }]
        ));
        // Counted as delivered, with a fresh response timeout.
        assert_eq!(ep.stats().requests_delivered, 1);
        assert_eq!(ep.poll_timeout(), Some(now + config.response_timeout));
        // Live records are kept even past the bound: they still owe their peer an answer.
        let one = Config {
            dedupe_per_peer: 1,
            ..super::config()
        };
        let pending = |p: &'static [u8]| store::InboundStage::Pending {
            payload: Some(Bytes::from_static(p)),
        };
        let (_, _, journal, events, _) =
            restored(one, true, vec![(1, pending(b"a")), (2, pending(b"b"))]);
        assert!(deleted(&journal).is_empty(), "{journal:?}");
        assert_eq!(events.len(), 2, "both delivered again: {events:?}");
    }

    #[test]
    fn a_request_of_a_peer_no_longer_allowed_is_cancelled_on_restore_and_stored_as_such() {
        let pending = store::InboundStage::Pending {
            payload: Some(Bytes::from_static(b"q")),
        };
        let (_, peer, journal, events, _) = restored(config(), false, vec![(7, pending)]);
        assert_eq!(
            events,
            vec![Event::ResponseCancelled {
                peer,
                exchange: ExchangeId(7),
                redelivered: false
            }]
        );
        // Stored as aborted, so that a resend after the peer is allowed again gets the
        // Abort instead of a delivery.
        assert_eq!(
            stage_written(&journal, 7),
            Some(store::InboundStage::Aborted(AbortReason::NoResponse))
        );
        // Already aborted: nothing to write again.
        let aborted = store::InboundStage::Aborted(AbortReason::NoResponse);
        let (_, _, journal, events, _) = restored(config(), false, vec![(8, aborted)]);
        assert!(events.is_empty());
        assert_eq!(stage_written(&journal, 8), None);
    }

    #[test]
    fn replies_restored_over_the_cache_budget_are_dropped_oldest_first() {
        let config = Config {
            reply_cache_bytes: 10,
            ..config()
        };
        let replied = |r: &'static [u8]| store::InboundStage::Replied {
            reply: Some(Bytes::from_static(r)),
        };
        let (_, _, journal, _, _) = restored(
            config,
            true,
            vec![(1, replied(b"12345678")), (2, replied(b"abcdefgh"))],
        );
        assert_eq!(
            stage_written(&journal, 1),
            Some(store::InboundStage::Replied { reply: None })
        );
        assert_eq!(stage_written(&journal, 2), None, "the newer one fits");
        // Exactly at the budget: both stay.
        let exact = Config {
            reply_cache_bytes: 16,
            ..super::config()
        };
        let (_, _, journal, _, _) = restored(
            exact,
            true,
            vec![(1, replied(b"12345678")), (2, replied(b"abcdefgh"))],
        );
        assert!(journal.is_empty(), "{journal:?}");
        // A restored reply waits a whole reply-ack timeout for its Ack.
        let (ep, _, _, _, now) = restored(super::config(), true, vec![(1, replied(b"12345678"))]);
        assert_eq!(
            ep.poll_timeout(),
            Some(now + super::config().reply_ack_timeout)
        );
    }
}

#[test]
fn events_and_failures_read_as_sentences() {
    use crate::connection::Remote;
    let peer = crate::Keypair::from_private_bytes([2; 32]).peer_id();
    let x = ExchangeId(7);
    let failed = |failure| Event::Failed {
        peer,
        exchange: x,
        payload: Bytes::from_static(b"p"),
        failure,
        redelivered: false,
    };
    let exhausted = failed(Failure::Exhausted {
        attempts: 6,
        last: RetryCause::DialFailed("connect to 10.0.0.2:7000: refused".into()),
        request_acked: false,
    })
    .to_string();
    assert_eq!(
        exhausted,
        format!(
            "request {x} to {peer} failed: gave up after 6 attempts (last: could not connect: \
             connect to 10.0.0.2:7000: refused); the peer never acknowledged it"
        )
    );
    let acked = Failure::Exhausted {
        attempts: 2,
        last: RetryCause::Nacked(NackReason::Busy),
        request_acked: true,
    };
    assert!(
        acked.to_string().contains("refused for now: busy")
            && acked.to_string().contains("its application has it"),
        "{acked}"
    );
    let texts = [
        Failure::Refused(NackReason::TooLarge).to_string(),
        Failure::Aborted(AbortReason::NoResponse).to_string(),
        Failure::Rejected(CloseReason::NotAllowed).to_string(),
        Failure::TooLarge { len: 9, max: 4 }.to_string(),
        Failure::Revoked.to_string(),
        Failure::ShuttingDown.to_string(),
        RetryCause::ConnectTimeout.to_string(),
        RetryCause::ConnectionLost("reset".into()).to_string(),
        RetryCause::AckTimeout.to_string(),
        RetryCause::ReplyTimeout.to_string(),
        NackReason::Other(99).to_string(),
        Event::Request {
            peer,
            addr: "10.0.0.1:1".parse().unwrap(),
            exchange: x,
            payload: Bytes::from_static(b"abc"),
            redelivered: true,
        }
        .to_string(),
        Event::ResponseDelivered {
            peer,
            exchange: x,
            redelivered: false,
        }
        .to_string(),
        Event::ResponseUnconfirmed {
            peer,
            exchange: x,
            redelivered: false,
        }
        .to_string(),
        Event::ResponseTimedOut {
            peer,
            exchange: x,
            redelivered: false,
        }
        .to_string(),
        Event::ResponseAborted {
            peer,
            exchange: x,
            reason: AbortReason::ReplyTooLarge,
            redelivered: false,
        }
        .to_string(),
        Event::ResponseCancelled {
            peer,
            exchange: x,
            redelivered: false,
        }
        .to_string(),
        Event::RateLimited {
            peer,
            limit: crate::endpoint::LimitKind::Connections,
            disconnected: true,
        }
        .to_string(),
        Event::PeerError(PeerError::Violation {
            remote: Remote {
                peer: Some(peer),
                addr: "10.0.0.1:1".parse().unwrap(),
            },
            detail: "bad",
        })
        .to_string(),
    ];
    let expected = [
        "refused by the peer: larger than it accepts",
        "the peer gave up after accepting it: its application did not answer in time",
        "rejected by the peer: not on the allow list",
        "9 bytes is more than the peer accepts (4)",
        "the peer was removed from the allow list",
        "the node is shutting down",
        "connecting took longer than connect_timeout",
        "connection lost: reset",
        "no Ack within ack_timeout",
        "no Reply within reply_timeout",
        "reason 99, unknown to this version",
        "(3 bytes, redelivered)",
        "acknowledged our reply",
        "did not acknowledge our reply",
        "not answered within response_timeout",
        "abandoned: the reply is larger than the dialer accepts",
        "cancelled: the peer was revoked",
        "went over its connection rate and was disconnected",
        "protocol violation: bad",
    ];
    for (text, want) in texts.iter().zip(expected) {
        assert!(text.contains(want), "{text:?} should contain {want:?}");
        assert!(!text.contains('{') && !text.contains("::"), "{text}");
    }
}
