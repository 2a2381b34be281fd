//! The handles: [`Client`], its builder and [`Subscription`].

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use seqcast_protocol::{Channel, ErrorFrame, RequestId, SessionId, SubscriptionKey};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::Instrument;

use crate::driver::{Command, Config, Driver, Shared};
use crate::error::Error;
use crate::event::{ConnectionState, Event};
use crate::token::{SharedTokens, TokenProvider};
use crate::tracker::Resume;

/// Settings for a [`Client`]; made by [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    session_id: Option<SessionId>,
    last_connection_sequence: u64,
    backoff_initial: Duration,
    backoff_max: Duration,
    connect_timeout: Duration,
    ping_interval: Option<Duration>,
}

impl ClientBuilder {
    /// The session id sent in every `hello` (default: random, made once per client).
    pub fn session_id(mut self, session_id: SessionId) -> Self {
        self.session_id = Some(session_id);
        self
    }

    /// The `connection_sequence` of the session's latest connection, to continue a session
    /// across runs of the program: the next connection is numbered one higher (default 0, so
    /// the first connection is 1).
    pub fn last_connection_sequence(mut self, n: u64) -> Self {
        self.last_connection_sequence = n;
        self
    }

    /// Reconnect backoff: attempt `n` (from 0) waits a uniform random time in
    /// `[0, min(max, initial · 2^n))` (default 500 ms and 30 s). `n` starts over only after a
    /// connection that stayed up for `max`.
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

    /// Send `ping` this often, and reconnect after two intervals without any frame from the
    /// server (default 25 s; `None` turns the heartbeat off).
    pub fn ping_interval(mut self, interval: Option<Duration>) -> Self {
        self.ping_interval = interval.filter(|d| !d.is_zero());
        self
    }

    /// Connects and waits for the server's `connected`. A failed first attempt is returned as
    /// the error (bad URL, refused token, server down); after that the client reconnects on its
    /// own whenever the connection is lost.
    pub async fn connect(self, tokens: impl TokenProvider) -> Result<Client, Error> {
        let (first_tx, first_rx) = oneshot::channel();
        let client = self.spawn(tokens, Some(first_tx))?;
        match first_rx.await {
            Ok(Ok(())) => Ok(client),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Closed),
        }
    }

    /// Starts connecting in the background and returns at once; every failure, the first
    /// included, is retried with backoff. Watch [`Client::watch_state`] to see progress.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(self, tokens: impl TokenProvider) -> Result<Client, Error> {
        self.spawn(tokens, None)
    }

    fn spawn(
        self,
        tokens: impl TokenProvider,
        first: Option<oneshot::Sender<Result<(), Error>>>,
    ) -> Result<Client, Error> {
        check_url(&self.url)?;
        let session_id = match self.session_id {
            Some(s) => s,
            None => SessionId::new(format!("{:016x}", rand::random::<u64>()))?,
        };
        let (state, _) = watch::channel(ConnectionState::Connecting { attempt: 0 });
        let (errors, _) = broadcast::channel(64);
        let shared = Arc::new(Shared {
            connection_sequence: AtomicU64::new(self.last_connection_sequence),
            next_subscription_id: AtomicU64::new(1),
            state,
            errors,
            session_id: session_id.clone(),
        });
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let span = tracing::info_span!("seqcast_client", url = %self.url, session_id = %session_id);
        let driver = Driver::new(
            Config {
                url: self.url,
                session_id,
                backoff_initial: self.backoff_initial,
                backoff_max: self.backoff_max,
                connect_timeout: self.connect_timeout,
                ping_interval: self.ping_interval,
            },
            SharedTokens(Arc::new(tokens)),
            commands_rx,
            Arc::clone(&shared),
        );
        // The connection task (see `driver`): owns the socket, ends on `close` or when every
        // `Client` handle is dropped.
        tokio::spawn(driver.run(first).instrument(span));
        Ok(Client { commands, shared })
    }
}

pub(crate) fn check_url(url: &str) -> Result<(), Error> {
    let invalid = |reason: &str| Error::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    if url.starts_with("wss://") {
        return Err(invalid(
            "wss:// needs TLS, which this build of seqcast-client does not include",
        ));
    }
    if !url.starts_with("ws://") {
        return Err(invalid("expected a ws:// URL"));
    }
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    url.into_client_request()
        .map(|_| ())
        .map_err(|e| invalid(&e.to_string()))
}

/// A connection to a seqcast server that follows subscription keys and survives reconnects.
///
/// Cheap to clone; all clones drive the same connection. The connection closes when
/// [`close`](Client::close) is called or the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl Client {
    /// Settings for a client of the server at `url` (e.g. `ws://127.0.0.1:8080/ws`).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            session_id: None,
            last_connection_sequence: 0,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            ping_interval: Some(Duration::from_secs(25)),
        }
    }

    /// Connects with default settings; see [`ClientBuilder::connect`].
    pub async fn connect(
        url: impl Into<String>,
        tokens: impl TokenProvider,
    ) -> Result<Client, Error> {
        Client::builder(url).connect(tokens).await
    }

    /// Follows `channel:request_id`: the stream yields `Subscribed`, the key's backlog, then
    /// live messages, and keeps doing so across reconnects (resuming after the last message
    /// it yielded).
    pub async fn subscribe(&self, channel: &str, request_id: &str) -> Result<Subscription, Error> {
        self.subscribe_inner(channel, request_id, None).await
    }

    /// Follows `channel:request_id` starting after `resume.since` (for a position kept from an
    /// earlier run): the server replays what followed, or says it cannot ([`Event::Gap`]).
    pub async fn subscribe_from(
        &self,
        channel: &str,
        request_id: &str,
        resume: Resume,
    ) -> Result<Subscription, Error> {
        self.subscribe_inner(channel, request_id, Some(resume))
            .await
    }

    async fn subscribe_inner(
        &self,
        channel: &str,
        request_id: &str,
        resume: Option<Resume>,
    ) -> Result<Subscription, Error> {
        let key = SubscriptionKey::new(Channel::new(channel)?, RequestId::new(request_id)?);
        let id = self
            .shared
            .next_subscription_id
            .fetch_add(1, Ordering::Relaxed);
        let (events, events_rx) = mpsc::unbounded_channel();
        let (reply, reply_rx) = oneshot::channel();
        self.commands
            .send(Command::Subscribe {
                key: key.clone(),
                id,
                resume,
                events,
                reply,
            })
            .map_err(|_| Error::Closed)?;
        reply_rx.await.map_err(|_| Error::Closed)??;
        Ok(Subscription {
            key,
            id,
            events: events_rx,
            commands: self.commands.downgrade(),
            active: true,
        })
    }

    /// Stops following `channel:request_id` (whichever [`Subscription`] follows it; its stream
    /// ends). Returns whether the key was followed.
    pub async fn unsubscribe(&self, channel: &str, request_id: &str) -> Result<bool, Error> {
        let key = SubscriptionKey::new(Channel::new(channel)?, RequestId::new(request_id)?);
        let (reply, reply_rx) = oneshot::channel();
        self.commands
            .send(Command::Unsubscribe {
                key,
                id: None,
                reply: Some(reply),
            })
            .map_err(|_| Error::Closed)?;
        reply_rx.await.map_err(|_| Error::Closed)
    }

    /// The number of the session's latest connection (1 for the first; 0 before it).
    pub fn connection_sequence(&self) -> u64 {
        self.shared.connection_sequence.load(Ordering::SeqCst)
    }

    /// The session id sent in every `hello`.
    pub fn session_id(&self) -> &SessionId {
        &self.shared.session_id
    }

    /// Where the connection stands now.
    pub fn state(&self) -> ConnectionState {
        self.shared.state.borrow().clone()
    }

    /// Every change of [`state`](Client::state), e.g. to wait for a reconnect:
    /// `client.watch_state().wait_for(ConnectionState::is_connected).await`.
    pub fn watch_state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.subscribe()
    }

    /// `error` frames the server sends from now on (a refused `subscribe`, a rate limit…).
    /// They are logged either way.
    pub fn server_errors(&self) -> broadcast::Receiver<ErrorFrame> {
        self.shared.errors.subscribe()
    }

    /// Drops the current connection and reconnects at once (skipping any backoff), resuming
    /// every key. For tests, demos, or after a network change the application knows of.
    pub fn reconnect(&self) {
        let _ = self.commands.send(Command::Reconnect);
    }

    /// Closes the connection for good (close code 1000) and ends every subscription stream.
    pub async fn close(&self) {
        let (reply, reply_rx) = oneshot::channel();
        if self.commands.send(Command::Close { reply }).is_ok() {
            let _ = reply_rx.await;
        }
    }
}

/// The events of one followed key; a [`Stream`] of [`Event`]s. Ends when the key is
/// unsubscribed or the client closes. Dropping it unsubscribes the key.
///
/// Events are queued without bound while the application does not poll, so that a slow
/// consumer never holds up the connection (its pings, its other keys).
#[derive(Debug)]
pub struct Subscription {
    key: SubscriptionKey,
    id: u64,
    events: mpsc::UnboundedReceiver<Event>,
    commands: mpsc::WeakUnboundedSender<Command>,
    active: bool,
}

impl Subscription {
    /// The key this subscription follows.
    pub fn key(&self) -> &SubscriptionKey {
        &self.key
    }

    /// The next event; `None` once the subscription has ended.
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Stops following the key.
    pub fn unsubscribe(mut self) {
        self.send_unsubscribe();
    }

    fn send_unsubscribe(&mut self) {
        if !std::mem::replace(&mut self.active, false) {
            return;
        }
        if let Some(commands) = self.commands.upgrade() {
            let _ = commands.send(Command::Unsubscribe {
                key: self.key.clone(),
                id: Some(self.id),
                reply: None,
            });
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.send_unsubscribe();
    }
}

impl Stream for Subscription {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}
