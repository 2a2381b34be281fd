//! Seed 003 against the real server: strict per-key backlogs, the subscribe seam, no
//! server-side re-subscribe, and the drain logs.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use seqcast_e2e::{Client, Options, TestServer, data, token};
use seqcast_protocol::ServerFrame;
use serde_json::json;

/// Scenario (a): search A published while the client is away, the client moves on to search
/// B, reconnects and subscribes B — it gets B's backlog only; A's stays until its TTL.
#[tokio::test]
async fn scenario_a_reconnect_to_a_new_search_gets_only_its_backlog() {
    let s = TestServer::start_with(Options::args(&["--backlog-ttl-secs", "1"])).await;
    let t = token("alice", None);
    let c = s.client(&t).await;
    c.close().await; // the connection drops before the client subscribes to A
    for i in 0..5 {
        s.publish("search", "req_A", json!({"a": i})).await;
    }
    for i in 0..3 {
        s.publish("search", "req_B", json!({"b": i})).await;
    }
    let mut c = s.client(&t).await;
    let ack = c.subscribe("search", "req_B").await;
    assert_eq!(ack.drained, 3);
    assert_eq!(ack.head, 8, "sub_ack tells where live delivery starts");
    let got: Vec<(u64, serde_json::Value)> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let m = c.expect_message().await;
            assert_eq!(m.request_id.as_str(), "req_B");
            v.push((m.sequence_number, data(&m)));
        }
        v
    };
    assert_eq!(
        got,
        vec![
            (6, json!({"b": 0})),
            (7, json!({"b": 1})),
            (8, json!({"b": 2}))
        ],
        "original numbers, in order"
    );
    c.expect_nothing_more().await;
    // A's messages are still in the log for a late subscriber of A on another connection…
    let mut other = s.client(&t).await;
    assert_eq!(
        other.subscribe("search", "req_A").await.drained,
        5,
        "A's backlog is still there"
    );
    for _ in 0..5 {
        assert_eq!(other.expect_message().await.request_id.as_str(), "req_A");
    }
    other.close().await;
    // …until its TTL (1 s): then a subscriber of A gets nothing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(6);
    loop {
        let mut late = s.client(&t).await;
        let ack = late.subscribe("search", "req_A").await;
        if ack.drained == 0 {
            // The sub_ack says what the backlog left out, so a client can tell "nothing was
            // published" from "it is older than the backlog".
            assert_eq!(ack.expired, 5, "sub_ack counts the key's expired messages");
            assert_eq!(ack.overflow, 0);
            late.expect_nothing_more().await;
            break;
        }
        assert_eq!(ack.expired + ack.drained, 5, "expired and drained add up");
        assert!(
            std::time::Instant::now() < deadline,
            "A's backlog never expired"
        );
        late.close().await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The subscribe that drained nothing logged what the TTL skipped: all five.
    s.wait_for_log(|v| {
        v["event"] == "backlog_expired"
            && v["subscription_key"] == "search:req_A"
            && v["count"] == 5
    })
    .await;
}

/// Scenario (b): rapid switching without a disconnect — A's later messages never reach the client.
#[tokio::test]
async fn scenario_b_rapid_switching_never_leaks_the_old_search() {
    let s = TestServer::start().await;
    let mut c = s.client(&token("alice", None)).await;
    c.subscribe("search", "req_A").await;
    c.send(json!({"type": "unsubscribe", "channel": "search", "request_id": "req_A"}))
        .await;
    c.subscribe("search", "req_B").await;
    for i in 0..10 {
        s.publish("search", "req_A", json!({"a": i})).await;
        s.publish("search", "req_B", json!({"b": i})).await;
    }
    for i in 0..10 {
        let m = c.expect_message().await;
        assert_eq!(m.request_id.as_str(), "req_B");
        assert_eq!(data(&m), json!({"b": i}));
    }
    c.expect_nothing_more().await;
    // A's messages reached nobody; they wait in the log for A's late subscribers.
    assert_eq!(s.metric("seqcast_backlogged_total").await, 10);
}

#[tokio::test]
async fn a_reconnecting_connection_receives_nothing_until_it_subscribes() {
    let s = TestServer::start().await;
    let t = token("alice", None);
    let mut c = s.client(&t).await;
    c.subscribe("search", "r1").await;
    c.close().await;
    s.publish("search", "r1", json!("while away")).await;
    let mut c = s.client(&t).await;
    c.expect_nothing_more().await;
    s.publish("search", "r1", json!("after reconnect")).await;
    c.expect_nothing_more().await;
    let ack = c.subscribe("search", "r1").await;
    assert_eq!(ack.drained, 2);
    assert_eq!(data(&c.expect_message().await), json!("while away"));
    assert_eq!(data(&c.expect_message().await), json!("after reconnect"));
}

/// Subscribe with `since`: retained messages after `since` (here they are also in the key's
/// backlog) then live — none twice, none missing at the seam.
#[tokio::test]
async fn subscribe_with_since_across_the_seam_has_no_gap_and_no_duplicate() {
    let s = TestServer::start().await;
    let t = token("alice", None);
    let mut c = s.client(&t).await;
    let ack = c.subscribe("chat", "room1").await;
    let epoch = ack.epoch.clone();
    for i in 1..=3 {
        s.publish("chat", "room1", json!(i)).await;
        assert_eq!(c.expect_message().await.sequence_number, i);
    }
    c.close().await;
    for i in 4..=6 {
        s.publish("chat", "room1", json!(i)).await; // backlog and recovery window
        s.publish("chat", "elsewhere", json!(i)).await;
    }
    let mut c = s.client(&t).await;
    c.send(json!({"type": "subscribe", "channel": "chat", "request_id": "room1", "since": 3, "epoch": epoch})).await;
    let ack = c.expect_sub_ack().await;
    assert_eq!(ack.recovered, Some(true));
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(data(&c.expect_message().await));
    }
    assert_eq!(got, vec![json!(4), json!(5), json!(6)]);
    s.publish("chat", "room1", json!(7)).await;
    assert_eq!(data(&c.expect_message().await), json!(7));
    c.expect_nothing_more().await;
}

#[tokio::test]
async fn since_beyond_history_or_another_epoch_says_recovered_false() {
    let s = TestServer::start_with(Options::args(&["--recovery-max-messages", "5"])).await;
    let t = token("alice", None);
    s.publish("c", "mine", json!("seen")).await; // 1
    for i in 0..20 {
        s.publish("c", "other", json!(i)).await; // 2..=21; the window keeps 17..=21
    }
    s.publish("c", "mine", json!("missed?")).await; // 22
    let mut c = s.client(&t).await;
    c.send(json!({"type": "subscribe", "channel": "c", "request_id": "mine", "since": 1}))
        .await;
    let ack = c.expect_sub_ack().await;
    assert_eq!(
        ack.recovered,
        Some(false),
        "numbers 2..=17 are gone: a gap is possible"
    );
    assert_eq!(ack.oldest_sequence, Some(18));
    assert_eq!(
        c.expect_message().await.sequence_number,
        22,
        "what is retained still comes, in order"
    );
    c.expect_nothing_more().await;

    let mut c = s.client(&t).await;
    c.send(json!({"type": "subscribe", "channel": "c", "request_id": "other", "since": 20, "epoch": "not-this-store"})).await;
    let ack = c.expect_sub_ack().await;
    assert_eq!(
        ack.recovered,
        Some(false),
        "numbers from another store's history mean nothing here"
    );
    assert!(ack.oldest_sequence.is_some());
    // The key's backlog is genuine history of this store: it is still delivered, whole.
    assert_eq!(ack.drained, 20);
    for want in 2..=21 {
        assert_eq!(c.expect_message().await.sequence_number, want);
    }
    c.expect_nothing_more().await;
}

#[tokio::test]
async fn key_grammar_violations_are_bad_requests() {
    let s = TestServer::start().await;
    let mut c = s.client(&token("alice", None)).await;
    for (channel, request_id) in [
        ("a:b", "r"),
        ("", "r"),
        ("c", ""),
        ("c", "ä"),
        (&*"x".repeat(65), "r"),
        ("c", &*"r".repeat(129)),
    ] {
        c.send(json!({"type": "subscribe", "channel": channel, "request_id": request_id}))
            .await;
        match c.next_frame().await {
            ServerFrame::Error(e) => assert_eq!(e.code, seqcast_protocol::ErrorCode::BadRequest),
            other => panic!("{channel:?}/{request_id:?}: expected error, got {other:?}"),
        }
    }
    let (status, body) = s
        .publish_raw(&json!({"channel": "a:b", "request_id": "r", "data": 1}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request");
}

#[tokio::test]
async fn the_drain_log_carries_the_key_fields() {
    let s = TestServer::start().await;
    s.publish("search", "req_B", json!(1)).await;
    s.publish("search", "req_B", json!(2)).await;
    let mut c = s.client(&token("alice", None)).await;
    c.subscribe("search", "req_B").await;
    let log = s.wait_for_log(|v| v["event"] == "backlog_drained").await;
    assert_eq!(log["subscription_key"], "search:req_B");
    assert_eq!(log["channel"], "search");
    assert_eq!(log["request_id"], "req_B");
    assert_eq!(log["drained_request_id"], "req_B");
    assert_eq!(log["count"], 2);
    assert_eq!(log["failed_count"], 0);
    assert_eq!(log["level"], "INFO");
    let opened = s
        .logs()
        .into_iter()
        .find(|v| v["event"] == "connection_opened")
        .unwrap();
    assert_eq!(log["client_id"], opened["client_id"]);
    let created = s
        .logs()
        .into_iter()
        .find(|v| v["event"] == "backlog_created")
        .unwrap();
    assert_eq!(created["subscription_key"], "search:req_B");
}

#[tokio::test]
async fn backlog_bound_per_key_drops_the_oldest_and_logs_it() {
    let s = TestServer::start_with(Options::args(&["--backlog-per-key", "3"])).await;
    for i in 0..5 {
        s.publish("c", "r", json!(i)).await;
    }
    let mut c = s.client(&token("alice", None)).await;
    let ack = c.subscribe("c", "r").await;
    assert_eq!(ack.drained, 3);
    for want in [2, 3, 4] {
        assert_eq!(data(&c.expect_message().await), json!(want));
    }
    // The bound is applied at the subscribe, and logged there with what it skipped.
    let overflow = s.wait_for_log(|v| v["event"] == "backlog_overflow").await;
    assert_eq!(overflow["subscription_key"], "c:r");
    assert_eq!(overflow["level"], "WARN");
    assert_eq!(overflow["count"], 2);
    assert_eq!(s.metric("seqcast_backlog_overflow_total").await, 2);
}

/// Many publishes racing many subscribes to the same and neighbouring keys: every subscriber's
/// stream is strictly increasing, gap-free from its first message, with no other key's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_and_subscribes_keep_every_stream_whole() {
    const KEYS: [&str; 3] = ["k0", "k1", "k2"];
    const PER_KEY: u64 = 150;
    const SUBSCRIBERS: u64 = 12;
    let s = std::sync::Arc::new(TestServer::start().await);
    let t = token("alice", None);
    // The last message of each key waits until every subscriber has its sub_ack, so that each
    // one has a last message to wait for however fast the publishes race ahead.
    let all_subscribed =
        std::sync::Arc::new(tokio::sync::Barrier::new(SUBSCRIBERS as usize + KEYS.len()));

    let mut publishers = Vec::new();
    for key in KEYS {
        let s = std::sync::Arc::clone(&s);
        let all_subscribed = std::sync::Arc::clone(&all_subscribed);
        publishers.push(tokio::spawn(async move {
            for i in 1..PER_KEY {
                s.publish("race", key, json!({"i": i})).await;
            }
            all_subscribed.wait().await;
            s.publish("race", key, json!({"i": PER_KEY})).await;
        }));
    }
    let mut subscribers = Vec::new();
    for n in 0..SUBSCRIBERS {
        let s = std::sync::Arc::clone(&s);
        let t = t.clone();
        let all_subscribed = std::sync::Arc::clone(&all_subscribed);
        subscribers.push(tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(n * 15)).await;
            let key = KEYS[(n % 3) as usize];
            let mut c: Client = s.client(&t).await;
            c.send(json!({"type": "subscribe", "channel": "race", "request_id": key}))
                .await;
            let _ack = c.expect_sub_ack().await;
            all_subscribed.wait().await;
            let mut stream_seqs = Vec::new();
            let mut seqs = Vec::new();
            loop {
                let m = c.expect_message().await;
                assert_eq!(m.request_id.as_str(), key, "another key's message leaked");
                seqs.push(m.sequence_number);
                stream_seqs.push(m.stream_sequence);
                if data(&m)["i"] == PER_KEY {
                    break;
                }
            }
            (key, seqs, stream_seqs)
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let mut first_per_key: HashMap<&str, u64> = HashMap::new();
    for sub in subscribers {
        let (key, seqs, stream_seqs) = sub.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key}: not strictly increasing: {seqs:?}"
        );
        let first = stream_seqs[0];
        let want: Vec<u64> = (first..=PER_KEY).collect();
        assert_eq!(
            stream_seqs, want,
            "{key}: gap or duplicate after its first message"
        );
        first_per_key
            .entry(key)
            .and_modify(|f| *f = (*f).min(first))
            .or_insert(first);
    }
    // Whoever subscribed first to a key also got the backlog of what came before: from 1.
    for key in KEYS {
        assert_eq!(
            first_per_key[key], 1,
            "{key}: the first subscriber must get the backlog from the start"
        );
    }
}

/// The per-key bound: a late subscriber gets the newest `--backlog-per-key`, and its `sub_ack`
/// counts the rest (`overflow`), so the client knows the backlog is not the whole key.
#[tokio::test]
async fn sub_ack_counts_what_the_per_key_bound_left_out() {
    let s = TestServer::start_with(Options::args(&["--backlog-per-key", "2"])).await;
    for i in 0..5 {
        s.publish("search", "req_O", json!({"i": i})).await;
    }
    let mut c = s.client(&token("alice", None)).await;
    let ack = c.subscribe("search", "req_O").await;
    assert_eq!((ack.drained, ack.overflow, ack.expired), (2, 3, 0));
    let first = c.expect_message().await;
    let second = c.expect_message().await;
    assert_eq!((first.sequence_number, second.sequence_number), (4, 5));
    c.expect_nothing_more().await;
}
