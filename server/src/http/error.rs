//! Every error a request can meet, and the one place that turns them into a status code
//! and a JSON body: `{"error": {"code": …, "message": …}}`. The codes are a public
//! contract, listed by [`ErrorCode`] and in README's API section.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use super::ws::HandshakeRefusal;
use crate::audit::{AuditError, AuditQueryError};
use crate::auth::AuthError;
use crate::binaries::StorageError;
use crate::credentials::{CredentialError, EnrollError};
use crate::error::error_chain;
use crate::limits::TooDeep;
use crate::storable::NulError;
use crate::store::StoreError;

/// Defines [`ErrorCode`] with each variant's wire string and [`ErrorCode::ALL`].
macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $variant:ident => $code:literal,)*) => {
        /// The machine-readable `error.code` of every error response.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum ErrorCode {
            $($(#[doc = $doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code: README's list and the OpenAPI enum are checked against it.
            pub(crate) const ALL: &[ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The code as it appears in responses.
            pub(crate) fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }
        }
    };
}

error_codes! {
    /// A `client_id` (path or body) breaks the id rules.
    InvalidClientId => "invalid_client_id",
    /// `limit` is not a number in the endpoint's range.
    InvalidLimit => "invalid_limit",
    /// `before`/`after` is not a `next` value from a previous page.
    InvalidCursor => "invalid_cursor",
    /// A list filter has a value the endpoint does not know.
    InvalidFilter => "invalid_filter",
    /// The query string cannot be decoded.
    InvalidQuery => "invalid_query",
    /// A path segment (an id) does not decode to UTF-8.
    InvalidPath => "invalid_path",
    /// A command's name, args or TTL is out of bounds.
    InvalidCommand => "invalid_command",
    /// A token's TTL is out of bounds.
    InvalidTtl => "invalid_ttl",
    /// An upload's metadata is missing or malformed.
    InvalidBinary => "invalid_binary",
    /// An upload's checksum is not 64 hex digits.
    InvalidChecksum => "invalid_checksum",
    /// A rollout's settings are out of bounds.
    InvalidRollout => "invalid_rollout",
    /// A string in the body, path or query contains U+0000 (NUL), which is refused on
    /// every backend because PostgreSQL cannot store it.
    NulCharacter => "nul_character",
    /// A token's or enroll secret's `name`, or a label, is empty, too long or has control characters.
    InvalidName => "invalid_name",
    /// An enroll secret's `labels` are too many or invalid.
    InvalidLabels => "invalid_labels",
    /// An enroll secret's `expires_in_seconds` is out of bounds.
    InvalidExpiry => "invalid_expiry",
    /// An enroll secret's `max_uses` is out of bounds.
    InvalidMaxUses => "invalid_max_uses",
    /// An enrollment's `hostname` is empty, too long or has control characters.
    InvalidHostname => "invalid_hostname",
    /// An enrollment's secret is not known to this server.
    UnknownEnrollSecret => "unknown_enroll_secret",
    /// An enrollment's secret has expired.
    EnrollSecretExpired => "enroll_secret_expired",
    /// An enrollment's secret was revoked.
    EnrollSecretRevoked => "enroll_secret_revoked",
    /// An enrollment's secret was used as many times as it allows.
    EnrollSecretUsedUp => "enroll_secret_used_up",
    /// The client id is enrolled already and the secret does not allow re-enrollment.
    AlreadyEnrolled => "already_enrolled",
    /// A job's target has an empty, unknown or malformed field.
    InvalidTarget => "invalid_target",
    /// A job's name, args, TTL, pacing or page parameters are out of bounds.
    InvalidJob => "invalid_job",
    /// A job's target matches no agent; nothing was stored.
    NoAgentsMatch => "no_agents_match",
    /// The job's status does not allow the action (pause, resume, cancel).
    JobState => "job_state",
    /// The body is not JSON (`line`/`column` say where) or not UTF-8.
    InvalidJson => "invalid_json",
    /// The body is empty where a document is required.
    EmptyBody => "empty_body",
    /// The connection failed while the body was read.
    BodyReadFailed => "body_read_failed",
    /// The body is larger than the endpoint accepts.
    PayloadTooLarge => "payload_too_large",
    /// The body's Content-Type is not one the endpoint accepts.
    UnsupportedMediaType => "unsupported_media_type",
    /// No valid credential.
    Unauthorized => "unauthorized",
    /// A valid credential without the right to this.
    Forbidden => "forbidden",
    /// No such route or resource.
    NotFound => "not_found",
    /// The route exists, not with this method (`Allow` lists the methods).
    MethodNotAllowed => "method_not_allowed",
    /// An upload with the same name, version, os and arch exists.
    BinaryExists => "binary_exists",
    /// The binary is the target of an active or paused rollout.
    RolloutTarget => "rollout_target",
    /// Another rollout for the same os/arch started at the same moment.
    RolloutConflict => "rollout_conflict",
    /// The rollout's status does not allow the action (pause, resume).
    RolloutState => "rollout_state",
    /// The upload's content does not match its checksum.
    ChecksumMismatch => "checksum_mismatch",
    /// The upload ended before its declared length.
    UploadIncomplete => "upload_incomplete",
    /// The binary storage volume is full.
    InsufficientStorage => "insufficient_storage",
    /// The binary's file is missing from the storage volume.
    BinaryFileMissing => "binary_file_missing",
    /// The binary storage volume failed.
    StorageError => "storage_error",
    /// The requested byte range is outside the file.
    RangeNotSatisfiable => "range_not_satisfiable",
    /// Too many failed sign-ins; `Retry-After` says when to try again.
    TooManyRequests => "too_many_requests",
    /// The web UI's sign-in has no admin password configured.
    SignInDisabled => "sign_in_disabled",
    /// The admin password is wrong.
    WrongPassword => "wrong_password",
    /// This replica serves its maximum of event streams.
    TooManyStreams => "too_many_streams",
    /// The replica is shutting down; retry to reach another.
    Draining => "draining",
    /// `/ws/{client_id}` was requested without a valid WebSocket opening handshake (the
    /// message says which rule, and the status is RFC 6455's or RFC 9110's: 400 or 426).
    NotWebsocket => "not_websocket",
    /// The database does not answer; retry shortly.
    StoreUnavailable => "store_unavailable",
    /// A server fault; the log has it under the request id.
    Internal => "internal",
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// A parameter or body field is invalid; the code says which kind.
    #[error("{message}")]
    BadRequest {
        /// Which rule was broken.
        code: ErrorCode,
        /// What to change.
        message: String,
    },
    /// The body is not valid JSON.
    #[error("invalid JSON at line {line}, column {column}: {message}")]
    InvalidJson {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// serde_json's description, without its position suffix.
        message: String,
    },
    /// The body exceeds `limit` bytes.
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The endpoint's limit, in bytes.
        limit: usize,
    },
    /// No valid token or session.
    #[error("{0}")]
    Unauthorized(#[from] AuthError),
    /// A valid credential without the right to this.
    #[error("{0}")]
    Forbidden(String),
    /// No such route or resource.
    #[error("{0}")]
    NotFound(String),
    /// The route does not accept this method; axum adds the `Allow` header.
    #[error("method not allowed; the Allow header lists the methods this route accepts")]
    MethodNotAllowed,
    /// The body's Content-Type is not accepted.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The resource exists already or is in use.
    #[error("{message}")]
    Conflict {
        /// Which conflict.
        code: ErrorCode,
        /// What to do about it.
        message: String,
    },
    /// Well-formed, but nothing to act on (RFC 9110 §15.5.21).
    #[error("{message}")]
    Unprocessable {
        /// Why.
        code: ErrorCode,
        /// What to change.
        message: String,
    },
    /// Binary storage refused or failed.
    #[error("{0}")]
    Storage(#[from] StorageError),
    /// A Range outside a file of `size` bytes.
    #[error("the requested range is outside the {size} bytes of this file")]
    RangeNotSatisfiable {
        /// The file's size, in bytes.
        size: u64,
    },
    /// Rate limited for `retry_after` seconds.
    #[error("{message}")]
    TooManyRequests {
        /// What happened.
        message: String,
        /// Seconds until a retry may succeed.
        retry_after: u64,
    },
    /// An enrollment refused for its secret (unknown, expired, revoked, used up).
    #[error("{message}")]
    EnrollRefused {
        /// Which refusal.
        code: ErrorCode,
        /// What to do about it.
        message: String,
    },
    /// The web UI's sign-in is off.
    #[error("sign-in is disabled: set ADMIN_PASSWORD (the same on every replica) to enable it")]
    SignInDisabled,
    /// The admin password is wrong.
    #[error("wrong password")]
    WrongPassword,
    /// This replica serves `limit` event streams already.
    #[error("this replica already serves {limit} event streams; retry shortly")]
    TooManyStreams {
        /// Streams per replica.
        limit: usize,
    },
    /// The replica is shutting down.
    #[error("this server is shutting down; retry and you will reach another replica")]
    Draining,
    /// A request to `/ws/{client_id}` without a valid WebSocket opening handshake.
    #[error("{0}")]
    Handshake(#[from] HandshakeRefusal),
    /// The database does not answer, or not in time.
    #[error("the database is unavailable ({}); retry shortly", .0.outage())]
    StoreUnavailable(#[source] StoreError),
    /// A server fault.
    #[error("internal error; the server log has the details under this request's id")]
    Internal(#[source] StoreError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            e if e.is_unavailable() => ApiError::StoreUnavailable(e),
            other => ApiError::Internal(other),
        }
    }
}

impl From<TooDeep> for ApiError {
    fn from(e: TooDeep) -> Self {
        ApiError::bad_request(ErrorCode::InvalidJson, e.to_string())
    }
}

impl From<NulError> for ApiError {
    fn from(e: NulError) -> Self {
        ApiError::bad_request(ErrorCode::NulCharacter, e.to_string())
    }
}

/// The code of a credentials request's invalid `field`.
fn field_code(field: &str) -> ErrorCode {
    match field {
        "client_id" => ErrorCode::InvalidClientId,
        "ttl_seconds" => ErrorCode::InvalidTtl,
        "limit" => ErrorCode::InvalidLimit,
        "name" | "label" => ErrorCode::InvalidName,
        "labels" => ErrorCode::InvalidLabels,
        "expires_in_seconds" => ErrorCode::InvalidExpiry,
        "max_uses" => ErrorCode::InvalidMaxUses,
        "hostname" => ErrorCode::InvalidHostname,
        _ => ErrorCode::InvalidQuery,
    }
}

impl From<CredentialError> for ApiError {
    fn from(e: CredentialError) -> Self {
        match e {
            CredentialError::Auth(e) => ApiError::Unauthorized(e),
            CredentialError::Invalid { field, message } => {
                ApiError::bad_request(field_code(field), message)
            }
            e @ CredentialError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            CredentialError::Store(e) => e.into(),
        }
    }
}

impl From<EnrollError> for ApiError {
    fn from(e: EnrollError) -> Self {
        let message = e.to_string();
        let refused = |code| ApiError::EnrollRefused {
            code,
            message: message.clone(),
        };
        match e {
            EnrollError::UnknownSecret => refused(ErrorCode::UnknownEnrollSecret),
            EnrollError::Expired => refused(ErrorCode::EnrollSecretExpired),
            EnrollError::Revoked => refused(ErrorCode::EnrollSecretRevoked),
            EnrollError::UsedUp => refused(ErrorCode::EnrollSecretUsedUp),
            EnrollError::AlreadyEnrolled { .. } => ApiError::Conflict {
                code: ErrorCode::AlreadyEnrolled,
                message,
            },
            EnrollError::Invalid { field, message } => {
                ApiError::bad_request(field_code(field), message)
            }
            EnrollError::RateLimited { retry_after_secs } => ApiError::TooManyRequests {
                message,
                retry_after: retry_after_secs,
            },
            EnrollError::Store(e) => e.into(),
        }
    }
}

impl From<AuditError> for ApiError {
    fn from(e: AuditError) -> Self {
        match e {
            AuditError::Query(e @ AuditQueryError::Limit) => {
                ApiError::bad_request(ErrorCode::InvalidLimit, e.to_string())
            }
            AuditError::Store(e) => e.into(),
        }
    }
}

impl From<serde_json::Error> for ApiError {
    fn from(e: serde_json::Error) -> Self {
        let message = e.to_string();
        // serde_json appends " at line L column C"; we report them as fields instead.
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_string();
        ApiError::InvalidJson {
            line: e.line(),
            column: e.column(),
            message,
        }
    }
}

impl ApiError {
    /// A 400 with `code` and a message saying what to change.
    pub(crate) fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The status (RFC 9110's meaning for each kind of failure) and the `error.code`.
    pub(crate) fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        use ErrorCode as C;
        use StatusCode as S;
        match self {
            ApiError::BadRequest { code, .. } => (S::BAD_REQUEST, *code),
            ApiError::Conflict { code, .. } => (S::CONFLICT, *code),
            ApiError::Unprocessable { code, .. } => (S::UNPROCESSABLE_ENTITY, *code),
            ApiError::InvalidJson { .. } => (S::BAD_REQUEST, C::InvalidJson),
            ApiError::Handshake(refusal) => (refusal.status(), C::NotWebsocket),
            ApiError::PayloadTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, C::PayloadTooLarge),
            ApiError::Unauthorized(_) => (S::UNAUTHORIZED, C::Unauthorized),
            ApiError::WrongPassword => (S::UNAUTHORIZED, C::WrongPassword),
            ApiError::EnrollRefused { code, .. } => (S::UNAUTHORIZED, *code),
            ApiError::Forbidden(_) => (S::FORBIDDEN, C::Forbidden),
            ApiError::SignInDisabled => (S::FORBIDDEN, C::SignInDisabled),
            ApiError::NotFound(_) => (S::NOT_FOUND, C::NotFound),
            ApiError::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, C::MethodNotAllowed),
            ApiError::UnsupportedMediaType(_) => {
                (S::UNSUPPORTED_MEDIA_TYPE, C::UnsupportedMediaType)
            }
            ApiError::Storage(e) => match e {
                StorageError::TooLarge { .. } => (S::PAYLOAD_TOO_LARGE, C::PayloadTooLarge),
                StorageError::Empty => (S::BAD_REQUEST, C::EmptyBody),
                StorageError::ChecksumMismatch { .. } => (S::BAD_REQUEST, C::ChecksumMismatch),
                StorageError::Incomplete(_) => (S::BAD_REQUEST, C::UploadIncomplete),
                StorageError::Full { .. } => (S::INSUFFICIENT_STORAGE, C::InsufficientStorage),
                // A replica-local fault: another replica (or this one, once its volume
                // is mounted right) can serve the file.
                StorageError::Missing { .. } => (S::SERVICE_UNAVAILABLE, C::BinaryFileMissing),
                StorageError::Io { .. } => (S::INTERNAL_SERVER_ERROR, C::StorageError),
            },
            ApiError::RangeNotSatisfiable { .. } => {
                (S::RANGE_NOT_SATISFIABLE, C::RangeNotSatisfiable)
            }
            ApiError::TooManyRequests { .. } => (S::TOO_MANY_REQUESTS, C::TooManyRequests),
            ApiError::TooManyStreams { .. } => (S::SERVICE_UNAVAILABLE, C::TooManyStreams),
            ApiError::Draining => (S::SERVICE_UNAVAILABLE, C::Draining),
            ApiError::StoreUnavailable(_) => (S::SERVICE_UNAVAILABLE, C::StoreUnavailable),
            ApiError::Internal(_) => (S::INTERNAL_SERVER_ERROR, C::Internal),
        }
    }
}

impl IntoResponse for ApiError {
    /// The response; server-side failures are logged here, once, with their source chain.
    fn into_response(self) -> Response {
        match &self {
            ApiError::StoreUnavailable(e) | ApiError::Internal(e) => {
                tracing::error!(error = %error_chain(e), "request failed");
            }
            // A missing file is logged by `Storage::open`, once per file.
            ApiError::Storage(e @ (StorageError::Io { .. } | StorageError::Full { .. })) => {
                tracing::error!(error = %error_chain(e), "binary storage failed");
            }
            _ => {}
        }
        let (status, code) = self.status_and_code();
        let mut body = serde_json::json!({
            "error": {"code": code.as_str(), "message": self.to_string()}
        });
        if let ApiError::InvalidJson { line, column, .. } = &self {
            body["error"]["line"] = (*line).into();
            body["error"]["column"] = (*column).into();
        }
        let mut resp = (status, Json(body)).into_response();
        let headers = resp.headers_mut();
        match &self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Draining
            | ApiError::StoreUnavailable(_)
            | ApiError::TooManyStreams { .. }
            | ApiError::Storage(StorageError::Missing { .. }) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            }
            ApiError::TooManyRequests { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            ApiError::Handshake(refusal) => {
                for (name, value) in refusal.headers() {
                    headers.insert(name, value);
                }
            }
            ApiError::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        resp
    }
}

/// What every handler returns.
pub(crate) type Result<T, E = ApiError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_is_listed_in_the_readme() {
        let readme = include_str!("../../../README.md");
        for code in ErrorCode::ALL.iter().copied() {
            assert!(
                readme.contains(&format!("`{}`", code.as_str())),
                "README's API section lacks `{}`",
                code.as_str()
            );
        }
    }
}
