//! The optional tables of a scenario file: `[swarm]`, `[membership]`, `[records]`. Data
//! and defaults only; [`super::Scenario`]'s validation checks them against the nodes, and
//! the modules named after each table use them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A fault a swarm may draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum FaultKind {
    Partition,
    PartitionOneway,
    Hold,
    FailRate,
    Drop,
    Delay,
    Corrupt,
    /// A message sent again later on its connection (a stale copy, as a slow network path
    /// delivers one): Requests, Acks and Replies, so repeats reach both sides.
    Duplicate,
    Nack,
    Crash,
    Revoke,
    /// A graceful stop (drain, shutdown) of a node that may crash, and its restart. Drawn
    /// only when `kinds` names it, so the default schedules stay as they were.
    Stop,
    /// A full disk on a durable node that may crash (its handler stops at the failed
    /// commit, its process exits), and its restart. Drawn only when `kinds` names it.
    DiskFull,
    /// A hostile peer's attack on a node (see [`AttackKind`]). Drawn only when `kinds`
    /// names it.
    Attack,
}

/// What a hostile peer (the simulator's host `mallory`) does to a node (`attack` step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttackKind {
    /// Opens a connection and sends nothing.
    Silent,
    /// Sends a frame of random bytes as its first message.
    Garbage,
    /// Sends a valid first handshake message one byte every 400 ms.
    Slow,
    /// Completes a handshake with a key no allow list names.
    Stranger,
    /// `count` strangers at once (default 32).
    Flood,
    /// An allowed peer's key (`from`): completes the handshake, then says nothing (the
    /// node must close it after its `idle_timeout`).
    Idle,
    /// An allowed peer's key (`from`): completes the handshake and sends, in a Records
    /// message, the record `node` published before its newest (a replay; needs
    /// `[records]`). The target must keep the newest.
    Replay,
    /// An allowed peer's key (`from`): completes the handshake, then breaks the protocol
    /// once (one of eight violations, by seed: framing, chunking, encoding, roles).
    Violation,
}

impl AttackKind {
    /// Every attack, for swarm draws.
    pub const ALL: [AttackKind; 7] = [
        AttackKind::Silent,
        AttackKind::Garbage,
        AttackKind::Slow,
        AttackKind::Stranger,
        AttackKind::Flood,
        AttackKind::Idle,
        AttackKind::Violation,
    ];

    /// Whether it uses an allowed peer's key (`from`).
    pub fn insider(self) -> bool {
        matches!(self, Self::Idle | Self::Replay | Self::Violation)
    }

    /// Its name in a scenario file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Silent => "silent",
            Self::Garbage => "garbage",
            Self::Slow => "slow",
            Self::Stranger => "stranger",
            Self::Flood => "flood",
            Self::Idle => "idle",
            Self::Replay => "replay",
            Self::Violation => "violation",
        }
    }
}

pub(crate) const ALL: [FaultKind; 11] = [
    FaultKind::Partition,
    FaultKind::PartitionOneway,
    FaultKind::Hold,
    FaultKind::FailRate,
    FaultKind::Drop,
    FaultKind::Delay,
    FaultKind::Corrupt,
    FaultKind::Duplicate,
    FaultKind::Nack,
    FaultKind::Crash,
    FaultKind::Revoke,
];

/// `[swarm]`: what to draw, and how much. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwarmPlan {
    /// Faults drawn in the window.
    pub faults: u32,
    /// Requests drawn in the window, between random pairs that allow each other.
    pub requests: u32,
    /// Faults and requests start within this much virtual time.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// The longest a fault lasts before it is healed.
    #[serde(with = "humantime_serde")]
    pub max_fault: Duration,
    /// The kinds drawn from (default: all).
    pub kinds: Vec<FaultKind>,
    /// Nodes that may crash (default: every durable node; a memory-only node that crashes
    /// forgets what it delivered, which the duplicate invariant would rightly flag).
    pub crash: Option<Vec<String>>,
    /// After the last heal, every node sends one probe request, which must be answered.
    pub probes: bool,
}

impl Default for SwarmPlan {
    fn default() -> Self {
        Self {
            faults: 6,
            requests: 10,
            window: Duration::from_secs(5),
            max_fault: Duration::from_secs(2),
            kinds: ALL.to_vec(),
            crash: None,
            probes: true,
        }
    }
}

/// Governance keys the simulator holds; a committee is a subset of them.
pub const POOL: usize = 8;

/// The `[membership]` table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MembershipPlan {
    /// The genesis committee: pool keys `0..committee`.
    #[serde(default = "default_committee")]
    pub committee: usize,
    /// Its threshold.
    #[serde(default = "default_threshold")]
    pub threshold: u8,
    /// The genesis's members (default: every node).
    #[serde(default)]
    pub members: Option<Vec<String>>,
}

fn default_committee() -> usize {
    3
}
fn default_threshold() -> u8 {
    2
}

/// The `[records]` table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RecordsPlan {
    /// Each record's life.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: Duration,
}

fn default_ttl() -> Duration {
    Duration::from_secs(60)
}
