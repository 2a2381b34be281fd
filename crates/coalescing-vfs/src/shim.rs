//! The C side: a `sqlite3_vfs` whose `xOpen` wraps WAL files in a buffering `sqlite3_file`.
//!
//! Every other file, and every other VFS method, is the wrapped VFS's own: `xOpen` opens them
//! straight into the memory SQLite allocated (which is large enough for either), so SQLite calls
//! the wrapped VFS's methods on them directly.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use rusqlite::ffi;

use crate::{MAX_PENDING_BYTES, RegisterError, WRITES_ISSUED, WRITES_RECEIVED};

/// SQLite's WAL frame header size: a 24-byte write to a WAL file is a frame header.
const FRAME_HEADER_BYTES: usize = 24;
/// SQLite's WAL file header size: frames start after it.
const WAL_HEADER_BYTES: i64 = 32;

/// The VFS this one wraps (set once, before registration).
static WRAPPED: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(ptr::null_mut());

/// What SQLite allocates for a WAL file opened through the shim: this header, then (at
/// [`INNER_OFFSET`]) the wrapped VFS's own file.
#[repr(C)]
struct CoalescingFile {
    /// `pMethods` points at [`WAL_METHODS`].
    base: ffi::sqlite3_file,
    /// Owned (`Box::into_raw`); freed by [`close`].
    pending: *mut Pending,
}

/// The buffered run of writes of one WAL file.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// File offset of `bytes[0]`.
    offset: i64,
    /// The last write was a commit frame's header: its page is the last write of the commit.
    commit_frame_next: bool,
}

const INNER_OFFSET: usize = size_of::<CoalescingFile>().next_multiple_of(16);

pub(crate) fn register() -> Result<(), RegisterError> {
    // SAFETY: `sqlite3_vfs_find` initializes SQLite if needed and returns a pointer to a VFS
    // that stays registered (SQLite never frees a VFS), or null.
    let wrapped = unsafe { ffi::sqlite3_vfs_find(ptr::null()) };
    if wrapped.is_null() {
        return Err(RegisterError::NoDefaultVfs);
    }
    WRAPPED.store(wrapped, Ordering::Release);
    // SAFETY: `wrapped` is a valid, registered VFS (above); copying it copies plain data and
    // function pointers. Its methods other than `xOpen` are called with this VFS's pointer;
    // SQLite's own VFSes reach their state only through `pAppData`, which is copied with them.
    let mut vfs: ffi::sqlite3_vfs = unsafe { *wrapped };
    let wrapped_size = usize::try_from(vfs.szOsFile).unwrap_or(0);
    vfs.szOsFile = c_int::try_from(INNER_OFFSET + wrapped_size).unwrap_or(c_int::MAX);
    vfs.pNext = ptr::null_mut();
    vfs.zName = c"seqcast-coalescing".as_ptr();
    vfs.xOpen = Some(open);
    let vfs = Box::leak(Box::new(vfs));
    // SAFETY: `vfs` is leaked, so it lives as long as the process, as SQLite requires.
    let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 0) };
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(RegisterError::Register(rc))
    }
}

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    // Version 1: WAL files are never memory-mapped nor asked for shared memory (both belong to
    // the database file).
    iVersion: 1,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

fn inner_of(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    file.cast::<u8>().wrapping_add(INNER_OFFSET).cast()
}

/// The wrapped file's methods.
///
/// # Safety
/// `inner` is a file the wrapped VFS opened successfully and has not closed.
unsafe fn methods<'a>(inner: *mut ffi::sqlite3_file) -> &'a ffi::sqlite3_io_methods {
    // SAFETY: an open file's `pMethods` points at its VFS's static method table.
    unsafe { &*(*inner).pMethods }
}

/// # Safety
/// `file` is a [`CoalescingFile`] that [`open`] set up and [`close`] has not freed.
unsafe fn pending<'a>(file: *mut ffi::sqlite3_file) -> &'a mut Pending {
    // SAFETY: per the contract, `pending` is the live box `open` made; SQLite uses a file from
    // one thread at a time, so this is the only reference.
    unsafe { &mut *(*file.cast::<CoalescingFile>()).pending }
}

/// The most bytes handed to the wrapped file in one write: SQLite's unix VFS keeps only the low
/// 17 bits of a write's length (its own writes are at most a 64 KiB page), so longer runs go in
/// pieces of 124 KiB.
const MAX_WRITE_BYTES: usize = 0x1ffff & !0xfff;

/// Writes `bytes` at `offset` to the wrapped file, in pieces of at most [`MAX_WRITE_BYTES`].
///
/// # Safety
/// As [`methods`].
unsafe fn write_through(inner: *mut ffi::sqlite3_file, bytes: &[u8], offset: i64) -> c_int {
    // SAFETY: per the contract `inner` is open.
    let Some(x_write) = (unsafe { methods(inner) }).xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let mut at = offset;
    for piece in bytes.chunks(MAX_WRITE_BYTES) {
        WRITES_ISSUED.fetch_add(1, Ordering::Relaxed);
        // A piece is at most MAX_WRITE_BYTES, so it fits a c_int and an i64.
        let amount = piece.len() as c_int;
        // SAFETY: `inner` is open; `piece` is valid for `amount` bytes.
        let rc = unsafe { x_write(inner, piece.as_ptr().cast(), amount, at) };
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        at += piece.len() as i64;
    }
    ffi::SQLITE_OK
}

/// Sends the buffered run to the wrapped file. The buffer is empty afterwards either way: what
/// failed to write belongs to a transaction SQLite now fails.
///
/// # Safety
/// As [`pending`].
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: per the contract.
    let pending = unsafe { pending(file) };
    pending.commit_frame_next = false;
    if pending.bytes.is_empty() {
        return ffi::SQLITE_OK;
    }
    // SAFETY: the inner file is open while the shim's is.
    let rc = unsafe { write_through(inner_of(file), &pending.bytes, pending.offset) };
    pending.bytes.clear();
    rc
}

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let wrapped = WRAPPED.load(Ordering::Acquire);
    // SAFETY: `register` stored a valid VFS before this VFS could be found by name.
    let Some(wrapped_open) = (unsafe { (*wrapped).xOpen }) else {
        return ffi::SQLITE_CANTOPEN;
    };
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // SAFETY: SQLite allocated `szOsFile` bytes at `file`, more than the wrapped VFS needs.
        return unsafe { wrapped_open(wrapped, name, file, flags, out_flags) };
    }
    let shim = file.cast::<CoalescingFile>();
    let inner = inner_of(file);
    // SAFETY: `file` points at `szOsFile` writable bytes: the header, then the wrapped file's
    // room at `INNER_OFFSET`. SQLite calls `xClose` only when `pMethods` is set, so it stays
    // null until the inner open succeeded.
    unsafe {
        (*shim).base.pMethods = ptr::null();
        (*shim).pending = ptr::null_mut();
        let rc = wrapped_open(wrapped, name, inner, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            // A failed open that set its methods still wants its `xClose`.
            if !(*inner).pMethods.is_null()
                && let Some(x_close) = methods(inner).xClose
            {
                x_close(inner);
            }
            return rc;
        }
        (*shim).pending = Box::into_raw(Box::default());
        (*shim).base.pMethods = &WAL_METHODS;
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes a file once, after its last use; `open` set it up.
    unsafe {
        let flushed = flush(file);
        let inner = inner_of(file);
        let closed = match methods(inner).xClose {
            Some(x_close) => x_close(inner),
            None => ffi::SQLITE_OK,
        };
        let shim = file.cast::<CoalescingFile>();
        drop(Box::from_raw((*shim).pending));
        (*shim).pending = ptr::null_mut();
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            closed
        }
    }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    WRITES_RECEIVED.fetch_add(1, Ordering::Relaxed);
    let Ok(len) = usize::try_from(amount) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    if len == 0 {
        return ffi::SQLITE_OK;
    }
    // SAFETY: SQLite passes `amount` readable bytes at `data`; `file` is open.
    let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
    // SAFETY: `file` is open (SQLite never writes a closed file).
    let pending = unsafe { pending(file) };
    let continues = !pending.bytes.is_empty()
        && pending.offset + pending.bytes.len() as i64 == offset
        && pending.bytes.len() + len <= MAX_PENDING_BYTES;
    let ends_commit = pending.commit_frame_next;
    if !continues {
        // SAFETY: as above.
        let rc = unsafe { flush(file) };
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        if len > MAX_PENDING_BYTES {
            // SAFETY: as above; the inner file is open while the shim's is.
            return unsafe { write_through(inner_of(file), bytes, offset) };
        }
        pending.offset = offset;
    }
    pending.bytes.extend_from_slice(bytes);
    if ends_commit {
        // The page of a commit frame: the transaction's frames are complete.
        // SAFETY: as above.
        return unsafe { flush(file) };
    }
    // A frame header's bytes 4..8 are the database size in pages after a commit, zero in every
    // other frame.
    pending.commit_frame_next =
        len == FRAME_HEADER_BYTES && offset >= WAL_HEADER_BYTES && bytes[4..8] != [0, 0, 0, 0];
    ffi::SQLITE_OK
}

/// Defines a method that sends the buffer first, then calls the wrapped file's method.
macro_rules! flush_then {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*), $default:expr) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            // SAFETY: SQLite calls methods only on open files; `open` set this one up.
            unsafe {
                let rc = flush(file);
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
                let inner = inner_of(file);
                match methods(inner).$method {
                    Some(method) => method(inner, $($arg),*),
                    None => $default,
                }
            }
        }
    };
}

/// Defines a method that calls the wrapped file's method (the buffer does not matter to it).
macro_rules! pass_through {
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*), $default:expr) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            let inner = inner_of(file);
            // SAFETY: SQLite calls methods only on open files; `open` set this one up.
            unsafe {
                match methods(inner).$method {
                    Some(method) => method(inner, $($arg),*),
                    None => $default,
                }
            }
        }
    };
}

flush_then!(
    read,
    xRead,
    (buffer: *mut c_void, amount: c_int, offset: i64),
    ffi::SQLITE_IOERR_READ
);
flush_then!(truncate, xTruncate, (size: i64), ffi::SQLITE_IOERR_TRUNCATE);
flush_then!(sync, xSync, (flags: c_int), ffi::SQLITE_OK);
flush_then!(file_size, xFileSize, (size: *mut i64), ffi::SQLITE_IOERR_FSTAT);
flush_then!(
    file_control,
    xFileControl,
    (op: c_int, arg: *mut c_void),
    ffi::SQLITE_NOTFOUND
);
pass_through!(lock, xLock, (level: c_int), ffi::SQLITE_OK);
pass_through!(unlock, xUnlock, (level: c_int), ffi::SQLITE_OK);
pass_through!(
    check_reserved_lock,
    xCheckReservedLock,
    (out: *mut c_int),
    ffi::SQLITE_OK
);
pass_through!(sector_size, xSectorSize, (), 4096);
pass_through!(device_characteristics, xDeviceCharacteristics, (), 0);
