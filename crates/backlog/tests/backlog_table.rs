//! Table tests for the late-subscriber backlogs (seed 003).
#![allow(clippy::unwrap_used)]

use seqcast_backlog::{
    BacklogEntry, BacklogLimits, Backlogs, EnqueueError, EnqueueOutcome, Expired, Overflow,
    OverflowReason,
};
use seqcast_protocol::SubscriptionKey;

fn key(s: &str) -> SubscriptionKey {
    SubscriptionKey::parse(s).unwrap()
}

fn numbers(entries: &[BacklogEntry<&'static str>]) -> Vec<u64> {
    entries.iter().map(|e| e.sequence_number).collect()
}

fn limits(per_key: usize, total: usize, ttl_ms: u64) -> BacklogLimits {
    BacklogLimits {
        per_key,
        total,
        ttl_ms,
    }
}

#[test]
fn defaults() {
    assert_eq!(BacklogLimits::default(), limits(1_000, 100_000, 120_000));
}

#[test]
fn seed_003_drain_of_req_b_leaves_req_a_untouched() {
    let mut backlogs = Backlogs::new(BacklogLimits::default());
    let (a, b) = (key("search:req_A"), key("search:req_B"));
    for seq in 1..=5 {
        backlogs.enqueue(&a, seq, "A", 0).unwrap();
    }
    for seq in 6..=8 {
        backlogs.enqueue(&b, seq, "B", 0).unwrap();
    }

    let drained = backlogs.drain(&b, 10);
    assert_eq!(numbers(&drained.entries), vec![6, 7, 8]);
    assert!(drained.entries.iter().all(|e| e.frame == "B"));
    assert_eq!(drained.expired, 0);
    // req_A keeps its backlog until it expires; req_B is gone and frees its slot.
    assert_eq!(backlogs.key_len(&a), 5);
    assert_eq!(backlogs.key_len(&b), 0);
    assert_eq!((backlogs.len(), backlogs.key_count()), (5, 1));
    // A second drain never hands the same messages out again.
    assert!(backlogs.drain(&b, 10).entries.is_empty());
}

#[test]
fn keys_that_differ_only_by_channel_are_separate() {
    let mut backlogs = Backlogs::new(BacklogLimits::default());
    backlogs
        .enqueue(&key("search:req_1"), 1, "search", 0)
        .unwrap();
    backlogs
        .enqueue(&key("session:req_1"), 2, "session", 0)
        .unwrap();
    let drained = backlogs.drain(&key("session:req_1"), 0);
    assert_eq!(numbers(&drained.entries), vec![2]);
    assert_eq!(backlogs.key_len(&key("search:req_1")), 1);
}

#[test]
fn drain_of_unknown_key_is_empty() {
    let mut backlogs: Backlogs<&str> = Backlogs::new(BacklogLimits::default());
    backlogs.enqueue(&key("search:req_A"), 1, "A", 0).unwrap();
    let drained = backlogs.drain(&key("search:nobody"), 0);
    assert!(drained.entries.is_empty());
    assert_eq!(drained.expired, 0);
    assert_eq!(backlogs.len(), 1);
}

#[test]
fn enqueue_reports_creation_and_size() {
    let mut backlogs = Backlogs::new(BacklogLimits::default());
    let a = key("search:req_A");
    let first = backlogs.enqueue(&a, 1, "x", 0).unwrap();
    assert_eq!(
        first,
        EnqueueOutcome {
            created: true,
            backlog_size: 1,
            overflow: vec![]
        }
    );
    let second = backlogs.enqueue(&a, 2, "y", 0).unwrap();
    assert_eq!(
        second,
        EnqueueOutcome {
            created: false,
            backlog_size: 2,
            overflow: vec![]
        }
    );
    backlogs.drain(&a, 0);
    // After a drain the key starts a new backlog.
    assert!(backlogs.enqueue(&a, 3, "z", 0).unwrap().created);
}

#[test]
fn enqueue_refuses_numbers_that_do_not_increase_per_key() {
    let mut backlogs = Backlogs::new(BacklogLimits::default());
    let (a, b) = (key("search:req_A"), key("search:req_B"));
    backlogs.enqueue(&a, 5, "x", 0).unwrap();
    for got in [5, 4] {
        assert_eq!(
            backlogs.enqueue(&a, got, "x", 0),
            Err(EnqueueError::NotIncreasing {
                key: a.clone(),
                last: 5,
                got
            })
        );
    }
    // The order is per key: another key may take a lower number.
    backlogs.enqueue(&b, 3, "y", 0).unwrap();
    assert_eq!(backlogs.len(), 2);
}

#[test]
fn per_key_overflow_drops_that_keys_oldest() {
    let mut backlogs = Backlogs::new(limits(2, 100, 1_000));
    let (a, b) = (key("search:req_A"), key("search:req_B"));
    backlogs.enqueue(&b, 1, "b", 0).unwrap();
    backlogs.enqueue(&a, 2, "a", 0).unwrap();
    backlogs.enqueue(&a, 3, "a", 0).unwrap();
    let outcome = backlogs.enqueue(&a, 4, "a", 0).unwrap();
    assert_eq!(
        outcome,
        EnqueueOutcome {
            created: false,
            backlog_size: 2,
            overflow: vec![Overflow {
                key: a.clone(),
                dropped: 1,
                reason: OverflowReason::PerKey
            }],
        }
    );
    assert_eq!(numbers(&backlogs.drain(&a, 0).entries), vec![3, 4]);
    assert_eq!(numbers(&backlogs.drain(&b, 0).entries), vec![1]);
}

#[test]
fn total_overflow_drops_the_global_oldest_of_another_key() {
    let mut backlogs = Backlogs::new(limits(10, 3, 1_000));
    let (a, b) = (key("search:req_A"), key("search:req_B"));
    backlogs.enqueue(&a, 1, "a", 0).unwrap();
    backlogs.enqueue(&b, 2, "b", 0).unwrap();
    backlogs.enqueue(&a, 3, "a", 0).unwrap();
    let outcome = backlogs.enqueue(&b, 4, "b", 0).unwrap();
    assert_eq!(
        outcome.overflow,
        vec![Overflow {
            key: a.clone(),
            dropped: 1,
            reason: OverflowReason::Total
        }]
    );
    assert_eq!(outcome.backlog_size, 2);
    assert_eq!(backlogs.len(), 3);
    assert_eq!(numbers(&backlogs.drain(&a, 0).entries), vec![3]);
    assert_eq!(numbers(&backlogs.drain(&b, 0).entries), vec![2, 4]);
}

#[test]
fn total_overflow_removes_a_key_it_empties() {
    let mut backlogs = Backlogs::new(limits(10, 1, 1_000));
    let (a, b) = (key("search:req_A"), key("search:req_B"));
    backlogs.enqueue(&a, 1, "a", 0).unwrap();
    backlogs.enqueue(&b, 2, "b", 0).unwrap();
    assert_eq!(backlogs.key_len(&a), 0);
    assert_eq!(backlogs.key_count(), 1);
}

#[test]
fn zero_limits_keep_nothing() {
    let mut backlogs = Backlogs::new(limits(0, 10, 1_000));
    let a = key("search:req_A");
    let outcome = backlogs.enqueue(&a, 1, "a", 0).unwrap();
    assert_eq!(outcome.backlog_size, 0);
    assert_eq!(
        outcome.overflow,
        vec![Overflow {
            key: a,
            dropped: 1,
            reason: OverflowReason::PerKey
        }]
    );
    assert!(backlogs.is_empty());
    assert_eq!(backlogs.key_count(), 0);
}

#[test]
fn drain_discards_entries_past_ttl() {
    let mut backlogs = Backlogs::new(limits(10, 100, 1_000));
    let a = key("search:req_A");
    backlogs.enqueue(&a, 1, "old", 0).unwrap();
    backlogs.enqueue(&a, 2, "edge", 500).unwrap();
    backlogs.enqueue(&a, 3, "new", 1_400).unwrap();
    // At 1 500: entry 1 is 1 500 ms old (gone), entry 2 exactly 1 000 ms (kept).
    let drained = backlogs.drain(&a, 1_500);
    assert_eq!(numbers(&drained.entries), vec![2, 3]);
    assert_eq!(drained.expired, 1);
    assert!(backlogs.is_empty());
}

#[test]
fn expire_drops_old_entries_of_every_key_and_removes_empty_backlogs() {
    let mut backlogs = Backlogs::new(limits(10, 100, 1_000));
    let (a, b, c) = (
        key("search:req_A"),
        key("search:req_B"),
        key("search:req_C"),
    );
    backlogs.enqueue(&b, 1, "b", 0).unwrap();
    backlogs.enqueue(&a, 2, "a", 0).unwrap();
    backlogs.enqueue(&a, 3, "a", 100).unwrap();
    backlogs.enqueue(&c, 4, "c", 900).unwrap();
    backlogs.enqueue(&a, 5, "a", 900).unwrap();

    assert_eq!(backlogs.expire(1_000), vec![]);
    let expired = backlogs.expire(1_101);
    assert_eq!(
        expired,
        vec![
            Expired {
                key: a.clone(),
                count: 2
            },
            Expired {
                key: b.clone(),
                count: 1
            }
        ]
    );
    assert_eq!(backlogs.key_len(&a), 1);
    assert_eq!(backlogs.key_count(), 2, "req_B is empty and freed");
    assert_eq!(backlogs.expire(5_000).len(), 2);
    assert!(backlogs.is_empty());
    assert_eq!(backlogs.key_count(), 0);
}

#[test]
fn memory_stays_bounded_under_many_keys() {
    let mut backlogs = Backlogs::new(limits(3, 50, 1_000));
    for seq in 1..=10_000u64 {
        let k = key(&format!("search:req_{}", seq % 997));
        backlogs.enqueue(&k, seq, "x", seq).unwrap();
        assert!(backlogs.len() <= 50);
    }
    assert!(backlogs.key_count() <= 50);
    // Everything left is among the 50 newest.
    let mut left = Vec::new();
    for r in 0..997 {
        left.extend(numbers(
            &backlogs
                .drain(&key(&format!("search:req_{r}")), 10_000)
                .entries,
        ));
    }
    left.sort_unstable();
    assert_eq!(left, (9_951..=10_000).collect::<Vec<_>>());
    assert_eq!(backlogs.key_count(), 0);
}
