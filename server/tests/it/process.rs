//! The `agent-server` binary as operators run it: exit codes, the embedded default, the
//! `token` command, SIGTERM, and what reaches the logs.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_agent-server");

fn command(dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir)
        .env_clear()
        .envs(env.iter().copied())
        .kill_on_drop(true);
    c
}

/// A running server process whose stderr is collected.
struct Server {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

async fn start(dir: &Path, env: &[(&str, &str)]) -> Server {
    let mut child = command(dir, env)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let listening = Arc::new(Notify::new());
    let stderr = child.stderr.take().unwrap();
    let (log2, listening2) = (log.clone(), listening.clone());
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let is_listening = line.contains("agent-server listening");
            log2.lock().unwrap().push_str(&(line + "\n"));
            if is_listening {
                listening2.notify_one();
            }
        }
    });
    tokio::time::timeout(WAIT, listening.notified())
        .await
        .expect("server starts listening");
    let text = log.lock().unwrap().clone();
    let port = text
        .split("addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("port in the listening line: {text}"));
    Server { child, port, log }
}

impl Server {
    async fn sigterm_and_wait(mut self) -> (i32, String) {
        let pid = self.child.id().unwrap() as i32;
        // SAFETY: kill(2) with a pid we own.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap();
        // Let the reader drain the pipe.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let log = self.log.lock().unwrap().clone();
        (status.code().unwrap_or(-1), log)
    }
}

#[tokio::test]
async fn invalid_configuration_exits_64_naming_the_variable_and_what_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value, expect) in [
        (
            "SECRET_KEY",
            "too-short",
            "SECRET_KEY: is 9 bytes; at least 32",
        ),
        (
            "JWT_ALGORITHM",
            "RS256",
            "JWT_ALGORITHM: `RS256` is not accepted; use HS256, HS384 or HS512",
        ),
        (
            "SERVER_PORT",
            "http",
            "SERVER_PORT: `http` is not a TCP port number",
        ),
        (
            "WS_OFFLINE_TIMEOUT",
            "5",
            "WS_OFFLINE_TIMEOUT: must be longer than WS_HEARTBEAT_INTERVAL",
        ),
    ] {
        let out = command(dir.path(), &[(var, value)]).output().await.unwrap();
        assert_eq!(out.status.code(), Some(64), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{var}={value}: {stderr}");
    }
    let out = command(dir.path(), &[])
        .arg("frobnicate")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));
}

#[tokio::test]
async fn embedded_default_needs_no_setup_and_the_token_command_uses_its_key() {
    let dir = tempfile::tempdir().unwrap();
    // Only the port is set, so parallel tests do not collide on 8080.
    let server = start(
        dir.path(),
        &[("SERVER_PORT", "0"), ("SERVER_HOST", "127.0.0.1")],
    )
    .await;
    let data = dir.path().join("data");
    assert!(data.join("agent-server.db").exists(), "SQLite in ./data");
    let key = data.join("secret_key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the generated key is private");
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .contains("agent-server token --sub admin --role admin")
    );

    let out = command(dir.path(), &[])
        .args(["token", "--sub", "ops", "--role", "admin", "--ttl", "1h"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let resp = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/api/v1/agents", server.port))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    let (code, log) = server.sigterm_and_wait().await;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("drained; exiting"), "{log}");
}

#[tokio::test]
async fn tokens_and_query_strings_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        &[
            ("SERVER_PORT", "0"),
            ("SERVER_HOST", "127.0.0.1"),
            ("LOG_LEVEL", "trace"),
            ("SECRET_KEY", SECRET),
        ],
    )
    .await;
    let tokens = agent_server::auth::Tokens::new(
        &agent_server::config::Secret::new(SECRET),
        jsonwebtoken::Algorithm::HS256,
    );
    let token = tokens.mint(
        "logged",
        agent_server::auth::Role::Agent,
        Duration::from_secs(60),
    );
    let url = format!(
        "ws://127.0.0.1:{}/ws/logged?token={token}&secret=hunter2",
        server.port
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    use futures_util::StreamExt;
    ws.next().await.unwrap().unwrap();
    drop(ws);
    let bad = format!(
        "ws://127.0.0.1:{}/ws/logged?token=not-a-real-token-xyz",
        server.port
    );
    assert!(tokio_tungstenite::connect_async(bad).await.is_err());

    let (_, log) = server.sigterm_and_wait().await;
    assert!(
        log.contains("agent connected"),
        "the connection was logged: {log}"
    );
    let signature = token.rsplit('.').next().unwrap();
    assert!(!log.contains(signature), "token in logs");
    assert!(
        !log.contains("hunter2") && !log.contains("not-a-real-token-xyz"),
        "query string in logs"
    );
}
