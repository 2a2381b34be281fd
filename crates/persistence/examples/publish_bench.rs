//! Appends per second through `DbWriter`, as a Markdown table.
//!
//! ```text
//! cargo run --release -p seqcast-persistence --example publish_bench [-- --secs 2] [--only single|batch]
//!     [--publishers N] [--sync full|normal] [--group-only] [--memory] [--streams N]
//! ```
//!
//! Scenarios: 1, 64 and 256 concurrent publishers each appending one event at a time, with
//! group commit and with one transaction per message, under `synchronous` FULL and NORMAL;
//! then batch appends of 100 and 1000 events. Each scenario uses a fresh database in a
//! temporary directory (`TMPDIR` picks the disk) and runs for `--secs` seconds. `--memory` runs
//! the same appenders against `MemoryStore` instead (the sync and commit columns then mean
//! nothing; events/txn is events per append call).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use seqcast_persistence::{DbWriter, EventWriter, MemoryStore, NewEvent, StoreConfig, Synchronous};
use seqcast_protocol::{MessageId, SubscriptionKey};

/// A typical small message body (~100 bytes of JSON).
const DATA: &str = r#"{"type":"token","text":"The quick brown fox jumps over the lazy dog","index":12345,"done":false}"#;
/// Streams (subscription keys) the publishers spread over unless `--streams N` says otherwise.
const STREAMS: usize = 16;
/// The writer thread's name (Linux shows the first 15 bytes).
const WRITER_THREAD: &str = "seqcast-db-writer";

#[derive(Debug, Clone, Copy)]
struct Scenario {
    publishers: usize,
    batch: usize,
    group_commit: bool,
    synchronous: Synchronous,
}

struct Outcome {
    events: u64,
    elapsed: Duration,
    transactions: u64,
    /// CPU time of the writer thread, and of the whole process, during the run.
    writer_cpu: Option<Duration>,
    process_cpu: Option<Duration>,
}

/// CPU time of this process's threads (all, or those whose name starts with `name`), from
/// Linux's /proc/self/task/*/schedstat. Wall-clock rates on a shared machine swing with other
/// load; CPU per event is the stable measure of the hot path's cost.
fn thread_cpu(name: Option<&str>) -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        if let Some(name) = name {
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if !name.starts_with(comm.trim()) || comm.trim().is_empty() {
                continue;
            }
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

fn per_event_us(cpu: Option<Duration>, events: u64) -> String {
    cpu.map_or("n/a".to_owned(), |d| {
        format!("{:.1}", d.as_secs_f64() * 1e6 / events.max(1) as f64)
    })
}

fn main() {
    let secs: f64 = std::env::args()
        .skip_while(|a| a != "--secs")
        .nth(1)
        .map(|s| s.parse().expect("--secs takes a number"))
        .unwrap_or(2.0);
    let only: Option<String> = std::env::args().skip_while(|a| a != "--only").nth(1);
    let group_only = std::env::args().any(|a| a == "--group-only");
    let memory = std::env::args().any(|a| a == "--memory");
    // `--publishers N`, `--sync full|normal` and `--group-only` narrow the table to matching scenarios.
    let only_publishers: Option<usize> = std::env::args()
        .skip_while(|a| a != "--publishers")
        .nth(1)
        .map(|s| s.parse().expect("--publishers takes a number"));
    let only_sync: Option<Synchronous> = std::env::args()
        .skip_while(|a| a != "--sync")
        .nth(1)
        .map(|s| s.parse().expect("--sync takes full or normal"));
    let duration = Duration::from_secs_f64(secs);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut scenarios = Vec::new();
    for synchronous in [Synchronous::Full, Synchronous::Normal] {
        for group_commit in [true, false] {
            for publishers in [1, 64, 256] {
                scenarios.push(Scenario {
                    publishers,
                    batch: 1,
                    group_commit,
                    synchronous,
                });
            }
        }
    }
    for synchronous in [Synchronous::Full, Synchronous::Normal] {
        for (publishers, batch) in [(1, 100), (1, 1000), (4, 1000)] {
            scenarios.push(Scenario {
                publishers,
                batch,
                group_commit: true,
                synchronous,
            });
        }
    }

    println!(
        "| sync | commit | publishers | events/append | appends/s | events/s | events/txn \
         | writer CPU µs/event | process CPU µs/event |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let wanted = |s: &Scenario| {
        let kind = match only.as_deref() {
            Some("single") => s.batch == 1,
            Some("batch") => s.batch > 1,
            _ => true,
        };
        kind && (!group_only || s.group_commit)
            && only_publishers.is_none_or(|p| p == s.publishers)
            && only_sync.is_none_or(|sync| sync.as_pragma() == s.synchronous.as_pragma())
    };
    for scenario in scenarios.into_iter().filter(wanted) {
        let outcome = runtime.block_on(run(scenario, duration, memory));
        let secs = outcome.elapsed.as_secs_f64();
        let events_per_sec = outcome.events as f64 / secs;
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.1} | {} | {} |",
            scenario.synchronous.as_pragma(),
            if scenario.group_commit {
                "group"
            } else {
                "one per message"
            },
            scenario.publishers,
            scenario.batch,
            events_per_sec / scenario.batch as f64,
            events_per_sec,
            outcome.events as f64 / outcome.transactions.max(1) as f64,
            per_event_us(outcome.writer_cpu, outcome.events),
            per_event_us(outcome.process_cpu, outcome.events),
        );
    }
}

async fn run(scenario: Scenario, duration: Duration, memory: bool) -> Outcome {
    // The server's hook fans out; here it only counts, so the numbers are the store's.
    let hooked = Arc::new(AtomicU64::new(0));
    let hook_count = Arc::clone(&hooked);
    let hook = Box::new(move |events: &[_]| {
        hook_count.fetch_add(events.len() as u64, Ordering::Relaxed);
        Ok(())
    });
    if memory {
        let (writer, _, _) = MemoryStore::open(hook);
        return run_with(writer, scenario, duration, hooked).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        synchronous: scenario.synchronous,
        group_commit: scenario.group_commit,
        ..StoreConfig::new(dir.path().join("bench.db"))
    };
    let (writer, _) = DbWriter::open(config, hook).unwrap();
    run_with(writer, scenario, duration, hooked).await
}

async fn run_with(
    writer: impl EventWriter + Clone,
    scenario: Scenario,
    duration: Duration,
    hooked: Arc<AtomicU64>,
) -> Outcome {
    let streams = streams();
    let keys: Vec<SubscriptionKey> = (0..streams)
        .map(|i| SubscriptionKey::parse(&format!("bench:stream-{i}")).unwrap())
        .collect();

    let writer_cpu_before = thread_cpu(Some(WRITER_THREAD));
    let process_cpu_before = thread_cpu(None);
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = (0..scenario.publishers)
        .map(|p| {
            let writer = writer.clone();
            let keys = keys.clone();
            tokio::spawn(async move {
                let mut sent = 0u64;
                let mut n = 0usize;
                while Instant::now() < deadline {
                    let events = (0..scenario.batch)
                        .map(|_| {
                            n += 1;
                            NewEvent {
                                key: keys[(p + n) % streams].clone(),
                                message_id: MessageId::new(format!("p{p}-{n}")).unwrap(),
                                data: DATA.to_owned(),
                            }
                        })
                        .collect();
                    sent += writer.append(events).await.unwrap().len() as u64;
                }
                sent
            })
        })
        .collect();
    let mut events = 0;
    for task in tasks {
        events += task.await.unwrap();
    }
    let elapsed = start.elapsed();
    let writer_cpu = thread_cpu(Some(WRITER_THREAD))
        .zip(writer_cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let process_cpu = thread_cpu(None)
        .zip(process_cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let stats = writer.health().stats;
    writer.close().await;
    assert_eq!(hooked.load(Ordering::Relaxed), events);
    Outcome {
        events,
        elapsed,
        transactions: stats.transactions_committed,
        writer_cpu,
        process_cpu,
    }
}

/// `--streams N`: how many keys the events spread over (many keys dirty many index pages).
fn streams() -> usize {
    std::env::args()
        .skip_while(|a| a != "--streams")
        .nth(1)
        .map(|s| s.parse().expect("--streams takes a number"))
        .unwrap_or(STREAMS)
}
