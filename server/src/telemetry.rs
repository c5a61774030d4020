//! Logging: `tracing` with LOG_LEVEL, as text or JSON (LOG_FORMAT).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Installs the global subscriber; call once, first thing in `main`. Every line it writes
/// passes through [`crate::redact`], which masks the configured secrets.
pub fn init(config: &Config) {
    crate::redact::register(config.secrets());
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::redact::stderr)
        // Colour codes only for a person at a terminal, never in collected logs.
        .with_ansi(std::io::stderr().is_terminal());
    match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}
