//! Events per CPU-second that one key's catch-up reads from the log through
//! [`EventReader::page`], as catch-up subscriptions read it.
//!
//! ```text
//! cargo run --release -p seqcast-persistence --example read_bench [-- --events N] [--page N] [--passes N]
//! ```
//!
//! Writes `--events` small events (default 200,000) to one key and as many to a second key,
//! interleaved (so the key's rows are spread over the log as in a busy server), then reads the
//! first key from the start in pages of `--page` (default 512, the server's page at its default
//! send queue) `--passes` times (default 7) and prints the best and the median pass: events per
//! CPU-second of the reading thread. The best pass is the stable number on a shared machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use seqcast_persistence::{
    DbReader, DbWriter, EventFilter, EventReader, EventWriter, NewEvent, StoreConfig,
};
use seqcast_protocol::{MessageId, SubscriptionKey};

const DATA: &str = r#"{"type":"token","text":"The quick brown fox jumps over the lazy dog","index":12345,"done":false}"#;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

/// CPU time of the calling thread (Linux: /proc/thread-self/schedstat, nanoseconds).
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    Duration::from_nanos(stat.split_whitespace().next().unwrap().parse().unwrap())
}

#[tokio::main]
async fn main() {
    let events = arg("--events", 200_000);
    let page = arg("--page", 512);
    let passes = arg("--passes", 7);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("read-bench.db");
    let (writer, _info) =
        DbWriter::open(StoreConfig::new(&path), Box::new(|_: &[_]| Ok(()))).unwrap();
    let key: SubscriptionKey = "bench:read".parse().unwrap();
    let other: SubscriptionKey = "bench:other".parse().unwrap();
    let mut n = 0u64;
    while (n as usize) < events {
        let mut batch = Vec::with_capacity(2000);
        for _ in 0..1000 {
            n += 1;
            for k in [&key, &other] {
                batch.push(NewEvent {
                    key: k.clone(),
                    message_id: MessageId::parse(&format!("m{n:012}")).unwrap(),
                    data: DATA.to_owned(),
                });
            }
        }
        writer.append(batch).await.unwrap();
    }
    writer.close().await;

    let reader = DbReader::open(&path).unwrap();
    let head = reader.head().unwrap();
    let filter = EventFilter::Key(key);
    let mut rates = Vec::new();
    for _ in 0..passes {
        let cpu = thread_cpu();
        let (mut after, mut read) = (0u64, 0usize);
        while after < head {
            let p = reader.page(&filter, after, head, page, usize::MAX).unwrap();
            read += p.events.len();
            after = p.covered_through;
        }
        assert_eq!(read, events.div_ceil(1000) * 1000);
        let secs = (thread_cpu() - cpu).as_secs_f64();
        rates.push(read as f64 / secs);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "read_bench: {} events of one key in pages of {page}: best {:.0}, median {:.0} events per CPU-second ({passes} passes)",
        events,
        rates[rates.len() - 1],
        rates[rates.len() / 2]
    );
}
