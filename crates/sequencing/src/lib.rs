//! seqcast sequencing: the in-memory sequence authority and the recovery window.
//!
//! Job: [`MemorySequencer`] assigns `sequence_number` / `stream_sequence` when the server runs
//! with `--storage memory` (otherwise the database is the one authority and this type is unused).
//! [`RecoveryWindow`] is the ring buffer that answers "everything after `since`" for reconnecting
//! clients, and says honestly whether it still reaches back to `since + 1`.
//!
//! Boundary: sans-IO. No tokio, no sockets, no disk, no clock reads and no logging: time comes in
//! as `now_ms: u64` and outcomes go back as values, so the server decides what to log and send.
//!
//! Invariant: numbers only ever grow. The sequencer never hands out a `sequence_number` twice and
//! the window refuses a number that is not greater than the last one it took, so its contents are
//! strictly increasing and a binary search on `sequence_number` is always valid.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use seqcast_protocol::{MessageId, SubscriptionKey};
//! use seqcast_sequencing::{MemorySequencer, RecoveryWindow, RetainedMessage, WindowLimits};
//!
//! let key = SubscriptionKey::parse("search:req_A")?;
//! let mut sequencer = MemorySequencer::new();
//! let mut window = RecoveryWindow::new(WindowLimits::default());
//! let now_ms = 1_700_000_000_000;
//! for id in ["m1", "m2", "m3"] {
//!     let numbers = sequencer.assign(&key, &MessageId::new(id)?);
//!     let msg = RetainedMessage {
//!         sequence_number: numbers.sequence_number,
//!         key: key.clone(),
//!         timestamp_ms: now_ms,
//!         frame: id,
//!     };
//!     window.insert(msg, now_ms)?;
//! }
//!
//! // A client that saw 1 reconnects: expire by age first, then ask.
//! window.expire(now_ms);
//! let page = window.since(1, 100, |m| m.key == key);
//! assert_eq!(page.messages.iter().map(|m| m.frame).collect::<Vec<_>>(), ["m2", "m3"]);
//! assert!(page.complete);
//! # Ok(())
//! # }
//! ```

mod sequencer;
mod window;

pub use sequencer::{Assignment, MemorySequencer};
pub use window::{InsertError, RecoveryPage, RecoveryWindow, RetainedMessage, WindowLimits};
