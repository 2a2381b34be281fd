//! Publishing over a stream: the WebSocket `publish` frame and its `publish_ack`, and the
//! NDJSON lines of `POST /api/publish/stream`.
//!
//! A `publish` frame carries the same fields as a `POST /api/publish` body plus `ref`, the
//! client's tag for the frame, echoed in its `publish_ack` (or in the `error` that refuses it).
//! `data` is kept as raw JSON text, never re-parsed into a tree, exactly as over HTTP.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::client::{FrameError, json_type_name, truncate_for_echo};
use crate::http::{PublishRequest, push_publish_numbers};
use crate::names::{Channel, MessageId, RequestId, SubscriptionKey};
use crate::server::{push_json_str, push_u64};

/// Longest `ref` string, in bytes: it is echoed in every answer.
pub const REF_MAX_LEN: usize = 128;

/// A publisher's tag for one `publish` frame, echoed in its answer: a non-negative integer or a
/// string of at most [`REF_MAX_LEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PublishRef {
    /// A counter, e.g. 1, 2, 3 …
    Number(u64),
    /// Any short string.
    Text(String),
}

impl fmt::Display for PublishRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishRef::Number(n) => write!(f, "{n}"),
            PublishRef::Text(s) => f.write_str(s),
        }
    }
}

impl From<u64> for PublishRef {
    fn from(n: u64) -> Self {
        PublishRef::Number(n)
    }
}

impl PublishRef {
    fn from_value(v: Option<&Value>) -> Result<Self, FrameError> {
        let invalid = |message: String| FrameError::InvalidField {
            frame: "publish".to_owned(),
            message,
        };
        match v {
            None | Some(Value::Null) => Err(invalid(
                "missing field \"ref\" (a non-negative integer or a string, echoed in the answer)"
                    .into(),
            )),
            Some(Value::Number(n)) => n.as_u64().map(PublishRef::Number).ok_or_else(|| {
                invalid(format!(
                    "field \"ref\" must be a non-negative integer or a string, got {n}"
                ))
            }),
            Some(Value::String(s)) if s.len() > REF_MAX_LEN => Err(invalid(format!(
                "field \"ref\" is {} bytes; the limit is {REF_MAX_LEN}",
                s.len()
            ))),
            Some(Value::String(s)) => Ok(PublishRef::Text(s.clone())),
            Some(other) => Err(invalid(format!(
                "field \"ref\" must be a non-negative integer or a string, got {}",
                json_type_name(other)
            ))),
        }
    }

    fn push_json(&self, out: &mut String) {
        match self {
            PublishRef::Number(n) => push_u64(out, *n),
            PublishRef::Text(s) => push_json_str(out, s),
        }
    }
}

/// `publish`: one message to commit, answered `publish_ack` (or `error`) with the same `ref`,
/// in the order the frames were sent.
#[derive(Debug, Clone, Serialize)]
pub struct Publish {
    /// The client's tag, echoed.
    #[serde(rename = "ref")]
    pub r#ref: PublishRef,
    /// The key's channel.
    pub channel: Channel,
    /// The key's request id.
    pub request_id: RequestId,
    /// Any JSON; kept verbatim.
    pub data: Box<RawValue>,
    /// Idempotency key within the stream (CONTRACT §3): a byte-identical repeat is answered
    /// with the numbers first committed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<MessageId>,
}

impl Publish {
    /// The subscription key to publish to.
    pub fn key(&self) -> SubscriptionKey {
        SubscriptionKey::new(self.channel.clone(), self.request_id.clone())
    }

    /// The frame as the HTTP publish body it is equivalent to, and its `ref`.
    pub fn into_request(self) -> (PublishRef, PublishRequest) {
        (
            self.r#ref,
            PublishRequest {
                channel: self.channel,
                request_id: self.request_id,
                data: self.data,
                message_id: self.message_id,
            },
        )
    }
}

impl PartialEq for Publish {
    fn eq(&self, other: &Self) -> bool {
        self.r#ref == other.r#ref
            && self.channel == other.channel
            && self.request_id == other.request_id
            && self.data.get() == other.data.get()
            && self.message_id == other.message_id
    }
}

impl Eq for Publish {}

/// `data` as raw text, present even when it is JSON `null` (as over HTTP).
fn present_raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// A `publish` frame with every field still unchecked, so each rejection can carry the `ref`.
/// Any JSON object reads as one (other frames' fields are ignored); `type` tells.
#[derive(Deserialize)]
struct WirePublishFrame<'a> {
    #[serde(rename = "type", borrow, default)]
    ty: Option<Cow<'a, str>>,
    #[serde(rename = "ref", default)]
    reference: Option<Value>,
    #[serde(default, borrow)]
    channel: Option<&'a RawValue>,
    #[serde(default, borrow)]
    request_id: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "present_raw")]
    data: Option<Box<RawValue>>,
    #[serde(default, borrow)]
    message_id: Option<&'a RawValue>,
}

/// Just the `type` of a frame that does not read as a [`WirePublishFrame`].
#[derive(Deserialize)]
struct TypeOnly<'a> {
    #[serde(rename = "type", borrow, default)]
    ty: Option<Cow<'a, str>>,
}

/// A string field of a `publish` frame: `Ok(None)` when absent or null.
fn str_field<'a>(
    name: &str,
    raw: Option<&'a RawValue>,
) -> Result<Option<Cow<'a, str>>, FrameError> {
    let invalid = |message: String| FrameError::InvalidField {
        frame: "publish".to_owned(),
        message,
    };
    let Some(raw) = raw else {
        return Ok(None);
    };
    if raw.get() == "null" {
        return Ok(None);
    }
    match serde_json::from_str::<Cow<'a, str>>(raw.get()) {
        Ok(s) => Ok(Some(s)),
        Err(_) => {
            let v: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
            Err(invalid(format!(
                "field \"{name}\" must be a string, got {}",
                json_type_name(&v)
            )))
        }
    }
}

/// Decodes `text` as a `publish` frame when its `type` is `"publish"`; `None` for any other
/// frame (or text that is not a JSON object), which the general decoder then handles.
pub(crate) fn decode_publish_frame(text: &str) -> Option<Result<Publish, FrameError>> {
    // One pass over the frame for the common case (a readable object): its `type` comes with
    // the publish fields. Only text that does not read as one is looked at again, for its
    // `type` alone, to tell a broken `publish` from any other frame.
    let wire: WirePublishFrame<'_> = match serde_json::from_str(text) {
        Ok(w) => w,
        Err(e) => {
            let head: TypeOnly<'_> = serde_json::from_str(text).ok()?;
            if head.ty.as_deref() != Some("publish") {
                return None;
            }
            return Some(Err(FrameError::InvalidField {
                frame: "publish".to_owned(),
                message: e.to_string(),
            }));
        }
    };
    if wire.ty.as_deref() != Some("publish") {
        return None;
    }
    let reference = match PublishRef::from_value(wire.reference.as_ref()) {
        Ok(r) => r,
        Err(e) => return Some(Err(e)),
    };
    let fields = || -> Result<Publish, FrameError> {
        let missing = |name: &str| FrameError::InvalidField {
            frame: "publish".to_owned(),
            message: format!("missing field \"{name}\""),
        };
        let channel = str_field("channel", wire.channel)?.ok_or_else(|| missing("channel"))?;
        let request_id =
            str_field("request_id", wire.request_id)?.ok_or_else(|| missing("request_id"))?;
        let message_id = str_field("message_id", wire.message_id)?;
        let data = wire.data.ok_or_else(|| missing("data"))?;
        Ok(Publish {
            r#ref: reference.clone(),
            channel: Channel::parse(&channel)?,
            request_id: RequestId::parse(&request_id)?,
            data,
            message_id: message_id.as_deref().map(MessageId::parse).transpose()?,
        })
    };
    Some(fields().map_err(|error| FrameError::Publish {
        r#ref: reference.clone(),
        error: Box::new(error),
    }))
}

/// `publish_ack`: the numbers a `publish` frame was committed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishAck {
    /// The `ref` of the `publish` frame answered.
    #[serde(rename = "ref")]
    pub r#ref: PublishRef,
    /// The deployment-wide sequence number of the event.
    pub sequence_number: u64,
    /// The row's position in its stream.
    pub stream_sequence: u64,
    /// The message id given, or the one the server made.
    pub message_id: MessageId,
}

/// Encodes a `publish_ack` frame (once per published message, so written by hand like
/// `message`): `{"type":"publish_ack","ref":…,"sequence_number":…,"stream_sequence":…,"message_id":"…"}`.
pub fn encode_publish_ack(ack: &PublishAck) -> String {
    let mut out = String::with_capacity(120 + ack.message_id.as_str().len());
    out.push_str(r#"{"type":"publish_ack","ref":"#);
    ack.r#ref.push_json(&mut out);
    out.push(',');
    push_publish_numbers(
        &mut out,
        ack.sequence_number,
        ack.stream_sequence,
        &ack.message_id,
    );
    out
}

/// Echo-safe text of a refused `ref` (for log lines).
pub fn ref_for_log(r: &PublishRef) -> String {
    truncate_for_echo(&r.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::{ClientFrame, ServerFrame, decode_client_frame, decode_server_frame};

    #[test]
    fn a_publish_frame_keeps_data_verbatim_and_its_ref() {
        let text =
            r#"{"type":"publish","ref":7,"channel":"c","request_id":"r","data":{"a": 1.0e0 }}"#;
        match decode_client_frame(text).unwrap() {
            ClientFrame::Publish(p) => {
                assert_eq!(p.r#ref, PublishRef::Number(7));
                assert_eq!(p.data.get(), r#"{"a": 1.0e0 }"#);
                assert_eq!(p.message_id, None);
            }
            other => panic!("{other:?}"),
        }
        // `data: null` is data, as over HTTP.
        let text = r#"{"type":"publish","ref":"x","channel":"c","request_id":"r","data":null,"message_id":"m1"}"#;
        match decode_client_frame(text).unwrap() {
            ClientFrame::Publish(p) => {
                assert_eq!(p.data.get(), "null");
                assert_eq!(p.message_id.unwrap().as_str(), "m1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_publish_frame_names_its_ref_when_it_has_one() {
        let bad_name =
            r#"{"type":"publish","ref":"a1","channel":"no:colon","request_id":"r","data":1}"#;
        let err = decode_client_frame(bad_name).unwrap_err();
        assert_eq!(err.publish_ref(), Some(&PublishRef::Text("a1".into())));
        assert!(err.to_string().contains("channel"), "{err}");
        let no_data = r#"{"type":"publish","ref":3,"channel":"c","request_id":"r"}"#;
        let err = decode_client_frame(no_data).unwrap_err();
        assert_eq!(err.publish_ref(), Some(&PublishRef::Number(3)));
        assert!(err.to_string().contains("data"), "{err}");
        let wrong_type = r#"{"type":"publish","ref":3,"channel":5,"request_id":"r","data":1}"#;
        assert!(
            decode_client_frame(wrong_type)
                .unwrap_err()
                .to_string()
                .contains("must be a string")
        );
        let no_ref = r#"{"type":"publish","channel":"c","request_id":"r","data":1}"#;
        let err = decode_client_frame(no_ref).unwrap_err();
        assert_eq!(err.publish_ref(), None);
        assert!(err.to_string().contains("ref"), "{err}");
        let long_ref = format!(
            r#"{{"type":"publish","ref":"{}","channel":"c","request_id":"r","data":1}}"#,
            "x".repeat(REF_MAX_LEN + 1)
        );
        assert!(decode_client_frame(&long_ref).is_err());
    }

    #[test]
    fn publish_frames_and_acks_round_trip() {
        let p = Publish {
            r#ref: PublishRef::Text("q\"1".into()),
            channel: Channel::parse("c").unwrap(),
            request_id: RequestId::parse("r").unwrap(),
            data: RawValue::from_string("[1,2]".into()).unwrap(),
            message_id: Some(MessageId::parse("m").unwrap()),
        };
        let text = serde_json::to_string(&ClientFrame::Publish(p.clone())).unwrap();
        assert_eq!(decode_client_frame(&text).unwrap(), ClientFrame::Publish(p));
        let ack = PublishAck {
            r#ref: PublishRef::Text("q\"1".into()),
            sequence_number: 12,
            stream_sequence: 3,
            message_id: MessageId::parse("m").unwrap(),
        };
        let text = encode_publish_ack(&ack);
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            serde_json::json!({"type":"publish_ack","ref":"q\"1","sequence_number":12,"stream_sequence":3,"message_id":"m"})
        );
        assert_eq!(
            decode_server_frame(&text).unwrap(),
            ServerFrame::PublishAck(ack)
        );
    }
}
