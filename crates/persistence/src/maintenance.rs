//! What the `seqcast db` tools report, the same for both databases, and the one renumbering
//! rule both backends' `repair-sequences` follow.

/// One migration that a migration (`seqcast db migrate`: [`crate::migrate`], [`crate::pg_migrate`]) applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    /// Its version number (1, 2, …).
    pub version: u32,
    /// Its short name, e.g. `"initial"`.
    pub name: &'static str,
}

/// What a migration ([`crate::migrate`], [`crate::pg_migrate`]) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The migrations applied by this call, in order; empty when the schema was current.
    pub applied: Vec<AppliedMigration>,
    /// The schema version after the call.
    pub schema_version: u32,
}

/// What a repair ([`crate::repair_sequences`], [`crate::pg_repair_sequences`]) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairReport {
    /// Streams (subscription keys) in the database.
    pub streams: usize,
    /// Rows whose `stream_sequence` changed; 0 for a healthy database.
    pub rows_renumbered: usize,
}

/// The rule both backends' repairs follow, fed one stream's rows at a time in creation order
/// (`first_sequence`, the event that created the row).
///
/// A healthy stream's positions rise in creation order — with gaps where retention removed rows,
/// and a surviving (upserted) row may sit below the stream's `pruned_position` — so a row keeps
/// its position while it is above its predecessor's. A row at or below it (the damage: seed
/// 004's 82 rows at position 0) gets one past the larger of its predecessor's position and the
/// stream's `pruned_position`: never a position a client paging the stream (`after=S`) may
/// already have passed. Positions therefore only ever rise, and a healthy stream is untouched.
#[derive(Debug, Default)]
pub(crate) struct Renumbering {
    stream: Option<i64>,
    previous: i64,
}

impl Renumbering {
    /// The next row in `(stream, first_sequence)` order: its new position, if it must change.
    pub(crate) fn next(&mut self, stream: i64, position: i64, pruned_position: i64) -> Option<i64> {
        if self.stream != Some(stream) {
            self.stream = Some(stream);
            self.previous = 0;
        }
        if position > self.previous {
            self.previous = position;
            return None;
        }
        self.previous = self.previous.max(pruned_position) + 1;
        Some(self.previous)
    }
}

#[cfg(test)]
mod tests {
    use super::Renumbering;

    /// One stream's positions in creation order → what the repair makes of them.
    fn repaired(positions: &[i64], pruned_position: i64) -> Vec<i64> {
        let mut r = Renumbering::default();
        positions
            .iter()
            .map(|&p| r.next(1, p, pruned_position).unwrap_or(p))
            .collect()
    }

    #[test]
    fn renumbering_keeps_what_is_in_order_and_never_goes_back() {
        let cases: &[(&[i64], i64, &[i64])] = &[
            // Healthy: untouched, gaps and all.
            (&[1, 2, 3], 0, &[1, 2, 3]),
            (&[3, 17, 18, 19, 20], 16, &[3, 17, 18, 19, 20]),
            (&[11, 12, 13], 0, &[11, 12, 13]),
            // Seed 004: four good rows, the rest at 0.
            (&[1, 2, 3, 4, 0, 0, 0], 0, &[1, 2, 3, 4, 5, 6, 7]),
            // Damaged after pruning: moved rows go above pruned_position.
            (&[3, 1, 1, 2, 0], 16, &[3, 17, 18, 19, 20]),
            (&[0, 0], 5, &[6, 7]),
            // Out of order: a moved row only ever rises.
            (&[9, 8, 7], 0, &[9, 10, 11]),
            (&[5, 1, 6], 0, &[5, 6, 7]),
            (&[-4, 2], 0, &[1, 2]),
        ];
        for (positions, pruned, want) in cases {
            assert_eq!(
                repaired(positions, *pruned),
                *want,
                "{positions:?}, pruned {pruned}"
            );
        }
    }

    #[test]
    fn renumbering_starts_over_for_each_stream() {
        let mut r = Renumbering::default();
        assert_eq!(r.next(1, 5, 0), None);
        assert_eq!(r.next(2, 1, 0), None);
        assert_eq!(r.next(2, 1, 0), Some(2));
        assert_eq!(r.next(3, 0, 9), Some(10));
    }
}
