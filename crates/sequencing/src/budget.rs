//! How much one read hands out: the one budget every read of the log is run to.
//!
//! A WebSocket catch-up step, an HTTP recovery answer and a stream page are each a page of
//! messages handed out under a [`ReadBudget`] — at most `max_events` messages and `max_bytes`
//! of them. A page never passes `max_bytes` unless it is a single message: the message that
//! would cross it ends the page instead (one message larger than the budget is handed out
//! alone, so a reader paging through the log always makes progress).

/// At most `max_events` messages and `max_bytes` of them per page (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReadBudget {
    /// Most messages a page holds (a budget of 0 is read as 1).
    pub max_events: usize,
    /// Most bytes of messages a page holds, unless its one message is larger.
    pub max_bytes: usize,
}

impl ReadBudget {
    /// An empty page under this budget.
    pub fn fill(self) -> Fill {
        Fill {
            budget: self,
            events: 0,
            bytes: 0,
            cut: false,
        }
    }
}

/// A page being filled under a [`ReadBudget`]: what it took so far, and whether a message was
/// refused (then nothing more is taken). A plain value: a caller that may have to drop what it
/// took from one source (a log page read while the retention floor passed the cursor) fills a
/// copy and keeps it only if the page is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    budget: ReadBudget,
    events: usize,
    bytes: usize,
    cut: bool,
}

/// Messages a [`Fill`] took from one source, and the highest number they account for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The messages taken, in order.
    pub items: Vec<T>,
    /// The number of the last message taken (`None` when none was).
    pub last: Option<u64>,
    /// Every message of the source numbered up to this was handed out: the source's own bound
    /// when the budget took all it offered, else the last message taken.
    pub covered_through: u64,
}

impl Fill {
    /// Take one more message of `bytes`: false when it does not fit (the page ends before it,
    /// and from then on nothing is taken).
    pub fn take(&mut self, bytes: usize) -> bool {
        let fits = !self.cut
            && (self.events == 0
                || (self.events < self.budget.max_events
                    && self.bytes.saturating_add(bytes) <= self.budget.max_bytes));
        if fits {
            self.events += 1;
            self.bytes = self.bytes.saturating_add(bytes);
        } else {
            self.cut = true;
        }
        fits
    }

    /// Whether the budget refused a message: the page ends where it is, more may follow.
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// Messages taken.
    pub fn events(&self) -> usize {
        self.events
    }

    /// Bytes taken.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// What a read of the log for the rest of this page asks for: the messages still free plus
    /// one (to learn whether the page goes on), and the bytes still free.
    pub fn rest(&self) -> ReadBudget {
        ReadBudget {
            max_events: self
                .budget
                .max_events
                .max(1)
                .saturating_sub(self.events)
                .saturating_add(1),
            max_bytes: self.budget.max_bytes.saturating_sub(self.bytes),
        }
    }

    /// Take `messages` (number, item), in order, until one does not fit. They are the messages
    /// of a source that accounts for every message numbered in `(after, source_through]`; the
    /// page accounts for all of it when nothing was refused, else up to the last message taken
    /// (`after` if none was).
    pub fn page<T>(
        &mut self,
        after: u64,
        source_through: u64,
        messages: impl IntoIterator<Item = (u64, T)>,
        bytes_of: impl Fn(&T) -> usize,
    ) -> Page<T> {
        let mut items = Vec::new();
        let mut last = None;
        for (sequence_number, item) in messages {
            if !self.take(bytes_of(&item)) {
                return Page {
                    items,
                    covered_through: last.unwrap_or(after),
                    last,
                };
            }
            last = Some(sequence_number);
            items.push(item);
        }
        Page {
            items,
            covered_through: source_through,
            last,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(budget: ReadBudget, sizes: &[usize]) -> (Vec<u64>, u64, bool) {
        let mut fill = budget.fill();
        let msgs = sizes.iter().enumerate().map(|(i, &s)| (i as u64 + 11, s));
        let p = fill.page(10, 99, msgs, |&s| s);
        let seqs = (11..).take(p.items.len()).collect();
        (seqs, p.covered_through, fill.is_cut())
    }

    /// The count and the bytes each end a page; the crossing message is left for the next page
    /// unless it is the first; a page that took everything covers the whole source.
    #[test]
    fn a_page_ends_at_its_count_or_before_its_bytes_pass_the_budget() {
        let b = ReadBudget {
            max_events: 3,
            max_bytes: 100,
        };
        assert_eq!(page(b, &[10, 10]), (vec![11, 12], 99, false));
        assert_eq!(page(b, &[10, 10, 10, 10]), (vec![11, 12, 13], 13, true));
        assert_eq!(page(b, &[60, 40, 1]), (vec![11, 12], 12, true));
        assert_eq!(page(b, &[60, 41]), (vec![11], 11, true));
        assert_eq!(
            page(b, &[500, 1]),
            (vec![11], 11, true),
            "alone when larger"
        );
        let zero = ReadBudget {
            max_events: 0,
            max_bytes: 0,
        };
        assert_eq!(page(zero, &[5, 5]), (vec![11], 11, true), "always progress");
    }

    /// A fill carried across sources: the first message of a later source is not exempt, and
    /// once cut nothing more is taken.
    #[test]
    fn a_fill_spans_sources_and_stays_cut() {
        let mut fill = ReadBudget {
            max_events: 10,
            max_bytes: 100,
        }
        .fill();
        let first = fill.page(0, 5, [(3, 70usize)], |&s| s);
        assert_eq!((first.items.len(), first.covered_through), (1, 5));
        assert_eq!(first.last, Some(3));
        assert_eq!(
            fill.rest(),
            ReadBudget {
                max_events: 10,
                max_bytes: 30
            }
        );
        let second = fill.page(5, 9, [(7, 40usize), (8, 1)], |&s| s);
        assert!(second.items.is_empty() && second.last.is_none());
        assert_eq!(
            second.covered_through, 5,
            "nothing taken: covers nothing new"
        );
        assert!(fill.is_cut() && !fill.take(1));
        assert_eq!((fill.events(), fill.bytes()), (1, 70));
    }
}
