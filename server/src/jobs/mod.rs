//! Fleet jobs: one command to many agents, paced, with a failure brake.
//!
//! A job selects agents by a [`Target`] and stores one ordinary command per agent (in
//! the agent's history, delivered at least once, the same wire messages), held until the
//! job's pacer releases it. Everything below HTTP lives here: [`Jobs`] is the handle the
//! REST handlers call (one method per route, typed requests and responses, errors as
//! [`JobError`]); [`pacer::Pacer`] is the per-replica background task that releases held
//! commands within the job's bounds ([`pacing`]) and pauses it when too many fail
//! (`crate::brake`, shared with rollouts). The decisions are taken in the store, so replicas agree.

pub mod pacer;
pub mod pacing;
pub mod targeting;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use targeting::Target;

use crate::ids::rfc3339;
use crate::metrics::{JobEvent, Metrics};
use crate::store::{
    CanarySize, CommandStatus, JobCounts, JobCreation, JobDurations, JobRecord, JobResultRow,
    JobRow, JobStatus, JobTransition, Store, StoreError, now_ms,
};

/// Longest job (and command) name.
pub(crate) const MAX_NAME: usize = 128;
/// Longest TTL, as for single commands.
pub(crate) const MAX_TTL_SECONDS: u64 = 30 * 86_400;
/// Minimum results before the brake may trip, unless the request says otherwise.
pub(crate) const DEFAULT_MIN_SAMPLE: i64 = 10;
/// Largest page of jobs or results.
pub(crate) const MAX_PAGE: i64 = 500;
/// Stored for "no in-flight bound"; shown as `null`.
pub(crate) const UNBOUNDED: i64 = i64::MAX;

/// Body of `POST /api/v1/jobs`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// The command name every agent receives (1 to 128 characters).
    #[schema(min_length = 1, max_length = 128)]
    pub name: String,
    /// JSON object sent as the command's args; `{}` when absent.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub args: Option<Box<RawValue>>,
    /// Which agents get the command.
    pub target: Target,
    /// Each command expires this long after the job is created (1 s to 30 days); none
    /// by default, so offline agents get it whenever they connect.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// Most commands released and without a result at once; unbounded by default.
    #[serde(default)]
    pub max_in_flight: Option<i64>,
    /// Most commands released per second (after an idle second, one second's worth at
    /// once); unbounded by default.
    #[serde(default)]
    pub(crate) rate_per_second: Option<i64>,
    /// Released first, alone; the rest start when each canary command is final.
    #[serde(default)]
    pub canary: Option<Canary>,
    /// Pause the job when failed ÷ (succeeded + failed) exceeds this (0 to 1).
    #[serde(default)]
    pub max_failure_ratio: Option<f64>,
    /// Results needed before the brake may trip (default 10).
    #[serde(default)]
    pub min_sample: Option<i64>,
}

/// `{"count": 20}` or `{"percentage": 5}` (of the targeted agents, at least one).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    /// This many commands (clamped to the targeted count).
    #[serde(default)]
    pub count: Option<i64>,
    /// 1 to 100 percent of the targeted agents, rounded up, at least one.
    #[serde(default)]
    pub percentage: Option<i64>,
}

/// Query of `GET /api/v1/jobs`: newest first; `before` is the previous page's `next`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListJobs {
    /// `running`, `paused`, `cancelled` or `completed`.
    #[serde(default)]
    pub status: Option<String>,
    /// Page size, 1 to 500 (default 50; empty: the default).
    #[serde(default, deserialize_with = "empty_or_digits")]
    #[param(value_type = Option<String>, pattern = r"^(0*([1-9][0-9]?|[1-4][0-9]{2}|500))?$")]
    pub limit: Option<i64>,
    /// The `next` of the previous page.
    #[serde(default)]
    pub before: Option<String>,
}

/// Query of `GET /api/v1/jobs/{id}/results`: by client_id; `after` is the previous
/// page's `next`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListResults {
    /// `pending`, `delivered`, `succeeded`, `failed` or `expired`.
    #[serde(default)]
    pub status: Option<String>,
    /// Page size, 1 to 500 (default 100; empty: the default).
    #[serde(default, deserialize_with = "empty_or_digits")]
    #[param(value_type = Option<String>, pattern = r"^(0*([1-9][0-9]?|[1-4][0-9]{2}|500))?$")]
    pub limit: Option<i64>,
    /// The `next` of the previous page.
    #[serde(default)]
    pub after: Option<String>,
}

impl ListJobs {
    /// The status, the `before` cursor (`{created_at}.{id}`) and the page size; 400
    /// `invalid_job` for a bad status, limit or cursor. Empty values mean absent.
    pub(crate) fn parse(self) -> Result<JobListing, JobError> {
        let status = self
            .status
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| {
                JobStatus::parse(s).ok_or_else(|| {
                    JobError::Invalid(format!(
                        "status must be running, paused, cancelled or completed (got {s:?})"
                    ))
                })
            })
            .transpose()?;
        let limit = page_limit(self.limit, 50)?;
        let before = match self.before.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(cursor) => Some(
                cursor
                    .split_once('.')
                    .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id.to_string())))
                    .ok_or_else(|| {
                        JobError::Invalid(format!(
                            "before must be a cursor from `next` (got {cursor:?})"
                        ))
                    })?,
            ),
        };
        Ok((status, before, limit))
    }
}

/// A checked [`ListJobs`]: the status, the `before` cursor and the page size.
pub(crate) type JobListing = (Option<JobStatus>, Option<(i64, String)>, i64);

impl ListResults {
    /// The command status (lowercase), the `after` cursor (a client_id) and the page
    /// size; 400 `invalid_job` for a bad status or limit. Empty values mean absent.
    pub(crate) fn parse(self) -> Result<(Option<String>, Option<String>, i64), JobError> {
        let status = self
            .status
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| {
                CommandStatus::parse(s).map(|s| s.as_str().to_string()).ok_or_else(|| {
                    JobError::Invalid(format!(
                        "status must be pending, delivered, succeeded, failed or expired (got {s:?})"
                    ))
                })
            })
            .transpose()?;
        let limit = page_limit(self.limit, 100)?;
        Ok((status, self.after.filter(|s| !s.is_empty()), limit))
    }
}

/// A job, its counts and durations: the body of every job response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Job)]
pub struct JobView {
    /// A UUIDv7: ids sort by creation time.
    pub id: String,
    /// The command name every targeted agent receives.
    pub name: String,
    /// The command's args, a JSON object.
    #[schema(value_type = Object)]
    pub args: Box<RawValue>,
    /// The target as it was given.
    #[schema(value_type = Target)]
    pub target: Box<RawValue>,
    /// Where the job is in its lifecycle.
    pub status: JobStatus,
    /// Why it is paused or ended.
    pub reason: Option<String>,
    /// Agents the job was stored for (one command each).
    pub targeted: i64,
    /// Commands released first, alone (0: no canary).
    pub canary: i64,
    /// `null`: unbounded.
    pub max_in_flight: Option<i64>,
    pub(crate) rate_per_second: Option<i64>,
    /// The brake's failure ratio (0 to 1); `null`: no brake.
    pub max_failure_ratio: Option<f64>,
    /// Results needed before the brake may trip.
    pub min_sample: i64,
    /// Commands released so far by the pacers.
    pub released: i64,
    /// The job's commands by status.
    pub counts: JobCounts,
    /// From delivery to result, in milliseconds.
    pub durations: JobDurations,
    /// RFC 3339 UTC.
    pub created_at: String,
    pub(crate) updated_at: String,
    pub(crate) ended_at: Option<String>,
    /// RFC 3339 UTC; `null`: its commands never expire.
    pub expires_at: Option<String>,
}

/// A page of jobs, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobPage {
    /// At most `limit` jobs.
    pub jobs: Vec<JobView>,
    /// Cursor for the next page (`before=`), absent on the last.
    pub next: Option<String>,
}

/// One agent's command in a job.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobResult {
    /// The agent's `client_id`.
    pub agent_id: String,
    pub(crate) command_id: String,
    /// A command status in lowercase (`pending` … `expired`).
    pub status: String,
    /// Held back by the pacer (status `pending`, not released yet).
    pub held: bool,
    /// The agent's output, as it sent it (JSON).
    #[schema(value_type = Option<Value>)]
    pub output: Option<Box<RawValue>>,
    /// From the last delivery to the result.
    pub duration_ms: Option<i64>,
    pub(crate) delivered_at: Option<String>,
    /// RFC 3339 UTC; when the result came or the command expired.
    pub completed_at: Option<String>,
}

/// A page of a job's results, by client_id.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ResultPage {
    /// At most `limit` results.
    pub results: Vec<JobResult>,
    /// Cursor for the next page (`after=`), absent on the last.
    pub next: Option<String>,
}

/// Everything that can go wrong with a job request. The HTTP layer maps each variant to
/// one status (see `docs/operations.md`, "Jobs").
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// 400 `invalid_target`.
    #[error("{0}")]
    InvalidTarget(String),
    /// 400 `invalid_job`.
    #[error("{0}")]
    Invalid(String),
    /// 422 `no_agents_match`.
    #[error("no agent matches the target")]
    NoAgentsMatch,
    /// 404 `not_found`.
    #[error("no job `{0}`")]
    NotFound(String),
    /// 409 `conflict`.
    #[error("job `{id}` is {status}; cannot {action} it")]
    WrongState {
        /// The job's id.
        id: String,
        /// Its current status (`completed`).
        status: &'static str,
        /// What was asked (`pause`, `resume`, `cancel`).
        action: &'static str,
    },
    /// 503 when the pool is exhausted, else 500 (as `StoreError` everywhere).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The jobs API below HTTP: a narrow handle (store and metrics), cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    store: Store,
    metrics: Arc<Metrics>,
}

impl Jobs {
    /// The jobs API over `store`; `metrics` counts jobs created, paused, resumed and
    /// cancelled.
    pub fn new(store: Store, metrics: Arc<Metrics>) -> Self {
        Jobs { store, metrics }
    }

    /// `POST /api/v1/jobs` → 201 [`JobView`]. Validates, selects the agents and stores
    /// the job with one command per agent in one transaction, which also releases the
    /// first batch the job's bounds allow to agents online now; the rest stay held. Each
    /// replica's pacer wakes on the job's announcement, wakes its agents whose command
    /// was released, and releases the rest over time.
    pub async fn create(&self, req: CreateJob) -> Result<JobView, JobError> {
        let name = req.name.trim();
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(JobError::Invalid(format!(
                "name must be 1 to {MAX_NAME} characters"
            )));
        }
        let args = match &req.args {
            None => "{}".to_string(),
            Some(raw) if raw.get().trim_start().starts_with('{') => raw.get().to_string(),
            Some(_) => return Err(JobError::Invalid("args must be a JSON object".into())),
        };
        crate::limits::check_depth("args", &args).map_err(|e| JobError::Invalid(e.to_string()))?;
        let positive = |field: &str, v: Option<i64>| match v {
            Some(n) if n < 1 => Err(JobError::Invalid(format!(
                "{field} must be at least 1 (got {n})"
            ))),
            _ => Ok(v),
        };
        let max_in_flight = positive("max_in_flight", req.max_in_flight)?.unwrap_or(UNBOUNDED);
        let rate_per_second = positive("rate_per_second", req.rate_per_second)?;
        let min_sample = positive("min_sample", req.min_sample)?.unwrap_or(DEFAULT_MIN_SAMPLE);
        if let Some(r) = req.max_failure_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(JobError::Invalid(format!(
                "max_failure_ratio must be from 0 to 1 (got {r})"
            )));
        }
        let canary = match req.canary {
            None => None,
            Some(Canary {
                count: Some(n),
                percentage: None,
            }) if n >= 1 => Some(CanarySize::Count(n)),
            Some(Canary {
                count: None,
                percentage: Some(p),
            }) if (1..=100).contains(&p) => Some(CanarySize::Percentage(p)),
            Some(_) => {
                return Err(JobError::Invalid(
                    "canary must be {\"count\": n} with n ≥ 1 or {\"percentage\": p} with p from 1 to 100".into(),
                ));
            }
        };
        let now = now_ms();
        let expires_at = match req.ttl_seconds {
            None => None,
            Some(t) if (1..=MAX_TTL_SECONDS).contains(&t) => Some(now + (t as i64) * 1000),
            Some(_) => {
                return Err(JobError::Invalid(format!(
                    "ttl_seconds must be from 1 to {MAX_TTL_SECONDS}"
                )));
            }
        };
        let resolved = req.target.resolve(name).map_err(JobError::InvalidTarget)?;
        let row = JobRow {
            id: uuid::Uuid::now_v7().to_string(),
            name: name.to_string(),
            args,
            target: serde_json::to_string(&req.target).unwrap_or_else(|_| "{}".into()),
            status: JobStatus::Running.as_str().to_string(),
            reason: None,
            targeted: 0,
            canary: 0,
            max_in_flight,
            rate_per_second,
            max_failure_ratio: req.max_failure_ratio,
            min_sample,
            expires_at,
            created_at: now,
            ended_at: None,
            cancelled: 0,
        };
        let record = match self
            .store
            .create_job(row, resolved.selection, resolved.keep, canary)
            .await?
        {
            JobCreation::Created(record) => *record,
            JobCreation::NoMatch => return Err(JobError::NoAgentsMatch),
        };
        let (job, pacing) = (&record.0, &record.1);
        self.metrics.job(JobEvent::Created);
        self.metrics
            .command(CommandStatus::Pending, job.targeted as u64);
        self.metrics
            .job_commands_released
            .inc_by(pacing.released as u64);
        tracing::info!(job = %job.id, name = %job.name, targeted = job.targeted, released = pacing.released, "job created");
        self.view(record).await
    }

    /// `GET /api/v1/jobs` → 200 [`JobPage`]; 400 `invalid_job` for a bad status,
    /// limit or cursor.
    pub async fn list(&self, query: ListJobs) -> Result<JobPage, JobError> {
        let (status, before, limit) = query.parse()?;
        let rows = self.store.list_jobs(status, before, limit).await?;
        let next = (rows.len() as i64 == limit)
            .then(|| {
                rows.last()
                    .map(|(j, _)| format!("{}.{}", j.created_at, j.id))
            })
            .flatten();
        let mut jobs = Vec::with_capacity(rows.len());
        for row in rows {
            jobs.push(self.view(row).await?);
        }
        Ok(JobPage { jobs, next })
    }

    /// `GET /api/v1/jobs/{id}` → 200 [`JobView`]; 404.
    pub async fn get(&self, id: &str) -> Result<JobView, JobError> {
        let record = self.find(id).await?;
        self.view(record).await
    }

    /// `GET /api/v1/jobs/{id}/results` → 200 [`ResultPage`]; 404; 400 `invalid_job` for
    /// a bad status or limit.
    pub async fn results(&self, id: &str, query: ListResults) -> Result<ResultPage, JobError> {
        let (status, after, limit) = query.parse()?;
        let (job, _) = self.find(id).await?;
        let rows = self.store.job_results(job.id, status, after, limit).await?;
        let next = (rows.len() as i64 == limit)
            .then(|| rows.last().map(|r| r.agent_id.clone()))
            .flatten();
        Ok(ResultPage {
            results: rows.into_iter().map(result_view).collect(),
            next,
        })
    }

    /// `POST /api/v1/jobs/{id}/pause` → 200 [`JobView`]; 404; 409 unless running.
    pub async fn pause(&self, id: &str) -> Result<JobView, JobError> {
        let outcome = self
            .store
            .pause_job(id.to_string(), "paused by an operator".into(), now_ms())
            .await?;
        self.transitioned(id, outcome, "pause", JobEvent::Paused)
            .await
    }

    /// `POST /api/v1/jobs/{id}/resume` → 200 [`JobView`]; 404; 409 unless paused.
    pub async fn resume(&self, id: &str) -> Result<JobView, JobError> {
        let outcome = self.store.resume_job(id.to_string(), now_ms()).await?;
        self.transitioned(id, outcome, "resume", JobEvent::Resumed)
            .await
    }

    /// `POST /api/v1/jobs/{id}/cancel` → 200 [`JobView`]; 404; 409 unless running or
    /// paused. Commands not delivered yet expire (counted as `cancelled`).
    pub async fn cancel(&self, id: &str) -> Result<JobView, JobError> {
        let outcome = self
            .store
            .cancel_job(id.to_string(), "cancelled by an operator".into(), now_ms())
            .await?;
        if let JobTransition::Done(record) = &outcome {
            let row = &record.0;
            self.metrics
                .command(CommandStatus::Expired, row.cancelled as u64);
        }
        self.transitioned(id, outcome, "cancel", JobEvent::Cancelled)
            .await
    }

    async fn transitioned(
        &self,
        id: &str,
        outcome: JobTransition,
        action: &'static str,
        event: JobEvent,
    ) -> Result<JobView, JobError> {
        match outcome {
            JobTransition::Done(record) => {
                self.metrics.job(event);
                tracing::info!(job = %record.0.id, action, status = %record.0.status, "job changed");
                self.view(*record).await
            }
            JobTransition::WrongState(status) => Err(JobError::WrongState {
                id: id.to_string(),
                status: status.as_str(),
                action,
            }),
            JobTransition::NotFound => Err(JobError::NotFound(id.to_string())),
        }
    }

    async fn find(&self, id: &str) -> Result<JobRecord, JobError> {
        self.store
            .get_job(id.to_string())
            .await?
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    async fn view(&self, (row, pacing): JobRecord) -> Result<JobView, JobError> {
        let counts = self.store.job_counts(row.clone()).await?;
        let durations = self.store.job_durations(row.id.clone()).await?;
        Ok(job_view(
            row,
            pacing.released,
            pacing.updated_at,
            counts,
            durations,
        ))
    }
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_string())
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"))
}

fn job_view(
    row: JobRow,
    released: i64,
    updated_at: i64,
    counts: JobCounts,
    durations: JobDurations,
) -> JobView {
    JobView {
        args: raw(&row.args),
        target: raw(&row.target),
        status: JobStatus::parse(&row.status).unwrap_or(JobStatus::Cancelled),
        targeted: row.targeted,
        canary: row.canary,
        max_in_flight: (row.max_in_flight != UNBOUNDED).then_some(row.max_in_flight),
        rate_per_second: row.rate_per_second,
        max_failure_ratio: row.max_failure_ratio,
        min_sample: row.min_sample,
        released,
        counts,
        durations,
        created_at: rfc3339(row.created_at),
        updated_at: rfc3339(updated_at),
        ended_at: row.ended_at.map(rfc3339),
        expires_at: row.expires_at.map(rfc3339),
        reason: row.reason,
        name: row.name,
        id: row.id,
    }
}

fn result_view(r: JobResultRow) -> JobResult {
    JobResult {
        duration_ms: r.completed_at.zip(r.delivered_at).map(|(c, d)| c - d),
        delivered_at: r.delivered_at.map(rfc3339),
        completed_at: r.completed_at.map(rfc3339),
        output: r.output.as_deref().map(raw),
        held: r.held && r.status == CommandStatus::Pending.as_str(),
        agent_id: r.agent_id,
        command_id: r.command_id,
        status: r.status,
    }
}

/// A number in a query string: decimal digits, or empty for "not given" (as every list
/// parameter is read).
fn empty_or_digits<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let text = Option::<String>::deserialize(d)?;
    match text.as_deref() {
        None | Some("") => Ok(None),
        Some(v) if v.bytes().all(|b| b.is_ascii_digit()) => v
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("`{v}` is too large a number"))),
        Some(v) => Err(serde::de::Error::custom(format!(
            "expected decimal digits, not `{v}`"
        ))),
    }
}

fn page_limit(limit: Option<i64>, default: i64) -> Result<i64, JobError> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(JobError::Invalid(format!(
            "limit must be from 1 to {MAX_PAGE} (got {n})"
        ))),
    }
}
