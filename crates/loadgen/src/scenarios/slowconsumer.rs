//! Slow consumer: a fixed-rate fan-out (the `fanout` scenario's subscribers and publishers)
//! with one extra subscriber that stops reading for a while — its socket has a small receive
//! buffer, so the TCP buffers fill and the server's send queue with them — and then reads
//! everything. Measured: the other subscribers' publish → receive latency from the stall on
//! against a baseline run of the same shape without the staller, and the server's RSS before,
//! during and after. Checked: the staller was not closed and received every message once, in
//! order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::fanout::{self, FanoutArgs, Shared};
use super::{run_id, sleep_until};
use crate::Target;
use crate::check::StreamCheck;
use crate::stats::{CpuMeter, rss_kib};
use crate::ws;

/// Slow-consumer parameters.
#[derive(Debug, Clone)]
pub struct SlowArgs {
    /// The fan-out: subscribers, rate, publishers, padding; `duration` is the stalled run's
    /// length and `warmup` the baseline's.
    pub fanout: FanoutArgs,
    /// Measured length of the baseline run (0: none).
    pub baseline: Duration,
    /// When the staller stops reading, from the start of the run.
    pub stall_at: Duration,
    /// How long it does not read.
    pub stall: Duration,
    /// The staller's SO_RCVBUF.
    pub recv_buffer: u32,
    /// Longest the staller may take to have everything once publishing ended.
    pub drain_deadline: Duration,
}

/// RSS samples (seconds into the run, KiB) taken every 100 ms.
struct RssSampler {
    samples: Arc<Mutex<Vec<(f64, u64)>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: Option<u32>, start: Instant) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let samples = Arc::clone(&samples);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let Some(pid) = pid else { return };
                while !stop.load(Ordering::Relaxed) {
                    if let (Ok(kib), Ok(mut s)) = (rss_kib(pid), samples.lock()) {
                        s.push((start.elapsed().as_secs_f64(), kib));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        RssSampler {
            samples,
            stop,
            task,
        }
    }

    async fn finish(self) -> Vec<(f64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.samples.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Last sample before `t`, and the largest sample from `t` on.
fn before_and_peak(samples: &[(f64, u64)], t: f64) -> (Option<u64>, Option<u64>) {
    let before = samples
        .iter()
        .filter(|(s, _)| *s < t)
        .map(|x| x.1)
        .next_back();
    let peak = samples.iter().filter(|(s, _)| *s >= t).map(|x| x.1).max();
    (before.or(samples.first().map(|x| x.1)), peak)
}

/// What the staller saw.
#[derive(Debug, Default)]
struct Staller {
    check: StreamCheck,
    /// Why it stopped before having everything (a close, an error, the deadline).
    ended: Option<String>,
    /// Seconds into the run when it had every published message.
    caught_up_at_s: Option<f64>,
    /// Messages it had when it stopped reading.
    had_at_stall: u64,
}

/// Read normally until `stall_at`, not at all until `stall_at + stall`, then everything until
/// it has `expected` messages (known once publishing ended) or `deadline`.
async fn staller(
    mut c: ws::Ws,
    start: Instant,
    args: SlowArgs,
    mut expected: watch::Receiver<Option<u64>>,
    deadline: tokio::time::Instant,
) -> Staller {
    let mut s = Staller::default();
    let stall_from = tokio::time::Instant::from(start + args.stall_at);
    let mut reading_until = stall_from;
    loop {
        if tokio::time::Instant::now() >= reading_until && reading_until == stall_from {
            // The stall: the socket is not read; its buffers fill.
            s.had_at_stall = s.check.received;
            sleep_until(start, args.stall_at + args.stall).await;
            reading_until = deadline;
        }
        let expected_now = *expected.borrow();
        if let Some(n) = expected_now
            && s.check.received >= n
            && reading_until == deadline
        {
            s.caught_up_at_s = Some(start.elapsed().as_secs_f64());
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            s.ended = Some(format!(
                "not caught up by the deadline: {} messages received",
                s.check.received
            ));
            break;
        }
        tokio::select! {
            frame = tokio::time::timeout_at(reading_until, c.next()) => match frame {
                Err(_) => {}
                Ok(Some(Ok(Message::Text(t)))) => {
                    s.check.on_frame(t.as_str());
                }
                Ok(Some(Ok(Message::Close(f)))) => {
                    s.ended = Some(format!(
                        "closed by the server: {}",
                        f.map_or("no close frame".into(), |f| format!("{} {}", f.code, f.reason))
                    ));
                    break;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => {
                    s.ended = Some(format!("connection failed: {e}"));
                    break;
                }
                Ok(None) => {
                    s.ended = Some("connection ended".into());
                    break;
                }
            },
            _ = expected.changed() => {}
        }
    }
    let _ = c.close(None).await;
    s
}

/// One fixed-rate fan-out run of `length`, latency recorded for probes sent within `record`,
/// with a staller when `stall` is set.
async fn phase(
    target: &Target,
    args: &SlowArgs,
    name: &str,
    length: Duration,
    record: std::ops::Range<Duration>,
    stall: bool,
) -> anyhow::Result<(Value, Option<Staller>)> {
    let f = &args.fanout;
    let request_id = format!("slow-{name}-{}", run_id());
    let subs =
        fanout::connect_subscribers(target, f.subscribers, &request_id, f.connect_concurrency)
            .await?;
    let stalled_conn = if stall {
        let (mut c, _) = ws::open_with(target, f.subscribers, 4096, Some(args.recv_buffer)).await?;
        ws::subscribe(&mut c, "bench", &request_id, None).await?;
        Some(c)
    } else {
        None
    };

    let shared: Arc<Shared> = Shared::new(f.subscribers, record.clone())?;
    let rss = RssSampler::start(target.server_pid, shared.start);
    let readers = fanout::spawn_readers(&shared, subs);
    let (expected_tx, expected_rx) = watch::channel(None);
    let staller_task = stalled_conn.map(|c| {
        let deadline = tokio::time::Instant::from(shared.start + length + args.drain_deadline);
        tokio::spawn(staller(
            c,
            shared.start,
            args.clone(),
            expected_rx,
            deadline,
        ))
    });
    let publishing = fanout::spawn_publishers(target, &shared, f, &request_id, length).await?;
    let errors = Arc::clone(&publishing.errors);

    sleep_until(shared.start, record.start).await;
    let cpu = CpuMeter::start(target.server_pid);
    let deliveries_before = shared.deliveries.load(Ordering::Acquire);
    sleep_until(shared.start, length).await;
    let deliveries_in_window = shared.deliveries.load(Ordering::Acquire) - deliveries_before;
    let cpu_use = cpu.stop();

    let published = publishing.join().await?;
    let _ = expected_tx.send(Some(published));
    fanout::drain_and_stop(&shared, readers, published, Duration::from_secs(10)).await;
    let staller = match staller_task {
        Some(t) => Some(t.await?),
        None => None,
    };
    let ended_at = shared.start.elapsed().as_secs_f64();
    let samples = rss.finish().await;

    let (latency, last) = fanout::latencies(&shared);
    let deliveries = shared.deliveries.load(Ordering::Acquire);
    let expected = published * f.subscribers as u64;
    let (before, peak) = before_and_peak(&samples, record.start.as_secs_f64());
    let v = json!({
        "length_s": length.as_secs_f64(),
        "recorded_from_s": record.start.as_secs_f64(),
        "published": published,
        "publish_errors": errors.load(Ordering::Acquire),
        "lost_deliveries": expected.saturating_sub(deliveries),
        "connections_ended_early": shared.ended_early.load(Ordering::Relaxed),
        "deliveries_per_s": deliveries_in_window as f64 / cpu_use.wall_seconds,
        "latency": latency,
        "last_subscriber": last,
        "rss_kib": {
            "before": before,
            "peak": peak,
            "after": samples.last().map(|x| x.1),
            "samples": samples.len(),
        },
        "ended_at_s": ended_at,
        "cpu": cpu_use,
    });
    Ok((v, staller))
}

/// Run the scenario.
pub async fn run(target: &Target, args: &SlowArgs) -> anyhow::Result<Value> {
    let f = &args.fanout;
    if f.subscribers == 0 || f.publishers == 0 || f.rate.is_none() {
        bail!("need subscribers, publishers and a rate");
    }
    if args.stall_at + args.stall >= f.duration {
        bail!("the stall must end before the run does");
    }
    let mut problems: Vec<String> = Vec::new();
    let baseline = if args.baseline > Duration::ZERO {
        let (v, _) = phase(
            target,
            args,
            "base",
            f.warmup + args.baseline,
            f.warmup..Duration::MAX,
            false,
        )
        .await?;
        Some(v)
    } else {
        None
    };
    let (stalled, staller) = phase(
        target,
        args,
        "stall",
        f.duration,
        args.stall_at..Duration::MAX,
        true,
    )
    .await?;
    let s = staller.unwrap_or_default();
    let published = stalled["published"].as_u64().unwrap_or(0);
    if let Some(why) = &s.ended {
        problems.push(format!("the stalled subscriber: {why}"));
    }
    if !s.check.is_exactly(published) {
        problems.push(format!(
            "the stalled subscriber received {} of {published} messages up to stream_sequence {}, {} out of order: {:?}",
            s.check.received, s.check.last_stream, s.check.violations, s.check.problems
        ));
    }
    for (name, v) in [
        ("baseline", baseline.as_ref()),
        ("stalled run", Some(&stalled)),
    ] {
        if let Some(lost) = v
            .and_then(|v| v["lost_deliveries"].as_u64())
            .filter(|l| *l > 0)
        {
            problems.push(format!(
                "{name}: the other subscribers lost {lost} deliveries"
            ));
        }
    }
    let p99 = |v: Option<&Value>| v.and_then(|v| v["latency"]["p99_ms"].as_f64());
    let ratio = match (p99(Some(&stalled)), p99(baseline.as_ref())) {
        (Some(s), Some(b)) if b > 0.0 => Some(s / b),
        _ => None,
    };
    let rss_growth_kib = match (
        stalled["rss_kib"]["before"].as_u64(),
        stalled["rss_kib"]["peak"].as_u64(),
    ) {
        (Some(b), Some(p)) => Some(p.saturating_sub(b)),
        _ => None,
    };
    Ok(json!({
        "scenario": "slowconsumer",
        "subscribers": f.subscribers,
        "target_msgs_per_s": f.rate,
        "target_deliveries_per_s": f.rate.map(|r| r * f.subscribers as f64),
        "pad_bytes": f.pad,
        "stall_at_s": args.stall_at.as_secs_f64(),
        "stall_s": args.stall.as_secs_f64(),
        "baseline": baseline,
        "stalled": stalled,
        "p99_ratio": ratio,
        "rss_growth_kib": rss_growth_kib,
        "staller": {
            "received": s.check.received,
            "expected": published,
            "had_at_stall": s.had_at_stall,
            "exact": s.check.is_exactly(published),
            "ended": s.ended,
            "caught_up_at_s": s.caught_up_at_s,
            "check": s.check,
        },
        "problems": problems,
        "cpu": stalled["cpu"],
    }))
}
