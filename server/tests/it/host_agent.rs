//! The real host agent (`agent/`, binary `agent`) as a child process, for scenarios that
//! show an agent to a person. Cargo builds another package's binary only when asked:
//! `cargo test --workspace` does, or `cargo build -p agent` first. Without it the scenario
//! is a loud skip locally and a failure in CI.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::{TestApp, WAIT};

/// `target/<profile>/agent`, next to this test executable's `deps/` directory.
pub fn binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("agent");
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "{} is missing: build it with `cargo build -p agent` (`cargo test --workspace` does)",
        path.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("SKIPPED: {why}");
    None
}

/// A running `agent` process connected to a test app, its log collected.
pub struct HostAgent {
    _child: Child,
    log: Arc<Mutex<String>>,
    _state: tempfile::TempDir,
}

impl HostAgent {
    /// Starts `binary` as `client_id` with a token minted by the app, a state directory
    /// of its own and the extra `AGENT_*` settings in `env`.
    pub fn start(app: &TestApp, binary: &Path, client_id: &str, env: &[(&str, &str)]) -> Self {
        let state = tempfile::tempdir().unwrap();
        let mut child = Command::new(binary)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AGENT_SERVER_URL", format!("ws://{}", app.addr))
            .env("AGENT_CLIENT_ID", client_id)
            .env("AGENT_TOKEN", app.agent_token(client_id))
            .env("AGENT_STATE_DIR", state.path())
            .env("AGENT_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the agent starts");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let collected = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                collected.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        HostAgent {
            _child: child,
            log,
            _state: state,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the agent has logged `needle`.
    pub async fn logged(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.log().contains(needle) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent did not log `{needle}` within {WAIT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Writes an executable plug-in script into `dir`.
pub fn plugin(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}
