-- seqcast PostgreSQL schema, version 3: a stream's positions never go back (as SQLite's
-- schema 5). The pruner keeps, per stream, the highest position it removed; a new row's position
-- is one past the larger of that and the live rows' highest. append_events is replaced whole;
-- only the position of a new row changed.
ALTER TABLE seqcast.streams ADD COLUMN pruned_position bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION seqcast.append_events(
    p_channels text[], p_request_ids text[], p_message_ids text[], p_data text[])
RETURNS TABLE (o_sequence_number bigint, o_stream_sequence bigint, o_replaced boolean,
               o_timestamp_ms bigint, o_retry boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_head   bigint;
    v_ts     bigint;
    v_stream bigint;
    v_pos    bigint;
    v_first  bigint;
    v_last   bigint;
    v_old    text;
    v_old_ts bigint;
    i        int;
    v_first_head bigint;
BEGIN
    SELECT c.head, c.last_timestamp_ms INTO v_head, v_ts
      FROM seqcast.counter c WHERE c.id = 1 FOR UPDATE;
    v_first_head := v_head;
    v_ts := GREATEST(v_ts, floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    FOR i IN 1 .. coalesce(array_length(p_channels, 1), 0) LOOP
        SELECT s.stream_id INTO v_stream FROM seqcast.streams s
         WHERE s.channel = p_channels[i] AND s.request_id = p_request_ids[i];
        IF NOT FOUND THEN
            INSERT INTO seqcast.streams (channel, request_id)
                 VALUES (p_channels[i], p_request_ids[i]) RETURNING stream_id INTO v_stream;
        END IF;
        -- The common case first: a new message id creates its row (position = one past the
        -- larger of the live rows' highest and the highest the pruner removed, by the
        -- database) and its event, in two statements.
        v_head := v_head + 1;
        INSERT INTO seqcast.stream_rows
               (stream_id, stream_sequence, message_id, first_sequence, last_sequence)
        SELECT v_stream,
               GREATEST(COALESCE(MAX(r.stream_sequence), 0),
                        (SELECT s.pruned_position FROM seqcast.streams s WHERE s.stream_id = v_stream)) + 1,
               p_message_ids[i], v_head, v_head
          FROM seqcast.stream_rows r WHERE r.stream_id = v_stream
        ON CONFLICT (stream_id, message_id) DO NOTHING
        RETURNING stream_sequence INTO v_pos;
        IF FOUND THEN
            INSERT INTO seqcast.events (sequence_number, stream_id, message_id, timestamp_ms, data)
                 VALUES (v_head, v_stream, p_message_ids[i], v_ts, p_data[i]::json);
            o_sequence_number := v_head; o_stream_sequence := v_pos; o_replaced := false;
        ELSE
            -- A known message id: a retry (same data: nothing written, the number given back)
            -- or an upsert (new event, the row keeps its position).
            v_head := v_head - 1;
            SELECT r.stream_sequence, r.first_sequence, r.last_sequence, e.data::text, e.timestamp_ms
              INTO v_pos, v_first, v_last, v_old, v_old_ts
              FROM seqcast.stream_rows r
              JOIN seqcast.events e ON e.sequence_number = r.last_sequence
             WHERE r.stream_id = v_stream AND r.message_id = p_message_ids[i];
            IF v_old = p_data[i] THEN
                o_sequence_number := v_last; o_stream_sequence := v_pos;
                o_replaced := v_first <> v_last; o_timestamp_ms := v_old_ts; o_retry := true;
                RETURN NEXT;
                CONTINUE;
            END IF;
            v_head := v_head + 1;
            INSERT INTO seqcast.events (sequence_number, stream_id, message_id, timestamp_ms, data)
                 VALUES (v_head, v_stream, p_message_ids[i], v_ts, p_data[i]::json);
            UPDATE seqcast.stream_rows SET last_sequence = v_head
             WHERE stream_id = v_stream AND message_id = p_message_ids[i];
            o_sequence_number := v_head; o_stream_sequence := v_pos; o_replaced := true;
        END IF;
        o_timestamp_ms := v_ts; o_retry := false;
        RETURN NEXT;
    END LOOP;
    IF v_head > v_first_head THEN
        UPDATE seqcast.counter SET head = v_head, last_timestamp_ms = v_ts WHERE id = 1;
        -- Wakes every node's tail at COMMIT (payload: the last number); only a wake-up.
        PERFORM pg_notify('seqcast_events', v_head::text);
    END IF;
END $$;
