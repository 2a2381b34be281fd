//! The HTTP live tail, `GET /events`: Server-Sent Events, long-poll, and the stream tickets
//! that let a browser's `EventSource` in without a token in its URL.
//!
//! Nothing here has rules of its own about what a reader gets. A request is judged once, like
//! an HTTP recovery ([`catchup::plan_resume`]); every read is that engine's cursor
//! ([`catchup::read_recovery`]) from the stream's position up to the hub's head, one page at a
//! time; between reads the stream waits for the head to pass its position. A reader that does
//! not take what is written is not read for: the body is pulled one page at a time, so a slow
//! reader simply reads from further back in the log (the cache or the database) when it takes
//! the next page, and is told `event: reset` only where the retention floor passed it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt as _;
use seqcast_delivery::Subscriptions;
use seqcast_persistence::EventFilter;
use seqcast_protocol::{
    EventsParams, LiveMode, MAX_LONG_POLL_SECS, RecoveryMeta, StreamTicket, SubscriptionKey,
    decode_events_query, encode_recovery_response, page_limit, parse_u64_param,
};
use seqcast_sequencing::{Phase, ReadBudget};

use crate::auth::{Grant, random_hex};
use crate::catchup;
use crate::drive;
use crate::error::{ApiError, CloseReason};
use crate::http::{authorization, json_response};
use crate::hub::{Frame, PAGE_BYTES, Subscriber};
use crate::limits::ConnectionSlot;
use crate::metrics::Metrics;
use crate::now_ms;
use crate::selection::Selection;
use crate::state::AppState;

/// Where a long-poll goes on from (on a 204, which has no body, the only place it is told).
pub const NEXT_SINCE_HEADER: HeaderName = HeaderName::from_static("x-seqcast-next-since");
/// The epoch the numbers of a long-poll answer belong to.
pub const EPOCH_HEADER: HeaderName = HeaderName::from_static("x-seqcast-epoch");

/// Most messages in one page of a stream.
const PAGE_EVENTS: usize = 1_000;

/// How long an `EventSource` waits before it reconnects (the `retry:` field), in ms.
const RECONNECT_MS: u64 = 1_000;

#[utoipa::path(
    post,
    path = "/api/stream-ticket",
    summary = "A single-use ticket for one `GET /events?ticket=…`",
    description = "For browsers: an `EventSource` cannot send an `Authorization` header, and a token never goes in a URL. The ticket carries the token's grant (its channel patterns and `exp`), is valid once, within `expires_in` seconds, on the node that issued it.",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A ticket", body = StreamTicket),
        (status = 401, description = "No valid token (`unauthorized`)", body = seqcast_protocol::ErrorBody),
        (status = 503, description = "Too many tickets outstanding (`unavailable`)", body = seqcast_protocol::ErrorBody),
    )
)]
/// `POST /api/stream-ticket`
pub async fn stream_ticket(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let grant = app.auth.reader(authorization(&headers))?;
    let ttl = app.settings.sse.ticket_ttl;
    let ticket = app.auth.issue_ticket(grant, ttl)?;
    Ok(axum::Json(StreamTicket {
        ticket,
        expires_in: ttl.as_secs(),
    })
    .into_response())
}

#[utoipa::path(
    get,
    path = "/events",
    summary = "Live tail over HTTP: Server-Sent Events, or a long-poll",
    description = "Server-Sent Events (`text/event-stream`, the default): one event per message, `id:` its `sequence_number`, `event: message`, `data:` the live WebSocket `message` frame's JSON. A `Last-Event-ID` header overrides `since`; without either the stream starts at the head. Where the window no longer reaches `since + 1` (or `epoch` differs), `event: reset` with `{\"recovered\":false,\"oldest_sequence\",\"epoch\"}` comes first, then what the window holds. Comment heartbeats keep an idle stream open; the server ends a stream after `--sse-max-secs` and the client resumes with `Last-Event-ID`. With `live=long-poll`: the messages after `since` at once (200, shaped like `GET /websocket/messages`, `next_since` always), else held until one arrives (200) or `timeout` seconds pass (204, `X-Seqcast-Next-Since`). Auth: `Authorization: Bearer`, or `ticket=` from `POST /api/stream-ticket`.",
    params(
        EventsParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this sequence number (overrides `since`)"),
    ),
    security(("bearer" = []), ()),
    responses(
        (status = 200, description = "An event stream; or, for a long-poll, the messages (`next_since` always)",
            content((seqcast_protocol::SseEvent = "text/event-stream"), (seqcast_protocol::RecoveryResponse = "application/json")),
            headers(("X-Seqcast-Next-Since" = u64, description = "Long-poll: poll again with this `since`"))),
        (status = 204, description = "Long-poll: nothing arrived within `timeout`",
            headers(("X-Seqcast-Next-Since" = u64, description = "Poll again with this `since`"))),
        (status = 400, description = "Bad parameter or name (`bad_request`)", body = seqcast_protocol::ErrorBody),
        (status = 401, description = "No valid token or ticket (`unauthorized`)", body = seqcast_protocol::ErrorBody),
        (status = 403, description = "A key outside the token's patterns (`forbidden`)", body = seqcast_protocol::ErrorBody),
        (status = 429, description = "Over a per-IP connection limit (`rate_limited`), with `Retry-After`", body = seqcast_protocol::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a retry can succeed"))),
        (status = 503, description = "The log cannot be read, at the connection cap, or shutting down (`unavailable`)", body = seqcast_protocol::ErrorBody),
    )
)]
/// `GET /events`
pub async fn events(
    State(app): State<Arc<AppState>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let query = decode_events_query(uri.query().unwrap_or("")).map_err(ApiError::from);
    // Credentials before parameters (a bad query without credentials is a 401), but a ticket
    // is itself a parameter.
    let grant = match (authorization(&headers), &query) {
        (Some(h), _) => app.auth.reader(Some(h))?,
        (
            None,
            Ok(EventsParams {
                ticket: Some(t), ..
            }),
        ) => app.auth.redeem_ticket(t, app.settings.sse.ticket_ttl)?,
        (None, _) => {
            return Err(ApiError::Unauthorized(
                "missing credentials: expected `Authorization: Bearer <token>` or `ticket=` from POST /api/stream-ticket".into(),
            ));
        }
    };
    let q = query?;
    if q.ticket.is_some() && authorization(&headers).is_some() {
        return Err(ApiError::BadRequest(
            "give `Authorization` or `ticket`, not both".into(),
        ));
    }
    let selection = Selection::parse(
        q.channel,
        q.request_id,
        &q.key,
        app.settings.max_subscriptions,
        &grant,
    )?;
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| ApiError::BadRequest("Last-Event-ID is not text".into()))?;
            Some(parse_u64_param("Last-Event-ID", v.trim())?)
        }
        None => None,
    };
    let mode = q.live.unwrap_or_default();
    let max_bytes = app.settings.max_response_bytes;
    let (timeout, budget) = match mode {
        LiveMode::Sse => {
            if q.timeout.is_some() || q.limit.is_some() {
                return Err(ApiError::BadRequest(
                    "`timeout` and `limit` are for `live=long-poll`".into(),
                ));
            }
            // A stream's page: what one write of the body holds at most.
            let page = ReadBudget {
                max_events: PAGE_EVENTS,
                max_bytes: PAGE_BYTES.min(max_bytes),
            };
            (Duration::ZERO, page)
        }
        LiveMode::LongPoll => {
            let secs = q.timeout.unwrap_or(MAX_LONG_POLL_SECS);
            if secs > MAX_LONG_POLL_SECS {
                return Err(ApiError::BadRequest(format!(
                    "timeout must be at most {MAX_LONG_POLL_SECS} seconds, got {secs}"
                )));
            }
            // An answer like a recovery page.
            let page = ReadBudget {
                max_events: page_limit(q.limit)?,
                max_bytes,
            };
            (Duration::from_secs(secs), page)
        }
    };
    if app.shutdown.is_cancelled() {
        return Err(ApiError::Unavailable("server is shutting down".into()));
    }
    let ip = app
        .limiter
        .client_ip(peer.map(|Extension(ConnectInfo(a))| a), &headers);
    let slot = app.limiter.admit_connection(ip)?;
    let mut tail = Tail::start(
        app,
        grant,
        selection,
        last_event_id.or(q.since),
        q.epoch.as_deref(),
        budget,
    )
    .await?;
    match mode {
        LiveMode::LongPoll => Ok(tail.long_poll(timeout).await?),
        LiveMode::Sse => tail.stream(slot, ip).await,
    }
}

/// One reader's position in the log: what it asked for, judged once, and read by the recovery
/// engine's cursor one page at a time.
struct Tail {
    app: Arc<AppState>,
    grant: Grant,
    selection: Selection,
    filter: EventFilter,
    /// Every message for this reader numbered up to here has been handed out (or told lost).
    position: u64,
    /// The history the position belongs to ([`crate::hub::Hub::history`]).
    history: u64,
    head: tokio::sync::watch::Receiver<u64>,
    /// The start was not a complete resume: the reader is told so first.
    reset: bool,
    /// The window's oldest number when judged (`None`: empty).
    oldest_sequence: Option<u64>,
    epoch: String,
    budget: ReadBudget,
}

/// One page read for a reader.
struct Page {
    frames: Vec<(u64, Frame)>,
    /// The retention floor passed the position while it was read.
    behind: bool,
}

impl Tail {
    /// Judge where a reader starts: after `since` when the window reaches it (a complete
    /// resume), else from the window's start, told; without `since`, at the head.
    async fn start(
        app: Arc<AppState>,
        grant: Grant,
        selection: Selection,
        since: Option<u64>,
        epoch: Option<&str>,
        budget: ReadBudget,
    ) -> Result<Self, ApiError> {
        // Read before the epoch is told: a stream acts only while its history is unchanged.
        let history = app.hub.history();
        let head = app.hub.watch_head();
        let since = since.unwrap_or_else(|| app.hub.head());
        let resumed = catchup::plan_resume(&app, since, epoch, now_ms()).await?;
        let oldest_sequence =
            (resumed.window_start <= resumed.head).then_some(resumed.window_start);
        let position = resumed
            .verdict
            .start()
            // Another history's number means nothing here: what the window holds follows.
            .unwrap_or_else(|| resumed.window_start.saturating_sub(1).min(resumed.head));
        let filter = selection.to_event_filter();
        Ok(Tail {
            epoch: app.hub.epoch(),
            budget,
            app,
            grant,
            selection,
            filter,
            position,
            history,
            head,
            reset: !resumed.verdict.recovered(),
            oldest_sequence,
        })
    }

    /// One page after the position, up to the head (a budget's worth): the position moves past
    /// it.
    async fn read(&mut self) -> Result<Page, ApiError> {
        let head = self.app.hub.head();
        if head <= self.position {
            return Ok(Page {
                frames: Vec::new(),
                behind: false,
            });
        }
        let (selection, grant) = (&self.selection, &self.grant);
        let admit = |key: &SubscriptionKey| selection.admits(key, grant);
        let read = catchup::read_recovery(
            &self.app,
            &self.filter,
            &admit,
            self.position,
            head,
            self.budget,
        )
        .await?;
        if self.history_changed() {
            // What was read may be the new history's: hand out none of it (the stream ends; a
            // long-poll says where it was).
            return Ok(Page {
                frames: Vec::new(),
                behind: false,
            });
        }
        self.position = read.next_since.unwrap_or(head);
        Metrics::add(&self.app.hub.metrics.deliveries, read.frames.len() as u64);
        Ok(Page {
            frames: read.frames,
            behind: read.behind,
        })
    }

    /// Whether the store became another history since the start.
    fn history_changed(&self) -> bool {
        self.app.hub.history() != self.history
    }

    /// Wait until the head passes the position (true), or `until` passes, or the server shuts
    /// down, or the store becomes another history (false).
    async fn wait_for_more(&mut self, until: tokio::time::Instant) -> bool {
        loop {
            if self.history_changed() || self.app.shutdown.is_cancelled() {
                return false;
            }
            if *self.head.borrow_and_update() > self.position {
                return true;
            }
            tokio::select! {
                changed = self.head.changed() => if changed.is_err() { return false },
                () = tokio::time::sleep_until(until) => return false,
                () = self.app.shutdown.cancelled() => return false,
            }
        }
    }

    /// `live=long-poll`: the messages after the position at once if there are any (or the
    /// start is to be told), else the first to arrive within `timeout`, else 204.
    async fn long_poll(&mut self, timeout: Duration) -> Result<Response, ApiError> {
        // Answered before the request deadline would answer 408 instead.
        let request_deadline = self.app.settings.http_timeouts.request;
        let hold = timeout.min(request_deadline.saturating_sub(Duration::from_secs(1)));
        let until = tokio::time::Instant::now() + hold;
        loop {
            let page = self.read().await?;
            let complete = !self.reset && !page.behind;
            if !page.frames.is_empty() || !complete {
                let meta = RecoveryMeta {
                    head: self.app.hub.head(),
                    oldest_sequence: self.oldest_sequence,
                    epoch: self.epoch.clone(),
                    complete,
                    next_since: Some(self.position),
                };
                let body =
                    encode_recovery_response(page.frames.iter().map(|(_, f)| f.as_str()), &meta);
                let r = json_response(StatusCode::OK, body);
                return Ok(self.with_position_headers(r));
            }
            tracing::debug!(
                event = "long_poll_held",
                sub = %self.grant.sub,
                position = self.position,
                "long-poll waiting for a message"
            );
            if !self.wait_for_more(until).await {
                return Ok(self.with_position_headers(StatusCode::NO_CONTENT.into_response()));
            }
        }
    }

    fn with_position_headers(&self, mut r: Response) -> Response {
        r.headers_mut()
            .insert(NEXT_SINCE_HEADER, HeaderValue::from(self.position));
        if let Ok(epoch) = HeaderValue::from_str(&self.epoch) {
            r.headers_mut().insert(EPOCH_HEADER, epoch);
        }
        r
    }

    /// The Server-Sent Events response: the first page is read now (a log that cannot be read
    /// is a 503 before anything is sent), the rest as the client takes it.
    async fn stream(
        mut self,
        slot: ConnectionSlot,
        ip: Option<std::net::IpAddr>,
    ) -> Result<Response, ApiError> {
        let mut opening = format!("retry: {RECONNECT_MS}\n\n");
        if self.reset {
            self.write_reset(&mut opening, self.oldest_sequence);
        }
        let started_at = self.position;
        // A stream that names its keys is the delivery engine's cursor (see [`Engine`]); the
        // rest read the log filtered, page by page.
        let engine = match &self.selection {
            Selection::Keys(keys) => Some(Engine::start(&self.app, keys, self.position)),
            _ => None,
        };
        let first = match engine {
            Some(_) => Page {
                frames: Vec::new(),
                behind: false,
            },
            None => self.read().await?,
        };
        let mut stream = SseStream {
            engine,
            opened: Instant::now(),
            ends: tokio::time::Instant::now() + self.app.settings.sse.max_duration,
            end_reason: "max_duration",
            told: started_at,
            sent: 0,
            ended: None,
            ip,
            _slot: slot,
            pending: None,
            tail: self,
        };
        if let Some(exp) = stream.tail.grant.exp {
            let left = Duration::from_millis((exp.saturating_mul(1000)).saturating_sub(now_ms()));
            let at = tokio::time::Instant::now() + left;
            if at < stream.ends {
                stream.ends = at;
                stream.end_reason = "token_expired";
            }
        }
        stream.write_page(&mut opening, first);
        stream.pending = Some(Bytes::from(opening));
        stream.tail.app.hub.metrics.sse_streams.inc();
        tracing::info!(
            event = "sse_opened",
            sub = %stream.tail.grant.sub,
            client_ip = ip.map(|i| i.to_string()),
            position = stream.tail.position,
            reset = stream.tail.reset,
            epoch = %stream.tail.epoch,
            "event stream opened"
        );
        let body = futures_util::stream::unfold(stream, |mut s| async move {
            let chunk = s.next_chunk().await?;
            Some((Ok::<_, std::convert::Infallible>(chunk), s))
        });
        let mut r = Response::new(Body::from_stream(body));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        Ok(r)
    }

    /// `event: reset`: what was asked for is not all there; what the window holds follows.
    fn write_reset(&self, out: &mut String, oldest_sequence: Option<u64>) {
        let data = serde_json::json!({
            "recovered": false,
            "oldest_sequence": oldest_sequence,
            "epoch": self.app.hub.epoch(),
        });
        out.push_str("event: reset\ndata: ");
        out.push_str(&data.to_string());
        out.push_str("\n\n");
    }
}

/// One open Server-Sent Events response.
struct SseStream {
    tail: Tail,
    /// The delivery engine's cursors of a stream that names its keys (`None`: the stream reads
    /// the log filtered, [`Tail::read`]).
    engine: Option<Engine>,
    opened: Instant,
    /// When the server ends the stream: `--sse-max-secs`, or the token's `exp` if sooner.
    ends: tokio::time::Instant,
    end_reason: &'static str,
    /// The last `id:` the client was told.
    told: u64,
    /// Messages written.
    sent: u64,
    ended: Option<&'static str>,
    ip: Option<std::net::IpAddr>,
    /// The stream's place under the connection limits.
    _slot: ConnectionSlot,
    /// Written before anything else.
    pending: Option<Bytes>,
}

impl SseStream {
    /// The next piece of the body: a page of events, a heartbeat, or the end (`None`).
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(first) = self.pending.take() {
            return Some(first);
        }
        if self.ended.is_some() {
            return None;
        }
        if self.engine.is_some() {
            return self.next_engine_chunk().await;
        }
        let heartbeat = self.tail.app.settings.sse.heartbeat;
        let beat_at = tokio::time::Instant::now() + heartbeat;
        loop {
            if let Some(end) = self.due_end() {
                return end;
            }
            let until = self.ends.min(beat_at);
            if self.tail.wait_for_more(until).await {
                Metrics::inc(&self.tail.app.hub.metrics.sse_wakeups);
                let page = match self.tail.read().await {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(event = "sse_read_failed", code = %e.code(), error = e.message(), "the log could not be read; ending the stream so the client resumes");
                        self.ended = Some("log_unreadable");
                        return None;
                    }
                };
                let mut out = String::new();
                self.write_page(&mut out, page);
                if !out.is_empty() {
                    return Some(Bytes::from(out));
                }
                continue;
            }
            if self.tail.app.shutdown.is_cancelled() {
                return self.end("shutdown");
            }
            let now = tokio::time::Instant::now();
            if now >= self.ends || self.tail.history_changed() {
                continue;
            }
            if now >= beat_at {
                return Some(self.heartbeat());
            }
            // Nothing to wait on: the hub is gone.
            return self.end("server_stopped");
        }
    }

    /// The stream's end when it is due (`--sse-max-secs`, the token's `exp`) or when the store
    /// became another history (numbers of the old one mean nothing now: the client resumes and
    /// is told).
    fn due_end(&mut self) -> Option<Option<Bytes>> {
        if tokio::time::Instant::now() >= self.ends {
            return Some(self.end(self.end_reason));
        }
        if self.tail.history_changed() {
            self.ended = Some("history_changed");
            return Some(None);
        }
        None
    }

    /// A comment heartbeat, with `id: <position>` when the position moved past the last id told.
    fn heartbeat(&mut self) -> Bytes {
        let mut out = String::new();
        self.settle(&mut out);
        out.push_str(": heartbeat\n");
        self.write_position(&mut out);
        out.push('\n');
        Bytes::from(out)
    }

    /// End the stream for `reason`: what is queued goes first (a keyed stream), and the last
    /// piece tells the client the position it resumes from.
    fn end(&mut self, reason: &'static str) -> Option<Bytes> {
        let mut out = String::new();
        self.settle(&mut out);
        self.ended = Some(reason);
        self.write_position(&mut out);
        (!out.is_empty()).then(|| {
            out.push('\n');
            Bytes::from(out)
        })
    }

    /// `id: <position>` when the position passed the last id told (messages of other keys were
    /// read past): the client's `Last-Event-ID` moves on without an event, so its resume is not
    /// judged from an old number.
    fn write_position(&mut self, out: &mut String) {
        if self.tail.position > self.told {
            push_id(out, self.tail.position);
            out.push('\n');
            self.told = self.tail.position;
        }
    }

    /// A page as events: `event: reset` first if the retention floor passed the position, then
    /// one `message` event per frame.
    fn write_page(&mut self, out: &mut String, page: Page) {
        if page.behind {
            let floor = self.tail.app.hub.retention_floor();
            self.tail.write_reset(out, Some(floor));
        }
        for (seq, frame) in &page.frames {
            push_message(out, *seq, frame);
            self.told = *seq;
        }
        self.sent += page.frames.len() as u64;
    }
}

/// One `message` event: `id: <seq>`, then the frame's `data:` lines.
fn push_message(out: &mut String, seq: u64, frame: &str) {
    push_id(out, seq);
    out.push_str("\nevent: message\n");
    push_data(out, frame);
}

/// `id: <n>` (no line end), formatted into `out` without a string of its own.
fn push_id(out: &mut String, n: u64) {
    use std::fmt::Write as _;
    let _ = write!(out, "id: {n}");
}

/// `data:` lines of a frame, verbatim; a line break (only ever JSON whitespace in a frame) starts
/// another `data:` line, which the client joins back with `\n`.
fn push_data(out: &mut String, frame: &str) {
    for line in frame.split(['\n', '\r']) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
}

impl Drop for SseStream {
    fn drop(&mut self) {
        if let Some(engine) = &self.engine {
            engine.sub.finish();
            self.tail.app.hub.disconnect(&engine.sub, &engine.keys);
        }
        self.tail.app.hub.metrics.sse_streams.dec();
        tracing::info!(
            event = "sse_closed",
            sub = %self.tail.grant.sub,
            client_ip = self.ip.map(|i| i.to_string()),
            reason = self.ended.unwrap_or("client_gone"),
            duration_seconds = self.opened.elapsed().as_secs_f64(),
            messages_sent = self.sent,
            position = self.tail.position,
            "event stream closed"
        );
    }
}

/// The delivery engine's side of a stream that names its keys: a [`Subscriber`] registered with
/// the hub for exactly those keys, and their [`Subscriptions`], driven by [`drive`] as a
/// WebSocket connection's are after a `resume` of all of them from the stream's position (one
/// merged catch-up, one join). Live messages are pushed by the hub onto the subscriber's queue,
/// so a stream wakes only when one of its keys moved.
struct Engine {
    sub: Arc<Subscriber>,
    subs: Subscriptions,
    keys: Vec<SubscriptionKey>,
    /// A catch-up read in flight.
    read: Option<drive::Read>,
    client_id: Arc<str>,
    /// Frames taken from the queue, written next.
    buf: Vec<Frame>,
}

impl Engine {
    fn start(app: &AppState, keys: &[SubscriptionKey], position: u64) -> Self {
        let client_id: Arc<str> = Arc::from(random_hex(8));
        let sub = Arc::new(Subscriber::new(
            Arc::clone(&client_id),
            app.settings.send_queue,
        ));
        let mut engine = Engine {
            sub,
            subs: Subscriptions::new(keys.len()),
            keys: keys.to_vec(),
            read: None,
            client_id,
            buf: Vec::new(),
        };
        engine.resume_from(position);
        engine
    }

    /// Every key catches up from `position` together (one merged cursor, in global order) and
    /// joins live delivery in one step: the engine's resume of many keys.
    fn resume_from(&mut self, position: u64) {
        self.read = None;
        self.subs = Subscriptions::new(self.keys.len());
        self.subs.admit_many(&self.keys);
        let starts = self.keys.iter().map(|k| (k.clone(), position)).collect();
        self.subs.started_many(starts);
    }

    /// Every key is in live delivery: each of their messages up to the hub's head was queued.
    fn is_live(&self) -> bool {
        !self.subs.is_busy()
            && self.keys.iter().all(|k| {
                self.subs
                    .cursor(k)
                    .is_some_and(|c| c.phase() == Phase::Live)
            })
    }
}

async fn poll_read(read: &mut Option<drive::Read>) -> drive::CatchUp {
    match read {
        Some(r) => r.await,
        None => std::future::pending().await,
    }
}

/// The `sequence_number` of a message frame (it is the frame's first field).
fn frame_sequence(frame: &str) -> Option<u64> {
    let rest = frame.strip_prefix(r#"{"type":"message","sequence_number":"#)?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl SseStream {
    /// [`SseStream::next_chunk`] of a keyed stream: what the hub pushed or the engine caught up,
    /// a heartbeat, or the end.
    async fn next_engine_chunk(&mut self) -> Option<Bytes> {
        let app = Arc::clone(&self.tail.app);
        let beat_at = tokio::time::Instant::now() + app.settings.sse.heartbeat;
        loop {
            if let Some(end) = self.due_end() {
                return end;
            }
            let history = self.tail.history;
            let engine = self.engine.as_mut()?;
            let reader = drive::Reader {
                client_id: &engine.client_id,
                history,
            };
            if engine.read.is_none() && !engine.sub.is_closing() {
                engine.read = drive::advance(&app, &engine.sub, reader, &mut engine.subs);
            }
            if engine.sub.is_closing() {
                let reason = engine.sub.closed().now_or_never();
                return match reason {
                    Some(CloseReason::SlowConsumer) => Some(self.end_behind_floor()),
                    Some(CloseReason::LogUnavailable) => {
                        self.ended = Some("log_unreadable");
                        None
                    }
                    Some(drive::HISTORY_CHANGED) => {
                        self.ended = Some("history_changed");
                        None
                    }
                    _ => self.end("closed"),
                };
            }
            let until = self.ends.min(beat_at);
            let mut oldest_live = None;
            tokio::select! {
                _ = engine.sub.wait_ready(&mut engine.buf, &mut oldest_live) => {
                    Metrics::inc(&app.hub.metrics.sse_wakeups);
                    let mut out = String::new();
                    self.write_taken(&mut out);
                    if !out.is_empty() {
                        return Some(Bytes::from(out));
                    }
                }
                done = poll_read(&mut engine.read) => {
                    Metrics::inc(&app.hub.metrics.sse_wakeups);
                    engine.read = None;
                    drive::on_read(&app, &engine.sub, reader, &mut engine.subs, done);
                }
                () = tokio::time::sleep_until(until) => {
                    let now = tokio::time::Instant::now();
                    if now >= beat_at && now < self.ends {
                        return Some(self.heartbeat());
                    }
                }
                () = app.shutdown.cancelled() => return self.end("shutdown"),
                // A close the driver asked for (behind the retention floor, the log unreadable,
                // another history): the loop's top ends the stream for it.
                _ = engine.sub.closed() => {}
            }
        }
    }

    /// Write the frames taken from the queue as events. Where a key left live delivery (the
    /// queue was full: the client reads slower than its keys move) the keys' global order would
    /// break, so every key leaves live delivery, what came before the first message that did
    /// not fit is written, and all of them catch up together from there (from the cache or the
    /// log, paced by the queue's water marks).
    fn write_taken(&mut self, out: &mut String) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let mut frames = std::mem::take(&mut engine.buf);
        let cut = engine.sub.lagged().iter().map(|&(_, s)| s).min();
        if let Some(cut) = cut {
            let app = &self.tail.app;
            app.hub.disconnect(&engine.sub, &engine.keys);
            // Pushed before the keys left: taken now, nothing more comes.
            let (mut rest, mut oldest) = (Vec::new(), None);
            if engine
                .sub
                .wait_ready(&mut rest, &mut oldest)
                .now_or_never()
                .is_some()
            {
                frames.append(&mut rest);
            }
            let _ = engine.sub.lagged();
            frames.retain(|f| frame_sequence(f).is_some_and(|s| s < cut));
            let from = (cut - 1).max(self.tail.position);
            tracing::debug!(event = "sse_lagged", client_id = %engine.client_id, position = from, "the stream's queue filled: its keys catch up together");
            engine.resume_from(from);
        }
        for frame in frames.drain(..) {
            let Some(seq) = frame_sequence(&frame) else {
                continue;
            };
            push_message(out, seq, &frame);
            self.told = seq;
            self.tail.position = self.tail.position.max(seq);
            self.sent += 1;
        }
        if let Some(engine) = self.engine.as_mut() {
            engine.buf = frames;
        }
    }

    /// A keyed stream: write what is queued and move the position to the head when every key is
    /// live (every message of the keys up to the head read first was queued, and is now written).
    fn settle(&mut self, out: &mut String) {
        let head = self.tail.app.hub.head();
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let mut oldest = None;
        if engine
            .sub
            .wait_ready(&mut engine.buf, &mut oldest)
            .now_or_never()
            .is_some()
        {
            self.write_taken(out);
        }
        if self.engine.as_ref().is_some_and(Engine::is_live) {
            self.tail.position = self.tail.position.max(head);
        }
    }

    /// A cursor of the stream fell behind the retention floor: what is queued goes first, then
    /// `event: reset` (`oldest_sequence`: the floor) and the stream ends at the floor, so that
    /// the client's reconnect goes on from there.
    fn end_behind_floor(&mut self) -> Bytes {
        let mut out = String::new();
        self.settle(&mut out);
        let floor = self.tail.app.hub.retention_floor();
        self.tail.write_reset(&mut out, Some(floor));
        self.tail.position = self.tail.position.max(floor.saturating_sub(1));
        self.ended = Some("behind_retention_floor");
        self.write_position(&mut out);
        out.push('\n');
        Bytes::from(out)
    }
}
