//! seqcast backlog: strict per-subscription-key queues for late subscribers.
//!
//! Job: a message published to a key nobody is subscribed to waits in that key's backlog; the
//! first `subscribe` to exactly that key drains it, in order, with the original sequence numbers.
//! The server asks [`Backlogs`] to enqueue, drain and expire, and logs the outcomes it gets back
//! (`backlog_created`, `backlog_overflow`, `backlog_expired`, …).
//!
//! Boundary: sans-IO. No tokio, no sockets, no clock reads, no logging; time is `now_ms: u64`.
//!
//! Invariant: a backlog is keyed by [`SubscriptionKey`] and nothing else — the map's key type has
//! no room for a session, user or connection id — so a drain can only ever return messages
//! published to that exact `channel:request_id` (seed 003). Memory is bounded: never more than
//! `per_key` entries for one key, `total` in all, and a key with no entries has no map entry.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use seqcast_backlog::{BacklogLimits, Backlogs};
//! use seqcast_protocol::SubscriptionKey;
//!
//! let (a, b) = (SubscriptionKey::parse("search:req_A")?, SubscriptionKey::parse("search:req_B")?);
//! let mut backlogs = Backlogs::new(BacklogLimits::default());
//! backlogs.enqueue(&a, 1, "for A", 0)?;
//! let outcome = backlogs.enqueue(&b, 2, "for B", 0)?;
//! assert!(outcome.created); // the server logs `backlog_created`
//!
//! // The first subscriber of req_B gets req_B's messages and nothing else.
//! let drained = backlogs.drain(&b, 1_000);
//! assert_eq!(drained.entries.len(), 1);
//! assert_eq!(drained.entries[0].frame, "for B");
//! assert_eq!(backlogs.key_len(&a), 1);
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};

use seqcast_protocol::SubscriptionKey;

/// Bounds of the backlogs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BacklogLimits {
    /// Most entries one key may hold; beyond it that key's oldest is dropped.
    pub per_key: usize,
    /// Most entries held across all keys; beyond it the globally oldest is dropped.
    pub total: usize,
    /// An entry whose age (`now_ms - enqueued_at_ms`) exceeds this is never delivered.
    pub ttl_ms: u64,
}

impl Default for BacklogLimits {
    /// 1 000 per key, 100 000 in total, two minutes.
    fn default() -> Self {
        Self {
            per_key: 1_000,
            total: 100_000,
            ttl_ms: 120_000,
        }
    }
}

/// One message waiting for its first subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BacklogEntry<F> {
    /// The number the message was published under; drains hand it back unchanged.
    pub sequence_number: u64,
    /// When it was enqueued (the caller's `now_ms`); drives the TTL.
    pub enqueued_at_ms: u64,
    /// The payload to send on drain.
    pub frame: F,
}

/// Which bound an overflow enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OverflowReason {
    /// The key held more than `per_key` entries.
    PerKey,
    /// All keys together held more than `total` entries.
    Total,
}

/// Entries dropped, undelivered, to keep a bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overflow {
    /// The key whose entries were dropped (for `Total`, possibly not the key being enqueued to).
    pub key: SubscriptionKey,
    /// How many of its entries were dropped.
    pub dropped: usize,
    /// Which bound was enforced.
    pub reason: OverflowReason,
}

/// What [`Backlogs::enqueue`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnqueueOutcome {
    /// The key had no backlog before this message (log `backlog_created`).
    pub created: bool,
    /// The key's backlog size after the enqueue and any overflow.
    pub backlog_size: usize,
    /// What was dropped to make room; empty when nothing was.
    pub overflow: Vec<Overflow>,
}

/// What [`Backlogs::drain`] removed for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drained<F> {
    /// The key's live entries, oldest first, to send after `sub_ack`.
    pub entries: Vec<BacklogEntry<F>>,
    /// Entries found past their TTL and discarded instead of delivered.
    pub expired: usize,
}

/// Entries of one key removed by [`Backlogs::expire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// The key that lost entries.
    pub key: SubscriptionKey,
    /// How many it lost.
    pub count: usize,
}

/// Why [`Backlogs::enqueue`] refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    /// The key's backlog already holds a message numbered `last >= got`: delivering both would
    /// break the per-key order subscribers rely on.
    #[error("backlog {key}: sequence number {got} is not greater than the last enqueued {last}")]
    NotIncreasing {
        /// The key being enqueued to.
        key: SubscriptionKey,
        /// The number of the key's newest entry.
        last: u64,
        /// The refused number.
        got: u64,
    },
}

/// An entry plus its place in the global enqueue order.
#[derive(Debug, Clone)]
struct Slot<F> {
    order: u64,
    entry: BacklogEntry<F>,
}

/// Where an entry of the global order lives, and when it was enqueued (for `expire`).
#[derive(Debug, Clone)]
struct OrderRef {
    key: SubscriptionKey,
    enqueued_at_ms: u64,
}

/// The late-subscriber backlogs of every key.
///
/// Each key has a queue in enqueue order; a global index (enqueue order → key) finds the
/// globally oldest entry in O(log n) for total overflow and for expiry. Every live entry is in
/// exactly one key queue and once in the index; removals update both.
#[derive(Debug, Clone)]
pub struct Backlogs<F> {
    limits: BacklogLimits,
    queues: HashMap<SubscriptionKey, VecDeque<Slot<F>>>,
    by_order: BTreeMap<u64, OrderRef>,
    next_order: u64,
}

/// Whether something enqueued at `enqueued_at_ms` has outlived `ttl_ms` at `now_ms`.
/// A timestamp in the future counts as age 0 rather than wrapping around.
fn past_ttl(enqueued_at_ms: u64, now_ms: u64, ttl_ms: u64) -> bool {
    now_ms.saturating_sub(enqueued_at_ms) > ttl_ms
}

/// Add `dropped` to the overflow record for (`key`, `reason`), creating it if needed.
fn note_overflow(
    overflow: &mut Vec<Overflow>,
    key: &SubscriptionKey,
    reason: OverflowReason,
    dropped: usize,
) {
    match overflow
        .iter_mut()
        .find(|o| o.reason == reason && o.key == *key)
    {
        Some(o) => o.dropped += dropped,
        None => overflow.push(Overflow {
            key: key.clone(),
            dropped,
            reason,
        }),
    }
}

impl<F> Backlogs<F> {
    /// Empty backlogs enforcing `limits`.
    pub fn new(limits: BacklogLimits) -> Self {
        Self {
            limits,
            queues: HashMap::new(),
            by_order: BTreeMap::new(),
            next_order: 0,
        }
    }

    /// Queue `frame` for the first subscriber of exactly `key`.
    ///
    /// Per key, sequence numbers must increase: a number not greater than the key's newest
    /// entry is refused. (A key whose backlog was drained or expired starts afresh.)
    /// Over `per_key`, that key's oldest entry is dropped; over `total`, the globally oldest
    /// entry (first enqueued, whatever its key) is dropped. Each drop is reported in
    /// [`EnqueueOutcome::overflow`]. With a limit of 0 the new entry itself is dropped at once.
    pub fn enqueue(
        &mut self,
        key: &SubscriptionKey,
        sequence_number: u64,
        frame: F,
        now_ms: u64,
    ) -> Result<EnqueueOutcome, EnqueueError> {
        let created = match self.queues.get(key) {
            Some(queue) => {
                if let Some(last) = queue.back().map(|s| s.entry.sequence_number)
                    && sequence_number <= last
                {
                    return Err(EnqueueError::NotIncreasing {
                        key: key.clone(),
                        last,
                        got: sequence_number,
                    });
                }
                false
            }
            None => true,
        };

        let order = self.next_order;
        self.next_order += 1;
        self.by_order.insert(
            order,
            OrderRef {
                key: key.clone(),
                enqueued_at_ms: now_ms,
            },
        );
        let queue = self.queues.entry(key.clone()).or_default();
        queue.push_back(Slot {
            order,
            entry: BacklogEntry {
                sequence_number,
                enqueued_at_ms: now_ms,
                frame,
            },
        });

        let mut overflow = Vec::new();
        let mut per_key_dropped = 0;
        while queue.len() > self.limits.per_key {
            if let Some(slot) = queue.pop_front() {
                self.by_order.remove(&slot.order);
                per_key_dropped += 1;
            }
        }
        if queue.is_empty() {
            self.queues.remove(key);
        }
        if per_key_dropped > 0 {
            note_overflow(&mut overflow, key, OverflowReason::PerKey, per_key_dropped);
        }

        while self.by_order.len() > self.limits.total {
            match self.pop_global_oldest() {
                Some(victim) => note_overflow(&mut overflow, &victim, OverflowReason::Total, 1),
                None => break,
            }
        }

        Ok(EnqueueOutcome {
            created,
            backlog_size: self.key_len(key),
            overflow,
        })
    }

    /// Remove the first-enqueued entry of all keys; returns its key.
    fn pop_global_oldest(&mut self) -> Option<SubscriptionKey> {
        let (order, at) = self.by_order.pop_first()?;
        if let Some(queue) = self.queues.get_mut(&at.key) {
            // Per-key queues are in enqueue order, so the globally oldest entry heads its queue.
            debug_assert_eq!(queue.front().map(|s| s.order), Some(order));
            queue.pop_front();
            if queue.is_empty() {
                self.queues.remove(&at.key);
            }
        }
        Some(at.key)
    }

    /// Remove and return exactly `key`'s entries, oldest first. Entries past the TTL at `now_ms`
    /// are discarded instead and counted in [`Drained::expired`]. Other keys are untouched;
    /// an unknown key drains empty.
    pub fn drain(&mut self, key: &SubscriptionKey, now_ms: u64) -> Drained<F> {
        let Some(queue) = self.queues.remove(key) else {
            return Drained {
                entries: Vec::new(),
                expired: 0,
            };
        };
        let mut entries = Vec::with_capacity(queue.len());
        let mut expired = 0;
        for slot in queue {
            self.by_order.remove(&slot.order);
            if past_ttl(slot.entry.enqueued_at_ms, now_ms, self.limits.ttl_ms) {
                expired += 1;
            } else {
                entries.push(slot.entry);
            }
        }
        Drained { entries, expired }
    }

    /// Drop entries older than `now_ms - ttl_ms`; backlogs left empty are removed.
    /// Returns one [`Expired`] per key that lost entries, ordered by key.
    ///
    /// Walks the global enqueue order from the oldest and stops at the first entry young enough
    /// to stay (O(expired · log n)). With a clock that stepped back, an entry behind a younger one
    /// waits for it; [`drain`](Self::drain) checks each entry, so it is never delivered late.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Expired> {
        let mut counts: BTreeMap<SubscriptionKey, usize> = BTreeMap::new();
        while let Some((_, at)) = self.by_order.first_key_value() {
            if !past_ttl(at.enqueued_at_ms, now_ms, self.limits.ttl_ms) {
                break;
            }
            match self.pop_global_oldest() {
                Some(key) => *counts.entry(key).or_insert(0) += 1,
                None => break,
            }
        }
        counts
            .into_iter()
            .map(|(key, count)| Expired { key, count })
            .collect()
    }

    /// Entries held across all keys.
    pub fn len(&self) -> usize {
        self.by_order.len()
    }

    /// Whether no key has a backlog.
    pub fn is_empty(&self) -> bool {
        self.by_order.is_empty()
    }

    /// Entries held for `key` (0 when it has no backlog).
    pub fn key_len(&self, key: &SubscriptionKey) -> usize {
        self.queues.get(key).map_or(0, VecDeque::len)
    }

    /// Keys that currently have a backlog.
    pub fn key_count(&self) -> usize {
        self.queues.len()
    }

    /// The limits these backlogs enforce.
    pub fn limits(&self) -> BacklogLimits {
        self.limits
    }
}
