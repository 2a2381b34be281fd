//! `resume` and `resume_ack`: one entry's fault never fails the frame, verdicts round-trip.
#![allow(clippy::unwrap_used)]

use seqcast_protocol::{
    ClientFrame, ErrorCode, ErrorDetail, FrameError, Resume, ResumeAck, ResumeEntry, ResumeResult,
    ServerFrame, SubscriptionKey, decode_client_frame, decode_server_frame, encode_server_frame,
};

fn key(s: &str) -> SubscriptionKey {
    SubscriptionKey::parse(s).unwrap()
}

fn resume(text: &str) -> Resume {
    match decode_client_frame(text).unwrap() {
        ClientFrame::Resume(r) => r,
        other => panic!("not a resume: {other:?}"),
    }
}

#[test]
fn decodes_valid_entries_and_keeps_bad_ones_as_refusals() {
    let r = resume(
        r#"{"type":"resume","epoch":"e1","subscriptions":[
            {"channel":"a","request_id":"r:1","since":5},
            {"channel":"a:b","request_id":"r","since":1},
            {"channel":"b","request_id":"r","since":-3},
            {"channel":"c","request_id":"r"},
            7,
            {"channel":"d","request_id":"r","since":0,"extra":true}
        ]}"#,
    );
    assert_eq!(r.epoch.as_deref(), Some("e1"));
    assert_eq!(r.subscriptions.len(), 6, "one entry per key asked");
    let ResumeEntry::Key(first) = &r.subscriptions[0] else {
        panic!("{:?}", r.subscriptions[0])
    };
    assert_eq!((first.key(), first.since), (key("a:r:1"), 5));
    // A bad channel: no key, the name error.
    let ResumeEntry::Invalid(bad_name) = &r.subscriptions[1] else {
        panic!()
    };
    assert_eq!(bad_name.key, None);
    assert!(matches!(bad_name.error, FrameError::BadName(_)));
    // A bad or missing since: the key is known, so its verdict can name it.
    for (i, k, text) in [
        (
            2,
            "b:r",
            "invalid resume frame: field \"since\" must be a non-negative integer, got -3",
        ),
        (3, "c:r", "invalid resume frame: missing field \"since\""),
    ] {
        let ResumeEntry::Invalid(e) = &r.subscriptions[i] else {
            panic!("{i}")
        };
        assert_eq!(e.key, Some(key(k)));
        assert_eq!(e.error.to_string(), text);
    }
    let ResumeEntry::Invalid(not_object) = &r.subscriptions[4] else {
        panic!()
    };
    assert_eq!(
        not_object.error.to_string(),
        "invalid resume frame: subscriptions[4] must be an object, got a number"
    );
    assert_eq!(r.subscriptions[5].key(), Some(key("d:r")));
}

#[test]
fn a_frame_without_a_list_is_refused_whole() {
    for (text, want) in [
        (
            r#"{"type":"resume"}"#,
            "invalid resume frame: missing field \"subscriptions\"",
        ),
        (
            r#"{"type":"resume","subscriptions":{"a":1}}"#,
            "invalid resume frame: field \"subscriptions\" must be an array, got an object",
        ),
        (
            r#"{"type":"resume","subscriptions":[],"epoch":3}"#,
            "invalid resume frame: field \"epoch\" must be a string, got a number",
        ),
    ] {
        assert_eq!(decode_client_frame(text).unwrap_err().to_string(), want);
    }
    assert!(
        resume(r#"{"type":"resume","subscriptions":[]}"#)
            .subscriptions
            .is_empty()
    );
}

#[test]
fn resume_encodes_and_decodes_back_bad_entries_included() {
    let text = r#"{"type":"resume","subscriptions":[{"channel":"a","request_id":"r","since":1},{"channel":"a:b","request_id":"r","since":1}],"epoch":"e"}"#;
    let frame = decode_client_frame(text).unwrap();
    assert_eq!(serde_json::to_string(&frame).unwrap(), text);
    assert_eq!(serde_json::from_str::<ClientFrame>(text).unwrap(), frame);
}

#[test]
fn resume_ack_round_trips_every_verdict() {
    let ack = ServerFrame::ResumeAck(ResumeAck {
        results: vec![
            ResumeResult::Resumed {
                subscription_key: key("a:r"),
                recovered: true,
                oldest_sequence: None,
                already_subscribed: false,
                drained: 0,
            },
            ResumeResult::Resumed {
                subscription_key: key("b:r"),
                recovered: false,
                oldest_sequence: Some(17),
                already_subscribed: false,
                drained: 3,
            },
            ResumeResult::Resumed {
                subscription_key: key("c:r"),
                recovered: true,
                oldest_sequence: None,
                already_subscribed: true,
                drained: 0,
            },
            ResumeResult::Refused {
                subscription_key: Some(key("d:r")),
                error: ErrorDetail {
                    code: ErrorCode::Forbidden,
                    message: "token may not read d:r".into(),
                },
            },
            ResumeResult::Refused {
                subscription_key: None,
                error: ErrorDetail {
                    code: ErrorCode::BadRequest,
                    message: "bad".into(),
                },
            },
        ],
        head: 40,
        epoch: "e".into(),
    });
    let text = encode_server_frame(&ack);
    assert_eq!(
        text,
        concat!(
            r#"{"type":"resume_ack","results":["#,
            r#"{"subscription_key":"a:r","recovered":true},"#,
            r#"{"subscription_key":"b:r","recovered":false,"oldest_sequence":17,"drained":3},"#,
            r#"{"subscription_key":"c:r","recovered":true,"already_subscribed":true},"#,
            r#"{"subscription_key":"d:r","error":{"code":"forbidden","message":"token may not read d:r"}},"#,
            r#"{"error":{"code":"bad_request","message":"bad"}}"#,
            r#"],"head":40,"epoch":"e"}"#
        )
    );
    assert_eq!(decode_server_frame(&text).unwrap(), ack);
    let ServerFrame::ResumeAck(a) = ack else {
        panic!()
    };
    assert_eq!(a.results[3].subscription_key(), Some(&key("d:r")));
    assert_eq!(a.results[4].subscription_key(), None);
}

#[test]
fn unknown_server_types_list_resume_ack() {
    let err = decode_server_frame(r#"{"type":"nope"}"#).unwrap_err();
    assert!(
        err.to_string().ends_with("publish_ack or resume_ack"),
        "{err}"
    );
}

#[test]
fn a_resume_ack_without_drained_decodes_as_no_backlog() {
    let text = r#"{"type":"resume_ack","results":[{"subscription_key":"b:r","recovered":false,"oldest_sequence":17}],"head":40,"epoch":"e"}"#;
    let ServerFrame::ResumeAck(ack) = decode_server_frame(text).unwrap() else {
        panic!("not a resume_ack")
    };
    assert!(
        matches!(
            ack.results[0],
            ResumeResult::Resumed {
                drained: 0,
                recovered: false,
                ..
            }
        ),
        "{ack:?}"
    );
    assert_eq!(encode_server_frame(&ServerFrame::ResumeAck(ack)), text);
}
