//! HTTP request and response bodies, and query-parameter parsing.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::client::truncate_for_echo;
use crate::names::{Channel, MessageId, NameError, RequestId, SubscriptionKey};
use crate::server::{ErrorCode, MessageFrame, push_json_str, push_u64};

/// `POST /api/publish` body.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PublishRequest {
    /// The key's channel.
    pub channel: Channel,
    /// The key's request id.
    pub request_id: RequestId,
    /// Any JSON; kept verbatim.
    #[schema(value_type = serde_json::Value, required)]
    pub data: Box<RawValue>,
    /// Idempotency key within the stream; a repeat is an upsert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<MessageId>,
}

impl PublishRequest {
    /// The subscription key to publish to.
    pub fn key(&self) -> SubscriptionKey {
        SubscriptionKey::new(self.channel.clone(), self.request_id.clone())
    }
}

impl PartialEq for PublishRequest {
    fn eq(&self, other: &Self) -> bool {
        self.channel == other.channel
            && self.request_id == other.request_id
            && self.data.get() == other.data.get()
            && self.message_id == other.message_id
    }
}

impl Eq for PublishRequest {}

/// `POST /api/publish` answer, sent once the write is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PublishResponse {
    /// The deployment-wide sequence number of this event.
    pub sequence_number: u64,
    /// The row's position in its stream.
    pub stream_sequence: u64,
    /// The message id given, or the one the server made.
    pub message_id: MessageId,
}

/// Encodes a publish answer — the body of `POST /api/publish` and one line of
/// `/api/publish/stream` — by hand (once per published message, like `publish_ack`):
/// `{"sequence_number":…,"stream_sequence":…,"message_id":"…"}`, as its `Serialize` does.
pub fn encode_publish_response(r: &PublishResponse) -> String {
    let mut out = String::with_capacity(80 + r.message_id.as_str().len());
    out.push('{');
    push_publish_numbers(
        &mut out,
        r.sequence_number,
        r.stream_sequence,
        &r.message_id,
    );
    out
}

/// `"sequence_number":…,"stream_sequence":…,"message_id":"…"}`: the end of every publish
/// answer (HTTP body, NDJSON line, `publish_ack`).
pub(crate) fn push_publish_numbers(
    out: &mut String,
    sequence_number: u64,
    stream_sequence: u64,
    message_id: &MessageId,
) {
    out.push_str(r#""sequence_number":"#);
    push_u64(out, sequence_number);
    out.push_str(r#","stream_sequence":"#);
    push_u64(out, stream_sequence);
    // A message id's grammar (letters, digits, `-_.:`) needs no escape.
    out.push_str(r#","message_id":""#);
    out.push_str(message_id.as_str());
    out.push_str("\"}");
}

/// `POST /api/publish/batch` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchPublishRequest {
    /// The messages, published in this order in one transaction.
    #[schema(min_items = 1)]
    pub messages: Vec<PublishRequest>,
}

/// `POST /api/publish/batch` answer: one result per message, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchPublishResponse {
    /// One answer per message, in request order.
    pub results: Vec<PublishResponse>,
}

/// Why a publish body was rejected. Every variant is the client's fault (`bad_request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON.
    #[error("body is not valid JSON: {0}")]
    Malformed(String),
    /// JSON of the wrong shape: a missing field or a field of the wrong type.
    #[error("invalid body: {0}")]
    InvalidField(String),
    /// A channel, request id or message id breaks its grammar.
    #[error(transparent)]
    BadName(#[from] NameError),
    /// A batch with no messages.
    #[error("batch has no messages; send at least one")]
    Empty,
    /// One message of a batch is invalid (so nothing of the batch is published).
    #[error("messages[{index}]: {error}")]
    InBatch {
        /// 0-based position in `messages`.
        index: usize,
        /// What is wrong with it.
        error: Box<BodyError>,
    },
}

impl BodyError {
    /// The error code in the HTTP error body.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::BadRequest
    }

    fn from_json(e: &serde_json::Error) -> Self {
        if e.is_data() {
            BodyError::InvalidField(e.to_string())
        } else {
            BodyError::Malformed(e.to_string())
        }
    }
}

/// A publish body with names still unchecked, so bad names become [`BodyError::BadName`].
#[derive(Deserialize)]
struct WirePublish<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    request_id: Cow<'a, str>,
    data: Box<RawValue>,
    #[serde(default, borrow)]
    message_id: Option<Cow<'a, str>>,
}

impl WirePublish<'_> {
    fn validate(self) -> Result<PublishRequest, BodyError> {
        Ok(PublishRequest {
            channel: Channel::parse(&self.channel)?,
            request_id: RequestId::parse(&self.request_id)?,
            data: self.data,
            message_id: self
                .message_id
                .as_deref()
                .map(MessageId::parse)
                .transpose()?,
        })
    }
}

#[derive(Deserialize)]
struct WireBatch<'a> {
    #[serde(borrow)]
    messages: Vec<WirePublish<'a>>,
}

/// Decodes a `POST /api/publish` body. Unknown fields are ignored; `data` is required.
pub fn decode_publish(body: &[u8]) -> Result<PublishRequest, BodyError> {
    let wire: WirePublish<'_> =
        serde_json::from_slice(body).map_err(|e| BodyError::from_json(&e))?;
    wire.validate()
}

/// Decodes a `POST /api/publish/batch` body; an empty `messages` list is an error.
pub fn decode_batch(body: &[u8]) -> Result<BatchPublishRequest, BodyError> {
    let wire: WireBatch<'_> = serde_json::from_slice(body).map_err(|e| BodyError::from_json(&e))?;
    if wire.messages.is_empty() {
        return Err(BodyError::Empty);
    }
    let messages = wire
        .messages
        .into_iter()
        .enumerate()
        .map(|(index, m)| {
            m.validate().map_err(|e| BodyError::InBatch {
                index,
                error: Box::new(e),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(BatchPublishRequest { messages })
}

/// Everything in a recovery answer except the messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryMeta {
    /// The latest assigned sequence number.
    pub head: u64,
    /// The oldest sequence number the window still holds, if any.
    pub oldest_sequence: Option<u64>,
    /// The store's epoch.
    pub epoch: String,
    /// Whether the answer holds everything after `since` (window reached back, same epoch).
    pub complete: bool,
    /// Where `limit` cut the page: continue with `since=next_since`.
    pub next_since: Option<u64>,
}

/// `GET /websocket/messages` answer, for clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecoveryResponse {
    /// The messages after `since`, in order; the same objects as live frames.
    pub messages: Vec<MessageFrame>,
    /// The latest assigned sequence number.
    pub head: u64,
    /// The oldest sequence number the window still holds, if any.
    #[schema(required)]
    pub oldest_sequence: Option<u64>,
    /// The store's epoch.
    pub epoch: String,
    /// Whether the answer holds everything after `since`.
    pub complete: bool,
    /// Where `limit` cut the page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_since: Option<u64>,
}

/// Appends `[f1,f2,…]` from already-encoded frames, verbatim.
fn push_frames<'a>(out: &mut String, frames: impl IntoIterator<Item = &'a str>) {
    out.push('[');
    for (i, frame) in frames.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(frame);
    }
    out.push(']');
}

/// Builds the recovery answer from already-encoded message frames (from
/// [`crate::encode_message`]), copied verbatim:
/// `{"messages":[…],"head":…,"oldest_sequence":…|null,"epoch":"…","complete":…,"next_since":…}`
/// with `next_since` omitted when `None`.
pub fn encode_recovery_response<'a>(
    frames: impl IntoIterator<Item = &'a str>,
    meta: &RecoveryMeta,
) -> String {
    let mut out = String::with_capacity(256);
    out.push_str(r#"{"messages":"#);
    push_frames(&mut out, frames);
    out.push_str(r#","head":"#);
    push_u64(&mut out, meta.head);
    out.push_str(r#","oldest_sequence":"#);
    match meta.oldest_sequence {
        Some(oldest) => push_u64(&mut out, oldest),
        None => out.push_str("null"),
    }
    out.push_str(r#","epoch":"#);
    push_json_str(&mut out, &meta.epoch);
    out.push_str(r#","complete":"#);
    out.push_str(if meta.complete { "true" } else { "false" });
    if let Some(next) = meta.next_since {
        out.push_str(r#","next_since":"#);
        push_u64(&mut out, next);
    }
    out.push('}');
    out
}

/// `GET /api/streams/{channel}/{request_id}/messages` answer: rows by `stream_sequence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamPage {
    /// The rows after `after`, by `stream_sequence`.
    pub messages: Vec<MessageFrame>,
    /// Where `limit` cut the page: continue with `after=next_after`. Omitted on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<u64>,
}

/// Builds a stream page from already-encoded message frames, copied verbatim:
/// `{"messages":[…],"next_after":…}` with `next_after` omitted when `None`.
pub fn encode_stream_page<'a>(
    frames: impl IntoIterator<Item = &'a str>,
    next_after: Option<u64>,
) -> String {
    let mut out = String::with_capacity(256);
    out.push_str(r#"{"messages":"#);
    push_frames(&mut out, frames);
    if let Some(next) = next_after {
        out.push_str(r#","next_after":"#);
        push_u64(&mut out, next);
    }
    out.push('}');
    out
}

/// HTTP error body: `{"error":{"code":…,"message":…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
}

impl ErrorBody {
    /// An error body with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
}

/// A rejected query parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    /// The parameter's name.
    pub param: String,
    /// What is wrong, for a person.
    pub message: String,
}

/// The most items one recovery answer or stream page may hold (`limit`).
pub const MAX_PAGE: u64 = 10_000;
/// `limit` when a request gives none.
pub const DEFAULT_PAGE: u64 = 1_000;

/// Decodes a query string (the part after `?`; percent-decoding, `+` as space) into `T`, whose
/// fields are the parameters an endpoint takes: an unknown parameter, a repeated one or a bad
/// value is an error that names it.
pub fn decode_query<T: serde::de::DeserializeOwned>(raw: &str) -> Result<T, ParamError> {
    serde_urlencoded::from_str(raw).map_err(|e| ParamError {
        param: "query".to_owned(),
        message: format!("invalid query: {e}"),
    })
}

/// `limit`: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when absent.
pub fn page_limit(limit: Option<u64>) -> Result<usize, ParamError> {
    let fail = |message: String| ParamError {
        param: "limit".to_owned(),
        message,
    };
    match limit {
        None => Ok(DEFAULT_PAGE as usize),
        Some(0) => Err(fail("limit must be at least 1".into())),
        Some(n) if n > MAX_PAGE => Err(fail(format!("limit must be at most {MAX_PAGE}, got {n}"))),
        // At most MAX_PAGE, so it fits any usize.
        Some(n) => Ok(n as usize),
    }
}

/// A `u64` parameter with [`parse_u64_param`]'s message for a bad value.
fn u64_param<'de, D: serde::Deserializer<'de>>(
    name: &'static str,
    d: D,
) -> Result<Option<u64>, D::Error> {
    let raw = <String as Deserialize>::deserialize(d)?;
    parse_u64_param(name, &raw)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(e.to_string()))
}

fn since_param<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    u64_param("since", d)
}

fn after_param<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    u64_param("after", d)
}

fn limit_param<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    u64_param("limit", d)
}

/// `GET /websocket/messages` parameters ([`decode_query`]).
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RecoverParams {
    /// Answer the messages after this sequence number (0: from the window's start).
    #[serde(default, deserialize_with = "since_param")]
    #[param(minimum = 0, maximum = 18446744073709551615_u64, value_type = Option<u64>)]
    pub since: Option<u64>,
    /// Only this channel's messages.
    #[param(value_type = Option<Channel>)]
    pub channel: Option<String>,
    /// Only this request id's messages: of one key with `channel`, else in every channel the
    /// token may read.
    #[param(value_type = Option<RequestId>)]
    pub request_id: Option<String>,
    /// At most this many messages (1 to 10000, default 1000).
    #[serde(default, deserialize_with = "limit_param")]
    #[param(minimum = 1, maximum = 10000, value_type = Option<u64>)]
    pub limit: Option<u64>,
    /// The epoch the client's `since` belongs to; another epoch answers `complete: false`.
    pub epoch: Option<String>,
}

/// How `GET /events` answers: a Server-Sent Events stream (the default), or one long-poll answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LiveMode {
    /// `text/event-stream`: one event per message, for as long as the stream lasts.
    #[default]
    Sse,
    /// One JSON answer: the messages after `since` at once, else the first to arrive, else 204.
    LongPoll,
}

/// The longest a long-poll may be held (`timeout`, seconds).
pub const MAX_LONG_POLL_SECS: u64 = 30;

/// `GET /events` parameters ([`decode_events_query`]): those of `GET /websocket/messages`,
/// several keys (`key`, repeated), the delivery mode and a stream ticket.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// Deliver the messages after this sequence number (a `Last-Event-ID` header overrides it).
    /// Absent: from the head (what follows it).
    #[serde(default, deserialize_with = "since_param")]
    #[param(minimum = 0, maximum = 18446744073709551615_u64, value_type = Option<u64>)]
    pub since: Option<u64>,
    /// Only this channel's messages.
    #[param(value_type = Option<Channel>)]
    pub channel: Option<String>,
    /// Only this request id's messages: of one key with `channel`, else in every channel the
    /// token may read.
    #[param(value_type = Option<RequestId>)]
    pub request_id: Option<String>,
    /// Only these keys (`channel:request_id`), repeated for several; not with `channel` or
    /// `request_id`.
    #[serde(default)]
    #[param(value_type = Option<Vec<String>>, style = Form, explode, max_items = 1000)]
    pub key: Vec<String>,
    /// The epoch `since` belongs to; another epoch is told as a reset.
    pub epoch: Option<String>,
    /// `sse` (default) or `long-poll`.
    #[param(inline, value_type = Option<LiveMode>)]
    pub live: Option<LiveMode>,
    /// Long-poll only: seconds to hold the request when nothing is there yet (0 to 30, default 30).
    #[serde(default, deserialize_with = "timeout_param")]
    #[param(minimum = 0, maximum = 30, value_type = Option<u64>)]
    pub timeout: Option<u64>,
    /// Long-poll only: at most this many messages (1 to 10000, default 1000).
    #[serde(default, deserialize_with = "limit_param")]
    #[param(minimum = 1, maximum = 10000, value_type = Option<u64>)]
    pub limit: Option<u64>,
    /// A stream ticket from `POST /api/stream-ticket`, instead of an `Authorization` header.
    pub ticket: Option<String>,
}

/// Decodes a `GET /events` query like [`decode_query`], with `key` taken as often as it is
/// given (every other parameter at most once).
pub fn decode_events_query(raw: &str) -> Result<EventsParams, ParamError> {
    let bad = |e: &dyn std::fmt::Display| ParamError {
        param: "query".to_owned(),
        message: format!("invalid query: {e}"),
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw).map_err(|e| bad(&e))?;
    let (keys, rest): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(k, _)| k == "key");
    let rest = serde_urlencoded::to_string(&rest).map_err(|e| bad(&e))?;
    let mut params: EventsParams = decode_query(&rest)?;
    params.key = keys.into_iter().map(|(_, v)| v).collect();
    Ok(params)
}

/// One event of a `GET /events` stream (`text/event-stream`), as a client's parser sees it:
/// heartbeats (comments) and blocks without `data` are not events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SseEvent {
    /// `message` (a message) or `reset` (what was asked for is not all there; what the window
    /// holds follows).
    #[schema(pattern = "^(message|reset)$")]
    pub event: Option<String>,
    /// `message`: the live WebSocket `message` frame's JSON; `reset`:
    /// `{"recovered":false,"oldest_sequence","epoch"}`.
    pub data: String,
    /// `message`: its `sequence_number` (the client's `Last-Event-ID`).
    pub id: Option<String>,
    /// Milliseconds an `EventSource` waits before it reconnects.
    pub retry: Option<u64>,
}

/// `POST /api/stream-ticket` answer: a single-use credential for one `GET /events?ticket=…`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamTicket {
    /// The ticket (random, 128 bits or more): valid once, on the node that issued it.
    pub ticket: String,
    /// Seconds it stays valid.
    pub expires_in: u64,
}

fn timeout_param<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    u64_param("timeout", d)
}

/// `GET /api/streams/{channel}/{request_id}/messages` parameters ([`decode_query`]).
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// Rows after this `stream_sequence` (default 0).
    #[serde(default, deserialize_with = "after_param")]
    #[param(minimum = 0, maximum = 18446744073709551615_u64, value_type = Option<u64>)]
    pub after: Option<u64>,
    /// At most this many rows (1 to 10000, default 1000).
    #[serde(default, deserialize_with = "limit_param")]
    #[param(minimum = 1, maximum = 10000, value_type = Option<u64>)]
    pub limit: Option<u64>,
}

/// Parses a query parameter such as `since`, `after` or `limit`: plain decimal digits, a u64.
pub fn parse_u64_param(name: &str, value: &str) -> Result<u64, ParamError> {
    let fail = |detail: &str| ParamError {
        param: name.to_owned(),
        message: format!(
            "{name} must be a non-negative integer, got {:?}{detail}",
            truncate_for_echo(value)
        ),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if value.is_empty() {
        return Err(ParamError {
            param: name.to_owned(),
            message: format!("{name} must be a non-negative integer, got an empty value"),
        });
    }
    if all_digits(value) {
        // Only overflow can fail here: the string is non-empty ASCII digits.
        return value
            .parse::<u64>()
            .map_err(|_| fail(&format!(", which is too large (max {})", u64::MAX)));
    }
    if value.strip_prefix('-').is_some_and(all_digits) {
        return Err(fail(""));
    }
    if value.strip_prefix('+').is_some_and(all_digits) {
        return Err(fail(", which has a sign; use digits only"));
    }
    Err(fail(", which is not a number"))
}
