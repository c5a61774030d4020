//! Binaries: the metadata of agent builds whose files live on BINARY_STORAGE_PATH.

use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};

use super::schema::{binaries, rollout_agents, rollout_brakes, rollouts};
use super::{Change, Store, StoreError, WriteTransaction, with_conn};

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = binaries)]
pub(crate) struct BinaryRow {
    pub id: String,
    pub name: String,
    pub version: String,
    pub os: String,
    pub arch: String,
    pub notes: Option<String>,
    pub size_bytes: i64,
    /// Lower-case hex; also the file's name on the storage volume.
    pub sha256: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct BinaryFilter {
    pub name: Option<String>,
    pub version: Option<String>,
    pub os: Option<String>,
    pub arch: Option<String>,
    /// Keyset pagination, newest first: rows strictly older than this `(created_at, id)`.
    pub before: Option<(i64, String)>,
    pub limit: i64,
}

/// What became of an insert.
#[derive(Debug)]
pub(crate) enum BinaryInsert {
    Inserted,
    /// A binary with the same name, version, os and arch exists (its id).
    Duplicate(String),
}

/// What became of a delete.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BinaryDeletion {
    NotFound,
    /// The binary is the target of this active rollout; nothing was deleted.
    RolloutTarget(String),
    /// The row is gone. The file may be removed unless another row has the same content.
    Deleted {
        sha256: String,
        file_shared: bool,
    },
}

impl Store {
    /// The id of the binary with this name, version, os and arch, if any.
    pub(crate) async fn find_binary(
        &self,
        name: String,
        version: String,
        os: String,
        arch: String,
    ) -> Result<Option<String>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(binaries::table
                .filter(binaries::name.eq(&name))
                .filter(binaries::version.eq(&version))
                .filter(binaries::os.eq(&os))
                .filter(binaries::arch.eq(&arch))
                .select(binaries::id)
                .first::<String>(c)
                .optional()?))
        })
        .await
    }

    /// Inserts the metadata; the unique (name, version, os, arch) key decides races
    /// between replicas.
    pub(crate) async fn insert_binary(&self, row: BinaryRow) -> Result<BinaryInsert, StoreError> {
        let outcome = self
            .run(move |pool| {
                with_conn!(pool, c => {
                    match diesel::insert_into(binaries::table).values(&row).execute(c) {
                        Ok(_) => Ok(BinaryInsert::Inserted),
                        Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {
                            let existing = binaries::table
                                .filter(binaries::name.eq(&row.name))
                                .filter(binaries::version.eq(&row.version))
                                .filter(binaries::os.eq(&row.os))
                                .filter(binaries::arch.eq(&row.arch))
                                .select(binaries::id)
                                .first::<String>(c)
                                .optional()?;
                            Ok(BinaryInsert::Duplicate(existing.unwrap_or_default()))
                        }
                        Err(e) => Err(e.into()),
                    }
                })
            })
            .await?;
        if let BinaryInsert::Inserted = outcome {
            self.announce(|| Change::Binaries);
        }
        Ok(outcome)
    }

    pub(crate) async fn get_binary(&self, id: String) -> Result<Option<BinaryRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(binaries::table
                .find(&id)
                .select(BinaryRow::as_select())
                .first(c)
                .optional()?))
        })
        .await
    }

    /// Newest first.
    pub(crate) async fn list_binaries(
        &self,
        filter: BinaryFilter,
    ) -> Result<Vec<BinaryRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let mut q = binaries::table.into_boxed();
                if let Some(v) = &filter.name {
                    q = q.filter(binaries::name.eq(v.clone()));
                }
                if let Some(v) = &filter.version {
                    q = q.filter(binaries::version.eq(v.clone()));
                }
                if let Some(v) = &filter.os {
                    q = q.filter(binaries::os.eq(v.clone()));
                }
                if let Some(v) = &filter.arch {
                    q = q.filter(binaries::arch.eq(v.clone()));
                }
                if let Some((at, id)) = &filter.before {
                    q = q.filter(
                        binaries::created_at
                            .lt(*at)
                            .or(binaries::created_at.eq(*at).and(binaries::id.lt(id.clone()))),
                    );
                }
                Ok(q.order((binaries::created_at.desc(), binaries::id.desc()))
                    .limit(filter.limit)
                    .select(BinaryRow::as_select())
                    .load(c)?)
            })
        })
        .await
    }

    /// Deletes the metadata, refusing while the binary is the target of an active or paused rollout. The
    /// history of ended rollouts of this binary goes with it. A rollout started
    /// concurrently on another replica is caught by the foreign key.
    pub(crate) async fn delete_binary(&self, id: String) -> Result<BinaryDeletion, StoreError> {
        let outcome = self
            .run(move |pool| {
                with_conn!(pool, c => {
                    let result = c.write_transaction::<BinaryDeletion, DieselError, _>(|c| {
                        let active: Option<String> = rollouts::table
                            .filter(rollouts::binary_id.eq(&id).and(rollouts::status.eq_any(super::rollouts::RolloutStatus::CURRENT)))
                            .select(rollouts::id)
                            .first(c)
                            .optional()?;
                        if let Some(rollout) = active {
                            return Ok(BinaryDeletion::RolloutTarget(rollout));
                        }
                        let Some(sha256) = binaries::table
                            .find(&id)
                            .select(binaries::sha256)
                            .first::<String>(c)
                            .optional()?
                        else {
                            return Ok(BinaryDeletion::NotFound);
                        };
                        let ended = rollouts::table
                            .filter(rollouts::binary_id.eq(&id))
                            .select(rollouts::id);
                        diesel::delete(rollout_agents::table.filter(rollout_agents::rollout_id.eq_any(ended)))
                            .execute(c)?;
                        let ended = rollouts::table
                            .filter(rollouts::binary_id.eq(&id))
                            .select(rollouts::id);
                        diesel::delete(rollout_brakes::table.filter(rollout_brakes::rollout_id.eq_any(ended)))
                            .execute(c)?;
                        diesel::delete(rollouts::table.filter(rollouts::binary_id.eq(&id))).execute(c)?;
                        diesel::delete(binaries::table.find(&id)).execute(c)?;
                        let others: i64 = binaries::table
                            .filter(binaries::sha256.eq(&sha256))
                            .count()
                            .get_result(c)?;
                        Ok(BinaryDeletion::Deleted { sha256, file_shared: others > 0 })
                    });
                    match result {
                        Err(DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _)) => {
                            // A rollout of this binary started while we deleted it.
                            let rollout = rollouts::table
                                .filter(rollouts::binary_id.eq(&id).and(rollouts::status.eq_any(super::rollouts::RolloutStatus::CURRENT)))
                                .select(rollouts::id)
                                .first::<String>(c)
                                .optional()?;
                            Ok(BinaryDeletion::RolloutTarget(rollout.unwrap_or_default()))
                        }
                        other => Ok(other?),
                    }
                })
            })
            .await?;
        if let BinaryDeletion::Deleted { .. } = outcome {
            self.announce(|| Change::Binaries);
            self.announce(|| Change::Rollouts);
        }
        Ok(outcome)
    }
}
