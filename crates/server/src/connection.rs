//! One WebSocket connection: authenticate with `hello`, then one task reads client frames,
//! drives the connection's subscription cursors and drains its send queue — everything queued is
//! written, then flushed once. One task per connection (no split halves, no lock between them)
//! keeps an idle connection small and a busy one cheap.
//!
//! Flow control: while the send queue is above its high-water mark (or a log read is in flight)
//! the task stops catching up and acts only on control frames — `auth` (its token's deadline
//! keeps running), `ping`, `unsubscribe` — and keeps other frames (`subscribe`) for later, a
//! bounded number; past that bound it stops reading (TCP back-pressure on the client). Replies and
//! catch-up pages are therefore never refused. A subscription whose live delivery paused (queue
//! full) catches up from the log page by page as the socket drains, and joins live again at the
//! exact seam.
//!
//! Publishing: `publish` frames (a token with `publish: true`) go through the publish path every
//! door shares ([`crate::publish`]) into the connection's [`Pipeline`]: what was read in one go
//! is committed as one `Store::commit` once the socket has nothing more ready (or while the
//! previous commit is out, for the next), and the answers (`publish_ack`, or `error` with the
//! frame's `ref`) are queued in arrival order and written in one round. With
//! [`crate::publish::MAX_IN_FLIGHT`] publishes read and unanswered the socket is not read until
//! answers drain.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{FutureExt as _, SinkExt, StreamExt as _};
use seqcast_protocol::{
    AuthOk, ClientFrame, Connected, ErrorDetail, ErrorFrame, PublishAck, PublishRef, Resume,
    ResumeAck, ResumeEntry, ResumeResult, ServerFrame, SessionId, SubscriptionKey,
    decode_client_frame, encode_publish_ack, encode_server_frame,
};

use seqcast_delivery::{Admit, Subscriptions};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};

use crate::auth::{Grant, random_hex};
use crate::catchup::{self, Start};
use crate::coalesce::{Gates, WriteAt, WritePacer};
use crate::drive;
use crate::error::{ApiError, CloseReason};
use crate::hub::{Frame, Subscriber};
use crate::metrics::{Metrics, Transport};
use crate::now_ms;
use crate::publish::{self, Outcome, Pipeline};
use crate::state::AppState;

/// What we know of a connection for its log lines.
struct ConnInfo {
    client_id: Arc<str>,
    session_id: Option<SessionId>,
    connection_sequence: Option<u64>,
    started: Instant,
    /// The hub's history when `connected` told the client its epoch ([`crate::hub::Hub::history`]).
    history: u64,
}

/// The node moved to another history since the connection told its client the epoch: asks for
/// the close; true when it did (see [`drive::history_changed`]).
fn history_changed(app: &AppState, sub: &Subscriber, info: &ConnInfo) -> bool {
    drive::history_changed(app, sub, info.reader())
}

impl ConnInfo {
    /// The connection as the driver of its cursors sees it.
    fn reader(&self) -> drive::Reader<'_> {
        drive::Reader {
            client_id: &self.client_id,
            history: self.history,
        }
    }
}

/// Serve one upgraded socket until it closes. `pre_auth` is the grant from an
/// `Authorization: Bearer` header on the upgrade, if any.
/// `http_request_id` is the upgrade request's `x-request-id`, logged with the connection.
pub async fn serve(
    mut socket: WebSocket,
    app: Arc<AppState>,
    pre_auth: Option<Grant>,
    http_request_id: Option<Arc<str>>,
) {
    let rid = http_request_id.as_deref();
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
            log_rejected(
                &client_id,
                rid,
                None,
                None,
                code,
                started,
                "closed before hello",
            );
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
                rid,
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
                rid,
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
        // Before the epoch is read for `connected` (below): a move in between ends the
        // connection at once, never the other way round.
        history: app.hub.history(),
    };
    Metrics::inc(&app.hub.metrics.connections_opened);
    tracing::info!(
        event = "connection_opened",
        client_id = %info.client_id,
        http_request_id = rid,
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
        epoch: app.hub.epoch(),
    });
    sub.push_one(Utf8Bytes::from(encode_server_frame(&connected)));

    let mut subs = Subscriptions::new(app.settings.max_subscriptions);
    let mut grant = grant;
    let ended = run(&app, &mut socket, &sub, &mut grant, &info, &mut subs).await;
    sub.finish();
    app.hub.disconnect(&sub, subs.keys());
    app.hub.metrics.subscriptions.dec_by(subs.len() as i64);
    let (sent, server_code, client_code) = (ended.sent, ended.server_code, ended.client_code);
    let ended_reason = ended.reason.clone();
    let close_code = server_code.or(client_code).unwrap_or(1006);
    app.hub.metrics.closed_with(close_code);
    tracing::info!(
        event = "connection_closed",
        client_id = %info.client_id,
        http_request_id = rid,
        session_id = info.session_id.as_ref().map(|s| s.as_str()),
        connection_sequence = info.connection_sequence,
        close_code,
        reason = ended_reason.as_deref(),
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
            Some(Err(e)) => {
                if let Some((code, text)) = violation(&e) {
                    close_text(sink, code, &text).await;
                    return HelloOutcome::Closed(code);
                }
                return HelloOutcome::Closed(1006);
            }
            None => return HelloOutcome::Closed(1006),
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
    /// Why the server closed it, when it did.
    reason: Option<String>,
}

impl Ended {
    fn by_server(sent: u64, reason: CloseReason) -> Self {
        Ended {
            sent,
            server_code: Some(reason.code()),
            client_code: None,
            reason: Some(reason.text().to_owned()),
        }
    }
}

/// What one read from the client means for the connection.
enum Read {
    /// Go on.
    Continue,
    /// The peer closed, or the connection broke (the peer's close code, 1006 if none).
    PeerClosed(u16),
    /// The peer broke the protocol: close with this code and reason.
    Violation(u16, String),
}

/// The connection's deadlines: the next server ping, the answer to the last one, the token's
/// expiry.
struct Deadlines {
    ping: Pin<Box<tokio::time::Sleep>>,
    /// Set when a ping is out and nothing was read since.
    answer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Frames written when the ping went out: a peer whose TCP window takes our frames is alive.
    sent_at_ping: u64,
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The `tokio` instant at which a token's `exp` (Unix seconds) passes.
fn expiry_instant(exp: Option<u64>) -> Option<tokio::time::Instant> {
    let exp_ms = exp?.saturating_mul(1000);
    let left = exp_ms.saturating_sub(now_ms());
    Some(tokio::time::Instant::now() + std::time::Duration::from_millis(left))
}

/// Which deadline passed.
enum Deadline {
    Expiry,
    Answer,
    Ping,
}

impl Deadlines {
    /// The first deadline that passed, in the order they are acted on: the token's expiry and
    /// the ping's answer (not while closing), then the next ping.
    fn poll_passed(&mut self, cx: &mut Context<'_>, closing: bool) -> Poll<Deadline> {
        fn passed(s: &mut Option<Pin<Box<tokio::time::Sleep>>>, cx: &mut Context<'_>) -> bool {
            s.as_mut().is_some_and(|s| s.as_mut().poll(cx).is_ready())
        }
        if !closing && passed(&mut self.expiry, cx) {
            return Poll::Ready(Deadline::Expiry);
        }
        if !closing && passed(&mut self.answer, cx) {
            return Poll::Ready(Deadline::Answer);
        }
        match self.ping.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Deadline::Ping),
            Poll::Pending => Poll::Pending,
        }
    }
}

async fn sleep_opt(s: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match s {
        Some(s) => s.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Frames the connection keeps for later while it is under back-pressure (at most this many,
/// and reading stops once they hold [`DEFERRED_BYTES`]).
const DEFERRED_FRAMES: usize = 32;
/// Bytes of kept frames past which reading stops (one frame may take it past, up to the frame
/// size limit).
const DEFERRED_BYTES: usize = 64 << 10;
/// Frames read while under back-pressure and not yet followed by a write round: bounds what
/// replies to control frames (`pong`, `auth_ok`) can add to a queue that is already full.
const READS_UNDER_PRESSURE: u32 = 64;

/// A take of at least this many bytes is written at once (a flooded connection never waits).
const WRITE_AT_ONCE_BYTES: usize = 16 << 10;

/// The connection task's gated branches ([`Gates`]).
const CLOSED: usize = 0;
const SHUTDOWN: usize = 1;
const READ: usize = 2;
const TIMERS: usize = 3;

/// A client frame, read and decoded.
enum Incoming {
    Frame(ClientFrame),
    /// Not JSON text, or not a frame we know: answered with an error (carrying the `ref` of a
    /// `publish` frame that had a valid one, answered in its turn among the publishes).
    Refused(ApiError, Option<PublishRef>),
}

/// Frames read under back-pressure that the connection acts on later, in order.
#[derive(Default)]
struct Deferred {
    frames: VecDeque<(Incoming, usize)>,
    bytes: usize,
}

impl Deferred {
    fn has_room(&self) -> bool {
        self.frames.len() < DEFERRED_FRAMES && self.bytes < DEFERRED_BYTES
    }

    fn push(&mut self, frame: Incoming, len: usize) {
        self.bytes += len;
        self.frames.push_back((frame, len));
    }

    fn pop(&mut self) -> Option<(Incoming, usize)> {
        let (frame, len) = self.frames.pop_front()?;
        self.bytes -= len;
        Some((frame, len))
    }
}

/// Whether a frame read under back-pressure is acted on at once: `auth` always (the token's
/// expiry keeps running); `ping` and `unsubscribe` when nothing read before them waits, so
/// their effect keeps its place in the order (a `pong` never overtakes the `sub_ack` of a
/// subscribe being planned; an `unsubscribe` of the key being subscribed waits for it).
///
/// A `publish` (or a refused one with its `ref`) waits only for the send queue, not for a log
/// read in flight: it needs no job, and its answers are bounded by the pipeline.
fn acts_under_pressure(
    frame: &Incoming,
    subs: &Subscriptions,
    nothing_deferred: bool,
    above_high_water: bool,
) -> bool {
    match frame {
        Incoming::Frame(ClientFrame::Publish(_)) | Incoming::Refused(_, Some(_)) => {
            nothing_deferred && !above_high_water
        }
        Incoming::Frame(ClientFrame::Auth(_)) => true,
        Incoming::Frame(ClientFrame::Ping) => nothing_deferred && !subs.is_starting_any(),
        Incoming::Frame(ClientFrame::Unsubscribe(u)) => {
            nothing_deferred && !subs.is_starting(&u.key())
        }
        _ => false,
    }
}

/// A log read in flight (one per connection at a time, off the async runtime's threads).
type Job = Pin<Box<dyn Future<Output = JobDone> + Send>>;

enum JobDone {
    /// Where a `subscribe` starts was decided (or could not be).
    Started {
        key: SubscriptionKey,
        result: Result<Start, ApiError>,
    },
    /// A catch-up read came back.
    CatchUp(drive::CatchUp),
    /// Where the keys of a `resume` start was decided (or could not be).
    Resumed {
        resume: PlannedResume,
        result: Result<(Vec<catchup::KeyStart>, u64), ApiError>,
    },
}

/// A `resume` whose keys' starts are being planned: the verdicts known already (refusals,
/// repeats) and, for the rest, which entry each planned key answers.
struct PlannedResume {
    /// One slot per entry, in the order asked; `None` until its start is planned.
    results: Vec<Option<ResumeResult>>,
    /// The planned keys, each with its entry's index and `since`.
    planned: Vec<(usize, SubscriptionKey, u64)>,
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
    grant: &mut Grant,
    info: &ConnInfo,
    subs: &mut Subscriptions,
) -> Ended {
    let mut sent = 0u64;
    let ping_interval = app.settings.ping_interval;
    let mut deadlines = Deadlines {
        ping: Box::pin(tokio::time::sleep(ping_interval)),
        answer: None,
        sent_at_ping: 0,
        expiry: expiry_instant(grant.exp).map(|at| Box::pin(tokio::time::sleep_until(at))),
    };
    let mut buf: Vec<Frame> = Vec::new();
    let mut oldest_live: Option<Instant> = None;
    // Frames taken while a write is held (appended to `buf` when the hold ends).
    let mut more: Vec<Frame> = Vec::new();
    // Live messages that arrive less than half of `--write-delay-ms` after the last write wait
    // until that delay after it: a connection writes at most once per delay while its
    // messages come at least twice that often. An idle connection writes at once.
    let delay = app.settings.write_delay;
    let mut pacer = WritePacer::new(delay / 2, delay, WRITE_AT_ONCE_BYTES);
    // Set while taken frames wait for the next write round; made on the first hold.
    let mut hold: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut holding = false;
    // The socket read, the close and shutdown signals and the deadlines are polled only after
    // they woke the task: most wake-ups are live messages. The deadlines change only in turns
    // that were not about live frames, and every such turn opens their gate.
    let gates = Gates::<4>::default();
    let mut job: Option<Job> = None;
    let mut deferred = Deferred::default();
    let mut reads_under_pressure = 0u32;
    let mut pipeline: Pipeline<PublishRef> = Pipeline::new(Arc::clone(app));
    // Made once: a close request or shutdown wakes the connection through these.
    let closed = sub.closed();
    tokio::pin!(closed);
    let shutdown = app.shutdown.cancelled();
    tokio::pin!(shutdown);
    // Whether the last turn was spent on anything but live frames and the hold: the
    // connection may have queued replies, which are not held.
    let mut acted = false;
    loop {
        if acted {
            gates.open(TIMERS);
            if holding && let Some(h) = hold.as_mut() {
                h.as_mut().reset(tokio::time::Instant::now());
            }
        }
        acted = true;
        if !sub.is_closing() {
            history_changed(app, sub, info);
        }
        // Frames kept under back-pressure go first, in order, once the connection can act.
        while job.is_none() && !sub.is_above_high_water() && !sub.is_closing() {
            let Some((frame, len)) = deferred.pop() else {
                break;
            };
            on_frame(
                app,
                frame,
                len,
                sub,
                grant,
                info,
                subs,
                &mut job,
                &mut pipeline,
            );
        }
        if job.is_none() {
            job = advance(app, sub, info, subs);
        }
        let pressured = job.is_some() || sub.is_above_high_water();
        if !pressured {
            reads_under_pressure = 0;
        }
        // Under back-pressure the socket is still read for control frames, up to a bound; with
        // as many publishes in flight as allowed it is not read until answers drain.
        let reading = pipeline.has_room()
            && (!pressured || (reads_under_pressure < READS_UNDER_PRESSURE && deferred.has_room()));
        // Everything read in one go (recv stays ready while frames are buffered) goes to the
        // writer together once the socket has nothing more, or no room is left.
        let to_commit = !pipeline.is_committing() && !pipeline.is_empty();
        tokio::select! {
            biased;
            reason = std::future::poll_fn(|cx| gates.poll(CLOSED, cx, |cx| closed.as_mut().poll(cx))) => {
                close_in_time(app, socket, reason).await;
                return Ended::by_server(sent, reason);
            }
            // Asks for a close; the next turn sends it.
            _ = std::future::poll_fn(|cx| gates.poll(SHUTDOWN, cx, |cx| shutdown.as_mut().poll(cx))), if !sub.is_closing() => {
                sub.close(CloseReason::GoingAway);
            }
            // Before the expiry: an `auth` that arrived while the connection was writing (a slow
            // reader blocks the writes) is read before its old token's deadline is looked at.
            msg = std::future::poll_fn(|cx| gates.poll(READ, cx, |cx| socket.poll_next_unpin(cx))), if reading => {
                // Any frame, a pong included, shows the peer is alive.
                deadlines.answer = None;
                let read = match receive(app, msg, sub, info) {
                    Err(read) => read,
                    Ok((frame, len)) => {
                        if pressured {
                            reads_under_pressure += 1;
                        }
                        if pressured && !acts_under_pressure(&frame, subs, deferred.frames.is_empty(), sub.is_above_high_water()) {
                            deferred.push(frame, len);
                        } else {
                            on_frame(app, frame, len, sub, grant, info, subs, &mut job, &mut pipeline);
                        }
                        Read::Continue
                    }
                };
                match read {
                    Read::Continue => {}
                    Read::PeerClosed(code) => {
                        // The peer closed or the connection broke: answer a close, then stop.
                        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, socket.close()).await;
                        return Ended { sent, server_code: None, client_code: Some(code), reason: None };
                    }
                    Read::Violation(code, text) => {
                        tracing::info!(event = "protocol_violation", client_id = %info.client_id, close_code = code, reason = %text, "closing: the peer broke the WebSocket protocol");
                        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, close_text(socket, code, &text)).await;
                        return Ended { sent, server_code: Some(code), client_code: None, reason: Some(text) };
                    }
                }
                if grant.exp.is_some() {
                    let at = expiry_instant(grant.exp);
                    if let (Some(at), Some(e)) = (at, deadlines.expiry.as_mut()) && e.deadline() != at {
                        e.as_mut().reset(at);
                    }
                }
                // A peer that keeps sending must not keep its expiry from being looked at.
                if deadlines.expiry.as_ref().is_some_and(|e| e.is_elapsed()) && !sub.is_closing() {
                    expire(info, grant, &mut deadlines, sub);
                }
            }
            () = std::future::ready(()), if to_commit => {
                let answered = pipeline.start();
                answer_publishes(app, sub, answered);
            }
            answered = pipeline.finished(), if pipeline.is_committing() => {
                answer_publishes(app, sub, answered);
            }
            passed = std::future::poll_fn(|cx| gates.poll(TIMERS, cx, |cx| deadlines.poll_passed(cx, sub.is_closing()))) => match passed {
                Deadline::Expiry => expire(info, grant, &mut deadlines, sub),
                Deadline::Answer => {
                    if (sent > deadlines.sent_at_ping && pressured) || !pipeline.has_room() {
                        // (With its publishes in flight at the bound the socket is not read on
                        // purpose until the writer answers.)
                        // Under back-pressure its frames may wait unread, but it takes ours: alive.
                        deadlines.sent_at_ping = sent;
                        deadlines.answer = Some(Box::pin(tokio::time::sleep(app.settings.ping_timeout)));
                    } else {
                        tracing::info!(event = "ping_timeout", client_id = %info.client_id, timeout_secs = app.settings.ping_timeout.as_secs(), "no frame from the peer since the last ping: closing");
                        deadlines.answer = None;
                        sub.close(CloseReason::PingTimeout);
                    }
                }
                Deadline::Ping => {
                    deadlines.ping.as_mut().reset(tokio::time::Instant::now() + ping_interval);
                    // Queued behind whatever tungstenite holds; a blocked socket keeps it there.
                    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, socket.send(Message::Ping(bytes::Bytes::new()))).await;
                    if deadlines.answer.is_none() {
                        deadlines.sent_at_ping = sent;
                        deadlines.answer = Some(Box::pin(tokio::time::sleep(app.settings.ping_timeout)));
                    }
                }
            },
            done = poll_job(&mut job) => {
                job = None;
                on_job_done(app, sub, grant, info, subs, done);
            }
            n = sub.wait_ready(&mut buf, &mut oldest_live), if !holding => {
                acted = false;
                for (key, sequence_number) in sub.lagged() {
                    subs.on_lagged(&key, sequence_number);
                }
                if n == 0 {
                    continue;
                }
                let bytes = buf.iter().map(|f| f.len()).sum();
                if let WriteAt::Later(at) = pacer.on_taken(Instant::now(), bytes, oldest_live) {
                    // Not polled meanwhile: what is queued now wakes nobody, it waits for the
                    // round (held frames and the queue stay bounded by the hold's length).
                    let at = tokio::time::Instant::from_std(at);
                    match hold.as_mut() {
                        Some(h) => h.as_mut().reset(at),
                        None => hold = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                    holding = true;
                    continue;
                }
                let round = Round { buf: &mut buf, oldest_live: &mut oldest_live, pacer: &mut pacer };
                if let Some(ended) = write_taken(app, socket, round, &mut sent, closed.as_mut(), &gates).await {
                    return ended;
                }
                // The peer took frames: replies to what it sends under pressure can go out.
                reads_under_pressure = 0;
            }
            () = sleep_opt(&mut hold), if holding => {
                acted = false;
                holding = false;
                // What arrived during the hold goes out with what was held.
                let mut later = None;
                if sub.wait_ready(&mut more, &mut later).now_or_never().is_some() {
                    buf.append(&mut more);
                    oldest_live = oldest_live.or(later);
                }
                for (key, sequence_number) in sub.lagged() {
                    subs.on_lagged(&key, sequence_number);
                }
                let round = Round { buf: &mut buf, oldest_live: &mut oldest_live, pacer: &mut pacer };
                if let Some(ended) = write_taken(app, socket, round, &mut sent, closed.as_mut(), &gates).await {
                    return ended;
                }
                reads_under_pressure = 0;
            }
        }
    }
}

/// One write round: the frames taken from the send queue, when the oldest live one among them
/// was committed, and the pacer that hears of the write.
struct Round<'a> {
    buf: &'a mut Vec<Frame>,
    oldest_live: &'a mut Option<Instant>,
    pacer: &'a mut WritePacer,
}

/// Write a round, unless a close is asked for meanwhile: a write blocked by a client that does
/// not read must not keep the connection from closing. Returns how the connection ended when
/// it did.
///
/// The close signal is looked at only while the write waits for the socket (then its gate
/// is opened: the signal was polled with another waker); a write the socket takes at once, the
/// usual case, costs no look at it.
async fn write_taken(
    app: &AppState,
    socket: &mut WebSocket,
    round: Round<'_>,
    sent: &mut u64,
    mut closed: Pin<&mut impl Future<Output = CloseReason>>,
    gates: &Gates<4>,
) -> Option<Ended> {
    // (Replies among them are counted as live: rare, and only a rate estimate.)
    let frames = round.buf.len();
    let written = {
        let write = write_round(socket, round.buf, sent);
        tokio::pin!(write);
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(r) = write.as_mut().poll(cx) {
                return std::task::Poll::Ready(Ok(r));
            }
            gates.open(CLOSED);
            closed.as_mut().poll(cx).map(Err)
        })
        .await
    };
    match written {
        Ok(Ok(())) => {
            let live = round.oldest_live.take();
            round
                .pacer
                .wrote(Instant::now(), if live.is_some() { frames } else { 0 });
            if let Some(at) = live {
                app.hub.metrics.commit_to_written.observe(at.elapsed());
            }
            None
        }
        Ok(Err(_)) => Some(Ended {
            sent: *sent,
            server_code: None,
            client_code: None,
            reason: None,
        }),
        Err(reason) => {
            close_in_time(app, socket, reason).await;
            Some(Ended::by_server(*sent, reason))
        }
    }
}

/// The token in force reached its `exp` and no `auth` brought a fresh one: close with 4001.
fn expire(info: &ConnInfo, grant: &Grant, deadlines: &mut Deadlines, sub: &Subscriber) {
    tracing::info!(event = "token_expired", client_id = %info.client_id, user = %grant.sub, "token expired and no auth frame brought a fresh one: closing with 4001");
    deadlines.expiry = None;
    sub.close(CloseReason::TokenExpired);
}

/// Perform what [`Subscriptions`] asks ([`drive::advance`]): a log read becomes the job.
fn advance(
    app: &Arc<AppState>,
    sub: &Arc<Subscriber>,
    info: &ConnInfo,
    subs: &mut Subscriptions,
) -> Option<Job> {
    let read = drive::advance(app, sub, info.reader(), subs)?;
    Some(Box::pin(read.map(JobDone::CatchUp)))
}

fn on_job_done(
    app: &Arc<AppState>,
    sub: &Arc<Subscriber>,
    grant: &Grant,
    info: &ConnInfo,
    subs: &mut Subscriptions,
    done: JobDone,
) {
    // A start or a page planned under the old history: its epoch and numbers mean nothing now.
    if history_changed(app, sub, info) {
        match done {
            JobDone::Started { .. } | JobDone::Resumed { .. } => subs.start_failed(),
            JobDone::CatchUp(read) => drive::on_read(app, sub, info.reader(), subs, read),
        }
        return;
    }
    match done {
        JobDone::Started { key, .. } if !grant.allows(&key) => {
            // An `auth` read while the start was planned narrowed the token.
            subs.start_failed();
            reply_error(
                app,
                sub,
                &ApiError::Forbidden(format!("the refreshed token may not read {key}")),
            );
        }
        JobDone::Started { key, result } => match result {
            Ok(start) => {
                let ack = app.hub.sub_ack(
                    &key,
                    start.drained,
                    start.head,
                    start.recovered,
                    start.oldest_sequence,
                    (start.expired, start.overflow),
                );
                let ok = sub.push_one(ack);
                log_subscribe(app, info, &key, &start, ok);
                if !ok {
                    subs.start_failed();
                } else if subs.started(key, start.after) {
                    app.hub.metrics.subscriptions.inc();
                }
            }
            Err(e) => {
                subs.start_failed();
                tracing::warn!(event = "subscribe_failed", client_id = %info.client_id, subscription_key = %key, error = %e, "could not read where the subscription starts");
                reply_error(app, sub, &e);
            }
        },
        JobDone::CatchUp(read) => drive::on_read(app, sub, info.reader(), subs, read),
        JobDone::Resumed { mut resume, result } => {
            // An `auth` read while the starts were planned may have narrowed the token.
            let mut result = result;
            let narrowed: Vec<usize> = resume
                .planned
                .iter()
                .enumerate()
                .filter(|(_, (_, key, _))| !grant.allows(key))
                .map(|(n, _)| n)
                .collect();
            for &n in narrowed.iter().rev() {
                let (i, key, _) = resume.planned.remove(n);
                let e = ApiError::Forbidden(format!("the refreshed token may not read {key}"));
                resume.results[i] = Some(refused(app, sub, Some(key), &e));
                if let Ok((starts, _)) = result.as_mut() {
                    let _ = starts.remove(n);
                }
            }
            finish_resume(app, sub, info, subs, resume, result);
        }
    }
}

/// One read from the client: a frame to act on (with its size), or what the read means for the
/// connection (closed, broken, or nothing to act on).
fn receive(
    app: &AppState,
    msg: Option<Result<Message, axum::Error>>,
    sub: &Subscriber,
    info: &ConnInfo,
) -> Result<(Incoming, usize), Read> {
    let text = match msg {
        Some(Ok(Message::Text(t))) => t,
        Some(Ok(Message::Binary(b))) => {
            return Ok((
                Incoming::Refused(
                    ApiError::BadRequest("binary frames are not supported; send JSON text".into()),
                    None,
                ),
                b.len(),
            ));
        }
        Some(Ok(Message::Close(c))) => return Err(Read::PeerClosed(c.map_or(1005, |c| c.code))),
        Some(Ok(_)) => return Err(Read::Continue),
        Some(Err(e)) if is_too_large(&e) => {
            tracing::info!(event = "frame_too_large", client_id = %info.client_id, limit = app.settings.max_message_bytes, "closing: frame over the size limit");
            sub.close(CloseReason::TooLarge);
            return Err(Read::Continue);
        }
        Some(Err(e)) => {
            return Err(match violation(&e) {
                Some((code, text)) => Read::Violation(code, text),
                None => Read::PeerClosed(1006),
            });
        }
        None => return Err(Read::PeerClosed(1006)),
    };
    let frame = match decode_client_frame(text.as_str()) {
        Ok(f) => Incoming::Frame(f),
        Err(e) => {
            let r = e.publish_ref().cloned();
            Incoming::Refused(ApiError::from(e), r)
        }
    };
    Ok((frame, text.len()))
}

/// Act on one client frame (`len` bytes on the wire).
#[allow(clippy::too_many_arguments)]
fn on_frame(
    app: &Arc<AppState>,
    frame: Incoming,
    len: usize,
    sub: &Arc<Subscriber>,
    grant: &mut Grant,
    info: &ConnInfo,
    subs: &mut Subscriptions,
    job: &mut Option<Job>,
    pipeline: &mut Pipeline<PublishRef>,
) {
    let frame = match frame {
        Incoming::Frame(f) => f,
        Incoming::Refused(e, Some(r)) => return pipeline.push_refused(r, e),
        Incoming::Refused(e, None) => return reply_error(app, sub, &e),
    };
    match frame {
        ClientFrame::Publish(p) => {
            // The checks of `POST /api/publish`, in its order, through the same functions.
            let (r, req) = p.into_request();
            let event = publish::check_may_publish(grant)
                .and_then(|()| publish::admit(app, grant, 1))
                .and_then(|()| publish::new_event(req, grant, &app.message_ids));
            match event {
                Ok(ev) => pipeline.push_event(r, ev, len),
                Err(e) => pipeline.push_refused(r, e),
            }
        }
        ClientFrame::Subscribe(s) => {
            let key = s.key();
            // The token is looked at after the repeat and the limit, as it always was.
            let admissible =
                subs.cursor(&key).is_none() && subs.len() < app.settings.max_subscriptions;
            if admissible && !grant.allows(&key) {
                reply_error(
                    app,
                    sub,
                    &ApiError::Forbidden(format!("token may not read {key}")),
                );
                return;
            }
            match subs.admit(&key) {
                Admit::Again => {
                    // Already subscribed: acknowledged again, nothing replayed.
                    sub.push_one(app.hub.sub_ack(&key, 0, app.hub.head(), None, None, (0, 0)));
                    return;
                }
                Admit::TooMany { limit } => {
                    reply_error(
                        app,
                        sub,
                        &ApiError::BadRequest(format!(
                            "too many subscriptions on this connection (limit {limit}); unsubscribe first"
                        )),
                    );
                    return;
                }
                Admit::Plan => {}
            }
            let app = Arc::clone(app);
            *job = Some(Box::pin(async move {
                let result =
                    catchup::plan_start(&app, &key, s.since, s.epoch.as_deref(), now_ms()).await;
                JobDone::Started { key, result }
            }));
        }
        ClientFrame::Unsubscribe(u) => {
            let key = u.key();
            app.hub.unsubscribe(sub, &key);
            if subs.unsubscribe(&key) {
                app.hub.metrics.subscriptions.dec();
            }
            tracing::debug!(event = "unsubscribed", client_id = %info.client_id, subscription_key = %key, "unsubscribed");
        }
        ClientFrame::Ping => {
            sub.push_one(Utf8Bytes::from_static(r#"{"type":"pong"}"#));
        }
        ClientFrame::Hello(_) => reply_error(
            app,
            sub,
            &ApiError::BadRequest("already connected: hello is only the first frame".into()),
        ),
        ClientFrame::Auth(a) => refresh_token(app, sub, grant, info, subs, &a.token),
        ClientFrame::Resume(r) => start_resume(app, r, sub, grant, info, subs, job),
    }
}

/// `resume`: judge every entry alone (a bad entry, a key the token may not read, a key over the
/// subscription limit are refused in their verdicts; a key already subscribed is acknowledged,
/// nothing replayed), then plan the rest's starts together as the job: `resume_ack` follows
/// once they are planned ([`finish_resume`]), and their catch-up is one merged cursor.
fn start_resume(
    app: &Arc<AppState>,
    resume: Resume,
    sub: &Arc<Subscriber>,
    grant: &Grant,
    info: &ConnInfo,
    subs: &mut Subscriptions,
    job: &mut Option<Job>,
) {
    let mut results: Vec<Option<ResumeResult>> = Vec::with_capacity(resume.subscriptions.len());
    let mut candidates: Vec<(usize, SubscriptionKey, u64)> = Vec::new();
    for (i, entry) in resume.subscriptions.into_iter().enumerate() {
        match entry {
            ResumeEntry::Invalid(bad) => {
                let e = ApiError::from(bad.error);
                results.push(Some(refused(app, sub, bad.key, &e)));
            }
            ResumeEntry::Key(k) => {
                let key = k.key();
                if grant.allows(&key) {
                    candidates.push((i, key, k.since));
                    results.push(None);
                } else {
                    let e = ApiError::Forbidden(format!("token may not read {key}"));
                    results.push(Some(refused(app, sub, Some(key), &e)));
                }
            }
        }
    }
    let keys: Vec<SubscriptionKey> = candidates.iter().map(|(_, k, _)| k.clone()).collect();
    let answers = subs.admit_many(&keys);
    let mut planned = Vec::new();
    for ((i, key, since), answer) in candidates.into_iter().zip(answers) {
        match answer {
            Admit::Plan => planned.push((i, key, since)),
            // Already subscribed (or named twice): its delivery goes on, nothing replayed.
            Admit::Again => {
                results[i] = Some(ResumeResult::Resumed {
                    subscription_key: key,
                    recovered: true,
                    oldest_sequence: None,
                    already_subscribed: true,
                    drained: 0,
                });
            }
            Admit::TooMany { limit } => {
                let e = ApiError::BadRequest(format!(
                    "too many subscriptions on this connection (limit {limit}); unsubscribe first"
                ));
                results[i] = Some(refused(app, sub, Some(key), &e));
            }
        }
    }
    let resume_plan = PlannedResume { results, planned };
    if resume_plan.planned.is_empty() {
        finish_resume(
            app,
            sub,
            info,
            subs,
            resume_plan,
            Ok((Vec::new(), app.hub.head())),
        );
        return;
    }
    let app = Arc::clone(app);
    let epoch = resume.epoch;
    *job = Some(Box::pin(async move {
        let keys: Vec<(SubscriptionKey, u64)> = resume_plan
            .planned
            .iter()
            .map(|(_, k, since)| (k.clone(), *since))
            .collect();
        let result = catchup::plan_resume_many(&app, &keys, epoch.as_deref(), now_ms()).await;
        JobDone::Resumed {
            resume: resume_plan,
            result,
        }
    }));
}

/// A key refused alone in a `resume_ack` (counted like any refusal).
fn refused(
    app: &AppState,
    sub: &Subscriber,
    key: Option<SubscriptionKey>,
    e: &ApiError,
) -> ResumeResult {
    count_error(app, sub, e);
    ResumeResult::Refused {
        subscription_key: key,
        error: ErrorDetail {
            code: e.code(),
            message: e.message().to_owned(),
        },
    }
}

/// The starts of a `resume` were planned (`result`): queue its `resume_ack` and subscribe the
/// keys that start, all in one merged catch-up.
fn finish_resume(
    app: &AppState,
    sub: &Arc<Subscriber>,
    info: &ConnInfo,
    subs: &mut Subscriptions,
    resume: PlannedResume,
    result: Result<(Vec<catchup::KeyStart>, u64), ApiError>,
) {
    let PlannedResume {
        mut results,
        planned,
    } = resume;
    let (starts, head) = match result {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(event = "resume_failed", client_id = %info.client_id, keys = planned.len(), error = %e, "could not read where the resumed keys start");
            let failed = planned.iter().map(|_| Err(e.clone())).collect();
            (failed, app.hub.head())
        }
    };
    let mut started = Vec::new();
    let mut not_recovered = 0usize;
    for ((i, key, _), start) in planned.into_iter().zip(starts) {
        results[i] = Some(match start {
            Ok(start) => {
                let recovered = start.recovered.unwrap_or(true);
                if !recovered {
                    not_recovered += 1;
                }
                started.push((key.clone(), start.after));
                ResumeResult::Resumed {
                    subscription_key: key,
                    recovered,
                    oldest_sequence: start.oldest_sequence,
                    already_subscribed: false,
                    drained: start.drained,
                }
            }
            Err(e) => refused(app, sub, Some(key), &e),
        });
    }
    let results: Vec<ResumeResult> = results.into_iter().flatten().collect();
    let refused_count = results
        .iter()
        .filter(|r| matches!(r, ResumeResult::Refused { .. }))
        .count();
    let ack = ServerFrame::ResumeAck(ResumeAck {
        results,
        head,
        epoch: app.hub.epoch(),
    });
    let resumed = started.len();
    if !sub.push_one(Utf8Bytes::from(encode_server_frame(&ack))) {
        subs.start_failed();
        return;
    }
    let new = subs.started_many(started);
    app.hub.metrics.subscriptions.inc_by(new as i64);
    tracing::info!(
        event = "resume",
        client_id = %info.client_id,
        keys = resumed + refused_count,
        resumed,
        recovered = resumed - not_recovered,
        not_recovered,
        refused = refused_count,
        head,
        "resumed keys in one merged catch-up"
    );
}

/// `auth`: a fresh token for the same user replaces the connection's; keys it no longer allows
/// are unsubscribed (each with a `forbidden` error). A token for another user closes with 4001.
fn refresh_token(
    app: &Arc<AppState>,
    sub: &Arc<Subscriber>,
    grant: &mut Grant,
    info: &ConnInfo,
    subs: &mut Subscriptions,
    token: &str,
) {
    let fresh = match app.auth.verify(token) {
        Ok(g) => g,
        Err(e) => {
            // The token in force still holds until its own `exp`.
            tracing::info!(event = "auth_refresh_rejected", client_id = %info.client_id, error = %e, "auth frame with an invalid token");
            reply_error(app, sub, &e);
            return;
        }
    };
    if fresh.sub != grant.sub {
        tracing::info!(event = "auth_refresh_rejected", client_id = %info.client_id, user = %grant.sub, new_user = %fresh.sub, "auth frame for another user: closing with 4001");
        reply_error(
            app,
            sub,
            &ApiError::Unauthorized("auth token is for another user".into()),
        );
        sub.close(CloseReason::AuthRejected);
        return;
    }
    let narrowed: Vec<SubscriptionKey> =
        subs.keys().filter(|k| !fresh.allows(k)).cloned().collect();
    for key in narrowed {
        app.hub.unsubscribe(sub, &key);
        if subs.unsubscribe(&key) {
            app.hub.metrics.subscriptions.dec();
        }
        reply_error(
            app,
            sub,
            &ApiError::Forbidden(format!(
                "the refreshed token may not read {key}: unsubscribed"
            )),
        );
    }
    *grant = fresh;
    let exp = grant.exp.unwrap_or(0);
    tracing::debug!(event = "auth_refreshed", client_id = %info.client_id, user = %grant.sub, exp, "token refreshed");
    sub.push_one(Utf8Bytes::from(encode_server_frame(&ServerFrame::AuthOk(
        AuthOk { exp },
    ))));
}

/// A read error that is the peer's protocol violation: its close code (1007 for invalid UTF-8,
/// 1002 otherwise) and reason.
fn violation(e: &axum::Error) -> Option<(u16, String)> {
    match ws_error(e)? {
        WsError::Utf8(_) => Some((
            CloseReason::InvalidPayload.code(),
            CloseReason::InvalidPayload.text().to_owned(),
        )),
        // The TCP connection ended without a close frame: a broken connection (1006), not a
        // frame that breaks the protocol.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(p) => {
            let mut text = format!("protocol error: {p}");
            truncate_reason(&mut text);
            Some((CloseReason::ProtocolError.code(), text))
        }
        _ => None,
    }
}

/// The tungstenite error that axum wraps, found by its type in the source chain.
fn ws_error(e: &axum::Error) -> Option<&WsError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(ws) = s.downcast_ref::<WsError>() {
            return Some(ws);
        }
        source = s.source();
    }
    None
}

/// A close reason is at most 123 bytes.
fn truncate_reason(text: &mut String) {
    if text.len() > 123 {
        let mut cut = 123;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
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

fn reply_error(app: &AppState, sub: &Subscriber, e: &ApiError) {
    count_error(app, sub, e);
    sub.push_one(error_frame(e));
}

/// Count (and log) an error the connection answers.
fn count_error(app: &AppState, sub: &Subscriber, e: &ApiError) {
    app.hub.metrics.error(
        e.code(),
        Transport::ws,
        0,
        format!("client {}", sub.client_id),
        e.message(),
    );
}

fn error_frame(e: &ApiError) -> Utf8Bytes {
    error_frame_for(e, None)
}

fn error_frame_for(e: &ApiError, r: Option<PublishRef>) -> Utf8Bytes {
    Utf8Bytes::from(encode_server_frame(&ServerFrame::Error(
        ErrorFrame::new(e.code(), e.message()).with_ref(r),
    )))
}

/// Queue the answers to publishes, in order, together (they go out in one write round).
fn answer_publishes(app: &AppState, sub: &Subscriber, answered: Vec<Outcome<PublishRef>>) {
    if answered.is_empty() {
        return;
    }
    let frames: Vec<Frame> = answered
        .into_iter()
        .map(|outcome| match outcome {
            Outcome::Committed(r, a) => Utf8Bytes::from(encode_publish_ack(&PublishAck {
                r#ref: r,
                sequence_number: a.sequence_number,
                stream_sequence: a.stream_sequence,
                message_id: a.message_id,
            })),
            Outcome::Refused(r, e) => {
                app.hub.metrics.error(
                    e.code(),
                    Transport::ws,
                    0,
                    format!(
                        "client {} publish {}",
                        sub.client_id,
                        seqcast_protocol::ref_for_log(&r)
                    ),
                    e.message(),
                );
                error_frame_for(&e, Some(r))
            }
        })
        .collect();
    sub.push(frames);
}

async fn send_error(sink: &mut WebSocket, e: &ApiError) -> Result<(), axum::Error> {
    sink.send(Message::Text(error_frame(e))).await
}

async fn close_with(sink: &mut WebSocket, reason: CloseReason) {
    close_text(sink, reason.code(), reason.text()).await;
}

async fn close_text(sink: &mut WebSocket, code: u16, text: &str) {
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(text.to_owned()),
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

/// Send the close frame behind whatever is already queued in the socket. A slow reader gets it
/// as long as it keeps reading: the socket is dropped only when the close frame could not be
/// written within the ping timeout (a peer that takes nothing for that long is gone).
async fn close_in_time(app: &AppState, sink: &mut WebSocket, reason: CloseReason) -> u16 {
    let limit = app.settings.ping_timeout.max(CLOSE_WRITE_TIMEOUT);
    if tokio::time::timeout(limit, close_with(sink, reason))
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

/// A frame over `--max-message-bytes`: tungstenite refused it as too long.
fn is_too_large(e: &axum::Error) -> bool {
    matches!(
        ws_error(e),
        Some(WsError::Capacity(CapacityError::MessageTooLong { .. }))
    )
}

fn log_rejected(
    client_id: &str,
    http_request_id: Option<&str>,
    session_id: Option<&SessionId>,
    connection_sequence: Option<u64>,
    close_code: u16,
    started: Instant,
    why: &str,
) {
    tracing::info!(
        event = "connection_closed",
        client_id,
        http_request_id,
        session_id = session_id.map(|s| s.as_str()),
        connection_sequence,
        close_code,
        duration_seconds = started.elapsed().as_secs_f64(),
        messages_sent = 0u64,
        reason = why,
        "connection closed before it was authenticated"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Socket errors are told apart by their type, not their text: a frame over the size limit
    /// closes with 1009, invalid UTF-8 with 1007, another protocol violation with 1002, a reset
    /// connection is no violation — and an error whose message merely reads like a capacity
    /// error is none.
    #[test]
    fn socket_errors_are_told_apart_by_their_type() {
        let too_long = axum::Error::new(WsError::Capacity(CapacityError::MessageTooLong {
            size: 2048,
            max_size: 1024,
        }));
        assert!(is_too_large(&too_long));
        assert_eq!(CloseReason::TooLarge.code(), 1009);
        assert_eq!(violation(&too_long), None);
        let lookalike = axum::Error::new(std::io::Error::other(
            "Space limit exceeded: Message too long: 2048 > 1024",
        ));
        assert!(!is_too_large(&lookalike));
        assert!(!is_too_large(&axum::Error::new(WsError::Capacity(
            CapacityError::TooManyHeaders
        ))));
        let utf8 = axum::Error::new(WsError::Utf8("bad".into()));
        assert_eq!(violation(&utf8).map(|(code, _)| code), Some(1007));
        let bad = axum::Error::new(WsError::Protocol(ProtocolError::NonZeroReservedBits));
        assert_eq!(violation(&bad).map(|(code, _)| code), Some(1002));
        let reset = axum::Error::new(WsError::Protocol(
            ProtocolError::ResetWithoutClosingHandshake,
        ));
        assert_eq!(violation(&reset), None);
    }
}
