//! The router task: the listener, dials, the connection limit, and the messages between
//! the handler task and the network side.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::Rng;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use crate::admission::Verdict;
use crate::config::Config;
use crate::connection::{Closed, ConnError, ConnEvent, Connection, IkDial};
use crate::endpoint::{ConnId, Direction, Event};
use crate::identity::{Keypair, PeerId};
use crate::transport::{Listener, Transport};
use crate::wire::{CloseReason, Message};

use super::conn_task::{ByteCounters, ConnCommand, ConnTask};
use super::handle::Notice;
use super::slots::{ConnSlot, Forwarded, SharedGate, Slots, forward};
use super::{SHUTDOWN_GRACE, SharedAllow, now};

/// Messages waiting for one connection's task. An exchange puts at most a few on a
/// connection at once (Ack and Reply, final Ack and Close, a Nack per rate-limited copy), so
/// a queue this deep only fills when the peer stops taking bytes, and such a connection is
/// cut rather than waited for. Independent of `channel_capacity`: a connection's queue must
/// hold a whole burst of one exchange whatever the application's channels are sized at.
const CONN_QUEUE: usize = 64;

/// A dial the endpoint asked for (`Output::Dial`), with the tap's fault for message 1.
pub(super) struct DialCommand {
    pub(super) conn: ConnId,
    pub(super) peer: PeerId,
    pub(super) addr: SocketAddr,
    /// The responder's static key, if known: an IK handshake.
    pub(super) key: Option<[u8; p2p_handler_core::identity::KEY_LEN]>,
    /// With a key: a Request for IK message 1, and its timestamp (Unix ms).
    pub(super) early: Option<(u64, Message)>,
    /// With a key: a ticket the responder gave us, for message 1.
    pub(super) ticket: Option<p2p_handler_core::guard::Ticket>,
    /// Flip a byte of message 1 (a fault injected into the Request it carries).
    pub(super) corrupt_first: bool,
}

pub(super) enum NetCommand {
    Dial(DialCommand),
    Send {
        conn: ConnId,
        message: Message,
    },
    Close {
        conn: ConnId,
        reason: CloseReason,
    },
    /// A graceful stop began: close the listener; established connections go on.
    StopAccepting,
    Shutdown,
}

pub(super) enum NetEvent {
    Accepted {
        conn: ConnId,
        peer: PeerId,
        key: [u8; p2p_handler_core::identity::KEY_LEN],
        addr: SocketAddr,
        remote_max_message_size: usize,
        remote_features: u32,
    },
    Rejected(ConnError),
    Conn {
        conn: ConnId,
        event: ConnEvent,
    },
}

pub(super) enum NetNotice {
    /// The router gave up on a connection (limit, slowness); the endpoint must hear of it.
    Lost { conn: ConnId, why: String },
    /// The number of live connection tasks changed (and how many accepted streams wait for
    /// a handshake slot, and how many unauthenticated ones have been evicted so far).
    Tasks {
        live: usize,
        parked: usize,
        evicted: u64,
        first_messages: crate::guard::GuardStats,
    },
    /// Something only the application needs to know.
    App(Notice),
}

pub(super) struct Router<T: Transport> {
    pub(super) transport: T,
    pub(super) keypair: Arc<Keypair>,
    pub(super) config: Config,
    pub(super) allow: SharedAllow,
    pub(super) rng: ChaCha20Rng,
    pub(super) commands: mpsc::Receiver<NetCommand>,
    pub(super) events: mpsc::Sender<NetEvent>,
    pub(super) notices: mpsc::Sender<NetNotice>,
    /// Notices that found the channel full, oldest first (the router never waits).
    pub(super) pending_notices: VecDeque<NetNotice>,
    pub(super) conns: Slots,
    pub(super) tasks: JoinSet<ConnId>,
    pub(super) accepted: u64,
    /// The admission table of unauthenticated inbound connections.
    pub(super) gate: SharedGate,
    /// Accepted streams waiting for a handshake slot (see `admission`): their tasks read
    /// and sort message 1, and wait for this word before any Diffie-Hellman unless it
    /// proves a ticket.
    pub(super) parked: BTreeMap<ConnId, tokio::sync::oneshot::Sender<()>>,
    /// Shared by every connection task.
    pub(super) bytes: ByteCounters,
    /// The driver's fault points' seed (see `buggify`), and the stream the next
    /// connection task draws them from.
    pub(super) buggify: Option<u64>,
    pub(super) next_stream: u64,
}

pub(super) type Accepted<S> = io::Result<(S, SocketAddr)>;

impl<T: Transport> Router<T> {
    /// The fault points of the next connection task (off unless a seed turned them on).
    fn fault_points(&mut self) -> super::buggify::Points {
        let stream = self.next_stream;
        self.next_stream += 1;
        super::buggify::Points::new(self.buggify, stream)
    }

    pub(super) async fn run(mut self, listener: T::Listener) {
        let (accept_tx, mut accept_rx) = mpsc::channel::<Accepted<T::Stream>>(64);
        let mut acceptor = Some(tokio::spawn(accept_loop(listener, accept_tx)));
        let gate = self.gate.clone();
        let mut timer = super::Timer::new();
        loop {
            let notices = self.notices.clone();
            let expiry = timer.arm(self.gate.with(|table| table.poll_timeout()));
            tokio::select! {
                biased;
                Ok(permit) = notices.reserve(), if !self.pending_notices.is_empty() => {
                    if let Some(notice) = self.pending_notices.pop_front() {
                        permit.send(notice);
                    }
                }
                Some(done) = self.tasks.join_next() => {
                    if let Ok(conn) = done {
                        if let Ok(mut conns) = self.conns.lock() {
                            conns.remove(&conn);
                        }
                        if conn.is_inbound() {
                            self.parked.remove(&conn);
                            self.gate.with(|table| table.ended(conn, now()));
                            self.admit_parked();
                        }
                    }
                    self.notify_tasks();
                }
                // A handshake authenticated: parked streams may take its slot.
                () = gate.wake.notified() => self.admit_parked(),
                () = timer.wait(), if expiry => {
                    timer.fired();
                    self.gate.with(|table| table.handle_timeout(now()));
                    self.admit_parked();
                }
                command = self.commands.recv() => match command {
                    Some(NetCommand::Shutdown) | None => break,
                    Some(NetCommand::StopAccepting) => {
                        // Dropping the listener refuses new connections at the socket.
                        if let Some(acceptor) = acceptor.take() {
                            acceptor.abort();
                        }
                    }
                    Some(command) => self.command(command),
                },
                Some(accepted) = accept_rx.recv() => self.accepted(accepted),
            }
        }
        if let Some(acceptor) = acceptor {
            acceptor.abort();
        }
        self.shutdown().await;
    }

    fn notify_tasks(&mut self) {
        let evicted = self.gate.with(|table| table.evictions());
        let first_messages = self.gate.guard(|guard| guard.stats());
        self.notify(NetNotice::Tasks {
            live: self.tasks.len(),
            parked: self.parked.len(),
            evicted,
            first_messages,
        });
    }

    fn notify(&mut self, notice: NetNotice) {
        if let Err(mpsc::error::TrySendError::Full(notice)) = self.notices.try_send(notice) {
            self.pending_notices.push_back(notice);
        }
    }

    fn seed(&mut self) -> [u8; 32] {
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        seed
    }

    fn command(&mut self, command: NetCommand) {
        match command {
            NetCommand::Dial(dial) => self.dial(dial),
            NetCommand::Send { conn, message } => self.forward(conn, ConnCommand::Send(message)),
            NetCommand::Close { conn, reason } => self.forward(conn, ConnCommand::Close(reason)),
            NetCommand::StopAccepting | NetCommand::Shutdown => {}
        }
    }

    fn forward(&mut self, conn: ConnId, command: ConnCommand) {
        if let Forwarded::Slow(addr) = forward(&self.conns, conn, command) {
            self.notify(NetNotice::Lost {
                conn,
                why: format!("connection to {addr} too slow: outgoing queue full"),
            });
            self.notify(NetNotice::App(Notice::SlowConnection { addr }));
        }
    }

    /// Connections past their handshake, or ours: what `max_connections` bounds.
    /// (Handshakes of accepted streams have budgets of their own.)
    fn at_limit(&self) -> bool {
        let tasks = self.conns.lock().map_or(0, |c| c.len());
        let handshaking = self.gate.with(|table| table.handshaking());
        tasks.saturating_sub(handshaking) >= self.config.max_connections
    }

    fn dial(&mut self, dial: DialCommand) {
        let DialCommand {
            conn,
            peer,
            addr,
            key,
            early,
            ticket,
            corrupt_first,
        } = dial;
        if self.at_limit() {
            self.notify(NetNotice::Lost {
                conn,
                why: format!("connection limit ({}) reached", self.config.max_connections),
            });
            self.notify(NetNotice::App(Notice::ConnectionLimit {
                addr,
                direction: Direction::Outbound,
            }));
            return;
        }
        let (tx, rx) = mpsc::channel(CONN_QUEUE);
        let seed = self.seed();
        let transport = self.transport.clone();
        let keypair = self.keypair.clone();
        let config = self.config.clone();
        let bytes = self.bytes.clone();
        let allow = self.allow.clone();
        let events = self.events.clone();
        let buggify = self.fault_points();
        let abort = self.tasks.spawn(async move {
            let mut rx = rx;
            // While connecting, a Close (the endpoint's connect timeout) or a dropped channel
            // abandons the dial: a connect to a black hole may never return by itself.
            let connected = tokio::select! {
                biased;
                command = rx.recv() => match command {
                    Some(ConnCommand::Close(_)) | None => return conn,
                    // Nothing is sent before the endpoint hears the connection is up.
                    Some(_) => return conn,
                },
                connected = transport.connect(addr) => connected,
            };
            let stream = match connected {
                Ok(stream) => stream,
                Err(e) => {
                    let event = ConnEvent::Closed(Closed::Io(connect_failed(addr, &e)));
                    let _ = events.send(NetEvent::Conn { conn, event }).await;
                    return conn;
                }
            };
            let ik = key.as_ref().map(|key| IkDial {
                key,
                early: early.as_ref().map(|(at, m)| (*at, m)),
                ticket,
            });
            let dialed = Connection::dial_with(&keypair, peer, addr, seed, &config, now(), ik);
            match dialed {
                Ok(connection) => {
                    let task = ConnTask {
                        conn,
                        announced: true,
                        gate: None,
                        turn: None,
                        screened: true,
                        held: false,
                        connection,
                        allow,
                        commands: rx,
                        events,
                        corrupt_next: corrupt_first,
                        peer_progressed: false,
                        write_stall_timeout: config.write_stall_timeout,
                        bytes,
                        buggify,
                    };
                    task.run(stream).await;
                }
                Err(e) => {
                    let event = ConnEvent::Closed(Closed::Error(e));
                    let _ = events.send(NetEvent::Conn { conn, event }).await;
                }
            }
            conn
        });
        self.register(conn, tx, abort, addr);
    }

    /// Records a spawned connection task so commands can reach it and limits count it.
    fn register(
        &mut self,
        conn: ConnId,
        commands: mpsc::Sender<ConnCommand>,
        abort: AbortHandle,
        addr: SocketAddr,
    ) {
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(
                conn,
                ConnSlot {
                    commands,
                    abort,
                    addr,
                },
            );
        }
        self.notify_tasks();
    }

    /// A stream was accepted: the admission table says whether its handshake starts now,
    /// waits (parked, unread) for a slot, or cannot be held at all.
    fn accepted(&mut self, accepted: Accepted<T::Stream>) {
        let (stream, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                self.notify(NetNotice::App(Notice::AcceptFailed(e.to_string())));
                return;
            }
        };
        self.accepted += 1;
        let conn = ConnId::inbound(self.accepted);
        let listed = self
            .allow
            .read()
            .is_ok_and(|allow| allow.lists_address(addr.ip()));
        let verdict = self
            .gate
            .with(|table| table.accept(conn, addr.ip(), listed, now()));
        match verdict {
            // Registering the task tells the handler task how many there are.
            Verdict::Start => self.start(conn, stream, addr, None),
            Verdict::Park => {
                let (go, turn) = tokio::sync::oneshot::channel();
                self.parked.insert(conn, go);
                self.start(conn, stream, addr, Some(turn));
            }
            Verdict::Drop => {
                // Dropping the stream closes it. Only strangers' floods get here: every
                // slot and parking place is held by streams at least as fair as this one.
                tracing::debug!(%addr, "too many unauthenticated streams wait: dropped");
                self.gate.with(|table| table.ended(conn, now()));
            }
        }
        if self.cut_evicted() {
            self.notify_tasks();
        }
    }

    /// Starts the parked streams the admission table has room for, and cuts what it
    /// evicted.
    fn admit_parked(&mut self) {
        let mut changed = false;
        while let Some(conn) = self.gate.with(|table| table.poll_start()) {
            changed = true;
            let started = self
                .parked
                .remove(&conn)
                .is_some_and(|go| go.send(()).is_ok());
            if !started {
                // Its task ended meanwhile: free its slot.
                self.gate.with(|table| table.ended(conn, now()));
            }
        }
        if self.cut_evicted() || changed {
            self.notify_tasks();
        }
    }

    /// Cuts what the admission table evicted: a handshake's task, or a parked stream.
    /// Returns whether there was any.
    fn cut_evicted(&mut self) -> bool {
        let mut any = false;
        while let Some(victim) = self.gate.with(|table| table.poll_evicted()) {
            any = true;
            self.parked.remove(&victim);
            let slot = self.conns.lock().ok().and_then(|mut c| c.remove(&victim));
            if let Some(slot) = slot {
                slot.abort.abort();
                tracing::debug!(conn = %victim, addr = %slot.addr, "evicted an unauthenticated connection");
            }
        }
        any
    }

    /// Starts the handshake task of an accepted stream; a parked one waits for its `turn`
    /// before any Diffie-Hellman.
    fn start(
        &mut self,
        conn: ConnId,
        stream: T::Stream,
        addr: SocketAddr,
        turn: Option<tokio::sync::oneshot::Receiver<()>>,
    ) {
        let seed = self.seed();
        let connection = match Connection::accept(&self.keypair, addr, seed, &self.config, now()) {
            Ok(connection) => connection,
            Err(e) => {
                self.gate.with(|table| table.ended(conn, now()));
                self.notify(NetNotice::App(Notice::Event(Event::PeerError(
                    crate::endpoint::PeerError::Connection(e),
                ))));
                return;
            }
        };
        let (tx, rx) = mpsc::channel(CONN_QUEUE);
        let task = ConnTask {
            conn,
            announced: false,
            gate: Some(self.gate.clone()),
            turn,
            screened: false,
            held: false,
            connection,
            allow: self.allow.clone(),
            commands: rx,
            events: self.events.clone(),
            corrupt_next: false,
            peer_progressed: false,
            write_stall_timeout: self.config.write_stall_timeout,
            bytes: self.bytes.clone(),
            buggify: self.fault_points(),
        };
        let abort = self.tasks.spawn(async move {
            task.run(stream).await;
            conn
        });
        self.register(conn, tx, abort, addr);
    }

    async fn shutdown(mut self) {
        // The endpoint already queued a Close for every connection it knows; connections
        // still handshaking get one here. Then give them a moment to flush.
        if let Ok(conns) = self.conns.lock() {
            for slot in conns.values() {
                let _ = slot
                    .commands
                    .try_send(ConnCommand::Close(CloseReason::ShuttingDown));
            }
        }
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.tasks.shutdown().await;
        }
    }
}

/// Accepts streams and hands them to the router. Backs off on errors (e.g. out of file
/// descriptors) instead of spinning, as mini-redis does.
pub(super) async fn accept_loop<L: Listener>(
    mut listener: L,
    out: mpsc::Sender<Accepted<L::Stream>>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = listener.accept().await;
        let failed = accepted.is_err();
        if out.send(accepted).await.is_err() {
            return;
        }
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        } else {
            backoff = Duration::from_millis(10);
        }
    }
}

/// Why a dial to `addr` failed, in words: the error's own text, or its kind when the text
/// says nothing more than the address (some transports' errors carry only that).
fn connect_failed(addr: SocketAddr, e: &std::io::Error) -> String {
    let text = e.to_string();
    let why = if text.is_empty() || text == addr.to_string() {
        e.kind().to_string()
    } else {
        text
    };
    format!("connect to {addr}: {why}")
}

#[cfg(test)]
mod tests {
    use super::connect_failed;

    #[test]
    fn a_connect_error_that_only_repeats_the_address_says_its_kind() {
        let addr: std::net::SocketAddr = "192.168.0.1:7000".parse().unwrap();
        let bare = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, addr.to_string());
        assert_eq!(
            connect_failed(addr, &bare),
            "connect to 192.168.0.1:7000: connection refused"
        );
        let said = std::io::Error::new(std::io::ErrorKind::TimedOut, "no route to host");
        assert_eq!(
            connect_failed(addr, &said),
            "connect to 192.168.0.1:7000: no route to host"
        );
    }
}
