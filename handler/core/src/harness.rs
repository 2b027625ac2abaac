//! A deterministic test network for endpoints: no tokio, no sockets, a virtual clock.
//!
//! Each node is an [`Endpoint`]; each link is a pair of real [`Connection`]s, so every
//! message is chunked, encrypted and decrypted as in production. Faults are scripted:
//! message rules (drop, delay, corrupt, answer with a forged Nack), black-hole partitions,
//! crashes and restarts. After every step the endpoints' invariants are checked, and
//! exactly-once delivery is checked across the whole run.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

use crate::allow_list::AllowList;
use crate::config::Config;
use crate::connection::{Closed, ConnEvent, Connection, IkDial};
use crate::durable::{self, Recovered, Rows, apply};
use crate::endpoint::{ConnId, Endpoint, Event, Output};
use crate::identity::{Keypair, PeerId};
use crate::wire::{AckOf, ExchangeId, Kind, Message, NackReason};

/// Where the virtual wall clock starts (2023-11-14), so deadlines are plausible dates.
const WALL_EPOCH_MS: u64 = 1_700_000_000_000;

/// How a node's application answers requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum App {
    /// Replies `re:` + payload at once.
    Echo,
    /// Replies after a delay.
    EchoAfter(Duration),
    /// Never replies on its own; the test calls `respond`.
    Manual,
}

/// What a message rule does to a matching message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// The message vanishes.
    Drop,
    /// The message is sent later (later messages overtake it).
    Delay(Duration),
    /// The message is sent now, and a copy of it again after this long on the same link
    /// (if it is still open): a stale duplicate, as a resend that lingered would be.
    Duplicate(Duration),
    /// The message is sent with one ciphertext byte flipped.
    Corrupt,
    /// A Request is not delivered; the receiver's connection answers with this Nack.
    Nack(NackReason),
}

/// Matches messages by sender, receiver and kind; applies `action` to the next `count`.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub from: Option<usize>,
    pub to: Option<usize>,
    pub kind: Option<Kind>,
    pub ack_of: Option<AckOf>,
    pub action: Action,
    pub count: u32,
}

impl Rule {
    pub(crate) fn new(from: usize, to: usize, kind: Kind, action: Action) -> Self {
        Self {
            from: Some(from),
            to: Some(to),
            kind: Some(kind),
            ack_of: None,
            action,
            count: 1,
        }
    }
    pub(crate) fn times(mut self, count: u32) -> Self {
        self.count = count;
        self
    }
    pub(crate) fn ack_of(mut self, of: AckOf) -> Self {
        self.ack_of = Some(of);
        self
    }
    fn matches(&self, from: usize, to: usize, message: &Message) -> bool {
        self.count > 0
            && self.from.is_none_or(|f| f == from)
            && self.to.is_none_or(|t| t == to)
            && self.kind.is_none_or(|k| k == message.kind())
            && self
                .ack_of
                .is_none_or(|of| matches!(message, Message::Ack { of: o, .. } if *o == of))
    }
}

pub(crate) struct Node {
    pub name: &'static str,
    pub keypair: Keypair,
    pub addr: SocketAddr,
    pub endpoint: Endpoint,
    pub config: Config,
    pub allow: AllowList,
    pub app: App,
    pub up: bool,
    /// Every event this node's application saw (across restarts).
    pub events: Vec<Event>,
    /// The endpoint was given the wall clock (as a driver does), across restarts: with
    /// keys known, its Requests ride in IK message 1. Off by default, so that the
    /// message-level fault rules see every Request.
    pub clocked: bool,
    /// Durable nodes: what survives a crash (committed before any output is performed).
    pub store: Option<Rows>,
    /// Whether the application takes outcomes from the store as it sees them (false: they
    /// stay, as dead letters of an application that crashed before reading them).
    pub takes_outcomes: bool,
    /// The membership document its operator installed (installed again at each restart).
    pub membership: Option<crate::membership::Signed>,
    /// The life of the address records it publishes, once its operator installed records
    /// (installed again at each restart, publishing `addr`).
    pub records: Option<Duration>,
    incarnation: u64,
    /// Inbound connections accepted so far (numbers their ids).
    accepted: u64,
    /// Connection id -> link carrying it.
    conn_links: BTreeMap<ConnId, usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Dialer,
    Acceptor,
}

struct End {
    node: usize,
    conn: Option<ConnId>,
    connection: Option<Connection>,
    /// The node incarnation this end belongs to; a crash orphans it.
    incarnation: u64,
}

struct Link {
    dialer: End,
    acceptor: End,
    /// A partition swallowed a frame: the stream is silently dead (a black hole).
    black_holed: bool,
}

impl Side {
    fn other(self) -> Self {
        match self {
            Self::Dialer => Self::Acceptor,
            Self::Acceptor => Self::Dialer,
        }
    }
}

impl Link {
    fn end(&mut self, side: Side) -> &mut End {
        match side {
            Side::Dialer => &mut self.dialer,
            Side::Acceptor => &mut self.acceptor,
        }
    }
}

enum Delivery {
    Frame {
        link: usize,
        to: Side,
        frame: Vec<u8>,
    },
    Send {
        link: usize,
        from: Side,
        message: Message,
    },
    Respond {
        node: usize,
        incarnation: u64,
        peer: PeerId,
        exchange: ExchangeId,
        payload: Bytes,
    },
    Refused {
        link: usize,
    },
    Fin {
        link: usize,
        to: Side,
    },
}

pub(crate) struct Net {
    pub start: Instant,
    pub now: Instant,
    pub nodes: Vec<Node>,
    pub latency: Duration,
    pub rules: Vec<Rule>,
    pub trace: Vec<String>,
    links: Vec<Link>,
    queue: BTreeMap<(Instant, u64), Delivery>,
    seq: u64,
    rng: ChaCha20Rng,
    partitions: BTreeSet<(usize, usize)>,
    /// (responder, responder incarnation, dialer, exchange) -> times delivered.
    delivered: BTreeMap<(usize, u64, PeerId, ExchangeId), u32>,
    /// Durable responders, across incarnations: (responder, dialer, exchange) -> deliveries
    /// not flagged as redeliveries.
    delivered_fresh: BTreeMap<(usize, PeerId, ExchangeId), u32>,
}

impl Net {
    /// A network of nodes, each allowing all the others, with keys from `seed`.
    pub(crate) fn new(seed: u64, names: &[&'static str], config: Config) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let keys: Vec<Keypair> = names.iter().map(|_| Keypair::generate(&mut rng)).collect();
        let start = Instant::now();
        let mut net = Self {
            start,
            now: start,
            nodes: Vec::new(),
            latency: Duration::from_millis(10),
            rules: Vec::new(),
            trace: Vec::new(),
            links: Vec::new(),
            queue: BTreeMap::new(),
            seq: 0,
            rng,
            partitions: BTreeSet::new(),
            delivered: BTreeMap::new(),
            delivered_fresh: BTreeMap::new(),
        };
        for (i, (name, keypair)) in names.iter().zip(&keys).enumerate() {
            // Members of one network know each other's keys: dials use IK.
            let allow = AllowList::from_keys(
                keys.iter()
                    .filter(|k| k.peer_id() != keypair.peer_id())
                    .map(|k| *k.public_bytes()),
            );
            let addr = SocketAddr::from(([10, 0, 0, i as u8 + 1], 7000));
            let mut seed = [0u8; 32];
            net.rng.fill_bytes(&mut seed);
            let endpoint = Endpoint::new(config.clone(), keypair.peer_id(), allow.clone(), seed)
                .expect("valid test config");
            net.nodes.push(Node {
                name,
                keypair: keypair.clone(),
                addr,
                endpoint,
                config: config.clone(),
                allow,
                app: App::Echo,
                up: true,
                events: Vec::new(),
                store: None,
                takes_outcomes: true,
                membership: None,
                records: None,
                incarnation: 0,
                clocked: false,
                accepted: 0,
                conn_links: BTreeMap::new(),
            });
        }
        net
    }

    pub(crate) fn id(&self, node: usize) -> PeerId {
        self.nodes[node].keypair.peer_id()
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn log(&mut self, line: String) {
        let t = self.elapsed();
        self.trace.push(format!(
            "{:>4}.{:03}s {line}",
            t.as_secs(),
            t.subsec_millis()
        ));
    }

    fn schedule(&mut self, at: Instant, delivery: Delivery) {
        self.seq += 1;
        self.queue.insert((at, self.seq), delivery);
    }

    // ----- application actions -----

    pub(crate) fn request(&mut self, from: usize, to: usize, payload: &[u8]) -> ExchangeId {
        self.try_request(from, to, payload)
            .expect("request accepted")
    }

    pub(crate) fn try_request(
        &mut self,
        from: usize,
        to: usize,
        payload: &[u8],
    ) -> Result<ExchangeId, crate::endpoint::RequestError> {
        let (peer, addr, now) = (self.id(to), self.nodes[to].addr, self.now);
        let id =
            self.nodes[from]
                .endpoint
                .request(peer, addr, Bytes::copy_from_slice(payload), now)?;
        let name = (self.nodes[from].name, self.nodes[to].name);
        self.log(format!(
            "{} app: request {id} to {} ({} B)",
            name.0,
            name.1,
            payload.len()
        ));
        self.drain(from);
        Ok(id)
    }

    /// A request by peer id alone: the address comes from `to`'s address record.
    pub(crate) fn request_to(
        &mut self,
        from: usize,
        to: usize,
        payload: &[u8],
    ) -> Result<ExchangeId, crate::endpoint::RequestError> {
        let (peer, now) = (self.id(to), self.now);
        let id =
            self.nodes[from]
                .endpoint
                .request_to(peer, Bytes::copy_from_slice(payload), now)?;
        let name = (self.nodes[from].name, self.nodes[to].name);
        self.log(format!("{} app: request_to {id} to {}", name.0, name.1));
        self.drain(from);
        Ok(id)
    }

    /// A request with an idempotency key and/or a deadline `within` from now (stored with
    /// its wall-clock time, as a durable driver stores it).
    pub(crate) fn request_with(
        &mut self,
        from: usize,
        to: usize,
        payload: &[u8],
        key: Option<&'static [u8]>,
        within: Option<Duration>,
    ) -> Result<ExchangeId, crate::endpoint::RequestError> {
        let (peer, addr, now, wall) = (self.id(to), self.nodes[to].addr, self.now, self.wall_ms());
        let deadline = within.map(|d| crate::endpoint::Deadline {
            at: now + d,
            unix_ms: Some(wall + u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        });
        let id = self.nodes[from].endpoint.request_with(
            peer,
            addr,
            Bytes::copy_from_slice(payload),
            key.map(Bytes::from_static),
            deadline,
            now,
        )?;
        let name = (self.nodes[from].name, self.nodes[to].name);
        self.log(format!(
            "{} app: request {id} to {} (keyed)",
            name.0, name.1
        ));
        self.drain(from);
        Ok(id)
    }

    pub(crate) fn respond(
        &mut self,
        node: usize,
        peer: PeerId,
        exchange: ExchangeId,
        payload: &[u8],
    ) {
        let _ = self.try_respond(node, peer, exchange, payload);
    }

    /// The application answers; returns what the endpoint said.
    pub(crate) fn try_respond(
        &mut self,
        node: usize,
        peer: PeerId,
        exchange: ExchangeId,
        payload: &[u8],
    ) -> Result<(), crate::endpoint::RespondError> {
        let now = self.now;
        let result =
            self.nodes[node]
                .endpoint
                .respond(peer, exchange, Bytes::copy_from_slice(payload), now);
        let name = self.nodes[node].name;
        self.log(format!("{name} app: respond {exchange} -> {result:?}"));
        self.drain(node);
        result
    }

    pub(crate) fn shutdown(&mut self, node: usize) {
        let now = self.now;
        self.nodes[node].endpoint.shutdown(now);
        let name = self.nodes[node].name;
        self.log(format!("{name} app: shutdown"));
        self.drain(node);
    }

    // ----- faults -----

    pub(crate) fn partition(&mut self, a: usize, b: usize) {
        self.partitions.insert((a.min(b), a.max(b)));
        self.log(format!(
            "fault: partition {} | {}",
            self.nodes[a].name, self.nodes[b].name
        ));
    }

    pub(crate) fn repair(&mut self, a: usize, b: usize) {
        self.partitions.remove(&(a.min(b), a.max(b)));
        self.log(format!(
            "fault: repair {} | {}",
            self.nodes[a].name, self.nodes[b].name
        ));
    }

    fn partitioned(&self, a: usize, b: usize) -> bool {
        self.partitions.contains(&(a.min(b), a.max(b)))
    }

    /// The node's process dies: its peers see their connections reset.
    pub(crate) fn crash(&mut self, node: usize) {
        self.log(format!("fault: crash {}", self.nodes[node].name));
        self.nodes[node].up = false;
        self.nodes[node].conn_links.clear();
        for link in 0..self.links.len() {
            for (side, other) in [
                (Side::Dialer, Side::Acceptor),
                (Side::Acceptor, Side::Dialer),
            ] {
                let end = self.links[link].end(side);
                if end.node == node && end.connection.is_some() {
                    end.connection = None;
                    end.conn = None;
                    self.reset(link, other, "connection reset by peer (crashed)");
                }
            }
        }
    }

    /// The node comes back with the same key and a fresh endpoint: with no memory, or
    /// restored from its store if it is durable.
    pub(crate) fn restart(&mut self, node: usize) {
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let (now, wall) = (self.now, self.wall_ms());
        let n = &mut self.nodes[node];
        n.endpoint = Endpoint::new(n.config.clone(), n.keypair.peer_id(), n.allow.clone(), seed)
            .expect("valid config");
        if n.clocked {
            n.endpoint.set_wall_clock(now, wall);
        }
        n.up = true;
        n.incarnation += 1;
        self.log(format!("fault: restart {}", self.nodes[node].name));
        if let Some(store) = &self.nodes[node].store {
            let rows = store.iter().map(|((t, k), v)| (*t, k.clone(), v.clone()));
            let recovered =
                durable::decode(self.nodes[node].keypair.peer_id(), rows).expect("store decodes");
            let outcomes = self.nodes[node].endpoint.restore(recovered, now, wall);
            for event in outcomes {
                self.on_app_event(node, event);
            }
            self.drain(node);
        }
        if let Some(doc) = self.nodes[node].membership.clone() {
            let _ = self.install_membership(node, doc);
        }
        if let Some(ttl) = self.nodes[node].records {
            self.install_records(node, ttl);
        }
    }

    /// The node's operator turns address records on: it publishes its `addr` in records
    /// living `ttl`. Needs its membership installed.
    pub(crate) fn install_records(&mut self, node: usize, ttl: Duration) {
        let now = self.now;
        let n = &mut self.nodes[node];
        n.records = Some(ttl);
        let signer = crate::records::RecordSigner::new(&n.keypair);
        let settings = crate::endpoint::RecordSettings {
            addresses: vec![n.addr],
            ttl,
        };
        n.endpoint
            .install_records(signer, settings, now)
            .expect("records install");
        let name = n.name;
        self.log(format!("{name} records installed"));
        self.drain(node);
    }

    /// Offers `records` to `node` as its records directory would.
    pub(crate) fn offer_records(&mut self, node: usize, records: Vec<Bytes>) -> usize {
        let now = self.now;
        let taken = self.nodes[node].endpoint.offer_records(records, now);
        self.drain(node);
        taken
    }

    /// Gives every node the wall clock, as a driver does (a second before the first step,
    /// as if they had started then): with keys known, Requests ride in IK message 1.
    pub(crate) fn with_wall_clocks(mut self) -> Self {
        let booted = self
            .start
            .checked_sub(Duration::from_secs(1))
            .unwrap_or(self.start);
        let at_boot = WALL_EPOCH_MS - u64::try_from((self.start - booted).as_millis()).unwrap_or(0);
        for n in &mut self.nodes {
            n.clocked = true;
            n.endpoint.set_wall_clock(booted, at_boot);
        }
        self
    }

    /// The node's operator installs `doc`: signed membership governs its allow list.
    pub(crate) fn install_membership(
        &mut self,
        node: usize,
        doc: crate::membership::Signed,
    ) -> crate::endpoint::Installed {
        let (now, wall) = (self.now, self.wall_ms());
        let n = &mut self.nodes[node];
        n.membership = Some(doc.clone());
        n.endpoint.set_wall_clock(now, wall);
        let installed = n.endpoint.install_membership(Some(doc), now);
        let name = n.name;
        self.log(format!("{name} membership installed: {installed:?}"));
        let installed = installed.expect("membership installs");
        self.drain(node);
        installed
    }

    /// The node's operator offers a newer document.
    pub(crate) fn offer_membership(
        &mut self,
        node: usize,
        doc: crate::membership::Signed,
    ) -> Result<Vec<crate::membership::Signed>, crate::membership::Refused> {
        let now = self.now;
        let result = self.nodes[node].endpoint.offer_membership(doc, now);
        self.drain(node);
        result
    }

    /// Sends `message` from `from` to `to` on an open connection between them, as a
    /// misbehaving peer would (bypassing `from`'s endpoint). False if none is open.
    pub(crate) fn inject(&mut self, from: usize, to: usize, message: Message) -> bool {
        for link in 0..self.links.len() {
            for (side, other) in [
                (Side::Dialer, Side::Acceptor),
                (Side::Acceptor, Side::Dialer),
            ] {
                let l = &mut self.links[link];
                let open = |e: &mut End| {
                    e.connection
                        .as_ref()
                        .is_some_and(Connection::is_established)
                };
                if l.end(side).node == from
                    && l.end(other).node == to
                    && open(l.end(side))
                    && open(l.end(other))
                {
                    self.encrypt_and_ship(link, side, &message, false);
                    return true;
                }
            }
        }
        false
    }

    /// The epoch in force at `node`.
    pub(crate) fn epoch(&self, node: usize) -> u64 {
        self.nodes[node]
            .endpoint
            .membership()
            .map_or(0, |l| l.epoch())
    }

    /// Makes a node durable, with an empty store. Call before it does anything.
    pub(crate) fn make_durable(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        let mut store = BTreeMap::new();
        apply(&mut store, durable::header(n.keypair.peer_id()));
        n.store = Some(store);
        let (now, wall) = (self.now, self.wall_ms());
        self.nodes[node]
            .endpoint
            .restore(Recovered::default(), now, wall);
    }

    /// Commits what the node's endpoint journaled since its last step (a driver commits
    /// after every command).
    pub(crate) fn commit(&mut self, node: usize) {
        let journal = self.nodes[node].endpoint.poll_journal();
        if let Some(store) = &mut self.nodes[node].store {
            apply(store, journal);
        }
    }

    /// The virtual wall clock, in milliseconds since the Unix epoch (deadlines a durable
    /// node stores are measured on it).
    pub(crate) fn wall_ms(&self) -> u64 {
        WALL_EPOCH_MS + u64::try_from((self.now - self.start).as_millis()).unwrap_or(u64::MAX)
    }

    /// Tells one end that its stream broke.
    fn reset(&mut self, link: usize, side: Side, why: &str) {
        let end = self.links[link].end(side);
        let (node, conn) = (end.node, end.conn);
        end.connection = None;
        end.conn = None;
        if !self.nodes[node].up || end.incarnation != self.nodes[node].incarnation {
            return;
        }
        if let Some(conn) = conn {
            self.nodes[node].conn_links.remove(&conn);
            let now = self.now;
            self.nodes[node].endpoint.handle_conn_event(
                conn,
                ConnEvent::Closed(Closed::Io(why.to_owned())),
                now,
            );
            self.drain(node);
        }
    }

    // ----- running -----

    fn next_deadline(&self) -> Option<Instant> {
        let queued = self.queue.keys().next().map(|(t, _)| *t);
        let timers = self
            .nodes
            .iter()
            .filter(|n| n.up)
            .filter_map(|n| n.endpoint.poll_timeout());
        let handshakes = self.links.iter().flat_map(|l| {
            [&l.dialer, &l.acceptor]
                .into_iter()
                .filter_map(|e| e.connection.as_ref()?.poll_timeout())
        });
        queued.into_iter().chain(timers).chain(handshakes).min()
    }

    /// Advances to the next scheduled thing and does it. False when nothing is left.
    pub(crate) fn step(&mut self) -> bool {
        let Some(at) = self.next_deadline() else {
            return false;
        };
        self.now = self.now.max(at);
        let now = self.now;
        if let Some(entry) = self.queue.first_entry()
            && entry.key().0 <= now
        {
            let delivery = entry.remove();
            self.deliver(delivery);
            self.check();
            return true;
        }
        for link in 0..self.links.len() {
            for side in [Side::Dialer, Side::Acceptor] {
                let due = self.links[link]
                    .end(side)
                    .connection
                    .as_ref()
                    .and_then(Connection::poll_timeout)
                    .is_some_and(|t| t <= now);
                if due {
                    if let Some(c) = self.links[link].end(side).connection.as_mut() {
                        c.handle_timeout(now);
                    }
                    self.after_connection_input(link, side);
                }
            }
        }
        for node in 0..self.nodes.len() {
            if self.nodes[node].up
                && self.nodes[node]
                    .endpoint
                    .poll_timeout()
                    .is_some_and(|t| t <= now)
            {
                self.nodes[node].endpoint.handle_timeout(now);
                self.drain(node);
            }
        }
        self.check();
        true
    }

    /// Runs until nothing is scheduled (all timers fired, all frames delivered) or `limit`
    /// of virtual time passed. Returns whether it went quiet.
    pub(crate) fn run(&mut self, limit: Duration) -> bool {
        let end = self.now + limit;
        for _ in 0..1_000_000 {
            match self.next_deadline() {
                None => return true,
                Some(t) if t > end => {
                    self.now = end;
                    return false;
                }
                Some(_) => {
                    self.step();
                }
            }
        }
        panic!("harness did not settle in a million steps");
    }

    /// Runs until `done` holds, at most `limit` of virtual time.
    pub(crate) fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&Net) -> bool,
    ) -> bool {
        let end = self.now + limit;
        while !done(self) {
            match self.next_deadline() {
                Some(t) if t <= end => {
                    self.step();
                }
                _ => return false,
            }
        }
        true
    }

    /// Runs for exactly `d` of virtual time.
    pub(crate) fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.next_deadline().is_some_and(|t| t <= end) {
            self.step();
        }
        self.now = end;
    }

    fn check(&self) {
        for n in self.nodes.iter().filter(|n| n.up) {
            n.endpoint.check_invariants();
        }
        for ((node, _, peer, exchange), count) in &self.delivered {
            assert!(
                *count <= 1,
                "{} got request {exchange} from {} {count} times",
                self.nodes[*node].name,
                peer.short()
            );
        }
        for ((node, peer, exchange), count) in &self.delivered_fresh {
            assert!(
                *count <= 1,
                "{} got request {exchange} from {} {count} times across restarts",
                self.nodes[*node].name,
                peer.short()
            );
        }
    }

    fn deliver(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::Frame { link, to, frame } => {
                let node = self.links[link].end(to).node;
                let allow = self.nodes[node].endpoint.allow_list().clone();
                let now = self.now;
                let Some(c) = self.links[link].end(to).connection.as_mut() else {
                    return;
                };
                c.handle_frame(&frame, &allow, now);
                self.after_connection_input(link, to);
            }
            Delivery::Send {
                link,
                from,
                message,
            } => self.encrypt_and_ship(link, from, &message, false),
            Delivery::Respond {
                node,
                incarnation,
                peer,
                exchange,
                payload,
            } => {
                if self.nodes[node].up && self.nodes[node].incarnation == incarnation {
                    self.respond(node, peer, exchange, &payload);
                }
            }
            Delivery::Refused { link } => {
                self.log("net: connection refused".to_owned());
                self.reset(link, Side::Dialer, "connection refused");
            }
            Delivery::Fin { link, to } => {
                if self.links[link].end(to).connection.is_some() {
                    self.reset(link, to, "connection closed by peer");
                }
            }
        }
    }

    /// Forwards a connection's events to its endpoint and ships its frames.
    fn after_connection_input(&mut self, link: usize, side: Side) {
        self.ship_frames(link, side);
        loop {
            let end = self.links[link].end(side);
            let (node, conn) = (end.node, end.conn);
            let Some(event) = end.connection.as_mut().and_then(Connection::poll_event) else {
                break;
            };
            let closed = matches!(event, ConnEvent::Closed(_));
            if closed {
                // Keep nothing but what must still be flushed (already shipped above).
                self.links[link].end(side).connection = None;
                self.links[link].end(side).conn = None;
                // The stream ends with it: the other side sees FIN after the last frames.
                let (a, b) = (self.links[link].dialer.node, self.links[link].acceptor.node);
                if !self.partitioned(a, b) && !self.links[link].black_holed {
                    let at = self.now + self.latency;
                    self.schedule(
                        at,
                        Delivery::Fin {
                            link,
                            to: side.other(),
                        },
                    );
                }
            }
            if !self.nodes[node].up {
                continue;
            }
            let now = self.now;
            let name = self.nodes[node].name;
            match (conn, event) {
                (
                    None,
                    ConnEvent::Established {
                        peer,
                        remote_max_message_size,
                        remote_features,
                        ..
                    },
                ) => {
                    let addr = self.nodes[self.links[link].dialer.node].addr;
                    self.nodes[node].accepted += 1;
                    let id = ConnId::inbound(self.nodes[node].accepted);
                    self.nodes[node].endpoint.handle_accepted(
                        id,
                        peer,
                        addr,
                        remote_max_message_size,
                        remote_features,
                        now,
                    );
                    self.links[link].end(side).conn = Some(id);
                    self.nodes[node].conn_links.insert(id, link);
                    self.log(format!("{name} accepted {id} from {}", peer.short()));
                }
                (None, ConnEvent::Closed(Closed::Error(e))) => {
                    self.log(format!("{name} rejected connection: {e}"));
                    self.nodes[node].endpoint.handle_rejected(e, now);
                }
                (None, _) => {}
                (Some(id), event) => {
                    if closed {
                        self.nodes[node].conn_links.remove(&id);
                    }
                    if let ConnEvent::Message(m) = &event {
                        self.log(format!("{name} {id} <- {m:?}"));
                    } else {
                        self.log(format!("{name} {id} {event:?}"));
                    }
                    self.nodes[node].endpoint.handle_conn_event(id, event, now);
                }
            }
            self.drain(node);
        }
    }

    fn ship_frames(&mut self, link: usize, from: Side) {
        let to = from.other();
        let (a, b) = (self.links[link].dialer.node, self.links[link].acceptor.node);
        while let Some(frame) = self.links[link]
            .end(from)
            .connection
            .as_mut()
            .and_then(Connection::poll_transmit)
        {
            if self.partitioned(a, b) || self.links[link].black_holed {
                self.links[link].black_holed = true;
                continue;
            }
            let at = self.now + self.latency;
            self.schedule(at, Delivery::Frame { link, to, frame });
        }
    }

    /// Performs every output of a node's endpoint and collects its events.
    fn drain(&mut self, node: usize) {
        if !self.nodes[node].up {
            return;
        }
        // Commit first: nothing leaves before the state that explains it is durable.
        let journal = self.nodes[node].endpoint.poll_journal();
        if let Some(store) = &mut self.nodes[node].store {
            apply(store, journal);
        }
        while let Some(output) = self.nodes[node].endpoint.poll_output() {
            self.perform(node, output);
        }
        while let Some(event) = self.nodes[node].endpoint.poll_event() {
            self.on_app_event(node, event);
        }
    }

    fn perform(&mut self, node: usize, output: Output) {
        let now = self.now;
        let name = self.nodes[node].name;
        match output {
            Output::Dial {
                conn,
                peer,
                addr,
                key,
                early,
                ticket,
            } => {
                let how = match (key, &early) {
                    (Some(_), Some(_)) => "IK+request",
                    (Some(_), None) => "IK",
                    (None, _) => "XX",
                };
                self.log(format!(
                    "{name} dial {conn} to {} at {addr} ({how})",
                    peer.short()
                ));
                let mut seed = [0u8; 32];
                self.rng.fill_bytes(&mut seed);
                let n = &self.nodes[node];
                let ik = key.as_ref().map(|key| IkDial {
                    key,
                    early: early.as_ref().map(|(at, m)| (*at, m)),
                    ticket,
                });
                let dialer =
                    Connection::dial_with(&n.keypair, peer, addr, seed, &n.config, now, ik)
                        .expect("dial state");
                let target = self.nodes.iter().position(|n| n.addr == addr);
                let link = self.links.len();
                self.nodes[node].conn_links.insert(conn, link);
                let incarnation = self.nodes[node].incarnation;
                let acceptor = match target {
                    Some(t) if self.nodes[t].up => {
                        self.rng.fill_bytes(&mut seed);
                        let from = self.nodes[node].addr;
                        let tn = &self.nodes[t];
                        Some((
                            t,
                            Connection::accept(&tn.keypair, from, seed, &tn.config, now)
                                .expect("accept state"),
                            tn.incarnation,
                        ))
                    }
                    _ => None,
                };
                let refused = acceptor.is_none();
                let (t, acc, t_inc) = match acceptor {
                    Some((t, c, inc)) => (t, Some(c), inc),
                    None => (target.unwrap_or(usize::MAX), None, 0),
                };
                self.links.push(Link {
                    dialer: End {
                        node,
                        conn: Some(conn),
                        connection: Some(dialer),
                        incarnation,
                    },
                    acceptor: End {
                        node: t,
                        conn: None,
                        connection: acc,
                        incarnation: t_inc,
                    },
                    black_holed: false,
                });
                if refused {
                    let partitioned = target.is_some_and(|t| self.partitioned(node, t));
                    if !partitioned {
                        let at = now + self.latency;
                        self.schedule(at, Delivery::Refused { link });
                    }
                    // Drop the dialer's first frame; nothing is listening.
                    if let Some(c) = self.links[link].dialer.connection.as_mut() {
                        while c.poll_transmit().is_some() {}
                    }
                } else {
                    self.ship_frames(link, Side::Dialer);
                }
            }
            Output::Send { conn, message, .. } => {
                let Some(&link) = self.nodes[node].conn_links.get(&conn) else {
                    return;
                };
                let from = self.side_of(link, node, conn);
                self.log(format!("{name} {conn} -> {message:?}"));
                let other = match from {
                    Side::Dialer => self.links[link].acceptor.node,
                    Side::Acceptor => self.links[link].dialer.node,
                };
                let rule = self
                    .rules
                    .iter_mut()
                    .find(|r| r.matches(node, other, &message));
                let action = rule.map(|r| {
                    r.count -= 1;
                    r.action
                });
                match action {
                    None => self.encrypt_and_ship(link, from, &message, false),
                    Some(Action::Drop) => self.log(format!("fault: drop {message:?}")),
                    Some(Action::Corrupt) => {
                        self.log(format!("fault: corrupt {message:?}"));
                        self.encrypt_and_ship(link, from, &message, true);
                    }
                    Some(action @ (Action::Duplicate(d) | Action::Delay(d))) => {
                        if matches!(action, Action::Duplicate(_)) {
                            self.log(format!("fault: duplicate {message:?} after {d:?}"));
                            self.encrypt_and_ship(link, from, &message, false);
                        } else {
                            self.log(format!("fault: delay {message:?} by {d:?}"));
                        }
                        self.schedule(
                            now + d,
                            Delivery::Send {
                                link,
                                from,
                                message,
                            },
                        );
                    }
                    Some(Action::Nack(reason)) => {
                        self.log(format!("fault: answer {message:?} with Nack {reason:?}"));
                        if let (Some(exchange), Some(attempt)) =
                            (message.exchange(), message.attempt())
                        {
                            let nack = Message::Nack {
                                exchange,
                                attempt,
                                reason,
                                retry_after_ms: 0,
                            };
                            let to = from.other();
                            // Forged by the receiver when the request would have arrived,
                            // so its side of the handshake is done by then.
                            let at = now + self.latency;
                            self.schedule(
                                at,
                                Delivery::Send {
                                    link,
                                    from: to,
                                    message: nack,
                                },
                            );
                        }
                    }
                }
            }
            // Handshakes here check the endpoint's own list: nothing to copy.
            Output::AllowList(_) => self.log(format!("{name} allow list replaced")),
            Output::Close { conn, reason, .. } => {
                self.log(format!("{name} close {conn} ({reason:?})"));
                let Some(link) = self.nodes[node].conn_links.remove(&conn) else {
                    return;
                };
                let side = self.side_of(link, node, conn);
                if let Some(c) = self.links[link].end(side).connection.as_mut() {
                    c.close(reason);
                }
                self.ship_frames(link, side);
                let end = self.links[link].end(side);
                end.connection = None;
                end.conn = None;
                // A TCP close reaches the other side even without a Close message (FIN).
                // It arrives after any frame already in flight, so a Close message, when
                // there was one, is processed first.
                let other = side.other();
                let (a, b) = (self.links[link].dialer.node, self.links[link].acceptor.node);
                if !self.partitioned(a, b) && !self.links[link].black_holed {
                    let at = now + self.latency;
                    self.schedule(at, Delivery::Fin { link, to: other });
                }
            }
        }
    }

    /// Which end of `link` is `node`'s connection `conn`. Connection ids are per endpoint,
    /// so both the node and the id must match.
    fn side_of(&self, link: usize, node: usize, conn: ConnId) -> Side {
        let dialer = &self.links[link].dialer;
        if dialer.node == node && dialer.conn == Some(conn) {
            Side::Dialer
        } else {
            Side::Acceptor
        }
    }

    fn encrypt_and_ship(&mut self, link: usize, from: Side, message: &Message, corrupt: bool) {
        let Some(c) = self.links[link].end(from).connection.as_mut() else {
            return;
        };
        if c.send(message).is_err() {
            return;
        }
        if corrupt {
            let mut frames: Vec<Vec<u8>> = std::iter::from_fn(|| c.poll_transmit()).collect();
            if let Some(first) = frames.first_mut() {
                let i = first.len() / 2;
                first[i] ^= 0x5a;
            }
            let to = from.other();
            let at = self.now + self.latency;
            for frame in frames {
                self.schedule(at, Delivery::Frame { link, to, frame });
            }
        } else {
            self.ship_frames(link, from);
        }
    }

    fn on_app_event(&mut self, node: usize, event: Event) {
        let name = self.nodes[node].name;
        self.log(format!("{name} event: {}", short_event(&event)));
        if let Event::Request {
            peer,
            exchange,
            payload,
            ..
        } = &event
        {
            let incarnation = self.nodes[node].incarnation;
            *self
                .delivered
                .entry((node, incarnation, *peer, *exchange))
                .or_default() += 1;
            let redelivered = matches!(
                event,
                Event::Request {
                    redelivered: true,
                    ..
                }
            );
            if self.nodes[node].store.is_some() && !redelivered {
                *self
                    .delivered_fresh
                    .entry((node, *peer, *exchange))
                    .or_default() += 1;
            }
            let mut reply = b"re:".to_vec();
            reply.extend_from_slice(payload);
            match self.nodes[node].app {
                App::Echo => {
                    let at = self.now;
                    self.schedule(
                        at,
                        Delivery::Respond {
                            node,
                            incarnation,
                            peer: *peer,
                            exchange: *exchange,
                            payload: reply.into(),
                        },
                    );
                }
                App::EchoAfter(d) => {
                    let at = self.now + d;
                    self.schedule(
                        at,
                        Delivery::Respond {
                            node,
                            incarnation,
                            peer: *peer,
                            exchange: *exchange,
                            payload: reply.into(),
                        },
                    );
                }
                App::Manual => {}
            }
        }
        // The application takes its outcomes at once: the store forgets them.
        if self.nodes[node].takes_outcomes {
            let endpoint = &mut self.nodes[node].endpoint;
            if let Event::Reply { exchange, .. } | Event::Failed { exchange, .. } = &event {
                endpoint.outcome_settled(*exchange);
            } else if let Some((peer, exchange)) = event.response_of() {
                endpoint.response_outcome_taken(peer, exchange);
            }
            let journal = endpoint.poll_journal();
            if let Some(store) = &mut self.nodes[node].store {
                apply(store, journal);
            }
        }
        self.nodes[node].events.push(event);
    }

    // ----- queries -----

    pub(crate) fn replies(&self, node: usize) -> Vec<(ExchangeId, Bytes)> {
        self.nodes[node]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Reply {
                    exchange, payload, ..
                } => Some((*exchange, payload.clone())),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn requests_seen(&self, node: usize) -> Vec<(PeerId, ExchangeId, Bytes)> {
        self.nodes[node]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Request {
                    peer,
                    exchange,
                    payload,
                    ..
                } => Some((*peer, *exchange, payload.clone())),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn failures(
        &self,
        node: usize,
    ) -> Vec<(ExchangeId, crate::endpoint::Failure, Bytes)> {
        self.nodes[node]
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Failed {
                    exchange,
                    failure,
                    payload,
                    ..
                } => Some((*exchange, failure.clone(), payload.clone())),
                _ => None,
            })
            .collect()
    }

    /// The outcome events (Reply or Failed) of `node`'s exchange `id`.
    pub(crate) fn outcomes(&self, node: usize, id: ExchangeId) -> usize {
        self.nodes[node]
            .events
            .iter()
            .filter(|e| {
                matches!(e, Event::Reply { exchange, .. } | Event::Failed { exchange, .. } if *exchange == id)
            })
            .count()
    }

    pub(crate) fn has_outcome(&self, node: usize, id: ExchangeId) -> bool {
        self.outcomes(node, id) > 0
    }

    pub(crate) fn open_links(&self) -> usize {
        self.links
            .iter()
            .filter(|l| l.dialer.connection.is_some() || l.acceptor.connection.is_some())
            .count()
    }
}

fn short_event(event: &Event) -> String {
    match event {
        Event::Request {
            peer,
            exchange,
            payload,
            ..
        } => format!(
            "Request {exchange} from {} ({} B)",
            peer.short(),
            payload.len()
        ),
        Event::Reply {
            peer,
            exchange,
            payload,
            ..
        } => format!(
            "Reply {exchange} from {} ({} B)",
            peer.short(),
            payload.len()
        ),
        Event::Failed {
            exchange, failure, ..
        } => format!("Failed {exchange}: {failure:?}"),
        other => format!("{other:?}"),
    }
}
