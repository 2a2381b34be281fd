//! HTTP endpoints: publish, recovery, stream pages, health, metrics, and the browser assets.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use seqcast_persistence::CommittedEvent;
use seqcast_protocol::{
    BatchPublishResponse, Channel, PublishRequest, PublishResponse, RecoverParams, RecoveryMeta,
    RequestId, StreamParams, SubscriptionKey, decode_batch, decode_publish, decode_query,
    encode_recovery_response, encode_stream_page, page_limit,
};
use seqcast_sequencing::ReadBudget;

use crate::auth::Grant;
use crate::catchup;
use crate::config::StorageKind;
use crate::error::ApiError;
use crate::hub::{Hub, frame_bytes};
use crate::metrics::PublishEndpoint;
use crate::now_ms;
use crate::publish;
use crate::selection::Selection;
use crate::state::AppState;
use seqcast_protocol::{BatchPublishRequest, ErrorBody, encode_publish_response};

pub(crate) fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

pub(crate) fn json_response(status: StatusCode, body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A query string decoded into `T` ([`seqcast_protocol::decode_query`]: unknown parameters are
/// refused): any failure is a 400 `bad_request` with a JSON body, as the contract wants, rather
/// than axum's plain-text 400.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for ApiQuery<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, ApiError> {
        Ok(ApiQuery(decode_query(parts.uri.query().unwrap_or(""))?))
    }
}

#[utoipa::path(
    get,
    path = "/websocket/messages",
    summary = "Recover messages after `since`",
    description = "Messages with `sequence_number > since` in the recovery window that the token may read, in order; the same objects as live frames. `complete: false` where the window no longer reaches `since + 1` or `epoch` differs; `next_since` where `limit` or the byte bound cut the page. `channel` alone selects a channel; `request_id` alone that request id in every channel the token may read. Unknown parameters are refused (400).",
    params(RecoverParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Recovered messages", body = seqcast_protocol::RecoveryResponse),
        (status = 400, description = "Bad parameter, name or body (`bad_request`, `too_large`)", body = ErrorBody),
        (status = 401, description = "No valid token or key (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "A key outside the token's patterns (`forbidden`)", body = ErrorBody),
        (status = 503, description = "The log cannot be read (`unavailable`)", body = ErrorBody),
    )
)]
/// `GET /websocket/messages?since=N[&channel=C[&request_id=R]][&limit=L][&epoch=E]`
pub async fn recover(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<ApiQuery<RecoverParams>, ApiError>,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let answer = recover_page(&app, headers, query).await;
    let m = &app.hub.metrics;
    m.recovery_seconds.observe(started.elapsed().as_secs_f64());
    if let Ok((_, messages, bytes)) = &answer {
        m.recovery_messages.observe(*messages as f64);
        m.recovery_bytes.observe(*bytes as f64);
    }
    answer.map(|(r, _, _)| r)
}

/// The recovery answer, with its message count and bytes.
async fn recover_page(
    app: &Arc<AppState>,
    headers: HeaderMap,
    query: Result<ApiQuery<RecoverParams>, ApiError>,
) -> Result<(Response, usize, usize), ApiError> {
    // Credentials are checked before parameters: a bad query without a token is a 401.
    let grant = app.auth.reader(authorization(&headers))?;
    let ApiQuery(q) = query?;
    let since = q.since.unwrap_or(0);
    let limit = page_limit(q.limit)?;
    let selection = Selection::parse(
        q.channel,
        q.request_id,
        &[],
        app.settings.max_subscriptions,
        &grant,
    )?;
    let resumed = catchup::plan_resume(app, since, q.epoch.as_deref(), now_ms()).await?;
    let head = resumed.head;
    let oldest_sequence = (resumed.window_start <= head).then_some(resumed.window_start);
    let mut meta = RecoveryMeta {
        head,
        oldest_sequence,
        epoch: app.hub.epoch(),
        complete: resumed.verdict.recovered(),
        next_since: None,
    };
    // Messages numbered in another epoch's history would be unrelated: send none.
    let Some(after) = resumed.verdict.start() else {
        let body = encode_recovery_response(std::iter::empty(), &meta);
        return Ok((json_response(StatusCode::OK, body), 0, 0));
    };
    let budget = ReadBudget {
        max_events: limit,
        max_bytes: app.settings.max_response_bytes,
    };
    let admit = |key: &SubscriptionKey| selection.admits(key, &grant);
    let read = catchup::read_recovery(
        app,
        &selection.to_event_filter(),
        &admit,
        after,
        head,
        budget,
    )
    .await?;
    // The cursor fell behind the retention floor while the log was read: `complete: false`.
    meta.complete &= !read.behind;
    meta.next_since = read.next_since;
    let bytes = read.frames.iter().map(|(_, f)| frame_bytes(f)).sum();
    let body = encode_recovery_response(read.frames.iter().map(|(_, f)| f.as_str()), &meta);
    Ok((
        json_response(StatusCode::OK, body),
        read.frames.len(),
        bytes,
    ))
}

/// A declared `Content-Length` over the limit is refused at once, before any of the body is read.
fn check_length(headers: &HeaderMap, limit: usize) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => Err(ApiError::TooLarge(format!(
            "request body of {n} bytes exceeds the limit of {limit} bytes"
        ))),
        _ => Ok(()),
    }
}

async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|e| ApiError::from_body_error(&e, limit))
}

#[utoipa::path(
    post,
    path = "/api/publish",
    summary = "Publish one message (answered after the write is durable)",
    description = "`message_id` is the idempotency key within the stream: a repeat with the same data is answered with the first write's numbers; with other data it is an upsert. Absent (or null), the server makes one.",
    request_body = PublishRequest,
    security(("apiKey" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "Committed", body = PublishResponse),
        (status = 400, description = "Bad parameter, name or body (`bad_request`, `too_large`)", body = ErrorBody),
        (status = 401, description = "No valid token or key (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "A key outside the token's patterns (`forbidden`)", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time (`timeout`)", body = ErrorBody),
        (status = 429, description = "Over the publish rate (`rate_limited`), with `Retry-After`", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a retry can succeed"))),
        (status = 503, description = "The database cannot take writes; nothing was published (`unavailable`)", body = ErrorBody),
    )
)]
/// `POST /api/publish`
pub async fn publish(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let answer = publish_one(&app, headers, body).await;
    app.hub
        .metrics
        .observe_publish(PublishEndpoint::single, started.elapsed());
    answer
}

async fn publish_one(
    app: &Arc<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_length(&headers, app.settings.max_message_bytes)?;
    let grant = app.auth.publisher(authorization(&headers))?;
    publish::admit(app, &grant, 1)?;
    let bytes = read_body(body, app.settings.max_message_bytes).await?;
    let req = decode_publish(&bytes)?;
    let ev = publish::new_event(req, &grant, &app.message_ids)?;
    let committed = publish::commit(app, vec![ev]).await?;
    let first = committed
        .first()
        .ok_or_else(|| ApiError::Internal("store returned no event".into()))?;
    Ok(json_response(StatusCode::OK, publish::answer_json(first)))
}

#[utoipa::path(
    post,
    path = "/api/publish/batch",
    summary = "Publish many messages in one transaction (all or nothing)",
    request_body = BatchPublishRequest,
    security(("apiKey" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "Committed: one answer per message, in order", body = BatchPublishResponse),
        (status = 400, description = "Bad parameter, name or body (`bad_request`, `too_large`)", body = ErrorBody),
        (status = 401, description = "No valid token or key (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "A key outside the token's patterns (`forbidden`)", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time (`timeout`)", body = ErrorBody),
        (status = 429, description = "Over the publish rate (`rate_limited`), with `Retry-After`", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a retry can succeed"))),
        (status = 503, description = "The database cannot take writes; nothing was published (`unavailable`)", body = ErrorBody),
    )
)]
/// `POST /api/publish/batch` — one transaction: all or nothing.
pub async fn publish_batch(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let answer = publish_many(&app, headers, body).await;
    app.hub
        .metrics
        .observe_publish(PublishEndpoint::batch, started.elapsed());
    answer
}

async fn publish_many(
    app: &Arc<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = app.settings.max_message_bytes.saturating_mul(16);
    check_length(&headers, limit)?;
    let grant = app.auth.publisher(authorization(&headers))?;
    let bytes = read_body(body, limit).await?;
    let req = decode_batch(&bytes)?;
    publish::admit(app, &grant, req.messages.len())?;
    let events = req
        .messages
        .into_iter()
        .map(|m| publish::new_event(m, &grant, &app.message_ids))
        .collect::<Result<Vec<_>, _>>()?;
    let committed = publish::commit(app, events).await?;
    Ok(axum::Json(BatchPublishResponse {
        results: committed.iter().map(publish::answer).collect(),
    })
    .into_response())
}

#[utoipa::path(
    post,
    path = "/api/publish/stream",
    summary = "Publish a stream of messages: NDJSON in, NDJSON answers out as each commits",
    description = "The body is NDJSON (`application/x-ndjson`): one publish object per line, as for `POST /api/publish`, sent as they are produced (chunked). The answer streams back one line per publish, in order, as soon as it commits: the publish answer, or `{\"error\":{\"code\",\"message\"}}` for a line refused alone (bad JSON or name, forbidden key, `rate_limited`), after which the stream goes on. Lines that arrive while a commit is out are committed together. A line longer than `--max-message-bytes` ends the stream with a `too_large` error line; so does a pause between body pieces longer than `--http-body-timeout-secs` (`timeout`); blank lines are skipped and keep the stream alive. Errors of the request itself (credentials) are answered with a status before any line.",
    // Not required: an empty body is a stream of no lines (a producer that had nothing to
    // publish), answered 200 with no lines.
    request_body(content = Option<String>, content_type = "application/x-ndjson", description = "One `PublishRequest` JSON object per line; an empty body is a stream of no lines (200, no answer lines)"),
    security(("apiKey" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "NDJSON: one `PublishResponse` or `ErrorBody` per line of the request, in order", content_type = "application/x-ndjson", body = String),
        (status = 401, description = "No valid token or key (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "A token without `publish: true` (`forbidden`)", body = ErrorBody),
    )
)]
/// `POST /api/publish/stream`: NDJSON publishes in, NDJSON answers out, one per line, in order.
pub async fn publish_stream(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let grant = app.auth.publisher(authorization(&headers))?;
    let stream = NdjsonPublishes::new(app, grant, body);
    let lines = futures_util::stream::unfold(stream, |mut s| async move {
        let chunk = s.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), s))
    });
    let mut r = Response::new(Body::from_stream(lines));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(r)
}

/// One `POST /api/publish/stream`: reads lines from the body while the pipeline has room,
/// commits what arrived together, and hands out the answers' lines as each commit returns. The
/// response body drives it, so a client that stops reading answers stops the reading of its
/// body (after [`publish::MAX_IN_FLIGHT`] publishes), and one that goes away ends it.
struct NdjsonPublishes {
    app: Arc<AppState>,
    grant: Grant,
    body: Option<axum::body::BodyDataStream>,
    /// The start of a line whose end has not arrived.
    partial: Vec<u8>,
    pipeline: publish::Pipeline<()>,
    /// No more lines are taken (the body ended, failed, or a line was too long).
    ending: bool,
}

impl NdjsonPublishes {
    fn new(app: Arc<AppState>, grant: Grant, body: Body) -> Self {
        NdjsonPublishes {
            pipeline: publish::Pipeline::new(Arc::clone(&app)),
            app,
            grant,
            body: Some(body.into_data_stream()),
            partial: Vec::new(),
            ending: false,
        }
    }

    /// The next answers, as NDJSON text; `None` once every line is answered.
    ///
    /// Every line of a piece of the body is taken before the pipeline starts a commit, and
    /// pieces that arrive while a commit is out wait for the next: what arrived together is
    /// committed together.
    async fn next_chunk(&mut self) -> Option<axum::body::Bytes> {
        use futures_util::StreamExt as _;
        loop {
            let answered = self.pipeline.start();
            if !answered.is_empty() {
                return Some(Self::lines(answered));
            }
            let reading = !self.ending && self.pipeline.has_room();
            if !reading && !self.pipeline.is_committing() {
                // Ending with everything answered (a full pipeline always has a commit out).
                return None;
            }
            tokio::select! {
                biased;
                answered = self.pipeline.finished(), if self.pipeline.is_committing() => {
                    return Some(Self::lines(answered));
                }
                piece = async { self.body.as_mut()?.next().await }, if reading => match piece {
                    Some(Ok(bytes)) => self.take(&bytes),
                    Some(Err(e)) => {
                        let limit = self.app.settings.max_message_bytes;
                        self.end_with(ApiError::from_body_error(&e, limit));
                    }
                    None => {
                        let rest = std::mem::take(&mut self.partial);
                        self.line(&rest);
                        self.ending = true;
                        self.body = None;
                    }
                },
            }
        }
    }

    /// A piece of the body: complete lines are taken; the rest waits for its end.
    fn take(&mut self, bytes: &[u8]) {
        let limit = self.app.settings.max_message_bytes;
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = (&rest[..i], &rest[i + 1..]);
            rest = tail;
            if self.partial.is_empty() {
                self.line(head);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                self.line(&line);
            }
            if self.ending {
                return;
            }
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > limit {
            self.partial = Vec::new();
            self.end_with(ApiError::TooLarge(format!(
                "a line of the stream exceeds the limit of {limit} bytes"
            )));
        }
    }

    /// One line: published in its turn, or refused in its turn. Blank lines are skipped.
    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let limit = self.app.settings.max_message_bytes;
        if line.len() > limit {
            return self.end_with(ApiError::TooLarge(format!(
                "a line of {} bytes exceeds the limit of {limit} bytes",
                line.len()
            )));
        }
        let event = decode_publish(line)
            .map_err(ApiError::from)
            .and_then(|req| {
                publish::admit(&self.app, &self.grant, 1)?;
                publish::new_event(req, &self.grant, &self.app.message_ids)
            });
        match event {
            Ok(ev) => self.pipeline.push_event((), ev, line.len()),
            Err(e) => self.pipeline.push_refused((), e),
        }
    }

    /// Take no more lines; `e` is the last answer.
    fn end_with(&mut self, e: ApiError) {
        self.pipeline.push_refused((), e);
        self.ending = true;
        self.body = None;
    }

    fn lines(answered: Vec<publish::Outcome<()>>) -> axum::body::Bytes {
        let mut out = String::new();
        for outcome in answered {
            let line = match outcome {
                publish::Outcome::Committed((), a) => Ok(encode_publish_response(&a)),
                publish::Outcome::Refused((), e) => {
                    serde_json::to_string(&ErrorBody::new(e.code(), e.message()))
                }
            };
            out.push_str(&line.unwrap_or_else(|_| {
                r#"{"error":{"code":"internal","message":"failed to encode an answer"}}"#.to_owned()
            }));
            out.push('\n');
        }
        axum::body::Bytes::from(out)
    }
}

#[utoipa::path(
    get,
    path = "/api/streams/{channel}/{request_id}/messages",
    summary = "Page a stream's rows by stream_sequence",
    params(
        ("channel" = Channel, Path, description = "The key's channel"),
        ("request_id" = RequestId, Path, description = "The key's request id"),
        StreamParams,
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Rows", body = seqcast_protocol::StreamPage),
        (status = 400, description = "Bad parameter, name or body (`bad_request`, `too_large`)", body = ErrorBody),
        (status = 401, description = "No valid token or key (`unauthorized`)", body = ErrorBody),
        (status = 403, description = "A key outside the token's patterns (`forbidden`)", body = ErrorBody),
        (status = 503, description = "The log cannot be read (`unavailable`)", body = ErrorBody),
    )
)]
/// `GET /api/streams/{channel}/{request_id}/messages?after=S&limit=L`
pub async fn stream_page(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((channel, request_id)): Path<(String, String)>,
    query: Result<ApiQuery<StreamParams>, ApiError>,
) -> Result<Response, ApiError> {
    let grant = app.auth.reader(authorization(&headers))?;
    let key = SubscriptionKey::new(Channel::new(channel)?, RequestId::new(request_id)?);
    if !grant.allows(&key) {
        return Err(ApiError::Forbidden(format!("token may not read {key}")));
    }
    let ApiQuery(q) = query?;
    let after = q.after.unwrap_or(0);
    let limit = page_limit(q.limit)?;
    let budget = ReadBudget {
        max_events: limit,
        max_bytes: app.settings.max_response_bytes,
    };
    // The store stops reading at the budget's count or bytes (the rows read then account for
    // the stream up to the last of them, else for all of it); the page is filled under the same
    // budget (at least one row), like a recovery page.
    let rows = app
        .store
        .read(move |r| r.stream_rows(&key, after, budget.max_events, budget.max_bytes))
        .await?;
    let read_bytes: usize = rows.iter().map(CommittedEvent::read_bytes).sum();
    let stopped = rows.len() >= budget.max_events || read_bytes >= budget.max_bytes;
    let read_through = match rows.last() {
        Some(last) if stopped => last.stream_sequence,
        _ => u64::MAX,
    };
    let page = budget.fill().page(
        after,
        read_through,
        rows.iter()
            .map(|row| (row.stream_sequence, Hub::frame_of(row))),
        frame_bytes,
    );
    let next_after = (page.covered_through != u64::MAX).then_some(page.covered_through);
    let frames = page.items;
    Ok(json_response(
        StatusCode::OK,
        encode_stream_page(frames.iter().map(|f| f.as_str()), next_after),
    ))
}

#[utoipa::path(get, path = "/healthz", summary = "Liveness",
    responses((status = 200, description = "Up", body = Object, example = json!({"status": "ok"}))))]
/// `GET /healthz`: the process is up.
pub async fn healthz() -> Response {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#.into())
}

#[utoipa::path(get, path = "/readyz", summary = "Readiness",
    description = "503 while shutting down, or while publishes would be refused (writer stopped, database file lost), with the reason.",
    responses(
        (status = 200, description = "Ready", body = Object, example = json!({"status": "ready", "head": 42})),
        (status = 503, description = "Not ready", body = Object, example = json!({"status": "unavailable", "reason": "the database writer has stopped"})),
    ))]
/// `GET /readyz`: ready to take traffic: not shutting down, and publishes would not be refused
/// (writer stopped, database file lost, or the database failing writes: read-only, full,
/// locked past the busy timeout). The body says why.
pub async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    if app.shutdown.is_cancelled() {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"shutting_down"}"#.into(),
        )
    } else if let Some(reason) = app
        .store
        .health()
        .unwritable
        .filter(|_| app.settings.storage == StorageKind::Postgres)
    {
        // A PostgreSQL node probes its database itself, and says so in its own words.
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "database_unavailable", "reason": reason}).to_string(),
        )
    } else if let Some(why) = app.readiness_fault().await {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unavailable", "reason": why}).to_string(),
        )
    } else {
        json_response(
            StatusCode::OK,
            format!(r#"{{"status":"ready","head":{}}}"#, app.hub.head()),
        )
    }
}

#[utoipa::path(get, path = "/metrics", summary = "Prometheus metrics (OpenMetrics text; see docs/operations.md)",
    responses((status = 200, description = "OpenMetrics text", body = String, content_type = "application/openmetrics-text")))]
/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let mut snapshot = crate::metrics::Snapshot {
        gauges: app.hub.gauges().to_vec(),
        counters: Vec::new(),
    };
    snapshot.gauges.extend([
        (
            "seqcast_connections",
            "WebSocket connections open (handshake done, hello or not)",
            app.connections.len() as u64,
        ),
        (
            "seqcast_live_subscriptions",
            "Subscriptions in live delivery on this node (a key followed twice counts twice)",
            app.hub.live_subscriptions() as u64,
        ),
    ]);
    snapshot.gauges.push((
        "seqcast_page_cache_bytes",
        "Bytes of log pages shared by cursors catching up over the same range",
        app.pages.bytes() as u64,
    ));
    let health = app.store.health();
    if let Some(queued) = health.queued_commands {
        let stats = health.stats;
        snapshot.counters.extend([
            (
                "seqcast_db_transactions",
                "Write transactions committed (one per group commit)",
                stats.transactions_committed,
            ),
            (
                "seqcast_db_transactions_failed",
                "Write transactions that failed; nothing of them was written",
                stats.transactions_failed,
            ),
            (
                "seqcast_db_events_committed",
                "Events committed; divided by transactions: events per group commit",
                stats.events_committed,
            ),
        ]);
        snapshot.gauges.push((
            "seqcast_db_queued_commands",
            "Commands waiting for the database writer",
            queued as u64,
        ));
    }
    if let Some(tail) = health.tail {
        snapshot.gauges.extend([
            (
                "seqcast_pg_tail_lag_events",
                "Committed events (on any node) this node's tail has not applied yet",
                tail.seen_head.saturating_sub(tail.applied),
            ),
            (
                "seqcast_pg_tail_applied",
                "The highest sequence number this node's tail has applied",
                tail.applied,
            ),
            (
                "seqcast_pg_tail_read_age_ms",
                "Milliseconds since this node's tail last read the log",
                tail.since_read_ms.unwrap_or(u64::MAX),
            ),
            (
                "seqcast_pg_tail_connected",
                "1 while the tail's LISTEN connection is up",
                u64::from(tail.connected),
            ),
            (
                "seqcast_pg_writable",
                "1 while the database takes this node's writes",
                u64::from(health.unwritable.is_none()),
            ),
        ]);
    }
    let mut r = app.hub.metrics.render(&snapshot).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

/// Anything else.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

/// The browser client, the demo page and its types, embedded in the binary.
pub mod assets {
    use super::*;

    const CLIENT_JS: &str = include_str!("../../../clients/js/seqcast.js");
    const CLIENT_DTS: &str = include_str!("../../../clients/js/seqcast.d.ts");
    const DEMO_HTML: &str = include_str!("../../../clients/js/demo.html");
    /// An embedded file as the answer, revalidated by the browser each time.
    pub fn asset(content_type: &'static str, body: &'static str) -> Response {
        let mut r = body.into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    }

    /// `GET /client/seqcast.js`
    pub async fn client_js() -> Response {
        asset("text/javascript; charset=utf-8", CLIENT_JS)
    }

    /// `GET /client/seqcast.d.ts`
    pub async fn client_dts() -> Response {
        asset("application/typescript; charset=utf-8", CLIENT_DTS)
    }

    /// `GET /favicon.ico` — 204: the demo page brings its own icon inline, and a browser's
    /// automatic request should not fill logs and consoles with 404s.
    pub async fn favicon() -> Response {
        let mut r = axum::http::StatusCode::NO_CONTENT.into_response();
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=86400"),
        );
        r
    }

    /// `GET /` — the demo page.
    pub async fn demo_page() -> Response {
        asset("text/html; charset=utf-8", DEMO_HTML)
    }

    /// `GET /dev/token` — development mode only: a short-lived token that may read and publish
    /// everything, so the demo page works out of the box. 404 once a verifier is configured;
    /// 403 unless the peer is loopback and the request came through no proxy.
    pub async fn dev_token(
        State(app): State<Arc<AppState>>,
        peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
        headers: axum::http::HeaderMap,
    ) -> Result<Response, ApiError> {
        if !app.dev_mode {
            return Err(ApiError::NotFound(
                "no development token: a token verifier is configured".into(),
            ));
        }
        let forwarded = ["forwarded", "x-forwarded-for", "x-real-ip"]
            .iter()
            .any(|h| headers.contains_key(*h));
        let peer = peer.map(|axum::Extension(axum::extract::ConnectInfo(a))| a.ip());
        if let Some(why) = crate::auth::dev_token_refusal(peer, forwarded) {
            return Err(ApiError::Forbidden(why));
        }
        let token = app.auth.mint("dev", None, 3600, true)?;
        Ok(axum::Json(serde_json::json!({ "token": token, "dev_mode": true })).into_response())
    }
}
