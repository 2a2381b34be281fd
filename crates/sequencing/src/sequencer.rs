//! The in-memory sequence authority, used only under `--storage memory`.

use std::collections::HashMap;

use seqcast_protocol::{MessageId, SubscriptionKey};

/// The numbers given to one published event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// Deployment-wide number: `head + 1` at the time of the assignment, never reused.
    pub sequence_number: u64,
    /// Position of the row in its subscription key's stream, starting at 1.
    pub stream_sequence: u64,
    /// `true` when the `message_id` was already in this stream: an upsert of an existing row,
    /// which keeps its `stream_sequence` but is a new event with a new `sequence_number`.
    pub replaced: bool,
}

/// One stream's rows: how many exist and where each `message_id` sits.
#[derive(Debug, Default)]
struct StreamRows {
    /// Number of distinct rows, i.e. the last `stream_sequence` handed out.
    rows: u64,
    /// `message_id` → `stream_sequence`, so a repeated id is recognised as an upsert.
    positions: HashMap<MessageId, u64>,
}

/// Assigns sequence numbers when no database is the authority (`--storage memory`).
///
/// Memory: to recognise an upsert, this keeps every `(key, message_id)` it has seen for the
/// lifetime of the process. That is the price of memory mode (which loses everything on restart
/// anyway); persistent storage keeps this index in the database instead.
#[derive(Debug, Default)]
pub struct MemorySequencer {
    head: u64,
    streams: HashMap<SubscriptionKey, StreamRows>,
}

impl MemorySequencer {
    /// A sequencer with head 0: the first number it assigns is 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last assigned `sequence_number` (0 when none has been assigned).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Assign numbers to one event.
    ///
    /// `sequence_number = head + 1` (deployment-wide, never reused); `stream_sequence` is the
    /// per-key position starting at 1. A repeated `message_id` in the same key is an upsert: it
    /// keeps that row's `stream_sequence`, gets a new `sequence_number`, and `replaced = true`.
    pub fn assign(&mut self, key: &SubscriptionKey, message_id: &MessageId) -> Assignment {
        // 2^64 events cannot happen in a process lifetime; wrapping would reuse numbers, so
        // stopping is the only correct answer if it ever did.
        let sequence_number = self
            .head
            .checked_add(1)
            .expect("sequence_number space exhausted (2^64 events)");
        self.head = sequence_number;

        let stream = self.streams.entry(key.clone()).or_default();
        if let Some(&stream_sequence) = stream.positions.get(message_id) {
            return Assignment {
                sequence_number,
                stream_sequence,
                replaced: true,
            };
        }
        stream.rows += 1;
        let stream_sequence = stream.rows;
        stream.positions.insert(message_id.clone(), stream_sequence);
        Assignment {
            sequence_number,
            stream_sequence,
            replaced: false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use seqcast_protocol::{Channel, RequestId};

    fn key(channel: &str, request: &str) -> SubscriptionKey {
        SubscriptionKey::new(
            Channel::new(channel).unwrap(),
            RequestId::new(request).unwrap(),
        )
    }

    fn id(s: &str) -> MessageId {
        MessageId::new(s).unwrap()
    }

    #[test]
    fn starts_at_one_and_counts_per_key() {
        let mut seq = MemorySequencer::new();
        assert_eq!(seq.head(), 0);
        let a = key("search", "req_A");
        let b = key("search", "req_B");

        let got: Vec<Assignment> = vec![
            seq.assign(&a, &id("m1")),
            seq.assign(&b, &id("m1")),
            seq.assign(&a, &id("m2")),
        ];
        let expected = [(1, 1, false), (2, 1, false), (3, 2, false)];
        for (got, (sequence_number, stream_sequence, replaced)) in got.iter().zip(expected) {
            assert_eq!(
                *got,
                Assignment {
                    sequence_number,
                    stream_sequence,
                    replaced
                }
            );
        }
        assert_eq!(seq.head(), 3);
    }

    #[test]
    fn repeated_message_id_is_an_upsert_with_a_new_sequence_number() {
        let mut seq = MemorySequencer::new();
        let a = key("search", "req_A");
        seq.assign(&a, &id("m1"));
        seq.assign(&a, &id("m2"));
        let upsert = seq.assign(&a, &id("m1"));
        assert_eq!(
            upsert,
            Assignment {
                sequence_number: 3,
                stream_sequence: 1,
                replaced: true
            }
        );
        // The upsert did not add a row: the next new id takes position 3.
        let next = seq.assign(&a, &id("m3"));
        assert_eq!((next.sequence_number, next.stream_sequence), (4, 3));
        assert!(!next.replaced);
    }

    #[test]
    fn same_message_id_in_another_key_is_a_new_row() {
        let mut seq = MemorySequencer::new();
        seq.assign(&key("c", "r1"), &id("same"));
        let other = seq.assign(&key("c", "r2"), &id("same"));
        assert_eq!(other.stream_sequence, 1);
        assert!(!other.replaced);
    }
}
