//! The log's recent tail in memory: a dense run of the newest committed messages, bounded in
//! bytes, with a per-key index so that one key's messages are found without scanning the rest.

use std::collections::{HashMap, VecDeque};

use seqcast_protocol::SubscriptionKey;

use crate::budget::{Page, ReadBudget};
use crate::cursor::View;

/// One committed message as the cache keeps it. `F` is whatever the server sends (the encoded
/// frame); it is stored once and handed out by reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedMessage<F> {
    /// The deployment-wide number.
    pub sequence_number: u64,
    /// The stream it belongs to.
    pub key: SubscriptionKey,
    /// When it was persisted (ms since the Unix epoch); never decreases along the log.
    pub timestamp_ms: u64,
    /// The payload.
    pub frame: F,
    /// What holding it costs, in bytes (the frame's length is the caller's to measure).
    pub bytes: usize,
}

/// Why [`TailCache::push`] refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GapError {
    /// Messages must arrive exactly in order, `head + 1` each: anything else means the caller
    /// lost or reordered a committed message, and serving from here would hide a hole.
    #[error("sequence number {got} does not follow the head {head}")]
    NotNext {
        /// The cache's head.
        head: u64,
        /// The refused number.
        got: u64,
    },
}

/// Fixed cost charged per cached message on top of what the caller measures (`bytes`: its frame
/// and names), so that the budget bounds what the cache really holds. For the server's frames (a
/// 4-word shared byte string, 88-byte entries): its entry in the run and its number in its key's
/// index, each in a deque that grows by doubling (up to twice their size: 2 × 88 + 2 × 8), and the
/// allocator's share of its frame (chunk header and the frame's shared handle: 48) and of its two
/// names (reference counts and chunk headers: 48). Measured with 300,000 messages to distinct
/// keys (tests/tests/memory_bounds.rs), this and [`KEY_OVERHEAD_BYTES`] cover what the cache
/// holds.
pub const ENTRY_OVERHEAD_BYTES: usize = 288;

/// Fixed cost charged per key with at least one cached message: its slot in the key index (a
/// hash table that grows by doubling: up to twice its 65 bytes) and the first allocation of its
/// deque of numbers (48). Without it, messages to ever new keys would cost more than charged.
pub const KEY_OVERHEAD_BYTES: usize = 176;

/// The newest messages of the log, a dense run `floor() ..= head()` (no number missing),
/// bounded by a byte budget that counts each message ([`ENTRY_OVERHEAD_BYTES`] on top of its
/// `bytes`) and each key of the index ([`KEY_OVERHEAD_BYTES`]): the oldest go first.
/// Everything older is read from the log.
///
/// Sans-IO: no clock, no disk; the caller pushes committed messages in order and asks.
#[derive(Debug, Clone)]
pub struct TailCache<F> {
    budget_bytes: usize,
    bytes: usize,
    messages: VecDeque<CachedMessage<F>>,
    /// Per key, the numbers of its cached messages, ascending.
    by_key: HashMap<SubscriptionKey, VecDeque<u64>, foldhash::fast::RandomState>,
    head: u64,
}

impl<F> TailCache<F> {
    /// An empty cache of a log whose newest number is `head` (0 for an empty log).
    pub fn new(budget_bytes: usize, head: u64) -> Self {
        TailCache {
            budget_bytes,
            bytes: 0,
            messages: VecDeque::new(),
            by_key: HashMap::default(),
            head,
        }
    }

    /// Add the next committed message (`head + 1`), then evict the oldest beyond the budget
    /// (possibly this one, if it alone is larger than the budget).
    pub fn push(&mut self, msg: CachedMessage<F>) -> Result<(), GapError> {
        if msg.sequence_number != self.head + 1 {
            return Err(GapError::NotNext {
                head: self.head,
                got: msg.sequence_number,
            });
        }
        self.head = msg.sequence_number;
        self.bytes += msg.bytes + ENTRY_OVERHEAD_BYTES;
        let numbers = self.by_key.entry(msg.key.clone()).or_insert_with(|| {
            self.bytes += KEY_OVERHEAD_BYTES;
            VecDeque::new()
        });
        numbers.push_back(msg.sequence_number);
        self.messages.push_back(msg);
        while self.bytes > self.budget_bytes && !self.messages.is_empty() {
            self.evict_oldest();
        }
        Ok(())
    }

    /// Drop every message numbered below `floor` (the log's retention floor moved past them).
    pub fn evict_below(&mut self, floor: u64) {
        while self
            .messages
            .front()
            .is_some_and(|m| m.sequence_number < floor)
        {
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        let Some(gone) = self.messages.pop_front() else {
            return;
        };
        self.bytes -= gone.bytes + ENTRY_OVERHEAD_BYTES;
        if let Some(seqs) = self.by_key.get_mut(&gone.key) {
            seqs.pop_front();
            if seqs.is_empty() {
                self.by_key.remove(&gone.key);
                self.bytes -= KEY_OVERHEAD_BYTES;
            }
        }
    }

    /// The newest number pushed (or the head given at creation).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The oldest number held; `head + 1` when empty. The cache holds every message numbered
    /// `floor() ..= head()`.
    pub fn floor(&self) -> u64 {
        self.messages
            .front()
            .map_or(self.head + 1, |m| m.sequence_number)
    }

    /// What a cursor needs to know of the cache and the log to pick its next step, with the
    /// log's `retention_floor` (see [`View::cache_covers`]).
    pub fn view(&self, retention_floor: u64) -> View {
        View {
            head: self.head,
            cache_floor: self.floor(),
            retention_floor,
        }
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Bytes charged for what is held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The budget.
    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }

    fn get(&self, sequence_number: u64) -> Option<&CachedMessage<F>> {
        let floor = self.floor();
        if sequence_number < floor {
            return None;
        }
        let index = usize::try_from(sequence_number - floor).ok()?;
        self.messages.get(index)
    }

    /// `key`'s cached messages numbered above `after`, ascending (found through the key index).
    pub fn key_after<'a>(
        &'a self,
        key: &SubscriptionKey,
        after: u64,
    ) -> impl Iterator<Item = &'a CachedMessage<F>> + 'a {
        let seqs = self.by_key.get(key);
        let start = seqs.map_or(0, |s| s.partition_point(|&s| s <= after));
        seqs.into_iter()
            .flat_map(move |s| s.range(start..))
            .filter_map(|&s| self.get(s))
    }

    /// A page of `key`'s cached messages numbered above `after` under `budget` (`bytes_of`
    /// weighs each): it covers up to the head unless the budget cut it. What a cursor takes
    /// from the cache when it joins live delivery.
    pub fn key_page(
        &self,
        key: &SubscriptionKey,
        after: u64,
        budget: ReadBudget,
        bytes_of: impl Fn(&&CachedMessage<F>) -> usize,
    ) -> Page<&CachedMessage<F>> {
        let messages = self.key_after(key, after).map(|m| (m.sequence_number, m));
        budget.fill().page(after, self.head, messages, bytes_of)
    }

    /// Every cached message numbered above `after`, ascending.
    pub fn after(&self, after: u64) -> impl Iterator<Item = &CachedMessage<F>> {
        let start = self
            .messages
            .partition_point(|m| m.sequence_number <= after);
        self.messages.range(start..)
    }

    /// The smallest cached number whose timestamp is at least `min_timestamp_ms`, or None when
    /// no cached message is that new. Timestamps never decrease, so this is a binary search.
    pub fn first_at_or_after(&self, min_timestamp_ms: u64) -> Option<u64> {
        let i = self
            .messages
            .partition_point(|m| m.timestamp_ms < min_timestamp_ms);
        self.messages.get(i).map(|m| m.sequence_number)
    }

    /// The timestamp of the oldest cached message.
    pub(crate) fn oldest_timestamp_ms(&self) -> Option<u64> {
        self.messages.front().map(|m| m.timestamp_ms)
    }

    /// Keys with at least one cached message.
    #[cfg(test)]
    fn key_count(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Every key in the index is charged once, while it has a cached message: messages to ever
    /// new keys stay within the budget with their index slots counted.
    #[test]
    fn each_key_of_the_index_is_counted_in_the_budget() {
        let per_message = 10 + ENTRY_OVERHEAD_BYTES;
        let per_new_key = per_message + KEY_OVERHEAD_BYTES;
        let mut cache: TailCache<()> = TailCache::new(100 * per_new_key, 0);
        let msg = |seq: u64, key: &str| CachedMessage {
            sequence_number: seq,
            key: SubscriptionKey::parse(key).unwrap(),
            timestamp_ms: seq,
            frame: (),
            bytes: 10,
        };
        cache.push(msg(1, "c:a")).unwrap();
        cache.push(msg(2, "c:a")).unwrap();
        assert_eq!(cache.bytes(), 2 * per_message + KEY_OVERHEAD_BYTES);
        for seq in 3..=1000 {
            cache.push(msg(seq, &format!("c:k{seq}"))).unwrap();
            assert!(cache.bytes() <= cache.budget_bytes());
            assert_eq!(
                cache.bytes(),
                cache.len() * per_message + cache.key_count() * KEY_OVERHEAD_BYTES
            );
        }
        assert_eq!((cache.len(), cache.key_count()), (100, 100));
        // A key leaving the index gives its charge back.
        cache.evict_below(1000);
        assert_eq!((cache.len(), cache.key_count()), (1, 1));
        assert_eq!(cache.bytes(), per_new_key);
    }
}
