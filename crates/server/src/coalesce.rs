//! A connection's write path, the parts that decide rather than do: when queued frames go out
//! ([`WritePacer`], a pure rule with time passed in), and which of the connection task's
//! branches are worth polling after a wake-up ([`Gates`]).
//!
//! Each write is a system call that also runs the peer's receive path and wakes it, so a
//! connection that takes one live message per write pays that per message. The pacer lets a
//! busy connection gather what arrives within a short delay into one write; an idle one writes
//! at once, and so does anything the connection queued itself (replies, catch-up pages).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

/// When a connection writes what was taken from its send queue.
///
/// The rule: a take that holds a live message, on a connection that wrote live messages less
/// than `busy` ago, waits until `delay` after that write; everything else is written at once — the first
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

    /// A write round ended at `now`; `live` when it carried a live message. Only those count:
    /// a connection that was just sent a reply (its `sub_ack`, a `pong`) is not busy.
    pub fn wrote(&mut self, now: Instant, live: bool) {
        if live {
            self.last_write = Some(now);
        }
    }
}

/// Gates in front of `N` of the connection task's branches: a gated branch is polled only after
/// a gated branch's waker fired, or after it last returned a value (it may have more).
///
/// The connection task waits on many things at once and is woken by any of them — mostly by
/// live messages, whose branch is not gated. Without gates every wake-up polls every branch
/// again: the socket read (a buffer cleared and a read attempted through several layers), the
/// close and shutdown tokens (two mutexes each), the timers. A gated branch costs a bit test
/// instead. The gates share one waker, one allocation per connection: the rare wake-up of any
/// gated branch opens them all.
#[derive(Debug)]
pub struct Gates<const N: usize> {
    shared: Arc<GateShared>,
    /// Opens every gate and wakes the task.
    waker: Waker,
}

#[derive(Debug)]
struct GateShared {
    /// Bit `i`: branch `i` is to be polled at its next turn.
    open: AtomicU32,
    /// The task to wake.
    task: AtomicWaker,
}

impl Wake for GateShared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.open.store(u32::MAX, Ordering::Release);
        self.task.wake();
    }
}

impl<const N: usize> Default for Gates<N> {
    fn default() -> Self {
        const { assert!(N <= 32, "at most 32 gates") };
        let shared = Arc::new(GateShared {
            open: AtomicU32::new(u32::MAX),
            task: AtomicWaker::new(),
        });
        Gates {
            waker: Waker::from(Arc::clone(&shared)),
            shared,
        }
    }
}

impl<const N: usize> Gates<N> {
    /// Poll branch `i` at its next turn whatever woke the task: after its future was polled
    /// outside the gate (with another waker), or changed.
    pub fn open(&self, i: usize) {
        self.shared.open.fetch_or(1 << i, Ordering::AcqRel);
    }

    /// Poll branch `i` (`poll`, given a context whose waker opens the gates) if its gate is
    /// open; `Pending` without polling it otherwise. The caller's task is woken when the gates
    /// open.
    pub fn poll<T>(
        &self,
        i: usize,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        debug_assert!(i < N, "gate {i} of {N}");
        self.shared.task.register(cx.waker());
        let bit = 1 << i;
        if self.shared.open.load(Ordering::Acquire) & bit == 0
            || self.shared.open.fetch_and(!bit, Ordering::AcqRel) & bit == 0
        {
            return Poll::Pending;
        }
        match poll(&mut Context::from_waker(&self.waker)) {
            Poll::Ready(v) => {
                // It may be ready again at once (frames already buffered): poll it next time.
                self.open(i);
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
        p.wrote(t0, true);
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
        p.wrote(t0, true);
        assert_eq!(
            p.on_taken(t0 + us(100), 100, true),
            WriteAt::Later(t0 + DELAY)
        );
        assert_eq!(
            p.on_taken(t0 + us(499), 100, true),
            WriteAt::Later(t0 + DELAY)
        );
        // The held frames go out at t0 + DELAY; what follows within `busy` waits for the next.
        p.wrote(t0 + DELAY, true);
        assert_eq!(
            p.on_taken(t0 + DELAY + us(200), 100, true),
            WriteAt::Later(t0 + DELAY * 2)
        );
    }

    #[test]
    fn a_write_without_live_messages_does_not_make_a_connection_busy() {
        let t0 = Instant::now();
        let mut p = pacer();
        p.wrote(t0, false);
        assert_eq!(
            p.on_taken(t0 + us(10), 100, true),
            WriteAt::Now,
            "after its sub_ack"
        );
        p.wrote(t0 + us(10), true);
        p.wrote(t0 + us(20), false);
        assert_eq!(
            p.on_taken(t0 + us(30), 100, true),
            WriteAt::Later(t0 + us(10) + DELAY),
            "a reply in between changes nothing"
        );
    }

    #[test]
    fn replies_pages_and_big_takes_are_never_held() {
        let t0 = Instant::now();
        let mut p = pacer();
        p.wrote(t0, true);
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
        p.wrote(t0, true);
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
        never.wrote(t0, true);
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
                p.wrote(at, true);
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
                    p.wrote(now, true);
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
            p.wrote(now, true);
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
    fn a_gated_branch_is_polled_only_after_a_gated_waker_fired() {
        use std::cell::{Cell, RefCell};
        let gates = Gates::<2>::default();
        let task = Arc::new(Count::default());
        let waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&waker);
        let polls = [Cell::new(0), Cell::new(0)];
        let branch_waker: RefCell<Option<Waker>> = RefCell::new(None);
        let mut poll = |i: usize, ready: bool| {
            gates.poll(i, &mut cx, |inner| {
                polls[i].set(polls[i].get() + 1);
                *branch_waker.borrow_mut() = Some(inner.waker().clone());
                if ready {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
        };
        let counts = || [polls[0].get(), polls[1].get()];
        assert!(poll(0, false).is_pending(), "first poll goes through");
        assert!(poll(1, false).is_pending(), "for every gate");
        assert!(poll(0, true).is_pending(), "not woken: not polled");
        assert!(poll(1, true).is_pending());
        assert_eq!(
            counts(),
            [1, 1],
            "a wake-up for anything else polls no gated branch"
        );
        if let Some(w) = branch_waker.borrow_mut().take() {
            w.wake();
        }
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            1,
            "the task is woken through the gate"
        );
        assert!(poll(1, true).is_ready(), "woken: polled");
        assert!(
            poll(1, false).is_pending(),
            "after a value it is polled again"
        );
        assert!(poll(1, true).is_pending(), "then not until woken");
        assert!(poll(0, false).is_pending(), "the wake-up opened every gate");
        assert!(poll(0, true).is_pending());
        assert_eq!(counts(), [2, 3]);
        gates.open(0);
        assert!(poll(0, true).is_ready(), "opened by hand");
    }
}
