//! The synchronous API: [`P2pHandler`], usable without writing async code.
//!
//! Like mini-redis's `BlockingClient`, it holds no logic: it owns a small multi-threaded
//! tokio runtime on which the handler's tasks run in the background, and each method
//! `block_on`s the matching [`Handler`] call. Async users use [`Handler`] directly: like any
//! blocking client, `P2pHandler` must not be used (or dropped) from inside an async runtime,
//! where `block_on` would panic.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;

use crate::allow_list::{AllowList, AllowedPeer};
use crate::config::Config;
use crate::endpoint::{Event, KeyedExchange, Receipt};
use crate::identity::{Keypair, PeerId};
use crate::runtime::{
    Handler, HandlerError, Inbox, Notice, Options, RequestOptions, ShutdownReport, Status,
};
use crate::transport::TcpTransport;
use crate::wire::ExchangeId;

/// How long dropping or shutting down waits for the runtime's threads to end.
const RUNTIME_STOP: Duration = Duration::from_secs(2);

/// A node on real TCP, driven from synchronous code.
///
/// ```no_run
/// use p2p_handler::{AllowList, Keypair, P2pHandler};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let key = Keypair::from_file("node.key")?;
/// let allow = AllowList::from_file("allow.toml")?;
/// let node = P2pHandler::new("0.0.0.0:7000", key, allow)?;
/// println!("I am {} on {}", node.local_peer_id(), node.local_address());
/// # Ok(()) }
/// ```
pub struct P2pHandler {
    runtime: Option<tokio::runtime::Runtime>,
    handler: Handler,
    /// The application's inbox; handed to the handler at shutdown.
    inbox: Mutex<Option<Inbox>>,
}

impl std::fmt::Debug for P2pHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2pHandler")
            .field("peer_id", &self.handler.local_peer_id())
            .field("address", &self.handler.local_addr())
            .finish_non_exhaustive()
    }
}

impl P2pHandler {
    /// Listens on `address` (port 0 picks a free port) with the default configuration.
    pub fn new(
        address: impl ToSocketAddrs + fmt::Debug,
        private_key: Keypair,
        allow_list: AllowList,
    ) -> Result<Self, HandlerError> {
        Self::with_config(address, private_key, allow_list, Config::default())
    }

    /// [`P2pHandler::new`] with a configuration. Randomness is seeded from the OS.
    pub fn with_config(
        address: impl ToSocketAddrs + fmt::Debug,
        private_key: Keypair,
        allow_list: AllowList,
        config: Config,
    ) -> Result<Self, HandlerError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| HandlerError::Runtime(std::io::Error::other(e.to_string())))?;
        Self::with_seed(address, private_key, allow_list, config, seed)
    }

    /// [`P2pHandler::with_config`] with an explicit seed for all of its randomness.
    pub fn with_seed(
        address: impl ToSocketAddrs + fmt::Debug,
        private_key: Keypair,
        allow_list: AllowList,
        config: Config,
        seed: [u8; 32],
    ) -> Result<Self, HandlerError> {
        Self::with_options(address, private_key, allow_list, Options::new(config, seed))
    }

    /// Starts with everything [`Options`] sets, e.g. a data directory that makes the node
    /// durable: `Options::new(config, seed).data_dir(path)?`.
    pub fn with_options(
        address: impl ToSocketAddrs + fmt::Debug,
        private_key: Keypair,
        allow_list: AllowList,
        options: Options,
    ) -> Result<Self, HandlerError> {
        let addr = resolve(address)?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("p2p-handler")
            .enable_all()
            .build()
            .map_err(HandlerError::Runtime)?;
        let (handler, inbox) = runtime.block_on(Handler::spawn_with(
            TcpTransport,
            addr,
            private_key,
            allow_list,
            options,
        ))?;
        Ok(Self {
            runtime: Some(runtime),
            handler,
            inbox: Mutex::new(Some(inbox)),
        })
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> Result<F::Output, HandlerError> {
        let runtime = self.runtime.as_ref().ok_or(HandlerError::Stopped)?;
        Ok(runtime.block_on(future))
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.handler.local_peer_id()
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_address(&self) -> SocketAddr {
        self.handler.local_addr()
    }

    /// The async handle underneath, for mixing in tokio code.
    pub fn handler(&self) -> &Handler {
        &self.handler
    }

    /// Sends `msg` to `peer_id` at `address`; returns the exchange id its outcome will carry.
    /// Dials, or queues behind the peer's current exchange.
    pub fn request(
        &self,
        peer_id: PeerId,
        address: SocketAddr,
        msg: impl Into<Bytes>,
    ) -> Result<ExchangeId, HandlerError> {
        self.block_on(self.handler.request(peer_id, address, msg))?
    }

    /// [`P2pHandler::request`] that must end within `deadline`; see
    /// [`Handler::request_with_deadline`].
    pub fn request_with_deadline(
        &self,
        peer_id: PeerId,
        address: SocketAddr,
        msg: impl Into<Bytes>,
        deadline: Duration,
    ) -> Result<ExchangeId, HandlerError> {
        self.block_on(
            self.handler
                .request_with_deadline(peer_id, address, msg, deadline),
        )?
    }

    /// [`P2pHandler::request`] with an idempotency key and/or a deadline; see
    /// [`Handler::request_with`].
    pub fn request_with(
        &self,
        peer_id: PeerId,
        address: SocketAddr,
        msg: impl Into<Bytes>,
        options: RequestOptions,
    ) -> Result<ExchangeId, HandlerError> {
        self.block_on(self.handler.request_with(peer_id, address, msg, options))?
    }

    /// Sends `msg` to `peer_id` wherever its address record says it is; see
    /// [`Handler::request_to`].
    pub fn request_to(
        &self,
        peer_id: PeerId,
        msg: impl Into<Bytes>,
    ) -> Result<ExchangeId, HandlerError> {
        self.block_on(self.handler.request_to(peer_id, msg))?
    }

    /// [`P2pHandler::request_to`] with an idempotency key and/or a deadline.
    pub fn request_to_with(
        &self,
        peer_id: PeerId,
        msg: impl Into<Bytes>,
        options: RequestOptions,
    ) -> Result<ExchangeId, HandlerError> {
        self.block_on(self.handler.request_to_with(peer_id, msg, options))?
    }

    /// Offers address records read elsewhere; see [`Handler::offer_records`].
    pub fn offer_records(&self, records: Vec<Bytes>) -> Result<usize, HandlerError> {
        self.block_on(self.handler.offer_records(records))?
    }

    /// Our exchange with `peer_id` carrying idempotency key `key`; see [`Handler::lookup`].
    pub fn lookup(
        &self,
        peer_id: PeerId,
        key: impl Into<Bytes>,
    ) -> Result<Option<KeyedExchange>, HandlerError> {
        self.block_on(self.handler.lookup(peer_id, key))?
    }

    /// Confirm mode: the application stored the event `receipt` names; see
    /// [`Handler::confirm`].
    pub fn confirm(&self, receipt: Receipt) -> Result<bool, HandlerError> {
        self.block_on(self.handler.confirm(receipt))?
    }

    /// Cancels our exchange `exchange`, queued or in flight; see [`Handler::cancel`].
    pub fn cancel(&self, exchange: ExchangeId) -> Result<bool, HandlerError> {
        self.block_on(self.handler.cancel(exchange))?
    }

    /// How our unfinished exchange stands; see [`Handler::progress`].
    pub fn progress(
        &self,
        exchange: ExchangeId,
    ) -> Result<Option<crate::endpoint::Progress>, HandlerError> {
        self.block_on(self.handler.progress(exchange))?
    }

    /// Refuses `peer_id`'s request `exchange` at once; see [`Handler::reject`].
    pub fn reject(&self, peer_id: PeerId, exchange: ExchangeId) -> Result<(), HandlerError> {
        self.block_on(self.handler.reject(peer_id, exchange))?
    }

    /// Answers `peer_id`'s oldest pending request; returns the exchange answered.
    pub fn response(
        &self,
        peer_id: PeerId,
        msg: impl Into<Bytes>,
    ) -> Result<ExchangeId, HandlerError> {
        self.block_on(self.handler.response(peer_id, msg))?
    }

    /// Answers `peer_id`'s request `exchange`.
    pub fn response_to(
        &self,
        peer_id: PeerId,
        exchange: ExchangeId,
        msg: impl Into<Bytes>,
    ) -> Result<(), HandlerError> {
        self.block_on(self.handler.response_to(peer_id, exchange, msg))?
    }

    /// The next request or outcome (reply, failure, the fate of one of our replies), if one
    /// is waiting. Never blocks. An application that reads only this never misses an
    /// outcome and never stalls the node.
    pub fn check_receive(&self) -> Option<Event> {
        self.inbox.lock().ok()?.as_mut()?.received.try_recv().ok()
    }

    /// The next informational notice (peer error, rate or connection limit), if one is
    /// waiting. Never blocks. Optional: unread notices are dropped and counted.
    pub fn check_priority(&self) -> Option<Notice> {
        self.inbox.lock().ok()?.as_mut()?.priority.try_recv().ok()
    }

    /// Waits up to `timeout` for the next request or outcome.
    pub fn receive_timeout(&self, timeout: Duration) -> Option<Event> {
        let mut inbox = self.inbox.lock().ok()?;
        let inbox = inbox.as_mut()?;
        self.block_on(async { tokio::time::timeout(timeout, inbox.received.recv()).await })
            .ok()?
            .ok()?
    }

    /// Waits up to `timeout` for the next priority notice.
    pub fn priority_timeout(&self, timeout: Duration) -> Option<Notice> {
        let mut inbox = self.inbox.lock().ok()?;
        let inbox = inbox.as_mut()?;
        self.block_on(async { tokio::time::timeout(timeout, inbox.priority.recv()).await })
            .ok()?
            .ok()?
    }

    /// Allows (or updates) a peer at runtime.
    pub fn allow(&self, peer_id: PeerId, entry: AllowedPeer) -> Result<(), HandlerError> {
        self.block_on(self.handler.allow(peer_id, entry))?
    }

    /// Revokes a peer at runtime and disconnects it. Returns whether it was listed.
    pub fn revoke(&self, peer_id: PeerId) -> Result<bool, HandlerError> {
        self.block_on(self.handler.revoke(peer_id))?
    }

    /// Replaces the allow list as a whole; see [`Handler::set_allow_list`].
    pub fn set_allow_list(&self, list: AllowList) -> Result<Vec<PeerId>, HandlerError> {
        self.block_on(self.handler.set_allow_list(list))?
    }

    /// Offers a signed membership document; see [`Handler::offer_membership`].
    pub fn offer_membership(
        &self,
        document: crate::membership::Signed,
    ) -> Result<Vec<u64>, HandlerError> {
        self.block_on(self.handler.offer_membership(document))?
    }

    /// The membership in force; see [`Handler::membership`].
    pub fn membership(&self) -> Result<Option<crate::MembershipStatus>, HandlerError> {
        self.block_on(self.handler.membership())?
    }

    /// Begins a graceful stop; see [`Handler::drain`]. Keep reading and answering until
    /// [`Status::drained`] (or a grace period ends), then call [`P2pHandler::shutdown`].
    pub fn drain(&self) -> Result<(), HandlerError> {
        self.block_on(self.handler.drain())?
    }

    /// Counters and sizes.
    pub fn status(&self) -> Result<Status, HandlerError> {
        self.block_on(self.handler.status())?
    }

    /// Stops the node and hands back everything pending: our unfinished exchanges with their
    /// payloads, and whatever the application had not read. No task or socket remains.
    pub fn shutdown(mut self) -> ShutdownReport {
        self.stop()
    }

    fn stop(&mut self) -> ShutdownReport {
        let Some(runtime) = self.runtime.take() else {
            return ShutdownReport::default();
        };
        // The inbox goes with the shutdown: what is unread in it comes back in the report,
        // taken, so that a durable node does not hand it out again at its next start.
        let report = match self.inbox.lock().ok().and_then(|mut inbox| inbox.take()) {
            Some(inbox) => runtime.block_on(self.handler.shutdown_with_inbox(inbox)),
            None => runtime.block_on(self.handler.shutdown()),
        };
        runtime.shutdown_timeout(RUNTIME_STOP);
        report.unwrap_or_default()
    }
}

impl Drop for P2pHandler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The one address `address` names; an error quotes the input.
fn resolve(address: impl ToSocketAddrs + fmt::Debug) -> Result<SocketAddr, HandlerError> {
    address
        .to_socket_addrs()
        .map_err(|e| {
            HandlerError::Address(format!(
                "{address:?}: {e} (expected HOST:PORT, e.g. 127.0.0.1:7000)"
            ))
        })?
        .next()
        .ok_or_else(|| HandlerError::Address(format!("{address:?} resolves to no address")))
}
