//! The router task: the listener, dials, the connection limit, and the messages between
//! the handler task and the network side.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::Rng;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use crate::config::Config;
use crate::connection::{Closed, ConnError, ConnEvent, Connection};
use crate::endpoint::{ConnId, Direction, Event};
use crate::identity::{Keypair, PeerId};
use crate::transport::{Listener, Transport};
use crate::wire::{CloseReason, Message};

use super::conn_task::{ByteCounters, ConnCommand, ConnTask};
use super::handle::Notice;
use super::slots::{Admission, ConnSlot, Forwarded, Slots, forward};
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
    /// The number of live connection tasks changed (and how many unauthenticated
    /// connections have been evicted so far).
    Tasks { live: usize, evicted: u64 },
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
    /// Unauthenticated connections evicted to make room, since the start.
    pub(super) evicted: u64,
    /// Shared by every connection task.
    pub(super) bytes: ByteCounters,
}

pub(super) type Accepted<S> = io::Result<(S, SocketAddr)>;

impl<T: Transport> Router<T> {
    pub(super) async fn run(mut self, listener: T::Listener) {
        let (accept_tx, mut accept_rx) = mpsc::channel::<Accepted<T::Stream>>(64);
        let mut acceptor = Some(tokio::spawn(accept_loop(listener, accept_tx)));
        loop {
            let notices = self.notices.clone();
            tokio::select! {
                biased;
                Ok(permit) = notices.reserve(), if !self.pending_notices.is_empty() => {
                    if let Some(notice) = self.pending_notices.pop_front() {
                        permit.send(notice);
                    }
                }
                Some(done) = self.tasks.join_next() => {
                    if let (Ok(conn), Ok(mut conns)) = (done, self.conns.lock()) {
                        conns.remove(&conn);
                    }
                    self.notify_tasks();
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
        self.notify(NetNotice::Tasks {
            live: self.tasks.len(),
            evicted: self.evicted,
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
            NetCommand::Dial { conn, peer, addr } => self.dial(conn, peer, addr),
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

    fn live(&self) -> usize {
        self.conns.lock().map_or(0, |c| c.len())
    }

    fn at_limit(&self) -> bool {
        self.live() >= self.config.max_connections
    }

    fn dial(&mut self, conn: ConnId, peer: PeerId, addr: SocketAddr) {
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
        let admission = Admission::admitted();
        let task_admission = admission.clone();
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
            match Connection::dial(&keypair, peer, addr, seed, &config, now()) {
                Ok(connection) => {
                    let task = ConnTask {
                        conn,
                        announced: true,
                        admission: task_admission,
                        connection,
                        allow,
                        commands: rx,
                        events,
                        corrupt_next: false,
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
        self.register(conn, tx, abort, addr, admission);
    }

    /// Records a spawned connection task so commands can reach it and limits count it.
    fn register(
        &mut self,
        conn: ConnId,
        commands: mpsc::Sender<ConnCommand>,
        abort: AbortHandle,
        addr: SocketAddr,
        admission: Arc<Admission>,
    ) {
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(
                conn,
                ConnSlot {
                    commands,
                    abort,
                    addr,
                    admission,
                },
            );
        }
        self.notify_tasks();
    }

    /// Makes room for a stream just accepted from `ip`, within the budgets: at most
    /// `max_handshaking_per_ip` unauthenticated connections from one address, at most
    /// `max_handshaking` in all, at most `max_connections` of every kind. Room is made by
    /// evicting unauthenticated inbound connections only: the oldest of `ip` when that
    /// address is at its bound, otherwise the oldest of whichever address holds the most.
    /// False when no room can be made (every connection is authenticated or ours).
    fn make_room(&mut self, ip: IpAddr) -> bool {
        let Ok(mut conns) = self.conns.lock() else {
            return false;
        };
        loop {
            // Unauthenticated inbound connections by source, oldest first (inbound ids
            // count up, and the table is ordered by id).
            let mut pending: BTreeMap<IpAddr, Vec<ConnId>> = BTreeMap::new();
            for (id, slot) in conns.iter() {
                if id.is_inbound() && slot.admission.is_pending() {
                    pending.entry(slot.addr.ip()).or_default().push(*id);
                }
            }
            let total: usize = pending.values().map(Vec::len).sum();
            let own = pending.get(&ip).map_or(0, Vec::len);
            let victim = if own >= self.config.max_handshaking_per_ip {
                pending.get(&ip).and_then(|ids| ids.first().copied())
            } else if total >= self.config.max_handshaking
                || conns.len() >= self.config.max_connections
            {
                pending
                    .values()
                    .max_by_key(|ids| (ids.len(), std::cmp::Reverse(ids.first().copied())))
                    .and_then(|ids| ids.first().copied())
            } else {
                return true;
            };
            let Some(victim) = victim else {
                return false;
            };
            let Some(slot) = conns.remove(&victim) else {
                return false;
            };
            if slot.admission.evict() {
                slot.abort.abort();
                self.evicted += 1;
                tracing::debug!(conn = %victim, addr = %slot.addr, "evicted an unauthenticated connection");
            } else {
                // It authenticated a moment ago: keep it, and look again.
                conns.insert(victim, slot);
            }
        }
    }

    fn accepted(&mut self, accepted: Accepted<T::Stream>) {
        let (stream, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                self.notify(NetNotice::App(Notice::AcceptFailed(e.to_string())));
                return;
            }
        };
        if !self.make_room(addr.ip()) {
            // Dropping the stream closes it; the dialer retries later.
            tracing::warn!(%addr, "connection limit reached, dropping accepted stream");
            self.notify(NetNotice::App(Notice::ConnectionLimit {
                addr,
                direction: Direction::Inbound,
            }));
            return;
        }
        self.accepted += 1;
        let conn = ConnId::inbound(self.accepted);
        let seed = self.seed();
        let connection = match Connection::accept(&self.keypair, addr, seed, &self.config, now()) {
            Ok(connection) => connection,
            Err(e) => {
                self.notify(NetNotice::App(Notice::Event(Event::PeerError(
                    crate::endpoint::PeerError::Connection(e),
                ))));
                return;
            }
        };
        let (tx, rx) = mpsc::channel(CONN_QUEUE);
        let admission = Admission::pending();
        let task = ConnTask {
            conn,
            announced: false,
            admission: admission.clone(),
            connection,
            allow: self.allow.clone(),
            commands: rx,
            events: self.events.clone(),
            corrupt_next: false,
            write_stall_timeout: self.config.write_stall_timeout,
            bytes: self.bytes.clone(),
        };
        let abort = self.tasks.spawn(async move {
            task.run(stream).await;
            conn
        });
        self.register(conn, tx, abort, addr, admission);
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
