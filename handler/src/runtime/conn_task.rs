//! One task per connection: feeds frames to its [`Connection`] and writes what it produces.

use std::io;

use std::time::Duration;

use bytes::{BufMut, Bytes};
use futures_util::future::poll_fn;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::connection::{Closed, ConnError, ConnEvent, Connection};
use crate::endpoint::ConnId;
use crate::wire::{CloseReason, MAX_FRAME_LEN, Message};

use super::router::NetEvent;
use super::slots::SharedGate;
use super::{SharedAllow, Timer, now};

pub(super) enum ConnCommand {
    Send(Message),
    SendCorrupted(Message),
    Close(CloseReason),
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

/// Moves the connection's frames into the sink's write buffer (each encrypted straight into
/// it, after its length prefix) and flushes it. Cancel-safe: it waits for room before taking
/// a frame from the connection, so at every await each frame is either still in the
/// connection or already in the buffer. Each wait for the peer to take bytes is bounded by
/// `stall`.
async fn write_queued<S: AsyncRead + AsyncWrite + Unpin>(
    connection: &mut Connection,
    corrupt_next: &mut bool,
    framed: &mut Framed<S, LengthDelimitedCodec>,
    stall: Duration,
    sent: &metrics::Counter,
) -> Written {
    let stalled = || Written::Failed(format!("write stalled: no progress for {stall:?}"));
    let failed = |e: io::Error| Written::Failed(format!("write failed: {e}"));
    loop {
        match within(stall, |cx| SinkExt::<Bytes>::poll_ready_unpin(framed, cx)).await {
            None => return stalled(),
            Some(Err(e)) => return failed(e),
            Some(Ok(())) => {}
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
            return failed(io::Error::other(format!("frame of {len} bytes")));
        };
        buffer[at..at + 2].copy_from_slice(&prefix.to_be_bytes());
        if std::mem::take(corrupt_next)
            && let Some(byte) = buffer.get_mut(at + 2 + len / 2)
        {
            *byte ^= 0x5a;
        }
        sent.increment(wire_len(len));
    }
    match within(stall, |cx| SinkExt::<Bytes>::poll_flush_unpin(framed, cx)).await {
        None => stalled(),
        Some(Err(e)) => failed(e),
        Some(Ok(())) => Written::All,
    }
}

/// Polls `poll` until it is ready, giving up (`None`) after `stall`. Most waits end on the
/// first poll (the socket has room), and those read no clock and arm no timer.
async fn within<T>(
    stall: Duration,
    mut poll: impl FnMut(&mut std::task::Context<'_>) -> std::task::Poll<T>,
) -> Option<T> {
    if let std::task::Poll::Ready(value) = poll_fn(|cx| std::task::Poll::Ready(poll(cx))).await {
        return Some(value);
    }
    tokio::time::timeout(stall, poll_fn(poll)).await.ok()
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
    /// Whether the endpoint knows this connection (dials always; accepts once established).
    pub(super) announced: bool,
    /// Accepted streams: the admission table, which may evict this connection until it
    /// authenticates, and charges its Diffie-Hellman work. `None` for dials.
    pub(super) gate: Option<SharedGate>,
    pub(super) connection: Connection,
    pub(super) allow: SharedAllow,
    pub(super) commands: mpsc::Receiver<ConnCommand>,
    pub(super) events: mpsc::Sender<NetEvent>,
    /// Fault injection: flip a byte of the next frame written.
    pub(super) corrupt_next: bool,
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
        loop {
            match self.write_out(&mut framed).await {
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
                frame = framed.next() => match frame {
                    Some(Ok(frame)) => {
                        if !frames_seen {
                            self.pay_for_handshake().await;
                        }
                        frames_seen = true;
                        self.bytes.received.increment(wire_len(frame.len()));
                        let handled = match self.allow.read() {
                            Ok(allow) => {
                                self.connection.handle_frame(&frame, &allow);
                                true
                            }
                            Err(_) => false,
                        };
                        if !handled {
                            return self.lost("allow list lock poisoned".into(), true).await;
                        }
                        if !self.announced
                            && let Some(gate) = &self.gate
                        {
                            // A handshake message: its wait for the next one begins now.
                            gate.with(|table| table.progressed(self.conn, now()));
                        }
                    }
                    Some(Err(e)) => return self.lost(format!("read failed: {e}"), true).await,
                    None => return self.lost("connection closed by peer".into(), frames_seen).await,
                },
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
        }
    }

    /// Writes everything the connection has queued. While the peer is slow to take it,
    /// commands are still handled, so the endpoint's close always reaches this task: a Close
    /// that finds the write blocked abandons the connection at once (the peer is not
    /// reading, so waiting would only hold this task and its buffers), and a write that
    /// makes no progress for `write_stall_timeout` abandons it too.
    async fn write_out<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        framed: &mut Framed<S, LengthDelimitedCodec>,
    ) -> Written {
        loop {
            tokio::select! {
                biased;
                // First, so that a write that can finish at once always does.
                written = write_queued(
                    &mut self.connection,
                    &mut self.corrupt_next,
                    framed,
                    self.write_stall_timeout,
                    &self.bytes.sent,
                ) => return written,
                // The write is blocked (the future above is cancel-safe: no frame is lost
                // or half-written when it is dropped here and polled anew).
                command = self.commands.recv() => match command {
                    None => return Written::Abandoned,
                    Some(ConnCommand::Close(reason)) => {
                        self.connection.close(reason);
                        tracing::debug!(conn = %self.conn, remote = %self.connection.remote(),
                            "closed while the peer was not reading: abandoned");
                        return Written::Abandoned;
                    }
                    Some(command) => self.command(command),
                },
            }
        }
    }

    /// Before the first handshake message of an accepted stream is read (the one that costs
    /// us Diffie-Hellman work): a stranger address pays a token of its budget, waiting for
    /// one if it spent them all. Dials and listed addresses go ahead.
    async fn pay_for_handshake(&self) {
        let Some(gate) = &self.gate else {
            return;
        };
        while let Err(wait) = gate.with(|table| table.take_dh(self.conn, now())) {
            tokio::time::sleep(wait).await;
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
                        addr: self.connection.remote().addr,
                        remote_max_message_size,
                    }
                }
                (false, ConnEvent::Closed(Closed::Error(e))) => NetEvent::Rejected(e),
                (false, _) => continue,
                (true, event) => NetEvent::Conn {
                    conn: self.conn,
                    event,
                },
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
