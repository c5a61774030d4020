//! The audit log: appended, queried newest first with keyset pages, pruned by age.

use diesel::prelude::*;

use super::schema::audit_log;
use super::{Store, StoreError, with_conn};

/// One audit entry to insert (`audit_log`); `audit::AuditEvent` builds it.
#[derive(Debug, Clone, PartialEq, Eq, Insertable)]
#[diesel(table_name = audit_log)]
pub struct NewAuditRow {
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    /// `token`, `ui_session`, `enroll_secret` or `anonymous`.
    pub actor_kind: String,
    /// The token's subject, the UI session's short id, the enroll secret's id.
    pub actor: String,
    /// The token's `jti` (RFC 7519 §4.1.7), when the actor used a token that has one.
    pub actor_jti: Option<String>,
    /// The client's address (see `audit::client_address`).
    pub source: Option<String>,
    /// An `audit::AuditAction` in snake_case.
    pub action: String,
    /// What the action was done to: a client id, a token's jti, a rollout's id…
    pub target: Option<String>,
    /// A small JSON object with action-specific facts.
    pub detail: Option<String>,
}

/// One entry of the audit log as stored; [`NewAuditRow`] documents the columns.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = audit_log)]
pub struct AuditRow {
    /// Ascending with insertion; the keyset of `GET /api/v1/audit` pages (`after`).
    pub id: i64,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    /// `token`, `ui_session`, `enroll_secret` or `anonymous`.
    pub actor_kind: String,
    /// The token's subject, the UI session's short id or the enroll secret's id; empty for
    /// `anonymous`.
    pub actor: String,
    /// The token's `jti`, when the actor is a token that has one.
    pub actor_jti: Option<String>,
    /// The client's address as text (see `audit::client_address`).
    pub source: Option<String>,
    /// An `audit::AuditAction` in snake_case (`token_minted`).
    pub action: String,
    /// What was acted on: a client id, a `jti`, a secret's, binary's, rollout's or job's id.
    pub target: Option<String>,
    /// A small JSON object with action-specific facts; never a secret.
    pub detail: Option<String>,
}

/// Which entries to read, newest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditFilter {
    pub actor: Option<String>,
    pub action: Option<String>,
    /// Only entries at or after this time (ms).
    pub(crate) since: Option<i64>,
    /// Keyset pagination: entries with an id strictly below this one (the last id of
    /// the previous page).
    pub(crate) before_id: Option<i64>,
    pub limit: i64,
}

impl Store {
    /// Appends one entry and returns its id.
    pub(crate) async fn append_audit(&self, row: NewAuditRow) -> Result<i64, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(diesel::insert_into(audit_log::table)
                .values(&row)
                .returning(audit_log::id)
                .get_result(c)?))
        })
        .await
    }

    pub(crate) async fn query_audit(
        &self,
        filter: AuditFilter,
    ) -> Result<Vec<AuditRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let mut q = audit_log::table.into_boxed();
                if let Some(actor) = &filter.actor {
                    q = q.filter(audit_log::actor.eq(actor.clone()));
                }
                if let Some(action) = &filter.action {
                    q = q.filter(audit_log::action.eq(action.clone()));
                }
                if let Some(since) = filter.since {
                    q = q.filter(audit_log::at.ge(since));
                }
                if let Some(before) = filter.before_id {
                    q = q.filter(audit_log::id.lt(before));
                }
                Ok(q.order(audit_log::id.desc())
                    .limit(filter.limit)
                    .select(AuditRow::as_select())
                    .load(c)?)
            })
        })
        .await
    }

    /// Deletes entries older than `cutoff` (ms), at most `batch` of them, so that a long
    /// backlog is pruned in several short statements. Returns how many were deleted.
    pub(crate) async fn prune_audit(&self, cutoff: i64, batch: i64) -> Result<usize, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let ids = audit_log::table
                    .filter(audit_log::at.lt(cutoff))
                    .order(audit_log::id.asc())
                    .limit(batch)
                    .select(audit_log::id)
                    .load::<i64>(c)?;
                if ids.is_empty() {
                    return Ok(0);
                }
                Ok(diesel::delete(audit_log::table.filter(audit_log::id.eq_any(&ids))).execute(c)?)
            })
        })
        .await
    }
}
