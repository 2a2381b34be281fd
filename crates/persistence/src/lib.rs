//! seqcast persistence: the single database writer and the readers of the SQLite store.
//!
//! Job: persist published messages and hand back the numbers the database gave them.
//! [`DbWriter`] owns the only write connection on a dedicated thread (`seqcast-db-writer`);
//! publishers send it commands over a bounded queue and each waits on its own oneshot reply.
//! The thread groups every queued command into one transaction (group commit), calls the
//! [`CommitHook`] with the committed events in sequence order, and only then answers — so the
//! server broadcasts only what is durable (persist-first), in number order. [`DbReader`] reads
//! on its own WAL connections; [`migrate`] and [`repair_sequences`] are the `seqcast db` tools.
//!
//! Boundary: disk I/O through SQLite only. No async runtime is used here (tokio appears only for
//! its channels); no clock except the one timestamp taken per transaction; no network.
//!
//! Invariant: SQLite assigns every number. `sequence_number` comes from an AUTOINCREMENT insert
//! (strictly increasing in commit order, never reused) and `stream_sequence` from
//! `MAX(stream_sequence)+1` in the upsert statement; no Rust code computes either. An event is
//! visible to the hook, a reply or a reader only after its transaction committed, and a failed
//! transaction leaves nothing behind.

mod checkpoint;
mod config;
mod error;
mod event;
mod memory;
mod reader;
mod repair;
mod schema;
mod store;
mod writer;

pub use config::{
    DEFAULT_BUSY_TIMEOUT, DEFAULT_MAX_GROUP_EVENTS, DEFAULT_QUEUE_CAPACITY, FaultInjector,
    ParseSynchronousError, StoreConfig, Synchronous,
};
pub use error::StoreError;
pub use event::{CommittedEvent, EventFilter, LogPage, NewEvent, PruneReport, StoreInfo};
pub use memory::{MemoryReader, MemoryStore, MemoryWriter};
pub use reader::DbReader;
pub use repair::{RepairReport, repair_sequences};
pub use schema::{AppliedMigration, MigrationReport, SCHEMA_VERSION, migrate};
pub use store::{EventReader, EventWriter};
pub use writer::{CommitHook, DbWriter, WriterStats};
