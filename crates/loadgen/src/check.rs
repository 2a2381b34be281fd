//! The delivery guarantee, checked on the client: one subscriber's messages of one fresh key
//! arrive with `stream_sequence` 1, 2, 3, … and strictly increasing `sequence_number` — no gap,
//! no duplicate, nothing out of order.

use serde::Serialize;

/// Most problems kept in words (the count goes on).
const KEPT: usize = 5;

/// The order check of one subscriber of one key.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamCheck {
    /// Messages received.
    pub received: u64,
    /// Highest `stream_sequence` received in order.
    pub last_stream: u64,
    /// Highest `sequence_number` received.
    pub last_sequence: u64,
    /// Messages that broke the order (a gap, a duplicate or a step back).
    pub violations: u64,
    /// The first few violations in words.
    pub problems: Vec<String>,
}

impl StreamCheck {
    /// A check that expects `stream_sequence` `after + 1` next (0 for a fresh key).
    pub fn after(stream_sequence: u64) -> Self {
        StreamCheck {
            last_stream: stream_sequence,
            ..StreamCheck::default()
        }
    }

    /// Account for a message numbered (`sequence`, `stream`).
    pub fn on_message(&mut self, sequence: u64, stream: u64) {
        self.received += 1;
        let problem = if stream != self.last_stream + 1 {
            Some(format!(
                "stream_sequence {stream} after {} (sequence_number {sequence})",
                self.last_stream
            ))
        } else if sequence <= self.last_sequence {
            Some(format!(
                "sequence_number {sequence} after {}",
                self.last_sequence
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            self.violations += 1;
            if self.problems.len() < KEPT {
                self.problems.push(p);
            }
        }
        self.last_stream = self.last_stream.max(stream);
        self.last_sequence = self.last_sequence.max(sequence);
    }

    /// Account for a frame; true when it was a `message`.
    pub fn on_frame(&mut self, frame: &str) -> bool {
        match crate::probe::scan_numbers(frame) {
            Some((seq, stream)) => {
                self.on_message(seq, stream);
                true
            }
            None => false,
        }
    }

    /// Whether exactly stream sequences 1..=`n` arrived, each once, in order.
    pub fn is_exactly(&self, n: u64) -> bool {
        self.violations == 0 && self.received == n && self.last_stream == n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_an_unbroken_stream() {
        let mut c = StreamCheck::after(0);
        for i in 1..=5 {
            c.on_message(100 + i * 2, i);
        }
        assert!(c.is_exactly(5));
        assert!(!c.is_exactly(6));
    }

    #[test]
    fn reports_gaps_duplicates_and_steps_back() {
        let mut c = StreamCheck::after(0);
        c.on_message(10, 1);
        c.on_message(12, 3); // gap
        c.on_message(12, 3); // duplicate
        c.on_message(11, 4); // sequence went back
        assert_eq!(c.violations, 3);
        assert_eq!(c.problems.len(), 3);
        assert!(!c.is_exactly(4));
    }
}
