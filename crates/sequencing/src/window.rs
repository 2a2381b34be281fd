//! The recovery window: a bounded ring of the latest messages, searched by `sequence_number`.

use std::collections::VecDeque;

use seqcast_protocol::SubscriptionKey;

/// How much history the window keeps: at most `max_messages`, none older than `max_age_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimits {
    /// Most messages held at once; the oldest go first beyond it.
    pub max_messages: usize,
    /// A message whose age (`now_ms - timestamp_ms`) exceeds this is evicted.
    pub max_age_ms: u64,
}

impl Default for WindowLimits {
    /// The seed defaults: the last 500 messages, none older than 900 s.
    fn default() -> Self {
        Self {
            max_messages: 500,
            max_age_ms: 900_000,
        }
    }
}

/// One message as the window keeps it. `F` is whatever the server sends (e.g. the encoded frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedMessage<F> {
    /// The deployment-wide number the message was published under.
    pub sequence_number: u64,
    /// The stream the message belongs to, for per-key or per-token filtering.
    pub key: SubscriptionKey,
    /// When the message was persisted (ms since the Unix epoch); drives age eviction.
    pub timestamp_ms: u64,
    /// The payload handed back by [`RecoveryWindow::since`].
    pub frame: F,
}

/// Why [`RecoveryWindow::insert`] refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    /// The message's number is not greater than the window's head (last inserted or floor):
    /// accepting it would break the ordering every lookup relies on.
    #[error("sequence number {got} is not greater than the window head {last}")]
    NotIncreasing {
        /// The window's head when the message was refused.
        last: u64,
        /// The refused message's number.
        got: u64,
    },
}

/// One answer of [`RecoveryWindow::since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryPage<'a, F> {
    /// Matching messages with `sequence_number > since`, in increasing order.
    pub messages: Vec<&'a RetainedMessage<F>>,
    /// `true` when the window holds every message numbered `since + 1 ..= head` and `since` is a
    /// number this history has reached; `false` means the client may have missed something.
    pub complete: bool,
    /// The oldest `sequence_number` still held (`None` when the window is empty).
    pub oldest_sequence: Option<u64>,
    /// Where to continue when `limit` cut the answer: pass it as the next `since`.
    pub next_since: Option<u64>,
}

/// The latest messages of the deployment, kept for clients that reconnect and ask what they
/// missed.
///
/// Messages are held in strictly increasing `sequence_number` order (not necessarily contiguous:
/// the caller may skip numbers), so lookups are a binary search. Eviction only ever removes the
/// oldest messages, so what the window holds is always a suffix of the history: every number in
/// `evicted_through() + 1 ..= head()` that was ever inserted is still here. That is what makes
/// [`RecoveryPage::complete`] a statement the client can trust.
#[derive(Debug, Clone)]
pub struct RecoveryWindow<F> {
    limits: WindowLimits,
    messages: VecDeque<RetainedMessage<F>>,
    /// The last inserted number, or the floor before any insert.
    head: u64,
    /// The highest number no longer (or never) held: the floor, raised by every eviction.
    evicted_through: u64,
}

/// Whether something stamped `timestamp_ms` is older than `max_age_ms` at `now_ms`.
/// A timestamp in the future counts as age 0 rather than wrapping around.
fn too_old(timestamp_ms: u64, now_ms: u64, max_age_ms: u64) -> bool {
    now_ms.saturating_sub(timestamp_ms) > max_age_ms
}

impl<F> RecoveryWindow<F> {
    /// An empty window for a fresh history: floor 0, head 0.
    pub fn new(limits: WindowLimits) -> Self {
        Self::with_floor(limits, 0)
    }

    /// An empty window for a history that already reached `floor` (e.g. after a restart):
    /// messages numbered `<= floor` were never held here, so a `since` below it is incomplete.
    /// The head starts at `floor`, so the next insert must be numbered above it.
    pub fn with_floor(limits: WindowLimits, floor: u64) -> Self {
        Self {
            limits,
            messages: VecDeque::with_capacity(limits.max_messages.min(4096)),
            head: floor,
            evicted_through: floor,
        }
    }

    /// Add the newest message.
    ///
    /// Refuses a number that is not greater than [`head`](Self::head). Then evicts the oldest
    /// messages beyond `max_messages` and those older than `now_ms - max_age_ms` (see
    /// [`expire`](Self::expire)). The message is stored once; `since` hands out references.
    pub fn insert(&mut self, msg: RetainedMessage<F>, now_ms: u64) -> Result<(), InsertError> {
        if msg.sequence_number <= self.head {
            return Err(InsertError::NotIncreasing {
                last: self.head,
                got: msg.sequence_number,
            });
        }
        self.head = msg.sequence_number;
        self.messages.push_back(msg);
        while self.messages.len() > self.limits.max_messages {
            self.evict_oldest();
        }
        self.expire(now_ms);
        Ok(())
    }

    /// Evict messages older than `now_ms - max_age_ms`; returns how many went.
    ///
    /// Eviction walks from the oldest and stops at the first message young enough to stay, so
    /// the window remains a suffix of the history. Timestamps follow commit order in practice;
    /// if a clock stepped back, an older-stamped message behind a younger one waits for it.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let mut evicted = 0;
        while self
            .messages
            .front()
            .is_some_and(|m| too_old(m.timestamp_ms, now_ms, self.limits.max_age_ms))
        {
            self.evict_oldest();
            evicted += 1;
        }
        evicted
    }

    fn evict_oldest(&mut self) {
        if let Some(gone) = self.messages.pop_front() {
            self.evicted_through = gone.sequence_number;
        }
    }

    /// Messages with `sequence_number > since`, in order, that pass `filter`, at most `limit`.
    ///
    /// The start is found by binary search (O(log n + k)); the older part is never scanned.
    /// Age is not checked here: call [`expire`](Self::expire) with the current time first, or
    /// the answer may include messages past `max_age_ms`.
    ///
    /// - `complete`: the window holds every message numbered `since + 1 ..= head` (`since` is
    ///   at or above [`evicted_through`](Self::evicted_through)) and `since <= head` (a `since`
    ///   beyond the head is a number this history never issued, e.g. from a wiped store).
    /// - `next_since`: `Some(number of the last returned message)` when `limit` cut the answer
    ///   and more matching messages follow, else `None`. With `limit == 0` and matches pending
    ///   it is `Some(since)`: nothing was returned, so the caller must continue from `since`
    ///   (callers should not ask for pages of zero).
    /// - `oldest_sequence`: the oldest number held, `None` when empty.
    pub fn since(
        &self,
        since: u64,
        limit: usize,
        mut filter: impl FnMut(&RetainedMessage<F>) -> bool,
    ) -> RecoveryPage<'_, F> {
        let start = self
            .messages
            .partition_point(|m| m.sequence_number <= since);
        let mut matching = self.messages.range(start..).filter(|m| filter(m));
        let messages: Vec<&RetainedMessage<F>> = matching.by_ref().take(limit).collect();
        // Only report a cut when another match really exists, so a client never pages into
        // an empty answer just because the limit happened to equal the remainder.
        let next_since = if matching.next().is_some() {
            Some(messages.last().map_or(since, |m| m.sequence_number))
        } else {
            None
        };
        RecoveryPage {
            messages,
            complete: since >= self.evicted_through && since <= self.head,
            oldest_sequence: self.oldest_sequence(),
            next_since,
        }
    }

    /// The last inserted `sequence_number`, or the floor when nothing was inserted yet.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The oldest `sequence_number` still held, `None` when the window is empty.
    pub fn oldest_sequence(&self) -> Option<u64> {
        self.messages.front().map(|m| m.sequence_number)
    }

    /// The highest number no longer held: `max(floor, highest evicted)`. A `since` below this
    /// cannot be answered completely from the window.
    pub fn evicted_through(&self) -> u64 {
        self.evicted_through
    }

    /// How many messages the window holds.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether the window holds no message.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The limits this window enforces.
    pub fn limits(&self) -> WindowLimits {
        self.limits
    }
}
