//! `Range`, `If-Range` and `If-None-Match` on a download (RFC 9110 §13, §14): any header
//! text and file size. A served part always lies inside the file. Input, one a line: the
//! file size (decimal), then `Range`, `If-Range`, `If-None-Match` and the file's ETag; a
//! header whose line is missing is absent.
#![no_main]

use agent_server::fuzzing::{ByteRange, byte_range, if_range_allows, none_match};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.splitn(5, '\n');
    let Some(size) = lines.next().and_then(|s| s.parse::<u64>().ok()) else {
        return;
    };
    let (range, if_range, if_none_match) = (lines.next(), lines.next(), lines.next());
    let etag = lines.next().unwrap_or("\"abc\"");
    match byte_range(range, size) {
        ByteRange::Part(part) => {
            assert!(part.start() <= part.end(), "{range:?} of {size}: {part:?}");
            assert!(*part.end() < size, "{range:?} of {size}: {part:?}");
        }
        ByteRange::Whole | ByteRange::Unsatisfiable => {}
    }
    let mut headers = http::HeaderMap::new();
    for (name, value) in [
        (http::header::IF_RANGE, if_range),
        (http::header::IF_NONE_MATCH, if_none_match),
    ] {
        if let Some(v) = value.and_then(|v| http::HeaderValue::from_str(v).ok()) {
            headers.insert(name, v);
        }
    }
    let _ = if_range_allows(&headers, etag);
    let _ = none_match(&headers, etag);
});
