//! HTTP bodies: publish decoding, recovery and stream pages, error bodies, query parameters.
#![allow(clippy::unwrap_used)]

use seqcast_protocol::{
    BatchPublishResponse, BodyError, Channel, ErrorBody, ErrorCode, MessageFrame, MessageId,
    NameError, NameKind, ParamError, PublishResponse, RawValue, RecoveryMeta, RecoveryResponse,
    RequestId, StreamPage, SubscriptionKey, decode_batch, decode_publish, encode_message,
    encode_publish_response, encode_recovery_response, encode_stream_page, parse_u64_param,
};

fn message(seq: u64, data: &str) -> MessageFrame {
    MessageFrame {
        sequence_number: seq,
        stream_sequence: seq + 100,
        channel: Channel::new("search").unwrap(),
        request_id: RequestId::new("r1").unwrap(),
        message_id: MessageId::new(format!("m{seq}")).unwrap(),
        timestamp: 1_000 + seq,
        data: RawValue::from_string(data.to_owned()).unwrap(),
    }
}

#[test]
fn decode_publish_accepts_valid_bodies() {
    let p = decode_publish(
        br#"{"channel":"search","request_id":"r:1","data":{"x": [1, 2]},"extra":5}"#,
    )
    .unwrap();
    assert_eq!(p.channel, "search");
    assert_eq!(p.request_id, "r:1");
    assert_eq!(p.data.get(), r#"{"x": [1, 2]}"#, "data is kept verbatim");
    assert_eq!(p.message_id, None);
    assert_eq!(p.key(), SubscriptionKey::parse("search:r:1").unwrap());

    let p = decode_publish(br#"{"message_id":"m-9","data":null,"request_id":"r","channel":"c"}"#)
        .unwrap();
    assert_eq!(p.message_id, Some(MessageId::new("m-9").unwrap()));
    assert_eq!(p.data.get(), "null");

    let p = decode_publish(br#"{"channel":"c","request_id":"r","data":"s","message_id":null}"#)
        .unwrap();
    assert_eq!(p.message_id, None);

    // Escaped names are unescaped before validation.
    let p = decode_publish(br#"{"channel":"a\u005fb","request_id":"r","data":1}"#).unwrap();
    assert_eq!(p.channel, "a_b");
}

/// A body and a check of the error it must produce.
type RejectionCase = (&'static [u8], fn(&BodyError) -> bool);

#[test]
fn decode_publish_rejections() {
    let cases: &[RejectionCase] = &[
        (b"", |e| matches!(e, BodyError::Malformed(_))),
        (b"{", |e| matches!(e, BodyError::Malformed(_))),
        (b"\xff\xfe", |e| matches!(e, BodyError::Malformed(_))),
        (b"[]", |e| matches!(e, BodyError::InvalidField(_))),
        (
            br#"{"channel":"c","request_id":"r"}"#,
            |e| matches!(e, BodyError::InvalidField(m) if m.contains("missing field `data`")),
        ),
        (
            br#"{"request_id":"r","data":1}"#,
            |e| matches!(e, BodyError::InvalidField(m) if m.contains("channel")),
        ),
        (br#"{"channel":5,"request_id":"r","data":1}"#, |e| {
            matches!(e, BodyError::InvalidField(_))
        }),
        (
            br#"{"channel":"c","request_id":"r","data":1,"message_id":3}"#,
            |e| matches!(e, BodyError::InvalidField(_)),
        ),
        (br#"{"channel":"a:b","request_id":"r","data":1}"#, |e| {
            *e == BodyError::BadName(NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: ':',
                position: 1,
            })
        }),
        (br#"{"channel":"c","request_id":"","data":1}"#, |e| {
            *e == BodyError::BadName(NameError::Empty {
                kind: NameKind::RequestId,
            })
        }),
        (
            br#"{"channel":"c","request_id":"r","data":1,"message_id":"m m"}"#,
            |e| {
                *e == BodyError::BadName(NameError::InvalidChar {
                    kind: NameKind::MessageId,
                    ch: ' ',
                    position: 1,
                })
            },
        ),
    ];
    for (body, check) in cases {
        let err = decode_publish(body).unwrap_err();
        assert!(check(&err), "{}: {err:?}", String::from_utf8_lossy(body));
        assert_eq!(err.code(), ErrorCode::BadRequest);
    }
}

#[test]
fn decode_batch_cases() {
    let b = decode_batch(
        br#"{"messages":[{"channel":"a","request_id":"1","data":1},{"channel":"b","request_id":"2","data":[2],"message_id":"x"}]}"#,
    )
    .unwrap();
    assert_eq!(b.messages.len(), 2);
    assert_eq!(b.messages[0].key().to_string(), "a:1");
    assert_eq!(b.messages[1].data.get(), "[2]");
    assert_eq!(b.messages[1].message_id.as_ref().unwrap(), "x");

    assert_eq!(
        decode_batch(br#"{"messages":[]}"#).unwrap_err(),
        BodyError::Empty
    );
    assert_eq!(
        decode_batch(br#"{"messages":[]}"#).unwrap_err().to_string(),
        "batch has no messages; send at least one"
    );
    assert!(matches!(
        decode_batch(br#"{}"#).unwrap_err(),
        BodyError::InvalidField(_)
    ));
    assert!(matches!(
        decode_batch(br#"{"messages":{}}"#).unwrap_err(),
        BodyError::InvalidField(_)
    ));
    assert!(matches!(
        decode_batch(b"nope").unwrap_err(),
        BodyError::Malformed(_)
    ));
    let err = decode_batch(
        br#"{"messages":[{"channel":"a","request_id":"1","data":1},{"channel":"b:c","request_id":"2","data":2}]}"#,
    )
    .unwrap_err();
    assert_eq!(
        err,
        BodyError::InBatch {
            index: 1,
            error: Box::new(BodyError::BadName(NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: ':',
                position: 1
            })),
        }
    );
    assert_eq!(
        err.to_string(),
        "messages[1]: channel contains ':' at position 1; allowed: A-Z a-z 0-9 _ . -"
    );
    assert_eq!(err.code(), ErrorCode::BadRequest);
}

#[test]
fn publish_responses_serialize() {
    let r = PublishResponse {
        sequence_number: 5,
        stream_sequence: 2,
        message_id: MessageId::new("m").unwrap(),
    };
    assert_eq!(
        serde_json::to_string(&r).unwrap(),
        r#"{"sequence_number":5,"stream_sequence":2,"message_id":"m"}"#
    );
    let batch = BatchPublishResponse {
        results: vec![r.clone(), r],
    };
    let text = serde_json::to_string(&batch).unwrap();
    assert!(
        text.starts_with(r#"{"results":[{"sequence_number":5"#),
        "{text}"
    );
    assert_eq!(
        serde_json::from_str::<BatchPublishResponse>(&text).unwrap(),
        batch
    );
}

#[test]
fn recovery_response_parses_back() {
    let messages = vec![
        message(1, r#"{"a": 1}"#),
        message(2, "[true]"),
        message(3, "\"s\""),
    ];
    let encoded: Vec<String> = messages.iter().map(encode_message).collect();
    let metas = [
        RecoveryMeta {
            head: 9,
            oldest_sequence: Some(1),
            epoch: "ep".into(),
            complete: true,
            next_since: None,
        },
        RecoveryMeta {
            head: 9,
            oldest_sequence: None,
            epoch: "e\"\\\n\u{1}é".into(),
            complete: false,
            next_since: Some(3),
        },
    ];
    for meta in metas {
        let text = encode_recovery_response(encoded.iter().map(String::as_str), &meta);
        let parsed: RecoveryResponse =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let want = RecoveryResponse {
            messages: messages.clone(),
            head: meta.head,
            oldest_sequence: meta.oldest_sequence,
            epoch: meta.epoch.clone(),
            complete: meta.complete,
            next_since: meta.next_since,
        };
        assert_eq!(parsed, want);
        // The hand-built text is exactly what serde would write.
        assert_eq!(text, serde_json::to_string(&want).unwrap());
    }
}

#[test]
fn recovery_response_exact_text() {
    let frames = [r#"{"type":"message","x":1}"#, r#"{"type":"message","x":2}"#];
    let meta = RecoveryMeta {
        head: 7,
        oldest_sequence: None,
        epoch: "e1".into(),
        complete: true,
        next_since: None,
    };
    assert_eq!(
        encode_recovery_response(frames, &meta),
        r#"{"messages":[{"type":"message","x":1},{"type":"message","x":2}],"head":7,"oldest_sequence":null,"epoch":"e1","complete":true}"#
    );
    let meta = RecoveryMeta {
        head: 0,
        oldest_sequence: Some(4),
        epoch: String::new(),
        complete: false,
        next_since: Some(12),
    };
    assert_eq!(
        encode_recovery_response([], &meta),
        r#"{"messages":[],"head":0,"oldest_sequence":4,"epoch":"","complete":false,"next_since":12}"#
    );
}

#[test]
fn stream_page_parses_back() {
    let messages = vec![message(4, "1"), message(8, r#"{"z":"y"}"#)];
    let encoded: Vec<String> = messages.iter().map(encode_message).collect();
    for next_after in [None, Some(108)] {
        let text = encode_stream_page(encoded.iter().map(String::as_str), next_after);
        let page: StreamPage = serde_json::from_str(&text).unwrap();
        let want = StreamPage {
            messages: messages.clone(),
            next_after,
        };
        assert_eq!(page, want);
        assert_eq!(text, serde_json::to_string(&want).unwrap());
    }
    assert_eq!(encode_stream_page([], None), r#"{"messages":[]}"#);
    assert_eq!(
        encode_stream_page([], Some(3)),
        r#"{"messages":[],"next_after":3}"#
    );
}

#[test]
fn error_body_shape() {
    let body = ErrorBody::new(
        ErrorCode::BadRequest,
        "since must be a non-negative integer, got \"-1\"",
    );
    let text = serde_json::to_string(&body).unwrap();
    assert_eq!(
        text,
        r#"{"error":{"code":"bad_request","message":"since must be a non-negative integer, got \"-1\""}}"#
    );
    assert_eq!(serde_json::from_str::<ErrorBody>(&text).unwrap(), body);
}

#[test]
fn parse_u64_param_table() {
    let ok = [
        ("0", 0),
        ("5", 5),
        ("007", 7),
        ("18446744073709551615", u64::MAX),
    ];
    for (value, want) in ok {
        assert_eq!(parse_u64_param("since", value), Ok(want), "{value:?}");
    }
    let bad = [
        ("-1", "since must be a non-negative integer, got \"-1\""),
        ("-0", "since must be a non-negative integer, got \"-0\""),
        (
            "abc",
            "since must be a non-negative integer, got \"abc\", which is not a number",
        ),
        (
            "18446744073709551616",
            "since must be a non-negative integer, got \"18446744073709551616\", which is too large (max 18446744073709551615)",
        ),
        (
            "99999999999999999999999",
            "since must be a non-negative integer, got \"99999999999999999999999\", which is too large (max 18446744073709551615)",
        ),
        (
            "",
            "since must be a non-negative integer, got an empty value",
        ),
        (
            "+5",
            "since must be a non-negative integer, got \"+5\", which has a sign; use digits only",
        ),
        (
            " 5",
            "since must be a non-negative integer, got \" 5\", which is not a number",
        ),
        (
            "5 ",
            "since must be a non-negative integer, got \"5 \", which is not a number",
        ),
        (
            "1.5",
            "since must be a non-negative integer, got \"1.5\", which is not a number",
        ),
        (
            "1e3",
            "since must be a non-negative integer, got \"1e3\", which is not a number",
        ),
        (
            "0x10",
            "since must be a non-negative integer, got \"0x10\", which is not a number",
        ),
        (
            "٣",
            "since must be a non-negative integer, got \"٣\", which is not a number",
        ),
        (
            "-",
            "since must be a non-negative integer, got \"-\", which is not a number",
        ),
    ];
    for (value, message) in bad {
        assert_eq!(
            parse_u64_param("since", value),
            Err(ParamError {
                param: "since".into(),
                message: message.into()
            }),
            "{value:?}"
        );
    }
    let err = parse_u64_param("limit", "x").unwrap_err();
    assert_eq!(err.param, "limit");
    assert_eq!(
        err.to_string(),
        "limit must be a non-negative integer, got \"x\", which is not a number"
    );
    let long = "a".repeat(5_000);
    assert!(parse_u64_param("after", &long).unwrap_err().message.len() < 200);
}

#[test]
fn the_hand_written_publish_answer_is_what_serde_writes() {
    for (seq, stream, id) in [
        (1, 1, "m-1"),
        (u64::MAX, 0, "0197a3f2c4d5e6f7a1b2c3d4"),
        (42, 7, "a.b:c_d-e"),
    ] {
        let r = PublishResponse {
            sequence_number: seq,
            stream_sequence: stream,
            message_id: MessageId::parse(id).unwrap(),
        };
        assert_eq!(
            encode_publish_response(&r),
            serde_json::to_string(&r).unwrap()
        );
    }
}

/// `GET /events`: `key` is taken as often as it comes, every other parameter once; unknown
/// parameters and bad values are refused, naming them.
#[test]
fn an_events_query_takes_repeated_keys_and_refuses_what_it_does_not_know() {
    use seqcast_protocol::{LiveMode, decode_events_query};
    let q = decode_events_query("key=a:1&since=7&key=b%3A2&live=long-poll&timeout=5").unwrap();
    assert_eq!(q.key, ["a:1", "b:2"]);
    assert_eq!(
        (q.since, q.live, q.timeout),
        (Some(7), Some(LiveMode::LongPoll), Some(5))
    );
    assert!(decode_events_query("").unwrap().key.is_empty());
    for bad in [
        "since=1&since=2",
        "nope=1",
        "since=-1",
        "live=ws",
        "timeout=x",
    ] {
        let e = decode_events_query(bad).unwrap_err();
        assert!(!e.message.is_empty(), "{bad}");
    }
}
