//! `GET /api/v1/audit`: the audit log, newest first (admin). Append-only: there is no
//! route that changes or deletes entries; AUDIT_RETENTION prunes old ones.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorCode, Result};
use super::extract::{AdminContext, Page, Query};
use crate::audit::{AuditAction, AuditQuery, DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE};
use crate::ids::rfc3339;
use crate::state::AppState;
use crate::store::AuditRow;

#[derive(Serialize)]
struct AuditEntryView {
    id: i64,
    at: String,
    actor_kind: String,
    actor: String,
    actor_jti: Option<String>,
    source: Option<String>,
    action: String,
    target: Option<String>,
    detail: Option<serde_json::Value>,
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

/// `GET /api/v1/audit?actor=&action=&after=&limit=`: entries newest first; `after` is the
/// previous page's `next`.
pub(super) async fn list(
    State(state): State<AppState>,
    _: AdminContext,
    page: Page,
    Query(filter): Query<AuditFilterQuery>,
) -> Result<Json<serde_json::Value>> {
    let action = match filter.action.as_deref().filter(|a| !a.is_empty()) {
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
    let found = state
        .creds
        .audit()
        .query(AuditQuery {
            actor: filter.actor.filter(|a| !a.is_empty()),
            action,
            since_ms: None,
            after,
            limit: Some(limit as u32),
        })
        .await?;
    let entries: Vec<AuditEntryView> = found.entries.into_iter().map(Into::into).collect();
    Ok(Json(serde_json::json!({
        "entries": entries,
        "next": found.next.map(|n| n.to_string()),
    })))
}
