//! A node's writer: one task, one connection, group commit with pipelined statements.
//!
//! Publishers send commands over a bounded queue, each with its own oneshot reply. The task
//! takes every command already queued into one transaction: `BEGIN`, one
//! `seqcast.append_events` call for the whole group (which also sends the NOTIFY) and `COMMIT`,
//! pipelined: one round trip per group, so the counter row is held for no network wait. When the
//! database refuses something, the group is written again with one call per command, and the
//! refused command is dropped alone. The queue, the grouping and the answering in order are the
//! shared writer shell's ([`crate::actor`]). After COMMIT the publishers are answered only once
//! this node's tail has applied their numbers (so the hub has them: read-your-writes on the
//! publishing node, and the same order of "hook, then answer" as SQLite); the tail is woken
//! directly, so that costs one read, not a poll interval. A tail that has not applied them
//! within the answer timeout (or whose hook failed) gets the publishers an error, never an
//! acknowledgement their node cannot back.
//!
//! The same task numbers messages staged by `seqcast.publish()` (the outbox), woken by
//! `NOTIFY seqcast_outbox` and at least once a second; that check doubles as the writer's health
//! probe, so an outage and the recovery from it are noticed without a publish.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::{Notify, watch};
use tokio_postgres::Client;
use tokio_postgres::types::Type;

use seqcast_protocol::{Channel, MessageId, RequestId, SubscriptionKey};

use super::reader::PgReader;
use super::schema;
use super::tail::Tail;
use super::{NoticeSink, PgConfig, PgRuntime, connect_observed, pg_error, pg_int, pg_u64, within};
use crate::actor::{
    ActorWriter, AfterGroup, Command, CommandQueue, Replies, WriterHandle, WriterShared, failed,
};
use crate::error::StoreError;
use crate::event::{CommittedEvent, NewEvent, PruneReport, StoreInfo};
use crate::health::TailHealth;
use crate::hook::CommitHook;
use crate::store::EventWriter;

/// See [`PgWriter::on_new_history`]: `(epoch, head, retention floor)` of the new history.
pub type NewHistoryHook = Box<dyn FnMut(&str, u64, u64) + Send>;
/// See [`PgWriter::on_pruned_gap`]: `(applied, next)`.
pub type PrunedGapHook = Box<dyn FnMut(u64, u64) + Send>;

/// State shared by the writer task, the tail task and the handles.
pub(crate) struct Shared {
    /// The shell's counters and stop state (the tail stops the writer when the hook fails).
    pub(crate) writer: Arc<WriterShared>,
    /// The writer can reach the database (last statement or probe succeeded).
    available: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// The highest number the tail has handed to the hook.
    pub(crate) applied: watch::Sender<u64>,
    /// The highest number this node knows was committed (its own commits, NOTIFY payloads,
    /// the tail's reads).
    pub(crate) seen_head: AtomicU64,
    pub(crate) tail_connected: AtomicBool,
    /// Set while the tail cannot apply the next event (a row it cannot read): why.
    pub(crate) tail_fault: Mutex<Option<String>>,
    /// The epoch of the history this node serves (the tail moves it; the writer follows).
    pub(crate) epoch: Mutex<String>,
    /// The writer found another history: the tail reconnects (and so checks the identity).
    pub(crate) identity_check: AtomicBool,
    /// Told when the tail finds the database is another history: (epoch, head, floor).
    pub(crate) new_history: Mutex<Option<NewHistoryHook>>,
    /// Told when the tail skips numbers that the retention floor pruned before it read them.
    pub(crate) pruned_gap: Mutex<Option<PrunedGapHook>>,
    pub(crate) last_tail_read: Mutex<Option<Instant>>,
    /// Past this age of the tail's last read the node says it is not writable.
    tail_stale_after: Duration,
    pub(crate) tail_wake: Notify,
    pub(crate) outbox_wake: Notify,
    stop: watch::Sender<bool>,
    /// The tail, until delivery starts.
    pending_tail: Mutex<Option<Tail>>,
}

impl Shared {
    /// Why the writer's last statement or probe failed, while it does.
    fn write_error(&self) -> Option<String> {
        if self.available.load(Ordering::Acquire) {
            return None;
        }
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Some(last.unwrap_or_else(|| "the database cannot take writes".to_owned()))
    }
}

/// Handle to a node's writer. Cheap to clone.
#[derive(Clone)]
pub struct PgWriter {
    handle: WriterHandle,
    shared: Arc<Shared>,
    runtime: Arc<PgRuntime>,
}

impl std::fmt::Debug for PgWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgWriter")
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

/// Opens the PostgreSQL backend.
#[derive(Debug)]
pub struct PgStore;

impl PgStore {
    /// Connects, applies pending migrations (under `pg_advisory_lock`), starts the writer and
    /// the tail (from the current head: the hook gets every event committed after this call,
    /// on any node, in sequence order).
    pub fn open(
        config: PgConfig,
        hook: CommitHook,
    ) -> Result<(PgWriter, PgReader, StoreInfo), StoreError> {
        let (writer, reader, info) = PgStore::open_paused(config, hook)?;
        writer.start_delivery(info.head);
        Ok((writer, reader, info))
    }

    /// Like [`PgStore::open`], but the tail waits for [`PgWriter::start_delivery`], so the
    /// caller can build what the hook feeds from the log first.
    pub fn open_paused(
        config: PgConfig,
        hook: CommitHook,
    ) -> Result<(PgWriter, PgReader, StoreInfo), StoreError> {
        let runtime = PgRuntime::new()?;
        let writer_config = config.connection("seqcast-writer")?;
        let unconfirmed = Arc::new(AtomicBool::new(false));
        let max_message_bytes = config.max_message_bytes;
        let opened = {
            let writer_config = writer_config.clone();
            let sink = unconfirmed_sink(&unconfirmed);
            runtime.block(async move {
                let mut client = connect_observed(&writer_config, None, Some(sink)).await?;
                schema::apply_migrations(&mut client).await?;
                if let Some(limit) = max_message_bytes {
                    // Where seqcast.publish() finds the HTTP size limit.
                    client
                        .execute(
                            "INSERT INTO seqcast.store_meta (key, value) \
                             VALUES ('max_message_bytes', $1) \
                             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value \
                             WHERE seqcast.store_meta.value IS DISTINCT FROM EXCLUDED.value",
                            &[&limit.to_string()],
                        )
                        .await
                        .map_err(pg_error)?;
                }
                let epoch = schema::read_epoch(&client).await?;
                let head: i64 = client
                    .query_one("SELECT head FROM seqcast.counter WHERE id = 1", &[])
                    .await
                    .map_err(pg_error)?
                    .get(0);
                let statements = Statements::prepare(&client).await?;
                Ok((client, statements, epoch, pg_u64(head, "head")?))
            })?
        };
        let (client, statements, epoch, head) = opened;
        let (applied, _) = watch::channel(head);
        let (stop, stop_rx) = watch::channel(false);
        let (handle, queue) = WriterHandle::new(config.queue_capacity, config.max_group_events);
        let shared = Arc::new(Shared {
            writer: Arc::clone(handle.shared()),
            available: AtomicBool::new(true),
            last_error: Mutex::new(None),
            applied,
            seen_head: AtomicU64::new(head),
            tail_connected: AtomicBool::new(false),
            tail_fault: Mutex::new(None),
            pruned_gap: Mutex::new(None),
            epoch: Mutex::new(epoch.clone()),
            identity_check: AtomicBool::new(false),
            new_history: Mutex::new(None),
            last_tail_read: Mutex::new(None),
            tail_stale_after: config.tail_stale_after.max(Duration::from_millis(100)),
            tail_wake: Notify::new(),
            outbox_wake: Notify::new(),
            stop,
            pending_tail: Mutex::new(None),
        });
        let tail = Tail {
            config: config.connection("seqcast-listen")?,
            hook: Mutex::new(hook),
            applied: head,
            shared: Arc::clone(&shared),
            interval: config.tail_interval.min(Duration::from_secs(1)),
            query_deadline: config.query_deadline(),
            fault_logged: None,
        };
        *shared
            .pending_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(tail);
        let reader = PgReader::new(&config, Arc::clone(&runtime))?;
        let task = WriterTask {
            config: writer_config,
            client: Some((client, statements)),
            epoch: epoch.clone(),
            shared: Arc::clone(&shared),
            max_group_events: config.max_group_events.max(1),
            answer_timeout: config.statement_timeout.max(Duration::from_secs(1)),
            query_deadline: config.query_deadline(),
            commit_timeout: config.commit_timeout.max(Duration::from_millis(100)),
            unconfirmed,
            unconfirmed_since: None,
            outbox_poll_interval: config.outbox_poll_interval.max(Duration::from_millis(1)),
            max_message_bytes: config.max_message_bytes,
            last_committed: head,
        };
        runtime.handle().spawn(task.run(queue, stop_rx));
        tracing::info!(epoch = %epoch, head, "PostgreSQL writer started");
        Ok((
            PgWriter {
                handle,
                shared,
                runtime,
            },
            reader,
            StoreInfo { epoch, head },
        ))
    }
}

impl PgWriter {
    /// Starts the tail: the hook gets every event after `from`, in sequence order. Only the
    /// first call does anything.
    pub fn start_delivery(&self, from: u64) {
        let tail = self
            .shared
            .pending_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut tail) = tail {
            tail.applied = from;
            self.shared.applied.send_replace(from);
            let stop = self.shared.stop.subscribe();
            self.runtime.handle().spawn(tail.run(stop));
        }
    }

    /// Lets the tail skip what retention pruned before this node read it (a node that was
    /// paused or slow while another node pruned past it): `skipped(applied, next)` is called
    /// on the tail's task before the commit hook gets `next`, the first retained event after
    /// `applied`, when the retention floor (one row of the database, raised by whichever node
    /// prunes) is above `applied + 1`. Without it, such a gap reaches the commit hook as is.
    /// Set it before [`PgWriter::start_delivery`].
    pub fn on_pruned_gap(&self, skipped: PrunedGapHook) {
        *self
            .shared
            .pruned_gap
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(skipped);
    }

    /// Lets the node move to another history without a restart. Every (re)connection of the
    /// tail checks the database's identity (the epoch: the store's id bound to the cluster's
    /// system identifier, its timeline and the database): when it changed (a failover to
    /// another timeline, a restore), `moved(epoch, head, floor)` is called on the tail's task
    /// with the new history's epoch, head and retention floor, the tail goes on from that head,
    /// and the writer takes the new epoch (until then it refuses publishes with the reason).
    /// Without it the node keeps refusing publishes. Set it before
    /// [`PgWriter::start_delivery`].
    pub fn on_new_history(&self, moved: NewHistoryHook) {
        *self
            .shared
            .new_history
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(moved);
    }
}

impl ActorWriter for PgWriter {
    fn handle(&self) -> &WriterHandle {
        &self.handle
    }

    /// While the writer's last statement or probe failed (or was not confirmed by a synchronous
    /// standby where one is configured), or this node's tail cannot apply the log or has not
    /// read it within `tail_stale_after` (a publish is answered once the tail has applied it,
    /// and live delivery depends on it). The writer probes on its own, once a second; a probe
    /// asked for is answered with its last result.
    fn unwritable(&self) -> Option<String> {
        let s = &self.shared;
        let tail_fault = s
            .tail_fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let since_tail_read = s
            .last_tail_read
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|t| t.elapsed());
        tail_fault.or_else(|| s.write_error()).or_else(|| {
            since_tail_read
                .filter(|age| *age > s.tail_stale_after)
                .map(|age| {
                    format!(
                        "this node's tail has not read the log for {} ms (its database \
                         connection is lost or hangs): live delivery is stalled",
                        age.as_millis()
                    )
                })
        })
    }

    fn tail(&self) -> Option<TailHealth> {
        let s = &self.shared;
        let since_read = s
            .last_tail_read
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
        Some(TailHealth {
            applied: *s.applied.borrow(),
            seen_head: s.seen_head.load(Ordering::Acquire),
            connected: s.tail_connected.load(Ordering::Acquire),
            since_read_ms: since_read,
        })
    }
}

const APPEND: &str = "SELECT o_sequence_number, o_stream_sequence, o_replaced, o_timestamp_ms, \
     o_retry FROM seqcast.append_events($1, $2, $3, $4)";

struct Statements {
    append: tokio_postgres::Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Self, StoreError> {
        let text_array = Type::TEXT_ARRAY;
        Ok(Statements {
            append: client
                .prepare_typed(
                    APPEND,
                    &[
                        text_array.clone(),
                        text_array.clone(),
                        text_array.clone(),
                        text_array,
                    ],
                )
                .await
                .map_err(pg_error)?,
        })
    }
}

/// How one attempt at a group transaction ended.
enum Attempt {
    /// Committed: each command's events (None for commands that failed earlier), and how
    /// many of them are new (not retries).
    Committed(Vec<Option<Vec<CommittedEvent>>>, u64),
    /// Command `index` was refused; the transaction was rolled back.
    CommandFailed(usize, StoreError),
    /// A combined call was refused: write the group again with one call per command.
    Split,
    /// The transaction failed as a whole; nothing of it persists (or, for a COMMIT whose
    /// answer was lost with the connection, it is in doubt — a retry with the same message
    /// ids is answered with the committed numbers).
    Lost(StoreError),
}

struct WriterTask {
    config: tokio_postgres::Config,
    client: Option<(Client, Statements)>,
    epoch: String,
    shared: Arc<Shared>,
    max_group_events: usize,
    answer_timeout: Duration,
    /// Client-side deadline of a statement that is not a group commit.
    query_deadline: Duration,
    /// Client-side deadline of a group transaction, COMMIT (and the synchronous standby's
    /// confirmation) included.
    commit_timeout: Duration,
    /// Set by the connection when PostgreSQL reports that it stopped waiting for a
    /// synchronous standby ("canceling wait for synchronous replication … the transaction
    /// has already committed locally"): that COMMIT is not an acknowledgement.
    unconfirmed: Arc<AtomicBool>,
    /// Set when a group commit was not confirmed in time (or PostgreSQL stopped waiting for
    /// the synchronous standby): publishes are refused at once, with this reason, until the
    /// writer's probe commits with confirmation again.
    unconfirmed_since: Option<String>,
    outbox_poll_interval: Duration,
    max_message_bytes: Option<usize>,
    last_committed: u64,
}

/// Whether anything is staged: one probe of the primary key's index (which skips the dead
/// entries of numbered rows cheaply; a sequential scan would read them until a vacuum).
const OUTBOX_NONEMPTY: &str =
    "SELECT EXISTS (SELECT 1 FROM seqcast.outbox ORDER BY outbox_id LIMIT 1)";

/// Client-side deadline of the write probe while publishes fail.
const PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// Why publishes are refused while commits are not confirmed.
const UNCONFIRMED: &str = "commits are not confirmed (a synchronous standby missing or lagging, \
     or the database connection lost): publishes are refused until a probe commit is confirmed";

/// The notice text PostgreSQL sends when a COMMIT stops waiting for the synchronous standby
/// (statement timeout, cancel, or the session ending) — the transaction is committed locally
/// but the standby may not have it.
const SYNC_REP_CANCELED: &str = "canceling wait for synchronous replication";

/// A notice sink that raises `flag` on [`SYNC_REP_CANCELED`].
fn unconfirmed_sink(flag: &Arc<AtomicBool>) -> NoticeSink {
    let flag = Arc::clone(flag);
    Box::new(move |notice| {
        if notice.message().starts_with(SYNC_REP_CANCELED) {
            tracing::warn!(
                event = "commit_unconfirmed",
                notice = notice.message(),
                detail = notice.detail(),
                "a COMMIT was not confirmed by the synchronous standby; its publishers are not acknowledged"
            );
            flag.store(true, Ordering::SeqCst);
        }
    })
}

impl WriterTask {
    async fn run(mut self, mut queue: CommandQueue, mut stop: watch::Receiver<bool>) {
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The outbox poll: seqcast.publish() sends no NOTIFY (schema 4).
        let mut poll = tokio::time::interval(self.outbox_poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Not biased: under a constant stream of publishes the outbox still gets its turn.
            let first = tokio::select! {
                command = queue.recv() => match command {
                    Some(c) => c,
                    None => break,
                },
                _ = self.shared.outbox_wake.notified() => {
                    match self.queued_while_refusing(&mut queue) {
                        Some(c) => c,
                        None => {
                            self.sweep_outbox().await;
                            continue;
                        }
                    }
                }
                _ = poll.tick(), if self.unconfirmed_since.is_none()
                    && self.shared.available.load(Ordering::Acquire) =>
                {
                    self.poll_outbox().await;
                    continue;
                }
                _ = sweep.tick() => {
                    match self.queued_while_refusing(&mut queue) {
                        Some(c) => c,
                        None => {
                            self.sweep_outbox().await;
                            continue;
                        }
                    }
                }
                _ = stop.changed() => break,
            };
            let mut group = queue.group(first);
            queue.fill(&mut group);
            if !group.appends.is_empty() {
                self.write_group(group.appends, group.replies).await;
            }
            for command in group.after {
                match command {
                    AfterGroup::Prune(step) => {
                        let pruned = self.prune(step.below, step.max_events).await;
                        step.answer(pruned);
                    }
                    // The sweep probes once a second; a probe is answered with its last result.
                    AfterGroup::Probe(reply) => {
                        let last = self.shared.write_error();
                        let _ = reply
                            .send(last.map_or(Ok(()), |why| Err(StoreError::Unavailable(why))));
                    }
                }
            }
        }
        // Let the tail apply what this node committed (unless its hook failed), then stop it.
        let mut applied = self.shared.applied.subscribe();
        let last = self.last_committed;
        let writer = &self.shared.writer;
        let _ = tokio::time::timeout(
            self.answer_timeout,
            applied.wait_for(|a| *a >= last || writer.stopped().is_some()),
        )
        .await;
        self.shared.stop.send_replace(true);
        self.client = None;
        queue.finish();
    }

    /// Gives up the connection after a client-side deadline: its statement is canceled (a
    /// cancel request on a connection of its own: a COMMIT waiting for a synchronous standby
    /// does not end by itself, and would hold its locks and its backend until the standby
    /// comes back), then it is dropped. Both in the background, bounded.
    fn abandon_connection(&mut self) {
        if let Some((client, _)) = self.client.take() {
            let token = client.cancel_token();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    token.cancel_query(tokio_postgres::NoTls),
                )
                .await;
                drop(client);
            });
        }
    }

    /// While publishes are refused (commits not confirmed), a queued command goes before the
    /// probe: it is answered at once, instead of waiting for a probe that may take seconds.
    fn queued_while_refusing(&self, queue: &mut CommandQueue) -> Option<Command> {
        if self.unconfirmed_since.is_some() {
            queue.try_recv()
        } else {
            None
        }
    }

    fn set_available(&self, result: Result<(), &StoreError>) {
        let ok = result.is_ok();
        let was = self.shared.available.swap(ok, Ordering::AcqRel);
        let mut last = self
            .shared
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(()) => {
                *last = None;
                if !was {
                    tracing::info!(
                        event = "database_available",
                        "the database takes writes again"
                    );
                }
            }
            Err(e) => {
                *last = Some(e.to_string());
                if was {
                    tracing::warn!(event = "database_unavailable", error = %e, "the database cannot take writes; publishes fail with 503 until it can");
                }
            }
        }
    }

    /// The connection, reconnecting when it was lost. A database with another identity (a
    /// restore or a failover to another history) is refused: its numbers are not ours.
    async fn ensure_connection(&mut self) -> Result<(), StoreError> {
        if let Some((client, _)) = &self.client {
            if !client.is_closed() {
                return Ok(());
            }
            self.client = None;
        }
        let client = connect_observed(
            &self.config,
            None,
            Some(unconfirmed_sink(&self.unconfirmed)),
        )
        .await?;
        let (epoch, statements) = within(
            self.query_deadline,
            "checking the reconnected database",
            async {
                schema::require_current_schema(&client).await?;
                let epoch = schema::read_epoch(&client).await?;
                let statements = Statements::prepare(&client).await?;
                Ok((epoch, statements))
            },
        )
        .await?;
        if epoch != self.epoch {
            let serving = self
                .shared
                .epoch
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if epoch != serving {
                // The tail moves the node (it must restart delivery from the new history
                // first); until it has, nothing is written under the old epoch.
                self.shared.identity_check.store(true, Ordering::Release);
                self.shared.tail_wake.notify_one();
                return Err(StoreError::Unavailable(format!(
                    "the database is another history now (epoch {epoch}, this node serves \
                     {serving}); the node is moving to it"
                )));
            }
            tracing::warn!(event = "writer_new_history", epoch = %epoch, "the writer writes to the new history");
            self.epoch = epoch;
        }
        tracing::info!("database connection reopened");
        self.client = Some((client, statements));
        Ok(())
    }

    /// Drops the connection when the error says it is broken.
    fn after_error(&mut self, err: &StoreError) {
        if matches!(err, StoreError::Unavailable(_))
            && let Some((client, _)) = &self.client
            && client.is_closed()
        {
            self.client = None;
        }
    }

    /// Answers every append of a group that was not attempted with `e`, counted as one failed
    /// transaction.
    fn refuse_group(&self, replies: Replies, e: &StoreError) {
        self.shared.writer.count_failed();
        replies.refuse(e);
    }

    async fn write_group(&mut self, appends: Vec<Vec<NewEvent>>, replies: Replies) {
        if let Some(why) = &self.unconfirmed_since {
            // Commits are not being confirmed: answer at once instead of letting every group
            // wait out the commit deadline; the probe (every second) lifts this.
            self.refuse_group(replies, &StoreError::Unavailable(why.clone()));
            return;
        }
        if let Err(e) = self.ensure_connection().await {
            self.set_available(Err(&e));
            self.refuse_group(replies, &e);
            return;
        }
        let mut own: Vec<Option<StoreError>> = vec![None; appends.len()];
        let mut combined = true;
        loop {
            if own.iter().all(Option::is_some) {
                break;
            }
            self.unconfirmed.store(false, Ordering::SeqCst);
            let attempt = match tokio::time::timeout(
                self.commit_timeout,
                self.attempt(&appends, &own, combined),
            )
            .await
            {
                Ok(attempt) => attempt,
                Err(_) => {
                    // The connection may be half-open or the COMMIT waits for a synchronous
                    // standby: either way nobody is acknowledged, and the connection (whose
                    // pipeline is in an unknown state) is dropped.
                    self.abandon_connection();
                    self.unconfirmed_since = Some(UNCONFIRMED.to_owned());
                    Attempt::Lost(StoreError::Unavailable(format!(
                        "the database did not confirm the commit within {} ms (a synchronous \
                         standby missing or lagging, or the connection lost); the publish is in \
                         doubt: retry it with the same message_id",
                        self.commit_timeout.as_millis()
                    )))
                }
            };
            let attempt = match attempt {
                Attempt::Committed(results, _)
                    if self.unconfirmed.swap(false, Ordering::SeqCst) =>
                {
                    // Visible on this primary (every tail delivers it), but not acknowledged:
                    // a failover may lose it. The publishers retry with their message ids.
                    let newest = results
                        .iter()
                        .flatten()
                        .flatten()
                        .map(|e| e.sequence_number)
                        .max()
                        .unwrap_or(0);
                    self.last_committed = self.last_committed.max(newest);
                    self.shared.seen_head.fetch_max(newest, Ordering::AcqRel);
                    self.shared.tail_wake.notify_one();
                    self.unconfirmed_since = Some(UNCONFIRMED.to_owned());
                    Attempt::Lost(StoreError::Unavailable(
                        "PostgreSQL committed locally but the synchronous standby did not confirm \
                         (\"canceling wait for synchronous replication\"): not acknowledged; retry \
                         with the same message_id"
                            .to_owned(),
                    ))
                }
                other => other,
            };
            match attempt {
                Attempt::Split => combined = false,
                Attempt::CommandFailed(i, e) => own[i] = Some(e),
                Attempt::Lost(e) => {
                    self.shared.writer.count_failed();
                    self.after_error(&e);
                    if matches!(e, StoreError::Unavailable(_)) {
                        self.set_available(Err(&e));
                    }
                    replies.answer(failed(own, &e));
                    return;
                }
                Attempt::Committed(results, new_events) => {
                    self.set_available(Ok(()));
                    self.answer(replies, own, results, new_events);
                    return;
                }
            }
        }
        // Every command was refused.
        replies.answer(failed(own, &StoreError::Closed));
    }

    /// One attempt at the group, pipelined: BEGIN, the appends, then NOTIFY and COMMIT (or
    /// ROLLBACK when only retries came back). `combined`: every command in one
    /// `append_events` call (one lock and one counter update per transaction: the fast path);
    /// else one call per command, to find which one the database refuses.
    async fn attempt(
        &mut self,
        appends: &[Vec<NewEvent>],
        own: &[Option<StoreError>],
        combined: bool,
    ) -> Attempt {
        let Some((client, statements)) = &self.client else {
            return Attempt::Lost(StoreError::Unavailable("no connection".to_owned()));
        };
        let active: Vec<usize> = (0..appends.len()).filter(|&i| own[i].is_none()).collect();
        let groups: Vec<Vec<usize>> = if combined {
            vec![active]
        } else {
            active.into_iter().map(|i| vec![i]).collect()
        };
        let arrays: Vec<[Vec<&str>; 4]> = groups
            .iter()
            .map(|group| {
                let events = || group.iter().flat_map(|&i| appends[i].iter());
                [
                    events().map(|e| e.key.channel().as_str()).collect(),
                    events().map(|e| e.key.request_id().as_str()).collect(),
                    events().map(|e| e.message_id.as_str()).collect(),
                    events().map(|e| e.data.as_str()).collect(),
                ]
            })
            .collect();
        // One round trip: BEGIN, the calls and COMMIT go out together. If a call fails, the
        // transaction is aborted and PostgreSQL turns that COMMIT into a rollback.
        let begin = client.batch_execute("BEGIN");
        let calls = join_all(arrays.iter().map(|[c, r, m, d]| async move {
            client.query(&statements.append, &[c, r, m, d]).await
        }));
        let commit = client.batch_execute("COMMIT");
        let (begun, results, committed_tx) =
            futures_util::future::join3(begin, calls, commit).await;
        if let Err(e) = begun {
            return self.lost(pg_error(e)).await;
        }
        let mut committed: Vec<Option<Vec<CommittedEvent>>> = vec![None; appends.len()];
        let mut new_events = 0u64;
        for (group, result) in groups.iter().zip(results) {
            let rows = match result {
                Ok(rows) => rows,
                Err(e) => {
                    // The first error is the cause; later calls only say the transaction was
                    // already aborted. Nothing was committed.
                    let err = pg_error(e);
                    if !matches!(err, StoreError::Rejected(_)) {
                        return self.lost(err).await;
                    }
                    return match group.as_slice() {
                        [i] => Attempt::CommandFailed(*i, err),
                        _ => Attempt::Split,
                    };
                }
            };
            let mut rows = rows.as_slice();
            for &i in group {
                let n = appends[i].len().min(rows.len());
                let (mine, rest) = rows.split_at(n);
                rows = rest;
                match decode(&appends[i], mine) {
                    Ok(events) => {
                        for (_, retry) in &events {
                            new_events += u64::from(!retry);
                        }
                        committed[i] = Some(events.into_iter().map(|(e, _)| e).collect());
                    }
                    Err(e) => return Attempt::Lost(e),
                }
            }
        }
        // A COMMIT whose answer was lost is in doubt (see the Lost variant).
        if let Err(e) = committed_tx {
            return self.lost(pg_error(e)).await;
        }
        Attempt::Committed(committed, new_events)
    }

    async fn lost(&mut self, err: StoreError) -> Attempt {
        if let Some((client, _)) = &self.client
            && !client.is_closed()
        {
            let _ = client.batch_execute("ROLLBACK").await;
        }
        Attempt::Lost(err)
    }

    /// Counts the committed group, wakes the tail, and answers each publisher once the tail
    /// has applied the group's numbers. A tail that has not applied them within the answer
    /// timeout (or whose hook failed) gets them an error instead: the events are committed, but
    /// this node cannot back an acknowledgement (its hub does not have them; the publisher may
    /// retry with the same message ids, which is answered with the committed numbers).
    fn answer(
        &mut self,
        replies: Replies,
        own: Vec<Option<StoreError>>,
        results: Vec<Option<Vec<CommittedEvent>>>,
        new_events: u64,
    ) {
        let newest = results
            .iter()
            .flatten()
            .flatten()
            .map(|e| e.sequence_number)
            .max()
            .unwrap_or(0);
        if new_events > 0 {
            self.shared
                .writer
                .count_commit(usize::try_from(new_events).unwrap_or(usize::MAX));
            self.shared.seen_head.fetch_max(newest, Ordering::AcqRel);
        }
        self.last_committed = self.last_committed.max(newest);
        self.shared.tail_wake.notify_one();
        let mut applied = self.shared.applied.subscribe();
        let writer = Arc::clone(&self.shared.writer);
        let timeout = self.answer_timeout;
        tokio::spawn(async move {
            // Woken by every number the tail applies, and by a hook failure.
            let waited = tokio::time::timeout(
                timeout,
                applied.wait_for(|a| *a >= newest || writer.stopped().is_some()),
            )
            .await
            .map(|a| a.is_ok_and(|a| *a >= newest));
            let failure = match waited {
                Ok(true) => None,
                Ok(false) => Some(writer.stopped().unwrap_or(StoreError::Closed)),
                Err(_) => {
                    tracing::warn!(
                        event = "tail_slow",
                        sequence_number = newest,
                        timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                        "this node's tail has not applied a commit in time: its publishers are answered 503"
                    );
                    Some(StoreError::Unavailable(format!(
                        "committed (up to sequence number {newest}), but this node has not \
                         applied it within {} ms (its tail of the log is stalled or behind): not \
                         acknowledged; retry with the same message_id",
                        timeout.as_millis()
                    )))
                }
            };
            replies.answer(own.into_iter().zip(results).map(|(own, events)| {
                match (events, own, &failure) {
                    (Some(events), _, None) => Ok(events),
                    (Some(_), _, Some(failure)) => Err(failure.clone()),
                    (None, own, _) => Err(own.unwrap_or(StoreError::Closed)),
                }
            }));
        });
    }

    /// One prune step (see [`EventWriter::prune`]) in one transaction.
    async fn prune(&mut self, below: u64, max_events: usize) -> Result<PruneReport, StoreError> {
        self.ensure_connection().await?;
        let deadline = self.query_deadline;
        let result = match &mut self.client {
            Some((client, _)) => {
                within(deadline, "pruning", prune_step(client, below, max_events)).await
            }
            None => Err(StoreError::Closed),
        };
        if matches!(&result, Err(StoreError::Unavailable(_))) {
            // Possibly a hung connection: start from a fresh one.
            self.abandon_connection();
        }
        if let Err(e) = &result {
            tracing::warn!(error = %e, "prune failed; nothing was deleted");
            self.after_error(e);
        }
        result
    }

    /// The frequent outbox check: one index probe; numbering when something is staged. Errors
    /// are left to the once-a-second sweep (which reports them).
    async fn poll_outbox(&mut self) {
        let Some((client, _)) = &self.client else {
            return;
        };
        if client.is_closed() {
            return;
        }
        let staged = within(self.query_deadline, "the outbox poll", async {
            client
                .query_one(OUTBOX_NONEMPTY, &[])
                .await
                .map(|row| row.get::<_, bool>(0))
                .map_err(pg_error)
        })
        .await;
        if matches!(staged, Ok(true)) {
            self.sweep_outbox().await;
        }
    }

    /// Numbers the messages staged by `seqcast.publish()` whose transactions have committed.
    /// Also the writer's health probe, once a second.
    async fn sweep_outbox(&mut self) {
        if let Err(e) = self.ensure_connection().await {
            self.set_available(Err(&e));
            return;
        }
        let Some((client, _)) = &self.client else {
            return;
        };
        // While publishes fail, the probe writes (a commit record), so that a synchronous
        // standby that is still missing keeps the node unavailable and one that is back
        // makes it available again without a publish.
        let writes = !self.shared.available.load(Ordering::Acquire);
        self.unconfirmed.store(false, Ordering::SeqCst);
        // Short while publishes are refused: a probe must not hold up the queue for long.
        let probe_deadline = if writes {
            PROBE_DEADLINE.min(self.query_deadline)
        } else {
            self.query_deadline
        };
        let probe_started = Instant::now();
        let probe = within(probe_deadline, "the writer's probe", async {
            if writes {
                client.batch_execute("BEGIN").await.map_err(pg_error)?;
                let written = async {
                    client
                        .batch_execute("SET LOCAL statement_timeout = 1000")
                        .await?;
                    // A row version, so the COMMIT writes WAL and waits for the standby
                    // (an xid alone does not). Readers are not blocked; no value changes.
                    client
                        .execute(
                            "UPDATE seqcast.store_meta SET value = value WHERE key = 'epoch'",
                            &[],
                        )
                        .await?;
                    client.batch_execute("COMMIT").await
                }
                .await;
                if let Err(e) = written {
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Err(pg_error(e));
                }
            }
            client
                .query_one(OUTBOX_NONEMPTY, &[])
                .await
                .map(|row| row.get::<_, bool>(0))
                .map_err(pg_error)
        })
        .await;
        let probe = match probe {
            Ok(_) if self.unconfirmed.swap(false, Ordering::SeqCst) => Err(StoreError::Unavailable(
                "the synchronous standby does not confirm commits (\"canceling wait for synchronous replication\")"
                    .to_owned(),
            )),
            other => other,
        };
        if writes {
            tracing::debug!(
                took_ms = u64::try_from(probe_started.elapsed().as_millis()).unwrap_or(u64::MAX),
                ok = probe.is_ok(),
                "write probe"
            );
            if probe.is_err() {
                self.abandon_connection();
            }
            self.unconfirmed_since = probe
                .as_ref()
                .err()
                .map(|e| format!("{UNCONFIRMED} (the last probe: {e})"));
        }
        let staged = match probe {
            Ok(staged) => staged,
            Err(e) => {
                self.set_available(Err(&e));
                if matches!(e, StoreError::Unavailable(_)) {
                    self.abandon_connection();
                }
                return;
            }
        };
        self.set_available(Ok(()));
        if !staged {
            return;
        }
        loop {
            let deadline = self.commit_timeout.max(self.query_deadline);
            let numbered = match tokio::time::timeout(deadline, self.number_staged()).await {
                Ok(r) => r,
                Err(_) => {
                    self.abandon_connection();
                    Err(StoreError::Unavailable(format!(
                        "numbering staged messages got no answer within {} ms",
                        deadline.as_millis()
                    )))
                }
            };
            if self.unconfirmed.swap(false, Ordering::SeqCst) {
                tracing::warn!(
                    event = "outbox_unconfirmed",
                    "staged messages were numbered and committed locally, but the synchronous standby did not confirm"
                );
            }
            match numbered {
                Ok(0) => return,
                Ok(n) => {
                    self.shared.tail_wake.notify_one();
                    tracing::debug!(
                        event = "outbox_numbered",
                        count = n,
                        "numbered staged messages"
                    );
                }
                Err(e) => {
                    tracing::warn!(event = "outbox_failed", error = %e, "could not number staged messages; will retry");
                    self.after_error(&e);
                    return;
                }
            }
        }
    }

    /// One transaction: take the counter, take up to a group of committed staged messages,
    /// append them, delete them, COMMIT. A message the database refuses moves to
    /// `seqcast.outbox_failed`. Returns how many were numbered or moved.
    async fn number_staged(&mut self) -> Result<usize, StoreError> {
        let limit = i64::try_from(self.max_group_events).unwrap_or(4096);
        let Some((client, statements)) = &mut self.client else {
            return Err(StoreError::Unavailable("no connection".to_owned()));
        };
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute(
            "SELECT head FROM seqcast.counter WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await
        .map_err(pg_error)?;
        let rows = tx
            .query(
                "SELECT outbox_id, channel, request_id, message_id, data FROM seqcast.outbox \
                 ORDER BY outbox_id LIMIT $1 FOR UPDATE SKIP LOCKED",
                &[&limit],
            )
            .await
            .map_err(pg_error)?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut good: Vec<(i64, NewEvent)> = Vec::with_capacity(rows.len());
        let mut bad: Vec<(i64, String)> = Vec::new();
        for row in &rows {
            let id: i64 = row.get(0);
            ids.push(id);
            match staged_event(
                row.get(1),
                row.get(2),
                row.get(3),
                row.get(4),
                self.max_message_bytes,
            ) {
                Ok(e) => good.push((id, e)),
                Err(why) => bad.push((id, why)),
            }
        }
        let mut numbered = 0;
        let mut newest = 0;
        // All of them in one call (one counter update); only if the database refuses one,
        // one call per message under a savepoint, so it cannot hold the others back.
        tx.batch_execute("SAVEPOINT staged")
            .await
            .map_err(pg_error)?;
        let all = tx
            .query(
                &statements.append,
                &[
                    &good
                        .iter()
                        .map(|(_, e)| e.key.channel().as_str())
                        .collect::<Vec<_>>(),
                    &good
                        .iter()
                        .map(|(_, e)| e.key.request_id().as_str())
                        .collect::<Vec<_>>(),
                    &good
                        .iter()
                        .map(|(_, e)| e.message_id.as_str())
                        .collect::<Vec<_>>(),
                    &good
                        .iter()
                        .map(|(_, e)| e.data.as_str())
                        .collect::<Vec<_>>(),
                ],
            )
            .await;
        let mut count = |rows: &[tokio_postgres::Row]| {
            for row in rows {
                if !row.get::<_, bool>(4) {
                    numbered += 1;
                    newest = newest.max(row.get::<_, i64>(0));
                }
            }
        };
        match all {
            Ok(rows) => count(&rows),
            Err(e) => {
                let err = pg_error(e);
                if !matches!(err, StoreError::Rejected(_)) {
                    return Err(err);
                }
                tx.batch_execute("ROLLBACK TO staged")
                    .await
                    .map_err(pg_error)?;
                for (id, event) in &good {
                    tx.batch_execute("SAVEPOINT staged")
                        .await
                        .map_err(pg_error)?;
                    let result = tx
                        .query(
                            &statements.append,
                            &[
                                &vec![event.key.channel().as_str()],
                                &vec![event.key.request_id().as_str()],
                                &vec![event.message_id.as_str()],
                                &vec![event.data.as_str()],
                            ],
                        )
                        .await;
                    match result {
                        Ok(rows) => {
                            tx.batch_execute("RELEASE staged").await.map_err(pg_error)?;
                            count(&rows);
                        }
                        Err(e) => {
                            let err = pg_error(e);
                            if !matches!(err, StoreError::Rejected(_)) {
                                return Err(err);
                            }
                            tx.batch_execute("ROLLBACK TO staged")
                                .await
                                .map_err(pg_error)?;
                            bad.push((*id, err.to_string()));
                        }
                    }
                }
            }
        }
        for (id, why) in &bad {
            tx.execute(
                "INSERT INTO seqcast.outbox_failed \
                     (outbox_id, channel, request_id, message_id, data, staged_at, error) \
                 SELECT outbox_id, channel, request_id, message_id, data, staged_at, $2 \
                   FROM seqcast.outbox WHERE outbox_id = $1",
                &[id, why],
            )
            .await
            .map_err(pg_error)?;
            tracing::warn!(event = "outbox_refused", outbox_id = id, error = %why, "a staged message was refused; kept in seqcast.outbox_failed");
        }
        tx.execute(
            "DELETE FROM seqcast.outbox WHERE outbox_id = ANY($1)",
            &[&ids],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        if numbered > 0 {
            self.shared
                .writer
                .count_commit(usize::try_from(numbered).unwrap_or(usize::MAX));
            let newest = u64::try_from(newest).unwrap_or(0);
            self.shared.seen_head.fetch_max(newest, Ordering::AcqRel);
            self.last_committed = self.last_committed.max(newest);
        }
        Ok(ids.len())
    }
}

/// A staged row as an event, with the HTTP API's validation.
fn staged_event(
    channel: &str,
    request_id: &str,
    message_id: &str,
    data: &str,
    max_bytes: Option<usize>,
) -> Result<NewEvent, String> {
    if let Some(limit) = max_bytes.filter(|l| data.len() > *l) {
        return Err(format!(
            "data is {} bytes, over the limit of {limit} (max_message_bytes)",
            data.len()
        ));
    }
    let channel = Channel::parse(channel).map_err(|e| e.to_string())?;
    let request_id = RequestId::parse(request_id).map_err(|e| e.to_string())?;
    let message_id = MessageId::parse(message_id).map_err(|e| e.to_string())?;
    Ok(NewEvent {
        key: SubscriptionKey::new(channel, request_id),
        message_id,
        data: data.to_owned(),
    })
}

/// A command's events with the numbers `append_events` returned (and whether each was a retry).
fn decode(
    events: &[NewEvent],
    rows: &[tokio_postgres::Row],
) -> Result<Vec<(CommittedEvent, bool)>, StoreError> {
    if rows.len() != events.len() {
        return Err(StoreError::Corrupt(format!(
            "append_events returned {} rows for {} events",
            rows.len(),
            events.len()
        )));
    }
    events
        .iter()
        .zip(rows)
        .map(|(e, row)| {
            Ok((
                CommittedEvent {
                    sequence_number: pg_u64(row.get(0), "sequence_number")?,
                    // Never NULL while pruning holds the counter lock; if it ever is, an
                    // error for this group, not a panic of the writer task.
                    stream_sequence: pg_u64(
                        row.get::<_, Option<i64>>(1).ok_or_else(|| {
                            StoreError::Corrupt(format!(
                                "append_events gave message {} no stream position",
                                e.message_id.as_str()
                            ))
                        })?,
                        "stream_sequence",
                    )?,
                    key: e.key.clone(),
                    message_id: e.message_id.clone(),
                    timestamp_ms: pg_u64(row.get(3), "timestamp_ms")?,
                    data: e.data.clone(),
                    replaced: row.get(2),
                },
                row.get(4),
            ))
        })
        .collect()
}

/// The body of one prune step, in its own transaction.
async fn prune_step(
    client: &mut Client,
    below: u64,
    max_events: usize,
) -> Result<PruneReport, StoreError> {
    let tx = client.transaction().await.map_err(pg_error)?;
    // The counter row's lock, as every append takes it first: no append (on any node) runs
    // between this step's statements, so an upsert never finds its row half-deleted (a NULL
    // position, or an event committed without its row that every tail would stop on).
    let head: i64 = tx
        .query_one(
            "SELECT head FROM seqcast.counter WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    let head = pg_u64(head, "head")?;
    let wanted = pg_int(below.min(head.saturating_add(1)));
    // The floor row first (it only rises), in the same transaction as the deletes.
    let floor: i64 = tx
        .query_one(
            "UPDATE seqcast.retention SET floor = GREATEST(floor, $1) WHERE id = 1 RETURNING floor",
            &[&wanted],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    let limit = i64::try_from(max_events).unwrap_or(i64::MAX);
    let step_end: Option<i64> = if max_events == 0 {
        None
    } else {
        tx.query_one(
            "SELECT MAX(sequence_number) FROM (SELECT sequence_number FROM seqcast.events \
             WHERE sequence_number < $1 ORDER BY sequence_number LIMIT $2) x",
            &[&floor, &limit],
        )
        .await
        .map_err(pg_error)?
        .get(0)
    };
    let mut deleted = 0;
    if let Some(end) = step_end {
        // The rows whose last event goes; each stream keeps the highest position removed, so
        // its next row's position never goes back.
        tx.execute(
            "WITH gone AS ( \
                 DELETE FROM seqcast.stream_rows r USING seqcast.events e \
                 WHERE e.sequence_number <= $1 AND r.stream_id = e.stream_id \
                   AND r.message_id = e.message_id AND r.last_sequence <= $1 \
                 RETURNING r.stream_id, r.stream_sequence) \
             UPDATE seqcast.streams s SET pruned_position = GREATEST(s.pruned_position, g.top) \
             FROM (SELECT stream_id, MAX(stream_sequence) AS top FROM gone GROUP BY stream_id) g \
             WHERE s.stream_id = g.stream_id",
            &[&end],
        )
        .await
        .map_err(pg_error)?;
        deleted = tx
            .execute(
                "DELETE FROM seqcast.events WHERE sequence_number <= $1",
                &[&end],
            )
            .await
            .map_err(pg_error)?;
    }
    let remaining: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM seqcast.events WHERE sequence_number < $1)",
            &[&floor],
        )
        .await
        .map_err(pg_error)?
        .get(0);
    tx.commit().await.map_err(pg_error)?;
    Ok(PruneReport {
        floor: pg_u64(floor, "retention floor")?,
        deleted,
        done: !remaining,
    })
}
