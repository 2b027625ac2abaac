//! `p2p-node`: run a node from the command line.
//!
//! ```text
//! p2p-node keygen --out bob.key
//! p2p-node id --key bob.key
//! p2p-node serve --key bob.key --listen 127.0.0.1:7000 --allow allow.toml [--exec 'tr a-z A-Z']
//! p2p-node send --key alice.key --to <bob's peer id>@127.0.0.1:7000 hello
//! p2p-node send --key alice.key --membership signed.toml --records /shared/records --to <bob's peer id> hello
//! ```
//!
//! With `--data-dir DIR`, a node keeps its exchanges in `DIR/node.redb`: killed and started
//! again on the same directory, it resumes them (see the `durable` module of the core).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

mod allow;
mod check;
mod config;
mod logging;
mod membership;
mod metrics;
mod status;

use allow::{AllowFile, AllowSource};
use clap::{Parser, Subcommand};
use config::{LogFormat, NodeFile};
use p2p_handler::{
    AllowList, Config, Event, ExchangeId, HandlerError, KeyedExchange, Keypair, Options,
    P2pHandler, PeerId, RequestOptions,
};

#[derive(Parser)]
#[command(
    name = "p2p-node",
    version,
    about = "An authenticated peer-to-peer exchange node",
    after_help = "Logging: lines go to stderr. RUST_LOG sets the filter and overrides the config \
file's [log] level (e.g. RUST_LOG=debug, or RUST_LOG=p2p_handler=debug,warn); the default \
is info for serve (nothing per successful exchange, one line per problem) and warn \
otherwise. --log-format json writes one JSON object per line."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// `serve`'s flags (and `check`'s, which checks what `serve` would start with).
#[derive(clap::Args)]
struct ServeArgs {
    /// Node config file (TOML; see deploy/node.toml). Flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's key file.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Address to listen on (port 0 picks one and prints it). Default 127.0.0.1:7000.
    #[arg(long)]
    listen: Option<String>,
    /// Allow-list file (TOML) of the peers that may talk to this node.
    #[arg(long, conflicts_with = "membership")]
    allow: Option<PathBuf>,
    /// Signed membership document (from `membership combine`), in place of --allow: the
    /// committee's members may talk to this node. Re-read when it changes (and at once
    /// on SIGHUP): a newer epoch signed by the committee is applied and spread to every
    /// member; anything else is refused and logged, and the node keeps its epoch. With
    /// --data-dir the node remembers the newest epoch it accepted, so a restart never
    /// goes back to an older one, whatever the file says.
    #[arg(long, value_name = "SIGNED")]
    membership: Option<PathBuf>,
    /// Accept any authenticated peer. Only for experiments.
    #[arg(long)]
    allow_any_peer_insecure: bool,
    /// Shell command that turns each request (on stdin) into its reply (stdout).
    #[arg(long)]
    exec: Option<String>,
    /// Stop after answering this many requests (default: run until stopped).
    #[arg(long)]
    count: Option<u64>,
    /// Commands run at once, for different requests; more requests wait their turn.
    /// 1 to 1024; default 8.
    #[arg(long, value_parser = jobs_in_range)]
    jobs: Option<usize>,
    /// How long the application may take to answer a request; a command still running
    /// then is killed, and the dialer is told (Abort NoResponse). Seconds ("25") or a
    /// duration ("10s", "1m 30s"), at least 1 s. Default 25s.
    #[arg(long, value_name = "DURATION", value_parser = response_timeout_of)]
    response_timeout: Option<Duration>,
    /// Keep exchanges in this directory, so that a restart (even after a crash) loses
    /// none: requests acknowledged and not answered are run again (the command sees
    /// P2P_REDELIVERED=1), answered ones are never run twice.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// On SIGTERM or Ctrl-C, how long exchanges in flight may take to finish
    /// (e.g. "10s"). Default 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    grace: Option<Duration>,
    /// Serve Prometheus metrics on this address (GET /metrics).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// A folder shared with the other members (a mounted bucket, a synced folder):
    /// this node writes its signed, encrypted address record there and reads theirs, so
    /// members find each other by peer id alone and a node that moves is followed.
    /// Needs --membership.
    #[arg(long, value_name = "DIR")]
    records: Option<PathBuf>,
    /// An address to publish in this node's record (repeat for several, most preferred
    /// first); default: the listen address (which must then be one peers can dial).
    #[arg(long, value_name = "ADDR")]
    publish: Vec<SocketAddr>,
    /// How long each address record lives (e.g. "1h"); it is refreshed at half that.
    /// A node that stops refreshing is inactive to the others once it expires.
    #[arg(long, value_parser = parse_record_ttl)]
    record_ttl: Option<Duration>,
    /// How often the records directory is read (e.g. "30s", the default).
    #[arg(long, value_parser = parse_positive_duration)]
    records_interval: Option<Duration>,
    /// Log format: text (default) or json (one object per line).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
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
    /// Print the peer id of a key file (or, with --public, its static public key; with
    /// --record-key, the key that signs its address records).
    Id {
        /// The key file.
        #[arg(long)]
        key: PathBuf,
        /// Print the static public key (hex) instead: what a membership document lists.
        #[arg(long, conflicts_with = "record_key")]
        public: bool,
        /// Print the public record key (hex) instead: what a membership document lists as
        /// `record_key` for a node that publishes address records.
        #[arg(long)]
        record_key: bool,
    },
    /// Membership signed by a committee: governance keys, documents, signatures.
    Membership {
        #[command(subcommand)]
        command: membership::MembershipCmd,
    },
    /// Answer requests: echo each one, or pipe it through a command and reply with its output.
    ///
    /// Runs until SIGTERM or Ctrl-C (or `--count`), then stops gracefully: it stops accepting,
    /// refuses new requests, and gives exchanges in flight `grace` to finish. SIGHUP reloads
    /// the allow list at once (it is also reloaded when its file changes).
    Serve(ServeArgs),
    /// Check a node's configuration without starting it: the config file, the key, the
    /// allow list or membership document, the data and records directories, the command;
    /// every check `serve` makes at start, with the same flags, and nothing bound.
    /// Exits 0 when `serve` would start.
    Check(ServeArgs),
    /// Ask a running node what it is doing: its peers and their connections and queues,
    /// exchanges in flight, the allow list's source and epoch, inactive members. Reads the
    /// node's `/status` on its metrics listener.
    Status {
        /// The node's config file: its `[metrics] listen` is asked.
        #[arg(long, conflicts_with = "metrics")]
        config: Option<PathBuf>,
        /// The node's metrics address (as given to `serve --metrics`).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
        /// Print the node's JSON answer as it is.
        #[arg(long, conflicts_with = "probe")]
        json: bool,
        /// Only ask whether the node is alive (its /healthz, or /readyz with `ready`):
        /// exit 0 if so, 1 with the node's answer if not. For container health checks.
        #[arg(long, value_name = "WHAT", num_args = 0..=1, default_missing_value = "health")]
        probe: Option<status::Probe>,
    },
    /// Send one request (or several) and print the reply and timings.
    Send {
        /// Node config file (TOML): its key, data_dir, [log] and [handler] are used.
        #[arg(long)]
        config: Option<PathBuf>,
        /// This node's key file.
        #[arg(long)]
        key: Option<PathBuf>,
        /// The responder, as PEER_ID@HOST:PORT, or PEER_ID alone with --membership (its
        /// address then comes from its record in --records, or from its membership entry).
        #[arg(long)]
        to: String,
        /// The message; read from stdin when absent.
        message: Option<String>,
        /// Send it this many times (at least 1), one exchange after another, and print timing
        /// statistics.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
        /// Give up waiting after this long. Default: the handler's own bound, one second
        /// past it, so that a dead or slow peer shows the handler's real cause rather than
        /// this timeout: the --deadline if given, otherwise the retry budget of one exchange
        /// (Config::exchange_budget, about 225 s with the defaults; a peer that cannot be
        /// reached is redialed meanwhile, every 5 s at most).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// Retry until this long has passed (e.g. "6h"), however many attempts it takes,
        /// then fail. With --data-dir the deadline is stored with the request and survives
        /// restarts of this command.
        #[arg(long, value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
        /// An idempotency key made from your own data (e.g. "invoice-17"). With --data-dir,
        /// running the same command again after a crash does not send a second request: it
        /// finds the first by its key and waits for (or prints) its outcome.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// Signed membership document: the responder must be a member of it (by default
        /// only the responder named by --to is allowed). With --data-dir a newer epoch
        /// stored there wins over the file's.
        #[arg(long, value_name = "SIGNED")]
        membership: Option<PathBuf>,
        /// Keep exchanges in this directory: run again after a crash, the node resumes the
        /// requests it had not finished and prints their outcomes too, in full.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The members' records directory (see `serve --records`): read, never written.
        /// Needs --membership.
        #[arg(long, value_name = "DIR")]
        records: Option<PathBuf>,
        /// Log format: text (default) or json (one object per line).
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Print the outcomes stored in a data directory that no one collected (replies and
    /// failures with their payloads), without sending anything, and forget them.
    ///
    /// The directory must not be in use by a running node. Unfinished requests stay in it:
    /// `send` or `serve` with the same directory resumes them.
    Outcomes {
        /// The data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The node's key file (the directory belongs to one node).
        #[arg(long)]
        key: PathBuf,
        /// Print them but keep them, to be collected again later.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
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
        Cmd::Keygen { out, force } => {
            logging::init(LogFormat::Text, None, "warn")?;
            keygen(&out, force)
        }
        Cmd::Id {
            key,
            public,
            record_key,
        } => {
            let key = Keypair::from_file(&key)?;
            if public {
                println!("{}", hex::encode(key.public_bytes()));
            } else if record_key {
                println!(
                    "{}",
                    p2p_handler::records::RecordSigner::new(&key).record_key()
                );
            } else {
                println!("{}", key.peer_id());
            }
            Ok(())
        }
        Cmd::Membership { command } => {
            logging::init(LogFormat::Text, None, "warn")?;
            membership::run(command)
        }
        Cmd::Serve(args) => {
            let plan = plan(args, "info")?;
            check::command(plan.options.exec.as_deref())?;
            let mut start = start_options(plan.handler, plan.data_dir.as_deref())?;
            if let Some(records) = plan.records {
                start = start.records(records);
            }
            serve(plan.key, &plan.listen, plan.allow, start, &plan.options)
        }
        Cmd::Check(args) => Ok(check::run(&plan(args, "warn")?)?),
        Cmd::Status {
            config,
            metrics,
            json,
            probe,
        } => {
            logging::init(LogFormat::Text, None, "warn")?;
            let ask = status::Ask { json, probe };
            Ok(status::run(config.as_deref(), metrics, ask)?)
        }
        Cmd::Send {
            config,
            key,
            to,
            message,
            repeat,
            timeout,
            deadline,
            idempotency_key,
            membership,
            data_dir,
            records,
            log_format,
        } => {
            // A command-line client prints the outcome itself; the handler's own lines
            // (retries, the failure it then reports) only when asked for with RUST_LOG.
            let file = configure(config.as_deref(), log_format, "error")?;
            let handler = file.handler_config();
            let key = key.or(file.key).ok_or(NO_KEY)?;
            let (peer, addr) = parse_target(&to)?;
            let membership = membership.or(file.membership);
            let records = records.or(file.records);
            if addr.is_none() && membership.is_none() {
                return Err(format!(
                    "--to {to}: without an address, give --membership (and --records DIR) so \
                     the node can find the peer by its id"
                )
                .into());
            }
            if records.is_some() && membership.is_none() {
                return Err("--records needs --membership".into());
            }
            let message = match message {
                Some(m) => m.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf)?;
                    buf
                }
            };
            // One second over the handler's own bound: the outcome itself arrives first.
            let timeout = timeout.map_or_else(
                || deadline.unwrap_or_else(|| handler.exchange_budget()) + Duration::from_secs(1),
                Duration::from_secs,
            );
            let mut request = RequestOptions::new();
            if let Some(deadline) = deadline {
                request = request.deadline(deadline);
            }
            if let Some(key) = idempotency_key {
                if repeat > 1 {
                    return Err("--idempotency-key names one request: not with --repeat".into());
                }
                request = request.key(key);
            }
            let mut start = start_options(handler, data_dir.or(file.data_dir).as_deref())?;
            if let Some(path) = membership {
                start = start.membership(p2p_handler::membership::Signed::from_file(&path)?);
                // Records on even without a directory: members' records reach a node that
                // talks to them, and `request_to` falls back to membership addresses.
                start = start.records(match &records {
                    Some(dir) => record_options(dir, Vec::new(), None, None, false)?,
                    None => p2p_handler::records::RecordOptions {
                        publish: false,
                        ..Default::default()
                    },
                });
            }
            send(
                load_key(&key)?,
                (peer, addr, records.as_deref()),
                message,
                repeat,
                timeout,
                request,
                start,
            )
        }
        Cmd::Outcomes {
            data_dir,
            key,
            keep,
        } => {
            logging::init(LogFormat::Text, None, "warn")?;
            outcomes(&load_key(&key)?, &data_dir, keep)
        }
    }
}

/// What `serve` starts with, from its flags over its config file, checked; nothing opened
/// or bound yet.
struct ServePlan {
    key: Keypair,
    key_path: PathBuf,
    listen: String,
    allow: AllowSource,
    handler: Config,
    data_dir: Option<PathBuf>,
    records: Option<p2p_handler::records::RecordOptions>,
    options: ServeOptions,
}

/// Reads `serve`'s flags and config file (starting the logs at `default_level`) into a
/// [`ServePlan`].
fn plan(args: ServeArgs, default_level: &str) -> Result<ServePlan> {
    let ServeArgs {
        config,
        key,
        listen,
        allow,
        membership,
        allow_any_peer_insecure,
        exec,
        count,
        jobs,
        response_timeout,
        data_dir,
        grace,
        metrics,
        records,
        publish,
        record_ttl,
        records_interval,
        log_format,
    } = args;
    let file = configure(config.as_deref(), log_format, default_level)?;
    let mut handler = file.handler_config();
    if let Some(timeout) = response_timeout {
        handler.response_timeout = timeout;
    }
    let key_path = key.or(file.key).ok_or(NO_KEY)?;
    let data_dir = data_dir.or(file.data_dir);
    // A flag wins over the config file, whichever of the two it names.
    let from_flags = allow.is_some() || membership.is_some();
    let (allow, membership) = if from_flags {
        (allow, membership)
    } else {
        (file.allow, file.membership)
    };
    let allow = match (allow, membership) {
        (Some(path), _) => AllowSource::File(path),
        (None, Some(path)) => {
            if data_dir.is_none() {
                tracing::warn!(
                    "--membership without --data-dir: the node does not remember the \
                     newest epoch it accepted, so a restart starts again from the \
                     file's epoch"
                );
            }
            AllowSource::Membership(path)
        }
        (None, None) if allow_any_peer_insecure || file.allow_any_peer_insecure => {
            AllowSource::AnyPeerInsecure
        }
        (None, None) => {
            return Err("--allow FILE or --membership SIGNED (or `allow` or \
                        `membership` in the config file) is required; \
                        --allow-any-peer-insecure accepts anyone, for experiments"
                .into());
        }
    };
    let records_dir = records.or(file.records.clone());
    let records = match records_dir {
        Some(dir) => {
            if !matches!(allow, AllowSource::Membership(_)) {
                return Err("--records needs --membership: records are sealed for the \
                            members and signed by keys the membership lists"
                    .into());
            }
            Some(record_options(
                &dir,
                if publish.is_empty() {
                    file.publish.clone()
                } else {
                    publish
                },
                record_ttl.or(file.record_ttl),
                records_interval.or(file.records_interval),
                true,
            )?)
        }
        None => None,
    };
    let options = ServeOptions {
        exec: exec.or(file.exec),
        count,
        jobs: jobs.or(file.jobs).unwrap_or(8),
        grace: grace.or(file.grace).unwrap_or(Duration::from_secs(10)),
        allow_reload_interval: file.allow_reload_interval.unwrap_or(Duration::from_secs(2)),
        metrics: metrics.or(file.metrics.listen),
    };
    let listen = listen
        .or(file.listen)
        .unwrap_or_else(|| "127.0.0.1:7000".to_owned());
    // The key first: a node that cannot be itself touches no data directory.
    let key = load_key(&key_path)?;
    Ok(ServePlan {
        key,
        key_path,
        listen,
        allow,
        handler,
        data_dir,
        records,
        options,
    })
}

/// `p2p-node outcomes`: reads the store directly (no handler starts, nothing is sent),
/// prints every stored outcome in full, and unless `keep`, deletes them in one commit.
fn outcomes(key: &Keypair, dir: &Path, keep: bool) -> Result<()> {
    use p2p_handler::Store;
    let mut store = p2p_handler::RedbStore::open(dir)?;
    let rows = store.load()?;
    let recovered = p2p_handler::durable::decode(key.peer_id(), rows).map_err(|record| {
        p2p_handler::StoreError::Corrupt {
            path: store.location(),
            record,
        }
    })?;
    let mut settled = Vec::new();
    for stored in &recovered.outcomes {
        println!("{}", describe_outcome(&stored.event));
        if let Event::Reply { exchange, .. } | Event::Failed { exchange, .. } = &stored.event {
            settled.push(p2p_handler::durable::outcome_taken(*exchange));
        }
    }
    let unfinished = recovered.outbound.len();
    eprintln!(
        "{} outcome{} {}; {unfinished} request{} still unfinished (send or serve with this \
         data directory resumes them)",
        recovered.outcomes.len(),
        plural(recovered.outcomes.len()),
        if keep { "kept" } else { "collected" },
        plural(unfinished),
    );
    if !keep && !settled.is_empty() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(store.commit(settled))?;
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// An outcome in full, on one line: its exchange, the peer, and the reply or the failure
/// with the payload it hands back (as text; bytes that are not printable are escaped).
fn describe_outcome(event: &Event) -> String {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).escape_debug().to_string();
    match event {
        Event::Reply {
            peer,
            exchange,
            payload,
            ..
        } => format!(
            "{exchange} reply from {peer} ({} bytes): {}",
            payload.len(),
            text(payload)
        ),
        Event::Failed {
            peer,
            exchange,
            payload,
            failure,
            ..
        } => format!(
            "{exchange} to {peer} failed: {failure}; its request ({} bytes): {}",
            payload.len(),
            text(payload)
        ),
        other => format!("{other:?}"),
    }
}

const NO_KEY: &str = "no key: give --key FILE (or `key` in the config file)";

/// `--jobs`: the bound the config file's `jobs` has too.
/// `--response-timeout`: whole seconds as before ("25"), or a duration like every other
/// time option ("10s"); at least one second (a command needs time to start).
fn response_timeout_of(text: &str) -> std::result::Result<Duration, String> {
    let timeout = match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(text)
            .map_err(|e| format!("{text:?} is neither seconds nor a duration like \"10s\": {e}"))?,
    };
    if timeout < Duration::from_secs(1) {
        return Err(format!(
            "{text:?} is under a second: a command needs time to start"
        ));
    }
    Ok(timeout)
}

fn jobs_in_range(text: &str) -> std::result::Result<usize, String> {
    let jobs: usize = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (1..=config::MAX_JOBS).contains(&jobs) {
        Ok(jobs)
    } else {
        Err(format!(
            "must be 1 to {} (each is a thread running a command)",
            config::MAX_JOBS
        ))
    }
}

/// Loads the config file and starts logging: the flag's format over the file's, the
/// file's level over `default_level` (`RUST_LOG` over both).
fn configure(
    path: Option<&Path>,
    format: Option<LogFormat>,
    default_level: &str,
) -> Result<NodeFile> {
    let file = load_config(path)?;
    logging::init(
        format.or(file.log.format).unwrap_or_default(),
        file.log.level.as_deref(),
        default_level,
    )?;
    Ok(file)
}

/// The config file, or an empty one (every default) without `--config`.
fn load_config(path: Option<&Path>) -> Result<NodeFile> {
    Ok(match path {
        Some(path) => NodeFile::load(path)?,
        None => NodeFile::default(),
    })
}

/// Loads a key file, warning when other users can read it.
fn load_key(path: &Path) -> Result<Keypair> {
    let key = Keypair::from_file(path).map_err(|error| {
        // Unreadable (not missing, not malformed): say whose it is and who runs.
        match std::fs::File::open(path) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                unreadable_key(path, &e).into()
            }
            _ => Box::<dyn std::error::Error>::from(error),
        }
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    "key file {} can be read by other users (mode {mode:o}); \
                     `chmod 600` it",
                    path.display()
                );
            }
        }
    }
    Ok(key)
}

/// A key file this process may not read: says who owns it and who runs, and how to fix
/// it (a key written by `keygen` on the host is its user's, mode 600; in a container the
/// node runs as another user).
fn unreadable_key(path: &Path, e: &std::io::Error) -> String {
    let shown = path.display();
    #[cfg(unix)]
    let owner = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).map(|m| m.uid()).ok()
    };
    #[cfg(not(unix))]
    let owner: Option<u32> = None;
    // Linux: this process's real uid, from /proc (no libc call needed).
    let me = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next()?.parse::<u32>().ok())
        });
    match (owner, me) {
        (Some(owner), Some(me)) if owner != me => format!(
            "cannot read key file {shown}: {e}: it belongs to uid {owner} and this node runs \
             as uid {me}; give it to the node's user (`chown {me} {shown}`, keep mode 600)"
        ),
        _ => format!("cannot read key file {shown}: {e}"),
    }
}

fn keygen(out: &Path, force: bool) -> Result<()> {
    let mut private = [0u8; 32];
    getrandom::fill(&mut private).map_err(|e| format!("no OS randomness: {e}"))?;
    let key = Keypair::from_private_bytes(private);
    write_secret(out, force, &format!("{}\n", key.to_hex()))?;
    println!("{}", key.peer_id());
    Ok(())
}

/// Writes a secret key file, readable by its owner only; refuses to replace an existing
/// file unless `force`.
pub(crate) fn write_secret(out: &Path, force: bool, text: &str) -> Result<()> {
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
    let mut file = options.open(out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!(
                "{} exists: a key is an identity, so it is never replaced unasked; pass \
                 --force to overwrite it (whoever knows the old one by its id will not know \
                 the new one)",
                out.display()
            )
        } else {
            format!("cannot write {}: {e}", out.display())
        }
    })?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// `--to PEER_ID@HOST:PORT`, or `--to PEER_ID` (the address then comes from records).
fn parse_target(to: &str) -> Result<(PeerId, Option<SocketAddr>)> {
    let (id, addr) = match to.split_once('@') {
        Some((id, addr)) => (id, Some(addr)),
        None => (to, None),
    };
    let peer: PeerId = id.parse().map_err(|e| {
        format!("--to must be PEER_ID or PEER_ID@HOST:PORT: bad peer id {id:?}: {e}")
    })?;
    let addr = addr
        .map(|addr| {
            std::net::ToSocketAddrs::to_socket_addrs(addr)
                .map_err(|e| format!("bad address {addr:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("{addr:?} resolves to nothing"))
        })
        .transpose()?;
    Ok((peer, addr))
}

/// `--record-ttl`: a duration within the protocol's bounds.
fn parse_record_ttl(text: &str) -> std::result::Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    config::check_record_ttl(ttl)
}

/// Records kept in `dir` (which must exist): this node's own written there when
/// `publish`, everyone's read from it.
fn record_options(
    dir: &Path,
    addresses: Vec<SocketAddr>,
    ttl: Option<Duration>,
    interval: Option<Duration>,
    publish: bool,
) -> Result<p2p_handler::records::RecordOptions> {
    let backend = p2p_handler::records::DirectoryBackend::new(dir)?;
    Ok(p2p_handler::records::RecordOptions {
        addresses,
        ttl: ttl.unwrap_or(p2p_handler::endpoint::DEFAULT_RECORD_TTL),
        backend: Some(Arc::new(backend)),
        poll_interval: interval.unwrap_or(p2p_handler::records::DEFAULT_POLL_INTERVAL),
        publish,
    })
}

/// A duration above zero ("30s").
fn parse_positive_duration(text: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be positive".into());
    }
    Ok(d)
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
    grace: Duration,
    allow_reload_interval: Duration,
    metrics: Option<SocketAddr>,
}

/// The signals a serving node acts on, as flags its loop polls.
struct Signals {
    /// SIGTERM or SIGINT: stop gracefully; a second one stops at once.
    stop: Arc<AtomicUsize>,
    /// SIGHUP: reload the allow list now.
    reload: Arc<AtomicBool>,
}

impl Signals {
    /// Listens for the signals on a thread of their own (signal-hook's iterator: no code
    /// runs in the signal handler but its own).
    fn register() -> Result<Self> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let stop = Arc::new(AtomicUsize::new(0));
        let reload = Arc::new(AtomicBool::new(false));
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        let (stop_flag, reload_flag) = (stop.clone(), reload.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if signal == SIGHUP {
                        reload_flag.store(true, Ordering::Release);
                    } else {
                        stop_flag.fetch_add(1, Ordering::AcqRel);
                    }
                }
            })?;
        Ok(Self { stop, reload })
    }
}

/// Answers requests until stopped (SIGTERM, Ctrl-C) or until `count` are answered. Nothing
/// one request does can stop it: a reply the dialer cannot take, a command that fails or
/// runs too long, an answer that comes too late are all logged, and serving goes on.
/// Commands run on their own threads, up to `jobs` at once, so a slow one delays no one
/// else.
///
/// Stopping is graceful: the listener closes, new requests are Nacked `ShuttingDown`, and
/// the exchanges in flight get `grace` to finish; what is left then is persisted (with a
/// data directory) or failed back, connections are closed with `Close{ShuttingDown}`, and
/// the process exits 0. A second signal skips the rest of the grace period.
fn serve(
    key: Keypair,
    listen: &str,
    allow: AllowSource,
    start: Options,
    options: &ServeOptions,
) -> Result<()> {
    // Before the handler starts, so that its metrics register with the recorder.
    let health = match options.metrics {
        Some(addr) => {
            let (bound, health) = metrics::serve(addr)?;
            println!("metrics on http://{bound}/metrics");
            Some(health)
        }
        None => None,
    };
    let deadline = start.config.response_timeout;
    let mut allow = AllowFile::load(allow, SystemTime::now())?;
    let signals = Signals::register()?;
    let start = match allow.membership() {
        Some(doc) => start.membership(doc.clone()),
        None => start,
    };
    let records = start.records.as_ref().map(|r| {
        (
            r.addresses.clone(),
            r.ttl,
            r.backend.as_ref().map(|b| b.describe()),
        )
    });
    let node = P2pHandler::with_options(listen, key, allow.in_force(), start)?;
    println!(
        "listening on {} as {}",
        node.local_address(),
        node.local_peer_id()
    );
    if let Some((addresses, ttl, backend)) = records {
        let shown: Vec<String> = if addresses.is_empty() {
            vec![node.local_address().to_string()]
        } else {
            addresses.iter().map(ToString::to_string).collect()
        };
        let _ = writeln!(
            std::io::stdout(),
            "address record: {} (refreshed every {}), {}",
            shown.join(", "),
            humantime::format_duration(ttl / 2),
            backend.unwrap_or_else(|| "no records directory".into())
        );
    }
    if let Some(m) = node.membership()? {
        // Best effort: whoever started us may have stopped reading after the first line.
        let _ = writeln!(
            std::io::stdout(),
            "membership: network {:?}, epoch {} ({}), {} allowed",
            m.network,
            m.epoch,
            m.digest.short(),
            allow::peers(m.allowed)
        );
    }
    std::io::stdout().flush()?;
    tracing::info!(
        "listening on {} as {}",
        node.local_address(),
        node.local_peer_id()
    );
    if let Some(health) = &health {
        health.ready(node.handler().clone(), allow.report());
    }
    let status = format!("listening on {}", node.local_address());
    systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
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
    let mut next_check = Instant::now();
    let mut draining_since: Option<Instant> = None;
    // Set when serving ends: commands still running are killed, their threads end.
    let stopped = AtomicBool::new(false);
    let result = std::thread::scope(|scope| -> Result<()> {
        while !done(&answered) {
            let now = Instant::now();
            let forced = signals.reload.swap(false, Ordering::AcqRel);
            let expiry_due = allow.next_expiry().is_some_and(|t| t <= SystemTime::now());
            if forced || expiry_due || now >= next_check {
                allow.refresh(&node, forced, SystemTime::now());
                next_check = now + options.allow_reload_interval;
            }
            match (signals.stop.load(Ordering::Acquire), draining_since) {
                (0, _) => {}
                (_, None) => {
                    if let Some(health) = &health {
                        health.stopping();
                    }
                    systemd(&[
                        sd_notify::NotifyState::Stopping,
                        sd_notify::NotifyState::Status("draining"),
                    ]);
                    tracing::info!(
                        "stopping: no new requests; exchanges in flight have {:?} to finish",
                        options.grace
                    );
                    node.drain()?;
                    draining_since = Some(now);
                }
                (n, Some(since)) => {
                    let status = node.status()?;
                    if status.drained {
                        tracing::info!("every exchange in flight finished");
                        break;
                    }
                    if n > 1 || now.duration_since(since) >= options.grace {
                        tracing::warn!(
                            "stopping with {} of our exchanges and {} requests unfinished",
                            status.outbound_in_flight,
                            status.pending_responses
                        );
                        break;
                    }
                }
            }
            let Some(event) = node.receive_timeout(Duration::from_millis(100)) else {
                continue;
            };
            let Event::Request {
                peer,
                addr,
                exchange,
                payload,
                redelivered,
                ..
            } = event
            else {
                continue;
            };
            tracing::debug!(
                peer = %peer.short(), %addr, %exchange, bytes = payload.len(), redelivered,
                "request"
            );
            let Some(cmd) = options.exec.as_deref() else {
                answer(&node, peer, exchange, payload.to_vec(), &answered)?;
                continue;
            };
            // Wait for a free slot.
            while free_rx.recv_timeout(Duration::from_millis(200)).is_err() {}
            let (node, answered, free_tx, stopped) = (&node, &answered, free_tx.clone(), &stopped);
            scope.spawn(move || {
                let env = [
                    ("P2P_PEER", peer.to_string()),
                    ("P2P_EXCHANGE", exchange.to_string()),
                    ("P2P_REDELIVERED", u8::from(redelivered).to_string()),
                ];
                match pipe(cmd, &payload, &env, deadline, stopped) {
                    Ok(reply) => {
                        // Only a stopped node fails here, and the main loop sees that too.
                        let _ = answer(node, peer, exchange, reply, answered);
                    }
                    // The command ran and failed: the dialer is told at once (Abort
                    // Refused) rather than at the response timeout.
                    Err(Piped::Failed(why)) => {
                        tracing::warn!("command failed, refusing request {exchange}: {why}");
                        if let Err(e) = node.reject(peer, exchange) {
                            tracing::debug!("cannot refuse {exchange}: {e}");
                        }
                    }
                    // Out of time (the handler tells the dialer, Abort NoResponse) or
                    // stopping (the shutdown does).
                    Err(Piped::Killed(why)) => {
                        tracing::warn!("command killed, not answering {exchange}: {why}");
                    }
                }
                let _ = free_tx.send(());
            });
        }
        stopped.store(true, Ordering::Release);
        Ok(())
    });
    if let Some(health) = &health {
        health.stopping();
    }
    systemd(&[sd_notify::NotifyState::Stopping]);
    let report = node.shutdown();
    tracing::info!(
        "stopped: answered {} requests; {} unanswered at shutdown{}",
        answered.load(Ordering::Acquire),
        report.unanswered_requests,
        if report.kept > 0 {
            format!("; {} of ours kept in the data directory", report.kept)
        } else {
            String::new()
        }
    );
    result
}

/// Tells systemd (a `Type=notify` unit: `$NOTIFY_SOCKET` is set) how the node stands;
/// without systemd, nothing.
fn systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// Reports how a request of an earlier run (kept in the data directory) ended.
/// An outcome of a request an earlier run left in the data directory, in full.
fn report_outcome(event: &Event) {
    if matches!(event, Event::Reply { .. } | Event::Failed { .. }) {
        eprintln!("earlier request: {}", describe_outcome(event));
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
fn pipe(
    cmd: &str,
    input: &[u8],
    env: &[(&str, String)],
    deadline: Duration,
    stopped: &AtomicBool,
) -> std::result::Result<Vec<u8>, Piped> {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        // systemd's socket is the node's, not its commands'.
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Its own process group, so a kill reaches whatever the shell started.
        command.process_group(0);
    }
    let mut child = command
        .spawn()
        .map_err(|e| Piped::Failed(format!("cannot run {cmd:?}: {e}")))?;
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
        let started = Instant::now();
        let output = loop {
            // In slices, so that a node stopping does not wait for its commands.
            match out_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(read) => {
                    break read.map_err(|e| Piped::Failed(format!("reading its output: {e}")));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    if started.elapsed() < deadline && !stopped.load(Ordering::Acquire) => {}
                Err(_) => {
                    kill_group(&mut child);
                    let why = if stopped.load(Ordering::Acquire) {
                        "the node stopped".to_owned()
                    } else {
                        format!("still running after {deadline:?}")
                    };
                    break Err(Piped::Killed(format!("{cmd:?} killed: {why}")));
                }
            }
        };
        let status = child
            .wait()
            .map_err(|e| Piped::Failed(format!("waiting for {cmd:?}: {e}")))?;
        let out = output?;
        if !status.success() {
            return Err(Piped::Failed(format!("{cmd:?} exited with {status}")));
        }
        Ok(out)
    })
}

/// Why a command gave no reply.
enum Piped {
    /// It could not run, or ran and failed: the request is refused.
    Failed(String),
    /// It was killed (out of time, or the node stopping).
    Killed(String),
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
    (peer, addr, records): (PeerId, Option<SocketAddr>, Option<&Path>),
    message: Vec<u8>,
    repeat: u32,
    timeout: Duration,
    request: RequestOptions,
    start: Options,
) -> Result<()> {
    // Replies come back on the connections we dial, so nothing needs to reach this node:
    // its listener stays on loopback rather than on every interface.
    let node = P2pHandler::with_options("127.0.0.1:0", key, AllowList::from_peers([peer]), start)?;
    if let Some(dir) = records {
        // Read the folder before the first request (the node's own reading of it runs
        // in the background and may come later).
        use p2p_handler::records::RecordBackend as _;
        let found = p2p_handler::records::DirectoryBackend::new(dir)?.fetch()?;
        let taken = node.offer_records(found)?;
        tracing::debug!(taken, dir = %dir.display(), "address records read");
    }
    let mut times = Vec::new();
    let mut last = Vec::new();
    for _ in 0..repeat {
        let started = Instant::now();
        // A key this data directory already holds: the request was made by an earlier run
        // (which may have died right after making it). Wait for that one instead.
        let earlier = match &request.key {
            Some(key) => node.lookup(peer, key.clone())?,
            None => None,
        };
        let id = match earlier {
            Some(KeyedExchange::Queued { exchange } | KeyedExchange::InFlight { exchange, .. }) => {
                eprintln!("resuming request {exchange}, made earlier with this key");
                exchange
            }
            Some(KeyedExchange::Finished(event)) => {
                // Its outcome is first in the inbox; the loop below takes it.
                match event {
                    Event::Reply { exchange, .. } | Event::Failed { exchange, .. } => exchange,
                    _ => return Err("unexpected outcome for the key".into()),
                }
            }
            _ => match addr {
                Some(addr) => node.request_with(peer, addr, message.clone(), request.clone())?,
                None => node.request_to_with(peer, message.clone(), request.clone())?,
            },
        };
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
                None => {
                    // Say why, if the handler knows: the state and the last failed try.
                    let why = match node.progress(id) {
                        Ok(Some(progress)) => format!(": {progress}"),
                        _ => String::new(),
                    };
                    return Err(format!("no reply within {timeout:?}{why}").into());
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_timeout_is_seconds_or_a_duration_and_at_least_a_second() {
        assert_eq!(response_timeout_of("25"), Ok(Duration::from_secs(25)));
        assert_eq!(response_timeout_of("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(response_timeout_of("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(response_timeout_of("1s"), Ok(Duration::from_secs(1)));
        for bad in ["0", "999ms", "", "ten"] {
            assert!(response_timeout_of(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn one_peer_is_a_peer() {
        assert_eq!(allow::peers(0), "0 peers");
        assert_eq!(allow::peers(1), "1 peer");
        assert_eq!(allow::peers(2), "2 peers");
    }
}
