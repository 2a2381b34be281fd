//! seqcast-client: an async client for seqcast, the WebSocket push server.
//!
//! One [`Client`] keeps one WebSocket open to a seqcast server and follows any number of
//! subscription keys (`{channel}:{request_id}`). Each [`Subscription`] is a [`Stream`] of
//! [`Event`]s: `Subscribed` when the server acknowledges it, then every message of the key in
//! strictly increasing `sequence_number` order and never twice, and an explicit [`Event::Gap`]
//! when the server says it could not hand over everything after a reconnect (re-fetch your
//! state for that key).
//!
//! When the connection drops, the client reconnects with capped exponential backoff and full
//! jitter. Every attempt asks the [`TokenProvider`] for a fresh JWT and sends `hello` with the
//! session id and a `connection_sequence` one higher than the last; then it resumes every key
//! with `since` = the last sequence number it yielded for that key (or the `sub_ack.head` if none
//! yet) and the `epoch` it came from, in one `resume` frame (one per epoch), so the server replays
//! exactly what was missed; keys without a position yet, and every key on a server that does not
//! take `resume`, go as one `subscribe` each. While connected, the provider is asked again
//! before the token's `exp` and the fresh token is sent in an `auth` frame: subscriptions and
//! positions are untouched.
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use seqcast_client::{Client, Event, fixed_token};
//!
//! # async fn run() -> Result<(), seqcast_client::Error> {
//! let client = Client::connect("ws://127.0.0.1:8080/ws", fixed_token("eyJ…")).await?;
//! let mut results = client.subscribe("search", "r1").await?;
//! while let Some(event) = results.next().await {
//!     match event {
//!         Event::Message(m) => println!("#{} {}", m.sequence_number, m.data_json()),
//!         Event::Gap(gap) => eprintln!("lost messages after {:?}", gap.since),
//!         Event::Refused(r) => eprintln!("the server refused {}: {}", r.key, r.message),
//!         Event::Subscribed(_) => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! A [`Publisher`] publishes over its own WebSocket (a token with `publish: true`): pipelined,
//! in order, and across reconnects without publishing anything twice — every message carries a
//! `message_id` (made by the publisher when the caller gives none) and unanswered ones are sent
//! again after a reconnect, which the server answers as retries with their first numbers.
//!
//! Boundary: speaks seqcast's WebSocket protocol (docs/protocol.md) through the frame types,
//! encoders and decoders of `seqcast-protocol`; it does no HTTP (recovery over
//! `GET /websocket/messages` is left to the caller).
//!
//! Invariant: per key, the application never sees a `sequence_number` at or below one it has
//! already seen — except right after an [`Event::Gap`] with [`GapReason::EpochChanged`], where the
//! server's store was replaced and its numbers restarted.
//!
//! [`Stream`]: futures_util::Stream

mod client;
mod driver;
mod error;
mod event;
mod publisher;
mod token;
mod tracker;

pub use client::{Client, ClientBuilder, Subscription};
pub use error::{BoxError, Error};
pub use event::{
    ConnectionInfo, ConnectionState, Event, Gap, GapReason, Message, Refused, Subscribed,
};
pub use publisher::{Outgoing, PendingAck, PublishError, Publisher, PublisherBuilder};
pub use seqcast_protocol::{
    Channel, ErrorCode, ErrorFrame, MessageId, PublishResponse, RawValue, RequestId, SessionId,
    SubscriptionKey,
};
pub use token::{TokenProvider, fixed_token};
pub use tracker::Resume;
