//! Key patterns from a JWT's `channels` claim: which subscription keys a token may read.

use std::fmt;

use crate::names::{
    Channel, ID_MAX_LEN, NameError, NameKind, RequestId, SubscriptionKey, request_id_char, validate,
};

/// One entry of a token's `channels` claim.
///
/// Grammar: `*` (every key), `chan` or `chan:*` (every key of channel `chan`), `chan:req`
/// (exactly that key), `chan:pre*` (keys of `chan` whose request id starts with `pre`). Only a
/// trailing `*` is a wildcard. Equivalent spellings parse to equal patterns (`chan` == `chan:*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPattern {
    scope: Scope,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    All,
    Channel(Channel),
    Exact(SubscriptionKey),
    /// Non-empty prefix; an empty one is normalised to `Channel`.
    Prefix {
        channel: Channel,
        prefix: String,
    },
}

impl KeyPattern {
    /// Parses one pattern.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s == "*" {
            return Ok(Self { scope: Scope::All });
        }
        let Some((channel, request)) = s.split_once(':') else {
            return Ok(Self {
                scope: Scope::Channel(Channel::parse(s)?),
            });
        };
        let channel = Channel::parse(channel)?;
        let scope = match request.strip_suffix('*') {
            None => Scope::Exact(SubscriptionKey::new(channel, RequestId::parse(request)?)),
            Some("") => Scope::Channel(channel),
            Some(prefix) => {
                // A prefix of a valid request id: same characters, at most as long.
                validate(NameKind::RequestId, prefix, ID_MAX_LEN, request_id_char)?;
                Scope::Prefix {
                    channel,
                    prefix: prefix.to_owned(),
                }
            }
        };
        Ok(Self { scope })
    }

    /// Whether a token holding this pattern may read `key`.
    pub fn matches(&self, key: &SubscriptionKey) -> bool {
        match &self.scope {
            Scope::All => true,
            Scope::Channel(channel) => key.channel() == channel,
            Scope::Exact(exact) => key == exact,
            Scope::Prefix { channel, prefix } => {
                key.channel() == channel && key.request_id().as_str().starts_with(prefix.as_str())
            }
        }
    }

    /// True iff every key of `channel` matches this pattern.
    pub fn matches_channel_wholly(&self, channel: &Channel) -> bool {
        match &self.scope {
            Scope::All => true,
            Scope::Channel(c) => c == channel,
            Scope::Exact(_) | Scope::Prefix { .. } => false,
        }
    }

    /// True iff at least one key of `channel` could match this pattern.
    pub fn may_match_channel(&self, channel: &Channel) -> bool {
        match &self.scope {
            Scope::All => true,
            Scope::Channel(c) => c == channel,
            Scope::Exact(key) => key.channel() == channel,
            Scope::Prefix { channel: c, .. } => c == channel,
        }
    }
}

impl fmt::Display for KeyPattern {
    /// The canonical spelling: `*`, `chan:*`, `chan:req` or `chan:pre*`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Scope::All => f.write_str("*"),
            Scope::Channel(channel) => write!(f, "{channel}:*"),
            Scope::Exact(key) => write!(f, "{key}"),
            Scope::Prefix { channel, prefix } => write!(f, "{channel}:{prefix}*"),
        }
    }
}

impl std::str::FromStr for KeyPattern {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::parse(s)
    }
}
