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
    let s = TestServer::start().await;
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
    assert_eq!(count_events(&s, "write_withheld"), 1, "{:?}", s.raw_logs());
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
