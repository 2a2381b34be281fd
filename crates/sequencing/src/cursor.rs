//! The seam between catch-up and live delivery, as a pure state machine.
//!
//! A subscription is a [`Cursor`]: a position in the log ("every message of the key numbered
//! up to here has been handed out") and a phase. While catching up it asks the shell to read
//! the log page by page ([`Step::ReadLog`]); once the in-memory tail holds everything after its
//! position it asks to take the rest from the cache and join live delivery in one atomic step
//! ([`Step::JoinFromCache`]); a live subscriber whose send queue is full leaves live delivery at
//! its position ([`Cursor::on_lagged`]) and catches up again. A cursor whose position falls
//! behind the log's retention floor can no longer be caught up without a gap
//! ([`Phase::Behind`]).
//!
//! [`resume`] and [`window_start`] decide where a subscription with `since` starts and whether
//! the client is told `recovered: true`. Nothing here reads a clock, a socket or a disk: the
//! shell passes in what it knows ([`View`]) and performs the step.

use crate::tail::TailCache;

/// How far back a resume (`since`) may reach: none older than `max_age_ms`, at most
/// `max_messages` of the newest numbers where a count bound is set, and never past the log's
/// retention floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimits {
    /// Most numbers a resume may reach back (`None`: no count bound, only age and retention).
    pub max_messages: Option<u64>,
    /// Oldest message age (ms) a resume may reach.
    pub max_age_ms: u64,
}

impl Default for WindowLimits {
    /// Time only: none older than 900 s, no count bound. (A global count bound would make a
    /// half-second drop unrecoverable on a busy server: it counts every key's messages.)
    fn default() -> Self {
        WindowLimits {
            max_messages: None,
            max_age_ms: 900_000,
        }
    }
}

impl WindowLimits {
    /// The oldest number the count bound lets a resume reach at `head` (1 without a bound).
    fn count_start(&self, head: u64) -> u64 {
        match self.max_messages {
            Some(n) => head.saturating_sub(n).saturating_add(1),
            None => 1,
        }
    }

    /// The oldest timestamp (ms) a resume may reach at `now_ms`: what
    /// [`LogFacts::first_within_age`] is looked up with.
    pub fn age_boundary_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.max_age_ms)
    }
}

/// The log facts a resume is judged against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogFacts {
    /// The newest number applied to live delivery (the seam's upper side).
    pub head: u64,
    /// The oldest number the log still holds.
    pub retention_floor: u64,
    /// The oldest retained number whose timestamp is within `max_age_ms` of now, or None when
    /// no retained message is that young.
    pub first_within_age: Option<u64>,
}

/// The oldest number a resume can be served from: every number in `window_start ..= head` is
/// inside the recovery window. Equals `head + 1` when the window is empty.
pub fn window_start(limits: WindowLimits, facts: LogFacts) -> u64 {
    let by_count = limits.count_start(facts.head);
    let by_age = facts.first_within_age.unwrap_or(facts.head + 1);
    by_count
        .max(by_age)
        .max(facts.retention_floor)
        .min(facts.head + 1)
}

/// [`window_start`] from the cached tail alone, when it is enough to know it exactly: the cache
/// reaches back past the age boundary, holds everything retained, or the count bound lies
/// inside it. `None`: ask the log ([`LogFacts::first_within_age`]).
pub fn cached_window_start<F>(
    limits: WindowLimits,
    head: u64,
    retention_floor: u64,
    now_ms: u64,
    cache: &TailCache<F>,
) -> Option<u64> {
    let min_ts = limits.age_boundary_ms(now_ms);
    let exact = cache.oldest_timestamp_ms().is_some_and(|t| t < min_ts)
        || cache.floor() <= retention_floor
        || limits.count_start(head) >= cache.floor();
    exact.then(|| {
        window_start(
            limits,
            LogFacts {
                head,
                retention_floor,
                first_within_age: cache.first_at_or_after(min_ts),
            },
        )
    })
}

/// Where a subscription with `since` starts, and what the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Every message after `since` is inside the window: start there, `recovered: true`.
    Complete {
        /// The cursor's start position (= `since`).
        after: u64,
    },
    /// The window no longer reaches `since + 1` (or `since` is a number this history never
    /// reached): serve what the window holds, `recovered: false` with `oldest_sequence`.
    Incomplete {
        /// The cursor's start position.
        after: u64,
        /// The oldest number the window holds (told to the client).
        oldest_sequence: u64,
    },
    /// `since` is beyond the head: a number this node has not applied — never issued by this
    /// history, or committed by another node and not applied here yet. The shell may wait for
    /// it to be applied and judge again; as it stands, nothing is replayed (the start is the
    /// head) and the client is told `recovered: false` with `oldest_sequence`.
    Ahead {
        /// The head (the cursor's start).
        head: u64,
        /// The oldest number the window holds (told to the client).
        oldest_sequence: u64,
    },
    /// `since` was numbered in another history (another epoch): it means nothing here. The
    /// subscription starts like one without `since`, and the client is told `recovered: false`.
    OtherEpoch,
}

impl Resume {
    /// `recovered` as told in `sub_ack` / `complete` in a recovery answer.
    pub fn recovered(self) -> bool {
        matches!(self, Resume::Complete { .. })
    }

    /// Where the cursor starts (`None` for another epoch's number: no replay).
    pub fn start(self) -> Option<u64> {
        match self {
            Resume::Complete { after } | Resume::Incomplete { after, .. } => Some(after),
            Resume::Ahead { head, .. } => Some(head),
            Resume::OtherEpoch => None,
        }
    }

    /// The oldest number the window holds, told with `recovered: false` (`None` otherwise).
    pub fn oldest_sequence(self) -> Option<u64> {
        match self {
            Resume::Incomplete {
                oldest_sequence, ..
            }
            | Resume::Ahead {
                oldest_sequence, ..
            } => Some(oldest_sequence),
            Resume::Complete { .. } | Resume::OtherEpoch => None,
        }
    }
}

/// Decide a resume: `since` and whether its epoch is this store's, against the window
/// `window_start ..= head`.
pub fn resume(since: u64, epoch_matches: bool, head: u64, window_start: u64) -> Resume {
    if !epoch_matches {
        return Resume::OtherEpoch;
    }
    if since > head {
        return Resume::Ahead {
            head,
            oldest_sequence: window_start,
        };
    }
    if since + 1 >= window_start {
        Resume::Complete { after: since }
    } else {
        Resume::Incomplete {
            after: window_start - 1,
            oldest_sequence: window_start,
        }
    }
}

/// What the shell knows when it asks a cursor for its next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// The newest number applied to live delivery. Log reads never go past it: a reader may
    /// see commits that live delivery has not applied yet, and those arrive live.
    pub head: u64,
    /// The oldest number the in-memory tail holds (`head + 1` when it is empty).
    pub cache_floor: u64,
    /// The oldest number the log still holds.
    pub retention_floor: u64,
}

impl View {
    /// Whether the in-memory tail holds every message after `after` up to the head (nothing is
    /// left to read from the log). The one cache-coverage rule: a cursor's next step, and the
    /// hub's check under its lock before it serves from the cache, both ask it.
    pub fn cache_covers(&self, after: u64) -> bool {
        after >= self.head || after + 1 >= self.cache_floor
    }
}

/// A cursor's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading history (log pages, then the cached tail) towards the head.
    CatchingUp,
    /// Registered for live delivery: every new message of the key is pushed as it commits.
    Live,
    /// Behind the retention floor: what it still needs is gone from the log. Terminal.
    Behind,
}

/// What the shell should do next for one cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing (live, or behind).
    Idle,
    /// Read the key's messages numbered in `(after, through]` from the log (one page, in one
    /// read transaction that also reports the retention floor), hand them out, then call
    /// [`Cursor::on_log_page`].
    ReadLog {
        /// The cursor's position.
        after: u64,
        /// The highest number worth reading from the log (the rest is cached).
        through: u64,
    },
    /// The in-memory tail holds everything after `after`: atomically with respect to live
    /// delivery, hand out the key's cached messages after `after` and register for live
    /// delivery ([`Cursor::on_joined`]) — or, if they are more than one page, hand out a page
    /// and call [`Cursor::on_cache_page`].
    JoinFromCache {
        /// The cursor's position.
        after: u64,
    },
    /// The cursor fell behind the retention floor: close the subscriber (it resumes with
    /// `recovered: false`).
    Behind {
        /// The cursor's position.
        position: u64,
        /// The retention floor it fell behind.
        floor: u64,
    },
}

/// Whether the retention floor `floor` passed a cursor at `position`: the log may no longer hold
/// the next message it needs. The one behind-the-floor rule.
fn floor_passed(floor: u64, position: u64) -> bool {
    floor > position + 1
}

/// One subscription's position and phase. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    position: u64,
    phase: Phase,
}

impl Cursor {
    /// A cursor that starts catching up after `position`.
    pub fn catching_up(position: u64) -> Self {
        Cursor {
            position,
            phase: Phase::CatchingUp,
        }
    }

    /// Every message of the key numbered up to this has been handed out (or skipped by the
    /// start rule); while live, the position at which it joined or last lagged.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The next step, given what the shell knows now. A catching-up cursor whose position is
    /// below the retention floor becomes [`Phase::Behind`].
    pub fn next_step(&mut self, view: View) -> Step {
        match self.phase {
            Phase::Live => Step::Idle,
            Phase::Behind => Step::Behind {
                position: self.position,
                floor: view.retention_floor,
            },
            Phase::CatchingUp => {
                if floor_passed(view.retention_floor, self.position) {
                    self.phase = Phase::Behind;
                    Step::Behind {
                        position: self.position,
                        floor: view.retention_floor,
                    }
                } else if view.cache_covers(self.position) {
                    Step::JoinFromCache {
                        after: self.position,
                    }
                } else {
                    Step::ReadLog {
                        after: self.position,
                        through: view.head.min(view.cache_floor - 1),
                    }
                }
            }
        }
    }

    /// A log page was handed out: it accounted for every message of the key up to
    /// `covered_through`, and was read together with retention floor `floor`. If the floor had
    /// passed the position, messages may be missing from the page: the cursor is behind.
    pub fn on_log_page(&mut self, covered_through: u64, floor: u64) -> Phase {
        if self.phase != Phase::CatchingUp {
            return self.phase;
        }
        if floor_passed(floor, self.position) {
            self.phase = Phase::Behind;
        } else {
            self.position = self.position.max(covered_through);
        }
        self.phase
    }

    /// A page of cached messages up to `through` was handed out; still catching up.
    pub fn on_cache_page(&mut self, through: u64) {
        if self.phase == Phase::CatchingUp {
            self.position = self.position.max(through);
        }
    }

    /// Everything up to `head` was handed out and the subscriber is registered for live
    /// delivery of what follows.
    pub fn on_joined(&mut self, head: u64) {
        if self.phase == Phase::CatchingUp {
            self.position = self.position.max(head);
            self.phase = Phase::Live;
        }
    }

    /// Live delivery could not queue message `sequence_number` (the send queue was full): the
    /// subscriber left live delivery, everything before it was handed out, and it catches up
    /// from there.
    pub fn on_lagged(&mut self, sequence_number: u64) {
        if self.phase == Phase::Live {
            self.position = self.position.max(sequence_number.saturating_sub(1));
            self.phase = Phase::CatchingUp;
        }
    }
}
