//! Recovery: `GET /websocket/messages?since=N` answers for M missed messages (latency and
//! messages/s), and a reconnect storm — C clients that missed P messages reconnecting at once
//! with `subscribe` + `since`, each reading until it has caught up.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use super::{head, publish_many, run_id, storm};
use crate::Target;
use crate::http::HttpConn;
use crate::stats::{CpuMeter, Summary, latency_histogram, record_nanos};

/// Recovery parameters.
#[derive(Debug, Clone)]
pub struct RecoveryArgs {
    /// Missed-message counts to ask `since` answers for (each at most 10,000, the page cap).
    pub missed: Vec<usize>,
    /// Requests timed per count.
    pub repeats: usize,
    /// Clients in the reconnect storm (0 skips it).
    pub clients: usize,
    /// Messages each storm client missed.
    pub storm_missed: usize,
}

/// Run the scenario.
pub async fn run(target: &Target, args: &RecoveryArgs) -> anyhow::Result<Value> {
    let run = run_id();
    let mut http = HttpConn::connect(target.addr).await?;
    let publish_auth = format!("ApiKey {}", target.api_key);
    let read_auth = format!("Bearer {}", target.token);

    let most = args.missed.iter().copied().max().unwrap_or(0);
    publish_many(&mut http, &publish_auth, &format!("rec-{run}"), most).await?;
    let head = head(&mut http).await?;

    let mut answers = Vec::new();
    for &m in &args.missed {
        let since = head.saturating_sub(m as u64);
        let path = format!("/websocket/messages?since={since}&limit={m}");
        // First answer: check it is complete and whole, untimed.
        let r = http.get(&path, &read_auth).await?;
        ensure!(
            r.status == 200,
            "recovery answered {}: {}",
            r.status,
            r.text()
        );
        let body: Value = serde_json::from_slice(&r.body).context("recovery answer is not JSON")?;
        let got = body["messages"].as_array().map_or(0, Vec::len);
        ensure!(
            got == m && body["complete"] == Value::Bool(true),
            "recovery of {m} returned {got} messages, complete={} (is the recovery window at least {m}?)",
            body["complete"]
        );
        let cpu = CpuMeter::start(target.server_pid);
        let mut hist = latency_histogram();
        let mut bytes = 0usize;
        for _ in 0..args.repeats.max(1) {
            let t = Instant::now();
            let r = http.get(&path, &read_auth).await?;
            record_nanos(&mut hist, t.elapsed().as_nanos() as u64);
            ensure!(r.status == 200, "recovery answered {}", r.status);
            bytes = r.body.len();
        }
        let cpu_use = cpu.stop();
        let s = Summary::of(&hist);
        answers.push(json!({
            "missed": m,
            "source": "buffer",
            "answer_bytes": bytes,
            "latency": s,
            "msgs_per_s": if s.p50_ms > 0.0 { m as f64 / (s.p50_ms / 1000.0) } else { 0.0 },
            "cpu": cpu_use,
        }));
    }

    let storm = if args.clients > 0 {
        Some(storm(target, args, &run).await?)
    } else {
        None
    };
    Ok(json!({ "scenario": "recovery", "answers": answers, "storm": storm }))
}

async fn storm(target: &Target, args: &RecoveryArgs, run: &str) -> anyhow::Result<Value> {
    let v = storm::storm(
        target,
        &storm::StormArgs {
            clients: args.clients,
            missed: args.storm_missed,
            deadline: Duration::from_secs(60),
        },
        &format!("storm-{run}"),
    )
    .await?;
    if let Some(problems) = v["problems"].as_array().filter(|p| !p.is_empty()) {
        bail!("reconnect storm: {}", Value::from(problems.clone()));
    }
    Ok(v)
}
