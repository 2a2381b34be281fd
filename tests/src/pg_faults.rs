//! Helpers of the PostgreSQL fault tests (`tests/tests/pg_faults*.rs`): nodes on a database
//! URL, the whole log as a node serves it, readiness polling, and a history check ("every
//! acknowledged publish is in the log with the number it was answered").

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::{Client, Event, Options, TestServer};
use seqcast_protocol::{MessageFrame, ServerFrame};

/// A node (`seqcast serve --storage postgres`) on `url`, with extra arguments.
pub async fn pg_node(url: &str, extra: &[&str]) -> TestServer {
    let mut args = vec!["--storage", "postgres", "--database-url", url];
    args.extend_from_slice(extra);
    TestServer::start_with(Options::args(&args)).await
}

/// The whole retained log as `node` serves it (`GET /websocket/messages`, every page), by
/// message id: (sequence_number, data).
pub async fn whole_log(node: &TestServer, token: &str) -> BTreeMap<String, Vec<(u64, Value)>> {
    let mut since = 0u64;
    let mut out: BTreeMap<String, Vec<(u64, Value)>> = BTreeMap::new();
    loop {
        let (status, page) = node
            .get(
                &format!("/websocket/messages?since={since}&limit=1000"),
                Some(token),
            )
            .await;
        assert_eq!(status, 200, "recovery failed: {page}");
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        for m in &messages {
            let n = m["sequence_number"].as_u64().unwrap();
            out.entry(m["message_id"].as_str().unwrap().to_owned())
                .or_default()
                .push((n, m["data"].clone()));
            since = since.max(n);
        }
        match page["next_since"].as_u64() {
            Some(next) if next > 0 && !messages.is_empty() => since = since.max(next),
            _ => return out,
        }
    }
}

/// Asserts every acknowledged publish (a 200 answer of `/api/publish`) is in `log` with the
/// number it was answered, and no number was answered twice.
pub fn assert_acknowledged_in_log(acked: &[Value], log: &BTreeMap<String, Vec<(u64, Value)>>) {
    let mut numbers = BTreeMap::new();
    for a in acked {
        let id = a["message_id"].as_str().unwrap();
        let n = a["sequence_number"].as_u64().unwrap();
        let entries = log
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged message {id} (number {n}) is not in the log"));
        assert!(
            entries.iter().any(|(s, _)| *s == n),
            "acknowledged message {id} was answered {n}, the log has {entries:?}"
        );
        if let Some(other) = numbers.insert(n, id.to_owned()) {
            assert_eq!(other, id, "number {n} was answered to two messages");
        }
    }
}

/// `GET /readyz`'s status code.
pub async fn readyz(node: &TestServer) -> (u16, Value) {
    match tokio::time::timeout(Duration::from_secs(5), node.get("/readyz", None)).await {
        Ok(r) => r,
        Err(_) => (0, Value::String("no answer within 5 s".to_owned())),
    }
}

/// Polls `/readyz` until it answers `want`; the answer, or None after `within`.
pub async fn wait_readyz(node: &TestServer, want: u16, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (status, body) = readyz(node).await;
        if status == want {
            return Some(body);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Message frames arriving within `within` (stops early at `n`); other frames skipped, a close
/// ends the wait.
pub async fn messages_within(client: &mut Client, n: usize, within: Duration) -> Vec<MessageFrame> {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next_event_within(left).await {
            Some(Event::Frame(ServerFrame::Message(m))) => out.push(m),
            Some(Event::Frame(_)) => {}
            Some(Event::Closed(..) | Event::Ended) | None => break,
        }
    }
    out
}

/// POST /api/publish with a deadline: (status, body), status 0 when no answer came in time.
pub async fn publish_within(node: &TestServer, body: &Value, within: Duration) -> (u16, Value) {
    match tokio::time::timeout(within, node.publish_raw(body)).await {
        Ok(r) => r,
        Err(_) => (0, Value::Null),
    }
}
