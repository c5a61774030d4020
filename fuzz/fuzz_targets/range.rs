//! `Range`, `If-Range` and `If-None-Match` on a download (RFC 9110 §13, §14): any header
//! text and file size. A served part always lies inside the file.
#![no_main]

use agent_server::fuzzing::{ByteRange, byte_range, if_range_allows, none_match};
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    range: Option<String>,
    size: u64,
    if_range: Option<String>,
    if_none_match: Option<String>,
    etag: String,
}

fuzz_target!(|input: Input| {
    match byte_range(input.range.as_deref(), input.size) {
        ByteRange::Part(part) => {
            assert!(part.start() <= part.end(), "{input:?}: {part:?}");
            assert!(*part.end() < input.size, "{input:?}: {part:?}");
        }
        ByteRange::Whole | ByteRange::Unsatisfiable => {}
    }
    let mut headers = http::HeaderMap::new();
    for (name, value) in [
        (http::header::IF_RANGE, &input.if_range),
        (http::header::IF_NONE_MATCH, &input.if_none_match),
    ] {
        if let Some(v) = value.as_deref().and_then(|v| http::HeaderValue::from_str(v).ok()) {
            headers.insert(name, v);
        }
    }
    let _ = if_range_allows(&headers, &input.etag);
    let _ = none_match(&headers, &input.etag);
});
