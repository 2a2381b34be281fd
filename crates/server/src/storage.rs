//! The sequence authority behind one interface: [`Store::commit`] is the only code path that
//! turns published messages into numbered, committed events and hands them to fan-out.

use std::sync::Arc;

use seqcast_persistence::{CommittedEvent, DbReader, DbWriter, EventWriter, NewEvent, WriterStats};

use crate::error::ApiError;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::now_ms;

/// Where numbers come from.
#[derive(Debug)]
pub enum Store {
    /// `--storage memory`: the hub's in-memory counter, nothing survives a restart.
    Memory,
    /// SQLite: the database assigns numbers inside the write transaction; the writer's commit
    /// hook fans out in commit order before the publisher hears back.
    Sqlite {
        /// The one writer.
        writer: DbWriter,
        /// Read connections.
        reader: Arc<DbReader>,
    },
}

impl Store {
    /// Persist `events` as one all-or-nothing unit and fan them out. Returns only after the
    /// write is durable (SQLite) — a failure publishes nothing to anyone.
    pub async fn commit(
        &self,
        hub: &Hub,
        events: Vec<NewEvent>,
    ) -> Result<Vec<CommittedEvent>, ApiError> {
        let result = match self {
            Store::Memory => hub
                .publish_in_memory(events, now_ms())
                .ok_or_else(|| ApiError::Internal("memory storage without a sequencer".into())),
            Store::Sqlite { writer, .. } => writer.append(events).await.map_err(ApiError::from),
        };
        if result.is_err() {
            Metrics::inc(&hub.metrics.publish_failures);
        }
        result
    }

    /// The database writer's counters and queue depth, when there is a database.
    pub fn writer_stats(&self) -> Option<(WriterStats, usize)> {
        match self {
            Store::Memory => None,
            Store::Sqlite { writer, .. } => Some((writer.stats(), writer.queued_commands())),
        }
    }

    /// The read side, when there is a database.
    pub fn reader(&self) -> Option<&Arc<DbReader>> {
        match self {
            Store::Memory => None,
            Store::Sqlite { reader, .. } => Some(reader),
        }
    }
}
