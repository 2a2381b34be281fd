//! Write coalescing (`--write-delay-ms`) against the real server: a subscriber that was just
//! written to gets the messages that follow together, once the delay after that write has
//! passed, complete and in order; a reply it asks for (`pong`) is not held, and takes the held
//! messages out with it; with `--write-delay-ms 0` nothing is held.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use seqcast_e2e::{Options, TestServer, data, token};
use seqcast_protocol::ServerFrame;
use serde_json::json;

/// Long enough that the publishes below land within half of it on a loaded machine, so the
/// hold is certain, and that its lower bound can be asserted without racing the clock.
const DELAY_MS: u64 = 4_000;

#[tokio::test]
async fn a_busy_subscriber_gets_what_follows_a_write_together_and_a_reply_is_not_held() {
    let s =
        TestServer::start_with(Options::args(&["--write-delay-ms", &DELAY_MS.to_string()])).await;
    let mut c = s.client(&token("alice", None)).await;
    c.subscribe("c", "r").await;

    // Idle: the first message goes out at once.
    let published = Instant::now();
    s.publish("c", "r", json!(1)).await;
    let m1 = c.expect_message().await;
    let first_at = Instant::now();
    assert_eq!(data(&m1), json!(1));
    assert!(
        first_at - published < Duration::from_millis(DELAY_MS / 2),
        "an idle connection writes at once ({:?})",
        first_at - published
    );

    // Busy: the next two wait for the delay after that write, then come together, in order.
    s.publish("c", "r", json!(2)).await;
    s.publish("c", "r", json!(3)).await;
    let m2 = c.expect_message().await;
    let m3 = c.expect_message().await;
    let held = first_at.elapsed();
    assert_eq!((data(&m2), data(&m3)), (json!(2), json!(3)));
    assert_eq!(
        (m2.stream_sequence, m3.stream_sequence),
        (2, 3),
        "complete and in order"
    );
    assert!(
        held >= Duration::from_millis(DELAY_MS / 2),
        "held for the write round: {held:?}"
    );

    // Busy again: a message is held, but the `pong` the client asks for goes out at once and
    // takes it along, in order.
    s.publish("c", "r", json!(4)).await;
    let asked = Instant::now();
    c.send(json!({"type": "ping"})).await;
    let m4 = c.expect_message().await;
    assert_eq!(data(&m4), json!(4));
    assert!(matches!(c.next_frame().await, ServerFrame::Pong));
    assert!(
        asked.elapsed() < Duration::from_millis(DELAY_MS / 2),
        "a reply is not held: {:?}",
        asked.elapsed()
    );
}

#[tokio::test]
async fn with_no_write_delay_every_message_goes_out_at_once() {
    let s = TestServer::start_with(Options::args(&["--write-delay-ms", "0"])).await;
    let mut c = s.client(&token("alice", None)).await;
    c.subscribe("c", "r").await;
    for i in 1..=5 {
        let published = Instant::now();
        s.publish("c", "r", json!(i)).await;
        let m = c.expect_message().await;
        assert_eq!((data(&m), m.stream_sequence), (json!(i), i));
        assert!(
            published.elapsed() < Duration::from_millis(DELAY_MS / 2),
            "message {i} took {:?}",
            published.elapsed()
        );
    }
    c.expect_nothing_more().await;
}
