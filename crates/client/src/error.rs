//! The client's one error type.

use seqcast_protocol::{NameError, SubscriptionKey};

/// What a token provider may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a client call failed.
///
/// After the first connection, connection failures are not returned to anyone: the client logs
/// them (`tracing`, target `seqcast_client`), reports them in
/// [`ConnectionState::Reconnecting`](crate::ConnectionState::Reconnecting) and reconnects.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL is not a `ws://` or `wss://` URL.
    #[error("invalid url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A channel, request id or session id breaks its grammar.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// The token provider returned an error.
    #[error("token provider failed: {0}")]
    Token(#[source] BoxError),
    /// The WebSocket could not be opened, or failed while open.
    #[error("websocket: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// A step of connecting took longer than its deadline.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The server refused the connection: an `error` frame and/or a close frame before
    /// `connected` (4001 for a missing, invalid or expired token).
    #[error("server refused the connection (close code {close_code:?}): {message}")]
    Rejected {
        /// The close code, when the server sent one.
        close_code: Option<u16>,
        /// The `error` frame's message, or the close reason.
        message: String,
    },
    /// The server sent something that is not a seqcast frame where one was required.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// This key is already followed by a live [`Subscription`](crate::Subscription) of this
    /// client; drop or unsubscribe that one first.
    #[error("already subscribed to {0}")]
    AlreadySubscribed(SubscriptionKey),
    /// The client was closed (or its connection task ended).
    #[error("the client is closed")]
    Closed,
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        Error::WebSocket(Box::new(e))
    }
}
