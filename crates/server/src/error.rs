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
        (self.status(), axum::Json(self.body())).into_response()
    }
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
        }
    }
}
