//! The fan-out hub: a router of cursors over the log's cached tail.
//!
//! Committed events enter through [`Hub::apply_committed`], in commit order and only in order
//! (`sequence_number == head + 1`; anything else is a hole and stops the process). Each event is
//! serialized once into a shared frame that goes into the [`TailCache`] and onto the send queue
//! of every live subscriber of its key. A subscriber whose queue is full is not closed: it
//! leaves live delivery at that message ([`Subscriber::lagged`]) and its connection catches it
//! up from the log. Joining live delivery ([`Hub::join_from_cache`]) takes the cached rest of a
//! key and registers the subscriber under one lock, so no publish can slip between.
//!
//! The hub keeps no delivery state the log does not have: backlogs and resumes are read from
//! the log; the cache is only its recent tail.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;
use seqcast_persistence::{CommittedEvent, EventRef};
use seqcast_protocol::{
    MessageRef, ServerFrame, SubAck, SubscriptionKey, encode_message_ref, encode_server_frame,
};
use seqcast_sequencing::{
    CachedMessage, GapError, KeyPositions, Page, ReadBudget, TailCache, View,
};
use tokio_util::sync::CancellationToken;

use crate::error::CloseReason;
use crate::metrics::Metrics;

/// A serialized server frame, shared by every connection that sends it.
pub type Frame = Utf8Bytes;

/// Most bytes one connection's send queue holds before live delivery to it pauses (it then
/// catches up from the log as its socket drains).
pub const SEND_QUEUE_BYTES: usize = 4 << 20;

/// Most bytes of messages one catch-up step queues, from the log or from the cache, whatever
/// its frame count (the byte side of its [`ReadBudget`]: a larger message is a step of its own).
/// A step is taken only while the send queue is below its low-water mark, so a connection holds
/// about a queue and a page even when messages are large.
pub const PAGE_BYTES: usize = SEND_QUEUE_BYTES / 4;

/// The hub's side of one WebSocket connection: its send queue, the keys that lagged out of live
/// delivery, and its close request.
///
/// The queue is a plain vector behind a mutex that is held only to push or to swap the whole
/// vector out: the connection takes everything queued at once, writes it and flushes once, and
/// the two vectors trade places so that a busy connection allocates nothing.
#[derive(Debug)]
pub struct Subscriber {
    /// Server-made id of the connection.
    pub client_id: Arc<str>,
    queue: Mutex<SendQueue>,
    /// Frames the queue holds before live delivery pauses (the high-water mark).
    capacity: usize,
    /// Wakes the connection when something was queued or a key lagged.
    ready: AtomicWaker,
    /// Keys that left live delivery because the queue was full, with the message that did not
    /// fit.
    lagged: Mutex<Vec<(SubscriptionKey, u64)>>,
    /// Set with the close request, checked on every push without taking a lock.
    closing_flag: AtomicBool,
    close_reason: Mutex<Option<CloseReason>>,
    /// Cancelled once a close was asked for; the connection waits on it.
    closing: CancellationToken,
}

#[derive(Debug, Default)]
struct SendQueue {
    items: Vec<Frame>,
    bytes: usize,
    /// The connection has stopped: nothing more is queued.
    finished: bool,
    /// When the oldest live frame now queued was committed (for the commit → written metric).
    oldest_live: Option<Instant>,
}

/// What a live push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LivePush {
    /// Queued.
    Queued,
    /// The queue is at its high-water mark: the key leaves live delivery.
    Full,
    /// The connection is closing or gone.
    Gone,
}

impl Subscriber {
    /// A subscriber whose live delivery pauses at `capacity` queued frames (at least 1) or
    /// [`SEND_QUEUE_BYTES`].
    pub fn new(client_id: Arc<str>, capacity: usize) -> Self {
        Subscriber {
            client_id,
            queue: Mutex::new(SendQueue::default()),
            capacity: capacity.max(1),
            ready: AtomicWaker::new(),
            lagged: Mutex::new(Vec::new()),
            closing_flag: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            closing: CancellationToken::new(),
        }
    }

    fn lock_queue(&self) -> MutexGuard<'_, SendQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a live message, committed at `committed_at`, unless the queue is at its
    /// high-water mark.
    pub fn push_live(&self, frame: Frame, committed_at: Instant) -> LivePush {
        if self.closing_flag.load(Ordering::Acquire) {
            return LivePush::Gone;
        }
        {
            let mut q = self.lock_queue();
            if q.finished {
                return LivePush::Gone;
            }
            if q.items.len() >= self.capacity || q.bytes >= SEND_QUEUE_BYTES {
                return LivePush::Full;
            }
            q.bytes += frame.len();
            q.items.push(frame);
            q.oldest_live.get_or_insert(committed_at);
        }
        self.ready.wake();
        LivePush::Queued
    }

    /// Queue frames the connection itself decided to send (replies, catch-up pages). Never
    /// refused for being full — the connection paces these by the water marks — only when the
    /// connection is closing. Returns whether they were queued.
    pub fn push(&self, frames: impl IntoIterator<Item = Frame>) -> bool {
        if self.closing_flag.load(Ordering::Acquire) {
            return false;
        }
        {
            let mut q = self.lock_queue();
            if q.finished {
                return false;
            }
            for f in frames {
                q.bytes += f.len();
                q.items.push(f);
            }
        }
        self.ready.wake();
        true
    }

    /// Queue one frame (see [`Subscriber::push`]).
    pub fn push_one(&self, frame: Frame) -> bool {
        self.push(std::iter::once(frame))
    }

    /// At or above the high-water mark: stop reading the client's frames and stop catching up.
    pub fn is_above_high_water(&self) -> bool {
        let q = self.lock_queue();
        q.items.len() >= self.capacity || q.bytes >= SEND_QUEUE_BYTES
    }

    /// At or below the low-water mark (half the high one): catching up may queue another page.
    pub fn is_below_low_water(&self) -> bool {
        let q = self.lock_queue();
        q.items.len() <= self.capacity / 2 && q.bytes <= SEND_QUEUE_BYTES / 2
    }

    /// Record that `key` left live delivery at message `sequence_number` (it did not fit).
    fn lag(&self, key: &SubscriptionKey, sequence_number: u64) {
        self.lagged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((key.clone(), sequence_number));
        self.ready.wake();
    }

    /// Keys that left live delivery since the last call, with the message that did not fit.
    pub fn lagged(&self) -> Vec<(SubscriptionKey, u64)> {
        std::mem::take(&mut *self.lagged.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Wait until something is queued or a key lagged, then move everything queued into `buf`
    /// (which the caller has emptied), and into `oldest_live` when the oldest live frame taken
    /// was committed. Returns how many frames were taken (0 when only a lag woke it). Cancel
    /// safe: frames are taken only in the poll that returns them.
    pub async fn wait_ready(
        &self,
        buf: &mut Vec<Frame>,
        oldest_live: &mut Option<Instant>,
    ) -> usize {
        std::future::poll_fn(|cx| {
            if let Some(n) = self.take_now(buf, oldest_live) {
                return Poll::Ready(n);
            }
            self.ready.register(cx.waker());
            // Checked again after registering, so a push in between is not missed.
            match self.take_now(buf, oldest_live) {
                Some(n) => Poll::Ready(n),
                None => Poll::Pending,
            }
        })
        .await
    }

    fn take_now(&self, buf: &mut Vec<Frame>, oldest_live: &mut Option<Instant>) -> Option<usize> {
        let mut q = self.lock_queue();
        if q.items.is_empty() {
            drop(q);
            let lagged = !self
                .lagged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
            return lagged.then_some(0);
        }
        debug_assert!(buf.is_empty(), "wait_ready needs an empty buffer");
        std::mem::swap(&mut q.items, buf);
        q.bytes = 0;
        *oldest_live = q.oldest_live.take();
        Some(buf.len())
    }

    /// The connection has stopped: refuse further items and free what is still queued.
    pub fn finish(&self) {
        let mut q = self.lock_queue();
        q.finished = true;
        q.items = Vec::new();
        q.bytes = 0;
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

/// What [`Hub::join_from_cache`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// The cached rest (`sent` frames) was queued and the subscriber is live after `head`.
    Joined {
        /// The seam.
        head: u64,
        /// Frames queued.
        sent: usize,
    },
    /// More than a page was cached: a page up to `through` was queued; still catching up.
    Page {
        /// The last number queued.
        through: u64,
        /// Frames queued.
        sent: usize,
    },
    /// The cache no longer holds everything after the position (it was evicted meanwhile):
    /// read the log.
    NotCached,
    /// The connection is closing, or its cursor belongs to an older history.
    Gone,
}

/// Under the hub lock: register `sub` for live delivery of `key` (a join's last step).
fn register_live(state: &mut HubState, sub: &Arc<Subscriber>, key: &SubscriptionKey) {
    // A lag of this key still waiting to be read belongs to an earlier subscription of it
    // (lags are recorded under this lock, and only for live subscribers): drop it.
    sub.lagged
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(k, _)| k != key);
    let subs = state.live.entry(key.clone()).or_default();
    if !subs.iter().any(|s| Arc::ptr_eq(s, sub)) {
        subs.push(Arc::clone(sub));
    }
}

/// A failure that must stop the process: serving on would hide a hole.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A committed event arrived out of order.
    #[error("committed events out of order: {0}")]
    Gap(#[from] GapError),
}

struct HubState {
    cache: TailCache<Frame>,
    live: HashMap<SubscriptionKey, Vec<Arc<Subscriber>>, foldhash::fast::RandomState>,
    retention_floor: u64,
}

impl HubState {
    fn view(&self) -> View {
        self.cache.view(self.retention_floor)
    }
}

/// See the module docs.
pub struct Hub {
    state: Mutex<HubState>,
    /// Changes only when the store becomes another history ([`Hub::move_to_history`]).
    epoch: std::sync::RwLock<String>,
    /// How many times this node moved to another history; a connection that started under an
    /// older one ends (1012) instead of acting on anything it planned there.
    history: AtomicU64,
    /// The newest number applied: readable without the hub lock, and waited on by whoever
    /// needs a number applied ([`Hub::applied`]) — nobody polls. The one head: it moves only
    /// under the hub lock, together with the cache's.
    head: tokio::sync::watch::Sender<u64>,
    /// Process counters.
    pub metrics: Metrics,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("epoch", &self.epoch())
            .field("head", &self.head())
            .finish_non_exhaustive()
    }
}

/// What a frame weighs against a page's [`ReadBudget`].
pub fn frame_bytes(frame: &Frame) -> usize {
    frame.len()
}

/// Bytes charged for one cached frame.
fn cost(ev: &CommittedEvent, frame: &Frame) -> usize {
    frame.len() + ev.key.channel().as_str().len() + ev.key.request_id().as_str().len()
}

impl Hub {
    /// A hub for a store with `epoch` whose log ends at `head`, with a tail cache of
    /// `cache_bytes` refilled from `recent` (the log's newest events, ascending, ending at
    /// `head`) and the log's `retention_floor`. Each event is dropped once its frame is cached,
    /// so the refill holds little more than the cache at any moment.
    pub fn new(
        epoch: String,
        head: u64,
        retention_floor: u64,
        cache_bytes: usize,
        recent: Vec<CommittedEvent>,
    ) -> Result<Self, HubError> {
        let start = recent
            .first()
            .map_or(head, |e| e.sequence_number.saturating_sub(1));
        let mut cache = TailCache::new(cache_bytes, start);
        for ev in recent {
            let frame = Hub::frame_of(&ev);
            cache.push(CachedMessage {
                sequence_number: ev.sequence_number,
                key: ev.key.clone(),
                timestamp_ms: ev.timestamp_ms,
                bytes: cost(&ev, &frame),
                frame,
            })?;
        }
        if cache.head() != head {
            return Err(HubError::Gap(GapError::NotNext {
                head: cache.head(),
                got: head,
            }));
        }
        Ok(Hub {
            state: Mutex::new(HubState {
                cache,
                live: HashMap::default(),
                retention_floor,
            }),
            epoch: std::sync::RwLock::new(epoch),
            history: AtomicU64::new(0),
            head: tokio::sync::watch::Sender::new(head),
            metrics: Metrics::default(),
        })
    }

    /// Which history this node serves: a number that changes with every
    /// [`Hub::move_to_history`]. Read it before [`Hub::epoch`]: a connection that told its client
    /// an epoch acts only while this is unchanged.
    pub fn history(&self) -> u64 {
        self.history.load(Ordering::Acquire)
    }

    /// The store's epoch (of the history this node serves now).
    pub fn epoch(&self) -> String {
        self.epoch.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The store is another history now (a PostgreSQL failover to another timeline, or a
    /// restore): this node serves `epoch`, whose log ends at `head` and starts at `floor`.
    /// The cache starts again empty at `head`, and every connection in live delivery is closed
    /// (1012, "service restart"): its client reconnects, resumes with its old epoch and is
    /// told `recovered: false` (HTTP recovery with the old epoch says `complete: false`).
    /// Connections not in live delivery (catching up, subscribing) see [`Hub::history`] change
    /// and end the same way before they send anything planned under the old history.
    pub fn move_to_history(&self, epoch: String, head: u64, floor: u64) {
        let mut state = self.lock();
        *self.epoch.write().unwrap_or_else(|p| p.into_inner()) = epoch.clone();
        self.history.fetch_add(1, Ordering::AcqRel);
        let budget = state.cache.budget_bytes();
        state.cache = TailCache::new(budget, head);
        state.retention_floor = floor;
        self.head.send_replace(head);
        let live = std::mem::take(&mut state.live);
        drop(state);
        let mut closed = 0u64;
        for subs in live.into_values() {
            for s in subs {
                if !s.is_closing() {
                    closed += 1;
                }
                s.close(CloseReason::Peer(
                    1012,
                    "the store is another history now (failover or restore): resume with since",
                ));
            }
        }
        tracing::warn!(
            event = "history_changed",
            epoch = %epoch,
            head,
            retention_floor = floor,
            connections_closed = closed,
            "the store is another history now: serving the new epoch; live connections closed so their clients resume"
        );
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock must not take the whole server down with it:
        // the state is plain data that stays consistent between statements.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The newest number applied to live delivery.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Whether a client's `epoch` names this node's history (an absent one does): the one
    /// epoch check, for WebSocket resumes and HTTP recovery alike.
    pub fn epoch_matches(&self, epoch: Option<&str>) -> bool {
        epoch.is_none_or(|e| *self.epoch.read().unwrap_or_else(|p| p.into_inner()) == e)
    }

    /// Wait until this node applied `sequence_number`, at most `wait`; returns the head then.
    /// Woken by the apply itself (a `watch` channel), never by polling.
    pub async fn applied(&self, sequence_number: u64, wait: std::time::Duration) -> u64 {
        let mut rx = self.head.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|&h| h >= sequence_number)).await;
        self.head()
    }

    /// The head as a watch: it changes with every applied group and every move to another
    /// history. What an HTTP stream waits on for "the head passed my position".
    pub fn watch_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// What a cursor needs to pick its next step.
    pub fn view(&self) -> View {
        self.lock().view()
    }

    /// The log's retention floor as the hub knows it.
    pub fn retention_floor(&self) -> u64 {
        self.lock().retention_floor
    }

    /// The retention floor rose (the log is about to drop what is below it): evict it from the
    /// cache too, so that nobody is served from memory what the log no longer holds.
    pub fn raise_retention_floor(&self, floor: u64) {
        let mut state = self.lock();
        if floor > state.retention_floor {
            state.retention_floor = floor;
            state.cache.evict_below(floor);
        }
    }

    /// The log was pruned past what this hub applied (this node was paused or slow while
    /// another node's retention raised the shared floor): the numbers after the head and
    /// before `next` are gone. The retention floor rises to `next`, the cache starts again
    /// empty at `next - 1`, and every live subscriber leaves live delivery where it was (any
    /// of them may have needed the pruned part; which keys it held is no longer known): its
    /// cursor finds itself behind the floor and the connection closes it with 1013, so
    /// resuming says `recovered: false` (CONTRACT §5). Nothing happens when `next` follows
    /// the head.
    pub fn skip_to(&self, next: u64) {
        let mut state = self.lock();
        let head = state.cache.head();
        if next <= head + 1 {
            return;
        }
        state.retention_floor = state.retention_floor.max(next);
        let budget = state.cache.budget_bytes();
        state.cache = TailCache::new(budget, next - 1);
        self.head.send_replace(next - 1);
        let live = std::mem::take(&mut state.live);
        drop(state);
        let mut told = 0u64;
        for (key, subs) in live {
            for s in subs {
                Metrics::inc(&self.metrics.lagged);
                s.lag(&key, head + 1);
                told += 1;
            }
        }
        tracing::warn!(
            event = "hub_skipped_pruned",
            head,
            next,
            live_subscriptions_told = told,
            "live delivery skipped numbers pruned before this node applied them"
        );
    }

    /// Build the one serialized frame of a committed event. Its data is valid JSON: validated
    /// once at publish, and the database refuses anything else (`CHECK (json_valid(data))`), so it
    /// is copied verbatim, never re-parsed.
    pub fn frame_of(ev: &CommittedEvent) -> Frame {
        Hub::frame_of_row(&ev.key, &ev.into())
    }

    /// The frame of an event of `key` as a reader holds it (see
    /// [`seqcast_persistence::EventReader::visit_key_page`]).
    pub fn frame_of_row(key: &SubscriptionKey, ev: &EventRef<'_>) -> Frame {
        Utf8Bytes::from(encode_message_ref(&MessageRef {
            sequence_number: ev.sequence_number,
            stream_sequence: ev.stream_sequence,
            channel: key.channel(),
            request_id: key.request_id(),
            message_id: ev.message_id,
            timestamp: ev.timestamp_ms,
            data_json: ev.data,
        }))
    }

    /// Fan out events that the store committed, in commit order. Called by the store's commit
    /// hook. An event that is not `head + 1` is an error: the caller must stop the process.
    pub fn apply_committed(&self, events: &[CommittedEvent]) -> Result<(), HubError> {
        let committed_at = Instant::now();
        let frames: Vec<Frame> = events.iter().map(Hub::frame_of).collect();
        let mut created = Vec::new();
        let mut state = self.lock();
        for (ev, frame) in events.iter().zip(frames) {
            let pushed = state.cache.push(CachedMessage {
                sequence_number: ev.sequence_number,
                key: ev.key.clone(),
                timestamp_ms: ev.timestamp_ms,
                bytes: cost(ev, &frame),
                frame: frame.clone(),
            });
            if let Err(gap) = pushed {
                // What was applied before the hole stays applied.
                let head = state.cache.head();
                self.head.send_replace(head);
                return Err(gap.into());
            }
            Metrics::inc(&self.metrics.published);
            if !self.deliver_live(&mut state, ev, frame, committed_at)
                && ev.stream_sequence == 1
                && !ev.replaced
            {
                created.push(&ev.key);
            }
        }
        // Once per group, still under the lock: a reader of the head never sees a number the
        // cache does not hold yet (a lower head only means more of it arrives live).
        if let Some(last) = events.last() {
            self.head.send_replace(last.sequence_number);
        }
        drop(state);
        // Seed 003's story at the default level, one line per new key (like an access-log
        // line), written outside the hub lock.
        for key in created {
            tracing::info!(
                event = "backlog_created",
                subscription_key = %key,
                channel = %key.channel(),
                request_id = %key.request_id(),
                "backlog created for late subscribers: the key's first message, nobody follows it on this node"
            );
        }
        self.metrics
            .commit_to_queued
            .observe(committed_at.elapsed());
        Ok(())
    }

    /// Queue `ev` to the key's live subscribers; returns whether anyone took it.
    fn deliver_live(
        &self,
        state: &mut HubState,
        ev: &CommittedEvent,
        frame: Frame,
        committed_at: Instant,
    ) -> bool {
        let mut delivered = 0u64;
        if let Some(subs) = state.live.get_mut(&ev.key) {
            subs.retain(|s| match s.push_live(frame.clone(), committed_at) {
                LivePush::Queued => {
                    delivered += 1;
                    true
                }
                LivePush::Full => {
                    Metrics::inc(&self.metrics.lagged);
                    s.lag(&ev.key, ev.sequence_number);
                    false
                }
                LivePush::Gone => false,
            });
            if subs.is_empty() {
                state.live.remove(&ev.key);
            }
        }
        Metrics::add(&self.metrics.deliveries, delivered);
        if delivered == 0 {
            // Nobody here follows the key: the message waits in the log for late subscribers.
            Metrics::inc(&self.metrics.backlogged);
            let key = &ev.key;
            tracing::debug!(
                event = "backlog_enqueued",
                subscription_key = %key,
                channel = %key.channel(),
                request_id = %key.request_id(),
                sequence_number = ev.sequence_number,
                "message kept in the log for late subscribers"
            );
        }
        delivered > 0
    }

    /// Under the hub lock: if the cache holds everything of `key` after `after`, queue it to
    /// `sub` and register `sub` for live delivery of `key` — unless it is more than one page
    /// under `budget`, then queue a page and stay out of live delivery.
    pub fn join_from_cache(
        &self,
        sub: &Arc<Subscriber>,
        key: &SubscriptionKey,
        after: u64,
        budget: ReadBudget,
        history: u64,
    ) -> Join {
        self.join_under_lock(sub, after, history, std::iter::once(key), |cache| {
            cache.key_page(key, after, budget, |m| frame_bytes(&m.frame))
        })
    }

    /// [`Hub::join_from_cache`] for keys resumed together, under one hub lock: if the cache
    /// holds everything of every key after its own position, queue their cached rest merged in
    /// global order and register `sub` for live delivery of all of them in the same step —
    /// unless it is more than one page under `budget`, then queue a page and stay out.
    pub fn join_merged_from_cache(
        &self,
        sub: &Arc<Subscriber>,
        keys: &KeyPositions,
        budget: ReadBudget,
        history: u64,
    ) -> Join {
        let registered = keys.iter().map(|(k, _)| k);
        self.join_under_lock(sub, keys.min_after(), history, registered, |cache| {
            cache.merged_page(keys, budget, |m| frame_bytes(&m.frame))
        })
    }

    /// A join's one step under the hub lock: unless the history moved or the cache no longer
    /// covers `after`, queue the page `take` gives and, when it reached the head, register `sub`
    /// for live delivery of `keys`.
    fn join_under_lock<'k>(
        &self,
        sub: &Arc<Subscriber>,
        after: u64,
        history: u64,
        keys: impl Iterator<Item = &'k SubscriptionKey>,
        take: impl FnOnce(&TailCache<Frame>) -> Page<&CachedMessage<Frame>>,
    ) -> Join {
        let mut state = self.lock();
        // Under the lock that `move_to_history` holds: a cursor of an older history never joins
        // (or takes the cached rest of) this one.
        if self.history.load(Ordering::Acquire) != history {
            return Join::Gone;
        }
        // The view was taken before the lock: the cache may have lost the position since.
        if !state.view().cache_covers(after) {
            return Join::NotCached;
        }
        let head = state.cache.head();
        let page = take(&state.cache);
        let sent = page.items.len();
        if !sub.push(page.items.iter().map(|m| m.frame.clone())) {
            return Join::Gone;
        }
        Metrics::add(&self.metrics.deliveries, sent as u64);
        if page.covered_through < head {
            return Join::Page {
                through: page.covered_through,
                sent,
            };
        }
        for key in keys {
            register_live(&mut state, sub, key);
        }
        Join::Joined { head, sent }
    }

    /// The `sub_ack` frame. `skipped` is the key's older messages left out of a fresh
    /// subscription's backlog: (older than the TTL, beyond the per-key bound).
    pub fn sub_ack(
        &self,
        key: &SubscriptionKey,
        drained: u64,
        head: u64,
        recovered: Option<bool>,
        oldest_sequence: Option<u64>,
        skipped: (u64, u64),
    ) -> Frame {
        Utf8Bytes::from(encode_server_frame(&ServerFrame::SubAck(SubAck {
            channel: key.channel().clone(),
            request_id: key.request_id().clone(),
            subscription_key: key.clone(),
            drained,
            head,
            recovered,
            oldest_sequence,
            expired: skipped.0,
            overflow: skipped.1,
            epoch: self.epoch(),
        })))
    }

    /// Stop live delivery of `key` to `sub`. Returns whether it was live.
    pub fn unsubscribe(&self, sub: &Arc<Subscriber>, key: &SubscriptionKey) -> bool {
        let mut state = self.lock();
        let Some(subs) = state.live.get_mut(key) else {
            return false;
        };
        let before = subs.len();
        subs.retain(|s| !Arc::ptr_eq(s, sub));
        let removed = subs.len() != before;
        if subs.is_empty() {
            state.live.remove(key);
        }
        removed
    }

    /// Remove a closed connection from live delivery of every key in `keys`.
    pub fn disconnect<'a>(
        &self,
        sub: &Arc<Subscriber>,
        keys: impl IntoIterator<Item = &'a SubscriptionKey>,
    ) {
        let mut state = self.lock();
        for key in keys {
            if let Some(subs) = state.live.get_mut(key) {
                subs.retain(|s| !Arc::ptr_eq(s, sub));
                if subs.is_empty() {
                    state.live.remove(key);
                }
            }
        }
    }

    /// Run `f` on the cache under the hub lock (for decisions that memory alone can answer).
    pub fn with_cache<T>(&self, f: impl FnOnce(&TailCache<Frame>, u64) -> T) -> T {
        let state = self.lock();
        f(&state.cache, state.retention_floor)
    }

    /// Under the hub lock: `take` gets the cached messages after `after`, ascending — or `None`
    /// when the cache no longer holds everything after `after` (read the log). What HTTP
    /// recovery takes from memory ([`seqcast_sequencing::Replay::on_cached`]).
    pub fn read_cached<T>(
        &self,
        after: u64,
        take: impl FnOnce(&mut dyn Iterator<Item = &CachedMessage<Frame>>) -> T,
    ) -> Option<T> {
        let state = self.lock();
        state
            .view()
            .cache_covers(after)
            .then(|| take(&mut state.cache.after(after)))
    }

    /// The `n` keys with the most live subscribers on this node: (key, subscribers, the
    /// deepest send queue among them in frames — how far its slowest live subscriber is behind).
    pub fn busiest_keys(&self, n: usize) -> Vec<(SubscriptionKey, usize, usize)> {
        let state = self.lock();
        let mut counts: Vec<(&SubscriptionKey, &Vec<Arc<Subscriber>>)> =
            state.live.iter().collect();
        counts.sort_unstable_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(b.0)));
        counts
            .into_iter()
            .take(n)
            .map(|(key, subs)| {
                let deepest = subs
                    .iter()
                    .map(|s| s.lock_queue().items.len())
                    .max()
                    .unwrap_or(0);
                (key.clone(), subs.len(), deepest)
            })
            .collect()
    }

    /// Live subscriptions on this node (a key followed by two connections counts twice).
    pub fn live_subscriptions(&self) -> usize {
        self.lock().live.values().map(Vec::len).sum()
    }

    /// Gauges for `/metrics`.
    pub fn gauges(&self) -> [(&'static str, &'static str, u64); 6] {
        let state = self.lock();
        [
            ("seqcast_head", "Latest sequence number", state.cache.head()),
            (
                "seqcast_recovery_window_messages",
                "Messages of the log's recent tail held in memory",
                state.cache.len() as u64,
            ),
            (
                "seqcast_cache_bytes",
                "Bytes of the log's recent tail held in memory",
                state.cache.bytes() as u64,
            ),
            (
                "seqcast_cache_floor",
                "Oldest sequence number held in memory",
                state.cache.floor(),
            ),
            (
                "seqcast_retention_floor",
                "Oldest sequence number the log holds",
                state.retention_floor,
            ),
            (
                "seqcast_subscribed_keys",
                "Keys with a live subscriber on this node",
                state.live.len() as u64,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use seqcast_protocol::MessageId;

    fn event(seq: u64, key: &str) -> CommittedEvent {
        CommittedEvent {
            sequence_number: seq,
            stream_sequence: seq,
            key: SubscriptionKey::parse(key).unwrap(),
            message_id: MessageId::new(format!("m{seq}")).unwrap(),
            timestamp_ms: 1_000 + seq,
            data: seq.to_string(),
            replaced: false,
        }
    }

    /// A catch-up page of `n` frames and [`PAGE_BYTES`].
    fn pages(n: usize) -> ReadBudget {
        ReadBudget {
            max_events: n,
            max_bytes: PAGE_BYTES,
        }
    }

    fn sequence_numbers(frames: &[Frame]) -> Vec<u64> {
        frames
            .iter()
            .map(|f| {
                let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
                v["sequence_number"].as_u64().unwrap()
            })
            .collect()
    }

    #[test]
    fn a_hole_or_a_repeat_is_refused_and_changes_nothing() {
        let hub = Hub::new("e".into(), 0, 1, 1 << 20, Vec::new()).unwrap();
        hub.apply_committed(&[event(1, "c:a")]).unwrap();
        assert!(
            hub.apply_committed(&[event(3, "c:a")]).is_err(),
            "3 after 1"
        );
        assert!(hub.apply_committed(&[event(1, "c:a")]).is_err(), "1 again");
        assert_eq!(hub.head(), 1);
        // A refill that does not end at the log's head is refused too.
        assert!(
            Hub::new(
                "e".into(),
                5,
                1,
                1 << 20,
                vec![event(3, "c:a"), event(4, "c:a")]
            )
            .is_err()
        );
    }

    /// A resume that names a number not applied here yet is woken by the apply itself (the
    /// head is a `watch`): with tokio's clock paused, a poll loop would have to advance time;
    /// this wait ends at the apply without any time passing, and a wait for a number never
    /// applied ends at its bound with the head as it is. A group moves the head once, to its last
    /// number; a refused hole leaves it at the last number applied.
    #[tokio::test(start_paused = true)]
    async fn a_wait_for_an_applied_number_is_woken_by_the_apply() {
        let hub = Arc::new(Hub::new("e".into(), 0, 1, 1 << 20, Vec::new()).unwrap());
        let waiter = {
            let hub = Arc::clone(&hub);
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                let head = hub.applied(2, std::time::Duration::from_secs(5)).await;
                (head, start.elapsed())
            })
        };
        tokio::task::yield_now().await;
        hub.apply_committed(&[event(1, "c:a"), event(2, "c:a")])
            .unwrap();
        let (head, waited) = waiter.await.unwrap();
        assert_eq!(head, 2);
        assert_eq!(waited, std::time::Duration::ZERO, "woken, not polled");
        let start = tokio::time::Instant::now();
        assert_eq!(hub.applied(9, std::time::Duration::from_secs(5)).await, 2);
        assert_eq!(start.elapsed(), std::time::Duration::from_secs(5));
        assert!(
            hub.apply_committed(&[event(3, "c:a"), event(5, "c:a")])
                .is_err()
        );
        assert_eq!(
            hub.head(),
            3,
            "what was applied before the hole stays applied"
        );
        assert!(hub.epoch_matches(None) && hub.epoch_matches(Some("e")));
        assert!(!hub.epoch_matches(Some("other")));
    }

    /// After a move to another history, a cursor of the old one never joins the new one — even
    /// where the new cache covers its position (a new history that ends below the old one's
    /// numbers) — and the history number a connection compares against has changed.
    #[test]
    fn a_cursor_of_an_older_history_never_joins_the_new_one() {
        let hub = Hub::new("old".into(), 0, 1, 1 << 20, Vec::new()).unwrap();
        let key = SubscriptionKey::parse("c:a").unwrap();
        for seq in 1..=5 {
            hub.apply_committed(&[event(seq, "c:a")]).unwrap();
        }
        let before = hub.history();
        // The new history's log ends at 3: a cursor of the old one at 4 is "covered" by its cache.
        hub.move_to_history("new".into(), 3, 1);
        assert_ne!(hub.history(), before);
        assert_eq!(hub.epoch(), "new");
        let sub = Arc::new(Subscriber::new(Arc::from("x"), 1024));
        assert_eq!(
            hub.join_from_cache(&sub, &key, 4, pages(16), before),
            Join::Gone
        );
        // A connection that started under the new history joins as usual.
        assert_eq!(
            hub.join_from_cache(&sub, &key, 3, pages(16), hub.history()),
            Join::Joined { head: 3, sent: 0 }
        );
    }

    /// A page from the cache stops before its frames pass PAGE_BYTES, whatever the page's frame
    /// count, so a connection never queues the whole cached rest of a key of large messages at
    /// once.
    #[test]
    fn a_page_from_the_cache_stops_at_its_bytes() {
        let hub = Hub::new("e".into(), 0, 1, 16 << 20, Vec::new()).unwrap();
        let key = SubscriptionKey::parse("c:a").unwrap();
        let big = format!("\"{}\"", "x".repeat(PAGE_BYTES / 2 - 200));
        for seq in 1..=6 {
            let mut ev = event(seq, "c:a");
            ev.data = big.clone();
            hub.apply_committed(&[ev]).unwrap();
        }
        // Two frames are just under PAGE_BYTES; the third would pass it and starts the next page.
        let sub = Arc::new(Subscriber::new(Arc::from("x"), 1024));
        for through in [2, 4] {
            assert_eq!(
                hub.join_from_cache(&sub, &key, through - 2, pages(512), 0),
                Join::Page { through, sent: 2 }
            );
        }
        // The rest is a page of its own too, and the last: joined.
        assert_eq!(
            hub.join_from_cache(&sub, &key, 4, pages(512), 0),
            Join::Joined { head: 6, sent: 2 }
        );
        let mut buf = Vec::new();
        sub.take_now(&mut buf, &mut None);
        assert_eq!(sequence_numbers(&buf), [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_full_queue_lags_the_key_and_joining_resumes_at_the_seam() {
        let hub = Hub::new("e".into(), 0, 1, 1 << 20, Vec::new()).unwrap();
        let key = SubscriptionKey::parse("c:a").unwrap();
        let sub = Arc::new(Subscriber::new(Arc::from("x"), 2));
        assert_eq!(
            hub.join_from_cache(&sub, &key, 0, pages(10), 0),
            Join::Joined { head: 0, sent: 0 }
        );
        for seq in 1..=5 {
            hub.apply_committed(&[event(seq, "c:a")]).unwrap();
        }
        // Two fit; the third did not: the key left live delivery at 3.
        assert_eq!(sub.lagged(), vec![(key.clone(), 3)]);
        let mut buf = Vec::new();
        assert!(sub.take_now(&mut buf, &mut None).is_some());
        assert_eq!(sequence_numbers(&buf), [1, 2]);
        // Publishes after the lag are not pushed live.
        hub.apply_committed(&[event(6, "c:a")]).unwrap();
        let mut rest = Vec::new();
        assert!(sub.take_now(&mut rest, &mut None).is_none());
        // Joining from position 2 queues 3..=6 from the cache, then live again.
        assert_eq!(
            hub.join_from_cache(&sub, &key, 2, pages(10), 0),
            Join::Joined { head: 6, sent: 4 }
        );
        sub.take_now(&mut rest, &mut None);
        assert_eq!(sequence_numbers(&rest), [3, 4, 5, 6]);
        // The socket took them: live again.
        hub.apply_committed(&[event(7, "c:a")]).unwrap();
        let mut live = Vec::new();
        sub.take_now(&mut live, &mut None);
        assert_eq!(sequence_numbers(&live), [7]);
        assert!(sub.lagged().is_empty());
    }

    #[test]
    fn joining_pages_a_long_cached_rest_and_reports_what_the_cache_lost() {
        let hub = Hub::new("e".into(), 0, 1, 1 << 20, Vec::new()).unwrap();
        let key = SubscriptionKey::parse("c:a").unwrap();
        let sub = Arc::new(Subscriber::new(Arc::from("x"), 100));
        for seq in 1..=10 {
            hub.apply_committed(&[event(seq, "c:a")]).unwrap();
        }
        assert_eq!(
            hub.join_from_cache(&sub, &key, 0, pages(4), 0),
            Join::Page {
                through: 4,
                sent: 4
            }
        );
        // The log is pruned below 6: the cache drops 1..=5 with it.
        hub.raise_retention_floor(6);
        assert_eq!(
            hub.join_from_cache(&sub, &key, 4, pages(4), 0),
            Join::NotCached
        );
        let view = hub.view();
        assert_eq!(
            (view.cache_floor, view.retention_floor, view.head),
            (6, 6, 10)
        );
    }
}
