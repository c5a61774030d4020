//! What the scenarios ask of the kind target: Helm upgrades for profiles and rollouts,
//! the HPA's decisions read from its own status, containers killed through the node's
//! runtime, and pods reached directly through `kubectl port-forward`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use ::kube::Api;
use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::command::output;
use super::kube::{HpaState, hpa_state, pod_infos, pod_ready, server_pods};
use super::{KindTarget, MINUTE, NAMESPACE, RELEASE, SERVER_SELECTOR, step};
use crate::endpoint::Endpoint;
use crate::target::{PodEndpoint, PodInfo, Profile, Scaling, Target};
use crate::tokens::Minter;
use crate::wait::{self, Check};

impl KindTarget {
    async fn pod_names(&self) -> Result<Vec<String>> {
        Ok(self.pods().await?.into_iter().map(|p| p.name).collect())
    }

    /// Waits until the HPA is at its minimum by its own account (desired = current =
    /// minimum, that many server pods, none terminating), and remembers its last scale
    /// time: a scale-out the harness accepts must come after it.
    async fn wait_hpa_at_minimum(&mut self, what: &str) -> Result<HpaState> {
        let min = self.profile.replicas as i32;
        let client = self.client();
        let state = wait::until_retrying(what, 10 * MINUTE, Duration::from_secs(3), || async {
            let hpa = hpa_state(&client, NAMESPACE, RELEASE).await?;
            let pods = server_pods(&client, NAMESPACE, SERVER_SELECTOR).await?;
            let terminating = pods
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_some())
                .count();
            let ready = pods.iter().filter(|p| pod_ready(p)).count();
            let state = format!(
                "HPA {}; {} pods, {ready} ready, {terminating} terminating",
                hpa.summary(),
                pods.len()
            );
            Ok(
                if hpa.desired == min
                    && hpa.current == min
                    && pods.len() as i32 == min
                    && ready as i32 == min
                    && terminating == 0
                {
                    Check::Ready(hpa)
                } else {
                    Check::Pending(state)
                },
            )
        })
        .await?;
        self.last_scale = state.last_scale.clone();
        Ok(state)
    }

    /// The Deployment's `spec.replicas`: with autoscaling on, only the HPA writes it.
    async fn deployment_replicas(&self) -> Result<i32> {
        let d = Api::<Deployment>::namespaced(self.client(), NAMESPACE)
            .get(RELEASE)
            .await
            .context("reading the server Deployment")?;
        Ok(d.spec.replicas.unwrap_or(0))
    }

    /// Deletes the cluster unless `--keep`.
    pub async fn finish(mut self) -> Result<()> {
        self.teardown_steps().await
    }
}

impl Target for KindTarget {
    fn name(&self) -> &'static str {
        "kind"
    }

    fn endpoint(&self) -> Endpoint {
        // The generated kind config maps 127.0.0.1:<http_port> to the ingress node's port
        // 80 (ingress-nginx's hostPort). The port is part of the authority, so URLs carry
        // it; the host name is sent, never resolved, and nginx matches it without the port.
        Endpoint::new(
            ([127, 0, 0, 1], self.http_port).into(),
            format!("{}:{}", self.host, self.http_port),
        )
    }

    fn minter(&self) -> Minter {
        Minter::new(&self.secret)
    }

    fn scaling(&self) -> Scaling {
        Scaling::Autoscaler
    }

    fn load_workers(&self) -> usize {
        24
    }

    fn caveats(&self) -> &'static [&'static str] {
        &[]
    }

    async fn apply(&mut self, profile: &Profile) -> Result<()> {
        if *profile == self.profile {
            self.settle().await?;
        } else {
            step("helm upgrade with the scenario's settings");
            self.registry_generation += 1;
            self.helm_upgrade(profile).await?;
            self.profile = profile.clone();
            self.wait_rolled_out(profile, 10 * MINUTE).await?;
        }
        // A scenario starts from the HPA's minimum: traffic of an earlier scenario may
        // have scaled it out, and the hpa scenario must see its own scale-out.
        let hpa = self
            .wait_hpa_at_minimum("the HPA to be at its minimum before the scenario")
            .await?;
        println!("  HPA at its minimum: {}", hpa.summary());
        Ok(())
    }

    async fn pods(&self) -> Result<Vec<PodInfo>> {
        pod_infos(&self.client(), NAMESPACE, RELEASE, SERVER_SELECTOR).await
    }

    async fn pod_endpoint(&self, name: &str) -> Result<PodEndpoint> {
        // Pod IPs are not routable from the host, and the chart's NetworkPolicy admits
        // only the ingress controller. `kubectl port-forward` enters the pod's own network
        // namespace through the kubelet, so it reaches the server port as the pod itself.
        let kubeconfig = self.kubeconfig.display().to_string();
        let mut child = Command::new("kubectl")
            .args([
                "--kubeconfig",
                &kubeconfig,
                "-n",
                NAMESPACE,
                "port-forward",
                "--address",
                "127.0.0.1",
                &format!("pod/{name}"),
                ":http",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting kubectl port-forward")?;
        let stdout = child.stdout.take().context("port-forward's output")?;
        // "Forwarding from 127.0.0.1:41234 -> 8080"
        let port = wait::bounded("kubectl port-forward to listen", MINUTE, async {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(port) = line
                    .strip_prefix("Forwarding from 127.0.0.1:")
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|p| p.parse::<u16>().ok())
                {
                    return Some(port);
                }
            }
            None
        })
        .await?
        .with_context(|| format!("kubectl port-forward to {name} ended before listening"))?;
        Ok(PodEndpoint::new(
            Endpoint::direct(([127, 0, 0, 1], port).into()),
            Some(child),
        ))
    }

    async fn rollout(&mut self) -> Result<()> {
        // A new pod annotation is a new pod template: a rollout, as `helm upgrade` with a
        // new image tag would cause.
        let token = format!("{}", uuid::Uuid::new_v4().simple());
        self.rollout_token = Some(token);
        let profile = self.profile.clone();
        self.helm_upgrade(&profile).await?;
        self.wait_rolled_out(&profile, 10 * MINUTE).await
    }

    async fn scale_out(&mut self) -> Result<Vec<String>> {
        let before = self.pod_names().await?;
        let min = self.profile.replicas as i32;
        let since = self.last_scale.clone();
        let client = self.client();
        // Accepted only on the HPA's own record: a desired count above the minimum, and
        // a last scale time newer than the one it had at the minimum (before the load).
        let hpa = wait::until_retrying(
            "the HPA to scale out and the new pods to be ready",
            10 * MINUTE,
            Duration::from_secs(3),
            || async {
                let hpa = hpa_state(&client, NAMESPACE, RELEASE).await?;
                let pods = server_pods(&client, NAMESPACE, SERVER_SELECTOR).await?;
                let live: Vec<&Pod> = pods
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .collect();
                let ready = live.iter().filter(|p| pod_ready(p)).count() as i32;
                let state = format!("HPA {}; {ready}/{} pods ready", hpa.summary(), live.len());
                Ok(
                    if hpa.desired > min
                        && hpa.last_scale != since
                        && hpa.current == hpa.desired
                        && ready == hpa.desired
                        && live.len() as i32 == hpa.desired
                    {
                        Check::Ready(hpa)
                    } else {
                        Check::Pending(state)
                    },
                )
            },
        )
        .await?;
        let replicas = self.deployment_replicas().await?;
        if replicas != hpa.desired {
            bail!(
                "the Deployment asks for {replicas} replicas but the HPA decided {}: something other than the HPA scaled it",
                hpa.desired
            );
        }
        if !hpa.holds("AbleToScale") || !hpa.holds("ScalingActive") {
            bail!(
                "the HPA scaled out but does not report itself able and active: {}",
                hpa.summary()
            );
        }
        println!("  the HPA's own status: {}", hpa.summary());
        self.last_scale = hpa.last_scale.clone();
        let after = self.pod_names().await?;
        Ok(after.into_iter().filter(|p| !before.contains(p)).collect())
    }

    async fn scale_in(&mut self) -> Result<Vec<String>> {
        let before = self.pod_names().await?;
        let since = self.last_scale.clone();
        let hpa = self
            .wait_hpa_at_minimum("the HPA to scale back to its minimum")
            .await?;
        if hpa.last_scale == since {
            bail!(
                "the pods are back at the minimum but the HPA recorded no scale-down (lastScaleTime unchanged): {}",
                hpa.summary()
            );
        }
        let replicas = self.deployment_replicas().await?;
        if replicas != hpa.desired {
            bail!(
                "the Deployment asks for {replicas} replicas but the HPA decided {}",
                hpa.desired
            );
        }
        println!("  the HPA's own status: {}", hpa.summary());
        let after = self.pod_names().await?;
        Ok(before.into_iter().filter(|p| !after.contains(p)).collect())
    }

    async fn kill_pod(&mut self, name: &str) -> Result<()> {
        // Deleting the pod would start a graceful termination (SIGTERM, drain). To kill
        // without grace, stop its container with a zero timeout through the node's
        // container runtime: SIGKILL at once. The kubelet then restarts the container in
        // the same pod, as it would after a crash or an OOM kill.
        let pod = Api::<Pod>::namespaced(self.client(), NAMESPACE)
            .get(name)
            .await
            .with_context(|| format!("reading pod {name}"))?;
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .context("pod not scheduled")?;
        let status = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.name == "server"))
            .context("pod has no server container")?;
        let restarts = status.restart_count;
        let container = status
            .container_id
            .clone()
            .context("pod has no running server container")?;
        let id = container
            .split_once("://")
            .map_or(container.as_str(), |(_, id)| id)
            .to_string();
        output(
            "docker",
            &["exec", &node, "crictl", "stop", "--timeout", "0", &id],
            MINUTE,
        )
        .await
        .with_context(|| format!("stopping container {id} of {name} on node {node}"))?;
        self.killed.push((name.to_string(), restarts));
        Ok(())
    }

    async fn settle(&mut self) -> Result<()> {
        // The Deployment may still look complete before the kubelet has noticed a killed
        // container; wait for the restart itself first.
        let api = Api::<Pod>::namespaced(self.client(), NAMESPACE);
        for (name, before) in std::mem::take(&mut self.killed) {
            wait::until_retrying(
                &format!("{name}'s server container to restart and be ready"),
                5 * MINUTE,
                Duration::from_secs(1),
                || async {
                    let pod = api.get(&name).await?;
                    let restarts = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .and_then(|cs| cs.iter().find(|c| c.name == "server"))
                        .map_or(before, |c| c.restart_count);
                    Ok(if restarts > before && pod_ready(&pod) {
                        Check::Ready(())
                    } else {
                        Check::Pending(format!("{} restarts, ready: {}", restarts, pod_ready(&pod)))
                    })
                },
            )
            .await?;
        }
        let profile = self.profile.clone();
        self.wait_rolled_out(&profile, 10 * MINUTE).await
    }

    async fn collect_artifacts(&self, label: &str) -> Result<PathBuf> {
        self.save_artifacts(label).await
    }
}
