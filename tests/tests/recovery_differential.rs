//! Differential test of the two ways to recover: for random logs and random `since` / key /
//! `limit` / epoch, `GET /websocket/messages` (paged by `next_since`) and a WebSocket `subscribe`
//! with `since` carry the same messages and the same verdict (`complete` ⇔ `recovered`, the same
//! `oldest_sequence`) — and both match what the test published. Against the real server binary
//! (SQLite) with a real WebSocket client; the count bound makes windows short, and a tiny cache
//! sends one of the rounds through log pages.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use seqcast_e2e::{Event, Options, TestServer, token};
use seqcast_protocol::ServerFrame;
use serde_json::{Value, json};

const CHANNELS: [&str; 2] = ["c0", "c1"];
const REQUESTS: [&str; 2] = ["r0", "r1"];
const WINDOW: u64 = 25;

/// What one way of recovering said.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    seqs: Vec<u64>,
    recovered: bool,
    oldest_sequence: Option<u64>,
}

/// Every page of the HTTP answer, following `next_since`; the verdict is the first page's.
async fn over_http(
    s: &TestServer,
    key: (&str, &str),
    since: u64,
    limit: u64,
    epoch: &str,
) -> Answer {
    let tok = token("alice", None);
    let mut seqs = Vec::new();
    let mut first: Option<(bool, Option<u64>)> = None;
    let mut since = since;
    for _ in 0..1_000 {
        let (status, body) = s
            .get(
                &format!(
                    "/websocket/messages?since={since}&channel={}&request_id={}&limit={limit}&epoch={epoch}",
                    key.0, key.1
                ),
                Some(&tok),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        for m in body["messages"].as_array().unwrap() {
            seqs.push(m["sequence_number"].as_u64().unwrap());
        }
        first.get_or_insert((
            body["complete"].as_bool().unwrap(),
            body["oldest_sequence"].as_u64(),
        ));
        match body["next_since"].as_u64() {
            Some(n) => since = n,
            None => break,
        }
    }
    let (recovered, oldest_sequence) = first.unwrap();
    Answer {
        seqs,
        recovered,
        oldest_sequence: if recovered { None } else { oldest_sequence },
    }
}

/// The replay of a WebSocket `subscribe` with `since`: `want` messages, then nothing more (with
/// `want: None` only the `sub_ack` is looked at).
async fn over_ws(
    s: &TestServer,
    key: (&str, &str),
    since: u64,
    epoch: &str,
    want: Option<usize>,
) -> Answer {
    let mut c = s.client(&token("alice", None)).await;
    let ack = c.subscribe_since(key.0, key.1, since, Some(epoch)).await;
    let mut seqs = Vec::new();
    let Some(want) = want else {
        c.close().await;
        return Answer {
            seqs,
            recovered: ack.recovered.unwrap(),
            oldest_sequence: ack.oldest_sequence,
        };
    };
    while seqs.len() < want {
        match c.next_event_within(Duration::from_secs(5)).await {
            Some(Event::Frame(ServerFrame::Message(m))) => seqs.push(m.sequence_number),
            other => panic!("replay of {key:?} since {since} stopped after {seqs:?}: {other:?}"),
        }
    }
    // Nothing past what was expected (no publishes run meanwhile).
    if let Some(e) = c.next_event_within(Duration::from_millis(150)).await {
        panic!("replay of {key:?} since {since}: more than {want} messages: {e:?}");
    }
    c.close().await;
    let recovered = ack.recovered.unwrap();
    Answer {
        seqs,
        recovered,
        oldest_sequence: if recovered { None } else { ack.oldest_sequence },
    }
}

async fn round(seed: u64, args: &[&str]) {
    let mut rng = StdRng::seed_from_u64(seed);
    let window = WINDOW.to_string();
    let mut all = vec!["--recovery-max-messages", window.as_str()];
    all.extend_from_slice(args);
    let s = TestServer::start_with(Options::args(&all)).await;
    // A random log over four keys.
    let n = rng.random_range(10..80);
    let keys: Vec<(usize, usize)> = (0..n)
        .map(|_| {
            (
                rng.random_range(0..CHANNELS.len()),
                rng.random_range(0..REQUESTS.len()),
            )
        })
        .collect();
    let batch: Vec<Value> = keys
        .iter()
        .enumerate()
        .map(|(i, &(c, r))| json!({"channel": CHANNELS[c], "request_id": REQUESTS[r], "data": i}))
        .collect();
    s.publish_batch(&batch).await;
    let head = n as u64;
    let (_, probe) = s
        .get(
            "/websocket/messages?since=0&limit=1",
            Some(&token("alice", None)),
        )
        .await;
    assert_eq!(probe["head"].as_u64(), Some(head));
    let epoch = probe["epoch"].as_str().unwrap().to_owned();
    for case in 0..20 {
        let (c, r) = (
            rng.random_range(0..CHANNELS.len()),
            rng.random_range(0..REQUESTS.len()),
        );
        let key = (CHANNELS[c], REQUESTS[r]);
        let since = rng.random_range(0..=head + 3);
        let limit = rng.random_range(1..10);
        let own_epoch = rng.random_bool(0.85);
        let e = if own_epoch {
            epoch.as_str()
        } else {
            "another-history"
        };
        let http = over_http(&s, key, since, limit, e).await;
        // The reference: the window is the newest WINDOW numbers (no pruning, no age bound hit).
        let window_start = head.saturating_sub(WINDOW) + 1;
        let recovered = own_epoch && since <= head && since + 1 >= window_start;
        let after = if !own_epoch || since > head {
            head
        } else {
            since.max(window_start - 1)
        };
        let expected: Vec<u64> = (after + 1..=head)
            .filter(|&q| keys[q as usize - 1] == (c, r))
            .collect();
        let label = format!(
            "seed {seed} case {case}: key {key:?} since {since} limit {limit} own epoch {own_epoch} head {head}"
        );
        assert_eq!(http.seqs, expected, "HTTP, {label}");
        assert_eq!(http.recovered, recovered, "HTTP verdict, {label}");
        // Another history's number: the WebSocket starts like a fresh subscriber (its backlog),
        // HTTP sends nothing; only the verdict is compared.
        let want = own_epoch.then_some(http.seqs.len());
        let ws = over_ws(&s, key, since, e, want).await;
        if own_epoch {
            assert_eq!(ws, http, "WebSocket against HTTP, {label}");
        } else {
            assert_eq!(
                (ws.recovered, ws.oldest_sequence),
                (http.recovered, http.oldest_sequence),
                "verdicts, {label}"
            );
        }
    }
}

#[tokio::test]
async fn http_recovery_and_websocket_replay_agree_from_memory() {
    tokio::time::timeout(Duration::from_secs(120), async {
        for seed in [1, 2, 5, 6] {
            round(seed, &[]).await;
        }
    })
    .await
    .expect("bounded in time");
}

#[tokio::test]
async fn http_recovery_and_websocket_replay_agree_from_log_pages() {
    // A cache too small for the log and a small send queue: both read the log, the WebSocket
    // page by page under its water marks.
    tokio::time::timeout(Duration::from_secs(120), async {
        for seed in [3, 4, 7, 8] {
            round(seed, &["--cache-bytes", "2048", "--send-queue", "4"]).await;
        }
    })
    .await
    .expect("bounded in time");
}
