//! Liveness (`/health`, `/healthz`) and readiness (`/readiness`, `/readyz`).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use http::StatusCode;
use serde::Serialize;

use crate::config::human;
use crate::error::error_chain;
use crate::state::AppState;

/// Liveness.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// Readiness, with a check per dependency.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Readiness {
    /// `ready` or `not_ready`.
    status: &'static str,
    /// The replica that answered.
    pod: String,
    checks: ReadinessChecks,
}

/// What readiness looked at.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ReadinessChecks {
    /// Not ok once SIGTERM arrived.
    draining: DrainingCheck,
    database: DatabaseCheck,
    /// Null without Redis (the embedded default); never required.
    redis: Option<RedisCheck>,
}

/// Whether the replica is draining.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct DrainingCheck {
    ok: bool,
}

/// Whether the database answers within 2 s.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct DatabaseCheck {
    ok: bool,
    /// `postgres` or `sqlite`.
    backend: &'static str,
    /// Why not, when not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Whether Redis answers within 500 ms (cluster mode).
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct RedisCheck {
    ok: bool,
    /// Always false: a Redis outage never fails readiness.
    required: bool,
    /// Why not, when not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// 200 while the process serves requests: liveness must not depend on anything else, or
/// a database outage would restart every pod.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "probes",
    security(()),
    responses((status = 200, description = "The process serves requests", body = Health)),
)]
pub(super) async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// `/healthz`: [`health`] under the name Kubernetes probes often use.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "probes",
    security(()),
    responses((status = 200, description = "The process serves requests", body = Health)),
)]
pub(super) async fn healthz() -> Json<Health> {
    health().await
}

/// How long readiness waits for the database before calling it down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long readiness waits for Redis. Shorter than the probe's own timeout (the chart's
/// is 3 s) with the database check beside it: Redis is only reported, so a cut link to it
/// must not make the probe itself time out.
const REDIS_CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// 200 when the database answers and the process is not draining; else 503 with a reason
/// per dependency. Both dependencies are checked at once.
#[utoipa::path(
    get,
    path = "/readiness",
    operation_id = "readiness",
    tag = "probes",
    security(()),
    responses(
        (status = 200, description = "Ready: the database answers and the replica is not draining", body = Readiness),
        (status = 503, description = "Not ready; `checks` says why", body = Readiness),
    ),
)]
pub(super) async fn readiness(State(state): State<AppState>) -> impl IntoResponse {
    let draining = state.lifecycle.is_draining();
    let backend = state.store.backend_name();
    let database = async {
        match tokio::time::timeout(CHECK_TIMEOUT, state.store.ping()).await {
            Ok(Ok(())) => DatabaseCheck {
                ok: true,
                backend,
                error: None,
            },
            Ok(Err(e)) => DatabaseCheck {
                ok: false,
                backend,
                error: Some(error_chain(&e)),
            },
            Err(_) => DatabaseCheck {
                ok: false,
                backend,
                error: Some(format!("no answer within {}", human(CHECK_TIMEOUT))),
            },
        }
    };
    // Redis is reported but not required: a Redis blip must not pull every replica out
    // of the load balancer while their agents and the database are fine.
    let redis = async {
        match state.hub.cluster() {
            None => None,
            Some(cluster) => Some(
                match tokio::time::timeout(REDIS_CHECK_TIMEOUT, cluster.ping()).await {
                    Ok(Ok(())) => RedisCheck {
                        ok: true,
                        required: false,
                        error: None,
                    },
                    Ok(Err(e)) => RedisCheck {
                        ok: false,
                        required: false,
                        error: Some(e),
                    },
                    Err(_) => RedisCheck {
                        ok: false,
                        required: false,
                        error: Some(format!("no answer within {}", human(REDIS_CHECK_TIMEOUT))),
                    },
                },
            ),
        }
    };
    let (database, redis) = tokio::join!(database, redis);
    let ready = !draining && database.ok;
    if let (true, Some(cluster)) = (ready, state.hub.cluster()) {
        // The load balancer routes here from now on: the count may count.
        cluster.mark_routable();
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            status: if ready { "ready" } else { "not_ready" },
            pod: state.config.pod_id.clone(),
            checks: ReadinessChecks {
                draining: DrainingCheck { ok: !draining },
                database,
                redis,
            },
        }),
    )
}

/// `/readyz`: [`readiness`] under the name Kubernetes probes often use.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "probes",
    security(()),
    responses(
        (status = 200, description = "Ready: the database answers and the replica is not draining", body = Readiness),
        (status = 503, description = "Not ready; `checks` says why", body = Readiness),
    ),
)]
pub(super) async fn readyz(state: State<AppState>) -> impl IntoResponse {
    readiness(state).await
}
