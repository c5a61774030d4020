//! agent-server: the server that fleets of host agents keep a WebSocket open to.
//!
//! `ARCHITECTURE.md` at the repository root maps these modules to the design.

pub(crate) mod app;
pub mod audit;
pub mod auth;
pub mod binaries;
pub mod brake;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod error;
pub(crate) mod events;
pub(crate) mod http;
pub mod hub;
pub(crate) mod ids;
pub mod jobs;
pub(crate) mod lifecycle;
pub mod limits;
pub mod metrics;
pub(crate) mod redact;
pub(crate) mod secrets;
pub(crate) mod state;
pub(crate) mod storable;
pub mod store;
pub(crate) mod tasks;
pub mod telemetry;
pub mod ws;

/// Internals that the fuzz targets (`fuzz/`) drive directly; not an API. Thin wrappers, so
/// that the functions themselves stay private to the crate.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use std::ops::RangeInclusive;

    use http::HeaderMap;

    use crate::auth::{AuthError, Claims, Tokens};
    use crate::http::files;

    /// What a download serves of a file, as `http::files::byte_range` decides it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum ByteRange {
        /// The whole file.
        Whole,
        /// These bytes, inclusive (a 206).
        Part(RangeInclusive<u64>),
        /// Outside the file (a 416).
        Unsatisfiable,
    }

    /// The range served for `Range` on a file of `size` bytes (RFC 9110 §14).
    pub fn byte_range(header: Option<&str>, size: u64) -> ByteRange {
        match files::byte_range(header, size) {
            files::ByteRange::Whole => ByteRange::Whole,
            files::ByteRange::Part(part) => ByteRange::Part(part),
            files::ByteRange::Unsatisfiable => ByteRange::Unsatisfiable,
        }
    }

    /// Whether `If-None-Match` names `etag` (RFC 9110 §13.1.2).
    pub fn none_match(headers: &HeaderMap, etag: &str) -> bool {
        files::none_match(headers, etag)
    }

    /// Whether a Range may be honoured under `If-Range` (RFC 9110 §13.1.5).
    pub fn if_range_allows(headers: &HeaderMap, etag: &str) -> bool {
        files::if_range_allows(headers, etag)
    }

    /// The one U+0000 rule for JSON documents; the error names the field.
    pub fn check_json(document: &str, text: &str) -> Result<(), String> {
        crate::storable::check_json(document, text).map_err(|e| e.to_string())
    }

    /// `Tokens::verify` at `now` (seconds since the Unix epoch).
    pub fn verify_at(tokens: &Tokens, token: &str, now: f64) -> Result<Claims, AuthError> {
        tokens.verify_at(token, now)
    }
}

pub use app::Application;
pub use config::Config;
pub use state::AppState;
