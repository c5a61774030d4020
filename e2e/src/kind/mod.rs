//! The kind target: a real Kubernetes cluster in Docker, the chart installed with Helm,
//! ingress-nginx in front, metrics-server and the HPA deciding the replica count.
//!
//! - `setup.rs`: the setup sequence, run (`e2e kind`) or only printed (`e2e kind --plan`)
//!   through one [`runner::Runner`], so the plan is the run's own sequence;
//! - `target.rs`: the [`crate::target::Target`] operations the scenarios use (Helm
//!   upgrades, the HPA, killing a container through the node's runtime);
//! - `values.rs`: the generated kind config, the shared volume's manifests and the
//!   harness's values overrides;
//! - `artifacts.rs`: logs and state saved when something fails;
//! - `kube.rs`: state read through the Kubernetes API; `command.rs`: external tools.
//!
//! Everything it needs is pinned: the node image by digest (`kind-config.yaml`), the
//! ingress-nginx and metrics-server manifests by release tag (below); `docs/e2e.md` has
//! the support matrix.

mod artifacts;
mod command;
mod kube;
mod runner;
mod setup;
mod target;
mod values;

use std::path::PathBuf;
use std::time::Duration;

use ::kube::Client;

use crate::target::Profile;
pub use runner::Mode;
pub use setup::plan;

/// The kind release the node image below is built for; CI installs this one.
pub const KIND_VERSION: &str = "v0.31.0";
/// ingress-nginx's release, its last (the project was retired in March 2026; Gateway API
/// is the path for new clusters). Supports Kubernetes 1.31-1.35.
pub const INGRESS_NGINX_VERSION: &str = "controller-v1.15.1";
/// metrics-server's release; supports Kubernetes 1.31 and later.
pub const METRICS_SERVER_VERSION: &str = "v0.8.1";

/// ingress-nginx's manifest for kind at [`INGRESS_NGINX_VERSION`]. Since v1.13 it no
/// longer selects the `ingress-ready` node, so the harness patches that in.
pub fn ingress_nginx_manifest() -> String {
    format!(
        "https://raw.githubusercontent.com/kubernetes/ingress-nginx/{INGRESS_NGINX_VERSION}/deploy/static/provider/kind/deploy.yaml"
    )
}

/// metrics-server's manifest at [`METRICS_SERVER_VERSION`]; patched with
/// `--kubelet-insecure-tls` for kind.
pub fn metrics_server_manifest() -> String {
    format!(
        "https://github.com/kubernetes-sigs/metrics-server/releases/download/{METRICS_SERVER_VERSION}/components.yaml"
    )
}

/// The chart's namespace on the cluster.
const NAMESPACE: &str = "agent-server-e2e";
/// The release name; it contains the chart's name, so resources are named `agent-server`.
const RELEASE: &str = "agent-server";
const SERVER_SELECTOR: &str =
    "app.kubernetes.io/name=agent-server,app.kubernetes.io/instance=agent-server";
/// Pods the HPA may add above the minimum.
const HPA_HEADROOM: usize = 2;
/// The node label ingress-nginx's controller is pinned to (`kind-config.yaml` puts it on
/// the control-plane, whose port 80 is the one mapped to the host).
const INGRESS_NODE_LABEL: (&str, &str) = ("ingress-ready", "true");
/// Where every node mounts the shared host directory (`extraMounts`).
const SHARED_NODE_PATH: &str = "/var/local/agent-server-binaries";
/// The static ReadWriteMany volume on that directory, and the claim the chart uses.
const SHARED_PV: &str = "agent-server-e2e-binaries";
const SHARED_CLAIM: &str = "agent-server-binaries";

const MINUTE: Duration = Duration::from_secs(60);

/// What `e2e kind` was asked to do.
#[derive(Clone, Debug)]
pub struct KindOptions {
    pub repo: PathBuf,
    pub cluster_name: String,
    /// kubeconfig, generated files and failure artifacts.
    pub artifacts: PathBuf,
    /// The host directory every node mounts as the shared binaries volume.
    pub shared_dir: PathBuf,
    pub skip_build: bool,
    pub replicas: usize,
    /// The host port (on 127.0.0.1) mapped to the ingress; a free one when `None`.
    pub http_port: Option<u16>,
    /// Leave the cluster running at the end.
    pub keep: bool,
}

/// The kind deployment target.
pub struct KindTarget {
    opts: KindOptions,
    runner: runner::Runner,
    /// The run's own kubeconfig (`kind create/get/delete --kubeconfig`); the user's
    /// `~/.kube/config` and current context are never touched.
    kubeconfig: PathBuf,
    /// The host port the ingress answers on.
    http_port: u16,
    secret: String,
    /// `ingress.host` of the kind values; the ingress answers for it on the host port.
    host: String,
    /// `image.repository:image.tag` of the kind values.
    image: String,
    image_id: String,
    /// Set by `rollout`, kept in every later upgrade so it does not roll again.
    rollout_token: Option<String>,
    /// Part of `config.redisKeyPrefix`, bumped with every new profile; see `values.rs`.
    registry_generation: u32,
    /// The chart's ingress read timeout, for profiles that keep it.
    chart_read_timeout: Duration,
    /// Pods whose container was killed, with its restart count before the kill; `settle`
    /// waits for each to be restarted and ready.
    killed: Vec<(String, i32)>,
    profile: Profile,
    /// The HPA's `status.lastScaleTime` when it was last seen at its minimum (or after
    /// the last scale-out): a scale the harness accepts must be newer.
    last_scale: Option<String>,
}

impl KindTarget {
    fn client(&self) -> Client {
        self.runner
            .client()
            .expect("the API client exists once setup has created the cluster")
    }
}

fn step(what: &str) {
    println!("==> {what}");
}
