//! Measurements: HDR latency summaries, CPU time of this process and of the server (from
//! /proc), and the server's resident memory.

use std::time::Instant;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;

/// A latency histogram in microseconds, 1 µs to 10 min, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; a failure here is a programming error.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|e| panic!("histogram bounds: {e}"))
}

/// Record `nanos` in a microsecond histogram (saturating at its top).
pub fn record_nanos(h: &mut Histogram<u64>, nanos: u64) {
    h.saturating_record((nanos / 1000).max(1));
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl Summary {
    /// Summarize a microsecond histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Summary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Summary {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Clock ticks per second of /proc's CPU times (USER_HZ; 100 on every Linux we run on).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of process `pid` ("self" for this one).
pub fn cpu_seconds(pid: &str, ticks: f64) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat)
        .map(|t| t as f64 / ticks)
        .context("unexpected /proc/PID/stat format")
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU seconds the live threads of `pid` have run, in nanoseconds precision (the first field of
/// /proc/PID/task/*/schedstat); None where schedstat is not available. Threads that exited are
/// not counted, so over an interval it is exact only while the server's threads live on (its
/// runtime's do); [`cpu_seconds`] counts them but in 10 ms ticks.
pub fn thread_cpu_seconds(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns = 0u64;
    let mut read = 0;
    for t in tasks.flatten() {
        // A thread that ended since the directory was listed is skipped.
        let Ok(text) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
        read += 1;
    }
    (read > 0).then_some(ns as f64 / 1e9)
}

/// Resident memory that `pid` holds itself, in KiB: its anonymous pages (`RssAnon` in
/// /proc/PID/status; `VmRSS` where the kernel does not report it). The server's SQLite readers
/// map the database file, and those file pages are the kernel's page cache (shared, dropped
/// under pressure) that `VmRSS` would count as the server's.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    parse_vm_rss(&status).context("no RssAnon or VmRSS in /proc/PID/status")
}

/// The `RssAnon` value (kB) of a /proc/PID/status text, else its `VmRSS`.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    field("RssAnon:").or_else(|| field("VmRSS:"))
}

/// Microseconds some task waited for a resource since boot ("some ... total=" of a
/// /proc/pressure file), None where PSI is not available.
pub fn pressure_total_us(resource: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/pressure/{resource}")).ok()?;
    parse_pressure_some(&text)
}

/// The `total=` of the `some` line of a /proc/pressure file.
pub fn parse_pressure_some(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// Times the server was preempted (involuntary context switches, all threads).
pub fn involuntary_switches(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// CPU used by this process and the server over an interval, as a fraction of one core, and
/// how much other work on the machine got in the way.
#[derive(Debug)]
pub struct CpuMeter {
    ticks: f64,
    started: Instant,
    self_start: f64,
    server: Option<(u32, f64)>,
    cpu_pressure: Option<u64>,
    io_pressure: Option<u64>,
    preempted: Option<u64>,
}

/// What a [`CpuMeter`] measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuUse {
    /// Load generator CPU, in cores (1.0 = one core busy all the time).
    pub loadgen_cores: f64,
    /// Server CPU, in cores, when its pid is known.
    pub server_cores: Option<f64>,
    /// Wall seconds of the interval.
    pub wall_seconds: f64,
    /// Share of the interval in which some runnable task on the machine waited for a CPU
    /// (PSI): a noisy machine shows here.
    pub cpu_pressure: Option<f64>,
    /// Share of the interval in which some task waited for I/O (PSI), e.g. on fsync.
    pub io_pressure: Option<f64>,
    /// Involuntary context switches of the server's threads: how often it was preempted.
    pub server_preempted: Option<u64>,
}

impl CpuMeter {
    /// Start measuring now.
    pub fn start(server_pid: Option<u32>) -> Self {
        let ticks = clock_ticks();
        CpuMeter {
            ticks,
            started: Instant::now(),
            self_start: cpu_seconds("self", ticks).unwrap_or(0.0),
            server: server_pid.map(|p| (p, cpu_seconds(&p.to_string(), ticks).unwrap_or(0.0))),
            cpu_pressure: pressure_total_us("cpu"),
            io_pressure: pressure_total_us("io"),
            preempted: server_pid.and_then(involuntary_switches),
        }
    }

    /// CPU used since [`CpuMeter::start`].
    pub fn stop(&self) -> CpuUse {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let me = cpu_seconds("self", self.ticks).unwrap_or(self.self_start) - self.self_start;
        let server = self.server.and_then(|(p, s)| {
            cpu_seconds(&p.to_string(), self.ticks)
                .ok()
                .map(|now| (now - s) / wall)
        });
        let share = |start: Option<u64>, now: Option<u64>| match (start, now) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e6 / wall),
            _ => None,
        };
        CpuUse {
            loadgen_cores: me / wall,
            server_cores: server,
            wall_seconds: wall,
            cpu_pressure: share(self.cpu_pressure, pressure_total_us("cpu")),
            io_pressure: share(self.io_pressure, pressure_total_us("io")),
            server_preempted: match (
                self.preempted,
                self.server.and_then(|(p, _)| involuntary_switches(p)),
            ) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            },
        }
    }
}

/// The server's CPU seconds over a measured interval: its threads' run time (ns precision,
/// [`thread_cpu_seconds`] read `before` and `after`) where /proc has it, else the process's
/// 10 ms ticks from `cpu` (None below two ticks: too coarse to divide by). Also returns the
/// ticks' figure.
pub fn server_cpu_seconds(
    before: Option<f64>,
    after: Option<f64>,
    cpu: &CpuUse,
) -> (Option<f64>, Option<f64>) {
    let ticks_s = cpu.server_cores.map(|c| c * cpu.wall_seconds);
    let seconds = match (before, after) {
        (Some(a), Some(b)) if b >= a => Some(b - a),
        _ => ticks_s.filter(|s| *s >= 0.02),
    };
    (seconds, ticks_s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        let stat = "1234 (tokio (worker) x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 100";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn reads_this_process() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(parse_vm_rss(&status).unwrap() > 0);
        assert!(cpu_seconds("self", 100.0).unwrap() >= 0.0);
        assert_eq!(parse_vm_rss("Name: x\nVmRSS:\t  2048 kB\n"), Some(2048));
        assert_eq!(
            parse_vm_rss("VmRSS:\t  9000 kB\nRssAnon:\t  1024 kB\nRssFile:\t 7976 kB\n"),
            Some(1024)
        );
        assert!(thread_cpu_seconds(std::process::id()).is_some_and(|s| s > 0.0));
    }

    #[test]
    fn reads_pressure_totals() {
        let text = "some avg10=1.00 avg60=0.50 avg300=0.10 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=42\n";
        assert_eq!(parse_pressure_some(text), Some(123_456));
        assert_eq!(parse_pressure_some("full total=1"), None);
    }

    #[test]
    fn summary_reports_percentiles_in_milliseconds() {
        let mut h = latency_histogram();
        for us in 1..=1000u64 {
            h.record(us).unwrap();
        }
        let s = Summary::of(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 0.5).abs() < 0.01, "{s:?}");
        assert!((s.p99_ms - 0.99).abs() < 0.01, "{s:?}");
        assert!((s.max_ms - 1.0).abs() < 0.01, "{s:?}");
        assert_eq!(Summary::of(&latency_histogram()).count, 0);
    }
}
