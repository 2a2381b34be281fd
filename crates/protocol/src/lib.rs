//! seqcast's wire protocol: the validated names, the WebSocket frames in both directions and
//! the HTTP bodies — every type that is serialized on the wire, and nothing else.
//!
//! Boundary: pure functions from text/bytes to typed values and back. No I/O, no async
//! runtime, no clock — the server crate does all of that and calls in here.
//!
//! Invariant: a value of a name type ([`Channel`], [`RequestId`], [`MessageId`],
//! [`SessionId`], [`SubscriptionKey`]) is always valid by its grammar, so nothing downstream
//! re-checks it and encoders can write names without escaping. A subscription key's text form
//! `{channel}:{request_id}` splits one way only, because a channel never contains `:`.

mod client;
#[doc(hidden)]
pub mod fuzz_checks;
mod http;
mod names;
mod pattern;
mod publish;
mod schema;
mod server;

pub use client::{
    Auth, ClientFrame, FrameError, Hello, InvalidEntry, Resume, ResumeEntry, ResumeKey, Subscribe,
    Unsubscribe, decode_client_frame,
};
pub use http::{
    BatchPublishRequest, BatchPublishResponse, BodyError, DEFAULT_PAGE, ErrorBody, ErrorDetail,
    EventsParams, LiveMode, MAX_LONG_POLL_SECS, MAX_PAGE, ParamError, PublishRequest,
    PublishResponse, RecoverParams, RecoveryMeta, RecoveryResponse, SseEvent, StreamPage,
    StreamParams, StreamTicket, decode_batch, decode_events_query, decode_publish, decode_query,
    encode_publish_response, encode_recovery_response, encode_stream_page, page_limit,
    parse_u64_param,
};
pub use names::{
    CHANNEL_MAX_LEN, Channel, ID_MAX_LEN, MessageId, MessageIdRef, NameError, NameKind, RequestId,
    SessionId, SubscriptionKey,
};
pub use pattern::KeyPattern;
pub use publish::{Publish, PublishAck, PublishRef, REF_MAX_LEN, encode_publish_ack, ref_for_log};
/// Re-exported so users can build [`MessageFrame::data`] and [`PublishRequest::data`].
pub use serde_json::value::RawValue;
pub use server::{
    AuthOk, Connected, ErrorCode, ErrorFrame, MessageFrame, MessageRef, ResumeAck, ResumeResult,
    ServerFrame, SubAck, decode_server_frame, encode_message, encode_message_ref,
    encode_server_frame,
};

/// Runs the README's example as a doctest, so it cannot drift from the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
