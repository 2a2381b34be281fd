//! A one-shot read of the log — an HTTP recovery answer — as a [`Cursor`] run to a
//! [`ReadBudget`].
//!
//! A [`Replay`] hands out what lies after a position up to a fixed head, from log pages and then
//! from the cached tail, exactly as a subscriber's cursor catches up, until the head or the
//! budget is reached. Where the log's retention floor passes the cursor — terminal for a
//! subscriber, whose connection closes so that it resumes with `recovered: false` — the replay
//! records that it fell [`behind`](Replay::behind), drops the page that may miss messages, and
//! goes on from the floor, as that resume would. The shell performs the reads.

use crate::budget::{Fill, ReadBudget};
use crate::cursor::{Cursor, Phase, Step, View};

/// What the shell does next for a [`Replay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStep {
    /// Read the messages numbered in `(after, through]` from the log (one page, in one read
    /// transaction that also reports the retention floor), at most `budget` (what the answer
    /// has left; the events one more, to learn whether it goes on), then call
    /// [`Replay::on_log_page`].
    ReadLog {
        /// The cursor's position.
        after: u64,
        /// The highest number worth reading from the log (the rest is cached).
        through: u64,
        /// What the read may return.
        budget: ReadBudget,
    },
    /// The cached tail holds everything after `after`: under the cache's lock, hand its
    /// messages after `after` to [`Replay::on_cached`] (or, if the cache lost the position
    /// meanwhile, just ask for the next step).
    FromCache {
        /// The cursor's position.
        after: u64,
    },
    /// The answer is complete up to the head, or its budget is spent.
    Done,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Replay {
    cursor: Cursor,
    head: u64,
    fill: Fill,
    last: Option<u64>,
    behind: bool,
}

impl Replay {
    /// A replay of what follows `after`, up to `head`, under `budget`.
    pub fn new(after: u64, head: u64, budget: ReadBudget) -> Self {
        Replay {
            cursor: Cursor::catching_up(after),
            head,
            fill: budget.fill(),
            last: None,
            behind: false,
        }
    }

    /// The next step, given the cache and the floor as they are now (`view`'s head is replaced
    /// by the replay's: it never reads past the head it was judged at).
    pub fn next_step(&mut self, view: View) -> ReplayStep {
        let view = View {
            head: self.head,
            ..view
        };
        while !self.fill.is_cut() {
            match self.cursor.next_step(view) {
                Step::Idle => break,
                Step::Behind { floor, .. } => {
                    self.behind = true;
                    self.cursor = Cursor::catching_up(floor - 1);
                }
                Step::JoinFromCache { after } if after >= self.head => break,
                Step::JoinFromCache { after } => return ReplayStep::FromCache { after },
                Step::ReadLog { after, through } => {
                    return ReplayStep::ReadLog {
                        after,
                        through,
                        budget: self.fill.rest(),
                    };
                }
            }
        }
        ReplayStep::Done
    }

    /// The answer to [`ReplayStep::ReadLog`]: the page's `messages` (number, item), ascending,
    /// which account for every message wanted in `(after, covered_through]`, read with
    /// retention floor `floor`. Returns the items handed out — none when the floor passed the
    /// cursor (the page is dropped; the next step goes on from the floor).
    pub fn on_log_page<T>(
        &mut self,
        messages: impl IntoIterator<Item = (u64, T)>,
        bytes_of: impl Fn(&T) -> usize,
        covered_through: u64,
        floor: u64,
    ) -> Vec<T> {
        // Filled on a copy: a page that is dropped takes nothing from the budget.
        let mut taken = self.fill;
        let page = taken.page(self.cursor.position(), covered_through, messages, bytes_of);
        if self.cursor.on_log_page(page.covered_through, floor) == Phase::Behind {
            return Vec::new();
        }
        self.fill = taken;
        self.last = page.last.or(self.last);
        page.items
    }

    /// The answer to [`ReplayStep::FromCache`], under the cache's lock: the cached messages
    /// wanted after the position (number, item), ascending. Returns the items handed out (none
    /// past the head).
    pub fn on_cached<T>(
        &mut self,
        messages: impl IntoIterator<Item = (u64, T)>,
        bytes_of: impl Fn(&T) -> usize,
    ) -> Vec<T> {
        let head = self.head;
        let messages = messages.into_iter().take_while(|(s, _)| *s <= head);
        let page = self
            .fill
            .page(self.cursor.position(), head, messages, bytes_of);
        self.cursor.on_cache_page(page.covered_through);
        self.last = page.last.or(self.last);
        page.items
    }

    /// The head the replay ends at.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The retention floor passed the cursor: what lay below it is missing from the answer.
    pub fn behind(&self) -> bool {
        self.behind
    }

    /// Where to continue when the budget cut the answer: the last message handed out.
    pub fn next_since(&self) -> Option<u64> {
        self.last.filter(|_| self.fill.is_cut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: ReadBudget = ReadBudget {
        max_events: 100,
        max_bytes: usize::MAX,
    };

    fn view(cache_floor: u64, retention_floor: u64) -> View {
        View {
            head: u64::MAX, // replaced by the replay's head
            cache_floor,
            retention_floor,
        }
    }

    /// Log pages up to the cache, the cache up to the head (not past it), then done.
    #[test]
    fn a_replay_reads_the_log_then_the_cache_up_to_its_head() {
        let mut r = Replay::new(10, 30, ALL);
        let ReplayStep::ReadLog { after, through, .. } = r.next_step(view(21, 1)) else {
            panic!()
        };
        assert_eq!((after, through), (10, 20));
        assert_eq!(r.on_log_page([(12, ()), (15, ())], |_| 1, 20, 1).len(), 2);
        assert_eq!(
            r.next_step(view(21, 1)),
            ReplayStep::FromCache { after: 20 }
        );
        let got = r.on_cached([(25, 25), (30, 30), (31, 31)], |_| 1);
        assert_eq!(got, [25, 30], "nothing past the head");
        assert_eq!(r.next_step(view(21, 1)), ReplayStep::Done);
        assert_eq!((r.behind(), r.next_since()), (false, None));
    }

    /// The floor passes the cursor while a page is read: the page is dropped, the replay is
    /// behind and goes on from the floor, the budget untouched by the dropped page.
    #[test]
    fn a_floor_past_the_cursor_drops_the_page_and_goes_on_from_the_floor() {
        let budget = ReadBudget {
            max_events: 2,
            max_bytes: 1000,
        };
        let mut r = Replay::new(10, 50, budget);
        let ReplayStep::ReadLog { after: 10, .. } = r.next_step(view(51, 1)) else {
            panic!()
        };
        assert!(r.on_log_page([(40, ())], |_| 1, 50, 30).is_empty());
        let ReplayStep::ReadLog { after: 29, .. } = r.next_step(view(51, 30)) else {
            panic!()
        };
        assert!(r.behind());
        assert_eq!(
            r.on_log_page([(31, 'a'), (33, 'b')], |_| 1, 33, 30),
            ['a', 'b']
        );
        assert_eq!(
            r.next_step(view(51, 30)),
            ReplayStep::ReadLog {
                after: 33,
                through: 50,
                budget: ReadBudget {
                    max_events: 1,
                    max_bytes: 998
                }
            }
        );
        assert!(
            r.on_log_page([(40, 'c')], |_| 1, 40, 30).is_empty(),
            "budget spent"
        );
        assert_eq!(r.next_step(view(51, 30)), ReplayStep::Done);
        assert_eq!(r.next_since(), Some(33), "the last message handed out");
    }
}
