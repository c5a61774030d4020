//! Fleet jobs over HTTP, with each replica's own pacer running (as in production):
//! create → delivered → results, bad targets and no match, pause/resume/cancel with
//! their conflicts, and the live `job` events. The rules themselves (targeting, pacing,
//! canary, brake, TTL) are specified below HTTP in `jobs.rs`.

use serde_json::{Value, json};

use crate::helpers::{Agent, TestApp, on_both_backends};

/// Answers the next command with `status` and waits for the ack (stored by then).
async fn answer(agent: &mut Agent, status: &str, output: Value) -> String {
    let cmd = agent.recv_type("command").await;
    let id = cmd["id"].as_str().unwrap().to_string();
    agent.result(&id, status, output).await;
    let ack = agent.recv_type("ack").await;
    assert_eq!(ack["id"], id.as_str());
    id
}

async fn read_until(resp: &mut reqwest::Response, seen: &mut String, text: &str) {
    let deadline = tokio::time::Instant::now() + crate::helpers::WAIT;
    while !seen.contains(text) {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("no `{text}` in time; got:\n{seen}"))
            .unwrap()
            .expect("the stream stays open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

async fn a_job_is_delivered_to_every_matching_agent_and_its_results_are_listed(app: TestApp) {
    let mut events = app
        .http
        .get(app.url("/api/v1/events"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    read_until(&mut events, &mut seen, "event: ready").await;

    let mut gpu = Vec::new();
    for id in ["gpu-1", "gpu-2", "gpu-3"] {
        let mut a = app.connect_as(id, "2.0.0", &["gpu", "rack-a3"]).await;
        a.until_heartbeat_ack().await;
        gpu.push(a);
    }
    let mut other = app.connect_as("cpu-1", "2.0.0", &["rack-a3"]).await;
    other.until_heartbeat_ack().await;

    let resp = app
        .http
        .post(app.url("/api/v1/jobs"))
        .bearer_auth(&app.admin)
        .json(&json!({
            "name": "restart-collector",
            "args": {"unit": "collector"},
            "target": {"labels": ["gpu", "rack-a3"]},
            "max_in_flight": 2,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let job: Value = resp.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/api/v1/jobs/{id}"));
    assert_eq!(job["targeted"], 3);
    assert_eq!(job["status"], "running");
    assert_eq!(job["max_in_flight"], 2);
    read_until(
        &mut events,
        &mut seen,
        &format!("event: job\ndata: {{\"id\":\"{id}\"}}"),
    )
    .await;

    for (i, agent) in gpu.iter_mut().enumerate() {
        let status = if i == 2 { "error" } else { "ok" };
        answer(agent, status, json!({"stdout": format!("restarted {i}")})).await;
    }
    let done = app
        .eventually(&format!("/api/v1/jobs/{id}"), |j| {
            j["status"] == "completed"
        })
        .await;
    assert_eq!(done["counts"]["succeeded"], 2, "{done}");
    assert_eq!(done["counts"]["failed"], 1, "{done}");
    // Completion is announced too, so a live view needs no polling.
    read_until(&mut events, &mut seen, "event: job").await;

    let (status, page) = app
        .get(&format!("/api/v1/jobs/{id}/results?status=succeeded"))
        .await;
    assert_eq!(status, 200, "{page}");
    let results = page["results"].as_array().unwrap();
    let agents: Vec<&str> = results
        .iter()
        .map(|r| r["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(agents, ["gpu-1", "gpu-2"]);
    assert_eq!(results[0]["output"]["stdout"], "restarted 0");
    assert!(results[0]["duration_ms"].as_i64().unwrap() >= 0);
    let (_, failed) = app
        .get(&format!("/api/v1/jobs/{id}/results?status=failed"))
        .await;
    assert_eq!(failed["results"][0]["agent_id"], "gpu-3");
    let (_, first) = app.get(&format!("/api/v1/jobs/{id}/results?limit=1")).await;
    assert_eq!(first["next"], "gpu-1");
    let (_, second) = app
        .get(&format!("/api/v1/jobs/{id}/results?limit=1&after=gpu-1"))
        .await;
    assert_eq!(second["results"][0]["agent_id"], "gpu-2");

    // Each agent's command is an ordinary command, in its history.
    let (_, history) = app.get("/api/v1/agents/gpu-1/commands").await;
    assert_eq!(
        history["commands"][0]["name"], "restart-collector",
        "{history}"
    );

    let (status, list) = app.get("/api/v1/jobs?status=completed").await;
    assert_eq!(status, 200);
    assert_eq!(list["jobs"][0]["id"], id.as_str());
    let (_, none) = app.get("/api/v1/jobs?status=running").await;
    assert_eq!(none["jobs"], json!([]));
}

async fn bad_requests_are_400_naming_the_problem_and_no_match_is_422(app: TestApp) {
    let mut a = app.connect_as("only-1", "2.0.0", &["db"]).await;
    a.until_heartbeat_ack().await;
    let post = |body: Value| {
        let app = &app;
        async move { app.post("/api/v1/jobs", &body).await }
    };
    let (status, body) = post(json!({"name": "x", "target": {}})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_target")),
        "{body}"
    );
    let (status, body) = post(json!({"name": "x", "target": {"labels": []}})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_target")),
        "{body}"
    );
    let (status, body) = post(json!({"name": "x", "target": {"rack": "a3"}})).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`rack`"),
        "{body}"
    );
    let (status, body) = post(json!({"name": "x", "target": {"os": "linux"}, "paralel": 5})).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`paralel`"),
        "{body}"
    );
    let (status, body) =
        post(json!({"name": "x", "target": {"os": "linux"}, "max_in_flight": 0})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_job")),
        "{body}"
    );
    let (status, body) = post(json!({"name": "", "target": {"os": "linux"}})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_job")),
        "{body}"
    );

    let (status, body) = post(json!({"name": "x", "target": {"labels": ["gpu"]}})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("no_agents_match")),
        "{body}"
    );
    let (_, list) = app.get("/api/v1/jobs").await;
    assert_eq!(list["jobs"], json!([]), "nothing stored for a refused job");

    let (status, body) = app.get("/api/v1/jobs/no-such-job").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = app.get("/api/v1/jobs?status=sleeping").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_job"))
    );

    let resp = app
        .http
        .post(app.url("/api/v1/jobs"))
        .bearer_auth(app.agent_token("only-1"))
        .json(&json!({"name": "x", "target": {"labels": ["db"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403, "agents cannot start jobs");
}

async fn pause_resume_and_cancel_answer_the_new_status_or_409(app: TestApp) {
    let mut agents = Vec::new();
    for id in ["slow-1", "slow-2", "slow-3"] {
        let mut a = app.connect_as(id, "2.0.0", &["slow"]).await;
        a.until_heartbeat_ack().await;
        agents.push(a);
    }
    let (status, job) = app
        .post(
            "/api/v1/jobs",
            &json!({"name": "sleep", "target": {"labels": ["slow"]}, "max_in_flight": 1}),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let path = |action: &str| format!("/api/v1/jobs/{id}/{action}");
    app.eventually(&format!("/api/v1/jobs/{id}"), |j| {
        j["counts"]["delivered"] == 1
    })
    .await;

    let (status, body) = app.post(&path("resume"), &json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("job_state")),
        "{body}"
    );
    let (status, body) = app.post(&path("pause"), &json!({})).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("paused")),
        "{body}"
    );
    assert_eq!(body["reason"], "paused by an operator");
    let (status, body) = app.post(&path("pause"), &json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("job_state")),
        "{body}"
    );
    let (status, body) = app.post(&path("resume"), &json!({})).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("running")),
        "{body}"
    );
    let (status, body) = app.post(&path("cancel"), &json!({})).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("cancelled")),
        "{body}"
    );
    assert_eq!(
        body["counts"]["cancelled"], 2,
        "the two not yet delivered: {body}"
    );
    for action in ["cancel", "pause", "resume"] {
        let (status, body) = app.post(&path(action), &json!({})).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (409, Some("job_state")),
            "{action}: {body}"
        );
    }
    let (status, _) = app
        .post("/api/v1/jobs/no-such-job/cancel", &json!({}))
        .await;
    assert_eq!(status, 404);
    let (status, _) = app.get(&path("cancel")).await;
    assert_eq!(status, 405);

    // Each accepted action is in the audit log, with the job as its target; refusals are not.
    let (status, log) = app.get("/api/v1/audit?limit=100").await;
    assert_eq!(status, 200, "{log}");
    let actions: Vec<&str> = log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["target"] == json!(id))
        .filter_map(|e| e["action"].as_str())
        .collect();
    for action in ["job_created", "job_paused", "job_resumed", "job_cancelled"] {
        assert!(
            actions.contains(&action),
            "{action} missing from {actions:?}"
        );
    }
}

on_both_backends! {
    a_job_is_delivered_to_every_matching_agent_and_its_results_are_listed;
    bad_requests_are_400_naming_the_problem_and_no_match_is_422;
    pause_resume_and_cancel_answer_the_new_status_or_409;
}
