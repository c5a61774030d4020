//! One `agent-server` process standing in for a pod.

use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use super::process::{signal, spawn_logged, tail, wait_exit};
use crate::wait::{self, Check};

/// Bound on a process starting: migrations run on the first start of a fresh database.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running server process.
pub struct Pod {
    /// POD_ID, as a Deployment's pod name.
    pub name: String,
    /// The rollout revision it was started for.
    pub revision: u32,
    pub port: u16,
    child: Child,
    log: std::path::PathBuf,
}

/// How a terminated pod ended.
#[derive(Debug)]
pub struct Exit {
    pub name: String,
    pub status: ExitStatus,
    /// From the signal to the exit.
    pub after: Duration,
}

impl Pod {
    /// Starts `bin` with `env` (plus POD_ID, SERVER_PORT, DATA_DIR) and waits until it
    /// listens and answers /readiness with 200. `port` 0 lets the server pick one.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        name: &str,
        revision: u32,
        port: u16,
        env: &[(String, String)],
    ) -> Result<Pod> {
        let data = dir.join("pods").join(name);
        std::fs::create_dir_all(&data)?;
        let log = dir.join("pods").join(format!("{name}.log"));
        let mut command = Command::new(bin);
        command
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("POD_ID", name)
            .env("SERVER_PORT", port.to_string())
            // Several pods share this host: no fixed metrics port.
            .env("METRICS_PORT", "0")
            .env("DATA_DIR", &data)
            .current_dir(&data);
        let (mut child, mut lines) = spawn_logged(command, &log)?;

        // The server logs its address once it listens (JSON logs: an `addr` field).
        let listening = async {
            while let Some(line) = lines.recv().await {
                if !line.contains("agent-server listening") {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                let port = v["addr"]
                    .as_str()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse::<u16>().ok());
                return port;
            }
            None
        };
        let port = tokio::select! {
            port = tokio::time::timeout(START_TIMEOUT, listening) => match port {
                Ok(Some(port)) => port,
                Ok(None) => bail!("{name} exited before listening:\n{}", tail(&log, 20)),
                Err(_) => bail!("{name} did not listen within {START_TIMEOUT:?}:\n{}", tail(&log, 20)),
            },
            status = child.wait() => bail!("{name} exited ({:?}) before listening:\n{}", status.ok(), tail(&log, 20)),
        };

        let pod = Pod {
            name: name.to_string(),
            revision,
            port,
            child,
            log,
        };
        pod.wait_ready().await?;
        Ok(pod)
    }

    async fn wait_ready(&self) -> Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()?;
        let url = format!("http://127.0.0.1:{}/readiness", self.port);
        wait::until(
            &format!("{} to be ready", self.name),
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async {
                Ok(match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => Check::Ready(()),
                    Ok(r) => Check::Pending(format!("readiness {}", r.status())),
                    Err(e) => Check::Pending(e.to_string()),
                })
            },
        )
        .await
        .with_context(|| format!("{}; log tail:\n{}", self.name, tail(&self.log, 20)))
    }

    /// SIGTERM (the drain), then waits for the exit within `bound`.
    pub async fn terminate(mut self, bound: Duration) -> Result<Exit> {
        let pid = self.child.id().context("process already reaped")?;
        signal(pid, libc::SIGTERM)?;
        let (status, after) = wait_exit(&mut self.child, bound)
            .await
            .with_context(|| format!("{} after SIGTERM", self.name))?;
        Ok(Exit {
            name: self.name,
            status,
            after,
        })
    }

    /// SIGKILL: no drain, no close frames; the agents see their connections reset.
    pub async fn kill(mut self) -> Result<Exit> {
        let pid = self.child.id().context("process already reaped")?;
        signal(pid, libc::SIGKILL)?;
        let (status, after) = wait_exit(&mut self.child, Duration::from_secs(10)).await?;
        Ok(Exit {
            name: self.name,
            status,
            after,
        })
    }
}
