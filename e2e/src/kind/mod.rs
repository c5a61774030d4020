//! The kind target: a real Kubernetes cluster in Docker, the chart installed with Helm,
//! ingress-nginx in front, metrics-server and the HPA deciding the replica count.
//!
//! Setup steps, each idempotent (a second run reuses what the first one made), each with a
//! progress line and a bound:
//! 1. prerequisites: docker (with a reachable daemon), kind, kubectl, helm;
//! 2. the cluster `agent-server-e2e` from `kind-config.yaml` (created, or reused);
//! 3. `docker build -t agent-server:e2e .` and `kind load docker-image` (kind skips nodes
//!    that already have the image);
//! 4. ingress-nginx's kind manifest and metrics-server, both pinned, metrics-server with
//!    `--kubelet-insecure-tls` (kind's kubelets have self-signed certificates);
//! 5. `helm upgrade --install` with `chart/ci/kind-values.yaml` plus the harness's
//!    overrides (`target/e2e-artifacts/kind/e2e-values.yaml`), then every Deployment and
//!    StatefulSet of the namespace awaited through the API, `helm test`, and the ingress
//!    answering for the chart's host.
//!
//! The harness's overrides, and why:
//! - `auth.secretKey`: generated per run so the harness can mint admin and agent tokens;
//! - `persistence.enabled: false`: kind's storage class is ReadWriteOnce on one node, which
//!   would pin every server pod to that node; the scenarios do not use agent binaries;
//! - `autoscaling`: minimum = `--replicas`, maximum two above, CPU only (memory
//!   utilisation does not fall when load stops, so it would block the scale-down), and
//!   short stabilisation windows so the hpa scenario takes minutes, not a quarter hour;
//! - `podAnnotations`: the image's id (a rebuilt image rolls the pods even though its tag
//!   stays `e2e`) and, after the rolling-update scenario, its rollout token;
//! - per scenario: heartbeat, offline timeout and ingress timeouts;
//! - `config.redisKeyPrefix`: a new one with each of those profiles. The pods a profile
//!   change replaces hold no agents and exit right after SIGTERM, before their rebalancing
//!   tick takes their count out of Redis; the server keeps such counts for three
//!   heartbeats, and the new pods, averaging over phantom pods, would shed agents without
//!   end. A fresh prefix is what a fresh release sees; rollouts, HPA scaling and kills
//!   keep the prefix, so the scenarios exercise the registry as deployed.

mod command;
mod kube;

use std::path::PathBuf;
use std::time::Duration;

use ::kube::Client;
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use anyhow::{Context, Result, bail};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{Value, json};

use self::kube::{hpa_state, namespace_rolled_out, pod_infos, pod_ready, server_pods};
use crate::cluster::{Cluster, PodInfo, Profile, Scaling};
use crate::endpoint::Endpoint;
use crate::tokens::Minter;
use crate::values::{ChartValues, whole_seconds};
use crate::wait::{self, Check};
use command::{TOOLS, output, streamed, which};

/// ingress-nginx's manifest for kind, pinned. ingress-nginx is retired (March 2026); this
/// is its last release line, and what the chart's `ingress.preset: nginx` targets.
pub const INGRESS_NGINX_MANIFEST: &str = "https://raw.githubusercontent.com/kubernetes/ingress-nginx/controller-v1.14.3/deploy/static/provider/kind/deploy.yaml";
/// metrics-server, pinned; patched with `--kubelet-insecure-tls` for kind.
pub const METRICS_SERVER_MANIFEST: &str =
    "https://github.com/kubernetes-sigs/metrics-server/releases/download/v0.8.1/components.yaml";

const NAMESPACE: &str = "agent-server-e2e";
/// The release name; it contains the chart's name, so resources are named `agent-server`.
const RELEASE: &str = "agent-server";
const SERVER_SELECTOR: &str =
    "app.kubernetes.io/name=agent-server,app.kubernetes.io/instance=agent-server";
/// Pods the HPA may add above the minimum.
const HPA_HEADROOM: usize = 2;

const MINUTE: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct KindOptions {
    pub repo: PathBuf,
    pub cluster_name: String,
    /// kubeconfig, values overrides and failure artifacts.
    pub artifacts: PathBuf,
    pub skip_build: bool,
    pub replicas: usize,
}

pub struct KindCluster {
    opts: KindOptions,
    kubeconfig: PathBuf,
    client: Client,
    secret: String,
    /// `ingress.host` of the kind values; the ingress answers for it on 127.0.0.1:80.
    host: String,
    /// `image.repository:image.tag` of the kind values.
    image: String,
    image_id: String,
    /// Set by `rollout`, kept in every later upgrade so it does not roll again.
    rollout_token: Option<String>,
    /// Part of `config.redisKeyPrefix`, bumped with every new profile; see the module
    /// documentation.
    registry_generation: u32,
    /// The chart's ingress read timeout, for profiles that keep it.
    chart_read_timeout: Duration,
    /// Pods whose container was killed, with its restart count before the kill; `settle`
    /// waits for each to be restarted and ready.
    killed: Vec<(String, i32)>,
    profile: Profile,
}

impl KindCluster {
    /// Runs the setup steps. On failure after the cluster exists, the cluster is returned
    /// with the error so that its state can be collected.
    pub async fn setup(
        opts: KindOptions,
    ) -> Result<KindCluster, (anyhow::Error, Option<KindCluster>)> {
        let mut cluster = Self::connect(opts).await.map_err(|e| (e, None))?;
        match cluster.prepare().await {
            Ok(()) => Ok(cluster),
            Err(e) => Err((e, Some(cluster))),
        }
    }

    /// Steps 1 and 2: prerequisites, the cluster, an API client.
    async fn connect(opts: KindOptions) -> Result<KindCluster> {
        step("checking prerequisites");
        let missing: Vec<String> = TOOLS
            .iter()
            .filter(|t| which(t.name).is_none())
            .map(|t| format!("  - {} is missing. {}", t.name, t.install))
            .collect();
        if !missing.is_empty() {
            bail!(
                "the kind target needs docker, kind, kubectl and helm:\n{}\n(no Docker here? `just e2e-local` runs the same scenarios on processes)",
                missing.join("\n")
            );
        }
        output(
            "docker",
            &["info", "--format", "{{.ServerVersion}}"],
            Duration::from_secs(30),
        )
        .await
        .context(
            "the Docker daemon does not answer; start it (kind runs its nodes as containers)",
        )?;

        std::fs::create_dir_all(&opts.artifacts)?;
        let name = opts.cluster_name.clone();
        step(&format!("kind cluster {name}"));
        let clusters = output("kind", &["get", "clusters"], MINUTE).await?;
        if clusters.lines().any(|l| l.trim() == name) {
            println!("  reusing the existing cluster");
        } else {
            let config = opts.repo.join("kind-config.yaml");
            let config = config.to_string_lossy();
            streamed(
                "kind",
                &[
                    "create", "cluster", "--name", &name, "--config", &config, "--wait", "180s",
                ],
                None,
                10 * MINUTE,
            )
            .await?;
        }
        let kubeconfig_text =
            output("kind", &["get", "kubeconfig", "--name", &name], MINUTE).await?;
        let kubeconfig = opts.artifacts.join("kubeconfig");
        write_private(&kubeconfig, &kubeconfig_text)?;
        let client = client(&kubeconfig_text, &format!("kind-{name}")).await?;
        wait_nodes_ready(&client).await?;

        let chart = opts.repo.join("chart");
        let values = ChartValues::load(&chart, &[&chart.join("ci/kind-values.yaml")])?;
        let host = values.text("ingress.host")?;
        let image = format!(
            "{}:{}",
            values.text("image.repository")?,
            values.text("image.tag")?
        );
        let chart_read_timeout = values.ingress()?.read_timeout;
        let secret = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        Ok(KindCluster {
            profile: Profile::standard(opts.replicas),
            opts,
            kubeconfig,
            client,
            secret,
            host,
            image,
            image_id: String::new(),
            rollout_token: None,
            registry_generation: 1,
            chart_read_timeout,
            killed: Vec::new(),
        })
    }

    /// Steps 3 to 5.
    async fn prepare(&mut self) -> Result<()> {
        let name = self.opts.cluster_name.clone();
        if self.opts.skip_build {
            step(&format!(
                "using the existing image {} (--skip-build)",
                self.image
            ));
        } else {
            step(&format!("docker build -t {} .", self.image));
            streamed(
                "docker",
                &["build", "-t", &self.image, "."],
                Some(&self.opts.repo),
                45 * MINUTE,
            )
            .await?;
        }
        self.image_id = output(
            "docker",
            &["image", "inspect", &self.image, "--format", "{{.Id}}"],
            MINUTE,
        )
        .await
        .with_context(|| format!("no image {}; build it or drop --skip-build", self.image))?
        .trim()
        .to_string();
        step(&format!("kind load docker-image {}", self.image));
        streamed(
            "kind",
            &["load", "docker-image", &self.image, "--name", &name],
            None,
            10 * MINUTE,
        )
        .await?;

        step("ingress-nginx (pinned kind manifest)");
        self.kubectl(&["apply", "-f", INGRESS_NGINX_MANIFEST], 5 * MINUTE)
            .await?;
        self.wait_deployment("ingress-nginx", "ingress-nginx-controller", 5 * MINUTE)
            .await?;
        self.wait_admission_webhook().await?;

        step("metrics-server (pinned, with --kubelet-insecure-tls)");
        self.kubectl(&["apply", "-f", METRICS_SERVER_MANIFEST], 5 * MINUTE)
            .await?;
        self.ensure_insecure_kubelet_tls().await?;
        self.wait_deployment("kube-system", "metrics-server", 5 * MINUTE)
            .await?;
        self.wait_metrics_api().await?;

        step(&format!(
            "helm upgrade --install {RELEASE} chart/ (namespace {NAMESPACE})"
        ));
        let profile = self.profile.clone();
        self.helm_upgrade(&profile).await?;
        self.wait_rolled_out(&profile, 10 * MINUTE).await?;

        step(&format!("helm test {RELEASE}"));
        let kubeconfig = self.kubeconfig.to_string_lossy().to_string();
        output(
            "helm",
            &[
                "test",
                RELEASE,
                "--namespace",
                NAMESPACE,
                "--kubeconfig",
                &kubeconfig,
                "--timeout",
                "3m",
                "--logs",
            ],
            4 * MINUTE,
        )
        .await?;

        step(&format!("the ingress answering for {}", self.host));
        self.wait_ingress_health().await?;
        Ok(())
    }

    async fn kubectl(&self, args: &[&str], bound: Duration) -> Result<String> {
        let kubeconfig = self.kubeconfig.to_string_lossy().to_string();
        let mut all = vec!["--kubeconfig", &kubeconfig];
        all.extend_from_slice(args);
        output("kubectl", &all, bound).await
    }

    async fn wait_deployment(&self, ns: &str, name: &str, bound: Duration) -> Result<()> {
        let api = ::kube::Api::<Deployment>::namespaced(self.client.clone(), ns);
        wait::until(
            &format!("deployment {ns}/{name}"),
            bound,
            Duration::from_secs(2),
            || async {
                Ok(match api.get_opt(name).await? {
                    None => Check::Pending("not created yet".into()),
                    Some(d) => match kube::deployment_progress(&d) {
                        (true, _) => Check::Ready(()),
                        (false, state) => Check::Pending(state),
                    },
                })
            },
        )
        .await
    }

    /// ingress-nginx validates every Ingress through its admission webhook; until a Job
    /// patches the webhook's CA bundle in, creating the chart's Ingress fails.
    async fn wait_admission_webhook(&self) -> Result<()> {
        let api = ::kube::Api::<ValidatingWebhookConfiguration>::all(self.client.clone());
        wait::until(
            "ingress-nginx's admission webhook to get its CA bundle",
            5 * MINUTE,
            Duration::from_secs(2),
            || async {
                let patched = api
                    .get_opt("ingress-nginx-admission")
                    .await?
                    .and_then(|w| w.webhooks)
                    .is_some_and(|hooks| {
                        !hooks.is_empty()
                            && hooks.iter().all(|h| {
                                h.client_config
                                    .ca_bundle
                                    .as_ref()
                                    .is_some_and(|b| !b.0.is_empty())
                            })
                    });
                Ok(if patched {
                    Check::Ready(())
                } else {
                    Check::Pending("CA bundle not patched in yet".into())
                })
            },
        )
        .await
    }

    /// Adds `--kubelet-insecure-tls` to metrics-server unless it is there already.
    async fn ensure_insecure_kubelet_tls(&self) -> Result<()> {
        const FLAG: &str = "--kubelet-insecure-tls";
        let api = ::kube::Api::<Deployment>::namespaced(self.client.clone(), "kube-system");
        let mut d = api
            .get("metrics-server")
            .await
            .context("reading metrics-server")?;
        let container = d
            .spec
            .template
            .spec
            .as_mut()
            .and_then(|s| s.containers.first_mut())
            .context("metrics-server has no container")?;
        let args = container.args.get_or_insert_with(Vec::new);
        if args.iter().any(|a| a == FLAG) {
            println!("  {FLAG} already set");
            return Ok(());
        }
        args.push(FLAG.to_string());
        api.replace("metrics-server", &Default::default(), &d)
            .await
            .context("adding --kubelet-insecure-tls to metrics-server")?;
        println!("  {FLAG} added");
        Ok(())
    }

    /// The HPA reads the metrics API; it answers once metrics-server has scraped kubelets.
    async fn wait_metrics_api(&self) -> Result<()> {
        let client = self.client.clone();
        wait::until(
            "the metrics API to serve node metrics",
            5 * MINUTE,
            Duration::from_secs(3),
            || async {
                let request =
                    http::Request::get("/apis/metrics.k8s.io/v1beta1/nodes").body(Vec::new())?;
                Ok(match client.request::<Value>(request).await {
                    Ok(v) if v["items"].as_array().is_some_and(|i| !i.is_empty()) => {
                        Check::Ready(())
                    }
                    Ok(_) => Check::Pending("no node metrics yet".into()),
                    Err(e) => Check::Pending(e.to_string()),
                })
            },
        )
        .await
    }

    async fn helm_upgrade(&self, profile: &Profile) -> Result<()> {
        let values_file = self.opts.artifacts.join("e2e-values.yaml");
        let values = overrides(
            profile,
            &self.secret,
            &self.image_id,
            self.rollout_token.as_deref(),
            self.registry_generation,
        );
        let text = serde_yaml_ng::to_string(&values)?;
        write_private(&values_file, &text)?;
        let chart = self.opts.repo.join("chart");
        let kind_values = chart.join("ci/kind-values.yaml");
        let kubeconfig = self.kubeconfig.to_string_lossy().to_string();
        output(
            "helm",
            &[
                "upgrade",
                "--install",
                RELEASE,
                &chart.to_string_lossy(),
                "--namespace",
                NAMESPACE,
                "--create-namespace",
                "--kubeconfig",
                &kubeconfig,
                "-f",
                &kind_values.to_string_lossy(),
                "-f",
                &values_file.to_string_lossy(),
                "--timeout",
                "10m",
            ],
            11 * MINUTE,
        )
        .await?;
        Ok(())
    }

    /// Everything of the release rolled out, the server pods all ready at the profile's
    /// count, and the ingress configured with the profile's read timeout.
    async fn wait_rolled_out(&self, profile: &Profile, bound: Duration) -> Result<()> {
        // The replica count is the Deployment's own (the HPA's decision), not the
        // profile's minimum: light scenario traffic may legitimately scale it up.
        let client = self.client.clone();
        wait::until(
            "the release to roll out",
            bound,
            Duration::from_secs(2),
            || async {
                let (done, state) =
                    namespace_rolled_out(&client, NAMESPACE, SERVER_SELECTOR).await?;
                Ok(if done {
                    Check::Ready(())
                } else {
                    Check::Pending(state)
                })
            },
        )
        .await?;
        self.wait_ingress_timeout(profile.ingress_timeout.unwrap_or(self.chart_read_timeout))
            .await
    }

    /// ingress-nginx writes each Ingress's annotations into its nginx.conf and reloads;
    /// waits until the server block for our host carries `proxy_read_timeout <t>s`.
    async fn wait_ingress_timeout(&self, timeout: Duration) -> Result<()> {
        let expected = format!("{}s;", whole_seconds(timeout));
        let host = self.host.clone();
        wait::until(
            &format!("ingress-nginx to apply proxy_read_timeout {expected}"),
            3 * MINUTE,
            Duration::from_secs(2),
            || async {
                let conf = self
                    .kubectl(
                        &[
                            "-n",
                            "ingress-nginx",
                            "exec",
                            "deploy/ingress-nginx-controller",
                            "--",
                            "cat",
                            "/etc/nginx/nginx.conf",
                        ],
                        MINUTE,
                    )
                    .await?;
                let timeouts = read_timeouts_for(&conf, &host);
                Ok(
                    if !timeouts.is_empty() && timeouts.iter().all(|t| *t == expected) {
                        Check::Ready(())
                    } else {
                        Check::Pending(format!("server {host}: proxy_read_timeout {timeouts:?}"))
                    },
                )
            },
        )
        .await
    }

    async fn wait_ingress_health(&self) -> Result<()> {
        let endpoint = self.endpoint();
        let http = endpoint.http_client(Duration::from_secs(5));
        let url = endpoint.http_url("/health");
        wait::until(
            "GET /health through the ingress",
            3 * MINUTE,
            Duration::from_secs(1),
            || async {
                Ok(match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => Check::Ready(()),
                    Ok(r) => Check::Pending(format!("status {}", r.status())),
                    Err(e) => Check::Pending(e.to_string()),
                })
            },
        )
        .await
    }

    async fn pod_names(&self) -> Result<Vec<String>> {
        Ok(self.pods().await?.into_iter().map(|p| p.name).collect())
    }

    /// Deletes the cluster unless `keep`.
    pub async fn finish(self, keep: bool) -> Result<()> {
        let name = &self.opts.cluster_name;
        if keep {
            println!(
                "\ncluster {name} kept (--keep): kubectl --kubeconfig {} -n {NAMESPACE} get pods; delete it with `just e2e-down`",
                self.kubeconfig.display()
            );
            return Ok(());
        }
        step(&format!("kind delete cluster --name {name}"));
        output("kind", &["delete", "cluster", "--name", name], 5 * MINUTE).await?;
        Ok(())
    }
}

impl Cluster for KindCluster {
    fn target(&self) -> &'static str {
        "kind"
    }

    fn endpoint(&self) -> Endpoint {
        // kind-config.yaml maps the control-plane's port 80 (ingress-nginx's hostPort) to
        // 127.0.0.1:80; the host name is sent, never resolved.
        Endpoint::new(([127, 0, 0, 1], 80).into(), self.host.clone())
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
            return self.settle().await;
        }
        step("helm upgrade with the scenario's settings");
        self.registry_generation += 1;
        self.helm_upgrade(profile).await?;
        self.profile = profile.clone();
        self.wait_rolled_out(profile, 10 * MINUTE).await
    }

    async fn pods(&self) -> Result<Vec<PodInfo>> {
        pod_infos(&self.client, NAMESPACE, RELEASE, SERVER_SELECTOR).await
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
        let client = self.client.clone();
        wait::until(
            "the HPA to scale out and the new pods to be ready",
            10 * MINUTE,
            Duration::from_secs(3),
            || async {
                let (current, desired, cpu) = hpa_state(&client, NAMESPACE, RELEASE).await?;
                let pods = server_pods(&client, NAMESPACE, SERVER_SELECTOR).await?;
                let live: Vec<&Pod> = pods
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .collect();
                let ready = live.iter().filter(|p| pod_ready(p)).count() as i32;
                let state = format!(
                    "HPA {cpu}, replicas {current} → {desired}; {ready}/{} pods ready",
                    live.len()
                );
                Ok(
                    if desired > min
                        && current == desired
                        && ready == desired
                        && live.len() as i32 == desired
                    {
                        Check::Ready(())
                    } else {
                        Check::Pending(state)
                    },
                )
            },
        )
        .await?;
        let after = self.pod_names().await?;
        Ok(after.into_iter().filter(|p| !before.contains(p)).collect())
    }

    async fn scale_in(&mut self) -> Result<Vec<String>> {
        let before = self.pod_names().await?;
        let min = self.profile.replicas as i32;
        let client = self.client.clone();
        wait::until(
            "the HPA to scale back to its minimum",
            10 * MINUTE,
            Duration::from_secs(3),
            || async {
                let (current, desired, cpu) = hpa_state(&client, NAMESPACE, RELEASE).await?;
                let pods = server_pods(&client, NAMESPACE, SERVER_SELECTOR).await?;
                let terminating = pods
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_some())
                    .count();
                let state = format!(
                    "HPA {cpu}, replicas {current} → {desired}; {} pods, {terminating} terminating",
                    pods.len()
                );
                Ok(
                    if desired == min
                        && current == min
                        && pods.len() as i32 == min
                        && terminating == 0
                    {
                        Check::Ready(())
                    } else {
                        Check::Pending(state)
                    },
                )
            },
        )
        .await?;
        let after = self.pod_names().await?;
        Ok(before.into_iter().filter(|p| !after.contains(p)).collect())
    }

    async fn kill_pod(&mut self, name: &str) -> Result<()> {
        // Deleting the pod would start a graceful termination (SIGTERM, drain). To kill
        // without grace, stop its container with a zero timeout through the node's
        // container runtime: SIGKILL at once. The kubelet then restarts the container in
        // the same pod, as it would after a crash or an OOM kill.
        let pod = ::kube::Api::<Pod>::namespaced(self.client.clone(), NAMESPACE)
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
        let api = ::kube::Api::<Pod>::namespaced(self.client.clone(), NAMESPACE);
        for (name, before) in std::mem::take(&mut self.killed) {
            wait::until(
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
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let dir = self.opts.artifacts.join(format!("{label}-{stamp}"));
        std::fs::create_dir_all(dir.join("logs"))?;
        let save = |file: &str, result: Result<String>| {
            let text = result.unwrap_or_else(|e| format!("(failed: {e:#})\n"));
            let _ = std::fs::write(dir.join(file), text);
        };
        let bound = 2 * MINUTE;
        save(
            "resources.txt",
            self.kubectl(
                &[
                    "get",
                    "all,ingress,hpa,pdb,networkpolicy,pvc,endpointslices",
                    "-A",
                    "-o",
                    "wide",
                ],
                bound,
            )
            .await,
        );
        save(
            "events.txt",
            self.kubectl(&["get", "events", "-A", "--sort-by=.lastTimestamp"], bound)
                .await,
        );
        for ns in [NAMESPACE, "ingress-nginx"] {
            save(
                &format!("describe-{ns}.txt"),
                self.kubectl(
                    &[
                        "describe",
                        "pods,deployments,statefulsets,hpa,ingress",
                        "-n",
                        ns,
                    ],
                    bound,
                )
                .await,
            );
        }
        save(
            "describe-metrics-server.txt",
            self.kubectl(
                &[
                    "describe",
                    "pods",
                    "-n",
                    "kube-system",
                    "-l",
                    "k8s-app=metrics-server",
                ],
                bound,
            )
            .await,
        );
        let kubeconfig = self.kubeconfig.to_string_lossy().to_string();
        save(
            "helm.txt",
            output(
                "helm",
                &[
                    "status",
                    RELEASE,
                    "-n",
                    NAMESPACE,
                    "--kubeconfig",
                    &kubeconfig,
                    "--show-resources",
                ],
                bound,
            )
            .await,
        );
        save(
            "ingress-nginx.conf",
            self.kubectl(
                &[
                    "-n",
                    "ingress-nginx",
                    "exec",
                    "deploy/ingress-nginx-controller",
                    "--",
                    "cat",
                    "/etc/nginx/nginx.conf",
                ],
                bound,
            )
            .await,
        );
        for ns in [NAMESPACE, "ingress-nginx"] {
            let api = ::kube::Api::<Pod>::namespaced(self.client.clone(), ns);
            let Ok(pods) = api.list(&Default::default()).await else {
                continue;
            };
            for pod in pods {
                let name = pod.metadata.name.clone().unwrap_or_default();
                for status in pod
                    .status
                    .and_then(|s| s.container_statuses)
                    .unwrap_or_default()
                {
                    let mut params = ::kube::api::LogParams {
                        container: Some(status.name.clone()),
                        ..Default::default()
                    };
                    let log = api.logs(&name, &params).await.map_err(Into::into);
                    save(&format!("logs/{ns}_{name}_{}.log", status.name), log);
                    if status.restart_count > 0 {
                        params.previous = true;
                        let log = api.logs(&name, &params).await.map_err(Into::into);
                        save(
                            &format!("logs/{ns}_{name}_{}.previous.log", status.name),
                            log,
                        );
                    }
                }
            }
        }
        Ok(dir)
    }
}

/// The harness's values overrides for `profile` (see the module documentation).
fn overrides(
    profile: &Profile,
    secret: &str,
    image_id: &str,
    rollout_token: Option<&str>,
    generation: u32,
) -> Value {
    let min = profile.replicas;
    let mut annotations = json!({"e2e/image-id": image_id});
    if let Some(token) = rollout_token {
        annotations["e2e/rollout"] = json!(token);
    }
    let mut values = json!({
        "auth": {"secretKey": secret},
        "config": {"redisKeyPrefix": format!("agent-server-e2e-{generation}:")},
        "persistence": {"enabled": false},
        "replicaCount": min,
        "podAnnotations": annotations,
        "autoscaling": {
            "enabled": true,
            "minReplicas": min,
            "maxReplicas": min + HPA_HEADROOM,
            "targetMemoryUtilizationPercentage": 0,
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": 30,
                    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]
                }
            }
        }
    });
    if let Some(h) = profile.heartbeat {
        values["config"]["wsHeartbeatInterval"] = json!(whole_seconds(h).to_string());
    }
    if let Some(o) = profile.offline_timeout {
        values["config"]["wsOfflineTimeout"] = json!(whole_seconds(o).to_string());
    }
    if let Some(t) = profile.ingress_timeout {
        values["ingress"]["nginx"]["proxyReadTimeout"] = json!(whole_seconds(t));
        values["ingress"]["nginx"]["proxySendTimeout"] = json!(whole_seconds(t));
    }
    values
}

async fn client(kubeconfig: &str, context: &str) -> Result<Client> {
    let kubeconfig = Kubeconfig::from_yaml(kubeconfig).context("parsing kind's kubeconfig")?;
    let options = KubeConfigOptions {
        context: Some(context.to_string()),
        ..Default::default()
    };
    let config = ::kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .context("loading kind's kubeconfig")?;
    Client::try_from(config).context("building the Kubernetes client")
}

async fn wait_nodes_ready(client: &Client) -> Result<()> {
    let api = ::kube::Api::<Node>::all(client.clone());
    wait::until(
        "every node to be Ready",
        5 * MINUTE,
        Duration::from_secs(2),
        || async {
            let nodes = api.list(&Default::default()).await?.items;
            let ready = nodes
                .iter()
                .filter(|n| {
                    n.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
                })
                .count();
            Ok(if ready == nodes.len() && ready > 0 {
                Check::Ready(())
            } else {
                Check::Pending(format!("{ready}/{} ready", nodes.len()))
            })
        },
    )
    .await
}

/// The `proxy_read_timeout` values inside the server block for `host` of an
/// ingress-nginx configuration (its blocks are delimited by `## start server <host>` and
/// `## end server <host>`).
fn read_timeouts_for(conf: &str, host: &str) -> Vec<String> {
    let start = format!("## start server {host}");
    let end = format!("## end server {host}");
    let Some(from) = conf.find(&start) else {
        return Vec::new();
    };
    let block = &conf[from..];
    let block = &block[..block.find(&end).unwrap_or(block.len())];
    block
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("proxy_read_timeout"))
        .map(|v| v.trim().to_string())
        .collect()
}

fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn step(what: &str) {
    println!("==> {what}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_timeouts_come_from_the_hosts_server_block_only() {
        let conf = "\
## start server other.example
    proxy_read_timeout                      60s;
## end server other.example
## start server agent-server.localtest.me
    location /ws {
        proxy_read_timeout                      3s;
    }
    location / {
        proxy_read_timeout                      3s;
    }
## end server agent-server.localtest.me
";
        assert_eq!(
            read_timeouts_for(conf, "agent-server.localtest.me"),
            vec!["3s;", "3s;"]
        );
        assert!(read_timeouts_for(conf, "missing.example").is_empty());
    }

    #[test]
    fn overrides_keep_the_chart_settings_unless_the_profile_sets_them() {
        let standard = Profile::standard(3);
        let values = overrides_for_test(&standard);
        assert!(values["config"]["wsHeartbeatInterval"].is_null());
        assert!(values["ingress"].is_null());
        assert_eq!(values["autoscaling"]["minReplicas"], 3);
        assert_eq!(values["autoscaling"]["maxReplicas"], 5);
        let low = Profile {
            replicas: 3,
            heartbeat: Some(Duration::from_secs(1)),
            offline_timeout: Some(Duration::from_secs(10)),
            ingress_timeout: Some(Duration::from_secs(3)),
        };
        let values = overrides_for_test(&low);
        assert_eq!(values["config"]["wsHeartbeatInterval"], "1");
        assert_eq!(values["ingress"]["nginx"]["proxyReadTimeout"], 3);
    }

    #[test]
    fn annotations_stay_strings_in_the_values_file() {
        // The chart's schema wants string annotations; a hex token like `1234e5` must not
        // turn into a number on its way through YAML.
        let values = overrides(&Profile::standard(2), "k", "sha256:1", Some("1234e5"), 1);
        let text = serde_yaml_ng::to_string(&values).unwrap();
        let back: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(
            back["podAnnotations"]["e2e/rollout"].as_str(),
            Some("1234e5")
        );
        assert_eq!(
            back["podAnnotations"]["e2e/image-id"].as_str(),
            Some("sha256:1")
        );
    }

    fn overrides_for_test(profile: &Profile) -> Value {
        overrides(profile, &"s".repeat(64), "sha256:x", None, 1)
    }
}
