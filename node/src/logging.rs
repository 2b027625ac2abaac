//! Log output: `tracing` lines on stderr, as text (colour only on a terminal) or JSON.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the subscriber. The filter is `RUST_LOG` when set, else `level` (from the config
/// file), else `default`. A filter that does not parse is an error naming it.
pub(crate) fn init(format: LogFormat, level: Option<&str>, default: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => {
            EnvFilter::try_new(&env).map_err(|e| format!("invalid RUST_LOG {env:?}: {e}"))?
        }
        _ => {
            let level = level.unwrap_or(default);
            EnvFilter::try_new(level).map_err(|e| format!("invalid log level {level:?}: {e}"))?
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (never in this program) would fail; the first subscriber stays.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    Ok(())
}
