//! What a node must remember across a crash, as rows of a key-value store.
//!
//! The core does no I/O, so it does not write anything itself. When durability is on
//! ([`Endpoint::restore`](crate::Endpoint::restore)), every change to the state that must
//! survive a restart is appended to a journal of [`KvOp`]s, which the driver takes with
//! [`Endpoint::poll_journal`](crate::Endpoint::poll_journal) and commits in one transaction
//! **before** it performs any output or hands out any event of the same step. So nothing the
//! outside world can see (an Ack, a Reply, a request's id, an event) ever gets ahead of the
//! durable state that explains it. On restart the driver reads every row back, [`decode`]s
//! them into a [`Recovered`] state, and hands it to the new endpoint.
//!
//! The tables, each row's value starting with [`FORMAT`] (`membership` and `records` hold
//! signed documents and sealed records; see their modules):
//!
//! | table      | key                     | value                                        |
//! |------------|-------------------------|----------------------------------------------|
//! | `meta`     | `format`, `node`, `ids` | format version; our peer id; next free id    |
//! | `outbound` | id (u64 BE)             | an unfinished exchange of ours: peer, address, payload |
//! | `outcomes` | id (u64 BE)             | its outcome (reply or failure) not yet taken by the application |
//! | `inbound`  | seq (u64 BE)            | a peer's exchange: peer, id, digest, state, the request while unanswered, our reply while cached |
//! | `settled`  | seq (u64 BE)            | a peer's settled floor: every id of it at or below this one is settled |
//! | `responses` | seq (u64 BE)           | the outcome of a peer's exchange (our reply delivered, unconfirmed, timed out, aborted, cancelled) not yet taken by the application |
//!
//! Every key grows with time (ids and `seq` are handed out in order), so the rows a busy
//! node writes sit together at the end of each table: a commit rewrites a few pages of the
//! store, not one per peer. (Keyed by peer, 60 exchanges of 60 peers in one commit cost
//! 2.5 times as much on the benchmark machine.)
//!
//! Decoding never panics: a row that does not parse is a [`CorruptRecord`] naming its table
//! and key. Fuzzed by `fuzz/fuzz_targets/durable_decode.rs`.

use std::fmt;
use std::net::SocketAddr;

use bytes::Bytes;

use crate::connection::{ConnError, Remote};
use crate::endpoint::{Event, Failure, RetryCause};
use crate::identity::PeerId;
use crate::wire::{AbortReason, CloseReason, ExchangeId, NackReason};

/// Version of the row format this build writes. It reads this one and every version back to
/// [`OLDEST_FORMAT`] (an older row lacks fields that then take their defaults: see the
/// decoder); anything else is refused, not guessed at.
pub const FORMAT: u8 = 3;

/// The oldest row format this build still reads. Version 2 rows lack the acknowledgment
/// flag, idempotency key and deadline of an outbound exchange, the key of an outcome, and
/// tell an unconfirmed reply from one still awaiting its Ack only when the reply is gone.
pub const OLDEST_FORMAT: u8 = 2;

/// Exchange ids reserved per durable write of the id counter: a restart skips at most this
/// many ids, and the counter is written once per this many requests.
pub(crate) const ID_BLOCK: u64 = 4096;

/// The tables of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Format version, owner, id counter.
    Meta,
    /// Our unfinished exchanges.
    Outbound,
    /// Outcomes of our exchanges the application has not taken yet (dead letters included).
    Outcomes,
    /// Peers' exchanges: dedupe records, unanswered requests, cached replies.
    Inbound,
    /// Each peer's settled floor (see `Endpoint`'s deduplication): one row per peer,
    /// rewritten under a new, larger key when the floor rises.
    Settled,
    /// The signed membership documents the node accepted, by epoch (its recent history).
    Membership,
    /// The freshest address record of each member (ours included), by peer id: what a
    /// restarted node resumes, and the floor under each member's sequence numbers.
    Records,
    /// Outcomes of peers' exchanges (our reply delivered, unconfirmed, timed out, aborted,
    /// cancelled) the application has not taken yet.
    Responses,
}

impl Table {
    /// Every table, in a fixed order.
    pub const ALL: [Table; 8] = [
        Table::Meta,
        Table::Outbound,
        Table::Outcomes,
        Table::Inbound,
        Table::Settled,
        Table::Membership,
        Table::Records,
        Table::Responses,
    ];

    /// The table's name in a store.
    pub fn name(self) -> &'static str {
        match self {
            Self::Meta => "meta",
            Self::Outbound => "outbound",
            Self::Outcomes => "outcomes",
            Self::Inbound => "inbound",
            Self::Settled => "settled",
            Self::Membership => "membership",
            Self::Records => "records",
            Self::Responses => "responses",
        }
    }
}

/// One write of a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    /// Insert or replace a row.
    Put {
        /// Table.
        table: Table,
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove a row (absent rows are fine).
    Delete {
        /// Table.
        table: Table,
        /// Key.
        key: Vec<u8>,
    },
}

/// A row that does not decode: the store was damaged, or written by something else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("table {table}, key {key}: {detail}")]
pub struct CorruptRecord {
    /// Table name.
    pub table: &'static str,
    /// Key, in hex.
    pub key: String,
    /// What is wrong.
    pub detail: String,
}

/// An unfinished exchange of ours, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRecord {
    /// Order of acceptance (per node, across restarts).
    pub seq: u64,
    /// To.
    pub peer: PeerId,
    /// Where.
    pub addr: SocketAddr,
    /// The request.
    pub payload: Bytes,
    /// The responder acknowledged it: its application has the request.
    pub acked: bool,
    /// The application's idempotency key, if it gave one (never empty).
    pub key: Option<Bytes>,
    /// When the exchange must end, in milliseconds since the Unix epoch, if it has a
    /// deadline: kept across restarts, so a deadline of hours outlives the process.
    pub deadline_ms: Option<u64>,
}

/// An outcome of ours the application has not settled (taken, or confirmed), as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOutcome {
    /// Order of acceptance of its exchange.
    pub seq: u64,
    /// `Event::Reply` or `Event::Failed`, flagged `redelivered`.
    pub event: Event,
    /// The exchange's idempotency key, if it had one.
    pub key: Option<Bytes>,
}

/// Where a peer's exchange stands, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundStage {
    /// Acknowledged (or about to be), not answered.
    Pending {
        /// The request, to hand to the application again after a restart; `None` once the
        /// application confirmed it has it (confirm mode): then it is not redelivered, only
        /// answerable.
        payload: Option<Bytes>,
    },
    /// Answered, waiting for the Ack of the reply; the reply (while cached) answers resends.
    Replied {
        /// The reply, or `None` once dropped from the cache.
        reply: Option<Bytes>,
    },
    /// The reply's Ack did not come in time and the application was told
    /// (`ResponseUnconfirmed`, once); the reply (while cached) still answers resends.
    Unconfirmed {
        /// The reply, or `None` once dropped from the cache.
        reply: Option<Bytes>,
    },
    /// The dialer acknowledged the reply.
    Done,
    /// Given up; resends get this Abort.
    Aborted(AbortReason),
}

/// A peer's exchange, as stored: its dedupe record and whatever it still needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRecord {
    /// Order of acceptance (per node, across restarts): eviction goes oldest first.
    pub seq: u64,
    /// Digest of the request's payload: a "duplicate" with another payload is a violation.
    pub digest: u128,
    /// Where the request came from.
    pub addr: SocketAddr,
    /// The largest reply the dialer accepts.
    pub remote_max: u64,
    /// Where it stands.
    pub stage: InboundStage,
}

/// Everything a store held, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The first exchange id this incarnation may use (`None`: a fresh store).
    pub next_id: Option<u64>,
    /// Our unfinished exchanges, oldest first.
    pub outbound: Vec<(ExchangeId, OutboundRecord)>,
    /// Outcomes the application has not settled, oldest first.
    pub outcomes: Vec<StoredOutcome>,
    /// Peers' exchanges, oldest first.
    pub inbound: Vec<((PeerId, ExchangeId), InboundRecord)>,
    /// Each peer's settled floor and the key (seq) of the row that holds it.
    pub settled: Vec<(PeerId, ExchangeId, u64)>,
    /// The membership documents the node accepted, oldest first.
    pub membership: Vec<crate::membership::Signed>,
    /// The freshest address record of each member: owner, sequence number, sealed bytes.
    pub records: Vec<(PeerId, u64, Bytes)>,
    /// Responder outcomes the application has not taken, oldest first, flagged
    /// `redelivered`, with the seq each is kept under.
    pub responses: Vec<(u64, Event)>,
    /// The store's format version (`None`: a fresh store). Older than [`FORMAT`]: the
    /// driver rewrites the header at its first commit.
    pub format: Option<u8>,
}

/// The digest kept in a dedupe record: XXH3-128 of the payload. Not a MAC (an allowed peer
/// can send what it likes anyway); it tells a resend from a different request that reuses
/// an id, which a correct dialer never does.
pub fn digest(payload: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(payload)
}

/// Rows by table and key: what an in-memory store holds.
pub type Rows = std::collections::BTreeMap<(Table, Vec<u8>), Vec<u8>>;

/// Applies a journal to in-memory rows: the commit of the in-memory stores.
pub fn apply(rows: &mut Rows, ops: Vec<KvOp>) {
    for op in ops {
        match op {
            KvOp::Put { table, key, value } => {
                rows.insert((table, key), value);
            }
            KvOp::Delete { table, key } => {
                rows.remove(&(table, key));
            }
        }
    }
}

// ----- writes -----

/// The rows every new store starts with.
pub fn header(local: PeerId) -> Vec<KvOp> {
    vec![
        put(Table::Meta, b"format".to_vec(), vec![FORMAT]),
        put(
            Table::Meta,
            b"node".to_vec(),
            versioned(|w| w.extend_from_slice(local.as_bytes())),
        ),
    ]
}

pub(crate) fn reserve_ids(next: u64) -> KvOp {
    put(
        Table::Meta,
        b"ids".to_vec(),
        versioned(|w| w.extend_from_slice(&next.to_be_bytes())),
    )
}

pub(crate) fn put_outbound(id: ExchangeId, record: &OutboundRecord) -> KvOp {
    put(
        Table::Outbound,
        id.0.to_be_bytes().to_vec(),
        versioned(|w| {
            w.extend_from_slice(&record.seq.to_be_bytes());
            w.extend_from_slice(record.peer.as_bytes());
            put_addr(w, record.addr);
            put_bytes(w, &record.payload);
            w.push(u8::from(record.acked));
            put_key(w, record.key.as_ref());
            // 0: no deadline (the epoch itself is no deadline anyone asks for).
            w.extend_from_slice(&record.deadline_ms.unwrap_or(0).to_be_bytes());
        }),
    )
}

/// The outcome of a peer's exchange, until the application takes it: kept under `seq` (the
/// node's acceptance counter), so that a restart hands it out again, flagged
/// `redelivered`. Only responder outcomes come here.
pub(crate) fn put_response(seq: u64, event: &Event) -> KvOp {
    let value = versioned(|w| {
        let (kind, peer, exchange, reason) = match event {
            Event::ResponseDelivered { peer, exchange, .. } => (1, peer, exchange, None),
            Event::ResponseUnconfirmed { peer, exchange, .. } => (2, peer, exchange, None),
            Event::ResponseTimedOut { peer, exchange, .. } => (3, peer, exchange, None),
            Event::ResponseAborted {
                peer,
                exchange,
                reason,
                ..
            } => (4, peer, exchange, Some(*reason)),
            Event::ResponseCancelled { peer, exchange, .. } => (5, peer, exchange, None),
            // Only responder outcomes come here.
            _ => return w.push(0),
        };
        w.push(kind);
        w.extend_from_slice(peer.as_bytes());
        w.extend_from_slice(&exchange.0.to_be_bytes());
        if let Some(reason) = reason {
            w.push(reason.code());
        }
    });
    put(Table::Responses, seq.to_be_bytes().to_vec(), value)
}

/// The application took the responder outcome kept under `seq`: forget it.
pub(crate) fn delete_response(seq: u64) -> KvOp {
    KvOp::Delete {
        table: Table::Responses,
        key: seq.to_be_bytes().to_vec(),
    }
}

/// The application took the outcome of exchange `id`: forget it.
pub fn outcome_taken(id: ExchangeId) -> KvOp {
    KvOp::Delete {
        table: Table::Outcomes,
        key: id.0.to_be_bytes().to_vec(),
    }
}

/// An exchange of ours ended: its request row gives way to its outcome row (one transaction).
pub(crate) fn finish_outbound(
    id: ExchangeId,
    seq: u64,
    outcome: &Event,
    idempotency: Option<&Bytes>,
) -> [KvOp; 2] {
    let key = id.0.to_be_bytes().to_vec();
    let value = versioned(|w| {
        w.extend_from_slice(&seq.to_be_bytes());
        match outcome {
            Event::Reply {
                peer,
                addr,
                payload,
                ..
            } => {
                w.push(1);
                w.extend_from_slice(peer.as_bytes());
                put_addr(w, *addr);
                put_bytes(w, payload);
            }
            Event::Failed {
                peer,
                payload,
                failure,
                ..
            } => {
                w.push(2);
                w.extend_from_slice(peer.as_bytes());
                put_bytes(w, payload);
                put_failure(w, failure);
            }
            // Only outcomes of our exchanges come here.
            _ => w.push(0),
        }
        put_key(w, idempotency);
    });
    [
        KvOp::Delete {
            table: Table::Outbound,
            key: key.clone(),
        },
        put(Table::Outcomes, key, value),
    ]
}

pub(crate) fn put_inbound(peer: PeerId, id: ExchangeId, record: &InboundRecord) -> KvOp {
    put(
        Table::Inbound,
        record.seq.to_be_bytes().to_vec(),
        versioned(|w| {
            w.extend_from_slice(peer.as_bytes());
            w.extend_from_slice(&id.0.to_be_bytes());
            w.extend_from_slice(&record.digest.to_be_bytes());
            put_addr(w, record.addr);
            w.extend_from_slice(&record.remote_max.to_be_bytes());
            match &record.stage {
                InboundStage::Pending {
                    payload: Some(payload),
                } => {
                    w.push(1);
                    put_bytes(w, payload);
                }
                InboundStage::Pending { payload: None } => w.push(8),
                InboundStage::Replied { reply: Some(reply) } => {
                    w.push(2);
                    put_bytes(w, reply);
                }
                InboundStage::Replied { reply: None } => w.push(3),
                InboundStage::Unconfirmed { reply: Some(reply) } => {
                    w.push(6);
                    put_bytes(w, reply);
                }
                InboundStage::Unconfirmed { reply: None } => w.push(7),
                InboundStage::Done => w.push(4),
                InboundStage::Aborted(reason) => {
                    w.push(5);
                    w.push(reason.code());
                }
            }
        }),
    )
}

/// `peer`'s settled floor is now `floor`, in the row keyed `seq` (the row of the previous
/// floor, if any, is deleted with [`delete_settled`]).
pub(crate) fn put_settled(seq: u64, peer: PeerId, floor: ExchangeId) -> KvOp {
    put(
        Table::Settled,
        seq.to_be_bytes().to_vec(),
        versioned(|w| {
            w.extend_from_slice(peer.as_bytes());
            w.extend_from_slice(&floor.0.to_be_bytes());
        }),
    )
}

/// The settled-floor row `seq` is superseded.
pub(crate) fn delete_settled(seq: u64) -> KvOp {
    KvOp::Delete {
        table: Table::Settled,
        key: seq.to_be_bytes().to_vec(),
    }
}

/// The signed membership document `doc` was accepted.
pub(crate) fn put_membership(doc: &crate::membership::Signed) -> KvOp {
    put(
        Table::Membership,
        doc.epoch().to_be_bytes().to_vec(),
        versioned(|w| w.extend_from_slice(&doc.encode())),
    )
}

/// `peer`'s address record `seq` (sealed as `sealed`) is the freshest taken.
pub(crate) fn put_record(peer: PeerId, seq: u64, sealed: &[u8]) -> KvOp {
    put(
        Table::Records,
        peer.as_bytes().to_vec(),
        versioned(|w| {
            w.extend_from_slice(&seq.to_be_bytes());
            w.extend_from_slice(sealed);
        }),
    )
}

/// The membership document of `epoch` left the history.
pub(crate) fn delete_membership(epoch: u64) -> KvOp {
    KvOp::Delete {
        table: Table::Membership,
        key: epoch.to_be_bytes().to_vec(),
    }
}

/// The record `seq` is forgotten.
pub(crate) fn delete_inbound(seq: u64) -> KvOp {
    KvOp::Delete {
        table: Table::Inbound,
        key: seq.to_be_bytes().to_vec(),
    }
}

fn put(table: Table, key: Vec<u8>, value: Vec<u8>) -> KvOp {
    KvOp::Put { table, key, value }
}

fn versioned(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut w = vec![FORMAT];
    f(&mut w);
    w
}

fn put_bytes(w: &mut Vec<u8>, bytes: &[u8]) {
    w.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    w.extend_from_slice(bytes);
}

/// An idempotency key: its bytes, or none (keys are never empty).
fn put_key(w: &mut Vec<u8>, key: Option<&Bytes>) {
    put_bytes(w, key.map_or(&[][..], |k| &k[..]));
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    put_bytes(w, s.as_bytes());
}

fn put_addr(w: &mut Vec<u8>, addr: SocketAddr) {
    put_str(w, &addr.to_string());
}

fn put_failure(w: &mut Vec<u8>, failure: &Failure) {
    match failure {
        Failure::Exhausted {
            attempts,
            last,
            request_acked,
        } => {
            w.push(1);
            w.extend_from_slice(&attempts.to_be_bytes());
            w.push(u8::from(*request_acked));
            match last {
                RetryCause::DialFailed(s) => {
                    w.push(1);
                    put_str(w, s);
                }
                RetryCause::ConnectTimeout => w.push(2),
                RetryCause::ConnectionLost(s) => {
                    w.push(3);
                    put_str(w, s);
                }
                RetryCause::AckTimeout => w.push(4),
                RetryCause::ReplyTimeout => w.push(5),
                RetryCause::Nacked(reason) => {
                    w.push(6);
                    w.push(reason.code());
                }
            }
        }
        Failure::Refused(reason) => {
            w.push(2);
            w.push(reason.code());
        }
        Failure::Aborted(reason) => {
            w.push(3);
            w.push(reason.code());
        }
        Failure::Rejected(reason) => {
            w.push(4);
            w.push(reason.code());
        }
        Failure::Connection(error) => {
            // Kept as its text: the structured error names live connection state.
            w.push(5);
            put_addr(w, error.remote().addr);
            put_str(w, &error.to_string());
        }
        Failure::TooLarge { len, max } => {
            w.push(6);
            w.extend_from_slice(&(*len as u64).to_be_bytes());
            w.extend_from_slice(&(*max as u64).to_be_bytes());
        }
        Failure::Revoked => w.push(7),
        Failure::ShuttingDown => w.push(8),
        Failure::Cancelled => w.push(9),
        Failure::DeadlineExceeded => w.push(10),
        Failure::Inactive => w.push(11),
    }
}

// ----- reads -----

/// Decodes a store's rows (any order) into the state to resume from. `local` is the node
/// opening it: a store written by another node is refused.
pub fn decode<I>(local: PeerId, rows: I) -> Result<Recovered, CorruptRecord>
where
    I: IntoIterator<Item = (Table, Vec<u8>, Vec<u8>)>,
{
    let mut recovered = Recovered::default();
    let mut outcomes = Vec::new();
    // Peers' exchanges met so far: one record each.
    let mut seen = std::collections::BTreeSet::new();
    let mut any = false;
    let mut format = false;
    for (table, key, value) in rows {
        any = true;
        format |= table == Table::Meta && key == b"format";
        let corrupt = |detail: String| CorruptRecord {
            table: table.name(),
            key: hex::encode(&key),
            detail,
        };
        let mut r = Reader::new(&value);
        let result: Result<(), String> = (|| {
            let readable = |v: u8| (OLDEST_FORMAT..=FORMAT).contains(&v);
            if table == Table::Meta && key == b"format" {
                return match value.as_slice() {
                    [v] if readable(*v) => {
                        recovered.format = Some(*v);
                        Ok(())
                    }
                    [v] => Err(format!(
                        "format version {v}, this build reads versions {OLDEST_FORMAT} to {FORMAT}"
                    )),
                    _ => Err("not a format version".into()),
                };
            }
            let version = r.u8()?;
            if !readable(version) {
                return Err(format!(
                    "format version {version}, this build reads {OLDEST_FORMAT} to {FORMAT}"
                ));
            }
            let v3 = version >= 3;
            match table {
                Table::Meta => match key.as_slice() {
                    b"node" => {
                        let owner = PeerId::from_bytes(r.array()?);
                        if owner != local {
                            return Err(format!(
                                "the store belongs to node {owner}, not to {local}"
                            ));
                        }
                    }
                    b"ids" => recovered.next_id = Some(r.u64()?),
                    _ => return Err("unknown meta key".into()),
                },
                Table::Outbound => {
                    let id = ExchangeId(key_u64(&key)?);
                    let mut record = OutboundRecord {
                        seq: r.u64()?,
                        peer: PeerId::from_bytes(r.array()?),
                        addr: r.addr()?,
                        payload: r.bytes()?,
                        acked: false,
                        key: None,
                        deadline_ms: None,
                    };
                    if v3 {
                        record.acked = match r.u8()? {
                            0 => false,
                            1 => true,
                            b => return Err(format!("acknowledged flag {b}")),
                        };
                        record.key = r.key()?;
                        record.deadline_ms = Some(r.u64()?).filter(|ms| *ms != 0);
                    }
                    recovered.outbound.push((id, record));
                }
                Table::Outcomes => {
                    let exchange = ExchangeId(key_u64(&key)?);
                    let seq = r.u64()?;
                    let event = match r.u8()? {
                        1 => Event::Reply {
                            peer: PeerId::from_bytes(r.array()?),
                            addr: r.addr()?,
                            exchange,
                            payload: r.bytes()?,
                            redelivered: true,
                        },
                        2 => Event::Failed {
                            peer: PeerId::from_bytes(r.array()?),
                            exchange,
                            payload: r.bytes()?,
                            failure: r.failure()?,
                            redelivered: true,
                        },
                        k => return Err(format!("unknown outcome kind {k}")),
                    };
                    let key = if v3 { r.key()? } else { None };
                    outcomes.push(StoredOutcome { seq, event, key });
                }
                Table::Inbound => {
                    let seq = key_u64(&key)?;
                    let peer: [u8; 32] = r.array()?;
                    let id = ExchangeId(r.u64()?);
                    let digest = u128::from_be_bytes(r.array()?);
                    let addr = r.addr()?;
                    let remote_max = r.u64()?;
                    let stage = match r.u8()? {
                        1 => InboundStage::Pending {
                            payload: Some(r.bytes()?),
                        },
                        2 => InboundStage::Replied {
                            reply: Some(r.bytes()?),
                        },
                        3 if v3 => InboundStage::Replied { reply: None },
                        // Version 2 restored a reply gone from the cache as unconfirmed.
                        3 => InboundStage::Unconfirmed { reply: None },
                        4 => InboundStage::Done,
                        5 => InboundStage::Aborted(AbortReason::from_code(r.u8()?)),
                        6 if v3 => InboundStage::Unconfirmed {
                            reply: Some(r.bytes()?),
                        },
                        7 if v3 => InboundStage::Unconfirmed { reply: None },
                        8 if v3 => InboundStage::Pending { payload: None },
                        s => return Err(format!("unknown stage {s}")),
                    };
                    let record = InboundRecord {
                        seq,
                        digest,
                        addr,
                        remote_max,
                        stage,
                    };
                    let peer = PeerId::from_bytes(peer);
                    if !seen.insert((peer, id)) {
                        return Err(format!("a second record of {peer}'s exchange {id}"));
                    }
                    recovered.inbound.push(((peer, id), record));
                }
                Table::Settled => {
                    let seq = key_u64(&key)?;
                    let peer = PeerId::from_bytes(r.array()?);
                    let floor = ExchangeId(r.u64()?);
                    recovered.settled.push((peer, floor, seq));
                }
                Table::Membership => {
                    let epoch = key_u64(&key)?;
                    let doc = crate::membership::Signed::decode(r.rest())
                        .map_err(|e| format!("membership document: {e}"))?;
                    if doc.epoch() != epoch {
                        return Err(format!(
                            "a document of epoch {} under key {epoch}",
                            doc.epoch()
                        ));
                    }
                    recovered.membership.push(doc);
                }
                Table::Records => {
                    let peer: [u8; 32] = key
                        .as_slice()
                        .try_into()
                        .map_err(|_| format!("key of {} bytes, expected 32", key.len()))?;
                    let seq = r.u64()?;
                    let sealed = r.rest();
                    let decoded = crate::records::SealedRecord::decode(sealed)
                        .map_err(|e| format!("address record: {e}"))?;
                    if decoded.owner_id() != PeerId::from_bytes(peer) {
                        return Err("an address record under another peer's key".into());
                    }
                    recovered.records.push((
                        PeerId::from_bytes(peer),
                        seq,
                        Bytes::copy_from_slice(sealed),
                    ));
                }
                Table::Responses => {
                    let seq = key_u64(&key)?;
                    let kind = r.u8()?;
                    let peer = PeerId::from_bytes(r.array()?);
                    let exchange = ExchangeId(r.u64()?);
                    let redelivered = true;
                    let event = match kind {
                        1 => Event::ResponseDelivered {
                            peer,
                            exchange,
                            redelivered,
                        },
                        2 => Event::ResponseUnconfirmed {
                            peer,
                            exchange,
                            redelivered,
                        },
                        3 => Event::ResponseTimedOut {
                            peer,
                            exchange,
                            redelivered,
                        },
                        4 => Event::ResponseAborted {
                            peer,
                            exchange,
                            reason: AbortReason::from_code(r.u8()?),
                            redelivered,
                        },
                        5 => Event::ResponseCancelled {
                            peer,
                            exchange,
                            redelivered,
                        },
                        k => return Err(format!("unknown response outcome kind {k}")),
                    };
                    recovered.responses.push((seq, event));
                }
            }
            r.end()
        })();
        result.map_err(corrupt)?;
    }
    if any && !format {
        return Err(CorruptRecord {
            table: Table::Meta.name(),
            key: hex::encode(b"format"),
            detail: "missing: not a store of this program".into(),
        });
    }
    recovered.outbound.sort_by_key(|(_, r)| r.seq);
    recovered.inbound.sort_by_key(|(_, r)| r.seq);
    recovered.settled.sort_by_key(|(_, _, seq)| *seq);
    recovered
        .membership
        .sort_by_key(crate::membership::Signed::epoch);
    outcomes.sort_by_key(|o: &StoredOutcome| o.seq);
    recovered.responses.sort_by_key(|(seq, _)| *seq);
    recovered.outcomes = outcomes;
    Ok(recovered)
}

fn key_u64(key: &[u8]) -> Result<u64, String> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| format!("key of {} bytes, expected 8", key.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err(format!(
                "truncated: {n} bytes wanted, {} left",
                self.rest.len()
            ));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<Bytes, String> {
        let len = usize::try_from(self.u64()?).map_err(|_| "length overflows".to_owned())?;
        Ok(Bytes::copy_from_slice(self.take(len)?))
    }

    /// An idempotency key: empty means none.
    fn key(&mut self) -> Result<Option<Bytes>, String> {
        let key = self.bytes()?;
        Ok(Some(key).filter(|k| !k.is_empty()))
    }

    fn string(&mut self) -> Result<String, String> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "text is not UTF-8".to_owned())
    }

    fn addr(&mut self) -> Result<SocketAddr, String> {
        let text = self.string()?;
        text.parse()
            .map_err(|_| format!("{text:?} is not a socket address"))
    }

    fn failure(&mut self) -> Result<Failure, String> {
        Ok(match self.u8()? {
            1 => {
                let attempts = self.u32()?;
                let request_acked = self.u8()? != 0;
                let last = match self.u8()? {
                    1 => RetryCause::DialFailed(self.string()?),
                    2 => RetryCause::ConnectTimeout,
                    3 => RetryCause::ConnectionLost(self.string()?),
                    4 => RetryCause::AckTimeout,
                    5 => RetryCause::ReplyTimeout,
                    6 => RetryCause::Nacked(NackReason::from_code(self.u8()?)),
                    c => return Err(format!("unknown retry cause {c}")),
                };
                Failure::Exhausted {
                    attempts,
                    last,
                    request_acked,
                }
            }
            2 => Failure::Refused(NackReason::from_code(self.u8()?)),
            3 => Failure::Aborted(AbortReason::from_code(self.u8()?)),
            4 => Failure::Rejected(CloseReason::from_code(self.u8()?)),
            5 => {
                let addr = self.addr()?;
                let detail = self.string()?;
                Failure::Connection(ConnError::Handshake {
                    remote: Remote { addr, peer: None },
                    detail,
                })
            }
            6 => {
                let len = usize::try_from(self.u64()?).map_err(|_| "length overflows")?;
                let max = usize::try_from(self.u64()?).map_err(|_| "length overflows")?;
                Failure::TooLarge { len, max }
            }
            7 => Failure::Revoked,
            8 => Failure::ShuttingDown,
            9 => Failure::Cancelled,
            10 => Failure::DeadlineExceeded,
            11 => Failure::Inactive,
            c => return Err(format!("unknown failure kind {c}")),
        })
    }

    /// Everything left (the row's last field).
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    fn end(&self) -> Result<(), String> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.rest.len()))
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Keypair;

    fn me() -> PeerId {
        Keypair::from_private_bytes([1; 32]).peer_id()
    }

    fn rows(ops: Vec<KvOp>) -> Vec<(Table, Vec<u8>, Vec<u8>)> {
        ops.into_iter()
            .filter_map(|op| match op {
                KvOp::Put { table, key, value } => Some((table, key, value)),
                KvOp::Delete { .. } => None,
            })
            .collect()
    }

    fn sample() -> Vec<(Table, Vec<u8>, Vec<u8>)> {
        let peer = Keypair::from_private_bytes([2; 32]).peer_id();
        let addr: SocketAddr = "10.0.0.2:7".parse().unwrap();
        let mut ops = header(me());
        ops.push(reserve_ids(42));
        ops.push(put_outbound(
            ExchangeId(3),
            &OutboundRecord {
                seq: 1,
                peer,
                addr,
                payload: Bytes::from_static(b"req"),
                acked: true,
                key: Some(Bytes::from_static(b"order-17")),
                deadline_ms: Some(1_800_000_000_000),
            },
        ));
        let failed = Event::Failed {
            peer,
            exchange: ExchangeId(4),
            payload: Bytes::from_static(b"back"),
            failure: Failure::Exhausted {
                attempts: 6,
                last: RetryCause::Nacked(NackReason::Busy),
                request_acked: true,
            },
            redelivered: false,
        };
        ops.extend(finish_outbound(
            ExchangeId(4),
            0,
            &failed,
            Some(&Bytes::from_static(b"k4")),
        ));
        let replied = Event::Reply {
            peer,
            addr,
            exchange: ExchangeId(10),
            payload: Bytes::from_static(b"answer"),
            redelivered: false,
        };
        ops.extend(finish_outbound(ExchangeId(10), 2, &replied, None));
        for (id, stage) in [
            (
                5,
                InboundStage::Pending {
                    payload: Some(Bytes::from_static(b"p")),
                },
            ),
            (12, InboundStage::Pending { payload: None }),
            (
                13,
                InboundStage::Unconfirmed {
                    reply: Some(Bytes::from_static(b"u")),
                },
            ),
            (14, InboundStage::Unconfirmed { reply: None }),
            (
                6,
                InboundStage::Replied {
                    reply: Some(Bytes::from_static(b"r")),
                },
            ),
            (7, InboundStage::Replied { reply: None }),
            (8, InboundStage::Done),
            (9, InboundStage::Aborted(AbortReason::NoResponse)),
        ] {
            let record = InboundRecord {
                seq: id,
                digest: digest(b"p"),
                addr,
                remote_max: 1 << 20,
                stage,
            };
            ops.push(put_inbound(peer, ExchangeId(id), &record));
        }
        ops.push(put_settled(11, peer, ExchangeId(4)));
        rows(ops)
    }

    #[test]
    fn every_record_kind_decodes_to_what_was_written() {
        let recovered = decode(me(), sample()).unwrap();
        assert_eq!(recovered.next_id, Some(42));
        assert_eq!(recovered.outbound.len(), 1);
        assert_eq!(recovered.outbound[0].0, ExchangeId(3));
        let out = &recovered.outbound[0].1;
        assert_eq!(
            (out.acked, out.key.as_deref(), out.deadline_ms),
            (true, Some(&b"order-17"[..]), Some(1_800_000_000_000))
        );
        assert_eq!(recovered.format, Some(FORMAT));
        let stages: Vec<&InboundStage> = recovered.inbound.iter().map(|(_, r)| &r.stage).collect();
        assert_eq!(stages.len(), 8);
        assert_eq!(stages[5], &InboundStage::Pending { payload: None });
        assert_eq!(
            stages[6],
            &InboundStage::Unconfirmed {
                reply: Some(Bytes::from_static(b"u"))
            }
        );
        assert_eq!(stages[7], &InboundStage::Unconfirmed { reply: None });
        let peer = Keypair::from_private_bytes([2; 32]).peer_id();
        assert_eq!(recovered.settled, vec![(peer, ExchangeId(4), 11)]);
        assert!(matches!(
            &recovered.outcomes[..],
            [
                StoredOutcome {
                    seq: 0,
                    event: Event::Failed {
                        exchange: ExchangeId(4),
                        redelivered: true,
                        failure: Failure::Exhausted {
                            attempts: 6,
                            request_acked: true,
                            ..
                        },
                        ..
                    },
                    key: Some(_),
                },
                StoredOutcome {
                    seq: 2,
                    event: Event::Reply {
                        exchange: ExchangeId(10),
                        redelivered: true,
                        ..
                    },
                    key: None,
                }
            ]
        ));
        assert_eq!(recovered.outcomes[0].key.as_deref(), Some(&b"k4"[..]));
        let Event::Reply { payload, addr, .. } = &recovered.outcomes[1].event else {
            unreachable!()
        };
        assert_eq!((payload.as_ref(), addr.port()), (&b"answer"[..], 7));
    }

    #[test]
    fn a_store_written_by_format_2_is_read_with_the_new_fields_defaulted() {
        let peer = Keypair::from_private_bytes([2; 32]).peer_id();
        let addr: SocketAddr = "10.0.0.2:7".parse().unwrap();
        // Version 2 rows are version 3 rows without their trailing fields.
        let v2 = |op: KvOp, trailing: usize| match op {
            KvOp::Put { table, key, value } => {
                let mut value = value[..value.len() - trailing].to_vec();
                value[0] = 2;
                (table, key, value)
            }
            KvOp::Delete { .. } => unreachable!(),
        };
        let record = OutboundRecord {
            seq: 1,
            peer,
            addr,
            payload: Bytes::from_static(b"req"),
            acked: false,
            key: None,
            deadline_ms: None,
        };
        let failed = Event::Failed {
            peer,
            exchange: ExchangeId(4),
            payload: Bytes::from_static(b"back"),
            failure: Failure::Revoked,
            redelivered: false,
        };
        let [_, outcome] = finish_outbound(ExchangeId(4), 0, &failed, None);
        let gone = InboundRecord {
            seq: 5,
            digest: 0,
            addr,
            remote_max: 1,
            stage: InboundStage::Replied { reply: None },
        };
        let mut rows = vec![(Table::Meta, b"format".to_vec(), vec![2])];
        rows.push(v2(put_outbound(ExchangeId(3), &record), 1 + 8 + 8));
        rows.push(v2(outcome, 8));
        rows.push(v2(put_inbound(peer, ExchangeId(5), &gone), 0));
        let recovered = decode(me(), rows).unwrap();
        assert_eq!(recovered.format, Some(2));
        assert_eq!(recovered.outbound, vec![(ExchangeId(3), record)]);
        assert_eq!(recovered.outcomes[0].key, None);
        // Version 2 restored a reply gone from the cache as unconfirmed, and so does this.
        assert_eq!(
            recovered.inbound[0].1.stage,
            InboundStage::Unconfirmed { reply: None }
        );
    }

    #[test]
    fn a_store_of_another_node_or_version_is_refused_by_name() {
        let other = Keypair::from_private_bytes([3; 32]).peer_id();
        let err = decode(other, sample()).unwrap_err();
        assert_eq!(err.table, "meta");
        assert!(err.detail.contains("belongs to node"), "{err}");
        let mut rows = sample();
        rows[0].2 = vec![FORMAT + 1];
        let err = decode(me(), rows).unwrap_err();
        assert_eq!(
            err.detail,
            format!(
                "format version {}, this build reads versions {OLDEST_FORMAT} to {FORMAT}",
                FORMAT + 1
            )
        );
        assert_eq!(Table::Meta.to_string(), "meta");
        assert_eq!(
            err.to_string(),
            format!("table meta, key {}: {}", err.key, err.detail)
        );
        let mut rows = sample();
        rows.remove(0);
        let err = decode(me(), rows).unwrap_err();
        assert!(err.detail.contains("missing"), "{err}");
        assert_eq!(decode(me(), Vec::new()), Ok(Recovered::default()));
    }

    #[test]
    fn two_records_of_one_exchange_are_refused() {
        let peer = Keypair::from_private_bytes([2; 32]).peer_id();
        let record = |seq| InboundRecord {
            seq,
            digest: digest(b"p"),
            addr: "10.0.0.2:7".parse().unwrap(),
            remote_max: 1 << 20,
            stage: InboundStage::Done,
        };
        let mut ops = header(me());
        ops.push(put_inbound(peer, ExchangeId(1), &record(10)));
        ops.push(put_inbound(peer, ExchangeId(1), &record(11)));
        let err = decode(me(), rows(ops)).unwrap_err();
        assert_eq!(err.table, "inbound");
        assert_eq!(err.key, hex::encode(11u64.to_be_bytes()));
        assert!(err.detail.contains("second record"), "{err}");
        // The same id from two peers is two exchanges.
        let other = Keypair::from_private_bytes([3; 32]).peer_id();
        let mut ops = header(me());
        ops.push(put_inbound(peer, ExchangeId(1), &record(10)));
        ops.push(put_inbound(other, ExchangeId(1), &record(11)));
        assert_eq!(decode(me(), rows(ops)).unwrap().inbound.len(), 2);
    }

    #[test]
    fn inbound_rows_are_keyed_by_age_so_commits_touch_few_pages() {
        let peers: Vec<PeerId> = (2..6u8)
            .map(|i| Keypair::from_private_bytes([i; 32]).peer_id())
            .collect();
        let keys: Vec<Vec<u8>> = peers
            .iter()
            .enumerate()
            .map(|(i, peer)| {
                let record = InboundRecord {
                    seq: 100 + i as u64,
                    digest: 0,
                    addr: "10.0.0.2:7".parse().unwrap(),
                    remote_max: 1,
                    stage: InboundStage::Done,
                };
                match put_inbound(*peer, ExchangeId(9 - i as u64), &record) {
                    KvOp::Put { key, .. } => key,
                    KvOp::Delete { .. } => unreachable!(),
                }
            })
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
        assert_eq!(
            delete_inbound(101),
            KvOp::Delete {
                table: Table::Inbound,
                key: keys[1].clone()
            }
        );
    }

    #[test]
    fn damaged_rows_are_errors_naming_table_and_key_never_panics() {
        for (i, (table, key, value)) in sample().into_iter().enumerate() {
            for cut in 0..value.len() {
                let mut rows = sample();
                rows[i] = (table, key.clone(), value[..cut].to_vec());
                if let Err(e) = decode(me(), rows) {
                    assert_eq!(e.table, table.name());
                    assert_eq!(e.key, hex::encode(&key));
                } else {
                    panic!("{table} row {i} cut at {cut} decoded");
                }
            }
            let mut rows = sample();
            let mut longer = value.clone();
            longer.push(0);
            rows[i] = (table, key.clone(), longer);
            assert!(
                decode(me(), rows).is_err(),
                "{table} row {i} with a trailing byte"
            );
            let mut rows = sample();
            rows[i] = (table, vec![1, 2, 3], value.clone());
            assert!(
                decode(me(), rows).is_err(),
                "{table} row {i} with a bad key"
            );
        }
    }
}
