//! The store behind one interface: [`Store::commit`] is the only code path that turns published
//! messages into numbered, committed events (the backend's commit hook hands them to the hub),
//! and [`read_log!`](crate::read_log) runs a read of the log off the async runtime.

use seqcast_persistence::{
    CommittedEvent, DbReader, DbWriter, EventWriter, MemoryReader, MemoryWriter, NewEvent,
    PgReader, PgStatus, PgWriter, PruneReport, WriterStats,
};

use crate::error::ApiError;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// The sequence authority and its log. Both backends sit behind the same `EventWriter` /
/// `EventReader` traits; the server never looks further.
#[derive(Debug)]
pub enum Store {
    /// `--storage memory`: the log lives in this process; nothing survives a restart.
    Memory {
        /// The writer.
        writer: MemoryWriter,
        /// The reader.
        reader: MemoryReader,
    },
    /// SQLite: the database assigns numbers inside the write transaction.
    Sqlite {
        /// The one writer.
        writer: DbWriter,
        /// Read connections.
        reader: DbReader,
    },
    /// PostgreSQL: one sequence space shared by several nodes. Events reach the hub only
    /// through the node's ordered tail of the log (the backend's commit hook is called by it).
    Postgres {
        /// This node's writer (and tail).
        writer: PgWriter,
        /// The read pool (blocking facade over the backend's own runtime).
        reader: PgReader,
    },
}

/// Run `$body` with `$r` bound to the store's `EventReader`, on a blocking thread for SQLite
/// (reads may wait on the disk) and PostgreSQL (its reader is a blocking facade over its own
/// runtime), and inline for memory. `$body` returns
/// `Result<T, StoreError>`; the macro evaluates to `Result<T, ApiError>`.
#[macro_export]
macro_rules! read_log {
    ($store:expr, |$r:ident| $body:expr) => {
        match $store {
            $crate::storage::Store::Sqlite { reader, .. } => {
                let owned = reader.clone();
                match tokio::task::spawn_blocking(move || {
                    let $r = &owned;
                    $body
                })
                .await
                {
                    Ok(result) => result.map_err($crate::error::ApiError::from),
                    Err(e) => Err($crate::error::ApiError::Internal(format!(
                        "log reader failed: {e}"
                    ))),
                }
            }
            $crate::storage::Store::Postgres { reader, .. } => {
                let owned = reader.clone();
                match tokio::task::spawn_blocking(move || {
                    let $r = &owned;
                    $body
                })
                .await
                {
                    Ok(result) => result.map_err($crate::error::ApiError::from),
                    Err(e) => Err($crate::error::ApiError::Internal(format!(
                        "log reader failed: {e}"
                    ))),
                }
            }
            $crate::storage::Store::Memory { reader, .. } => {
                let $r = reader;
                #[allow(clippy::redundant_closure_call)]
                let result: Result<_, seqcast_persistence::StoreError> = (|| $body)();
                result.map_err($crate::error::ApiError::from)
            }
        }
    };
}

impl Store {
    /// Persist `events` as one all-or-nothing unit; the commit hook fans them out before this
    /// returns. Returns only after the write is durable (SQLite) — a failure publishes nothing.
    pub async fn commit(
        &self,
        hub: &Hub,
        events: Vec<NewEvent>,
    ) -> Result<Vec<CommittedEvent>, ApiError> {
        let result = match self {
            Store::Memory { writer, .. } => writer.append(events).await,
            Store::Sqlite { writer, .. } => writer.append(events).await,
            Store::Postgres { writer, .. } => writer.append(events).await,
        };
        if result.is_err() {
            Metrics::inc(&hub.metrics.publish_failures);
        }
        result.map_err(ApiError::from)
    }

    /// Raise the retention floor to `below` and delete up to `max_events` events under it.
    pub async fn prune(&self, below: u64, max_events: usize) -> Result<PruneReport, ApiError> {
        let result = match self {
            Store::Memory { writer, .. } => writer.prune(below, max_events).await,
            Store::Sqlite { writer, .. } => writer.prune(below, max_events).await,
            Store::Postgres { writer, .. } => writer.prune(below, max_events).await,
        };
        result.map_err(ApiError::from)
    }

    /// Finish queued writes and close.
    pub async fn close(&self) {
        match self {
            Store::Memory { writer, .. } => writer.close().await,
            Store::Sqlite { writer, .. } => writer.close().await,
            Store::Postgres { writer, .. } => writer.close().await,
        }
    }

    /// The database writer's counters and queue depth, when there is a database.
    pub fn writer_stats(&self) -> Option<(WriterStats, usize)> {
        match self {
            Store::Memory { .. } => None,
            Store::Sqlite { writer, .. } => Some((writer.stats(), writer.queued_commands())),
            Store::Postgres { writer, .. } => Some((writer.stats(), writer.queued_commands())),
        }
    }

    /// PostgreSQL only: whether the node can write, and its tail's progress.
    pub fn postgres_status(&self) -> Option<PgStatus> {
        match self {
            Store::Postgres { writer, .. } => Some(writer.status()),
            _ => None,
        }
    }

    /// False when the database writer has stopped: publishes can only fail.
    pub fn writer_running(&self) -> bool {
        match self {
            Store::Memory { .. } => true,
            Store::Sqlite { writer, .. } => writer.is_running(),
            // Its outages are reported by `postgres_status`.
            Store::Postgres { writer, .. } => !writer.is_closed(),
        }
    }

    /// Why the last write failed, when the database itself was the reason (read-only, full,
    /// locked past the busy timeout, I/O error); `None` when writes work.
    pub fn write_health(&self) -> Option<String> {
        match self {
            Store::Memory { .. } | Store::Postgres { .. } => None,
            Store::Sqlite { writer, .. } => writer.health().map(|e| e.to_string()),
        }
    }

    /// Try a write that changes nothing, to learn whether a failing database takes writes
    /// again; updates [`Store::write_health`].
    pub async fn probe(&self) {
        if let Store::Sqlite { writer, .. } = self
            && let Err(e) = writer.probe().await
        {
            tracing::debug!(error = %e, "write probe failed");
        }
    }

    /// The backend's name, as `--storage` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Store::Memory { .. } => "memory",
            Store::Sqlite { .. } => "sqlite",
            Store::Postgres { .. } => "postgres",
        }
    }
}
