//! Serving a file over HTTP (RFC 9110): entity-tag comparison for `If-None-Match` and
//! `If-Range`, single byte ranges (parsed by `http-range-header`) and a body streamed
//! from the file in fixed chunks, so a download of any size costs one chunk of memory.

use std::io;
use std::ops::RangeInclusive;

use axum::body::Body;
use futures_util::TryStreamExt;
use http::{HeaderMap, HeaderValue, header};
use http_range_header::RangeUnsatisfiableError;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

/// Chunk size of a download.
const CHUNK: usize = 64 * 1024;

/// What to send of a file of known size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ByteRange {
    /// The whole file (no Range, an ignored one, or If-Range did not match).
    Whole,
    /// These bytes, inclusive: a 206.
    Part(RangeInclusive<u64>),
    /// A Range outside the file: a 416.
    Unsatisfiable,
}

/// The range to serve for `Range` on a file of `size` bytes. Several ranges, other
/// units and malformed headers are ignored (the whole file is served), as RFC 9110
/// §14.2 allows; a suffix longer than the file is the whole file (§14.1.3).
pub(crate) fn byte_range(header: Option<&str>, size: u64) -> ByteRange {
    let Some(value) = header else {
        return ByteRange::Whole;
    };
    let parsed = match http_range_header::parse_range_header(value.trim()) {
        Ok(parsed) => parsed,
        Err(RangeUnsatisfiableError::ZeroSuffix) => return ByteRange::Unsatisfiable,
        Err(_) => return ByteRange::Whole,
    };
    let [range] = parsed.ranges.as_slice() else {
        return ByteRange::Whole;
    };
    use http_range_header::{EndPosition, StartPosition};
    match (range.start, range.end) {
        // first > last makes the range invalid, so the header is ignored.
        (StartPosition::Index(first), EndPosition::Index(last)) if first > last => {
            return ByteRange::Whole;
        }
        // An empty file has no byte to serve: every range is unsatisfiable (RFC 9110
        // §14.1.1, first-pos at or past the length).
        _ if size == 0 => return ByteRange::Unsatisfiable,
        (StartPosition::FromLast(n), _) if n >= size => return ByteRange::Part(0..=size - 1),
        _ => {}
    }
    match parsed.validate(size) {
        Ok(mut ranges) => ranges.pop().map_or(ByteRange::Whole, ByteRange::Part),
        Err(_) => ByteRange::Unsatisfiable,
    }
}

/// Whether `If-None-Match` names `etag` by weak comparison, or is `*` (RFC 9110 §13.1.2).
pub(crate) fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == etag.trim_start_matches("W/"))
}

/// Whether a Range may be honoured under `If-Range` (RFC 9110 §13.1.5): without the
/// header, yes; with it, only if it is an entity tag that matches `etag` by strong
/// comparison (neither weak). A date or `*` never matches: we send no Last-Modified,
/// and `*` is not a valid If-Range.
pub(crate) fn if_range_allows(headers: &HeaderMap, etag: &str) -> bool {
    match headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(value) => {
            let value = value.trim();
            !value.starts_with("W/") && !etag.starts_with("W/") && value == etag
        }
    }
}

/// A body of `len` bytes of `file` from `start`, read in chunks; `on_chunk` sees the
/// size of each chunk sent (for metrics).
pub(crate) async fn file_body(
    mut file: tokio::fs::File,
    start: u64,
    len: u64,
    on_chunk: impl Fn(usize) + Send + Sync + 'static,
) -> io::Result<Body> {
    if start > 0 {
        file.seek(io::SeekFrom::Start(start)).await?;
    }
    let stream = ReaderStream::with_capacity(file.take(len), CHUNK).inspect_ok(move |chunk| {
        on_chunk(chunk.len());
    });
    Ok(Body::from_stream(stream))
}

/// Inserts a header whose value we built; values that cannot be headers are skipped.
pub(crate) fn set(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_byte_ranges_follow_rfc_9110() {
        let r = |h: &str| byte_range(Some(h), 100);
        assert_eq!(r("bytes=0-9"), ByteRange::Part(0..=9));
        assert_eq!(r("bytes=90-"), ByteRange::Part(90..=99));
        assert_eq!(r("bytes=-10"), ByteRange::Part(90..=99));
        assert_eq!(r("bytes=-500"), ByteRange::Part(0..=99));
        assert_eq!(r("bytes=50-5000"), ByteRange::Part(50..=99));
        assert_eq!(r("bytes=100-"), ByteRange::Unsatisfiable);
        assert_eq!(r("bytes=100-200"), ByteRange::Unsatisfiable);
        assert_eq!(r("bytes=-0"), ByteRange::Unsatisfiable);
        assert_eq!(
            r("bytes=9-1"),
            ByteRange::Whole,
            "invalid ranges are ignored"
        );
        assert_eq!(
            r("bytes=0-1,5-6"),
            ByteRange::Whole,
            "several ranges: whole file"
        );
        assert_eq!(r("items=0-1"), ByteRange::Whole);
        assert_eq!(byte_range(None, 100), ByteRange::Whole);
        assert_eq!(byte_range(Some("bytes=-5"), 0), ByteRange::Unsatisfiable);
        // Found by the `range` fuzz target: byte 0 of an empty file was served.
        assert_eq!(byte_range(Some("bytes=0-9"), 0), ByteRange::Unsatisfiable);
        assert_eq!(byte_range(Some("bytes=0-"), 0), ByteRange::Unsatisfiable);
    }

    fn headers(name: header::HeaderName, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn if_none_match_compares_weakly_and_takes_a_wildcard() {
        let m = |v| none_match(&headers(header::IF_NONE_MATCH, v), "\"abc\"");
        assert!(m("\"abc\""));
        assert!(m("W/\"abc\", \"x\""));
        assert!(m("*"));
        assert!(!m("\"abd\""));
        assert!(!none_match(&HeaderMap::new(), "\"abc\""));
    }

    #[test]
    fn if_range_compares_strongly_and_refuses_wildcards_and_dates() {
        let allows = |v| if_range_allows(&headers(header::IF_RANGE, v), "\"abc\"");
        assert!(allows("\"abc\""));
        assert!(!allows("W/\"abc\""), "weak tags never match");
        assert!(!allows("*"), "`*` is not a valid If-Range");
        assert!(!allows("Sat, 29 Oct 1994 19:43:31 GMT"));
        assert!(!allows("\"abd\""));
        assert!(if_range_allows(&HeaderMap::new(), "\"abc\""));
    }
}
