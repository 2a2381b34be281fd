//! One WebSocket connection: authenticate with `hello`, then one task both reads client frames
//! and drains the bounded send queue — everything queued is written, then flushed once. One task
//! per connection (no split halves, no lock between them) keeps an idle connection small and
//! a busy one cheap.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use seqcast_protocol::{
    ClientFrame, Connected, ErrorFrame, ServerFrame, SessionId, SubscriptionKey,
    decode_client_frame, encode_server_frame,
};

use crate::app::AppState;
use crate::auth::{Grant, random_hex};
use crate::error::{ApiError, CloseReason};
use crate::hub::{Outbound, Subscriber};
use crate::metrics::Metrics;
use crate::now_ms;

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
    sub.push(Outbound::Frame(Utf8Bytes::from(encode_server_frame(
        &connected,
    ))));

    let mut keys: Vec<SubscriptionKey> = Vec::new();
    let ended = run(&app, &mut socket, &sub, &grant, &info, &mut keys).await;
    sub.finish();
    app.hub.disconnect(&sub, keys.iter());
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

/// Serve an authenticated connection until it ends: read client frames, and write whatever
/// the hub or the replies queued — all of it, then one flush.
async fn run(
    app: &AppState,
    socket: &mut WebSocket,
    sub: &Arc<Subscriber>,
    grant: &Grant,
    info: &ConnInfo,
    keys: &mut Vec<SubscriptionKey>,
) -> Ended {
    let mut sent = 0u64;
    let mut buf: Vec<Outbound> = Vec::new();
    // Made once: a close request or shutdown wakes the connection through these.
    let closed = sub.closed();
    tokio::pin!(closed);
    let shutdown = app.shutdown.cancelled();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            reason = &mut closed => {
                return Ended { sent, server_code: Some(close_in_time(socket, reason).await), client_code: None };
            }
            // Asks for a close; the next turn sends it.
            _ = &mut shutdown, if !sub.is_closing() => sub.close(CloseReason::GoingAway),
            msg = socket.recv() => {
                if let Some(code) = on_client_frame(app, msg, sub, grant, info, keys) {
                    // The peer closed or the connection broke: answer a close, then stop.
                    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, socket.close()).await;
                    return Ended { sent, server_code: None, client_code: Some(code) };
                }
            }
            _ = sub.take_queued(&mut buf) => {
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
        }
    }
}

/// Handle one read from the client. Returns the peer's close code when the connection is over.
fn on_client_frame(
    app: &AppState,
    msg: Option<Result<Message, axum::Error>>,
    sub: &Arc<Subscriber>,
    grant: &Grant,
    info: &ConnInfo,
    keys: &mut Vec<SubscriptionKey>,
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
            if keys.len() >= app.settings.max_subscriptions && !keys.contains(&key) {
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
            let outcome = app
                .hub
                .subscribe(sub, &key, s.since, s.epoch.as_deref(), now_ms());
            if !outcome.already {
                keys.push(key.clone());
            }
            log_subscribe(info, &key, &outcome);
        }
        Ok(ClientFrame::Unsubscribe(u)) => {
            let key = u.key();
            app.hub.unsubscribe(sub, &key);
            keys.retain(|k| k != &key);
            tracing::debug!(event = "unsubscribed", client_id = %info.client_id, subscription_key = %key, "unsubscribed");
        }
        Ok(ClientFrame::Ping) => {
            sub.push(Outbound::Frame(Utf8Bytes::from_static(
                r#"{"type":"pong"}"#,
            )));
        }
        Ok(ClientFrame::Hello(_)) => reply_error(
            sub,
            &ApiError::BadRequest("already connected: hello is only the first frame".into()),
        ),
        Err(e) => reply_error(sub, &ApiError::from(e)),
    }
    None
}

fn log_subscribe(info: &ConnInfo, key: &SubscriptionKey, outcome: &crate::hub::SubscribeOutcome) {
    if outcome.failed {
        tracing::warn!(
            event = "backlog_drain_failed",
            subscription_key = %key,
            channel = %key.channel(),
            request_id = %key.request_id(),
            drained_request_id = %key.request_id(),
            client_id = %info.client_id,
            count = 0,
            failed_count = outcome.drained,
            "could not queue sub_ack and backlog: connection is closing"
        );
        return;
    }
    if outcome.drained > 0 || outcome.expired > 0 {
        tracing::info!(
            event = "backlog_drained",
            subscription_key = %key,
            channel = %key.channel(),
            request_id = %key.request_id(),
            drained_request_id = %key.request_id(),
            client_id = %info.client_id,
            count = outcome.drained,
            failed_count = 0,
            expired_count = outcome.expired,
            "backlog drained to subscriber"
        );
    }
    tracing::debug!(
        event = "subscribed",
        subscription_key = %key,
        client_id = %info.client_id,
        replayed = outcome.replayed,
        recovered = outcome.recovered,
        "subscribed"
    );
}

fn reply_error(sub: &Subscriber, e: &ApiError) {
    sub.push(Outbound::Frame(error_frame(e)));
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

/// Write every taken item, then flush once.
async fn write_round(
    sink: &mut WebSocket,
    buf: &mut Vec<Outbound>,
    sent: &mut u64,
) -> Result<(), axum::Error> {
    for item in buf.drain(..) {
        match item {
            Outbound::Frame(f) => {
                sink.feed(Message::Text(f)).await?;
                *sent += 1;
            }
            Outbound::Batch(frames) => {
                for f in frames {
                    sink.feed(Message::Text(f)).await?;
                    *sent += 1;
                }
            }
        }
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
