//! `/api/v1/binaries`: upload, list, metadata, download (with ranges) and delete.
//!
//! An upload is the raw binary as the request body, its metadata in the query string:
//!
//! ```text
//! curl -T agent -X POST -H "X-Checksum-Sha256: $(sha256sum agent | cut -c1-64)" \
//!   -H "Authorization: Bearer $ADMIN" \
//!   "$URL/api/v1/binaries?name=agent&version=2.5.0&os=linux&arch=x86_64&notes=fixes"
//! ```
//!
//! The body streams to the storage volume (see `binaries/storage.rs`); nothing of it is
//! held in memory, and downloads stream from the file the same way (`files.rs`).

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorCode, Result};
use super::extract::{Admin, AdminContext, Id, Page, Principal, Query, discard};
use super::files::{ByteRange, byte_range, file_body, if_range_allows, none_match, set};
use super::openapi::{
    BadRequest, BinaryFile, Conflict, Forbidden, InsufficientStorage, NotFound, PayloadTooLarge,
    RangeNotSatisfiable, Unauthorized, Unavailable, UnsupportedMediaType,
};
use crate::audit::{AuditAction, AuditEvent};
use crate::binaries::StorageError;
use crate::binaries::storage::is_sha256;
use crate::ids::rfc3339;
use crate::metrics::{DownloadKind, UploadOutcome};
use crate::state::AppState;
use crate::store::{BinaryDeletion, BinaryFilter, BinaryInsert, BinaryRow, now_ms};

/// The header a client may send with an upload, and that downloads carry.
pub(crate) const CHECKSUM_HEADER: &str = "x-checksum-sha256";

/// A query parameter, if present and not empty.
fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    given(params, key).filter(|v| !v.is_empty())
}

/// The first value of `key`, empty or not.
fn given<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A stored binary's metadata.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Binary)]
pub(super) struct BinaryView {
    id: String,
    name: String,
    version: String,
    /// Lower case, like `arch`.
    os: String,
    arch: String,
    notes: Option<String>,
    size_bytes: i64,
    /// 64 lower-case hex digits; also the download's ETag.
    sha256: String,
    /// RFC 3339 UTC.
    created_at: String,
    /// Where the file is (any valid token).
    download_url: String,
}

/// A page of binaries, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct BinaryList {
    binaries: Vec<BinaryView>,
    /// The `before` of the next page; null on the last page.
    next: Option<String>,
}

/// A deleted binary.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct BinaryDeleted {
    id: String,
    /// Always true.
    deleted: bool,
}

impl BinaryView {
    fn new(b: BinaryRow) -> Self {
        BinaryView {
            download_url: format!("/api/v1/binaries/{}/download", b.id),
            created_at: rfc3339(b.created_at),
            id: b.id,
            name: b.name,
            version: b.version,
            os: b.os,
            arch: b.arch,
            notes: b.notes,
            size_bytes: b.size_bytes,
            sha256: b.sha256,
        }
    }
}

/// The metadata of an upload, validated.
struct UploadMeta {
    name: String,
    version: String,
    os: String,
    arch: String,
    notes: Option<String>,
    sha256: Option<String>,
}

const UPLOAD_PARAMS: [&str; 6] = ["name", "version", "os", "arch", "notes", "sha256"];
const MAX_NOTES: usize = 2000;

fn check(field: &'static str, value: &str, max: usize, extra: &[u8]) -> Result<()> {
    if value.is_empty() || value.len() > max {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidBinary,
            format!("{field} must be 1 to {max} characters"),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || (c.is_ascii() && extra.contains(&(*c as u8)))))
    {
        let allowed: String = extra.iter().map(|b| format!(" '{}'", *b as char)).collect();
        return Err(ApiError::bad_request(
            ErrorCode::InvalidBinary,
            format!("{field} may contain only letters, digits and{allowed} (found {bad:?})"),
        ));
    }
    Ok(())
}

impl UploadMeta {
    fn parse(params: &[(String, String)], headers: &HeaderMap) -> Result<Self> {
        if let Some((unknown, _)) = params
            .iter()
            .find(|(k, _)| !UPLOAD_PARAMS.contains(&k.as_str()))
        {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidBinary,
                format!(
                    "unknown query parameter `{unknown}`; an upload takes {}",
                    UPLOAD_PARAMS.join(", ")
                ),
            ));
        }
        let missing: Vec<&str> = ["name", "version", "os", "arch"]
            .into_iter()
            .filter(|k| param(params, k).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidBinary,
                format!(
                    "missing {} in the query string, e.g. POST /api/v1/binaries?name=agent&version=2.5.0&os=linux&arch=x86_64 with the file as the body",
                    missing.join(", ")
                ),
            ));
        }
        let get = |k| param(params, k).unwrap_or_default().trim().to_string();
        let (name, version) = (get("name"), get("version"));
        let (os, arch) = (get("os").to_lowercase(), get("arch").to_lowercase());
        check("name", &name, 64, b"._-")?;
        check("version", &version, 64, b"._+-")?;
        check("os", &os, 32, b"_")?;
        check("arch", &arch, 32, b"_")?;
        let notes = param(params, "notes").map(str::to_string);
        if notes
            .as_ref()
            .is_some_and(|n| n.chars().count() > MAX_NOTES)
        {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidBinary,
                format!("notes must be at most {MAX_NOTES} characters"),
            ));
        }
        let header = headers
            .get(CHECKSUM_HEADER)
            .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
        // Present but empty is refused, not taken as absent: `sha256=$(…)` whose command
        // failed must not upload unchecked.
        let sha256 = header.or_else(|| given(params, "sha256").map(str::to_ascii_lowercase));
        if let Some(sum) = &sha256
            && !is_sha256(sum)
        {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidChecksum,
                "the checksum (X-Checksum-Sha256 or sha256=) must be 64 hex digits, as `sha256sum` prints",
            ));
        }
        Ok(UploadMeta {
            name,
            version,
            os,
            arch,
            notes,
            sha256,
        })
    }
}

fn upload_outcome(e: &ApiError) -> UploadOutcome {
    match e {
        ApiError::Storage(StorageError::TooLarge { .. }) | ApiError::PayloadTooLarge { .. } => {
            UploadOutcome::TooLarge
        }
        ApiError::Storage(StorageError::ChecksumMismatch { .. }) => UploadOutcome::ChecksumMismatch,
        ApiError::Storage(StorageError::Full { .. }) => UploadOutcome::StorageFull,
        ApiError::Storage(StorageError::Incomplete(_)) => UploadOutcome::Incomplete,
        ApiError::Conflict { .. } => UploadOutcome::Duplicate,
        ApiError::BadRequest { .. }
        | ApiError::Unauthorized(_)
        | ApiError::Forbidden(_)
        | ApiError::UnsupportedMediaType(_)
        | ApiError::Storage(StorageError::Empty) => UploadOutcome::Invalid,
        _ => UploadOutcome::Failed,
    }
}

/// `POST /api/v1/binaries?name=&version=&os=&arch=&notes=&sha256=` with the file as
/// the body: 201 with its metadata once it is on the volume.
#[utoipa::path(
    post,
    path = "/api/v1/binaries",
    operation_id = "upload_binary",
    tag = "binaries",
    params(
        ("name" = String, Query, pattern = r"^[A-Za-z0-9._-]{1,64}$", description = "Letters, digits, `.`, `_`, `-`; 1 to 64"),
        ("version" = String, Query, pattern = r"^[A-Za-z0-9._+-]{1,64}$", description = "Letters, digits, `.`, `_`, `+`, `-`; 1 to 64"),
        ("os" = String, Query, pattern = r"^[A-Za-z0-9_]{1,32}$", description = "Letters, digits, `_`; 1 to 32 (e.g. linux; folded to lower case)"),
        ("arch" = String, Query, pattern = r"^[A-Za-z0-9_]{1,32}$", description = "Letters, digits, `_`; 1 to 32 (e.g. x86_64; folded to lower case)"),
        ("notes" = Option<String>, Query, max_length = 2000, description = "At most 2000 characters"),
        ("sha256" = Option<String>, Query, pattern = r"^[0-9A-Fa-f]{64}$", description = "64 hex digits, as `sha256sum` prints (or the X-Checksum-Sha256 header); the upload is refused when the content does not match"),
    ),
    request_body(content = BinaryFile, description = "The file itself (not a multipart form), at most MAX_BINARY_BYTES", content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored on the volume", body = BinaryView, headers(("Location" = String, description = "The binary's URL"))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 409, response = Conflict),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 503, response = Unavailable),
        (status = 507, response = InsufficientStorage),
    ),
)]
pub(super) async fn upload(
    State(state): State<AppState>,
    principal: std::result::Result<AdminContext, ApiError>,
    Query(params): Query<Vec<(String, String)>>,
    req: Request,
) -> Result<Response> {
    let result = receive_upload(&state, principal, params, req).await;
    match &result {
        Ok(_) => state.metrics.upload(UploadOutcome::Stored),
        Err(e) => {
            let outcome = upload_outcome(e);
            state.metrics.upload(outcome);
            // Server-side failures are logged once, as errors, by `ApiError::into_response`.
            if !matches!(outcome, UploadOutcome::StorageFull | UploadOutcome::Failed) {
                tracing::info!(error = %e, "binary upload refused");
            }
        }
    }
    result
}

/// Everything that can be refused before the body is read.
async fn precheck(
    state: &AppState,
    principal: std::result::Result<AdminContext, ApiError>,
    params: &[(String, String)],
    headers: &HeaderMap,
) -> Result<(UploadMeta, crate::audit::RequestContext)> {
    let AdminContext(ctx) = principal?;
    let meta = UploadMeta::parse(params, headers)?;
    if let Some(ct) = headers.get(header::CONTENT_TYPE)
        && ct
            .to_str()
            .unwrap_or("")
            .to_ascii_lowercase()
            .starts_with("multipart/")
    {
        return Err(ApiError::UnsupportedMediaType(
            "send the binary itself as the request body (curl -T FILE -X POST), not a multipart form; metadata goes in the query string".into(),
        ));
    }
    let limit = state.config.releases.max_binary_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared {
        if n > limit {
            return Err(StorageError::TooLarge { limit }.into());
        }
        state.storage.check_room(n).await?;
    }
    if let Some(existing) = state
        .store
        .find_binary(
            meta.name.clone(),
            meta.version.clone(),
            meta.os.clone(),
            meta.arch.clone(),
        )
        .await?
    {
        return Err(duplicate(&meta, &existing));
    }
    Ok((meta, ctx))
}

/// Bytes of a refused upload read and dropped so that the client, still sending, reads
/// our answer instead of a reset connection. Past this the connection is closed.
const DRAIN_BUDGET: usize = 1024 * 1024;

async fn receive_upload(
    state: &AppState,
    principal: std::result::Result<AdminContext, ApiError>,
    params: Vec<(String, String)>,
    req: Request,
) -> Result<Response> {
    let (parts, mut body) = req.into_parts();
    let (meta, ctx) = match precheck(state, principal, &params, &parts.headers).await {
        Ok(checked) => checked,
        Err(e) => {
            // A client that sent `Expect: 100-continue` (curl does for large bodies)
            // has not sent the body and will not; others are still sending it.
            let expects_continue = parts
                .headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            if !expects_continue {
                discard(&mut body, DRAIN_BUDGET).await;
            }
            return Err(e);
        }
    };
    let limit = state.config.releases.max_binary_bytes;
    let received = match state
        .storage
        .receive(&mut body, limit, meta.sha256.as_deref())
        .await
    {
        Ok(received) => received,
        Err(e) => {
            if matches!(e, StorageError::TooLarge { .. }) {
                discard(&mut body, DRAIN_BUDGET).await;
            }
            return Err(e.into());
        }
    };
    let row = BinaryRow {
        id: uuid::Uuid::now_v7().to_string(),
        name: meta.name.clone(),
        version: meta.version.clone(),
        os: meta.os.clone(),
        arch: meta.arch.clone(),
        notes: meta.notes.clone(),
        size_bytes: received.size as i64,
        sha256: received.sha256.clone(),
        created_at: now_ms(),
    };
    // The row first, then the rename: a concurrent delete of another binary with the
    // same content sees this row and leaves the file alone.
    if let BinaryInsert::Duplicate(existing) = state.store.insert_binary(row.clone()).await? {
        return Err(duplicate(&meta, &existing));
    }
    if let Err(e) = state.storage.commit(received).await {
        if let Err(undo) = state.store.delete_binary(row.id.clone()).await {
            tracing::error!(binary = %row.id, error = %crate::error::error_chain(&undo), "could not remove the row of a binary whose file was not stored");
        }
        return Err(e.into());
    }
    tracing::info!(
        binary = %row.id, name = %row.name, version = %row.version, os = %row.os, arch = %row.arch,
        size = row.size_bytes, sha256 = %row.sha256, "binary stored"
    );
    state
        .creds
        .audit()
        .record_or_log(
            AuditEvent::now(&ctx, AuditAction::BinaryUploaded, &row.id).with_detail(
                serde_json::json!({
                    "name": row.name, "version": row.version, "os": row.os,
                    "arch": row.arch, "sha256": row.sha256,
                }),
            ),
        )
        .await;
    let location = format!("/api/v1/binaries/{}", row.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(BinaryView::new(row)),
    )
        .into_response())
}

fn duplicate(meta: &UploadMeta, existing: &str) -> ApiError {
    ApiError::Conflict {
        code: ErrorCode::BinaryExists,
        message: format!(
            "{} {} for {}/{} exists already (id {existing}); delete it first or upload under another version",
            meta.name, meta.version, meta.os, meta.arch
        ),
    }
}

/// The filters of the binary list.
#[derive(Deserialize)]
pub(super) struct BinaryQuery {
    name: Option<String>,
    version: Option<String>,
    os: Option<String>,
    arch: Option<String>,
}

/// `GET /api/v1/binaries?name=&version=&os=&arch=&limit=&before=`, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/binaries",
    operation_id = "list_binaries",
    tag = "binaries",
    params(
        ("name" = Option<String>, Query, description = "Exact name"),
        ("version" = Option<String>, Query, description = "Exact version"),
        ("os" = Option<String>, Query, description = "Exact os"),
        ("arch" = Option<String>, Query, description = "Exact arch"),
        ("limit" = Option<String>, Query, pattern = r"^(0*([1-9][0-9]?|[1-4][0-9]{2}|500))?$", description = "Page size (default 100; 1 to 500; empty: the default)"),
        ("before" = Option<String>, Query, description = "The `next` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of binaries, newest first", body = BinaryList),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn list(
    State(state): State<AppState>,
    _: Admin,
    page: Page,
    Query(query): Query<BinaryQuery>,
) -> Result<Json<BinaryList>> {
    let given = |v: Option<String>| v.filter(|v| !v.is_empty());
    let limit = page.limit(100, 500)?;
    let filter = BinaryFilter {
        name: given(query.name),
        version: given(query.version),
        os: given(query.os).map(|v| v.to_lowercase()),
        arch: given(query.arch).map(|v| v.to_lowercase()),
        before: page.before()?,
        limit,
    };
    let rows = state.store.list_binaries(filter).await?;
    let next = Page::next(
        rows.len(),
        limit,
        rows.last().map(|b| format!("{}.{}", b.created_at, b.id)),
    );
    Ok(Json(BinaryList {
        binaries: rows.into_iter().map(BinaryView::new).collect(),
        next,
    }))
}

async fn find(state: &AppState, id: &str) -> Result<BinaryRow> {
    state
        .store
        .get_binary(id.to_string())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no binary `{id}`")))
}

/// `GET /api/v1/binaries/{id}`: any valid token, since agents fetch what an `update`
/// names with their own.
#[utoipa::path(
    get,
    path = "/api/v1/binaries/{id}",
    operation_id = "get_binary",
    tag = "binaries",
    params(
        ("id" = String, Path, description = "The binary's id"),
    ),
    responses(
        (status = 200, description = "The binary's metadata", body = BinaryView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn get(
    State(state): State<AppState>,
    Id(id): Id,
    _: Principal,
) -> Result<Json<BinaryView>> {
    Ok(Json(BinaryView::new(find(&state, &id).await?)))
}

/// `DELETE /api/v1/binaries/{id}`: refused while the binary is a rollout's target.
#[utoipa::path(
    delete,
    path = "/api/v1/binaries/{id}",
    operation_id = "delete_binary",
    tag = "binaries",
    params(
        ("id" = String, Path, description = "The binary's id"),
    ),
    responses(
        (status = 200, description = "Deleted", body = BinaryDeleted),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn delete(
    State(state): State<AppState>,
    Id(id): Id,
    AdminContext(ctx): AdminContext,
) -> Result<Json<BinaryDeleted>> {
    match state.store.delete_binary(id.clone()).await? {
        BinaryDeletion::NotFound => Err(ApiError::NotFound(format!("no binary `{id}`"))),
        BinaryDeletion::RolloutTarget(rollout) => Err(ApiError::Conflict {
            code: ErrorCode::RolloutTarget,
            message: format!(
                "binary `{id}` is the target of active rollout `{rollout}`; cancel it (DELETE /api/v1/rollouts/{rollout}) or roll out another binary first"
            ),
        }),
        BinaryDeletion::Deleted {
            sha256,
            file_shared,
        } => {
            if !file_shared && let Err(e) = state.storage.remove(&sha256).await {
                // The metadata is gone, which is what matters to clients; the file is
                // an orphan an operator can remove.
                tracing::warn!(binary = %id, error = %e, "binary deleted but its file could not be removed");
            }
            tracing::info!(binary = %id, "binary deleted");
            state
                .creds
                .audit()
                .record_or_log(AuditEvent::now(&ctx, AuditAction::BinaryDeleted, &id))
                .await;
            Ok(Json(BinaryDeleted { id, deleted: true }))
        }
    }
}

/// `GET|HEAD /api/v1/binaries/{id}/download`: the file, with Content-Length, an ETag
/// (its sha256), X-Checksum-Sha256 and single-range requests. Any valid token.
#[utoipa::path(
    get,
    path = "/api/v1/binaries/{id}/download",
    operation_id = "download_binary",
    tag = "binaries",
    params(
        ("id" = String, Path, description = "The binary's id"),
    ),
    responses(
        (status = 200, description = "The file, with `ETag` (its sha256), `X-Checksum-Sha256` and `Accept-Ranges: bytes`", content_type = "application/octet-stream", body = BinaryFile),
        (status = 206, description = "The one requested range (`Range`, honouring a strong `If-Range`)", content_type = "application/octet-stream", body = BinaryFile),
        (status = 304, description = "Not modified (`If-None-Match`)"),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 416, response = RangeNotSatisfiable),
        (status = 503, response = Unavailable),
    ),
)]
pub(super) async fn download(
    State(state): State<AppState>,
    Id(id): Id,
    _: Principal,
    method: Method,
    headers: HeaderMap,
) -> Result<Response> {
    let binary = find(&state, &id).await?;
    let (file, size) = state.storage.open(&binary.sha256).await?;
    let etag = format!("\"{}\"", binary.sha256);
    let head = method == Method::HEAD;
    // HEAD transfers nothing, so it is not counted as a download.
    let count = |kind| {
        if !head {
            state.metrics.download(kind);
        }
    };

    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    set(h, header::ETAG, &etag);
    set(
        h,
        header::HeaderName::from_static(CHECKSUM_HEADER),
        &binary.sha256,
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // A binary's content never changes under its id; only its holders may cache it.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=31536000, immutable"),
    );
    if none_match(&headers, &etag) {
        count(DownloadKind::NotModified);
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        return Ok(resp);
    }
    let range = if if_range_allows(&headers, &etag) {
        byte_range(
            headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
            size,
        )
    } else {
        ByteRange::Whole
    };
    let (start, len) = match range {
        ByteRange::Whole => {
            count(DownloadKind::Full);
            (0, size)
        }
        ByteRange::Part(r) => {
            count(DownloadKind::Partial);
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let (first, last) = (*r.start(), *r.end());
            set(
                resp.headers_mut(),
                header::CONTENT_RANGE,
                &format!("bytes {first}-{last}/{size}"),
            );
            (first, last - first + 1)
        }
        ByteRange::Unsatisfiable => {
            count(DownloadKind::Unsatisfiable);
            return Err(ApiError::RangeNotSatisfiable { size });
        }
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // Every part was validated to letters, digits and `._+-` at upload.
    set(
        h,
        header::CONTENT_DISPOSITION,
        &format!(
            "attachment; filename=\"{}-{}-{}-{}\"",
            binary.name, binary.version, binary.os, binary.arch
        ),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if head {
        return Ok(resp);
    }
    let metrics = state.metrics.clone();
    *resp.body_mut() = file_body(file, start, len, move |n| {
        metrics.binary_download_bytes.inc_by(n as u64);
    })
    .await
    .map_err(|source| StorageError::Io {
        path: state.storage.dir().to_path_buf(),
        source,
    })?;
    Ok(resp)
}
