//! The WebSocket protocol against the real server: hello/connected, subscribe, ping, bad
//! input, slow consumers, origins and graceful shutdown.
#![allow(clippy::unwrap_used)]

use seqcast_e2e::{Event, Options, TestServer, token};
use seqcast_protocol::{ErrorCode, ServerFrame};
use serde_json::json;

#[tokio::test]
async fn hello_gets_connected_with_sequence_zero_and_the_sessions_fields() {
    let s = TestServer::start().await;
    s.publish("c", "r", json!(1)).await;
    let mut c = s.connect_raw().await;
    c.send(json!({"type": "hello", "token": token("alice", None), "session_id": "tab-1", "connection_sequence": 3}))
        .await;
    let ServerFrame::Connected(k) = c.next_frame().await else {
        panic!("expected connected")
    };
    assert_eq!(k.sequence_number, 0);
    assert_eq!(k.session_id.as_ref().map(|s| s.as_str()), Some("tab-1"));
    assert_eq!(k.connection_sequence, Some(3));
    assert_eq!(k.head, 1);
    assert!(!k.client_id.is_empty() && !k.epoch.is_empty());
    let mut other = s.client(&token("bob", None)).await;
    other.expect_nothing_more().await;
    c.expect_nothing_more().await;
}

#[tokio::test]
async fn the_token_can_come_in_the_upgrade_header() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let s = TestServer::start().await;
    let mut req = format!("ws://{}/ws", s.addr).into_client_request().unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token("alice", None)).parse().unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut c = seqcast_e2e::Client { ws };
    c.send(json!({"type": "hello"})).await;
    assert!(matches!(c.next_frame().await, ServerFrame::Connected(_)));
    // A bad header token is refused at the upgrade with 401.
    let mut req = format!("ws://{}/ws", s.addr).into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", "Bearer nope".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}

#[tokio::test]
async fn live_messages_reach_subscribers_of_that_key_only() {
    let s = TestServer::start().await;
    let t = token("alice", None);
    let mut a = s.client(&t).await;
    let mut b = s.client(&t).await;
    let ack = a.subscribe("search", "r1").await;
    assert_eq!(ack.subscription_key.to_string(), "search:r1");
    assert_eq!(ack.drained, 0);
    b.subscribe("search", "r2").await;
    s.publish("search", "r1", json!("for a")).await;
    s.publish("search", "r2", json!("for b")).await;
    let m = a.expect_message().await;
    assert_eq!(
        (m.sequence_number, m.stream_sequence, m.request_id.as_str()),
        (1, 1, "r1")
    );
    let m = b.expect_message().await;
    assert_eq!(
        (m.sequence_number, m.stream_sequence, m.request_id.as_str()),
        (2, 1, "r2")
    );
    a.expect_nothing_more().await;
    b.expect_nothing_more().await;
    // After unsubscribe, nothing more arrives.
    a.send(json!({"type": "unsubscribe", "channel": "search", "request_id": "r1"}))
        .await;
    a.expect_nothing_more().await;
    s.publish("search", "r1", json!("after")).await;
    a.expect_nothing_more().await;
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_stays_open() {
    let s = TestServer::start().await;
    let mut c = s.client(&token("alice", None)).await;
    let cases = [
        ("{not json", "JSON"),
        (r#"{"type":"dance"}"#, "dance"),
        (r#"[1,2]"#, ""),
        (r#"{"channel":"c"}"#, "type"),
        (
            r#"{"type":"subscribe","channel":"a:b","request_id":"r"}"#,
            "channel",
        ),
        (
            r#"{"type":"subscribe","channel":"c","request_id":"has space"}"#,
            "request_id",
        ),
        (
            r#"{"type":"subscribe","channel":"c","request_id":"r","since":-1}"#,
            "since",
        ),
        (r#"{"type":"hello","token":"x"}"#, "hello"),
    ];
    for (text, needle) in cases {
        c.send_text(text).await;
        match c.next_frame().await {
            ServerFrame::Error(e) => {
                assert_eq!(e.code, ErrorCode::BadRequest, "{text}");
                assert!(e.message.contains(needle), "{text}: {}", e.message);
            }
            other => panic!("{text}: expected error, got {other:?}"),
        }
    }
    c.expect_nothing_more().await;
    c.subscribe("c", "r").await;
    s.publish("c", "r", json!(1)).await;
    assert_eq!(c.expect_message().await.sequence_number, 1);
}

#[tokio::test]
async fn subscribing_outside_the_tokens_patterns_is_forbidden() {
    let s = TestServer::start().await;
    let mut c = s.client(&token("alice", Some(&["search:*"]))).await;
    c.send(json!({"type": "subscribe", "channel": "session", "request_id": "abc"}))
        .await;
    let ServerFrame::Error(e) = c.next_frame().await else {
        panic!("expected error")
    };
    assert_eq!(e.code, ErrorCode::Forbidden);
    s.publish("session", "abc", json!("secret")).await;
    c.expect_nothing_more().await;
    c.subscribe("search", "r1").await;
}

#[tokio::test]
async fn a_frame_over_the_size_limit_closes_with_1009_and_others_keep_working() {
    let s = TestServer::start_with(Options::args(&["--max-message-bytes", "4096"])).await;
    let t = token("alice", None);
    let mut big = s.client(&t).await;
    let mut other = s.client(&t).await;
    big.send_text(&format!(
        r#"{{"type":"ping","pad":"{}"}}"#,
        "x".repeat(10_000)
    ))
    .await;
    match big.next_event().await {
        Event::Closed(code, _) => assert_eq!(code, 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }
    other.expect_nothing_more().await;
    s.wait_for_log(|v| v["event"] == "connection_closed" && v["close_code"] == 1009)
        .await;
}

#[tokio::test]
async fn no_hello_in_time_closes_with_4001() {
    let s = TestServer::start_with(Options::args(&["--hello-timeout-ms", "300"])).await;
    let mut c = s.connect_raw().await;
    match c.next_event().await {
        Event::Frame(ServerFrame::Error(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        other => panic!("expected an unauthorized error first, got {other:?}"),
    }
    match c.next_event().await {
        Event::Closed(code, _) => assert_eq!(code, 4001),
        other => panic!("expected close 4001, got {other:?}"),
    }
}

#[tokio::test]
async fn a_bad_or_missing_token_in_hello_closes_with_4001() {
    let s = TestServer::start().await;
    for hello in [
        json!({"type": "hello", "token": "garbage"}),
        json!({"type": "hello"}),
        json!({"type": "hello", "token": seqcast_e2e::token_with("a", None, -100, false)}),
    ] {
        let mut c = s.connect_raw().await;
        c.send(hello.clone()).await;
        let ServerFrame::Error(e) = c.next_frame().await else {
            panic!("expected error for {hello}")
        };
        assert_eq!(e.code, ErrorCode::Unauthorized, "{hello}");
        match c.next_event().await {
            Event::Closed(code, _) => assert_eq!(code, 4001, "{hello}"),
            other => panic!("expected close 4001, got {other:?}"),
        }
    }
    // Frames before hello are refused but the connection may still say hello.
    let mut c = s.connect_raw().await;
    c.send(json!({"type": "subscribe", "channel": "c", "request_id": "r"}))
        .await;
    let ServerFrame::Error(e) = c.next_frame().await else {
        panic!("expected error")
    };
    assert!(e.message.contains("hello"), "{}", e.message);
    c.send(json!({"type": "hello", "token": token("a", None)}))
        .await;
    assert!(matches!(c.next_frame().await, ServerFrame::Connected(_)));
}

/// A client that stops reading is not closed and not buffered without bound: its live delivery
/// pauses while its queue is full, it catches up from the log when it reads again, and other
/// clients are served meanwhile.
#[tokio::test]
async fn a_client_that_does_not_read_is_caught_up_from_the_log_not_closed() {
    let s = TestServer::start_with(Options::args(&[
        "--send-queue",
        "4",
        "--cache-bytes",
        "1048576",
    ]))
    .await;
    let t = token("alice", None);
    let mut slow = s.client(&t).await;
    slow.subscribe("c", "r").await;
    let mut fine = s.client(&t).await;
    fine.subscribe("c", "other").await;
    // ~64 KiB messages: the kernel's socket buffers fill, then the 4-frame queue; after that
    // the slow client leaves live delivery.
    let pad = "y".repeat(64 * 1024);
    let mut published = Vec::new();
    for i in 0..400 {
        let r = s.publish("c", "r", json!({"i": i, "pad": pad})).await;
        published.push(r["sequence_number"].as_u64().unwrap());
    }
    assert!(
        s.metric("seqcast_subscribers_lagged_total").await >= 1,
        "the slow client should have left live delivery"
    );
    s.publish("c", "other", json!("still served")).await;
    let m = fine.expect_message().await;
    assert_eq!(m.request_id.as_str(), "other");
    // Now it reads: every message once, in order, then live again.
    for want in &published {
        let m = slow.expect_message().await;
        assert_eq!(m.sequence_number, *want);
    }
    let r = s.publish("c", "r", json!("live again")).await;
    let m = slow.expect_message().await;
    assert_eq!(m.sequence_number, r["sequence_number"].as_u64().unwrap());
    slow.expect_nothing_more().await;
    assert_eq!(s.metric("seqcast_slow_consumer_closes_total").await, 0);
    assert!(s.metric("seqcast_catchup_log_pages_total").await >= 1);
}

#[tokio::test]
async fn origins_outside_the_allow_list_get_403_at_the_upgrade() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let s =
        TestServer::start_with(Options::args(&["--allowed-origins", "https://app.example"])).await;
    let connect = |origin: &'static str| {
        let mut req = format!("ws://{}/ws", s.addr).into_client_request().unwrap();
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    let err = connect("https://evil.example").await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    assert!(connect("https://app.example").await.is_ok());
    // Default: same host only.
    let s2 = TestServer::start().await;
    let mut req = format!("ws://{}/ws", s2.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Origin", format!("http://{}", s2.addr).parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
    let mut req = format!("ws://{}/ws", s2.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Origin", "http://elsewhere:1".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_err());
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_and_exits_0() {
    let mut s = TestServer::start().await;
    let mut c = s.client(&token("alice", None)).await;
    c.subscribe("c", "r").await;
    let status = s.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    match c.next_event().await {
        Event::Closed(code, _) => assert_eq!(code, 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let logs = s.logs();
    assert!(
        logs.iter()
            .any(|v| v["event"] == "connection_closed" && v["close_code"] == 1001)
    );
    assert!(logs.iter().any(|v| v["event"] == "stopped"));
}

#[tokio::test]
async fn connection_logs_carry_the_session_fields() {
    let s = TestServer::start().await;
    let mut c = s.connect_raw().await;
    c.send(json!({"type": "hello", "token": token("a", None), "session_id": "sess-42", "connection_sequence": 7})).await;
    assert!(matches!(c.next_frame().await, ServerFrame::Connected(_)));
    c.subscribe("c", "r").await;
    s.publish("c", "r", json!(1)).await;
    c.expect_message().await;
    c.close().await;
    let closed = s
        .wait_for_log(|v| v["event"] == "connection_closed" && v["session_id"] == "sess-42")
        .await;
    assert_eq!(closed["connection_sequence"], 7);
    assert_eq!(closed["close_code"], 1000);
    assert_eq!(closed["messages_sent"], 3, "connected, sub_ack, message");
    assert!(closed["duration_seconds"].as_f64().unwrap() >= 0.0);
    assert!(closed["client_id"].as_str().is_some());
    let opened = s
        .logs()
        .into_iter()
        .find(|v| v["event"] == "connection_opened")
        .unwrap();
    assert_eq!(opened["session_id"], "sess-42");
    assert_eq!(opened["client_id"], closed["client_id"]);
}

#[tokio::test]
async fn an_abnormal_drop_is_logged_as_1006() {
    let s = TestServer::start().await;
    let mut c = s.connect_raw().await;
    c.send(json!({"type": "hello", "token": token("a", None), "session_id": "drop-me"}))
        .await;
    assert!(matches!(c.next_frame().await, ServerFrame::Connected(_)));
    drop(c); // TCP closed without a close frame
    let closed = s
        .wait_for_log(|v| v["event"] == "connection_closed" && v["session_id"] == "drop-me")
        .await;
    assert_eq!(closed["close_code"], 1006);
}

#[tokio::test]
async fn subscriptions_per_connection_are_bounded() {
    let s = TestServer::start_with(Options::args(&["--max-subscriptions", "2"])).await;
    let mut c = s.client(&token("alice", None)).await;
    c.subscribe("c", "a").await;
    c.subscribe("c", "b").await;
    c.subscribe("c", "a").await; // already subscribed: not a new one
    c.send(json!({"type": "subscribe", "channel": "c", "request_id": "x"}))
        .await;
    let ServerFrame::Error(e) = c.next_frame().await else {
        panic!("expected error")
    };
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("limit 2"), "{}", e.message);
    c.send(json!({"type": "unsubscribe", "channel": "c", "request_id": "a"}))
        .await;
    c.subscribe("c", "x").await;
}
