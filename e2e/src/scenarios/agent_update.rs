//! agent-update: real agents (`agent/`, built as 1.0.0) connected through the ingress to
//! every replica are updated to a 1.1.0 build by one rollout while commands flow to them.
//! Every agent downloads the build through the ingress, checks it, switches and comes
//! back on 1.1.0; the rollout counts each one updated, none failed or timed out; every
//! command submitted meanwhile succeeds (0 lost: commands that reached an agent while it
//! switched are delivered again to the new build).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::report::short;
use crate::target::Profile;

/// Bound on the whole rollout (downloads of a debug build through the ingress, checks,
/// switches, reconnects).
const ROLLOUT_BOUND: Duration = Duration::from_secs(300);
/// Bound on the real agents connecting.
const ONLINE_BOUND: Duration = Duration::from_secs(60);
/// A command to some agent this often while the rollout runs.
const COMMAND_EVERY: Duration = Duration::from_millis(200);

pub async fn run<C: Target>(
    target: &mut C,
    opts: &Options,
    report: &mut ScenarioReport,
) -> Result<()> {
    target.apply(&Profile::standard(opts.replicas)).await?;
    section("building the agent as 1.0.0 and 1.1.0 (AGENT_VERSION)");
    let old = build_agent("1.0.0").await?;
    let new = build_agent("1.1.0").await?;
    let api = admin_api(target);
    let pods: Vec<String> = target
        .pods()
        .await?
        .into_iter()
        .filter(|p| p.ready)
        .map(|p| p.name)
        .collect();
    let dir = std::env::temp_dir().join(format!("e2e-agent-update-{}", opts.run_id));
    std::fs::create_dir_all(&dir)?;

    section(&format!(
        "starting real agents on 1.0.0 until every replica ({}) holds one",
        pods.len()
    ));
    let mut hosts = Hosts::default();
    let mut n = 2 * pods.len();
    let max = 6 * pods.len();
    let by_pod = loop {
        while hosts.0.len() < n {
            let i = hosts.0.len();
            let id = format!("{}-{}-{i:02}", opts.run_id, Scenario::AgentUpdate.short());
            hosts.start(target, &dir, &old, &id)?;
        }
        let by_pod = all_on(&api, &hosts.ids(), "1.0.0", ONLINE_BOUND).await?;
        let missing: Vec<&String> = pods.iter().filter(|p| !by_pod.contains_key(*p)).collect();
        if missing.is_empty() || n >= max {
            report.check(
                missing.is_empty(),
                format!("no real agent landed on {missing:?} with {n} agents"),
            );
            break by_pod;
        }
        n += 1;
    };
    report.agents = hosts.0.len();
    println!("  real agents per pod: {}", distribution(&by_pod));

    section("commands to every agent, one every 200ms");
    let flow = PingFlow::start(api.clone(), hosts.ids());

    section("uploading 1.1.0 and rolling it out");
    let bytes = std::fs::read(&new)?;
    let way = target.pod_endpoint(&pods[0]).await?;
    let http = way.endpoint.http_client(Duration::from_secs(120));
    let admin = target
        .minter()
        .mint("e2e-admin", Role::Admin, Duration::from_secs(3600));
    let reply = http
        .post(way.endpoint.http_url(&format!(
            "/api/v1/binaries?name={}-agent&version=1.1.0&os={}&arch={}&notes=e2e",
            opts.run_id,
            std::env::consts::OS,
            std::env::consts::ARCH
        )))
        .bearer_auth(&admin)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .context("uploading the 1.1.0 build")?;
    let status = reply.status().as_u16();
    let uploaded: Value = reply.json().await.unwrap_or(Value::Null);
    if status != 201 {
        bail!("upload: status {status}: {uploaded}");
    }
    drop(way);
    let binary = uploaded["id"]
        .as_str()
        .context("upload without an id")?
        .to_string();
    let max_concurrent = (hosts.0.len() / 3).max(1);
    let started = Instant::now();
    let rollout = api
        .call(
            reqwest::Method::POST,
            "/api/v1/rollouts",
            None,
            crate::api::Body::Json(json!({
                "binary_id": binary, "max_concurrent": max_concurrent,
                "max_failure_ratio": 0.2, "min_sample": 3,
            })),
            &[201],
        )
        .await
        .map_err(anyhow::Error::msg)?
        .json();
    let rollout_id = rollout["id"]
        .as_str()
        .context("rollout without an id")?
        .to_string();

    let outcome = wait::until(
        "every real agent on 1.1.0 and the rollout complete",
        ROLLOUT_BOUND,
        Duration::from_millis(250),
        || async {
            let r = api
                .get(&format!("/api/v1/rollouts/{rollout_id}"))
                .await
                .map_err(anyhow::Error::msg)?;
            let p = &r["progress"];
            if r["status"] != "active" || p["failed"].as_i64() > Some(0) {
                bail!("the rollout stopped: {r}");
            }
            Ok(if p["updated"].as_u64() == Some(hosts.0.len() as u64) {
                Check::Ready(r)
            } else {
                Check::Pending(format!(
                    "updated {}, updating {}, waiting {}",
                    p["updated"], p["updating"], p["waiting"]
                ))
            })
        },
    )
    .await;
    let rolled = started.elapsed();
    match outcome {
        Ok(r) => {
            report.figure("rollout", short(rolled));
            report.check(
                r["progress"]["timed_out"] == 0 && r["progress"]["failed"] == 0,
                format!("updates failed or timed out: {}", r["progress"]),
            );
        }
        Err(e) => report.failures.push(format!("{e:#}")),
    }
    match all_on(&api, &hosts.ids(), "1.1.0", ONLINE_BOUND).await {
        Ok(by_pod) => println!("  on 1.1.0 per pod: {}", distribution(&by_pod)),
        Err(e) => report.failures.push(format!("{e:#}")),
    }
    for h in &hosts.0 {
        report.check(
            std::fs::read(&h.exe)
                .map(|b| b == std::fs::read(&new).unwrap_or_default())
                .unwrap_or(false),
            format!("{}: its executable is not the 1.1.0 build", h.id),
        );
    }

    section("verifying every command");
    let submitted = flow.stop().await;
    let lost = verify_commands(&api, &submitted).await;
    report.commands = submitted.len() as u64;
    report.lost_commands = lost.len() as u64;
    for l in lost.iter().take(5) {
        report.failures.push(format!("lost command: {l}"));
    }
    report.check(
        !submitted.is_empty(),
        "no command was submitted during the rollout",
    );

    // Leave nothing behind: the rollout (so that its binary can go) and the binary.
    let _ = api
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/rollouts/{rollout_id}"),
            None,
            crate::api::Body::None,
            &[200],
        )
        .await;
    let _ = api
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/binaries/{binary}"),
            None,
            crate::api::Body::None,
            &[200, 204],
        )
        .await;
    record_requests(report, &api);
    drop(hosts);
    Ok(())
}

/// Builds the agent with `AGENT_VERSION=version` into `target/agent-builds` (shared with
/// the agent's own update tests) and copies it out as `agent-<version>`.
async fn build_agent(version: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("target/<profile>")?
        .join("agent-builds");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = tokio::process::Command::new(cargo)
        .args(["build", "-p", "agent", "--bin", "agent"])
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", &target)
        .env("AGENT_VERSION", version)
        .output()
        .await
        .context("running cargo build")?;
    if !out.status.success() {
        bail!(
            "building agent {version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = target.join(format!("agent-{version}"));
    std::fs::copy(target.join("debug").join("agent"), &path)?;
    Ok(path)
}

/// One host: its own copy of the agent (the file an update replaces), state directory
/// and log, in a process group of its own (after an update the agent may run in the
/// watchdog's process).
struct Host {
    id: String,
    exe: PathBuf,
    group: i32,
    _child: tokio::process::Child,
}

#[derive(Default)]
struct Hosts(Vec<Host>);

impl Hosts {
    fn start(&mut self, target: &impl Target, dir: &Path, build: &Path, id: &str) -> Result<()> {
        let home = dir.join(id);
        std::fs::create_dir_all(home.join("bin"))?;
        let exe = home.join("bin").join("agent");
        std::fs::copy(build, &exe)?;
        let token = target
            .minter()
            .mint(id, Role::Agent, Duration::from_secs(3600));
        let log = std::fs::File::create(home.join("agent.log"))?;
        let child = tokio::process::Command::new(&exe)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AGENT_SERVER_URL", target.endpoint().ws_url(""))
            .env("AGENT_CLIENT_ID", id)
            .env("AGENT_TOKEN", token)
            .env("AGENT_STATE_DIR", home.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let group = child.id().context("a process id")? as i32;
        self.0.push(Host {
            id: id.to_string(),
            exe,
            group,
            _child: child,
        });
        Ok(())
    }

    fn ids(&self) -> Vec<String> {
        self.0.iter().map(|h| h.id.clone()).collect()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in &self.0 {
            // SAFETY: a plain kill(2) of a process group this scenario started.
            unsafe {
                libc::kill(-h.group, libc::SIGKILL);
            }
        }
    }
}

/// Waits until every agent is online reporting `version`; returns agents per pod.
async fn all_on(
    api: &Api,
    ids: &[String],
    version: &str,
    bound: Duration,
) -> Result<std::collections::BTreeMap<String, usize>> {
    wait::until(
        &format!("{} real agents online on {version}", ids.len()),
        bound,
        Duration::from_millis(200),
        || async {
            let mut by_pod = std::collections::BTreeMap::new();
            let mut behind = Vec::new();
            for id in ids {
                // The list, not the agent: an agent is unknown (404) until it connects.
                let found = api
                    .get(&format!("/api/v1/agents?q={id}"))
                    .await
                    .ok()
                    .and_then(|list| {
                        let agents = list["agents"].as_array()?;
                        agents.iter().find(|a| a["id"] == id.as_str()).cloned()
                    });
                match found {
                    Some(a) if a["online"] == true && a["version"] == version => {
                        *by_pod
                            .entry(a["pod"].as_str().unwrap_or("?").to_string())
                            .or_insert(0) += 1;
                    }
                    _ => behind.push(id.as_str()),
                }
            }
            Ok(if behind.is_empty() {
                Check::Ready(by_pod)
            } else {
                Check::Pending(format!("not yet: {behind:?}"))
            })
        },
    )
    .await
}

/// `ping` to each agent in turn, through the ingress, until stopped.
struct PingFlow {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    submitted: Arc<Mutex<Vec<String>>>,
}

impl PingFlow {
    fn start(api: Api, ids: Vec<String>) -> PingFlow {
        let stop = CancellationToken::new();
        let submitted: Arc<Mutex<Vec<String>>> = Arc::default();
        let task = {
            let (stop, submitted) = (stop.clone(), submitted.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(COMMAND_EVERY);
                for i in 0.. {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    // A failed submission is counted by the API client.
                    if let Ok(id) = api.submit(&ids[i % ids.len()], "ping", json!({})).await {
                        submitted.lock().expect("lock").push(id);
                    }
                }
            })
        };
        PingFlow {
            stop,
            task,
            submitted,
        }
    }

    async fn stop(self) -> Vec<String> {
        self.stop.cancel();
        let _ = self.task.await;
        self.submitted.lock().expect("lock").clone()
    }
}

/// Commands that did not succeed within [`RESULTS_BOUND`], with their last state.
async fn verify_commands(api: &Api, ids: &[String]) -> Vec<String> {
    let deadline = Instant::now() + RESULTS_BOUND;
    let mut open: Vec<String> = ids.to_vec();
    let mut lost = Vec::new();
    loop {
        let mut still = Vec::new();
        for id in open {
            match api.command(&id).await {
                Ok(c) if c["status"] == "succeeded" => {}
                Ok(c) if matches!(c["status"].as_str(), Some("failed" | "expired")) => {
                    lost.push(format!("{id}: {c}"));
                }
                Ok(c) => still.push((id, c.to_string())),
                Err(e) => still.push((id, e)),
            }
        }
        if still.is_empty() {
            return lost;
        }
        if Instant::now() >= deadline {
            lost.extend(still.into_iter().map(|(id, s)| format!("{id}: {s}")));
            return lost;
        }
        open = still.into_iter().map(|(id, _)| id).collect();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
