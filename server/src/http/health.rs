//! Liveness (`/health`, `/healthz`) and readiness (`/readiness`, `/readyz`).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use http::StatusCode;
use serde_json::json;

use crate::config::human;
use crate::error::error_chain;
use crate::state::AppState;

/// 200 while the process serves requests: liveness must not depend on anything else, or
/// a database outage would restart every pod.
pub(super) async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// How long readiness waits for the database before calling it down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long readiness waits for Redis. Shorter than the probe's own timeout (the chart's
/// is 3 s) with the database check beside it: Redis is only reported, so a cut link to it
/// must not make the probe itself time out.
const REDIS_CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// 200 when the database answers and the process is not draining; else 503 with a reason
/// per dependency. Both dependencies are checked at once.
pub(super) async fn readiness(State(state): State<AppState>) -> impl IntoResponse {
    let draining = state.lifecycle.is_draining();
    let backend = state.store.backend_name();
    let database = async {
        match tokio::time::timeout(CHECK_TIMEOUT, state.store.ping()).await {
            Ok(Ok(())) => json!({"ok": true, "backend": backend}),
            Ok(Err(e)) => json!({"ok": false, "backend": backend, "error": error_chain(&e)}),
            Err(_) => {
                json!({"ok": false, "backend": backend, "error": format!("no answer within {}", human(CHECK_TIMEOUT))})
            }
        }
    };
    // Redis is reported but not required: a Redis blip must not pull every replica out
    // of the load balancer while their agents and the database are fine.
    let redis = async {
        match state.hub.cluster() {
            None => serde_json::Value::Null,
            Some(cluster) => {
                match tokio::time::timeout(REDIS_CHECK_TIMEOUT, cluster.ping()).await {
                    Ok(Ok(())) => json!({"ok": true, "required": false}),
                    Ok(Err(e)) => json!({"ok": false, "required": false, "error": e}),
                    Err(_) => json!({
                        "ok": false,
                        "required": false,
                        "error": format!("no answer within {}", human(REDIS_CHECK_TIMEOUT)),
                    }),
                }
            }
        }
    };
    let (database, redis) = tokio::join!(database, redis);
    let ready = !draining && database["ok"] == true;
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
        Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "pod": state.config.pod_id,
            "checks": {
                "draining": {"ok": !draining},
                "database": database,
                "redis": redis,
            }
        })),
    )
}
