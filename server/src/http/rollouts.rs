//! `/api/v1/rollouts` (the desired version per os/arch and its progress) and
//! `/api/v1/pods` (which replica holds how many agents).

use http::{HeaderValue, Request, StatusCode, header};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use super::api::{Access, authorize, query_params};
use super::error::{ApiError, Result};
use super::{MAX_API_BODY, Response, json, read_json};
use crate::binaries::rollout::{self, Progress};
use crate::ids::rfc3339;
use crate::state::AppState;
use crate::store::{RolloutRow, RolloutStart, RolloutStatus, now_ms};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRollout {
    binary_id: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    percentage: Option<i32>,
    #[serde(default)]
    max_concurrent: Option<i64>,
}

#[derive(Serialize)]
struct RolloutView {
    id: String,
    binary_id: String,
    os: String,
    arch: String,
    version: String,
    label: Option<String>,
    percentage: i32,
    max_concurrent: i32,
    status: String,
    created_at: String,
    ended_at: Option<String>,
    progress: Progress,
}

async fn view(state: &AppState, r: RolloutRow) -> Result<RolloutView> {
    let progress = state.rollouts.progress(&r).await?;
    Ok(RolloutView {
        progress,
        created_at: rfc3339(r.created_at),
        ended_at: r.ended_at.map(rfc3339),
        id: r.id,
        binary_id: r.binary_id,
        os: r.os,
        arch: r.arch,
        version: r.version,
        label: r.label,
        percentage: r.percentage,
        max_concurrent: r.max_concurrent,
        status: r.status,
    })
}

/// `POST /api/v1/rollouts`: makes a binary the desired version of its os/arch.
pub async fn create(state: &AppState, req: Request<Incoming>) -> Result<Response> {
    authorize(state, req.headers(), Access::Admin)?;
    let body: CreateRollout = read_json(req, MAX_API_BODY).await?;
    let percentage = body.percentage.unwrap_or(100);
    if !(1..=100).contains(&percentage) {
        return Err(ApiError::bad_request(
            "invalid_rollout",
            "percentage must be from 1 to 100",
        ));
    }
    let max_concurrent = match body.max_concurrent {
        None => i64::from(state.config.fleet.rollout_max_concurrent),
        Some(n) if (1..=100_000).contains(&n) => n,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_rollout",
                "max_concurrent must be from 1 to 100000",
            ));
        }
    };
    let label = body
        .label
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty());
    if let Some(l) = &label {
        let (_, problem) = rollout::check_labels(vec![l.clone()]);
        if let Some(problem) = problem {
            return Err(ApiError::bad_request("invalid_rollout", problem));
        }
    }
    let binary = state
        .store
        .get_binary(body.binary_id.clone())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no binary `{}`", body.binary_id)))?;
    let row = RolloutRow {
        id: uuid::Uuid::now_v7().to_string(),
        binary_id: binary.id,
        os: binary.os,
        arch: binary.arch,
        version: binary.version,
        label,
        percentage,
        max_concurrent: max_concurrent as i32,
        status: RolloutStatus::Active.as_str().to_string(),
        created_at: now_ms(),
        ended_at: None,
    };
    match state.store.start_rollout(row.clone()).await? {
        RolloutStart::Started { superseded } => {
            tracing::info!(
                rollout = %row.id, version = %row.version, os = %row.os, arch = %row.arch,
                ?superseded, "rollout started"
            );
            state.rollouts.apply_now().await?;
            let id = row.id.clone();
            let mut resp = json(StatusCode::CREATED, &view(state, row).await?);
            if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/rollouts/{id}")) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            Ok(resp)
        }
        RolloutStart::BinaryGone => {
            Err(ApiError::NotFound(format!("no binary `{}`", row.binary_id)))
        }
        RolloutStart::Raced => Err(ApiError::Conflict {
            code: "rollout_conflict",
            message: format!(
                "another rollout for {}/{} was started at the same moment; list the rollouts and retry if needed",
                row.os, row.arch
            ),
        }),
    }
}

/// `GET /api/v1/rollouts?limit=`: newest first, each with its progress.
pub async fn list(state: &AppState, req: Request<Incoming>) -> Result<Response> {
    authorize(state, req.headers(), Access::Admin)?;
    let params = query_params(req.uri().query());
    let limit = match params.iter().find(|(k, _)| k == "limit").map(|(_, v)| v) {
        None => 50,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (1..=500).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_limit",
                    "limit must be a number from 1 to 500",
                ));
            }
        },
    };
    let mut rollouts = Vec::new();
    for r in state.store.list_rollouts(limit).await? {
        rollouts.push(view(state, r).await?);
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"rollouts": rollouts}),
    ))
}

async fn find(state: &AppState, id: &str) -> Result<RolloutRow> {
    state
        .store
        .get_rollout(id.to_string())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no rollout `{id}`")))
}

/// `GET /api/v1/rollouts/{id}`.
pub async fn get(state: &AppState, id: &str, req: Request<Incoming>) -> Result<Response> {
    authorize(state, req.headers(), Access::Admin)?;
    let r = find(state, id).await?;
    Ok(json(StatusCode::OK, &view(state, r).await?))
}

/// `DELETE /api/v1/rollouts/{id}`: cancels it; agents are no longer told to update.
/// The row stays, as history.
pub async fn cancel(state: &AppState, id: &str, req: Request<Incoming>) -> Result<Response> {
    authorize(state, req.headers(), Access::Admin)?;
    find(state, id).await?;
    let r = state
        .store
        .cancel_rollout(id.to_string(), now_ms())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no rollout `{id}`")))?;
    tracing::info!(rollout = id, status = %r.status, "rollout cancelled");
    state.rollouts.apply_now().await?;
    Ok(json(StatusCode::OK, &view(state, r).await?))
}

/// `GET /api/v1/pods`: agents online per replica, from the agents table.
pub async fn pods(state: &AppState, req: Request<Incoming>) -> Result<Response> {
    authorize(state, req.headers(), Access::Admin)?;
    let (mut pods, total) = state.store.agents_by_pod().await?;
    let this = &state.config.pod_id;
    if !pods.iter().any(|(p, _)| p == this) {
        pods.push((this.clone(), 0));
        pods.sort();
    }
    let online: i64 = pods.iter().map(|(_, n)| n).sum();
    let pods: Vec<serde_json::Value> = pods
        .into_iter()
        .map(|(pod, n)| serde_json::json!({"pod": pod, "online_agents": n, "this_replica": &pod == this}))
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"pods": pods, "agents": total, "online": online, "offline": total - online}),
    ))
}
