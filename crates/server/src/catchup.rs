//! Where a subscription starts and how a cursor reads the log: the shell's side of
//! [`seqcast_sequencing::Cursor`] and [`seqcast_backlog::plan_drain`]. Every answer is read at
//! or below the hub's applied head, so what the log has and live delivery has not applied yet
//! arrives live, never twice.

use seqcast_backlog::{KeyHistory, plan_drain};
use std::sync::Arc;

use seqcast_persistence::EventReader;
use seqcast_protocol::SubscriptionKey;
use seqcast_sequencing::{LogFacts, Resume, resume, window_start};

use crate::error::ApiError;
use crate::hub::{Hub, PAGE_BYTES};
use crate::pages::SharedPage;
use crate::state::AppState;

/// Where a new subscription's cursor starts, and what its `sub_ack` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// The cursor's start: the key's messages after this are handed out.
    pub after: u64,
    /// The seam told in `sub_ack`: what follows it is live.
    pub head: u64,
    /// `recovered` (None without `since`).
    pub recovered: Option<bool>,
    /// The window's oldest number, told with `recovered: false`.
    pub oldest_sequence: Option<u64>,
    /// The key's messages in `(after, head]`: the backlog drained (0 with `since`).
    pub drained: u64,
    /// The key's retained messages skipped for being older than the backlog TTL.
    pub expired: u64,
    /// The key's messages skipped by the per-key backlog bound.
    pub overflow: u64,
}

/// The oldest number a resume can be served from at `head` (see
/// [`seqcast_sequencing::window_start`]), from memory when the cached tail is enough to know
/// it, else from the log.
pub async fn resume_window_start(app: &AppState, head: u64, now_ms: u64) -> Result<u64, ApiError> {
    let limits = app.settings.recovery;
    let min_ts = now_ms.saturating_sub(limits.max_age_ms);
    let from_memory = app.hub.with_cache(|cache, floor| {
        let by_count = limits.count_start(head);
        // The cache answers "the oldest message young enough" exactly when it reaches back past
        // the age boundary, holds everything retained, or the count bound lies inside it.
        let exact = cache.oldest_timestamp_ms().is_some_and(|t| t < min_ts)
            || cache.floor() <= floor
            || by_count >= cache.floor();
        exact.then(|| {
            window_start(
                limits,
                LogFacts {
                    head,
                    retention_floor: floor,
                    first_within_age: cache.first_at_or_after(min_ts),
                },
            )
        })
    });
    if let Some(start) = from_memory {
        return Ok(start);
    }
    let hub_floor = app.hub.retention_floor();
    let (floor, first) = app
        .store
        .read(move |r| Ok((floor_of(r, hub_floor)?, r.first_at_or_after(min_ts)?)))
        .await?;
    Ok(window_start(
        limits,
        LogFacts {
            head,
            retention_floor: floor,
            first_within_age: first.filter(|&s| s <= head),
        },
    ))
}

/// The log's retention floor as a read sees it: the reader's, raised to the hub's (retention
/// raises the hub's floor before it deletes, so a read that began just before still sees the
/// rows but must not serve them as complete). The one floor rule.
fn floor_of(r: &dyn EventReader, hub_floor: u64) -> Result<u64, seqcast_persistence::StoreError> {
    Ok(r.retention_floor()?.max(hub_floor))
}

/// How long a resume waits for this node to apply a number the log already committed.
const APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A resume names a number this node has not applied yet: with several nodes, a client may have
/// seen it on another node whose tail was ahead. If the log has committed it, wait (bounded)
/// until this node's hub applied it, so the seam is never below what the client already has.
/// Returns the hub's head then.
async fn wait_for_applied(app: &AppState, since: u64) -> Result<u64, ApiError> {
    let committed = app.store.read(|r| r.head()).await?;
    if since > committed {
        return Ok(app.hub.head()); // never issued: the resume rule says `recovered: false`
    }
    Ok(app.hub.applied(since, APPLY_WAIT).await)
}

/// Decide where a `subscribe` to `key` starts.
pub async fn plan_start(
    app: &AppState,
    key: &SubscriptionKey,
    since: Option<u64>,
    epoch: Option<&str>,
    now_ms: u64,
) -> Result<Start, ApiError> {
    let mut head = app.hub.head();
    let mut told = None;
    if let Some(since) = since {
        let epoch_matches = app.hub.epoch_matches(epoch);
        if epoch_matches && since > head {
            head = wait_for_applied(app, since).await?;
        }
        let ws = resume_window_start(app, head, now_ms).await?;
        match resume(since, epoch_matches, head, ws) {
            Resume::Complete { after } => {
                return Ok(Start {
                    after,
                    head,
                    recovered: Some(true),
                    oldest_sequence: None,
                    drained: 0,
                    expired: 0,
                    overflow: 0,
                });
            }
            Resume::Incomplete {
                after,
                oldest_sequence,
            } => {
                return Ok(Start {
                    after,
                    head,
                    recovered: Some(false),
                    oldest_sequence: Some(oldest_sequence),
                    drained: 0,
                    expired: 0,
                    overflow: 0,
                });
            }
            // Another history's number means nothing here: start like a late subscriber.
            Resume::OtherEpoch => told = Some(ws.min(head + 1)),
        }
    }
    let limits = app.settings.backlog;
    let hub_floor = app.hub.retention_floor();
    let key = key.clone();
    let min_ts = now_ms.saturating_sub(limits.ttl_ms);
    let (plan, drained, expired, overflow) = app
        .store
        .read(move |r| {
            let floor = floor_of(r, hub_floor)?;
            let history = KeyHistory {
                head,
                retention_floor: floor,
                ttl_start: r.first_at_or_after(min_ts)?.filter(|&s| s <= head),
                nth_newest: r.nth_newest_of_key(&key, head, limits.per_key)?,
            };
            let plan = plan_drain(limits, history);
            let count = |range: Option<(u64, u64)>| match range {
                Some((a, b)) => r.count_key(&key, a, b),
                None => Ok(0),
            };
            let drained = r.count_key(&key, plan.after, head)?;
            let expired = count(plan.expired)?;
            let overflow = count(plan.overflow)?;
            Ok((plan, drained, expired, overflow))
        })
        .await?;
    Ok(Start {
        after: plan.after,
        head,
        recovered: told.map(|_| false),
        oldest_sequence: told,
        drained,
        expired,
        overflow,
    })
}

/// One page of `key`'s log in `(after, through]`, at most `limit` messages and
/// [`PAGE_BYTES`] ([`seqcast_persistence::read_bytes`]), read with the retention floor in one read transaction — or the same page
/// another cursor read a moment ago (see [`crate::pages`]).
pub async fn read_key_page(
    app: &AppState,
    key: SubscriptionKey,
    after: u64,
    through: u64,
    limit: usize,
) -> Result<Arc<SharedPage>, ApiError> {
    app.pages
        .get(&key, after, through, limit, || {
            let key = key.clone();
            async move {
                // Frames are encoded from the rows as they are read (no event is built).
                app.store
                    .read(move |r| {
                        let mut frames = Vec::new();
                        let bounds =
                            r.visit_key_page(&key, after, through, limit, PAGE_BYTES, &mut |ev| {
                                frames.push(Hub::frame_of_row(&key, &ev));
                            })?;
                        Ok(SharedPage {
                            frames,
                            covered_through: bounds.covered_through,
                            floor: bounds.floor,
                        })
                    })
                    .await
            }
        })
        .await
}
