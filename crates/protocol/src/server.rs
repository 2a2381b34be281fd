//! Server → client WebSocket frames, their encoding (with a hand-written fast path for
//! `message`) and their decoding (for clients, tests and load generators).

use std::fmt;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::client::{FrameError, truncate_for_echo};
use crate::http::ErrorDetail;
use crate::names::{Channel, MessageId, MessageIdRef, RequestId, SessionId, SubscriptionKey};
use crate::publish::{PublishAck, PublishRef, encode_publish_ack};

/// Error codes in `error` frames and HTTP error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request or frame is malformed or breaks a rule (HTTP 400).
    BadRequest,
    /// No valid credentials (HTTP 401).
    Unauthorized,
    /// Valid credentials that may not read or write this key (HTTP 403).
    Forbidden,
    /// No such resource (HTTP 404).
    NotFound,
    /// Body or frame over the size limit (HTTP 413).
    TooLarge,
    /// The method is not allowed on this path (HTTP 405).
    MethodNotAllowed,
    /// The request (its body, or its handling) took longer than allowed (HTTP 408).
    Timeout,
    /// Too many requests (HTTP 429).
    RateLimited,
    /// The database cannot take writes right now (HTTP 503).
    Unavailable,
    /// A server fault (HTTP 500).
    Internal,
}

impl ErrorCode {
    /// The wire string, e.g. `"bad_request"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status that goes with this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::TooLarge => 413,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Timeout => 408,
            ErrorCode::RateLimited => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A frame sent by the server. Each encodes as a JSON object whose first field is `type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// `connected`: the connection is authenticated.
    Connected(Connected),
    /// `sub_ack`: a subscription is in place; its backlog follows.
    SubAck(SubAck),
    /// `message`: one published message.
    Message(MessageFrame),
    /// `error`: a frame was rejected; the connection stays open.
    Error(ErrorFrame),
    /// `pong`: the answer to `ping`.
    Pong,
    /// `auth_ok`: the answer to `auth`; the fresh token is in force.
    AuthOk(AuthOk),
    /// `publish_ack`: a `publish` frame was committed.
    PublishAck(PublishAck),
    /// `resume_ack`: the answer to `resume`, one verdict per key; their messages follow.
    ResumeAck(ResumeAck),
}

/// `resume_ack`: the answer to `resume`. The messages of every resumed key follow it in global
/// sequence order, then live ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeAck {
    /// One verdict per entry of the `resume` frame, in the order asked.
    pub results: Vec<ResumeResult>,
    /// The latest sequence number the verdicts were judged at.
    pub head: u64,
    /// The store's epoch.
    pub epoch: String,
}

/// One key's verdict in a `resume_ack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResumeResult {
    /// The key was refused alone (bad entry, forbidden, over the subscription limit).
    Refused {
        /// The key, when the entry named a valid one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subscription_key: Option<SubscriptionKey>,
        /// Why.
        error: ErrorDetail,
    },
    /// The key is subscribed: its messages after `since` follow (or, with `recovered: false`,
    /// those after `oldest_sequence - 1`).
    Resumed {
        /// The key.
        subscription_key: SubscriptionKey,
        /// Whether history reached back to `since + 1` (and the epoch matched).
        recovered: bool,
        /// Where history starts, when `recovered` is false.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        oldest_sequence: Option<u64>,
        /// The key was already subscribed on this connection: nothing is replayed, its
        /// delivery goes on as it was. Omitted when false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        already_subscribed: bool,
        /// How many backlog messages of this key follow, numbered up to the ack's `head`: set
        /// when the key starts over as a late subscriber would (another `epoch`); 0 when it
        /// resumes after its `since`. Omitted when 0 (absent reads as 0).
        #[serde(default, skip_serializing_if = "is_zero")]
        drained: u64,
    },
}

impl ResumeResult {
    /// The key this verdict is about, when known.
    pub fn subscription_key(&self) -> Option<&SubscriptionKey> {
        match self {
            ResumeResult::Refused {
                subscription_key, ..
            } => subscription_key.as_ref(),
            ResumeResult::Resumed {
                subscription_key, ..
            } => Some(subscription_key),
        }
    }
}

/// `auth_ok`: the expiry of the token now in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthOk {
    /// `exp` of the token now in force (seconds since the Unix epoch).
    pub exp: u64,
}

/// `connected`: sent once, after authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connected {
    /// Always 0: the number reserved for `connected`.
    pub sequence_number: u64,
    /// Server-made, unique per connection.
    pub client_id: String,
    /// The client's session id from `hello`, echoed.
    pub session_id: Option<SessionId>,
    /// The client's connection sequence from `hello`, echoed.
    pub connection_sequence: Option<u64>,
    /// The latest assigned sequence number.
    pub head: u64,
    /// The store's epoch.
    pub epoch: String,
}

/// `sub_ack`: the answer to `subscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubAck {
    /// The key's channel.
    pub channel: Channel,
    /// The key's request id.
    pub request_id: RequestId,
    /// `{channel}:{request_id}`.
    pub subscription_key: SubscriptionKey,
    /// How many backlog messages follow this frame.
    pub drained: u64,
    /// The latest sequence number at the moment of subscribing: every message of this key
    /// numbered above it arrives live. A client that has received nothing of this key resumes
    /// from here.
    #[serde(default)]
    pub head: u64,
    /// For a `subscribe` with `since`: whether history reached back to `since + 1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// Where history starts, when `recovered` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_sequence: Option<u64>,
    /// For a `subscribe` without `since`: how many of the key's older messages are not in the
    /// backlog because they are older than its TTL (`--backlog-ttl-secs`). They are still in the
    /// log (a resume with `since`, or the key's stream pages, reads them). Omitted when zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expired: u64,
    /// For a `subscribe` without `since`: how many of the key's messages within the TTL are not
    /// in the backlog because only the newest `--backlog-per-key` are drained. Omitted when zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub overflow: u64,
    /// The store's epoch.
    pub epoch: String,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `message`: one published message, identical in live delivery, backlog drain and recovery.
///
/// Serializes with `"type":"message"` first, so a recovery answer's messages are the same
/// objects as live frames. Deserializing ignores `type`.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageFrame {
    /// Deployment-wide sequence number (≥ 1).
    pub sequence_number: u64,
    /// Position in its stream (≥ 1).
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

impl MessageFrame {
    /// The subscription key this message belongs to.
    pub fn key(&self) -> SubscriptionKey {
        SubscriptionKey::new(self.channel.clone(), self.request_id.clone())
    }
}

impl PartialEq for MessageFrame {
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
impl Eq for MessageFrame {}

impl Serialize for MessageFrame {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("MessageFrame", 8)?;
        s.serialize_field("type", "message")?;
        s.serialize_field("sequence_number", &self.sequence_number)?;
        s.serialize_field("stream_sequence", &self.stream_sequence)?;
        s.serialize_field("channel", &self.channel)?;
        s.serialize_field("request_id", &self.request_id)?;
        s.serialize_field("message_id", &self.message_id)?;
        s.serialize_field("timestamp", &self.timestamp)?;
        s.serialize_field("data", &self.data)?;
        s.end()
    }
}

/// `error`: a rejected frame or failed operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
    /// The `ref` of the `publish` frame this error refuses; absent for other errors.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub r#ref: Option<PublishRef>,
}

impl ErrorFrame {
    /// An error frame with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            r#ref: None,
        }
    }

    /// The same error, answering the `publish` frame tagged `r`.
    pub fn with_ref(mut self, r: Option<PublishRef>) -> Self {
        self.r#ref = r;
        self
    }
}

impl From<&FrameError> for ErrorFrame {
    fn from(err: &FrameError) -> Self {
        Self::new(err.code(), err.to_string()).with_ref(err.publish_ref().cloned())
    }
}

/// The non-`message` frames, tagged by serde (which writes the tag first).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TaggedRef<'a> {
    Connected(&'a Connected),
    SubAck(&'a SubAck),
    Error(&'a ErrorFrame),
    Pong,
    AuthOk(&'a AuthOk),
    PublishAck(&'a PublishAck),
    ResumeAck(&'a ResumeAck),
}

impl Serialize for ServerFrame {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ServerFrame::Connected(f) => TaggedRef::Connected(f).serialize(serializer),
            ServerFrame::SubAck(f) => TaggedRef::SubAck(f).serialize(serializer),
            ServerFrame::Message(f) => f.serialize(serializer),
            ServerFrame::Error(f) => TaggedRef::Error(f).serialize(serializer),
            ServerFrame::Pong => TaggedRef::Pong.serialize(serializer),
            ServerFrame::AuthOk(f) => TaggedRef::AuthOk(f).serialize(serializer),
            ServerFrame::PublishAck(f) => TaggedRef::PublishAck(f).serialize(serializer),
            ServerFrame::ResumeAck(f) => TaggedRef::ResumeAck(f).serialize(serializer),
        }
    }
}

/// Encodes a server frame as JSON text.
pub fn encode_server_frame(frame: &ServerFrame) -> String {
    if let ServerFrame::Message(message) = frame {
        return encode_message(message);
    }
    if let ServerFrame::PublishAck(ack) = frame {
        return encode_publish_ack(ack);
    }
    match serde_json::to_string(frame) {
        Ok(text) => text,
        // Unreachable for these types (no non-string map keys, no failing Serialize impls);
        // still answer with a valid frame rather than panic.
        Err(_) => {
            r#"{"type":"error","code":"internal","message":"failed to encode frame"}"#.to_owned()
        }
    }
}

/// Encodes a `message` frame: the hot path, once per published message.
///
/// Writes straight into one pre-sized `String`. Names need no escaping: their grammars contain
/// only characters JSON leaves as they are. `data` is copied verbatim.
pub fn encode_message(frame: &MessageFrame) -> String {
    encode_message_ref(&MessageRef {
        sequence_number: frame.sequence_number,
        stream_sequence: frame.stream_sequence,
        channel: &frame.channel,
        request_id: &frame.request_id,
        message_id: (&frame.message_id).into(),
        timestamp: frame.timestamp,
        data_json: frame.data.get(),
    })
}

/// A message frame's fields by reference: what a server holds after a commit, encoded without
/// building (and re-validating) a [`MessageFrame`].
#[derive(Debug, Clone, Copy)]
pub struct MessageRef<'a> {
    /// Deployment-wide sequence number.
    pub sequence_number: u64,
    /// Position in the stream.
    pub stream_sequence: u64,
    /// The channel.
    pub channel: &'a Channel,
    /// The request id.
    pub request_id: &'a RequestId,
    /// The message id.
    pub message_id: MessageIdRef<'a>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// The data as JSON text. It is copied verbatim, so it must already be valid JSON (seqcast
    /// validates it once, at publish, and the database refuses anything else).
    pub data_json: &'a str,
}

/// Encodes a message frame from its parts; the same bytes as [`encode_message`].
pub fn encode_message_ref(m: &MessageRef<'_>) -> String {
    // Fixed text is ~130 bytes; three numbers are at most 20 digits each.
    let capacity = 130
        + 3 * 20
        + m.channel.as_str().len()
        + m.request_id.as_str().len()
        + m.message_id.as_str().len()
        + m.data_json.len();
    let mut out = String::with_capacity(capacity);
    out.push_str(r#"{"type":"message","sequence_number":"#);
    push_u64(&mut out, m.sequence_number);
    out.push_str(r#","stream_sequence":"#);
    push_u64(&mut out, m.stream_sequence);
    out.push_str(r#","channel":""#);
    out.push_str(m.channel.as_str());
    out.push_str(r#"","request_id":""#);
    out.push_str(m.request_id.as_str());
    out.push_str(r#"","message_id":""#);
    out.push_str(m.message_id.as_str());
    out.push_str(r#"","timestamp":"#);
    push_u64(&mut out, m.timestamp);
    out.push_str(r#","data":"#);
    out.push_str(m.data_json);
    out.push('}');
    out
}

/// Appends the decimal digits of `n` without going through `fmt`.
pub(crate) fn push_u64(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        // n % 10 < 10, so the cast cannot truncate.
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits: always UTF-8; one copy rather than a push per digit.
    out.push_str(std::str::from_utf8(&buf[i..]).unwrap_or("0"));
}

/// Appends `s` as a JSON string literal (quoted and escaped).
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                out.push_str("\\u00");
                let v = u32::from(c);
                for nibble in [v >> 4, v & 0xf] {
                    out.push(char::from_digit(nibble, 16).unwrap_or('0'));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Just the `type` of a server frame; everything else is ignored at this step.
#[derive(Deserialize)]
struct TypeOnly<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<std::borrow::Cow<'a, str>>,
}

/// Decodes a server frame: reads `type` first, then the matching struct (so that `data` can be
/// captured as a `RawValue`, which serde's internally tagged enums cannot do).
pub fn decode_server_frame(text: &str) -> Result<ServerFrame, FrameError> {
    let head: TypeOnly<'_> = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            FrameError::Malformed(format!(
                "frame must be a JSON object with a string \"type\": {e}"
            ))
        } else {
            FrameError::Malformed(format!("frame is not valid JSON: {e}"))
        }
    })?;
    let ty = head.ty.ok_or(FrameError::MissingType)?;
    let invalid = |e: serde_json::Error| FrameError::InvalidField {
        frame: ty.to_string(),
        message: e.to_string(),
    };
    Ok(match ty.as_ref() {
        "connected" => ServerFrame::Connected(serde_json::from_str(text).map_err(invalid)?),
        "sub_ack" => ServerFrame::SubAck(serde_json::from_str(text).map_err(invalid)?),
        "message" => ServerFrame::Message(serde_json::from_str(text).map_err(invalid)?),
        "error" => ServerFrame::Error(serde_json::from_str(text).map_err(invalid)?),
        "pong" => ServerFrame::Pong,
        "auth_ok" => ServerFrame::AuthOk(serde_json::from_str(text).map_err(invalid)?),
        "publish_ack" => ServerFrame::PublishAck(serde_json::from_str(text).map_err(invalid)?),
        "resume_ack" => ServerFrame::ResumeAck(serde_json::from_str(text).map_err(invalid)?),
        other => return Err(FrameError::UnknownServerType(truncate_for_echo(other))),
    })
}
