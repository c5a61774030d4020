//! The drain sequence that SIGTERM starts (the signal itself is covered in `process.rs`).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

async fn shutdown_fails_readiness_refuses_upgrades_spreads_closes_and_finishes_requests(
    mut app: TestApp,
) {
    let mut agents = Vec::new();
    for i in 0..10 {
        agents.push(app.connect(&format!("d-{i}")).await);
    }
    // An API request whose body is still arriving when shutdown starts.
    let mut slow = TcpStream::connect(app.addr).await.unwrap();
    let body = b"{\"client_id\": \"late-enrollee\"}";
    let head = format!(
        "POST /api/v1/tokens HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        app.admin,
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body[..5]).await.unwrap();

    let started = Instant::now();
    let server = app.begin_shutdown();
    let closes: Vec<_> = agents
        .into_iter()
        .map(|mut a| tokio::spawn(async move { (a.closed().await, started.elapsed()) }))
        .collect();

    let (status, body_json) =
        status_json(app.http.get(app.url("/readiness")).send().await.unwrap()).await;
    assert_eq!(
        (status, body_json["checks"]["draining"]["ok"].as_bool()),
        (503, Some(false)),
        "readiness fails at once"
    );
    let resp = app
        .http
        .get(app.url("/ws/late"))
        .bearer_auth(app.agent_token("late"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        503,
        "new upgrades are refused while draining"
    );
    assert!(resp.headers().contains_key("retry-after"));
    let (status, _) = app.get("/api/v1/agents").await;
    assert_eq!(status, 200, "the API keeps serving during the drain");

    let mut at = Vec::new();
    for c in closes {
        let ((code, reason), elapsed) = c.await.unwrap();
        assert_eq!((code, reason.as_str()), (1012, "server restarting"));
        at.push(elapsed);
    }
    let (first, last) = (at.iter().min().unwrap(), at.iter().max().unwrap());
    assert!(
        *first >= Duration::from_millis(450),
        "no agent is closed during DRAIN_DELAY: {first:?}"
    );
    assert!(
        *last - *first >= Duration::from_millis(600),
        "closes are spread over DRAIN_WINDOW: {at:?}"
    );

    slow.write_all(&body[5..]).await.unwrap();
    let mut response = String::new();
    slow.read_to_string(&mut response).await.unwrap();
    assert!(
        response.starts_with("HTTP/1.1 201"),
        "the in-flight request completes: {response}"
    );

    let finished = tokio::time::timeout(WAIT, server)
        .await
        .expect("shutdown is bounded")
        .unwrap();
    assert!(finished, "everything finished within SHUTDOWN_TIMEOUT");
    assert!(started.elapsed() < Duration::from_secs(5));
}

on_both_backends! {
    shutdown_fails_readiness_refuses_upgrades_spreads_closes_and_finishes_requests
        with ["DRAIN_DELAY" = "500ms", "DRAIN_WINDOW" = "1s", "SHUTDOWN_TIMEOUT" = "5s"];
}
