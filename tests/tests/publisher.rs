//! `seqcast_client::Publisher` against the real server binary (SQLite): pipelined publishing,
//! a kill -9 of the server mid-stream, reconnect, and the unanswered messages sent again with
//! their `message_id`s — every message committed exactly once, every caller answered with its
//! message's one set of numbers.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use seqcast_client::{Outgoing, PublishError, Publisher, fixed_token};
use seqcast_e2e::{Options, PROMPT, TestServer, token_with};
use serde_json::{Value, json};

#[tokio::test]
async fn a_kill_9_mid_stream_loses_nothing_and_duplicates_nothing() {
    const N: u64 = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_with(Options {
        data_dir: Some(dir.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    let addr = s.addr;
    let publisher = Publisher::builder(format!("ws://{addr}/ws"))
        .max_in_flight(256)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .connect(fixed_token(token_with("producer", None, 3600, true)))
        .await
        .unwrap();
    let (acks_tx, mut acks_rx) = tokio::sync::mpsc::unbounded_channel();
    let sender = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            for i in 0..N {
                let pending = publisher
                    .send(Outgoing::json("pk", "r", &json!({"i": i})).unwrap())
                    .await
                    .unwrap();
                acks_tx.send((i, pending)).unwrap();
            }
        })
    };
    let (answered_tx, mut answered_rx) = tokio::sync::mpsc::unbounded_channel();
    let collector = tokio::spawn(async move {
        let mut answers = Vec::new();
        while let Some((i, pending)) = acks_rx.recv().await {
            let id = pending.message_id().clone();
            let answer = pending.await;
            let _ = answered_tx.send(());
            answers.push((i, id, answer));
        }
        answers
    });
    tokio::time::timeout(PROMPT, async {
        for _ in 0..500 {
            answered_rx.recv().await.unwrap();
        }
    })
    .await
    .expect("500 answers before the kill");
    s.kill9().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = TestServer::start_with(Options {
        data_dir: Some(dir.path().to_path_buf()),
        listen: Some(addr.to_string()),
        ..Options::default()
    })
    .await;
    tokio::time::timeout(Duration::from_secs(120), sender)
        .await
        .unwrap()
        .unwrap();
    let answers = tokio::time::timeout(Duration::from_secs(120), collector)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answers.len(), N as usize);

    let log = s.recover_key("pk", "r").await;
    let by_id: HashMap<&str, &Value> = log
        .iter()
        .map(|m| (m["message_id"].as_str().unwrap(), m))
        .collect();
    assert_eq!(by_id.len(), log.len(), "no message id twice in the log");
    assert_eq!(log.len(), N as usize, "every message committed once");
    for (i, m) in log.iter().enumerate() {
        assert_eq!(m["stream_sequence"], i as u64 + 1, "dense, in order");
        assert_eq!(m["data"]["i"], i as u64, "in the order sent");
    }
    for (i, id, answer) in &answers {
        let ack = answer
            .as_ref()
            .unwrap_or_else(|e| panic!("message {i}: {e}"));
        assert_eq!(&ack.message_id, id);
        let row = by_id[id.as_str()];
        assert_eq!(row["sequence_number"], ack.sequence_number, "message {i}");
        assert_eq!(row["stream_sequence"], ack.stream_sequence, "message {i}");
        assert_eq!(row["data"]["i"], *i);
    }
    let reconnects = s
        .logs()
        .iter()
        .filter(|l| l["event"] == "connection_opened")
        .count();
    assert!(
        reconnects >= 1,
        "the publisher came back to the restarted server"
    );
}

/// A refusal answers that message alone: a key outside the token's patterns is `forbidden`,
/// the messages around it are committed, in order.
#[tokio::test]
async fn a_refused_message_fails_alone() {
    let s = TestServer::start().await;
    let publisher = Publisher::connect(
        format!("ws://{}/ws", s.addr),
        fixed_token(token_with("producer", Some(&["mine:*"]), 3600, true)),
    )
    .await
    .unwrap();
    let a = publisher
        .send(Outgoing::json("mine", "r", &"a").unwrap())
        .await
        .unwrap();
    let b = publisher
        .send(Outgoing::json("theirs", "r", &"b").unwrap())
        .await
        .unwrap();
    let c = publisher
        .send(Outgoing::json("mine", "r", &"c").unwrap())
        .await
        .unwrap();
    let in_time = |ack| async move { tokio::time::timeout(PROMPT, ack).await.expect("an answer") };
    assert_eq!(in_time(a).await.unwrap().sequence_number, 1);
    match in_time(b).await {
        Err(PublishError::Refused(e)) => assert_eq!(e.code, seqcast_client::ErrorCode::Forbidden),
        other => panic!("{other:?}"),
    }
    assert_eq!(in_time(c).await.unwrap().sequence_number, 2);
}
