//! `agent [--config PATH]`: loads the configuration, then connects until stopped.
//! `agent --self-check [--config PATH]`: loads the configuration and prints the version
//! (a new build proves it can start before the agent switches to it).
//! `agent --update-watchdog STATE_DIR`: guards a switch to a new build (`update::watchdog`).
//!
//! Exit codes: 0 after SIGTERM/SIGINT; 64 on a bad configuration (the message names the
//! key) or a state directory that cannot be written; 77 when the server refuses this
//! agent for good (deleted, its token or id refused, its enrollment refused), so that
//! systemd does not restart it in a loop (`RestartPreventExitStatus`).

use std::path::PathBuf;
use std::process::ExitCode;

use agent::config::{Config, DEFAULT_CONFIG_PATH};
use agent::net::Net;
use agent::session::{Agent, Exit};
use tokio_util::sync::CancellationToken;

const USAGE: &str = "\
usage: agent [--config PATH]     connect to the server named in the configuration
       agent --self-check [--config PATH]
                                 check the configuration loads and print the version
       agent --version | --help

The configuration is a TOML file (default /etc/agent/agent.toml); every key can be set
or overridden by the environment: AGENT_SERVER_URL, AGENT_CLIENT_ID, AGENT_TOKEN or
AGENT_TOKEN_FILE (or AGENT_ENROLL_SECRET or AGENT_ENROLL_SECRET_FILE, to enroll and keep
the issued token in the state directory), AGENT_STATE_DIR, AGENT_LABELS,
AGENT_EXEC_ALLOW, AGENT_PLUGIN_DIR, AGENT_CA_FILE, AGENT_COMMAND_TIMEOUT,
AGENT_WS_MAX_MESSAGE_BYTES, AGENT_UPDATE_WELCOME_TIMEOUT, AGENT_LOG.

Exit codes: 0 stopped by SIGTERM/SIGINT, 64 bad configuration or state directory,
77 refused by the server (deleted, token or enrollment refused): see the log.";

const EXIT_CONFIG: u8 = 64;
const EXIT_REFUSED: u8 = 77;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let mut path = None;
    let mut self_check = false;
    while let Some(arg) = args.next() {
        match arg.to_string_lossy().as_ref() {
            "--config" | "-c" => match args.next() {
                Some(p) => path = Some(PathBuf::from(p)),
                None => return usage_error("--config needs a path"),
            },
            "--version" | "-V" => {
                println!("agent {}", agent::VERSION);
                return ExitCode::SUCCESS;
            }
            "--self-check" => self_check = true,
            "--update-watchdog" => match args.next() {
                Some(dir) => return watchdog(PathBuf::from(dir)),
                None => return usage_error("--update-watchdog needs the state directory"),
            },
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage_error(&format!("unexpected argument `{other}`")),
        }
    }
    // An explicit --config must exist; the default file may be absent when the
    // environment carries everything.
    let required = path.is_some();
    let path = path.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let env = |k: &str| std::env::var(k).ok();
    let cfg = match Config::load(&path, required, &env, &agent::inventory::hostname) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("agent: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if self_check {
        // Only the version on stdout: the agent that runs this compares it.
        println!("{}", agent::VERSION);
        return ExitCode::SUCCESS;
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(&cfg.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("agent: configuration error: log (AGENT_LOG): {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in journald or files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    // One host, one connection: a single thread is plenty and keeps the agent small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let net = match Net::new(&cfg, &env) {
            Ok(net) => net,
            Err(e) => {
                tracing::error!(error = %e, "configuration error");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        tracing::info!(
            version = agent::VERSION,
            client_id = %cfg.client_id,
            server = %cfg.server.ws_url(&cfg.client_id),
            state_dir = %cfg.state_dir.display(),
            enrolls = matches!(cfg.token, agent::config::TokenSource::Enroll { .. }),
            exec_allow = ?cfg.exec_allow,
            plugin_dir = ?cfg.plugin_dir,
            "agent starting"
        );
        let stop = CancellationToken::new();
        tokio::spawn(signals(stop.clone()));
        let agent = match Agent::new(cfg.clone(), net, stop) {
            Ok(agent) => agent,
            Err(e) => {
                tracing::error!(error = %e, state_dir = %cfg.state_dir.display(), "cannot open the journal in the state directory (state_dir / AGENT_STATE_DIR)");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        match agent.run().await {
            Exit::Shutdown => {
                tracing::info!("agent stopped");
                ExitCode::SUCCESS
            }
            Exit::Refused => ExitCode::from(EXIT_REFUSED),
            Exit::StateDir => ExitCode::from(EXIT_CONFIG),
        }
    })
}

/// The update watchdog's process: logs to stderr like the agent, then guards the trial.
fn watchdog(state_dir: PathBuf) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match agent::update::watchdog::run(&state_dir) {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("agent: {message}\n{USAGE}");
    ExitCode::from(EXIT_CONFIG)
}

async fn signals(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
    stop.cancel();
}
