//! Log pages shared between cursors: when many subscribers of one key catch up over the same
//! range (a reconnect storm: everybody resumes from the number they all saw last), the page is
//! read from the log and encoded once, and every cursor that asks for it meanwhile or soon after
//! gets the same frames. Bounded in bytes (a share of `--cache-bytes`), oldest first out.
//!
//! A page is a consistent snapshot of its range — every message of the key in
//! `(after, covered_through]`, read in one transaction with the retention floor — and that range
//! of the log never changes (numbers are never reused), so a cached page stays correct whatever
//! happens to the log afterwards.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use seqcast_protocol::SubscriptionKey;
use seqcast_sequencing::ReadBudget;
use tokio::sync::OnceCell;

use crate::error::ApiError;
use crate::hub::Frame;

/// One page as the cursors use it.
#[derive(Debug)]
pub struct SharedPage {
    /// The key's messages of the page, as frames.
    pub frames: Vec<Frame>,
    /// The highest number the page accounts for.
    pub covered_through: u64,
    /// The retention floor read with it.
    pub floor: u64,
}

/// Which page: the key, the range asked for and the budget it was read to.
type PageId = (SubscriptionKey, u64, u64, ReadBudget);
type Slot = Arc<OnceCell<Arc<SharedPage>>>;

#[derive(Debug, Default)]
struct State {
    slots: HashMap<PageId, Slot>,
    /// Filled pages, oldest first, with what each costs.
    filled: VecDeque<(PageId, usize)>,
    bytes: usize,
}

/// One cursor waiting on (or filling) a slot. Dropped on every exit from [`PageCache::get`],
/// cancellation included: the last waiter of a slot that holds no page removes it from the map,
/// so reads cancelled with their connections (a reconnect storm) leave nothing behind.
struct Waiter<'a> {
    cache: &'a PageCache,
    id: &'a PageId,
    slot: Option<Slot>,
}

impl Waiter<'_> {
    fn slot(&self) -> &Slot {
        self.slot.as_ref().expect("taken only in drop")
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let mut state = self.cache.lock();
        // Counted under the lock, where every clone of a slot is made: the map's reference and
        // this waiter's are the last two.
        let ours = state
            .slots
            .get(self.id)
            .is_some_and(|s| Arc::ptr_eq(s, &slot));
        if ours && slot.get().is_none() && Arc::strong_count(&slot) == 2 {
            state.slots.remove(self.id);
        }
        // Released under the lock, so two waiters leaving at once cannot both miss the other.
        drop(slot);
        drop(state);
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct PageCache {
    budget_bytes: usize,
    state: Mutex<State>,
}

impl PageCache {
    /// A cache of at most `budget_bytes` of frames.
    pub fn new(budget_bytes: usize) -> Self {
        PageCache {
            budget_bytes,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The page of `key` in `(after, through]` under `budget`: cached, being read by another
    /// cursor (then it waits for that read), or read (and encoded) now with `read`.
    pub async fn get<F, Fut>(
        &self,
        key: &SubscriptionKey,
        after: u64,
        through: u64,
        budget: ReadBudget,
        read: F,
    ) -> Result<Arc<SharedPage>, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<SharedPage, ApiError>>,
    {
        let id: PageId = (key.clone(), after, through, budget);
        let slot = Arc::clone(self.lock().slots.entry(id.clone()).or_default());
        // Removes the slot when its last waiter goes away without a page in it: a read that
        // failed, or every waiter cancelled with its connection. Runs on every exit.
        let waiter = Waiter {
            cache: self,
            id: &id,
            slot: Some(slot),
        };
        let mut filled_here = None;
        let result = waiter
            .slot()
            .get_or_try_init(|| async {
                let page = read().await?;
                filled_here = Some(page.frames.iter().map(|f| f.len() + 64).sum::<usize>());
                Ok::<_, ApiError>(Arc::new(page))
            })
            .await
            .cloned();
        drop(waiter);
        if let (Ok(_), Some(bytes)) = (&result, filled_here) {
            let mut state = self.lock();
            state.filled.push_back((id, bytes));
            state.bytes += bytes;
            while state.bytes > self.budget_bytes {
                let Some((old, b)) = state.filled.pop_front() else {
                    break;
                };
                state.bytes -= b;
                state.slots.remove(&old);
            }
        }
        result
    }

    /// Pages held or being read (slots of the map), for tests and metrics.
    pub fn slots(&self) -> usize {
        self.lock().slots.len()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    const PAGE: ReadBudget = ReadBudget {
        max_events: 16,
        max_bytes: 1 << 20,
    };

    fn page(n: u64) -> SharedPage {
        SharedPage {
            frames: vec![Frame::from(format!("{{\"n\":{n}}}"))],
            covered_through: n,
            floor: 1,
        }
    }

    /// Reads cancelled with their connections (a reconnect storm where every client drops while
    /// its page is read) leave no slot behind.
    #[tokio::test]
    async fn cancelled_reads_leave_no_slot() {
        let cache = PageCache::new(1 << 20);
        let key = SubscriptionKey::parse("c:r").unwrap();
        for round in 0..50u64 {
            // Three waiters on one page and one on another, all cancelled mid-read.
            let never = || std::future::pending::<Result<SharedPage, ApiError>>();
            let reads = futures_util::future::join4(
                cache.get(&key, round, round + 10, PAGE, never),
                cache.get(&key, round, round + 10, PAGE, never),
                cache.get(&key, round, round + 10, PAGE, never),
                cache.get(&key, round + 1000, round + 1010, PAGE, never),
            );
            assert!(
                tokio::time::timeout(Duration::from_millis(5), reads)
                    .await
                    .is_err()
            );
            assert_eq!(
                cache.slots(),
                0,
                "round {round}: cancelled reads left slots"
            );
        }
        assert_eq!(cache.bytes(), 0);
    }

    /// One waiter cancelled, another reading the same page: the page is read once and kept.
    #[tokio::test]
    async fn a_cancelled_waiter_does_not_take_the_page_from_the_others() {
        let cache = PageCache::new(1 << 20);
        let key = SubscriptionKey::parse("c:r").unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let reader = cache.get(&key, 0, 10, PAGE, || async move {
            rx.await.unwrap();
            Ok(page(10))
        });
        let mut waiter = Box::pin(cache.get(&key, 0, 10, PAGE, || async { Ok(page(99)) }));
        tokio::pin!(reader);
        // Both wait (the first holds the read); then the second is cancelled.
        assert!(futures_util::poll!(reader.as_mut()).is_pending());
        assert!(futures_util::poll!(waiter.as_mut()).is_pending());
        drop(waiter);
        assert_eq!(cache.slots(), 1, "the reader still waits on the slot");
        tx.send(()).unwrap();
        let got = reader.await.unwrap();
        assert_eq!(got.covered_through, 10);
        assert_eq!(cache.slots(), 1, "the filled page is cached");
        let again = cache
            .get(&key, 0, 10, PAGE, || async { Ok(page(77)) })
            .await
            .unwrap();
        assert_eq!(again.covered_through, 10, "served from the cache");
        // A failed read leaves nothing either.
        let failed = cache
            .get(&key, 5, 6, PAGE, || async {
                Err(ApiError::Internal("disk".into()))
            })
            .await;
        assert!(failed.is_err());
        assert_eq!(cache.slots(), 1);
    }
}
