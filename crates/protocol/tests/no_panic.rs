//! Whatever a client sends, decoding answers `Ok` or a `bad_request` error — it never panics.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use seqcast_protocol::{
    ErrorCode, decode_batch, decode_client_frame, decode_publish, parse_u64_param,
};

/// JSON-shaped text built from frame-like pieces, so that the decoder's deeper paths are reached.
fn frameish() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("type"),
        Just("channel"),
        Just("request_id"),
        Just("since"),
        Just("epoch"),
        Just("token"),
        Just("session_id"),
        Just("connection_sequence"),
        Just("data"),
        Just("message_id"),
    ];
    let value = prop_oneof![
        Just("\"hello\"".to_string()),
        Just("\"subscribe\"".to_string()),
        Just("\"unsubscribe\"".to_string()),
        Just("\"ping\"".to_string()),
        Just("null".to_string()),
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just("18446744073709551616".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        "[a-z:.\\-_ ]{0,70}".prop_map(|s| format!("\"{s}\"")),
        any::<u64>().prop_map(|n| n.to_string()),
    ];
    prop::collection::vec((key, value), 0..6).prop_map(|fields| {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn client_frames_never_panic(text in prop_oneof![frameish(), any::<String>()]) {
        if let Err(e) = decode_client_frame(&text) {
            prop_assert_eq!(e.code(), ErrorCode::BadRequest);
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn publish_bodies_never_panic(text in prop_oneof![frameish(), any::<String>()], bytes in any::<Vec<u8>>()) {
        for body in [text.as_bytes(), &bytes[..]] {
            if let Err(e) = decode_publish(body) {
                prop_assert_eq!(e.code(), ErrorCode::BadRequest);
            }
            if let Err(e) = decode_batch(body) {
                prop_assert_eq!(e.code(), ErrorCode::BadRequest);
            }
        }
    }

    #[test]
    fn sequence_params_parse_exactly_the_u64_digits(value in prop_oneof![any::<String>(), "[0-9]{1,22}", "[-+ ]?[0-9]{1,5}[a-z.]?"]) {
        let parsed = parse_u64_param("since", &value);
        let expected = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) { value.parse::<u64>().ok() } else { None };
        prop_assert_eq!(parsed.ok(), expected);
    }
}
