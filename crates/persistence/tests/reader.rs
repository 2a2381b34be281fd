//! Readers, migrations and the repair command.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use rusqlite::Connection;
use seqcast_persistence::{
    AppliedMigration, CommittedEvent, DbReader, EventFilter, EventReader, EventWriter,
    RepairReport, SCHEMA_VERSION, StoreError, migrate, repair_sequences,
};
use seqcast_protocol::Channel;

fn numbers(events: &[CommittedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.sequence_number).collect()
}

/// 30 events over three keys in two channels: seq n goes to `keys[n % 3]`.
async fn store_with_30_events(dir: &tempfile::TempDir) -> Vec<CommittedEvent> {
    let (writer, _, _) = open(config(dir));
    let keys = ["chat:a", "chat:b", "news:a"];
    let mut all = Vec::new();
    for n in 1..=30 {
        let committed = writer
            .append(vec![event(keys[n % 3], &format!("m{n}"), &format!("{n}"))])
            .await
            .unwrap();
        all.extend(committed);
    }
    writer.close().await;
    all
}

#[tokio::test]
async fn pages_read_the_log_with_filters() {
    let dir = tempfile::tempdir().unwrap();
    let written = store_with_30_events(&dir).await;
    let reader = DbReader::open(&db_path(&dir)).unwrap();
    let head = reader.head().unwrap();
    assert_eq!(head, 30);

    // Paging the whole log 7 at a time, each page continuing where the last one's cover ends.
    let mut paged = Vec::new();
    let mut after = 0;
    while after < head {
        let page = reader
            .page(&EventFilter::All, after, head, 7, usize::MAX)
            .unwrap();
        assert!(page.events.len() <= 7);
        after = page.covered_through;
        paged.extend(page.events);
    }
    assert_eq!(paged, written);

    let key_only = reader
        .page(&EventFilter::Key(key("chat:b")), 10, head, 100, usize::MAX)
        .unwrap();
    assert_eq!(numbers(&key_only.events), vec![13, 16, 19, 22, 25, 28]);
    assert_eq!(key_only.covered_through, head);
    assert_eq!(
        key_only
            .events
            .iter()
            .map(|e| e.stream_sequence)
            .collect::<Vec<_>>(),
        vec![5, 6, 7, 8, 9, 10]
    );
    let channel = reader
        .page(
            &EventFilter::Channel(Channel::new("chat").unwrap()),
            20,
            head,
            4,
            usize::MAX,
        )
        .unwrap();
    assert_eq!(numbers(&channel.events), vec![21, 22, 24, 25]);
    assert_eq!(channel.covered_through, 25);
    let past_head = reader
        .page(&EventFilter::All, 30, head, 10, usize::MAX)
        .unwrap();
    assert!(past_head.events.is_empty());
    assert!(
        reader
            .page(&EventFilter::All, u64::MAX, head, 10, usize::MAX)
            .unwrap()
            .events
            .is_empty()
    );
}

#[tokio::test]
async fn latest_events_is_the_newest_n_not_older_than_the_cutoff() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    migrate(&path).unwrap();
    // Ten events one second apart, written as raw rows to control their timestamps.
    let rows: Vec<(String, i64)> = (1..=10).map(|n| (format!("m{n}"), n * 1000)).collect();
    let raw: Vec<(&str, &str, &str, i64, i64)> = rows
        .iter()
        .enumerate()
        .map(|(i, (id, ts))| ("w", "1", id.as_str(), i as i64 + 1, *ts))
        .collect();
    insert_raw(&path, &raw);
    let reader = DbReader::open(&path).unwrap();

    assert_eq!(
        numbers(&reader.latest_events(3, 0, usize::MAX).unwrap()),
        vec![8, 9, 10]
    );
    assert_eq!(
        numbers(&reader.latest_events(100, 0, usize::MAX).unwrap()),
        (1..=10).collect::<Vec<_>>()
    );
    // The age cutoff and the count both bound the window.
    assert_eq!(
        numbers(&reader.latest_events(100, 7000, usize::MAX).unwrap()),
        vec![7, 8, 9, 10]
    );
    assert_eq!(
        numbers(&reader.latest_events(2, 7000, usize::MAX).unwrap()),
        vec![9, 10]
    );
    assert!(
        reader
            .latest_events(5, 10_001, usize::MAX)
            .unwrap()
            .is_empty()
    );
    assert!(reader.latest_events(0, 0, usize::MAX).unwrap().is_empty());
    let newest = &reader.latest_events(1, 0, usize::MAX).unwrap()[0];
    assert_eq!(
        (
            newest.timestamp_ms,
            newest.stream_sequence,
            newest.message_id.as_str()
        ),
        (10_000, 10, "m10")
    );
}

#[tokio::test]
async fn stream_rows_pages_by_stream_position() {
    let dir = tempfile::tempdir().unwrap();
    let written = store_with_30_events(&dir).await;
    let reader = DbReader::open(&db_path(&dir)).unwrap();
    let k = key("news:a");
    let mine: Vec<&CommittedEvent> = written.iter().filter(|e| e.key == k).collect();
    assert_eq!(mine.len(), 10);

    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let page = reader.stream_rows(&k, after, 4, usize::MAX).unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().unwrap().stream_sequence;
        pages.push(page);
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![4, 4, 2]
    );
    let rows: Vec<CommittedEvent> = pages.into_iter().flatten().collect();
    // Never updated, so each row is exactly its one event.
    assert_eq!(rows.iter().collect::<Vec<_>>(), mine);
    assert!(
        reader
            .stream_rows(&key("none:x"), 0, 10, usize::MAX)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn migrate_is_idempotent_and_keeps_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let first = migrate(&path).unwrap();
    assert_eq!(
        first.applied,
        vec![
            AppliedMigration {
                version: 1,
                name: "initial"
            },
            AppliedMigration {
                version: 2,
                name: "stream_rows_by_position"
            },
            AppliedMigration {
                version: 3,
                name: "log_retention"
            },
            AppliedMigration {
                version: 4,
                name: "event_positions"
            },
            AppliedMigration {
                version: 5,
                name: "pruned_positions"
            }
        ]
    );
    assert_eq!(first.schema_version, SCHEMA_VERSION);
    let epoch = DbReader::open(&path).unwrap().epoch().unwrap();

    let again = migrate(&path).unwrap();
    assert!(again.applied.is_empty());
    assert_eq!(again.schema_version, SCHEMA_VERSION);
    assert_eq!(DbReader::open(&path).unwrap().epoch().unwrap(), epoch);

    let conn = Connection::open(&path).unwrap();
    let recorded: i64 = conn
        .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(recorded, i64::from(SCHEMA_VERSION));
    let journal: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
}

/// A database left at schema version 1 (as the first release wrote it), with an updated row.
fn version_1_database(path: &std::path::Path) {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE schema_migrations (
             version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at_ms INTEGER NOT NULL
         ) STRICT;",
    )
    .unwrap();
    conn.execute_batch(include_str!("../migrations/0001_initial.sql"))
        .unwrap();
    conn.execute_batch(
        "INSERT INTO schema_migrations VALUES (1, 'initial', 0); PRAGMA user_version = 1;",
    )
    .unwrap();
    drop(conn);
    insert_raw(
        path,
        &[
            ("chat", "a", "m1", 1, 1_000),
            ("chat", "b", "m1", 1, 1_000),
            ("chat", "a", "m2", 2, 1_001),
        ],
    );
    // m1 of chat:a was then updated by event 4 (the row keeps position 1).
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(
        "INSERT INTO events (stream_id, message_id, timestamp_ms, data) VALUES (1, 'm1', 1002, '\"new\"');
         UPDATE stream_rows SET last_sequence = 4 WHERE stream_id = 1 AND message_id = 'm1';",
    )
    .unwrap();
}

#[tokio::test]
async fn a_version_1_database_migrates_with_its_rows_and_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    version_1_database(&path);
    assert!(matches!(
        DbReader::open(&path),
        Err(StoreError::Unavailable(_))
    ));

    let report = migrate(&path).unwrap();
    assert_eq!(
        report.applied,
        vec![
            AppliedMigration {
                version: 2,
                name: "stream_rows_by_position"
            },
            AppliedMigration {
                version: 3,
                name: "log_retention"
            },
            AppliedMigration {
                version: 4,
                name: "event_positions"
            },
            AppliedMigration {
                version: 5,
                name: "pruned_positions"
            }
        ]
    );
    let reader = DbReader::open(&path).unwrap();
    let log = log_after(&reader, 0, 10, EventFilter::All, usize::MAX).unwrap();
    let summary: Vec<(u64, String, u64, bool)> = log
        .iter()
        .map(|e| {
            (
                e.sequence_number,
                e.key.to_string(),
                e.stream_sequence,
                e.replaced,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "chat:a".to_owned(), 1, false),
            (2, "chat:b".to_owned(), 1, false),
            (3, "chat:a".to_owned(), 2, false),
            (4, "chat:a".to_owned(), 1, true),
        ]
    );
    let rows = reader
        .stream_rows(&key("chat:a"), 0, 10, usize::MAX)
        .unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| (r.stream_sequence, r.sequence_number, r.data.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, 4, "\"new\""), (2, 3, "{\"n\":2}")]
    );

    // The writer continues the migrated streams: upsert keeps the position, a new row is max+1.
    let (writer, info, _) = open(config(&dir));
    assert_eq!(info.head, 4);
    let next = writer
        .append(vec![
            event("chat:a", "m2", "\"again\""),
            event("chat:a", "m3", "3"),
        ])
        .await
        .unwrap();
    assert_eq!(
        next.iter()
            .map(|e| (e.sequence_number, e.stream_sequence, e.replaced))
            .collect::<Vec<_>>(),
        vec![(5, 2, true), (6, 3, false)]
    );
    writer.close().await;
}

#[test]
fn readers_refuse_missing_old_and_newer_databases() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    assert!(matches!(
        DbReader::open(&path),
        Err(StoreError::Unavailable(_))
    ));
    assert!(!path.exists(), "a reader must not create the file");

    Connection::open(&path).unwrap();
    assert!(matches!(
        DbReader::open(&path),
        Err(StoreError::Unavailable(_))
    ));

    migrate(&path).unwrap();
    Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES (99, 'future', 0)",
            [],
        )
        .unwrap();
    assert!(matches!(DbReader::open(&path), Err(StoreError::Corrupt(_))));
    assert!(matches!(migrate(&path), Err(StoreError::Corrupt(_))));
}

/// Seed 004's V029 situation: a stream of 86 rows of which a buggy version wrote 82 at
/// position 0 (only the first four got real positions), next to a healthy stream.
fn buggy_fixture(path: &std::path::Path) {
    migrate(path).unwrap();
    let ids: Vec<String> = (1..=86).map(|n| format!("msg-{n:03}")).collect();
    let mut rows: Vec<(&str, &str, &str, i64, i64)> = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let position = if i < 4 { i as i64 + 1 } else { 0 };
        rows.push((
            "session",
            "codex-1",
            id.as_str(),
            position,
            1_000 + i as i64,
        ));
        if i % 20 == 0 {
            // Interleave a healthy stream, so insertion order is not just the rowid order of
            // one stream.
            let n = i as i64 / 20 + 1;
            rows.push((
                "session",
                "claude-1",
                ["h1", "h2", "h3", "h4", "h5"][i / 20],
                n,
                1_000,
            ));
        }
    }
    insert_raw(path, &rows);
    let zeros: i64 = Connection::open(path)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM stream_rows JOIN streams USING (stream_id)
             WHERE request_id = 'codex-1' AND stream_sequence = 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(zeros, 82);
}

#[tokio::test]
async fn repair_renumbers_a_buggy_stream_by_insertion_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    buggy_fixture(&path);

    let report = repair_sequences(&path).unwrap();
    assert_eq!(
        report,
        RepairReport {
            streams: 2,
            rows_renumbered: 82
        }
    );
    let reader = DbReader::open(&path).unwrap();
    let broken = key("session:codex-1");
    let rows = reader.stream_rows(&broken, 0, 1000, usize::MAX).unwrap();
    let order: Vec<(u64, String)> = rows
        .iter()
        .map(|r| (r.stream_sequence, r.message_id.to_string()))
        .collect();
    let expected: Vec<(u64, String)> = (1..=86).map(|n| (n, format!("msg-{n:03}"))).collect();
    assert_eq!(order, expected);
    // Pagination works again.
    assert_eq!(
        reader
            .stream_rows(&broken, 80, 100, usize::MAX)
            .unwrap()
            .len(),
        6
    );
    // The events carry their positions and are repaired with the rows.
    let log = log_after(
        &reader,
        0,
        1000,
        EventFilter::Key(broken.clone()),
        usize::MAX,
    )
    .unwrap();
    assert_eq!(
        log.iter().map(|e| e.stream_sequence).collect::<Vec<_>>(),
        (1..=86).collect::<Vec<_>>()
    );
    let healthy = reader
        .stream_rows(&key("session:claude-1"), 0, 10, usize::MAX)
        .unwrap();
    assert_eq!(
        healthy
            .iter()
            .map(|r| r.stream_sequence)
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );

    // Idempotent, and the writer continues the repaired stream.
    assert_eq!(repair_sequences(&path).unwrap().rows_renumbered, 0);
    let (writer, info, _) = open(config(&dir));
    assert_eq!(info.head, 91);
    let next = writer
        .append(vec![event("session:codex-1", "msg-087", "{}")])
        .await
        .unwrap();
    assert_eq!((next[0].sequence_number, next[0].stream_sequence), (92, 87));
    writer.close().await;
}

#[tokio::test]
async fn repair_leaves_a_healthy_database_alone() {
    let dir = tempfile::tempdir().unwrap();
    let written = store_with_30_events(&dir).await;
    assert_eq!(
        repair_sequences(&db_path(&dir)).unwrap(),
        RepairReport {
            streams: 3,
            rows_renumbered: 0
        }
    );
    let reader = DbReader::open(&db_path(&dir)).unwrap();
    assert_eq!(
        log_after(&reader, 0, 100, EventFilter::All, usize::MAX).unwrap(),
        written
    );
}
