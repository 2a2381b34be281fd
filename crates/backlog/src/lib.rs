//! seqcast backlog: what a late subscriber of one key gets, as a view of the committed log.
//!
//! Job: a `subscribe` without `since` gets the key's messages committed within the last
//! `ttl_ms`, at most the newest `per_key` of them, then live ones. Nothing is stored here: the
//! committed log is the truth, so the backlog survives restarts and crashes and is the same on
//! every node. [`plan_drain`] turns what the log says about one key ([`KeyHistory`]) into the
//! cursor's start position and the ranges whose messages were skipped (for the
//! `backlog_expired` / `backlog_overflow` logs).
//!
//! Boundary: sans-IO. No tokio, no sockets, no clock reads, no logging.
//!
//! Invariant: strict keying. A plan is computed from one [`seqcast_protocol::SubscriptionKey`]'s history and the
//! shell reads only that key's messages after [`DrainPlan::after`], so a drain can only ever
//! return messages published to that exact `channel:request_id` — never a session's, a user's
//! or another request's.
//!
//! ```
//! use seqcast_backlog::{BacklogLimits, KeyHistory, plan_drain};
//!
//! let limits = BacklogLimits { per_key: 2, ttl_ms: 120_000 };
//! // The log holds 1..=10; the first number young enough for the TTL is 4; the key's
//! // second-newest message is 8.
//! let history = KeyHistory { head: 10, retention_floor: 1, ttl_start: Some(4), nth_newest: Some(8) };
//! let plan = plan_drain(limits, history);
//! assert_eq!(plan.after, 7); // the key's messages numbered 8..=10 are drained
//! assert_eq!(plan.expired, Some((0, 3))); // the key's messages in 1..=3 were too old
//! assert_eq!(plan.overflow, Some((3, 7))); // those in 4..=7 were beyond the per-key bound
//! ```

/// What a subscribe without `since` drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BacklogLimits {
    /// At most this many of the key's newest messages.
    pub per_key: usize,
    /// Only messages committed within this many milliseconds.
    pub ttl_ms: u64,
}

impl Default for BacklogLimits {
    /// 1 000 per key, two minutes.
    fn default() -> Self {
        BacklogLimits {
            per_key: 1_000,
            ttl_ms: 120_000,
        }
    }
}

/// What the log says about one key at the moment of a subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHistory {
    /// The newest number applied to live delivery: the seam.
    pub head: u64,
    /// The oldest number the log still holds.
    pub retention_floor: u64,
    /// The oldest number (of any key) committed within the TTL, or None when nothing that
    /// young is retained.
    pub ttl_start: Option<u64>,
    /// The number of the key's `per_key`-th newest message up to `head`, or None when the key
    /// has fewer messages.
    pub nth_newest: Option<u64>,
}

/// Where a late subscriber's cursor starts, and what the limits skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPlan {
    /// The cursor's start: the key's messages numbered in `(after, head]` are drained.
    pub after: u64,
    /// `(a, b]`: the key's retained messages in this range were older than the TTL.
    pub expired: Option<(u64, u64)>,
    /// `(a, b]`: the key's messages in this range were within the TTL but beyond `per_key`.
    pub overflow: Option<(u64, u64)>,
}

/// Decide a late subscriber's start. See the crate docs.
pub fn plan_drain(limits: BacklogLimits, history: KeyHistory) -> DrainPlan {
    let retained_after = history.retention_floor.saturating_sub(1);
    let ttl_after = history
        .ttl_start
        .map_or(history.head, |s| s.saturating_sub(1))
        .min(history.head)
        .max(retained_after);
    let bound_after = if limits.per_key == 0 {
        history.head
    } else {
        history.nth_newest.map_or(0, |s| s.saturating_sub(1))
    };
    let after = ttl_after.max(bound_after).min(history.head);
    DrainPlan {
        after,
        expired: (ttl_after > retained_after).then_some((retained_after, ttl_after)),
        overflow: (bound_after > ttl_after).then_some((ttl_after, bound_after.min(history.head))),
    }
}
