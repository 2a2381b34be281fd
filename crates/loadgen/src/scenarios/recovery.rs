//! Recovery: `GET /websocket/messages?since=N` answers for M missed messages (latency and
//! messages/s), and a reconnect storm — C clients that missed P messages reconnecting at once
//! with `subscribe` + `since`, each reading until it has caught up.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::run_id;
use crate::Target;
use crate::http::HttpConn;
use crate::probe::scan_sequence;
use crate::stats::{CpuMeter, Summary, latency_histogram, record_nanos};
use crate::ws;

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
        Some(storm(target, &mut http, &publish_auth, args, &run).await?)
    } else {
        None
    };
    Ok(json!({ "scenario": "recovery", "answers": answers, "storm": storm }))
}

/// Publish `n` messages to `bench:{request_id}` in batches of up to 1,000.
async fn publish_many(
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
async fn head(http: &mut HttpConn) -> anyhow::Result<u64> {
    let r = http.get("/readyz", "None").await?;
    let v: Value = serde_json::from_slice(&r.body).context("/readyz is not JSON")?;
    v["head"].as_u64().context("/readyz has no head")
}

async fn storm(
    target: &Target,
    http: &mut HttpConn,
    auth: &str,
    args: &RecoveryArgs,
    run: &str,
) -> anyhow::Result<Value> {
    let request_id = format!("storm-{run}");
    // Everyone follows the key, then drops.
    let clients: Vec<ws::Ws> = futures_util::stream::iter(0..args.clients)
        .map(|n| {
            let request_id = request_id.clone();
            async move {
                let mut c = ws::open(target, n, 4096).await?;
                ws::subscribe(&mut c, "bench", &request_id, None).await?;
                anyhow::Ok(c)
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let last_seen = head(http).await?;
    for mut c in clients {
        let _ = c.close(None).await;
    }
    publish_many(http, auth, &request_id, args.storm_missed).await?;
    let target_head = head(http).await?;

    // Everyone comes back at once.
    let cpu = CpuMeter::start(target.server_pid);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|n| {
            let target = target.clone();
            let request_id = request_id.clone();
            tokio::spawn(async move {
                let mut c = ws::open(&target, n, 64 * 1024).await?;
                let ack = ws::subscribe(&mut c, "bench", &request_id, Some(last_seen)).await?;
                if ack.contains(r#""recovered":false"#) {
                    bail!("resume was not recovered: {ack}");
                }
                let mut got = 0usize;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                loop {
                    let msg = tokio::time::timeout_at(deadline, c.next())
                        .await
                        .context("catching up took over 60 s")?;
                    match msg {
                        Some(Ok(Message::Text(t))) => {
                            if let Some(seq) = scan_sequence(t.as_str()) {
                                got += 1;
                                if seq >= target_head {
                                    break;
                                }
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => bail!("connection ended while catching up"),
                    }
                }
                anyhow::Ok((started.elapsed(), got, c))
            })
        })
        .collect();
    let mut hist = latency_histogram();
    let mut delivered = 0usize;
    let mut keep = Vec::with_capacity(args.clients);
    for t in tasks {
        let (elapsed, got, c) = t.await.context("storm client panicked")??;
        record_nanos(&mut hist, elapsed.as_nanos() as u64);
        delivered += got;
        keep.push(c);
    }
    let all = started.elapsed().as_secs_f64();
    let cpu_use = cpu.stop();
    ensure!(
        delivered == args.clients * args.storm_missed,
        "storm clients received {delivered} messages, expected {}",
        args.clients * args.storm_missed
    );
    drop(keep);
    Ok(json!({
        "clients": args.clients,
        "missed_each": args.storm_missed,
        "all_caught_up_s": all,
        "caught_up": Summary::of(&hist),
        "msgs_per_s": delivered as f64 / all,
        "cpu": cpu_use,
    }))
}
