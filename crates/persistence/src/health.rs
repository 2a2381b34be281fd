//! What the writer side says about itself ([`crate::EventWriter::health`]): for readiness,
//! metrics and the operator's page, the same shape for every backend.

/// A snapshot of a writer's counters since it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriterStats {
    /// Append commands the writer has taken (off the queue, where there is one).
    pub commands_received: u64,
    /// Transactions committed (each one group; each one hook call).
    pub transactions_committed: u64,
    /// Transactions that failed at BEGIN or COMMIT, or were lost to an I/O error (every
    /// command in them got an error).
    pub transactions_failed: u64,
    /// Events committed.
    pub events_committed: u64,
}

/// The writer's state at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WriterHealth {
    /// Why the writer takes no more appends, once it stopped for good: closed, its thread
    /// died, or its commit hook failed. `None` while it runs.
    pub stopped: Option<String>,
    /// Why appends fail right now for a reason of the database's that may clear by itself
    /// (read-only, full, locked past the busy timeout, I/O error, file replaced, connection
    /// lost, a synchronous standby not confirming, the node's tail not reading the log);
    /// `None` while writes work. [`crate::EventWriter::probe`] checks again.
    pub unwritable: Option<String>,
    /// Counters since open.
    pub stats: WriterStats,
    /// Commands waiting in the writer's queue; `None` for a backend without a queue (memory:
    /// an append runs on the caller's task).
    pub queued_commands: Option<usize>,
    /// PostgreSQL: this node's ordered tail of the log; `None` elsewhere.
    pub tail: Option<TailHealth>,
}

/// A PostgreSQL node's ordered tail (the only way events reach its commit hook).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TailHealth {
    /// The highest number this node's tail applied.
    pub applied: u64,
    /// The highest number this node knows was committed (on any node).
    pub seen_head: u64,
    /// The tail's LISTEN connection is up.
    pub connected: bool,
    /// Milliseconds since the tail last read the log successfully.
    pub since_read_ms: Option<u64>,
}
