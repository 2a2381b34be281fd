//! `seqcast db backup` and `seqcast db restore`: a consistent copy of a live store, and putting
//! one back under a new epoch.

use std::path::{Path, PathBuf};

use rusqlite::backup::Backup;
use rusqlite::{Connection, OpenFlags};

use super::schema;
use crate::error::StoreError;

/// What [`backup`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    /// The store's epoch (the backup keeps it; a restore replaces it).
    pub epoch: String,
    /// The newest sequence number in the backup.
    pub head: u64,
    /// Pages copied.
    pub pages: u64,
}

/// Copies the store at `db` into `dest` (which must not exist) with SQLite's online backup API:
/// one read transaction, so the copy is the store as of one commit, while the server goes on
/// writing (WAL readers do not block the writer, nor it them). Every publish answered before
/// the backup started is in it.
pub fn backup(db: &Path, dest: &Path) -> Result<BackupReport, StoreError> {
    if dest.exists() {
        return Err(StoreError::Rejected(format!(
            "{} already exists; choose a new file",
            dest.display()
        )));
    }
    let src = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    src.busy_timeout(super::config::DEFAULT_BUSY_TIMEOUT)?;
    schema::require_current_schema(&src)?;
    let partial = partial_path(dest);
    let _ = std::fs::remove_file(&partial);
    let result = (|| {
        let mut out = Connection::open(&partial)?;
        let pages = {
            let copy = Backup::new(&src, &mut out)?;
            // All pages in one step: one snapshot. (Smaller steps would restart whenever the
            // server commits in between, and might never finish under steady publishing.)
            copy.step(-1)?;
            u64::from(copy.progress().pagecount.unsigned_abs())
        };
        // A self-contained file: no WAL beside it.
        out.pragma_update(None, "journal_mode", "DELETE")?;
        let report = BackupReport {
            epoch: schema::read_epoch(&out)?,
            head: schema::read_head(&out)?,
            pages,
        };
        let check: String = out.query_row("PRAGMA quick_check", [], |row| row.get(0))?;
        if check != "ok" {
            return Err(StoreError::Corrupt(format!(
                "the copy fails quick_check: {check}"
            )));
        }
        out.close().map_err(|(_, e)| StoreError::from(e))?;
        Ok(report)
    })();
    match result {
        Ok(report) => {
            std::fs::rename(&partial, dest).map_err(|e| io_error("rename the backup", &e))?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// What [`restore`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// The epoch the backup had.
    pub old_epoch: String,
    /// The restored store's new epoch.
    pub epoch: String,
    /// The newest sequence number in the restored store.
    pub head: u64,
    /// Where the database that was in place went (`None` when there was none).
    pub previous: Option<PathBuf>,
}

/// Installs the backup `from` as the store at `db`, under a **new epoch**: the restored store
/// will hand out again numbers the old one already gave to messages the backup does not have,
/// so clients holding numbers of the old history must get `recovered: false` rather than
/// resume with them. The database in place (if any) is moved aside to
/// `<db>.before-restore-<ms>`, never deleted. The caller must make sure no server uses `db`
/// (the server holds the data directory's lock; `seqcast db restore` takes it).
pub fn restore(from: &Path, db: &Path) -> Result<RestoreReport, StoreError> {
    let staged = db.with_extension("db.restoring");
    let _ = std::fs::remove_file(&staged);
    let result = (|| {
        {
            let src = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            schema::require_current_schema(&src)?;
            let mut out = Connection::open(&staged)?;
            Backup::new(&src, &mut out)?.step(-1)?;
        }
        let conn = Connection::open(&staged)?;
        let old_epoch = schema::read_epoch(&conn)?;
        conn.execute(
            "UPDATE store_meta SET value = lower(hex(randomblob(16))) WHERE key = 'epoch'",
            [],
        )?;
        let epoch = schema::read_epoch(&conn)?;
        let head = schema::read_head(&conn)?;
        conn.pragma_update(None, "journal_mode", "DELETE")?;
        conn.close().map_err(|(_, e)| StoreError::from(e))?;
        Ok((old_epoch, epoch, head))
    })();
    let (old_epoch, epoch, head) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            return Err(e);
        }
    };
    let previous = if db.exists() {
        // Fold the old WAL into its file first, so what is kept aside is whole.
        if let Ok(old) = Connection::open(db) {
            let _ = old.pragma_update(None, "journal_mode", "DELETE");
            let _ = old.close();
        }
        let aside = PathBuf::from(format!(
            "{}.before-restore-{}",
            db.display(),
            crate::clock::now_ms()
        ));
        std::fs::rename(db, &aside).map_err(|e| io_error("move the old database aside", &e))?;
        Some(aside)
    } else {
        None
    };
    // Whatever is left of the old WAL goes with the old file (or away, without one): the
    // restored file must not be read through another store's WAL.
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", db.display()));
        if side.exists() {
            match &previous {
                Some(aside) => std::fs::rename(&side, format!("{}{suffix}", aside.display())),
                None => std::fs::remove_file(&side),
            }
            .map_err(|e| io_error("move the old WAL aside", &e))?;
        }
    }
    std::fs::rename(&staged, db).map_err(|e| io_error("install the restored database", &e))?;
    Ok(RestoreReport {
        old_epoch,
        epoch,
        head,
        previous,
    })
}

fn partial_path(dest: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", dest.display()))
}

fn io_error(what: &str, e: &std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("cannot {what}: {e}"))
}
