//! Validated names: channels, request ids, message ids, session ids and subscription keys.
//!
//! Every name type can only be built through validation, so code holding a `Channel` never
//! re-checks it, and the wire encoders can write names without escaping (the grammars contain
//! no character that JSON would escape).

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Which kind of name a [`NameError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NameKind {
    /// A channel name (`[A-Za-z0-9_.-]{1,64}`).
    Channel,
    /// A request id (`[A-Za-z0-9_.:-]{1,128}`).
    RequestId,
    /// A publisher's message id (same grammar as a request id).
    MessageId,
    /// A client-supplied session id (same grammar as a request id).
    SessionId,
    /// A subscription key, `{channel}:{request_id}`.
    SubscriptionKey,
}

impl NameKind {
    /// The field name users see in frames and bodies, e.g. `"request_id"`.
    pub fn as_str(self) -> &'static str {
        match self {
            NameKind::Channel => "channel",
            NameKind::RequestId => "request_id",
            NameKind::MessageId => "message_id",
            NameKind::SessionId => "session_id",
            NameKind::SubscriptionKey => "subscription_key",
        }
    }

    /// The allowed characters, as shown to users in error messages.
    pub fn allowed_chars(self) -> &'static str {
        match self {
            NameKind::Channel => "A-Z a-z 0-9 _ . -",
            NameKind::RequestId
            | NameKind::MessageId
            | NameKind::SessionId
            | NameKind::SubscriptionKey => "A-Z a-z 0-9 _ . : -",
        }
    }
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a valid name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is the empty string.
    #[error("{kind} must not be empty")]
    Empty {
        /// Which name.
        kind: NameKind,
    },
    /// The name has more characters than its grammar allows.
    #[error("{kind} is {len} characters; the limit is {max}")]
    TooLong {
        /// Which name.
        kind: NameKind,
        /// Its length in characters.
        len: usize,
        /// The limit in characters.
        max: usize,
    },
    /// The name contains a character outside its grammar.
    #[error("{kind} contains {ch:?} at position {position}; allowed: {allowed}", allowed = kind.allowed_chars())]
    InvalidChar {
        /// Which name.
        kind: NameKind,
        /// The first offending character.
        ch: char,
        /// Its 0-based position, counted in characters.
        position: usize,
    },
    /// A subscription key without the `:` between channel and request id.
    #[error("subscription_key must be \"{{channel}}:{{request_id}}\" but has no ':'")]
    MissingSeparator,
}

/// Longest channel, in characters.
pub const CHANNEL_MAX_LEN: usize = 64;
/// Longest request id, message id or session id, in characters.
pub const ID_MAX_LEN: usize = 128;

fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

fn is_id_char(c: char) -> bool {
    is_channel_char(c) || c == ':'
}

/// Checks `s` against `[allowed]{1,max}`; shared by every name grammar.
pub(crate) fn validate(
    kind: NameKind,
    s: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty { kind });
    }
    // Every allowed character is ASCII, so a valid name is one byte per character: one pass
    // over the bytes settles the common case (names are validated on every publish and every
    // read of the log). The passes below only explain a failure.
    if s.len() <= max && s.bytes().all(|b| b.is_ascii() && allowed(char::from(b))) {
        return Ok(());
    }
    // Byte length bounds the character count from above, so the O(n) count only runs for
    // strings that might really be too long.
    if s.len() > max {
        let len = s.chars().count();
        if len > max {
            return Err(NameError::TooLong { kind, len, max });
        }
    }
    match s.chars().enumerate().find(|&(_, c)| !allowed(c)) {
        Some((position, ch)) => Err(NameError::InvalidChar { kind, ch, position }),
        None => Ok(()),
    }
}

/// Characters allowed in a request id (used by key patterns for request-id prefixes).
pub(crate) fn request_id_char(c: char) -> bool {
    is_id_char(c)
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:expr, $max:expr, $allowed:expr) => {
        $(#[$doc])*
        ///
        /// Cheap to clone (a shared, immutable string).
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `s` and wraps it.
            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s: String = s.into();
                validate($kind, &s, $max, $allowed)?;
                Ok(Self(Arc::from(s)))
            }

            /// Validates a borrowed string, copying it only when it is valid.
            pub fn parse(s: &str) -> Result<Self, NameError> {
                validate($kind, s, $max, $allowed)?;
                Ok(Self(Arc::from(s)))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::parse(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Hash and Eq of the newtype are those of the str, so map lookups by &str are sound.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = NameError;
            fn try_from(s: &str) -> Result<Self, NameError> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0.to_string()
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct NameVisitor;
                impl Visitor<'_> for NameVisitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "a {} string", $kind)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::parse(v).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(NameVisitor)
            }
        }
    };
}

name_type!(
    /// A channel: `[A-Za-z0-9_.-]{1,64}`, never containing `:`.
    Channel,
    NameKind::Channel,
    CHANNEL_MAX_LEN,
    is_channel_char
);
name_type!(
    /// A request id: `[A-Za-z0-9_.:-]{1,128}`.
    RequestId,
    NameKind::RequestId,
    ID_MAX_LEN,
    is_id_char
);
name_type!(
    /// A publisher's idempotency key for a message: `[A-Za-z0-9_.:-]{1,128}`.
    MessageId,
    NameKind::MessageId,
    ID_MAX_LEN,
    is_id_char
);
/// A message id borrowed from text, checked like [`MessageId::parse`] but not copied: what a
/// reader of stored rows hands to the frame encoder without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageIdRef<'a>(&'a str);

impl<'a> MessageIdRef<'a> {
    /// Validates `s` (the grammar of [`MessageId`]) and borrows it.
    pub fn parse(s: &'a str) -> Result<Self, NameError> {
        validate(NameKind::MessageId, s, ID_MAX_LEN, is_id_char)?;
        Ok(Self(s))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &'a str {
        self.0
    }

    /// An owned copy.
    pub fn to_owned_id(&self) -> MessageId {
        MessageId(Arc::from(self.0))
    }
}

impl<'a> From<&'a MessageId> for MessageIdRef<'a> {
    fn from(id: &'a MessageId) -> Self {
        MessageIdRef(id.as_str())
    }
}

impl fmt::Display for MessageIdRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

name_type!(
    /// A client-supplied id of one browser tab, stable across reconnects: `[A-Za-z0-9_.:-]{1,128}`.
    SessionId,
    NameKind::SessionId,
    ID_MAX_LEN,
    is_id_char
);

/// A subscription key, `{channel}:{request_id}`: the unit of subscription, backlog and stream.
///
/// Because a channel never contains `:`, the string form splits one way only (at the first
/// `:`). Cloning copies two shared pointers. Equality, hashing and ordering follow
/// `(channel, request_id)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionKey {
    channel: Channel,
    request_id: RequestId,
}

impl SubscriptionKey {
    /// The key of `request_id` within `channel`.
    pub fn new(channel: Channel, request_id: RequestId) -> Self {
        Self {
            channel,
            request_id,
        }
    }

    /// The channel part.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The request-id part.
    pub fn request_id(&self) -> &RequestId {
        &self.request_id
    }

    /// Parses `{channel}:{request_id}`, splitting at the first `:`.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let (channel, request_id) = s.split_once(':').ok_or(NameError::MissingSeparator)?;
        Ok(Self {
            channel: Channel::parse(channel)?,
            request_id: RequestId::parse(request_id)?,
        })
    }

    /// Splits the key into its parts.
    pub fn into_parts(self) -> (Channel, RequestId) {
        (self.channel, self.request_id)
    }
}

impl fmt::Display for SubscriptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.channel, self.request_id)
    }
}

impl FromStr for SubscriptionKey {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for SubscriptionKey {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, NameError> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SubscriptionKey {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::parse(&s)
    }
}

impl From<SubscriptionKey> for String {
    fn from(key: SubscriptionKey) -> String {
        key.to_string()
    }
}

impl Serialize for SubscriptionKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SubscriptionKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = SubscriptionKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a subscription key string \"{channel}:{request_id}\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SubscriptionKey, E> {
                SubscriptionKey::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}
