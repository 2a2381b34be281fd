//! Process metrics on `prometheus-client`, exported as Prometheus/OpenMetrics text at
//! `GET /metrics`.
//!
//! Counters and gauges are atomics; histograms take a short lock per observation, so they are
//! observed once per request, per committed group or per socket write round — never per frame.
//! Values owned elsewhere (the hub's head and cache, the database writer's counters) are read at
//! scrape time. Every label has a small fixed set of values: no per-key or per-connection label.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, text};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use seqcast_protocol::ErrorCode;

/// A counter updated on the hot path (a relaxed atomic add).
pub type Count = Counter<u64, AtomicU64>;

/// Which publish endpoint a latency belongs to.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PublishEndpoint {
    /// `POST /api/publish`
    single,
    /// `POST /api/publish/batch`
    batch,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: PublishEndpoint,
}

/// Where an error answer went.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Transport {
    /// An HTTP error status with a JSON body.
    http,
    /// An `error` frame on a WebSocket.
    ws,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    code: &'static str,
    transport: Transport,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    code: &'static str,
}

/// The close codes counted by name; any other code a peer sends is counted as `other`, so a
/// peer cannot grow the label set.
fn close_code_label(code: u16) -> &'static str {
    match code {
        1000 => "1000",
        1001 => "1001",
        1002 => "1002",
        1003 => "1003",
        1005 => "1005",
        1006 => "1006",
        1007 => "1007",
        1008 => "1008",
        1009 => "1009",
        1011 => "1011",
        1013 => "1013",
        4001 => "4001",
        _ => "other",
    }
}

/// One error answered, kept for the operator's page.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct RecentError {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `http` or `ws`.
    pub transport: &'static str,
    /// The wire error code (`bad_request`, `unavailable`, …).
    pub code: String,
    /// The HTTP status (0 for an `error` frame).
    pub status: u16,
    /// `METHOD /path` for HTTP (no query), the client id for WebSocket.
    pub origin: String,
    /// The error message as the client saw it.
    pub message: String,
}

/// How many errors the operator's page keeps.
const RECENT_ERRORS: usize = 50;

/// Values owned elsewhere, read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Gauges: name, help, value.
    pub gauges: Vec<(&'static str, &'static str, u64)>,
    /// Counters kept elsewhere (name without `_total`, help, value).
    pub counters: Vec<(&'static str, &'static str, u64)>,
}

/// The process's metrics. Counter fields keep the series names they have always had.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Messages committed and handed to fan-out.
    pub published: Count,
    /// Frames queued to subscribers (live, backlog and replay).
    pub deliveries: Count,
    /// Messages committed to a key nobody on this node followed (they wait in the log).
    pub backlogged: Count,
    /// Messages a late subscriber did not get because of the per-key bound.
    pub backlog_overflow: Count,
    /// Times a live subscriber left live delivery because its send queue was full.
    pub lagged: Count,
    /// Log pages read to catch a subscriber up.
    pub catchup_pages: Count,
    /// Connections accepted.
    pub connections_opened: Count,
    /// Connections closed.
    pub connections_closed: Count,
    /// Connections closed with 1013: a subscriber fell behind the retention floor.
    pub slow_consumer_closes: Count,
    /// Publishes that failed because the store could not take them.
    pub publish_failures: Count,
    /// Subscriptions open on this node (catching up or live).
    pub subscriptions: Gauge,
    /// Server-Sent Events streams open (`GET /events`).
    pub sse_streams: Gauge,
    /// Times an SSE stream woke to read or write (a keyed stream only when its keys moved).
    pub sse_wakeups: Count,
    publish_single: AtomicHistogram,
    publish_batch: AtomicHistogram,
    /// Time from the group's COMMIT to its frames being in every live subscriber's queue.
    pub commit_to_queued: AtomicHistogram,
    /// Time from a COMMIT to its frame being written to a subscriber's socket (the oldest
    /// live frame of each write round). Lock-free: observed per write round of every connection.
    pub commit_to_written: AtomicHistogram,
    /// Events per committed group.
    pub db_group_events: Histogram,
    /// Group transaction time, BEGIN to COMMIT (fsync included).
    pub db_commit_seconds: Histogram,
    /// Messages a catching-up subscription is behind the head, at each catch-up step.
    pub catchup_lag: Histogram,
    /// Messages per recovery answer (`GET /websocket/messages`).
    pub recovery_messages: Histogram,
    /// Bytes of messages per recovery answer.
    pub recovery_bytes: Histogram,
    /// Time to answer a recovery request.
    pub recovery_seconds: Histogram,
    closes_by_code: Family<CloseLabels, Count>,
    errors_by_code: Family<ErrorLabels, Count>,
    recent_errors: Mutex<VecDeque<RecentError>>,
    writer: WriterTotals,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    // 50 µs … ~3.3 s
    exponential_buckets(0.000_05, 2.0, 17)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let mut counter = |name: &str, help: &str| {
            let c = Count::default();
            registry.register(name, help, c.clone());
            c
        };
        let published = counter("seqcast_published", "Messages committed and fanned out");
        let deliveries = counter("seqcast_deliveries", "Frames queued to subscribers");
        let backlogged = counter(
            "seqcast_backlogged",
            "Messages committed to a key with no subscriber on this node",
        );
        let backlog_overflow = counter(
            "seqcast_backlog_overflow",
            "Messages a late subscriber skipped because of the per-key bound",
        );
        let lagged = counter(
            "seqcast_subscribers_lagged",
            "Times a subscriber left live delivery (send queue full) to catch up from the log",
        );
        let catchup_pages = counter(
            "seqcast_catchup_log_pages",
            "Log pages read to catch subscribers up",
        );
        let connections_opened = counter(
            "seqcast_connections_opened",
            "WebSocket connections accepted",
        );
        let connections_closed =
            counter("seqcast_connections_closed", "WebSocket connections closed");
        let slow_consumer_closes = counter(
            "seqcast_slow_consumer_closes",
            "Connections closed with 1013 (behind the retention floor)",
        );
        let publish_failures =
            counter("seqcast_publish_failures", "Publishes refused by the store");
        let sse_wakeups = counter(
            "seqcast_sse_wakeups",
            "Times a Server-Sent Events stream woke to read or write",
        );

        let subscriptions = Gauge::default();
        registry.register(
            "seqcast_subscriptions",
            "Subscriptions open on this node, catching up or live",
            subscriptions.clone(),
        );
        let sse_streams = Gauge::default();
        registry.register(
            "seqcast_sse_streams",
            "Server-Sent Events streams open (GET /events)",
            sse_streams.clone(),
        );
        let publish_seconds =
            Family::<EndpointLabel, AtomicHistogram>::new_with_constructor(AtomicHistogram::new);
        registry.register(
            "seqcast_publish_duration_seconds",
            "Publish request latency, from the request's arrival to the answer (endpoint: single or batch)",
            publish_seconds.clone(),
        );
        let publish_single = publish_seconds.get_or_create_owned(&EndpointLabel {
            endpoint: PublishEndpoint::single,
        });
        let publish_batch = publish_seconds.get_or_create_owned(&EndpointLabel {
            endpoint: PublishEndpoint::batch,
        });
        let commit_to_queued = AtomicHistogram::new();
        registry.register(
            "seqcast_commit_to_queued_seconds",
            "Time from a group's COMMIT to its frames being queued to every live subscriber",
            commit_to_queued.clone(),
        );
        let mut histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::new(buckets);
            registry.register(name, help, h.clone());
            h
        };
        let db_group_events = histogram(
            "seqcast_db_group_events",
            "Events per committed group (group commit size)",
            exponential_buckets(1.0, 2.0, 14).collect(),
        );
        let db_commit_seconds = histogram(
            "seqcast_db_commit_seconds",
            "Group transaction time, BEGIN to COMMIT, fsync included",
            seconds_buckets().collect(),
        );
        let catchup_lag = histogram(
            "seqcast_catchup_lag_messages",
            "Messages a catching-up subscription is behind the head, observed at each catch-up step",
            exponential_buckets(1.0, 4.0, 12).collect(),
        );
        let recovery_messages = histogram(
            "seqcast_recovery_messages",
            "Messages per recovery answer (GET /websocket/messages)",
            exponential_buckets(1.0, 4.0, 8).collect(),
        );
        let recovery_bytes = histogram(
            "seqcast_recovery_bytes",
            "Bytes of messages per recovery answer",
            exponential_buckets(256.0, 4.0, 10).collect(),
        );
        let recovery_seconds = histogram(
            "seqcast_recovery_duration_seconds",
            "Time to answer a recovery request",
            seconds_buckets().collect(),
        );
        let commit_to_written = AtomicHistogram::new();
        registry.register(
            "seqcast_commit_to_written_seconds",
            "Time from a COMMIT to the frame being written to a subscriber's socket (oldest live frame of each write round)",
            commit_to_written.clone(),
        );
        let closes_by_code = Family::<CloseLabels, Count>::default();
        registry.register(
            "seqcast_connections_closed_by_code",
            "WebSocket connections closed, by close code (the server's, else the peer's; 1006: broken)",
            closes_by_code.clone(),
        );
        let errors_by_code = Family::<ErrorLabels, Count>::default();
        registry.register(
            "seqcast_errors",
            "Error answers, by error code and transport (http status bodies, ws error frames)",
            errors_by_code.clone(),
        );
        Metrics {
            registry,
            published,
            deliveries,
            backlogged,
            backlog_overflow,
            lagged,
            catchup_pages,
            connections_opened,
            connections_closed,
            slow_consumer_closes,
            publish_failures,
            subscriptions,
            sse_streams,
            sse_wakeups,
            publish_single,
            publish_batch,
            commit_to_queued,
            commit_to_written,
            db_group_events,
            db_commit_seconds,
            catchup_lag,
            recovery_messages,
            recovery_bytes,
            recovery_seconds,
            closes_by_code,
            errors_by_code,
            recent_errors: Mutex::new(VecDeque::with_capacity(RECENT_ERRORS)),
            writer: WriterTotals::default(),
        }
    }
}

impl Metrics {
    /// Add one.
    pub fn inc(counter: &Count) {
        counter.inc();
    }

    /// Add n.
    pub fn add(counter: &Count, n: u64) {
        counter.inc_by(n);
    }

    /// Record a publish request's latency.
    pub fn observe_publish(&self, endpoint: PublishEndpoint, took: Duration) {
        match endpoint {
            PublishEndpoint::single => self.publish_single.observe(took),
            PublishEndpoint::batch => self.publish_batch.observe(took),
        }
    }

    /// Record a closed connection's close code.
    pub fn closed_with(&self, code: u16) {
        Metrics::inc(&self.connections_closed);
        self.closes_by_code
            .get_or_create(&CloseLabels {
                code: close_code_label(code),
            })
            .inc();
    }

    /// Record an error answer (and keep it for the operator's page).
    pub fn error(
        &self,
        code: ErrorCode,
        transport: Transport,
        status: u16,
        origin: String,
        message: &str,
    ) {
        self.errors_by_code
            .get_or_create(&ErrorLabels {
                code: code.as_str(),
                transport,
            })
            .inc();
        let mut recent = self
            .recent_errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() == RECENT_ERRORS {
            recent.pop_front();
        }
        let mut message = message.to_owned();
        if message.len() > 300 {
            let mut cut = 300;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        recent.push_back(RecentError {
            at_ms: crate::now_ms(),
            transport: match transport {
                Transport::http => "http",
                Transport::ws => "ws",
            },
            code: code.as_str().to_owned(),
            status,
            origin,
            message,
        });
    }

    /// The most recent errors, newest first.
    pub fn recent_errors(&self) -> Vec<RecentError> {
        self.recent_errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .rev()
            .cloned()
            .collect()
    }

    /// Record one committed group (from the database writer's thread).
    pub fn group_committed(&self, events: usize, took: Duration) {
        self.db_group_events.observe(events as f64);
        self.db_commit_seconds.observe(took.as_secs_f64());
        let w = &self.writer;
        w.groups.fetch_add(1, Ordering::Relaxed);
        w.events.fetch_add(events as u64, Ordering::Relaxed);
        w.commit_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        w.last_events.store(events as u64, Ordering::Relaxed);
        w.last_commit_micros
            .store(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The writer's totals since start and its last group (for the operator's page, which
    /// takes differences between polls for recent averages).
    pub fn writer_summary(&self) -> WriterSummary {
        let w = &self.writer;
        WriterSummary {
            groups: w.groups.load(Ordering::Relaxed),
            events: w.events.load(Ordering::Relaxed),
            commit_micros: w.commit_micros.load(Ordering::Relaxed),
            last_group_events: w.last_events.load(Ordering::Relaxed),
            last_commit_micros: w.last_commit_micros.load(Ordering::Relaxed),
        }
    }

    /// Prometheus text (OpenMetrics): this registry, then the values read at scrape time.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let mut scraped = Registry::default();
        for &(name, help, v) in &snapshot.counters {
            scraped.register(name, help, ConstCounter::new(v));
        }
        for &(name, help, v) in &snapshot.gauges {
            scraped.register(name, help, ConstGauge::new(v as i64));
        }
        let _ = text::encode_registry(&mut out, &self.registry);
        let _ = text::encode_registry(&mut out, &scraped);
        let _ = text::encode_eof(&mut out);
        out
    }
}

/// Upper bounds of [`AtomicHistogram`] (those of [`seconds_buckets`]).
const ATOMIC_BOUNDS: usize = 17;
/// Shards of [`AtomicHistogram`]: each runtime thread writes its own (no shared cache line).
const SHARDS: usize = 8;

/// A histogram of durations on relaxed atomics, sharded by thread: for an observation made on
/// every connection's write path, where `prometheus-client`'s locked histogram (or one set of
/// shared atomics) would bounce a cache line between the runtime's threads.
#[derive(Debug, Clone)]
pub struct AtomicHistogram {
    inner: Arc<AtomicHistogramInner>,
}

#[derive(Debug)]
struct AtomicHistogramInner {
    /// Upper bounds in seconds, ascending.
    bounds: [f64; ATOMIC_BOUNDS],
    /// Upper bounds in nanoseconds.
    bounds_nanos: [u64; ATOMIC_BOUNDS],
    shards: [Shard; SHARDS],
}

/// One thread's counts: one per bound, one for +Inf, and the sum in nanoseconds.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    counts: [AtomicU64; ATOMIC_BOUNDS + 1],
    sum_nanos: AtomicU64,
}

/// This thread's shard.
fn shard_index() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static SHARD: usize = (NEXT.fetch_add(1, Ordering::Relaxed) as usize) % SHARDS;
    }
    SHARD.with(|s| *s)
}

impl AtomicHistogram {
    /// A histogram with the bounds of [`seconds_buckets`].
    pub fn new() -> Self {
        let mut bounds = [0.0; ATOMIC_BOUNDS];
        for (b, v) in bounds.iter_mut().zip(seconds_buckets()) {
            *b = v;
        }
        AtomicHistogram {
            inner: Arc::new(AtomicHistogramInner {
                bounds,
                bounds_nanos: bounds.map(|b| (b * 1e9) as u64),
                shards: Default::default(),
            }),
        }
    }

    /// Record one duration.
    pub fn observe(&self, took: Duration) {
        let h = &*self.inner;
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let i = h.bounds_nanos.partition_point(|&b| b < nanos);
        let shard = &h.shards[shard_index()];
        shard.counts[i].fetch_add(1, Ordering::Relaxed);
        shard.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl prometheus_client::metrics::TypedMetric for AtomicHistogram {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Histogram;
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl prometheus_client::encoding::EncodeMetric for AtomicHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let h = &*self.inner;
        let buckets: Vec<(f64, u64)> = h
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .enumerate()
            .map(|(i, bound)| {
                let n = h
                    .shards
                    .iter()
                    .map(|s| s.counts[i].load(Ordering::Relaxed))
                    .sum();
                (bound, n)
            })
            .collect();
        let count = buckets.iter().map(|b| b.1).sum();
        let sum_nanos: u64 = h
            .shards
            .iter()
            .map(|s| s.sum_nanos.load(Ordering::Relaxed))
            .sum();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            sum_nanos as f64 / 1e9,
            count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// Running totals of the database writer's groups.
#[derive(Debug, Default)]
struct WriterTotals {
    groups: AtomicU64,
    events: AtomicU64,
    commit_micros: AtomicU64,
    last_events: AtomicU64,
    last_commit_micros: AtomicU64,
}

/// The database writer's groups: totals since start and the last one.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, utoipa::ToSchema)]
pub struct WriterSummary {
    /// Groups committed since start.
    pub groups: u64,
    /// Events committed in them.
    pub events: u64,
    /// Their transaction time added up, in microseconds.
    pub commit_micros: u64,
    /// Events in the last group.
    pub last_group_events: u64,
    /// The last group's transaction time in microseconds.
    pub last_commit_micros: u64,
}
