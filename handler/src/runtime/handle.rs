//! The application's side: the async [`Handler`] handle, its errors, notices and reports,
//! and the commands it sends to the handler task.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::allow_list::{AllowList, AllowedPeer};
use crate::config::{Config, ConfigError};
use crate::endpoint::{Direction, Endpoint, Event, RequestError, RespondError, Stats};
use crate::identity::{Keypair, PeerId};
use crate::transport::{Listener, Transport};
use crate::wire::ExchangeId;

use super::SharedAllow;
use super::handler_task::HandlerTask;
use super::router::Router;
use super::slots::Slots;
use super::tap::{NoTap, Tap};

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

/// Something the application may want to know, on the priority channel: peer errors, rate
/// limits, connection limits. Purely informational: when the application leaves the
/// channel full, further notices are dropped and counted (`Status::notices_dropped`), so an
/// application that never reads it is never stalled. Outcomes of exchanges never come here.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// An informational event from the exchange layer: a peer error or a rate limit hit.
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
    /// Unauthenticated inbound connections evicted to make room for newer ones (see
    /// `Config::max_handshaking`), since the start.
    pub evicted_unauthenticated: u64,
    /// Notices dropped because the application left the priority channel full. Outcomes
    /// are never dropped: they travel on the receive channel.
    pub notices_dropped: u64,
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

pub(super) enum Command {
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

/// The application's two receiving channels. `received` carries everything that must not
/// be lost: requests, replies, failures (with their payloads) and the fate of our replies.
/// When it is full the handler stops reading the network until there is room
/// (back-pressure, never loss). `priority` carries informational notices; reading it is
/// optional (see [`Notice`]).
#[derive(Debug)]
pub struct Inbox {
    /// Requests from peers, and the one outcome of every exchange: `Reply` or `Failed` for
    /// ours; `ResponseDelivered`, `ResponseUnconfirmed`, `ResponseTimedOut`,
    /// `ResponseAborted` or `ResponseCancelled` for theirs.
    pub received: mpsc::Receiver<Event>,
    /// Peer errors, rate limits and connection limits; dropped when left unread.
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
            evicted: 0,
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
            notices_dropped: 0,
            evicted_unauthenticated: 0,
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
