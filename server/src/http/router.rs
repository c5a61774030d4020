//! Routing, request ids, CORS, access logs and request metrics: everything every request
//! goes through.

use std::convert::Infallible;
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use hyper::body::Incoming;
use tracing::Instrument;

use super::error::ApiError;
use super::fleet::FleetRoute;
use super::{Response, api, health};
use crate::metrics::{HttpLabels, RouteLabels};
use crate::state::AppState;

/// A matched route. Path parameters are raw segments; handlers validate them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    Readiness,
    Metrics,
    Ws(String),
    Agents,
    Agent(String),
    AgentCommands(String),
    AgentInventory(String),
    Command(String),
    Tokens,
    /// The web UI, binaries and rollouts (`http/fleet.rs`).
    Fleet(FleetRoute),
    NotFound,
}

impl Route {
    pub fn parse(path: &str) -> Route {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match segments.as_slice() {
            ["health"] | ["healthz"] => Route::Health,
            ["readiness"] | ["readyz"] => Route::Readiness,
            ["metrics"] => Route::Metrics,
            ["ws", id] => Route::Ws(id.to_string()),
            ["api", "v1", "agents"] => Route::Agents,
            ["api", "v1", "agents", id] => Route::Agent(id.to_string()),
            ["api", "v1", "agents", id, "commands"] => Route::AgentCommands(id.to_string()),
            ["api", "v1", "agents", id, "inventory"] => Route::AgentInventory(id.to_string()),
            ["api", "v1", "commands", id] => Route::Command(id.to_string()),
            ["api", "v1", "tokens"] => Route::Tokens,
            other => FleetRoute::parse(other).map_or(Route::NotFound, Route::Fleet),
        }
    }

    /// The route's template: the `route` label of metrics and logs.
    pub fn template(&self) -> &'static str {
        match self {
            Route::Health => "/health",
            Route::Readiness => "/readiness",
            Route::Metrics => "/metrics",
            Route::Ws(_) => "/ws/{client_id}",
            Route::Agents => "/api/v1/agents",
            Route::Agent(_) => "/api/v1/agents/{id}",
            Route::AgentCommands(_) => "/api/v1/agents/{id}/commands",
            Route::AgentInventory(_) => "/api/v1/agents/{id}/inventory",
            Route::Command(_) => "/api/v1/commands/{id}",
            Route::Tokens => "/api/v1/tokens",
            Route::Fleet(r) => r.template(),
            Route::NotFound => "unmatched",
        }
    }

    fn allowed(&self) -> &'static [Method] {
        match self {
            Route::Health
            | Route::Readiness
            | Route::Metrics
            | Route::Ws(_)
            | Route::Agents
            | Route::Command(_) => &[Method::GET],
            Route::Agent(_) => &[Method::GET, Method::DELETE],
            Route::AgentCommands(_) | Route::AgentInventory(_) => &[Method::GET, Method::POST],
            Route::Tokens => &[Method::POST],
            Route::Fleet(r) => r.allowed(),
            Route::NotFound => &[],
        }
    }

    fn is_api(&self) -> bool {
        self.template().starts_with("/api/")
    }

    /// Probes and scrapes are logged at debug level: they arrive every few seconds.
    fn is_noisy(&self) -> bool {
        matches!(self, Route::Health | Route::Readiness | Route::Metrics)
    }
}

pub async fn handle(state: AppState, req: Request<Incoming>) -> Result<Response, Infallible> {
    let started = Instant::now();
    let route = Route::parse(req.uri().path());
    let method = req.method().clone();
    let request_id = request_id(req.headers());
    let origin = req.headers().get(header::ORIGIN).cloned();
    // The path only: the query string may carry a token and is never logged.
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", id = %request_id, method = %method, route = route.template());

    let mut resp = async {
        let result = if method == Method::OPTIONS && route.is_api() {
            preflight(&state, origin.as_ref())
        } else {
            dispatch(&state, &route, req).await
        };
        result.unwrap_or_else(ApiError::into_response)
    }
    .instrument(span.clone())
    .await;

    if route.is_api() {
        allow_origin(&state, origin.as_ref(), resp.headers_mut());
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }

    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method: method_label(&method),
            route: route.template(),
            status,
        })
        .inc();
    state
        .metrics
        .http_duration
        .get_or_create(&RouteLabels {
            route: route.template(),
        })
        .observe(elapsed.as_secs_f64());
    span.in_scope(|| {
        let ms = elapsed.as_secs_f64() * 1000.0;
        if route.is_noisy() {
            tracing::debug!(status, ms, path, "request");
        } else {
            tracing::info!(status, ms, path, "request");
        }
    });
    Ok(resp)
}

async fn dispatch(
    state: &AppState,
    route: &Route,
    req: Request<Incoming>,
) -> Result<Response, ApiError> {
    let m = req.method().clone();
    // The web UI's session cookie stands in for a bearer token on API routes.
    let req = if route.is_api() {
        super::ui::session_auth(state, req).await?
    } else {
        req
    };
    match route {
        Route::Health if m == Method::GET || m == Method::HEAD => Ok(health::health()),
        Route::Readiness if m == Method::GET || m == Method::HEAD => {
            Ok(health::readiness(state).await)
        }
        Route::Metrics if m == Method::GET => Ok(health::metrics(state)),
        Route::Ws(id) if m == Method::GET => crate::ws::upgrade(state, id, req).await,
        Route::Agents if m == Method::GET => api::list_agents(state, req).await,
        Route::Agent(id) if m == Method::GET => api::get_agent(state, id, req).await,
        Route::Agent(id) if m == Method::DELETE => api::delete_agent(state, id, req).await,
        Route::AgentCommands(id) if m == Method::POST => api::create_command(state, id, req).await,
        Route::AgentCommands(id) if m == Method::GET => {
            api::list_agent_commands(state, id, req).await
        }
        Route::AgentInventory(id) if m == Method::POST => api::put_inventory(state, id, req).await,
        Route::AgentInventory(id) if m == Method::GET => api::get_inventory(state, id, req).await,
        Route::Command(id) if m == Method::GET => api::get_command(state, id, req).await,
        Route::Tokens if m == Method::POST => api::create_token(state, req).await,
        Route::Fleet(r) => r.dispatch(state, req).await,
        Route::NotFound => Err(ApiError::NotFound(format!(
            "no route for {}",
            req.uri().path()
        ))),
        other => Err(ApiError::MethodNotAllowed {
            allowed: other.allowed(),
        }),
    }
}

/// CORS preflight for `/api`: only SERVER_URL's origin is allowed.
fn preflight(state: &AppState, origin: Option<&HeaderValue>) -> Result<Response, ApiError> {
    if !origin_allowed(state, origin) {
        return Err(ApiError::Forbidden(format!(
            "cross-origin requests are allowed from {} only (SERVER_URL)",
            state.config.public_origin
        )));
    }
    let mut resp = http::Response::new(super::full(""));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, x-request-id"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    Ok(resp)
}

fn allow_origin(state: &AppState, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    if let (true, Some(origin)) = (origin_allowed(state, origin), origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-request-id"),
        );
    }
}

pub fn origin_allowed(state: &AppState, origin: Option<&HeaderValue>) -> bool {
    origin
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| o.eq_ignore_ascii_case(&state.config.public_origin))
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
    fn paths_map_to_routes() {
        assert_eq!(Route::parse("/ws/host-1"), Route::Ws("host-1".into()));
        assert_eq!(
            Route::parse("/api/v1/agents/a/commands"),
            Route::AgentCommands("a".into())
        );
        assert_eq!(Route::parse("/api/v1/agents/"), Route::Agent("".into()));
        assert_eq!(Route::parse("/api/v2/agents"), Route::NotFound);
        assert_eq!(Route::parse("/ws/a/b"), Route::NotFound);
    }

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
}
