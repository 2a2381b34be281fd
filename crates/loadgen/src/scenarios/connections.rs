//! Connections: open N authenticated, subscribed, idle WebSocket connections; report the time
//! to accept them and the server's resident memory per connection.

use std::time::Instant;

use anyhow::Context as _;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::run_id;
use crate::stats::{CpuMeter, rss_kib};
use crate::{Target, ws};

/// Connection parameters.
#[derive(Debug, Clone)]
pub struct ConnectionsArgs {
    /// Connections to open.
    pub connections: usize,
    /// Connections being opened at a time.
    pub concurrency: usize,
}

/// Run the scenario.
pub async fn run(target: &Target, args: &ConnectionsArgs) -> anyhow::Result<Value> {
    let pid = target
        .server_pid
        .context("the connections scenario needs --server-pid")?;
    let run = run_id();
    // A few connections first, so the baseline includes the runtime's warmed-up allocations.
    warm_up(target, &run).await?;
    let rss_before = rss_kib(pid)?;
    let cpu = CpuMeter::start(Some(pid));
    let started = Instant::now();
    let conns: Vec<ws::Ws> = futures_util::stream::iter(0..args.connections)
        .map(|n| {
            let run = run.clone();
            async move {
                let mut c = ws::open(target, n, 4096)
                    .await
                    .with_context(|| format!("connection {n}"))?;
                ws::subscribe(&mut c, "bench", &format!("idle-{run}-{n}"), None).await?;
                anyhow::Ok(c)
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let accept_seconds = started.elapsed().as_secs_f64();
    let cpu_use = cpu.stop();
    // Every connection has its sub_ack: the server has done all its work for them.
    let rss_after = rss_kib(pid)?;
    let n = conns.len().max(1);
    drop(conns);
    Ok(json!({
        "scenario": "connections",
        "connections": args.connections,
        "accept_seconds": accept_seconds,
        "connections_per_s": args.connections as f64 / accept_seconds,
        "server_rss_before_kib": rss_before,
        "server_rss_after_kib": rss_after,
        "rss_per_connection_bytes": (rss_after.saturating_sub(rss_before) * 1024) as f64 / n as f64,
        "cpu": cpu_use,
    }))
}

async fn warm_up(target: &Target, run: &str) -> anyhow::Result<()> {
    let mut warm = Vec::new();
    for n in 0..32 {
        let mut c = ws::open(target, n, 4096).await?;
        ws::subscribe(&mut c, "bench", &format!("warm-{run}-{n}"), None).await?;
        warm.push(c);
    }
    Ok(())
}
