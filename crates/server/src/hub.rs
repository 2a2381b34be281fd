//! The fan-out hub: the recovery window, the backlogs and the live subscriptions behind one
//! lock, so that "what a subscriber gets before live messages" and "what a publish delivers"
//! are decided atomically with respect to each other (no gap, duplicate or reorder at the seam).
//!
//! Committed events enter through [`Hub::apply_committed`] in commit order: from the database
//! writer's commit hook, or from [`Hub::publish_in_memory`] under `--storage memory`. Nothing
//! else assigns a sequence number, and every frame is serialized once and shared by reference.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;
use seqcast_backlog::{BacklogLimits, Backlogs, OverflowReason};
use seqcast_persistence::{CommittedEvent, NewEvent};
use seqcast_protocol::{
    MessageRef, ServerFrame, SubAck, SubscriptionKey, encode_message_ref, encode_server_frame,
};
use seqcast_sequencing::{MemorySequencer, RecoveryWindow, RetainedMessage};
use tokio_util::sync::CancellationToken;

use crate::error::CloseReason;
use crate::metrics::Metrics;

/// A serialized server frame, shared by every connection that sends it.
pub type Frame = Utf8Bytes;

/// An item in a connection's bounded send queue.
#[derive(Debug)]
pub enum Outbound {
    /// One frame.
    Frame(Frame),
    /// Frames sent back to back (a backlog drain or a `since` replay) — one queue slot.
    Batch(Vec<Frame>),
}

/// The hub's side of one WebSocket connection: its bounded send queue and its close request.
///
/// The queue is a plain vector behind a mutex that is held only to push one item or to swap the
/// whole vector out: the connection takes everything queued at once, writes it and flushes
/// once, and the two vectors trade places so that a busy connection allocates nothing.
#[derive(Debug)]
pub struct Subscriber {
    /// Server-made id of the connection.
    pub client_id: Arc<str>,
    queue: Mutex<SendQueue>,
    /// Most items the queue holds before the connection is closed as a slow consumer.
    capacity: usize,
    /// Wakes the connection when something was queued.
    ready: AtomicWaker,
    /// Set with the close request, checked on every push without taking a lock.
    closing_flag: AtomicBool,
    close_reason: Mutex<Option<CloseReason>>,
    /// Cancelled once a close was asked for; the connection waits on it.
    closing: CancellationToken,
}

#[derive(Debug, Default)]
struct SendQueue {
    items: Vec<Outbound>,
    /// The connection has stopped: nothing more is queued.
    finished: bool,
    /// Frames ever queued.
    queued: u64,
}

impl Subscriber {
    /// A subscriber whose send queue holds at most `capacity` items (at least 1).
    pub fn new(client_id: Arc<str>, capacity: usize) -> Self {
        Subscriber {
            client_id,
            queue: Mutex::new(SendQueue::default()),
            capacity: capacity.max(1),
            ready: AtomicWaker::new(),
            closing_flag: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            closing: CancellationToken::new(),
        }
    }

    fn lock_queue(&self) -> MutexGuard<'_, SendQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue an item without waiting. A full queue closes the connection with 1013: memory
    /// stays bounded and the client resumes with `since`. Returns false when nothing was
    /// queued (full, closing, or the connection has stopped).
    pub fn push(&self, item: Outbound) -> bool {
        if self.closing_flag.load(Ordering::Acquire) {
            return false;
        }
        let n = match &item {
            Outbound::Frame(_) => 1,
            Outbound::Batch(b) => b.len() as u64,
        };
        {
            let mut q = self.lock_queue();
            if q.finished {
                return false;
            }
            if q.items.len() >= self.capacity {
                drop(q);
                tracing::warn!(
                    event = "slow_consumer",
                    client_id = %self.client_id,
                    "send queue full: closing the connection with 1013"
                );
                self.close(CloseReason::SlowConsumer);
                return false;
            }
            q.items.push(item);
            q.queued += n;
        }
        self.ready.wake();
        true
    }

    /// Wait until something is queued, then move everything queued into `buf` (which the
    /// caller has emptied). Returns how many items were taken. Cancel safe: items are taken
    /// only in the poll that returns them.
    pub async fn take_queued(&self, buf: &mut Vec<Outbound>) -> usize {
        std::future::poll_fn(|cx| {
            if let n @ 1.. = self.take_now(buf) {
                return Poll::Ready(n);
            }
            self.ready.register(cx.waker());
            // Checked again after registering, so a push in between is not missed.
            match self.take_now(buf) {
                0 => Poll::Pending,
                n => Poll::Ready(n),
            }
        })
        .await
    }

    fn take_now(&self, buf: &mut Vec<Outbound>) -> usize {
        let mut q = self.lock_queue();
        if q.items.is_empty() {
            return 0;
        }
        debug_assert!(buf.is_empty(), "take_queued needs an empty buffer");
        std::mem::swap(&mut q.items, buf);
        buf.len()
    }

    /// The connection has stopped: refuse further items and free what is still queued.
    pub fn finish(&self) {
        let mut q = self.lock_queue();
        q.finished = true;
        q.items = Vec::new();
    }

    /// Frames queued to this connection so far.
    pub fn queued(&self) -> u64 {
        self.lock_queue().queued
    }

    /// Ask the connection to close with `reason` (the first reason wins).
    pub fn close(&self, reason: CloseReason) {
        let mut r = self.close_reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
            self.closing_flag.store(true, Ordering::Release);
            self.closing.cancel();
        }
    }

    /// Resolves when [`Subscriber::close`] was called; returns the reason.
    pub async fn closed(&self) -> CloseReason {
        self.closing.cancelled().await;
        self.close_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(CloseReason::GoingAway)
    }

    /// Whether the connection is closing.
    pub fn is_closing(&self) -> bool {
        self.closing_flag.load(Ordering::Acquire)
    }
}

/// What a `subscribe` did, for the connection's logs.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOutcome {
    /// Backlog entries sent.
    pub drained: usize,
    /// Messages replayed from the recovery window for `since`.
    pub replayed: usize,
    /// Backlog entries found past their TTL.
    pub expired: usize,
    /// `recovered` as told in `sub_ack` (None without `since`).
    pub recovered: Option<bool>,
    /// The connection was already subscribed to the key.
    pub already: bool,
    /// The sub_ack and drain could not be queued (the connection is being closed).
    pub failed: bool,
}

/// An answer to a recovery query.
#[derive(Debug)]
pub struct Recovered {
    /// Message frames, in order.
    pub frames: Vec<Frame>,
    /// Latest sequence number.
    pub head: u64,
    /// Oldest retained number.
    pub oldest_sequence: Option<u64>,
    /// Whether the window reached back to `since + 1`.
    pub complete: bool,
    /// Where to continue when `limit` cut the answer.
    pub next_since: Option<u64>,
}

struct HubState {
    window: RecoveryWindow<Frame>,
    backlogs: Backlogs<Frame>,
    subscriptions: HashMap<SubscriptionKey, Vec<Arc<Subscriber>>>,
    /// Present only under `--storage memory`.
    sequencer: Option<MemorySequencer>,
    /// Drops not yet logged, so that a key overflowing on every publish logs one warning per
    /// interval instead of one per message.
    overflow_unlogged: u64,
    /// When the last `backlog_overflow` warning was logged (ms since the Unix epoch).
    overflow_logged_at_ms: u64,
}

/// At most one `backlog_overflow` warning per this many milliseconds (drops are still counted).
const OVERFLOW_LOG_INTERVAL_MS: u64 = 1_000;

/// See the module docs.
pub struct Hub {
    state: Mutex<HubState>,
    epoch: String,
    /// Process counters.
    pub metrics: Metrics,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub for a store with `epoch`, whose window was refilled with `window`.
    /// `sequencer` is Some only when the hub itself is the sequence authority (memory storage).
    pub fn new(
        epoch: String,
        window: RecoveryWindow<Frame>,
        backlog: BacklogLimits,
        sequencer: Option<MemorySequencer>,
    ) -> Self {
        Hub {
            state: Mutex::new(HubState {
                window,
                backlogs: Backlogs::new(backlog),
                subscriptions: HashMap::new(),
                sequencer,
                overflow_unlogged: 0,
                overflow_logged_at_ms: 0,
            }),
            epoch,
            metrics: Metrics::default(),
        }
    }

    /// The store's epoch.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock must not take the whole server down with it:
        // the state is plain data that stays consistent between statements.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Latest sequence number handed to fan-out.
    pub fn head(&self) -> u64 {
        self.lock().window.head()
    }

    /// Build the one serialized frame of a committed event. Its data is valid JSON: validated
    /// once at publish, and the database refuses anything else (`CHECK (json_valid(data))`), so it
    /// is copied verbatim, never re-parsed.
    pub fn frame_of(ev: &CommittedEvent) -> Frame {
        Utf8Bytes::from(encode_message_ref(&MessageRef {
            sequence_number: ev.sequence_number,
            stream_sequence: ev.stream_sequence,
            channel: ev.key.channel(),
            request_id: ev.key.request_id(),
            message_id: &ev.message_id,
            timestamp: ev.timestamp_ms,
            data_json: &ev.data,
        }))
    }

    /// Fan out events that the store committed, in commit order. Called by the database
    /// writer's commit hook (on its thread) and by the memory authority.
    pub fn apply_committed(&self, events: &[CommittedEvent], now_ms: u64) {
        let frames: Vec<Frame> = events.iter().map(Hub::frame_of).collect();
        let mut state = self.lock();
        for (ev, frame) in events.iter().zip(frames) {
            self.apply_one(&mut state, ev, frame, now_ms);
        }
    }

    fn apply_one(&self, state: &mut HubState, ev: &CommittedEvent, frame: Frame, now_ms: u64) {
        Metrics::inc(&self.metrics.published);
        if let Err(e) = state.window.insert(
            RetainedMessage {
                sequence_number: ev.sequence_number,
                key: ev.key.clone(),
                timestamp_ms: ev.timestamp_ms,
                frame: frame.clone(),
            },
            now_ms,
        ) {
            // Only a bug can get here: the authority hands out increasing numbers in commit order.
            tracing::error!(event = "sequence_out_of_order", error = %e, "recovery window refused a message");
        }
        let mut delivered = 0u64;
        let mut live = false;
        if let Some(subs) = state.subscriptions.get_mut(&ev.key) {
            subs.retain(|s| {
                let ok = s.push(Outbound::Frame(frame.clone()));
                if ok {
                    delivered += 1;
                } else if s.is_closing() {
                    Metrics::inc(&self.metrics.slow_consumer_closes);
                }
                ok
            });
            live = !subs.is_empty();
            if subs.is_empty() {
                state.subscriptions.remove(&ev.key);
            }
        }
        Metrics::add(&self.metrics.deliveries, delivered);
        if !live && delivered == 0 {
            self.enqueue_backlog(state, ev, frame, now_ms);
        }
    }

    fn enqueue_backlog(
        &self,
        state: &mut HubState,
        ev: &CommittedEvent,
        frame: Frame,
        now_ms: u64,
    ) {
        let key = &ev.key;
        match state
            .backlogs
            .enqueue(key, ev.sequence_number, frame, now_ms)
        {
            Ok(outcome) => {
                Metrics::inc(&self.metrics.backlogged);
                if outcome.created {
                    tracing::info!(
                        event = "backlog_created",
                        subscription_key = %key,
                        channel = %key.channel(),
                        request_id = %key.request_id(),
                        "backlog created for late subscribers"
                    );
                }
                tracing::debug!(
                    event = "backlog_enqueued",
                    subscription_key = %key,
                    channel = %key.channel(),
                    request_id = %key.request_id(),
                    sequence_number = ev.sequence_number,
                    backlog_size = outcome.backlog_size,
                    "message kept in backlog"
                );
                for o in outcome.overflow {
                    Metrics::add(&self.metrics.backlog_overflow, o.dropped as u64);
                    state.overflow_unlogged += o.dropped as u64;
                    if now_ms.saturating_sub(state.overflow_logged_at_ms) < OVERFLOW_LOG_INTERVAL_MS
                    {
                        continue;
                    }
                    tracing::warn!(
                        event = "backlog_overflow",
                        subscription_key = %o.key,
                        channel = %o.key.channel(),
                        request_id = %o.key.request_id(),
                        count = state.overflow_unlogged,
                        backlog_size = outcome.backlog_size,
                        reason = match o.reason { OverflowReason::PerKey => "per_key", OverflowReason::Total => "total" },
                        "backlog bound reached: oldest messages dropped (count: drops since the last such warning)"
                    );
                    state.overflow_unlogged = 0;
                    state.overflow_logged_at_ms = now_ms;
                }
            }
            Err(e) => {
                tracing::error!(event = "backlog_refused", subscription_key = %key, error = %e, "backlog refused a message");
            }
        }
    }

    /// Assign numbers in memory and fan out (only under `--storage memory`). Returns the
    /// committed events, or None when this hub is not the sequence authority.
    pub fn publish_in_memory(
        &self,
        events: Vec<NewEvent>,
        now_ms: u64,
    ) -> Option<Vec<CommittedEvent>> {
        let mut state = self.lock();
        let mut committed = Vec::with_capacity(events.len());
        for ev in events {
            let seq = state.sequencer.as_mut()?;
            let a = seq.assign(&ev.key, &ev.message_id);
            committed.push(CommittedEvent {
                sequence_number: a.sequence_number,
                stream_sequence: a.stream_sequence,
                key: ev.key,
                message_id: ev.message_id,
                timestamp_ms: now_ms,
                data: ev.data,
                replaced: a.replaced,
            });
        }
        for ev in &committed {
            let frame = Hub::frame_of(ev);
            self.apply_one(&mut state, ev, frame, now_ms);
        }
        Some(committed)
    }

    /// Subscribe `sub` to `key`: queue `sub_ack`, then the key's backlog and (with `since`) every
    /// retained message after `since`, merged in order without duplicates, then register for live
    /// messages — all under the hub lock, so no publish can slip between.
    pub fn subscribe(
        &self,
        sub: &Arc<Subscriber>,
        key: &SubscriptionKey,
        since: Option<u64>,
        epoch: Option<&str>,
        now_ms: u64,
    ) -> SubscribeOutcome {
        let mut state = self.lock();
        let mut outcome = SubscribeOutcome::default();
        if let Some(subs) = state.subscriptions.get(key)
            && subs.iter().any(|s| Arc::ptr_eq(s, sub))
        {
            outcome.already = true;
            let ack = self.sub_ack(key, 0, state.window.head(), None, None);
            outcome.failed = !sub.push(Outbound::Frame(ack));
            return outcome;
        }
        let drained = state.backlogs.drain(key, now_ms);
        outcome.expired = drained.expired;
        let mut oldest = None;
        let frames: Vec<Frame> = match since {
            None => {
                outcome.drained = drained.entries.len();
                drained.entries.into_iter().map(|e| e.frame).collect()
            }
            Some(since) => {
                let epoch_ok = epoch.is_none_or(|e| e == self.epoch);
                state.window.expire(now_ms);
                let backlog_after: Vec<(u64, Frame)> = drained
                    .entries
                    .into_iter()
                    .filter(|e| !epoch_ok || e.sequence_number > since)
                    .map(|e| (e.sequence_number, e.frame))
                    .collect();
                let replay: Vec<(u64, Frame)> = if epoch_ok {
                    let page = state.window.since(since, usize::MAX, |m| &m.key == key);
                    outcome.recovered = Some(page.complete);
                    oldest = page.oldest_sequence;
                    page.messages
                        .iter()
                        .map(|m| (m.sequence_number, m.frame.clone()))
                        .collect()
                } else {
                    outcome.recovered = Some(false);
                    oldest = state.window.oldest_sequence();
                    Vec::new()
                };
                outcome.replayed = replay.len();
                outcome.drained = backlog_after.len();
                merge_by_sequence(replay, backlog_after)
            }
        };
        let recovered = outcome.recovered;
        let ack = self.sub_ack(
            key,
            outcome.drained as u64,
            state.window.head(),
            recovered,
            if recovered == Some(false) {
                oldest
            } else {
                None
            },
        );
        let n = frames.len() as u64;
        let mut ok = sub.push(Outbound::Frame(ack));
        if ok && !frames.is_empty() {
            ok = sub.push(Outbound::Batch(frames));
        }
        if !ok {
            outcome.failed = true;
            return outcome;
        }
        Metrics::add(&self.metrics.deliveries, n);
        state
            .subscriptions
            .entry(key.clone())
            .or_default()
            .push(Arc::clone(sub));
        outcome
    }

    fn sub_ack(
        &self,
        key: &SubscriptionKey,
        drained: u64,
        head: u64,
        recovered: Option<bool>,
        oldest_sequence: Option<u64>,
    ) -> Frame {
        Utf8Bytes::from(encode_server_frame(&ServerFrame::SubAck(SubAck {
            channel: key.channel().clone(),
            request_id: key.request_id().clone(),
            subscription_key: key.clone(),
            drained,
            head,
            recovered,
            oldest_sequence,
            epoch: self.epoch.clone(),
        })))
    }

    /// Stop live delivery of `key` to `sub`. Returns whether it was subscribed.
    pub fn unsubscribe(&self, sub: &Arc<Subscriber>, key: &SubscriptionKey) -> bool {
        let mut state = self.lock();
        let Some(subs) = state.subscriptions.get_mut(key) else {
            return false;
        };
        let before = subs.len();
        subs.retain(|s| !Arc::ptr_eq(s, sub));
        let removed = subs.len() != before;
        if subs.is_empty() {
            state.subscriptions.remove(key);
        }
        removed
    }

    /// Remove a closed connection from every key in `keys`.
    pub fn disconnect<'a>(
        &self,
        sub: &Arc<Subscriber>,
        keys: impl IntoIterator<Item = &'a SubscriptionKey>,
    ) {
        let mut state = self.lock();
        for key in keys {
            if let Some(subs) = state.subscriptions.get_mut(key) {
                subs.retain(|s| !Arc::ptr_eq(s, sub));
                if subs.is_empty() {
                    state.subscriptions.remove(key);
                }
            }
        }
    }

    /// Messages after `since` in the recovery window that pass `filter`, at most `limit`.
    pub fn recover(
        &self,
        since: u64,
        limit: usize,
        now_ms: u64,
        mut filter: impl FnMut(&SubscriptionKey) -> bool,
    ) -> Recovered {
        let mut state = self.lock();
        state.window.expire(now_ms);
        let head = state.window.head();
        let page = state.window.since(since, limit, |m| filter(&m.key));
        Recovered {
            frames: page.messages.iter().map(|m| m.frame.clone()).collect(),
            head,
            oldest_sequence: page.oldest_sequence,
            complete: page.complete,
            next_since: page.next_since,
        }
    }

    /// Drop expired backlog entries and window messages (called periodically).
    pub fn expire(&self, now_ms: u64) {
        let mut state = self.lock();
        state.window.expire(now_ms);
        for e in state.backlogs.expire(now_ms) {
            tracing::debug!(
                event = "backlog_expired",
                subscription_key = %e.key,
                channel = %e.key.channel(),
                request_id = %e.key.request_id(),
                count = e.count,
                "backlog entries expired"
            );
        }
    }

    /// Gauges for `/metrics`.
    pub fn gauges(&self) -> [(&'static str, &'static str, u64); 5] {
        let state = self.lock();
        [
            (
                "seqcast_head",
                "Latest sequence number",
                state.window.head(),
            ),
            (
                "seqcast_recovery_window_messages",
                "Messages in the recovery window",
                state.window.len() as u64,
            ),
            (
                "seqcast_backlog_messages",
                "Messages in all backlogs",
                state.backlogs.len() as u64,
            ),
            (
                "seqcast_backlog_keys",
                "Keys with a backlog",
                state.backlogs.key_count() as u64,
            ),
            (
                "seqcast_subscribed_keys",
                "Keys with a live subscriber",
                state.subscriptions.len() as u64,
            ),
        ]
    }
}

/// Merge two ascending lists of (sequence, frame), dropping duplicates by sequence number.
fn merge_by_sequence(a: Vec<(u64, Frame)>, b: Vec<(u64, Frame)>) -> Vec<Frame> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut ai, mut bi) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let next = match (ai.peek(), bi.peek()) {
            (Some(x), Some(y)) if x.0 == y.0 => {
                bi.next();
                ai.next()
            }
            (Some(x), Some(y)) => {
                if x.0 < y.0 {
                    ai.next()
                } else {
                    bi.next()
                }
            }
            (Some(_), None) => ai.next(),
            (None, Some(_)) => bi.next(),
            (None, None) => break,
        };
        if let Some((_, f)) = next {
            out.push(f);
        }
    }
    out
}
