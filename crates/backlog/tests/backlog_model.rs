//! Property tests: `Backlogs` against a naive model (one Vec of live entries in enqueue order).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;
use seqcast_backlog::{
    BacklogEntry, BacklogLimits, Backlogs, Drained, EnqueueError, EnqueueOutcome, Expired,
    Overflow, OverflowReason,
};
use seqcast_protocol::{Channel, RequestId, SubscriptionKey};

const KEYS: u8 = 4;

fn key(i: u8) -> SubscriptionKey {
    // Two channels, so keys differ by channel as well as by request id.
    let channel = if i.is_multiple_of(2) {
        "search"
    } else {
        "session"
    };
    SubscriptionKey::new(
        Channel::new(channel).unwrap(),
        RequestId::new(format!("req_{i}")).unwrap(),
    )
}

/// The frame names its key and a unique enqueue id, so a leak to another key or a repeated
/// delivery is visible in the payload (numbers alone may legitimately repeat after a drain).
type Frame = (u8, u64);

#[derive(Debug, Clone)]
enum Op {
    /// Enqueue at `counter + gap`; gap 0 repeats the last number handed out (refused if it was
    /// this key's).
    Enqueue {
        key: u8,
        gap: u64,
    },
    /// Enqueue a number at or below this key's newest, counted back from it.
    EnqueueStale {
        key: u8,
        back: u64,
    },
    Drain {
        key: u8,
    },
    Expire,
    Advance(u64),
    /// Clocks can step back; the model must still agree.
    Rewind(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..KEYS, 0u64..3).prop_map(|(key, gap)| Op::Enqueue { key, gap }),
        1 => (0..KEYS, 0u64..3).prop_map(|(key, back)| Op::EnqueueStale { key, back }),
        3 => (0..KEYS).prop_map(|key| Op::Drain { key }),
        2 => Just(Op::Expire),
        3 => (0u64..25).prop_map(Op::Advance),
        1 => (0u64..10).prop_map(Op::Rewind),
    ]
}

#[derive(Debug, Clone)]
struct Live {
    key: u8,
    entry: BacklogEntry<Frame>,
}

struct Model {
    limits: BacklogLimits,
    live: Vec<Live>,
}

fn note(overflow: &mut Vec<Overflow>, k: u8, reason: OverflowReason) {
    match overflow
        .iter_mut()
        .find(|o| o.key == key(k) && o.reason == reason)
    {
        Some(o) => o.dropped += 1,
        None => overflow.push(Overflow {
            key: key(k),
            dropped: 1,
            reason,
        }),
    }
}

impl Model {
    fn count(&self, k: u8) -> usize {
        self.live.iter().filter(|l| l.key == k).count()
    }

    fn expired(&self, at: u64, now: u64) -> bool {
        now.saturating_sub(at) > self.limits.ttl_ms
    }

    fn enqueue(
        &mut self,
        k: u8,
        seq: u64,
        frame: Frame,
        now: u64,
    ) -> Result<EnqueueOutcome, EnqueueError> {
        if let Some(last) = self.live.iter().rev().find(|l| l.key == k)
            && seq <= last.entry.sequence_number
        {
            return Err(EnqueueError::NotIncreasing {
                key: key(k),
                last: last.entry.sequence_number,
                got: seq,
            });
        }
        let created = self.count(k) == 0;
        self.live.push(Live {
            key: k,
            entry: BacklogEntry {
                sequence_number: seq,
                enqueued_at_ms: now,
                frame,
            },
        });
        let mut overflow = Vec::new();
        while self.count(k) > self.limits.per_key {
            let i = self.live.iter().position(|l| l.key == k).unwrap();
            self.live.remove(i);
            note(&mut overflow, k, OverflowReason::PerKey);
        }
        while self.live.len() > self.limits.total {
            let gone = self.live.remove(0);
            note(&mut overflow, gone.key, OverflowReason::Total);
        }
        Ok(EnqueueOutcome {
            created,
            backlog_size: self.count(k),
            overflow,
        })
    }

    fn drain(&mut self, k: u8, now: u64) -> Drained<Frame> {
        let (mine, rest): (Vec<Live>, Vec<Live>) = self.live.drain(..).partition(|l| l.key == k);
        self.live = rest;
        let expired = mine
            .iter()
            .filter(|l| self.expired(l.entry.enqueued_at_ms, now))
            .count();
        let entries = mine
            .into_iter()
            .filter(|l| !self.expired(l.entry.enqueued_at_ms, now))
            .map(|l| l.entry)
            .collect();
        Drained { entries, expired }
    }

    fn expire(&mut self, now: u64) -> Vec<Expired> {
        let mut counts: BTreeMap<SubscriptionKey, usize> = BTreeMap::new();
        while self
            .live
            .first()
            .is_some_and(|l| self.expired(l.entry.enqueued_at_ms, now))
        {
            let gone = self.live.remove(0);
            *counts.entry(key(gone.key)).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(key, count)| Expired { key, count })
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn backlogs_match_naive_model(
        per_key in 0usize..5,
        total in 0usize..9,
        ttl_ms in 0u64..50,
        ops in proptest::collection::vec(op(), 0..150),
    ) {
        let limits = BacklogLimits { per_key, total, ttl_ms };
        let mut backlogs: Backlogs<Frame> = Backlogs::new(limits);
        let mut model = Model { limits, live: Vec::new() };
        let mut now = 1_000u64;
        let mut counter = 0u64;
        let mut enqueue_id = 0u64;
        let mut delivered: HashSet<Frame> = HashSet::new();

        for op in ops {
            match op {
                Op::Enqueue { key: k, gap } => {
                    counter += gap;
                    enqueue_id += 1;
                    let got = backlogs.enqueue(&key(k), counter, (k, enqueue_id), now);
                    prop_assert_eq!(got, model.enqueue(k, counter, (k, enqueue_id), now));
                }
                Op::EnqueueStale { key: k, back } => {
                    let Some(last) = model.live.iter().rev().find(|l| l.key == k).map(|l| l.entry.sequence_number) else { continue };
                    let seq = last.saturating_sub(back);
                    let got = backlogs.enqueue(&key(k), seq, (k, u64::MAX), now);
                    prop_assert_eq!(got, Err(EnqueueError::NotIncreasing { key: key(k), last, got: seq }));
                }
                Op::Drain { key: k } => {
                    let drained = backlogs.drain(&key(k), now);
                    for entry in &drained.entries {
                        prop_assert_eq!(entry.frame.0, k, "drain of key {} returned another key's message", k);
                        prop_assert!(delivered.insert(entry.frame), "{:?} delivered twice", entry.frame);
                    }
                    prop_assert!(drained.entries.windows(2).all(|w| w[0].sequence_number < w[1].sequence_number));
                    prop_assert_eq!(drained, model.drain(k, now));
                    prop_assert_eq!(backlogs.key_len(&key(k)), 0);
                }
                Op::Expire => prop_assert_eq!(backlogs.expire(now), model.expire(now)),
                Op::Advance(ms) => now += ms,
                Op::Rewind(ms) => now -= ms,
            }
            prop_assert!(backlogs.len() <= total);
            prop_assert_eq!(backlogs.len(), model.live.len());
            prop_assert_eq!(backlogs.is_empty(), model.live.is_empty());
            let mut keys_with_entries = 0;
            for k in 0..KEYS {
                let n = backlogs.key_len(&key(k));
                prop_assert!(n <= per_key);
                prop_assert_eq!(n, model.count(k));
                keys_with_entries += usize::from(n > 0);
            }
            // Empty backlogs leave no map entry behind.
            prop_assert_eq!(backlogs.key_count(), keys_with_entries);
        }
    }
}
