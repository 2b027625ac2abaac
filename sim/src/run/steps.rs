//! The step executor: each step of a scenario turned into a fault, a command to a node or
//! a handed-over document.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use p2p_handler::PeerId;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use super::PORT;
use super::node::{DEFAULT_GRACE, NodeCommand};
use super::tap::{Matcher, Rule};
use super::timeline::Timeline;
use super::world::{Shared, lock, now};
use crate::coverage;
use crate::scenario::{ActionKind, Scenario, Step};
use crate::trace::What;

pub(super) fn crash(
    sim: &mut turmoil::Sim<'_>,
    shared: &Arc<Mutex<Shared>>,
    node: usize,
    rule: String,
) {
    {
        let mut s = lock(shared);
        s.nodes[node].up = false;
        s.nodes[node].commands = None;
    }
    let name = cut_streams(sim, shared, node, "crash", rule);
    sim.crash(name.as_str());
}

/// Closes a node's streams in order (as its process dying would) and traces the fault;
/// returns the node's name.
fn cut_streams(
    sim: &turmoil::Sim<'_>,
    shared: &Arc<Mutex<Shared>>,
    node: usize,
    verb: &str,
    rule: String,
) -> String {
    let mut s = lock(shared);
    if let Some(switch) = s.nodes[node].crash_switch.take() {
        switch.set();
    }
    let name = s.names[node].clone();
    s.trace.push(
        sim.elapsed(),
        "sim",
        What::Fault {
            what: format!("{verb} {name}"),
            rule,
            link: None,
        },
    );
    name
}

pub(super) fn restart(
    sim: &mut turmoil::Sim<'_>,
    shared: &Arc<Mutex<Shared>>,
    node: usize,
    rule: String,
) {
    // A node still up is crashed by the bounce: its streams close in order too. An exit
    // its stopped handler asked for is overtaken by the restart.
    lock(shared).exits.retain(|(n, _)| *n != node);
    let name = cut_streams(sim, shared, node, "restart", rule);
    sim.bounce(name.as_str());
}

/// The record an `offer_record` step hands over, and how the trace says it.
pub(super) fn offer_record(
    s: &mut Shared,
    step: &Step,
    owner: usize,
    forger: usize,
) -> Result<(String, Bytes), String> {
    let tracker = s.records.as_ref().ok_or("no [records] table")?;
    let owner_name = s.names[owner].clone();
    match step.record.as_deref() {
        Some("previous") => {
            let published = tracker.published(owner);
            let [.., (seq, bytes), _] = published else {
                return Err(format!(
                    "{owner_name} published {} record(s): no previous one to replay",
                    published.len()
                ));
            };
            Ok((
                format!("hand {owner_name}'s previous record (seq {seq}) again"),
                bytes.clone(),
            ))
        }
        _ => {
            let document = s
                .membership
                .as_ref()
                .ok_or("no [membership] table")?
                .newest()
                .document()
                .clone();
            let signer = p2p_handler::records::RecordSigner::new(&s.keys[forger]);
            let issued = 1_700_000_000 + now().as_secs();
            let mut addr = tracker.listen_addr(forger);
            addr.set_port(addr.port().wrapping_add(1).max(1));
            let record = p2p_handler::records::Record {
                seq: u64::MAX / 2,
                issued,
                expires: issued + 600,
                addresses: vec![addr],
            };
            let mut rng = ChaCha20Rng::seed_from_u64(s.seed);
            rng.set_stream(0x7265_636f);
            let owner_key = *s.keys[owner].public_bytes();
            let sealed =
                p2p_handler::records::forge(&owner_key, &signer, &record, &document, &mut rng)
                    .map_err(|e| e.to_string())?;
            Ok((
                format!(
                    "hand a record of {owner_name} forged by {} (naming {addr})",
                    s.names[forger]
                ),
                sealed.bytes().clone(),
            ))
        }
    }
}

/// Runs step `index` now.
pub(super) fn execute(
    sim: &mut turmoil::Sim<'_>,
    shared: &Arc<Mutex<Shared>>,
    scenario: &Scenario,
    timeline: &mut Timeline,
    index: usize,
    step: &Step,
    now: Duration,
) {
    let rule = lock(shared).rule_text(index);
    lock(shared).coverage.insert(coverage::step(step.action));
    if step.action.is_fault() || step.action.is_heal() {
        timeline.last_fault = now;
    }
    if step.action == ActionKind::FailRate {
        let (a, b) = (Exec::name(&step.a), Exec::name(&step.b));
        timeline.set_fail_rate(&a, &b, step.rate.unwrap_or_default());
    }
    let mut exec = Exec {
        sim,
        shared,
        scenario,
        index,
        step,
        now,
        rule,
    };
    use ActionKind as A;
    match step.action {
        A::Request => exec.request(),
        A::Respond | A::Reject | A::Cancel | A::Allow | A::Revoke | A::AllowList => {
            exec.app_command()
        }
        A::Partition
        | A::PartitionOneway
        | A::Hold
        | A::Release
        | A::Repair
        | A::RepairOneway
        | A::Latency
        | A::FailRate => exec.network(),
        A::Crash | A::Stop | A::Restart | A::DiskFull => exec.node_fault(),
        A::Membership => exec.membership(),
        A::OfferRecord => exec.offer_record(),
        A::Attack => exec.attack(),
        A::Drop | A::Delay | A::Duplicate | A::Corrupt | A::Nack => exec.arm_rule(),
    }
}

/// One step being executed, and the helpers its actions share.
struct Exec<'a, 'b> {
    sim: &'a mut turmoil::Sim<'b>,
    shared: &'a Arc<Mutex<Shared>>,
    scenario: &'a Scenario,
    index: usize,
    step: &'a Step,
    now: Duration,
    /// Where the step came from, for the trace.
    rule: String,
}

impl Exec<'_, '_> {
    /// A node named by the step (the first node if absent: validation rules that out).
    fn idx(&self, n: &Option<String>) -> usize {
        n.as_deref()
            .and_then(|n| self.scenario.node_index(n))
            .unwrap_or(0)
    }

    fn name(n: &Option<String>) -> String {
        n.clone().unwrap_or_default()
    }

    /// Traces a fault (or a skipped step) on the simulator's lane.
    fn fault(&self, what: String) {
        let mut s = lock(self.shared);
        s.trace.push(
            self.now,
            "sim",
            What::Fault {
                what,
                rule: self.rule.clone(),
                link: None,
            },
        );
    }

    /// Traces what a step made a node's application do.
    fn app(&self, node: &Option<String>, text: String) {
        lock(self.shared)
            .trace
            .push(self.now, &Self::name(node), What::App(text));
    }

    /// The step could do nothing: traced, and (in the scenario's own run) a failure.
    fn idle(&self, why: String) {
        let text = format!("{:?} skipped: {why}", self.step.action).to_lowercase();
        self.fault(text);
        lock(self.shared).did_nothing(self.index, why);
    }

    /// Sends a command to a node; false when it is down.
    fn send(&self, node: usize, command: NodeCommand) -> bool {
        let s = lock(self.shared);
        match &s.nodes[node].commands {
            Some(tx) if s.nodes[node].up => tx.send(command).is_ok(),
            _ => false,
        }
    }

    fn peer(&self, i: usize) -> PeerId {
        lock(self.shared).keys[i].peer_id()
    }

    fn key(&self, i: usize) -> [u8; 32] {
        *lock(self.shared).keys[i].public_bytes()
    }

    fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.sim.lookup(self.scenario.nodes[i].name.as_str()), PORT)
    }

    fn request(&mut self) {
        let step = self.step;
        let (from, to) = (self.idx(&step.from), self.idx(&step.to));
        let target = step.via.as_ref().map_or(to, |v| self.idx(&Some(v.clone())));
        let payload = match (step.size, &step.payload) {
            (Some(n), _) => Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>()),
            (None, Some(p)) => Bytes::from(p.clone()),
            (None, None) => Bytes::from(format!("hello from {}", Self::name(&step.from))),
        };
        // With records, requests go by peer id alone: the address comes from records.
        let by_id = self.scenario.records.is_some();
        for _ in 0..step.count.unwrap_or(1) {
            let command = NodeCommand::Request {
                to: self.peer(to),
                addr: (!by_id || step.via.is_some()).then(|| self.addr(target)),
                payload: payload.clone(),
                deadline: step.deadline,
            };
            if !self.send(from, command) {
                self.fault(format!(
                    "request from {} skipped: node is down",
                    Self::name(&step.from)
                ));
            }
        }
    }

    /// Steps that change what a node's application or allow list does.
    fn app_command(&mut self) {
        let step = self.step;
        let node = self.idx(&step.node);
        let to = self.idx(&step.to);
        use ActionKind as A;
        match step.action {
            A::Respond | A::Reject => {
                let (peer, step) = (self.peer(to), self.index);
                let command = match self.step.action {
                    A::Respond => NodeCommand::Respond { peer, step },
                    _ => NodeCommand::Reject { peer, step },
                };
                if !self.send(node, command) {
                    self.idle(format!("{} is down", Self::name(&self.step.node)));
                }
            }
            A::Cancel => {
                let label = self.step.exchange.clone().unwrap_or_default();
                let found = lock(self.shared)
                    .labels
                    .iter()
                    .find(|(_, l)| **l == label)
                    .map(|((_, id), _)| *id);
                let Some(exchange) = found else {
                    self.idle(format!("no exchange {label} was issued"));
                    return;
                };
                let step = self.index;
                let command = NodeCommand::Cancel {
                    exchange,
                    label,
                    step,
                };
                if !self.send(node, command) {
                    self.idle(format!("{} is down", Self::name(&self.step.node)));
                }
            }
            A::Allow => {
                let _ = self.send(node, NodeCommand::Allow { key: self.key(to) });
                self.app(&step.node, format!("allow {}", Self::name(&step.to)));
            }
            A::Revoke => {
                let _ = self.send(
                    node,
                    NodeCommand::Revoke {
                        peer: self.peer(to),
                    },
                );
                self.app(&step.node, format!("revoke {}", Self::name(&step.to)));
            }
            _ => {
                let names: Vec<String> = step.peers.iter().flatten().cloned().collect();
                let keys = names
                    .iter()
                    .map(|n| self.key(self.idx(&Some(n.clone()))))
                    .collect();
                let _ = self.send(node, NodeCommand::SetAllowList { keys });
                self.app(&step.node, format!("allow list [{}]", names.join(", ")));
            }
        }
    }

    /// Partitions, holds, repairs, latency and loss: turmoil's own verbs.
    fn network(&mut self) {
        let step = self.step;
        let (a, b) = (Self::name(&step.a), Self::name(&step.b));
        let (from, to) = (Self::name(&step.from), Self::name(&step.to));
        let (a, b, from, to) = (a.as_str(), b.as_str(), from.as_str(), to.as_str());
        use ActionKind as A;
        let what = match step.action {
            A::Partition => format!("partition {a} | {b}"),
            A::PartitionOneway => format!("partition {from} -> {to}"),
            A::Hold => format!("hold {a} | {b}"),
            A::Release => format!("release {a} | {b}"),
            A::Repair => format!("repair {a} | {b}"),
            A::RepairOneway => format!("repair {from} -> {to}"),
            A::Latency => format!("latency {a} | {b} = {:?}", step.latency.unwrap_or_default()),
            _ => format!("fail rate {a} | {b} = {}", step.rate.unwrap_or_default()),
        };
        self.fault(what);
        {
            let link = |x: &str, y: &str| (x.to_owned(), y.to_owned());
            let mut s = lock(self.shared);
            match step.action {
                A::Partition | A::Hold => {
                    s.cut.insert(link(a.min(b), a.max(b)));
                }
                A::PartitionOneway => {
                    s.cut.insert(link(from, to));
                }
                A::Release | A::Repair => {
                    s.cut.remove(&link(a.min(b), a.max(b)));
                }
                A::RepairOneway => {
                    s.cut.remove(&link(from, to));
                }
                _ => {}
            }
        }
        let sim = &mut *self.sim;
        match step.action {
            A::Partition => sim.partition(a, b),
            A::PartitionOneway => sim.partition_oneway(from, to),
            A::Hold => sim.hold(a, b),
            A::Release => sim.release(a, b),
            A::Repair => sim.repair(a, b),
            A::RepairOneway => sim.repair_oneway(from, to),
            A::Latency => sim.set_link_latency(a, b, step.latency.unwrap_or_default()),
            _ => sim.set_link_fail_rate(a, b, step.rate.unwrap_or_default()),
        }
    }

    /// Crash, graceful stop, restart (on another port with records: a move).
    fn node_fault(&mut self) {
        let step = self.step;
        let node = self.idx(&step.node);
        match step.action {
            ActionKind::Crash => crash(self.sim, self.shared, node, self.rule.clone()),
            ActionKind::DiskFull => {
                let mut s = lock(self.shared);
                if s.nodes[node].up {
                    s.nodes[node]
                        .disk_full
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    drop(s);
                    self.fault(format!("disk full {}", Self::name(&step.node)));
                } else {
                    s.did_nothing(self.index, format!("{} is down", Self::name(&step.node)));
                }
            }
            ActionKind::Stop => {
                let grace = step.grace.unwrap_or(DEFAULT_GRACE);
                if self.send(node, NodeCommand::Stop { grace }) {
                    self.fault(format!("stop {} (grace {grace:?})", Self::name(&step.node)));
                }
            }
            _ => {
                if let Some(port) = step.port
                    && let Some(r) = lock(self.shared).records.as_mut()
                {
                    r.move_to(node, port);
                }
                restart(self.sim, self.shared, node, self.rule.clone());
            }
        }
    }

    /// A membership document made and signed as the step says, handed to a node.
    fn membership(&mut self) {
        let step = self.step;
        let node = self.idx(&step.node);
        let made = {
            let mut s = lock(self.shared);
            match s.membership.as_mut() {
                Some(m) => m.make(step, self.scenario),
                None => Err("no [membership] table".to_owned()),
            }
        };
        let document = match made {
            Ok(document) => document,
            Err(e) => {
                let e = format!("step {}: {e}", self.index + 1);
                lock(self.shared).errors.push(e);
                return;
            }
        };
        let text = format!(
            "hand membership epoch {} ({}) signed by {} to {}",
            document.epoch(),
            document.digest().short(),
            document.signatures().len(),
            Self::name(&step.node)
        );
        self.app(&step.node, text);
        lock(self.shared).last_handed = self.now;
        let document = Box::new(document);
        if !self.send(node, NodeCommand::OfferMembership { document }) {
            self.fault(format!(
                "membership for {} skipped: node is down",
                Self::name(&step.node)
            ));
        }
    }

    /// A replayed or forged record handed to a node as its directory would.
    fn offer_record(&mut self) {
        let step = self.step;
        let (receiver, owner) = (self.idx(&step.node), self.idx(&step.to));
        let forger = self.idx(&step.from);
        let record = offer_record(&mut lock(self.shared), step, owner, forger);
        match record {
            Ok((text, bytes)) => {
                self.app(&step.node, text);
                let records = vec![bytes];
                if !self.send(receiver, NodeCommand::OfferRecords { records }) {
                    self.fault(format!(
                        "record for {} skipped: node is down",
                        Self::name(&step.node)
                    ));
                }
            }
            Err(e) => {
                let e = format!("step {}: {e}", self.index + 1);
                lock(self.shared).errors.push(e);
            }
        }
    }

    /// A hostile peer's attack on `to`, handed to the hostile host.
    fn attack(&mut self) {
        use super::hostile::{Attack, AttackRecord, FLOOD, bound, violation};
        use crate::scenario::AttackKind;
        let step = self.step;
        let Some(kind) = step.attack else {
            return;
        };
        let target = self.idx(&step.to);
        let insider = step.from.as_ref().map(|_| self.idx(&step.from));
        let config = self.scenario.config_of(target);
        let allowed_for = match kind {
            AttackKind::Idle => config.idle_timeout,
            _ => config.handshake_timeout,
        };
        let bound = bound(allowed_for, self.scenario.network.max_latency);
        let connections = match kind {
            AttackKind::Flood => step.count.unwrap_or(FLOOD),
            _ => 1,
        };
        let addr = self.addr(target);
        let mut s = lock(self.shared);
        // Mixed, so that each step of a run draws its own violation and strangers.
        let seed = (s.seed ^ 0x4d41_4c4c)
            .wrapping_add(self.index as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut record = AttackRecord::new(self.index, kind, target, bound);
        record.insider = insider;
        record.incarnation = s.nodes[target].incarnation;
        record.open = connections;
        if kind == AttackKind::Violation {
            record.violation = Some(violation(seed).0);
        }
        let text = format!(
            "mallory: {} attack on {}{}{}",
            kind.name(),
            s.names[target],
            insider.map_or_else(String::new, |i| format!(" with {}'s key", s.names[i])),
            record
                .violation
                .map_or_else(String::new, |v| format!(": {v}"))
        );
        // A replay's record: the one `node` published before its newest.
        let replayed = (kind == AttackKind::Replay)
            .then(|| {
                let owner = self.idx(&step.node);
                let published = s.records.as_ref()?.published(owner);
                let [.., (_, bytes), _] = published else {
                    return None;
                };
                Some(bytes.clone())
            })
            .flatten();
        if kind == AttackKind::Replay && replayed.is_none() {
            drop(s);
            return self.idle("no earlier record to replay".into());
        }
        let attack = Attack {
            record: s.attacks.len(),
            record_bytes: replayed,
            kind,
            addr,
            target_name: s.names[target].clone(),
            key: insider.map(|i| s.keys[i].clone()),
            connections,
            bound,
            seed,
        };
        s.attacks.push(record);
        let sent = s
            .attacker
            .as_ref()
            .is_some_and(|tx| tx.send(attack).is_ok());
        if !sent {
            // The hostile host runs from the start of every run that has an attack.
            s.errors.push(format!(
                "step {}: the hostile host is not running",
                self.index + 1
            ));
        }
        drop(s);
        self.fault(text);
    }

    /// A message fault, armed until it has applied `count` times.
    fn arm_rule(&mut self) {
        let step = self.step;
        if let Some(m) = &step.matches {
            lock(self.shared).rules.push(Rule {
                step: self.index,
                action: step.action,
                matches: Matcher::new(m, self.scenario),
                delay: step.by.unwrap_or_default(),
                remaining: step.count.unwrap_or(1),
                applied: 0,
            });
        }
    }
}
