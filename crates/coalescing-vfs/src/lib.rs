//! A SQLite VFS shim that hands a transaction's WAL frames to the file system in one write.
//!
//! SQLite writes each WAL frame with two `write` calls (its 24-byte header, then the page), so a
//! commit that dirties 100 pages costs 200 system calls before its `fsync`. This shim wraps the
//! default VFS and, for WAL files only, collects contiguous writes in a buffer and passes them on
//! as one write:
//!
//! - **at the end of every commit frame** (a frame whose header carries the database size: the
//!   last frame of a transaction), so a commit's frames are in the file before SQLite syncs the
//!   WAL or publishes them in the WAL index — in every `synchronous` mode, other connections
//!   never look for a frame that is still in the buffer;
//! - before every read, sync, truncate, size query, file control and close of that file, and
//!   whenever a write does not continue the buffered run or would grow it past
//!   [`MAX_PENDING_BYTES`].
//!
//! What reaches the disk, and in which order relative to each `fsync`, is what SQLite asked for;
//! only the number of system calls changes. Database, journal and temporary files are opened by
//! the wrapped VFS itself and never pass through the shim.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let vfs = seqcast_coalescing_vfs::register()?;
//! let conn = rusqlite::Connection::open_with_flags_and_vfs(
//!     dir.path().join("db.sqlite"),
//!     rusqlite::OpenFlags::default(),
//!     vfs,
//! )?;
//! conn.pragma_update(None, "journal_mode", "WAL")?;
//! conn.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")?;
//! # Ok(())
//! # }
//! ```

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

mod shim;

/// The name the shim is registered under; pass it to
/// [`rusqlite::Connection::open_with_flags_and_vfs`].
pub const VFS_NAME: &str = "seqcast-coalescing";

/// The most bytes a WAL file keeps buffered; a write that would grow the buffer past this first
/// sends what is buffered (a larger single write goes to the file directly).
pub const MAX_PENDING_BYTES: usize = 1 << 20;

/// Why [`register`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// `sqlite3_vfs_find(NULL)` found no default VFS to wrap (SQLite failed to initialize).
    #[error("SQLite has no default VFS to wrap")]
    NoDefaultVfs,
    /// `sqlite3_vfs_register` returned this result code.
    #[error("registering the coalescing VFS failed with SQLite result code {0}")]
    Register(i32),
}

/// Registers the shim (once per process; later calls return the first call's result) around the
/// default VFS as it is at that moment, and returns the name to open connections with. The
/// default VFS stays the default.
pub fn register() -> Result<&'static str, RegisterError> {
    static REGISTERED: OnceLock<Result<(), RegisterError>> = OnceLock::new();
    (*REGISTERED.get_or_init(shim::register)).map(|()| VFS_NAME)
}

/// Process-wide counts of WAL writes, for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// `write` calls SQLite made on WAL files opened through the shim.
    pub writes_received: u64,
    /// `write` calls the shim made on the wrapped files.
    pub writes_issued: u64,
}

static WRITES_RECEIVED: AtomicU64 = AtomicU64::new(0);
static WRITES_ISSUED: AtomicU64 = AtomicU64::new(0);

/// The counts since the process started.
pub fn stats() -> Stats {
    Stats {
        writes_received: WRITES_RECEIVED.load(Ordering::Relaxed),
        writes_issued: WRITES_ISSUED.load(Ordering::Relaxed),
    }
}
