//! `seqcast db repair-sequences`: renumber stream positions by insertion order.

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

/// Renumbers every stream's rows 1, 2, 3… in insertion order (the event that created the row),
/// in one transaction. Fixes databases written by a buggy version, e.g. seed 004's
/// 82 of 86 rows at position 0. Safe on a healthy database (changes nothing) and idempotent.
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
    // The position index is not unique, so rows may pass through equal positions mid-update.
    let rows_renumbered = tx.execute(
        "WITH ranked AS (
             SELECT stream_id, message_id,
                    ROW_NUMBER() OVER (
                        PARTITION BY stream_id ORDER BY first_sequence, message_id
                    ) AS position
             FROM stream_rows
         )
         UPDATE stream_rows SET stream_sequence = ranked.position
         FROM ranked
         WHERE stream_rows.stream_id = ranked.stream_id
           AND stream_rows.message_id = ranked.message_id
           AND stream_rows.stream_sequence IS NOT ranked.position",
        [],
    )?;
    if rows_renumbered > 0 {
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
    tracing::info!(streams, rows_renumbered, "stream sequences repaired");
    Ok(RepairReport {
        streams,
        rows_renumbered,
    })
}
