//! Fan-out: one key, N subscribers. At a fixed publish rate (latency: publish → receive per
//! delivery, and until the last subscriber has each message) or as fast as the server
//! delivers (burst: deliveries/s, with a bounded number of messages in flight so that no
//! subscriber's send queue overflows).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use super::{run_id, sleep_until};
use crate::Target;
use crate::http::HttpConn;
use crate::probe::{probe_data_padded, scan_probe};
use crate::stats::{CpuMeter, Summary, latency_histogram, record_nanos};
use crate::ws;

/// Fan-out parameters.
#[derive(Debug, Clone)]
pub struct FanoutArgs {
    /// Subscribers on the one key.
    pub subscribers: usize,
    /// Messages published per second; None = burst (as fast as delivered).
    pub rate: Option<f64>,
    /// Measured time.
    pub duration: Duration,
    /// Time before measuring starts.
    pub warmup: Duration,
    /// Concurrent publisher connections.
    pub publishers: usize,
    /// Messages per publish request in burst mode (the batch endpoint).
    pub batch: usize,
    /// Burst mode: most messages published but not yet received by every subscriber.
    pub window: usize,
    /// Connections opened at a time.
    pub connect_concurrency: usize,
    /// Bytes of padding in each message's `data` (0: the bare probe).
    pub pad: usize,
    /// Distinct keys the subscribers are spread over (1: all on one key). Message `i` goes to
    /// key `i % keys`, subscriber `n` follows key `n % keys` (paced runs only).
    pub keys: usize,
}

impl FanoutArgs {
    /// Subscribers of each key: the deliveries one message makes.
    pub(crate) fn per_key(&self) -> usize {
        self.subscribers / self.keys.max(1)
    }
}

/// The request id of key number `k` of a run over `keys` keys (the run's own id for one key).
pub(crate) fn key_request_id(request_id: &str, keys: usize, k: u64) -> std::borrow::Cow<'_, str> {
    if keys <= 1 {
        std::borrow::Cow::Borrowed(request_id)
    } else {
        std::borrow::Cow::Owned(format!("{request_id}-{}", k % keys as u64))
    }
}

/// Message counters are a ring this large; a message's slot is reused only after every
/// subscriber had it (burst) or never (rate mode sends fewer messages than this).
const RING: usize = 1 << 20;
/// Latency histogram shards: subscriber `n` records into shard `n % SHARDS`.
const SHARDS: usize = 16;

/// The state the subscribers and publishers of one fan-out run share; its clock starts when it
/// is made.
pub(crate) struct Shared {
    pub(crate) start: Instant,
    subscribers: u32,
    counts: Box<[AtomicU32]>,
    pub(crate) deliveries: AtomicU64,
    pub(crate) complete: AtomicU64,
    /// Probes sent before this many nanoseconds into the run are warm-up: not recorded.
    record_after_ns: u64,
    /// Probes sent from this many nanoseconds on are not recorded either.
    record_until_ns: u64,
    deliver: Vec<Mutex<Histogram<u64>>>,
    last: Mutex<Histogram<u64>>,
    progress: Notify,
    pub(crate) ended_early: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    /// A run of `subscribers` readers whose latency is recorded for probes sent within
    /// `record` (from the run's start); the clock starts now.
    pub(crate) fn new(
        subscribers: usize,
        record: std::ops::Range<Duration>,
    ) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Shared {
            start: Instant::now(),
            subscribers: u32::try_from(subscribers).context("too many subscribers")?,
            counts: (0..RING).map(|_| AtomicU32::new(0)).collect(),
            deliveries: AtomicU64::new(0),
            complete: AtomicU64::new(0),
            record_after_ns: record.start.as_nanos() as u64,
            record_until_ns: u64::try_from(record.end.as_nanos()).unwrap_or(u64::MAX),
            deliver: (0..SHARDS)
                .map(|_| Mutex::new(latency_histogram()))
                .collect(),
            last: Mutex::new(latency_histogram()),
            progress: Notify::new(),
            ended_early: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        }))
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Whether the run told its readers to stop.
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Account for a frame received by subscriber number `shard` (any number: it picks a
    /// histogram shard).
    pub(crate) fn on_frame(&self, text: &str, shard: usize) {
        let shard = shard % SHARDS;
        let Some((index, sent_ns)) = scan_probe(text) else {
            return;
        };
        let now = self.now_ns();
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        let record = sent_ns >= self.record_after_ns && sent_ns < self.record_until_ns;
        if record && let Ok(mut h) = self.deliver[shard].lock() {
            record_nanos(&mut h, now.saturating_sub(sent_ns));
        }
        let slot = &self.counts[index as usize % RING];
        if slot.fetch_add(1, Ordering::AcqRel) + 1 == self.subscribers {
            slot.store(0, Ordering::Release);
            self.complete.fetch_add(1, Ordering::AcqRel);
            if record && let Ok(mut h) = self.last.lock() {
                record_nanos(&mut h, now.saturating_sub(sent_ns));
            }
            self.progress.notify_waiters();
        }
    }
}

/// Connect `n` subscribers to `bench:{request_id}`, `concurrency` at a time.
pub(crate) async fn connect_subscribers(
    target: &Target,
    n: usize,
    request_id: &str,
    concurrency: usize,
) -> anyhow::Result<Vec<ws::Ws>> {
    futures_util::stream::iter(0..n)
        .map(|n| async move {
            let mut c = ws::open(target, n, 64 * 1024).await?;
            ws::subscribe(&mut c, "bench", request_id, None).await?;
            anyhow::Ok(c)
        })
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// One reader task per subscriber, feeding `shared`.
pub(crate) fn spawn_readers(
    shared: &Arc<Shared>,
    subs: Vec<ws::Ws>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut readers = Vec::with_capacity(subs.len());
    for (n, mut c) in subs.into_iter().enumerate() {
        let shared = Arc::clone(shared);
        readers.push(tokio::spawn(async move {
            let shard = n % SHARDS;
            while let Some(msg) = c.next().await {
                match msg {
                    Ok(Message::Text(t)) => shared.on_frame(t.as_str(), shard),
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            if !shared.stop.load(Ordering::Relaxed) {
                shared.ended_early.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    readers
}

/// The publisher tasks of a run and what they count.
pub(crate) struct Publishing {
    handles: Vec<tokio::task::JoinHandle<()>>,
    /// Messages published (answered 200).
    pub(crate) published: Arc<AtomicU64>,
    /// Failed publish requests.
    pub(crate) errors: Arc<AtomicU64>,
}

impl Publishing {
    /// Wait until every publisher has finished; returns the messages published.
    pub(crate) async fn join(self) -> anyhow::Result<u64> {
        for p in self.handles {
            p.await.context("publisher panicked")?;
        }
        Ok(self.published.load(Ordering::Acquire))
    }
}

/// Start `args.publishers` publishers to `bench:{request_id}` until `total` into the run.
pub(crate) async fn spawn_publishers(
    target: &Target,
    shared: &Arc<Shared>,
    args: &FanoutArgs,
    request_id: &str,
    total: Duration,
) -> anyhow::Result<Publishing> {
    let published = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for k in 0..args.publishers {
        let mut conn = HttpConn::connect(target.publish_addr.unwrap_or(target.addr)).await?;
        let shared = Arc::clone(shared);
        let published = Arc::clone(&published);
        let errors = Arc::clone(&errors);
        let auth = format!("ApiKey {}", target.api_key);
        let request_id = request_id.to_owned();
        let args = args.clone();
        handles.push(tokio::spawn(async move {
            match args.rate {
                Some(rate) => {
                    publish_at_rate(
                        &mut conn,
                        &shared,
                        &auth,
                        &request_id,
                        rate,
                        k,
                        &args,
                        total,
                        &published,
                        &errors,
                    )
                    .await
                }
                None => {
                    publish_burst(
                        &mut conn,
                        &shared,
                        &auth,
                        &request_id,
                        &args,
                        total,
                        &published,
                        &errors,
                    )
                    .await
                }
            }
        }));
    }
    Ok(Publishing {
        handles,
        published,
        errors,
    })
}

/// Let what is in flight arrive (bounded by `wait`), so "lost" counts only what never comes;
/// then stop the readers.
pub(crate) async fn drain_and_stop(
    shared: &Shared,
    readers: Vec<tokio::task::JoinHandle<()>>,
    published_total: u64,
    wait: Duration,
) {
    let drain_deadline = Instant::now() + wait;
    while shared.complete.load(Ordering::Acquire) < published_total
        && Instant::now() < drain_deadline
        && shared.ended_early.load(Ordering::Relaxed) == 0
    {
        let notified = shared.progress.notified();
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
    shared.stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.abort();
    }
}

/// Publish → receive over every delivery, and publish → the last subscriber's receipt.
pub(crate) fn latencies(shared: &Shared) -> (Summary, Summary) {
    let mut deliver = latency_histogram();
    for h in &shared.deliver {
        if let Ok(h) = h.lock() {
            deliver.add(&*h).ok();
        }
    }
    let last = shared
        .last
        .lock()
        .map(|h| Summary::of(&h))
        .unwrap_or_default();
    (Summary::of(&deliver), last)
}

/// Run the scenario.
pub async fn run(target: &Target, args: &FanoutArgs) -> anyhow::Result<Value> {
    if args.subscribers == 0 || args.publishers == 0 {
        bail!("need at least one subscriber and one publisher");
    }
    let request_id = format!("fanout-{}", run_id());
    // Connect and subscribe everyone before the clock starts.
    let connect_started = Instant::now();
    let subs = connect_subscribers(
        target,
        args.subscribers,
        &request_id,
        args.connect_concurrency,
    )
    .await?;
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    measure(
        target,
        args,
        "fanout",
        &request_id,
        connect_seconds,
        |shared| spawn_readers(shared, subs),
    )
    .await
}

/// The measured part of a fan-out run whose readers are connected: start the clock and the
/// readers (`spawn_readers`), publish on schedule, meter the server's CPU over the window after
/// the warm-up, let what is in flight arrive, and report as `scenario`.
pub(crate) async fn measure(
    target: &Target,
    args: &FanoutArgs,
    scenario: &str,
    request_id: &str,
    connect_seconds: f64,
    spawn_readers: impl FnOnce(&Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<Value> {
    // The clock starts once everyone is subscribed.
    let total = args.warmup + args.duration;
    let shared = Shared::new(args.per_key(), args.warmup..Duration::MAX)?;
    let readers = spawn_readers(&shared);
    let publishing = spawn_publishers(target, &shared, args, request_id, total).await?;
    let errors = Arc::clone(&publishing.errors);

    sleep_until(shared.start, args.warmup).await;
    let cpu = CpuMeter::start(target.server_pid);
    let deliveries_before = shared.deliveries.load(Ordering::Acquire);
    sleep_until(shared.start, total).await;
    let deliveries_in_window = shared.deliveries.load(Ordering::Acquire) - deliveries_before;
    let cpu_use = cpu.stop();

    let published_total = publishing.join().await?;
    drain_and_stop(&shared, readers, published_total, Duration::from_secs(10)).await;

    let (deliver, last) = latencies(&shared);
    let deliveries_total = shared.deliveries.load(Ordering::Acquire);
    let expected = published_total * args.per_key() as u64;
    Ok(json!({
        "scenario": scenario,
        "mode": if args.rate.is_some() { "rate" } else { "burst" },
        "subscribers": args.subscribers,
        "keys": args.keys.max(1),
        "target_msgs_per_s": args.rate,
        "target_deliveries_per_s": args.rate.map(|r| r * args.per_key() as f64),
        "duration_s": args.duration.as_secs_f64(),
        "published": published_total,
        "publish_errors": errors.load(Ordering::Acquire),
        "deliveries": deliveries_total,
        "lost_deliveries": expected.saturating_sub(deliveries_total),
        "connections_ended_early": shared.ended_early.load(Ordering::Relaxed),
        "deliveries_per_s": deliveries_in_window as f64 / cpu_use.wall_seconds,
        "latency": deliver,
        "last_subscriber": last,
        "connect_seconds": connect_seconds,
        "cpu": cpu_use,
    }))
}

/// Publish messages `k`, `k + P`, `k + 2P`, … at their scheduled times. A message sent late
/// because this connection was still waiting on the server carries its scheduled time (the
/// server's stall counts); one sent late only because the timer woke late carries the time it
/// was really sent (timer slack is the load generator's, not the server's).
#[allow(clippy::too_many_arguments)]
async fn publish_at_rate(
    conn: &mut HttpConn,
    shared: &Shared,
    auth: &str,
    request_id: &str,
    rate: f64,
    k: usize,
    args: &FanoutArgs,
    total: Duration,
    published: &AtomicU64,
    errors: &AtomicU64,
) {
    let interval_ns = 1e9 / rate;
    let mut i = k as u64;
    loop {
        let due = (i as f64 * interval_ns) as u64;
        if due >= total.as_nanos() as u64 {
            return;
        }
        let sent_ns = if shared.now_ns() >= due {
            due
        } else {
            sleep_until(shared.start, Duration::from_nanos(due)).await;
            shared.now_ns()
        };
        let body = format!(
            r#"{{"channel":"bench","request_id":"{}","data":{}}}"#,
            key_request_id(request_id, args.keys, i),
            probe_data_padded(i, sent_ns, args.pad)
        );
        match conn.post_json("/api/publish", auth, body.as_bytes()).await {
            Ok(r) if r.status == 200 => {
                published.fetch_add(1, Ordering::AcqRel);
            }
            _ => {
                errors.fetch_add(1, Ordering::AcqRel);
            }
        }
        i += args.publishers as u64;
    }
}

/// Publish batches as fast as every subscriber takes them, keeping at most `window` messages
/// in flight.
#[allow(clippy::too_many_arguments)]
async fn publish_burst(
    conn: &mut HttpConn,
    shared: &Shared,
    auth: &str,
    request_id: &str,
    args: &FanoutArgs,
    total: Duration,
    published: &AtomicU64,
    errors: &AtomicU64,
) {
    let batch = args.batch.max(1) as u64;
    let mut body = String::new();
    while shared.now_ns() < total.as_nanos() as u64 {
        loop {
            let notified = shared.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let in_flight = published
                .load(Ordering::Acquire)
                .saturating_sub(shared.complete.load(Ordering::Acquire));
            if in_flight + batch <= args.window as u64 {
                break;
            }
            if tokio::time::timeout(Duration::from_millis(100), notified)
                .await
                .is_err()
                && shared.now_ns() >= total.as_nanos() as u64
            {
                return;
            }
        }
        let first = published.fetch_add(batch, Ordering::AcqRel);
        let sent_ns = shared.now_ns();
        body.clear();
        body.push_str(r#"{"messages":["#);
        for j in 0..batch {
            if j > 0 {
                body.push(',');
            }
            body.push_str(&format!(
                r#"{{"channel":"bench","request_id":"{request_id}","data":{}}}"#,
                probe_data_padded(first + j, sent_ns, args.pad)
            ));
        }
        body.push_str("]}");
        match conn
            .post_json("/api/publish/batch", auth, body.as_bytes())
            .await
        {
            Ok(r) if r.status == 200 => {}
            _ => {
                // Nothing of a failed batch was published: take it back out of the count.
                published.fetch_sub(batch, Ordering::AcqRel);
                errors.fetch_add(1, Ordering::AcqRel);
                return;
            }
        }
    }
}
