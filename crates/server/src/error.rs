//! The one place that maps failures to what a user sees: HTTP statuses with
//! `{"error":{"code","message"}}` bodies, `error` frames, and WebSocket close codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use seqcast_protocol::{
    BodyError, ErrorBody, ErrorCode, ErrorDetail, FrameError, NameError, ParamError,
};

/// A failure answered to an HTTP client or a WebSocket peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Bad parameter, body or frame (400 / `bad_request`).
    #[error("{0}")]
    BadRequest(String),
    /// No valid credentials (401 / `unauthorized`).
    #[error("{0}")]
    Unauthorized(String),
    /// Valid credentials that may not touch this key (403 / `forbidden`).
    #[error("{0}")]
    Forbidden(String),
    /// Unknown route or resource (404 / `not_found`).
    #[error("{0}")]
    NotFound(String),
    /// Body over the size limit (400 / `too_large`, as the contract decides).
    #[error("{0}")]
    TooLarge(String),
    /// The method is not allowed on this path (405 / `method_not_allowed`).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The body did not arrive, or the answer was not ready, in time (408 / `timeout`).
    #[error("{0}")]
    Timeout(String),
    /// Over a configured connection or request rate (429 / `rate_limited`, with `Retry-After`).
    #[error("{message}")]
    RateLimited {
        /// Why.
        message: String,
        /// Seconds until a retry can succeed (at least 1).
        retry_after_secs: u64,
    },
    /// The database cannot take writes, or the server is shutting down (503 / `unavailable`).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure (500 / `internal`).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The wire code for `error` frames and HTTP bodies.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::BadRequest(_) => ErrorCode::BadRequest,
            ApiError::Unauthorized(_) => ErrorCode::Unauthorized,
            ApiError::Forbidden(_) => ErrorCode::Forbidden,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::TooLarge(_) => ErrorCode::TooLarge,
            ApiError::MethodNotAllowed(_) => ErrorCode::MethodNotAllowed,
            ApiError::Timeout(_) => ErrorCode::Timeout,
            ApiError::RateLimited { .. } => ErrorCode::RateLimited,
            ApiError::Unavailable(_) => ErrorCode::Unavailable,
            ApiError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The HTTP status for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::TooLarge(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        match self {
            ApiError::BadRequest(m)
            | ApiError::Unauthorized(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::TooLarge(m)
            | ApiError::MethodNotAllowed(m)
            | ApiError::Timeout(m)
            | ApiError::RateLimited { message: m, .. }
            | ApiError::Unavailable(m)
            | ApiError::Internal(m) => m,
        }
    }

    /// The `{"error":{…}}` body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.message().to_owned(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::warn!(event = "http_error", code = %self.code(), message = self.message(), "request failed");
        }
        let mut r = (self.status(), axum::Json(self.body())).into_response();
        // For the error counter and the access log (see `observe`).
        r.extensions_mut().insert(self.clone());
        if let ApiError::RateLimited {
            retry_after_secs, ..
        } = &self
        {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(*retry_after_secs),
            );
        }
        r
    }
}

impl ApiError {
    /// The error for a bare status that a layer (routing, a timeout) answered without a body.
    pub fn for_status(status: StatusCode) -> Self {
        match status {
            StatusCode::NOT_FOUND => ApiError::NotFound("no such endpoint".into()),
            StatusCode::METHOD_NOT_ALLOWED => {
                ApiError::MethodNotAllowed("method not allowed on this path".into())
            }
            StatusCode::REQUEST_TIMEOUT => ApiError::Timeout("request timed out".into()),
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge("request body too large".into()),
            StatusCode::UNAUTHORIZED => ApiError::Unauthorized("unauthorized".into()),
            StatusCode::FORBIDDEN => ApiError::Forbidden("forbidden".into()),
            StatusCode::SERVICE_UNAVAILABLE => ApiError::Unavailable("unavailable".into()),
            s if s.is_server_error() => {
                ApiError::Internal(s.canonical_reason().unwrap_or("server error").to_owned())
            }
            s => ApiError::BadRequest(s.canonical_reason().unwrap_or("bad request").to_owned()),
        }
    }

    /// Why a request body could not be read: over the limit, too slow, or broken.
    pub fn from_body_error(e: &axum::Error, limit: usize) -> Self {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if s.is::<crate::deadline::BodyTimeout>() {
                return ApiError::Timeout("the request body did not arrive in time".into());
            }
            if s.is::<http_body_util::LengthLimitError>() {
                return ApiError::TooLarge(format!(
                    "request body exceeds the limit of {limit} bytes"
                ));
            }
            source = s.source();
        }
        ApiError::BadRequest(format!("could not read the request body: {e}"))
    }
}

/// Answers that a layer gave as a bare status (405 from routing, 408 from a timeout) get the
/// JSON error body every error status has; headers such as `Allow` are kept.
pub fn json_error_bodies(r: Response) -> Response {
    let status = r.status();
    if !(status.is_client_error() || status.is_server_error())
        || r.headers().contains_key(axum::http::header::CONTENT_TYPE)
    {
        return r;
    }
    let (mut parts, _) = r.into_parts();
    let mut answer = ApiError::for_status(status).into_response();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    for (name, value) in answer.headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    if let Some(e) = answer.extensions_mut().remove::<ApiError>() {
        parts.extensions.insert(e);
    }
    let body = std::mem::take(answer.body_mut());
    Response::from_parts(parts, body)
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<FrameError> for ApiError {
    fn from(e: FrameError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<seqcast_persistence::StoreError> for ApiError {
    fn from(e: seqcast_persistence::StoreError) -> Self {
        use seqcast_persistence::StoreError;
        match e {
            StoreError::Unavailable(m) => {
                ApiError::Unavailable(format!("the database cannot take writes: {m}"))
            }
            StoreError::Closed => ApiError::Unavailable("the database writer has stopped".into()),
            StoreError::Stopped(m) => ApiError::Unavailable(m),
            StoreError::Rejected(m) => {
                ApiError::BadRequest(format!("the database rejected the write: {m}"))
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// Why the server closes a WebSocket, with the close code the peer sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The server is shutting down (1001).
    GoingAway,
    /// A frame over the size limit (1009).
    TooLarge,
    /// A subscriber fell behind the log's retention floor: it cannot be caught up without a
    /// gap (1013). It resumes with `since` and is told `recovered: false`.
    SlowConsumer,
    /// The log could not be read to catch a subscriber up (1011); the client resumes with `since`.
    LogUnavailable,
    /// No valid authentication before the deadline, or a bad token (4001).
    Unauthenticated,
    /// A protocol violation by the peer (1002).
    ProtocolError,
    /// A text frame that is not UTF-8 (1007).
    InvalidPayload,
    /// The peer did not answer pings in time (1001: it is going away, as far as we can tell).
    PingTimeout,
    /// The token's `exp` passed and no `auth` frame brought a fresh one (4001).
    TokenExpired,
    /// An `auth` frame brought a token that is invalid or for another user (4001).
    AuthRejected,
    /// Another close code chosen at run time (the peer's protocol error with its own text).
    Peer(u16, &'static str),
}

impl CloseReason {
    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::GoingAway => 1001,
            CloseReason::TooLarge => 1009,
            CloseReason::SlowConsumer => 1013,
            CloseReason::LogUnavailable => 1011,
            CloseReason::Unauthenticated => 4001,
            CloseReason::ProtocolError => 1002,
            CloseReason::InvalidPayload => 1007,
            CloseReason::PingTimeout => 1001,
            CloseReason::TokenExpired | CloseReason::AuthRejected => 4001,
            CloseReason::Peer(code, _) => code,
        }
    }

    /// The close reason text (kept short: a close reason is at most 123 bytes).
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::GoingAway => "server shutting down",
            CloseReason::TooLarge => "frame too large",
            CloseReason::SlowConsumer => {
                "too far behind: the log no longer holds what you need; resume with since"
            }
            CloseReason::LogUnavailable => "cannot read the log; resume with since",
            CloseReason::Unauthenticated => "no valid authentication",
            CloseReason::ProtocolError => "protocol error",
            CloseReason::InvalidPayload => "invalid UTF-8 in a text frame",
            CloseReason::PingTimeout => "ping timeout: no frame from the peer",
            CloseReason::TokenExpired => "token expired",
            CloseReason::AuthRejected => "auth refresh rejected",
            CloseReason::Peer(_, text) => text,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A body over its limit is told by the body limit's own error type (answered 400
    /// `too_large`, as the contract wants), not by its message: another error that reads the
    /// same is a plain `bad_request`.
    #[tokio::test]
    async fn a_body_over_its_limit_is_told_by_its_error_type() {
        let body = axum::body::Body::from(vec![b'x'; 2048]);
        let e = axum::body::to_bytes(body, 1024).await.unwrap_err();
        let err = ApiError::from_body_error(&e, 1024);
        assert!(matches!(err, ApiError::TooLarge(_)), "{err:?}");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(err.code(), ErrorCode::TooLarge);
        let broken = axum::Error::new(std::io::Error::other("length limit exceeded"));
        let err = ApiError::from_body_error(&broken, 1024);
        assert!(matches!(err, ApiError::BadRequest(_)), "{err:?}");
    }
}
