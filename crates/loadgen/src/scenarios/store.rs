//! The persistence layer alone, in-process: P tasks appending one event per command to a
//! `DbWriter`, with group commit on or off. Measures what group commit buys without HTTP,
//! independent of server flags.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use seqcast_persistence::{DbWriter, EventWriter, NewEvent, StoreConfig, Synchronous};
use seqcast_protocol::{Channel, MessageId, RequestId, SubscriptionKey};
use serde_json::{Value, json};

use crate::stats::{CpuMeter, Summary, latency_histogram, record_nanos};

/// Store parameters.
#[derive(Debug, Clone)]
pub struct StoreArgs {
    /// Directory for the database file (created; the file is replaced).
    pub dir: PathBuf,
    /// Concurrent appenders.
    pub publishers: usize,
    /// Group commit on (the default) or one transaction per command.
    pub group_commit: bool,
    /// SQLite synchronous mode.
    pub synchronous: Synchronous,
    /// Measured time.
    pub duration: Duration,
}

/// Run the scenario.
pub async fn run(args: &StoreArgs) -> anyhow::Result<Value> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let path = args.dir.join(format!("store-{}.db", super::run_id()));
    let mut config = StoreConfig::new(&path);
    config.group_commit = args.group_commit;
    config.synchronous = args.synchronous;
    let (writer, _) =
        DbWriter::open(config, Box::new(|_| Ok(()))).context("cannot open the store")?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let cpu = CpuMeter::start(None);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..args.publishers.max(1) {
        let (writer, stop, count, errors) =
            (writer.clone(), stop.clone(), count.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = latency_histogram();
            let key = SubscriptionKey::new(
                Channel::new("bench")?,
                RequestId::new(format!("store-{k}"))?,
            );
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ev = NewEvent {
                    key: key.clone(),
                    message_id: MessageId::new(format!("m{n}"))?,
                    data: format!(r#"{{"n":{n}}}"#),
                };
                let t = Instant::now();
                match writer.append(vec![ev]).await {
                    Ok(_) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        record_nanos(&mut hist, t.elapsed().as_nanos() as u64);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
            }
            anyhow::Ok(hist)
        }));
    }
    tokio::time::sleep(args.duration).await;
    let n = count.load(Ordering::Acquire);
    let wall = started.elapsed().as_secs_f64();
    let cpu_use = cpu.stop();
    stop.store(true, Ordering::Release);
    let mut hist = latency_histogram();
    for t in tasks {
        hist.add(&t.await.context("appender panicked")??).ok();
    }
    let stats = writer.health().stats;
    writer.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(json!({
        "scenario": "store",
        "publishers": args.publishers,
        "group_commit": args.group_commit,
        "synchronous": args.synchronous.to_string(),
        "appends": n,
        "errors": errors.load(Ordering::Acquire),
        "appends_per_s": n as f64 / wall,
        "transactions": stats.transactions_committed,
        "events_per_transaction": stats.events_committed as f64 / stats.transactions_committed.max(1) as f64,
        "append_latency": Summary::of(&hist),
        "cpu": cpu_use,
    }))
}
