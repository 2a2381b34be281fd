//! Readers: a pool of connections (deadpool-postgres). Each method is one SQL statement, so it
//! reads one snapshot; `page`, `count_key` and `nth_newest_of_key` read the retention floor in
//! the same statement. Reads of events stop at their byte budget twice over: in the statement, a
//! running sum of each row's stored size (`pg_column_size`, which reads no TOAST data) drops the
//! rows past the budget before they are fetched or sent — a lower bound of the bytes, so it never
//! drops a row the budget admits (compressed data may let a few more through) —, and the reader
//! takes rows as they stream in and stops at the exact budget ([`crate::read_bytes`]).

use std::future::Future;
use std::sync::Arc;

use seqcast_protocol::{Channel, MessageId, RequestId, SubscriptionKey};
use tokio_postgres::Row;

use super::{PgConfig, PgRuntime, pg_error, pg_int, pg_u64, schema};
use crate::error::StoreError;
use crate::event::{
    CommittedEvent, EventFilter, LogPage, ReadBudget, merged_key_index, read_bytes,
};
use crate::store::EventReader;

/// Every event with its stream's names and its row's current position.
pub(crate) const EVENT_COLUMNS: &str = "e.sequence_number, r.stream_sequence, s.channel, \
     s.request_id, e.message_id, e.timestamp_ms, e.data::text, r.first_sequence";
pub(crate) const EVENT_JOIN: &str = "JOIN seqcast.streams s ON s.stream_id = e.stream_id \
     LEFT JOIN seqcast.stream_rows r ON r.stream_id = e.stream_id AND r.message_id = e.message_id";
const KEY_STREAM: &str =
    "(SELECT stream_id FROM seqcast.streams WHERE channel = $4 AND request_id = $5)";

/// Read access to the PostgreSQL store. Cheap to clone (clones share the pool).
///
/// Methods block the calling thread until the database answers (they run on the backend's own
/// runtime); async callers run them in `spawn_blocking`, as for SQLite.
#[derive(Clone)]
pub struct PgReader {
    pool: deadpool_postgres::Pool,
    runtime: Arc<PgRuntime>,
}

impl std::fmt::Debug for PgReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgReader")
            .field("pool", &self.pool.status())
            .finish_non_exhaustive()
    }
}

impl PgReader {
    pub(crate) fn new(config: &PgConfig, runtime: Arc<PgRuntime>) -> Result<Self, StoreError> {
        let pg = config.connection("seqcast-reader")?;
        let manager = deadpool_postgres::Manager::from_config(
            pg,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let timeout = Some(config.statement_timeout);
        let _guard = runtime.handle().enter();
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot build the read pool: {e}")))?;
        Ok(PgReader { pool, runtime })
    }

    /// Runs `f` with a pooled connection on the backend's runtime and waits for it.
    fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send,
    {
        let pool = self.pool.clone();
        self.runtime.block(async move {
            let client = pool.get().await.map_err(pool_error)?;
            f(client).await
        })
    }

    fn events(
        &self,
        sql: String,
        params: Params,
        offset: usize,
        budget: ReadBudget,
        min_timestamp_ms: Option<i64>,
    ) -> Result<Vec<CommittedEvent>, StoreError> {
        let rows = self.rows_within(sql, params, budget, move |row| {
            if min_timestamp_ms.is_some_and(|min| row.get::<_, i64>(offset + 5) < min) {
                return Take::Stop;
            }
            Take::Event(read_bytes(row.get(offset + 6), row.get(offset + 4)))
        })?;
        rows.iter().map(|r| event_from_row(r, offset)).collect()
    }

    /// The rows of `sql`, taken as they stream in until `budget` is spent or `weigh` says stop;
    /// `weigh` gives a row's [`read_bytes`].
    fn rows_within(
        &self,
        sql: String,
        params: Params,
        mut budget: ReadBudget,
        weigh: impl Fn(&Row) -> Take + Send + 'static,
    ) -> Result<Vec<Row>, StoreError> {
        use futures_util::TryStreamExt as _;
        self.run(move |client| async move {
            let stmt = client.prepare_cached(&sql).await.map_err(pg_error)?;
            let stream = client
                .query_raw(&stmt, params.refs())
                .await
                .map_err(pg_error)?;
            let mut stream = std::pin::pin!(stream);
            let mut rows = Vec::new();
            while budget.has_room() {
                let Some(row) = stream.try_next().await.map_err(pg_error)? else {
                    break;
                };
                match weigh(&row) {
                    Take::Event(bytes) => budget.take(bytes),
                    Take::NotEvent => {}
                    Take::Stop => break,
                }
                rows.push(row);
            }
            Ok(rows)
        })
    }

    /// `inner` (a read whose event columns start at column `offset`, its rows cut at `max`
    /// bytes by [`within_budget`]) with the retention floor from the same snapshot, taken as
    /// [`Self::rows_within`] takes rows: the floor, and the rows. Column 1 is null in a row
    /// that carries only the floor (the read found nothing).
    fn rows_with_floor(
        &self,
        inner: &str,
        max: &str,
        params: Params,
        budget: ReadBudget,
        offset: usize,
    ) -> Result<(u64, Vec<Row>), StoreError> {
        let sql = format!(
            "SELECT f.floor, x.* FROM seqcast.retention f LEFT JOIN LATERAL ( \
                 {}) x ON true \
             WHERE f.id = 1",
            within_budget(inner, "sequence_number", max)
        );
        let rows = self.rows_within(sql, params, budget, move |row| {
            match row.get::<_, Option<i64>>(1) {
                Some(_) => Take::Event(read_bytes(row.get(offset + 6), row.get(offset + 4))),
                None => Take::NotEvent,
            }
        })?;
        let Some(first) = rows.first() else {
            return Err(StoreError::Corrupt(
                "seqcast.retention has no row".to_owned(),
            ));
        };
        let floor = pg_u64(first.get(0), "retention floor")?;
        Ok((floor, rows))
    }
}

/// A lower bound of a row's [`read_bytes`] that PostgreSQL knows without reading TOAST data: the
/// stored size of `data` (its raw size, or less when compressed, plus a header of up to 4 bytes)
/// and the message id's length.
fn read_estimate(message_id: &str) -> String {
    format!("GREATEST(pg_column_size(e.data) - 4, 0) + octet_length({message_id}) AS read_estimate")
}

/// `inner` (whose rows carry `read_estimate`, see [`read_estimate`]) without the rows whose
/// predecessors (in `order`: a column of `inner`, maybe with `DESC`) already reach the byte
/// budget `budget` (a parameter): the rows a budgeted read may take, and no more than one
/// past what it takes (the first row always passes: the budget given is at least 1). `inner`
/// keeps its own `LIMIT`, so the sum runs over at most that many rows.
fn within_budget(inner: &str, order: &str, budget: &str) -> String {
    format!(
        "SELECT w.* FROM (SELECT l.*, sum(l.read_estimate) OVER \
             (ORDER BY l.{order} ROWS UNBOUNDED PRECEDING) AS read_upto FROM ({inner}) l) w \
         WHERE w.read_upto - w.read_estimate < {budget} ORDER BY w.{order}"
    )
}

/// What [`PgReader::rows_within`] does with a row.
enum Take {
    /// Keep it: an event that weighs this much ([`read_bytes`]).
    Event(usize),
    /// Keep it: not an event (costs nothing).
    NotEvent,
    /// Stop before it.
    Stop,
}

/// Owned statement parameters (moved to the backend's runtime).
struct Params(Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>);

impl Params {
    /// With one more parameter; returns its placeholder (`$n`).
    fn push(&mut self, p: impl tokio_postgres::types::ToSql + Sync + Send + 'static) -> String {
        self.0.push(Box::new(p));
        format!("${}", self.0.len())
    }

    fn refs(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        self.0
            .iter()
            .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect()
    }
}

macro_rules! params {
    ($($p:expr),* $(,)?) => {
        Params(vec![$(Box::new($p) as Box<dyn tokio_postgres::types::ToSql + Sync + Send>),*])
    };
}

fn pool_error(err: deadpool_postgres::PoolError) -> StoreError {
    match err {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => StoreError::Unavailable(format!("no database connection: {other}")),
    }
}

fn limit_of(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl EventReader for PgReader {
    fn head(&self) -> Result<u64, StoreError> {
        self.run(|client| async move {
            let row = client
                .query_one("SELECT head FROM seqcast.counter WHERE id = 1", &[])
                .await
                .map_err(pg_error)?;
            pg_u64(row.get(0), "head")
        })
    }

    fn epoch(&self) -> Result<String, StoreError> {
        self.run(|client| async move { schema::read_epoch(&client).await })
    }

    // Newest first, stopping at the first event older than `min_timestamp_ms` (timestamps never
    // decrease along the log) or when a budget is spent.
    fn latest_events(
        &self,
        limit: usize,
        min_timestamp_ms: u64,
        max_bytes: usize,
    ) -> Result<Vec<CommittedEvent>, StoreError> {
        let inner = format!(
            "SELECT {EVENT_COLUMNS}, {} FROM seqcast.events e {EVENT_JOIN} \
             ORDER BY e.sequence_number DESC LIMIT $1",
            read_estimate("e.message_id")
        );
        let mut events = self.events(
            within_budget(&inner, "sequence_number DESC", "$2"),
            params![limit_of(limit), limit_of(max_bytes.max(1))],
            0,
            ReadBudget::new(limit, max_bytes),
            Some(pg_int(min_timestamp_ms)),
        )?;
        events.reverse();
        Ok(events)
    }

    fn stream_rows(
        &self,
        key: &SubscriptionKey,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<CommittedEvent>, StoreError> {
        let budget = ReadBudget::new(limit, max_bytes);
        let inner = format!(
            "SELECT r.last_sequence, r.stream_sequence, r.message_id, e.timestamp_ms, \
                    e.data::text, r.first_sequence, {} \
             FROM seqcast.stream_rows r \
             LEFT JOIN seqcast.events e ON e.sequence_number = r.last_sequence \
             WHERE r.stream_id = (SELECT stream_id FROM seqcast.streams \
                                  WHERE channel = $1 AND request_id = $2) \
               AND r.stream_sequence > $3 \
             ORDER BY r.stream_sequence LIMIT $4",
            read_estimate("r.message_id")
        );
        let rows = self.rows_within(
            within_budget(&inner, "stream_sequence", "$5"),
            params![
                key.channel().as_str().to_owned(),
                key.request_id().as_str().to_owned(),
                pg_int(after),
                limit_of(limit),
                limit_of(max_bytes.max(1))
            ],
            budget,
            |row| {
                let data: Option<&str> = row.get(4);
                Take::Event(read_bytes(data.unwrap_or(""), row.get(2)))
            },
        )?;
        {
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let last: i64 = row.get(0);
                let first: i64 = row.get(5);
                let (Some(ts), Some(data)) = (
                    row.get::<_, Option<i64>>(3),
                    row.get::<_, Option<String>>(4),
                ) else {
                    return Err(StoreError::Corrupt(format!(
                        "stream row points at missing event {last}"
                    )));
                };
                out.push(CommittedEvent {
                    sequence_number: pg_u64(last, "last_sequence")?,
                    stream_sequence: pg_u64(row.get(1), "stream_sequence")?,
                    key: key.clone(),
                    message_id: message_id(row.get(2))?,
                    timestamp_ms: pg_u64(ts, "timestamp_ms")?,
                    data,
                    replaced: first != last,
                });
            }
            Ok(out)
        }
    }

    fn retention_floor(&self) -> Result<u64, StoreError> {
        self.run(|client| async move {
            let row = client
                .query_one("SELECT floor FROM seqcast.retention WHERE id = 1", &[])
                .await
                .map_err(pg_error)?;
            pg_u64(row.get(0), "retention floor")
        })
    }

    fn page(
        &self,
        filter: &EventFilter,
        after: u64,
        through: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<LogPage, StoreError> {
        let limit = limit.max(1);
        let budget = ReadBudget::new(limit, max_bytes);
        let (filter_sql, mut params) = match filter {
            EventFilter::All => (
                "$4::text IS NULL AND $5::text IS NULL".to_owned(),
                params![
                    pg_int(after),
                    pg_int(through),
                    limit_of(limit),
                    None::<String>,
                    None::<String>
                ],
            ),
            EventFilter::Key(key) => (
                format!("e.stream_id = {KEY_STREAM}"),
                params![
                    pg_int(after),
                    pg_int(through),
                    limit_of(limit),
                    key.channel().as_str().to_owned(),
                    key.request_id().as_str().to_owned()
                ],
            ),
            EventFilter::Channel(channel) => (
                "s.channel = $4 AND $5::text IS NULL".to_owned(),
                params![
                    pg_int(after),
                    pg_int(through),
                    limit_of(limit),
                    channel.as_str().to_owned(),
                    None::<String>
                ],
            ),
        };
        // One statement: the floor and the events come from one snapshot.
        let max = params.push(limit_of(max_bytes.max(1)));
        let inner = format!(
            "SELECT {EVENT_COLUMNS}, {} FROM seqcast.events e {EVENT_JOIN} \
             WHERE e.sequence_number > GREATEST($1, f.floor - 1) \
               AND e.sequence_number <= $2 AND {filter_sql} \
             ORDER BY e.sequence_number LIMIT $3",
            read_estimate("e.message_id")
        );
        let (floor, rows) = self.rows_with_floor(&inner, &max, params, budget, 1)?;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.get::<_, Option<i64>>(1).is_some() {
                events.push(event_from_row(row, 1)?);
            }
        }
        // Cut by the count or the bytes (the bytes are counted as in `rows_within`).
        let mut cut = ReadBudget::new(limit, max_bytes);
        events.iter().for_each(|ev| cut.take(ev.read_bytes()));
        let last = events.last().map_or(0, |ev| ev.sequence_number);
        let covered_through = cut.covered_through(last, through);
        Ok(LogPage {
            events,
            covered_through,
            floor,
        })
    }

    /// One statement: the keys as arrays (`unnest … WITH ORDINALITY` gives each its index),
    /// each stream's events above its own position through the per-stream index, the first
    /// `limit` of all of them in order, cut at the byte budget as `page` is, with the floor.
    fn visit_keys_page(
        &self,
        keys: &[(SubscriptionKey, u64)],
        through: u64,
        limit: usize,
        max_bytes: usize,
        visit: &mut dyn FnMut(usize, crate::EventRef<'_>),
    ) -> Result<crate::PageBounds, StoreError> {
        let limit = limit.max(1);
        let budget = ReadBudget::new(limit, max_bytes);
        let mut params = Params(Vec::new());
        let channels: Vec<String> = keys
            .iter()
            .map(|(k, _)| k.channel().as_str().to_owned())
            .collect();
        let request_ids: Vec<String> = keys
            .iter()
            .map(|(k, _)| k.request_id().as_str().to_owned())
            .collect();
        let positions: Vec<i64> = keys.iter().map(|&(_, a)| pg_int(a)).collect();
        let (c, r, p) = (
            params.push(channels),
            params.push(request_ids),
            params.push(positions),
        );
        let (t, l) = (params.push(pg_int(through)), params.push(limit_of(limit)));
        let max = params.push(limit_of(max_bytes.max(1)));
        let inner = format!(
            "SELECT k.idx, {EVENT_COLUMNS}, {} \
             FROM unnest({c}::text[], {r}::text[], {p}::bigint[]) WITH ORDINALITY \
                  AS k(channel, request_id, after, idx) \
             JOIN seqcast.streams ks ON ks.channel = k.channel AND ks.request_id = k.request_id \
             JOIN seqcast.events e ON e.stream_id = ks.stream_id \
              AND e.sequence_number > GREATEST(k.after, f.floor - 1) \
              AND e.sequence_number <= {t} \
             {EVENT_JOIN} \
             ORDER BY e.sequence_number LIMIT {l}",
            read_estimate("e.message_id")
        );
        let (floor, rows) = self.rows_with_floor(&inner, &max, params, budget, 2)?;
        let (mut cut, mut last) = (ReadBudget::new(limit, max_bytes), 0u64);
        for row in &rows {
            let Some(idx) = row.get::<_, Option<i64>>(1) else {
                continue;
            };
            let index = merged_key_index(idx, 1, keys.len())?;
            let ev = event_from_row(row, 2)?;
            cut.take(ev.read_bytes());
            last = ev.sequence_number;
            visit(index, (&ev).into());
        }
        // Cut by the count or the bytes (the bytes are counted as in `rows_within`).
        Ok(crate::PageBounds {
            covered_through: cut.covered_through(last, through),
            floor,
        })
    }

    fn first_at_or_after(&self, min_timestamp_ms: u64) -> Result<Option<u64>, StoreError> {
        let min = pg_int(min_timestamp_ms);
        self.run(move |client| async move {
            let row = client
                .query_one("SELECT seqcast.first_at_or_after($1)", &[&min])
                .await
                .map_err(pg_error)?;
            row.get::<_, Option<i64>>(0)
                .map(|s| pg_u64(s, "sequence_number"))
                .transpose()
        })
    }

    fn count_key(
        &self,
        key: &SubscriptionKey,
        after: u64,
        through: u64,
    ) -> Result<u64, StoreError> {
        let key = key.clone();
        let (after, through) = (pg_int(after), pg_int(through));
        self.run(move |client| async move {
            let row = client
                .query_one(
                    "SELECT count(e.sequence_number) FROM seqcast.retention f \
                     JOIN seqcast.events e ON e.sequence_number > GREATEST($1, f.floor - 1) \
                      AND e.sequence_number <= $2 \
                      AND e.stream_id = (SELECT stream_id FROM seqcast.streams \
                                         WHERE channel = $3 AND request_id = $4) \
                     WHERE f.id = 1",
                    &[
                        &after,
                        &through,
                        &key.channel().as_str(),
                        &key.request_id().as_str(),
                    ],
                )
                .await
                .map_err(pg_error)?;
            pg_u64(row.get(0), "count")
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
        let key = key.clone();
        let through = pg_int(through);
        let offset = limit_of(n - 1);
        self.run(move |client| async move {
            let rows = client
                .query(
                    "SELECT x.sequence_number, f.floor FROM seqcast.retention f, LATERAL ( \
                         SELECT e.sequence_number FROM seqcast.events e \
                         WHERE e.stream_id = (SELECT stream_id FROM seqcast.streams \
                                              WHERE channel = $1 AND request_id = $2) \
                           AND e.sequence_number <= $3 \
                         ORDER BY e.sequence_number DESC LIMIT 1 OFFSET $4) x \
                     WHERE f.id = 1",
                    &[
                        &key.channel().as_str(),
                        &key.request_id().as_str(),
                        &through,
                        &offset,
                    ],
                )
                .await
                .map_err(pg_error)?;
            match rows.first() {
                Some(row) => {
                    let seq = pg_u64(row.get(0), "sequence_number")?;
                    let floor = pg_u64(row.get(1), "retention floor")?;
                    Ok((seq >= floor).then_some(seq))
                }
                None => Ok(None),
            }
        })
    }
}

/// Decodes `EVENT_COLUMNS` starting at column `offset`.
pub(crate) fn event_from_row(row: &Row, offset: usize) -> Result<CommittedEvent, StoreError> {
    let sequence_number: i64 = row.get(offset);
    let stream_sequence: Option<i64> = row.get(offset + 1);
    let first_sequence: Option<i64> = row.get(offset + 7);
    let (Some(stream_sequence), Some(first_sequence)) = (stream_sequence, first_sequence) else {
        return Err(StoreError::Corrupt(format!(
            "event {sequence_number} has no stream row"
        )));
    };
    let channel = Channel::parse(row.get(offset + 2))
        .map_err(|e| StoreError::Corrupt(format!("event {sequence_number}: {e}")))?;
    let request_id = RequestId::parse(row.get(offset + 3))
        .map_err(|e| StoreError::Corrupt(format!("event {sequence_number}: {e}")))?;
    Ok(CommittedEvent {
        sequence_number: pg_u64(sequence_number, "sequence_number")?,
        stream_sequence: pg_u64(stream_sequence, "stream_sequence")?,
        key: SubscriptionKey::new(channel, request_id),
        message_id: message_id(row.get(offset + 4))?,
        timestamp_ms: pg_u64(row.get(offset + 5), "timestamp_ms")?,
        data: row.get(offset + 6),
        replaced: first_sequence != sequence_number,
    })
}

fn message_id(s: &str) -> Result<MessageId, StoreError> {
    MessageId::parse(s).map_err(|e| StoreError::Corrupt(format!("stored message_id: {e}")))
}
