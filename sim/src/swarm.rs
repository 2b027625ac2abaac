//! Fault swarms: a scenario's `[swarm]` table asks for random faults, and each seed draws
//! its own schedule of them.
//!
//! From the seed, [`draw`] writes ordinary steps: within the fault window, `requests`
//! requests between random pairs of nodes that allow each other, and `faults` faults drawn
//! from `kinds` (partitions both ways and one way, holds, lossy links, message drops,
//! delays, corruption and Nacks keyed on message kinds, crashes of the nodes allowed to
//! crash, allow-list revocations, and, when `kinds` names them, graceful stops of those
//! nodes), each healed after a random time up to `max_fault`. Then
//! comes the healing phase: once everything is healed, each node sends a probe request to
//! a peer, and every probe must be answered (a failure does not count as progress there).
//! The steps run through the same machinery as written ones, so a drawn schedule can be
//! written out as a scenario file that replays it.

use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

use crate::scenario::{ActionKind, MessageMatch, MsgKind, Scenario, Step};
pub use crate::scenario::{FaultKind, SwarmPlan};

/// The payload of the probes of the healing phase.
pub const PROBE: &str = "liveness probe";

/// Whether `a` and `b` may exchange: each allows the other.
fn allowed(scenario: &Scenario, a: usize, b: usize) -> bool {
    let allows = |who: usize, whom: usize| {
        scenario.nodes[who]
            .allow
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| *n == scenario.nodes[whom].name))
    };
    a != b && allows(a, b) && allows(b, a)
}

/// The healing phase's probes at `at`: each node sends one request, with [`PROBE`] as
/// payload, to the first peer that allows it, that it allows, and whose application
/// answers (not `never`, `manual` or `reject`).
pub fn probe_steps(scenario: &Scenario, at: Duration) -> Vec<Step> {
    use crate::scenario::App;
    let n = scenario.nodes.len();
    let answers = |b: usize| {
        !matches!(
            scenario.nodes[b].app,
            App::Never | App::Manual | App::Reject
        )
    };
    let mut steps = Vec::new();
    for a in 0..n {
        if let Some(b) = (1..n)
            .map(|d| (a + d) % n)
            .find(|&b| allowed(scenario, a, b) && answers(b))
        {
            let mut probe = Step::new(ActionKind::Request);
            probe.at = Some(at);
            probe.from = Some(scenario.nodes[a].name.clone());
            probe.to = Some(scenario.nodes[b].name.clone());
            probe.payload = Some(PROBE.to_owned());
            steps.push(probe);
        }
    }
    steps
}

/// The steps a seed draws for `plan`, in time order.
pub fn draw(scenario: &Scenario, plan: &SwarmPlan, seed: u64) -> Vec<Step> {
    // Its own stream, so that drawing faults leaves the run's other draws unchanged.
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0x5357_4152_4d00_0001);
    let n = scenario.nodes.len();
    let name = |i: usize| Some(scenario.nodes[i].name.clone());
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|a| (0..n).map(move |b| (a, b)))
        .filter(|&(a, b)| allowed(scenario, a, b))
        .collect();
    let crashable: Vec<usize> = match &plan.crash {
        Some(names) => names
            .iter()
            .filter_map(|n| scenario.node_index(n))
            .collect(),
        None => (0..n).filter(|&i| scenario.durable_of(i)).collect(),
    };
    let window_ms = plan.window.as_millis().max(1) as u64;
    let max_fault_ms = plan.max_fault.as_millis().max(1) as u64;
    let mut pick = |below: u64| rng.next_u64() % below.max(1);
    let mut steps: Vec<Step> = Vec::new();
    let at = |ms: u64| Some(Duration::from_millis(ms));
    let mut last_heal = 0;
    // A node is crashed at most once at a time: until its restart, it is not drawn again.
    let mut down_until = vec![0u64; n];
    // (revoker, revoked, from, until): no request is drawn between them meanwhile.
    let mut revoked: Vec<(usize, usize, u64, u64)> = Vec::new();
    // (node, from, until): a node stopping or stopped sends nothing meanwhile (it refuses
    // new work of its own while it drains, rightly).
    let mut stopping: Vec<(usize, u64, u64)> = Vec::new();
    for _ in 0..plan.faults {
        let kind = plan.kinds[pick(plan.kinds.len() as u64) as usize];
        let start = pick(window_ms);
        let heal = start + 1 + pick(max_fault_ms);
        let (a, b) = {
            let a = pick(n as u64) as usize;
            let b = (a + 1 + pick(n as u64 - 1) as usize) % n;
            (a, b)
        };
        let mut fault = match kind {
            FaultKind::Partition => Step::new(ActionKind::Partition),
            FaultKind::PartitionOneway => Step::new(ActionKind::PartitionOneway),
            FaultKind::Hold => Step::new(ActionKind::Hold),
            FaultKind::FailRate => Step::new(ActionKind::FailRate),
            FaultKind::Crash => {
                if crashable.is_empty() {
                    continue;
                }
                Step::new(ActionKind::Crash)
            }
            FaultKind::Revoke => Step::new(ActionKind::Revoke),
            FaultKind::Stop => {
                if crashable.is_empty() {
                    continue;
                }
                Step::new(ActionKind::Stop)
            }
            FaultKind::DiskFull => {
                // Only a durable node commits, so only its disk can fill.
                if !crashable.iter().any(|&i| scenario.durable_of(i)) {
                    continue;
                }
                Step::new(ActionKind::DiskFull)
            }
            FaultKind::Drop => Step::new(ActionKind::Drop),
            FaultKind::Delay => Step::new(ActionKind::Delay),
            FaultKind::Corrupt => Step::new(ActionKind::Corrupt),
            FaultKind::Duplicate => Step::new(ActionKind::Duplicate),
            FaultKind::Nack => Step::new(ActionKind::Nack),
            FaultKind::Attack => Step::new(ActionKind::Attack),
        };
        fault.at = at(start);
        let heal_step = match kind {
            FaultKind::Partition | FaultKind::Hold => {
                fault.a = name(a);
                fault.b = name(b);
                let mut h = Step::new(if kind == FaultKind::Hold {
                    ActionKind::Release
                } else {
                    ActionKind::Repair
                });
                h.a = name(a);
                h.b = name(b);
                Some(h)
            }
            FaultKind::PartitionOneway => {
                fault.from = name(a);
                fault.to = name(b);
                let mut h = Step::new(ActionKind::RepairOneway);
                h.from = name(a);
                h.to = name(b);
                Some(h)
            }
            FaultKind::FailRate => {
                fault.a = name(a);
                fault.b = name(b);
                fault.rate = Some([0.05, 0.1, 0.2, 0.4][pick(4) as usize]);
                let mut h = Step::new(ActionKind::FailRate);
                h.a = name(a);
                h.b = name(b);
                h.rate = Some(0.0);
                Some(h)
            }
            FaultKind::Crash | FaultKind::Stop | FaultKind::DiskFull => {
                let node = crashable[pick(crashable.len() as u64) as usize];
                if down_until[node] >= start
                    || (kind == FaultKind::DiskFull && !scenario.durable_of(node))
                {
                    continue;
                }
                down_until[node] = heal;
                fault.node = name(node);
                if kind == FaultKind::Stop {
                    // The restart may come before the grace ends: a stop cut short.
                    fault.grace = Some(Duration::from_millis(1 + pick(max_fault_ms)));
                    stopping.push((node, start, heal));
                }
                if kind == FaultKind::DiskFull {
                    // Its handler stops at its next commit: it sends nothing meanwhile (a
                    // request to a stopped handler is refused, rightly).
                    stopping.push((node, start, heal));
                }
                let mut h = Step::new(ActionKind::Restart);
                h.node = name(node);
                Some(h)
            }
            FaultKind::Revoke => {
                // Only a peer the node allows: allowing it back must restore, not widen.
                if pairs.is_empty() {
                    continue;
                }
                let (a, b) = pairs[pick(pairs.len() as u64) as usize];
                revoked.push((a, b, start, heal));
                fault.node = name(a);
                fault.to = name(b);
                let mut h = Step::new(ActionKind::Allow);
                h.node = name(a);
                h.to = name(b);
                Some(h)
            }
            FaultKind::Attack => {
                use crate::scenario::AttackKind;
                let mut kind = AttackKind::ALL[pick(AttackKind::ALL.len() as u64) as usize];
                if scenario.records.is_some() && pick(4) == 0 {
                    // A replay of `b`'s previous record, when there is one by then.
                    kind = AttackKind::Replay;
                    fault.node = name(b);
                    fault.may_not_apply = true;
                }
                fault.attack = Some(kind);
                fault.to = name(a);
                match kind {
                    AttackKind::Flood => fault.count = Some(4 + pick(29) as u32),
                    AttackKind::Idle | AttackKind::Replay | AttackKind::Violation => {
                        // With the key of a peer the target allows.
                        let insiders: Vec<usize> =
                            (0..n).filter(|&i| allowed(scenario, a, i)).collect();
                        if insiders.is_empty() {
                            continue;
                        }
                        fault.from = name(insiders[pick(insiders.len() as u64) as usize]);
                    }
                    _ => {}
                }
                None
            }
            FaultKind::Drop
            | FaultKind::Delay
            | FaultKind::Corrupt
            | FaultKind::Duplicate
            | FaultKind::Nack => {
                let kinds = [MsgKind::Request, MsgKind::Ack, MsgKind::Reply];
                let msg_kind = if kind == FaultKind::Nack {
                    MsgKind::Request
                } else {
                    kinds[pick(3) as usize]
                };
                fault.matches = Some(MessageMatch {
                    kind: msg_kind,
                    from: name(a),
                    to: None,
                    of: None,
                    resend: None,
                });
                fault.count = Some(1 + pick(3) as u32);
                if matches!(kind, FaultKind::Delay | FaultKind::Duplicate) {
                    fault.by = Some(Duration::from_millis(50 + pick(450)));
                }
                None
            }
        };
        steps.push(fault);
        if let Some(mut h) = heal_step {
            h.at = at(heal);
            last_heal = last_heal.max(heal);
            steps.push(h);
        }
    }
    // Requests, after the faults so that none is drawn from a node that has revoked its
    // peer at that moment (the handler would refuse it, rightly).
    let limit = scenario
        .config
        .as_ref()
        .and_then(|c| c.get_ref().get("max_message_size"))
        .and_then(toml::Value::as_integer)
        .and_then(|n| usize::try_from(n).ok());
    for _ in 0..plan.requests {
        if pairs.is_empty() {
            break;
        }
        let (a, b) = pairs[pick(pairs.len() as u64) as usize];
        let mut when = pick(window_ms);
        // Past every window that forbids it; moving past one may land in another.
        let forbidden = |when: u64| {
            let revoking = revoked
                .iter()
                .find(|&&(x, y, from, until)| (x, y) == (a, b) && (from..=until).contains(&when));
            let stopped = stopping
                .iter()
                .find(|&&(x, from, until)| x == a && (from..=until).contains(&when));
            revoking.map(|r| r.3).or(stopped.map(|s| s.2))
        };
        while let Some(until) = forbidden(when) {
            when = until + 1;
        }
        let mut step = Step::new(ActionKind::Request);
        step.at = at(when);
        step.from = name(a);
        step.to = name(b);
        // With a limit written in [config] (swarm mode draws one for some seeds), every
        // third request is exactly at it.
        if limit.is_some() && steps.len().is_multiple_of(3) {
            step.size = limit;
        }
        steps.push(step);
    }
    if plan.probes {
        let after = last_heal.max(window_ms) + 200;
        steps.extend(probe_steps(scenario, Duration::from_millis(after)));
    }
    steps.sort_by_key(|s| s.at);
    steps
}

/// The random stream swarm mode draws from.
pub(crate) fn swarm_rng(seed: u64) -> ChaCha20Rng {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(u64::MAX);
    rng
}

/// Swarm mode: latency, loss, step timing and the storage fault drawn from the seed.
pub(crate) fn randomise(scenario: &mut Scenario, rng: &mut ChaCha20Rng) {
    let mut pick = |lo: u64, hi: u64| lo + rng.next_u64() % (hi - lo + 1);
    let min = pick(1, 20);
    let max = min + pick(0, 40);
    scenario.network.min_latency = Duration::from_millis(min);
    scenario.network.max_latency = Duration::from_millis(max);
    // A tick no longer than the shortest latency changes no latency by more than itself,
    // and a 5 ms tick takes about a third of the 1 ms tick's time (turmoil steps every
    // host's runtime every tick, whether or not anything is due).
    scenario.network.tick = Duration::from_millis(min.min(5));
    for step in &mut scenario.steps {
        let step = step.get_mut();
        if let Some(at) = step.at {
            // Shift each timed step by up to +-25% (at least +-50 ms).
            let spread = (at.as_millis() as u64 / 4).max(50);
            let shift = pick(0, 2 * spread);
            let at_ms = (at.as_millis() as u64 + shift).saturating_sub(spread);
            step.at = Some(Duration::from_millis(at_ms));
        }
    }
    // Half the seeds run with the storage fault (commits take 1-10 ms, and a crash during
    // one loses it), unless the scenario asks for it always.
    if pick(0, 1) == 1 {
        scenario.storage_fault = true;
        scenario.commit_latency = Duration::from_millis(pick(1, 10));
    }
    // A quarter of the seeds draw a message size limit (256 B to 64 KiB) and send every
    // third request step's payload at exactly that size: a message at the limit must pass.
    let mut limit = pick(256, 65_536) as usize;
    if scenario.membership.is_some() {
        // Signed documents must fit one message (a smaller limit is refused when the
        // operator offers one, and reported when a member asks): not what this draw tests.
        limit = limit.max(4_096);
    }
    if pick(0, 3) == 0 && scenario.limit_messages(limit) {
        size_every_third(scenario, 1, limit);
    }
    // A quarter of the seeds shrink the responder's tables to a few entries, so that runs
    // evict dedupe records and skip the reply cache (checked by the core's own bounds in
    // every step, and by the model): dedupe per peer 2-8, dedupe bytes 2-4 records per
    // peer, reply cache 16 B-4 KiB. At least two records per peer: one exchange may wait
    // for its reply's Ack while the next one arrives, and with no room at all the run
    // would only measure how long Busy lasts. (Queues keep their bound: a full queue
    // refuses the request, which only a scenario's own `refused = N` may expect.)
    let peers = scenario.nodes.len().saturating_sub(1).max(1) as u64;
    let (per_peer, records, cache) = (pick(2, 8), peers * pick(2, 4), pick(16, 4096));
    if pick(0, 3) == 0 {
        scenario.draw_config("dedupe_per_peer", per_peer as i64);
        scenario.draw_config("dedupe_bytes", (records * 256) as i64);
        scenario.draw_config("reply_cache_bytes", cache as i64);
    }
    // A quarter of the seeds send every third unsized request at one of the wire's own
    // boundaries (a Noise message exactly full, one byte over it, an IK first flight
    // exactly full and one byte over): a message at a limit nobody configured must pass
    // too.
    let boundary = WIRE_BOUNDARIES[pick(0, WIRE_BOUNDARIES.len() as u64 - 1) as usize];
    if pick(0, 3) == 0 && boundary <= scenario.smallest_message_limit() {
        size_every_third(scenario, 2, boundary);
    }
    draw_timing(scenario, &mut pick);
}

/// Sends every third request step with neither payload nor size (the `nth` of each three,
/// counting from 1) at `size` bytes.
fn size_every_third(scenario: &mut Scenario, nth: usize, size: usize) {
    let mut n = 0;
    for step in &mut scenario.steps {
        let step = step.get_mut();
        if step.action == ActionKind::Request && step.size.is_none() && step.payload.is_none() {
            n += 1;
            if n % 3 == nth % 3 {
                step.size = Some(size);
            }
        }
    }
}

/// Request payloads at the wire's boundaries: the largest that fits one Noise message
/// (its frame exactly `MAX_FRAME_LEN`), one byte more (a full frame, then a one-byte
/// chunk), and the same two around the largest Request an IK first flight carries.
pub(crate) const WIRE_BOUNDARIES: [usize; 4] = {
    use p2p_handler::wire::{EARLY_MAX_LEN, EXCHANGE_HEADER_LEN, MAX_CHUNK_LEN};
    // A message's FIRST chunk holds a flags byte and its 4-byte total length.
    let one_frame = MAX_CHUNK_LEN - 1 - 4 - EXCHANGE_HEADER_LEN;
    let early = EARLY_MAX_LEN - EXCHANGE_HEADER_LEN;
    [one_frame, one_frame + 1, early, early + 1]
};

/// A quarter of the seeds each: other timeouts and backoffs (within what the handler
/// documents; a scenario's own values stay), one-slot to eight-slot channels between the
/// handler's tasks, connections kept for reuse, and the driver's fault points; half of
/// those with the storage fault, torn commits.
fn draw_timing(scenario: &mut Scenario, pick: &mut impl FnMut(u64, u64) -> u64) {
    let ms = |n: u64| format!("{n}ms");
    let (ack, delay) = (pick(150, 2_000), pick(0, 20));
    let (backoff, factor) = (pick(10, 200), pick(2, 16));
    if pick(0, 3) == 0 {
        scenario.draw_config("ack_timeout", ms(ack));
        scenario.draw_config("ack_delay", ms(delay.min(ack / 2)));
        scenario.draw_config("backoff_initial", ms(backoff));
        scenario.draw_config("backoff_max", ms(backoff * factor));
    }
    let capacity = pick(1, 8);
    // Not with [membership] or [records]: their judges read the nodes' notices, and a
    // notice the application has not read when `channel_capacity` more are waiting is
    // dropped (counted in `Status::notices_dropped`), as documented.
    let notices_judged = scenario.membership.is_some() || scenario.records.is_some();
    if pick(0, 3) == 0 && !notices_judged {
        scenario.draw_config("channel_capacity", capacity as i64);
    }
    if pick(0, 3) == 0 {
        scenario.draw_config("reuse_connections", true);
    }
    // Half the seeds with the storage fault let commits land early (see `Scenario::torn`).
    if pick(0, 1) == 1 && scenario.storage_fault {
        scenario.torn = true;
    }
    // A quarter of the seeds turn the driver's fault points on (see `Scenario::buggify`).
    if pick(0, 3) == 0 {
        scenario.buggify = true;
    }
    // A quarter: other connect and handshake timeouts (300 ms-5 s: a dial to a crashed
    // host ends sooner, a slow handshake is cut sooner). (Not the queue per peer: a request
    // beyond it is refused at once, which the `refusals` rule rightly fails when the
    // scenario did not ask for it.)
    let (connect, handshake) = (pick(300, 5_000), pick(300, 5_000));
    if pick(0, 3) == 0 {
        scenario.draw_config("connect_timeout", ms(connect));
        scenario.draw_config("handshake_timeout", ms(handshake));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::scenario::tables::ALL;

    fn ring() -> Scenario {
        let text = "[[node]]\nname = \"a\"\nallow = [\"b\"]\n\n[[node]]\nname = \"b\"\nallow = [\"a\", \"c\"]\n\n\
                    [[node]]\nname = \"c\"\nallow = [\"b\"]\ndurable = false\n\n\
                    [swarm]\nfaults = 40\nrequests = 40\n";
        Scenario::parse(text, "<test>", "ring").unwrap()
    }

    #[test]
    fn the_drawn_tick_is_the_shortest_latency_up_to_5_ms() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let mut s = ring();
            randomise(&mut s, &mut swarm_rng(seed));
            let min = s.network.min_latency;
            assert_eq!(
                s.network.tick,
                min.min(Duration::from_millis(5)),
                "seed {seed}"
            );
            assert!(s.validate().is_ok(), "seed {seed}");
            seen.insert(s.network.tick);
        }
        assert_eq!(seen.len(), 5, "{seen:?}");
    }

    #[test]
    fn a_seed_draws_one_schedule_and_another_seed_another() {
        let s = ring();
        let plan = s.swarm.clone().unwrap();
        let one = format!("{:?}", draw(&s, &plan, 1));
        assert_eq!(one, format!("{:?}", draw(&s, &plan, 1)));
        assert_ne!(one, format!("{:?}", draw(&s, &plan, 2)));
    }

    #[test]
    fn a_stopping_node_is_restarted_and_sends_no_drawn_request_meanwhile() {
        let s = ring();
        let mut plan = s.swarm.clone().unwrap();
        plan.kinds = vec![FaultKind::Stop];
        let mut stops = 0;
        for seed in 0..50 {
            let steps = draw(&s, &plan, seed);
            let ms = |st: &Step| st.at.unwrap().as_millis() as u64;
            for (i, st) in steps.iter().enumerate() {
                if st.action != ActionKind::Stop {
                    continue;
                }
                stops += 1;
                assert_ne!(st.node.as_deref(), Some("c"), "c is not durable");
                assert!(st.grace.is_some_and(|g| !g.is_zero()), "{st:?}");
                let restart = steps[i..]
                    .iter()
                    .find(|r| r.action == ActionKind::Restart && r.node == st.node)
                    .expect("every stop is followed by a restart");
                let window = ms(st)..=ms(restart);
                assert!(
                    !steps.iter().any(|r| r.action == ActionKind::Request
                        && r.from == st.node
                        && window.contains(&ms(r))),
                    "seed {seed}: a request from {:?} while it stops",
                    st.node
                );
            }
        }
        assert!(stops > 50, "{stops}");
        // Not drawn unless named: the default kinds leave every schedule as it was.
        assert!(!ALL.contains(&FaultKind::Stop));
    }

    #[test]
    fn drawn_steps_respect_the_allow_lists_durability_and_the_healing_phase() {
        let s = ring();
        let plan = s.swarm.clone().unwrap();
        for seed in 0..50 {
            let steps = draw(&s, &plan, seed);
            let ms = |st: &Step| st.at.unwrap().as_millis() as u64;
            let mut with_steps = s.clone();
            with_steps.steps = steps
                .iter()
                .map(|st| toml::Spanned::new(0..0, st.clone()))
                .collect();
            with_steps.validate().unwrap();
            let last_heal = steps
                .iter()
                .filter(|st| st.action.is_heal() || st.rate == Some(0.0))
                .map(ms)
                .max()
                .unwrap_or(0);
            for st in &steps {
                let names = (st.from.as_deref(), st.to.as_deref());
                if st.action == ActionKind::Request {
                    // Only between nodes that allow each other: a-b and b-c.
                    assert!(
                        matches!(
                            names,
                            (Some("a"), Some("b"))
                                | (Some("b"), Some("a" | "c"))
                                | (Some("c"), Some("b"))
                        ),
                        "{st:?}"
                    );
                    if st.payload.as_deref() == Some(PROBE) {
                        assert!(ms(st) > last_heal, "probes come after the last heal");
                    }
                }
                if st.action == ActionKind::Crash {
                    assert_ne!(st.node.as_deref(), Some("c"), "c is not durable");
                }
                if st.action == ActionKind::Revoke {
                    let pair = (st.node.as_deref(), st.to.as_deref());
                    assert!(matches!(
                        pair,
                        (Some("a"), Some("b"))
                            | (Some("b"), Some("a" | "c"))
                            | (Some("c"), Some("b"))
                    ));
                }
            }
            let probes = steps
                .iter()
                .filter(|st| st.payload.as_deref() == Some(PROBE))
                .count();
            assert_eq!(probes, 3, "one per node");
        }
    }

    #[test]
    fn wire_boundaries_fill_a_noise_message_and_an_ik_first_flight_exactly() {
        use p2p_handler::wire::{
            EARLY_MAX_LEN, ExchangeId, MAX_CHUNK_LEN, MAX_FRAME_LEN, Message, TAG_LEN,
            chunk_message,
        };
        let request = |len: usize| Message::Request {
            exchange: ExchangeId(7),
            attempt: 1,
            payload: vec![0; len].into(),
        };
        let [one_frame, over, early, over_early] = WIRE_BOUNDARIES;
        let chunks = |len| {
            chunk_message(&request(len))
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>()
        };
        assert_eq!(MAX_CHUNK_LEN + TAG_LEN, MAX_FRAME_LEN);
        assert_eq!(chunks(one_frame), [MAX_CHUNK_LEN]);
        assert_eq!(chunks(over), [MAX_CHUNK_LEN, 2]);
        assert_eq!(request(early).encoded_len(), EARLY_MAX_LEN);
        assert_eq!(request(over_early).encoded_len(), EARLY_MAX_LEN + 1);
    }
}
