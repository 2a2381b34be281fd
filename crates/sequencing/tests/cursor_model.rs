//! Model-based test of the seam: a simulated log, in-memory tail and live fan-out driven only
//! through [`Cursor`], [`TailCache`], [`resume`] and [`window_start`], under random
//! interleavings of publishes, subscribes (with and without `since`), slow readers, log reads
//! that race with publishes and pruning, disconnects, resumes and restarts.
//!
//! The property: every subscriber, once everything has been read, received exactly the
//! committed messages of its key after its start point, strictly increasing, none twice —
//! except the ranges it was told about (`recovered: false`).
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;

use proptest::prelude::*;
use seqcast_protocol::SubscriptionKey;
use seqcast_sequencing::{
    CachedMessage, Cursor, LogFacts, Phase, ReadBudget, Resume, Step, TailCache, View,
    WindowLimits, resume, window_start,
};

const KEYS: [&str; 3] = ["c:a", "c:b", "d:a"];
const MSG_BYTES: usize = 10;

#[derive(Debug, Clone)]
enum Op {
    Publish(usize),
    Subscribe {
        key: usize,
        since_back: Option<u64>,
    },
    /// Plan the next step of a subscriber (a log read is then in flight).
    Plan(usize),
    /// Perform the planned step (publishes and pruning may have happened since the plan).
    Exec(usize),
    /// The client's socket takes up to n frames.
    Read(usize, usize),
    Disconnect(usize),
    Resume(usize),
    Restart,
    Prune(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..KEYS.len()).prop_map(Op::Publish),
        1 => (0..KEYS.len(), prop::option::of(0u64..30))
            .prop_map(|(key, since_back)| Op::Subscribe { key, since_back }),
        3 => (0usize..6).prop_map(Op::Plan),
        3 => (0usize..6).prop_map(Op::Exec),
        3 => ((0usize..6), (0usize..6)).prop_map(|(i, n)| Op::Read(i, n)),
        1 => (0usize..6).prop_map(Op::Disconnect),
        1 => (0usize..6).prop_map(Op::Resume),
        1 => Just(Op::Restart),
        1 => (0u64..4).prop_map(Op::Prune),
    ]
}

#[derive(Debug)]
struct Sub {
    key: SubscriptionKey,
    /// None while disconnected.
    cursor: Option<Cursor>,
    planned: Option<Step>,
    queue: VecDeque<u64>,
    received: Vec<u64>,
    /// The first start position.
    first_after: u64,
    /// Ranges `(a, b]` the client was told it may have missed (`recovered: false`).
    told_gaps: Vec<(u64, u64)>,
    /// The start position of the current connection (used when nothing was received).
    after: u64,
}

struct World {
    /// Key index of every committed message; message n is `log[n - 1]`.
    log: Vec<usize>,
    floor: u64,
    cache: TailCache<u64>,
    budget: usize,
    subs: Vec<Sub>,
    /// (subscriber, key) pairs registered for live delivery.
    live: Vec<usize>,
    capacity: usize,
    page: usize,
    window: WindowLimits,
    keys: Vec<SubscriptionKey>,
}

impl World {
    fn head(&self) -> u64 {
        self.log.len() as u64
    }

    fn view(&self) -> View {
        self.cache.view(self.floor)
    }

    /// A catch-up page: `page` messages (no byte bound in this model).
    fn budget(&self) -> ReadBudget {
        ReadBudget {
            max_events: self.page,
            max_bytes: usize::MAX,
        }
    }

    fn publish(&mut self, k: usize) {
        self.log.push(k);
        let seq = self.head();
        self.cache
            .push(CachedMessage {
                sequence_number: seq,
                key: self.keys[k].clone(),
                timestamp_ms: 0,
                frame: seq,
                bytes: MSG_BYTES,
            })
            .unwrap();
        let capacity = self.capacity;
        let subs = &mut self.subs;
        self.live.retain(|&i| {
            let s = &mut subs[i];
            if s.key != self.keys[k] {
                return true;
            }
            if s.queue.len() < capacity {
                s.queue.push_back(seq);
                true
            } else {
                // Lagged: leaves live delivery at its position.
                s.cursor.as_mut().unwrap().on_lagged(seq);
                false
            }
        });
    }

    fn start(&mut self, i: usize, since: Option<u64>) {
        let head = self.head();
        let after = match since {
            None => head.saturating_sub(3), // a backlog start: some recent history of the key
            Some(since) => {
                let facts = LogFacts {
                    head,
                    retention_floor: self.floor,
                    first_within_age: (self.floor <= head).then_some(self.floor),
                };
                let verdict = resume(since, true, head, window_start(self.window, facts));
                let after = verdict.start().expect("one epoch in this model");
                if !verdict.recovered() {
                    self.subs[i].told_gaps.push((since, after));
                }
                after
            }
        };
        let s = &mut self.subs[i];
        s.cursor = Some(Cursor::catching_up(after));
        s.after = after;
        s.planned = None;
    }

    fn disconnect(&mut self, i: usize) {
        let s = &mut self.subs[i];
        s.cursor = None;
        s.planned = None;
        s.queue.clear(); // frames not yet written are lost with the socket
        self.live.retain(|&j| j != i);
    }

    fn resume_sub(&mut self, i: usize) {
        if self.subs[i].cursor.is_some() {
            return;
        }
        let since = self.subs[i]
            .received
            .last()
            .copied()
            .unwrap_or(self.subs[i].after);
        self.start(i, Some(since));
    }

    fn plan(&mut self, i: usize) {
        let view = self.view();
        let s = &mut self.subs[i];
        if let Some(c) = s.cursor.as_mut()
            && s.planned.is_none()
        {
            let step = c.next_step(view);
            if let Step::Behind { .. } = step {
                self.disconnect(i);
            } else if step != Step::Idle {
                s.planned = Some(step);
            }
        }
    }

    fn exec(&mut self, i: usize) {
        let Some(step) = self.subs[i].planned.take() else {
            return;
        };
        let key = self.subs[i].key.clone();
        match step {
            Step::ReadLog { after, through } => {
                // One read transaction: the floor and the rows as they are now.
                let floor = self.floor;
                let mut events = Vec::new();
                let mut covered = through;
                for seq in (after + 1).max(floor)..=through {
                    if self.keys[self.log[seq as usize - 1]] == key {
                        if events.len() == self.page {
                            covered = *events.last().unwrap();
                            break;
                        }
                        events.push(seq);
                    }
                }
                let s = &mut self.subs[i];
                let c = s.cursor.as_mut().unwrap();
                if c.on_log_page(covered, floor) == Phase::Behind {
                    self.disconnect(i);
                } else {
                    s.queue.extend(events);
                }
            }
            Step::JoinFromCache { after } => {
                // Under the hub lock: re-check that the cache still covers the position.
                if !self.view().cache_covers(after) {
                    return;
                }
                let head = self.cache.head();
                let page = self
                    .cache
                    .key_page(&key, after, self.budget(), |_| MSG_BYTES);
                let s = &mut self.subs[i];
                let c = s.cursor.as_mut().unwrap();
                s.queue.extend(page.items.iter().map(|m| m.frame));
                if page.covered_through < head {
                    c.on_cache_page(page.covered_through);
                } else {
                    c.on_joined(head);
                    self.live.push(i);
                }
            }
            Step::Idle | Step::Behind { .. } => {}
        }
    }

    fn read(&mut self, i: usize, n: usize) {
        let s = &mut self.subs[i];
        for _ in 0..n {
            match s.queue.pop_front() {
                Some(seq) => s.received.push(seq),
                None => break,
            }
        }
    }

    fn restart(&mut self) {
        for i in 0..self.subs.len() {
            self.disconnect(i);
        }
        self.cache = TailCache::new(self.budget, self.head());
    }

    fn prune(&mut self, n: u64) {
        self.floor = (self.floor + n).min(self.head() + 1);
        self.cache.evict_below(self.floor);
    }

    /// Reconnect everyone and let every subscriber read until all are live with empty queues.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut busy = false;
            for i in 0..self.subs.len() {
                if self.subs[i].cursor.is_none() {
                    self.resume_sub(i);
                }
                self.read(i, usize::MAX);
                self.plan(i);
                if self.subs[i].planned.is_some() {
                    busy = true;
                    self.exec(i);
                }
                if !self.subs[i].queue.is_empty() || self.subs[i].cursor.is_none() {
                    busy = true;
                }
            }
            if !busy {
                return;
            }
        }
        panic!("subscribers never settled");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn every_subscriber_gets_exactly_its_keys_messages_after_its_start(
        ops in prop::collection::vec(op(), 1..160),
        cache_msgs in 0usize..12,
        capacity in 1usize..6,
        page in 1usize..5,
        window_messages in 1usize..40,
    ) {
        let budget = cache_msgs * (MSG_BYTES + seqcast_sequencing::ENTRY_OVERHEAD_BYTES);
        let mut w = World {
            log: Vec::new(),
            floor: 1,
            cache: TailCache::new(budget, 0),
            budget,
            subs: Vec::new(),
            live: Vec::new(),
            capacity,
            page,
            window: WindowLimits { max_messages: Some(window_messages as u64), max_age_ms: u64::MAX },
            keys: KEYS.iter().map(|k| SubscriptionKey::parse(k).unwrap()).collect(),
        };
        for op in ops {
            let n = w.subs.len();
            match op {
                Op::Publish(k) => w.publish(k),
                Op::Subscribe { key, since_back } if n < 6 => {
                    {
                        w.subs.push(Sub {
                            key: w.keys[key].clone(),
                            cursor: None,
                            planned: None,
                            queue: VecDeque::new(),
                            received: Vec::new(),
                            first_after: 0,
                            told_gaps: Vec::new(),
                            after: 0,
                        });
                        let since = since_back.map(|b| w.head().saturating_sub(b));
                        w.start(n, since);
                        w.subs[n].first_after = w.subs[n].after;
                        w.subs[n].told_gaps.clear();
                        if let Some(since) = since {
                            // A gap told at the first subscribe is before its own start.
                            w.subs[n].first_after = w.subs[n].after.max(since);
                        }
                    }
                }
                Op::Plan(i) if i < n => w.plan(i),
                Op::Exec(i) if i < n => w.exec(i),
                Op::Read(i, k) if i < n => w.read(i, k),
                Op::Disconnect(i) if i < n => w.disconnect(i),
                Op::Resume(i) if i < n => w.resume_sub(i),
                Op::Restart => w.restart(),
                Op::Prune(k) => w.prune(k),
                _ => {}
            }
        }
        w.settle();
        let head = w.head();
        for s in &w.subs {
            prop_assert!(
                s.received.windows(2).all(|p| p[0] < p[1]),
                "not strictly increasing: {:?}", s.received
            );
            let expected: Vec<u64> = (s.first_after + 1..=head)
                .filter(|&seq| w.keys[w.log[seq as usize - 1]] == s.key)
                .filter(|&seq| !s.told_gaps.iter().any(|&(a, b)| seq > a && seq <= b))
                .collect();
            // Messages inside a told gap may still have been delivered before the drop.
            let received: Vec<u64> = s.received.iter().copied()
                .filter(|&seq| !s.told_gaps.iter().any(|&(a, b)| seq > a && seq <= b))
                .collect();
            prop_assert_eq!(&received, &expected, "subscriber of {} from {}", s.key, s.first_after);
            let c = s.cursor.unwrap();
            prop_assert_eq!(c.phase(), Phase::Live);
        }
    }
}

#[test]
fn a_lagged_subscriber_catches_up_from_the_log_and_rejoins() {
    let key = SubscriptionKey::parse("c:a").unwrap();
    let mut cursor = Cursor::catching_up(0);
    // Memory holds 91..=100 of a log of 100.
    let view = View {
        head: 100,
        cache_floor: 91,
        retention_floor: 1,
    };
    assert_eq!(
        cursor.next_step(view),
        Step::ReadLog {
            after: 0,
            through: 90
        }
    );
    assert_eq!(cursor.on_log_page(40, 1), Phase::CatchingUp);
    assert_eq!(cursor.position(), 40);
    assert_eq!(cursor.on_log_page(90, 1), Phase::CatchingUp);
    assert_eq!(cursor.next_step(view), Step::JoinFromCache { after: 90 });
    cursor.on_joined(100);
    assert_eq!(cursor.phase(), Phase::Live);
    assert_eq!(cursor.next_step(view), Step::Idle);
    cursor.on_lagged(150);
    assert_eq!(
        (cursor.phase(), cursor.position()),
        (Phase::CatchingUp, 149)
    );
    let _ = key;
}

#[test]
fn a_floor_that_passed_the_position_means_behind() {
    let mut cursor = Cursor::catching_up(10);
    // A page read after pruning raised the floor to 20: messages 11..=19 may be gone.
    assert_eq!(cursor.on_log_page(30, 20), Phase::Behind);
    assert_eq!(cursor.position(), 10, "a behind cursor does not move");
    let mut cursor = Cursor::catching_up(10);
    let view = View {
        head: 50,
        cache_floor: 40,
        retention_floor: 12,
    };
    assert_eq!(
        cursor.next_step(view),
        Step::Behind {
            position: 10,
            floor: 12
        }
    );
    // Exactly at the floor is fine: 11 is the oldest retained and the next one needed.
    let mut cursor = Cursor::catching_up(10);
    let view = View {
        retention_floor: 11,
        ..view
    };
    assert!(matches!(
        cursor.next_step(view),
        Step::ReadLog { after: 10, .. }
    ));
}

#[test]
fn resume_rules() {
    // The seeds' count bound, given explicitly (`--recovery-max-messages 500`).
    let limits = WindowLimits {
        max_messages: Some(500),
        max_age_ms: 900_000,
    };
    // Seed 001 AC4: 501 published, since 0 → the newest 500, incomplete.
    let facts = LogFacts {
        head: 501,
        retention_floor: 1,
        first_within_age: Some(1),
    };
    let start = window_start(limits, facts);
    assert_eq!(start, 2);
    assert_eq!(
        resume(0, true, 501, start),
        Resume::Incomplete {
            after: 1,
            oldest_sequence: 2
        }
    );
    assert_eq!(resume(1, true, 501, start), Resume::Complete { after: 1 });
    assert_eq!(
        resume(501, true, 501, start),
        Resume::Complete { after: 501 }
    );
    // A number beyond the head: never issued here (or not applied yet): nothing replayed.
    let ahead = resume(502, true, 501, start);
    assert_eq!(
        ahead,
        Resume::Ahead {
            head: 501,
            oldest_sequence: 2
        }
    );
    assert_eq!(
        (ahead.recovered(), ahead.start(), ahead.oldest_sequence()),
        (false, Some(501), Some(2))
    );
    assert_eq!(resume(5, false, 501, start), Resume::OtherEpoch);
    // Age: nothing young enough → the window is empty; only since = head is complete.
    let old = LogFacts {
        first_within_age: None,
        ..facts
    };
    assert_eq!(window_start(limits, old), 502);
    assert!(resume(501, true, 501, 502).recovered());
    assert!(!resume(500, true, 501, 502).recovered());
    // Retention floor bounds the window.
    let pruned = LogFacts {
        retention_floor: 300,
        ..facts
    };
    assert_eq!(window_start(limits, pruned), 300);
    // An empty store: since 0 is complete.
    let empty = LogFacts {
        head: 0,
        retention_floor: 1,
        first_within_age: None,
    };
    assert!(resume(0, true, 0, window_start(limits, empty)).recovered());
}

#[test]
fn the_cache_is_dense_bounded_in_bytes_and_indexed_by_key() {
    let a = SubscriptionKey::parse("c:a").unwrap();
    let b = SubscriptionKey::parse("c:b").unwrap();
    let per = MSG_BYTES + seqcast_sequencing::ENTRY_OVERHEAD_BYTES;
    // Three messages of two keys fit.
    let budget = 3 * per + 2 * seqcast_sequencing::KEY_OVERHEAD_BYTES;
    let mut cache: TailCache<u64> = TailCache::new(budget, 10);
    assert_eq!(cache.floor(), 11);
    let msg = |seq: u64, key: &SubscriptionKey| CachedMessage {
        sequence_number: seq,
        key: key.clone(),
        timestamp_ms: seq * 10,
        frame: seq,
        bytes: MSG_BYTES,
    };
    assert!(cache.push(msg(12, &a)).is_err(), "a hole is refused");
    for (seq, k) in [(11, &a), (12, &b), (13, &a), (14, &a)] {
        cache.push(msg(seq, k)).unwrap();
    }
    assert_eq!((cache.floor(), cache.head(), cache.len()), (12, 14, 3));
    assert!(cache.bytes() <= cache.budget_bytes());
    let got: Vec<u64> = cache.key_after(&a, 0).map(|m| m.frame).collect();
    assert_eq!(got, [13, 14]);
    let got: Vec<u64> = cache.after(12).map(|m| m.frame).collect();
    assert_eq!(got, [13, 14]);
    assert_eq!(cache.first_at_or_after(125), Some(13));
    assert!(cache.view(1).cache_covers(11));
    assert!(!cache.view(1).cache_covers(10));
    cache.evict_below(14);
    assert_eq!((cache.floor(), cache.len()), (14, 1));
    assert_eq!(cache.key_after(&b, 0).count(), 0);
    assert!(
        cache.view(1).cache_covers(20),
        "nothing after the head is missing"
    );
}

/// By default the window is time-only: a resume reaches back to the oldest message younger than
/// the age bound however many messages (of any key) came since, never past the retention floor.
#[test]
fn the_default_window_has_no_count_bound() {
    let limits = WindowLimits::default();
    assert_eq!(limits.max_messages, None);
    assert_eq!(limits.max_age_ms, 900_000);
    let facts = LogFacts {
        head: 1_000_000,
        retention_floor: 1,
        first_within_age: Some(7),
    };
    let start = window_start(limits, facts);
    assert_eq!(start, 7, "only the age bound applies");
    assert_eq!(
        resume(6, true, 1_000_000, start),
        Resume::Complete { after: 6 }
    );
    assert!(!resume(5, true, 1_000_000, start).recovered());
    let pruned = LogFacts {
        retention_floor: 400_000,
        ..facts
    };
    assert_eq!(window_start(limits, pruned), 400_000, "retention bounds it");
    // A count bound, where given, still applies.
    let counted = WindowLimits {
        max_messages: Some(500),
        ..limits
    };
    assert_eq!(window_start(counted, facts), 1_000_000 - 500 + 1);
}
