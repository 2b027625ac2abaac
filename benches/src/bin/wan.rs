//! Two operators 50 ms apart (one way), in the simulator: how long from an application's
//! `request` to its reply, for a fresh exchange (a connection of its own) and a reused one
//! (a connection kept from an earlier exchange), dialing with XX (peers known by id) and
//! with IK (peers' keys known: the request rides in message 1). Virtual time, so exact:
//! the figures are the protocol's round trips, not this machine. Turmoil's connect lets the
//! dialer write after one one-way trip where real TCP takes a round trip, so over real
//! TCP a fresh exchange takes 50 ms more than here; `tcp_ms` adds it. Printed as JSON for
//! `benches/report.py`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use p2p_sim::run::run;
use p2p_sim::scenario::Scenario;

const ONE_WAY_MS: f64 = 50.0;

fn scenario(ik: bool, reuse: bool) -> Scenario {
    let warm_up = if reuse {
        "[[step]]\nat = \"1s\"\ndo = \"request\"\nfrom = \"alice\"\nto = \"bob\"\n"
    } else {
        ""
    };
    let text = format!(
        r#"
[network]
min_latency = "50ms"
max_latency = "50ms"

[config]
reuse_connections = {reuse}
idle_timeout = "60s"

[[node]]
name = "alice"
know_keys = {ik}

[[node]]
name = "bob"
know_keys = {ik}

{warm_up}
[[step]]
at = "3s"
do = "request"
from = "alice"
to = "bob"
"#
    );
    Scenario::parse(&text, "<wan>", "wan").expect("the WAN scenario")
}

/// A trace line's node, kind and first two words.
fn fields(line: &str) -> Vec<&str> {
    line.split_whitespace().skip(1).take(4).collect()
}

/// Milliseconds from alice's last request to its reply.
fn measure(ik: bool, reuse: bool) -> f64 {
    let outcome = run(&scenario(ik, reuse), 1, false);
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    let text = outcome.trace.text();
    let at = |line: &str| -> f64 {
        let t = line.split_whitespace().next().unwrap();
        t.trim_end_matches('s').parse::<f64>().unwrap() * 1e3
    };
    let last = text
        .lines()
        .rfind(|l| matches!(fields(l)[..], ["alice", "app", "request", _]))
        .expect("a request");
    let id = fields(last)[3].to_owned();
    let reply = text
        .lines()
        .find(|l| fields(l)[..] == ["alice", "event", "reply", id.as_str()])
        .expect("its reply");
    at(reply) - at(last)
}

fn main() {
    let mut rows = Vec::new();
    for reuse in [false, true] {
        for ik in [false, true] {
            let ms = measure(ik, reuse);
            let tcp = if reuse { ms } else { ms + ONE_WAY_MS };
            let round_trips = tcp / (2.0 * ONE_WAY_MS);
            rows.push(format!(
                "{{\"reuse\": {reuse}, \"ik\": {ik}, \"sim_ms\": {ms:.0}, \"tcp_ms\": {tcp:.0}, \"round_trips\": {round_trips:.1}}}"
            ));
        }
    }
    println!("[{}]", rows.join(", "));
}
