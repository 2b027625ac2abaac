//! One authenticated, encrypted connection, free of I/O.
//!
//! A [`Connection`] turns frame bodies read from a stream into [`ConnEvent`]s and messages to
//! send into frame bodies to write. It performs the Noise handshake (XX, or IK when the
//! dialer knows the responder's key), checks the remote's identity (the dialer: the key must
//! hash to the peer id it dialed; the responder: the peer must be on the allow list, from
//! that address), encrypts and chunks outgoing messages, and decrypts and reassembles
//! incoming ones within the size limit. The driver owns the socket,
//! frames bodies with a 2-byte length prefix, and calls in the order documented on each
//! method. Every failure is a [`ConnError`] that names the peer, followed by `Closed`.
//!
//! ```text
//!   Dialer                                   Responder
//!   ------                                   ---------
//!   AwaitingMsg2  --- msg1: e, hello ----->  AwaitingMsg1
//!                 <-- msg2: e,ee,s,es,hello  AwaitingMsg3     (dialer checks s == peer id)
//!   Established   --- msg3: s,se --------->  Established      (responder checks allow list)
//!        |        <== chunks (encrypted) ==>      |
//!   Closed        <-- Close{reason} / error -->  Closed
//! ```
//!
//! A dialer that knows the responder's static key ([`Connection::dial_ik`]) uses IK, two
//! messages; the responder tells the patterns apart by message 1 (XX's has the hello in
//! clear after the ephemeral key) and checks the allow list on it:
//!
//! ```text
//!   AwaitingIkMsg2 --- msg1: e,es,s,ss,hello | ticket id, mac1, mac2 -->  AwaitingMsg1
//!        |         <-- cookie reply (under load) -------------------      |
//!        |         --- msg1 again, mac2 proving the cookie ---------->    |
//!   Established    <-- msg2: e,ee,se,hello,ticket -------------------  Established (allow list)
//! ```
//!
//! IK's message 1 ends in the envelope of [`crate::guard`]: its mac1 is checked before any
//! Diffie-Hellman, and a ticket handed over in an earlier message 2 proves the dialer.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use snow::{HandshakeState, TransportState};

use crate::allow_list::{AllowList, Rejection};
use crate::config::Config;
use crate::guard::{self, Ticket};
use crate::identity::{KEY_LEN, Keypair, PeerId};
use crate::noise::{HandshakeRole, handshake, handshake_ik};
use crate::wire::{
    Chunker, CloseReason, EARLY_MAX_LEN, ExchangeId, FEATURE_IK, FEATURES, Hello, Kind,
    MAX_FRAME_LEN, Message, PROTOCOL_VERSION, Reassembled, Reassembler, TAG_LEN, WireError,
};

/// A buffer frames are appended to (`Vec<u8>`, `BytesMut`): a driver's write buffer, so
/// that [`Connection::poll_transmit_into`] encrypts straight into it.
pub trait FrameBuf {
    /// Bytes held: where the next frame starts.
    fn end(&self) -> usize;
    /// Grows (with zeros) or shortens it to `len` bytes.
    fn set_len_zeroed(&mut self, len: usize);
    /// Its bytes.
    fn bytes_mut(&mut self) -> &mut [u8];
    /// Appends `bytes`.
    fn append(&mut self, bytes: &[u8]);
}

/// The two buffers have the same methods under the same names.
macro_rules! frame_buf {
    ($($buffer:ty),*) => {$(
        impl FrameBuf for $buffer {
            fn end(&self) -> usize {
                self.len()
            }
            fn set_len_zeroed(&mut self, len: usize) {
                self.resize(len, 0);
            }
            fn bytes_mut(&mut self) -> &mut [u8] {
                self
            }
            fn append(&mut self, bytes: &[u8]) {
                self.extend_from_slice(bytes);
            }
        }
    )*};
}

frame_buf!(Vec<u8>, bytes::BytesMut);

/// The remote side as far as it is known: always its address, its peer id once authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    /// Socket address of the remote end.
    pub addr: SocketAddr,
    /// Its peer id, once the handshake revealed (or the dial named) it.
    pub peer: Option<PeerId>,
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.peer {
            Some(peer) => write!(f, "peer {} at {}", peer.short(), self.addr),
            None => write!(f, "unidentified peer at {}", self.addr),
        }
    }
}

/// What went wrong on a connection. Every variant names the remote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    /// The Noise handshake failed (bad message, wrong prologue, failed DH or decryption).
    #[error("{remote}: handshake failed: {detail}")]
    Handshake {
        /// Who.
        remote: Remote,
        /// snow's or the hello parser's description.
        detail: String,
    },
    /// The peer speaks another protocol version.
    #[error("{remote}: incompatible protocol version {theirs} (ours is {ours})")]
    IncompatibleVersion {
        /// Who.
        remote: Remote,
        /// Their version.
        theirs: u8,
        /// Ours.
        ours: u8,
    },
    /// The key at the dialed address is not the peer we dialed (`remote.peer`).
    #[error("{remote}: impostor: the key that answered is peer {actual}")]
    Impostor {
        /// Who we dialed: the expected peer and its address.
        remote: Remote,
        /// The peer id of the key that answered.
        actual: PeerId,
    },
    /// We refused the peer: not on our allow list, or not from that address.
    #[error("{remote}: rejected: {rejection}")]
    NotAllowed {
        /// Who.
        remote: Remote,
        /// Why.
        rejection: Rejection,
    },
    /// The handshake did not finish in time.
    #[error("{remote}: handshake timed out")]
    HandshakeTimeout {
        /// Who.
        remote: Remote,
    },
    /// A transport message failed to decrypt: corruption or tampering.
    #[error("{remote}: decryption failed")]
    Decrypt {
        /// Who.
        remote: Remote,
    },
    /// A decrypted message or chunk is malformed.
    #[error("{remote}: protocol violation: {source}")]
    Protocol {
        /// Who.
        remote: Remote,
        /// What.
        source: WireError,
    },
    /// A frame that no Noise message can be (empty or over 65535 bytes).
    #[error("{remote}: invalid frame of {len} bytes")]
    BadFrame {
        /// Who.
        remote: Remote,
        /// Its length.
        len: usize,
    },
    /// A message was given to a connection that cannot send (not established, or closed).
    #[error("{remote}: connection is not open for sending")]
    NotOpen {
        /// Who.
        remote: Remote,
    },
    /// A message stopped arriving part-way: no byte of it for this long.
    #[error("{remote}: transfer stalled: no bytes of the message arriving for {stalled:?}")]
    Stalled {
        /// Who.
        remote: Remote,
        /// How long nothing arrived.
        stalled: std::time::Duration,
    },
}

impl ConnError {
    /// The remote this error is about.
    pub fn remote(&self) -> Remote {
        match self {
            Self::Handshake { remote, .. }
            | Self::IncompatibleVersion { remote, .. }
            | Self::Impostor { remote, .. }
            | Self::NotAllowed { remote, .. }
            | Self::HandshakeTimeout { remote }
            | Self::Decrypt { remote }
            | Self::Protocol { remote, .. }
            | Self::BadFrame { remote, .. }
            | Self::NotOpen { remote }
            | Self::Stalled { remote, .. } => *remote,
        }
    }

    /// Whether retrying the same peer at the same address cannot help.
    pub fn is_definite(&self) -> bool {
        matches!(
            self,
            Self::IncompatibleVersion { .. } | Self::Impostor { .. }
        )
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// The peer sent `Close` with this reason.
    ByPeer(CloseReason),
    /// We closed it with this reason (an error, when the cause was the peer's fault, is
    /// reported through `Error` instead).
    Locally(CloseReason),
    /// It failed: the error names the peer.
    Error(ConnError),
    /// The stream broke or could not be opened (reported by the driver).
    Io(String),
}

/// What a connection reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEvent {
    /// The handshake finished and the peer is authenticated (and allowed).
    Established {
        /// The authenticated peer.
        peer: PeerId,
        /// Its static public key (which `peer` is the hash of): a dialer keeps it to dial
        /// with IK next time.
        key: [u8; KEY_LEN],
        /// Largest application payload the peer accepts.
        remote_max_message_size: usize,
        /// The optional protocol features the peer understands (`wire::FEATURES` bits).
        remote_features: u32,
        /// IK only: the ticket handed over in message 2. A dialer received it (to redeem
        /// in a later message 1 to this peer); a responder gave it (the driver's
        /// [`guard::Guard::issue`] must hear of it, or it proves nothing).
        ticket: Option<Ticket>,
    },
    /// A complete message arrived.
    Message(Message),
    /// A large Request or Reply began to arrive (its header is in, more chunks follow).
    /// Reported once per message: while it arrives, the connection is busy, and a timer
    /// waiting for that message should wait on; the connection itself fails with
    /// [`ConnError::Stalled`] if the message stops arriving.
    Receiving {
        /// Its kind (Request or Reply).
        kind: Kind,
        /// Its exchange.
        exchange: ExchangeId,
        /// Its attempt.
        attempt: u32,
    },
    /// The peer started a message larger than our limit; its chunks are being discarded.
    Oversized {
        /// Kind of that message.
        kind: Kind,
        /// Its exchange, if it has one.
        exchange: Option<ExchangeId>,
        /// Its attempt, if it has one.
        attempt: Option<u32>,
        /// Announced length.
        len: usize,
    },
    /// Responder: a Request rode in the dialer's IK message 1 (reported right after
    /// `Established`), stamped with the dialer's wall clock. Whether it is fresh or a replay
    /// is the endpoint's call ([`crate::Endpoint`] keeps the timestamps).
    Early {
        /// The dialer's wall clock when it sent message 1, in Unix milliseconds.
        sent_unix_ms: u64,
        /// The Request.
        message: Message,
    },
    /// The connection is over; the driver flushes pending transmits, then drops the stream.
    Closed(Closed),
}

enum Outgoing {
    /// Ready to write (handshake messages, and chunks sealed before the session ended).
    Sealed(Vec<u8>),
    /// A message whose chunks are cut and encrypted as they are pulled.
    Message(Chunker),
}

enum State {
    /// Dialer, after sending message 1 (XX).
    AwaitingMsg2(Box<HandshakeState>),
    /// Dialer, after sending message 1 (IK): message 2 finishes the handshake.
    AwaitingIkMsg2(Box<HandshakeState>),
    /// Responder, before message 1: which pattern it is decides the handshake built.
    AwaitingMsg1(Box<Responding>),
    /// Responder, after sending message 2.
    AwaitingMsg3(Box<HandshakeState>),
    /// Handshake done.
    Established {
        session: Box<TransportState>,
        reassembler: Reassembler,
    },
    Closed,
}

/// What a responder needs to answer either pattern's first message.
struct Responding {
    keypair: Keypair,
    seed: [u8; 32],
}

/// What an IK dial knows and carries (see [`Connection::dial_ik`]).
#[derive(Debug, Clone, Copy)]
pub struct IkDial<'a> {
    /// The responder's static public key; it must hash to the peer id dialed.
    pub key: &'a [u8; KEY_LEN],
    /// A Request to carry in message 1, with the dialer's wall clock in Unix milliseconds,
    /// strictly increasing per responder; its encoding must be at most [`EARLY_MAX_LEN`]
    /// bytes.
    pub early: Option<(u64, &'a Message)>,
    /// A ticket this responder gave us, to prove who we are before its Diffie-Hellman.
    pub ticket: Option<Ticket>,
}

/// Dialer, IK: message 1 as sent, to send again proving a cookie.
struct IkSent {
    /// The Noise message, without the envelope.
    noise: Vec<u8>,
    /// The whole frame last sent (its mac1 is the cookie reply's associated data).
    frame: Vec<u8>,
    key: [u8; KEY_LEN],
}

/// Cookie replies a dialer follows, and a responder sends, on one connection: one is all a
/// well-behaved pair needs (a cookie is valid for two periods).
const MAX_COOKIE_REPLIES: u8 = 2;

/// One connection's protocol state. See the module docs for the call order.
pub struct Connection {
    remote: Remote,
    /// The dialer's expectation; `None` on the responder.
    expected: Option<PeerId>,
    state: State,
    max_message_size: usize,
    handshake_deadline: Option<Instant>,
    /// The dialer's advertised limit, read from message 1 (responder only).
    dialer_max_message_size: usize,
    /// The dialer's feature bits, from its hello (responder only).
    dialer_features: u32,
    /// What to write, in order. Chunks are encrypted when the driver pulls them, so a large
    /// message's encryption overlaps its transmission (and the peer's decryption) instead of
    /// all happening before the first byte leaves.
    transmits: VecDeque<Outgoing>,
    events: VecDeque<ConnEvent>,
    /// Plaintext of the frame being read. Grows to what arrives and is released between
    /// messages: a permanent 64 KiB buffer per connection would dominate an idle
    /// connection's memory.
    plain: Vec<u8>,
    /// Plaintext of the chunk being sealed; released between messages like `plain`.
    chunk: Vec<u8>,
    /// Whether `Closed` was reported. Separate from `state`, which `frame` takes out while it
    /// works, so an error found mid-transition is still reported.
    closed_reported: bool,
    /// What we ask the remote for in our hello: a `Progress` at least this often while a
    /// large message of ours arrives there.
    progress_ms: u32,
    /// What the remote asked for in its hello (`None`: it does not understand `Progress`).
    remote_progress: Option<std::time::Duration>,
    /// The large message arriving, once reported (`ConnEvent::Receiving`).
    arriving: Option<(ExchangeId, u32)>,
    /// When the next `Progress` about it may go.
    next_progress: Option<Instant>,
    /// A message that stops arriving fails the connection at this instant.
    transfer_deadline: Option<Instant>,
    /// How long a message may stop arriving (`Config::write_stall_timeout`).
    stall: std::time::Duration,
    /// The last Request or Reply queued to send: (exchange, attempt, encoded length, the
    /// most the peer said it received). A `Progress` counts only if it names it and says
    /// more arrived than before (never more than there is), so a peer cannot keep our
    /// timers waiting by repeating itself.
    sending: Option<(ExchangeId, u32, u64, u64)>,
    /// Responder: behave as a version-1 node did (XX only, no IK feature announced).
    xx_only: bool,
    /// Dialer, IK: message 1 as sent.
    ik_sent: Option<Box<IkSent>>,
    /// Cookie replies followed (dialer) or sent (responder).
    cookie_replies: u8,
    /// Responder: the peer whose ticket message 1 redeemed ([`Connection::proven_by_ticket`]);
    /// the handshake fails if another key made it.
    ticket_peer: Option<PeerId>,
}

/// The interval a node asks its peers to send `Progress` at: a quarter of the shorter of
/// the two timers that wait for news of a message it sends (`ack_timeout` for its Requests,
/// `reply_ack_timeout` for its Replies), at least 1 ms.
pub fn progress_interval(config: &Config) -> std::time::Duration {
    (config.ack_timeout.min(config.reply_ack_timeout) / 4).max(std::time::Duration::from_millis(1))
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("remote", &self.remote)
            .field("established", &self.is_established())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Starts the dialer side: queues handshake message 1. `seed` feeds the ephemeral key.
    pub fn dial(
        keypair: &Keypair,
        expected: PeerId,
        addr: SocketAddr,
        seed: [u8; 32],
        config: &Config,
        now: Instant,
    ) -> Result<Self, ConnError> {
        let remote = Remote {
            addr,
            peer: Some(expected),
        };
        let hs = handshake(keypair, HandshakeRole::Initiator, seed)
            .map_err(|e| handshake_error(remote, e))?;
        let mut conn = Self::new(remote, Some(expected), State::Closed, config, now);
        conn.state = State::AwaitingMsg2(Box::new(hs));
        let hello = conn.hello();
        conn.write_handshake(&hello)?;
        Ok(conn)
    }

    /// Starts the dialer side with the IK pattern, for a responder whose static public key
    /// the dialer knows (`ik.key`): message 1 carries the dialer's identity and hello (and
    /// `ik.early`'s Request), wrapped in [`guard`]'s envelope, and message 2 finishes the
    /// handshake. A responder that predates IK fails message 1 and closes the stream
    /// without a word; the dialer's owner then dials it with XX ([`Connection::dial`]).
    pub fn dial_ik(
        keypair: &Keypair,
        addr: SocketAddr,
        seed: [u8; 32],
        config: &Config,
        now: Instant,
        ik: IkDial<'_>,
    ) -> Result<Self, ConnError> {
        let expected = PeerId::from_public_key(ik.key);
        let remote = Remote {
            addr,
            peer: Some(expected),
        };
        let mut hs = handshake_ik(keypair, HandshakeRole::Initiator, seed, Some(ik.key))
            .map_err(|e| handshake_error(remote, e))?;
        let mut conn = Self::new(remote, Some(expected), State::Closed, config, now);
        let mut payload = conn.hello().to_vec();
        if let Some((sent_unix_ms, request)) = ik.early {
            let encoded = request.encode();
            if encoded.len() > EARLY_MAX_LEN || !matches!(request, Message::Request { .. }) {
                return Err(ConnError::NotOpen { remote });
            }
            payload.extend_from_slice(&sent_unix_ms.to_be_bytes());
            payload.extend_from_slice(&encoded);
        }
        let mut noise = vec![0u8; payload.len() + 2 * 32 + 2 * TAG_LEN];
        let n = hs
            .write_message(&payload, &mut noise)
            .map_err(|e| handshake_error(remote, e))?;
        noise.truncate(n);
        let frame = guard::seal_message_1(&noise, ik.key, ik.ticket.as_ref(), None);
        conn.transmits.push_back(Outgoing::Sealed(frame.clone()));
        conn.ik_sent = Some(Box::new(IkSent {
            noise,
            frame,
            key: *ik.key,
        }));
        conn.state = State::AwaitingIkMsg2(Box::new(hs));
        Ok(conn)
    }

    /// Starts the dialer side as an [`crate::Output::Dial`] says: IK when it gives the
    /// responder's key (which must hash to `peer`; one that does not is ignored), XX
    /// otherwise. Every driver dials through this one door.
    pub fn dial_with(
        keypair: &Keypair,
        peer: PeerId,
        addr: SocketAddr,
        seed: [u8; 32],
        config: &Config,
        now: Instant,
        ik: Option<IkDial<'_>>,
    ) -> Result<Self, ConnError> {
        match ik {
            Some(ik) if PeerId::from_public_key(ik.key) == peer => {
                Self::dial_ik(keypair, addr, seed, config, now, ik)
            }
            _ => Self::dial(keypair, peer, addr, seed, config, now),
        }
    }

    /// Starts the responder side of an accepted stream from `addr`. It answers an XX or an
    /// IK first message, whichever arrives.
    pub fn accept(
        keypair: &Keypair,
        addr: SocketAddr,
        seed: [u8; 32],
        config: &Config,
        now: Instant,
    ) -> Result<Self, ConnError> {
        let remote = Remote { addr, peer: None };
        let responding = Responding {
            keypair: keypair.clone(),
            seed,
        };
        Ok(Self::new(
            remote,
            None,
            State::AwaitingMsg1(Box::new(responding)),
            config,
            now,
        ))
    }

    /// A responder that predates IK (protocol version 1 as first published): it takes
    /// every first message for XX's. For tests of the negotiation.
    #[doc(hidden)]
    pub fn accept_xx_only(
        keypair: &Keypair,
        addr: SocketAddr,
        seed: [u8; 32],
        config: &Config,
        now: Instant,
    ) -> Result<Self, ConnError> {
        let mut conn = Self::accept(keypair, addr, seed, config, now)?;
        conn.xx_only = true;
        Ok(conn)
    }

    fn new(
        remote: Remote,
        expected: Option<PeerId>,
        state: State,
        config: &Config,
        now: Instant,
    ) -> Self {
        Self {
            remote,
            expected,
            state,
            max_message_size: config.max_message_size,
            handshake_deadline: Some(now + config.handshake_timeout),
            dialer_max_message_size: 0,
            dialer_features: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            plain: Vec::new(),
            chunk: Vec::new(),
            closed_reported: false,
            progress_ms: u32::try_from(progress_interval(config).as_millis()).unwrap_or(u32::MAX),
            remote_progress: None,
            arriving: None,
            next_progress: None,
            transfer_deadline: None,
            stall: config.write_stall_timeout,
            sending: None,
            xx_only: false,
            ik_sent: None,
            cookie_replies: 0,
            ticket_peer: None,
        }
    }

    fn hello(&self) -> [u8; Hello::LEN] {
        Hello {
            version: PROTOCOL_VERSION,
            max_message_size: u32::try_from(self.max_message_size).unwrap_or(u32::MAX),
            progress_ms: self.progress_ms,
            features: if self.xx_only {
                FEATURES & !FEATURE_IK
            } else {
                FEATURES
            },
        }
        .encode()
    }

    /// The remote end (address, and peer once known).
    pub fn remote(&self) -> Remote {
        self.remote
    }

    /// Whether the handshake is done and the connection is not closed.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established { .. })
    }

    /// Whether the connection is over (pending transmits may remain to flush).
    pub fn is_closed(&self) -> bool {
        self.closed_reported
    }

    /// Responder, before message 1 is handled: the driver's [`guard::Guard`] found that it
    /// redeems a ticket issued to `peer`. The handshake fails unless `peer`'s key made it.
    pub fn proven_by_ticket(&mut self, peer: PeerId) {
        self.ticket_peer = Some(peer);
    }

    /// Responder: the ticket this connection's message 2 hands its dialer, and to whom,
    /// once the handshake authenticated and allowed it (its `Established` is pending or
    /// was taken). The driver registers it with its guard before message 2 leaves, so the
    /// dialer can never redeem it before the guard knows it.
    pub fn issued_ticket(&self) -> Option<(PeerId, Ticket)> {
        self.events.iter().find_map(|event| match event {
            ConnEvent::Established {
                peer,
                ticket: Some(ticket),
                ..
            } if self.expected.is_none() => Some((*peer, *ticket)),
            _ => None,
        })
    }

    /// Whether [`Connection::send_cookie_reply`] would send one (before the driver asks
    /// its guard to make it).
    pub fn may_send_cookie_reply(&self) -> bool {
        matches!(self.state, State::AwaitingMsg1(_)) && self.cookie_replies < MAX_COOKIE_REPLIES
    }

    /// Responder, instead of handling message 1: answer it with `reply` (from
    /// [`guard::Guard::cookie_reply`]) and wait for the dialer to send it again. False,
    /// and nothing queued, once [`MAX_COOKIE_REPLIES`] went on this connection or past
    /// message 1: the driver closes it.
    pub fn send_cookie_reply(&mut self, reply: Vec<u8>) -> bool {
        if !self.may_send_cookie_reply() {
            return false;
        }
        self.cookie_replies += 1;
        self.transmits.push_back(Outgoing::Sealed(reply));
        true
    }

    /// Input: one frame body read from the stream (without its length prefix), at `now`.
    /// The allow list is consulted when the responder learns who the dialer is.
    pub fn handle_frame(&mut self, frame: &[u8], allow: &AllowList, now: Instant) {
        if let Err(error) = self.frame(frame, allow, now) {
            self.fail(error);
        }
    }

    /// Input: time passed. Closes the connection if its handshake is overdue, or if a
    /// message stopped arriving part-way.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self
            .handshake_deadline
            .is_some_and(|deadline| now >= deadline)
        {
            self.fail(ConnError::HandshakeTimeout {
                remote: self.remote,
            });
        } else if self
            .transfer_deadline
            .is_some_and(|deadline| now >= deadline)
        {
            self.fail(ConnError::Stalled {
                remote: self.remote,
                stalled: self.stall,
            });
        }
    }

    /// Command: queues a message (its chunks are encrypted as they are pulled).
    pub fn send(&mut self, message: &Message) -> Result<(), ConnError> {
        if !matches!(self.state, State::Established { .. }) {
            return Err(ConnError::NotOpen {
                remote: self.remote,
            });
        }
        if let Message::Request {
            exchange, attempt, ..
        }
        | Message::Reply {
            exchange, attempt, ..
        } = message
        {
            let len = message.encoded_len() as u64;
            self.sending = Some((*exchange, *attempt, len, 0));
        }
        self.transmits
            .push_back(Outgoing::Message(Chunker::new(message)));
        Ok(())
    }

    /// Command: sends `Close{reason}` if the session is up, then closes.
    pub fn close(&mut self, reason: CloseReason) {
        if self.is_established() {
            // Sending can only fail if not established, which was just checked.
            let _ = self.send(&Message::Close { reason });
        }
        self.close_quietly(reason);
    }

    /// Input: closes the connection without a Close message: what a Close lost on its way
    /// looks like (the driver drops the stream, so the peer sees it end). For fault
    /// injection; [`Connection::close`] is the way to close.
    pub fn close_quietly(&mut self, reason: CloseReason) {
        self.seal_pending();
        if !self.closed_reported {
            self.closed_reported = true;
            self.state = State::Closed;
            self.handshake_deadline = None;
            self.transfer_deadline = None;
            self.events
                .push_back(ConnEvent::Closed(Closed::Locally(reason)));
        }
    }

    /// Output: the next frame body to write (the driver adds the 2-byte length prefix).
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        let mut frame = Vec::new();
        self.poll_transmit_into(&mut frame)?;
        Some(frame)
    }

    /// Output: appends the next frame body to `out` (a driver's write buffer, so a chunk is
    /// encrypted straight into it); returns the body's length, at most `MAX_FRAME_LEN`, or
    /// `None` when nothing is queued.
    pub fn poll_transmit_into(&mut self, out: &mut impl FrameBuf) -> Option<usize> {
        loop {
            match self.transmits.front_mut()? {
                Outgoing::Sealed(_) => {
                    let Some(Outgoing::Sealed(frame)) = self.transmits.pop_front() else {
                        return None;
                    };
                    out.append(&frame);
                    return Some(frame.len());
                }
                Outgoing::Message(chunker) => {
                    if !chunker.next_into(&mut self.chunk) {
                        // All sent; the next message cuts its own first chunk.
                        self.transmits.pop_front();
                        self.shrink_chunk();
                        continue;
                    }
                    let sealed = self.seal_chunk_into(out);
                    if sealed.is_none() {
                        // The session is gone (a failure): nothing queued can be sent.
                        self.transmits.clear();
                    }
                    return sealed;
                }
            }
        }
    }

    /// Encrypts `self.chunk` onto the end of `out`; returns the frame's length.
    fn seal_chunk_into(&mut self, out: &mut impl FrameBuf) -> Option<usize> {
        let State::Established { session, .. } = &mut self.state else {
            return None;
        };
        let start = out.end();
        out.set_len_zeroed(start + self.chunk.len() + TAG_LEN);
        match session.write_message(&self.chunk, &mut out.bytes_mut()[start..]) {
            Ok(n) => {
                out.set_len_zeroed(start + n);
                Some(n)
            }
            Err(_) => {
                out.set_len_zeroed(start);
                None
            }
        }
    }

    /// Gives back a large chunk buffer once nothing is left to seal.
    fn shrink_chunk(&mut self) {
        if self.chunk.capacity() > SMALL_FRAME {
            self.chunk = Vec::new();
        }
    }

    /// Encrypts every queued chunk now, before the session is dropped.
    fn seal_pending(&mut self) {
        let pending = std::mem::take(&mut self.transmits);
        for item in pending {
            match item {
                Outgoing::Sealed(frame) => self.transmits.push_back(Outgoing::Sealed(frame)),
                Outgoing::Message(mut chunker) => {
                    while chunker.next_into(&mut self.chunk) {
                        let mut frame = Vec::new();
                        if self.seal_chunk_into(&mut frame).is_none() {
                            break;
                        }
                        self.transmits.push_back(Outgoing::Sealed(frame));
                    }
                }
            }
        }
        self.shrink_chunk();
    }

    /// Output: the next event.
    pub fn poll_event(&mut self) -> Option<ConnEvent> {
        self.events.pop_front()
    }

    /// Output: when `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.handshake_deadline, self.transfer_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn fail(&mut self, error: ConnError) {
        if self.closed_reported {
            return;
        }
        // Whatever is queued and can still be encrypted goes out (e.g. Close{NotAllowed}).
        self.seal_pending();
        self.closed_reported = true;
        self.state = State::Closed;
        self.handshake_deadline = None;
        self.transfer_deadline = None;
        self.events
            .push_back(ConnEvent::Closed(Closed::Error(error)));
    }

    fn write_handshake(&mut self, payload: &[u8]) -> Result<(), ConnError> {
        let remote = self.remote;
        let mut state = std::mem::replace(&mut self.state, State::Closed);
        let written = match &mut state {
            State::AwaitingMsg2(hs) | State::AwaitingIkMsg2(hs) | State::AwaitingMsg3(hs) => {
                self.write_handshake_with(hs, payload)
            }
            _ => Err(ConnError::NotOpen { remote }),
        };
        self.state = state;
        written
    }

    fn write_handshake_with(
        &mut self,
        hs: &mut HandshakeState,
        payload: &[u8],
    ) -> Result<(), ConnError> {
        // Largest handshake message: two keys, two tags, and the payload.
        let mut frame = vec![0u8; payload.len() + 2 * 32 + 2 * TAG_LEN];
        let n = hs
            .write_message(payload, &mut frame)
            .map_err(|e| handshake_error(self.remote, e))?;
        frame.truncate(n);
        self.transmits.push_back(Outgoing::Sealed(frame));
        Ok(())
    }

    fn frame(&mut self, frame: &[u8], allow: &AllowList, now: Instant) -> Result<(), ConnError> {
        if frame.is_empty() || frame.len() > MAX_FRAME_LEN {
            // Nothing was decrypted, so an established session is still usable.
            self.close_for_violation();
            return Err(ConnError::BadFrame {
                remote: self.remote,
                len: frame.len(),
            });
        }
        let remote = self.remote;
        match std::mem::replace(&mut self.state, State::Closed) {
            // Late frames after close are ignored.
            State::Closed => Ok(()),
            State::AwaitingMsg1(responding) => {
                // XX's first message carries the hello in clear after the ephemeral key;
                // IK's carries the dialer's encrypted static key there.
                let xx = self.xx_only || guard::is_xx_message_1(frame);
                if !xx {
                    return self.ik_message_1(&responding, frame, allow);
                }
                let mut hs = handshake(
                    &responding.keypair,
                    HandshakeRole::Responder,
                    responding.seed,
                )
                .map(Box::new)
                .map_err(|e| handshake_error(remote, e))?;
                drop(responding);
                let theirs = self.read_hello(&mut hs, frame)?;
                self.dialer_max_message_size = theirs.max_message_size as usize;
                self.dialer_features = theirs.features;
                self.remote_progress = progress_of(theirs);
                self.state = State::AwaitingMsg3(hs);
                // Answer with our hello even on a version mismatch, so the dialer can report
                // the incompatibility instead of an unexplained disconnect.
                let hello = self.hello();
                self.write_handshake(&hello)?;
                check_version(remote, theirs)
            }
            State::AwaitingIkMsg2(mut hs) => {
                if guard::is_cookie_reply(frame) {
                    self.state = State::AwaitingIkMsg2(hs);
                    return self.follow_cookie_reply(frame);
                }
                // Only the holder of the key we dialed can make message 2 decrypt.
                let n = hs
                    .read_message(frame, self.plain_buffer(frame.len()))
                    .map_err(|e| handshake_error(remote, e))?;
                let read = read_ik_reply(&self.plain[..n]);
                self.shrink_plain();
                let (theirs, ticket) =
                    read.map_err(|detail| ConnError::Handshake { remote, detail })?;
                self.remote_progress = progress_of(theirs);
                check_version(remote, theirs)?;
                let peer = self.expected.ok_or(ConnError::NotOpen { remote })?;
                let key = self
                    .ik_sent
                    .take()
                    .map(|sent| sent.key)
                    .ok_or(ConnError::NotOpen { remote })?;
                self.establish(hs)?;
                self.events.push_back(ConnEvent::Established {
                    peer,
                    key,
                    remote_max_message_size: theirs.max_message_size as usize,
                    remote_features: theirs.features,
                    ticket,
                });
                Ok(())
            }
            State::AwaitingMsg2(mut hs) => {
                let theirs = self.read_hello(&mut hs, frame)?;
                self.remote_progress = progress_of(theirs);
                let (actual, key) = remote_identity(&hs, remote)?;
                if Some(actual) != self.expected {
                    // Abort before message 3: an impostor never learns who we are.
                    return Err(ConnError::Impostor { remote, actual });
                }
                check_version(remote, theirs)?;
                self.state = State::AwaitingMsg3(hs);
                self.write_handshake(&[])?;
                let State::AwaitingMsg3(hs) = std::mem::replace(&mut self.state, State::Closed)
                else {
                    return Err(ConnError::NotOpen { remote });
                };
                self.establish(hs)?;
                self.events.push_back(ConnEvent::Established {
                    peer: actual,
                    key,
                    remote_max_message_size: theirs.max_message_size as usize,
                    remote_features: theirs.features,
                    ticket: None,
                });
                Ok(())
            }
            State::AwaitingMsg3(mut hs) => {
                self.plain.resize(frame.len(), 0);
                let read = hs.read_message(frame, &mut self.plain);
                self.shrink_plain();
                read.map_err(|e| handshake_error(remote, e))?;
                let (peer, key) = remote_identity(&hs, remote)?;
                self.remote.peer = Some(peer);
                self.admit_dialer(hs, peer, key, None, allow)
            }
            State::Established {
                mut session,
                mut reassembler,
            } => {
                let n = session
                    .read_message(frame, self.plain_buffer(frame.len()))
                    .map_err(|_| ConnError::Decrypt { remote })?;
                let result = reassembler.push(&self.plain[..n]);
                if !matches!(result, Ok(Reassembled::Pending)) {
                    // Between messages: keep an idle connection small. Within a large
                    // message the buffer is reused for every chunk.
                    self.shrink_plain();
                }
                self.state = State::Established {
                    session,
                    reassembler,
                };
                let reassembled = match result {
                    Ok(reassembled) => reassembled,
                    Err(source) => {
                        // The chunk decrypted, so the session is intact: the peer hears why.
                        self.close_for_violation();
                        return Err(ConnError::Protocol { remote, source });
                    }
                };
                if matches!(reassembled, Reassembled::Pending) {
                    self.still_arriving(now);
                } else {
                    self.arriving = None;
                    self.next_progress = None;
                    self.transfer_deadline = None;
                }
                match reassembled {
                    Reassembled::Pending => {}
                    Reassembled::Message(Message::Close { reason }) => {
                        self.seal_pending();
                        self.state = State::Closed;
                        self.closed_reported = true;
                        self.handshake_deadline = None;
                        self.events
                            .push_back(ConnEvent::Closed(Closed::ByPeer(reason)));
                    }
                    Reassembled::Message(Message::Progress {
                        exchange,
                        attempt,
                        received,
                    }) => {
                        let fresh = match &mut self.sending {
                            Some((x, a, len, reported))
                                if *x == exchange
                                    && *a == attempt
                                    && received > *reported
                                    && received <= *len =>
                            {
                                *reported = received;
                                true
                            }
                            _ => false,
                        };
                        // A stale or repeated Progress is dropped: it says nothing new.
                        if fresh {
                            self.events.push_back(ConnEvent::Message(Message::Progress {
                                exchange,
                                attempt,
                                received,
                            }));
                        }
                    }
                    Reassembled::Message(message) => {
                        self.events.push_back(ConnEvent::Message(message));
                    }
                    Reassembled::Oversized {
                        kind,
                        exchange,
                        attempt,
                        len,
                    } => self.events.push_back(ConnEvent::Oversized {
                        kind,
                        exchange,
                        attempt,
                        len: len.saturating_sub(crate::wire::EXCHANGE_HEADER_LEN),
                    }),
                }
                Ok(())
            }
        }
    }

    /// A chunk of a large message arrived and more are to come: report the message once,
    /// push its stall deadline back, and tell a peer that asked for it how far it got.
    fn still_arriving(&mut self, now: Instant) {
        let State::Established { reassembler, .. } = &self.state else {
            return;
        };
        let Some((kind, exchange, attempt, received)) = reassembler.arriving() else {
            return;
        };
        if !matches!(kind, Kind::Request | Kind::Reply) {
            return;
        }
        self.transfer_deadline = Some(now + self.stall);
        if self.arriving != Some((exchange, attempt)) {
            self.arriving = Some((exchange, attempt));
            self.next_progress = None;
            self.events.push_back(ConnEvent::Receiving {
                kind,
                exchange,
                attempt,
            });
        }
        if let Some(interval) = self.remote_progress
            && self.next_progress.is_none_or(|next| now >= next)
        {
            self.next_progress = Some(now + interval);
            // Cannot fail: the session is established (checked above).
            let _ = self.send(&Message::Progress {
                exchange,
                attempt,
                received: received as u64,
            });
        }
    }

    /// Queues `Close{ProtocolViolation}` if the session can still carry it; the error that
    /// follows closes the connection and flushes it out.
    fn close_for_violation(&mut self) {
        if self.is_established() {
            // Cannot fail: the session was just checked to be established.
            let _ = self.send(&Message::Close {
                reason: CloseReason::ProtocolViolation,
            });
        }
    }

    /// The plaintext buffer, at least `len` bytes long (a plaintext is never longer than
    /// its ciphertext).
    fn plain_buffer(&mut self, len: usize) -> &mut [u8] {
        if self.plain.len() < len {
            self.plain.resize(len, 0);
        }
        &mut self.plain
    }

    /// Gives back a large buffer once a message is complete, so idle connections stay small.
    fn shrink_plain(&mut self) {
        if self.plain.capacity() > SMALL_FRAME {
            self.plain = Vec::new();
        }
    }

    /// The responder's side of IK: message 1 names and proves the dialer and carries its
    /// hello; message 2 answers, hands the dialer a ticket, and finishes the handshake.
    /// mac1 is checked before any Diffie-Hellman (the driver's guard checked it already,
    /// and mac2; this check stands for drivers without one). The allow list is checked as
    /// soon as the dialer is known; a dialer refused is answered (so it learns why and
    /// stops) and told `Close{NotAllowed}`, as after XX's message 3.
    fn ik_message_1(
        &mut self,
        responding: &Responding,
        frame: &[u8],
        allow: &AllowList,
    ) -> Result<(), ConnError> {
        let remote = self.remote;
        if !guard::mac1_matches(frame, &guard::mac1_key(responding.keypair.public_bytes())) {
            return Err(ConnError::Handshake {
                remote,
                detail: "IK message 1 with a wrong mac1 (not made with our public key)".to_owned(),
            });
        }
        let noise = &frame[..frame.len() - guard::ENVELOPE_LEN];
        let mut hs = handshake_ik(
            &responding.keypair,
            HandshakeRole::Responder,
            responding.seed,
            None,
        )
        .map(Box::new)
        .map_err(|e| handshake_error(remote, e))?;
        let n = hs
            .read_message(noise, self.plain_buffer(noise.len()))
            .map_err(|e| handshake_error(remote, e))?;
        let read = read_ik_payload(&self.plain[..n]);
        self.shrink_plain();
        let (theirs, early) = read.map_err(|detail| ConnError::Handshake { remote, detail })?;
        let (peer, key) = remote_identity(&hs, remote)?;
        self.remote.peer = Some(peer);
        if let Some(holder) = self.ticket_peer
            && holder != peer
        {
            return Err(ConnError::Handshake {
                remote: self.remote,
                detail: format!("redeemed a ticket issued to peer {}", holder.short()),
            });
        }
        self.dialer_max_message_size = theirs.max_message_size as usize;
        self.dialer_features = theirs.features;
        self.remote_progress = progress_of(theirs);
        let ticket = Ticket::derive(&responding.seed);
        let mut reply = self.hello().to_vec();
        reply.extend_from_slice(&ticket.encode());
        self.write_handshake_with(&mut hs, &reply)?;
        check_version(self.remote, theirs)?;
        self.admit_dialer(hs, peer, key, Some(ticket), allow)?;
        if let Some((sent_unix_ms, message)) = early {
            self.events.push_back(ConnEvent::Early {
                sent_unix_ms,
                message,
            });
        }
        Ok(())
    }

    /// Dialer, IK: the responder, under load, answered message 1 with a cookie reply. Send
    /// message 1 again with mac2 proving the cookie (and no ticket: one it did not take).
    fn follow_cookie_reply(&mut self, frame: &[u8]) -> Result<(), ConnError> {
        let remote = self.remote;
        let sent = self.ik_sent.as_mut().ok_or(ConnError::NotOpen { remote })?;
        if self.cookie_replies >= MAX_COOKIE_REPLIES {
            return Err(ConnError::Handshake {
                remote,
                detail: format!("more than {MAX_COOKIE_REPLIES} cookie replies"),
            });
        }
        let cookie = guard::open_cookie_reply(frame, &sent.key, &sent.frame).map_err(|detail| {
            ConnError::Handshake {
                remote,
                detail: detail.to_owned(),
            }
        })?;
        self.cookie_replies += 1;
        sent.frame = guard::seal_message_1(&sent.noise, &sent.key, None, Some(&cookie));
        self.transmits
            .push_back(Outgoing::Sealed(sent.frame.clone()));
        Ok(())
    }

    /// The responder's last step of either pattern: the dialer `peer` is authenticated and
    /// the handshake done. Established if the allow list lets it in from its address;
    /// otherwise told `Close{NotAllowed}` before the stream closes, so it fails for good.
    fn admit_dialer(
        &mut self,
        hs: Box<HandshakeState>,
        peer: PeerId,
        key: [u8; KEY_LEN],
        ticket: Option<Ticket>,
        allow: &AllowList,
    ) -> Result<(), ConnError> {
        let rejection = allow.check(&peer, self.remote.addr.ip()).err();
        self.establish(hs)?;
        if let Some(rejection) = rejection {
            self.send(&Message::Close {
                reason: CloseReason::NotAllowed,
            })?;
            return Err(ConnError::NotAllowed {
                remote: self.remote,
                rejection,
            });
        }
        self.events.push_back(ConnEvent::Established {
            peer,
            key,
            remote_max_message_size: self.dialer_max_message_size,
            remote_features: self.dialer_features,
            ticket,
        });
        Ok(())
    }

    /// Reads handshake message 1 or 2 and the hello it carries.
    fn read_hello(&mut self, hs: &mut HandshakeState, frame: &[u8]) -> Result<Hello, ConnError> {
        let remote = self.remote;
        let n = hs
            .read_message(frame, self.plain_buffer(frame.len()))
            .map_err(|e| handshake_error(remote, e))?;
        let hello = Hello::decode(&self.plain[..n]).map_err(|e| ConnError::Handshake {
            remote,
            detail: e.to_string(),
        });
        // A padded handshake message must not leave an idle connection holding its size.
        self.shrink_plain();
        hello
    }

    fn establish(&mut self, hs: Box<HandshakeState>) -> Result<(), ConnError> {
        let remote = self.remote;
        let session = hs
            .into_transport_mode()
            .map_err(|e| handshake_error(remote, e))?;
        self.state = State::Established {
            session: Box::new(session),
            reassembler: Reassembler::new(self.max_message_size),
        };
        self.handshake_deadline = None;
        Ok(())
    }
}

/// An IK message 2's payload: the responder's hello, then the ticket it hands over (a
/// responder may hand none).
fn read_ik_reply(payload: &[u8]) -> Result<(Hello, Option<Ticket>), String> {
    let hello = Hello::decode(payload).map_err(|e| e.to_string())?;
    match payload.get(Hello::LEN..).filter(|rest| !rest.is_empty()) {
        None => Ok((hello, None)),
        Some(rest) => Ticket::decode(rest)
            .map(|ticket| (hello, Some(ticket)))
            .ok_or_else(|| format!("a ticket of {} bytes (not {})", rest.len(), Ticket::LEN)),
    }
}

/// An IK message 1's payload: the dialer's hello, then, if the dialer sent a Request in
/// it, an 8-byte timestamp (Unix ms) and the encoded Request.
fn read_ik_payload(payload: &[u8]) -> Result<(Hello, Option<(u64, Message)>), String> {
    let hello = Hello::decode(payload).map_err(|e| e.to_string())?;
    let Some(rest) = payload.get(Hello::LEN..).filter(|rest| !rest.is_empty()) else {
        return Ok((hello, None));
    };
    let (stamp, encoded) = rest
        .split_first_chunk::<8>()
        .ok_or_else(|| "an early request without its timestamp".to_owned())?;
    if encoded.len() > EARLY_MAX_LEN {
        return Err(format!(
            "an early request of {} bytes (at most {EARLY_MAX_LEN})",
            encoded.len()
        ));
    }
    let message = Message::decode(bytes::Bytes::copy_from_slice(encoded))
        .map_err(|e| format!("early request: {e}"))?;
    if !matches!(message, Message::Request { .. }) {
        return Err(format!(
            "early {:?} message (only a Request may be)",
            message.kind()
        ));
    }
    Ok((hello, Some((u64::from_be_bytes(*stamp), message))))
}

/// Frames up to this size keep their read buffer between frames; larger ones release it.
const SMALL_FRAME: usize = 4096;

fn handshake_error(remote: Remote, error: snow::Error) -> ConnError {
    ConnError::Handshake {
        remote,
        detail: error.to_string(),
    }
}

/// The Progress interval a peer's hello asks for; `None` if it does not understand them.
fn progress_of(hello: Hello) -> Option<std::time::Duration> {
    (hello.progress_ms > 0).then(|| std::time::Duration::from_millis(u64::from(hello.progress_ms)))
}

fn check_version(remote: Remote, theirs: Hello) -> Result<(), ConnError> {
    if theirs.version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(ConnError::IncompatibleVersion {
            remote,
            theirs: theirs.version,
            ours: PROTOCOL_VERSION,
        })
    }
}

/// The remote's peer id and the static key it hashes.
fn remote_identity(
    hs: &HandshakeState,
    remote: Remote,
) -> Result<(PeerId, [u8; KEY_LEN]), ConnError> {
    let key: [u8; KEY_LEN] = hs
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| ConnError::Handshake {
            remote,
            detail: "no remote static key".to_owned(),
        })?;
    Ok((PeerId::from_public_key(&key), key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use crate::noise::{HandshakeRole, handshake};
    use crate::wire::{NackReason, chunk_message};

    struct Fixture {
        alice: Keypair,
        bob: Keypair,
        config: Config,
        now: Instant,
    }

    fn fixture() -> Fixture {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        Fixture {
            alice: Keypair::generate(&mut rng),
            bob: Keypair::generate(&mut rng),
            config: Config {
                max_message_size: 200_000,
                ..Config::default()
            },
            now: Instant::now(),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Moves every pending frame from `from` to `to`.
    fn pump(from: &mut Connection, to: &mut Connection, allow: &AllowList) -> usize {
        let mut n = 0;
        while let Some(frame) = from.poll_transmit() {
            to.handle_frame(&frame, allow, Instant::now());
            n += 1;
        }
        n
    }

    fn events(c: &mut Connection) -> Vec<ConnEvent> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    /// [`connect`], with both ends' `Established` events taken.
    fn established(f: &Fixture, bob_allows: &AllowList) -> (Connection, Connection) {
        let (mut d, mut r) = connect(f, bob_allows);
        events(&mut d);
        events(&mut r);
        (d, r)
    }

    /// Alice's dial to Bob and Bob's accepted end, before any frame moved.
    fn unconnected(f: &Fixture) -> (Connection, Connection) {
        let d = Connection::dial(
            &f.alice,
            f.bob.peer_id(),
            addr("10.0.0.2:7000"),
            [1; 32],
            &f.config,
            f.now,
        )
        .unwrap();
        let r =
            Connection::accept(&f.bob, addr("10.0.0.1:50000"), [2; 32], &f.config, f.now).unwrap();
        (d, r)
    }

    fn connect(f: &Fixture, bob_allows: &AllowList) -> (Connection, Connection) {
        let (mut d, mut r) = unconnected(f);
        let any = AllowList::allow_any_peer_insecure();
        while pump(&mut d, &mut r, bob_allows) + pump(&mut r, &mut d, &any) > 0 {}
        (d, r)
    }

    /// Seals `plain` as one chunk with `from`'s session and returns the frame, as a peer
    /// that writes whatever chunk it likes would.
    fn sealed(from: &mut Connection, plain: &[u8]) -> Vec<u8> {
        let State::Established { session, .. } = &mut from.state else {
            panic!("not established");
        };
        let mut frame = vec![0u8; plain.len() + TAG_LEN];
        let n = session.write_message(plain, &mut frame).unwrap();
        frame.truncate(n);
        frame
    }

    #[test]
    fn open_and_closed_are_reported_as_they_change() {
        let f = fixture();
        let allow = AllowList::from_peers([f.alice.peer_id()]);
        let mut r =
            Connection::accept(&f.bob, addr("10.0.0.1:50000"), [2; 32], &f.config, f.now).unwrap();
        assert!(!r.is_established() && !r.is_closed());
        let (mut d, mut r2) = connect(&f, &allow);
        assert!(d.is_established() && !d.is_closed());
        assert!(r2.is_established() && !r2.is_closed());
        d.close(CloseReason::Done);
        assert!(!d.is_established() && d.is_closed());
        pump(&mut d, &mut r2, &allow);
        assert!(!r2.is_established() && r2.is_closed());
        r.handle_timeout(f.now + f.config.handshake_timeout);
        assert!(!r.is_established() && r.is_closed());
    }

    #[test]
    fn violations_on_a_usable_session_are_answered_with_close_protocol_violation() {
        let f = fixture();
        let allow = AllowList::from_peers([f.alice.peer_id()]);
        // A malformed chunk that decrypts (reserved flag bits), and an empty frame.
        for bad in [Some(vec![0b100 | 0b11, 0, 0, 0, 1, 6]), None] {
            let (mut d, mut r) = established(&f, &allow);
            let frame = match &bad {
                Some(plain) => sealed(&mut d, plain),
                None => Vec::new(),
            };
            r.handle_frame(&frame, &allow, Instant::now());
            assert!(matches!(
                events(&mut r).as_slice(),
                [ConnEvent::Closed(Closed::Error(
                    ConnError::Protocol { .. } | ConnError::BadFrame { .. }
                ))]
            ));
            pump(&mut r, &mut d, &allow);
            assert_eq!(
                events(&mut d),
                vec![ConnEvent::Closed(Closed::ByPeer(
                    CloseReason::ProtocolViolation
                ))],
                "{bad:?}"
            );
        }
    }

    #[test]
    fn large_frames_do_not_leave_an_idle_connection_holding_their_size() {
        let f = fixture();
        let allow = AllowList::from_peers([f.alice.peer_id()]);
        // A padded message 1 (a hello may carry trailing bytes).
        let mut r =
            Connection::accept(&f.bob, addr("10.0.0.1:50000"), [2; 32], &f.config, f.now).unwrap();
        let mut hs = handshake(&f.alice, HandshakeRole::Initiator, [1; 32]).unwrap();
        let mut padded = Hello {
            version: PROTOCOL_VERSION,
            max_message_size: 1000,
            progress_ms: 0,
            features: 0,
        }
        .encode()
        .to_vec();
        padded.resize(60_000, 0);
        let mut msg1 = vec![0u8; 65_535];
        let n = hs.write_message(&padded, &mut msg1).unwrap();
        r.handle_frame(&msg1[..n], &allow, Instant::now());
        assert!(r.plain.capacity() <= SMALL_FRAME, "{}", r.plain.capacity());
        // A large message, once complete.
        let (mut d, mut r) = connect(&f, &allow);
        d.send(&Message::Request {
            exchange: ExchangeId(1),
            attempt: 1,
            payload: Bytes::from(vec![1u8; 100_000]),
        })
        .unwrap();
        pump(&mut d, &mut r, &allow);
        assert!(r.plain.capacity() <= SMALL_FRAME, "{}", r.plain.capacity());
    }

    #[test]
    fn frames_encrypted_into_a_write_buffer_follow_what_it_held() {
        let f = fixture();
        let allow = AllowList::from_peers([f.alice.peer_id()]);
        let (mut d, mut r) = established(&f, &allow);
        let big = Message::Request {
            exchange: ExchangeId(7),
            attempt: 1,
            payload: Bytes::from((0..150_000u32).map(|i| i as u8).collect::<Vec<_>>()),
        };
        let small = Message::Close {
            reason: CloseReason::Idle,
        };
        d.send(&big).unwrap();
        d.send(&small).unwrap();
        // As a driver does: frames appended to one buffer that already holds earlier bytes.
        let mut buffer = bytes::BytesMut::from(&b"earlier"[..]);
        let lens = drain_into(&mut d, &mut buffer);
        // 150 kB in 64 KiB chunks, then the Close.
        assert_eq!(lens.len(), 4, "{lens:?}");
        assert!(d.chunk.capacity() <= SMALL_FRAME, "{}", d.chunk.capacity());
        assert_eq!(&buffer[..7], b"earlier");
        feed(&mut r, &buffer[7..], &lens, &allow);
        assert_eq!(
            events(&mut r),
            vec![
                ConnEvent::Receiving {
                    kind: Kind::Request,
                    exchange: ExchangeId(7),
                    attempt: 1
                },
                ConnEvent::Message(big),
                ConnEvent::Closed(Closed::ByPeer(CloseReason::Idle))
            ]
        );
    }

    #[test]
    fn handshake_frames_append_to_either_kind_of_buffer() {
        let f = fixture();
        let allow = AllowList::from_peers([f.alice.peer_id()]);
        let any = AllowList::allow_any_peer_insecure();
        let (mut d, mut r) = unconnected(&f);
        // Message 1 through a Vec, 2 through a BytesMut, 3 through a Vec, each after bytes
        // the buffer held already; then a Request sealed into a Vec.
        let mut vec = b"x".to_vec();
        let lens = drain_into(&mut d, &mut vec);
        feed(&mut r, &vec[1..], &lens, &allow);
        let mut bytes = bytes::BytesMut::from(&b"yy"[..]);
        let lens = drain_into(&mut r, &mut bytes);
        feed(&mut d, &bytes[2..], &lens, &any);
        let mut vec = b"zzz".to_vec();
        let lens = drain_into(&mut d, &mut vec);
        feed(&mut r, &vec[3..], &lens, &allow);
        assert!(d.is_established() && r.is_established());
        events(&mut r);
        let request = Message::Request {
            exchange: ExchangeId(1),
            attempt: 1,
            payload: Bytes::from_static(b"over a vec"),
        };
        d.send(&request).unwrap();
        let mut vec = b"w".to_vec();
        let lens = drain_into(&mut d, &mut vec);
        feed(&mut r, &vec[1..], &lens, &allow);
        assert_eq!(events(&mut r), vec![ConnEvent::Message(request)]);
    }

    /// Appends every queued frame to `out`; their lengths.
    fn drain_into(c: &mut Connection, out: &mut impl FrameBuf) -> Vec<usize> {
        let mut lens = Vec::new();
        while let Some(len) = c.poll_transmit_into(out) {
            assert!(len <= MAX_FRAME_LEN);
            lens.push(len);
        }
        lens
    }

    /// Hands `to` the frames laid end to end in `bytes`.
    fn feed(to: &mut Connection, bytes: &[u8], lens: &[usize], allow: &AllowList) {
        let mut at = 0;
        for len in lens {
            to.handle_frame(&bytes[at..at + len], allow, Instant::now());
            at += len;
        }
        assert_eq!(at, bytes.len());
    }

    #[test]
    fn a_message_arriving_slowly_is_reported_paced_and_failed_if_it_stalls() {
        let f = fixture();
        let allow = AllowList::from_peers([f.alice.peer_id()]);
        let (mut d, mut r) = established(&f, &allow);
        let big = Message::Request {
            exchange: ExchangeId(4),
            attempt: 2,
            payload: Bytes::from(vec![3u8; 190_000]),
        };
        d.send(&big).unwrap();
        let frames: Vec<Vec<u8>> = std::iter::from_fn(|| d.poll_transmit()).collect();
        assert_eq!(frames.len(), 3);
        let interval = progress_interval(&f.config);
        let t0 = f.now;
        // The first frame: reported once, and the dialer (which asked in its hello) told.
        r.handle_frame(&frames[0], &allow, t0);
        assert_eq!(
            events(&mut r),
            vec![ConnEvent::Receiving {
                kind: Kind::Request,
                exchange: ExchangeId(4),
                attempt: 2
            }]
        );
        let progress = |c: &mut Connection| std::iter::from_fn(|| c.poll_transmit()).count();
        assert_eq!(progress(&mut r), 1, "a Progress at once");
        assert_eq!(r.poll_timeout(), Some(t0 + f.config.write_stall_timeout));
        // The second, sooner than the interval: no new Progress, not reported again, and
        // the stall deadline moves on.
        let t1 = t0 + interval / 2;
        r.handle_frame(&frames[1], &allow, t1);
        assert!(events(&mut r).is_empty());
        assert_eq!(progress(&mut r), 0);
        assert_eq!(r.poll_timeout(), Some(t1 + f.config.write_stall_timeout));
        // Then nothing: the transfer stalled, and the connection fails naming the peer.
        r.handle_timeout(t1 + f.config.write_stall_timeout);
        assert!(matches!(
            &events(&mut r)[..],
            [ConnEvent::Closed(Closed::Error(ConnError::Stalled { remote, .. }))]
                if remote.peer == Some(f.alice.peer_id())
        ));
    }

    #[test]
    fn the_progress_interval_asked_for_is_a_quarter_of_the_shorter_wait() {
        assert_eq!(
            progress_interval(&Config::default()),
            std::time::Duration::from_millis(500)
        );
        let quick = Config {
            reply_ack_timeout: std::time::Duration::from_millis(200),
            ..Config::default()
        };
        assert_eq!(
            progress_interval(&quick),
            std::time::Duration::from_millis(50)
        );
    }

    #[test]
    fn only_progress_that_says_something_new_is_reported() {
        let f = fixture();
        let allow = AllowList::from_peers([f.alice.peer_id()]);
        let (mut d, mut r) = established(&f, &allow);
        let request = Message::Request {
            exchange: ExchangeId(4),
            attempt: 2,
            payload: Bytes::from(vec![3u8; 1000]),
        };
        d.send(&request).unwrap();
        let len = request.encoded_len() as u64;
        let progress = |exchange, attempt, received| Message::Progress {
            exchange: ExchangeId(exchange),
            attempt,
            received,
        };
        // More each time, within the message: news. Repeated, less, beyond the message,
        // another attempt or exchange: dropped, so a peer cannot hold our timers.
        let said = [
            (progress(4, 2, 100), true),
            (progress(4, 2, 100), false),
            (progress(4, 2, 50), false),
            (progress(4, 1, 200), false),
            (progress(5, 2, 200), false),
            (progress(4, 2, len + 1), false),
            (progress(4, 2, len), true),
        ];
        for (message, news) in said {
            r.send(&message).unwrap();
            pump(&mut r, &mut d, &allow);
            let got = events(&mut d);
            assert_eq!(
                got == vec![ConnEvent::Message(message.clone())],
                news,
                "{message:?}: {got:?}"
            );
        }
    }

    #[test]
    fn a_peer_that_asked_for_no_progress_gets_none() {
        let f = fixture();
        let allow = AllowList::from_peers([f.alice.peer_id()]);
        let (mut d, mut r) = established(&f, &allow);
        // Alice predates Progress: her hello asked for none.
        r.remote_progress = progress_of(Hello {
            version: PROTOCOL_VERSION,
            max_message_size: 1,
            progress_ms: 0,
            features: 0,
        });
        d.send(&Message::Request {
            exchange: ExchangeId(4),
            attempt: 1,
            payload: Bytes::from(vec![3u8; 150_000]),
        })
        .unwrap();
        let frames: Vec<Vec<u8>> = std::iter::from_fn(|| d.poll_transmit()).collect();
        r.handle_frame(&frames[0], &allow, f.now);
        assert_eq!(events(&mut r).len(), 1, "reported to its own endpoint");
        assert!(r.poll_transmit().is_none(), "nothing sent to the peer");
    }

    #[test]
    fn handshake_authenticates_both_sides() {
        let f = fixture();
        let (mut d, mut r) = connect(&f, &AllowList::from_peers([f.alice.peer_id()]));
        assert_eq!(
            events(&mut d),
            vec![ConnEvent::Established {
                peer: f.bob.peer_id(),
                key: *f.bob.public_bytes(),
                remote_max_message_size: 200_000,
                remote_features: FEATURES,
                ticket: None,
            }]
        );
        assert!(matches!(
            events(&mut r).as_slice(),
            [ConnEvent::Established { peer, .. }] if *peer == f.alice.peer_id()
        ));
        assert_eq!(r.remote().peer, Some(f.alice.peer_id()));
        assert_eq!(d.poll_timeout(), None);
    }

    #[test]
    fn messages_cross_in_both_directions_including_large_ones() {
        let f = fixture();
        let allow = AllowList::from_peers([f.alice.peer_id()]);
        let (mut d, mut r) = established(&f, &allow);
        let big = Message::Request {
            exchange: ExchangeId(9),
            attempt: 1,
            payload: Bytes::from((0..150_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>()),
        };
        d.send(&big).unwrap();
        assert_eq!(
            pump(&mut d, &mut r, &allow),
            3,
            "150 kB spans three Noise messages"
        );
        // A message of several chunks is reported as it begins to arrive, then whole.
        assert_eq!(
            events(&mut r),
            vec![
                ConnEvent::Receiving {
                    kind: Kind::Request,
                    exchange: ExchangeId(9),
                    attempt: 1
                },
                ConnEvent::Message(big)
            ]
        );
        let nack = Message::Nack {
            exchange: ExchangeId(9),
            attempt: 1,
            reason: NackReason::Busy,
            retry_after_ms: 0,
        };
        r.send(&nack).unwrap();
        pump(&mut r, &mut d, &allow);
        // The dialer asked for Progress in its hello: it heard, as the first chunk came in,
        // that its large Request was arriving.
        assert_eq!(
            events(&mut d),
            vec![
                ConnEvent::Message(Message::Progress {
                    exchange: ExchangeId(9),
                    attempt: 1,
                    received: 65_514
                }),
                ConnEvent::Message(nack)
            ]
        );
    }

    #[test]
    fn impostor_is_detected_before_the_dialer_reveals_itself() {
        let f = fixture();
        let mallory = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(99));
        let mut d = Connection::dial(
            &f.alice,
            f.bob.peer_id(),
            addr("10.0.0.2:7000"),
            [1; 32],
            &f.config,
            f.now,
        )
        .unwrap();
        let mut m =
            Connection::accept(&mallory, addr("10.0.0.1:1"), [2; 32], &f.config, f.now).unwrap();
        let any = AllowList::allow_any_peer_insecure();
        pump(&mut d, &mut m, &any);
        pump(&mut m, &mut d, &any);
        let evs = events(&mut d);
        let [ConnEvent::Closed(Closed::Error(err))] = evs.as_slice() else {
            panic!("{evs:?}")
        };
        assert!(matches!(err, ConnError::Impostor { actual, .. } if *actual == mallory.peer_id()));
        assert!(err.to_string().contains("impostor"), "{err}");
        assert!(err.to_string().contains(&f.bob.peer_id().short()), "{err}");
        assert_eq!(
            d.poll_transmit(),
            None,
            "message 3 (our identity) is never sent"
        );
    }

    /// Alice's IK dial to Bob, whose key she knows, with `early` in message 1.
    fn alice_dials_bob_ik(
        f: &Fixture,
        early: Option<(u64, &Message)>,
    ) -> Result<Connection, ConnError> {
        Connection::dial_ik(
            &f.alice,
            addr("10.0.0.2:7000"),
            [1; 32],
            &f.config,
            f.now,
            IkDial {
                key: f.bob.public_bytes(),
                early,
                ticket: None,
            },
        )
    }

    /// Alice's IK dial to Bob (whose key she knows) and Bob's accepted end.
    fn unconnected_ik(f: &Fixture, xx_only: bool) -> (Connection, Connection) {
        let d = alice_dials_bob_ik(f, None).unwrap();
        let accept = if xx_only {
            Connection::accept_xx_only
        } else {
            Connection::accept
        };
        let r = accept(&f.bob, addr("10.0.0.1:50000"), [2; 32], &f.config, f.now).unwrap();
        (d, r)
    }

    #[test]
    fn ik_authenticates_both_sides_in_two_messages() {
        let f = fixture();
        let (mut d, mut r) = unconnected_ik(&f, false);
        let any = AllowList::allow_any_peer_insecure();
        // Message 1 names Alice: Bob is established on reading it, before answering.
        assert_eq!(pump(&mut d, &mut r, &any), 1);
        let evs = events(&mut r);
        assert!(
            matches!(evs.as_slice(), [ConnEvent::Established { peer, remote_features, .. }]
                if *peer == f.alice.peer_id() && remote_features & FEATURE_IK != 0),
            "{evs:?}"
        );
        assert_eq!(pump(&mut r, &mut d, &any), 1);
        let evs = events(&mut d);
        assert!(
            matches!(evs.as_slice(), [ConnEvent::Established { peer, remote_max_message_size, .. }]
                if *peer == f.bob.peer_id() && *remote_max_message_size == 200_000),
            "{evs:?}"
        );
        // And the session works both ways.
        let hi = Message::Close {
            reason: CloseReason::Done,
        };
        d.send(&hi).unwrap();
        pump(&mut d, &mut r, &any);
        assert_eq!(
            events(&mut r),
            vec![ConnEvent::Closed(Closed::ByPeer(CloseReason::Done))]
        );
    }

    #[test]
    fn a_request_rides_in_ik_message_1_after_the_hello_with_its_stamp() {
        let f = fixture();
        let request = Message::Request {
            exchange: ExchangeId(7),
            attempt: 1,
            payload: Bytes::from_static(b"0-rtt"),
        };
        let mut d = alice_dials_bob_ik(&f, Some((1_234, &request))).unwrap();
        let mut r =
            Connection::accept(&f.bob, addr("10.0.0.1:9"), [2; 32], &f.config, f.now).unwrap();
        let any = AllowList::allow_any_peer_insecure();
        assert_eq!(pump(&mut d, &mut r, &any), 1, "one flight");
        let evs = events(&mut r);
        assert!(
            matches!(evs.as_slice(), [
                ConnEvent::Established { .. },
                ConnEvent::Early { sent_unix_ms: 1_234, message },
            ] if *message == request),
            "{evs:?}"
        );
        // One exactly at the bound rides there too.
        let empty = Message::Request {
            exchange: ExchangeId(9),
            attempt: 1,
            payload: Bytes::new(),
        };
        let largest = Message::Request {
            exchange: ExchangeId(9),
            attempt: 1,
            payload: Bytes::from(vec![5; EARLY_MAX_LEN - empty.encoded_len()]),
        };
        assert_eq!(largest.encoded_len(), EARLY_MAX_LEN);
        let mut d = alice_dials_bob_ik(&f, Some((5, &largest))).unwrap();
        let mut r =
            Connection::accept(&f.bob, addr("10.0.0.1:9"), [2; 32], &f.config, f.now).unwrap();
        pump(&mut d, &mut r, &any);
        assert!(
            events(&mut r)
                .iter()
                .any(|e| matches!(e, ConnEvent::Early { message, .. } if *message == largest))
        );
        // Only a Request, and only a small one, may ride there.
        let ack = Message::Ack {
            exchange: ExchangeId(7),
            attempt: 1,
            of: crate::wire::AckOf::Request,
        };
        let big = Message::Request {
            exchange: ExchangeId(8),
            attempt: 1,
            payload: Bytes::from(vec![0; EARLY_MAX_LEN]),
        };
        for refused in [&ack, &big] {
            assert!(alice_dials_bob_ik(&f, Some((1, refused))).is_err());
        }
        // A responder reading anything else there fails the handshake, naming it.
        for (bytes, says) in [
            (&[0u8; 3][..], "timestamp"),
            (&[0u8; 9][..], "early request"),
        ] {
            let err = read_ik_payload(&[&f_hello()[..], bytes].concat()).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }

    fn f_hello() -> [u8; Hello::LEN] {
        Hello {
            version: PROTOCOL_VERSION,
            max_message_size: 1,
            progress_ms: 0,
            features: FEATURES,
        }
        .encode()
    }

    #[test]
    fn ik_to_an_unlisted_dialer_answers_and_says_not_allowed() {
        let f = fixture();
        let (mut d, mut r) = unconnected_ik(&f, false);
        let any = AllowList::allow_any_peer_insecure();
        pump(&mut d, &mut r, &AllowList::new());
        let evs = events(&mut r);
        assert!(
            matches!(
                evs.as_slice(),
                [ConnEvent::Closed(Closed::Error(ConnError::NotAllowed {
                    rejection: Rejection::NotListed,
                    ..
                }))]
            ),
            "{evs:?}"
        );
        pump(&mut r, &mut d, &any);
        let evs = events(&mut d);
        assert!(
            evs.contains(&ConnEvent::Closed(Closed::ByPeer(CloseReason::NotAllowed))),
            "{evs:?}"
        );
    }

    #[test]
    fn ik_to_the_wrong_key_fails_at_the_responder_and_reveals_nothing() {
        let f = fixture();
        let mallory = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(99));
        let mut d = alice_dials_bob_ik(&f, None).unwrap();
        let mut m =
            Connection::accept(&mallory, addr("10.0.0.1:1"), [2; 32], &f.config, f.now).unwrap();
        let any = AllowList::allow_any_peer_insecure();
        pump(&mut d, &mut m, &any);
        let evs = events(&mut m);
        assert!(
            matches!(
                evs.as_slice(),
                [ConnEvent::Closed(Closed::Error(
                    ConnError::Handshake { .. }
                ))]
            ),
            "{evs:?}"
        );
        assert_eq!(m.remote().peer, None, "Mallory learned who dialed");
        assert_eq!(m.poll_transmit(), None);
    }

    #[test]
    fn a_responder_that_predates_ik_fails_its_first_message_and_xx_still_works() {
        let f = fixture();
        let (mut d, mut r) = unconnected_ik(&f, true);
        let any = AllowList::allow_any_peer_insecure();
        pump(&mut d, &mut r, &any);
        let evs = events(&mut r);
        assert!(
            matches!(
                evs.as_slice(),
                [ConnEvent::Closed(Closed::Error(
                    ConnError::Handshake { .. }
                ))]
            ),
            "{evs:?}"
        );
        assert_eq!(r.poll_transmit(), None, "a v1 responder answers nothing");
        // Dialed with XX, it connects, and its hello says it takes no IK.
        let mut d = Connection::dial(
            &f.alice,
            f.bob.peer_id(),
            addr("10.0.0.2:7000"),
            [1; 32],
            &f.config,
            f.now,
        )
        .unwrap();
        let mut r =
            Connection::accept_xx_only(&f.bob, addr("10.0.0.1:5"), [2; 32], &f.config, f.now)
                .unwrap();
        while pump(&mut d, &mut r, &any) + pump(&mut r, &mut d, &any) > 0 {}
        let evs = events(&mut d);
        assert!(
            matches!(evs.as_slice(), [ConnEvent::Established { remote_features, .. }]
                if remote_features & FEATURE_IK == 0),
            "{evs:?}"
        );
    }

    #[test]
    fn responder_rejects_unlisted_peer_and_tells_it_why() {
        let f = fixture();
        let (mut d, mut r) = connect(&f, &AllowList::new());
        let evs = events(&mut r);
        let [ConnEvent::Closed(Closed::Error(err))] = evs.as_slice() else {
            panic!("{evs:?}")
        };
        assert!(matches!(
            err,
            ConnError::NotAllowed {
                rejection: Rejection::NotListed,
                ..
            }
        ));
        assert!(
            err.to_string().contains(&f.alice.peer_id().short()),
            "{err}"
        );
        let evs = events(&mut d);
        assert!(
            evs.contains(&ConnEvent::Closed(Closed::ByPeer(CloseReason::NotAllowed))),
            "{evs:?}"
        );
    }

    #[test]
    fn responder_rejects_peer_from_wrong_address() {
        let f = fixture();
        let mut allow = AllowList::new();
        allow.insert(
            f.alice.peer_id(),
            crate::allow_list::AllowedPeer {
                addresses: vec!["10.9.9.9".parse().unwrap()],
                ..Default::default()
            },
        );
        let (_, mut r) = connect(&f, &allow);
        assert!(matches!(
            events(&mut r).as_slice(),
            [ConnEvent::Closed(Closed::Error(ConnError::NotAllowed {
                rejection: Rejection::AddressNotAllowed(_),
                ..
            }))]
        ));
    }

    #[test]
    fn corrupted_frame_is_a_decrypt_error_naming_the_peer() {
        let f = fixture();
        let allow = AllowList::from_peers([f.alice.peer_id()]);
        let (mut d, mut r) = connect(&f, &allow);
        events(&mut r);
        d.send(&Message::Close {
            reason: CloseReason::Done,
        })
        .unwrap();
        let mut frame = d.poll_transmit().unwrap();
        frame[3] ^= 0x40;
        r.handle_frame(&frame, &allow, Instant::now());
        let evs = events(&mut r);
        let [ConnEvent::Closed(Closed::Error(err))] = evs.as_slice() else {
            panic!("{evs:?}")
        };
        assert!(matches!(err, ConnError::Decrypt { .. }));
        assert!(
            err.to_string().contains(&f.alice.peer_id().short()),
            "{err}"
        );
        assert!(r.is_closed());
    }

    #[test]
    fn garbage_handshake_and_bad_frames_are_errors_naming_the_address() {
        let f = fixture();
        let any = AllowList::allow_any_peer_insecure();
        for frame in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0u8; 32][..], &[][..]] {
            let mut r =
                Connection::accept(&f.bob, addr("192.0.2.7:4444"), [2; 32], &f.config, f.now)
                    .unwrap();
            r.handle_frame(frame, &any, Instant::now());
            let evs = events(&mut r);
            let [ConnEvent::Closed(Closed::Error(err))] = evs.as_slice() else {
                panic!("{evs:?}")
            };
            assert!(err.to_string().contains("192.0.2.7:4444"), "{err}");
        }
    }

    #[test]
    fn handshake_times_out() {
        let f = fixture();
        let mut r =
            Connection::accept(&f.bob, addr("10.0.0.1:1"), [2; 32], &f.config, f.now).unwrap();
        let deadline = r.poll_timeout().unwrap();
        r.handle_timeout(deadline - std::time::Duration::from_millis(1));
        assert!(events(&mut r).is_empty());
        r.handle_timeout(deadline);
        assert!(matches!(
            events(&mut r).as_slice(),
            [ConnEvent::Closed(Closed::Error(
                ConnError::HandshakeTimeout { .. }
            ))]
        ));
    }

    #[test]
    fn oversized_message_is_reported_with_its_exchange() {
        let f = fixture();
        let allow = AllowList::from_peers([f.alice.peer_id()]);
        let (mut d, mut r) = connect(&f, &allow);
        events(&mut r);
        let big = Message::Request {
            exchange: ExchangeId(5),
            attempt: 2,
            payload: Bytes::from(vec![0u8; 300_000]),
        };
        assert!(chunk_message(&big).len() > 1);
        d.send(&big).unwrap();
        pump(&mut d, &mut r, &allow);
        assert_eq!(
            events(&mut r),
            vec![ConnEvent::Oversized {
                kind: Kind::Request,
                exchange: Some(ExchangeId(5)),
                attempt: Some(2),
                len: 300_000
            }]
        );
        // The session stays usable.
        let small = Message::Ack {
            exchange: ExchangeId(6),
            attempt: 1,
            of: crate::wire::AckOf::Reply,
        };
        d.send(&small).unwrap();
        pump(&mut d, &mut r, &allow);
        assert_eq!(events(&mut r), vec![ConnEvent::Message(small)]);
    }

    #[test]
    fn close_is_delivered_and_ends_both_sides() {
        let f = fixture();
        let allow = AllowList::from_peers([f.alice.peer_id()]);
        let (mut d, mut r) = established(&f, &allow);
        d.close(CloseReason::Idle);
        assert!(d.is_closed());
        assert_eq!(
            events(&mut d),
            vec![ConnEvent::Closed(Closed::Locally(CloseReason::Idle))]
        );
        pump(&mut d, &mut r, &allow);
        assert_eq!(
            events(&mut r),
            vec![ConnEvent::Closed(Closed::ByPeer(CloseReason::Idle))]
        );
        assert!(
            d.send(&Message::Close {
                reason: CloseReason::Done
            })
            .is_err()
        );
    }

    /// A peer speaking another version, built from the raw Noise handshake.
    fn hello_v9() -> [u8; Hello::LEN] {
        Hello {
            version: 9,
            max_message_size: 1000,
            progress_ms: 0,
            features: 0,
        }
        .encode()
    }

    #[test]
    fn responder_reports_incompatible_version_after_answering() {
        let f = fixture();
        let mut fake = handshake(&f.alice, HandshakeRole::Initiator, [7; 32]).unwrap();
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let n = fake.write_message(&hello_v9(), &mut buf).unwrap();
        let mut r =
            Connection::accept(&f.bob, addr("10.0.0.1:1"), [2; 32], &f.config, f.now).unwrap();
        r.handle_frame(
            &buf[..n],
            &AllowList::allow_any_peer_insecure(),
            Instant::now(),
        );
        // Message 2 still goes out, so the dialer can tell what went wrong.
        assert!(r.poll_transmit().is_some());
        let evs = events(&mut r);
        let [ConnEvent::Closed(Closed::Error(err))] = evs.as_slice() else {
            panic!("{evs:?}")
        };
        assert!(matches!(
            err,
            ConnError::IncompatibleVersion {
                theirs: 9,
                ours: PROTOCOL_VERSION,
                ..
            }
        ));
        assert!(err.to_string().contains("10.0.0.1:1"), "{err}");
    }

    #[test]
    fn dialer_reports_incompatible_version_definitively() {
        let f = fixture();
        let mut d = Connection::dial(
            &f.alice,
            f.bob.peer_id(),
            addr("10.0.0.2:7000"),
            [1; 32],
            &f.config,
            f.now,
        )
        .unwrap();
        let mut fake = handshake(&f.bob, HandshakeRole::Responder, [8; 32]).unwrap();
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let msg1 = d.poll_transmit().unwrap();
        fake.read_message(&msg1, &mut buf).unwrap();
        let n = fake.write_message(&hello_v9(), &mut buf).unwrap();
        d.handle_frame(&buf[..n], &AllowList::new(), Instant::now());
        let evs = events(&mut d);
        let [ConnEvent::Closed(Closed::Error(err))] = evs.as_slice() else {
            panic!("{evs:?}")
        };
        assert!(matches!(
            err,
            ConnError::IncompatibleVersion { theirs: 9, .. }
        ));
        assert!(err.is_definite());
        assert!(err.to_string().contains(&f.bob.peer_id().short()), "{err}");
    }

    // ----- the envelope: mac1, cookies, tickets (`guard`) -----

    fn handshake_error_of(c: &mut Connection) -> String {
        let evs = events(c);
        match evs.as_slice() {
            [ConnEvent::Closed(Closed::Error(ConnError::Handshake { detail, .. }))] => {
                detail.clone()
            }
            _ => panic!("{evs:?}"),
        }
    }

    #[test]
    fn dial_with_uses_ik_only_with_a_key_of_the_peer_dialed() {
        let f = fixture();
        let carol = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(5));
        let to = addr("10.0.0.2:7000");
        let ik = |key| IkDial {
            key,
            early: None,
            ticket: None,
        };
        let (bob, now) = (f.bob.peer_id(), f.now);
        let mut d = Connection::dial_with(
            &f.alice,
            bob,
            to,
            [1; 32],
            &f.config,
            now,
            Some(ik(f.bob.public_bytes())),
        )
        .unwrap();
        assert!(
            !guard::is_xx_message_1(&d.poll_transmit().unwrap()),
            "IK with Bob's key"
        );
        // Carol's key for Bob's id: ignored, XX expecting Bob.
        let mut d = Connection::dial_with(
            &f.alice,
            bob,
            to,
            [1; 32],
            &f.config,
            now,
            Some(ik(carol.public_bytes())),
        )
        .unwrap();
        assert!(guard::is_xx_message_1(&d.poll_transmit().unwrap()));
        assert_eq!(d.remote().peer, Some(bob));
        let mut d =
            Connection::dial_with(&f.alice, bob, to, [1; 32], &f.config, now, None).unwrap();
        assert!(guard::is_xx_message_1(&d.poll_transmit().unwrap()));
    }

    #[test]
    fn the_responder_checks_mac1_before_any_diffie_hellman() {
        let f = fixture();
        let any = AllowList::allow_any_peer_insecure();
        let (mut d, mut r) = unconnected_ik(&f, false);
        let mut msg1 = d.poll_transmit().unwrap();
        assert_eq!(
            msg1.len(),
            guard::IK_MESSAGE_1_MIN,
            "the shortest is one with no request"
        );
        let at = msg1.len() - 2 * guard::MAC_LEN;
        msg1[at] ^= 1;
        r.handle_frame(&msg1, &any, f.now);
        assert!(handshake_error_of(&mut r).contains("mac1"));
        assert_eq!(r.remote().peer, None, "nothing was decrypted");
        assert_eq!(r.poll_transmit(), None);
        // A dialer with the wrong key for Bob makes a mac1 Bob refuses the same way.
        let mallory = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(99));
        let mut d = Connection::dial_ik(
            &f.alice,
            addr("10.0.0.2:7000"),
            [1; 32],
            &f.config,
            f.now,
            IkDial {
                key: mallory.public_bytes(),
                early: None,
                ticket: None,
            },
        )
        .unwrap();
        let mut r =
            Connection::accept(&f.bob, addr("10.0.0.1:2"), [2; 32], &f.config, f.now).unwrap();
        pump(&mut d, &mut r, &any);
        assert!(handshake_error_of(&mut r).contains("mac1"));
    }

    /// Alice's IK dial to Bob carrying `ticket`, Bob's accepted end guarded by `guard`:
    /// message 1 sorted by the guard as a driver would, then handled.
    fn ik_through_guard(
        f: &Fixture,
        dialer: &Keypair,
        ticket: Option<Ticket>,
        guard: &mut guard::Guard,
        seed: u8,
    ) -> (Connection, Connection, guard::FirstMessage) {
        let from = addr("10.0.0.1:50000");
        let mut d = Connection::dial_ik(
            dialer,
            addr("10.0.0.2:7000"),
            [seed; 32],
            &f.config,
            f.now,
            IkDial {
                key: f.bob.public_bytes(),
                early: None,
                ticket,
            },
        )
        .unwrap();
        let mut r =
            Connection::accept(&f.bob, from, [seed.wrapping_add(1); 32], &f.config, f.now).unwrap();
        let msg1 = d.poll_transmit().unwrap();
        let sorted = guard.classify(&msg1, from, f.now);
        if let guard::FirstMessage::Proven(peer) = sorted {
            r.proven_by_ticket(peer);
        }
        r.handle_frame(&msg1, &AllowList::allow_any_peer_insecure(), f.now);
        (d, r, sorted)
    }

    fn ticket_of(evs: &[ConnEvent]) -> Option<Ticket> {
        match evs {
            [ConnEvent::Established { ticket, .. }, ..] => *ticket,
            _ => panic!("{evs:?}"),
        }
    }

    #[test]
    fn message_2_hands_the_dialer_a_ticket_that_proves_it_in_its_next_message_1() {
        let f = fixture();
        let any = AllowList::allow_any_peer_insecure();
        let mut bob_guard = guard::Guard::new(f.bob.public_bytes(), [3; 32], f.now);
        let (mut d, mut r, sorted) = ik_through_guard(&f, &f.alice, None, &mut bob_guard, 1);
        assert_eq!(sorted, guard::FirstMessage::Unproven { cookie: false });
        // The driver can register it before message 2 leaves.
        let issued = r.issued_ticket().expect("issued");
        assert_eq!(issued.0, f.alice.peer_id());
        assert_eq!(d.issued_ticket(), None, "a dialer issues none");
        let given = ticket_of(&events(&mut r)).expect("Bob hands a ticket");
        assert_eq!(given, issued.1);
        pump(&mut r, &mut d, &any);
        assert_eq!(d.issued_ticket(), None, "one received is not one issued");
        let evs = events(&mut d);
        assert_eq!(ticket_of(&evs), Some(given), "Alice holds what Bob gave");
        assert!(
            matches!(evs.as_slice(), [ConnEvent::Established { key, .. }] if key == f.bob.public_bytes())
        );
        // Bob's driver records it once Alice is allowed; her next message 1 proves her.
        bob_guard.issue(f.alice.peer_id(), given, f.now);
        let (mut d, mut r, sorted) = ik_through_guard(&f, &f.alice, Some(given), &mut bob_guard, 5);
        assert_eq!(sorted, guard::FirstMessage::Proven(f.alice.peer_id()));
        let next = ticket_of(&events(&mut r)).expect("a fresh ticket");
        assert_ne!(next, given);
        pump(&mut r, &mut d, &any);
        assert_eq!(ticket_of(&events(&mut d)), Some(next));
        // Spent: the same ticket again proves nothing, and the handshake still works.
        let (_, mut r, sorted) = ik_through_guard(&f, &f.alice, Some(given), &mut bob_guard, 9);
        assert_eq!(sorted, guard::FirstMessage::Unproven { cookie: false });
        assert!(ticket_of(&events(&mut r)).is_some());
    }

    #[test]
    fn a_ticket_redeemed_by_another_key_fails_the_handshake() {
        let f = fixture();
        let carol = Keypair::generate(&mut ChaCha20Rng::seed_from_u64(77));
        let mut bob_guard = guard::Guard::new(f.bob.public_bytes(), [3; 32], f.now);
        let alices = Ticket::derive(&[42; 32]);
        bob_guard.issue(f.alice.peer_id(), alices, f.now);
        // Alice gave Carol her ticket: the guard lets Carol ahead as Alice, and the
        // Diffie-Hellman that follows shows who she is.
        let (_, mut r, sorted) = ik_through_guard(&f, &carol, Some(alices), &mut bob_guard, 1);
        assert_eq!(sorted, guard::FirstMessage::Proven(f.alice.peer_id()));
        assert!(handshake_error_of(&mut r).contains("ticket issued to"));
        assert_eq!(r.poll_transmit(), None, "Carol gets no message 2");
    }

    /// Bob, under load, answers message 1 with a cookie reply (as the driver does).
    fn answer_with_cookie(r: &mut Connection, guard: &mut guard::Guard, msg1: &[u8], now: Instant) {
        let reply = guard.cookie_reply(msg1, r.remote().addr, now).unwrap();
        assert!(r.send_cookie_reply(reply));
    }

    #[test]
    fn a_cookie_reply_makes_the_dialer_send_message_1_again_proving_the_cookie() {
        let f = fixture();
        let any = AllowList::allow_any_peer_insecure();
        let mut bob_guard = guard::Guard::new(f.bob.public_bytes(), [3; 32], f.now);
        let (mut d, mut r) = unconnected_ik(&f, false);
        let from = r.remote().addr;
        let msg1 = d.poll_transmit().unwrap();
        assert_eq!(
            bob_guard.classify(&msg1, from, f.now),
            guard::FirstMessage::Unproven { cookie: false }
        );
        answer_with_cookie(&mut r, &mut bob_guard, &msg1, f.now);
        assert!(events(&mut r).is_empty() && !r.is_established());
        // Alice follows it: the same Noise message, mac2 now proving the cookie.
        assert_eq!(pump(&mut r, &mut d, &any), 1);
        assert!(events(&mut d).is_empty());
        let again = d.poll_transmit().unwrap();
        assert_eq!(again[..again.len() - 48], msg1[..msg1.len() - 48]);
        assert_eq!(
            bob_guard.classify(&again, from, f.now),
            guard::FirstMessage::Unproven { cookie: true }
        );
        r.handle_frame(&again, &any, f.now);
        assert!(r.is_established());
        pump(&mut r, &mut d, &any);
        assert!(d.is_established());
        // A cookie gone stale (two periods later) is answered with another one; a dialer
        // follows at most two.
        let later = f.now + 2 * guard::COOKIE_PERIOD;
        let (mut d, mut r) = unconnected_ik(&f, false);
        let msg1 = d.poll_transmit().unwrap();
        answer_with_cookie(&mut r, &mut bob_guard, &msg1, f.now);
        pump(&mut r, &mut d, &any);
        let stale = d.poll_transmit().unwrap();
        assert_eq!(
            bob_guard.classify(&stale, from, later),
            guard::FirstMessage::Unproven { cookie: false }
        );
        answer_with_cookie(&mut r, &mut bob_guard, &stale, later);
        pump(&mut r, &mut d, &any);
        let fresh = d.poll_transmit().unwrap();
        assert_eq!(
            bob_guard.classify(&fresh, from, later),
            guard::FirstMessage::Unproven { cookie: true }
        );
        assert!(
            !r.send_cookie_reply(vec![0; guard::COOKIE_REPLY_LEN]),
            "two per connection"
        );
        let third = bob_guard.cookie_reply(&fresh, from, later).unwrap();
        d.handle_frame(&third, &any, later);
        assert!(handshake_error_of(&mut d).contains("cookie replies"));
    }

    #[test]
    fn a_cookie_reply_for_another_message_1_fails_the_dial() {
        let f = fixture();
        let any = AllowList::allow_any_peer_insecure();
        let mut bob_guard = guard::Guard::new(f.bob.public_bytes(), [3; 32], f.now);
        let mut other = Connection::dial_ik(
            &f.alice,
            addr("10.0.0.2:7000"),
            [7; 32],
            &f.config,
            f.now,
            IkDial {
                key: f.bob.public_bytes(),
                early: None,
                ticket: None,
            },
        )
        .unwrap();
        let theirs = other.poll_transmit().unwrap();
        let reply = bob_guard
            .cookie_reply(&theirs, addr("10.0.0.1:50000"), f.now)
            .unwrap();
        let mut forged = reply.clone();
        forged[30] ^= 1;
        for bad in [reply.clone(), forged] {
            let (mut d, _) = unconnected_ik(&f, false);
            let mine = d.poll_transmit().unwrap();
            assert_ne!(mine, theirs);
            d.handle_frame(&bad, &any, f.now);
            assert!(handshake_error_of(&mut d).contains("decrypt"));
        }
        // An XX dialer takes no cookie reply: it is no message 2.
        let mut xx = Connection::dial(
            &f.alice,
            f.bob.peer_id(),
            addr("10.0.0.2:7000"),
            [1; 32],
            &f.config,
            f.now,
        )
        .unwrap();
        xx.poll_transmit();
        xx.handle_frame(&reply, &any, f.now);
        assert!(matches!(
            events(&mut xx).as_slice(),
            [ConnEvent::Closed(Closed::Error(_))]
        ));
    }
}
