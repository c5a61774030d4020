//! Credentials over HTTP, on SQLite and on PostgreSQL: revocation seen by another replica
//! within a second (cluster mode over the shared Redis), enrollment and each of its
//! refusals, a deleted agent's old token refused, a revocation no message announced
//! closing the live session all the same, an audit entry per change, and
//! `agent-server check` passing twice in a row against the same server.

use std::time::{Duration, Instant};

use agent_server::store::{EnrollSecretRow, now_ms};
use serde_json::{Value, json};

use crate::helpers::*;

/// An app with REDIS_HOST set (the shared Redis, a key prefix of its own) and a second
/// replica of it, or `None` (a loud skip outside CI) without Redis or PostgreSQL.
async fn two_replicas(backend: Backend) -> Option<(TestApp, TestApp)> {
    let addr = std::env::var("TEST_REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into());
    if let Err(e) = tokio::net::TcpStream::connect(&addr).await {
        assert!(std::env::var_os("CI").is_none(), "Redis at {addr}: {e}");
        eprintln!("SKIPPED: Redis not reachable at {addr} ({e}); set TEST_REDIS_ADDR");
        return None;
    }
    let (host, port) = addr.rsplit_once(':').unwrap();
    let prefix = format!("creds-http-{}:", uuid::Uuid::new_v4().simple());
    let app = spawn_app_with(
        backend,
        &[
            ("REDIS_HOST", host),
            ("REDIS_PORT", port),
            ("REDIS_KEY_PREFIX", prefix.as_str()),
            ("POD_ID", "pod-a"),
        ],
    )
    .await?;
    let other = app.spawn_replica("pod-b").await;
    Some((app, other))
}

/// Polls `check` every 20 ms until it holds; panics after `bound`.
async fn within(bound: Duration, what: &str, check: impl AsyncFnMut() -> bool) -> Duration {
    eventually(bound, what, check).await
}

async fn get_with(app: &TestApp, path: &str, token: &str) -> (u16, Value) {
    let resp = app
        .http
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    status_json(resp).await
}

async fn revocations_reach_the_other_replica_within_a_second(backend: Backend) {
    let Some((a, b)) = two_replicas(backend).await else {
        return;
    };
    // Both replicas subscribe to the revocation channel at start; a first revocation
    // before that would only be seen within the cache's lifetime.
    let (status, minted) = a
        .post(
            "/api/v1/tokens",
            &json!({"client_id": "edge-1", "name": "edge"}),
        )
        .await;
    assert_eq!(status, 201, "{minted}");
    let agent_token = minted["token"].as_str().unwrap().to_string();
    let (status, ci) = a
        .post(
            "/api/v1/tokens",
            &json!({"client_id": "ci", "role": "admin", "name": "ci pipeline"}),
        )
        .await;
    assert_eq!(status, 201, "{ci}");
    let ci_token = ci["token"].as_str().unwrap().to_string();
    // Replica B has seen both tokens (and caches that they are live).
    let mut session = b
        .connect_with(
            "edge-1",
            &[("authorization", &format!("Bearer {agent_token}"))],
            "",
        )
        .await
        .expect("the minted token opens a session on B");
    assert_eq!(get_with(&b, "/api/v1/agents", &ci_token).await.0, 200);

    let started = Instant::now();
    let (status, body) = a.post("/api/v1/agents/edge-1/revoke", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (code, reason) = tokio::time::timeout(Duration::from_secs(1), session.closed())
        .await
        .expect("B closes the revoked agent's session within a second");
    assert_eq!((code, reason.as_str()), (4002, "credentials revoked"));
    within(
        Duration::from_secs(1),
        "B refuses the revoked agent token",
        async || {
            matches!(
                b.connect_with("edge-1", &[("authorization", &format!("Bearer {agent_token}"))], "")
                    .await,
                Err((401, ref body)) if body.contains("revoked")
            )
        },
    )
    .await;
    let agent_revoked = started.elapsed();

    let started = Instant::now();
    let (status, body) = a
        .delete(&format!("/api/v1/tokens/{}", ci["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["revoked_at"].is_string(), "{body}");
    within(
        Duration::from_secs(1),
        "B refuses the revoked API token",
        async || {
            let (status, body) = get_with(&b, "/api/v1/agents", &ci_token).await;
            status == 401
                && body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("revoked by an operator"))
        },
    )
    .await;
    println!(
        "revocation seen by the other replica: agent {agent_revoked:?}, token {:?}",
        started.elapsed()
    );
    // The revoked token is listed only with include_revoked.
    let (_, live) = a.get("/api/v1/tokens").await;
    let names: Vec<&str> = live["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, vec!["edge"], "{live}");
    let (_, all) = a.get("/api/v1/tokens?include_revoked=true").await;
    assert_eq!(all["tokens"].as_array().unwrap().len(), 2, "{all}");
}

mod revocation_across_replicas {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::revocations_reach_the_other_replica_within_a_second(crate::helpers::Backend::Sqlite)
            .await;
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::revocations_reach_the_other_replica_within_a_second(
            crate::helpers::Backend::Postgres,
        )
        .await;
    }
}

async fn enroll(app: &TestApp, body: Value) -> (u16, Value, Option<String>) {
    let resp = app
        .http
        .post(app.url("/api/v1/enroll"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let (status, body) = status_json(resp).await;
    (status, body, retry_after)
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn enrollment_gives_a_working_token_and_each_refusal_says_why(app: TestApp) {
    let (status, created) = app
        .post(
            "/api/v1/enroll-secrets",
            &json!({"name": "rack 1", "labels": ["rack-1"], "max_uses": 1}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let secret = created["secret"].as_str().unwrap().to_string();
    let (_, listed) = app.get("/api/v1/enroll-secrets").await;
    let listed = &listed["enroll_secrets"][0];
    assert_eq!(listed["name"], "rack 1");
    assert!(listed.get("secret").is_none() && listed.get("secret_sha256").is_none());
    assert!(!listed.to_string().contains(&secret));

    // The happy path: a token that opens a session; the secret's labels survive a hello.
    let (status, enrolled, _) = enroll(
        &app,
        json!({"secret": secret, "client_id": "web-1", "hostname": "web-1.example"}),
    )
    .await;
    assert_eq!(status, 201, "{enrolled}");
    assert_eq!(enrolled["labels"], json!(["rack-1"]));
    let token = enrolled["token"].as_str().unwrap();
    let mut agent = app
        .connect_with(
            "web-1",
            &[("authorization", &format!("Bearer {token}"))],
            "",
        )
        .await
        .expect("the enrolled token opens a session");
    agent
        .send(json!({"type": "hello", "version": "1.0.0", "labels": ["web"]}))
        .await;
    agent.until_heartbeat_ack().await;
    let store = app.state.store.clone();
    within(WAIT, "hello labels merged with enrolled ones", async || {
        store.agent_labels("web-1".into()).await.unwrap() == ["rack-1", "web"]
    })
    .await;
    let (_, listed) = app.get("/api/v1/enroll-secrets").await;
    assert_eq!(listed["enroll_secrets"][0]["use_count"], 1);

    // Each refusal, with its status and code.
    let (status, body, _) = enroll(&app, json!({"secret": secret, "client_id": "web-2"})).await;
    assert_eq!(
        (status, code(&body)),
        (401, "enroll_secret_used_up"),
        "{body}"
    );
    let (status, body, _) = enroll(
        &app,
        json!({"secret": "agent-enroll-nonsense", "client_id": "web-2"}),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (401, "unknown_enroll_secret"),
        "{body}"
    );
    let (_, open) = app
        .post("/api/v1/enroll-secrets", &json!({"name": "open"}))
        .await;
    let open_secret = open["secret"].as_str().unwrap();
    let (status, body, _) =
        enroll(&app, json!({"secret": open_secret, "client_id": "web-1"})).await;
    assert_eq!((status, code(&body)), (409, "already_enrolled"), "{body}");
    let (status, body, _) =
        enroll(&app, json!({"secret": open_secret, "client_id": "bad id"})).await;
    assert_eq!((status, code(&body)), (400, "invalid_client_id"), "{body}");
    let (status, _) = app
        .delete(&format!(
            "/api/v1/enroll-secrets/{}",
            open["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 200);
    let (status, body, _) =
        enroll(&app, json!({"secret": open_secret, "client_id": "web-3"})).await;
    assert_eq!(
        (status, code(&body)),
        (401, "enroll_secret_revoked"),
        "{body}"
    );
    let expired = "agent-enroll-expired-for-the-test";
    app.state
        .store
        .insert_enroll_secret(EnrollSecretRow {
            id: uuid::Uuid::now_v7().to_string(),
            name: "old".into(),
            secret_sha256: sha256_hex(expired),
            labels: "[]".into(),
            allow_reenroll: false,
            created_at: now_ms() - 10_000,
            expires_at: Some(now_ms() - 1_000),
            max_uses: None,
            use_count: 0,
            last_used_at: None,
            revoked_at: None,
        })
        .await
        .unwrap();
    let (status, body, _) = enroll(&app, json!({"secret": expired, "client_id": "web-3"})).await;
    assert_eq!(
        (status, code(&body)),
        (401, "enroll_secret_expired"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );
    // Per source address: a burst, then 429 with Retry-After.
    let mut limited = None;
    for _ in 0..20 {
        let (status, body, retry_after) =
            enroll(&app, json!({"secret": "x", "client_id": "web-4"})).await;
        if status == 429 {
            limited = Some((code(&body).to_string(), retry_after));
            break;
        }
    }
    let (code, retry_after) = limited.expect("enrollment is rate limited per address");
    assert_eq!(code, "too_many_requests");
    assert!(retry_after.unwrap().parse::<u64>().unwrap() >= 1);
    // A failed enrollment never created the agent.
    assert_eq!(app.get("/api/v1/agents/web-2").await.0, 404);
}

async fn a_deleted_agent_cannot_reconnect_with_its_old_token(app: TestApp) {
    let token = app.agent_token("gone");
    let bearer = format!("Bearer {token}");
    let mut agent = app
        .connect_with("gone", &[("authorization", &bearer)], "")
        .await
        .expect("connects");
    let (status, _) = app.delete("/api/v1/agents/gone").await;
    assert_eq!(status, 200);
    assert_eq!(agent.closed().await.0, 4002);
    let refused = app
        .connect_with("gone", &[("authorization", &bearer)], "")
        .await
        .err()
        .expect("the old token is refused");
    assert_eq!(refused.0, 401);
    assert!(refused.1.contains("was deleted"), "{}", refused.1);
    assert_eq!(
        app.get("/api/v1/agents/gone").await.0,
        404,
        "not created again"
    );
    // A new token works: the agent can come back when an operator wants it to.
    let (_, minted) = app
        .post("/api/v1/tokens", &json!({"client_id": "gone"}))
        .await;
    let fresh = format!("Bearer {}", minted["token"].as_str().unwrap());
    assert!(
        app.connect_with("gone", &[("authorization", &fresh)], "")
            .await
            .is_ok()
    );
}

const PASSWORD: &str = "correct horse battery staple";

async fn every_change_through_the_api_is_in_the_audit_log(app: TestApp) {
    // Sign-ins, failed and succeeded.
    for password in ["wrong password!", PASSWORD] {
        app.http
            .post(app.url("/api/v1/session"))
            .json(&json!({ "password": password }))
            .send()
            .await
            .unwrap();
    }
    let (_, minted) = app
        .post("/api/v1/tokens", &json!({"client_id": "host-1"}))
        .await;
    let jti = minted["id"].as_str().unwrap().to_string();
    app.command("host-1", "uptime", json!({})).await;
    app.post("/api/v1/agents/host-1/revoke", &json!({})).await;
    app.delete(&format!("/api/v1/tokens/{jti}")).await;
    let (_, secret) = app
        .post("/api/v1/enroll-secrets", &json!({"name": "s"}))
        .await;
    let (status, _, _) = enroll(
        &app,
        json!({"secret": secret["secret"], "client_id": "host-2"}),
    )
    .await;
    assert_eq!(status, 201);
    app.delete(&format!(
        "/api/v1/enroll-secrets/{}",
        secret["id"].as_str().unwrap()
    ))
    .await;
    let binary = app.uploaded("agent", "2.0.0", "linux", "x86_64").await;
    let rollout = app.rollout(json!({"binary_id": binary})).await;
    app.delete(&format!(
        "/api/v1/rollouts/{}",
        rollout["id"].as_str().unwrap()
    ))
    .await;
    app.delete(&format!("/api/v1/binaries/{binary}")).await;
    app.delete("/api/v1/agents/host-1").await;

    let (status, log) = app.get("/api/v1/audit?limit=1000").await;
    assert_eq!(status, 200, "{log}");
    let entries = log["entries"].as_array().unwrap();
    let mut actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    actions.reverse();
    assert_eq!(
        actions,
        vec![
            "sign_in_failed",
            "sign_in_succeeded",
            "token_minted",
            "command_created",
            "agent_revoked",
            "token_revoked",
            "enroll_secret_created",
            "enroll_secret_used",
            "enroll_secret_revoked",
            "binary_uploaded",
            "rollout_created",
            "rollout_cancelled",
            "binary_deleted",
            "agent_deleted",
        ]
    );
    // Actor, source and target of one entry.
    let minted_entry = entries
        .iter()
        .find(|e| e["action"] == "token_minted")
        .unwrap();
    assert_eq!(minted_entry["actor_kind"], "token");
    assert_eq!(minted_entry["actor"], "admin");
    assert_eq!(minted_entry["target"], jti.as_str());
    assert_eq!(minted_entry["source"], "127.0.0.1");
    assert!(minted_entry["at"].is_string());
    let used = entries
        .iter()
        .find(|e| e["action"] == "enroll_secret_used")
        .unwrap();
    assert_eq!(
        (used["actor_kind"].as_str(), used["actor"].as_str()),
        (Some("enroll_secret"), secret["id"].as_str())
    );

    // Filters and pages.
    let (_, only) = app.get("/api/v1/audit?action=token_revoked").await;
    assert_eq!(only["entries"].as_array().unwrap().len(), 1, "{only}");
    let (_, by_actor) = app.get("/api/v1/audit?actor=admin").await;
    assert_eq!(by_actor["entries"].as_array().unwrap().len(), 11);
    let (_, first) = app.get("/api/v1/audit?limit=5").await;
    let next = first["next"].as_str().expect("a next page").to_string();
    let (_, second) = app
        .get(&format!("/api/v1/audit?limit=5&after={next}"))
        .await;
    assert_eq!(
        second["entries"][0]["action"], "enroll_secret_revoked",
        "{second}"
    );
    let (status, body) = app.get("/api/v1/audit?action=dropped_tables").await;
    assert_eq!((status, code(&body)), (400, "invalid_filter"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("token_minted")
    );
    let (status, body) = app.get("/api/v1/audit?limit=0").await;
    assert_eq!((status, code(&body)), (400, "invalid_limit"));
    // Agents may not read it.
    let (status, _) = get_with(&app, "/api/v1/audit", &app.agent_token("host-9")).await;
    assert_eq!(status, 403);
}

/// Redis pub/sub is at-most-once: a revocation whose message never arrived must still
/// close the live session. Here nothing is published at all: the revocations are written
/// to the database directly, and each session closes with 4002 within two heartbeat
/// intervals (the refresh, then the next ping), while an untouched agent stays.
async fn a_revocation_only_the_database_knows_closes_the_live_session_within_two_heartbeats(
    app: TestApp,
) {
    let heartbeat = app.config.heartbeat_interval;
    let mut connected = Vec::new();
    for id in ["quiet-1", "quiet-2", "quiet-3"] {
        let (status, minted) = app.post("/api/v1/tokens", &json!({"client_id": id})).await;
        assert_eq!(status, 201, "{minted}");
        let token = minted["token"].as_str().unwrap().to_string();
        let agent = app
            .connect_with(id, &[("authorization", &format!("Bearer {token}"))], "")
            .await
            .expect("connects");
        connected.push((agent, minted["id"].as_str().unwrap().to_string()));
    }
    let mut connected = connected.into_iter();
    let (mut by_generation, _) = connected.next().unwrap();
    let (mut by_token, jti) = connected.next().unwrap();
    let (mut untouched, _) = connected.next().unwrap();

    let store = &app.state.store;
    let started = Instant::now();
    store.bump_agent_generation("quiet-1".into()).await.unwrap();
    store.revoke_api_token(jti, now_ms()).await.unwrap();
    let bound = heartbeat * 2 + Duration::from_secs(1);
    for agent in [&mut by_generation, &mut by_token] {
        let (code, reason) = tokio::time::timeout(bound, agent.closed())
            .await
            .expect("closed within two heartbeat intervals");
        assert_eq!((code, reason.as_str()), (4002, "credentials revoked"));
    }
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    // The third agent was not revoked: it still gets answers.
    assert!(untouched.until_heartbeat_ack().await.is_empty());
}

async fn check_passes_twice_in_a_row_against_the_same_server(app: TestApp) {
    for run in 1..=2 {
        let outcome = agent_server::cli::check(&app.config, &app.base, WAIT).await;
        assert!(outcome.is_ok(), "run {run}: {outcome:?}");
    }
    let (_, agents) = app.get("/api/v1/agents").await;
    assert_eq!(agents["total"], 0, "check leaves no agent behind: {agents}");
}

/// An enroll secret's labels become its agents', so they follow the label rule of a
/// hello (found by the `labels` fuzz target: "web server" was accepted here, and no job
/// or rollout could name it): every label an agent gets this way can be targeted.
async fn enroll_secret_labels_follow_the_label_rule_so_jobs_can_target_them(app: TestApp) {
    for bad in ["web server", "ü", &"x".repeat(65), " "] {
        let (status, body) = app
            .post(
                "/api/v1/enroll-secrets",
                &json!({"name": "rack", "labels": [bad]}),
            )
            .await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("a label is 1 to 64"), "{message}");
    }
    let (status, created) = app
        .post(
            "/api/v1/enroll-secrets",
            &json!({"name": "rack", "labels": [" region:eu ", "tier/web"]}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let (status, enrolled, _) = enroll(
        &app,
        json!({"secret": created["secret"], "client_id": "eu-1", "hostname": "eu-1"}),
    )
    .await;
    assert_eq!(status, 201, "{enrolled}");
    assert_eq!(enrolled["labels"], json!(["region:eu", "tier/web"]));
    let (status, job) = app
        .post(
            "/api/v1/jobs",
            &json!({"name": "uptime", "target": {"labels": ["region:eu", "tier/web"]}}),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["targeted"], 1, "{job}");
}

on_both_backends! {
    enroll_secret_labels_follow_the_label_rule_so_jobs_can_target_them;
    enrollment_gives_a_working_token_and_each_refusal_says_why;
    a_deleted_agent_cannot_reconnect_with_its_old_token;
    every_change_through_the_api_is_in_the_audit_log
        with ["ADMIN_PASSWORD" = "correct horse battery staple"];
    check_passes_twice_in_a_row_against_the_same_server;
    a_revocation_only_the_database_knows_closes_the_live_session_within_two_heartbeats
        with ["WS_HEARTBEAT_INTERVAL" = "1", "WS_OFFLINE_TIMEOUT" = "10"];
}
