//! The writer: numbering, group commit, upserts, batches, restarts, shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use seqcast_persistence::{
    DbReader, EventFilter, EventReader, EventWriter, StoreConfig, StoreError,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_consecutive_numbers_in_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, info, log) = open(config(&dir));
    assert_eq!(info.head, 0);

    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let writer = writer.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let key = format!("chat:req-{}", i % 7);
                let data = format!("{{\"i\":{i}}}");
                let reply = writer
                    .append(vec![event(&key, &format!("m{i}"), &data)])
                    .await;
                // Persist-first, fan-out before the answer: the hook has seen it by now.
                if let Ok(committed) = &reply {
                    assert!(log.events().contains(&committed[0]));
                }
                reply
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        let mut committed = task.await.unwrap().unwrap();
        assert_eq!(committed.len(), 1);
        replies.push(committed.remove(0));
    }

    // Deployment-wide: 1..=400, each once.
    let mut numbers: Vec<u64> = replies.iter().map(|e| e.sequence_number).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=400).collect::<Vec<_>>());

    // Per stream: 1, 2, 3… with no holes, in the order of the global numbers.
    let mut by_key: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for e in &replies {
        assert!(!e.replaced);
        by_key
            .entry(e.key.to_string())
            .or_default()
            .push((e.sequence_number, e.stream_sequence));
    }
    assert_eq!(by_key.len(), 7);
    for (key, mut pairs) in by_key {
        pairs.sort_unstable();
        let positions: Vec<u64> = pairs.iter().map(|p| p.1).collect();
        let expected: Vec<u64> = (1..=pairs.len() as u64).collect();
        assert_eq!(positions, expected, "stream {key}");
    }

    // The hook saw every event once, in strictly increasing order, before the replies; and
    // each reply is exactly what the hook was given.
    let hooked = log.events();
    let hooked_numbers: Vec<u64> = hooked.iter().map(|e| e.sequence_number).collect();
    assert_eq!(hooked_numbers, (1..=400).collect::<Vec<_>>());
    for reply in &replies {
        assert_eq!(&hooked[(reply.sequence_number - 1) as usize], reply);
    }
    let stats = writer.health().stats;
    assert_eq!(stats.events_committed, 400);
    assert_eq!(stats.commands_received, 400);
    assert_eq!(stats.transactions_committed, log.call_count() as u64);
    assert!(stats.transactions_committed <= 400);
    assert_eq!(stats.transactions_failed, 0);
    // What the database holds agrees with what was answered.
    let reader = DbReader::open(&db_path(&dir)).unwrap();
    assert_eq!(reader.head().unwrap(), 400);
    assert_eq!(
        log_after(&reader, 0, 1000, EventFilter::All, usize::MAX).unwrap(),
        hooked
    );
    writer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_takes_every_queued_command_into_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, _, log) = open(StoreConfig {
        busy_timeout: Duration::from_secs(60),
        ..config(&dir)
    });
    // Hold the write lock so commands pile up while the writer waits at BEGIN.
    let gate = LockGate::hold(&db_path(&dir));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let writer = writer.clone();
            tokio::spawn(async move {
                writer
                    .append(vec![event("feed:all", &format!("m{i}"), "{}")])
                    .await
            })
        })
        .collect();
    until_commands_arrived(&writer, 100).await;
    gate.release();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    // The writer took 1..k commands before blocking, and everything else in one go.
    let sizes: Vec<usize> = log.calls().iter().map(Vec::len).collect();
    assert!(sizes.len() <= 2, "group sizes {sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 100);
    assert!(sizes.iter().any(|&n| n >= 50), "group sizes {sizes:?}");
    assert_eq!(
        writer.health().stats.transactions_committed,
        sizes.len() as u64
    );
    writer.close().await;
}

#[tokio::test]
async fn without_group_commit_every_command_is_its_own_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, _, log) = open(StoreConfig {
        group_commit: false,
        busy_timeout: Duration::from_secs(60),
        ..config(&dir)
    });
    let gate = LockGate::hold(&db_path(&dir));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let writer = writer.clone();
            tokio::spawn(async move {
                writer
                    .append(vec![event("feed:all", &format!("m{i}"), "{}")])
                    .await
            })
        })
        .collect();
    until_commands_arrived(&writer, 20).await;
    gate.release();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(log.call_count(), 20);
    assert!(log.calls().iter().all(|c| c.len() == 1));
    assert_eq!(writer.health().stats.transactions_committed, 20);
    writer.close().await;
}

#[tokio::test]
async fn repeating_a_message_id_updates_the_row_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, _, _) = open(config(&dir));
    let first = writer
        .append(vec![event("doc:1", "a", r#"{"v":1}"#)])
        .await
        .unwrap();
    writer
        .append(vec![event("doc:1", "b", r#"{"v":2}"#)])
        .await
        .unwrap();
    let update = writer
        .append(vec![event("doc:1", "a", r#"{"v":3}"#)])
        .await
        .unwrap();
    assert_eq!(
        (
            first[0].sequence_number,
            first[0].stream_sequence,
            first[0].replaced
        ),
        (1, 1, false)
    );
    assert_eq!(
        (
            update[0].sequence_number,
            update[0].stream_sequence,
            update[0].replaced
        ),
        (3, 1, true)
    );
    assert_eq!(update[0].data, r#"{"v":3}"#);

    let reader = DbReader::open(&db_path(&dir)).unwrap();
    let rows = reader
        .stream_rows(&key("doc:1"), 0, 10, usize::MAX)
        .unwrap();
    let summary: Vec<(&str, u64, u64, &str, bool)> = rows
        .iter()
        .map(|r| {
            (
                r.message_id.as_str(),
                r.stream_sequence,
                r.sequence_number,
                r.data.as_str(),
                r.replaced,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a", 1, 3, r#"{"v":3}"#, true),
            ("b", 2, 2, r#"{"v":2}"#, false)
        ]
    );
    // The log keeps both versions of "a", each with the row's position.
    let events = log_after(&reader, 0, 10, EventFilter::All, usize::MAX).unwrap();
    let log: Vec<(u64, u64, &str, bool)> = events
        .iter()
        .map(|e| {
            (
                e.sequence_number,
                e.stream_sequence,
                e.data.as_str(),
                e.replaced,
            )
        })
        .collect();
    assert_eq!(
        log,
        vec![
            (1, 1, r#"{"v":1}"#, false),
            (2, 2, r#"{"v":2}"#, false),
            (3, 1, r#"{"v":3}"#, true)
        ]
    );
    // A new row after the upsert still takes the next position.
    let c = writer
        .append(vec![event("doc:1", "c", "null")])
        .await
        .unwrap();
    assert_eq!((c[0].sequence_number, c[0].stream_sequence), (4, 3));
    writer.close().await;
}

#[tokio::test]
async fn a_batch_is_one_transaction_with_consecutive_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, _, log) = open(config(&dir));
    let batch: Vec<_> = (0..5)
        .map(|i| {
            event(
                if i % 2 == 0 { "a:1" } else { "b:1" },
                &format!("m{i}"),
                "[]",
            )
        })
        .collect();
    let committed = writer.append(batch).await.unwrap();
    let numbers: Vec<(u64, u64)> = committed
        .iter()
        .map(|e| (e.sequence_number, e.stream_sequence))
        .collect();
    assert_eq!(numbers, vec![(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]);
    assert!(
        committed
            .iter()
            .all(|e| e.timestamp_ms == committed[0].timestamp_ms)
    );
    assert_eq!(log.calls(), vec![committed]);
    // The same message id twice in one batch: the second is an update of the first.
    let twice = writer
        .append(vec![event("a:1", "x", "1"), event("a:1", "x", "2")])
        .await
        .unwrap();
    assert_eq!(
        twice
            .iter()
            .map(|e| (e.sequence_number, e.stream_sequence, e.replaced))
            .collect::<Vec<_>>(),
        vec![(6, 4, false), (7, 4, true)]
    );
    writer.close().await;
}

#[tokio::test]
async fn a_failing_batch_commits_nothing_while_its_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, _, log) = open(StoreConfig {
        busy_timeout: Duration::from_secs(60),
        ..config(&dir)
    });
    let gate = LockGate::hold(&db_path(&dir));
    // The writer takes this one and waits at BEGIN; the next three queue behind it and are
    // taken together once the lock is released.
    let first = tokio::spawn({
        let writer = writer.clone();
        async move { writer.append(vec![event("s:1", "first", "0")]).await }
    });
    until_commands_arrived(&writer, 1).await;
    let good_before = tokio::spawn({
        let writer = writer.clone();
        async move { writer.append(vec![event("s:1", "before", "1")]).await }
    });
    until_commands_arrived(&writer, 2).await;
    let bad_batch = tokio::spawn({
        let writer = writer.clone();
        async move {
            writer
                .append(vec![
                    event("s:1", "b1", "2"),
                    event("s:2", "b2", "not json"),
                    event("s:1", "b3", "4"),
                ])
                .await
        }
    });
    until_commands_arrived(&writer, 3).await;
    let good_after = tokio::spawn({
        let writer = writer.clone();
        async move { writer.append(vec![event("s:1", "after", "5")]).await }
    });
    until_commands_arrived(&writer, 4).await;
    let bad_single = tokio::spawn({
        let writer = writer.clone();
        async move { writer.append(vec![event("s:1", "x", "{")]).await }
    });
    until_commands_arrived(&writer, 5).await;
    gate.release();

    let first = first.await.unwrap().unwrap();
    let before = good_before.await.unwrap().unwrap();
    let bad = bad_batch.await.unwrap();
    let after = good_after.await.unwrap().unwrap();
    assert!(matches!(bad, Err(StoreError::Rejected(_))), "{bad:?}");
    let bad_single = bad_single.await.unwrap();
    assert!(
        matches!(bad_single, Err(StoreError::Rejected(_))),
        "{bad_single:?}"
    );
    // Nothing of the batch took a number or a position: the savepoint rollback undid it.
    let numbers: Vec<(u64, u64)> = [&first, &before, &after]
        .iter()
        .map(|c| (c[0].sequence_number, c[0].stream_sequence))
        .collect();
    assert_eq!(numbers, vec![(1, 1), (2, 2), (3, 3)]);
    // The bad batch shared a transaction with `after` (the writer took all queued commands
    // once unblocked), so at most two transactions, none failed.
    let stats = writer.health().stats;
    assert!(stats.transactions_committed <= 2, "{stats:?}");
    assert_eq!(stats.transactions_failed, 0);
    assert_eq!(log.events().len(), 3);
    let reader = DbReader::open(&db_path(&dir)).unwrap();
    let ids: Vec<String> = log_after(&reader, 0, 100, EventFilter::All, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.message_id.to_string())
        .collect();
    assert_eq!(ids, vec!["first", "before", "after"]);
    assert!(
        reader
            .stream_rows(&key("s:2"), 0, 10, usize::MAX)
            .unwrap()
            .is_empty()
    );
    writer.close().await;
}

#[tokio::test]
async fn a_lone_failing_command_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, _, log) = open(config(&dir));
    writer.append(vec![event("k:1", "a", "1")]).await.unwrap();
    let bad = writer
        .append(vec![event("k:1", "b", "2"), event("k:1", "c", "{oops")])
        .await;
    assert!(
        matches!(bad, Err(StoreError::Rejected(ref m)) if m.contains("CHECK")),
        "{bad:?}"
    );
    let next = writer.append(vec![event("k:1", "d", "3")]).await.unwrap();
    assert_eq!((next[0].sequence_number, next[0].stream_sequence), (2, 2));
    assert_eq!(log.call_count(), 2);
    writer.close().await;
}

#[tokio::test]
async fn a_restart_continues_numbers_and_positions_under_the_same_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, first_info, _) = open(config(&dir));
    for i in 0..5 {
        writer
            .append(vec![event("r:1", &format!("m{i}"), "true")])
            .await
            .unwrap();
    }
    writer
        .append(vec![event("r:2", "x", "false")])
        .await
        .unwrap();
    writer.close().await;
    assert!(writer.health().stopped.is_some());

    let (writer, info, _) = open(config(&dir));
    assert_eq!(info.epoch, first_info.epoch);
    assert_eq!(info.head, 6);
    let next = writer
        .append(vec![
            event("r:1", "m5", "1"),
            event("r:2", "y", "2"),
            event("r:1", "m0", "3"),
        ])
        .await
        .unwrap();
    let numbers: Vec<(u64, u64, bool)> = next
        .iter()
        .map(|e| (e.sequence_number, e.stream_sequence, e.replaced))
        .collect();
    assert_eq!(numbers, vec![(7, 6, false), (8, 2, false), (9, 1, true)]);
    writer.close().await;

    // A different store (deleted and recreated) gets a different epoch.
    std::fs::remove_file(db_path(&dir)).unwrap();
    let (writer, fresh, _) = open(config(&dir));
    assert_ne!(fresh.epoch, first_info.epoch);
    assert_eq!(fresh.epoch.len(), 32);
    assert!(fresh.epoch.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(fresh.head, 0);
    writer.close().await;
}

#[tokio::test]
async fn timestamps_are_wall_clock_and_never_go_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, _, _) = open(config(&dir));
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let before = now();
    let mut last = 0;
    for i in 0..20 {
        let e = writer
            .append(vec![event("t:1", &format!("m{i}"), "0")])
            .await
            .unwrap();
        assert!(e[0].timestamp_ms >= last);
        last = e[0].timestamp_ms;
    }
    assert!(last >= before && last <= now());
    writer.close().await;
}

#[tokio::test]
async fn close_finishes_queued_work_then_refuses_new_appends() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, _, _) = open(config(&dir));
    // join! polls the append first, so it is queued before the shutdown command.
    let (queued, ()) = tokio::join!(writer.append(vec![event("c:1", "a", "1")]), writer.close());
    assert_eq!(queued.unwrap()[0].sequence_number, 1);
    assert!(writer.health().stopped.is_some());
    let late = writer.append(vec![event("c:1", "b", "2")]).await;
    assert_eq!(late, Err(StoreError::Closed));
    writer.close().await; // a second close is harmless
    // An empty append needs no writer.
    assert_eq!(writer.append(Vec::new()).await, Ok(Vec::new()));
}

#[test]
fn blocking_shutdown_joins_the_writer_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, _, log) = open(config(&dir));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let committed = runtime
        .block_on(writer.append(vec![event("b:1", "a", "1")]))
        .unwrap();
    assert_eq!(committed[0].sequence_number, 1);
    writer.shutdown();
    assert!(writer.health().stopped.is_some());
    assert_eq!(log.call_count(), 1);
    // The file is closed cleanly: the WAL was checkpointed into the database and removed.
    assert!(!wal_path(&db_path(&dir)).exists());
    let reader = DbReader::open(&db_path(&dir)).unwrap();
    assert_eq!(reader.head().unwrap(), 1);
}

#[test]
fn synchronous_parses_full_and_normal() {
    use seqcast_persistence::Synchronous;
    assert_eq!("full".parse::<Synchronous>(), Ok(Synchronous::Full));
    assert_eq!("NORMAL".parse::<Synchronous>(), Ok(Synchronous::Normal));
    assert!("off".parse::<Synchronous>().is_err());
    assert_eq!(Synchronous::default(), Synchronous::Full);
    assert_eq!(Synchronous::Normal.to_string(), "normal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_whole_transactions_only() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let (writer, _, _) = open(config(&dir));
    let reader = DbReader::open(&db_path(&dir)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (reader, stop, reads) = (reader.clone(), stop.clone(), reads.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let events =
                    log_after(&reader, 0, usize::MAX, EventFilter::All, usize::MAX).unwrap();
                // Batches of 5: a reader never sees part of one.
                assert_eq!(events.len() % 5, 0, "saw a partial batch");
                assert!(reader.head().unwrap() >= events.len() as u64);
                reads.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    for b in 0..40 {
        // Make sure reads really interleave with the writes.
        while reads.load(Ordering::SeqCst) < b / 4 && !watcher.is_finished() {
            tokio::task::yield_now().await;
        }
        let batch = (0..5)
            .map(|i| event("w:1", &format!("b{b}-{i}"), "0"))
            .collect();
        writer.append(batch).await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    assert!(reads.load(Ordering::SeqCst) >= 9);
    assert_eq!(
        log_after(&reader, 0, usize::MAX, EventFilter::All, usize::MAX)
            .unwrap()
            .len(),
        200
    );
    writer.close().await;
}

#[tokio::test]
async fn a_new_store_uses_small_pages_and_an_old_one_keeps_its_own() {
    use seqcast_persistence::NEW_DATABASE_PAGE_SIZE;
    let page_size = |path: &std::path::Path| -> u32 {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .unwrap()
    };

    // A store created by this build.
    let dir = tempfile::tempdir().unwrap();
    let (writer, _, _) = open(config(&dir));
    writer.append(vec![event("r:1", "a", "1")]).await.unwrap();
    writer.close().await;
    assert_eq!(page_size(&db_path(&dir)), NEW_DATABASE_PAGE_SIZE);
    assert_ne!(NEW_DATABASE_PAGE_SIZE, 4096);

    // A database file made with 4 KiB pages (an earlier build) opens, migrates and keeps them.
    let old = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(db_path(&old)).unwrap();
        conn.execute_batch(
            "PRAGMA page_size = 4096; PRAGMA journal_mode = WAL; CREATE TABLE t (x);",
        )
        .unwrap();
    }
    let (writer, info, _) = open(config(&old));
    assert_eq!(info.head, 0);
    let numbers = writer
        .append(vec![event("r:1", "a", "1"), event("r:1", "b", "2")])
        .await
        .unwrap();
    assert_eq!(numbers.len(), 2);
    assert_eq!(numbers[1].sequence_number, 2);
    writer.close().await;
    assert_eq!(page_size(&db_path(&old)), 4096);
}
