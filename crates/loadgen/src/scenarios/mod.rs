//! The benchmark scenarios. Each returns one JSON object: its parameters, its results, and the
//! CPU the load generator and the server used while it ran.

pub mod catchup;
pub mod connections;
pub mod fanout;
pub mod publish;
pub mod recovery;
pub mod resume;
pub mod slowconsumer;
pub mod sse;
pub mod store;
pub mod storm;
pub mod tokens;
pub mod wspublish;

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde_json::Value;

use crate::http::HttpConn;

/// The closed-loop publishers' measured window: wait `warmup`, raise `measuring` for
/// `duration` while the server's CPU is metered, then raise `stop` and merge the publishers'
/// latency histograms. Returns the CPU use of the window and the merged histogram.
pub(crate) async fn measure_closed_loop(
    warmup: Duration,
    duration: Duration,
    server_pid: Option<u32>,
    measuring: &std::sync::atomic::AtomicBool,
    stop: &std::sync::atomic::AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<hdrhistogram::Histogram<u64>>>,
) -> anyhow::Result<(crate::stats::CpuUse, hdrhistogram::Histogram<u64>)> {
    use std::sync::atomic::Ordering;
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Release);
    let cpu = crate::stats::CpuMeter::start(server_pid);
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Release);
    let cpu_use = cpu.stop();
    stop.store(true, Ordering::Release);
    let mut hist = crate::stats::latency_histogram();
    for t in tasks {
        let h = t.await.context("publisher panicked")?;
        hist.add(&h).ok();
    }
    Ok((cpu_use, hist))
}

/// Sleep until `deadline` measured from `start`.
pub(crate) async fn sleep_until(start: Instant, at: Duration) {
    tokio::time::sleep_until((start + at).into()).await;
}

/// A run-unique suffix for keys, so repeated runs against one server never share a stream.
pub(crate) fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}", nanos & 0xffff_ffff_ffff)
}

/// Publish `n` messages to `bench:{request_id}` in batches of up to 1,000 (`POST
/// /api/publish/batch`), `data` `{"n":i}`.
pub(crate) async fn publish_many(
    http: &mut HttpConn,
    auth: &str,
    request_id: &str,
    n: usize,
) -> anyhow::Result<()> {
    let mut left = n;
    let mut i = 0usize;
    while left > 0 {
        let b = left.min(1000);
        let mut body = String::from(r#"{"messages":["#);
        for j in 0..b {
            if j > 0 {
                body.push(',');
            }
            body.push_str(&format!(
                r#"{{"channel":"bench","request_id":"{request_id}","data":{{"n":{}}}}}"#,
                i + j
            ));
        }
        body.push_str("]}");
        let r = http
            .post_json("/api/publish/batch", auth, body.as_bytes())
            .await?;
        ensure!(
            r.status == 200,
            "batch publish answered {}: {}",
            r.status,
            r.text()
        );
        left -= b;
        i += b;
    }
    Ok(())
}

/// The server's head, from `/readyz`.
pub(crate) async fn head(http: &mut HttpConn) -> anyhow::Result<u64> {
    let r = http.get("/readyz", "None").await?;
    let v: Value = serde_json::from_slice(&r.body).context("/readyz is not JSON")?;
    v["head"].as_u64().context("/readyz has no head")
}

/// Fail early, in words, when this process may not open `needed` file descriptors (`cargo
/// xtask bench` raises the soft limit to the hard one before starting the load generator).
pub(crate) fn ensure_fds(needed: u64) -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(soft) = soft {
        ensure!(
            soft >= needed,
            "{needed} file descriptors needed but the soft limit is {soft}: raise it (ulimit -n \"$(ulimit -Hn)\")"
        );
    }
    Ok(())
}
