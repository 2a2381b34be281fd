//! The C side: a `sqlite3_vfs` whose `xOpen` wraps WAL files in a buffering `sqlite3_file`.
//!
//! Every other file, and every other VFS method, is the wrapped VFS's own: `xOpen` opens them
//! straight into the memory SQLite allocated (which is large enough for either), so SQLite calls
//! the wrapped VFS's methods on them directly.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_int, c_void};
use std::ptr;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use rusqlite::ffi;

use crate::buffer::WalBuffer;
use crate::{RegisterError, WRITES_ISSUED, WRITES_RECEIVED};

/// What the shim registers: a copy of the wrapped VFS (so SQLite calls the wrapped VFS's own
/// methods, other than `xOpen`, with this pointer; SQLite's VFSes reach their state only through
/// `pAppData`, which is copied with them), followed by the VFS it wraps.
#[repr(C)]
struct ShimVfs {
    base: ffi::sqlite3_vfs,
    /// A registered VFS (SQLite never frees one).
    wrapped: *mut ffi::sqlite3_vfs,
}

/// What SQLite allocates for a WAL file opened through the shim: this header, then (at
/// [`INNER_OFFSET`]) the wrapped VFS's own file.
#[repr(C)]
struct CoalescingFile {
    /// `pMethods` points at [`WAL_METHODS`].
    base: ffi::sqlite3_file,
    /// Owned (`Box::into_raw`); freed by [`close`].
    buffer: *mut WalBuffer,
}

const INNER_OFFSET: usize = size_of::<CoalescingFile>().next_multiple_of(16);

/// Registers a shim named `name` around the VFS registered as `wrapped` (the default VFS when
/// `None`). Registrations are serialized so that a name is taken once.
pub(crate) fn register(name: &'static CStr, wrapped: Option<&CStr>) -> Result<(), RegisterError> {
    static REGISTERING: Mutex<()> = Mutex::new(());
    let _registering = REGISTERING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: `sqlite3_vfs_find` initializes SQLite if needed and takes a NUL-terminated name
    // (or null for the default); it returns a VFS that stays registered, or null.
    let taken = unsafe { ffi::sqlite3_vfs_find(name.as_ptr()) };
    if !taken.is_null() {
        return Err(RegisterError::NameTaken);
    }
    // SAFETY: as above.
    let wrapped = unsafe { ffi::sqlite3_vfs_find(wrapped.map_or(ptr::null(), CStr::as_ptr)) };
    if wrapped.is_null() {
        return Err(RegisterError::NoSuchVfs);
    }
    // SAFETY: `wrapped` is a valid, registered VFS (above); copying it copies plain data and
    // function pointers.
    let mut vfs: ffi::sqlite3_vfs = unsafe { *wrapped };
    let wrapped_size = usize::try_from(vfs.szOsFile).unwrap_or(0);
    vfs.szOsFile = c_int::try_from(INNER_OFFSET + wrapped_size).unwrap_or(c_int::MAX);
    vfs.pNext = ptr::null_mut();
    vfs.zName = name.as_ptr();
    vfs.xOpen = Some(open);
    let shim = Box::leak(Box::new(ShimVfs { base: vfs, wrapped }));
    // SAFETY: `shim` is leaked, so it lives as long as the process, as SQLite requires; its
    // first field is the `sqlite3_vfs` (`repr(C)`), so SQLite hands [`open`] this pointer back.
    let rc = unsafe { ffi::sqlite3_vfs_register(&raw mut shim.base, 0) };
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

/// The file's buffer and a sink that writes to its wrapped file, counting each write.
///
/// The two never alias: the buffer is its own allocation (`Box`), the wrapped file lives at
/// [`INNER_OFFSET`] in SQLite's allocation, and the sink holds only a raw pointer to it.
///
/// # Safety
/// `file` is a [`CoalescingFile`] that [`open`] set up and [`close`] has not freed, and the
/// caller holds no other reference to its buffer (SQLite uses a file from one thread at a time,
/// and each method takes the buffer once).
unsafe fn buffer_and_sink<'a>(
    file: *mut ffi::sqlite3_file,
) -> (
    &'a mut WalBuffer,
    impl FnMut(&[u8], i64) -> Result<(), c_int>,
) {
    // SAFETY: per the contract, `buffer` is the live box `open` made and this is the only
    // reference to it.
    let buffer = unsafe { &mut *(*file.cast::<CoalescingFile>()).buffer };
    let inner = inner_of(file);
    let sink = move |piece: &[u8], at: i64| {
        WRITES_ISSUED.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the inner file is open while the shim's is (per the contract).
        let Some(x_write) = (unsafe { methods(inner) }).xWrite else {
            return Err(ffi::SQLITE_IOERR_WRITE);
        };
        // The buffer hands over pieces of at most MAX_WRITE_BYTES: the length fits a c_int.
        let amount = piece.len() as c_int;
        // SAFETY: `inner` is open; `piece` is valid for `amount` bytes.
        match unsafe { x_write(inner, piece.as_ptr().cast(), amount, at) } {
            ffi::SQLITE_OK => Ok(()),
            rc => Err(rc),
        }
    };
    (buffer, sink)
}

/// Sends the buffered run to the wrapped file.
///
/// # Safety
/// As [`buffer_and_sink`].
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: per the contract.
    let (buffer, mut sink) = unsafe { buffer_and_sink(file) };
    match buffer.flush(&mut sink) {
        Ok(()) => ffi::SQLITE_OK,
        Err(rc) => rc,
    }
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite calls `xOpen` with the pointer `register` registered: a leaked `ShimVfs`
    // whose `wrapped` is a registered VFS.
    let wrapped = unsafe { (*vfs.cast::<ShimVfs>()).wrapped };
    // SAFETY: as above.
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
        (*shim).buffer = ptr::null_mut();
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
        (*shim).buffer = Box::into_raw(Box::default());
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
        drop(Box::from_raw((*shim).buffer));
        (*shim).buffer = ptr::null_mut();
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
    // SAFETY: SQLite passes `amount` readable bytes at `data`, which stay valid for this call.
    let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
    // SAFETY: `file` is open (SQLite never writes a closed file); the buffer is taken once.
    let (buffer, mut sink) = unsafe { buffer_and_sink(file) };
    match buffer.write(bytes, offset, &mut sink) {
        Ok(()) => ffi::SQLITE_OK,
        Err(rc) => rc,
    }
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
