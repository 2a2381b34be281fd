//! Property test: `MemorySequencer` against a naive model (a list of every row per key).
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use seqcast_protocol::{Channel, MessageId, RequestId, SubscriptionKey};
use seqcast_sequencing::{Assignment, MemorySequencer};

fn key(i: u8) -> SubscriptionKey {
    SubscriptionKey::new(
        Channel::new("search").unwrap(),
        RequestId::new(format!("req_{i}")).unwrap(),
    )
}

proptest! {
    #[test]
    fn assignments_match_naive_model(events in proptest::collection::vec((0u8..3, 0u8..6), 0..200)) {
        let mut sequencer = MemorySequencer::new();
        // rows[k] lists the message ids of key k in stream order.
        let mut rows: Vec<Vec<u8>> = vec![Vec::new(); 3];
        for (n, (k, m)) in events.into_iter().enumerate() {
            let id = MessageId::new(format!("m{m}")).unwrap();
            let got = sequencer.assign(&key(k), &id);
            let stream = &mut rows[usize::from(k)];
            let expected = match stream.iter().position(|&x| x == m) {
                Some(i) => Assignment { sequence_number: n as u64 + 1, stream_sequence: i as u64 + 1, replaced: true },
                None => {
                    stream.push(m);
                    Assignment { sequence_number: n as u64 + 1, stream_sequence: stream.len() as u64, replaced: false }
                }
            };
            prop_assert_eq!(got, expected);
            prop_assert_eq!(sequencer.head(), n as u64 + 1);
        }
    }
}
