//! Durability defects with the real binary (issue 19): a database file removed or replaced
//! while the server runs is noticed before a publish is acknowledged, and `seqcast db
//! repair-sequences` leaves a healthy, pruned database alone (SQLite and PostgreSQL).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use seqcast_e2e::{Options, PgDatabase, TestServer, server_binary, token};
use serde_json::{Value, json};

fn on_dir(dir: &Path, extra: &[&str]) -> Options {
    let mut o = Options::args(extra);
    o.data_dir = Some(dir.to_path_buf());
    o
}

/// How often a log event was written.
fn count_events(s: &TestServer, event: &str) -> usize {
    s.logs().iter().filter(|v| v["event"] == event).count()
}

/// Publishes right after the file went (before the once-a-second watch could see it) must be
/// refused: the first one committed into the unlinked (or replaced) inode, and answering it 200
/// would lose it at the next restart. Also: that group reaches no subscriber, `/readyz` is 503,
/// and each log event is written once, not once per publish.
async fn publishes_after_the_file_went_are_refused(replace: bool) {
    let mut s = TestServer::start().await;
    let t = token("sub", None);
    let mut sub = s.client(&t).await;
    sub.subscribe("c", "r").await;
    s.publish("c", "r", json!(1)).await;
    assert_eq!(data_of(&sub.expect_message().await), json!(1));
    assert_eq!(s.get("/readyz", None).await.0, 200);

    let db = s.data_dir.join("seqcast.db");
    if replace {
        // Another file under the same name (a copy: same bytes, another inode).
        let copy = s.data_dir.join("copy.db");
        std::fs::copy(&db, &copy).unwrap();
        std::fs::rename(&copy, &db).unwrap();
    } else {
        std::fs::remove_file(&db).unwrap();
    }
    // At once: well inside the watch's second.
    let (status, body) = s
        .publish_raw(&json!({"channel": "c", "request_id": "r", "data": 2}))
        .await;
    assert_eq!(status, 503, "the first publish after the file went: {body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let why = body["error"]["message"].as_str().unwrap().to_owned();
    let word = if replace { "replaced" } else { "gone" };
    assert!(why.contains(word), "{why}");
    let (status, body) = s.get("/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["reason"].as_str().unwrap().contains(word), "{body}");
    // More publishes: refused too, and the incident is logged once.
    for n in 3..6 {
        let (status, body) = s
            .publish_raw(&json!({"channel": "c", "request_id": "r", "data": n}))
            .await;
        assert_eq!(status, 503, "{body}");
    }
    s.wait_for_log(|v| v["event"] == "database_lost").await;
    // The group that committed into the lost file was not delivered either.
    sub.expect_nothing_more().await;
    tokio::time::sleep(Duration::from_millis(1_200)).await; // a watch tick and a probe
    assert_eq!(s.get("/readyz", None).await.0, 503);
    assert_eq!(count_events(&s, "database_lost"), 1, "{:?}", s.raw_logs());
    assert_eq!(
        count_events(&s, "database_unwritable"),
        1,
        "{:?}",
        s.raw_logs()
    );
    let unwritable = s
        .wait_for_log(|v| v["event"] == "database_unwritable")
        .await;
    assert!(
        unwritable["error"]
            .as_str()
            .unwrap()
            .contains("not acknowledged"),
        "{unwritable}"
    );

    // A restart opens what the path holds now: a new empty store, or the copy. The copy is
    // continued with the WAL file beside it (it was not replaced), so the refused group may be
    // there after all — unacknowledged, never a hole: the log stays dense.
    s.kill9().await;
    let again = TestServer::start_with(on_dir(&s.data_dir, &[])).await;
    assert_eq!(again.get("/readyz", None).await.0, 200);
    let next = again.publish("c", "r", json!("after")).await;
    let (_, log) = again.get("/websocket/messages?since=0", Some(&t)).await;
    let log: Vec<(u64, Value)> = log["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["sequence_number"].as_u64().unwrap(), m["data"].clone()))
        .collect();
    let head = next["sequence_number"].as_u64().unwrap();
    assert_eq!(log.len() as u64, head, "{log:?}");
    assert!(log.iter().zip(1..).all(|((n, _), i)| *n == i), "{log:?}");
    assert_eq!(log.last().unwrap().1, json!("after"));
    if replace {
        assert_eq!(log[0].1, json!(1), "{log:?}");
        assert!(head <= 3, "{log:?}");
    } else {
        assert_eq!(head, 1, "a new store: {log:?}");
    }
}

fn data_of(m: &seqcast_protocol::MessageFrame) -> Value {
    seqcast_e2e::data(m)
}

#[tokio::test]
async fn a_publish_right_after_the_database_file_was_deleted_is_answered_503() {
    publishes_after_the_file_went_are_refused(false).await;
}

#[tokio::test]
async fn a_publish_right_after_the_database_file_was_replaced_is_answered_503() {
    publishes_after_the_file_went_are_refused(true).await;
}

// ---------- repair-sequences on a pruned database (defect 6) ----------

/// Every row of a stream as (message_id, stream_sequence), paging with `after=`.
async fn stream_positions(s: &TestServer, request_id: &str) -> Vec<(String, u64)> {
    // Two rows a page: the repair must keep every `after=` page boundary right.
    s.stream_rows("c", request_id, 2)
        .await
        .iter()
        .map(|r| {
            (
                r["message_id"].as_str().unwrap().to_owned(),
                r["stream_sequence"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// 20 messages m1..m20 on stream c:r, then m3 again with new data (an upsert: the row keeps
/// position 3 and is the newest event), under `--retention-max-events 5`; waits until
/// retention has left the five newest events. The stream then holds m3 (position 3, below the
/// 16 retention removed) and m17..m20 (17..20): a healthy, pruned stream.
async fn pruned_stream(s: &TestServer) -> Vec<(String, u64)> {
    for n in 1..=20 {
        let r = s
            .publish_raw(&json!({"channel": "c", "request_id": "r", "message_id": format!("m{n}"), "data": n}))
            .await;
        assert_eq!(r.0, 200, "{}", r.1);
    }
    let r = s
        .publish_raw(
            &json!({"channel": "c", "request_id": "r", "message_id": "m3", "data": "again"}),
        )
        .await;
    assert_eq!(
        (r.0, r.1["stream_sequence"].as_u64()),
        (200, Some(3)),
        "{}",
        r.1
    );
    let want: Vec<(String, u64)> = [
        ("m3", 3),
        ("m17", 17),
        ("m18", 18),
        ("m19", 19),
        ("m20", 20),
    ]
    .iter()
    .map(|(m, p)| ((*m).to_owned(), *p))
    .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got = stream_positions(s, "r").await;
        if got == want {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not pruned: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `seqcast db repair-sequences` with `args`; its stdout.
fn repair(args: &[&str]) -> String {
    let out = std::process::Command::new(server_binary())
        .args(["db", "repair-sequences"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The positions a damaged stream is repaired to: rows keep theirs while they rise in creation
/// order; the others get one past the larger of their predecessor's and `pruned_position` (16).
fn repaired_positions() -> Vec<(String, u64)> {
    [
        ("m3", 3),
        ("m17", 17),
        ("m18", 18),
        ("m19", 19),
        ("m20", 20),
    ]
    .iter()
    .map(|(m, p)| ((*m).to_owned(), *p))
    .collect()
}

#[tokio::test]
async fn repair_sequences_changes_nothing_on_a_healthy_pruned_sqlite_database() {
    let dir = tempfile::tempdir().unwrap();
    let retention = ["--retention-max-events", "5"];
    let mut s = TestServer::start_with(on_dir(dir.path(), &retention)).await;
    let before = pruned_stream(&s).await;
    s.terminate().await;

    let out = repair(&["--data-dir", dir.path().to_str().unwrap()]);
    assert!(out.contains("0 rows renumbered"), "{out}");
    // Restarted without the count bound from here on: retention must not move meanwhile.
    let s = TestServer::start_with(on_dir(dir.path(), &[])).await;
    assert_eq!(
        stream_positions(&s, "r").await,
        before,
        "positions went back"
    );
    // A client that paged to 18 gets exactly what follows it.
    let (_, page) = s
        .get(
            "/api/streams/c/r/messages?after=18",
            Some(&token("x", None)),
        )
        .await;
    let ids: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m19", "m20"]);
    let (status, next) = s
        .publish_raw(&json!({"channel": "c", "request_id": "r", "message_id": "next", "data": 0}))
        .await;
    assert_eq!(
        (status, next["stream_sequence"].as_u64()),
        (200, Some(21)),
        "{next}"
    );
    drop(s);

    // Damaged (as a buggy version left it): m17..m20 at positions 1, 1, 2, 0. Repaired rows go
    // above pruned_position (16), never onto positions a reader already passed.
    let mut s = TestServer::start_with(on_dir(dir.path(), &[])).await;
    s.terminate().await;
    {
        let db = rusqlite::Connection::open(dir.path().join("seqcast.db")).unwrap();
        let pruned: i64 = db
            .query_row(
                "SELECT pruned_position FROM streams WHERE request_id = 'r'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(pruned, 16);
        for (id, pos) in [("m17", 1), ("m18", 1), ("m19", 2), ("m20", 0), ("next", 0)] {
            db.execute(
                "UPDATE stream_rows SET stream_sequence = ?2 WHERE message_id = ?1",
                rusqlite::params![id, pos],
            )
            .unwrap();
            db.execute(
                "UPDATE events SET stream_sequence = ?2 WHERE message_id = ?1",
                rusqlite::params![id, pos],
            )
            .unwrap();
        }
    }
    let out = repair(&["--data-dir", dir.path().to_str().unwrap()]);
    assert!(out.contains("5 rows renumbered"), "{out}");
    let mut s = TestServer::start_with(on_dir(dir.path(), &[])).await;
    let mut want = repaired_positions();
    want.push(("next".into(), 21));
    assert_eq!(stream_positions(&s, "r").await, want);
    s.terminate().await;
    // The events carry the repaired positions too (catch-up and recovery read them there).
    let db = rusqlite::Connection::open(dir.path().join("seqcast.db")).unwrap();
    let mut stmt = db
        .prepare("SELECT message_id, stream_sequence FROM events ORDER BY sequence_number")
        .unwrap();
    let events: Vec<(String, u64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut in_log_order = want.clone();
    let m3 = in_log_order.remove(0);
    in_log_order.insert(4, m3); // m3's newest event is the upsert, after m20
    assert_eq!(events, in_log_order);
}

#[tokio::test]
async fn repair_sequences_changes_nothing_on_a_healthy_pruned_postgres_database() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let mut options = db.node_options();
    options
        .args
        .extend(["--retention-max-events".to_owned(), "5".to_owned()]);
    let mut s = TestServer::start_with(options.clone()).await;
    let before = pruned_stream(&s).await;
    s.terminate().await;

    let pg = ["--storage", "postgres", "--database-url", db.url.as_str()];
    let out = repair(&pg);
    assert!(out.contains("0 rows renumbered"), "{out}");
    // Restarted without the count bound: retention must not move meanwhile.
    let options = db.node_options();
    let s = TestServer::start_with(options.clone()).await;
    assert_eq!(
        stream_positions(&s, "r").await,
        before,
        "positions went back"
    );
    drop(s);

    // Damaged: m17..m20 at 1, 2, 4, 5 (the primary key keeps positions distinct here).
    let app = db.connect().await;
    app.batch_execute(
        "UPDATE seqcast.stream_rows SET stream_sequence = CASE message_id \
             WHEN 'm17' THEN 1 WHEN 'm18' THEN 2 WHEN 'm19' THEN 4 WHEN 'm20' THEN 5 END \
         WHERE message_id IN ('m17', 'm18', 'm19', 'm20')",
    )
    .await
    .unwrap();
    let out = repair(&pg);
    assert!(out.contains("4 rows renumbered"), "{out}");
    let s = TestServer::start_with(options).await;
    assert_eq!(stream_positions(&s, "r").await, repaired_positions());
    let next = s.publish("c", "r", json!("next")).await;
    assert_eq!(next["stream_sequence"], 21);
}
