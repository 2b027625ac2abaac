//! The node's HTTP listener for operators: `/metrics` for Prometheus, `/healthz` and
//! `/readyz` for supervisors and load balancers, `/status` (JSON) for `p2p-node status`.
//!
//! metrics-exporter-prometheus renders the metrics; this file only serves them, over a small
//! blocking HTTP/1.1 responder on its own thread, because the exporter's own listener cannot
//! bind port 0 and report the port it got (tests and several nodes on one host need that).
//! It answers one connection at a time with short timeouts, so a client that never sends
//! its request holds it for at most [`IO_TIMEOUT`]: meant for a scraper on loopback or a
//! private network, not for the internet. Every path answers GET and HEAD.
//!
//! - `/healthz`: 200 while the handler task answers within [`PROBE_TIMEOUT`], else 503.
//!   A liveness probe: a 503 means restart the node.
//! - `/readyz`: 200 from the moment the node listens until a stop begins, else 503 (with
//!   "starting" or "stopping"). A readiness probe: send it no new work while 503.
//! - `/status`: the handler's [`p2p_handler::Status`] with its per-peer table, the allow
//!   list's source and last successful reload, as one JSON object ([`Report`]).
//!
//! The node's own families (beside the handler's, see `p2p_handler`'s catalogue):
//! `p2p_node_build_info{version,protocol}` (always 1), the allow-list reload counters
//! [`RELOADS`]`{result="applied"|"unchanged"|"failed"}` and [`LAST_RELOAD`], and the
//! standard `process_*` families (CPU seconds, memory, open descriptors, start time).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use p2p_handler::{Handler, PeerSummary, Status};
use serde::{Deserialize, Serialize};

use crate::allow::Reload;

/// How long one request may take to arrive or its answer to leave.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `/healthz` and `/status` wait for the handler task.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest request head read.
const MAX_HEAD: usize = 8 * 1024;

/// Allow-list (or membership) file reloads, by result.
pub(crate) const RELOADS: &str = "p2p_node_allow_reloads_total";
/// When the allow list was last reloaded with success (applied or unchanged), Unix seconds.
pub(crate) const LAST_RELOAD: &str = "p2p_node_allow_last_reload_success_timestamp_seconds";

/// What the probes answer, shared by the serve loop and the listener.
#[derive(Default)]
pub(crate) struct Health {
    /// [`STARTING`], [`READY`] or [`STOPPING`].
    state: AtomicU8,
    /// The running handler and where its allow list comes from, once it runs.
    running: OnceLock<(Handler, AllowReport)>,
}

const STARTING: u8 = 0;
const READY: u8 = 1;
const STOPPING: u8 = 2;

/// When the last successful reload happened (Unix seconds; 0: none yet).
static LAST_RELOAD_UNIX: AtomicU64 = AtomicU64::new(0);

impl Health {
    /// The node listens: ready for work.
    pub(crate) fn ready(&self, handler: Handler, allow: AllowReport) {
        let _ = self.running.set((handler, allow));
        self.state.store(READY, Ordering::Release);
    }

    /// A stop began: no new work.
    pub(crate) fn stopping(&self) {
        self.state.store(STOPPING, Ordering::Release);
    }

    /// "starting", "ready" or "stopping": what `/readyz` and `/status` say.
    fn state(&self) -> &'static str {
        match self.state.load(Ordering::Acquire) {
            READY => "ready",
            STARTING => "starting",
            _ => "stopping",
        }
    }
}

/// Counts a reload (see [`RELOADS`]); a successful one also sets [`LAST_RELOAD`].
pub(crate) fn reloaded(result: Reload) {
    metrics::counter!(RELOADS, "result" => result.label()).increment(1);
    if !matches!(result, Reload::Failed) {
        let now = unix_now();
        LAST_RELOAD_UNIX.store(now, Ordering::Release);
        #[allow(clippy::cast_precision_loss)] // Seconds since 1970, far below 2^52.
        metrics::gauge!(LAST_RELOAD).set(now as f64);
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Installs the Prometheus recorder (before the handler starts, so its metrics register
/// with it) and serves it on `addr`. Returns the address bound (port 0 picks one) and the
/// probes' state, for the serve loop to move.
pub(crate) fn serve(addr: SocketAddr) -> Result<(SocketAddr, Arc<Health>), String> {
    let listener =
        TcpListener::bind(addr).map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("metrics listener: {e}"))?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(p2p_handler::EXCHANGE_DURATION.to_owned()),
            &p2p_handler::EXCHANGE_DURATION_BUCKETS,
        )
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe();
    let process = metrics_process::Collector::default();
    process.describe();
    let health = Arc::new(Health::default());
    let shared = health.clone();
    // The handler is async; the probes wait on it from this thread's own small runtime.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot start the metrics runtime: {e}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let server = Server {
                handle,
                process,
                health: shared,
                runtime,
            };
            for stream in listener.incoming().flatten() {
                if let Err(e) = server.answer(stream) {
                    tracing::debug!("metrics request failed: {e}");
                }
            }
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    Ok((bound, health))
}

/// The node's own families, described, and their labels registered at zero.
fn describe() {
    describe_gauge!(
        "p2p_node_build_info",
        "The running p2p-node's version and wire protocol version; always 1."
    );
    metrics::gauge!(
        "p2p_node_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "protocol" => p2p_handler::wire::PROTOCOL_VERSION.to_string()
    )
    .set(1.0);
    describe_counter!(
        RELOADS,
        Unit::Count,
        "Reloads of the allow-list or membership file (on a change or SIGHUP), by result: \
         applied, unchanged (SIGHUP, nothing new) or failed (the list in force stays)."
    );
    for result in Reload::ALL {
        let _ = metrics::counter!(RELOADS, "result" => result.label());
    }
    describe_gauge!(
        LAST_RELOAD,
        Unit::Seconds,
        "When the allow-list or membership file was last reloaded with success (applied or \
         unchanged), in Unix seconds; 0 until the first reload."
    );
    metrics::gauge!(LAST_RELOAD).set(0.0);
}

/// The listener's side: what it renders and asks.
struct Server {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
    health: Arc<Health>,
    runtime: tokio::runtime::Runtime,
}

impl Server {
    fn answer(&self, stream: TcpStream) -> std::io::Result<()> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let request_line = read_head(&stream)?;
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = path.split('?').next().unwrap_or("");
        let head = method == "HEAD";
        let (status, kind, body) = if method == "GET" || head {
            self.route(path)
        } else {
            (
                "405 Method Not Allowed",
                TEXT,
                "use GET or HEAD\n".to_owned(),
            )
        };
        let mut out = stream;
        write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
             Allow: GET, HEAD\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        if !head {
            out.write_all(body.as_bytes())?;
        }
        out.flush()
    }

    fn route(&self, path: &str) -> (&'static str, &'static str, String) {
        match path {
            "/metrics" => {
                self.process.collect();
                ("200 OK", METRICS, self.handle.render())
            }
            "/healthz" => match self.status() {
                Ok(_) => ("200 OK", TEXT, "ok\n".to_owned()),
                Err(why) => ("503 Service Unavailable", TEXT, format!("{why}\n")),
            },
            "/readyz" => match self.health.state() {
                "ready" => ("200 OK", TEXT, "ready\n".to_owned()),
                other => ("503 Service Unavailable", TEXT, format!("{other}\n")),
            },
            "/status" => match self.report() {
                Ok(report) => match serde_json::to_string_pretty(&report) {
                    Ok(json) => ("200 OK", JSON, json + "\n"),
                    Err(e) => ("500 Internal Server Error", TEXT, format!("{e}\n")),
                },
                Err(why) => ("503 Service Unavailable", TEXT, format!("{why}\n")),
            },
            _ => (
                "404 Not Found",
                TEXT,
                "try /metrics, /healthz, /readyz or /status\n".to_owned(),
            ),
        }
    }

    /// The running handler's answer to `ask`, if it runs and answers in time.
    fn ask<T>(
        &self,
        ask: impl AsyncFnOnce(&Handler) -> Result<T, p2p_handler::HandlerError>,
    ) -> Result<T, String> {
        let (handler, _) = self.health.running.get().ok_or("starting")?;
        self.runtime
            // The timer is made inside the runtime: it needs its time driver.
            .block_on(async { tokio::time::timeout(PROBE_TIMEOUT, ask(handler)).await })
            .map_err(|_| format!("the handler did not answer within {PROBE_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())
    }

    /// The handler's status, if it answers in time.
    fn status(&self) -> Result<Status, String> {
        self.ask(async |h| h.status().await)
    }

    fn report(&self) -> Result<Report, String> {
        let status = self.status()?;
        let (handler, allow) = self.health.running.get().ok_or("starting")?;
        let membership = self.ask(async |h| h.membership().await).ok().flatten();
        Ok(Report {
            peer_id: handler.local_peer_id().to_string(),
            listen: handler.local_addr().to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            state: self.health.state().to_owned(),
            allow: AllowReport {
                last_reload_unix: match LAST_RELOAD_UNIX.load(Ordering::Acquire) {
                    0 => None,
                    t => Some(t),
                },
                epoch: membership.as_ref().map(|m| m.epoch),
                ..allow.clone()
            },
            connections: status.open_connections,
            connection_tasks: status.connection_tasks,
            outbound_in_flight: status.outbound_in_flight,
            pending_responses: status.pending_responses,
            draining: status.draining,
            inactive_members: status
                .inactive_members
                .iter()
                .map(ToString::to_string)
                .collect(),
            peers: status.peers.iter().map(PeerReport::from).collect(),
        })
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const METRICS: &str = "text/plain; version=0.0.4; charset=utf-8";
const JSON: &str = "application/json";

/// Reads the request line, and skips the headers up to the blank line (bounded).
fn read_head(stream: &TcpStream) -> std::io::Result<String> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut read = request_line.len();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line)?;
        read += n;
        if n == 0 || line == "\r\n" || line == "\n" || read > MAX_HEAD {
            return Ok(request_line);
        }
    }
}

/// What `GET /status` answers, and `p2p-node status` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Report {
    /// This node's peer id.
    pub(crate) peer_id: String,
    /// Where it listens.
    pub(crate) listen: String,
    /// p2p-node's version.
    pub(crate) version: String,
    /// "starting", "ready" or "stopping".
    pub(crate) state: String,
    /// The allow list in force and where it comes from.
    pub(crate) allow: AllowReport,
    /// Connections the handler knows (established or dialing).
    pub(crate) connections: usize,
    /// Connection tasks on the network side.
    pub(crate) connection_tasks: usize,
    /// Our exchanges not finished yet.
    pub(crate) outbound_in_flight: usize,
    /// Peers' requests awaiting our answer or the Ack of our reply.
    pub(crate) pending_responses: usize,
    /// A graceful stop began.
    pub(crate) draining: bool,
    /// Members without an unexpired address record (records on).
    pub(crate) inactive_members: Vec<String>,
    /// Every peer allowed, connected or with an exchange.
    pub(crate) peers: Vec<PeerReport>,
}

/// The allow list's source.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct AllowReport {
    /// "file", "membership" or "any-peer-insecure".
    pub(crate) source: String,
    /// The file, if any.
    pub(crate) path: Option<String>,
    /// The membership epoch in force (membership only).
    pub(crate) epoch: Option<u64>,
    /// When a reload last succeeded (Unix seconds); none since the start if absent.
    pub(crate) last_reload_unix: Option<u64>,
}

/// One peer in [`Report`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PeerReport {
    /// Its peer id.
    pub(crate) peer: String,
    /// Its label in the allow list.
    pub(crate) name: Option<String>,
    /// The allow list in force lets it talk to us.
    pub(crate) allowed: bool,
    /// Established connections.
    pub(crate) connections: usize,
    /// Connections being dialed or handshaking.
    pub(crate) connecting: usize,
    /// Our exchanges waiting their turn.
    pub(crate) queued: usize,
    /// Our exchanges under way.
    pub(crate) active: usize,
    /// Its requests our application has not answered yet.
    pub(crate) awaiting_answer: usize,
    /// Our replies it has not acknowledged yet.
    pub(crate) awaiting_ack: usize,
}

impl From<&PeerSummary> for PeerReport {
    fn from(s: &PeerSummary) -> Self {
        Self {
            peer: s.peer.to_string(),
            name: s.name.clone(),
            allowed: s.allowed,
            connections: s.connections,
            connecting: s.connecting,
            queued: s.queued,
            active: s.active,
            awaiting_answer: s.awaiting_answer,
            awaiting_ack: s.awaiting_ack,
        }
    }
}
