//! How SQLite's result codes map onto [`StoreError`], and SQLite's integer conversions.

use rusqlite::ErrorCode;

use crate::error::StoreError;

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
