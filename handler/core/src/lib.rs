//! # p2p-handler-core
//!
//! The sans-IO core of `p2p-handler`, after quinn-proto: the whole protocol and no networking.
//! This crate depends on no async runtime and no I/O crate, so the compiler, not discipline,
//! keeps it from opening a socket, reading a clock or spawning a task.
//!
//! * [`Connection`] (one per stream) performs the handshake, identity and allow-list checks,
//!   encryption and chunking. Frame bodies in, frame bodies out.
//! * [`Endpoint`] (one per node) runs every exchange with every peer: inputs carry `now`,
//!   outputs (dials, messages to send, closes, application events, the next timeout) are
//!   polled. It reads no clock, opens no socket and draws randomness only from the seeded RNG
//!   it is given, so the same inputs always give the same outputs.
//!
//! The only files it touches are the key and allow-list files a caller asks it to load
//! ([`Keypair::from_file`], [`AllowList::from_file`]).
//!
//! A driver (the tokio runtime in `p2p-handler`, the simulator, or the test harness in this
//! crate) moves bytes between them. See `docs/ARCHITECTURE.md` for the map and
//! `docs/PROTOCOL.md` for the wire format.

#![forbid(unsafe_code)]

pub mod admission;
pub mod allow_list;
pub mod canonical;
pub mod config;
pub mod connection;
pub mod durable;
pub mod endpoint;
pub mod guard;
pub mod identity;
pub mod membership;
pub mod noise;
mod rate;
pub mod records;
mod timers;
pub mod wire;

#[cfg(test)]
mod harness;
#[cfg(test)]
mod ik_tests;
#[cfg(test)]
mod membership_endpoint_tests;
#[cfg(test)]
mod membership_net_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod records_endpoint_tests;
#[cfg(test)]
mod records_net_tests;
#[cfg(test)]
mod tests;

pub use allow_list::{AllowList, AllowedPeer, Expiry, Rejection};
pub use config::{Config, RateLimit};
pub use connection::{Closed, ConnError, ConnEvent, Connection, Remote};
pub use endpoint::{
    ConnId, Direction, Endpoint, Event, Failure, Output, RequestError, RespondError,
};
pub use identity::{Keypair, PeerId};
pub use wire::{ExchangeId, Message};
