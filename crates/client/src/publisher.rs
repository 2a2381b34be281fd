//! [`Publisher`]: publishes over one WebSocket, pipelined, and survives reconnects without
//! publishing anything twice.
//!
//! Every message gets a `message_id` before it is first sent (the caller's, or one made here),
//! and its frame is encoded once. Messages are sent in the order [`Publisher::send`] was
//! called, many in flight; the server answers them in that order. When the connection drops,
//! the publisher reconnects (capped exponential backoff with full jitter, a fresh token on every
//! attempt) and sends every message not yet acknowledged again, in order, byte for byte: the
//! server answers one it had already committed with the numbers it was first committed with
//! (CONTRACT §3: a repeat of a `message_id` with the same data is a retry), so nothing is
//! published twice and every caller gets its message's one set of numbers.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use seqcast_protocol::{
    Auth, Channel, ClientFrame, ErrorCode, ErrorFrame, MessageId, Publish, PublishRef,
    PublishResponse, RawValue, RequestId, ServerFrame, SessionId, decode_server_frame,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::client::check_url;
use crate::driver::{Config, Shared, Ws, client_frame, next_token, open, stayed_up};
use crate::error::Error;
use crate::event::ConnectionState;
use crate::token::{Refresh, SharedTokens, TokenProvider};
use crate::tracker::backoff_delay;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The key's channel.
    pub channel: Channel,
    /// The key's request id.
    pub request_id: RequestId,
    /// The message, as JSON text (sent verbatim).
    pub data: Box<RawValue>,
    /// The idempotency key within the stream; made by the publisher when `None`.
    pub message_id: Option<MessageId>,
}

impl Outgoing {
    /// A message with `data` serialized to JSON.
    pub fn json(
        channel: &str,
        request_id: &str,
        data: &impl serde::Serialize,
    ) -> Result<Self, Error> {
        let text = serde_json::to_string(data)
            .map_err(|e| Error::Protocol(format!("data is not serializable to JSON: {e}")))?;
        Ok(Outgoing {
            channel: Channel::parse(channel)?,
            request_id: RequestId::parse(request_id)?,
            data: RawValue::from_string(text)
                .map_err(|e| Error::Protocol(format!("data is not JSON: {e}")))?,
            message_id: None,
        })
    }

    /// The same message with this idempotency key.
    pub fn with_message_id(mut self, id: MessageId) -> Self {
        self.message_id = Some(id);
        self
    }
}

/// Why one publish failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The server refused the message (`forbidden`, `bad_request`, `rate_limited`,
    /// `unavailable`, …); nothing of it was published. Sending it again is safe.
    #[error("server refused the publish ({}): {}", .0.code, .0.message)]
    Refused(ErrorFrame),
    /// The publisher was closed before the server answered; the message may or may not have
    /// been committed (publish it again with the same `message_id` to find out).
    #[error("the publisher closed before the server answered")]
    Closed,
}

/// The answer to one [`Publisher::send`]: resolves once the server committed the message (or
/// refused it).
#[derive(Debug)]
pub struct PendingAck {
    message_id: MessageId,
    answer: oneshot::Receiver<Result<PublishResponse, PublishError>>,
}

impl PendingAck {
    /// The message's id (the caller's, or the one the publisher made).
    pub fn message_id(&self) -> &MessageId {
        &self.message_id
    }
}

impl Future for PendingAck {
    type Output = Result<PublishResponse, PublishError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.answer)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(PublishError::Closed)))
    }
}

/// Settings for a [`Publisher`]; made by [`Publisher::builder`].
#[derive(Debug, Clone)]
pub struct PublisherBuilder {
    url: String,
    max_in_flight: usize,
    backoff_initial: Duration,
    backoff_max: Duration,
    connect_timeout: Duration,
}

impl PublisherBuilder {
    /// Messages sent and not yet answered, at most (default 256; at least 1).
    /// [`Publisher::send`] waits while this many are out.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Reconnect backoff: attempt `n` (from 0) waits a uniform random time in
    /// `[0, min(max, initial · 2^n))` (default 200 ms and 10 s).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max.max(initial);
        self
    }

    /// Deadline for the WebSocket handshake and, separately, for `connected` (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Connects and waits for `connected`; a failed first attempt is the error. After that the
    /// publisher reconnects on its own.
    pub async fn connect(self, tokens: impl TokenProvider) -> Result<Publisher, Error> {
        check_url(&self.url)?;
        let (first_tx, first_rx) = oneshot::channel();
        let session_id = SessionId::new(format!("pub-{:016x}", rand::random::<u64>()))?;
        let (state, state_rx) = watch::channel(ConnectionState::Connecting { attempt: 0 });
        let (errors, _) = broadcast::channel(16);
        let shared = Arc::new(Shared {
            connection_sequence: AtomicU64::new(0),
            next_subscription_id: AtomicU64::new(1),
            state,
            errors,
            session_id: session_id.clone(),
        });
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let task = PublishTask {
            config: Config {
                url: self.url,
                session_id,
                backoff_initial: self.backoff_initial,
                backoff_max: self.backoff_max,
                connect_timeout: self.connect_timeout,
                ping_interval: None,
            },
            tokens: SharedTokens(Arc::new(tokens)),
            shared,
            commands: commands_rx,
            unacked: VecDeque::new(),
            closing: false,
            refresh: None,
        };
        tokio::spawn(task.run(Some(first_tx)));
        match first_rx.await {
            Ok(Ok(())) => Ok(Publisher {
                commands,
                window: Arc::new(Semaphore::new(self.max_in_flight)),
                ids: Arc::new(IdMaker::default()),
                state: state_rx,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Closed),
        }
    }
}

/// Publishes over one WebSocket to a seqcast server, pipelined, in order, with reconnects that
/// publish nothing twice. Cheap to clone; the connection task ends once every handle is dropped
/// and every message sent is answered.
///
/// The token must carry `publish: true` (and, with `channels`, patterns that cover the keys).
///
/// ```no_run
/// use seqcast_client::{Outgoing, Publisher, fixed_token};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let publisher = Publisher::connect("ws://127.0.0.1:8080/ws", fixed_token("eyJ…")).await?;
/// // Pipelined: send many, then wait for their acks (each in order).
/// let mut acks = Vec::new();
/// for token in ["Hel", "lo", "!"] {
///     acks.push(publisher.send(Outgoing::json("search", "r1", &token)?).await?);
/// }
/// for ack in acks {
///     println!("#{}", ack.await?.sequence_number);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Publisher {
    commands: mpsc::UnboundedSender<Entry>,
    window: Arc<Semaphore>,
    ids: Arc<IdMaker>,
    state: watch::Receiver<ConnectionState>,
}

impl Publisher {
    /// Settings for a publisher of `url` (`ws://host:port/ws` or `wss://…`).
    pub fn builder(url: impl Into<String>) -> PublisherBuilder {
        PublisherBuilder {
            url: url.into(),
            max_in_flight: 256,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// Connects with the default settings (see [`Publisher::builder`]).
    pub async fn connect(
        url: impl Into<String>,
        tokens: impl TokenProvider,
    ) -> Result<Self, Error> {
        Self::builder(url).connect(tokens).await
    }

    /// Queues `message` behind every message sent before it, waiting while
    /// [`PublisherBuilder::max_in_flight`] messages are unanswered; returns its answer to
    /// await. Messages are committed in the order they were sent.
    pub async fn send(&self, message: Outgoing) -> Result<PendingAck, Error> {
        let permit = Arc::clone(&self.window)
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed)?;
        let message_id = match message.message_id {
            Some(id) => id,
            None => self.ids.next()?,
        };
        let (reply, answer) = oneshot::channel();
        let entry = Entry {
            frame: Publish {
                r#ref: PublishRef::Number(0), // numbered by the task
                channel: message.channel,
                request_id: message.request_id,
                data: message.data,
                message_id: Some(message_id.clone()),
            },
            text: None,
            reply,
            _permit: permit,
        };
        self.commands.send(entry).map_err(|_| Error::Closed)?;
        Ok(PendingAck { message_id, answer })
    }

    /// Sends `message` and waits for its answer.
    pub async fn publish(&self, message: Outgoing) -> Result<PublishResponse, PublishError> {
        match self.send(message).await {
            Ok(pending) => pending.await,
            Err(_) => Err(PublishError::Closed),
        }
    }

    /// The connection's state, as it changes.
    pub fn watch_state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }
}

/// Client-made message ids: a random prefix per publisher and a counter, so they are unique
/// across publishers and restarts and increasing within one publisher.
#[derive(Debug)]
struct IdMaker {
    prefix: String,
    next: AtomicU64,
}

impl Default for IdMaker {
    fn default() -> Self {
        IdMaker {
            prefix: format!("p{:016x}", rand::random::<u64>()),
            next: AtomicU64::new(1),
        }
    }
}

impl IdMaker {
    fn next(&self) -> Result<MessageId, Error> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Ok(MessageId::new(format!("{}-{n:012}", self.prefix))?)
    }
}

/// A message the task holds until it is answered.
#[derive(Debug)]
struct Entry {
    frame: Publish,
    /// The encoded frame, once numbered (re-sent byte for byte after a reconnect).
    text: Option<String>,
    reply: oneshot::Sender<Result<PublishResponse, PublishError>>,
    /// The place in the window, freed when the entry is answered.
    _permit: OwnedSemaphorePermit,
}

/// How a served connection ended.
enum Served {
    Lost(String),
    /// Every handle is gone and every message answered.
    Done,
}

struct PublishTask {
    config: Config,
    tokens: SharedTokens,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Entry>,
    /// Sent (or to send) and not answered, in order.
    unacked: VecDeque<Entry>,
    /// Every handle is gone: finish what is unanswered, then stop.
    closing: bool,
    /// The current connection's token refresh.
    refresh: Option<Refresh>,
}

/// Refs count up over the publisher's life, so an answer is matched to its entry.
static NEXT_REF: AtomicU64 = AtomicU64::new(1);

impl PublishTask {
    async fn run(mut self, mut first: Option<oneshot::Sender<Result<(), Error>>>) {
        let mut attempt: u32 = 0;
        loop {
            self.shared
                .state
                .send_replace(ConnectionState::Connecting { attempt });
            let opened = open(
                self.config.clone(),
                self.tokens.clone(),
                Arc::clone(&self.shared),
            )
            .await;
            let reason = match opened {
                Ok((ws, info, exp)) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(Ok(()));
                    }
                    tracing::info!(target: "seqcast_client", client_id = %info.client_id, unacked = self.unacked.len(), "publisher connected");
                    self.shared
                        .state
                        .send_replace(ConnectionState::Connected(info));
                    let opened_at = tokio::time::Instant::now();
                    self.refresh = Some(Refresh::new(self.tokens.clone(), exp));
                    let served = self.serve(ws).await;
                    self.refresh = None;
                    if stayed_up(opened_at.elapsed(), self.config.backoff_max) {
                        attempt = 0;
                    }
                    match served {
                        Served::Done => break,
                        Served::Lost(reason) => reason,
                    }
                }
                Err(e) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(Err(e));
                        break;
                    }
                    e.to_string()
                }
            };
            // Nobody waits for the unanswered ones any more: stop.
            if self.closing && self.unacked.iter().all(|e| e.reply.is_closed()) {
                break;
            }
            let delay = backoff_delay(
                attempt,
                self.config.backoff_initial,
                self.config.backoff_max,
                rand::random::<f64>(),
            );
            attempt = attempt.saturating_add(1);
            tracing::warn!(target: "seqcast_client", reason = %reason, attempt, delay_ms = delay.as_millis() as u64, unacked = self.unacked.len(), "publisher connection lost; reconnecting");
            self.shared
                .state
                .send_replace(ConnectionState::Reconnecting {
                    attempt,
                    delay,
                    reason,
                });
            tokio::time::sleep(delay).await;
        }
        self.shared.state.send_replace(ConnectionState::Closed);
    }

    /// Numbers and encodes an entry once; its text is what every (re)send writes.
    fn encode(entry: &mut Entry) -> WsMessage {
        let text = entry.text.get_or_insert_with(|| {
            entry.frame.r#ref = PublishRef::Number(NEXT_REF.fetch_add(1, Ordering::Relaxed));
            match client_frame(&ClientFrame::Publish(entry.frame.clone())) {
                WsMessage::Text(t) => t.as_str().to_owned(),
                _ => String::new(),
            }
        });
        WsMessage::text(text.clone())
    }

    async fn serve(&mut self, mut ws: Ws) -> Served {
        // Everything unanswered goes again, in order: committed ones are answered as retries.
        for entry in &mut self.unacked {
            if let Err(e) = ws.feed(Self::encode(entry)).await {
                return Served::Lost(format!("re-sending failed: {e}"));
            }
        }
        if let Err(e) = ws.flush().await {
            return Served::Lost(format!("re-sending failed: {e}"));
        }
        loop {
            if self.closing && self.unacked.is_empty() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    ws.close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "publisher closed".into(),
                    })),
                )
                .await;
                return Served::Done;
            }
            tokio::select! {
                entry = self.commands.recv(), if !self.closing => {
                    let Some(entry) = entry else {
                        self.closing = true;
                        continue;
                    };
                    // Everything queued goes out in one flush.
                    let mut batch = vec![entry];
                    while let Ok(more) = self.commands.try_recv() {
                        batch.push(more);
                    }
                    for mut entry in batch {
                        let frame = Self::encode(&mut entry);
                        self.unacked.push_back(entry);
                        if let Err(e) = ws.feed(frame).await {
                            return Served::Lost(format!("sending failed: {e}"));
                        }
                    }
                    if let Err(e) = ws.flush().await {
                        return Served::Lost(format!("sending failed: {e}"));
                    }
                }
                token = next_token(&mut self.refresh) => {
                    if let Err(e) = ws.send(client_frame(&ClientFrame::Auth(Auth { token }))).await {
                        return Served::Lost(format!("sending auth failed: {e}"));
                    }
                }
                msg = ws.next() => match msg {
                    Some(Ok(WsMessage::Text(text))) => {
                        if let Err(why) = self.on_text(text.as_str()) {
                            return Served::Lost(why);
                        }
                    }
                    Some(Ok(WsMessage::Close(frame))) => {
                        return Served::Lost(match frame {
                            Some(f) => format!("server closed the connection ({}: {})", u16::from(f.code), f.reason),
                            None => "server closed the connection".to_owned(),
                        });
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Served::Lost(format!("websocket error: {e}")),
                    None => return Served::Lost("the connection ended".to_owned()),
                },
            }
        }
    }

    /// An answer: the oldest unanswered entry's, or the connection is out of step.
    fn on_text(&mut self, text: &str) -> Result<(), String> {
        let (r, result) = match decode_server_frame(text) {
            Ok(ServerFrame::PublishAck(ack)) => (
                ack.r#ref,
                Ok(PublishResponse {
                    sequence_number: ack.sequence_number,
                    stream_sequence: ack.stream_sequence,
                    message_id: ack.message_id,
                }),
            ),
            Ok(ServerFrame::Error(e)) => match e.r#ref.clone() {
                Some(r) => (r, Err(PublishError::Refused(e))),
                None => {
                    tracing::warn!(target: "seqcast_client", code = %e.code, message = %e.message, "error frame from the server");
                    if e.code == ErrorCode::Unauthorized
                        && let Some(refresh) = self.refresh.as_mut()
                    {
                        refresh.on_unauthorized(&e.message);
                    }
                    return Ok(());
                }
            },
            Ok(ServerFrame::AuthOk(ok)) => {
                if let Some(refresh) = self.refresh.as_mut() {
                    refresh.on_auth_ok(ok.exp);
                }
                return Ok(());
            }
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(target: "seqcast_client", error = %e, "undecodable frame from the server; skipped");
                return Ok(());
            }
        };
        let Some(entry) = self.unacked.pop_front() else {
            return Err(format!("an answer for ref {r} with nothing in flight"));
        };
        if entry.frame.r#ref != r {
            let expected = entry.frame.r#ref.clone();
            self.unacked.push_front(entry);
            return Err(format!(
                "answers out of order: ref {r}, expected {expected}"
            ));
        }
        let _ = entry.reply.send(result);
        Ok(())
    }
}
