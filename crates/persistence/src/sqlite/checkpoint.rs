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

use super::schema::{self, ConnectionOptions};
use crate::error::StoreError;

/// The thread is nudged when any of these is reached since the last nudge. Events, not commits,
/// are the main measure: the WAL grows with the pages a commit dirties, which is about one leaf
/// per stream tree per event when many streams are busy, but only a few pages for a lone
/// publisher's commit of one event — checkpointing (and syncing the database file) every 32 of
/// those adds a database `fsync` every few milliseconds for a WAL of a few hundred KiB. 1,024
/// events is ~32 group commits of a busy server (a WAL of ~4 MiB with 1 KiB pages).
const EVENTS_PER_CHECKPOINT: usize = 1024;
/// Commits between two nudges, for many small commits (a lone publisher: a WAL of a few MiB).
const COMMITS_PER_CHECKPOINT: u32 = 512;
/// Event data between two nudges, for large messages (each a run of overflow pages).
const DATA_BYTES_PER_CHECKPOINT: usize = 2 << 20;
/// The writer's own automatic checkpoint, in bytes of WAL: where the WAL starts over. This
/// thread's checkpoints are PASSIVE and the writer keeps committing while they run, so under a
/// steady load they never find the whole WAL copied and the WAL never restarts on their account;
/// the writer's checkpoint at this size copies the little they have not, and its next commit
/// starts the WAL from the beginning. Equal to the size a restarting WAL is cut back to, so the
/// file keeps one size: a WAL that grows again after each cut costs an inode write at every
/// `fsync` (ext4; a lone publisher at SQLite FULL lost ~15 % to it with a 40 MiB threshold).
const BACKSTOP_AUTOCHECKPOINT_BYTES: u32 = schema::WAL_SIZE_LIMIT_BYTES as u32;

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
    data_bytes: usize,
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
            data_bytes: 0,
        })
    }

    /// Called after each commit of `events` events carrying `data_bytes` of data; nudges the
    /// thread every so often.
    pub(crate) fn committed(&mut self, events: usize, data_bytes: usize) {
        self.commits += 1;
        self.events += events;
        self.data_bytes += data_bytes;
        if self.commits < COMMITS_PER_CHECKPOINT
            && self.events < EVENTS_PER_CHECKPOINT
            && self.data_bytes < DATA_BYTES_PER_CHECKPOINT
        {
            return;
        }
        self.commits = 0;
        self.events = 0;
        self.data_bytes = 0;
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
