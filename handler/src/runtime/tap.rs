//! The [`Tap`]: a hook the simulator uses to observe traffic and inject message-level faults.

use std::net::SocketAddr;
use std::time::Duration;

use crate::connection::{ConnError, ConnEvent};
use crate::endpoint::{ConnId, Direction};
use crate::identity::PeerId;
use crate::wire::{ExchangeId, Message};

/// What a [`Tap`] decides for an outgoing message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Pass,
    /// Do not send it (as if lost).
    Drop,
    /// Send it after this long; later messages may overtake it.
    Delay(Duration),
    /// Send it now, and a copy again after this long on the same connection if it is still
    /// open: a stale duplicate, as a resend that lingered in the network would arrive.
    Duplicate(Duration),
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
    /// A Request arrived in IK message 1 on `conn` (before the session): by default, as
    /// any arrival.
    fn early(&self, conn: ConnId, peer: PeerId, message: &Message) -> Arrival {
        self.incoming(conn, peer, message)
    }
    /// The endpoint asked for a dial.
    fn dial(&self, _conn: ConnId, _peer: PeerId, _addr: SocketAddr) {}
    /// A connection was established, closed or failed (`peer` once known).
    fn connection(&self, _conn: ConnId, _peer: Option<PeerId>, _event: &ConnEvent) {}
    /// An inbound connection failed before it was established.
    fn rejected(&self, _error: &ConnError) {}
    /// With the `invariants` feature: one of the core's cross-table invariants (a bound,
    /// a count, a binding) was found broken after a step. Reported once per handler.
    fn broken_invariant(&self, _what: &str) {}
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
