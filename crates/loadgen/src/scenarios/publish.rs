//! Persist-first publishing over HTTP: P publishers, each on its own keep-alive connection and
//! its own key, each sending its next request as soon as the last one was answered (closed
//! loop: the highest rate the server sustains). An answer means the write is durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::run_id;
use crate::Target;
use crate::http::HttpConn;
use crate::stats::{Summary, latency_histogram, record_nanos};

/// Publish parameters.
#[derive(Debug, Clone)]
pub struct PublishArgs {
    /// Concurrent publishers (connections).
    pub publishers: usize,
    /// Messages per request: 1 uses `/api/publish`, more uses `/api/publish/batch`.
    pub batch: usize,
    /// Measured time.
    pub duration: Duration,
    /// Time before measuring starts.
    pub warmup: Duration,
}

/// Run the scenario.
pub async fn run(target: &Target, args: &PublishArgs) -> anyhow::Result<Value> {
    let run = run_id();
    let auth = format!("ApiKey {}", target.api_key);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let messages = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(args.publishers);
    for _ in 0..args.publishers {
        conns.push(HttpConn::connect(target.addr).await?);
    }
    let mut tasks = Vec::new();
    for (k, mut conn) in conns.into_iter().enumerate() {
        let (measuring, stop, messages, errors) = (
            measuring.clone(),
            stop.clone(),
            messages.clone(),
            errors.clone(),
        );
        let auth = auth.clone();
        let request_id = format!("pub-{run}-{k}");
        let batch = args.batch.max(1);
        tasks.push(tokio::spawn(async move {
            let mut hist = latency_histogram();
            let mut n = 0u64;
            let mut body = String::new();
            while !stop.load(Ordering::Relaxed) {
                body.clear();
                if batch == 1 {
                    body.push_str(&format!(r#"{{"channel":"bench","request_id":"{request_id}","data":{{"n":{n}}}}}"#));
                } else {
                    body.push_str(r#"{"messages":["#);
                    for j in 0..batch {
                        if j > 0 {
                            body.push(',');
                        }
                        body.push_str(&format!(r#"{{"channel":"bench","request_id":"{request_id}","data":{{"n":{}}}}}"#, n + j as u64));
                    }
                    body.push_str("]}");
                }
                let path = if batch == 1 { "/api/publish" } else { "/api/publish/batch" };
                let sent = Instant::now();
                let ok = matches!(conn.post_json(path, &auth, body.as_bytes()).await, Ok(r) if r.status == 200);
                n += batch as u64;
                if ok && measuring.load(Ordering::Relaxed) {
                    messages.fetch_add(batch as u64, Ordering::Relaxed);
                    record_nanos(&mut hist, sent.elapsed().as_nanos() as u64);
                }
                if !ok {
                    // A broken connection is not retried: the error count tells.
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            hist
        }));
    }
    let (cpu_use, hist) = super::measure_closed_loop(
        args.warmup,
        args.duration,
        target.server_pid,
        &measuring,
        &stop,
        tasks,
    )
    .await?;
    let n = messages.load(Ordering::Acquire);
    Ok(json!({
        "scenario": "publish",
        "publishers": args.publishers,
        "batch": args.batch,
        "duration_s": args.duration.as_secs_f64(),
        "messages": n,
        "errors": errors.load(Ordering::Acquire),
        "publishes_per_s": n as f64 / cpu_use.wall_seconds,
        "request_latency": Summary::of(&hist),
        "cpu": cpu_use,
    }))
}
