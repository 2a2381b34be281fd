//! `seqcast db repair-sequences`: put a damaged stream's positions back in creation order,
//! changing nothing that is already in order.

use std::path::Path;

use rusqlite::TransactionBehavior;

use crate::error::StoreError;
use crate::schema::{self, ConnectionOptions};

/// What [`repair_sequences`] did.
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

/// Repairs stream positions (see [`Renumbering`] for the rule) in one transaction. Fixes
/// databases written by a buggy version, e.g. seed 004's 82 of 86 rows at position 0. Changes
/// nothing on a healthy database — pruned or not — and is idempotent.
///
/// Runs the migrations first. It takes the write lock, so run it while no server writes, or
/// accept that it waits up to the busy timeout for the server's current transaction. Each event
/// then takes the position of its row again (events carry their position since schema 4).
pub fn repair_sequences(path: &Path) -> Result<RepairReport, StoreError> {
    let mut conn = schema::open_connection(path, ConnectionOptions::default())?;
    schema::apply_migrations(&mut conn)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let streams: i64 = tx.query_row(
        "SELECT COUNT(*) FROM (SELECT DISTINCT stream_id FROM stream_rows)",
        [],
        |row| row.get(0),
    )?;
    let mut changes: Vec<(i64, String, i64)> = Vec::new();
    {
        let mut rows = tx.prepare(
            "SELECT r.stream_id, s.pruned_position, r.message_id, r.stream_sequence
               FROM stream_rows r JOIN streams s ON s.stream_id = r.stream_id
              ORDER BY r.stream_id, r.first_sequence",
        )?;
        let mut rows = rows.query([])?;
        let mut renumbering = Renumbering::default();
        while let Some(row) = rows.next()? {
            let stream: i64 = row.get(0)?;
            if let Some(position) = renumbering.next(stream, row.get(3)?, row.get(1)?) {
                changes.push((stream, row.get(2)?, position));
            }
        }
    }
    // The position key also holds first_sequence, so rows may pass through equal positions.
    {
        let mut update = tx.prepare(
            "UPDATE stream_rows SET stream_sequence = ?3 WHERE message_id = ?2 AND stream_id = ?1",
        )?;
        for (stream, message_id, position) in &changes {
            update.execute(rusqlite::params![stream, message_id, position])?;
        }
    }
    if !changes.is_empty() {
        tx.execute(
            "UPDATE events SET stream_sequence = r.stream_sequence
             FROM stream_rows r
             WHERE r.message_id = events.message_id AND r.stream_id = events.stream_id
               AND events.stream_sequence IS NOT r.stream_sequence",
            [],
        )?;
    }
    tx.commit()?;
    let streams = usize::try_from(streams)
        .map_err(|_| StoreError::Corrupt(format!("stream count {streams}")))?;
    let rows_renumbered = changes.len();
    tracing::info!(streams, rows_renumbered, "stream sequences repaired");
    Ok(RepairReport {
        streams,
        rows_renumbered,
    })
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
