//! Every error a request can meet, and the one place that turns them into a status code
//! and a JSON body: `{"error": {"code": …, "message": …}}`.

use http::{HeaderValue, Method, StatusCode, header};

use super::{Response, json};
use crate::auth::AuthError;
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
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
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
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Draining => "draining",
            ApiError::NotWebSocket => "not_websocket",
            ApiError::StoreUnavailable(_) => "store_unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The response; server-side failures are logged here, once, with their source chain.
    pub fn into_response(self) -> Response {
        if let ApiError::StoreUnavailable(e) | ApiError::Internal(e) = &self {
            tracing::error!(error = %error_chain(e), "request failed");
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
            ApiError::Draining | ApiError::StoreUnavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            }
            _ => {}
        }
        resp
    }
}

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

pub type Result<T, E = ApiError> = std::result::Result<T, E>;
