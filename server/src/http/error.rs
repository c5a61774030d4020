//! Every error a request can meet, and the one place that turns them into a status code
//! and a JSON body: `{"error": {"code": …, "message": …}}`.

use http::{HeaderValue, Method, StatusCode, header};

use super::{Response, json};
use crate::auth::AuthError;
use crate::binaries::StorageError;
use crate::error::error_chain;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("invalid JSON at line {line}, column {column}: {message}")]
    InvalidJson {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    Unauthorized(#[from] AuthError),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed; this route accepts {}", allowed.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "))]
    MethodNotAllowed { allowed: &'static [Method] },
    #[error("send the body as application/json")]
    UnsupportedMediaType,
    #[error("{0}")]
    UnsupportedUpload(String),
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("the requested range is outside the {size} bytes of this file")]
    RangeNotSatisfiable { size: u64 },
    #[error("{message}")]
    TooManyRequests { message: String, retry_after: u64 },
    #[error("sign-in is disabled: set ADMIN_PASSWORD (the same on every replica) to enable it")]
    SignInDisabled,
    #[error("wrong password")]
    WrongPassword,
    #[error("this replica already serves {limit} event streams; retry shortly")]
    TooManyStreams { limit: usize },
    #[error("this server is shutting down; retry and you will reach another replica")]
    Draining,
    #[error("expected a WebSocket upgrade request (Upgrade: websocket, Sec-WebSocket-Version: 13)")]
    NotWebSocket,
    #[error("storage is unavailable; retry shortly")]
    StoreUnavailable(#[source] StoreError),
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
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } | ApiError::InvalidJson { .. } | ApiError::NotWebSocket => {
                StatusCode::BAD_REQUEST
            }
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedMediaType | ApiError::UnsupportedUpload(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
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
            ApiError::SignInDisabled => StatusCode::FORBIDDEN,
            ApiError::WrongPassword => StatusCode::UNAUTHORIZED,
            ApiError::TooManyStreams { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Draining | ApiError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } => code,
            ApiError::InvalidJson { .. } => "invalid_json",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::UnsupportedMediaType | ApiError::UnsupportedUpload(_) => {
                "unsupported_media_type"
            }
            ApiError::Conflict { code, .. } => code,
            ApiError::Storage(e) => match e {
                StorageError::TooLarge { .. } => "payload_too_large",
                StorageError::Empty => "empty_body",
                StorageError::ChecksumMismatch { .. } => "checksum_mismatch",
                StorageError::Full { .. } => "insufficient_storage",
                StorageError::Incomplete(_) => "upload_incomplete",
                StorageError::Missing { .. } => "binary_file_missing",
                StorageError::Io { .. } => "storage_error",
            },
            ApiError::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            ApiError::TooManyRequests { .. } => "too_many_requests",
            ApiError::SignInDisabled => "sign_in_disabled",
            ApiError::WrongPassword => "wrong_password",
            ApiError::TooManyStreams { .. } => "too_many_streams",
            ApiError::Draining => "draining",
            ApiError::NotWebSocket => "not_websocket",
            ApiError::StoreUnavailable(_) => "store_unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The response; server-side failures are logged here, once, with their source chain.
    pub fn into_response(self) -> Response {
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
        let mut body =
            serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}});
        if let ApiError::InvalidJson { line, column, .. } = &self {
            body["error"]["line"] = (*line).into();
            body["error"]["column"] = (*column).into();
        }
        let mut resp = json(self.status(), &body);
        let headers = resp.headers_mut();
        match &self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allowed } => {
                let list = allowed
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                if let Ok(v) = HeaderValue::from_str(&list) {
                    headers.insert(header::ALLOW, v);
                }
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

pub type Result<T, E = ApiError> = std::result::Result<T, E>;
