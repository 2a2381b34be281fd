//! Fan-out over Server-Sent Events: N `GET /events` streams on one key (or spread over
//! `keys` distinct keys, each stream naming its own), published at a fixed rate
//! — the paced WebSocket fan-out's measurement (publish → receive per delivery, server CPU over
//! the window) with SSE readers. A reader whose stream the server ends (`--sse-max-secs`)
//! reconnects with `Last-Event-ID`, as an `EventSource` does.

use std::sync::Arc;

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::fanout::{FanoutArgs, Shared, key_request_id, measure};
use super::run_id;
use crate::Target;
use crate::http::{Dechunker, parse_head_of_stream};

/// Run the scenario (`args.rate` must be set: SSE has no burst mode here).
pub async fn run(target: &Target, args: &FanoutArgs) -> anyhow::Result<Value> {
    if args.subscribers == 0 || args.publishers == 0 || args.rate.is_none() {
        bail!("need subscribers, publishers and a rate");
    }
    if args.keys == 0 || !args.subscribers.is_multiple_of(args.keys) {
        bail!("--keys must divide --subscribers");
    }
    let request_id = format!("sse-{}", run_id());
    let connect_started = std::time::Instant::now();
    let key_of = |n: usize| key_request_id(&request_id, args.keys, n as u64).into_owned();
    let streams: Vec<Stream> = futures_util::stream::iter(0..args.subscribers)
        .map(|n| Stream::open(target, key_of(n), None))
        .buffer_unordered(args.connect_concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let target_for_readers = target.clone();
    measure(
        target,
        args,
        "sse",
        &request_id,
        connect_seconds,
        |shared| {
            streams
                .into_iter()
                .enumerate()
                .map(|(n, stream)| {
                    let shared = Arc::clone(shared);
                    let target = target_for_readers.clone();
                    let request_id = key_of(n);
                    tokio::spawn(
                        async move { read(stream, &shared, n, &target, &request_id).await },
                    )
                })
                .collect()
        },
    )
    .await
}

/// One reader: every `data:` line to `shared`; when the server ends the stream, again with
/// `Last-Event-ID`.
async fn read(mut stream: Stream, shared: &Shared, n: usize, target: &Target, request_id: &str) {
    loop {
        while let Some(line) = stream.next_line().await {
            if let Some(frame) = line.strip_prefix("data: ") {
                shared.on_frame(frame, n);
            } else if let Some(id) = line.strip_prefix("id: ") {
                stream.last_id = id.parse().ok();
            }
            if shared.stopped() {
                return;
            }
        }
        if shared.stopped() {
            return;
        }
        match Stream::open(target, request_id.to_owned(), stream.last_id).await {
            Ok(next) => stream = next,
            Err(_) => {
                shared
                    .ended_early
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
        }
    }
}

/// An open `GET /events` response: the socket, the chunked body undone into lines.
struct Stream {
    socket: TcpStream,
    /// Bytes read and not yet taken apart (chunk framing included).
    raw: Vec<u8>,
    /// Body bytes not yet a whole line.
    body: Vec<u8>,
    /// The chunked body's decoder.
    chunks: Dechunker,
    /// The last `id:` seen (where a reconnect resumes).
    last_id: Option<u64>,
    /// The body or the socket ended.
    ended: bool,
}

impl Stream {
    async fn open(
        target: &Target,
        request_id: String,
        last_id: Option<u64>,
    ) -> anyhow::Result<Self> {
        let mut socket = TcpStream::connect(target.addr)
            .await
            .with_context(|| format!("cannot connect to {}", target.addr))?;
        socket.set_nodelay(true)?;
        let resume = last_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
        let request = format!(
            "GET /events?channel=bench&request_id={request_id} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {}\r\n{resume}\r\n",
            target.addr, target.token
        );
        socket.write_all(request.as_bytes()).await?;
        let mut raw = Vec::with_capacity(16 * 1024);
        let head = loop {
            if let Some(head) = parse_head_of_stream(&raw)? {
                break head;
            }
            if socket.read_buf(&mut raw).await? == 0 {
                bail!("the server closed the stream before its head");
            }
        };
        if head.status != 200 {
            bail!("GET /events: status {}", head.status);
        }
        raw.drain(..head.head_len);
        Ok(Stream {
            socket,
            raw,
            body: Vec::new(),
            chunks: Dechunker::default(),
            last_id,
            ended: false,
        })
    }

    /// The next line of the body (without its `\n`), `None` at the end of the stream.
    async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.body.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.body.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            if self.ended {
                return None;
            }
            if !self.dechunk() && self.socket.read_buf(&mut self.raw).await.unwrap_or(0) == 0 {
                self.ended = true;
            }
        }
    }

    /// Move the body data `raw` holds into `body`; whether there was any, or the body ended.
    fn dechunk(&mut self) -> bool {
        let before = self.body.len();
        match self.chunks.decode(&self.raw, &mut self.body) {
            Ok(used) => {
                self.raw.drain(..used);
            }
            Err(_) => self.ended = true,
        }
        if self.chunks.ended {
            self.ended = true;
        }
        self.ended || self.body.len() > before
    }
}
