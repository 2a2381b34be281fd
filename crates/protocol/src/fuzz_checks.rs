//! What the fuzz targets (`fuzz/`, libFuzzer) check, as plain functions, so the crash inputs
//! kept in `fuzz/regressions/` run as ordinary tests on stable (`tests/fuzz_regressions.rs`).
//! Each function takes arbitrary bytes; it must not panic, and it asserts the decoder's
//! invariants on what it accepts.

use crate::{
    Channel, ClientFrame, DEFAULT_PAGE, MAX_PAGE, RecoverParams, RequestId, StreamParams,
    SubscriptionKey, decode_batch, decode_client_frame, decode_publish, decode_query, page_limit,
    parse_u64_param,
};

/// A client WebSocket frame (text; non-UTF-8 bytes are what the server closes with 1007 before
/// decoding). An accepted frame's names are valid by their grammar.
pub fn client_frame(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match decode_client_frame(text) {
        Ok(ClientFrame::Subscribe(sub)) => {
            assert!(Channel::new(sub.channel.as_str()).is_ok());
            assert!(RequestId::new(sub.request_id.as_str()).is_ok());
        }
        // Every entry is kept, valid or not; a valid one's names are valid.
        Ok(ClientFrame::Resume(resume)) => {
            for key in resume.subscriptions.iter().filter_map(|e| e.key()) {
                assert!(SubscriptionKey::parse(&key.to_string()).is_ok());
            }
        }
        _ => {}
    }
}

/// The query string of the recovery and stream-page endpoints, and the path segments of
/// `/api/streams/{channel}/{request_id}/messages`. Accepted numbers round-trip; `limit` stays
/// within its bounds.
pub fn http_query(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // The types and decoder the server's handlers use.
    if let Ok(q) = decode_query::<RecoverParams>(&text) {
        if let Some(n) = q.since {
            assert_eq!(parse_u64_param("since", &n.to_string()), Ok(n));
        }
        check_limit(q.limit);
        if let Some(c) = q.channel.as_deref().and_then(|c| Channel::new(c).ok()) {
            assert!(!c.as_str().contains(':'));
        }
        let _ = q.request_id.map(RequestId::new);
    }
    if let Ok(q) = decode_query::<StreamParams>(&text) {
        if let Some(n) = q.after {
            assert_eq!(parse_u64_param("after", &n.to_string()), Ok(n));
        }
        check_limit(q.limit);
    }
    let mut segments = text.splitn(3, '/');
    if let (Some(channel), Some(request_id)) = (segments.next(), segments.next()) {
        let _ = Channel::new(channel);
        let _ = RequestId::new(request_id);
    }
}

/// An accepted `limit` is within `1..=MAX_PAGE`, and absent means the default.
fn check_limit(limit: Option<u64>) {
    match page_limit(limit) {
        Ok(n) => {
            assert!((1..=MAX_PAGE as usize).contains(&n));
            if limit.is_none() {
                assert_eq!(n, DEFAULT_PAGE as usize);
            }
        }
        Err(e) => {
            assert_eq!(e.param, "limit");
            assert!(limit.is_some_and(|l| l == 0 || l > MAX_PAGE));
        }
    }
}

/// `POST /api/publish` and `/api/publish/batch` bodies. An accepted publish re-encodes to a
/// body that decodes to the same request.
pub fn publish_body(data: &[u8]) {
    if let Ok(req) = decode_publish(data) {
        let again = serde_json::to_vec(&req).expect("a decoded publish encodes");
        assert_eq!(decode_publish(&again).ok(), Some(req));
    }
    if let Ok(batch) = decode_batch(data) {
        assert!(!batch.messages.is_empty());
    }
}
