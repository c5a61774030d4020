//! What a scenario may ask of a deployment, whichever target runs it.
//!
//! The scenarios see only this trait: an ingress endpoint, a token minter, the pods, and
//! the operations an operator (or Kubernetes) performs on a deployment. The kind target
//! implements them with Helm, the Kubernetes API and the HPA; the local target with
//! processes, signals and nginx reloads.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::endpoint::Endpoint;
use crate::tokens::Minter;

/// The settings a scenario needs the deployment to run with. `None` keeps what the chart's
/// values say, so that the scenarios run with what users get unless they test a setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// Server pods (the HPA's minimum on kind).
    pub replicas: usize,
    /// WS_HEARTBEAT_INTERVAL (`config.wsHeartbeatInterval`).
    pub heartbeat: Option<Duration>,
    /// WS_OFFLINE_TIMEOUT (`config.wsOfflineTimeout`).
    pub offline_timeout: Option<Duration>,
    /// The ingress's proxy read and send timeouts on `/ws` (`routes.websocket.timeout`).
    pub ingress_timeout: Option<Duration>,
}

impl Profile {
    /// The chart's settings with `replicas` pods.
    pub fn standard(replicas: usize) -> Self {
        Self {
            replicas,
            heartbeat: None,
            offline_timeout: None,
            ingress_timeout: None,
        }
    }
}

/// One server pod as the target reports it.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub name: String,
    /// Passing its readiness probe (and, locally, in nginx's upstreams).
    pub ready: bool,
    /// Runs the deployment's current revision.
    pub current: bool,
}

/// A direct way to one pod.
pub struct PodEndpoint {
    pub endpoint: Endpoint,
    /// What keeps the way open (a port-forward process), ended on drop.
    _guard: Option<tokio::process::Child>,
}

impl PodEndpoint {
    pub fn new(endpoint: Endpoint, guard: Option<tokio::process::Child>) -> Self {
        Self {
            endpoint,
            _guard: guard,
        }
    }
}

/// Who decides the replica count in the hpa scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scaling {
    /// The harness scales in explicit steps (local target).
    Explicit,
    /// The HorizontalPodAutoscaler does, from the load the scenario generates (kind).
    Autoscaler,
}

/// A deployment target: agent-server deployed behind an ingress, on kind or on this
/// machine.
// Futures here are awaited on the harness's main task, never spawned, so they need no
// `Send` bound; the lint that asks for one is about public async traits in general.
#[allow(async_fn_in_trait)]
pub trait Target {
    /// `local` or `kind`.
    fn name(&self) -> &'static str;

    /// The ingress, as agents and API clients reach it.
    fn endpoint(&self) -> Endpoint;

    /// Mints tokens with the deployment's SECRET_KEY.
    fn minter(&self) -> Minter;

    fn scaling(&self) -> Scaling;

    /// Concurrent API clients the hpa scenario runs as load: enough to push the HPA's CPU
    /// metric over its target on kind, a token amount on the local target.
    fn load_workers(&self) -> usize;

    /// What this target cannot prove; printed at the start and end of every run.
    fn caveats(&self) -> &'static [&'static str];

    /// Brings the deployment to `profile` and returns once every pod runs it, it is
    /// ready, and the ingress applies the profile's settings.
    async fn apply(&mut self, profile: &Profile) -> Result<()>;

    async fn pods(&self) -> Result<Vec<PodInfo>>;

    /// One pod's server port, reached directly rather than through the ingress (kind:
    /// `kubectl port-forward`, kept open as long as the returned value lives).
    async fn pod_endpoint(&self, name: &str) -> Result<PodEndpoint>;

    /// Rolls every pod to a new revision (surge one, never below the replica count) and
    /// returns when the rollout is complete and the old pods are gone.
    async fn rollout(&mut self) -> Result<()>;

    /// Raises the replica count above the profile's: explicitly, or by waiting for the
    /// HPA to react to the load the caller is generating. Returns the new pods' names.
    async fn scale_out(&mut self) -> Result<Vec<String>>;

    /// Brings the replica count back to the profile's (explicitly, or by waiting for the
    /// HPA once the load has stopped). Returns the removed pods' names.
    async fn scale_in(&mut self) -> Result<Vec<String>>;

    /// Kills the pod's server process without grace (SIGKILL) and returns once it is dead.
    async fn kill_pod(&mut self, name: &str) -> Result<()>;

    /// Waits until every pod of the profile is running and ready again (after a kill,
    /// the restarted container).
    async fn settle(&mut self) -> Result<()>;

    /// Saves logs and state for a failure; returns where they are.
    async fn collect_artifacts(&self, label: &str) -> Result<PathBuf>;
}
