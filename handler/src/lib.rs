//! # p2p-handler
//!
//! An authenticated peer-to-peer multi-exchange handler. Two nodes, each identified by a static
//! X25519 key, exchange messages over Noise XX sessions. One *exchange*: the dialer connects,
//! sends a Request, waits for the responder's Ack, waits for its Reply, Acks it and
//! disconnects (or keeps the connection when reuse is configured). Acks, Nacks, resends,
//! redials, per-peer queueing, timeouts, the allow list and rate limits are handled here; the
//! application sees requests, replies and failures that carry its payload back.
//!
//! It is built in two layers, after quinn:
//!
//! * `p2p-handler-core` holds the protocol, sans-IO: [`Connection`] (handshake, identity,
//!   encryption, chunking) and [`Endpoint`] (every exchange with every peer). Its modules are
//!   re-exported here under the same names ([`wire`], [`endpoint`], ...).
//! * This crate is the driver around it: the tokio [`runtime`] (tasks and channels),
//!   [`transport`]s (TCP, in-memory; turmoil in the simulator), the async [`Handler`], the
//!   synchronous [`P2pHandler`] facade and the `p2p-node` program.
//!
//! See `docs/ARCHITECTURE.md` for the map and `docs/PROTOCOL.md` for the wire format.

#![forbid(unsafe_code)]

pub use p2p_handler_core::{
    admission, allow_list, config, connection, durable, endpoint, guard, identity, membership,
    noise, wire,
};

mod facade;
pub mod records;
pub mod runtime;
pub mod store;
pub mod transport;

/// The README's example, compiled and run as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExample;

pub use allow_list::{AllowList, AllowedPeer, Expiry, Rejection};
pub use config::{Config, RateLimit};
pub use connection::{Closed, ConnError, ConnEvent, Connection, Remote};
pub use endpoint::{
    ConnId, Direction, Endpoint, Event, Failure, KeyedExchange, MembershipEvent, Output,
    PeerSummary, Progress, Receipt, RequestError, RespondError, RetryCause, Source,
};
pub use facade::P2pHandler;
pub use identity::{Keypair, PeerId};
pub use runtime::{
    Arrival, Handler, HandlerError, Inbox, MembershipStatus, NoTap, Notice, Options, Received,
    RequestOptions, ShutdownReport, Status, Tap, Verdict, WallClock,
};
/// The exchange-duration histogram's name and buckets (seconds), for an exporter.
pub use runtime::{EXCHANGE_DURATION, EXCHANGE_DURATION_BUCKETS};
pub use store::{MemoryStore, RedbStore, Store, StoreError};
pub use transport::{MemoryTransport, TcpTransport, Transport};
pub use wire::{ExchangeId, Message};
