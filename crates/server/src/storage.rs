//! The store behind one interface: [`Store::commit`] is the only code path that turns published
//! messages into numbered, committed events (the backend's commit hook hands them to the hub),
//! and [`Store::read`] is the one way the server reads the log.

use std::sync::Arc;

use tokio::sync::watch;

use seqcast_persistence::{
    CommittedEvent, EventReader, EventWriter, NewEvent, PruneReport, StoreError, WriterHealth,
};

use crate::error::ApiError;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// The sequence authority and its log: whichever backend was opened, behind the
/// `EventWriter` / `EventReader` traits; the server never looks further.
#[derive(Debug)]
pub struct Store {
    writer: Arc<dyn EventWriter>,
    reader: Arc<dyn EventReader>,
    name: &'static str,
    /// Why the commit hook refused committed events, once it did (set by the hook).
    delivery: watch::Receiver<Option<String>>,
}

impl Store {
    /// The store of backend `name` (as `--storage` spells it); its commit hook sends on the
    /// other end of `delivery` why it refused committed events, if it does.
    pub fn new(
        name: &'static str,
        writer: Arc<dyn EventWriter>,
        reader: Arc<dyn EventReader>,
        delivery: watch::Receiver<Option<String>>,
    ) -> Self {
        Store {
            writer,
            reader,
            name,
            delivery,
        }
    }

    /// Waits until the commit hook refused committed events (the store then takes no more
    /// writes) and says why; `None` once the hook is gone (the store was dropped).
    pub async fn delivery_failure(&self) -> Option<String> {
        let mut delivery = self.delivery.clone();
        let failed = delivery.wait_for(Option::is_some).await.ok()?;
        failed.clone()
    }

    /// Persist `events` as one all-or-nothing unit; the commit hook fans them out before this
    /// returns. Returns only after the write is durable (SQLite) — a failure publishes nothing.
    pub async fn commit(
        &self,
        hub: &Hub,
        events: Vec<NewEvent>,
    ) -> Result<Vec<CommittedEvent>, ApiError> {
        let result = self.writer.append(events).await;
        if result.is_err() {
            Metrics::inc(&hub.metrics.publish_failures);
        }
        result.map_err(ApiError::from)
    }

    /// Raise the retention floor to `below` and delete up to `max_events` events under it.
    pub async fn prune(&self, below: u64, max_events: usize) -> Result<PruneReport, ApiError> {
        self.writer
            .prune(below, max_events)
            .await
            .map_err(ApiError::from)
    }

    /// Finish queued writes and close.
    pub async fn close(&self) {
        self.writer.close().await;
    }

    /// The writer's state: whether it runs, why writes fail if they do, its counters and queue,
    /// and (PostgreSQL) the node's tail.
    pub fn health(&self) -> WriterHealth {
        self.writer.health()
    }

    /// Try a write that changes nothing, to learn whether a failing database takes writes
    /// again; updates [`Store::health`].
    pub async fn probe(&self) {
        if let Err(e) = self.writer.probe().await {
            tracing::debug!(error = %e, "write probe failed");
        }
    }

    /// The backend's name, as `--storage` spells it.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Run `read` on the log, off the async runtime when the backend's reads may block (SQLite
    /// waits on the disk; PostgreSQL's reader is a blocking facade over its own runtime) and
    /// inline when they do not (memory: see [`EventReader::may_block`]).
    pub async fn read<T, F>(&self, read: F) -> Result<T, ApiError>
    where
        F: FnOnce(&dyn EventReader) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        if !self.reader.may_block() {
            return read(&*self.reader).map_err(ApiError::from);
        }
        let reader = Arc::clone(&self.reader);
        match tokio::task::spawn_blocking(move || read(&*reader)).await {
            Ok(result) => result.map_err(ApiError::from),
            Err(e) => Err(ApiError::Internal(format!("log reader failed: {e}"))),
        }
    }

    /// The reader itself, for a caller that may block (the start, before serving).
    pub fn blocking_reader(&self) -> &dyn EventReader {
        &*self.reader
    }
}
