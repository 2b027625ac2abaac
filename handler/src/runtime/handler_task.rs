//! The handler task: owns the [`Endpoint`], feeds it commands and network events, performs
//! its outputs, and keeps the application's backlogs.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::connection::{Closed, ConnEvent};
use crate::durable::KvOp;
use crate::endpoint::{
    ConnId, Deadline, Direction, Endpoint, Event, Failure, Output, Receipt, RequestError,
    RespondError,
};
use crate::identity::PeerId;
use crate::store::{Commit, Store, StoreError};
use crate::wire::{CloseReason, ExchangeId, Message};

use super::conn_task::ConnCommand;
use super::handle::{
    Command, HandlerError, Inbox, MembershipStatus, Notice, ShutdownReport, Status,
};
use super::observe::{self, Gauges, Observer};
use super::router::{DialCommand, NetCommand, NetEvent, NetNotice};
use super::slots::{Forwarded, Slots, forward};
use super::tap::{Arrival, Tap, Verdict};
use super::{SharedAllow, Timer, now};
use crate::membership::Signed;
use tokio::sync::oneshot;

pub(super) struct HandlerTask {
    /// Connection tasks, for sending to them directly.
    pub(super) slots: Slots,
    /// Fault point: the next input is taken late (see `buggify`).
    pub(super) buggify: super::buggify::Points,
    pub(super) tap: Arc<dyn Tap>,
    pub(super) endpoint: Endpoint,
    pub(super) allow: SharedAllow,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) received: mpsc::Sender<Event>,
    pub(super) priority: mpsc::Sender<Notice>,
    pub(super) network: mpsc::Sender<NetCommand>,
    pub(super) net_events: mpsc::Receiver<NetEvent>,
    pub(super) net_notices: mpsc::Receiver<NetNotice>,
    /// Events the application's channels had no room for, oldest first.
    pub(super) recv_backlog: VecDeque<Event>,
    /// Notices waiting for the priority channel, at most `channel_capacity` of them: they
    /// are informational, so past that they are dropped (and counted) rather than allowed
    /// to stop the node for an application that does not read them.
    pub(super) prio_backlog: VecDeque<Notice>,
    pub(super) notices_dropped: u64,
    /// One of the core's invariants was found broken and reported (feature `invariants`):
    /// reported once, and not checked again.
    #[cfg_attr(not(feature = "invariants"), allow(dead_code))]
    pub(super) invariant_broken: bool,
    pub(super) connection_tasks: usize,
    pub(super) evicted_unauthenticated: u64,
    /// Accepted streams waiting for a handshake slot (the router's count).
    pub(super) parked_connections: usize,
    /// The guard's counters, as of the router's last notice.
    pub(super) first_messages: crate::guard::GuardStats,
    /// The admission table and guard the network side shares, read for `Status`.
    pub(super) gate: super::slots::SharedGate,
    /// Commands a tap produced (forged Nacks), sent before the endpoint's outputs.
    pub(super) pending_net: VecDeque<(ConnId, ConnCommand)>,
    /// Exchange states last reported to a tap that wants transitions.
    pub(super) states: BTreeMap<(Direction, PeerId, ExchangeId), &'static str>,
    /// Outcomes of ours handed towards the application and not settled yet: not taken, or
    /// in confirm mode not confirmed (`max_unread_outcomes` bounds them).
    pub(super) unsettled: std::collections::BTreeSet<ExchangeId>,
    /// `Options::confirm_outcomes`.
    pub(super) confirm_outcomes: bool,
    /// `Options::wall_clock`: where stored deadlines are measured.
    pub(super) wall_clock: super::WallClock,
    /// Durable mode: where the journal goes.
    pub(super) store: Option<Box<dyn Store>>,
    /// Writes of the driver's own for the next commit (the store header, taken outcomes).
    pub(super) pending_ops: Vec<KvOp>,
    /// Since when writes that only forget taken outcomes wait for a commit (see
    /// `settle`), and whether they waited long enough to make one of their own.
    pub(super) forgets_since: Option<std::time::Instant>,
    pub(super) commit_forgets: bool,
    /// Outcomes the application took (reported by its `Received`).
    pub(super) taken: mpsc::UnboundedReceiver<super::handle::Taken>,
    /// Answers to commands, held until what they confirm is committed.
    pub(super) deferred: Vec<Box<dyn FnOnce() + Send>>,
    /// A shutdown command met while gathering a batch.
    pub(super) stop: Option<(Option<Inbox>, oneshot::Sender<ShutdownReport>)>,
    /// A drain began: the router must close the listener (sent from the async loop).
    pub(super) stop_accepting: bool,
    /// Log lines and metrics.
    pub(super) observer: Observer,
    /// Durable mode: the commit running, and what waits for it.
    pub(super) in_flight: Option<(Commit, Effects)>,
    /// Where our newly published address records go (the records backend's task).
    pub(super) published: Option<mpsc::UnboundedSender<bytes::Bytes>>,
    /// `request_to` calls waiting for their peer's address record, oldest first.
    pub(super) awaiting_address: Vec<AwaitingAddress>,
}

/// A `request_to` waiting for its peer's address (`RequestOptions::wait_for_address`).
pub(super) struct AwaitingAddress {
    peer: PeerId,
    payload: bytes::Bytes,
    options: super::RequestOptions,
    reply: oneshot::Sender<Result<ExchangeId, RequestError>>,
    until: std::time::Instant,
}

/// What one step (or batch of steps) makes visible outside the handler task: answers to
/// commands, messages and closes, events. In durable mode they wait for the commit of the
/// step's journal; in memory they are released at once.
#[derive(Default)]
pub(super) struct Effects {
    answers: Vec<Box<dyn FnOnce() + Send>>,
    /// Commands a tap produced (forged Nacks), sent before the endpoint's outputs.
    forged: VecDeque<(ConnId, ConnCommand)>,
    outputs: Vec<Output>,
    events: Vec<Event>,
}

impl Effects {
    fn is_empty(&self) -> bool {
        self.answers.is_empty()
            && self.forged.is_empty()
            && self.outputs.is_empty()
            && self.events.is_empty()
    }
}

/// Inputs taken into one commit at most, beyond the one that woke the handler task.
const BATCH: usize = 256;

/// Writes that only forget an outcome the application took wait for the next commit
/// (see `settle`), unless this many have gathered or they waited `LAZY_WAIT`.
const LAZY_FORGETS: usize = 256;
const LAZY_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Whether `op` only forgets an outcome the application took (ours or a peer's).
fn forgets_outcome(op: &KvOp) -> bool {
    use crate::durable::Table;
    matches!(
        op,
        KvOp::Delete {
            table: Table::Outcomes | Table::Responses,
            ..
        }
    )
}

/// What stopped the main loop.
enum Stop {
    /// Every handle dropped, or a shutdown command (with the inbox it handed back, and
    /// where to send the report).
    Shutdown(Option<Inbox>, Option<oneshot::Sender<ShutdownReport>>),
    /// The store failed; stop as a crash would.
    StoreFailed,
}

impl HandlerTask {
    pub(super) async fn run(mut self, network: tokio::task::JoinHandle<()>) {
        let limit = self.received.max_capacity();
        // Clones, so the futures below do not hold `self` borrowed while arms use it.
        let (received, priority) = (self.received.clone(), self.priority.clone());
        // Two timers kept for the task's life and moved when their deadline does: a timer
        // made afresh each turn would be entered into the runtime's wheel and taken out
        // again for every input (several per exchange).
        let mut endpoint_timer = Timer::new();
        let mut summary_timer = Timer::new();
        let mut address_timer = Timer::new();
        let mut forget_timer = Timer::new();
        let stop = loop {
            // Durable mode: nothing leaves (answer, message, event) before the state that
            // explains it is committed. In memory, everything leaves at once.
            self.settle().await;
            #[cfg(feature = "invariants")]
            if !self.invariant_broken
                && let Err(broken) = self.endpoint.invariants()
            {
                tracing::error!(%broken, "invariant broken");
                self.tap.broken_invariant(&broken);
                self.invariant_broken = true;
            }
            if std::mem::take(&mut self.stop_accepting) {
                let _ = self.network.send(NetCommand::StopAccepting).await;
            }
            self.observer.tick(self.endpoint.stats(), &self.gauges());
            let summary_due = self.observer.deadline();
            if let Some((inbox, reply)) = self.stop.take() {
                break Stop::Shutdown(inbox, Some(reply));
            }
            let deadline = endpoint_timer.arm(self.endpoint.poll_timeout());
            let summary_due = summary_timer.arm(summary_due.map(tokio::time::Instant::into_std));
            let address_due =
                address_timer.arm(self.awaiting_address.iter().map(|a| a.until).min());
            let forget_due = forget_timer.arm(self.forgets_since.map(|at| at + LAZY_WAIT));
            // Only what must not be lost holds the network back.
            let backlog = self.recv_backlog.len();
            self.buggify.delay().await;
            tokio::select! {
                biased;
                // The commit finished: what waited for it may leave. Inputs taken while it
                // ran are in the next one (pipelined group commit).
                result = committed(&mut self.in_flight) => {
                    let effects = self.in_flight.take().map(|(_, e)| e).unwrap_or_default();
                    match result {
                        Ok(()) => self.release(effects).await,
                        Err(e) => {
                            self.store_failed(&e);
                            break Stop::StoreFailed;
                        }
                    }
                    continue;
                }
                // The application made room: hand over what waited.
                Ok(permit) = received.reserve(), if !self.recv_backlog.is_empty() => {
                    if let Some(event) = self.recv_backlog.pop_front() {
                        permit.send(event);
                    }
                }
                Ok(permit) = priority.reserve(), if !self.prio_backlog.is_empty() => {
                    if let Some(notice) = self.prio_backlog.pop_front() {
                        permit.send(notice);
                    }
                }
                // Timers first among inputs, so a busy network cannot starve them.
                () = endpoint_timer.wait(), if deadline => {
                    endpoint_timer.fired();
                    self.endpoint.handle_timeout(now());
                }
                Some(id) = self.taken.recv() => self.on_taken(id),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { inbox, reply }) => {
                        break Stop::Shutdown(inbox, Some(reply));
                    }
                    Some(command) => self.command(command),
                    // Every handle dropped: nobody can use this node any more.
                    None => break Stop::Shutdown(None, None),
                },
                Some(notice) = self.net_notices.recv() => self.net_notice(notice),
                // Stop reading the network while the application is behind.
                Some(event) = self.net_events.recv(), if backlog < limit => self.net_event(event),
                // A throttled log line's summary is due (the tick above writes it).
                () = summary_timer.wait(), if summary_due => summary_timer.fired(),
                () = address_timer.wait(), if address_due => {
                    address_timer.fired();
                    self.retry_awaiting(None);
                }
                // Forgets waited long enough for a commit to carry them: an idle node
                // makes one of its own, so that a crash later repeats nothing taken.
                () = forget_timer.wait(), if forget_due => {
                    forget_timer.fired();
                    self.commit_forgets = true;
                }
            }
            if self.store.is_some() {
                if self.in_flight.is_none() {
                    self.gather(limit);
                } else {
                    // The simulator's trace shows every state an input leads to.
                    self.report_transitions();
                }
            }
        };
        match stop {
            Stop::Shutdown(inbox, reply) => {
                let report = self.shutdown(network, inbox).await;
                if let Some(reply) = reply {
                    let _ = reply.send(report);
                }
            }
            Stop::StoreFailed => {
                // Like a crash: no output of the failed step is performed, every connection
                // is cut. Handles see `Stopped`; the store keeps what was committed.
                network.abort();
            }
        }
    }

    /// Lets out what may leave. In memory: everything the endpoint produced. Durable, with
    /// no commit running: starts one for the journal written so far, and holds what the
    /// steps behind it produced until it finishes; with nothing to commit, lets the effects
    /// out at once (their state was committed before). Performing outputs can feed the
    /// endpoint (a connection found too slow), hence the loop.
    async fn settle(&mut self) {
        while self.in_flight.is_none() {
            if let Some(store) = &mut self.store {
                self.pending_ops.extend(self.endpoint.poll_journal());
                // Forgetting an outcome the application took explains nothing that leaves,
                // so it waits for the next commit that happens anyway (a crash before then
                // hands the outcome out again, flagged `redelivered`, as documented): a
                // busy node pays no sync of its own for it.
                let forced = std::mem::take(&mut self.commit_forgets);
                if !self.pending_ops.is_empty() {
                    let due = forced
                        || self.pending_ops.len() >= LAZY_FORGETS
                        || self.pending_ops.iter().any(|op| !forgets_outcome(op));
                    if due {
                        self.forgets_since = None;
                        let commit = store.commit(std::mem::take(&mut self.pending_ops));
                        let effects = self.take_effects();
                        self.in_flight = Some((commit, effects));
                        return;
                    }
                    self.forgets_since.get_or_insert_with(now);
                }
            }
            let effects = self.take_effects();
            if effects.is_empty() {
                self.report_transitions();
                self.drain_backlogs();
                return;
            }
            self.release(effects).await;
        }
    }

    /// Everything produced since the last call, in order.
    fn take_effects(&mut self) -> Effects {
        Effects {
            answers: std::mem::take(&mut self.deferred),
            forged: std::mem::take(&mut self.pending_net),
            outputs: std::iter::from_fn(|| self.endpoint.poll_output()).collect(),
            events: std::iter::from_fn(|| self.endpoint.poll_event()).collect(),
        }
    }

    /// Performs effects whose state is committed (or in memory).
    async fn release(&mut self, effects: Effects) {
        for answer in effects.answers {
            answer();
        }
        self.report_transitions();
        self.perform_outputs(effects.forged, effects.outputs).await;
        self.flush_events(effects.events);
    }

    /// Group commit: takes the inputs already waiting into the same transaction as the one
    /// just handled, so a busy durable node syncs once per batch rather than per input.
    fn gather(&mut self, limit: usize) {
        for _ in 0..BATCH {
            // The simulator's trace shows every state an input leads to, batch or not.
            self.report_transitions();
            if let Ok(id) = self.taken.try_recv() {
                self.on_taken(id);
                continue;
            }
            match self.commands.try_recv() {
                Ok(Command::Shutdown { inbox, reply }) => {
                    self.stop = Some((inbox, reply));
                    return;
                }
                Ok(command) => {
                    self.command(command);
                    continue;
                }
                Err(_) => {}
            }
            if self.recv_backlog.len() < limit
                && let Ok(event) = self.net_events.try_recv()
            {
                self.net_event(event);
                continue;
            }
            return;
        }
    }

    /// Reports a failed commit; the node must stop.
    fn store_failed(&mut self, e: &StoreError) {
        tracing::error!(error = %e, "store commit failed: stopping the node");
        let _ = self.priority.try_send(Notice::StoreFailed(e.to_string()));
    }

    /// The application took an outcome. One of ours is settled by it unless it must be
    /// confirmed; a peer's (the fate of our reply) always is. A durable node forgets it.
    fn on_taken(&mut self, taken: super::handle::Taken) {
        use super::handle::Taken;
        match taken {
            Taken::Outcome(id) => {
                if !self.confirm_outcomes {
                    self.settle_outcome(id);
                }
            }
            Taken::Response(peer, exchange) => {
                self.endpoint.response_outcome_taken(peer, exchange);
            }
        }
    }

    /// The outcome of `id` is settled (taken, or confirmed in confirm mode).
    fn settle_outcome(&mut self, id: ExchangeId) -> bool {
        let known = self.unsettled.remove(&id);
        if known {
            self.endpoint.outcome_settled(id);
        }
        known
    }

    /// Answers a command once the step that produced the answer is committed.
    fn answer<T: Send + 'static>(&mut self, reply: oneshot::Sender<T>, value: T) {
        if self.store.is_some() {
            self.deferred.push(Box::new(move || {
                let _ = reply.send(value);
            }));
        } else {
            let _ = reply.send(value);
        }
    }

    fn report_transitions(&mut self) {
        if !self.tap.wants_transitions() {
            return;
        }
        let now: BTreeMap<_, _> = self
            .endpoint
            .exchange_states()
            .into_iter()
            .map(|(d, p, x, s)| ((d, p, x), s))
            .collect();
        for (key, state) in &now {
            let before = self.states.get(key).copied();
            if before != Some(*state) {
                self.tap
                    .transition(key.0, key.1, key.2, before, Some(state));
            }
        }
        for (key, state) in &self.states {
            if !now.contains_key(key) {
                self.tap.transition(key.0, key.1, key.2, Some(state), None);
            }
        }
        self.states = now;
    }

    async fn perform_outputs(
        &mut self,
        forged: VecDeque<(ConnId, ConnCommand)>,
        outputs: Vec<Output>,
    ) {
        for (conn, command) in forged {
            self.send_direct(conn, command).await;
        }
        // Sends and closes go straight to the connection task; dials go through the router.
        for output in outputs {
            match output {
                Output::Dial {
                    conn,
                    peer,
                    addr,
                    key,
                    early,
                    ticket,
                } => {
                    self.tap.dial(conn, peer, addr);
                    observe::dial(conn, peer, addr);
                    // A Request in message 1 is seen, and may be lost or corrupted (then
                    // message 1 is), as any sent; a duplicate of it lingers and arrives
                    // later on the session; a delay of it passes.
                    let mut corrupt_first = false;
                    let early = early.and_then(|(stamp, message)| {
                        observe::message(true, conn, Some(peer), &message);
                        match self.tap.outgoing(conn, peer, &message) {
                            Verdict::Drop => None,
                            Verdict::Corrupt => {
                                corrupt_first = true;
                                Some((stamp, message))
                            }
                            Verdict::Duplicate(delay) => {
                                self.send_later(conn, delay, message.clone());
                                Some((stamp, message))
                            }
                            Verdict::Pass | Verdict::Delay(_) => Some((stamp, message)),
                        }
                    });
                    // The router never waits on us, so this wait is short.
                    let dial = NetCommand::Dial(DialCommand {
                        conn,
                        peer,
                        addr,
                        key,
                        early,
                        ticket,
                        corrupt_first,
                    });
                    if self.network.send(dial).await.is_err() {
                        return;
                    }
                }
                Output::Send {
                    conn,
                    peer,
                    message,
                } => {
                    observe::message(true, conn, Some(peer), &message);
                    let verdict = self.tap.outgoing(conn, peer, &message);
                    let command = match verdict {
                        Verdict::Pass => ConnCommand::Send(message),
                        Verdict::Corrupt => ConnCommand::SendCorrupted(message),
                        Verdict::Drop => continue,
                        Verdict::Delay(delay) => {
                            self.send_later(conn, delay, message);
                            continue;
                        }
                        Verdict::Duplicate(delay) => {
                            self.send_later(conn, delay, message.clone());
                            ConnCommand::Send(message)
                        }
                    };
                    self.send_direct(conn, command).await;
                }
                Output::AllowList(list) => {
                    if let Ok(mut allow) = self.allow.write() {
                        *allow = list;
                    }
                }
                Output::Close { conn, peer, reason } => {
                    // The endpoint refuses with this reason at `max_connections`, and also
                    // when it cannot track one more peer: only the first is this notice.
                    let at_limit =
                        self.endpoint.open_connections() >= self.endpoint.config().max_connections;
                    if reason == CloseReason::TooManyConnections
                        && at_limit
                        && let Some(addr) = self.slot_addr(conn)
                    {
                        self.notice(Notice::ConnectionLimit {
                            addr,
                            direction: Direction::Inbound,
                        });
                    }
                    // On an established connection the Close message passes the tap like
                    // any other: it may be lost (the stream still ends). Only Pass and Drop
                    // apply to it.
                    let close = Message::Close { reason };
                    observe::message(true, conn, peer, &close);
                    let command = match peer.map(|peer| self.tap.outgoing(conn, peer, &close)) {
                        Some(Verdict::Drop) => ConnCommand::CloseQuietly(reason),
                        _ => ConnCommand::Close(reason),
                    };
                    self.send_direct(conn, command).await;
                }
            }
        }
    }

    /// The remote address of a live connection task.
    fn slot_addr(&self, conn: ConnId) -> Option<std::net::SocketAddr> {
        self.slots.lock().ok()?.get(&conn).map(|slot| slot.addr)
    }

    async fn send_direct(&mut self, conn: ConnId, command: ConnCommand) {
        match forward(&self.slots, conn, command) {
            Forwarded::Sent => {}
            Forwarded::Unknown(ConnCommand::Close(reason) | ConnCommand::CloseQuietly(reason)) => {
                let _ = self.network.send(NetCommand::Close { conn, reason }).await;
            }
            // The connection is gone; the endpoint hears of it through its Closed event.
            Forwarded::Unknown(_) => {}
            Forwarded::Slow(addr) => {
                let why = format!("connection to {addr} too slow: outgoing queue full");
                self.endpoint
                    .handle_conn_event(conn, ConnEvent::Closed(Closed::Io(why)), now());
                self.notice(Notice::SlowConnection { addr });
            }
        }
    }

    fn flush_events(&mut self, events: Vec<Event>) {
        if events.iter().any(|e| matches!(e, Event::Record(_))) {
            // Records change rarely: the list is worked out on their events only.
            let inactive = self.endpoint.inactive_members(now());
            observe::inactive_members(&inactive);
            let arrived: Vec<PeerId> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Record(crate::endpoint::RecordEvent::Accepted { peer, .. }) => {
                        Some(*peer)
                    }
                    _ => None,
                })
                .collect();
            for peer in arrived {
                if self.awaiting_address.iter().any(|w| w.peer == peer) {
                    self.retry_awaiting(Some(peer));
                }
            }
        }
        for event in events {
            self.observer.event(&event);
            if let Event::Record(crate::endpoint::RecordEvent::Published { sealed, .. }) = &event
                && let Some(published) = &self.published
            {
                let _ = published.send(sealed.clone());
            }
            if event.is_priority() {
                self.notice(Notice::Event(event));
            } else {
                if let Event::Reply { exchange, .. } | Event::Failed { exchange, .. } = &event {
                    self.unsettled.insert(*exchange);
                }
                self.recv_backlog.push_back(event);
            }
        }
        self.drain_backlogs();
    }

    /// What the gauges show.
    fn gauges(&self) -> Gauges {
        Gauges {
            established: self.endpoint.open_connections(),
            tasks: self.connection_tasks,
            outbound_in_flight: self.endpoint.outbound_in_flight(),
            pending_responses: self.endpoint.pending_responses(),
            receive_backlog: self.recv_backlog.len(),
            unread: self.unsettled.len(),
            first_messages: self.first_messages,
        }
    }

    /// Hands the application what its channels have room for.
    fn drain_backlogs(&mut self) {
        drain_into(&mut self.recv_backlog, &self.received);
        drain_into(&mut self.prio_backlog, &self.priority);
    }

    /// Queues a notice for the priority channel, or counts it dropped when the application
    /// has left `channel_capacity` of them unread.
    fn notice(&mut self, notice: Notice) {
        self.observer.notice(&notice);
        if self.prio_backlog.len() < self.priority.max_capacity() {
            self.prio_backlog.push_back(notice);
        } else {
            self.notices_dropped += 1;
            tracing::debug!(?notice, "priority channel full: notice dropped");
        }
    }

    fn command(&mut self, command: Command) {
        let now = now();
        match command {
            Command::Request {
                peer,
                addr,
                payload,
                options,
                reply,
            } => {
                let limit = self.endpoint.config().max_unread_outcomes;
                let result = if self.unsettled.len() >= limit {
                    Err(RequestError::Unread { limit })
                } else {
                    let deadline = self.deadline_of(&options, now);
                    self.endpoint
                        .request_with(peer, addr, payload, options.key, deadline, now)
                };
                if let Ok(exchange) = &result {
                    self.observer.request_started(peer, *exchange);
                }
                self.answer(reply, result);
            }
            Command::Lookup { peer, key, reply } => {
                let _ = reply.send(self.endpoint.lookup(peer, &key));
            }
            Command::Confirm { receipt, reply } => {
                let confirmed = match receipt {
                    Receipt::Outcome(id) => self.settle_outcome(id),
                    Receipt::Request { peer, exchange } => {
                        self.endpoint.confirm_request(peer, exchange)
                    }
                };
                self.answer(reply, confirmed);
            }
            Command::Progress { exchange, reply } => {
                let _ = reply.send(self.endpoint.progress(exchange));
            }
            Command::Cancel { exchange, reply } => {
                let cancelled = self.endpoint.cancel(exchange, now);
                self.answer(reply, cancelled);
            }
            Command::Reject {
                peer,
                exchange,
                reply,
            } => {
                let result = self.endpoint.reject(peer, exchange, now);
                self.answer(reply, result);
            }
            Command::Respond {
                peer,
                exchange,
                payload,
                reply,
            } => {
                let result = match exchange.or_else(|| self.endpoint.pending_request_from(&peer)) {
                    Some(exchange) => self
                        .endpoint
                        .respond(peer, exchange, payload, now)
                        .map(|()| exchange),
                    None => Err(RespondError::NoPendingRequest { peer }),
                };
                self.answer(reply, result);
            }
            Command::Allow { peer, entry, reply } => {
                if self.endpoint.membership_managed() {
                    return self.answer(reply, Err(HandlerError::MembershipManaged));
                }
                if let Ok(mut allow) = self.allow.write() {
                    allow.insert(peer, entry.clone());
                }
                self.endpoint.allow(peer, entry);
                self.answer(reply, Ok(()));
            }
            Command::Revoke { peer, reply } => {
                if self.endpoint.membership_managed() {
                    return self.answer(reply, Err(HandlerError::MembershipManaged));
                }
                if let Ok(mut allow) = self.allow.write() {
                    allow.remove(&peer);
                }
                let revoked = self.endpoint.revoke(&peer, now);
                self.answer(reply, Ok(revoked));
            }
            Command::SetAllowList { list, reply } => {
                if self.endpoint.membership_managed() {
                    return self.answer(reply, Err(HandlerError::MembershipManaged));
                }
                if let Ok(mut allow) = self.allow.write() {
                    *allow = list.clone();
                }
                let removed = self.endpoint.set_allow_list(list, now);
                self.answer(reply, Ok(removed));
            }
            Command::OfferMembership { document, reply } => {
                let result = if self.endpoint.membership_managed() {
                    self.endpoint
                        .offer_membership(*document, now)
                        .map(|applied| applied.iter().map(Signed::epoch).collect())
                        .map_err(HandlerError::MembershipRefused)
                } else {
                    Err(HandlerError::NoMembership)
                };
                self.answer(reply, result);
            }
            Command::RequestTo {
                peer,
                payload,
                options,
                reply,
            } => {
                let result = self.request_to(peer, payload.clone(), &options);
                match (result, options.wait_for_address) {
                    (Err(RequestError::NoAddress(_) | RequestError::Inactive(_)), Some(bound)) => {
                        self.awaiting_address.push(AwaitingAddress {
                            peer,
                            payload,
                            options,
                            reply,
                            until: now + bound,
                        });
                    }
                    (result, _) => self.answer(reply, result),
                }
            }
            Command::OfferRecords { records, reply } => {
                let taken = self.endpoint.offer_records(records, now);
                if let Some(reply) = reply {
                    self.answer(reply, taken);
                }
            }
            Command::SetRecordAddresses { addresses, reply } => {
                let result = self
                    .endpoint
                    .set_record_addresses(addresses, now)
                    .map_err(HandlerError::Records);
                self.answer(reply, result);
            }
            Command::Membership { reply } => {
                let status = self.membership_status();
                let _ = reply.send(status);
            }
            Command::Drain { reply } => {
                self.endpoint.drain();
                self.stop_accepting = true;
                self.answer(reply, ());
            }
            Command::Status { reply } => {
                // Fresh counts: notices already waiting are taken first. (Commands come
                // before notices in the task's loop, so a caller polling the status in a
                // loop could otherwise keep reading counts its own polling holds back.)
                while let Ok(notice) = self.net_notices.try_recv() {
                    self.net_notice(notice);
                }
                let _ = reply.send(Status {
                    open_connections: self.endpoint.open_connections(),
                    connection_tasks: self.connection_tasks,
                    evicted_unauthenticated: self.evicted_unauthenticated,
                    parked_connections: self.parked_connections,
                    first_messages: self.gate.guard(|guard| guard.stats()),
                    notices_dropped: self.notices_dropped,
                    outbound_in_flight: self.endpoint.outbound_in_flight(),
                    pending_responses: self.endpoint.pending_responses(),
                    draining: self.endpoint.is_draining(),
                    drained: self.endpoint.is_drained(),
                    settling: self.in_flight.is_some() || self.endpoint.has_pending_effects(),
                    stats: self.endpoint.stats().clone(),
                    inactive_members: self.endpoint.inactive_members(now),
                    records_held: self.endpoint.records_held(),
                    membership_syncs: self.endpoint.membership_syncs(),
                    peers: self.endpoint.peer_summaries(),
                });
            }
            Command::Shutdown { .. } => {}
        }
    }

    fn request_to(
        &mut self,
        peer: PeerId,
        payload: bytes::Bytes,
        options: &super::RequestOptions,
    ) -> Result<ExchangeId, RequestError> {
        let now = now();
        let limit = self.endpoint.config().max_unread_outcomes;
        if self.unsettled.len() >= limit {
            return Err(RequestError::Unread { limit });
        }
        let deadline = self.deadline_of(options, now);
        let result =
            self.endpoint
                .request_to_with(peer, payload, options.key.clone(), deadline, now);
        if let Ok(exchange) = &result {
            self.observer.request_started(peer, *exchange);
        }
        result
    }

    /// A request's deadline, at `now` and on the wall clock (a durable node stores it so).
    fn deadline_of(
        &self,
        options: &super::RequestOptions,
        now: std::time::Instant,
    ) -> Option<Deadline> {
        let wall = super::unix_ms(&*self.wall_clock);
        options.deadline.map(|d| Deadline {
            at: now + d,
            unix_ms: Some(wall.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
        })
    }

    /// Tries the `request_to` calls waiting for an address again: those for `peer` (whose
    /// record just came), or with `None` those whose wait is over (they get the error).
    fn retry_awaiting(&mut self, peer: Option<PeerId>) {
        let now = now();
        let waiting = std::mem::take(&mut self.awaiting_address);
        for w in waiting {
            let due = w.until <= now;
            if peer.is_some_and(|p| p != w.peer) && !due {
                self.awaiting_address.push(w);
                continue;
            }
            match self.request_to(w.peer, w.payload.clone(), &w.options) {
                Err(RequestError::NoAddress(_) | RequestError::Inactive(_)) if !due => {
                    self.awaiting_address.push(w);
                }
                result => self.answer(w.reply, result),
            }
        }
    }

    fn membership_status(&self) -> Option<MembershipStatus> {
        let ledger = self.endpoint.membership()?;
        let document = ledger.current().document();
        Some(MembershipStatus {
            network: document.network.clone(),
            epoch: ledger.epoch(),
            digest: ledger.digest(),
            members: document.members.len(),
            allowed: self.endpoint.allow_list().peers().count(),
            threshold: document.threshold,
            committee: document.committee.len(),
            expires: document.expires,
            history: ledger.history().count(),
            forks: ledger.forks().count(),
        })
    }

    fn net_event(&mut self, event: NetEvent) {
        let now = now();
        match event {
            NetEvent::Accepted {
                conn,
                peer,
                key,
                addr,
                remote_max_message_size,
                remote_features,
            } => {
                self.tap.connection(
                    conn,
                    Some(peer),
                    &ConnEvent::Established {
                        peer,
                        key,
                        remote_max_message_size,
                        remote_features,
                        ticket: None,
                    },
                );
                observe::established(conn, peer, Some(addr));
                self.endpoint.handle_accepted(
                    conn,
                    peer,
                    addr,
                    remote_max_message_size,
                    remote_features,
                    now,
                );
            }
            NetEvent::Rejected(error) => {
                self.tap.rejected(&error);
                self.endpoint.handle_rejected(error, now);
            }
            NetEvent::Conn { conn, event } => {
                let peer = self.endpoint.peer_of(conn);
                let arrival = match (&event, peer) {
                    (ConnEvent::Message(message), Some(peer)) => {
                        observe::message(false, conn, Some(peer), message);
                        self.tap.incoming(conn, peer, message)
                    }
                    // A Request in IK message 1 is seen, and may be faulted, as any.
                    (ConnEvent::Early { message, .. }, Some(peer)) => {
                        observe::message(false, conn, Some(peer), message);
                        self.tap.early(conn, peer, message)
                    }
                    (ConnEvent::Message(_) | ConnEvent::Early { .. }, None) => Arrival::Pass,
                    (other, peer) => {
                        if let ConnEvent::Established { peer, .. } = other {
                            observe::established(conn, *peer, None);
                        }
                        self.tap.connection(conn, peer, other);
                        Arrival::Pass
                    }
                };
                match (arrival, event) {
                    (Arrival::Pass, event) => self.endpoint.handle_conn_event(conn, event, now),
                    (Arrival::Drop, _) => {}
                    (
                        Arrival::Nack(reason),
                        ConnEvent::Message(Message::Request {
                            exchange, attempt, ..
                        })
                        | ConnEvent::Early {
                            message:
                                Message::Request {
                                    exchange, attempt, ..
                                },
                            ..
                        },
                    ) => {
                        let message = Message::Nack {
                            exchange,
                            attempt,
                            reason,
                            retry_after_ms: 0,
                        };
                        // Reported like any message sent to the dialer (its verdict is
                        // ignored: this Nack is itself the injected fault).
                        if let Some(peer) = self.endpoint.peer_of(conn) {
                            self.tap.outgoing(conn, peer, &message);
                        }
                        self.pending_net
                            .push_back((conn, ConnCommand::Send(message)));
                    }
                    (Arrival::Nack(_), event) => self.endpoint.handle_conn_event(conn, event, now),
                }
            }
        }
    }

    /// Sends `message` on `conn` after `delay` (a delayed or duplicated message, injected
    /// by the tap), through the router, which reports a slow connection.
    fn send_later(&self, conn: ConnId, delay: std::time::Duration, message: Message) {
        let network = self.network.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = network.send(NetCommand::Send { conn, message }).await;
        });
    }

    fn net_notice(&mut self, notice: NetNotice) {
        match notice {
            NetNotice::Lost { conn, why } => {
                self.endpoint
                    .handle_conn_event(conn, ConnEvent::Closed(Closed::Io(why)), now());
            }
            NetNotice::Tasks {
                live,
                parked,
                evicted,
                first_messages,
            } => {
                self.first_messages = first_messages;
                self.connection_tasks = live;
                self.parked_connections = parked;
                self.evicted_unauthenticated = evicted;
            }
            NetNotice::App(notice) => self.notice(notice),
        }
    }

    async fn shutdown(
        mut self,
        network: tokio::task::JoinHandle<()>,
        inbox: Option<Inbox>,
    ) -> ShutdownReport {
        // What the running commit holds back leaves first, as it would have.
        if let Some((commit, effects)) = self.in_flight.take() {
            match commit.await {
                Ok(()) => self.release(effects).await,
                Err(e) => {
                    // Nothing more can be made durable: cut the connections, as a crash
                    // would.
                    self.store_failed(&e);
                    network.abort();
                    return ShutdownReport::default();
                }
            }
        }
        let mut report = ShutdownReport {
            unanswered_requests: self.endpoint.pending_responses(),
            kept: if self.endpoint.is_durable() {
                self.endpoint.outbound_in_flight()
            } else {
                0
            },
            ..ShutdownReport::default()
        };
        self.endpoint.shutdown(now());
        // The application handed its inbox back: what it did not read goes into the
        // report, taken (so settled, unless it must be confirmed), before the last commit.
        let handed_back = inbox.is_some();
        if let Some(mut inbox) = inbox {
            while let Ok(event) = inbox.received.try_recv() {
                report.unread.push(event);
            }
            while let Ok(notice) = inbox.priority.try_recv() {
                report.unread_notices.push(notice);
            }
            report.unread.extend(self.recv_backlog.drain(..));
            for event in &report.unread {
                if let Some(taken) = super::handle::Taken::of(event) {
                    self.on_taken(taken);
                }
            }
        }
        // Outcomes the application took before the shutdown are settled in the last commit
        // too (a second report of one is a no-op).
        while let Ok(id) = self.taken.try_recv() {
            self.on_taken(id);
        }
        if let Some(store) = &mut self.store {
            self.pending_ops.extend(self.endpoint.poll_journal());
            let ops = std::mem::take(&mut self.pending_ops);
            if !ops.is_empty()
                && let Err(e) = store.commit(ops).await
            {
                self.store_failed(&e);
                network.abort();
                return report;
            }
        }
        let effects = self.take_effects();
        for answer in effects.answers {
            answer();
        }
        self.perform_outputs(effects.forged, effects.outputs).await;
        for event in effects.events {
            match event {
                Event::Failed {
                    peer,
                    exchange,
                    payload,
                    failure: Failure::ShuttingDown,
                    ..
                } => report.failed.push((peer, exchange, payload)),
                // What the application can no longer read from its inbox comes in the
                // report. (In memory only: a durable node's shutdown ends no exchange.)
                other if handed_back => report.unread.push(other),
                other => self.recv_backlog.push_back(other),
            }
        }
        let _ = self.network.send(NetCommand::Shutdown).await;
        // Keep draining network events so connection tasks can finish flushing.
        tokio::pin!(network);
        loop {
            tokio::select! {
                biased;
                _ = &mut network => break,
                Some(_) = self.net_events.recv() => {}
                Some(_) = self.net_notices.recv() => {}
            }
        }
        // Whatever the application has room for, it gets; the rest is in its inbox or lost
        // with it.
        self.drain_backlogs();
        let gauges = self.gauges();
        self.observer.flush(self.endpoint.stats(), &gauges);
        report
    }
}

/// Resolves when the running commit does; never if none runs.
async fn committed(in_flight: &mut Option<(Commit, Effects)>) -> Result<(), StoreError> {
    match in_flight {
        Some((commit, _)) => commit.await,
        None => std::future::pending().await,
    }
}

/// Moves what fits from a backlog into the application's channel, oldest first.
pub(super) fn drain_into<T>(backlog: &mut VecDeque<T>, channel: &mpsc::Sender<T>) {
    while let Some(item) = backlog.pop_front() {
        match channel.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(item)) => {
                backlog.push_front(item);
                break;
            }
            // The application dropped its inbox; nobody will read these.
            Err(mpsc::error::TrySendError::Closed(_)) => backlog.clear(),
        }
    }
}
