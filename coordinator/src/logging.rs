//! Logging set-up, in one place for every cryo binary.
//!
//! Lifecycle events (`epoch.committed`, `gc.done`, …) are tracing events with
//! `job`/`rank`/`epoch` fields; `--log-format json` makes them one JSON
//! object per line for tests and admins to follow.

use tracing_subscriber::EnvFilter;

/// Output format of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber, writing to stderr. The filter comes from
/// `CRYO_LOG` (e.g. `CRYO_LOG=debug`), defaulting to `warn`, or `info` when
/// `verbose` is set.
pub fn init(format: LogFormat, verbose: bool) {
    let default = if verbose { "info" } else { "warn" };
    let filter = EnvFilter::try_from_env("CRYO_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a terminal: a job's output file gets no escapes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
