//! The node config file (`p2p-node serve --config node.toml`).
//!
//! Everything a flag can say, plus every handler [`Config`] field under `[handler]`. A flag
//! given on the command line overrides the file. Relative paths in the file are relative to
//! the file's directory, so a unit file can name one config and the config its neighbours.
//! Unknown fields and bad values are errors that name the file, the line and the field. The
//! documented example is `deploy/node.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use p2p_handler::Config;
use serde::Deserialize;

/// Commands `serve` runs at once, at most (`jobs`, `--jobs`): each is a thread.
pub(crate) const MAX_JOBS: usize = 1024;

/// The whole file. Every field is optional; a missing one takes the flag's default.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct NodeFile {
    /// Address to listen on.
    pub(crate) listen: Option<String>,
    /// This node's key file.
    pub(crate) key: Option<PathBuf>,
    /// The allow-list file (reloaded when it changes).
    pub(crate) allow: Option<PathBuf>,
    /// Accept any authenticated peer.
    pub(crate) allow_any_peer_insecure: bool,
    /// The signed membership document (in place of `allow`; re-read when it changes).
    pub(crate) membership: Option<PathBuf>,
    /// Where exchanges are kept across restarts.
    pub(crate) data_dir: Option<PathBuf>,
    /// The records directory: this node writes its address record there and reads the
    /// other members' (needs `membership`).
    pub(crate) records: Option<PathBuf>,
    /// The addresses this node's record publishes (where peers reach it); default: the
    /// listen address.
    pub(crate) publish: Vec<SocketAddr>,
    /// How long each address record lives (refreshed at half of it).
    #[serde(with = "humantime_serde")]
    pub(crate) record_ttl: Option<Duration>,
    /// How often the records directory is read.
    #[serde(with = "humantime_serde")]
    pub(crate) records_interval: Option<Duration>,
    /// Shell command that turns a request into its reply.
    pub(crate) exec: Option<String>,
    /// Commands run at once.
    pub(crate) jobs: Option<usize>,
    /// On SIGTERM or Ctrl-C, how long in-flight exchanges may take to finish.
    #[serde(with = "humantime_serde")]
    pub(crate) grace: Option<Duration>,
    /// How often the allow-list file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub(crate) allow_reload_interval: Option<Duration>,
    /// Logging.
    pub(crate) log: LogSettings,
    /// The Prometheus endpoint.
    pub(crate) metrics: MetricsSettings,
    /// The handler's bounds and timeouts ([`Config`]), each optional.
    pub(crate) handler: Option<toml::Spanned<Config>>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct LogSettings {
    /// A `tracing` filter (`"info"`, `"p2p_handler=debug,warn"`); `RUST_LOG` overrides it.
    pub(crate) level: Option<String>,
    /// `text` (default) or `json` (one object per line, for log shippers).
    pub(crate) format: Option<LogFormat>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// Human-readable lines (colour only on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[metrics]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct MetricsSettings {
    /// Where to serve `/metrics` for Prometheus (e.g. `"127.0.0.1:9184"`); off when absent.
    pub(crate) listen: Option<SocketAddr>,
}

impl NodeFile {
    /// Loads and checks `path`: syntax, unknown fields, value types, then the handler
    /// config's own rules. Relative paths become relative to the file's directory.
    pub(crate) fn load(path: &Path) -> Result<Self, String> {
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {shown}: {e}"))?;
        Self::parse(&text, path)
    }

    /// [`NodeFile::load`] on text already read; `path` names it and anchors relative paths.
    pub(crate) fn parse(text: &str, path: &Path) -> Result<Self, String> {
        let shown = path.display();
        // toml's message already says "line N, column M" and names the field.
        let mut file: NodeFile =
            toml::from_str(text).map_err(|e| format!("invalid config {shown}: {e}"))?;
        if let Some(handler) = &file.handler {
            handler.get_ref().validate().map_err(|e| {
                let line = line_of(text, handler.span().start);
                format!("invalid config {shown}: line {line}: [handler]: {}", e.0)
            })?;
        }
        if let Some(jobs) = file.jobs
            && !(1..=MAX_JOBS).contains(&jobs)
        {
            return Err(format!(
                "invalid config {shown}: jobs = {jobs}: must be 1 to {MAX_JOBS} \
                 (each is a thread running a command)"
            ));
        }
        if let Some(level) = &file.log.level {
            crate::logging::filter(level)
                .map_err(|e| format!("invalid config {shown}: [log] level = {level:?}: {e}"))?;
        }
        if file.allow_reload_interval.is_some_and(|d| d.is_zero()) {
            return Err(format!(
                "invalid config {shown}: allow_reload_interval must be positive"
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        if file.allow.is_some() && file.membership.is_some() {
            return Err(format!(
                "invalid config {shown}: `allow` and `membership` exclude each other \
                 (a membership document governs the allow list)"
            ));
        }
        if file.records.is_some() && file.membership.is_none() {
            return Err(format!(
                "invalid config {shown}: `records` needs `membership` (records are sealed for \
                 the members and signed by keys the membership lists)"
            ));
        }
        if file.records_interval.is_some_and(|d| d.is_zero()) {
            return Err(format!(
                "invalid config {shown}: records_interval must be positive"
            ));
        }
        if let Some(ttl) = file.record_ttl {
            check_record_ttl(ttl)
                .map_err(|e| format!("invalid config {shown}: record_ttl: {e}"))?;
        }
        for p in [
            &mut file.key,
            &mut file.allow,
            &mut file.membership,
            &mut file.data_dir,
            &mut file.records,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(file)
    }

    /// The handler config: the file's `[handler]` table, or the defaults.
    pub(crate) fn handler_config(&self) -> Config {
        self.handler
            .as_ref()
            .map_or_else(Config::default, |c| c.get_ref().clone())
    }
}

/// The bounds of a record's life (the protocol's).
pub(crate) fn check_record_ttl(ttl: Duration) -> Result<Duration, String> {
    let min = p2p_handler::endpoint::MIN_RECORD_TTL;
    let max = Duration::from_secs(p2p_handler::records::MAX_RECORD_TTL);
    if ttl < min || ttl > max {
        return Err(format!(
            "{} is outside {} to {}",
            humantime::format_duration(ttl),
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(ttl)
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |t| t.bytes().filter(|b| *b == b'\n').count() + 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(text: &str) -> Result<NodeFile, String> {
        NodeFile::parse(text, Path::new("/etc/p2p/node.toml"))
    }

    #[test]
    fn the_documented_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node.toml");
        let file = NodeFile::load(&path).unwrap();
        assert!(file.key.is_some() && file.allow.is_some() && file.data_dir.is_some());
        assert!(file.metrics.listen.is_some());
        // The example sets a few handler fields; they differ from the defaults.
        assert_ne!(file.handler_config(), Config::default());
    }

    #[test]
    fn records_need_a_membership_and_a_life_within_the_protocols_bounds() {
        let file = parse(
            "membership = \"m.toml\"\nrecords = \"recs\"\npublish = [\"10.0.0.1:7000\"]\n\
             record_ttl = \"2h\"\nrecords_interval = \"5s\"\n",
        )
        .unwrap();
        assert_eq!(file.records.unwrap(), Path::new("/etc/p2p/recs"));
        assert_eq!(file.publish, vec!["10.0.0.1:7000".parse().unwrap()]);
        assert_eq!(file.record_ttl, Some(Duration::from_secs(7200)));
        let e = parse("records = \"recs\"\n").unwrap_err();
        assert!(e.contains("needs `membership`"), "{e}");
        for bad in ["1s", "8d"] {
            let e = parse(&format!(
                "membership = \"m.toml\"\nrecords = \"r\"\nrecord_ttl = \"{bad}\"\n"
            ))
            .unwrap_err();
            assert!(e.contains("record_ttl") && e.contains("outside"), "{e}");
        }
        let e = parse("records_interval = \"0s\"\n").unwrap_err();
        assert!(e.contains("records_interval"), "{e}");
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let file = parse("key = \"bob.key\"\nallow = \"/abs/allow.toml\"\n").unwrap();
        assert_eq!(file.key.unwrap(), Path::new("/etc/p2p/bob.key"));
        assert_eq!(file.allow.unwrap(), Path::new("/abs/allow.toml"));
    }

    #[test]
    fn a_membership_document_replaces_the_allow_list_never_joins_it() {
        let file = parse("membership = \"net/epoch.signed.toml\"\n").unwrap();
        assert_eq!(
            file.membership.unwrap(),
            Path::new("/etc/p2p/net/epoch.signed.toml")
        );
        let e = parse("allow = \"a.toml\"\nmembership = \"m.toml\"\n").unwrap_err();
        assert!(
            e.contains("/etc/p2p/node.toml") && e.contains("exclude"),
            "{e}"
        );
    }

    #[test]
    fn handler_fields_take_humantime_durations_and_keep_other_defaults() {
        let file =
            parse("[handler]\nresponse_timeout = \"90s\"\nreuse_connections = true\n").unwrap();
        let config = file.handler_config();
        assert_eq!(config.response_timeout, Duration::from_secs(90));
        assert!(config.reuse_connections);
        assert_eq!(config.max_attempts, Config::default().max_attempts);
    }

    #[test]
    fn values_that_would_abort_or_silence_the_node_are_refused_by_name() {
        let e = parse("jobs = 1000000000000\n").unwrap_err();
        assert!(e.contains("jobs = 1000000000000: must be 1 to 1024"), "{e}");
        let e = parse("jobs = 0\n").unwrap_err();
        assert!(e.contains("must be 1 to 1024"), "{e}");
        // A level word with a typo would turn every line off without a word.
        let e = parse("[log]\nlevel = \"verbose\"\n").unwrap_err();
        assert!(
            e.contains("/etc/p2p/node.toml") && e.contains("[log] level") && e.contains("verbose"),
            "{e}"
        );
        assert!(parse("[log]\nlevel = \"p2p_handler=debug,warn\"\n").is_ok());
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_field() {
        let e = parse("listen = \"0.0.0.0:7000\"\n\n[handler]\nresponse_timout = \"1s\"\n")
            .unwrap_err();
        assert!(
            e.contains("/etc/p2p/node.toml")
                && e.contains("line 4")
                && e.contains("response_timout"),
            "{e}"
        );
        let e = parse("[handler]\nack_timeout = \"soon\"\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("ack_timeout"), "{e}");
        let e = parse("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("xml"), "{e}");
        // A value of the right type that the handler cannot work with.
        let e = parse("jobs = 2\n\n[handler]\nmax_attempts = 0\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("max_attempts"), "{e}");
        let e = parse("[metrics]\nlisten = \"localhost\"\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("listen"), "{e}");
        assert!(parse("jobs = 0\n").unwrap_err().contains("jobs"));
    }
}
