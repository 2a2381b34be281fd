//! Metrics, request ids and the access log against the real binary.
#![allow(clippy::unwrap_used)]

use seqcast_e2e::{TestServer, token};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// The value of the first series line starting with `series` (labels included).
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
}

#[tokio::test]
async fn metrics_keep_old_series_and_add_histograms() {
    let s = TestServer::start().await;
    let mut c = s.client(&token("u", None)).await;
    c.subscribe("c", "r").await;
    s.publish("c", "r", json!(1)).await;
    c.next_event().await;
    let (status, _) = s
        .get("/websocket/messages?since=0", Some(&token("u", None)))
        .await;
    assert_eq!(status, 200);
    let (status, _) = s
        .get("/websocket/messages?since=x", Some(&token("u", None)))
        .await;
    assert_eq!(status, 400);
    c.close().await;

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let m = loop {
        let m = s.metrics().await;
        if value(
            &m,
            "seqcast_connections_closed_by_code_total{code=\"1000\"}",
        )
        .is_some()
            || tokio::time::Instant::now() > deadline
        {
            break m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // Every series the hand-written exporter had is still there.
    for name in [
        "seqcast_published_total",
        "seqcast_deliveries_total",
        "seqcast_backlogged_total",
        "seqcast_backlog_overflow_total",
        "seqcast_subscribers_lagged_total",
        "seqcast_catchup_log_pages_total",
        "seqcast_connections_opened_total",
        "seqcast_connections_closed_total",
        "seqcast_slow_consumer_closes_total",
        "seqcast_publish_failures_total",
        "seqcast_db_transactions_total",
        "seqcast_db_transactions_failed_total",
        "seqcast_db_events_committed_total",
        "seqcast_head",
        "seqcast_recovery_window_messages",
        "seqcast_cache_bytes",
        "seqcast_cache_floor",
        "seqcast_retention_floor",
        "seqcast_subscribed_keys",
        "seqcast_db_queued_commands",
    ] {
        assert!(
            value(&m, &format!("{name} ")).is_some(),
            "{name} missing:\n{m}"
        );
    }
    assert_eq!(value(&m, "seqcast_published_total "), Some(1.0));
    for (name, at_least) in [
        (
            "seqcast_publish_duration_seconds_count{endpoint=\"single\"}",
            1.0,
        ),
        ("seqcast_commit_to_queued_seconds_count", 1.0),
        ("seqcast_commit_to_written_seconds_count", 1.0),
        ("seqcast_db_group_events_count", 1.0),
        ("seqcast_db_commit_seconds_count", 1.0),
        ("seqcast_catchup_lag_messages_count", 1.0),
        ("seqcast_recovery_messages_count", 1.0),
        ("seqcast_recovery_duration_seconds_count", 2.0),
        (
            "seqcast_errors_total{code=\"bad_request\",transport=\"http\"}",
            1.0,
        ),
        (
            "seqcast_connections_closed_by_code_total{code=\"1000\"}",
            1.0,
        ),
    ] {
        let v = value(&m, name).unwrap_or_else(|| panic!("{name} missing:\n{m}"));
        assert!(v >= at_least, "{name} = {v}, expected at least {at_least}");
    }
    assert!(
        m.contains("# TYPE seqcast_publish_duration_seconds histogram"),
        "{m}"
    );
    for gauge in [
        "seqcast_connections ",
        "seqcast_subscriptions ",
        "seqcast_live_subscriptions ",
    ] {
        assert!(value(&m, gauge).is_some(), "{gauge} missing:\n{m}");
    }
}

#[tokio::test]
async fn request_ids_are_echoed_logged_and_carried_to_the_websocket() {
    let s = TestServer::start().await;
    // Given: echoed, and in the access-log line of the failed request (at info).
    let r = s
        .http
        .get(s.url("/websocket/messages?since=0&secret=x"))
        .header("x-request-id", "rid-given-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-request-id"], "rid-given-1");
    let line = s
        .wait_for_log(|v| {
            v["event"] == "http_request" && v["spans"][0]["http_request_id"] == "rid-given-1"
        })
        .await;
    assert_eq!(line["status"], 401);
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["error_code"], "unauthorized");
    assert_eq!(
        line["spans"][0]["path"], "/websocket/messages",
        "no query in the path"
    );
    // Absent: made up, and a success is logged at debug.
    let r = s.http.get(s.url("/healthz")).send().await.unwrap();
    let made = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(made.len(), 36, "a UUID: {made}");
    let line = s
        .wait_for_log(|v| {
            v["event"] == "http_request" && v["spans"][0]["http_request_id"] == made.as_str()
        })
        .await;
    assert_eq!(line["level"], "DEBUG");

    // The WebSocket upgrade's id is in connection_opened and connection_closed.
    let mut req = format!("ws://{}/ws", s.addr).into_client_request().unwrap();
    req.headers_mut()
        .insert("x-request-id", "rid-ws-7".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "rid-ws-7");
    use futures_util::SinkExt as _;
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        json!({"type": "hello", "token": token("u", None)}).to_string(),
    ))
    .await
    .unwrap();
    let opened: Value = s.wait_for_log(|v| v["event"] == "connection_opened").await;
    assert_eq!(opened["http_request_id"], "rid-ws-7");
    ws.close(None).await.unwrap();
    let closed = s.wait_for_log(|v| v["event"] == "connection_closed").await;
    assert_eq!(closed["http_request_id"], "rid-ws-7");
}
