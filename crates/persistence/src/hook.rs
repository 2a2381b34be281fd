//! What a backend tells the server after each commit, and the one rule for when that fails.
//!
//! Every backend hands each committed transaction's new events to its [`CommitHook`] in
//! sequence order, before any publisher of that transaction is answered (on PostgreSQL the
//! node's ordered tail does, for every node's commits). The hook's answer decides:
//! `Ok` — the publishers are answered with their numbers; `Err` (or a panic, which counts as
//! one) — the events are committed but could not be delivered, so the backend stops taking
//! writes: the waiting publishers and every later append get [`StoreError::Stopped`]. What the
//! process then does (the server stops it) is the hook owner's decision, not the backend's.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use crate::error::StoreError;
use crate::event::CommittedEvent;

/// Called after each commit with every new event of it, in sequence order, before any
/// publisher of it is answered. The server fans out from here, which keeps live delivery in
/// commit (= number) order.
///
/// It must not block: the next transaction (or the tail's next read) waits for it. Returning
/// `Err` stops the backend's writes for good (see the module docs).
pub type CommitHook = Box<dyn FnMut(&[CommittedEvent]) -> Result<(), HookError> + Send + 'static>;

/// Called after each committed group with the number of new events in it and how long its
/// transaction took, BEGIN to COMMIT (the fsync included). For metrics; must be quick.
pub type CommitObserver = Box<dyn Fn(usize, Duration) + Send + Sync>;

/// Why a [`CommitHook`] could not take committed events (for the server: the events would
/// leave a hole in what it delivers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HookError(String);

impl HookError {
    /// A hook failure, with the reason.
    pub fn new(reason: impl Into<String>) -> Self {
        HookError(reason.into())
    }
}

/// Hands `events` to `hook`; a panic counts as an `Err`. The one place a backend calls its hook.
pub(crate) fn deliver(hook: &mut CommitHook, events: &[CommittedEvent]) -> Result<(), HookError> {
    match catch_unwind(AssertUnwindSafe(|| hook(events))) {
        Ok(result) => result,
        Err(_) => Err(HookError::new("the commit hook panicked")),
    }
}

/// The error a backend answers with once its hook failed: the writer takes no more writes.
pub(crate) fn stopped(failure: &HookError) -> StoreError {
    StoreError::Stopped(format!(
        "committed events could not be delivered ({failure}); this writer takes no more writes"
    ))
}

/// Logs a hook failure once, where the backend stops.
pub(crate) fn log_failure(failure: &HookError, events: usize) {
    tracing::error!(
        event = "commit_hook_failed",
        error = %failure,
        events,
        "the commit hook refused committed events: the store takes no more writes"
    );
}
