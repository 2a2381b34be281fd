//! How a store is opened: file, durability level, queue bound, and the test-only fault hook.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::actor::{DEFAULT_MAX_GROUP_EVENTS, DEFAULT_QUEUE_CAPACITY};

/// SQLite's `PRAGMA synchronous` for the write connection (the journal is always WAL).
///
/// * `Full` (default): the WAL is fsynced at every COMMIT. A publish that was answered
///   survives power loss and OS crashes.
/// * `Normal`: the WAL is fsynced only at checkpoints. The database is never corrupted, and a
///   process crash loses nothing, but the last commits before a power loss or OS crash may be
///   rolled back — publishers may have been answered (and clients sent) numbers that the
///   database no longer has after the reboot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Synchronous {
    /// fsync the WAL at every commit.
    #[default]
    Full,
    /// fsync only at checkpoints; recent commits may be lost on power loss.
    Normal,
}

impl Synchronous {
    /// The pragma value, `"FULL"` or `"NORMAL"`.
    pub fn as_pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

impl fmt::Display for Synchronous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Synchronous::Full => "full",
            Synchronous::Normal => "normal",
        })
    }
}

/// A `synchronous` setting other than `full` or `normal`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown synchronous mode {0:?}; expected \"full\" or \"normal\"")]
pub struct ParseSynchronousError(pub String);

impl FromStr for Synchronous {
    type Err = ParseSynchronousError;

    /// Accepts `full` and `normal`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("full") {
            Ok(Synchronous::Full)
        } else if s.eq_ignore_ascii_case("normal") {
            Ok(Synchronous::Normal)
        } else {
            Err(ParseSynchronousError(s.to_owned()))
        }
    }
}

/// Default time SQLite waits for a lock held by another connection.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything [`crate::DbWriter::open`] needs. Build with [`StoreConfig::new`] and override
/// fields with struct-update syntax.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The SQLite file; created (with its directory's permission) when missing.
    pub path: PathBuf,
    /// Durability of each commit; see [`Synchronous`].
    pub synchronous: Synchronous,
    /// Bound of the command queue: when it is full, [`crate::EventWriter::append`] waits
    /// (backpressure) instead of growing memory. At least 1.
    pub queue_capacity: usize,
    /// How long a write waits for a lock held by another connection before it fails with
    /// [`crate::StoreError::Unavailable`].
    pub busy_timeout: Duration,
    /// Group commit (default `true`): one transaction takes every command already queued.
    /// `false` gives one transaction per command — only useful to measure what group commit
    /// buys (see `examples/publish_bench.rs`).
    pub group_commit: bool,
    /// The most events one group transaction takes (a single larger command is still taken
    /// whole, as batches are all-or-nothing). At least 1.
    pub max_group_events: usize,
    /// Test-only fault injection at the store boundary; `None` in production.
    pub fault: Option<FaultInjector>,
}

impl StoreConfig {
    /// Defaults for the store at `path`: FULL sync, queue of 4096, 5 s busy timeout, group
    /// commit of up to 4096 events, no faults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StoreConfig {
            path: path.into(),
            synchronous: Synchronous::default(),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            group_commit: true,
            max_group_events: DEFAULT_MAX_GROUP_EVENTS,
            fault: None,
        }
    }
}

/// Fault injection for tests at the store boundary. Cheap to clone; all clones share state,
/// so a test keeps one clone and gives another to [`StoreConfig::fault`].
///
/// Faults are real: a failed commit is really rolled back, so the database is unchanged.
/// Not meant for production configuration; the server exposes it only to its tests.
#[derive(Debug, Clone, Default)]
pub struct FaultInjector {
    commit_failures: Arc<AtomicU64>,
    /// Commits left before the writer thread dies; `0` = never armed.
    writer_death: Arc<AtomicU64>,
}

impl FaultInjector {
    /// An injector with no fault armed.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next `n` transactions that reach COMMIT are rolled back instead, and every command
    /// in them gets [`crate::StoreError::Unavailable`]. Replaces any count still pending.
    pub fn fail_next_commits(&self, n: u64) {
        self.commit_failures.store(n, Ordering::SeqCst);
    }

    /// How many injected commit failures are still armed.
    pub fn pending_commit_failures(&self) -> u64 {
        self.commit_failures.load(Ordering::SeqCst)
    }

    /// The writer thread dies (panics, as a bug would make it) when it takes its next group
    /// after `commits` more committed transactions (`0`: at its next group). Publishes then
    /// get [`crate::StoreError::Closed`] and the writer's health says it stopped.
    pub fn kill_writer_after(&self, commits: u64) {
        self.writer_death.store(commits + 1, Ordering::SeqCst);
    }

    /// True when the writer thread should die now (called before each group).
    pub(crate) fn writer_dies_now(&self) -> bool {
        self.writer_death.load(Ordering::SeqCst) == 1
    }

    /// One transaction committed: one step closer to an armed writer death.
    pub(crate) fn committed(&self) {
        let _ = self
            .writer_death
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n > 1).then(|| n - 1)
            });
    }

    /// Consumes one armed commit failure, if any.
    pub(crate) fn take_commit_failure(&self) -> bool {
        self.commit_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}
