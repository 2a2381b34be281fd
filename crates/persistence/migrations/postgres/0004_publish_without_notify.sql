-- seqcast PostgreSQL schema, version 4: seqcast.publish() no longer calls pg_notify. A NOTIFY
-- makes PostgreSQL take one lock for the whole cluster at commit (PreCommit_Notify), so every
-- committing transaction that published was serialized with every other one (and held that
-- lock through a synchronous standby's confirmation). Nodes poll the outbox instead (a few
-- milliseconds apart, an index probe of an almost always empty table). The data is held to the
-- size limit of HTTP publishes (`max_message_bytes`, written to store_meta by the nodes).
CREATE OR REPLACE FUNCTION seqcast.publish(
    p_channel text, p_request_id text, p_data jsonb, p_message_id text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_message_id text := p_message_id;
    v_data       text;
    v_limit      bigint;
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
    v_data := p_data::text;
    SELECT m.value::bigint INTO v_limit FROM seqcast.store_meta m WHERE m.key = 'max_message_bytes';
    IF v_limit IS NOT NULL AND octet_length(v_data) > v_limit THEN
        RAISE EXCEPTION 'seqcast.publish: data is % bytes, over the limit of %', octet_length(v_data), v_limit
            USING ERRCODE = '54000', HINT = 'the same limit as HTTP publishes (max_message_bytes)';
    END IF;
    INSERT INTO seqcast.outbox (channel, request_id, message_id, data)
         VALUES (p_channel, p_request_id, v_message_id, v_data);
    -- Delivered only if (and when) the caller commits; nodes poll the outbox.
    RETURN v_message_id;
END $$;
