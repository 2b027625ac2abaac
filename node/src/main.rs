//! `p2p-node`: run a node from the command line.
//!
//! ```text
//! p2p-node keygen --out bob.key
//! p2p-node id --key bob.key
//! p2p-node serve --key bob.key --listen 127.0.0.1:7000 --allow allow.toml [--exec 'tr a-z A-Z']
//! p2p-node send --key alice.key --to <bob's peer id>@127.0.0.1:7000 hello
//! ```
//!
//! With `--data-dir DIR`, a node keeps its exchanges in `DIR/node.redb`: killed and started
//! again on the same directory, it resumes them (see the `durable` module of the core).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use p2p_handler::{
    AllowList, Config, Event, ExchangeId, HandlerError, Keypair, Options, P2pHandler, PeerId,
};

#[derive(Parser)]
#[command(
    name = "p2p-node",
    version,
    about = "An authenticated peer-to-peer exchange node"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a private key file (64 hex digits, readable by the owner only).
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the peer id of a key file.
    Id {
        /// The key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Answer requests: echo each one, or pipe it through a command and reply with its output.
    Serve {
        /// This node's key file.
        #[arg(long)]
        key: PathBuf,
        /// Address to listen on (port 0 picks one and prints it).
        #[arg(long, default_value = "127.0.0.1:7000")]
        listen: String,
        /// Allow-list file (TOML) of the peers that may talk to this node.
        #[arg(long, required_unless_present = "allow_any_peer_insecure")]
        allow: Option<PathBuf>,
        /// Accept any authenticated peer. Only for experiments.
        #[arg(long)]
        allow_any_peer_insecure: bool,
        /// Shell command that turns each request (on stdin) into its reply (stdout).
        #[arg(long)]
        exec: Option<String>,
        /// Stop after answering this many requests (default: run until killed).
        #[arg(long)]
        count: Option<u64>,
        /// Commands run at once, for different requests; more requests wait their turn.
        #[arg(long, default_value_t = 8)]
        jobs: usize,
        /// How long the application may take to answer a request; a command still running
        /// then is killed, and the dialer is told (Abort NoResponse).
        #[arg(long, default_value = "25", value_name = "SECONDS")]
        response_timeout: u64,
        /// Keep exchanges in this directory, so that a restart (even after a crash) loses
        /// none: requests acknowledged and not answered are run again (the command sees
        /// P2P_REDELIVERED=1), answered ones are never run twice.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Send one request (or several) and print the reply and timings.
    Send {
        /// This node's key file.
        #[arg(long)]
        key: PathBuf,
        /// The responder, as PEER_ID@HOST:PORT.
        #[arg(long)]
        to: String,
        /// The message; read from stdin when absent.
        message: Option<String>,
        /// Send it this many times, one exchange after another, and print timing statistics.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Give up after this long. Default: the handler's whole retry budget for one
        /// exchange (Config::exchange_budget, about 225 s with the defaults), so that a dead
        /// or slow peer shows the handler's real cause rather than this timeout.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// Keep exchanges in this directory: run again after a crash, the node resumes the
        /// requests it had not finished and prints their outcomes too.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p2p-node: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn run(command: Cmd) -> Result<()> {
    match command {
        Cmd::Keygen { out, force } => keygen(&out, force),
        Cmd::Id { key } => {
            println!("{}", Keypair::from_file(&key)?.peer_id());
            Ok(())
        }
        Cmd::Serve {
            key,
            listen,
            allow,
            allow_any_peer_insecure,
            exec,
            count,
            jobs,
            response_timeout,
            data_dir,
        } => {
            let allow = match allow {
                Some(path) => AllowList::from_file(path)?,
                None if allow_any_peer_insecure => AllowList::allow_any_peer_insecure(),
                None => return Err("--allow or --allow-any-peer-insecure is required".into()),
            };
            let config = Config {
                response_timeout: Duration::from_secs(response_timeout.max(1)),
                ..Config::default()
            };
            let options = ServeOptions {
                exec,
                count,
                jobs: jobs.max(1),
            };
            let start = start_options(config, data_dir.as_deref())?;
            serve(Keypair::from_file(&key)?, &listen, allow, start, &options)
        }
        Cmd::Send {
            key,
            to,
            message,
            repeat,
            timeout,
            data_dir,
        } => {
            let (peer, addr) = parse_target(&to)?;
            let message = match message {
                Some(m) => m.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf)?;
                    buf
                }
            };
            send(
                Keypair::from_file(&key)?,
                (peer, addr),
                message,
                repeat.max(1),
                // One second over the budget: the outcome itself arrives first.
                timeout.map_or_else(
                    || Config::default().exchange_budget() + Duration::from_secs(1),
                    Duration::from_secs,
                ),
                start_options(Config::default(), data_dir.as_deref())?,
            )
        }
    }
}

fn keygen(out: &Path, force: bool) -> Result<()> {
    let mut private = [0u8; 32];
    getrandom::fill(&mut private).map_err(|e| format!("no OS randomness: {e}"))?;
    let key = Keypair::from_private_bytes(private);
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(out)
        .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    writeln!(file, "{}", key.to_hex())?;
    println!("{}", key.peer_id());
    Ok(())
}

fn parse_target(to: &str) -> Result<(PeerId, SocketAddr)> {
    let (id, addr) = to
        .split_once('@')
        .ok_or_else(|| format!("--to must be PEER_ID@HOST:PORT, got {to:?}"))?;
    let peer: PeerId = id.parse().map_err(|e| format!("bad peer id {id:?}: {e}"))?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to nothing"))?;
    Ok((peer, addr))
}

/// A node's start options: fresh randomness, and the data directory if one is given.
fn start_options(config: Config, data_dir: Option<&Path>) -> Result<Options> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no randomness from the OS: {e}"))?;
    let options = Options::new(config, seed);
    Ok(match data_dir {
        Some(dir) => options.data_dir(dir)?,
        None => options,
    })
}

struct ServeOptions {
    exec: Option<String>,
    count: Option<u64>,
    jobs: usize,
}

/// Answers requests until `count` are answered (or forever). Nothing one request does can
/// stop it: a reply the dialer cannot take, a command that fails or runs too long, an
/// answer that comes too late are all reported on stderr, and serving goes on. Commands
/// run on their own threads, up to `jobs` at once, so a slow one delays no one else.
fn serve(
    key: Keypair,
    listen: &str,
    allow: AllowList,
    start: Options,
    options: &ServeOptions,
) -> Result<()> {
    let deadline = start.config.response_timeout;
    let node = P2pHandler::with_options(listen, key, allow, start)?;
    println!(
        "listening on {} as {}",
        node.local_address(),
        node.local_peer_id()
    );
    std::io::stdout().flush()?;
    let answered = AtomicU64::new(0);
    let done = |answered: &AtomicU64| {
        options
            .count
            .is_some_and(|c| answered.load(Ordering::Acquire) >= c)
    };
    // One token per command allowed to run; a finished command hands its token back.
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<()>(options.jobs);
    for _ in 0..options.jobs {
        free_tx.send(())?;
    }
    let stopped = std::thread::scope(|scope| -> Result<()> {
        while !done(&answered) {
            report_notices(&node);
            let Some(event) = node.receive_timeout(Duration::from_millis(200)) else {
                continue;
            };
            let Event::Request {
                peer,
                addr,
                exchange,
                payload,
                redelivered,
            } = event
            else {
                report_outcome(&event);
                continue;
            };
            let again = if redelivered { " (redelivered)" } else { "" };
            eprintln!(
                "request {exchange} from {} at {addr} ({} bytes){again}",
                peer.short(),
                payload.len()
            );
            let Some(cmd) = options.exec.as_deref() else {
                answer(&node, peer, exchange, payload.to_vec(), &answered)?;
                continue;
            };
            // Wait for a free slot, still reporting what happens meanwhile.
            while free_rx.recv_timeout(Duration::from_millis(200)).is_err() {
                report_notices(&node);
            }
            let (node, answered, free_tx) = (&node, &answered, free_tx.clone());
            scope.spawn(move || {
                let env = [
                    ("P2P_PEER", peer.to_string()),
                    ("P2P_EXCHANGE", exchange.to_string()),
                    ("P2P_REDELIVERED", u8::from(redelivered).to_string()),
                ];
                match pipe(cmd, &payload, &env, deadline) {
                    Ok(reply) => {
                        // Only a stopped node fails here, and the main loop sees that too.
                        let _ = answer(node, peer, exchange, reply, answered);
                    }
                    // Not answering tells the dialer (Abort NoResponse) at the timeout.
                    Err(e) => eprintln!("command failed, not answering {exchange}: {e}"),
                }
                let _ = free_tx.send(());
            });
        }
        Ok(())
    });
    let report = node.shutdown();
    eprintln!(
        "answered {} requests; {} unanswered at shutdown",
        answered.load(Ordering::Acquire),
        report.unanswered_requests
    );
    stopped
}

/// Prints the notices waiting on the priority channel (peer errors, limits).
fn report_notices(node: &P2pHandler) {
    while let Some(notice) = node.check_priority() {
        eprintln!("notice: {notice}");
    }
}

/// Reports how a request we received ended, when it did not end well.
fn report_outcome(event: &Event) {
    match event {
        Event::ResponseAborted {
            peer,
            exchange,
            reason,
        } => eprintln!("request {exchange} from {} aborted: {reason}", peer.short()),
        Event::ResponseTimedOut { peer, exchange } => eprintln!(
            "request {exchange} from {} not answered in time",
            peer.short()
        ),
        Event::ResponseUnconfirmed { peer, exchange } => {
            eprintln!("reply to {exchange} from {} not confirmed", peer.short())
        }
        Event::Reply {
            peer,
            exchange,
            payload,
            ..
        } => eprintln!(
            "reply to earlier request {exchange} from {} ({} bytes)",
            peer.short(),
            payload.len()
        ),
        Event::Failed {
            peer,
            exchange,
            failure,
            ..
        } => eprintln!(
            "earlier request {exchange} to {} failed: {failure}",
            peer.short()
        ),
        _ => {}
    }
}

/// Answers one request. Refusals concern that request alone and are reported; only a
/// stopped node is an error.
fn answer(
    node: &P2pHandler,
    peer: PeerId,
    exchange: ExchangeId,
    reply: Vec<u8>,
    answered: &AtomicU64,
) -> Result<()> {
    match node.response_to(peer, exchange, reply) {
        Ok(()) => {
            answered.fetch_add(1, Ordering::AcqRel);
            Ok(())
        }
        Err(HandlerError::Stopped) => Err(HandlerError::Stopped.into()),
        Err(e) => {
            eprintln!(
                "cannot answer request {exchange} from {}: {e}",
                peer.short()
            );
            Ok(())
        }
    }
}

/// Runs `cmd` with `input` on its stdin and returns its stdout. The input is written from
/// its own thread while the output is read, so neither pipe can fill up and block the
/// other, whatever the sizes. A command (with everything it started) still running after
/// `deadline` is killed.
fn pipe(cmd: &str, input: &[u8], env: &[(&str, String)], deadline: Duration) -> Result<Vec<u8>> {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Its own process group, so a kill reaches whatever the shell started.
        command.process_group(0);
    }
    let mut child = command.spawn()?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let (out_tx, out_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        if let Some(mut stdin) = stdin {
            // A command that stops reading early makes this fail with a broken pipe:
            // its exit status, not this write, says whether it worked.
            scope.spawn(move || {
                let _ = stdin.write_all(input);
            });
        }
        if let Some(mut stdout) = stdout {
            scope.spawn(move || {
                let mut out = Vec::new();
                let read = stdout.read_to_end(&mut out).map(|_| out);
                let _ = out_tx.send(read);
            });
        }
        let output: Result<Vec<u8>> = match out_rx.recv_timeout(deadline) {
            Ok(read) => read.map_err(Into::into),
            Err(_) => {
                kill_group(&mut child);
                Err(format!("{cmd:?} still running after {deadline:?}: killed").into())
            }
        };
        let status = child.wait()?;
        let out = output?;
        if !status.success() {
            return Err(format!("{cmd:?} exited with {status}").into());
        }
        Ok(out)
    })
}

/// Kills a command and every process it started (they share its process group).
fn kill_group(child: &mut std::process::Child) {
    #[cfg(unix)]
    {
        let group = format!("-{}", child.id());
        let killed = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        if killed.is_ok_and(|s| s.success()) {
            return;
        }
    }
    let _ = child.kill();
}

fn send(
    key: Keypair,
    (peer, addr): (PeerId, SocketAddr),
    message: Vec<u8>,
    repeat: u32,
    timeout: Duration,
    start: Options,
) -> Result<()> {
    // Replies come back on the connections we dial, so nothing needs to reach this node:
    // its listener stays on loopback rather than on every interface.
    let node = P2pHandler::with_options("127.0.0.1:0", key, AllowList::from_peers([peer]), start)?;
    let mut times = Vec::new();
    let mut last = Vec::new();
    for _ in 0..repeat {
        let started = Instant::now();
        let id = node.request(peer, addr, message.clone())?;
        // The outcome, a Reply or a Failed, comes on the receive channel.
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            match node.receive_timeout(left) {
                Some(Event::Reply {
                    exchange, payload, ..
                }) if exchange == id => {
                    times.push(started.elapsed());
                    last = payload.to_vec();
                    break;
                }
                Some(Event::Failed {
                    exchange, failure, ..
                }) if exchange == id => {
                    return Err(format!("request {id} failed: {failure}").into());
                }
                // Outcomes of requests a previous run left in the data directory.
                Some(other) => report_outcome(&other),
                None => return Err(format!("no reply within {timeout:?}").into()),
            }
        }
    }
    std::io::stdout().write_all(&last)?;
    if !last.ends_with(b"\n") {
        println!();
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    match times.as_slice() {
        [one] => eprintln!("exchange with {} took {:.2} ms", peer.short(), ms(*one)),
        all => eprintln!(
            "{} exchanges with {}: min {:.2} ms, median {:.2} ms, max {:.2} ms",
            all.len(),
            peer.short(),
            ms(all[0]),
            ms(all[all.len() / 2]),
            ms(all[all.len() - 1])
        ),
    }
    node.shutdown();
    Ok(())
}
