//! Readers: their own connections to the WAL database, so reads never queue behind writes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, Row, params};
use seqcast_protocol::{Channel, MessageId, MessageIdRef, RequestId, SubscriptionKey};

use super::config::DEFAULT_BUSY_TIMEOUT;
use super::error::{sql_int, sql_limit, stored_u64};
use super::schema::{self, ConnectionOptions};
use crate::error::StoreError;
use crate::event::{
    CommittedEvent, EventFilter, EventRef, LogPage, PageBounds, ReadBudget, merged_key_index,
};
use crate::store::EventReader;

/// Idle connections kept for reuse; more are opened on demand when readers overlap.
const MAX_IDLE_CONNECTIONS: usize = 4;
/// How much of the database file one reader connection maps (address space, not memory: the
/// kernel pages it in and out like any file cache).
const READER_MMAP_BYTES: i64 = 256 << 20;

/// Read access to the store. Cheap to clone (clones share a small pool of connections).
///
/// Methods are synchronous and may block on disk; async callers run them in
/// `spawn_blocking`. Each method is one SQL statement or one read transaction, so it sees one
/// consistent snapshot.
#[derive(Debug, Clone)]
pub struct DbReader {
    inner: Arc<ReaderInner>,
}

#[derive(Debug)]
struct ReaderInner {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
}

// Every event with its stream's names, its position and whether it updated its row (both
// stored with the event since schema 4).
const EVENT_COLUMNS: &str = "e.sequence_number, e.stream_sequence, s.channel, s.request_id, \
     e.message_id, e.timestamp_ms, e.data, e.replaced";
const EVENT_JOIN: &str = "JOIN streams s ON s.stream_id = e.stream_id";

impl DbReader {
    /// Opens a reader of the store at `path`, which must exist and be migrated (open the
    /// [`crate::DbWriter`] or run [`crate::migrate`] first).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_busy_timeout(path, DEFAULT_BUSY_TIMEOUT)
    }

    /// Like [`DbReader::open`] with another busy timeout.
    pub fn open_with_busy_timeout(path: &Path, busy_timeout: Duration) -> Result<Self, StoreError> {
        let reader = DbReader {
            inner: Arc::new(ReaderInner {
                path: path.to_owned(),
                busy_timeout,
                idle: Mutex::new(Vec::new()),
            }),
        };
        let conn = reader.connect()?;
        schema::require_current_schema(&conn)?;
        reader.release(conn);
        Ok(reader)
    }

    /// Runs `f` on a pooled connection (opening one when none is idle).
    fn with_connection<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => self.connect()?,
        };
        let result = f(&conn);
        // A connection that hit I/O trouble is not worth keeping; a fresh one is cheap.
        if !matches!(
            result,
            Err(StoreError::Unavailable(_) | StoreError::Corrupt(_))
        ) {
            self.release(conn);
        }
        result
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let conn = schema::open_connection(
            &self.inner.path,
            ConnectionOptions {
                busy_timeout: self.inner.busy_timeout,
                create: false,
                ..ConnectionOptions::default()
            },
        )?;
        // Readers never write; make that a property of the connection, not a convention.
        conn.pragma_update(None, "query_only", true)?;
        // Catch-up walks many pages: read the database file through a memory map rather than a
        // pread and a copy per page (measured +25 % events per CPU-second on a key's pages;
        // docs/benchmarks.md). Only reads go through it (SQLite writes with write(2) unless built
        // with SQLITE_MMAP_READWRITE). The cost SQLite documents: an I/O error while reading
        // the mapped file is a SIGBUS instead of an error code.
        conn.pragma_update_and_check(None, "mmap_size", READER_MMAP_BYTES, |_| Ok(()))?;
        Ok(conn)
    }

    fn release(&self, conn: Connection) {
        let mut idle = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(conn);
        }
    }
}

impl EventReader for DbReader {
    fn head(&self) -> Result<u64, StoreError> {
        self.with_connection(schema::read_head)
    }

    fn epoch(&self) -> Result<String, StoreError> {
        self.with_connection(schema::read_epoch)
    }

    // Walks the log backwards from the head and stops at the first event older than
    // `min_timestamp_ms` (the writer never lets timestamps go backwards along the log, so every
    // older one is older too) or when a budget is spent: it reads at most `limit` rows and about
    // `max_bytes`, however large the log is.
    fn latest_events(
        &self,
        limit: usize,
        min_timestamp_ms: u64,
        max_bytes: usize,
    ) -> Result<Vec<CommittedEvent>, StoreError> {
        let mut budget = ReadBudget::new(limit, max_bytes);
        self.with_connection(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM events e {EVENT_JOIN} \
                 ORDER BY e.sequence_number DESC LIMIT ?1"
            ))?;
            let mut rows = stmt.query(params![sql_limit(limit)])?;
            let mut out = Vec::new();
            while budget.has_room() {
                let Some(row) = rows.next()? else { break };
                let timestamp_ms = stored_u64(row.get(5)?, "timestamp_ms")?;
                if timestamp_ms < min_timestamp_ms {
                    break;
                }
                let ev = event_from_row(row)?;
                budget.take(ev.read_bytes());
                out.push(ev);
            }
            out.reverse();
            Ok(out)
        })
    }

    fn stream_rows(
        &self,
        key: &SubscriptionKey,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<CommittedEvent>, StoreError> {
        let mut budget = ReadBudget::new(limit, max_bytes);
        let after = sql_int(after);
        let limit = sql_limit(limit);
        self.with_connection(|conn| {
            // A row's data and time are its last event's.
            let mut stmt = conn.prepare_cached(
                "SELECT r.last_sequence, r.stream_sequence, r.message_id, e.timestamp_ms, e.data, \
                        r.first_sequence \
                 FROM stream_rows r LEFT JOIN events e ON e.sequence_number = r.last_sequence \
                 WHERE r.stream_id = (SELECT stream_id FROM streams \
                                      WHERE channel = ?1 AND request_id = ?2) \
                   AND r.stream_sequence > ?3 \
                 ORDER BY r.stream_sequence, r.first_sequence LIMIT ?4",
            )?;
            let mut rows = stmt.query(params![
                key.channel().as_str(),
                key.request_id().as_str(),
                after,
                limit
            ])?;
            let mut out = Vec::new();
            while budget.has_room() {
                let Some(row) = rows.next()? else { break };
                let last_sequence: i64 = row.get(0)?;
                let first_sequence: i64 = row.get(5)?;
                let (Some(timestamp_ms), Some(data)) = (
                    row.get::<_, Option<i64>>(3)?,
                    row.get::<_, Option<String>>(4)?,
                ) else {
                    return Err(StoreError::Corrupt(format!(
                        "stream row points at missing event {last_sequence}"
                    )));
                };
                let ev = CommittedEvent {
                    sequence_number: stored_u64(last_sequence, "last_sequence")?,
                    stream_sequence: stored_u64(row.get(1)?, "stream_sequence")?,
                    key: key.clone(),
                    message_id: message_id_at(row, 2)?,
                    timestamp_ms: stored_u64(timestamp_ms, "timestamp_ms")?,
                    data,
                    replaced: first_sequence != last_sequence,
                };
                budget.take(ev.read_bytes());
                out.push(ev);
            }
            Ok(out)
        })
    }

    fn retention_floor(&self) -> Result<u64, StoreError> {
        self.with_connection(schema::read_floor)
    }

    fn page(
        &self,
        filter: &EventFilter,
        after: u64,
        through: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<LogPage, StoreError> {
        self.with_connection(|conn| {
            in_read_transaction(conn, |conn| {
                DbReader::page_in(conn, filter, after, through, limit, max_bytes)
            })
        })
    }

    fn visit_key_page(
        &self,
        key: &SubscriptionKey,
        after: u64,
        through: u64,
        limit: usize,
        max_bytes: usize,
        visit: &mut dyn FnMut(EventRef<'_>),
    ) -> Result<PageBounds, StoreError> {
        self.with_connection(|conn| {
            in_read_transaction(conn, |conn| {
                let bounds = PageRange::of(conn, after, through, limit)?;
                let mut budget = ReadBudget::new(bounds.limit, max_bytes);
                let last = match bounds.sql() {
                    Some((after_i, through_i, limit_i)) => visit_key_events(
                        conn,
                        key,
                        after_i,
                        through_i,
                        limit_i,
                        &mut budget,
                        visit,
                    )?,
                    None => 0,
                };
                Ok(bounds.covered(&budget, last))
            })
        })
    }

    fn visit_keys_page(
        &self,
        keys: &[(SubscriptionKey, u64)],
        through: u64,
        limit: usize,
        max_bytes: usize,
        visit: &mut dyn FnMut(usize, EventRef<'_>),
    ) -> Result<PageBounds, StoreError> {
        let after = keys.iter().map(|&(_, a)| a).min().unwrap_or(through);
        // The keys as one JSON parameter: [[channel, request_id, position], …] (names need no
        // escaping: their grammars hold no character JSON escapes).
        let mut list = String::with_capacity(keys.len() * 48 + 2);
        list.push('[');
        for (i, (key, position)) in keys.iter().enumerate() {
            if i > 0 {
                list.push(',');
            }
            // Writing into a String cannot fail.
            let _ = write!(
                list,
                "[\"{}\",\"{}\",{}]",
                key.channel().as_str(),
                key.request_id().as_str(),
                sql_int(*position)
            );
        }
        list.push(']');
        self.with_connection(|conn| {
            in_read_transaction(conn, |conn| {
                let bounds = PageRange::of(conn, after, through, limit)?;
                let mut budget = ReadBudget::new(bounds.limit, max_bytes);
                let mut last = 0;
                if let Some((from_i, through_i, limit_i)) = bounds.sql() {
                    let mut stmt = conn.prepare_cached(PAGE_OF_STREAMS)?;
                    let mut rows = stmt.query(params![list, from_i, through_i, limit_i])?;
                    while budget.has_room() {
                        let Some(row) = rows.next()? else { break };
                        let index = merged_key_index(row.get(0)?, 0, keys.len())?;
                        let ev = event_ref_at(row, 1)?;
                        let sequence_number = ev.sequence_number;
                        budget.take(ev.read_bytes());
                        visit(index, ev);
                        last = sequence_number;
                    }
                }
                Ok(bounds.covered(&budget, last))
            })
        })
    }

    // Binary search over numbers: `first_from(x)` is one primary-key seek, and its timestamp
    // never decreases as `x` grows, so ~log2(head) seeks find the answer.
    fn first_at_or_after(&self, min_timestamp_ms: u64) -> Result<Option<u64>, StoreError> {
        self.with_connection(|conn| {
            in_read_transaction(conn, |conn| {
                let floor = schema::read_floor(conn)?;
                let Some((first, first_ts)) = first_from(conn, floor)? else {
                    return Ok(None);
                };
                if first_ts >= min_timestamp_ms {
                    return Ok(Some(first));
                }
                let head = schema::read_head(conn)?;
                let Some((_, head_ts)) = first_from(conn, head)? else {
                    return Ok(None);
                };
                if head_ts < min_timestamp_ms {
                    return Ok(None);
                }
                // first_from(lo) is too old, first_from(hi) is new enough.
                let (mut lo, mut hi) = (first, head);
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    match first_from(conn, mid)? {
                        Some((_, ts)) if ts >= min_timestamp_ms => hi = mid,
                        Some(_) => lo = mid,
                        None => hi = mid,
                    }
                }
                Ok(first_from(conn, hi)?.map(|(seq, _)| seq))
            })
        })
    }

    fn count_key(
        &self,
        key: &SubscriptionKey,
        after: u64,
        through: u64,
    ) -> Result<u64, StoreError> {
        self.with_connection(|conn| {
            in_read_transaction(conn, |conn| {
                let Some(stream_id) = key_stream_id(conn, key)? else {
                    return Ok(0);
                };
                let from = after.max(schema::read_floor(conn)?.saturating_sub(1));
                if through <= from {
                    return Ok(0);
                }
                let count: i64 = conn
                    .prepare_cached(
                        "SELECT COUNT(*) FROM events INDEXED BY events_by_stream \
                         WHERE stream_id = ?1 AND sequence_number > ?2 AND sequence_number <= ?3",
                    )?
                    .query_row(params![stream_id, sql_int(from), sql_int(through)], |row| {
                        row.get(0)
                    })?;
                stored_u64(count, "count")
            })
        })
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
        self.with_connection(|conn| {
            in_read_transaction(conn, |conn| {
                use rusqlite::OptionalExtension;
                let Some(stream_id) = key_stream_id(conn, key)? else {
                    return Ok(None);
                };
                let floor = schema::read_floor(conn)?;
                let found: Option<i64> = conn
                    .prepare_cached(
                        "SELECT sequence_number FROM events INDEXED BY events_by_stream \
                         WHERE stream_id = ?1 AND sequence_number <= ?2 \
                         ORDER BY sequence_number DESC LIMIT 1 OFFSET ?3",
                    )?
                    .query_row(
                        params![stream_id, sql_int(through), sql_limit(n - 1)],
                        |row| row.get(0),
                    )
                    .optional()?;
                match found {
                    Some(seq) => {
                        let seq = stored_u64(seq, "sequence_number")?;
                        Ok((seq >= floor).then_some(seq))
                    }
                    None => Ok(None),
                }
            })
        })
    }
}

// One key's events in a range, through `events_by_stream` (?1 after, ?2 through, ?3 limit).
// One key's page: the stream is resolved once, so no row joins `streams` or parses names.
const PAGE_OF_STREAM: &str = "SELECT e.sequence_number, e.stream_sequence, e.message_id, \
            e.timestamp_ms, e.data, e.replaced \
     FROM events e INDEXED BY events_by_stream \
     WHERE e.stream_id = ?1 AND e.sequence_number > ?2 AND e.sequence_number <= ?3 \
     ORDER BY e.sequence_number LIMIT ?4";
/// One page of several streams, each above its own position (`?1`: a JSON array of
/// `[channel, request_id, position]`), merged in global order, in one statement: each key's
/// stream is found by its unique (channel, request_id) index, its numbers in `(position, ?3]`
/// by the per-stream index (index only: no row data is read to order them), the first `?4` of
/// all of them are picked in order, and only those rows are read, by primary key, as the
/// caller steps.
pub(crate) const PAGE_OF_STREAMS: &str = "WITH k(stream_id, after, idx) AS ( \
         SELECT s.stream_id, max(j.value ->> 2, ?2), j.key \
         FROM json_each(?1) j JOIN streams s \
           ON s.channel = j.value ->> 0 AND s.request_id = j.value ->> 1), \
     picked(seq, idx) AS ( \
         SELECT p.sequence_number, k.idx FROM k CROSS JOIN events p INDEXED BY events_by_stream \
         WHERE p.stream_id = k.stream_id AND p.sequence_number > k.after \
           AND p.sequence_number <= ?3 \
         ORDER BY p.sequence_number LIMIT ?4) \
     SELECT picked.idx, e.sequence_number, e.stream_sequence, e.message_id, e.timestamp_ms, \
            e.data, e.replaced \
     FROM picked CROSS JOIN events e ON e.sequence_number = picked.seq \
     ORDER BY picked.seq";
const PAGE_CHANNEL: &str = "WHERE s.channel = ?4 \
       AND e.sequence_number > ?1 AND e.sequence_number <= ?2 \
     ORDER BY e.sequence_number LIMIT ?3";
const PAGE_ALL: &str = "WHERE e.sequence_number > ?1 AND e.sequence_number <= ?2 \
     ORDER BY e.sequence_number LIMIT ?3";
// The stream's id, for the key methods; no row = the key never had an event.
const KEY_STREAM: &str = "SELECT stream_id FROM streams WHERE channel = ?1 AND request_id = ?2";
// The first event at or after a number: one primary-key seek.
const FIRST_FROM: &str = "SELECT sequence_number, timestamp_ms FROM events \
     WHERE sequence_number >= ?1 ORDER BY sequence_number LIMIT 1";

/// Runs `f` inside one read transaction (`BEGIN DEFERRED ... COMMIT`): in WAL mode every
/// statement in it reads the same snapshot. Rolled back on error.
fn in_read_transaction<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    // Cached statements rather than `Transaction` (which parses BEGIN and COMMIT every time):
    // a catch-up runs one read transaction per page.
    conn.prepare_cached("BEGIN DEFERRED")?.execute([])?;
    match f(conn) {
        Ok(out) => {
            conn.prepare_cached("COMMIT")?.execute([])?;
            Ok(out)
        }
        Err(e) => {
            if let Err(rollback) = conn
                .prepare_cached("ROLLBACK")
                .and_then(|mut s| s.execute([]))
            {
                tracing::debug!(error = %rollback, "read transaction rollback failed");
            }
            Err(e)
        }
    }
}

fn key_stream_id(conn: &Connection, key: &SubscriptionKey) -> Result<Option<i64>, StoreError> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .prepare_cached(KEY_STREAM)?
        .query_row(
            params![key.channel().as_str(), key.request_id().as_str()],
            |row| row.get(0),
        )
        .optional()?)
}

/// The first event numbered `>= from`: (sequence_number, timestamp_ms).
fn first_from(conn: &Connection, from: u64) -> Result<Option<(u64, u64)>, StoreError> {
    use rusqlite::OptionalExtension;
    let found: Option<(i64, i64)> = conn
        .prepare_cached(FIRST_FROM)?
        .query_row(params![sql_int(from)], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    found
        .map(|(seq, ts)| {
            Ok((
                stored_u64(seq, "sequence_number")?,
                stored_u64(ts, "timestamp_ms")?,
            ))
        })
        .transpose()
}

impl DbReader {
    /// [`EventReader::page`] on one connection, inside the caller's read transaction.
    fn page_in(
        conn: &Connection,
        filter: &EventFilter,
        after: u64,
        through: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<LogPage, StoreError> {
        let bounds = PageRange::of(conn, after, through, limit)?;
        let mut budget = ReadBudget::new(bounds.limit, max_bytes);
        let events = match bounds.sql() {
            None => Vec::new(),
            Some((after_i, through_i, limit_i)) => match filter {
                EventFilter::Key(key) => {
                    let mut out = Vec::new();
                    visit_key_events(
                        conn,
                        key,
                        after_i,
                        through_i,
                        limit_i,
                        &mut budget,
                        &mut |ev| out.push(ev.to_committed(key)),
                    )?;
                    out
                }
                // Walks the log from `after` (the usual recovery case is near the head) and
                // keeps the channel's events, stopping at `limit`, rather than merging and
                // sorting every stream of the channel. CROSS JOIN fixes that loop order.
                EventFilter::Channel(channel) => collect_events(
                    conn,
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM events e CROSS {EVENT_JOIN} {PAGE_CHANNEL}"
                    ),
                    params![after_i, through_i, limit_i, channel.as_str()],
                    &mut budget,
                )?,
                EventFilter::All => collect_events(
                    conn,
                    &format!("SELECT {EVENT_COLUMNS} FROM events e {EVENT_JOIN} {PAGE_ALL}"),
                    params![after_i, through_i, limit_i],
                    &mut budget,
                )?,
            },
        };
        let last = events.last().map_or(0, |ev| ev.sequence_number);
        let PageBounds {
            covered_through,
            floor,
        } = bounds.covered(&budget, last);
        Ok(LogPage {
            events,
            covered_through,
            floor,
        })
    }
}

/// The range a page reads, settled in its read transaction: events below the retention floor
/// are pruned (a prune in steps may not have deleted them all), so the page starts at the floor.
struct PageRange {
    from: u64,
    through: u64,
    limit: usize,
    floor: u64,
}

impl PageRange {
    fn of(conn: &Connection, after: u64, through: u64, limit: usize) -> Result<Self, StoreError> {
        let floor = schema::read_floor(conn)?;
        Ok(PageRange {
            from: after.max(floor.saturating_sub(1)),
            through,
            limit: limit.max(1),
            floor,
        })
    }

    /// (after, through, limit) as SQL integers, or None when the range is empty.
    fn sql(&self) -> Option<(i64, i64, i64)> {
        (self.through > self.from).then(|| {
            (
                sql_int(self.from),
                sql_int(self.through),
                sql_limit(self.limit),
            )
        })
    }

    /// What a page read with `budget`, its last event numbered `last`, accounts for: up to its
    /// last event when a budget cut it, else the whole range.
    fn covered(&self, budget: &ReadBudget, last: u64) -> PageBounds {
        PageBounds {
            covered_through: budget.covered_through(last, self.through),
            floor: self.floor,
        }
    }
}

/// `key`'s events in `(after, through]`, at most `limit`, through the per-stream index, each
/// handed to `visit` borrowed from its row, until `budget` is spent (the cursor is not stepped
/// further). Returns the last event's number (0 when none).
fn visit_key_events(
    conn: &Connection,
    key: &SubscriptionKey,
    after: i64,
    through: i64,
    limit: i64,
    budget: &mut ReadBudget,
    visit: &mut dyn FnMut(EventRef<'_>),
) -> Result<u64, StoreError> {
    let Some(stream_id) = key_stream_id(conn, key)? else {
        return Ok(0);
    };
    let mut stmt = conn.prepare_cached(PAGE_OF_STREAM)?;
    let mut rows = stmt.query(params![stream_id, after, through, limit])?;
    let mut last = 0;
    while budget.has_room() {
        let Some(row) = rows.next()? else { break };
        let ev = event_ref_at(row, 0)?;
        let sequence_number = ev.sequence_number;
        budget.take(ev.read_bytes());
        visit(ev);
        last = sequence_number;
    }
    Ok(last)
}

/// Decodes, borrowed from `row`, an event whose columns start at `at`: sequence_number,
/// stream_sequence, message_id, timestamp_ms, data, replaced (`PAGE_OF_STREAM`'s, and
/// `PAGE_OF_STREAMS`'s after the key's index).
fn event_ref_at<'r>(row: &'r Row<'_>, at: usize) -> Result<EventRef<'r>, StoreError> {
    Ok(EventRef {
        sequence_number: stored_u64(row.get(at)?, "sequence_number")?,
        stream_sequence: stored_u64(row.get(at + 1)?, "stream_sequence")?,
        message_id: MessageIdRef::parse(str_at(row, at + 2)?)
            .map_err(|e| StoreError::Corrupt(format!("stored message_id: {e}")))?,
        timestamp_ms: stored_u64(row.get(at + 3)?, "timestamp_ms")?,
        data: str_at(row, at + 4)?,
        replaced: row.get(at + 5)?,
    })
}

/// The rows of `sql` as events, until `budget` is spent (the cursor is not stepped further).
fn collect_events(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    budget: &mut ReadBudget,
) -> Result<Vec<CommittedEvent>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while budget.has_room() {
        let Some(row) = rows.next()? else { break };
        let ev = event_from_row(row)?;
        budget.take(ev.read_bytes());
        out.push(ev);
    }
    Ok(out)
}

/// Decodes a row of `EVENT_COLUMNS`.
fn event_from_row(row: &Row<'_>) -> Result<CommittedEvent, StoreError> {
    let sequence_number: i64 = row.get(0)?;
    let stream_sequence: i64 = row.get(1)?;
    let channel = Channel::parse(str_at(row, 2)?)
        .map_err(|e| StoreError::Corrupt(format!("event {sequence_number}: {e}")))?;
    let request_id = RequestId::parse(str_at(row, 3)?)
        .map_err(|e| StoreError::Corrupt(format!("event {sequence_number}: {e}")))?;
    Ok(CommittedEvent {
        sequence_number: stored_u64(sequence_number, "sequence_number")?,
        stream_sequence: stored_u64(stream_sequence, "stream_sequence")?,
        key: SubscriptionKey::new(channel, request_id),
        message_id: message_id_at(row, 4)?,
        timestamp_ms: stored_u64(row.get(5)?, "timestamp_ms")?,
        data: row.get(6)?,
        replaced: row.get(7)?,
    })
}

fn str_at<'r>(row: &'r Row<'_>, index: usize) -> Result<&'r str, StoreError> {
    row.get_ref(index)?
        .as_str()
        .map_err(|e| StoreError::Corrupt(format!("column {index}: {e}")))
}

fn message_id_at(row: &Row<'_>, index: usize) -> Result<MessageId, StoreError> {
    MessageId::parse(str_at(row, index)?)
        .map_err(|e| StoreError::Corrupt(format!("stored message_id: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// SQLite's plan for `sql`, one line per step.
    pub(crate) fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        // raw_query: the statement's parameters stay unbound, as when SQLite plans it.
        let mut rows = stmt.raw_query();
        let mut steps = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            steps.push(row.get::<_, String>(3).unwrap());
        }
        steps.join("\n")
    }

    /// A key's reads go through `events_by_stream`, never a walk of the log.
    #[test]
    fn key_reads_use_the_stream_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.db");
        crate::migrate(&path).unwrap();
        let conn = Connection::open(&path).unwrap();
        let page = plan(&conn, PAGE_OF_STREAM);
        assert!(page.contains("INDEX events_by_stream"), "{page}");
        assert!(!page.contains("SCAN e"), "{page}");
        let count = plan(
            &conn,
            "SELECT COUNT(*) FROM events INDEXED BY events_by_stream \
             WHERE stream_id = ?1 AND sequence_number > ?2 AND sequence_number <= ?3",
        );
        assert!(count.contains("COVERING INDEX events_by_stream"), "{count}");
    }

    /// A merged read of many keys is one statement: each key found by the streams' unique
    /// index, its numbers by the per-stream index (index only, to order them), and only the
    /// picked rows read by primary key — never a walk of the log, never a sort of row data.
    #[test]
    fn a_merged_read_uses_the_indexes_in_one_statement() {
        use crate::{DbWriter, EventWriter, NewEvent, StoreConfig};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("merged.db");
        let (writer, _) = DbWriter::open(StoreConfig::new(&path), Box::new(|_| Ok(()))).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let events: Vec<NewEvent> = (0..2_000)
            .map(|i| NewEvent {
                key: SubscriptionKey::parse(&format!("c:k{}", i % 400)).unwrap(),
                message_id: seqcast_protocol::MessageId::new(format!("m{i}")).unwrap(),
                data: format!("{i}"),
            })
            .collect();
        rt.block_on(writer.append(events)).unwrap();
        rt.block_on(writer.close());
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("ANALYZE").unwrap();
        let steps = plan(&conn, PAGE_OF_STREAMS);
        assert!(
            steps.contains("INDEX sqlite_autoindex_streams_1"),
            "{steps}"
        );
        assert!(steps.contains("COVERING INDEX events_by_stream"), "{steps}");
        assert!(
            steps.contains("SEARCH e USING INTEGER PRIMARY KEY"),
            "{steps}"
        );
        let lines: Vec<&str> = steps.lines().collect();
        assert!(
            !lines.iter().any(|l| *l == "SCAN p" || *l == "SCAN e"),
            "{steps}"
        );
        // The one sort orders (number, key) pairs inside `picked`, before any row data is read.
        let sort = lines.iter().position(|l| l.contains("TEMP B-TREE"));
        let outer = lines.iter().position(|l| *l == "SCAN picked");
        assert!(
            sort < outer && lines.iter().filter(|l| l.contains("TEMP B-TREE")).count() == 1,
            "{steps}"
        );
        // 300 keys, one statement: every key's events after its own position, in order.
        let reader = DbReader::open(&path).unwrap();
        let keys: Vec<_> = (0..300)
            .map(|i| (SubscriptionKey::parse(&format!("c:k{i}")).unwrap(), i))
            .collect();
        let mut seen = Vec::new();
        let bounds = reader
            .visit_keys_page(&keys, 2_000, 5_000, usize::MAX, &mut |i, ev| {
                assert!(ev.sequence_number > keys[i].1);
                seen.push(ev.sequence_number);
            })
            .unwrap();
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
        // Key k{i} has events i+1, i+401, …: 5 each, minus those at or below its position i.
        assert_eq!(seen.len(), 300 * 5);
        assert_eq!(bounds.covered_through, 2_000);
    }
    /// The byte budget stops the SQL cursor; it does not read on and drop: a row past the budget
    /// that cannot be decoded (a negative timestamp written behind the store's back) is never
    /// stepped onto by a budgeted read, while a read without a budget fails on it.
    #[test]
    fn a_budgeted_read_never_steps_past_its_budget() {
        use crate::{DbWriter, EventWriter, NewEvent, StoreConfig};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("budget.db");
        let (writer, _) = DbWriter::open(StoreConfig::new(&path), Box::new(|_| Ok(()))).unwrap();
        let key = SubscriptionKey::parse("c:a").unwrap();
        let data = format!("\"{}\"", "x".repeat(998)); // 1,002 bytes with its id
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            for i in 0..10 {
                let ev = NewEvent {
                    key: key.clone(),
                    message_id: MessageId::new(format!("m{i}")).unwrap(),
                    data: data.clone(),
                };
                writer.append(vec![ev]).await.unwrap();
            }
            writer.close().await;
        });
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE events SET timestamp_ms = -1 WHERE sequence_number IN (1, 5)",
            [],
        )
        .unwrap();
        drop(conn);
        let reader = DbReader::open(&path).unwrap();
        let corrupt =
            |r: Result<Vec<CommittedEvent>, StoreError>| matches!(r, Err(StoreError::Corrupt(_)));
        let corrupt_bounds =
            |r: Result<PageBounds, StoreError>| matches!(r, Err(StoreError::Corrupt(_)));
        // Events 2..=4 are 3,006 bytes: a budget they reach stops before event 5.
        let page = reader.page(&EventFilter::All, 1, 10, 100, 3_000).unwrap();
        assert_eq!(page.events.len(), 3);
        assert_eq!(page.covered_through, 4);
        let mut seen = 0;
        reader
            .visit_key_page(&key, 1, 10, 100, 3_000, &mut |_| seen += 1)
            .unwrap();
        assert_eq!(seen, 3);
        // The merged read of several keys stops its one statement's cursor the same way.
        let keys = [
            (key.clone(), 1),
            (SubscriptionKey::parse("c:b").unwrap(), 0),
        ];
        let mut seen = 0;
        let bounds = reader
            .visit_keys_page(&keys, 10, 100, 3_000, &mut |_, _| seen += 1)
            .unwrap();
        assert_eq!((seen, bounds.covered_through), (3, 4));
        assert!(corrupt_bounds(reader.visit_keys_page(
            &keys,
            10,
            100,
            usize::MAX,
            &mut |_, _| ()
        )));
        assert!(
            reader
                .page(&EventFilter::All, 1, 10, 100, usize::MAX)
                .is_err()
        );
        // Newest first: 10..=6 fit in 5,010 bytes, event 5 is never read.
        assert_eq!(reader.latest_events(100, 0, 5_010).unwrap().len(), 5);
        assert!(corrupt(reader.latest_events(100, 0, usize::MAX)));
        assert_eq!(reader.stream_rows(&key, 1, 100, 3_000).unwrap().len(), 3);
        assert!(corrupt(reader.stream_rows(&key, 1, 100, usize::MAX)));
    }
}
