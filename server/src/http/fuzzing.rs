//! The path and query parsing of the routes that take user text in their URL, as the
//! fuzz targets drive it: the server's own route patterns, middleware (`refuse_nul`) and
//! extractors ([`ClientId`], [`Id`], [`Page`], [`Query`]) and the checks the handlers run
//! before they reach the store. Each route answers what it decoded, as JSON, or the
//! error every client would get.

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{Request, Uri};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::agents::AgentQuery;
use super::audit::AuditFilterQuery;
use super::error::Result;
use super::extract::{ClientId, Id, Page, Query};
use super::middleware::refuse_nul;
use super::ws::TokenQuery;
use crate::jobs::{ListJobs, ListResults};

/// The routes, with the patterns of `http::router`.
fn router() -> Router {
    Router::new()
        .route(
            "/ws/{client_id}",
            get(
                async |id: std::result::Result<ClientId, super::error::ApiError>,
                       Query(query): Query<TokenQuery>|
                       -> Result<Response> {
                    let ClientId(id) = id?;
                    Ok(axum::Json(json!({"client_id": id, "token": query.token})).into_response())
                },
            ),
        )
        .route(
            "/api/v1/agents",
            get(
                async |page: Page, Query(query): Query<AgentQuery>| -> Result<Response> {
                    let f = query.filter(&page)?;
                    Ok(axum::Json(json!({
                        "online": f.online, "q": f.search, "label": f.label,
                        "after": f.after, "limit": f.limit,
                    }))
                    .into_response())
                },
            ),
        )
        .route(
            "/api/v1/agents/{client_id}/commands",
            get(
                async |ClientId(id): ClientId, page: Page| -> Result<Response> {
                    let limit = page.limit(50, 500)?;
                    let before = page.before()?;
                    Ok(
                        axum::Json(json!({"client_id": id, "limit": limit, "before": before}))
                            .into_response(),
                    )
                },
            ),
        )
        .route(
            "/api/v1/audit",
            get(
                async |page: Page, Query(filter): Query<AuditFilterQuery>| -> Result<Response> {
                    let q = filter.query(&page)?;
                    Ok(axum::Json(json!({
                        "actor": q.actor, "action": q.action.map(|a| a.as_str()),
                        "after": q.after, "limit": q.limit,
                    }))
                    .into_response())
                },
            ),
        )
        .route(
            "/api/v1/jobs",
            get(async |Query(query): Query<ListJobs>| -> Result<Response> {
                let (status, before, limit) = query.parse()?;
                Ok(axum::Json(json!({
                    "status": status.map(|s| s.as_str()), "before": before, "limit": limit,
                }))
                .into_response())
            }),
        )
        .route(
            "/api/v1/jobs/{id}/results",
            get(
                async |Id(id): Id, Query(query): Query<ListResults>| -> Result<Response> {
                    let (status, after, limit) = query.parse()?;
                    Ok(axum::Json(json!({
                        "id": id, "status": status, "after": after, "limit": limit,
                    }))
                    .into_response())
                },
            ),
        )
        .layer(axum::middleware::from_fn(refuse_nul))
}

/// What a GET of `uri` gets: the status and the JSON body (what the route decoded, or the
/// error). `None` when the request has no JSON body (no such route: the real router's
/// fallback answers those).
pub(crate) async fn get_uri(uri: Uri) -> Option<(u16, Value)> {
    let request = Request::get(uri).body(Body::empty()).ok()?;
    let response = router().oneshot(request).await.ok()?;
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .ok()?;
    Some((status, serde_json::from_slice(&bytes).ok()?))
}
