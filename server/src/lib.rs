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

    /// What the server's routes make of the path and query string of a GET to `uri`
    /// (`/ws/{client_id}`, the list endpoints' `?limit=&after=&before=&q=&status=…`): the
    /// status and the JSON body, which holds what the extractors and the handlers' checks
    /// decoded, or the error. `None` when `uri` is no request target, or no route takes
    /// it. The routes' patterns, middleware and extractors are the server's own
    /// (`http::fuzzing`); nothing reaches a store.
    pub fn get_uri(uri: &str) -> Option<(u16, serde_json::Value)> {
        thread_local! {
            static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a current-thread runtime");
        }
        let uri: http::Uri = uri.parse().ok()?;
        RUNTIME.with(|rt| rt.block_on(crate::http::fuzzing::get_uri(uri)))
    }

    /// The label rule (`ids::check_label`).
    pub fn check_label(label: &str) -> Result<(), String> {
        crate::ids::check_label(label)
    }

    /// The labels a hello keeps, and why the others were refused
    /// (`binaries::rollout::check_labels`).
    pub fn check_labels(reported: Vec<String>) -> (Vec<String>, Option<String>) {
        crate::binaries::rollout::check_labels(reported)
    }

    /// The labels an enroll secret gives its agents (`credentials::enroll_labels`).
    pub fn enroll_labels(given: Vec<String>) -> Result<Vec<String>, String> {
        crate::credentials::enroll_labels(given).map_err(|e| e.to_string())
    }

    /// What SQL selects of a job target, once checked (`Target::resolve`).
    #[derive(Debug)]
    pub struct Selection {
        /// These client_ids.
        pub ids: Option<Vec<String>>,
        /// Agents with every one of these labels.
        pub labels: Vec<String>,
        /// Reported os, lowercase.
        pub os: Option<String>,
        /// Reported arch, lowercase.
        pub arch: Option<String>,
    }

    /// Checks a job's target as `POST /api/v1/jobs` does (`hash_key` is the job's name).
    pub fn resolve_target(
        target: &crate::jobs::Target,
        hash_key: &str,
    ) -> Result<Selection, String> {
        target.resolve(hash_key).map(|r| Selection {
            ids: r.selection.ids,
            labels: r.selection.labels,
            os: r.selection.os,
            arch: r.selection.arch,
        })
    }
}

pub use app::Application;
pub use config::Config;
pub use state::AppState;
