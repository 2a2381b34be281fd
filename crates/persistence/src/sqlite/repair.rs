//! `seqcast db repair-sequences`: put a damaged stream's positions back in creation order,
//! changing nothing that is already in order.

use std::path::Path;

use rusqlite::TransactionBehavior;

use super::schema::{self, ConnectionOptions};
use crate::error::StoreError;
use crate::maintenance::{Renumbering, RepairReport};

/// Repairs stream positions (see `Renumbering` in `maintenance.rs` for the rule) in one transaction. Fixes
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
