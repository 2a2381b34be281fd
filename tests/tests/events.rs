//! The HTTP live tail, `GET /events`: Server-Sent Events read by `curl -N` and by a WHATWG
//! `EventSource` (Node's `eventsource` package) across the server's own cuts, `event: reset`
//! where a resume no longer reaches, stream tickets, long-poll, and a reader that stops reading
//! while the log runs far past the cache. The real server binary, SQLite, real clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use seqcast_e2e::sse::{Block, Reader};
use seqcast_e2e::{Options, PROMPT, TestServer, error_message, seqs, token};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;
use tokio_tungstenite::tungstenite::Message;

async fn bounded<F: std::future::Future<Output = ()>>(secs: u64, body: F) {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {secs} s"));
}

/// `GET /events?{query}` with a bearer token (and `Last-Event-ID`), as a stream.
async fn open(s: &TestServer, query: &str, tok: Option<&str>, last: Option<u64>) -> Reader {
    let r = get_events(s, query, tok, last).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    Reader::http(r)
}

async fn get_events(
    s: &TestServer,
    query: &str,
    tok: Option<&str>,
    last: Option<u64>,
) -> reqwest::Response {
    let mut req = s
        .http
        .get(s.url(&format!("/events?{query}")))
        .header("Accept", "text/event-stream");
    if let Some(t) = tok {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    if let Some(id) = last {
        req = req.header("Last-Event-ID", id.to_string());
    }
    req.send().await.unwrap()
}

/// The next `n` events, each a `message`: their ids, checked against their frames' numbers.
async fn messages(r: &mut Reader, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let b = r.next_event(PROMPT).await;
        assert_eq!(b.event, "message", "{b:?}");
        let id = b.id_number().unwrap();
        assert_eq!(b.message().unwrap()["sequence_number"], id, "{b:?}");
        ids.push(id);
    }
    ids
}

fn reset_of(b: &Block) -> Value {
    assert_eq!(b.event, "reset", "{b:?}");
    assert_eq!(b.id, None, "a reset is not a message: {b:?}");
    serde_json::from_str(b.data.as_deref().unwrap()).unwrap()
}

/// `curl -N` reads the stream: events in order, `id:` = `sequence_number`, `data:` byte for
/// byte the frame a live WebSocket subscriber gets, the headers proxies need, heartbeats while
/// idle, the gauge of open streams.
#[tokio::test]
async fn curl_reads_the_stream_in_order_with_the_live_frames_and_heartbeats() {
    bounded(60, async {
        let s = TestServer::start_with(Options::args(&["--sse-heartbeat-ms", "300"])).await;
        let tok = token("reader", None);
        // A live WebSocket subscriber, for the frames' exact text.
        let mut ws = s.client(&tok).await;
        ws.subscribe("c", "r").await;
        for i in 0..3 {
            s.publish("c", "r", json!({"i": i, "text": "line\nbreak"}))
                .await;
            s.publish("other", "r", json!(i)).await;
        }
        let mut frames = std::collections::BTreeMap::new();
        while frames.len() < 3 {
            if let Some(Ok(Message::Text(t))) = ws.ws.next().await {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "message" {
                    frames.insert(v["sequence_number"].as_u64().unwrap(), t.to_string());
                }
            }
        }
        let mut curl = tokio::process::Command::new("curl");
        curl.args(["-sS", "-N", "-D", "/dev/stderr"])
            .arg("-H")
            .arg(format!("Authorization: Bearer {tok}"))
            .arg(s.url("/events?since=0&key=c:r"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = curl.spawn().expect("curl");
        let stderr = child.stderr.take().unwrap();
        let mut r = Reader::curl(child);
        let opening = r.next_within(PROMPT).await.unwrap();
        assert_eq!(opening.retry.as_deref(), Some("1000"), "{opening:?}");
        let mut got = Vec::new();
        for _ in 0..3 {
            let b = r.next_event(PROMPT).await;
            assert_eq!(b.event, "message");
            let id = b.id_number().unwrap();
            assert_eq!(
                b.data.as_deref(),
                Some(frames[&id].as_str()),
                "the live frame"
            );
            got.push(id);
        }
        assert_eq!(got, frames.keys().copied().collect::<Vec<_>>());
        // The headers curl saw.
        let mut headers = String::new();
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.trim().is_empty() {
                break;
            }
            headers.push_str(&line.to_ascii_lowercase());
            headers.push('\n');
        }
        for h in [
            "content-type: text/event-stream",
            "cache-control: no-cache",
            "x-accel-buffering: no",
        ] {
            assert!(headers.contains(h), "{h} in {headers}");
        }
        assert_eq!(s.metric("seqcast_sse_streams").await, 1);
        // Idle: a heartbeat comment, then a live message goes out at once.
        let beat = r.next_within(PROMPT).await.unwrap();
        assert_eq!(beat.comments, ["heartbeat"], "{beat:?}");
        let live = s.publish("c", "r", json!("live")).await;
        let b = r.next_event(PROMPT).await;
        assert_eq!(b.id_number(), live["sequence_number"].as_u64());
        r.close().await;
        let closed = s.wait_for_log(|v| v["event"] == "sse_closed").await;
        assert_eq!(closed["reason"], "client_gone", "{closed}");
        assert_eq!(s.metric("seqcast_sse_streams").await, 0);
    })
    .await;
}

/// The `tests/browser` directory, with its npm packages — or `None` after saying loudly why
/// not (under `CI=true` a failure: CI must run it).
fn node_packages() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser");
    let node = std::process::Command::new("node").arg("--version").output();
    let why = if node.is_err() {
        "node is not installed".to_owned()
    } else if !dir.join("node_modules/eventsource").exists() {
        format!(
            "{}/node_modules lacks `eventsource`: run `npm ci` there",
            dir.display()
        )
    } else {
        return Some(dir);
    };
    eprintln!("SKIPPED: the EventSource test needs Node.js and npm packages: {why}");
    assert!(std::env::var("CI").is_err(), "{why}; CI must run it");
    None
}

/// A WHATWG `EventSource` reads across the server's `--sse-max-secs` cuts: it reconnects by
/// itself with `Last-Event-ID`, and every message arrives exactly once, in order.
#[tokio::test]
async fn an_event_source_resumes_across_the_servers_cuts_and_loses_nothing() {
    let Some(dir) = node_packages() else { return };
    bounded(90, async {
        let s = TestServer::start_with(Options::args(&["--sse-max-secs", "1"])).await;
        let tok = token("reader", None);
        let mut node = tokio::process::Command::new("node")
            .arg(dir.join("sse_reader.mjs"))
            .arg(s.url("/events?channel=c&request_id=r"))
            .arg(&tok)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(node.stdout.take().unwrap()).lines();
        let first: Value =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(first["open"], true, "{first}");
        // Publish for three cuts and more, while the reader reads.
        const N: u64 = 40;
        let publisher = async {
            let started = Instant::now();
            let mut seqs = Vec::new();
            for i in 0..N {
                let a = s.publish("c", "r", json!(i)).await;
                seqs.push(a["sequence_number"].as_u64().unwrap());
                s.publish("c", "other", json!(i)).await;
                let due = started + Duration::from_millis(100 * (i + 1));
                tokio::time::sleep_until(due.into()).await;
            }
            seqs
        };
        let reader = async {
            let (mut ids, mut opens) = (Vec::new(), 1);
            while ids.len() < N as usize {
                let line = lines.next_line().await.unwrap().expect("node ended");
                let v: Value = serde_json::from_str(&line).unwrap();
                if v["open"] == true {
                    opens += 1;
                }
                assert_ne!(v["event"], "reset", "{v}");
                if v["event"] == "message" {
                    let frame: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
                    assert_eq!(
                        frame["sequence_number"].to_string(),
                        v["id"].as_str().unwrap()
                    );
                    ids.push(frame["sequence_number"].as_u64().unwrap());
                }
            }
            (ids, opens)
        };
        let (published, (ids, opens)) = tokio::join!(publisher, reader);
        assert_eq!(ids, published, "every message once, in order");
        assert!(opens >= 3, "the stream was cut and resumed ({opens} opens)");
        let resumed = s
            .logs()
            .into_iter()
            .filter(|v| v["event"] == "sse_opened")
            .count();
        assert!(resumed >= 3, "{resumed} streams opened");
        let _ = node.kill().await;
    })
    .await;
}

/// Where a resume no longer reaches — `since` behind the window, or another epoch — the stream
/// says `event: reset` first (`recovered: false`, `oldest_sequence`, the epoch), then carries
/// what the window holds; a resume the window reaches has no reset.
#[tokio::test]
async fn a_resume_the_window_no_longer_reaches_is_told_with_a_reset_first() {
    bounded(60, async {
        let s = TestServer::start_with(Options::args(&["--recovery-max-messages", "5"])).await;
        let tok = token("reader", None);
        for i in 0..10 {
            s.publish("c", "r", json!(i)).await;
        }
        let (_, oldest, epoch) = s.log_bounds().await;
        assert_eq!(oldest, 6);
        for query in [
            "since=1&channel=c".to_owned(),
            "since=9&epoch=another-history&channel=c".to_owned(),
        ] {
            let mut r = open(&s, &query, Some(&tok), None).await;
            assert!(r.next().await.unwrap().retry.is_some());
            let reset = reset_of(&r.next_event(PROMPT).await);
            assert_eq!(
                reset,
                json!({"recovered": false, "oldest_sequence": 6, "epoch": epoch}),
                "{query}"
            );
            assert_eq!(messages(&mut r, 5).await, [6, 7, 8, 9, 10], "{query}");
        }
        // Last-Event-ID overrides `since`: within the window, no reset.
        let mut r = open(&s, "since=1&channel=c", Some(&tok), Some(8)).await;
        let b = r.next_event(PROMPT).await;
        assert_eq!(b.event, "message", "{b:?}");
        assert_eq!(b.id_number(), Some(9));
        assert_eq!(messages(&mut r, 1).await, [10]);
    })
    .await;
}

/// A stream ends when its token's `exp` passes (the reconnect then needs a fresh token).
#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    bounded(60, async {
        let s = TestServer::start().await;
        let tok = seqcast_e2e::token_with("brief", None, 2, false);
        let opened = Instant::now();
        let mut r = open(&s, "channel=c", Some(&tok), None).await;
        while r.next_within(PROMPT).await.is_some() {}
        assert!(opened.elapsed() < PROMPT, "ended by the server");
        let closed = s.wait_for_log(|v| v["event"] == "sse_closed").await;
        assert_eq!(closed["reason"], "token_expired", "{closed}");
    })
    .await;
}

async fn ticket_for(s: &TestServer, tok: Option<&str>) -> (u16, Value) {
    let mut req = s.http.post(s.url("/api/stream-ticket"));
    if let Some(t) = tok {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Tickets: single use, short-lived, carrying the token's grant; no ticket without a token.
#[tokio::test]
async fn a_stream_ticket_opens_one_stream_of_what_its_token_may_read() {
    bounded(60, async {
        let s = TestServer::start_with(Options::args(&["--stream-ticket-ttl-secs", "1"])).await;
        let (status, body) = ticket_for(&s, None).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (401, &json!("unauthorized"))
        );

        let (status, body) = ticket_for(&s, Some(&token("alice", None))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["expires_in"], 1);
        let ticket = body["ticket"].as_str().unwrap().to_owned();
        assert!(ticket.len() >= 32, "128 bits or more: {ticket}");
        let query = format!("ticket={ticket}&channel=c");
        let mut r = open(&s, &query, None, None).await;
        let live = s.publish("c", "r", json!(1)).await;
        assert_eq!(
            r.next_event(PROMPT).await.id_number(),
            live["sequence_number"].as_u64()
        );
        let again = get_events(&s, &query, None, None).await;
        assert_eq!(again.status(), 401, "a ticket is used once");

        // A ticket of a token limited to `search:*` may not open another channel's key.
        let limited = token("bob", Some(&["search:*"]));
        let (_, body) = ticket_for(&s, Some(&limited)).await;
        let t = body["ticket"].as_str().unwrap();
        let r = get_events(
            &s,
            &format!("ticket={t}&channel=orders&request_id=1"),
            None,
            None,
        )
        .await;
        assert_eq!(r.status(), 403);
        let (_, body) = ticket_for(&s, Some(&limited)).await;
        let t = body["ticket"].as_str().unwrap();
        open(
            &s,
            &format!("ticket={t}&channel=search&request_id=1"),
            None,
            None,
        )
        .await;

        // Expired: past its second of validity.
        let (_, body) = ticket_for(&s, Some(&token("carol", None))).await;
        let issued = Instant::now();
        let t = body["ticket"].as_str().unwrap();
        tokio::time::sleep(Duration::from_millis(1100).saturating_sub(issued.elapsed())).await;
        let r = get_events(&s, &format!("ticket={t}"), None, None).await;
        assert_eq!(r.status(), 401);
        let body: Value = r.json().await.unwrap();
        assert!(error_message(&body).contains("expired"), "{body}");
        // No credentials at all.
        assert_eq!(get_events(&s, "since=0", None, None).await.status(), 401);
    })
    .await;
}

/// Nobody in without a verifier: a guessed ticket, or a ticket asked for with an expired or
/// forged token, opens nothing.
#[tokio::test]
async fn a_guessed_ticket_or_one_asked_with_a_bad_token_opens_nothing() {
    bounded(60, async {
        let s = TestServer::start().await;
        let guessed = "0123456789abcdef0123456789abcdef";
        let r = get_events(&s, &format!("ticket={guessed}&channel=c"), None, None).await;
        assert_eq!(r.status(), 401, "a ticket never issued");

        let expired = seqcast_e2e::token_with("eve", None, -60, false);
        let (status, body) = ticket_for(&s, Some(&expired)).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (401, &json!("unauthorized"))
        );

        let good = token("eve", None);
        let forged = format!("{}x", &good[..good.len() - 1]);
        let (status, body) = ticket_for(&s, Some(&forged)).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (401, &json!("unauthorized"))
        );

        // A real ticket is not also a token: it opens no WebSocket and publishes nothing.
        let (_, body) = ticket_for(&s, Some(&good)).await;
        let t = body["ticket"].as_str().unwrap();
        let r = s
            .http
            .post(s.url("/api/publish"))
            .header("Authorization", format!("Bearer {t}"))
            .header("Content-Type", "application/json")
            .body(json!({"channel": "c", "request_id": "r", "data": 1}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "a ticket as a bearer token");
    })
    .await;
}

/// `GET /events?live=long-poll` with a bearer token: (status, `X-Seqcast-Next-Since`, body).
async fn poll(s: &TestServer, query: &str) -> (u16, Option<u64>, Value) {
    let r = get_events(
        s,
        &format!("live=long-poll&{query}"),
        Some(&token("p", None)),
        None,
    )
    .await;
    let status = r.status().as_u16();
    let next = r
        .headers()
        .get("x-seqcast-next-since")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let text = r.text().await.unwrap();
    (
        status,
        next,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

/// Long-poll: what is there at once; else held until a publish (200) or the timeout (204); the
/// position to go on from always; a timeout over 30 s is refused.
#[tokio::test]
async fn a_long_poll_answers_at_once_or_when_a_message_arrives_or_at_its_timeout() {
    bounded(60, async {
        let s = TestServer::start().await;
        for i in 0..3 {
            s.publish("c", "r", json!(i)).await;
        }
        let (status, next, body) = poll(&s, "since=1&channel=c&timeout=5").await;
        assert_eq!((status, next), (200, Some(3)));
        assert_eq!(seqs(&body), [2, 3]);
        assert_eq!(
            (body["complete"].clone(), body["next_since"].clone()),
            (json!(true), json!(3))
        );

        // Held: answered when a publish arrives during the wait.
        let held = tokio::spawn({
            let url = s.url("");
            async move {
                let s2 = reqwest::Client::new();
                let r = s2
                    .get(format!(
                        "{url}/events?live=long-poll&since=3&channel=c&timeout=20"
                    ))
                    .header("Authorization", format!("Bearer {}", token("p", None)))
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        });
        s.wait_for_log(|v| v["event"] == "long_poll_held" && v["position"] == 3)
            .await;
        s.publish("other", "r", json!("not mine")).await;
        let mine = s.publish("c", "r", json!("mine")).await;
        let (status, body) = held.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(seqs(&body), [mine["sequence_number"].as_u64().unwrap()]);
        assert_eq!(body["next_since"], mine["sequence_number"]);

        // Nothing within the timeout: 204 with where to go on from.
        let started = Instant::now();
        let (status, next, _) = poll(&s, "since=5&channel=c&timeout=1").await;
        assert_eq!((status, next), (204, Some(5)));
        assert!(started.elapsed() >= Duration::from_millis(900));

        let (status, _, body) = poll(&s, "since=0&timeout=31").await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("bad_request"))
        );
    })
    .await;
}

/// A reader that stops reading while far more than the cache is published is not dropped and
/// not buffered for: once it reads again it gets every message in order — read from the log,
/// page by page — with no gap and no reset.
#[tokio::test]
async fn a_reader_that_stops_reading_catches_up_from_the_log_without_a_gap() {
    stop_reading_then_catch_up("/events?channel=c").await;
}

/// The same for a stream that names its keys: it is the delivery engine's cursor, whose queue
/// fills while the reader does not read; its keys catch up together from the log, in order.
#[tokio::test]
async fn a_keyed_reader_that_stops_reading_catches_up_from_the_log_without_a_gap() {
    stop_reading_then_catch_up("/events?key=c:r0&key=c:r1&key=c:r2").await;
}

async fn stop_reading_then_catch_up(path: &str) {
    bounded(120, async {
        let s = TestServer::start_with(Options::args(&["--cache-bytes", "65536"])).await;
        let auth = format!("Bearer {}", token("slow", None));
        // A 4 KiB receive buffer, and nobody reads it while the log grows.
        let mut r = Reader::raw(s.addr, path, &[("Authorization", auth.as_str())], 4096).await;
        assert!(r.next().await.unwrap().retry.is_some());
        let payload = "x".repeat(8000);
        let mut published = Vec::new();
        for b in 0..20 {
            let batch: Vec<Value> = (0..50)
                .map(|i| json!({"channel": "c", "request_id": format!("r{}", (b + i) % 3), "data": payload}))
                .collect();
            for a in s.publish_batch(&batch).await {
                published.push(a["sequence_number"].as_u64().unwrap());
            }
        }
        // 8 MB: over a hundred times the cache, several pages of the log.
        let mut got = Vec::new();
        while got.len() < published.len() {
            let b = r.next_event(PROMPT).await;
            assert_eq!(b.event, "message", "no reset: {b:?}");
            got.push(b.id_number().unwrap());
        }
        assert_eq!(got.len(), published.len());
        assert_eq!(got, published, "every message once, in order");
        r.close().await;
    })
    .await;
}

/// Streams that name their keys are woken by the hub only for their own keys: two hundred
/// streams each on a quiet key and one on a busy key; three hundred messages to the busy key
/// wake (`seqcast_sse_wakeups`) only the busy stream, which gets them all in order, and each
/// quiet stream then gets exactly its own key's message.
#[tokio::test]
async fn keyed_streams_wake_only_for_their_own_keys() {
    bounded(120, async {
        let s = TestServer::start().await;
        let tok = token("many", None);
        let mut quiet = Vec::new();
        for i in 0..200 {
            let mut r = open(&s, &format!("key=c:quiet{i}"), Some(&tok), None).await;
            assert!(r.next().await.unwrap().retry.is_some());
            quiet.push(r);
        }
        let mut busy = open(&s, "key=c:busy", Some(&tok), None).await;
        assert!(busy.next().await.unwrap().retry.is_some());
        let before = s.metric("seqcast_sse_wakeups_total").await;
        let mut published = Vec::new();
        for n in 0..300 {
            let ack = s.publish("c", "busy", json!(n)).await;
            published.push(ack["sequence_number"].as_u64().unwrap());
        }
        assert_eq!(messages(&mut busy, 300).await, published, "in order");
        let woke = s.metric("seqcast_sse_wakeups_total").await - before;
        // The busy stream wakes at most once per message; the quiet ones not at all (read
        // through the head, two hundred streams would wake on every one of 300 commits).
        assert!(
            woke <= 300 + 10,
            "{woke} wake-ups for 300 messages to one stream's key"
        );
        for (i, r) in quiet.iter_mut().enumerate() {
            let ack = s.publish("c", &format!("quiet{i}"), json!(i)).await;
            let seq = ack["sequence_number"].as_u64().unwrap();
            let b = r.next_event(PROMPT).await;
            assert_eq!(b.event, "message", "{b:?}");
            assert_eq!(
                b.id_number(),
                Some(seq),
                "only its own key's message: {b:?}"
            );
            assert_eq!(b.message().unwrap()["request_id"], format!("quiet{i}"));
        }
        let last = s.publish("c", "busy", json!("last")).await;
        assert_eq!(
            messages(&mut busy, 1).await,
            vec![last["sequence_number"].as_u64().unwrap()],
            "nothing of the other keys came in between"
        );
        for r in quiet {
            r.close().await;
        }
        busy.close().await;
    })
    .await;
}

/// A keyed stream whose reader stopped reading until retention pruned past its position is told:
/// what was queued, then `event: reset` with the retention floor as `oldest_sequence`, and the
/// stream ends at the floor (`id:` one below it), so that the reconnect goes on from there with
/// no second reset.
#[tokio::test]
async fn a_keyed_stream_behind_the_retention_floor_is_told_and_ends_at_the_floor() {
    bounded(120, async {
        let s = TestServer::start_with(Options::args(&[
            "--cache-bytes",
            "65536",
            "--retention-max-events",
            "100",
        ]))
        .await;
        let auth = format!("Bearer {}", token("slow", None));
        let mut r = Reader::raw(
            s.addr,
            "/events?since=0&key=c:r",
            &[("Authorization", auth.as_str())],
            4096,
        )
        .await;
        assert!(r.next().await.unwrap().retry.is_some());
        let payload = "x".repeat(8000);
        for _ in 0..40 {
            let batch: Vec<Value> = (0..50)
                .map(|_| json!({"channel": "c", "request_id": "r", "data": payload}))
                .collect();
            s.publish_batch(&batch).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.metric("seqcast_retention_floor").await < 1_900 {
            assert!(Instant::now() < deadline, "retention did not run");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut ids = Vec::new();
        let reset = loop {
            let b = r.next_event(PROMPT).await;
            if b.event == "reset" {
                break reset_of(&b);
            }
            ids.push(b.id_number().unwrap());
        };
        assert_eq!(
            ids,
            (1..=ids.len() as u64).collect::<Vec<_>>(),
            "in order up to the gap"
        );
        let floor = reset["oldest_sequence"].as_u64().unwrap();
        assert!(floor > ids.len() as u64 + 1, "{reset}");
        assert_eq!(reset["recovered"], false);
        let end = r.next().await.expect("the stream tells where it ends");
        assert_eq!(end.id_number(), Some(floor - 1), "{end:?}");
        assert!(r.next().await.is_none(), "the stream ends");
        let mut again = open(&s, "key=c:r", Some(&token("slow", None)), Some(floor - 1)).await;
        assert!(again.next().await.unwrap().retry.is_some());
        let first = again.next_event(PROMPT).await;
        assert_eq!(first.event, "message", "no second reset: {first:?}");
        assert_eq!(first.id_number(), Some(floor));
        again.close().await;
    })
    .await;
}

/// A keyed stream's heartbeat carries its position once messages of other keys went past its
/// last event (its keys are live, so everything of them up to the head was written): a resume
/// from it is judged from a recent number.
#[tokio::test]
async fn a_keyed_streams_heartbeat_carries_its_position_past_other_keys() {
    bounded(60, async {
        let s = TestServer::start_with(Options::args(&["--sse-heartbeat-ms", "300"])).await;
        let tok = token("beat", None);
        let mut r = open(&s, "since=0&key=c:r", Some(&tok), None).await;
        let mine = s.publish("c", "r", json!(1)).await;
        assert_eq!(
            messages(&mut r, 1).await,
            vec![mine["sequence_number"].as_u64().unwrap()]
        );
        let other = s.publish("c", "other", json!(2)).await;
        let other = other["sequence_number"].as_u64().unwrap();
        let beat = loop {
            let b = r.next_within(PROMPT).await.expect("a heartbeat");
            assert!(b.data.is_none(), "nothing of other keys: {b:?}");
            if b.id.is_some() {
                break b;
            }
        };
        assert_eq!(beat.comments, ["heartbeat"], "{beat:?}");
        assert_eq!(beat.id_number(), Some(other), "{beat:?}");
        r.close().await;
    })
    .await;
}

/// A keyed stream whose queue overflows while it reads (a send queue of 4 messages, batches of
/// 50 over three keys): its keys leave live delivery and catch up together, and it still gets
/// every message once, in global order.
#[tokio::test]
async fn a_keyed_stream_that_overflows_while_reading_keeps_global_order() {
    bounded(120, async {
        let s = TestServer::start_with(Options::args(&["--send-queue", "4"])).await;
        let tok = token("lagging", None);
        let mut r = open(&s, "since=0&key=c:r0&key=c:r1&key=c:r2", Some(&tok), None).await;
        let mut published = Vec::new();
        let reading = async {
            let mut got = Vec::new();
            while got.len() < 40 * 50 {
                got.push(messages(&mut r, 1).await[0]);
            }
            got
        };
        let publishing = async {
            for b in 0..40 {
                let batch: Vec<Value> = (0..50)
                    .map(|i| json!({"channel": "c", "request_id": format!("r{}", (b + i) % 3), "data": i}))
                    .collect();
                for a in s.publish_batch(&batch).await {
                    published.push(a["sequence_number"].as_u64().unwrap());
                }
            }
        };
        let (got, ()) = tokio::join!(reading, publishing);
        assert_eq!(got, published, "every message once, in order");
        assert!(
            s.metric("seqcast_subscribers_lagged_total").await > 0,
            "the queue overflowed"
        );
        r.close().await;
    })
    .await;
}
