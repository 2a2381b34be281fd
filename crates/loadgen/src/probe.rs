//! The probe a benchmark message carries in its `data` — `{"i":INDEX,"t":NANOS}` — and a scan
//! that finds it in a `message` frame without a JSON parser (the receiver sees up to a million
//! frames a second on one core).

/// The `data` of probe message `index`, sent at `nanos` since the run's start.
pub fn probe_data(index: u64, nanos: u64) -> String {
    format!(r#"{{"i":{index},"t":{nanos}}}"#)
}

/// [`probe_data`] with a string of `pad` bytes after the probe (`"p":"xx…"`), to make frames
/// as large as a scenario needs; [`scan_probe`] still finds the probe.
pub fn probe_data_padded(index: u64, nanos: u64, pad: usize) -> String {
    if pad == 0 {
        return probe_data(index, nanos);
    }
    format!(r#"{{"i":{index},"t":{nanos},"p":"{}"}}"#, "x".repeat(pad))
}

/// `(index, nanos)` of the probe in a `message` frame, or None for any other frame.
/// `data` is the frame's last field, so the probe is at the end.
pub fn scan_probe(frame: &str) -> Option<(u64, u64)> {
    if !frame.starts_with(r#"{"type":"message""#) {
        return None;
    }
    let at = frame.rfind(r#""data":{"i":"#)?;
    let rest = &frame[at + r#""data":{"i":"#.len()..];
    let (index, rest) = leading_u64(rest)?;
    let rest = rest.strip_prefix(r#","t":"#)?;
    let (nanos, _) = leading_u64(rest)?;
    Some((index, nanos))
}

/// The `sequence_number` of a `message` frame (the field right after `type`).
pub fn scan_sequence(frame: &str) -> Option<u64> {
    let rest = frame.strip_prefix(r#"{"type":"message","sequence_number":"#)?;
    leading_u64(rest).map(|(n, _)| n)
}

/// `(sequence_number, stream_sequence)` of a `message` frame, None for any other frame. The
/// fields are scanned where the server puts them (right after `type`); a frame laid out
/// otherwise is parsed as JSON.
pub fn scan_numbers(frame: &str) -> Option<(u64, u64)> {
    if !frame.starts_with(r#"{"type":"message""#) {
        return None;
    }
    let fast = frame
        .strip_prefix(r#"{"type":"message","sequence_number":"#)
        .and_then(leading_u64)
        .and_then(|(seq, rest)| {
            let rest = rest.strip_prefix(r#","stream_sequence":"#)?;
            leading_u64(rest).map(|(stream, _)| (seq, stream))
        });
    fast.or_else(|| {
        let v: serde_json::Value = serde_json::from_str(frame).ok()?;
        Some((
            v["sequence_number"].as_u64()?,
            v["stream_sequence"].as_u64()?,
        ))
    })
}

fn leading_u64(s: &str) -> Option<(u64, &str)> {
    let end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    Some((s[..end].parse().ok()?, &s[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: &str = r#"{"type":"message","sequence_number":42,"stream_sequence":7,"channel":"bench","request_id":"r1","message_id":"m","timestamp":1,"data":{"i":12,"t":3456789}}"#;

    #[test]
    fn finds_the_probe_at_the_end_of_a_message_frame() {
        assert_eq!(scan_probe(FRAME), Some((12, 3_456_789)));
        assert_eq!(scan_sequence(FRAME), Some(42));
    }

    #[test]
    fn finds_both_numbers_in_any_field_order() {
        assert_eq!(scan_numbers(FRAME), Some((42, 7)));
        let reordered =
            r#"{"type":"message","channel":"c","stream_sequence":3,"sequence_number":9,"data":{}}"#;
        assert_eq!(scan_numbers(reordered), Some((9, 3)));
        assert_eq!(scan_numbers(r#"{"type":"sub_ack","head":1}"#), None);
    }

    #[test]
    fn padded_probes_are_still_found() {
        let frame = FRAME.replace(r#"{"i":12,"t":3456789}"#, &probe_data_padded(12, 5, 100));
        assert_eq!(scan_probe(&frame), Some((12, 5)));
        assert!(frame.len() > FRAME.len() + 100);
    }

    #[test]
    fn ignores_other_frames_and_other_data() {
        assert_eq!(scan_probe(r#"{"type":"sub_ack","channel":"bench"}"#), None);
        assert_eq!(
            scan_probe(&FRAME.replace(r#"{"i":12,"t":3456789}"#, r#"{"x":1}"#)),
            None
        );
        assert_eq!(
            scan_probe(&FRAME.replace(r#""t":3456789"#, r#""t":"x""#)),
            None
        );
        assert_eq!(scan_sequence(r#"{"type":"pong"}"#), None);
    }

    #[test]
    fn probe_data_round_trips_through_a_real_frame() {
        let frame = format!(
            r#"{{"type":"message","sequence_number":1,"stream_sequence":1,"channel":"c","request_id":"r","message_id":"m","timestamp":5,"data":{}}}"#,
            probe_data(u64::MAX, 0)
        );
        assert_eq!(scan_probe(&frame), Some((u64::MAX, 0)));
    }
}
