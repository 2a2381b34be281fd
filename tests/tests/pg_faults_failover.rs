//! Defect 2 of issue 20: a failover to the promoted standby with a node that is not
//! restarted. The node reaches PostgreSQL through the fault proxy; the primary stops, the
//! (synchronous) standby is promoted to a new timeline and the proxy switches to it. The node
//! moves to the new epoch by itself: its live connections are closed so clients resume, a
//! resume with the old epoch says `recovered: false`, HTTP recovery with the old epoch says
//! `complete: false`, publishes work again without a restart, and every acknowledged publish
//! is in the new history with the number it was answered. Private cluster; without the
//! PostgreSQL binaries the test says so loudly and passes, except under `CI=true`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use seqcast_e2e::fault_proxy::FaultProxy;
use seqcast_e2e::pg_cluster::PgCluster;
use seqcast_e2e::pg_faults::{
    assert_acknowledged_in_log, messages_within, pg_node, publish_within, whole_log,
};
use seqcast_e2e::{Event, token};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_is_not_restarted_moves_to_the_new_epoch_after_a_failover() {
    let Some(primary) = PgCluster::primary() else {
        return;
    };
    let db = "seqcast_failover";
    primary.create_database(db);
    let standby = primary.standby("s1");
    primary.set_synchronous_standby_names("s1");
    primary.wait_for_sync_standby("s1", Duration::from_secs(20));
    let proxy = FaultProxy::start(primary.addr()).await;
    let a = pg_node(&proxy.url(db), &[]).await;
    let t = token("u", None);
    let mut sub = a.client(&t).await;
    let ack = sub.subscribe("c", "k").await;
    let old_epoch = ack.epoch.clone();
    let mut acked = Vec::new();
    for n in 0..3 {
        acked.push(a.publish("c", "k", json!({"n": n})).await);
    }
    let got = messages_within(&mut sub, 3, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 3);
    let last_seen = got[2].sequence_number;

    // Failover: the primary goes, the standby is promoted, the proxy points at it.
    primary.stop();
    standby.promote();
    proxy.set_upstream(standby.addr());
    proxy.reset_all();
    let failed_over = Instant::now();

    // The node's live connection is ended so its client resumes.
    let closed = loop {
        match sub.next_event_within(Duration::from_secs(25)).await {
            Some(Event::Frame(_)) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(closed, Some(Event::Closed(1012, _))),
        "the live connection was not ended after the failover: {closed:?}"
    );
    eprintln!(
        "connection ended {:?} after the failover",
        failed_over.elapsed()
    );

    // Publishes work again without a restart.
    let deadline = Instant::now() + Duration::from_secs(25);
    let after = loop {
        let (status, answer) = publish_within(
            &a,
            &json!({"channel": "c", "request_id": "k", "data": {"n": "after"}}),
            Duration::from_secs(10),
        )
        .await;
        if status == 200 {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "the node still refuses publishes after the failover: {status} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!(
        "publishes work {:?} after the failover",
        failed_over.elapsed()
    );
    acked.push(after.clone());

    // A resume with the old epoch is told it is another history.
    let mut again = a.client(&t).await;
    let resumed = again
        .subscribe_since("c", "k", last_seen, Some(&old_epoch))
        .await;
    assert_eq!(resumed.recovered, Some(false), "{resumed:?}");
    assert_ne!(resumed.epoch, old_epoch, "the node kept the old epoch");
    let (status, page) = a
        .get(
            &format!("/websocket/messages?since={last_seen}&epoch={old_epoch}"),
            Some(&t),
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["complete"], false, "{page}");
    assert_eq!(page["epoch"], resumed.epoch.as_str(), "{page}");
    // Every acknowledged publish is in the new history with its number.
    assert_acknowledged_in_log(&acked, &whole_log(&a, &t).await);
    assert_eq!(
        after["sequence_number"].as_u64().unwrap(),
        last_seen + 1,
        "the new history continues the acknowledged one"
    );
}
