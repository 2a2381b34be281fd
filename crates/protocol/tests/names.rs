//! Name grammars, subscription keys and key patterns.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use seqcast_protocol::{
    Channel, KeyPattern, MessageId, NameError, NameKind, RequestId, SessionId, SubscriptionKey,
};

fn chars(n: usize) -> String {
    "a".repeat(n)
}

#[test]
fn channel_grammar_table() {
    let ok = [
        "a".to_owned(),
        "Z".to_owned(),
        "0".to_owned(),
        "search".to_owned(),
        "a_b.c-d".to_owned(),
        "___".to_owned(),
        "-.-".to_owned(),
        chars(64),
    ];
    for s in ok {
        let c = Channel::new(s.clone()).unwrap_or_else(|e| panic!("{s:?} rejected: {e}"));
        assert_eq!(c.as_str(), s);
        assert_eq!(c.to_string(), s);
    }
    let bad: &[(&str, NameError)] = &[
        (
            "",
            NameError::Empty {
                kind: NameKind::Channel,
            },
        ),
        (
            "abc:def",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: ':',
                position: 3,
            },
        ),
        (
            ":",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: ':',
                position: 0,
            },
        ),
        (
            "a b",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: ' ',
                position: 1,
            },
        ),
        (
            "a/b",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: '/',
                position: 1,
            },
        ),
        (
            "a*",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: '*',
                position: 1,
            },
        ),
        (
            "a\"",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: '"',
                position: 1,
            },
        ),
        (
            "a\\",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: '\\',
                position: 1,
            },
        ),
        (
            "a\n",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: '\n',
                position: 1,
            },
        ),
        (
            "a\0",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: '\0',
                position: 1,
            },
        ),
        (
            "a+b",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: '+',
                position: 1,
            },
        ),
        (
            "a%20",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: '%',
                position: 1,
            },
        ),
        (
            "ché",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: 'é',
                position: 2,
            },
        ),
        (
            "日本",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: '日',
                position: 0,
            },
        ),
        (
            "a\u{200b}",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: '\u{200b}',
                position: 1,
            },
        ),
    ];
    for (s, want) in bad {
        assert_eq!(Channel::new(*s).unwrap_err(), *want, "input {s:?}");
    }
    assert_eq!(
        Channel::new(chars(65)).unwrap_err(),
        NameError::TooLong {
            kind: NameKind::Channel,
            len: 65,
            max: 64
        }
    );
    // Length is counted in characters: 64 two-byte characters are too many bytes but the
    // real problem is the character, which is what the user is told.
    assert_eq!(
        Channel::new("é".repeat(40)).unwrap_err(),
        NameError::InvalidChar {
            kind: NameKind::Channel,
            ch: 'é',
            position: 0
        }
    );
    assert_eq!(
        Channel::new("é".repeat(70)).unwrap_err(),
        NameError::TooLong {
            kind: NameKind::Channel,
            len: 70,
            max: 64
        }
    );
}

#[test]
fn id_grammars_table() {
    type Check = fn(&str) -> Result<String, NameError>;
    let kinds: [(NameKind, Check); 3] = [
        (NameKind::RequestId, |s| {
            RequestId::new(s).map(|v| v.to_string())
        }),
        (NameKind::MessageId, |s| {
            MessageId::new(s).map(|v| v.to_string())
        }),
        (NameKind::SessionId, |s| {
            SessionId::new(s).map(|v| v.to_string())
        }),
    ];
    for (kind, check) in kinds {
        for s in [
            "a",
            "r-1",
            "a:b:c",
            ":",
            "::",
            "A.b_c-d:9",
            &chars(128),
            &format!("{}:", chars(127)),
        ] {
            assert_eq!(check(s).unwrap(), s, "{kind} {s:?}");
        }
        assert_eq!(check("").unwrap_err(), NameError::Empty { kind });
        assert_eq!(
            check(&chars(129)).unwrap_err(),
            NameError::TooLong {
                kind,
                len: 129,
                max: 128
            }
        );
        for (s, ch, position) in [
            ("a b", ' ', 1),
            ("a/b", '/', 1),
            ("ab*", '*', 2),
            ("a\"", '"', 1),
            ("a\\", '\\', 1),
            ("\t", '\t', 0),
            ("a,b", ',', 1),
            ("ü", 'ü', 0),
            ("a🙂", '🙂', 1),
        ] {
            assert_eq!(
                check(s).unwrap_err(),
                NameError::InvalidChar { kind, ch, position },
                "{kind} {s:?}"
            );
        }
    }
}

#[test]
fn name_error_messages_read_well() {
    assert_eq!(
        Channel::new("").unwrap_err().to_string(),
        "channel must not be empty"
    );
    assert_eq!(
        Channel::new(chars(70)).unwrap_err().to_string(),
        "channel is 70 characters; the limit is 64"
    );
    assert_eq!(
        Channel::new("abc:d").unwrap_err().to_string(),
        "channel contains ':' at position 3; allowed: A-Z a-z 0-9 _ . -"
    );
    assert_eq!(
        RequestId::new("a b").unwrap_err().to_string(),
        "request_id contains ' ' at position 1; allowed: A-Z a-z 0-9 _ . : -"
    );
    assert_eq!(
        SubscriptionKey::parse("abc").unwrap_err().to_string(),
        "subscription_key must be \"{channel}:{request_id}\" but has no ':'"
    );
    assert_eq!(NameKind::RequestId.to_string(), "request_id");
    assert_eq!(NameKind::SubscriptionKey.to_string(), "subscription_key");
}

#[test]
fn names_convert_and_serialize_as_plain_strings() {
    let c: Channel = "search".parse().unwrap();
    assert_eq!(Channel::try_from("search").unwrap(), c);
    assert_eq!(Channel::try_from("search".to_owned()).unwrap(), c);
    assert_eq!(c.as_ref(), "search");
    assert_eq!(String::from(c.clone()), "search");
    assert_eq!(serde_json::to_string(&c).unwrap(), "\"search\"");
    assert_eq!(serde_json::from_str::<Channel>("\"search\"").unwrap(), c);
    let err = serde_json::from_str::<Channel>("\"a:b\"").unwrap_err();
    assert!(err.to_string().contains("channel contains ':'"), "{err}");
    assert!(serde_json::from_str::<Channel>("5").is_err());
    // Escaped JSON strings are unescaped before validation.
    assert_eq!(
        serde_json::from_str::<Channel>(r#""a\u005fb""#).unwrap(),
        "a_b"
    );
    let mut set = std::collections::HashSet::new();
    set.insert(c);
    assert!(set.contains("search"));
}

#[test]
fn subscription_key_parse_and_display() {
    let cases = [
        ("search:abc", "search", "abc"),
        ("search:a:b:c", "search", "a:b:c"),
        ("s::", "s", ":"),
        ("session:abc", "session", "abc"),
    ];
    for (text, channel, request_id) in cases {
        let key = SubscriptionKey::parse(text).unwrap();
        assert_eq!(key.channel().as_str(), channel);
        assert_eq!(key.request_id().as_str(), request_id);
        assert_eq!(key.to_string(), text);
        assert_eq!(
            key,
            SubscriptionKey::new(
                Channel::new(channel).unwrap(),
                RequestId::new(request_id).unwrap()
            )
        );
        assert_eq!(serde_json::to_string(&key).unwrap(), format!("\"{text}\""));
        assert_eq!(
            serde_json::from_str::<SubscriptionKey>(&format!("\"{text}\"")).unwrap(),
            key
        );
        assert_eq!(text.parse::<SubscriptionKey>().unwrap(), key);
    }
    let bad: &[(&str, NameError)] = &[
        ("", NameError::MissingSeparator),
        ("search", NameError::MissingSeparator),
        (
            ":abc",
            NameError::Empty {
                kind: NameKind::Channel,
            },
        ),
        (
            "search:",
            NameError::Empty {
                kind: NameKind::RequestId,
            },
        ),
        (
            "se arch:abc",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: ' ',
                position: 2,
            },
        ),
        (
            "search:a/b",
            NameError::InvalidChar {
                kind: NameKind::RequestId,
                ch: '/',
                position: 1,
            },
        ),
    ];
    for (text, want) in bad {
        assert_eq!(SubscriptionKey::parse(text).unwrap_err(), *want, "{text:?}");
    }
}

#[test]
fn subscription_key_orders_by_channel_then_request_id() {
    let key = |c: &str, r: &str| {
        SubscriptionKey::new(Channel::new(c).unwrap(), RequestId::new(r).unwrap())
    };
    // As text "a0:b" < "a:z" (since '0' < ':'), but by parts channel "a" < "a0".
    assert!(key("a", "z") < key("a0", "b"));
    assert!(key("a", "a") < key("a", "b"));
}

const CHANNEL_RE: &str = "[A-Za-z0-9_.-]{1,64}";
const REQUEST_RE: &str = "[A-Za-z0-9_.:-]{1,128}";

proptest! {
    #[test]
    fn any_valid_key_round_trips(channel in CHANNEL_RE, request_id in REQUEST_RE) {
        let key = SubscriptionKey::new(Channel::new(channel.clone()).unwrap(), RequestId::new(request_id.clone()).unwrap());
        let text = key.to_string();
        prop_assert_eq!(&text, &format!("{channel}:{request_id}"));
        let parsed = SubscriptionKey::parse(&text).unwrap();
        prop_assert_eq!(parsed.channel().as_str(), channel.as_str());
        prop_assert_eq!(parsed.request_id().as_str(), request_id.as_str());
        prop_assert_eq!(parsed, key);
    }

    /// Naive model: try every ':' as the split point; at most one may yield a valid key, and
    /// `parse` must agree with it.
    #[test]
    fn no_string_splits_two_ways(text in "[a-c:._é ]{0,12}") {
        let splits: Vec<SubscriptionKey> = text
            .char_indices()
            .filter(|&(_, c)| c == ':')
            .filter_map(|(i, _)| {
                let channel = Channel::new(&text[..i]).ok()?;
                let request_id = RequestId::new(&text[i + 1..]).ok()?;
                Some(SubscriptionKey::new(channel, request_id))
            })
            .collect();
        prop_assert!(splits.len() <= 1, "{:?} splits {} ways", text, splits.len());
        match SubscriptionKey::parse(&text) {
            Ok(key) => {
                prop_assert_eq!(splits.first(), Some(&key));
                prop_assert_eq!(key.to_string(), text);
            }
            Err(_) => prop_assert!(splits.is_empty()),
        }
    }

    #[test]
    fn channel_accepts_exactly_its_grammar(text in "[A-Za-z0-9_.:/ é-]{0,70}") {
        let model = !text.is_empty()
            && text.chars().count() <= 64
            && text.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        prop_assert_eq!(Channel::new(text.clone()).is_ok(), model);
    }

    #[test]
    fn request_id_accepts_exactly_its_grammar(text in "[A-Za-z0-9_.:/ é-]{0,135}") {
        let model = !text.is_empty()
            && text.chars().count() <= 128
            && text.chars().all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
        prop_assert_eq!(RequestId::new(text.clone()).is_ok(), model);
    }
}

fn key(text: &str) -> SubscriptionKey {
    SubscriptionKey::parse(text).unwrap()
}

#[test]
fn key_pattern_table() {
    // (pattern, key, matches)
    let cases = [
        ("*", "search:abc", true),
        ("*", "x:y", true),
        ("search", "search:abc", true),
        ("search", "searchx:abc", false),
        ("search", "x:abc", false),
        ("search:*", "search:abc", true),
        ("search:*", "search:a:b", true),
        ("search:*", "sear:abc", false),
        ("session:abc", "session:abc", true),
        ("session:abc", "session:abcd", false),
        ("session:abc", "session:ab", false),
        ("session:abc", "other:abc", false),
        ("search:pre*", "search:pre", true),
        ("search:pre*", "search:prefix", true),
        ("search:pre*", "search:pr", false),
        ("search:pre*", "search:xpre", false),
        ("search:pre*", "other:prefix", false),
        ("s:a:b*", "s:a:bc", true),
        ("s:a:b*", "s:a:c", false),
        ("s:a:b", "s:a:b", true),
    ];
    for (pattern, k, want) in cases {
        let p = KeyPattern::parse(pattern).unwrap_or_else(|e| panic!("{pattern:?}: {e}"));
        assert_eq!(p.matches(&key(k)), want, "{pattern:?} vs {k:?}");
    }
}

#[test]
fn key_pattern_channel_wholly_and_canonical_form() {
    let ch = |s: &str| Channel::new(s).unwrap();
    let cases = [
        ("*", "search", true, true, "*"),
        ("search", "search", true, true, "search:*"),
        ("search:*", "search", true, true, "search:*"),
        ("search:*", "other", false, false, "search:*"),
        ("search:abc", "search", false, true, "search:abc"),
        ("search:a*", "search", false, true, "search:a*"),
        ("search:a*", "other", false, false, "search:a*"),
    ];
    for (pattern, channel, wholly, partly, canonical) in cases {
        let p = KeyPattern::parse(pattern).unwrap();
        assert_eq!(
            p.matches_channel_wholly(&ch(channel)),
            wholly,
            "{pattern} wholly {channel}"
        );
        assert_eq!(
            p.may_match_channel(&ch(channel)),
            partly,
            "{pattern} partly {channel}"
        );
        assert_eq!(p.to_string(), canonical);
        assert_eq!(KeyPattern::parse(canonical).unwrap(), p);
    }
    assert_eq!(
        KeyPattern::parse("search").unwrap(),
        KeyPattern::parse("search:*").unwrap()
    );
}

#[test]
fn key_pattern_rejections() {
    let bad: &[(&str, NameError)] = &[
        (
            "",
            NameError::Empty {
                kind: NameKind::Channel,
            },
        ),
        (
            "search*",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: '*',
                position: 6,
            },
        ),
        (
            "*:abc",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: '*',
                position: 0,
            },
        ),
        (
            "**",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: '*',
                position: 0,
            },
        ),
        (
            ":abc",
            NameError::Empty {
                kind: NameKind::Channel,
            },
        ),
        (
            "search:",
            NameError::Empty {
                kind: NameKind::RequestId,
            },
        ),
        (
            "search:a*b",
            NameError::InvalidChar {
                kind: NameKind::RequestId,
                ch: '*',
                position: 1,
            },
        ),
        (
            "search:**",
            NameError::InvalidChar {
                kind: NameKind::RequestId,
                ch: '*',
                position: 0,
            },
        ),
        (
            "search:a b*",
            NameError::InvalidChar {
                kind: NameKind::RequestId,
                ch: ' ',
                position: 1,
            },
        ),
        (
            "se arch",
            NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: ' ',
                position: 2,
            },
        ),
    ];
    for (pattern, want) in bad {
        assert_eq!(
            KeyPattern::parse(pattern).unwrap_err(),
            *want,
            "{pattern:?}"
        );
    }
    assert_eq!(
        KeyPattern::parse(&format!("s:{}*", chars(129))).unwrap_err(),
        NameError::TooLong {
            kind: NameKind::RequestId,
            len: 129,
            max: 128
        }
    );
    assert!(KeyPattern::parse(&format!("s:{}*", chars(128))).is_ok());
}

proptest! {
    /// Against a naive model of the grammar on random patterns and keys.
    #[test]
    fn key_pattern_matches_model(
        pc in "[ab]{1,2}", pr in "[ab:]{0,3}", star in any::<bool>(), bare in any::<bool>(),
        kc in "[ab]{1,2}", kr in "[ab:]{1,4}",
    ) {
        let text = if bare { pc.clone() } else { format!("{pc}:{pr}{}", if star { "*" } else { "" }) };
        let k = key(&format!("{kc}:{kr}"));
        match KeyPattern::parse(&text) {
            Ok(p) => {
                let model = kc == pc && (bare || if star { kr.starts_with(&pr) } else { kr == pr });
                prop_assert_eq!(p.matches(&k), model, "{} vs {}", text, k);
                let wholly = bare || (star && pr.is_empty());
                prop_assert_eq!(p.matches_channel_wholly(k.channel()), wholly && kc == pc);
            }
            Err(_) => prop_assert!(!bare && !star && pr.is_empty(), "{} rejected", text),
        }
    }
}
