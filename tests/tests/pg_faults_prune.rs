//! Defect 3 of issue 20: pruning races appends. Two nodes (two `PgStore`s on one database)
//! upsert a few hot message ids as fast as they can while one of them prunes everything both
//! tails have applied, every few milliseconds. Pruning and appends must be ordered: no append
//! fails or loses its stream row (an event without its row, or a NULL position), no writer dies,
//! and both tails keep delivering a dense, increasing run. Private cluster; without the
//! PostgreSQL binaries the test says so loudly and passes, except under `CI=true`.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seqcast_e2e::pg_cluster::PgCluster;
use seqcast_persistence::{CommittedEvent, EventWriter, NewEvent, PgConfig, PgStore, PgWriter};
use seqcast_protocol::{Channel, MessageId, RequestId, SubscriptionKey};

/// Message ids upserted over and over: few enough that every one is upserted every few
/// milliseconds, many enough that the pruner finds whole rows to delete.
const HOT_KEYS: u64 = 40;

/// What one node's tail handed to its hook: every number, in order.
#[derive(Default)]
struct Seen {
    numbers: Mutex<Vec<u64>>,
    last: AtomicU64,
}

fn open(url: &str, seen: &Arc<Seen>) -> PgWriter {
    let seen = Arc::clone(seen);
    let hook = Box::new(move |events: &[CommittedEvent]| {
        let mut numbers = seen.numbers.lock().unwrap();
        numbers.extend(events.iter().map(|e| e.sequence_number));
        seen.last
            .store(events[events.len() - 1].sequence_number, Ordering::SeqCst);
        Ok(())
    });
    let mut config = PgConfig::new(url);
    config.pool_size = 2;
    let (writer, _reader, _info) = PgStore::open(config, hook).unwrap();
    writer
}

fn upsert(key: usize, i: u64) -> NewEvent {
    NewEvent {
        key: SubscriptionKey::new(
            Channel::parse("hot").unwrap(),
            RequestId::parse(&format!("k{key}")).unwrap(),
        ),
        message_id: MessageId::parse(&format!("m{key}")).unwrap(),
        data: format!("{{\"i\":{i}}}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pruning_every_few_milliseconds_never_loses_an_upserts_row() {
    let Some(primary) = PgCluster::primary() else {
        return;
    };
    let url = primary.create_database("seqcast_prune");
    let seen = [Arc::new(Seen::default()), Arc::new(Seen::default())];
    let nodes = [open(&url, &seen[0]), open(&url, &seen[1])];
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    // Four publishers per node, each upserting the same HOT_KEYS message ids over and over.
    for node in &nodes {
        for _ in 0..4 {
            let (node, stop, counter, failures) = (
                node.clone(),
                Arc::clone(&stop),
                Arc::clone(&counter),
                Arc::clone(&failures),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = node.append(vec![upsert((i % HOT_KEYS) as usize, i)]).await {
                        failures.lock().unwrap().push(e.to_string());
                        if node.health().stopped.is_some() {
                            return;
                        }
                    }
                }
            }));
        }
    }
    // The pruner: every 2 ms, everything both tails have applied.
    let pruner = {
        let (node, stop, seen, failures) = (
            nodes[0].clone(),
            Arc::clone(&stop),
            seen.clone(),
            Arc::clone(&failures),
        );
        tokio::spawn(async move {
            let mut steps = 0u64;
            let mut deleted = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let below = seen[0]
                    .last
                    .load(Ordering::SeqCst)
                    .min(seen[1].last.load(Ordering::SeqCst))
                    + 1;
                match node.prune(below, 5_000).await {
                    Ok(r) => {
                        steps += 1;
                        deleted += r.deleted;
                    }
                    Err(e) => failures.lock().unwrap().push(format!("prune: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (steps, deleted)
        })
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("a publisher hung")
            .unwrap();
    }
    let (steps, deleted) = pruner.await.unwrap();
    let published = counter.load(Ordering::Relaxed);
    eprintln!("{published} upserts, {steps} prune steps deleting {deleted} events");
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} appends or prunes failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        deleted > 0,
        "the pruner deleted nothing: the test proves nothing"
    );
    for (i, node) in nodes.iter().enumerate() {
        assert!(node.health().stopped.is_none(), "node {i}'s writer died");
    }
    // Both tails are alive: a last append on each reaches both hooks.
    let mut last = 0;
    for node in &nodes {
        let e = tokio::time::timeout(Duration::from_secs(10), node.append(vec![upsert(7, 0)]))
            .await
            .expect("the last append hung")
            .expect("the last append failed");
        last = last.max(e[0].sequence_number);
    }
    for (i, s) in seen.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.last.load(Ordering::SeqCst) < last {
            assert!(
                Instant::now() < deadline,
                "node {i}'s tail stopped at {} (head {last}); its status: {:?}",
                s.last.load(Ordering::SeqCst),
                nodes[i].health()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let numbers = s.numbers.lock().unwrap();
        assert!(
            numbers.windows(2).all(|w| w[1] == w[0] + 1),
            "node {i}'s tail skipped or repeated a number"
        );
    }
    // No event lost its stream row.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let orphans: i64 = client
        .query_one(
            "SELECT count(*) FROM seqcast.events e LEFT JOIN seqcast.stream_rows r \
             ON r.stream_id = e.stream_id AND r.message_id = e.message_id \
             WHERE r.message_id IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0, "events without their stream row");
    for node in &nodes {
        node.close().await;
    }
}
