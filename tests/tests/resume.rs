//! `resume`: many keys in one frame, each from its own `since`, answered by one `resume_ack`
//! (one verdict per key, in the order asked) and then the messages of every resumed key in
//! global sequence order from one merged read of the log, then live — against the real server
//! binary (SQLite) with a real WebSocket client. A bad entry, a forbidden key and keys over
//! `--max-subscriptions` are refused alone; the differential test holds a `resume` to what
//! separate `subscribe`s with the same `since` deliver.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use seqcast_e2e::{Client, Event, Options, TestServer, token};
use seqcast_protocol::{ErrorCode, ResumeAck, ResumeResult, ServerFrame, SubscriptionKey};
use serde_json::{Value, json};

fn key(s: &str) -> SubscriptionKey {
    SubscriptionKey::parse(s).unwrap()
}

/// Send a `resume` of `entries` and return its `resume_ack` (the next frame).
async fn resume(c: &mut Client, entries: Value, epoch: Option<&str>) -> ResumeAck {
    let mut frame = json!({"type": "resume", "subscriptions": entries});
    if let Some(e) = epoch {
        frame["epoch"] = json!(e);
    }
    c.send(frame).await;
    match c.next_frame().await {
        ServerFrame::ResumeAck(a) => a,
        other => panic!("expected resume_ack, got {other:?}"),
    }
}

/// Messages until `done` says enough arrived; every one's number, in arrival order, with its key.
async fn messages_until(
    c: &mut Client,
    mut done: impl FnMut(&[(SubscriptionKey, u64)]) -> bool,
) -> Vec<(SubscriptionKey, u64)> {
    let mut got = Vec::new();
    while !done(&got) {
        match c.next_event_within(Duration::from_secs(10)).await {
            Some(Event::Frame(ServerFrame::Message(m))) => got.push((m.key(), m.sequence_number)),
            other => panic!("after {} messages: {other:?}", got.len()),
        }
    }
    got
}

/// Publish `keys[i]` for each i, in batches; returns each message's number.
async fn publish_all(s: &TestServer, keys: &[&str]) -> Vec<u64> {
    let mut numbers = Vec::new();
    for chunk in keys.chunks(500) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|k| {
                let k = key(k);
                json!({"channel": k.channel().as_str(), "request_id": k.request_id().as_str(), "data": {"k": k.to_string()}})
            })
            .collect();
        for r in s.publish_batch(&batch).await {
            numbers.push(r["sequence_number"].as_u64().unwrap());
        }
    }
    numbers
}

/// How many backlog messages of the key follow its verdict.
fn drained(r: &ResumeResult) -> u64 {
    match r {
        ResumeResult::Resumed { drained, .. } => *drained,
        other => panic!("refused: {other:?}"),
    }
}

fn resumed(r: &ResumeResult) -> (bool, Option<u64>) {
    match r {
        ResumeResult::Resumed {
            recovered,
            oldest_sequence,
            ..
        } => (*recovered, *oldest_sequence),
        other => panic!("refused: {other:?}"),
    }
}

/// Three keys resumed from very different `since` (one far behind the small cache, one in it,
/// one at the head) while a publisher keeps publishing: each key gets exactly its messages
/// after its `since`, and the connection's messages come in global order — through the merged
/// log read, the merged join from the cache and live delivery.
#[tokio::test]
async fn keys_resume_together_in_global_order_while_publishes_run() {
    let s = TestServer::start_with(Options::args(&["--cache-bytes", "16384"])).await;
    let owners: Vec<&str> = (0..1_200)
        .map(|i| ["a:r", "b:r", "c:r", "noise:r"][i % 7 % 4])
        .collect();
    let numbers = publish_all(&s, &owners).await;
    let (head, _, epoch) = s.log_bounds().await;
    let since = [("a:r", 10u64), ("b:r", 700), ("c:r", head - 3)];
    let mut c = s.client(&token("alice", None)).await;
    let entries: Vec<Value> = since
        .iter()
        .map(|(k, s)| {
            let k = key(k);
            json!({"channel": k.channel().as_str(), "request_id": k.request_id().as_str(), "since": s})
        })
        .collect();
    // Publishes run while the resume is served.
    let publisher = {
        let url = s.url("/api/publish");
        let http = s.http.clone();
        tokio::spawn(async move {
            let mut numbers = Vec::new();
            for i in 0..150 {
                let k = ["a", "b", "c", "noise"][i % 4];
                let body = json!({"channel": k, "request_id": "r", "data": i});
                let r = seqcast_e2e::publish_over(&http, &url, &body).await;
                numbers.push((format!("{k}:r"), r["sequence_number"].as_u64().unwrap()));
            }
            numbers
        })
    };
    let ack = resume(&mut c, json!(entries), Some(&epoch)).await;
    assert_eq!(ack.results.len(), 3);
    for (r, (k, _)) in ack.results.iter().zip(since) {
        assert_eq!(r.subscription_key(), Some(&key(k)));
        assert_eq!(resumed(r), (true, None), "{k}");
    }
    let later = publisher.await.unwrap();
    let mut expected: HashMap<SubscriptionKey, Vec<u64>> = HashMap::new();
    for (k, n) in owners.iter().zip(&numbers) {
        expected.entry(key(k)).or_default().push(*n);
    }
    for (k, n) in &later {
        expected.entry(key(k)).or_default().push(*n);
    }
    let want: HashMap<SubscriptionKey, Vec<u64>> = since
        .iter()
        .map(|&(k, s)| {
            let all = &expected[&key(k)];
            (key(k), all.iter().copied().filter(|&n| n > s).collect())
        })
        .collect();
    let total: usize = want.values().map(Vec::len).sum();
    let got = messages_until(&mut c, |got| got.len() >= total).await;
    c.expect_nothing_more().await;
    let numbers: Vec<u64> = got.iter().map(|&(_, n)| n).collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "not in global order: {numbers:?}"
    );
    for (k, want) in &want {
        let per_key: Vec<u64> = got
            .iter()
            .filter(|(g, _)| g == k)
            .map(|&(_, n)| n)
            .collect();
        assert_eq!(&per_key, want, "{k}");
    }
    let line = s.wait_for_log(|l| l["event"] == "resume").await;
    assert_eq!(
        (line["resumed"].as_u64(), line["refused"].as_u64()),
        (Some(3), Some(0))
    );
    // The cache is small: the merged catch-up read the log.
    assert!(s.metric("seqcast_catchup_log_pages_total").await > 0);
}

/// A key whose `since` is behind the recovery window is told `recovered: false` with
/// `oldest_sequence` and gets what the window holds; a `since` from another epoch is told the
/// same for every key, which then starts like a late subscriber (its backlog).
#[tokio::test]
async fn behind_the_window_or_another_epoch_is_not_recovered() {
    let s = TestServer::start_with(Options::args(&["--recovery-max-messages", "5"])).await;
    let numbers = publish_all(&s, &["a:r"; 20]).await;
    let b = publish_all(&s, &["b:r"; 2]).await;
    let (head, oldest, epoch) = s.log_bounds().await;
    assert_eq!((head, oldest), (22, 18));
    let mut c = s.client(&token("alice", None)).await;
    let ack = resume(
        &mut c,
        json!([
            {"channel": "a", "request_id": "r", "since": 2},
            {"channel": "b", "request_id": "r", "since": 20},
        ]),
        Some(&epoch),
    )
    .await;
    assert_eq!(resumed(&ack.results[0]), (false, Some(18)));
    assert_eq!(resumed(&ack.results[1]), (true, None));
    assert!(
        ack.results.iter().all(|r| drained(r) == 0),
        "keys resumed after their since have no backlog: {ack:?}"
    );
    assert_eq!((ack.head, ack.epoch.as_str()), (22, epoch.as_str()));
    let got = messages_until(&mut c, |g| g.len() >= 5).await;
    assert_eq!(
        got,
        [
            (key("a:r"), numbers[17]),
            (key("a:r"), numbers[18]),
            (key("a:r"), numbers[19]),
            (key("b:r"), b[0]),
            (key("b:r"), b[1]),
        ]
    );
    c.expect_nothing_more().await;

    let mut c = s.client(&token("alice", None)).await;
    let ack = resume(
        &mut c,
        json!([{"channel": "a", "request_id": "r", "since": 21}, {"channel": "b", "request_id": "r", "since": 0}]),
        Some("another-history"),
    )
    .await;
    for r in &ack.results {
        assert_eq!(resumed(r), (false, Some(18)), "{r:?}");
    }
    // Like late subscribers: each key's backlog (the default bound keeps all of these), and
    // each verdict tells how many of its key's messages that is.
    let got = messages_until(&mut c, |g| g.len() >= 22).await;
    assert!(got.windows(2).all(|w| w[0].1 < w[1].1));
    c.expect_nothing_more().await;
    for r in &ack.results {
        let k = r.subscription_key().unwrap();
        let backlog = got.iter().filter(|(g, n)| g == k && *n <= ack.head).count();
        assert_eq!(drained(r), backlog as u64, "{k}");
    }
    assert_eq!(ack.results.iter().map(drained).collect::<Vec<_>>(), [20, 2]);
}

/// One frame: a good key, a bad name, a forbidden key, another good key, a bad `since`, a key
/// already subscribed, and keys past `--max-subscriptions`: each refused alone, in its place,
/// while the good ones resume (and nothing of the refused ones arrives).
#[tokio::test]
async fn bad_forbidden_and_excess_keys_are_refused_alone() {
    let s = TestServer::start_with(Options::args(&["--max-subscriptions", "3"])).await;
    let numbers = publish_all(&s, &["a:r", "secret:r", "b:r", "c:r", "d:r", "a:r"]).await;
    let tok = token("alice", Some(&["a:*", "b:*", "c:*", "d:*"]));
    let mut c = s.client(&tok).await;
    let ack = c.subscribe_since("c", "r", 0, None).await;
    assert_eq!(ack.recovered, Some(true));
    assert_eq!(c.expect_message().await.sequence_number, numbers[3]);
    let ack = resume(
        &mut c,
        json!([
            {"channel": "a", "request_id": "r", "since": 0},
            {"channel": "a:b", "request_id": "r", "since": 0},
            {"channel": "secret", "request_id": "r", "since": 0},
            {"channel": "b", "request_id": "r", "since": 0},
            {"channel": "b", "request_id": "x", "since": -1},
            {"channel": "c", "request_id": "r", "since": 0},
            {"channel": "d", "request_id": "r", "since": 0},
        ]),
        None,
    )
    .await;
    let verdicts: Vec<(Option<String>, Option<ErrorCode>)> = ack
        .results
        .iter()
        .map(|r| match r {
            ResumeResult::Refused {
                subscription_key,
                error,
            } => (
                subscription_key.as_ref().map(|k| k.to_string()),
                Some(error.code),
            ),
            ResumeResult::Resumed {
                subscription_key, ..
            } => (Some(subscription_key.to_string()), None),
        })
        .collect();
    let refusal = |k: Option<&str>, code| (k.map(str::to_owned), Some(code));
    assert_eq!(
        verdicts,
        [
            (Some("a:r".to_owned()), None),
            refusal(None, ErrorCode::BadRequest),
            refusal(Some("secret:r"), ErrorCode::Forbidden),
            (Some("b:r".to_owned()), None),
            refusal(Some("b:x"), ErrorCode::BadRequest),
            (Some("c:r".to_owned()), None),
            refusal(Some("d:r"), ErrorCode::BadRequest),
        ]
    );
    let ResumeResult::Resumed {
        already_subscribed, ..
    } = &ack.results[5]
    else {
        panic!()
    };
    assert!(already_subscribed, "c:r was subscribed before");
    let got = messages_until(&mut c, |g| g.len() >= 3).await;
    assert_eq!(
        got,
        [
            (key("a:r"), numbers[0]),
            (key("b:r"), numbers[2]),
            (key("a:r"), numbers[5])
        ]
    );
    c.expect_nothing_more().await;
    let line = s.wait_for_log(|l| l["event"] == "resume").await;
    assert_eq!(
        (line["resumed"].as_u64(), line["refused"].as_u64()),
        (Some(2), Some(4))
    );
    // Live delivery continues for the resumed keys.
    let n = s.publish("b", "r", json!(1)).await["sequence_number"]
        .as_u64()
        .unwrap();
    assert_eq!(c.expect_message().await.sequence_number, n);
}

/// For random logs and random key sets, `resume` delivers per key exactly what separate
/// `subscribe`s with the same `since` deliver (a small cache sends catch-up through log pages).
#[tokio::test]
async fn a_resume_delivers_what_separate_subscribes_deliver() {
    let s = TestServer::start_with(Options::args(&["--cache-bytes", "8192"])).await;
    let mut rng = StdRng::seed_from_u64(7);
    let keys: Vec<String> = (0..12).map(|i| format!("k{}:r{}", i % 4, i / 4)).collect();
    let mut head = 0;
    for round in 0..4 {
        let n = rng.random_range(50..400);
        let owners: Vec<&str> = (0..n)
            .map(|_| keys[rng.random_range(0..keys.len())].as_str())
            .collect();
        head = *publish_all(&s, &owners).await.last().unwrap();
        let (_, _, epoch) = s.log_bounds().await;
        let mut picked: BTreeMap<String, u64> = BTreeMap::new();
        for _ in 0..rng.random_range(2..8) {
            let k = keys[rng.random_range(0..keys.len())].clone();
            picked.insert(k, rng.random_range(0..=head));
        }
        let entries: Vec<Value> = picked
            .iter()
            .map(|(k, since)| {
                let k = key(k);
                json!({"channel": k.channel().as_str(), "request_id": k.request_id().as_str(), "since": since})
            })
            .collect();
        let mut c = s.client(&token("alice", None)).await;
        let ack = resume(&mut c, json!(entries), Some(&epoch)).await;
        // What separate subscribes with the same since deliver, each on its own connection.
        let mut want: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (k, &since) in &picked {
            let sk = key(k);
            let mut one = s.client(&token("alice", None)).await;
            let sub = one
                .subscribe_since(
                    sk.channel().as_str(),
                    sk.request_id().as_str(),
                    since,
                    Some(&epoch),
                )
                .await;
            let count = owners_after(&s, &sk, since, head).await;
            let got = messages_until(&mut one, |g| g.len() >= count).await;
            one.expect_nothing_more().await;
            want.insert(k.clone(), got.into_iter().map(|(_, n)| n).collect());
            let verdict = ack
                .results
                .iter()
                .find(|r| r.subscription_key() == Some(&sk))
                .unwrap();
            assert_eq!(
                resumed(verdict),
                (sub.recovered.unwrap(), sub.oldest_sequence)
            );
        }
        let total: usize = want.values().map(Vec::len).sum();
        let got = messages_until(&mut c, |g| g.len() >= total).await;
        c.expect_nothing_more().await;
        assert!(
            got.windows(2).all(|w| w[0].1 < w[1].1),
            "round {round}: global order"
        );
        let mut by_key: BTreeMap<String, Vec<u64>> =
            picked.keys().map(|k| (k.clone(), Vec::new())).collect();
        for (k, n) in got {
            by_key.get_mut(&k.to_string()).unwrap().push(n);
        }
        assert_eq!(by_key, want, "round {round}");
    }
    assert!(head > 0);
}

/// How many messages of `key` are numbered in `(since, head]` (from the key's stream over HTTP).
async fn owners_after(s: &TestServer, key: &SubscriptionKey, since: u64, head: u64) -> usize {
    s.recover_key(key.channel().as_str(), key.request_id().as_str())
        .await
        .iter()
        .filter_map(|m| m["sequence_number"].as_u64())
        .filter(|&n| n > since && n <= head)
        .count()
}
