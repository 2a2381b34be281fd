//! Where a subscription starts and how a cursor reads the log: the shell's side of
//! [`seqcast_sequencing::Cursor`] and [`seqcast_backlog::plan_drain`]. Every answer is read at
//! or below the hub's applied head, so what the log has and live delivery has not applied yet
//! arrives live, never twice. The one recovery engine: a resume is judged once
//! ([`plan_resume`]) for WebSocket subscribes and HTTP recovery alike, and every read is a
//! cursor run to a [`ReadBudget`] — a WebSocket catch-up step ([`read_key_page`], or the hub's
//! join from the cache) and an HTTP recovery answer ([`read_recovery`]).

use seqcast_backlog::{KeyHistory, plan_drain};
use std::sync::Arc;

use seqcast_persistence::{EventFilter, EventReader};
use seqcast_protocol::SubscriptionKey;
use seqcast_sequencing::{
    LogFacts, ReadBudget, Replay, ReplayStep, Resume, cached_window_start, resume, window_start,
};

use crate::error::ApiError;
use crate::hub::{Frame, Hub, frame_bytes};
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
async fn resume_window_start(app: &AppState, head: u64, now_ms: u64) -> Result<u64, ApiError> {
    let limits = app.settings.recovery;
    let from_memory = app
        .hub
        .with_cache(|cache, floor| cached_window_start(limits, head, floor, now_ms, cache));
    if let Some(start) = from_memory {
        return Ok(start);
    }
    let hub_floor = app.hub.retention_floor();
    let min_ts = limits.age_boundary_ms(now_ms);
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

/// A resume names a number this node has not applied yet ([`Resume::Ahead`]): with several
/// nodes, a client may have seen it on another node whose tail was ahead. Wait (bounded) until
/// this node's hub applied it — or, for a number the log never committed, the log's head — so
/// the seam is never below what the client already has. Returns the hub's head then.
async fn wait_for_applied(app: &AppState, since: u64) -> Result<u64, ApiError> {
    let committed = app.store.read(|r| r.head()).await?;
    Ok(app.hub.applied(since.min(committed), APPLY_WAIT).await)
}

/// The verdict on a resume (`since` with the client's `epoch`), the one both ways to recover
/// act on: a WebSocket `subscribe` with `since` and `GET /websocket/messages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// Where the cursor starts and what the client is told.
    pub verdict: Resume,
    /// The head it was judged at: the seam of a subscription, the end of a recovery answer.
    pub head: u64,
    /// The window's oldest number at that head (`head + 1` when it is empty).
    pub window_start: u64,
}

/// Judge a resume against the window at `head`.
async fn judge(
    app: &AppState,
    since: u64,
    epoch_matches: bool,
    head: u64,
    now_ms: u64,
) -> Result<Resumed, ApiError> {
    let window_start = resume_window_start(app, head, now_ms).await?;
    Ok(Resumed {
        verdict: resume(since, epoch_matches, head, window_start),
        head,
        window_start,
    })
}

/// Decide a resume: judged at the hub's head; a `since` ahead of it is judged again once this
/// node applied it (see [`wait_for_applied`]).
pub async fn plan_resume(
    app: &AppState,
    since: u64,
    epoch: Option<&str>,
    now_ms: u64,
) -> Result<Resumed, ApiError> {
    let epoch_matches = app.hub.epoch_matches(epoch);
    let resumed = judge(app, since, epoch_matches, app.hub.head(), now_ms).await?;
    if !matches!(resumed.verdict, Resume::Ahead { .. }) {
        return Ok(resumed);
    }
    let head = wait_for_applied(app, since).await?;
    if head == resumed.head {
        return Ok(resumed);
    }
    judge(app, since, epoch_matches, head, now_ms).await
}

/// Decide where a `subscribe` to `key` starts.
pub async fn plan_start(
    app: &AppState,
    key: &SubscriptionKey,
    since: Option<u64>,
    epoch: Option<&str>,
    now_ms: u64,
) -> Result<Start, ApiError> {
    match since {
        Some(since) => {
            let resumed = plan_resume(app, since, epoch, now_ms).await?;
            start_of(app, key, resumed, now_ms).await
        }
        None => backlog_start(app, key, app.hub.head(), None, now_ms).await,
    }
}

/// Where a resume of `key` starts, given the verdict on its `since`.
pub async fn start_of(
    app: &AppState,
    key: &SubscriptionKey,
    resumed: Resumed,
    now_ms: u64,
) -> Result<Start, ApiError> {
    let head = resumed.head;
    if let Some(after) = resumed.verdict.start() {
        return Ok(Start {
            after,
            head,
            recovered: Some(resumed.verdict.recovered()),
            oldest_sequence: resumed.verdict.oldest_sequence(),
            drained: 0,
            expired: 0,
            overflow: 0,
        });
    }
    // Another history's number means nothing here: start like a late subscriber.
    let told = resumed.window_start.min(head + 1);
    backlog_start(app, key, head, Some(told), now_ms).await
}

/// Where a key resumed with others starts: its verdict, or why it could not be planned.
pub type KeyStart = Result<Start, ApiError>;

/// Decide where each of `keys` (with its `since`, all from `epoch`) starts: a `resume` of many
/// keys. Each distinct `since` is judged once ([`plan_resume`]); the verdicts are in the order
/// of `keys`, with the head the last judgment was made at (the `resume_ack`'s `head`, the seam
/// of every key that starts over). A key whose start could not be read fails alone.
pub async fn plan_resume_many(
    app: &AppState,
    keys: &[(SubscriptionKey, u64)],
    epoch: Option<&str>,
    now_ms: u64,
) -> Result<(Vec<KeyStart>, u64), ApiError> {
    let mut judged: std::collections::BTreeMap<u64, Resumed> = std::collections::BTreeMap::new();
    for &(_, since) in keys {
        if let std::collections::btree_map::Entry::Vacant(slot) = judged.entry(since) {
            slot.insert(plan_resume(app, since, epoch, now_ms).await?);
        }
    }
    let head = judged
        .values()
        .map(|r| r.head)
        .max()
        .unwrap_or_else(|| app.hub.head());
    let mut starts = Vec::with_capacity(keys.len());
    for (key, since) in keys {
        // A key that starts over (another epoch) drains its backlog up to the ack's `head`, the
        // one seam the client knows of, even if its `since` was judged at an earlier head: its
        // `drained` then counts every message of it up to that `head`.
        let resumed = Resumed {
            head,
            ..judged[since]
        };
        starts.push(start_of(app, key, resumed, now_ms).await);
    }
    Ok((starts, head))
}

/// A late subscriber's start at `head`: the backlog of `key` (`told`: the `oldest_sequence`
/// told with `recovered: false`, for a `since` of another history).
async fn backlog_start(
    app: &AppState,
    key: &SubscriptionKey,
    head: u64,
    told: Option<u64>,
    now_ms: u64,
) -> Result<Start, ApiError> {
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

/// A merged page of keys resumed together: their messages above each one's position, in
/// global order, each with its key's index.
#[derive(Debug)]
pub struct MergedPage {
    /// (index of the key, frame), in order.
    pub frames: Vec<(usize, Frame)>,
    /// Every wanted message up to this was handed out.
    pub covered_through: u64,
    /// The retention floor the page was read with.
    pub floor: u64,
}

/// One merged page of the log for `keys` (each above its own position) in
/// `(smallest position, through]` under `budget`, read with the retention floor in one read
/// transaction (one statement on SQLite, see `EventReader::visit_keys_page`).
pub async fn read_keys_page(
    app: &AppState,
    keys: Vec<(SubscriptionKey, u64)>,
    through: u64,
    budget: ReadBudget,
) -> Result<MergedPage, ApiError> {
    let after = keys.iter().map(|&(_, a)| a).min().unwrap_or(through);
    app.store
        .read(move |r| {
            let mut read = Vec::new();
            let bounds = r.visit_keys_page(
                &keys,
                through,
                budget.max_events,
                budget.max_bytes,
                &mut |i, ev| {
                    read.push((ev.sequence_number, (i, Hub::frame_of_row(&keys[i].0, &ev))));
                },
            )?;
            let page = budget
                .fill()
                .page(after, bounds.covered_through, read, |(_, f)| frame_bytes(f));
            Ok(MergedPage {
                frames: page.items,
                covered_through: page.covered_through,
                floor: bounds.floor,
            })
        })
        .await
}

/// One page of `key`'s log in `(after, through]` under `budget`, read with the retention floor
/// in one read transaction — or the same page another cursor read a moment ago (see
/// [`crate::pages`]).
pub async fn read_key_page(
    app: &AppState,
    key: SubscriptionKey,
    after: u64,
    through: u64,
    budget: ReadBudget,
) -> Result<Arc<SharedPage>, ApiError> {
    app.pages
        .get(&key, after, through, budget, || {
            let key = key.clone();
            async move {
                // Frames are encoded from the rows as they are read (no event is built).
                app.store
                    .read(move |r| {
                        let mut read = Vec::new();
                        let bounds = r.visit_key_page(
                            &key,
                            after,
                            through,
                            budget.max_events,
                            budget.max_bytes,
                            &mut |ev| read.push((ev.sequence_number, Hub::frame_of_row(&key, &ev))),
                        )?;
                        let page =
                            budget
                                .fill()
                                .page(after, bounds.covered_through, read, frame_bytes);
                        Ok(SharedPage {
                            frames: page.items,
                            covered_through: page.covered_through,
                            floor: bounds.floor,
                        })
                    })
                    .await
            }
        })
        .await
}

/// What a recovery read handed out.
#[derive(Debug)]
pub struct Recovered {
    /// The messages (sequence number, frame), in order.
    pub frames: Vec<(u64, Frame)>,
    /// The number of the last message handed out, when the budget cut the answer (more may
    /// follow).
    pub next_since: Option<u64>,
    /// The retention floor passed the cursor while the log was read: what lay below it is gone,
    /// and the answer went on from the floor.
    pub behind: bool,
}

/// The messages numbered in `(after, head]` that `admit` lets through (of those `filter` reads
/// from the log): a [`Replay`] — the cursor a WebSocket subscriber catches up with, run to
/// `budget` — performed over log pages and the cached tail.
pub async fn read_recovery(
    app: &AppState,
    filter: &EventFilter,
    admit: &(dyn Fn(&SubscriptionKey) -> bool + Sync),
    after: u64,
    head: u64,
    budget: ReadBudget,
) -> Result<Recovered, ApiError> {
    let mut replay = Replay::new(after, head, budget);
    let mut frames = Vec::new();
    loop {
        match replay.next_step(app.hub.view()) {
            ReplayStep::Done => break,
            ReplayStep::FromCache { after } => {
                // None: the cache lost the position since the view; the next step reads the log.
                let taken = app.hub.read_cached(after, |cached| {
                    replay.on_cached(
                        cached
                            .filter(|m| admit(&m.key))
                            .map(|m| (m.sequence_number, (m.sequence_number, m.frame.clone()))),
                        |(_, f)| frame_bytes(f),
                    )
                });
                frames.extend(taken.into_iter().flatten());
            }
            ReplayStep::ReadLog {
                after,
                through,
                budget,
            } => {
                // Reads of the log go in chunks of 64 to 1,000 events (the filter may drop many).
                let (filter, events) = (filter.clone(), budget.max_events.clamp(64, 1_000));
                let page = app
                    .store
                    .read(move |r| r.page(&filter, after, through, events, budget.max_bytes))
                    .await?;
                frames.extend(
                    replay.on_log_page(
                        page.events
                            .iter()
                            .filter(|e| admit(&e.key))
                            .map(|e| (e.sequence_number, (e.sequence_number, Hub::frame_of(e)))),
                        |(_, f)| frame_bytes(f),
                        page.covered_through,
                        page.floor,
                    ),
                );
            }
        }
    }
    Ok(Recovered {
        frames,
        next_since: replay.next_since(),
        behind: replay.behind(),
    })
}
