//! `GET /api/v1/pods`: which replica holds how many agents.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::error::Result;
use super::extract::Admin;
use super::openapi::{Forbidden, Unauthorized, Unavailable};
use crate::state::AppState;

/// One replica's share of the fleet.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Pod {
    /// The replica's POD_ID (its hostname by default).
    pod: String,
    online_agents: i64,
    /// Whether this is the replica that answered.
    this_replica: bool,
}

/// Agents online per replica, and the fleet's counts.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct PodList {
    pods: Vec<Pod>,
    /// Every known agent.
    agents: i64,
    online: i64,
    offline: i64,
}

/// Agents online per replica, from the agents table; this replica is listed even with
/// none.
#[utoipa::path(
    get,
    path = "/api/v1/pods",
    operation_id = "list_pods",
    tag = "pods",
    responses(
        (status = 200, description = "Agents online per replica", body = PodList),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn list(State(state): State<AppState>, _: Admin) -> Result<Json<PodList>> {
    let (mut pods, total) = state.store.agents_by_pod().await?;
    let this = &state.config.pod_id;
    if !pods.iter().any(|(p, _)| p == this) {
        pods.push((this.clone(), 0));
        pods.sort();
    }
    let online: i64 = pods.iter().map(|(_, n)| n).sum();
    let pods = pods
        .into_iter()
        .map(|(pod, n)| Pod {
            this_replica: &pod == this,
            pod,
            online_agents: n,
        })
        .collect();
    Ok(Json(PodList {
        pods,
        agents: total,
        online,
        offline: total - online,
    }))
}
