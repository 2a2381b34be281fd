//! The publish path every door shares — `POST /api/publish`, `/api/publish/batch`,
//! `/api/publish/stream` and the WebSocket `publish` frame: who may publish, the rate limit, the
//! key check and the server-made message id ([`check_may_publish`], [`admit`], [`new_event`]), and the commit ([`commit`], which
//! calls [`crate::storage::Store::commit`], the only code path that numbers events).
//!
//! Streaming doors (a WebSocket connection, an NDJSON request) publish through a [`Pipeline`]:
//! publishes are answered in the order they arrived, many may be in flight, and everything that
//! arrived while the previous commit was out goes to the writer as one `Store::commit` — one
//! transaction, which the writer groups further with other connections' commits. A pipeline
//! holds at most what its door lets in (it stops reading at [`Pipeline::has_room`]), so a
//! stalled writer or a client that does not read its answers never makes it buffer without
//! bound.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use seqcast_persistence::{CommittedEvent, NewEvent};
use seqcast_protocol::{PublishRequest, PublishResponse};

use crate::auth::Grant;
pub use crate::auth::check_may_publish;
use crate::error::ApiError;
use crate::state::AppState;
use crate::state::MessageIds;

/// Publishes one streaming door lets in before it waits for answers (frames read and not yet
/// answered).
pub const MAX_IN_FLIGHT: usize = 256;

/// Bytes of publishes one streaming door lets in before it waits for answers (one publish
/// larger than this is let in alone).
pub const MAX_IN_FLIGHT_BYTES: usize = 4 << 20;

/// Count `n` publishes of `grant` against `--publish-rate`. Without one nothing is counted
/// (and the grant's key is not even formatted: this runs for every publish).
pub fn admit(app: &AppState, grant: &Grant, n: usize) -> Result<(), ApiError> {
    if app.settings.limits.publish_rate.is_none() {
        return Ok(());
    }
    app.limiter.admit_publish(&grant.rate_key(), n)
}

/// One validated publish as the event to commit: the grant must cover its key; a missing
/// `message_id` is made here.
pub fn new_event(
    req: PublishRequest,
    grant: &Grant,
    ids: &MessageIds,
) -> Result<NewEvent, ApiError> {
    let key = req.key();
    if !grant.allows(&key) {
        return Err(ApiError::Forbidden(format!(
            "token may not publish to {key}"
        )));
    }
    let message_id = match req.message_id {
        Some(id) => id,
        None => ids.next()?,
    };
    let data: Box<str> = req.data.into();
    Ok(NewEvent {
        key,
        message_id,
        data: String::from(data),
    })
}

/// A committed event as its publisher's answer.
pub fn answer(ev: &CommittedEvent) -> PublishResponse {
    PublishResponse {
        sequence_number: ev.sequence_number,
        stream_sequence: ev.stream_sequence,
        message_id: ev.message_id.clone(),
    }
}

/// A committed event as its publisher's answer, encoded: the body of `POST /api/publish`, a
/// line of `/api/publish/stream`.
pub fn answer_json(ev: &CommittedEvent) -> String {
    seqcast_protocol::encode_publish_response(&answer(ev))
}

/// Commit unless the database is known to be lost; a failed write looks at the file again.
pub async fn commit(
    app: &AppState,
    events: Vec<NewEvent>,
) -> Result<Vec<CommittedEvent>, ApiError> {
    if let Some(why) = app.write_fault() {
        return Err(ApiError::Unavailable(why));
    }
    let result = app.store.commit(&app.hub, events).await;
    if result.is_err() {
        app.check_database_file();
    }
    result
}

type CommitFuture = Pin<Box<dyn Future<Output = Result<Vec<CommittedEvent>, ApiError>> + Send>>;

/// One publish a pipeline holds, tagged `T` by its door (the frame's `ref`, a line number).
enum Slot<T> {
    /// Goes to the writer; its bytes count against [`MAX_IN_FLIGHT_BYTES`].
    Event(T, usize),
    /// Refused before the commit (bad name, forbidden key, rate): answered in its turn.
    Refused(T, ApiError),
}

/// The answer to one publish, in arrival order.
#[derive(Debug)]
pub enum Outcome<T> {
    /// Committed (or a retry answered with the numbers first committed).
    Committed(T, PublishResponse),
    /// Refused; nothing of it was published.
    Refused(T, ApiError),
}

/// Publishes of one streaming door, answered in arrival order, grouped into one commit per
/// round: what arrived while the previous commit was out goes together.
pub struct Pipeline<T> {
    app: Arc<AppState>,
    waiting: Vec<Slot<T>>,
    waiting_events: Vec<NewEvent>,
    committing: Option<(CommitFuture, Vec<Slot<T>>)>,
    /// Publishes held (waiting and committing).
    held: usize,
    /// Their bytes.
    bytes: usize,
}

impl<T> std::fmt::Debug for Pipeline<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("held", &self.held)
            .field("bytes", &self.bytes)
            .field("committing", &self.committing.is_some())
            .finish_non_exhaustive()
    }
}

impl<T> Pipeline<T> {
    /// An empty pipeline committing to `app`'s store.
    pub fn new(app: Arc<AppState>) -> Self {
        Pipeline {
            app,
            waiting: Vec::new(),
            waiting_events: Vec::new(),
            committing: None,
            held: 0,
            bytes: 0,
        }
    }

    /// Whether the door may let another publish in ([`MAX_IN_FLIGHT`], [`MAX_IN_FLIGHT_BYTES`]).
    pub fn has_room(&self) -> bool {
        self.held < MAX_IN_FLIGHT && self.bytes < MAX_IN_FLIGHT_BYTES
    }

    /// Publishes held, not yet answered.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// Whether a commit is out.
    pub fn is_committing(&self) -> bool {
        self.committing.is_some()
    }

    /// Take a validated publish, `bytes` long on the wire, to commit in its turn.
    pub fn push_event(&mut self, tag: T, event: NewEvent, bytes: usize) {
        self.held += 1;
        self.bytes += bytes;
        self.waiting.push(Slot::Event(tag, bytes));
        self.waiting_events.push(event);
    }

    /// Take a refused publish, answered in its turn.
    pub fn push_refused(&mut self, tag: T, error: ApiError) {
        self.held += 1;
        self.waiting.push(Slot::Refused(tag, error));
    }

    /// When no commit is out: send everything waiting to the writer as one commit, or — when
    /// only refusals wait — answer them now (returned). Call after every push and every
    /// [`Pipeline::finished`].
    pub fn start(&mut self) -> Vec<Outcome<T>> {
        if self.committing.is_some() || self.waiting.is_empty() {
            return Vec::new();
        }
        let slots = std::mem::take(&mut self.waiting);
        if self.waiting_events.is_empty() {
            return self.answer(slots, Ok(Vec::new()));
        }
        let events = std::mem::take(&mut self.waiting_events);
        let app = Arc::clone(&self.app);
        let future: CommitFuture = Box::pin(async move { commit(&app, events).await });
        self.committing = Some((future, slots));
        Vec::new()
    }

    /// Wait for the commit that is out (forever when none is) and answer its publishes, in
    /// order. Cancel safe: the commit stays out until this returns.
    pub async fn finished(&mut self) -> Vec<Outcome<T>> {
        let Some((future, _)) = self.committing.as_mut() else {
            return std::future::pending().await;
        };
        let result = future.await;
        let slots = self.committing.take().map(|(_, s)| s).unwrap_or_default();
        self.answer(slots, result)
    }

    fn answer(
        &mut self,
        slots: Vec<Slot<T>>,
        result: Result<Vec<CommittedEvent>, ApiError>,
    ) -> Vec<Outcome<T>> {
        let mut committed = match &result {
            Ok(events) => Some(events.iter()),
            Err(_) => None,
        };
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            self.held -= 1;
            match slot {
                Slot::Refused(tag, e) => out.push(Outcome::Refused(tag, e)),
                Slot::Event(tag, bytes) => {
                    self.bytes -= bytes;
                    let ev = committed.as_mut().and_then(Iterator::next);
                    match (ev, &result) {
                        (Some(ev), _) => out.push(Outcome::Committed(tag, answer(ev))),
                        (None, Err(e)) => out.push(Outcome::Refused(tag, e.clone())),
                        (None, Ok(_)) => out.push(Outcome::Refused(
                            tag,
                            ApiError::Internal("the store answered fewer events than sent".into()),
                        )),
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn server_made_ids_are_24_hex_digits_that_increase() {
        let ids = MessageIds::default();
        let (a, b) = (ids.next().unwrap(), ids.next().unwrap());
        for id in [&a, &b] {
            let s = id.as_str();
            assert_eq!(s.len(), 24, "{s}");
            assert!(
                s.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
                "{s}"
            );
        }
        let counter =
            |id: &seqcast_protocol::MessageId| u64::from_str_radix(&id.as_str()[..16], 16).unwrap();
        assert_eq!(counter(&b), counter(&a) + 1);
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        assert!(
            counter(&a) <= micros && micros - counter(&a) < 60_000_000,
            "starts at the clock"
        );
    }
}
