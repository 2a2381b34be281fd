//! Issue 20: PostgreSQL restarted under a running node (`pg_ctl restart -m fast`): publishes
//! answer 503 (or are in doubt) while it is down, then 200 again without a restart of the node;
//! the live subscriber gets every acknowledged message, in order, once. Private cluster; without
//! the PostgreSQL binaries the test says so loudly and passes, except under `CI=true`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use seqcast_e2e::pg_cluster::PgCluster;
use seqcast_e2e::pg_faults::{
    assert_acknowledged_in_log, messages_within, pg_node, publish_within, wait_readyz, whole_log,
};
use seqcast_e2e::token;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_database_delays_delivery_and_loses_nothing() {
    let Some(primary) = PgCluster::primary() else {
        return;
    };
    let url = primary.create_database("seqcast_restart");
    let a = pg_node(&url, &[]).await;
    let t = token("u", None);
    let mut sub = a.client(&t).await;
    sub.subscribe("c", "k").await;
    let mut acked = vec![a.publish("c", "k", json!({"n": 0})).await];
    primary.stop();
    let (status, answer) = publish_within(
        &a,
        &json!({"channel": "c", "request_id": "k", "message_id": "down", "data": {"n": "down"}}),
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(status, 503, "a publish while PostgreSQL is down: {answer}");
    assert!(wait_readyz(&a, 503, Duration::from_secs(5)).await.is_some());
    primary.start();
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in 1..=3 {
        loop {
            let (status, answer) = publish_within(
                &a,
                &json!({"channel": "c", "request_id": "k", "data": {"n": n}}),
                Duration::from_secs(10),
            )
            .await;
            if status == 200 {
                acked.push(answer);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no 200 after the restart: {status} {answer}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(
        wait_readyz(&a, 200, Duration::from_secs(10))
            .await
            .is_some()
    );
    let got = messages_within(&mut sub, acked.len(), Duration::from_secs(15)).await;
    let numbers: Vec<u64> = got.iter().map(|m| m.sequence_number).collect();
    let want: Vec<u64> = acked
        .iter()
        .map(|a| a["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(
        numbers, want,
        "the subscriber did not get every acknowledged message once"
    );
    assert_acknowledged_in_log(&acked, &whole_log(&a, &t).await);
}
