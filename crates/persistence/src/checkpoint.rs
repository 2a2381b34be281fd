//! A background WAL checkpointer, so the writer thread does not copy pages into the database
//! file (and fsync it) in the middle of answering publishers.
//!
//! SQLite's automatic checkpoint runs inside the COMMIT that crosses the threshold, on the
//! committing connection: measured on the writer it was about an eighth of its time. Here the
//! writer only nudges; this thread runs PASSIVE checkpoints on its own connection, which never
//! block the writer. The writer keeps a high automatic threshold as a backstop in case this
//! thread falls behind.

use std::path::Path;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use crate::error::StoreError;
use crate::schema::{self, ConnectionOptions};

/// Commits between two nudges.
const COMMITS_PER_CHECKPOINT: u32 = 32;
/// Events between two nudges (large batches fill the WAL faster than many small commits).
const EVENTS_PER_CHECKPOINT: usize = 2048;
/// The writer's own automatic checkpoint threshold, in bytes of WAL: only reached if this
/// thread cannot keep up.
const BACKSTOP_AUTOCHECKPOINT_BYTES: u32 = 40 << 20;

/// Sets the writer connection's automatic checkpoint to the backstop: SQLite counts it in pages,
/// and databases made by different builds have different page sizes.
pub(crate) fn set_backstop(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let page_size: u32 = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        BACKSTOP_AUTOCHECKPOINT_BYTES / page_size.max(512),
    )
}

/// Handle to the checkpointer thread; dropping it stops the thread, [`Checkpointer::stop`]
/// also waits for it.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    nudge: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    commits: u32,
    events: usize,
}

impl Checkpointer {
    /// Starts the thread `seqcast-db-checkpoint` with its own connection to `path`.
    pub(crate) fn start(path: &Path, options: ConnectionOptions) -> Result<Self, StoreError> {
        let conn = schema::open_connection(
            path,
            ConnectionOptions {
                create: false,
                ..options
            },
        )?;
        // A pending nudge is enough; more would only repeat the same work.
        let (nudge, nudged) = sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("seqcast-db-checkpoint".to_owned())
            .spawn(move || {
                while nudged.recv().is_ok() {
                    // PASSIVE: copy what no reader still needs, never wait for anyone.
                    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                        Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
                    });
                    match result {
                        Ok((wal_pages, copied)) => {
                            tracing::trace!(wal_pages, copied, "wal checkpoint");
                        }
                        // Busy or I/O trouble: the next nudge (or the writer's backstop) retries.
                        Err(err) => tracing::debug!(error = %err, "wal checkpoint failed"),
                    }
                }
                drop(conn);
            })
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start the checkpoint thread: {e}"))
            })?;
        Ok(Checkpointer {
            nudge: Some(nudge),
            thread: Some(thread),
            commits: 0,
            events: 0,
        })
    }

    /// Called after each commit of `events` events; nudges the thread every so often.
    pub(crate) fn committed(&mut self, events: usize) {
        self.commits += 1;
        self.events += events;
        if self.commits < COMMITS_PER_CHECKPOINT && self.events < EVENTS_PER_CHECKPOINT {
            return;
        }
        self.commits = 0;
        self.events = 0;
        if let Some(nudge) = &self.nudge
            && let Err(TrySendError::Disconnected(())) = nudge.try_send(())
        {
            tracing::warn!("checkpoint thread stopped; SQLite's automatic checkpoint takes over");
            self.nudge = None;
        }
    }

    /// Stops the thread and waits for it (its connection closed), so that the writer's own
    /// close is the last one and can fold the WAL back into the database file.
    pub(crate) fn stop(mut self) {
        self.nudge = None;
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("checkpoint thread panicked");
        }
    }
}
