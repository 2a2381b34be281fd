//! `POST /api/publish/stream`: NDJSON publishes in, one NDJSON answer per line out as each
//! commits, with `curl -N` as the producer (chunked upload from a pipe, both directions
//! streaming at once). The real server binary on SQLite.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;

use seqcast_e2e::{API_KEY, Options, PROMPT, TestServer, token, token_with};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

/// `curl -N` posting its stdin to the stream endpoint, chunked. (curl reads its stdin with a
/// blocking read, so it cannot hand out an answer while it waits for the next line: the curl
/// producer writes its lines, then reads the answers; [`Raw`] shows the interleaving.)
async fn curl(s: &TestServer, authorization: &str, input: String) -> Vec<Value> {
    let mut child = Command::new("curl")
        .args(["-N", "-sS", "-T", "-", "-X", "POST"])
        .args(["-H", &format!("Authorization: {authorization}")])
        .args(["-H", "Content-Type: application/x-ndjson"])
        .arg(s.url("/api/publish/stream"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("curl is installed");
    let mut stdin = child.stdin.take().unwrap();
    let writer = tokio::spawn(async move {
        // The server may end the stream early (an oversized line): then the rest is refused.
        let _ = stdin.write_all(input.as_bytes()).await;
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut answers = Vec::new();
    while let Some(line) = tokio::time::timeout(PROMPT, stdout.next_line())
        .await
        .expect("curl's output in time")
        .unwrap()
    {
        answers.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}")));
    }
    let _ = tokio::time::timeout(PROMPT, child.wait()).await;
    writer.abort();
    answers
}

/// A hand-written HTTP/1.1 client on a real socket: a chunked request body written piece by
/// piece, and the chunked NDJSON answer read as it arrives.
struct Raw {
    socket: TcpStream,
    answers: Answers,
}

/// The chunked NDJSON answer, decoded as its bytes arrive.
#[derive(Default)]
struct Answers {
    /// Bytes read and not yet decoded.
    raw: Vec<u8>,
    /// Decoded answer text not yet split into lines.
    body: Vec<u8>,
    status: Option<u16>,
    ended: bool,
}

impl Answers {
    /// Decode what `raw` holds: the head once, then whole chunks.
    fn decode(&mut self) {
        if self.status.is_none() {
            let Some(end) = find(&self.raw, b"\r\n\r\n") else {
                return;
            };
            let head = String::from_utf8_lossy(&self.raw[..end]).to_string();
            self.status = head.split(' ').nth(1).and_then(|c| c.parse().ok());
            assert!(
                head.to_ascii_lowercase()
                    .contains("transfer-encoding: chunked"),
                "{head}"
            );
            self.raw.drain(..end + 4);
        }
        while let Some(eol) = find(&self.raw, b"\r\n") {
            let size =
                usize::from_str_radix(std::str::from_utf8(&self.raw[..eol]).unwrap().trim(), 16)
                    .unwrap();
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
            if size == 0 {
                self.ended = true;
                return;
            }
        }
    }

    /// The next whole answer line decoded so far.
    fn next_line(&mut self) -> Option<Value> {
        self.decode();
        let nl = self.body.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = self.body.drain(..=nl).collect();
        Some(serde_json::from_slice(&line).unwrap())
    }
}

impl Raw {
    async fn start(s: &TestServer, authorization: &str) -> Self {
        let mut socket = TcpStream::connect(s.addr).await.unwrap();
        let head = format!(
            "POST /api/publish/stream HTTP/1.1\r\nHost: {}\r\nAuthorization: {authorization}\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n",
            s.addr
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        Raw {
            socket,
            answers: Answers::default(),
        }
    }

    async fn send(&mut self, line: &str) {
        let piece = format!("{line}\n");
        let chunk = format!("{:x}\r\n{piece}\r\n", piece.len());
        self.socket.write_all(chunk.as_bytes()).await.unwrap();
    }

    /// The next answer line, within [`PROMPT`]; `None` at the end of the answer.
    async fn answer(&mut self) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + PROMPT;
        loop {
            if let Some(v) = self.answers.next_line() {
                return Some(v);
            }
            if self.answers.ended {
                return None;
            }
            let mut buf = [0u8; 8192];
            let n = tokio::time::timeout_at(deadline, self.socket.read(&mut buf))
                .await
                .expect("an answer line in time")
                .unwrap();
            if n == 0 {
                return None;
            }
            self.answers.raw.extend_from_slice(&buf[..n]);
        }
    }

    async fn finish(mut self) -> Vec<Value> {
        // The server may have ended the answer (and the connection) already.
        let _ = self.socket.write_all(b"0\r\n\r\n").await;
        let mut rest = Vec::new();
        while let Some(v) = self.answer().await {
            rest.push(v);
        }
        rest
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn line(channel: &str, request_id: &str, data: Value) -> String {
    json!({"channel": channel, "request_id": request_id, "data": data}).to_string()
}

async fn count_in_log(s: &TestServer, channel: &str, request_id: &str) -> Vec<Value> {
    let (status, body) = s
        .get(
            &format!(
                "/websocket/messages?since=0&channel={channel}&request_id={request_id}&limit=10000"
            ),
            Some(&token("reader", None)),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["messages"].as_array().unwrap().clone()
}

/// Each line is answered while the request is still being written (the answer to line 1
/// arrives before line 2 is sent); a bad line gets its error line and the stream goes on; a
/// burst of lines is answered in order with dense numbers and committed in few transactions.
#[tokio::test]
async fn ndjson_lines_are_answered_as_each_commits_and_a_bad_line_does_not_end_the_stream() {
    let s = TestServer::start().await;
    let mut raw = Raw::start(&s, &format!("ApiKey {API_KEY}")).await;
    raw.send(&line("nd", "r", json!({"token": "hello"}))).await;
    let first = raw.answer().await.unwrap();
    assert_eq!(first["sequence_number"], 1, "{first}");
    assert_eq!(first["stream_sequence"], 1);
    assert!(first["message_id"].is_string());

    raw.send("{not json").await;
    let bad = raw.answer().await.unwrap();
    assert_eq!(bad["error"]["code"], "bad_request", "{bad}");
    raw.send(&line("no:colon", "r", json!(1))).await;
    let bad_name = raw.answer().await.unwrap();
    assert_eq!(bad_name["error"]["code"], "bad_request", "{bad_name}");
    raw.send("").await; // blank lines are skipped (a keep-alive)
    raw.send(
        &json!({"channel": "nd", "request_id": "r", "data": "retry me", "message_id": "m-1"})
            .to_string(),
    )
    .await;
    let second = raw.answer().await.unwrap();
    assert_eq!(second["sequence_number"], 2, "{second}");

    let transactions_before = s.metric("seqcast_db_transactions_total").await;
    let mut burst = String::new();
    for i in 0..500 {
        burst.push_str(&line("nd", "r", json!({"i": i})));
        burst.push('\n');
    }
    // The same message_id and data again: a retry, answered with the original numbers.
    burst.push_str(
        &json!({"channel": "nd", "request_id": "r", "data": "retry me", "message_id": "m-1"})
            .to_string(),
    );
    raw.send(&burst).await;
    let mut answers = Vec::new();
    for _ in 0..501 {
        answers.push(raw.answer().await.unwrap());
    }
    for (i, a) in answers[..500].iter().enumerate() {
        assert_eq!(a["sequence_number"], 3 + i as u64, "{a}");
        assert_eq!(a["stream_sequence"], 3 + i as u64);
    }
    assert_eq!(
        answers[500], second,
        "a retry gets the first write's numbers"
    );
    let transactions = s.metric("seqcast_db_transactions_total").await - transactions_before;
    println!("500 NDJSON lines in {transactions} transactions");
    assert!(transactions < 100, "{transactions} transactions");
    assert!(raw.finish().await.is_empty());

    let log = count_in_log(&s, "nd", "r").await;
    assert_eq!(log.len(), 502);
    assert_eq!(log[2]["data"]["i"], 0);
}

/// A line over `--max-message-bytes` ends the stream with a `too_large` error line; the lines
/// before it are committed, nothing after it is.
#[tokio::test]
async fn an_oversized_line_ends_the_stream_with_an_error_line() {
    let s = TestServer::start_with(Options::args(&["--max-message-bytes", "4096"])).await;
    let mut raw = Raw::start(&s, &format!("ApiKey {API_KEY}")).await;
    raw.send(&line("big", "r", json!("small"))).await;
    assert_eq!(raw.answer().await.unwrap()["sequence_number"], 1);
    raw.send(&line("big", "r", json!("x".repeat(10_000)))).await;
    raw.send(&line("big", "r", json!("after"))).await;
    let end = raw.answer().await.unwrap();
    assert_eq!(end["error"]["code"], "too_large", "{end}");
    assert!(
        end["error"]["message"].as_str().unwrap().contains("4096"),
        "{end}"
    );
    assert!(
        raw.finish().await.is_empty(),
        "nothing after the error line"
    );
    assert_eq!(count_in_log(&s, "big", "r").await.len(), 1);
}

/// The stream endpoint takes the credentials of `POST /api/publish`: none is 401, a token
/// without `publish: true` is 403, one with it may publish only to its keys (a line for
/// another key gets a `forbidden` line) and its lines count against `--publish-rate`.
#[tokio::test]
async fn the_stream_endpoint_has_the_auth_and_rate_of_publish() {
    let s = TestServer::start_with(Options::args(&[
        "--publish-rate",
        "1",
        "--publish-burst",
        "3",
    ]))
    .await;
    let body = format!("{}\n", line("auth", "r", json!(1)));
    let r = s
        .http
        .post(s.url("/api/publish/stream"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = s
        .http
        .post(s.url("/api/publish/stream"))
        .bearer_auth(token("reader", None))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "forbidden"
    );

    let t = token_with("writer", Some(&["auth:*"]), 3600, true);
    let mut raw = Raw::start(&s, &format!("Bearer {t}")).await;
    raw.send(&line("elsewhere", "r", json!(0))).await;
    let forbidden = raw.answer().await.unwrap();
    assert_eq!(forbidden["error"]["code"], "forbidden", "{forbidden}");
    let mut codes = Vec::new();
    for i in 0..6 {
        raw.send(&line("auth", "r", json!(i))).await;
        let a = raw.answer().await.unwrap();
        codes.push(a["error"]["code"].as_str().unwrap_or("ok").to_owned());
    }
    let ok = codes.iter().filter(|c| *c == "ok").count();
    assert!(
        (2..=4).contains(&ok),
        "burst of 3 (one spent on the forbidden line): {codes:?}"
    );
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");
    raw.finish().await;
}

/// `curl -N` as the producer (chunked upload of its stdin): a bad line gets its error line and
/// the stream goes on; a line over `--max-message-bytes` ends it with a `too_large` line.
#[tokio::test]
async fn curl_streams_ndjson_with_a_bad_line_and_an_oversized_line() {
    let s = TestServer::start_with(Options::args(&["--max-message-bytes", "4096"])).await;
    let mut input = String::new();
    input.push_str(&line("curl", "r", json!("first")));
    input.push_str("\n[1,2,3]\n"); // JSON, but not a publish object
    for i in 0..300 {
        input.push_str(&line("curl", "r", json!({"i": i})));
        input.push('\n');
    }
    input.push_str(&line("curl", "r", json!("x".repeat(8_000))));
    input.push('\n');
    input.push_str(&line("curl", "r", json!("never")));
    input.push('\n');
    let answers = curl(&s, &format!("ApiKey {API_KEY}"), input).await;
    assert_eq!(answers.len(), 1 + 1 + 300 + 1, "{:?}", answers.last());
    assert_eq!(answers[0]["sequence_number"], 1);
    assert_eq!(answers[1]["error"]["code"], "bad_request", "{}", answers[1]);
    for (i, a) in answers[2..302].iter().enumerate() {
        assert_eq!(a["sequence_number"], 2 + i as u64, "{a}");
    }
    assert_eq!(
        answers[302]["error"]["code"], "too_large",
        "{}",
        answers[302]
    );
    let log = count_in_log(&s, "curl", "r").await;
    assert_eq!(log.len(), 301);
    assert!(log.iter().all(|m| m["data"] != "never"));
}

/// The database writer stalls (another process holds SQLite's write lock) while a producer keeps
/// streaming 32 KB lines: the server holds at most its in-flight bound and stops reading the
/// body, so the producer's writes stall and the server's memory stays flat; once the lock
/// goes, every line is committed and answered in order.
#[tokio::test]
async fn a_stalled_writer_stops_the_reading_of_the_body() {
    const N: usize = 1_000;
    let s = TestServer::start_with(Options::args(&["--db-busy-timeout-ms", "60000"])).await;
    let mut raw = Raw::start(&s, &format!("ApiKey {API_KEY}")).await;
    raw.send(&line("stall", "warm", json!("x".repeat(32 << 10))))
        .await;
    assert_eq!(raw.answer().await.unwrap()["sequence_number"], 1);
    let rss_before = s.rss_bytes();

    let db = rusqlite::Connection::open(s.data_dir.join("seqcast.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (mut reader, mut writer) = raw.socket.into_split();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let producer = {
        let sent = std::sync::Arc::clone(&sent);
        tokio::spawn(async move {
            let pad = "y".repeat(32 << 10);
            for i in 0..N {
                let piece = format!("{}\n", line("stall", "r", json!({"i": i, "pad": pad})));
                let chunk = format!("{:x}\r\n{piece}\r\n", piece.len());
                writer.write_all(chunk.as_bytes()).await.unwrap();
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            writer.write_all(b"0\r\n\r\n").await.unwrap();
            writer
        })
    };
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let stalled_at = sent.load(std::sync::atomic::Ordering::Relaxed);
    let grown = s.rss_bytes().saturating_sub(rss_before);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        sent.load(std::sync::atomic::Ordering::Relaxed),
        stalled_at,
        "the producer's writes are stalled (the server stopped reading the body)"
    );
    println!(
        "writer stalled: producer got {stalled_at} of {N} lines out; server RSS grew {} MiB",
        grown >> 20
    );
    assert!(stalled_at < N / 2, "{stalled_at} lines sent");
    assert!(grown < 24 << 20, "server memory grew {} MiB", grown >> 20);

    db.execute_batch("COMMIT").unwrap();
    drop(db);
    let mut rest = raw.answers;
    let mut answers = 0;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while answers < N {
        while let Some(v) = rest.next_line() {
            assert_eq!(v["sequence_number"], 2 + answers as u64, "{v}");
            answers += 1;
        }
        if answers == N {
            break;
        }
        let mut buf = [0u8; 65536];
        let n = tokio::time::timeout_at(deadline, reader.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "answer ended after {answers}");
        rest.raw.extend_from_slice(&buf[..n]);
    }
    let _writer = producer.await.unwrap();
}
