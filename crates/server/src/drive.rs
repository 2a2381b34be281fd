//! The one driver of a reader's [`Subscriptions`]: performs what the sans-IO engine asks (joins
//! from the cached tail, log reads, closes) against the hub and the log, and feeds the reads'
//! results back. A WebSocket connection ([`crate::connection`]) and a keyed Server-Sent Events
//! stream ([`crate::events`]) both drive their cursors through here, so a catch-up step, a join
//! and a close behind the retention floor are the same for both.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use seqcast_delivery::{
    Action, Close, JoinResult, MergedVerdict, PageVerdict, QueueLevel, Subscriptions,
};
use seqcast_protocol::SubscriptionKey;
use seqcast_sequencing::{KeyPositions, ReadBudget};

use crate::catchup;
use crate::error::CloseReason;
use crate::hub::{Frame, Join, PAGE_BYTES, Subscriber};
use crate::metrics::Metrics;
use crate::pages::SharedPage;
use crate::state::AppState;

/// The close of a reader whose node moved to another history (failover, restore).
pub const HISTORY_CHANGED: CloseReason = CloseReason::Peer(
    1012,
    "the store is another history now (failover or restore): resume with since",
);

/// Who is driven: the reader's id for log lines and the hub's history its positions belong to
/// ([`crate::hub::Hub::history`]).
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    /// The connection's (or stream's) id.
    pub client_id: &'a str,
    /// The history its numbers were told in.
    pub history: u64,
}

/// The node moved to another history since the reader was told its epoch: nothing planned
/// under the old one may be sent. Asks for the close; true when it did.
pub fn history_changed(app: &AppState, sub: &Subscriber, reader: Reader<'_>) -> bool {
    if app.hub.history() == reader.history {
        return false;
    }
    sub.close(HISTORY_CHANGED);
    true
}

/// What one catch-up step queues at most (a log page, or a page of the cached tail): half the
/// send queue's frames (16 to 1,024) and [`PAGE_BYTES`].
pub fn page_budget(app: &AppState) -> ReadBudget {
    ReadBudget {
        max_events: (app.settings.send_queue / 2).clamp(16, 1024),
        max_bytes: PAGE_BYTES,
    }
}

/// The send queue's level as [`Subscriptions`] takes it.
pub fn queue_level(sub: &Subscriber) -> QueueLevel {
    QueueLevel {
        below_low_water: sub.is_below_low_water(),
        above_high_water: sub.is_above_high_water(),
        closing: sub.is_closing(),
    }
}

/// A catch-up log read that came back.
#[derive(Debug)]
pub enum CatchUp {
    /// A page of a key's log was read.
    Page {
        /// The key read.
        key: SubscriptionKey,
        /// The page, or why it could not be read.
        result: Result<Arc<SharedPage>, crate::error::ApiError>,
    },
    /// A merged page of keys resumed together was read.
    MergedPage {
        /// The keys read, each with its position when the read started.
        keys: Vec<(SubscriptionKey, u64)>,
        /// The page, or why it could not be read.
        result: Result<catchup::MergedPage, crate::error::ApiError>,
    },
}

/// A catch-up log read in flight (one per reader at a time, off the async runtime's threads).
pub type Read = Pin<Box<dyn Future<Output = CatchUp> + Send>>;

/// Perform what [`Subscriptions`] asks while the send queue has room: joins from the cache at
/// once, a log read as the returned future, a close. Returns the read, if one was started.
pub fn advance(
    app: &Arc<AppState>,
    sub: &Arc<Subscriber>,
    reader: Reader<'_>,
    subs: &mut Subscriptions,
) -> Option<Read> {
    let page = page_budget(app);
    loop {
        let view = app.hub.view();
        // How far behind the head a catch-up from `after` starts.
        let observe_lag = |after: u64| {
            app.hub
                .metrics
                .catchup_lag
                .observe(view.head.saturating_sub(after) as f64);
        };
        match subs.next_action(view, queue_level(sub))? {
            Action::Close(Close::Behind {
                key,
                position,
                floor,
            }) => {
                close_behind(app, sub, reader, &key, position, floor);
                return None;
            }
            Action::Join { key, after } => {
                observe_lag(after);
                let result =
                    join_result(
                        app.hub
                            .join_from_cache(sub, &key, after, page, reader.history),
                    );
                subs.on_join(&key, result);
                if result == JoinResult::Gone {
                    history_changed(app, sub, reader);
                    return None;
                }
            }
            Action::JoinMerged { keys } => {
                let positions = KeyPositions::new(keys);
                observe_lag(positions.min_after());
                let result = join_result(app.hub.join_merged_from_cache(
                    sub,
                    &positions,
                    page,
                    reader.history,
                ));
                subs.on_merged_join(result);
                if result == JoinResult::Gone {
                    history_changed(app, sub, reader);
                    return None;
                }
            }
            Action::ReadLogMerged {
                keys,
                after,
                through,
            } => {
                observe_lag(after);
                let app = Arc::clone(app);
                return Some(Box::pin(async move {
                    let result = catchup::read_keys_page(&app, keys.clone(), through, page).await;
                    CatchUp::MergedPage { keys, result }
                }));
            }
            Action::ReadLog {
                key,
                after,
                through,
            } => {
                observe_lag(after);
                let app = Arc::clone(app);
                return Some(Box::pin(async move {
                    let result =
                        catchup::read_key_page(&app, key.clone(), after, through, page).await;
                    CatchUp::Page { key, result }
                }));
            }
        }
    }
}

/// The hub's join as [`Subscriptions`] takes it.
fn join_result(join: Join) -> JoinResult {
    match join {
        Join::Joined { head, .. } => JoinResult::Joined { head },
        Join::Page { through, .. } => JoinResult::Page { through },
        Join::NotCached => JoinResult::NotCached,
        Join::Gone => JoinResult::Gone,
    }
}

/// A cursor fell behind the retention floor: close with [`CloseReason::SlowConsumer`] (the
/// reader resumes and is told `recovered: false`).
fn close_behind(
    app: &AppState,
    sub: &Subscriber,
    reader: Reader<'_>,
    key: &SubscriptionKey,
    position: u64,
    floor: u64,
) {
    Metrics::inc(&app.hub.metrics.slow_consumer_closes);
    tracing::warn!(
        event = "slow_consumer",
        client_id = %reader.client_id,
        subscription_key = %key,
        position,
        retention_floor = floor,
        lag = app.hub.head().saturating_sub(position),
        "subscriber fell behind the retention floor: closing with 1013 (it resumes with recovered: false)"
    );
    sub.close(CloseReason::SlowConsumer);
}

/// A catch-up read came back: hand its page to [`Subscriptions`] and queue what it says to.
pub fn on_read(
    app: &AppState,
    sub: &Subscriber,
    reader: Reader<'_>,
    subs: &mut Subscriptions,
    done: CatchUp,
) {
    // A page read under the old history: its numbers mean nothing now.
    if history_changed(app, sub, reader) {
        match done {
            CatchUp::Page { key, .. } => {
                subs.on_read_failed(&key);
            }
            CatchUp::MergedPage { .. } => {
                subs.on_merged_read_failed();
            }
        }
        return;
    }
    match done {
        CatchUp::Page { key, result } => match result {
            Ok(page) => {
                let verdict = subs.on_page(&key, page.covered_through, page.floor);
                if verdict != PageVerdict::Drop {
                    Metrics::inc(&app.hub.metrics.catchup_pages);
                }
                match verdict {
                    // Unsubscribed while the page was read.
                    PageVerdict::Drop => {}
                    PageVerdict::Close(Close::Behind {
                        key,
                        position,
                        floor,
                    }) => close_behind(app, sub, reader, &key, position, floor),
                    PageVerdict::Deliver => {
                        let n = page.frames.len() as u64;
                        if sub.push(page.frames.iter().cloned()) {
                            Metrics::add(&app.hub.metrics.deliveries, n);
                        }
                    }
                }
            }
            Err(e) => {
                // Unsubscribed while the page was read: nothing to catch up, nothing to close.
                if subs.on_read_failed(&key) {
                    tracing::warn!(event = "catchup_read_failed", client_id = %reader.client_id, subscription_key = %key, error = %e, "could not read the log to catch a subscriber up");
                    sub.close(CloseReason::LogUnavailable);
                }
            }
        },
        CatchUp::MergedPage { keys, result } => match result {
            Ok(page) => match subs.on_merged_page(page.covered_through, page.floor) {
                MergedVerdict::Close(Close::Behind {
                    key,
                    position,
                    floor,
                }) => close_behind(app, sub, reader, &key, position, floor),
                MergedVerdict::Deliver(kept) => {
                    Metrics::inc(&app.hub.metrics.catchup_pages);
                    // Keys unsubscribed while the page was read are left out.
                    let kept: std::collections::HashSet<&SubscriptionKey> = kept.iter().collect();
                    let wanted: Vec<bool> = keys.iter().map(|(k, _)| kept.contains(k)).collect();
                    let frames: Vec<Frame> = page
                        .frames
                        .into_iter()
                        .filter(|(i, _)| wanted[*i])
                        .map(|(_, f)| f)
                        .collect();
                    let n = frames.len() as u64;
                    if sub.push(frames) {
                        Metrics::add(&app.hub.metrics.deliveries, n);
                    }
                }
            },
            Err(e) => {
                if subs.on_merged_read_failed() {
                    tracing::warn!(event = "catchup_read_failed", client_id = %reader.client_id, keys = keys.len(), error = %e, "could not read the log to catch resumed keys up");
                    sub.close(CloseReason::LogUnavailable);
                }
            }
        },
    }
}
