//! `GET /api/v1/pods`: which replica holds how many agents.

use axum::Json;
use axum::extract::State;

use super::error::Result;
use super::extract::Admin;
use super::openapi::{ErrorBody, PodListDoc};
use crate::state::AppState;

/// Agents online per replica, from the agents table; this replica is listed even with
/// none.
#[utoipa::path(
    get,
    path = "/api/v1/pods",
    operation_id = "list_pods",
    tag = "pods",
    responses(
        (status = 200, description = "Agents online per replica", body = PodListDoc),
        (status = 401, description = "No valid credential", body = ErrorBody),
        (status = 403, description = "The credential does not grant this", body = ErrorBody),
        (status = 503, description = "The database does not answer or the replica is draining; retry (`Retry-After`)", body = ErrorBody),
    ),
)]
pub(super) async fn list(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<serde_json::Value>> {
    let (mut pods, total) = state.store.agents_by_pod().await?;
    let this = &state.config.pod_id;
    if !pods.iter().any(|(p, _)| p == this) {
        pods.push((this.clone(), 0));
        pods.sort();
    }
    let online: i64 = pods.iter().map(|(_, n)| n).sum();
    let pods: Vec<serde_json::Value> = pods
        .into_iter()
        .map(|(pod, n)| {
            serde_json::json!({"pod": pod, "online_agents": n, "this_replica": &pod == this})
        })
        .collect();
    Ok(Json(serde_json::json!({
        "pods": pods,
        "agents": total,
        "online": online,
        "offline": total - online,
    })))
}
