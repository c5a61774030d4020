//! Logging: `tracing` with LOG_LEVEL, as text or JSON (LOG_FORMAT).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Installs the global subscriber; call once, first thing in `main`. Every line it writes
/// passes through [`crate::redact`], which masks the configured secrets.
pub fn init(config: &Config) {
    crate::redact::register(config.secrets());
    // Panic messages bypass the log writer; they go through the same filter.
    std::panic::set_hook(Box::new(|info| {
        use std::backtrace::{Backtrace, BacktraceStatus};
        use std::io::Write;
        let backtrace = Backtrace::capture();
        let thread = std::thread::current();
        let mut text = format!("thread '{}' {info}", thread.name().unwrap_or("<unnamed>"));
        if backtrace.status() == BacktraceStatus::Captured {
            text.push_str(&format!("\n{backtrace}"));
        }
        let _ = writeln!(std::io::stderr(), "{}", crate::redact::redact(&text));
    }));
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
