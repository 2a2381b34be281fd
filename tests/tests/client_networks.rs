//! The Rust client on a real network's terms, against the real server binary: tokens that expire
//! every few seconds are replaced in band (`auth`) without dropping the connection; a refused
//! refresh ends the connection at `exp` and the client comes back with a fresh token; and a TCP
//! proxy that resets the connection at random (seeded) moments while a publisher writes to
//! several keys costs nothing — every message once per key, in order, and `recovered: false`
//! only where the server's history truly no longer reaches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use client_support::{BACKOFF, counting_provider, index, spawn_publisher};
use rand::{Rng as _, SeedableRng as _};
use seqcast_client::{Client, Event, Gap, Message, Subscription};
use seqcast_e2e::fault_proxy::FaultProxy;
use seqcast_e2e::{Options, TestServer, token_with};
use serde_json::json;

/// Publishes `{"i": i}` for i in 0..n to `channel:request_id`, one every `every`, so the run
/// spans the tokens' expiries.
fn paced_publisher(
    s: &TestServer,
    request_id: &'static str,
    n: u64,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let (http, url) = (s.http.clone(), s.url("/api/publish"));
    tokio::spawn(async move {
        for i in 0..n {
            let r = http
                .post(&url)
                .header("Authorization", format!("ApiKey {}", seqcast_e2e::API_KEY))
                .json(&json!({"channel": "tok", "request_id": request_id,
                              "message_id": format!("m{i}"), "data": {"i": i}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            tokio::time::sleep(every).await;
        }
    })
}

/// Every message of `sub` until `n` arrived (within `wait`), with the other events.
async fn collect(sub: &mut Subscription, n: usize, wait: Duration) -> (Vec<Message>, Vec<Event>) {
    let deadline = tokio::time::Instant::now() + wait;
    let (mut messages, mut others) = (Vec::new(), Vec::new());
    while messages.len() < n {
        match tokio::time::timeout_at(deadline, sub.recv()).await {
            Ok(Some(Event::Message(m))) => messages.push(m),
            Ok(Some(other)) => others.push(other),
            Ok(None) => panic!("{} ended", sub.key()),
            Err(_) => panic!(
                "{}: {} of {n} messages within {wait:?}; events {others:?}",
                sub.key(),
                messages.len()
            ),
        }
    }
    (messages, others)
}

fn indexes(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(index).collect()
}

/// Subscribes `client` to `tok:k` while `n` messages are published one every 100 ms; asserts
/// each arrived once, in order, and returns the subscription with its other events.
async fn follow_paced(s: &TestServer, client: &Client, n: u64) -> (Subscription, Vec<Event>) {
    let mut sub = client.subscribe("tok", "k").await.unwrap();
    let publisher = paced_publisher(s, "k", n, Duration::from_millis(100));
    let (messages, others) = collect(&mut sub, n as usize, Duration::from_secs(30)).await;
    publisher.await.unwrap();
    assert_eq!(indexes(&messages), (0..n).collect::<Vec<_>>());
    (sub, others)
}

/// Tokens live 3 s; the connection stays up across several expiries because the client sends
/// each next token in an `auth` frame before the current one runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_outlives_its_tokens_by_refreshing_them_in_band() {
    let s = TestServer::start_with(Options::default()).await;
    let (calls, provider) = counting_provider(|_| Ok(token_with("alice", None, 3, false)));
    let client = client_support::connect_with(format!("ws://{}/ws", s.addr), provider).await;
    let (_sub, others) = follow_paced(&s, &client, 70).await;
    assert_eq!(others.len(), 1, "only the first Subscribed: {others:?}");
    assert_eq!(client.connection_sequence(), 1, "never reconnected");
    assert!(client.state().is_connected());
    let asked = calls.load(Ordering::SeqCst);
    assert!(asked >= 4, "the provider was asked {asked} times in ~7 s");
    let refreshed = s
        .logs()
        .iter()
        .filter(|l| l["event"] == "auth_refreshed")
        .count();
    assert!(refreshed >= 3, "{refreshed} auth_refreshed");
    assert!(!s.logs().iter().any(|l| l["event"] == "token_expired"));
    client.close().await;
}

/// The second token is one the server refuses: the connection keeps the first until its `exp`,
/// is closed with 4001 then, and the client reconnects with the next token and resumes — no
/// message lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_ends_at_exp_and_the_client_comes_back_with_a_fresh_token() {
    let s = TestServer::start_with(Options::default()).await;
    let (calls, provider) = counting_provider(|n| {
        Ok(if n == 2 {
            // Signed with another secret: refused by the server.
            let claims = json!({"sub": "alice", "exp": 4_000_000_000u64});
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(b"not the server's secret"),
            )
            .unwrap()
        } else {
            token_with("alice", None, if n == 1 { 3 } else { 3600 }, false)
        })
    });
    let client = client_support::connect_with(format!("ws://{}/ws", s.addr), provider).await;
    let (_sub, others) = follow_paced(&s, &client, 50).await;
    let subscribed: Vec<_> = others
        .iter()
        .filter_map(|e| match e {
            Event::Subscribed(s) => Some(s.connection_sequence),
            _ => None,
        })
        .collect();
    assert_eq!(subscribed, vec![1, 2], "{others:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(
        s.logs()
            .iter()
            .any(|l| l["event"] == "auth_refresh_rejected")
    );
    assert!(s.logs().iter().any(|l| l["event"] == "token_expired"));
    client.close().await;
}

/// The publisher refreshes the same way: 3-second publishing tokens, ~7 s of publishing over one
/// connection, every publish answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_outlives_its_tokens_too() {
    let s = TestServer::start_with(Options::default()).await;
    let publisher = seqcast_client::Publisher::builder(format!("ws://{}/ws", s.addr))
        .backoff(BACKOFF.0, BACKOFF.1)
        .connect(|| async { Ok::<_, std::io::Error>(token_with("pub", None, 3, true)) })
        .await
        .unwrap();
    let mut last = 0;
    for i in 0..70u64 {
        let ack = publisher
            .publish(seqcast_client::Outgoing::json("tok", "p", &json!({"i": i})).unwrap())
            .await
            .unwrap();
        assert!(ack.sequence_number > last);
        last = ack.sequence_number;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let opened = s
        .logs()
        .iter()
        .filter(|l| l["event"] == "connection_opened")
        .count();
    assert_eq!(opened, 1, "one connection for the whole run");
    assert!(!s.logs().iter().any(|l| l["event"] == "token_expired"));
    assert!(
        s.logs()
            .iter()
            .filter(|l| l["event"] == "auth_refreshed")
            .count()
            >= 3
    );
}

/// The token of the reconnect no longer allows one of the keys: that key's verdict in the
/// `resume_ack` refuses it, its stream yields `Event::Refused` and ends; the other key resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_refused_on_resume_ends_its_stream_and_the_others_go_on() {
    let s = TestServer::start_with(Options::default()).await;
    let proxy = FaultProxy::start(s.addr).await;
    let (_calls, provider) = counting_provider(|n| {
        Ok(if n == 1 {
            token_with("alice", None, 3600, false)
        } else {
            token_with("alice", Some(&["kept"]), 3600, false)
        })
    });
    let client = client_support::connect_with(format!("ws://{}/ws", proxy.addr), provider).await;
    let mut kept = client.subscribe("kept", "k").await.unwrap();
    let mut lost = client.subscribe("lost", "k").await.unwrap();
    for sub in [&mut kept, &mut lost] {
        assert!(matches!(
            client_support::next_event(sub).await,
            Event::Subscribed(_)
        ));
    }
    s.publish("kept", "k", json!({"i": 0})).await;
    s.publish("lost", "k", json!({"i": 0})).await;
    assert_eq!(index(&client_support::expect_message(&mut kept).await), 0);
    assert_eq!(index(&client_support::expect_message(&mut lost).await), 0);

    proxy.reset_all();
    s.publish("kept", "k", json!({"i": 1})).await;
    let resumed = client_support::expect_subscribed(&mut kept).await;
    assert_eq!(resumed.connection_sequence, 2);
    assert_eq!(resumed.recovered, Some(true));
    assert_eq!(index(&client_support::expect_message(&mut kept).await), 1);
    match client_support::next_event(&mut lost).await {
        Event::Refused(r) => {
            assert_eq!(r.code, seqcast_client::ErrorCode::Forbidden, "{r:?}");
            assert_eq!(r.key.to_string(), "lost:k");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(5), lost.recv())
            .await
            .unwrap()
            .is_none(),
        "the refused key's stream ends"
    );
    let line = s
        .logs()
        .into_iter()
        .find(|l| l["event"] == "resume")
        .expect("a resume frame");
    assert_eq!(
        (line["resumed"].as_u64(), line["refused"].as_u64()),
        (Some(1), Some(1))
    );
    client.close().await;
}

const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];
const PER_KEY: u64 = 120;

/// What one key got through the cuts.
struct KeyRun {
    messages: Vec<Message>,
    gaps: Vec<Gap>,
    /// The number the server gave `{"i": i}`, by i.
    published: Vec<u64>,
}

/// A client through a proxy that resets its connection at random moments while a publisher
/// writes `PER_KEY` messages to each of `KEYS`; returns per key what it yielded and the gaps,
/// and how many cuts were made.
async fn through_random_cuts(s: &TestServer, seed: u64) -> (BTreeMap<&'static str, KeyRun>, u32) {
    let proxy = FaultProxy::start(s.addr).await;
    let client = client_support::connect_with(
        format!("ws://{}/ws", proxy.addr),
        seqcast_client::fixed_token(token_with("alice", None, 3600, false)),
    )
    .await;
    let mut subs = Vec::new();
    for key in KEYS {
        subs.push((key, client.subscribe("net", key).await.unwrap()));
    }
    let publishers: Vec<_> = KEYS
        .iter()
        .map(|key| spawn_publisher(s.url("/api/publish"), "net", key, PER_KEY))
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let cutter = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut random = rand::rngs::StdRng::seed_from_u64(seed);
            let mut cuts = 0u32;
            while !done.load(Ordering::SeqCst) && cuts < 40 {
                tokio::time::sleep(Duration::from_millis(random.random_range(10..150))).await;
                proxy.reset_all();
                cuts += 1;
            }
            (cuts, proxy)
        })
    };
    let mut published = Vec::new();
    for p in publishers {
        published.push(p.await.unwrap());
    }
    done.store(true, Ordering::SeqCst);
    let (cuts, _proxy) = cutter.await.unwrap();
    let mut out = BTreeMap::new();
    for ((key, mut sub), published) in subs.into_iter().zip(published) {
        // Each key ends with message PER_KEY - 1; a gap may take some before it away.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let (mut messages, mut gaps) = (Vec::<Message>::new(), Vec::new());
        while messages.last().is_none_or(|m| index(m) != PER_KEY - 1) {
            match tokio::time::timeout_at(deadline, sub.recv()).await {
                Ok(Some(Event::Message(m))) => messages.push(m),
                Ok(Some(Event::Gap(g))) => gaps.push(g),
                Ok(Some(Event::Subscribed(_))) => {}
                Ok(Some(Event::Refused(r))) => panic!("seed {seed}: {r:?}"),
                Ok(None) => panic!("{key} ended"),
                Err(_) => panic!(
                    "seed {seed}: {key} got {} messages, last {:?}, gaps {gaps:?}",
                    messages.len(),
                    messages.last().map(index)
                ),
            }
        }
        out.insert(
            key,
            KeyRun {
                messages,
                gaps,
                published,
            },
        );
    }
    assert!(
        client.connection_sequence() >= 3,
        "seed {seed}: {cuts} cuts, only {} connections",
        client.connection_sequence()
    );
    // The reconnects resumed the keys together, in `resume` frames the server took whole.
    let resumes: Vec<_> = s
        .logs()
        .into_iter()
        .filter(|l| l["event"] == "resume")
        .collect();
    assert!(!resumes.is_empty(), "seed {seed}: no resume frame");
    assert!(
        resumes.iter().all(|l| l["refused"] == 0),
        "seed {seed}: {resumes:?}"
    );
    client.close().await;
    (out, cuts)
}

fn seed() -> u64 {
    let seed = std::env::var("SEQCAST_CUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("SEQCAST_CUT_SEED={seed}");
    seed
}

/// Nothing is pruned: every message exactly once per key, in order, and no gap at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_connection_cuts_lose_and_repeat_nothing() {
    let s = TestServer::start_with(Options::default()).await;
    let seed = seed();
    let (per_key, cuts) = through_random_cuts(&s, seed).await;
    for (key, KeyRun { messages, gaps, .. }) in &per_key {
        assert_eq!(
            indexes(messages),
            (0..PER_KEY).collect::<Vec<_>>(),
            "seed {seed}, key {key}"
        );
        assert!(gaps.is_empty(), "seed {seed}, key {key}: {gaps:?}");
    }
    eprintln!(
        "{cuts} cuts, {} keys × {PER_KEY} messages: all once, in order",
        KEYS.len()
    );
}

/// A recovery window of 30 messages: resumes that fall behind it are told `recovered: false`.
/// Every gap is real (the server's history starts past `since + 1`), and every message the
/// client did not get lies inside one of its key's gaps; nothing twice, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cuts_with_a_short_window_report_exactly_the_real_gaps() {
    let s = TestServer::start_with(Options::args(&["--recovery-max-messages", "30"])).await;
    let seed = seed();
    let (per_key, cuts) = through_random_cuts(&s, seed).await;
    let mut gaps_seen = 0;
    for (key, run) in &per_key {
        let numbers: Vec<u64> = run.messages.iter().map(|m| m.sequence_number).collect();
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "seed {seed}, key {key}: out of order or twice"
        );
        for g in &run.gaps {
            let (since, oldest) = (g.since.unwrap(), g.oldest_sequence.unwrap());
            assert!(
                oldest > since + 1,
                "seed {seed}, key {key}: a gap that is none: {g:?}"
            );
        }
        gaps_seen += run.gaps.len();
        // What the client did not get lies inside one of the key's gaps.
        for (i, n) in run.published.iter().enumerate() {
            if numbers.contains(n) {
                continue;
            }
            assert!(
                run.gaps
                    .iter()
                    .any(|g| g.since.unwrap() < *n && *n < g.oldest_sequence.unwrap()),
                "seed {seed}, key {key}: message {i} (#{n}) missed outside every gap {:?}",
                run.gaps
            );
        }
    }
    eprintln!("{cuts} cuts, {gaps_seen} gaps reported, each real");
}
