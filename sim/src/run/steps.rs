//! The step executor: each step of a scenario turned into a fault, a command to a node or
//! a handed-over document.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
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
    let name = {
        let mut s = lock(shared);
        s.nodes[node].up = false;
        s.nodes[node].commands = None;
        if let Some(switch) = s.nodes[node].crash_switch.take() {
            switch.set();
        }
        let name = s.names[node].clone();
        s.trace.push(
            sim.elapsed(),
            "sim",
            What::Fault {
                what: format!("crash {name}"),
                rule,
                link: None,
            },
        );
        name
    };
    sim.crash(name.as_str());
}

pub(super) fn restart(
    sim: &mut turmoil::Sim<'_>,
    shared: &Arc<Mutex<Shared>>,
    node: usize,
    rule: String,
) {
    let name = {
        let mut s = lock(shared);
        // A node still up is crashed by the bounce: its streams close in order too.
        if let Some(switch) = s.nodes[node].crash_switch.take() {
            switch.set();
        }
        let name = s.names[node].clone();
        s.trace.push(
            sim.elapsed(),
            "sim",
            What::Fault {
                what: format!("restart {name}"),
                rule,
                link: None,
            },
        );
        name
    };
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

pub(super) fn execute(
    sim: &mut turmoil::Sim<'_>,
    shared: &Arc<Mutex<Shared>>,
    scenario: &Scenario,
    timeline: &mut Timeline,
    index: usize,
    step: &Step,
    now: Duration,
) {
    let idx = |n: &Option<String>| {
        n.as_deref()
            .and_then(|n| scenario.node_index(n))
            .unwrap_or(0)
    };
    let name = |n: &Option<String>| n.clone().unwrap_or_default();
    let rule = lock(shared).rule_text(index);
    lock(shared).coverage.insert(coverage::step(step.action));
    if step.action.is_fault() || step.action.is_heal() {
        timeline.last_fault = now;
    }
    let fault = |what: String| {
        let mut s = lock(shared);
        s.trace.push(
            now,
            "sim",
            What::Fault {
                what,
                rule: rule.clone(),
                link: None,
            },
        );
    };
    let send = |node: usize, command: NodeCommand| {
        let s = lock(shared);
        match &s.nodes[node].commands {
            Some(tx) if s.nodes[node].up => tx.send(command).is_ok(),
            _ => false,
        }
    };
    let peer = |i: usize| lock(shared).keys[i].peer_id();
    let key = |i: usize| *lock(shared).keys[i].public_bytes();
    let addr = |i: usize| SocketAddr::new(sim.lookup(scenario.nodes[i].name.as_str()), PORT);
    // With records, requests go by peer id alone: the address comes from records.
    let by_id = scenario.records.is_some();
    use ActionKind as A;
    match step.action {
        A::Request => {
            let (from, to) = (idx(&step.from), idx(&step.to));
            let target = step.via.as_ref().map_or(to, |v| idx(&Some(v.clone())));
            let payload = match (step.size, &step.payload) {
                (Some(n), _) => Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>()),
                (None, Some(p)) => Bytes::from(p.clone()),
                (None, None) => Bytes::from(format!("hello from {}", name(&step.from))),
            };
            for _ in 0..step.count.unwrap_or(1) {
                let command = NodeCommand::Request {
                    to: peer(to),
                    addr: (!by_id || step.via.is_some()).then(|| addr(target)),
                    payload: payload.clone(),
                };
                if !send(from, command) {
                    fault(format!(
                        "request from {} skipped: node is down",
                        name(&step.from)
                    ));
                }
            }
        }
        A::Respond => {
            let _ = send(
                idx(&step.node),
                NodeCommand::Respond {
                    peer: peer(idx(&step.to)),
                },
            );
        }
        A::Allow => {
            let _ = send(
                idx(&step.node),
                NodeCommand::Allow {
                    key: key(idx(&step.to)),
                },
            );
            lock(shared).trace.push(
                now,
                &name(&step.node),
                What::App(format!("allow {}", name(&step.to))),
            );
        }
        A::Revoke => {
            let _ = send(
                idx(&step.node),
                NodeCommand::Revoke {
                    peer: peer(idx(&step.to)),
                },
            );
            lock(shared).trace.push(
                now,
                &name(&step.node),
                What::App(format!("revoke {}", name(&step.to))),
            );
        }
        A::AllowList => {
            let names: Vec<String> = step.peers.iter().flatten().cloned().collect();
            let keys = names.iter().map(|n| key(idx(&Some(n.clone())))).collect();
            let _ = send(idx(&step.node), NodeCommand::SetAllowList { keys });
            lock(shared).trace.push(
                now,
                &name(&step.node),
                What::App(format!("allow list [{}]", names.join(", "))),
            );
        }
        A::Partition => {
            fault(format!("partition {} | {}", name(&step.a), name(&step.b)));
            sim.partition(name(&step.a).as_str(), name(&step.b).as_str());
        }
        A::PartitionOneway => {
            fault(format!(
                "partition {} -> {}",
                name(&step.from),
                name(&step.to)
            ));
            sim.partition_oneway(name(&step.from).as_str(), name(&step.to).as_str());
        }
        A::Hold => {
            fault(format!("hold {} | {}", name(&step.a), name(&step.b)));
            sim.hold(name(&step.a).as_str(), name(&step.b).as_str());
        }
        A::Release => {
            fault(format!("release {} | {}", name(&step.a), name(&step.b)));
            sim.release(name(&step.a).as_str(), name(&step.b).as_str());
        }
        A::Repair => {
            fault(format!("repair {} | {}", name(&step.a), name(&step.b)));
            sim.repair(name(&step.a).as_str(), name(&step.b).as_str());
        }
        A::RepairOneway => {
            fault(format!("repair {} -> {}", name(&step.from), name(&step.to)));
            sim.repair_oneway(name(&step.from).as_str(), name(&step.to).as_str());
        }
        A::Membership => {
            let node = idx(&step.node);
            let made = {
                let mut s = lock(shared);
                match s.membership.as_mut() {
                    Some(m) => m.make(step, scenario),
                    None => Err("no [membership] table".to_owned()),
                }
            };
            match made {
                Ok(document) => {
                    let text = format!(
                        "hand membership epoch {} ({}) signed by {} to {}",
                        document.epoch(),
                        document.digest().short(),
                        document.signatures().len(),
                        name(&step.node)
                    );
                    let mut s = lock(shared);
                    s.trace.push(now, &name(&step.node), What::App(text));
                    s.last_handed = now;
                    drop(s);
                    let document = Box::new(document);
                    if !send(node, NodeCommand::OfferMembership { document }) {
                        fault(format!(
                            "membership for {} skipped: node is down",
                            name(&step.node)
                        ));
                    }
                }
                Err(e) => lock(shared).errors.push(format!("step {}: {e}", index + 1)),
            }
        }
        A::Crash => crash(sim, shared, idx(&step.node), rule.clone()),
        A::Stop => {
            let grace = step.grace.unwrap_or(DEFAULT_GRACE);
            if send(idx(&step.node), NodeCommand::Stop { grace }) {
                fault(format!("stop {} (grace {grace:?})", name(&step.node)));
            }
        }
        A::Restart => {
            if let Some(port) = step.port
                && let Some(r) = lock(shared).records.as_mut()
            {
                r.move_to(idx(&step.node), port);
            }
            restart(sim, shared, idx(&step.node), rule.clone())
        }
        A::OfferRecord => {
            let (receiver, owner) = (idx(&step.node), idx(&step.to));
            let record = {
                let mut s = lock(shared);
                offer_record(&mut s, step, owner, idx(&step.from))
            };
            match record {
                Ok((text, bytes)) => {
                    lock(shared)
                        .trace
                        .push(now, &name(&step.node), What::App(text));
                    if !send(
                        receiver,
                        NodeCommand::OfferRecords {
                            records: vec![bytes],
                        },
                    ) {
                        fault(format!(
                            "record for {} skipped: node is down",
                            name(&step.node)
                        ));
                    }
                }
                Err(e) => lock(shared).errors.push(format!("step {}: {e}", index + 1)),
            }
        }
        A::Latency => {
            let latency = step.latency.unwrap_or_default();
            fault(format!(
                "latency {} | {} = {latency:?}",
                name(&step.a),
                name(&step.b)
            ));
            sim.set_link_latency(name(&step.a).as_str(), name(&step.b).as_str(), latency);
        }
        A::FailRate => {
            let rate = step.rate.unwrap_or_default();
            fault(format!(
                "fail rate {} | {} = {rate}",
                name(&step.a),
                name(&step.b)
            ));
            sim.set_link_fail_rate(name(&step.a).as_str(), name(&step.b).as_str(), rate);
        }
        A::Drop | A::Delay | A::Duplicate | A::Corrupt | A::Nack => {
            if let Some(m) = &step.matches {
                let mut s = lock(shared);
                s.rules.push(Rule {
                    step: index,
                    action: step.action,
                    matches: Matcher::new(m, scenario),
                    delay: step.by.unwrap_or_default(),
                    remaining: step.count.unwrap_or(1),
                });
            }
        }
    }
}
