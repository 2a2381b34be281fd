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

/// Which page: the key, the range asked for and the page size.
type PageId = (SubscriptionKey, u64, u64, usize);
type Slot = Arc<OnceCell<Arc<SharedPage>>>;

#[derive(Debug, Default)]
struct State {
    slots: HashMap<PageId, Slot>,
    /// Filled pages, oldest first, with what each costs.
    filled: VecDeque<(PageId, usize)>,
    bytes: usize,
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

    /// The page of `key` in `(after, through]` (at most `limit` messages): cached, being read by
    /// another cursor (then it waits for that read), or read (and encoded) now with `read`.
    pub async fn get<F, Fut>(
        &self,
        key: &SubscriptionKey,
        after: u64,
        through: u64,
        limit: usize,
        read: F,
    ) -> Result<Arc<SharedPage>, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<SharedPage, ApiError>>,
    {
        let id: PageId = (key.clone(), after, through, limit);
        let slot = Arc::clone(self.lock().slots.entry(id.clone()).or_default());
        let mut filled_here = None;
        let result = slot
            .get_or_try_init(|| async {
                let page = read().await?;
                filled_here = Some(page.frames.iter().map(|f| f.len() + 64).sum::<usize>());
                Ok::<_, ApiError>(Arc::new(page))
            })
            .await
            .cloned();
        let mut state = self.lock();
        match (&result, filled_here) {
            (Ok(_), Some(bytes)) => {
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
            // A failed read leaves the slot empty; the next cursor tries again.
            (Err(_), _) => {
                if slot.get().is_none() {
                    state.slots.remove(&id);
                }
            }
            (Ok(_), None) => {}
        }
        result
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}
