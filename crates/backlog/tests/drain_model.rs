//! `plan_drain` against a naive model: with a random log (keys and non-decreasing timestamps),
//! the messages a plan drains are exactly the key's retained messages within the TTL, at most
//! the newest `per_key`, and the skipped ranges hold exactly the rest.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use seqcast_backlog::{BacklogLimits, KeyHistory, plan_drain};

#[derive(Debug, Clone)]
struct Log {
    /// (key index, timestamp), numbered from 1.
    events: Vec<(u8, u64)>,
    floor: u64,
}

fn log() -> impl Strategy<Value = Log> {
    prop::collection::vec((0u8..3, 0u64..5), 0..60).prop_flat_map(|steps| {
        let mut ts = 1_000;
        let events: Vec<(u8, u64)> = steps
            .into_iter()
            .map(|(k, dt)| {
                ts += dt;
                (k, ts)
            })
            .collect();
        let n = events.len() as u64;
        (Just(events), 1..=n + 1).prop_map(|(events, floor)| Log { events, floor })
    })
}

proptest! {
    #[test]
    fn a_plan_drains_exactly_the_keys_recent_messages(
        log in log(), key in 0u8..3, per_key in 1usize..8, ttl in 0u64..40, now_extra in 0u64..20,
    ) {
        let head = log.events.len() as u64;
        let now = log.events.last().map_or(1_000, |e| e.1) + now_extra;
        let numbered: Vec<(u64, u8, u64)> = log.events.iter().enumerate()
            .map(|(i, &(k, t))| (i as u64 + 1, k, t))
            .filter(|&(s, _, _)| s >= log.floor)
            .collect();
        // Naive expectation.
        let fresh: Vec<u64> = numbered.iter()
            .filter(|&&(_, k, t)| k == key && now.saturating_sub(t) <= ttl)
            .map(|&(s, _, _)| s).collect();
        let expected: Vec<u64> = fresh[fresh.len().saturating_sub(per_key)..].to_vec();
        let expired_expected: Vec<u64> = numbered.iter()
            .filter(|&&(_, k, t)| k == key && now.saturating_sub(t) > ttl)
            .map(|&(s, _, _)| s).collect();
        let overflow_expected: Vec<u64> = fresh[..fresh.len().saturating_sub(per_key)].to_vec();

        // What the shell would read from the log.
        let ttl_start = numbered.iter().find(|&&(_, _, t)| now.saturating_sub(t) <= ttl).map(|e| e.0);
        let of_key: Vec<u64> = numbered.iter().filter(|e| e.1 == key).map(|e| e.0).collect();
        let nth_newest = of_key.len().checked_sub(per_key).map(|i| of_key[i]);
        let plan = plan_drain(
            BacklogLimits { per_key, ttl_ms: ttl },
            KeyHistory { head, retention_floor: log.floor, ttl_start, nth_newest },
        );
        let in_range = |r: Option<(u64, u64)>| -> Vec<u64> {
            r.map_or(Vec::new(), |(a, b)| of_key.iter().copied().filter(|&s| s > a && s <= b).collect())
        };
        let drained: Vec<u64> = of_key.iter().copied().filter(|&s| s > plan.after).collect();
        prop_assert_eq!(drained, expected);
        prop_assert_eq!(in_range(plan.expired), expired_expected);
        prop_assert_eq!(in_range(plan.overflow), overflow_expected);
    }
}

#[test]
fn an_empty_log_drains_nothing() {
    let plan = plan_drain(
        BacklogLimits::default(),
        KeyHistory {
            head: 0,
            retention_floor: 1,
            ttl_start: None,
            nth_newest: None,
        },
    );
    assert_eq!(plan.after, 0);
    assert_eq!(plan.expired, None);
    assert_eq!(plan.overflow, None);
}

#[test]
fn nothing_within_the_ttl_starts_at_the_head() {
    let plan = plan_drain(
        BacklogLimits {
            per_key: 10,
            ttl_ms: 1,
        },
        KeyHistory {
            head: 50,
            retention_floor: 1,
            ttl_start: None,
            nth_newest: None,
        },
    );
    assert_eq!(plan.after, 50);
    assert_eq!(plan.expired, Some((0, 50)));
}
