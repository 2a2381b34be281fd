//! Shared pieces of the client's black-box tests: a TCP proxy that can cut and refuse
//! connections (so the client keeps one URL while servers restart on new ports), a publisher
//! that keeps going across restarts, and waits that always have a deadline.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seqcast_client::{
    Client, ConnectionState, Event, Message, Subscribed, Subscription, TokenProvider,
};
use seqcast_e2e::{API_KEY, PROMPT};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// Backoff for tests: quick retries, short cap.
pub const BACKOFF: (Duration, Duration) = (Duration::from_millis(20), Duration::from_millis(200));

/// A client of `url` (`ws://…/ws`) with the tests' [`BACKOFF`], its tokens from `tokens`.
pub async fn connect_with(url: String, tokens: impl TokenProvider) -> Client {
    Client::builder(url)
        .backoff(BACKOFF.0, BACKOFF.1)
        .connect(tokens)
        .await
        .expect("connect")
}

/// A token provider that counts the times it was asked (the count returned beside it): the
/// n-th ask (from 1) answers `token(n)`.
pub fn counting_provider(
    token: impl Fn(usize) -> Result<String, std::io::Error> + Send + Sync + 'static,
) -> (Arc<AtomicUsize>, impl TokenProvider) {
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = {
        let calls = Arc::clone(&calls);
        move || {
            let answer = token(calls.fetch_add(1, Ordering::SeqCst) + 1);
            async move { answer }
        }
    };
    (calls, provider)
}

/// A TCP forwarder in front of a server.
#[derive(Debug)]
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct ProxyState {
    backend: Option<SocketAddr>,
    conns: Vec<AbortHandle>,
}

impl Proxy {
    /// Forwards every connection to `backend`.
    pub async fn start(backend: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ProxyState {
            backend: Some(backend),
            conns: Vec::new(),
        }));
        let accept_state = Arc::clone(&state);
        // The proxy's accept loop; aborted when the proxy is dropped.
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let backend = accept_state.lock().unwrap().backend;
                let Some(backend) = backend else {
                    continue; // refused: `inbound` is dropped
                };
                // One forwarded connection; aborted by `sever`.
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut st = accept_state.lock().unwrap();
                st.conns.retain(|c| !c.is_finished());
                st.conns.push(conn.abort_handle());
            }
        });
        Proxy {
            addr,
            state,
            accept,
        }
    }

    /// Where new connections go; `None` refuses them.
    pub fn set_backend(&self, backend: Option<SocketAddr>) {
        self.state.lock().unwrap().backend = backend;
    }

    /// Cuts every open connection, like a network failure.
    pub fn sever(&self) {
        for c in self.state.lock().unwrap().conns.drain(..) {
            c.abort();
        }
    }

    /// The WebSocket URL through the proxy.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// An HTTP URL through the proxy.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.sever();
    }
}

/// Publishes `{"i": i}` for i in 0..n to `channel:request_id` at `publish_url`, one at a time,
/// each with message id `m{i}`; a failed attempt (server down) is retried with the same id, so
/// a message committed just before a crash is answered, not published twice.
pub fn spawn_publisher(
    publish_url: String,
    channel: &'static str,
    request_id: &'static str,
    n: u64,
) -> JoinHandle<Vec<u64>> {
    // The test's publisher; the test awaits it.
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut seqs = Vec::new();
        for i in 0..n {
            let body = json!({"channel": channel, "request_id": request_id,
                              "message_id": format!("m{i}"), "data": {"i": i}});
            loop {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "publisher stuck at {i}"
                );
                let r = http
                    .post(&publish_url)
                    .header("Authorization", format!("ApiKey {API_KEY}"))
                    .json(&body)
                    .send()
                    .await;
                if let Ok(r) = r
                    && r.status() == 200
                    && let Ok(v) = r.json::<serde_json::Value>().await
                {
                    seqs.push(v["sequence_number"].as_u64().unwrap());
                    break;
                }
                // The server is down or restarting: retry (there is no event to await).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        seqs
    })
}

/// The next event, within [`PROMPT`].
pub async fn next_event(sub: &mut Subscription) -> Event {
    tokio::time::timeout(PROMPT, sub.recv())
        .await
        .unwrap_or_else(|_| panic!("no event for {} within {PROMPT:?}", sub.key()))
        .unwrap_or_else(|| panic!("subscription {} ended", sub.key()))
}

/// The next event must be `Subscribed`.
pub async fn expect_subscribed(sub: &mut Subscription) -> Subscribed {
    match next_event(sub).await {
        Event::Subscribed(s) => s,
        other => panic!("expected Subscribed, got {other:?}"),
    }
}

/// The next event must be a message.
pub async fn expect_message(sub: &mut Subscription) -> Message {
    match next_event(sub).await {
        Event::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Waits (within [`PROMPT`]) until the client's state matches `pred`.
pub async fn wait_state(
    client: &Client,
    pred: impl FnMut(&ConnectionState) -> bool,
) -> ConnectionState {
    let mut rx = client.watch_state();
    tokio::time::timeout(PROMPT, rx.wait_for(pred))
        .await
        .unwrap_or_else(|_| panic!("state not reached; now {:?}", client.state()))
        .expect("client task ended")
        .clone()
}

/// `{"i": n}` of a message.
pub fn index(m: &Message) -> u64 {
    m.data_value().unwrap()["i"].as_u64().unwrap()
}
