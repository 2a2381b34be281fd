//! seqcast sequencing: the seam between catch-up and live delivery, and the log's recent tail.
//!
//! Job: [`Cursor`] is one subscription's position in the committed log and the rule that moves
//! it — catch up from log pages, then from the cached tail, then join live delivery at an exact
//! seam; leave live delivery when the send queue is full and catch up again; give up only when
//! the log's retention floor has passed it. [`resume`] and [`window_start`] decide where a
//! subscription with `since` starts and whether the client is told `recovered: true`.
//! [`ReadBudget`] is what one read hands out at most (messages and bytes): every read of the log
//! — a catch-up step, a recovery answer, a stream page — is a page filled under one; a
//! [`Replay`] is a one-shot answer (HTTP recovery) as a cursor run to such a budget.
//! [`TailCache`] is the log's newest messages in memory, a dense run bounded in bytes, with a
//! per-key index.
//!
//! Boundary: sans-IO. No tokio, no sockets, no disk, no clock reads and no logging: time and
//! the log's state come in as values and the next step goes back as a value, so the server
//! performs the reads and writes and decides what to log.
//!
//! Invariant: a cursor's position only moves forward, and only over numbers whose messages of
//! its key were handed out; the cache holds an unbroken run `floor ..= head` and refuses any
//! message that is not `head + 1`, so a hole can never be served silently.
//!
//! ```
//! use seqcast_sequencing::{Cursor, Phase, Step, View};
//!
//! // A subscriber 100 messages behind; memory holds the newest 30 (71..=100).
//! let mut cursor = Cursor::catching_up(0);
//! let view = View { head: 100, cache_floor: 71, retention_floor: 1 };
//! assert_eq!(cursor.next_step(view), Step::ReadLog { after: 0, through: 70 });
//! // The shell read a page of the log up to 70 (the retention floor was 1).
//! cursor.on_log_page(70, 1);
//! assert_eq!(cursor.next_step(view), Step::JoinFromCache { after: 70 });
//! // Under the hub lock: the cached rest is handed out and the subscriber joins live.
//! cursor.on_joined(100);
//! assert_eq!(cursor.phase(), Phase::Live);
//! // Its send queue fills at message 130: it leaves live delivery and catches up again.
//! cursor.on_lagged(130);
//! assert_eq!(cursor.position(), 129);
//! ```

mod budget;
mod cursor;
mod merged;
mod replay;
mod tail;

pub use budget::{Fill, Page, ReadBudget};
pub use cursor::{
    Cursor, LogFacts, Phase, Resume, Step, View, WindowLimits, cached_window_start, resume,
    window_start,
};
pub use merged::KeyPositions;
pub use replay::{Replay, ReplayStep};
pub use tail::{CachedMessage, ENTRY_OVERHEAD_BYTES, GapError, KEY_OVERHEAD_BYTES, TailCache};
