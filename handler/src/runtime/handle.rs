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
use crate::durable;
use crate::endpoint::{
    Direction, Endpoint, Event, InstallError, KeyedExchange, Receipt, RequestError, RespondError,
    Stats,
};
use crate::identity::{Keypair, PeerId};
use crate::membership::{Digest, Refused, Signed};
use crate::store::{Store, StoreError};
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
    /// The address text is not usable (the message quotes it and says why).
    #[error("bad address {0}")]
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
    /// The handler has shut down (or stopped because its store failed: see the log and the
    /// priority channel's `Notice::StoreFailed`).
    #[error("the handler has stopped")]
    Stopped,
    /// The store could not be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The membership document given at start cannot be installed.
    #[error("membership: {0}")]
    Membership(#[from] InstallError),
    /// The allow list follows signed membership documents: it changes only when a newer
    /// document is accepted ([`Handler::offer_membership`]), never by hand.
    #[error("the allow list follows signed membership documents; offer a newer document instead")]
    MembershipManaged,
    /// A membership document was refused (every reason is listed).
    #[error("{0}")]
    MembershipRefused(Refused),
    /// Address records cannot be used as configured.
    #[error("address records: {0}")]
    Records(crate::endpoint::RecordsError),
    /// The node does not follow signed membership documents.
    #[error("this node's allow list is not governed by membership documents")]
    NoMembership,
}

/// What a node's membership is (see [`Handler::membership`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipStatus {
    /// The network.
    pub network: String,
    /// The epoch in force.
    pub epoch: u64,
    /// Its digest.
    pub digest: Digest,
    /// Members in the document.
    pub members: usize,
    /// Members in force (unexpired): the allow list.
    pub allowed: usize,
    /// The committee's threshold and size.
    pub threshold: u8,
    /// Committee size.
    pub committee: usize,
    /// When the document expires (Unix seconds), if it does.
    pub expires: Option<u64>,
    /// Epochs held (to serve peers that are behind).
    pub history: usize,
    /// Forks found since the start (alarms).
    pub forks: usize,
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
    /// The store failed to commit: the node stopped at once, as if it had crashed, so
    /// that it never acts on what it could not make durable. What was committed before is
    /// recovered at the next start.
    StoreFailed(String),
}

/// One line for people.
impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Event(event) => event.fmt(f),
            Self::ConnectionLimit {
                addr,
                direction: Direction::Inbound,
            } => write!(
                f,
                "connection limit reached: a connection from {addr} was dropped"
            ),
            Self::ConnectionLimit {
                addr,
                direction: Direction::Outbound,
            } => write!(
                f,
                "connection limit reached: the dial to {addr} waits for a slot"
            ),
            Self::SlowConnection { addr } => write!(
                f,
                "the connection to {addr} could not keep up and was dropped; its exchange is retried"
            ),
            Self::AcceptFailed(why) => write!(f, "accepting a connection failed: {why}"),
            Self::StoreFailed(why) => write!(f, "the store failed, the node stopped: {why}"),
        }
    }
}

/// Counters and sizes, for monitoring and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// Connections the endpoint knows (established or dialing).
    pub open_connections: usize,
    /// Connection tasks alive on the network side.
    pub connection_tasks: usize,
    /// Unauthenticated inbound connections evicted to make room for newer ones, and
    /// parked streams dropped (see `Config::max_handshaking`), since the start.
    pub evicted_unauthenticated: u64,
    /// Accepted streams waiting for a handshake slot.
    pub parked_connections: usize,
    /// What the guard made of inbound IK message 1s before any Diffie-Hellman: wrong
    /// mac1s, cookies sent and proven, tickets issued, redeemed and unknown (see
    /// [`crate::guard`]).
    pub first_messages: crate::guard::GuardStats,
    /// Notices dropped because the application left the priority channel full. Outcomes
    /// are never dropped: they travel on the receive channel.
    pub notices_dropped: u64,
    /// Our exchanges not finished yet.
    pub outbound_in_flight: usize,
    /// Requests from peers awaiting our answer.
    pub pending_responses: usize,
    /// A graceful stop began ([`Handler::drain`]).
    pub draining: bool,
    /// Nothing is left to finish: no exchange of ours, no peer's request awaiting our
    /// answer or the Ack of our reply. Shutting down now loses nothing.
    pub drained: bool,
    /// Something already decided has not reached the application or the network yet: a
    /// commit is running (durable mode: what it confirms leaves when it completes), or
    /// the next one is about to start.
    pub settling: bool,
    /// Exchange counters.
    pub stats: Stats,
    /// Members that are inactive (address records on: no unexpired record), ascending.
    pub inactive_members: Vec<PeerId>,
    /// Address records held (ours included).
    pub records_held: usize,
    /// Members this node still means to dial, or is connected to, to spread or learn the
    /// membership (0 once they all said they hold its epoch).
    pub membership_syncs: usize,
    /// Each peer allowed, connected or with an exchange: its connections, our exchanges
    /// with it (queued and under way) and its requests here, ascending by peer.
    pub peers: Vec<crate::endpoint::PeerSummary>,
}

/// What shutdown handed back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Our exchanges that were still pending, with their payloads (memory only: a durable
    /// node keeps them in its store instead, see `kept`).
    pub failed: Vec<(PeerId, ExchangeId, Bytes)>,
    /// Requests from peers we had not answered. Memory only: their dialers were told
    /// (Abort). Durable: they stay in the store and are delivered again at the next start.
    pub unanswered_requests: usize,
    /// Durable nodes: our exchanges left in the store, resumed at the next start.
    pub kept: usize,
    /// Events the application had not read yet (sync facade only; async users keep
    /// their [`Inbox`]).
    pub unread: Vec<Event>,
    /// Notices the application had not read yet (sync facade only).
    pub unread_notices: Vec<Notice>,
}

/// How to send one request, beyond its peer, address and payload
/// ([`Handler::request_with`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestOptions {
    /// An idempotency key the application makes from its own data (1 to
    /// [`MAX_KEY_LEN`](crate::endpoint::MAX_KEY_LEN) bytes): see [`Handler::request_with`].
    pub key: Option<Bytes>,
    /// The exchange ends within this at the latest, and is retried until then.
    pub deadline: Option<std::time::Duration>,
    /// [`Handler::request_to`] only: when no address is known for the peer (no record of
    /// it yet, or it is inactive), wait up to this long for one to arrive instead of
    /// failing at once. The call returns when the request is made, or with the error when
    /// the wait ends.
    pub wait_for_address: Option<std::time::Duration>,
}

impl RequestOptions {
    /// No key, no deadline: a plain request.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the idempotency key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the deadline.
    pub fn deadline(mut self, within: std::time::Duration) -> Self {
        self.deadline = Some(within);
        self
    }

    /// Waits up to `bound` for a peer's address record ([`RequestOptions::wait_for_address`]).
    pub fn wait_for_address(mut self, bound: std::time::Duration) -> Self {
        self.wait_for_address = Some(bound);
        self
    }
}

/// The wall clock a durable node measures stored deadlines on ([`Options::wall_clock`]).
pub type WallClock = Arc<dyn Fn() -> std::time::SystemTime + Send + Sync>;

pub(super) enum Command {
    Request {
        peer: PeerId,
        addr: SocketAddr,
        payload: Bytes,
        options: RequestOptions,
        reply: oneshot::Sender<Result<ExchangeId, RequestError>>,
    },
    Lookup {
        peer: PeerId,
        key: Bytes,
        reply: oneshot::Sender<Option<KeyedExchange>>,
    },
    Confirm {
        receipt: Receipt,
        reply: oneshot::Sender<bool>,
    },
    Cancel {
        exchange: ExchangeId,
        reply: oneshot::Sender<bool>,
    },
    Progress {
        exchange: ExchangeId,
        reply: oneshot::Sender<Option<crate::endpoint::Progress>>,
    },
    Reject {
        peer: PeerId,
        exchange: ExchangeId,
        reply: oneshot::Sender<Result<(), RespondError>>,
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
        reply: oneshot::Sender<Result<(), HandlerError>>,
    },
    Revoke {
        peer: PeerId,
        reply: oneshot::Sender<Result<bool, HandlerError>>,
    },
    SetAllowList {
        list: AllowList,
        reply: oneshot::Sender<Result<Vec<PeerId>, HandlerError>>,
    },
    OfferMembership {
        document: Box<Signed>,
        reply: oneshot::Sender<Result<Vec<u64>, HandlerError>>,
    },
    RequestTo {
        peer: PeerId,
        payload: Bytes,
        options: RequestOptions,
        reply: oneshot::Sender<Result<ExchangeId, RequestError>>,
    },
    /// Records a backend holds (the records task reads them).
    OfferRecords {
        records: Vec<Bytes>,
        /// How many were taken.
        reply: Option<oneshot::Sender<usize>>,
    },
    SetRecordAddresses {
        addresses: Vec<SocketAddr>,
        reply: oneshot::Sender<Result<(), HandlerError>>,
    },
    Membership {
        reply: oneshot::Sender<Option<MembershipStatus>>,
    },
    Drain {
        reply: oneshot::Sender<()>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    Shutdown {
        /// The application's inbox, when it hands it back (the sync facade): what is
        /// unread in it goes into the report, and counts as taken.
        inbox: Option<Inbox>,
        reply: oneshot::Sender<ShutdownReport>,
    },
}

/// How to start a [`Handler`], beyond its address, key and allow list.
pub struct Options {
    /// Bounds and timeouts.
    pub config: Config,
    /// Every random choice (ephemeral keys, jitter, exchange ids) derives from it.
    pub seed: [u8; 32],
    /// Without a store, mixed into where exchange ids start, so that a node restarted with
    /// the same seed never reuses an id of its previous incarnation (a peer that remembers
    /// an id would take the new request for a resend). `None` draws it from the operating
    /// system: then, and only in the ids, the same seed does not give the same run. The
    /// simulator passes the incarnation number.
    pub incarnation: Option<u64>,
    /// Where to keep what must survive a crash. `None`: memory only, and a restart loses
    /// queued and in-flight exchanges and the deduplication memory.
    pub store: Option<Box<dyn Store>>,
    /// Observes (and may alter) traffic; the simulator's hook.
    pub tap: Arc<dyn Tap>,
    /// Confirm mode: an outcome of ours (`Reply`, `Failed`) counts as settled only when
    /// the application confirms it stored it ([`Handler::confirm`]), not when it takes it
    /// from the inbox; until then a durable node keeps it and hands it out again after a
    /// restart, flagged `redelivered` (events unread at shutdown included). Requests are
    /// confirmed too: a confirmed request is not delivered again after a restart, only
    /// answerable. Default false: taking an outcome settles it.
    pub confirm_outcomes: bool,
    /// The wall clock deadlines are stored on (durable nodes keep a deadline across
    /// restarts as a wall-clock time). Default `SystemTime::now`; the simulator passes its
    /// virtual clock.
    pub wall_clock: WallClock,
    /// The signed membership document the operator installed: from then on the allow
    /// list given at start is ignored and the membership governs it (see
    /// `p2p_handler_core::membership`). A durable node resumes the ledger it stored; this
    /// document must then not be older than it. `None`: the allow list as given.
    pub membership: Option<Signed>,
    /// Address records (needs `membership`): the node publishes where it listens, signed
    /// and sealed for the members, reads theirs, and `request_to` finds peers by id alone.
    /// `None`: no records.
    pub records: Option<crate::records::RecordOptions>,
    /// A defect to plant in the endpoint (feature `sabotage`): the simulator's tests use it
    /// to show that each invariant catches what it should.
    #[cfg(feature = "sabotage")]
    pub sabotage: Option<crate::endpoint::Sabotage>,
    /// Fault points in the driver (feature `buggify`): with a seed, its tasks now and then
    /// fall behind (a connection task writes or reads late, the handler task takes its next
    /// input late), as on a busy machine, deterministically from the seed.
    #[cfg(feature = "buggify")]
    pub buggify: Option<u64>,
}

impl Options {
    /// Memory only, no tap, the incarnation nonce from the operating system.
    pub fn new(config: Config, seed: [u8; 32]) -> Self {
        Self {
            config,
            seed,
            incarnation: None,
            store: None,
            tap: Arc::new(NoTap),
            confirm_outcomes: false,
            wall_clock: Arc::new(std::time::SystemTime::now),
            membership: None,
            records: None,
            #[cfg(feature = "sabotage")]
            sabotage: None,
            #[cfg(feature = "buggify")]
            buggify: None,
        }
    }

    /// Turns the driver's fault points on (feature `buggify`; see [`Options::buggify`]).
    #[cfg(feature = "buggify")]
    pub fn buggify(mut self, seed: u64) -> Self {
        self.buggify = Some(seed);
        self
    }

    /// Publishes and reads address records (see [`Options::records`]).
    pub fn records(mut self, records: crate::records::RecordOptions) -> Self {
        self.records = Some(records);
        self
    }

    /// Makes signed membership documents govern the allow list, starting from `document`
    /// (see [`Options::membership`]).
    pub fn membership(mut self, document: Signed) -> Self {
        self.membership = Some(document);
        self
    }

    /// Turns confirm mode on (see [`Options::confirm_outcomes`]).
    pub fn confirm_outcomes(mut self) -> Self {
        self.confirm_outcomes = true;
        self
    }

    /// Sets the wall clock.
    pub fn wall_clock(mut self, clock: WallClock) -> Self {
        self.wall_clock = clock;
        self
    }

    /// Makes the node durable with `store`.
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Box::new(store));
        self
    }

    /// Makes the node durable with the `redb` store in directory `dir` (created if needed).
    pub fn data_dir(self, dir: &std::path::Path) -> Result<Self, StoreError> {
        Ok(self.store(crate::store::RedbStore::open(dir)?))
    }

    /// Sets the incarnation nonce.
    pub fn incarnation(mut self, nonce: u64) -> Self {
        self.incarnation = Some(nonce);
        self
    }

    /// Sets the tap.
    pub fn tap(mut self, tap: Arc<dyn Tap>) -> Self {
        self.tap = tap;
        self
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("config", &self.config)
            .field("incarnation", &self.incarnation)
            .field("store", &self.store.as_ref().map(|s| s.location()))
            .field("confirm_outcomes", &self.confirm_outcomes)
            .finish_non_exhaustive()
    }
}

/// The receiving end of the channel of requests and outcomes. Like a tokio receiver, plus
/// one duty: it tells the handler which outcomes the application took, so that a durable
/// node forgets them (until then, they survive a restart) and `max_unread_outcomes` counts
/// only what is really unread.
#[derive(Debug)]
pub struct Received {
    rx: mpsc::Receiver<Event>,
    taken: mpsc::UnboundedSender<Taken>,
}

/// What the application took from its `received` channel that a durable node keeps until
/// it is taken: the outcome of one of our exchanges, or of a peer's.
#[derive(Debug, Clone, Copy)]
pub(super) enum Taken {
    Outcome(ExchangeId),
    Response(PeerId, ExchangeId),
}

impl Taken {
    /// What taking `event` settles, if anything.
    pub(super) fn of(event: &Event) -> Option<Self> {
        match event {
            Event::Reply { exchange, .. } | Event::Failed { exchange, .. } => {
                Some(Self::Outcome(*exchange))
            }
            other => other
                .response_of()
                .map(|(peer, exchange)| Self::Response(peer, exchange)),
        }
    }
}

impl Received {
    /// The next event; `None` once the handler stopped and everything was read. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Event> {
        let event = self.rx.recv().await?;
        self.took(&event);
        Some(event)
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Result<Event, mpsc::error::TryRecvError> {
        let event = self.rx.try_recv()?;
        self.took(&event);
        Ok(event)
    }

    fn took(&self, event: &Event) {
        if let Some(taken) = Taken::of(event) {
            // The handler may be gone; then nothing needs forgetting.
            let _ = self.taken.send(taken);
        }
    }
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
    pub received: Received,
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
        Self::spawn_with(
            transport,
            addr,
            keypair,
            allow,
            Options::new(config, seed).tap(tap),
        )
        .await
    }

    /// Starts a handler as [`Handler::spawn`] does, with everything [`Options`] can set: a
    /// store makes it durable. A durable handler first reads its store back: our unfinished
    /// exchanges resume, requests acknowledged and not answered are delivered again (flagged
    /// `redelivered`), and outcomes the application had not taken come first in the inbox.
    pub async fn spawn_with<T: Transport>(
        transport: T,
        addr: SocketAddr,
        keypair: Keypair,
        allow: AllowList,
        options: Options,
    ) -> Result<(Self, Inbox), HandlerError> {
        let Options {
            config,
            seed,
            incarnation,
            mut store,
            tap,
            confirm_outcomes,
            wall_clock,
            membership,
            records,
            #[cfg(feature = "sabotage")]
            sabotage,
            #[cfg(feature = "buggify")]
            buggify,
        } = options;
        #[cfg(not(feature = "buggify"))]
        let buggify: Option<u64> = None;
        if records.is_some() && membership.is_none() {
            return Err(HandlerError::Records(
                crate::endpoint::RecordsError::NoMembership,
            ));
        }
        let record_signer = crate::records::RecordSigner::new(&keypair);
        config.validate()?;
        let local_peer_id = keypair.peer_id();
        let recovered = match &mut store {
            Some(store) => {
                let rows = store.load()?;
                let fresh = rows.is_empty();
                let recovered =
                    durable::decode(local_peer_id, rows).map_err(|record| StoreError::Corrupt {
                        path: store.location(),
                        record,
                    })?;
                super::observe::resumed(&store.location(), fresh, &recovered);
                Some((fresh, recovered))
            }
            None => None,
        };
        let listener = transport
            .bind(addr, config.listen_backlog)
            .await
            .map_err(|source| HandlerError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| HandlerError::Bind { addr, source })?;
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut endpoint_seed = [0u8; 32];
        rng.fill_bytes(&mut endpoint_seed);
        let mut endpoint =
            Endpoint::new(config.clone(), local_peer_id, allow.clone(), endpoint_seed)?;
        let nonce = match incarnation {
            Some(nonce) => nonce,
            None => {
                let mut bytes = [0u8; 8];
                getrandom::fill(&mut bytes)
                    .map_err(|e| HandlerError::Runtime(io::Error::other(e.to_string())))?;
                u64::from_le_bytes(bytes)
            }
        };
        endpoint.vary_exchange_ids(nonce);
        #[cfg(feature = "sabotage")]
        if let Some(defect) = sabotage {
            endpoint.sabotage(defect);
        }
        let mut recv_backlog = VecDeque::new();
        let mut pending_ops = Vec::new();
        let mut unsettled = std::collections::BTreeSet::new();
        if let Some((fresh, recovered)) = recovered {
            // A fresh store gets its header; an older format's header is rewritten, since
            // this build writes rows of its own format from now on.
            if fresh || recovered.format.is_some_and(|f| f < durable::FORMAT) {
                pending_ops = durable::header(local_peer_id);
            }
            let outcomes = endpoint.restore(recovered, super::now(), super::unix_ms(&*wall_clock));
            for event in outcomes {
                if let Event::Reply { exchange, .. } | Event::Failed { exchange, .. } = &event {
                    unsettled.insert(*exchange);
                }
                recv_backlog.push_back(event);
            }
        }
        endpoint.set_wall_clock(super::now(), super::unix_ms(&*wall_clock));
        let mut allow = allow;
        if let Some(document) = membership {
            let installed = endpoint.install_membership(Some(document), super::now())?;
            super::observe::membership_installed(&installed);
            // Handshakes check the membership's list from the first one.
            allow = endpoint.allow_list().clone();
        }
        let (published_tx, records_pump) = match records {
            Some(options) => {
                let addresses = if !options.publish {
                    Vec::new()
                } else if options.addresses.is_empty() {
                    vec![local_addr]
                } else {
                    options.addresses.clone()
                };
                let settings = crate::endpoint::RecordSettings {
                    addresses,
                    ttl: options.ttl,
                };
                endpoint
                    .install_records(record_signer, settings, super::now())
                    .map_err(HandlerError::Records)?;
                match options.backend {
                    Some(backend) => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        if let Some(own) = endpoint.own_record() {
                            let _ = tx.send(own.bytes().clone());
                        }
                        (Some(tx), Some((backend, options.poll_interval, rx)))
                    }
                    None => (None, None),
                }
            }
            None => (None, None),
        };
        let (taken_tx, taken_rx) = mpsc::unbounded_channel();
        let cap = config.channel_capacity;
        let (cmd_tx, cmd_rx) = mpsc::channel(cap);
        let (recv_tx, recv_rx) = mpsc::channel(cap);
        let (prio_tx, prio_rx) = mpsc::channel(cap);
        let (net_tx, net_rx) = mpsc::channel(cap);
        let (ev_tx, ev_rx) = mpsc::channel(cap);
        let (notice_tx, notice_rx) = mpsc::channel(cap);
        let shared_allow: SharedAllow = Arc::new(RwLock::new(allow));
        let slots: Slots = Arc::default();
        let mut guard_seed = [0u8; 32];
        rand_core::Rng::fill_bytes(&mut rng, &mut guard_seed);
        let guard = crate::guard::Guard::new(keypair.public_bytes(), guard_seed, super::now());
        let gate = super::slots::Gate::new(crate::admission::Admission::new(&config), guard);
        let gate_for_status = gate.clone();
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
            gate,
            parked: BTreeMap::new(),
            bytes: super::conn_task::ByteCounters::new(),
            buggify,
            next_stream: 1,
        };
        let network = tokio::spawn(router.run(listener));
        let task = HandlerTask {
            buggify: super::buggify::Points::new(buggify, 0),
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
            unsettled,
            confirm_outcomes,
            wall_clock,
            recv_backlog,
            prio_backlog: VecDeque::new(),
            store,
            pending_ops,
            forgets_since: None,
            commit_forgets: false,
            taken: taken_rx,
            deferred: Vec::new(),
            stop: None,
            stop_accepting: false,
            observer: super::observe::Observer::new(),
            in_flight: None,
            connection_tasks: 0,
            notices_dropped: 0,
            invariant_broken: false,
            evicted_unauthenticated: 0,
            parked_connections: 0,
            first_messages: crate::guard::GuardStats::default(),
            gate: gate_for_status,
            pending_net: VecDeque::new(),
            states: BTreeMap::new(),
            published: published_tx,
            awaiting_address: Vec::new(),
        };
        if let Some((backend, interval, rx)) = records_pump {
            tokio::spawn(super::records::pump(
                backend,
                interval,
                local_peer_id,
                cmd_tx.downgrade(),
                rx,
            ));
        }
        tokio::spawn(task.run(network));
        Ok((
            Self {
                commands: cmd_tx,
                local_peer_id,
                local_addr,
            },
            Inbox {
                received: Received {
                    rx: recv_rx,
                    taken: taken_tx,
                },
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
    ///
    /// On a durable node the id is returned once the request is committed: from then on
    /// it survives a crash. Requests issued concurrently share commits.
    pub async fn request(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        payload: impl Into<Bytes>,
    ) -> Result<ExchangeId, HandlerError> {
        self.request_with(peer, addr, payload, RequestOptions::new())
            .await
    }

    /// [`Handler::request`] that must end within `deadline`: if it has not by then (queued,
    /// in flight or backing off), its outcome is `Failed(DeadlineExceeded)` with the payload
    /// back; until then it is retried, whatever `max_attempts` says. A durable node keeps
    /// the deadline across restarts (as a wall-clock time).
    pub async fn request_with_deadline(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        payload: impl Into<Bytes>,
        deadline: std::time::Duration,
    ) -> Result<ExchangeId, HandlerError> {
        self.request_with(
            peer,
            addr,
            payload,
            RequestOptions::new().deadline(deadline),
        )
        .await
    }

    /// [`Handler::request`] with an idempotency key and/or a deadline.
    ///
    /// **Idempotency key.** Make it from your own data (an invoice number, a protocol
    /// round), never at random. The handler refuses a second request with the same key to
    /// the same peer while the first is unfinished or its outcome unsettled
    /// (`RequestError::KeyInUse`, naming the first), keeps the key with the exchange on a
    /// durable node, and [`Handler::lookup`] finds the exchange by it, also after a
    /// restart. So a crash inside `request` is harmless: after the restart, look the key up
    /// first; `None` means the request was never made (or you settled its outcome), so make
    /// it; otherwise wait for (or read) its outcome.
    ///
    /// **Deadline.** See [`Handler::request_with_deadline`].
    pub async fn request_with(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        payload: impl Into<Bytes>,
        options: RequestOptions,
    ) -> Result<ExchangeId, HandlerError> {
        let payload = payload.into();
        Ok(self
            .call(|reply| Command::Request {
                peer,
                addr,
                payload,
                options,
                reply,
            })
            .await??)
    }

    /// Sends `payload` to `peer` at the address its freshest address record names (or, for
    /// a member without records, the one its membership entry gives): the application
    /// needs no address. Fails at once (payload not sent) with `Inactive` for a peer whose
    /// record expired, `NoAddress` for one whose record never reached this node and whose
    /// entry gives no address. Needs [`Options::records`]. A peer that moves later is followed: the exchange
    /// redials at its new address once its new record arrives.
    pub async fn request_to(
        &self,
        peer: PeerId,
        payload: impl Into<Bytes>,
    ) -> Result<ExchangeId, HandlerError> {
        self.request_to_with(peer, payload, RequestOptions::new())
            .await
    }

    /// [`Handler::request_to`] with an idempotency key and/or a deadline.
    pub async fn request_to_with(
        &self,
        peer: PeerId,
        payload: impl Into<Bytes>,
        options: RequestOptions,
    ) -> Result<ExchangeId, HandlerError> {
        let payload = payload.into();
        Ok(self
            .call(|reply| Command::RequestTo {
                peer,
                payload,
                options,
                reply,
            })
            .await??)
    }

    /// Offers address records from elsewhere (a directory read by the application): each
    /// is judged as one from a peer. Returns how many were taken.
    pub async fn offer_records(&self, records: Vec<Bytes>) -> Result<usize, HandlerError> {
        self.call(|reply| Command::OfferRecords {
            records,
            reply: Some(reply),
        })
        .await
    }

    /// Publishes `addresses` in a new address record at once (a node that moved: its
    /// peers' exchanges with it follow). Needs [`Options::records`].
    pub async fn set_record_addresses(
        &self,
        addresses: Vec<SocketAddr>,
    ) -> Result<(), HandlerError> {
        self.call(|reply| Command::SetRecordAddresses { addresses, reply })
            .await?
    }

    /// Our exchange with `peer` that carries idempotency key `key`: queued, in flight, or
    /// finished with its outcome (while the application has not settled it). `None`: no
    /// such request was made, or its outcome was settled.
    pub async fn lookup(
        &self,
        peer: PeerId,
        key: impl Into<Bytes>,
    ) -> Result<Option<KeyedExchange>, HandlerError> {
        let key = key.into();
        self.call(|reply| Command::Lookup { peer, key, reply })
            .await
    }

    /// Confirm mode ([`Options::confirm_outcomes`]): the application stored the event
    /// `receipt` names ([`Event::receipt`]). An outcome is then settled: a durable node
    /// forgets it, its key is free, and it no longer counts against
    /// `max_unread_outcomes`. A request is no longer delivered again after a restart (it
    /// stays answerable). Returns whether there was something to confirm. Outside confirm
    /// mode, outcomes settle when taken; confirming a request still works.
    pub async fn confirm(&self, receipt: Receipt) -> Result<bool, HandlerError> {
        self.call(|reply| Command::Confirm { receipt, reply }).await
    }

    /// Cancels our exchange `exchange`, queued or in flight: its outcome is then
    /// `Failed(Cancelled)` with the payload back (a request already sent may have reached
    /// the peer's application). Returns whether it was unfinished.
    pub async fn cancel(&self, exchange: ExchangeId) -> Result<bool, HandlerError> {
        self.call(|reply| Command::Cancel { exchange, reply }).await
    }

    /// How our unfinished exchange `exchange` stands (its state, failed tries, why the
    /// last one failed); `None` once it has ended.
    pub async fn progress(
        &self,
        exchange: ExchangeId,
    ) -> Result<Option<crate::endpoint::Progress>, HandlerError> {
        self.call(|reply| Command::Progress { exchange, reply })
            .await
    }

    /// Refuses `peer`'s request `exchange` instead of answering it: the dialer's exchange
    /// fails at once with `Aborted(Refused)` and its payload back, rather than after the
    /// response timeout.
    pub async fn reject(&self, peer: PeerId, exchange: ExchangeId) -> Result<(), HandlerError> {
        self.call(|reply| Command::Reject {
            peer,
            exchange,
            reply,
        })
        .await??;
        Ok(())
    }

    /// Answers `peer`'s oldest unanswered request; returns which exchange it answered.
    ///
    /// On a durable node it returns once the reply is committed (a request answered is
    /// never delivered again, even after a crash). Each commit covers every answer given
    /// meanwhile, so an application serving many peers answers concurrently rather than
    /// waiting for each answer before taking the next request.
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

    /// Answers `peer`'s request `exchange`. Durable nodes: as [`Handler::response`].
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
    /// `MembershipManaged` when signed membership documents govern the list.
    pub async fn allow(&self, peer: PeerId, entry: AllowedPeer) -> Result<(), HandlerError> {
        self.call(|reply| Command::Allow { peer, entry, reply })
            .await?
    }

    /// Removes a peer from the allow list and disconnects it. Returns whether it was listed.
    /// `MembershipManaged` when signed membership documents govern the list.
    pub async fn revoke(&self, peer: PeerId) -> Result<bool, HandlerError> {
        self.call(|reply| Command::Revoke { peer, reply }).await?
    }

    /// Offers a signed membership document (the operator's newer epoch): applied when it
    /// is the next epoch and acceptable, then spread to every member by the nodes
    /// themselves. Returns the epochs applied (empty: held already). A document that skips
    /// epochs is kept and applied once the ones between arrive from peers (then the error
    /// says `gap`). Refused: `MembershipRefused` with every reason; the allow list is
    /// untouched.
    pub async fn offer_membership(&self, document: Signed) -> Result<Vec<u64>, HandlerError> {
        self.call(|reply| Command::OfferMembership {
            document: Box::new(document),
            reply,
        })
        .await?
    }

    /// The membership in force, if documents govern the allow list.
    pub async fn membership(&self) -> Result<Option<MembershipStatus>, HandlerError> {
        self.call(|reply| Command::Membership { reply }).await
    }

    /// Replaces the allow list as a whole (e.g. a reloaded file). Peers it no longer lists
    /// are treated as by [`Handler::revoke`]: disconnected, our exchanges with them failed
    /// with the payload back (`Failed(Revoked)`), their requests awaiting our answer
    /// cancelled; a listed peer's connection from an address its new entry excludes is
    /// closed. Returns the peers removed, in id order.
    /// `MembershipManaged` when signed membership documents govern the list.
    pub async fn set_allow_list(&self, list: AllowList) -> Result<Vec<PeerId>, HandlerError> {
        self.call(|reply| Command::SetAllowList { list, reply })
            .await?
    }

    /// Begins a graceful stop: the listener closes, our new requests are refused
    /// (`RequestError::ShuttingDown`) and peers' new requests Nacked `ShuttingDown`, while
    /// the exchanges already started, ours and theirs, go on. [`Status::drained`] turns true
    /// when none is left; then call [`Handler::shutdown`] (or call it when a grace period
    /// ends: what is left then is handled as by a plain shutdown).
    pub async fn drain(&self) -> Result<(), HandlerError> {
        self.call(|reply| Command::Drain { reply }).await
    }

    /// Counters and sizes.
    pub async fn status(&self) -> Result<Status, HandlerError> {
        self.call(|reply| Command::Status { reply }).await
    }

    /// Stops the node: closes every connection and the listener, and ends every task. In
    /// memory only, it first fails our pending exchanges (payloads returned in the report)
    /// and tells dialers waiting on us; a durable node keeps both in its store instead, to
    /// resume at the next start.
    pub async fn shutdown(&self) -> Result<ShutdownReport, HandlerError> {
        self.call(|reply| Command::Shutdown { inbox: None, reply })
            .await
    }

    /// [`Handler::shutdown`], handing back the application's inbox: whatever is unread in
    /// it comes back in the report (`unread`, `unread_notices`) and counts as taken, so a
    /// durable node does not hand it out again at its next start (in confirm mode, outcomes
    /// are settled only by confirmation, so unconfirmed ones do come back).
    pub async fn shutdown_with_inbox(&self, inbox: Inbox) -> Result<ShutdownReport, HandlerError> {
        self.call(|reply| Command::Shutdown {
            inbox: Some(inbox),
            reply,
        })
        .await
    }
}
