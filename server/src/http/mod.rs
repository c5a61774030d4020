//! HTTP: the accept loop (hyper), the route table (axum) and one file per resource. Only
//! this module knows status codes.

mod agents;
mod assets;
mod audit;
mod binaries;
mod commands;
mod enroll;
pub(crate) mod error;
mod events;
pub(crate) mod extract;
pub(crate) mod files;
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzzing;
mod health;
mod inventory;
mod jobs;
mod metrics;
mod middleware;
pub(crate) mod openapi;
mod pods;
mod rollouts;
mod session;
pub(crate) mod tls;
mod tokens;
mod ws;

use std::time::Duration;

use axum::Router;
use axum::routing::{delete, get, post};
use http::{HeaderValue, Method, header};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::state::AppState;
use error::ApiError;

/// The route table of the main listener. Paths match exactly: a trailing slash is
/// another path, so `/api/v1/agents/` is a 404 like every unknown path. Every GET route
/// answers HEAD; a known path with another method is a 405 with `Allow`.
pub(crate) fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/v1/agents", get(agents::list))
        .route(
            "/api/v1/agents/{client_id}",
            get(agents::get).delete(agents::delete),
        )
        .route(
            "/api/v1/agents/{client_id}/commands",
            get(commands::list).post(commands::create),
        )
        .route(
            "/api/v1/agents/{client_id}/inventory",
            get(inventory::get).post(inventory::put),
        )
        .route("/api/v1/commands/{id}", get(commands::get))
        .route("/api/v1/agents/{client_id}/revoke", post(agents::revoke))
        .route("/api/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/api/v1/tokens/{id}", delete(tokens::revoke))
        .route(
            "/api/v1/enroll-secrets",
            get(enroll::list).post(enroll::create),
        )
        .route("/api/v1/enroll-secrets/{id}", delete(enroll::revoke))
        .route("/api/v1/enroll", post(enroll::enroll))
        .route("/api/v1/audit", get(audit::list))
        .route(
            "/api/v1/session",
            get(session::get)
                .post(session::sign_in)
                .delete(session::sign_out),
        )
        .route("/api/v1/events", get(events::stream))
        .route(
            "/api/v1/binaries",
            get(binaries::list).post(binaries::upload),
        )
        .route(
            "/api/v1/binaries/{id}",
            get(binaries::get).delete(binaries::delete),
        )
        .route("/api/v1/binaries/{id}/download", get(binaries::download))
        .route(
            "/api/v1/rollouts",
            get(rollouts::list).post(rollouts::create),
        )
        .route(
            "/api/v1/rollouts/{id}",
            get(rollouts::get).delete(rollouts::cancel),
        )
        .route("/api/v1/rollouts/{id}/pause", post(rollouts::pause))
        .route("/api/v1/rollouts/{id}/resume", post(rollouts::resume))
        .route("/api/v1/jobs", get(jobs::list).post(jobs::create))
        .route("/api/v1/jobs/{id}", get(jobs::get))
        .route("/api/v1/jobs/{id}/results", get(jobs::results))
        .route("/api/v1/jobs/{id}/pause", post(jobs::pause))
        .route("/api/v1/jobs/{id}/resume", post(jobs::resume))
        .route("/api/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/v1/pods", get(pods::list))
        .route("/api/v1/openapi.json", get(openapi::document))
        // Before the layer, so that OPTIONS preflights reach CORS through the fallback.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(cors(&state.config.public_origin));
    Router::new()
        .route("/", get(assets::index))
        .route("/ui/{file}", get(assets::file))
        .route("/health", get(health::health))
        .route("/healthz", get(health::healthz))
        .route("/readiness", get(health::readiness))
        .route("/readyz", get(health::readyz))
        .route("/ws/{client_id}", get(ws::upgrade))
        .method_not_allowed_fallback(method_not_allowed)
        .merge(api)
        .fallback(not_found)
        .layer(axum::middleware::from_fn(middleware::refuse_nul))
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            middleware::observe,
        ))
        .with_state(state)
}

/// The route table of the metrics listener (METRICS_PORT).
pub(crate) fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics::scrape))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// CORS for `/api`: only SERVER_URL's origin may call it from a browser. A preflight
/// from another origin gets no `Access-Control-Allow-Origin`, which browsers refuse.
/// tower-http answers every OPTIONS on these routes as a preflight (200).
fn cors(public_origin: &str) -> CorsLayer {
    let public = public_origin.to_string();
    let origin = AllowOrigin::predicate(move |origin: &HeaderValue, _| {
        origin
            .to_str()
            .is_ok_and(|o| o.eq_ignore_ascii_case(&public))
    });
    CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([Method::GET, Method::HEAD, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([header::HeaderName::from_static("x-request-id")])
        .max_age(Duration::from_secs(600))
}

async fn not_found(uri: http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

/// A 405, or for OPTIONS (without CORS headers, so not a preflight) a 204: both carry the
/// `Allow` header axum adds.
async fn method_not_allowed(method: Method) -> axum::response::Response {
    use axum::response::IntoResponse;
    if method == Method::OPTIONS {
        return http::StatusCode::NO_CONTENT.into_response();
    }
    ApiError::MethodNotAllowed.into_response()
}

/// Accepts connections until `stop` is cancelled, then asks every open connection to
/// finish its in-flight request and close, and hands back their tracker so the caller can
/// wait for them. An upgraded (WebSocket) connection leaves this tracking the moment it
/// upgrades; sessions are tracked by the lifecycle's own `TaskTracker`.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) -> TaskTracker {
    serve_with_tls(listener, router, header_timeout, None, stop).await
}

/// [`serve`], with TLS when `tls` is given: each connection's handshake runs in its own
/// task, bounded by `header_timeout` like the request headers (slowloris), so a slow or
/// silent client never holds up the accept loop.
pub(crate) async fn serve_with_tls(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) -> TaskTracker {
    let connections = TaskTracker::new();
    let mut spare = SpareDescriptor::open();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) if out_of_descriptors(&e) => {
                spare.shed(&listener).await;
                continue;
            }
            Err(e) => {
                // Back off instead of spinning; such failures are transient (ENOBUFS,
                // ENOMEM, a connection reset while queued).
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let stop = stop.clone();
        match tls.clone() {
            None => {
                connections.spawn(serve_connection(stream, peer, router, header_timeout, stop));
            }
            Some(acceptor) => {
                connections.spawn(async move {
                    let handshake = tokio::select! {
                        _ = stop.cancelled() => return,
                        done = tokio::time::timeout(header_timeout, acceptor.accept(stream)) => done,
                    };
                    match handshake {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, router, header_timeout, stop).await;
                        }
                        // Plain HTTP on the TLS port, a client that distrusts us, a scan.
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(%peer, timeout = ?header_timeout, "TLS handshake timed out");
                        }
                    }
                });
            }
        }
    }
    connections.close();
    connections
}

/// Whether `accept` failed because the process (EMFILE) or the system (ENFILE) has no
/// file descriptor left.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A file descriptor held in reserve for the moment the process has none left.
///
/// Without a descriptor the kernel keeps completed connections in the listen backlog,
/// their requests unread. A client waits there until its connect timeout, gives up and
/// connects elsewhere; when descriptors free up, its abandoned upgrade is accepted after
/// all and takes over as the agent's newest connection, closing the live one with 4001
/// (replaced). So the spare is closed, the waiting connection accepted and closed at
/// once (its unread request makes the kernel reset it): the client fails fast and tries
/// another replica, and the backlog holds no stale requests. The same trick as libuv's
/// and nginx's reserve descriptor.
struct SpareDescriptor {
    file: Option<std::fs::File>,
    /// Connections closed since the last warning, and when that was.
    shed: u64,
    warned: Option<std::time::Instant>,
}

/// At most one warning per interval while connections are being shed.
const SHED_WARNING_INTERVAL: Duration = Duration::from_secs(10);

impl SpareDescriptor {
    fn open() -> Self {
        SpareDescriptor {
            file: std::fs::File::open("/dev/null").ok(),
            shed: 0,
            warned: None,
        }
    }

    /// Closes one waiting connection (using the spare descriptor for it), then takes the
    /// spare back; without a spare, waits briefly for sessions to free descriptors.
    async fn shed(&mut self, listener: &TcpListener) {
        if self.file.take().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.file = std::fs::File::open("/dev/null").ok();
            return;
        }
        // The connection that failed to be accepted is still queued: this takes it.
        if let Ok(Ok((stream, _))) =
            tokio::time::timeout(Duration::from_millis(100), listener.accept()).await
        {
            drop(stream);
            self.shed += 1;
        }
        self.file = std::fs::File::open("/dev/null").ok();
        let due = self
            .warned
            .is_none_or(|at| at.elapsed() >= SHED_WARNING_INTERVAL);
        if due && self.shed > 0 {
            tracing::warn!(
                closed = self.shed,
                "out of file descriptors: closing new connections at once so that their clients try another replica; raise the open-files limit (LimitNOFILE, ulimit -n) or add replicas"
            );
            self.shed = 0;
            self.warned = Some(std::time::Instant::now());
        }
    }
}

/// One HTTP/1.1 connection, with upgrades, until it ends or `stop` asks it to finish.
async fn serve_connection<I>(
    io: I,
    peer: std::net::SocketAddr,
    router: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The peer's address, for the audit log's source and the enrollment rate limit
    // (`extract::RequestContext`).
    let service = TowerToHyperService::new(tower::ServiceExt::map_request(
        router,
        move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            req
        },
    ));
    let conn = http1::Builder::new()
        // Without a timer hyper ignores the header timeout (slowloris).
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
