//! Several seqcast nodes on one PostgreSQL database (`--storage postgres`): one sequence space,
//! delivery from the committed log on every node, publishing from inside an application's
//! transaction, and an outage. Each test makes its own database on 127.0.0.1:5432 and drops
//! it; without PostgreSQL they say so loudly and pass, except under `CI=true`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use seqcast_e2e::{Client, Event, PgDatabase, TestServer, token};
use seqcast_protocol::{MessageFrame, ServerFrame};
use serde_json::{Value, json};

async fn node(db: &PgDatabase) -> TestServer {
    TestServer::start_with(db.node_options()).await
}

/// The next `n` message frames (other frames are skipped).
async fn messages(client: &mut Client, n: usize) -> Vec<MessageFrame> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match client.next_frame().await {
            ServerFrame::Message(m) => out.push(m),
            ServerFrame::SubAck(_) => {}
            other => panic!("expected messages, got {other:?}"),
        }
    }
    out
}

fn seq(v: &Value) -> u64 {
    v["sequence_number"].as_u64().unwrap()
}

/// A subscriber on node B gets what was published on node A, with the same numbers.
#[tokio::test]
async fn a_message_published_on_one_node_reaches_subscribers_on_every_node() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let a = node(&db).await;
    let b = node(&db).await;
    let t = token("u", None);
    let mut on_a = a.client(&t).await;
    let mut on_b = b.client(&t).await;
    on_a.subscribe("chat", "r1").await;
    on_b.subscribe("chat", "r1").await;
    let first = a.publish("chat", "r1", json!({"n": 1})).await;
    let second = b.publish("chat", "r1", json!({"n": 2})).await;
    assert_eq!((seq(&first), seq(&second)), (1, 2));
    for client in [&mut on_a, &mut on_b] {
        let got = messages(client, 2).await;
        let numbers: Vec<(u64, u64)> = got
            .iter()
            .map(|m| (m.sequence_number, m.stream_sequence))
            .collect();
        assert_eq!(numbers, vec![(1, 1), (2, 2)]);
        assert_eq!(got[0].message_id.as_str(), first["message_id"]);
        client.expect_nothing_more().await;
    }
    // Both nodes serve the same history with the same epoch.
    let (_, ha) = a.get("/websocket/messages?since=0", Some(&t)).await;
    let (_, hb) = b.get("/websocket/messages?since=0", Some(&t)).await;
    assert_eq!(ha["messages"], hb["messages"]);
    assert_eq!(ha["epoch"], hb["epoch"]);
    // Each node's tail shows where it is.
    assert_eq!(b.metric("seqcast_pg_tail_applied").await, 2);
    assert_eq!(b.metric("seqcast_pg_tail_lag_events").await, 0);
    assert_eq!(b.metric("seqcast_pg_writable").await, 1);
}

/// 400 concurrent publishes spread over two nodes: 400 distinct consecutive numbers, every
/// stream 1..n, and every subscriber on every node sees each key strictly increasing and
/// gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_over_two_nodes_get_one_dense_order() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let nodes = Arc::new([node(&db).await, node(&db).await]);
    let keys = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    let t = token("u", None);
    let mut subscribers = Vec::new();
    for n in nodes.iter() {
        let mut c = n.client(&t).await;
        for k in keys {
            c.subscribe("load", k).await;
        }
        subscribers.push(c);
    }
    let mut tasks = Vec::new();
    for i in 0..400usize {
        let nodes = Arc::clone(&nodes);
        tasks.push(tokio::spawn(async move {
            let key = keys[i % keys.len()];
            let answer = nodes[i % 2].publish("load", key, json!({"i": i})).await;
            (key, answer)
        }));
    }
    let mut numbers = Vec::new();
    let mut per_key: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for task in tasks {
        let (key, answer) = task.await.unwrap();
        numbers.push(seq(&answer));
        per_key
            .entry(key)
            .or_default()
            .push((seq(&answer), answer["stream_sequence"].as_u64().unwrap()));
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=400).collect::<Vec<_>>());
    for (key, mut pairs) in per_key {
        pairs.sort_unstable();
        let positions: Vec<u64> = pairs.iter().map(|p| p.1).collect();
        assert_eq!(positions, (1..=50).collect::<Vec<_>>(), "stream {key}");
    }
    for (i, sub) in subscribers.iter_mut().enumerate() {
        let got = messages(sub, 400).await;
        let mut last: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for m in &got {
            let entry = last
                .entry(m.request_id.as_str().to_owned())
                .or_insert((0, 0));
            assert!(
                m.sequence_number > entry.0,
                "node {i}: key {} went back",
                m.request_id.as_str()
            );
            assert_eq!(
                m.stream_sequence,
                entry.1 + 1,
                "node {i}: key {} has a gap",
                m.request_id.as_str()
            );
            *entry = (m.sequence_number, m.stream_sequence);
        }
        let mut all: Vec<u64> = got.iter().map(|m| m.sequence_number).collect();
        all.sort_unstable();
        assert_eq!(all, (1..=400).collect::<Vec<_>>(), "node {i}");
        sub.expect_nothing_more().await;
    }
}

/// Publishes `count` messages to `chat:r` on `node`, one every few milliseconds.
fn publish_slowly(node: Arc<TestServer>, count: usize) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut numbers = Vec::new();
        for i in 0..count {
            numbers.push(seq(&node.publish("chat", "r", json!({"i": i})).await));
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        numbers
    })
}

/// kill -9 one node mid-stream: its clients reconnect to the other with `since` and lose
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_a_killed_node_resume_on_another_and_lose_nothing() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let mut a = node(&db).await;
    let b = Arc::new(node(&db).await);
    let t = token("u", None);
    let mut client = a.client(&t).await;
    let ack = client.subscribe("chat", "r").await;
    let publisher = publish_slowly(Arc::clone(&b), 300);
    let mut seen = messages(&mut client, 50).await;
    a.kill9().await;
    // Whatever was still queued on the dead socket is gone; resume from what arrived.
    loop {
        match client.next_event().await {
            Event::Frame(ServerFrame::Message(m)) => seen.push(m),
            Event::Frame(_) => {}
            Event::Closed(..) | Event::Ended => break,
        }
    }
    let since = seen.last().unwrap().sequence_number;
    let mut again = b.client(&t).await;
    again
        .send(
            json!({"type": "subscribe", "channel": "chat", "request_id": "r",
                     "since": since, "epoch": ack.epoch}),
        )
        .await;
    let resumed = again.expect_sub_ack().await;
    assert_eq!(resumed.recovered, Some(true));
    let published = publisher.await.unwrap();
    let rest = messages(&mut again, published.len() - seen.len()).await;
    seen.extend(rest);
    let got: Vec<u64> = seen.iter().map(|m| m.sequence_number).collect();
    assert_eq!(got, published);
    let positions: Vec<u64> = seen.iter().map(|m| m.stream_sequence).collect();
    assert_eq!(positions, (1..=300).collect::<Vec<_>>());
    again.expect_nothing_more().await;
}

/// `pg_terminate_backend` on a node's LISTEN connection mid-stream loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminated_listen_connection_loses_nothing() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let a = Arc::new(node(&db).await);
    let b = node(&db).await;
    let t = token("u", None);
    let mut client = b.client(&t).await;
    client.subscribe("chat", "r").await;
    let publisher = publish_slowly(Arc::clone(&a), 200);
    let mut seen = messages(&mut client, 40).await;
    let app = db.connect().await;
    for _ in 0..3 {
        let killed = app
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'seqcast-listen'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        assert!(killed >= 1, "no LISTEN connection to terminate");
        seen.extend(messages(&mut client, 30).await);
    }
    let published = publisher.await.unwrap();
    seen.extend(messages(&mut client, published.len() - seen.len()).await);
    let got: Vec<u64> = seen.iter().map(|m| m.sequence_number).collect();
    assert_eq!(got, published);
    client.expect_nothing_more().await;
    b.wait_for_log(|v| v["event"] == "tail_connected").await;
}

/// `seqcast.publish()` inside an application's transaction: a rollback delivers nothing, a
/// commit is delivered on every node (numbered by a node's writer), and an idle open
/// transaction that called it holds up no other publisher.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sql_publish_is_delivered_if_and_only_if_the_transaction_commits() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let a = node(&db).await;
    let b = node(&db).await;
    let t = token("u", None);
    let mut on_a = a.client(&t).await;
    let mut on_b = b.client(&t).await;
    on_a.subscribe("conv", "c1").await;
    on_b.subscribe("conv", "c1").await;

    let mut app = db.connect().await;
    app.batch_execute("CREATE TABLE conversation (id int PRIMARY KEY, body text)")
        .await
        .unwrap();
    // Rolled back: nothing.
    {
        let tx = app.transaction().await.unwrap();
        tx.execute("INSERT INTO conversation VALUES (1, 'never')", &[])
            .await
            .unwrap();
        let id: String = tx
            .query_one(
                "SELECT seqcast.publish('conv', 'c1', '{\"text\":\"never\"}'::jsonb, 'm-never')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(id, "m-never");
        tx.rollback().await.unwrap();
    }
    // Bad names are refused like the HTTP API refuses them.
    let bad = app
        .query_one(
            "SELECT seqcast.publish('bad:channel', 'c1', '{}'::jsonb, NULL)",
            &[],
        )
        .await;
    assert!(bad.is_err());

    // An idle open transaction that called publish holds nobody up.
    let mut idle_app = db.connect().await;
    let idle = idle_app.transaction().await.unwrap();
    idle.query_one(
        "SELECT seqcast.publish('conv', 'c1', '{\"text\":\"later\"}'::jsonb, 'm-later')",
        &[],
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let http = a.publish("conv", "c1", json!({"text": "http"})).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(seq(&http), 1);

    // Committed: delivered on every node.
    let started = std::time::Instant::now();
    {
        let tx = app.transaction().await.unwrap();
        tx.execute("INSERT INTO conversation VALUES (2, 'hello')", &[])
            .await
            .unwrap();
        tx.query_one(
            "SELECT seqcast.publish('conv', 'c1', '{\"text\":\"hello\"}'::jsonb, 'm-hello')",
            &[],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    for client in [&mut on_a, &mut on_b] {
        let got = messages(client, 2).await;
        let ids: Vec<&str> = got.iter().map(|m| m.message_id.as_str()).collect();
        assert_eq!(ids.len(), 2);
        assert_eq!(got[1].message_id.as_str(), "m-hello");
        assert_eq!((got[1].sequence_number, got[1].stream_sequence), (2, 2));
    }
    eprintln!(
        "SQL publish: COMMIT to delivery on both nodes in {:?}",
        started.elapsed()
    );
    idle.commit().await.unwrap();
    for client in [&mut on_a, &mut on_b] {
        let got = messages(client, 1).await;
        assert_eq!(got[0].message_id.as_str(), "m-later");
        assert_eq!(got[0].sequence_number, 3);
        client.expect_nothing_more().await;
    }
    // Its numbers are readable by message id (the stream's rows).
    let (status, page) = a
        .get("/api/streams/conv/c1/messages?after=0&limit=10", Some(&t))
        .await;
    assert_eq!(status, 200, "{page}");
    let ids: HashSet<String> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.contains("m-hello") && ids.contains("m-later") && !ids.contains("m-never"));
}

/// A database outage (connections refused, sessions terminated): publishes get 503 and
/// `/readyz` says 503, then both recover on their own once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_503_then_recovers_without_a_restart() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let a = node(&db).await;
    let t = token("u", None);
    a.publish("chat", "r", json!(1)).await;
    db.admin(&format!(
        "ALTER DATABASE {0} ALLOW_CONNECTIONS false; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}'",
        db.name
    ));
    let (status, body) = a
        .publish_raw(&json!({"channel": "chat", "request_id": "r", "data": 2}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = a.get("/readyz", None).await;
        if status == 503 {
            assert_eq!(body["status"], "database_unavailable", "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz stayed {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.admin(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS true",
        db.name
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = a.get("/readyz", None).await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz stayed {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = a.publish("chat", "r", json!(3)).await;
    assert_eq!(seq(&after), 2);
    let mut c = a.client(&t).await;
    c.send(json!({"type": "subscribe", "channel": "chat", "request_id": "r", "since": 0}))
        .await;
    let got = messages(&mut c, 2).await;
    assert_eq!(
        got.iter().map(|m| m.sequence_number).collect::<Vec<_>>(),
        vec![1, 2]
    );
    // Logged once per state change.
    let logs = a.logs();
    let down = logs
        .iter()
        .filter(|v| v["event"] == "database_unavailable")
        .count();
    let up = logs
        .iter()
        .filter(|v| v["event"] == "database_available")
        .count();
    assert_eq!((down, up), (1, 1), "{:#?}", a.raw_logs());
}

/// A publish is acknowledged only once its node has applied it. A node whose tail cannot apply
/// the log (here: an event whose stream name was broken behind seqcast's back stops every tail
/// before it) answers its publishes 503 `unavailable` — committed, not acknowledged — instead
/// of 200 after a timeout; once the row is repaired the tail goes on, and a retry with the same
/// message_id is answered with the number committed the first time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_its_node_has_not_applied_is_503_not_acknowledged() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let mut options = db.node_options();
    options
        .args
        .extend(["--pg-statement-timeout-ms".to_owned(), "1000".to_owned()]);
    let a = TestServer::start_with(options).await;
    assert_eq!(seq(&a.publish("chat", "r", json!(1)).await), 1);

    let app = db.connect().await;
    app.batch_execute(
        "SELECT * FROM seqcast.append_events(ARRAY['hole'], ARRAY['x'], ARRAY['m-hole'], ARRAY['2']); \
         UPDATE seqcast.streams SET channel = 'not a channel' WHERE channel = 'hole'",
    )
    .await
    .unwrap();
    let body = json!({"channel": "chat", "request_id": "r", "message_id": "m3", "data": 3});
    let started = std::time::Instant::now();
    let (status, answer) = a.publish_raw(&body).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("has not applied")),
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    app.batch_execute(
        "UPDATE seqcast.streams SET channel = 'hole' WHERE channel = 'not a channel'",
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let retried = loop {
        let (status, answer) = a.publish_raw(&body).await;
        if status == 200 {
            break answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never applied the repaired log: {status} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        seq(&retried),
        3,
        "the retry is answered with the committed number"
    );
    let mut c = a.client(&token("u", None)).await;
    c.send(json!({"type": "subscribe", "channel": "chat", "request_id": "r", "since": 0}))
        .await;
    let got = messages(&mut c, 2).await;
    assert_eq!(
        got.iter().map(|m| m.sequence_number).collect::<Vec<_>>(),
        vec![1, 3]
    );
}

/// `--storage postgres` refuses to start without an explicit JWT secret.
#[tokio::test]
async fn postgres_storage_needs_an_explicit_jwt_secret() {
    let out = std::process::Command::new(seqcast_e2e::server_binary())
        .args([
            "serve",
            "--storage",
            "postgres",
            "--database-url",
            "postgres://postgres@127.0.0.1:5432/none",
            "--listen",
            "127.0.0.1:0",
        ])
        .env_remove("SEQCAST_JWT_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("jwt_secret"), "{err}");
}

/// A staged message the database refuses (here written into the outbox behind
/// `seqcast.publish()`'s back) is set aside in `seqcast.outbox_failed`; the others staged with
/// it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_staged_message_is_set_aside_and_the_rest_delivered() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let a = node(&db).await;
    let t = token("u", None);
    let mut c = a.client(&t).await;
    c.subscribe("conv", "c2").await;
    let mut app = db.connect().await;
    let tx = app.transaction().await.unwrap();
    tx.query_one(
        "SELECT seqcast.publish('conv', 'c2', '{\"n\":1}'::jsonb, 'ok-1')",
        &[],
    )
    .await
    .unwrap();
    tx.execute(
        "INSERT INTO seqcast.outbox (channel, request_id, message_id, data) \
         VALUES ('conv', 'c2', 'broken', 'not json')",
        &[],
    )
    .await
    .unwrap();
    tx.query_one(
        "SELECT seqcast.publish('conv', 'c2', '{\"n\":2}'::jsonb, 'ok-2')",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let got = messages(&mut c, 2).await;
    let ids: Vec<&str> = got.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(ids, vec!["ok-1", "ok-2"]);
    assert_eq!(
        got.iter().map(|m| m.sequence_number).collect::<Vec<_>>(),
        vec![1, 2]
    );
    c.expect_nothing_more().await;
    let failed: i64 = app
        .query_one(
            "SELECT count(*) FROM seqcast.outbox_failed WHERE message_id = 'broken'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let left: i64 = app
        .query_one("SELECT count(*) FROM seqcast.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((failed, left), (1, 0));
}

/// `seqcast db migrate` and `seqcast db repair-sequences` work against PostgreSQL.
#[tokio::test]
async fn db_migrate_and_repair_sequences_run_against_postgres() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let db_command = |what: &str| {
        let out = std::process::Command::new(seqcast_e2e::server_binary())
            .args([
                "db",
                what,
                "--storage",
                "postgres",
                "--database-url",
                &db.url,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(db_command("migrate").contains("schema_version: 5"));
    assert!(db_command("migrate").contains("applied: []"));
    let app = db.connect().await;
    app.batch_execute(
        "SELECT count(*) FROM seqcast.append_events(ARRAY['c','c','c'], ARRAY['r','r','r'], \
                ARRAY['a','b','c'], ARRAY['1','2','3']); \
         UPDATE seqcast.stream_rows SET stream_sequence = 10 - stream_sequence",
    )
    .await
    .unwrap();
    // Damaged: positions fall in creation order (9, 8, 7). The first row keeps its position, the
    // others rise past it (positions never go back).
    assert!(db_command("repair-sequences").contains("1 streams checked, 2 rows renumbered"));
    assert!(db_command("repair-sequences").contains("0 rows renumbered"));
    let rows = app
        .query(
            "SELECT message_id, stream_sequence FROM seqcast.stream_rows ORDER BY 2",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        vec![("a".into(), 9), ("b".into(), 10), ("c".into(), 11)]
    );
}

/// Three nodes started at once on a new database: the migrations run once (under the advisory
/// lock) and every node serves the same epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_that_start_together_migrate_once() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let (a, b, c) = tokio::join!(node(&db), node(&db), node(&db));
    let t = token("u", None);
    let mut epochs = HashSet::new();
    for n in [&a, &b, &c] {
        let (status, body) = n.get("/websocket/messages?since=0", Some(&t)).await;
        assert_eq!(status, 200);
        epochs.insert(body["epoch"].as_str().unwrap().to_owned());
    }
    assert_eq!(epochs.len(), 1, "{epochs:?}");
    let app = db.connect().await;
    let versions: Vec<i32> = app
        .query(
            "SELECT version FROM seqcast.schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
}
