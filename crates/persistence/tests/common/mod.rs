//! Helpers shared by the persistence tests: event builders, a recording hook, a lock "gate"
//! that holds the writer at BEGIN, and raw-SQL fixtures.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;
use seqcast_persistence::{
    CommitHook, CommittedEvent, DbWriter, EventFilter, EventReader, EventWriter, NewEvent,
    StoreConfig, StoreError, StoreInfo, Synchronous,
};
use seqcast_protocol::{MessageId, SubscriptionKey};

pub fn key(s: &str) -> SubscriptionKey {
    SubscriptionKey::parse(s).unwrap()
}

pub fn event(key_str: &str, message_id: &str, data: &str) -> NewEvent {
    NewEvent {
        key: key(key_str),
        message_id: MessageId::new(message_id).unwrap(),
        data: data.to_owned(),
    }
}

/// The events of `filter` after `since`, up to the head the reader sees: one page of the log
/// (at least one event, at most `limit` and about `max_bytes`).
pub fn log_after(
    reader: &(impl EventReader + ?Sized),
    since: u64,
    limit: usize,
    filter: EventFilter,
    max_bytes: usize,
) -> Result<Vec<CommittedEvent>, StoreError> {
    let head = reader.head()?;
    Ok(reader.page(&filter, since, head, limit, max_bytes)?.events)
}

/// Every hook call, in order: one `Vec` per committed transaction.
#[derive(Clone, Default)]
pub struct HookLog(Arc<Mutex<Vec<Vec<CommittedEvent>>>>);

impl HookLog {
    pub fn hook(&self) -> CommitHook {
        let calls = Arc::clone(&self.0);
        Box::new(move |events: &[CommittedEvent]| {
            calls.lock().unwrap().push(events.to_vec());
            Ok(())
        })
    }

    pub fn calls(&self) -> Vec<Vec<CommittedEvent>> {
        self.0.lock().unwrap().clone()
    }

    pub fn call_count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn events(&self) -> Vec<CommittedEvent> {
        self.calls().into_iter().flatten().collect()
    }
}

pub fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("seqcast.db")
}

/// A store in a fresh temporary directory. NORMAL sync unless a test is about durability:
/// these tests check logic, and the machine is shared.
pub fn config(dir: &tempfile::TempDir) -> StoreConfig {
    StoreConfig {
        synchronous: Synchronous::Normal,
        ..StoreConfig::new(db_path(dir))
    }
}

pub fn open(config: StoreConfig) -> (DbWriter, StoreInfo, HookLog) {
    let log = HookLog::default();
    let (writer, info) = DbWriter::open(config, log.hook()).unwrap();
    (writer, info, log)
}

/// Another connection holding the database's write lock, so the writer waits at BEGIN.
pub struct LockGate(Connection);

impl LockGate {
    pub fn hold(path: &Path) -> LockGate {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        LockGate(conn)
    }

    pub fn release(self) {
        self.0.execute_batch("COMMIT").unwrap();
    }
}

/// Waits (without sleeping) until the writer has `n` append commands taken or queued.
pub async fn until_commands_arrived(writer: &DbWriter, n: u64) {
    loop {
        let arrived = {
            let health = writer.health();
            health.stats.commands_received + health.queued_commands.unwrap_or(0) as u64
        };
        if arrived >= n {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// Inserts rows the way a (possibly buggy) old writer would have: raw SQL, chosen numbers and
/// timestamps. `rows` = (channel, request_id, message_id, stream_sequence, timestamp_ms); each
/// gets the next sequence number from AUTOINCREMENT.
pub fn insert_raw(path: &Path, rows: &[(&str, &str, &str, i64, i64)]) {
    let mut conn = Connection::open(path).unwrap();
    let tx = conn.transaction().unwrap();
    // Schema 4 stores each event's position with it; older schemas only in stream_rows.
    let events_have_positions: bool = tx
        .query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('events') WHERE name = 'stream_sequence'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    for (i, (channel, request_id, message_id, stream_sequence, ts)) in rows.iter().enumerate() {
        tx.execute(
            "INSERT OR IGNORE INTO streams (channel, request_id) VALUES (?1, ?2)",
            rusqlite::params![channel, request_id],
        )
        .unwrap();
        let stream_id: i64 = tx
            .query_row(
                "SELECT stream_id FROM streams WHERE channel = ?1 AND request_id = ?2",
                rusqlite::params![channel, request_id],
                |r| r.get(0),
            )
            .unwrap();
        let data = format!("{{\"n\":{i}}}");
        if events_have_positions {
            tx.execute(
                "INSERT INTO events (stream_id, message_id, timestamp_ms, data, stream_sequence)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![stream_id, message_id, ts, data, stream_sequence],
            )
            .unwrap();
        } else {
            tx.execute(
                "INSERT INTO events (stream_id, message_id, timestamp_ms, data) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![stream_id, message_id, ts, data],
            )
            .unwrap();
        }
        let seq = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO stream_rows (stream_id, message_id, stream_sequence, first_sequence, last_sequence)
             VALUES (?1, ?2, ?3, ?4, ?4)",
            rusqlite::params![stream_id, message_id, stream_sequence, seq],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

/// `chattr +i` on files, undone on drop. Root ignores permission bits, but not the immutable
/// flag, so this is how a test makes a file really read-only here.
pub struct Immutable(Vec<PathBuf>);

impl Immutable {
    /// Sets the flag on `paths`; `None` (after a loud message) where the file system or the
    /// user cannot, and CI fails instead.
    pub fn set(paths: &[PathBuf]) -> Option<Immutable> {
        let mut guard = Immutable(Vec::new());
        for path in paths {
            let ok = Command::new("chattr")
                .arg("+i")
                .arg(path)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let msg = format!(
                    "`chattr +i {}` failed: this test needs root and a file system with the \
                     immutable flag (ext4, xfs, btrfs); NOT RUN",
                    path.display()
                );
                assert!(std::env::var_os("CI").is_none(), "{msg}");
                eprintln!("!!! {msg}");
                return None;
            }
            guard.0.push(path.clone());
        }
        Some(guard)
    }

    pub fn clear(self) {}
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(path).status();
        }
    }
}

pub fn wal_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

pub const SHORT_BUSY: Duration = Duration::from_millis(50);
