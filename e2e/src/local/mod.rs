//! The local target: the deployment as processes on this machine.
//!
//! | Kubernetes                              | here                                          |
//! |-----------------------------------------|-----------------------------------------------|
//! | pod                                     | an `agent-server` process with its own POD_ID |
//! | ingress-nginx                           | nginx, configured from the chart's values     |
//! | Service endpoints change                | upstream rewritten, nginx reloaded            |
//! | bundled Redis / PostgreSQL              | a redis-server started here / a fresh database on the local PostgreSQL |
//! | rolling update (surge 1, unavailable 0) | start new, wait ready, take the old one out of nginx, SIGTERM it |
//! | HPA                                     | explicit scale steps                          |
//! | container killed and restarted          | SIGKILL, restarted at once on the same port   |
//!
//! A pod leaves nginx's upstreams *before* it gets SIGTERM and only once the reload has
//! taken effect. That is the order Kubernetes guarantees with the preStop sleep (endpoint
//! removal propagates while the pod still serves), and it is what makes "zero failed
//! requests" hold without any retry in the clients.

mod nginx;
mod pod;
mod process;
mod services;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::future::try_join_all;
use tokio::task::JoinHandle;

use crate::endpoint::Endpoint;
use crate::target::{PodEndpoint, PodInfo, Profile, Scaling, Target};
use crate::tokens::Minter;
use crate::values::{ChartValues, IngressSettings, ServerSettings};
use crate::wait::{self, progress};
use pod::{Exit, Pod};
use process::free_port;
use services::{Database, Redis};

pub use process::tail;

/// Where the local target finds its parts.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// The repository root (for `chart/`).
    pub repo: PathBuf,
    /// The `agent-server` binary built from this workspace.
    pub server_bin: PathBuf,
    pub nginx_bin: String,
    pub redis_bin: String,
    /// A superuser URL of the local PostgreSQL.
    pub postgres_url: String,
    /// Logs, configuration and data of this run.
    pub dir: PathBuf,
    /// Pods added by one explicit scale-out step.
    pub scale_step: usize,
}

/// Each pod's drain (DRAIN_WINDOW) plus this is the bound on its exit after SIGTERM.
const EXIT_MARGIN: Duration = Duration::from_secs(10);

const CAVEATS: &[&str] = &[
    "the HorizontalPodAutoscaler: here the hpa scenario scales in explicit steps; only kind shows the HPA reacting to CPU",
    "Kubernetes endpoints and probes: here the harness takes a pod out of nginx before SIGTERM, as endpoint removal plus the preStop sleep does",
    "the chart's manifests on a live API server (probes, preStop hook, NetworkPolicy, PDB, Secret wiring); here only its ingress and server values are used",
    "ingress-nginx itself: here plain nginx with the configuration ingress-nginx renders for the chart's annotations",
    "the binaries volume as a ReadWriteMany claim mounted by pods on several nodes: here the processes share one directory",
];

/// What only the kind target proves; printed by every local run.
pub fn caveats() -> &'static [&'static str] {
    CAVEATS
}

pub struct LocalTarget {
    opts: LocalOptions,
    secret: String,
    ingress: IngressSettings,
    server: ServerSettings,
    db: Option<Database>,
    redis: Redis,
    nginx: Option<nginx::Nginx>,
    nginx_port: u16,
    profile: Profile,
    /// The current rollout revision; pods of older revisions are being replaced.
    revision: u32,
    /// Bumped whenever `apply` replaces every pod; part of REDIS_KEY_PREFIX (see
    /// `pod_env`).
    registry_generation: u32,
    next_ordinal: u32,
    pods: Vec<Pod>,
    /// Killed pods being restarted, as the kubelet restarts a killed container at once:
    /// (name, revision, the restart). `settle` collects them.
    restarting: Vec<(String, u32, JoinHandle<Result<Pod>>)>,
    /// Pods draining after SIGTERM; `settle` and `apply` collect their exits.
    terminating: Vec<JoinHandle<Result<Exit>>>,
}

impl LocalTarget {
    /// Starts Redis, a fresh database, `profile.replicas` servers and nginx.
    pub async fn start(opts: LocalOptions, profile: &Profile) -> Result<LocalTarget> {
        let chart = opts.repo.join("chart");
        let values = ChartValues::load(&chart, &[&chart.join("ci/kind-values.yaml")])?;
        let ingress = values.ingress()?;
        let server = values.server()?;
        let routes: Vec<String> = ingress
            .routes
            .iter()
            .map(|r| format!("{} {}s/{}", r.name, r.timeout.as_secs(), r.body_size))
            .collect();
        println!(
            "  chart values: ingress routes (timeout/body size) {}, connect {}s; heartbeat {}s, offline {}s, drain window {}s",
            routes.join(", "),
            ingress.connect_timeout.as_secs(),
            server.heartbeat.as_secs(),
            server.offline_timeout.as_secs(),
            server.drain_window.as_secs(),
        );
        std::fs::create_dir_all(&opts.dir)?;

        step("starting redis-server");
        let redis = Redis::start(&opts.redis_bin, &opts.dir.join("redis")).await?;
        step("creating a fresh PostgreSQL database");
        let db = Database::create(&opts.postgres_url).await?;
        println!("  database {} on the local PostgreSQL", db.name);

        let secret: String = {
            let a = uuid::Uuid::new_v4().simple().to_string();
            let b = uuid::Uuid::new_v4().simple().to_string();
            a + &b
        };
        let mut target = LocalTarget {
            nginx_port: free_port()?,
            opts,
            secret,
            ingress,
            server,
            db: Some(db),
            redis,
            nginx: None,
            profile: profile.clone(),
            revision: 1,
            registry_generation: 1,
            next_ordinal: 1,
            pods: Vec::new(),
            restarting: Vec::new(),
            terminating: Vec::new(),
        };
        match target.start_serving(profile).await {
            Ok(()) => Ok(target),
            Err(e) => {
                // Never leave the run's database behind.
                if let Err(cleanup) = target.shutdown().await {
                    println!("  cleaning up after the failed start: {cleanup:#}");
                }
                Err(e)
            }
        }
    }

    /// The first pods, then nginx in front of them.
    async fn start_serving(&mut self, profile: &Profile) -> Result<()> {
        step(&format!(
            "starting {} agent-server processes",
            profile.replicas
        ));
        self.pods = self.start_pods(profile.replicas).await?;
        step("starting nginx as the ingress");
        let nginx = nginx::Nginx::start(
            &self.opts.nginx_bin,
            &self.opts.dir.join("nginx"),
            self.nginx_port,
            &self.ports(),
            &self.nginx_settings(profile),
        )
        .await?;
        println!(
            "  ingress http://127.0.0.1:{} → {} pods; logs in {}",
            self.nginx_port,
            self.pods.len(),
            self.opts.dir.display()
        );
        self.nginx = Some(nginx);
        Ok(())
    }

    /// The environment every pod of `profile` gets (POD_ID, port and data dir aside).
    fn server_env(&self, profile: &Profile) -> Vec<(String, String)> {
        let db = self.db.as_ref().map(|d| d.url.clone()).unwrap_or_default();
        let heartbeat = profile.heartbeat.unwrap_or(self.server.heartbeat);
        let offline = profile
            .offline_timeout
            .unwrap_or(self.server.offline_timeout);
        let drain = self.server.drain_window;
        [
            ("SERVER_HOST", "127.0.0.1".to_string()),
            (
                "SERVER_URL",
                format!("http://127.0.0.1:{}", self.nginx_port),
            ),
            ("DATABASE_URL", db),
            ("DATABASE_POOL_SIZE", "4".into()),
            ("SECRET_KEY", self.secret.clone()),
            ("REDIS_HOST", "127.0.0.1".into()),
            ("REDIS_PORT", self.redis.port.to_string()),
            ("POD_IP", "127.0.0.1".into()),
            // Every pod stores binaries in one directory, as every pod of the chart mounts
            // one ReadWriteMany volume: any pod serves a binary another pod received.
            (
                "BINARY_STORAGE_PATH",
                self.opts.dir.join("binaries").display().to_string(),
            ),
            ("LOG_FORMAT", "json".into()),
            ("LOG_LEVEL", "info".into()),
            (
                "WS_HEARTBEAT_INTERVAL",
                format!("{}ms", heartbeat.as_millis()),
            ),
            ("WS_OFFLINE_TIMEOUT", format!("{}ms", offline.as_millis())),
            // nginx is updated before SIGTERM, so no extra delay is needed in front of the
            // drain (the chart relies on the preStop sleep for the same reason).
            ("DRAIN_DELAY", "0".into()),
            // The server's bounds of the routes, from the values the ingress's come from
            // (the chart's ConfigMap does the same).
            (
                "MAX_INVENTORY_BYTES",
                self.ingress.route("inventory").body_size_bytes.to_string(),
            ),
            (
                "MAX_BINARY_BYTES",
                self.ingress.route("binaries").body_size_bytes.to_string(),
            ),
            ("DRAIN_WINDOW", format!("{}ms", drain.as_millis())),
            (
                "SHUTDOWN_TIMEOUT",
                format!("{}ms", (drain + EXIT_MARGIN / 2).as_millis()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// What a pod is started with: the profile's environment and this configuration's
    /// Redis key prefix.
    ///
    /// Each `apply` that replaces every pod gives the new set a prefix of its own. The
    /// replaced pods hold no agents and exit within a second of SIGTERM, before their
    /// once-a-second rebalancing tick can take their count out of the registry; the
    /// server then keeps their zero counts for three heartbeats (45-90 s), and the new
    /// pods, averaging over those phantom pods, shed agents without end. A fresh prefix
    /// per configuration is what a fresh release would see; rollouts, scaling and kills
    /// keep the prefix, so the scenarios exercise the registry as deployed.
    fn pod_env(&self) -> Vec<(String, String)> {
        let mut env = self.server_env(&self.profile);
        env.push((
            "REDIS_KEY_PREFIX".into(),
            format!("agent-server-e2e-{}:", self.registry_generation),
        ));
        env
    }

    fn nginx_settings(&self, profile: &Profile) -> nginx::Settings {
        // A profile's ingress timeout is the WebSocket route's (`routes.websocket.timeout`),
        // the one idle agents meet.
        let mut routes = self.ingress.routes.clone();
        for route in &mut routes {
            if route.name == "websocket" {
                route.timeout = profile.ingress_timeout.unwrap_or(route.timeout);
            }
        }
        nginx::Settings {
            connect_timeout: self.ingress.connect_timeout,
            routes,
        }
    }

    fn ports(&self) -> Vec<u16> {
        self.pods.iter().map(|p| p.port).collect()
    }

    fn exit_bound(&self) -> Duration {
        self.server.drain_window + EXIT_MARGIN
    }

    /// Starts `n` pods of the current revision and profile, concurrently.
    async fn start_pods(&mut self, n: usize) -> Result<Vec<Pod>> {
        let env = self.pod_env();
        let names: Vec<String> = (0..n)
            .map(|_| {
                let name = format!("agent-server-r{}-{:02}", self.revision, self.next_ordinal);
                self.next_ordinal += 1;
                name
            })
            .collect();
        let (bin, dir, revision) = (&self.opts.server_bin, &self.opts.dir, self.revision);
        try_join_all(
            names
                .iter()
                .map(|name| Pod::start(bin, dir, name, revision, 0, 0, &env)),
        )
        .await
    }

    /// Points nginx at the current pods with the current profile's settings.
    async fn update_ingress(&mut self) -> Result<()> {
        let (ports, settings) = (self.ports(), self.nginx_settings(&self.profile));
        let nginx = self.nginx.as_mut().context("nginx is not running")?;
        nginx.reconfigure(&ports, &settings).await
    }

    /// SIGTERM in the background; the exit is collected by `reap`.
    fn terminate(&mut self, pod: Pod) {
        let bound = self.exit_bound();
        self.terminating
            .push(tokio::spawn(async move { pod.terminate(bound).await }));
    }

    /// Waits for every terminating pod and checks it drained and exited 0 in time.
    async fn reap(&mut self) -> Result<()> {
        let handles: Vec<_> = self.terminating.drain(..).collect();
        if handles.is_empty() {
            return Ok(());
        }
        let n = handles.len();
        let bound = self.exit_bound() + Duration::from_secs(5);
        let exits = wait::bounded(
            &format!("{n} draining pods to exit"),
            bound,
            futures_util::future::join_all(handles),
        )
        .await?;
        for exit in exits {
            let exit = exit.context("waiting for a pod")??;
            if !exit.status.success() {
                bail!("{} exited with {} after SIGTERM", exit.name, exit.status);
            }
            progress(&format!(
                "{} drained and exited 0 after {:.1}s",
                exit.name,
                exit.after.as_secs_f64()
            ));
        }
        Ok(())
    }

    /// Stops everything and drops the database.
    pub async fn shutdown(mut self) -> Result<()> {
        step("stopping the local deployment");
        if let Some(nginx) = self.nginx.take() {
            nginx.stop().await?;
        }
        for pod in std::mem::take(&mut self.pods) {
            self.terminate(pod);
        }
        let reaped = self.reap().await;
        if let Some(db) = self.db.take() {
            let name = db.name.clone();
            db.drop_database().await?;
            println!("  dropped database {name}");
        }
        reaped
    }
}

impl Target for LocalTarget {
    fn name(&self) -> &'static str {
        "local"
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::direct(([127, 0, 0, 1], self.nginx_port).into())
    }

    fn minter(&self) -> Minter {
        Minter::new(&self.secret)
    }

    fn scaling(&self) -> Scaling {
        Scaling::Explicit
    }

    fn load_workers(&self) -> usize {
        2
    }

    fn caveats(&self) -> &'static [&'static str] {
        CAVEATS
    }

    async fn apply(&mut self, profile: &Profile) -> Result<()> {
        self.settle().await?;
        let env_changed = self.server_env(profile) != self.server_env(&self.profile);
        let ingress_changed = self.nginx_settings(profile) != self.nginx_settings(&self.profile);
        let replicas_changed = profile.replicas != self.profile.replicas;
        self.profile = profile.clone();
        if env_changed {
            // A configuration change rolls every pod, as the chart's checksum annotations do.
            step(&format!(
                "restarting {} pods with the scenario's settings",
                profile.replicas
            ));
            self.revision += 1;
            self.registry_generation += 1;
            let old = std::mem::take(&mut self.pods);
            self.pods = self.start_pods(profile.replicas).await?;
            self.update_ingress().await?;
            for pod in old {
                self.terminate(pod);
            }
            self.reap().await?;
        } else if replicas_changed {
            let current = self.pods.len();
            if profile.replicas > current {
                let pods = self.start_pods(profile.replicas - current).await?;
                self.pods.extend(pods);
                self.update_ingress().await?;
            } else {
                let removed = self.pods.split_off(profile.replicas);
                self.update_ingress().await?;
                for pod in removed {
                    self.terminate(pod);
                }
                self.reap().await?;
            }
        } else if ingress_changed {
            self.update_ingress().await?;
        }
        Ok(())
    }

    async fn pods(&self) -> Result<Vec<PodInfo>> {
        let mut pods: Vec<PodInfo> = self
            .pods
            .iter()
            .map(|p| PodInfo {
                name: p.name.clone(),
                ready: true,
                current: p.revision == self.revision,
            })
            .collect();
        pods.extend(self.restarting.iter().map(|(name, revision, _)| PodInfo {
            name: name.clone(),
            ready: false,
            current: *revision == self.revision,
        }));
        Ok(pods)
    }

    async fn pod_endpoint(&self, name: &str) -> Result<PodEndpoint> {
        let pod = self
            .pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no running pod {name}"))?;
        Ok(PodEndpoint::new(
            Endpoint::direct(([127, 0, 0, 1], pod.port).into()),
            None,
        ))
    }

    async fn rollout(&mut self) -> Result<()> {
        self.settle().await?;
        self.revision += 1;
        let total = self.pods.len();
        for i in 0..total {
            let new = self.start_pods(1).await?;
            let name = new[0].name.clone();
            // Old pods sit at the front; the one replaced now is always the first.
            let old = self.pods.remove(0);
            self.pods.extend(new);
            self.update_ingress().await?;
            progress(&format!(
                "rollout {}/{total}: {name} ready and in nginx; {} out of nginx, draining",
                i + 1,
                old.name
            ));
            self.terminate(old);
        }
        self.reap().await
    }

    async fn scale_out(&mut self) -> Result<Vec<String>> {
        self.settle().await?;
        let step = self.opts.scale_step;
        let pods = self.start_pods(step).await?;
        let names: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
        self.pods.extend(pods);
        self.update_ingress().await?;
        progress(&format!(
            "scaled out to {} pods: {}",
            self.pods.len(),
            names.join(", ")
        ));
        Ok(names)
    }

    async fn scale_in(&mut self) -> Result<Vec<String>> {
        self.settle().await?;
        // Like a ReplicaSet scaling down: the newest pods go first.
        let removed = self
            .pods
            .split_off(self.profile.replicas.min(self.pods.len()));
        let names: Vec<String> = removed.iter().map(|p| p.name.clone()).collect();
        self.update_ingress().await?;
        for pod in removed {
            self.terminate(pod);
        }
        self.reap().await?;
        progress(&format!(
            "scaled in to {} pods; removed {}",
            self.pods.len(),
            names.join(", ")
        ));
        Ok(names)
    }

    async fn kill_pod(&mut self, name: &str) -> Result<()> {
        let index = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no running pod {name}"))?;
        let pod = self.pods.remove(index);
        let (revision, port, metrics_port) = (pod.revision, pod.port, pod.metrics_port);
        pod.kill().await?;
        // Restarted at once on the same port, as the kubelet restarts the container in the
        // same pod (same name, same address). Its upstream stays in nginx meanwhile, as a
        // dead pod's endpoint does until the kubelet reports it: connections to it are
        // refused and nginx tries the next pod.
        let (bin, dir, env) = (
            self.opts.server_bin.clone(),
            self.opts.dir.clone(),
            self.pod_env(),
        );
        let pod_name = name.to_string();
        let restart = tokio::spawn(async move {
            Pod::start(&bin, &dir, &pod_name, revision, port, metrics_port, &env).await
        });
        self.restarting.push((name.to_string(), revision, restart));
        Ok(())
    }

    async fn settle(&mut self) -> Result<()> {
        for (name, _, restart) in std::mem::take(&mut self.restarting) {
            let pod = restart
                .await
                .with_context(|| format!("restarting {name}"))??;
            progress(&format!("{} restarted on port {}", pod.name, pod.port));
            self.pods.push(pod);
        }
        self.reap().await
    }

    async fn collect_artifacts(&self, _label: &str) -> Result<PathBuf> {
        // Every log is already written under the run directory.
        Ok(self.opts.dir.clone())
    }
}

fn step(what: &str) {
    println!("==> {what}");
}
