//! `p2p-node status`: asks a running node's `/status` (on its metrics listener) what it is
//! doing, and prints it for a person or, with `--json`, as the node said it.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::NodeFile;
use crate::metrics::{PeerReport, Report};

/// How long the node may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Which probe `--probe` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Probe {
    /// `/healthz`: the handler answers.
    Health,
    /// `/readyz`: listening and not stopping.
    Ready,
}

/// What to ask and print.
pub(crate) struct Ask {
    /// The node's JSON as it is.
    pub(crate) json: bool,
    /// Only a probe.
    pub(crate) probe: Option<Probe>,
}

/// Asks the node at `metrics` (or at its config file's `[metrics] listen`) and prints.
pub(crate) fn run(
    config: Option<&Path>,
    metrics: Option<SocketAddr>,
    ask: Ask,
) -> Result<(), String> {
    let addr = match (metrics, config) {
        (Some(addr), _) => addr,
        (None, Some(path)) => NodeFile::load(path)?.metrics.listen.ok_or_else(|| {
            format!(
                "{} has no [metrics] listen: a node answers `status` on its metrics listener",
                path.display()
            )
        })?,
        (None, None) => {
            return Err(
                "give --metrics ADDR (the node's metrics listener) or --config FILE \
                        (whose [metrics] listen is asked)"
                    .into(),
            );
        }
    };
    let addr = reachable(addr);
    if let Some(probe) = ask.probe {
        let path = match probe {
            Probe::Health => "/healthz",
            Probe::Ready => "/readyz",
        };
        print!("{}", get(addr, path)?);
        return Ok(());
    }
    let body = get(addr, "/status")?;
    if ask.json {
        print!("{body}");
        return Ok(());
    }
    let report: Report = serde_json::from_str(&body)
        .map_err(|e| format!("http://{addr}/status answered something else than a status: {e}"))?;
    print!("{}", render(&report, SystemTime::now()));
    Ok(())
}

/// A listener on every address (0.0.0.0, ::) is asked on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// One HTTP/1.1 GET; the body of a 200 answer.
fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let fail = |e: std::io::Error| format!("cannot ask the node at {addr}: {e}");
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| {
        format!("cannot reach the node's metrics listener at {addr}: {e} (is it running, with --metrics?)")
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(fail)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(fail)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(fail)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(fail)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr} answered no HTTP response"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{addr}{path}: {status}: {}", body.trim()));
    }
    Ok(body.to_owned())
}

/// The report as a person reads it.
pub(crate) fn render(report: &Report, now: SystemTime) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!(
        "node {} on {}: {} (p2p-node {})",
        report.peer_id, report.listen, report.state, report.version
    ));
    let allow = &report.allow;
    let source = match (&allow.source[..], &allow.path) {
        ("any-peer-insecure", _) => "any authenticated peer (insecure)".to_owned(),
        (source, Some(path)) => format!("{source} {path}"),
        (source, None) => source.to_owned(),
    };
    let epoch = allow
        .epoch
        .map(|e| format!(", epoch {e}"))
        .unwrap_or_default();
    let reloaded = match allow.last_reload_unix {
        Some(at) => {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(at);
            let ago = now.duration_since(at).unwrap_or_default();
            format!(
                "last reloaded {} ({} ago)",
                humantime::format_rfc3339_seconds(at),
                humantime::format_duration(Duration::from_secs(ago.as_secs()))
            )
        }
        None => "not reloaded since the start".to_owned(),
    };
    line(format!("allow list: {source}{epoch}; {reloaded}"));
    line(format!(
        "exchanges: {} of ours in flight, {} of peers' waiting on us{}",
        report.outbound_in_flight,
        report.pending_responses,
        if report.draining { "; draining" } else { "" }
    ));
    line(format!(
        "connections: {} ({} tasks)",
        report.connections, report.connection_tasks
    ));
    if !report.inactive_members.is_empty() {
        line(format!(
            "inactive members: {}",
            report.inactive_members.join(", ")
        ));
    }
    line(format!("peers: {}", report.peers.len()));
    if !report.peers.is_empty() {
        line(format!(
            "  {:<16} {:<12} {:>7} {:>5} {:>7} {:>6} {:>6} {:>9} {:>7}",
            "PEER",
            "NAME",
            "ALLOWED",
            "CONNS",
            "DIALING",
            "QUEUED",
            "ACTIVE",
            "TO-ANSWER",
            "UNACKED"
        ));
        for peer in &report.peers {
            line(peer_row(peer));
        }
    }
    out
}

fn peer_row(peer: &PeerReport) -> String {
    let short: String = peer.peer.chars().take(16).collect();
    format!(
        "  {:<16} {:<12} {:>7} {:>5} {:>7} {:>6} {:>6} {:>9} {:>7}",
        short,
        peer.name.as_deref().unwrap_or("-"),
        if peer.allowed { "yes" } else { "no" },
        peer.connections,
        peer.connecting,
        peer.queued,
        peer.active,
        peer.awaiting_answer,
        peer.awaiting_ack
    )
}
