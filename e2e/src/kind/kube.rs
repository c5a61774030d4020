//! State of the cluster read through the Kubernetes API: rollouts, pods, the HPA.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::target::PodInfo;

/// Annotation holding a Deployment's (and its ReplicaSets') revision.
const REVISION: &str = "deployment.kubernetes.io/revision";

/// One line about a Deployment's rollout, and whether it is complete: the controller saw
/// the latest spec, every replica is updated and available, and no old one is left.
pub fn deployment_progress(d: &Deployment) -> (bool, String) {
    let name = d.metadata.name.clone().unwrap_or_default();
    let want = d.spec.replicas.unwrap_or(1);
    let generation = d.metadata.generation.unwrap_or(0);
    let status = d.status.clone().unwrap_or_default();
    if status.observed_generation.unwrap_or(0) < generation {
        return (false, format!("{name}: new spec not yet observed"));
    }
    let updated = status.updated_replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let terminating = status.terminating_replicas.unwrap_or(0);
    let done = updated == want && available == want && total == want && terminating == 0;
    (
        done,
        format!(
            "{name}: {updated}/{want} updated, {available} available, {total} total, {terminating} terminating"
        ),
    )
}

pub fn statefulset_progress(s: &StatefulSet) -> (bool, String) {
    let name = s.metadata.name.clone().unwrap_or_default();
    let want = s.spec.replicas.unwrap_or(1);
    let status = s.status.clone().unwrap_or_default();
    let ready = status.ready_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let same_revision = status.current_revision == status.update_revision;
    let observed = status.observed_generation.unwrap_or(0) >= s.metadata.generation.unwrap_or(0);
    (
        observed && ready == want && updated == want && same_revision,
        format!("{name}: {ready}/{want} ready, {updated} updated"),
    )
}

/// Every Deployment and StatefulSet of the namespace rolled out, and no server pod left
/// terminating. Returns (done, state).
pub async fn namespace_rolled_out(
    client: &Client,
    ns: &str,
    selector: &str,
) -> Result<(bool, String)> {
    let mut done = true;
    let mut states = Vec::new();
    for d in Api::<Deployment>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
    {
        let (ok, state) = deployment_progress(&d);
        done &= ok;
        states.push(state);
    }
    for s in Api::<StatefulSet>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
    {
        let (ok, state) = statefulset_progress(&s);
        done &= ok;
        states.push(state);
    }
    let pods = server_pods(client, ns, selector).await?;
    let terminating = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
        .count();
    let unready = pods.iter().filter(|p| !pod_ready(p)).count();
    done &= terminating == 0 && unready == 0;
    states.push(format!(
        "server pods: {terminating} terminating, {unready} not ready"
    ));
    Ok((done, states.join("; ")))
}

pub async fn server_pods(client: &Client, ns: &str, selector: &str) -> Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await?
        .items)
}

pub fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The server pods (terminating ones excluded), each marked current when it belongs to
/// the ReplicaSet of the Deployment's current revision.
pub async fn pod_infos(
    client: &Client,
    ns: &str,
    deployment: &str,
    selector: &str,
) -> Result<Vec<PodInfo>> {
    let d = Api::<Deployment>::namespaced(client.clone(), ns)
        .get(deployment)
        .await
        .with_context(|| format!("reading deployment {deployment}"))?;
    let revision = d
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .cloned();
    let current_hashes: BTreeSet<String> = Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await?
        .into_iter()
        .filter(|rs| {
            revision.is_some()
                && rs
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(REVISION))
                    == revision.as_ref()
        })
        .filter_map(|rs| {
            rs.metadata
                .labels
                .and_then(|l| l.get("pod-template-hash").cloned())
        })
        .collect();
    Ok(server_pods(client, ns, selector)
        .await?
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| PodInfo {
            ready: pod_ready(&p),
            current: p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-template-hash"))
                .is_some_and(|h| current_hashes.contains(h)),
            name: p.metadata.name.unwrap_or_default(),
        })
        .collect())
}

/// The HPA's own account of the scaling: its status, which only the HPA controller
/// writes.
#[derive(Clone, Debug)]
pub struct HpaState {
    pub current: i32,
    pub desired: i32,
    /// `status.lastScaleTime` (RFC 3339), when the controller last changed the scale.
    pub last_scale: Option<String>,
    /// `AbleToScale`, `ScalingActive`, `ScalingLimited`: (status, reason, message).
    pub conditions: Vec<(String, String, String, String)>,
    /// "cpu 85%/70%"
    pub cpu: String,
}

impl HpaState {
    /// The condition `type_` is `True`; its reason.
    pub fn condition(&self, type_: &str) -> Option<&(String, String, String, String)> {
        self.conditions.iter().find(|c| c.0 == type_)
    }

    pub fn holds(&self, type_: &str) -> bool {
        self.condition(type_).is_some_and(|c| c.1 == "True")
    }

    /// One line for progress and the report.
    pub fn summary(&self) -> String {
        let conditions: Vec<String> = self
            .conditions
            .iter()
            .map(|(t, s, r, _)| format!("{t}={s} ({r})"))
            .collect();
        format!(
            "{}, replicas {} → {}, lastScaleTime {}, {}",
            self.cpu,
            self.current,
            self.desired,
            self.last_scale.as_deref().unwrap_or("never"),
            conditions.join(", ")
        )
    }
}

/// The HPA `name`'s status.
pub async fn hpa_state(client: &Client, ns: &str, name: &str) -> Result<HpaState> {
    let hpa = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .with_context(|| format!("reading HorizontalPodAutoscaler {name}"))?;
    let target = hpa.spec.metrics.as_ref().and_then(|ms| {
        ms.iter()
            .filter_map(|m| m.resource.as_ref())
            .find(|r| r.name == "cpu")
            .and_then(|r| r.target.average_utilization)
    });
    let status = hpa.status.unwrap_or_default();
    let cpu = status
        .current_metrics
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.resource)
        .find(|r| r.name == "cpu")
        .and_then(|r| r.current.average_utilization);
    let fmt = |v: Option<i32>| v.map_or("?".to_string(), |v| format!("{v}%"));
    Ok(HpaState {
        current: status.current_replicas.unwrap_or(0),
        desired: status.desired_replicas,
        last_scale: status.last_scale_time.map(|t| t.0.to_string()),
        conditions: status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                (
                    c.type_,
                    c.status,
                    c.reason.unwrap_or_default(),
                    c.message.unwrap_or_default(),
                )
            })
            .collect(),
        cpu: format!("cpu {}/{}", fmt(cpu), fmt(target)),
    })
}
