//! The buffering rule of one WAL file, as safe code that owns its state: which writes are kept,
//! which are sent on, and when. No FFI and no `unsafe` here: the shim (`shim.rs`) hands in the
//! bytes SQLite wrote and a [`Sink`] that performs one write on the wrapped file, so this module
//! runs under Miri and against a model in plain unit tests.
//!
//! # The rule, and why a commit never waits in the buffer
//!
//! - A write that continues the buffered run (starts where it ends, and keeps it within
//!   [`MAX_PENDING_BYTES`]) is appended; any other write sends the run first.
//! - SQLite appends a frame as two writes, its 24-byte header then its page, one frame after the
//!   other (`walWriteOneFrame`). A header whose bytes 4..8 (the database size) are not zero is a
//!   **commit frame's** header: the last frame of a transaction.
//! - A commit frame's header is kept only when it continues the run. Then it is the append path's
//!   header and its page is the very next write; the run is sent at the end of that page. A
//!   commit header that does not continue the run is written through at once (and its page, if
//!   one follows, is sent as soon as it is written). The one place SQLite writes a commit header
//!   with no page after it is `walRewriteChecksums` (a transaction that changed a page it had
//!   already spilled to the WAL rewrites the frame headers from there to its commit frame), and
//!   it reads each frame before rewriting its header: a read sends the run, so that header never
//!   continues one and is never kept. Under `synchronous = NORMAL` no sync follows a commit, so a
//!   commit header left in the buffer would be lost by a process crash after the commit returned
//!   (issue 19; `tests/wal.rs`, `tests/crash_points.rs`).
//! - So when SQLite's commit returns, every byte of the transaction is in the wrapped file: its
//!   frames were sent at the end of the commit frame, and every later rewrite was sent by the
//!   read that follows it or written through.
//!
//! On the append path a commit costs one write (two for a transaction of one frame: its header
//! does not continue a run, the buffer being empty after the previous commit).

use crate::MAX_PENDING_BYTES;

/// SQLite's WAL frame header size: a 24-byte write to a WAL file is a frame header.
const FRAME_HEADER_BYTES: usize = 24;
/// SQLite's WAL file header size: frames start after it.
const WAL_HEADER_BYTES: i64 = 32;

/// The most bytes handed to the wrapped file in one write: SQLite's unix VFS keeps only the low
/// 17 bits of a write's length (its own writes are at most a 64 KiB page), so longer runs go in
/// pieces of 124 KiB.
pub(crate) const MAX_WRITE_BYTES: usize = 0x1ffff & !0xfff;

/// Performs one write of at most [`MAX_WRITE_BYTES`] on the wrapped file.
pub(crate) trait Sink {
    /// What a failed write reports (SQLite's result code in the shim).
    type Error;
    /// Writes all of `bytes` at `offset`.
    fn write_at(&mut self, bytes: &[u8], offset: i64) -> Result<(), Self::Error>;
}

impl<E, F: FnMut(&[u8], i64) -> Result<(), E>> Sink for F {
    type Error = E;
    fn write_at(&mut self, bytes: &[u8], offset: i64) -> Result<(), E> {
        self(bytes, offset)
    }
}

/// The buffered run of writes of one WAL file.
#[derive(Debug, Default)]
pub(crate) struct WalBuffer {
    bytes: Vec<u8>,
    /// File offset of `bytes[0]`.
    offset: i64,
    /// The last write was a commit frame's header: the next write is its page, the last write of
    /// the commit, and the run is sent after it.
    commit_frame_next: bool,
}

impl WalBuffer {
    /// Whether nothing is buffered.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Takes SQLite's write of `bytes` at `offset`: buffers it or sends it (and what it must
    /// follow) to `sink`, by the rule in the module documentation.
    pub(crate) fn write<S: Sink>(
        &mut self,
        bytes: &[u8],
        offset: i64,
        sink: &mut S,
    ) -> Result<(), S::Error> {
        if bytes.is_empty() {
            return Ok(());
        }
        let continues = !self.bytes.is_empty()
            && self.end() == Some(offset)
            && self.bytes.len() + bytes.len() <= MAX_PENDING_BYTES;
        let ends_commit = self.commit_frame_next;
        let commit_header = is_commit_frame_header(bytes, offset);
        if !continues {
            self.flush(sink)?;
            if commit_header {
                // Not the append path's header (see the module documentation): it may be the
                // last write of a commit.
                write_through(bytes, offset, sink)?;
                self.commit_frame_next = true;
                return Ok(());
            }
            if bytes.len() > MAX_PENDING_BYTES {
                return write_through(bytes, offset, sink);
            }
            self.offset = offset;
        }
        self.bytes.extend_from_slice(bytes);
        if ends_commit {
            // The page of a commit frame: the transaction's frames are complete.
            return self.flush(sink);
        }
        self.commit_frame_next = commit_header;
        Ok(())
    }

    /// Sends the buffered run to `sink`. The buffer is empty afterwards either way: what failed
    /// to write belongs to a transaction SQLite now fails.
    pub(crate) fn flush<S: Sink>(&mut self, sink: &mut S) -> Result<(), S::Error> {
        self.commit_frame_next = false;
        if self.bytes.is_empty() {
            return Ok(());
        }
        let sent = write_through(&self.bytes, self.offset, sink);
        self.bytes.clear();
        sent
    }

    /// The file offset just past the run (`None` only for a run past `i64::MAX`).
    fn end(&self) -> Option<i64> {
        i64::try_from(self.bytes.len())
            .ok()
            .and_then(|len| self.offset.checked_add(len))
    }
}

/// A frame header's bytes 4..8 are the database size in pages after a commit, zero in every
/// other frame; the WAL file's own header (32 bytes at offset 0) is not a frame header.
fn is_commit_frame_header(bytes: &[u8], offset: i64) -> bool {
    bytes.len() == FRAME_HEADER_BYTES && offset >= WAL_HEADER_BYTES && bytes[4..8] != [0, 0, 0, 0]
}

/// Writes `bytes` at `offset` to `sink` in pieces of at most [`MAX_WRITE_BYTES`].
fn write_through<S: Sink>(bytes: &[u8], offset: i64, sink: &mut S) -> Result<(), S::Error> {
    let mut at = offset;
    for piece in bytes.chunks(MAX_WRITE_BYTES) {
        sink.write_at(piece, at)?;
        // A piece is at most MAX_WRITE_BYTES: it fits an i64.
        at += piece.len() as i64;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    const PAGE: usize = 1024;

    /// The writes the sink received, in order.
    #[derive(Debug, Default)]
    struct Recorder {
        writes: Vec<(i64, Vec<u8>)>,
    }

    impl Recorder {
        fn sink(&mut self) -> impl FnMut(&[u8], i64) -> Result<(), ()> + '_ {
            |bytes: &[u8], offset: i64| {
                assert!(bytes.len() <= MAX_WRITE_BYTES, "a write of {}", bytes.len());
                self.writes.push((offset, bytes.to_vec()));
                Ok(())
            }
        }
    }

    fn header(commit: bool) -> [u8; FRAME_HEADER_BYTES] {
        let mut header = [0xa5; FRAME_HEADER_BYTES];
        header[4..8].copy_from_slice(&u32::from(commit).to_be_bytes());
        header
    }

    fn frame_offset(frame: i64) -> i64 {
        WAL_HEADER_BYTES + (frame - 1) * (FRAME_HEADER_BYTES + PAGE) as i64
    }

    /// Appends frame `frame` the way SQLite's `walWriteOneFrame` does: header, then page.
    fn append(buffer: &mut WalBuffer, recorder: &mut Recorder, frame: i64, commit: bool) {
        let at = frame_offset(frame);
        buffer
            .write(&header(commit), at, &mut recorder.sink())
            .unwrap();
        let page = vec![frame as u8; PAGE];
        buffer
            .write(&page, at + FRAME_HEADER_BYTES as i64, &mut recorder.sink())
            .unwrap();
    }

    #[test]
    fn a_commit_of_many_frames_is_one_write_sent_at_the_end_of_its_commit_frame() {
        let mut buffer = WalBuffer::default();
        let mut recorder = Recorder::default();
        for frame in 1..=5 {
            append(&mut buffer, &mut recorder, frame, false);
        }
        assert!(recorder.writes.is_empty());
        append(&mut buffer, &mut recorder, 6, true);
        assert!(buffer.is_empty());
        assert_eq!(recorder.writes.len(), 1);
        assert_eq!(recorder.writes[0].0, frame_offset(1));
        assert_eq!(recorder.writes[0].1.len(), 6 * (FRAME_HEADER_BYTES + PAGE));
    }

    #[test]
    fn a_commit_of_one_frame_is_sent_by_its_page() {
        let mut buffer = WalBuffer::default();
        let mut recorder = Recorder::default();
        append(&mut buffer, &mut recorder, 1, true);
        assert!(buffer.is_empty());
        assert_eq!(recorder.writes.len(), 2);
    }

    /// Issue 19, defect 1: `walRewriteChecksums` reads a frame (the shim sends the run), then
    /// rewrites its header; the commit frame's header is the last write of the commit.
    #[test]
    fn a_rewritten_commit_header_is_written_through_at_once() {
        let mut buffer = WalBuffer::default();
        let mut recorder = Recorder::default();
        for frame in 1..=3 {
            append(&mut buffer, &mut recorder, frame, false);
        }
        append(&mut buffer, &mut recorder, 4, true);
        let before = recorder.writes.len();
        for frame in 2..=4 {
            buffer.flush(&mut recorder.sink()).unwrap(); // the read before each header
            buffer
                .write(
                    &header(frame == 4),
                    frame_offset(frame),
                    &mut recorder.sink(),
                )
                .unwrap();
        }
        assert!(buffer.is_empty(), "the commit header stayed buffered");
        assert_eq!(recorder.writes.len(), before + 3);
        assert_eq!(recorder.writes.last().unwrap().0, frame_offset(4));
    }

    #[test]
    fn a_write_that_does_not_continue_the_run_sends_it_first() {
        let mut buffer = WalBuffer::default();
        let mut recorder = Recorder::default();
        append(&mut buffer, &mut recorder, 1, false);
        append(&mut buffer, &mut recorder, 2, false);
        // A spilled page changed again: rewritten in place.
        buffer
            .write(&[9; PAGE], frame_offset(1) + 24, &mut recorder.sink())
            .unwrap();
        assert_eq!(recorder.writes.len(), 1);
        assert_eq!(recorder.writes[0].0, frame_offset(1));
        assert!(!buffer.is_empty());
    }

    #[test]
    fn long_runs_are_sent_in_pieces_and_large_writes_go_straight_through() {
        let mut buffer = WalBuffer::default();
        let mut recorder = Recorder::default();
        let frames = (MAX_PENDING_BYTES / (FRAME_HEADER_BYTES + PAGE)) as i64 + 3;
        for frame in 1..frames {
            append(&mut buffer, &mut recorder, frame, false);
        }
        // The run reached MAX_PENDING_BYTES once and was sent in pieces.
        assert!(recorder.writes.len() >= MAX_PENDING_BYTES / MAX_WRITE_BYTES);
        let sent = recorder.writes.len();
        let big = vec![1; MAX_PENDING_BYTES + 1];
        buffer.write(&big, 1 << 30, &mut recorder.sink()).unwrap();
        assert!(buffer.is_empty());
        assert_eq!(
            recorder.writes.len() - sent,
            1 + (MAX_PENDING_BYTES + 1).div_ceil(MAX_WRITE_BYTES)
        );
    }

    #[test]
    fn the_buffer_is_empty_after_a_failed_flush() {
        let mut buffer = WalBuffer::default();
        let mut recorder = Recorder::default();
        append(&mut buffer, &mut recorder, 1, false);
        let mut failing = |_: &[u8], _: i64| Err::<(), _>(10);
        assert_eq!(buffer.flush(&mut failing), Err(10));
        assert!(buffer.is_empty());
        assert!(buffer.flush(&mut failing).is_ok());
    }

    /// One operation SQLite can do on a WAL file, as the model sees it.
    #[derive(Debug, Clone)]
    enum Op {
        /// Append a frame at the next frame slot (or at `frame` when set: a restart or a gap).
        Append { frame: Option<u8>, commit: bool },
        /// Rewrite a frame's page in place.
        RewritePage { frame: u8, fill: u8 },
        /// Rewrite a frame's header in place (after a read, as `walRewriteChecksums` does).
        RewriteHeader { frame: u8, commit: bool },
        /// A write of arbitrary size at an arbitrary offset.
        Raw { offset: u32, len: u32, fill: u8 },
        /// Anything that sends the run: read, sync, truncate, size, file control, close.
        Flush,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (proptest::option::weighted(0.1, 1..40_u8), proptest::bool::weighted(0.3))
                .prop_map(|(frame, commit)| Op::Append { frame, commit }),
            1 => (1..40_u8, any::<u8>()).prop_map(|(frame, fill)| Op::RewritePage { frame, fill }),
            1 => (1..40_u8, any::<bool>())
                .prop_map(|(frame, commit)| Op::RewriteHeader { frame, commit }),
            1 => (0..200_000_u32, 1..1_200_000_u32, any::<u8>())
                .prop_map(|(offset, len, fill)| Op::Raw { offset, len, fill }),
            1 => Just(Op::Flush),
        ]
    }

    fn apply(file: &mut Vec<u8>, bytes: &[u8], offset: i64) {
        let at = usize::try_from(offset).unwrap();
        if file.len() < at + bytes.len() {
            file.resize(at + bytes.len(), 0);
        }
        file[at..at + bytes.len()].copy_from_slice(bytes);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Against the unbuffered file: at every flush point (and after every commit frame) the
        /// file written through the buffer is byte for byte the file SQLite's writes make; no
        /// write to the sink exceeds MAX_WRITE_BYTES; no commit header is ever left buffered
        /// after the commit could have returned.
        #[test]
        fn buffered_writes_make_the_same_file_as_unbuffered_ones(ops in proptest::collection::vec(op(), 1..120)) {
            let mut buffer = WalBuffer::default();
            let mut buffered = Vec::new();
            let mut model = Vec::new();
            let mut next_frame = 1_i64;
            for op in ops {
                let mut writes: Vec<(Vec<u8>, i64)> = Vec::new();
                let mut flush = false;
                let mut ends_transaction = false;
                match op {
                    Op::Append { frame, commit } => {
                        let frame = frame.map_or(next_frame, i64::from);
                        next_frame = frame + 1;
                        let at = frame_offset(frame);
                        writes.push((header(commit).to_vec(), at));
                        writes.push((vec![frame as u8; PAGE], at + FRAME_HEADER_BYTES as i64));
                        ends_transaction = commit;
                    }
                    Op::RewritePage { frame, fill } => {
                        writes.push((vec![fill; PAGE], frame_offset(i64::from(frame)) + 24));
                    }
                    Op::RewriteHeader { frame, commit } => {
                        flush = true;
                        writes.push((header(commit).to_vec(), frame_offset(i64::from(frame))));
                        ends_transaction = commit;
                    }
                    Op::Raw { offset, len, fill } => {
                        writes.push((vec![fill; len as usize], i64::from(offset)));
                    }
                    Op::Flush => flush = true,
                }
                if flush {
                    buffer.flush(&mut |bytes: &[u8], at: i64| {
                        prop_assert!(bytes.len() <= MAX_WRITE_BYTES);
                        apply(&mut buffered, bytes, at);
                        Ok(())
                    })?;
                    prop_assert_eq!(&buffered, &model, "after a flush");
                }
                for (bytes, at) in writes {
                    apply(&mut model, &bytes, at);
                    buffer.write(&bytes, at, &mut |bytes: &[u8], at: i64| {
                        prop_assert!(bytes.len() <= MAX_WRITE_BYTES);
                        apply(&mut buffered, bytes, at);
                        Ok(())
                    })?;
                }
                if ends_transaction {
                    // SQLite's commit may return here with no further call on the file.
                    prop_assert!(buffer.is_empty(), "a commit left bytes in the buffer");
                    prop_assert_eq!(&buffered, &model, "after a commit frame");
                }
            }
            buffer.flush(&mut |bytes: &[u8], at: i64| {
                apply(&mut buffered, bytes, at);
                Ok::<(), TestCaseError>(())
            })?;
            prop_assert_eq!(buffered, model);
        }
    }
}
