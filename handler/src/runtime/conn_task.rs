//! One task per connection: feeds frames to its [`Connection`] and writes what it produces.

use std::io;

use std::time::Duration;

use bytes::{BufMut, Bytes};
use std::task::{Context, Poll};

use futures_util::future::poll_fn;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::connection::{Closed, ConnError, ConnEvent, Connection};
use crate::endpoint::ConnId;
use crate::guard::FirstMessage;
use crate::wire::{CloseReason, MAX_FRAME_LEN, Message};

use super::router::NetEvent;
use super::slots::SharedGate;
use super::{SharedAllow, Timer, now};

pub(super) enum ConnCommand {
    Send(Message),
    SendCorrupted(Message),
    Close(CloseReason),
    /// Close without the Close message (the tap dropped it).
    CloseQuietly(CloseReason),
}

pub(super) fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(2)
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

/// How [`ConnTask::write_out`] ended.
pub(super) enum Written {
    /// Everything queued is written and flushed.
    All,
    /// The endpoint closed the connection (or the handler is gone) while the write was
    /// blocked: end the task without reporting, the endpoint already forgot it.
    Abandoned,
    /// The stream failed or stalled: report the connection lost.
    Failed(String),
}

/// One turn of writing, polled: moves the connection's frames into the sink's write buffer
/// (each encrypted straight into it, after its length prefix) while the sink has room,
/// then flushes. Ready once everything queued is flushed. Cancel-safe: it takes a frame
/// from the connection only once there is room for it, so between polls each frame is
/// either still in the connection or already in the buffer. `progressed` turns true when
/// the socket took bytes (the buffer shrank across a flush): the peer is reading.
fn poll_write<S: AsyncRead + AsyncWrite + Unpin>(
    connection: &mut Connection,
    corrupt_next: &mut bool,
    framed: &mut Framed<S, LengthDelimitedCodec>,
    sent: &metrics::Counter,
    progressed: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Result<(), String>> {
    let failed = |e: io::Error| format!("write failed: {e}");
    loop {
        let held = framed.write_buffer().len();
        let ready = SinkExt::<Bytes>::poll_ready_unpin(framed, cx);
        *progressed |= framed.write_buffer().len() < held;
        match ready {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(failed(e))),
            Poll::Ready(Ok(())) => {}
        }
        // The frame is encrypted straight into the write buffer, after its length prefix
        // (what the codec would have copied it in with).
        let buffer = framed.write_buffer_mut();
        let at = buffer.len();
        buffer.put_u16(0);
        let Some(len) = connection.poll_transmit_into(buffer) else {
            buffer.truncate(at);
            break;
        };
        // A frame is at most MAX_FRAME_LEN (u16::MAX) bytes: the connection's bound.
        let Ok(prefix) = u16::try_from(len) else {
            return Poll::Ready(Err(failed(io::Error::other(format!(
                "frame of {len} bytes"
            )))));
        };
        buffer[at..at + 2].copy_from_slice(&prefix.to_be_bytes());
        if std::mem::take(corrupt_next)
            && let Some(byte) = buffer.get_mut(at + 2 + len / 2)
        {
            *byte ^= 0x5a;
        }
        sent.increment(wire_len(len));
    }
    let held = framed.write_buffer().len();
    let flushed = SinkExt::<Bytes>::poll_flush_unpin(framed, cx).map_err(failed);
    *progressed |= framed.write_buffer().len() < held;
    flushed
}

/// What the gate made of an accepted stream's message 1.
enum Screen {
    /// Handle it: the handshake goes on.
    Go,
    /// A cookie reply went out: wait for message 1 again.
    Wait,
    /// Garbage: hold the stream (reported with this reason).
    Hold(String),
}

/// What happened while a write was under way.
enum WriteStep {
    /// Everything queued is flushed (or the stream failed).
    Done(Result<(), String>),
    /// The peer took some bytes; the write goes on.
    Progress,
    /// A command from the endpoint.
    Command(Option<ConnCommand>),
    /// A frame from the peer (read while our write waited for it to take bytes).
    Frame(Option<io::Result<bytes::BytesMut>>),
    /// No byte taken for `write_stall_timeout`.
    Stalled,
}

/// A frame's size on the wire: its payload and the 2-byte length prefix.
fn wire_len(frame: usize) -> u64 {
    u64::try_from(frame).unwrap_or(u64::MAX).saturating_add(2)
}

/// Byte counters of the connection tasks (see `observe.rs` for every metric's name).
#[derive(Clone)]
pub(super) struct ByteCounters {
    sent: metrics::Counter,
    received: metrics::Counter,
}

impl ByteCounters {
    pub(super) fn new() -> Self {
        Self {
            sent: metrics::counter!("p2p_bytes_sent_total"),
            received: metrics::counter!("p2p_bytes_received_total"),
        }
    }
}

/// One connection: feeds frames to its [`Connection`], writes what it produces, forwards
/// its events. Holds no protocol logic.
pub(super) struct ConnTask {
    pub(super) conn: ConnId,
    /// Fault points: a write or a read that comes late (see `buggify`).
    pub(super) buggify: super::buggify::Points,
    /// Whether the endpoint knows this connection (dials always; accepts once established).
    pub(super) announced: bool,
    /// Accepted streams: the admission table, which may evict this connection until it
    /// authenticates, and charges its Diffie-Hellman work, and the guard that sorts its
    /// message 1. `None` for dials.
    pub(super) gate: Option<SharedGate>,
    /// Accepted streams parked by the admission table: the router's word that a slot is
    /// ours. Until then message 1 is read and sorted, and waits unless it proves a ticket.
    pub(super) turn: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Whether message 1 passed the gate (always, for dials).
    pub(super) screened: bool,
    /// Message 1 was garbage: the stream is held open, unread, until the admission table
    /// lets it go (see `admission`'s "hold garbage") or its sender closes it.
    pub(super) held: bool,
    pub(super) connection: Connection,
    pub(super) allow: SharedAllow,
    pub(super) commands: mpsc::Receiver<ConnCommand>,
    pub(super) events: mpsc::Sender<NetEvent>,
    /// Fault injection: flip a byte of the next frame written.
    pub(super) corrupt_next: bool,
    /// The peer said (a fresh `Progress`) that more of the message we send arrived: our
    /// write is progressing, even while the kernel's buffer, full, wakes us seldom.
    pub(super) peer_progressed: bool,
    /// `Config::write_stall_timeout`.
    pub(super) write_stall_timeout: Duration,
    pub(super) bytes: ByteCounters,
}

impl ConnTask {
    /// Runs the connection inside a span naming it, so every line it logs says which.
    pub(super) async fn run<S: AsyncRead + AsyncWrite + Unpin>(self, stream: S) {
        let span = tracing::debug_span!(
            "conn",
            conn = %self.conn,
            remote = %self.connection.remote().addr,
        );
        tracing::Instrument::instrument(self.run_inner(stream), span).await;
    }

    async fn run_inner<S: AsyncRead + AsyncWrite + Unpin>(mut self, stream: S) {
        let mut framed = Framed::new(stream, codec());
        let mut frames_seen = false;
        let mut timer = Timer::new();
        // Made the first time a write has to wait: most connections never need it.
        let mut stall_timer: Option<Timer> = None;
        loop {
            if self.held {
                return self.hold(&mut framed).await;
            }
            // Fault point: the frames the connection produced leave late.
            self.buggify.delay().await;
            match self
                .write_out(&mut framed, &mut frames_seen, &mut stall_timer)
                .await
            {
                Written::All => {}
                Written::Abandoned => return,
                Written::Failed(why) => return self.lost(why, frames_seen).await,
            }
            if !self.forward_events().await || self.connection.is_closed() {
                return;
            }
            let deadline = timer.arm(self.connection.poll_timeout());
            tokio::select! {
                biased;
                command = self.commands.recv() => {
                    let Some(command) = command else {
                        return;
                    };
                    self.command(command);
                    // Take everything already queued before writing, so frames that were
                    // produced together (an Ack and a Reply, a final Ack and a Close) leave
                    // in one write.
                    while let Ok(command) = self.commands.try_recv() {
                        self.command(command);
                    }
                }
                frame = framed.next() => {
                    // Fault point: the frame read is handled late.
                    self.buggify.delay().await;
                    if let Err(why) = self.on_frame(frame, &mut frames_seen).await {
                        return self.lost(why, frames_seen).await;
                    }
                }
                () = timer.wait(), if deadline => {
                    timer.fired();
                    self.connection.handle_timeout(now());
                }
            }
        }
    }

    fn command(&mut self, command: ConnCommand) {
        match command {
            ConnCommand::Send(message) => {
                // Fails only if the connection is not open, in which case its Closed event
                // is on its way to the endpoint already.
                let _ = self.connection.send(&message);
            }
            ConnCommand::SendCorrupted(message) => {
                if self.connection.send(&message).is_ok() {
                    self.corrupt_next = true;
                }
            }
            ConnCommand::Close(reason) => self.connection.close(reason),
            ConnCommand::CloseQuietly(reason) => self.connection.close_quietly(reason),
        }
    }

    /// One frame read from the stream (or its end): fed to the connection. `Err` names why
    /// the connection is lost.
    async fn on_frame(
        &mut self,
        frame: Option<io::Result<bytes::BytesMut>>,
        frames_seen: &mut bool,
    ) -> Result<(), String> {
        let frame = match frame {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                *frames_seen = true;
                return Err(read_failed(&e));
            }
            None => return Err("connection closed by peer".into()),
        };
        *frames_seen = true;
        self.bytes.received.increment(wire_len(frame.len()));
        if !self.screened {
            // Boxed: its timer would otherwise sit in every connection task's state.
            match Box::pin(self.screen(&frame)).await? {
                Screen::Go => self.screened = true,
                // Answered with a cookie reply: the dialer sends message 1 again.
                Screen::Wait => return Ok(()),
                Screen::Hold(why) => {
                    let error = ConnError::Handshake {
                        remote: self.connection.remote(),
                        detail: why,
                    };
                    self.held = true;
                    let _ = self.events.send(NetEvent::Rejected(error)).await;
                    return Ok(());
                }
            }
        }
        let Ok(allow) = self.allow.read() else {
            return Err("allow list lock poisoned".into());
        };
        self.connection.handle_frame(&frame, &allow, now());
        drop(allow);
        if !self.announced
            && let Some(gate) = &self.gate
        {
            // The ticket message 2 hands over proves this peer next time: the guard
            // learns it before message 2 leaves.
            if let Some((peer, ticket)) = self.connection.issued_ticket() {
                gate.guard(|guard| guard.issue(peer, ticket, now()));
            }
            // A handshake message: its wait for the next one begins now.
            gate.with(|table| table.progressed(self.conn, now()));
        }
        Ok(())
    }

    /// Writes everything the connection has queued. While the peer is slow to take it:
    /// * frames it sends are still read and handled (a large message we send may take
    ///   minutes on a slow link, and the peer's `Progress` about it, or its Ack, must reach
    ///   the endpoint meanwhile);
    /// * commands are still handled, so the endpoint's close always reaches this task: a
    ///   Close that finds the write blocked abandons the connection at once (the peer is not
    ///   reading, so waiting would only hold this task and its buffers);
    /// * a write that makes no progress for `write_stall_timeout` abandons it too.
    ///
    /// A write that can finish at once reads no clock and arms no timer.
    async fn write_out<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        framed: &mut Framed<S, LengthDelimitedCodec>,
        frames_seen: &mut bool,
        stall_timer: &mut Option<Timer>,
    ) -> Written {
        let stall = self.write_stall_timeout;
        let mut deadline = None;
        loop {
            let armed =
                deadline.is_some() && stall_timer.get_or_insert_with(Timer::new).arm(deadline);
            let step = poll_fn(|cx| {
                let mut progressed = false;
                let written = poll_write(
                    &mut self.connection,
                    &mut self.corrupt_next,
                    framed,
                    &self.bytes.sent,
                    &mut progressed,
                    cx,
                );
                if let Poll::Ready(done) = written {
                    return Poll::Ready(WriteStep::Done(done));
                }
                if progressed {
                    return Poll::Ready(WriteStep::Progress);
                }
                if let Poll::Ready(command) = self.commands.poll_recv(cx) {
                    return Poll::Ready(WriteStep::Command(command));
                }
                if let Poll::Ready(frame) = framed.poll_next_unpin(cx) {
                    return Poll::Ready(WriteStep::Frame(frame));
                }
                if armed
                    && let Some(timer) = stall_timer.as_mut()
                    && timer.wait().as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(WriteStep::Stalled);
                }
                // The write is blocked; the first time, the stall clock starts.
                if deadline.is_none() {
                    return Poll::Ready(WriteStep::Progress);
                }
                Poll::Pending
            })
            .await;
            match step {
                WriteStep::Done(Ok(())) => return Written::All,
                WriteStep::Done(Err(why)) => return Written::Failed(why),
                WriteStep::Progress => deadline = Some(now() + stall),
                WriteStep::Stalled => {
                    if let Some(timer) = stall_timer.as_mut() {
                        timer.fired();
                    }
                    return Written::Failed(format!("write stalled: no progress for {stall:?}"));
                }
                WriteStep::Command(None) => return Written::Abandoned,
                WriteStep::Command(Some(
                    ConnCommand::Close(reason) | ConnCommand::CloseQuietly(reason),
                )) => {
                    self.connection.close(reason);
                    tracing::debug!(conn = %self.conn, remote = %self.connection.remote(),
                        "closed while the peer was not reading: abandoned");
                    return Written::Abandoned;
                }
                WriteStep::Command(Some(command)) => self.command(command),
                WriteStep::Frame(frame) => {
                    if let Err(why) = self.on_frame(frame, frames_seen).await {
                        return Written::Failed(why);
                    }
                    if !self.forward_events().await {
                        return Written::Abandoned;
                    }
                    // A socket with a large send buffer wakes a blocked writer only after
                    // much of it drained: on a slow link, the peer's word is the better
                    // measure of progress.
                    if std::mem::take(&mut self.peer_progressed) {
                        deadline = Some(now() + stall);
                    }
                }
            }
        }
    }

    /// Message 1 of an accepted stream, before any Diffie-Hellman (see `guard` and
    /// `admission`): garbage and a wrong mac1 are held (`Screen::Hold`); a ticket proves
    /// an allowed peer, which goes ahead of everything unproven; under load an unproven IK
    /// message 1 without a cookie gets a cookie reply (`Screen::Wait`: message 1 comes
    /// again); anything else waits for its slot, if parked, and pays a token of its
    /// address's budget. `Err` names why the stream is dropped.
    async fn screen(&mut self, frame: &[u8]) -> Result<Screen, String> {
        let Some(gate) = self.gate.clone() else {
            return Ok(Screen::Go);
        };
        let from = self.connection.remote().addr;
        let sorted = gate.guard(|guard| guard.classify(frame, from, now()));
        match sorted {
            FirstMessage::Garbage(why) => {
                gate.with(|table| table.hold(self.conn, now()));
                // A slot may have freed, or parking dropped a held stream: the router acts.
                gate.wake.notify_one();
                return Ok(Screen::Hold(format!("first message refused: {why}")));
            }
            FirstMessage::Proven(peer) => {
                if !gate.with(|table| table.prove(self.conn, now())) {
                    return Err("evicted".into());
                }
                gate.wake.notify_one();
                self.turn = None;
                self.connection.proven_by_ticket(peer);
                return Ok(Screen::Go);
            }
            FirstMessage::Unproven { cookie: false } if gate.with(|table| table.under_load()) => {
                if !self.connection.may_send_cookie_reply() {
                    return Err("message 1 without the cookie it was sent, again".into());
                }
                let reply = gate.guard(|guard| guard.cookie_reply(frame, from, now()));
                return match reply.map(|reply| self.connection.send_cookie_reply(reply)) {
                    Some(true) => Ok(Screen::Wait),
                    _ => Err("message 1 without the cookie it was sent".into()),
                };
            }
            FirstMessage::Xx | FirstMessage::Unproven { .. } => {}
        }
        let ik = !matches!(sorted, FirstMessage::Xx);
        if let Some(turn) = self.turn.take() {
            // Parked: a message 1 goes ahead of the silent streams, and may take a stalled
            // handshake's slot (the router cuts it).
            let started = gate.with(|table| table.ready(self.conn, ik, now()));
            gate.wake.notify_one();
            if !started {
                turn.await.map_err(|_| "the router is gone".to_owned())?;
            }
        }
        while let Err(wait) = gate.with(|table| table.take_dh(self.conn, now())) {
            tokio::time::sleep(wait).await;
        }
        Ok(Screen::Go)
    }

    /// A stream held for its garbage message 1: nothing is read into the connection and
    /// nothing written, until the router cuts this task (the hold expired, or parking
    /// needed room), a Close comes (shutdown), or the sender closes the stream.
    async fn hold<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        framed: &mut Framed<S, LengthDelimitedCodec>,
    ) {
        let mut commands = self.commands;
        loop {
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    None | Some(ConnCommand::Close(_) | ConnCommand::CloseQuietly(_)) => return,
                    Some(_) => {}
                },
                frame = framed.next() => match frame {
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                },
            }
        }
    }

    /// Forwards the connection's events; false if the handler is gone.
    async fn forward_events(&mut self) -> bool {
        while let Some(event) = self.connection.poll_event() {
            let message = match (self.announced, event) {
                (
                    false,
                    ConnEvent::Established {
                        peer,
                        remote_max_message_size,
                        remote_features,
                        key,
                        ..
                    },
                ) => {
                    if let Some(gate) = &self.gate {
                        if !gate.with(|table| table.admit(self.conn, now())) {
                            // Evicted while finishing the handshake: the router cuts us.
                            return false;
                        }
                        // A slot is free: parked streams may start.
                        gate.wake.notify_one();
                    }
                    self.announced = true;
                    tracing::debug!(peer = %peer.short(), "handshake complete");
                    NetEvent::Accepted {
                        conn: self.conn,
                        peer,
                        key,
                        addr: self.connection.remote().addr,
                        remote_max_message_size,
                        remote_features,
                    }
                }
                (false, ConnEvent::Closed(Closed::Error(e))) => NetEvent::Rejected(e),
                (false, _) => continue,
                (true, event) => {
                    if matches!(event, ConnEvent::Message(Message::Progress { .. })) {
                        self.peer_progressed = true;
                    }
                    NetEvent::Conn {
                        conn: self.conn,
                        event,
                    }
                }
            };
            if self.events.send(message).await.is_err() {
                return false;
            }
        }
        true
    }

    /// The stream ended or failed. Announced connections report it to the endpoint; an
    /// accepted stream that sent something but never finished its handshake is reported as
    /// an error naming its address (garbage, a port scanner, a wrong protocol).
    async fn lost(self, why: String, frames_seen: bool) {
        let message = if self.announced {
            NetEvent::Conn {
                conn: self.conn,
                event: ConnEvent::Closed(Closed::Io(why)),
            }
        } else if frames_seen || why.starts_with("read failed") {
            NetEvent::Rejected(ConnError::Handshake {
                remote: self.connection.remote(),
                detail: why,
            })
        } else {
            return;
        };
        let _ = self.events.send(message).await;
    }
}

/// A failed read, in words. The framing codec's "bytes remaining on stream" means the
/// stream ended inside a frame: the other end closed mid-message, or never spoke this
/// protocol at all (an HTTP server answering our handshake with its own error).
fn read_failed(e: &io::Error) -> String {
    if e.to_string() == "bytes remaining on stream" {
        "read failed: the connection ended in the middle of a frame (is the other end a \
         p2p-handler node?)"
            .to_owned()
    } else {
        format!("read failed: {e}")
    }
}
