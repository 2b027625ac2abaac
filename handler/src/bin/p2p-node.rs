//! `p2p-node`: run a node from the command line.
//!
//! ```text
//! p2p-node keygen --out bob.key
//! p2p-node id --key bob.key
//! p2p-node serve --key bob.key --listen 127.0.0.1:7000 --allow allow.toml [--exec 'tr a-z A-Z']
//! p2p-node send --key alice.key --to <bob's peer id>@127.0.0.1:7000 hello
//! ```

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use p2p_handler::{AllowList, Config, Event, Keypair, Notice, P2pHandler, PeerId};

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
        /// Give up after this long.
        #[arg(long, default_value = "30", value_name = "SECONDS")]
        timeout: u64,
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
        } => {
            let allow = match allow {
                Some(path) => AllowList::from_file(path)?,
                None if allow_any_peer_insecure => AllowList::allow_any_peer_insecure(),
                None => return Err("--allow or --allow-any-peer-insecure is required".into()),
            };
            serve(
                Keypair::from_file(&key)?,
                &listen,
                allow,
                exec.as_deref(),
                count,
            )
        }
        Cmd::Send {
            key,
            to,
            message,
            repeat,
            timeout,
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
                peer,
                addr,
                message,
                repeat.max(1),
                Duration::from_secs(timeout),
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

fn serve(
    key: Keypair,
    listen: &str,
    allow: AllowList,
    exec: Option<&str>,
    count: Option<u64>,
) -> Result<()> {
    let node = P2pHandler::with_config(listen, key, allow, Config::default())?;
    println!(
        "listening on {} as {}",
        node.local_address(),
        node.local_peer_id()
    );
    std::io::stdout().flush()?;
    let mut answered = 0u64;
    while count.is_none_or(|c| answered < c) {
        while let Some(notice) = node.check_priority() {
            eprintln!("notice: {notice:?}");
        }
        let Some(event) = node.receive_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let Event::Request {
            peer,
            addr,
            exchange,
            payload,
        } = event
        else {
            continue;
        };
        eprintln!(
            "request {exchange} from {} at {addr} ({} bytes)",
            peer.short(),
            payload.len()
        );
        let reply = match exec {
            None => payload.to_vec(),
            Some(cmd) => match pipe(cmd, &payload) {
                Ok(out) => out,
                Err(e) => {
                    // Not answering tells the dialer (Abort NoResponse) after the timeout.
                    eprintln!("command failed, not answering {exchange}: {e}");
                    continue;
                }
            },
        };
        node.response_to(peer, exchange, reply)?;
        answered += 1;
    }
    let report = node.shutdown();
    eprintln!(
        "answered {answered} requests; {} unanswered at shutdown",
        report.unanswered_requests
    );
    Ok(())
}

fn pipe(cmd: &str, input: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?} exited with {}", out.status).into());
    }
    Ok(out.stdout)
}

fn send(
    key: Keypair,
    peer: PeerId,
    addr: SocketAddr,
    message: Vec<u8>,
    repeat: u32,
    timeout: Duration,
) -> Result<()> {
    let node = P2pHandler::with_config(
        "0.0.0.0:0",
        key,
        AllowList::from_peers([peer]),
        Config::default(),
    )?;
    let mut times = Vec::new();
    let mut last = Vec::new();
    for _ in 0..repeat {
        let started = Instant::now();
        let id = node.request(peer, addr, message.clone())?;
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            if let Some(Notice::Event(Event::Failed { failure, .. })) = node.check_priority() {
                return Err(format!("request {id} failed: {failure:?}").into());
            }
            match node.receive_timeout(left.min(Duration::from_millis(100))) {
                Some(Event::Reply {
                    exchange, payload, ..
                }) if exchange == id => {
                    times.push(started.elapsed());
                    last = payload.to_vec();
                    break;
                }
                _ if started.elapsed() >= timeout => {
                    return Err(format!("no reply within {timeout:?}").into());
                }
                _ => {}
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
