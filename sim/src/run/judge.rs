//! The judge: the invariants every run must keep and the scenario's expectations.

use p2p_handler::Status;

use super::timeline::Timeline;
use super::world::Shared;
use crate::scenario::{ActionKind, Scenario};

/// Judges a finished run: the invariants always, the expectations when asked.
pub(super) fn check(
    scenario: &Scenario,
    s: &mut Shared,
    statuses: &[Option<Status>],
    timeline: &Timeline,
    expectations: bool,
    quietly: bool,
    failures: &mut Vec<String>,
) {
    model(s, quietly, failures);
    let s = &*s;
    duplicates(s, failures);
    exactly_once(s, failures);
    nothing_lost(s, failures);
    attempts_bounded(scenario, s, failures);
    no_leaks(scenario, s, statuses, failures);
    counters(s, statuses, failures);
    healed(scenario, s, timeline, failures);
    membership(scenario, s, timeline, failures);
    records(s, failures);
    refusals(scenario, s, failures);
    super::hostile::judge(s, scenario.network.fail_rate > 0.0, failures);
    // They assume the scenario's own timing, so a swarm run, which shifts timing and
    // latency, checks only the invariants above.
    if expectations {
        expected(scenario, s, statuses, failures);
        unapplied(scenario, s, failures);
    }
}

/// A message fault that never applied, or a trigger that never fired, tested nothing: the
/// scenario's own steps (not those swarm drew) must each have done something.
fn unapplied(scenario: &Scenario, s: &Shared, failures: &mut Vec<String>) {
    // Steps the file wrote (swarm's are drawn blind) that must apply.
    let written = |step: usize| {
        scenario.step_lines.get(step).is_some_and(|l| *l > 0)
            && scenario
                .steps
                .get(step)
                .is_some_and(|s| !s.get_ref().may_not_apply)
    };
    for rule in s.rules.iter().filter(|r| written(r.step) && r.applied == 0) {
        failures.push(format!(
            "{}: `{:?}` never applied (no message matched it)",
            s.rule_text(rule.step),
            rule.action
        ));
    }
    for (step, why) in s.idle_steps.iter().filter(|(step, _)| written(*step)) {
        failures.push(format!("{}: did nothing ({why})", s.rule_text(*step)));
    }
    for w in s
        .waiting
        .iter()
        .filter(|w| written(w.step) && w.seen < w.nth)
    {
        failures.push(format!(
            "{}: never fired ({} of {} matching messages {})",
            s.rule_text(w.step),
            w.seen,
            w.nth,
            if w.sent { "sent" } else { "received" }
        ));
    }
}

/// The reference model's verdict (see `model.rs`), each violation naming its rule and
/// exchange. The end-of-run rules apply only to a run that ended `quietly` (not at the
/// time limit, where work may legitimately still be open).
fn model(s: &mut Shared, quietly: bool, failures: &mut Vec<String>) {
    let up = s.up();
    s.model.overdue(None, &up);
    if quietly {
        let live: Vec<Option<u64>> = (0..s.nodes.len())
            .map(|i| s.nodes[i].up.then(|| s.incarnation_key(i)))
            .collect();
        let by_peer = &s.by_peer;
        s.model.finish(
            |node, inc| live.get(node).copied().flatten() == Some(inc),
            |peer| by_peer.get(peer).copied(),
        );
    }
    let s = &*s;
    for v in s.model.violations().iter().take(10) {
        let label = |(dialer, id): (usize, _)| s.label(dialer, id);
        let detail = match v.other {
            Some(other) => v.detail.replace("{other}", &label(other)),
            None => v.detail.clone(),
        };
        match v.exchange {
            Some(x) => failures.push(format!("model ({}): {}: {detail}", v.rule, label(x))),
            None => failures.push(format!("model ({}): {detail}", v.rule)),
        }
    }
}

/// No request reaches an application twice.
fn duplicates(s: &Shared, failures: &mut Vec<String>) {
    // Invariant: no request reaches an application twice.
    for ((node, _, peer, exchange), n) in &s.delivered {
        if *n > 1 {
            let dialer = s.by_peer.get(peer).copied().unwrap_or(*node);
            failures.push(format!(
                "duplicate: {} delivered {} times to {}",
                s.label(dialer, *exchange),
                n,
                s.names[*node]
            ));
        }
    }
}

/// Every request ends in exactly one reply or failure (unless its node died).
fn exactly_once(s: &Shared, failures: &mut Vec<String>) {
    // Invariant: every request ends in exactly one reply or failure (unless its node died).
    for ((node, inc, exchange), n) in &s.outcomes {
        // A durable node's exchange outlives a crash: its outcome is owed after a restart.
        // A memory node's dies with a crash, but a graceful stop hands it back.
        let alive = (s.nodes[*node].up && s.incarnation_key(*node) == *inc)
            || s.stopped.contains(&(*node, *inc));
        if *n > 1 || (*n == 0 && alive) {
            failures.push(format!(
                "exchange {} ended {} times (exactly once expected)",
                s.label(*node, *exchange),
                n
            ));
        }
    }
}

/// Nothing acknowledged is lost: a request the dialer saw acknowledged by a durable
/// responder reached that responder's application (in some incarnation).
fn nothing_lost(s: &Shared, failures: &mut Vec<String>) {
    // Invariant: nothing acknowledged is lost: a request the dialer saw acknowledged by a
    // durable responder reached that responder's application (in some incarnation).
    for (dialer, responder, exchange) in &s.acked {
        let peer = s.keys[*dialer].peer_id();
        // Flagged redeliveries count: a commit that reached the disk though the crash
        // came before the handler acted on it (`torn`) makes the first handing-out after
        // the restart one flagged `redelivered` (the handler cannot know the application
        // never saw it).
        let reached = s
            .delivered
            .keys()
            .any(|(n, _, p, x)| n == responder && *p == peer && x == exchange)
            || s.redelivered.contains_key(&(*responder, peer, *exchange));
        if s.scenario.durable_of(*responder) && !reached {
            failures.push(format!(
                "lost: {} was acknowledged by {} but never reached its application",
                s.label(*dialer, *exchange),
                s.names[*responder]
            ));
        }
    }
}

/// Resends stay within the configured bound.
fn attempts_bounded(scenario: &Scenario, s: &Shared, failures: &mut Vec<String>) {
    // Invariant: resends stay within the configured bound. `max_attempts` bounds the tries
    // that reach the peer; those refused before the peer read them (a peer with too many
    // connections, a failed dial) are bounded by the exchange budget instead, though they
    // carry attempt numbers too. So: tries the responder read, at most `max_attempts`.
    for ((node, exchange), tries) in s.model.tries_received() {
        let max = scenario.config_of(*node).max_attempts;
        if tries.len() > max as usize {
            failures.push(format!(
                "{} reached its peer {} times; max_attempts is {max}",
                s.label(*node, *exchange),
                tries.len()
            ));
        }
    }
}

/// No connection or task leaks at the end, and every node up reports its status.
fn no_leaks(
    scenario: &Scenario,
    s: &Shared,
    statuses: &[Option<Status>],
    failures: &mut Vec<String>,
) {
    // Invariant: no connection or task leaks at the end.
    let open: u64 = statuses
        .iter()
        .flatten()
        .map(|st| st.open_connections as u64)
        .sum();
    let tasks: u64 = statuses
        .iter()
        .flatten()
        .map(|st| st.connection_tasks as u64)
        .sum();
    match scenario.expect.open_connections {
        Some(count) if !count.holds(open) => failures.push(format!(
            "open connections at the end: {open}, expected {count}"
        )),
        Some(_) => {}
        None if open > 0 || tasks > 0 => failures.push(format!(
            "leak: {open} connection(s) and {tasks} connection task(s) still open at the end"
        )),
        None => {}
    }
    for (i, status) in statuses.iter().enumerate() {
        if status.is_none() && s.nodes[i].up {
            failures.push(format!("{} did not report its status", s.names[i]));
        }
    }
}

/// The handler's counters (what an operator's metrics show) agree with what its
/// application saw, for each node up at the end (counters start afresh with each
/// incarnation, as the sim counts them).
fn counters(s: &Shared, statuses: &[Option<Status>], failures: &mut Vec<String>) {
    // Where a record may be gone (evicted from shrunk tables, the peer revoked or removed)
    // or a copy refused before the lookup (rate limits), a copy of a delivered request
    // need not count as a duplicate.
    let records_kept = s.rate_limited == 0
        && s.scenario.membership.is_none()
        && !s.scenario.steps.iter().any(|st| {
            matches!(
                st.get_ref().action,
                ActionKind::Revoke | ActionKind::AllowList | ActionKind::Attack
            )
        });
    for (i, status) in statuses.iter().enumerate() {
        let Some(status) = status else { continue };
        let name = &s.names[i];
        let mut wrong = |what: &str, said: u64, saw: String| {
            failures.push(format!(
                "model (counters): {name}: Stats::{what} says {said}, {saw}"
            ));
        };
        let stats = &status.stats;
        let node = &s.nodes[i];
        if stats.requests_delivered != node.requests_seen {
            let saw = format!("its application was handed {}", node.requests_seen);
            wrong("requests_delivered", stats.requests_delivered, saw);
        }
        if stats.resends != node.copies.resent {
            let saw = format!(
                "it sent {} Requests with an attempt above 1",
                node.copies.resent
            );
            wrong("resends", stats.resends, saw);
        }
        // Each Applied event applies one document or more, none beyond the newest made.
        let newest = s.membership.as_ref().map_or(0, |m| m.newest().epoch());
        let (events, docs) = (node.membership_applied, stats.membership_applied);
        if docs < events || docs > events.saturating_mul(newest) {
            let saw =
                format!("its application heard {events} Applied events (newest epoch {newest})");
            wrong("membership_applied", docs, saw);
        }
        let copies = &node.copies;
        for (what, said, saw) in traffic(stats, copies) {
            wrong(what, said, saw);
        }
        // A memory-only node's first copy of an exchange in an incarnation is never a
        // duplicate (it remembers nothing older).
        let repeats = copies.received - copies.distinct.len() as u64;
        if !s.scenario.durable_of(i) && stats.duplicates_dropped > repeats {
            let saw = format!(
                "it was handed {} Request copies of {} exchanges",
                copies.received,
                copies.distinct.len()
            );
            wrong("duplicates_dropped", stats.duplicates_dropped, saw);
        }
        let config = s.scenario.config_of(i);
        let default = p2p_handler::Config::default();
        let unbounded = config.dedupe_per_peer >= default.dedupe_per_peer
            && config.dedupe_bytes >= default.dedupe_bytes;
        if records_kept && unbounded && stats.duplicates_dropped < copies.after_delivery {
            let saw = format!(
                "it was handed {} copies of requests its application already had",
                copies.after_delivery
            );
            wrong("duplicates_dropped", stats.duplicates_dropped, saw);
        }
    }
}

/// The traffic counters against what the tap saw leave and arrive: each disagreement as
/// (counter, what it says, what was seen).
fn traffic(
    stats: &p2p_handler::endpoint::Stats,
    copies: &super::world::Copies,
) -> Vec<(&'static str, u64, String)> {
    let mut out = Vec::new();
    // What the tap saw leave and arrive pins the traffic counters down: every dial,
    // every Request (message 1's included), every Nack of the endpoint's own; Nacks
    // counted as received and replies counted as from the cache within what arrived
    // and left; IK message 1 Requests sent, and taken or refused, exactly.
    let exact = [
        (
            "dials + membership_sync_dials",
            stats.dials + stats.membership_sync_dials,
            copies.dials,
            "dials",
        ),
        (
            "requests_sent",
            stats.requests_sent,
            copies.requests_out,
            "Requests sent",
        ),
        (
            "nacks_sent + the simulator's injected Nacks",
            stats.nacks_sent + copies.nacks_injected,
            copies.nacks_out,
            "Nacks sent",
        ),
        (
            "early_requests_sent",
            stats.early_requests_sent,
            copies.early_out,
            "Requests sent in IK message 1",
        ),
        (
            "early_requests_taken + early_requests_refused",
            stats.early_requests_taken + stats.early_requests_refused,
            copies.early_in,
            "Requests arrived in IK message 1",
        ),
        (
            "early_requests_refused",
            stats.early_requests_refused,
            copies.early_refused_out,
            "Nacks EarlyRefused sent",
        ),
    ];
    for (what, said, saw, of) in exact {
        if said != saw {
            out.push((what, said, format!("the tap saw {saw} {of}")));
        }
    }
    if stats.nacks_received > copies.nacks_in {
        let saw = format!("only {} Nacks reached it", copies.nacks_in);
        out.push(("nacks_received", stats.nacks_received, saw));
    }
    let repeated = copies.replies_out - copies.replied.len() as u64;
    if stats.replies_from_cache > copies.replies_out || stats.replies_from_cache < repeated {
        let saw = format!(
            "it sent {} Replies to {} exchanges",
            copies.replies_out,
            copies.replied.len()
        );
        out.push(("replies_from_cache", stats.replies_from_cache, saw));
    }
    out
}

/// Progress and liveness once healed.
fn healed(scenario: &Scenario, s: &Shared, timeline: &Timeline, failures: &mut Vec<String>) {
    // Invariant: progress once healed. Probes sent after the last heal must be answered:
    // a failure ends an exchange but is not progress.
    for f in &s.probe_failures {
        failures.push(format!(
            "liveness: probe {f} (sent after the last heal) failed"
        ));
    }
    // Invariant: liveness once healed (a message fault that applied counts as a fault).
    let last_fault = timeline.last_fault.max(s.last_message_fault);
    if s.last_outcome > last_fault + scenario.liveness {
        failures.push(format!(
            "liveness: last exchange ended at {:?}, more than {:?} after the last fault ({:?})",
            s.last_outcome, scenario.liveness, last_fault
        ));
    }
}

/// Membership: every member of the newest document reached it, within `liveness` of
/// the last fault.
fn membership(scenario: &Scenario, s: &Shared, timeline: &Timeline, failures: &mut Vec<String>) {
    // Invariant (membership): every member of the newest document reached it, within
    // `liveness` of the last fault.
    if let Some(m) = &s.membership {
        let up = s.up();
        let behind = m.behind(&up);
        if let Some(target) = m.target()
            && !behind.is_empty()
        {
            let names: Vec<String> = behind
                .iter()
                .map(|&i| format!("{} (epoch {})", s.names[i], m.held(i).0))
                .collect();
            failures.push(format!(
                "membership: not every member reached epoch {} by the end: {}",
                target.epoch(),
                names.join(", ")
            ));
        }
        let since = timeline.last_fault.max(s.last_handed);
        if s.last_membership > since + scenario.liveness {
            failures.push(format!(
                "liveness: the last membership document was applied at {:?}, more than {:?} \
                 after the last fault or document handed over ({since:?})",
                s.last_membership, scenario.liveness
            ));
        }
    }
}

/// Records: no dial steered by a record its owner did not sign; every node up holds
/// every other's newest record.
fn records(s: &Shared, failures: &mut Vec<String>) {
    // Invariants (records): no dial steered by a record its owner did not sign; every node
    // up holds every other's newest record, within `liveness` of the last fault.
    if let Some(r) = &s.records {
        failures.extend(r.violations.iter().take(10).cloned());
        let up = s.up();
        let behind = r.behind(&up);
        if !behind.is_empty() {
            let pairs: Vec<String> = behind
                .iter()
                .map(|(receiver, owner)| {
                    format!("{} lacks {}'s newest", s.names[*receiver], s.names[*owner])
                })
                .collect();
            failures.push(format!(
                "records: not every node holds every other's newest record by the end: {}",
                pairs.join(", ")
            ));
        }
    }
}

/// A step the handler refused is a mistake in the scenario unless it says it expects
/// refusals (`refused = N`): otherwise it would pass having tested nothing.
fn refusals(scenario: &Scenario, s: &Shared, failures: &mut Vec<String>) {
    // A step the handler refused is a mistake in the scenario unless it says it expects
    // refusals (`refused = N`): otherwise it would pass having tested nothing.
    if scenario.expect.refused.is_none() {
        for why in &s.refused {
            failures.push(format!(
                "step refused by the handler ({why}); add `refused = N` to [expect] if intended"
            ));
        }
    }
}

/// The scenario's own expectations.
fn expected(
    scenario: &Scenario,
    s: &Shared,
    statuses: &[Option<Status>],
    failures: &mut Vec<String>,
) {
    // Scenario expectations (they assume the scenario's own timing, so a swarm run, which
    // shifts timing and latency, checks only the invariants above).
    let sum = |f: fn(&Status) -> u64| -> u64 { statuses.iter().flatten().map(f).sum() };
    let delivered = s
        .delivered
        .iter()
        .filter(|(k, _)| !s.probe_deliveries.contains(k))
        .map(|(_, n)| u64::from(*n))
        .sum::<u64>();
    let e = &scenario.expect;
    let redelivered = s.redelivered.values().map(|n| u64::from(*n)).sum::<u64>();
    let counts: [(&str, Option<crate::scenario::Count>, u64); 14] = [
        ("delivered", e.delivered, delivered),
        ("refused", e.refused, s.refused.len() as u64),
        ("redelivered", e.redelivered, redelivered),
        ("replied", e.replied, s.replied),
        ("failed", e.failed, s.failures.len() as u64),
        ("resends", e.resends, sum(|st| st.stats.resends)),
        ("redials", e.redials, sum(|st| st.stats.redials)),
        (
            "duplicates_dropped",
            e.duplicates_dropped,
            sum(|st| st.stats.duplicates_dropped),
        ),
        (
            "settled_refused",
            e.settled_refused,
            sum(|st| st.stats.settled_refused),
        ),
        (
            "replies_from_cache",
            e.replies_from_cache,
            sum(|st| st.stats.replies_from_cache),
        ),
        ("nacks", e.nacks, sum(|st| st.stats.nacks_received)),
        ("peer_errors", e.peer_errors, s.peer_errors),
        ("rate_limited", e.rate_limited, s.rate_limited),
        ("unconfirmed", e.unconfirmed, s.unconfirmed),
    ];
    let membership_counts = [
        (
            "membership_refused",
            e.membership_refused,
            s.membership_refused,
        ),
        ("membership_forks", e.membership_forks, s.membership_forks),
        (
            "records_refused",
            e.records_refused,
            s.records.as_ref().map_or(0, |r| r.refused),
        ),
        (
            "records_inactive",
            e.records_inactive,
            s.records.as_ref().map_or(0, |r| r.inactive),
        ),
    ];
    membership_epoch(s, e.membership_epoch, failures);
    for (what, want, got) in counts.into_iter().chain(membership_counts) {
        if let Some(want) = want
            && !want.holds(got)
        {
            failures.push(format!("expected {what} = {want}, got {got}"));
        }
    }
    if let Some(kind) = &e.failure {
        for f in &s.failures {
            if !f.starts_with(kind.as_str()) {
                failures.push(format!("expected failures of kind {kind}, got {f}"));
            }
        }
    }
    if let Some(within) = e.completes_within
        && s.last_outcome > within
    {
        failures.push(format!(
            "last exchange ended at {:?}, expected by {within:?}",
            s.last_outcome
        ));
    }
    if let Some(after) = e.completes_after
        && s.last_outcome < after
    {
        failures.push(format!(
            "last exchange ended at {:?}, expected after {after:?}",
            s.last_outcome
        ));
    }
}

/// `membership_epoch = N`: every member up holds epoch N at the end.
fn membership_epoch(s: &Shared, want: Option<u64>, failures: &mut Vec<String>) {
    if let (Some(want), Some(m)) = (want, &s.membership) {
        let up = s.up();
        for i in (0..s.names.len()).filter(|&i| up[i]) {
            let member = m
                .target()
                .is_none_or(|t| t.document().member(&s.keys[i].peer_id()).is_some());
            if member && m.held(i).0 != want {
                failures.push(format!(
                    "expected membership_epoch = {want} at {}, got {}",
                    s.names[i],
                    m.held(i).0
                ));
            }
        }
    }
}
