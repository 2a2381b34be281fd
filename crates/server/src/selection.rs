//! What an HTTP reader asks to read — the keys a query names with `channel`, `request_id` and
//! `key` — checked against its grant: the one rule of `GET /websocket/messages` and `GET /events`.

use seqcast_persistence::EventFilter;
use seqcast_protocol::{Channel, RequestId, SubscriptionKey};

use crate::auth::Grant;
use crate::error::ApiError;

/// The messages a reader asked for (those its grant may read, of them).
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every key the grant may read.
    All,
    /// One channel's keys that the grant may read.
    Channel(Channel),
    /// These keys (sorted, each once), every one of them readable by the grant.
    Keys(Vec<SubscriptionKey>),
    /// One request id, in every channel the grant may read.
    RequestId(RequestId),
}

impl Selection {
    /// The selection a query names: `channel` with `request_id` is one key, `channel` alone a
    /// channel, `request_id` alone a request id in every channel; `keys` (`channel:request_id`,
    /// at most `max_keys`) may not be combined with either. A named key the grant may not read
    /// is a 403.
    pub fn parse(
        channel: Option<String>,
        request_id: Option<String>,
        keys: &[String],
        max_keys: usize,
        grant: &Grant,
    ) -> Result<Self, ApiError> {
        let channel = channel.map(Channel::new).transpose()?;
        let request_id = request_id.map(RequestId::new).transpose()?;
        if !keys.is_empty() && (channel.is_some() || request_id.is_some()) {
            return Err(ApiError::BadRequest(
                "`key` cannot be combined with `channel` or `request_id`".into(),
            ));
        }
        if keys.len() > max_keys {
            return Err(ApiError::BadRequest(format!(
                "at most {max_keys} keys, got {}",
                keys.len()
            )));
        }
        let mut keys = keys
            .iter()
            .map(|k| SubscriptionKey::parse(k))
            .collect::<Result<Vec<_>, _>>()?;
        let selection = match (channel, request_id) {
            (Some(c), Some(r)) => Selection::Keys(vec![SubscriptionKey::new(c, r)]),
            (Some(c), None) => Selection::Channel(c),
            (None, Some(r)) => Selection::RequestId(r),
            (None, None) if keys.is_empty() => Selection::All,
            (None, None) => {
                keys.sort_unstable();
                keys.dedup();
                Selection::Keys(keys)
            }
        };
        if let Selection::Keys(keys) = &selection
            && let Some(key) = keys.iter().find(|k| !grant.allows(k))
        {
            return Err(ApiError::Forbidden(format!("token may not read {key}")));
        }
        Ok(selection)
    }

    /// What the log is asked for (the rest is sorted out by [`Selection::admits`]).
    pub fn to_event_filter(&self) -> EventFilter {
        match self {
            Selection::Keys(keys) => match keys.as_slice() {
                [key] => EventFilter::Key(key.clone()),
                [first, rest @ ..] if rest.iter().all(|k| k.channel() == first.channel()) => {
                    EventFilter::Channel(first.channel().clone())
                }
                _ => EventFilter::All,
            },
            Selection::Channel(c) => EventFilter::Channel(c.clone()),
            Selection::All | Selection::RequestId(_) => EventFilter::All,
        }
    }

    /// Whether a message of `key` is handed to this reader.
    pub fn admits(&self, key: &SubscriptionKey, grant: &Grant) -> bool {
        match self {
            Selection::Keys(keys) => keys.binary_search(key).is_ok(),
            Selection::Channel(c) => key.channel() == c && grant.allows(key),
            Selection::RequestId(r) => key.request_id() == r && grant.allows(key),
            Selection::All => grant.is_unrestricted() || grant.allows(key),
        }
    }
}
