//! The `agent-server` binary as operators run it: exit codes, the embedded default, the
//! `token` command, SIGTERM, and what reaches the logs.

use std::time::Duration;

use crate::helpers::*;
use crate::procs::{ServerProcess, command};

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
    let server = ServerProcess::start(
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
    let server = ServerProcess::start(
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

#[tokio::test]
async fn process_metrics_count_the_servers_own_file_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &[("SERVER_PORT", "0"), ("SERVER_HOST", "127.0.0.1")],
    )
    .await;
    // The chart's alert compares these two (process_open_fds / process_max_fds).
    let idle = server.metric("process_open_fds").await;
    let max = server.metric("process_max_fds").await;
    assert!(
        idle > 3.0,
        "stdio, the listeners and the database at least: {idle}"
    );
    // The child inherits this process's soft limit on open files.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes into the struct we own.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    assert_eq!(
        max, limit.rlim_cur as f64,
        "process_max_fds is the soft limit"
    );

    // Every accepted connection is a descriptor of the server's.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(
            tokio::net::TcpStream::connect(("127.0.0.1", server.port))
                .await
                .unwrap(),
        );
    }
    eventually(WAIT, "40 more open descriptors", async || {
        server.metric("process_open_fds").await >= idle + 40.0
    })
    .await;
    drop(held);
    eventually(WAIT, "the descriptors closed again", async || {
        server.metric("process_open_fds").await < idle + 40.0
    })
    .await;

    let rss = server.metric("process_resident_memory_bytes").await;
    assert!(rss > 1024.0 * 1024.0, "resident memory in bytes: {rss}");
    assert!(server.metric("process_virtual_memory_bytes").await >= rss);
    assert!(server.metric("process_cpu_seconds_total").await >= 0.0);
    assert!(server.metric("process_threads").await >= 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = server.metric("process_start_time_seconds").await;
    assert!(
        (now - 120.0..=now + 1.0).contains(&started),
        "started {started}, now {now}"
    );
    server.sigterm_and_wait().await;
}

/// Sends `GET /health` on `stream` and reads until the server answers or closes; the
/// first line of the answer, or `None` when the connection was closed (EOF or reset)
/// without one.
async fn health_on(stream: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .ok()?;
    let mut buf = vec![0u8; 1024];
    match stream.read(&mut buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .map(String::from),
    }
}

#[tokio::test]
async fn out_of_file_descriptors_new_connections_are_closed_at_once_not_left_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &[
            ("SERVER_PORT", "0"),
            ("SERVER_HOST", "127.0.0.1"),
            ("SECRET_KEY", SECRET),
        ],
    )
    .await;
    // Room for a few connections more than the server holds open once started: the
    // database pool opens its connections in the background, so the count is taken when
    // it has stood still for a second.
    let open_now = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .unwrap()
            .count()
    };
    let mut open = open_now();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = open_now();
        if now == open {
            break;
        }
        open = now;
    }
    let limit = open + 16;
    let set = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", server.pid()))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(set.success(), "prlimit failed");

    // Fill every descriptor with kept-alive connections the server answered.
    let addr = format!("127.0.0.1:{}", server.port);
    let mut held = Vec::new();
    let refused_at = loop {
        assert!(
            held.len() <= 64,
            "{} connections and none refused",
            held.len()
        );
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        // A connection left waiting in the backlog never answers: the bound fails it.
        match tokio::time::timeout(Duration::from_secs(5), health_on(&mut stream)).await {
            Ok(Some(line)) => {
                assert!(line.contains("200"), "{line}");
                held.push(stream);
            }
            Ok(None) => break held.len(),
            Err(_) => panic!(
                "connection {} waited 5 s without an answer or a close",
                held.len() + 1
            ),
        }
    };
    assert!(refused_at >= 4, "only {refused_at} connections were served");
    // While the server is full, each new connection is closed at once.
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), health_on(&mut stream))
            .await
            .expect("closed at once, not left waiting");
        assert_eq!(answer, None);
    }
    // Descriptors freed: served again.
    drop(held);
    eventually(Duration::from_secs(10), "served again", async || {
        let Ok(mut stream) = tokio::net::TcpStream::connect(&addr).await else {
            return false;
        };
        let answer = tokio::time::timeout(Duration::from_secs(2), health_on(&mut stream)).await;
        matches!(answer, Ok(Some(line)) if line.contains("200"))
    })
    .await;
    let (_, log) = server.sigterm_and_wait().await;
    assert!(log.contains("out of file descriptors"), "{log}");
}
