//! Hand-written misbehaving dialers at message 1, over real TCP on 127.0.0.1: one that
//! replays a recorded IK message 1 carrying a Request (to the node that took it, and to
//! the node restarted), one whose mac1 is wrong, one that names a ticket it made up, and
//! one that answers a cookie reply with a made-up or another connection's cookie. Each
//! builds its bytes with the sans-IO `Connection` and `guard` and sends what it likes on a
//! blocking socket. Counts and events only, never timing; every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test helpers may panic: that is a failed test.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{read_frame, write_frame};
use p2p_handler::connection::IkDial;
use p2p_handler::endpoint::PeerError;
use p2p_handler::guard::{self, Ticket};
use p2p_handler::wire::{ExchangeId, Message};
use p2p_handler::{AllowList, Config, ConnEvent, Connection, Event, Keypair, Notice, P2pHandler};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const WAIT: Duration = Duration::from_secs(30);

fn keys(seed: u64, n: usize) -> Vec<Keypair> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n).map(|_| Keypair::generate(&mut rng)).collect()
}

fn node(key: &Keypair, allowed: &Keypair, config: Config) -> P2pHandler {
    let allow = AllowList::from_peers([allowed.peer_id()]);
    P2pHandler::with_seed("127.0.0.1:0", key.clone(), allow, config, [7; 32]).unwrap()
}

fn unix_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since.as_millis()).unwrap()
}

/// Waits until `cond` holds, bounded.
fn eventually(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "condition not reached in time");
        std::thread::yield_now();
    }
}

/// An IK dialer as `me` to `bob` (whose static key is `bob_key`), its message 1 built but
/// not sent: the Connection, and message 1's frame.
fn ik_dialer(
    me: &Keypair,
    bob: SocketAddr,
    bob_key: &[u8; 32],
    early: Option<(u64, &Message)>,
    ticket: Option<Ticket>,
) -> (Connection, Vec<u8>) {
    let ik = IkDial {
        key: bob_key,
        early,
        ticket,
    };
    let mut conn =
        Connection::dial_ik(me, bob, [9; 32], &Config::default(), Instant::now(), ik).unwrap();
    let msg1 = conn.poll_transmit().unwrap();
    (conn, msg1)
}

/// Feeds `conn` the frames `stream` brings until it is established (true) or fails or the
/// stream ends (false); writes what it answers.
fn finish(conn: &mut Connection, stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    loop {
        let Some(frame) = read_frame(stream) else {
            return false;
        };
        conn.handle_frame(&frame, &AllowList::new(), Instant::now());
        while let Some(out) = conn.poll_transmit() {
            write_frame(stream, &out).unwrap();
        }
        while let Some(event) = conn.poll_event() {
            match event {
                ConnEvent::Established { .. } => return true,
                ConnEvent::Closed(_) => return false,
                _ => {}
            }
        }
    }
}

/// `msg1` (for `bob`) sent again with its mac2 keyed by `cookie`.
fn with_cookie(msg1: &[u8], bob: &Keypair, cookie: &[u8; 16]) -> Vec<u8> {
    let noise = &msg1[..msg1.len() - guard::ENVELOPE_LEN];
    guard::seal_message_1(noise, bob.public_bytes(), None, Some(cookie))
}

fn request(n: u64) -> Message {
    Message::Request {
        exchange: ExchangeId(n),
        attempt: 1,
        payload: Bytes::from(format!("request {n}")),
    }
}

#[test]
fn a_replayed_message_1_never_delivers_its_request_twice_even_after_a_restart() {
    let k = keys(61, 2);
    let (alice, bob_key) = (&k[0], &k[1]);
    let bob = node(bob_key, alice, Config::default());
    let ask = request(7);
    let (mut conn, msg1) = ik_dialer(
        alice,
        bob.local_address(),
        bob_key.public_bytes(),
        // A millisecond ahead: a stamp must be later than Bob's start, and he started in
        // this millisecond perhaps.
        Some((unix_ms() + 1, &ask)),
        None,
    );
    let mut first = TcpStream::connect(bob.local_address()).unwrap();
    write_frame(&mut first, &msg1).unwrap();
    assert!(finish(&mut conn, &mut first), "the honest handshake");
    let got = bob.receive_timeout(WAIT).expect("the request in message 1");
    assert!(matches!(got, Event::Request { exchange, .. } if exchange == ExchangeId(7)));
    // The recording, replayed on fresh sockets, twice.
    for n in 1..=2 {
        let mut replay = TcpStream::connect(bob.local_address()).unwrap();
        write_frame(&mut replay, &msg1).unwrap();
        eventually(|| bob.status().unwrap().stats.early_requests_refused == n);
    }
    let stats = bob.status().unwrap().stats;
    assert_eq!(stats.early_requests_taken, 1, "{stats:?}");
    // The refusals were decided before the status answered: nothing else was delivered.
    assert!(bob.check_receive().is_none());
    drop(first);

    // Bob restarts (memory only: he forgets Alice's stamps): the recording is older than
    // his start, and still refused.
    drop(bob);
    let bob = node(bob_key, alice, Config::default());
    let mut replay = TcpStream::connect(bob.local_address()).unwrap();
    write_frame(&mut replay, &msg1).unwrap();
    eventually(|| bob.status().unwrap().stats.early_requests_refused == 1);
    assert_eq!(bob.status().unwrap().stats.early_requests_taken, 0);
    assert!(bob.check_receive().is_none());
}

#[test]
fn a_wrong_mac1_or_a_made_up_ticket_costs_no_diffie_hellman_and_proves_nothing() {
    let k = keys(62, 3);
    let (alice, bob_key, other) = (&k[0], &k[1], &k[2]);
    let bob = node(bob_key, alice, Config::default());
    // Message 1 made for another node's key: its mac1 is wrong for Bob.
    let (_, wrong) = ik_dialer(alice, bob.local_address(), other.public_bytes(), None, None);
    let mut s = TcpStream::connect(bob.local_address()).unwrap();
    let from = s.local_addr().unwrap();
    write_frame(&mut s, &wrong).unwrap();
    let deadline = Instant::now() + WAIT;
    let error = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match bob
            .priority_timeout(left)
            .expect("a notice naming the stream")
        {
            Notice::Event(Event::PeerError(PeerError::Connection(e))) => break e,
            _ => continue,
        }
    };
    assert_eq!(error.remote().addr, from);
    assert!(error.to_string().contains("mac1"), "{error}");
    let first = bob.status().unwrap().first_messages;
    assert_eq!(first.bad_mac1, 1, "{first:?}");
    // A ticket Alice never got, with a right mac1: unproven, and the handshake goes on as
    // any first contact's does.
    let made_up = Ticket {
        id: [5; 16],
        key: [6; 32],
    };
    let (mut conn, msg1) = ik_dialer(
        alice,
        bob.local_address(),
        bob_key.public_bytes(),
        None,
        Some(made_up),
    );
    let mut s = TcpStream::connect(bob.local_address()).unwrap();
    write_frame(&mut s, &msg1).unwrap();
    assert!(finish(&mut conn, &mut s));
    let first = bob.status().unwrap().first_messages;
    assert_eq!(
        (first.tickets_unknown, first.tickets_redeemed),
        (1, 0),
        "{first:?}"
    );
    assert_eq!(first.tickets_issued, 1, "{first:?}");
}

#[test]
fn under_load_a_message_1_must_prove_the_cookie_given_to_its_own_connection() {
    let k = keys(63, 2);
    let (alice, bob_key) = (&k[0], &k[1]);
    // Two handshake slots: one held by a silent socket is half, which is load.
    let config = Config {
        max_handshaking: 2,
        ..Config::default()
    };
    let bob = node(bob_key, alice, config);
    let _silent = TcpStream::connect(bob.local_address()).unwrap();
    eventually(|| bob.status().unwrap().connection_tasks >= 1);

    // A cookie reply instead of message 2.
    let (conn, msg1) = ik_dialer(
        alice,
        bob.local_address(),
        bob_key.public_bytes(),
        None,
        None,
    );
    let mut s = TcpStream::connect(bob.local_address()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write_frame(&mut s, &msg1).unwrap();
    let reply = read_frame(&mut s).expect("a cookie reply");
    assert!(guard::is_cookie_reply(&reply), "{} bytes", reply.len());
    let cookie = guard::open_cookie_reply(&reply, bob_key.public_bytes(), &msg1).unwrap();
    // Message 1 again with a made-up cookie: another cookie reply; then the stream is closed.
    let made_up = with_cookie(&msg1, bob_key, &[1; 16]);
    write_frame(&mut s, &made_up).unwrap();
    let again = read_frame(&mut s).expect("another cookie reply");
    assert!(guard::is_cookie_reply(&again));
    write_frame(&mut s, &made_up).unwrap();
    assert_eq!(read_frame(&mut s), None, "closed after two cookie replies");

    // The cookie that first connection got, used on another connection (another port):
    // it proves nothing there.
    let (_, msg1) = ik_dialer(
        alice,
        bob.local_address(),
        bob_key.public_bytes(),
        None,
        None,
    );
    let elsewhere = with_cookie(&msg1, bob_key, &cookie);
    let mut s = TcpStream::connect(bob.local_address()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write_frame(&mut s, &elsewhere).unwrap();
    let reply = read_frame(&mut s).expect("a cookie reply");
    assert!(guard::is_cookie_reply(&reply));

    // Followed as a dialer does: the handshake completes.
    let (mut conn2, msg1) = ik_dialer(
        alice,
        bob.local_address(),
        bob_key.public_bytes(),
        None,
        None,
    );
    let mut s = TcpStream::connect(bob.local_address()).unwrap();
    write_frame(&mut s, &msg1).unwrap();
    assert!(finish(&mut conn2, &mut s), "after one cookie reply");
    let first = bob.status().unwrap().first_messages;
    assert_eq!(
        (first.cookies_sent, first.cookies_proven),
        (4, 1),
        "{first:?}"
    );
    drop(conn);
}
