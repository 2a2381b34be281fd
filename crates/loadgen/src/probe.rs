//! The probe a benchmark message carries in its `data` — `{"i":INDEX,"t":NANOS}` — and a scan
//! that finds it in a `message` frame without a JSON parser (the receiver sees up to a million
//! frames a second on one core).

/// The `data` of probe message `index`, sent at `nanos` since the run's start.
pub fn probe_data(index: u64, nanos: u64) -> String {
    format!(r#"{{"i":{index},"t":{nanos}}}"#)
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
