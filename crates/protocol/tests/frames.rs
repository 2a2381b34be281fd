//! WebSocket frames: client decoding with every error, server encode/decode round trips and
//! the exact wire text of a message frame.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use seqcast_protocol::{
    Channel, ClientFrame, Connected, ErrorCode, ErrorFrame, FrameError, Hello, MessageFrame,
    MessageId, NameError, NameKind, RawValue, RequestId, ServerFrame, SessionId, SubAck, Subscribe,
    SubscriptionKey, Unsubscribe, decode_client_frame, decode_server_frame, encode_message,
    encode_server_frame,
};

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).unwrap()
}

fn subscribe(since: Option<u64>, epoch: Option<&str>) -> ClientFrame {
    ClientFrame::Subscribe(Subscribe {
        channel: Channel::new("search").unwrap(),
        request_id: RequestId::new("r:1").unwrap(),
        since,
        epoch: epoch.map(str::to_owned),
    })
}

#[test]
fn decodes_every_client_frame() {
    let cases = [
        (r#"{"type":"ping"}"#, ClientFrame::Ping),
        (r#"{"type":"ping","extra":[1,2]}"#, ClientFrame::Ping),
        (
            r#"{"type":"hello"}"#,
            ClientFrame::Hello(Hello {
                token: None,
                session_id: None,
                connection_sequence: None,
            }),
        ),
        (
            r#"{"type":"hello","token":"t.k.n","session_id":"tab-1","connection_sequence":3,"future":true}"#,
            ClientFrame::Hello(Hello {
                token: Some("t.k.n".into()),
                session_id: Some(SessionId::new("tab-1").unwrap()),
                connection_sequence: Some(3),
            }),
        ),
        (
            r#"{"type":"hello","token":null,"session_id":null}"#,
            ClientFrame::Hello(Hello {
                token: None,
                session_id: None,
                connection_sequence: None,
            }),
        ),
        (
            r#"{"type":"subscribe","channel":"search","request_id":"r:1"}"#,
            subscribe(None, None),
        ),
        (
            r#"{"request_id":"r:1","since":0,"type":"subscribe","channel":"search","epoch":"e1"}"#,
            subscribe(Some(0), Some("e1")),
        ),
        (
            r#"{"type":"subscribe","channel":"search","request_id":"r:1","since":18446744073709551615}"#,
            subscribe(Some(u64::MAX), None),
        ),
        (
            r#"{"type":"unsubscribe","channel":"search","request_id":"r:1"}"#,
            ClientFrame::Unsubscribe(Unsubscribe {
                channel: Channel::new("search").unwrap(),
                request_id: RequestId::new("r:1").unwrap(),
            }),
        ),
    ];
    for (text, want) in cases {
        assert_eq!(decode_client_frame(text).unwrap(), want, "{text}");
    }
}

#[test]
fn subscribe_and_unsubscribe_name_their_key() {
    let ClientFrame::Subscribe(s) = subscribe(None, None) else {
        unreachable!()
    };
    assert_eq!(s.key(), SubscriptionKey::parse("search:r:1").unwrap());
    let u = Unsubscribe {
        channel: s.channel.clone(),
        request_id: s.request_id.clone(),
    };
    assert_eq!(u.key(), s.key());
}

fn invalid(frame: &str, message: &str) -> FrameError {
    FrameError::InvalidField {
        frame: frame.into(),
        message: message.into(),
    }
}

#[test]
fn rejects_every_bad_client_frame() {
    let sub =
        |rest: &str| format!(r#"{{"type":"subscribe","channel":"search","request_id":"r"{rest}}}"#);
    let cases: Vec<(String, FrameError)> = vec![
        (
            r#"{"type":"subscribe""#.into(),
            FrameError::Malformed(String::new()),
        ),
        ("".into(), FrameError::Malformed(String::new())),
        ("not json".into(), FrameError::Malformed(String::new())),
        (
            r#"[{"type":"ping"}]"#.into(),
            FrameError::Malformed("frame must be a JSON object, got an array".into()),
        ),
        (
            "\"ping\"".into(),
            FrameError::Malformed("frame must be a JSON object, got a string".into()),
        ),
        ("{}".into(), FrameError::MissingType),
        (r#"{"type":null}"#.into(), FrameError::MissingType),
        (
            r#"{"type":5}"#.into(),
            FrameError::Malformed("frame field \"type\" must be a string, got a number".into()),
        ),
        (
            r#"{"type":"foo"}"#.into(),
            FrameError::UnknownType("foo".into()),
        ),
        (
            r#"{"type":"Ping"}"#.into(),
            FrameError::UnknownType("Ping".into()),
        ),
        (
            sub(r#","since":-1"#),
            invalid(
                "subscribe",
                "field \"since\" must be a non-negative integer, got -1",
            ),
        ),
        (
            sub(r#","since":"5""#),
            invalid(
                "subscribe",
                "field \"since\" must be a non-negative integer, got a string",
            ),
        ),
        (
            sub(r#","since":18446744073709551616"#),
            invalid(
                "subscribe",
                "field \"since\" is too large (max 18446744073709551615)",
            ),
        ),
        (
            sub(r#","since":1.5"#),
            invalid("subscribe", "field \"since\" must be an integer, got 1.5"),
        ),
        (
            sub(r#","since":true"#),
            invalid(
                "subscribe",
                "field \"since\" must be a non-negative integer, got a boolean",
            ),
        ),
        (
            sub(r#","epoch":7"#),
            invalid(
                "subscribe",
                "field \"epoch\" must be a string, got a number",
            ),
        ),
        (
            r#"{"type":"subscribe","request_id":"r"}"#.into(),
            invalid("subscribe", "missing field \"channel\""),
        ),
        (
            r#"{"type":"subscribe","channel":"search"}"#.into(),
            invalid("subscribe", "missing field \"request_id\""),
        ),
        (
            r#"{"type":"subscribe","channel":["a"],"request_id":"r"}"#.into(),
            invalid(
                "subscribe",
                "field \"channel\" must be a string, got an array",
            ),
        ),
        (
            r#"{"type":"subscribe","channel":"a:b","request_id":"r"}"#.into(),
            FrameError::BadName(NameError::InvalidChar {
                kind: NameKind::Channel,
                ch: ':',
                position: 1,
            }),
        ),
        (
            r#"{"type":"subscribe","channel":"","request_id":"r"}"#.into(),
            FrameError::BadName(NameError::Empty {
                kind: NameKind::Channel,
            }),
        ),
        (
            r#"{"type":"unsubscribe","channel":"c","request_id":"r r"}"#.into(),
            FrameError::BadName(NameError::InvalidChar {
                kind: NameKind::RequestId,
                ch: ' ',
                position: 1,
            }),
        ),
        (
            r#"{"type":"unsubscribe","channel":"c"}"#.into(),
            invalid("unsubscribe", "missing field \"request_id\""),
        ),
        (
            r#"{"type":"hello","session_id":"tab 1"}"#.into(),
            FrameError::BadName(NameError::InvalidChar {
                kind: NameKind::SessionId,
                ch: ' ',
                position: 3,
            }),
        ),
        (
            r#"{"type":"hello","token":1}"#.into(),
            invalid("hello", "field \"token\" must be a string, got a number"),
        ),
        (
            r#"{"type":"hello","connection_sequence":-2}"#.into(),
            invalid(
                "hello",
                "field \"connection_sequence\" must be a non-negative integer, got -2",
            ),
        ),
    ];
    for (text, want) in cases {
        let got = decode_client_frame(&text).unwrap_err();
        assert_eq!(got.code(), ErrorCode::BadRequest);
        match (&got, &want) {
            // serde's syntax messages are its own; check only our prefix.
            (FrameError::Malformed(msg), FrameError::Malformed(w)) if w.is_empty() => {
                assert!(
                    msg.starts_with("frame is not valid JSON: "),
                    "{text}: {msg}"
                );
            }
            _ => assert_eq!(got, want, "{text}"),
        }
    }
}

#[test]
fn frame_error_messages_read_well() {
    assert_eq!(
        FrameError::MissingType.to_string(),
        "frame has no \"type\" field"
    );
    assert_eq!(
        FrameError::UnknownType("foo".into()).to_string(),
        "unknown frame type \"foo\"; expected hello, subscribe, unsubscribe, ping, auth, publish or resume"
    );
    assert_eq!(
        decode_client_frame(
            r#"{"type":"subscribe","channel":"search","request_id":"r","since":-1}"#
        )
        .unwrap_err()
        .to_string(),
        "invalid subscribe frame: field \"since\" must be a non-negative integer, got -1"
    );
    assert_eq!(
        decode_client_frame(r#"{"type":"subscribe","channel":"a:b","request_id":"r"}"#)
            .unwrap_err()
            .to_string(),
        "channel contains ':' at position 1; allowed: A-Z a-z 0-9 _ . -"
    );
    let long = "x".repeat(10_000);
    let err = decode_client_frame(&format!(r#"{{"type":"{long}"}}"#)).unwrap_err();
    assert!(
        err.to_string().len() < 200,
        "unknown type is echoed in full"
    );
    let frame = ErrorFrame::from(&FrameError::MissingType);
    assert_eq!(
        frame,
        ErrorFrame::new(ErrorCode::BadRequest, "frame has no \"type\" field")
    );
}

#[test]
fn client_frames_encode_and_decode_back() {
    let frames = [
        ClientFrame::Ping,
        ClientFrame::Hello(Hello {
            token: None,
            session_id: None,
            connection_sequence: None,
        }),
        ClientFrame::Hello(Hello {
            token: Some("tok".into()),
            session_id: Some(SessionId::new("tab").unwrap()),
            connection_sequence: Some(1),
        }),
        subscribe(None, None),
        subscribe(Some(42), Some("ep")),
        ClientFrame::Unsubscribe(Unsubscribe {
            channel: Channel::new("c").unwrap(),
            request_id: RequestId::new("r").unwrap(),
        }),
    ];
    for frame in frames {
        let text = serde_json::to_string(&frame).unwrap();
        assert_eq!(decode_client_frame(&text).unwrap(), frame, "{text}");
        assert_eq!(serde_json::from_str::<ClientFrame>(&text).unwrap(), frame);
    }
    assert_eq!(
        serde_json::to_string(&ClientFrame::Ping).unwrap(),
        r#"{"type":"ping"}"#
    );
    assert_eq!(
        serde_json::to_string(&subscribe(None, None)).unwrap(),
        r#"{"type":"subscribe","channel":"search","request_id":"r:1"}"#
    );
    assert_eq!(
        serde_json::to_string(&subscribe(Some(7), Some("e"))).unwrap(),
        r#"{"type":"subscribe","channel":"search","request_id":"r:1","since":7,"epoch":"e"}"#
    );
}

fn message(data: &str) -> MessageFrame {
    MessageFrame {
        sequence_number: 42,
        stream_sequence: 3,
        channel: Channel::new("search").unwrap(),
        request_id: RequestId::new("req:7").unwrap(),
        message_id: MessageId::new("m-1").unwrap(),
        timestamp: 1_700_000_000_123,
        data: raw(data),
    }
}

#[test]
fn message_frame_exact_wire_text() {
    let frame = message(r#"{"b": [1, 2.50, "x\"y"], "a":null}"#);
    let want = r#"{"type":"message","sequence_number":42,"stream_sequence":3,"channel":"search","request_id":"req:7","message_id":"m-1","timestamp":1700000000123,"data":{"b": [1, 2.50, "x\"y"], "a":null}}"#;
    assert_eq!(encode_message(&frame), want);
    assert_eq!(
        encode_server_frame(&ServerFrame::Message(frame.clone())),
        want
    );
    // The fast path and the serde path agree.
    assert_eq!(serde_json::to_string(&frame).unwrap(), want);
    assert_eq!(
        serde_json::to_string(&ServerFrame::Message(frame)).unwrap(),
        want
    );
}

#[test]
fn message_frame_extreme_numbers() {
    let mut frame = message("0");
    frame.sequence_number = u64::MAX;
    frame.stream_sequence = 0;
    frame.timestamp = 10;
    let text = encode_message(&frame);
    assert!(
        text.contains(r#""sequence_number":18446744073709551615,"stream_sequence":0,"#),
        "{text}"
    );
    assert!(text.contains(r#""timestamp":10,"data":0}"#), "{text}");
    assert_eq!(
        decode_server_frame(&text).unwrap(),
        ServerFrame::Message(frame)
    );
}

fn every_server_frame() -> Vec<ServerFrame> {
    let key = SubscriptionKey::parse("search:r:1").unwrap();
    vec![
        ServerFrame::Connected(Connected {
            sequence_number: 0,
            client_id: "c-1".into(),
            session_id: Some(SessionId::new("tab").unwrap()),
            connection_sequence: Some(2),
            head: 99,
            epoch: "ep\"och".into(),
        }),
        ServerFrame::Connected(Connected {
            sequence_number: 0,
            client_id: "c-2".into(),
            session_id: None,
            connection_sequence: None,
            head: 0,
            epoch: "e".into(),
        }),
        ServerFrame::SubAck(SubAck {
            channel: key.channel().clone(),
            request_id: key.request_id().clone(),
            subscription_key: key.clone(),
            drained: 5,
            head: 9,
            recovered: None,
            oldest_sequence: None,
            expired: 3,
            overflow: 2,
            epoch: "e".into(),
        }),
        ServerFrame::SubAck(SubAck {
            channel: key.channel().clone(),
            request_id: key.request_id().clone(),
            subscription_key: key,
            drained: 0,
            head: 40,
            recovered: Some(false),
            oldest_sequence: Some(17),
            expired: 0,
            overflow: 0,
            epoch: "e".into(),
        }),
        ServerFrame::Message(message(r#"{"k":[true,null]}"#)),
        ServerFrame::Message(message(r#""just a string""#)),
        ServerFrame::Error(ErrorFrame::new(ErrorCode::Forbidden, "no \"access\"\n")),
        ServerFrame::Pong,
    ]
}

#[test]
fn server_frames_round_trip() {
    for frame in every_server_frame() {
        let text = encode_server_frame(&frame);
        assert!(
            text.starts_with("{\"type\":\""),
            "type is not first: {text}"
        );
        assert_eq!(decode_server_frame(&text).unwrap(), frame, "{text}");
    }
}

#[test]
fn server_frames_exact_wire_text() {
    let frames = every_server_frame();
    let texts: Vec<String> = frames.iter().map(encode_server_frame).collect();
    assert_eq!(
        texts[0],
        r#"{"type":"connected","sequence_number":0,"client_id":"c-1","session_id":"tab","connection_sequence":2,"head":99,"epoch":"ep\"och"}"#
    );
    assert_eq!(
        texts[1],
        r#"{"type":"connected","sequence_number":0,"client_id":"c-2","session_id":null,"connection_sequence":null,"head":0,"epoch":"e"}"#
    );
    assert_eq!(
        texts[2],
        r#"{"type":"sub_ack","channel":"search","request_id":"r:1","subscription_key":"search:r:1","drained":5,"head":9,"expired":3,"overflow":2,"epoch":"e"}"#
    );
    assert_eq!(
        texts[3],
        r#"{"type":"sub_ack","channel":"search","request_id":"r:1","subscription_key":"search:r:1","drained":0,"head":40,"recovered":false,"oldest_sequence":17,"epoch":"e"}"#
    );
    assert_eq!(
        texts[6],
        r#"{"type":"error","code":"forbidden","message":"no \"access\"\n"}"#
    );
    assert_eq!(texts[7], r#"{"type":"pong"}"#);
}

#[test]
fn error_codes_on_the_wire() {
    let codes = [
        (ErrorCode::BadRequest, "bad_request", 400),
        (ErrorCode::Unauthorized, "unauthorized", 401),
        (ErrorCode::Forbidden, "forbidden", 403),
        (ErrorCode::NotFound, "not_found", 404),
        (ErrorCode::TooLarge, "too_large", 413),
        (ErrorCode::RateLimited, "rate_limited", 429),
        (ErrorCode::Unavailable, "unavailable", 503),
        (ErrorCode::Internal, "internal", 500),
    ];
    for (code, wire, status) in codes {
        assert_eq!(code.to_string(), wire);
        assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{wire}\""));
        assert_eq!(
            serde_json::from_str::<ErrorCode>(&format!("\"{wire}\"")).unwrap(),
            code
        );
        assert_eq!(code.http_status(), status);
    }
}

#[test]
fn decode_server_frame_rejections() {
    assert!(matches!(
        decode_server_frame("nope"),
        Err(FrameError::Malformed(_))
    ));
    assert!(matches!(
        decode_server_frame("[1]"),
        Err(FrameError::Malformed(_))
    ));
    assert_eq!(decode_server_frame("{}"), Err(FrameError::MissingType));
    assert_eq!(
        decode_server_frame(r#"{"type":"hello"}"#),
        Err(FrameError::UnknownServerType("hello".into()))
    );
    let err = decode_server_frame(r#"{"type":"message","sequence_number":1}"#).unwrap_err();
    assert!(
        matches!(&err, FrameError::InvalidField { frame, .. } if frame == "message"),
        "{err:?}"
    );
    let err = decode_server_frame(
        r#"{"type":"message","sequence_number":1,"stream_sequence":1,"channel":"a:b","request_id":"r","message_id":"m","timestamp":1,"data":1}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("channel contains ':'"), "{err}");
}

proptest! {
    /// Any message frame: the hand-written encoder equals serde's, and decoding gives it back.
    #[test]
    fn message_encoding_matches_serde(
        seq in any::<u64>(), stream in any::<u64>(), ts in any::<u64>(),
        channel in "[A-Za-z0-9_.-]{1,64}", request_id in "[A-Za-z0-9_.:-]{1,128}",
        message_id in "[A-Za-z0-9_.:-]{1,128}", text in "\\PC{0,20}", n in any::<i64>(),
    ) {
        let data = serde_json::to_string(&serde_json::json!({"text": text, "n": n})).unwrap();
        let frame = MessageFrame {
            sequence_number: seq,
            stream_sequence: stream,
            channel: Channel::new(channel).unwrap(),
            request_id: RequestId::new(request_id).unwrap(),
            message_id: MessageId::new(message_id).unwrap(),
            timestamp: ts,
            data: raw(&data),
        };
        let encoded = encode_message(&frame);
        prop_assert_eq!(&encoded, &serde_json::to_string(&frame).unwrap());
        prop_assert_eq!(decode_server_frame(&encoded).unwrap(), ServerFrame::Message(frame));
    }

    /// Arbitrary text never panics the client decoder.
    #[test]
    fn client_decoder_total(text in "\\PC{0,64}") {
        let _ = decode_client_frame(&text);
    }
}

#[test]
fn auth_and_auth_ok_round_trip() {
    use seqcast_protocol::{Auth, AuthOk, ServerFrame, decode_server_frame, encode_server_frame};
    assert_eq!(
        decode_client_frame(r#"{"type":"auth","token":"abc.def.ghi"}"#).unwrap(),
        ClientFrame::Auth(Auth {
            token: "abc.def.ghi".into()
        })
    );
    let err = decode_client_frame(r#"{"type":"auth"}"#).unwrap_err();
    assert!(err.to_string().contains("token"), "{err}");
    let err = decode_client_frame(r#"{"type":"auth","token":7}"#).unwrap_err();
    assert!(err.to_string().contains("token"), "{err}");
    let ok = ServerFrame::AuthOk(AuthOk { exp: 1_900_000_000 });
    let text = encode_server_frame(&ok);
    assert_eq!(text, r#"{"type":"auth_ok","exp":1900000000}"#);
    assert_eq!(decode_server_frame(&text).unwrap(), ok);
}
