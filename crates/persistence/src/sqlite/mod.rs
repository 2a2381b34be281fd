//! The SQLite backend (the default): one file, one writer thread, WAL readers.
//!
//! [`DbWriter`] owns the only write connection on a dedicated thread (`seqcast-db-writer`),
//! the shared writer shell's loop ([`crate::actor`]) with SQLite's group transaction as its
//! commit step; [`DbReader`] reads on its own WAL connections; checkpoints run on a thread of
//! their own. [`migrate`], [`repair_sequences`], [`backup`] and [`restore`] are the `seqcast db`
//! tools. SQLite assigns every number (see the crate docs' invariant).

mod backup;
mod checkpoint;
mod config;
mod error;
mod reader;
mod repair;
mod schema;
mod writer;

pub use backup::{BackupReport, RestoreReport, backup, restore};
pub use config::{
    DEFAULT_BUSY_TIMEOUT, FaultInjector, ParseSynchronousError, StoreConfig, Synchronous,
};
pub use reader::DbReader;
pub use repair::repair_sequences;
pub use schema::{NEW_DATABASE_PAGE_SIZE, SCHEMA_VERSION, migrate};
pub use writer::DbWriter;
