//! The connection task: owns the socket and every key's tracker, (re)connects with backoff,
//! re-subscribes after each reconnect and routes frames to the subscriptions.
//!
//! One task per [`Client`](crate::Client), spawned by
//! [`ClientBuilder::start`](crate::ClientBuilder::start) and running inside the `seqcast_client`
//! tracing span. It ends when the client is closed or every `Client` handle is dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use seqcast_protocol::{
    Auth, ClientFrame, Connected, ErrorCode, ErrorFrame, Hello, Resume as ResumeFrame, ResumeAck,
    ResumeEntry, ResumeKey, ServerFrame, SessionId, Subscribe, SubscriptionKey, Unsubscribe,
    decode_server_frame,
};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::error::Error;
use crate::event::{ConnectionInfo, ConnectionState, Event, Refused};
use crate::token::{Refresh, SharedTokens, jwt_exp};
use crate::tracker::{KeyTracker, Resume, backoff_delay, resume_verdict};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Close code sent when the client drops a connection on purpose in order to reconnect (the same
/// as the browser client's).
const RECONNECT_CLOSE_CODE: u16 = 4000;

/// Settings the connection task runs with.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) url: String,
    pub(crate) session_id: SessionId,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) ping_interval: Option<Duration>,
}

/// State shared between the task and the handles.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) connection_sequence: AtomicU64,
    pub(crate) next_subscription_id: AtomicU64,
    pub(crate) state: watch::Sender<ConnectionState>,
    pub(crate) errors: broadcast::Sender<ErrorFrame>,
    pub(crate) session_id: SessionId,
}

/// What a handle asks the task to do.
#[derive(Debug)]
pub(crate) enum Command {
    Subscribe {
        key: SubscriptionKey,
        id: u64,
        resume: Option<Resume>,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// `id: None` removes whichever subscription follows the key.
    Unsubscribe {
        key: SubscriptionKey,
        id: Option<u64>,
        reply: Option<oneshot::Sender<bool>>,
    },
    Reconnect,
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// One followed key.
#[derive(Debug)]
struct Sub {
    id: u64,
    tracker: KeyTracker,
    events: mpsc::UnboundedSender<Event>,
}

/// What to do after a command that came while no connection is open.
enum After {
    Stay,
    ReconnectNow,
    Exit,
}

/// How a served connection ended.
enum Flow {
    Lost(String),
    Exit,
}

#[derive(Debug)]
pub(crate) struct Driver {
    pub(crate) config: Config,
    pub(crate) tokens: SharedTokens,
    pub(crate) commands: mpsc::UnboundedReceiver<Command>,
    pub(crate) shared: Arc<Shared>,
    subs: HashMap<SubscriptionKey, Sub>,
    /// Per key, `subscribe` frames sent on the current connection and not yet acknowledged.
    /// Only the answer to the last one belongs to the key's current subscription; earlier ones
    /// answer a subscription the application has since dropped.
    unacked: HashMap<SubscriptionKey, u32>,
    close_reply: Option<oneshot::Sender<()>>,
    /// The current connection's token refresh.
    refresh: Option<Refresh>,
    /// The keys of each `resume` frame sent on the current connection and not answered yet, in
    /// the order sent (answers come in that order).
    resuming: VecDeque<Vec<SubscriptionKey>>,
    /// Whether to resume with `resume` frames; cleared for good when a server refuses one (it
    /// predates them), and keys are then re-subscribed one `subscribe` each.
    resume_frames: bool,
}

impl Driver {
    pub(crate) fn new(
        config: Config,
        tokens: SharedTokens,
        commands: mpsc::UnboundedReceiver<Command>,
        shared: Arc<Shared>,
    ) -> Self {
        Driver {
            config,
            tokens,
            commands,
            shared,
            subs: HashMap::new(),
            unacked: HashMap::new(),
            close_reply: None,
            refresh: None,
            resuming: VecDeque::new(),
            resume_frames: true,
        }
    }

    /// Runs until closed. With `first`, the first attempt's outcome is reported there and a
    /// failed first attempt ends the task instead of retrying.
    pub(crate) async fn run(mut self, mut first: Option<oneshot::Sender<Result<(), Error>>>) {
        let mut attempt: u32 = 0;
        loop {
            self.set_state(ConnectionState::Connecting { attempt });
            let opened = {
                let open = open(
                    self.config.clone(),
                    self.tokens.clone(),
                    Arc::clone(&self.shared),
                );
                tokio::pin!(open);
                loop {
                    tokio::select! {
                        r = &mut open => break Some(r),
                        cmd = self.commands.recv() => match self.offline_command(cmd) {
                            After::Exit => break None,
                            After::Stay | After::ReconnectNow => {}
                        },
                    }
                }
            };
            let reason = match opened {
                None => return self.finish(),
                Some(Ok((ws, info, exp))) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(Ok(()));
                    }
                    let opened_at = Instant::now();
                    self.refresh = Some(Refresh::new(self.tokens.clone(), exp));
                    let flow = self.serve(ws, info).await;
                    self.refresh = None;
                    // Only a connection that stayed up resets the backoff: a server (or proxy)
                    // that accepts and drops at once is not hammered at the first step's rate.
                    if stayed_up(opened_at.elapsed(), self.config.backoff_max) {
                        attempt = 0;
                    }
                    match flow {
                        Flow::Exit => return self.finish(),
                        Flow::Lost(reason) => reason,
                    }
                }
                Some(Err(e)) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(Err(e));
                        return self.finish();
                    }
                    e.to_string()
                }
            };
            for sub in self.subs.values_mut() {
                sub.tracker.on_disconnect();
            }
            let delay = backoff_delay(
                attempt,
                self.config.backoff_initial,
                self.config.backoff_max,
                rand::random::<f64>(),
            );
            attempt = attempt.saturating_add(1);
            tracing::warn!(
                target: "seqcast_client",
                reason = %reason,
                attempt,
                delay_ms = delay.as_millis() as u64,
                "connection lost or refused; reconnecting"
            );
            self.set_state(ConnectionState::Reconnecting {
                attempt,
                delay,
                reason,
            });
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    cmd = self.commands.recv() => match self.offline_command(cmd) {
                        After::Exit => return self.finish(),
                        After::ReconnectNow => break,
                        After::Stay => {}
                    },
                }
            }
        }
    }

    fn finish(&mut self) {
        // Dropping the senders ends every subscription stream.
        self.subs.clear();
        self.set_state(ConnectionState::Closed);
        if let Some(reply) = self.close_reply.take() {
            let _ = reply.send(());
        }
    }

    fn set_state(&self, state: ConnectionState) {
        self.shared.state.send_replace(state);
    }

    /// Adds a key. `Ok(true)` if it replaces a subscription the application has dropped (whose
    /// server-side subscription must go first); an error if a live one follows the key.
    fn register(
        &mut self,
        key: SubscriptionKey,
        id: u64,
        resume: Option<Resume>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<bool, Error> {
        let replaces = match self.subs.get(&key) {
            Some(existing) if !existing.events.is_closed() => {
                return Err(Error::AlreadySubscribed(key));
            }
            Some(_) => true,
            None => false,
        };
        let tracker = KeyTracker::new(key.clone(), resume);
        self.subs.insert(
            key,
            Sub {
                id,
                tracker,
                events,
            },
        );
        Ok(replaces)
    }

    /// Removes a key; whether it was followed (by the subscription `id`, if given).
    fn remove(&mut self, key: &SubscriptionKey, id: Option<u64>) -> bool {
        match self.subs.get(key) {
            Some(sub) if id.is_none_or(|id| id == sub.id) => {
                self.subs.remove(key);
                true
            }
            _ => false,
        }
    }

    fn offline_command(&mut self, cmd: Option<Command>) -> After {
        match cmd {
            // Every `Client` handle is gone: nobody can subscribe or close any more.
            None => After::Exit,
            Some(Command::Subscribe {
                key,
                id,
                resume,
                events,
                reply,
            }) => {
                let _ = reply.send(self.register(key, id, resume, events).map(|_| ()));
                After::Stay
            }
            Some(Command::Unsubscribe { key, id, reply }) => {
                let removed = self.remove(&key, id);
                if let Some(reply) = reply {
                    let _ = reply.send(removed);
                }
                After::Stay
            }
            Some(Command::Reconnect) => After::ReconnectNow,
            Some(Command::Close { reply }) => {
                self.close_reply = Some(reply);
                After::Exit
            }
        }
    }

    /// Serves one open connection until it is lost or the client closes.
    async fn serve(&mut self, mut ws: Ws, info: ConnectionInfo) -> Flow {
        let connection_sequence = info.connection_sequence;
        tracing::info!(
            target: "seqcast_client",
            client_id = %info.client_id,
            connection_sequence,
            head = info.head,
            keys = self.subs.len(),
            "connected"
        );
        self.set_state(ConnectionState::Connected(info));
        // The server never subscribes on its own: every key goes again, each from where it
        // stopped — the ones with a position in one `resume` frame (one per epoch they were
        // counted in; almost always one), fresh ones with `subscribe`.
        for frame in self.opening_frames() {
            if let Err(e) = ws.feed(frame).await {
                return Flow::Lost(format!("sending resume/subscribe failed: {e}"));
            }
        }
        if let Err(e) = ws.flush().await {
            return Flow::Lost(format!("sending subscribe failed: {e}"));
        }
        let ping_every = self.config.ping_interval;
        let mut heartbeat = tokio::time::interval_at(
            Instant::now() + ping_every.unwrap_or(Duration::from_secs(3600)),
            ping_every.unwrap_or(Duration::from_secs(3600)),
        );
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_frame = Instant::now();
        loop {
            tokio::select! {
                msg = ws.next() => {
                    last_frame = Instant::now();
                    match msg {
                        Some(Ok(WsMessage::Text(text))) => {
                            let replies = self.on_text(text.as_str(), connection_sequence);
                            for frame in replies {
                                if let Err(e) = ws.send(frame).await {
                                    return Flow::Lost(format!("sending failed: {e}"));
                                }
                            }
                        }
                        Some(Ok(WsMessage::Close(frame))) => {
                            return Flow::Lost(match frame {
                                Some(f) => format!(
                                    "server closed the connection ({}: {})",
                                    u16::from(f.code),
                                    f.reason
                                ),
                                None => "server closed the connection".to_owned(),
                            });
                        }
                        // Pings are answered by tungstenite; anything else is a sign of life.
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Flow::Lost(format!("websocket error: {e}")),
                        None => return Flow::Lost("the connection ended".to_owned()),
                    }
                }
                cmd = self.commands.recv() => {
                    let result = match cmd {
                        None => return close(ws, CloseCode::Normal, "client dropped").await,
                        Some(Command::Close { reply }) => {
                            self.close_reply = Some(reply);
                            return close(ws, CloseCode::Normal, "client closed").await;
                        }
                        Some(Command::Reconnect) => {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(1),
                                ws.close(Some(CloseFrame {
                                    code: CloseCode::from(RECONNECT_CLOSE_CODE),
                                    reason: "reconnecting".into(),
                                })),
                            )
                            .await;
                            return Flow::Lost("reconnect requested".to_owned());
                        }
                        Some(Command::Subscribe { key, id, resume, events, reply }) => {
                            match self.register(key.clone(), id, resume, events) {
                                Ok(replaces) => {
                                    let _ = reply.send(Ok(()));
                                    let (since, epoch) = self
                                        .subs
                                        .get(&key)
                                        .map(|s| s.tracker.subscribe_position())
                                        .unwrap_or_default();
                                    if replaces {
                                        // Else the server would answer "already subscribed",
                                        // without the backlog this subscription should get.
                                        let _ = ws.feed(unsubscribe_frame(&key)).await;
                                    }
                                    *self.unacked.entry(key.clone()).or_default() += 1;
                                    ws.send(subscribe_frame(&key, since, epoch)).await
                                }
                                Err(e) => {
                                    let _ = reply.send(Err(e));
                                    Ok(())
                                }
                            }
                        }
                        Some(Command::Unsubscribe { key, id, reply }) => {
                            let removed = self.remove(&key, id);
                            if let Some(reply) = reply {
                                let _ = reply.send(removed);
                            }
                            if removed {
                                ws.send(unsubscribe_frame(&key)).await
                            } else {
                                Ok(())
                            }
                        }
                    };
                    if let Err(e) = result {
                        return Flow::Lost(format!("sending failed: {e}"));
                    }
                }
                token = next_token(&mut self.refresh) => {
                    if let Err(e) = ws.send(client_frame(&ClientFrame::Auth(Auth { token }))).await {
                        return Flow::Lost(format!("sending auth failed: {e}"));
                    }
                }
                _ = heartbeat.tick(), if ping_every.is_some() => {
                    let every = ping_every.unwrap_or_default();
                    if last_frame.elapsed() > every * 2 {
                        return Flow::Lost(format!(
                            "nothing from the server for {} ms",
                            last_frame.elapsed().as_millis()
                        ));
                    }
                    if let Err(e) = ws.send(client_frame(&ClientFrame::Ping)).await {
                        return Flow::Lost(format!("sending ping failed: {e}"));
                    }
                }
            }
        }
    }

    /// The frames that follow a reconnect: `resume` for the keys with a position (grouped by
    /// epoch), `subscribe` for the rest (and for every key when the server does not take
    /// `resume`). Resets the connection's bookkeeping of unanswered frames.
    fn opening_frames(&mut self) -> Vec<WsMessage> {
        self.unacked.clear();
        self.resuming.clear();
        let mut groups: BTreeMap<Option<String>, Vec<ResumeEntry>> = BTreeMap::new();
        let mut frames = Vec::new();
        let mut subscribes = Vec::new();
        for (key, sub) in &self.subs {
            match sub.tracker.subscribe_position() {
                (Some(since), epoch) if self.resume_frames => {
                    groups
                        .entry(epoch)
                        .or_default()
                        .push(ResumeEntry::Key(ResumeKey {
                            channel: key.channel().clone(),
                            request_id: key.request_id().clone(),
                            since,
                        }));
                }
                (since, epoch) => {
                    subscribes.push(subscribe_frame(key, since, epoch));
                    self.unacked.insert(key.clone(), 1);
                }
            }
        }
        for (epoch, entries) in groups {
            for subscriptions in resume_chunks(entries) {
                self.resuming
                    .push_back(subscriptions.iter().filter_map(ResumeEntry::key).collect());
                frames.push(client_frame(&ClientFrame::Resume(ResumeFrame {
                    subscriptions,
                    epoch: epoch.clone(),
                })));
            }
        }
        // `resume` first: the first `bad_request` while one is unanswered is its refusal.
        frames.extend(subscribes);
        frames
    }

    /// A `resume_ack`: each key's verdict acts as its `sub_ack`; a refused key gets
    /// [`Event::Refused`] and is dropped.
    fn on_resume_ack(
        &mut self,
        ack: &ResumeAck,
        connection_sequence: u64,
        dead: &mut Vec<SubscriptionKey>,
    ) {
        let Some(keys) = self.resuming.pop_front() else {
            tracing::warn!(target: "seqcast_client", "resume_ack for no resume; ignored");
            return;
        };
        for (i, result) in ack.results.iter().enumerate() {
            let Some(key) = result
                .subscription_key()
                .cloned()
                .or_else(|| keys.get(i).cloned())
            else {
                continue;
            };
            if self.unacked.contains_key(&key) {
                // Re-subscribed since the resume was sent: that `subscribe`'s answer counts.
                continue;
            }
            let Some(sub) = self.subs.get_mut(&key) else {
                if matches!(result, seqcast_protocol::ResumeResult::Resumed { .. }) {
                    dead.push(key);
                }
                continue;
            };
            match resume_verdict(&key, result, ack) {
                Ok(sub_ack) => {
                    let events = sub.tracker.on_sub_ack(&sub_ack, connection_sequence);
                    if events.into_iter().any(|ev| sub.events.send(ev).is_err()) {
                        dead.push(key);
                    }
                }
                Err(error) => {
                    tracing::warn!(target: "seqcast_client", key = %key, code = %error.code, message = %error.message, "the server refused a key on resume; its subscription ends");
                    let _ = sub.events.send(Event::Refused(Refused {
                        key: key.clone(),
                        code: error.code,
                        message: error.message,
                    }));
                    // Not followed by the server: nothing to unsubscribe.
                    self.subs.remove(&key);
                }
            }
        }
    }

    /// A `bad_request` while a `resume` is unanswered: the server does not take `resume`. Its
    /// keys are subscribed one by one, as every later reconnect will do.
    fn resume_refused(&mut self, e: &ErrorFrame) -> Vec<WsMessage> {
        let Some(keys) = self.resuming.pop_front() else {
            return Vec::new();
        };
        if self.resume_frames {
            tracing::info!(target: "seqcast_client", message = %e.message, "the server does not take resume frames; resuming key by key");
        }
        self.resume_frames = false;
        let mut frames = Vec::new();
        for key in keys {
            if self.unacked.contains_key(&key) {
                continue;
            }
            if let Some(sub) = self.subs.get(&key) {
                let (since, epoch) = sub.tracker.subscribe_position();
                frames.push(subscribe_frame(&key, since, epoch));
                self.unacked.insert(key, 1);
            }
        }
        frames
    }

    /// Routes one server frame; returns the frames to send in reply (`unsubscribe` for keys
    /// the application dropped, `subscribe` where a `resume` was refused).
    fn on_text(&mut self, text: &str, connection_sequence: u64) -> Vec<WsMessage> {
        let mut dead = Vec::new();
        let mut replies = Vec::new();
        match decode_server_frame(text) {
            Ok(ServerFrame::SubAck(ack)) => {
                let stale = match self.unacked.get_mut(&ack.subscription_key) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        true
                    }
                    Some(_) => {
                        self.unacked.remove(&ack.subscription_key);
                        false
                    }
                    None => false,
                };
                if stale {
                    return replies;
                }
                if let Some(sub) = self.subs.get_mut(&ack.subscription_key) {
                    let events = sub.tracker.on_sub_ack(&ack, connection_sequence);
                    if events.into_iter().any(|ev| sub.events.send(ev).is_err()) {
                        dead.push(ack.subscription_key.clone());
                    }
                }
            }
            Ok(ServerFrame::Message(m)) => {
                let key = m.key();
                if let Some(sub) = self.subs.get_mut(&key)
                    && let Some(ev) = sub.tracker.on_message(m)
                    && sub.events.send(ev).is_err()
                {
                    dead.push(key);
                }
            }
            Ok(ServerFrame::Error(e))
                if e.code == ErrorCode::BadRequest
                    && e.r#ref.is_none()
                    && !self.resuming.is_empty() =>
            {
                replies = self.resume_refused(&e);
            }
            Ok(ServerFrame::ResumeAck(ack)) => {
                self.on_resume_ack(&ack, connection_sequence, &mut dead);
            }
            Ok(ServerFrame::Error(e)) => {
                tracing::warn!(
                    target: "seqcast_client",
                    code = %e.code,
                    message = %e.message,
                    "error frame from the server"
                );
                if e.code == ErrorCode::Unauthorized
                    && let Some(refresh) = self.refresh.as_mut()
                {
                    refresh.on_unauthorized(&e.message);
                }
                // Nobody listening is fine: the error is logged above.
                let _ = self.shared.errors.send(e);
            }
            Ok(ServerFrame::AuthOk(ok)) => {
                if let Some(refresh) = self.refresh.as_mut() {
                    refresh.on_auth_ok(ok.exp);
                }
            }
            Ok(ServerFrame::Connected(_) | ServerFrame::Pong | ServerFrame::PublishAck(_)) => {}
            Err(e) => {
                // Frames from a newer server are skipped, not fatal.
                tracing::warn!(target: "seqcast_client", error = %e, "undecodable frame from the server; skipped");
            }
        }
        for key in dead {
            self.subs.remove(&key);
            replies.push(unsubscribe_frame(&key));
        }
        replies
    }
}

/// Most bytes of keys in one `resume` frame: a client that follows many keys sends several
/// frames rather than one the server's frame limit (`--max-message-bytes`) would close with 1009
/// on every reconnect.
const RESUME_FRAME_BUDGET: usize = 8 * 1024;

/// `entries` cut into runs whose frames stay within [`RESUME_FRAME_BUDGET`] (at least one entry
/// each).
fn resume_chunks(entries: Vec<ResumeEntry>) -> Vec<Vec<ResumeEntry>> {
    let mut chunks: Vec<Vec<ResumeEntry>> = Vec::new();
    let mut bytes = 0;
    for entry in entries {
        // `{"channel":"…","request_id":"…","since":…},` is about 60 bytes beside the names.
        let size = entry.key().map_or(0, |k| {
            k.channel().as_str().len() + k.request_id().as_str().len()
        }) + 60;
        match chunks.last_mut() {
            Some(chunk) if bytes + size <= RESUME_FRAME_BUDGET => chunk.push(entry),
            _ => {
                chunks.push(vec![entry]);
                bytes = 0;
            }
        }
        bytes += size;
    }
    chunks
}

/// Whether a connection that lasted `lived` counts as a success for the backoff (which then
/// starts over): it stayed up at least as long as the longest backoff.
pub(crate) fn stayed_up(lived: Duration, backoff_max: Duration) -> bool {
    lived >= backoff_max
}

/// The next fresh token of the connection's refresh (never, without one).
pub(crate) async fn next_token(refresh: &mut Option<Refresh>) -> String {
    match refresh {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

/// One connection attempt: token, WebSocket handshake, `hello`, `connected`. Also returns the
/// token's `exp` (read, not verified), for the refresh.
pub(crate) async fn open(
    config: Config,
    tokens: SharedTokens,
    shared: Arc<Shared>,
) -> Result<(Ws, ConnectionInfo, Option<u64>), Error> {
    let token = tokens.0.token().await.map_err(Error::Token)?;
    let exp = jwt_exp(&token);
    let (mut ws, _response) = tokio::time::timeout(
        config.connect_timeout,
        tokio_tungstenite::connect_async(config.url.as_str()),
    )
    .await
    .map_err(|_| Error::Timeout("the WebSocket handshake"))??;
    // Taken once the server can see it, so the server's log shows no holes.
    let connection_sequence = shared.connection_sequence.fetch_add(1, Ordering::SeqCst) + 1;
    let hello = ClientFrame::Hello(Hello {
        token: Some(token),
        session_id: Some(config.session_id.clone()),
        connection_sequence: Some(connection_sequence),
    });
    ws.send(client_frame(&hello)).await?;
    let connected = tokio::time::timeout(config.connect_timeout, await_connected(&mut ws))
        .await
        .map_err(|_| Error::Timeout("the connected frame"))??;
    Ok((
        ws,
        ConnectionInfo {
            client_id: connected.client_id,
            session_id: config.session_id,
            connection_sequence,
            head: connected.head,
            epoch: connected.epoch,
        },
        exp,
    ))
}

/// Reads until `connected`; an `error` frame followed by a close is a refusal.
async fn await_connected(ws: &mut Ws) -> Result<Connected, Error> {
    let mut refusal: Option<String> = None;
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(WsMessage::Text(text)) => match decode_server_frame(text.as_str()) {
                Ok(ServerFrame::Connected(c)) => return Ok(c),
                Ok(ServerFrame::Error(e)) => refusal = Some(format!("{}: {}", e.code, e.message)),
                Ok(_) => {}
                Err(e) => return Err(Error::Protocol(format!("before `connected`: {e}"))),
            },
            Ok(WsMessage::Close(frame)) => {
                return Err(Error::Rejected {
                    close_code: frame.as_ref().map(|f| u16::from(f.code)),
                    message: refusal
                        .or_else(|| frame.map(|f| f.reason.to_string()))
                        .unwrap_or_else(|| "closed before `connected`".to_owned()),
                });
            }
            Ok(_) => {}
            Err(e) => {
                return Err(match refusal {
                    Some(message) => Error::Rejected {
                        close_code: None,
                        message,
                    },
                    None => e.into(),
                });
            }
        }
    }
    Err(Error::Rejected {
        close_code: None,
        message: refusal.unwrap_or_else(|| "the connection ended before `connected`".to_owned()),
    })
}

async fn close(mut ws: Ws, code: CloseCode, reason: &'static str) -> Flow {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    // Wait briefly for the server's close reply so it logs a clean close; never hang on it.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
    Flow::Exit
}

pub(crate) fn client_frame(frame: &ClientFrame) -> WsMessage {
    // Serializing these plain structs cannot fail (string keys, infallible field impls).
    let text = serde_json::to_string(frame).unwrap_or_else(|_| r#"{"type":"ping"}"#.to_owned());
    WsMessage::text(text)
}

fn subscribe_frame(key: &SubscriptionKey, since: Option<u64>, epoch: Option<String>) -> WsMessage {
    client_frame(&ClientFrame::Subscribe(Subscribe {
        channel: key.channel().clone(),
        request_id: key.request_id().clone(),
        since,
        epoch,
    }))
}

fn unsubscribe_frame(key: &SubscriptionKey) -> WsMessage {
    client_frame(&ClientFrame::Unsubscribe(Unsubscribe {
        channel: key.channel().clone(),
        request_id: key.request_id().clone(),
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use seqcast_protocol::{Channel, RequestId};

    use super::*;

    fn entry(i: usize) -> ResumeEntry {
        ResumeEntry::Key(ResumeKey {
            channel: Channel::new("c".repeat(64)).unwrap(),
            request_id: RequestId::new(format!("{i:0>128}")).unwrap(),
            since: u64::MAX,
        })
    }

    #[test]
    fn resume_frames_stay_within_the_budget_and_keep_every_key_in_order() {
        assert_eq!(resume_chunks(vec![entry(0), entry(1)]).len(), 1);
        let chunks = resume_chunks((0..1000).map(entry).collect());
        assert!(chunks.len() > 1);
        let mut next = 0;
        for chunk in &chunks {
            let bytes = match client_frame(&ClientFrame::Resume(ResumeFrame {
                subscriptions: chunk.clone(),
                epoch: Some("e".repeat(64)),
            })) {
                WsMessage::Text(t) => t.len(),
                _ => 0,
            };
            assert!(bytes <= RESUME_FRAME_BUDGET + 100, "{bytes} bytes");
            for e in chunk {
                assert_eq!(e, &entry(next));
                next += 1;
            }
        }
        assert_eq!(next, 1000);
    }
}
