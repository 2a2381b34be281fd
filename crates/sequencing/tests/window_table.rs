//! Table tests for the recovery window: the acceptance criteria of story 25.13 (seeds 000/001).
#![allow(clippy::unwrap_used)]

use seqcast_protocol::{Channel, RequestId, SubscriptionKey};
use seqcast_sequencing::{InsertError, RecoveryWindow, RetainedMessage, WindowLimits};

fn key(request: &str) -> SubscriptionKey {
    SubscriptionKey::new(
        Channel::new("search").unwrap(),
        RequestId::new(request).unwrap(),
    )
}

fn msg(sequence_number: u64, timestamp_ms: u64) -> RetainedMessage<String> {
    RetainedMessage {
        sequence_number,
        key: key("req_A"),
        timestamp_ms,
        frame: format!("frame {sequence_number}"),
    }
}

/// A window holding `1..=n`, all stamped at time 0.
fn filled(limits: WindowLimits, n: u64) -> RecoveryWindow<String> {
    let mut window = RecoveryWindow::new(limits);
    for s in 1..=n {
        window.insert(msg(s, 0), 0).unwrap();
    }
    window
}

fn numbers(page: &seqcast_sequencing::RecoveryPage<'_, String>) -> Vec<u64> {
    page.messages.iter().map(|m| m.sequence_number).collect()
}

#[test]
fn defaults_are_the_seed_window() {
    assert_eq!(
        WindowLimits::default(),
        WindowLimits {
            max_messages: 500,
            max_age_ms: 900_000
        }
    );
}

#[test]
fn ac2_returns_only_messages_after_since_with_their_frames() {
    let window = filled(WindowLimits::default(), 3);
    let page = window.since(1, usize::MAX, |_| true);
    assert_eq!(numbers(&page), vec![2, 3]);
    // Recovery hands back the same number and frame that live delivery used (seed 000).
    assert_eq!(page.messages[0].frame, "frame 2");
    assert!(page.complete);
    assert_eq!(page.oldest_sequence, Some(1));
    assert_eq!(page.next_since, None);
}

#[test]
fn ac3_nothing_new_is_empty_and_complete() {
    let window = filled(WindowLimits::default(), 3);
    let page = window.since(3, 100, |_| true);
    assert!(page.messages.is_empty());
    assert!(page.complete);
    assert_eq!(page.next_since, None);

    let empty: RecoveryWindow<String> = RecoveryWindow::new(WindowLimits::default());
    let page = empty.since(0, 100, |_| true);
    assert!(page.messages.is_empty());
    assert!(page.complete, "a fresh history has missed nothing");
    assert_eq!(page.oldest_sequence, None);
}

#[test]
fn ac4_overflow_keeps_the_newest_500_and_reports_incomplete() {
    let window = filled(WindowLimits::default(), 501);
    assert_eq!(window.len(), 500);
    let page = window.since(0, usize::MAX, |_| true);
    assert_eq!(numbers(&page), (2..=501).collect::<Vec<_>>());
    assert!(
        !page.complete,
        "message 1 is gone, so since=0 cannot be answered fully"
    );
    assert_eq!(page.oldest_sequence, Some(2));
    assert_eq!(window.evicted_through(), 1);
    // From the evicted number on, the answer is complete again.
    assert!(window.since(1, 10, |_| true).complete);
}

#[test]
fn ac5_age_eviction_uses_injected_time() {
    let limits = WindowLimits {
        max_messages: 500,
        max_age_ms: 900_000,
    };
    let mut window = RecoveryWindow::new(limits);
    window.insert(msg(1, 0), 0).unwrap();
    window.insert(msg(2, 100_000), 100_000).unwrap();
    window.insert(msg(3, 950_000), 950_000).unwrap();
    // At 950 s message 1 is 950 s old: inserting 3 evicted it; 2 (850 s) stays.
    assert_eq!(window.oldest_sequence(), Some(2));

    // Exactly max_age old is still kept; one ms more is not.
    assert_eq!(window.expire(1_000_000), 0);
    assert_eq!(window.expire(1_000_001), 1);
    let page = window.since(0, 10, |_| true);
    assert_eq!(numbers(&page), vec![3]);
    assert!(!page.complete);
    assert!(window.since(2, 10, |_| true).complete);

    assert_eq!(window.expire(10_000_000), 1);
    assert!(window.is_empty());
    let page = window.since(3, 10, |_| true);
    assert!(page.complete && page.messages.is_empty() && page.oldest_sequence.is_none());
}

#[test]
fn with_floor_reports_history_before_the_restart_as_incomplete() {
    let mut window = RecoveryWindow::with_floor(WindowLimits::default(), 100);
    assert_eq!(window.head(), 100);
    assert_eq!(window.evicted_through(), 100);
    assert_eq!(
        window.insert(msg(100, 0), 0),
        Err(InsertError::NotIncreasing {
            last: 100,
            got: 100
        })
    );
    window.insert(msg(101, 0), 0).unwrap();

    let page = window.since(50, 10, |_| true);
    assert_eq!(numbers(&page), vec![101]);
    assert!(
        !page.complete,
        "51..=100 were published before this window existed"
    );
    let page = window.since(100, 10, |_| true);
    assert_eq!(numbers(&page), vec![101]);
    assert!(page.complete);
}

#[test]
fn since_beyond_head_is_incomplete() {
    // A client from a wiped store asks for numbers this history never issued.
    let window = filled(WindowLimits::default(), 5);
    let page = window.since(6, 10, |_| true);
    assert!(page.messages.is_empty());
    assert!(!page.complete);
    assert!(!window.since(u64::MAX, 10, |_| true).complete);
}

#[test]
fn insert_refuses_numbers_not_above_the_head() {
    let mut window = filled(WindowLimits::default(), 3);
    for got in [0, 2, 3] {
        assert_eq!(
            window.insert(msg(got, 0), 0),
            Err(InsertError::NotIncreasing { last: 3, got })
        );
    }
    assert_eq!(window.len(), 3);
    // Gaps are allowed: the caller may skip numbers it does not retain.
    window.insert(msg(10, 0), 0).unwrap();
    assert_eq!(numbers(&window.since(3, 10, |_| true)), vec![10]);
    assert!(window.since(5, 10, |_| true).complete);
}

#[test]
fn limit_and_filter_page_through_one_key() {
    let mut window = RecoveryWindow::new(WindowLimits::default());
    for s in 1..=6 {
        let request = if s % 2 == 0 { "req_B" } else { "req_A" };
        window
            .insert(
                RetainedMessage {
                    sequence_number: s,
                    key: key(request),
                    timestamp_ms: 0,
                    frame: String::new(),
                },
                0,
            )
            .unwrap();
    }
    let only_b = |m: &RetainedMessage<String>| m.key == key("req_B");
    let page = window.since(0, 2, only_b);
    assert_eq!(numbers(&page), vec![2, 4]);
    assert_eq!(page.next_since, Some(4));
    let page = window.since(4, 2, only_b);
    assert_eq!(numbers(&page), vec![6]);
    assert_eq!(page.next_since, None);
    // A limit that exactly fits the remaining matches does not announce another page.
    assert_eq!(window.since(2, 2, only_b).next_since, None);
    // Zero-sized pages return nothing and point back at `since`.
    let page = window.since(1, 0, only_b);
    assert!(page.messages.is_empty());
    assert_eq!(page.next_since, Some(1));
}

#[test]
fn zero_capacity_window_keeps_nothing_but_tracks_the_head() {
    let mut window = RecoveryWindow::new(WindowLimits {
        max_messages: 0,
        max_age_ms: 1_000,
    });
    window.insert(msg(1, 0), 0).unwrap();
    assert!(window.is_empty());
    assert_eq!((window.head(), window.evicted_through()), (1, 1));
    assert!(window.since(1, 10, |_| true).complete);
    assert!(!window.since(0, 10, |_| true).complete);
}
