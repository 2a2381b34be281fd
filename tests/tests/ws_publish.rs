//! Publishing over the WebSocket (`publish` → `publish_ack`): pipelined and in order, the same
//! checks and limits as `POST /api/publish`, bounded in flight, durable across a kill -9, and
//! idempotent by `message_id`. The real server binary on SQLite, a real tokio-tungstenite client.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use seqcast_e2e::{Event, Options, PROMPT, TestServer, token, token_with};
use seqcast_protocol::{ErrorCode, PublishAck, PublishRef, ServerFrame, decode_server_frame};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn publish(r: u64, channel: &str, request_id: &str, data: Value) -> Message {
    Message::Text(
        json!({"type": "publish", "ref": r, "channel": channel, "request_id": request_id, "data": data})
            .to_string()
            .into(),
    )
}

fn publish_with_id(r: u64, channel: &str, request_id: &str, data: Value, id: &str) -> Message {
    Message::Text(
        json!({"type": "publish", "ref": r, "channel": channel, "request_id": request_id, "data": data, "message_id": id})
            .to_string()
            .into(),
    )
}

fn ack_of(f: &ServerFrame) -> Option<&PublishAck> {
    match f {
        ServerFrame::PublishAck(a) => Some(a),
        _ => None,
    }
}

/// 2,000 publishes with up to 256 in flight on one connection that also follows the key: the
/// acks come in the order sent, the numbers are dense and the ones the log holds; the
/// connection's own subscription gets every message once, and the writer grouped the
/// publishes (far fewer transactions than publishes).
#[tokio::test]
async fn pipelined_publishes_are_acked_in_order_with_the_logs_numbers() {
    const N: u64 = 2_000;
    const IN_FLIGHT: usize = 256;
    let s = TestServer::start().await;
    let mut c = s.client(&token_with("producer", None, 3600, true)).await;
    c.subscribe("tok", "r1").await;
    let transactions_before = s.metric("seqcast_db_transactions_total").await;
    let (mut tx, mut rx) = c.ws.split();
    let window = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let most_in_flight = Arc::new(AtomicUsize::new(0));
    let sender = {
        let window = Arc::clone(&window);
        let most = Arc::clone(&most_in_flight);
        tokio::spawn(async move {
            for i in 0..N {
                window.acquire().await.unwrap().forget();
                most.fetch_max(IN_FLIGHT - window.available_permits(), Ordering::Relaxed);
                tx.send(publish(
                    i,
                    "tok",
                    "r1",
                    json!({"i": i, "pad": "x".repeat(40)}),
                ))
                .await
                .unwrap();
            }
            tx
        })
    };
    let mut acks: Vec<PublishAck> = Vec::new();
    let mut delivered: Vec<(u64, u64)> = Vec::new();
    while acks.len() < N as usize || delivered.len() < N as usize {
        let msg = tokio::time::timeout(PROMPT, rx.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Message::Text(t) = msg else { continue };
        match decode_server_frame(t.as_str()).unwrap() {
            ServerFrame::PublishAck(a) => {
                acks.push(a);
                window.add_permits(1);
            }
            ServerFrame::Message(m) => delivered.push((m.sequence_number, m.stream_sequence)),
            other => panic!("unexpected {other:?}"),
        }
    }
    let _tx = sender.await.unwrap();
    assert!(
        most_in_flight.load(Ordering::Relaxed) > 64,
        "the test kept many publishes in flight"
    );
    let first = acks[0].sequence_number;
    for (i, a) in acks.iter().enumerate() {
        let i = i as u64;
        assert_eq!(a.r#ref, PublishRef::Number(i), "acks in the order sent");
        assert_eq!(a.sequence_number, first + i, "dense numbers in send order");
        assert_eq!(a.stream_sequence, i + 1);
    }
    let acked: Vec<(u64, u64)> = acks
        .iter()
        .map(|a| (a.sequence_number, a.stream_sequence))
        .collect();
    assert_eq!(
        delivered, acked,
        "the subscription saw each message once, in order"
    );
    let log = s.recover_key("tok", "r1").await;
    assert_eq!(log.len(), N as usize);
    for (m, a) in log.iter().zip(&acks) {
        assert_eq!(m["sequence_number"], a.sequence_number);
        assert_eq!(m["stream_sequence"], a.stream_sequence);
        assert_eq!(m["message_id"], a.message_id.as_str());
    }
    for (i, m) in log.iter().enumerate() {
        assert_eq!(m["data"]["i"], i as u64);
    }
    let transactions = s.metric("seqcast_db_transactions_total").await - transactions_before;
    println!("{N} pipelined publishes in {transactions} transactions");
    assert!(
        transactions < N / 2,
        "publishes that arrived together were committed together: {transactions} transactions"
    );
}

/// A refused `publish` (bad name, key outside the token, missing data) is answered with an
/// `error` carrying its `ref`, in its turn; a frame that is not JSON gets an error without one;
/// the publishes around them are committed and the connection stays open.
#[tokio::test]
async fn a_bad_frame_mid_stream_is_refused_with_its_ref_and_the_stream_goes_on() {
    let s = TestServer::start().await;
    let mut c = s
        .client(&token_with("producer", Some(&["ok:*"]), 3600, true))
        .await;
    for m in [
        publish(1, "ok", "r", json!("first")),
        publish(2, "no:colon", "r", json!("bad channel")),
        publish(3, "other", "r", json!("not my key")),
        Message::Text("{not json".into()),
        Message::Text(
            json!({"type": "publish", "ref": 4, "channel": "ok", "request_id": "r"})
                .to_string()
                .into(),
        ),
        publish(5, "ok", "r", json!("last")),
    ] {
        c.ws.send(m).await.unwrap();
    }
    let mut with_ref: Vec<(u64, Result<u64, ErrorCode>)> = Vec::new();
    let mut without_ref = Vec::new();
    while with_ref.len() < 5 {
        match c.next_frame().await {
            ServerFrame::PublishAck(a) => {
                let PublishRef::Number(r) = a.r#ref else {
                    panic!()
                };
                with_ref.push((r, Ok(a.sequence_number)));
            }
            ServerFrame::Error(e) => match e.r#ref {
                Some(PublishRef::Number(r)) => with_ref.push((r, Err(e.code))),
                _ => without_ref.push(e),
            },
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        with_ref,
        vec![
            (1, Ok(1)),
            (2, Err(ErrorCode::BadRequest)),
            (3, Err(ErrorCode::Forbidden)),
            (4, Err(ErrorCode::BadRequest)),
            (5, Ok(2)),
        ]
    );
    assert_eq!(without_ref.len(), 1, "{without_ref:?}");
    assert_eq!(without_ref[0].code, ErrorCode::BadRequest);
    c.expect_nothing_more().await;
    let log = s.recover_key("ok", "r").await;
    assert_eq!(log.len(), 2);
    assert_eq!(log[1]["data"], "last");
}

/// A token without `publish: true` is refused like over HTTP (`forbidden`, with the `ref`);
/// nothing is written and the connection stays open for reading.
#[tokio::test]
async fn a_token_without_publish_is_refused_and_the_connection_stays_open() {
    let s = TestServer::start().await;
    let mut c = s.client(&token("reader-only", None)).await;
    c.ws.send(publish(9, "news", "r", json!("nope")))
        .await
        .unwrap();
    match c.next_frame().await {
        ServerFrame::Error(e) => {
            assert_eq!(e.code, ErrorCode::Forbidden, "{e:?}");
            assert_eq!(e.r#ref, Some(PublishRef::Number(9)));
            assert!(e.message.contains("publish: true"), "{}", e.message);
        }
        other => panic!("expected error, got {other:?}"),
    }
    c.expect_nothing_more().await;
    let ack = c.subscribe("news", "r").await;
    assert_eq!(ack.drained, 0);
    assert_eq!(s.log_bounds().await.0, 0, "nothing was published");
}

/// `--publish-rate` counts WebSocket publishes against the token's user like HTTP ones (one
/// limiter): over it, `rate_limited` with the `ref`; and HTTP publishes of the same user are
/// over it too.
#[tokio::test]
async fn the_publish_rate_applies_to_websocket_publishes() {
    let s = TestServer::start_with(Options::args(&[
        "--publish-rate",
        "1",
        "--publish-burst",
        "5",
    ]))
    .await;
    let t = token_with("limited", None, 3600, true);
    let mut c = s.client(&t).await;
    for i in 0..20 {
        c.ws.send(publish(i, "rate", "r", json!(i))).await.unwrap();
    }
    let mut answers = Vec::new();
    while answers.len() < 20 {
        match c.next_frame().await {
            ServerFrame::PublishAck(a) => answers.push((a.r#ref, None)),
            ServerFrame::Error(e) => answers.push((e.r#ref.unwrap(), Some(e.code))),
            other => panic!("unexpected {other:?}"),
        }
    }
    let refs: Vec<PublishRef> = answers.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(refs, (0..20).map(PublishRef::Number).collect::<Vec<_>>());
    let acked = answers.iter().filter(|(_, e)| e.is_none()).count();
    assert!(
        (5..=7).contains(&acked),
        "burst of 5 (+ refill): {answers:?}"
    );
    assert!(
        answers
            .iter()
            .all(|(_, e)| matches!(e, None | Some(ErrorCode::RateLimited))),
        "{answers:?}"
    );
    let r = s
        .http
        .post(s.url("/api/publish"))
        .bearer_auth(&t)
        .json(&json!({"channel": "rate", "request_id": "r", "data": "http"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429, "one limiter for both doors");
    assert_eq!(s.recover_key("rate", "r").await.len(), acked);
}

/// The database writer stalls (another process holds SQLite's write lock) while a client
/// keeps sending 32 KB publishes without waiting: the server takes at most its in-flight
/// bound and stops reading the socket, so the client's sends stall and the server's memory
/// stays flat; once the lock goes, everything is committed and acked in order.
#[tokio::test]
async fn a_stalled_writer_stops_the_reading_of_publishes_and_memory_stays_bounded() {
    const N: usize = 1_000;
    let s = TestServer::start_with(Options::args(&["--db-busy-timeout-ms", "60000"])).await;
    let t = token_with("flood", None, 3600, true);
    let mut c = s.client(&t).await;
    // Warm up (and let the allocator settle) before the baseline.
    c.ws.send(publish(0, "flood", "warm", json!("x".repeat(32 << 10))))
        .await
        .unwrap();
    assert!(matches!(c.next_frame().await, ServerFrame::PublishAck(_)));
    let rss_before = s.rss_bytes();

    let db = rusqlite::Connection::open(s.data_dir.join("seqcast.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (mut tx, mut rx) = c.ws.split();
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let sent = Arc::clone(&sent);
        tokio::spawn(async move {
            let pad = "y".repeat(32 << 10);
            for i in 1..=N as u64 {
                tx.send(publish(i, "flood", "r", json!({"i": i, "pad": pad})))
                    .await
                    .unwrap();
                sent.fetch_add(1, Ordering::Relaxed);
            }
            tx
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stalled_at = sent.load(Ordering::Relaxed);
    let rss_stalled = s.rss_bytes();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sent.load(Ordering::Relaxed),
        stalled_at,
        "the client's sends are stalled (the server stopped reading)"
    );
    let grown = rss_stalled.saturating_sub(rss_before);
    println!(
        "writer stalled: client got {stalled_at} of {N} publishes ({} MiB) out; server RSS grew {} MiB",
        stalled_at * 32 / 1024,
        grown >> 20
    );
    assert!(
        stalled_at < N / 2,
        "the server kept reading while nothing could commit: {stalled_at} sent"
    );
    assert!(grown < 24 << 20, "server memory grew {} MiB", grown >> 20);
    // No answer came while the writer was stalled.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), rx.next())
            .await
            .is_err()
    );

    db.execute_batch("COMMIT").unwrap();
    drop(db);
    let mut next = 1u64;
    while next <= N as u64 {
        let msg = tokio::time::timeout(Duration::from_secs(60), rx.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Message::Text(t) = msg else { continue };
        let f = decode_server_frame(t.as_str()).unwrap();
        let a = ack_of(&f).unwrap_or_else(|| panic!("expected ack, got {f:?}"));
        assert_eq!(a.r#ref, PublishRef::Number(next));
        next += 1;
    }
    let _tx = sender.await.unwrap();
}

/// kill -9 while publishes are in flight: every acked publish is in the log after the restart
/// with the numbers it was acked with; re-sending every publish (acked or not) with its
/// `message_id` commits the missing ones once and answers the others with their original
/// numbers — no duplicate, no hole in the stream.
#[tokio::test]
async fn acked_publishes_survive_a_kill_9_and_resending_by_message_id_duplicates_nothing() {
    const N: u64 = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let opts = |listen: Option<String>| Options {
        data_dir: Some(dir.path().to_path_buf()),
        listen,
        ..Options::default()
    };
    let mut s = TestServer::start_with(opts(None)).await;
    let t = token_with("crashy", None, 3600, true);
    let c = s.client(&t).await;
    let (mut tx, mut rx) = c.ws.split();
    let sender = tokio::spawn(async move {
        for i in 0..N {
            if tx
                .send(publish_with_id(
                    i,
                    "crash",
                    "r",
                    json!({"i": i}),
                    &format!("m-{i}"),
                ))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut acked: HashMap<u64, PublishAck> = HashMap::new();
    while acked.len() < 500 {
        let msg = tokio::time::timeout(PROMPT, rx.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Message::Text(t) = msg else { continue };
        if let ServerFrame::PublishAck(a) = decode_server_frame(t.as_str()).unwrap() {
            let PublishRef::Number(r) = a.r#ref else {
                panic!()
            };
            acked.insert(r, a);
        }
    }
    s.kill9().await;
    // Answers already on the way are acks too: read what arrived before the socket died.
    while let Ok(Some(Ok(Message::Text(t)))) =
        tokio::time::timeout(Duration::from_secs(1), rx.next()).await
    {
        if let Ok(ServerFrame::PublishAck(a)) = decode_server_frame(t.as_str()) {
            let PublishRef::Number(r) = a.r#ref else {
                panic!()
            };
            acked.insert(r, a);
        }
    }
    sender.abort();
    assert!((acked.len() as u64) < N, "the kill came mid-stream");

    let s = TestServer::start_with(opts(None)).await;
    let log = s.recover_key("crash", "r").await;
    let in_log: HashMap<String, (u64, u64)> = log
        .iter()
        .map(|m| {
            (
                m["message_id"].as_str().unwrap().to_owned(),
                (
                    m["sequence_number"].as_u64().unwrap(),
                    m["stream_sequence"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    for (r, a) in &acked {
        assert_eq!(
            in_log.get(a.message_id.as_str()),
            Some(&(a.sequence_number, a.stream_sequence)),
            "acked publish {r} is in the log with its numbers"
        );
    }
    println!(
        "kill -9 after {} acks; {} publishes in the log",
        acked.len(),
        log.len()
    );

    // Re-send everything, with the same message ids and data.
    let mut c = s.client(&t).await;
    for i in 0..N {
        c.ws.send(publish_with_id(
            i,
            "crash",
            "r",
            json!({"i": i}),
            &format!("m-{i}"),
        ))
        .await
        .unwrap();
    }
    let mut answers = Vec::new();
    while answers.len() < N as usize {
        match c.next_event().await {
            Event::Frame(ServerFrame::PublishAck(a)) => answers.push(a),
            other => panic!("unexpected {other:?}"),
        }
    }
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a.r#ref, PublishRef::Number(i as u64));
        if let Some(first) = acked.get(&(i as u64)) {
            assert_eq!(
                (a.sequence_number, a.stream_sequence),
                (first.sequence_number, first.stream_sequence),
                "a retry is answered with the original numbers"
            );
        }
    }
    let log = s.recover_key("crash", "r").await;
    assert_eq!(log.len(), N as usize, "every publish once");
    for (i, m) in log.iter().enumerate() {
        assert_eq!(m["stream_sequence"], i as u64 + 1, "no hole, no duplicate");
        assert_eq!(m["data"]["i"], i as u64, "in the order published");
    }
}
