//! The ordered tail: the only way committed events reach a node's commit hook on PostgreSQL.
//!
//! It reads the log from the last number it applied, in sequence order, and hands every event
//! to the hook — this node's commits and every other node's. Numbers are taken under the
//! counter row's lock and a transaction becomes visible before it releases that lock, so any
//! snapshot holds a dense prefix of the log: `sequence_number > applied ORDER BY
//! sequence_number` never skips a number that commits later. `LISTEN seqcast_events` only
//! wakes it; it also re-reads after every (re)connect and at least every `interval`, so a lost
//! connection or a missed notification delays nothing for longer than that.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::reader::{EVENT_COLUMNS, EVENT_JOIN, event_from_row};
use super::writer::Shared;
use super::{connect, pg_error, pg_int, within};
use crate::error::StoreError;
use crate::hook::{self, CommitHook};

/// Events read per tail query.
const TAIL_PAGE: i64 = 2_000;

pub(crate) struct Tail {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) hook: std::sync::Mutex<CommitHook>,
    pub(crate) applied: u64,
    pub(crate) shared: Arc<Shared>,
    pub(crate) interval: Duration,
    /// Client-side deadline of every statement: a half-open connection (no FIN, no RST) is
    /// given up after this long and the tail reconnects.
    pub(crate) query_deadline: Duration,
    /// When a bad event was last reported.
    pub(crate) fault_logged: Option<Instant>,
}

impl Tail {
    pub(crate) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut connected = true;
        loop {
            if *stop.borrow() {
                return;
            }
            let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
            let client = match self.connect(tx).await {
                Ok(client) => client,
                Err(e) => {
                    if connected {
                        tracing::warn!(event = "tail_disconnected", error = %e, "cannot read the log from the database; retrying");
                    }
                    connected = false;
                    self.shared.tail_connected.store(false, Ordering::Release);
                    tokio::select! {
                        _ = tokio::time::sleep(self.interval.min(Duration::from_millis(500))) => {}
                        _ = stop.changed() => return,
                    }
                    continue;
                }
            };
            if !connected {
                tracing::info!(
                    event = "tail_connected",
                    applied = self.applied,
                    "reading the log again"
                );
            }
            self.shared.tail_connected.store(true, Ordering::Release);
            let prepared = within(self.query_deadline, "preparing the tail query", async {
                client
                    .prepare(&format!(
                        "SELECT {EVENT_COLUMNS} FROM seqcast.events e {EVENT_JOIN} \
                         WHERE e.sequence_number > $1 ORDER BY e.sequence_number LIMIT $2"
                    ))
                    .await
                    .map_err(pg_error)
            })
            .await;
            let statement = match prepared {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(event = "tail_disconnected", error = %e, "cannot prepare the tail query");
                    connected = false;
                    self.shared.tail_connected.store(false, Ordering::Release);
                    continue;
                }
            };
            // Re-read on every (re)connect; then on each wake-up, and at least every interval.
            loop {
                if let Err(e) = self.read_all(&client, &statement).await {
                    if let StoreError::Stopped(_) = &e {
                        // The hook refused events: nothing more is delivered on this node.
                        return;
                    }
                    if let StoreError::Corrupt(why) = &e {
                        self.report_bad_event(why);
                        // Not a connection problem: read again after an interval (a repaired
                        // row lets it go on), on this connection.
                        tokio::select! {
                            _ = tokio::time::sleep(self.interval) => continue,
                            _ = stop.changed() => return,
                        }
                    }
                    tracing::warn!(event = "tail_disconnected", error = %e, "reading the log failed; reconnecting");
                    connected = false;
                    self.shared.tail_connected.store(false, Ordering::Release);
                    break;
                }
                if self.shared.identity_check.swap(false, Ordering::AcqRel) {
                    tracing::info!("the writer found another history: reconnecting to check");
                    break;
                }
                tokio::select! {
                    _ = self.shared.tail_wake.notified() => {}
                    note = notes.recv() => match note {
                        Some(note) => self.on_notification(&note),
                        None => {
                            tracing::warn!(event = "tail_disconnected", "the LISTEN connection closed; reconnecting");
                            connected = false;
                            self.shared.tail_connected.store(false, Ordering::Release);
                            break;
                        }
                    },
                    _ = tokio::time::sleep(self.interval) => {}
                    _ = stop.changed() => return,
                }
                while let Ok(note) = notes.try_recv() {
                    self.on_notification(&note);
                }
                if self.shared.identity_check.swap(false, Ordering::AcqRel) {
                    tracing::info!("the writer found another history: reconnecting to check");
                    break;
                }
            }
        }
    }

    async fn connect(
        &mut self,
        tx: tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>,
    ) -> Result<tokio_postgres::Client, StoreError> {
        let client = connect(&self.config, Some(tx)).await?;
        within(self.query_deadline, "LISTEN", async {
            client
                .batch_execute("LISTEN seqcast_events; LISTEN seqcast_outbox")
                .await
                .map_err(pg_error)
        })
        .await?;
        self.check_identity(&client).await?;
        Ok(client)
    }

    /// The next event cannot be read: said loudly (an error, repeated every 30 s while it
    /// lasts) and in the node's status (`/readyz` 503 with the reason), never a silent stall.
    fn report_bad_event(&mut self, why: &str) {
        let reason = format!(
            "this node's tail cannot apply the event after {}: {why}; live delivery is stopped \
             until the row is repaired",
            self.applied
        );
        let mut fault = self
            .shared
            .tail_fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let again = fault.as_deref() == Some(reason.as_str());
        if !again
            || self
                .fault_logged
                .is_none_or(|t| t.elapsed() > Duration::from_secs(30))
        {
            tracing::error!(event = "tail_bad_event", applied = self.applied, error = %why, "{reason}");
            self.fault_logged = Some(Instant::now());
        }
        *fault = Some(reason);
    }

    /// Every (re)connection checks the database's identity. Another history (a failover to
    /// another timeline, a restore) moves the node to it: the new-history hook is told, and
    /// the tail goes on from the new history's head.
    async fn check_identity(&mut self, client: &tokio_postgres::Client) -> Result<(), StoreError> {
        let (epoch, head, floor) = within(
            self.query_deadline,
            "checking the database identity",
            async {
                let epoch = super::schema::read_epoch(client).await?;
                let row = client
                    .query_one(
                        "SELECT c.head, r.floor FROM seqcast.counter c, seqcast.retention r \
                     WHERE c.id = 1 AND r.id = 1",
                        &[],
                    )
                    .await
                    .map_err(pg_error)?;
                Ok((epoch, row.get::<_, i64>(0), row.get::<_, i64>(1)))
            },
        )
        .await?;
        let serving = self
            .shared
            .epoch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if epoch == serving {
            return Ok(());
        }
        let head = super::pg_u64(head, "head")?;
        let floor = super::pg_u64(floor, "retention floor")?;
        let mut moved = self
            .shared
            .new_history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(moved) = moved.as_mut() else {
            return Err(StoreError::Unavailable(format!(
                "the database is another history now (epoch {epoch}, this node serves {serving}); restart the node"
            )));
        };
        tracing::warn!(
            event = "tail_new_history",
            old_epoch = %serving,
            epoch = %epoch,
            applied = self.applied,
            head,
            "the database is another history now: moving this node to it"
        );
        moved(&epoch, head, floor);
        self.applied = head;
        self.shared.seen_head.store(head, Ordering::Release);
        self.shared.applied.send_replace(head);
        *self
            .shared
            .epoch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = epoch;
        Ok(())
    }

    fn clear_fault(&mut self) {
        let fault = self
            .shared
            .tail_fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if fault.is_some() {
            self.fault_logged = None;
            tracing::info!(
                event = "tail_recovered",
                applied = self.applied,
                "the tail applies the log again"
            );
        }
    }

    fn on_notification(&self, note: &tokio_postgres::Notification) {
        match note.channel() {
            "seqcast_outbox" => self.shared.outbox_wake.notify_one(),
            _ => {
                // The payload is the committed range's last number.
                if let Ok(head) = note.payload().parse::<u64>() {
                    self.shared.seen_head.fetch_max(head, Ordering::AcqRel);
                }
            }
        }
    }

    /// Reads and applies everything committed after `applied`.
    async fn read_all(
        &mut self,
        client: &tokio_postgres::Client,
        statement: &tokio_postgres::Statement,
    ) -> Result<(), StoreError> {
        loop {
            let rows = within(self.query_deadline, "reading the log", async {
                client
                    .query(statement, &[&pg_int(self.applied), &TAIL_PAGE])
                    .await
                    .map_err(pg_error)
            })
            .await?;
            *self
                .shared
                .last_tail_read
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
            if rows.is_empty() {
                self.clear_fault();
                return Ok(());
            }
            let events = rows
                .iter()
                .map(|r| event_from_row(r, 0))
                .collect::<Result<Vec<_>, _>>()?;
            let next = events[0].sequence_number;
            if next != self.applied + 1 {
                // The numbers in between were committed before `next` (numbers are dense in
                // commit order), so only pruning can have removed them. The retention floor
                // only rises and nothing at or above it is ever deleted: if it is above
                // `next - 1` now, the gap is pruned history — skip it (the node's
                // subscribers that needed it are told). Anything else is a hole: the hook
                // refuses it and the server stops rather than serve one.
                let floor = within(self.query_deadline, "reading the retention floor", async {
                    client
                        .query_one("SELECT floor FROM seqcast.retention WHERE id = 1", &[])
                        .await
                        .map(|r| r.get::<_, i64>(0))
                        .map_err(pg_error)
                })
                .await?;
                let floor = u64::try_from(floor).unwrap_or(0);
                let mut skipped = self
                    .shared
                    .pruned_gap
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match skipped.as_mut() {
                    Some(skip) if floor >= next => {
                        tracing::warn!(
                            event = "tail_skipped_pruned",
                            applied = self.applied,
                            next,
                            retention_floor = floor,
                            "this node fell behind the retention floor (paused or slow while \
                             another node pruned): skipping to the floor; its subscribers that \
                             needed the pruned part are told"
                        );
                        skip(self.applied, next);
                    }
                    _ => tracing::error!(
                        event = "tail_gap",
                        applied = self.applied,
                        next,
                        retention_floor = floor,
                        "the log no longer holds the next number this node needs"
                    ),
                }
            }
            let mut hook = self
                .hook
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let delivered = hook::deliver(&mut hook, &events);
            drop(hook);
            if let Err(failure) = delivered {
                // The node takes no more writes; the publishers waiting for these numbers are
                // woken to be answered with the error.
                let error = self.shared.writer.stop(&failure, events.len());
                self.shared.applied.send_modify(|_| {});
                return Err(error);
            }
            let last = events[events.len() - 1].sequence_number;
            self.applied = last;
            self.shared.seen_head.fetch_max(last, Ordering::AcqRel);
            self.shared.applied.send_replace(last);
            self.clear_fault();
            if i64::try_from(rows.len()).unwrap_or(i64::MAX) < TAIL_PAGE {
                return Ok(());
            }
        }
    }
}
