//! `/api/v1/jobs`: fleet jobs (one command to many agents, paced, with a failure brake).
//! The handlers only decode, call [`crate::jobs::Jobs`] and map its [`JobError`]s.

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use http::{StatusCode, header};

use super::error::{ApiError, ErrorCode, Result};
use super::extract::{Admin, AdminContext, ApiJson, Id, Query};
use super::openapi::{
    BadRequest, ErrorBody, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
    Unprocessable, UnsupportedMediaType,
};
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
#[utoipa::path(
    post,
    path = "/api/v1/jobs",
    operation_id = "create_job",
    tag = "jobs",
    request_body(content = CreateJob, content_type = "application/json"),
    responses(
        (status = 201, description = "Stored: one command per matching agent, released by the pacer", body = JobView, headers(("Location" = String, description = "The job's URL"))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    ),
)]
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
#[utoipa::path(
    get,
    path = "/api/v1/jobs",
    operation_id = "list_jobs",
    tag = "jobs",
    params(ListJobs),
    responses(
        (status = 200, description = "A page of jobs, newest first", body = JobPage),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn list(
    State(state): State<AppState>,
    _: Admin,
    Query(query): Query<ListJobs>,
) -> Result<Json<JobPage>> {
    Ok(Json(state.jobs.list(query).await?))
}

/// `GET /api/v1/jobs/{id}` → [`JobView`]; 404.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{id}",
    operation_id = "get_job",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "The job, its counts and durations", body = JobView),
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
) -> Result<Json<JobView>> {
    Ok(Json(state.jobs.get(&id).await?))
}

/// `GET /api/v1/jobs/{id}/results?status=&limit=&after=` → [`ResultPage`], by agent id.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{id}/results",
    operation_id = "list_job_results",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "The job's id"),
        ListResults,
    ),
    responses(
        (status = 200, description = "A page of per-agent results, by client_id", body = ResultPage),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn results(
    State(state): State<AppState>,
    Id(id): Id,
    _: Admin,
    Query(query): Query<ListResults>,
) -> Result<Json<ResultPage>> {
    Ok(Json(state.jobs.results(&id, query).await?))
}

/// `POST /api/v1/jobs/{id}/pause` → [`JobView`]; 404; 409 `job_state` unless running.
#[utoipa::path(
    post,
    path = "/api/v1/jobs/{id}/pause",
    operation_id = "pause_job",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "Paused: no more commands are released", body = JobView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, description = "`job_state`: it is not running", body = ErrorBody),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn pause(
    State(state): State<AppState>,
    Id(id): Id,
    AdminContext(ctx): AdminContext,
) -> Result<Json<JobView>> {
    let view = state.jobs.pause(&id).await?;
    audit(&state, &ctx, AuditAction::JobPaused, &id).await;
    Ok(Json(view))
}

/// `POST /api/v1/jobs/{id}/resume` → [`JobView`]; 404; 409 `job_state` unless paused.
#[utoipa::path(
    post,
    path = "/api/v1/jobs/{id}/resume",
    operation_id = "resume_job",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "Running again", body = JobView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, description = "`job_state`: it is not paused", body = ErrorBody),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn resume(
    State(state): State<AppState>,
    Id(id): Id,
    AdminContext(ctx): AdminContext,
) -> Result<Json<JobView>> {
    let view = state.jobs.resume(&id).await?;
    audit(&state, &ctx, AuditAction::JobResumed, &id).await;
    Ok(Json(view))
}

/// `POST /api/v1/jobs/{id}/cancel` → [`JobView`]; 404; 409 `job_state` once ended.
#[utoipa::path(
    post,
    path = "/api/v1/jobs/{id}/cancel",
    operation_id = "cancel_job",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "The job's id"),
    ),
    responses(
        (status = 200, description = "Cancelled: what was not delivered expires", body = JobView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, description = "`job_state`: it has ended", body = ErrorBody),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn cancel(
    State(state): State<AppState>,
    Id(id): Id,
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
