//! Faults found by replaying public bug reports against the server, each kept as the
//! input that found it: a session that cannot write, upgrades a proxy mangled, text one
//! backend stores and the other refuses, ids URL clients rewrite, search that differed by
//! backend, non-browser `Origin`s, and a binary missing from a replica's volume.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// An RFC 6455 §1.3 sample key: any 16 bytes in base64 will do.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends `head` (a request without body) and reads the answer until the server closes.
async fn raw_exchange(app: &TestApp, head: &str) -> String {
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut out))
        .await
        .expect("the server answers and closes within the wait bound")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A handshake request for `/ws/{id}` with `token`, and `extra` header lines.
fn upgrade_request(app: &TestApp, version: &str, id: &str, token: &str, extra: &str) -> String {
    format!(
        "GET /ws/{id} {version}\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n{extra}\r\n",
        app.addr
    )
}

async fn metrics(app: &TestApp) -> String {
    app.http
        .get(app.metrics_url())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

// ---- 1. A session that cannot write ------------------------------------------------

/// A client that opens a session, then sends ping frames as fast as the socket takes them
/// and never reads, with a small receive window: the server's writes stall at once.
struct PingFlood {
    /// Bytes written so far.
    written: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<std::io::Error>,
}

impl PingFlood {
    async fn start(app: &TestApp, id: &str) -> PingFlood {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(app.addr).await.unwrap();
        let head = upgrade_request(
            app,
            "HTTP/1.1",
            id,
            &app.agent_token(id),
            &format!(
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
            ),
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        // Read the 101's head only; the welcome that follows is never read.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            tokio::time::timeout(WAIT, stream.read_exact(&mut byte))
                .await
                .expect("a response within the wait bound")
                .unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");

        // A masked ping with a 125-byte payload (the largest a control frame may carry)
        // and an all-zero mask, repeated into one write.
        let mut frame = vec![0x89, 0x80 | 125, 0, 0, 0, 0];
        frame.extend_from_slice(&[b'p'; 125]);
        let burst = frame.repeat(64);
        let written = Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = stream.write_all(&burst).await {
                    return e;
                }
                counter.fetch_add(burst.len() as u64, Ordering::Relaxed);
            }
        });
        PingFlood { written, task }
    }

    /// Waits until the flood has pushed `bytes`, far more than socket buffers hold.
    async fn until_written(&self, bytes: u64) {
        eventually(WAIT, "the ping flood to get going", async || {
            self.written.load(Ordering::Relaxed) >= bytes
        })
        .await;
    }

    /// Waits until the server dropped the connection (the flood's write fails).
    async fn until_dropped(&self, bound: Duration, what: &str) -> Duration {
        eventually(bound, what, async || self.task.is_finished()).await
    }
}

async fn agent_that_floods_pings_and_never_reads_is_closed_as_a_slow_consumer(app: TestApp) {
    let started = Instant::now();
    let flood = PingFlood::start(&app, "flood-1").await;
    app.eventually("/api/v1/agents/flood-1", |a| a["online"] == true)
        .await;
    // WS_HEARTBEAT_INTERVAL (500 ms) + WS_SEND_TIMEOUT (500 ms) + the close grace (2 s).
    flood
        .until_dropped(Duration::from_secs(8), "the flooding agent is disconnected")
        .await;
    app.eventually("/api/v1/agents/flood-1", |a| a["online"] == false)
        .await;
    let text = metrics(&app).await;
    assert!(
        text.contains("agent_server_ws_sessions_closed_total{reason=\"slow_consumer\"} 1")
            || text
                .contains("agent_server_ws_sessions_closed_total{reason=\"heartbeat_timeout\"} 1"),
        "closed with 4008 (or 4000):\n{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

async fn ping_flooder_is_replaced_by_a_newer_connection_at_once(app: TestApp) {
    let flood = PingFlood::start(&app, "flood-2").await;
    flood.until_written(8 << 20).await;
    // Long heartbeat and send timeouts: only the replacement can end the flooder's session.
    let mut newer = app.connect("flood-2").await;
    flood
        .until_dropped(Duration::from_secs(5), "the replaced session ends")
        .await;
    newer.send(json!({"type": "heartbeat"})).await;
    newer.recv_type("heartbeat_ack").await;
    let text = metrics(&app).await;
    assert!(
        text.contains("agent_server_ws_sessions_closed_total{reason=\"replaced\"} 1"),
        "{text}"
    );
}

async fn ping_flooder_is_closed_when_an_operator_deletes_it(app: TestApp) {
    let flood = PingFlood::start(&app, "flood-3").await;
    flood.until_written(8 << 20).await;
    let (status, body) = app.delete("/api/v1/agents/flood-3").await;
    assert_eq!(status, 200, "{body}");
    flood
        .until_dropped(Duration::from_secs(5), "the deleted agent's session ends")
        .await;
    let text = metrics(&app).await;
    assert!(
        text.contains("agent_server_ws_sessions_closed_total{reason=\"deleted\"} 1"),
        "{text}"
    );
}

on_sqlite! {
    agent_that_floods_pings_and_never_reads_is_closed_as_a_slow_consumer
        with ["WS_HEARTBEAT_INTERVAL" = "500ms", "WS_SEND_TIMEOUT" = "500ms", "WS_OFFLINE_TIMEOUT" = "60s"];
    ping_flooder_is_replaced_by_a_newer_connection_at_once
        with ["WS_HEARTBEAT_INTERVAL" = "60s", "WS_SEND_TIMEOUT" = "60s", "WS_OFFLINE_TIMEOUT" = "120s"];
}

on_both_backends! {
    ping_flooder_is_closed_when_an_operator_deletes_it
        with ["WS_HEARTBEAT_INTERVAL" = "60s", "WS_SEND_TIMEOUT" = "60s", "WS_OFFLINE_TIMEOUT" = "120s"];
}

// ---- 2. The opening handshake, validated before any 101 ------------------------------

async fn http_1_0_upgrade_is_refused_with_426_naming_the_proxy_setting(app: TestApp) {
    let head = upgrade_request(
        &app,
        "HTTP/1.0",
        "web-1",
        &app.agent_token("web-1"),
        &format!(
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
        ),
    );
    let answer = raw_exchange(&app, &head).await;
    assert!(
        answer.starts_with("HTTP/1.0 426") || answer.starts_with("HTTP/1.1 426"),
        "{answer}"
    );
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("\r\nupgrade: websocket\r\n"), "{answer}");
    assert!(answer.contains("proxy_http_version 1.1"), "{answer}");
    assert!(answer.contains("\"not_websocket\""), "{answer}");
    let text = metrics(&app).await;
    assert!(
        text.contains("agent_server_ws_handshake_refusals_total{reason=\"http_version\"} 1"),
        "{text}"
    );
}

async fn each_broken_handshake_rule_gets_the_rfc_status_and_headers(app: TestApp) {
    let token = app.agent_token("web-2");
    let upgrade = "Upgrade: websocket\r\n";
    let connection = "Connection: Upgrade, close\r\n";
    let key = format!("Sec-WebSocket-Key: {KEY}\r\n");
    let version = "Sec-WebSocket-Version: 13\r\n";
    let cases = [
        // A proxy that dropped the hop-by-hop headers.
        (
            format!("Connection: close\r\n{key}{version}"),
            "426",
            "upgrade_header",
            "upgrade: websocket",
        ),
        (
            format!("{upgrade}Connection: close\r\n{key}{version}"),
            "426",
            "connection_header",
            "upgrade: websocket",
        ),
        (format!("{upgrade}{connection}{version}"), "400", "key", ""),
        (
            format!("{upgrade}{connection}Sec-WebSocket-Key: c2hvcnQ=\r\n{version}"),
            "400",
            "key",
            "",
        ),
        (
            format!("{upgrade}{connection}{key}Sec-WebSocket-Version: 8\r\n"),
            "426",
            "websocket_version",
            "sec-websocket-version: 13",
        ),
    ];
    for (headers, status, reason, header) in cases {
        let answer = raw_exchange(
            &app,
            &upgrade_request(&app, "HTTP/1.1", "web-2", &token, &headers),
        )
        .await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{headers}: {answer}"
        );
        assert!(
            answer.to_ascii_lowercase().contains(header),
            "{headers}: {answer}"
        );
        let text = metrics(&app).await;
        assert!(
            text.contains(&format!(
                "agent_server_ws_handshake_refusals_total{{reason=\"{reason}\"}}"
            )),
            "{text}"
        );
    }
    // And a valid one still opens a session.
    app.connect("web-2").await;
}

async fn plain_get_without_upgrade_headers_is_a_426_asking_for_websocket(app: TestApp) {
    let resp = app
        .http
        .get(app.url("/ws/host-1"))
        .bearer_auth(app.agent_token("host-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 426);
    assert_eq!(resp.headers()["upgrade"], "websocket");
}

on_sqlite! {
    http_1_0_upgrade_is_refused_with_426_naming_the_proxy_setting;
    each_broken_handshake_rule_gets_the_rfc_status_and_headers;
    plain_get_without_upgrade_headers_is_a_426_asking_for_websocket;
}

// ---- 3. U+0000: one rule for both backends -------------------------------------------

async fn hello_with_nul_in_its_host_name_gets_an_error_naming_the_field(app: TestApp) {
    let mut agent = app.connect("nul-1").await;
    agent
        .ws
        .send(tokio_tungstenite::tungstenite::Message::text(
            r#"{"type":"hello","version":"1.0.0","hostname":"web-1\u0000","os":"linux","arch":"x86_64"}"#,
        ))
        .await
        .unwrap();
    let err = agent.recv_type("error").await;
    assert_eq!(err["code"], "invalid_message", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("hostname"),
        "{err}"
    );
    // The session goes on, and a clean hello is stored.
    agent
        .send(json!({"type": "hello", "version": "1.0.0", "hostname": "web-1", "os": "linux", "arch": "x86_64"}))
        .await;
    app.eventually("/api/v1/agents/nul-1", |a| a["hostname"] == "web-1")
        .await;
}

async fn results_and_inventories_with_nul_are_refused_and_named(app: TestApp) {
    let mut agent = app.connect("nul-2").await;
    let id = app.command("nul-2", "uptime", json!({})).await;
    agent.recv_type("command").await;
    agent
        .ws
        .send(tokio_tungstenite::tungstenite::Message::text(format!(
            r#"{{"type":"result","id":"{id}","status":"ok","output":{{"lines":["ok","a\u0000b"]}}}}"#
        )))
        .await
        .unwrap();
    let err = agent.recv_type("error").await;
    assert_eq!(
        (err["code"].as_str(), err["id"].as_str()),
        (Some("invalid_message"), Some(id.as_str()))
    );
    assert!(
        err["message"].as_str().unwrap().contains("output.lines[1]"),
        "{err}"
    );
    assert_eq!(app.command_status(&id).await["status"], "delivered");
    agent
        .ws
        .send(tokio_tungstenite::tungstenite::Message::text(
            r#"{"type":"inventory","data":{"k\u0000":1}}"#,
        ))
        .await
        .unwrap();
    let err = agent.recv_type("error").await;
    assert!(err["message"].as_str().unwrap().contains("data["), "{err}");
    // The same result without the NUL is stored.
    agent.result(&id, "ok", json!({"lines": ["ok"]})).await;
    agent.recv_type("ack").await;
}

async fn api_strings_with_nul_are_a_400_naming_the_field(app: TestApp) {
    app.enroll("nul-3").await;
    let (status, body) = app
        .post(
            "/api/v1/agents/nul-3/commands",
            &json!({"name": "up\u{0}time"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("nul_character")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("name "),
        "{body}"
    );
    let (status, body) = app
        .post(
            "/api/v1/agents/nul-3/commands",
            &json!({"name": "uptime", "args": {"a": "\u{0}"}}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("args.a "),
        "{body}"
    );

    for path in [
        "/api/v1/agents?q=%00",
        "/api/v1/agents?q=web%00",
        "/api/v1/commands/%00",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("nul_character")),
            "{path}: {body}"
        );
    }
    let (status, body) = app
        .upload(
            "name=agent%00&version=1.0.0&os=linux&arch=x86_64",
            b"bin".to_vec(),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("nul_character")),
        "{body}"
    );

    let resp = app
        .http
        .post(app.url("/api/v1/agents/nul-3/inventory"))
        .bearer_auth(&app.admin)
        .header("content-type", "application/json")
        .body(r#"{"disks": [{"label": "a\u0000"}]}"#)
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(resp).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("inventory.disks[0].label"),
        "{body}"
    );
    // Nothing was stored, and everything still answers.
    let (status, body) = app.get("/api/v1/agents/nul-3/commands").await;
    assert_eq!(
        (status, body["commands"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{body}"
    );
}

on_both_backends! {
    hello_with_nul_in_its_host_name_gets_an_error_naming_the_field;
    results_and_inventories_with_nul_are_refused_and_named;
    api_strings_with_nul_are_a_400_naming_the_field;
}

// ---- 5. Ids a URL normaliser would change ----------------------------------------------

async fn dot_segment_ids_are_refused_everywhere_ids_are_accepted(app: TestApp) {
    for id in [".", ".."] {
        let (status, body) = app.post("/api/v1/tokens", &json!({"client_id": id})).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_client_id")),
            "{id}: {body}"
        );
        // Sent as is, without a client's normalisation.
        let answer = raw_exchange(
            &app,
            &upgrade_request(
                &app,
                "HTTP/1.1",
                id,
                &app.agent_token("x"),
                &format!("Upgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"),
            ),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{id}: {answer}");
        assert!(answer.contains("invalid_client_id"), "{id}: {answer}");
    }
    let (status, _) = app
        .post("/api/v1/tokens", &json!({"client_id": "..a"}))
        .await;
    assert_eq!(status, 201, "dots inside an id are fine");
}

on_both_backends! {
    dot_segment_ids_are_refused_everywhere_ids_are_accepted;
}

// ---- 8. Search, identical on both backends ----------------------------------------------

async fn search_results(app: &TestApp, q: &str) -> Vec<String> {
    let (status, body) = app
        .get(&format!("/api/v1/agents?limit=100&q={}", urlencode(q)))
        .await;
    assert_eq!(status, 200, "{q}: {body}");
    body["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_search_gives_the_same_results_on_both_backends() {
    let Some(sqlite) = spawn_app_with(Backend::Sqlite, &[]).await else {
        return;
    };
    let Some(postgres) = spawn_app_with(Backend::Postgres, &[]).await else {
        return;
    };
    let agents = [
        ("Web-Upper", "WEB-HOST.example"),
        ("web-lower", "web-host.example"),
        ("db_1", "Db%Primary"),
        ("db-2", "CAFÉ"),
        ("dbx2", "café"),
        ("cache-1", "Ünïcode_Host"),
    ];
    for app in [&sqlite, &postgres] {
        for (id, hostname) in agents {
            let store = &app.state.store;
            let epoch = store
                .agent_connected(id.to_string(), "pod-test".into())
                .await
                .unwrap();
            store
                .agent_hello(
                    id.to_string(),
                    epoch,
                    agent_server::store::Hello {
                        hostname: Some(hostname.to_string()),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
        }
    }
    let queries = [
        "WEB", "web", "wEb-H", "upper", "DB_", "_", "%", "db%p", "-", ".", "CAFÉ", "café", "É",
        "é", "ünï", "ÜNÏ", "x", "", "no-such",
    ];
    for q in queries {
        let (a, b) = (
            search_results(&sqlite, q).await,
            search_results(&postgres, q).await,
        );
        assert_eq!(a, b, "q={q:?}: SQLite and PostgreSQL disagree");
    }
    assert_eq!(
        search_results(&postgres, "WEB").await,
        ["Web-Upper", "web-lower"]
    );
    assert_eq!(
        search_results(&postgres, "_").await,
        ["cache-1", "db_1"],
        "`_` is no wildcard"
    );
    assert_eq!(
        search_results(&postgres, "%").await,
        ["db_1"],
        "`%` is no wildcard"
    );
    assert_eq!(search_results(&postgres, "DB%P").await, ["db_1"]);
}

// ---- 9. The agent endpoint and Origin --------------------------------------------------

async fn non_browser_origin_is_accepted_on_the_agent_endpoint(app: TestApp) {
    // What Python's websocket-client sends by default.
    let origin = format!("http://{}", app.addr);
    let token = format!("Bearer {}", app.agent_token("py-1"));
    let agent = app
        .connect_with(
            "py-1",
            &[("authorization", &token), ("origin", &origin)],
            "",
        )
        .await;
    assert!(agent.is_ok(), "{:?}", agent.err());
    // The token still decides: an Origin brings no credential of its own.
    let (status, _) = app
        .connect_with("py-1", &[("origin", "https://evil.example")], "")
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
}

on_sqlite! {
    non_browser_origin_is_accepted_on_the_agent_endpoint;
}

// ---- A binary whose file is missing on this replica ------------------------------------

async fn binary_missing_from_this_replicas_volume_is_a_503_naming_the_volume(app: TestApp) {
    let id = app.uploaded("agent", "1.0.0", "linux", "x86_64").await;
    for entry in std::fs::read_dir(&app.config.binary_storage_path).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::remove_file(path).unwrap();
        }
    }
    for _ in 0..2 {
        let (status, body) = app.get(&format!("/api/v1/binaries/{id}/download")).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (503, Some("binary_file_missing")),
            "{body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("BINARY_STORAGE_PATH") && message.contains("this replica"),
            "{message}"
        );
    }
}

on_sqlite! {
    binary_missing_from_this_replicas_volume_is_a_503_naming_the_volume;
}
