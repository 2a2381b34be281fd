//! Reconnect storm: C clients follow one key, all drop, M messages are published, and all C
//! reconnect at once with `subscribe` + `since` (the `head` their `sub_ack` named, with its
//! `epoch`); each reads until it has every message it missed. Each client's messages are
//! checked: exactly stream sequences 1..=M, once each, in order.
//!
//! Run on its own against a server whose in-memory tail is small (`--cache-bytes`), the missed
//! messages come from the log; the `recovery` scenario runs the same storm from memory.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{ensure_fds, publish_many, run_id};
use crate::Target;
use crate::check::StreamCheck;
use crate::http::HttpConn;
use crate::stats::{CpuMeter, Summary, latency_histogram, record_nanos};
use crate::ws;

/// Storm parameters.
#[derive(Debug, Clone)]
pub struct StormArgs {
    /// Clients that drop and come back at once.
    pub clients: usize,
    /// Messages published while they are away.
    pub missed: usize,
    /// Longest a client may take to catch up (from the start of the storm).
    pub deadline: Duration,
}

/// Run the scenario on its own key.
pub async fn run(target: &Target, args: &StormArgs) -> anyhow::Result<Value> {
    let mut v = storm(target, args, &format!("storm-{}", run_id())).await?;
    v["scenario"] = "storm".into();
    Ok(v)
}

/// What one returning client saw.
struct Outcome {
    elapsed: Duration,
    check: StreamCheck,
    failure: Option<String>,
}

/// The storm on `bench:{request_id}`. Problems (a client that failed, timed out, was not
/// recovered or saw a gap, a duplicate or disorder) are listed in `problems`, not raised.
pub async fn storm(target: &Target, args: &StormArgs, request_id: &str) -> anyhow::Result<Value> {
    ensure_fds(args.clients as u64 + 64)?;
    let mut http = HttpConn::connect(target.addr).await?;
    let auth = format!("ApiKey {}", target.api_key);
    // Everyone follows the key and remembers where it stands, then drops.
    let acks: Vec<ws::Ack> = futures_util::stream::iter(0..args.clients)
        .map(|n| async move {
            let mut c = ws::open(target, n, 4096).await?;
            let ack = ws::subscribe_with(&mut c, "bench", request_id, None, None).await?;
            let _ = c.close(None).await;
            anyhow::Ok(ack)
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    publish_many(&mut http, &auth, request_id, args.missed).await?;

    // Everyone comes back at once.
    let missed = args.missed as u64;
    let cpu = CpuMeter::start(target.server_pid);
    let started = Instant::now();
    let deadline = tokio::time::Instant::from(started + args.deadline);
    let tasks: Vec<_> = acks
        .into_iter()
        .enumerate()
        .map(|(n, ack)| {
            let target = target.clone();
            let request_id = request_id.to_owned();
            tokio::spawn(async move {
                let mut check = StreamCheck::after(0);
                let result =
                    catch_up(&target, n, &request_id, &ack, missed, deadline, &mut check).await;
                let elapsed = started.elapsed();
                // The connection is kept open until everyone is done, so that closes do not
                // disturb the others.
                let (conn, failure) = match result {
                    Ok(c) => (Some(c), None),
                    Err(e) => (None, Some(format!("{e:#}"))),
                };
                (
                    Outcome {
                        elapsed,
                        check,
                        failure,
                    },
                    conn,
                )
            })
        })
        .collect();
    let mut hist = latency_histogram();
    let mut delivered = 0u64;
    let mut exact = 0usize;
    let mut failed = 0usize;
    let mut problems: Vec<String> = Vec::new();
    let mut keep = Vec::with_capacity(args.clients);
    for t in tasks {
        let (o, conn) = t.await.context("storm client panicked")?;
        keep.push(conn);
        delivered += o.check.received;
        if let Some(f) = o.failure {
            failed += 1;
            if problems.len() < 5 {
                problems.push(f);
            }
            continue;
        }
        record_nanos(&mut hist, o.elapsed.as_nanos() as u64);
        if o.check.is_exactly(missed) {
            exact += 1;
        } else if problems.len() < 5 {
            problems.push(format!(
                "a client received {} messages up to stream_sequence {} with {} out of order: {:?}",
                o.check.received, o.check.last_stream, o.check.violations, o.check.problems
            ));
        }
    }
    let all = started.elapsed().as_secs_f64();
    let cpu_use = cpu.stop();
    drop(keep);
    if exact < args.clients {
        problems.insert(
            0,
            format!(
                "{exact} of {} clients received exactly the {missed} missed messages in order ({failed} failed)",
                args.clients
            ),
        );
    }
    Ok(json!({
        "clients": args.clients,
        "missed_each": args.missed,
        "all_caught_up_s": all,
        "caught_up": Summary::of(&hist),
        "msgs_per_s": delivered as f64 / all,
        "delivered": delivered,
        "clients_exact": exact,
        "clients_failed": failed,
        "problems": problems,
        "cpu": cpu_use,
    }))
}

/// Reconnect, resume from `ack` and read until stream sequence `missed` arrived.
async fn catch_up(
    target: &Target,
    n: usize,
    request_id: &str,
    ack: &ws::Ack,
    missed: u64,
    deadline: tokio::time::Instant,
    check: &mut StreamCheck,
) -> anyhow::Result<ws::Ws> {
    let work = async {
        let (mut c, _) = ws::open_with(target, n, 64 * 1024, None).await?;
        let resumed = ws::subscribe_with(
            &mut c,
            "bench",
            request_id,
            Some(ack.head),
            Some(&ack.epoch),
        )
        .await?;
        if resumed.recovered == Some(false) {
            anyhow::bail!("resume was not recovered: {}", resumed.text);
        }
        while check.last_stream < missed {
            match c.next().await {
                Some(Ok(Message::Text(t))) => {
                    check.on_frame(t.as_str());
                }
                Some(Ok(Message::Close(f))) => {
                    anyhow::bail!("closed while catching up: {f:?}")
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => anyhow::bail!("connection failed while catching up: {e}"),
                None => anyhow::bail!("connection ended while catching up"),
            }
        }
        anyhow::Ok(c)
    };
    let result = tokio::time::timeout_at(deadline, work).await;
    match result {
        Ok(r) => r,
        Err(_) => anyhow::bail!(
            "not caught up by the deadline: {} of {missed} messages",
            check.received
        ),
    }
}
