//! # p2p-handler
//!
//! An authenticated peer-to-peer multi-exchange handler. Two nodes, each identified by a static
//! X25519 key, exchange messages over Noise XX sessions. One *exchange*: the dialer connects,
//! sends a Request, waits for the responder's Ack, waits for its Reply, Acks it and
//! disconnects (or keeps the connection when reuse is configured). Acks, Nacks, resends,
//! redials, per-peer queueing, timeouts, the allow list and rate limits are handled here; the
//! application sees requests, replies and failures that carry its payload back.
//!
//! This crate is built sans-IO, after quinn-proto:
//!
//! * [`Connection`] (one per stream) performs the handshake, identity and allow-list checks,
//!   encryption and chunking. Frame bodies in, frame bodies out.
//! * [`Endpoint`] (one per node) runs every exchange with every peer: inputs carry `now`,
//!   outputs (dials, messages to send, closes, application events, the next timeout) are
//!   polled. It reads no clock, opens no socket and draws randomness only from the seeded RNG
//!   it is given, so the same inputs always give the same outputs.
//!
//! A driver (the tokio runtime, the simulator, or a test harness) moves bytes between them.
//! See `docs/ARCHITECTURE.md` for the map and `docs/PROTOCOL.md` for the wire format.

#![forbid(unsafe_code)]

pub mod allow_list;
pub mod config;
pub mod connection;
pub mod endpoint;
mod facade;
pub mod identity;
pub mod noise;
mod rate;
pub mod runtime;
mod timers;
pub mod transport;
pub mod wire;

/// The README's example, compiled and run as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExample;

#[cfg(test)]
mod harness;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;

pub use allow_list::{AllowList, AllowedPeer, Rejection};
pub use config::{Config, RateLimit};
pub use connection::{Closed, ConnError, ConnEvent, Connection, Remote};
pub use endpoint::{
    ConnId, Direction, Endpoint, Event, Failure, Output, RequestError, RespondError,
};
pub use facade::P2pHandler;
pub use identity::{Keypair, PeerId};
pub use runtime::{
    Arrival, Handler, HandlerError, Inbox, NoTap, Notice, ShutdownReport, Status, Tap, Verdict,
};
pub use transport::{MemoryTransport, TcpTransport, Transport};
pub use wire::{ExchangeId, Message};
