//! Process counters, exported as Prometheus text at `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters updated on the hot path with relaxed atomics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages committed and handed to fan-out.
    pub published: AtomicU64,
    /// Frames queued to subscribers (live, backlog and replay).
    pub deliveries: AtomicU64,
    /// Messages committed to a key nobody on this node followed (they wait in the log).
    pub backlogged: AtomicU64,
    /// Messages a late subscriber did not get because of the per-key bound.
    pub backlog_overflow: AtomicU64,
    /// Times a live subscriber left live delivery because its send queue was full.
    pub lagged: AtomicU64,
    /// Log pages read to catch a subscriber up.
    pub catchup_pages: AtomicU64,
    /// Connections accepted.
    pub connections_opened: AtomicU64,
    /// Connections closed.
    pub connections_closed: AtomicU64,
    /// Connections closed with 1013: a subscriber fell behind the retention floor.
    pub slow_consumer_closes: AtomicU64,
    /// Publishes that failed because the store could not take them.
    pub publish_failures: AtomicU64,
}

impl Metrics {
    /// Add one.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Add n.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Prometheus exposition text, with counters kept elsewhere (the database writer's) and
    /// gauges supplied by the caller.
    pub fn render(
        &self,
        extra_counters: &[(&str, &str, u64)],
        gauges: &[(&str, &str, u64)],
    ) -> String {
        let mut out = String::with_capacity(2048);
        let own: [(&str, &str, &AtomicU64); 10] = [
            (
                "seqcast_published_total",
                "Messages committed and fanned out",
                &self.published,
            ),
            (
                "seqcast_deliveries_total",
                "Frames queued to subscribers",
                &self.deliveries,
            ),
            (
                "seqcast_backlogged_total",
                "Messages committed to a key with no subscriber on this node",
                &self.backlogged,
            ),
            (
                "seqcast_backlog_overflow_total",
                "Messages a late subscriber skipped because of the per-key bound",
                &self.backlog_overflow,
            ),
            (
                "seqcast_subscribers_lagged_total",
                "Times a subscriber left live delivery (send queue full) to catch up from the log",
                &self.lagged,
            ),
            (
                "seqcast_catchup_log_pages_total",
                "Log pages read to catch subscribers up",
                &self.catchup_pages,
            ),
            (
                "seqcast_connections_opened_total",
                "WebSocket connections accepted",
                &self.connections_opened,
            ),
            (
                "seqcast_connections_closed_total",
                "WebSocket connections closed",
                &self.connections_closed,
            ),
            (
                "seqcast_slow_consumer_closes_total",
                "Connections closed with 1013 (behind the retention floor)",
                &self.slow_consumer_closes,
            ),
            (
                "seqcast_publish_failures_total",
                "Publishes refused by the store",
                &self.publish_failures,
            ),
        ];
        let counters = own
            .iter()
            .map(|&(name, help, c)| (name, help, c.load(Ordering::Relaxed)))
            .chain(extra_counters.iter().copied());
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}
