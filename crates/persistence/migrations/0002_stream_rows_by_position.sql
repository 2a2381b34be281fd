-- seqcast store, schema version 2: fewer B-tree pages written per event.
--
-- The writer's cost per event is mostly the pages it dirties: every dirty page is written to the
-- WAL (and checksummed) at each commit. A tree ordered by stream first gets one dirty leaf per
-- stream in the group, so with 64 busy streams version 1 wrote about three scattered pages per
-- event (events_by_stream, stream_rows' primary key, stream_rows_by_position). Version 2 keeps
-- one: stream_rows is clustered by position, which stream pages read in order; the lookup by
-- message_id is an index that starts with message_id, and server-made message ids increase, so
-- new entries land on the same few pages. Per-key recovery from the database walks the log
-- from `since` (bounded by the recovery window), as per-channel recovery already did.

DROP INDEX events_by_stream;

-- first_sequence (the event that created the row, unique) completes the key, so that a database
-- written by a buggy version may still hold many rows at one position (seed 004: 82 of 86 at 0)
-- and open for `seqcast db repair-sequences`. The writer alone keeps positions distinct.
CREATE TABLE stream_rows_v2 (
    stream_id       INTEGER NOT NULL REFERENCES streams (stream_id),
    stream_sequence INTEGER NOT NULL,
    -- The event that created the row: the row's insertion order, used by repair-sequences.
    first_sequence  INTEGER NOT NULL,
    message_id      TEXT    NOT NULL,
    -- The event that last wrote the row.
    last_sequence   INTEGER NOT NULL,
    PRIMARY KEY (stream_id, stream_sequence, first_sequence)
) STRICT, WITHOUT ROWID;

INSERT INTO stream_rows_v2 (stream_id, stream_sequence, first_sequence, message_id, last_sequence)
    SELECT stream_id, stream_sequence, first_sequence, message_id, last_sequence FROM stream_rows;

DROP TABLE stream_rows;
ALTER TABLE stream_rows_v2 RENAME TO stream_rows;

CREATE UNIQUE INDEX stream_rows_by_message ON stream_rows (message_id, stream_id);
