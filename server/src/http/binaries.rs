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
//! held in memory, and downloads stream from the file the same way.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};

use super::api::{Access, authorize, bearer, query_params};
use super::error::{ApiError, Result};
use super::{Response, json};
use crate::auth::AuthError;
use crate::binaries::StorageError;
use crate::binaries::storage::is_sha256;
use crate::ids::rfc3339;
use crate::metrics::{DownloadKind, Metrics, UploadOutcome};
use crate::state::AppState;
use crate::store::{BinaryDeletion, BinaryFilter, BinaryInsert, BinaryRow, now_ms};

/// The header a client may send with an upload, and that downloads carry.
pub const CHECKSUM_HEADER: &str = "x-checksum-sha256";

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn limit_param(params: &[(String, String)], default: i64, max: i64) -> Result<i64> {
    match param(params, "limit") {
        None => Ok(default),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                "invalid_limit",
                format!("limit must be a number from 1 to {max}"),
            )),
        },
    }
}

#[derive(Serialize)]
pub struct BinaryView {
    id: String,
    name: String,
    version: String,
    os: String,
    arch: String,
    notes: Option<String>,
    size_bytes: i64,
    sha256: String,
    created_at: String,
    download_url: String,
}

impl BinaryView {
    pub fn new(b: BinaryRow) -> Self {
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
            "invalid_binary",
            format!("{field} must be 1 to {max} characters"),
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || (c.is_ascii() && extra.contains(&(*c as u8)))))
    {
        let allowed: String = extra.iter().map(|b| format!(" '{}'", *b as char)).collect();
        return Err(ApiError::bad_request(
            "invalid_binary",
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
                "invalid_binary",
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
                "invalid_binary",
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
                "invalid_binary",
                format!("notes must be at most {MAX_NOTES} characters"),
            ));
        }
        let header = headers
            .get(CHECKSUM_HEADER)
            .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
        let sha256 =
            header.or_else(|| param(params, "sha256").map(|v| v.trim().to_ascii_lowercase()));
        if let Some(sum) = &sha256
            && !is_sha256(sum)
        {
            return Err(ApiError::bad_request(
                "invalid_checksum",
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
        | ApiError::UnsupportedUpload(_)
        | ApiError::Storage(StorageError::Empty) => UploadOutcome::Invalid,
        _ => UploadOutcome::Failed,
    }
}

/// `POST /api/v1/binaries`.
pub async fn upload(state: &AppState, req: Request<Incoming>) -> Result<Response> {
    let result = receive_upload(state, req).await;
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
async fn precheck(state: &AppState, parts: &http::request::Parts) -> Result<UploadMeta> {
    authorize(state, &parts.headers, Access::Admin)?;
    let params = query_params(parts.uri.query());
    let meta = UploadMeta::parse(&params, &parts.headers)?;
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE)
        && ct
            .to_str()
            .unwrap_or("")
            .to_ascii_lowercase()
            .starts_with("multipart/")
    {
        return Err(ApiError::UnsupportedUpload(
            "send the binary itself as the request body (curl -T FILE -X POST), not a multipart form; metadata goes in the query string".into(),
        ));
    }
    let limit = state.config.fleet.max_binary_bytes;
    let declared = parts
        .headers
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
    Ok(meta)
}

async fn receive_upload(state: &AppState, req: Request<Incoming>) -> Result<Response> {
    let (parts, mut body) = req.into_parts();
    let meta = match precheck(state, &parts).await {
        Ok(meta) => meta,
        Err(e) => {
            // A client that sent `Expect: 100-continue` (curl does for large bodies)
            // has not sent the body and will not; others are still sending it.
            let expects_continue = parts
                .headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            if !expects_continue {
                drain(&mut body).await;
            }
            return Err(e);
        }
    };
    let limit = state.config.fleet.max_binary_bytes;
    let received = match state
        .storage
        .receive(&mut body, limit, meta.sha256.as_deref())
        .await
    {
        Ok(received) => received,
        Err(e) => {
            if matches!(e, StorageError::TooLarge { .. }) {
                drain(&mut body).await;
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
        let _ = state.store.delete_binary(row.id.clone()).await;
        return Err(e.into());
    }
    tracing::info!(
        binary = %row.id, name = %row.name, version = %row.version, os = %row.os, arch = %row.arch,
        size = row.size_bytes, sha256 = %row.sha256, "binary stored"
    );
    let id = row.id.clone();
    let mut resp = json(StatusCode::CREATED, &BinaryView::new(row));
    if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/binaries/{id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// Bytes of a refused upload read and dropped so that the client, still sending, reads
/// our answer instead of a reset connection. Past this the connection is closed.
const DRAIN_BUDGET: usize = 1024 * 1024;

async fn drain(body: &mut Incoming) {
    let mut budget = DRAIN_BUDGET;
    while let Some(Ok(frame)) = body.frame().await {
        let n = frame.data_ref().map_or(0, |d| d.len());
        if n >= budget {
            return;
        }
        budget -= n;
    }
}

fn duplicate(meta: &UploadMeta, existing: &str) -> ApiError {
    ApiError::Conflict {
        code: "binary_exists",
        message: format!(
            "{} {} for {}/{} exists already (id {existing}); delete it first or upload under another version",
            meta.name, meta.version, meta.os, meta.arch
        ),
    }
}

/// `GET /api/v1/binaries?name=&version=&os=&arch=&limit=&before=`, newest first.
pub async fn list(state: &AppState, req: Request<Incoming>) -> Result<Response> {
    authorize(state, req.headers(), Access::Admin)?;
    let params = query_params(req.uri().query());
    let before = match param(&params, "before") {
        None => None,
        Some(cursor) => Some(
            cursor
                .split_once('.')
                .and_then(|(at, id)| Some((at.parse().ok()?, id.to_string())))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_cursor",
                        "before must be a `next` value from a previous page",
                    )
                })?,
        ),
    };
    let filter = BinaryFilter {
        name: param(&params, "name").map(str::to_string),
        version: param(&params, "version").map(str::to_string),
        os: param(&params, "os").map(str::to_lowercase),
        arch: param(&params, "arch").map(str::to_lowercase),
        before,
        limit: limit_param(&params, 100, 500)?,
    };
    let limit = filter.limit;
    let rows = state.store.list_binaries(filter).await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|b| format!("{}.{}", b.created_at, b.id)))
        .flatten();
    let binaries: Vec<BinaryView> = rows.into_iter().map(BinaryView::new).collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"binaries": binaries, "next": next}),
    ))
}

/// Any valid token: agents fetch what an `update` names with their own.
fn any_token(state: &AppState, headers: &HeaderMap) -> Result<()> {
    state
        .tokens
        .verify(bearer(headers).ok_or(AuthError::Missing)?)?;
    Ok(())
}

async fn find(state: &AppState, id: &str) -> Result<BinaryRow> {
    state
        .store
        .get_binary(id.to_string())
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no binary `{id}`")))
}

/// `GET /api/v1/binaries/{id}`.
pub async fn get(state: &AppState, id: &str, req: Request<Incoming>) -> Result<Response> {
    any_token(state, req.headers())?;
    Ok(json(
        StatusCode::OK,
        &BinaryView::new(find(state, id).await?),
    ))
}

/// `DELETE /api/v1/binaries/{id}`: refused while the binary is a rollout's target.
pub async fn delete(state: &AppState, id: &str, req: Request<Incoming>) -> Result<Response> {
    authorize(state, req.headers(), Access::Admin)?;
    match state.store.delete_binary(id.to_string()).await? {
        BinaryDeletion::NotFound => Err(ApiError::NotFound(format!("no binary `{id}`"))),
        BinaryDeletion::RolloutTarget(rollout) => Err(ApiError::Conflict {
            code: "rollout_target",
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
                tracing::warn!(binary = id, error = %e, "binary deleted but its file could not be removed");
            }
            tracing::info!(binary = id, "binary deleted");
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"id": id, "deleted": true}),
            ))
        }
    }
}

/// A byte range to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Span {
    Whole,
    /// Inclusive bounds.
    Part(u64, u64),
    Unsatisfiable,
}

/// One `bytes=` range of RFC 9110. Several ranges, other units and malformed headers are
/// ignored (the whole file is served), as the RFC allows.
fn parse_range(header: Option<&str>, size: u64) -> Span {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Span::Whole;
    };
    if spec.contains(',') {
        return Span::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Span::Whole;
    };
    let num = |s: &str| s.trim().parse::<u64>().ok();
    match (first.trim(), last.trim()) {
        ("", suffix) => match num(suffix) {
            Some(0) => Span::Unsatisfiable,
            Some(_) if size == 0 => Span::Unsatisfiable,
            Some(n) => Span::Part(size.saturating_sub(n), size - 1),
            None => Span::Whole,
        },
        (start, "") => match num(start) {
            Some(s) if s >= size => Span::Unsatisfiable,
            Some(s) => Span::Part(s, size - 1),
            None => Span::Whole,
        },
        (start, end) => match (num(start), num(end)) {
            (Some(s), Some(e)) if s > e => Span::Whole,
            (Some(s), Some(_)) if s >= size => Span::Unsatisfiable,
            (Some(s), Some(e)) => Span::Part(s, e.min(size - 1)),
            _ => Span::Whole,
        },
    }
}

/// Whether an `If-None-Match` / `If-Range` value names `etag` (weak comparison).
fn matches_etag(value: Option<&HeaderValue>, etag: &str) -> bool {
    value.and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == "*" || t == etag)
    })
}

/// `GET|HEAD /api/v1/binaries/{id}/download`: the file, with Content-Length, an ETag
/// (its sha256), X-Checksum-Sha256 and single-range requests.
pub async fn download(state: &AppState, id: &str, req: Request<Incoming>) -> Result<Response> {
    any_token(state, req.headers())?;
    let binary = find(state, id).await?;
    let (mut file, size) = state.storage.open(&binary.sha256).await?;
    let etag = format!("\"{}\"", binary.sha256);
    let headers = req.headers();

    let mut resp = http::Response::new(super::full(""));
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, name: header::HeaderName, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    set(h, header::ETAG, etag.clone());
    set(
        h,
        header::HeaderName::from_static(CHECKSUM_HEADER),
        binary.sha256.clone(),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // A binary's content never changes under its id; only its holders may cache it.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=31536000, immutable"),
    );

    if matches_etag(headers.get(header::IF_NONE_MATCH), &etag) {
        state.metrics.download(DownloadKind::NotModified);
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        return Ok(resp);
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let if_range = headers.get(header::IF_RANGE);
    let span = if if_range.is_some() && !matches_etag(if_range, &etag) {
        Span::Whole
    } else {
        parse_range(range, size)
    };
    let (start, len) = match span {
        Span::Whole => {
            state.metrics.download(DownloadKind::Full);
            (0, size)
        }
        Span::Part(first, last) => {
            state.metrics.download(DownloadKind::Partial);
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            set(
                resp.headers_mut(),
                header::CONTENT_RANGE,
                format!("bytes {first}-{last}/{size}"),
            );
            (first, last - first + 1)
        }
        Span::Unsatisfiable => {
            state.metrics.download(DownloadKind::Unsatisfiable);
            return Err(ApiError::RangeNotSatisfiable { size });
        }
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    set(
        h,
        header::CONTENT_DISPOSITION,
        // Every part was validated to letters, digits and `._+-` at upload.
        format!(
            "attachment; filename=\"{}-{}-{}-{}\"",
            binary.name, binary.version, binary.os, binary.arch
        ),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if req.method() == Method::HEAD {
        return Ok(resp);
    }
    if start > 0 {
        file.seek(io::SeekFrom::Start(start))
            .await
            .map_err(|source| StorageError::Io {
                path: state.storage.dir().to_path_buf(),
                source,
            })?;
    }
    *resp.body_mut() = FileBody::new(file, len, state.metrics.clone()).boxed();
    Ok(resp)
}

/// Chunk size of a download.
const CHUNK: usize = 64 * 1024;

/// Streams `left` bytes of a file, one chunk at a time: a download of any size costs one
/// chunk of memory.
struct FileBody {
    file: tokio::fs::File,
    left: u64,
    buf: BytesMut,
    metrics: Arc<Metrics>,
}

impl FileBody {
    fn new(file: tokio::fs::File, left: u64, metrics: Arc<Metrics>) -> Self {
        FileBody {
            file,
            left,
            buf: BytesMut::new(),
            metrics,
        }
    }
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let want = (CHUNK as u64).min(this.left) as usize;
        this.buf.resize(want, 0);
        let mut read = ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the binary's file is shorter than its recorded size",
                    ))));
                }
                this.buf.truncate(n);
                this.left -= n as u64;
                this.metrics.binary_download_bytes.inc_by(n as u64);
                Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_byte_ranges_follow_rfc_9110() {
        let r = |h: &str| parse_range(Some(h), 100);
        assert_eq!(r("bytes=0-9"), Span::Part(0, 9));
        assert_eq!(r("bytes=90-"), Span::Part(90, 99));
        assert_eq!(r("bytes=-10"), Span::Part(90, 99));
        assert_eq!(r("bytes=-500"), Span::Part(0, 99));
        assert_eq!(r("bytes=50-5000"), Span::Part(50, 99));
        assert_eq!(r("bytes=100-"), Span::Unsatisfiable);
        assert_eq!(r("bytes=100-200"), Span::Unsatisfiable);
        assert_eq!(r("bytes=-0"), Span::Unsatisfiable);
        assert_eq!(r("bytes=9-1"), Span::Whole, "invalid ranges are ignored");
        assert_eq!(
            r("bytes=0-1,5-6"),
            Span::Whole,
            "several ranges: whole file"
        );
        assert_eq!(r("items=0-1"), Span::Whole);
        assert_eq!(parse_range(None, 100), Span::Whole);
        assert_eq!(parse_range(Some("bytes=-5"), 0), Span::Unsatisfiable);
    }

    #[test]
    fn etags_match_weakly_and_by_wildcard() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert!(matches_etag(Some(&v("\"abc\"")), "\"abc\""));
        assert!(matches_etag(Some(&v("W/\"abc\", \"x\"")), "\"abc\""));
        assert!(matches_etag(Some(&v("*")), "\"abc\""));
        assert!(!matches_etag(Some(&v("\"abd\"")), "\"abc\""));
        assert!(!matches_etag(None, "\"abc\""));
    }
}
