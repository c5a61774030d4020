//! Every error a request can meet, and the one place that turns them into a status code
//! and a JSON body: `{"error": {"code": …, "message": …}}`. The codes are a public
//! contract, listed by [`ErrorCode`] and in README's API section.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::auth::AuthError;
use crate::binaries::StorageError;
use crate::error::error_chain;
use crate::store::StoreError;

/// The machine-readable `error.code` of every error response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// A `client_id` (path or body) breaks the id rules.
    InvalidClientId,
    /// `limit` is not a number in the endpoint's range.
    InvalidLimit,
    /// `before`/`after` is not a `next` value from a previous page.
    InvalidCursor,
    /// A list filter has a value the endpoint does not know.
    InvalidFilter,
    /// The query string cannot be decoded.
    InvalidQuery,
    /// A command's name, args or TTL is out of bounds.
    InvalidCommand,
    /// A token's TTL is out of bounds.
    InvalidTtl,
    /// An upload's metadata is missing or malformed.
    InvalidBinary,
    /// An upload's checksum is not 64 hex digits.
    InvalidChecksum,
    /// A rollout's settings are out of bounds.
    InvalidRollout,
    /// The body is not JSON (`line`/`column` say where) or not UTF-8.
    InvalidJson,
    /// The body is empty where a document is required.
    EmptyBody,
    /// The connection failed while the body was read.
    BodyReadFailed,
    /// The body is larger than the endpoint accepts.
    PayloadTooLarge,
    /// The body's Content-Type is not one the endpoint accepts.
    UnsupportedMediaType,
    /// No valid credential.
    Unauthorized,
    /// A valid credential without the right to this.
    Forbidden,
    /// No such route or resource.
    NotFound,
    /// The route exists, not with this method (`Allow` lists the methods).
    MethodNotAllowed,
    /// An upload with the same name, version, os and arch exists.
    BinaryExists,
    /// The binary is the target of an active rollout.
    RolloutTarget,
    /// Another rollout for the same os/arch started at the same moment.
    RolloutConflict,
    /// The upload's content does not match its checksum.
    ChecksumMismatch,
    /// The upload ended before its declared length.
    UploadIncomplete,
    /// The binary storage volume is full.
    InsufficientStorage,
    /// The binary's file is missing from the storage volume.
    BinaryFileMissing,
    /// The binary storage volume failed.
    StorageError,
    /// The requested byte range is outside the file.
    RangeNotSatisfiable,
    /// Too many failed sign-ins; `Retry-After` says when to try again.
    TooManyRequests,
    /// The web UI's sign-in has no admin password configured.
    SignInDisabled,
    /// The admin password is wrong.
    WrongPassword,
    /// This replica serves its maximum of event streams.
    TooManyStreams,
    /// The replica is shutting down; retry to reach another.
    Draining,
    /// `/ws/{client_id}` was requested without a WebSocket handshake.
    NotWebsocket,
    /// The database does not answer; retry shortly.
    StoreUnavailable,
    /// A server fault; the log has it under the request id.
    Internal,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 36] = [
        ErrorCode::InvalidClientId,
        ErrorCode::InvalidLimit,
        ErrorCode::InvalidCursor,
        ErrorCode::InvalidFilter,
        ErrorCode::InvalidQuery,
        ErrorCode::InvalidCommand,
        ErrorCode::InvalidTtl,
        ErrorCode::InvalidBinary,
        ErrorCode::InvalidChecksum,
        ErrorCode::InvalidRollout,
        ErrorCode::InvalidJson,
        ErrorCode::EmptyBody,
        ErrorCode::BodyReadFailed,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::BinaryExists,
        ErrorCode::RolloutTarget,
        ErrorCode::RolloutConflict,
        ErrorCode::ChecksumMismatch,
        ErrorCode::UploadIncomplete,
        ErrorCode::InsufficientStorage,
        ErrorCode::BinaryFileMissing,
        ErrorCode::StorageError,
        ErrorCode::RangeNotSatisfiable,
        ErrorCode::TooManyRequests,
        ErrorCode::SignInDisabled,
        ErrorCode::WrongPassword,
        ErrorCode::TooManyStreams,
        ErrorCode::Draining,
        ErrorCode::NotWebsocket,
        ErrorCode::StoreUnavailable,
        ErrorCode::Internal,
    ];

    /// The code as it appears in responses.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidClientId => "invalid_client_id",
            ErrorCode::InvalidLimit => "invalid_limit",
            ErrorCode::InvalidCursor => "invalid_cursor",
            ErrorCode::InvalidFilter => "invalid_filter",
            ErrorCode::InvalidQuery => "invalid_query",
            ErrorCode::InvalidCommand => "invalid_command",
            ErrorCode::InvalidTtl => "invalid_ttl",
            ErrorCode::InvalidBinary => "invalid_binary",
            ErrorCode::InvalidChecksum => "invalid_checksum",
            ErrorCode::InvalidRollout => "invalid_rollout",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::EmptyBody => "empty_body",
            ErrorCode::BodyReadFailed => "body_read_failed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::BinaryExists => "binary_exists",
            ErrorCode::RolloutTarget => "rollout_target",
            ErrorCode::RolloutConflict => "rollout_conflict",
            ErrorCode::ChecksumMismatch => "checksum_mismatch",
            ErrorCode::UploadIncomplete => "upload_incomplete",
            ErrorCode::InsufficientStorage => "insufficient_storage",
            ErrorCode::BinaryFileMissing => "binary_file_missing",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::RangeNotSatisfiable => "range_not_satisfiable",
            ErrorCode::TooManyRequests => "too_many_requests",
            ErrorCode::SignInDisabled => "sign_in_disabled",
            ErrorCode::WrongPassword => "wrong_password",
            ErrorCode::TooManyStreams => "too_many_streams",
            ErrorCode::Draining => "draining",
            ErrorCode::NotWebsocket => "not_websocket",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
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
    /// A request to `/ws/{client_id}` without a WebSocket handshake.
    #[error("expected a WebSocket upgrade request (Upgrade: websocket, Sec-WebSocket-Version: 13)")]
    NotWebSocket,
    /// The database does not answer.
    #[error("storage is unavailable; retry shortly")]
    StoreUnavailable(#[source] StoreError),
    /// A server fault.
    #[error("internal error; the server log has the details under this request's id")]
    Internal(#[source] StoreError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => ApiError::StoreUnavailable(e),
            other => ApiError::Internal(other),
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
    pub fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The status code: RFC 9110's meaning for each kind of failure.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } | ApiError::InvalidJson { .. } | ApiError::NotWebSocket => {
                StatusCode::BAD_REQUEST
            }
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) | ApiError::WrongPassword => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::SignInDisabled => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Storage(e) => match e {
                StorageError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                StorageError::Empty
                | StorageError::ChecksumMismatch { .. }
                | StorageError::Incomplete(_) => StatusCode::BAD_REQUEST,
                StorageError::Full { .. } => StatusCode::INSUFFICIENT_STORAGE,
                StorageError::Missing { .. } | StorageError::Io { .. } => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TooManyStreams { .. }
            | ApiError::Draining
            | ApiError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error.code` of the body.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::BadRequest { code, .. } | ApiError::Conflict { code, .. } => *code,
            ApiError::InvalidJson { .. } => ErrorCode::InvalidJson,
            ApiError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            ApiError::Unauthorized(_) => ErrorCode::Unauthorized,
            ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::MethodNotAllowed => ErrorCode::MethodNotAllowed,
            ApiError::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            ApiError::Storage(e) => match e {
                StorageError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
                StorageError::Empty => ErrorCode::EmptyBody,
                StorageError::ChecksumMismatch { .. } => ErrorCode::ChecksumMismatch,
                StorageError::Full { .. } => ErrorCode::InsufficientStorage,
                StorageError::Incomplete(_) => ErrorCode::UploadIncomplete,
                StorageError::Missing { .. } => ErrorCode::BinaryFileMissing,
                StorageError::Io { .. } => ErrorCode::StorageError,
            },
            ApiError::RangeNotSatisfiable { .. } => ErrorCode::RangeNotSatisfiable,
            ApiError::TooManyRequests { .. } => ErrorCode::TooManyRequests,
            ApiError::SignInDisabled => ErrorCode::SignInDisabled,
            ApiError::WrongPassword => ErrorCode::WrongPassword,
            ApiError::TooManyStreams { .. } => ErrorCode::TooManyStreams,
            ApiError::Draining => ErrorCode::Draining,
            ApiError::NotWebSocket => ErrorCode::NotWebsocket,
            ApiError::StoreUnavailable(_) => ErrorCode::StoreUnavailable,
            ApiError::Internal(_) => ErrorCode::Internal,
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
            ApiError::Storage(
                e @ (StorageError::Missing { .. }
                | StorageError::Io { .. }
                | StorageError::Full { .. }),
            ) => {
                tracing::error!(error = %error_chain(e), "binary storage failed");
            }
            _ => {}
        }
        let mut body = serde_json::json!({
            "error": {"code": self.code().as_str(), "message": self.to_string()}
        });
        if let ApiError::InvalidJson { line, column, .. } = &self {
            body["error"]["line"] = (*line).into();
            body["error"]["column"] = (*column).into();
        }
        let mut resp = (self.status(), Json(body)).into_response();
        let headers = resp.headers_mut();
        match &self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Draining
            | ApiError::StoreUnavailable(_)
            | ApiError::TooManyStreams { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            }
            ApiError::TooManyRequests { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
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
pub type Result<T, E = ApiError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_is_listed_in_the_readme() {
        let readme = include_str!("../../../README.md");
        for code in ErrorCode::ALL {
            assert!(
                readme.contains(&format!("`{}`", code.as_str())),
                "README's API section lacks `{}`",
                code.as_str()
            );
        }
    }
}
