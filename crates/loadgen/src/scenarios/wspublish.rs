//! Closed-loop publishing over the WebSocket: P publishers, each on its own connection and its
//! own key, each keeping W `publish` frames in flight (the next is sent as soon as an answer
//! arrives). A `publish_ack` means the write is durable, as an HTTP publish answer does.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{FutureExt as _, SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::run_id;
use crate::Target;
use crate::stats::{Summary, latency_histogram, record_nanos};

/// WebSocket publish parameters.
#[derive(Debug, Clone)]
pub struct WsPublishArgs {
    /// Concurrent publishers (connections).
    pub publishers: usize,
    /// `publish` frames each keeps unanswered.
    pub in_flight: usize,
    /// Measured time.
    pub duration: Duration,
    /// Time before measuring starts.
    pub warmup: Duration,
}

/// Run the scenario. `target.token` must carry `publish: true`.
pub async fn run(target: &Target, args: &WsPublishArgs) -> anyhow::Result<Value> {
    let run = run_id();
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let messages = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(args.publishers);
    for k in 0..args.publishers {
        conns.push(crate::ws::open(target, k, 64 << 10).await?);
    }
    let mut tasks = Vec::new();
    for (k, mut ws) in conns.into_iter().enumerate() {
        let (measuring, stop, messages, errors) = (
            measuring.clone(),
            stop.clone(),
            messages.clone(),
            errors.clone(),
        );
        let request_id = format!("wspub-{run}-{k}");
        let window = args.in_flight.max(1);
        tasks.push(tokio::spawn(async move {
            let mut hist = latency_histogram();
            let mut sent_at: VecDeque<Instant> = VecDeque::with_capacity(window);
            let mut n = 0u64;
            loop {
                let stopping = stop.load(Ordering::Relaxed);
                if !stopping && sent_at.len() < window {
                    while sent_at.len() < window {
                        let frame = format!(
                            r#"{{"type":"publish","ref":{n},"channel":"bench","request_id":"{request_id}","data":{{"n":{n}}}}}"#
                        );
                        if ws.feed(Message::text(frame)).await.is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                            return hist;
                        }
                        sent_at.push_back(Instant::now());
                        n += 1;
                    }
                    if ws.flush().await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return hist;
                    }
                }
                if stopping && sent_at.is_empty() {
                    return hist;
                }
                // One answer, then every answer already read, before refilling the window.
                let mut next = tokio::time::timeout(Duration::from_secs(10), ws.next())
                    .await
                    .ok()
                    .flatten();
                while let Some(msg) = next {
                    let Ok(Message::Text(text)) = msg else {
                        if msg.is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                            return hist;
                        }
                        next = ws.next().now_or_never().flatten();
                        continue;
                    };
                    if text.starts_with(r#"{"type":"publish_ack""#) {
                        if let Some(at) = sent_at.pop_front()
                            && measuring.load(Ordering::Relaxed)
                        {
                            messages.fetch_add(1, Ordering::Relaxed);
                            record_nanos(&mut hist, at.elapsed().as_nanos() as u64);
                        }
                    } else if text.starts_with(r#"{"type":"error""#) {
                        sent_at.pop_front();
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    next = ws.next().now_or_never().flatten();
                }
                if sent_at.len() == window && stop.load(Ordering::Relaxed) {
                    // Nothing arrived in time: give up on this connection.
                    return hist;
                }
            }
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
        "scenario": "ws_publish",
        "publishers": args.publishers,
        "in_flight": args.in_flight,
        "duration_s": args.duration.as_secs_f64(),
        "messages": n,
        "errors": errors.load(Ordering::Acquire),
        "publishes_per_s": n as f64 / cpu_use.wall_seconds,
        "publish_latency": Summary::of(&hist),
        "cpu": cpu_use,
    }))
}
