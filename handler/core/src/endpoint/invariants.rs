//! The cross-table invariants, checked by the tests and fuzz targets after every step,
//! and by the simulator's driver (feature `invariants`) in every run.

use super::dialer::OutState;
use super::responder::InState;
use super::{Direction, Endpoint, Timer};

/// Returns the message from the enclosing check when the condition does not hold.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// [`ensure!`] for two values that must be equal; the message shows both.
macro_rules! ensure_eq {
    ($a:expr, $b:expr, $($msg:tt)+) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err(format!("{}: {:?} != {:?}", format!($($msg)+), a, b));
        }
    }};
}

impl Endpoint {
    /// Checks the cross-table invariants, panicking on the first that does not hold.
    /// Called by the tests and the fuzz targets after every step (feature `invariants`
    /// outside this crate's tests); it scans every table, so it is not for production.
    pub fn check_invariants(&self) {
        if let Err(broken) = self.invariants() {
            panic!("invariant broken: {broken}");
        }
    }

    /// The first cross-table invariant that does not hold, described, or `Ok`. Bounds
    /// included: dedupe records within `dedupe_bytes` and `dedupe_per_peer`, cached
    /// replies within `reply_cache_bytes`, queues within `max_queued_per_peer`.
    pub fn invariants(&self) -> Result<(), String> {
        let pending = self
            .inbound
            .values()
            .filter(|r| r.state == InState::AwaitingResponse)
            .count();
        ensure_eq!(pending, self.pending_inbound, "pending count");
        let cached: usize = self
            .inbound
            .values()
            .map(|r| match &r.state {
                InState::AwaitingReplyAck { reply: Some(r) }
                | InState::Unconfirmed { reply: Some(r) } => r.len(),
                _ => 0,
            })
            .sum();
        ensure_eq!(cached, self.cache_bytes, "cache bytes");
        ensure!(
            self.unread_responses.len() <= self.config.max_unread_outcomes,
            "unread responder outcomes within max_unread_outcomes"
        );
        ensure!(
            self.journal.is_some() || self.unread_responses.is_empty(),
            "responder outcomes kept only by a durable node"
        );
        for (id, ex) in &self.outbound {
            let p = &self.peers[&ex.peer];
            let queued = p.queue.contains(id);
            ensure_eq!(
                ex.state == OutState::Queued,
                queued,
                "{id} queued iff in the peer queue"
            );
            ensure!(queued || p.active == Some(*id), "{id} is active or queued");
            ensure!(
                ex.deadline().is_some() || ex.failures < self.config.max_attempts,
                "{id} within attempts"
            );
            if let Some(conn) = ex.state.conn()
                && !matches!(ex.state, OutState::Backoff { .. })
            {
                ensure_eq!(
                    self.conns[&conn].exchange,
                    Some(*id),
                    "{id} bound to {conn}"
                );
            }
        }
        let records = (self.config.dedupe_bytes / super::DEDUPE_RECORD_COST).max(1);
        ensure!(
            self.inbound.len() <= records,
            "dedupe records over dedupe_bytes: {} records > {records}",
            self.inbound.len()
        );
        for key in self.inbound.keys() {
            let seen = self
                .peers
                .get(&key.0)
                .is_some_and(|p| p.seen.contains(&key.1));
            ensure!(seen, "record {key:?} indexed in its peer's dedupe list");
        }
        for (peer, p) in &self.peers {
            if let Some(active) = p.active {
                ensure!(
                    self.outbound.contains_key(&active),
                    "active exchange exists"
                );
            }
            // Over the bound only with live records, restored after the bound was lowered:
            // they still owe their peer an answer, so nothing may evict them.
            ensure!(
                p.seen.len() <= self.config.dedupe_per_peer
                    || p.seen
                        .iter()
                        .all(|id| self.inbound.get(&(*peer, *id)).is_some_and(|r| r.is_live())),
                "dedupe list of {peer:?} over its bound"
            );
            ensure!(
                p.queue.len() <= self.config.max_queued_per_peer,
                "queue of {peer:?} over max_queued_per_peer: {} > {}",
                p.queue.len(),
                self.config.max_queued_per_peer
            );
            let conns = self.conns.values().filter(|c| c.peer == *peer).count();
            ensure_eq!(conns, p.conns, "conn count of {peer:?}");
        }
        ensure!(
            self.cache_bytes <= self.config.reply_cache_bytes,
            "cached replies over reply_cache_bytes: {} > {}",
            self.cache_bytes,
            self.config.reply_cache_bytes
        );
        self.check_connection_bindings()?;
        for ((peer, id), r) in &self.inbound {
            ensure!(
                !r.ack_held || r.state == InState::AwaitingResponse,
                "{id} of {peer:?}: a held Ack only while awaiting the response"
            );
        }
        Ok(())
    }

    /// Every connection is either bound to a live exchange of its own peer, or free with
    /// an idle timer that will close it: nothing keeps a connection open forever.
    fn check_connection_bindings(&self) -> Result<(), String> {
        for (conn, c) in &self.conns {
            match (c.exchange, c.direction) {
                (Some(id), Direction::Outbound) => {
                    let Some(ex) = self.outbound.get(&id) else {
                        return Err(format!("{conn} bound to finished exchange {id}"));
                    };
                    ensure_eq!(ex.peer, c.peer, "{conn} bound to another peer's {id}");
                    ensure!(
                        ex.state.conn() == Some(*conn),
                        "{conn} bound to {id}, which is on {:?}",
                        ex.state
                    );
                }
                (Some(id), Direction::Inbound) => {
                    let Some(r) = self.inbound.get(&(c.peer, id)) else {
                        return Err(format!(
                            "{conn} bound to {id}, which its peer does not have"
                        ));
                    };
                    ensure!(
                        matches!(
                            r.state,
                            InState::AwaitingResponse | InState::AwaitingReplyAck { .. }
                        ),
                        "{conn} bound to {id}, which is over ({:?})",
                        r.state
                    );
                    ensure_eq!(
                        r.conn,
                        *conn,
                        "{conn} bound to {id}, whose latest copy is elsewhere"
                    );
                }
                (None, _) => {
                    ensure!(
                        c.established || c.sync,
                        "{conn}: a dial always has its exchange (or is a membership sync)"
                    );
                    ensure!(
                        self.timers.is_set(Timer::Idle(*conn)),
                        "{conn} is free but has no idle timer: it would stay open forever"
                    );
                }
            }
        }
        Ok(())
    }
}
