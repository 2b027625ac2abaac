//! Log output: `tracing` lines on stderr, as text (colour only on a terminal) or JSON.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the subscriber. The filter is `RUST_LOG` when set, else `level` (from the config
/// file), else `default`. A filter that does not parse is an error naming it.
pub(crate) fn init(format: LogFormat, level: Option<&str>, default: &str) -> Result<(), String> {
    let mut overridden = None;
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => {
            if let Some(level) = level {
                overridden = Some((env.clone(), level.to_owned()));
            }
            filter(&env).map_err(|e| format!("invalid RUST_LOG {env:?}: {e}"))?
        }
        _ => {
            let level = level.unwrap_or(default);
            filter(level).map_err(|e| format!("invalid log level {level:?}: {e}"))?
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
    if let Some((env, level)) = overridden {
        tracing::info!("RUST_LOG={env:?} overrides the config's [log] level {level:?}");
    }
    Ok(())
}

/// The level words a filter may use.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A filter, stricter than `EnvFilter`'s own syntax: `EnvFilter` reads a lone word it does
/// not know as a target name, so `"verbose"` (or a typo, `"infoo"`) would turn every line
/// off without a word. Here each comma-separated directive is a level word, or
/// `target=level` with a level word after the `=`.
pub(crate) fn filter(text: &str) -> Result<EnvFilter, String> {
    let directives: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    for &directive in &directives {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{level:?} is not a level (trace, debug, info, warn, error, off); a filter for \
                 one module is written target=level, e.g. p2p_handler=debug"
            ));
        }
    }
    EnvFilter::try_new(directives.join(",")).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::filter;

    #[test]
    fn unknown_level_words_are_refused_by_name() {
        for good in [
            "info",
            "WARN",
            "p2p_handler=debug,warn",
            "off",
            " debug , x=trace ",
        ] {
            assert!(filter(good).is_ok(), "{good}");
        }
        for bad in [
            "verbose",
            "verbos",
            "infoo",
            "p2p_handler=loud",
            "p2p_handler",
        ] {
            let e = filter(bad).unwrap_err();
            assert!(e.contains("is not a level"), "{bad}: {e}");
        }
    }
}
