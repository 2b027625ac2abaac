//! `p2p-node serve` as a service, from outside: a config file, metrics scraped over HTTP,
//! SIGTERM mid-burst, allow-list reloads (file change, SIGHUP, expiry), throttled and JSON
//! logs, start-up warnings. Every wait is for a line, an exit or a scraped value, bounded
//! by a deadline; no sleep stands in for synchronisation.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is a failed test.

#[path = "../../handler/tests/common/mod.rs"]
mod common;
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::RawPeer;
use p2p_handler::Keypair;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use support::{Setup, node};

const WAIT: Duration = Duration::from_secs(60);

/// A serving node whose stdout and stderr are read line by line as they come.
struct Served {
    child: Child,
    target: String,
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
    /// Every stderr line so far.
    log: Vec<String>,
    lines: mpsc::Receiver<String>,
}

impl Served {
    /// Starts `p2p-node serve ARGS` (with `env`) in the setup's directory.
    fn start(setup: &Setup, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = node()
            .arg("serve")
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .current_dir(&setup.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut metrics = None;
        let (target, addr) = loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "serve ended early"
            );
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["metrics", "on", url] => {
                    let addr = url
                        .trim_start_matches("http://")
                        .trim_end_matches("/metrics");
                    metrics = Some(addr.parse().unwrap());
                }
                ["listening", "on", addr, "as", id] => {
                    break (format!("{id}@{addr}"), addr.parse().unwrap());
                }
                _ => panic!("unexpected output {line:?}"),
            }
        };
        Self {
            child,
            target,
            addr,
            metrics,
            log: Vec::new(),
            lines,
        }
    }

    /// Waits for a stderr line containing `text`; returns it.
    fn wait_log(&mut self, text: &str) -> String {
        if let Some(line) = self.log.iter().find(|l| l.contains(text)) {
            return line.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line with {text:?}; log: {:#?}", self.log));
            self.log.push(line.clone());
            if line.contains(text) {
                return line;
            }
        }
    }

    /// Waits until `n` stderr lines contain `text`.
    fn wait_count(&mut self, text: &str, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.log.iter().filter(|l| l.contains(text)).count() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "fewer than {n} log lines with {text:?}; log: {:#?}",
                    self.log
                )
            });
            self.log.push(line);
        }
    }

    /// Sends a signal to the process.
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its status and its whole log.
    fn exit(mut self) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "serve did not exit");
            // Block on the log meanwhile: the process writes its last lines as it stops.
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
                self.log.push(line);
            }
        };
        let mut log = std::mem::take(&mut self.log);
        log.extend(self.lines.iter());
        (status, log)
    }

    /// One scrape of `/metrics` (the whole response, head and body).
    fn scrape(&self) -> String {
        let response = self.http("GET", "/metrics");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }

    /// One HTTP/1.1 request to the metrics listener; the whole response.
    fn http(&self, method: &str, path: &str) -> String {
        let mut stream = TcpStream::connect(self.metrics.unwrap()).unwrap();
        write!(stream, "{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    /// The value of the metric line starting with `series` (name and labels).
    fn metric(&self, series: &str) -> Option<f64> {
        self.scrape()
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Scrapes until `series` reaches `at_least`.
    fn wait_metric(&self, series: &str, at_least: f64) {
        let deadline = Instant::now() + WAIT;
        while self.metric(series).is_none_or(|v| v < at_least) {
            assert!(
                Instant::now() < deadline,
                "{series} never reached {at_least}: {}",
                self.scrape()
            );
            std::thread::yield_now();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `p2p-node send` as `client` to `target`; returns (success, stdout, stderr).
fn send(setup: &Setup, client: &str, target: &str, message: &str) -> (bool, String, String) {
    let out = send_cmd(setup, client, target, message).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn send_cmd(setup: &Setup, client: &str, target: &str, message: &str) -> Command {
    let mut cmd = setup.send(client, target);
    cmd.args(["--timeout", "30"]).arg(message);
    cmd
}

/// A command that echoes its input, but first, for inputs starting with "slow", waits until
/// the file `open` exists in the setup's directory: the test decides when slow commands
/// finish (all of them at once, however many are waiting), no clock does.
fn gated_echo(setup: &Setup) -> String {
    let open = setup.dir.join("open");
    format!(
        "x=$(cat); case \"$x\" in slow*) while [ ! -e '{}' ]; do sleep 0.01; done;; esac; \
         printf '%s\\n' \"$x\"",
        open.display()
    )
}

fn open_gate(setup: &Setup) {
    std::fs::write(setup.dir.join("open"), "").unwrap();
}

/// `serve` as Bob, with the setup's allow list, on a free port of 127.0.0.1, then `extra`.
fn serve_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--key",
        "bob.key",
        "--allow",
        "allow.toml",
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    args
}

fn write(setup: &Setup, name: &str, text: &str) {
    // Written aside and renamed, as careful tools do: a reader never sees half a file.
    let tmp = setup.dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, setup.dir.join(name)).unwrap();
}

fn id_of(setup: &Setup, name: &str) -> String {
    support::output(
        node()
            .args(["id", "--key"])
            .arg(setup.dir.join(format!("{name}.key"))),
    )
    .trim()
    .to_owned()
}

#[test]
fn a_config_file_sets_the_node_up_and_flags_override_it() {
    let setup = Setup::new("config");
    write(
        &setup,
        "node.toml",
        "listen = \"127.0.0.1:1\"\nkey = \"bob.key\"\nallow = \"allow.toml\"\n\
         exec = \"tr a-z A-Z\"\n\n[handler]\nresponse_timeout = \"5s\"\n",
    );
    // --listen overrides the file's (unusable) port 1.
    let served = Served::start(
        &setup,
        &["--config", "node.toml", "--listen", "127.0.0.1:0"],
        &[],
    );
    let (ok, out, err) = send(&setup, "alice", &served.target, "hello");
    assert!(ok, "{err}");
    assert_eq!(out, "HELLO\n");
    // A bad file stops the node before it starts, naming the file, the line and the field.
    write(
        &setup,
        "bad.toml",
        "key = \"bob.key\"\n\n[handler]\nmax_atempts = 3\n",
    );
    let out = node()
        .args(["serve", "--config", "bad.toml"])
        .current_dir(&setup.dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.toml") && err.contains("line 4") && err.contains("max_atempts"),
        "{err}"
    );
}

#[test]
fn metrics_are_scraped_over_http_and_count_exchanges() {
    let setup = Setup::new("metrics");
    let served = Served::start(&setup, &serve_args(&["--metrics", "127.0.0.1:0"]), &[]);
    for i in 0..3 {
        let (ok, _, err) = send(&setup, "alice", &served.target, &format!("m{i}"));
        assert!(ok, "{err}");
    }
    served.wait_metric("p2p_responses_total{outcome=\"delivered\"}", 3.0);
    assert_eq!(served.metric("p2p_requests_delivered_total"), Some(3.0));
    assert_eq!(served.metric("p2p_duplicates_dropped_total"), Some(0.0));
    assert!(served.metric("p2p_bytes_received_total").unwrap() > 0.0);
    assert!(served.metric("p2p_bytes_sent_total").unwrap() > 0.0);
    assert_eq!(served.metric("p2p_pending_responses"), Some(0.0));
    // Anything but /metrics is a 404, and a bad client does not stop the endpoint.
    let mut stream = TcpStream::connect(served.metrics.unwrap()).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    drop(TcpStream::connect(served.metrics.unwrap()).unwrap());
    assert_eq!(served.metric("p2p_requests_delivered_total"), Some(3.0));
}

/// The body of an HTTP response.
fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// A header's value in an HTTP response.
fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        key.eq_ignore_ascii_case(name).then_some(value.trim())
    })
}

#[test]
fn the_exposition_follows_prometheus_practice_and_the_probes_follow_the_node() {
    let setup = Setup::new("exposition");
    let echo = gated_echo(&setup);
    let mut served = Served::start(
        &setup,
        &serve_args(&[
            "--metrics",
            "127.0.0.1:0",
            "--exec",
            &echo,
            "--grace",
            "60s",
        ]),
        &[("RUST_LOG", "info,p2p_node=debug")],
    );
    let (ok, _, err) = send(&setup, "alice", &served.target, "one");
    assert!(ok, "{err}");
    served.wait_metric("p2p_responses_total{outcome=\"delivered\"}", 1.0);
    served.signal("HUP");
    served.wait_log("unchanged");
    served.wait_metric("p2p_node_allow_reloads_total{result=\"unchanged\"}", 1.0);

    let response = served.scrape();
    let text = body(&response);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    // Every family has its help text and a type.
    for sample in &scrape.samples {
        // The parser gives a histogram's sum and count as samples of their own.
        let family = ["_sum", "_count"]
            .iter()
            .find_map(|suffix| sample.metric.strip_suffix(suffix))
            .filter(|base| scrape.docs.contains_key(*base))
            .unwrap_or(&sample.metric);
        assert!(
            scrape.docs.contains_key(family),
            "no # HELP for {}:\n{text}",
            sample.metric
        );
        assert!(
            family != sample.metric || !matches!(sample.value, prometheus_parse::Value::Untyped(_)),
            "no # TYPE for {}",
            sample.metric
        );
    }
    let value = |name: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| s.value.clone())
    };
    let number = |name: &str, label: Option<(&str, &str)>| match value(name, label) {
        Some(prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v)) => v,
        other => panic!("{name} {label:?}: {other:?}\n{text}"),
    };
    // A node that only served shows its own exchanges' family, at zero.
    assert_eq!(
        number("p2p_exchanges_total", Some(("outcome", "reply"))),
        0.0
    );
    assert_eq!(
        number("p2p_responses_total", Some(("outcome", "delivered"))),
        1.0
    );
    // One meaning per family: connections and connection tasks are two.
    assert!(value("p2p_connections", None).is_none(), "{text}");
    assert!(value("p2p_connections_established", None).is_some());
    assert!(value("p2p_connection_tasks", None).is_some());
    // The exchange's duration, in seconds, by role and outcome.
    match value(
        "p2p_exchange_duration_seconds",
        Some(("outcome", "delivered")),
    ) {
        Some(prometheus_parse::Value::Histogram(buckets)) => {
            assert!(buckets.len() > 10, "{buckets:?}");
            let all = buckets.last().unwrap();
            assert!(
                all.less_than.is_infinite() && all.count == 1.0,
                "{buckets:?}"
            );
        }
        other => panic!("no duration histogram: {other:?}\n{text}"),
    }
    assert!(text.contains("role=\"responder\""), "{text}");
    // What is running, and the process.
    assert_eq!(
        number(
            "p2p_node_build_info",
            Some(("version", env!("CARGO_PKG_VERSION")))
        ),
        1.0
    );
    // (The metrics facade's counters are integers: CPU time counts whole seconds.)
    assert!(number("process_cpu_seconds_total", None) >= 0.0);
    assert!(number("process_resident_memory_bytes", None) > 0.0);
    assert!(number("process_start_time_seconds", None) > 1.6e9);
    // Reloads: the SIGHUP's, and when the last one succeeded.
    assert_eq!(
        number("p2p_node_allow_reloads_total", Some(("result", "failed"))),
        0.0
    );
    assert!(number("p2p_node_allow_last_reload_success_timestamp_seconds", None) > 1.6e9);

    // HEAD answers like GET, without a body; other methods are refused.
    let head = served.http("HEAD", "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body(&head).is_empty(), "{head}");
    assert!(
        header(&head, "content-length")
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 1000
    );
    let post = served.http("POST", "/metrics");
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert_eq!(header(&post, "allow"), Some("GET, HEAD"));
    for method in ["GET", "HEAD"] {
        for path in ["/healthz", "/readyz"] {
            let response = served.http(method, path);
            assert!(
                response.starts_with("HTTP/1.1 200"),
                "{method} {path}: {response}"
            );
        }
    }
    assert_eq!(body(&served.http("GET", "/readyz")), "ready\n");

    // Stopping with an exchange in flight: no longer ready, still alive.
    let slow = send_cmd(&setup, "carol", &served.target, "slow one")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    served.wait_metric("p2p_pending_responses", 1.0);
    served.signal("TERM");
    served.wait_log("stopping");
    let ready = served.http("GET", "/readyz");
    assert!(
        ready.starts_with("HTTP/1.1 503") && body(&ready) == "stopping\n",
        "{ready}"
    );
    assert!(served.http("GET", "/healthz").starts_with("HTTP/1.1 200"));
    open_gate(&setup);
    let out = slow.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, log) = served.exit();
    assert!(status.success(), "{log:#?}");
}

#[test]
fn status_shows_a_running_nodes_peers_queues_and_exchanges() {
    let setup = Setup::new("status");
    let echo = gated_echo(&setup);
    let alice = id_of(&setup, "alice");
    let served = Served::start(
        &setup,
        &serve_args(&[
            "--metrics",
            "127.0.0.1:0",
            "--exec",
            &echo,
            "--data-dir",
            "data",
        ]),
        &[],
    );
    let metrics = served.metrics.unwrap().to_string();
    let slow = send_cmd(&setup, "alice", &served.target, "slow one")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    served.wait_metric("p2p_pending_responses", 1.0);
    // For a person: who it is, the allow list, what waits, and one row per peer.
    let out = support::output(node().args(["status", "--metrics", &metrics]));
    assert!(out.contains(&setup.bob) && out.contains(": ready"), "{out}");
    assert!(out.contains("allow list: file allow.toml"), "{out}");
    assert!(out.contains("not reloaded since the start"), "{out}");
    assert!(out.contains("1 of peers' waiting on us"), "{out}");
    let row = out
        .lines()
        .find(|l| l.trim_start().starts_with(&alice[..16]))
        .unwrap_or_else(|| panic!("no row for alice: {out}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    // PEER NAME ALLOWED CONNS DIALING QUEUED ACTIVE TO-ANSWER UNACKED
    assert_eq!(cells[2..], ["yes", "1", "0", "0", "0", "1", "0"], "{out}");
    // For a program: the node's JSON as it is.
    let json = support::output(node().args(["status", "--json", "--metrics", &metrics]));
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["pending_responses"], 1, "{json}");
    let peers = value["peers"].as_array().unwrap();
    let at_alice = peers.iter().find(|p| p["peer"] == alice.as_str()).unwrap();
    assert_eq!(at_alice["awaiting_answer"], 1, "{json}");
    // `check` on the same configuration does not touch a store a running node holds.
    let out = support::output(
        node()
            .arg("check")
            .args(serve_args(&["--data-dir", "data"]))
            .current_dir(&setup.dir),
    );
    assert!(out.contains("in use by a running node"), "{out}");
    open_gate(&setup);
    let out = slow.wait_with_output().unwrap();
    assert!(out.status.success());
    // A node without a metrics listener cannot be asked, and says where to look.
    let err = support::failure(node().args(["status", "--metrics", "127.0.0.1:1"]));
    assert!(
        err.contains("cannot reach") && err.contains("--metrics"),
        "{err}"
    );
}

#[test]
fn systemd_hears_ready_once_the_node_listens_and_stopping_when_it_stops() {
    use std::os::unix::net::UnixDatagram;
    let setup = Setup::new("notify");
    // systemd's side of Type=notify: a datagram socket named in $NOTIFY_SOCKET.
    let path = setup.dir.join("notify.sock");
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd.set_read_timeout(Some(WAIT)).unwrap();
    write(&setup, "node.toml", "[log]\nlevel = \"info\"\n");
    let mut served = Served::start(
        &setup,
        &serve_args(&["--config", "node.toml"]),
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("RUST_LOG", "info,p2p_node=debug"),
        ],
    );
    let mut buf = [0u8; 512];
    let n = systemd.recv(&mut buf).unwrap();
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready.contains(&format!("STATUS=listening on {}", served.addr)),
        "{ready:?}"
    );
    // READY came after the listener: a request sent now is served.
    assert!(send(&setup, "alice", &served.target, "hi").0);
    // An operator's RUST_LOG wins over the config's level, and the log says so.
    served.wait_log("overrides the config's [log] level \"info\"");
    served.signal("TERM");
    let n = systemd.recv(&mut buf).unwrap();
    let stopping = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let (status, log) = served.exit();
    assert!(status.success(), "{log:#?}");
}

#[test]
fn sigterm_mid_burst_lets_exchanges_in_flight_finish_and_exits_zero() {
    let setup = Setup::new("sigterm");
    let echo = gated_echo(&setup);
    let mut served = Served::start(
        &setup,
        &serve_args(&["--exec", &echo, "--grace", "60s"]),
        &[("RUST_LOG", "info,p2p_node=debug")],
    );
    // Two requests whose commands wait on the gate.
    let senders: Vec<Child> = ["alice", "carol"]
        .iter()
        .map(|c| {
            send_cmd(&setup, c, &served.target, &format!("slow {c}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    served.wait_count("request", 2);
    served.signal("TERM");
    served.wait_log("stopping");
    // The listener is closed: new connections are refused at once.
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(served.addr).is_ok() {
        assert!(Instant::now() < deadline, "listener still open");
        std::thread::yield_now();
    }
    // The commands finish; both dialers get their replies.
    open_gate(&setup);
    for (sender, client) in senders.into_iter().zip(["alice", "carol"]) {
        let out = sender.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("slow {client}\n")
        );
    }
    let (status, log) = served.exit();
    assert!(status.success(), "{status}: {log:#?}");
    assert!(
        log.iter()
            .any(|l| l.contains("every exchange in flight finished")),
        "{log:#?}"
    );
}

#[test]
fn the_grace_period_bounds_a_stop_and_the_exit_is_still_clean() {
    let setup = Setup::new("grace");
    let echo = gated_echo(&setup);
    let mut served = Served::start(
        &setup,
        &serve_args(&["--exec", &echo, "--grace", "300ms"]),
        &[("RUST_LOG", "info,p2p_node=debug")],
    );
    let sender = send_cmd(&setup, "alice", &served.target, "slow forever")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    served.wait_log("request");
    served.signal("TERM");
    let (status, log) = served.exit();
    assert!(status.success(), "{status}: {log:#?}");
    assert!(
        log.iter().any(|l| l.contains("1 requests unfinished")),
        "{log:#?}"
    );
    // The dialer is told (Abort ShuttingDown), with its payload back, rather than waiting.
    let out = sender.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("shutting down"), "{err}");
    // The command was killed with the node: nothing waits on the gate any more.
    assert!(
        log.iter().any(|l| l.contains("killed: the node stopped")),
        "{log:#?}"
    );
}

#[test]
fn the_allow_list_follows_its_file_sighup_and_expiry() {
    let setup = Setup::new("reload");
    let (alice, carol) = (id_of(&setup, "alice"), id_of(&setup, "carol"));
    write(
        &setup,
        "node.toml",
        "key = \"bob.key\"\nallow = \"allow.toml\"\nlisten = \"127.0.0.1:0\"\n\
         allow_reload_interval = \"20ms\"\n",
    );
    let mut served = Served::start(&setup, &["--config", "node.toml"], &[]);
    assert!(send(&setup, "alice", &served.target, "in").0);
    // Alice is dropped from the file: she is refused from then on; Carol is not.
    write(
        &setup,
        "allow.toml",
        &format!("[[peer]]\nid = \"{carol}\"\nname = \"carol\"\n"),
    );
    served.wait_log("reloaded");
    let line = served.wait_log("removed");
    assert!(line.contains(&alice[..8]), "{line}");
    let (ok, _, err) = send(&setup, "alice", &served.target, "out");
    assert!(!ok && err.contains("allow list"), "{err}");
    assert!(send(&setup, "carol", &served.target, "still in").0);
    // A file that does not parse is reported, and the list in force stays.
    write(&setup, "allow.toml", "[[peer]]\nid = \"not hex\"\n");
    served.signal("HUP");
    let line = served.wait_log("invalid allow list");
    assert!(line.contains("line 2"), "{line}");
    assert!(send(&setup, "carol", &served.target, "still in").0);
    // Carol's entry now expires shortly after the reload: then she is out too.
    write(
        &setup,
        "allow.toml",
        &format!("[[peer]]\nid = \"{carol}\"\nname = \"carol\"\nexpires = \"300ms\"\n"),
    );
    served.signal("HUP");
    let line = served.wait_log("expired");
    assert!(line.contains("carol"), "{:#?}", served.log);
    let (ok, _, err) = send(&setup, "carol", &served.target, "late");
    assert!(!ok && err.contains("allow list"), "{err}");
}

#[test]
fn a_burst_of_unlisted_keys_writes_one_line_and_a_count() {
    let setup = Setup::new("flood");
    // Failed handshakes from one address are slowed to `stranger_handshake_rate` (8 a
    // second by default), which would spread this burst over several log windows: the
    // burst here is about the log, so the rate is lifted.
    write(
        &setup,
        "node.toml",
        "[handler]\nstranger_handshake_rate = { burst = 1000, per_second = 1000 }\n",
    );
    let served = Served::start(
        &setup,
        &serve_args(&["--metrics", "127.0.0.1:0", "--config", "node.toml"]),
        &[],
    );
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    const STRANGERS: usize = 200;
    for _ in 0..STRANGERS {
        // The handshake completes on our side; the node then finds the key unlisted.
        let _ = RawPeer::dial(served.addr, &Keypair::generate(&mut rng), 1 << 20);
    }
    served.wait_metric(
        "p2p_handshake_failures_total{cause=\"not_allowed\"}",
        STRANGERS as f64,
    );
    served.signal("TERM");
    let (status, log) = served.exit();
    assert!(status.success(), "{log:#?}");
    let refusals: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("not on the allow list"))
        .collect();
    assert_eq!(refusals.len(), 2, "a line and a summary: {refusals:#?}");
    assert!(
        refusals[1].contains(&format!("{} more like this", STRANGERS - 1)),
        "{}",
        refusals[1]
    );
    // Not a terminal: no colour codes.
    assert!(log.iter().all(|l| !l.contains('\u{1b}')), "{log:#?}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let setup = Setup::new("json");
    let mut served = Served::start(&setup, &serve_args(&["--log-format", "json"]), &[]);
    let line = served.wait_log("listening on");
    assert!(
        line.starts_with('{') && line.ends_with('}') && line.contains("\"level\":\"INFO\""),
        "{line}"
    );
}

#[test]
fn a_readable_key_and_an_empty_allow_list_are_warned_about() {
    let setup = Setup::new("warn");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = setup.dir.join("bob.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    write(&setup, "empty.toml", "");
    let mut served = Served::start(
        &setup,
        &[
            "--key",
            "bob.key",
            "--allow",
            "empty.toml",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    served.wait_log("lists no peer");
    #[cfg(unix)]
    served.wait_log("can be read by other users");
}

#[test]
fn a_failing_command_refuses_the_request_at_once() {
    let setup = Setup::new("refuse");
    let served = Served::start(
        &setup,
        &serve_args(&["--exec", "exit 3", "--response-timeout", "600"]),
        &[],
    );
    // Without the refusal the dialer would wait for the 600 s response timeout (and this
    // send's own 30 s timeout would end it with "no reply").
    let (ok, _, err) = send(&setup, "alice", &served.target, "doomed");
    assert!(!ok);
    assert!(err.contains("its application refused it"), "{err}");
    // The node's own line says which exchange, in its span.
    let mut served = served;
    let line = served.wait_log("aborted: its application refused it");
    assert!(
        line.contains(" WARN ") && line.contains("exchange{peer="),
        "{line}"
    );
}

#[test]
fn a_successful_exchange_logs_nothing_by_default_and_every_message_at_debug() {
    let setup = Setup::new("levels");
    let args = serve_args(&[]);
    let quiet = Served::start(&setup, &args, &[]);
    assert!(send(&setup, "alice", &quiet.target, "one").0);
    assert!(send(&setup, "alice", &quiet.target, "two").0);
    quiet.signal("TERM");
    let (status, log) = quiet.exit();
    assert!(status.success());
    // Start and stop only.
    let expected = [
        "listening on",
        "stopping: no new requests",
        "every exchange in flight finished",
        "stopped: answered 2 requests",
    ];
    assert_eq!(log.len(), expected.len(), "{log:#?}");
    for (line, want) in log.iter().zip(expected) {
        assert!(line.contains(" INFO ") && line.contains(want), "{line}");
    }

    let mut verbose = Served::start(&setup, &args, &[("RUST_LOG", "debug")]);
    assert!(send(&setup, "alice", &verbose.target, "three").0);
    // Addresses as people write them, not as Rust debugs an Option.
    let line = verbose.wait_log("connection established");
    assert!(line.contains("addr=127.0.0.1:"), "{line}");
    // Lines about one exchange sit in its span: peer, id, attempt.
    let line = verbose.wait_log("received");
    assert!(
        line.contains("exchange{peer=")
            && line.contains(" id=x")
            && line.contains("attempt=1}")
            && line.contains("Request"),
        "{line}"
    );
    // A connection task's lines carry its span: which connection, from where.
    let line = verbose.wait_log("handshake complete");
    assert!(
        line.contains("conn{conn=i") && line.contains("remote=127.0.0.1:"),
        "{line}"
    );
    verbose.signal("TERM");
    let (_, log) = verbose.exit();
    assert!(!log.iter().any(|l| l.contains("Some(")), "{log:#?}");
}

#[test]
fn a_durable_node_stopped_gracefully_keeps_what_is_left_for_its_next_start() {
    let setup = Setup::new("durable-stop");
    let echo = gated_echo(&setup);
    let data = setup.dir.join("data");
    let data = data.to_str().unwrap();
    let mut first = Served::start(
        &setup,
        &serve_args(&["--data-dir", data, "--exec", &echo, "--grace", "200ms"]),
        &[("RUST_LOG", "info,p2p_node=debug")],
    );
    let sender = setup
        .send("alice", &first.target)
        .args(["--timeout", "120", "slow but kept"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(first.wait_log("store ").contains("new, nothing to resume"));
    first.wait_log("request");
    first.signal("TERM");
    let addr = first.addr;
    let (status, log) = first.exit();
    assert!(status.success(), "{log:#?}");
    assert!(
        log.iter().any(|l| l.contains("1 unanswered at shutdown")),
        "{log:#?}"
    );
    // Started again on the same address and data directory, with a command that answers:
    // the kept request is delivered again and the dialer, still retrying, gets its reply.
    let mut second = Served::start(
        &setup,
        &[
            "--key",
            "bob.key",
            "--allow",
            "allow.toml",
            "--listen",
            &addr.to_string(),
            "--data-dir",
            data,
            "--exec",
            "printf 'redelivered=%s ' \"$P2P_REDELIVERED\"; cat",
        ],
        &[],
    );
    // Its start says what it found, at the default level.
    let line = second.wait_log("resuming");
    assert!(
        line.contains("resuming 0 requests of ours")
            && line.contains("delivering 1 request from peers again"),
        "{line}"
    );
    let out = sender.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "redelivered=1 slow but kept\n"
    );
    drop(second);
}

/// The TCP addresses process `pid` listens on, from /proc (Linux).
#[cfg(target_os = "linux")]
fn listening(pid: u32) -> Vec<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_owned)
        })
        .collect();
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local address, state 0A = LISTEN, inode
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                out.push(f[1].to_owned());
            }
        }
    }
    out
}

#[cfg(target_os = "linux")]
#[test]
fn send_listens_on_loopback_only() {
    let setup = Setup::new("send-bind");
    let echo = gated_echo(&setup);
    let mut served = Served::start(
        &setup,
        &serve_args(&["--exec", &echo]),
        &[("RUST_LOG", "info,p2p_node=debug")],
    );
    let sender = send_cmd(&setup, "alice", &served.target, "slow")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While its exchange is in flight, the sender's one listener is on 127.0.0.1.
    served.wait_log("request");
    let sockets = listening(sender.id());
    open_gate(&setup);
    let out = sender.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    // /proc writes 127.0.0.1 as 0100007F (little-endian), then :port in hex.
    assert!(sockets[0].starts_with("0100007F:"), "{sockets:?}");
}
