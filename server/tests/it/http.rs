//! HTTP semantics every route shares (RFC 9110): HEAD wherever GET is, 405 with `Allow`,
//! one trailing-slash policy, OPTIONS, JSON content types, the shared page query, and
//! `/metrics` on its own listener.

use serde_json::json;

use crate::helpers::*;

async fn head_is_answered_wherever_get_is(app: TestApp) {
    app.enroll("h-1").await;
    for path in [
        "/api/v1/agents",
        "/api/v1/agents/h-1",
        "/api/v1/agents/h-1/commands",
        "/api/v1/binaries",
        "/api/v1/rollouts",
        "/api/v1/pods",
        "/health",
        "/readiness",
        "/",
    ] {
        let get = app
            .http
            .get(app.url(path))
            .bearer_auth(&app.admin)
            .send()
            .await
            .unwrap();
        let head = app
            .http
            .head(app.url(path))
            .bearer_auth(&app.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), get.status(), "HEAD {path}");
        assert_eq!(
            head.headers().get("content-type"),
            get.headers().get("content-type"),
            "HEAD {path}"
        );
        assert!(
            head.bytes().await.unwrap().is_empty(),
            "HEAD {path} has no body"
        );
    }
    let head = app.http.head(app.metrics_url()).send().await.unwrap();
    assert_eq!(head.status().as_u16(), 200, "HEAD /metrics");
}

async fn metrics_are_served_on_their_own_port_only(app: TestApp) {
    let text = app
        .http
        .get(app.metrics_url())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("agent_server_build_info"), "{text}");
    let (status, body) = app.get("/metrics").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
}

async fn an_empty_limit_means_the_default_on_every_list(app: TestApp) {
    app.enroll("l-1").await;
    for path in [
        "/api/v1/agents?limit=",
        "/api/v1/agents/l-1/commands?limit=",
        "/api/v1/binaries?limit=",
        "/api/v1/rollouts?limit=",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    for path in [
        "/api/v1/agents?limit=0",
        "/api/v1/agents/l-1/commands?limit=x",
        "/api/v1/binaries?limit=100000",
        "/api/v1/rollouts?limit=-1",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_limit")),
            "{path}"
        );
    }
}

async fn a_trailing_slash_is_another_path_and_a_404(app: TestApp) {
    app.enroll("t-1").await;
    for path in [
        "/api/v1/agents/",
        "/api/v1/agents/t-1/",
        "/api/v1/binaries/",
        "/health/",
        "/ws/",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
    }
}

async fn a_known_path_with_another_method_is_a_405_listing_the_allowed_ones(app: TestApp) {
    let cases = [
        ("/api/v1/agents/x", "GET,HEAD,DELETE"),
        ("/api/v1/tokens", "GET,HEAD,POST"),
        ("/health", "GET,HEAD"),
    ];
    for (path, allow) in cases {
        let resp = app
            .http
            .put(app.url(path))
            .bearer_auth(&app.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 405, "{path}");
        assert_eq!(resp.headers()["allow"], allow, "{path}");
        let (_, body) = status_json(resp).await;
        assert_eq!(body["error"]["code"], "method_not_allowed");
    }
}

async fn options_without_origin_is_answered_not_refused(app: TestApp) {
    // On /api the CORS layer answers every OPTIONS; without Origin it grants nothing.
    let resp = app
        .http
        .request(reqwest::Method::OPTIONS, app.url("/api/v1/agents"))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    // Elsewhere OPTIONS lists the methods.
    let resp = app
        .http
        .request(reqwest::Method::OPTIONS, app.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert_eq!(resp.headers()["allow"], "GET,HEAD");
}

async fn json_bodies_accept_curl_form_type_and_refuse_others_with_415(app: TestApp) {
    let post = |content_type: &'static str| {
        app.http
            .post(app.url("/api/v1/tokens"))
            .bearer_auth(&app.admin)
            .header("content-type", content_type)
            .body(json!({"client_id": "ct-1"}).to_string())
            .send()
    };
    for ok in ["application/json", "application/x-www-form-urlencoded"] {
        assert_eq!(post(ok).await.unwrap().status().as_u16(), 201, "{ok}");
    }
    let (status, body) = status_json(post("text/plain").await.unwrap()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    let resp = app
        .http
        .post(app.url("/api/v1/tokens"))
        .bearer_auth(&app.admin)
        .header("content-type", "application/json")
        .body("{\"client_id\": ")
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(resp).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    assert_eq!(body["error"]["line"], 1);
}

on_sqlite! {
    head_is_answered_wherever_get_is;
    metrics_are_served_on_their_own_port_only;
    an_empty_limit_means_the_default_on_every_list;
    a_trailing_slash_is_another_path_and_a_404;
    a_known_path_with_another_method_is_a_405_listing_the_allowed_ones;
    options_without_origin_is_answered_not_refused;
    json_bodies_accept_curl_form_type_and_refuse_others_with_415;
}
