//! The web UI's server side: embedded assets, sign-in, the session cookie, CSRF checks,
//! the event stream and the cluster view.

use serde_json::{Value, json};

use crate::helpers::*;

const PASSWORD: &str = "correct horse battery staple";

/// Signs in; returns the session cookie (`name=value`).
async fn sign_in(app: &TestApp, password: &str) -> Result<String, (u16, Value)> {
    let resp = app
        .http
        .post(app.url("/api/v1/session"))
        .json(&json!({ "password": password }))
        .send()
        .await
        .unwrap();
    let cookie = resp
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_string());
    let (status, body) = status_json(resp).await;
    match (status, cookie) {
        (200, Some(c)) => Ok(c.split(';').next().unwrap().to_string()),
        _ => Err((status, body)),
    }
}

async fn with_cookie(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    cookie: &str,
) -> reqwest::RequestBuilder {
    app.http
        .request(method, app.url(path))
        .header("cookie", cookie)
}

async fn the_page_and_its_assets_are_served_from_the_binary_with_a_strict_policy(app: TestApp) {
    let resp = app.http.get(app.url("/")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(h["x-frame-options"], "DENY");
    let html = resp.text().await.unwrap();
    assert!(
        html.contains("/ui/app.js") && html.contains("/ui/app.css"),
        "{html}"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing external"
    );

    let resp = app.http.get(app.url("/ui/app.js")).send().await.unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    let etag = resp.headers()["etag"].clone();
    let js = resp.text().await.unwrap();
    assert!(js.len() > 1000);
    let resp = app
        .http
        .get(app.url("/ui/app.js"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 304);
    let resp = app
        .http
        .get(app.url("/ui/secrets.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
}

async fn sign_in_sets_an_httponly_strict_cookie_that_works_for_the_api_until_sign_out(
    app: TestApp,
) {
    let (status, body) = sign_in(&app, "wrong password!").await.unwrap_err();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("wrong_password"))
    );
    let resp = app
        .http
        .post(app.url("/api/v1/session"))
        .json(&json!({ "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set.contains(attribute), "{set}");
    }
    assert!(!set.contains("Secure"), "plain http to 127.0.0.1: {set}");
    let cookie = set.split(';').next().unwrap().to_string();

    let resp = with_cookie(&app, reqwest::Method::GET, "/api/v1/agents", &cookie)
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        200,
        "the cookie stands in for a token"
    );
    let (_, session) = status_json(
        with_cookie(&app, reqwest::Method::GET, "/api/v1/session", &cookie)
            .await
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(session["signed_in"], true);

    let resp = with_cookie(&app, reqwest::Method::DELETE, "/api/v1/session", &cookie)
        .await
        .header("origin", app.base.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let resp = with_cookie(&app, reqwest::Method::GET, "/api/v1/agents", &cookie)
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401, "signed out everywhere");
}

async fn state_changing_requests_with_the_cookie_must_come_from_this_origin(app: TestApp) {
    app.enroll("target").await;
    let cookie = sign_in(&app, PASSWORD).await.unwrap();
    let send = |origin: Option<String>| {
        let mut req = app
            .http
            .post(app.url("/api/v1/agents/target/commands"))
            .header("cookie", &cookie)
            .json(&json!({"name": "uptime"}));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };
    let (status, body) = status_json(send(None).await.unwrap()).await;
    assert_eq!(status, 403, "no Origin: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cross-site")
    );
    let status = send(Some("https://evil.example".into()))
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 403);
    let status = send(Some("https://agents.example.com".into()))
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 202, "SERVER_URL's origin");
    let status = send(Some(app.base.clone())).await.unwrap().status();
    assert_eq!(status.as_u16(), 202, "the host the browser talked to");
}

async fn repeated_wrong_passwords_are_rate_limited(app: TestApp) {
    for _ in 0..10 {
        assert_eq!(sign_in(&app, "guess-guess-guess").await.unwrap_err().0, 401);
    }
    let resp = app
        .http
        .post(app.url("/api/v1/session"))
        .json(&json!({ "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429, "even the right password waits");
    assert!(resp.headers().contains_key("retry-after"));
}

async fn embedded_mode_generates_the_admin_password_in_the_data_dir(app: TestApp) {
    let path = app.config.data_dir.join("admin_password");
    let password = std::fs::read_to_string(&path).unwrap();
    assert_eq!(password.len(), 24);
    assert!(sign_in(&app, &password).await.is_ok());
}

async fn sign_in_is_disabled_on_several_replicas_without_a_password(app: TestApp) {
    let (status, body) = sign_in(&app, "anything at all").await.unwrap_err();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("sign_in_disabled"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ADMIN_PASSWORD")
    );
}
scenario_test!(
    sign_in_is_disabled_on_postgres_without_admin_password,
    Postgres,
    sign_in_is_disabled_on_several_replicas_without_a_password,
    []
);

/// Reads an event stream until `text` has arrived, within [`WAIT`].
async fn read_until(resp: &mut reqwest::Response, seen: &mut String, text: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.contains(text) {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("no `{text}` within {WAIT:?}; got:\n{seen}"))
            .unwrap()
            .expect("the stream stays open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

async fn event_stream_reports_agents_commands_and_a_summary(app: TestApp) {
    let mut events = app
        .http
        .get(app.url("/api/v1/events"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut seen = String::new();
    read_until(&mut events, &mut seen, "event: ready").await;

    let mut agent = app.connect("ev-1").await;
    read_until(
        &mut events,
        &mut seen,
        "event: agent\ndata: {\"id\":\"ev-1\"}",
    )
    .await;
    let id = app.command("ev-1", "uptime", json!({})).await;
    read_until(&mut events, &mut seen, &format!("\"id\":\"{id}\"")).await;
    assert!(seen.contains("event: command\ndata: "), "{seen}");
    agent.recv_type("command").await;
    agent.result(&id, "ok", json!("up")).await;
    agent.recv_type("ack").await;
    read_until(&mut events, &mut seen, "\"online_agents\":1").await;
    assert!(seen.contains("event: summary"), "{seen}");
}

async fn event_streams_end_when_the_replica_drains_so_shutdown_is_not_held_up(mut app: TestApp) {
    let mut events = app
        .http
        .get(app.url("/api/v1/events"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    read_until(&mut events, &mut seen, "event: ready").await;
    let server = app.begin_shutdown();
    let ended = tokio::time::timeout(WAIT, async {
        while let Ok(Some(_)) = events.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream ends once draining starts");
    let finished = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert!(finished, "shutdown finished within SHUTDOWN_TIMEOUT");
}

async fn pods_are_listed_with_the_agents_each_holds(app: TestApp) {
    let other = app.spawn_replica("pod-b").await;
    let _a = app.connect("p-1").await;
    let _b = app.connect("p-2").await;
    let _c = other.connect("p-3").await;
    let body = app.eventually("/api/v1/pods", |b| b["online"] == 3).await;
    let pods: Vec<(String, i64, bool)> = body["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["pod"].as_str().unwrap().to_string(),
                p["online_agents"].as_i64().unwrap(),
                p["this_replica"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        pods,
        vec![
            ("pod-b".to_string(), 1, false),
            ("pod-test".to_string(), 2, true)
        ]
    );
}

on_both_backends! {
    sign_in_sets_an_httponly_strict_cookie_that_works_for_the_api_until_sign_out
        with ["ADMIN_PASSWORD" = "correct horse battery staple"];
    event_stream_reports_agents_commands_and_a_summary;
    pods_are_listed_with_the_agents_each_holds;
}

on_sqlite! {
    the_page_and_its_assets_are_served_from_the_binary_with_a_strict_policy;
    state_changing_requests_with_the_cookie_must_come_from_this_origin
        with ["ADMIN_PASSWORD" = "correct horse battery staple"];
    repeated_wrong_passwords_are_rate_limited
        with ["ADMIN_PASSWORD" = "correct horse battery staple"];
    embedded_mode_generates_the_admin_password_in_the_data_dir;
    event_streams_end_when_the_replica_drains_so_shutdown_is_not_held_up;
}
