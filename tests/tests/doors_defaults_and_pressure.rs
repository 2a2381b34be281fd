//! Regression tests of the built server for: development mode only with no verifier and a
//! loopback listen address (and `/dev/token` for loopback peers only); control frames read under
//! back-pressure; the backlog log lines of seed 003 at `info`; resume by default after many
//! messages of other keys.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use seqcast_e2e::{Event, Options, TestServer, server_binary, token, token_with};
use seqcast_protocol::ServerFrame;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A server configured with an identity provider's public key and no `--jwt-secret` is not in
/// development mode: no generated secret, no development token, no `/dev/token`, HS256 tokens
/// refused; the provider's RS256 tokens work.
#[tokio::test]
async fn a_public_key_alone_turns_development_mode_off() {
    let public = fixtures().join("test-rs256-public.pem");
    let mut opts = Options::args(&["--jwt-public-key", public.to_str().unwrap()]);
    opts.dev_mode = true; // no --jwt-secret, no --api-key
    let s = TestServer::start_with(opts).await;
    let (status, body) = s.get("/dev/token", None).await;
    assert_eq!(
        status, 404,
        "/dev/token handed out a token with a public key configured: {body}"
    );
    assert!(
        !s.logs().iter().any(|v| v["event"] == "development_mode"),
        "the server announced development mode"
    );
    assert!(
        !s.data_dir.join("jwt-secret").exists(),
        "a development secret was generated although a verifier is configured"
    );
    // An HS256 token of any secret is refused: there is no secret.
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "x", "exp": now() + 60, "publish": true}),
        &jsonwebtoken::EncodingKey::from_secret(b"anything"),
    )
    .unwrap();
    let (status, body) = s.get("/websocket/messages?since=0", Some(&hs)).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("HS256"),
        "{body}"
    );
    // The provider's tokens work.
    let private = std::fs::read(fixtures().join("test-rs256-private.pem")).unwrap();
    let rs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &json!({"sub": "idp-user", "exp": now() + 60}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(&private).unwrap(),
    )
    .unwrap();
    let (status, body) = s.get("/websocket/messages?since=0", Some(&rs)).await;
    assert_eq!(status, 200, "{body}");
}

/// With no verifier, a listen address that is not loopback refuses to start, before it binds,
/// and says what to configure (exit status 1, like every settings error).
#[tokio::test]
async fn a_non_loopback_listen_without_a_verifier_refuses_to_start() {
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(server_binary())
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(dir.path())
            .env_remove("SEQCAST_JWT_SECRET")
            .env_remove("SEQCAST_JWT_PUBLIC_KEY")
            .env_remove("SEQCAST_LISTEN")
            .env_remove("SEQCAST_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let status = match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => {
                let _ = child.kill().await;
                let mut out = String::new();
                let _ = child.stdout.take().unwrap().read_to_string(&mut out).await;
                panic!(
                    "--listen {listen} with no verifier started (development mode open to the network):\n{out}"
                );
            }
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .await
            .unwrap();
        assert_eq!(status.code(), Some(1), "{listen}: {status}: {err}");
        for needle in ["--jwt-secret", "--jwt-public-key", "loopback"] {
            assert!(
                err.contains(needle),
                "{listen}: error lacks {needle:?}: {err}"
            );
        }
        assert!(
            !dir.path().join("jwt-secret").exists(),
            "{listen}: a development secret was made before refusing"
        );
    }
}

/// `/dev/token` answers a loopback peer, and refuses a request a local proxy forwarded for
/// someone else (`X-Forwarded-For` / `Forwarded`): development mode is for this machine only.
#[tokio::test]
async fn dev_token_answers_loopback_peers_only() {
    let mut opts = Options::args(&["--storage", "memory"]);
    opts.dev_mode = true;
    let s = TestServer::start_with(opts).await;
    let (status, body) = s.get("/dev/token", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["token"].as_str().is_some());
    for (name, value) in [
        ("X-Forwarded-For", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.9"),
    ] {
        let r = s
            .http
            .get(s.url("/dev/token"))
            .header(name, value)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 403, "{name}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("loopback")
        );
    }
}

/// A consumer that stops reading (its queue passes the high-water mark, the server's writes
/// block) and sends `auth` with a fresh token before its first token expires is not closed
/// with 4001: it gets `auth_ok` and every message, in order.
#[tokio::test]
async fn a_slow_consumer_that_refreshed_in_time_is_not_closed_4001() {
    let s = TestServer::start_with(Options::args(&["--send-queue", "16"])).await;
    // exp 3 s from now (whole seconds: 2–3 s of life).
    let first = token_with("alice", None, 3, false);
    let mut c = s.client_with_recv_buffer(&first, 8 * 1024).await;
    c.subscribe("slow", "r").await;
    // ~1 KiB per message, 3,000 of them: far more than the socket buffers hold.
    let pad = "x".repeat(1000);
    let messages: Vec<Value> = (0..3000)
        .map(|i| json!({"channel": "slow", "request_id": "r", "data": {"i": i, "pad": pad}}))
        .collect();
    let mut want = Vec::new();
    for chunk in messages.chunks(500) {
        for r in s.publish_batch(chunk).await {
            want.push(r["sequence_number"].as_u64().unwrap());
        }
    }
    // Not reading; the fresh token goes out well before the first one expires.
    c.send(json!({"type": "auth", "token": token("alice", None)}))
        .await;
    let sent_auth = Instant::now();
    // Stay stalled until the first token is past its exp.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(sent_auth.elapsed() >= Duration::from_secs(4));
    let mut got = Vec::new();
    let mut auth_ok = false;
    while got.len() < want.len() {
        match c.next_event().await {
            Event::Frame(ServerFrame::Message(m)) => got.push(m.sequence_number),
            Event::Frame(ServerFrame::AuthOk(_)) => auth_ok = true,
            Event::Frame(other) => panic!("unexpected {other:?}"),
            ended => panic!(
                "{ended:?} after {} of {} messages; auth_ok seen: {auth_ok}; server: {:?}",
                got.len(),
                want.len(),
                s.logs()
                    .into_iter()
                    .filter(|v| v["event"] == "token_expired" || v["event"] == "connection_closed")
                    .collect::<Vec<_>>()
            ),
        }
    }
    assert_eq!(got, want, "every message once, in order");
    c.expect_nothing_more().await;
    assert!(auth_ok, "auth_ok arrived");
    assert!(
        !s.logs().iter().any(|v| v["event"] == "token_expired"),
        "the server logged token_expired"
    );
    assert!(
        s.metric("seqcast_subscribers_lagged_total").await >= 1,
        "the consumer never left live delivery: back-pressure was not exercised"
    );
}

/// Seed 003's log story under the default log level (`info`): one `backlog_created` per new key
/// that nobody follows, and `backlog_drained` when a late subscriber gets it, with the seed's
/// fields; `backlog_enqueued` (one per message) stays at debug.
#[tokio::test]
async fn backlog_created_and_drained_are_logged_at_info() {
    let s = TestServer::start_with(Options {
        env: vec![("RUST_LOG".into(), "info".into())],
        ..Options::default()
    })
    .await;
    for i in 0..3 {
        s.publish("search", "req_B", json!(i)).await;
    }
    s.publish("search", "req_C", json!("other")).await;
    let mut c = s.client(&token("alice", None)).await;
    let ack = c.subscribe("search", "req_B").await;
    assert_eq!(ack.drained, 3);
    let drained = s.wait_for_log(|v| v["event"] == "backlog_drained").await;
    let created: Vec<Value> = s
        .logs()
        .into_iter()
        .filter(|v| v["event"] == "backlog_created")
        .collect();
    assert_eq!(
        created.len(),
        2,
        "one backlog_created per new key, at the default level: {created:?}"
    );
    let b = created
        .iter()
        .find(|v| v["subscription_key"] == "search:req_B")
        .expect("backlog_created for search:req_B");
    assert_eq!(b["level"], "INFO");
    assert_eq!(b["channel"], "search");
    assert_eq!(b["request_id"], "req_B");
    assert_eq!(drained["level"], "INFO");
    assert_eq!(drained["subscription_key"], "search:req_B");
    assert_eq!(drained["channel"], "search");
    assert_eq!(drained["drained_request_id"], "req_B");
    assert_eq!(drained["count"], 3);
    let opened = s
        .logs()
        .into_iter()
        .find(|v| v["event"] == "connection_opened")
        .unwrap();
    assert_eq!(drained["client_id"], opened["client_id"]);
    assert!(
        !s.logs().iter().any(|v| v["event"] == "backlog_enqueued"),
        "backlog_enqueued (one line per message) is debug"
    );
}

/// With default settings, a client that missed 1,000 messages of other keys (and 3 of its own)
/// resumes with `recovered: true` and gets exactly its 3: the window is time-only by default.
#[tokio::test]
async fn resume_after_a_thousand_messages_of_other_keys_works_by_default() {
    let s = TestServer::start().await;
    let mut c = s.client(&token("alice", None)).await;
    let ack = c.subscribe("mine", "r").await;
    let (since, epoch) = (ack.head, ack.epoch.clone());
    c.close().await;
    let mut batch = Vec::new();
    for i in 0..1003 {
        batch.push(if i == 100 || i == 600 || i == 1002 {
            json!({"channel": "mine", "request_id": "r", "data": i})
        } else {
            json!({"channel": "other", "request_id": format!("r{}", i % 50), "data": i})
        });
    }
    let mut mine = Vec::new();
    for chunk in batch.chunks(250) {
        for (m, r) in chunk.iter().zip(s.publish_batch(chunk).await) {
            if m["channel"] == "mine" {
                mine.push(r["sequence_number"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(mine.len(), 3);
    let mut c = s.client(&token("alice", None)).await;
    let ack = c.subscribe_since("mine", "r", since, Some(&epoch)).await;
    assert_eq!(
        ack.recovered,
        Some(true),
        "1,003 messages later the default window no longer reaches back: {ack:?}"
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(c.expect_message().await.sequence_number);
    }
    assert_eq!(got, mine, "exactly the missed messages");
    c.expect_nothing_more().await;
    // HTTP recovery says the same.
    let (status, body) = s
        .get(
            &format!("/websocket/messages?since={since}&channel=mine&request_id=r&epoch={epoch}"),
            Some(&token("alice", None)),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["complete"], true, "{body}");
    let seqs: Vec<u64> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, mine);
}

/// Under back-pressure the frames the server keeps for later keep their order with the control
/// frames behind them: `subscribe k1`, `unsubscribe k1`, `subscribe k2`, `ping` sent by a stalled
/// consumer end with k1 not followed, k2 followed, and the replies in the order sent.
#[tokio::test]
async fn frames_kept_under_back_pressure_keep_their_order() {
    let s = TestServer::start_with(Options::args(&["--send-queue", "16"])).await;
    let mut c = s
        .client_with_recv_buffer(&token("alice", None), 8 * 1024)
        .await;
    c.subscribe("slow", "r").await;
    let pad = "x".repeat(1000);
    let messages: Vec<Value> = (0..2000)
        .map(|i| json!({"channel": "slow", "request_id": "r", "data": {"i": i, "pad": pad}}))
        .collect();
    let mut want = Vec::new();
    for chunk in messages.chunks(500) {
        for r in s.publish_batch(chunk).await {
            want.push(r["sequence_number"].as_u64().unwrap());
        }
    }
    for frame in [
        json!({"type": "subscribe", "channel": "k1", "request_id": "r"}),
        json!({"type": "unsubscribe", "channel": "k1", "request_id": "r"}),
        json!({"type": "subscribe", "channel": "k2", "request_id": "r"}),
        json!({"type": "ping"}),
    ] {
        c.send(frame).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut got = Vec::new();
    let mut replies = Vec::new();
    while got.len() < want.len() || replies.len() < 3 {
        match c.next_frame().await {
            ServerFrame::Message(m) => got.push(m.sequence_number),
            ServerFrame::SubAck(a) => replies.push(a.subscription_key.to_string()),
            ServerFrame::Pong => replies.push("pong".into()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, want, "every message once, in order");
    assert_eq!(
        replies,
        ["k1:r", "k2:r", "pong"],
        "replies in the order sent"
    );
    s.publish("k1", "r", json!("not followed")).await;
    let k2 = s.publish("k2", "r", json!("followed")).await;
    let m = c.expect_message().await;
    assert_eq!(m.sequence_number, k2["sequence_number"].as_u64().unwrap());
    c.expect_nothing_more().await;
    assert!(
        s.metric("seqcast_subscribers_lagged_total").await >= 1,
        "the consumer never left live delivery: back-pressure was not exercised"
    );
}

/// `seqcast token` for a server that verifies with a public key only refuses to mint an HS256
/// token nobody would accept (with a development secret it would have made one up).
#[tokio::test]
async fn token_subcommand_refuses_without_a_secret_when_a_public_key_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("seqcast.toml");
    let public = fixtures().join("test-rs256-public.pem");
    std::fs::write(
        &cfg,
        format!("jwt_public_key = {:?}\n", public.to_str().unwrap()),
    )
    .unwrap();
    let out = std::process::Command::new(server_binary())
        .args(["token", "--sub", "alice", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("SEQCAST_JWT_SECRET")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--jwt-public-key"), "{err}");
    assert!(!dir.path().join("jwt-secret").exists());
}

/// `seqcast --help` describes PostgreSQL as the storage it is, and the recovery count bound as
/// optional.
#[test]
fn help_says_postgres_is_available_and_the_count_bound_is_optional() {
    let out = std::process::Command::new(server_binary())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    assert!(!help.contains("not available"), "{help}");
    assert!(help.contains("postgres: PostgreSQL"), "{help}");
    assert!(help.contains("absent: no count bound"), "{help}");
}
