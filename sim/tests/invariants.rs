//! Each built-in invariant of the simulator, seen to fire: a scenario runs twice, once on
//! the real handler (it must pass: the scenario itself is sound) and once on a handler with
//! one defect planted on purpose (feature `sabotage`), where exactly the invariant meant to
//! catch that defect must fail, naming the exchange concerned.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

use p2p_handler::endpoint::Sabotage;
use p2p_sim::run::run;
use p2p_sim::scenario::Scenario;

/// Runs `text` as is, then with `defect`; returns the sabotaged run's failures.
fn caught(text: &str, defect: Sabotage) -> Vec<String> {
    let mut scenario = Scenario::parse(text, "<test>", "probe").unwrap();
    let sound = run(&scenario, scenario.seed, false);
    assert!(
        sound.passed(),
        "the scenario fails on the real handler: {:?}\n{}",
        sound.failures,
        sound.trace.text()
    );
    scenario.sabotage = Some(defect);
    let broken = run(&scenario, scenario.seed, false);
    assert!(!broken.passed(), "{defect:?} went unnoticed");
    broken.failures
}

fn one_matching(failures: &[String], what: &str) -> String {
    let hits: Vec<&String> = failures.iter().filter(|f| f.contains(what)).collect();
    assert!(!hits.is_empty(), "no failure with {what:?}: {failures:#?}");
    hits[0].clone()
}

const PAIR: &str = "[[node]]\nname = \"alice\"\n\n[[node]]\nname = \"bob\"\n";

#[test]
fn duplicate_delivery_is_caught_when_dedupe_is_off() {
    // Bob's Ack is lost and he is slow to answer: Alice's resend meets his record.
    let text = format!(
        "[config]\nack_timeout = \"200ms\"\n\n{PAIR}app = {{ slow = {{ reply_after = \"600ms\" }} }}\n\n\
         [[step]]\ndo = \"drop\"\nmatch = {{ kind = \"ack\", from = \"bob\", of = \"request\" }}\ncount = 1\n\n\
         [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n"
    );
    let failures = caught(&text, Sabotage::NoDedupe);
    let f = one_matching(&failures, "duplicate:");
    assert!(f.contains("alice#1 delivered 2 times to bob"), "{f}");
}

#[test]
fn a_second_outcome_is_caught() {
    let text = format!("{PAIR}\n[[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n");
    let failures = caught(&text, Sabotage::DoubleOutcome);
    let f = one_matching(&failures, "exactly once expected");
    assert!(f.contains("exchange alice#1 ended 2 times"), "{f}");
}

#[test]
fn an_acknowledged_request_that_never_reaches_a_durable_application_is_caught() {
    let text = "[config]\nresponse_timeout = \"500ms\"\n\n[[node]]\nname = \"alice\"\n\n\
                [[node]]\nname = \"bob\"\ndurable = true\n\n\
                [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n";
    let failures = caught(text, Sabotage::SwallowDelivery);
    let f = one_matching(&failures, "lost:");
    assert!(
        f.contains("alice#1 was acknowledged by bob but never reached its application"),
        "{f}"
    );
}

#[test]
fn one_attempt_too_many_is_caught() {
    // Bob refuses every copy, so Alice uses all her attempts.
    let text = "[config]\nmax_attempts = 3\nbackoff_initial = \"20ms\"\n\n\
                [[node]]\nname = \"alice\"\n\n[[node]]\nname = \"bob\"\n\
                app = { refuse = { first = 100 } }\n\n\
                [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n";
    let failures = caught(text, Sabotage::ExtraResend);
    let f = one_matching(&failures, "max_attempts is 3");
    assert!(f.contains("alice#1 reached its peer 4 times"), "{f}");
}

#[test]
fn connections_left_open_are_caught() {
    let text = format!(
        "[config]\nreuse_connections = true\nidle_timeout = \"1s\"\n\n{PAIR}\n\
         [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n"
    );
    let failures = caught(&text, Sabotage::KeepIdleConnections);
    let f = one_matching(&failures, "leak:");
    assert!(f.contains("2 connection(s)"), "{f}");
}

#[test]
fn progress_too_slow_after_the_last_heal_is_caught() {
    let text = format!(
        "liveness = \"10s\"\nduration = \"300s\"\n\n[config]\nconnect_timeout = \"200ms\"\n\
         backoff_initial = \"200ms\"\nbackoff_max = \"400ms\"\nmax_attempts = 30\n\n{PAIR}\n\
         [[step]]\ndo = \"partition\"\na = \"alice\"\nb = \"bob\"\n\n\
         [[step]]\nat = \"10ms\"\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n\n\
         [[step]]\nat = \"1s\"\ndo = \"repair\"\na = \"alice\"\nb = \"bob\"\n"
    );
    let failures = caught(&text, Sabotage::SlowRetries);
    let f = one_matching(&failures, "liveness:");
    assert!(f.contains("after the last fault (1s)"), "{f}");
}

#[test]
fn a_probe_after_the_last_heal_that_fails_is_caught() {
    // Every exchange ends (a failure is an ending), but nothing works any more: the
    // healing phase's probe is refused an answer, and that is not progress.
    let text = format!(
        "probes = true\n\n[config]\nresponse_timeout = \"500ms\"\n\n{PAIR}durable = false\n\n\
         [[step]]\ndo = \"partition\"\na = \"alice\"\nb = \"bob\"\n\n\
         [[step]]\nat = \"300ms\"\ndo = \"repair\"\na = \"alice\"\nb = \"bob\"\n"
    );
    let failures = caught(&text, Sabotage::SwallowDelivery);
    let f = one_matching(&failures, "liveness: probe");
    assert!(f.contains("(sent after the last heal) failed"), "{f}");
    assert!(f.contains("did not answer in time"), "{f}");
}

const COMMITTEE: &str = "[membership]\ncommittee = 3\nthreshold = 2\n\n\
                         [[node]]\nname = \"a\"\n\n[[node]]\nname = \"b\"\n\n[[node]]\nname = \"c\"\n";

#[test]
fn a_membership_document_applied_without_a_threshold_is_caught() {
    // One committee signature of two needed: the real handler refuses it.
    let text = format!(
        "{COMMITTEE}\n[[step]]\nat = \"1s\"\ndo = \"membership\"\nnode = \"a\"\n\
         members = [\"a\", \"b\"]\nsigners = [0]\n\n[expect]\nmembership_refused = 1\n"
    );
    let failures = caught(&text, Sabotage::MembershipIgnoresSignatures);
    let f = one_matching(&failures, "which no threshold of the committee signed");
    assert!(f.contains("a applied epoch 2"), "{f}");
}

#[test]
fn a_membership_document_that_does_not_spread_is_caught() {
    let text = format!(
        "{COMMITTEE}\n[[step]]\nat = \"1s\"\ndo = \"membership\"\nnode = \"a\"\n\
         members = [\"a\", \"b\", \"c\"]\n"
    );
    let failures = caught(&text, Sabotage::MembershipNoSpread);
    let f = one_matching(&failures, "not every member reached epoch 2");
    assert!(
        f.contains("b (epoch 1)") && f.contains("c (epoch 1)"),
        "{f}"
    );
}

const RECORDS: &str = "duration = \"40s\"\n\n[membership]\ncommittee = 3\nthreshold = 2\n\n\
                       [records]\nttl = \"60s\"\n\n\
                       [[node]]\nname = \"a\"\n\n[[node]]\nname = \"b\"\n\n[[node]]\nname = \"c\"\n";

#[test]
fn a_dial_steered_by_a_forged_record_is_caught() {
    // b forges a record of c naming b's own host; the real handler refuses it, so a's
    // request reaches the real c.
    let text = format!(
        "{RECORDS}\n[[step]]\nat = \"2s\"\ndo = \"offer_record\"\nnode = \"a\"\nto = \"c\"\n\
         record = \"forged\"\nfrom = \"b\"\n\n\
         [[step]]\nat = \"3s\"\ndo = \"request\"\nfrom = \"a\"\nto = \"c\"\n\n\
         [expect]\nrecords_refused = 1\nreplied = 1\n"
    );
    let failures = caught(&text, Sabotage::RecordsIgnoreSignatures);
    let f = one_matching(&failures, "never published");
    assert!(f.contains("a dialed c at"), "{f}");
}

#[test]
fn records_that_do_not_spread_are_caught() {
    let failures = caught(RECORDS, Sabotage::RecordsNoSpread);
    let f = one_matching(
        &failures,
        "not every node holds every other's newest record",
    );
    assert!(f.contains("a lacks b's newest"), "{f}");
}

#[test]
fn a_fault_or_trigger_that_never_applied_fails_the_run_unless_the_step_allows_it() {
    // Bob sends no Request, so neither step below ever meets a message.
    let steps = "[[step]]\ndo = \"drop\"\nmatch = { kind = \"request\", from = \"bob\" }\n\n\
                 [[step]]\non = { kind = \"request\", from = \"bob\" }\ndo = \"crash\"\nnode = \"alice\"\n\n\
                 [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n";
    let text = format!("{PAIR}\n{steps}");
    let scenario = Scenario::parse(&text, "<test>", "probe").unwrap();
    let outcome = run(&scenario, scenario.seed, false);
    let f = one_matching(&outcome.failures, "`Drop` never applied");
    assert!(f.starts_with("step 1, line 7"), "{f}");
    let f = one_matching(&outcome.failures, "never fired");
    assert!(
        f.contains("step 2") && f.contains("0 of 1 matching messages received"),
        "{f}"
    );
    // Marked as a negative test, both pass; and a swarm run (steps drawn blind) never
    // counts them.
    let marked = text.replace(
        "from = \"bob\" }\n",
        "from = \"bob\" }\nmay_not_apply = true\n",
    );
    let scenario = Scenario::parse(&marked, "<test>", "probe").unwrap();
    let outcome = run(&scenario, scenario.seed, false);
    assert!(outcome.passed(), "{:?}", outcome.failures);
    let scenario = Scenario::parse(&text, "<test>", "probe").unwrap();
    assert!(run(&scenario, 7, true).passed());
}

#[test]
fn the_final_ack_and_the_close_pass_the_tap() {
    // Dropping the Ack of the Reply (sent in the same instant as the Close) applies: Bob
    // never hears it and reports the reply unconfirmed. Dropping the Close applies too.
    let text = format!(
        "[config]\nreply_ack_timeout = \"300ms\"\n\n{PAIR}\n\
         [[step]]\ndo = \"drop\"\nmatch = {{ kind = \"ack\", of = \"reply\" }}\n\n\
         [[step]]\ndo = \"drop\"\nmatch = {{ kind = \"close\" }}\n\n\
         [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n\n\
         [expect]\nreplied = 1\nunconfirmed = 1\n"
    );
    let scenario = Scenario::parse(&text, "<test>", "probe").unwrap();
    let outcome = run(&scenario, scenario.seed, false);
    assert!(outcome.passed(), "{:?}", outcome.failures);
    let trace = outcome.trace.text();
    assert!(trace.contains("fault drop Ack(Reply) alice#1"), "{trace}");
    assert!(trace.contains("fault drop Close(Done)"), "{trace}");
    assert!(trace.contains("reply alice#1 unconfirmed"), "{trace}");
    assert!(outcome.coverage.contains("message Close"));
}

#[test]
fn a_step_after_another_keeps_its_order_whatever_swarm_does_to_the_times() {
    // The restart is written 1 ms after the crash; swarm shifts every time by up to 25% (at
    // least 50 ms), so without `after` a sweep would restart Bob before it crashes him.
    let text = format!(
        "{PAIR}durable = true\n\n\
         [[step]]\nname = \"down\"\nat = \"300ms\"\ndo = \"crash\"\nnode = \"bob\"\n\n\
         [[step]]\nafter = \"down\"\nat = \"1ms\"\ndo = \"restart\"\nnode = \"bob\"\n\n\
         [[step]]\nat = \"10ms\"\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n"
    );
    let scenario = Scenario::parse(&text, "<test>", "probe").unwrap();
    for seed in 0..20 {
        let outcome = run(&scenario, seed, true);
        assert!(outcome.passed(), "seed {seed}: {:?}", outcome.failures);
        let trace = outcome.trace.text();
        let crash = trace.find("fault crash bob").expect("crashed");
        let restart = trace.find("fault restart bob").expect("restarted");
        assert!(
            crash < restart,
            "seed {seed}: restart before crash\n{trace}"
        );
    }
}

#[test]
fn application_steps_that_find_nothing_to_act_on_fail_the_run() {
    // Bob holds nothing from Alice when told to answer or refuse; Alice cancels an exchange
    // she never made and one already finished.
    let text = "[[node]]\nname = \"alice\"\n\n[[node]]\nname = \"bob\"\napp = \"manual\"\n\n\
                [[step]]\ndo = \"respond\"\nnode = \"bob\"\nto = \"alice\"\n\n\
                [[step]]\ndo = \"reject\"\nnode = \"bob\"\nto = \"alice\"\n\n\
                [[step]]\ndo = \"cancel\"\nnode = \"alice\"\nexchange = \"alice#7\"\n";
    let scenario = Scenario::parse(text, "<test>", "probe").unwrap();
    let failures = run(&scenario, scenario.seed, false).failures;
    assert!(
        one_matching(&failures, "step 1").contains("did nothing (respond to alice:"),
        "{failures:?}"
    );
    assert!(
        one_matching(&failures, "step 2")
            .contains("did nothing (reject a request from alice: nothing pending)"),
        "{failures:?}"
    );
    assert!(
        one_matching(&failures, "step 3").contains("no exchange alice#7 was issued"),
        "{failures:?}"
    );
}

// The reference model's rules (sim/src/run/model.rs), each seen to fire on a defect
// planted for it, naming the rule and the exchange.

#[test]
fn queued_exchanges_leaving_out_of_order_are_caught_by_the_model() {
    // Three requests to Bob at once: the second and third wait behind the first, and must
    // leave in the order they were made.
    let text =
        format!("{PAIR}\n[[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\ncount = 3\n");
    let failures = caught(&text, Sabotage::QueueOutOfOrder);
    let f = one_matching(&failures, "model (order)");
    assert!(f.contains("alice#3: sent (try 1) while alice#2"), "{f}");
}

#[test]
fn a_resend_that_repeats_its_attempt_number_is_caught_by_the_model() {
    let text = format!(
        "{PAIR}\n[[step]]\ndo = \"nack\"\nmatch = {{ kind = \"request\", from = \"alice\" }}\n\n\
         [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n"
    );
    let failures = caught(&text, Sabotage::AttemptRepeated);
    let f = one_matching(&failures, "model (attempts)");
    assert!(
        f.contains("alice#1: a copy with try 1 after one with try 1"),
        "{f}"
    );
}

#[test]
fn a_repeated_reply_left_unacknowledged_is_caught_by_the_model() {
    // Bob's Reply goes twice (a stale copy 50 ms later, on the same connection, which
    // connection reuse keeps open): the dialer must Ack the repeat too.
    let text = format!(
        "[config]\nreuse_connections = true\n\n{PAIR}\n\
         [[step]]\ndo = \"duplicate\"\nby = \"50ms\"\nmatch = {{ kind = \"reply\", from = \"bob\" }}\n\n\
         [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n"
    );
    let failures = caught(&text, Sabotage::NoAckOfRepeatedReply);
    let f = one_matching(&failures, "model (final Ack)");
    assert!(
        f.contains("alice#1: its Reply (try 1) was never acknowledged"),
        "{f}"
    );
}

#[test]
fn a_reply_that_ends_without_a_responder_side_outcome_is_caught_by_the_model() {
    let text = format!(
        "[config]\nreply_ack_timeout = \"300ms\"\n\n{PAIR}\n\
         [[step]]\ndo = \"drop\"\nmatch = {{ kind = \"ack\", of = \"reply\" }}\n\n\
         [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n"
    );
    let failures = caught(&text, Sabotage::SilentUnconfirmed);
    let f = one_matching(&failures, "model (responder outcome)");
    assert!(
        f.contains("alice#1: delivered to bob, which never reported how it ended"),
        "{f}"
    );
}

#[test]
fn a_revoked_peer_left_connected_is_caught_by_the_model() {
    // Bob holds Alice's request (slow app) when he revokes her.
    let text = "[[node]]\nname = \"alice\"\n\n[[node]]\nname = \"bob\"\n\
                app = { slow = { reply_after = \"2s\" } }\n\n\
                [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n\n\
                [[step]]\nat = \"200ms\"\ndo = \"revoke\"\nnode = \"bob\"\nto = \"alice\"\n";
    let failures = caught(text, Sabotage::RevokeKeepsConnections);
    let f = one_matching(&failures, "model (revoked)");
    assert!(f.contains("bob still connected to alice"), "{f}");
}

#[test]
fn a_message_of_exactly_the_size_limit_refused_is_caught_by_the_model() {
    let text = format!(
        "[config]\nmax_message_size = 1000\n\n{PAIR}\n\
         [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\nsize = 1000\n"
    );
    let failures = caught(&text, Sabotage::OffByOneMaxSize);
    let f = one_matching(&failures, "model (size limit)");
    assert!(
        f.contains("alice#1: 1000 B refused as too large, though both ends take 1000 B"),
        "{f}"
    );
}

#[test]
fn a_dedupe_table_over_its_bound_is_caught_by_the_core_tables_rule() {
    // Room for two records; three requests in turn leave three finished ones behind.
    let text = format!(
        "[config]\ndedupe_bytes = 512\n\n{PAIR}\n\
         [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\ncount = 3\n"
    );
    let failures = caught(&text, Sabotage::DedupeOverBound);
    let f = one_matching(&failures, "model (tables): bob");
    assert!(
        f.contains("dedupe records over dedupe_bytes: 3 records > 2"),
        "{f}"
    );
}

#[test]
fn tries_refused_before_the_peer_read_them_do_not_count_against_max_attempts() {
    // Bob tracks one peer and Alice holds him for 2 s: Carol's tries are closed
    // TooManyConnections before Bob reads them, many more than her max_attempts of 2.
    // The handler bounds those by the exchange budget (time), not by the count, and the
    // attempts invariant counts only tries that reached Bob.
    let text = "[[node]]\nname = \"alice\"\n\n\
                [[node]]\nname = \"bob\"\napp = { slow = { reply_after = \"2s\" } }\n\
                config = { max_tracked_peers = 1 }\n\n\
                [[node]]\nname = \"carol\"\n\
                config = { max_attempts = 2, backoff_initial = \"50ms\", backoff_max = \"100ms\" }\n\n\
                [[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n\n\
                [[step]]\nat = \"100ms\"\ndo = \"request\"\nfrom = \"carol\"\nto = \"bob\"\n";
    let scenario = Scenario::parse(text, "<test>", "probe").unwrap();
    let outcome = run(&scenario, scenario.seed, false);
    assert!(outcome.passed(), "{:?}", outcome.failures);
    let trace = outcome.trace.text();
    assert!(trace.contains("Request carol#1 try 5"), "{trace}");
    assert!(trace.contains("event reply carol#1"), "{trace}");
}

#[test]
fn a_counter_that_disagrees_with_the_application_is_caught() {
    let text =
        format!("{PAIR}\n[[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\ncount = 2\n");
    let failures = caught(&text, Sabotage::UncountedDelivery);
    let f = one_matching(&failures, "model (counters)");
    assert!(
        f.contains("bob: Stats::requests_delivered says 0, its application was handed 2"),
        "{f}"
    );
}

#[test]
fn an_early_request_the_responder_does_not_count_is_caught() {
    // Alice knows Bob's key, so her first dial carries the request in IK message 1; Bob
    // takes it there, and must count it.
    let text = format!("{PAIR}\n[[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n");
    let failures = caught(&text, Sabotage::UncountedEarlyRequest);
    let f = one_matching(&failures, "model (counters)");
    assert!(
        f.contains("bob: Stats::early_requests_taken + early_requests_refused says 0")
            && f.contains("the tap saw 1 Requests arrived in IK message 1"),
        "{f}"
    );
}

#[test]
fn a_violation_the_node_does_not_report_is_caught_by_the_hostile_rule() {
    // Alice's key, in a hostile host's hands, breaks the protocol on an established
    // session: Bob must tell it why, hang up, and report it naming Alice.
    let text = format!(
        "{PAIR}\n[[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n\n\
         [[step]]\nat = \"100ms\"\ndo = \"attack\"\nattack = \"violation\"\nfrom = \"alice\"\nto = \"bob\"\n"
    );
    let failures = caught(&text, Sabotage::UnreportedViolation);
    let f = one_matching(&failures, "hostile:");
    assert!(
        f.contains("bob reported no peer error naming alice after"),
        "{f}"
    );
}

#[test]
fn every_attack_ends_in_a_closed_connection_and_the_run_says_so() {
    let mut text = format!("{PAIR}\n[[step]]\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n");
    for (i, attack) in [
        "silent",
        "garbage",
        "slow",
        "stranger",
        "flood",
        "violation",
    ]
    .iter()
    .enumerate()
    {
        let from = if *attack == "violation" {
            "from = \"alice\"\n"
        } else {
            ""
        };
        text.push_str(&format!(
            "\n[[step]]\nat = \"{}ms\"\ndo = \"attack\"\nattack = \"{attack}\"\nto = \"bob\"\n{from}",
            100 * (i + 1)
        ));
    }
    let scenario = Scenario::parse(&text, "<test>", "probe").unwrap();
    let outcome = run(&scenario, scenario.seed, false);
    assert!(outcome.passed(), "{:?}", outcome.failures);
    let trace = outcome.trace.text();
    for attack in ["silent", "garbage", "slow", "stranger", "violation"] {
        assert!(
            trace.contains(&format!(
                "mallory's {attack} connection to bob: closed by the node"
            )),
            "{attack}: {trace}"
        );
    }
    let floods = trace
        .matches("mallory's flood connection to bob: closed by the node")
        .count();
    assert_eq!(floods, 32, "{trace}");
}

#[test]
fn a_silent_session_the_node_never_closes_is_caught_by_the_hostile_rule() {
    let text = format!(
        "{PAIR}\nconfig = {{ idle_timeout = \"1s\" }}\n\n\
         [[step]]\ndo = \"attack\"\nattack = \"idle\"\nfrom = \"alice\"\nto = \"bob\"\n"
    );
    let failures = caught(&text, Sabotage::KeepIdleConnections);
    let f = one_matching(&failures, "hostile:");
    assert!(
        f.contains("bob kept 1 of mallory's connections open for"),
        "{f}"
    );
}

#[test]
fn a_commit_that_landed_as_the_node_died_still_gets_its_outcome_reported() {
    // Under torn commits, seed 15 of this scenario has Bob's commit of "Alice has my
    // reply" reach his disk just before he crashes, before his application heard of it.
    // The restarted Bob must tell it, flagged: the model wants one responder outcome.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scenarios/crash-responder-after-final-ack.toml"
    );
    let scenario = Scenario::load(std::path::Path::new(path)).unwrap();
    let outcome = run(&scenario, 15, true);
    assert!(outcome.passed(), "{:?}", outcome.failures);
    let trace = outcome.trace.text();
    assert!(
        trace.contains("bob   event reply alice#1 delivered, redelivered"),
        "{trace}"
    );
}

#[test]
fn a_disk_whose_sync_lies_costs_what_it_lost_and_nothing_else() {
    // Bob's disk acknowledges every commit at once and writes it 500 ms later; he crashes
    // right after acknowledging Alice's first request. The handler cannot tell: restarted
    // on the older (consistent) state, he takes Alice's resend for a new request and hands
    // it to his application again, unflagged. That is the whole cost: he comes back, every
    // exchange ends once at Alice, nothing is lost on her side, no reply answers another
    // request, and no other rule breaks. (ARCHITECTURE.md, "Durability", says so.)
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scenarios/crash-responder-after-ack.toml"
    );
    let mut scenario = Scenario::load(std::path::Path::new(path)).unwrap();
    assert!(run(&scenario, scenario.seed, false).passed());
    scenario.sync_lies = Some(std::time::Duration::from_millis(500));
    let outcome = run(&scenario, scenario.seed, false);
    let unexpected: Vec<&String> = outcome
        .failures
        .iter()
        .filter(|f| {
            !(f.starts_with("duplicate: alice#1 delivered 2 times to bob")
                || f.contains("Stats::duplicates_dropped says 0, it was handed 1 copies")
                || f.starts_with("expected delivered = ")
                || f.starts_with("expected redelivered = "))
        })
        .collect();
    assert!(
        outcome
            .failures
            .iter()
            .any(|f| f.starts_with("duplicate: alice#1 delivered 2 times to bob")),
        "{:?}",
        outcome.failures
    );
    assert!(unexpected.is_empty(), "{unexpected:?}");
}
