//! `agent-server`: load config, init tracing, build the app, serve until SIGTERM/SIGINT,
//! drain within a bound. Exit 64 on bad configuration or usage.

use std::process::ExitCode;

use agent_server::cli::{self, Command};
use agent_server::{Application, Config, telemetry};

const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    fix_mmap_threshold();
    let command = match cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agent-server: {e}\n{}", cli::USAGE);
            return ExitCode::from(EX_USAGE);
        }
    };
    let config = match command {
        Command::Help => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("agent-server {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => match Config::from_env() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("agent-server: invalid configuration: {e}");
                return ExitCode::from(EX_USAGE);
            }
        },
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match command {
        Command::Token { sub, role, ttl } => match cli::mint(&config, &sub, role, ttl) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("agent-server: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check { url, timeout } => {
            match runtime.block_on(cli::check(&config, &url, timeout)) {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("agent-server check: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => runtime.block_on(serve(config)),
    }
}

async fn serve(config: Config) -> ExitCode {
    telemetry::init(&config);
    // Before the listener opens: a SIGTERM that arrives as soon as the server answers
    // must start the drain, not end the process by the signal's default action.
    let shutdown = shutdown_signal();
    let app = match Application::build(config.clone()).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %agent_server::error::error_chain(&e), "could not start");
            return ExitCode::FAILURE;
        }
    };
    if config.is_sqlite() {
        tracing::info!(
            "embedded mode (SQLite in {}); mint an admin token with: agent-server token --sub admin --role admin",
            config.data_dir.display()
        );
    }
    tracing::info!(
        addr = %app.local_addr(),
        metrics = %app.metrics_addr(),
        pod = %config.pod_id,
        database = app.state().store.backend_name(),
        heartbeat = ?config.heartbeat_interval,
        offline_timeout = ?config.offline_timeout,
        "agent-server listening"
    );
    if !app.run_until_stopped(shutdown).await {
        // Work was abandoned, and threads of the database pool may still be in OpenSSL
        // (libpq's TLS): leave without the C library's exit handlers, since OpenSSL's
        // would free what those threads use and crash the process (`Store::settle`).
        // Logs go to stderr unbuffered; nothing else is pending.
        // SAFETY: _exit ends the process; no Rust state is used afterwards.
        unsafe { libc::_exit(0) }
    }
    ExitCode::SUCCESS
}

/// Registers the SIGTERM and SIGINT handlers now; the returned future resolves on the
/// first of them.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

/// glibc raises its mmap threshold each time a large block is freed, after which large
/// request bodies (10 MiB inventories) are carved from the heap and stay resident after
/// use. A fixed threshold keeps them in their own mappings, returned to the system when
/// freed (docs/benchmarks.md, benchmark 5).
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
