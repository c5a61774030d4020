//! `GET /ws/{client_id}`: the handshake's checks, the welcome, heartbeats and closes.

use std::time::{Duration, Instant};

use agent_server::auth::Claims;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::helpers::*;

async fn agent_with_valid_token_is_welcomed_with_its_id_pod_and_intervals(app: TestApp) {
    let agent = app.connect("host-1").await;
    let w = &agent.welcome;
    assert_eq!(w["client_id"], "host-1");
    assert_eq!(w["pod"], "pod-test");
    assert_eq!(w["protocol"], 2);
    assert_eq!(w["heartbeat_interval"], 15.0);
    assert_eq!(w["offline_timeout"], 60.0);
    let body = app
        .eventually("/api/v1/agents/host-1", |a| a["online"] == true)
        .await;
    assert_eq!(body["pod"], "pod-test");
}

async fn token_in_the_query_string_is_accepted_as_in_the_seed(app: TestApp) {
    let token = app.agent_token("host-q");
    let agent = app
        .connect_with("host-q", &[], &format!("?token={token}"))
        .await
        .unwrap();
    assert_eq!(agent.welcome["client_id"], "host-q");
}

async fn bad_tokens_are_refused_with_401_before_any_upgrade(app: TestApp) {
    let now = agent_server::auth::unix_now();
    let sign = |claims: &serde_json::Value, key: &str, alg: Algorithm| {
        jsonwebtoken::encode(
            &Header::new(alg),
            claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let good = json!({"sub": "h", "role": "agent", "exp": now + 600, "iat": now});
    let cases = [
        ("missing", None),
        (
            "expired",
            Some(sign(
                &json!({"sub": "h", "role": "agent", "exp": now - 600, "iat": now - 700}),
                SECRET,
                Algorithm::HS256,
            )),
        ),
        (
            "wrong key",
            Some(sign(
                &good,
                "another-secret-another-secret-xx",
                Algorithm::HS256,
            )),
        ),
        (
            "other algorithm",
            Some(sign(&good, SECRET, Algorithm::HS512)),
        ),
        (
            "no exp",
            Some(sign(
                &json!({"sub": "h", "role": "agent"}),
                SECRET,
                Algorithm::HS256,
            )),
        ),
        // {"alg":"none"} with the good claims and an empty signature.
        (
            "alg none",
            Some(format!(
                "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
                base64url(&good.to_string())
            )),
        ),
        ("malformed", Some("not.a.jwt".to_string())),
    ];
    for (case, token) in cases {
        let headers: Vec<(&str, String)> = token
            .iter()
            .map(|t| ("authorization", format!("Bearer {t}")))
            .collect();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let err = app
            .connect_with("h", &headers, "")
            .await
            .err()
            .unwrap_or_else(|| panic!("{case}: accepted"));
        assert_eq!(err.0, 401, "{case}: {}", err.1);
        assert!(err.1.contains("\"unauthorized\""), "{case}: {}", err.1);
    }
}

fn base64url(s: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

async fn token_of_another_client_or_role_is_refused_with_403(app: TestApp) {
    let other = format!("Bearer {}", app.agent_token("someone-else"));
    let (status, body) = app
        .connect_with("host-1", &[("authorization", &other)], "")
        .await
        .err()
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("someone-else"),
        "the message names the token's client: {body}"
    );
    let admin = format!("Bearer {}", app.admin);
    let (status, _) = app
        .connect_with("host-1", &[("authorization", &admin)], "")
        .await
        .err()
        .unwrap();
    assert_eq!(status, 403);
}

async fn invalid_client_ids_are_refused_with_400(app: TestApp) {
    let token = format!("Bearer {}", app.agent_token("x"));
    for id in ["a%20b", &"a".repeat(129), "a:b"] {
        let (status, body) = app
            .connect_with(id, &[("authorization", &token)], "")
            .await
            .err()
            .unwrap();
        assert_eq!(status, 400, "{id}: {body}");
        assert!(body.contains("invalid_client_id"), "{body}");
    }
}

async fn second_connection_wins_and_the_first_is_closed_as_replaced(app: TestApp) {
    let mut first = app.connect("dup").await;
    let second = app.connect("dup").await;
    assert_eq!(
        first.closed().await,
        (4001, "replaced by a newer connection".to_string())
    );
    assert!(second.welcome["epoch"].as_i64() > first.welcome["epoch"].as_i64());
    let body = app
        .eventually("/api/v1/agents/dup", |a| a["online"] == true)
        .await;
    assert_eq!(
        body["online"], true,
        "the replaced session's exit does not mark the agent offline"
    );
}

async fn server_pings_every_heartbeat_interval(app: TestApp) {
    let mut agent = app.connect("pinged").await;
    let started = Instant::now();
    for _ in 0..3 {
        assert!(matches!(agent.next_frame().await, Frame::Ping));
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(550),
        "three pings at 200 ms take at least 600 ms: {elapsed:?}"
    );
}

async fn silent_agent_is_closed_after_the_offline_timeout_and_marked_offline(app: TestApp) {
    // tungstenite answers pings automatically only while we read; not reading makes the
    // agent silent, as a hung host would be.
    let agent = app.connect("silent").await;
    let started = Instant::now();
    let body = app
        .eventually("/api/v1/agents/silent", |a| a["online"] == false)
        .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "not before the 1 s timeout: {elapsed:?}"
    );
    assert!(body["last_seen"].is_string(), "last_seen is kept: {body}");
    let mut agent = agent;
    assert_eq!(agent.closed().await.0, 4000);
}

async fn heartbeat_message_is_answered(app: TestApp) {
    let mut agent = app.connect("hb").await;
    agent.send(json!({"type": "heartbeat"})).await;
    assert!(agent.recv_type("heartbeat_ack").await["ts"].is_i64());
}

async fn hello_records_version_hostname_os_and_arch(app: TestApp) {
    let mut agent = app.connect("hello").await;
    agent
        .send(json!({"type": "hello", "version": "1.2.3", "hostname": "web-1", "os": "linux", "arch": "x86_64"}))
        .await;
    let body = app
        .eventually("/api/v1/agents/hello", |a| a["version"] == "1.2.3")
        .await;
    assert_eq!(
        (
            body["hostname"].as_str(),
            body["os"].as_str(),
            body["arch"].as_str()
        ),
        (Some("web-1"), Some("linux"), Some("x86_64"))
    );
}

async fn invalid_message_gets_an_error_reply_and_the_session_continues(app: TestApp) {
    let mut agent = app.connect("sloppy").await;
    agent.send(json!({"type": "dance"})).await;
    let err = agent.recv_type("error").await;
    assert_eq!(err["code"], "invalid_message");
    agent
        .ws
        .send(tokio_tungstenite::tungstenite::Message::text("{not json"))
        .await
        .unwrap();
    assert_eq!(agent.recv_type("error").await["code"], "invalid_message");
    agent.send(json!({"type": "heartbeat"})).await;
    agent.recv_type("heartbeat_ack").await;
}

async fn message_over_the_size_limit_closes_with_1009(app: TestApp) {
    let mut agent = app.connect("big").await;
    let blob = "x".repeat(70 * 1024);
    let _ = agent
        .ws
        .send(tokio_tungstenite::tungstenite::Message::text(
            json!({"type": "inventory", "data": blob}).to_string(),
        ))
        .await;
    assert_eq!(agent.closed().await.0, 1009);
}

async fn session_ends_with_4003_when_its_token_expires(app: TestApp) {
    let now = agent_server::auth::unix_now();
    let claims = Claims::new("short", agent_server::auth::Role::Agent, now, now + 1);
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut agent = app
        .connect_with(
            "short",
            &[("authorization", &format!("Bearer {token}"))],
            "",
        )
        .await
        .unwrap();
    assert_eq!(agent.closed().await.0, 4003);
}

use futures_util::SinkExt;

on_both_backends! {
    agent_with_valid_token_is_welcomed_with_its_id_pod_and_intervals;
    second_connection_wins_and_the_first_is_closed_as_replaced;
    silent_agent_is_closed_after_the_offline_timeout_and_marked_offline
        with ["WS_HEARTBEAT_INTERVAL" = "200ms", "WS_OFFLINE_TIMEOUT" = "1s"];
    hello_records_version_hostname_os_and_arch;
}

on_sqlite! {
    token_in_the_query_string_is_accepted_as_in_the_seed;
    bad_tokens_are_refused_with_401_before_any_upgrade;
    token_of_another_client_or_role_is_refused_with_403;
    invalid_client_ids_are_refused_with_400;
    server_pings_every_heartbeat_interval with ["WS_HEARTBEAT_INTERVAL" = "200ms", "WS_OFFLINE_TIMEOUT" = "5s"];
    heartbeat_message_is_answered;
    invalid_message_gets_an_error_reply_and_the_session_continues;
    message_over_the_size_limit_closes_with_1009;
    session_ends_with_4003_when_its_token_expires;
}

async fn agent_that_stops_reading_is_closed_instead_of_buffered(app: TestApp) {
    // A tiny receive window and no reads: the server's writes stall once the socket
    // buffers are full, as with a host that hangs or a link that stalls.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(app.addr).await.unwrap();
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws/stalled", app.addr),
    )
    .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", app.agent_token("stalled"))
            .parse()
            .unwrap(),
    );
    let (_ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    app.eventually("/api/v1/agents/stalled", |a| a["online"] == true)
        .await;

    let big = "x".repeat(60 * 1024);
    for _ in 0..120 {
        app.command("stalled", "bulk", json!({"blob": big})).await;
    }
    let body = app
        .eventually("/api/v1/agents/stalled", |a| a["online"] == false)
        .await;
    assert_eq!(body["online"], false);
    let text = app
        .http
        .get(app.metrics_url())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("agent_server_ws_sessions_closed_total{reason=\"slow_consumer\"} 1"),
        "closed as a slow consumer:\n{text}"
    );
    let (_, cmds) = app.get("/api/v1/agents/stalled/commands?limit=500").await;
    let open = cmds["commands"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "pending" || c["status"] == "delivered")
        .count();
    assert_eq!(open, 120, "every command is kept for the next connection");
}

on_sqlite! {
    agent_that_stops_reading_is_closed_instead_of_buffered with ["WS_SEND_TIMEOUT" = "500ms"];
}
