-- seqcast store, schema version 1.
--
-- Numbers are assigned here, by SQLite, never by Rust code:
--   * events.sequence_number is an AUTOINCREMENT rowid, so a number is never handed out twice,
--     not even after the newest events are deleted (sqlite_sequence keeps the high-water mark);
--   * stream_rows.stream_sequence is MAX(stream_sequence)+1 of the stream, computed by the
--     upsert statement when a row is created and left alone when the row is updated.

-- The store's identity. `epoch` is made once, when the store is created, from SQLite's own
-- CSPRNG; a client holding numbers from another epoch must not resume with them.
CREATE TABLE store_meta (
    key   TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
) STRICT, WITHOUT ROWID;

INSERT INTO store_meta (key, value) VALUES ('epoch', lower(hex(randomblob(16))));

-- One row per subscription key. The other tables refer to a stream by its integer id: index
-- keys stay small and compare as integers, which is most of the writer's per-event cost.
-- Rows are never deleted or changed, so an id, once committed, is valid forever.
CREATE TABLE streams (
    stream_id  INTEGER PRIMARY KEY,
    channel    TEXT NOT NULL,
    request_id TEXT NOT NULL,
    UNIQUE (channel, request_id)
) STRICT;

-- The event log: one row per publish (the creation or an update of a stream row), in commit
-- order. stream_sequence and "replaced" are not copied here: they are read from stream_rows
-- (replaced = this event is not the row's first), so a repair of stream_rows fixes both.
CREATE TABLE events (
    sequence_number INTEGER PRIMARY KEY AUTOINCREMENT,
    stream_id       INTEGER NOT NULL REFERENCES streams (stream_id),
    message_id      TEXT    NOT NULL,
    timestamp_ms    INTEGER NOT NULL,
    -- Stored verbatim; the readers hand it out as raw JSON, so it must be JSON.
    data            TEXT    NOT NULL CHECK (json_valid(data))
) STRICT;

CREATE INDEX events_by_stream ON events (stream_id, sequence_number);

-- The current state of every stream: one row per (stream, message_id). The row's data and
-- timestamp are those of its last event (joined on last_sequence), so data is written once.
-- Events must therefore never be deleted while a row points at them.
CREATE TABLE stream_rows (
    stream_id       INTEGER NOT NULL REFERENCES streams (stream_id),
    message_id      TEXT    NOT NULL,
    stream_sequence INTEGER NOT NULL,
    -- The event that created the row: the row's insertion order, used by repair-sequences.
    first_sequence  INTEGER NOT NULL,
    -- The event that last wrote the row.
    last_sequence   INTEGER NOT NULL,
    PRIMARY KEY (stream_id, message_id)
) STRICT, WITHOUT ROWID;

-- Deliberately NOT unique: a database written by a buggy version may hold many rows at the same
-- stream_sequence (seed 004: 82 of 86 at 0), and it must still open so that
-- `seqcast db repair-sequences` can renumber it. The writer alone keeps positions distinct.
CREATE INDEX stream_rows_by_position ON stream_rows (stream_id, stream_sequence);
