//! `/api/v1/jobs`: fleet jobs (one command to many agents, paced, with a failure brake).
//! The handlers only decode, call [`crate::jobs::Jobs`] and map its [`JobError`]s.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use http::{StatusCode, header};

use super::error::{ApiError, ErrorCode, Result};
use super::extract::{Admin, AdminContext, ApiJson, Query};
use crate::audit::{AuditAction, AuditEvent};
use crate::jobs::{CreateJob, JobError, JobPage, JobView, ListJobs, ListResults, ResultPage};
use crate::state::AppState;

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::InvalidTarget(m) => ApiError::bad_request(ErrorCode::InvalidTarget, m),
            JobError::Invalid(m) => ApiError::bad_request(ErrorCode::InvalidJob, m),
            JobError::NoAgentsMatch => ApiError::Unprocessable {
                code: ErrorCode::NoAgentsMatch,
                message: "no agent matches the target; nothing was stored".into(),
            },
            e @ JobError::NotFound(_) => ApiError::NotFound(e.to_string()),
            e @ JobError::WrongState { .. } => ApiError::Conflict {
                code: ErrorCode::JobState,
                message: e.to_string(),
            },
            JobError::Store(e) => e.into(),
        }
    }
}

/// `POST /api/v1/jobs` with a [`CreateJob`] body → 201 [`JobView`] and `Location`;
/// 400 `invalid_target`/`invalid_job`, 422 `no_agents_match`.
pub(super) async fn create(
    State(state): State<AppState>,
    AdminContext(ctx): AdminContext,
    ApiJson(body): ApiJson<CreateJob>,
) -> Result<impl IntoResponse> {
    let view = state.jobs.create(body).await?;
    audit(&state, &ctx, AuditAction::JobCreated, &view.id).await;
    let location = format!("/api/v1/jobs/{}", view.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view),
    ))
}

/// `GET /api/v1/jobs?status=&limit=&before=` → [`JobPage`], newest first.
pub(super) async fn list(
    State(state): State<AppState>,
    _: Admin,
    Query(query): Query<ListJobs>,
) -> Result<Json<JobPage>> {
    Ok(Json(state.jobs.list(query).await?))
}

/// `GET /api/v1/jobs/{id}` → [`JobView`]; 404.
pub(super) async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    _: Admin,
) -> Result<Json<JobView>> {
    Ok(Json(state.jobs.get(&id).await?))
}

/// `GET /api/v1/jobs/{id}/results?status=&limit=&after=` → [`ResultPage`], by agent id.
pub(super) async fn results(
    State(state): State<AppState>,
    Path(id): Path<String>,
    _: Admin,
    Query(query): Query<ListResults>,
) -> Result<Json<ResultPage>> {
    Ok(Json(state.jobs.results(&id, query).await?))
}

/// `POST /api/v1/jobs/{id}/pause` → [`JobView`]; 404; 409 `job_state` unless running.
pub(super) async fn pause(
    State(state): State<AppState>,
    Path(id): Path<String>,
    AdminContext(ctx): AdminContext,
) -> Result<Json<JobView>> {
    let view = state.jobs.pause(&id).await?;
    audit(&state, &ctx, AuditAction::JobPaused, &id).await;
    Ok(Json(view))
}

/// `POST /api/v1/jobs/{id}/resume` → [`JobView`]; 404; 409 `job_state` unless paused.
pub(super) async fn resume(
    State(state): State<AppState>,
    Path(id): Path<String>,
    AdminContext(ctx): AdminContext,
) -> Result<Json<JobView>> {
    let view = state.jobs.resume(&id).await?;
    audit(&state, &ctx, AuditAction::JobResumed, &id).await;
    Ok(Json(view))
}

/// `POST /api/v1/jobs/{id}/cancel` → [`JobView`]; 404; 409 `job_state` once ended.
pub(super) async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    AdminContext(ctx): AdminContext,
) -> Result<Json<JobView>> {
    let view = state.jobs.cancel(&id).await?;
    audit(&state, &ctx, AuditAction::JobCancelled, &id).await;
    Ok(Json(view))
}

/// Records a job action in the audit log (logged, never failing the request).
async fn audit(
    state: &AppState,
    ctx: &crate::audit::RequestContext,
    action: AuditAction,
    id: &str,
) {
    state
        .creds
        .audit()
        .record_or_log(AuditEvent::now(ctx, action, id))
        .await;
}
