//! seqcast persistence: the stores behind one interface — SQLite (the default), memory and
//! PostgreSQL — with their database writers and readers.
//!
//! Job: persist published messages and hand back the numbers the database gave them.
//! [`EventWriter`] and [`EventReader`] are the interface; both are `dyn`-compatible, so a caller
//! holds whichever backend it opened as `Arc<dyn EventWriter>` / `Arc<dyn EventReader>`.
//! [`DbWriter`] owns SQLite's only write connection on a dedicated thread
//! (`seqcast-db-writer`), [`PgWriter`] a node's PostgreSQL connection on a task; both run the
//! same writer actor (`actor.rs`): publishers send commands over a bounded queue, each waits on
//! its own oneshot reply, every queued command goes into one transaction (group commit), and
//! the answers go out in order. Each backend calls its [`CommitHook`] with the committed events
//! in sequence order and only then answers — so the server broadcasts only what is durable
//! (persist-first), in number order; a hook that fails stops the writer (see [`HookError`]).
//! [`EventWriter::health`] is the writer's one health report. [`DbReader`] reads on its own
//! WAL connections; [`migrate`] and [`repair_sequences`] are the `seqcast db` tools.
//! [`MemoryStore`] is the in-memory backend (`--storage memory`) with the same contract, and
//! [`PgStore`] the PostgreSQL one (`--storage postgres`: several nodes, one sequence space; its
//! ordered tail, not its writer, calls the hook — see the `postgres` module).
//!
//! The committed log is the truth; the server's memory only caches its recent tail. Readers
//! page through it ([`EventReader::page`], one read transaction per page, with the retention
//! floor), find where time windows and per-key backlogs start
//! ([`EventReader::first_at_or_after`], [`EventReader::count_key`],
//! [`EventReader::nth_newest_of_key`]), and the writer trims it by retention
//! ([`EventWriter::prune`]) behind a floor that only rises ([`EventReader::retention_floor`]).
//! A publish repeating a message id with the same data is a retry: answered with the numbers
//! already committed, using none (numbers stay dense).
//!
//! Boundary: disk I/O through SQLite, and the PostgreSQL backend's connections. SQLite uses no
//! async runtime (tokio appears only for its channels); the PostgreSQL backend runs
//! tokio-postgres on a private runtime of its own. No clock except the one timestamp taken per
//! transaction.
//!
//! Invariant (SQLite): SQLite assigns every number. `sequence_number` comes from an AUTOINCREMENT insert
//! (strictly increasing in commit order, never reused) and `stream_sequence` from
//! `MAX(stream_sequence)+1` in the upsert statement; no Rust code computes either. An event is
//! visible to the hook, a reply or a reader only after its transaction committed, and a failed
//! transaction leaves nothing behind. Numbers are dense: a retry takes its AUTOINCREMENT step
//! back inside the transaction, and a failed transaction never used one.

mod actor;
mod clock;
mod error;
mod event;
mod health;
mod hook;
mod maintenance;
mod memory;
mod postgres;
mod sqlite;
mod store;

// The interface every backend implements, and the types it speaks in.
pub use error::StoreError;
pub use event::{
    CommittedEvent, EventFilter, EventRef, LogPage, NewEvent, PageBounds, PruneReport, StoreInfo,
    read_bytes,
};
pub use health::{TailHealth, WriterHealth, WriterStats};
pub use hook::{CommitHook, CommitObserver, HookError};
pub use store::{BoxFuture, EventReader, EventWriter};

// The backends: SQLite (the default), memory, PostgreSQL.
pub use actor::{DEFAULT_MAX_GROUP_EVENTS, DEFAULT_QUEUE_CAPACITY};
pub use memory::{MemoryReader, MemoryStore, MemoryWriter};
pub use postgres::{
    DEFAULT_PG_POOL_SIZE, DEFAULT_PG_STATEMENT_TIMEOUT, PG_SCHEMA_VERSION, PgConfig, PgReader,
    PgStore, PgWriter, pg_migrate, pg_repair_sequences,
};
pub use sqlite::{
    BackupReport, DEFAULT_BUSY_TIMEOUT, DbReader, DbWriter, FaultInjector, NEW_DATABASE_PAGE_SIZE,
    ParseSynchronousError, RestoreReport, SCHEMA_VERSION, StoreConfig, Synchronous, backup,
    migrate, repair_sequences, restore,
};

// What the `seqcast db` tools report, for both databases.
pub use maintenance::{AppliedMigration, MigrationReport, RepairReport};
