//! Error helpers shared by every layer: below `http/` (which maps errors to responses)
//! and below the background jobs (which only log them).

/// `error: cause: cause`, for one log line per failure.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
