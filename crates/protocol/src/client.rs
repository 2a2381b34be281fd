//! Client → server WebSocket frames and their decoding.
//!
//! Decoding goes through a `serde_json::Value` and hand-written field checks rather than derived
//! `Deserialize`, so every rejection names the frame and field in words a client author can act
//! on, and bad names surface as [`FrameError::BadName`]. Client frames are rare compared with
//! published messages, so the extra allocation does not matter.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::names::{Channel, NameError, RequestId, SessionId, SubscriptionKey};
use crate::publish::{Publish, PublishRef, decode_publish_frame};
use crate::server::ErrorCode;

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// First frame: authentication and session identity.
    Hello(Hello),
    /// Follow one subscription key.
    Subscribe(Subscribe),
    /// Stop following one subscription key.
    Unsubscribe(Unsubscribe),
    /// Liveness check, answered by `pong`.
    Ping,
    /// A fresh token for this connection before the current one expires; answered `auth_ok`.
    Auth(Auth),
    /// Publish one message (a token with `publish: true`); answered `publish_ack` or `error`
    /// with the same `ref`, in the order sent.
    Publish(Publish),
    /// Follow many keys at once after a reconnect, each from its own `since`; answered by one
    /// `resume_ack`.
    Resume(Resume),
}

/// `resume`: resume many keys at once, each after its own `since`, in one frame.
///
/// An entry that is not a valid key with a `since` does not fail the frame: it is kept as
/// [`ResumeEntry::Invalid`] so the server refuses that key alone in its verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resume {
    /// The keys, in the order their verdicts are answered.
    pub subscriptions: Vec<ResumeEntry>,
    /// The store epoch every `since` was taken from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// One entry of a `resume` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeEntry {
    /// A valid key and where to resume it.
    Key(ResumeKey),
    /// An entry that breaks the rules: refused alone.
    Invalid(InvalidEntry),
}

impl Serialize for ResumeEntry {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ResumeEntry::Key(k) => k.serialize(serializer),
            ResumeEntry::Invalid(i) => i.raw.serialize(serializer),
        }
    }
}

/// A key to resume: every retained message of it numbered above `since` is sent first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResumeKey {
    /// The key's channel.
    pub channel: Channel,
    /// The key's request id.
    pub request_id: RequestId,
    /// The last `sequence_number` of this key the client has.
    pub since: u64,
}

impl ResumeKey {
    /// The subscription key this entry names.
    pub fn key(&self) -> SubscriptionKey {
        SubscriptionKey::new(self.channel.clone(), self.request_id.clone())
    }
}

/// A `resume` entry that is not a valid key with a `since`, kept with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidEntry {
    /// The key, when its channel and request id are valid (only `since` is wrong).
    pub key: Option<SubscriptionKey>,
    /// What is wrong with it.
    pub error: FrameError,
    /// The entry as sent (encoded back as it was).
    pub raw: Value,
}

impl ResumeEntry {
    /// The key this entry names, when it names a valid one.
    pub fn key(&self) -> Option<SubscriptionKey> {
        match self {
            ResumeEntry::Key(k) => Some(k.key()),
            ResumeEntry::Invalid(i) => i.key.clone(),
        }
    }

    fn decode(index: usize, raw: Value) -> ResumeEntry {
        let Value::Object(obj) = &raw else {
            let error = FrameError::InvalidField {
                frame: "resume".to_owned(),
                message: format!(
                    "subscriptions[{index}] must be an object, got {}",
                    json_type_name(&raw)
                ),
            };
            return ResumeEntry::Invalid(InvalidEntry {
                key: None,
                error,
                raw,
            });
        };
        let f = Fields::new("resume", obj);
        let names = f
            .required_str("channel")
            .and_then(|c| Ok(Channel::parse(c)?))
            .and_then(|c| {
                let r = RequestId::parse(f.required_str("request_id")?)?;
                Ok((c, r))
            });
        let since = f
            .optional_u64("since")
            .and_then(|s| s.ok_or_else(|| f.invalid("missing field \"since\"".to_owned())));
        match (names, since) {
            (Ok((channel, request_id)), Ok(since)) => ResumeEntry::Key(ResumeKey {
                channel,
                request_id,
                since,
            }),
            (Ok((channel, request_id)), Err(error)) => ResumeEntry::Invalid(InvalidEntry {
                key: Some(SubscriptionKey::new(channel, request_id)),
                error,
                raw,
            }),
            (Err(error), _) => ResumeEntry::Invalid(InvalidEntry {
                key: None,
                error,
                raw,
            }),
        }
    }
}

/// `auth`: replace the connection's token (same `sub`), keeping its subscriptions and cursors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Auth {
    /// The fresh JWT.
    pub token: String,
}

/// `hello`: the first frame of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hello {
    /// A JWT, when not given as `Authorization: Bearer` on the upgrade.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The browser tab's id, stable across reconnects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
    /// 1 on a session's first connect, +1 on every reconnect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_sequence: Option<u64>,
}

/// `subscribe`: follow one key, optionally resuming after `since`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subscribe {
    /// The key's channel.
    pub channel: Channel,
    /// The key's request id.
    pub request_id: RequestId,
    /// Resume: send every retained message of the key with a greater `sequence_number` first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// The store epoch `since` was taken from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

impl Subscribe {
    /// The subscription key this frame names.
    pub fn key(&self) -> SubscriptionKey {
        SubscriptionKey::new(self.channel.clone(), self.request_id.clone())
    }
}

/// `unsubscribe`: stop following one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unsubscribe {
    /// The key's channel.
    pub channel: Channel,
    /// The key's request id.
    pub request_id: RequestId,
}

impl Unsubscribe {
    /// The subscription key this frame names.
    pub fn key(&self) -> SubscriptionKey {
        SubscriptionKey::new(self.channel.clone(), self.request_id.clone())
    }
}

/// Why a text frame is not a valid frame. Every variant is the client's fault (`bad_request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not JSON, or not a JSON object; the string is the whole message.
    #[error("{0}")]
    Malformed(String),
    /// The object has no `type` field.
    #[error("frame has no \"type\" field")]
    MissingType,
    /// A client frame `type` this server does not know.
    #[error(
        "unknown frame type \"{0}\"; expected hello, subscribe, unsubscribe, ping, auth, publish or resume"
    )]
    UnknownType(String),
    /// A server frame `type` a client does not know (only from [`crate::decode_server_frame`]).
    #[error(
        "unknown server frame type \"{0}\"; expected connected, sub_ack, message, error, pong, auth_ok, publish_ack or resume_ack"
    )]
    UnknownServerType(String),
    /// A field has the wrong type or value, or a required field is missing.
    #[error("invalid {frame} frame: {message}")]
    InvalidField {
        /// The frame type.
        frame: String,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A channel, request id or session id breaks its grammar.
    #[error(transparent)]
    BadName(#[from] NameError),
    /// A `publish` frame with a valid `ref` is invalid otherwise: the error answers that `ref`.
    #[error("{error}")]
    Publish {
        /// The frame's `ref`.
        r#ref: PublishRef,
        /// What is wrong with it.
        error: Box<FrameError>,
    },
}

impl FrameError {
    /// The error code sent back in the `error` frame.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::BadRequest
    }

    /// The `ref` of the `publish` frame this error refuses, when it had a valid one.
    pub fn publish_ref(&self) -> Option<&PublishRef> {
        match self {
            FrameError::Publish { r#ref, .. } => Some(r#ref),
            _ => None,
        }
    }
}

/// Longest `type` value echoed back in an error, so a hostile frame cannot make errors huge.
const ECHO_LIMIT: usize = 64;

pub(crate) fn truncate_for_echo(s: &str) -> String {
    match s.char_indices().nth(ECHO_LIMIT) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

pub(crate) fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Decodes one client text frame. Unknown extra fields are ignored.
pub fn decode_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    // `publish` keeps `data` as raw text (verbatim, as over HTTP): its own decoder.
    if let Some(publish) = decode_publish_frame(text) {
        return publish.map(ClientFrame::Publish);
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| FrameError::Malformed(format!("frame is not valid JSON: {e}")))?;
    decode_client_value(value)
}

fn decode_client_value(value: Value) -> Result<ClientFrame, FrameError> {
    let Value::Object(obj) = value else {
        return Err(FrameError::Malformed(format!(
            "frame must be a JSON object, got {}",
            json_type_name(&value)
        )));
    };
    let ty = match obj.get("type") {
        None | Some(Value::Null) => return Err(FrameError::MissingType),
        Some(Value::String(ty)) => ty.as_str(),
        Some(other) => {
            return Err(FrameError::Malformed(format!(
                "frame field \"type\" must be a string, got {}",
                json_type_name(other)
            )));
        }
    };
    match ty {
        "hello" => {
            let f = Fields::new("hello", &obj);
            Ok(ClientFrame::Hello(Hello {
                token: f.optional_str("token")?.map(str::to_owned),
                session_id: f
                    .optional_str("session_id")?
                    .map(SessionId::parse)
                    .transpose()?,
                connection_sequence: f.optional_u64("connection_sequence")?,
            }))
        }
        "subscribe" => {
            let f = Fields::new("subscribe", &obj);
            Ok(ClientFrame::Subscribe(Subscribe {
                channel: Channel::parse(f.required_str("channel")?)?,
                request_id: RequestId::parse(f.required_str("request_id")?)?,
                since: f.optional_u64("since")?,
                epoch: f.optional_str("epoch")?.map(str::to_owned),
            }))
        }
        "unsubscribe" => {
            let f = Fields::new("unsubscribe", &obj);
            Ok(ClientFrame::Unsubscribe(Unsubscribe {
                channel: Channel::parse(f.required_str("channel")?)?,
                request_id: RequestId::parse(f.required_str("request_id")?)?,
            }))
        }
        "ping" => Ok(ClientFrame::Ping),
        "auth" => {
            let f = Fields::new("auth", &obj);
            Ok(ClientFrame::Auth(Auth {
                token: f.required_str("token")?.to_owned(),
            }))
        }
        "resume" => {
            let f = Fields::new("resume", &obj);
            let entries = match f.get("subscriptions") {
                None => return Err(f.invalid("missing field \"subscriptions\"".to_owned())),
                Some(Value::Array(entries)) => entries,
                Some(other) => {
                    return Err(f.invalid(format!(
                        "field \"subscriptions\" must be an array, got {}",
                        json_type_name(other)
                    )));
                }
            };
            Ok(ClientFrame::Resume(Resume {
                epoch: f.optional_str("epoch")?.map(str::to_owned),
                subscriptions: entries
                    .iter()
                    .enumerate()
                    .map(|(i, e)| ResumeEntry::decode(i, e.clone()))
                    .collect(),
            }))
        }
        "publish" => {
            let text = Value::Object(obj).to_string();
            decode_publish_frame(&text)
                .unwrap_or(Err(FrameError::MissingType))
                .map(ClientFrame::Publish)
        }
        other => Err(FrameError::UnknownType(truncate_for_echo(other))),
    }
}

impl<'de> Deserialize<'de> for ClientFrame {
    /// Same rules as [`decode_client_frame`], for clients that embed frames in other JSON.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        decode_client_value(value).map_err(serde::de::Error::custom)
    }
}

/// Field access with errors that name the frame and the field. JSON `null` counts as absent.
struct Fields<'a> {
    frame: &'static str,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn new(frame: &'static str, obj: &'a Map<String, Value>) -> Self {
        Self { frame, obj }
    }

    fn invalid(&self, message: String) -> FrameError {
        FrameError::InvalidField {
            frame: self.frame.to_owned(),
            message,
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    fn required_str(&self, name: &str) -> Result<&'a str, FrameError> {
        match self.get(name) {
            None => Err(self.invalid(format!("missing field \"{name}\""))),
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(self.invalid(format!(
                "field \"{name}\" must be a string, got {}",
                json_type_name(other)
            ))),
        }
    }

    fn optional_str(&self, name: &str) -> Result<Option<&'a str>, FrameError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.invalid(format!(
                "field \"{name}\" must be a string, got {}",
                json_type_name(other)
            ))),
        }
    }

    fn optional_u64(&self, name: &str) -> Result<Option<u64>, FrameError> {
        let Some(value) = self.get(name) else {
            return Ok(None);
        };
        let Value::Number(n) = value else {
            return Err(self.invalid(format!(
                "field \"{name}\" must be a non-negative integer, got {}",
                json_type_name(value)
            )));
        };
        if let Some(v) = n.as_u64() {
            return Ok(Some(v));
        }
        let message = if n.is_i64() {
            format!("field \"{name}\" must be a non-negative integer, got {n}")
        } else {
            match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f >= u64::MAX as f64 => {
                    format!("field \"{name}\" is too large (max {})", u64::MAX)
                }
                Some(f) if f < 0.0 => {
                    format!("field \"{name}\" must be a non-negative integer, got {n}")
                }
                _ => format!("field \"{name}\" must be an integer, got {n}"),
            }
        };
        Err(self.invalid(message))
    }
}
