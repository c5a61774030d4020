//! Commands are stored before delivery and delivered at least once.

use serde_json::json;

use crate::helpers::*;

async fn command_to_a_connected_agent_is_delivered_at_once_and_its_result_stored(app: TestApp) {
    let mut agent = app.connect("web-1").await;
    let id = app
        .command("web-1", "uptime", json!({"verbose": true}))
        .await;
    let cmd = agent.recv_type("command").await;
    assert_eq!(
        (cmd["id"].as_str(), cmd["name"].as_str()),
        (Some(id.as_str()), Some("uptime"))
    );
    assert_eq!(cmd["args"], json!({"verbose": true}));
    app.eventually(&format!("/api/v1/commands/{id}"), |c| {
        c["status"] == "delivered"
    })
    .await;

    agent
        .result(&id, "ok", json!({"stdout": "up 3 days"}))
        .await;
    assert_eq!(agent.recv_type("ack").await["id"], id.as_str());
    let stored = app.command_status(&id).await;
    assert_eq!(stored["status"], "succeeded");
    assert_eq!(stored["output"], json!({"stdout": "up 3 days"}));
    assert!(stored["completed_at"].is_string());
}

async fn error_result_marks_the_command_failed(app: TestApp) {
    let mut agent = app.connect("web-2").await;
    let id = app.command("web-2", "restart", json!({})).await;
    agent.recv_type("command").await;
    agent.result(&id, "error", json!("permission denied")).await;
    agent.recv_type("ack").await;
    assert_eq!(app.command_status(&id).await["status"], "failed");
}

async fn command_sent_while_the_agent_is_offline_is_delivered_on_reconnect(app: TestApp) {
    app.enroll("laptop").await;
    let first = app.command("laptop", "a", json!({})).await;
    let second = app.command("laptop", "b", json!({})).await;
    assert_eq!(app.command_status(&first).await["status"], "pending");
    let mut agent = app.connect("laptop").await;
    assert_eq!(
        agent.recv_type("command").await["id"],
        first.as_str(),
        "oldest first"
    );
    assert_eq!(agent.recv_type("command").await["id"], second.as_str());
}

async fn delivered_command_without_a_result_is_sent_again_on_reconnect(app: TestApp) {
    let mut agent = app.connect("flaky").await;
    let id = app.command("flaky", "collect", json!({})).await;
    agent.recv_type("command").await;
    app.eventually(&format!("/api/v1/commands/{id}"), |c| {
        c["status"] == "delivered"
    })
    .await;
    agent.kill();

    let mut agent = app.connect("flaky").await;
    let again = agent.recv_type("command").await;
    assert_eq!(again["id"], id.as_str());
    agent.result(&id, "ok", json!(null)).await;
    agent.recv_type("ack").await;
    let stored = app.command_status(&id).await;
    assert_eq!(stored["status"], "succeeded");
    assert_eq!(stored["attempts"], 2);
}

async fn results_for_unknown_or_foreign_commands_are_refused(app: TestApp) {
    let mut other = app.connect("other").await;
    let foreign = app.command("other", "x", json!({})).await;
    other.recv_type("command").await;
    // The agent may read its command before the server has marked it delivered.
    app.eventually(&format!("/api/v1/commands/{foreign}"), |c| {
        c["status"] == "delivered"
    })
    .await;

    let mut agent = app.connect("me").await;
    agent.result("no-such-command", "ok", json!(1)).await;
    let err = agent.recv_type("error").await;
    assert_eq!(
        (err["code"].as_str(), err["id"].as_str()),
        (Some("unknown_command"), Some("no-such-command"))
    );
    agent.result(&foreign, "ok", json!("hijack")).await;
    assert_eq!(agent.recv_type("error").await["code"], "unknown_command");
    assert_eq!(
        app.command_status(&foreign).await["status"],
        "delivered",
        "the other agent's command is untouched"
    );
}

async fn repeated_result_is_acknowledged_and_the_first_one_stands(app: TestApp) {
    let mut agent = app.connect("rep").await;
    let id = app.command("rep", "x", json!({})).await;
    agent.recv_type("command").await;
    agent.result(&id, "ok", json!("first")).await;
    agent.recv_type("ack").await;
    agent.result(&id, "error", json!("second")).await;
    agent.recv_type("ack").await;
    let stored = app.command_status(&id).await;
    assert_eq!(
        (stored["status"].as_str(), &stored["output"]),
        (Some("succeeded"), &json!("first"))
    );
}

async fn command_with_a_ttl_expires_when_not_delivered_in_time(app: TestApp) {
    app.enroll("sleepy").await;
    let (status, body) = app
        .post(
            "/api/v1/agents/sleepy/commands",
            &json!({"name": "x", "ttl_seconds": 1}),
        )
        .await;
    assert_eq!(status, 202);
    let id = body["id"].as_str().unwrap().to_string();
    app.eventually(&format!("/api/v1/commands/{id}"), |c| {
        c["status"] == "expired"
    })
    .await;
    let mut agent = app.connect("sleepy").await;
    agent.send(json!({"type": "heartbeat"})).await;
    assert_eq!(
        agent.recv().await["type"],
        "heartbeat_ack",
        "the expired command is not delivered"
    );
}

async fn invalid_command_requests_get_clear_400s(app: TestApp) {
    app.enroll("h").await;
    let path = "/api/v1/agents/h/commands";
    for (body, code) in [
        (json!({"args": {}}), "invalid_json"),
        (json!({"name": ""}), "invalid_command"),
        (json!({"name": "x", "args": [1]}), "invalid_command"),
        (json!({"name": "x", "arg": {}}), "invalid_json"),
        (json!({"name": "x", "ttl_seconds": 0}), "invalid_command"),
    ] {
        let (status, resp) = app.post(path, &body).await;
        assert_eq!(
            (status, resp["error"]["code"].as_str()),
            (400, Some(code)),
            "{body} -> {resp}"
        );
        assert!(
            resp["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let resp = app
        .http
        .post(app.url(path))
        .bearer_auth(&app.admin)
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    let (status, resp) = status_json(resp).await;
    assert_eq!(status, 400);
    assert_eq!(
        (
            resp["error"]["line"].as_u64(),
            resp["error"]["column"].as_u64()
        ),
        (Some(1), Some(9))
    );
}

async fn command_for_an_unknown_agent_is_404(app: TestApp) {
    let (status, body) = app
        .post("/api/v1/agents/nobody/commands", &json!({"name": "x"}))
        .await;
    assert_eq!(status, 404, "{body}");
}

async fn agent_command_history_is_paginated_newest_first(app: TestApp) {
    app.enroll("hist").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.command("hist", &format!("c{i}"), json!({})).await);
    }
    let (_, page1) = app.get("/api/v1/agents/hist/commands?limit=3").await;
    let got: Vec<&str> = page1["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[4].as_str(), ids[3].as_str(), ids[2].as_str()]);
    let next = page1["next"].as_str().unwrap();
    let (_, page2) = app
        .get(&format!(
            "/api/v1/agents/hist/commands?limit=3&before={next}"
        ))
        .await;
    let got: Vec<&str> = page2["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[1].as_str(), ids[0].as_str()]);
    assert!(page2["next"].is_null());
}

on_both_backends! {
    command_to_a_connected_agent_is_delivered_at_once_and_its_result_stored;
    error_result_marks_the_command_failed;
    command_sent_while_the_agent_is_offline_is_delivered_on_reconnect;
    delivered_command_without_a_result_is_sent_again_on_reconnect;
    results_for_unknown_or_foreign_commands_are_refused;
    repeated_result_is_acknowledged_and_the_first_one_stands;
    command_with_a_ttl_expires_when_not_delivered_in_time with ["COMMAND_SWEEP_INTERVAL" = "100ms"];
    agent_command_history_is_paginated_newest_first;
}

on_sqlite! {
    invalid_command_requests_get_clear_400s;
    command_for_an_unknown_agent_is_404;
}
