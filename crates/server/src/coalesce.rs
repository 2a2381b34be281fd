//! A connection's write path, the parts that decide rather than do: when queued frames go out
//! ([`WritePacer`], a pure rule with time passed in), and which of the connection task's
//! branches are worth polling after a wake-up ([`Gate`]).
//!
//! Each write is a system call that also runs the peer's receive path and wakes it, so a
//! connection that takes one live message per write pays that per message. The pacer lets a
//! busy connection gather what arrives within a short delay into one write; an idle one writes
//! at once, and so does anything the connection queued itself (replies, catch-up pages).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

/// When a connection writes what was taken from its send queue.
///
/// The rule: a take that holds a live message, on a connection that wrote less than `busy`
/// ago, waits until `delay` after that write; everything else is written at once — the first
/// message after a quiet spell, replies and catch-up pages (no live message among them), and a
/// take of at least `flush_bytes`. So a connection writes at most once per `delay` while live
/// messages arrive closer than `busy` to its last write, and a message waits at most `delay`.
/// With `busy` at most half of `delay`, a connection holds only when its messages come at least
/// twice as often as it may write, so a hold gathers two or more of them.
#[derive(Debug, Clone)]
pub struct WritePacer {
    busy: Duration,
    delay: Duration,
    flush_bytes: usize,
    last_write: Option<Instant>,
}

/// What the pacer decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAt {
    /// Write now.
    Now,
    /// Hold the frames (and gather what follows) until then.
    Later(Instant),
}

impl WritePacer {
    /// A pacer that holds a busy connection's live messages (`busy`, `delay` above) unless
    /// `flush_bytes` are taken. A zero `delay` never holds.
    pub fn new(busy: Duration, delay: Duration, flush_bytes: usize) -> Self {
        WritePacer {
            busy: busy.min(delay),
            delay,
            flush_bytes,
            last_write: None,
        }
    }

    /// Frames were taken at `now`: `bytes` in all, `live` when a live message is among them.
    pub fn on_taken(&self, now: Instant, bytes: usize, live: bool) -> WriteAt {
        if !live || bytes >= self.flush_bytes {
            return WriteAt::Now;
        }
        match self.last_write {
            Some(last) if now.saturating_duration_since(last) < self.busy => {
                let at = last + self.delay;
                if at > now {
                    WriteAt::Later(at)
                } else {
                    WriteAt::Now
                }
            }
            _ => WriteAt::Now,
        }
    }

    /// A write round ended at `now`.
    pub fn wrote(&mut self, now: Instant) {
        self.last_write = Some(now);
    }
}

/// A gate in front of one of the connection task's branches: the branch is polled only after
/// its own waker fired (or after it last returned a value, since it may have more).
///
/// The connection task waits on many things at once and is woken by any of them — mostly by
/// live messages. Without gates every wake-up polls every branch again: the socket read (a
/// buffer cleared and a read attempted through several layers), the close and shutdown
/// tokens (two mutexes each). A gated branch costs a flag check instead.
#[derive(Debug)]
pub struct Gate {
    inner: Arc<GateState>,
    waker: Waker,
}

#[derive(Debug)]
struct GateState {
    /// The branch's waker fired since it last returned `Pending` (or it never was polled).
    woken: AtomicBool,
    /// The task to wake.
    task: AtomicWaker,
}

impl Wake for GateState {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Default for Gate {
    fn default() -> Self {
        let inner = Arc::new(GateState {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Gate {
            waker: Waker::from(Arc::clone(&inner)),
            inner,
        }
    }
}

impl Gate {
    /// Poll the branch at its next turn whatever woke the task: after the branch's future was
    /// polled outside the gate (with another waker), or replaced.
    pub fn open(&self) {
        self.inner.woken.store(true, Ordering::Release);
    }

    /// Poll the branch (`poll`, given a context whose waker opens the gate) if the gate is open;
    /// `Pending` without polling it otherwise. The caller's task is woken when the gate opens.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.inner.task.register(cx.waker());
        if !self.inner.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        match poll(&mut Context::from_waker(&self.waker)) {
            Poll::Ready(v) => {
                // It may be ready again at once (frames already buffered): poll it next time.
                self.inner.woken.store(true, Ordering::Release);
                Poll::Ready(v)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSY: Duration = Duration::from_micros(500);
    const DELAY: Duration = Duration::from_millis(1);

    fn pacer() -> WritePacer {
        WritePacer::new(BUSY, DELAY, 16 << 10)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn an_idle_connection_writes_at_once() {
        let t0 = Instant::now();
        let mut p = pacer();
        assert_eq!(p.on_taken(t0, 100, true), WriteAt::Now, "never wrote");
        p.wrote(t0);
        assert_eq!(
            p.on_taken(t0 + BUSY, 100, true),
            WriteAt::Now,
            "quiet for `busy`"
        );
        assert_eq!(p.on_taken(t0 + us(5000), 100, true), WriteAt::Now);
    }

    #[test]
    fn a_busy_connection_waits_until_delay_after_its_last_write() {
        let t0 = Instant::now();
        let mut p = pacer();
        p.wrote(t0);
        assert_eq!(
            p.on_taken(t0 + us(100), 100, true),
            WriteAt::Later(t0 + DELAY)
        );
        assert_eq!(
            p.on_taken(t0 + us(499), 100, true),
            WriteAt::Later(t0 + DELAY)
        );
        // The held frames go out at t0 + DELAY; what follows within `busy` waits for the next.
        p.wrote(t0 + DELAY);
        assert_eq!(
            p.on_taken(t0 + DELAY + us(200), 100, true),
            WriteAt::Later(t0 + DELAY * 2)
        );
    }

    #[test]
    fn replies_pages_and_big_takes_are_never_held() {
        let t0 = Instant::now();
        let mut p = pacer();
        p.wrote(t0);
        assert_eq!(
            p.on_taken(t0 + us(10), 100, false),
            WriteAt::Now,
            "no live message"
        );
        assert_eq!(
            p.on_taken(t0 + us(10), 16 << 10, true),
            WriteAt::Now,
            "flush_bytes"
        );
    }

    #[test]
    fn no_message_waits_longer_than_delay_and_a_zero_delay_never_holds() {
        let t0 = Instant::now();
        let mut p = pacer();
        p.wrote(t0);
        for step in 0..600 {
            let now = t0 + us(step);
            if let WriteAt::Later(at) = p.on_taken(now, 1, true) {
                assert!(
                    at > now && at - now <= DELAY,
                    "held from {step} µs until {at:?}"
                );
            }
        }
        let mut never = WritePacer::new(BUSY, Duration::ZERO, 16 << 10);
        never.wrote(t0);
        assert_eq!(never.on_taken(t0, 1, true), WriteAt::Now);
        assert_eq!(never.on_taken(t0 + us(1), 1, true), WriteAt::Now);
    }

    #[test]
    fn paced_messages_are_gathered_two_or_more_per_write_when_they_come_fast() {
        // Messages every 200 µs for 100 ms: the rule writes at most once per DELAY, and each
        // write after the first carries about DELAY / 200 µs messages.
        let t0 = Instant::now();
        let mut p = pacer();
        let mut held: Option<Instant> = None;
        let (mut writes, mut messages, mut worst) = (0u32, 0u32, Duration::ZERO);
        let mut waiting: Vec<Instant> = Vec::new();
        for i in 0..500u64 {
            let now = t0 + us(200 * i);
            if let Some(at) = held.filter(|at| *at <= now) {
                writes += 1;
                worst = worst.max(waiting.iter().map(|w| at - *w).max().unwrap_or_default());
                waiting.clear();
                p.wrote(at);
                held = None;
            }
            messages += 1;
            waiting.push(now);
            if held.is_some() {
                continue;
            }
            match p.on_taken(now, 100, true) {
                WriteAt::Now => {
                    writes += 1;
                    waiting.clear();
                    p.wrote(now);
                }
                WriteAt::Later(at) => held = Some(at),
            }
        }
        assert!(
            messages >= 4 * writes,
            "{messages} messages in {writes} writes"
        );
        assert!(worst <= DELAY, "a message waited {worst:?}");
    }

    #[test]
    fn messages_slower_than_busy_are_each_written_at_once() {
        let t0 = Instant::now();
        let mut p = pacer();
        for i in 0..100u64 {
            let now = t0 + us(600 * i);
            assert_eq!(p.on_taken(now, 100, true), WriteAt::Now, "message {i}");
            p.wrote(now);
        }
    }

    /// A waker that counts its wakes.
    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_gate_polls_its_branch_only_after_the_branch_woke_it() {
        let gate = Gate::default();
        let task = Arc::new(Count::default());
        let waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&waker);
        let mut polls = 0;
        let mut branch_waker: Option<Waker> = None;
        let mut poll = |gate: &Gate, cx: &mut Context<'_>, ready: bool| {
            gate.poll(cx, |inner| {
                polls += 1;
                branch_waker = Some(inner.waker().clone());
                if ready {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
        };
        assert!(
            poll(&gate, &mut cx, false).is_pending(),
            "first poll goes through"
        );
        assert!(
            poll(&gate, &mut cx, true).is_pending(),
            "not woken: not polled"
        );
        assert!(poll(&gate, &mut cx, true).is_pending());
        drop(poll);
        assert_eq!(polls, 1);
        branch_waker.take().map(Waker::wake);
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            1,
            "the task is woken through the gate"
        );
        let mut polls = 0;
        let mut poll = |ready: bool| {
            gate.poll(&mut cx, |_| {
                polls += 1;
                if ready {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
        };
        assert!(poll(true).is_ready(), "woken: polled");
        assert!(poll(false).is_pending(), "after a value it is polled again");
        assert!(poll(true).is_pending(), "then not until woken");
        drop(poll);
        assert_eq!(polls, 2);
    }
}
