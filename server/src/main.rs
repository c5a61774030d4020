//! `agent-server`: load config, init tracing, build the app, serve until SIGTERM/SIGINT,
//! drain within a bound. Exit 64 on bad configuration or usage.

use std::process::ExitCode;

use agent_server::cli::{self, Command};
use agent_server::{Application, Config, telemetry};

const EX_USAGE: u8 = 64;

/// With the `jemalloc` feature (on by default), jemalloc replaces glibc's malloc: its size
/// classes keep the handshakes' short-lived buffers (hyper's 8 KiB read and write buffers)
/// apart from the sessions' long-lived allocations, so an idle agent costs what it holds
/// rather than the holes glibc leaves between sessions (docs/benchmarks.md, issue 16).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's built-in options (its `malloc_conf`, under the crate's `_rjem_` prefix): a
/// background thread returns freed pages to the system after about a second
/// (`dirty_decay_ms`, skipping the lazy "muzzy" stage) instead of at the next allocation,
/// so memory freed after a connection storm leaves the RSS while agents sit idle.
/// Operators override or extend it with `_RJEM_MALLOC_CONF` (docs/operations.md).
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

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
            // The pool may still be retrying connections on its own threads.
            exit_without_handlers(1)
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
    // 0 also when the drain timed out: the process was asked to stop and did; the log
    // says what was abandoned.
    app.run_until_stopped(shutdown).await;
    exit_without_handlers(0)
}

/// Ends the process at once with `code`, without the C library's exit handlers.
///
/// r2d2 opens database connections on threads it never joins, and its pool does not
/// count a connection still being opened (`Store::settle` cannot see it): a replica
/// stopped right after it started exits while one of those threads is in libpq's TLS
/// handshake, and OpenSSL's exit handler then frees what that thread uses (SIGSEGV
/// after "drained; exiting", seen in CI). Everything that matters is done by now: the
/// drain finished or timed out, the group-commit writers answered every queued write
/// (`Store::settle`), and logs go to stderr unbuffered. Leaving without exit handlers avoids the race
/// whatever the pool is doing; the kernel closes the sockets.
fn exit_without_handlers(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit ends the process; no Rust state is used afterwards.
    unsafe { libc::_exit(code) }
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
/// freed (docs/benchmarks.md, benchmark 5). With jemalloc this still governs what the C
/// libraries allocate through glibc (libpq's buffers of large inventories), and is the
/// whole allocator without the `jemalloc` feature.
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
