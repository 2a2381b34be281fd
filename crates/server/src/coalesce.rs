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
/// The rule: a connection whose live messages have been coming faster than one per `busy` on
/// average (over its last write rounds) keeps a take that holds a fresh live message until
/// `delay` after its last write (or after that message's commit, if earlier), gathering what
/// follows into the same write. Everything else is written at once: a connection whose
/// messages come slower (an occasional pair close together does not make it busy), replies and
/// catch-up pages (no live message among them), a take of at least `flush_bytes`, and messages
/// that are late already (committed `busy` or more ago: the server was behind, and a hold would
/// add to the tail). So no message waits more than `delay` after its commit, and a busy
/// connection writes about once per `delay` with `delay / per-message time` messages a write.
#[derive(Debug, Clone)]
pub struct WritePacer {
    busy: Duration,
    delay: Duration,
    flush_bytes: usize,
    last_write: Option<Instant>,
    /// Time between live messages, averaged over write rounds (each round weighs 1/8).
    per_message: Duration,
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
        let busy = busy.min(delay);
        WritePacer {
            busy,
            delay,
            flush_bytes,
            last_write: None,
            per_message: Self::quiet(busy),
        }
    }

    /// The per-message time a quiet spell counts as (and the most one round weighs in).
    fn quiet(busy: Duration) -> Duration {
        busy * 8
    }

    /// Frames were taken at `now`: `bytes` in all; `oldest_live` is when the oldest live
    /// message among them was committed (none: no live message).
    pub fn on_taken(&self, now: Instant, bytes: usize, oldest_live: Option<Instant>) -> WriteAt {
        let (Some(oldest), Some(last)) = (oldest_live, self.last_write) else {
            return WriteAt::Now;
        };
        if bytes >= self.flush_bytes
            || self.per_message >= self.busy
            || now.saturating_duration_since(oldest) >= self.busy
        {
            return WriteAt::Now;
        }
        let at = last.min(oldest) + self.delay;
        if at > now {
            WriteAt::Later(at)
        } else {
            WriteAt::Now
        }
    }

    /// A write round ended at `now`, carrying `live` live messages. Only those count: a
    /// connection that was just sent a reply (its `sub_ack`, a `pong`) is not busy.
    pub fn wrote(&mut self, now: Instant, live: usize) {
        if live == 0 {
            return;
        }
        if let Some(last) = self.last_write {
            let gap = now.saturating_duration_since(last);
            let sample =
                (gap / u32::try_from(live).unwrap_or(u32::MAX)).min(Self::quiet(self.busy));
            self.per_message = self.per_message - self.per_message / 8 + sample / 8;
        }
        self.last_write = Some(now);
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

    /// A pacer that wrote a live message every 100 µs for 4 ms, from the instant returned.
    fn busy() -> (Instant, WritePacer) {
        let t0 = Instant::now();
        let mut p = pacer();
        for i in 0..40 {
            p.wrote(t0 + us(100 * i), 1);
        }
        (t0, p)
    }

    /// What a connection does with live messages committed at `arrivals` (µs from the start,
    /// ascending), each taken at once unless a hold is on: (writes, the longest any message
    /// waited, messages per write).
    fn drive(arrivals: &[u64]) -> (usize, Duration, f64) {
        let t0 = Instant::now();
        let mut p = pacer();
        let mut held: Option<(Instant, Vec<Instant>)> = None;
        let (mut writes, mut worst) = (0, Duration::ZERO);
        let mut write = |p: &mut WritePacer, at: Instant, msgs: &[Instant]| {
            writes += 1;
            worst = worst.max(msgs.iter().map(|m| at - *m).max().unwrap_or_default());
            p.wrote(at, msgs.len());
        };
        for &a in arrivals {
            let now = t0 + us(a);
            if let Some((at, msgs)) = held.take_if(|(at, _)| *at <= now) {
                write(&mut p, at, &msgs);
            }
            match &mut held {
                // Not taken while a hold is on: it goes out with the held ones.
                Some((_, msgs)) => msgs.push(now),
                None => match p.on_taken(now, 100, Some(now)) {
                    WriteAt::Now => write(&mut p, now, &[now]),
                    WriteAt::Later(at) => held = Some((at, vec![now])),
                },
            }
        }
        if let Some((at, msgs)) = held {
            write(&mut p, at, &msgs);
        }
        (writes, worst, arrivals.len() as f64 / writes as f64)
    }

    #[test]
    fn a_fast_stream_is_gathered_into_one_write_per_delay() {
        // Every 200 µs for 100 ms: after a few rounds about DELAY / 200 µs messages a write.
        let arrivals: Vec<u64> = (0..500).map(|i| i * 200).collect();
        let (writes, worst, per_write) = drive(&arrivals);
        assert!(
            per_write >= 4.0,
            "{per_write} messages a write ({writes} writes)"
        );
        assert!(worst <= DELAY, "a message waited {worst:?}");
    }

    #[test]
    fn a_slower_stream_is_never_held_even_when_two_messages_bunch_up() {
        // 500 a second, every tenth pair 100 µs apart (publishers' jitter): each at once.
        let mut arrivals = Vec::new();
        for i in 0..1000u64 {
            arrivals.push(i * 2000);
            if i % 10 == 0 {
                arrivals.push(i * 2000 + 100);
            }
        }
        let (writes, worst, _) = drive(&arrivals);
        assert_eq!(writes, arrivals.len());
        assert_eq!(worst, Duration::ZERO);
    }

    #[test]
    fn a_connection_is_quiet_again_after_one_gap() {
        let (t0, mut p) = busy();
        let now = t0 + us(3950);
        assert!(
            matches!(p.on_taken(now, 100, Some(now)), WriteAt::Later(_)),
            "busy"
        );
        p.wrote(t0 + us(20_000), 1);
        let now = t0 + us(20_100);
        assert_eq!(
            p.on_taken(now, 100, Some(now)),
            WriteAt::Now,
            "one quiet round"
        );
    }

    #[test]
    fn an_idle_connection_and_replies_pages_and_big_takes_go_at_once() {
        let t0 = Instant::now();
        assert_eq!(
            pacer().on_taken(t0, 100, Some(t0)),
            WriteAt::Now,
            "never wrote"
        );
        let (t0, mut p) = busy();
        let now = t0 + us(3950);
        assert_eq!(p.on_taken(now, 100, None), WriteAt::Now, "no live message");
        assert_eq!(
            p.on_taken(now, 16 << 10, Some(now)),
            WriteAt::Now,
            "flush_bytes"
        );
        p.wrote(now, 0);
        assert_eq!(
            p.on_taken(now, 100, Some(now)),
            WriteAt::Later(t0 + us(3900) + DELAY),
            "a write of replies only changes nothing"
        );
    }

    #[test]
    fn a_late_message_is_not_held_and_none_waits_past_delay_after_its_commit() {
        let (t0, p) = busy();
        let now = t0 + us(3950);
        assert_eq!(
            p.on_taken(now, 100, Some(now - BUSY)),
            WriteAt::Now,
            "committed `busy` ago: the server was behind"
        );
        let committed = now - us(400);
        assert_eq!(
            p.on_taken(now, 100, Some(committed)),
            WriteAt::Later(committed + DELAY),
            "held at most DELAY after its commit"
        );
        let mut never = WritePacer::new(BUSY, Duration::ZERO, 16 << 10);
        never.wrote(now - us(10), 1);
        never.wrote(now - us(5), 1);
        assert_eq!(
            never.on_taken(now, 1, Some(now)),
            WriteAt::Now,
            "a zero delay"
        );
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
