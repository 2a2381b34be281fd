//! The writer shell both database backends share (the actor of "Actors with Tokio").
//!
//! Publishers send [`Command`]s over a bounded queue, each with its own oneshot reply; the
//! handle ([`WriterHandle`]) counts them and turns a reply dropped unanswered into
//! [`StoreError::Closed`]. The backend's loop (SQLite: a thread; PostgreSQL: a task) takes the
//! first command and, with [`CommandQueue::fill`], every command already queued, up to a cap,
//! into one [`Group`]: its appends go into one transaction — the backend's own "commit this
//! group" step — and are answered in order through [`Replies`]; its prunes and probes run after
//! it ([`AfterGroup`]). A shutdown closes the queue; what was queued before it is still
//! written, and the shutdown is answered once the backend has closed its database
//! ([`CommandQueue::finish`]). Once the commit hook failed ([`WriterShared::stop`]), every
//! append still queued and every command sent later is answered [`StoreError::Stopped`], by the
//! shell.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};

use crate::error::StoreError;
use crate::event::{CommittedEvent, NewEvent, PruneReport};
use crate::health::{TailHealth, WriterHealth, WriterStats};
use crate::hook::{self, HookError};
use crate::store::{BoxFuture, EventWriter};

/// Default bound of the writer's command queue.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;
/// Default cap on the events one group-commit transaction takes.
pub const DEFAULT_MAX_GROUP_EVENTS: usize = 4096;

/// How one append ended.
pub(crate) type Outcome = Result<Vec<CommittedEvent>, StoreError>;

/// A backend whose writer runs on this shell: its handle, and what only the backend knows about
/// its health. The shell implements [`EventWriter`] for it.
pub(crate) trait ActorWriter: std::fmt::Debug + Send + Sync + 'static {
    /// The handle every clone of the writer feeds.
    fn handle(&self) -> &WriterHandle;

    /// Why the writer stopped, beyond what the shell sees (SQLite: its thread ended).
    fn stopped(&self) -> Option<String> {
        None
    }

    /// Why writes fail right now for a reason of the database's ([`WriterHealth::unwritable`]).
    fn unwritable(&self) -> Option<String>;

    /// PostgreSQL: the node's tail.
    fn tail(&self) -> Option<TailHealth> {
        None
    }
}

impl<W: ActorWriter> EventWriter for W {
    fn append(&self, events: Vec<NewEvent>) -> BoxFuture<'_, Outcome> {
        Box::pin(self.handle().append(events))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.handle().close())
    }

    fn health(&self) -> WriterHealth {
        let handle = self.handle();
        WriterHealth {
            stopped: handle.stopped().or_else(|| ActorWriter::stopped(self)),
            unwritable: self.unwritable(),
            stats: handle.shared.stats(),
            queued_commands: Some(handle.queued_commands()),
            tail: self.tail(),
        }
    }

    /// In the writer's queue like any command.
    fn probe(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.handle().probe())
    }

    fn prune(
        &self,
        below: u64,
        max_events: usize,
    ) -> BoxFuture<'_, Result<PruneReport, StoreError>> {
        Box::pin(self.handle().prune(below, max_events))
    }
}

/// One outcome per append of a group that failed as a whole: the append's own error where it had
/// one, else `cause`.
pub(crate) fn failed(own: Vec<Option<StoreError>>, cause: &StoreError) -> Vec<Outcome> {
    own.into_iter()
        .map(|own| Err(own.unwrap_or_else(|| cause.clone())))
        .collect()
}

/// What the writer is asked to do.
pub(crate) enum Command {
    /// Persist `events` as one all-or-nothing unit.
    Append {
        events: Vec<NewEvent>,
        reply: oneshot::Sender<Outcome>,
    },
    /// Raise the retention floor and delete a step of events below it, in its own short
    /// transaction after the group it arrived with.
    Prune {
        below: u64,
        max_events: usize,
        reply: oneshot::Sender<Result<PruneReport, StoreError>>,
    },
    /// Try a write that changes nothing, to learn whether a failing database takes writes again.
    Probe {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Finish what is queued, close the database, then answer.
    Shutdown { reply: oneshot::Sender<()> },
}

/// The counters and the stop state, shared by the handles and the backend's loop.
#[derive(Debug, Default)]
pub(crate) struct WriterShared {
    /// Append commands pushed into the queue (counted once the push is done, so a sender that
    /// holds a slot but has not yet pushed is not counted).
    queued: AtomicU64,
    received: AtomicU64,
    committed: AtomicU64,
    failed: AtomicU64,
    events: AtomicU64,
    /// A reply was dropped unanswered: the loop died (or is dying) under it.
    lost: AtomicBool,
    /// Set when the commit hook failed: the writer takes no more writes.
    stopped: OnceLock<StoreError>,
}

impl WriterShared {
    /// One committed transaction with `events` new events.
    pub(crate) fn count_commit(&self, events: usize) {
        self.committed.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(events as u64, Ordering::Relaxed);
    }

    /// One transaction that failed as a whole.
    pub(crate) fn count_failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// The commit hook refused committed events: from now on every append is refused with the
    /// returned error (which the caller also answers the group's publishers with).
    pub(crate) fn stop(&self, failure: &HookError, events: usize) -> StoreError {
        hook::log_failure(failure, events);
        self.stopped.get_or_init(|| hook::stopped(failure)).clone()
    }

    /// The error every command gets once the hook failed.
    pub(crate) fn stopped(&self) -> Option<StoreError> {
        self.stopped.get().cloned()
    }

    pub(crate) fn stats(&self) -> WriterStats {
        WriterStats {
            commands_received: self.received.load(Ordering::Relaxed),
            transactions_committed: self.committed.load(Ordering::Relaxed),
            transactions_failed: self.failed.load(Ordering::Relaxed),
            events_committed: self.events.load(Ordering::Relaxed),
        }
    }
}

/// The handle: cheap to clone, every clone feeds the same loop.
#[derive(Debug, Clone)]
pub(crate) struct WriterHandle {
    commands: mpsc::Sender<Command>,
    shared: Arc<WriterShared>,
}

impl WriterHandle {
    /// A queue of `capacity` (at least 1) commands; the loop takes the [`CommandQueue`].
    pub(crate) fn new(capacity: usize, max_group_events: usize) -> (WriterHandle, CommandQueue) {
        let (commands, receiver) = mpsc::channel(capacity.max(1));
        let shared = Arc::new(WriterShared::default());
        let queue = CommandQueue {
            receiver,
            shared: Arc::clone(&shared),
            max_group_events: max_group_events.max(1),
            shutdown: Vec::new(),
        };
        (WriterHandle { commands, shared }, queue)
    }

    pub(crate) fn shared(&self) -> &Arc<WriterShared> {
        &self.shared
    }

    /// Queues an append and waits for its answer. Waits while the bounded queue is full: that
    /// is the back-pressure on publishers.
    pub(crate) async fn append(&self, events: Vec<NewEvent>) -> Outcome {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(stopped) = self.shared.stopped() {
            return Err(stopped);
        }
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Append { events, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        self.shared.queued.fetch_add(1, Ordering::Release);
        answer.await.map_err(|_| {
            // Only a loop that died drops a reply unanswered (shutdown drains the queue).
            self.shared.lost.store(true, Ordering::Release);
            StoreError::Closed
        })?
    }

    pub(crate) async fn prune(
        &self,
        below: u64,
        max_events: usize,
    ) -> Result<PruneReport, StoreError> {
        self.request(|reply| Command::Prune {
            below,
            max_events,
            reply,
        })
        .await
    }

    pub(crate) async fn probe(&self) -> Result<(), StoreError> {
        self.request(|reply| Command::Probe { reply }).await
    }

    /// Sends the command `make` builds around a reply, unless the writer stopped, and waits.
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        if let Some(stopped) = self.shared.stopped() {
            return Err(stopped);
        }
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Finishes every command already queued, then returns once the loop closed the database.
    pub(crate) async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self
            .commands
            .send(Command::Shutdown { reply })
            .await
            .is_ok()
        {
            // An error means the loop is already gone, which is what we want.
            let _ = done.await;
        }
    }

    /// [`WriterHandle::close`] for a caller outside any async runtime.
    pub(crate) fn blocking_close(&self) {
        let (reply, done) = oneshot::channel();
        if self
            .commands
            .blocking_send(Command::Shutdown { reply })
            .is_ok()
        {
            let _ = done.blocking_recv();
        }
    }

    /// Commands waiting in the queue (pushed, not yet taken by the loop).
    ///
    /// Counted from completed pushes rather than from the channel's free slots: a sender can
    /// hold a slot before its push lands, and counting that one would let a caller believe a
    /// command is queued (and queue the next one) before it really is.
    pub(crate) fn queued_commands(&self) -> usize {
        let received = self.shared.received.load(Ordering::Acquire);
        let queued = self.shared.queued.load(Ordering::Acquire);
        usize::try_from(queued.saturating_sub(received)).unwrap_or(usize::MAX)
    }

    /// Why the writer takes no more appends, once it does not: closed, its loop died, or its
    /// commit hook failed.
    pub(crate) fn stopped(&self) -> Option<String> {
        if let Some(stopped) = self.shared.stopped() {
            return Some(stopped.to_string());
        }
        (self.commands.is_closed() || self.shared.lost.load(Ordering::Acquire))
            .then(|| "the database writer has stopped".to_owned())
    }
}

/// The loop's end of the queue.
#[derive(Debug)]
pub(crate) struct CommandQueue {
    receiver: mpsc::Receiver<Command>,
    shared: Arc<WriterShared>,
    max_group_events: usize,
    /// Shutdowns asked for; answered by [`CommandQueue::finish`].
    shutdown: Vec<oneshot::Sender<()>>,
}

/// One group: the appends that go into one transaction, in arrival order, and what runs after.
#[derive(Default)]
pub(crate) struct Group {
    /// Each append's events, in arrival order.
    pub(crate) appends: Vec<Vec<NewEvent>>,
    /// Their replies, in the same order.
    pub(crate) replies: Replies,
    /// Prunes and probes, run after the group's transaction.
    pub(crate) after: Vec<AfterGroup>,
    events: usize,
}

/// The replies of a group's appends, answered in order.
#[derive(Default)]
pub(crate) struct Replies(Vec<oneshot::Sender<Outcome>>);

impl Replies {
    /// Answers each append with its outcome, in order (one outcome per append). A publisher
    /// that stopped waiting is not an error: its write stands.
    pub(crate) fn answer(self, outcomes: impl IntoIterator<Item = Outcome>) {
        for (reply, outcome) in self.0.into_iter().zip(outcomes) {
            let _ = reply.send(outcome);
        }
    }

    /// Answers every append with `error`.
    pub(crate) fn refuse(self, error: &StoreError) {
        for reply in self.0 {
            let _ = reply.send(Err(error.clone()));
        }
    }
}

/// A command run after the group it arrived with, each in its own transaction.
pub(crate) enum AfterGroup {
    Prune(PruneStep),
    Probe(oneshot::Sender<Result<(), StoreError>>),
}

/// A prune step asked for: raise the floor to `below`, delete up to `max_events`.
pub(crate) struct PruneStep {
    pub(crate) below: u64,
    pub(crate) max_events: usize,
    reply: oneshot::Sender<Result<PruneReport, StoreError>>,
}

impl PruneStep {
    pub(crate) fn answer(self, result: Result<PruneReport, StoreError>) {
        let _ = self.reply.send(result);
    }
}

impl CommandQueue {
    /// The next command, waiting on this thread; `None` once the queue is closed and drained.
    pub(crate) fn blocking_recv(&mut self) -> Option<Command> {
        self.receiver.blocking_recv()
    }

    /// The next command; `None` once the queue is closed and drained.
    pub(crate) async fn recv(&mut self) -> Option<Command> {
        self.receiver.recv().await
    }

    /// A command already queued, if any.
    pub(crate) fn try_recv(&mut self) -> Option<Command> {
        self.receiver.try_recv().ok()
    }

    /// Nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.receiver.is_empty()
    }

    /// A group starting with `first`.
    pub(crate) fn group(&mut self, first: Command) -> Group {
        let mut group = Group::default();
        self.take(first, &mut group);
        group
    }

    /// Group commit: whatever is already queued joins the group, up to the cap on events;
    /// never waits.
    pub(crate) fn fill(&mut self, group: &mut Group) {
        while group.events < self.max_group_events {
            match self.receiver.try_recv() {
                Ok(command) => self.take(command, group),
                Err(_) => break,
            }
        }
    }

    fn take(&mut self, command: Command, group: &mut Group) {
        match command {
            Command::Append { events, reply } => {
                self.shared.received.fetch_add(1, Ordering::Release);
                if let Some(stopped) = self.shared.stopped() {
                    let _ = reply.send(Err(stopped));
                } else if events.is_empty() {
                    let _ = reply.send(Ok(Vec::new()));
                } else {
                    group.events += events.len();
                    group.appends.push(events);
                    group.replies.0.push(reply);
                }
            }
            // Refused at the handle once the writer stopped; one queued before still runs.
            Command::Prune {
                below,
                max_events,
                reply,
            } => group.after.push(AfterGroup::Prune(PruneStep {
                below,
                max_events,
                reply,
            })),
            Command::Probe { reply } => group.after.push(AfterGroup::Probe(reply)),
            Command::Shutdown { reply } => {
                // No new commands; the ones already queued are still drained and written.
                self.receiver.close();
                self.shutdown.push(reply);
            }
        }
    }

    /// The loop has stopped and closed its database: answers the shutdowns.
    pub(crate) fn finish(self) {
        for reply in self.shutdown {
            let _ = reply.send(());
        }
    }
}
