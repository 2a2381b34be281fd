//! Crash points and power loss under the storage stack (issue 19's harness).
//!
//! A recording VFS sits *under* the shim (`register_over`) and logs every write, truncate and
//! sync the shim (and SQLite, for the database file) hands down. Replaying that log, the test
//! keeps for the database file and its WAL what the kernel holds and what the last sync made
//! durable. Proptest generates workloads (transactions across the page cache size, rewrites of
//! spilled pages, payloads up to 1 MiB, rollbacks after spilling, checkpoints by a second
//! connection with WAL restarts and truncation, page sizes 1 and 4 KiB, FULL and NORMAL).
//! At every acknowledgement (a commit, rollback or checkpoint returned), and at crash points
//! inside each operation (every sync, the write before it, a few writes evenly spaced), it
//! writes out
//!
//! - what the kernel holds (the files as handed down, without what the shim still buffers): a
//!   process crash at that moment;
//! - the files as of their last sync, and the same with the unsynced writes torn at 512-byte
//!   sectors (each sector kept or lost by a seeded coin): a power loss at that moment;
//!
//! and opens each copy with stock SQLite: `integrity_check` ok, the rows exactly those of the
//! commits it holds, and every commit acknowledged before that moment there (after a power loss
//! under NORMAL: a prefix of them).
//!
//! `SEQCAST_CRASH_POINT_CASES` sets the number of cases (default 32, sized for a debug build).
#![allow(unsafe_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use recording::Change;
use rusqlite::{Connection, OpenFlags, params};

/// The VFS that records what reaches the "kernel" and what a sync made durable.
mod recording {
    use std::collections::HashMap;
    use std::ffi::{CStr, c_int, c_void};
    use std::path::{Path, PathBuf};
    use std::ptr;
    use std::sync::{LazyLock, Mutex, MutexGuard};

    use rusqlite::ffi;

    pub const NAME: &str = "seqcast-recording";

    /// What the recorder saw happen to a file, in order.
    #[derive(Debug)]
    pub enum Change {
        Write { offset: usize, bytes: Vec<u8> },
        Truncate(usize),
        Sync,
    }

    /// Every change to a database file or WAL, by the directory it is in, in the order the
    /// wrapped VFS performed them (`fsync` makes a whole file durable, whichever handle asks).
    static LOG: LazyLock<Mutex<HashMap<PathBuf, Changes>>> = LazyLock::new(Mutex::default);

    /// The changes to the files of one directory: which file, what happened.
    pub type Changes = Vec<(PathBuf, Change)>;

    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(path: &Path, change: Change) {
        let dir = path.parent().unwrap_or(path).to_path_buf();
        lock(&LOG)
            .entry(dir)
            .or_default()
            .push((path.to_path_buf(), change));
    }

    /// Takes what was recorded for files in `dir` since the last call.
    pub fn take(dir: &Path) -> Changes {
        lock(&LOG).remove(dir).unwrap_or_default()
    }

    /// Registers the recording VFS over the default one (once per process).
    pub fn register() {
        static REGISTERED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
        REGISTERED.get_or_init(|| {
            // SAFETY: initializes SQLite if needed; returns the default VFS, which stays
            // registered.
            let wrapped = unsafe { ffi::sqlite3_vfs_find(ptr::null()) };
            assert!(!wrapped.is_null(), "no default VFS");
            // SAFETY: `wrapped` is a registered VFS; copying it copies data and function
            // pointers, and its methods other than `xOpen` reach their state via `pAppData`.
            let mut vfs = unsafe { *wrapped };
            let wrapped_size = usize::try_from(vfs.szOsFile).unwrap();
            vfs.szOsFile = c_int::try_from(INNER_OFFSET + wrapped_size).unwrap();
            vfs.pNext = ptr::null_mut();
            vfs.zName = c"seqcast-recording".as_ptr();
            vfs.xOpen = Some(open);
            let vfs = Box::leak(Box::new(RecordingVfs { base: vfs, wrapped }));
            // SAFETY: leaked, so it outlives every use; `base` is its first field.
            let rc = unsafe { ffi::sqlite3_vfs_register(&raw mut vfs.base, 0) };
            assert_eq!(rc, ffi::SQLITE_OK);
        });
    }

    #[repr(C)]
    struct RecordingVfs {
        base: ffi::sqlite3_vfs,
        wrapped: *mut ffi::sqlite3_vfs,
    }

    /// A recorded file: this header, then the wrapped VFS's file at `INNER_OFFSET`.
    #[repr(C)]
    struct RecordingFile {
        base: ffi::sqlite3_file,
        /// `Box::into_raw`; freed by `close`.
        path: *mut PathBuf,
    }

    const INNER_OFFSET: usize = size_of::<RecordingFile>().next_multiple_of(16);

    fn inner_of(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
        file.cast::<u8>().wrapping_add(INNER_OFFSET).cast()
    }

    /// # Safety
    /// `inner` is open.
    unsafe fn methods<'a>(inner: *mut ffi::sqlite3_file) -> &'a ffi::sqlite3_io_methods {
        // SAFETY: an open file's `pMethods` points at its VFS's static table.
        unsafe { &*(*inner).pMethods }
    }

    /// # Safety
    /// `file` is a `RecordingFile` that `open` set up and `close` has not freed.
    unsafe fn path_of<'a>(file: *mut ffi::sqlite3_file) -> &'a Path {
        // SAFETY: per the contract the box is alive while the file is open.
        unsafe { &*(*file.cast::<RecordingFile>()).path }
    }

    static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
        iVersion: 3,
        xClose: Some(close),
        xRead: Some(read),
        xWrite: Some(write),
        xTruncate: Some(truncate),
        xSync: Some(sync),
        xFileSize: Some(file_size),
        xLock: Some(lock_file),
        xUnlock: Some(unlock),
        xCheckReservedLock: Some(check_reserved_lock),
        xFileControl: Some(file_control),
        xSectorSize: Some(sector_size),
        xDeviceCharacteristics: Some(device_characteristics),
        xShmMap: Some(shm_map),
        xShmLock: Some(shm_lock),
        xShmBarrier: Some(shm_barrier),
        xShmUnmap: Some(shm_unmap),
        xFetch: Some(fetch),
        xUnfetch: Some(unfetch),
    };

    unsafe extern "C" fn open(
        vfs: *mut ffi::sqlite3_vfs,
        name: ffi::sqlite3_filename,
        file: *mut ffi::sqlite3_file,
        flags: c_int,
        out_flags: *mut c_int,
    ) -> c_int {
        // SAFETY: SQLite passes back the `RecordingVfs` registered above.
        let wrapped = unsafe { (*vfs.cast::<RecordingVfs>()).wrapped };
        // SAFETY: `wrapped` is a registered VFS.
        let wrapped_open = unsafe { (*wrapped).xOpen }.unwrap();
        if flags & (ffi::SQLITE_OPEN_MAIN_DB | ffi::SQLITE_OPEN_WAL) == 0 || name.is_null() {
            // SAFETY: SQLite allocated `szOsFile` bytes, more than the wrapped VFS needs.
            return unsafe { wrapped_open(wrapped, name, file, flags, out_flags) };
        }
        // SAFETY: a database or WAL file's name is a NUL-terminated path.
        let path = PathBuf::from(unsafe { CStr::from_ptr(name) }.to_str().unwrap());
        let recorded = file.cast::<RecordingFile>();
        let inner = inner_of(file);
        // SAFETY: `file` points at `szOsFile` writable bytes: the header, then the wrapped
        // file's room; `pMethods` stays null until the inner open succeeded.
        unsafe {
            (*recorded).base.pMethods = ptr::null();
            let rc = wrapped_open(wrapped, name, inner, flags, out_flags);
            if rc != ffi::SQLITE_OK {
                if !(*inner).pMethods.is_null()
                    && let Some(x_close) = methods(inner).xClose
                {
                    x_close(inner);
                }
                return rc;
            }
        }
        // SAFETY: as above; the inner file is open.
        unsafe {
            (*recorded).path = Box::into_raw(Box::new(path));
            (*recorded).base.pMethods = &METHODS;
        }
        ffi::SQLITE_OK
    }

    unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
        let inner = inner_of(file);
        // SAFETY: SQLite closes an open file once; `open` set it up.
        unsafe {
            let rc = methods(inner)
                .xClose
                .map_or(ffi::SQLITE_OK, |x_close| x_close(inner));
            let recorded = file.cast::<RecordingFile>();
            drop(Box::from_raw((*recorded).path));
            (*recorded).path = ptr::null_mut();
            rc
        }
    }

    unsafe extern "C" fn write(
        file: *mut ffi::sqlite3_file,
        data: *const c_void,
        amount: c_int,
        offset: i64,
    ) -> c_int {
        let inner = inner_of(file);
        // SAFETY: `file` is open; SQLite passes `amount` readable bytes at `data`.
        unsafe {
            let rc = methods(inner).xWrite.unwrap()(inner, data, amount, offset);
            if rc == ffi::SQLITE_OK {
                let bytes =
                    std::slice::from_raw_parts(data.cast::<u8>(), usize::try_from(amount).unwrap());
                let change = Change::Write {
                    offset: usize::try_from(offset).unwrap(),
                    bytes: bytes.to_vec(),
                };
                record(path_of(file), change);
            }
            rc
        }
    }

    unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
        let inner = inner_of(file);
        // SAFETY: `file` is open.
        unsafe {
            let rc = methods(inner).xTruncate.unwrap()(inner, size);
            if rc == ffi::SQLITE_OK {
                let size = usize::try_from(size).unwrap();
                record(path_of(file), Change::Truncate(size));
            }
            rc
        }
    }

    unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
        let inner = inner_of(file);
        // SAFETY: `file` is open.
        unsafe {
            let rc = methods(inner).xSync.unwrap()(inner, flags);
            if rc == ffi::SQLITE_OK {
                record(path_of(file), Change::Sync);
            }
            rc
        }
    }

    /// Defines a method that calls the wrapped file's.
    macro_rules! pass_through {
        ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
            unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> $ret {
                let inner = inner_of(file);
                // SAFETY: SQLite calls methods only on open files; the wrapped file's table
                // has every method SQLite calls on it (it is the default VFS's own file).
                unsafe { methods(inner).$method.unwrap()(inner, $($arg),*) }
            }
        };
    }

    pass_through!(read, xRead, (buffer: *mut c_void, amount: c_int, offset: i64) -> c_int);
    pass_through!(file_size, xFileSize, (size: *mut i64) -> c_int);
    pass_through!(lock_file, xLock, (level: c_int) -> c_int);
    pass_through!(unlock, xUnlock, (level: c_int) -> c_int);
    pass_through!(check_reserved_lock, xCheckReservedLock, (out: *mut c_int) -> c_int);
    pass_through!(file_control, xFileControl, (op: c_int, arg: *mut c_void) -> c_int);
    pass_through!(sector_size, xSectorSize, () -> c_int);
    pass_through!(device_characteristics, xDeviceCharacteristics, () -> c_int);
    pass_through!(
        shm_map,
        xShmMap,
        (page: c_int, size: c_int, extend: c_int, out: *mut *mut c_void) -> c_int
    );
    pass_through!(shm_lock, xShmLock, (offset: c_int, n: c_int, flags: c_int) -> c_int);
    pass_through!(shm_barrier, xShmBarrier, () -> ());
    pass_through!(shm_unmap, xShmUnmap, (delete: c_int) -> c_int);
    pass_through!(fetch, xFetch, (offset: i64, amount: c_int, out: *mut *mut c_void) -> c_int);
    pass_through!(unfetch, xUnfetch, (offset: i64, page: *mut c_void) -> c_int);
}

/// The shim over the recording VFS.
const SHIM_OVER_RECORDING: &str = "seqcast-coalescing-over-recording";

fn register_stack() {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        recording::register();
        seqcast_coalescing_vfs::register_over(SHIM_OVER_RECORDING, recording::NAME)
            .expect("register the shim over the recording VFS");
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Synchronous {
    Full,
    Normal,
}

#[derive(Debug, Clone, Copy)]
enum Checkpoint {
    Passive,
    Restart,
    Truncate,
}

#[derive(Debug, Clone)]
enum Op {
    /// One transaction: `rows` inserts of about `bytes` each; with `rewrite`, rows inserted
    /// earlier in the same transaction are updated again (their pages may have been spilled);
    /// with `update_old`, rows of earlier commits are updated too.
    Commit {
        rows: usize,
        bytes: usize,
        rewrite: bool,
        update_old: bool,
    },
    /// A transaction that inserts (and may spill), then rolls back.
    Rollback { rows: usize, bytes: usize },
    /// A checkpoint by the second connection.
    Checkpoint(Checkpoint),
}

#[derive(Debug, Clone)]
struct Workload {
    page_size: u32,
    synchronous: Synchronous,
    cache_pages: i64,
    /// `wal_autocheckpoint` of the writer (0: off; 100_000: as the persistence writer).
    autocheckpoint: i64,
    /// `journal_size_limit` of the writer (the WAL is cut back to it at a restart).
    journal_size_limit: i64,
    ops: Vec<Op>,
    /// Seeds the coin that tears unsynced writes.
    seed: u64,
}

fn transaction() -> impl Strategy<Value = (usize, usize)> {
    prop_oneof![
        // Within the cache.
        3 => (1..30_usize, 10..400_usize),
        // Across it: spills to the WAL before the commit.
        4 => (50..400_usize, 1000..5000_usize),
        // Payloads up to 1 MiB.
        1 => (1..4_usize, 100_000..=1_048_576_usize),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (transaction(), any::<bool>(), proptest::bool::weighted(0.3)).prop_map(
            |((rows, bytes), rewrite, update_old)| Op::Commit { rows, bytes, rewrite, update_old }
        ),
        1 => transaction().prop_map(|(rows, bytes)| Op::Rollback { rows, bytes }),
        2 => prop_oneof![
            Just(Checkpoint::Passive),
            Just(Checkpoint::Restart),
            Just(Checkpoint::Truncate),
        ]
        .prop_map(Op::Checkpoint),
    ]
}

fn workload() -> impl Strategy<Value = Workload> {
    (
        prop_oneof![Just(1024_u32), Just(4096)],
        prop_oneof![Just(Synchronous::Full), Just(Synchronous::Normal)],
        20..80_i64,
        prop_oneof![Just(0_i64), Just(200), Just(100_000)],
        prop_oneof![Just(-1_i64), Just(64 << 10)],
        proptest::collection::vec(op(), 1..8),
        any::<u64>(),
    )
        .prop_map(
            |(
                page_size,
                synchronous,
                cache_pages,
                autocheckpoint,
                journal_size_limit,
                ops,
                seed,
            )| {
                Workload {
                    page_size,
                    synchronous,
                    cache_pages,
                    autocheckpoint,
                    journal_size_limit,
                    ops,
                    seed,
                }
            },
        )
}

/// One file as the recorder saw it: what the kernel holds, what the last sync made durable, and
/// the writes and truncates since that sync.
#[derive(Debug, Default)]
struct FileModel {
    kernel: Vec<u8>,
    durable: Vec<u8>,
    unsynced: Vec<Change>,
}

impl FileModel {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Sync => {
                self.durable.clone_from(&self.kernel);
                self.unsynced.clear();
            }
            Change::Write { offset, ref bytes } => {
                write_at(&mut self.kernel, offset, bytes);
                self.unsynced.push(change);
            }
            Change::Truncate(size) => {
                self.kernel.resize(size, 0);
                self.unsynced.push(change);
            }
        }
    }

    /// The file after a power loss: as of its last sync, plus — when `torn` — each 512-byte
    /// sector of each later write (and each later truncate) where a seeded coin says so.
    fn power_loss(&self, torn: bool, rng: &mut u64) -> Vec<u8> {
        let mut image = self.durable.clone();
        if !torn {
            return image;
        }
        for change in &self.unsynced {
            match *change {
                Change::Write { offset, ref bytes } => {
                    let end = offset + bytes.len();
                    let mut at = offset;
                    while at < end {
                        let sector_end = ((at / 512 + 1) * 512).min(end);
                        if coin(rng) {
                            write_at(&mut image, at, &bytes[at - offset..sector_end - offset]);
                        }
                        at = sector_end;
                    }
                }
                Change::Truncate(size) => {
                    if coin(rng) {
                        image.resize(size, 0);
                    }
                }
                Change::Sync => {}
            }
        }
        image
    }
}

fn write_at(image: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    if image.len() < offset + bytes.len() {
        image.resize(offset + bytes.len(), 0);
    }
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// How many writes of one operation are crash points besides its syncs (evenly spaced).
const WRITE_CRASH_POINTS: usize = 3;

/// Row id → (length, the byte every position holds).
type Rows = BTreeMap<i64, (usize, u8)>;

fn fill(id: i64, version: u64) -> u8 {
    (id.wrapping_mul(31) as u64).wrapping_add(version.wrapping_mul(17)) as u8
}

/// A workload's run: the writer (through the shim over the recorder), a second connection that
/// checkpoints, and the rows of every acknowledged commit.
struct Run {
    /// Kept for its lifetime (the files are removed with it).
    _dir: tempfile::TempDir,
    /// The directory as SQLite names it: the recorder's key.
    dir: PathBuf,
    path: PathBuf,
    wal_path: PathBuf,
    db: FileModel,
    wal: FileModel,
    writer: Connection,
    checkpointer: Connection,
    synchronous: Synchronous,
    /// `history[n]`: the rows after commit `n` (0: the empty tables).
    history: Vec<Rows>,
    next_id: i64,
    version: u64,
    rng: u64,
}

impl Drop for Run {
    fn drop(&mut self) {
        recording::take(&self.dir);
    }
}

const SCHEMA: &str = "CREATE TABLE events (
         id INTEGER PRIMARY KEY, stream INTEGER NOT NULL, data BLOB NOT NULL);
     CREATE INDEX events_by_stream ON events (stream, id);
     CREATE TABLE commits (n INTEGER PRIMARY KEY);";

impl Run {
    fn start(workload: &Workload) -> Run {
        register_stack();
        let tempdir = scratch_dir();
        // Canonical, as SQLite makes the names it opens.
        let dir = tempdir.path().canonicalize().unwrap();
        let path = dir.join("db.sqlite");
        let writer =
            Connection::open_with_flags_and_vfs(&path, OpenFlags::default(), SHIM_OVER_RECORDING)
                .unwrap();
        writer
            .pragma_update(None, "page_size", workload.page_size)
            .unwrap();
        let mode: String = writer
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let synchronous = match workload.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        writer
            .execute_batch(&format!(
                "PRAGMA synchronous = {synchronous}; PRAGMA cache_size = {}; \
                 PRAGMA wal_autocheckpoint = {}; PRAGMA journal_size_limit = {};",
                workload.cache_pages, workload.autocheckpoint, workload.journal_size_limit
            ))
            .unwrap();
        writer.execute_batch(SCHEMA).unwrap();
        let checkpointer =
            Connection::open_with_flags_and_vfs(&path, OpenFlags::default(), SHIM_OVER_RECORDING)
                .unwrap();
        checkpointer
            .pragma_update(None, "synchronous", synchronous)
            .unwrap();
        // The schema is durable before the workload starts (a checkpoint syncs the database).
        checkpointer
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let mut run = Run {
            _dir: tempdir,
            wal_path: PathBuf::from(format!("{}-wal", path.display())),
            dir,
            path,
            db: FileModel::default(),
            wal: FileModel::default(),
            writer,
            checkpointer,
            synchronous: workload.synchronous,
            history: vec![Rows::new()],
            next_id: 1,
            version: 0,
            rng: workload.seed | 1,
        };
        for (path, change) in recording::take(&run.dir) {
            run.model_of(&path).apply(change);
        }
        run
    }

    fn model_of(&mut self, path: &Path) -> &mut FileModel {
        if path == self.path {
            &mut self.db
        } else if path == self.wal_path {
            &mut self.wal
        } else {
            panic!("a file the harness does not know: {}", path.display())
        }
    }

    fn insert(tx: &rusqlite::Transaction<'_>, rows: &mut Rows, id: i64, len: usize, byte: u8) {
        tx.execute(
            "INSERT INTO events (id, stream, data) VALUES (?1, ?2, ?3) \
             ON CONFLICT (id) DO UPDATE SET data = excluded.data",
            params![id, id % 16, vec![byte; len]],
        )
        .unwrap();
        rows.insert(id, (len, byte));
    }

    /// Runs one operation, then checks its crash points and its acknowledgement ([`Run::settle`]).
    fn run(&mut self, op: &Op) -> Result<(), String> {
        let acknowledged = self.history.len() - 1;
        let point = self.apply(op);
        self.settle(&point, acknowledged)
    }

    /// Runs one operation; returns a description of the acknowledgement it ends with.
    fn apply(&mut self, op: &Op) -> String {
        match *op {
            Op::Commit {
                rows,
                bytes,
                rewrite,
                update_old,
            } => {
                let mut state = self.history.last().unwrap().clone();
                self.version += 1;
                let version = self.version;
                let tx = self.writer.transaction().unwrap();
                let first = self.next_id;
                for i in 0..rows {
                    let id = first + i as i64;
                    let len = bytes + (i * 37) % (bytes / 4 + 1);
                    Self::insert(&tx, &mut state, id, len, fill(id, version));
                }
                self.next_id += rows as i64;
                if rewrite {
                    // Rows written first are the likeliest to have been spilled.
                    for id in (first..first + rows.div_ceil(2) as i64).step_by(3) {
                        let len = bytes / 2 + 1;
                        Self::insert(&tx, &mut state, id, len, fill(id, version + 1000));
                    }
                }
                if update_old {
                    let old: Vec<i64> =
                        state.range(..first).map(|(id, _)| *id).step_by(7).collect();
                    for id in old {
                        Self::insert(&tx, &mut state, id, 50, fill(id, version + 2000));
                    }
                }
                let n = self.history.len() as i64;
                tx.execute("INSERT INTO commits (n) VALUES (?1)", [n])
                    .unwrap();
                tx.commit().unwrap();
                self.history.push(state);
                format!("commit {n}")
            }
            Op::Rollback { rows, bytes } => {
                let tx = self.writer.transaction().unwrap();
                let mut scratch = Rows::new();
                for i in 0..rows {
                    let id = self.next_id + i as i64;
                    Self::insert(&tx, &mut scratch, id, bytes, 0xee);
                }
                tx.rollback().unwrap();
                "rollback".to_owned()
            }
            Op::Checkpoint(mode) => {
                let sql = match mode {
                    Checkpoint::Passive => "PRAGMA wal_checkpoint(PASSIVE)",
                    Checkpoint::Restart => "PRAGMA wal_checkpoint(RESTART)",
                    Checkpoint::Truncate => "PRAGMA wal_checkpoint(TRUNCATE)",
                };
                self.checkpointer.query_row(sql, [], |_| Ok(())).unwrap();
                format!("checkpoint {mode:?}")
            }
        }
    }

    /// Replays what the recorder saw during the last operation, checking the files at its crash
    /// points (every sync, the write before it, and a few writes evenly spaced), where `before`
    /// commits were acknowledged and the operation's own may or may not be there; then checks
    /// the acknowledgement itself, where every acknowledged commit must be.
    fn settle(&mut self, point: &str, before: usize) -> Result<(), String> {
        let acknowledged = self.history.len() - 1;
        let changes = recording::take(&self.dir);
        let writes: Vec<usize> = (0..changes.len())
            .filter(|i| !matches!(changes[*i].1, Change::Sync))
            .collect();
        let mut crash_points = std::collections::BTreeSet::new();
        for (i, (_, change)) in changes.iter().enumerate() {
            if matches!(change, Change::Sync) {
                crash_points.extend([i.saturating_sub(1), i]);
            }
        }
        for k in 1..=WRITE_CRASH_POINTS {
            if let Some(&i) = writes.get(k * writes.len() / (WRITE_CRASH_POINTS + 1)) {
                crash_points.insert(i);
            }
        }
        let count = changes.len();
        for (i, (path, change)) in changes.into_iter().enumerate() {
            self.model_of(&path).apply(change);
            if crash_points.contains(&i) && i + 1 < count {
                let at = format!("during {point} (change {i} of {count})");
                self.check(&at, before, acknowledged)?;
            }
        }
        // The recorder's account of the kernel must be the files on disk, or it proves nothing.
        let db_disk = std::fs::read(&self.path).unwrap_or_default();
        let wal_disk = std::fs::read(&self.wal_path).unwrap_or_default();
        assert!(
            self.db.kernel == db_disk,
            "the recorder lost track of the database file"
        );
        assert!(
            self.wal.kernel == wal_disk,
            "the recorder lost track of the WAL"
        );
        self.check(&format!("after {point}"), acknowledged, acknowledged)
    }

    /// Checks the files as a process crash and as a power loss would leave them now: between
    /// `at_least` and `at_most` commits (under NORMAL a power loss may keep fewer).
    fn check(&mut self, point: &str, at_least: usize, at_most: usize) -> Result<(), String> {
        let n = self.open_copy("process crash", &self.db.kernel, &self.wal.kernel)?;
        if !(at_least..=at_most).contains(&n) {
            return Err(format!(
                "process crash {point}: {n} of {at_least} acknowledged commits in the files"
            ));
        }
        for torn in [false, true] {
            let view = if torn {
                "power loss (unsynced writes torn)"
            } else {
                "power loss (unsynced writes dropped)"
            };
            let db = self.db.power_loss(torn, &mut self.rng);
            let wal = self.wal.power_loss(torn, &mut self.rng);
            let n = self.open_copy(view, &db, &wal)?;
            if self.synchronous == Synchronous::Full && !(at_least..=at_most).contains(&n) {
                return Err(format!(
                    "{view} {point} (FULL): {n} of {at_least} acknowledged commits survive"
                ));
            }
        }
        Ok(())
    }

    /// Opens a copy of the files with stock SQLite: `integrity_check` ok and the rows exactly
    /// those of the commits it holds (a prefix of the acknowledged ones). Returns how many.
    fn open_copy(&self, view: &str, db: &[u8], wal: &[u8]) -> Result<usize, String> {
        let copy = scratch_dir();
        let path = copy.path().join("db.sqlite");
        std::fs::write(&path, db).unwrap();
        if !wal.is_empty() {
            std::fs::write(copy.path().join("db.sqlite-wal"), wal).unwrap();
        }
        let fail = |what: String| format!("{view}: {what}");
        let conn = Connection::open(&path).map_err(|e| fail(format!("open: {e}")))?;
        // The copy's own durability does not matter: no fsync when it checkpoints at close.
        conn.pragma_update(None, "synchronous", "OFF")
            .map_err(|e| fail(format!("synchronous: {e}")))?;
        let integrity: String = conn
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .map_err(|e| fail(format!("integrity_check: {e}")))?;
        if integrity != "ok" {
            return Err(fail(format!("integrity_check: {integrity}")));
        }
        let commits: Vec<i64> = conn
            .prepare("SELECT n FROM commits ORDER BY n")
            .and_then(|mut stmt| stmt.query_map([], |row| row.get(0))?.collect())
            .map_err(|e| fail(format!("commits: {e}")))?;
        let n = commits.len();
        if commits.iter().zip(1..).any(|(got, want)| *got != want) || n >= self.history.len() {
            return Err(fail(format!(
                "commits {commits:?} are not a prefix of 1..{}",
                self.history.len() - 1
            )));
        }
        let mut stmt = conn
            .prepare(
                "SELECT id, length(data), hex(substr(data, 1, 1)), hex(substr(data, -1, 1)), \
                 hex(substr(data, length(data) / 2 + 1, 1)) FROM events ORDER BY id",
            )
            .map_err(|e| fail(e.to_string()))?;
        let mut rows = Rows::new();
        let found = stmt
            .query_map([], |row| {
                let id: i64 = row.get(0)?;
                let len: i64 = row.get(1)?;
                let bytes: [String; 3] = [row.get(2)?, row.get(3)?, row.get(4)?];
                Ok((id, len, bytes))
            })
            .map_err(|e| fail(e.to_string()))?;
        for row in found {
            let (id, len, bytes) = row.map_err(|e| fail(e.to_string()))?;
            let byte = u8::from_str_radix(&bytes[0], 16).unwrap_or(0);
            if bytes.iter().any(|b| *b != bytes[0]) {
                return Err(fail(format!("row {id}: mixed bytes {bytes:?}")));
            }
            rows.insert(id, (usize::try_from(len).unwrap(), byte));
        }
        if rows != self.history[n] {
            let want = &self.history[n];
            let differing = want
                .iter()
                .filter(|(id, v)| rows.get(id) != Some(v))
                .count()
                + rows.keys().filter(|id| !want.contains_key(id)).count();
            return Err(fail(format!(
                "commits 1..={n} recorded but {differing} rows differ from them ({} rows, want {})",
                rows.len(),
                want.len()
            )));
        }
        Ok(n)
    }
}

/// A directory for a run's files or a copy: in memory where there is a tmpfs (the recorder models
/// durability; the real `fsync`s only cost time), else the default temporary directory.
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().unwrap()
}

/// A seeded coin (xorshift64), so a failing case replays exactly.
fn coin(state: &mut u64) -> bool {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state & 1 == 1
}

fn cases() -> u32 {
    std::env::var("SEQCAST_CRASH_POINT_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(32)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    })]

    /// Every acknowledged commit survives a process crash (both modes) and a power loss (FULL);
    /// after a power loss under NORMAL the database holds a prefix of them; every copy passes
    /// `integrity_check`.
    #[test]
    fn every_acknowledged_commit_survives_a_crash_at_every_acknowledgement(workload in workload()) {
        let mut run = Run::start(&workload);
        run.check("after the schema", 0, 0).map_err(TestCaseError::fail)?;
        for (i, op) in workload.ops.iter().enumerate() {
            run.run(op).map_err(|e| TestCaseError::fail(format!("op {i}: {e}")))?;
        }
    }
}

/// The case proptest shrank to on the shim before issue 19's fix: one NORMAL commit larger than
/// the cache that updates rows it had written (and spilled): "process crash after op 0
/// (commit 1): 0 of 1 acknowledged commits in the files".
#[test]
fn a_commit_that_rewrites_spilled_frames_is_in_the_files_when_it_returns() {
    let workload = Workload {
        page_size: 1024,
        synchronous: Synchronous::Normal,
        cache_pages: 20,
        autocheckpoint: 0,
        journal_size_limit: -1,
        ops: vec![Op::Commit {
            rows: 50,
            bytes: 1000,
            rewrite: true,
            update_old: false,
        }],
        seed: 0,
    };
    let mut run = Run::start(&workload);
    for op in &workload.ops {
        run.run(op).unwrap();
    }
}

/// The stack is what the harness claims: the shim's writes reach the recorder, and the
/// recorder's syncs are SQLite's.
#[test]
fn the_recorder_sees_the_shims_writes_and_syncs() {
    let workload = Workload {
        page_size: 1024,
        synchronous: Synchronous::Full,
        cache_pages: 2000,
        autocheckpoint: 0,
        journal_size_limit: -1,
        ops: Vec::new(),
        seed: 1,
    };
    let mut run = Run::start(&workload);
    let before = seqcast_coalescing_vfs::stats();
    run.apply(&Op::Commit {
        rows: 20,
        bytes: 100,
        rewrite: false,
        update_old: false,
    });
    let after = seqcast_coalescing_vfs::stats();
    assert!(
        after.writes_issued > before.writes_issued,
        "the shim wrote nothing"
    );
    run.settle("commit", 0).unwrap();
    // FULL: the commit was synced, so a power loss keeps the WAL as it is.
    let wal = std::fs::read(&run.wal_path).unwrap();
    assert!(!wal.is_empty());
    assert_eq!(run.wal.durable, wal);
    assert!(run.wal.unsynced.is_empty());
}
