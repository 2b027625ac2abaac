//! The exchange state machine driven the way a real driver drives it, by a hostile or
//! unlucky network: connections it dialed get established or fail, strangers' messages of
//! any kind arrive on established connections (with exchange ids the endpoint used, mostly),
//! streams close, time passes, the application requests and responds. After every step the
//! endpoint's cross-table invariants must hold, no request may reach the application twice,
//! and every exchange of ours ends in exactly one outcome.
#![no_main]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use p2p_handler_core::allow_list::AllowedPeer;
use p2p_handler_core::connection::{Closed, ConnEvent, Remote};
use p2p_handler_core::endpoint::{ConnId, Output};
use p2p_handler_core::wire::{
    AbortReason, AckOf, CloseReason, ExchangeId, Kind, Message, NackReason,
};
use p2p_handler_core::{AllowList, Config, ConnError, Endpoint, Event, Keypair, PeerId, RateLimit};

#[derive(Arbitrary, Debug)]
enum Input {
    Request { peer: u8, len: u8 },
    Respond { pick: u8, len: u16 },
    Accept { peer: u8, max: u16 },
    Establish { pick: u8, max: u16 },
    DialFails { pick: u8 },
    Deliver { pick: u8, message: Msg },
    Oversized { pick: u8, kind: u8, id: IdPick },
    Close { pick: u8, how: u8 },
    Advance { ms: u16 },
    Revoke { peer: u8 },
    Allow { peer: u8 },
    Shutdown,
}

/// An exchange id: mostly one the endpoint has used with someone, sometimes any.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum IdPick {
    Known(u8),
    Any(u8),
}

#[derive(Arbitrary, Debug)]
enum Msg {
    Request {
        id: IdPick,
        attempt: u8,
        len: u8,
    },
    Ack {
        id: IdPick,
        attempt: u8,
        reply: bool,
    },
    Nack {
        id: IdPick,
        attempt: u8,
        reason: u8,
        retry_ms: u16,
    },
    Reply {
        id: IdPick,
        attempt: u8,
        len: u16,
    },
    Abort {
        id: IdPick,
        attempt: u8,
        reason: u8,
    },
    Close {
        reason: u8,
    },
}

struct Driver {
    ep: Endpoint,
    peers: Vec<PeerId>,
    now: Instant,
    /// Dials the endpoint asked for and nobody answered yet: (conn, peer).
    dialing: Vec<(ConnId, PeerId)>,
    /// Established connections: (conn, peer).
    open: Vec<(ConnId, PeerId)>,
    accepted: u64,
    /// Every exchange id the endpoint used or saw.
    ids: Vec<ExchangeId>,
    /// Requests delivered to the application and not answered: (peer, id).
    pending: Vec<(PeerId, ExchangeId)>,
    delivered: BTreeMap<(PeerId, ExchangeId), u32>,
    /// Our exchanges: id -> outcomes seen.
    ours: BTreeMap<ExchangeId, u32>,
}

fn pick<T: Copy>(items: &[T], n: u8) -> Option<T> {
    (!items.is_empty()).then(|| items[usize::from(n) % items.len()])
}

impl Driver {
    fn id(&self, pick_id: IdPick) -> ExchangeId {
        match pick_id {
            IdPick::Known(n) => pick(&self.ids, n).unwrap_or(ExchangeId(u64::from(n))),
            IdPick::Any(n) => ExchangeId(u64::from(n)),
        }
    }

    fn message(&self, m: Msg) -> Message {
        match m {
            Msg::Request { id, attempt, len } => Message::Request {
                exchange: self.id(id),
                attempt: u32::from(attempt),
                payload: Bytes::from(vec![1; usize::from(len)]),
            },
            Msg::Ack { id, attempt, reply } => Message::Ack {
                exchange: self.id(id),
                attempt: u32::from(attempt),
                of: if reply { AckOf::Reply } else { AckOf::Request },
            },
            Msg::Nack {
                id,
                attempt,
                reason,
                retry_ms,
            } => Message::Nack {
                exchange: self.id(id),
                attempt: u32::from(attempt),
                reason: NackReason::from_code(reason % 6),
                retry_after_ms: u32::from(retry_ms),
            },
            Msg::Reply { id, attempt, len } => Message::Reply {
                exchange: self.id(id),
                attempt: u32::from(attempt),
                payload: Bytes::from(vec![2; usize::from(len % 400)]),
            },
            Msg::Abort {
                id,
                attempt,
                reason,
            } => Message::Abort {
                exchange: self.id(id),
                attempt: u32::from(attempt),
                reason: AbortReason::from_code(reason % 6),
            },
            Msg::Close { reason } => Message::Close {
                reason: CloseReason::from_code(reason % 8),
            },
        }
    }

    fn forget(&mut self, conn: ConnId) {
        self.dialing.retain(|(c, _)| *c != conn);
        self.open.retain(|(c, _)| *c != conn);
    }

    /// What a driver does after every input: perform outputs, hand events over.
    fn settle(&mut self) {
        while let Some(output) = self.ep.poll_output() {
            match output {
                Output::Dial { conn, peer, .. } => self.dialing.push((conn, peer)),
                Output::Send { message, .. } => {
                    if let Some(id) = message.exchange() {
                        self.ids.push(id);
                    }
                }
                // The task closes the stream; the endpoint has already forgotten it.
                Output::Close { conn, .. } => self.forget(conn),
                // No membership here: the list never changes by itself.
                Output::AllowList(_) => panic!("the allow list changed by itself"),
            }
        }
        while let Some(event) = self.ep.poll_event() {
            match event {
                Event::Request { peer, exchange, .. } => {
                    let n = self.delivered.entry((peer, exchange)).or_default();
                    *n += 1;
                    assert_eq!(*n, 1, "{exchange} from {peer:?} delivered twice");
                    self.pending.push((peer, exchange));
                }
                Event::Reply { exchange, .. } | Event::Failed { exchange, .. } => {
                    let n = self.ours.entry(exchange).or_default();
                    *n += 1;
                    assert_eq!(*n, 1, "{exchange} ended twice");
                }
                _ => {}
            }
        }
        self.ep.check_invariants();
    }

    fn step(&mut self, input: Input) {
        let peer_of = |peers: &[PeerId], i: u8| peers[usize::from(i) % peers.len()];
        let addr: SocketAddr = "10.0.0.9:1".parse().expect("address");
        let now = self.now;
        match input {
            Input::Request { peer, len } => {
                let peer = peer_of(&self.peers, peer);
                if let Ok(id) = self.ep.request(peer, addr, vec![0; usize::from(len)], now) {
                    self.ids.push(id);
                    self.ours.insert(id, 0);
                }
            }
            Input::Respond { pick: n, len } => {
                if let Some((peer, id)) = pick(&self.pending, n) {
                    let _ = self
                        .ep
                        .respond(peer, id, vec![0; usize::from(len % 400)], now);
                }
            }
            Input::Accept { peer, max } => {
                self.accepted += 1;
                let conn = ConnId::inbound(self.accepted);
                let peer = peer_of(&self.peers, peer);
                let max = usize::from(max.max(1));
                self.ep.handle_accepted(conn, peer, addr, max, 0, now);
                self.open.push((conn, peer));
            }
            Input::Establish { pick: n, max } => {
                if let Some((conn, peer)) = pick(&self.dialing, n) {
                    self.dialing.retain(|(c, _)| *c != conn);
                    self.open.push((conn, peer));
                    // A key that is not the peer's: the endpoint keeps none (and dials
                    // on as configured).
                    let event = ConnEvent::Established {
                        peer,
                        key: [0; 32],
                        remote_max_message_size: usize::from(max.max(1)),
                        remote_features: 0,
                        ticket: None,
                    };
                    self.ep.handle_conn_event(conn, event, now);
                }
            }
            Input::DialFails { pick: n } => {
                if let Some((conn, _)) = pick(&self.dialing, n) {
                    self.forget(conn);
                    let closed = Closed::Io("connection refused".to_owned());
                    self.ep
                        .handle_conn_event(conn, ConnEvent::Closed(closed), now);
                }
            }
            Input::Deliver { pick: n, message } => {
                if let Some((conn, _)) = pick(&self.open, n) {
                    let message = self.message(message);
                    if let Message::Close { reason } = message {
                        // A Connection reports a peer's Close as the end of the stream.
                        self.forget(conn);
                        let closed = ConnEvent::Closed(Closed::ByPeer(reason));
                        self.ep.handle_conn_event(conn, closed, now);
                    } else {
                        self.ep
                            .handle_conn_event(conn, ConnEvent::Message(message), now);
                    }
                }
            }
            Input::Oversized { pick: n, kind, id } => {
                if let Some((conn, _)) = pick(&self.open, n) {
                    let kinds = [
                        Kind::Request,
                        Kind::Ack,
                        Kind::Nack,
                        Kind::Reply,
                        Kind::Abort,
                        Kind::Close,
                    ];
                    let kind = kinds[usize::from(kind) % kinds.len()];
                    let header = kind != Kind::Close;
                    let event = ConnEvent::Oversized {
                        kind,
                        exchange: header.then(|| self.id(id)),
                        attempt: header.then_some(1),
                        len: 1 << 20,
                    };
                    self.ep.handle_conn_event(conn, event, now);
                }
            }
            Input::Close { pick: n, how } => {
                if let Some((conn, peer)) = pick(&self.open, n) {
                    self.forget(conn);
                    let closed = match how % 3 {
                        0 => Closed::Io("reset".to_owned()),
                        1 => Closed::Error(ConnError::Decrypt {
                            remote: Remote {
                                addr,
                                peer: Some(peer),
                            },
                        }),
                        _ => Closed::Io("write stalled".to_owned()),
                    };
                    self.ep
                        .handle_conn_event(conn, ConnEvent::Closed(closed), now);
                }
            }
            Input::Advance { ms } => {
                self.now += Duration::from_millis(u64::from(ms));
                self.ep.handle_timeout(self.now);
            }
            Input::Revoke { peer } => {
                let peer = peer_of(&self.peers, peer);
                self.ep.revoke(&peer, now);
                // Revoking forgets the peer's exchanges: a new one may reuse an id.
                self.delivered.retain(|(p, _), _| *p != peer);
                self.pending.retain(|(p, _)| *p != peer);
            }
            Input::Allow { peer } => {
                let peer = peer_of(&self.peers, peer);
                self.ep.allow(peer, AllowedPeer::default());
            }
            Input::Shutdown => self.ep.shutdown(now),
        }
        self.settle();
    }
}

fuzz_target!(|inputs: Vec<Input>| {
    let me = Keypair::from_private_bytes([1; 32]).peer_id();
    let peers: Vec<PeerId> = (2..5u8)
        .map(|b| Keypair::from_private_bytes([b; 32]).peer_id())
        .collect();
    let config = Config {
        max_queued_per_peer: 3,
        max_pending_inbound: 4,
        dedupe_per_peer: 8,
        reply_cache_bytes: 600,
        max_message_size: 300,
        request_rate: RateLimit {
            burst: 6,
            per_second: 3,
        },
        rate_limit_strikes: 4,
        max_tracked_peers: 3,
        ..Config::default()
    };
    let Ok(ep) = Endpoint::new(config, me, AllowList::from_peers(peers.clone()), [5; 32]) else {
        return;
    };
    let mut driver = Driver {
        ep,
        peers,
        now: Instant::now(),
        dialing: Vec::new(),
        open: Vec::new(),
        accepted: 0,
        ids: Vec::new(),
        pending: Vec::new(),
        delivered: BTreeMap::new(),
        ours: BTreeMap::new(),
    };
    for input in inputs {
        driver.step(input);
    }
    // Time heals everything: every exchange of ours ends, exactly once.
    for _ in 0..200 {
        driver.now += Duration::from_secs(30);
        driver.ep.handle_timeout(driver.now);
        for (conn, _) in std::mem::take(&mut driver.dialing) {
            let closed = Closed::Io("unreachable".to_owned());
            driver
                .ep
                .handle_conn_event(conn, ConnEvent::Closed(closed), driver.now);
        }
        driver.settle();
    }
    for (id, outcomes) in &driver.ours {
        assert_eq!(*outcomes, 1, "{id} ended {outcomes} times");
    }
});
