//! Catch-up from the log: N messages are published to one key (batch publish) while nobody
//! follows it; then one client subscribes with `since` = the head before publishing (and the
//! store's `epoch`) and reads until it has all N. Measures messages/s, the time from sending
//! `subscribe` to the last missed message ("time to live"), and the server's CPU seconds over
//! that interval. Then a few messages are published live and must follow at the seam. Every
//! message is checked: stream sequences 1..=N+live, once each, in order.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{head, publish_many, run_id};
use crate::Target;
use crate::check::StreamCheck;
use crate::http::HttpConn;
use crate::stats::{CpuMeter, server_cpu_seconds, thread_cpu_seconds};
use crate::ws;

/// Catch-up parameters.
#[derive(Debug, Clone)]
pub struct CatchupArgs {
    /// Messages published before the subscriber arrives.
    pub messages: usize,
    /// Messages published live after the catch-up, to check the seam.
    pub live: usize,
    /// Pause between publishing and subscribing, so that the database's background work after
    /// the burst (the WAL checkpoint) is not counted as catch-up CPU.
    pub settle: Duration,
    /// Longest the catch-up (and, separately, the live part) may take.
    pub deadline: Duration,
}

/// How reading up to a stream sequence ended.
enum Read {
    Reached,
    Ended(String),
    TimedOut,
}

/// Read frames into `check` until stream sequence `until` arrived.
async fn read_until(
    c: &mut ws::Ws,
    check: &mut StreamCheck,
    until: u64,
    deadline: tokio::time::Instant,
) -> Read {
    while check.last_stream < until {
        match tokio::time::timeout_at(deadline, c.next()).await {
            Err(_) => return Read::TimedOut,
            Ok(Some(Ok(Message::Text(t)))) => {
                check.on_frame(t.as_str());
            }
            Ok(Some(Ok(Message::Close(f)))) => return Read::Ended(format!("closed: {f:?}")),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Read::Ended(format!("connection failed: {e}")),
            Ok(None) => return Read::Ended("connection ended".into()),
        }
    }
    Read::Reached
}

/// Run the scenario.
pub async fn run(target: &Target, args: &CatchupArgs) -> anyhow::Result<Value> {
    let request_id = format!("catchup-{}", run_id());
    let mut http = HttpConn::connect(target.addr).await?;
    let auth = format!("ApiKey {}", target.api_key);
    let n = args.messages as u64;
    let mut problems: Vec<String> = Vec::new();

    let since = head(&mut http).await?;
    let published_at = Instant::now();
    publish_many(&mut http, &auth, &request_id, args.messages).await?;
    let publish_s = published_at.elapsed().as_secs_f64();
    tokio::time::sleep(args.settle).await;

    let (mut c, hello) = ws::open_with(target, 0, 256 * 1024, None).await?;
    let mut check = StreamCheck::after(0);
    let cpu = CpuMeter::start(target.server_pid);
    let threads_before = target.server_pid.and_then(thread_cpu_seconds);
    let started = Instant::now();
    let deadline = tokio::time::Instant::from(started + args.deadline);
    let ack = ws::subscribe_with(
        &mut c,
        "bench",
        &request_id,
        Some(since),
        Some(&hello.epoch),
    );
    let ack = tokio::time::timeout_at(deadline, ack).await;
    let ack = match ack {
        Ok(a) => a?,
        Err(_) => anyhow::bail!("no sub_ack within {:?}", args.deadline),
    };
    let sub_ack_s = started.elapsed().as_secs_f64();
    if ack.recovered == Some(false) {
        problems.push(format!(
            "history did not reach back to since + 1 = {}: {}",
            since + 1,
            ack.text
        ));
    }
    let outcome = if problems.is_empty() {
        read_until(&mut c, &mut check, n, deadline).await
    } else {
        Read::Ended("not recovered".into())
    };
    let time_to_live = started.elapsed().as_secs_f64();
    let threads_after = target.server_pid.and_then(thread_cpu_seconds);
    let cpu_use = cpu.stop();
    match &outcome {
        Read::Reached => {}
        Read::Ended(why) => problems.push(format!(
            "catch-up stopped after {} of {n} messages: {why}",
            check.received
        )),
        Read::TimedOut => problems.push(format!(
            "catch-up not done within {:?}: {} of {n} messages",
            args.deadline, check.received
        )),
    }

    // The seam: messages published now arrive live, right after the caught-up ones.
    let mut live_s = None;
    if matches!(outcome, Read::Reached) && args.live > 0 {
        let t = Instant::now();
        publish_many(&mut http, &auth, &request_id, args.live).await?;
        let until = n + args.live as u64;
        let deadline = tokio::time::Instant::now() + args.deadline;
        match read_until(&mut c, &mut check, until, deadline).await {
            Read::Reached => live_s = Some(t.elapsed().as_secs_f64()),
            Read::Ended(why) => problems.push(format!("live after catch-up: {why}")),
            Read::TimedOut => problems.push(format!(
                "live after catch-up: {} of {} messages within {:?}",
                check.received, until, args.deadline
            )),
        }
    }
    let expected = n + args.live as u64;
    if problems.is_empty() && !check.is_exactly(expected) {
        problems.push(format!(
            "received {} messages up to stream_sequence {} (expected exactly 1..={expected}), {} out of order: {:?}",
            check.received, check.last_stream, check.violations, check.problems
        ));
    }
    let (server_cpu_s, ticks_s) = server_cpu_seconds(threads_before, threads_after, &cpu_use);
    let caught = check.received.min(n) as f64;
    let _ = c.close(None).await;
    Ok(json!({
        "scenario": "catchup",
        "messages": n,
        "since": since,
        "publish_s": publish_s,
        "publish_msgs_per_s": n as f64 / publish_s.max(1e-9),
        "sub_ack_s": sub_ack_s,
        "drained": ack.drained,
        "recovered": ack.recovered,
        "time_to_live_s": time_to_live,
        "msgs_per_s": caught / time_to_live.max(1e-9),
        "server_cpu_s": server_cpu_s,
        "server_cpu_ticks_s": ticks_s,
        "msgs_per_server_cpu_s": server_cpu_s.filter(|s| *s > 0.0).map(|s| caught / s),
        "live_messages": args.live,
        "live_s": live_s,
        "check": check,
        "problems": problems,
        "cpu": cpu_use,
    }))
}
