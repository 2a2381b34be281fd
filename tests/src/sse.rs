//! A Server-Sent Events reader for `GET /events`: the wire format parsed by the spec's rules
//! (fields per line, a blank line ends a block, `:` starts a comment, several `data:` lines are
//! joined with `\n`), over any byte source — a reqwest response or a `curl -N` process.

use std::time::Duration;

use tokio::io::AsyncReadExt as _;

/// One block of the stream (up to a blank line).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Block {
    /// The `id:` field, if the block has one.
    pub id: Option<String>,
    /// The `event:` field (empty: none).
    pub event: String,
    /// The `data:` lines joined with `\n` (`None`: no data line; not an event).
    pub data: Option<String>,
    /// Comment lines (after the `:`).
    pub comments: Vec<String>,
    /// The `retry:` field.
    pub retry: Option<String>,
}

impl Block {
    /// A `message` event's frame, parsed.
    pub fn message(&self) -> Option<serde_json::Value> {
        (self.event == "message")
            .then(|| serde_json::from_str(self.data.as_deref()?).ok())
            .flatten()
    }

    /// The `id:` as a number.
    pub fn id_number(&self) -> Option<u64> {
        self.id.as_deref()?.parse().ok()
    }
}

/// Parses the text of a stream into blocks.
#[derive(Debug, Default)]
pub struct Parser {
    partial: String,
    block: Block,
    data: Vec<String>,
    started: bool,
}

impl Parser {
    /// Feed text; returns the blocks it completed.
    pub fn feed(&mut self, text: &str) -> Vec<Block> {
        self.partial.push_str(text);
        let mut out = Vec::new();
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            let line = line.trim_end_matches('\n').trim_end_matches('\r');
            if line.is_empty() {
                if self.started {
                    let mut block = std::mem::take(&mut self.block);
                    if !self.data.is_empty() {
                        block.data = Some(std::mem::take(&mut self.data).join("\n"));
                    }
                    out.push(block);
                    self.started = false;
                }
                continue;
            }
            self.started = true;
            if let Some(comment) = line.strip_prefix(':') {
                self.block.comments.push(comment.trim_start().to_owned());
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
            match field {
                "id" => self.block.id = Some(value),
                "event" => self.block.event = value,
                "data" => self.data.push(value),
                "retry" => self.block.retry = Some(value),
                _ => {}
            }
        }
        out
    }
}

/// Where the bytes come from.
#[derive(Debug)]
enum Source {
    Http(reqwest::Response),
    Curl(tokio::process::Child, tokio::process::ChildStdout),
    /// A plain socket: the response head was read; the body is chunked.
    Raw(tokio::net::TcpStream, Dechunk),
}

/// HTTP/1.1 chunked transfer coding, undone.
#[derive(Debug, Default)]
struct Dechunk {
    buf: Vec<u8>,
    done: bool,
}

impl Dechunk {
    /// The body bytes complete in the buffer.
    fn take(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let Some(eol) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                return out;
            };
            let size_text = std::str::from_utf8(&self.buf[..eol]).unwrap();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            if self.buf.len() < eol + 2 + size + 2 {
                return out;
            }
            if size == 0 {
                self.done = true;
                return out;
            }
            out.extend_from_slice(&self.buf[eol + 2..eol + 2 + size]);
            self.buf.drain(..eol + 2 + size + 2);
        }
    }
}

/// An open stream, read block by block.
#[derive(Debug)]
pub struct Reader {
    source: Source,
    parser: Parser,
    ready: std::collections::VecDeque<Block>,
    ended: bool,
}

impl Reader {
    /// Read a reqwest response's body.
    pub fn http(response: reqwest::Response) -> Self {
        Self::over(Source::Http(response))
    }

    /// Read the stdout of a `curl -N` process (killed on drop).
    pub fn curl(mut child: tokio::process::Child) -> Self {
        let stdout = child.stdout.take().unwrap();
        Self::over(Source::Curl(child, stdout))
    }

    /// `GET path_and_query` over a socket with a receive buffer of `recv_buffer` bytes (a
    /// reader that can stop reading without the kernel taking much for it), with these extra
    /// request headers; the response must be a 200.
    pub async fn raw(
        addr: std::net::SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
        recv_buffer: u32,
    ) -> Self {
        use tokio::io::AsyncWriteExt as _;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(recv_buffer).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        let mut req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                stream.read(&mut byte).await.unwrap(),
                1,
                "connection closed in the head"
            );
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        Self::over(Source::Raw(stream, Dechunk::default()))
    }

    fn over(source: Source) -> Self {
        Reader {
            source,
            parser: Parser::default(),
            ready: std::collections::VecDeque::new(),
            ended: false,
        }
    }

    /// The next block, `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Block> {
        loop {
            if let Some(b) = self.ready.pop_front() {
                return Some(b);
            }
            if self.ended {
                return None;
            }
            let text = match &mut self.source {
                Source::Http(r) => match r.chunk().await {
                    Ok(Some(bytes)) => String::from_utf8(bytes.to_vec()).unwrap(),
                    Ok(None) | Err(_) => String::new(),
                },
                Source::Curl(_, out) => {
                    let mut buf = vec![0; 64 * 1024];
                    let n = out.read(&mut buf).await.unwrap_or(0);
                    buf.truncate(n);
                    String::from_utf8(buf).unwrap()
                }
                Source::Raw(stream, chunks) => loop {
                    let body = chunks.take();
                    if !body.is_empty() {
                        break String::from_utf8(body).unwrap();
                    }
                    if chunks.done {
                        break String::new();
                    }
                    let mut buf = vec![0; 64 * 1024];
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break String::new();
                    }
                    chunks.buf.extend_from_slice(&buf[..n]);
                },
            };
            if text.is_empty() {
                self.ended = true;
            }
            self.ready.extend(self.parser.feed(&text));
        }
    }

    /// The next block within `wait` (`None`: the stream ended or stayed silent).
    pub async fn next_within(&mut self, wait: Duration) -> Option<Block> {
        tokio::time::timeout(wait, self.next()).await.ok().flatten()
    }

    /// The next block that is an event (has data), within `wait`; panics on silence or the end.
    pub async fn next_event(&mut self, wait: Duration) -> Block {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Some(b) if b.data.is_some() => return b,
                Some(_) => {}
                None => panic!("no event within {wait:?} (ended: {})", self.ended),
            }
        }
    }

    /// Stop reading: a curl process is killed and waited for.
    pub async fn close(self) {
        if let Source::Curl(mut child, _) = self.source {
            let _ = child.kill().await;
        }
    }
}
