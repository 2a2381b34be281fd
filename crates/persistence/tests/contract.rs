//! The store contract, written once against the traits ([`EventWriter`], [`EventReader`]) and
//! run for every backend. SQLite is the only one today; a new backend (PostgreSQL is next)
//! implements [`Backend`] and adds one `contract_tests!` line at the bottom.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod common;

use common::{event, key};
use seqcast_persistence::{
    CommitHook, CommittedEvent, DbReader, DbWriter, EventFilter, EventReader, EventWriter,
    StoreConfig, StoreError, StoreInfo,
};
use seqcast_protocol::Channel;

/// One store of one backend, which can be opened, closed and opened again.
trait Backend {
    type Writer: EventWriter;
    type Reader: EventReader;
    /// Opens the store (creating it the first time) with `hook` as its commit hook.
    fn open(&self, hook: CommitHook) -> (Self::Writer, Self::Reader, StoreInfo);
}

struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    fn new() -> Self {
        Sqlite {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Backend for Sqlite {
    type Writer = DbWriter;
    type Reader = DbReader;
    fn open(&self, hook: CommitHook) -> (DbWriter, DbReader, StoreInfo) {
        let path = self.dir.path().join("seqcast.db");
        let (writer, info) = DbWriter::open(StoreConfig::new(&path), hook).unwrap();
        (writer, DbReader::open(&path).unwrap(), info)
    }
}

/// A hook that records every event it is handed, and the highest sequence number seen so far.
#[derive(Clone, Default)]
struct Seen {
    events: Arc<Mutex<Vec<CommittedEvent>>>,
    highest: Arc<AtomicU64>,
}

impl Seen {
    fn hook(&self) -> CommitHook {
        let seen = self.clone();
        Box::new(move |events: &[CommittedEvent]| {
            seen.events.lock().unwrap().extend_from_slice(events);
            if let Some(last) = events.last() {
                seen.highest.store(last.sequence_number, Ordering::SeqCst);
            }
        })
    }
    fn numbers(&self) -> Vec<u64> {
        let events = self.events.lock().unwrap();
        events.iter().map(|e| e.sequence_number).collect()
    }
}

/// 120 concurrent appends over three streams: the store numbers them 1..=120 with no gap or
/// repeat, each stream 1, 2, 3…, the hook sees every event once in number order, and nobody is
/// answered before the hook has seen their event.
async fn concurrent_appends_are_numbered_by_the_store(backend: impl Backend) {
    let seen = Seen::default();
    let (writer, reader, info) = backend.open(seen.hook());
    assert_eq!(info.head, 0);
    let keys = ["c:a", "c:b", "d:a"];
    let mut tasks = Vec::new();
    for n in 0..120usize {
        let writer = writer.clone();
        let highest = Arc::clone(&seen.highest);
        tasks.push(tokio::spawn(async move {
            let mut committed = writer
                .append(vec![event(keys[n % 3], &format!("m{n}"), &format!("{n}"))])
                .await
                .unwrap();
            let e = committed.pop().unwrap();
            assert!(
                highest.load(Ordering::SeqCst) >= e.sequence_number,
                "answered before the hook saw event {}",
                e.sequence_number
            );
            e
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let mut numbers: Vec<u64> = answers.iter().map(|e| e.sequence_number).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=120).collect::<Vec<_>>());
    assert_eq!(seen.numbers(), (1..=120).collect::<Vec<_>>());

    let mut per_stream: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for e in &answers {
        per_stream
            .entry(e.key.to_string())
            .or_default()
            .push((e.sequence_number, e.stream_sequence));
    }
    for (stream, mut pairs) in per_stream {
        pairs.sort_unstable();
        let positions: Vec<u64> = pairs.iter().map(|p| p.1).collect();
        assert_eq!(positions, (1..=40).collect::<Vec<_>>(), "stream {stream}");
    }
    assert_eq!(reader.head().unwrap(), 120);
    let log = reader.events_after(0, 1000, EventFilter::All).unwrap();
    assert_eq!(log, *seen.events.lock().unwrap());
    writer.close().await;
    assert!(writer.is_closed());
}

/// A repeated message id updates the row: same position, new number, data replaced.
async fn a_repeated_message_id_is_an_upsert(backend: impl Backend) {
    let (writer, reader, _) = backend.open(Box::new(|_| {}));
    writer.append(vec![event("c:a", "x", "1")]).await.unwrap();
    writer.append(vec![event("c:a", "y", "2")]).await.unwrap();
    let again = writer.append(vec![event("c:a", "x", "3")]).await.unwrap();
    assert_eq!(
        (
            again[0].sequence_number,
            again[0].stream_sequence,
            again[0].replaced
        ),
        (3, 1, true)
    );
    let rows = reader.stream_rows(&key("c:a"), 0, 10).unwrap();
    let rows: Vec<(u64, u64, &str, bool)> = rows
        .iter()
        .map(|r| {
            (
                r.stream_sequence,
                r.sequence_number,
                r.data.as_str(),
                r.replaced,
            )
        })
        .collect();
    assert_eq!(rows, vec![(1, 3, "3", true), (2, 2, "2", false)]);
    let next = writer.append(vec![event("c:a", "z", "4")]).await.unwrap();
    assert_eq!((next[0].sequence_number, next[0].stream_sequence), (4, 3));
    writer.close().await;
}

/// A batch with one bad event commits nothing, uses no number and reaches nobody.
async fn a_batch_is_all_or_nothing(backend: impl Backend) {
    let seen = Seen::default();
    let (writer, reader, _) = backend.open(seen.hook());
    writer.append(vec![event("c:a", "a", "1")]).await.unwrap();
    let refused = writer
        .append(vec![
            event("c:a", "b", "2"),
            event("c:b", "c", "not json"),
            event("c:a", "d", "4"),
        ])
        .await;
    assert!(
        matches!(refused, Err(StoreError::Rejected(_))),
        "{refused:?}"
    );
    assert_eq!(reader.head().unwrap(), 1);
    assert_eq!(seen.numbers(), vec![1]);
    assert!(reader.stream_rows(&key("c:b"), 0, 10).unwrap().is_empty());

    let batch = writer
        .append(vec![event("c:a", "b", "2"), event("c:b", "c", "3")])
        .await
        .unwrap();
    let numbers: Vec<(u64, u64)> = batch
        .iter()
        .map(|e| (e.sequence_number, e.stream_sequence))
        .collect();
    assert_eq!(numbers, vec![(2, 2), (3, 1)]);
    assert_eq!(seen.numbers(), vec![1, 2, 3]);
    assert!(writer.append(Vec::new()).await.unwrap().is_empty());
    writer.close().await;
}

/// Reopening keeps the epoch and continues every number; readers filter and page.
async fn a_reopened_store_continues_its_numbers(backend: impl Backend) {
    let (writer, _, first) = backend.open(Box::new(|_| {}));
    for n in 1..=5 {
        let k = if n % 2 == 0 { "c:b" } else { "c:a" };
        writer
            .append(vec![event(k, &format!("m{n}"), &format!("{n}"))])
            .await
            .unwrap();
    }
    writer.close().await;
    assert!(matches!(
        writer.append(vec![event("c:a", "late", "0")]).await,
        Err(StoreError::Closed)
    ));

    let (writer, reader, second) = backend.open(Box::new(|_| {}));
    assert_eq!(second.epoch, first.epoch);
    assert_eq!(second.head, 5);
    assert_eq!(reader.epoch().unwrap(), first.epoch);
    let next = writer
        .append(vec![event("c:a", "m6", "6"), event("d:z", "m7", "7")])
        .await
        .unwrap();
    let numbers: Vec<(u64, u64)> = next
        .iter()
        .map(|e| (e.sequence_number, e.stream_sequence))
        .collect();
    assert_eq!(numbers, vec![(6, 4), (7, 1)]);

    let of_a = reader
        .events_after(1, 10, EventFilter::Key(key("c:a")))
        .unwrap();
    assert_eq!(
        of_a.iter().map(|e| e.sequence_number).collect::<Vec<_>>(),
        vec![3, 5, 6]
    );
    let of_c = reader
        .events_after(0, 10, EventFilter::Channel(Channel::new("c").unwrap()))
        .unwrap();
    assert_eq!(
        of_c.iter().map(|e| e.sequence_number).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    let latest = reader.latest_events(3, 0).unwrap();
    assert_eq!(
        latest.iter().map(|e| e.sequence_number).collect::<Vec<_>>(),
        vec![5, 6, 7]
    );
    let page = reader.stream_rows(&key("c:a"), 1, 2).unwrap();
    assert_eq!(
        page.iter().map(|r| r.stream_sequence).collect::<Vec<_>>(),
        vec![2, 3]
    );
    writer.close().await;
}

macro_rules! contract_tests {
    ($module:ident, $backend:expr) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_appends_are_numbered_by_the_store() {
                super::concurrent_appends_are_numbered_by_the_store($backend).await;
            }

            #[tokio::test]
            async fn a_repeated_message_id_is_an_upsert() {
                super::a_repeated_message_id_is_an_upsert($backend).await;
            }

            #[tokio::test]
            async fn a_batch_is_all_or_nothing() {
                super::a_batch_is_all_or_nothing($backend).await;
            }

            #[tokio::test]
            async fn a_reopened_store_continues_its_numbers() {
                super::a_reopened_store_continues_its_numbers($backend).await;
            }
        }
    };
}

contract_tests!(sqlite, Sqlite::new());
