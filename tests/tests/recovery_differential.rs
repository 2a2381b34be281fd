//! Differential test of the ways to recover: for random logs and random `since` / key /
//! `limit` / epoch, `GET /websocket/messages` (paged by `next_since`), a WebSocket `subscribe`
//! with `since`, a Server-Sent Events stream (`GET /events`) and long-polls (`live=long-poll`,
//! paged by `next_since`) carry the same messages and the same verdict (`complete` ⇔
//! `recovered` ⇔ no `event: reset`, the same `oldest_sequence`) — and all match what the test
//! published. Against the real server binary
//! (SQLite) with a real WebSocket client; the count bound makes windows short, a tiny cache
//! sends rounds through log pages, retention moves the floor past the window (resumes from behind
//! it), and a small `--max-response-bytes` or large messages make the byte budget cut pages (the
//! rounds check that it did).
#![allow(clippy::unwrap_used)]

use std::ops::Range;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use seqcast_e2e::sse::Reader;
use seqcast_e2e::{Event, Options, TestServer, token};
use seqcast_protocol::ServerFrame;
use serde_json::{Value, json};

const CHANNELS: [&str; 2] = ["c0", "c1"];
const REQUESTS: [&str; 2] = ["r0", "r1"];
const WINDOW: u64 = 25;
/// A WebSocket catch-up step's byte budget (the server's `hub::PAGE_BYTES`).
const PAGE_BYTES: usize = 1 << 20;

/// What one way of recovering said.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    seqs: Vec<u64>,
    recovered: bool,
    oldest_sequence: Option<u64>,
}

/// Every page of the HTTP answer, following `next_since`; the verdict is the first page's. Also
/// how many pages the byte budget cut (fewer messages than `limit`, and a `next_since`).
async fn over_http(
    s: &TestServer,
    key: (&str, &str),
    since: u64,
    limit: u64,
    epoch: &str,
) -> (Answer, usize) {
    let tok = token("alice", None);
    let mut seqs = Vec::new();
    let mut first: Option<(bool, Option<u64>)> = None;
    let mut since = since;
    let mut cut_by_bytes = 0;
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
        let page = body["messages"].as_array().unwrap();
        for m in page {
            seqs.push(m["sequence_number"].as_u64().unwrap());
        }
        first.get_or_insert((
            body["complete"].as_bool().unwrap(),
            body["oldest_sequence"].as_u64(),
        ));
        match body["next_since"].as_u64() {
            Some(n) => {
                assert_eq!(
                    Some(n),
                    seqs.last().copied(),
                    "next_since is the last one sent"
                );
                cut_by_bytes += usize::from((page.len() as u64) < limit);
                since = n;
            }
            None => break,
        }
    }
    let (recovered, oldest_sequence) = first.unwrap();
    let answer = Answer {
        seqs,
        recovered,
        oldest_sequence: if recovered { None } else { oldest_sequence },
    };
    (answer, cut_by_bytes)
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

/// The query of one key's resume, for `GET /websocket/messages` and `GET /events` alike.
fn resume_query(key: (&str, &str), since: u64, epoch: &str) -> String {
    format!(
        "since={since}&channel={}&request_id={}&epoch={epoch}",
        key.0, key.1
    )
}

/// A Server-Sent Events stream resuming after `since`: its `reset` (if any, first), then `want`
/// messages, then nothing more (with `want: None` only the verdict is looked at).
async fn over_sse(
    s: &TestServer,
    key: (&str, &str),
    since: u64,
    epoch: &str,
    want: Option<usize>,
) -> Answer {
    let r = s
        .http
        .get(s.url(&format!("/events?{}", resume_query(key, since, epoch))))
        .header("Authorization", format!("Bearer {}", token("alice", None)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut r = Reader::http(r);
    assert!(r.next().await.unwrap().retry.is_some(), "the opening");
    let (mut recovered, mut oldest_sequence, mut seqs) = (true, None, Vec::new());
    let quiet = Duration::from_millis(150);
    loop {
        let wait = if want.is_some_and(|w| seqs.len() < w) {
            Duration::from_secs(5)
        } else {
            quiet
        };
        let Some(b) = r.next_within(wait).await else {
            break;
        };
        match b.event.as_str() {
            "reset" => {
                assert!(
                    recovered && seqs.is_empty(),
                    "a reset comes first, once: {b:?}"
                );
                let v: Value = serde_json::from_str(b.data.as_deref().unwrap()).unwrap();
                recovered = false;
                oldest_sequence = v["oldest_sequence"].as_u64();
                if want.is_none() {
                    break;
                }
            }
            "message" => seqs.push(b.id_number().unwrap()),
            _ => assert!(b.data.is_none(), "{b:?}"),
        }
        if want.is_none() && seqs.len() + usize::from(!recovered) > 0 {
            break;
        }
    }
    if let Some(w) = want {
        assert!(
            seqs.len() >= w,
            "the stream of {key:?} since {since} stopped after {seqs:?}"
        );
    }
    Answer {
        seqs,
        recovered,
        oldest_sequence,
    }
}

/// Long-polls from `since` (`timeout=0`), following `next_since` until a 204; the verdict is
/// the first answer's. With `all: false` only the first answer is taken.
async fn over_long_poll(
    s: &TestServer,
    key: (&str, &str),
    since: u64,
    limit: u64,
    epoch: &str,
    all: bool,
) -> Answer {
    let tok = token("alice", None);
    let (mut seqs, mut first, mut since) = (Vec::new(), None, since);
    for _ in 0..1_000 {
        let r = s
            .http
            .get(s.url(&format!(
                "/events?live=long-poll&timeout=0&limit={limit}&{}",
                resume_query(key, since, epoch)
            )))
            .header("Authorization", format!("Bearer {tok}"))
            .send()
            .await
            .unwrap();
        let next: u64 = r.headers()["x-seqcast-next-since"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        if r.status() == 204 {
            first.get_or_insert((true, None));
            break;
        }
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["next_since"], next, "the header and the body agree");
        for m in body["messages"].as_array().unwrap() {
            seqs.push(m["sequence_number"].as_u64().unwrap());
        }
        first.get_or_insert((
            body["complete"].as_bool().unwrap(),
            body["oldest_sequence"].as_u64(),
        ));
        if !all {
            break;
        }
        since = next;
    }
    let (recovered, oldest_sequence) = first.unwrap();
    Answer {
        seqs,
        recovered,
        oldest_sequence: if recovered { None } else { oldest_sequence },
    }
}

/// One round: a server, a random log, and random resumes compared both ways.
struct Round {
    seed: u64,
    args: &'static [&'static str],
    /// Messages in the log.
    messages: Range<u64>,
    /// Length of each message's data string.
    data_len: Range<usize>,
    /// Keys are drawn from the first `channels` × `requests` of [`CHANNELS`] × [`REQUESTS`].
    keys: (usize, usize),
    /// `--retention-max-events` is drawn from here: the floor moves past the count window.
    retention: Option<Range<u64>>,
    /// `limit` of the HTTP pages.
    limit: Range<u64>,
    cases: usize,
    /// The byte budget must have cut HTTP pages (`--max-response-bytes`) / WebSocket catch-up
    /// pages (the page's bytes, large messages) somewhere in the round.
    http_byte_cuts: bool,
    ws_byte_cuts: bool,
}

impl Round {
    const BASE: Round = Round {
        seed: 0,
        args: &[],
        messages: 10..80,
        data_len: 0..8,
        keys: (2, 2),
        retention: None,
        limit: 1..10,
        cases: 20,
        http_byte_cuts: false,
        ws_byte_cuts: false,
    };
}

async fn round(r: Round) {
    let seed = r.seed;
    let mut rng = StdRng::seed_from_u64(seed);
    let window = WINDOW.to_string();
    let retention = r.retention.clone().map(|range| rng.random_range(range));
    let retention_arg = retention.map(|n| n.to_string());
    let mut all = vec!["--recovery-max-messages", window.as_str()];
    if let Some(n) = &retention_arg {
        all.extend(["--retention-max-events", n.as_str()]);
    }
    all.extend_from_slice(r.args);
    let s = TestServer::start_with(Options::args(&all)).await;
    // A random log over the round's keys, published in batches of at most 4 MiB.
    let n = rng.random_range(r.messages.clone());
    let keys: Vec<(usize, usize)> = (0..n)
        .map(|_| (rng.random_range(0..r.keys.0), rng.random_range(0..r.keys.1)))
        .collect();
    let sizes: Vec<usize> = (0..n)
        .map(|_| rng.random_range(r.data_len.clone()))
        .collect();
    let mut batch: Vec<Value> = Vec::new();
    let mut batch_bytes = 0;
    for (i, &(c, q)) in keys.iter().enumerate() {
        if batch_bytes + sizes[i] > 4 << 20 {
            s.publish_batch(&std::mem::take(&mut batch)).await;
            batch_bytes = 0;
        }
        batch_bytes += sizes[i];
        batch.push(json!({"channel": CHANNELS[c], "request_id": REQUESTS[q], "data": "x".repeat(sizes[i])}));
    }
    s.publish_batch(&batch).await;
    let head = n;
    // The window: the newest WINDOW numbers, or fewer where retention pruned (no age bound hit).
    let floor = retention.map_or(1, |keep| head.saturating_sub(keep) + 1);
    let window_start = (head.saturating_sub(WINDOW) + 1).max(floor);
    let until = Instant::now() + Duration::from_secs(20);
    let epoch = loop {
        let (h, oldest, epoch) = s.log_bounds().await;
        assert_eq!(h, head);
        if oldest == window_start {
            break epoch;
        }
        assert!(
            Instant::now() < until,
            "seed {seed}: the floor never reached {floor}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (mut http_cuts, mut ws_cuts) = (0, 0);
    for case in 0..r.cases {
        let (c, q) = (rng.random_range(0..r.keys.0), rng.random_range(0..r.keys.1));
        let key = (CHANNELS[c], REQUESTS[q]);
        let since = rng.random_range(0..=head + 3);
        let limit = rng.random_range(r.limit.clone());
        let own_epoch = rng.random_bool(0.85);
        let e = if own_epoch {
            epoch.as_str()
        } else {
            "another-history"
        };
        let (http, cut) = over_http(&s, key, since, limit, e).await;
        http_cuts += cut;
        let recovered = own_epoch && since <= head && since + 1 >= window_start;
        let after = if !own_epoch || since > head {
            head
        } else {
            since.max(window_start - 1)
        };
        let expected: Vec<u64> = (after + 1..=head)
            .filter(|&seq| keys[seq as usize - 1] == (c, q))
            .collect();
        let label = format!(
            "seed {seed} case {case}: key {key:?} since {since} limit {limit} own epoch {own_epoch} head {head} window {window_start}.."
        );
        assert_eq!(http.seqs, expected, "HTTP, {label}");
        assert_eq!(http.recovered, recovered, "HTTP verdict, {label}");
        // Another history's number: the WebSocket starts like a fresh subscriber (its backlog),
        // HTTP sends nothing; only the verdict is compared.
        let want = own_epoch.then_some(http.seqs.len());
        let pages_before = s.metric("seqcast_catchup_log_pages_total").await;
        let ws = over_ws(&s, key, since, e, want).await;
        let sse = over_sse(&s, key, since, e, want).await;
        let polled = over_long_poll(&s, key, since, limit, e, own_epoch).await;
        if own_epoch {
            assert_eq!(ws, http, "WebSocket against HTTP, {label}");
            assert_eq!(sse, http, "Server-Sent Events against HTTP, {label}");
            assert_eq!(polled, http, "long-poll against HTTP, {label}");
            // Replayed from log pages: the page's byte budget cut the replay into pages
            // whenever its messages are more than a page's bytes.
            let pages = s.metric("seqcast_catchup_log_pages_total").await - pages_before;
            let bytes: usize = expected.iter().map(|&q| sizes[q as usize - 1]).sum();
            if bytes > PAGE_BYTES {
                assert!(pages >= 2, "{pages} log pages for {bytes} bytes, {label}");
                ws_cuts += 1;
            }
        } else {
            for (door, answer) in [("WebSocket", &ws), ("SSE", &sse), ("long-poll", &polled)] {
                assert_eq!(
                    (answer.recovered, answer.oldest_sequence),
                    (http.recovered, http.oldest_sequence),
                    "{door} verdict, {label}"
                );
            }
        }
    }
    assert!(
        !r.http_byte_cuts || http_cuts > 0,
        "seed {seed}: no HTTP page was cut by its bytes"
    );
    assert!(
        !r.ws_byte_cuts || ws_cuts > 0,
        "seed {seed}: no WebSocket replay was cut by its bytes"
    );
}

/// Run `rounds` one after another, bounded in time.
async fn run(secs: u64, rounds: impl IntoIterator<Item = Round>) {
    tokio::time::timeout(Duration::from_secs(secs), async {
        for r in rounds {
            round(r).await;
        }
    })
    .await
    .expect("bounded in time");
}

#[tokio::test]
async fn http_recovery_and_websocket_replay_agree_from_memory() {
    run(
        120,
        [1, 2, 5, 6].map(|seed| Round {
            seed,
            ..Round::BASE
        }),
    )
    .await;
}

/// A cache too small for the log and a small send queue: both read the log, the WebSocket page
/// by page under its water marks.
#[tokio::test]
async fn http_recovery_and_websocket_replay_agree_from_log_pages() {
    let args = &["--cache-bytes", "2048", "--send-queue", "4"];
    run(
        120,
        [3, 4, 7, 8].map(|seed| Round {
            seed,
            args,
            ..Round::BASE
        }),
    )
    .await;
}

/// Retention keeps fewer numbers than the count window: the window starts at the retention
/// floor, and resumes from behind it (`since` below the floor) are told `recovered: false`
/// and served from the floor, the same way by both doors — from memory and from log pages.
#[tokio::test]
async fn http_recovery_and_websocket_replay_agree_behind_the_retention_floor() {
    let small_cache: &[&str] = &["--cache-bytes", "2048", "--send-queue", "4"];
    run(
        120,
        [(11, &[][..]), (12, small_cache), (13, &[][..])].map(|(seed, args)| Round {
            seed,
            args,
            messages: 40..80,
            retention: Some(5..WINDOW),
            ..Round::BASE
        }),
    )
    .await;
}

/// The byte budget cuts pages: HTTP answers at a small `--max-response-bytes` (pages end before
/// `limit`), and WebSocket catch-up steps of large messages read from the log (pages end at
/// the page's bytes) — the same messages and verdicts either way.
#[tokio::test]
async fn http_recovery_and_websocket_replay_agree_when_bytes_cut_the_pages() {
    let small_answers = [21, 22].map(|seed| Round {
        seed,
        args: &["--max-response-bytes", "1024", "--cache-bytes", "4096"],
        data_len: 50..600,
        limit: 2..30,
        http_byte_cuts: true,
        ..Round::BASE
    });
    let large_messages = Round {
        seed: 23,
        args: &["--cache-bytes", "4096"],
        messages: 8..14,
        data_len: 150_000..300_000,
        keys: (1, 1),
        limit: 1..4,
        cases: 8,
        ws_byte_cuts: true,
        ..Round::BASE
    };
    run(180, small_answers.into_iter().chain([large_messages])).await;
}
