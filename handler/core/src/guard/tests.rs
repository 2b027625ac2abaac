//! The guard's rules, one by one, from the dialer's side and the responder's.

use super::*;

const OURS: [u8; KEY_LEN] = [7; KEY_LEN];
const THEIRS: [u8; KEY_LEN] = [8; KEY_LEN];

/// Stands in for a Noise IK message 1 with a request in it: the guard never reads inside.
fn noise() -> Vec<u8> {
    (0..200u8).collect()
}

fn from() -> SocketAddr {
    "10.0.0.1:40000".parse().unwrap_or_else(|_| unreachable!())
}

fn peer(n: u8) -> PeerId {
    PeerId::from_bytes([n; 32])
}

fn guard(now: Instant) -> Guard {
    Guard::new(&OURS, [1; 32], now)
}

#[test]
fn mac1_turns_away_garbage_and_dialers_without_our_key() {
    let now = Instant::now();
    let mut g = guard(now);
    let good = seal_message_1(&noise(), &OURS, None, None);
    assert_eq!(
        g.classify(&good, from(), now),
        FirstMessage::Unproven { cookie: false }
    );
    // Made for another responder's key.
    let wrong = seal_message_1(&noise(), &THEIRS, None, None);
    assert!(matches!(
        g.classify(&wrong, from(), now),
        FirstMessage::Garbage(_)
    ));
    // Any byte changed before mac1 breaks it; mac2 is not covered by mac1.
    for i in [0, 31, 32, 150, good.len() - 2 * MAC_LEN - 1] {
        let mut bad = good.clone();
        bad[i] ^= 1;
        assert!(
            matches!(g.classify(&bad, from(), now), FirstMessage::Garbage(_)),
            "byte {i}"
        );
    }
    let mut mac2_flipped = good.clone();
    *mac2_flipped.last_mut().unwrap_or(&mut 0) ^= 1;
    assert_eq!(
        g.classify(&mac2_flipped, from(), now),
        FirstMessage::Unproven { cookie: false }
    );
    // Too short to hold an envelope after the shortest message 1.
    let short = seal_message_1(&[9; IK_MESSAGE_1_MIN - ENVELOPE_LEN - 1], &OURS, None, None);
    assert!(matches!(
        g.classify(&short, from(), now),
        FirstMessage::Garbage(_)
    ));
    assert!(matches!(
        g.classify(&[], from(), now),
        FirstMessage::Garbage(_)
    ));
    // The shortest one passes.
    let shortest = seal_message_1(&[9; IK_MESSAGE_1_MIN - ENVELOPE_LEN], &OURS, None, None);
    assert_eq!(
        g.classify(&shortest, from(), now),
        FirstMessage::Unproven { cookie: false }
    );
    assert_eq!(g.stats().bad_mac1, 8);
}

#[test]
fn an_xx_message_1_is_told_apart_by_the_hello_after_the_ephemeral_key() {
    let now = Instant::now();
    let mut g = guard(now);
    let mut xx = vec![3u8; KEY_LEN];
    xx.extend_from_slice(&HELLO_MAGIC);
    xx.extend_from_slice(&[0; 13]);
    assert!(is_xx_message_1(&xx));
    assert_eq!(g.classify(&xx, from(), now), FirstMessage::Xx);
    assert!(!is_xx_message_1(&xx[..KEY_LEN + 3]));
}

#[test]
fn a_cookie_proves_the_address_it_was_given_to_for_two_periods() {
    let t0 = Instant::now();
    let mut g = guard(t0);
    let first = seal_message_1(&noise(), &OURS, None, None);
    let reply = g.cookie_reply(&first, from(), t0).unwrap_or_default();
    assert_eq!(reply.len(), COOKIE_REPLY_LEN);
    assert!(is_cookie_reply(&reply));
    let cookie = open_cookie_reply(&reply, &OURS, &first).unwrap_or([0; MAC_LEN]);
    let again = seal_message_1(&noise(), &OURS, None, Some(&cookie));
    assert_eq!(
        g.classify(&again, from(), t0),
        FirstMessage::Unproven { cookie: true }
    );
    // Another port (another connection) or address: no proof.
    let elsewhere: SocketAddr = "10.0.0.1:40001".parse().unwrap_or_else(|_| unreachable!());
    assert_eq!(
        g.classify(&again, elsewhere, t0),
        FirstMessage::Unproven { cookie: false }
    );
    // Valid in the next period, stale after it.
    let next = t0 + COOKIE_PERIOD;
    assert_eq!(
        g.classify(&again, from(), next),
        FirstMessage::Unproven { cookie: true }
    );
    let stale = t0 + 2 * COOKIE_PERIOD;
    assert_eq!(
        g.classify(&again, from(), stale),
        FirstMessage::Unproven { cookie: false }
    );
    assert_eq!((g.stats().cookies_sent, g.stats().cookies_proven), (1, 2));
    // Another node's guard (another secret) does not take it.
    let mut other = Guard::new(&OURS, [2; 32], t0);
    assert_eq!(
        other.classify(&again, from(), t0),
        FirstMessage::Unproven { cookie: false }
    );
}

#[test]
fn a_cookie_reply_opens_only_for_the_message_it_answers_from_the_key_dialed() {
    let now = Instant::now();
    let mut g = guard(now);
    let sent = seal_message_1(&noise(), &OURS, None, None);
    let reply = g.cookie_reply(&sent, from(), now).unwrap_or_default();
    assert!(open_cookie_reply(&reply, &OURS, &sent).is_ok());
    // Made by someone who knows only the responder's public key: the tag is wrong.
    assert!(open_cookie_reply(&reply, &THEIRS, &sent).is_err());
    // For another message 1 (its mac1 is the associated data).
    let other = seal_message_1(&[1; 150], &OURS, None, None);
    assert!(open_cookie_reply(&reply, &OURS, &other).is_err());
    for i in [4, 27, 28, COOKIE_REPLY_LEN - 1] {
        let mut bad = reply.clone();
        bad[i] ^= 1;
        assert!(open_cookie_reply(&bad, &OURS, &sent).is_err(), "byte {i}");
    }
    assert!(open_cookie_reply(&reply[..COOKIE_REPLY_LEN - 1], &OURS, &sent).is_err());
    assert!(g.cookie_reply(&[0; 10], from(), now).is_none());
}

#[test]
fn a_ticket_proves_its_peer_once_and_not_after_its_lifetime() {
    let t0 = Instant::now();
    let mut g = guard(t0);
    let ticket = Ticket::derive(&[5; 32]);
    g.issue(peer(1), ticket, t0);
    let with = seal_message_1(&noise(), &OURS, Some(&ticket), None);
    assert_eq!(g.classify(&with, from(), t0), FirstMessage::Proven(peer(1)));
    // Spent: the same message again (a replay) is unproven, from anywhere.
    assert_eq!(
        g.classify(&with, from(), t0),
        FirstMessage::Unproven { cookie: false }
    );
    assert_eq!(g.tickets(), 0);
    // A ticket id with a mac2 made by a key other than the ticket's.
    let other = Ticket::derive(&[6; 32]);
    g.issue(peer(1), other, t0);
    let forged = seal_message_1(
        &noise(),
        &OURS,
        Some(&Ticket {
            id: other.id,
            key: [0; KEY_LEN],
        }),
        None,
    );
    assert_eq!(
        g.classify(&forged, from(), t0),
        FirstMessage::Unproven { cookie: false }
    );
    // Expired.
    let late = seal_message_1(&noise(), &OURS, Some(&other), None);
    let expiry = t0 + TICKET_LIFETIME;
    assert_eq!(
        g.classify(&late, from(), expiry),
        FirstMessage::Unproven { cookie: false }
    );
    assert_eq!(g.classify(&late, from(), t0), FirstMessage::Proven(peer(1)));
    assert_eq!(
        (g.stats().tickets_redeemed, g.stats().tickets_unknown),
        (2, 3)
    );
    assert_eq!(g.stats().tickets_issued, 2);
}

#[test]
fn tickets_are_bounded_per_peer_and_in_all_and_forgotten_with_their_peer() {
    let now = Instant::now();
    let mut g = guard(now);
    let tickets: Vec<Ticket> = (0..=TICKETS_PER_PEER as u8)
        .map(|n| Ticket::derive(&[n; 32]))
        .collect();
    for t in &tickets {
        g.issue(peer(1), *t, now);
    }
    assert_eq!(g.tickets(), TICKETS_PER_PEER);
    let oldest = seal_message_1(&noise(), &OURS, Some(&tickets[0]), None);
    assert_eq!(
        g.classify(&oldest, from(), now),
        FirstMessage::Unproven { cookie: false }
    );
    let newest = seal_message_1(&noise(), &OURS, Some(&tickets[TICKETS_PER_PEER]), None);
    assert_eq!(
        g.classify(&newest, from(), now),
        FirstMessage::Proven(peer(1))
    );
    g.forget(&peer(1));
    assert_eq!(g.tickets(), 0);
    let second = seal_message_1(&noise(), &OURS, Some(&tickets[1]), None);
    assert_eq!(
        g.classify(&second, from(), now),
        FirstMessage::Unproven { cookie: false }
    );
    // Across many peers, the newest MAX_TICKETS stay.
    for n in 0..=MAX_TICKETS as u32 {
        let mut seed = [0; 32];
        seed[..4].copy_from_slice(&n.to_be_bytes());
        let mut id = [0; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        g.issue(PeerId::from_bytes(id), Ticket::derive(&seed), now);
    }
    assert_eq!(g.tickets(), MAX_TICKETS);
    assert!(g.order.len() <= 2 * MAX_TICKETS);
    let first = Ticket::derive(&[0; 32]);
    let gone = seal_message_1(&noise(), &OURS, Some(&first), None);
    assert_eq!(
        g.classify(&gone, from(), now),
        FirstMessage::Unproven { cookie: false }
    );
}

#[test]
fn tickets_are_derived_from_the_seed_and_encode_both_ways() {
    let a = Ticket::derive(&[1; 32]);
    assert_eq!(a, Ticket::derive(&[1; 32]));
    assert_ne!(a, Ticket::derive(&[2; 32]));
    assert_ne!(&a.key[..MAC_LEN], &a.id[..]);
    assert_eq!(Ticket::decode(&a.encode()), Some(a));
    assert_eq!(Ticket::decode(&a.encode()[1..]), None);
    assert!(!format!("{a:?}").contains(&hex::encode(a.key)));
    assert_eq!(format!("{a:?}"), format!("Ticket({})", hex::encode(a.id)));
    // An ephemeral key, the encrypted static key, the encrypted 17-byte hello and the
    // envelope (PROTOCOL section 3 says 161).
    assert_eq!(IK_MESSAGE_1_MIN, 161);
}
