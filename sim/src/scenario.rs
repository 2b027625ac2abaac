//! Scenario files: nodes, network, a timeline of steps, and expectations.
//!
//! The format is documented with examples in `docs/SCENARIOS.md`. Parsing is strict: an
//! unknown field, a bad value or a step that misses what its action needs is an error that
//! names the file, the line and the field.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use p2p_handler::Config;
use p2p_handler::wire::NackReason;
use serde::{Deserialize, Serialize};

pub(crate) mod tables;

pub use tables::{AttackKind, FaultKind, MembershipPlan, POOL, RecordsPlan, SwarmPlan};

/// A parsed, validated scenario.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name (defaults to the file stem).
    #[serde(default)]
    pub name: String,
    /// What the scenario shows, in a sentence or two.
    #[serde(default)]
    pub description: String,
    /// The seed `run` uses unless told otherwise.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Virtual time limit.
    #[serde(default = "default_duration", with = "humantime_serde")]
    pub duration: Duration,
    /// Liveness bound: once the last fault is healed, every pending exchange must finish
    /// within this much virtual time.
    #[serde(default = "default_liveness", with = "humantime_serde")]
    pub liveness: Duration,
    /// Network model.
    #[serde(default)]
    pub network: Network,
    /// Handler settings for every node: any field of the handler's `Config`, named as there
    /// (durations as "250ms", rates as `{ burst, per_second }`); the rest keep their
    /// defaults. Read through `Config`'s own (de)serialisation, so it cannot drift from it.
    #[serde(default)]
    pub config: Option<toml::Spanned<toml::Table>>,
    /// Whether nodes keep a simulated durable store that survives `crash`/`restart` (each
    /// node may override it). Default true: what production nodes with a data directory do.
    #[serde(default = "yes")]
    pub durable: bool,
    /// The storage fault: each commit takes `commit_latency` of virtual time, and a crash
    /// during it loses the writes (they were never committed). Default false: commits are
    /// instant, so a crash never finds one in progress.
    #[serde(default)]
    pub storage_fault: bool,
    /// How long a commit takes under the storage fault.
    #[serde(default = "default_commit_latency", with = "humantime_serde")]
    pub commit_latency: Duration,
    /// Under the storage fault, a commit may reach the disk at the start of its latency
    /// rather than at the end (drawn per commit): a crash during it then finds it on
    /// disk, though the handler never learnt so and acted on none of it. Both are what an
    /// atomic store (redb) may leave after a crash; the handler must cope with either.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub torn: bool,
    /// The driver's fault points (`Options::buggify`): each node's tasks now and then
    /// fall behind by 1-20 ms (a write or read that comes late, a handler task that takes
    /// its next input late), deterministically from the seed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub buggify: bool,
    /// A disk whose sync lies: every durable node's commit reports success at once and
    /// reaches the disk only this much later; a crash loses what had not. The handler
    /// cannot tell (see "Durability" in ARCHITECTURE.md for what it promises then); never
    /// drawn by swarm mode.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub sync_lies: Option<Duration>,
    /// The nodes.
    #[serde(rename = "node")]
    pub nodes: Vec<NodeSpec>,
    /// The timeline.
    #[serde(rename = "step", default)]
    pub steps: Vec<toml::Spanned<Step>>,
    /// What must hold at the end.
    #[serde(default)]
    pub expect: Expect,
    /// Healing phase: after the last timed step, each node sends a probe request that must
    /// be answered (a failure is not progress). Probes are not counted in `[expect]`.
    #[serde(default)]
    pub probes: bool,
    /// Random faults drawn from the seed (see [`crate::swarm`]).
    #[serde(default)]
    pub swarm: Option<SwarmPlan>,
    /// Signed membership: a committee governs every node's allow list (see
    /// [`crate::membership`]).
    #[serde(default)]
    pub membership: Option<MembershipPlan>,
    /// Address records: members publish where they listen and find each other by peer id
    /// (needs `[membership]`; see [`crate::records`]).
    #[serde(default)]
    pub records: Option<RecordsPlan>,
    /// Line of each step, filled in after parsing (0 for steps drawn by a swarm).
    #[serde(skip)]
    pub step_lines: Vec<usize>,
    /// Each node's handler configuration, read once from the tables when parsing.
    #[serde(skip)]
    configs: Vec<Config>,
    /// A defect planted in every node's endpoint (tests of the invariants only; never read
    /// from a file).
    #[serde(skip)]
    pub sabotage: Option<p2p_handler::endpoint::Sabotage>,
}

fn default_seed() -> u64 {
    1
}
fn yes() -> bool {
    true
}
fn default_commit_latency() -> Duration {
    Duration::from_millis(3)
}
fn default_duration() -> Duration {
    Duration::from_secs(120)
}
fn default_liveness() -> Duration {
    Duration::from_secs(60)
}

/// Latency and loss.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Minimum one-way latency.
    #[serde(default = "default_min_latency", with = "humantime_serde")]
    pub min_latency: Duration,
    /// Maximum one-way latency.
    #[serde(default = "default_max_latency", with = "humantime_serde")]
    pub max_latency: Duration,
    /// turmoil's fail rate: the chance per message that a link breaks for a while (TCP
    /// connections across it stall or break).
    #[serde(default, deserialize_with = "probability")]
    pub fail_rate: f64,
    /// Chance per message that a broken link repairs.
    #[serde(default = "default_repair_rate", deserialize_with = "probability")]
    pub repair_rate: f64,
    /// Per-link settings.
    #[serde(default, rename = "link")]
    pub links: Vec<LinkSpec>,
    /// How much virtual time one simulation step covers (1 ms to 10 ms). A message arrives
    /// at the first step boundary after its latency has passed, so no latency is shorter
    /// than a tick; timers fire at their exact time whatever the tick. Swarm mode uses the
    /// drawn minimum latency, up to 5 ms: fewer steps, the same latencies.
    #[serde(default = "default_tick", with = "humantime_serde")]
    pub tick: Duration,
}

fn default_min_latency() -> Duration {
    Duration::from_millis(2)
}
fn default_max_latency() -> Duration {
    Duration::from_millis(10)
}
fn default_tick() -> Duration {
    Duration::from_millis(1)
}
/// The longest tick a scenario may ask for.
pub const MAX_TICK: Duration = Duration::from_millis(10);
fn default_repair_rate() -> f64 {
    1.0
}

/// A chance, checked while parsing so that the error names the line and the field (turmoil
/// panics on a rate outside 0 to 1).
fn probability<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(serde::de::Error::custom(format!(
            "{v} is not a chance: use a number from 0.0 to 1.0"
        )))
    }
}

fn maybe_probability<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    probability(d).map(Some)
}

impl Default for Network {
    fn default() -> Self {
        Self {
            min_latency: default_min_latency(),
            max_latency: default_max_latency(),
            fail_rate: 0.0,
            repair_rate: default_repair_rate(),
            links: Vec::new(),
            tick: default_tick(),
        }
    }
}

/// Settings for the link between two nodes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// One end.
    pub a: String,
    /// The other end.
    pub b: String,
    /// Fixed latency on this link.
    #[serde(default, with = "humantime_serde")]
    pub latency: Option<Duration>,
    /// Fail rate on this link.
    #[serde(default, deserialize_with = "maybe_probability")]
    pub fail_rate: Option<f64>,
}

/// One node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Its name (also its turmoil host name).
    pub name: String,
    /// How its application answers requests.
    #[serde(default)]
    pub app: App,
    /// Handler settings for this node, on top of the scenario's (same form).
    #[serde(default)]
    pub config: Option<toml::Spanned<toml::Table>>,
    /// The nodes it allows; all others when absent.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// Overrides the scenario's `durable` for this node (false: memory only, so a restart
    /// forgets everything).
    #[serde(default)]
    pub durable: Option<bool>,
    /// Whether its allow list carries its peers' keys (true, the default: members of one
    /// network know them, and dial with IK); false names them by peer id alone (XX), as
    /// a node configured before keys were known would be.
    #[serde(default = "yes")]
    pub know_keys: bool,
}

/// Application behaviour of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum App {
    /// Reply with `re:` + the request at once.
    #[default]
    Echo,
    /// Reply after a delay.
    Slow {
        /// The delay.
        #[serde(with = "humantime_serde")]
        reply_after: Duration,
    },
    /// Never reply (the dialer gets `Aborted(NoResponse)`).
    Never,
    /// Refuse (Nack `Busy`) the first `n` request copies, then echo.
    Refuse {
        /// How many.
        first: u32,
    },
    /// Echo, but crash after receiving `after` requests, and restart after `restart_after`.
    CrashProne {
        /// Requests before the crash.
        after: u32,
        /// Downtime.
        #[serde(with = "humantime_serde")]
        restart_after: Duration,
    },
    /// Reply only when a `respond` step says so.
    Manual,
    /// Refuse every request at once (`reject`: the dialer fails with `Aborted(Refused)`).
    Reject,
}

/// One timeline entry: an action, triggered at a virtual time or by a message.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// A name other steps' `after` may give.
    #[serde(default)]
    pub name: Option<String>,
    /// When (virtual time since start; with `after`, since that step ran). Default: at the
    /// start, unless `on` is given.
    #[serde(default, with = "humantime_serde")]
    pub at: Option<Duration>,
    /// Run once the step of this name has run (`at` then counts from there): the order
    /// holds whatever swarm mode does to the times.
    #[serde(default)]
    pub after: Option<String>,
    /// Or: when a message matching this is seen (the nth such).
    #[serde(default)]
    pub on: Option<Trigger>,
    /// What to do.
    #[serde(rename = "do")]
    pub action: ActionKind,
    /// Node that acts / sends (request, respond, allow, revoke, crash, restart, stop).
    #[serde(default)]
    pub node: Option<String>,
    /// Sender (request).
    #[serde(default)]
    pub from: Option<String>,
    /// Receiver (request, respond) or the peer allowed/revoked.
    #[serde(default)]
    pub to: Option<String>,
    /// Link ends (partition, hold, release, repair, latency, fail_rate).
    #[serde(default)]
    pub a: Option<String>,
    /// Link ends.
    #[serde(default)]
    pub b: Option<String>,
    /// Request payload text.
    #[serde(default)]
    pub payload: Option<String>,
    /// Request payload size in bytes (filled with a pattern) instead of `payload`.
    #[serde(default)]
    pub size: Option<usize>,
    /// How many requests (request), or how many messages a message fault applies to.
    #[serde(default)]
    pub count: Option<u32>,
    /// Dial this node's address instead of the target's own (an impostor there).
    #[serde(default)]
    pub via: Option<String>,
    /// Latency (latency).
    #[serde(default, with = "humantime_serde")]
    pub latency: Option<Duration>,
    /// Fail rate (fail_rate).
    #[serde(default)]
    pub rate: Option<f64>,
    /// Delay (delay).
    #[serde(default, with = "humantime_serde")]
    pub by: Option<Duration>,
    /// Which messages a message fault applies to.
    #[serde(default, rename = "match")]
    pub matches: Option<MessageMatch>,
    /// The node's whole new allow list (allow_list), as it would reload from its file.
    #[serde(default)]
    pub peers: Option<Vec<String>>,
    /// How long a graceful stop lets started work finish before shutting down (stop;
    /// default 5 s).
    #[serde(default, with = "humantime_serde")]
    pub grace: Option<Duration>,
    /// Membership: the members of the document made (default: the previous one's).
    #[serde(default)]
    pub members: Option<Vec<String>>,
    /// Membership: the governance keys (indices into the simulator's pool) that sign it
    /// (default: the first `threshold` of the committee that signs it).
    #[serde(default)]
    pub signers: Option<Vec<usize>>,
    /// Membership: a new committee (pool indices) from this epoch on.
    #[serde(default)]
    pub committee: Option<Vec<usize>>,
    /// Membership: a new threshold from this epoch on.
    #[serde(default)]
    pub threshold: Option<u8>,
    /// Membership: the epoch the document follows (default: the newest made). Following an
    /// epoch that already has a successor makes a fork.
    #[serde(default)]
    pub follows: Option<u64>,
    /// Membership: hand over the document already made for this epoch instead (a replay,
    /// or a rollback when it is older than the node's).
    #[serde(default)]
    pub replay: Option<u64>,
    /// Restart: the node listens on this port from now on (it moved; with `[records]` its
    /// new record tells the others).
    #[serde(default)]
    pub port: Option<u16>,
    /// Offer_record: which record of `to` to hand `node`: `"previous"` (its owner's record
    /// before the newest: a replay) or `"forged"` (one naming `to` as owner, signed by
    /// `from`'s record key, naming `from`'s host).
    #[serde(default)]
    pub record: Option<String>,
    /// A message fault or trigger that need not apply in the scenario's own run (a
    /// negative test: a selector that must not match). Otherwise one that never applied
    /// fails the run, having tested nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub may_not_apply: bool,
    /// Request: the exchange must end within this (`Failed(DeadlineExceeded)` otherwise),
    /// retried until then whatever `max_attempts` says.
    #[serde(default, with = "humantime_serde")]
    pub deadline: Option<Duration>,
    /// Cancel: the exchange, by its trace label (`"alice#2"`: alice's second request).
    #[serde(default)]
    pub exchange: Option<String>,
    /// Attack: what the hostile peer does.
    #[serde(default)]
    pub attack: Option<AttackKind>,
}

impl Step {
    /// `from` sends a request to `to` (one; see [`Step::count`]).
    pub fn request(from: &str, to: &str) -> Self {
        Self {
            from: Some(from.to_owned()),
            to: Some(to.to_owned()),
            ..Self::new(ActionKind::Request)
        }
    }

    /// A fault or its healing on the link between `a` and `b` (`partition`, `hold`,
    /// `release`, `repair`...).
    pub fn link(action: ActionKind, a: &str, b: &str) -> Self {
        Self {
            a: Some(a.to_owned()),
            b: Some(b.to_owned()),
            ..Self::new(action)
        }
    }

    /// `action` done by or to `node` (`crash`, `restart`, `stop`, `disk_full`...).
    pub fn node(action: ActionKind, node: &str) -> Self {
        Self {
            node: Some(node.to_owned()),
            ..Self::new(action)
        }
    }

    /// At this virtual time (since the start, or since the `after` step).
    pub fn at(mut self, at: Duration) -> Self {
        self.at = Some(at);
        self
    }

    /// How many requests, or how many messages a message fault applies to.
    pub fn count(mut self, count: u32) -> Self {
        self.count = Some(count);
        self
    }

    /// A step doing `action` at the start, every other field unset.
    pub fn new(action: ActionKind) -> Self {
        Self {
            name: None,
            at: None,
            after: None,
            on: None,
            action,
            node: None,
            from: None,
            to: None,
            a: None,
            b: None,
            payload: None,
            size: None,
            count: None,
            via: None,
            latency: None,
            rate: None,
            by: None,
            matches: None,
            peers: None,
            grace: None,
            members: None,
            signers: None,
            committee: None,
            threshold: None,
            follows: None,
            replay: None,
            port: None,
            record: None,
            may_not_apply: false,
            deadline: None,
            exchange: None,
            attack: None,
        }
    }
}

/// Step actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum ActionKind {
    // Application.
    Request,
    Respond,
    /// A `manual` or `never` node refuses its oldest pending request from `to`.
    Reject,
    /// A node cancels one of its exchanges (`exchange`).
    Cancel,
    Allow,
    Revoke,
    /// Replace a node's allow list as a whole (a reloaded file).
    AllowList,
    // Network faults (turmoil verbs).
    Partition,
    PartitionOneway,
    Hold,
    Release,
    Repair,
    RepairOneway,
    Crash,
    Restart,
    /// A graceful stop: drain (new work refused, started work goes on), wait for the work to
    /// finish or the grace to run out, shut down. A `restart` brings the node back.
    Stop,
    /// The node's disk fills up: its next commit fails (and every one after, until a
    /// `restart`, where the operator has made room). The handler stops, keeping what it
    /// committed; the node's process exits as `p2p-node` does.
    DiskFull,
    /// Hand a signed membership document to a node, as its operator would.
    Membership,
    /// Hand an address record to a node as its records directory would (a replayed or
    /// forged one: see `record`).
    OfferRecord,
    /// A hostile peer attacks `to` (`attack`; see [`AttackKind`]).
    Attack,
    Latency,
    FailRate,
    // Message faults, keyed on decoded messages.
    Drop,
    Delay,
    /// The message goes now, and a copy of it again `by` later on the same connection.
    Duplicate,
    Corrupt,
    Nack,
}

impl ActionKind {
    /// Whether this action breaks something that a later step must heal.
    pub fn is_fault(self) -> bool {
        matches!(
            self,
            Self::Partition
                | Self::PartitionOneway
                | Self::Hold
                | Self::Crash
                | Self::Stop
                | Self::DiskFull
                | Self::FailRate
        )
    }
    /// Whether this action heals a fault.
    pub fn is_heal(self) -> bool {
        matches!(
            self,
            Self::Release | Self::Repair | Self::RepairOneway | Self::Restart
        )
    }
}

/// Message kinds as written in scenario files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum MsgKind {
    Request,
    Ack,
    Nack,
    Reply,
    Abort,
    Close,
    Progress,
    /// Membership: a node's epoch and digest.
    Epoch,
    /// Membership: a request for documents.
    Fetch,
    /// Membership: signed documents.
    Documents,
    /// Address records: what a node holds.
    RecordSeqs,
    /// Address records: sealed records.
    Records,
}

/// Selects messages by kind, direction and attempt.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MessageMatch {
    /// Kind.
    pub kind: MsgKind,
    /// Sender.
    #[serde(default)]
    pub from: Option<String>,
    /// Receiver.
    #[serde(default)]
    pub to: Option<String>,
    /// For acks: what is acknowledged.
    #[serde(default)]
    pub of: Option<MsgKind>,
    /// Only resends (attempt > 1), or only first attempts.
    #[serde(default)]
    pub resend: Option<bool>,
}

impl MessageMatch {
    /// Refuses a selector no message can match (a fault or trigger that can never apply
    /// would pass silently, having tested nothing).
    fn can_match(&self) -> Result<(), String> {
        if self.from.is_some() && self.from == self.to {
            return Err("`from` and `to` name the same node: no node sends to itself".into());
        }
        match self.of {
            Some(_) if self.kind != MsgKind::Ack => {
                return Err("`of` selects what an Ack acknowledges: `kind` must be \"ack\"".into());
            }
            Some(MsgKind::Request | MsgKind::Reply) | None => {}
            Some(_) => return Err("`of` is \"request\" or \"reply\"".into()),
        }
        let attempts = matches!(
            self.kind,
            MsgKind::Request
                | MsgKind::Ack
                | MsgKind::Nack
                | MsgKind::Reply
                | MsgKind::Abort
                | MsgKind::Progress
        );
        if self.resend.is_some() && !attempts {
            return Err(format!(
                "`resend`: a {:?} carries no attempt number",
                self.kind
            ));
        }
        Ok(())
    }

    /// Refuses a message fault that can never apply to the messages selected.
    fn can_apply(&self, action: ActionKind) -> Result<(), String> {
        use ActionKind as A;
        match (self.kind, action) {
            (MsgKind::Progress, _) => Err(
                "a Progress is written by the receiving connection, not sent through the \
                 tap: no fault applies to it"
                    .into(),
            ),
            // The connection ends with it: nothing is left to delay, repeat or corrupt it
            // on.
            (MsgKind::Close, A::Delay | A::Duplicate | A::Corrupt) => Err(format!(
                "a Close ends its connection: only `drop` applies to it, not `{}`",
                format!("{action:?}").to_lowercase()
            )),
            _ => Ok(()),
        }
    }
}

/// Fires a step when the `nth` message matching `message` is sent or received.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// The messages counted.
    #[serde(flatten)]
    pub message: MessageMatch,
    /// Which occurrence fires (1 = the first).
    #[serde(default = "one")]
    pub nth: u32,
    /// Count messages when they are sent (default: when they are received).
    #[serde(default)]
    pub sent: bool,
}

fn one() -> u32 {
    1
}

/// An exact count or a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Count {
    /// Exactly this many.
    Exactly(u64),
    /// Within bounds.
    Range {
        /// At least.
        #[serde(default)]
        min: Option<u64>,
        /// At most.
        #[serde(default)]
        max: Option<u64>,
    },
}

impl Count {
    /// Whether `n` satisfies the count.
    pub fn holds(&self, n: u64) -> bool {
        match *self {
            Self::Exactly(want) => n == want,
            Self::Range { min, max } => min.is_none_or(|m| n >= m) && max.is_none_or(|m| n <= m),
        }
    }
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Exactly(n) => write!(f, "{n}"),
            Self::Range { min, max } => write!(
                f,
                "{}..={}",
                min.map_or(String::new(), |m| m.to_string()),
                max.map_or(String::new(), |m| m.to_string())
            ),
        }
    }
}

/// What must hold at the end of a run (on top of the built-in invariants).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Requests handed to responders' applications.
    pub delivered: Option<Count>,
    /// Replies handed to dialers' applications.
    pub replied: Option<Count>,
    /// Failure events.
    pub failed: Option<Count>,
    /// Every failure's kind starts with this (e.g. "Exhausted", "Aborted(NoResponse)",
    /// "Rejected", "Connection(Impostor", "Refused").
    pub failure: Option<String>,
    /// Requests resent (all nodes).
    pub resends: Option<Count>,
    /// Redials (all nodes).
    pub redials: Option<Count>,
    /// Duplicate requests recognised (all nodes).
    pub duplicates_dropped: Option<Count>,
    /// Stale copies of settled, forgotten exchanges refused with `Abort{Settled}` (all
    /// nodes).
    pub settled_refused: Option<Count>,
    /// Replies re-sent from the responder's cache (all nodes).
    pub replies_from_cache: Option<Count>,
    /// Requests delivered again after a restart, flagged `redelivered` (not counted in
    /// `delivered`).
    pub redelivered: Option<Count>,
    /// Nacks received (all nodes).
    pub nacks: Option<Count>,
    /// Peer errors reported (all nodes).
    pub peer_errors: Option<Count>,
    /// Rate-limit notices (all nodes).
    pub rate_limited: Option<Count>,
    /// Replies whose Ack never came in `reply_ack_timeout` (all nodes, as responders).
    pub unconfirmed: Option<Count>,
    /// Connections open at the end (all nodes). The leak invariant expects 0 when unset.
    pub open_connections: Option<Count>,
    /// Steps the handler refuses (request to oneself, payload over the maximum, queue
    /// full). Unset, any refusal fails the run.
    pub refused: Option<Count>,
    /// Membership: at the end, every member of the newest document is at this epoch.
    pub membership_epoch: Option<u64>,
    /// Membership: documents refused (events, all nodes; each copy once per node).
    pub membership_refused: Option<Count>,
    /// Membership: fork alarms (all nodes).
    pub membership_forks: Option<Count>,
    /// Address records refused (events, all nodes; each copy once per node).
    pub records_refused: Option<Count>,
    /// Members that became inactive (events, all nodes).
    pub records_inactive: Option<Count>,
    /// The last exchange outcome happens no later than this virtual time.
    #[serde(default, with = "humantime_serde")]
    pub completes_within: Option<Duration>,
    /// ... and no earlier than this.
    #[serde(default, with = "humantime_serde")]
    pub completes_after: Option<Duration>,
}

/// The `.toml` files directly in `dir`, sorted by name.
pub fn files_in(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|x| x == "toml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A scenario file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Unreadable.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Invalid; the message names the line and the field.
    #[error("{path}: {message}")]
    Invalid {
        /// File.
        path: String,
        /// What is wrong, where.
        message: String,
    },
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: shown.clone(),
            source,
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::parse(&text, &shown, &stem)
    }

    /// Parses and validates scenario text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str, default_name: &str) -> Result<Self, ScenarioError> {
        let invalid = |message: String| ScenarioError::Invalid {
            path: origin.to_owned(),
            message,
        };
        let mut scenario: Self = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if scenario.name.is_empty() {
            scenario.name = default_name.to_owned();
        }
        scenario.step_lines = scenario
            .steps
            .iter()
            .map(|s| line_of(text, s.span().start))
            .collect();
        // Settings first, each with the line of the table it came from: the scenario's
        // alone, then each node's on top of it.
        if let Some(c) = &scenario.config
            && let Err(e) = toml::Value::Table(c.get_ref().clone()).try_into::<Config>()
        {
            let line = line_of(text, c.span().start);
            return Err(invalid(format!("line {line}: [config]: {}", e.message())));
        }
        let mut configs = Vec::with_capacity(scenario.nodes.len());
        for (i, node) in scenario.nodes.iter().enumerate() {
            match scenario.try_config_of(i) {
                Ok(config) => configs.push(config),
                Err(e) => {
                    let table = node.config.as_ref().or(scenario.config.as_ref());
                    let line = table.map_or(0, |c| line_of(text, c.span().start));
                    return Err(invalid(format!(
                        "line {line}: node {:?}: config: {e}",
                        node.name
                    )));
                }
            }
        }
        scenario.configs = configs;
        scenario.validate().map_err(invalid)?;
        Ok(scenario)
    }

    /// Reads each node's configuration again from the tables (after nodes were removed).
    pub fn reload_configs(&mut self) -> Result<(), String> {
        self.configs = (0..self.nodes.len())
            .map(|i| self.try_config_of(i))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// A scenario of the named nodes (echoing applications, every default, seed 1), for
    /// a simulation written in code rather than in a file: add steps with
    /// [`Scenario::push`], set `expect`, and [`crate::run::run`] it.
    ///
    /// ```
    /// use p2p_sim::scenario::{ActionKind, Count, Scenario, Step};
    /// let mut scenario = Scenario::with_nodes(["alice", "bob"]).unwrap();
    /// scenario.push(Step::request("alice", "bob").count(3)).unwrap();
    /// scenario.expect.replied = Some(Count::Exactly(3));
    /// let outcome = p2p_sim::run::run(&scenario, scenario.seed, false);
    /// assert!(outcome.passed(), "{:?}", outcome.failures);
    /// ```
    pub fn with_nodes<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut text = String::new();
        for name in names {
            text.push_str(&format!("[[node]]\nname = {}\n\n", toml::Value::from(name)));
        }
        Self::parse(&text, "<code>", "in-code").map_err(|e| e.to_string())
    }

    /// Appends `step` and checks the scenario as a file's would be checked (names that
    /// exist, the fields the action needs); a step that does not fit is refused and not
    /// kept.
    pub fn push(&mut self, step: Step) -> Result<&mut Self, String> {
        self.push_drawn(step);
        if let Err(e) = self.validate() {
            self.steps.pop();
            self.step_lines.pop();
            return Err(e);
        }
        Ok(self)
    }

    /// Appends a step that no file line wrote (drawn by a swarm, a probe): line 0.
    pub fn push_drawn(&mut self, step: Step) {
        self.steps.push(toml::Spanned::new(0..0, step));
        self.step_lines.push(0);
    }

    /// The node index of `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// The handler configuration of node `i`.
    /// Whether node `i` keeps a durable store.
    pub fn durable_of(&self, i: usize) -> bool {
        self.nodes
            .get(i)
            .and_then(|n| n.durable)
            .unwrap_or(self.durable)
    }

    /// The handler configuration of node `i` (as read by `parse`, which refuses a scenario
    /// whose tables do not read).
    pub fn config_of(&self, i: usize) -> Config {
        self.configs.get(i).cloned().unwrap_or_default()
    }

    /// Sets `max_message_size` for every node in `[config]` (written down, so a shrunk file
    /// replays it), unless a node overrides it itself or a step sends more. Returns whether
    /// it applied.
    pub(crate) fn limit_messages(&mut self, max: usize) -> bool {
        let larger = self
            .steps
            .iter()
            .any(|s| s.get_ref().size.is_some_and(|n| n > max));
        !larger && self.draw_config("max_message_size", max as i64)
    }

    /// Whether a step (written or drawn) attacks a node: the run then has a hostile host.
    pub fn has_attacks(&self) -> bool {
        self.steps
            .iter()
            .any(|s| s.get_ref().action == ActionKind::Attack)
    }

    /// The largest message every node takes.
    pub fn smallest_message_limit(&self) -> usize {
        (0..self.nodes.len())
            .map(|i| self.max_message_size_of(i))
            .min()
            .unwrap_or(Config::default().max_message_size)
    }

    /// Sets `key` for every node in `[config]` (written down, so a shrunk file replays it),
    /// unless the file sets it anywhere already: a scenario's own values are never
    /// overridden. Returns whether it applied (false too if the result does not validate,
    /// in which case nothing changed).
    pub(crate) fn draw_config(&mut self, key: &str, value: impl Into<toml::Value>) -> bool {
        let set = |c: &Option<toml::Spanned<toml::Table>>| {
            c.as_ref().is_some_and(|c| c.get_ref().contains_key(key))
        };
        if set(&self.config) || self.nodes.iter().any(|n| set(&n.config)) {
            return false;
        }
        let before = self.config.clone();
        let mut table = self
            .config
            .take()
            .map(|c| c.into_inner())
            .unwrap_or_default();
        table.insert(key.into(), value.into());
        self.config = Some(toml::Spanned::new(0..0, table));
        if self.reload_configs().is_ok() {
            return true;
        }
        self.config = before;
        let _ = self.reload_configs();
        false
    }

    /// The largest message node `i` takes (without copying its whole configuration).
    pub fn max_message_size_of(&self, i: usize) -> usize {
        self.configs
            .get(i)
            .map_or(Config::default().max_message_size, |c| c.max_message_size)
    }

    /// The handler configuration of node `i`: the scenario's `[config]`, then the node's.
    fn try_config_of(&self, i: usize) -> Result<Config, String> {
        let mut table = toml::Table::new();
        let node = self.nodes.get(i).and_then(|n| n.config.as_ref());
        for layer in [self.config.as_ref(), node].into_iter().flatten() {
            table.extend(layer.get_ref().clone());
        }
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_owned())
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("a scenario needs at least one [[node]]".into());
        }
        if self.nodes.len() > MAX_NODES {
            return Err(format!(
                "{} nodes: a scenario holds at most {MAX_NODES} (turmoil links every pair)",
                self.nodes.len()
            ));
        }
        if self.duration.is_zero() {
            return Err("duration must be positive".into());
        }
        self.expect.validate()?;
        let mut names = BTreeSet::new();
        for node in &self.nodes {
            if node.name.is_empty()
                || !node
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!(
                    "node name {:?}: use letters, digits, '-' and '_'",
                    node.name
                ));
            }
            if !names.insert(node.name.as_str()) {
                return Err(format!("node {:?} is defined twice", node.name));
            }
        }
        let known = |field: &str, name: &Option<String>| -> Result<(), String> {
            match name {
                Some(n) if !names.contains(n.as_str()) => {
                    Err(format!("`{field}`: unknown node {n:?}"))
                }
                _ => Ok(()),
            }
        };
        for node in &self.nodes {
            for peer in node.allow.iter().flatten() {
                known("allow", &Some(peer.clone()))
                    .map_err(|e| format!("node {:?}: {e}", node.name))?;
            }
            let config = self.config_of(self.node_index(&node.name).unwrap_or(0));
            config
                .validate()
                .map_err(|e| format!("node {:?}: {e}", node.name))?;
        }
        for link in &self.network.links {
            known("a", &Some(link.a.clone()))?;
            known("b", &Some(link.b.clone()))?;
        }
        if self.network.min_latency > self.network.max_latency {
            return Err("network: min_latency exceeds max_latency".into());
        }
        let tick = self.network.tick;
        if tick < Duration::from_millis(1)
            || tick > MAX_TICK
            || !tick.subsec_nanos().is_multiple_of(1_000_000)
        {
            return Err(format!(
                "network: tick {tick:?} is not a whole number of milliseconds from 1 ms to {MAX_TICK:?}"
            ));
        }
        if let Some(plan) = &self.swarm {
            plan.validate(self)?;
        }
        if let Some(plan) = &self.records {
            plan.validate(self)?;
        } else if let Some(i) = self.steps.iter().position(|s| {
            let s = s.get_ref();
            s.action == ActionKind::OfferRecord || s.port.is_some()
        }) {
            let line = self.step_lines.get(i).copied().unwrap_or(0);
            return Err(format!(
                "line {line}: step {}: `offer_record` and `port` need a [records] table",
                i + 1
            ));
        }
        match &self.membership {
            Some(plan) => plan.validate(self)?,
            None => {
                if let Some(i) = self
                    .steps
                    .iter()
                    .position(|s| s.get_ref().action == ActionKind::Membership)
                {
                    let line = self.step_lines.get(i).copied().unwrap_or(0);
                    return Err(format!(
                        "line {line}: step {} (`Membership`): needs a [membership] table",
                        i + 1
                    ));
                }
                if self.expect.membership_epoch.is_some()
                    || self.expect.membership_refused.is_some()
                    || self.expect.membership_forks.is_some()
                {
                    return Err("[expect] membership_*: needs a [membership] table".into());
                }
            }
        }
        self.validate_order()?;
        for (i, step) in self.steps.iter().enumerate() {
            let line = self.step_lines.get(i).copied().unwrap_or(0);
            let step = step.get_ref();
            let app = |name: &Option<String>| {
                name.as_deref()
                    .and_then(|n| self.node_index(n))
                    .map(|i| &self.nodes[i].app)
            };
            validate_step(step, &known)
                .and_then(|()| match (step.action, app(&step.node)) {
                    (ActionKind::Respond, Some(App::Manual)) => Ok(()),
                    (ActionKind::Reject, Some(App::Manual | App::Never)) => Ok(()),
                    (ActionKind::Respond | ActionKind::Reject, _) => Err(
                        "only a node whose application leaves requests pending (`manual`; \
                         `never` for `reject`) has one to answer or refuse"
                            .into(),
                    ),
                    _ => Ok(()),
                })
                .and_then(|()| match step.deadline {
                    Some(_) if step.action != ActionKind::Request => {
                        Err("`deadline` is for `request` steps".into())
                    }
                    Some(d) if d.is_zero() => Err("`deadline` must be positive".into()),
                    _ => Ok(()),
                })
                .and_then(|()| match step.at {
                    Some(at) if at > self.duration => Err(format!(
                        "at = {} is after the end of the run (duration = {}): it would never fire",
                        humantime::format_duration(at),
                        humantime::format_duration(self.duration)
                    )),
                    _ => Ok(()),
                })
                .map_err(|e| format!("line {line}: step {} (`{:?}`): {e}", i + 1, step.action))?;
        }
        Ok(())
    }
}

/// Nodes a scenario may hold: turmoil links every pair, and each node is a runtime.
pub const MAX_NODES: usize = 256;
/// Requests one `request` step may make.
pub const MAX_COUNT: u32 = 100_000;
/// The largest `size` a request step may ask for: the protocol's own ceiling on a message.
pub const MAX_SIZE: usize = p2p_handler::wire::MAX_MESSAGE_SIZE_LIMIT;
/// The most connections one `flood` attack opens.
pub const MAX_FLOOD: u32 = 256;

impl Expect {
    /// Every range must be satisfiable.
    fn validate(&self) -> Result<(), String> {
        let counts = [
            ("delivered", &self.delivered),
            ("replied", &self.replied),
            ("failed", &self.failed),
            ("resends", &self.resends),
            ("redials", &self.redials),
            ("duplicates_dropped", &self.duplicates_dropped),
            ("settled_refused", &self.settled_refused),
            ("replies_from_cache", &self.replies_from_cache),
            ("redelivered", &self.redelivered),
            ("nacks", &self.nacks),
            ("peer_errors", &self.peer_errors),
            ("rate_limited", &self.rate_limited),
            ("unconfirmed", &self.unconfirmed),
            ("open_connections", &self.open_connections),
            ("refused", &self.refused),
            ("membership_refused", &self.membership_refused),
            ("membership_forks", &self.membership_forks),
        ];
        for (field, count) in counts {
            if let Some(Count::Range {
                min: Some(min),
                max: Some(max),
            }) = count
                && min > max
            {
                return Err(format!(
                    "[expect] {field}: min = {min} is above max = {max}: no run can meet it"
                ));
            }
        }
        Ok(())
    }
}

/// Checks that a field naming a node names a known one.
type NodeCheck<'a> = dyn Fn(&str, &Option<String>) -> Result<(), String> + 'a;

fn validate_step(step: &Step, known: &NodeCheck<'_>) -> Result<(), String> {
    use ActionKind as A;
    let need = |field: &str, value: bool| {
        if value {
            Ok(())
        } else {
            Err(format!("needs `{field}`"))
        }
    };
    if step.at.is_some() && step.on.is_some() {
        return Err("give `at` or `on`, not both".into());
    }
    for (field, value) in [
        ("node", &step.node),
        ("from", &step.from),
        ("to", &step.to),
        ("a", &step.a),
        ("b", &step.b),
        ("via", &step.via),
    ] {
        known(field, value)?;
    }
    for peer in step.peers.iter().flatten() {
        known("peers", &Some(peer.clone()))?;
    }
    for m in step
        .matches
        .iter()
        .chain(step.on.as_ref().map(|t| &t.message))
    {
        known("from", &m.from)?;
        known("to", &m.to)?;
        m.can_match()?;
    }
    if let Some(m) = &step.matches {
        m.can_apply(step.action)?;
    }
    if let Some(trigger) = &step.on
        && trigger.sent
        && trigger.message.kind == MsgKind::Progress
    {
        return Err(
            "a Progress is written by the receiving connection and never seen going \
                    out: use `sent = false`"
                .into(),
        );
    }
    if let Some(trigger) = &step.on
        && trigger.nth == 0
    {
        return Err("`on.nth` counts from 1 (the first matching message)".into());
    }
    if step.count == Some(0) || step.count.is_some_and(|c| c > MAX_COUNT) {
        return Err(format!("`count` must be 1 to {MAX_COUNT}"));
    }
    match step.action {
        A::Request => {
            need("from", step.from.is_some())?;
            need("to", step.to.is_some())?;
            if step.payload.is_some() && step.size.is_some() {
                return Err("give `payload` or `size`, not both".into());
            }
            if let Some(size) = step.size
                && size > MAX_SIZE
            {
                return Err(format!(
                    "`size` = {size}: a message is at most {MAX_SIZE} bytes (1 GiB)"
                ));
            }
        }
        A::Respond | A::Reject => {
            need("node", step.node.is_some())?;
            need("to", step.to.is_some())?;
        }
        A::Cancel => {
            need("node", step.node.is_some())?;
            let label = step.exchange.as_deref().ok_or("needs `exchange`")?;
            let owner = label.split_once('#').and_then(|(node, n)| {
                let n: u32 = n.parse().ok().filter(|n| *n > 0)?;
                Some((node, n))
            });
            match owner {
                Some((node, _)) if Some(node) == step.node.as_deref() => {}
                Some(_) => {
                    return Err("a node cancels only its own exchanges: `exchange` \
                                       must be \"<node>#<n>\" with <node> = `node`"
                        .into());
                }
                None => {
                    return Err(format!(
                        "`exchange` = {label:?}: an exchange label, \"<node>#<n>\" (n from 1)"
                    ));
                }
            }
        }
        A::Allow | A::Revoke => {
            need("node", step.node.is_some())?;
            need("to", step.to.is_some())?;
        }
        A::AllowList => {
            need("node", step.node.is_some())?;
            need("peers", step.peers.is_some())?;
        }
        A::Partition | A::Hold | A::Release | A::Repair => {
            need("a", step.a.is_some())?;
            need("b", step.b.is_some())?;
        }
        A::PartitionOneway | A::RepairOneway => {
            need("from", step.from.is_some())?;
            need("to", step.to.is_some())?;
        }
        A::Crash | A::Stop | A::DiskFull => need("node", step.node.is_some())?,
        A::Restart => {
            need("node", step.node.is_some())?;
            if step.port == Some(0) {
                return Err("`port` 0 is not a port a record can name".into());
            }
        }
        A::OfferRecord => {
            need("node", step.node.is_some())?;
            need("to", step.to.is_some())?;
            match step.record.as_deref() {
                Some("previous") => {}
                Some("forged") => need("from", step.from.is_some())?,
                _ => {
                    return Err("`record` must be \"previous\" (a replay) or \"forged\"".into());
                }
            }
        }
        A::Attack => {
            need("to", step.to.is_some())?;
            match step.attack {
                None => return Err("needs `attack`".into()),
                Some(AttackKind::Replay) => {
                    need("from", step.from.is_some())?;
                    need("node", step.node.is_some())?;
                }
                Some(kind) if kind.insider() => need("from", step.from.is_some())?,
                Some(AttackKind::Flood) => {
                    if step.count.is_some_and(|c| c > MAX_FLOOD) {
                        return Err(format!("a flood is at most {MAX_FLOOD} connections"));
                    }
                }
                Some(_) => {}
            }
            if step.from.is_some() && !step.attack.is_some_and(AttackKind::insider) {
                return Err(
                    "only `idle` and `violation` use an allowed peer's key (`from`)".into(),
                );
            }
        }
        A::Membership => {
            need("node", step.node.is_some())?;
            for member in step.members.iter().flatten() {
                known("members", &Some(member.clone()))?;
            }
            if step.replay.is_some()
                && (step.members.is_some()
                    || step.signers.is_some()
                    || step.committee.is_some()
                    || step.threshold.is_some()
                    || step.follows.is_some())
            {
                return Err("`replay` hands over a document already made: \
                            give no other membership field"
                    .into());
            }
        }
        A::Latency => {
            need("a", step.a.is_some())?;
            need("b", step.b.is_some())?;
            need("latency", step.latency.is_some())?;
        }
        A::FailRate => {
            need("a", step.a.is_some())?;
            need("b", step.b.is_some())?;
            need("rate", step.rate.is_some_and(|r| (0.0..=1.0).contains(&r)))?;
        }
        A::Drop | A::Corrupt => need("match", step.matches.is_some())?,
        A::Delay | A::Duplicate => {
            need("match", step.matches.is_some())?;
            need("by", step.by.is_some())?;
        }
        A::Nack => {
            need("match", step.matches.is_some())?;
            if step
                .matches
                .as_ref()
                .is_some_and(|m| m.kind != MsgKind::Request)
            {
                return Err("`nack` answers requests: `match.kind` must be \"request\"".into());
            }
        }
    }
    Ok(())
}

impl SwarmPlan {
    /// Checks the plan against the scenario (names, sizes); the message names the field.
    pub fn validate(&self, scenario: &Scenario) -> Result<(), String> {
        if self.window.is_zero() || self.max_fault.is_zero() {
            return Err("[swarm]: window and max_fault must be positive".into());
        }
        if self.kinds.is_empty() && self.faults > 0 {
            return Err("[swarm]: kinds is empty but faults > 0".into());
        }
        for name in self.crash.iter().flatten() {
            if scenario.node_index(name).is_none() {
                return Err(format!("[swarm]: crash: unknown node {name:?}"));
            }
        }
        if scenario.nodes.len() < 2 {
            return Err("[swarm]: needs at least two nodes".into());
        }
        Ok(())
    }
}

impl MembershipPlan {
    /// Checks the plan against the scenario's nodes.
    pub fn validate(&self, scenario: &Scenario) -> Result<(), String> {
        if self.committee == 0 || self.committee > POOL {
            return Err(format!(
                "[membership] committee = {}: 1 to {POOL} keys",
                self.committee
            ));
        }
        if self.threshold == 0 || usize::from(self.threshold) > self.committee {
            return Err(format!(
                "[membership] threshold = {}: 1 to the committee's size ({})",
                self.threshold, self.committee
            ));
        }
        for name in self.members.iter().flatten() {
            if scenario.node_index(name).is_none() {
                return Err(format!("[membership] members: unknown node {name:?}"));
            }
        }
        Ok(())
    }
}

impl RecordsPlan {
    /// Checks the plan against the scenario.
    pub fn validate(&self, scenario: &Scenario) -> Result<(), String> {
        if scenario.membership.is_none() {
            return Err(
                "[records] needs a [membership] table (records are sealed for the \
                        members and signed by keys the membership lists)"
                    .into(),
            );
        }
        let min = p2p_handler::endpoint::MIN_RECORD_TTL;
        let max = Duration::from_secs(p2p_handler::records::MAX_RECORD_TTL);
        if self.ttl < min || self.ttl > max {
            return Err(format!(
                "[records] ttl = {:?}: {min:?} to {max:?}",
                self.ttl
            ));
        }
        Ok(())
    }
}

impl Scenario {
    /// When step `i` runs if nothing delays it: its `at`, plus, through `after`, the times
    /// of the steps it follows. `None` for a step a message triggers.
    pub fn nominal_time(&self, i: usize) -> Option<Duration> {
        let mut total = Duration::ZERO;
        let mut step = self.steps.get(i)?.get_ref();
        for _ in 0..=self.steps.len() {
            if step.on.is_some() {
                return None;
            }
            total += step.at.unwrap_or_default();
            let Some(after) = &step.after else {
                return Some(total);
            };
            step = self
                .steps
                .iter()
                .map(|s| s.get_ref())
                .find(|s| s.name.as_ref() == Some(after))?;
        }
        None
    }

    /// Step names are unique; `after` names a step, never together with `on`, and the
    /// chain of `after`s ends at a step that runs by itself (no cycle).
    fn validate_order(&self) -> Result<(), String> {
        let mut names = std::collections::BTreeMap::new();
        for (i, step) in self.steps.iter().enumerate() {
            if let Some(name) = &step.get_ref().name
                && names.insert(name.as_str(), i).is_some()
            {
                let line = self.step_lines.get(i).copied().unwrap_or(0);
                return Err(format!(
                    "line {line}: step {}: name {name:?} is taken",
                    i + 1
                ));
            }
        }
        for (i, step) in self.steps.iter().enumerate() {
            let line = self.step_lines.get(i).copied().unwrap_or(0);
            let at = |e: String| format!("line {line}: step {}: {e}", i + 1);
            let step = step.get_ref();
            let Some(after) = &step.after else { continue };
            if step.on.is_some() {
                return Err(at("give `after` or `on`, not both".into()));
            }
            // Follow the chain: it must reach a step without `after` within as many hops
            // as there are steps.
            let mut next = after.as_str();
            let mut hops = 0;
            loop {
                let &j = names
                    .get(next)
                    .ok_or_else(|| at(format!("after = {next:?}: no step has that name")))?;
                match &self.steps[j].get_ref().after {
                    None => break,
                    Some(a) => next = a.as_str(),
                }
                hops += 1;
                if hops > self.steps.len() {
                    return Err(at(format!(
                        "after = {after:?}: the steps wait on each other"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The reason a `nack` step answers with.
pub const NACK_REASON: NackReason = NackReason::Busy;

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
description = "two nodes"
[[node]]
name = "alice"
[[node]]
name = "bob"
app = { slow = { reply_after = "1s" } }

[[step]]
at = "0s"
do = "request"
from = "alice"
to = "bob"
"#;

    #[test]
    fn parses_a_scenario() {
        let s = Scenario::parse(GOOD, "x.toml", "x").unwrap();
        assert_eq!(s.name, "x");
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(
            s.nodes[1].app,
            App::Slow {
                reply_after: Duration::from_secs(1)
            }
        );
        assert_eq!(s.step_lines, vec![9], "the line of the [[step]] header");
    }

    fn err(text: &str) -> String {
        Scenario::parse(text, "scenarios/bad.toml", "bad")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn unknown_fields_name_file_line_and_field() {
        let e = err("[[node]]\nname = \"a\"\nspeed = 3\n");
        assert!(e.contains("scenarios/bad.toml"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("speed"), "{e}");
    }

    #[test]
    fn membership_steps_and_tables_are_checked() {
        let nodes = "[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\n";
        let e = err(&format!(
            "{nodes}[[step]]\ndo = \"membership\"\nnode = \"a\"\n"
        ));
        assert!(
            e.contains("line 5") && e.contains("needs a [membership] table"),
            "{e}"
        );
        let table = "[membership]\ncommittee = 3\nthreshold = 4\n";
        let e = err(&format!("{table}{nodes}"));
        assert!(e.contains("threshold = 4"), "{e}");
        let table = "[membership]\nmembers = [\"zed\"]\n";
        assert!(err(&format!("{table}{nodes}")).contains("unknown node \"zed\""));
        let step = "[[step]]\ndo = \"membership\"\nnode = \"a\"\nreplay = 1\nsigners = [0]\n";
        let e = err(&format!("[membership]\n{nodes}{step}"));
        assert!(e.contains("`replay`"), "{e}");
        let step = "[[step]]\ndo = \"membership\"\nmembers = [\"a\"]\n";
        assert!(err(&format!("[membership]\n{nodes}{step}")).contains("needs `node`"));
    }

    #[test]
    fn bad_values_are_reported() {
        let e = err("duration = \"soon\"\n[[node]]\nname = \"a\"\n");
        assert!(e.contains("line 1") && e.contains("duration"), "{e}");
        let e = err("[[node]]\nname = \"a\"\n[[step]]\ndo = \"explode\"\n");
        assert!(e.contains("line 4") && e.contains("explode"), "{e}");
    }

    #[test]
    fn config_takes_every_field_of_the_handlers_config_and_names_bad_ones() {
        let base =
            "[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\nconfig = { max_attempts = 3 }\n";
        let s = Scenario::parse(
            &format!(
                "[config]\nack_delay = \"0s\"\nmax_tracked_peers = 8\nmax_attempts = 9\n{base}"
            ),
            "x.toml",
            "x",
        )
        .unwrap();
        let (a, b) = (s.config_of(0), s.config_of(1));
        assert_eq!(
            (a.ack_delay, a.max_tracked_peers, a.max_attempts),
            (Duration::ZERO, 8, 9)
        );
        assert_eq!(
            (b.max_tracked_peers, b.max_attempts),
            (8, 3),
            "the node's on top"
        );
        let e = err(&format!("[config]\nack_timout = \"1s\"\n{base}"));
        assert!(e.contains("line 1") && e.contains("ack_timout"), "{e}");
        let e = err(
            "[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\nconfig = { ack_timeout = \"soon\" }\n",
        );
        assert!(e.contains("line 5") && e.contains("node \"b\""), "{e}");
        // Values that parse but cannot work are refused too.
        let e = err(&format!("[config]\nmax_attempts = 0\n{base}"));
        assert!(e.contains("max_attempts") || e.contains("attempt"), "{e}");
    }

    #[test]
    fn rates_outside_zero_to_one_name_line_and_field_instead_of_panicking_in_turmoil() {
        let base = "[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\n";
        let e = err(&format!("[network]\nfail_rate = 5\n{base}"));
        assert!(
            e.contains("line 2") && e.contains("fail_rate") && e.contains("not a chance"),
            "{e}"
        );
        let e = err(&format!("[network]\nrepair_rate = -0.5\n{base}"));
        assert!(e.contains("line 2") && e.contains("repair_rate"), "{e}");
        let e = err(&format!(
            "{base}[network]\n[[network.link]]\na = \"a\"\nb = \"b\"\nfail_rate = 1.5\n"
        ));
        assert!(e.contains("line 9") && e.contains("fail_rate"), "{e}");
        let e = err(&format!(
            "{base}[[step]]\ndo = \"fail_rate\"\na = \"a\"\nb = \"b\"\nrate = 2.0\n"
        ));
        assert!(e.contains("line 5") && e.contains("needs `rate`"), "{e}");
        // In range, all of them parse.
        Scenario::parse(
            &format!("[network]\nfail_rate = 0.5\nrepair_rate = 1.0\n{base}"),
            "x.toml",
            "x",
        )
        .unwrap();
    }

    #[test]
    fn steps_missing_fields_or_naming_unknown_nodes_are_reported_with_their_line() {
        let base = "[[node]]\nname = \"alice\"\n[[node]]\nname = \"bob\"\n";
        let e = err(&format!(
            "{base}\n[[step]]\ndo = \"partition\"\na = \"alice\"\n"
        ));
        assert!(e.contains("line 6") && e.contains("needs `b`"), "{e}");
        let e = err(&format!(
            "{base}\n[[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"carol\"\n"
        ));
        assert!(e.contains("line 6") && e.contains("carol"), "{e}");
        let e = err(&format!(
            "{base}\n[[step]]\ndo = \"nack\"\nmatch = {{ kind = \"ack\" }}\n"
        ));
        assert!(e.contains("must be \"request\""), "{e}");
        let e = err(&format!(
            "{base}\n[[step]]\ndo = \"stop\"\ngrace = \"2s\"\n"
        ));
        assert!(e.contains("line 6") && e.contains("needs `node`"), "{e}");
        let e = err(&format!(
            "{base}\n[[step]]\ndo = \"stop\"\nnode = \"bob\"\ngrace = \"soon\"\n"
        ));
        assert!(e.contains("grace"), "{e}");
    }

    #[test]
    fn values_that_would_abort_or_never_fire_are_refused_by_name() {
        let base = "[[node]]\nname = \"alice\"\n[[node]]\nname = \"bob\"\n";
        let request = |extra: &str| {
            err(&format!(
                "{base}\n[[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n{extra}"
            ))
        };
        let e = request("size = 1000000000000\n");
        assert!(
            e.contains("line 6") && e.contains("`size` = 1000000000000"),
            "{e}"
        );
        let e = request("count = 4000000000\n");
        assert!(e.contains("`count` must be 1 to 100000"), "{e}");
        let e = request("count = 0\n");
        assert!(e.contains("`count` must be 1"), "{e}");
        let e = request("at = \"200s\"\n");
        assert!(e.contains("after the end of the run"), "{e}");
        let e = err(&format!(
            "{base}\n[[step]]\ndo = \"crash\"\nnode = \"bob\"\non = {{ kind = \"request\", nth = 0 }}\n"
        ));
        assert!(e.contains("`on.nth` counts from 1"), "{e}");
        let e = err(&format!(
            "{base}[expect]\ndelivered = {{ min = 3, max = 1 }}\n"
        ));
        assert!(e.contains("delivered: min = 3 is above max = 1"), "{e}");
        let nodes: String = (0..=MAX_NODES)
            .map(|i| format!("[[node]]\nname = \"n{i}\"\n"))
            .collect();
        let e = err(&nodes);
        assert!(e.contains("257 nodes") && e.contains("at most 256"), "{e}");
        for tick in ["0ms", "11ms", "1500us"] {
            let e = err(&format!("{base}[network]\ntick = \"{tick}\"\n"));
            assert!(
                e.contains("network: tick") && e.contains("1 ms to 10ms"),
                "{e}"
            );
        }
        let ok = Scenario::parse(&format!("{base}[network]\ntick = \"10ms\"\n"), "<t>", "t");
        assert_eq!(
            ok.map(|s| s.network.tick).ok(),
            Some(Duration::from_millis(10))
        );
    }

    #[test]
    fn selectors_and_faults_that_can_never_apply_are_refused() {
        let base = "[[node]]\nname = \"alice\"\n[[node]]\nname = \"bob\"\n";
        let rule = |action: &str, matches: &str| {
            err(&format!(
                "{base}\n[[step]]\ndo = \"{action}\"\nby = \"10ms\"\nmatch = {{ {matches} }}\n"
            ))
        };
        let cases = [
            (
                "drop",
                "kind = \"request\", from = \"bob\", to = \"bob\"",
                "same node",
            ),
            (
                "drop",
                "kind = \"reply\", of = \"request\"",
                "`kind` must be \"ack\"",
            ),
            (
                "drop",
                "kind = \"ack\", of = \"close\"",
                "\"request\" or \"reply\"",
            ),
            (
                "drop",
                "kind = \"close\", resend = true",
                "carries no attempt",
            ),
            (
                "drop",
                "kind = \"epoch\", resend = false",
                "carries no attempt",
            ),
            ("drop", "kind = \"progress\"", "no fault applies"),
            ("delay", "kind = \"close\"", "only `drop`"),
            ("duplicate", "kind = \"close\"", "only `drop`"),
            ("corrupt", "kind = \"close\"", "only `drop`"),
        ];
        for (action, matches, want) in cases {
            let e = rule(action, matches);
            assert!(e.contains(want), "{action} {matches}: {e}");
        }
        let e = err(&format!(
            "{base}\n[[step]]\ndo = \"crash\"\nnode = \"bob\"\non = {{ kind = \"progress\", sent = true }}\n"
        ));
        assert!(e.contains("never seen going out"), "{e}");
        // What can apply still parses.
        for (action, matches) in [
            ("drop", "kind = \"close\", from = \"alice\""),
            ("drop", "kind = \"ack\", of = \"reply\", resend = false"),
            ("delay", "kind = \"reply\", resend = true"),
        ] {
            let text = format!(
                "{base}\n[[step]]\ndo = \"{action}\"\nby = \"10ms\"\nmatch = {{ {matches} }}\n"
            );
            assert!(
                Scenario::parse(&text, "t", "t").is_ok(),
                "{action} {matches}"
            );
        }
    }

    #[test]
    fn step_order_and_application_steps_are_checked() {
        let base = "[[node]]\nname = \"alice\"\n[[node]]\nname = \"bob\"\napp = \"manual\"\n";
        let req = |name: &str, extra: &str| {
            format!(
                "[[step]]\nname = \"{name}\"\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n{extra}\n"
            )
        };
        let cases = [
            (req("x", "") + &req("x", ""), "name \"x\" is taken"),
            (req("x", "after = \"nope\""), "no step has that name"),
            (
                req("x", "after = \"y\"") + &req("y", "after = \"x\""),
                "wait on each other",
            ),
            (req("x", "after = \"x\""), "wait on each other"),
            (
                req("x", "") + &req("y", "after = \"x\"\non = { kind = \"reply\" }"),
                "`after` or `on`",
            ),
            (req("x", "deadline = \"0s\""), "`deadline` must be positive"),
            (
                "[[step]]\ndo = \"crash\"\nnode = \"bob\"\ndeadline = \"1s\"\n".into(),
                "`deadline` is for `request`",
            ),
            (
                "[[step]]\ndo = \"cancel\"\nnode = \"alice\"\nexchange = \"bob#1\"\n".into(),
                "only its own exchanges",
            ),
            (
                "[[step]]\ndo = \"cancel\"\nnode = \"alice\"\nexchange = \"alice#0\"\n".into(),
                "an exchange label",
            ),
            (
                "[[step]]\ndo = \"cancel\"\nnode = \"alice\"\n".into(),
                "needs `exchange`",
            ),
            (
                "[[step]]\ndo = \"reject\"\nnode = \"alice\"\nto = \"bob\"\n".into(),
                "leaves requests pending",
            ),
            (
                "[[step]]\ndo = \"respond\"\nnode = \"alice\"\nto = \"bob\"\n".into(),
                "leaves requests pending",
            ),
        ];
        for (steps, want) in cases {
            let e = err(&format!("{base}\n{steps}"));
            assert!(e.contains(want), "{steps}: {e}");
        }
        let good =
            req("x", "") + &req("y", "after = \"x\"\nat = \"1s\"") + &req("z", "after = \"y\"");
        let scenario = Scenario::parse(&format!("{base}\n{good}"), "t", "t").unwrap();
        assert_eq!(scenario.nominal_time(2), Some(Duration::from_secs(1)));
    }

    #[test]
    fn counts() {
        assert!(Count::Exactly(3).holds(3));
        assert!(!Count::Exactly(3).holds(2));
        let r = Count::Range {
            min: Some(1),
            max: None,
        };
        assert!(r.holds(5) && !r.holds(0));
    }
}
