//! Enroll secrets and enrollment itself: a secret, a client id and a hostname become an
//! agent with the secret's labels and a recorded token, in one transaction.

use diesel::prelude::*;

use super::api_tokens::{ApiTokenRow, bump_generation};
use super::rollouts::LABEL_FROM_ENROLLMENT;
use super::schema::{agent_credentials, agent_labels, agents, api_tokens, enroll_secrets};
use super::{Change, Store, StoreError, WriteTransaction, with_conn};

/// An enroll secret as stored. Timestamps are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = enroll_secrets)]
pub struct EnrollSecretRow {
    /// A UUIDv7, as the API and the audit log name it.
    pub id: String,
    /// The operator's name for it; tokens minted by enrollment carry it as their `name`.
    pub name: String,
    /// Hex SHA-256 of the secret; the secret itself is never stored.
    pub secret_sha256: String,
    /// JSON array of strings.
    pub labels: String,
    /// Whether a client id that is already enrolled may enroll again (its earlier
    /// tokens are then invalidated).
    pub allow_reenroll: bool,
    /// When it was created.
    pub created_at: i64,
    /// After this it is refused as expired; `None`: it never expires.
    pub expires_at: Option<i64>,
    /// Enrollments allowed in all; `None`: unlimited.
    pub max_uses: Option<i64>,
    /// Enrollments so far.
    pub use_count: i64,
    /// The last enrollment with it.
    pub last_used_at: Option<i64>,
    /// When it was revoked; a revoked secret is refused.
    pub revoked_at: Option<i64>,
}

impl EnrollSecretRow {
    /// The labels given to agents that enroll with this secret.
    pub fn labels(&self) -> Vec<String> {
        serde_json::from_str(&self.labels).unwrap_or_default()
    }
}

/// One enrollment to attempt.
#[derive(Debug, Clone)]
pub struct EnrollAttempt {
    /// Hex SHA-256 of the secret the agent presented.
    pub secret_sha256: String,
    /// The `client_id` the agent asks for.
    pub client_id: String,
    /// The host name it reports, stored as in a `hello`.
    pub hostname: Option<String>,
    /// Milliseconds since the Unix epoch, for expiry and `last_used_at`.
    pub now: i64,
    /// The token to record; its `name` is filled in with the secret's name.
    pub token: ApiTokenRow,
}

/// Why an enrollment was refused. Nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollRefusal {
    /// No secret has this hash.
    UnknownSecret,
    /// The secret was revoked.
    Revoked,
    /// The secret is past its `expires_at`.
    Expired,
    /// The secret reached its `max_uses`.
    UsedUp,
    /// The client id is already enrolled and the secret does not allow re-enrollment.
    AlreadyEnrolled,
}

/// What [`Store::enroll`] did: everything written in one transaction, or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollOutcome {
    /// The agent exists, its labels are the secret's and its token is recorded.
    Enrolled {
        /// The agent's credential generation, to put in its token.
        generation: i64,
        /// The secret as it was before this use (its id, name and labels).
        secret: EnrollSecretRow,
        /// The client id was enrolled before; its earlier tokens are now invalid.
        reenrolled: bool,
    },
    /// Refused for the reason given; nothing was written.
    Refused(EnrollRefusal),
}

/// Rolls the transaction back on a refusal as on an error.
enum TxError {
    Refused(EnrollRefusal),
    Store(StoreError),
}

impl From<diesel::result::Error> for TxError {
    fn from(e: diesel::result::Error) -> Self {
        TxError::Store(e.into())
    }
}

impl Store {
    /// Stores a new secret (by its hash); the id must be new.
    pub async fn insert_enroll_secret(&self, row: EnrollSecretRow) -> Result<(), StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => diesel::insert_into(enroll_secrets::table).values(&row).execute(c)?);
            Ok(())
        })
        .await
    }

    /// Secrets ordered by id (a UUIDv7: creation time), ids strictly after `after`.
    pub async fn list_enroll_secrets(
        &self,
        after: Option<String>,
        limit: i64,
    ) -> Result<Vec<EnrollSecretRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let mut q = enroll_secrets::table.into_boxed();
                if let Some(after) = &after {
                    q = q.filter(enroll_secrets::id.gt(after.clone()));
                }
                Ok(q.order(enroll_secrets::id.asc())
                    .limit(limit)
                    .select(EnrollSecretRow::as_select())
                    .load(c)?)
            })
        })
        .await
    }

    /// Revokes a secret (the first revocation's time is kept); `None` when unknown.
    pub async fn revoke_enroll_secret(
        &self,
        id: String,
        now: i64,
    ) -> Result<Option<EnrollSecretRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                diesel::update(enroll_secrets::table.find(&id).filter(enroll_secrets::revoked_at.is_null()))
                    .set(enroll_secrets::revoked_at.eq(now))
                    .execute(c)?;
                Ok(enroll_secrets::table
                    .find(&id)
                    .select(EnrollSecretRow::as_select())
                    .first(c)
                    .optional()?)
            })
        })
        .await
    }

    /// Enrolls an agent: counts one use of the secret with a single conditional UPDATE
    /// (safe when replicas enroll concurrently: a secret with `max_uses` N is used at
    /// most N times), creates the agent, adds the secret's labels to it and records the
    /// token, all in one transaction. A refusal writes nothing.
    pub async fn enroll(&self, attempt: EnrollAttempt) -> Result<EnrollOutcome, StoreError> {
        let client_id = attempt.client_id.clone();
        let outcome = self
            .run(move |pool| {
                let EnrollAttempt { secret_sha256, client_id, hostname, now, mut token } = attempt;
                let result = with_conn!(pool, c => c.write_transaction::<_, TxError, _>(|c| {
                    let secret = enroll_secrets::table
                        .filter(enroll_secrets::secret_sha256.eq(&secret_sha256))
                        .select(EnrollSecretRow::as_select())
                        .first(c)
                        .optional()?
                        .ok_or(TxError::Refused(EnrollRefusal::UnknownSecret))?;
                    let counted = diesel::update(enroll_secrets::table.find(&secret.id))
                        .filter(enroll_secrets::revoked_at.is_null())
                        .filter(enroll_secrets::expires_at.is_null().or(enroll_secrets::expires_at.gt(now)))
                        .filter(enroll_secrets::max_uses.is_null().or(enroll_secrets::use_count.nullable().lt(enroll_secrets::max_uses)))
                        .set((
                            enroll_secrets::use_count.eq(enroll_secrets::use_count + 1_i64),
                            enroll_secrets::last_used_at.eq(now),
                        ))
                        .execute(c)?;
                    if counted == 0 {
                        return Err(TxError::Refused(if secret.revoked_at.is_some() {
                            EnrollRefusal::Revoked
                        } else if secret.expires_at.is_some_and(|e| e <= now) {
                            EnrollRefusal::Expired
                        } else {
                            EnrollRefusal::UsedUp
                        }));
                    }
                    // The insert decides "already enrolled", so two replicas enrolling
                    // the same client id at once cannot both succeed.
                    let created = diesel::insert_into(agents::table)
                        .values((
                            agents::id.eq(&client_id),
                            agents::created_at.eq(now),
                            agents::hostname.eq(&hostname),
                        ))
                        .on_conflict_do_nothing()
                        .execute(c)? == 1;
                    let generation = if created {
                        agent_credentials::table
                            .find(&client_id)
                            .select(agent_credentials::generation)
                            .first::<i64>(c)
                            .optional()?
                            .unwrap_or(0)
                    } else if secret.allow_reenroll {
                        if hostname.is_some() {
                            diesel::update(agents::table.find(&client_id))
                                .set(agents::hostname.eq(&hostname))
                                .execute(c)?;
                        }
                        bump_generation!(c, &client_id, now)?
                    } else {
                        return Err(TxError::Refused(EnrollRefusal::AlreadyEnrolled));
                    };
                    for label in secret.labels() {
                        // Marked as the enrollment's, so that hellos (which replace the
                        // labels the agent reports) keep them.
                        diesel::insert_into(agent_labels::table)
                            .values((
                                agent_labels::agent_id.eq(&client_id),
                                agent_labels::label.eq(&label),
                                agent_labels::source.eq(LABEL_FROM_ENROLLMENT),
                            ))
                            .on_conflict((agent_labels::agent_id, agent_labels::label))
                            .do_update()
                            .set(agent_labels::source.eq(LABEL_FROM_ENROLLMENT))
                            .execute(c)?;
                    }
                    token.name = Some(format!("enrolled with {}", secret.name));
                    diesel::insert_into(api_tokens::table).values(&token).execute(c)?;
                    Ok(EnrollOutcome::Enrolled { generation, secret, reenrolled: !created })
                }));
                match result {
                    Ok(outcome) => Ok(outcome),
                    Err(TxError::Refused(why)) => Ok(EnrollOutcome::Refused(why)),
                    Err(TxError::Store(e)) => Err(e),
                }
            })
            .await?;
        if matches!(outcome, EnrollOutcome::Enrolled { .. }) {
            self.announce(|| Change::Agent { id: client_id });
        }
        Ok(outcome)
    }
}
