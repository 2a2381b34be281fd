-- Publishing from inside an application's own transaction: seqcast.publish() stages the
-- message here without touching the counter; a node's writer numbers staged messages once the
-- caller has committed (woken by NOTIFY seqcast_outbox, with a periodic sweep).
CREATE TABLE seqcast.outbox (
    outbox_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel    text   NOT NULL,
    request_id text   NOT NULL,
    message_id text   NOT NULL,
    data       text   NOT NULL,
    staged_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Staged messages the writer could not number (the database refused them); kept for the
-- operator, never retried.
CREATE TABLE seqcast.outbox_failed (
    outbox_id  bigint PRIMARY KEY,
    channel    text   NOT NULL,
    request_id text   NOT NULL,
    message_id text   NOT NULL,
    data       text   NOT NULL,
    staged_at  timestamptz NOT NULL,
    error      text   NOT NULL,
    failed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION seqcast.publish(
    p_channel text, p_request_id text, p_data jsonb, p_message_id text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_message_id text := p_message_id;
BEGIN
    IF p_channel IS NULL OR p_channel !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
        RAISE EXCEPTION 'seqcast.publish: bad channel %', p_channel
            USING ERRCODE = '22023', HINT = 'a channel is [A-Za-z0-9_.-]{1,64}';
    END IF;
    IF p_request_id IS NULL OR p_request_id !~ '^[A-Za-z0-9_.:-]{1,128}$' THEN
        RAISE EXCEPTION 'seqcast.publish: bad request_id %', p_request_id
            USING ERRCODE = '22023', HINT = 'a request_id is [A-Za-z0-9_.:-]{1,128}';
    END IF;
    IF p_data IS NULL THEN
        RAISE EXCEPTION 'seqcast.publish: data is null' USING ERRCODE = '22023';
    END IF;
    IF v_message_id IS NULL THEN
        v_message_id := substr(md5(random()::text || clock_timestamp()::text), 1, 24);
    ELSIF v_message_id !~ '^[A-Za-z0-9_.:-]{1,128}$' THEN
        RAISE EXCEPTION 'seqcast.publish: bad message_id %', v_message_id
            USING ERRCODE = '22023', HINT = 'a message_id is [A-Za-z0-9_.:-]{1,128}';
    END IF;
    INSERT INTO seqcast.outbox (channel, request_id, message_id, data)
         VALUES (p_channel, p_request_id, v_message_id, p_data::text);
    -- Delivered only if (and when) the caller commits.
    PERFORM pg_notify('seqcast_outbox', '');
    RETURN v_message_id;
END $$;
