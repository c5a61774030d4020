//! Self-update, end to end: real agent builds of two versions (`AGENT_VERSION` 1.0.0 and
//! 1.1.0, from this workspace), the real server, a rollout through its API.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{
    Agent, AgentSpec, CutProxy, Server, WAIT, agent_build, on_both_backends, script,
};

on_both_backends! {
    an_agent_updates_itself_resuming_a_cut_download_and_the_rollout_counts_it;
    a_build_that_exits_at_once_is_refused_by_its_self_check_and_counted_failed;
    a_build_that_cannot_connect_is_rolled_back_within_the_bound;
    enough_failures_pause_the_rollout_and_the_rest_are_not_offered_the_build;
}

/// A host running the 1.0.0 build from an executable of its own (the file an update
/// replaces), with its own state directory.
struct Host {
    exe: PathBuf,
    state_dir: PathBuf,
    agent: Agent,
}

async fn host(
    server: &Server,
    id: &str,
    server_url: &str,
    env: Vec<(&'static str, String)>,
) -> Host {
    let dir = server.dir.path().join(id);
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let exe = dir.join("bin").join("agent");
    std::fs::copy(agent_build("1.0.0"), &exe).unwrap();
    let state_dir = dir.join("state");
    let token = server.agent_token(id).await;
    let agent = Agent::start_from(
        &exe,
        server_url,
        AgentSpec {
            client_id: id,
            token: Some(&token),
            state_dir: &state_dir,
            env,
        },
    );
    Host {
        exe,
        state_dir,
        agent,
    }
}

async fn reports(server: &Server, id: &str, version: &str) -> Value {
    server
        .eventually(&format!("/api/v1/agents/{id}"), |a| {
            a["online"] == true && a["version"] == version
        })
        .await
}

async fn rollout_where(server: &Server, rollout: &Value, check: impl Fn(&Value) -> bool) -> Value {
    let id = rollout["id"].as_str().unwrap();
    server
        .eventually(&format!("/api/v1/rollouts/{id}"), check)
        .await
}

/// Passes its self-check as 1.1.0, then never connects.
fn silent_build(dir: &Path) -> Vec<u8> {
    let path = dir.join("silent-1.1.0");
    script(
        &path,
        "#!/bin/sh\nif [ \"$1\" = --self-check ]; then echo 1.1.0; exit 0; fi\nexec sleep 600\n",
    );
    std::fs::read(path).unwrap()
}

const EXITS_AT_ONCE: &[u8] = b"#!/bin/sh\necho 'cannot load libfoo.so' >&2\nexit 3\n";

async fn an_agent_updates_itself_resuming_a_cut_download_and_the_rollout_counts_it(server: Server) {
    let new_build = std::fs::read(agent_build("1.1.0")).unwrap();
    // The first download is cut after 1 MiB of its response.
    let proxy = CutProxy::start(server.port, 1 << 20).await;
    let h = host(&server, "upd-1", &proxy.ws_url(), vec![]).await;
    reports(&server, "upd-1", "1.0.0").await;
    let pid = h.agent.pid();

    let binary = server.upload_build("1.1.0", new_build.clone()).await;
    let (status, rollout) = server
        .post("/api/v1/rollouts", &json!({"binary_id": binary}))
        .await;
    assert_eq!(status, 201, "{rollout}");

    let done = rollout_where(&server, &rollout, |r| r["progress"]["updated"] == 1).await;
    assert_eq!(done["progress"]["failed"], 0, "{done}");
    reports(&server, "upd-1", "1.1.0").await;
    // The same process, now the new build; the previous one is kept beside it.
    assert_eq!(h.agent.pid(), pid);
    assert!(
        std::fs::read(&h.exe).unwrap() == new_build,
        "the executable is the new build"
    );
    let previous = h.exe.with_file_name("agent.previous");
    assert!(
        std::fs::read(&previous).unwrap() == std::fs::read(agent_build("1.0.0")).unwrap(),
        "the previous build is kept"
    );
    // The cut download was resumed with a Range, not started again.
    let downloads = proxy.downloads.lock().unwrap().clone();
    assert_eq!(downloads.len(), 2, "{downloads:?}");
    let resumed = downloads[1].to_ascii_lowercase();
    assert!(resumed.contains("range: bytes="), "{resumed}");
    assert!(!resumed.contains("range: bytes=0-"), "{resumed}");
    h.agent.log.shows("resuming the download").await;
    h.agent.log.shows("update complete").await;
    // The outcome was acknowledged and forgotten; the new build runs commands.
    wait_until_gone(&h.state_dir.join("update").join("update.json")).await;
    let ping = server.command("upd-1", "ping", json!({})).await;
    assert_eq!(server.finished(&ping).await["status"], "succeeded");
}

async fn a_build_that_exits_at_once_is_refused_by_its_self_check_and_counted_failed(
    server: Server,
) {
    let h = host(&server, "upd-2", &server.ws_url(), vec![]).await;
    reports(&server, "upd-2", "1.0.0").await;
    let pid = h.agent.pid();
    let binary = server.upload_build("1.1.0", EXITS_AT_ONCE.to_vec()).await;
    let (_, rollout) = server
        .post("/api/v1/rollouts", &json!({"binary_id": binary}))
        .await;

    let failed = rollout_where(&server, &rollout, |r| r["progress"]["failed"] == 1).await;
    let error = failed["progress"]["recent_failures"][0]["error"]
        .as_str()
        .unwrap();
    assert!(error.contains("self-check"), "{error}");
    assert!(
        error.contains("status 3") && error.contains("libfoo"),
        "{error}"
    );
    // Nothing was switched: same process, same build, still connected.
    assert_eq!(h.agent.pid(), pid);
    assert!(std::fs::read(&h.exe).unwrap() == std::fs::read(agent_build("1.0.0")).unwrap());
    assert!(!h.exe.with_file_name("agent.previous").exists());
    reports(&server, "upd-2", "1.0.0").await;
}

async fn a_build_that_cannot_connect_is_rolled_back_within_the_bound(server: Server) {
    let bound = Duration::from_secs(3);
    let h = host(
        &server,
        "upd-3",
        &server.ws_url(),
        vec![("AGENT_UPDATE_WELCOME_TIMEOUT", bound.as_secs().to_string())],
    )
    .await;
    reports(&server, "upd-3", "1.0.0").await;
    let binary = server
        .upload_build("1.1.0", silent_build(server.dir.path()))
        .await;
    let (_, rollout) = server
        .post("/api/v1/rollouts", &json!({"binary_id": binary}))
        .await;

    // The switch: the agent leaves to run the new build.
    server
        .eventually("/api/v1/agents/upd-3", |a| a["online"] == false)
        .await;
    let switched = Instant::now();
    let failed = rollout_where(&server, &rollout, |r| r["progress"]["failed"] == 1).await;
    let took = switched.elapsed();
    let error = failed["progress"]["recent_failures"][0]["error"]
        .as_str()
        .unwrap();
    assert!(
        error.contains("rolled back to 1.0.0")
            && error.contains("did not reach welcome within 3 s"),
        "{error}"
    );
    assert!(
        took < bound + Duration::from_secs(10),
        "rolled back and reported {took:?} after the switch (bound {bound:?})"
    );
    println!("rolled back and reported {took:?} after the switch (bound {bound:?})");
    // The previous build is back in place and running.
    assert!(std::fs::read(&h.exe).unwrap() == std::fs::read(agent_build("1.0.0")).unwrap());
    reports(&server, "upd-3", "1.0.0").await;
    h.agent.log.shows("restoring the previous build").await;
    wait_until_gone(&h.state_dir.join("update").join("update.json")).await;
    // The rollout does not ask it again.
    let p = rollout_where(&server, &rollout, |r| r["progress"]["updating"] == 0).await;
    assert_eq!(p["progress"]["failed"], 1);
}

async fn enough_failures_pause_the_rollout_and_the_rest_are_not_offered_the_build(server: Server) {
    let mut hosts = Vec::new();
    for i in 0..3 {
        let id = format!("upd-4-{i}");
        hosts.push(host(&server, &id, &server.ws_url(), vec![]).await);
        reports(&server, &id, "1.0.0").await;
    }
    let binary = server.upload_build("1.1.0", EXITS_AT_ONCE.to_vec()).await;
    let (status, rollout) = server
        .post(
            "/api/v1/rollouts",
            &json!({"binary_id": binary, "max_concurrent": 1, "max_failure_ratio": 0.5, "min_sample": 2}),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");

    let paused = rollout_where(&server, &rollout, |r| r["status"] == "paused").await;
    let reason = paused["reason"].as_str().unwrap();
    assert!(reason.contains("2 of 2 updates failed"), "{reason}");
    assert_eq!(paused["progress"]["failed"], 2);
    assert_eq!(paused["progress"]["waiting"], 1);
    // The third agent was never offered the build.
    let offered: Vec<usize> = hosts
        .iter()
        .enumerate()
        .filter(|(_, h)| h.agent.log.text().contains("update offered"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(offered.len(), 2, "offered to {offered:?}");
    // Still not, a few rollout rounds later.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let still: usize = hosts
        .iter()
        .filter(|h| h.agent.log.text().contains("update offered"))
        .count();
    assert_eq!(still, 2);
}

async fn wait_until_gone(path: &Path) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} still there",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
