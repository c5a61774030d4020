//! `GET /api/v1/audit`: the audit log, newest first (admin). Append-only: there is no
//! route that changes or deletes entries; AUDIT_RETENTION prunes old ones.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorCode, Result};
use super::extract::{AdminContext, Page, Query};
use super::openapi::{BadRequest, Forbidden, Unauthorized, Unavailable};
use crate::audit::{AuditAction, AuditQuery, DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE};
use crate::ids::rfc3339;
use crate::state::AppState;
use crate::store::AuditRow;

/// One entry of the audit log.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = AuditEntry)]
pub(super) struct AuditEntryView {
    id: i64,
    /// RFC 3339 UTC.
    at: String,
    /// `token`, `ui_session`, `enroll_secret` or `anonymous`.
    actor_kind: String,
    /// The token's subject, the UI session's short id or the enroll secret's id.
    actor: String,
    /// The token's `jti`, when it has one.
    actor_jti: Option<String>,
    /// The client's address.
    source: Option<String>,
    /// What was done (README lists the actions).
    action: String,
    /// What it was done to: an id.
    target: Option<String>,
    /// More about it, per action.
    #[schema(value_type = Option<Value>)]
    detail: Option<serde_json::Value>,
}

/// A page of the audit log, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct AuditPage {
    entries: Vec<AuditEntryView>,
    /// The `after` of the next page; null on the last page.
    next: Option<String>,
}

impl From<AuditRow> for AuditEntryView {
    fn from(r: AuditRow) -> Self {
        AuditEntryView {
            id: r.id,
            at: rfc3339(r.at),
            actor_kind: r.actor_kind,
            actor: r.actor,
            actor_jti: r.actor_jti,
            source: r.source,
            action: r.action,
            target: r.target,
            detail: r
                .detail
                .map(|d| serde_json::from_str(&d).unwrap_or(serde_json::Value::String(d))),
        }
    }
}

#[derive(Deserialize)]
pub(super) struct AuditFilterQuery {
    actor: Option<String>,
    action: Option<String>,
}

impl AuditFilterQuery {
    /// The audit query for these parameters and `page`; 400 `invalid_filter`,
    /// `invalid_cursor` or `invalid_limit`. Empty values mean absent.
    pub(super) fn query(self, page: &Page) -> Result<AuditQuery> {
        let action = match self.action.as_deref().filter(|a| !a.is_empty()) {
            None => None,
            Some(a) => Some(
                a.parse::<AuditAction>()
                    .map_err(|m| ApiError::bad_request(ErrorCode::InvalidFilter, m))?,
            ),
        };
        let after = match page.after() {
            None => None,
            Some(a) => Some(a.parse::<i64>().map_err(|_| {
                ApiError::bad_request(
                    ErrorCode::InvalidCursor,
                    "after must be a `next` value from a previous page",
                )
            })?),
        };
        let limit = page.limit(i64::from(DEFAULT_AUDIT_PAGE), i64::from(MAX_AUDIT_PAGE))?;
        Ok(AuditQuery {
            actor: self.actor.filter(|a| !a.is_empty()),
            action,
            since_ms: None,
            after,
            limit: Some(limit as u32),
        })
    }
}

/// `GET /api/v1/audit?actor=&action=&after=&limit=`: entries newest first; `after` is the
/// previous page's `next`.
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    operation_id = "list_audit",
    tag = "audit",
    params(
        ("actor" = Option<String>, Query, description = "Only entries of this actor (a token's subject, a UI session's id, an enroll secret's id)"),
        ("action" = Option<String>, Query, description = "Only entries of this action, e.g. `token_minted`"),
        ("limit" = Option<String>, Query, pattern = r"^(0*([1-9][0-9]{0,2}|1000))?$", description = "Page size (default 100; 1 to 1000; empty: the default)"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of the audit log, newest first", body = AuditPage),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn list(
    State(state): State<AppState>,
    _: AdminContext,
    page: Page,
    Query(filter): Query<AuditFilterQuery>,
) -> Result<Json<AuditPage>> {
    let query = filter.query(&page)?;
    let found = state.creds.audit().query(query).await?;
    Ok(Json(AuditPage {
        entries: found.entries.into_iter().map(Into::into).collect(),
        next: found.next.map(|n| n.to_string()),
    }))
}
