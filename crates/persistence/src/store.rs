//! The store interface: what every backend promises, whatever database is behind it.
//!
//! SQLite ([`crate::DbWriter`], [`crate::DbReader`]) is the default backend,
//! [`crate::MemoryStore`] the in-memory one (`--storage memory`) and [`crate::PgStore`] the
//! PostgreSQL one (`--storage postgres`). Each implements these two traits with the same
//! contract, has its own constructor, and runs the same contract tests (`tests/contract.rs`);
//! the server picks a backend at start and from then on holds it as `Arc<dyn EventWriter>` and
//! `Arc<dyn EventReader>`, never looking behind the traits (the writer's futures are boxed for
//! that: [`BoxFuture`]). (On PostgreSQL the commit hook is called by the node's ordered tail of
//! the log, so it also sees other nodes' commits; a caller is answered once the hook has seen
//! its events, as everywhere, and with an error when that does not happen in time.)
//!
//! The committed log is the truth; the server's memory is only a cache of its recent tail.
//! Subscribers catch up from the log with [`EventReader::page`], backlogs are views of it
//! ([`EventReader::first_at_or_after`], [`EventReader::count_key`],
//! [`EventReader::nth_newest_of_key`]), and [`EventWriter::prune`] trims it by retention behind a
//! floor ([`EventReader::retention_floor`]) that only rises.

use std::future::Future;
use std::pin::Pin;

use seqcast_protocol::SubscriptionKey;

use crate::error::StoreError;
use crate::event::{
    CommittedEvent, EventFilter, EventRef, LogPage, NewEvent, PageBounds, PruneReport,
};
use crate::health::WriterHealth;

/// Events per step of the default [`EventReader::visit_keys_page`] walk.
const MERGED_CHUNK: usize = 1_000;

/// The future a writer method returns: boxed, so the traits are `dyn`-compatible and the server
/// holds a store as `Arc<dyn EventWriter>` / `Arc<dyn EventReader>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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
/// - **Dense numbers.** Every number from 1 to `head` is used by exactly one event (until it is
///   pruned): the server's fan-out relies on each committed event being `head + 1`.
/// - **Retries are free.** An event that repeats a `message_id` in the same stream with
///   byte-identical `data` (the JSON text compared verbatim) to the row's current data is a
///   retry: nothing is written, no number is used, it is not handed to the commit hook, and it
///   is answered with what is already committed (see [`EventWriter::append`]).
pub trait EventWriter: Send + Sync + std::fmt::Debug + 'static {
    /// Persists `events` as one all-or-nothing unit (a single publish is a Vec of one, a batch
    /// publish one call) and returns them with their numbers, in order, once committed and
    /// durable. An empty Vec returns at once.
    ///
    /// For each event:
    /// - a new `message_id` in its stream creates a row: a new `sequence_number` (`head + 1`)
    ///   and the stream's next `stream_sequence`; `replaced` is false;
    /// - a known `message_id` with **different** data is an upsert: a new `sequence_number`,
    ///   the row's `stream_sequence`, `replaced` true;
    /// - a known `message_id` with the **same** data as the row's current data is a retry: no
    ///   number is used and the event is not handed to the commit hook; the answer is the row's
    ///   last event as committed (its `sequence_number`, the row's `stream_sequence`, that
    ///   event's `timestamp_ms` and `data`, `replaced` as stored). A repeat inside one call
    ///   counts too: the second of two identical events in a batch is a retry of the first.
    ///
    /// So the answer to a batch may mix new numbers with older ones (a retry carries the number
    /// first committed), and is not necessarily ascending; the new events among it have
    /// consecutive numbers in call order. The hook sees only the new events.
    /// If the caller stops waiting after the command was queued, the write still happens; only
    /// the answer is lost.
    ///
    /// When the commit hook fails, the events are committed but not delivered: their callers
    /// (and every later append) get [`StoreError::Stopped`] (see [`crate::CommitHook`]).
    fn append(
        &self,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'_, Result<Vec<CommittedEvent>, StoreError>>;

    /// Finishes every append already queued, closes the database and returns; later appends
    /// get [`StoreError::Closed`]. Safe to call more than once, from any clone.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// The writer's state: whether it runs, why writes fail if they do, its counters and queue
    /// (and, on PostgreSQL, the node's tail). Cheap: reads what the writer recorded.
    fn health(&self) -> WriterHealth;

    /// Tries a write that changes nothing (reopening a connection first when an earlier error
    /// asked for it) and records the result in [`EventWriter::health`]: how a caller learns
    /// that a failing database takes writes again without waiting for a publish. Costs one
    /// small transaction with its fsync: call it while unhealthy, not on every health check.
    /// The default answers from [`WriterHealth::unwritable`], for a backend that has nothing
    /// to probe (memory) or probes on its own schedule (PostgreSQL, every second).
    fn probe(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        let unwritable = self.health().unwritable;
        Box::pin(async move { unwritable.map_or(Ok(()), |why| Err(StoreError::Unavailable(why))) })
    }

    /// Raises the retention floor to `min(below, head + 1)` (never lowers it) and deletes up to
    /// `max_events` of the oldest events below the floor, with the stream rows whose last event
    /// is deleted (a row's data lives in its last event). Runs on the writer's thread between
    /// groups, each call one short transaction, so appends are never held up for long; `done` =
    /// nothing below the floor remains. The floor row is updated in the same transaction as
    /// (and before) the deletes, so a reader that sees an event missing also sees the raised
    /// floor.
    ///
    /// Pruning never changes `head` and never lets a number be reused, not even when every
    /// event is pruned (and, for a persistent store, reopened). Callers prune in steps (e.g.
    /// `max_events` = a few thousand, again while `!done`) so appends interleave.
    fn prune(
        &self,
        below: u64,
        max_events: usize,
    ) -> BoxFuture<'_, Result<PruneReport, StoreError>>;
}

/// The read side: any number of readers, never queued behind the writer, each call one
/// consistent snapshot of committed data. Calls may block on the database; async callers run
/// them in `spawn_blocking` unless [`EventReader::may_block`] says they need not.
///
/// **Every read of events is bounded in bytes as well as in count.** The methods that return
/// events take a `limit` (events) and a `max_bytes` budget, and read the matching events in
/// order until `limit` events are read or the bytes read ([`crate::read_bytes`]: data and
/// message id) reach `max_bytes`, then stop reading — the database cursor stops stepping; the
/// rest is never read, not read and dropped. The event that reaches or crosses the budget is
/// included, so one event larger than the budget is still read (alone) and a caller paging
/// through the log always makes progress. `usize::MAX` means no byte budget.
pub trait EventReader: Send + Sync + std::fmt::Debug + 'static {
    /// False when every read is a short operation on memory (no disk, no network) that an
    /// async task may run inline; true (the default) when a read may wait on a disk or a
    /// database and belongs on a blocking thread.
    fn may_block(&self) -> bool {
        true
    }

    /// The highest sequence number ever assigned (0 for an empty store); never goes back.
    fn head(&self) -> Result<u64, StoreError>;

    /// The store's epoch: a random id made when the store was created.
    fn epoch(&self) -> Result<String, StoreError>;

    /// The newest events, read newest first until `limit` events or `max_bytes` are read (see
    /// the trait docs), of which those with `timestamp_ms >= min_timestamp_ms`, returned
    /// ascending: what fills the tail cache at start. Reads at most `limit` events and about
    /// `max_bytes`, however large the log and its events are.
    fn latest_events(
        &self,
        limit: usize,
        min_timestamp_ms: u64,
        max_bytes: usize,
    ) -> Result<Vec<CommittedEvent>, StoreError>;

    /// A stream's current rows with `stream_sequence > after`, ascending, at most `limit` and
    /// stopped at `max_bytes` (see the trait docs); each as its latest event (`replaced` = the
    /// row was updated since it was created). Rows whose last event was pruned are gone.
    fn stream_rows(
        &self,
        key: &SubscriptionKey,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<CommittedEvent>, StoreError>;

    /// The retention floor: the smallest sequence number the log may still hold (1 for a store
    /// never pruned; `head + 1` when everything was pruned). Every event numbered in
    /// `[floor, head]` is present; everything below was pruned. Never goes back.
    fn retention_floor(&self) -> Result<u64, StoreError>;

    /// Events matching `filter` with `after < sequence_number <= through`, ascending, at most
    /// `limit` (>= 1; 0 is read as 1) and stopped at `max_bytes` (see the trait docs; at least
    /// one event is read when one matches), together with the retention floor, all in ONE read
    /// transaction (SQLite: `BEGIN DEFERRED ... COMMIT` on the pooled connection), so pruning
    /// can never open a silent hole under a reader: if `floor > after + 1` the caller knows
    /// events may be missing. A `Key` filter uses the per-stream index (cost proportional to
    /// the page, not to the log). `Channel`/`All` may walk the log from `after`.
    ///
    /// `covered_through` is the last event's number when `limit` or `max_bytes` cut the page,
    /// else `through`
    /// (also when `through <= after`: then the page is empty and covers nothing new); every
    /// matching event in `(after, covered_through]` is in `events`, so the next page starts
    /// after `covered_through`. Pass a `through` no greater than a head already seen: numbers
    /// above the head are not committed yet, and a page not cut by `limit` would claim them.
    fn page(
        &self,
        filter: &EventFilter,
        after: u64,
        through: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<LogPage, StoreError>;

    /// [`EventReader::page`] of one key, handing each event to `visit` as it is read instead of
    /// collecting [`CommittedEvent`]s: the catch-up path encodes frames straight from the
    /// store's rows (SQLite: no copy of the message id or data). The same transaction, order,
    /// bounds, budgets and floor as `page`; `visit` must not call back into the reader.
    fn visit_key_page(
        &self,
        key: &SubscriptionKey,
        after: u64,
        through: u64,
        limit: usize,
        max_bytes: usize,
        visit: &mut dyn FnMut(EventRef<'_>),
    ) -> Result<PageBounds, StoreError> {
        let page = self.page(
            &EventFilter::Key(key.clone()),
            after,
            through,
            limit,
            max_bytes,
        )?;
        for ev in &page.events {
            visit(ev.into());
        }
        Ok(PageBounds {
            covered_through: page.covered_through,
            floor: page.floor,
        })
    }

    /// Keys read together (keys resumed in one `resume`): the events of every key `keys[i].0`
    /// numbered in `(keys[i].1, through]` — each key above its own position — merged in global
    /// order, starting at the smallest position, handed to `visit` with the key's index in
    /// `keys`. The same bounds, budgets and floor as [`EventReader::visit_key_page`], relative to
    /// the smallest position: `covered_through` is the last event's number when `limit` or
    /// `max_bytes` cut the page, else `through`; every wanted event up to it was visited.
    ///
    /// This default walks the log from the smallest position in chunks, keeping the keys'
    /// events (the in-memory log); SQLite and PostgreSQL override it with one statement per
    /// page over the per-stream index.
    fn visit_keys_page(
        &self,
        keys: &[(SubscriptionKey, u64)],
        through: u64,
        limit: usize,
        max_bytes: usize,
        visit: &mut dyn FnMut(usize, EventRef<'_>),
    ) -> Result<PageBounds, StoreError> {
        let index: std::collections::HashMap<&SubscriptionKey, usize> =
            keys.iter().enumerate().map(|(i, (k, _))| (k, i)).collect();
        let mut from = keys.iter().map(|&(_, a)| a).min().unwrap_or(through);
        let mut budget = crate::event::ReadBudget::new(limit.max(1), max_bytes);
        let mut floor = 0;
        loop {
            let page = self.page(&EventFilter::All, from, through, MERGED_CHUNK, max_bytes)?;
            floor = floor.max(page.floor);
            for ev in &page.events {
                let Some(&i) = index.get(&ev.key) else {
                    continue;
                };
                if ev.sequence_number <= keys[i].1 {
                    continue;
                }
                budget.take(ev.read_bytes());
                visit(i, ev.into());
                if budget.is_spent() {
                    return Ok(PageBounds {
                        covered_through: ev.sequence_number,
                        floor,
                    });
                }
            }
            if page.covered_through >= through {
                return Ok(PageBounds {
                    covered_through: through,
                    floor,
                });
            }
            from = page.covered_through;
        }
    }

    /// The smallest retained sequence number whose timestamp is >= `min_timestamp_ms`, or None
    /// when no retained event is that new. Timestamps never decrease along the log, so this is
    /// a binary search on the primary key (O(log n) point lookups), never a scan.
    fn first_at_or_after(&self, min_timestamp_ms: u64) -> Result<Option<u64>, StoreError>;

    /// How many events of `key` have `after < sequence_number <= through` (index-only count).
    fn count_key(&self, key: &SubscriptionKey, after: u64, through: u64)
    -> Result<u64, StoreError>;

    /// The sequence number of the `n`-th newest event (n >= 1; 1 = the newest) of `key` with
    /// `sequence_number <= through`, or None when the key has fewer than `n` such events (or
    /// `n` is 0).
    fn nth_newest_of_key(
        &self,
        key: &SubscriptionKey,
        through: u64,
        n: usize,
    ) -> Result<Option<u64>, StoreError>;
}
