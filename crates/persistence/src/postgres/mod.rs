//! The PostgreSQL backend: several seqcast nodes share one sequence space.
//!
//! [`PgStore::open`] gives a [`PgWriter`] and a [`PgReader`] behind the same traits as SQLite.
//! Numbers come from one counter row (`seqcast.counter`) that every writing transaction locks
//! first (inside `seqcast.append_events`), so numbers are dense and handed out in commit order
//! across nodes: a snapshot that sees N+1 committed also sees N. Each node has one writer
//! (group commit, pipelined on one connection) and one ordered tail: the tail reads the log from
//! the last number it applied and hands every event to the [`crate::CommitHook`] in sequence
//! order — this node's commits and every other node's alike. `LISTEN/NOTIFY` only wakes the
//! tail; it also re-reads after every reconnect and at least once a second.
//!
//! tokio-postgres runs on a small runtime of this backend's own (`seqcast-pg` threads), so the
//! blocking [`crate::EventReader`] methods can wait for it from any thread, an async test's
//! included; the server calls them in `spawn_blocking` as it does for SQLite.

mod reader;
mod schema;
mod tail;
mod writer;

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use crate::error::StoreError;

pub use reader::PgReader;
pub use schema::{PG_SCHEMA_VERSION, pg_migrate, pg_repair_sequences};
pub use writer::{PgStore, PgWriter};

/// Runs `fut` with a client-side deadline; past it, `Unavailable` saying what did not answer.
pub(crate) async fn within<T>(
    deadline: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Unavailable(format!(
            "no answer from the database within {} ms ({what}): the connection is lost or hangs",
            deadline.as_millis()
        ))),
    }
}

/// Default size of a node's read pool.
pub const DEFAULT_PG_POOL_SIZE: usize = 16;
/// Default statement timeout (also bounds a wait for the counter row's lock).
pub const DEFAULT_PG_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default commit deadline: a group transaction not confirmed by then (a synchronous standby
/// missing or lagging, a hung connection) is answered 503 `unavailable`.
pub const DEFAULT_PG_COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default interval of the writer's outbox poll.
pub const DEFAULT_PG_OUTBOX_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Default age of the tail's last successful read after which the node is not ready.
pub const DEFAULT_PG_TAIL_STALE_AFTER: Duration = Duration::from_secs(3);

/// Everything [`PgStore::open`] needs.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// `postgres://user@host:port/dbname` (or key=value form).
    pub url: String,
    /// Connections of the read pool (catch-up pages, recovery, stream pages).
    pub pool_size: usize,
    /// Every statement of every connection is cancelled after this long (`statement_timeout`);
    /// a publish then fails with 503 instead of hanging. (It does not end a COMMIT's wait for
    /// a synchronous standby: [`PgConfig::commit_timeout`] does.)
    pub statement_timeout: Duration,
    /// Bound of the writer's command queue.
    pub queue_capacity: usize,
    /// The most events one group-commit transaction takes.
    pub max_group_events: usize,
    /// How often the tail re-reads the log without being woken (at most a second).
    pub tail_interval: Duration,
    /// The client-side deadline of a group transaction, COMMIT included (and so of the wait
    /// for a synchronous standby's confirmation): past it the connection is dropped and the
    /// publishers are answered `Unavailable` (their commit is in doubt; a retry with the same
    /// message ids is answered with the committed numbers).
    pub commit_timeout: Duration,
    /// The node reports itself not writable (`/readyz` 503) when its tail has not completed a
    /// read of the log for this long (a lost or half-open connection).
    pub tail_stale_after: Duration,
    /// How often the writer looks for messages staged by `seqcast.publish()` (which no longer
    /// sends a NOTIFY: that takes a cluster-wide lock at every publishing commit). Half of it
    /// is the mean COMMIT → numbering delay.
    pub outbox_poll_interval: Duration,
    /// The largest `data` (bytes of JSON text) a staged message may have: written to
    /// `seqcast.store_meta` at open, where `seqcast.publish()` enforces it (keep it the same on
    /// every node, as the HTTP limit); larger staged rows are moved to `seqcast.outbox_failed`.
    /// `None`: no limit.
    pub max_message_bytes: Option<usize>,
}

impl PgConfig {
    /// Defaults for the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        PgConfig {
            url: url.into(),
            pool_size: DEFAULT_PG_POOL_SIZE,
            statement_timeout: DEFAULT_PG_STATEMENT_TIMEOUT,
            queue_capacity: crate::actor::DEFAULT_QUEUE_CAPACITY,
            max_group_events: crate::actor::DEFAULT_MAX_GROUP_EVENTS,
            tail_interval: Duration::from_secs(1),
            commit_timeout: DEFAULT_PG_COMMIT_TIMEOUT,
            tail_stale_after: DEFAULT_PG_TAIL_STALE_AFTER,
            outbox_poll_interval: DEFAULT_PG_OUTBOX_POLL_INTERVAL,
            max_message_bytes: None,
        }
    }

    /// The client-side deadline of one query (or one connection attempt): the server's
    /// `statement_timeout` plus a second for the answer to travel. A connection that does not
    /// answer by then is treated as lost (it may be half-open: no FIN, no RST).
    pub(crate) fn query_deadline(&self) -> Duration {
        self.statement_timeout.max(Duration::from_secs(1)) + Duration::from_secs(1)
    }

    /// The connection settings for one of this node's connections, named `application_name`
    /// (visible in `pg_stat_activity`).
    pub(crate) fn connection(
        &self,
        application_name: &str,
    ) -> Result<tokio_postgres::Config, StoreError> {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("bad database URL: {e}")))?;
        config.application_name(application_name);
        config.connect_timeout(self.statement_timeout.max(Duration::from_secs(1)));
        // A peer that vanished is noticed by the kernel too: keepalive probes on an idle
        // connection, and a bound on unacknowledged data. (A half-open path that still acks
        // is caught by the client-side deadlines.)
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(5));
        config.keepalives_interval(Duration::from_secs(1));
        config.keepalives_retries(3);
        config.tcp_user_timeout(self.query_deadline() * 2);
        // A session of this node that goes silent inside a transaction (its node gone behind
        // a partition, a black hole or a stop, while PostgreSQL's side of the connection stays
        // up) is ended after the same time: it may hold the counter row's lock, which every
        // node's writes and outbox numbering need. The node never idles inside a transaction
        // on purpose, and has given such a connection up by then (its client-side deadline).
        let ms = self.statement_timeout.as_millis().max(1);
        config.options(format!(
            "-c statement_timeout={ms} -c lock_timeout={ms} \
             -c idle_in_transaction_session_timeout={ms}"
        ));
        Ok(config)
    }
}

/// The runtime the backend's connections live on. Dropped without blocking (a runtime must
/// not be dropped inside another one's async context).
pub(crate) struct PgRuntime {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for PgRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRuntime").finish_non_exhaustive()
    }
}

impl PgRuntime {
    pub(crate) fn new() -> Result<Arc<Self>, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("seqcast-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot start the runtime: {e}")))?;
        let handle = runtime.handle().clone();
        Ok(Arc::new(PgRuntime {
            runtime: Mutex::new(Some(runtime)),
            handle,
        }))
    }

    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `fut` on the backend's runtime and waits for it on this thread (which may be any
    /// thread, also one of another runtime: the wait is a plain channel receive).
    pub(crate) fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }
}

impl Drop for PgRuntime {
    fn drop(&mut self) {
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(runtime) = runtime {
            runtime.shutdown_background();
        }
    }
}

/// Opens one connection and drives it on the current runtime. Notifications (LISTEN) go to
/// `notifications` when given.
pub(crate) async fn connect(
    config: &tokio_postgres::Config,
    notifications: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
) -> Result<Client, StoreError> {
    connect_observed(config, notifications, None).await
}

/// What a connection does with a notice (a WARNING or NOTICE the server sent).
pub(crate) type NoticeSink = Box<dyn Fn(&tokio_postgres::error::DbError) + Send + Sync>;

/// [`connect`], with every notice handed to `notices` (in order with the answers: a notice
/// sent before a statement's completion is seen before that statement's future resolves).
/// The whole connection attempt, startup and authentication included, is bounded by the
/// config's connect timeout (tokio-postgres bounds only the TCP connect).
pub(crate) async fn connect_observed(
    config: &tokio_postgres::Config,
    notifications: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
    notices: Option<NoticeSink>,
) -> Result<Client, StoreError> {
    let deadline = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10))
        * 2;
    let (client, mut connection) = tokio::time::timeout(deadline, config.connect(NoTls))
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "no answer from the database within {} s while connecting",
                deadline.as_secs()
            ))
        })?
        .map_err(pg_error)?;
    tokio::spawn(async move {
        loop {
            let message = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
            match message {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if let Some(tx) = &notifications {
                        let _ = tx.send(n);
                    }
                }
                Some(Ok(tokio_postgres::AsyncMessage::Notice(notice))) => {
                    tracing::debug!(
                        severity = notice.severity(),
                        message = notice.message(),
                        "database notice"
                    );
                    if let Some(sink) = &notices {
                        sink(&notice);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "database connection ended");
                    break;
                }
                None => break,
            }
        }
    });
    Ok(client)
}

/// Maps a database error onto what the caller should do: the command's own fault (bad data,
/// a constraint) is `Rejected`; everything about the database or the connection is
/// `Unavailable`; a schema this build does not know is `Corrupt`.
pub(crate) fn pg_error(err: tokio_postgres::Error) -> StoreError {
    let text = match err.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => err.to_string(),
    };
    match err.code() {
        Some(code) => {
            let c = code.code();
            if c.starts_with("22") || c.starts_with("23") {
                StoreError::Rejected(text)
            } else if code == &SqlState::UNDEFINED_TABLE
                || code == &SqlState::UNDEFINED_FUNCTION
                || code == &SqlState::INVALID_SCHEMA_NAME
                || c.starts_with("XX")
            {
                StoreError::Corrupt(text)
            } else {
                StoreError::Unavailable(text)
            }
        }
        None => StoreError::Unavailable(text),
    }
}

/// A caller's number as PostgreSQL's bigint, saturating (every stored number is smaller).
pub(crate) fn pg_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A stored number that must not be negative.
pub(crate) fn pg_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {value}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::{Duration, Instant};

    use super::PgConfig;

    /// A node's session that goes silent inside a transaction releases its locks after the
    /// statement timeout: PostgreSQL ends it (before, a black-holed writer connection held the
    /// counter row's lock until TCP noticed, hours later, and no node could write).
    #[tokio::test]
    async fn a_session_silent_inside_a_transaction_is_ended_and_its_locks_released() {
        let url = std::env::var("SEQCAST_TEST_PG_ADMIN_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let config = PgConfig {
            statement_timeout: Duration::from_millis(500),
            ..PgConfig::new(url.clone())
        };
        let connected = config
            .connection("seqcast-idle-test")
            .unwrap()
            .connect(tokio_postgres::NoTls)
            .await;
        let (held, connection) = match connected {
            Ok(c) => c,
            Err(e) => {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true");
                assert!(
                    !ci,
                    "PostgreSQL is not reachable at {url} under CI=true: {e}"
                );
                eprintln!("\n!!!! SKIPPED: no PostgreSQL at {url}: {e}\n");
                return;
            }
        };
        tokio::spawn(connection);
        let key = i64::from(std::process::id()) << 20 | 0x5ca5;
        held.batch_execute(&format!("BEGIN; SELECT pg_advisory_xact_lock({key})"))
            .await
            .unwrap();
        // Silent from here on, the connection open: another session waits for the lock.
        let (other, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let asked = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(10),
            other.batch_execute(&format!("SELECT pg_advisory_xact_lock({key})")),
        )
        .await
        .expect("the silent session still holds its lock after 10 s")
        .unwrap();
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "the lock came only after {:?}",
            asked.elapsed()
        );
        assert!(
            held.batch_execute("SELECT 1").await.is_err(),
            "the silent session was not ended"
        );
    }
}
