//! The async driver: tasks and channels around the sans-IO core.
//!
//! ```text
//!  application                     handler task                        network side
//!  -----------                     ------------                        ------------
//!  commands  ----(1)---->  +----------------------+  --(4) sender---->  router task --> connection
//!  received  <---(2)-----  |  Endpoint (all the   |  <-(5) receiver--  (listener,       tasks (one per
//!  priority  <---(3)-----  |  exchange logic)     |  <-(6) priority--   limits)          stream: Noise,
//!                          +----------------------+                                       framing)
//! ```
//!
//! Six bounded channels: (1) app commands; (2) requests, replies and reply confirmations for
//! the app; (3) priority notices for the app (failures with payloads, peer errors, rate
//! limits, limits hit);
//! (4) dial/send/close for the network; (5) connection events; (6) network notices
//! (connection limit, accept errors, connections dropped for being too slow).
//!
//! The tasks hold no protocol logic: the handler task feeds the [`Endpoint`] and performs its
//! outputs; a connection task feeds its [`Connection`] and writes its frames; the router
//! spawns, limits and routes. Time comes only from `tokio::time`, randomness only from the
//! seed given to [`Handler::spawn`], and every `select!` is `biased;`, so under a simulated
//! runtime the same seed gives the same run.
//!
//! Back-pressure, and why nothing is dropped silently:
//! * (1) full: `Handler` methods wait for room (they are async; the sync facade blocks).
//! * (2)/(3) full: events wait in the handler task's backlog, and the handler stops reading
//!   connection events (5) until the backlog drains, so slowness reaches the peers as TCP
//!   back-pressure instead of as loss. An application must therefore read both channels;
//!   the priority one carries only problems, so it is quiet when all is well.
//! * (4) never blocks for long: the router forwards with `try_send` and never waits on the
//!   handler; (5) full makes connection tasks wait (back-pressure again).
//! * A connection whose outgoing queue is full is dropped and reported on (6) as lost; the
//!   endpoint retries its exchange like any broken connection.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::allow_list::{AllowList, AllowedPeer};
use crate::config::{Config, ConfigError};
use crate::connection::{Closed, ConnError, ConnEvent, Connection};
use crate::endpoint::{
    ConnId, Direction, Endpoint, Event, Failure, Output, RequestError, RespondError, Stats,
};
use crate::identity::{Keypair, PeerId};
use crate::transport::{Listener, Transport};
use crate::wire::{CloseReason, ExchangeId, MAX_FRAME_LEN, Message};

/// How long shutdown waits for connections to flush their last frames before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

type SharedAllow = Arc<RwLock<AllowList>>;

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

fn sleep_until(deadline: std::time::Instant) -> tokio::time::Sleep {
    tokio::time::sleep_until(tokio::time::Instant::from_std(deadline))
}

/// What a [`Tap`] decides for an outgoing message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Pass,
    /// Do not send it (as if lost).
    Drop,
    /// Send it after this long; later messages may overtake it.
    Delay(Duration),
    /// Send it with one ciphertext byte flipped (the receiver's decryption fails).
    Corrupt,
}

/// What a [`Tap`] decides for an incoming message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Hand it to the endpoint.
    Pass,
    /// Ignore it (as if lost).
    Drop,
    /// A Request only: answer it with this Nack instead of handing it on (a refusing node).
    Nack(crate::wire::NackReason),
}

/// Observes what a node sends and receives and, for fault injection, may alter outgoing
/// messages. The simulator implements it to trace runs and apply message-level faults;
/// production code uses [`NoTap`]. Called from the handler task: keep it quick.
pub trait Tap: Send + Sync + 'static {
    /// A message is about to go to `peer` on `conn`.
    fn outgoing(&self, _conn: ConnId, _peer: PeerId, _message: &Message) -> Verdict {
        Verdict::Pass
    }
    /// A message arrived from `peer` on `conn`.
    fn incoming(&self, _conn: ConnId, _peer: PeerId, _message: &Message) -> Arrival {
        Arrival::Pass
    }
    /// The endpoint asked for a dial.
    fn dial(&self, _conn: ConnId, _peer: PeerId, _addr: SocketAddr) {}
    /// A connection was established, closed or failed (`peer` once known).
    fn connection(&self, _conn: ConnId, _peer: Option<PeerId>, _event: &ConnEvent) {}
    /// An inbound connection failed before it was established.
    fn rejected(&self, _error: &ConnError) {}
    /// Whether to report exchange state transitions (costs a scan per input).
    fn wants_transitions(&self) -> bool {
        false
    }
    /// An exchange changed state (`from` is `None` when it is new, `to` when it ended).
    fn transition(
        &self,
        _direction: Direction,
        _peer: PeerId,
        _exchange: ExchangeId,
        _from: Option<&'static str>,
        _to: Option<&'static str>,
    ) {
    }
}

/// The tap that changes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTap;

impl Tap for NoTap {}

/// Errors of the handler API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: io::Error,
    },
    /// The address text is not usable.
    #[error("bad address {0:?}")]
    Address(String),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The request was refused.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The response was refused.
    #[error(transparent)]
    Respond(#[from] RespondError),
    /// The async runtime could not be started.
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
    /// The handler has shut down.
    #[error("the handler has stopped")]
    Stopped,
}

/// Something the application should know promptly: the priority channel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// A priority event from the exchange layer: a failure with its payload, a peer error,
    /// a rate limit hit, a reply's fate.
    Event(Event),
    /// The connection limit was hit: an accepted stream was dropped, or a dial deferred.
    ConnectionLimit {
        /// Remote address.
        addr: SocketAddr,
        /// Which way.
        direction: Direction,
    },
    /// A connection could not keep up with what we had to send and was dropped; its
    /// exchange is retried.
    SlowConnection {
        /// Remote address.
        addr: SocketAddr,
    },
    /// Accepting a connection failed (e.g. out of file descriptors); the listener backs off.
    AcceptFailed(String),
}

/// Counters and sizes, for monitoring and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Connections the endpoint knows (established or dialing).
    pub open_connections: usize,
    /// Connection tasks alive on the network side.
    pub connection_tasks: usize,
    /// Our exchanges not finished yet.
    pub outbound_in_flight: usize,
    /// Requests from peers awaiting our answer.
    pub pending_responses: usize,
    /// Exchange counters.
    pub stats: Stats,
}

/// What shutdown handed back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Our exchanges that were still pending, with their payloads.
    pub failed: Vec<(PeerId, ExchangeId, Bytes)>,
    /// Requests from peers we had not answered; their dialers were told (Abort).
    pub unanswered_requests: usize,
    /// Events the application had not read yet (sync facade only; async users keep
    /// their [`Inbox`]).
    pub unread: Vec<Event>,
    /// Notices the application had not read yet (sync facade only).
    pub unread_notices: Vec<Notice>,
}

enum Command {
    Request {
        peer: PeerId,
        addr: SocketAddr,
        payload: Bytes,
        reply: oneshot::Sender<Result<ExchangeId, RequestError>>,
    },
    Respond {
        peer: PeerId,
        exchange: Option<ExchangeId>,
        payload: Bytes,
        reply: oneshot::Sender<Result<ExchangeId, RespondError>>,
    },
    Allow {
        peer: PeerId,
        entry: AllowedPeer,
    },
    Revoke {
        peer: PeerId,
        reply: oneshot::Sender<bool>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    Shutdown {
        reply: oneshot::Sender<ShutdownReport>,
    },
}

/// The async handle to a running handler. Cheap to clone; every clone drives the same node.
#[derive(Debug, Clone)]
pub struct Handler {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    local_addr: SocketAddr,
}

/// The application's two receiving channels. Read both: when either is full the handler
/// stops reading the network until there is room (back-pressure, never loss).
#[derive(Debug)]
pub struct Inbox {
    /// Requests from peers, replies to our requests, and confirmations that our replies
    /// arrived (`Event::ResponseDelivered`).
    pub received: mpsc::Receiver<Event>,
    /// Failures (with payloads), errors, limits, and the fate of our replies.
    pub priority: mpsc::Receiver<Notice>,
}

impl Handler {
    /// Binds `addr`, starts the handler and network tasks on the current tokio runtime, and
    /// returns the handle and the application's inbox. All randomness derives from `seed`.
    pub async fn spawn<T: Transport>(
        transport: T,
        addr: SocketAddr,
        keypair: Keypair,
        allow: AllowList,
        config: Config,
        seed: [u8; 32],
    ) -> Result<(Self, Inbox), HandlerError> {
        Self::spawn_with_tap(
            transport,
            addr,
            keypair,
            allow,
            config,
            seed,
            Arc::new(NoTap),
        )
        .await
    }

    /// [`Handler::spawn`] with a [`Tap`] observing (and possibly altering) traffic.
    pub async fn spawn_with_tap<T: Transport>(
        transport: T,
        addr: SocketAddr,
        keypair: Keypair,
        allow: AllowList,
        config: Config,
        seed: [u8; 32],
        tap: Arc<dyn Tap>,
    ) -> Result<(Self, Inbox), HandlerError> {
        config.validate()?;
        let listener = transport
            .bind(addr)
            .await
            .map_err(|source| HandlerError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| HandlerError::Bind { addr, source })?;
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut endpoint_seed = [0u8; 32];
        rng.fill_bytes(&mut endpoint_seed);
        let local_peer_id = keypair.peer_id();
        let endpoint = Endpoint::new(config.clone(), local_peer_id, allow.clone(), endpoint_seed)?;
        let cap = config.channel_capacity;
        let (cmd_tx, cmd_rx) = mpsc::channel(cap);
        let (recv_tx, recv_rx) = mpsc::channel(cap);
        let (prio_tx, prio_rx) = mpsc::channel(cap);
        let (net_tx, net_rx) = mpsc::channel(cap);
        let (ev_tx, ev_rx) = mpsc::channel(cap);
        let (notice_tx, notice_rx) = mpsc::channel(cap);
        let shared_allow: SharedAllow = Arc::new(RwLock::new(allow));
        let slots: Slots = Arc::default();
        let router = Router {
            transport,
            keypair: Arc::new(keypair),
            config,
            allow: shared_allow.clone(),
            rng,
            commands: net_rx,
            events: ev_tx,
            notices: notice_tx,
            pending_notices: VecDeque::new(),
            conns: slots.clone(),
            tasks: JoinSet::new(),
            accepted: 0,
        };
        let network = tokio::spawn(router.run(listener));
        let task = HandlerTask {
            slots,
            tap,
            endpoint,
            allow: shared_allow,
            commands: cmd_rx,
            received: recv_tx,
            priority: prio_tx,
            network: net_tx,
            net_events: ev_rx,
            net_notices: notice_rx,
            recv_backlog: VecDeque::new(),
            prio_backlog: VecDeque::new(),
            connection_tasks: 0,
            pending_net: VecDeque::new(),
            states: BTreeMap::new(),
        };
        tokio::spawn(task.run(network));
        Ok((
            Self {
                commands: cmd_tx,
                local_peer_id,
                local_addr,
            },
            Inbox {
                received: recv_rx,
                priority: prio_rx,
            },
        ))
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// The address the listener is bound to (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    async fn call<R>(
        &self,
        make: impl FnOnce(oneshot::Sender<R>) -> Command,
    ) -> Result<R, HandlerError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| HandlerError::Stopped)?;
        rx.await.map_err(|_| HandlerError::Stopped)
    }

    /// Sends `payload` to `peer` at `addr`: dials, or queues behind the peer's current
    /// exchange. The outcome arrives in the inbox under the returned id.
    pub async fn request(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        payload: impl Into<Bytes>,
    ) -> Result<ExchangeId, HandlerError> {
        let payload = payload.into();
        Ok(self
            .call(|reply| Command::Request {
                peer,
                addr,
                payload,
                reply,
            })
            .await??)
    }

    /// Answers `peer`'s oldest unanswered request; returns which exchange it answered.
    pub async fn response(
        &self,
        peer: PeerId,
        payload: impl Into<Bytes>,
    ) -> Result<ExchangeId, HandlerError> {
        let payload = payload.into();
        Ok(self
            .call(|reply| Command::Respond {
                peer,
                exchange: None,
                payload,
                reply,
            })
            .await??)
    }

    /// Answers `peer`'s request `exchange`.
    pub async fn response_to(
        &self,
        peer: PeerId,
        exchange: ExchangeId,
        payload: impl Into<Bytes>,
    ) -> Result<(), HandlerError> {
        let payload = payload.into();
        self.call(|reply| Command::Respond {
            peer,
            exchange: Some(exchange),
            payload,
            reply,
        })
        .await??;
        Ok(())
    }

    /// Adds or updates a peer on the allow list.
    pub async fn allow(&self, peer: PeerId, entry: AllowedPeer) -> Result<(), HandlerError> {
        self.commands
            .send(Command::Allow { peer, entry })
            .await
            .map_err(|_| HandlerError::Stopped)
    }

    /// Removes a peer from the allow list and disconnects it. Returns whether it was listed.
    pub async fn revoke(&self, peer: PeerId) -> Result<bool, HandlerError> {
        self.call(|reply| Command::Revoke { peer, reply }).await
    }

    /// Counters and sizes.
    pub async fn status(&self) -> Result<Status, HandlerError> {
        self.call(|reply| Command::Status { reply }).await
    }

    /// Stops the node: fails our pending exchanges (payloads returned in the report), tells
    /// dialers waiting on us, closes every connection and the listener, and ends every task.
    pub async fn shutdown(&self) -> Result<ShutdownReport, HandlerError> {
        self.call(|reply| Command::Shutdown { reply }).await
    }
}

// ----- handler task -----

struct HandlerTask {
    /// Connection tasks, for sending to them directly.
    slots: Slots,
    tap: Arc<dyn Tap>,
    endpoint: Endpoint,
    allow: SharedAllow,
    commands: mpsc::Receiver<Command>,
    received: mpsc::Sender<Event>,
    priority: mpsc::Sender<Notice>,
    network: mpsc::Sender<NetCommand>,
    net_events: mpsc::Receiver<NetEvent>,
    net_notices: mpsc::Receiver<NetNotice>,
    /// Events the application's channels had no room for, oldest first.
    recv_backlog: VecDeque<Event>,
    prio_backlog: VecDeque<Notice>,
    connection_tasks: usize,
    /// Commands a tap produced (forged Nacks), sent before the endpoint's outputs.
    pending_net: VecDeque<(ConnId, ConnCommand)>,
    /// Exchange states last reported to a tap that wants transitions.
    states: BTreeMap<(Direction, PeerId, ExchangeId), &'static str>,
}

impl HandlerTask {
    async fn run(mut self, network: tokio::task::JoinHandle<()>) {
        let limit = self.received.max_capacity();
        let shutdown_reply = loop {
            self.report_transitions();
            self.perform_outputs().await;
            self.flush_events();
            let deadline = self.endpoint.poll_timeout();
            let backlog = self.recv_backlog.len() + self.prio_backlog.len();
            // Clones, so the futures below do not hold `self` borrowed while arms use it.
            let (received, priority) = (self.received.clone(), self.priority.clone());
            tokio::select! {
                biased;
                // The application made room: hand over what waited.
                Ok(permit) = received.reserve(), if !self.recv_backlog.is_empty() => {
                    if let Some(event) = self.recv_backlog.pop_front() {
                        permit.send(event);
                    }
                }
                Ok(permit) = priority.reserve(), if !self.prio_backlog.is_empty() => {
                    if let Some(notice) = self.prio_backlog.pop_front() {
                        permit.send(notice);
                    }
                }
                // Timers first among inputs, so a busy network cannot starve them.
                () = sleep_until(deadline.unwrap_or_else(now)), if deadline.is_some() => {
                    self.endpoint.handle_timeout(now());
                }
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => break Some(reply),
                    Some(command) => self.command(command),
                    // Every handle dropped: nobody can use this node any more.
                    None => break None,
                },
                Some(notice) = self.net_notices.recv() => self.net_notice(notice),
                // Stop reading the network while the application is behind.
                Some(event) = self.net_events.recv(), if backlog < limit => self.net_event(event),
            }
        };
        let report = self.shutdown(network).await;
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(report);
        }
    }

    fn report_transitions(&mut self) {
        if !self.tap.wants_transitions() {
            return;
        }
        let now: BTreeMap<_, _> = self
            .endpoint
            .exchange_states()
            .into_iter()
            .map(|(d, p, x, s)| ((d, p, x), s))
            .collect();
        for (key, state) in &now {
            let before = self.states.get(key).copied();
            if before != Some(*state) {
                self.tap
                    .transition(key.0, key.1, key.2, before, Some(state));
            }
        }
        for (key, state) in &self.states {
            if !now.contains_key(key) {
                self.tap.transition(key.0, key.1, key.2, Some(state), None);
            }
        }
        self.states = now;
    }

    async fn perform_outputs(&mut self) {
        while let Some((conn, command)) = self.pending_net.pop_front() {
            self.send_direct(conn, command).await;
        }
        // Sends and closes go straight to the connection task; dials go through the router.
        while let Some(output) = self.endpoint.poll_output() {
            match output {
                Output::Dial { conn, peer, addr } => {
                    self.tap.dial(conn, peer, addr);
                    // The router never waits on us, so this wait is short.
                    let dial = NetCommand::Dial { conn, peer, addr };
                    if self.network.send(dial).await.is_err() {
                        return;
                    }
                }
                Output::Send { conn, message } => {
                    let verdict = match self.endpoint.peer_of(conn) {
                        Some(peer) => self.tap.outgoing(conn, peer, &message),
                        None => Verdict::Pass,
                    };
                    let command = match verdict {
                        Verdict::Pass => ConnCommand::Send(message),
                        Verdict::Corrupt => ConnCommand::SendCorrupted(message),
                        Verdict::Drop => continue,
                        Verdict::Delay(delay) => {
                            // Later, through the router, which reports a slow connection.
                            let network = self.network.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = network.send(NetCommand::Send { conn, message }).await;
                            });
                            continue;
                        }
                    };
                    self.send_direct(conn, command).await;
                }
                Output::Close { conn, reason } => {
                    self.send_direct(conn, ConnCommand::Close(reason)).await;
                }
            }
        }
    }

    async fn send_direct(&mut self, conn: ConnId, command: ConnCommand) {
        match forward(&self.slots, conn, command) {
            Forwarded::Sent => {}
            Forwarded::Unknown(ConnCommand::Close(reason)) => {
                let _ = self.network.send(NetCommand::Close { conn, reason }).await;
            }
            // The connection is gone; the endpoint hears of it through its Closed event.
            Forwarded::Unknown(_) => {}
            Forwarded::Slow(addr) => {
                let why = format!("connection to {addr} too slow: outgoing queue full");
                self.endpoint
                    .handle_conn_event(conn, ConnEvent::Closed(Closed::Io(why)), now());
                self.prio_backlog.push_back(Notice::SlowConnection { addr });
            }
        }
    }

    fn flush_events(&mut self) {
        while let Some(event) = self.endpoint.poll_event() {
            if event.is_priority() {
                self.prio_backlog.push_back(Notice::Event(event));
            } else {
                self.recv_backlog.push_back(event);
            }
        }
        drain_into(&mut self.recv_backlog, &self.received);
        drain_into(&mut self.prio_backlog, &self.priority);
    }

    fn command(&mut self, command: Command) {
        let now = now();
        match command {
            Command::Request {
                peer,
                addr,
                payload,
                reply,
            } => {
                let _ = reply.send(self.endpoint.request(peer, addr, payload, now));
            }
            Command::Respond {
                peer,
                exchange,
                payload,
                reply,
            } => {
                let result = match exchange.or_else(|| self.endpoint.pending_request_from(&peer)) {
                    Some(exchange) => self
                        .endpoint
                        .respond(peer, exchange, payload, now)
                        .map(|()| exchange),
                    None => Err(RespondError::NoPendingRequest { peer }),
                };
                let _ = reply.send(result);
            }
            Command::Allow { peer, entry } => {
                if let Ok(mut allow) = self.allow.write() {
                    allow.insert(peer, entry.clone());
                }
                self.endpoint.allow(peer, entry);
            }
            Command::Revoke { peer, reply } => {
                if let Ok(mut allow) = self.allow.write() {
                    allow.remove(&peer);
                }
                let _ = reply.send(self.endpoint.revoke(&peer, now));
            }
            Command::Status { reply } => {
                let _ = reply.send(Status {
                    open_connections: self.endpoint.open_connections(),
                    connection_tasks: self.connection_tasks,
                    outbound_in_flight: self.endpoint.outbound_in_flight(),
                    pending_responses: self.endpoint.pending_responses(),
                    stats: self.endpoint.stats().clone(),
                });
            }
            Command::Shutdown { .. } => {}
        }
    }

    fn net_event(&mut self, event: NetEvent) {
        let now = now();
        match event {
            NetEvent::Accepted {
                conn,
                peer,
                addr,
                remote_max_message_size,
            } => {
                self.tap.connection(
                    conn,
                    Some(peer),
                    &ConnEvent::Established {
                        peer,
                        remote_max_message_size,
                    },
                );
                self.endpoint
                    .handle_accepted(conn, peer, addr, remote_max_message_size, now);
            }
            NetEvent::Rejected(error) => {
                self.tap.rejected(&error);
                self.endpoint.handle_rejected(error, now);
            }
            NetEvent::Conn { conn, event } => {
                let peer = self.endpoint.peer_of(conn);
                let arrival = match (&event, peer) {
                    (ConnEvent::Message(message), Some(peer)) => {
                        self.tap.incoming(conn, peer, message)
                    }
                    (ConnEvent::Message(_), None) => Arrival::Pass,
                    (other, peer) => {
                        self.tap.connection(conn, peer, other);
                        Arrival::Pass
                    }
                };
                match (arrival, event) {
                    (Arrival::Pass, event) => self.endpoint.handle_conn_event(conn, event, now),
                    (Arrival::Drop, _) => {}
                    (
                        Arrival::Nack(reason),
                        ConnEvent::Message(Message::Request {
                            exchange, attempt, ..
                        }),
                    ) => {
                        let message = Message::Nack {
                            exchange,
                            attempt,
                            reason,
                            retry_after_ms: 0,
                        };
                        // Reported like any message sent to the dialer (its verdict is
                        // ignored: this Nack is itself the injected fault).
                        if let Some(peer) = self.endpoint.peer_of(conn) {
                            self.tap.outgoing(conn, peer, &message);
                        }
                        self.pending_net
                            .push_back((conn, ConnCommand::Send(message)));
                    }
                    (Arrival::Nack(_), event) => self.endpoint.handle_conn_event(conn, event, now),
                }
            }
        }
    }

    fn net_notice(&mut self, notice: NetNotice) {
        match notice {
            NetNotice::Lost { conn, why } => {
                self.endpoint
                    .handle_conn_event(conn, ConnEvent::Closed(Closed::Io(why)), now());
            }
            NetNotice::Tasks(n) => self.connection_tasks = n,
            NetNotice::App(notice) => self.prio_backlog.push_back(notice),
        }
    }

    async fn shutdown(mut self, network: tokio::task::JoinHandle<()>) -> ShutdownReport {
        let mut report = ShutdownReport {
            unanswered_requests: self.endpoint.pending_responses(),
            ..ShutdownReport::default()
        };
        self.endpoint.shutdown(now());
        self.perform_outputs().await;
        while let Some(event) = self.endpoint.poll_event() {
            match event {
                Event::Failed {
                    peer,
                    exchange,
                    payload,
                    failure: Failure::ShuttingDown,
                } => report.failed.push((peer, exchange, payload)),
                other => self.recv_backlog.push_back(other),
            }
        }
        let _ = self.network.send(NetCommand::Shutdown).await;
        // Keep draining network events so connection tasks can finish flushing.
        tokio::pin!(network);
        loop {
            tokio::select! {
                biased;
                _ = &mut network => break,
                Some(_) = self.net_events.recv() => {}
                Some(_) = self.net_notices.recv() => {}
            }
        }
        // Whatever the application has room for, it gets; the rest is in its inbox or lost
        // with it.
        self.flush_events();
        report
    }
}

/// Moves what fits from a backlog into the application's channel, oldest first.
fn drain_into<T>(backlog: &mut VecDeque<T>, channel: &mpsc::Sender<T>) {
    while let Some(item) = backlog.pop_front() {
        match channel.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(item)) => {
                backlog.push_front(item);
                break;
            }
            // The application dropped its inbox; nobody will read these.
            Err(mpsc::error::TrySendError::Closed(_)) => backlog.clear(),
        }
    }
}

// ----- network side -----

enum NetCommand {
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
    Shutdown,
}

enum NetEvent {
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

enum NetNotice {
    /// The router gave up on a connection (limit, slowness); the endpoint must hear of it.
    Lost { conn: ConnId, why: String },
    /// The number of live connection tasks changed.
    Tasks(usize),
    /// Something only the application needs to know.
    App(Notice),
}

enum ConnCommand {
    Send(Message),
    SendCorrupted(Message),
    Close(CloseReason),
}

struct ConnSlot {
    commands: mpsc::Sender<ConnCommand>,
    abort: AbortHandle,
    addr: SocketAddr,
}

/// The live connection tasks, shared by the router (which adds and removes them) and the
/// handler task (which sends to them directly, saving a task hop per message).
type Slots = Arc<std::sync::Mutex<BTreeMap<ConnId, ConnSlot>>>;

enum Forwarded {
    Sent,
    /// No such connection task (not registered yet, or gone); the command comes back.
    Unknown(ConnCommand),
    /// The task's queue was full: it was cut, and must be reported lost.
    Slow(SocketAddr),
}

/// Hands a command to a connection task without waiting. A task that cannot keep up is
/// aborted rather than allowed to block every other connection behind it.
fn forward(slots: &Slots, conn: ConnId, command: ConnCommand) -> Forwarded {
    let Ok(mut slots) = slots.lock() else {
        return Forwarded::Unknown(command);
    };
    let Some(slot) = slots.get(&conn) else {
        return Forwarded::Unknown(command);
    };
    match slot.commands.try_send(command) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => Forwarded::Sent,
        Err(mpsc::error::TrySendError::Full(_)) => {
            let addr = slot.addr;
            slot.abort.abort();
            slots.remove(&conn);
            tracing::warn!(%conn, %addr, "connection too slow, dropped");
            Forwarded::Slow(addr)
        }
    }
}

struct Router<T: Transport> {
    transport: T,
    keypair: Arc<Keypair>,
    config: Config,
    allow: SharedAllow,
    rng: ChaCha20Rng,
    commands: mpsc::Receiver<NetCommand>,
    events: mpsc::Sender<NetEvent>,
    notices: mpsc::Sender<NetNotice>,
    /// Notices that found the channel full, oldest first (the router never waits).
    pending_notices: VecDeque<NetNotice>,
    conns: Slots,
    tasks: JoinSet<ConnId>,
    accepted: u64,
}

type Accepted<S> = io::Result<(S, SocketAddr)>;

impl<T: Transport> Router<T> {
    async fn run(mut self, listener: T::Listener) {
        let (accept_tx, mut accept_rx) = mpsc::channel::<Accepted<T::Stream>>(64);
        let acceptor = tokio::spawn(accept_loop(listener, accept_tx));
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
                    self.notify(NetNotice::Tasks(self.tasks.len()));
                }
                command = self.commands.recv() => match command {
                    Some(NetCommand::Shutdown) | None => break,
                    Some(command) => self.command(command),
                },
                Some(accepted) = accept_rx.recv() => self.accepted(accepted),
            }
        }
        acceptor.abort();
        self.shutdown().await;
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
            NetCommand::Shutdown => {}
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
        let (tx, rx) = mpsc::channel(self.config.channel_capacity);
        let seed = self.seed();
        let transport = self.transport.clone();
        let keypair = self.keypair.clone();
        let config = self.config.clone();
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
            match Connection::dial(&keypair, peer, addr, seed, &config, now()) {
                Ok(connection) => {
                    let task = ConnTask {
                        conn,
                        announced: true,
                        connection,
                        allow,
                        commands: rx,
                        events,
                        corrupt_next: false,
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
        self.notify(NetNotice::Tasks(self.tasks.len()));
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
        if self.at_limit() {
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
        let (tx, rx) = mpsc::channel(self.config.channel_capacity);
        let task = ConnTask {
            conn,
            announced: false,
            connection,
            allow: self.allow.clone(),
            commands: rx,
            events: self.events.clone(),
            corrupt_next: false,
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
async fn accept_loop<L: Listener>(mut listener: L, out: mpsc::Sender<Accepted<L::Stream>>) {
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

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(2)
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

/// One connection: feeds frames to its [`Connection`], writes what it produces, forwards
/// its events. Holds no protocol logic.
struct ConnTask {
    conn: ConnId,
    /// Whether the endpoint knows this connection (dials always; accepts once established).
    announced: bool,
    connection: Connection,
    allow: SharedAllow,
    commands: mpsc::Receiver<ConnCommand>,
    events: mpsc::Sender<NetEvent>,
    /// Fault injection: flip a byte of the next frame written.
    corrupt_next: bool,
}

impl ConnTask {
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(mut self, stream: S) {
        let mut framed = Framed::new(stream, codec());
        let mut frames_seen = false;
        loop {
            if let Err(e) = self.flush(&mut framed).await {
                return self.lost(format!("write failed: {e}"), frames_seen).await;
            }
            if !self.forward_events().await || self.connection.is_closed() {
                return;
            }
            let deadline = self.connection.poll_timeout();
            tokio::select! {
                biased;
                command = self.commands.recv() => {
                    let Some(command) = command else {
                        return;
                    };
                    self.command(command);
                    // Take everything already queued before writing, so frames that were
                    // produced together (an Ack and a Reply, a final Ack and a Close) leave
                    // in one write.
                    while let Ok(command) = self.commands.try_recv() {
                        self.command(command);
                    }
                }
                frame = framed.next() => match frame {
                    Some(Ok(frame)) => {
                        frames_seen = true;
                        let handled = match self.allow.read() {
                            Ok(allow) => {
                                self.connection.handle_frame(&frame, &allow);
                                true
                            }
                            Err(_) => false,
                        };
                        if !handled {
                            return self.lost("allow list lock poisoned".into(), true).await;
                        }
                    }
                    Some(Err(e)) => return self.lost(format!("read failed: {e}"), true).await,
                    None => return self.lost("connection closed by peer".into(), frames_seen).await,
                },
                () = sleep_until(deadline.unwrap_or_else(now)), if deadline.is_some() => {
                    self.connection.handle_timeout(now());
                }
            }
        }
    }

    fn command(&mut self, command: ConnCommand) {
        match command {
            ConnCommand::Send(message) => {
                // Fails only if the connection is not open, in which case its Closed event
                // is on its way to the endpoint already.
                let _ = self.connection.send(&message);
            }
            ConnCommand::SendCorrupted(message) => {
                if self.connection.send(&message).is_ok() {
                    self.corrupt_next = true;
                }
            }
            ConnCommand::Close(reason) => self.connection.close(reason),
        }
    }

    async fn flush<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        framed: &mut Framed<S, LengthDelimitedCodec>,
    ) -> io::Result<()> {
        let mut wrote = false;
        while let Some(mut frame) = self.connection.poll_transmit() {
            if std::mem::take(&mut self.corrupt_next) {
                let middle = frame.len() / 2;
                if let Some(byte) = frame.get_mut(middle) {
                    *byte ^= 0x5a;
                }
            }
            framed.feed(Bytes::from(frame)).await?;
            wrote = true;
        }
        if wrote {
            SinkExt::<Bytes>::flush(framed).await?;
        }
        Ok(())
    }

    /// Forwards the connection's events; false if the handler is gone.
    async fn forward_events(&mut self) -> bool {
        while let Some(event) = self.connection.poll_event() {
            let message = match (self.announced, event) {
                (
                    false,
                    ConnEvent::Established {
                        peer,
                        remote_max_message_size,
                    },
                ) => {
                    self.announced = true;
                    NetEvent::Accepted {
                        conn: self.conn,
                        peer,
                        addr: self.connection.remote().addr,
                        remote_max_message_size,
                    }
                }
                (false, ConnEvent::Closed(Closed::Error(e))) => NetEvent::Rejected(e),
                (false, _) => continue,
                (true, event) => NetEvent::Conn {
                    conn: self.conn,
                    event,
                },
            };
            if self.events.send(message).await.is_err() {
                return false;
            }
        }
        true
    }

    /// The stream ended or failed. Announced connections report it to the endpoint; an
    /// accepted stream that sent something but never finished its handshake is reported as
    /// an error naming its address (garbage, a port scanner, a wrong protocol).
    async fn lost(self, why: String, frames_seen: bool) {
        let message = if self.announced {
            NetEvent::Conn {
                conn: self.conn,
                event: ConnEvent::Closed(Closed::Io(why)),
            }
        } else if frames_seen || why.starts_with("read failed") {
            NetEvent::Rejected(ConnError::Handshake {
                remote: self.connection.remote(),
                detail: why,
            })
        } else {
            return;
        };
        let _ = self.events.send(message).await;
    }
}
