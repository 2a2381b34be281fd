//! Defect 5 of issue 20: a half-open database connection (bytes vanish, no RST) must not stall
//! a node's live delivery for good, and `/readyz` must say so while it lasts. Node `a` reaches
//! PostgreSQL through the fault proxy, node `b` directly; the proxy black-holes every
//! connection of `a`, then heals. Private cluster; without the PostgreSQL binaries the test says
//! so loudly and passes, except under `CI=true`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use seqcast_e2e::fault_proxy::FaultProxy;
use seqcast_e2e::pg_cluster::PgCluster;
use seqcast_e2e::pg_faults::{
    assert_acknowledged_in_log, messages_within, pg_node, wait_readyz, whole_log,
};
use seqcast_e2e::token;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_black_holed_database_connection_stalls_delivery_only_until_it_heals() {
    let Some(primary) = PgCluster::primary() else {
        return;
    };
    let db = "seqcast_halfopen";
    let direct = primary.create_database(db);
    let proxy = FaultProxy::start(primary.addr()).await;
    let a = pg_node(&proxy.url(db), &[]).await;
    let b = pg_node(&direct, &[]).await;
    let t = token("u", None);
    let mut sub = a.client(&t).await;
    sub.subscribe("c", "k").await;
    let mut acked = vec![b.publish("c", "k", json!({"n": 0})).await];
    assert_eq!(
        messages_within(&mut sub, 1, Duration::from_secs(10))
            .await
            .len(),
        1
    );

    // Every connection of node a goes half-open.
    proxy.black_hole();
    let fault_started = Instant::now();
    // A publish on a during the fault: answered (not hung for the HTTP deadline), and if 200,
    // it must be in the log.
    let during = {
        let body = json!({"channel": "c", "request_id": "k", "data": {"from": "a"}});
        let a_url = a.url("/api/publish");
        let http = a.http.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(40),
                http.post(a_url)
                    .header("Authorization", format!("ApiKey {}", seqcast_e2e::API_KEY))
                    .header("Content-Type", "application/json")
                    .body(body.to_string())
                    .send(),
            )
            .await;
            match r {
                Ok(Ok(r)) => {
                    let status = r.status().as_u16();
                    (
                        status,
                        r.json::<serde_json::Value>().await.unwrap_or_default(),
                    )
                }
                _ => (0, serde_json::Value::Null),
            }
        })
    };
    for n in 1..=5 {
        acked.push(b.publish("c", "k", json!({"n": n})).await);
    }
    // Node a is not ready while its tail cannot read.
    let not_ready = wait_readyz(&a, 503, Duration::from_secs(10)).await;
    assert!(
        not_ready.is_some(),
        "/readyz of the black-holed node kept answering 200 for 10 s"
    );
    eprintln!(
        "readyz 503 after {:?}: {not_ready:?}",
        fault_started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    proxy.heal();
    let healed = Instant::now();
    // Delivery resumes: the five messages published on b during the fault reach a's
    // subscriber, in order.
    let got = messages_within(&mut sub, 5, Duration::from_secs(25)).await;
    let numbers: Vec<u64> = got.iter().map(|m| m.sequence_number).collect();
    let want: Vec<u64> = acked[1..]
        .iter()
        .map(|a| a["sequence_number"].as_u64().unwrap())
        .collect();
    assert!(
        want.iter().all(|n| numbers.contains(n)) && numbers.windows(2).all(|w| w[0] < w[1]),
        "delivery did not resume after the fault healed: got {numbers:?}, want {want:?} (waited {:?})",
        healed.elapsed()
    );
    eprintln!("delivery resumed {:?} after the heal", healed.elapsed());
    assert!(
        wait_readyz(&a, 200, Duration::from_secs(20))
            .await
            .is_some(),
        "node a did not become ready again"
    );
    let (status, answer) = during.await.unwrap();
    eprintln!("the publish on a during the fault answered {status}: {answer}");
    assert_ne!(
        status, 0,
        "a publish during the fault got no answer in 40 s"
    );
    if status == 200 {
        acked.push(answer);
    } else {
        assert_eq!(status, 503, "{answer}");
    }
    // Node a takes publishes again.
    acked.push(a.publish("c", "k", json!({"n": "after"})).await);
    // Node a answered its last publish after its tail applied it: its view holds everything.
    assert_acknowledged_in_log(&acked, &whole_log(&a, &t).await);
}
