//! Rollouts: the desired version per os/arch, the agents each one is updating, and the
//! labels agents report (a rollout may target one).
//!
//! Pacing is decided here, in one transaction per claim, so that replicas agree on it:
//! the claim first writes the rollout's row, which serialises claims of that rollout (a
//! row lock on PostgreSQL, the write lock on SQLite), then counts the agents updating.

use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};

use super::schema::{agent_labels, agents, binaries, rollout_agents, rollouts};
use super::{Change, Store, StoreError, with_conn};

/// `agent_labels.source` of the labels an enroll secret gave: hellos keep them.
pub(crate) const LABEL_FROM_ENROLLMENT: &str = "enroll";

#[diesel::declare_sql_function]
extern "SQL" {
    /// SQL `lower()`: agents report os and arch in whatever case they like.
    fn lower(
        x: diesel::sql_types::Nullable<diesel::sql_types::Text>,
    ) -> diesel::sql_types::Nullable<diesel::sql_types::Text>;
}

/// Lifecycle: `active` until a newer rollout for the same os/arch supersedes it or an
/// operator cancels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RolloutStatus {
    Active,
    Superseded,
    Cancelled,
}

impl RolloutStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RolloutStatus::Active => "active",
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
}

impl UpdateStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            UpdateStatus::Updating => "updating",
            UpdateStatus::Updated => "updated",
            UpdateStatus::TimedOut => "timed_out",
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
}

/// An active rollout with what an `update` message needs from its binary.
#[derive(Debug, Clone)]
pub(crate) struct ActiveRollout {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Send the update on this connection (a new slot, or again on a new connection).
    Offer,
    /// Already sent on this connection.
    AlreadySent,
    /// Every slot is taken; the agent waits its turn.
    Full,
    /// The agent was updated or timed out in this rollout; it is not asked again.
    Finished,
    /// The rollout is no longer active.
    Inactive,
}

/// A rollout's agents by update status.
#[derive(Debug, Clone, Default)]
pub(crate) struct UpdateCounts {
    pub updating: i64,
    pub updated: i64,
    pub timed_out: i64,
    /// Some of the agents updating now (at most 100), for display.
    pub updating_agents: Vec<String>,
}

impl Store {
    /// Makes `row` the active rollout of its os/arch, superseding the previous one.
    pub(crate) async fn start_rollout(&self, row: RolloutRow) -> Result<RolloutStart, StoreError> {
        let outcome = self
            .run(move |pool| {
                with_conn!(pool, c => {
                    let result = c.transaction::<Option<String>, DieselError, _>(|c| {
                        let superseded: Vec<String> = diesel::update(rollouts::table)
                            .filter(rollouts::os.eq(&row.os))
                            .filter(rollouts::arch.eq(&row.arch))
                            .filter(rollouts::status.eq(RolloutStatus::Active.as_str()))
                            .set((
                                rollouts::status.eq(RolloutStatus::Superseded.as_str()),
                                rollouts::ended_at.eq(row.created_at),
                            ))
                            .returning(rollouts::id)
                            .get_results(c)?;
                        diesel::insert_into(rollouts::table).values(&row).execute(c)?;
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

    /// Every active rollout, with its binary's name, checksum and size.
    pub(crate) async fn active_rollouts(&self) -> Result<Vec<ActiveRollout>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let rows = rollouts::table
                    .inner_join(binaries::table)
                    .filter(rollouts::status.eq(RolloutStatus::Active.as_str()))
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
                    .map(|(rollout, name, sha256, size_bytes)| ActiveRollout { rollout, name, sha256, size_bytes })
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

    /// Ends an active rollout. Returns the row, or `None` if there is no such rollout.
    pub(crate) async fn cancel_rollout(
        &self,
        id: String,
        now: i64,
    ) -> Result<Option<RolloutRow>, StoreError> {
        let row = self
            .run(move |pool| {
                with_conn!(pool, c => {
                    diesel::update(rollouts::table)
                        .filter(rollouts::id.eq(&id).and(rollouts::status.eq(RolloutStatus::Active.as_str())))
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
                with_conn!(pool, c => c.transaction::<Claim, StoreError, _>(|c| {
                    // Writing the rollout's row first serialises the claims of this rollout.
                    let max: Option<i32> = diesel::update(rollouts::table)
                        .filter(rollouts::id.eq(&rollout_id).and(rollouts::status.eq(RolloutStatus::Active.as_str())))
                        .set(rollouts::status.eq(RolloutStatus::Active.as_str()))
                        .returning(rollouts::max_concurrent)
                        .get_result(c)
                        .optional()?;
                    let Some(max) = max else { return Ok(Claim::Inactive) };
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
                            let busy: i64 = rollout_agents::table
                                .filter(rollout_agents::rollout_id.eq(&rollout_id))
                                .filter(rollout_agents::status.eq(UpdateStatus::Updating.as_str()))
                                .count()
                                .get_result(c)?;
                            if busy >= i64::from(max) {
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
        if claim == Claim::Offer {
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

    /// Marks updates of active rollouts sent before `cutoff` as timed out, freeing their
    /// slots. Returns how many.
    pub(crate) async fn expire_updates(&self, cutoff: i64, now: i64) -> Result<usize, StoreError> {
        let n = self
            .run(move |pool| {
                with_conn!(pool, c => {
                    let active = rollouts::table
                        .filter(rollouts::status.eq(RolloutStatus::Active.as_str()))
                        .select(rollouts::id);
                    Ok(diesel::update(rollout_agents::table)
                        .filter(rollout_agents::status.eq(UpdateStatus::Updating.as_str()))
                        .filter(rollout_agents::offered_at.lt(cutoff))
                        .filter(rollout_agents::rollout_id.eq_any(active))
                        .set((
                            rollout_agents::status.eq(UpdateStatus::TimedOut.as_str()),
                            rollout_agents::finished_at.eq(now),
                        ))
                        .execute(c)?)
                })
            })
            .await?;
        if n > 0 {
            self.announce(|| Change::Rollouts);
        }
        Ok(n)
    }

    pub(crate) async fn update_counts(
        &self,
        rollout_id: String,
    ) -> Result<UpdateCounts, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let by_status: Vec<(String, i64)> = rollout_agents::table
                    .filter(rollout_agents::rollout_id.eq(&rollout_id))
                    .group_by(rollout_agents::status)
                    .select((rollout_agents::status, diesel::dsl::count_star()))
                    .load(c)?;
                let mut counts = UpdateCounts::default();
                for (status, n) in by_status {
                    match status.as_str() {
                        "updating" => counts.updating = n,
                        "updated" => counts.updated = n,
                        "timed_out" => counts.timed_out = n,
                        _ => {}
                    }
                }
                counts.updating_agents = rollout_agents::table
                    .filter(rollout_agents::rollout_id.eq(&rollout_id))
                    .filter(rollout_agents::status.eq(UpdateStatus::Updating.as_str()))
                    .order(rollout_agents::agent_id.asc())
                    .limit(100)
                    .select(rollout_agents::agent_id)
                    .load(c)?;
                Ok(counts)
            })
        })
        .await
    }

    /// Agents online on `pod` that this rollout may have to update: its os/arch (and
    /// label), a reported version other than the target, and not yet sent the update.
    /// Keyset pages by id; the caller compares versions and applies the percentage.
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
            with_conn!(pool, c => c.transaction::<Vec<String>, StoreError, _>(|c| {
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
