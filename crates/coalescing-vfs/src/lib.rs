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
//! - a commit frame's header that does not continue the buffered run (SQLite rewriting frame
//!   headers in place at the end of a transaction that changed a page it had spilled) is written
//!   through at once: it can be the last write of a commit, with no page after it;
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

use std::ffi::CString;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

mod buffer;
mod shim;

/// The name the shim is registered under; pass it to
/// [`rusqlite::Connection::open_with_flags_and_vfs`].
pub const VFS_NAME: &str = "seqcast-coalescing";

/// The most bytes a WAL file keeps buffered; a write that would grow the buffer past this first
/// sends what is buffered (a larger single write goes to the file directly).
pub const MAX_PENDING_BYTES: usize = 1 << 20;

/// Why [`register`] or [`register_over`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// `sqlite3_vfs_find` found no VFS to wrap: no default VFS (SQLite failed to initialize), or
    /// none registered under the name given to [`register_over`].
    #[error("SQLite has no such VFS to wrap")]
    NoSuchVfs,
    /// A VFS is already registered under the name given to [`register_over`] (or, for
    /// [`register`], under [`VFS_NAME`] by [`register_over`]).
    #[error("a VFS of that name is already registered")]
    NameTaken,
    /// A name given to [`register_over`] contains a NUL byte.
    #[error("a VFS name contains a NUL byte")]
    InvalidName,
    /// `sqlite3_vfs_register` returned this result code.
    #[error("registering the coalescing VFS failed with SQLite result code {0}")]
    Register(i32),
}

/// Registers the shim (once per process; later calls return the first call's result) around the
/// default VFS as it is at that moment, and returns the name to open connections with. The
/// default VFS stays the default.
pub fn register() -> Result<&'static str, RegisterError> {
    static REGISTERED: OnceLock<Result<(), RegisterError>> = OnceLock::new();
    (*REGISTERED.get_or_init(|| shim::register(c"seqcast-coalescing", None))).map(|()| VFS_NAME)
}

/// Registers another instance of the shim, named `name`, around the VFS registered as `wrapped`
/// (which must be registered already and stay so; SQLite never frees a VFS). The default VFS
/// stays the default. Each name can be registered once per process (its copy is kept for good).
///
/// As with [`register`], the shim is a copy of the wrapped VFS with its own `xOpen`: the wrapped
/// VFS's other methods are called with the shim's pointer, so it must reach its state through
/// `pAppData` only, as SQLite's own VFSes do.
///
/// This is how a VFS can be put *under* the shim: the crate's crash-point tests wrap a VFS that
/// records every write and sync the shim hands down (`tests/crash_points.rs`).
pub fn register_over(name: &str, wrapped: &str) -> Result<(), RegisterError> {
    let name = CString::new(name).map_err(|_| RegisterError::InvalidName)?;
    let wrapped = CString::new(wrapped).map_err(|_| RegisterError::InvalidName)?;
    // SQLite keeps the name pointer for as long as the VFS is registered: for good.
    let name: &'static std::ffi::CStr = Box::leak(name.into_boxed_c_str());
    shim::register(name, Some(&wrapped))
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
