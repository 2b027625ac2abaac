//! Durable mode: resuming from what a store held when the node stopped.

use std::time::Instant;

use crate::durable::{self, InboundStage, Recovered};
use crate::identity::PeerId;
use crate::wire::{AbortReason, ExchangeId};

use super::dialer::{OutState, Outbound};
use super::events::{Event, Failure, RetryCause};
use super::responder::{InState, Inbound};
use super::{ConnId, Endpoint, Timer};

/// The connection a recovered record names until a resend binds it to a live one: an
/// inbound id no driver ever hands out.
const DETACHED: u64 = (1 << 63) - 1;

impl Endpoint {
    /// Makes the endpoint durable and resumes from `recovered` (empty for a new store).
    /// Call once, right after [`Endpoint::new`], before any other input. From then on every
    /// change that must survive a restart is journaled (see [`Endpoint::poll_journal`]).
    ///
    /// * Our unfinished exchanges resume under their ids, in their order, from their first
    ///   attempt (the responder deduplicates them). One whose peer is no longer allowed
    ///   fails with [`Failure::Revoked`], its payload handed back.
    /// * A peer's request we had acknowledged and not answered is delivered again as
    ///   [`Event::Request`] with `redelivered: true` (cancelled with
    ///   [`Event::ResponseCancelled`] if the peer is no longer allowed); its response timeout
    ///   starts again now.
    /// * A reply not yet acknowledged is cached again and waits for its Ack anew.
    /// * Finished records keep deduplicating resends.
    ///
    /// * An exchange's idempotency key and its deadline come back with it (the deadline
    ///   measured on the wall clock: `unix_ms` is the driver's reading of it now; one that
    ///   passed while the node was down fails at once with `DeadlineExceeded`).
    ///
    /// Returns the outcomes the application had not taken, flagged `redelivered`: the
    /// responder outcomes (`recovered.responses`), then those of our exchanges it had not
    /// settled (`recovered.outcomes`), each oldest first. The driver hands them out. The endpoint keeps those
    /// of keyed exchanges for [`Endpoint::lookup`] until they are settled.
    pub fn restore(&mut self, recovered: Recovered, now: Instant, unix_ms: u64) -> Vec<Event> {
        self.journal = Some(Vec::new());
        self.wall = Some((now, unix_ms));
        self.stored_membership = recovered.membership;
        self.restore_records(recovered.records);
        if let Some(next) = recovered.next_id {
            self.next_exchange = next;
        }
        self.ids_left = 0;
        for (peer, floor, seq) in recovered.settled {
            self.next_seq = self.next_seq.max(seq.saturating_add(1));
            let old = self
                .settled
                .insert(peer, super::responder::Floor { id: floor, seq });
            if let (Some(old), Some(journal)) = (old, &mut self.journal) {
                // Two rows for one peer (the older was never deleted): keep the newer.
                journal.push(durable::delete_settled(old.seq));
            }
        }
        for ((peer, id), record) in recovered.inbound {
            self.next_seq = self.next_seq.max(record.seq.saturating_add(1));
            self.restore_inbound(peer, id, record, now);
        }
        let mut starts: Vec<PeerId> = Vec::new();
        let mut outcomes = Vec::with_capacity(recovered.outcomes.len());
        for (seq, event) in recovered.responses {
            self.next_seq = self.next_seq.max(seq.saturating_add(1));
            if let Some(key) = event.response_of() {
                self.unread_responses.insert(key, seq);
            }
            outcomes.push(event);
        }
        for stored in recovered.outcomes {
            if let (
                Some(key),
                Event::Reply { peer, exchange, .. } | Event::Failed { peer, exchange, .. },
            ) = (stored.key, &stored.event)
            {
                self.keys.insert((*peer, key.clone()), *exchange);
                self.keyed_outcomes
                    .insert(*exchange, (key, stored.event.clone()));
            }
            outcomes.push(stored.event);
        }
        for (id, record) in recovered.outbound {
            self.next_seq = self.next_seq.max(record.seq.saturating_add(1));
            let peer = record.peer;
            // The wall clock says how much of the deadline is left.
            let deadline = record.deadline_ms.map(|ms| super::Deadline {
                at: now + std::time::Duration::from_millis(ms.saturating_sub(unix_ms)),
                unix_ms: Some(ms),
            });
            if let Some(key) = &record.key {
                self.keys.insert((peer, key.clone()), id);
            }
            self.outbound.insert(
                id,
                Outbound {
                    seq: record.seq,
                    peer,
                    addr: record.addr,
                    payload: record.payload,
                    attempt: 0,
                    failures: 0,
                    unreached: 0,
                    started: None,
                    dials: 0,
                    acked: record.acked,
                    extras: super::dialer::Extras::new(record.key, deadline),
                    state: OutState::Queued,
                },
            );
            if !self.allow.contains(&peer) {
                self.finish(id, Err(Failure::Revoked), now);
                continue;
            }
            let Some(state) = self.peer_mut(peer, now) else {
                let failure = Failure::Exhausted {
                    attempts: 0,
                    last: RetryCause::DialFailed("too many peers tracked".into()),
                    request_acked: false,
                };
                self.finish(id, Err(failure), now);
                continue;
            };
            state.queue.push_back(id);
            if !starts.contains(&peer) {
                starts.push(peer);
            }
            if let Some(deadline) = deadline {
                self.timers.set(Timer::Deadline(id), deadline.at);
            }
        }
        for peer in starts {
            if self.peers.get(&peer).is_some_and(|p| p.active.is_none()) {
                self.start_next(peer, now);
            }
        }
        self.trim_reply_cache();
        outcomes
    }

    fn restore_inbound(
        &mut self,
        peer: PeerId,
        id: ExchangeId,
        record: durable::InboundRecord,
        now: Instant,
    ) {
        let key = (peer, id);
        // The bounds may have been lowered since the store was written: the oldest
        // finished records make room, and a finished record with no room is forgotten (as
        // is every record of a peer that cannot be tracked).
        let live = matches!(
            record.stage,
            InboundStage::Pending { .. } | InboundStage::Replied { .. }
        );
        if self.peer_mut(peer, now).is_none() || (!self.make_room(peer) && !live) {
            if let Some(journal) = &mut self.journal {
                journal.push(durable::delete_inbound(record.seq));
            }
            // Forgotten like any evicted record: a late copy of it is still refused.
            self.raise_floor(peer, id);
            return;
        }
        let allowed = self.allow.contains(&peer);
        let was_aborted = matches!(record.stage, InboundStage::Aborted(_));
        let mut pending = None;
        let mut confirmed = false;
        let state = match record.stage {
            InboundStage::Pending { payload } if allowed => {
                confirmed = payload.is_none();
                pending = Some(payload);
                InState::AwaitingResponse
            }
            InboundStage::Pending { .. } => {
                self.response_outcome(Event::ResponseCancelled {
                    peer,
                    exchange: id,
                    redelivered: false,
                });
                InState::Aborted(AbortReason::NoResponse)
            }
            InboundStage::Replied { reply } => {
                if let Some(reply) = &reply {
                    self.cache_bytes += reply.len();
                    self.cache_order.push_back(key);
                }
                // Its Ack is awaited anew; if it does not come, the application hears of it
                // once (the stage then says so).
                self.timers.set(
                    Timer::Inbound(peer, id),
                    now + self.config.reply_ack_timeout,
                );
                InState::AwaitingReplyAck { reply }
            }
            InboundStage::Unconfirmed { reply } => {
                if let Some(reply) = &reply {
                    self.cache_bytes += reply.len();
                    self.cache_order.push_back(key);
                }
                InState::Unconfirmed { reply }
            }
            InboundStage::Done => InState::Done,
            InboundStage::Aborted(reason) => InState::Aborted(reason),
        };
        let cancelled = matches!(state, InState::Aborted(_)) && !was_aborted;
        self.inbound.insert(
            key,
            Inbound {
                conn: ConnId::inbound(DETACHED),
                attempt: 0,
                state,
                ack_held: false,
                remote_max: usize::try_from(record.remote_max).unwrap_or(usize::MAX),
                digest: record.digest,
                seq: record.seq,
                addr: record.addr,
                confirmed,
            },
        );
        self.remember(key);
        if cancelled {
            self.persist_inbound(key, None);
        }
        if let Some(payload) = pending {
            self.pending_inbound += 1;
            self.timers
                .set(Timer::Inbound(peer, id), now + self.config.response_timeout);
            // A request the application confirmed it stored is answerable, not delivered
            // again.
            if let Some(payload) = payload {
                self.stats.requests_delivered += 1;
                self.events.push_back(Event::Request {
                    peer,
                    addr: record.addr,
                    exchange: id,
                    payload,
                    redelivered: true,
                });
            }
        }
    }
}
