//! JSON documents (inventories, command `args`, result `output`) come back byte for byte
//! as their sender wrote them, whichever path they took, and every path applies the same
//! limits (`limits.rs`): integers beyond 64 bits, `1e400` and key order survive; nesting
//! deeper than 64 levels is refused over HTTP and over the WebSocket alike.

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

/// The document of issue reports: an integer beyond 64 bits, keys out of order.
const DOCUMENT: &str = r#"{"zpool_bytes": 18446744073709551616, "b": 1, "a": [2, 1e400, -0.0]}"#;

fn nested(levels: usize) -> String {
    "[".repeat(levels) + &"]".repeat(levels)
}

/// The raw text of an API answer.
async fn get_text(app: &TestApp, path: &str) -> (u16, String) {
    let resp = app
        .http
        .get(app.url(path))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Posts `body` as the agent's inventory over HTTP.
async fn post_inventory(app: &TestApp, id: &str, body: String) -> (u16, serde_json::Value) {
    let resp = app
        .http
        .post(app.url(&format!("/api/v1/agents/{id}/inventory")))
        .bearer_auth(app.agent_token(id))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    status_json(resp).await
}

/// Sends `text` as one frame, exactly as written.
async fn send_raw(agent: &mut Agent, text: String) {
    agent.ws.send(Message::text(text)).await.unwrap();
}

/// The next text frame, as the server wrote it.
async fn next_text(agent: &mut Agent) -> String {
    loop {
        match tokio::time::timeout(WAIT, agent.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.as_str().to_string(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no text frame: {other:?}"),
        }
    }
}

async fn an_inventory_comes_back_as_sent_over_either_path(app: TestApp) {
    let mut agent = app.connect("doc-ws").await;
    // Over the WebSocket: the message is written by hand, so nothing re-encodes it.
    send_raw(
        &mut agent,
        format!(r#"{{"type":"inventory","data":{DOCUMENT}}}"#),
    )
    .await;
    agent.until_heartbeat_ack().await;
    let (status, text) = get_text(&app, "/api/v1/agents/doc-ws/inventory").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(&format!(r#""data":{DOCUMENT}"#)), "{text}");

    let (status, body) = post_inventory(&app, "doc-http", DOCUMENT.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let (_, text) = get_text(&app, "/api/v1/agents/doc-http/inventory").await;
    assert!(text.contains(&format!(r#""data":{DOCUMENT}"#)), "{text}");
}

async fn command_args_and_result_output_come_back_as_sent(app: TestApp) {
    let mut agent = app.connect("doc-cmd").await;
    let args = r#"{"n": 18446744073709551616, "z": 1, "a": 1e400}"#;
    let resp = app
        .http
        .post(app.url("/api/v1/agents/doc-cmd/commands"))
        .bearer_auth(&app.admin)
        .header("content-type", "application/json")
        .body(format!(r#"{{"name": "exec", "args": {args}}}"#))
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(resp).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    // The agent receives the args as the operator wrote them.
    let frame = loop {
        let text = next_text(&mut agent).await;
        if text.contains(r#""type":"command""#) {
            break text;
        }
    };
    assert!(frame.contains(&format!(r#""args":{args}"#)), "{frame}");
    // The agent's output is stored and shown as the agent wrote it.
    send_raw(
        &mut agent,
        format!(r#"{{"type":"result","id":"{id}","status":"ok","output":{DOCUMENT}}}"#),
    )
    .await;
    assert_eq!(agent.recv_type("ack").await["id"], id.as_str());
    let (_, text) = get_text(&app, &format!("/api/v1/commands/{id}")).await;
    assert!(text.contains(&format!(r#""args":{args}"#)), "{text}");
    assert!(text.contains(&format!(r#""output":{DOCUMENT}"#)), "{text}");
    let (_, text) = get_text(&app, "/api/v1/agents/doc-cmd/commands").await;
    assert!(text.contains(&format!(r#""output":{DOCUMENT}"#)), "{text}");
}

async fn nesting_beyond_the_limit_is_refused_on_every_path(app: TestApp) {
    let deep = nested(200);
    let deepest_allowed = nested(64);
    // Inventory over HTTP.
    let (status, body) = post_inventory(&app, "doc-deep", deep.clone()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_json")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 64"),
        "{body}"
    );
    let (status, body) = post_inventory(&app, "doc-deep", deepest_allowed.clone()).await;
    assert_eq!(status, 200, "{body}");
    // Inventory and result output over the WebSocket.
    let mut agent = app.connect("doc-deep").await;
    send_raw(
        &mut agent,
        format!(r#"{{"type":"inventory","data":{deep}}}"#),
    )
    .await;
    let refused = agent.recv_type("error").await;
    assert_eq!(refused["code"], "invalid_message", "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("at most 64"),
        "{refused}"
    );
    send_raw(
        &mut agent,
        format!(r#"{{"type":"inventory","data":{deepest_allowed}}}"#),
    )
    .await;
    assert!(agent.until_heartbeat_ack().await.is_empty());
    let id = app.command("doc-deep", "uptime", json!({})).await;
    agent.recv_type("command").await;
    send_raw(
        &mut agent,
        format!(r#"{{"type":"result","id":"{id}","status":"ok","output":{deep}}}"#),
    )
    .await;
    let refused = agent.recv_type("error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_str()),
        (Some("invalid_message"), Some(id.as_str())),
        "{refused}"
    );
    // Command args over HTTP.
    let resp = app
        .http
        .post(app.url("/api/v1/agents/doc-deep/commands"))
        .bearer_auth(&app.admin)
        .header("content-type", "application/json")
        .body(format!(r#"{{"name": "x", "args": {{"a": {deep}}}}}"#))
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_command")),
        "{body}"
    );
}

on_both_backends! {
    an_inventory_comes_back_as_sent_over_either_path;
    command_args_and_result_output_come_back_as_sent;
    nesting_beyond_the_limit_is_refused_on_every_path;
}
