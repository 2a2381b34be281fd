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

mod sequencer;
mod window;

pub use sequencer::{Assignment, MemorySequencer};
pub use window::{InsertError, RecoveryPage, RecoveryWindow, RetainedMessage, WindowLimits};
