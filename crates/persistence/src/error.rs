//! The store's one error type and how SQLite's result codes map onto it.

use rusqlite::ErrorCode;

/// Why a store operation failed.
///
/// The variants are sorted by what the caller should do, not by what SQLite said: the server
/// maps `Unavailable` to HTTP 503, and the others to the status that fits its request.
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

/// SQLite result codes that say the database cannot work right now (→ `Unavailable`).
fn is_unavailable_code(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::ReadOnly
            | ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::OutOfMemory
            | ErrorCode::PermissionDenied
            | ErrorCode::NoLargeFileSupport
    )
}

fn is_corrupt_code(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
}

/// True when `code` is about the database rather than one command: every command of the
/// transaction fails with it, instead of the command alone.
pub(crate) fn is_database_condition(code: ErrorCode) -> bool {
    is_unavailable_code(code) || is_corrupt_code(code)
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        let text = err.to_string();
        match sqlite_code(&err) {
            Some(code) if is_unavailable_code(code) => StoreError::Unavailable(text),
            Some(code) if is_corrupt_code(code) => StoreError::Corrupt(text),
            _ => StoreError::Rejected(text),
        }
    }
}

impl StoreError {
    /// Classifies `err` without consuming it (rusqlite's error is not `Clone`).
    pub(crate) fn from_ref(err: &rusqlite::Error) -> StoreError {
        match err {
            rusqlite::Error::SqliteFailure(e, msg) => {
                StoreError::from(rusqlite::Error::SqliteFailure(*e, msg.clone()))
            }
            other => StoreError::Rejected(other.to_string()),
        }
    }
}

/// SQLite's primary result code of `err`, if it came from SQLite.
pub(crate) fn sqlite_code(err: &rusqlite::Error) -> Option<ErrorCode> {
    match err {
        rusqlite::Error::SqliteFailure(e, _) => Some(e.code),
        _ => None,
    }
}

/// Converts a stored integer that must be a non-negative number.
pub(crate) fn stored_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {value}")))
}

/// Converts a caller's number to SQLite's integer, saturating: every stored number is below
/// `i64::MAX`, so a larger bound selects the same rows.
pub(crate) fn sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Converts a caller's limit to SQLite's integer, saturating.
pub(crate) fn sql_limit(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
