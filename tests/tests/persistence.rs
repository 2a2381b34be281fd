//! Seed 004 against the real server on SQLite (the default storage): DB-owned numbers,
//! persist-first, crashes, restarts, upserts, batches, pagination and repair.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use seqcast_e2e::{Options, TestServer, data, server_binary, token};
use serde_json::{Value, json};

fn sqlite(dir: &Path, extra: &[&str]) -> Options {
    let mut o = Options::args(extra);
    o.data_dir = Some(dir.to_path_buf());
    o
}

async fn page_all(s: &TestServer, channel: &str, request_id: &str) -> Vec<Value> {
    s.stream_rows(channel, request_id, 50).await
}

#[tokio::test]
async fn sqlite_is_the_default_storage() {
    let s = TestServer::start_with(Options::default()).await;
    let opened = s.wait_for_log(|v| v["event"] == "store_opened").await;
    assert_eq!(opened["storage"], "sqlite");
    assert!(s.data_dir.join("seqcast.db").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_hundred_concurrent_publishes_get_consecutive_numbers() {
    let s = Arc::new(TestServer::start_with(Options::default()).await);
    let mut tasks = Vec::new();
    for i in 0..400 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            let stream = format!("s{}", i % 4);
            let r = s.publish("conv", &stream, json!({"i": i})).await;
            (
                stream,
                r["sequence_number"].as_u64().unwrap(),
                r["stream_sequence"].as_u64().unwrap(),
            )
        }));
    }
    let mut seqs = Vec::new();
    let mut per_stream: HashMap<String, Vec<u64>> = HashMap::new();
    for t in tasks {
        let (stream, seq, sseq) = t.await.unwrap();
        seqs.push(seq);
        per_stream.entry(stream).or_default().push(sseq);
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=400).collect::<Vec<_>>(),
        "400 distinct, consecutive numbers"
    );
    for (stream, mut v) in per_stream {
        v.sort_unstable();
        assert_eq!(
            v,
            (1..=100).collect::<Vec<_>>(),
            "{stream}: 1, 2, 3, … with no holes"
        );
    }
    // The writer's counters are exported: every event committed, in at most 400 transactions.
    assert_eq!(s.metric("seqcast_db_events_committed_total").await, 400);
    let transactions = s.metric("seqcast_db_transactions_total").await;
    assert!(
        (1..=400).contains(&transactions),
        "{transactions} transactions"
    );
    assert_eq!(s.metric("seqcast_db_transactions_failed_total").await, 0);
    assert_eq!(s.metric("seqcast_db_queued_commands").await, 0);
}

/// (stream, sequence_number, stream_sequence, message_id) of an acknowledged publish.
type Acked = (String, u64, u64, String);

/// Publishers running, `kill -9`, restart on the same data directory: every acknowledged
/// message is there, no number is reused, streams continue at max + 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_loses_no_acknowledged_message_and_reuses_no_number() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_with(sqlite(dir.path(), &[])).await;
    let acked: Arc<std::sync::Mutex<Vec<Acked>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = reqwest::Client::new();
    let mut publishers = Vec::new();
    for p in 0..8 {
        let (acked, stop, client, url) = (
            Arc::clone(&acked),
            Arc::clone(&stop),
            client.clone(),
            s.url("/api/publish"),
        );
        publishers.push(tokio::spawn(async move {
            let stream = format!("p{}", p % 3);
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let id = format!("p{p}-{n}");
                let body = json!({"channel": "crash", "request_id": stream, "message_id": id, "data": {"id": id}});
                let r = client
                    .post(&url)
                    .header("Authorization", format!("ApiKey {}", seqcast_e2e::API_KEY))
                    .json(&body)
                    .send()
                    .await;
                let Ok(r) = r else { break };
                if r.status() != 200 {
                    break;
                }
                let Ok(v) = r.json::<Value>().await else { break };
                acked.lock().unwrap().push((
                    stream.clone(),
                    v["sequence_number"].as_u64().unwrap(),
                    v["stream_sequence"].as_u64().unwrap(),
                    id,
                ));
            }
        }));
    }
    // Let real traffic build up, then kill mid-stream.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while acked.lock().unwrap().len() < 300 {
        assert!(std::time::Instant::now() < deadline, "publishers too slow");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    s.kill9().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let s =
        TestServer::start_with(sqlite(dir.path(), &["--recovery-max-messages", "100000"])).await;
    // Every acknowledged message is in its stream at the position it was acknowledged with.
    let mut max_stream_seq: BTreeMap<String, u64> = BTreeMap::new();
    for stream in ["p0", "p1", "p2"] {
        let rows = page_all(&s, "crash", stream).await;
        let by_id: HashMap<&str, &Value> = rows
            .iter()
            .map(|r| (r["message_id"].as_str().unwrap(), r))
            .collect();
        let positions: Vec<u64> = rows
            .iter()
            .map(|r| r["stream_sequence"].as_u64().unwrap())
            .collect();
        assert_eq!(
            positions,
            (1..=rows.len() as u64).collect::<Vec<_>>(),
            "{stream}: no holes"
        );
        for (st, seq, sseq, id) in acked.iter().filter(|a| a.0 == stream) {
            let row = by_id
                .get(id.as_str())
                .unwrap_or_else(|| panic!("acknowledged {id} lost"));
            assert_eq!(row["stream_sequence"].as_u64(), Some(*sseq), "{st}/{id}");
            assert_eq!(row["sequence_number"].as_u64(), Some(*seq), "{st}/{id}");
        }
        max_stream_seq.insert(stream.to_owned(), rows.len() as u64);
    }
    // Recovery across the restart serves the acknowledged events with their numbers.
    let (_, rec) = s
        .get(
            "/websocket/messages?since=0&limit=10000",
            Some(&token("r", None)),
        )
        .await;
    let recovered: HashMap<u64, String> = rec["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["sequence_number"].as_u64().unwrap(),
                m["message_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (_, seq, _, id) in &acked {
        assert_eq!(
            recovered.get(seq),
            Some(id),
            "recovery after restart lacks {seq}"
        );
    }
    let max_seq = recovered.keys().copied().max().unwrap();
    assert_eq!(rec["head"].as_u64(), Some(max_seq));
    // New numbers continue after the highest committed one; streams continue at max + 1.
    for stream in ["p0", "p1", "p2"] {
        let r = s.publish("crash", stream, json!("after restart")).await;
        assert!(
            r["sequence_number"].as_u64().unwrap() > max_seq,
            "a number was reused: {r}"
        );
        assert_eq!(
            r["stream_sequence"].as_u64(),
            Some(max_stream_seq[stream] + 1)
        );
    }
}

#[tokio::test]
async fn restart_keeps_epoch_numbers_and_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_with(sqlite(dir.path(), &[])).await;
    let t = token("r", None);
    for i in 0..5 {
        s.publish("c", "r", json!(i)).await;
    }
    let (_, before) = s.get("/websocket/messages?since=0", Some(&t)).await;
    assert!(s.terminate().await.success());
    let s = TestServer::start_with(sqlite(dir.path(), &[])).await;
    let (_, after) = s.get("/websocket/messages?since=2", Some(&t)).await;
    assert_eq!(after["epoch"], before["epoch"]);
    assert_eq!(after["complete"], true);
    assert_eq!(
        after["messages"],
        json!(before["messages"].as_array().unwrap()[2..]),
        "same frames after restart"
    );
    assert_eq!(s.publish("c", "r", json!(5)).await["sequence_number"], 6);
    // A subscriber resuming across the restart gets exactly what followed.
    let mut c = s.client(&t).await;
    c.send(json!({"type": "subscribe", "channel": "c", "request_id": "r", "since": 4, "epoch": before["epoch"]})).await;
    assert_eq!(c.expect_sub_ack().await.recovered, Some(true));
    assert_eq!(c.expect_message().await.sequence_number, 5);
    assert_eq!(c.expect_message().await.sequence_number, 6);
    c.expect_nothing_more().await;
}

/// A Rust service following a key with `seqcast-client` rides through a server restart: the
/// client reconnects on its own and resumes with `since` + `epoch`, so it gets every message of
/// its key once, in order, with the numbers the log gave them — those published while the server
/// was away included — and nothing of another key.
#[tokio::test]
async fn a_rust_service_follows_its_key_through_a_restart() {
    use futures_util::StreamExt as _;
    use seqcast_client::{Client, Event, fixed_token};

    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_with(sqlite(dir.path(), &[])).await;
    let addr = s.addr.to_string();
    let client = Client::builder(format!("ws://{addr}/ws"))
        .backoff(
            std::time::Duration::from_millis(20),
            std::time::Duration::from_millis(200),
        )
        .connect(fixed_token(token("svc", None)))
        .await
        .unwrap();
    let mut orders = client.subscribe("orders", "o1").await.unwrap();
    let seq = |v: Value| v["sequence_number"].as_u64().unwrap();
    let mut want = Vec::new();
    for i in 0..3 {
        want.push(seq(s.publish("orders", "o1", json!(i)).await));
    }

    assert!(s.terminate().await.success());
    let mut opts = sqlite(dir.path(), &[]);
    opts.listen = Some(addr);
    let s = TestServer::start_with(opts).await;
    for i in 3..6 {
        s.publish("orders", "other", json!({"not": i})).await;
        want.push(seq(s.publish("orders", "o1", json!(i)).await));
    }

    let mut got = Vec::new();
    while got.len() < want.len() {
        let event = tokio::time::timeout(std::time::Duration::from_secs(20), orders.next())
            .await
            .expect("the client caught up within 20 s")
            .expect("the subscription stays open");
        match event {
            Event::Message(m) => {
                assert_eq!(
                    (m.channel.as_str(), m.request_id.as_str()),
                    ("orders", "o1")
                );
                got.push(m.sequence_number);
            }
            Event::Gap(g) => panic!("no gap across a restart: {g:?}"),
            Event::Refused(r) => panic!("refused: {r:?}"),
            Event::Subscribed(_) => {}
        }
    }
    assert_eq!(got, want, "every message once, in order, same numbers");
    assert!(client.connection_sequence() >= 2, "it reconnected");
    client.close().await;
}

#[tokio::test]
async fn a_repeated_message_id_is_an_upsert() {
    let s = TestServer::start_with(Options::default()).await;
    let t = token("r", None);
    let mut c = s.client(&t).await;
    c.subscribe("chat", "s1").await;
    let a = s
        .publish_raw(
            &json!({"channel": "chat", "request_id": "s1", "message_id": "m1", "data": "draft"}),
        )
        .await
        .1;
    s.publish("chat", "s1", json!("other")).await;
    let b = s
        .publish_raw(
            &json!({"channel": "chat", "request_id": "s1", "message_id": "m1", "data": "final"}),
        )
        .await
        .1;
    assert_eq!(a["stream_sequence"], 1);
    assert_eq!(b["stream_sequence"], 1, "an upsert keeps its position");
    assert_eq!(b["sequence_number"], 3, "and is a new event");
    let live: Vec<(u64, u64, Value)> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let m = c.expect_message().await;
            v.push((m.sequence_number, m.stream_sequence, data(&m)));
        }
        v
    };
    assert_eq!(
        live,
        vec![
            (1, 1, json!("draft")),
            (2, 2, json!("other")),
            (3, 1, json!("final"))
        ]
    );
    let rows = page_all(&s, "chat", "s1").await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["data"], "final");
    assert_eq!(rows[0]["sequence_number"], 3);
}

#[tokio::test]
async fn a_batch_is_all_or_nothing() {
    let s = TestServer::start_with(Options::default()).await;
    let t = token("r", None);
    let ok = json!({"messages": [
        {"channel": "b", "request_id": "r", "data": 1},
        {"channel": "b", "request_id": "r", "data": 2},
        {"channel": "b", "request_id": "q", "data": 3}
    ]});
    let (status, body) = s.post("/api/publish/batch", &ok.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let got: Vec<(u64, u64)> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["sequence_number"].as_u64().unwrap(),
                r["stream_sequence"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, vec![(1, 1), (2, 2), (3, 1)]);
    let bad = json!({"messages": [
        {"channel": "b", "request_id": "r", "data": 4},
        {"channel": "b:x", "request_id": "r", "data": 5}
    ]});
    let (status, body) = s.post("/api/publish/batch", &bad.to_string()).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages[1]"),
        "{body}"
    );
    let (_, rec) = s.get("/websocket/messages?since=0", Some(&t)).await;
    assert_eq!(rec["head"], 3, "nothing of the refused batch was published");
}

#[tokio::test]
async fn stream_pages_follow_stream_sequence() {
    let s = TestServer::start_with(Options::default()).await;
    let msgs: Vec<Value> = (1..=120)
        .map(|i| json!({"channel": "p", "request_id": "r", "data": i}))
        .collect();
    s.post("/api/publish/batch", &json!({"messages": msgs}).to_string())
        .await;
    s.publish("p", "other", json!("x")).await;
    let rows = page_all(&s, "p", "r").await;
    assert_eq!(rows.len(), 120);
    assert!(
        rows.iter()
            .enumerate()
            .all(|(i, r)| r["stream_sequence"] == i as u64 + 1 && r["data"] == i as u64 + 1)
    );
    let t = token("r", None);
    let (status, body) = s.get("/api/streams/p/r/messages?after=118", Some(&t)).await;
    assert_eq!(status, 200);
    assert_eq!(body["messages"].as_array().unwrap().len(), 2);
    assert!(body.get("next_after").is_none());
    assert_eq!(
        s.get("/api/streams/p/r/messages?after=-1", Some(&t))
            .await
            .0,
        400
    );
    assert_eq!(s.get("/api/streams/p:x/r/messages", Some(&t)).await.0, 400);
    assert_eq!(s.get("/api/streams/p/r/messages", None).await.0, 401);
    assert_eq!(
        s.get(
            "/api/streams/p/r/messages",
            Some(&token("r", Some(&["q:*"])))
        )
        .await
        .0,
        403
    );
}

/// Persist-first: a write the database refuses (here: another process holds the write lock)
/// answers 503, reaches nobody, and leaves the numbers exactly as the database has them.
#[tokio::test]
async fn a_locked_database_answers_503_and_publishes_nothing() {
    let s = TestServer::start_with(Options::args(&["--db-busy-timeout-ms", "200"])).await;
    let t = token("r", None);
    let mut c = s.client(&t).await;
    c.subscribe("lock", "r").await;
    s.publish("lock", "r", json!("before")).await;
    assert_eq!(c.expect_message().await.sequence_number, 1);

    let db = rusqlite::Connection::open(s.data_dir.join("seqcast.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (status, body) = s
        .publish_raw(&json!({"channel": "lock", "request_id": "r", "data": "refused"}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    let (status, _) = s
        .post(
            "/api/publish/batch",
            &json!({"messages": [{"channel": "lock", "request_id": "r", "data": "x"}]}).to_string(),
        )
        .await;
    assert_eq!(status, 503);
    // Locked past the busy timeout: not ready either, and the body says why.
    let (status, body) = s.get("/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reason"].as_str().unwrap().contains("locked"),
        "{body}"
    );
    c.expect_nothing_more().await;
    db.execute_batch("ROLLBACK").unwrap();
    // The lock is gone: /readyz probes and is ready again before any publish.
    let (status, body) = s.get("/readyz", None).await;
    assert_eq!(status, 200, "{body}");

    let r = s.publish("lock", "r", json!("after")).await;
    assert_eq!(
        r["stream_sequence"], 2,
        "the refused writes left no row behind"
    );
    let m = c.expect_message().await;
    assert_eq!(data(&m), json!("after"));
    let (_, rec) = s.get("/websocket/messages?since=0", Some(&t)).await;
    let all: Vec<Value> = rec["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].clone())
        .collect();
    assert_eq!(all, vec![json!("before"), json!("after")]);
    s.wait_for_log(|v| v["event"] == "http_error" && v["code"] == "unavailable")
        .await;
}

/// A real read-only database file (`chattr +i`: root ignores permission bits, not this).
#[tokio::test]
async fn a_read_only_database_file_answers_503_until_writable() {
    let s = TestServer::start_with(Options::default()).await;
    let t = token("r", None);
    let mut c = s.client(&t).await;
    c.subscribe("ro", "r").await;
    s.publish("ro", "r", json!(1)).await;
    assert_eq!(data(&c.expect_message().await), json!(1));
    let files = [
        s.data_dir.join("seqcast.db"),
        s.data_dir.join("seqcast.db-wal"),
    ];
    let chattr = |flag: &str| {
        files.iter().all(|f| {
            std::process::Command::new("chattr")
                .arg(flag)
                .arg(f)
                .status()
                .is_ok_and(|s| s.success())
        })
    };
    if !chattr("+i") {
        chattr("-i");
        // Root ignores permission bits; only an immutable file is really read-only to it.
        let why = "SKIPPED a_read_only_database_file_answers_503_until_writable: `chattr +i` is not \
                   available here (needs root on a filesystem with immutable files)";
        assert!(std::env::var("CI").is_err(), "{why}; CI must run it");
        eprintln!("\n*** {why} ***\n");
        return;
    }
    let (status, body) = s
        .publish_raw(&json!({"channel": "ro", "request_id": "r", "data": 2}))
        .await;
    let (ready, ready_body) = s.get("/readyz", None).await;
    assert!(chattr("-i"), "could not make the database writable again");
    assert_eq!(status, 503, "{body}");
    assert_eq!(ready, 503, "/readyz while read-only: {ready_body}");
    assert!(ready_body["reason"].is_string(), "{ready_body}");
    c.expect_nothing_more().await;
    // Writable again: noticed by the server's own probe, without a restart or a publish.
    s.wait_for_log(|v| v["event"] == "database_writable").await;
    let (ready, ready_body) = s.get("/readyz", None).await;
    assert_eq!(ready, 200, "{ready_body}");
    let r = s.publish("ro", "r", json!(3)).await;
    assert_eq!(r["stream_sequence"], 2);
    assert_eq!(data(&c.expect_message().await), json!(3));
}

/// `seqcast db repair-sequences` on a database written by a buggy version (seed 004's V029:
/// 82 of 86 rows at stream_sequence 0) renumbers by insertion order, per stream.
#[tokio::test]
async fn repair_sequences_renumbers_a_buggy_database() {
    let dir = tempfile::tempdir().unwrap();
    let migrate = std::process::Command::new(server_binary())
        .args(["db", "migrate", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    {
        // Written now, so that retention (7 days) keeps the rows.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let db = rusqlite::Connection::open(dir.path().join("seqcast.db")).unwrap();
        db.execute_batch(
            "INSERT INTO streams (stream_id, channel, request_id) VALUES (1, 'session', 'broken'), (2, 'session', 'fine');",
        )
        .unwrap();
        // 86 rows in the broken stream: 4 got positions 1..=4, the other 82 got 0. Interleave a
        // healthy stream to prove repair works per stream.
        for i in 1..=86i64 {
            let seq = i * 2 - 1;
            db.execute("INSERT INTO events (sequence_number, stream_id, message_id, timestamp_ms, data) VALUES (?1, 1, ?2, ?4, ?3)",
                rusqlite::params![seq, format!("m{i}"), format!("{i}"), now_ms]).unwrap();
            let pos = if i <= 4 { i } else { 0 };
            db.execute("INSERT INTO stream_rows (stream_id, message_id, stream_sequence, first_sequence, last_sequence) VALUES (1, ?1, ?2, ?3, ?3)",
                rusqlite::params![format!("m{i}"), pos, seq]).unwrap();
            db.execute("INSERT INTO events (sequence_number, stream_id, message_id, timestamp_ms, data) VALUES (?1, 2, ?2, ?3, '0')",
                rusqlite::params![seq + 1, format!("f{i}"), now_ms]).unwrap();
            db.execute("INSERT INTO stream_rows (stream_id, message_id, stream_sequence, first_sequence, last_sequence) VALUES (2, ?1, ?2, ?3, ?3)",
                rusqlite::params![format!("f{i}"), i, seq + 1]).unwrap();
        }
    }
    let repair = std::process::Command::new(server_binary())
        .args(["db", "repair-sequences", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&repair.stdout);
    assert!(
        repair.status.success(),
        "{}",
        String::from_utf8_lossy(&repair.stderr)
    );
    assert!(out.contains("82 rows renumbered"), "{out}");

    let s = TestServer::start_with(sqlite(dir.path(), &[])).await;
    let rows = page_all(&s, "session", "broken").await;
    let got: Vec<(u64, String)> = rows
        .iter()
        .map(|r| {
            (
                r["stream_sequence"].as_u64().unwrap(),
                r["message_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(u64, String)> = (1..=86).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(got, want, "positions follow insertion order");
    assert_eq!(page_all(&s, "session", "fine").await.len(), 86);
    let r = s.publish("session", "broken", json!("next")).await;
    assert_eq!(r["stream_sequence"], 87);
    assert_eq!(r["sequence_number"], 173);
}

/// A recovery window larger than the in-memory ring is served from the database, with the
/// same frames live delivery sent.
#[tokio::test]
async fn a_window_larger_than_the_ring_is_served_from_the_database() {
    let s = TestServer::start_with(Options::args(&[
        "--recovery-max-messages",
        "100",
        "--recovery-buffer-messages",
        "10",
    ]))
    .await;
    let t = token("r", Some(&["w:*"]));
    let msgs: Vec<Value> = (1..=150)
        .map(|i| json!({"channel": if i % 5 == 0 { "x" } else { "w" }, "request_id": "r", "data": i}))
        .collect();
    let (status, _) = s
        .post("/api/publish/batch", &json!({"messages": msgs}).to_string())
        .await;
    assert_eq!(status, 200);
    // Inside the window (head 150, window 100 → since ≥ 50) but far beyond the ring of 10.
    let (_, body) = s.get("/websocket/messages?since=60", Some(&t)).await;
    let seqs: Vec<u64> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sequence_number"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = (61..=150).filter(|i| i % 5 != 0).collect();
    assert_eq!(
        seqs, want,
        "served from the database, filtered by the token"
    );
    assert_eq!(body["complete"], true);
    // The newest ones are byte-identical to what the ring serves.
    let (_, ring) = s.get("/websocket/messages?since=145", Some(&t)).await;
    let tail: Vec<Value> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .take(4)
        .rev()
        .cloned()
        .collect();
    assert_eq!(json!(tail), ring["messages"]);
    // Paging through the database part.
    let (_, page) = s
        .get("/websocket/messages?since=60&limit=7", Some(&t))
        .await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 7);
    assert_eq!(page["next_since"], 68);
    // Outside the window: incomplete.
    let (_, old) = s.get("/websocket/messages?since=10", Some(&t)).await;
    assert_eq!(old["complete"], false);
}

/// A small tmpfs mounted for one test, unmounted (lazily) when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (after saying so loudly) when mounting is not permitted here; under `CI=true`
    /// that is a failure instead.
    fn mount(size: &str, test: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let why =
                format!("SKIPPED {test}: cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)");
            assert!(std::env::var("CI").is_err(), "{why}; CI must run it");
            eprintln!("\n*** {why} ***\n");
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fill the filesystem under `dir` to the last byte with one file.
fn fill_disk(file: &Path) {
    use std::io::Write as _;
    let mut f = std::fs::File::create(file).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    while f.write_all(&small[..1]).is_ok() {}
    let _ = f.sync_all();
}

/// Disk full: publishes answer 503 and `/readyz` 503 saying the disk is full; once space is
/// freed the same process takes writes again (no restart) and no number was used up.
#[tokio::test]
async fn a_full_disk_answers_503_and_recovers_when_space_is_freed() {
    let Some(fs) = Tmpfs::mount(
        "8m",
        "a_full_disk_answers_503_and_recovers_when_space_is_freed",
    ) else {
        return;
    };
    let data_dir = fs.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    let s = TestServer::start_with(sqlite(&data_dir, &[])).await;
    let t = token("r", None);
    let mut c = s.client(&t).await;
    c.subscribe("full", "r").await;
    s.publish("full", "r", json!("before")).await;
    assert_eq!(c.expect_message().await.sequence_number, 1);

    let filler = fs.path().join("filler");
    fill_disk(&filler);
    // Each publish needs new pages in the WAL; with no byte left one of the first ones fails.
    let big = "x".repeat(200 * 1024);
    let mut refused = None;
    for i in 0..20 {
        let (status, body) = s
            .publish_raw(
                &json!({"channel": "full", "request_id": "r", "data": format!("{i}{big}")}),
            )
            .await;
        if status == 503 {
            refused = Some(body);
            break;
        }
        assert_eq!(status, 200, "{body}");
        c.expect_message().await;
    }
    let body = refused.expect("no publish was refused on a full disk");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let (status, body) = s.get("/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("full"), "{body}");
    c.expect_nothing_more().await;

    std::fs::remove_file(&filler).unwrap();
    s.wait_for_log(|v| v["event"] == "database_writable").await;
    let (status, body) = s.get("/readyz", None).await;
    assert_eq!(status, 200, "{body}");
    let head_before = c_head(&s, &t).await;
    let r = s.publish("full", "r", json!("after")).await;
    assert_eq!(
        r["sequence_number"],
        head_before + 1,
        "a refused write used up a number"
    );
    assert_eq!(data(&c.expect_message().await), json!("after"));
    drop(c);
    drop(s);
}

/// The newest sequence number the recovery endpoint reports.
async fn c_head(s: &TestServer, t: &str) -> u64 {
    let (_, rec) = s.get("/websocket/messages?since=0&limit=1", Some(t)).await;
    rec["head"]
        .as_u64()
        .unwrap_or_else(|| panic!("no head in {rec}"))
}

/// Run `seqcast db <args…> --data-dir DIR`; (success, stdout + stderr).
fn seqcast_db(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(server_binary())
        .arg("db")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `seqcast db backup` while four publishers keep publishing, then `seqcast db restore`: the
/// restore is refused while the server holds the data directory; once installed, the store has
/// a new epoch and every message acknowledged before the backup began, at its number; a client
/// resuming with the old epoch gets `recovered: false`.
#[tokio::test]
async fn backup_while_publishing_then_restore_under_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let file = backups.path().join("seqcast-backup.db");
    let s = Arc::new(TestServer::start_with(sqlite(dir.path(), &[])).await);
    let t = token("r", None);
    let (_, first) = s.get("/websocket/messages?since=0&limit=1", Some(&t)).await;
    let old_epoch = first["epoch"].as_str().unwrap().to_owned();

    let acked: Arc<std::sync::Mutex<Vec<(u64, Value)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..4 {
        let (s, acked, stop) = (Arc::clone(&s), Arc::clone(&acked), Arc::clone(&stop));
        publishers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let data = json!(format!("p{p}-{i}"));
                let (status, body) = s
                    .publish_raw(
                        &json!({"channel": "b", "request_id": format!("p{p}"), "data": data}),
                    )
                    .await;
                assert_eq!(status, 200, "{body}");
                let seq = body["sequence_number"].as_u64().unwrap();
                acked.lock().unwrap().push((seq, data));
                i += 1;
            }
        }));
    }
    while acked.lock().unwrap().len() < 200 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let before_backup = acked.lock().unwrap().clone();
    let (ok, out) = {
        let (dir, file) = (dir.path().to_path_buf(), file.clone());
        tokio::task::spawn_blocking(move || seqcast_db(&dir, &["backup", file.to_str().unwrap()]))
            .await
            .unwrap()
    };
    assert!(ok, "backup failed: {out}");
    let during = acked.lock().unwrap().len();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for p in publishers {
        p.await.unwrap();
    }
    assert!(
        acked.lock().unwrap().len() > during,
        "publishing went on while (and after) the backup ran"
    );

    // Not while a server holds the data directory.
    let (ok, out) = seqcast_db(dir.path(), &["restore", file.to_str().unwrap()]);
    assert!(!ok, "restore under a running server must be refused: {out}");
    assert!(out.contains("in use"), "{out}");

    let mut s = Arc::try_unwrap(s).unwrap();
    assert!(s.terminate().await.success());
    let (ok, out) = seqcast_db(dir.path(), &["restore", file.to_str().unwrap()]);
    assert!(ok, "restore failed: {out}");
    assert!(out.contains("new epoch"), "{out}");

    let s = TestServer::start_with(sqlite(dir.path(), &[])).await;
    let mut restored: HashMap<u64, Value> = HashMap::new();
    let mut since = 0;
    let epoch = loop {
        let (status, page) = s
            .get(
                &format!("/websocket/messages?since={since}&limit=10000"),
                Some(&t),
            )
            .await;
        assert_eq!(status, 200, "{page}");
        for m in page["messages"].as_array().unwrap() {
            restored.insert(m["sequence_number"].as_u64().unwrap(), m["data"].clone());
        }
        match page["next_since"].as_u64() {
            Some(n) if n > since && !page["messages"].as_array().unwrap().is_empty() => since = n,
            _ => break page["epoch"].as_str().unwrap().to_owned(),
        }
    };
    assert_ne!(
        epoch, old_epoch,
        "a restored store must not keep the old epoch"
    );
    for (seq, data) in &before_backup {
        assert_eq!(
            restored.get(seq),
            Some(data),
            "acknowledged #{seq} before the backup is missing or changed"
        );
    }
    let head = restored.keys().copied().max().unwrap();
    assert_eq!(
        restored.len() as u64,
        head,
        "the restored log is dense 1..={head}"
    );

    // A client of the old history must not resume by number.
    let mut c = s.client(&t).await;
    c.send(json!({"type": "subscribe", "channel": "b", "request_id": "p0", "since": head, "epoch": old_epoch}))
        .await;
    assert_eq!(c.expect_sub_ack().await.recovered, Some(false));
    // …and one of the new epoch does.
    let mut c = s.client(&t).await;
    c.send(json!({"type": "subscribe", "channel": "b", "request_id": "p0", "since": head, "epoch": epoch}))
        .await;
    assert_eq!(c.expect_sub_ack().await.recovered, Some(true));
    let next = s.publish("b", "p0", json!("after restore")).await;
    assert_eq!(next["sequence_number"], head + 1);
    // The database that was in place is kept aside, not deleted.
    assert!(
        std::fs::read_dir(dir.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("before-restore")),
        "the old database was not kept"
    );
}
