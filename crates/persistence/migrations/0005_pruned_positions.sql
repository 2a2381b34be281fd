-- seqcast store, schema version 5: a stream's positions never go back.
--
-- A new row's position is one past the stream's highest. Until now "highest" was read from the
-- stream's live rows only, so once retention had pruned every row of a stream (or its newest
-- ones), new rows started again at a position a client paging the stream had already passed.
-- The pruner now keeps, per stream, the highest position it removed; a new row's position is
-- one past the larger of that and the live rows' highest. Nothing to backfill: positions
-- pruned before this migration are not known any more.
ALTER TABLE streams ADD COLUMN pruned_position INTEGER NOT NULL DEFAULT 0;
