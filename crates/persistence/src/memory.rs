//! The in-memory backend (`--storage memory`): the same contract as SQLite, nothing on disk.
//!
//! One `Arc<Mutex<Log>>` holds the log; [`MemoryWriter`] and [`MemoryReader`] share it. The
//! writer numbers events under the lock (dense, strictly increasing), calls the commit hook
//! under the same lock before the append returns (so the hook sees commit order), and answers.
//! Reads take the lock for one consistent snapshot.
//!
//! Memory is bounded only by pruning ([`EventWriter::prune`]): every event stays until the
//! server's retention prunes it, and a key whose rows were all pruned keeps one number (the
//! highest position it gave, as SQLite's `streams` row keeps it), so positions never go back. Nothing survives the process; a new store starts at head 0
//! with a new epoch.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use seqcast_protocol::{MessageId, SubscriptionKey};

use crate::clock::now_ms;
use crate::error::StoreError;
use crate::event::{
    CommittedEvent, EventFilter, LogPage, NewEvent, PruneReport, ReadBudget, StoreInfo,
};
use crate::health::{WriterHealth, WriterStats};
use crate::hook::{self, CommitHook};
use crate::store::{BoxFuture, EventReader, EventWriter};

/// The in-memory store. [`MemoryStore::open`] makes one.
///
/// Its memory is bounded only by pruning: every event (and every row's data) stays until
/// [`EventWriter::prune`] removes it. Lookups are O(1) by number (a dense `VecDeque`), O(1)
/// by (key, message id) (hash maps), and O(log n) by time or within one key (binary searches
/// over the log and each key's list of numbers).
#[derive(Debug)]
pub struct MemoryStore;

impl MemoryStore {
    /// A new, empty store (head 0, a random 16-byte hex epoch) with `hook` as its commit hook.
    pub fn open(hook: CommitHook) -> (MemoryWriter, MemoryReader, StoreInfo) {
        let epoch = random_epoch();
        let shared = Arc::new(Shared {
            epoch: epoch.clone(),
            log: Mutex::new(Log {
                closed: false,
                stopped: None,
                head: 0,
                floor: 1,
                first_seq: 1,
                last_timestamp_ms: 0,
                events: VecDeque::new(),
                streams: HashMap::default(),
                emptied: HashMap::default(),
                stats: WriterStats::default(),
                hook,
            }),
        });
        (
            MemoryWriter {
                shared: Arc::clone(&shared),
            },
            MemoryReader { shared },
            StoreInfo { epoch, head: 0 },
        )
    }
}

/// 16 random bytes as hex (the same shape as a SQLite store's epoch).
fn random_epoch() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Shared {
    epoch: String,
    log: Mutex<Log>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One event as kept: its stream position and `replaced` come from its row, as in SQLite.
struct Stored {
    key: SubscriptionKey,
    message_id: MessageId,
    timestamp_ms: u64,
    data: String,
}

/// One stream row: position, creating event, last (current) event.
#[derive(Clone, Copy)]
struct Row {
    stream_sequence: u64,
    first_sequence: u64,
    last_sequence: u64,
}

#[derive(Default)]
struct Stream {
    rows: HashMap<MessageId, Row, foldhash::fast::RandomState>,
    /// (stream_sequence, first_sequence) -> message_id: the rows in page order.
    by_position: BTreeMap<(u64, u64), MessageId>,
    /// The stream's retained events' numbers, ascending.
    numbers: VecDeque<u64>,
    /// The highest position of a row pruning removed (positions never go back).
    pruned_position: u64,
}

struct Log {
    closed: bool,
    /// Set when the commit hook failed: every later append is refused with it.
    stopped: Option<StoreError>,
    /// The highest number ever assigned.
    head: u64,
    floor: u64,
    /// The number of `events[0]` (`head + 1` when `events` is empty): events are dense.
    first_seq: u64,
    last_timestamp_ms: u64,
    events: VecDeque<Stored>,
    streams: HashMap<SubscriptionKey, Stream, foldhash::fast::RandomState>,
    /// Streams pruned empty: the highest position they gave, for their next row (as SQLite's
    /// `streams.pruned_position`). One number per such key.
    emptied: HashMap<SubscriptionKey, u64, foldhash::fast::RandomState>,
    stats: WriterStats,
    hook: CommitHook,
}

impl Log {
    fn get(&self, seq: u64) -> Option<&Stored> {
        let index = seq.checked_sub(self.first_seq)?;
        self.events.get(usize::try_from(index).ok()?)
    }

    /// The index in `events` of the first event numbered `> after`.
    fn index_after(&self, after: u64) -> usize {
        usize::try_from(after.saturating_add(1).saturating_sub(self.first_seq))
            .unwrap_or(usize::MAX)
            .min(self.events.len())
    }

    fn committed(&self, seq: u64) -> Result<CommittedEvent, StoreError> {
        let stored = self
            .get(seq)
            .ok_or_else(|| StoreError::Corrupt(format!("event {seq} is missing")))?;
        let row = self
            .streams
            .get(&stored.key)
            .and_then(|s| s.rows.get(&stored.message_id))
            .ok_or_else(|| StoreError::Corrupt(format!("event {seq} has no stream row")))?;
        Ok(CommittedEvent {
            sequence_number: seq,
            stream_sequence: row.stream_sequence,
            key: stored.key.clone(),
            message_id: stored.message_id.clone(),
            timestamp_ms: stored.timestamp_ms,
            data: stored.data.clone(),
            replaced: row.first_sequence != seq,
        })
    }

    /// The row's current state as an event (its last event).
    fn row_event(&self, row: &Row) -> Result<CommittedEvent, StoreError> {
        let mut event = self.committed(row.last_sequence)?;
        event.stream_sequence = row.stream_sequence;
        event.replaced = row.first_sequence != row.last_sequence;
        Ok(event)
    }

    /// Matching events numbered in `(after, through]`, ascending, at most `limit`.
    fn collect(
        &self,
        filter: &EventFilter,
        after: u64,
        through: u64,
        budget: &mut ReadBudget,
    ) -> Result<Vec<CommittedEvent>, StoreError> {
        let mut out = Vec::new();
        if through <= after {
            return Ok(out);
        }
        match filter {
            EventFilter::Key(key) => {
                let Some(stream) = self.streams.get(key) else {
                    return Ok(out);
                };
                let start = stream.numbers.partition_point(|&n| n <= after);
                for &seq in stream.numbers.range(start..) {
                    if seq > through || !budget.has_room() {
                        break;
                    }
                    let ev = self.committed(seq)?;
                    budget.take(ev.read_bytes());
                    out.push(ev);
                }
            }
            EventFilter::All | EventFilter::Channel(_) => {
                let start = self.index_after(after);
                for (i, stored) in self.events.range(start..).enumerate() {
                    let seq = self.first_seq + (start + i) as u64;
                    if seq > through || !budget.has_room() {
                        break;
                    }
                    if let EventFilter::Channel(channel) = filter
                        && stored.key.channel() != channel
                    {
                        continue;
                    }
                    let ev = self.committed(seq)?;
                    budget.take(ev.read_bytes());
                    out.push(ev);
                }
            }
        }
        Ok(out)
    }

    /// Applies one validated event; `None` for a new event, else the retry's answer.
    fn apply(&mut self, event: NewEvent, timestamp_ms: u64) -> Result<Applied, StoreError> {
        let Log {
            streams,
            emptied,
            events,
            head,
            first_seq,
            ..
        } = self;
        // One hash of the key per event: look the stream up, and make it only when new.
        let stream = match streams.get_mut(&event.key) {
            Some(stream) => stream,
            None => streams.entry(event.key.clone()).or_insert_with(|| Stream {
                pruned_position: emptied.remove(&event.key).unwrap_or(0),
                ..Stream::default()
            }),
        };
        // One hash of the message id: the row is looked up and, when new, made in place.
        let row = match stream.rows.entry(event.message_id.clone()) {
            Entry::Occupied(mut occupied) => {
                let row = occupied.get_mut();
                let index = usize::try_from(row.last_sequence - *first_seq).unwrap_or(usize::MAX);
                if events
                    .get(index)
                    .is_some_and(|last| last.data == event.data)
                {
                    return Ok(Applied::Retry(*row));
                }
                *head += 1;
                row.last_sequence = *head;
                *row
            }
            Entry::Vacant(vacant) => {
                *head += 1;
                let stream_sequence = stream
                    .by_position
                    .last_key_value()
                    .map_or(0, |((position, _), _)| *position)
                    .max(stream.pruned_position)
                    + 1;
                let row = Row {
                    stream_sequence,
                    first_sequence: *head,
                    last_sequence: *head,
                };
                vacant.insert(row);
                stream
                    .by_position
                    .insert((stream_sequence, *head), event.message_id.clone());
                row
            }
        };
        let seq = *head;
        stream.numbers.push_back(seq);
        let committed = CommittedEvent {
            sequence_number: seq,
            stream_sequence: row.stream_sequence,
            key: event.key.clone(),
            message_id: event.message_id.clone(),
            timestamp_ms,
            data: event.data.clone(),
            replaced: row.first_sequence != seq,
        };
        events.push_back(Stored {
            key: event.key,
            message_id: event.message_id,
            timestamp_ms,
            data: event.data,
        });
        Ok(Applied::New(committed))
    }

    /// Removes the oldest event (which must be below the floor) and, when it was its row's
    /// last event, the row.
    fn pop_oldest(&mut self) {
        let Some(stored) = self.events.pop_front() else {
            return;
        };
        let seq = self.first_seq;
        self.first_seq += 1;
        let Some(stream) = self.streams.get_mut(&stored.key) else {
            return;
        };
        if stream.numbers.front() == Some(&seq) {
            stream.numbers.pop_front();
        }
        if let Some(row) = stream.rows.get(&stored.message_id).copied()
            && row.last_sequence == seq
        {
            stream.rows.remove(&stored.message_id);
            stream
                .by_position
                .remove(&(row.stream_sequence, row.first_sequence));
            stream.pruned_position = stream.pruned_position.max(row.stream_sequence);
        }
        if stream.rows.is_empty() && stream.numbers.is_empty() {
            let pruned_position = stream.pruned_position;
            self.streams.remove(&stored.key);
            if pruned_position > 0 {
                self.emptied.insert(stored.key, pruned_position);
            }
        }
    }
}

enum Applied {
    New(CommittedEvent),
    Retry(Row),
}

/// The write side of a [`MemoryStore`]. Cheap to clone; clones share the log.
#[derive(Clone)]
pub struct MemoryWriter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryWriter")
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

impl MemoryWriter {
    fn append_now(&self, events: Vec<NewEvent>) -> Result<Vec<CommittedEvent>, StoreError> {
        let mut log = self.shared.lock();
        if log.closed {
            return Err(StoreError::Closed);
        }
        if let Some(stopped) = &log.stopped {
            return Err(stopped.clone());
        }
        log.stats.commands_received += 1;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // All or nothing: everything that can refuse an event is checked before anything is
        // applied (SQLite's `CHECK (json_valid(data))`).
        for event in &events {
            if serde_json::from_str::<&serde_json::value::RawValue>(&event.data).is_err() {
                return Err(StoreError::Rejected(format!(
                    "data of message {} is not JSON",
                    event.message_id
                )));
            }
        }
        let timestamp_ms = now_ms().max(log.last_timestamp_ms);
        let mut applied = Vec::with_capacity(events.len());
        for event in events {
            applied.push(log.apply(event, timestamp_ms)?);
        }
        // Usually every event is new: the answers are then the hook's events (no copy). With
        // retries, the hook gets copies of the new ones and the retries are answered from
        // their rows.
        let retries = applied.iter().any(|a| matches!(a, Applied::Retry(_)));
        let fresh: Vec<CommittedEvent>;
        let answers: Vec<CommittedEvent>;
        let new_events: &[CommittedEvent] = if retries {
            fresh = applied
                .iter()
                .filter_map(|a| match a {
                    Applied::New(committed) => Some(committed.clone()),
                    Applied::Retry(_) => None,
                })
                .collect();
            answers = applied
                .into_iter()
                .map(|a| match a {
                    Applied::New(committed) => Ok(committed),
                    Applied::Retry(row) => log.row_event(&row),
                })
                .collect::<Result<_, _>>()?;
            &fresh
        } else {
            answers = applied
                .into_iter()
                .filter_map(|a| match a {
                    Applied::New(committed) => Some(committed),
                    Applied::Retry(_) => None,
                })
                .collect();
            &answers
        };
        if !new_events.is_empty() {
            log.last_timestamp_ms = timestamp_ms;
            log.stats.transactions_committed += 1;
            log.stats.events_committed += new_events.len() as u64;
            if let Err(failure) = hook::deliver(&mut log.hook, new_events) {
                // Committed but not delivered: the caller is not acknowledged, and the store
                // takes no more writes.
                hook::log_failure(&failure, new_events.len());
                let error = hook::stopped(&failure);
                log.stopped = Some(error.clone());
                return Err(error);
            }
        }
        Ok(answers)
    }

    fn prune_now(&self, below: u64, max_events: usize) -> Result<PruneReport, StoreError> {
        let mut log = self.shared.lock();
        if log.closed {
            return Err(StoreError::Closed);
        }
        if let Some(stopped) = &log.stopped {
            return Err(stopped.clone());
        }
        log.floor = log.floor.max(below.min(log.head.saturating_add(1)));
        let mut deleted = 0u64;
        while (deleted as usize) < max_events && log.first_seq < log.floor && !log.events.is_empty()
        {
            log.pop_oldest();
            deleted += 1;
        }
        let done = log.events.is_empty() || log.first_seq >= log.floor;
        Ok(PruneReport {
            floor: log.floor,
            deleted,
            done,
        })
    }
}

impl EventWriter for MemoryWriter {
    fn append(
        &self,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'_, Result<Vec<CommittedEvent>, StoreError>> {
        Box::pin(async move { self.append_now(events) })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.shared.lock().closed = true })
    }

    /// No queue (an append runs on the caller's task) and nothing that can fail for a reason
    /// of a database's.
    fn health(&self) -> WriterHealth {
        let log = self.shared.lock();
        let stopped = match (&log.stopped, log.closed) {
            (Some(stopped), _) => Some(stopped.to_string()),
            (None, true) => Some(StoreError::Closed.to_string()),
            (None, false) => None,
        };
        WriterHealth {
            stopped,
            unwritable: None,
            stats: log.stats,
            queued_commands: None,
            tail: None,
        }
    }

    fn prune(
        &self,
        below: u64,
        max_events: usize,
    ) -> BoxFuture<'_, Result<PruneReport, StoreError>> {
        Box::pin(async move { self.prune_now(below, max_events) })
    }
}

/// The read side of a [`MemoryStore`]. Cheap to clone. Reads keep working after the writer
/// is closed.
#[derive(Clone)]
pub struct MemoryReader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryReader").finish_non_exhaustive()
    }
}

impl EventReader for MemoryReader {
    /// Every read is one short critical section on memory: async callers may read inline.
    fn may_block(&self) -> bool {
        false
    }

    fn head(&self) -> Result<u64, StoreError> {
        Ok(self.shared.lock().head)
    }

    fn epoch(&self) -> Result<String, StoreError> {
        Ok(self.shared.epoch.clone())
    }

    fn latest_events(
        &self,
        limit: usize,
        min_timestamp_ms: u64,
        max_bytes: usize,
    ) -> Result<Vec<CommittedEvent>, StoreError> {
        let log = self.shared.lock();
        let mut budget = ReadBudget::new(limit, max_bytes);
        let mut out = Vec::new();
        // Newest first, stopping at the first one too old (timestamps never decrease along the
        // log) or when a budget is spent.
        for (i, stored) in log.events.iter().enumerate().rev() {
            if !budget.has_room() || stored.timestamp_ms < min_timestamp_ms {
                break;
            }
            let ev = log.committed(log.first_seq + i as u64)?;
            budget.take(ev.read_bytes());
            out.push(ev);
        }
        out.reverse();
        Ok(out)
    }

    fn stream_rows(
        &self,
        key: &SubscriptionKey,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<CommittedEvent>, StoreError> {
        let log = self.shared.lock();
        let Some(stream) = log.streams.get(key) else {
            return Ok(Vec::new());
        };
        let mut budget = ReadBudget::new(limit, max_bytes);
        let mut out = Vec::new();
        let from = (Bound::Excluded((after, u64::MAX)), Bound::Unbounded);
        for message_id in stream.by_position.range(from).map(|(_, id)| id) {
            if !budget.has_room() {
                break;
            }
            if let Some(row) = stream.rows.get(message_id) {
                let ev = log.row_event(row)?;
                budget.take(ev.read_bytes());
                out.push(ev);
            }
        }
        Ok(out)
    }

    fn retention_floor(&self) -> Result<u64, StoreError> {
        Ok(self.shared.lock().floor)
    }

    fn page(
        &self,
        filter: &EventFilter,
        after: u64,
        through: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<LogPage, StoreError> {
        let log = self.shared.lock();
        let mut budget = ReadBudget::new(limit.max(1), max_bytes);
        let from = after.max(log.floor.saturating_sub(1));
        let events = log.collect(filter, from, through, &mut budget)?;
        let last = events.last().map_or(0, |e| e.sequence_number);
        let covered_through = budget.covered_through(last, through);
        Ok(LogPage {
            events,
            covered_through,
            floor: log.floor,
        })
    }

    fn first_at_or_after(&self, min_timestamp_ms: u64) -> Result<Option<u64>, StoreError> {
        let log = self.shared.lock();
        // Timestamps never decrease along the log: binary search (VecDeque indexes in O(1)).
        let start = log.index_after(log.floor.saturating_sub(1));
        let (mut lo, mut hi) = (start, log.events.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if log.events[mid].timestamp_ms < min_timestamp_ms {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let offset = lo - start;
        let index = start + offset;
        Ok((index < log.events.len()).then(|| log.first_seq + index as u64))
    }

    fn count_key(
        &self,
        key: &SubscriptionKey,
        after: u64,
        through: u64,
    ) -> Result<u64, StoreError> {
        let log = self.shared.lock();
        let Some(stream) = log.streams.get(key) else {
            return Ok(0);
        };
        let from = after.max(log.floor.saturating_sub(1));
        if through <= from {
            return Ok(0);
        }
        let lo = stream.numbers.partition_point(|&n| n <= from);
        let hi = stream.numbers.partition_point(|&n| n <= through);
        Ok(hi.saturating_sub(lo) as u64)
    }

    fn nth_newest_of_key(
        &self,
        key: &SubscriptionKey,
        through: u64,
        n: usize,
    ) -> Result<Option<u64>, StoreError> {
        if n == 0 {
            return Ok(None);
        }
        let log = self.shared.lock();
        let Some(stream) = log.streams.get(key) else {
            return Ok(None);
        };
        let end = stream.numbers.partition_point(|&s| s <= through);
        let Some(index) = end.checked_sub(n) else {
            return Ok(None);
        };
        let seq = stream.numbers[index];
        Ok((seq >= log.floor).then_some(seq))
    }
}
