//! The store interface: what every backend promises, whatever database is behind it.
//!
//! SQLite ([`crate::DbWriter`], [`crate::DbReader`]) is the first backend. A second one
//! (PostgreSQL is the next) implements these two traits with the same contract, gets its own
//! constructor, and runs the same contract tests (`tests/contract.rs`); the server picks a
//! backend at start and never looks behind the traits.

use std::future::Future;

use seqcast_protocol::SubscriptionKey;

use crate::error::StoreError;
use crate::event::{CommittedEvent, EventFilter, NewEvent};
use crate::writer::WriterStats;

/// The write side: one writer per store, owning the write connection.
///
/// The contract every implementation keeps:
/// - **The database numbers.** `sequence_number` (deployment-wide, strictly increasing in
///   commit order, never reused) and `stream_sequence` (per stream, max + 1 when a row is
///   created, kept when a repeated `message_id` updates it) are assigned inside the write
///   transaction; no application code computes either.
/// - **All or nothing.** One `append` call is one unit: every event commits, with consecutive
///   numbers, or none does and the call fails. A failure leaves no trace (no row, no number
///   used, nothing handed to the commit hook).
/// - **Persist first.** The backend's commit hook (given to its constructor) sees each
///   committed transaction's events in sequence order, after the commit and before any caller
///   of that transaction is answered; callers are never answered out of commit order with
///   respect to the hook.
/// - **Group commit without timers.** Concurrent appends may share a transaction, but an
///   append is never held back waiting for others.
pub trait EventWriter: Clone + Send + Sync + 'static {
    /// Persists `events` as one all-or-nothing unit (a single publish is a Vec of one, a batch
    /// publish one call) and returns them with their numbers, in order, once committed and
    /// durable. An empty Vec returns at once.
    ///
    /// If the caller stops waiting after the command was queued, the write still happens; only
    /// the answer is lost.
    fn append(
        &self,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<Vec<CommittedEvent>, StoreError>> + Send;

    /// Finishes every append already queued, closes the database and returns; later appends
    /// get [`StoreError::Closed`]. Safe to call more than once, from any clone.
    fn close(&self) -> impl Future<Output = ()> + Send;

    /// True once the writer has stopped taking appends.
    fn is_closed(&self) -> bool;

    /// Counters since the writer was opened.
    fn stats(&self) -> WriterStats;
}

/// The read side: any number of readers, never queued behind the writer, each call one
/// consistent snapshot of committed data. Calls may block on the database; async callers run
/// them in `spawn_blocking`.
pub trait EventReader: Clone + Send + Sync + 'static {
    /// The highest sequence number ever assigned (0 for an empty store); never goes back.
    fn head(&self) -> Result<u64, StoreError>;

    /// The store's epoch: a random id made when the store was created.
    fn epoch(&self) -> Result<String, StoreError>;

    /// Events with `sequence_number > since`, ascending, at most `limit`, optionally only of
    /// one stream or one channel. Each carries its row's current `stream_sequence`.
    fn events_after(
        &self,
        since: u64,
        limit: usize,
        filter: EventFilter,
    ) -> Result<Vec<CommittedEvent>, StoreError>;

    /// Of the newest `limit` events, those with `timestamp_ms >= min_timestamp_ms`, ascending:
    /// the recovery window to refill at start. Reads at most `limit` events.
    fn latest_events(
        &self,
        limit: usize,
        min_timestamp_ms: u64,
    ) -> Result<Vec<CommittedEvent>, StoreError>;

    /// A stream's current rows with `stream_sequence > after`, ascending, at most `limit`; each
    /// as its latest event (`replaced` = the row was updated since it was created).
    fn stream_rows(
        &self,
        key: &SubscriptionKey,
        after: u64,
        limit: usize,
    ) -> Result<Vec<CommittedEvent>, StoreError>;
}
