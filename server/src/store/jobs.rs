//! Fleet jobs: one command to many agents, stored as one ordinary command row per agent
//! that stays `held` until the job's pacer releases it.
//!
//! Creation is set-based: the matching agents are selected and their commands inserted
//! with `INSERT … SELECT`, in one transaction with the job's row. Pacing is decided here,
//! like rollout slots: [`Store::pace_job`] first writes the job's row, which serialises
//! the pacers of every replica on that job (a row lock on PostgreSQL, the write lock on
//! SQLite), then counts and releases in set-based statements.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use serde::Serialize;

use super::schema::{agent_labels, agents, commands, job_pacing, jobs};
use super::{Change, Store, StoreError, WriteTransaction, with_conn};

#[diesel::declare_sql_function]
extern "SQL" {
    /// SQL `lower()`: agents report os and arch in whatever case they like.
    fn lower(x: Nullable<Text>) -> Nullable<Text>;
}

/// Lifecycle: `running` ⇄ `paused` (the failure brake or an operator; `reason` says
/// which), then `completed` (no command left open) or `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Releasing commands as its pacing allows.
    Running,
    /// Releasing nothing until resumed; released commands still run.
    Paused,
    /// Stopped by an operator: its unreleased and open commands were expired.
    Cancelled,
    /// Every command has a final status.
    Completed,
}

impl JobStatus {
    pub(crate) const ALL: [JobStatus; 4] = [
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Cancelled,
        JobStatus::Completed,
    ];

    /// The stored and JSON spelling, lowercase (`running`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Completed => "completed",
        }
    }

    /// The status spelled `s`; `None` for anything else (`?status=` of `GET /api/v1/jobs`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// A job as stored; its commands are rows of `commands` with its id in `job_id`.
/// Timestamps are milliseconds since the Unix epoch.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = jobs)]
pub struct JobRow {
    /// A UUIDv7: ids sort by creation time.
    pub id: String,
    /// The command name every targeted agent receives.
    pub name: String,
    /// JSON object, stored as text.
    pub args: String,
    /// The target as given (JSON), for display.
    pub target: String,
    /// A [`JobStatus`] in lowercase.
    pub status: String,
    /// Why it is paused or ended: the brake's verdict (`9 of 10 results failed…`) or the
    /// operator's action.
    pub reason: Option<String>,
    /// Agents selected at creation, one command each.
    pub targeted: i64,
    /// Commands released first; the rest wait until each of them is final.
    pub canary: i64,
    /// Most commands released and without a final status at once; `i64::MAX` stands for
    /// unbounded.
    pub max_in_flight: i64,
    pub(crate) rate_per_second: Option<i64>,
    /// The brake pauses the job when failed ÷ (succeeded + failed) exceeds this (0 to 1);
    /// `None`: no brake.
    pub max_failure_ratio: Option<f64>,
    /// Results needed before the brake may trip.
    pub min_sample: i64,
    /// When its commands expire; `None`: never.
    pub expires_at: Option<i64>,
    /// When it was created.
    pub created_at: i64,
    pub(crate) ended_at: Option<i64>,
    /// Commands the cancel expired.
    pub cancelled: i64,
}

/// The pacers' state of a job, written only after the job's row in the same transaction.
#[derive(Debug, Clone, Default, Queryable, Selectable, Insertable)]
#[diesel(table_name = job_pacing)]
pub struct JobPacing {
    /// The job's id.
    pub job_id: String,
    /// Last release (or creation).
    pub(crate) updated_at: i64,
    /// Commands released so far.
    pub released: i64,
    /// Virtual time (ms) up to which the rate's release credit has been spent.
    pub(crate) release_clock: i64,
    /// Failed and finished results already judged before the last resume.
    pub(crate) brake_failed: i64,
    pub(crate) brake_finished: i64,
}

/// A job with its pacing state.
pub(crate) type JobRecord = (JobRow, JobPacing);

/// Which agents a job goes to, as far as SQL can tell; every present field must hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct AgentSelection {
    pub ids: Option<Vec<String>>,
    /// The agent has every one of these labels.
    pub labels: Vec<String>,
    /// Lowercase; compared with the agent's lowercased os.
    pub os: Option<String>,
    pub arch: Option<String>,
    pub online: Option<bool>,
}

/// A further per-agent test that SQL cannot make (version order, the stable hash),
/// given the agent's id and reported version.
pub(crate) type AgentPredicate = Box<dyn Fn(&str, Option<&str>) -> bool + Send>;

/// How many commands the canary releases, resolved against the targeted count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CanarySize {
    Count(i64),
    /// 1 to 100 percent of the targeted agents, at least one.
    Percentage(i64),
}

impl CanarySize {
    pub(crate) fn resolve(self, targeted: i64) -> i64 {
        match self {
            CanarySize::Count(n) => n.clamp(0, targeted),
            CanarySize::Percentage(p) => ((targeted * p + 99) / 100).clamp(1, targeted),
        }
    }
}

/// What became of creating a job.
#[derive(Debug)]
pub(crate) enum JobCreation {
    /// Stored with `targeted` commands, one per matching agent.
    Created(Box<JobRecord>),
    /// No agent matched; nothing was stored.
    NoMatch,
}

/// A job's commands by where they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct JobCounts {
    /// Commands stored, one per targeted agent.
    pub targeted: i64,
    /// Not delivered yet, held ones included.
    pub pending: i64,
    /// Of `pending`, those the pacer has not released yet.
    pub held: i64,
    /// Sent and without a result yet.
    pub delivered: i64,
    /// Final: the agent reported success.
    pub succeeded: i64,
    /// Final: the agent reported failure.
    pub failed: i64,
    /// Reached their TTL.
    pub expired: i64,
    /// Expired by the job's cancel.
    pub cancelled: i64,
}

impl JobCounts {
    /// Released and without a final status: what `max_in_flight` bounds.
    pub fn in_flight(&self) -> i64 {
        self.pending - self.held + self.delivered
    }

    /// Neither final nor expired: pending (held included) or delivered.
    pub fn open(&self) -> i64 {
        self.pending + self.delivered
    }

    /// With a result from the agent (succeeded or failed); what the brake judges.
    pub fn finished(&self) -> i64 {
        self.succeeded + self.failed
    }
}

/// Nearest-rank percentiles of the time from delivery to result, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct JobDurations {
    /// Median; `None` until a result came.
    pub p50_ms: Option<i64>,
    /// 95th percentile; `None` until a result came.
    pub p95_ms: Option<i64>,
}

/// One agent's part in a job.
#[derive(Debug, Clone, Queryable, Serialize)]
pub(crate) struct JobResultRow {
    pub agent_id: String,
    pub(crate) command_id: String,
    pub status: String,
    pub output: Option<String>,
    pub(crate) delivered_at: Option<i64>,
    pub completed_at: Option<i64>,
    #[serde(skip)]
    pub held: bool,
}

/// What a pacer's turn on one job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pace {
    /// The job is not running (paused, ended, or gone).
    Idle,
    /// Commands of these agents were released (possibly none).
    Released(Vec<String>),
    /// The failure brake tripped: the job is paused with this reason.
    Braked(String),
    /// No command is open any more.
    Completed,
}

/// What became of resume, pause or cancel.
#[derive(Debug)]
pub(crate) enum JobTransition {
    Done(Box<JobRecord>),
    /// The job is in a status the action does not apply to.
    WrongState(JobStatus),
    NotFound,
}

/// Counts a job's commands by status and held flag, in one grouped statement over the
/// `commands_job` index. A macro so that its body compiles for either backend's connection.
macro_rules! count_commands {
    ($c:expr, $job:expr) => {{
        let job: &JobRow = $job;
        let groups: Vec<(String, bool, i64)> = commands::table
            .filter(commands::job_id.eq(job.id.clone()))
            .group_by((commands::status, commands::held))
            .select((commands::status, commands::held, diesel::dsl::count_star()))
            .load($c)?;
        let mut counts = JobCounts {
            targeted: job.targeted,
            ..JobCounts::default()
        };
        for (status, held, n) in groups {
            match status.as_str() {
                "pending" => {
                    counts.pending += n;
                    if held {
                        counts.held += n;
                    }
                }
                "delivered" => counts.delivered += n,
                "succeeded" => counts.succeeded += n,
                "failed" => counts.failed += n,
                "expired" => counts.expired += n,
                _ => {}
            }
        }
        counts.cancelled = job.cancelled.min(counts.expired);
        counts.expired -= counts.cancelled;
        Ok::<JobCounts, StoreError>(counts)
    }};
}

/// Commands of a job released and without a final status (`JobCounts::in_flight`): two
/// short ranges of the `commands_job` index (held, status), however many commands the
/// job has. Each status is its own equality: PostgreSQL would otherwise scan every
/// released command of the job and filter on the status.
macro_rules! count_in_flight {
    ($c:expr, $job_id:expr) => {{
        let mut n = 0i64;
        for status in ["pending", "delivered"] {
            n += commands::table
                .filter(commands::job_id.eq(String::from($job_id)))
                .filter(commands::held.eq(false))
                .filter(commands::status.eq(status))
                .count()
                .get_result::<i64>($c)?;
        }
        Ok::<i64, StoreError>(n)
    }};
}

/// Whether any command of a job is still open (released and pending or delivered, or
/// held): index probes that stop at the first hit.
macro_rules! any_open {
    ($c:expr, $job_id:expr) => {{
        let mut any = false;
        for (held, status) in [(false, "delivered"), (false, "pending"), (true, "pending")] {
            any = commands::table
                .filter(commands::job_id.eq(String::from($job_id)))
                .filter(commands::held.eq(held))
                .filter(commands::status.eq(status))
                .select(commands::id)
                .first::<String>($c)
                .optional()?
                .is_some();
            if any {
                break;
            }
        }
        Ok::<bool, StoreError>(any)
    }};
}

/// Applies an [`AgentSelection`] to a boxed query on `agents`.
macro_rules! select_agents {
    ($q:expr, $sel:expr) => {{
        let sel: &AgentSelection = $sel;
        let mut q = $q;
        if let Some(ids) = &sel.ids {
            q = q.filter(agents::id.eq_any(ids.clone()));
        }
        for label in &sel.labels {
            let labelled = agent_labels::table
                .filter(agent_labels::label.eq(label.clone()))
                .select(agent_labels::agent_id);
            q = q.filter(agents::id.eq_any(labelled));
        }
        if let Some(os) = &sel.os {
            q = q.filter(lower(agents::os).eq(os.clone()));
        }
        if let Some(arch) = &sel.arch {
            q = q.filter(lower(agents::arch).eq(arch.clone()));
        }
        if let Some(online) = sel.online {
            q = q.filter(agents::online.eq(online));
        }
        q
    }};
}

/// Held commands of a job whose agents are connected to `pod`: what its pacer may
/// release. The `commands_job` index yields them in id (client_id) order, so a turn that
/// takes the first N reads about N of them, not every held one.
macro_rules! local_candidates {
    ($job_id:expr, $pod:expr) => {
        commands::table
            .inner_join(agents::table)
            .filter(commands::job_id.eq(String::from($job_id)))
            .filter(commands::held.eq(true))
            .filter(commands::status.eq("pending"))
            .filter(agents::online.eq(true))
            .filter(agents::pod.eq(String::from($pod)))
    };
}

/// Ids per `INSERT … SELECT … WHERE id IN (…)`: below SQLite's 32,766 bound variables.
const INSERT_CHUNK: usize = 10_000;

impl Store {
    /// Stores `job` and one command per agent matching `selection` (and `keep`, if
    /// given), in one transaction; the job's `targeted` and `canary` are set from the
    /// count. The transaction also takes the job's first pacer turn: the commands the
    /// job may release at once ([`crate::jobs::pacing::budget`], for agents connected
    /// anywhere, in client_id order) are stored released, the rest held. So a job that
    /// nothing paces writes each command once instead of inserting it held and
    /// rewriting it (with every index entry) to release it; each replica's pacer wakes
    /// its own agents ([`Store::released_here`]). Announces [`Change::Job`].
    pub(crate) async fn create_job(
        &self,
        mut job: JobRow,
        selection: AgentSelection,
        keep: Option<AgentPredicate>,
        canary: Option<CanarySize>,
    ) -> Result<JobCreation, StoreError> {
        let created = self
            .run(move |pool| {
                with_conn!(pool, c => c.write_transaction::<JobCreation, StoreError, _>(|c| {
                    // One read decides who is targeted and who is released; the inserts
                    // then name them, so an agent connecting meanwhile cannot fall
                    // between the two sets.
                    let q = select_agents!(agents::table.into_boxed(), &selection);
                    let candidates: Vec<(String, Option<String>, bool)> = q
                        .order(agents::id.asc())
                        .select((agents::id, agents::version, agents::online))
                        .load(c)?;
                    let chosen: Vec<(String, bool)> = candidates
                        .into_iter()
                        .filter(|(id, version, _)| keep.as_ref().is_none_or(|keep| keep(id, version.as_deref())))
                        .map(|(id, _, online)| (id, online))
                        .collect();
                    if chosen.is_empty() {
                        return Ok(JobCreation::NoMatch);
                    }
                    job.canary = canary.map_or(0, |size| size.resolve(chosen.len() as i64));
                    let now = job.created_at;
                    let mut pacing = JobPacing {
                        job_id: job.id.clone(),
                        updated_at: now,
                        ..JobPacing::default()
                    };
                    let budget = crate::jobs::pacing::budget(&job, &pacing, 0, now);
                    let (mut released, mut held) = (Vec::new(), Vec::new());
                    for (id, online) in chosen {
                        if online && (released.len() as i64) < budget {
                            released.push(id);
                        } else {
                            held.push(id);
                        }
                    }
                    let columns = (
                        commands::id,
                        commands::agent_id,
                        commands::name,
                        commands::args,
                        commands::status,
                        commands::created_at,
                        commands::expires_at,
                        commands::job_id,
                        commands::held,
                    );
                    // The command id is `<job id>.<client_id>`: unique, and it sorts a
                    // job's commands by agent, which the results' keyset pages use.
                    let prefix = format!("{}.", job.id);
                    let row = |held: bool| (
                        prefix.clone().into_sql::<Text>().concat(agents::id),
                        agents::id,
                        job.name.clone().into_sql::<Text>(),
                        job.args.clone().into_sql::<Text>(),
                        "pending".into_sql::<Text>(),
                        job.created_at.into_sql::<BigInt>(),
                        job.expires_at.into_sql::<Nullable<BigInt>>(),
                        Some(job.id.clone()).into_sql::<Nullable<Text>>(),
                        held.into_sql::<Bool>(),
                    );
                    let mut inserted = [0i64; 2];
                    for (ids, is_held) in [(&released, false), (&held, true)] {
                        for chunk in ids.chunks(INSERT_CHUNK) {
                            inserted[usize::from(is_held)] += diesel::insert_into(commands::table)
                                .values(agents::table.filter(agents::id.eq_any(chunk)).select(row(is_held)))
                                .into_columns(columns)
                                .execute(c)? as i64;
                        }
                    }
                    // Counted as stored: an agent deleted since the read has no command.
                    let [n_released, n_held] = inserted;
                    job.targeted = n_released + n_held;
                    if job.targeted == 0 {
                        return Ok(JobCreation::NoMatch);
                    }
                    if n_released > 0 {
                        pacing.release_clock = crate::jobs::pacing::advance_clock(&job, &pacing, now, n_released);
                        pacing.released = n_released;
                    }
                    diesel::insert_into(jobs::table).values(&job).execute(c)?;
                    diesel::insert_into(job_pacing::table).values(&pacing).execute(c)?;
                    Ok(JobCreation::Created(Box::new((job, pacing))))
                }))
            })
            .await?;
        if let JobCreation::Created(record) = &created {
            let row = &record.0;
            let id = row.id.clone();
            self.announce(|| Change::Job { id });
        }
        Ok(created)
    }

    /// Agents connected to `pod` whose command in the job is released and not delivered
    /// yet: those the job's creation released, which this replica's pacer wakes when it
    /// first sees the job (a pacer's own releases wake their agents at once).
    pub(crate) async fn released_here(
        &self,
        job_id: String,
        pod: String,
    ) -> Result<Vec<String>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(commands::table
                .inner_join(agents::table)
                .filter(commands::job_id.eq(&job_id))
                .filter(commands::held.eq(false))
                .filter(commands::status.eq("pending"))
                .filter(agents::online.eq(true))
                .filter(agents::pod.eq(&pod))
                .select(commands::agent_id)
                .load(c)?))
        })
        .await
    }

    /// The job and its pacing state; `None` for an unknown id.
    pub async fn get_job(&self, id: String) -> Result<Option<JobRecord>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(jobs::table
                .inner_join(job_pacing::table)
                .filter(jobs::id.eq(&id))
                .select((JobRow::as_select(), JobPacing::as_select()))
                .first(c)
                .optional()?))
        })
        .await
    }

    /// Newest first; `before` is the `(created_at, id)` of the last job of the previous
    /// page.
    pub(crate) async fn list_jobs(
        &self,
        status: Option<JobStatus>,
        before: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<JobRecord>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let mut q = jobs::table.inner_join(job_pacing::table).into_boxed();
                if let Some(status) = status {
                    q = q.filter(jobs::status.eq(status.as_str()));
                }
                if let Some((at, id)) = &before {
                    q = q.filter(
                        jobs::created_at
                            .lt(*at)
                            .or(jobs::created_at.eq(*at).and(jobs::id.lt(id.clone()))),
                    );
                }
                Ok(q.order((jobs::created_at.desc(), jobs::id.desc()))
                    .limit(limit)
                    .select((JobRow::as_select(), JobPacing::as_select()))
                    .load(c)?)
            })
        })
        .await
    }

    /// Ids of running jobs, oldest first: what the pacers work on.
    pub(crate) async fn running_jobs(&self) -> Result<Vec<String>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(jobs::table
                .filter(jobs::status.eq(JobStatus::Running.as_str()))
                .order((jobs::created_at.asc(), jobs::id.asc()))
                .select(jobs::id)
                .load(c)?))
        })
        .await
    }

    /// The job's commands counted by status, in one grouped statement over the
    /// `commands_job` index.
    pub async fn job_counts(&self, job: JobRow) -> Result<JobCounts, StoreError> {
        self.run(move |pool| with_conn!(pool, c => count_commands!(c, &job)))
            .await
    }

    /// Nearest-rank p50 and p95 of delivery-to-result times of the job's results.
    pub(crate) async fn job_durations(&self, job_id: String) -> Result<JobDurations, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let finished = || commands::table
                    .filter(commands::job_id.eq(job_id.clone()))
                    .filter(commands::status.eq_any(["succeeded", "failed"]))
                    .filter(commands::delivered_at.is_not_null())
                    .filter(commands::completed_at.is_not_null());
                let n: i64 = finished().count().get_result(c)?;
                let mut rank = |p: i64| -> Result<Option<i64>, StoreError> {
                    if n == 0 {
                        return Ok(None);
                    }
                    // Nearest rank: the ceil(p/100 · n)-th smallest, counted from 1.
                    let offset = ((p * n + 99) / 100 - 1).clamp(0, n - 1);
                    let duration = commands::completed_at.assume_not_null()
                        - commands::delivered_at.assume_not_null();
                    Ok(finished()
                        .select(duration)
                        .order(duration.asc())
                        .offset(offset)
                        .first::<i64>(c)
                        .optional()?)
                };
                Ok(JobDurations { p50_ms: rank(50)?, p95_ms: rank(95)? })
            })
        })
        .await
    }

    /// The job's per-agent commands in client_id order; `after` is the last client_id of
    /// the previous page.
    pub(crate) async fn job_results(
        &self,
        job_id: String,
        status: Option<String>,
        after: Option<String>,
        limit: i64,
    ) -> Result<Vec<JobResultRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                // Command ids are `<job id>.<client_id>`, so the primary key orders them
                // by agent and a page starts with an index seek.
                let mut q = commands::table
                    .filter(commands::job_id.eq(job_id.clone()))
                    .into_boxed();
                if let Some(after) = &after {
                    q = q.filter(commands::id.gt(format!("{job_id}.{after}")));
                }
                if let Some(status) = &status {
                    q = q.filter(commands::status.eq(status.clone()));
                }
                Ok(q.order(commands::id.asc())
                    .limit(limit)
                    .select((
                        commands::agent_id,
                        commands::id,
                        commands::status,
                        commands::output,
                        commands::delivered_at,
                        commands::completed_at,
                        commands::held,
                    ))
                    .load(c)?)
            })
        })
        .await
    }

    /// One pacer turn on a running job, for agents connected to `pod`: trips the failure
    /// brake, completes the job, or releases up to `max_batch` held commands within the
    /// job's bounds (in flight, rate, canary). Replicas may call this at the same time
    /// for the same job: the first statement writes the job's row, so turns take place
    /// one after the other and each sees the others' releases.
    ///
    /// A turn reads only what its decisions need: the brake's counts when the job has a
    /// brake, the commands in flight when it has an in-flight bound or a canary, and
    /// otherwise index probes (is anything held here, is anything open), so the turns
    /// that every burst of results prompts stay cheap while a large job runs.
    pub(crate) async fn pace_job(
        &self,
        job_id: String,
        pod: String,
        now: i64,
        max_batch: i64,
    ) -> Result<Pace, StoreError> {
        let announced = job_id.clone();
        let pace = self
            .run(move |pool| {
                with_conn!(pool, c => {
                    // A look without the lock first: most turns find nothing to do here,
                    // and skipping the write keeps them from queueing behind each other
                    // (and, on SQLite, from contending with result writes).
                    let job: Option<JobRow> = jobs::table
                        .filter(jobs::id.eq(&job_id).and(jobs::status.eq(JobStatus::Running.as_str())))
                        .select(JobRow::as_select())
                        .first(c)
                        .optional()?;
                    let Some(job) = job else { return Ok(Pace::Idle) };
                    let pacing: JobPacing = job_pacing::table.find(&job_id).select(JobPacing::as_select()).first(c)?;
                    let held_here = local_candidates!(&job_id, &pod).select(commands::id).first::<String>(c).optional()?.is_some();
                    let must_act = if job.max_failure_ratio.is_some() {
                        let counts = count_commands!(c, &job)?;
                        job_verdict(&job, &pacing, &counts).is_some()
                            || counts.open() == 0
                            || (held_here && crate::jobs::pacing::budget(&job, &pacing, counts.in_flight(), now) > 0)
                    } else if held_here {
                        let in_flight = if crate::jobs::pacing::counts_in_flight(&job) { count_in_flight!(c, &job_id)? } else { 0 };
                        crate::jobs::pacing::budget(&job, &pacing, in_flight, now) > 0
                    } else {
                        // Nothing to release here: act only to complete the job.
                        !any_open!(c, &job_id)?
                    };
                    if !must_act {
                        return Ok(Pace::Released(Vec::new()));
                    }
                    c.write_transaction::<Pace, StoreError, _>(|c| {
                    // Writing the job's row first serialises the turns of every replica.
                    let job: Option<JobRow> = diesel::update(jobs::table)
                        .filter(jobs::id.eq(&job_id).and(jobs::status.eq(JobStatus::Running.as_str())))
                        .set(jobs::status.eq(JobStatus::Running.as_str()))
                        .returning(JobRow::as_returning())
                        .get_result(c)
                        .optional()?;
                    let Some(job) = job else { return Ok(Pace::Idle) };
                    let pacing: JobPacing = job_pacing::table.find(&job_id).select(JobPacing::as_select()).first(c)?;
                    let in_flight = if job.max_failure_ratio.is_some() {
                        let counts = count_commands!(c, &job)?;
                        if let Some(reason) = job_verdict(&job, &pacing, &counts) {
                            diesel::update(jobs::table.find(&job_id))
                                .set((jobs::status.eq(JobStatus::Paused.as_str()), jobs::reason.eq(&reason)))
                                .execute(c)?;
                            return Ok(Pace::Braked(reason));
                        }
                        (counts.open() > 0).then_some(counts.in_flight())
                    } else if any_open!(c, &job_id)? {
                        Some(if crate::jobs::pacing::counts_in_flight(&job) { count_in_flight!(c, &job_id)? } else { 0 })
                    } else {
                        None
                    };
                    let Some(in_flight) = in_flight else {
                        diesel::update(jobs::table.find(&job_id))
                            .set((jobs::status.eq(JobStatus::Completed.as_str()), jobs::ended_at.eq(now)))
                            .execute(c)?;
                        return Ok(Pace::Completed);
                    };
                    let budget = crate::jobs::pacing::budget(&job, &pacing, in_flight, now).min(max_batch);
                    if budget <= 0 {
                        return Ok(Pace::Released(Vec::new()));
                    }
                    // Two set-based statements: the held commands of agents connected
                    // to this pod, then their release (re-checked, so a command that
                    // expired or was cancelled meanwhile stays as it is).
                    let candidates: Vec<String> = local_candidates!(&job_id, &pod)
                        .order(commands::id.asc())
                        .limit(budget)
                        .select(commands::id)
                        .load(c)?;
                    if candidates.is_empty() {
                        return Ok(Pace::Released(Vec::new()));
                    }
                    let released: Vec<String> = diesel::update(commands::table)
                        .filter(commands::id.eq_any(&candidates))
                        .filter(commands::held.eq(true))
                        .filter(commands::status.eq("pending"))
                        .set(commands::held.eq(false))
                        .returning(commands::agent_id)
                        .get_results(c)?;
                    if !released.is_empty() {
                        let n = released.len() as i64;
                        diesel::update(job_pacing::table.find(&job_id))
                            .set((
                                job_pacing::released.eq(job_pacing::released + n),
                                job_pacing::release_clock.eq(crate::jobs::pacing::advance_clock(&job, &pacing, now, n)),
                                job_pacing::updated_at.eq(now),
                            ))
                            .execute(c)?;
                    }
                    Ok(Pace::Released(released))
                })
                })
            })
            .await?;
        match &pace {
            Pace::Idle => {}
            Pace::Released(ids) if ids.is_empty() => {}
            Pace::Released(_) => self.announce(|| Change::Commands),
            Pace::Braked(_) | Pace::Completed => self.announce(|| Change::Job { id: announced }),
        }
        Ok(pace)
    }

    /// Pauses a running job (an operator's pause; the brake pauses in [`Store::pace_job`]).
    /// Commands already released may still be delivered; nothing more is released.
    pub(crate) async fn pause_job(
        &self,
        id: String,
        reason: String,
        now: i64,
    ) -> Result<JobTransition, StoreError> {
        let announced = id.clone();
        let outcome = self
            .run(move |pool| {
                with_conn!(pool, c => c.write_transaction::<JobTransition, StoreError, _>(|c| {
                    let row: Option<JobRow> = diesel::update(jobs::table)
                        .filter(jobs::id.eq(&id).and(jobs::status.eq(JobStatus::Running.as_str())))
                        .set((
                            jobs::status.eq(JobStatus::Paused.as_str()),
                            jobs::reason.eq(Some(reason)),
                        ))
                        .returning(JobRow::as_returning())
                        .get_result(c)
                        .optional()?;
                    if let Some(row) = row {
                        let pacing = diesel::update(job_pacing::table.find(&id))
                            .set(job_pacing::updated_at.eq(now))
                            .returning(JobPacing::as_returning())
                            .get_result(c)?;
                        return Ok(JobTransition::Done(Box::new((row, pacing))));
                    }
                    let job: Option<JobRow> = jobs::table.find(&id).select(JobRow::as_select()).first(c).optional()?;
                    Ok(match job {
                        Some(job) => JobTransition::WrongState(status_of(&job)),
                        None => JobTransition::NotFound,
                    })
                }))
            })
            .await?;
        if let JobTransition::Done(_) = outcome {
            self.announce(|| Change::Job { id: announced });
        }
        Ok(outcome)
    }

    /// Runs a paused job again. The brake starts a new sample: results judged before the
    /// resume do not count again.
    pub(crate) async fn resume_job(
        &self,
        id: String,
        now: i64,
    ) -> Result<JobTransition, StoreError> {
        let announced = id.clone();
        let outcome = self
            .run(move |pool| {
                with_conn!(pool, c => c.write_transaction::<JobTransition, StoreError, _>(|c| {
                    // The job's row is written first, as in a pacer turn: the statements
                    // after it see every turn before it, and none runs meanwhile.
                    let row: Option<JobRow> = diesel::update(jobs::table)
                        .filter(jobs::id.eq(&id).and(jobs::status.eq(JobStatus::Paused.as_str())))
                        .set((
                            jobs::status.eq(JobStatus::Running.as_str()),
                            jobs::reason.eq(None::<String>),
                        ))
                        .returning(JobRow::as_returning())
                        .get_result(c)
                        .optional()?;
                    let Some(row) = row else {
                        let job: Option<JobRow> = jobs::table.find(&id).select(JobRow::as_select()).first(c).optional()?;
                        return Ok(match job {
                            Some(job) => JobTransition::WrongState(status_of(&job)),
                            None => JobTransition::NotFound,
                        });
                    };
                    let counts = count_commands!(c, &row)?;
                    let pacing = diesel::update(job_pacing::table.find(&id))
                        .set((
                            job_pacing::updated_at.eq(now),
                            job_pacing::brake_failed.eq(counts.failed),
                            job_pacing::brake_finished.eq(counts.finished()),
                        ))
                        .returning(JobPacing::as_returning())
                        .get_result(c)?;
                    Ok(JobTransition::Done(Box::new((row, pacing))))
                }))
            })
            .await?;
        if let JobTransition::Done(_) = outcome {
            self.announce(|| Change::Job { id: announced });
        }
        Ok(outcome)
    }

    /// Ends a running or paused job: every command not delivered yet (held or released)
    /// expires now; delivered ones may still report.
    pub(crate) async fn cancel_job(
        &self,
        id: String,
        reason: String,
        now: i64,
    ) -> Result<JobTransition, StoreError> {
        let announced = id.clone();
        let outcome = self
            .run(move |pool| {
                with_conn!(pool, c => c.write_transaction::<JobTransition, StoreError, _>(|c| {
                    let ended: Option<String> = diesel::update(jobs::table)
                        .filter(jobs::id.eq(&id))
                        .filter(jobs::status.eq_any([JobStatus::Running.as_str(), JobStatus::Paused.as_str()]))
                        .set((
                            jobs::status.eq(JobStatus::Cancelled.as_str()),
                            jobs::reason.eq(Some(reason)),
                            jobs::ended_at.eq(now),
                        ))
                        .returning(jobs::id)
                        .get_result(c)
                        .optional()?;
                    if ended.is_none() {
                        let job: Option<JobRow> = jobs::table.find(&id).select(JobRow::as_select()).first(c).optional()?;
                        return Ok(match job {
                            Some(job) => JobTransition::WrongState(status_of(&job)),
                            None => JobTransition::NotFound,
                        });
                    }
                    let expired = diesel::update(commands::table)
                        .filter(commands::job_id.eq(id.clone()))
                        .filter(commands::status.eq("pending"))
                        .set((commands::status.eq("expired"), commands::completed_at.eq(now)))
                        .execute(c)? as i64;
                    let row = diesel::update(jobs::table.find(&id))
                        .set(jobs::cancelled.eq(expired))
                        .returning(JobRow::as_returning())
                        .get_result(c)?;
                    let pacing = diesel::update(job_pacing::table.find(&id))
                        .set(job_pacing::updated_at.eq(now))
                        .returning(JobPacing::as_returning())
                        .get_result(c)?;
                    Ok(JobTransition::Done(Box::new((row, pacing))))
                }))
            })
            .await?;
        if let JobTransition::Done(_) = outcome {
            self.announce(|| Change::Job { id: announced });
            self.announce(|| Change::Commands);
        }
        Ok(outcome)
    }
}

fn status_of(job: &JobRow) -> JobStatus {
    JobStatus::parse(&job.status).unwrap_or(JobStatus::Cancelled)
}

/// The failure brake (`crate::brake`) on a job's results: expired commands are not
/// results and judge nothing.
fn job_verdict(job: &JobRow, pacing: &JobPacing, counts: &JobCounts) -> Option<String> {
    crate::brake::verdict(
        crate::brake::Brake {
            max_failure_ratio: job.max_failure_ratio,
            min_sample: job.min_sample,
        },
        crate::brake::Tally {
            failed: counts.failed,
            finished: counts.finished(),
        },
        crate::brake::Tally {
            failed: pacing.brake_failed,
            finished: pacing.brake_finished,
        },
        "results",
    )
}
