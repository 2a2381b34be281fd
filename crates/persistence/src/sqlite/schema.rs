//! Connections, PRAGMAs and the embedded migrations.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::config::{DEFAULT_BUSY_TIMEOUT, Synchronous};
use super::error::stored_u64;
use crate::error::StoreError;
use crate::maintenance::{AppliedMigration, MigrationReport};

/// One schema change, applied once, in version order, inside its own transaction.
#[derive(Debug, Clone, Copy)]
struct Migration {
    version: u32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration this build knows, oldest first. Append only: an applied migration is never
/// edited, because databases in the field already ran it.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../../migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "stream_rows_by_position",
        sql: include_str!("../../migrations/0002_stream_rows_by_position.sql"),
    },
    Migration {
        version: 3,
        name: "log_retention",
        sql: include_str!("../../migrations/0003_log_retention.sql"),
    },
    Migration {
        version: 4,
        name: "event_positions",
        sql: include_str!("../../migrations/0004_event_positions.sql"),
    },
    Migration {
        version: 5,
        name: "pruned_positions",
        sql: include_str!("../../migrations/0005_pruned_positions.sql"),
    },
];

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 5;

/// Options for one connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionOptions {
    pub synchronous: Synchronous,
    pub busy_timeout: Duration,
    /// Create the file when missing (writer, migrate); readers never create.
    pub create: bool,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            synchronous: Synchronous::Full,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            create: true,
        }
    }
}

/// The page size of a database this build creates (an existing file keeps the size it was made
/// with). The writer's cost is mostly the pages it dirties per commit: every dirty page is
/// written to the WAL whole and checksummed. With many busy streams in one group, each event
/// dirties about one leaf of each stream-ordered tree (`events_by_stream`, `stream_rows`), so the
/// page size is the bytes written per event; 1 KiB pages write a quarter of what the 4 KiB
/// default does. Measured in docs/benchmarks.md ("Page size"): 64 appenders over 64 streams,
/// SQLite FULL, +45 % events/s; large payloads pay for it (1 MiB messages about a quarter slower,
/// more overflow pages).
pub const NEW_DATABASE_PAGE_SIZE: u32 = 1024;

/// What the WAL file is cut back to when it restarts; also where the writer's own checkpoint
/// makes it restart (`checkpoint::BACKSTOP_AUTOCHECKPOINT_BYTES`).
pub(crate) const WAL_SIZE_LIMIT_BYTES: u64 = 16 << 20;

/// Opens `path` with the store's PRAGMAs: WAL journal, the chosen `synchronous`, busy timeout,
/// foreign keys on, temporary data (savepoint journals) in memory, a WAL size limit.
///
/// Through the coalescing VFS ([`seqcast_coalescing_vfs`]): SQLite writes every WAL frame with
/// two system calls, the shim hands a commit's frames to the kernel in one. Same bytes, same
/// order, same syncs; 64 appenders over 64 streams (FULL) went from 34k to 47k appends/s
/// (crates/persistence/README.md, "WAL writes coalesced").
pub(crate) fn open_connection(
    path: &Path,
    options: ConnectionOptions,
) -> Result<Connection, StoreError> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if options.create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let vfs = seqcast_coalescing_vfs::register()
        .map_err(|error| StoreError::Unavailable(error.to_string()))?;
    let conn = Connection::open_with_flags_and_vfs(path, flags, vfs)?;
    conn.busy_timeout(options.busy_timeout)?;
    if options.create {
        // Takes effect only while the file is still empty (before the first table); a no-op on
        // an existing database.
        conn.pragma_update(None, "page_size", NEW_DATABASE_PAGE_SIZE)?;
    }
    let journal_mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !journal_mode.eq_ignore_ascii_case("wal") {
        // Only possible for special files (e.g. in-memory); durability is then SQLite's default.
        tracing::warn!(path = %path.display(), journal_mode, "database is not in WAL mode");
    }
    // journal_size_limit: when the WAL restarts from its beginning it is cut back to 16 MiB, so
    // a burst does not leave a WAL of its peak size behind for good (retention bounds the disk).
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {}; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; \
         PRAGMA journal_size_limit = {};",
        options.synchronous.as_pragma(),
        WAL_SIZE_LIMIT_BYTES
    ))?;
    Ok(conn)
}

/// Applies the migrations `conn`'s database lacks. Reads first and takes the write lock only
/// when something is pending, so an up-to-date read-only database still opens.
pub(crate) fn apply_migrations(conn: &mut Connection) -> Result<MigrationReport, StoreError> {
    let mut applied = Vec::new();
    let mut version = schema_version(conn)?;
    check_known(version)?;
    for migration in MIGRATIONS {
        if migration.version <= version {
            continue;
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another process may have migrated between our read and the lock.
        let current = schema_version(&tx)?;
        check_known(current)?;
        if current >= migration.version {
            version = current;
            continue;
        }
        if current == 0 {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version       INTEGER PRIMARY KEY,
                     name          TEXT    NOT NULL,
                     applied_at_ms INTEGER NOT NULL
                 ) STRICT;",
            )?;
        }
        tx.execute_batch(migration.sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES (?1, ?2, ?3)",
            rusqlite::params![migration.version, migration.name, now_ms_i64()],
        )?;
        tx.pragma_update(None, "user_version", migration.version)?;
        tx.commit()?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied database migration"
        );
        applied.push(AppliedMigration {
            version: migration.version,
            name: migration.name,
        });
        version = migration.version;
    }
    Ok(MigrationReport {
        applied,
        schema_version: version,
    })
}

fn check_known(version: u32) -> Result<(), StoreError> {
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "database schema version {version} is newer than this build supports ({SCHEMA_VERSION})"
        )));
    }
    Ok(())
}

/// The newest applied migration, 0 for a database without seqcast's schema.
pub(crate) fn schema_version(conn: &Connection) -> Result<u32, StoreError> {
    let has_table: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'schema_migrations')",
        [],
        |row| row.get(0),
    )?;
    if !has_table {
        return Ok(0);
    }
    let version: Option<i64> =
        conn.query_row("SELECT MAX(version) FROM schema_migrations", [], |row| {
            row.get(0)
        })?;
    let version = version.unwrap_or(0);
    u32::try_from(version)
        .map_err(|_| StoreError::Corrupt(format!("schema_migrations holds version {version}")))
}

/// Fails unless the schema is exactly the one this build reads.
pub(crate) fn require_current_schema(conn: &Connection) -> Result<(), StoreError> {
    let version = schema_version(conn)?;
    check_known(version)?;
    if version < SCHEMA_VERSION {
        return Err(StoreError::Unavailable(format!(
            "database schema version {version} is older than {SCHEMA_VERSION}; \
             open the writer or run `seqcast db migrate` first"
        )));
    }
    Ok(())
}

/// The highest sequence number ever assigned: AUTOINCREMENT's high-water mark, which stays
/// put even if the newest events are deleted, so it is the number the next event follows.
pub(crate) fn read_head(conn: &Connection) -> Result<u64, StoreError> {
    let seq: Option<i64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    stored_u64(seq.unwrap_or(0), "head")
}

/// The retention floor (see [`crate::EventReader::retention_floor`]).
pub(crate) fn read_floor(conn: &Connection) -> Result<u64, StoreError> {
    // Cached: every page of a catch-up reads it.
    let value: Option<String> = conn
        .prepare_cached("SELECT value FROM store_meta WHERE key = 'retention_floor'")?
        .query_row([], |row| row.get(0))
        .optional()?;
    let value =
        value.ok_or_else(|| StoreError::Corrupt("store_meta has no retention_floor".to_owned()))?;
    value
        .parse::<u64>()
        .ok()
        .filter(|&floor| floor >= 1)
        .ok_or_else(|| StoreError::Corrupt(format!("store_meta retention_floor is {value:?}")))
}

/// The store's epoch, made when the store was created.
pub(crate) fn read_epoch(conn: &Connection) -> Result<String, StoreError> {
    conn.query_row(
        "SELECT value FROM store_meta WHERE key = 'epoch'",
        [],
        |row| row.get(0),
    )
    .optional()?
    .ok_or_else(|| StoreError::Corrupt("store_meta has no epoch".to_owned()))
}

fn now_ms_i64() -> i64 {
    i64::try_from(crate::clock::now_ms()).unwrap_or(i64::MAX)
}

/// Creates the database at `path` if needed and applies every pending migration; safe to run
/// any number of times, also while a server uses the file. This is `seqcast db migrate`.
pub fn migrate(path: &Path) -> Result<MigrationReport, StoreError> {
    let mut conn = open_connection(path, ConnectionOptions::default())?;
    apply_migrations(&mut conn)
}
