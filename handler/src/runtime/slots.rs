//! The table of live connection tasks, shared by the router and the handler task.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::admission::Admission;
use crate::endpoint::ConnId;
use crate::guard::Guard;

use super::conn_task::ConnCommand;

pub(super) struct ConnSlot {
    pub(super) commands: mpsc::Sender<ConnCommand>,
    pub(super) abort: AbortHandle,
    pub(super) addr: SocketAddr,
}

/// The admission table of unauthenticated inbound connections (see
/// [`admission`](crate::admission)), shared by the router, which accepts, parks, starts and
/// evicts, and the connection tasks, which report their handshakes' progress and pay for
/// their Diffie-Hellman work. The table's decisions are atomic under its lock: a task
/// admitted and the router evicting it cannot both win. Beside it, the [`Guard`] that sorts
/// message 1s before any Diffie-Hellman (mac1, cookies, tickets).
pub(super) struct Gate {
    table: std::sync::Mutex<Admission>,
    guard: std::sync::Mutex<Guard>,
    /// Rings when a slot frees (a handshake authenticated): parked streams may start.
    pub(super) wake: tokio::sync::Notify,
}

pub(super) type SharedGate = Arc<Gate>;

impl Gate {
    pub(super) fn new(table: Admission, guard: Guard) -> SharedGate {
        Arc::new(Self {
            table: std::sync::Mutex::new(table),
            guard: std::sync::Mutex::new(guard),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Runs `f` on the table. A poisoned lock (a panic elsewhere) still holds a consistent
    /// table: every method leaves it whole before it could panic.
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut Admission) -> R) -> R {
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut table)
    }

    /// Runs `f` on the guard (consistent after a panic elsewhere, as the table is).
    pub(super) fn guard<R>(&self, f: impl FnOnce(&mut Guard) -> R) -> R {
        let mut guard = self
            .guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }
}

/// The live connection tasks, shared by the router (which adds and removes them) and the
/// handler task (which sends to them directly, saving a task hop per message).
pub(super) type Slots = Arc<std::sync::Mutex<BTreeMap<ConnId, ConnSlot>>>;

pub(super) enum Forwarded {
    Sent,
    /// No such connection task (not registered yet, or gone); the command comes back.
    Unknown(ConnCommand),
    /// The task's queue was full: it was cut, and must be reported lost.
    Slow(SocketAddr),
}

/// Hands a command to a connection task without waiting. A task that cannot keep up is
/// aborted rather than allowed to block every other connection behind it.
pub(super) fn forward(slots: &Slots, conn: ConnId, command: ConnCommand) -> Forwarded {
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
