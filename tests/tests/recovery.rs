//! Seed 000/001 acceptance criteria against the real server: recovery over HTTP with the same
//! sequence numbers as live delivery.
#![allow(clippy::unwrap_used)]

use seqcast_e2e::{Options, TestServer, data, error_message, seqs, token, token_with};
use serde_json::{Value, json};

#[tokio::test]
async fn ac1_recovery_answers_200_with_a_valid_token() {
    let s = TestServer::start().await;
    let (status, body) = s
        .get("/websocket/messages?since=0", Some(&token("alice", None)))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"], json!([]));
    assert_eq!(body["head"], 0);
    assert_eq!(body["complete"], true);
    assert!(body["epoch"].as_str().is_some_and(|e| !e.is_empty()));
}

#[tokio::test]
async fn ac2_only_messages_after_since_are_returned() {
    let s = TestServer::start().await;
    for i in 0..5 {
        s.publish("search", "r1", json!({"i": i})).await;
    }
    let (status, body) = s
        .get("/websocket/messages?since=2", Some(&token("alice", None)))
        .await;
    assert_eq!(status, 200);
    assert_eq!(seqs(&body), vec![3, 4, 5]);
    assert_eq!(body["messages"][0]["data"], json!({"i": 2}));
    assert_eq!(
        body["messages"][0]["type"], "message",
        "recovery returns the same objects as live frames"
    );
    assert_eq!(body["complete"], true);
}

#[tokio::test]
async fn ac3_empty_when_nothing_is_new() {
    let s = TestServer::start().await;
    s.publish("search", "r1", json!(1)).await;
    s.publish("search", "r1", json!(2)).await;
    let (_, body) = s
        .get("/websocket/messages?since=2", Some(&token("alice", None)))
        .await;
    assert_eq!(body["messages"], json!([]));
    assert_eq!(body["head"], 2);
    assert_eq!(body["complete"], true);
}

#[tokio::test]
async fn ac4_overflow_returns_the_newest_500_and_says_incomplete() {
    // The seeds' count bound, given explicitly: by default the window is time-only.
    let s = TestServer::start_with(Options::args(&["--recovery-max-messages", "500"])).await;
    let batch: Vec<Value> = (0..501)
        .map(|i| json!({"channel": "search", "request_id": "r1", "data": i}))
        .collect();
    let (status, body) = s
        .post(
            "/api/publish/batch",
            &json!({"messages": batch}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = s
        .get("/websocket/messages?since=0", Some(&token("alice", None)))
        .await;
    let got = seqs(&body);
    assert_eq!(got.len(), 500);
    assert_eq!(got.first(), Some(&2));
    assert_eq!(got.last(), Some(&501));
    assert_eq!(body["complete"], false, "message 1 was evicted");
    assert_eq!(body["oldest_sequence"], 2);
    // Asking from inside the window is complete again.
    let (_, body) = s
        .get("/websocket/messages?since=1", Some(&token("alice", None)))
        .await;
    assert_eq!(body["complete"], true);
}

#[tokio::test]
async fn ac5_messages_older_than_the_ttl_are_not_recovered() {
    let s = TestServer::start_with(Options::args(&["--recovery-ttl-secs", "1"])).await;
    s.publish("search", "r1", json!("old")).await;
    let t = token("alice", None);
    let (_, body) = s.get("/websocket/messages?since=0", Some(&t)).await;
    assert_eq!(seqs(&body), vec![1], "still inside the TTL");
    // Poll (bounded) until the 1 s TTL has passed; the server evicts by age on every query.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, body) = s.get("/websocket/messages?since=0", Some(&t)).await;
        if seqs(&body).is_empty() {
            assert_eq!(
                body["complete"], false,
                "message 1 aged out, so since=0 cannot be complete"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "message never aged out: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    s.publish("search", "r1", json!("new")).await;
    let (_, body) = s.get("/websocket/messages?since=1", Some(&t)).await;
    assert_eq!(seqs(&body), vec![2]);
    assert_eq!(body["complete"], true);
}

/// Seed 000's story: three messages live, disconnect, 100 to other keys (and some to ours),
/// reconnect with a new client_id and `since=<last>`: exactly what followed, same numbers and data.
#[tokio::test]
async fn ac6_reconnect_gets_exactly_what_followed() {
    let s = TestServer::start().await;
    let t = token("alice", None);
    let mut c = s.client(&t).await;
    c.subscribe("search", "mine").await;
    let mut live = Vec::new();
    for i in 0..3 {
        s.publish("search", "mine", json!({"n": i})).await;
        live.push(c.expect_message().await);
    }
    let last = live.last().unwrap().sequence_number;
    c.close().await;

    let mut ours = Vec::new();
    for i in 0..100 {
        s.publish("search", &format!("other{}", i % 7), json!({"other": i}))
            .await;
        if i % 25 == 0 {
            ours.push(
                s.publish("search", "mine", json!({"missed": i})).await["sequence_number"]
                    .as_u64()
                    .unwrap(),
            );
        }
    }

    // Unfiltered: everything after `last`, in order, no gap.
    let (_, all) = s
        .get(&format!("/websocket/messages?since={last}"), Some(&t))
        .await;
    let all_seqs = seqs(&all);
    assert_eq!(all_seqs, ((last + 1)..=(last + 104)).collect::<Vec<_>>());
    // Filtered to its key: exactly its missed messages.
    let (_, mine) = s
        .get(
            &format!("/websocket/messages?since={last}&channel=search&request_id=mine"),
            Some(&t),
        )
        .await;
    assert_eq!(seqs(&mine), ours);
    assert_eq!(mine["complete"], true);

    // A new connection (new client_id) resuming with since over WebSocket gets the same frames.
    let mut c2 = s.client(&t).await;
    c2.send(json!({"type": "subscribe", "channel": "search", "request_id": "mine", "since": last, "epoch": all["epoch"]})).await;
    let ack = c2.expect_sub_ack().await;
    assert_eq!(ack.recovered, Some(true));
    for (i, want) in ours.iter().enumerate() {
        let m = c2.expect_message().await;
        assert_eq!(m.sequence_number, *want);
        assert_eq!(data(&m), json!({"missed": i * 25}));
        assert_eq!(
            json!(m),
            mine["messages"][i],
            "WebSocket replay and HTTP recovery give identical objects"
        );
    }
    c2.expect_nothing_more().await;
}

#[tokio::test]
async fn realtime_and_recovery_use_same_sequence_numbers() {
    let s = TestServer::start().await;
    let t = token("alice", None);
    let mut c = s.client(&t).await;
    c.subscribe("search", "r1").await;
    // Another connection's traffic must not give this one different numbers.
    s.publish("search", "noise", json!("x")).await;
    let mut realtime = Vec::new();
    for i in 0..3 {
        s.publish("search", "r1", json!(i)).await;
        realtime.push(c.expect_message().await);
    }
    let realtime_seqs: Vec<u64> = realtime.iter().map(|m| m.sequence_number).collect();
    assert_eq!(
        realtime_seqs,
        vec![2, 3, 4],
        "live frames carry the global numbers"
    );
    let (_, body) = s
        .get(
            &format!(
                "/websocket/messages?since={}&channel=search&request_id=r1",
                realtime_seqs[0]
            ),
            Some(&t),
        )
        .await;
    assert_eq!(seqs(&body), realtime_seqs[1..].to_vec());
    for (i, m) in realtime[1..].iter().enumerate() {
        assert_eq!(
            json!(m),
            body["messages"][i],
            "byte-identical objects live and in recovery"
        );
    }
}

#[tokio::test]
async fn ac7_auth_failures() {
    let s = TestServer::start().await;
    s.publish("search", "r1", json!(1)).await;
    let (status, body) = s.get("/websocket/messages?since=0", None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, _) = s
        .get("/websocket/messages?since=0", Some("not-a-jwt"))
        .await;
    assert_eq!(status, 401);
    let expired = token_with("alice", None, -3600, false);
    let (status, body) = s.get("/websocket/messages?since=0", Some(&expired)).await;
    assert_eq!(status, 401);
    assert!(error_message(&body).contains("expired"), "{body}");
    let scoped = token("alice", Some(&["search:*"]));
    let (status, body) = s
        .get(
            "/websocket/messages?since=0&channel=session&request_id=abc",
            Some(&scoped),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    let (status, _) = s
        .get(
            "/websocket/messages?since=0&channel=search&request_id=r1",
            Some(&scoped),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn recovery_without_a_key_is_filtered_by_the_tokens_patterns() {
    let s = TestServer::start().await;
    s.publish("search", "r1", json!(1)).await;
    s.publish("session", "abc", json!(2)).await;
    s.publish("session", "xyz", json!(3)).await;
    let scoped = token("alice", Some(&["search:*", "session:abc"]));
    let (_, body) = s.get("/websocket/messages?since=0", Some(&scoped)).await;
    assert_eq!(seqs(&body), vec![1, 2]);
    let (_, body) = s
        .get("/websocket/messages?since=0&channel=session", Some(&scoped))
        .await;
    assert_eq!(seqs(&body), vec![2]);
}

#[tokio::test]
async fn bad_since_values_are_400_and_the_server_keeps_serving() {
    let s = TestServer::start().await;
    let t = token("alice", None);
    for bad in ["-1", "abc", "18446744073709551616", "1.5", ""] {
        let (status, body) = s
            .get(&format!("/websocket/messages?since={bad}"), Some(&t))
            .await;
        assert_eq!(status, 400, "since={bad}: {body}");
        assert_eq!(body["error"]["code"], "bad_request");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("since"),
            "{body}"
        );
    }
    for bad in [
        "channel=a:b",
        "channel=&request_id=x",
        "channel=ok&request_id=sp%20ace",
        "limit=0",
        "limit=10001",
        "since=1",
        "bogus=1",
    ] {
        let (status, body) = s
            .get(&format!("/websocket/messages?since=0&{bad}"), Some(&t))
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _) = s.get("/websocket/messages?since=0", Some(&t)).await;
    assert_eq!(status, 200);
    let (status, _) = s
        .get("/websocket/messages?since=0&limit=10000", Some(&t))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn request_id_alone_recovers_it_in_every_readable_channel() {
    let s = TestServer::start().await;
    s.publish("a", "x", json!(1)).await;
    s.publish("a", "y", json!(2)).await;
    s.publish("b", "x", json!(3)).await;
    s.publish("secret", "x", json!(4)).await;
    let t = token("alice", Some(&["a:*", "b:*"]));
    let (status, body) = s
        .get("/websocket/messages?since=0&request_id=x", Some(&t))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(seqs(&body), vec![1, 3]);
}

#[tokio::test]
async fn limit_cuts_a_page_and_next_since_continues_it() {
    let s = TestServer::start().await;
    let batch: Vec<Value> = (0..25)
        .map(|i| json!({"channel": "c", "request_id": "r", "data": i}))
        .collect();
    s.post(
        "/api/publish/batch",
        &json!({"messages": batch}).to_string(),
    )
    .await;
    let t = token("alice", None);
    let mut since = 0;
    let mut got = Vec::new();
    for _ in 0..10 {
        let (_, body) = s
            .get(
                &format!("/websocket/messages?since={since}&limit=10"),
                Some(&t),
            )
            .await;
        got.extend(seqs(&body));
        match body["next_since"].as_u64() {
            Some(n) => since = n,
            None => break,
        }
    }
    assert_eq!(got, (1..=25).collect::<Vec<_>>());
}

#[tokio::test]
async fn another_epoch_is_never_answered_with_unrelated_messages() {
    let s = TestServer::start().await;
    s.publish("c", "r", json!(1)).await;
    let t = token("alice", None);
    let (_, body) = s
        .get("/websocket/messages?since=0&epoch=someotherepoch", Some(&t))
        .await;
    assert_eq!(body["complete"], false);
    assert_eq!(body["messages"], json!([]));
    let epoch = body["epoch"].as_str().unwrap().to_owned();
    let (_, body) = s
        .get(
            &format!("/websocket/messages?since=0&epoch={epoch}"),
            Some(&t),
        )
        .await;
    assert_eq!(seqs(&body), vec![1]);
    assert_eq!(body["complete"], true);
}
