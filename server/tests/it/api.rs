//! The REST API: agents, inventory, tokens, errors, probes, metrics and CORS.

use serde_json::{Value, json};

use crate::helpers::*;

async fn inventory_up_to_the_limit_is_kept_and_larger_is_a_413(app: TestApp) {
    app.enroll("inv").await;
    let token = app.agent_token("inv");
    let doc = |bytes: usize| format!("{{\"packages\":\"{}\"}}", "p".repeat(bytes - 16));
    let url = app.url("/api/v1/agents/inv/inventory");

    let nine = doc(9 * 1024 * 1024);
    let resp = app
        .http
        .post(&url)
        .bearer_auth(&token)
        .body(nine.clone())
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["size_bytes"], nine.len());

    let eleven = doc(11 * 1024 * 1024);
    let resp = app
        .http
        .post(&url)
        .bearer_auth(&token)
        .body(eleven)
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("payload_too_large"))
    );

    let (status, stored) = app.get("/api/v1/agents/inv/inventory").await;
    assert_eq!(status, 200);
    assert_eq!(
        stored["size_bytes"],
        nine.len(),
        "the rejected upload did not replace the accepted one"
    );
    assert_eq!(
        stored["data"]["packages"].as_str().map(str::len),
        Some(nine.len() - 15)
    );
    let (_, agent) = app.get("/api/v1/agents/inv").await;
    assert_eq!(agent["inventory"]["size_bytes"], nine.len());
}

async fn invalid_inventory_json_is_a_400_with_its_position(app: TestApp) {
    app.enroll("inv").await;
    let resp = app
        .http
        .post(app.url("/api/v1/agents/inv/inventory"))
        .bearer_auth(app.agent_token("inv"))
        .body("{\n  \"cpu\": 4,\n  \"mem\": }")
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(resp).await;
    assert_eq!(status, 400);
    assert_eq!(
        (
            body["error"]["line"].as_u64(),
            body["error"]["column"].as_u64()
        ),
        (Some(3), Some(10))
    );
}

async fn agent_token_may_only_touch_its_own_inventory(app: TestApp) {
    app.enroll("a").await;
    let resp = app
        .http
        .post(app.url("/api/v1/agents/a/inventory"))
        .bearer_auth(app.agent_token("b"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
}

async fn inventory_message_over_websocket_is_stored(app: TestApp) {
    let mut agent = app.connect("small").await;
    agent
        .send(json!({"type": "inventory", "data": {"cpus": 8}}))
        .await;
    let body = app
        .eventually("/api/v1/agents/small/inventory", |b| b["data"]["cpus"] == 8)
        .await;
    assert!(body["received_at"].is_string());
}

async fn agents_are_listed_with_online_filter_search_and_pages(app: TestApp) {
    for id in ["a-1", "a-2", "b-1"] {
        app.enroll(id).await;
    }
    let _online = app.connect("a-2").await;
    app.eventually("/api/v1/agents?online=true", |b| b["total"] == 1)
        .await;

    let (_, offline) = app.get("/api/v1/agents?online=false").await;
    let ids = |b: &Value| {
        b["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&offline), vec!["a-1", "b-1"]);
    let (_, all) = app.get("/api/v1/agents").await;
    assert_eq!(
        (
            all["total"].as_i64(),
            all["online"].as_i64(),
            all["offline"].as_i64()
        ),
        (Some(3), Some(1), Some(2))
    );
    let (_, search) = app.get("/api/v1/agents?q=a-").await;
    assert_eq!(ids(&search), vec!["a-1", "a-2"]);
    let (_, page1) = app.get("/api/v1/agents?limit=2").await;
    assert_eq!(ids(&page1), vec!["a-1", "a-2"]);
    let (_, page2) = app
        .get(&format!(
            "/api/v1/agents?limit=2&after={}",
            page1["next"].as_str().unwrap()
        ))
        .await;
    assert_eq!(ids(&page2), vec!["b-1"]);
    let (status, _) = app.get("/api/v1/agents?online=maybe").await;
    assert_eq!(status, 400);
}

async fn deleting_an_agent_disconnects_it_and_forgets_its_data(app: TestApp) {
    let mut agent = app.connect("gone").await;
    app.command("gone", "x", json!({})).await;
    agent.recv_type("command").await;
    let resp = app
        .http
        .delete(app.url("/api/v1/agents/gone"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(agent.closed().await.0, 4002);
    let (status, _) = app.get("/api/v1/agents/gone").await;
    assert_eq!(status, 404);
    let (status, body) = app.get("/api/v1/agents/gone/commands").await;
    assert_eq!(body["commands"], json!([]), "{status} {body}");
}

async fn tokens_are_minted_by_admins_only_and_enroll_the_agent(app: TestApp) {
    let (status, body) = app
        .post("/api/v1/tokens", &json!({"client_id": "new-host"}))
        .await;
    assert_eq!(status, 201);
    let token = body["token"].as_str().unwrap();
    let agent = app
        .connect_with(
            "new-host",
            &[("authorization", &format!("Bearer {token}"))],
            "",
        )
        .await;
    assert!(agent.is_ok(), "the minted token opens a session");
    let resp = app
        .http
        .post(app.url("/api/v1/tokens"))
        .bearer_auth(app.agent_token("x"))
        .json(&json!({"client_id": "y"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let (status, body) = app
        .post("/api/v1/tokens", &json!({"client_id": "bad id"}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_client_id"))
    );
}

async fn errors_are_json_with_a_code_a_message_and_the_right_status(app: TestApp) {
    let resp = app
        .http
        .get(app.url("/api/v1/agents"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let (status, body) = status_json(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, body) = app.get("/api/v1/nothing-here").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let resp = app
        .http
        .put(app.url("/api/v1/agents/x"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["allow"], "GET,HEAD,DELETE");
    assert_eq!(resp.status().as_u16(), 405);
    let resp = app
        .http
        .get(app.url("/api/v1/agents"))
        .bearer_auth(app.agent_token("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
}

async fn probes_answer_and_metrics_are_exposed(app: TestApp) {
    let resp = app.http.get(app.url("/health")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (status, body) =
        status_json(app.http.get(app.url("/readiness")).send().await.unwrap()).await;
    assert_eq!(
        (status, body["checks"]["database"]["ok"].as_bool()),
        (200, Some(true))
    );
    let _agent = app.connect("m").await;
    let expected = [
        "agent_server_connected_agents 1",
        "agent_server_ws_messages_total{direction=\"outbound\",type=\"welcome\"}",
        "agent_server_http_requests_total{method=\"GET\",route=\"/readiness\",status=\"200\"}",
        "agent_server_http_request_duration_seconds_bucket",
        "agent_server_draining 0",
        "agent_server_build_info{version=",
    ];
    // The agent may read its welcome before the server has counted it: poll briefly.
    let mut text = String::new();
    eventually(WAIT, "metrics", async || {
        text = app
            .http
            .get(app.metrics_url())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        expected.iter().all(|n| text.contains(n))
    })
    .await;
}

async fn cors_allows_server_url_origin_only(app: TestApp) {
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/api/v1/agents"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .send()
    };
    let ok = preflight("https://agents.example.com").await.unwrap();
    assert!(ok.status().is_success());
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://agents.example.com"
    );
    assert!(
        ok.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization")
    );
    // Another origin gets no Access-Control-Allow-Origin, which browsers refuse.
    let bad = preflight("https://evil.example").await.unwrap();
    assert!(bad.headers().get("access-control-allow-origin").is_none());
    let resp = app
        .http
        .get(app.url("/api/v1/agents"))
        .bearer_auth(&app.admin)
        .header("origin", "https://agents.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://agents.example.com"
    );
}

async fn request_ids_are_echoed_or_generated(app: TestApp) {
    let resp = app
        .http
        .get(app.url("/health"))
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-42");
    let resp = app.http.get(app.url("/health")).send().await.unwrap();
    assert_eq!(resp.headers()["x-request-id"].len(), 32);
}

on_both_backends! {
    inventory_up_to_the_limit_is_kept_and_larger_is_a_413;
    inventory_message_over_websocket_is_stored;
    agents_are_listed_with_online_filter_search_and_pages;
    deleting_an_agent_disconnects_it_and_forgets_its_data;
    probes_answer_and_metrics_are_exposed;
}

on_sqlite! {
    invalid_inventory_json_is_a_400_with_its_position;
    agent_token_may_only_touch_its_own_inventory;
    tokens_are_minted_by_admins_only_and_enroll_the_agent;
    errors_are_json_with_a_code_a_message_and_the_right_status;
    cors_allows_server_url_origin_only;
    request_ids_are_echoed_or_generated;
}
