//! The table of live connection tasks, shared by the router and the handler task.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::endpoint::ConnId;

use super::conn_task::ConnCommand;

pub(super) struct ConnSlot {
    pub(super) commands: mpsc::Sender<ConnCommand>,
    pub(super) abort: AbortHandle,
    pub(super) addr: SocketAddr,
    /// Whether an accepted stream has authenticated yet (dials are admitted from the start).
    pub(super) admission: Arc<Admission>,
}

/// Where an accepted connection stands in admission, shared by its task and the router.
///
/// An unauthenticated connection may be evicted by the router to make room for a newer one;
/// an authenticated one never is. The two can race (the task finishes its handshake while
/// the router picks it for eviction), so the transition is one compare-and-swap out of
/// `PENDING`: whichever side wins decides, and the loser backs off. The task announces the
/// connection to the endpoint only after winning, so the endpoint never learns of a
/// connection the router has cut.
#[derive(Debug)]
pub(super) struct Admission(AtomicU8);

const PENDING: u8 = 0;
const ADMITTED: u8 = 1;
const EVICTED: u8 = 2;

impl Admission {
    /// An accepted stream, not authenticated yet.
    pub(super) fn pending() -> Arc<Self> {
        Arc::new(Self(AtomicU8::new(PENDING)))
    }

    /// A connection we dialed: never subject to eviction.
    pub(super) fn admitted() -> Arc<Self> {
        Arc::new(Self(AtomicU8::new(ADMITTED)))
    }

    /// The task: the handshake finished. False if the router evicted it first.
    pub(super) fn admit(&self) -> bool {
        self.transition(ADMITTED)
    }

    /// The router: claims a pending connection for eviction. False if it authenticated
    /// first (or was already evicted).
    pub(super) fn evict(&self) -> bool {
        self.transition(EVICTED)
    }

    pub(super) fn is_pending(&self) -> bool {
        self.0.load(Ordering::Acquire) == PENDING
    }

    fn transition(&self, to: u8) -> bool {
        self.0
            .compare_exchange(PENDING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
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
