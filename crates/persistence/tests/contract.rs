//! The store contract, written once against the traits ([`EventWriter`], [`EventReader`]) and
//! run for every backend: SQLite, memory and PostgreSQL; a new backend implements [`Backend`]
//! and adds one `contract_tests!` line at the bottom.
//!
//! PostgreSQL runs against the real server at 127.0.0.1:5432 (`SEQCAST_TEST_PG_ADMIN_URL`
//! overrides it), in a database created for each test and dropped after. Without a reachable
//! server these tests say so loudly on stderr and pass — except under `CI=true`, where they
//! fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use common::{event, key, log_after};
use seqcast_persistence::{
    CommitHook, CommittedEvent, DbReader, DbWriter, EventFilter, EventReader, EventWriter,
    HookError, MemoryReader, MemoryStore, MemoryWriter, PgConfig, PgReader, PgStore, PgWriter,
    PruneReport, StoreConfig, StoreError, StoreInfo,
};
use seqcast_protocol::Channel;

/// One store of one backend, which can be opened, closed and opened again.
trait Backend {
    type Writer: EventWriter + Clone;
    type Reader: EventReader;
    /// Opens the store (creating it the first time) with `hook` as its commit hook.
    fn open(&self, hook: CommitHook) -> (Self::Writer, Self::Reader, StoreInfo);
    /// True when a store opened again continues the one closed before (SQLite); false when
    /// every `open` starts a new, empty store (memory).
    fn persists(&self) -> bool {
        true
    }
}

/// The in-memory backend: nothing survives `close`, so every `open` is a new store.
struct Memory;

impl Backend for Memory {
    type Writer = MemoryWriter;
    type Reader = MemoryReader;
    fn open(&self, hook: CommitHook) -> (MemoryWriter, MemoryReader, StoreInfo) {
        MemoryStore::open(hook)
    }
    fn persists(&self) -> bool {
        false
    }
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

/// One PostgreSQL database, made for one test and dropped with this value.
struct Postgres {
    admin_url: String,
    name: String,
    url: String,
}

impl Postgres {
    /// A fresh database, or None (said loudly) when no PostgreSQL is reachable outside CI.
    fn new() -> Option<Self> {
        let admin_url = std::env::var("SEQCAST_TEST_PG_ADMIN_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!("seqcast_contract_{:016x}", rand_u64());
        let created = admin_sql(&admin_url, &format!("CREATE DATABASE {name}"));
        if let Err(e) = created {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(
                !ci,
                "PostgreSQL is not reachable at {admin_url} under CI=true: {e}"
            );
            eprintln!(
                "\n!!!! SKIPPED: PostgreSQL contract test — no PostgreSQL at {admin_url}: {e}\n"
            );
            return None;
        }
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("admin URL {admin_url} names no database"),
        };
        Some(Postgres {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = admin_sql(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

/// Runs one statement on the admin database, on a thread of its own (callable from async
/// tests).
fn admin_sql(url: &str, sql: &str) -> Result<(), String> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let (client, connection) = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_postgres::connect(&url, tokio_postgres::NoTls),
            )
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            client.batch_execute(&sql).await.map_err(|e| e.to_string())
        })
    })
    .join()
    .unwrap()
}

impl Backend for Postgres {
    type Writer = PgWriter;
    type Reader = PgReader;
    fn open(&self, hook: CommitHook) -> (PgWriter, PgReader, StoreInfo) {
        PgStore::open(PgConfig::new(&self.url), hook).unwrap()
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
            Ok(())
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
    let log = log_after(&reader, 0, 1000, EventFilter::All, usize::MAX).unwrap();
    assert_eq!(log, *seen.events.lock().unwrap());
    writer.close().await;
    assert!(writer.health().stopped.is_some());
}

/// A repeated message id updates the row: same position, new number, data replaced.
async fn a_repeated_message_id_is_an_upsert(backend: impl Backend) {
    let (writer, reader, _) = backend.open(Box::new(|_| Ok(())));
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
    let rows = reader.stream_rows(&key("c:a"), 0, 10, usize::MAX).unwrap();
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
    assert!(
        reader
            .stream_rows(&key("c:b"), 0, 10, usize::MAX)
            .unwrap()
            .is_empty()
    );

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

/// Reopening keeps the epoch and continues every number; readers filter and page. (Only for
/// backends that persist: a memory store opened again is a new, empty one.)
async fn a_reopened_store_continues_its_numbers(backend: impl Backend) {
    if !backend.persists() {
        return;
    }
    let (writer, _, first) = backend.open(Box::new(|_| Ok(())));
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

    let (writer, reader, second) = backend.open(Box::new(|_| Ok(())));
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

    let of_a = log_after(&reader, 1, 10, EventFilter::Key(key("c:a")), usize::MAX).unwrap();
    assert_eq!(
        of_a.iter().map(|e| e.sequence_number).collect::<Vec<_>>(),
        vec![3, 5, 6]
    );
    let of_c = log_after(
        &reader,
        0,
        10,
        EventFilter::Channel(Channel::new("c").unwrap()),
        usize::MAX,
    )
    .unwrap();
    assert_eq!(
        of_c.iter().map(|e| e.sequence_number).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    let latest = reader.latest_events(3, 0, usize::MAX).unwrap();
    assert_eq!(
        latest.iter().map(|e| e.sequence_number).collect::<Vec<_>>(),
        vec![5, 6, 7]
    );
    let page = reader.stream_rows(&key("c:a"), 1, 2, usize::MAX).unwrap();
    assert_eq!(
        page.iter().map(|r| r.stream_sequence).collect::<Vec<_>>(),
        vec![2, 3]
    );
    writer.close().await;
}

fn numbers(events: &[CommittedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.sequence_number).collect()
}

/// Appends one event per (key, message id, data), one append each; returns the answers.
async fn append_each(
    writer: &impl EventWriter,
    events: &[(&str, &str, &str)],
) -> Vec<CommittedEvent> {
    let mut out = Vec::new();
    for (k, m, d) in events {
        out.extend(writer.append(vec![event(k, m, d)]).await.unwrap());
    }
    out
}

/// The ten events the page, count and prune tests read: keys c:a (1, 3, 5, 8, 10), c:b (2, 6),
/// d:a (4, 7, 9); event 8 updates the row of event 3 (c:a "m3").
const TEN: [(&str, &str, &str); 10] = [
    ("c:a", "m1", "1"),
    ("c:b", "m2", "2"),
    ("c:a", "m3", "3"),
    ("d:a", "m4", "4"),
    ("c:a", "m5", "5"),
    ("c:b", "m6", "6"),
    ("d:a", "m7", "7"),
    ("c:a", "m3", "8"),
    ("d:a", "m9", "9"),
    ("c:a", "m10", "10"),
];

/// `page` reads one range of the log per call, by key, channel or all, says how far it
/// accounted for, and carries the floor.
async fn page_reads_the_log_in_ranges(backend: impl Backend) {
    let (writer, reader, _) = backend.open(Box::new(|_| Ok(())));
    let empty = reader
        .page(&EventFilter::All, 0, 0, 10, usize::MAX)
        .unwrap();
    assert_eq!(
        (empty.events.len(), empty.covered_through, empty.floor),
        (0, 0, 1)
    );
    append_each(&writer, &TEN).await;
    let head = reader.head().unwrap();
    assert_eq!(head, 10);

    // By key, two at a time: the limit cuts, covered_through is the last event's number.
    let of_a = EventFilter::Key(key("c:a"));
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let page = reader.page(&of_a, after, head, 2, usize::MAX).unwrap();
        assert_eq!(page.floor, 1);
        assert!(page.events.len() <= 2);
        seen.extend(numbers(&page.events));
        if page.events.len() == 2 {
            assert_eq!(page.covered_through, page.events[1].sequence_number);
        } else {
            assert_eq!(page.covered_through, head);
        }
        if page.covered_through == head {
            break;
        }
        after = page.covered_through;
    }
    assert_eq!(seen, vec![1, 3, 5, 8, 10]);
    // Each event carries its row's current position; event 8 updated row m3.
    let page = reader.page(&of_a, 0, head, 10, usize::MAX).unwrap();
    let rows: Vec<(u64, u64, bool)> = page
        .events
        .iter()
        .map(|e| (e.sequence_number, e.stream_sequence, e.replaced))
        .collect();
    assert_eq!(
        rows,
        vec![
            (1, 1, false),
            (3, 2, false),
            (5, 3, false),
            (8, 2, true),
            (10, 4, false)
        ]
    );

    // `through` bounds the page; a page not cut by the limit covers through `through`.
    let page = reader.page(&of_a, 1, 6, 10, usize::MAX).unwrap();
    assert_eq!(
        (numbers(&page.events), page.covered_through),
        (vec![3, 5], 6)
    );
    let page = reader
        .page(&EventFilter::Key(key("x:none")), 0, head, 10, usize::MAX)
        .unwrap();
    assert_eq!((page.events.len(), page.covered_through), (0, head));

    let channel_c = EventFilter::Channel(Channel::new("c").unwrap());
    let page = reader.page(&channel_c, 2, 9, 3, usize::MAX).unwrap();
    assert_eq!(
        (numbers(&page.events), page.covered_through),
        (vec![3, 5, 6], 6)
    );
    let page = reader.page(&channel_c, 6, 9, 3, usize::MAX).unwrap();
    assert_eq!((numbers(&page.events), page.covered_through), (vec![8], 9));

    let page = reader
        .page(&EventFilter::All, 3, 7, 100, usize::MAX)
        .unwrap();
    assert_eq!(
        (numbers(&page.events), page.covered_through),
        (vec![4, 5, 6, 7], 7)
    );
    let page = reader.page(&EventFilter::All, 3, 7, 4, usize::MAX).unwrap();
    assert_eq!(
        (numbers(&page.events), page.covered_through),
        (vec![4, 5, 6, 7], 7)
    );
    let page = reader.page(&EventFilter::All, 3, 7, 2, usize::MAX).unwrap();
    assert_eq!(
        (numbers(&page.events), page.covered_through),
        (vec![4, 5], 5)
    );

    // After a prune the page says where the log starts now.
    writer.prune(5, 100).await.unwrap();
    let page = reader
        .page(&EventFilter::All, 0, head, 100, usize::MAX)
        .unwrap();
    assert_eq!(page.floor, 5);
    assert_eq!(numbers(&page.events), vec![5, 6, 7, 8, 9, 10]);
    let page = reader.page(&of_a, 0, head, 100, usize::MAX).unwrap();
    assert_eq!((numbers(&page.events), page.floor), (vec![5, 8, 10], 5));
    writer.close().await;
}

/// A stream's positions never go back: after pruning removed its newest row, or all of its rows,
/// a new row gets one past the highest position the stream ever gave (a client paging the stream
/// by `after` would otherwise never see it).
async fn positions_never_go_back_after_pruning(backend: impl Backend) {
    let (writer, reader, _) = backend.open(Box::new(|_| Ok(())));
    let positions = |events: &[CommittedEvent]| -> Vec<u64> {
        events.iter().map(|e| e.stream_sequence).collect()
    };
    // p:x gets rows 1..3; q:y gets a (1) and b (2), then a is updated (event 6).
    let first = append_each(
        &writer,
        &[
            ("p:x", "m1", "1"),
            ("p:x", "m2", "2"),
            ("p:x", "m3", "3"),
            ("q:y", "a", "4"),
            ("q:y", "b", "5"),
            ("q:y", "a", "6"),
        ],
    )
    .await;
    assert_eq!(positions(&first), vec![1, 2, 3, 1, 2, 1]);
    // Everything up to event 5 goes: all of p:x, and q:y's row b (its last event is 5); row a
    // lives on (its last event, 6, stays).
    let report = writer.prune(6, 100).await.unwrap();
    assert_eq!((report.floor, report.deleted), (6, 5));
    assert!(
        reader
            .stream_rows(&key("p:x"), 0, 10, usize::MAX)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        positions(&reader.stream_rows(&key("q:y"), 0, 10, usize::MAX).unwrap()),
        vec![1]
    );
    let next = append_each(&writer, &[("p:x", "m4", "7"), ("q:y", "c", "8")]).await;
    assert_eq!(positions(&next), vec![4, 3]);
    assert_eq!(
        positions(&reader.stream_rows(&key("p:x"), 3, 10, usize::MAX).unwrap()),
        vec![4]
    );
    assert_eq!(
        positions(&reader.stream_rows(&key("q:y"), 0, 10, usize::MAX).unwrap()),
        vec![1, 3]
    );
    // And the position stays past the pruned ones from then on.
    let more = append_each(&writer, &[("p:x", "m5", "9")]).await;
    assert_eq!(positions(&more), vec![5]);
    writer.close().await;
}

/// Every read of events stops at its byte budget ([`seqcast_persistence::read_bytes`]: data and
/// message id): it reads events in order until the bytes read reach `max_bytes`, the event that
/// reaches or crosses it included (one event larger than the budget is read alone), and a page
/// cut by its bytes accounts only for what it read, so paging on reads the rest.
async fn every_read_stops_at_its_byte_budget(backend: impl Backend) {
    let (writer, reader, _) = backend.open(Box::new(|_| Ok(())));
    // Ten events of key c:a, each 1,002 bytes: data of 1,000 (a JSON string), id of 2.
    let data = format!("\"{}\"", "x".repeat(998));
    let ids: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let events: Vec<(&str, &str, &str)> = ids
        .iter()
        .map(|id| ("c:a", id.as_str(), data.as_str()))
        .collect();
    let written = append_each(&writer, &events).await;
    assert!(written.iter().all(|e| e.read_bytes() == 1_002));
    assert_eq!(seqcast_persistence::read_bytes(&data, "m0"), 1_002);
    let filters = [
        EventFilter::All,
        EventFilter::Key(key("c:a")),
        EventFilter::Channel(Channel::new("c").unwrap()),
    ];
    for filter in &filters {
        // 2,500 is crossed by the third event: three are read, whatever the count allows.
        let read =
            |max_bytes| numbers(&log_after(&reader, 0, 100, filter.clone(), max_bytes).unwrap());
        assert_eq!(read(2_500), vec![1, 2, 3], "{filter:?}");
        assert_eq!(
            read(3_006),
            vec![1, 2, 3],
            "{filter:?}: reaching the budget stops"
        );
        assert_eq!(read(3_007), vec![1, 2, 3, 4], "{filter:?}");
        assert_eq!(
            read(1),
            vec![1],
            "{filter:?}: one event larger than the budget"
        );
        assert_eq!(read(0), vec![1], "{filter:?}");
        assert_eq!(read(usize::MAX).len(), 10, "{filter:?}");
        // The count still bounds it.
        assert_eq!(
            numbers(&log_after(&reader, 0, 2, filter.clone(), 100_000).unwrap()),
            vec![1, 2]
        );

        // Pages: cut by the bytes, each accounts for what it read; paging on reads everything.
        let page = reader.page(filter, 0, 10, 100, 2_500).unwrap();
        assert_eq!(
            (numbers(&page.events), page.covered_through),
            (vec![1, 2, 3], 3),
            "{filter:?}"
        );
        let (mut after, mut seen, mut pages) = (0, Vec::new(), 0);
        while after < 10 {
            let page = reader.page(filter, after, 10, 100, 2_500).unwrap();
            seen.extend(numbers(&page.events));
            after = page.covered_through;
            pages += 1;
        }
        assert_eq!(
            (seen, pages),
            ((1..=10).collect::<Vec<_>>(), 4),
            "{filter:?}"
        );
        let last = reader.page(filter, 9, 10, 100, 2_500).unwrap();
        assert_eq!(
            (numbers(&last.events), last.covered_through),
            (vec![10], 10),
            "not cut"
        );
        let one = reader.page(filter, 4, 10, 100, 0).unwrap();
        assert_eq!(
            (numbers(&one.events), one.covered_through),
            (vec![5], 5),
            "{filter:?}"
        );
    }
    // A key's page handed out by visiting stops at the same place.
    let mut visited = Vec::new();
    let bounds = reader
        .visit_key_page(&key("c:a"), 2, 10, 100, 2_500, &mut |ev| {
            visited.push(ev.sequence_number);
        })
        .unwrap();
    assert_eq!((visited, bounds.covered_through), (vec![3, 4, 5], 5));
    // The newest events, newest first until the budget: the last three, ascending.
    assert_eq!(
        numbers(&reader.latest_events(100, 0, 2_500).unwrap()),
        vec![8, 9, 10]
    );
    assert_eq!(numbers(&reader.latest_events(100, 0, 0).unwrap()), vec![10]);
    assert_eq!(
        numbers(&reader.latest_events(2, 0, usize::MAX).unwrap()),
        vec![9, 10]
    );
    assert_eq!(reader.latest_events(100, 0, usize::MAX).unwrap().len(), 10);
    // A stream's rows, by position.
    let rows = reader.stream_rows(&key("c:a"), 0, 100, 2_500).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.stream_sequence).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let rows = reader.stream_rows(&key("c:a"), 3, 100, 1).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.stream_sequence).collect::<Vec<_>>(),
        vec![4]
    );
    // One event larger than the budget after small ones ends the read with it.
    let big = format!("\"{}\"", "y".repeat(9_998));
    append_each(&writer, &[("c:a", "big", big.as_str()), ("c:a", "s", "1")]).await;
    assert_eq!(
        numbers(&log_after(&reader, 9, 100, EventFilter::All, 2_500).unwrap()),
        vec![10, 11]
    );
    assert_eq!(numbers(&reader.latest_events(100, 0, 2).unwrap()), vec![12]);
    assert_eq!(
        numbers(&reader.latest_events(100, 0, 3).unwrap()),
        vec![11, 12]
    );
    writer.close().await;
}

/// `visit_key_page` hands out exactly what `page` returns for the key (fields, bounds, floor),
/// whether the limit cuts the page or not, for an unknown key, and after a prune.
async fn visiting_a_key_page_matches_page(backend: impl Backend) {
    let (writer, reader, _) = backend.open(Box::new(|_| Ok(())));
    append_each(&writer, &TEN).await;
    let head = reader.head().unwrap();
    let check = |k: &str, after: u64, through: u64, limit: usize| {
        let key = key(k);
        let page = reader
            .page(
                &EventFilter::Key(key.clone()),
                after,
                through,
                limit,
                usize::MAX,
            )
            .unwrap();
        let mut seen = Vec::new();
        let bounds = reader
            .visit_key_page(&key, after, through, limit, usize::MAX, &mut |ev| {
                seen.push(ev.to_committed(&key));
            })
            .unwrap();
        assert_eq!(seen, page.events, "{k} ({after}, {through}] limit {limit}");
        assert_eq!(
            (bounds.covered_through, bounds.floor),
            (page.covered_through, page.floor)
        );
        seen.len()
    };
    assert_eq!(check("c:a", 0, head, 2), 2);
    assert_eq!(check("c:a", 0, head, 100), 5);
    assert_eq!(check("c:a", 3, 8, 100), 2);
    assert_eq!(check("x:none", 0, head, 10), 0);
    assert_eq!(check("c:a", 5, 5, 10), 0);
    writer.prune(5, 100).await.unwrap();
    assert_eq!(check("c:a", 0, head, 100), 3);
    writer.close().await;
}

/// `visit_keys_page` hands out the events of several keys, each above its own position, merged
/// in global order — exactly what `page(All)` filtered that way holds — with the bounds of a
/// key page (cut by the limit or the bytes at its last event, else `through`), for unknown keys,
/// and with the floor after a prune.
async fn visiting_keys_merges_them_in_global_order(backend: impl Backend) {
    let (writer, reader, _) = backend.open(Box::new(|_| Ok(())));
    append_each(&writer, &TEN).await;
    let head = reader.head().unwrap();
    let check = |keys: &[(&str, u64)], through: u64, limit: usize, max_bytes: usize| {
        let keys: Vec<_> = keys.iter().map(|&(k, a)| (key(k), a)).collect();
        let mut seen = Vec::new();
        let bounds = reader
            .visit_keys_page(&keys, through, limit, max_bytes, &mut |i, ev| {
                seen.push(ev.to_committed(&keys[i].0));
            })
            .unwrap();
        let after = keys.iter().map(|&(_, a)| a).min().unwrap();
        let all = reader
            .page(&EventFilter::All, after, through, 100, usize::MAX)
            .unwrap();
        let wanted: Vec<CommittedEvent> = all
            .events
            .into_iter()
            .filter(|e| {
                keys.iter()
                    .any(|(k, a)| *k == e.key && e.sequence_number > *a)
            })
            .filter(|e| e.sequence_number <= bounds.covered_through)
            .collect();
        assert_eq!(seen, wanted, "{keys:?} through {through} limit {limit}");
        assert_eq!(bounds.floor, all.floor);
        (numbers(&seen), bounds.covered_through)
    };
    // c:a: 1 3 5 8 10; c:b: 2 6; d:a: 4 7 9.
    assert_eq!(
        check(
            &[("c:a", 4), ("c:b", 0), ("x:none", 0)],
            head,
            100,
            usize::MAX
        ),
        (vec![2, 5, 6, 8, 10], head)
    );
    assert_eq!(
        check(&[("c:a", 4), ("c:b", 0), ("d:a", 7)], head, 3, usize::MAX),
        (vec![2, 5, 6], 6),
        "the limit cuts at the last event"
    );
    assert_eq!(
        check(&[("c:a", 0), ("d:a", 0)], 7, 100, usize::MAX),
        (vec![1, 3, 4, 5, 7], 7)
    );
    // Each event weighs about its data and id (a few bytes): two fit in 4.
    assert_eq!(
        check(&[("c:a", 0), ("d:a", 0)], head, 100, 4),
        (vec![1, 3], 3),
        "the bytes cut at the event that reaches them"
    );
    assert_eq!(
        check(&[("c:a", 9), ("c:b", 9)], 9, 10, usize::MAX),
        (vec![], 9)
    );
    writer.prune(5, 100).await.unwrap();
    assert_eq!(
        check(&[("c:a", 0), ("d:a", 6)], head, 100, usize::MAX),
        (vec![5, 7, 8, 9, 10], head)
    );
    writer.close().await;
}

/// `count_key` and `nth_newest_of_key` answer from one key's events only.
async fn key_counts_and_nth_newest(backend: impl Backend) {
    let (writer, reader, _) = backend.open(Box::new(|_| Ok(())));
    let a = key("c:a");
    assert_eq!(reader.count_key(&a, 0, 100).unwrap(), 0);
    assert_eq!(reader.nth_newest_of_key(&a, 100, 1).unwrap(), None);
    append_each(&writer, &TEN).await;
    assert_eq!(reader.count_key(&a, 0, 10).unwrap(), 5);
    assert_eq!(reader.count_key(&a, 1, 8).unwrap(), 3);
    assert_eq!(reader.count_key(&a, 3, 4).unwrap(), 0);
    assert_eq!(reader.count_key(&a, 8, 3).unwrap(), 0);
    assert_eq!(reader.count_key(&key("d:a"), 0, u64::MAX).unwrap(), 3);
    assert_eq!(reader.count_key(&key("x:none"), 0, 10).unwrap(), 0);

    assert_eq!(reader.nth_newest_of_key(&a, 10, 1).unwrap(), Some(10));
    assert_eq!(reader.nth_newest_of_key(&a, 10, 2).unwrap(), Some(8));
    assert_eq!(reader.nth_newest_of_key(&a, 9, 1).unwrap(), Some(8));
    assert_eq!(reader.nth_newest_of_key(&a, 7, 3).unwrap(), Some(1));
    assert_eq!(reader.nth_newest_of_key(&a, 7, 4).unwrap(), None);
    assert_eq!(reader.nth_newest_of_key(&a, u64::MAX, 5).unwrap(), Some(1));
    assert_eq!(reader.nth_newest_of_key(&a, u64::MAX, 6).unwrap(), None);
    assert_eq!(reader.nth_newest_of_key(&a, 0, 1).unwrap(), None);
    assert_eq!(
        reader.nth_newest_of_key(&key("c:b"), 10, 2).unwrap(),
        Some(2)
    );

    // Pruned events no longer count.
    writer.prune(4, 100).await.unwrap();
    assert_eq!(reader.count_key(&a, 0, 10).unwrap(), 3);
    assert_eq!(reader.nth_newest_of_key(&a, 10, 3).unwrap(), Some(5));
    assert_eq!(reader.nth_newest_of_key(&a, 10, 4).unwrap(), None);
    writer.close().await;
}

/// `first_at_or_after` finds where the log reaches a time.
async fn first_at_or_after_finds_a_time(backend: impl Backend) {
    let (writer, reader, _) = backend.open(Box::new(|_| Ok(())));
    assert_eq!(reader.first_at_or_after(0).unwrap(), None);
    let mut times = Vec::new();
    for n in 1..=9u64 {
        let batch: Vec<_> = (0..n % 3 + 1)
            .map(|i| event("c:a", &format!("m{n}-{i}"), "1"))
            .collect();
        let committed = writer.append(batch).await.unwrap();
        times.push((committed[0].sequence_number, committed[0].timestamp_ms));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let head = reader.head().unwrap();
    let all = log_after(&reader, 0, 1000, EventFilter::All, usize::MAX).unwrap();
    assert_eq!(all.len() as u64, head);
    assert!(
        all.windows(2)
            .all(|w| w[0].timestamp_ms <= w[1].timestamp_ms)
    );
    assert_eq!(reader.first_at_or_after(0).unwrap(), Some(1));
    for (seq, ts) in &times {
        // The first event of each batch is the first at its time (batches 3 ms apart).
        let expected = all
            .iter()
            .find(|e| e.timestamp_ms >= *ts)
            .unwrap()
            .sequence_number;
        assert_eq!(expected, *seq);
        assert_eq!(reader.first_at_or_after(*ts).unwrap(), Some(*seq));
        let later = all
            .iter()
            .find(|e| e.timestamp_ms > *ts)
            .map(|e| e.sequence_number);
        assert_eq!(reader.first_at_or_after(ts + 1).unwrap(), later);
    }
    let newest = all.last().unwrap().timestamp_ms;
    assert_eq!(reader.first_at_or_after(newest + 1).unwrap(), None);
    assert_eq!(reader.first_at_or_after(u64::MAX).unwrap(), None);

    // Only retained events count.
    writer.prune(times[4].0, 1000).await.unwrap();
    assert_eq!(reader.first_at_or_after(0).unwrap(), Some(times[4].0));
    writer.prune(u64::MAX, 1000).await.unwrap();
    assert_eq!(reader.first_at_or_after(0).unwrap(), None);
    writer.close().await;
}

/// Pruning raises a floor that never goes back, deletes below it in steps, removes the stream
/// rows whose data went with it, and never lets a number be used again.
async fn prune_trims_the_log_behind_a_rising_floor(backend: impl Backend) {
    let seen = Seen::default();
    let (writer, reader, info) = backend.open(seen.hook());
    append_each(&writer, &TEN).await;
    assert_eq!(reader.retention_floor().unwrap(), 1);
    let nothing = writer.prune(1, 100).await.unwrap();
    assert_eq!(
        nothing,
        PruneReport {
            floor: 1,
            deleted: 0,
            done: true
        }
    );

    let step = writer.prune(5, 3).await.unwrap();
    assert_eq!(
        step,
        PruneReport {
            floor: 5,
            deleted: 3,
            done: false
        }
    );
    assert_eq!(reader.retention_floor().unwrap(), 5);
    let step = writer.prune(5, 3).await.unwrap();
    assert_eq!(
        step,
        PruneReport {
            floor: 5,
            deleted: 1,
            done: true
        }
    );
    // The floor never goes back.
    let lower = writer.prune(2, 100).await.unwrap();
    assert_eq!(
        lower,
        PruneReport {
            floor: 5,
            deleted: 0,
            done: true
        }
    );
    assert_eq!(reader.retention_floor().unwrap(), 5);

    assert_eq!(
        numbers(&log_after(&reader, 0, 100, EventFilter::All, usize::MAX).unwrap()),
        (5..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        numbers(&log_after(&reader, 0, 100, EventFilter::Key(key("c:a")), usize::MAX).unwrap()),
        vec![5, 8, 10]
    );
    assert_eq!(reader.head().unwrap(), 10);
    // Rows whose last event was pruned are gone (m1 of c:a, m2 of c:b); m3 of c:a was
    // updated by event 8, so it stays with that data.
    let rows = reader.stream_rows(&key("c:a"), 0, 10, usize::MAX).unwrap();
    let rows: Vec<(u64, &str, u64)> = rows
        .iter()
        .map(|r| (r.stream_sequence, r.message_id.as_str(), r.sequence_number))
        .collect();
    assert_eq!(rows, vec![(2, "m3", 8), (3, "m5", 5), (4, "m10", 10)]);
    let rows = reader.stream_rows(&key("c:b"), 0, 10, usize::MAX).unwrap();
    assert_eq!(numbers(&rows), vec![6]);
    assert!(
        reader
            .latest_events(100, 0, usize::MAX)
            .unwrap()
            .iter()
            .all(|e| e.sequence_number >= 5)
    );

    // Everything: the floor is head + 1, the log is empty, head stays, numbers continue.
    let all = writer.prune(u64::MAX, 2).await.unwrap();
    assert_eq!(
        all,
        PruneReport {
            floor: 11,
            deleted: 2,
            done: false
        }
    );
    loop {
        if writer.prune(u64::MAX, 2).await.unwrap().done {
            break;
        }
    }
    assert_eq!(reader.retention_floor().unwrap(), 11);
    assert_eq!(reader.head().unwrap(), 10);
    assert!(
        log_after(&reader, 0, 100, EventFilter::All, usize::MAX)
            .unwrap()
            .is_empty()
    );
    assert!(
        reader
            .stream_rows(&key("c:a"), 0, 10, usize::MAX)
            .unwrap()
            .is_empty()
    );
    let page = reader
        .page(&EventFilter::All, 0, 10, 100, usize::MAX)
        .unwrap();
    assert_eq!(
        (page.events.len(), page.covered_through, page.floor),
        (0, 10, 11)
    );

    let next = writer.append(vec![event("c:a", "m3", "8")]).await.unwrap();
    // m3's row was pruned with its data: the same id and data are a new row now.
    assert_eq!((next[0].sequence_number, next[0].replaced), (11, false));
    assert_eq!(reader.head().unwrap(), 11);
    // A floor above head + 1 is held at head + 1.
    let above = writer.prune(100, 0).await.unwrap();
    assert_eq!(
        above,
        PruneReport {
            floor: 12,
            deleted: 0,
            done: false
        }
    );
    assert!(writer.prune(100, 10).await.unwrap().done);
    assert_eq!(*seen.numbers().last().unwrap(), 11);
    writer.close().await;
    assert!(matches!(
        writer.prune(100, 10).await,
        Err(StoreError::Closed)
    ));

    if backend.persists() {
        // Reopened: the high-water mark and the floor survive.
        let (writer, reader, again) = backend.open(Box::new(|_| Ok(())));
        assert_eq!((again.epoch, again.head), (info.epoch, 11));
        assert_eq!(reader.retention_floor().unwrap(), 12);
        assert!(
            log_after(&reader, 0, 100, EventFilter::All, usize::MAX)
                .unwrap()
                .is_empty()
        );
        let next = writer.append(vec![event("c:a", "z", "1")]).await.unwrap();
        assert_eq!(next[0].sequence_number, 12);
        writer.close().await;
    }
}

/// A repeat of a message id with the same data is a retry: the committed numbers come back,
/// nothing is written or handed to the hook, and numbers stay dense. Different data is an
/// upsert.
async fn a_retry_uses_no_number(backend: impl Backend) {
    let seen = Seen::default();
    let (writer, reader, info) = backend.open(seen.hook());
    let first = writer
        .append(vec![event("c:a", "x", r#"{"v":1}"#)])
        .await
        .unwrap()
        .remove(0);
    writer.append(vec![event("c:a", "y", "2")]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3)).await;
    let retry = writer
        .append(vec![event("c:a", "x", r#"{"v":1}"#)])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(retry, first);
    assert_eq!(reader.head().unwrap(), 2);
    assert_eq!(seen.numbers(), vec![1, 2]);
    // Verbatim: the same JSON value written differently is new data (an upsert).
    let upsert = writer
        .append(vec![event("c:a", "x", r#"{"v": 1}"#)])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        (
            upsert.sequence_number,
            upsert.stream_sequence,
            upsert.replaced
        ),
        (3, 1, true)
    );
    let again = writer
        .append(vec![event("c:a", "x", r#"{"v": 1}"#)])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(again, upsert);
    // The old data is not the row's data any more: back to it is an upsert too.
    let back = writer
        .append(vec![event("c:a", "x", r#"{"v":1}"#)])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        (back.sequence_number, back.stream_sequence, back.replaced),
        (4, 1, true)
    );
    // The same message id in another stream is another row.
    let other = writer
        .append(vec![event("c:b", "x", r#"{"v":1}"#)])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        (other.sequence_number, other.stream_sequence, other.replaced),
        (5, 1, false)
    );

    // A batch mixes new numbers with a retry's older one; a repeat inside the batch is a retry
    // of its first copy.
    let batch = writer
        .append(vec![
            event("c:a", "w", "6"),
            event("c:a", "y", "2"),
            event("c:a", "v", "7"),
            event("c:a", "v", "7"),
            event("c:a", "w", "8"),
        ])
        .await
        .unwrap();
    let got: Vec<(u64, u64, bool)> = batch
        .iter()
        .map(|e| (e.sequence_number, e.stream_sequence, e.replaced))
        .collect();
    assert_eq!(
        got,
        vec![
            (6, 3, false),
            (2, 2, false),
            (7, 4, false),
            (7, 4, false),
            (8, 3, true)
        ]
    );
    assert_eq!(batch[1].data, "2");
    assert_eq!(seen.numbers(), (1..=8).collect::<Vec<_>>());
    let next = writer.append(vec![event("d:a", "n", "9")]).await.unwrap();
    assert_eq!(next[0].sequence_number, 9);
    // Dense: the log holds exactly 1..=head.
    let log = log_after(&reader, 0, 100, EventFilter::All, usize::MAX).unwrap();
    assert_eq!(numbers(&log), (1..=9).collect::<Vec<_>>());
    assert_eq!(log, *seen.events.lock().unwrap());
    // A batch of nothing but retries reaches nobody.
    let only_retries = writer
        .append(vec![event("d:a", "n", "9"), event("c:a", "y", "2")])
        .await
        .unwrap();
    assert_eq!(numbers(&only_retries), vec![9, 2]);
    assert_eq!(seen.numbers().len(), 9);
    assert_eq!(writer.health().stats.events_committed, 9);
    writer.close().await;

    if backend.persists() {
        let (writer, reader, again) = backend.open(Box::new(|_| Ok(())));
        assert_eq!((again.epoch, again.head), (info.epoch, 9));
        let retry = writer
            .append(vec![event("c:a", "x", r#"{"v":1}"#)])
            .await
            .unwrap();
        assert_eq!(retry[0].sequence_number, 4);
        let next = writer.append(vec![event("c:a", "new", "1")]).await.unwrap();
        assert_eq!(next[0].sequence_number, 10);
        assert_eq!(reader.head().unwrap(), 10);
        writer.close().await;
    }
}

/// Concurrent appends that share a group: the one the database refuses fails alone, the others
/// commit with dense numbers.
async fn a_refused_command_fails_alone(backend: impl Backend) {
    let seen = Seen::default();
    let (writer, reader, _) = backend.open(seen.hook());
    let mut tasks = Vec::new();
    for n in 0..40usize {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            let data = if n % 10 == 7 {
                "not json".to_owned()
            } else {
                n.to_string()
            };
            writer
                .append(vec![event("c:a", &format!("m{n}"), &data)])
                .await
        }));
    }
    let mut numbers = Vec::new();
    for (n, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(events) => numbers.push(events[0].sequence_number),
            Err(e) => {
                assert_eq!(n % 10, 7, "{e}");
                assert!(matches!(e, StoreError::Rejected(_)), "{e:?}");
            }
        }
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=36).collect::<Vec<_>>());
    assert_eq!(reader.head().unwrap(), 36);
    assert_eq!(seen.numbers(), (1..=36).collect::<Vec<_>>());
    writer.close().await;
}

/// One failure policy for the commit hook: when it refuses committed events (`Err`, or a panic,
/// which counts as one), the events stay committed but their publisher is answered
/// [`StoreError::Stopped`], the writer's health says it stopped, and every later append (and
/// prune) is refused without writing anything or calling the hook again.
async fn a_failing_hook_stops_the_writer(backend: impl Backend, panics: bool) {
    let calls = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&calls);
    let hook: CommitHook = Box::new(move |_events: &[CommittedEvent]| {
        if counted.fetch_add(1, Ordering::SeqCst) == 0 {
            return Ok(());
        }
        assert!(!panics, "the hook panics on its second call");
        Err(HookError::new("a hole in what the hook delivers"))
    });
    let (writer, reader, _) = backend.open(hook);
    let first = writer.append(vec![event("c:a", "m1", "1")]).await.unwrap();
    assert_eq!(first[0].sequence_number, 1);
    assert_eq!(writer.health().stopped, None);

    let refused = writer.append(vec![event("c:a", "m2", "2")]).await;
    assert!(
        matches!(refused, Err(StoreError::Stopped(_))),
        "the publisher of events the hook refused is not acknowledged: {refused:?}"
    );
    let stopped = writer
        .health()
        .stopped
        .expect("the health says the writer stopped");
    assert!(
        stopped.contains(if panics { "panicked" } else { "a hole" }),
        "{stopped}"
    );
    // Committed all the same: the log is the truth, and holds it.
    assert_eq!(reader.head().unwrap(), 2);

    let later = writer.append(vec![event("c:b", "m3", "3")]).await;
    assert!(matches!(later, Err(StoreError::Stopped(_))), "{later:?}");
    let prune = writer.prune(2, 10).await;
    assert!(matches!(prune, Err(StoreError::Stopped(_))), "{prune:?}");
    assert_eq!(
        reader.head().unwrap(),
        2,
        "nothing is written after the stop"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the hook is not called again"
    );
    writer.close().await;
}

macro_rules! contract_tests {
    ($module:ident, optional $backend:expr) => {
        contract_tests!(@ $module, $backend);
    };
    ($module:ident, $backend:expr) => {
        contract_tests!(@ $module, Some($backend));
    };
    (@ $module:ident, $backend:expr) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_appends_are_numbered_by_the_store() {
                let Some(backend) = $backend else { return };
                super::concurrent_appends_are_numbered_by_the_store(backend).await;
            }

            #[tokio::test]
            async fn a_repeated_message_id_is_an_upsert() {
                let Some(backend) = $backend else { return };
                super::a_repeated_message_id_is_an_upsert(backend).await;
            }

            #[tokio::test]
            async fn a_batch_is_all_or_nothing() {
                let Some(backend) = $backend else { return };
                super::a_batch_is_all_or_nothing(backend).await;
            }

            #[tokio::test]
            async fn a_reopened_store_continues_its_numbers() {
                let Some(backend) = $backend else { return };
                super::a_reopened_store_continues_its_numbers(backend).await;
            }

            #[tokio::test]
            async fn page_reads_the_log_in_ranges() {
                let Some(backend) = $backend else { return };
                super::page_reads_the_log_in_ranges(backend).await;
            }

            #[tokio::test]
            async fn positions_never_go_back_after_pruning() {
                let Some(backend) = $backend else { return };
                super::positions_never_go_back_after_pruning(backend).await;
            }

            #[tokio::test]
            async fn visiting_a_key_page_matches_page() {
                let Some(backend) = $backend else { return };
                super::visiting_a_key_page_matches_page(backend).await;
            }

            #[tokio::test]
            async fn visiting_keys_merges_them_in_global_order() {
                let Some(backend) = $backend else { return };
                super::visiting_keys_merges_them_in_global_order(backend).await;
            }

            #[tokio::test]
            async fn key_counts_and_nth_newest() {
                let Some(backend) = $backend else { return };
                super::key_counts_and_nth_newest(backend).await;
            }

            #[tokio::test]
            async fn first_at_or_after_finds_a_time() {
                let Some(backend) = $backend else { return };
                super::first_at_or_after_finds_a_time(backend).await;
            }

            #[tokio::test]
            async fn prune_trims_the_log_behind_a_rising_floor() {
                let Some(backend) = $backend else { return };
                super::prune_trims_the_log_behind_a_rising_floor(backend).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn a_refused_command_fails_alone() {
                let Some(backend) = $backend else { return };
                super::a_refused_command_fails_alone(backend).await;
            }

            #[tokio::test]
            async fn every_read_stops_at_its_byte_budget() {
                let Some(backend) = $backend else { return };
                super::every_read_stops_at_its_byte_budget(backend).await;
            }

            #[tokio::test]
            async fn a_retry_uses_no_number() {
                let Some(backend) = $backend else { return };
                super::a_retry_uses_no_number(backend).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_failing_hook_stops_the_writer() {
                let Some(backend) = $backend else { return };
                super::a_failing_hook_stops_the_writer(backend, false).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_panicking_hook_stops_the_writer() {
                let Some(backend) = $backend else { return };
                super::a_failing_hook_stops_the_writer(backend, true).await;
            }
        }
    };
}

contract_tests!(sqlite, Sqlite::new());
contract_tests!(memory, Memory);
contract_tests!(postgres, optional Postgres::new());

/// PostgreSQL answers a publisher only once the publishing node's tail has applied the event
/// (its hub has it): a node whose tail does not apply it in time (here: never started) answers
/// `Unavailable` — committed, not acknowledged — instead of acknowledging after the timeout;
/// once the tail runs, a retry with the same message id gets the committed number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_acknowledges_only_what_its_node_applied() {
    let Some(db) = Postgres::new() else { return };
    let seen = Seen::default();
    let mut config = PgConfig::new(&db.url);
    config.statement_timeout = Duration::from_secs(1);
    let (writer, reader, info) = PgStore::open_paused(config, seen.hook()).unwrap();
    let started = std::time::Instant::now();
    let answer = writer.append(vec![event("c:a", "m1", "1")]).await;
    let Err(StoreError::Unavailable(why)) = &answer else {
        panic!("acknowledged before this node applied it: {answer:?}");
    };
    assert!(why.contains("has not applied"), "{why}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(reader.head().unwrap(), 1, "committed all the same");
    assert!(seen.numbers().is_empty());

    writer.start_delivery(info.head);
    let retried = writer.append(vec![event("c:a", "m1", "1")]).await.unwrap();
    assert_eq!(retried[0].sequence_number, 1);
    assert_eq!(seen.numbers(), vec![1]);
    writer.close().await;
}
