//! One task per connection: feeds frames to its [`Connection`] and writes what it produces.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::connection::{Closed, ConnError, ConnEvent, Connection};
use crate::endpoint::ConnId;
use crate::wire::{CloseReason, MAX_FRAME_LEN, Message};

use super::router::NetEvent;
use super::slots::Admission;
use super::{SharedAllow, now, sleep_until};

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

/// One connection: feeds frames to its [`Connection`], writes what it produces, forwards
/// its events. Holds no protocol logic.
pub(super) struct ConnTask {
    pub(super) conn: ConnId,
    /// Whether the endpoint knows this connection (dials always; accepts once established).
    pub(super) announced: bool,
    /// Shared with the router, which may evict this connection until it authenticates.
    pub(super) admission: Arc<Admission>,
    pub(super) connection: Connection,
    pub(super) allow: SharedAllow,
    pub(super) commands: mpsc::Receiver<ConnCommand>,
    pub(super) events: mpsc::Sender<NetEvent>,
    /// Fault injection: flip a byte of the next frame written.
    pub(super) corrupt_next: bool,
}

impl ConnTask {
    pub(super) async fn run<S: AsyncRead + AsyncWrite + Unpin>(mut self, stream: S) {
        let mut framed = Framed::new(stream, codec());
        let mut frames_seen = false;
        loop {
            if let Err(e) = self.flush(&mut framed).await {
                return self.lost(format!("write failed: {e}"), frames_seen).await;
            }
            if !self.forward_events().await || self.connection.is_closed() {
                return;
            }
            let deadline = self.connection.poll_timeout();
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
                        frames_seen = true;
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
                    }
                    Some(Err(e)) => return self.lost(format!("read failed: {e}"), true).await,
                    None => return self.lost("connection closed by peer".into(), frames_seen).await,
                },
                () = sleep_until(deadline.unwrap_or_else(now)), if deadline.is_some() => {
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

    async fn flush<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        framed: &mut Framed<S, LengthDelimitedCodec>,
    ) -> io::Result<()> {
        let mut wrote = false;
        while let Some(mut frame) = self.connection.poll_transmit() {
            if std::mem::take(&mut self.corrupt_next) {
                let middle = frame.len() / 2;
                if let Some(byte) = frame.get_mut(middle) {
                    *byte ^= 0x5a;
                }
            }
            framed.feed(Bytes::from(frame)).await?;
            wrote = true;
        }
        if wrote {
            SinkExt::<Bytes>::flush(framed).await?;
        }
        Ok(())
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
                    if !self.admission.admit() {
                        // Evicted while finishing the handshake: the router has cut us.
                        return false;
                    }
                    self.announced = true;
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
