//! The real `agent` binary against the real `agent-server` binary, on SQLite and on
//! PostgreSQL. Both binaries come from this target directory: `cargo test --workspace`
//! builds them (or `cargo build -p agent-server` first).

mod helpers;
mod update;

use std::path::{Path, PathBuf};
use std::time::Duration;

use helpers::{Agent, AgentSpec, Server, WAIT, on_both_backends, script};
use serde_json::json;

on_both_backends! {
    hello_reports_this_hosts_name_and_inventory_its_cpus;
    inventory_is_refreshed_on_command;
    ping_answers_and_an_unknown_command_is_an_error;
    exec_is_refused_unless_the_agent_allows_the_program;
    plugin_gets_args_on_stdin_and_its_stdout_is_the_output;
    command_delivered_again_across_a_server_restart_runs_once;
    unacknowledged_result_survives_kill_9_and_arrives_after_restart;
    command_interrupted_by_the_agents_death_is_reported_not_rerun;
    deleted_agent_stops_with_a_clear_message;
    refused_token_stops_with_a_clear_message;
    first_start_enrolls_and_a_restart_reuses_the_stored_token;
    used_up_enroll_secret_stops_with_a_clear_message;
    wrong_enroll_secret_stops_with_a_clear_message;
    enrollment_waits_as_long_as_retry_after_says;
    revoked_enrolled_agent_stops_and_says_how_to_enroll_again;
}

const ID: &str = "it-host-1";

/// Starts an agent with its own state directory under the server's temporary directory.
async fn agent(server: &Server, env: Vec<(&'static str, String)>) -> Agent {
    let token = server.agent_token(ID).await;
    Agent::start(
        server,
        AgentSpec {
            client_id: ID,
            token: Some(&token),
            state_dir: &state_dir(server),
            env,
        },
    )
}

fn state_dir(server: &Server) -> PathBuf {
    server.dir.path().join("agent-state")
}

/// A plug-in `slow` that counts its runs and finishes once `release` exists (or its
/// directory is gone, so no process outlives the test).
struct Slow {
    dir: PathBuf,
}

impl Slow {
    fn install(server: &Server) -> (Slow, Vec<(&'static str, String)>) {
        let dir = server.dir.path().join("plugins");
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        script(
            &dir.join("slow"),
            &format!(
                "#!/bin/sh\necho run >> {d}/runs\nwhile [ ! -f {d}/release ] && [ -d {d} ]; do sleep 0.05; done\necho '{{\"done\": true}}'\n"
            ),
        );
        let env = vec![("AGENT_PLUGIN_DIR", dir.display().to_string())];
        (Slow { dir }, env)
    }

    fn runs(&self) -> usize {
        std::fs::read_to_string(self.dir.join("runs"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    async fn started(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.runs() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "plug-in never started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn release(&self) {
        std::fs::write(self.dir.join("release"), "").unwrap();
    }
}

impl Drop for Slow {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("release"), "");
    }
}

/// Waits until the journal holds a finished result.
async fn journaled(state_dir: &Path) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let done = std::fs::read_dir(state_dir.join("journal"))
            .into_iter()
            .flatten()
            .flatten()
            // Only renamed entries count: a `.tmp` file is a write in progress.
            .filter(|f| f.path().extension().is_some_and(|e| e == "json"))
            .any(|f| std::fs::read_to_string(f.path()).is_ok_and(|s| s.contains("\"outcome\":{")));
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no result journaled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn hello_reports_this_hosts_name_and_inventory_its_cpus(server: Server) {
    let _agent = agent(&server, vec![]).await;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    server.online(ID).await;
    let seen = server
        .eventually(&format!("/api/v1/agents/{ID}"), |a| {
            a["hostname"].is_string()
        })
        .await;
    assert_eq!(seen["hostname"], host.trim());
    assert_eq!(seen["os"], std::env::consts::OS);
    assert_eq!(seen["arch"], std::env::consts::ARCH);
    assert_eq!(seen["version"], env!("CARGO_PKG_VERSION"));

    let inventory = server
        .eventually(&format!("/api/v1/agents/{ID}/inventory"), |i| {
            i["data"].is_object()
        })
        .await;
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    assert_eq!(inventory["data"]["cpu"]["count"], cpus);
    assert_eq!(inventory["data"]["hostname"], host.trim());
    assert!(inventory["data"]["memory"]["total_bytes"].as_u64().unwrap() > 0);
}

async fn inventory_is_refreshed_on_command(server: Server) {
    let _agent = agent(&server, vec![]).await;
    let path = format!("/api/v1/agents/{ID}/inventory");
    let first = server.eventually(&path, |i| i["data"].is_object()).await;
    let collected = first["data"]["collected_at"].as_i64().unwrap();

    let id = server.command(ID, "inventory", json!({})).await;
    let done = server.finished(&id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"]["sent"], "websocket");
    server
        .eventually(&path, |i| {
            i["data"]["collected_at"].as_i64() > Some(collected)
        })
        .await;
}

async fn ping_answers_and_an_unknown_command_is_an_error(server: Server) {
    let _agent = agent(&server, vec![]).await;
    server.online(ID).await;
    let ping = server.command(ID, "ping", json!({})).await;
    let unknown = server.command(ID, "reboot-everything", json!({})).await;

    let ping = server.finished(&ping).await;
    assert_eq!(ping["status"], "succeeded");
    assert_eq!(ping["output"]["pong"], true);
    let unknown = server.finished(&unknown).await;
    assert_eq!(unknown["status"], "failed");
    assert_eq!(unknown["output"]["error"], "unknown_command");
    assert!(
        unknown["output"]["message"]
            .as_str()
            .unwrap()
            .contains("no command `reboot-everything`")
    );
}

async fn exec_is_refused_unless_the_agent_allows_the_program(server: Server) {
    let args = json!({"program": "uname", "args": ["-s"]});
    let refusing = agent(&server, vec![]).await;
    server.online(ID).await;
    let id = server.command(ID, "exec", args.clone()).await;
    let refused = server.finished(&id).await;
    assert_eq!(refused["status"], "failed");
    assert_eq!(refused["output"]["error"], "not_allowed", "{refused}");
    refusing.log.shows("command finished").await;
    refusing.kill9().await;

    let _allowing = agent(&server, vec![("AGENT_EXEC_ALLOW", "uname,true".into())]).await;
    let id = server.command(ID, "exec", args).await;
    let ran = server.finished(&id).await;
    assert_eq!(ran["status"], "succeeded", "{ran}");
    assert_eq!(ran["output"]["exit_code"], 0);
    assert_eq!(ran["output"]["stdout"], "Linux\n");
    assert_eq!(ran["output"]["stderr"], "");
}

async fn plugin_gets_args_on_stdin_and_its_stdout_is_the_output(server: Server) {
    let plugins = server.dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    script(&plugins.join("echo-args"), "#!/bin/sh\ncat\n");
    script(&plugins.join("broken"), "#!/bin/sh\necho 'not json'\n");
    let _agent = agent(
        &server,
        vec![("AGENT_PLUGIN_DIR", plugins.display().to_string())],
    )
    .await;
    server.online(ID).await;

    let args = json!({"service": "nginx", "lines": [1, 2, 3]});
    let echo = server.command(ID, "echo-args", args.clone()).await;
    let broken = server.command(ID, "broken", json!({})).await;
    let echo = server.finished(&echo).await;
    assert_eq!(echo["status"], "succeeded", "{echo}");
    assert_eq!(echo["output"], args);
    let broken = server.finished(&broken).await;
    assert_eq!(broken["status"], "failed");
    assert_eq!(broken["output"]["error"], "invalid_plugin_output");
}

async fn command_delivered_again_across_a_server_restart_runs_once(mut server: Server) {
    let (slow, env) = Slow::install(&server);
    let agent = agent(&server, env).await;
    server.online(ID).await;
    let id = server.command(ID, "slow", json!({})).await;
    slow.started().await;

    // The server dies before the result: on the agent's next connection it delivers the
    // command again, which the agent must not run a second time.
    server.kill().await;
    server.start_again().await;
    agent.log.shows("not running it twice").await;
    slow.release();

    let done = server.finished(&id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"], json!({"done": true}));
    assert_eq!(slow.runs(), 1);
}

async fn unacknowledged_result_survives_kill_9_and_arrives_after_restart(mut server: Server) {
    let (slow, env) = Slow::install(&server);
    let agent = agent(&server, env.clone()).await;
    server.online(ID).await;
    let id = server.command(ID, "slow", json!({})).await;
    slow.started().await;

    // The result is ready while the server is down, then the agent is killed before it
    // could send it.
    server.kill().await;
    slow.release();
    journaled(&state_dir(&server)).await;
    agent.kill9().await;

    server.start_again().await;
    let _again = self::agent(&server, env).await;
    let done = server.finished(&id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"], json!({"done": true}));
    assert_eq!(slow.runs(), 1);
}

async fn command_interrupted_by_the_agents_death_is_reported_not_rerun(server: Server) {
    let (slow, env) = Slow::install(&server);
    let agent = agent(&server, env.clone()).await;
    server.online(ID).await;
    let id = server.command(ID, "slow", json!({})).await;
    slow.started().await;
    agent.kill9().await;

    let _again = self::agent(&server, env).await;
    let done = server.finished(&id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["output"]["error"], "interrupted");
    assert_eq!(slow.runs(), 1);
}

async fn deleted_agent_stops_with_a_clear_message(server: Server) {
    let mut agent = agent(&server, vec![]).await;
    server.online(ID).await;
    let status = server.delete(&format!("/api/v1/agents/{ID}")).await;
    assert!((200..300).contains(&status), "{status}");
    assert_eq!(agent.exits().await, 77, "{}", agent.log.text());
    assert!(
        agent.log.text().contains("an operator deleted this agent"),
        "{}",
        agent.log.text()
    );
}

async fn refused_token_stops_with_a_clear_message(server: Server) {
    let token = "not-a-valid-token-0123456789";
    let mut agent = Agent::start(
        &server,
        AgentSpec {
            client_id: ID,
            token: Some(token),
            state_dir: &state_dir(&server),
            env: vec![],
        },
    );
    assert_eq!(agent.exits().await, 77, "{}", agent.log.text());
    let log = agent.log.text();
    assert!(log.contains("status=401"), "{log}");
    assert!(log.contains("mint a new one"), "{log}");
    assert!(
        !log.contains(token),
        "the token must never be logged:\n{log}"
    );
}

#[test]
fn bad_configuration_exits_64_naming_the_key() {
    let out = std::process::Command::new(helpers::binary("agent"))
        .env_clear()
        .env("AGENT_SERVER_URL", "ftp://agents.example.com")
        .env("AGENT_TOKEN", "t")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server_url (AGENT_SERVER_URL)"), "{stderr}");
}

/// An agent that enrolls: no token, the enroll secret in the environment, its own state
/// directory.
fn enrolling(server: &Server, client_id: &str, secret: &str) -> Agent {
    Agent::start(
        server,
        AgentSpec {
            client_id,
            token: None,
            state_dir: &server.dir.path().join(format!("state-{client_id}")),
            env: vec![("AGENT_ENROLL_SECRET", secret.to_string())],
        },
    )
}

fn token_file(server: &Server, client_id: &str) -> PathBuf {
    server
        .dir
        .path()
        .join(format!("state-{client_id}"))
        .join("token")
}

async fn use_count(server: &Server, secret_id: &str) -> i64 {
    let (_, listed) = server.get("/api/v1/enroll-secrets").await;
    listed["enroll_secrets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == secret_id)
        .and_then(|s| s["use_count"].as_i64())
        .unwrap()
}

async fn first_start_enrolls_and_a_restart_reuses_the_stored_token(server: Server) {
    use std::os::unix::fs::PermissionsExt;
    let (secret, secret_id) = server.enroll_secret(json!({"labels": ["rack-12"]})).await;
    let agent = enrolling(&server, ID, &secret);
    agent.log.shows("enrolled").await;
    server.online(ID).await;
    let path = token_file(&server, ID);
    let token = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(use_count(&server, &secret_id).await, 1);
    let (_, labelled) = server.get("/api/v1/agents?label=rack-12").await;
    assert_eq!(labelled["agents"][0]["id"], ID, "{labelled}");
    let log = agent.log.text();
    assert!(
        !log.contains(&secret),
        "the enroll secret must never be logged:\n{log}"
    );
    assert!(
        !log.contains(token.trim()),
        "the token must never be logged:\n{log}"
    );
    assert_eq!(agent.stop().await, 0);

    // Offline first, so that "online" below is the restarted agent's doing.
    server
        .eventually(&format!("/api/v1/agents/{ID}"), |a| a["online"] == false)
        .await;
    let again = enrolling(&server, ID, &secret);
    server.online(ID).await;
    again.log.shows("connected").await;
    assert!(
        !again.log.text().contains("enrolled"),
        "{}",
        again.log.text()
    );
    assert_eq!(
        use_count(&server, &secret_id).await,
        1,
        "no second enrollment"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), token);
}

async fn used_up_enroll_secret_stops_with_a_clear_message(server: Server) {
    let (secret, _) = server.enroll_secret(json!({"max_uses": 1})).await;
    let _first = enrolling(&server, "rack-host-1", &secret);
    server.online("rack-host-1").await;

    let mut second = enrolling(&server, "rack-host-2", &secret);
    assert_eq!(second.exits().await, 77, "{}", second.log.text());
    let log = second.log.text();
    assert!(log.contains("refused the enrollment"), "{log}");
    assert!(log.contains("status=401"), "{log}");
    assert!(
        log.contains("max_uses"),
        "the server's reason is shown:\n{log}"
    );
    assert!(!token_file(&server, "rack-host-2").exists());
}

async fn wrong_enroll_secret_stops_with_a_clear_message(server: Server) {
    let wrong = "agent-enroll-0000000000000000000000000000000000000000000000000000000000000000";
    let mut agent = enrolling(&server, ID, wrong);
    assert_eq!(agent.exits().await, 77, "{}", agent.log.text());
    let log = agent.log.text();
    assert!(log.contains("not known to this server"), "{log}");
    assert!(
        log.contains("AGENT_ENROLL_SECRET"),
        "names the setting:\n{log}"
    );
    assert!(
        !log.contains(wrong),
        "the secret must never be logged:\n{log}"
    );
    let (status, _) = server.get(&format!("/api/v1/agents/{ID}")).await;
    assert_eq!(status, 404, "nothing was created");
}

async fn enrollment_waits_as_long_as_retry_after_says(server: Server) {
    let (secret, _) = server.enroll_secret(json!({})).await;
    // Spend this address's enrollment budget (a burst of 10, then 1 per second) with
    // wrong secrets, so that the agent's first attempt gets 429 with Retry-After.
    for _ in 0..20 {
        let status = server
            .http
            .post(format!("{}/api/v1/enroll", server.base()))
            .json(&json!({"secret": "agent-enroll-wrong", "client_id": "probe"}))
            .send()
            .await
            .unwrap()
            .status();
        if status == 429 {
            break;
        }
    }
    let agent = enrolling(&server, ID, &secret);
    agent.log.shows("status=429").await;
    agent.log.shows("enrolled").await;
    server.online(ID).await;
    let log = agent.log.text();
    let waited = log
        .lines()
        .find(|l| l.contains("status=429"))
        .and_then(|l| l.split("delay_ms=").nth(1))
        .and_then(|d| d.split_whitespace().next())
        .and_then(|d| d.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no delay logged:\n{log}"));
    assert!(
        waited >= 1000,
        "Retry-After is at least 1 s; waited {waited} ms"
    );
}

async fn revoked_enrolled_agent_stops_and_says_how_to_enroll_again(server: Server) {
    let (secret, _) = server.enroll_secret(json!({})).await;
    let mut agent = enrolling(&server, ID, &secret);
    server.online(ID).await;
    let (status, body) = server
        .post(&format!("/api/v1/agents/{ID}/revoke"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(agent.exits().await, 77, "{}", agent.log.text());
    let path = token_file(&server, ID);
    assert!(
        agent
            .log
            .text()
            .contains(&format!("remove {}", path.display())),
        "{}",
        agent.log.text()
    );

    // Started again (a reboot), it tries its stored token once and stops again: no
    // loop, no silent re-enrollment undoing the operator's revocation.
    let mut again = enrolling(&server, ID, &secret);
    assert_eq!(again.exits().await, 77, "{}", again.log.text());
    let log = again.log.text();
    assert!(log.contains("status=401"), "{log}");
    assert!(log.contains(&format!("remove {}", path.display())), "{log}");
    assert!(!log.contains("enrolled:"), "{log}");
}
