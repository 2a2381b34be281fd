//! The client against the real server binary: live delivery, resume across a crash and a
//! restart while publishing continues, gaps, token refresh on reconnect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client_support;

use std::sync::atomic::Ordering;

use client_support::{
    Proxy, expect_message, expect_subscribed, index, next_event, spawn_publisher, wait_state,
};
use seqcast_client::{Client, ConnectionState, Error, Event, GapReason, fixed_token};
use seqcast_e2e::{Options, PROMPT, TestServer, token};
use serde_json::json;

fn ws_url(s: &TestServer) -> String {
    format!("ws://{}/ws", s.addr)
}

async fn connect(url: String) -> Client {
    client_support::connect_with(url, fixed_token(token("alice", None))).await
}

#[tokio::test]
async fn backlog_then_live_messages_arrive_in_order_and_only_for_the_key() {
    let s = TestServer::start_with(Options::default()).await;
    for i in 0..3 {
        s.publish("search", "r1", json!({"i": i})).await;
    }
    let client = connect(ws_url(&s)).await;
    assert_eq!(client.connection_sequence(), 1);
    let ConnectionState::Connected(info) = client.state() else {
        panic!("not connected: {:?}", client.state())
    };
    assert_eq!(info.connection_sequence, 1);
    assert_eq!(&info.session_id, client.session_id());

    let mut sub = client.subscribe("search", "r1").await.unwrap();
    let ack = expect_subscribed(&mut sub).await;
    assert_eq!((ack.since, ack.drained, ack.head), (None, 3, 3));
    assert!(matches!(
        client.subscribe("search", "r1").await,
        Err(Error::AlreadySubscribed(_))
    ));
    for i in 3..10 {
        s.publish("search", "other", json!({"i": 100 + i})).await;
        s.publish("search", "r1", json!({"i": i})).await;
    }
    let mut last = 0;
    for i in 0..10 {
        let m = expect_message(&mut sub).await;
        assert_eq!(index(&m), i);
        assert_eq!(m.stream_sequence, i + 1);
        assert_eq!(
            (m.channel.as_str(), m.request_id.as_str()),
            ("search", "r1")
        );
        assert!(m.sequence_number > last, "in order");
        assert!(m.timestamp > 0);
        last = m.sequence_number;
    }

    assert!(client.unsubscribe("search", "r1").await.unwrap());
    assert!(
        tokio::time::timeout(PROMPT, sub.recv())
            .await
            .unwrap()
            .is_none(),
        "the stream ends when the key is unsubscribed"
    );
    client.close().await;
    assert_eq!(client.state(), ConnectionState::Closed);
}

/// Publishing continues while the server is stopped (`kill -9` or SIGTERM) and started again
/// on the same data directory: the stream yields every message exactly once, in order.
async fn resume_across_a_restart(crash: bool) {
    let dir = tempfile::tempdir().unwrap();
    let opts = || Options {
        data_dir: Some(dir.path().to_path_buf()),
        ..Options::default()
    };
    let mut s = TestServer::start_with(opts()).await;
    let proxy = Proxy::start(s.addr).await;
    let client = connect(proxy.ws_url()).await;
    let mut sub = client.subscribe("feed", "k1").await.unwrap();
    assert_eq!(expect_subscribed(&mut sub).await.since, None);

    const N: u64 = 150;
    let publisher = spawn_publisher(proxy.http_url("/api/publish"), "feed", "k1", N);
    let mut got = Vec::new();
    while got.len() < 40 {
        got.push(expect_message(&mut sub).await);
    }
    if crash {
        s.kill9().await;
    } else {
        assert!(s.terminate().await.success());
    }
    let s2 = TestServer::start_with(opts()).await;
    proxy.set_backend(Some(s2.addr));

    let published = tokio::time::timeout(PROMPT * 3, publisher)
        .await
        .expect("publisher finished")
        .unwrap();
    let newest = *published.last().unwrap();
    let mut resumed = Vec::new();
    while got.last().map(|m| m.sequence_number) != Some(newest) {
        match next_event(&mut sub).await {
            Event::Message(m) => got.push(m),
            Event::Subscribed(ack) => resumed.push(ack),
            Event::Gap(g) => panic!("unexpected gap: {g:?}"),
            Event::Refused(r) => panic!("refused: {r:?}"),
        }
    }

    // Exactly the key's events in the server's log, once each, in order.
    let (status, log) = s2
        .get(
            "/websocket/messages?since=0&channel=feed&request_id=k1&limit=10000",
            Some(&token("alice", None)),
        )
        .await;
    assert_eq!(status, 200, "{log}");
    assert_eq!(log["complete"], true);
    let logged: Vec<u64> = log["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sequence_number"].as_u64().unwrap())
        .collect();
    let seqs: Vec<u64> = got.iter().map(|m| m.sequence_number).collect();
    assert_eq!(seqs, logged, "every event of the key once, in order");
    for seq in &published {
        assert!(seqs.contains(seq), "acknowledged {seq} not yielded");
    }
    let mut indexes: Vec<u64> = got.iter().map(index).collect();
    indexes.dedup(); // a retried publish may be logged as an upsert (a new event)
    assert_eq!(
        indexes,
        (0..N).collect::<Vec<_>>(),
        "every message, in order"
    );
    assert!(!resumed.is_empty(), "re-subscribed after the restart");
    assert!(
        resumed
            .iter()
            .all(|a| a.since.is_some() && a.recovered == Some(true)),
        "resumed with since: {resumed:?}"
    );
    assert!(client.connection_sequence() >= 2);
    assert_eq!(
        resumed.last().map(|a| a.connection_sequence),
        Some(client.connection_sequence())
    );

    // Nothing stray is queued: the next message is the next one published.
    let r = s2.publish("feed", "k1", json!({"i": N})).await;
    let m = expect_message(&mut sub).await;
    assert_eq!(Some(m.sequence_number), r["sequence_number"].as_u64());
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_and_restart_while_publishing_loses_and_repeats_nothing() {
    resume_across_a_restart(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_while_publishing_loses_and_repeats_nothing() {
    resume_across_a_restart(false).await;
}

#[tokio::test]
async fn resuming_beyond_the_recovery_window_yields_a_gap() {
    let s = TestServer::start_with(Options::args(&["--recovery-max-messages", "5"])).await;
    let proxy = Proxy::start(s.addr).await;
    let client = connect(proxy.ws_url()).await;
    let mut sub = client.subscribe("search", "r1").await.unwrap();
    expect_subscribed(&mut sub).await;
    for i in 0..2 {
        s.publish("search", "r1", json!({"i": i})).await;
    }
    let before = expect_message(&mut sub).await;
    let last = expect_message(&mut sub).await;
    assert!(last.sequence_number > before.sequence_number);

    proxy.set_backend(None);
    proxy.sever();
    wait_state(&client, |st| !st.is_connected()).await;
    let mut newest = 0;
    for i in 2..22 {
        newest = s.publish("search", "r1", json!({"i": i})).await["sequence_number"]
            .as_u64()
            .unwrap();
    }
    proxy.set_backend(Some(s.addr));

    let ack = expect_subscribed(&mut sub).await;
    assert_eq!(ack.since, Some(last.sequence_number));
    assert_eq!(ack.recovered, Some(false));
    let Event::Gap(gap) = next_event(&mut sub).await else {
        panic!("expected a gap")
    };
    assert_eq!(gap.reason, GapReason::Window);
    assert_eq!(gap.since, Some(last.sequence_number));
    let oldest = gap.oldest_sequence.expect("oldest_sequence");
    assert!(oldest > last.sequence_number + 1, "{gap:?}");
    // What the server still has follows the gap (the window, and the key's backlog, which may
    // reach further back), in order, up to the newest.
    let mut prev = last.sequence_number;
    loop {
        let m = expect_message(&mut sub).await;
        assert!(
            m.sequence_number > prev,
            "{} after {prev}",
            m.sequence_number
        );
        prev = m.sequence_number;
        if prev == newest {
            break;
        }
    }
    client.close().await;
}

#[tokio::test]
async fn the_token_provider_is_asked_again_on_every_reconnect() {
    let s = TestServer::start_with(Options::default()).await;
    let proxy = Proxy::start(s.addr).await;
    let (calls, provider) = client_support::counting_provider(|n| {
        if n == 2 {
            Err(std::io::Error::other("token service briefly down"))
        } else {
            Ok(token(&format!("user-{n}"), None))
        }
    });
    let client = client_support::connect_with(proxy.ws_url(), provider).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let mut sub = client.subscribe("search", "r1").await.unwrap();
    let first = expect_subscribed(&mut sub).await;

    proxy.sever();
    wait_state(
        &client,
        |st| matches!(st, ConnectionState::Connected(i) if i.connection_sequence == 2),
    )
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "asked on reconnect, and again after the failed attempt"
    );
    let again = expect_subscribed(&mut sub).await;
    assert_eq!(again.connection_sequence, 2);
    assert_eq!(
        again.since,
        Some(first.head),
        "nothing yielded yet: resume at the ack head"
    );
    let r = s.publish("search", "r1", json!({"i": 0})).await;
    assert_eq!(
        Some(expect_message(&mut sub).await.sequence_number),
        r["sequence_number"].as_u64()
    );

    // `reconnect` drops the connection on purpose; the next one is number 3.
    client.reconnect();
    wait_state(
        &client,
        |st| matches!(st, ConnectionState::Connected(i) if i.connection_sequence == 3),
    )
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    client.close().await;
}

#[tokio::test]
async fn a_refused_token_fails_connect() {
    let s = TestServer::start_with(Options::default()).await;
    let err = Client::builder(ws_url(&s))
        .connect(fixed_token("not-a-jwt"))
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::Rejected { .. }), "{err:?}");
    let err = Client::connect("http://nope", fixed_token("t"))
        .await
        .expect_err("bad url");
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err:?}");
}

#[tokio::test]
async fn dropping_every_client_handle_closes_and_ends_the_streams() {
    let s = TestServer::start_with(Options::args(&["--storage", "memory"])).await;
    let client = connect(ws_url(&s)).await;
    let second_handle = client.clone();
    let mut sub = client.subscribe("search", "r1").await.unwrap();
    expect_subscribed(&mut sub).await;
    drop(client);
    s.publish("search", "r1", json!({"i": 0})).await;
    expect_message(&mut sub).await; // one handle is still alive
    drop(second_handle);
    assert!(
        tokio::time::timeout(PROMPT, sub.recv())
            .await
            .unwrap()
            .is_none(),
        "the stream ends with the last handle"
    );
    // Dropping a subscription unsubscribes it; the key can be followed again.
    let client = connect(ws_url(&s)).await;
    let first = client.subscribe("search", "r1").await.unwrap();
    drop(first);
    assert!(
        !client.unsubscribe("search", "r1").await.unwrap(),
        "already gone"
    );
    let mut again = client.subscribe("search", "r1").await.unwrap();
    expect_subscribed(&mut again).await;
    // A subscribe without `since` starts with the key's recent backlog, read from the log.
    assert_eq!(index(&expect_message(&mut again).await), 0);
    s.publish("search", "r1", json!({"i": 1})).await;
    assert_eq!(index(&expect_message(&mut again).await), 1);
    client.close().await;
}
