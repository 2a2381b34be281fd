//! Property tests: `RecoveryWindow` against a naive model that keeps everything ever inserted.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use seqcast_protocol::{Channel, RequestId, SubscriptionKey};
use seqcast_sequencing::{InsertError, RecoveryWindow, RetainedMessage, WindowLimits};

fn key(i: u8) -> SubscriptionKey {
    SubscriptionKey::new(
        Channel::new("search").unwrap(),
        RequestId::new(format!("req_{i}")).unwrap(),
    )
}

#[derive(Debug, Clone, Copy)]
enum Filter {
    All,
    Key(u8),
    SeqMod(u64, u64),
}

impl Filter {
    fn accepts(self, m: &RetainedMessage<u64>) -> bool {
        match self {
            Filter::All => true,
            Filter::Key(k) => m.key == key(k),
            Filter::SeqMod(modulus, rest) => m.sequence_number % modulus == rest,
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Insert at `head + gap` (gap 0 is a duplicate and must be refused), stamped `now - age`.
    Insert {
        gap: u64,
        key: u8,
        age: u64,
    },
    /// Insert a number at or below the head, counted back from it.
    InsertStale {
        back: u64,
    },
    Advance(u64),
    Expire,
    /// `since` relative to the head: `head + 3 - offset` (saturating), so some exceed the head.
    Since {
        offset: u64,
        limit: usize,
        filter: Filter,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let filter = prop_oneof![
        Just(Filter::All),
        (0u8..3).prop_map(Filter::Key),
        (2u64..4)
            .prop_flat_map(|m| (Just(m), 0..m))
            .prop_map(|(m, r)| Filter::SeqMod(m, r)),
    ];
    prop_oneof![
        6 => (0u64..4, 0u8..3, prop_oneof![3 => Just(0u64), 1 => 0u64..40]).prop_map(|(gap, key, age)| Op::Insert { gap, key, age }),
        1 => (0u64..5).prop_map(|back| Op::InsertStale { back }),
        2 => (0u64..30).prop_map(Op::Advance),
        1 => Just(Op::Expire),
        4 => (0u64..40, 0usize..8, filter).prop_map(|(offset, limit, filter)| Op::Since { offset, limit, filter }),
    ]
}

/// Everything ever inserted plus how many of the oldest have been evicted.
struct Model {
    limits: WindowLimits,
    floor: u64,
    all: Vec<RetainedMessage<u64>>,
    evicted: usize,
}

impl Model {
    fn head(&self) -> u64 {
        self.all.last().map_or(self.floor, |m| m.sequence_number)
    }

    fn retained(&self) -> &[RetainedMessage<u64>] {
        &self.all[self.evicted..]
    }

    fn insert(&mut self, msg: RetainedMessage<u64>, now: u64) -> Result<(), InsertError> {
        if msg.sequence_number <= self.head() {
            return Err(InsertError::NotIncreasing {
                last: self.head(),
                got: msg.sequence_number,
            });
        }
        self.all.push(msg);
        while self.retained().len() > self.limits.max_messages {
            self.evicted += 1;
        }
        self.expire(now);
        Ok(())
    }

    fn expire(&mut self, now: u64) -> usize {
        let before = self.evicted;
        while let Some(m) = self.retained().first() {
            let age = now.saturating_sub(m.timestamp_ms);
            if age <= self.limits.max_age_ms {
                break;
            }
            self.evicted += 1;
        }
        self.evicted - before
    }

    /// (messages, complete, oldest, next_since), computed by scanning.
    fn since(
        &self,
        since: u64,
        limit: usize,
        filter: Filter,
    ) -> (Vec<u64>, bool, Option<u64>, Option<u64>) {
        let matching: Vec<u64> = self
            .retained()
            .iter()
            .filter(|m| m.sequence_number > since && filter.accepts(m))
            .map(|m| m.sequence_number)
            .collect();
        let page: Vec<u64> = matching.iter().copied().take(limit).collect();
        let next_since = (matching.len() > limit).then(|| page.last().copied().unwrap_or(since));
        let every_inserted_is_held =
            self.all
                .iter()
                .filter(|m| m.sequence_number > since)
                .all(|m| {
                    self.retained()
                        .iter()
                        .any(|r| r.sequence_number == m.sequence_number)
                });
        let complete = since >= self.floor && since <= self.head() && every_inserted_is_held;
        (
            page,
            complete,
            self.retained().first().map(|m| m.sequence_number),
            next_since,
        )
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn window_matches_naive_model(
        max_messages in 0usize..8,
        max_age_ms in 0u64..60,
        floor in prop_oneof![Just(0u64), 0u64..10],
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        let limits = WindowLimits { max_messages, max_age_ms };
        let mut window = RecoveryWindow::with_floor(limits, floor);
        let mut model = Model { limits, floor, all: Vec::new(), evicted: 0 };
        let mut now = 1_000u64;
        let mut frame = 0u64;

        for op in ops {
            match op {
                Op::Insert { gap, key: k, age } => {
                    frame += 1;
                    let msg = RetainedMessage { sequence_number: model.head() + gap, key: key(k), timestamp_ms: now - age, frame };
                    prop_assert_eq!(window.insert(msg.clone(), now), model.insert(msg, now));
                }
                Op::InsertStale { back } => {
                    let head = window.head();
                    let got = head.saturating_sub(back);
                    let msg = RetainedMessage { sequence_number: got, key: key(0), timestamp_ms: now, frame: 0 };
                    prop_assert_eq!(window.insert(msg, now), Err(InsertError::NotIncreasing { last: head, got }));
                }
                Op::Advance(ms) => now += ms,
                Op::Expire => prop_assert_eq!(window.expire(now), model.expire(now)),
                Op::Since { offset, limit, filter } => {
                    let since = (model.head() + 3).saturating_sub(offset);
                    let page = window.since(since, limit, |m| filter.accepts(m));
                    let (messages, complete, oldest, next_since) = model.since(since, limit, filter);
                    let got: Vec<u64> = page.messages.iter().map(|m| m.sequence_number).collect();
                    prop_assert_eq!(&got, &messages);
                    // Content, not just numbers: each reference is the message inserted under it.
                    for m in &page.messages {
                        let original = model.all.iter().find(|o| o.sequence_number == m.sequence_number).unwrap();
                        prop_assert_eq!(*m, original);
                    }
                    prop_assert_eq!(page.complete, complete, "since {} head {} evicted_through {}", since, window.head(), window.evicted_through());
                    prop_assert_eq!(page.oldest_sequence, oldest);
                    prop_assert_eq!(page.next_since, next_since);
                }
            }
            prop_assert!(window.len() <= max_messages);
            prop_assert_eq!(window.len(), model.retained().len());
            prop_assert_eq!(window.head(), model.head());
            prop_assert_eq!(window.oldest_sequence(), model.retained().first().map(|m| m.sequence_number));
            prop_assert_eq!(window.is_empty(), model.retained().is_empty());
        }
    }

    /// Paging with `next_since` visits every matching message exactly once, in order.
    #[test]
    fn paging_with_next_since_visits_each_match_once(
        count in 0u64..60,
        limit in 1usize..7,
        modulus in 1u64..4,
        since in 0u64..20,
    ) {
        let mut window = RecoveryWindow::new(WindowLimits { max_messages: 100, max_age_ms: 1_000 });
        for n in 1..=count {
            window.insert(RetainedMessage { sequence_number: n * 2, key: key(0), timestamp_ms: 0, frame: n }, 0).unwrap();
        }
        let mut cursor = since;
        let mut seen = Vec::new();
        loop {
            let page = window.since(cursor, limit, |m| m.frame % modulus == 0);
            prop_assert!(page.messages.len() <= limit);
            seen.extend(page.messages.iter().map(|m| m.sequence_number));
            match page.next_since {
                Some(next) => { prop_assert!(next > cursor); cursor = next; }
                None => break,
            }
        }
        let expected: Vec<u64> = (1..=count).filter(|n| n % modulus == 0).map(|n| n * 2).filter(|s| *s > since).collect();
        prop_assert_eq!(seen, expected);
    }
}
