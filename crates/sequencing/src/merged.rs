//! Keys resumed together and read as one: one cursor over the union of their keys, from the
//! smallest position, each key's message handed out only above that key's own position (a key
//! resumed from a higher `since` never gets what it already had).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use seqcast_protocol::SubscriptionKey;

use crate::budget::{Page, ReadBudget};
use crate::tail::{CachedMessage, TailCache};

/// The positions of keys read together (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPositions {
    positions: HashMap<SubscriptionKey, u64>,
}

impl KeyPositions {
    /// Each key with its position (a key given twice keeps the larger).
    pub fn new(keys: impl IntoIterator<Item = (SubscriptionKey, u64)>) -> Self {
        let mut positions = HashMap::new();
        for (key, after) in keys {
            let p: &mut u64 = positions.entry(key).or_insert(after);
            *p = (*p).max(after);
        }
        KeyPositions { positions }
    }

    /// The smallest position: where the merged read starts (0 without keys).
    pub fn min_after(&self) -> u64 {
        self.positions.values().copied().min().unwrap_or(0)
    }

    /// Whether message `sequence_number` of `key` is handed out: `key` is one of them and the
    /// number is above its position.
    pub fn wants(&self, key: &SubscriptionKey, sequence_number: u64) -> bool {
        self.positions
            .get(key)
            .is_some_and(|&after| sequence_number > after)
    }

    /// The keys and their positions.
    pub fn iter(&self) -> impl Iterator<Item = (&SubscriptionKey, u64)> {
        self.positions.iter().map(|(k, &a)| (k, a))
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

impl<F> TailCache<F> {
    /// A page of the cached messages of every key in `keys` above its own position, merged in
    /// global order under `budget`: it covers up to the head unless the budget cut it. What
    /// keys resumed together take from the cache when they join live delivery in one step.
    /// Found through the key index (a merge of the keys' runs), not by scanning the cache.
    pub fn merged_page(
        &self,
        keys: &KeyPositions,
        budget: ReadBudget,
        bytes_of: impl Fn(&&CachedMessage<F>) -> usize,
    ) -> Page<&CachedMessage<F>> {
        let mut runs: Vec<_> = keys
            .iter()
            .map(|(key, after)| self.key_after(key, after).peekable())
            .collect();
        let mut heap: BinaryHeap<Reverse<(u64, usize)>> = runs
            .iter_mut()
            .enumerate()
            .filter_map(|(i, run)| run.peek().map(|m| Reverse((m.sequence_number, i))))
            .collect();
        let merged = std::iter::from_fn(move || {
            let Reverse((_, i)) = heap.pop()?;
            let m = runs[i].next()?;
            if let Some(next) = runs[i].peek() {
                heap.push(Reverse((next.sequence_number, i)));
            }
            Some((m.sequence_number, m))
        });
        budget
            .fill()
            .page(keys.min_after(), self.head(), merged, bytes_of)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(s: &str) -> SubscriptionKey {
        SubscriptionKey::parse(s).unwrap()
    }

    #[test]
    fn a_merged_page_is_in_global_order_and_respects_each_position() {
        let mut cache: TailCache<()> = TailCache::new(1 << 20, 0);
        let owners = ["c:a", "c:b", "c:a", "c:x", "c:b", "c:a", "c:b"];
        for (i, k) in owners.iter().enumerate() {
            cache
                .push(CachedMessage {
                    sequence_number: i as u64 + 1,
                    key: key(k),
                    timestamp_ms: 0,
                    frame: (),
                    bytes: 1,
                })
                .unwrap();
        }
        let keys = KeyPositions::new([(key("c:a"), 0), (key("c:b"), 4)]);
        assert!(keys.wants(&key("c:a"), 1) && !keys.wants(&key("c:b"), 2));
        let all = ReadBudget {
            max_events: 10,
            max_bytes: 100,
        };
        let page = cache.merged_page(&keys, all, |_| 1);
        let seqs: Vec<u64> = page.items.iter().map(|m| m.sequence_number).collect();
        assert_eq!(seqs, [1, 3, 5, 6, 7]);
        assert_eq!(page.covered_through, 7);
        let two = ReadBudget {
            max_events: 2,
            max_bytes: 100,
        };
        let page = cache.merged_page(&keys, two, |_| 1);
        assert_eq!(page.covered_through, 3, "cut after its second message");
    }
}
