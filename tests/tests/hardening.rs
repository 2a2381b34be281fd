//! Hardening against the real binary: HTTP timeouts, size limits answered at once, JSON error
//! bodies, connection caps and rate limits, keep-alive, token lifetimes, close codes.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use seqcast_e2e::{API_KEY, Client, Event, JWT_SECRET, Options, TestServer, token, token_with};
use seqcast_protocol::ServerFrame;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Read until the peer closes (or `limit` passes); returns what was read and when it ended.
async fn read_to_close(tcp: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&out).into_owned(),
                    Some(started.elapsed()),
                );
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), None),
        }
    }
}

/// The JSON body of a raw HTTP/1.1 answer.
fn body_of(answer: &str) -> Value {
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or(Value::Null)
}

#[tokio::test]
async fn silent_sockets_and_slowloris_are_cut_off_at_the_header_timeout() {
    let s = TestServer::start_with(Options::args(&["--http-header-timeout-secs", "1"])).await;
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(s.addr).await.unwrap());
    }
    // Slowloris: a request head that never ends, one byte every 200 ms.
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let dripping = tokio::spawn(async move {
        let started = Instant::now();
        for _ in 0..40 {
            if slow.write_all(b"X").await.is_err() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut b = [0u8; 64];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(1), slow.read(&mut b)).await
            {
                return Some(started.elapsed());
            }
        }
        None
    });
    // The server still answers others meanwhile.
    assert_eq!(s.get("/healthz", None).await.0, 200);
    for tcp in &mut silent {
        let (_, closed) = read_to_close(tcp, Duration::from_secs(5)).await;
        let closed = closed.expect("a silent socket was kept open past the header timeout");
        assert!(closed < Duration::from_secs(4), "{closed:?}");
    }
    let cut = dripping
        .await
        .unwrap()
        .expect("slowloris was never cut off");
    assert!(cut < Duration::from_secs(4), "slowloris cut after {cut:?}");
    assert_eq!(s.get("/healthz", None).await.0, 200);
}

#[tokio::test]
async fn a_content_length_lie_gets_408_at_the_body_timeout_and_an_oversized_one_400_at_once() {
    let s = TestServer::start_with(Options::args(&[
        "--http-body-timeout-secs",
        "1",
        "--max-message-bytes",
        "4096",
    ]))
    .await;
    // Declares 100 bytes, sends 5.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: ApiKey {API_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"ch"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let (answer, _) = read_to_close(&mut tcp, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(body_of(&answer)["error"]["code"], "timeout", "{answer}");
    assert!(started.elapsed() < Duration::from_secs(4));

    // Declares 10 GB: answered before any of the body is sent.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(
        format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: ApiKey {API_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf))
        .await
        .expect("no answer to an oversized Content-Length")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("too_large"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn every_error_status_has_a_json_body() {
    let s = TestServer::start().await;
    let r = s.http.get(s.url("/api/publish")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers().contains_key("allow"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    let r = s.http.delete(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "method_not_allowed"
    );
    let (status, body) = s.get("/no/such/thing", None).await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));
}

// ---------- WebSocket conformance ----------

/// A raw WebSocket: handshake done by hand, so frames a real client would refuse can be sent.
async fn raw_ws(s: &TestServer) -> TcpStream {
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

/// One client frame (FIN set); masked unless `masked` is false.
fn frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let key = [1u8, 2, 3, 4];
    let mask_bit = if masked { 0x80 } else { 0 };
    match u16::try_from(payload.len()) {
        Ok(n) if n < 126 => f.push(mask_bit | n as u8),
        Ok(n) => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&n.to_be_bytes());
        }
        Err(_) => panic!("test frames stay under 64 KiB"),
    }
    if masked {
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Read server frames until a close frame: its code and reason.
async fn read_close(tcp: &mut TcpStream) -> (u16, String) {
    loop {
        let mut h = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut h))
            .await
            .expect("no close frame")
            .expect("connection dropped without a close frame");
        let mut len = u64::from(h[1] & 0x7f);
        if len == 126 {
            let mut l = [0u8; 2];
            tcp.read_exact(&mut l).await.unwrap();
            len = u64::from(u16::from_be_bytes(l));
        } else if len == 127 {
            let mut l = [0u8; 8];
            tcp.read_exact(&mut l).await.unwrap();
            len = u64::from_be_bytes(l);
        }
        let mut payload = vec![0u8; len as usize];
        tcp.read_exact(&mut payload).await.unwrap();
        if h[0] & 0x0f == 0x8 {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
        }
    }
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007_and_protocol_violations_with_1002() {
    let s = TestServer::start().await;
    // After hello: a text frame that is not UTF-8.
    let mut tcp = raw_ws(&s).await;
    let hello = json!({"type": "hello", "token": token("alice", None)}).to_string();
    assert!(hello.len() >= 126, "hello needs the 16-bit length form");
    let mut f = vec![0x81, 0x80 | 126];
    f.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0]); // a zero mask leaves the payload as it is
    f.extend_from_slice(hello.as_bytes());
    tcp.write_all(&f).await.unwrap();
    tcp.write_all(&frame(0x1, &[b'{', 0xff, 0xfe, b'}'], true))
        .await
        .unwrap();
    let (code, reason) = read_close(&mut tcp).await;
    assert_eq!(code, 1007, "{reason}");
    assert!(reason.contains("UTF-8"), "{reason}");

    // Before hello: an unmasked client frame (RFC 6455 §5.1).
    let mut tcp = raw_ws(&s).await;
    tcp.write_all(&frame(0x1, b"{}", false)).await.unwrap();
    let (code, reason) = read_close(&mut tcp).await;
    assert_eq!(code, 1002, "{reason}");
    assert!(reason.contains("protocol error"), "{reason}");

    // A reserved opcode.
    let mut tcp = raw_ws(&s).await;
    tcp.write_all(&frame(0x3, b"x", true)).await.unwrap();
    let (code, _) = read_close(&mut tcp).await;
    assert_eq!(code, 1002);
    s.wait_for_log(|v| v["event"] == "connection_closed" && v["close_code"] == 1007)
        .await;
}

// ---------- keep-alive ----------

#[tokio::test]
async fn a_silent_peer_is_closed_after_the_ping_timeout_and_a_live_one_is_kept() {
    let s = TestServer::start_with(Options::args(&[
        "--ping-interval-secs",
        "1",
        "--ping-timeout-secs",
        "1",
    ]))
    .await;
    let t = token("alice", None);
    // The silent peer is a raw socket that sends its hello and never writes again
    // (a tokio-tungstenite client would answer the pings it reads late, into a socket the server
    // has closed: the reset can reach it before the close frame does).
    let mut silent = raw_ws(&s).await;
    let hello = json!({"type": "hello", "token": t}).to_string();
    silent
        .write_all(&frame(0x1, hello.as_bytes(), true))
        .await
        .unwrap();
    let mut live = s.client(&t).await;
    let reader = tokio::spawn(async move {
        // Reading answers pings; nothing but pings arrives.
        let read = async {
            loop {
                match live.ws.next().await {
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) => {}
                    other => return other,
                }
            }
        };
        let ended = tokio::time::timeout(Duration::from_secs(4), read).await;
        (ended.is_err(), live)
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (code, reason) = read_close(&mut silent).await;
    assert_eq!(code, 1001, "{reason}");
    assert!(reason.contains("ping timeout"), "{reason}");
    let (still_open, mut live) = reader.await.unwrap();
    assert!(still_open, "a peer that answers pings must be kept");
    live.expect_nothing_more().await;
    s.wait_for_log(|v| {
        v["event"] == "connection_closed"
            && v["close_code"] == 1001
            && v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("ping timeout"))
    })
    .await;
}

// ---------- tokens ----------

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

async fn hello_refused(s: &TestServer, token: &str) -> String {
    let mut c = s.connect_raw().await;
    c.send(json!({"type": "hello", "token": token})).await;
    let message = match c.next_frame().await {
        ServerFrame::Error(e) => e.message,
        other => panic!("expected an error, got {other:?}"),
    };
    match c.next_event().await {
        Event::Closed(4001, _) => message,
        other => panic!("expected close 4001, got {other:?}"),
    }
}

#[tokio::test]
async fn nbf_in_the_future_and_channels_null_are_refused_at_hello() {
    let s = TestServer::start().await;
    let early = sign(&json!({"sub": "a", "exp": now() + 7200, "nbf": now() + 3600}));
    assert!(hello_refused(&s, &early).await.contains("nbf"));
    let null = sign(&json!({"sub": "a", "exp": now() + 60, "channels": null}));
    assert!(hello_refused(&s, &null).await.contains("channels"));
    let (status, _) = s.get("/websocket/messages?since=0", Some(&null)).await;
    assert_eq!(status, 401);
    let valid = sign(&json!({"sub": "a", "exp": now() + 60, "nbf": now() - 1}));
    s.client(&valid).await;
}

#[tokio::test]
async fn a_connection_is_closed_4001_at_exp() {
    let s = TestServer::start().await;
    let mut c = s.client(&token_with("alice", None, 2, false)).await;
    c.subscribe("c", "r").await;
    let started = Instant::now();
    match c.next_event().await {
        Event::Closed(code, reason) => {
            assert_eq!(code, 4001);
            assert_eq!(reason, "token expired");
        }
        other => panic!("expected close 4001, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn an_auth_refresh_keeps_the_connection_and_its_cursor_past_exp() {
    let s = TestServer::start().await;
    let mut c = s
        .client(&token_with("alice", Some(&["c:*", "d:*"]), 2, false))
        .await;
    c.subscribe("c", "r").await;
    c.subscribe("d", "r").await;
    let mut want = Vec::new();
    for i in 0..3 {
        let r = s.publish("c", "r", json!(i)).await;
        want.push(r["sequence_number"].as_u64().unwrap());
    }
    // Fresh token for the same user, narrowed to c:*.
    c.send(json!({"type": "auth", "token": token_with("alice", Some(&["c:*"]), 3600, false)}))
        .await;
    let publisher = tokio::spawn({
        let http = s.http.clone();
        let url = s.url("/api/publish");
        async move {
            let mut seqs = Vec::new();
            for i in 3..30 {
                let body = json!({"channel": "c", "request_id": "r", "data": i});
                let r = seqcast_e2e::publish_over(&http, &url, &body).await;
                seqs.push(r["sequence_number"].as_u64().unwrap());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seqs
        }
    });
    let mut got = Vec::new();
    let mut auth_ok = None;
    let mut forbidden = None;
    while got.len() < 30 {
        match c.next_frame().await {
            ServerFrame::Message(m) => got.push(m.sequence_number),
            ServerFrame::AuthOk(ok) => auth_ok = Some(ok.exp),
            ServerFrame::Error(e) => forbidden = Some(e),
            other => panic!("unexpected {other:?}"),
        }
    }
    want.extend(publisher.await.unwrap());
    assert_eq!(got, want, "no gap, no duplicate across the refresh");
    assert!(auth_ok.unwrap() > now() as u64 + 3000);
    let e = forbidden.expect("d:r was narrowed away");
    assert_eq!(e.code.as_str(), "forbidden");
    assert!(e.message.contains("d:r"), "{}", e.message);
    // Past the first token's exp (2 s; the publisher ran ~3 s), still open; d:r no longer delivered.
    s.publish("d", "r", json!("not for alice")).await;
    c.expect_nothing_more().await;
    // A token for another user closes the connection.
    c.send(json!({"type": "auth", "token": token("mallory", None)}))
        .await;
    loop {
        match c.next_event().await {
            Event::Frame(ServerFrame::Error(e)) => assert_eq!(e.code.as_str(), "unauthorized"),
            Event::Closed(code, _) => {
                assert_eq!(code, 4001);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn schemes_are_case_insensitive_and_two_api_keys_are_both_valid() {
    let s = TestServer::start_with(Options::args(&["--api-key", "second-key"])).await;
    let body = json!({"channel": "c", "request_id": "r", "data": 1}).to_string();
    for auth in [
        format!("ApiKey {API_KEY}"),
        format!("apikey {API_KEY}"),
        "APIKEY second-key".to_string(),
        format!("bearer {}", token_with("svc", None, 60, true)),
    ] {
        let r = s
            .http
            .post(s.url("/api/publish"))
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{auth}");
    }
    let r = s
        .http
        .get(s.url("/websocket/messages?since=0"))
        .header("Authorization", format!("BEARER {}", token("a", None)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, _) = s
        .http
        .post(s.url("/api/publish"))
        .header("Authorization", "ApiKey not-a-key")
        .header("Content-Type", "application/json")
        .body(body.clone())
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 401);
}

#[tokio::test]
async fn rs256_tokens_from_a_pem_key_with_issuer_and_audience_checks() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let public = fixtures.join("test-rs256-public.pem");
    let s = TestServer::start_with(Options::args(&[
        "--jwt-public-key",
        public.to_str().unwrap(),
        "--jwt-issuer",
        "https://idp.example",
        "--jwt-audience",
        "seqcast",
    ]))
    .await;
    let private = std::fs::read(fixtures.join("test-rs256-private.pem")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&private).unwrap();
    let rs = |claims: Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &key,
        )
        .unwrap()
    };
    let good = rs(
        json!({"sub": "idp-user", "exp": now() + 60, "iss": "https://idp.example", "aud": "seqcast"}),
    );
    s.client(&good).await;
    let wrong_iss =
        rs(json!({"sub": "u", "exp": now() + 60, "iss": "https://other", "aud": "seqcast"}));
    assert!(hello_refused(&s, &wrong_iss).await.contains("iss"));
    let no_aud = rs(json!({"sub": "u", "exp": now() + 60, "iss": "https://idp.example"}));
    assert!(hello_refused(&s, &no_aud).await.contains("aud"));
    // An HS256 token must carry iss/aud too once they are required.
    let hs = sign(
        &json!({"sub": "u", "exp": now() + 60, "iss": "https://idp.example", "aud": "seqcast"}),
    );
    s.client(&hs).await;
}

// ---------- limits ----------

async fn upgrade_status(
    s: &TestServer,
    forwarded_for: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut req = format!("ws://{}/ws", s.addr).into_client_request().unwrap();
    if let Some(f) = forwarded_for {
        req.headers_mut()
            .insert("X-Forwarded-For", f.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => {
            // Keep it open for the caller's count.
            KEEP.lock().unwrap().push(Client { ws });
            (101, None, Value::Null)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = r
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            (r.status().as_u16(), retry, body)
        }
        Err(e) => panic!("{e}"),
    }
}

static KEEP: std::sync::Mutex<Vec<Client>> = std::sync::Mutex::new(Vec::new());

#[tokio::test]
async fn connection_caps_and_rates_answer_503_and_429_and_spare_other_clients() {
    let s = TestServer::start_with(Options::args(&[
        "--max-connections",
        "4",
        "--max-connections-per-ip",
        "2",
        "--trusted-proxies",
        "127.0.0.1",
    ]))
    .await;
    assert_eq!(upgrade_status(&s, Some("198.51.100.1")).await.0, 101);
    assert_eq!(upgrade_status(&s, Some("198.51.100.1")).await.0, 101);
    let (status, retry, body) = upgrade_status(&s, Some("198.51.100.1")).await;
    assert_eq!(status, 429);
    assert!(retry.is_some());
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    // Another client IP (named by the trusted proxy) is not affected.
    assert_eq!(upgrade_status(&s, Some("198.51.100.2")).await.0, 101);
    assert_eq!(upgrade_status(&s, Some("198.51.100.2")).await.0, 101);
    // The total is reached.
    let (status, _, body) = upgrade_status(&s, Some("198.51.100.3")).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "unavailable");
    KEEP.lock().unwrap().clear();
}

#[tokio::test]
async fn connection_rate_per_ip_answers_429() {
    let s = TestServer::start_with(Options::args(&["--connections-per-second-per-ip", "1"])).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(upgrade_status(&s, None).await);
    }
    assert_eq!(statuses[0].0, 101);
    let refused = statuses
        .iter()
        .find(|(st, _, _)| *st == 429)
        .expect("no 429");
    assert_eq!(refused.1.as_deref(), Some("1"));
    assert_eq!(refused.2["error"]["code"], "rate_limited");
}

#[tokio::test]
async fn publish_rate_per_key_answers_429_with_retry_after() {
    let s = TestServer::start_with(Options::args(&[
        "--publish-rate",
        "1",
        "--publish-burst",
        "2",
    ]))
    .await;
    let body = json!({"channel": "c", "request_id": "r", "data": 1});
    assert_eq!(s.publish_raw(&body).await.0, 200);
    assert_eq!(s.publish_raw(&body).await.0, 200);
    let r = s
        .http
        .post(s.url("/api/publish"))
        .header("Authorization", format!("ApiKey {API_KEY}"))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "rate_limited"
    );
    // A token publisher has its own budget.
    let r = s
        .http
        .post(s.url("/api/publish"))
        .header(
            "Authorization",
            format!("Bearer {}", token_with("svc", None, 60, true)),
        )
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

// ---------- faults ----------

#[tokio::test]
async fn a_deleted_database_is_noticed_publishes_503_and_readyz_503() {
    let s = TestServer::start().await;
    s.publish("c", "r", json!(1)).await;
    assert_eq!(s.get("/readyz", None).await.0, 200);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(s.data_dir.join(format!("seqcast.db{suffix}")));
    }
    // Noticed on the timer (every second) without any write…
    s.wait_for_log(|v| v["event"] == "database_lost").await;
    let (status, body) = s.get("/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("gone"), "{body}");
    // …and publishes are refused instead of going into the unlinked file.
    let (status, body) = s
        .publish_raw(&json!({"channel": "c", "request_id": "r", "data": 2}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
}

/// A writer thread that died (here by the test-only fault hook, as a bug would kill it) is not
/// hidden: publishes answer 503, `/readyz` 503 with the reason, and the server logs it once.
#[tokio::test]
async fn readyz_is_503_when_the_writer_thread_died() {
    let mut o = Options::default();
    o.env
        .push(("SEQCAST_TEST_FAULT".into(), "kill-writer-after=1".into()));
    let s = TestServer::start_with(o).await;
    s.publish("c", "r", json!(1)).await;
    assert_eq!(s.get("/readyz", None).await.0, 200);
    // The next group finds the writer dead.
    let (status, body) = s
        .publish_raw(&json!({"channel": "c", "request_id": "r", "data": 2}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    let (status, body) = s.get("/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reason"].as_str().unwrap().contains("writer"),
        "{body}"
    );
    s.wait_for_log(|v| v["event"] == "writer_stopped").await;
}

// ---------- CORS ----------

/// `--allowed-origins` drives CORS on the HTTP API: a preflight from an allowed origin is
/// answered with its grant, one from a foreign origin gets none, and actual requests carry
/// the header only for the allowed origin.
#[tokio::test]
async fn cors_preflight_answers_an_allowed_origin_and_not_a_foreign_one() {
    let s = TestServer::start_with(Options::args(&[
        "--allowed-origins",
        "https://app.example.com",
    ]))
    .await;
    let preflight = |origin: &'static str, path: &'static str, method: &'static str| {
        s.http
            .request(reqwest::Method::OPTIONS, s.url(path))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", method)
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
            .send()
    };
    for (path, method) in [
        ("/api/publish", "POST"),
        ("/websocket/messages?since=0", "GET"),
        ("/api/streams/c/r/messages", "GET"),
    ] {
        let r = preflight("https://app.example.com", path, method)
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        let h = r.headers();
        assert_eq!(
            h["access-control-allow-origin"], "https://app.example.com",
            "{path}"
        );
        let methods = h["access-control-allow-methods"].to_str().unwrap();
        assert!(methods.contains(method), "{path}: {methods}");
        let headers = h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_lowercase();
        assert!(headers.contains("authorization"), "{path}: {headers}");
        assert!(headers.contains("content-type"), "{path}: {headers}");

        let r = preflight("https://evil.example.net", path, method)
            .await
            .unwrap();
        assert!(
            r.headers().get("access-control-allow-origin").is_none(),
            "{path}: a foreign origin got a grant: {:?}",
            r.headers()
        );
    }
    // The actual request: the allowed origin can read the answer, a foreign one cannot.
    let publish = |origin: &'static str| {
        s.http
            .post(s.url("/api/publish"))
            .header("Origin", origin)
            .header("Authorization", format!("ApiKey {API_KEY}"))
            .header("Content-Type", "application/json")
            .body(json!({"channel": "c", "request_id": "r", "data": 1}).to_string())
            .send()
    };
    let r = publish("https://app.example.com").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let r = publish("https://evil.example.net").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // Without the setting, no CORS grant at all.
    let plain = TestServer::start().await;
    let r = plain
        .http
        .request(reqwest::Method::OPTIONS, plain.url("/api/publish"))
        .header("Origin", "https://app.example.com")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

// ---------- HTTP concurrency ----------

/// `--http-concurrency 1`: while one request is being handled (its body still arriving), the
/// next one waits for the slot instead of running, and runs as soon as the first is done.
#[tokio::test]
async fn http_concurrency_makes_requests_past_the_cap_wait_for_a_slot() {
    let s = TestServer::start_with(Options::args(&["--http-concurrency", "1"])).await;
    let body = json!({"channel": "c", "request_id": "r", "data": "held"}).to_string();
    let mut held = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: ApiKey {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    held.write_all(head.as_bytes()).await.unwrap();
    held.write_all(&body.as_bytes()[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The one slot is taken by the publish reading its body: /healthz queues behind it.
    let waiting = {
        let http = s.http.clone();
        let url = s.url("/healthz");
        tokio::spawn(async move {
            let started = Instant::now();
            let r = http.get(url).send().await.unwrap();
            (r.status().as_u16(), started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiting.is_finished(), "a request past the cap ran at once");
    held.write_all(&body.as_bytes()[5..]).await.unwrap();
    let (answer, _) = read_to_close(&mut held, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (status, waited) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the queued request never ran")
        .unwrap();
    assert_eq!(status, 200);
    assert!(waited >= Duration::from_millis(700), "{waited:?}");
}
