//! A peer written from `docs/PROTOCOL.md` by hand, for tests that need to misbehave: it
//! speaks the handshake and the framing with plain blocking sockets, and sends whatever
//! plaintext it is told to, well-formed or not.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // Each test uses a part.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use p2p_handler::Keypair;
use p2p_handler::noise::{HandshakeRole, handshake};
use p2p_handler::wire::{Hello, Message, PROTOCOL_VERSION, TAG_LEN, chunk_message};

/// How long a raw peer waits for a frame before the test fails.
pub(crate) mod attack;

pub(crate) const READ_WAIT: Duration = Duration::from_secs(30);

/// One end of an established Noise session over a blocking TCP stream.
pub(crate) struct RawPeer {
    pub(crate) stream: TcpStream,
    session: snow::TransportState,
    /// The hello the other side sent.
    pub(crate) their_hello: Hello,
}

/// This peer's hello. It asks for no `Progress` (`progress_ms` 0), as a peer that predates
/// them does: the node must never send it one.
fn hello(max_message_size: u32) -> [u8; Hello::LEN] {
    Hello {
        version: PROTOCOL_VERSION,
        max_message_size,
        progress_ms: 0,
        features: 0,
    }
    .encode()
}

pub(crate) fn write_frame(stream: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(body.len()).expect("a frame fits its prefix");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(body);
    stream.write_all(&out)
}

/// The next frame body; `None` when the stream ended or failed.
pub(crate) fn read_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).ok()?;
    Some(body)
}

impl RawPeer {
    /// Dials `addr` and completes the handshake as `key`, advertising `max_message_size`.
    pub(crate) fn dial(addr: SocketAddr, key: &Keypair, max_message_size: u32) -> Self {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(READ_WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut hs = handshake(key, HandshakeRole::Initiator, [3; 32]).unwrap();
        let mut buf = vec![0u8; 65_535];
        let n = hs
            .write_message(&hello(max_message_size), &mut buf)
            .unwrap();
        write_frame(&mut stream, &buf[..n]).unwrap();
        let msg2 = read_frame(&mut stream).expect("handshake message 2");
        let n = hs.read_message(&msg2, &mut buf).unwrap();
        let their_hello = Hello::decode(&buf[..n]).unwrap();
        let n = hs.write_message(&[], &mut buf).unwrap();
        write_frame(&mut stream, &buf[..n]).unwrap();
        let session = hs.into_transport_mode().unwrap();
        Self {
            stream,
            session,
            their_hello,
        }
    }

    /// Accepts one stream on `listener` and completes the handshake as the responder `key`.
    pub(crate) fn accept(listener: &TcpListener, key: &Keypair, max_message_size: u32) -> Self {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(READ_WAIT)).unwrap();
        let mut hs = handshake(key, HandshakeRole::Responder, [4; 32]).unwrap();
        let mut buf = vec![0u8; 65_535];
        let msg1 = read_frame(&mut stream).expect("handshake message 1");
        let n = hs.read_message(&msg1, &mut buf).unwrap();
        let their_hello = Hello::decode(&buf[..n]).unwrap();
        let n = hs
            .write_message(&hello(max_message_size), &mut buf)
            .unwrap();
        write_frame(&mut stream, &buf[..n]).unwrap();
        let msg3 = read_frame(&mut stream).expect("handshake message 3");
        hs.read_message(&msg3, &mut buf).unwrap();
        let session = hs.into_transport_mode().unwrap();
        Self {
            stream,
            session,
            their_hello,
        }
    }

    /// Encrypts `plain` as one chunk and writes it as one frame.
    pub(crate) fn send_chunk(&mut self, plain: &[u8]) {
        let mut frame = vec![0u8; plain.len() + TAG_LEN];
        let n = self.session.write_message(plain, &mut frame).unwrap();
        write_frame(&mut self.stream, &frame[..n]).unwrap();
    }

    /// Sends a well-formed message.
    pub(crate) fn send(&mut self, message: &Message) {
        for chunk in chunk_message(message) {
            self.send_chunk(&chunk);
        }
    }

    /// The next chunk's plaintext; `None` when the stream ended.
    pub(crate) fn recv_chunk(&mut self) -> Option<Vec<u8>> {
        let frame = read_frame(&mut self.stream)?;
        let mut plain = vec![0u8; frame.len()];
        let n = self.session.read_message(&frame, &mut plain).ok()?;
        plain.truncate(n);
        Some(plain)
    }

    /// The next whole message (reassembling chunks); `None` when the stream ended.
    pub(crate) fn recv(&mut self) -> Option<Message> {
        let mut reassembler = p2p_handler::wire::Reassembler::new(1 << 30);
        loop {
            let chunk = self.recv_chunk()?;
            match reassembler.push(&chunk).ok()? {
                p2p_handler::wire::Reassembled::Message(m) => return Some(m),
                p2p_handler::wire::Reassembled::Pending => {}
                p2p_handler::wire::Reassembled::Oversized { .. } => return None,
            }
        }
    }

    /// Reads until the stream ends, returning every message that arrived.
    pub(crate) fn drain(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(m) = self.recv() {
            out.push(m);
        }
        out
    }
}

/// An application that answers every request with its own payload, until the handler
/// stops.
pub(crate) fn echo(
    handler: p2p_handler::Handler,
    mut inbox: p2p_handler::Inbox,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(event) = inbox.received.recv().await {
            if let p2p_handler::Event::Request {
                peer,
                exchange,
                payload,
                ..
            } = event
            {
                let _ = handler.response_to(peer, exchange, payload).await;
            }
        }
    })
}

/// Plaintext of a message as one chunk (for messages below the chunk size).
pub(crate) fn plain(message: &Message) -> Bytes {
    let mut chunks = chunk_message(message);
    assert_eq!(chunks.len(), 1, "one chunk");
    Bytes::from(chunks.remove(0))
}
