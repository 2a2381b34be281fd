//! What a subscription yields, and what the connection is doing.

use std::time::Duration;

use seqcast_protocol::{
    Channel, MessageFrame, MessageId, RawValue, RequestId, SessionId, SubscriptionKey,
};
use serde::de::DeserializeOwned;

/// One item of a [`Subscription`](crate::Subscription) stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The server acknowledged the subscription on a connection: once per (re)connect.
    Subscribed(Subscribed),
    /// The server could not hand over everything since the resume point (`recovered: false`):
    /// what lies between [`Gap::since`] and the next message yielded is lost for this client.
    /// **Re-fetch your state for this key** (e.g. page the key's stream over HTTP, or start
    /// the view over), then keep consuming: messages after the gap follow. Emitted for every key
    /// whose resume says so; always follows the `Subscribed` it belongs to and precedes the
    /// messages after the gap.
    Gap(Gap),
    /// One message of the key, in strictly increasing `sequence_number` order, never twice.
    Message(Message),
    /// The server refused this key when it was resumed after a reconnect (its verdict in
    /// `resume_ack`: e.g. the token no longer allows the key, or the connection is at its
    /// subscription limit). The server does not follow the key any more; the stream ends after
    /// this event.
    Refused(Refused),
}

/// A key the server refused on resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The subscription key.
    pub key: SubscriptionKey,
    /// The server's error code (`forbidden`, `bad_request`, …).
    pub code: seqcast_protocol::ErrorCode,
    /// The server's explanation.
    pub message: String,
}

/// The server's `sub_ack`, as seen by one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    /// The subscription key.
    pub key: SubscriptionKey,
    /// The connection this acknowledgement came on (the `connection_sequence` sent in `hello`).
    pub connection_sequence: u64,
    /// The `since` this subscription was (re)sent with; `None` for a fresh subscription, which
    /// gets the key's backlog instead.
    pub since: Option<u64>,
    /// How many backlog messages follow (fresh subscription).
    pub drained: u64,
    /// The seam: every message of the key numbered above it arrives live.
    pub head: u64,
    /// The store's epoch.
    pub epoch: String,
    /// For a resume: whether the server's history reached back to `since + 1`.
    pub recovered: Option<bool>,
    /// Fresh subscription: the key's older messages left out of the backlog because they are
    /// older than the server's backlog TTL. Still in the log: a resume with
    /// [`Resume`](crate::Resume) `since` reaches them while the recovery window does.
    pub expired: u64,
    /// Fresh subscription: the key's messages within the TTL left out because the server drains
    /// only the newest `--backlog-per-key`.
    pub overflow: u64,
}

/// Why a [`Gap`] happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GapReason {
    /// The server's recovery window no longer reaches back to `since + 1`.
    Window,
    /// The server's store has another epoch (wiped or replaced): its numbers restarted. The
    /// subscription starts over, and sequence numbers from before the gap are not comparable
    /// with those after it — the one case where numbers after an event go down.
    EpochChanged,
}

/// Messages were lost between `since` and what follows (`recovered: false` on resume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The subscription key.
    pub key: SubscriptionKey,
    /// The last sequence number the client had (what it resumed from).
    pub since: Option<u64>,
    /// Where the server's history starts, when it said so.
    pub oldest_sequence: Option<u64>,
    /// The server's epoch now.
    pub epoch: String,
    /// The epoch `since` belonged to.
    pub previous_epoch: Option<String>,
    /// Window too short, or another store.
    pub reason: GapReason,
}

/// One published message, exactly as the server sent it. Equality compares `data` as text.
#[derive(Debug, Clone)]
pub struct Message {
    /// Deployment-wide sequence number (≥ 1).
    pub sequence_number: u64,
    /// Position in its stream (≥ 1); an upsert keeps its position.
    pub stream_sequence: u64,
    /// The key's channel.
    pub channel: Channel,
    /// The key's request id.
    pub request_id: RequestId,
    /// The publisher's idempotency key, or a server-made one.
    pub message_id: MessageId,
    /// Milliseconds since the Unix epoch, taken when persisted.
    pub timestamp: u64,
    /// The published JSON, verbatim.
    pub data: Box<RawValue>,
}

impl Message {
    /// The published JSON as text.
    pub fn data_json(&self) -> &str {
        self.data.get()
    }

    /// The published JSON as a `serde_json::Value`.
    pub fn data_value(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_str(self.data.get())
    }

    /// The published JSON decoded into `T`.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.data.get())
    }

    /// The subscription key this message belongs to.
    pub fn key(&self) -> SubscriptionKey {
        SubscriptionKey::new(self.channel.clone(), self.request_id.clone())
    }
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.sequence_number == other.sequence_number
            && self.stream_sequence == other.stream_sequence
            && self.channel == other.channel
            && self.request_id == other.request_id
            && self.message_id == other.message_id
            && self.timestamp == other.timestamp
            && self.data.get() == other.data.get()
    }
}

// Comparing `data` as text is reflexive, so equality is total.
impl Eq for Message {}

impl From<MessageFrame> for Message {
    fn from(m: MessageFrame) -> Self {
        Message {
            sequence_number: m.sequence_number,
            stream_sequence: m.stream_sequence,
            channel: m.channel,
            request_id: m.request_id,
            message_id: m.message_id,
            timestamp: m.timestamp,
            data: m.data,
        }
    }
}

/// What the server said in `connected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Server-made, unique per connection.
    pub client_id: String,
    /// The session id sent in `hello`.
    pub session_id: SessionId,
    /// The number of this connection within the session (1 for the first).
    pub connection_sequence: u64,
    /// The latest sequence number when the connection opened.
    pub head: u64,
    /// The store's epoch.
    pub epoch: String,
}

/// Where the client's connection stands; watch it with
/// [`Client::watch_state`](crate::Client::watch_state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Opening a connection (`attempt` 0 is the first try at start or after a connection
    /// that stayed up).
    Connecting {
        /// Failed attempts (and connections that did not stay up) since the last connection
        /// that stayed up for the backoff's maximum.
        attempt: u32,
    },
    /// Connected and past `hello`; subscriptions are (re)sent.
    Connected(ConnectionInfo),
    /// The connection was lost or an attempt failed; the next attempt starts after `delay`.
    Reconnecting {
        /// Failed attempts (and connections that did not stay up) since the last connection
        /// that stayed up (≥ 1).
        attempt: u32,
        /// The backoff before the next attempt.
        delay: Duration,
        /// Why the previous connection or attempt ended.
        reason: String,
    },
    /// Closed for good ([`Client::close`](crate::Client::close), or every handle dropped).
    Closed,
}

impl ConnectionState {
    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        matches!(self, ConnectionState::Connected(_))
    }
}
