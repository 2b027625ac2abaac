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
use crate::connection::{Closed, ConnError, ConnEvent, Connection};
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

pub(super) enum NetCommand {
    Dial {
        conn: ConnId,
        peer: PeerId,
        addr: SocketAddr,
        /// The responder's static key, if known: an IK handshake.
        key: Option<[u8; p2p_handler_core::identity::KEY_LEN]>,
        /// With a key: a Request for IK message 1, and its timestamp (Unix ms).
        early: Option<(u64, Message)>,
        /// Flip a byte of message 1 (a fault injected into the Request it carries).
        corrupt_first: bool,
    },
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
    /// Accepted streams waiting for a handshake slot, unread (see `admission`).
    pub(super) parked: BTreeMap<ConnId, (T::Stream, SocketAddr)>,
    /// Shared by every connection task.
    pub(super) bytes: ByteCounters,
}

pub(super) type Accepted<S> = io::Result<(S, SocketAddr)>;

impl<T: Transport> Router<T> {
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
        self.notify(NetNotice::Tasks {
            live: self.tasks.len(),
            parked: self.parked.len(),
            evicted,
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
            NetCommand::Dial {
                conn,
                peer,
                addr,
                key,
                early,
                corrupt_first,
            } => self.dial(conn, peer, addr, key, early, corrupt_first),
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

    fn dial(
        &mut self,
        conn: ConnId,
        peer: PeerId,
        addr: SocketAddr,
        key: Option<[u8; p2p_handler_core::identity::KEY_LEN]>,
        early: Option<(u64, Message)>,
        corrupt_first: bool,
    ) {
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
                    let event = ConnEvent::Closed(Closed::Io(format!("connect to {addr}: {e}")));
                    let _ = events.send(NetEvent::Conn { conn, event }).await;
                    return conn;
                }
            };
            let dialed = match key {
                Some(key) => Connection::dial_ik(
                    &keypair,
                    &key,
                    addr,
                    seed,
                    &config,
                    now(),
                    early.as_ref().map(|(at, m)| (*at, m)),
                ),
                None => Connection::dial(&keypair, peer, addr, seed, &config, now()),
            };
            match dialed {
                Ok(connection) => {
                    let task = ConnTask {
                        conn,
                        announced: true,
                        gate: None,
                        connection,
                        allow,
                        commands: rx,
                        events,
                        corrupt_next: corrupt_first,
                        peer_progressed: false,
                        write_stall_timeout: config.write_stall_timeout,
                        bytes,
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
            Verdict::Start => self.start(conn, stream, addr),
            Verdict::Park => {
                self.parked.insert(conn, (stream, addr));
                self.notify_tasks();
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
            if let Some((stream, addr)) = self.parked.remove(&conn) {
                self.start(conn, stream, addr);
            } else {
                // Closed meanwhile (the router no longer holds it): free its slot.
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
            if self.parked.remove(&victim).is_some() {
                // A parked stream, dropped unread: nothing else holds it.
                self.gate.with(|table| table.ended(victim, now()));
                continue;
            }
            let slot = self.conns.lock().ok().and_then(|mut c| c.remove(&victim));
            if let Some(slot) = slot {
                slot.abort.abort();
                tracing::debug!(conn = %victim, addr = %slot.addr, "evicted an unauthenticated connection");
            }
        }
        any
    }

    /// Starts the handshake task of an accepted stream.
    fn start(&mut self, conn: ConnId, stream: T::Stream, addr: SocketAddr) {
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
            connection,
            allow: self.allow.clone(),
            commands: rx,
            events: self.events.clone(),
            corrupt_next: false,
            peer_progressed: false,
            write_stall_timeout: self.config.write_stall_timeout,
            bytes: self.bytes.clone(),
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
