//! Harness for black-box tests: start the built `seqcast` binary on 127.0.0.1:0 with a
//! temporary data directory, talk to it with a real HTTP client and a real tokio-tungstenite
//! WebSocket client, and read its JSON logs.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod fault_proxy;
pub mod pg_cluster;
pub mod pg_faults;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use seqcast_protocol::{ServerFrame, decode_server_frame};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The secret every test server is started with.
pub const JWT_SECRET: &str = "test-secret-0123456789";
/// The API key every test server is started with.
pub const API_KEY: &str = "test-api-key";
/// How long a test waits for something that should happen promptly.
pub const PROMPT: Duration = Duration::from_secs(10);

/// The `seqcast` binary: `$SEQCAST_BIN` (set by `cargo xtask test`), or built on demand.
pub fn server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SEQCAST_BIN") {
        return PathBuf::from(p);
    }
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .to_path_buf();
            let status = std::process::Command::new(
                std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
            )
            .current_dir(&root)
            .args([
                "build",
                "--quiet",
                "-p",
                "seqcast-server",
                "--bin",
                "seqcast",
            ])
            .status()
            .expect("run cargo build");
            assert!(status.success(), "building the seqcast binary failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| root.join("target"), PathBuf::from);
            target.join("debug").join("seqcast")
        })
        .clone()
}

/// A running server process.
#[derive(Debug)]
pub struct TestServer {
    child: Option<Child>,
    /// Bound address.
    pub addr: SocketAddr,
    /// Data directory (kept alive by `_tmp` unless given by the caller).
    pub data_dir: PathBuf,
    _tmp: Option<Arc<tempfile::TempDir>>,
    logs: Arc<Mutex<Vec<String>>>,
    log_readers: Vec<tokio::task::JoinHandle<()>>,
    /// HTTP client.
    pub http: reqwest::Client,
}

/// Options for [`TestServer::start_with`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Extra command-line arguments.
    pub args: Vec<String>,
    /// Use this data directory (to restart on the same data).
    pub data_dir: Option<PathBuf>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Do not pass `--jwt-secret`/`--api-key` (development mode).
    pub dev_mode: bool,
    /// Listen here instead of a free port (to restart on the same address).
    pub listen: Option<String>,
}

impl Options {
    /// With these extra arguments.
    pub fn args(args: &[&str]) -> Self {
        Options {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Options::default()
        }
    }
}

impl TestServer {
    /// Start with the production storage (SQLite in a temporary data directory).
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    /// Start with options.
    pub async fn start_with(opts: Options) -> Self {
        let (data_dir, tmp) = match opts.data_dir.clone() {
            Some(d) => (d, None),
            None => {
                let t = Arc::new(tempfile::tempdir().unwrap());
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut cmd = Command::new(server_binary());
        cmd.arg("serve")
            .arg("--listen")
            .arg(opts.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .args(["--log-format", "json"])
            .arg("--data-dir")
            .arg(&data_dir);
        if !opts.dev_mode {
            cmd.args(["--jwt-secret", JWT_SECRET, "--api-key", API_KEY]);
        }
        cmd.args(&opts.args)
            .env(
                "RUST_LOG",
                "debug,hyper=info,tungstenite=info,tokio_tungstenite=info",
            )
            .env_remove("SEQCAST_LISTEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start seqcast");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
        let mut log_readers = Vec::new();
        {
            let logs = Arc::clone(&logs);
            log_readers.push(tokio::spawn(async move {
                let mut addr_tx = Some(addr_tx);
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && v["event"] == "listening"
                        && let Some(a) = v["addr"].as_str().and_then(|a| a.parse().ok())
                        && let Some(tx) = addr_tx.take()
                    {
                        let _ = tx.send(a);
                    }
                    logs.lock().unwrap().push(line);
                }
            }));
        }
        {
            let logs = Arc::clone(&logs);
            log_readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    logs.lock().unwrap().push(format!("stderr: {line}"));
                }
            }));
        }
        let addr = match tokio::time::timeout(Duration::from_secs(30), addr_rx).await {
            Ok(Ok(a)) => a,
            _ => {
                let _ = child.kill().await;
                panic!(
                    "server did not log `listening`; output:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        TestServer {
            child: Some(child),
            addr,
            data_dir,
            _tmp: tmp,
            logs,
            log_readers,
            http: reqwest::Client::new(),
        }
    }

    /// `http://addr`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// One value from `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in metrics:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Every log line so far, parsed (non-JSON lines are skipped).
    pub fn logs(&self) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Raw log lines (including stderr).
    pub fn raw_logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Wait until a log event matching `pred` appears.
    pub async fn wait_for_log(&self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PROMPT;
        loop {
            if let Some(v) = self.logs().into_iter().find(|v| pred(v)) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("log line not found; logs:\n{}", self.raw_logs().join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Publish one message with the API key; panics unless 200.
    pub async fn publish(&self, channel: &str, request_id: &str, data: Value) -> Value {
        let r = self
            .publish_raw(&json!({"channel": channel, "request_id": request_id, "data": data}))
            .await;
        assert_eq!(r.0, 200, "publish failed: {}", r.1);
        r.1
    }

    /// POST /api/publish with any body; returns (status, json body).
    pub async fn publish_raw(&self, body: &Value) -> (u16, Value) {
        self.post("/api/publish", &body.to_string()).await
    }

    /// POST a raw body with the API key.
    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .header("Authorization", format!("ApiKey {API_KEY}"))
            .header("Content-Type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Every row of the stream `channel:request_id`, paging `GET /api/streams/…/messages` with
    /// `after=` (`limit` rows a page) until no `next_after`; asserts each page is a 200.
    pub async fn stream_rows(&self, channel: &str, request_id: &str, limit: usize) -> Vec<Value> {
        let t = token("reader", None);
        let mut after = 0;
        let mut rows = Vec::new();
        loop {
            let (status, body) = self
                .get(
                    &format!(
                        "/api/streams/{channel}/{request_id}/messages?after={after}&limit={limit}"
                    ),
                    Some(&t),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            rows.extend(body["messages"].as_array().unwrap().iter().cloned());
            match body["next_after"].as_u64() {
                Some(next) => after = next,
                None => return rows,
            }
        }
    }

    /// Every message of the key `channel:request_id` from `GET /websocket/messages` (HTTP
    /// recovery from 0), paging with `next_since`; asserts each page is a 200.
    pub async fn recover_key(&self, channel: &str, request_id: &str) -> Vec<Value> {
        let t = token("reader", None);
        let mut out = Vec::new();
        let mut since = 0;
        loop {
            let (status, body) = self
                .get(
                    &format!("/websocket/messages?since={since}&channel={channel}&request_id={request_id}&limit=10000"),
                    Some(&t),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            out.extend(body["messages"].as_array().unwrap().iter().cloned());
            match body["next_since"].as_u64() {
                Some(n) => since = n,
                None => return out,
            }
        }
    }

    /// GET with an optional bearer token; returns (status, json body).
    pub async fn get(&self, path_and_query: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.http.get(self.url(path_and_query));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A WebSocket connected and past `hello`.
    pub async fn client(&self, token: &str) -> Client {
        let mut c = self.connect_raw().await;
        c.send(json!({"type": "hello", "token": token})).await;
        match c.next_frame().await {
            ServerFrame::Connected(_) => c,
            other => panic!("expected connected, got {other:?}"),
        }
    }

    /// A WebSocket connected, before `hello`.
    pub async fn connect_raw(&self) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", self.addr))
            .await
            .unwrap();
        Client { ws }
    }

    /// Send SIGTERM and wait for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = child.id().unwrap();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap()
            .unwrap();
        self.drain_logs().await;
        status
    }

    /// Wait until the exited process's output has been read to the end.
    async fn drain_logs(&mut self) {
        for reader in self.log_readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
    }

    /// `kill -9`.
    pub async fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.start_kill().unwrap();
        let _ = child.wait().await;
        self.drain_logs().await;
    }
}

/// Mint a client token with the test secret.
pub fn token(sub: &str, channels: Option<&[&str]>) -> String {
    token_with(sub, channels, 3600, false)
}

/// Mint a token with every option.
pub fn token_with(sub: &str, channels: Option<&[&str]>, ttl_secs: i64, publish: bool) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut claims = json!({"sub": sub, "exp": now + ttl_secs});
    if let Some(c) = channels {
        claims["channels"] = json!(c);
    }
    if publish {
        claims["publish"] = json!(true);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// What a read from the socket produced.
#[derive(Debug)]
pub enum Event {
    /// A server frame.
    Frame(ServerFrame),
    /// A close frame (code, reason).
    Closed(u16, String),
    /// The stream ended without a close frame.
    Ended,
}

/// A real WebSocket client.
#[derive(Debug)]
pub struct Client {
    /// The socket.
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    /// Send a JSON text frame.
    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    /// Send raw text.
    pub async fn send_text(&mut self, s: &str) {
        self.ws
            .send(Message::Text(s.to_owned().into()))
            .await
            .unwrap();
    }

    /// Next event, within [`PROMPT`].
    pub async fn next_event(&mut self) -> Event {
        self.next_event_within(PROMPT)
            .await
            .expect("no frame within the deadline")
    }

    /// Next server frame (panics on close).
    pub async fn next_frame(&mut self) -> ServerFrame {
        match self.next_event().await {
            Event::Frame(f) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Subscribe and return the sub_ack.
    pub async fn subscribe(&mut self, channel: &str, request_id: &str) -> seqcast_protocol::SubAck {
        self.send(json!({"type": "subscribe", "channel": channel, "request_id": request_id}))
            .await;
        self.expect_sub_ack().await
    }

    /// The next frame must be sub_ack.
    pub async fn expect_sub_ack(&mut self) -> seqcast_protocol::SubAck {
        match self.next_frame().await {
            ServerFrame::SubAck(a) => a,
            other => panic!("expected sub_ack, got {other:?}"),
        }
    }

    /// The next frame must be a message.
    pub async fn expect_message(&mut self) -> seqcast_protocol::MessageFrame {
        match self.next_frame().await {
            ServerFrame::Message(m) => m,
            other => panic!("expected message, got {other:?}"),
        }
    }

    /// Prove nothing else is queued: send ping, the next frame must be pong.
    pub async fn expect_nothing_more(&mut self) {
        self.send(json!({"type": "ping"})).await;
        match self.next_frame().await {
            ServerFrame::Pong => {}
            other => panic!("expected nothing before pong, got {other:?}"),
        }
    }

    /// Close politely.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(2), self.ws.next()).await {
        }
    }
}

/// The raw `data` of a message frame as JSON.
pub fn data(m: &seqcast_protocol::MessageFrame) -> Value {
    serde_json::from_str(m.data.get()).unwrap()
}

/// POST /api/publish `body` with the API key over `http` to `url` (for a task that cannot
/// borrow the [`TestServer`]); the answer's JSON.
pub async fn publish_over(http: &reqwest::Client, url: &str, body: &Value) -> Value {
    http.post(url)
        .header("Authorization", format!("ApiKey {API_KEY}"))
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The `error.message` of an error answer's body.
pub fn error_message(body: &Value) -> &str {
    body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {body}"))
}

/// The `sequence_number`s of a page's `messages`, in order (an HTTP recovery or events page).
pub fn seqs(page: &Value) -> Vec<u64> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sequence_number"].as_u64().unwrap())
        .collect()
}

impl TestServer {
    /// The server process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The memory the server process holds itself, in bytes (see [`rss_bytes_of`]).
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes_of(self.pid().expect("the server is running")).expect("read RssAnon")
    }

    /// `POST /api/publish/batch` with these message objects; panics unless 200. Returns the
    /// per-message answers, in order.
    pub async fn publish_batch(&self, messages: &[Value]) -> Vec<Value> {
        let (status, body) = self
            .post(
                "/api/publish/batch",
                &json!({ "messages": messages }).to_string(),
            )
            .await;
        assert_eq!(status, 200, "batch publish failed: {body}");
        let results = body["results"].as_array().expect("results").clone();
        assert_eq!(results.len(), messages.len(), "one answer per message");
        results
    }

    /// A WebSocket past `hello` whose TCP receive buffer is capped at `recv_buffer` bytes
    /// (set before connecting, so the kernel does not auto-grow it): a client that stops
    /// reading stalls the server quickly instead of parking megabytes in kernel buffers.
    pub async fn client_with_recv_buffer(&self, token: &str, recv_buffer: u32) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(recv_buffer).unwrap();
        let stream = socket.connect(self.addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(
            format!("ws://{}/ws", self.addr),
            MaybeTlsStream::Plain(stream),
        )
        .await
        .unwrap();
        let mut c = Client { ws };
        c.send(json!({"type": "hello", "token": token})).await;
        match c.next_frame().await {
            ServerFrame::Connected(_) => c,
            other => panic!("expected connected, got {other:?}"),
        }
    }

    /// `GET /websocket/messages?since=0&limit=1` with an all-channels token: `(head,
    /// oldest_sequence, epoch)`. `oldest_sequence` is where the recovery window starts (the
    /// retention floor when `--recovery-max-messages` reaches further back than retention);
    /// `head + 1` when the window holds nothing.
    pub async fn log_bounds(&self) -> (u64, u64, String) {
        let (status, body) = self
            .get(
                "/websocket/messages?since=0&limit=1",
                Some(&token("log-bounds", None)),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        (
            body["head"].as_u64().unwrap(),
            body["oldest_sequence"]
                .as_u64()
                .unwrap_or(body["head"].as_u64().unwrap() + 1),
            body["epoch"].as_str().unwrap().to_owned(),
        )
    }
}

/// The memory a process holds itself, in bytes: its anonymous resident pages (`RssAnon`). The
/// server's SQLite readers map the database file; those pages are the kernel's page cache
/// (shared, dropped under pressure), which `VmRSS` would count too.
pub fn rss_bytes_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Bytes on disk of the SQLite store in `data_dir`: `seqcast.db` plus its `-wal` and `-shm`.
pub fn sqlite_bytes(data_dir: &Path) -> u64 {
    ["seqcast.db", "seqcast.db-wal", "seqcast.db-shm"]
        .iter()
        .filter_map(|f| std::fs::metadata(data_dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

impl Client {
    /// Subscribe with `since` (and an optional `epoch`) and return the sub_ack.
    pub async fn subscribe_since(
        &mut self,
        channel: &str,
        request_id: &str,
        since: u64,
        epoch: Option<&str>,
    ) -> seqcast_protocol::SubAck {
        let mut frame = json!({"type": "subscribe", "channel": channel, "request_id": request_id, "since": since});
        if let Some(e) = epoch {
            frame["epoch"] = json!(e);
        }
        self.send(frame).await;
        self.expect_sub_ack().await
    }

    /// Next event, or `None` if nothing arrives within `wait`.
    pub async fn next_event_within(&mut self, wait: Duration) -> Option<Event> {
        // One deadline for the whole wait: pings and other control frames do not extend it.
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            return Some(match msg {
                Some(Ok(Message::Text(t))) => Event::Frame(
                    decode_server_frame(t.as_str())
                        .unwrap_or_else(|e| panic!("bad frame {t}: {e}")),
                ),
                Some(Ok(Message::Close(c))) => match c {
                    Some(CloseFrame { code, reason }) => {
                        Event::Closed(code.into(), reason.to_string())
                    }
                    None => Event::Closed(1005, String::new()),
                },
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => Event::Ended,
            });
        }
    }
}

/// A PostgreSQL database made for one test (random name) and dropped with this value, on the
/// server at 127.0.0.1:5432 (`SEQCAST_TEST_PG_ADMIN_URL` overrides the admin URL).
#[derive(Debug)]
pub struct PgDatabase {
    admin_url: String,
    /// The database's name.
    pub name: String,
    /// Its URL, for `--database-url`.
    pub url: String,
}

impl PgDatabase {
    /// A fresh database, or None when PostgreSQL is unreachable: said loudly on stderr, and a
    /// test failure under `CI=true`.
    pub fn create() -> Option<Self> {
        let admin_url = std::env::var("SEQCAST_TEST_PG_ADMIN_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!("seqcast_e2e_{:016x}", rand::random::<u64>());
        if let Err(e) = admin_sql(&admin_url, &format!("CREATE DATABASE {name}")) {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(
                !ci,
                "PostgreSQL is not reachable at {admin_url} under CI=true: {e}"
            );
            eprintln!("\n!!!! SKIPPED: PostgreSQL test — no PostgreSQL at {admin_url}: {e}\n");
            return None;
        }
        let (base, _) = admin_url.rsplit_once('/').unwrap();
        let url = format!("{base}/{name}");
        Some(PgDatabase {
            admin_url,
            name,
            url,
        })
    }

    /// The server options of a node on this database.
    pub fn node_options(&self) -> Options {
        Options::args(&["--storage", "postgres", "--database-url", &self.url])
    }

    /// Runs SQL on the admin database (e.g. `ALTER DATABASE`).
    pub fn admin(&self, sql: &str) {
        admin_sql(&self.admin_url, sql).unwrap();
    }

    /// An application's own connection to this database.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = admin_sql(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Polls `count_sql` (a `SELECT count(*) …`) on `client` every `every` until it answers 0;
/// `Err(count)`, the last answer, once `within` has passed.
pub async fn until_count_is_zero(
    client: &tokio_postgres::Client,
    count_sql: &str,
    within: Duration,
    every: Duration,
) -> Result<(), i64> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let count: i64 = client.query_one(count_sql, &[]).await.unwrap().get(0);
        if count == 0 {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(count);
        }
        tokio::time::sleep(every).await;
    }
}

/// One statement on another database, on a thread of its own (callable from async code).
fn admin_sql(url: &str, sql: &str) -> Result<(), String> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let (client, connection) = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_postgres::connect(&url, tokio_postgres::NoTls),
            )
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            client.batch_execute(&sql).await.map_err(|e| e.to_string())
        })
    })
    .join()
    .unwrap()
}

pub mod sse;
