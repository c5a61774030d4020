//! Fleet updates: the desired version per os/arch, `update` messages, pacing, progress.

use futures_util::future::{join_all, select_all};
use serde_json::{Value, json};

use crate::helpers::*;

fn updates(messages: &[Value]) -> Vec<&Value> {
    messages.iter().filter(|m| m["type"] == "update").collect()
}

async fn progress(app: &TestApp, rollout: &Value) -> Value {
    let (status, body) = app
        .get(&format!(
            "/api/v1/rollouts/{}",
            rollout["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    body["progress"].clone()
}

async fn connected_agent_on_an_older_version_is_told_to_update_when_a_rollout_starts(app: TestApp) {
    let mut agent = app.connect_as("web-1", "2.4.0", &[]).await;
    assert!(updates(&agent.until_heartbeat_ack().await).is_empty());
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let rollout = app.rollout(json!({"binary_id": binary})).await;

    let update = agent.recv_type("update").await;
    let (_, meta) = app.get(&format!("/api/v1/binaries/{binary}")).await;
    assert_eq!(update["version"], "2.5.0");
    assert_eq!(update["binary_id"], binary.as_str());
    assert_eq!(update["rollout_id"], rollout["id"]);
    assert_eq!(update["sha256"], meta["sha256"]);
    assert_eq!(update["size"], meta["size_bytes"]);
    let url = update["url"].as_str().unwrap();
    assert_eq!(
        url,
        format!("https://agents.example.com/api/v1/binaries/{binary}/download"),
        "absolute, under SERVER_URL"
    );
    // The agent fetches it with its own token.
    let path = url.trim_start_matches("https://agents.example.com");
    let resp = app
        .http
        .get(app.url(path))
        .bearer_auth(app.agent_token("web-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    let p = progress(&app, &rollout).await;
    assert_eq!(
        (p["targeted"].as_i64(), p["updating"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(p["updating_agents"], json!(["web-1"]));

    // Back on the new version: the update is complete.
    drop(agent);
    let mut agent = app.connect_as("web-1", "2.5.0", &[]).await;
    assert!(updates(&agent.until_heartbeat_ack().await).is_empty());
    let p = progress(&app, &rollout).await;
    assert_eq!(
        (
            p["updated"].as_i64(),
            p["updating"].as_i64(),
            p["up_to_date"].as_i64()
        ),
        (Some(1), Some(0), Some(1))
    );
    assert_eq!(p["complete"], true);
}

async fn agent_connecting_later_is_told_to_update_right_after_its_hello(app: TestApp) {
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    app.rollout(json!({"binary_id": binary})).await;
    let mut agent = app.connect_as("late", "2.4.1", &[]).await;
    let before = agent.until_heartbeat_ack().await;
    let got = updates(&before);
    assert_eq!(got.len(), 1, "{before:?}");
    assert_eq!(got[0]["version"], "2.5.0");
}

async fn agents_on_the_target_version_or_newer_or_another_platform_are_left_alone(app: TestApp) {
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let rollout = app.rollout(json!({"binary_id": binary})).await;
    let mut same = app.connect_as("same", "2.5.0", &[]).await;
    let mut newer = app.connect_as("newer", "2.10.0", &[]).await;
    let mut unknown = app.connect("unknown").await;
    unknown
        .send(json!({"type": "hello", "os": "linux", "arch": "x86_64"}))
        .await;
    let mut arm = app.connect("arm").await;
    arm.send(json!({"type": "hello", "version": "1.0.0", "os": "linux", "arch": "aarch64"}))
        .await;
    for agent in [&mut same, &mut newer, &mut unknown, &mut arm] {
        assert!(updates(&agent.until_heartbeat_ack().await).is_empty());
    }
    let p = progress(&app, &rollout).await;
    assert_eq!(
        (
            p["targeted"].as_i64(),
            p["up_to_date"].as_i64(),
            p["unknown_version"].as_i64(),
            p["waiting"].as_i64()
        ),
        (Some(3), Some(2), Some(1), Some(0))
    );
}

async fn rollout_is_paced_and_the_next_agent_goes_when_one_comes_back_updated(app: TestApp) {
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let rollout = app
        .rollout(json!({"binary_id": binary, "max_concurrent": 2}))
        .await;
    // Five agents connect at once: their claims race for the two slots.
    let app = &app;
    let mut agents = join_all(
        (0..5).map(|i| async move { app.connect_as(&format!("fleet-{i}"), "2.4.0", &[]).await }),
    )
    .await;
    let mut told = Vec::new();
    let mut waiting = Vec::new();
    for (i, agent) in agents.iter_mut().enumerate() {
        if updates(&agent.until_heartbeat_ack().await).is_empty() {
            waiting.push(i);
        } else {
            told.push(i);
        }
    }
    assert_eq!(told.len(), 2, "at most max_concurrent updating at once");
    let p = progress(app, &rollout).await;
    assert_eq!(
        (
            p["targeted"].as_i64(),
            p["updating"].as_i64(),
            p["waiting"].as_i64()
        ),
        (Some(5), Some(2), Some(3))
    );

    // One comes back on 2.5.0: its slot goes to one of the waiting agents.
    let done = told[0];
    let mut back = app.connect_as(&format!("fleet-{done}"), "2.5.0", &[]).await;
    back.until_heartbeat_ack().await;
    let mut rest: Vec<&mut Agent> = agents
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| waiting.contains(i))
        .map(|(_, a)| a)
        .collect();
    let (update, _, _) = select_all(rest.iter_mut().map(|a| Box::pin(a.recv_type("update")))).await;
    assert_eq!(update["version"], "2.5.0");
    let p = progress(app, &rollout).await;
    assert_eq!(
        (
            p["updated"].as_i64(),
            p["updating"].as_i64(),
            p["waiting"].as_i64()
        ),
        (Some(1), Some(2), Some(2))
    );
}

async fn rollout_for_a_label_or_a_percentage_reaches_only_those_agents(app: TestApp) {
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    app.rollout(json!({"binary_id": binary, "label": "canary"}))
        .await;
    let mut canary = app.connect_as("c-1", "2.4.0", &["canary", "eu"]).await;
    let mut plain = app.connect_as("p-1", "2.4.0", &["eu"]).await;
    assert_eq!(updates(&canary.until_heartbeat_ack().await).len(), 1);
    assert!(updates(&plain.until_heartbeat_ack().await).is_empty());

    let other = app.uploaded("agent", "2.6.0", "linux", "x86_64").await;
    app.rollout(json!({"binary_id": other, "percentage": 30, "max_concurrent": 100}))
        .await;
    let mut told = Vec::new();
    for i in 0..20 {
        let id = format!("pct-{i}");
        let mut agent = app.connect_as(&id, "2.4.0", &[]).await;
        if !updates(&agent.until_heartbeat_ack().await).is_empty() {
            told.push(id);
        }
    }
    let expected: Vec<String> = (0..20)
        .map(|i| format!("pct-{i}"))
        .filter(|id| agent_server::binaries::rollout::selected(&other, id, 30))
        .collect();
    assert_eq!(told, expected);
    assert!(!told.is_empty() && told.len() < 20);
}

async fn update_that_never_completes_times_out_and_frees_its_slot(app: TestApp) {
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let rollout = app
        .rollout(json!({"binary_id": binary, "max_concurrent": 1}))
        .await;
    let mut first = app.connect_as("stuck", "2.4.0", &[]).await;
    assert_eq!(updates(&first.until_heartbeat_ack().await).len(), 1);
    let mut second = app.connect_as("next", "2.4.0", &[]).await;
    assert!(updates(&second.until_heartbeat_ack().await).is_empty());
    // ROLLOUT_UPDATE_TIMEOUT later the slot is free and goes to the waiting agent.
    second.recv_type("update").await;
    let p = progress(&app, &rollout).await;
    assert_eq!(
        (p["timed_out"].as_i64(), p["updating"].as_i64()),
        (Some(1), Some(1))
    );
    // A timed-out agent is not asked again by this rollout.
    drop(first);
    let mut again = app.connect_as("stuck", "2.4.0", &[]).await;
    assert!(updates(&again.until_heartbeat_ack().await).is_empty());
}

async fn agent_that_reconnects_without_updating_is_told_again(app: TestApp) {
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let rollout = app
        .rollout(json!({"binary_id": binary, "max_concurrent": 1}))
        .await;
    let mut agent = app.connect_as("retry", "2.4.0", &[]).await;
    assert_eq!(updates(&agent.until_heartbeat_ack().await).len(), 1);
    agent.kill();
    let mut agent = app.connect_as("retry", "2.4.0", &[]).await;
    let again = agent.until_heartbeat_ack().await;
    assert_eq!(
        updates(&again).len(),
        1,
        "the same update, on the new connection"
    );
    assert_eq!(updates(&again)[0]["rollout_id"], rollout["id"]);
    assert_eq!(progress(&app, &rollout).await["updating"], 1);
}

async fn the_rollout_target_cannot_be_deleted_until_the_rollout_is_cancelled(app: TestApp) {
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let rollout = app.rollout(json!({"binary_id": binary})).await;
    let (status, body) = app.delete(&format!("/api/v1/binaries/{binary}")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("rollout_target"))
    );
    let id = rollout["id"].as_str().unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains(id));
    let (status, cancelled) = app.delete(&format!("/api/v1/rollouts/{id}")).await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled"))
    );
    // Cancelled: agents are no longer told to update.
    let mut agent = app.connect_as("after", "2.4.0", &[]).await;
    assert!(updates(&agent.until_heartbeat_ack().await).is_empty());
    let (status, _) = app.delete(&format!("/api/v1/binaries/{binary}")).await;
    assert_eq!(status, 200);
}

async fn a_new_rollout_supersedes_the_previous_one_for_the_same_platform(app: TestApp) {
    let v25 = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let v26 = app.uploaded("agent", "2.6.0", "linux", "x86_64").await;
    let first = app.rollout(json!({"binary_id": v25})).await;
    let second = app.rollout(json!({"binary_id": v26})).await;
    let (_, list) = app.get("/api/v1/rollouts").await;
    let status_of = |id: &Value| {
        list["rollouts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == *id)
            .map(|r| r["status"].clone())
    };
    assert_eq!(status_of(&first["id"]), Some(json!("superseded")));
    assert_eq!(status_of(&second["id"]), Some(json!("active")));
    let mut agent = app.connect_as("up", "2.5.0", &[]).await;
    let got = agent.until_heartbeat_ack().await;
    assert_eq!(updates(&got)[0]["version"], "2.6.0");
}

async fn invalid_rollout_requests_get_clear_errors(app: TestApp) {
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    for (body, status, code) in [
        (json!({"binary_id": "nope"}), 404, "not_found"),
        (
            json!({"binary_id": binary, "percentage": 0}),
            400,
            "invalid_rollout",
        ),
        (
            json!({"binary_id": binary, "max_concurrent": 0}),
            400,
            "invalid_rollout",
        ),
        (
            json!({"binary_id": binary, "label": "has space"}),
            400,
            "invalid_rollout",
        ),
        (
            json!({"binary_id": binary, "percent": 5}),
            400,
            "invalid_json",
        ),
    ] {
        let (got, resp) = app.post("/api/v1/rollouts", &body).await;
        assert_eq!(
            (got, resp["error"]["code"].as_str()),
            (status, Some(code)),
            "{body} -> {resp}"
        );
    }
}

async fn invalid_labels_in_a_hello_are_refused_and_the_session_continues(app: TestApp) {
    let mut agent = app.connect_as("labelled", "1.0.0", &["ok", "not ok"]).await;
    let before = agent.until_heartbeat_ack().await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["type"], "error");
    assert!(before[0]["message"].as_str().unwrap().contains("not ok"));
}

fn update_result(rollout: &Value, version: &str, status: &str, error: Option<&str>) -> Value {
    let mut msg = json!({
        "type": "update_result", "rollout_id": rollout["id"], "version": version, "status": status,
    });
    if let Some(e) = error {
        msg["error"] = json!(e);
    }
    msg
}

async fn failed_update_is_counted_with_its_reason_and_frees_the_slot(app: TestApp) {
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let rollout = app
        .rollout(json!({"binary_id": binary, "max_concurrent": 1}))
        .await;
    let mut first = app.connect_as("bad-host", "2.4.0", &[]).await;
    assert_eq!(updates(&first.until_heartbeat_ack().await).len(), 1);
    let mut second = app.connect_as("next-host", "2.4.0", &[]).await;
    assert!(updates(&second.until_heartbeat_ack().await).is_empty());

    // The agent reports the failure; the server acknowledges it with the rollout's id.
    first
        .send(update_result(
            &rollout,
            "2.5.0",
            "failed",
            Some("self-check: the build exited with status 1"),
        ))
        .await;
    let ack = first.recv_type("ack").await;
    assert_eq!(ack["id"], rollout["id"]);
    // Its slot goes to the waiting agent at once.
    second.recv_type("update").await;
    let p = progress(&app, &rollout).await;
    assert_eq!(
        (p["failed"].as_i64(), p["updating"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(p["recent_failures"][0]["agent_id"], "bad-host");
    assert_eq!(p["recent_failures"][0]["from_version"], "2.4.0");
    assert_eq!(
        p["recent_failures"][0]["error"],
        "self-check: the build exited with status 1"
    );
    // Reported again (after a reconnect) it is acknowledged and changes nothing; and a
    // failed agent is not asked again by this rollout.
    drop(first);
    let mut again = app.connect("bad-host").await;
    again
        .send(update_result(&rollout, "2.5.0", "failed", None))
        .await;
    assert_eq!(again.recv_type("ack").await["id"], rollout["id"]);
    again
        .send(json!({"type": "hello", "version": "2.4.0", "os": "linux", "arch": "x86_64"}))
        .await;
    assert!(updates(&again.until_heartbeat_ack().await).is_empty());
    assert_eq!(progress(&app, &rollout).await["failed"], 1);
}

async fn update_result_ok_completes_the_update(app: TestApp) {
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let rollout = app.rollout(json!({"binary_id": binary})).await;
    let mut agent = app.connect_as("good", "2.4.0", &[]).await;
    assert_eq!(updates(&agent.until_heartbeat_ack().await).len(), 1);
    drop(agent);
    let mut agent = app.connect("good").await;
    agent
        .send(update_result(&rollout, "2.5.0", "ok", None))
        .await;
    assert_eq!(agent.recv_type("ack").await["id"], rollout["id"]);
    let p = progress(&app, &rollout).await;
    assert_eq!(
        (p["updated"].as_i64(), p["updating"].as_i64()),
        (Some(1), Some(0))
    );
}

async fn failure_brake_pauses_the_rollout_and_nobody_else_is_offered_the_build(app: TestApp) {
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let rollout = app
        .rollout(json!({
            "binary_id": binary, "max_concurrent": 2,
            "max_failure_ratio": 0.5, "min_sample": 2,
        }))
        .await;
    assert_eq!(rollout["max_failure_ratio"], 0.5);
    assert_eq!(rollout["min_sample"], 2);
    let id = rollout["id"].as_str().unwrap();
    let mut a = app.connect_as("brake-a", "2.4.0", &[]).await;
    let mut b = app.connect_as("brake-b", "2.4.0", &[]).await;
    assert_eq!(updates(&a.until_heartbeat_ack().await).len(), 1);
    assert_eq!(updates(&b.until_heartbeat_ack().await).len(), 1);
    let mut waiting = app.connect_as("brake-c", "2.4.0", &[]).await;
    assert!(updates(&waiting.until_heartbeat_ack().await).is_empty());

    // One failure of one finished: below the sample, the freed slot goes on.
    a.send(update_result(
        &rollout,
        "2.5.0",
        "failed",
        Some("rolled back: no welcome within 120 s"),
    ))
    .await;
    a.recv_type("ack").await;
    waiting.recv_type("update").await;
    // A second failure: 2 of 2 finished failed, above 0.5: paused, with the reason.
    b.send(update_result(
        &rollout,
        "2.5.0",
        "failed",
        Some("rolled back"),
    ))
    .await;
    b.recv_type("ack").await;
    let (_, paused) = app.get(&format!("/api/v1/rollouts/{id}")).await;
    assert_eq!(paused["status"], "paused", "{paused}");
    let reason = paused["reason"].as_str().unwrap();
    assert!(reason.contains("2 of 2 updates failed"), "{reason}");

    // Paused: an agent that needs the build is not offered it, neither on its hello nor
    // when a slot frees.
    let mut late = app.connect_as("brake-d", "2.4.0", &[]).await;
    assert!(updates(&late.until_heartbeat_ack().await).is_empty());
    drop(waiting);
    let mut updated = app.connect_as("brake-c", "2.5.0", &[]).await;
    updated.until_heartbeat_ack().await;
    assert!(updates(&late.until_heartbeat_ack().await).is_empty());
    assert_eq!(progress(&app, &rollout).await["waiting"], 1);

    // Resumed, the sample starts again: the waiting agent is offered the build.
    let (status, resumed) = app
        .post(&format!("/api/v1/rollouts/{id}/resume"), &json!({}))
        .await;
    assert_eq!((status, resumed["status"].as_str()), (200, Some("active")));
    assert_eq!(resumed["reason"], Value::Null);
    late.recv_type("update").await;
    let (status, again) = app
        .post(&format!("/api/v1/rollouts/{id}/resume"), &json!({}))
        .await;
    assert_eq!(
        (status, again["error"]["code"].as_str()),
        (409, Some("rollout_state"))
    );

    // The audit log names the resume.
    let (_, audit) = app.get("/api/v1/audit?action=rollout_resumed").await;
    assert_eq!(audit["entries"][0]["target"], id, "{audit}");
}

async fn an_operator_pauses_and_resumes_a_rollout(app: TestApp) {
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let rollout = app.rollout(json!({"binary_id": binary})).await;
    let id = rollout["id"].as_str().unwrap();
    let (status, paused) = app
        .post(&format!("/api/v1/rollouts/{id}/pause"), &json!({}))
        .await;
    assert_eq!((status, paused["status"].as_str()), (200, Some("paused")));
    assert_eq!(paused["reason"], "paused by an operator");
    let mut agent = app.connect_as("held", "2.4.0", &[]).await;
    assert!(updates(&agent.until_heartbeat_ack().await).is_empty());
    // A paused rollout is still its platform's: its binary cannot be deleted.
    let (status, _) = app.delete(&format!("/api/v1/binaries/{binary}")).await;
    assert_eq!(status, 409);
    let (status, _) = app
        .post(&format!("/api/v1/rollouts/{id}/resume"), &json!({}))
        .await;
    assert_eq!(status, 200);
    agent.recv_type("update").await;
    let (status, _) = app.post("/api/v1/rollouts/nope/pause", &json!({})).await;
    assert_eq!(status, 404);
}

async fn a_rollback_needs_allow_downgrade_and_reaches_newer_agents(app: TestApp) {
    let v25 = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let v24 = app.uploaded("agent", "2.4.0", "linux", "x86_64").await;
    app.rollout(json!({"binary_id": v25})).await;
    let (status, refused) = app
        .post("/api/v1/rollouts", &json!({"binary_id": v24}))
        .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (400, Some("invalid_rollout"))
    );
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("allow_downgrade"), "{message}");

    let rollback = app
        .rollout(json!({"binary_id": v24, "allow_downgrade": true}))
        .await;
    assert_eq!(rollback["allow_downgrade"], true);
    let mut newer = app.connect_as("on-25", "2.5.0", &[]).await;
    let got = newer.until_heartbeat_ack().await;
    let got = updates(&got);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["version"], "2.4.0");
    assert_eq!(got[0]["allow_downgrade"], true);
    let mut same = app.connect_as("on-24", "2.4.0", &[]).await;
    assert!(updates(&same.until_heartbeat_ack().await).is_empty());
    // Back on 2.4.0: done.
    drop(newer);
    let mut back = app.connect_as("on-25", "2.4.0", &[]).await;
    back.until_heartbeat_ack().await;
    assert_eq!(progress(&app, &rollback).await["updated"], 1);
}

async fn a_version_1_agent_still_completes_its_update_by_its_hello(app: TestApp) {
    // No update_result: the hello on the new version is all a version-1 agent says.
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let rollout = app.rollout(json!({"binary_id": binary})).await;
    let mut agent = app.connect_as("v1-agent", "2.4.0", &[]).await;
    let offered = agent.until_heartbeat_ack().await;
    assert!(
        updates(&offered)[0].get("allow_downgrade").is_none(),
        "absent unless a rollback: {offered:?}"
    );
    drop(agent);
    let mut agent = app.connect_as("v1-agent", "2.5.0", &[]).await;
    agent.until_heartbeat_ack().await;
    assert_eq!(progress(&app, &rollout).await["updated"], 1);
}

async fn timeouts_count_against_the_brake(app: TestApp) {
    let binary = app.uploaded("agent", "2.5.0", "linux", "x86_64").await;
    let rollout = app
        .rollout(json!({
            "binary_id": binary, "max_concurrent": 1,
            "max_failure_ratio": 0.0, "min_sample": 1,
        }))
        .await;
    let id = rollout["id"].as_str().unwrap();
    let mut stuck = app.connect_as("silent", "2.4.0", &[]).await;
    assert_eq!(updates(&stuck.until_heartbeat_ack().await).len(), 1);
    let mut next = app.connect_as("after-silent", "2.4.0", &[]).await;
    let paused = app
        .eventually(&format!("/api/v1/rollouts/{id}"), |r| {
            r["status"] == "paused"
        })
        .await;
    assert_eq!(paused["progress"]["timed_out"], 1);
    assert!(updates(&next.until_heartbeat_ack().await).is_empty());
}

on_both_backends! {
    failed_update_is_counted_with_its_reason_and_frees_the_slot;
    failure_brake_pauses_the_rollout_and_nobody_else_is_offered_the_build;
    timeouts_count_against_the_brake
        with ["ROLLOUT_UPDATE_TIMEOUT" = "1s", "ROLLOUT_CHECK_INTERVAL" = "100ms"];
    connected_agent_on_an_older_version_is_told_to_update_when_a_rollout_starts;
    agent_connecting_later_is_told_to_update_right_after_its_hello;
    rollout_is_paced_and_the_next_agent_goes_when_one_comes_back_updated;
    update_that_never_completes_times_out_and_frees_its_slot
        with ["ROLLOUT_UPDATE_TIMEOUT" = "1s", "ROLLOUT_CHECK_INTERVAL" = "100ms"];
    the_rollout_target_cannot_be_deleted_until_the_rollout_is_cancelled;
    rollout_for_a_label_or_a_percentage_reaches_only_those_agents;
}

on_sqlite! {
    update_result_ok_completes_the_update;
    an_operator_pauses_and_resumes_a_rollout;
    a_rollback_needs_allow_downgrade_and_reaches_newer_agents;
    a_version_1_agent_still_completes_its_update_by_its_hello;
    agents_on_the_target_version_or_newer_or_another_platform_are_left_alone;
    agent_that_reconnects_without_updating_is_told_again;
    a_new_rollout_supersedes_the_previous_one_for_the_same_platform;
    invalid_rollout_requests_get_clear_errors;
    invalid_labels_in_a_hello_are_refused_and_the_session_continues;
}
