//! The values that go into and come out of the store.

use seqcast_protocol::{Channel, MessageId, MessageIdRef, SubscriptionKey};

/// One message to persist. It has no numbers yet: the database assigns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The stream it belongs to.
    pub key: SubscriptionKey,
    /// The publisher's idempotency key; repeating it in the same stream is an upsert.
    pub message_id: MessageId,
    /// JSON text, stored and returned verbatim. Text that is not JSON is rejected by the
    /// database ([`crate::StoreError::Rejected`]).
    pub data: String,
}

/// What an event weighs against a read's byte budget (`max_bytes` of the
/// [`crate::EventReader`] reads): its data and message id, the text a reader copies out of the
/// store for it. Names and numbers are a small fixed cost per event, bounded by the event count.
pub fn read_bytes(data: &str, message_id: &str) -> usize {
    data.len() + message_id.len()
}

/// Counts a read against its event and byte budgets. Every backend stops reading (stops stepping
/// its cursor) when [`ReadBudget::take`] says so: a read ends once `limit` events were taken, or
/// once the bytes taken reach `max_bytes` — the event that reaches or crosses the budget is
/// included, so one event larger than the budget is still read, alone, and a reader paging
/// through the log always makes progress.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadBudget {
    limit: usize,
    max_bytes: usize,
    taken: usize,
    bytes: usize,
}

impl ReadBudget {
    pub(crate) fn new(limit: usize, max_bytes: usize) -> Self {
        ReadBudget {
            limit,
            max_bytes,
            taken: 0,
            bytes: 0,
        }
    }

    /// Whether another event may be read (false when a budget is already spent, or `limit` is 0).
    pub(crate) fn has_room(&self) -> bool {
        self.taken < self.limit && (self.taken == 0 || self.bytes < self.max_bytes)
    }

    /// Counts an event of `bytes` ([`read_bytes`]) that was read.
    pub(crate) fn take(&mut self, bytes: usize) {
        self.taken += 1;
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// Whether a budget cut the read: nothing more may be read though more may match.
    pub(crate) fn is_spent(&self) -> bool {
        !self.has_room()
    }

    /// The end a page read with this budget accounts for: `last` (the number of its last
    /// event) when a budget cut the page after at least one event, else `through` (the whole
    /// range was read).
    pub(crate) fn covered_through(&self, last: u64, through: u64) -> u64 {
        if self.taken > 0 && self.is_spent() {
            last
        } else {
            through
        }
    }
}

/// A persisted event with the numbers the database gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedEvent {
    /// Deployment-wide number, strictly increasing in commit order, never reused.
    pub sequence_number: u64,
    /// The row's position in its stream, starting at 1; kept when the row is updated.
    pub stream_sequence: u64,
    /// The stream.
    pub key: SubscriptionKey,
    /// The row's message id.
    pub message_id: MessageId,
    /// Milliseconds since the Unix epoch, taken once per transaction when persisting; never
    /// smaller than an earlier event's.
    pub timestamp_ms: u64,
    /// JSON text, verbatim.
    pub data: String,
    /// True when this event updated an existing row (an upsert of a known `message_id`).
    pub replaced: bool,
}

/// What [`crate::DbWriter::open`] found in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    /// The store's random id, made when it was created.
    pub epoch: String,
    /// The highest sequence number assigned so far (0 for a new store); the next event gets
    /// `head + 1`.
    pub head: u64,
}

/// Which events [`crate::EventReader::page`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum EventFilter {
    /// Every event.
    #[default]
    All,
    /// Only the events of one stream.
    Key(SubscriptionKey),
    /// Only the events of one channel (any request id).
    Channel(Channel),
}

/// One page of the log, read in one read transaction
/// ([`crate::EventReader::page`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPage {
    /// Matching events with `after < sequence_number <= through`, ascending, at most `limit`
    /// and stopped at `max_bytes` (see [`crate::EventReader::page`]).
    pub events: Vec<CommittedEvent>,
    /// The highest number this page accounts for: the last event's number when `limit` or
    /// `max_bytes` cut the page, else `through`. Every matching event in
    /// `(after, covered_through]` is in `events`.
    pub covered_through: u64,
    /// The retention floor seen in the same read transaction (see
    /// [`crate::EventReader::retention_floor`]). When `floor > after + 1`, events the caller
    /// wanted may have been pruned.
    pub floor: u64,
}

/// One event of a key's page as the reader holds it: its text borrowed from the store's row, for
/// a caller that encodes it straight away ([`crate::EventReader::visit_key_page`]) instead of
/// keeping a [`CommittedEvent`].
#[derive(Debug, Clone, Copy)]
pub struct EventRef<'a> {
    /// Deployment-wide number.
    pub sequence_number: u64,
    /// The row's position in its stream.
    pub stream_sequence: u64,
    /// The message id (checked like [`MessageId::parse`]).
    pub message_id: MessageIdRef<'a>,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// JSON text, verbatim.
    pub data: &'a str,
    /// True when this event updated an existing row.
    pub replaced: bool,
}

impl EventRef<'_> {
    /// What this event weighs against a read's byte budget ([`read_bytes`]).
    pub fn read_bytes(&self) -> usize {
        read_bytes(self.data, self.message_id.as_str())
    }

    /// The owned event, as [`crate::EventReader::page`] returns it (`key` is the page's key).
    pub fn to_committed(&self, key: &SubscriptionKey) -> CommittedEvent {
        CommittedEvent {
            sequence_number: self.sequence_number,
            stream_sequence: self.stream_sequence,
            key: key.clone(),
            message_id: self.message_id.to_owned_id(),
            timestamp_ms: self.timestamp_ms,
            data: self.data.to_owned(),
            replaced: self.replaced,
        }
    }
}

impl CommittedEvent {
    /// What this event weighs against a read's byte budget ([`read_bytes`]).
    pub fn read_bytes(&self) -> usize {
        read_bytes(&self.data, self.message_id.as_str())
    }
}

impl<'a> From<&'a CommittedEvent> for EventRef<'a> {
    fn from(ev: &'a CommittedEvent) -> Self {
        EventRef {
            sequence_number: ev.sequence_number,
            stream_sequence: ev.stream_sequence,
            message_id: (&ev.message_id).into(),
            timestamp_ms: ev.timestamp_ms,
            data: &ev.data,
            replaced: ev.replaced,
        }
    }
}

/// What a page accounts for, without its events ([`crate::EventReader::visit_key_page`]); the
/// same meaning as in [`LogPage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageBounds {
    /// See [`LogPage::covered_through`].
    pub covered_through: u64,
    /// See [`LogPage::floor`].
    pub floor: u64,
}

/// The index into the keys of a merged read ([`crate::EventReader::visit_keys_page`]) that a row
/// carries, stored counting from `first` (0 or 1); a row naming no key of `keys` is corrupt.
pub(crate) fn merged_key_index(
    stored: i64,
    first: i64,
    keys: usize,
) -> Result<usize, crate::StoreError> {
    usize::try_from(stored - first)
        .ok()
        .filter(|&i| i < keys)
        .ok_or_else(|| crate::StoreError::Corrupt(format!("merged read: key index {stored}")))
}

/// What one [`crate::EventWriter::prune`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneReport {
    /// The retention floor after the call.
    pub floor: u64,
    /// Events deleted by this call.
    pub deleted: u64,
    /// True when no event below the floor remains (no further call is needed for this floor).
    pub done: bool,
}
