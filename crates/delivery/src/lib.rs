//! seqcast delivery: one connection's subscriptions as a sans-IO state machine.
//!
//! Job: [`Subscriptions`] owns a connection's per-key [`Cursor`]s, decides which catching-up
//! key moves next (round-robin, one page at a time; keys resumed together catch up as one merged
//! cursor over their union and join live delivery in one step), applies the water marks (act only while
//! the send queue is at or below its low-water mark; nothing is planned while a start or a log
//! read is in flight) and the join rule (join live delivery from the cached tail once it holds
//! the rest). The shell feeds it inputs — a subscribe whose start was planned, an unsubscribe, a
//! page read, a join result, a lag, the queue level, the log's [`View`] — and performs the
//! [`Action`]s it returns: read a log page, try to join from the cache, close.
//!
//! Boundary: sans-IO. No tokio, no sockets, no disk, no clock and no logging; frames are the
//! shell's (it encodes and queues them), so this crate never sees a byte of the wire.
//!
//! Invariant: at most one thing is in flight per connection (a start being planned, a log read,
//! a join); a key is in the catch-up queue only while it is subscribed, and once the machine
//! asked for a close it asks for nothing more.
//!
//! ```
//! use seqcast_delivery::{Action, Admit, JoinResult, QueueLevel, Subscriptions};
//! use seqcast_protocol::SubscriptionKey;
//! use seqcast_sequencing::View;
//!
//! let key = SubscriptionKey::parse("news:sports").unwrap();
//! let mut subs = Subscriptions::new(8);
//! assert_eq!(subs.admit(&key), Admit::Plan);
//! // The shell planned the start (a `since` resume from 40) and queued the `sub_ack`.
//! assert!(subs.started(key.clone(), 40));
//! let view = View { head: 100, cache_floor: 71, retention_floor: 1 };
//! let room = QueueLevel::EMPTY;
//! let Some(Action::ReadLog { after: 40, through: 70, .. }) = subs.next_action(view, room) else { panic!() };
//! assert!(subs.is_busy()); // nothing else moves until the page is in
//! subs.on_page(&key, 70, 1);
//! let Some(Action::Join { after: 70, .. }) = subs.next_action(view, room) else { panic!() };
//! subs.on_join(&key, JoinResult::Joined { head: 100 });
//! assert_eq!(subs.next_action(view, room), None); // live
//! ```

use std::collections::{HashMap, HashSet, VecDeque};

use seqcast_protocol::SubscriptionKey;
use seqcast_sequencing::{Cursor, Phase, Step, View};

/// The send queue as the shell sees it when it asks for the next action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLevel {
    /// At or below the low-water mark: catching up may queue another page.
    pub below_low_water: bool,
    /// At or above the high-water mark: live delivery pauses; only control frames are acted on.
    pub above_high_water: bool,
    /// The connection is closing: nothing more is planned.
    pub closing: bool,
}

impl QueueLevel {
    /// An empty queue of an open connection.
    pub const EMPTY: QueueLevel = QueueLevel {
        below_low_water: true,
        above_high_water: false,
        closing: false,
    };
}

/// What a `subscribe` to a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Already subscribed: acknowledge again, replay nothing.
    Again,
    /// The connection holds its limit of subscriptions.
    TooMany {
        /// The limit.
        limit: usize,
    },
    /// Plan where it starts (the shell reads the log), then call [`Subscriptions::started`] or
    /// [`Subscriptions::start_failed`]. Nothing else moves meanwhile.
    Plan,
}

/// What the shell does next for the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read `key`'s messages numbered in `(after, through]` from the log (one page, in one read
    /// transaction that also reports the retention floor), then call
    /// [`Subscriptions::on_page`] (or [`Subscriptions::on_read_failed`]).
    ReadLog {
        /// The key.
        key: SubscriptionKey,
        /// The cursor's position.
        after: u64,
        /// The highest number worth reading from the log (the rest is cached).
        through: u64,
    },
    /// Atomically with live delivery: hand out `key`'s cached messages after `after` and join
    /// live delivery, or hand out a page of them; then call [`Subscriptions::on_join`].
    Join {
        /// The key.
        key: SubscriptionKey,
        /// The cursor's position.
        after: u64,
    },
    /// Read the messages of every key in `keys` numbered in `(after, through]` from the log in
    /// one merged read, in global order (one page for all of them, in one read transaction
    /// that also reports the retention floor), handing out a key's message only above that
    /// key's own position; then call [`Subscriptions::on_merged_page`]. The keys were resumed
    /// together (see [`Subscriptions::started_many`]).
    ReadLogMerged {
        /// The keys read, each with its cursor's position.
        keys: Vec<(SubscriptionKey, u64)>,
        /// The smallest of their positions: where the merged read starts.
        after: u64,
        /// The highest number worth reading from the log (the rest is cached).
        through: u64,
    },
    /// Atomically with live delivery (one hub lock): hand out the cached messages of every key
    /// in `keys` above its position, merged in global order, and register all of them for live
    /// delivery in the same step — or hand out a page of them; then call
    /// [`Subscriptions::on_merged_join`].
    JoinMerged {
        /// The keys, each with its cursor's position.
        keys: Vec<(SubscriptionKey, u64)>,
    },
    /// Close the connection (the client resumes with `since`).
    Close(Close),
}

/// What to do with a merged log page that was read ([`Action::ReadLogMerged`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergedVerdict {
    /// Queue the page's messages of these keys (the others were unsubscribed meanwhile).
    Deliver(Vec<SubscriptionKey>),
    /// Drop it and close: the floor passed a cursor (see [`Close::Behind`]).
    Close(Close),
}

/// Why the machine asks for a close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// `key`'s cursor fell behind the log's retention floor (1013, slow consumer).
    Behind {
        /// The key.
        key: SubscriptionKey,
        /// The cursor's position.
        position: u64,
        /// The floor it fell behind.
        floor: u64,
    },
}

/// What a join from the cache did (the hub's answer, under its lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinResult {
    /// The cached rest was queued and the key is live after `head`.
    Joined {
        /// The seam.
        head: u64,
    },
    /// A page up to `through` was queued; still catching up.
    Page {
        /// The last number queued.
        through: u64,
    },
    /// The cache no longer covers the position: read the log.
    NotCached,
    /// The connection is closing or its cursor is of an older history: stop.
    Gone,
}

/// What to do with a log page that was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageVerdict {
    /// Queue its frames.
    Deliver,
    /// Drop it: the key was unsubscribed while it was read.
    Drop,
    /// Drop it and close: the floor passed the cursor (see [`Close::Behind`]).
    Close(Close),
}

/// What is in flight (at most one at a time).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Start(SubscriptionKey),
    /// The starts of keys resumed together.
    StartMany(Vec<SubscriptionKey>),
    Read(SubscriptionKey),
    Join(SubscriptionKey),
    /// A merged read of these keys over `(after, through]`.
    ReadMerged(Vec<SubscriptionKey>, u64, u64),
    /// A merged join of these keys.
    JoinMerged(Vec<SubscriptionKey>),
}

/// One connection's subscriptions. See the crate docs.
#[derive(Debug)]
pub struct Subscriptions {
    cursors: HashMap<SubscriptionKey, Cursor>,
    catching_up: VecDeque<SubscriptionKey>,
    /// Keys resumed together that catch up as one: one merged cursor over their union, from the
    /// smallest position, each key above its own; they join live delivery in one step.
    merged: Vec<SubscriptionKey>,
    /// Whether the merged catch-up moves before the single keys next time (they take turns).
    merged_turn: bool,
    /// How far (in numbers) the last merged page reached before its budget cut it (0: no
    /// page cut yet): the next merged read asks for at most twice that.
    merged_span: u64,
    pending: Option<Pending>,
    max: usize,
    closed: bool,
}

impl Subscriptions {
    /// No subscriptions yet; at most `max` at a time.
    pub fn new(max: usize) -> Self {
        Subscriptions {
            cursors: HashMap::new(),
            catching_up: VecDeque::new(),
            merged: Vec::new(),
            merged_turn: true,
            merged_span: 0,
            pending: None,
            max,
            closed: false,
        }
    }

    /// The subscribed keys.
    pub fn keys(&self) -> impl Iterator<Item = &SubscriptionKey> {
        self.cursors.keys()
    }

    /// How many keys are subscribed.
    pub fn len(&self) -> usize {
        self.cursors.len()
    }

    /// Whether no key is subscribed.
    pub fn is_empty(&self) -> bool {
        self.cursors.is_empty()
    }

    /// `key`'s cursor, if subscribed.
    pub fn cursor(&self, key: &SubscriptionKey) -> Option<Cursor> {
        self.cursors.get(key).copied()
    }

    /// Whether `key`'s start is being planned (alone, or resumed with others).
    pub fn is_starting(&self, key: &SubscriptionKey) -> bool {
        match &self.pending {
            Some(Pending::Start(k)) => k == key,
            Some(Pending::StartMany(keys)) => keys.contains(key),
            _ => false,
        }
    }

    /// Whether a start (of one key or of several resumed together) is being planned.
    pub fn is_starting_any(&self) -> bool {
        matches!(
            self.pending,
            Some(Pending::Start(_) | Pending::StartMany(_))
        )
    }

    /// A start or a log read is in flight: the connection acts only on control frames.
    pub fn is_busy(&self) -> bool {
        self.pending.is_some()
    }

    /// Under back-pressure: something in flight, or the send queue above its high-water mark.
    pub fn is_pressured(&self, level: QueueLevel) -> bool {
        self.is_busy() || level.above_high_water
    }

    /// A `subscribe` to `key` (the shell checked the token allows it). With [`Admit::Plan`] the
    /// start is in flight.
    pub fn admit(&mut self, key: &SubscriptionKey) -> Admit {
        if self.cursors.contains_key(key) {
            return Admit::Again;
        }
        if self.cursors.len() >= self.max {
            return Admit::TooMany { limit: self.max };
        }
        self.pending = Some(Pending::Start(key.clone()));
        Admit::Plan
    }

    /// A `resume` of `keys` (the shell checked the token allows each): one answer per key, in
    /// order. A key repeated in the list is [`Admit::Again`] after its first entry; keys past
    /// the limit are [`Admit::TooMany`]. When any is [`Admit::Plan`], their starts are in flight
    /// together: call [`Subscriptions::started_many`] (or [`Subscriptions::start_failed`]).
    pub fn admit_many(&mut self, keys: &[SubscriptionKey]) -> Vec<Admit> {
        let mut planned: Vec<SubscriptionKey> = Vec::new();
        let mut seen: HashSet<&SubscriptionKey> = HashSet::with_capacity(keys.len());
        let answers = keys
            .iter()
            .map(|key| {
                if self.cursors.contains_key(key) || !seen.insert(key) {
                    Admit::Again
                } else if self.cursors.len() + planned.len() >= self.max {
                    Admit::TooMany { limit: self.max }
                } else {
                    planned.push(key.clone());
                    Admit::Plan
                }
            })
            .collect();
        if !planned.is_empty() {
            self.pending = Some(Pending::StartMany(planned));
        }
        answers
    }

    /// The starts of keys admitted together were planned and their `resume_ack` queued: each
    /// key catches up after its own position, all of them in one merged catch-up. Keys of the
    /// admission missing here were not subscribed. Returns how many are new subscriptions.
    pub fn started_many(&mut self, starts: Vec<(SubscriptionKey, u64)>) -> usize {
        if matches!(self.pending, Some(Pending::StartMany(_))) {
            self.pending = None;
        }
        let mut new = 0;
        self.merged_span = 0;
        let mut members: HashSet<SubscriptionKey> = self.merged.iter().cloned().collect();
        for (key, after) in starts {
            if self
                .cursors
                .insert(key.clone(), Cursor::catching_up(after))
                .is_none()
            {
                new += 1;
            }
            if members.insert(key.clone()) {
                self.merged.push(key);
            }
        }
        // A key starts here once: none of them is in the single keys' queue.
        self.catching_up.retain(|k| !members.contains(k));
        new
    }

    /// The start was planned and its `sub_ack` queued: `key` catches up after `after`. Returns
    /// whether the key is a new subscription.
    pub fn started(&mut self, key: SubscriptionKey, after: u64) -> bool {
        self.clear_pending_start();
        let new = self
            .cursors
            .insert(key.clone(), Cursor::catching_up(after))
            .is_none();
        self.catching_up.retain(|k| k != &key);
        self.catching_up.push_back(key);
        new
    }

    /// The start could not be planned (or its `sub_ack` not queued): no subscription.
    pub fn start_failed(&mut self) {
        self.clear_pending_start();
    }

    fn clear_pending_start(&mut self) {
        if self.is_starting_any() {
            self.pending = None;
        }
    }

    /// `unsubscribe` (or a refreshed token that no longer allows the key). Returns whether it
    /// was subscribed. A page of it in flight is dropped when it comes in.
    pub fn unsubscribe(&mut self, key: &SubscriptionKey) -> bool {
        self.catching_up.retain(|k| k != key);
        self.merged.retain(|k| k != key);
        self.cursors.remove(key).is_some()
    }

    /// Live delivery could not queue `key`'s message `sequence_number`: it catches up again.
    pub fn on_lagged(&mut self, key: &SubscriptionKey, sequence_number: u64) {
        if let Some(cursor) = self.cursors.get_mut(key)
            && cursor.phase() == Phase::Live
        {
            cursor.on_lagged(sequence_number);
            self.catching_up.push_back(key.clone());
        }
    }

    /// The next thing to do, given the log as it is now and the send queue's level: `None`
    /// while something is in flight, above the low-water mark, closing, or nothing catches up.
    pub fn next_action(&mut self, view: View, level: QueueLevel) -> Option<Action> {
        if self.closed || self.pending.is_some() || level.closing || !level.below_low_water {
            return None;
        }
        // The merged catch-up and the single keys take turns.
        let merged_first = self.merged_turn;
        self.merged_turn = !merged_first;
        if merged_first && let Some(action) = self.next_merged(view) {
            return Some(action);
        }
        if let Some(action) = self.next_single(view) {
            return Some(action);
        }
        if merged_first {
            None
        } else {
            self.next_merged(view)
        }
    }

    fn next_single(&mut self, view: View) -> Option<Action> {
        while let Some(key) = self.catching_up.pop_front() {
            let Some(cursor) = self.cursors.get_mut(&key) else {
                continue;
            };
            match cursor.next_step(view) {
                Step::Idle => {}
                Step::Behind { position, floor } => {
                    self.closed = true;
                    return Some(Action::Close(Close::Behind {
                        key,
                        position,
                        floor,
                    }));
                }
                Step::JoinFromCache { after } => {
                    self.pending = Some(Pending::Join(key.clone()));
                    return Some(Action::Join { key, after });
                }
                Step::ReadLog { after, through } => {
                    self.pending = Some(Pending::Read(key.clone()));
                    return Some(Action::ReadLog {
                        key,
                        after,
                        through,
                    });
                }
            }
        }
        None
    }

    /// The merged catch-up's next step: close if a member fell behind the floor, a merged join
    /// once the cache holds the rest of every member, else a merged log read from the smallest
    /// position of the members the cache does not cover.
    fn next_merged(&mut self, view: View) -> Option<Action> {
        let cursors = &self.cursors;
        self.merged.retain(|k| {
            cursors
                .get(k)
                .is_some_and(|c| c.phase() == Phase::CatchingUp)
        });
        if self.merged.is_empty() {
            return None;
        }
        let mut joins = Vec::with_capacity(self.merged.len());
        let mut reads = Vec::new();
        let mut through = 0;
        for key in &self.merged {
            let Some(cursor) = self.cursors.get_mut(key) else {
                continue;
            };
            match cursor.next_step(view) {
                Step::Behind { position, floor } => {
                    self.closed = true;
                    return Some(Action::Close(Close::Behind {
                        key: key.clone(),
                        position,
                        floor,
                    }));
                }
                Step::JoinFromCache { after } => joins.push((key.clone(), after)),
                Step::ReadLog { after, through: t } => {
                    through = t;
                    reads.push((key.clone(), after));
                }
                Step::Idle => {}
            }
        }
        if reads.is_empty() {
            self.pending = Some(Pending::JoinMerged(
                joins.iter().map(|(k, _)| k.clone()).collect(),
            ));
            return Some(Action::JoinMerged { keys: joins });
        }
        let after = reads.iter().map(|&(_, a)| a).min().unwrap_or(0);
        // A page ends at its budget: reading much further than the last page reached only
        // makes the database look at (and order) numbers the page cannot take.
        if self.merged_span > 0 {
            through = through.min(after.saturating_add(self.merged_span.saturating_mul(2)));
        }
        self.pending = Some(Pending::ReadMerged(
            reads.iter().map(|(k, _)| k.clone()).collect(),
            after,
            through,
        ));
        Some(Action::ReadLogMerged {
            keys: reads,
            after,
            through,
        })
    }

    /// The answer to [`Action::ReadLogMerged`]: the page accounted for every message of its
    /// keys up to `covered_through` and was read with retention floor `floor`.
    pub fn on_merged_page(&mut self, covered_through: u64, floor: u64) -> MergedVerdict {
        let keys = match self.pending.take() {
            Some(Pending::ReadMerged(keys, after, through)) => {
                // The span the budget allowed, or (not cut) room to read further next time.
                self.merged_span = if covered_through < through {
                    covered_through.saturating_sub(after).max(1)
                } else {
                    self.merged_span.saturating_mul(2)
                };
                keys
            }
            other => {
                self.pending = other;
                return MergedVerdict::Deliver(Vec::new());
            }
        };
        let members: HashSet<&SubscriptionKey> = self.merged.iter().collect();
        let mut kept = Vec::with_capacity(keys.len());
        for key in keys {
            if !members.contains(&key) {
                continue;
            }
            let Some(cursor) = self.cursors.get_mut(&key) else {
                continue;
            };
            let position = cursor.position();
            if cursor.on_log_page(covered_through, floor) == Phase::Behind {
                self.closed = true;
                return MergedVerdict::Close(Close::Behind {
                    key,
                    position,
                    floor,
                });
            }
            kept.push(key);
        }
        MergedVerdict::Deliver(kept)
    }

    /// [`Action::ReadLogMerged`] failed. Returns whether the connection must close (a key of it
    /// is still subscribed). Then nothing more is planned.
    pub fn on_merged_read_failed(&mut self) -> bool {
        let keys = match self.pending.take() {
            Some(Pending::ReadMerged(keys, ..)) => keys,
            other => {
                self.pending = other;
                return self.closed;
            }
        };
        if keys.iter().any(|k| self.cursors.contains_key(k)) {
            self.closed = true;
        }
        self.closed
    }

    /// The answer to [`Action::JoinMerged`], for all its keys at once.
    pub fn on_merged_join(&mut self, result: JoinResult) {
        let keys = match self.pending.take() {
            Some(Pending::JoinMerged(keys)) => keys,
            other => {
                self.pending = other;
                return;
            }
        };
        if result == JoinResult::Gone {
            self.closed = true;
            return;
        }
        for key in keys {
            let Some(cursor) = self.cursors.get_mut(&key) else {
                continue;
            };
            match result {
                JoinResult::Joined { head } => cursor.on_joined(head),
                JoinResult::Page { through } => cursor.on_cache_page(through),
                JoinResult::NotCached | JoinResult::Gone => {}
            }
        }
    }

    /// The answer to [`Action::Join`].
    pub fn on_join(&mut self, key: &SubscriptionKey, result: JoinResult) {
        if self.pending.as_ref() == Some(&Pending::Join(key.clone())) {
            self.pending = None;
        }
        let Some(cursor) = self.cursors.get_mut(key) else {
            return;
        };
        match result {
            JoinResult::Joined { head } => cursor.on_joined(head),
            JoinResult::Page { through } => {
                cursor.on_cache_page(through);
                self.catching_up.push_back(key.clone());
            }
            JoinResult::NotCached => self.catching_up.push_back(key.clone()),
            JoinResult::Gone => self.closed = true,
        }
    }

    /// The answer to [`Action::ReadLog`]: the page accounted for every message of `key` up to
    /// `covered_through` and was read with retention floor `floor`.
    pub fn on_page(
        &mut self,
        key: &SubscriptionKey,
        covered_through: u64,
        floor: u64,
    ) -> PageVerdict {
        if self.pending.as_ref() == Some(&Pending::Read(key.clone())) {
            self.pending = None;
        }
        let Some(cursor) = self.cursors.get_mut(key) else {
            return PageVerdict::Drop;
        };
        let position = cursor.position();
        if cursor.on_log_page(covered_through, floor) == Phase::Behind {
            self.closed = true;
            return PageVerdict::Close(Close::Behind {
                key: key.clone(),
                position,
                floor,
            });
        }
        self.catching_up.push_back(key.clone());
        PageVerdict::Deliver
    }

    /// [`Action::ReadLog`] for `key` failed (or its answer is void). Returns whether the
    /// connection must close: `key` is still subscribed and cannot catch up. Then nothing more
    /// is planned.
    pub fn on_read_failed(&mut self, key: &SubscriptionKey) -> bool {
        if self.pending.as_ref() == Some(&Pending::Read(key.clone())) {
            self.pending = None;
        }
        if self.cursors.contains_key(key) {
            self.closed = true;
        }
        self.closed
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(s: &str) -> SubscriptionKey {
        SubscriptionKey::parse(s).unwrap()
    }

    const VIEW: View = View {
        head: 100,
        cache_floor: 91,
        retention_floor: 1,
    };

    #[test]
    fn keys_catch_up_round_robin_one_page_at_a_time() {
        let (a, b) = (key("c:a"), key("c:b"));
        let mut subs = Subscriptions::new(4);
        assert_eq!(subs.admit(&a), Admit::Plan);
        assert!(subs.is_starting(&a));
        assert_eq!(
            subs.next_action(VIEW, QueueLevel::EMPTY),
            None,
            "a start is in flight"
        );
        subs.started(a.clone(), 0);
        assert_eq!(subs.admit(&b), Admit::Plan);
        subs.started(b.clone(), 0);
        let Some(Action::ReadLog { key: k, .. }) = subs.next_action(VIEW, QueueLevel::EMPTY) else {
            panic!()
        };
        assert_eq!(k, a);
        assert_eq!(
            subs.next_action(VIEW, QueueLevel::EMPTY),
            None,
            "one read at a time"
        );
        assert_eq!(subs.on_page(&a, 10, 1), PageVerdict::Deliver);
        let Some(Action::ReadLog { key: k, .. }) = subs.next_action(VIEW, QueueLevel::EMPTY) else {
            panic!()
        };
        assert_eq!(k, b, "then the other key");
    }

    #[test]
    fn nothing_moves_above_the_low_water_mark_or_while_closing() {
        let a = key("c:a");
        let mut subs = Subscriptions::new(4);
        subs.admit(&a);
        subs.started(a.clone(), 0);
        let full = QueueLevel {
            below_low_water: false,
            above_high_water: true,
            closing: false,
        };
        assert_eq!(subs.next_action(VIEW, full), None);
        assert!(subs.is_pressured(full));
        let closing = QueueLevel {
            closing: true,
            ..QueueLevel::EMPTY
        };
        assert_eq!(subs.next_action(VIEW, closing), None);
        assert!(subs.next_action(VIEW, QueueLevel::EMPTY).is_some());
    }

    #[test]
    fn limits_repeat_and_unsubscribe_during_a_read() {
        let (a, b) = (key("c:a"), key("c:b"));
        let mut subs = Subscriptions::new(1);
        subs.admit(&a);
        assert!(subs.started(a.clone(), 0));
        assert_eq!(subs.admit(&a), Admit::Again);
        assert_eq!(subs.admit(&b), Admit::TooMany { limit: 1 });
        assert!(subs.next_action(VIEW, QueueLevel::EMPTY).is_some());
        assert!(subs.unsubscribe(&a));
        assert_eq!(subs.on_page(&a, 50, 1), PageVerdict::Drop);
        assert!(!subs.is_busy());
        assert!(subs.is_empty());
    }

    #[test]
    fn a_floor_past_the_cursor_closes_and_stops_everything() {
        let a = key("c:a");
        let mut subs = Subscriptions::new(4);
        subs.admit(&a);
        subs.started(a.clone(), 5);
        assert!(subs.next_action(VIEW, QueueLevel::EMPTY).is_some());
        assert_eq!(
            subs.on_page(&a, 50, 20),
            PageVerdict::Close(Close::Behind {
                key: a.clone(),
                position: 5,
                floor: 20
            })
        );
        assert_eq!(subs.next_action(VIEW, QueueLevel::EMPTY), None);
    }

    #[test]
    fn keys_resumed_together_read_one_merged_page_and_join_in_one_step() {
        let (a, b, c) = (key("c:a"), key("c:b"), key("c:c"));
        let mut subs = Subscriptions::new(3);
        let answers = subs.admit_many(&[a.clone(), b.clone(), a.clone(), c.clone()]);
        assert_eq!(
            answers,
            [Admit::Plan, Admit::Plan, Admit::Again, Admit::Plan]
        );
        assert!(subs.is_starting(&b) && subs.next_action(VIEW, QueueLevel::EMPTY).is_none());
        assert_eq!(
            subs.started_many(vec![(a.clone(), 40), (b.clone(), 10), (c.clone(), 95)]),
            3
        );
        // One read for the keys the cache does not cover, from the smallest position.
        assert_eq!(
            subs.next_action(VIEW, QueueLevel::EMPTY),
            Some(Action::ReadLogMerged {
                keys: vec![(a.clone(), 40), (b.clone(), 10)],
                after: 10,
                through: 90
            })
        );
        assert!(subs.is_busy());
        subs.unsubscribe(&b);
        assert_eq!(
            subs.on_merged_page(90, 1),
            MergedVerdict::Deliver(vec![a.clone()])
        );
        assert_eq!(
            subs.next_action(VIEW, QueueLevel::EMPTY),
            Some(Action::JoinMerged {
                keys: vec![(a.clone(), 90), (c.clone(), 95)]
            })
        );
        subs.on_merged_join(JoinResult::Joined { head: 100 });
        assert_eq!(subs.cursor(&a).unwrap().phase(), Phase::Live);
        assert_eq!(subs.cursor(&c).unwrap().phase(), Phase::Live);
        assert_eq!(subs.next_action(VIEW, QueueLevel::EMPTY), None);
        // Over the limit.
        assert_eq!(
            subs.admit_many(&[b.clone(), key("c:d")]),
            [Admit::Plan, Admit::TooMany { limit: 3 }]
        );
    }

    /// After a merged page that its budget cut, the next merged read asks only about twice as
    /// far as that page reached (the database orders no numbers the page cannot take); a page
    /// the budget did not cut lets the next read go twice as far again.
    #[test]
    fn a_merged_read_asks_about_as_far_as_a_page_reaches() {
        let (a, b) = (key("c:a"), key("c:b"));
        let mut subs = Subscriptions::new(4);
        subs.admit_many(&[a.clone(), b.clone()]);
        subs.started_many(vec![(a.clone(), 0), (b.clone(), 5)]);
        let read = |subs: &mut Subscriptions| match subs.next_action(VIEW, QueueLevel::EMPTY) {
            Some(Action::ReadLogMerged { after, through, .. }) => (after, through),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            read(&mut subs),
            (0, 90),
            "no page yet: up to what the cache lacks"
        );
        subs.on_merged_page(10, 1); // cut by the budget at 10
        assert_eq!(read(&mut subs), (10, 30));
        subs.on_merged_page(30, 1); // not cut: the whole range
        assert_eq!(read(&mut subs), (30, 70));
    }

    #[test]
    fn a_lagged_live_key_catches_up_again_and_rejoins() {
        let a = key("c:a");
        let mut subs = Subscriptions::new(4);
        subs.admit(&a);
        subs.started(a.clone(), 95);
        assert_eq!(
            subs.next_action(VIEW, QueueLevel::EMPTY),
            Some(Action::Join {
                key: a.clone(),
                after: 95
            })
        );
        subs.on_join(&a, JoinResult::Joined { head: 100 });
        assert_eq!(subs.next_action(VIEW, QueueLevel::EMPTY), None);
        subs.on_lagged(&a, 130);
        let view = View {
            head: 150,
            cache_floor: 141,
            retention_floor: 1,
        };
        assert_eq!(
            subs.next_action(view, QueueLevel::EMPTY),
            Some(Action::ReadLog {
                key: a.clone(),
                after: 129,
                through: 140
            })
        );
        // A lag of a key that is not live (stale) changes nothing.
        subs.on_lagged(&a, 145);
        assert_eq!(subs.cursor(&a).unwrap().position(), 129);
    }
}
