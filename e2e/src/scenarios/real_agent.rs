//! The real agent (`agent/`, binary `agent`) through the ingress: it connects with its
//! token, reports its host's facts and inventory, and answers `ping`, `exec` (of a program
//! its configuration allows) and `inventory`, as an operator would see it after
//! "connect your first host".

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Options, Scenario, admin_api, record_requests};
use crate::api::Api;
use crate::report::ScenarioReport;
use crate::target::Target;
use crate::tokens::Role;
use crate::wait::{self, Check};

const BOUND: Duration = Duration::from_secs(30);

/// `target/<profile>/agent`, built beside this harness.
fn agent_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name("agent");
    if !path.exists() {
        bail!(
            "{} is missing: build the agent first with `cargo build -p agent`",
            path.display()
        );
    }
    Ok(path)
}

pub async fn run<T: Target>(
    target: &mut T,
    opts: &Options,
    report: &mut ScenarioReport,
) -> Result<()> {
    let binary = agent_binary()?;
    let id = format!("{}-{}-host", opts.run_id, Scenario::RealAgent.short());
    let token = target
        .minter()
        .mint(&id, Role::Agent, Duration::from_secs(3600));
    let state_dir = std::env::temp_dir().join(format!("e2e-agent-{id}"));
    std::fs::create_dir_all(&state_dir)?;
    let log_path = state_dir.join("agent.log");
    let log = std::fs::File::create(&log_path)?;
    let endpoint = target.endpoint();

    let started = Instant::now();
    let _agent = tokio::process::Command::new(&binary)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AGENT_SERVER_URL", endpoint.ws_url(""))
        .env("AGENT_CLIENT_ID", &id)
        .env("AGENT_TOKEN", &token)
        .env("AGENT_STATE_DIR", &state_dir)
        .env("AGENT_EXEC_ALLOW", "uname")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    println!("  real agent {id} started; its log: {}", log_path.display());

    let api = admin_api(target);
    let outcome = check_agent(&api, &id, report, started).await;
    record_requests(report, &api);
    outcome
}

async fn check_agent(
    api: &Api,
    id: &str,
    report: &mut ScenarioReport,
    started: Instant,
) -> Result<()> {
    let agent = wait::until(
        "the real agent to be online",
        BOUND,
        Duration::from_millis(100),
        || async {
            // The list, not the agent: the agent is unknown (404) until it connects.
            Ok(match api.get(&format!("/api/v1/agents?q={id}")).await {
                Ok(list) => match list["agents"].get(0) {
                    Some(a) if a["online"] == true && a["hostname"].is_string() => {
                        Check::Ready(a.clone())
                    }
                    _ => Check::Pending(list.to_string()),
                },
                Err(e) => Check::Pending(e),
            })
        },
    )
    .await?;
    report.figure(
        "real agent online after",
        crate::report::short(started.elapsed()),
    );
    report.check(
        agent["os"] == std::env::consts::OS && agent["arch"] == std::env::consts::ARCH,
        format!("the agent's hello does not describe this host: {agent}"),
    );

    // The agent's summary first: its inventory is a 404 until the first one arrives.
    wait::until(
        "the real agent's inventory",
        BOUND,
        Duration::from_millis(100),
        || async {
            Ok(match api.get(&format!("/api/v1/agents/{id}")).await {
                Ok(a) if a["inventory"].is_object() => Check::Ready(()),
                Ok(a) => Check::Pending(a.to_string()),
                Err(e) => Check::Pending(e),
            })
        },
    )
    .await?;
    let inventory = api
        .get(&format!("/api/v1/agents/{id}/inventory"))
        .await
        .map_err(anyhow::Error::msg)?;
    report.check(
        inventory["data"]["cpu"]["count"].as_u64().unwrap_or(0) > 0,
        format!("the inventory has no CPU count: {inventory}"),
    );
    report.figure(
        "inventory",
        format!("{} bytes", inventory["size_bytes"].as_i64().unwrap_or(0)),
    );

    let sent = Instant::now();
    let ping = run_command(api, id, "ping", json!({})).await?;
    report.figure("ping round trip", crate::report::short(sent.elapsed()));
    report.check(
        ping["status"] == "succeeded" && ping["output"]["pong"] == true,
        format!("ping: {ping}"),
    );
    let exec = run_command(api, id, "exec", json!({"program": "uname", "args": ["-s"]})).await?;
    report.check(
        exec["status"] == "succeeded" && exec["output"]["stdout"] == "Linux\n",
        format!("exec uname -s: {exec}"),
    );
    let refused = run_command(
        api,
        id,
        "exec",
        json!({"program": "sh", "args": ["-c", "id"]}),
    )
    .await?;
    report.check(
        refused["status"] == "failed" && refused["output"]["error"] == "not_allowed",
        format!("exec of a program outside the allowlist: {refused}"),
    );
    Ok(())
}

/// Submits a command and waits for its result.
async fn run_command(api: &Api, agent: &str, name: &str, args: Value) -> Result<Value> {
    let cid = api
        .submit(agent, name, args)
        .await
        .map_err(anyhow::Error::msg)?;
    wait::until(
        &format!("the result of {name}"),
        BOUND,
        Duration::from_millis(50),
        || async {
            Ok(match api.command(&cid).await {
                Ok(c) if matches!(c["status"].as_str(), Some("succeeded" | "failed")) => {
                    Check::Ready(c)
                }
                Ok(c) => Check::Pending(c.to_string()),
                Err(e) => Check::Pending(e),
            })
        },
    )
    .await
}
