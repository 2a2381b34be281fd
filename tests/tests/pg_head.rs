//! `SELECT seqcast.head()` (CONTRACT §7): an application reads its own state and the head in one
//! `REPEATABLE READ` transaction, and its client subscribes with `since` = that head — nothing
//! missed, nothing twice. Checked under concurrent publishing over HTTP and through
//! `seqcast.publish()` inside application transactions, with real WebSocket subscribers on
//! another node; and against deliberately wrong heads, which the same check must catch. Each test
//! makes its own database on 127.0.0.1:5432 and drops it; without PostgreSQL they say so loudly
//! and pass, except under `CI=true`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use seqcast_e2e::{Event, PgDatabase, TestServer, token, until_count_is_zero};
use seqcast_protocol::ServerFrame;
use serde_json::json;
use tokio::sync::watch;

const CHANNEL: &str = "room";
/// The key the readers follow; publishers also write to `OTHER`, which a keyed head ignores.
const KEY: &str = "r1";
const OTHER: &str = "r2";

/// How a reader asks for the head inside its snapshot.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Head {
    /// `seqcast.head()` and `seqcast.head(channel, request_id)`, alternately.
    Real,
    /// Wrong: the counter as the snapshot sees it, blind to staged messages it also sees.
    CounterOnly,
    /// Wrong: one past the real head.
    PlusOne,
}

impl Head {
    fn sql(self, round: usize) -> &'static str {
        match self {
            Head::Real if round.is_multiple_of(2) => "SELECT seqcast.head()",
            Head::Real => "SELECT seqcast.head('room', 'r1')",
            Head::CounterOnly => "SELECT head FROM seqcast.counter WHERE id = 1",
            Head::PlusOne => "SELECT seqcast.head() + 1",
        }
    }
}

/// One reader's round: what its snapshot showed, and what its subscriber got.
struct Reading {
    since: u64,
    /// Message ids of `KEY` whose effect the snapshot held: the application's rows, and the
    /// HTTP publishes in the log it saw.
    state: HashSet<String>,
    /// Refusals (SQLSTATE 40001) before the head was read.
    retries: u32,
    /// The server could not resume from `since` (`recovered: false`): a head past the log's.
    not_recovered: bool,
    delivered: tokio::task::JoinHandle<Vec<(u64, String)>>,
}

async fn app_connection(db: &PgDatabase) -> tokio_postgres::Client {
    db.connect().await
}

/// One application transaction: its own rows, and the message in the same transaction.
async fn app_publish(app: &mut tokio_postgres::Client, publisher: i32, key: &str, id: &str) {
    let tx = app.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO app_log (message_id, request_id) VALUES ($1, $2)",
        &[&id, &key],
    )
    .await
    .unwrap();
    tx.execute(
        "UPDATE app_totals SET n = n + 1 WHERE publisher = $1",
        &[&publisher],
    )
    .await
    .unwrap();
    tx.execute(
        "SELECT seqcast.publish('room', $1, $2::text::jsonb, $3)",
        &[&key, &json!({"from": id}).to_string(), &id],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// The state and the head in one REPEATABLE READ transaction; a 40001 refusal is retried (with
/// a fresh snapshot) until the deadline.
async fn read_state_and_head(
    reader: &mut tokio_postgres::Client,
    head: Head,
    round: usize,
) -> (HashSet<String>, u64, u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut retries = 0;
    loop {
        let tx = reader
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .unwrap();
        let mut state: HashSet<String> = tx
            .query(
                "SELECT message_id FROM app_log WHERE request_id = $1",
                &[&KEY],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        // HTTP publishes have no application row: their effect is the log itself.
        state.extend(
            tx.query(
                "SELECT e.message_id FROM seqcast.events e JOIN seqcast.streams s USING (stream_id) \
                 WHERE s.channel = $1 AND s.request_id = $2 AND e.message_id LIKE 'h%'",
                &[&CHANNEL, &KEY],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0)),
        );
        match tx.query_one(head.sql(round), &[]).await {
            Ok(row) => {
                tx.commit().await.unwrap();
                let h: i64 = row.get(0);
                return (state, u64::try_from(h).unwrap(), retries);
            }
            Err(e)
                if e.code()
                    == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE) =>
            {
                drop(tx);
                retries += 1;
                assert!(
                    Instant::now() < deadline,
                    "seqcast.head() refused for 20 s ({retries} tries): {e}"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) => panic!("head: {e}"),
        }
    }
}

/// A subscriber with `since`, collecting `KEY`'s messages until it holds `last` (told at the
/// end) or the deadline; and whether the server said `recovered: false`.
async fn subscriber(
    node: &TestServer,
    since: u64,
    mut last: watch::Receiver<Option<u64>>,
) -> (bool, tokio::task::JoinHandle<Vec<(u64, String)>>) {
    let mut client = node.client(&token("reader", None)).await;
    let ack = client.subscribe_since(CHANNEL, KEY, since, None).await;
    let not_recovered = ack.recovered == Some(false);
    let collect = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut got: Vec<(u64, String)> = Vec::new();
        loop {
            if let Some(last) = *last.borrow_and_update()
                && got.last().map_or(since, |m| m.0) >= last
            {
                return got;
            }
            tokio::select! {
                _ = last.changed() => {}
                event = client.next_event_within(Duration::from_millis(500)) => match event {
                    Some(Event::Frame(ServerFrame::Message(m))) => {
                        got.push((m.sequence_number, m.message_id.as_str().to_owned()));
                    }
                    Some(Event::Frame(_)) | None => {}
                    Some(other) => {
                        eprintln!("subscriber since {since} ended: {other:?}");
                        return got;
                    }
                },
                () = tokio::time::sleep_until(deadline) => return got,
            }
        }
    });
    (not_recovered, collect)
}

/// Runs the pattern for `rounds` readers while three application publishers and two HTTP
/// publishers write to `KEY` and `OTHER`; returns every violation found (empty: the pattern
/// held for every reader and every message).
async fn run(db: PgDatabase, head: Head, rounds: usize) -> Vec<String> {
    let a = Arc::new(TestServer::start_with(db.node_options()).await);
    let b = TestServer::start_with(db.node_options()).await;
    let setup = app_connection(&db).await;
    setup
        .batch_execute(
            "CREATE TABLE app_log (message_id text PRIMARY KEY, request_id text NOT NULL);
             CREATE TABLE app_totals (publisher int PRIMARY KEY, n bigint NOT NULL);
             INSERT INTO app_totals SELECT g, 0 FROM generate_series(0, 3) g;",
        )
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let mut publishers = Vec::new();
    for p in 0..3i32 {
        let mut app = app_connection(&db).await;
        let (stop, published) = (Arc::clone(&stop), Arc::clone(&published));
        publishers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = if i % 3 == 2 { OTHER } else { KEY };
                app_publish(&mut app, p, key, &format!("a{p}-{i}")).await;
                published.fetch_add(1, Ordering::Relaxed);
                i += 1;
                // Paced: a staged message stays unnumbered for up to the outbox poll interval,
                // and the global head() refuses while any is in sight.
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }));
    }
    for p in 0..2 {
        let (a, stop, published) = (Arc::clone(&a), Arc::clone(&stop), Arc::clone(&published));
        publishers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = if i % 3 == 2 { OTHER } else { KEY };
                let (status, body) = a
                    .publish_raw(&json!({"channel": CHANNEL, "request_id": key,
                        "message_id": format!("h{p}-{i}"), "data": {"i": i}}))
                    .await;
                assert_eq!(status, 200, "{body}");
                published.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }

    let (last_tx, last_rx) = watch::channel(None);
    let mut reader = app_connection(&db).await;
    let mut own = app_connection(&db).await;
    let mut readings = Vec::with_capacity(rounds);
    for round in 0..rounds {
        // The reader's application writes too, just before it reads: its own message is then
        // staged, not yet numbered, in most of the snapshots below.
        app_publish(&mut own, 3, KEY, &format!("a3-{round}")).await;
        let (state, since, retries) = read_state_and_head(&mut reader, head, round).await;
        let (not_recovered, delivered) = subscriber(&b, since, last_rx.clone()).await;
        readings.push(Reading {
            since,
            state,
            retries,
            not_recovered,
            delivered,
        });
    }
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }

    // Every staged message numbered; the truth is the log of KEY (nothing is pruned here).
    let outbox = "SELECT count(*) FROM seqcast.outbox";
    until_count_is_zero(
        &setup,
        outbox,
        Duration::from_secs(30),
        Duration::from_millis(20),
    )
    .await
    .unwrap_or_else(|staged| panic!("{staged} messages still staged"));
    let truth: BTreeMap<String, u64> = setup
        .query(
            "SELECT e.message_id, e.sequence_number FROM seqcast.events e \
             JOIN seqcast.streams s USING (stream_id) WHERE s.channel = $1 AND s.request_id = $2",
            &[&CHANNEL, &KEY],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), u64::try_from(r.get::<_, i64>(1)).unwrap()))
        .collect();
    let last = truth.values().copied().max().unwrap();
    last_tx.send(Some(last)).unwrap();

    let mut violations = Vec::new();
    let (mut retries, mut sizes) = (0, Vec::new());
    for (round, r) in readings.into_iter().enumerate() {
        let delivered = r.delivered.await.unwrap();
        retries += r.retries;
        if r.not_recovered {
            violations.push(format!(
                "round {round}: the server could not resume from since {} (recovered: false)",
                r.since
            ));
        }
        sizes.push(r.state.len());
        let mut seen = HashSet::new();
        for (n, id) in &delivered {
            if *n <= r.since {
                violations.push(format!(
                    "round {round}: {id} ({n}) delivered at or below since {}",
                    r.since
                ));
            }
            if !seen.insert(id.clone()) {
                violations.push(format!("round {round}: {id} delivered twice"));
            }
        }
        for (id, n) in &truth {
            match (r.state.contains(id), seen.contains(id)) {
                (true, true) => violations.push(format!(
                    "round {round}: {id} (number {n}) is in the state read AND delivered after since {}",
                    r.since
                )),
                (false, false) => violations.push(format!(
                    "round {round}: {id} (number {n}) is neither in the state read nor delivered after since {}",
                    r.since
                )),
                _ => {}
            }
        }
    }
    eprintln!(
        "{head:?}: {rounds} readers, {} messages published ({} of the followed key), state sizes {sizes:?}, {retries} refusals retried, {} violations",
        published.load(Ordering::Relaxed) + rounds as u64,
        truth.len(),
        violations.len()
    );
    // The readers ran while publishing went on: later readers saw more, and messages were
    // published after the last one.
    assert!(sizes.windows(2).any(|w| w[1] > w[0] + 1), "{sizes:?}");
    assert!(truth.len() > sizes.last().copied().unwrap_or(0));
    violations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_and_head_in_one_snapshot_then_since_head_misses_nothing_and_repeats_nothing() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let violations = run(db, Head::Real, 24).await;
    assert!(violations.is_empty(), "{violations:#?}");
}

/// The same check catches a head that ignores staged messages (their effect is in the state and
/// they are delivered again) and a head one too high (a message is lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_check_catches_a_wrong_head() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let counter_only = run(db, Head::CounterOnly, 12).await;
    assert!(
        counter_only.iter().any(|v| v.contains("AND delivered")),
        "a head blind to staged messages went unnoticed: {counter_only:#?}"
    );
    let plus_one = run(PgDatabase::create().unwrap(), Head::PlusOne, 10).await;
    assert!(
        plus_one
            .iter()
            .any(|v| v.contains("neither") || v.contains("recovered: false")),
        "a head one too high went unnoticed: {plus_one:#?}"
    );
}

/// Retention deletes the newest events too once they are old enough: the head stays where the
/// log got to (the counter), it does not fall back to what is left.
#[tokio::test]
async fn the_head_does_not_go_back_when_retention_deletes_the_newest_events() {
    let Some(db) = PgDatabase::create() else {
        return;
    };
    let mut opts = db.node_options();
    opts.args
        .extend(["--retention-secs".to_owned(), "1".to_owned()]);
    let node = TestServer::start_with(opts).await;
    for n in 0..3 {
        node.publish(CHANNEL, KEY, json!({"n": n})).await;
    }
    let app = db.connect().await;
    let events = "SELECT count(*) FROM seqcast.events";
    until_count_is_zero(
        &app,
        events,
        Duration::from_secs(30),
        Duration::from_millis(100),
    )
    .await
    .unwrap_or_else(|left| panic!("retention left {left} events"));
    for sql in ["SELECT seqcast.head()", "SELECT seqcast.head('room', NULL)"] {
        let h: i64 = app.query_one(sql, &[]).await.unwrap().get(0);
        assert_eq!(h, 3, "{sql}");
    }
    // And a subscriber with since = head gets what comes next, numbered after it.
    let mut client = node.client(&token("u", None)).await;
    client.subscribe_since(CHANNEL, KEY, 3, None).await;
    let next = node.publish(CHANNEL, KEY, json!({"n": 3})).await;
    assert_eq!(next["sequence_number"], 4);
    assert_eq!(client.expect_message().await.sequence_number, 4);
}
