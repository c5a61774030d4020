//! The web UI's assets, compiled into the binary: `/` (the page) and `/ui/{file}`.

use std::sync::LazyLock;

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};

use super::error::{ApiError, Result};
use super::extract::Id;
use super::files::none_match;
use super::openapi::{BadRequest, NotFound};
use crate::binaries::storage::hex;

/// An asset compiled into the binary.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: LazyLock<String>,
}

macro_rules! asset {
    ($file:literal, $type:literal) => {
        Asset {
            body: include_str!(concat!("../../ui/", $file)),
            content_type: $type,
            etag: LazyLock::new(|| {
                let digest = Sha256::digest(include_str!(concat!("../../ui/", $file)));
                format!("\"{}\"", &hex(&digest)[..16])
            }),
        }
    };
}

static INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");
static APP_JS: Asset = asset!("app.js", "text/javascript; charset=utf-8");
static APP_CSS: Asset = asset!("app.css", "text/css; charset=utf-8");
static FAVICON: Asset = asset!("favicon.svg", "image/svg+xml");

/// The UI's scripts, styles, fetches and images come from this server only; nothing may
/// frame it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// `GET /`: the page.
#[utoipa::path(
    get,
    path = "/",
    operation_id = "ui_page",
    tag = "ui",
    security(()),
    responses(
        (status = 200, description = "The web UI's page", content_type = "text/html", body = String),
        (status = 304, description = "Not modified (`If-None-Match`)"),
    ),
)]
pub(super) async fn index(headers: HeaderMap) -> Result<Response> {
    serve(&INDEX, &headers)
}

/// `GET /ui/{file}`: a script, style sheet or image of the page.
#[utoipa::path(
    get,
    path = "/ui/{file}",
    operation_id = "ui_asset",
    tag = "ui",
    security(()),
    params(
        ("file" = String, Path, description = "`app.js`, `app.css` or `favicon.svg`"),
    ),
    responses(
        (status = 200, description = "The asset", content(
            (String = "text/javascript"),
            (String = "text/css"),
            (String = "image/svg+xml"),
        )),
        (status = 304, description = "Not modified (`If-None-Match`)"),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    ),
)]
pub(super) async fn file(Id(name): Id, headers: HeaderMap) -> Result<Response> {
    let asset = match name.as_str() {
        "app.js" => &APP_JS,
        "app.css" => &APP_CSS,
        "favicon.svg" => &FAVICON,
        other => return Err(ApiError::NotFound(format!("no UI asset `{other}`"))),
    };
    serve(asset, &headers)
}

/// The asset, or a 304 when the browser's copy is current. HEAD gets the same headers
/// (Content-Length included) without the body, from axum.
fn serve(asset: &Asset, headers: &HeaderMap) -> Result<Response> {
    let etag: &str = &asset.etag;
    let mut resp = if none_match(headers, etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    // Revalidated on every load (a cheap 304), so an upgrade is picked up at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Ok(resp)
}
