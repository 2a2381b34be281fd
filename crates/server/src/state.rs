//! The state every handler and connection shares ([`AppState`]), and what it answers about
//! itself (can the server take writes now?). It sits below everything that serves: it imports
//! only the parts it is made of (settings, hub, store, limits, pages, auth), never a handler,
//! the router or the server's lifetime.

use std::path::PathBuf;
use std::sync::Arc;

use seqcast_protocol::MessageId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authority;
use crate::config::Settings;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::limits::Limiter;
use crate::storage::Store;

/// Everything a request handler needs.
#[derive(Debug)]
pub struct AppState {
    /// Fan-out: live subscriptions over the log's cached tail.
    pub hub: Arc<Hub>,
    /// Tokens and keys.
    pub auth: Authority,
    /// The sequence authority.
    pub store: Store,
    /// Resolved settings.
    pub settings: Settings,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Tracks WebSocket connection tasks, so shutdown can wait for them.
    pub connections: TaskTracker,
    /// Development mode ([`crate::config::AuthMode::Development`]): no token verifier is
    /// configured and the listen address is loopback; a generated secret is in use.
    pub dev_mode: bool,
    /// Makes message ids for publishes that bring none.
    pub message_ids: MessageIds,
    /// Held while the server runs: one process per data directory.
    pub data_dir_lock: Option<std::fs::File>,
    /// Log pages shared by cursors catching up over the same range.
    pub pages: crate::pages::PageCache,
    /// Connection caps and rate limits.
    pub limiter: Arc<Limiter>,
    /// The database file as opened (device, inode); `None` for memory storage.
    pub db_identity: Option<(PathBuf, (u64, u64))>,
    /// Why the database cannot take writes, when the server noticed (file removed or replaced).
    pub db_fault: std::sync::Mutex<Option<String>>,
}

impl AppState {
    /// Why publishes would fail right now, if they would: the writer stopped, or the database
    /// file is not the one that was opened. `/readyz` and the publish endpoints both ask.
    pub fn write_fault(&self) -> Option<String> {
        if let Some(why) = self.store.health().stopped {
            return Some(why);
        }
        self.db_fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Why the server is not ready for publishes: [`AppState::write_fault`], or the last write
    /// failed for a reason of the database's (read-only, full, locked past the busy timeout).
    /// A failing database is probed first (a write that changes nothing, at most
    /// [`PROBE_DEADLINE`]), so a condition that cleared is seen without waiting for a publish.
    pub async fn readiness_fault(&self) -> Option<String> {
        self.check_database_file();
        if let Some(why) = self.write_fault() {
            return Some(why);
        }
        if let Some(why) = self.disk_full() {
            return Some(why);
        }
        if self.store.health().unwritable.is_some() {
            let _ = tokio::time::timeout(PROBE_DEADLINE, self.store.probe()).await;
        }
        self.store.health().unwritable
    }

    /// The disk under the database cannot take one more message of the largest size
    /// (`max_message_bytes` plus a MiB of WAL and index pages): publishes could fail.
    fn disk_full(&self) -> Option<String> {
        let (path, _) = self.db_identity.as_ref()?;
        let dir = path.parent()?;
        let stat = rustix::fs::statvfs(dir).ok()?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        let need = (self.settings.max_message_bytes as u64).saturating_add(1 << 20);
        (free < need).then(|| {
            format!(
                "the disk holding {} is full: {free} bytes free, below the {need} one message of the largest size may need",
                dir.display()
            )
        })
    }

    /// Look at the database file again; record (and log once) when it was removed or replaced.
    pub fn check_database_file(&self) {
        let Some((path, opened)) = &self.db_identity else {
            return;
        };
        let now = match file_identity(path) {
            Ok(id) if id == *opened => None,
            Ok(_) => Some(format!(
                "the database file {} was replaced while the server ran; restart to open the new one",
                path.display()
            )),
            Err(e) => Some(format!(
                "the database file {} is gone ({e}); writes would be lost",
                path.display()
            )),
        };
        let mut fault = self
            .db_fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (&*fault, &now) {
            (None, Some(why)) => {
                tracing::error!(event = "database_lost", error = %why, "publishes are refused with 503 until the database file is back");
            }
            (Some(_), None) => {
                // Publishes resume only if the writer wrote nothing into it meanwhile: a group
                // it withheld keeps it refusing until a restart (its own `database_writable`
                // says when writes work again).
                tracing::info!(
                    event = "database_back",
                    "the database file is back at its path"
                );
            }
            _ => {}
        }
        *fault = now;
    }
}

/// The longest `/readyz` waits for a write probe of a failing database (a lock may hold it
/// for the whole busy timeout); past it, the last failure stands.
pub const PROBE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// (device, inode) of a file.
pub(crate) fn file_identity(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Server-made message ids: increasing (a time-based start plus a counter) so that the
/// database's per-stream index takes them at its end instead of on random pages — fewer dirty
/// pages per group commit — with a random suffix so ids stay unique across restarts.
#[derive(Debug)]
pub struct MessageIds {
    next: std::sync::atomic::AtomicU64,
}

impl Default for MessageIds {
    fn default() -> Self {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        MessageIds {
            next: std::sync::atomic::AtomicU64::new(micros),
        }
    }
}

impl MessageIds {
    /// A new id: 16 hex digits of the counter, then 8 random hex digits (written by hand on
    /// the stack: one per publish, and `format!` cost more than the rest of the id).
    pub fn next(&self) -> Result<MessageId, ApiError> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut text = [0u8; 24];
        hex_into(&mut text[..16], n);
        hex_into(&mut text[16..], u64::from(rand::random::<u32>()));
        std::str::from_utf8(&text)
            .map_err(|e| ApiError::Internal(e.to_string()))
            .and_then(|t| MessageId::parse(t).map_err(|e| ApiError::Internal(e.to_string())))
    }
}

/// The low `out.len()` hex digits of `n` (lowercase, zero-padded) into `out`.
fn hex_into(out: &mut [u8], mut n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
}
