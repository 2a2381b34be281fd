-- seqcast store, schema version 3: the committed log is the truth, read per key and pruned.
--
-- Subscribers catch up from the log page by page and backlogs are a view of it, so one key's
-- events must be found without walking the whole log: the per-stream index that migration 2
-- dropped comes back (it costs the writer one more B-tree leaf per busy stream per commit; see
-- the README for the measured cost).
CREATE INDEX events_by_stream ON events (stream_id, sequence_number);

-- The retention floor: the smallest sequence number the log may still hold. Every event in
-- [floor, head] is present; everything below was pruned. It only ever rises, and the writer
-- raises it in the same transaction as (and before) the deletes, so a reader that sees an event
-- missing also sees the raised floor.
INSERT OR IGNORE INTO store_meta (key, value) VALUES ('retention_floor', '1');
