-- The log, in its own schema. Numbers come from one counter row that every writing
-- transaction locks first, so numbers are handed out in commit order, densely, across nodes.

CREATE TABLE seqcast.store_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- The sequence authority: one row. `head` is the highest number ever assigned;
-- `last_timestamp_ms` keeps timestamps from going backwards along the log.
CREATE TABLE seqcast.counter (
    id                int    PRIMARY KEY CHECK (id = 1),
    head              bigint NOT NULL CHECK (head >= 0),
    last_timestamp_ms bigint NOT NULL
);
INSERT INTO seqcast.counter (id, head, last_timestamp_ms) VALUES (1, 0, 0);

-- The retention floor: the smallest number the log may still hold. Only rises.
CREATE TABLE seqcast.retention (
    id    int    PRIMARY KEY CHECK (id = 1),
    floor bigint NOT NULL CHECK (floor >= 1)
);
INSERT INTO seqcast.retention (id, floor) VALUES (1, 1);

CREATE TABLE seqcast.streams (
    stream_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel    text NOT NULL,
    request_id text NOT NULL,
    UNIQUE (channel, request_id)
);

-- `data` is `json`, not `jsonb`: json keeps the publisher's text verbatim (retries compare
-- it byte for byte) and still refuses text that is not JSON.
CREATE TABLE seqcast.events (
    sequence_number bigint PRIMARY KEY,
    stream_id       bigint NOT NULL REFERENCES seqcast.streams (stream_id),
    message_id      text   NOT NULL,
    timestamp_ms    bigint NOT NULL,
    data            json   NOT NULL
);
CREATE INDEX events_by_stream ON seqcast.events (stream_id, sequence_number);

CREATE TABLE seqcast.stream_rows (
    stream_id       bigint NOT NULL,
    stream_sequence bigint NOT NULL,
    message_id      text   NOT NULL,
    first_sequence  bigint NOT NULL,
    last_sequence   bigint NOT NULL,
    PRIMARY KEY (stream_id, stream_sequence),
    UNIQUE (stream_id, message_id)
);

-- Appends one command's events (one all-or-nothing unit) and returns each event's numbers.
-- Locks the counter row first: from here to COMMIT no other writer, on any node, can number
-- anything, so numbers are dense and in commit order. A known message id with byte-identical
-- data is a retry: nothing is written and the row's last event is returned (o_retry).
CREATE FUNCTION seqcast.append_events(
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
        -- The common case first: a new message id creates its row (position = max + 1, by
        -- the database) and its event, in two statements.
        v_head := v_head + 1;
        INSERT INTO seqcast.stream_rows
               (stream_id, stream_sequence, message_id, first_sequence, last_sequence)
        SELECT v_stream, COALESCE(MAX(r.stream_sequence), 0) + 1, p_message_ids[i], v_head, v_head
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

-- The smallest retained number whose timestamp is >= p_min_ts: a binary search on the primary
-- key (timestamps never decrease along the log). STABLE: every step sees the caller's snapshot.
CREATE FUNCTION seqcast.first_at_or_after(p_min_ts bigint) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_floor bigint; v_head bigint; lo bigint; hi bigint; mid bigint; s bigint; t bigint;
BEGIN
    SELECT r.floor INTO v_floor FROM seqcast.retention r WHERE r.id = 1;
    SELECT e.sequence_number, e.timestamp_ms INTO s, t FROM seqcast.events e
     WHERE e.sequence_number >= v_floor ORDER BY e.sequence_number LIMIT 1;
    IF s IS NULL THEN RETURN NULL; END IF;
    IF t >= p_min_ts THEN RETURN s; END IF;
    lo := s;
    SELECT c.head INTO v_head FROM seqcast.counter c WHERE c.id = 1;
    SELECT e.sequence_number, e.timestamp_ms INTO s, t FROM seqcast.events e
     WHERE e.sequence_number >= v_head ORDER BY e.sequence_number LIMIT 1;
    IF s IS NULL OR t < p_min_ts THEN RETURN NULL; END IF;
    hi := v_head;
    WHILE hi - lo > 1 LOOP
        mid := lo + (hi - lo) / 2;
        t := NULL;
        SELECT e.timestamp_ms INTO t FROM seqcast.events e
         WHERE e.sequence_number >= mid ORDER BY e.sequence_number LIMIT 1;
        IF t IS NULL OR t >= p_min_ts THEN hi := mid; ELSE lo := mid; END IF;
    END LOOP;
    SELECT e.sequence_number INTO s FROM seqcast.events e
     WHERE e.sequence_number >= hi ORDER BY e.sequence_number LIMIT 1;
    RETURN s;
END $$;
