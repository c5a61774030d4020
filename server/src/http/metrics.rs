//! `GET /metrics` on the metrics listener (METRICS_PORT): the Prometheus registry in the
//! OpenMetrics text format. Kept off the main port so it is never exposed through the
//! ingress.

use axum::extract::State;
use axum::response::IntoResponse;
use http::header;

use crate::state::AppState;

/// The scrape.
pub(super) async fn scrape(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
