//! How the cost grows: exchanges per second, latency and memory with 1, 10, 100 and 1,000
//! concurrent peers against one node on loopback (each on a connection of its own, reused
//! and fresh), and single messages of 16, 64 and 256 MiB. Printed as JSON for
//! `benches/report.py`, which flags anything that grows faster than linearly.
//!
//! Memory is the process's resident set (`VmRSS`): the node and all its peers live in this
//! process, so a figure per peer counts both ends of a connection.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use p2p_bench::{bench_config, client, client_ik, keys, server_opts};
use p2p_handler::{AllowList, Config, Event, Handler, Inbox, Keypair, Options, TcpTransport};

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// One exchange, timed; `Err` with the failure if it failed.
async fn timed_exchange(
    cl: &Handler,
    inbox: &mut Inbox,
    peer: p2p_handler::PeerId,
    addr: std::net::SocketAddr,
    payload: Bytes,
) -> Result<Duration, String> {
    let start = Instant::now();
    let id = cl.request(peer, addr, payload).await.unwrap();
    loop {
        match inbox.received.recv().await {
            Some(Event::Reply { exchange, .. }) if exchange == id => return Ok(start.elapsed()),
            Some(Event::Failed {
                exchange, failure, ..
            }) if exchange == id => return Err(format!("{failure:?}")),
            Some(_) => {}
            None => panic!("client stopped"),
        }
    }
}

/// `peers` clients, `each` exchanges each, all at once: (exchanges/s, p50 µs, p99 µs, RSS
/// bytes per peer).
async fn peers(peers: usize, each: usize, reuse: bool) -> String {
    peers_with(peers, each, reuse, Config::default().listen_backlog, false).await
}

/// [`peers`], the node listening with `backlog`; `ik`: the clients know the node's key
/// (IK, the request in message 1, tickets) instead of only its peer id (XX).
async fn peers_with(peers: usize, each: usize, reuse: bool, backlog: u32, ik: bool) -> String {
    let k = keys(peers + 1);
    let before = rss();
    // Default bounds, except that every peer here dials from 127.0.0.1: the per-address
    // handshake bound (meant for strangers behind one address) is lifted to the peer count.
    let config = Config {
        max_handshaking_per_ip: peers.max(32),
        max_handshaking: peers.max(256),
        listen_backlog: backlog,
        ..bench_config(reuse)
    };
    let options = Options::new(config, [3; 32]);
    let reply = Bytes::from_static(&[1u8; 64]);
    let srv = server_opts(k[peers].clone(), &k[..peers], reply, options).await;
    let mut clients = Vec::new();
    for (i, key) in k[..peers].iter().enumerate() {
        clients.push(if ik {
            client_ik(key.clone(), srv.key, reuse, i as u8).await
        } else {
            client(key.clone(), srv.peer, reuse, i as u8).await
        });
    }
    let (peer, addr) = (srv.peer, srv.addr);
    if reuse {
        // Connected first: the figures are those of exchanges on open connections.
        for (cl, inbox) in &mut clients {
            let payload = Bytes::from_static(&[7u8; 64]);
            timed_exchange(cl, inbox, peer, addr, payload)
                .await
                .unwrap();
        }
    }
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(cl, mut inbox)| {
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(each);
                let mut failed = Vec::new();
                for _ in 0..each {
                    let payload = Bytes::from_static(&[7u8; 64]);
                    match timed_exchange(&cl, &mut inbox, peer, addr, payload).await {
                        Ok(t) => times.push(t),
                        Err(e) => failed.push(e),
                    }
                }
                (times, failed, cl, inbox)
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut failed = Vec::new();
    let mut keep = Vec::new();
    for t in tasks {
        let (mut t, mut f, cl, inbox) = t.await.unwrap();
        times.append(&mut t);
        failed.append(&mut f);
        keep.push((cl, inbox));
    }
    if let Some(first) = failed.first() {
        eprintln!(
            "{peers} peers (reuse {reuse}): {} failed, first: {first}",
            failed.len()
        );
    }
    let elapsed = start.elapsed();
    // Every node still up, reused connections still open.
    let per_peer = rss().saturating_sub(before) / peers as u64;
    times.sort();
    let rate = times.len() as f64 / elapsed.as_secs_f64();
    drop(keep);
    drop(srv);
    format!(
        "{{\"peers\": {peers}, \"each\": {each}, \"reuse\": {reuse}, \"ik\": {ik}, \"failed\": {}, \"per_s\": {rate:.0}, \"p50_us\": {:.0}, \"p99_us\": {:.0}, \"rss_per_peer\": {per_peer}}}",
        failed.len(),
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    )
}

/// A crowd of allowed peers on one host, every node with the default `Config`: `peers`
/// clients each send `each` requests to one node, all at once (queued behind each other,
/// so each client dials once) or, `fresh`, one after another (each on a fresh connection:
/// a handshake per exchange). Every exchange must complete: (completed, failed,
/// exchanges/s).
async fn crowd(peers: usize, each: usize, fresh: bool) -> String {
    let k = keys(peers + 1);
    let options = Options::new(Config::default(), [3; 32]);
    let reply = Bytes::from_static(&[1u8; 64]);
    let srv = server_opts(k[peers].clone(), &k[..peers], reply, options).await;
    let mut clients = Vec::new();
    for (i, key) in k[..peers].iter().enumerate() {
        let options = Options::new(Config::default(), [i as u8; 32]).incarnation(i as u64);
        let (handler, inbox) = Handler::spawn_with(
            TcpTransport,
            "127.0.0.1:0".parse().unwrap(),
            key.clone(),
            AllowList::from_peers([srv.peer]),
            options,
        )
        .await
        .unwrap();
        clients.push((handler, inbox));
    }
    let (peer, addr) = (srv.peer, srv.addr);
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(cl, mut inbox)| {
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, Vec::new());
                let mut sent = 0;
                while ok + failed.len() < each {
                    // All at once, or the next only once the last ended.
                    while sent < each && (!fresh || sent == ok + failed.len()) {
                        cl.request(peer, addr, Bytes::from_static(&[7u8; 64]))
                            .await
                            .unwrap();
                        sent += 1;
                    }
                    match inbox.received.recv().await {
                        Some(Event::Reply { .. }) => ok += 1,
                        Some(Event::Failed { failure, .. }) => failed.push(failure.to_string()),
                        Some(_) => {}
                        None => panic!("client stopped"),
                    }
                }
                (ok, failed, cl, inbox)
            })
        })
        .collect();
    let (mut ok, mut failed, mut keep) = (0, Vec::new(), Vec::new());
    for t in tasks {
        let (o, mut f, cl, inbox) = t.await.unwrap();
        ok += o;
        failed.append(&mut f);
        keep.push((cl, inbox));
    }
    let elapsed = start.elapsed();
    if let Some(first) = failed.first() {
        eprintln!("crowd of {peers}: {} failed, first: {first}", failed.len());
    }
    drop(keep);
    drop(srv);
    format!(
        "{{\"peers\": {peers}, \"each\": {each}, \"fresh\": {fresh}, \"completed\": {ok}, \"failed\": {}, \"per_s\": {:.0}}}",
        failed.len(),
        ok as f64 / elapsed.as_secs_f64()
    )
}

fn big_config() -> Config {
    Config {
        max_message_size: 300 << 20,
        ..bench_config(true)
    }
}

async fn big_node(key: Keypair, allow: &Keypair, seed: u8) -> (Handler, Inbox) {
    Handler::spawn_with(
        TcpTransport,
        "127.0.0.1:0".parse().unwrap(),
        key,
        AllowList::from_peers([allow.peer_id()]),
        Options::new(big_config(), [seed; 32]),
    )
    .await
    .unwrap()
}

/// One message of `mib` MiB (reply 2 bytes), best of `runs`: (MiB/s, peak RSS growth in
/// bytes).
async fn message(mib: usize, runs: usize) -> String {
    let k = keys(2);
    let (srv, mut srv_inbox) = big_node(k[1].clone(), &k[0], 3).await;
    let responder = srv.clone();
    tokio::spawn(async move {
        while let Some(event) = srv_inbox.received.recv().await {
            if let Event::Request { peer, exchange, .. } = event {
                let _ = responder
                    .response_to(peer, exchange, Bytes::from_static(b"ok"))
                    .await;
            }
        }
    });
    let (cl, mut inbox) = big_node(k[0].clone(), &k[1], 9).await;
    let (peer, addr) = (k[1].peer_id(), srv.local_addr());
    // Connect first, so that the figure is the message's.
    timed_exchange(&cl, &mut inbox, peer, addr, Bytes::from_static(b"hi"))
        .await
        .unwrap();
    let payload = Bytes::from(vec![7u8; mib << 20]);
    let before = rss();
    let mut best = Duration::MAX;
    let mut peak = 0;
    for _ in 0..runs {
        best = best.min(
            timed_exchange(&cl, &mut inbox, peer, addr, payload.clone())
                .await
                .unwrap(),
        );
        peak = peak.max(rss().saturating_sub(before));
    }
    format!(
        "{{\"mib\": {mib}, \"mib_per_s\": {:.0}, \"rss_growth\": {peak}}}",
        mib as f64 / best.as_secs_f64()
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // `scaling messages MIB...` runs only those message sizes (for profiling one).
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("messages") {
        for mib in &args[1..] {
            let mib: usize = mib.parse().expect("a size in MiB");
            println!("{}", rt.block_on(message(mib, 3)));
        }
        return;
    }
    // `scaling crowd N EACH queued|fresh`: N allowed peers on one host, default config.
    if let [mode, n, each, how] = &args[..]
        && mode == "crowd"
    {
        let (n, each) = (n.parse().expect("peers"), each.parse().expect("exchanges"));
        println!("{}", rt.block_on(crowd(n, each, how == "fresh")));
        return;
    }
    // `scaling handshakes`: fresh exchanges, XX against IK, 1 and 100 peers.
    if args.first().map(String::as_str) == Some("handshakes") {
        println!("[{}]", handshakes(&rt).join(", "));
        return;
    }
    // `scaling peers N EACH reuse|fresh` runs one row (for profiling it).
    if let [mode, n, each, how] = &args[..]
        && mode == "peers"
    {
        let (n, each) = (n.parse().expect("peers"), each.parse().expect("exchanges"));
        println!("{}", rt.block_on(peers(n, each, how == "reuse")));
        return;
    }
    let mut rows = Vec::new();
    for (n, each) in [(1, 2_000), (10, 200), (100, 20), (1_000, 5)] {
        for reuse in [true, false] {
            rows.push(rt.block_on(peers(n, each, reuse)));
        }
    }
    // The listen backlog: 1,000 fresh dials at once, with tokio's fixed 128 and our default.
    let mut backlog = Vec::new();
    for b in [128, Config::default().listen_backlog] {
        let row = rt.block_on(peers_with(1_000, 5, false, b, false));
        backlog.push(format!("{{\"backlog\": {b}, \"run\": {row}}}"));
    }
    let mut big = Vec::new();
    for (mib, runs) in [(16, 3), (64, 2), (256, 1)] {
        big.push(rt.block_on(message(mib, runs)));
    }
    let crowds = [false, true].map(|fresh| rt.block_on(crowd(1_000, 10, fresh)));
    let handshakes = handshakes(&rt);
    println!(
        "{{\"peers\": [{}], \"backlog\": [{}], \"messages\": [{}], \"crowd\": [{}], \"handshakes\": [{}]}}",
        rows.join(", "),
        backlog.join(", "),
        big.join(", "),
        crowds.join(", "),
        handshakes.join(", ")
    );
}

/// Fresh exchanges (a handshake each), XX against IK, one peer and 100 peers, each pair
/// run in turn so the machine's noise falls on both alike.
fn handshakes(rt: &tokio::runtime::Runtime) -> Vec<String> {
    let backlog = Config::default().listen_backlog;
    let mut rows = Vec::new();
    for (n, each) in [(1, 2_000), (100, 20)] {
        for ik in [false, true] {
            rows.push(rt.block_on(peers_with(n, each, false, backlog, ik)));
        }
    }
    rows
}
