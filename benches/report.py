#!/usr/bin/env python3
"""Runs every benchmark once and writes docs/BENCHMARKS.md.

Usage (from the repository root):  python3 benches/report.py [--quick]

Each handler figure is set beside the physical limit measured in the same run (criterion
medians), as a ratio, with the machine it ran on. --quick shortens criterion's measurement
(for trying the script, not for publishing numbers).
"""

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRITERION = ROOT / "target" / "criterion"


def run(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=True, text=True, capture_output=True, **kw).stdout


def median_ns(full_id):
    """Median of a criterion benchmark, in nanoseconds, found by its full id."""
    for bench in CRITERION.rglob("new/benchmark.json"):
        meta = json.loads(bench.read_text())
        if meta["full_id"] == full_id:
            est = json.loads((bench.parent / "estimates.json").read_text())
            return est["median"]["point_estimate"]
    raise SystemExit(f"no criterion result for {full_id!r}")


def machine():
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rustc = run(["rustc", "--version"]).strip()
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, {rustc}"


def handshake_v2_section(scaling, wan):
    hs = {(r["peers"], r["ik"]): r for r in scaling["handshakes"]}
    lines = [
        "## Handshake v2: IK and the request in message 1",
        "",
        "Fresh exchanges (a connection and a handshake each) on loopback, the client knowing",
        "only the node's peer id (XX, 3 messages, then the request) or its key (IK, 2 messages,",
        "the request in message 1), run in turn:",
        "",
        "| peers × exchanges | XX fresh/s | p50 | p99 | IK fresh/s | p50 | p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in sorted({r["peers"] for r in scaling["handshakes"]}):
        xx, ik = hs[(n, False)], hs[(n, True)]
        lines.append(
            f"| {n} × {xx['each']} | {xx['per_s']:,} | {xx['p50_us'] / 1e3:.2f} ms | {xx['p99_us'] / 1e3:.2f} ms "
            f"| {ik['per_s']:,} | {ik['p50_us'] / 1e3:.2f} ms | {ik['p99_us'] / 1e3:.2f} ms |"
        )
    lines += [
        "",
        "On loopback the round trips cost nothing and IK's extra Diffie-Hellman per side",
        "about cancels the flight it saves. Across a WAN the flight is what counts: two",
        "operators 50 ms apart (one way), in the simulator (`wan` binary; virtual time, so",
        "exact). Turmoil lets a dialer write after one one-way trip where TCP takes a round",
        "trip, so over real TCP a fresh exchange takes 50 ms more:",
        "",
        "| exchange | handshake | simulator | real TCP | round trips |",
        "|---|---|---|---|---|",
    ]
    for r in wan:
        what = "reused connection" if r["reuse"] else "fresh connection"
        how = "IK" if r["ik"] else "XX"
        lines.append(f"| {what} | {how} | {r['sim_ms']} ms | {r['tcp_ms']} ms | {r['round_trips']} |")
    return lines + [""]


def scaling_section(scaling):
    """How cost grows with peers and message size, with anything superlinear flagged."""
    lines = [
        "## Scaling (one node, loopback; memory: resident set of the process, both ends)",
        "",
        "N peers, each a node of its own in this process with one connection to the node under",
        "test, all at once; reused: each connected before timing; fresh: a connection per",
        "exchange. Default `Config` apart from rate limits and, since every peer dials from",
        "127.0.0.1, the per-address handshake bound. Flagged: a rate that falls below half the",
        "previous row's, memory per peer above 1.5× the previous row's.",
        "",
        "| peers × exchanges | reused/s | p50 | p99 | memory/peer | fresh/s | p50 | p99 | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = {(r["peers"], r["reuse"]): r for r in scaling["peers"]}
    prev = None
    for n in sorted({r["peers"] for r in scaling["peers"]}):
        ru, fr = rows[(n, True)], rows[(n, False)]
        flags = []
        if prev and ru["per_s"] < prev[0]["per_s"] / 2:
            flags.append("reused rate")
        if prev and fr["per_s"] < prev[1]["per_s"] / 2:
            flags.append("fresh rate")
        if prev and prev[0]["peers"] > 1 and ru["rss_per_peer"] > 1.5 * prev[0]["rss_per_peer"]:
            flags.append("memory")
        flag = f" **superlinear: {', '.join(flags)}**" if flags else ""
        lines.append(
            f"| {n:,} × {ru['each']} | {ru['per_s']:,}/s | {ru['p50_us'] / 1e3:.2f} ms | {ru['p99_us'] / 1e3:.2f} ms "
            f"| {ru['rss_per_peer'] / 1024:,.0f} KiB | {fr['per_s']:,}/s | {fr['p50_us'] / 1e3:.1f} ms | {fr['p99_us'] / 1e3:.1f} ms "
            f"| {ru['failed'] + fr['failed']}{flag} |"
        )
        prev = (ru, fr)
    lines += [
        "",
        "The listen backlog, 1,000 peers dialing at once (a fresh connection per exchange):",
        "",
        "| backlog | fresh/s | p50 | p99 | failed |",
        "|---|---|---|---|---|",
    ]
    for b in scaling["backlog"]:
        r = b["run"]
        lines.append(
            f"| {b['backlog']:,} | {r['per_s']:,}/s | {r['p50_us'] / 1e3:.1f} ms | {r['p99_us'] / 1e3:.1f} ms | {r['failed']} |"
        )
    lines += [
        "",
        "A crowd of allowed peers on one host, every node with the default `Config` (no bound",
        "lifted): 1,000 clients, each sending 10 requests to one node, all at once (queued, one",
        "connection each) or one after another (a fresh connection, so a handshake, each).",
        "Their handshakes look like strangers' until they authenticate; every one must complete.",
        "",
        "| crowd | completed | failed | exchanges/s |",
        "|---|---|---|---|",
    ]
    for c in scaling["crowd"]:
        how = "one after another" if c["fresh"] else "all at once"
        lines.append(
            f"| {c['peers']:,} × {c['each']}, {how} | {c['completed']:,} | {c['failed']} | {c['per_s']:,}/s |"
        )
    lines += [
        "",
        "One message on an open connection (2-byte reply; `max_message_size` raised to 300 MiB).",
        "Flagged: throughput below 2/3 of the smallest message's, memory per MiB above 1.5× its.",
        "",
        "| message | throughput | peak memory growth | per MiB |",
        "|---|---|---|---|",
    ]
    first = scaling["messages"][0]
    for m in scaling["messages"]:
        per_mib = m["rss_growth"] / m["mib"]
        flags = []
        if m["mib_per_s"] < first["mib_per_s"] * 2 / 3:
            flags.append("time")
        if per_mib > 1.5 * first["rss_growth"] / first["mib"]:
            flags.append("memory")
        flag = f" **superlinear: {', '.join(flags)}**" if flags else ""
        lines.append(
            f"| {m['mib']} MiB | {m['mib_per_s']:,} MiB/s | {m['rss_growth'] / 2**20:,.0f} MiB | {per_mib / 2**20:.2f} MiB{flag} |"
        )
    return lines + [""]


def records_lines(us):
    """Address records: sealing (one HPKE seal per member), opening, a book taking one."""
    ik = us("records/limit_noise_ik_handshake")
    seal = {n: us(f"records/seal/{n}") for n in (4, 100, 1000)}
    opened = {n: us(f"records/open/{n}") for n in (4, 100, 1000)}
    offer = us("records/book_offer/100")
    return [
        "## Address records (one record; the limit: a bare Noise IK handshake, same run)",
        "",
        f"The limit: an IK handshake, both sides in memory, {ik:,.0f} us.",
        "",
        "| members | seal our record | per member | open one (a member) | open / IK handshake |",
        "|---:|---:|---:|---:|---:|",
    ] + [
        f"| {n:,} | {seal[n] / 1e3:,.2f} ms | {seal[n] / n:,.0f} us ({seal[n] / n / ik:.2f} IK) "
        f"| {opened[n]:,.0f} us | {opened[n] / ik:.2f} |"
        for n in (4, 100, 1000)
    ] + [
        "",
        f"A book taking a record (decode, signature, decryption, times, sequence number), 100 "
        f"members: {offer:,.0f} us. A node seals its record at start, on a new address or "
        "epoch, and at half its life (1 h by default); it opens each member's once per refresh.",
        "",
    ]


def main():
    quick = "--quick" in sys.argv
    timing = ["--warm-up-time", "1", "--measurement-time", "1" if quick else "5"]
    bench_out = ""
    for suite in ["limits", "handler", "sim", "records"]:
        bench_out += run(["cargo", "bench", "-q", "-p", "p2p-bench", "--bench", suite, "--"] + timing)
    run(["cargo", "build", "-q", "--release", "-p", "p2p-bench", "--bins"])
    latency = json.loads(run([str(ROOT / "target/release/latency")]).strip().splitlines()[-1])
    memory = json.loads(run([str(ROOT / "target/release/memory")]).strip().splitlines()[-1])
    attack = json.loads(run([str(ROOT / "target/release/attack")]).strip().splitlines()[-1])
    scaling = json.loads(run([str(ROOT / "target/release/scaling")]).strip().splitlines()[-1])
    wan = json.loads(run([str(ROOT / "target/release/wan")]).strip().splitlines()[-1])
    # rust-libp2p through the same workloads, in its own workspace (never built by CI).
    libp2p_manifest = str(ROOT / "benches/vs-libp2p/Cargo.toml")
    # Its target directory given here: cargo reads benches/vs-libp2p/.cargo/config.toml only
    # when run from inside that folder.
    libp2p_target = str(ROOT / "target" / "vs-libp2p")
    run(["cargo", "build", "-q", "--release", "--manifest-path", libp2p_manifest,
         "--target-dir", libp2p_target])
    libp2p = json.loads(
        run([str(ROOT / "target/vs-libp2p/release/vs-libp2p")] + (["--quick"] if quick else []))
        .strip()
        .splitlines()[-1]
    )
    virtual_s = float(re.search(r"sim/two_nodes virtual_seconds ([0-9.]+)", bench_out).group(1))

    us = lambda full_id: median_ns(full_id) / 1e3
    handshake = us("limit/noise_xx_handshake")
    handshake_ik = us("limit/noise_ik_handshake")
    bare_exchange = us("limit/noise_exchange_open_session")
    bare_two = us("limit/noise_exchange_open_session_two_threads")
    tcp_rtt = us("limit/tcp_rtt_64b")
    stream_ms = us("limit/noise_stream/16MiB") / 1e3
    fresh1 = us("handler/tcp_exchange/fresh/1")
    reuse1 = us("handler/tcp_exchange/reuse/1")
    reuse1_one = us("handler/tcp_exchange/reuse_one_thread/1")
    fresh100 = us("handler/tcp_exchange/fresh/100") / 100
    burst100 = us("handler/tcp_exchange/burst/100") / 100
    reuse100 = us("handler/tcp_exchange/reuse/100") / 100
    durable = {
        (mode, peers): us(f"handler/tcp_exchange/{mode}_durable/{peers}") / peers
        for mode in ("fresh", "reuse")
        for peers in (1, 100)
    }
    commit1 = us("limit/store_commit/1")
    commit96 = us("limit/store_commit/96")
    # Per-peer latency in memory (one round: every peer does one exchange) plus two commits.
    durable_bound = 100 / ((reuse100 * 100 + 2 * commit96) / 1e6)
    durable_bound_fresh = 100 / ((fresh100 * 100 + 2 * commit96) / 1e6)
    big_ms = us("handler/request/16MiB") / 1e3
    big_own_ms = us("handler/request/16MiB_own_threads") / 1e3
    machine_state = us("handler/state_machine_exchange")
    sim_two = us("sim/two_nodes_run") / 1e6
    sim_all = us("sim/all_scenarios_one_seed") / 1e6
    crypto = {n: us(f"limit/noise_encrypt_decrypt/{n}") for n in (64, 1024, 65519)}
    mib = 16.0

    def times(ours, theirs):
        ratio = ours / theirs
        return f"**{ratio:.1f}×** ({'met' if ratio >= 2 else 'missed'})"

    def verdict(ratio, target):
        return f"**{ratio:.0%}** (target {target:.0%}: {'met' if ratio >= target else 'missed'})"

    lat = latency
    lines = [
        "# Benchmarks",
        "",
        "Produced by `python3 benches/report.py` from one run of `cargo bench -p p2p-bench` and",
        "the `latency`, `attack` and `memory` binaries; do not edit by hand. Every handler figure stands",
        "beside a physical limit measured in the same run on the same machine. Medians.",
        "",
        f"Machine: {machine()}.",
        "",
        "## Limits",
        "",
        "| limit | time |",
        "|---|---|",
        f"| bare Noise XX handshake, both sides in memory | {handshake:.1f} µs ({1e6 / handshake:,.0f}/s) |",
        f"| bare Noise IK handshake (two messages, one more Diffie-Hellman each side), both sides in memory | {handshake_ik:.1f} µs ({1e6 / handshake_ik:,.0f}/s) |",
        f"| Noise encrypt + decrypt, 64 B / 1 KiB / 64 KiB | {crypto[64]:.2f} / {crypto[1024]:.2f} / {crypto[65519]:.1f} µs |",
        f"| TCP loopback round trip, 64 B | {tcp_rtt:.1f} µs |",
        f"| hand-rolled request/ack/reply/ack on an open Noise session, loopback, one thread | {bare_exchange:.1f} µs ({1e6 / bare_exchange:,.0f}/s) |",
        f"| the same across two threads (server on a worker of the two-worker runtime, client on the calling thread) | {bare_two:.1f} µs ({1e6 / bare_two:,.0f}/s) |",
        f"| raw Noise stream, 16 MiB, loopback | {stream_ms:.1f} ms ({mib / (stream_ms / 1e3):.0f} MiB/s) |",
        f"| synced redb commit, 1 row / 96 rows, benchmark disk | {commit1:.0f} µs / {commit96:.0f} µs |",
        "",
        "## Handler",
        "",
        "The handler's figures run on a two-worker multi-threaded runtime (the kind the",
        "synchronous facade starts), except the row marked one thread, which runs both nodes and",
        "the application on one thread as the bare exchange does, and the row marked own thread,",
        "which gives each node a thread of its own as two processes would have. Each target is",
        "judged against a limit on the same arrangement of threads: on this kind of machine,",
        "waking a task on another thread costs more than an exchange's cryptography and TCP work",
        "together (see the limits above), and a shared runtime may put two nodes' bulk work on",
        "one worker, so a comparison across arrangements would measure the threads, not the",
        "handler. × libp2p compares the shared-runtime rows, where libp2p runs the same way.",
        "",
        "× libp2p: the handler's rate over rust-libp2p request-response's (TCP + Noise + yamux,",
        "default settings apart from timeouts, `benches/vs-libp2p`) through the same workload in",
        "this run (target 2×).",
        "",
        "| figure | handler | limit | % of limit | × libp2p |",
        "|---|---|---|---|---|",
        f"| exchanges/s, fresh connection, 1 peer | {1e6 / fresh1:,.0f}/s ({fresh1:.0f} µs) | handshake {1e6 / handshake:,.0f}/s | {verdict(handshake / fresh1, 0.80)} | {times(1e6 / fresh1, libp2p['fresh_per_s'])} |",
        f"| exchanges/s, reused connection, 1 peer, two-worker runtime | {1e6 / reuse1:,.0f}/s ({reuse1:.1f} µs) | bare exchange across two threads {1e6 / bare_two:,.0f}/s | {verdict(bare_two / reuse1, 0.60)} | {times(1e6 / reuse1, libp2p['reuse_per_s'])} |",
        f"| exchanges/s, reused connection, 1 peer, one thread | {1e6 / reuse1_one:,.0f}/s ({reuse1_one:.1f} µs) | bare exchange on one thread {1e6 / bare_exchange:,.0f}/s | {verdict(bare_exchange / reuse1_one, 0.60)} | |",
        f"| exchanges/s, 100 requests queued to 1 peer | {1e6 / burst100:,.0f}/s | bare exchange {1e6 / bare_exchange:,.0f}/s | {bare_exchange / burst100:.0%} | |",
        f"| exchanges/s, fresh, 100 peers at once | {1e6 / fresh100:,.0f}/s | handshake {1e6 / handshake:,.0f}/s (one core) | {handshake / fresh100:.0%} | |",
        f"| exchanges/s, reused, 100 peers at once | {1e6 / reuse100:,.0f}/s | bare exchange {1e6 / bare_exchange:,.0f}/s (one session) | {verdict(bare_exchange / reuse100, 1.50)} | {times(1e6 / reuse100, libp2p['peers100_per_s'])} |",
        f"| 16 MiB request throughput, each node on its own thread | {mib / (big_own_ms / 1e3):.0f} MiB/s | raw Noise stream {mib / (stream_ms / 1e3):.0f} MiB/s | {verdict(stream_ms / big_own_ms, 0.85)} | |",
        f"| 16 MiB request throughput, both nodes on one two-worker runtime | {mib / (big_ms / 1e3):.0f} MiB/s | raw Noise stream {mib / (stream_ms / 1e3):.0f} MiB/s | {stream_ms / big_ms:.0%} | {times(mib / (big_ms / 1e3), libp2p['mib16_mib_per_s'])} |",
        f"| one exchange through both state machines, no I/O | {machine_state:.2f} µs | bare exchange {bare_exchange:.1f} µs | {machine_state / bare_exchange:.1%} of it | |",
        "",
        "## Durability (redb data directory, each commit synced)",
        "",
        "1 peer: both nodes durable. 100 peers: the node under test is durable, its peers (other",
        "machines in production, each with its own disk) in memory. Ratio: durable rate over the",
        "in-memory rate of the same workload in this run.",
        "",
        "| workload | in memory | durable | ratio |",
        "|---|---|---|---|",
        *[
            f"| {mode}, {peers} peer{'s' if peers > 1 else ''} | {1e6 / mem:,.0f}/s | {1e6 / durable[(mode, peers)]:,.0f}/s | "
            + (verdict(mem / durable[(mode, peers)], 0.70) if peers == 100 else f"{mem / durable[(mode, peers)]:.0%}")
            + " |"
            for (mode, peers, mem) in (
                ("fresh", 1, fresh1),
                ("reuse", 1, reuse1),
                ("fresh", 100, fresh100),
                ("reuse", 100, reuse100),
            )
        ],
        "",
        "What holds the durable figures: an exchange waits for two commits at the responder, one",
        "after the other (its request before the Ack and before the application sees it, its",
        "reply before it leaves), and a request that arrives while a commit runs waits for it to",
        f"end. One commit of a busy node carries about 96 rows ({commit96:.0f} µs here, unloaded). With",
        f"100 peers each waiting for its exchange, a durable node is bounded by 100 / (the",
        f"in-memory time of one round of 100 exchanges + 2 commits) = {durable_bound:,.0f} exchanges/s on reused",
        f"connections, {durable_bound * reuse100 / 1e6:.0%} of the in-memory rate, even with perfectly aligned commits; the",
        f"handler reaches {(1e6 / durable[('reuse', 100)]) / durable_bound:.0%} of that bound. The fresh-connection bound is",
        f"{durable_bound_fresh * fresh100 / 1e6:.0%} of the in-memory rate (handshakes dominate).",
        "",
        "## Latency (each exchange timed on its own)",
        "",
        "| exchange | p50 | p99 |",
        "|---|---|---|",
        f"| limit: bare exchange on an open Noise session, one thread | {lat['bare_noise_exchange']['p50_us']:.1f} µs | {lat['bare_noise_exchange']['p99_us']:.1f} µs |",
        f"| limit: the same across two threads | {lat['bare_noise_exchange_two_threads']['p50_us']:.1f} µs | {lat['bare_noise_exchange_two_threads']['p99_us']:.1f} µs |",
        f"| handler, reused connection, one thread | {lat['handler_reuse_one_thread']['p50_us']:.1f} µs | {lat['handler_reuse_one_thread']['p99_us']:.1f} µs |",
        f"| handler, reused connection, two-worker runtime | {lat['handler_reuse']['p50_us']:.1f} µs | {lat['handler_reuse']['p99_us']:.1f} µs |",
        f"| handler, fresh connection | {lat['handler_fresh']['p50_us']:.1f} µs | {lat['handler_fresh']['p99_us']:.1f} µs |",
        "",
        "## An allowed peer under attack (fresh connection per exchange, each timed)",
        "",
        "1,500 attacking sockets, each re-opened as soon as the node closes it (the attacker of",
        "`handler/tests/hostile.rs`, on a thread of its own: one core's worth at full speed),",
        "while an allowed peer does 300 exchanges from 127.0.0.1, which the node's allow list",
        "names. The peer knows the node's key, as a member does: IK, the request in message 1,",
        "and a ticket from each handshake that proves it in the next message 1 before any",
        "Diffie-Hellman. The attack comes from 64 addresses of its own, or from the peer's own",
        "address (one NAT). None may fail; the benchmark panics if one does.",
        "",
        "| attack | from | p50 | p99 |",
        "|---|---|---|---|",
        f"| none (XX dial, for comparison) | - | {attack['none_xx']['p50_us'] / 1e3:.2f} ms | {attack['none_xx']['p99_us'] / 1e3:.2f} ms |",
        f"| none | - | {attack['none']['p50_us'] / 1e3:.2f} ms | {attack['none']['p99_us'] / 1e3:.2f} ms |",
        f"| 1,500 silent sockets | 64 addresses | {attack['silent']['p50_us'] / 1e3:.2f} ms | {attack['silent']['p99_us'] / 1e3:.2f} ms |",
        f"| 1,500 handshakes stalled after msg1 | 64 addresses | {attack['stalled_msg1']['p50_us'] / 1e3:.2f} ms | {attack['stalled_msg1']['p99_us'] / 1e3:.2f} ms |",
        f"| garbage first messages at full speed | 64 addresses | {attack['garbage']['p50_us'] / 1e3:.2f} ms | {attack['garbage']['p99_us'] / 1e3:.2f} ms |",
        f"| 1,500 silent sockets | the peer's own | {attack['shared_silent']['p50_us'] / 1e3:.2f} ms | {attack['shared_silent']['p99_us'] / 1e3:.2f} ms |",
        f"| 1,500 handshakes stalled after msg1 | the peer's own | {attack['shared_stalled_msg1']['p50_us'] / 1e3:.2f} ms | {attack['shared_stalled_msg1']['p99_us'] / 1e3:.2f} ms |",
        f"| garbage first messages at full speed | the peer's own | {attack['shared_garbage']['p50_us'] / 1e3:.2f} ms | {attack['shared_garbage']['p99_us'] / 1e3:.2f} ms |",
        f"| a flood of connections, each garbage then closed by the attacker | 64 addresses | {attack['flood']['p50_us'] / 1e3:.2f} ms | {attack['flood']['p99_us'] / 1e3:.2f} ms |",
        "",
        "## Memory (exact live heap, dhat)",
        "",
        "| item | bytes |",
        "|---|---|",
        f"| one idle connection, both ends (two handlers, one process) | {memory['idle_connection_both_ends_bytes']:,} |",
        f"| one queued request with a 64 B payload | {memory['queued_request_64b_bytes']:,} |",
        "",
        *scaling_section(scaling),
        *handshake_v2_section(scaling, wan),
        "## Simulator",
        "",
        "| figure | value |",
        "|---|---|",
        f"| two nodes, 200 back-to-back exchanges: virtual seconds per wall second | {virtual_s / sim_two:,.0f} ({virtual_s:.1f} s virtual in {sim_two * 1e3:.0f} ms) |",
        f"| whole `scenarios/` set, one seed (swarm mode) | {1 / sim_all:.1f} seeds/s ({sim_all * 1e3:.0f} ms per seed) |",
        "",
    ]
    lines += records_lines(us)
    notes = ROOT / "benches" / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    out = ROOT / "docs" / "BENCHMARKS.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
