-- seqcast store, schema version 4: each event carries its stream position.
--
-- Catch-up reads a key's events page by page through events_by_stream. Until now each row then
-- joined stream_rows by (message_id, stream_id) for the position and `replaced`: a string-keyed
-- B-tree seek per event, about a third of SQLite's time in a catch-up. The writer knows both
-- when it writes the event (it looks the row up first), so they are stored with the event.
-- `seqcast db repair-sequences` renumbers the rows and then copies the positions to the events.
ALTER TABLE events ADD COLUMN stream_sequence INTEGER NOT NULL DEFAULT 0;
-- 1 when the event updated an existing row (repeated message_id with new data), else 0.
ALTER TABLE events ADD COLUMN replaced INTEGER NOT NULL DEFAULT 0 CHECK (replaced IN (0, 1));

UPDATE events SET
    stream_sequence = COALESCE(
        (SELECT r.stream_sequence FROM stream_rows r
          WHERE r.message_id = events.message_id AND r.stream_id = events.stream_id), 0),
    replaced = COALESCE(
        (SELECT r.first_sequence != events.sequence_number FROM stream_rows r
          WHERE r.message_id = events.message_id AND r.stream_id = events.stream_id), 0);
