//! Write coalescing (`--write-delay-ms`) against the real server: a subscriber whose messages
//! keep coming faster than half the delay gets them in far fewer write rounds, complete and in
//! order; a reply it asks for (`pong`) is not held, and takes the held messages out with it;
//! with `--write-delay-ms 0` every message goes out in a round of its own.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use seqcast_e2e::{Client, Options, TestServer, data, token};
use seqcast_protocol::ServerFrame;
use serde_json::json;

/// Long enough that sequential publishes count as a busy stream on a loaded machine (one every
/// few milliseconds against half of it) and that a held message is told from a prompt one.
const DELAY_MS: u64 = 2_000;
/// Messages published one after the other.
const N: u64 = 80;
const ROUNDS: &str = "seqcast_commit_to_written_seconds_count";

/// Publish `N` messages one after the other while `c` reads them; checks they are complete and
/// in order; returns the write rounds the server needed.
async fn publish_and_read(s: &TestServer, c: &mut Client) -> u64 {
    let before = s.metric(ROUNDS).await;
    let publishing = async {
        for i in 1..=N {
            s.publish("c", "r", json!(i)).await;
        }
    };
    let reading = async {
        let mut got = Vec::new();
        for _ in 0..N {
            got.push(c.expect_message().await);
        }
        got
    };
    let ((), got) = tokio::join!(publishing, reading);
    for (i, m) in (1..).zip(&got) {
        assert_eq!(
            (m.stream_sequence, data(m)),
            (i, json!(i)),
            "complete, in order"
        );
    }
    s.metric(ROUNDS).await - before
}

#[tokio::test]
async fn a_busy_subscriber_gets_its_messages_in_fewer_writes_and_a_reply_is_not_held() {
    let s =
        TestServer::start_with(Options::args(&["--write-delay-ms", &DELAY_MS.to_string()])).await;
    let mut c = s.client(&token("alice", None)).await;
    c.subscribe("c", "r").await;
    let rounds = publish_and_read(&s, &mut c).await;
    assert!(
        rounds <= N / 2,
        "{rounds} write rounds for {N} messages: a busy stream is gathered"
    );

    // Busy now: the next message is held, but the `pong` the client asks for goes out at once
    // and takes it along, in order.
    s.publish("c", "r", json!("held")).await;
    let asked = Instant::now();
    c.send(json!({"type": "ping"})).await;
    let m = c.expect_message().await;
    assert_eq!(data(&m), json!("held"));
    assert!(matches!(c.next_frame().await, ServerFrame::Pong));
    assert!(
        asked.elapsed() < Duration::from_millis(DELAY_MS / 2),
        "a reply is not held: {:?}",
        asked.elapsed()
    );
}

#[tokio::test]
async fn with_no_write_delay_nothing_is_held() {
    let s = TestServer::start_with(Options::args(&["--write-delay-ms", "0"])).await;
    let mut c = s.client(&token("alice", None)).await;
    c.subscribe("c", "r").await;
    let rounds = publish_and_read(&s, &mut c).await;
    // Sequential publishes: a round each, unless the server was behind and took two at once.
    assert!(
        rounds > N / 2,
        "{rounds} write rounds for {N} messages: nothing was held"
    );
    c.expect_nothing_more().await;
}
