//! The kind target's setup, one sequence for the run and for `--plan`.
//!
//! Steps, each idempotent (a second run reuses what the first one made), each with a
//! bound:
//! 1. prerequisites: docker with a reachable daemon, kind, kubectl, and a Helm that can
//!    install (a render-only Helm is refused here, not at step 7);
//! 2. the cluster from `kind-config.yaml` with one host port and the shared directory
//!    (created, or reused), its kubeconfig in the run's own file; the versions;
//! 3. `docker build --load` and `kind load docker-image`;
//! 4. the shared binaries volume: a static ReadWriteMany PersistentVolume and its claim;
//! 5. ingress-nginx's kind manifest, its controller pinned to the node whose port is
//!    mapped, and where it runs asserted from the API;
//! 6. metrics-server, patched with `--kubelet-insecure-tls`;
//! 7. `helm upgrade --install`, the rollout awaited through the API, `helm test`, and the
//!    ingress answering on the host port.

use std::path::Path;
use std::time::Duration;

use ::kube::Api;
use ::kube::api::{ListParams, Patch, PatchParams};
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use serde_json::{Value, json};

use super::command::{TOOLS, which};
use super::kube::{deployment_progress, namespace_rolled_out};
use super::runner::{Cmd, Mode, Runner, write_private};
use super::values::{KindConfig, image_version, kind_config, overrides, shared_volume_manifest};
use super::{
    INGRESS_NGINX_VERSION, INGRESS_NODE_LABEL, KIND_VERSION, KindOptions, KindTarget,
    METRICS_SERVER_VERSION, MINUTE, NAMESPACE, RELEASE, SERVER_SELECTOR, SHARED_CLAIM, SHARED_PV,
    ingress_nginx_manifest, metrics_server_manifest,
};
use crate::target::{Profile, Target};
use crate::values::{ChartValues, whole_seconds};
use crate::wait::{self, Check};

/// What `e2e kind` with `opts` would do on a machine where its cluster does not exist
/// yet: every command, file, API call and wait, in order, and the teardown. Runs
/// nothing and needs no Docker.
pub async fn plan(opts: KindOptions) -> Result<String> {
    let mut target = KindTarget::new(opts, Mode::Plan)?;
    let header = target.header();
    target.setup_steps().await?;
    target.teardown_steps().await?;
    Ok(format!("{header}\n{}", target.runner.plan()))
}

/// The message for a `helm` that renders but cannot install.
const RENDER_ONLY_HELM: &str = "the `helm` on PATH renders charts but cannot install them (`helm upgrade --help` fails; a render-only build such as one reporting EngineVersion \"helm-c …\"). Install Helm 3.18+ or 4: https://helm.sh/docs/intro/install/";

impl KindTarget {
    /// Runs the setup steps. On failure after the cluster exists, the target is returned
    /// with the error so that its state can be collected.
    pub async fn setup(
        opts: KindOptions,
    ) -> Result<KindTarget, (anyhow::Error, Option<KindTarget>)> {
        let mut target = KindTarget::new(opts, Mode::Live).map_err(|e| (e, None))?;
        println!("{}", target.header());
        match target.setup_steps().await {
            Ok(()) => Ok(target),
            Err(e) => {
                let reachable = target.runner.client().is_some();
                Err((e, reachable.then_some(target)))
            }
        }
    }

    pub(super) fn new(opts: KindOptions, mode: Mode) -> Result<KindTarget> {
        let chart = opts.repo.join("chart");
        let values = ChartValues::load(&chart, &[&chart.join("ci/kind-values.yaml")])?;
        let host = values.text("ingress.host")?;
        let image = format!(
            "{}:{}",
            values.text("image.repository")?,
            values.text("image.tag")?
        );
        let chart_read_timeout = values.ingress()?.websocket_timeout();
        let (secret, image_id) = match mode {
            Mode::Live => {
                std::fs::create_dir_all(&opts.artifacts)
                    .with_context(|| format!("creating {}", opts.artifacts.display()))?;
                (
                    format!(
                        "{}{}",
                        uuid::Uuid::new_v4().simple(),
                        uuid::Uuid::new_v4().simple()
                    ),
                    String::new(),
                )
            }
            Mode::Plan => (
                "<64 hex characters, generated per run>".to_string(),
                "<image id from docker image inspect>".to_string(),
            ),
        };
        let http_port = match opts.http_port {
            Some(port) => port,
            None => free_port()?,
        };
        Ok(KindTarget {
            kubeconfig: opts.artifacts.join("kubeconfig"),
            runner: Runner::new(mode, &opts.repo),
            profile: Profile::standard(opts.replicas),
            http_port,
            opts,
            secret,
            host,
            image,
            image_id,
            rollout_token: None,
            registry_generation: 1,
            chart_read_timeout,
            killed: Vec::new(),
            last_scale: None,
        })
    }

    /// The pinned versions, for the run's header and the plan's.
    fn header(&self) -> String {
        let node_image = self
            .kind_config()
            .map_or_else(|e| format!("({e:#})"), |c| c.node_image);
        let mut lines = vec![format!(
            "e2e kind{}: cluster {}, ingress on 127.0.0.1:{}{}",
            if self.runner.live() { "" } else { " --plan" },
            self.opts.cluster_name,
            self.http_port,
            match self.opts.http_port {
                Some(_) => " (--http-port / E2E_HTTP_PORT)",
                None => " (a free port; set --http-port or E2E_HTTP_PORT to choose)",
            }
        )];
        lines.push(format!(
            "  pinned: Kubernetes {} (node image {node_image}), kind {KIND_VERSION} in CI, ingress-nginx {INGRESS_NGINX_VERSION}, metrics-server {METRICS_SERVER_VERSION}",
            image_version(&node_image)
        ));
        if !self.runner.live() {
            lines.push(
                "  what a run does where the cluster does not exist yet (a kept cluster is reused instead of created); paths are relative to the repository"
                    .into(),
            );
        }
        lines.join("\n")
    }

    fn kind_config(&self) -> Result<KindConfig> {
        let path = self.opts.repo.join("kind-config.yaml");
        let template = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        kind_config(&template, self.http_port, &self.opts.shared_dir)
    }

    pub(super) async fn setup_steps(&mut self) -> Result<()> {
        self.prerequisites().await?;
        self.cluster().await?;
        self.image().await?;
        self.shared_volume().await?;
        self.ingress_nginx().await?;
        self.metrics_server().await?;
        self.chart().await
    }

    /// `kubectl --kubeconfig <the run's> args…`
    pub(super) fn kubectl<'a>(&self, args: &[&str], bound: Duration) -> Cmd<'a> {
        let kubeconfig = self.kubeconfig.display().to_string();
        let mut all = vec!["--kubeconfig", kubeconfig.as_str()];
        all.extend_from_slice(args);
        Cmd::new("kubectl", &all, bound)
    }

    async fn prerequisites(&mut self) -> Result<()> {
        self.runner
            .step("prerequisites: docker (daemon running), kind, kubectl, a Helm that installs");
        if self
            .runner
            .check("docker, kind, kubectl and helm are on PATH")
        {
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
        }
        let versions = [
            (
                "docker",
                Cmd::new(
                    "docker",
                    &["version", "--format", "{{.Server.Version}}"],
                    30 * SECOND,
                ),
            ),
            ("kind", Cmd::new("kind", &["version"], 30 * SECOND)),
            (
                "kubectl",
                Cmd::new("kubectl", &["version", "--client"], 30 * SECOND),
            ),
            ("helm", Cmd::new("helm", &["version"], 30 * SECOND)),
        ];
        let mut found = Vec::new();
        for (tool, cmd) in versions {
            let out = self.runner.run(cmd).await.with_context(|| match tool {
                "docker" => "the Docker daemon does not answer; start it (kind runs its nodes as containers)",
                _ => "checking the tool's version",
            })?;
            if let Some(out) = out {
                let first = out.lines().next().unwrap_or_default().trim().to_string();
                if tool == "helm" && first.contains("helm-c") {
                    bail!(RENDER_ONLY_HELM);
                }
                found.push(format!("{tool} {first}"));
            }
        }
        self.runner
            .run(Cmd::new("helm", &["upgrade", "--help"], 30 * SECOND))
            .await
            .map_err(|e| anyhow!("{RENDER_ONLY_HELM} ({e:#})"))?;
        if !found.is_empty() {
            println!("  versions: {}", found.join("; "));
        }
        Ok(())
    }

    async fn cluster(&mut self) -> Result<()> {
        let name = self.opts.cluster_name.clone();
        let kubeconfig = self.kubeconfig.clone();
        self.runner.step(&format!(
            "kind cluster {name}, with its own kubeconfig ({}; the current context is never changed)",
            self.runner.show(&kubeconfig)
        ));
        let clusters = self
            .runner
            .run(Cmd::new("kind", &["get", "clusters"], MINUTE))
            .await?
            .unwrap_or_default();
        let kubeconfig_arg = kubeconfig.display().to_string();
        if clusters.lines().any(|l| l.trim() == name) {
            self.runner.note("the cluster exists: reused as it is");
            let node = format!("{name}-control-plane");
            let mapped = self
                .runner
                .run(Cmd::new("docker", &["port", &node, "80/tcp"], MINUTE))
                .await
                .with_context(|| format!("reading the host port of {node}; delete the cluster with `just e2e-down` to start afresh"))?
                .unwrap_or_default();
            let port = mapped
                .lines()
                .find_map(|l| l.trim().strip_prefix("127.0.0.1:"))
                .and_then(|p| p.parse::<u16>().ok())
                .with_context(|| format!("{node} maps no 127.0.0.1 port to 80 (`docker port`: {mapped:?}); delete the cluster with `just e2e-down`"))?;
            if let Some(wanted) = self.opts.http_port
                && wanted != port
            {
                bail!(
                    "the existing cluster {name} maps host port {port}, not {wanted}; drop --http-port/E2E_HTTP_PORT or delete it with `just e2e-down`"
                );
            }
            self.http_port = port;
            println!("  ingress on 127.0.0.1:{port} (the existing cluster's mapping)");
        } else {
            let port = self.http_port;
            if self
                .runner
                .check(&format!("127.0.0.1:{port} is free for the ingress"))
            {
                std::net::TcpListener::bind(("127.0.0.1", port)).with_context(|| {
                    format!("host port {port} is taken; choose another with --http-port or E2E_HTTP_PORT (unset, a free one is picked)")
                })?;
            }
            let shared = self.opts.shared_dir.clone();
            if self.runner.check(&format!(
                "{} exists with mode 0777: the server pods (uid 65532) write there through a hostPath volume, which keeps the host's ownership",
                self.runner.show(&shared)
            )) {
                make_shared_dir(&shared)?;
            }
            let config = self.kind_config()?;
            let config_path = self.opts.artifacts.join("kind-config.yaml");
            self.runner.write(&config_path, &config.text, false)?;
            let config_arg = config_path.display().to_string();
            self.runner
                .run(
                    Cmd::new(
                        "kind",
                        &[
                            "create",
                            "cluster",
                            "--name",
                            &name,
                            "--config",
                            &config_arg,
                            "--kubeconfig",
                            &kubeconfig_arg,
                            "--wait",
                            "180s",
                        ],
                        10 * MINUTE,
                    )
                    .streamed(None),
                )
                .await?;
        }
        let text = self
            .runner
            .run(Cmd::new(
                "kind",
                &["get", "kubeconfig", "--name", &name],
                MINUTE,
            ))
            .await?;
        self.runner.note(&format!(
            "its output, written to {} (mode 0600), is the only kubeconfig kubectl, helm and the API client use",
            self.runner.show(&kubeconfig)
        ));
        if let Some(text) = text {
            write_private(&kubeconfig, &text)?;
            self.runner
                .set_client(client(&text, &format!("kind-{name}")).await?);
        }
        if let Some(client) = self.runner.wait("every node Ready", 5 * MINUTE) {
            wait_nodes_ready(&client).await?;
        }
        if let Some(client) = self.runner.api("the API server's version") {
            let server = client
                .apiserver_version()
                .await
                .map_or_else(|e| format!("unknown ({e})"), |v| v.git_version);
            let pinned = self
                .kind_config()
                .map(|c| image_version(&c.node_image).to_string())
                .unwrap_or_default();
            println!("  Kubernetes {server} (pinned: {pinned})");
            if !server.starts_with(&pinned) {
                println!(
                    "  note: this cluster does not run the pinned version; `just e2e-down` and run again to get it"
                );
            }
        }
        Ok(())
    }

    async fn image(&mut self) -> Result<()> {
        let name = self.opts.cluster_name.clone();
        let image = self.image.clone();
        if self.opts.skip_build {
            self.runner
                .step(&format!("the existing image {image} (--skip-build)"));
        } else {
            self.runner.step(&format!("the image {image}"));
            // `--load`: with a docker-container builder (the default after
            // docker/setup-buildx-action) the image would otherwise stay in the build
            // cache; with the default docker driver it is a no-op.
            let repo = self.opts.repo.clone();
            self.runner
                .run(
                    Cmd::new(
                        "docker",
                        &["build", "--load", "-t", &image, "."],
                        45 * MINUTE,
                    )
                    .streamed(Some(&repo)),
                )
                .await?;
        }
        let id = self
            .runner
            .run(Cmd::new(
                "docker",
                &["image", "inspect", &image, "--format", "{{.Id}}"],
                MINUTE,
            ))
            .await
            .with_context(|| format!("no image {image}; build it or drop --skip-build"))?;
        if let Some(id) = id {
            self.image_id = id.trim().to_string();
        }
        self.runner
            .run(
                Cmd::new(
                    "kind",
                    &["load", "docker-image", &image, "--name", &name],
                    10 * MINUTE,
                )
                .streamed(None),
            )
            .await?;
        Ok(())
    }

    async fn shared_volume(&mut self) -> Result<()> {
        self.runner.step(
            "the shared binaries volume: a static ReadWriteMany PersistentVolume on the directory every node mounts, and its claim",
        );
        let path = self.opts.artifacts.join("shared-volume.yaml");
        self.runner.write(&path, &shared_volume_manifest(), false)?;
        let path_arg = path.display().to_string();
        self.runner
            .run(self.kubectl(&["apply", "-f", &path_arg], 2 * MINUTE))
            .await?;
        if let Some(client) = self.runner.wait(
            &format!("PersistentVolumeClaim {NAMESPACE}/{SHARED_CLAIM} Bound to {SHARED_PV}"),
            2 * MINUTE,
        ) {
            let api = Api::<PersistentVolumeClaim>::namespaced(client, NAMESPACE);
            wait::until_retrying(
                "the shared claim to be bound",
                2 * MINUTE,
                Duration::from_secs(1),
                || async {
                    let pvc = api.get(SHARED_CLAIM).await?;
                    let phase = pvc.status.and_then(|s| s.phase).unwrap_or_default();
                    let volume = pvc.spec.and_then(|s| s.volume_name).unwrap_or_default();
                    Ok(if phase == "Bound" && volume == SHARED_PV {
                        Check::Ready(())
                    } else {
                        Check::Pending(format!("{phase} to {volume:?}"))
                    })
                },
            )
            .await?;
        }
        Ok(())
    }

    async fn ingress_nginx(&mut self) -> Result<()> {
        self.runner.step(&format!(
            "ingress-nginx {INGRESS_NGINX_VERSION} (kind manifest), pinned to the node whose port 80 is mapped"
        ));
        let manifest = ingress_nginx_manifest();
        self.runner
            .run(self.kubectl(&["apply", "-f", &manifest], 5 * MINUTE))
            .await?;
        let (label, value) = INGRESS_NODE_LABEL;
        let patch = json!({"spec": {"template": {"spec": {"nodeSelector": {label: value}}}}});
        if let Some(client) = self.runner.api(&format!(
            "patch deployment ingress-nginx/ingress-nginx-controller (merge patch; the manifest selects no node since v1.13): {patch}"
        )) {
            Api::<Deployment>::namespaced(client, "ingress-nginx")
                .patch(
                    "ingress-nginx-controller",
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .context("pinning ingress-nginx's controller to the ingress-ready node")?;
        }
        self.wait_deployment("ingress-nginx", "ingress-nginx-controller", 5 * MINUTE)
            .await?;
        if let Some(client) = self.runner.wait(
            &format!("the controller's pods all on the node labelled {label}={value} (spec.nodeName, from the API)"),
            2 * MINUTE,
        ) {
            wait_controller_on_ingress_node(&client).await?;
        }
        if let Some(client) = self.runner.wait(
            "the admission webhook ingress-nginx-admission to get its CA bundle (until then the chart's Ingress is refused)",
            5 * MINUTE,
        ) {
            wait_admission_webhook(&client).await?;
        }
        Ok(())
    }

    async fn metrics_server(&mut self) -> Result<()> {
        self.runner.step(&format!(
            "metrics-server {METRICS_SERVER_VERSION}, with --kubelet-insecure-tls (kind's kubelets have self-signed certificates)"
        ));
        let manifest = metrics_server_manifest();
        self.runner
            .run(self.kubectl(&["apply", "-f", &manifest], 5 * MINUTE))
            .await?;
        let patch = json!([
            {"op": "test", "path": "/spec/template/spec/containers/0/name", "value": "metrics-server"},
            {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": INSECURE_TLS},
        ]);
        if let Some(client) = self.runner.api(&format!(
            "patch deployment kube-system/metrics-server (JSON patch, unless the flag is there already; a patch, never a replace, which would race the controller's status writes): {patch}"
        )) {
            add_insecure_kubelet_tls(&client, &patch).await?;
        }
        self.wait_deployment("kube-system", "metrics-server", 5 * MINUTE)
            .await?;
        if let Some(client) = self.runner.wait(
            "the metrics API to serve node metrics (the HPA reads it)",
            5 * MINUTE,
        ) {
            wait_metrics_api(&client).await?;
        }
        Ok(())
    }

    async fn chart(&mut self) -> Result<()> {
        self.runner.step(&format!(
            "helm upgrade --install {RELEASE} chart/ (namespace {NAMESPACE}), helm test, the ingress"
        ));
        let profile = self.profile.clone();
        self.helm_upgrade(&profile).await?;
        self.wait_rolled_out(&profile, 10 * MINUTE).await?;
        let kubeconfig = self.kubeconfig.display().to_string();
        self.runner
            .run(Cmd::new(
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
            ))
            .await?;
        let what = format!(
            "GET http://127.0.0.1:{}/health with Host {} to answer 200 through the ingress",
            self.http_port, self.host
        );
        if self.runner.wait(&what, 3 * MINUTE).is_some() {
            self.wait_ingress_health().await?;
        }
        Ok(())
    }

    /// Deletes the cluster unless `--keep`; in the plan, the last step.
    pub(super) async fn teardown_steps(&mut self) -> Result<()> {
        let name = self.opts.cluster_name.clone();
        if self.opts.keep {
            self.runner
                .step("after the scenarios: keep the cluster (--keep)");
            self.runner.note(&format!(
                "kubectl --kubeconfig {} -n {NAMESPACE} get pods; delete it with `just e2e-down`",
                self.runner.show(&self.kubeconfig)
            ));
            return Ok(());
        }
        self.runner
            .step("after the scenarios: delete the cluster (--keep keeps it)");
        let kubeconfig = self.kubeconfig.display().to_string();
        self.runner
            .run(Cmd::new(
                "kind",
                &[
                    "delete",
                    "cluster",
                    "--name",
                    &name,
                    "--kubeconfig",
                    &kubeconfig,
                ],
                5 * MINUTE,
            ))
            .await?;
        Ok(())
    }

    /// Writes the values overrides for `profile` and runs `helm upgrade --install`.
    pub(super) async fn helm_upgrade(&mut self, profile: &Profile) -> Result<()> {
        let values_file = self.opts.artifacts.join("e2e-values.yaml");
        let values = overrides(
            profile,
            &self.secret,
            &self.image_id,
            self.rollout_token.as_deref(),
            self.registry_generation,
        );
        let text = serde_yaml_ng::to_string(&values)?;
        self.runner.write(&values_file, &text, true)?;
        let chart = self.opts.repo.join("chart");
        let kind_values = chart.join("ci/kind-values.yaml");
        let kubeconfig = self.kubeconfig.display().to_string();
        self.runner
            .run(Cmd::new(
                "helm",
                &[
                    "upgrade",
                    "--install",
                    RELEASE,
                    &chart.display().to_string(),
                    "--namespace",
                    NAMESPACE,
                    "--create-namespace",
                    "--kubeconfig",
                    &kubeconfig,
                    "-f",
                    &kind_values.display().to_string(),
                    "-f",
                    &values_file.display().to_string(),
                    "--timeout",
                    "10m",
                ],
                11 * MINUTE,
            ))
            .await?;
        Ok(())
    }

    async fn wait_deployment(&mut self, ns: &str, name: &str, bound: Duration) -> Result<()> {
        let Some(client) = self.runner.wait(
            &format!("deployment {ns}/{name} rolled out and available"),
            bound,
        ) else {
            return Ok(());
        };
        let api = Api::<Deployment>::namespaced(client, ns);
        wait::until_retrying(
            &format!("deployment {ns}/{name}"),
            bound,
            Duration::from_secs(2),
            || async {
                Ok(match api.get_opt(name).await? {
                    None => Check::Pending("not created yet".into()),
                    Some(d) => match deployment_progress(&d) {
                        (true, _) => Check::Ready(()),
                        (false, state) => Check::Pending(state),
                    },
                })
            },
        )
        .await
    }

    /// Everything of the release rolled out, the server pods all ready, and the ingress
    /// configured with the profile's read timeout.
    pub(super) async fn wait_rolled_out(
        &mut self,
        profile: &Profile,
        bound: Duration,
    ) -> Result<()> {
        let timeout = profile.ingress_timeout.unwrap_or(self.chart_read_timeout);
        let expected = format!("{}s;", whole_seconds(timeout));
        let rolled = self.runner.wait(
            &format!("every Deployment and StatefulSet of {NAMESPACE} rolled out, no server pod terminating or unready"),
            bound,
        );
        let conf = self.runner.wait(
            &format!(
                "ingress-nginx's nginx.conf (kubectl exec … cat /etc/nginx/nginx.conf) to carry proxy_read_timeout {expected} for {}",
                self.host
            ),
            3 * MINUTE,
        );
        if let Some(client) = rolled {
            // The replica count is the Deployment's own (the HPA's decision), not the
            // profile's minimum: light scenario traffic may legitimately scale it up.
            wait::until_retrying(
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
        }
        if conf.is_some() {
            self.wait_ingress_timeout(&expected).await?;
        }
        Ok(())
    }

    /// ingress-nginx writes each Ingress's annotations into its nginx.conf and reloads;
    /// waits until the server block for our host carries `proxy_read_timeout <expected>`.
    async fn wait_ingress_timeout(&self, expected: &str) -> Result<()> {
        let host = self.host.clone();
        let kubeconfig = self.kubeconfig.display().to_string();
        wait::until_retrying(
            &format!("ingress-nginx to apply proxy_read_timeout {expected}"),
            3 * MINUTE,
            Duration::from_secs(2),
            || async {
                let conf = super::command::output(
                    "kubectl",
                    &[
                        "--kubeconfig",
                        &kubeconfig,
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
                let timeouts = ws_read_timeouts_for(&conf, &host);
                Ok(
                    if !timeouts.is_empty() && timeouts.iter().all(|t| t == expected) {
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
}

const SECOND: Duration = Duration::from_secs(1);
const INSECURE_TLS: &str = "--kubelet-insecure-tls";

/// A port that was free a moment ago (the kernel's pick).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn make_shared_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
        .with_context(|| format!("making {} writable for the server pods", dir.display()))
}

async fn client(kubeconfig: &str, context: &str) -> Result<::kube::Client> {
    let kubeconfig = Kubeconfig::from_yaml(kubeconfig).context("parsing kind's kubeconfig")?;
    let options = KubeConfigOptions {
        context: Some(context.to_string()),
        ..Default::default()
    };
    let config = ::kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .context("loading kind's kubeconfig")?;
    ::kube::Client::try_from(config).context("building the Kubernetes client")
}

async fn wait_nodes_ready(client: &::kube::Client) -> Result<()> {
    let api = Api::<Node>::all(client.clone());
    wait::until_retrying(
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

/// Every live controller pod runs on the node carrying the ingress label: the only node
/// whose port 80 the host reaches.
async fn wait_controller_on_ingress_node(client: &::kube::Client) -> Result<()> {
    let (label, value) = INGRESS_NODE_LABEL;
    let nodes = Api::<Node>::all(client.clone());
    let pods = Api::<Pod>::namespaced(client.clone(), "ingress-nginx");
    let selector = format!("{label}={value}");
    let controller = "app.kubernetes.io/component=controller";
    let node = wait::until_retrying(
        "the controller to run on the ingress-ready node",
        2 * MINUTE,
        Duration::from_secs(2),
        || async {
            let labelled: Vec<String> = nodes
                .list(&ListParams::default().labels(&selector))
                .await?
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .collect();
            let [node] = labelled.as_slice() else {
                bail!(
                    "{} nodes carry {selector}, not exactly one: {labelled:?}",
                    labelled.len()
                );
            };
            let placed: Vec<(String, String)> = pods
                .list(&ListParams::default().labels(controller))
                .await?
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(|p| {
                    (
                        p.metadata.name.unwrap_or_default(),
                        p.spec.and_then(|s| s.node_name).unwrap_or_default(),
                    )
                })
                .collect();
            Ok(
                if !placed.is_empty() && placed.iter().all(|(_, on)| on == node) {
                    Check::Ready(node.clone())
                } else {
                    Check::Pending(format!("controller pods on {placed:?}, want {node}"))
                },
            )
        },
    )
    .await?;
    println!("  controller on {node}");
    Ok(())
}

/// ingress-nginx validates every Ingress through its admission webhook; until a Job
/// patches the webhook's CA bundle in, creating the chart's Ingress fails.
async fn wait_admission_webhook(client: &::kube::Client) -> Result<()> {
    let api = Api::<ValidatingWebhookConfiguration>::all(client.clone());
    wait::until_retrying(
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

/// Adds `--kubelet-insecure-tls` to metrics-server with a JSON patch, unless it is there.
async fn add_insecure_kubelet_tls(client: &::kube::Client, patch: &Value) -> Result<()> {
    let api = Api::<Deployment>::namespaced(client.clone(), "kube-system");
    let d = api
        .get("metrics-server")
        .await
        .context("reading metrics-server")?;
    let has_flag = d
        .spec
        .template
        .spec
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.args)
        .is_some_and(|args| args.iter().any(|a| a == INSECURE_TLS));
    if has_flag {
        println!("  {INSECURE_TLS} already set");
        return Ok(());
    }
    // A JSON patch is sent as such (kube's typed JSON patch needs an extra feature).
    let request =
        http::Request::patch("/apis/apps/v1/namespaces/kube-system/deployments/metrics-server")
            .header(http::header::CONTENT_TYPE, "application/json-patch+json")
            .body(serde_json::to_vec(patch)?)?;
    client
        .request::<Value>(request)
        .await
        .context("adding --kubelet-insecure-tls to metrics-server")?;
    println!("  {INSECURE_TLS} added");
    Ok(())
}

/// The HPA reads the metrics API; it answers once metrics-server has scraped kubelets.
async fn wait_metrics_api(client: &::kube::Client) -> Result<()> {
    wait::until_retrying(
        "the metrics API to serve node metrics",
        5 * MINUTE,
        Duration::from_secs(3),
        || async {
            let request =
                http::Request::get("/apis/metrics.k8s.io/v1beta1/nodes").body(Vec::new())?;
            let v = client.request::<Value>(request).await?;
            Ok(if v["items"].as_array().is_some_and(|i| !i.is_empty()) {
                Check::Ready(())
            } else {
                Check::Pending("no node metrics yet".into())
            })
        },
    )
    .await
}

/// The `proxy_read_timeout` values inside the server block for `host` of an
/// ingress-nginx configuration (its blocks are delimited by `## start server <host>` and
/// `## end server <host>`; unchanged from v1.9 to v1.15).
/// The `proxy_read_timeout`s of the `/ws` locations in `host`'s server block
/// (ingress-nginx writes `location /ws/` and `location = /ws` for a Prefix path): each
/// route has its own, and idle agents meet the WebSocket route's.
fn ws_read_timeouts_for(conf: &str, host: &str) -> Vec<String> {
    let start = format!("## start server {host}");
    let end = format!("## end server {host}");
    let Some(from) = conf.find(&start) else {
        return Vec::new();
    };
    let block = &conf[from..];
    let block = &block[..block.find(&end).unwrap_or(block.len())];
    let mut in_ws = false;
    let mut found = Vec::new();
    for line in block.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("location ") {
            let path = rest
                .trim_end_matches('{')
                .split_whitespace()
                .last()
                .unwrap_or("")
                .trim_matches('"');
            in_ws = path == "/ws" || path == "/ws/";
        } else if in_ws && let Some(v) = line.strip_prefix("proxy_read_timeout") {
            found.push(v.trim().to_string());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_timeouts_come_from_the_hosts_websocket_locations_only() {
        let conf = "\
## start server other.example
    location /ws/ {
    proxy_read_timeout                      60s;
    }
## end server other.example
## start server agent-server.localtest.me
    location = /ws {
        proxy_read_timeout                      3s;
    }
    location /ws/ {
        proxy_read_timeout                      3s;
    }
    location / {
        proxy_read_timeout                      60s;
    }
## end server agent-server.localtest.me
";
        assert_eq!(
            ws_read_timeouts_for(conf, "agent-server.localtest.me"),
            vec!["3s;", "3s;"]
        );
        assert!(ws_read_timeouts_for(conf, "missing.example").is_empty());
    }
}
