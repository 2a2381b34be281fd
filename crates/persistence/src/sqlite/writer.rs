//! The single database writer: one thread, one connection, group commit.
//!
//! The thread runs the shared writer shell's loop ([`crate::actor`]): every command already
//! queued (up to a cap) goes into one `BEGIN IMMEDIATE` transaction, committed once; the
//! committed events go to the [`CommitHook`] in sequence order, and only then is each
//! publisher answered. A failing command is undone alone (the group is
//! retried with a SAVEPOINT per command, see `Writer::write_group`). It never waits on a
//! timer for more work: the group is whatever queued up while the previous commit was syncing.
//! Between COMMIT and the hook it checks that the database file is still the one at its path
//! (one `stat`): a group written into a removed or replaced file is neither delivered nor
//! acknowledged, and the writer refuses every write after it.
//!
//! A retry (a known message id with byte-identical data) writes nothing: the event's row is
//! looked up before anything is inserted, and the answer is the row's last event. Prune
//! commands run after the group they arrived with, each in its own short transaction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;

use rusqlite::{Connection, ErrorCode, MAIN_DB, OptionalExtension, params};

use seqcast_protocol::SubscriptionKey;

use super::checkpoint::{self, Checkpointer};
use super::config::{FaultInjector, StoreConfig};
use super::error::{is_database_condition, sqlite_code, stored_u64};
use super::schema::{self, ConnectionOptions};
use crate::actor::{
    ActorWriter, AfterGroup, CommandQueue, Outcome, WriterHandle, WriterShared, failed,
};
use crate::error::StoreError;
use crate::event::{CommittedEvent, NewEvent, PruneReport, StoreInfo};
use crate::hook::{self, CommitHook, CommitObserver};

/// What the SQLite writer keeps beside the shell's counters.
struct Shared {
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Why the last write transaction (or probe) failed for a reason of the database's —
    /// read-only, full, locked past the busy timeout, I/O, replaced, corrupt; `None` once one
    /// succeeds again. A command rejected on its own does not count.
    health: Mutex<Option<StoreError>>,
    /// Told about every committed group (see [`DbWriter::observe_commits`]).
    observer: OnceLock<CommitObserver>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("observed", &self.observer.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn set_health(&self, failure: Option<StoreError>) {
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        match (&*health, &failure) {
            (Some(_), None) => {
                tracing::info!(
                    event = "database_writable",
                    "the database takes writes again"
                );
            }
            (None, Some(err)) => {
                tracing::error!(event = "database_unwritable", error = %err, "the database cannot take writes; publishes answer 503 until it can");
            }
            _ => {}
        }
        *health = failure;
    }
}

/// Handle to the writer thread. Cheap to clone; all clones feed the same thread.
///
/// Stop it with [`crate::EventWriter::close`] (async) or [`DbWriter::shutdown`] (blocking). Dropping
/// every handle also stops the thread once the queue is drained, without waiting for it.
#[derive(Clone)]
pub struct DbWriter {
    handle: WriterHandle,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DbWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbWriter")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl DbWriter {
    /// Opens (or creates) the database, applies pending migrations, and starts the writer
    /// thread `seqcast-db-writer`. Returns the handle and the store's epoch and head.
    ///
    /// A database that is read-only at open still opens (reads work); appends then fail with
    /// [`StoreError::Unavailable`] until the file is writable again.
    pub fn open(
        config: StoreConfig,
        hook: CommitHook,
    ) -> Result<(DbWriter, StoreInfo), StoreError> {
        let options = ConnectionOptions {
            synchronous: config.synchronous,
            busy_timeout: config.busy_timeout,
            create: true,
        };
        let mut conn = schema::open_connection(&config.path, options)?;
        // Right after the open: SQLite now holds the file open, so its inode cannot be reused
        // and (device, inode) at the path names this file for as long as the writer runs.
        let file = FileWatch::new(&config.path);
        schema::apply_migrations(&mut conn)?;
        let info = StoreInfo {
            epoch: schema::read_epoch(&conn)?,
            head: schema::read_head(&conn)?,
        };
        // Checkpoints run on their own thread; the writer's automatic one is only a backstop.
        let checkpointer = match Checkpointer::start(&config.path, options) {
            Ok(checkpointer) => {
                checkpoint::set_backstop(&conn)?;
                Some(checkpointer)
            }
            Err(err) => {
                tracing::warn!(error = %err, "no checkpoint thread; the writer checkpoints itself");
                None
            }
        };
        if conn.is_readonly(MAIN_DB)? {
            tracing::warn!(path = %config.path.display(), "database opened read-only; appends will fail until it is writable");
        }
        let last_timestamp_ms = read_last_timestamp(&conn)?;

        let (handle, queue) = WriterHandle::new(config.queue_capacity, config.max_group_events);
        let shared = Arc::new(Shared {
            thread: Mutex::new(None),
            health: Mutex::new(None),
            observer: OnceLock::new(),
        });
        let writer = Writer {
            conn: Some(conn),
            path: config.path,
            options,
            epoch: info.epoch.clone(),
            group_commit: config.group_commit,
            last_group_commands: 0,
            fault: config.fault,
            hook,
            last_timestamp_ms,
            stream_ids: StreamIds::default(),
            checkpointer,
            shared: Arc::clone(&shared),
            writer: Arc::clone(handle.shared()),
            file,
        };
        let thread = std::thread::Builder::new()
            .name("seqcast-db-writer".to_owned())
            .spawn(move || writer.run(queue))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer thread: {e}")))?;
        *shared.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(thread);
        tracing::info!(epoch = %info.epoch, head = info.head, "database writer started");
        Ok((DbWriter { handle, shared }, info))
    }

    /// Have `observer` told the size and transaction time of every group committed from now on
    /// (for metrics). Only the first observer set is kept.
    pub fn observe_commits(&self, observer: CommitObserver) {
        let _ = self.shared.observer.set(observer);
    }

    /// Like [`crate::EventWriter::close`], but blocking, and it also joins the thread. Must not be called
    /// from inside an async runtime (tokio panics); use `close().await` there.
    pub fn shutdown(&self) {
        self.handle.blocking_close();
        let thread = self
            .shared
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!("database writer thread panicked");
        }
    }
}

impl ActorWriter for DbWriter {
    fn handle(&self) -> &WriterHandle {
        &self.handle
    }

    fn stopped(&self) -> Option<String> {
        let finished = self
            .shared
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(JoinHandle::is_finished);
        finished.then(|| "the database writer has stopped".to_owned())
    }

    /// Why the last write transaction failed, when the database itself was the reason
    /// (read-only, full, locked past the busy timeout, I/O error, file replaced, corrupt);
    /// `None` when the last one committed.
    fn unwritable(&self) -> Option<String> {
        self.shared
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(ToString::to_string)
    }
}

/// The newest event's timestamp (events' timestamps never decrease along the log).
fn read_last_timestamp(conn: &Connection) -> Result<u64, StoreError> {
    let ts: Option<i64> = conn
        .query_row(
            "SELECT timestamp_ms FROM events ORDER BY sequence_number DESC LIMIT 1",
            [],
            |row| row.get(0),
        )
        .optional()?;
    stored_u64(ts.unwrap_or(0), "timestamp_ms")
}

const FIND_STREAM: &str =
    "SELECT stream_id, pruned_position FROM streams WHERE channel = ?1 AND request_id = ?2";
const INSERT_STREAM: &str = "INSERT INTO streams (channel, request_id) VALUES (?1, ?2)";
// The event with its stream position and whether it updates an existing row, both decided
// before it is written (see `insert_command`).
const INSERT_EVENT: &str = "INSERT INTO events \
         (stream_id, message_id, timestamp_ms, data, stream_sequence, replaced) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
// The row of (stream, message_id), if the stream has one: its position, first and last event.
const FIND_ROW: &str = "SELECT stream_sequence, first_sequence, last_sequence FROM stream_rows \
     WHERE message_id = ?2 AND stream_id = ?1";
// One past the stream's last live row (a seek to the end of the stream's range of the clustered
// stream_rows, the leaf the insert then writes). A new row's position is the larger of this and
// one past the highest position the pruner removed from the stream (`streams.pruned_position`,
// read with the stream's id), so positions never go back.
const NEXT_POSITION: &str =
    "SELECT COALESCE(MAX(stream_sequence), 0) + 1 FROM stream_rows WHERE stream_id = ?1";
const INSERT_ROW: &str = "INSERT INTO stream_rows \
         (stream_id, stream_sequence, first_sequence, message_id, last_sequence) \
     VALUES (?1, ?2, ?3, ?4, ?3)";
// An update moves the row's last event; the row keeps its position (and its first event).
const UPDATE_ROW: &str = "UPDATE stream_rows SET last_sequence = ?4 \
     WHERE stream_id = ?1 AND stream_sequence = ?2 AND first_sequence = ?3";
// A retry compares the new data with the row's current data (its last event's), byte for byte.
const EVENT_DATA_IS: &str =
    "SELECT data IS ?2, timestamp_ms FROM events WHERE sequence_number = ?1";

/// Stream ids of committed streams, so the hot path skips the text lookup in `streams`.
/// Only committed ids go in (streams rows are never deleted), so a rollback cannot leave a
/// stale entry; cleared when the connection is reopened. Each id comes with the stream's
/// `pruned_position` as read with it; a prune step that deleted anything clears the cache, so
/// a cached value is always the database's.
#[derive(Debug, Default)]
struct StreamIds {
    committed: HashMap<SubscriptionKey, StreamRef>,
}

/// A stream as the writer needs it: its id, and the highest position pruning removed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamRef {
    id: i64,
    pruned_position: i64,
}

/// Past this many keys the cache starts over rather than grow without bound.
const MAX_CACHED_STREAMS: usize = 100_000;

impl StreamIds {
    fn remember(&mut self, events: &[CommittedEvent], streams: &[StreamRef]) {
        if self.committed.len() + events.len() > MAX_CACHED_STREAMS {
            self.committed.clear();
        }
        for (event, &stream) in events.iter().zip(streams) {
            if !self.committed.contains_key(&event.key) {
                self.committed.insert(event.key.clone(), stream);
            }
        }
    }
}

/// The database file the writer opened, and whether its path still leads to it.
///
/// A file removed or replaced while the server runs still takes writes (SQLite writes through
/// the descriptors it holds) and they are gone at the next start. So after every COMMIT, before
/// the hook and before any answer, the writer looks: one `stat` of the path, its (device, inode)
/// compared with the one recorded at open. While SQLite holds the file open its inode cannot be
/// reused, so the same pair at the path is the same file. (An `fstat` of the open file,
/// `st_nlink == 0`, would need a descriptor of our own on the database file, and closing a
/// second descriptor drops every POSIX lock the process holds on it, SQLite's included — see
/// SQLite's "How To Corrupt An SQLite Database File", §2.2.)
#[derive(Debug)]
struct FileWatch {
    path: PathBuf,
    /// (device, inode) at open; `None` when the path could not be examined (no check then).
    opened: Option<(u64, u64)>,
    /// Why the path no longer leads to the opened file, once seen.
    lost: Option<StoreError>,
    /// A group committed into the lost file and was refused: its numbers are used up in that
    /// file and were never handed out, so this writer must not continue it (live delivery
    /// would see a hole). Stays until the process restarts.
    withheld: bool,
}

impl FileWatch {
    fn new(path: &Path) -> FileWatch {
        let opened = match file_identity(path) {
            Ok(id) => Some(id),
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "cannot examine the database file: its removal or replacement will not be noticed");
                None
            }
        };
        FileWatch {
            path: path.to_path_buf(),
            opened,
            lost: None,
            withheld: false,
        }
    }

    /// `Err` (unavailable, with the reason) while the path does not lead to the file opened, or
    /// for good once a group was withheld; looks at the path again on every call.
    fn check(&mut self) -> Result<(), StoreError> {
        if self.withheld
            && let Some(lost) = &self.lost
        {
            return Err(lost.clone());
        }
        let Some(opened) = self.opened else {
            return Ok(());
        };
        let path = self.path.display();
        self.lost = match file_identity(&self.path) {
            Ok(id) if id == opened => None,
            Ok(_) => Some(format!(
                "the database file {path} was replaced while the server ran; restart to open the new one"
            )),
            Err(err) => Some(format!(
                "the database file {path} is gone ({err}); writes would be lost"
            )),
        }
        .map(StoreError::Unavailable);
        self.lost.clone().map_or(Ok(()), Err)
    }

    /// A group committed into the lost file: refuse it, and every write after it.
    fn withhold(&mut self, cause: StoreError) -> StoreError {
        let why = match cause {
            StoreError::Unavailable(why) => why,
            other => other.to_string(),
        };
        let lost = StoreError::Unavailable(format!(
            "{why}; a write that went into it was not acknowledged, restart the server"
        ));
        self.withheld = true;
        self.lost = Some(lost.clone());
        lost
    }
}

/// (device, inode) of the file at `path`.
fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// State owned by the writer thread.
struct Writer {
    /// `None` after an error that calls for a fresh connection (read-only, cannot open, I/O);
    /// reopened before the next group.
    conn: Option<Connection>,
    path: PathBuf,
    options: ConnectionOptions,
    /// The store's epoch at open: a reopened file must be the same store.
    epoch: String,
    group_commit: bool,
    /// Commands in the last group: more than one means publishers are queueing concurrently.
    last_group_commands: usize,
    fault: Option<FaultInjector>,
    hook: CommitHook,
    last_timestamp_ms: u64,
    stream_ids: StreamIds,
    checkpointer: Option<Checkpointer>,
    shared: Arc<Shared>,
    /// The shell's counters and stop state.
    writer: Arc<WriterShared>,
    /// The database file as opened, and whether it is still the one at `path`.
    file: FileWatch,
}

impl Writer {
    fn run(mut self, mut queue: CommandQueue) {
        while let Some(first) = queue.blocking_recv() {
            if self
                .fault
                .as_ref()
                .is_some_and(FaultInjector::writer_dies_now)
            {
                // Test fault: die as a bug would, with commands in the queue.
                panic!("injected writer death (test fault)");
            }
            let mut group = queue.group(first);
            if self.group_commit {
                // Group commit: whatever is already queued joins this transaction; never wait.
                // One yield first when publishers are concurrent (the last group had several):
                // where their threads share this CPU, the command that woke the writer preempted
                // them as they were queueing more, and letting them finish turns a group of one
                // into a group of many. With a CPU to spare it returns at once; a lone publisher
                // (groups of one) skips it, as it would only switch to a thread about to sleep.
                if self.last_group_commands > 1 && queue.is_empty() {
                    std::thread::yield_now();
                }
                queue.fill(&mut group);
            }
            self.last_group_commands = group.appends.len();
            if !group.appends.is_empty() {
                let outcomes = self.write_group(group.appends);
                group.replies.answer(outcomes);
            }
            // Between groups: each prune step (and probe) is its own short transaction.
            for command in group.after {
                match command {
                    AfterGroup::Prune(step) => {
                        let pruned = self.prune(step.below, step.max_events);
                        step.answer(pruned);
                    }
                    AfterGroup::Probe(reply) => {
                        let _ = reply.send(self.probe());
                    }
                }
            }
        }
        // The queue is closed and drained. Closing the last connection checkpoints the WAL
        // into the database file and removes it, so the checkpointer closes first.
        if let Some(checkpointer) = self.checkpointer.take() {
            checkpointer.stop();
        }
        if let Some(conn) = self.conn.take()
            && let Err((_, err)) = conn.close()
        {
            tracing::warn!(error = %err, "closing the database failed");
        }
        tracing::info!("database writer stopped");
        queue.finish();
    }

    /// Writes `commands` in one transaction; one outcome per command, in order. Calls the hook
    /// when something committed.
    ///
    /// The first attempt runs without savepoints, because a savepoint per command costs about
    /// as much as the command itself (SQLite copies every page it then touches into a
    /// statement journal) and commands almost never fail. If one does fail, the attempt is
    /// rolled back, that command keeps its error, and the group runs again with a SAVEPOINT
    /// around each command, so any further failing command is undone alone. Either way a
    /// failing command commits nothing and the others commit together.
    fn write_group(&mut self, commands: Vec<Vec<NewEvent>>) -> Vec<Outcome> {
        let count = commands.len();
        if let Err(err) = self.ensure_connection() {
            self.writer.count_failed();
            self.shared.set_health(Some(err.clone()));
            return vec![Err(err); count];
        }
        let Some(conn) = self.conn.as_ref() else {
            return vec![Err(StoreError::Closed); count];
        };
        // One clock reading per transaction, never behind the previous one, so timestamps
        // follow the log order and the recovery window is a suffix of it.
        let timestamp_ms = crate::clock::now_ms().max(self.last_timestamp_ms);
        let fault = self.fault.as_ref();
        let mut own_errors: Vec<Option<StoreError>> = vec![None; count];
        let started = std::time::Instant::now();

        let mut attempt = run_transaction(
            conn,
            &self.stream_ids,
            fault,
            &commands,
            &mut own_errors,
            false,
            timestamp_ms,
        );
        if matches!(attempt, Attempt::CommandFailed) && own_errors.iter().any(Option::is_none) {
            tracing::debug!(
                commands = count,
                "a command failed; retrying its group with savepoints"
            );
            attempt = run_transaction(
                conn,
                &self.stream_ids,
                fault,
                &commands,
                &mut own_errors,
                true,
                timestamp_ms,
            );
        }
        let assigned = match attempt {
            Attempt::Committed(assigned) => assigned,
            // Every command failed on its own (a retry, with savepoints, never ends so).
            Attempt::CommandFailed => Vec::new(),
            Attempt::Lost { error, reopen } => {
                tracing::warn!(error = %error, commands = count, "write transaction failed; nothing was written");
                self.after_error(reopen);
                self.writer.count_failed();
                if matches!(error, StoreError::Unavailable(_) | StoreError::Corrupt(_)) {
                    self.shared.set_health(Some(error.clone()));
                }
                // Commands that failed on their own keep their error; the rest share the cause.
                return failed(own_errors, &error);
            }
        };
        if assigned.is_empty() {
            // Every command failed on its own; nothing was committed. (A command without an
            // own error always has events, so `Closed` is never actually handed out.)
            return failed(own_errors, &StoreError::Closed);
        }
        // Committed — but into the file the path still names? Looked at before the hook and
        // the answers: a group that went into a removed or replaced file is neither delivered
        // nor acknowledged (its publishers get 503 and may retry).
        if let Err(lost) = self.file.check() {
            // Logged once, as `database_unwritable` with this reason (see `Shared::set_health`).
            let error = if assigned.iter().any(|n| n.retry_of.is_none()) {
                self.file.withhold(lost)
            } else {
                lost
            };
            self.writer.count_failed();
            self.shared.set_health(Some(error.clone()));
            return failed(own_errors, &error);
        }

        // Committed: pair each event with the numbers the database gave it (moving, not
        // copying, the publisher's data).
        let mut committed: Vec<CommittedEvent> = Vec::with_capacity(assigned.len());
        let mut stream_ids: Vec<StreamRef> = Vec::with_capacity(assigned.len());
        let retries = assigned.iter().filter(|n| n.retry_of.is_some()).count();
        let mut is_retry: Vec<bool> = Vec::new();
        let mut numbers = assigned.into_iter();
        let mut sizes: Vec<Option<usize>> = Vec::with_capacity(count);
        for (events, own) in commands.into_iter().zip(&own_errors) {
            if own.is_some() {
                sizes.push(None);
                continue;
            }
            sizes.push(Some(events.len()));
            for (event, n) in events.into_iter().zip(numbers.by_ref()) {
                stream_ids.push(n.stream);
                if retries > 0 {
                    is_retry.push(n.retry_of.is_some());
                }
                committed.push(CommittedEvent {
                    sequence_number: n.sequence_number,
                    stream_sequence: n.stream_sequence,
                    replaced: n.replaced,
                    timestamp_ms: n.retry_of.unwrap_or(timestamp_ms),
                    key: event.key,
                    message_id: event.message_id,
                    data: event.data,
                });
            }
        }

        self.last_timestamp_ms = timestamp_ms;
        self.stream_ids.remember(&committed, &stream_ids);
        // Retries wrote nothing: they are answered, but the hook sees only new events (and
        // is not called when a transaction had none). Without retries nothing is copied.
        let fresh: Vec<CommittedEvent>;
        let new_events: &[CommittedEvent] = if retries == 0 {
            &committed
        } else {
            fresh = committed
                .iter()
                .zip(&is_retry)
                .filter(|(_, retry)| !**retry)
                .map(|(event, _)| event.clone())
                .collect();
            &fresh
        };
        if let Some(checkpointer) = &mut self.checkpointer {
            let data_bytes = new_events.iter().map(|event| event.data.len()).sum();
            checkpointer.committed(new_events.len(), data_bytes);
        }
        self.shared.set_health(None);
        if let Some(fault) = &self.fault {
            fault.committed();
        }
        self.writer.count_commit(new_events.len());
        if let Some(observe) = self.shared.observer.get() {
            observe(new_events.len(), started.elapsed());
        }

        if !new_events.is_empty()
            && let Err(failure) = hook::deliver(&mut self.hook, new_events)
        {
            // Committed but not delivered: nobody is acknowledged, and nothing more is taken.
            let error = self.writer.stop(&failure, new_events.len());
            return failed(own_errors, &error);
        }

        // Hand each command its own events, moving them out of the one committed list.
        let mut committed = committed.into_iter();
        sizes
            .into_iter()
            .zip(own_errors)
            .map(|(size, own)| match (size, own) {
                (Some(n), _) => Ok(committed.by_ref().take(n).collect()),
                (None, own) => Err(own.unwrap_or(StoreError::Closed)),
            })
            .collect()
    }

    /// One prune step (see [`crate::EventWriter::prune`]) in one `BEGIN IMMEDIATE` transaction: the
    /// floor row first, then the stream rows whose last event goes, then the events.
    fn prune(&mut self, below: u64, max_events: usize) -> Result<PruneReport, StoreError> {
        self.ensure_connection()?;
        let Some(conn) = self.conn.as_ref() else {
            return Err(StoreError::Closed);
        };
        let result = prune_step(conn, below, max_events);
        if result.as_ref().is_ok_and(|r| r.deleted > 0) {
            // Rows went: streams' pruned positions may have risen.
            self.stream_ids = StreamIds::default();
        }
        if let Err(err) = &result {
            rollback_quietly(conn);
            tracing::warn!(error = %err, "prune failed; nothing was deleted");
            if matches!(err, StoreError::Unavailable(_)) {
                self.after_error(true);
            }
        }
        result
    }

    /// A write transaction that changes nothing (the epoch row set to itself still writes its
    /// page, so a read-only or full disk fails it as it would a publish); updates the health.
    fn probe(&mut self) -> Result<(), StoreError> {
        let result = self.ensure_connection().and_then(|()| {
            let Some(conn) = self.conn.as_ref() else {
                return Err(StoreError::Closed);
            };
            let attempt = exec_cached(conn, "BEGIN IMMEDIATE")
                .and_then(|()| {
                    conn.prepare_cached("UPDATE store_meta SET value = value WHERE key = 'epoch'")?
                        .execute([])
                })
                .and_then(|_| exec_cached(conn, "COMMIT"));
            if let Err(err) = attempt {
                rollback_quietly(conn);
                let reopen = needs_reopen(&err);
                let error = StoreError::from_ref(&err);
                self.after_error(reopen);
                return Err(error);
            }
            self.file.check()
        });
        match &result {
            Ok(()) => self.shared.set_health(None),
            Err(err) => self.shared.set_health(Some(err.clone())),
        }
        result
    }

    /// Makes sure a connection is open, reopening after an error that asked for it.
    ///
    /// Once the database file was seen removed or replaced, every call looks at it again
    /// first and fails while it is still not the file opened (nothing more is written into
    /// it); a reopen looks first too, so a removed file is never created afresh.
    fn ensure_connection(&mut self) -> Result<(), StoreError> {
        if self.file.lost.is_some() || self.conn.is_none() {
            self.file.check()?;
        }
        if self.conn.is_some() {
            return Ok(());
        }
        let conn = schema::open_connection(&self.path, self.options)?;
        schema::require_current_schema(&conn)?;
        let epoch = schema::read_epoch(&conn)?;
        if epoch != self.epoch {
            // Another store was put in place; its numbers are not ours to continue.
            return Err(StoreError::Unavailable(format!(
                "the database file was replaced (epoch {epoch}, expected {})",
                self.epoch
            )));
        }
        if self.checkpointer.is_some() {
            checkpoint::set_backstop(&conn)?;
        }
        tracing::info!(path = %self.path.display(), "database connection reopened");
        self.stream_ids = StreamIds::default();
        self.conn = Some(conn);
        Ok(())
    }

    fn after_error(&mut self, reopen: bool) {
        if reopen {
            // Drop it; the next group opens a fresh connection (e.g. once the file is
            // writable again — a connection opened read-only stays read-only).
            self.conn = None;
        }
    }
}

/// Errors after which the connection itself is suspect and a fresh one may succeed: a
/// connection opened on a read-only file stays read-only, and after an I/O error or a full
/// disk a fresh connection re-reads the file's state (and the WAL's) instead of trusting
/// what it cached.
fn needs_reopen(err: &rusqlite::Error) -> bool {
    matches!(
        sqlite_code(err),
        Some(
            ErrorCode::ReadOnly
                | ErrorCode::CannotOpen
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
        )
    )
}

fn rollback_quietly(conn: &Connection) {
    if !conn.is_autocommit()
        && let Err(err) = exec_cached(conn, "ROLLBACK")
    {
        tracing::warn!(error = %err, "rollback failed");
    }
}

/// Runs a parameterless statement through the statement cache (no re-parse per group).
fn exec_cached(conn: &Connection, sql: &str) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// The numbers the database gave one event.
#[derive(Debug, Clone, Copy)]
struct Assigned {
    sequence_number: u64,
    stream_sequence: u64,
    replaced: bool,
    stream: StreamRef,
    /// `Some(timestamp of the committed event)` when this event was a retry: nothing was
    /// written and the numbers are the row's last event's.
    retry_of: Option<u64>,
}

/// How one attempt at a group transaction ended.
#[derive(Debug)]
enum Attempt {
    /// Committed; the numbers of every event of the commands without an own error, in order.
    Committed(Vec<Assigned>),
    /// (Only without savepoints.) A command failed and got its own error; the whole attempt
    /// was rolled back.
    CommandFailed,
    /// The transaction could not begin or commit, or SQLite rolled it back; nothing persists.
    Lost { error: StoreError, reopen: bool },
}

impl Attempt {
    fn lost(conn: &Connection, err: &rusqlite::Error) -> Attempt {
        rollback_quietly(conn);
        Attempt::Lost {
            error: StoreError::from_ref(err),
            reopen: needs_reopen(err),
        }
    }
}

/// One attempt at writing the group: BEGIN IMMEDIATE, each command not already failed
/// (inside a SAVEPOINT when `savepoints`), COMMIT. Records a failing command's error in
/// `own_errors`.
fn run_transaction(
    conn: &Connection,
    stream_ids: &StreamIds,
    fault: Option<&FaultInjector>,
    commands: &[Vec<NewEvent>],
    own_errors: &mut [Option<StoreError>],
    savepoints: bool,
    timestamp_ms: u64,
) -> Attempt {
    if let Err(err) = exec_cached(conn, "BEGIN IMMEDIATE") {
        return Attempt::lost(conn, &err);
    }
    let total: usize = commands.iter().map(Vec::len).sum();
    let mut assigned = Vec::with_capacity(total);
    let mut statements = match Statements::prepare(conn) {
        Ok(statements) => statements,
        Err(err) => return Attempt::lost(conn, &err),
    };
    for (events, own_error) in commands.iter().zip(own_errors.iter_mut()) {
        if own_error.is_some() {
            continue;
        }
        if savepoints && let Err(err) = exec_cached(conn, "SAVEPOINT command") {
            return Attempt::lost(conn, &err);
        }
        let start = assigned.len();
        match statements.insert_command(conn, stream_ids, events, timestamp_ms, &mut assigned) {
            Ok(()) => {
                if savepoints && let Err(err) = exec_cached(conn, "RELEASE command") {
                    return Attempt::lost(conn, &err);
                }
            }
            Err(err) => {
                assigned.truncate(start);
                // Some errors (I/O, full disk) make SQLite roll back the whole transaction;
                // then the commands before this one are gone too.
                if conn.is_autocommit() || sqlite_code(&err).is_some_and(is_database_condition) {
                    return Attempt::lost(conn, &err);
                }
                tracing::debug!(error = %err, "command rejected");
                *own_error = Some(StoreError::from_ref(&err));
                if !savepoints {
                    rollback_quietly(conn);
                    return Attempt::CommandFailed;
                }
                if let Err(err) = exec_cached(conn, "ROLLBACK TO command")
                    .and_then(|()| exec_cached(conn, "RELEASE command"))
                {
                    return Attempt::lost(conn, &err);
                }
            }
        }
    }
    drop(statements);
    if assigned.is_empty() {
        rollback_quietly(conn);
        return Attempt::Committed(assigned);
    }
    if fault.is_some_and(FaultInjector::take_commit_failure) {
        rollback_quietly(conn);
        return Attempt::Lost {
            error: StoreError::Unavailable("injected commit failure (test fault)".to_owned()),
            reopen: false,
        };
    }
    // A failed COMMIT may leave the transaction open; `lost` ends it so nothing persists.
    if let Err(err) = exec_cached(conn, "COMMIT") {
        return Attempt::lost(conn, &err);
    }
    Attempt::Committed(assigned)
}

/// The hot path's statements, prepared (from the cache) once per attempt.
struct Statements<'conn> {
    find_row: rusqlite::CachedStatement<'conn>,
    next_position: rusqlite::CachedStatement<'conn>,
    insert_event: rusqlite::CachedStatement<'conn>,
    insert_row: rusqlite::CachedStatement<'conn>,
}

impl<'conn> Statements<'conn> {
    fn prepare(conn: &'conn Connection) -> Result<Self, rusqlite::Error> {
        Ok(Statements {
            find_row: conn.prepare_cached(FIND_ROW)?,
            next_position: conn.prepare_cached(NEXT_POSITION)?,
            insert_event: conn.prepare_cached(INSERT_EVENT)?,
            insert_row: conn.prepare_cached(INSERT_ROW)?,
        })
    }

    /// Inserts one command's events. Each event's row is looked up first: a new message id gets
    /// the next position of its stream and a new row; a known one with different data updates
    /// the row (same position, `replaced`); a known one with byte-identical data is a retry and
    /// writes nothing (no number is used: numbers stay dense). Sequence numbers come from the
    /// AUTOINCREMENT insert, positions from the rows and the stream's `pruned_position`: all
    /// from SQLite (the last one as read with the stream's id, cached until a prune deletes).
    fn insert_command(
        &mut self,
        conn: &Connection,
        stream_ids: &StreamIds,
        events: &[NewEvent],
        timestamp_ms: u64,
        out: &mut Vec<Assigned>,
    ) -> Result<(), rusqlite::Error> {
        let ts = i64::try_from(timestamp_ms).unwrap_or(i64::MAX);
        for event in events {
            let stream = match stream_ids.committed.get(&event.key) {
                Some(&stream) => stream,
                None => stream_ref(conn, &event.key)?,
            };
            let stream_id = stream.id;
            let message_id = event.message_id.as_str();
            let row: Option<(i64, i64, i64)> = self
                .find_row
                .query_row(params![stream_id, message_id], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .optional()?;
            let assigned = match row {
                None => {
                    let after_live: i64 = self
                        .next_position
                        .query_row(params![stream_id], |row| row.get(0))?;
                    let position = after_live.max(stream.pruned_position + 1);
                    let sequence_number = self.insert_event.insert(params![
                        stream_id, message_id, ts, event.data, position, false
                    ])?;
                    self.insert_row.execute(params![
                        stream_id,
                        position,
                        sequence_number,
                        message_id
                    ])?;
                    Assigned {
                        sequence_number: to_u64(sequence_number)?,
                        stream_sequence: to_u64(position)?,
                        replaced: false,
                        stream,
                        retry_of: None,
                    }
                }
                Some((position, first_sequence, last_sequence)) => {
                    let (same_data, last_ts): (bool, i64) = conn
                        .prepare_cached(EVENT_DATA_IS)?
                        .query_row(params![last_sequence, event.data], |row| {
                            Ok((row.get(0)?, row.get(1)?))
                        })?;
                    if same_data {
                        // A retry: the answer is the row's last event as committed.
                        Assigned {
                            sequence_number: to_u64(last_sequence)?,
                            stream_sequence: to_u64(position)?,
                            replaced: first_sequence != last_sequence,
                            stream,
                            retry_of: Some(to_u64(last_ts)?),
                        }
                    } else {
                        let sequence_number = self.insert_event.insert(params![
                            stream_id, message_id, ts, event.data, position, true
                        ])?;
                        conn.prepare_cached(UPDATE_ROW)?.execute(params![
                            stream_id,
                            position,
                            first_sequence,
                            sequence_number
                        ])?;
                        Assigned {
                            sequence_number: to_u64(sequence_number)?,
                            stream_sequence: to_u64(position)?,
                            replaced: true,
                            stream,
                            retry_of: None,
                        }
                    }
                }
            };
            out.push(assigned);
        }
        Ok(())
    }
}

/// `key`'s stream, creating it on its first event.
fn stream_ref(conn: &Connection, key: &SubscriptionKey) -> Result<StreamRef, rusqlite::Error> {
    let channel = key.channel().as_str();
    let request_id = key.request_id().as_str();
    let found: Option<StreamRef> = conn
        .prepare_cached(FIND_STREAM)?
        .query_row(params![channel, request_id], |row| {
            Ok(StreamRef {
                id: row.get(0)?,
                pruned_position: row.get(1)?,
            })
        })
        .optional()?;
    match found {
        Some(stream) => Ok(stream),
        None => Ok(StreamRef {
            id: conn
                .prepare_cached(INSERT_STREAM)?
                .insert(params![channel, request_id])?,
            pruned_position: 0,
        }),
    }
}

fn to_u64(value: i64) -> Result<u64, rusqlite::Error> {
    u64::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, value))
}

/// A prune step's stream rows: those whose last event is among the deleted ones (numbers up
/// to ?1), found through the deleted events' (message_id, stream_id) and the unique index
/// `stream_rows_by_message`, never a scan of stream_rows. A row whose last event stays (even one
/// still below the floor, for a later step) keeps its data.
const PRUNE_ROWS: &str = "DELETE FROM stream_rows WHERE (message_id, stream_id) IN \
         (SELECT message_id, stream_id FROM events WHERE sequence_number <= ?1) \
     AND last_sequence <= ?1";

/// Before [`PRUNE_ROWS`]: each stream keeps the highest position of the rows that step deletes
/// (same rows, same index), so its next row's position never goes back.
const KEEP_PRUNED_POSITIONS: &str = "UPDATE streams SET pruned_position = \
         MAX(pruned_position, gone.top) \
     FROM (SELECT stream_id, MAX(stream_sequence) AS top FROM stream_rows \
           WHERE (message_id, stream_id) IN \
                 (SELECT message_id, stream_id FROM events WHERE sequence_number <= ?1) \
             AND last_sequence <= ?1 \
           GROUP BY stream_id) AS gone \
     WHERE streams.stream_id = gone.stream_id";

/// The body of one prune step; the caller rolls back on error.
fn prune_step(conn: &Connection, below: u64, max_events: usize) -> Result<PruneReport, StoreError> {
    exec_cached(conn, "BEGIN IMMEDIATE")?;
    let head = schema::read_head(conn)?;
    let old_floor = schema::read_floor(conn)?;
    let floor = old_floor.max(below.min(head.saturating_add(1)));
    if floor != old_floor {
        conn.prepare_cached("UPDATE store_meta SET value = ?1 WHERE key = 'retention_floor'")?
            .execute(params![floor.to_string()])?;
    }
    let floor_i = super::error::sql_int(floor);
    // The newest event this step deletes: the `max_events`-th oldest below the floor.
    let step_end: Option<i64> = if max_events == 0 {
        None
    } else {
        conn.prepare_cached(
            "SELECT MAX(sequence_number) FROM (SELECT sequence_number FROM events \
             WHERE sequence_number < ?1 ORDER BY sequence_number LIMIT ?2)",
        )?
        .query_row(
            params![floor_i, super::error::sql_limit(max_events)],
            |row| row.get(0),
        )?
    };
    let mut deleted = 0u64;
    if let Some(end) = step_end {
        conn.prepare_cached(KEEP_PRUNED_POSITIONS)?
            .execute(params![end])?;
        conn.prepare_cached(PRUNE_ROWS)?.execute(params![end])?;
        let n = conn
            .prepare_cached("DELETE FROM events WHERE sequence_number <= ?1")?
            .execute(params![end])?;
        deleted = n as u64;
    }
    let remaining: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM events WHERE sequence_number < ?1)")?
        .query_row(params![floor_i], |row| row.get(0))?;
    exec_cached(conn, "COMMIT")?;
    if deleted > 0 || floor != old_floor {
        tracing::debug!(floor, deleted, "pruned the log");
    }
    Ok(PruneReport {
        floor,
        deleted,
        done: !remaining,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Pruning finds stream rows through `stream_rows_by_message`, and events by number.
    #[test]
    fn prune_never_scans_stream_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.db");
        crate::migrate(&path).unwrap();
        let conn = Connection::open(&path).unwrap();
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {PRUNE_ROWS}"))
            .unwrap();
        // raw_query: the parameter stays unbound, as when SQLite plans the statement.
        let mut rows = stmt.raw_query();
        let mut steps = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            steps.push(row.get::<_, String>(3).unwrap());
        }
        let plan = steps.join("\n");
        assert!(
            plan.contains("stream_rows USING INDEX stream_rows_by_message"),
            "{plan}"
        );
        assert!(!plan.contains("SCAN stream_rows"), "{plan}");
        assert!(!plan.contains("SCAN events"), "{plan}");
    }
}
