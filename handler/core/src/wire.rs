//! The wire format: message kinds, their encoding, and chunking into Noise messages.
//!
//! `docs/PROTOCOL.md` is the normative description; this module is its implementation and
//! the two must agree. In short:
//!
//! * a frame on the stream is a 2-byte big-endian length and that many bytes of one Noise
//!   message (1..=65535 bytes);
//! * after the handshake, each Noise message decrypts to one *chunk*: a flags byte
//!   (`FIRST`, `LAST`), a 4-byte total length on `FIRST` chunks, and a slice of an encoded
//!   message; a message larger than one Noise message spans several chunks;
//! * an encoded message is a kind byte, then (except `Close`) the exchange id (u64) and the
//!   attempt (u32), then the kind's fields.
//!
//! Decoding never panics: every malformed input is a [`WireError`].

use std::fmt;

use bytes::{Bytes, BytesMut};

/// Version of this protocol, carried in the handshake hello.
pub const PROTOCOL_VERSION: u8 = 1;
/// First bytes of every hello, so a stray client is recognised at once.
pub const HELLO_MAGIC: [u8; 4] = *b"P2PH";
/// Noise protocol name: XX pattern, X25519, ChaCha20-Poly1305, BLAKE2s.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// Noise protocol name of the handshake a dialer that knows the responder's static key
/// uses: IK pattern (two messages; the dialer's identity travels in the first).
pub const NOISE_PARAMS_IK: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Prologue mixed into the handshake hash; a peer speaking another protocol fails the handshake.
pub const NOISE_PROLOGUE: &[u8] = b"p2p-handler/1";
/// Largest Noise message, and so the largest frame body.
pub const MAX_FRAME_LEN: usize = 65_535;
/// Poly1305 tag appended to each encrypted Noise message.
pub const TAG_LEN: usize = 16;
/// Largest plaintext chunk that fits in one Noise transport message.
pub const MAX_CHUNK_LEN: usize = MAX_FRAME_LEN - TAG_LEN;
/// Upper limit for `Config::max_message_size`: the total length field is a u32, and 1 GiB
/// is far beyond any sensible message.
pub const MAX_MESSAGE_SIZE_LIMIT: usize = 1 << 30;
/// Hello feature bit: the sender understands the membership messages (`Epoch`, `Fetch`,
/// `Documents`); a peer without it MUST NOT be sent one.
pub const FEATURE_MEMBERSHIP: u32 = 1;
/// Hello feature bit: the sender, as a responder, accepts an IK first message (section 3);
/// a dialer that has heard a peer's hello without it dials that peer with XX.
pub const FEATURE_IK: u32 = 2;
/// Hello feature bit: the sender understands the address record messages (`RecordSeqs`,
/// `Records`); a peer without it MUST NOT be sent one.
pub const FEATURE_RECORDS: u32 = 4;
/// The features this build has (every bit it understands).
pub const FEATURES: u32 = FEATURE_MEMBERSHIP | FEATURE_IK | FEATURE_RECORDS;
/// The longest encoded Request a dialer puts in an IK message 1 (with the hello and its
/// 8-byte timestamp); a longer one waits for the session.
pub const EARLY_MAX_LEN: usize = 16 * 1024;
/// Bytes of an encoded exchange message before its payload (kind, exchange id, attempt).
pub const EXCHANGE_HEADER_LEN: usize = 1 + 8 + 4;
/// The largest fixed part any message adds to its payload (a Nack: header + reason + u32).
pub const MAX_MESSAGE_OVERHEAD: usize = EXCHANGE_HEADER_LEN + 1 + 4;

const FLAG_FIRST: u8 = 0b01;
const FLAG_LAST: u8 = 0b10;

/// Identifies one exchange. Chosen by the dialer; unique per dialer (a random start drawn
/// from the dialer's RNG, then counting up), so a responder deduplicates by (peer, id).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExchangeId(pub u64);

impl fmt::Display for ExchangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "x{:016x}", self.0)
    }
}

impl fmt::Debug for ExchangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

macro_rules! reason_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $code:literal => $text:literal,)* }) => {
        $(#[$meta])*
        ///
        /// A reason *is* its wire code: `Other(c)` of a known code `c` equals the named
        /// variant (and sorts and hashes as it), so decoding what was encoded always gives
        /// back an equal value.
        #[derive(Debug, Clone, Copy)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A code this version does not know (sent by a newer peer).
            Other(u8),
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.code() == other.code()
            }
        }

        impl Eq for $name {}

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl Ord for $name {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.code().cmp(&other.code())
            }
        }

        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.code().hash(state);
            }
        }

        /// A phrase for people (logs, the command line).
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $(Self::$variant => f.write_str($text),)*
                    Self::Other(code) => write!(f, "reason {code}, unknown to this version"),
                }
            }
        }

        impl $name {
            /// The wire code.
            pub fn code(self) -> u8 {
                match self {
                    $(Self::$variant => $code,)*
                    Self::Other(code) => code,
                }
            }

            /// Reads a wire code; unknown codes are kept as `Other`.
            pub fn from_code(code: u8) -> Self {
                match code {
                    $($code => Self::$variant,)*
                    other => Self::Other(other),
                }
            }
        }
    };
}

reason_enum! {
    /// Why a responder refused a request for now (or for good, for `TooLarge`).
    NackReason {
        /// Too many requests are waiting for the responder's application.
        Busy = 1 => "busy: too many requests wait for its application",
        /// The dialer exceeded its request rate; `retry_after_ms` says when to come back.
        RateLimited = 2 => "over its request rate",
        /// The request exceeds the responder's maximum message size. Final.
        TooLarge = 3 => "larger than it accepts",
        /// The responder is shutting down.
        ShuttingDown = 4 => "shutting down",
        /// The Request rode in an IK message 1 and could not be told from a replay (its
        /// timestamp is not after the last one taken from this dialer, or too far from
        /// the responder's clock): send it again now, on the session.
        EarlyRefused = 5 => "sent in the first handshake message and not taken as fresh",
    }
}

reason_enum! {
    /// Why a responder gave up on an exchange it had acknowledged. Always final.
    AbortReason {
        /// Its application did not answer within the response timeout.
        NoResponse = 1 => "its application did not answer in time",
        /// The request was answered, but the reply is no longer cached to be sent again.
        ReplyExpired = 2 => "the reply is no longer cached",
        /// The responder is shutting down.
        ShuttingDown = 3 => "shutting down",
        /// The responder's reply would exceed the dialer's maximum message size.
        ReplyTooLarge = 4 => "the reply is larger than the dialer accepts",
        /// The responder's application refused the request.
        Refused = 5 => "its application refused it",
        /// A copy of an exchange the responder settled long ago and no longer remembers
        /// (its id is at or below the responder's settled floor for this dialer). The
        /// exchange ended at the responder; this copy is stale and is not delivered.
        Settled = 6 => "the exchange was settled long ago and is no longer remembered",
    }
}

reason_enum! {
    /// Why a connection is being closed.
    CloseReason {
        /// The exchange is over and the connection is not kept.
        Done = 0 => "exchange done",
        /// No exchange for the idle timeout.
        Idle = 1 => "idle",
        /// The peer is not (or no longer) on the allow list, or not from that address.
        NotAllowed = 2 => "not on the allow list",
        /// The peer broke the protocol.
        ProtocolViolation = 3 => "protocol violation",
        /// The peer exceeded a rate limit.
        RateLimited = 4 => "over a rate limit",
        /// The node is shutting down.
        ShuttingDown = 5 => "shutting down",
        /// The node has too many connections.
        TooManyConnections = 6 => "too many connections",
    }
}

/// What an `Ack` acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AckOf {
    /// The dialer's Request (sent by the responder).
    Request,
    /// The responder's Reply (sent by the dialer).
    Reply,
}

/// Message kind codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Dialer to responder: the application's request.
    Request = 1,
    /// Either way: receipt of a Request or Reply.
    Ack = 2,
    /// Responder to dialer: request refused, try later (or never, for TooLarge).
    Nack = 3,
    /// Responder to dialer: the application's answer.
    Reply = 4,
    /// Responder to dialer: the exchange will not be answered.
    Abort = 5,
    /// Either way: the connection is being closed.
    Close = 6,
    /// Either way, only to a peer whose hello asked for it: part of a large Request or
    /// Reply arrived, still arriving.
    Progress = 7,
    /// Either way, only to a peer with [`FEATURE_MEMBERSHIP`]: the sender's membership
    /// epoch and the digest of its document.
    Epoch = 8,
    /// Either way, only to a peer with [`FEATURE_MEMBERSHIP`]: send me your membership
    /// documents after this epoch.
    Fetch = 9,
    /// Either way, only to a peer with [`FEATURE_MEMBERSHIP`]: signed membership
    /// documents, consecutive epochs, oldest first (the answer to a `Fetch`).
    Documents = 10,
    /// Either way, only to a peer with [`FEATURE_RECORDS`]: the address records the sender
    /// holds, as (peer id, sequence number) pairs.
    RecordSeqs = 11,
    /// Either way, only to a peer with [`FEATURE_RECORDS`]: sealed address records
    /// (`docs/PROTOCOL.md` section 9).
    Records = 12,
}

impl Kind {
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Request,
            2 => Self::Ack,
            3 => Self::Nack,
            4 => Self::Reply,
            5 => Self::Abort,
            6 => Self::Close,
            7 => Self::Progress,
            8 => Self::Epoch,
            9 => Self::Fetch,
            10 => Self::Documents,
            11 => Self::RecordSeqs,
            12 => Self::Records,
            _ => return None,
        })
    }

    /// Whether messages of this kind start with an exchange id and attempt.
    pub fn has_exchange_header(self) -> bool {
        !matches!(
            self,
            Self::Close
                | Self::Epoch
                | Self::Fetch
                | Self::Documents
                | Self::RecordSeqs
                | Self::Records
        )
    }
}

/// One protocol message, as carried inside the encrypted session.
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    /// The dialer's request.
    Request {
        /// Exchange.
        exchange: ExchangeId,
        /// 1 for the first transmission, counting up on each resend.
        attempt: u32,
        /// Application bytes.
        payload: Bytes,
    },
    /// Acknowledges a Request (from the responder) or a Reply (from the dialer).
    Ack {
        /// Exchange.
        exchange: ExchangeId,
        /// Attempt of the acknowledged message.
        attempt: u32,
        /// What is acknowledged.
        of: AckOf,
    },
    /// The responder refuses a Request.
    Nack {
        /// Exchange.
        exchange: ExchangeId,
        /// Attempt refused.
        attempt: u32,
        /// Why.
        reason: NackReason,
        /// Earliest sensible retry, in milliseconds (0: use the normal backoff).
        retry_after_ms: u32,
    },
    /// The responder's answer.
    Reply {
        /// Exchange.
        exchange: ExchangeId,
        /// Attempt of the Request this answers.
        attempt: u32,
        /// Application bytes.
        payload: Bytes,
    },
    /// The responder gives up on an exchange.
    Abort {
        /// Exchange.
        exchange: ExchangeId,
        /// Attempt of the Request this answers.
        attempt: u32,
        /// Why.
        reason: AbortReason,
    },
    /// The sender is closing the connection.
    Close {
        /// Why.
        reason: CloseReason,
    },
    /// The receiver of a large Request (the responder) or Reply (the dialer) says it is
    /// still arriving, so that its sender's timer waits on. Sent only to a peer whose hello
    /// carries a progress interval, at least that often while the message arrives.
    Progress {
        /// The exchange of the message arriving.
        exchange: ExchangeId,
        /// The attempt of the message arriving.
        attempt: u32,
        /// Bytes of the encoded message received so far.
        received: u64,
    },
    /// The sender's membership: its epoch and the digest of its document. Sent when a
    /// connection is established and whenever the sender moves to a new epoch.
    Epoch {
        /// The epoch.
        epoch: u64,
        /// The digest of its document.
        digest: [u8; 32],
    },
    /// Asks for the receiver's membership documents after epoch `after`.
    Fetch {
        /// The epoch the asker holds.
        after: u64,
    },
    /// Signed membership documents (each in its canonical encoding, `docs/PROTOCOL.md`
    /// section 8), consecutive epochs, oldest first; none if the sender cannot help.
    Documents {
        /// The documents.
        docs: Vec<Bytes>,
    },
    /// The address records the sender holds: each owner's peer id and the record's
    /// sequence number, ascending by peer id. Sent when a connection to a member is
    /// established and the sender has not told this peer since its records changed; the
    /// receiver answers with the records it holds newer, and with its own `RecordSeqs`.
    RecordSeqs {
        /// (owner's peer id, sequence number) pairs.
        seqs: Vec<([u8; 32], u64)>,
    },
    /// Sealed address records (each as `docs/PROTOCOL.md` section 9 encodes it).
    Records {
        /// The records.
        records: Vec<Bytes>,
    },
}

impl Message {
    /// The kind of this message.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Request { .. } => Kind::Request,
            Self::Ack { .. } => Kind::Ack,
            Self::Nack { .. } => Kind::Nack,
            Self::Reply { .. } => Kind::Reply,
            Self::Abort { .. } => Kind::Abort,
            Self::Close { .. } => Kind::Close,
            Self::Progress { .. } => Kind::Progress,
            Self::Epoch { .. } => Kind::Epoch,
            Self::Fetch { .. } => Kind::Fetch,
            Self::Documents { .. } => Kind::Documents,
            Self::RecordSeqs { .. } => Kind::RecordSeqs,
            Self::Records { .. } => Kind::Records,
        }
    }

    /// The exchange this message belongs to, if any.
    pub fn exchange(&self) -> Option<ExchangeId> {
        match self {
            Self::Request { exchange, .. }
            | Self::Ack { exchange, .. }
            | Self::Nack { exchange, .. }
            | Self::Reply { exchange, .. }
            | Self::Abort { exchange, .. }
            | Self::Progress { exchange, .. } => Some(*exchange),
            Self::Close { .. }
            | Self::Epoch { .. }
            | Self::Fetch { .. }
            | Self::Documents { .. }
            | Self::RecordSeqs { .. }
            | Self::Records { .. } => None,
        }
    }

    /// The attempt number, if any.
    pub fn attempt(&self) -> Option<u32> {
        match self {
            Self::Request { attempt, .. }
            | Self::Ack { attempt, .. }
            | Self::Nack { attempt, .. }
            | Self::Reply { attempt, .. }
            | Self::Abort { attempt, .. }
            | Self::Progress { attempt, .. } => Some(*attempt),
            Self::Close { .. }
            | Self::Epoch { .. }
            | Self::Fetch { .. }
            | Self::Documents { .. }
            | Self::RecordSeqs { .. }
            | Self::Records { .. } => None,
        }
    }

    /// Length of the encoded message in bytes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Request { payload, .. } | Self::Reply { payload, .. } => {
                EXCHANGE_HEADER_LEN + payload.len()
            }
            Self::Ack { .. } | Self::Abort { .. } => EXCHANGE_HEADER_LEN + 1,
            Self::Nack { .. } => EXCHANGE_HEADER_LEN + 1 + 4,
            Self::Close { .. } => 2,
            Self::Progress { .. } => EXCHANGE_HEADER_LEN + 8,
            Self::Epoch { .. } => 1 + 8 + 32,
            Self::Fetch { .. } => 1 + 8,
            Self::Documents { docs: items } | Self::Records { records: items } => {
                1 + 2 + items.iter().map(|d| 4 + d.len()).sum::<usize>()
            }
            Self::RecordSeqs { seqs } => 1 + 2 + seqs.len() * 40,
        }
    }

    /// Encodes everything except a Request's or Reply's payload, which the chunker appends
    /// without copying it into an intermediate buffer.
    fn encode_head(&self) -> (Vec<u8>, Bytes) {
        let mut head = Vec::with_capacity(MAX_MESSAGE_OVERHEAD);
        head.push(self.kind() as u8);
        if let (Some(exchange), Some(attempt)) = (self.exchange(), self.attempt()) {
            head.extend_from_slice(&exchange.0.to_be_bytes());
            head.extend_from_slice(&attempt.to_be_bytes());
        }
        let mut body = Bytes::new();
        match self {
            Self::Request { payload, .. } | Self::Reply { payload, .. } => body = payload.clone(),
            Self::Ack { of, .. } => head.push(match of {
                AckOf::Request => Kind::Request as u8,
                AckOf::Reply => Kind::Reply as u8,
            }),
            Self::Nack {
                reason,
                retry_after_ms,
                ..
            } => {
                head.push(reason.code());
                head.extend_from_slice(&retry_after_ms.to_be_bytes());
            }
            Self::Abort { reason, .. } => head.push(reason.code()),
            Self::Progress { received, .. } => head.extend_from_slice(&received.to_be_bytes()),
            Self::Close { reason } => head.push(reason.code()),
            Self::Epoch { epoch, digest } => {
                head.extend_from_slice(&epoch.to_be_bytes());
                head.extend_from_slice(digest);
            }
            Self::Fetch { after } => head.extend_from_slice(&after.to_be_bytes()),
            Self::Documents { docs: items } | Self::Records { records: items } => {
                // Senders keep these messages within the receiver's limit, far below
                // 65,535 items and 4 GiB each.
                let mut list = Vec::with_capacity(self.encoded_len() - 1);
                list.extend_from_slice(
                    &(items.len().min(usize::from(u16::MAX)) as u16).to_be_bytes(),
                );
                for item in items.iter().take(usize::from(u16::MAX)) {
                    list.extend_from_slice(&(item.len() as u32).to_be_bytes());
                    list.extend_from_slice(item);
                }
                body = Bytes::from(list);
            }
            Self::RecordSeqs { seqs } => {
                let mut list = Vec::with_capacity(self.encoded_len() - 1);
                list.extend_from_slice(
                    &(seqs.len().min(usize::from(u16::MAX)) as u16).to_be_bytes(),
                );
                for (peer, seq) in seqs.iter().take(usize::from(u16::MAX)) {
                    list.extend_from_slice(peer);
                    list.extend_from_slice(&seq.to_be_bytes());
                }
                body = Bytes::from(list);
            }
        }
        (head, body)
    }

    /// Encodes the whole message into one buffer (tests and small messages).
    pub fn encode(&self) -> Vec<u8> {
        let (mut head, body) = self.encode_head();
        head.extend_from_slice(&body);
        head
    }

    /// Decodes one complete encoded message.
    pub fn decode(bytes: Bytes) -> Result<Self, WireError> {
        let mut r = Reader { bytes, pos: 0 };
        let code = r.u8("kind")?;
        let kind = Kind::from_code(code).ok_or(WireError::UnknownKind(code))?;
        let message = match kind {
            Kind::Close => Self::Close {
                reason: CloseReason::from_code(r.u8("close reason")?),
            },
            Kind::Request => {
                let (exchange, attempt) = r.exchange_header()?;
                Self::Request {
                    exchange,
                    attempt,
                    payload: r.rest(),
                }
            }
            Kind::Reply => {
                let (exchange, attempt) = r.exchange_header()?;
                Self::Reply {
                    exchange,
                    attempt,
                    payload: r.rest(),
                }
            }
            Kind::Ack => {
                let (exchange, attempt) = r.exchange_header()?;
                let of = match r.u8("acknowledged kind")? {
                    1 => AckOf::Request,
                    4 => AckOf::Reply,
                    other => return Err(WireError::BadAckOf(other)),
                };
                Self::Ack {
                    exchange,
                    attempt,
                    of,
                }
            }
            Kind::Nack => {
                let (exchange, attempt) = r.exchange_header()?;
                Self::Nack {
                    exchange,
                    attempt,
                    reason: NackReason::from_code(r.u8("nack reason")?),
                    retry_after_ms: r.u32("retry after")?,
                }
            }
            Kind::Abort => {
                let (exchange, attempt) = r.exchange_header()?;
                Self::Abort {
                    exchange,
                    attempt,
                    reason: AbortReason::from_code(r.u8("abort reason")?),
                }
            }
            Kind::Progress => {
                let (exchange, attempt) = r.exchange_header()?;
                Self::Progress {
                    exchange,
                    attempt,
                    received: r.u64("bytes received")?,
                }
            }
            Kind::Epoch => Self::Epoch {
                epoch: r.u64("epoch")?,
                digest: r.take("digest")?,
            },
            Kind::Fetch => Self::Fetch {
                after: r.u64("epoch")?,
            },
            Kind::Documents => {
                let count = r.u16("document count")?;
                let mut docs = Vec::with_capacity(usize::from(count).min(64));
                for _ in 0..count {
                    let len = r.u32("document length")? as usize;
                    docs.push(r.slice(len, "document")?);
                }
                Self::Documents { docs }
            }
            Kind::Records => {
                let count = r.u16("record count")?;
                let mut records = Vec::with_capacity(usize::from(count).min(64));
                for _ in 0..count {
                    let len = r.u32("record length")? as usize;
                    records.push(r.slice(len, "record")?);
                }
                Self::Records { records }
            }
            Kind::RecordSeqs => {
                let count = r.u16("record count")?;
                let mut seqs = Vec::with_capacity(usize::from(count).min(1024));
                for _ in 0..count {
                    seqs.push((r.take("peer id")?, r.u64("sequence number")?));
                }
                Self::RecordSeqs { seqs }
            }
        };
        r.finish(kind)?;
        Ok(message)
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Request {
                exchange,
                attempt,
                payload,
            } => write!(f, "Request({exchange} #{attempt}, {} B)", payload.len()),
            Self::Reply {
                exchange,
                attempt,
                payload,
            } => write!(f, "Reply({exchange} #{attempt}, {} B)", payload.len()),
            Self::Ack {
                exchange,
                attempt,
                of,
            } => write!(f, "Ack({exchange} #{attempt}, {of:?})"),
            Self::Nack {
                exchange,
                attempt,
                reason,
                retry_after_ms,
            } => write!(
                f,
                "Nack({exchange} #{attempt}, {reason:?}, {retry_after_ms} ms)"
            ),
            Self::Abort {
                exchange,
                attempt,
                reason,
            } => write!(f, "Abort({exchange} #{attempt}, {reason:?})"),
            Self::Close { reason } => write!(f, "Close({reason:?})"),
            Self::Progress {
                exchange,
                attempt,
                received,
            } => write!(f, "Progress({exchange} #{attempt}, {received} B)"),
            Self::Epoch { epoch, digest } => {
                write!(f, "Epoch({epoch}, {})", hex::encode(&digest[..4]))
            }
            Self::Fetch { after } => write!(f, "Fetch(after {after})"),
            Self::Documents { docs } => write!(f, "Documents({})", docs.len()),
            Self::RecordSeqs { seqs } => write!(f, "RecordSeqs({})", seqs.len()),
            Self::Records { records } => write!(f, "Records({})", records.len()),
        }
    }
}

/// A malformed message, chunk or hello. The connection layer adds the peer's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input ended inside a field.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// Unknown message kind.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// An Ack of something that is neither Request nor Reply.
    #[error("ack of unknown kind {0}")]
    BadAckOf(u8),
    /// Bytes left after a fixed-size message.
    #[error("{0} trailing bytes after a {1:?}")]
    Trailing(usize, Kind),
    /// Reserved chunk flag bits set, or an empty chunk.
    #[error("invalid chunk flags {0:#04x}")]
    BadFlags(u8),
    /// A FIRST chunk while a message was still being reassembled, or a continuation without one.
    #[error("chunk out of sequence: {0}")]
    Sequence(&'static str),
    /// The chunks do not add up to the announced length.
    #[error("message length mismatch: announced {announced}, got {got}")]
    LengthMismatch {
        /// Announced in the FIRST chunk.
        announced: usize,
        /// Received.
        got: usize,
    },
    /// The handshake hello is malformed.
    #[error("bad hello: {0}")]
    BadHello(&'static str),
}

struct Reader {
    bytes: Bytes,
    pos: usize,
}

impl Reader {
    fn take<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let end = self.pos.checked_add(N).ok_or(WireError::Truncated(what))?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(WireError::Truncated(what))?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        self.pos = end;
        Ok(out)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.take(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take(what)?))
    }
    /// The next `len` bytes, without copying.
    fn slice(&mut self, len: usize, what: &'static str) -> Result<Bytes, WireError> {
        let end = self
            .pos
            .checked_add(len)
            .ok_or(WireError::Truncated(what))?;
        if end > self.bytes.len() {
            return Err(WireError::Truncated(what));
        }
        let out = self.bytes.slice(self.pos..end);
        self.pos = end;
        Ok(out)
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take(what)?))
    }
    fn exchange_header(&mut self) -> Result<(ExchangeId, u32), WireError> {
        Ok((ExchangeId(self.u64("exchange id")?), self.u32("attempt")?))
    }
    fn rest(&mut self) -> Bytes {
        let rest = self.bytes.slice(self.pos.min(self.bytes.len())..);
        self.pos = self.bytes.len();
        rest
    }
    fn finish(&self, kind: Kind) -> Result<(), WireError> {
        match self.bytes.len().saturating_sub(self.pos) {
            0 => Ok(()),
            n => Err(WireError::Trailing(n, kind)),
        }
    }
}

/// Splits a message into chunk plaintexts of at most `MAX_CHUNK_LEN` bytes each.
pub fn chunk_message(message: &Message) -> Vec<Vec<u8>> {
    chunk_message_with(message, MAX_CHUNK_LEN)
}

/// [`chunk_message`] with a smaller chunk size (tests use it to exercise reassembly).
pub(crate) fn chunk_message_with(message: &Message, max_chunk: usize) -> Vec<Vec<u8>> {
    let mut chunker = Chunker::with_max_chunk(message, max_chunk);
    let mut chunks = Vec::new();
    loop {
        let mut chunk = Vec::new();
        if !chunker.next_into(&mut chunk) {
            return chunks;
        }
        chunks.push(chunk);
    }
}

/// Cuts one message into chunk plaintexts one at a time, as they are needed: a large
/// message is never copied whole into chunks before the first is sent. Holds the payload by
/// reference count, not by copy.
#[derive(Debug, Clone)]
pub struct Chunker {
    head: Vec<u8>,
    body: Bytes,
    max_chunk: usize,
    /// Bytes of `head ++ body` already cut.
    offset: usize,
    /// Whether the FIRST chunk was cut (a message always has one, however short).
    started: bool,
}

impl Chunker {
    /// Chunks of at most `MAX_CHUNK_LEN` bytes.
    pub fn new(message: &Message) -> Self {
        Self::with_max_chunk(message, MAX_CHUNK_LEN)
    }

    pub(crate) fn with_max_chunk(message: &Message, max_chunk: usize) -> Self {
        debug_assert!(max_chunk > 5 && max_chunk <= MAX_CHUNK_LEN);
        let (head, body) = message.encode_head();
        debug_assert!(head.len() + body.len() <= MAX_MESSAGE_SIZE_LIMIT + MAX_MESSAGE_OVERHEAD);
        Self {
            head,
            body,
            max_chunk,
            offset: 0,
            started: false,
        }
    }

    /// Writes the next chunk plaintext into `out`, replacing what it held; false when the
    /// message is all cut.
    pub fn next_into(&mut self, out: &mut Vec<u8>) -> bool {
        let (head, body) = (self.head.as_slice(), self.body.as_ref());
        let total = head.len() + body.len();
        if self.started && self.offset >= total {
            return false;
        }
        let first = !self.started;
        let room = self.max_chunk - 1 - if first { 4 } else { 0 };
        let offset = self.offset;
        let take = room.min(total - offset);
        let last = offset + take == total;
        out.clear();
        out.push((u8::from(first) * FLAG_FIRST) | (u8::from(last) * FLAG_LAST));
        if first {
            // `total` is bounded by MAX_MESSAGE_SIZE_LIMIT plus a few bytes (asserted above).
            out.extend_from_slice(&(total as u32).to_be_bytes());
        }
        // Walk the concatenation head ++ body without materialising it: the part of
        // offset..end in the head, then the part in the body (either may be empty).
        let end = offset + take;
        out.extend_from_slice(&head[offset.min(head.len())..end.min(head.len())]);
        let in_body = |at: usize| at.max(head.len()) - head.len();
        out.extend_from_slice(&body[in_body(offset)..in_body(end)]);
        self.offset = end;
        self.started = true;
        true
    }
}

/// What the reassembler produced from a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reassembled {
    /// Need more chunks.
    Pending,
    /// A complete message.
    Message(Message),
    /// The FIRST chunk announced a message larger than allowed. Its header is reported so the
    /// receiver can Nack it; the rest of its chunks are discarded as they arrive.
    Oversized {
        /// Kind of the oversized message.
        kind: Kind,
        /// Its exchange (if it has one).
        exchange: Option<ExchangeId>,
        /// Its attempt (if it has one).
        attempt: Option<u32>,
        /// Announced length.
        len: usize,
    },
}

/// Rebuilds messages from chunks, enforcing the size limit before buffering anything.
#[derive(Debug)]
pub struct Reassembler {
    max_encoded: usize,
    state: ReassemblyState,
}

#[derive(Debug)]
enum ReassemblyState {
    Idle,
    Collecting {
        announced: usize,
        buf: BytesMut,
    },
    /// An oversized message: its bytes are counted and dropped, except the first few, kept
    /// until its header (kind, exchange, attempt) is known and reported.
    Discarding {
        announced: usize,
        got: usize,
        head: Vec<u8>,
        reported: bool,
    },
}

impl Reassembler {
    /// A reassembler accepting application payloads up to `max_message_size` bytes.
    pub fn new(max_message_size: usize) -> Self {
        Self {
            max_encoded: max_message_size.saturating_add(MAX_MESSAGE_OVERHEAD),
            state: ReassemblyState::Idle,
        }
    }

    /// The message being collected, once its header is in: its kind, exchange, attempt,
    /// and the bytes of it received so far. `None` between messages, before its header is
    /// complete, and for a message too large to collect.
    pub fn arriving(&self) -> Option<(Kind, ExchangeId, u32, usize)> {
        let ReassemblyState::Collecting { buf, .. } = &self.state else {
            return None;
        };
        let head = buf.get(..EXCHANGE_HEADER_LEN)?;
        let kind = Kind::from_code(head[0])?;
        let exchange = ExchangeId(u64::from_be_bytes(head[1..9].try_into().ok()?));
        let attempt = u32::from_be_bytes(head[9..13].try_into().ok()?);
        Some((kind, exchange, attempt, buf.len()))
    }

    /// Feeds one decrypted chunk.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Reassembled, WireError> {
        let (&flags, rest) = chunk
            .split_first()
            .ok_or(WireError::Truncated("chunk flags"))?;
        if flags & !(FLAG_FIRST | FLAG_LAST) != 0 {
            return Err(WireError::BadFlags(flags));
        }
        let (first, last) = (flags & FLAG_FIRST != 0, flags & FLAG_LAST != 0);
        let body = if first {
            let (len, body) = rest
                .split_first_chunk::<4>()
                .ok_or(WireError::Truncated("message length"))?;
            if !matches!(self.state, ReassemblyState::Idle) {
                return Err(WireError::Sequence("FIRST chunk inside a message"));
            }
            let announced = u32::from_be_bytes(*len) as usize;
            if announced == 0 {
                return Err(WireError::Truncated("empty message"));
            }
            if announced > self.max_encoded {
                return self.start_discarding(announced, body, last);
            }
            self.state = ReassemblyState::Collecting {
                announced,
                // Grow as bytes arrive rather than trusting the announced length up front.
                buf: BytesMut::with_capacity(announced.min(MAX_CHUNK_LEN)),
            };
            body
        } else {
            if rest.is_empty() {
                return Err(WireError::BadFlags(flags));
            }
            rest
        };
        match &mut self.state {
            ReassemblyState::Idle => Err(WireError::Sequence("continuation without FIRST")),
            ReassemblyState::Discarding {
                announced,
                got,
                head,
                reported,
            } => {
                *got += body.len();
                check_progress(*announced, *got, last)?;
                let report = (!*reported)
                    .then(|| oversized_header(head, body, *announced, last))
                    .transpose()?
                    .flatten();
                *reported |= report.is_some();
                if last {
                    self.state = ReassemblyState::Idle;
                }
                Ok(report.unwrap_or(Reassembled::Pending))
            }
            ReassemblyState::Collecting { announced, buf } => {
                let announced = *announced;
                check_progress(announced, buf.len() + body.len(), last)?;
                buf.extend_from_slice(body);
                if !last {
                    return Ok(Reassembled::Pending);
                }
                let bytes = std::mem::take(buf).freeze();
                self.state = ReassemblyState::Idle;
                Message::decode(bytes).map(Reassembled::Message)
            }
        }
    }

    fn start_discarding(
        &mut self,
        announced: usize,
        body: &[u8],
        last: bool,
    ) -> Result<Reassembled, WireError> {
        check_progress(announced, body.len(), last)?;
        // The FIRST chunk need not carry the whole header; later chunks complete it.
        let mut head = Vec::with_capacity(EXCHANGE_HEADER_LEN);
        let report = oversized_header(&mut head, body, announced, last)?;
        if !last {
            self.state = ReassemblyState::Discarding {
                announced,
                got: body.len(),
                head,
                reported: report.is_some(),
            };
        }
        Ok(report.unwrap_or(Reassembled::Pending))
    }
}

/// Collects the header of an oversized message from its chunks. Returns the report once
/// the header is complete (or the message ended), so the receiver can name the exchange in
/// its Nack; `None` while more header bytes are needed.
fn oversized_header(
    head: &mut Vec<u8>,
    body: &[u8],
    announced: usize,
    last: bool,
) -> Result<Option<Reassembled>, WireError> {
    let missing = EXCHANGE_HEADER_LEN.saturating_sub(head.len());
    head.extend_from_slice(&body[..missing.min(body.len())]);
    let Some(&kind_code) = head.first() else {
        return Ok(None);
    };
    let kind = Kind::from_code(kind_code).ok_or(WireError::UnknownKind(kind_code))?;
    let has_header = kind.has_exchange_header();
    if has_header && head.len() < EXCHANGE_HEADER_LEN && !last {
        return Ok(None);
    }
    let (exchange, attempt) = match (head.get(1..9), head.get(9..13)) {
        (Some(id), Some(attempt)) if has_header => (
            id.try_into()
                .ok()
                .map(|b| ExchangeId(u64::from_be_bytes(b))),
            attempt.try_into().ok().map(u32::from_be_bytes),
        ),
        _ => (None, None),
    };
    Ok(Some(Reassembled::Oversized {
        kind,
        exchange,
        attempt,
        len: announced,
    }))
}

/// The chunks of a message must reach its announced length exactly on its LAST chunk:
/// never beyond it, never short of it at LAST, and never exactly at it before LAST.
fn check_progress(announced: usize, got: usize, last: bool) -> Result<(), WireError> {
    if got > announced || last != (got == announced) {
        Err(WireError::LengthMismatch { announced, got })
    } else {
        Ok(())
    }
}

/// The hello carried in handshake messages 1 (dialer) and 2 (responder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Sender's protocol version.
    pub version: u8,
    /// Largest application payload the sender accepts.
    pub max_message_size: u32,
    /// How often, at least, the sender wants a `Progress` while a large message of its
    /// arrives at the other side, in milliseconds; 0 (or a hello without the field, from a
    /// peer that predates it): it does not understand `Progress`, send none.
    pub progress_ms: u32,
    /// Feature bits ([`FEATURE_MEMBERSHIP`]); absent from a peer that predates them: 0.
    pub features: u32,
}

impl Hello {
    /// Encoded length.
    pub const LEN: usize = 4 + 1 + 4 + 4 + 4;
    /// The length of a hello from a peer that predates `progress_ms`.
    pub const MIN_LEN: usize = 4 + 1 + 4;

    /// Encodes the hello.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&HELLO_MAGIC);
        out[4] = self.version;
        out[5..9].copy_from_slice(&self.max_message_size.to_be_bytes());
        out[9..13].copy_from_slice(&self.progress_ms.to_be_bytes());
        out[13..17].copy_from_slice(&self.features.to_be_bytes());
        out
    }

    /// Decodes a hello. Extra trailing bytes are allowed (a later version may add fields),
    /// so version checks happen after a successful decode.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let magic = bytes.get(..4).ok_or(WireError::BadHello("too short"))?;
        if magic != HELLO_MAGIC {
            return Err(WireError::BadHello("wrong magic"));
        }
        let version = *bytes.get(4).ok_or(WireError::BadHello("too short"))?;
        let size = bytes
            .get(5..9)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .ok_or(WireError::BadHello("too short"))?;
        let max_message_size = u32::from_be_bytes(size);
        if max_message_size == 0 {
            // Nothing could ever be sent to such a peer.
            return Err(WireError::BadHello("max_message_size 0"));
        }
        // Absent from a peer that predates it: no Progress for that peer.
        let progress_ms = bytes
            .get(9..13)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_be_bytes);
        let features = bytes
            .get(13..17)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_be_bytes);
        Ok(Self {
            version,
            max_message_size,
            progress_ms,
            features,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        let exchange = ExchangeId(0x0102_0304_0506_0708);
        vec![
            Message::Request {
                exchange,
                attempt: 1,
                payload: Bytes::from_static(b"hello"),
            },
            Message::Request {
                exchange,
                attempt: 2,
                payload: Bytes::new(),
            },
            Message::Ack {
                exchange,
                attempt: 3,
                of: AckOf::Request,
            },
            Message::Ack {
                exchange,
                attempt: 1,
                of: AckOf::Reply,
            },
            Message::Nack {
                exchange,
                attempt: 1,
                reason: NackReason::RateLimited,
                retry_after_ms: 250,
            },
            Message::Nack {
                exchange,
                attempt: 1,
                reason: NackReason::Other(77),
                retry_after_ms: 0,
            },
            Message::Reply {
                exchange,
                attempt: 9,
                payload: Bytes::from(vec![7; 1000]),
            },
            Message::Abort {
                exchange,
                attempt: 2,
                reason: AbortReason::NoResponse,
            },
            Message::Close {
                reason: CloseReason::Idle,
            },
            Message::Progress {
                exchange,
                attempt: 1,
                received: 65_536,
            },
            Message::Epoch {
                epoch: 7,
                digest: [9; 32],
            },
            Message::Fetch { after: 6 },
            Message::Documents { docs: Vec::new() },
            Message::Documents {
                docs: vec![Bytes::from_static(b"P2PS..."), Bytes::from(vec![1; 300])],
            },
            Message::RecordSeqs { seqs: Vec::new() },
            Message::RecordSeqs {
                seqs: vec![([1; 32], 5), ([2; 32], u64::MAX)],
            },
            Message::Records {
                records: vec![Bytes::from_static(b"P2PR..."), Bytes::new()],
            },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for m in samples() {
            let encoded = m.encode();
            assert_eq!(encoded.len(), m.encoded_len(), "{m:?}");
            assert_eq!(Message::decode(Bytes::from(encoded)).unwrap(), m);
        }
    }

    #[test]
    fn request_encoding_is_as_documented() {
        // docs/PROTOCOL.md, "Request" example.
        let m = Message::Request {
            exchange: ExchangeId(5),
            attempt: 2,
            payload: Bytes::from_static(b"hi"),
        };
        assert_eq!(
            hex::encode(m.encode()),
            "01000000000000000500000002".to_owned() + "6869"
        );
        let chunks = chunk_message(&m);
        assert_eq!(chunks.len(), 1);
        assert_eq!(
            hex::encode(&chunks[0]),
            "030000000f010000000000000005000000026869"
        );
    }

    #[test]
    fn malformed_messages_are_errors() {
        let cases: &[(&[u8], WireError)] = &[
            (&[], WireError::Truncated("kind")),
            (&[13], WireError::UnknownKind(13)),
            (&[11, 0, 1, 0], WireError::Truncated("peer id")),
            (&[11, 0, 0, 9], WireError::Trailing(1, Kind::RecordSeqs)),
            (&[12, 0, 1, 0, 0, 0, 9, 7], WireError::Truncated("record")),
            (&[12, 0], WireError::Truncated("record count")),
            (
                &[8, 0, 0, 0, 0, 0, 0, 0, 1, 7],
                WireError::Truncated("digest"),
            ),
            (&[9, 0, 0, 0], WireError::Truncated("epoch")),
            (
                &[10, 0, 2, 0, 0, 0, 1, 7],
                WireError::Truncated("document length"),
            ),
            (&[10, 0, 1, 0, 0, 0, 9, 7], WireError::Truncated("document")),
            (&[10, 0, 0, 1], WireError::Trailing(1, Kind::Documents)),
            (&[1, 0, 0], WireError::Truncated("exchange id")),
            (
                &[2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1],
                WireError::Truncated("acknowledged kind"),
            ),
            (
                &[2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 3],
                WireError::BadAckOf(3),
            ),
            (&[6, 1, 0], WireError::Trailing(1, Kind::Close)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                Message::decode(Bytes::copy_from_slice(bytes)).unwrap_err(),
                *expected
            );
        }
    }

    #[test]
    fn large_messages_span_chunks_and_reassemble() {
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let m = Message::Reply {
            exchange: ExchangeId(1),
            attempt: 1,
            payload: Bytes::from(payload),
        };
        let chunks = chunk_message(&m);
        assert_eq!(chunks.len(), 4);
        assert!(chunks.iter().all(|c| c.len() <= MAX_CHUNK_LEN));
        let mut r = Reassembler::new(1 << 20);
        for c in &chunks[..3] {
            assert_eq!(r.push(c).unwrap(), Reassembled::Pending);
        }
        assert_eq!(r.push(&chunks[3]).unwrap(), Reassembled::Message(m));
    }

    #[test]
    fn oversized_messages_are_reported_then_discarded() {
        let m = Message::Request {
            exchange: ExchangeId(42),
            attempt: 3,
            payload: Bytes::from(vec![0; 100]),
        };
        let chunks = chunk_message_with(&m, 40);
        let mut r = Reassembler::new(50);
        assert_eq!(
            r.push(&chunks[0]).unwrap(),
            Reassembled::Oversized {
                kind: Kind::Request,
                exchange: Some(ExchangeId(42)),
                attempt: Some(3),
                len: 113
            }
        );
        for c in &chunks[1..] {
            assert_eq!(r.push(c).unwrap(), Reassembled::Pending);
        }
        // The reassembler is usable again afterwards.
        let small = Message::Close {
            reason: CloseReason::Done,
        };
        let chunk = &chunk_message(&small)[0];
        assert_eq!(r.push(chunk).unwrap(), Reassembled::Message(small));
    }

    #[test]
    fn chunk_sequence_errors() {
        let mut r = Reassembler::new(100);
        assert_eq!(r.push(&[]), Err(WireError::Truncated("chunk flags")));
        assert_eq!(r.push(&[0x04]), Err(WireError::BadFlags(0x04)));
        assert!(matches!(r.push(&[0x00, 1]), Err(WireError::Sequence(_))));
        assert_eq!(r.push(&[0x01, 0, 0, 0, 5, 1]), Ok(Reassembled::Pending));
        assert!(matches!(
            r.push(&[0x01, 0, 0, 0, 5, 1]),
            Err(WireError::Sequence(_))
        ));
        let mut r = Reassembler::new(100);
        assert_eq!(r.push(&[0x01, 0, 0, 0, 2, 6]), Ok(Reassembled::Pending));
        assert_eq!(
            r.push(&[0x02, 1, 2]),
            Err(WireError::LengthMismatch {
                announced: 2,
                got: 3
            })
        );
        let mut r = Reassembler::new(100);
        assert_eq!(
            r.push(&[0x03, 0, 0, 0, 0]),
            Err(WireError::Truncated("empty message"))
        );
    }

    #[test]
    fn the_total_must_be_reached_exactly_on_last() {
        // A FIRST chunk that already holds the announced total but is not LAST.
        let mut r = Reassembler::new(100);
        assert_eq!(
            r.push(&[0x01, 0, 0, 0, 2, 6, 0]),
            Err(WireError::LengthMismatch {
                announced: 2,
                got: 2
            })
        );
        // A continuation that reaches it without LAST.
        let mut r = Reassembler::new(100);
        assert_eq!(r.push(&[0x01, 0, 0, 0, 2, 6]), Ok(Reassembled::Pending));
        assert!(matches!(
            r.push(&[0x00, 0]),
            Err(WireError::LengthMismatch { .. })
        ));
        // The same while discarding an oversized message.
        let mut r = Reassembler::new(1);
        assert!(matches!(
            r.push(&[0x01, 0, 0, 0, 30, 6, 0]),
            Ok(Reassembled::Oversized { .. })
        ));
        assert!(matches!(
            r.push(&[
                0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0
            ]),
            Err(WireError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn an_oversized_message_is_reported_once_its_header_is_known() {
        // The header (kind, exchange, attempt) arrives over three chunks.
        let m = Message::Request {
            exchange: ExchangeId(0x0102_0304_0506_0708),
            attempt: 3,
            payload: Bytes::from(vec![9u8; 200]),
        };
        let encoded = m.encode();
        let total = (encoded.len() as u32).to_be_bytes();
        let mut r = Reassembler::new(10);
        let first = [&[0x01][..], &total, &encoded[..4]].concat();
        assert_eq!(r.push(&first), Ok(Reassembled::Pending));
        assert_eq!(
            r.push(&[&[0x00][..], &encoded[4..9]].concat()),
            Ok(Reassembled::Pending)
        );
        assert_eq!(
            r.push(&[&[0x00][..], &encoded[9..20]].concat()),
            Ok(Reassembled::Oversized {
                kind: Kind::Request,
                exchange: Some(ExchangeId(0x0102_0304_0506_0708)),
                attempt: Some(3),
                len: encoded.len(),
            })
        );
        // The rest is discarded, and the reassembler is ready for the next message.
        assert_eq!(
            r.push(&[&[0x02][..], &encoded[20..]].concat()),
            Ok(Reassembled::Pending)
        );
        assert_eq!(
            r.push(&[0x03, 0, 0, 0, 2, 6, 0]),
            Ok(Reassembled::Message(Message::Close {
                reason: CloseReason::Done
            }))
        );
    }

    #[test]
    fn the_overhead_bound_is_the_largest_fixed_part_and_admits_a_full_payload() {
        let nack = Message::Nack {
            exchange: ExchangeId(1),
            attempt: 1,
            reason: NackReason::Busy,
            retry_after_ms: 0,
        };
        assert_eq!(MAX_MESSAGE_OVERHEAD, nack.encoded_len());
        // A Request (or Reply) carrying exactly the maximum payload is reassembled, not
        // reported oversized; one byte more is.
        let max = 100;
        for (len, fits) in [(max, true), (max + MAX_MESSAGE_OVERHEAD - 12, false)] {
            let m = Message::Request {
                exchange: ExchangeId(1),
                attempt: 1,
                payload: Bytes::from(vec![0u8; len]),
            };
            let mut r = Reassembler::new(max);
            let got = r.push(&chunk_message(&m)[0]).unwrap();
            assert_eq!(
                matches!(got, Reassembled::Message(_)),
                fits,
                "{len}: {got:?}"
            );
        }
        assert_eq!(ExchangeId(0x1f).to_string(), "x000000000000001f");
        assert_eq!(format!("{:?}", ExchangeId(0x1f)), "x000000000000001f");
    }

    #[test]
    fn a_reason_is_its_wire_code() {
        for code in 0..=u8::MAX {
            for reason in [NackReason::from_code(code), NackReason::Other(code)] {
                let m = Message::Nack {
                    exchange: ExchangeId(1),
                    attempt: 1,
                    reason,
                    retry_after_ms: 0,
                };
                assert_eq!(Message::decode(Bytes::from(m.encode())), Ok(m));
            }
        }
        assert_eq!(NackReason::Other(1), NackReason::Busy);
        assert_eq!(AbortReason::Other(4), AbortReason::ReplyTooLarge);
        assert_ne!(CloseReason::Other(7), CloseReason::Done);
    }

    #[test]
    fn hello_round_trips_and_rejects_garbage() {
        let h = Hello {
            version: PROTOCOL_VERSION,
            max_message_size: 1 << 24,
            progress_ms: 0,
            features: 0,
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        assert!(Hello::decode(b"GET / HTTP/1.1").is_err());
        assert!(Hello::decode(b"P2PH").is_err());
        // A peer that accepts nothing could never be sent anything.
        let zero = Hello {
            version: PROTOCOL_VERSION,
            max_message_size: 0,
            progress_ms: 0,
            features: 0,
        };
        assert_eq!(
            Hello::decode(&zero.encode()),
            Err(WireError::BadHello("max_message_size 0"))
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Message::decode(Bytes::from(bytes));
        }

        #[test]
        fn reassembler_never_panics(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..24), 0..16)) {
            let mut r = Reassembler::new(32);
            for c in chunks {
                let _ = r.push(&c);
            }
        }

        #[test]
        fn chunking_round_trips(len in 0usize..600, max_chunk in 6usize..100, id: u64, attempt: u32) {
            let m = Message::Request {
                exchange: ExchangeId(id),
                attempt,
                payload: Bytes::from(vec![0xAB; len]),
            };
            let mut r = Reassembler::new(600);
            let chunks = chunk_message_with(&m, max_chunk);
            let mut out = None;
            for (i, c) in chunks.iter().enumerate() {
                prop_assert!(c.len() <= max_chunk);
                match r.push(c).unwrap() {
                    Reassembled::Pending => prop_assert!(i + 1 < chunks.len()),
                    Reassembled::Message(got) => out = Some(got),
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert_eq!(out, Some(m));
        }
    }
}
