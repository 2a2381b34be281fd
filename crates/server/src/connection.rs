//! One WebSocket connection: authenticate with `hello`, then one task reads client frames,
//! drives the connection's subscription cursors and drains its send queue — everything queued is
//! written, then flushed once. One task per connection (no split halves, no lock between them)
//! keeps an idle connection small and a busy one cheap.
//!
//! Flow control: while the send queue is above its high-water mark the task stops reading client
//! frames (TCP back-pressure on the client) and stops catching up; replies and catch-up pages
//! are therefore never refused. A subscription whose live delivery paused (queue full) catches up
//! from the log page by page as the socket drains, and joins live again at the exact seam.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use seqcast_protocol::{
    ClientFrame, Connected, ErrorFrame, ServerFrame, SessionId, SubscriptionKey,
    decode_client_frame, encode_server_frame,
};

use seqcast_sequencing::{Cursor, Phase, Step};

use crate::app::AppState;
use crate::auth::{Grant, random_hex};
use crate::catchup::{self, Start};
use crate::error::{ApiError, CloseReason};
use crate::hub::{Frame, Join, Subscriber};
use crate::metrics::Metrics;
use crate::now_ms;
use crate::pages::SharedPage;

/// What we know of a connection for its log lines.
struct ConnInfo {
    client_id: Arc<str>,
    session_id: Option<SessionId>,
    connection_sequence: Option<u64>,
    started: Instant,
}

/// Serve one upgraded socket until it closes. `pre_auth` is the grant from an
/// `Authorization: Bearer` header on the upgrade, if any.
pub async fn serve(mut socket: WebSocket, app: Arc<AppState>, pre_auth: Option<Grant>) {
    let started = Instant::now();
    let client_id: Arc<str> = Arc::from(random_hex(8));

    let hello = tokio::time::timeout(
        app.settings.hello_timeout,
        wait_for_hello(&app, &mut socket, pre_auth),
    )
    .await;
    let (grant, session_id, connection_sequence) = match hello {
        Ok(HelloOutcome::Ready {
            grant,
            session_id,
            connection_sequence,
        }) => (grant, session_id, connection_sequence),
        Ok(HelloOutcome::Closed(code)) => {
            log_rejected(&client_id, None, None, code, started, "closed before hello");
            return;
        }
        Ok(HelloOutcome::Reject {
            reason,
            why,
            session_id,
            connection_sequence,
        }) => {
            let _ = send_error(&mut socket, &ApiError::Unauthorized(why.clone())).await;
            close_with(&mut socket, reason).await;
            log_rejected(
                &client_id,
                session_id.as_ref(),
                connection_sequence,
                reason.code(),
                started,
                &why,
            );
            return;
        }
        Err(_elapsed) => {
            let why = format!(
                "no valid hello within {} ms",
                app.settings.hello_timeout.as_millis()
            );
            let _ = send_error(&mut socket, &ApiError::Unauthorized(why.clone())).await;
            close_with(&mut socket, CloseReason::Unauthenticated).await;
            log_rejected(
                &client_id,
                None,
                None,
                CloseReason::Unauthenticated.code(),
                started,
                &why,
            );
            return;
        }
    };

    let info = ConnInfo {
        client_id: Arc::clone(&client_id),
        session_id,
        connection_sequence,
        started,
    };
    Metrics::inc(&app.hub.metrics.connections_opened);
    tracing::info!(
        event = "connection_opened",
        client_id = %info.client_id,
        session_id = info.session_id.as_ref().map(|s| s.as_str()),
        connection_sequence = info.connection_sequence,
        user = %grant.sub,
        "connection opened"
    );

    let sub = Arc::new(Subscriber::new(
        Arc::clone(&client_id),
        app.settings.send_queue,
    ));
    let connected = ServerFrame::Connected(Connected {
        sequence_number: 0,
        client_id: client_id.to_string(),
        session_id: info.session_id.clone(),
        connection_sequence: info.connection_sequence,
        head: app.hub.head(),
        epoch: app.hub.epoch().to_owned(),
    });
    sub.push_one(Utf8Bytes::from(encode_server_frame(&connected)));

    let mut subs = Subscriptions::default();
    let ended = run(&app, &mut socket, &sub, &grant, &info, &mut subs).await;
    sub.finish();
    app.hub.disconnect(&sub, subs.cursors.keys());
    let (sent, server_code, client_code) = (ended.sent, ended.server_code, ended.client_code);
    let close_code = server_code.or(client_code).unwrap_or(1006);
    Metrics::inc(&app.hub.metrics.connections_closed);
    tracing::info!(
        event = "connection_closed",
        client_id = %info.client_id,
        session_id = info.session_id.as_ref().map(|s| s.as_str()),
        connection_sequence = info.connection_sequence,
        close_code,
        duration_seconds = info.started.elapsed().as_secs_f64(),
        messages_sent = sent,
        "connection closed"
    );
}

enum HelloOutcome {
    Ready {
        grant: Grant,
        session_id: Option<SessionId>,
        connection_sequence: Option<u64>,
    },
    Reject {
        reason: CloseReason,
        why: String,
        session_id: Option<SessionId>,
        connection_sequence: Option<u64>,
    },
    Closed(u16),
}

async fn wait_for_hello(
    app: &AppState,
    sink: &mut WebSocket,
    pre_auth: Option<Grant>,
) -> HelloOutcome {
    loop {
        let text = match sink.recv().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                let _ = send_error(
                    sink,
                    &ApiError::BadRequest("binary frames are not supported; send JSON text".into()),
                )
                .await;
                continue;
            }
            Some(Ok(Message::Close(c))) => return HelloOutcome::Closed(c.map_or(1005, |c| c.code)),
            Some(Ok(_)) => continue,
            Some(Err(e)) if is_too_large(&e) => {
                close_with(sink, CloseReason::TooLarge).await;
                return HelloOutcome::Closed(CloseReason::TooLarge.code());
            }
            Some(Err(_)) | None => return HelloOutcome::Closed(1006),
        };
        match decode_client_frame(text.as_str()) {
            Ok(ClientFrame::Hello(h)) => {
                let grant = match (&h.token, &pre_auth) {
                    (Some(token), _) => app.auth.verify(token),
                    (None, Some(g)) => Ok(g.clone()),
                    (None, None) => Err(ApiError::Unauthorized(
                        "no token: send it as `token` in hello or as Authorization: Bearer on the upgrade".into(),
                    )),
                };
                return match grant {
                    Ok(grant) => HelloOutcome::Ready {
                        grant,
                        session_id: h.session_id,
                        connection_sequence: h.connection_sequence,
                    },
                    Err(e) => HelloOutcome::Reject {
                        reason: CloseReason::Unauthenticated,
                        why: e.message().to_owned(),
                        session_id: h.session_id,
                        connection_sequence: h.connection_sequence,
                    },
                };
            }
            Ok(_) => {
                let _ = send_error(
                    sink,
                    &ApiError::BadRequest("the first frame must be hello".into()),
                )
                .await;
            }
            Err(e) => {
                let _ = send_error(sink, &ApiError::from(e)).await;
            }
        }
    }
}

/// How a connection ended.
struct Ended {
    /// Frames written.
    sent: u64,
    /// The close code the server sent, if it closed the connection.
    server_code: Option<u16>,
    /// The peer's close code, if it sent one (1006 when the connection just broke).
    client_code: Option<u16>,
}

/// Frames one catch-up step queues at most (a log page, or a page of the cached tail).
fn page_size(app: &AppState) -> usize {
    (app.settings.send_queue / 2).clamp(16, 1024)
}

/// The connection's subscriptions: a cursor per key, and the keys that are catching up, served
/// round-robin one page at a time.
#[derive(Default)]
struct Subscriptions {
    cursors: HashMap<SubscriptionKey, Cursor>,
    catching_up: VecDeque<SubscriptionKey>,
}

/// A log read in flight (one per connection at a time, off the async runtime's threads).
type Job = Pin<Box<dyn Future<Output = JobDone> + Send>>;

enum JobDone {
    /// Where a `subscribe` starts was decided (or could not be).
    Started {
        key: SubscriptionKey,
        result: Result<Start, ApiError>,
    },
    /// A page of a key's log was read.
    Page {
        key: SubscriptionKey,
        result: Result<Arc<SharedPage>, ApiError>,
    },
}

async fn poll_job(job: &mut Option<Job>) -> JobDone {
    match job {
        Some(j) => j.await,
        None => std::future::pending().await,
    }
}

/// Serve an authenticated connection until it ends.
async fn run(
    app: &Arc<AppState>,
    socket: &mut WebSocket,
    sub: &Arc<Subscriber>,
    grant: &Grant,
    info: &ConnInfo,
    subs: &mut Subscriptions,
) -> Ended {
    let mut sent = 0u64;
    let mut buf: Vec<Frame> = Vec::new();
    let mut job: Option<Job> = None;
    // Made once: a close request or shutdown wakes the connection through these.
    let closed = sub.closed();
    tokio::pin!(closed);
    let shutdown = app.shutdown.cancelled();
    tokio::pin!(shutdown);
    loop {
        if job.is_none() {
            job = advance(app, sub, info, subs);
        }
        let reading = job.is_none() && !sub.is_above_high_water();
        tokio::select! {
            biased;
            reason = &mut closed => {
                return Ended { sent, server_code: Some(close_in_time(socket, reason).await), client_code: None };
            }
            // Asks for a close; the next turn sends it.
            _ = &mut shutdown, if !sub.is_closing() => sub.close(CloseReason::GoingAway),
            done = poll_job(&mut job) => {
                job = None;
                on_job_done(app, sub, info, subs, done);
            }
            n = sub.wait_ready(&mut buf) => {
                for (key, sequence_number) in sub.lagged() {
                    if let Some(cursor) = subs.cursors.get_mut(&key) {
                        cursor.on_lagged(sequence_number);
                        subs.catching_up.push_back(key);
                    }
                }
                if n == 0 {
                    continue;
                }
                // A write blocked by a client that does not read must not keep us from closing it.
                let written = tokio::select! {
                    biased;
                    reason = &mut closed => {
                        return Ended { sent, server_code: Some(close_in_time(socket, reason).await), client_code: None };
                    }
                    r = write_round(socket, &mut buf, &mut sent) => r,
                };
                if written.is_err() {
                    return Ended { sent, server_code: None, client_code: None };
                }
            }
            msg = socket.recv(), if reading => {
                if let Some(code) = on_client_frame(app, msg, sub, grant, info, subs, &mut job) {
                    // The peer closed or the connection broke: answer a close, then stop.
                    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, socket.close()).await;
                    return Ended { sent, server_code: None, client_code: Some(code) };
                }
            }
        }
    }
}

/// Move catching-up cursors forward while the send queue has room: join live from the cache
/// where it holds the rest, else start one log read. Returns the read, if one was started.
fn advance(
    app: &Arc<AppState>,
    sub: &Arc<Subscriber>,
    info: &ConnInfo,
    subs: &mut Subscriptions,
) -> Option<Job> {
    let page = page_size(app);
    while !sub.is_closing() && sub.is_below_low_water() {
        let key = subs.catching_up.pop_front()?;
        let Some(cursor) = subs.cursors.get_mut(&key) else {
            continue; // unsubscribed meanwhile
        };
        match cursor.next_step(app.hub.view()) {
            Step::Idle => {}
            Step::Behind { position, floor } => {
                close_behind(app, sub, info, &key, position, floor);
                return None;
            }
            Step::JoinFromCache { after } => {
                match app.hub.join_from_cache(sub, &key, after, page) {
                    Join::Joined { head, .. } => cursor.on_joined(head),
                    Join::Page { through, .. } => {
                        cursor.on_cache_page(through);
                        subs.catching_up.push_back(key);
                    }
                    Join::NotCached => subs.catching_up.push_back(key),
                    Join::Gone => return None,
                }
            }
            Step::ReadLog { after, through } => {
                let app = Arc::clone(app);
                return Some(Box::pin(async move {
                    let result =
                        catchup::read_key_page(&app, key.clone(), after, through, page).await;
                    JobDone::Page { key, result }
                }));
            }
        }
    }
    None
}

fn close_behind(
    app: &AppState,
    sub: &Subscriber,
    info: &ConnInfo,
    key: &SubscriptionKey,
    position: u64,
    floor: u64,
) {
    Metrics::inc(&app.hub.metrics.slow_consumer_closes);
    tracing::warn!(
        event = "slow_consumer",
        client_id = %info.client_id,
        subscription_key = %key,
        position,
        retention_floor = floor,
        lag = app.hub.head().saturating_sub(position),
        "subscriber fell behind the retention floor: closing with 1013 (it resumes with recovered: false)"
    );
    sub.close(CloseReason::SlowConsumer);
}

fn on_job_done(
    app: &Arc<AppState>,
    sub: &Arc<Subscriber>,
    info: &ConnInfo,
    subs: &mut Subscriptions,
    done: JobDone,
) {
    match done {
        JobDone::Started { key, result } => match result {
            Ok(start) => {
                let ack = app.hub.sub_ack(
                    &key,
                    start.drained,
                    start.head,
                    start.recovered,
                    start.oldest_sequence,
                );
                let ok = sub.push_one(ack);
                log_subscribe(app, info, &key, &start, ok);
                if ok {
                    subs.cursors
                        .insert(key.clone(), Cursor::catching_up(start.after));
                    subs.catching_up.push_back(key);
                }
            }
            Err(e) => {
                tracing::warn!(event = "subscribe_failed", client_id = %info.client_id, subscription_key = %key, error = %e, "could not read where the subscription starts");
                reply_error(sub, &e);
            }
        },
        JobDone::Page { key, result } => {
            let Some(cursor) = subs.cursors.get_mut(&key) else {
                return; // unsubscribed while the page was read
            };
            match result {
                Ok(page) => {
                    Metrics::inc(&app.hub.metrics.catchup_pages);
                    let position = cursor.position();
                    if cursor.on_log_page(page.covered_through, page.floor) == Phase::Behind {
                        close_behind(app, sub, info, &key, position, page.floor);
                        return;
                    }
                    let n = page.frames.len() as u64;
                    if sub.push(page.frames.iter().cloned()) {
                        Metrics::add(&app.hub.metrics.deliveries, n);
                    }
                    subs.catching_up.push_back(key);
                }
                Err(e) => {
                    tracing::warn!(event = "catchup_read_failed", client_id = %info.client_id, subscription_key = %key, error = %e, "could not read the log to catch a subscriber up");
                    sub.close(CloseReason::LogUnavailable);
                }
            }
        }
    }
}

/// Handle one read from the client. Returns the peer's close code when the connection is over.
fn on_client_frame(
    app: &Arc<AppState>,
    msg: Option<Result<Message, axum::Error>>,
    sub: &Arc<Subscriber>,
    grant: &Grant,
    info: &ConnInfo,
    subs: &mut Subscriptions,
    job: &mut Option<Job>,
) -> Option<u16> {
    let text = match msg {
        Some(Ok(Message::Text(t))) => t,
        Some(Ok(Message::Binary(_))) => {
            reply_error(
                sub,
                &ApiError::BadRequest("binary frames are not supported; send JSON text".into()),
            );
            return None;
        }
        Some(Ok(Message::Close(c))) => return Some(c.map_or(1005, |c| c.code)),
        Some(Ok(_)) => return None,
        Some(Err(e)) if is_too_large(&e) => {
            tracing::info!(event = "frame_too_large", client_id = %info.client_id, limit = app.settings.max_message_bytes, "closing: frame over the size limit");
            sub.close(CloseReason::TooLarge);
            return None;
        }
        Some(Err(_)) | None => return Some(1006),
    };
    match decode_client_frame(text.as_str()) {
        Ok(ClientFrame::Subscribe(s)) => {
            let key = s.key();
            if subs.cursors.contains_key(&key) {
                // Already subscribed: acknowledged again, nothing replayed.
                sub.push_one(app.hub.sub_ack(&key, 0, app.hub.head(), None, None));
                return None;
            }
            if subs.cursors.len() >= app.settings.max_subscriptions {
                reply_error(
                    sub,
                    &ApiError::BadRequest(format!(
                        "too many subscriptions on this connection (limit {}); unsubscribe first",
                        app.settings.max_subscriptions
                    )),
                );
                return None;
            }
            if !grant.allows(&key) {
                reply_error(
                    sub,
                    &ApiError::Forbidden(format!("token may not read {key}")),
                );
                return None;
            }
            let app = Arc::clone(app);
            *job = Some(Box::pin(async move {
                let result =
                    catchup::plan_start(&app, &key, s.since, s.epoch.as_deref(), now_ms()).await;
                JobDone::Started { key, result }
            }));
        }
        Ok(ClientFrame::Unsubscribe(u)) => {
            let key = u.key();
            app.hub.unsubscribe(sub, &key);
            subs.cursors.remove(&key);
            subs.catching_up.retain(|k| k != &key);
            tracing::debug!(event = "unsubscribed", client_id = %info.client_id, subscription_key = %key, "unsubscribed");
        }
        Ok(ClientFrame::Ping) => {
            sub.push_one(Utf8Bytes::from_static(r#"{"type":"pong"}"#));
        }
        Ok(ClientFrame::Hello(_)) => reply_error(
            sub,
            &ApiError::BadRequest("already connected: hello is only the first frame".into()),
        ),
        Err(e) => reply_error(sub, &ApiError::from(e)),
    }
    None
}

fn log_subscribe(
    app: &AppState,
    info: &ConnInfo,
    key: &SubscriptionKey,
    start: &Start,
    queued: bool,
) {
    if !queued {
        tracing::warn!(
            event = "backlog_drain_failed",
            subscription_key = %key,
            channel = %key.channel(),
            request_id = %key.request_id(),
            drained_request_id = %key.request_id(),
            client_id = %info.client_id,
            count = 0,
            failed_count = start.drained,
            "could not queue sub_ack and backlog: connection is closing"
        );
        return;
    }
    if start.drained > 0 || start.expired > 0 {
        tracing::info!(
            event = "backlog_drained",
            subscription_key = %key,
            channel = %key.channel(),
            request_id = %key.request_id(),
            drained_request_id = %key.request_id(),
            client_id = %info.client_id,
            count = start.drained,
            failed_count = 0,
            expired_count = start.expired,
            "backlog (the key's recent messages from the log) drains to the subscriber"
        );
    }
    if start.expired > 0 {
        tracing::debug!(
            event = "backlog_expired",
            subscription_key = %key,
            channel = %key.channel(),
            request_id = %key.request_id(),
            client_id = %info.client_id,
            count = start.expired,
            "the key's older messages are past the backlog TTL: not drained"
        );
    }
    if start.overflow > 0 {
        Metrics::add(&app.hub.metrics.backlog_overflow, start.overflow);
        tracing::warn!(
            event = "backlog_overflow",
            subscription_key = %key,
            channel = %key.channel(),
            request_id = %key.request_id(),
            client_id = %info.client_id,
            count = start.overflow,
            backlog_size = start.drained,
            "backlog bound per key reached: the oldest messages are not drained"
        );
    }
    tracing::debug!(
        event = "subscribed",
        subscription_key = %key,
        client_id = %info.client_id,
        after = start.after,
        head = start.head,
        recovered = start.recovered,
        "subscribed"
    );
}

fn reply_error(sub: &Subscriber, e: &ApiError) {
    sub.push_one(error_frame(e));
}

fn error_frame(e: &ApiError) -> Utf8Bytes {
    Utf8Bytes::from(encode_server_frame(&ServerFrame::Error(ErrorFrame {
        code: e.code(),
        message: e.message().to_owned(),
    })))
}

async fn send_error(sink: &mut WebSocket, e: &ApiError) -> Result<(), axum::Error> {
    sink.send(Message::Text(error_frame(e))).await
}

async fn close_with(sink: &mut WebSocket, reason: CloseReason) {
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: reason.code(),
            reason: Utf8Bytes::from_static(reason.text()),
        })))
        .await;
    let _ = sink.close().await;
}

/// How long a closing connection may take to get its close frame out before the socket is
/// simply dropped (a slow consumer may never read it).
const CLOSE_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Write every taken frame, then flush once.
async fn write_round(
    sink: &mut WebSocket,
    buf: &mut Vec<Frame>,
    sent: &mut u64,
) -> Result<(), axum::Error> {
    for f in buf.drain(..) {
        sink.feed(Message::Text(f)).await?;
        *sent += 1;
    }
    sink.flush().await
}

async fn close_in_time(sink: &mut WebSocket, reason: CloseReason) -> u16 {
    if tokio::time::timeout(CLOSE_WRITE_TIMEOUT, close_with(sink, reason))
        .await
        .is_err()
    {
        tracing::info!(
            event = "close_timeout",
            close_code = reason.code(),
            "close frame could not be written in time; dropping the socket"
        );
    }
    reason.code()
}

fn is_too_large(e: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(WsError::Capacity(_)) = s.downcast_ref::<WsError>() {
            return true;
        }
        source = s.source();
    }
    // axum::Error wraps the tungstenite error as its inner error; its Display says so too.
    e.to_string().contains("Space limit exceeded") || e.to_string().contains("too long")
}

fn log_rejected(
    client_id: &str,
    session_id: Option<&SessionId>,
    connection_sequence: Option<u64>,
    close_code: u16,
    started: Instant,
    why: &str,
) {
    tracing::info!(
        event = "connection_closed",
        client_id,
        session_id = session_id.map(|s| s.as_str()),
        connection_sequence,
        close_code,
        duration_seconds = started.elapsed().as_secs_f64(),
        messages_sent = 0u64,
        reason = why,
        "connection closed before it was authenticated"
    );
}
