//! The per-key resume and dedupe rules, without I/O: what to send in `subscribe`, and what a
//! `sub_ack` or `message` means for the application. The connection task drives it.

use std::time::Duration;

use seqcast_protocol::{
    ErrorDetail, MessageFrame, ResumeAck, ResumeResult, SubAck, SubscriptionKey,
};

use crate::event::{Event, Gap, GapReason, Subscribed};

/// A position to resume a key from, e.g. one kept from an earlier run of the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The last sequence number already seen for the key.
    pub since: u64,
    /// The epoch `since` belongs to, if known.
    pub epoch: Option<String>,
}

/// One followed key.
#[derive(Debug, Clone)]
pub(crate) struct KeyTracker {
    key: SubscriptionKey,
    /// The last sequence number yielded to the application.
    last_yielded: Option<u64>,
    /// `since` for the next `subscribe`: everything up to it was yielded or is known not to
    /// exist for this key. `None` before the first `sub_ack` of a fresh subscription.
    resume_from: Option<u64>,
    /// The epoch of `resume_from`.
    epoch: Option<String>,
    /// A `sub_ack` arrived on the current connection.
    acked: bool,
    /// Backlog frames still expected after a fresh `sub_ack`.
    catch_up: u64,
    /// The current connection's `sub_ack.head`.
    ack_head: u64,
    /// Duplicates dropped so far.
    duplicates: u64,
}

impl KeyTracker {
    pub(crate) fn new(key: SubscriptionKey, resume: Option<Resume>) -> Self {
        let (resume_from, epoch) = match resume {
            Some(r) => (Some(r.since), r.epoch),
            None => (None, None),
        };
        KeyTracker {
            key,
            last_yielded: resume_from,
            resume_from,
            epoch,
            acked: false,
            catch_up: 0,
            ack_head: 0,
            duplicates: 0,
        }
    }

    /// `since` and `epoch` for the `subscribe` frame sent on a new connection.
    pub(crate) fn subscribe_position(&self) -> (Option<u64>, Option<String>) {
        match self.resume_from {
            Some(since) => (Some(since), self.epoch.clone()),
            None => (None, None),
        }
    }

    /// The connection is gone: frames of the next connection count only after its `sub_ack`.
    pub(crate) fn on_disconnect(&mut self) {
        self.acked = false;
        self.catch_up = 0;
    }

    /// The server acknowledged the `subscribe` sent on this connection.
    pub(crate) fn on_sub_ack(&mut self, ack: &SubAck, connection_sequence: u64) -> Vec<Event> {
        let since = self.resume_from;
        let previous_epoch = self.epoch.clone();
        let epoch_changed = previous_epoch.as_ref().is_some_and(|e| *e != ack.epoch);
        self.acked = true;
        self.ack_head = ack.head;
        self.epoch = Some(ack.epoch.clone());
        if epoch_changed {
            // Another store numbers from 1 again: positions from the old one mean nothing here.
            self.last_yielded = None;
            self.resume_from = None;
        }
        if self.resume_from.is_none() {
            // A fresh subscription: its backlog (`drained` frames) comes first; until all of it
            // is in, a resume must start from what was really yielded.
            self.catch_up = ack.drained;
            let yielded = self.last_yielded.unwrap_or(0);
            self.resume_from = Some(if self.catch_up == 0 {
                yielded.max(ack.head)
            } else {
                yielded
            });
        }
        let mut events = vec![Event::Subscribed(Subscribed {
            key: self.key.clone(),
            connection_sequence,
            since,
            drained: ack.drained,
            head: ack.head,
            epoch: ack.epoch.clone(),
            recovered: ack.recovered,
            expired: ack.expired,
            overflow: ack.overflow,
        })];
        if epoch_changed || ack.recovered == Some(false) {
            if !epoch_changed
                && let (Some(oldest), Some(resume)) = (ack.oldest_sequence, self.resume_from)
            {
                // The loss is reported once; the next resume starts where history starts.
                self.resume_from = Some(resume.max(oldest.saturating_sub(1)));
            }
            events.push(Event::Gap(Gap {
                key: self.key.clone(),
                since,
                oldest_sequence: ack.oldest_sequence,
                epoch: ack.epoch.clone(),
                previous_epoch,
                reason: if epoch_changed {
                    GapReason::EpochChanged
                } else {
                    GapReason::Window
                },
            }));
        }
        events
    }

    /// A `message` frame of this key: `Some` if the application should see it.
    pub(crate) fn on_message(&mut self, m: MessageFrame) -> Option<Event> {
        if !self.acked {
            // Sent before this connection's `sub_ack`: it belongs to an earlier subscription.
            return None;
        }
        let seq = m.sequence_number;
        if self.catch_up > 0 {
            self.catch_up -= 1;
            if self.catch_up == 0 {
                // The whole backlog is in: the key is caught up with the `sub_ack` seam.
                self.resume_from = Some(self.resume_from.unwrap_or(0).max(self.ack_head));
            }
        }
        if self.last_yielded.is_some_and(|last| seq <= last) {
            self.duplicates += 1;
            return None;
        }
        self.last_yielded = Some(seq);
        self.resume_from = Some(self.resume_from.unwrap_or(0).max(seq));
        Some(Event::Message(m.into()))
    }

    /// The last sequence number yielded to the application.
    #[cfg(test)]
    pub(crate) fn last_yielded(&self) -> Option<u64> {
        self.last_yielded
    }

    /// Frames dropped because their number was not above the last one yielded.
    #[cfg(test)]
    pub(crate) fn duplicates(&self) -> u64 {
        self.duplicates
    }
}

/// One key's verdict in a `resume_ack`, as the `sub_ack` a `subscribe` with the same `since`
/// would have brought (with its backlog count when the key starts over in another epoch), or
/// the refusal.
pub(crate) fn resume_verdict(
    key: &SubscriptionKey,
    result: &ResumeResult,
    ack: &ResumeAck,
) -> Result<SubAck, ErrorDetail> {
    match result {
        ResumeResult::Refused { error, .. } => Err(error.clone()),
        ResumeResult::Resumed {
            recovered,
            oldest_sequence,
            drained,
            ..
        } => Ok(SubAck {
            channel: key.channel().clone(),
            request_id: key.request_id().clone(),
            subscription_key: key.clone(),
            drained: *drained,
            head: ack.head,
            recovered: Some(*recovered),
            oldest_sequence: *oldest_sequence,
            expired: 0,
            overflow: 0,
            epoch: ack.epoch.clone(),
        }),
    }
}

/// The delay before reconnect attempt `attempt` (0 = first retry): capped exponential backoff
/// with full jitter, `unit` × min(max, initial · 2^attempt) with `unit` uniform in [0, 1).
/// Full jitter spreads a crowd of clients that lost the same server over the whole interval.
pub(crate) fn backoff_delay(attempt: u32, initial: Duration, max: Duration, unit: f64) -> Duration {
    let factor = 2u32.saturating_pow(attempt.min(31));
    let cap = initial.saturating_mul(factor).min(max);
    cap.mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use seqcast_protocol::{Channel, MessageId, RawValue, RequestId};

    fn key() -> SubscriptionKey {
        SubscriptionKey::new(Channel::new("c").unwrap(), RequestId::new("r").unwrap())
    }

    fn ack(drained: u64, head: u64, epoch: &str, recovered: Option<bool>) -> SubAck {
        SubAck {
            channel: Channel::new("c").unwrap(),
            request_id: RequestId::new("r").unwrap(),
            subscription_key: key(),
            drained,
            head,
            recovered,
            oldest_sequence: recovered.and_then(|r| (!r).then_some(40)),
            expired: 0,
            overflow: 0,
            epoch: epoch.to_owned(),
        }
    }

    fn msg(seq: u64) -> MessageFrame {
        MessageFrame {
            sequence_number: seq,
            stream_sequence: seq,
            channel: Channel::new("c").unwrap(),
            request_id: RequestId::new("r").unwrap(),
            message_id: MessageId::new(format!("m{seq}")).unwrap(),
            timestamp: 0,
            data: RawValue::from_string("1".to_owned()).unwrap(),
        }
    }

    fn yielded(t: &mut KeyTracker, seqs: &[u64]) -> Vec<u64> {
        seqs.iter()
            .filter_map(|&s| match t.on_message(msg(s)) {
                Some(Event::Message(m)) => Some(m.sequence_number),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_fresh_key_resumes_from_the_ack_head_when_it_has_no_backlog() {
        let mut t = KeyTracker::new(key(), None);
        assert_eq!(t.subscribe_position(), (None, None));
        t.on_sub_ack(&ack(0, 7, "e1", None), 1);
        assert_eq!(t.subscribe_position(), (Some(7), Some("e1".into())));
    }

    #[test]
    fn a_fresh_key_resumes_from_what_was_yielded_until_its_backlog_is_in() {
        let mut t = KeyTracker::new(key(), None);
        t.on_sub_ack(&ack(2, 10, "e1", None), 1);
        assert_eq!(t.subscribe_position().0, Some(0));
        assert_eq!(yielded(&mut t, &[3]), vec![3]);
        assert_eq!(t.subscribe_position().0, Some(3));
        assert_eq!(yielded(&mut t, &[5]), vec![5]);
        assert_eq!(
            t.subscribe_position().0,
            Some(10),
            "caught up with the seam"
        );
    }

    #[test]
    fn nothing_at_or_below_the_last_yielded_number_is_yielded_again() {
        let mut t = KeyTracker::new(key(), None);
        t.on_sub_ack(&ack(0, 0, "e1", None), 1);
        assert_eq!(yielded(&mut t, &[1, 2, 2, 1, 3]), vec![1, 2, 3]);
        t.on_disconnect();
        assert_eq!(t.subscribe_position().0, Some(3));
        t.on_sub_ack(&ack(0, 5, "e1", Some(true)), 2);
        assert_eq!(yielded(&mut t, &[2, 3, 4, 5]), vec![4, 5]);
        assert_eq!(t.duplicates(), 4);
        assert_eq!(t.last_yielded(), Some(5));
    }

    #[test]
    fn frames_before_the_sub_ack_of_this_connection_are_dropped() {
        let mut t = KeyTracker::new(key(), None);
        assert!(yielded(&mut t, &[1]).is_empty());
        t.on_sub_ack(&ack(0, 0, "e1", None), 1);
        t.on_disconnect();
        assert!(yielded(&mut t, &[2]).is_empty());
    }

    #[test]
    fn recovered_false_is_a_window_gap_reported_once() {
        let mut t = KeyTracker::new(key(), None);
        t.on_sub_ack(&ack(0, 3, "e1", None), 1);
        t.on_disconnect();
        let events = t.on_sub_ack(&ack(0, 60, "e1", Some(false)), 2);
        let Some(Event::Gap(gap)) = events.get(1) else {
            panic!("no gap in {events:?}")
        };
        assert_eq!(gap.since, Some(3));
        assert_eq!(gap.oldest_sequence, Some(40));
        assert_eq!(gap.reason, GapReason::Window);
        assert_eq!(
            t.subscribe_position().0,
            Some(39),
            "the next resume starts where history starts"
        );
    }

    #[test]
    fn another_epoch_starts_the_key_over() {
        let mut t = KeyTracker::new(key(), None);
        t.on_sub_ack(&ack(0, 0, "e1", None), 1);
        assert_eq!(yielded(&mut t, &[50]), vec![50]);
        t.on_disconnect();
        let events = t.on_sub_ack(&ack(1, 2, "e2", Some(false)), 2);
        assert!(matches!(
            events.get(1),
            Some(Event::Gap(Gap { reason: GapReason::EpochChanged, previous_epoch: Some(e), .. })) if e == "e1"
        ));
        assert_eq!(yielded(&mut t, &[1, 2]), vec![1, 2], "numbers restarted");
        assert_eq!(t.subscribe_position(), (Some(2), Some("e2".into())));
    }

    #[test]
    fn a_given_resume_position_is_sent_and_deduplicated_against() {
        let mut t = KeyTracker::new(
            key(),
            Some(Resume {
                since: 4,
                epoch: Some("e1".into()),
            }),
        );
        assert_eq!(t.subscribe_position(), (Some(4), Some("e1".into())));
        t.on_sub_ack(&ack(0, 9, "e1", Some(true)), 1);
        assert_eq!(yielded(&mut t, &[4, 5]), vec![5]);
    }

    #[test]
    fn a_resume_verdict_acts_as_the_sub_ack_of_a_subscribe_with_since() {
        let answer = ResumeAck {
            results: vec![
                ResumeResult::Resumed {
                    subscription_key: key(),
                    recovered: false,
                    oldest_sequence: Some(40),
                    already_subscribed: false,
                    drained: 0,
                },
                ResumeResult::Refused {
                    subscription_key: Some(key()),
                    error: ErrorDetail {
                        code: seqcast_protocol::ErrorCode::Forbidden,
                        message: "no".into(),
                    },
                },
            ],
            head: 60,
            epoch: "e1".into(),
        };
        let mut t = KeyTracker::new(key(), None);
        t.on_sub_ack(&ack(0, 3, "e1", None), 1);
        t.on_disconnect();
        let sub_ack = resume_verdict(&key(), &answer.results[0], &answer).unwrap();
        let events = t.on_sub_ack(&sub_ack, 2);
        assert!(
            matches!(events.get(1), Some(Event::Gap(g)) if g.since == Some(3) && g.oldest_sequence == Some(40)),
            "{events:?}"
        );
        assert_eq!(yielded(&mut t, &[41]), vec![41]);
        let refused = resume_verdict(&key(), &answer.results[1], &answer).unwrap_err();
        assert_eq!(refused.code, seqcast_protocol::ErrorCode::Forbidden);
    }

    #[test]
    fn a_resume_verdict_of_another_epoch_keeps_the_position_until_its_backlog_is_in() {
        let answer = ResumeAck {
            results: vec![ResumeResult::Resumed {
                subscription_key: key(),
                recovered: false,
                oldest_sequence: Some(1),
                already_subscribed: false,
                drained: 3,
            }],
            head: 9,
            epoch: "e2".into(),
        };
        let mut t = KeyTracker::new(key(), None);
        t.on_sub_ack(&ack(0, 50, "e1", None), 1);
        t.on_disconnect();
        let sub_ack = resume_verdict(&key(), &answer.results[0], &answer).unwrap();
        t.on_sub_ack(&sub_ack, 2);
        assert_eq!(yielded(&mut t, &[2, 5]), vec![2, 5]);
        t.on_disconnect();
        assert_eq!(
            t.subscribe_position(),
            (Some(5), Some("e2".into())),
            "cut in the middle of the backlog: resume after what was received"
        );
        let mut t = KeyTracker::new(key(), None);
        t.on_sub_ack(&ack(0, 50, "e1", None), 1);
        t.on_disconnect();
        t.on_sub_ack(&sub_ack, 2);
        assert_eq!(yielded(&mut t, &[2, 5, 7]), vec![2, 5, 7]);
        assert_eq!(
            t.subscribe_position(),
            (Some(9), Some("e2".into())),
            "the whole backlog is in: caught up with the ack's head"
        );
    }

    #[test]
    fn backoff_draws_are_uniform_below_a_cap_that_doubles_up_to_the_maximum() {
        use rand::{Rng as _, SeedableRng as _};
        let mut random = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(3));
        for attempt in 0..12u32 {
            let cap = (initial * 2u32.pow(attempt)).min(max);
            let mut quarters = [0u32; 4];
            for _ in 0..4000 {
                let d = backoff_delay(attempt, initial, max, random.random::<f64>());
                assert!(d < cap, "attempt {attempt}: {d:?} not below {cap:?}");
                let q = (d.as_secs_f64() / cap.as_secs_f64() * 4.0) as usize;
                quarters[q.min(3)] += 1;
            }
            // Full jitter: every quarter of [0, cap) gets about a quarter of the draws.
            assert!(
                quarters.iter().all(|&n| (850..=1150).contains(&n)),
                "attempt {attempt}: {quarters:?}"
            );
        }
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff_delay(0, i, m, 0.5), Duration::from_millis(50));
        assert_eq!(backoff_delay(2, i, m, 0.999_999).as_millis(), 399);
        assert_eq!(backoff_delay(30, i, m, 0.5), Duration::from_millis(500));
        assert_eq!(backoff_delay(u32::MAX, i, m, 0.0), Duration::ZERO);
    }
}
