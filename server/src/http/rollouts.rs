//! `/api/v1/rollouts`: the desired version per os/arch, each rollout's progress, and
//! the operator's pause and resume (the failure brake pauses in the store).

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use http::{StatusCode, header};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorCode, Result};
use super::extract::{Admin, AdminContext, ApiJson, Id, Page};
use super::openapi::{
    BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
    UnsupportedMediaType,
};
use crate::audit::{AuditAction, AuditEvent};
use crate::binaries::rollout::{self, Progress};
use crate::ids::rfc3339;
use crate::jobs::DEFAULT_MIN_SAMPLE;
use crate::state::AppState;
use crate::store::{
    RolloutBrake, RolloutRow, RolloutStart, RolloutStatus, RolloutTransition, now_ms,
};

/// Body of `POST /api/v1/rollouts`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateRollout {
    /// The binary that becomes the desired version of its os/arch.
    binary_id: String,
    /// Only agents that reported this label.
    #[serde(default)]
    label: Option<String>,
    /// The share of the os/arch's agents it concerns, 1 to 100 (default 100).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100)]
    percentage: Option<i32>,
    /// Agents updating at once, 1 to 100000 (default ROLLOUT_MAX_CONCURRENT).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100000)]
    max_concurrent: Option<i64>,
    /// Pause when (failed + timed out) ÷ finished updates exceeds this (0 to 1).
    #[serde(default)]
    max_failure_ratio: Option<f64>,
    /// Finished updates needed before the brake may trip (default 10).
    #[serde(default)]
    min_sample: Option<i64>,
    /// A rollback: required to roll out an older version than the platform's latest
    /// rollout, and offers the build to agents on newer versions too.
    #[serde(default)]
    allow_downgrade: bool,
}

/// A rollout and its progress.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Rollout)]
pub(super) struct RolloutView {
    id: String,
    binary_id: String,
    os: String,
    arch: String,
    version: String,
    label: Option<String>,
    percentage: i32,
    max_concurrent: i32,
    allow_downgrade: bool,
    /// The failure brake, if the rollout has one.
    max_failure_ratio: Option<f64>,
    min_sample: Option<i64>,
    /// `active`, `paused`, `superseded` or `cancelled`.
    status: String,
    /// Why it is paused (the failure brake's verdict, or an operator's pause).
    reason: Option<String>,
    /// RFC 3339 UTC.
    created_at: String,
    ended_at: Option<String>,
    /// Its os/arch's agents by state.
    progress: Progress,
}

/// Rollouts, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct RolloutList {
    rollouts: Vec<RolloutView>,
}

async fn view(state: &AppState, r: RolloutRow) -> Result<RolloutView> {
    let progress = state.rollouts.progress(&r).await?;
    let brake = state.store.rollout_brake(r.id.clone()).await?;
    Ok(RolloutView {
        max_failure_ratio: brake.as_ref().map(|b| b.max_failure_ratio),
        min_sample: brake.map(|b| b.min_sample),
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
        allow_downgrade: r.allow_downgrade,
        status: r.status,
        reason: r.reason,
    })
}

/// `POST /api/v1/rollouts` with `{"binary_id", "label"?, "percentage"?,
/// "max_concurrent"?, "max_failure_ratio"?, "min_sample"?, "allow_downgrade"?}`: makes a
/// binary the desired version of its os/arch. 400 `invalid_rollout` for values out of
/// range, and for an older version than the platform's latest rollout without
/// `allow_downgrade`.
#[utoipa::path(
    post,
    path = "/api/v1/rollouts",
    operation_id = "create_rollout",
    tag = "rollouts",
    request_body(content = CreateRollout, content_type = "application/json"),
    responses(
        (status = 201, description = "Started; supersedes the active rollout of its os/arch", body = RolloutView, headers(("Location" = String, description = "The rollout's URL"))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn create(
    State(state): State<AppState>,
    AdminContext(ctx): AdminContext,
    ApiJson(body): ApiJson<CreateRollout>,
) -> Result<impl IntoResponse> {
    let invalid = |m: String| ApiError::bad_request(ErrorCode::InvalidRollout, m);
    let percentage = body.percentage.unwrap_or(100);
    if !(1..=100).contains(&percentage) {
        return Err(invalid("percentage must be from 1 to 100".into()));
    }
    let max_concurrent = match body.max_concurrent {
        None => i64::from(state.config.releases.rollout_max_concurrent),
        Some(n) if (1..=100_000).contains(&n) => n,
        Some(_) => return Err(invalid("max_concurrent must be from 1 to 100000".into())),
    };
    if let Some(r) = body.max_failure_ratio
        && !(0.0..=1.0).contains(&r)
    {
        return Err(invalid(format!(
            "max_failure_ratio must be from 0 to 1 (got {r})"
        )));
    }
    let min_sample = match body.min_sample {
        None => DEFAULT_MIN_SAMPLE,
        Some(n) if (1..=1_000_000).contains(&n) => n,
        Some(n) => {
            return Err(invalid(format!(
                "min_sample must be from 1 to 1000000 (got {n})"
            )));
        }
    };
    let label = body
        .label
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty());
    if let Some(l) = &label
        && let (_, Some(problem)) = rollout::check_labels(vec![l.clone()])
    {
        return Err(invalid(problem));
    }
    let binary = state
        .store
        .get_binary(body.binary_id.clone())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no binary `{}`", body.binary_id)))?;
    // A rollback only when an operator says so: agents refuse a downgrade the update
    // does not allow, and an older target by mistake would stall the platform.
    if !body.allow_downgrade
        && let Some(latest) = state
            .store
            .latest_rollout(binary.os.clone(), binary.arch.clone())
            .await?
        && agent_protocol::version::is_older(&binary.version, &latest.version)
    {
        return Err(invalid(format!(
            "{} is older than {}, the version of the latest rollout for {}/{}: to roll back, send \"allow_downgrade\": true",
            binary.version, latest.version, binary.os, binary.arch
        )));
    }
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
        allow_downgrade: body.allow_downgrade,
        reason: None,
    };
    let brake = body
        .max_failure_ratio
        .map(|max_failure_ratio| RolloutBrake {
            rollout_id: row.id.clone(),
            max_failure_ratio,
            min_sample,
            judged_failed: 0,
            judged_finished: 0,
        });
    match state.store.start_rollout(row.clone(), brake).await? {
        RolloutStart::Started { superseded } => {
            tracing::info!(
                rollout = %row.id, version = %row.version, os = %row.os, arch = %row.arch,
                ?superseded, "rollout started"
            );
            state
                .creds
                .audit()
                .record_or_log(
                    AuditEvent::now(&ctx, AuditAction::RolloutCreated, &row.id).with_detail(
                        serde_json::json!({
                            "binary_id": row.binary_id, "version": row.version,
                            "os": row.os, "arch": row.arch, "label": row.label,
                            "percentage": row.percentage,
                            "allow_downgrade": row.allow_downgrade,
                            "max_failure_ratio": body.max_failure_ratio,
                        }),
                    ),
                )
                .await;
            state.rollouts.apply_now().await?;
            let location = format!("/api/v1/rollouts/{}", row.id);
            Ok((
                StatusCode::CREATED,
                [(header::LOCATION, location)],
                Json(view(&state, row).await?),
            ))
        }
        RolloutStart::BinaryGone => {
            Err(ApiError::NotFound(format!("no binary `{}`", row.binary_id)))
        }
        RolloutStart::Raced => Err(ApiError::Conflict {
            code: ErrorCode::RolloutConflict,
            message: format!(
                "another rollout for {}/{} was started at the same moment; list the rollouts and retry if needed",
                row.os, row.arch
            ),
        }),
    }
}

/// `GET /api/v1/rollouts?limit=`: newest first, each with its progress.
#[utoipa::path(
    get,
    path = "/api/v1/rollouts",
    operation_id = "list_rollouts",
    tag = "rollouts",
    params(
        ("limit" = Option<String>, Query, pattern = r"^(0*([1-9][0-9]?|[1-4][0-9]{2}|500))?$", description = "How many (default 50; 1 to 500; empty: the default)"),
    ),
    responses(
        (status = 200, description = "Rollouts, newest first", body = RolloutList),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn list(
    State(state): State<AppState>,
    _: Admin,
    page: Page,
) -> Result<Json<RolloutList>> {
    let limit = page.limit(50, 500)?;
    let mut rollouts = Vec::new();
    for r in state.store.list_rollouts(limit).await? {
        rollouts.push(view(&state, r).await?);
    }
    Ok(Json(RolloutList { rollouts }))
}

async fn find(state: &AppState, id: &str) -> Result<RolloutRow> {
    state
        .store
        .get_rollout(id.to_string())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no rollout `{id}`")))
}

/// `GET /api/v1/rollouts/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/rollouts/{id}",
    operation_id = "get_rollout",
    tag = "rollouts",
    params(
        ("id" = String, Path, description = "The rollout's id"),
    ),
    responses(
        (status = 200, description = "The rollout", body = RolloutView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn get(
    State(state): State<AppState>,
    Id(id): Id,
    _: Admin,
) -> Result<Json<RolloutView>> {
    let r = find(&state, &id).await?;
    Ok(Json(view(&state, r).await?))
}

/// `POST /api/v1/rollouts/{id}/pause` → 200 [`RolloutView`]; 404; 409 `rollout_state`
/// unless active. Agents already updating finish; nobody else is offered the build.
#[utoipa::path(
    post,
    path = "/api/v1/rollouts/{id}/pause",
    operation_id = "pause_rollout",
    tag = "rollouts",
    params(
        ("id" = String, Path, description = "The rollout's id"),
    ),
    responses(
        (status = 200, description = "Paused; nobody else is offered the build", body = RolloutView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn pause(
    State(state): State<AppState>,
    Id(id): Id,
    AdminContext(ctx): AdminContext,
) -> Result<Json<RolloutView>> {
    let outcome = state
        .store
        .pause_rollout(id.clone(), "paused by an operator".into())
        .await?;
    transitioned(
        &state,
        &ctx,
        &id,
        outcome,
        "pause",
        AuditAction::RolloutPaused,
    )
    .await
}

/// `POST /api/v1/rollouts/{id}/resume` → 200 [`RolloutView`]; 404; 409 `rollout_state`
/// unless paused. The failure brake starts a new sample.
#[utoipa::path(
    post,
    path = "/api/v1/rollouts/{id}/resume",
    operation_id = "resume_rollout",
    tag = "rollouts",
    params(
        ("id" = String, Path, description = "The rollout's id"),
    ),
    responses(
        (status = 200, description = "Resumed; the failure brake starts a new sample", body = RolloutView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn resume(
    State(state): State<AppState>,
    Id(id): Id,
    AdminContext(ctx): AdminContext,
) -> Result<Json<RolloutView>> {
    let outcome = state.store.resume_rollout(id.clone()).await?;
    transitioned(
        &state,
        &ctx,
        &id,
        outcome,
        "resume",
        AuditAction::RolloutResumed,
    )
    .await
}

async fn transitioned(
    state: &AppState,
    ctx: &crate::audit::RequestContext,
    id: &str,
    outcome: RolloutTransition,
    action: &'static str,
    audit: AuditAction,
) -> Result<Json<RolloutView>> {
    match outcome {
        RolloutTransition::Done(row) => {
            tracing::info!(rollout = %id, action, status = %row.status, "rollout changed");
            state
                .creds
                .audit()
                .record_or_log(AuditEvent::now(ctx, audit, id))
                .await;
            state.rollouts.apply_now().await?;
            Ok(Json(view(state, *row).await?))
        }
        RolloutTransition::WrongState(status) => Err(ApiError::Conflict {
            code: ErrorCode::RolloutState,
            message: format!(
                "cannot {action} rollout `{id}`: it is {status}; only an active rollout can be paused and only a paused one resumed"
            ),
        }),
        RolloutTransition::NotFound => Err(ApiError::NotFound(format!("no rollout `{id}`"))),
    }
}

/// `DELETE /api/v1/rollouts/{id}`: cancels it; agents are no longer told to update.
/// The row stays, as history.
#[utoipa::path(
    delete,
    path = "/api/v1/rollouts/{id}",
    operation_id = "cancel_rollout",
    tag = "rollouts",
    params(
        ("id" = String, Path, description = "The rollout's id"),
    ),
    responses(
        (status = 200, description = "Cancelled (kept as history)", body = RolloutView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn cancel(
    State(state): State<AppState>,
    Id(id): Id,
    AdminContext(ctx): AdminContext,
) -> Result<Json<RolloutView>> {
    find(&state, &id).await?;
    let r = state
        .store
        .cancel_rollout(id.clone(), now_ms())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no rollout `{id}`")))?;
    tracing::info!(rollout = %id, status = %r.status, "rollout cancelled");
    state
        .creds
        .audit()
        .record_or_log(AuditEvent::now(&ctx, AuditAction::RolloutCancelled, &id))
        .await;
    state.rollouts.apply_now().await?;
    Ok(Json(view(&state, r).await?))
}
