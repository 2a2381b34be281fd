//! Token streams: S sessions, each a key of its own with a subscriber of its own, each publishing
//! R small messages a second (an agent emitting tokens) through a few streaming publisher
//! connections — WebSocket `publish` frames or a chunked `POST /api/publish/stream` — on a fixed
//! schedule. Reported: durable (answered) messages per second and per server CPU-second,
//! publish → deliver and publish → answer latency, and every subscriber's order.
//!
//! The sessions are spread over the publisher connections (session `s` on connection
//! `s % connections`); each connection sends its sessions' messages evenly spaced, the
//! connections out of phase. A message sent late because its connection could not write (the
//! server stopped reading it) carries its scheduled time, so back-pressure counts in full.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use super::fanout::{Shared, drain_and_stop, latencies};
use super::{run_id, sleep_until};
use crate::Target;
use crate::check::StreamCheck;
use crate::probe::{probe_data, probe_data_padded};
use crate::stats::{CpuMeter, Summary, latency_histogram, record_nanos};
use crate::ws;

/// How the sessions publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `publish` frames on a WebSocket, answered by `publish_ack`.
    Ws,
    /// One chunked `POST /api/publish/stream` per connection, NDJSON answers streamed back.
    Ndjson,
}

impl std::str::FromStr for Transport {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "ws" => Ok(Transport::Ws),
            "ndjson" => Ok(Transport::Ndjson),
            other => bail!("unknown transport {other:?}: ws or ndjson"),
        }
    }
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Ndjson => "ndjson",
        }
    }
}

/// Token-stream parameters.
#[derive(Debug, Clone)]
pub struct TokensArgs {
    /// Sessions: keys, each with one subscriber connection.
    pub sessions: usize,
    /// Messages per second per session.
    pub rate: f64,
    /// About how many bytes each message's `data` has.
    pub bytes: usize,
    /// Publisher connections the sessions are spread over.
    pub connections: usize,
    /// WebSocket `publish` or NDJSON stream.
    pub transport: Transport,
    /// Measured time.
    pub duration: Duration,
    /// Time before measuring starts.
    pub warmup: Duration,
    /// Subscriber connections opened at a time.
    pub connect_concurrency: usize,
}

/// The `data` of message `index` sent at `nanos`: the probe padded to about `bytes`.
fn token_data(index: u64, nanos: u64, bytes: usize) -> String {
    // `,"p":""` around the padding is 8 bytes.
    let bare = probe_data(index, nanos).len();
    match bytes.checked_sub(bare + 8) {
        Some(pad) if pad > 0 => probe_data_padded(index, nanos, pad),
        _ => probe_data(index, nanos),
    }
}

/// What the publisher connections count.
#[derive(Default)]
struct Published {
    /// Messages sent.
    sent: AtomicU64,
    /// Messages answered as committed while measuring.
    acked_in_window: AtomicU64,
    /// Messages answered as committed.
    acked: AtomicU64,
    /// Messages refused, and broken connections.
    errors: AtomicU64,
    /// Publish → answer, per connection, merged at the end.
    ack_latency: Mutex<Option<Histogram<u64>>>,
}

impl Published {
    fn merge(&self, h: &Histogram<u64>) {
        if let Ok(mut all) = self.ack_latency.lock() {
            match all.as_mut() {
                Some(a) => {
                    a.add(h).ok();
                }
                None => *all = Some(h.clone()),
            }
        }
    }
}

/// One publisher connection's plan: its sessions' keys and its schedule.
#[derive(Clone)]
struct Plan {
    /// This connection's number.
    conn: usize,
    /// Publisher connections in all.
    conns: usize,
    /// The request ids of its sessions.
    keys: Arc<Vec<String>>,
    /// Nanoseconds between two of its messages.
    interval_ns: f64,
    /// Nanoseconds into the run where it stops.
    end_ns: u64,
    bytes: usize,
}

impl Plan {
    /// Message `m` of this connection: its global index (unique across connections), its key,
    /// and when it is due.
    fn message(&self, m: u64) -> (u64, &str, u64) {
        let index = m * self.conns as u64 + self.conn as u64;
        let key = &self.keys[(m % self.keys.len() as u64) as usize];
        let phase = self.conn as f64 / self.conns as f64;
        let due = ((m as f64 + phase) * self.interval_ns) as u64;
        (index, key, due)
    }
}

/// Run the scenario. `target.token` must carry `publish: true` for the WebSocket transport.
pub async fn run(target: &Target, args: &TokensArgs) -> anyhow::Result<Value> {
    if args.sessions == 0 || args.connections == 0 || args.rate <= 0.0 {
        bail!("need at least one session, one connection and a positive rate");
    }
    let conns = args.connections.min(args.sessions);
    super::ensure_fds((args.sessions + conns) as u64 + 64)?;
    let run = run_id();
    let key = |s: usize| format!("tok-{run}-{s}");

    // Every session's subscriber first.
    let subs: Vec<ws::Ws> = futures_util::stream::iter(0..args.sessions)
        .map(|s| {
            let key = key(s);
            async move {
                let mut c = ws::open(target, s, 4 * 1024).await?;
                ws::subscribe(&mut c, "bench", &key, None).await?;
                anyhow::Ok(c)
            }
        })
        .buffer_unordered(args.connect_concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;

    let total = args.warmup + args.duration;
    let shared = Shared::new(1, args.warmup..args.warmup + args.duration)?;
    let checks = Arc::new(Mutex::new(Vec::with_capacity(args.sessions)));
    let readers = spawn_checked_readers(&shared, subs, &checks);
    let published = Arc::new(Published::default());
    let measuring = Arc::new(AtomicBool::new(false));

    let mut publishers = Vec::with_capacity(conns);
    for c in 0..conns {
        let keys: Vec<String> = (c..args.sessions).step_by(conns).map(key).collect();
        let plan = Plan {
            conn: c,
            conns,
            interval_ns: 1e9 / (args.rate * keys.len() as f64),
            keys: Arc::new(keys),
            end_ns: total.as_nanos() as u64,
            bytes: args.bytes,
        };
        let answers = Answers {
            sent: Arc::default(),
            shared: Arc::clone(&shared),
            published: Arc::clone(&published),
            measuring: Arc::clone(&measuring),
        };
        let handle = match args.transport {
            Transport::Ws => {
                let ws = ws::open(target, args.sessions + c, 64 << 10).await?;
                tokio::spawn(publish_ws(ws, plan, answers))
            }
            Transport::Ndjson => {
                let stream = TcpStream::connect(target.publish_addr.unwrap_or(target.addr))
                    .await
                    .context("cannot connect a stream publisher")?;
                stream.set_nodelay(true)?;
                let auth = format!("ApiKey {}", target.api_key);
                tokio::spawn(publish_ndjson(stream, auth, plan, answers))
            }
        };
        publishers.push(handle);
    }

    sleep_until(shared.start, args.warmup).await;
    measuring.store(true, Ordering::Release);
    let cpu = CpuMeter::start(target.server_pid);
    let deliveries_before = shared.deliveries.load(Ordering::Acquire);
    sleep_until(shared.start, total).await;
    measuring.store(false, Ordering::Release);
    let cpu_use = cpu.stop();
    let deliveries_in_window = shared.deliveries.load(Ordering::Acquire) - deliveries_before;

    for p in publishers {
        p.await.context("publisher panicked")?;
    }
    let acked = published.acked.load(Ordering::Acquire);
    drain_and_stop(&shared, readers, acked, Duration::from_secs(10)).await;

    let (deliver, _) = latencies(&shared);
    let ack = published
        .ack_latency
        .lock()
        .ok()
        .and_then(|h| h.as_ref().map(Summary::of))
        .unwrap_or_default();
    let checks = checks.lock().map(|c| c.clone()).unwrap_or_default();
    let violations: u64 = checks.iter().map(|c: &StreamCheck| c.violations).sum();
    let mut problems: Vec<String> = checks
        .iter()
        .flat_map(|c| c.problems.iter().cloned())
        .take(5)
        .collect();
    let deliveries = shared.deliveries.load(Ordering::Acquire);
    let errors = published.errors.load(Ordering::Acquire);
    if violations > 0 {
        problems.insert(
            0,
            format!("{violations} messages out of order, duplicated or after a gap"),
        );
    }
    if deliveries < acked {
        problems.push(format!(
            "{} answered messages never delivered",
            acked - deliveries
        ));
    }
    let in_window = published.acked_in_window.load(Ordering::Acquire);
    let server_cpu_s = cpu_use.server_cores.map(|c| c * cpu_use.wall_seconds);
    Ok(json!({
        "scenario": "tokens",
        "transport": args.transport.name(),
        "sessions": args.sessions,
        "rate_per_session": args.rate,
        "target_msgs_per_s": args.rate * args.sessions as f64,
        "data_bytes": args.bytes,
        "publisher_connections": conns,
        "duration_s": args.duration.as_secs_f64(),
        "sent": published.sent.load(Ordering::Acquire),
        "acked": acked,
        "errors": errors,
        "durable_msgs_per_s": in_window as f64 / cpu_use.wall_seconds,
        "durable_msgs_per_server_cpu_s": server_cpu_s.filter(|s| *s > 0.0).map(|s| in_window as f64 / s),
        "deliveries": deliveries,
        "deliveries_per_s": deliveries_in_window as f64 / cpu_use.wall_seconds,
        "connections_ended_early": shared.ended_early.load(Ordering::Relaxed),
        "latency": deliver,
        "ack_latency": ack,
        "problems": problems,
        "cpu": cpu_use,
    }))
}

/// One reader per subscriber, feeding `shared` (latency) and its own order check, which it
/// hands to `checks` when it ends.
fn spawn_checked_readers(
    shared: &Arc<Shared>,
    subs: Vec<ws::Ws>,
    checks: &Arc<Mutex<Vec<StreamCheck>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    subs.into_iter()
        .enumerate()
        .map(|(n, mut c)| {
            let shared = Arc::clone(shared);
            let checks = Arc::clone(checks);
            tokio::spawn(async move {
                // Handed over on drop: the readers are aborted at the end.
                struct Report(StreamCheck, Arc<Mutex<Vec<StreamCheck>>>);
                impl Drop for Report {
                    fn drop(&mut self) {
                        if let Ok(mut all) = self.1.lock() {
                            all.push(std::mem::take(&mut self.0));
                        }
                    }
                }
                let mut report = Report(StreamCheck::after(0), checks);
                while let Some(msg) = c.next().await {
                    match msg {
                        Ok(Message::Text(t)) => {
                            if report.0.on_frame(t.as_str()) {
                                shared.on_frame(t.as_str(), n);
                            }
                        }
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                    if shared.stopped() {
                        break;
                    }
                }
                if !shared.stopped() {
                    shared.ended_early.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

/// One publisher connection's answers: when each unanswered message counts as sent (answers
/// come in order), and what the run counts.
#[derive(Clone)]
struct Answers {
    sent: Arc<Mutex<VecDeque<u64>>>,
    shared: Arc<Shared>,
    published: Arc<Published>,
    measuring: Arc<AtomicBool>,
}

impl Answers {
    /// Message sent, counting as sent at `at` (ns into the run).
    fn sent(&self, at: u64) {
        if let Ok(mut s) = self.sent.lock() {
            s.push_back(at);
        }
    }

    /// Whether every message sent was answered.
    fn all_answered(&self) -> bool {
        self.sent.lock().is_ok_and(|s| s.is_empty())
    }

    /// A broken connection, or a refused message.
    fn failed(&self) {
        self.published.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The next answer arrived: committed (`ok`) or refused.
    fn on(&self, ok: bool, hist: &mut Histogram<u64>) {
        let at = self.sent.lock().ok().and_then(|mut s| s.pop_front());
        if !ok {
            return self.failed();
        }
        self.published.acked.fetch_add(1, Ordering::Relaxed);
        if self.measuring.load(Ordering::Relaxed) {
            self.published
                .acked_in_window
                .fetch_add(1, Ordering::Relaxed);
            if let Some(at) = at {
                record_nanos(hist, self.shared.now_ns().saturating_sub(at));
            }
        }
    }
}

impl Plan {
    /// Wait until message `*m` is due, then every message due by now from `*m` on, each with
    /// the time it counts as sent: its due time when the connection is late (it could not
    /// write), else the time it really goes out (timer slack is the load generator's); moves
    /// `*m` past them and counts them sent. Empty once the run is over.
    async fn next_batch(&self, m: &mut u64, answers: &Answers) -> Vec<(u64, &str, u64)> {
        let batch = self.due_from(*m, &answers.shared).await;
        *m += batch.len() as u64;
        answers
            .published
            .sent
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        batch
    }

    async fn due_from(&self, m: u64, shared: &Shared) -> Vec<(u64, &str, u64)> {
        let (index, key, due_ns) = self.message(m);
        if due_ns >= self.end_ns {
            return Vec::new();
        }
        let first_at = if shared.now_ns() >= due_ns {
            due_ns
        } else {
            sleep_until(shared.start, Duration::from_nanos(due_ns)).await;
            shared.now_ns()
        };
        let mut batch = vec![(index, key, first_at)];
        for next in m + 1.. {
            let (index, key, due_ns) = self.message(next);
            if due_ns > shared.now_ns() || due_ns >= self.end_ns {
                break;
            }
            batch.push((index, key, due_ns));
        }
        batch
    }
}

async fn publish_ws(ws: ws::Ws, plan: Plan, answers: Answers) {
    let (mut sink, mut stream) = ws.split();
    let reading = answers.clone();
    let reader = tokio::spawn(async move {
        let mut hist = latency_histogram();
        // Ends with the connection: the writer closes it once everything was answered.
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Text(t) = msg else { continue };
            let ok = t.as_str().starts_with(r#"{"type":"publish_ack""#);
            if ok || t.as_str().starts_with(r#"{"type":"error""#) {
                reading.on(ok, &mut hist);
            }
        }
        reading.published.merge(&hist);
    });
    let mut m = 0u64;
    loop {
        let batch = plan.next_batch(&mut m, &answers).await;
        if batch.is_empty() {
            break;
        }
        for (index, key, at) in batch {
            let frame = format!(
                r#"{{"type":"publish","ref":{index},"channel":"bench","request_id":"{key}","data":{}}}"#,
                token_data(index, at, plan.bytes)
            );
            answers.sent(at);
            if sink.feed(Message::text(frame)).await.is_err() {
                answers.failed();
                reader.abort();
                return;
            }
        }
        if sink.flush().await.is_err() {
            answers.failed();
            reader.abort();
            return;
        }
    }
    // Wait (bounded) for the last answers, then close: the reader ends with the connection.
    let answered = async {
        while !answers.all_answered() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), answered).await;
    let _ = sink.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
}

async fn publish_ndjson(stream: TcpStream, auth: String, plan: Plan, answers: Answers) {
    let (mut rd, mut wr) = stream.into_split();
    let reading = answers.clone();
    let reader = tokio::spawn(async move {
        let mut hist = latency_histogram();
        let mut lines = NdjsonAnswers::default();
        let mut buf = vec![0u8; 64 << 10];
        while !lines.ended() {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let Ok(taken) = lines.take(&buf[..n]) else {
                reading.failed();
                break;
            };
            for ok in taken {
                reading.on(ok, &mut hist);
            }
        }
        reading.published.merge(&hist);
    });
    let head = format!(
        "POST /api/publish/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    if wr.write_all(head.as_bytes()).await.is_err() {
        answers.failed();
        reader.abort();
        return;
    }
    let mut chunk = Vec::with_capacity(16 << 10);
    let mut lines = String::new();
    let mut m = 0u64;
    loop {
        let batch = plan.next_batch(&mut m, &answers).await;
        if batch.is_empty() {
            break;
        }
        lines.clear();
        for (index, key, at) in batch {
            lines.push_str(&format!(
                r#"{{"channel":"bench","request_id":"{key}","data":{}}}"#,
                token_data(index, at, plan.bytes)
            ));
            lines.push('\n');
            answers.sent(at);
        }
        chunk.clear();
        chunk.extend_from_slice(format!("{:x}\r\n", lines.len()).as_bytes());
        chunk.extend_from_slice(lines.as_bytes());
        chunk.extend_from_slice(b"\r\n");
        if wr.write_all(&chunk).await.is_err() {
            answers.failed();
            reader.abort();
            return;
        }
    }
    // The end of the body; the server answers what is left, then ends the response.
    let _ = wr.write_all(b"0\r\n\r\n").await;
    let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
}

/// The answer of a chunked NDJSON response, taken piece by piece: its lines, each committed
/// (`true`) or an error line (`false`).
#[derive(Debug, Default)]
struct NdjsonAnswers {
    /// Bytes not yet decoded.
    raw: Vec<u8>,
    /// The response head was read (status 200, chunked).
    head: bool,
    /// The chunked body's decoder.
    chunks: crate::http::Dechunker,
    /// Body bytes decoded from the last piece (reused).
    body: Vec<u8>,
    /// The start of a line whose end has not arrived.
    line: Vec<u8>,
}

impl NdjsonAnswers {
    /// Take a piece of the response; returns the answers it completed.
    fn take(&mut self, piece: &[u8]) -> anyhow::Result<Vec<bool>> {
        let mut out = Vec::new();
        if self.ended() {
            // The trailer after the last chunk.
            return Ok(out);
        }
        self.raw.extend_from_slice(piece);
        let mut at = 0;
        if !self.head {
            let Some(head) = crate::http::parse_head_of_stream(&self.raw)? else {
                return Ok(out);
            };
            if head.status != 200 {
                bail!("the stream was answered {}", head.status);
            }
            self.head = true;
            at = head.head_len;
        }
        self.body.clear();
        at += self.chunks.decode(&self.raw[at..], &mut self.body)?;
        self.raw.drain(..at);
        for &b in &self.body {
            if b == b'\n' {
                out.push(!self.line.starts_with(br#"{"error""#));
                self.line.clear();
            } else if self.line.len() < 16 {
                self.line.push(b);
            }
        }
        Ok(out)
    }

    /// The last chunk arrived.
    fn ended(&self) -> bool {
        self.chunks.ended
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn token_data_is_about_the_asked_size_and_carries_the_probe() {
        let d = token_data(12_345, 9_876_543_210, 60);
        assert!((58..=62).contains(&d.len()), "{d} is {} bytes", d.len());
        let frame = format!(r#"{{"type":"message","sequence_number":1,"data":{d}}}"#);
        assert_eq!(
            crate::probe::scan_probe(&frame),
            Some((12_345, 9_876_543_210))
        );
        assert_eq!(token_data(1, 2, 0), probe_data(1, 2));
    }

    #[test]
    fn a_plan_spreads_messages_over_its_sessions_evenly() {
        let plan = Plan {
            conn: 1,
            conns: 4,
            keys: Arc::new(vec!["a".into(), "b".into()]),
            interval_ns: 1000.0,
            end_ns: u64::MAX,
            bytes: 0,
        };
        assert_eq!(plan.message(0), (1, "a", 250));
        assert_eq!(plan.message(1), (5, "b", 1250));
        assert_eq!(plan.message(2), (9, "a", 2250));
    }

    #[test]
    fn decodes_a_chunked_ndjson_answer_split_anywhere() {
        let ok = "{\"sequence_number\":1,\"stream_sequence\":1}\n";
        let err = "{\"error\":{\"code\":\"bad_request\",\"message\":\"x\"}}\n";
        let text = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n\
             {:x}\r\n{ok}\r\n{:x};ext=1\r\n{err}{ok}\r\n0\r\n\r\n",
            ok.len(),
            err.len() + ok.len()
        );
        let body = text.as_bytes();
        for split in 1..body.len() {
            let mut a = NdjsonAnswers::default();
            let mut lines = a
                .take(&body[..split])
                .unwrap_or_else(|e| panic!("split {split}: {e}"));
            lines.extend(a.take(&body[split..]).unwrap());
            assert_eq!(lines, vec![true, false, true], "split at {split}");
            assert!(a.ended());
        }
    }
}
