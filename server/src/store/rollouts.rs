//! Rollouts: the desired version per os/arch, the agents each one is updating, and the
//! labels agents report (a rollout may target one).
//!
//! Pacing is decided here, in one transaction per claim, so that replicas agree on it:
//! the claim first writes the rollout's row, which serialises claims of that rollout (a
//! row lock on PostgreSQL, the write lock on SQLite), then counts the agents updating.
//! The failure brake (`crate::brake`) is judged the same way, on every claim of a new
//! slot and on every failure or timeout recorded: failed and timed-out updates count
//! against it, updated ones for it.

use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};

use super::schema::{agent_labels, agents, binaries, rollout_agents, rollout_brakes, rollouts};
use super::{Change, Store, StoreError, WriteTransaction, with_conn};

/// `agent_labels.source` of the labels an enroll secret gave: hellos keep them.
pub(crate) const LABEL_FROM_ENROLLMENT: &str = "enroll";

#[diesel::declare_sql_function]
extern "SQL" {
    /// SQL `lower()`: agents report os and arch in whatever case they like.
    fn lower(
        x: diesel::sql_types::Nullable<diesel::sql_types::Text>,
    ) -> diesel::sql_types::Nullable<diesel::sql_types::Text>;
}

/// Lifecycle: `active` ⇄ `paused` (the failure brake or an operator; `reason` says why)
/// until a newer rollout for the same os/arch supersedes it or an operator cancels it.
/// A paused rollout offers its build to nobody, but stays its platform's rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RolloutStatus {
    Active,
    Paused,
    Superseded,
    Cancelled,
}

impl RolloutStatus {
    /// The statuses of a platform's current rollout (at most one per os/arch).
    pub(crate) const CURRENT: [&'static str; 2] = ["active", "paused"];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RolloutStatus::Active => "active",
            RolloutStatus::Paused => "paused",
            RolloutStatus::Superseded => "superseded",
            RolloutStatus::Cancelled => "cancelled",
        }
    }
}

/// One agent's update within a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpdateStatus {
    /// Sent an `update`; holds one of the rollout's slots.
    Updating,
    /// Came back reporting the target version (or newer).
    Updated,
    /// Did not come back with the new version within ROLLOUT_UPDATE_TIMEOUT.
    TimedOut,
    /// The agent reported the update failed (`update_result`): refused, failed its
    /// check, or rolled back. `error` says why.
    Failed,
}

impl UpdateStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            UpdateStatus::Updating => "updating",
            UpdateStatus::Updated => "updated",
            UpdateStatus::TimedOut => "timed_out",
            UpdateStatus::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = rollouts)]
pub(crate) struct RolloutRow {
    pub id: String,
    pub binary_id: String,
    pub os: String,
    pub arch: String,
    pub version: String,
    pub label: Option<String>,
    /// 1 to 100: the share of matching agents this rollout updates.
    pub percentage: i32,
    pub max_concurrent: i32,
    pub status: String,
    pub created_at: i64,
    pub(crate) ended_at: Option<i64>,
    /// A rollback: agents on a newer version are offered this one too.
    pub allow_downgrade: bool,
    /// Why it is paused.
    pub reason: Option<String>,
}

/// A rollout's failure brake, for rollouts started with one.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable)]
#[diesel(table_name = rollout_brakes)]
pub(crate) struct RolloutBrake {
    pub rollout_id: String,
    /// Pause when (failed + timed out) ÷ finished updates exceeds this (0 to 1).
    pub max_failure_ratio: f64,
    /// Finished updates needed (since the last resume) before the brake may trip.
    pub min_sample: i64,
    /// Outcomes the brake judged before the last resume.
    pub judged_failed: i64,
    pub judged_finished: i64,
}

impl RolloutBrake {
    /// The reason to pause, given the rollout's counts.
    fn verdict(&self, counts: &UpdateCounts) -> Option<String> {
        crate::brake::verdict(
            crate::brake::Brake {
                max_failure_ratio: Some(self.max_failure_ratio),
                min_sample: self.min_sample,
            },
            counts.tally(),
            crate::brake::Tally {
                failed: self.judged_failed,
                finished: self.judged_finished,
            },
            "updates",
        )
    }
}

impl RolloutRow {
    /// Whether an agent on `current` is to be offered this rollout's version: an older
    /// one, or for a rollback any other one.
    pub(crate) fn wants(&self, current: &str) -> bool {
        match agent_protocol::version::compare(current, &self.version) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Greater => self.allow_downgrade,
            std::cmp::Ordering::Equal => false,
        }
    }
}

/// A platform's current rollout (active or paused) with what an `update` message needs
/// from its binary.
#[derive(Debug, Clone)]
pub(crate) struct CurrentRollout {
    pub rollout: RolloutRow,
    pub name: String,
    pub sha256: String,
    pub size_bytes: i64,
}

/// What became of starting a rollout.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RolloutStart {
    /// Active now; the rollout it replaced for the same os/arch, if any.
    Started { superseded: Option<String> },
    /// The binary was deleted meanwhile.
    BinaryGone,
    /// Another rollout for the same os/arch was started at the same moment.
    Raced,
}

/// What became of an attempt to send an agent the update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Send the update on this connection (a new slot, or again on a new connection).
    Offer,
    /// Already sent on this connection.
    AlreadySent,
    /// Every slot is taken; the agent waits its turn.
    Full,
    /// The agent was updated, failed or timed out in this rollout; it is not asked again.
    Finished,
    /// The rollout is not active (paused, or ended).
    Inactive,
    /// The failure brake tripped on this claim: the rollout is paused with this reason.
    Braked(String),
}

/// A rollout's agents by update status.
#[derive(Debug, Clone, Default)]
pub(crate) struct UpdateCounts {
    pub updating: i64,
    pub updated: i64,
    pub timed_out: i64,
    pub failed: i64,
    /// Some of the agents updating now (at most 100), for display.
    pub updating_agents: Vec<String>,
    /// The latest failures reported, newest first (at most [`RECENT_FAILURES`]).
    pub recent_failures: Vec<UpdateFailure>,
}

impl UpdateCounts {
    /// What the brake judges: failed and timed-out updates against all finished ones.
    fn tally(&self) -> crate::brake::Tally {
        crate::brake::Tally {
            failed: self.failed + self.timed_out,
            finished: self.updated + self.failed + self.timed_out,
        }
    }
}

/// Failures listed with a rollout's progress.
pub(crate) const RECENT_FAILURES: i64 = 10;

/// One agent's failed update, as it reported it.
#[derive(Debug, Clone, Queryable, serde::Serialize)]
pub(crate) struct UpdateFailure {
    pub agent_id: String,
    pub from_version: Option<String>,
    pub error: Option<String>,
    /// Milliseconds since the Unix epoch.
    #[serde(skip)]
    pub finished_at: Option<i64>,
}

/// What became of an agent's report that its update failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FailureRecord {
    /// Recorded; the brake paused the rollout with this reason, if it tripped.
    Recorded { braked: Option<String> },
    /// The agent was not updating in this rollout (never offered, already finished, or
    /// no such rollout): nothing changed.
    Ignored,
}

/// What became of an operator's pause or resume.
#[derive(Debug)]
pub(crate) enum RolloutTransition {
    Done(Box<RolloutRow>),
    /// The rollout is in a status the action does not apply to.
    WrongState(String),
    NotFound,
}

/// Updates that timed out in one round, and the rollouts whose brake they tripped.
#[derive(Debug, Default)]
pub(crate) struct Expiry {
    pub timed_out: usize,
    /// (rollout id, reason).
    pub braked: Vec<(String, String)>,
}

/// Counts a rollout's agents by update status in one grouped statement. A macro so that
/// its body compiles for either backend's connection.
macro_rules! count_updates {
    ($c:expr, $rollout_id:expr) => {{
        let by_status: Vec<(String, i64)> = rollout_agents::table
            .filter(rollout_agents::rollout_id.eq($rollout_id))
            .group_by(rollout_agents::status)
            .select((rollout_agents::status, diesel::dsl::count_star()))
            .load($c)?;
        let mut counts = UpdateCounts::default();
        for (status, n) in by_status {
            match status.as_str() {
                "updating" => counts.updating = n,
                "updated" => counts.updated = n,
                "timed_out" => counts.timed_out = n,
                "failed" => counts.failed = n,
                _ => {}
            }
        }
        Ok::<UpdateCounts, DieselError>(counts)
    }};
}

/// Judges the brake (if it has one) on an active rollout whose row this transaction
/// wrote, and pauses it when it trips. Evaluates to the reason.
macro_rules! judge {
    ($c:expr, $row:expr, $counts:expr) => {{
        let row: &RolloutRow = $row;
        let brake: Option<RolloutBrake> = if row.status == RolloutStatus::Active.as_str() {
            rollout_brakes::table
                .find(&row.id)
                .select(RolloutBrake::as_select())
                .first($c)
                .optional()?
        } else {
            None
        };
        match brake.and_then(|b| b.verdict($counts)) {
            Some(reason) => {
                diesel::update(rollouts::table.find(&row.id))
                    .set((
                        rollouts::status.eq(RolloutStatus::Paused.as_str()),
                        rollouts::reason.eq(&reason),
                    ))
                    .execute($c)?;
                Some(reason)
            }
            _ => None,
        }
    }};
}

impl Store {
    /// Makes `row` the active rollout of its os/arch, superseding the previous one (active
    /// or paused).
    pub(crate) async fn start_rollout(
        &self,
        row: RolloutRow,
        brake: Option<RolloutBrake>,
    ) -> Result<RolloutStart, StoreError> {
        let outcome = self
            .run(move |pool| {
                with_conn!(pool, c => {
                    let result = c.write_transaction::<Option<String>, DieselError, _>(|c| {
                        let superseded: Vec<String> = diesel::update(rollouts::table)
                            .filter(rollouts::os.eq(&row.os))
                            .filter(rollouts::arch.eq(&row.arch))
                            .filter(rollouts::status.eq_any(RolloutStatus::CURRENT))
                            .set((
                                rollouts::status.eq(RolloutStatus::Superseded.as_str()),
                                rollouts::ended_at.eq(row.created_at),
                            ))
                            .returning(rollouts::id)
                            .get_results(c)?;
                        diesel::insert_into(rollouts::table).values(&row).execute(c)?;
                        if let Some(brake) = &brake {
                            diesel::insert_into(rollout_brakes::table).values(brake).execute(c)?;
                        }
                        Ok(superseded.into_iter().next())
                    });
                    match result {
                        Ok(superseded) => Ok(RolloutStart::Started { superseded }),
                        Err(DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _)) => {
                            Ok(RolloutStart::BinaryGone)
                        }
                        Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {
                            Ok(RolloutStart::Raced)
                        }
                        Err(e) => Err(e.into()),
                    }
                })
            })
            .await?;
        if let RolloutStart::Started { .. } = outcome {
            self.announce(|| Change::Rollouts);
        }
        Ok(outcome)
    }

    /// Every current rollout (active or paused), with its binary's name, checksum and size.
    pub(crate) async fn current_rollouts(&self) -> Result<Vec<CurrentRollout>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let rows = rollouts::table
                    .inner_join(binaries::table)
                    .filter(rollouts::status.eq_any(RolloutStatus::CURRENT))
                    .order(rollouts::created_at.asc())
                    .select((
                        RolloutRow::as_select(),
                        binaries::name,
                        binaries::sha256,
                        binaries::size_bytes,
                    ))
                    .load::<(RolloutRow, String, String, i64)>(c)?;
                Ok(rows
                    .into_iter()
                    .map(|(rollout, name, sha256, size_bytes)| CurrentRollout { rollout, name, sha256, size_bytes })
                    .collect())
            })
        })
        .await
    }

    /// Newest first.
    pub(crate) async fn list_rollouts(&self, limit: i64) -> Result<Vec<RolloutRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(rollouts::table
                .order((rollouts::created_at.desc(), rollouts::id.desc()))
                .limit(limit)
                .select(RolloutRow::as_select())
                .load(c)?))
        })
        .await
    }

    /// The rollout's failure brake, if it was started with one.
    pub(crate) async fn rollout_brake(
        &self,
        id: String,
    ) -> Result<Option<RolloutBrake>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(rollout_brakes::table
                .find(&id)
                .select(RolloutBrake::as_select())
                .first(c)
                .optional()?))
        })
        .await
    }

    /// The newest rollout of a platform, whatever its status: what a new rollout of an
    /// older version would roll back from.
    pub(crate) async fn latest_rollout(
        &self,
        os: String,
        arch: String,
    ) -> Result<Option<RolloutRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(rollouts::table
                .filter(rollouts::os.eq(&os).and(rollouts::arch.eq(&arch)))
                .order((rollouts::created_at.desc(), rollouts::id.desc()))
                .select(RolloutRow::as_select())
                .first(c)
                .optional()?))
        })
        .await
    }

    pub(crate) async fn get_rollout(&self, id: String) -> Result<Option<RolloutRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(rollouts::table
                .find(&id)
                .select(RolloutRow::as_select())
                .first(c)
                .optional()?))
        })
        .await
    }

    /// Ends an active or paused rollout. Returns the row, or `None` if there is no such
    /// rollout.
    pub(crate) async fn cancel_rollout(
        &self,
        id: String,
        now: i64,
    ) -> Result<Option<RolloutRow>, StoreError> {
        let row = self
            .run(move |pool| {
                with_conn!(pool, c => {
                    diesel::update(rollouts::table)
                        .filter(rollouts::id.eq(&id).and(rollouts::status.eq_any(RolloutStatus::CURRENT)))
                        .set((
                            rollouts::status.eq(RolloutStatus::Cancelled.as_str()),
                            rollouts::ended_at.eq(now),
                        ))
                        .execute(c)?;
                    Ok(rollouts::table
                        .find(&id)
                        .select(RolloutRow::as_select())
                        .first(c)
                        .optional()?)
                })
            })
            .await?;
        self.announce(|| Change::Rollouts);
        Ok(row)
    }

    /// Takes one of the rollout's slots for the agent, or re-offers the update on a new
    /// connection (`epoch`). An `epoch` of 0 claims the slot without sending: the agent's
    /// session sends it when woken ([`Store::pending_update`]).
    pub(crate) async fn claim_update(
        &self,
        rollout_id: String,
        agent_id: String,
        epoch: i64,
        from_version: Option<String>,
        now: i64,
    ) -> Result<Claim, StoreError> {
        let claim = self
            .run(move |pool| {
                with_conn!(pool, c => c.write_transaction::<Claim, StoreError, _>(|c| {
                    // Writing the rollout's row first serialises the claims of this rollout.
                    let row: Option<RolloutRow> = diesel::update(rollouts::table)
                        .filter(rollouts::id.eq(&rollout_id).and(rollouts::status.eq(RolloutStatus::Active.as_str())))
                        .set(rollouts::status.eq(RolloutStatus::Active.as_str()))
                        .returning(RolloutRow::as_returning())
                        .get_result(c)
                        .optional()?;
                    let Some(row) = row else { return Ok(Claim::Inactive) };
                    let existing: Option<(String, i64)> = rollout_agents::table
                        .find((&rollout_id, &agent_id))
                        .select((rollout_agents::status, rollout_agents::offered_epoch))
                        .first(c)
                        .optional()?;
                    match existing {
                        Some((status, sent_on)) if status == UpdateStatus::Updating.as_str() => {
                            if epoch == 0 || sent_on == epoch {
                                return Ok(Claim::AlreadySent);
                            }
                            diesel::update(rollout_agents::table.find((&rollout_id, &agent_id)))
                                .set(rollout_agents::offered_epoch.eq(epoch))
                                .execute(c)?;
                            Ok(Claim::Offer)
                        }
                        Some(_) => Ok(Claim::Finished),
                        None => {
                            let counts = count_updates!(c, &rollout_id)?;
                            if let Some(reason) = judge!(c, &row, &counts) {
                                return Ok(Claim::Braked(reason));
                            }
                            if counts.updating >= i64::from(row.max_concurrent) {
                                return Ok(Claim::Full);
                            }
                            diesel::insert_into(rollout_agents::table)
                                .values((
                                    rollout_agents::rollout_id.eq(&rollout_id),
                                    rollout_agents::agent_id.eq(&agent_id),
                                    rollout_agents::status.eq(UpdateStatus::Updating.as_str()),
                                    rollout_agents::from_version.eq(&from_version),
                                    rollout_agents::offered_at.eq(now),
                                    rollout_agents::offered_epoch.eq(epoch),
                                ))
                                .execute(c)?;
                            Ok(Claim::Offer)
                        }
                    }
                }))
            })
            .await?;
        if matches!(claim, Claim::Offer | Claim::Braked(_)) {
            self.announce(|| Change::Rollouts);
        }
        Ok(claim)
    }

    /// The active rollout whose update this agent holds a slot for but has not been sent
    /// on connection `epoch`; marks it sent on that connection.
    pub(crate) async fn pending_update(
        &self,
        agent_id: String,
        epoch: i64,
    ) -> Result<Option<String>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let candidate: Option<String> = rollout_agents::table
                    .inner_join(rollouts::table)
                    .filter(rollout_agents::agent_id.eq(&agent_id))
                    .filter(rollout_agents::status.eq(UpdateStatus::Updating.as_str()))
                    .filter(rollout_agents::offered_epoch.ne(epoch))
                    .filter(rollouts::status.eq(RolloutStatus::Active.as_str()))
                    .select(rollout_agents::rollout_id)
                    .first(c)
                    .optional()?;
                let Some(rollout_id) = candidate else { return Ok(None) };
                // Conditional, so that two connections racing cannot both send it.
                let marked = diesel::update(rollout_agents::table.find((&rollout_id, &agent_id)))
                    .filter(rollout_agents::offered_epoch.ne(epoch))
                    .filter(rollout_agents::status.eq(UpdateStatus::Updating.as_str()))
                    .set(rollout_agents::offered_epoch.eq(epoch))
                    .execute(c)?;
                Ok((marked == 1).then_some(rollout_id))
            })
        })
        .await
    }

    /// The agent came back on the rollout's version: frees its slot. Returns whether it
    /// held one (or had timed out).
    pub(crate) async fn finish_update(
        &self,
        rollout_id: String,
        agent_id: String,
        now: i64,
    ) -> Result<bool, StoreError> {
        let finished = self
            .run(move |pool| {
                with_conn!(pool, c => Ok(diesel::update(rollout_agents::table.find((&rollout_id, &agent_id)))
                    .filter(rollout_agents::status.eq_any([
                        UpdateStatus::Updating.as_str(),
                        UpdateStatus::TimedOut.as_str(),
                    ]))
                    .set((
                        rollout_agents::status.eq(UpdateStatus::Updated.as_str()),
                        rollout_agents::finished_at.eq(now),
                    ))
                    .execute(c)? == 1))
            })
            .await?;
        if finished {
            self.announce(|| Change::Rollouts);
        }
        Ok(finished)
    }

    /// Marks updates of current rollouts sent before `cutoff` as timed out, freeing their
    /// slots, and judges the brake of each active rollout that had some.
    pub(crate) async fn expire_updates(&self, cutoff: i64, now: i64) -> Result<Expiry, StoreError> {
        let expiry = self
            .run(move |pool| {
                with_conn!(pool, c => {
                    let current: Vec<String> = rollouts::table
                        .filter(rollouts::status.eq_any(RolloutStatus::CURRENT))
                        .select(rollouts::id)
                        .load(c)?;
                    let mut expiry = Expiry::default();
                    // One transaction per rollout (there is one per platform at most),
                    // each writing the rollout's row first, as a claim does.
                    for id in current {
                        let (n, braked) = c.write_transaction::<(usize, Option<String>), StoreError, _>(|c| {
                            let row: Option<RolloutRow> = diesel::update(rollouts::table)
                                .filter(rollouts::id.eq(&id).and(rollouts::status.eq_any(RolloutStatus::CURRENT)))
                                .set(rollouts::status.eq(rollouts::status))
                                .returning(RolloutRow::as_returning())
                                .get_result(c)
                                .optional()?;
                            let Some(row) = row else { return Ok((0, None)) };
                            let n = diesel::update(rollout_agents::table)
                                .filter(rollout_agents::rollout_id.eq(&id))
                                .filter(rollout_agents::status.eq(UpdateStatus::Updating.as_str()))
                                .filter(rollout_agents::offered_at.lt(cutoff))
                                .set((
                                    rollout_agents::status.eq(UpdateStatus::TimedOut.as_str()),
                                    rollout_agents::finished_at.eq(now),
                                ))
                                .execute(c)?;
                            if n == 0 {
                                return Ok((0, None));
                            }
                            let counts = count_updates!(c, &id)?;
                            Ok((n, judge!(c, &row, &counts)))
                        })?;
                        expiry.timed_out += n;
                        if let Some(reason) = braked {
                            expiry.braked.push((id, reason));
                        }
                    }
                    Ok(expiry)
                })
            })
            .await?;
        if expiry.timed_out > 0 {
            self.announce(|| Change::Rollouts);
        }
        Ok(expiry)
    }

    /// Records the agent's report that its update of this rollout failed (from
    /// `updating`, or `timed_out` when the report comes late), with its reason, and
    /// judges the brake if the rollout is active. Ended rollouts record it too, as
    /// history.
    pub(crate) async fn fail_update(
        &self,
        rollout_id: String,
        agent_id: String,
        error: String,
        now: i64,
    ) -> Result<FailureRecord, StoreError> {
        let record = self
            .run(move |pool| {
                with_conn!(pool, c => c.write_transaction::<FailureRecord, StoreError, _>(|c| {
                    let row: Option<RolloutRow> = diesel::update(rollouts::table.find(&rollout_id))
                        .set(rollouts::status.eq(rollouts::status))
                        .returning(RolloutRow::as_returning())
                        .get_result(c)
                        .optional()?;
                    let Some(row) = row else { return Ok(FailureRecord::Ignored) };
                    let n = diesel::update(rollout_agents::table.find((&rollout_id, &agent_id)))
                        .filter(rollout_agents::status.eq_any([
                            UpdateStatus::Updating.as_str(),
                            UpdateStatus::TimedOut.as_str(),
                        ]))
                        .set((
                            rollout_agents::status.eq(UpdateStatus::Failed.as_str()),
                            rollout_agents::error.eq(&error),
                            rollout_agents::finished_at.eq(now),
                        ))
                        .execute(c)?;
                    if n == 0 {
                        return Ok(FailureRecord::Ignored);
                    }
                    let counts = count_updates!(c, &rollout_id)?;
                    Ok(FailureRecord::Recorded { braked: judge!(c, &row, &counts) })
                }))
            })
            .await?;
        if let FailureRecord::Recorded { .. } = record {
            self.announce(|| Change::Rollouts);
        }
        Ok(record)
    }

    /// Pauses an active rollout (an operator's pause; the brake pauses in the claims and
    /// failure reports). Agents already updating finish; nobody else is offered the build.
    pub(crate) async fn pause_rollout(
        &self,
        id: String,
        reason: String,
    ) -> Result<RolloutTransition, StoreError> {
        self.transition(id, RolloutStatus::Active, move |row| {
            row.status = RolloutStatus::Paused.as_str().into();
            row.reason = Some(reason);
            false
        })
        .await
    }

    /// Makes a paused rollout active again. The brake starts a new sample: updates judged
    /// before the resume do not count again.
    pub(crate) async fn resume_rollout(&self, id: String) -> Result<RolloutTransition, StoreError> {
        self.transition(id, RolloutStatus::Paused, |row| {
            row.status = RolloutStatus::Active.as_str().into();
            row.reason = None;
            true
        })
        .await
    }

    /// Applies `change` to rollout `id` if it is in status `from`, writing the row first;
    /// when `change` says so, the brake's sample starts again from the current counts.
    async fn transition(
        &self,
        id: String,
        from: RolloutStatus,
        change: impl FnOnce(&mut RolloutRow) -> bool + Send + 'static,
    ) -> Result<RolloutTransition, StoreError> {
        let outcome = self
            .run(move |pool| {
                with_conn!(pool, c => c.write_transaction::<RolloutTransition, StoreError, _>(|c| {
                    let row: Option<RolloutRow> = diesel::update(rollouts::table.find(&id))
                        .set(rollouts::status.eq(rollouts::status))
                        .returning(RolloutRow::as_returning())
                        .get_result(c)
                        .optional()?;
                    let Some(mut row) = row else { return Ok(RolloutTransition::NotFound) };
                    if row.status != from.as_str() {
                        return Ok(RolloutTransition::WrongState(row.status));
                    }
                    let new_sample = change(&mut row);
                    diesel::update(rollouts::table.find(&id))
                        .set((rollouts::status.eq(&row.status), rollouts::reason.eq(&row.reason)))
                        .execute(c)?;
                    if new_sample {
                        let judged = count_updates!(c, &id)?.tally();
                        diesel::update(rollout_brakes::table.find(&id))
                            .set((
                                rollout_brakes::judged_failed.eq(judged.failed),
                                rollout_brakes::judged_finished.eq(judged.finished),
                            ))
                            .execute(c)?;
                    }
                    Ok(RolloutTransition::Done(Box::new(row)))
                }))
            })
            .await?;
        if let RolloutTransition::Done(_) = outcome {
            self.announce(|| Change::Rollouts);
        }
        Ok(outcome)
    }

    /// The rollout's agents by update status, some of those updating, and the latest
    /// failures.
    pub(crate) async fn update_counts(
        &self,
        rollout_id: String,
    ) -> Result<UpdateCounts, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let mut counts = count_updates!(c, &rollout_id)?;
                counts.updating_agents = rollout_agents::table
                    .filter(rollout_agents::rollout_id.eq(&rollout_id))
                    .filter(rollout_agents::status.eq(UpdateStatus::Updating.as_str()))
                    .order(rollout_agents::agent_id.asc())
                    .limit(100)
                    .select(rollout_agents::agent_id)
                    .load(c)?;
                if counts.failed > 0 {
                    counts.recent_failures = rollout_agents::table
                        .filter(rollout_agents::rollout_id.eq(&rollout_id))
                        .filter(rollout_agents::status.eq(UpdateStatus::Failed.as_str()))
                        .order((rollout_agents::finished_at.desc(), rollout_agents::agent_id.asc()))
                        .limit(RECENT_FAILURES)
                        .select((
                            rollout_agents::agent_id,
                            rollout_agents::from_version,
                            rollout_agents::error,
                            rollout_agents::finished_at,
                        ))
                        .load(c)?;
                }
                Ok(counts)
            })
        })
        .await
    }

    /// Agents online on `pod` that this rollout may have to update: its os/arch (and
    /// label), a reported version other than the target, and not yet sent the update.
    /// Keyset pages by id; the caller compares versions ([`RolloutRow::wants`]) and
    /// applies the percentage.
    pub(crate) async fn rollout_candidates(
        &self,
        rollout: RolloutRow,
        pod: String,
        after: Option<String>,
        limit: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let offered = rollout_agents::table
                    .filter(rollout_agents::rollout_id.eq(rollout.id.clone()))
                    .select(rollout_agents::agent_id);
                let mut q = agents::table
                    .filter(agents::pod.eq(&pod))
                    .filter(agents::online.eq(true))
                    .filter(agents::version.is_not_null())
                    .filter(agents::version.ne(&rollout.version))
                    .filter(lower(agents::os).eq(&rollout.os))
                    .filter(lower(agents::arch).eq(&rollout.arch))
                    .filter(agents::id.ne_all(offered))
                    .into_boxed();
                if let Some(label) = &rollout.label {
                    let labelled = agent_labels::table
                        .filter(agent_labels::label.eq(label.clone()))
                        .select(agent_labels::agent_id);
                    q = q.filter(agents::id.eq_any(labelled));
                }
                if let Some(after) = &after {
                    q = q.filter(agents::id.gt(after.clone()));
                }
                Ok(q.order(agents::id.asc())
                    .limit(limit)
                    .select((agents::id, agents::version.assume_not_null()))
                    .load(c)?)
            })
        })
        .await
    }

    /// Every agent a rollout for `os`/`arch` (and `label`) concerns, with its version:
    /// keyset pages by id, for progress reports.
    pub(crate) async fn agents_for_target(
        &self,
        os: String,
        arch: String,
        label: Option<String>,
        after: Option<String>,
        limit: i64,
    ) -> Result<Vec<(String, Option<String>)>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let mut q = agents::table
                    .filter(lower(agents::os).eq(&os))
                    .filter(lower(agents::arch).eq(&arch))
                    .into_boxed();
                if let Some(label) = &label {
                    let labelled = agent_labels::table
                        .filter(agent_labels::label.eq(label.clone()))
                        .select(agent_labels::agent_id);
                    q = q.filter(agents::id.eq_any(labelled));
                }
                if let Some(after) = &after {
                    q = q.filter(agents::id.gt(after.clone()));
                }
                Ok(q.order(agents::id.asc())
                    .limit(limit)
                    .select((agents::id, agents::version))
                    .load(c)?)
            })
        })
        .await
    }

    /// Replaces the labels an agent reported; labels its enroll secret gave it stay.
    /// Returns every label the agent has afterwards (reported and enrolled), sorted.
    pub async fn set_agent_labels(
        &self,
        agent_id: String,
        labels: Vec<String>,
    ) -> Result<Vec<String>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => c.write_transaction::<Vec<String>, StoreError, _>(|c| {
                diesel::delete(
                    agent_labels::table
                        .filter(agent_labels::agent_id.eq(&agent_id))
                        .filter(agent_labels::source.ne(LABEL_FROM_ENROLLMENT)),
                )
                .execute(c)?;
                for label in &labels {
                    // An enrolled label reported again stays an enrolled one.
                    diesel::insert_into(agent_labels::table)
                        .values((agent_labels::agent_id.eq(&agent_id), agent_labels::label.eq(label)))
                        .on_conflict_do_nothing()
                        .execute(c)?;
                }
                Ok(agent_labels::table
                    .filter(agent_labels::agent_id.eq(&agent_id))
                    .order(agent_labels::label.asc())
                    .select(agent_labels::label)
                    .load(c)?)
            }))
        })
        .await
    }

    /// The agent's labels, sorted, whether reported in a `hello` or given at enrollment.
    pub async fn agent_labels(&self, agent_id: String) -> Result<Vec<String>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(agent_labels::table
                .filter(agent_labels::agent_id.eq(&agent_id))
                .order(agent_labels::label.asc())
                .select(agent_labels::label)
                .load(c)?))
        })
        .await
    }

    /// Online agents per pod (the pod column of the agents table), and the total number
    /// of agents known.
    pub(crate) async fn agents_by_pod(&self) -> Result<(Vec<(String, i64)>, i64), StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let pods: Vec<(Option<String>, i64)> = agents::table
                    .filter(agents::online.eq(true))
                    .group_by(agents::pod)
                    .select((agents::pod, diesel::dsl::count_star()))
                    .load(c)?;
                let total: i64 = agents::table.count().get_result(c)?;
                let mut pods: Vec<(String, i64)> = pods
                    .into_iter()
                    .map(|(pod, n)| (pod.unwrap_or_else(|| "unknown".into()), n))
                    .collect();
                pods.sort();
                Ok((pods, total))
            })
        })
        .await
    }
}
