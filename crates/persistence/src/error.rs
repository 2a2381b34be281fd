//! The store's one error type (how SQLite's and PostgreSQL's errors map onto it is in each
//! backend's module).

/// Why a store operation failed.
///
/// The variants are sorted by what the caller should do, not by what the database said: the
/// server maps `Unavailable`, `Closed` and `Stopped` to HTTP 503, and the others to the status
/// that fits its request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database cannot take writes (or reads) right now: read-only file, disk full,
    /// locked/busy past the busy timeout, an I/O error, or a file that cannot be opened. The
    /// writer keeps running; a later command may succeed once the condition clears.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database refused this command: a constraint failed (for example `data` is not
    /// JSON) or the command was invalid. Other commands are unaffected.
    #[error("rejected by the database: {0}")]
    Rejected(String),
    /// The writer thread has stopped; no further writes are possible through this handle.
    #[error("the database writer is closed")]
    Closed,
    /// The writer stopped taking writes for good because its commit hook failed: events
    /// were committed but could not be delivered (see [`crate::CommitHook`]). A publisher
    /// answered this may retry with the same message id elsewhere or after a restart.
    #[error("the store stopped: {0}")]
    Stopped(String),
    /// The file is not a seqcast database this build can use: SQLite reports corruption, a
    /// stored value breaks the schema's rules, or the schema is newer than this build.
    #[error("database corrupt or incompatible: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// True for [`StoreError::Unavailable`]: the condition is expected to be temporary.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}
