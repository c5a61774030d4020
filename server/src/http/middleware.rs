//! What every request goes through: a request id (the caller's when sane, else a fresh
//! one), a tracing span, the access log and the request metrics, all labelled by the
//! matched route template so label values stay bounded.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, Uri};
use tracing::Instrument;

use super::error::ApiError;
use crate::metrics::{HttpLabels, Metrics, RouteLabels};
use crate::storable::NulError;

/// The route label of requests that matched no route.
const UNMATCHED: &str = "unmatched";

/// Request id, span, access log and metrics for one request.
pub(crate) async fn observe(
    State(metrics): State<Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route: String = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, |m| m.as_str())
        .to_string();
    let request_id = request_id(req.headers());
    // The path only: the query string may carry a token and is never logged.
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", id = %request_id, method = %method, route = %route);

    let mut resp = next.run(req).instrument(span.clone()).await;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }

    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method: method_label(&method),
            route: route.clone(),
            status,
        })
        .inc();
    metrics
        .http_duration
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(elapsed.as_secs_f64());
    span.in_scope(|| {
        let ms = elapsed.as_secs_f64() * 1000.0;
        // Probes and scrapes arrive every few seconds: debug level.
        if matches!(
            route.as_str(),
            "/health" | "/healthz" | "/readiness" | "/readyz" | "/metrics"
        ) {
            tracing::debug!(status, ms, path, "request");
        } else {
            tracing::info!(status, ms, path, "request");
        }
    });
    resp
}

/// Refuses, on every route, a request whose path or query string decodes to text with
/// U+0000 (`%00`): path parameters and query values reach the store, and PostgreSQL cannot
/// hold NUL while SQLite can (see `storable`). A 400 `nul_character` naming the parameter.
pub(crate) async fn refuse_nul(req: Request, next: Next) -> Response {
    match uri_storable(req.uri()) {
        Ok(()) => next.run(req).await,
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn uri_storable(uri: &Uri) -> Result<(), NulError> {
    // `%00` is the only way to spell U+0000 in a URI: raw control bytes are refused by
    // the HTTP parser.
    if uri.path().contains("%00") {
        return Err(NulError {
            field: "the path (as %00)".into(),
        });
    }
    for pair in uri.query().unwrap_or("").split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key.contains("%00") || value.contains("%00") {
            return Err(NulError {
                field: format!("query parameter `{key}`"),
            });
        }
    }
    Ok(())
}

/// The caller's `x-request-id` when it is sane, else a fresh one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_from_callers_are_kept_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(
            "x-request-id",
            HeaderValue::from_static("bad id with spaces"),
        );
        assert_ne!(request_id(&h), "bad id with spaces");
    }

    #[test]
    fn percent_encoded_nul_is_refused_in_path_and_query() {
        let check = |u: &str| uri_storable(&u.parse().unwrap()).map_err(|e| e.field);
        assert_eq!(check("/api/v1/agents?q=web&limit=5"), Ok(()));
        assert_eq!(
            check("/api/v1/agents?q=%2500"),
            Ok(()),
            "an encoded percent sign"
        );
        assert_eq!(
            check("/api/v1/agents?limit=5&q=web%00"),
            Err("query parameter `q`".into())
        );
        assert_eq!(
            check("/api/v1/commands/a%00b"),
            Err("the path (as %00)".into())
        );
    }
}
