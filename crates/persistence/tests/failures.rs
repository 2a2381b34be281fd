//! The writer under failure: injected commit faults, a locked database, a read-only file.
//! In every case the caller gets an error, nothing is broadcast or left behind, and the
//! writer carries on once the condition clears.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use seqcast_persistence::{
    DbReader, EventFilter, EventReader, EventWriter, FaultInjector, StoreConfig, StoreError,
};

#[tokio::test]
async fn an_injected_commit_failure_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fault = FaultInjector::new();
    let (writer, _, log) = open(StoreConfig {
        fault: Some(fault.clone()),
        ..config(&dir)
    });
    writer.append(vec![event("f:1", "a", "1")]).await.unwrap();

    fault.fail_next_commits(1);
    let failed = writer
        .append(vec![event("f:1", "b", "2"), event("f:1", "a", "3")])
        .await;
    assert!(
        matches!(failed, Err(StoreError::Unavailable(_))),
        "{failed:?}"
    );
    assert_eq!(fault.pending_commit_failures(), 0);
    // Not broadcast, not stored, the upsert of "a" undone.
    assert_eq!(log.call_count(), 1);
    let reader = DbReader::open(&db_path(&dir)).unwrap();
    assert_eq!(reader.head().unwrap(), 1);
    let rows = reader.stream_rows(&key("f:1"), 0, 10, usize::MAX).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].data.as_str(), rows[0].replaced), ("1", false));

    // A rolled-back AUTOINCREMENT insert does not use up its number: the next event gets 2,
    // so committed numbers have no holes after a failed commit.
    let next = writer.append(vec![event("f:1", "c", "4")]).await.unwrap();
    assert_eq!((next[0].sequence_number, next[0].stream_sequence), (2, 2));
    assert_eq!(log.call_count(), 2);
    let stats = writer.health().stats;
    assert_eq!(
        (stats.transactions_committed, stats.transactions_failed),
        (2, 1)
    );
    writer.close().await;
}

#[tokio::test]
async fn a_commit_fault_fails_every_command_of_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let fault = FaultInjector::new();
    let (writer, _, log) = open(StoreConfig {
        fault: Some(fault.clone()),
        busy_timeout: std::time::Duration::from_secs(60),
        ..config(&dir)
    });
    fault.fail_next_commits(2);
    let gate = LockGate::hold(&db_path(&dir));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let writer = writer.clone();
            tokio::spawn(async move {
                writer
                    .append(vec![event("g:1", &format!("m{i}"), "0")])
                    .await
            })
        })
        .collect();
    until_commands_arrived(&writer, 10).await;
    gate.release();
    let mut failed = 0;
    for task in tasks {
        match task.await.unwrap() {
            Err(StoreError::Unavailable(_)) => failed += 1,
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    // At most two transactions formed (see group-commit test); both were failed.
    assert_eq!(failed, 10);
    assert_eq!(log.call_count(), 0);
    assert_eq!(DbReader::open(&db_path(&dir)).unwrap().head().unwrap(), 0);
    writer.close().await;
}

#[tokio::test]
async fn a_locked_database_is_unavailable_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, _, log) = open(StoreConfig {
        busy_timeout: SHORT_BUSY,
        ..config(&dir)
    });
    writer.append(vec![event("l:1", "a", "1")]).await.unwrap();

    let gate = LockGate::hold(&db_path(&dir));
    let blocked = writer.append(vec![event("l:1", "b", "2")]).await;
    match &blocked {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("locked"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    gate.release();

    let next = writer.append(vec![event("l:1", "c", "3")]).await.unwrap();
    assert_eq!((next[0].sequence_number, next[0].stream_sequence), (2, 2));
    assert_eq!(log.call_count(), 2);
    assert_eq!(writer.health().stats.transactions_failed, 1);
    writer.close().await;
}

#[tokio::test]
async fn a_file_made_read_only_while_running_is_unavailable_until_writable() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (writer, _, log) = open(config(&dir));
    writer.append(vec![event("ro:1", "a", "1")]).await.unwrap();

    // The database and its WAL become immutable (root ignores chmod, not this). The -shm
    // stays writable: SQLite maps it, and a write fault there would be SIGBUS, not an error.
    let Some(immutable) = Immutable::set(&[path.clone(), wal_path(&path)]) else {
        return;
    };
    let refused = writer.append(vec![event("ro:1", "b", "2")]).await;
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "{refused:?}"
    );
    assert_eq!(log.call_count(), 1);
    immutable.clear();

    let next = writer.append(vec![event("ro:1", "c", "3")]).await.unwrap();
    assert_eq!((next[0].sequence_number, next[0].stream_sequence), (2, 2));
    let reader = DbReader::open(&path).unwrap();
    let ids: Vec<String> = log_after(&reader, 0, 10, EventFilter::All, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.message_id.to_string())
        .collect();
    assert_eq!(ids, vec!["a", "c"]);
    writer.close().await;
}

#[tokio::test]
async fn a_file_read_only_at_open_serves_reads_and_recovers_when_writable() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (writer, info, _) = open(config(&dir));
    writer.append(vec![event("ro:1", "a", "1")]).await.unwrap();
    writer.close().await;

    let Some(immutable) = Immutable::set(std::slice::from_ref(&path)) else {
        return;
    };
    let (writer, reopened, log) = open(config(&dir));
    assert_eq!(reopened, seqcast_persistence::StoreInfo { head: 1, ..info });
    let refused = writer.append(vec![event("ro:1", "b", "2")]).await;
    match &refused {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("readonly"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let reader = DbReader::open(&path).unwrap();
    assert_eq!(reader.head().unwrap(), 1);
    immutable.clear();

    // The writer reopens its connection (one opened read-only stays read-only).
    let next = writer.append(vec![event("ro:1", "c", "3")]).await.unwrap();
    assert_eq!((next[0].sequence_number, next[0].stream_sequence), (2, 2));
    assert_eq!(log.call_count(), 1);
    writer.close().await;
}

#[tokio::test]
async fn a_replaced_file_is_not_continued() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (writer, _, _) = open(config(&dir));
    writer.append(vec![event("x:1", "a", "1")]).await.unwrap();
    writer.close().await;

    // Open read-only, so the first append fails and the writer drops its connection...
    let Some(immutable) = Immutable::set(std::slice::from_ref(&path)) else {
        return;
    };
    let (writer, _, _) = open(config(&dir));
    assert!(writer.append(vec![event("x:1", "b", "2")]).await.is_err());
    immutable.clear();
    // ...then put another store (another epoch, numbers from 1) in its place.
    let other = tempfile::tempdir().unwrap();
    seqcast_persistence::migrate(&db_path(&other)).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    std::fs::copy(db_path(&other), &path).unwrap();

    let refused = writer.append(vec![event("x:1", "c", "3")]).await;
    match &refused {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("replaced"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    writer.close().await;
}

/// A group that commits into a database file removed meanwhile is neither handed to the hook
/// nor acknowledged, and nothing after it is written: the file is looked at after COMMIT.
#[tokio::test]
async fn a_group_written_into_a_removed_file_is_neither_delivered_nor_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (writer, _, log) = open(config(&dir));
    writer.append(vec![event("g:1", "a", "1")]).await.unwrap();
    std::fs::remove_file(&path).unwrap();

    for n in ["2", "3"] {
        match writer.append(vec![event("g:1", n, n)]).await {
            Err(StoreError::Unavailable(msg)) => assert!(msg.contains("gone"), "{msg}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    assert_eq!(log.call_count(), 1, "the lost group reached the hook");
    assert!(writer.health().unwritable.is_some());
    assert!(writer.probe().await.is_err());
    assert!(
        !path.exists(),
        "the writer created a file in place of the removed one"
    );
    writer.close().await;
}

/// The same file moved away and back: a writer that withheld a group there stays refused (its
/// numbers are used in the file but were never delivered), one that only noticed it continues.
#[tokio::test]
async fn a_file_moved_away_and_back_is_continued_only_if_nothing_was_withheld() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let aside = dir.path().join("aside.db");
    let (writer, _, log) = open(config(&dir));
    writer.append(vec![event("m:1", "a", "1")]).await.unwrap();

    // Noticed by a probe (which writes no event): back in place, writes go on.
    std::fs::rename(&path, &aside).unwrap();
    assert!(writer.probe().await.is_err());
    std::fs::rename(&aside, &path).unwrap();
    let next = writer.append(vec![event("m:1", "b", "2")]).await.unwrap();
    assert_eq!(next[0].sequence_number, 2);
    assert!(writer.health().unwritable.is_none());

    // A group committed while it was away: withheld, and refused for good.
    std::fs::rename(&path, &aside).unwrap();
    assert!(writer.append(vec![event("m:1", "c", "3")]).await.is_err());
    std::fs::rename(&aside, &path).unwrap();
    match writer.append(vec![event("m:1", "d", "4")]).await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("restart"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(log.call_count(), 2);
    writer.close().await;
}
