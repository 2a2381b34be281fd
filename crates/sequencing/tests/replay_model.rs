//! Model-based test of a one-shot read (an HTTP recovery answer): a client pages through a key's
//! messages after `since` by `next_since`, each page a [`Replay`] at the head as it is then,
//! over a simulated log of several keys and message sizes and a [`TailCache`] of random size,
//! under a random [`ReadBudget`] — while publishes and pruning race the reads (between a step
//! being asked for and the log page being read).
//!
//! The properties: every page keeps its budget (count, and bytes unless it is one message); the
//! messages received are the key's, after `since`, strictly increasing, none twice;
//! `next_since` is the last one received; and every message of the key after `since` up to the
//! last page's head is received — except messages the log no longer holds, and then a page
//! said `behind` (`complete: false`).
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use seqcast_protocol::SubscriptionKey;
use seqcast_sequencing::{CachedMessage, ReadBudget, Replay, ReplayStep, TailCache};

const KEYS: [&str; 3] = ["c:a", "c:b", "d:a"];

#[derive(Debug, Clone)]
enum Race {
    Nothing,
    Publish(usize, usize),
    Prune(u64),
}

fn race() -> impl Strategy<Value = Race> {
    prop_oneof![
        4 => Just(Race::Nothing),
        2 => ((0..KEYS.len()), 1usize..60).prop_map(|(k, size)| Race::Publish(k, size)),
        1 => (1u64..6).prop_map(Race::Prune),
    ]
}

struct Log {
    /// (key index, size) of message n at `messages[n - 1]`.
    messages: Vec<(usize, usize)>,
    floor: u64,
    cache: TailCache<()>,
    keys: Vec<SubscriptionKey>,
}

impl Log {
    fn head(&self) -> u64 {
        self.messages.len() as u64
    }

    fn size(&self, seq: u64) -> usize {
        self.messages[seq as usize - 1].1
    }

    fn key_of(&self, seq: u64) -> usize {
        self.messages[seq as usize - 1].0
    }

    fn apply(&mut self, race: &Race) {
        match *race {
            Race::Nothing => {}
            Race::Publish(k, size) => {
                self.messages.push((k, size));
                let seq = self.head();
                let key = self.keys[k].clone();
                let cached = CachedMessage {
                    frame: (),
                    bytes: size,
                    key,
                    sequence_number: seq,
                    timestamp_ms: seq,
                };
                self.cache.push(cached).unwrap();
            }
            Race::Prune(n) => {
                self.floor = (self.floor + n).min(self.head() + 1);
                self.cache.evict_below(self.floor);
            }
        }
    }

    /// One log page as a reader returns it (in one transaction with the floor): the messages
    /// the reader's filter matches (every key, or only `key`) in `(after, through]` still
    /// retained, stopped at `max_events` or once the bytes read reach `max_bytes` (the crossing
    /// one included); covering up to the last one read when stopped, else `through`. The replay
    /// is handed those of `key`.
    fn page(
        &self,
        key: usize,
        every_key: bool,
        after: u64,
        through: u64,
        budget: ReadBudget,
    ) -> (Vec<u64>, u64, u64) {
        let mut read: Vec<u64> = Vec::new();
        let mut bytes = 0;
        let mut covered = through;
        for seq in (after + 1).max(self.floor)..=through {
            if !every_key && self.key_of(seq) != key {
                continue;
            }
            let full = read.len() >= budget.max_events.max(1)
                || (!read.is_empty() && bytes >= budget.max_bytes);
            if full {
                covered = *read.last().unwrap();
                break;
            }
            bytes += self.size(seq);
            read.push(seq);
        }
        let mine = read
            .into_iter()
            .filter(|&s| self.key_of(s) == key)
            .collect();
        (mine, covered, self.floor)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn a_paged_replay_hands_out_every_retained_message_once_within_its_budget(
        log in prop::collection::vec(((0..KEYS.len()), 1usize..60), 0..80),
        cache_msgs in 0usize..30,
        since in 0u64..90,
        key in 0..KEYS.len(),
        every_key in any::<bool>(),
        max_events in 1usize..8,
        max_bytes in 1usize..150,
        races in prop::collection::vec(race(), 1..300),
    ) {
        let budget = ReadBudget { max_events, max_bytes };
        let cache_bytes = cache_msgs * (60 + seqcast_sequencing::ENTRY_OVERHEAD_BYTES);
        let mut w = Log {
            messages: Vec::new(),
            floor: 1,
            cache: TailCache::new(cache_bytes, 0),
            keys: KEYS.iter().map(|k| SubscriptionKey::parse(k).unwrap()).collect(),
        };
        for &(k, size) in &log {
            w.apply(&Race::Publish(k, size));
        }
        // Bounded: the log stops growing once the races are spent, so the paging ends.
        let mut races = races.into_iter();
        let first_since = since;
        let mut since = since;
        let mut last_head = 0;
        let mut received: Vec<u64> = Vec::new();
        let mut behind = false;
        for _ in 0..10_000 {
            let head = w.head();
            last_head = head;
            let mut replay = Replay::new(since.min(head), head, budget);
            let mut page: Vec<u64> = Vec::new();
            loop {
                let step = replay.next_step(w.cache.view(w.floor));
                // What may happen between the step being asked for and it being performed.
                w.apply(&races.next().unwrap_or(Race::Nothing));
                match step {
                    ReplayStep::Done => break,
                    ReplayStep::FromCache { after } => {
                        // Under the lock: the cache may have lost the position meanwhile.
                        if w.cache.view(w.floor).cache_covers(after) {
                            let cached: Vec<(u64, u64)> = w
                                .cache
                                .after(after)
                                .filter(|m| m.key == w.keys[key])
                                .map(|m| (m.sequence_number, m.sequence_number))
                                .collect();
                            page.extend(replay.on_cached(cached, |&s| w.size(s)));
                        }
                    }
                    ReplayStep::ReadLog { after, through, budget } => {
                        let (read, covered, floor) = w.page(key, every_key, after, through, budget);
                        let got = replay.on_log_page(
                            read.into_iter().map(|s| (s, s)),
                            |&s| w.size(s),
                            covered,
                            floor,
                        );
                        page.extend(got);
                    }
                }
            }
            // The page keeps its budget.
            let bytes: usize = page.iter().map(|&s| w.size(s)).sum();
            prop_assert!(page.len() <= max_events, "{} messages over {}", page.len(), max_events);
            prop_assert!(page.len() <= 1 || bytes <= max_bytes, "{} bytes over {}", bytes, max_bytes);
            prop_assert!(page.iter().all(|&s| s <= head), "past the head {}: {:?}", head, page);
            behind |= replay.behind();
            received.extend(&page);
            match replay.next_since() {
                Some(next) => {
                    prop_assert_eq!(Some(next), page.last().copied(), "next_since");
                    since = next;
                }
                None => break,
            }
        }
        prop_assert!(
            received.windows(2).all(|p| p[0] < p[1]),
            "not strictly increasing: {:?}", received
        );
        prop_assert!(
            received.iter().all(|&s| s > first_since && w.key_of(s) == key),
            "not the key's after since: {:?}", received
        );
        // Every message of the key in (since, the last page's head] was received, unless the
        // log no longer holds it — and then a page said behind.
        let missing: Vec<u64> = (first_since + 1..=last_head)
            .filter(|&s| w.key_of(s) == key && !received.contains(&s))
            .collect();
        prop_assert!(
            missing.iter().all(|&s| s < w.floor),
            "retained but missing: {:?} (floor {})", missing, w.floor
        );
        prop_assert!(missing.is_empty() || behind, "missing {:?} without behind", missing);
    }
}
