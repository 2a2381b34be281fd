-- seqcast PostgreSQL schema, version 5: seqcast.head(), the last sequence number of the caller's
-- snapshot, for the "read your state and the head in one REPEATABLE READ transaction, subscribe
-- with since = head" pattern (nothing missed, nothing twice).
--
-- The number is the counter row as the snapshot sees it, not max(sequence_number): retention
-- may have deleted the newest events, and the counter never goes back. Numbers are handed out
-- under the counter row's lock and made visible before it is released, so the snapshot sees
-- exactly the events 1..head (less what retention removed) and none above.
--
-- A message staged by seqcast.publish() is numbered after its transaction commits, by another
-- transaction. A snapshot that sees such a transaction's effects but not yet its message's
-- number cannot be described by one number: that message will get a number above head, and
-- HTTP publishes (and other staged messages) that the snapshot does not see may be numbered
-- before it. So while the snapshot sees a staged, not yet numbered message, head() refuses with
-- SQLSTATE 40001 (serialization_failure, which REPEATABLE READ applications already retry):
-- the retry's snapshot finds it numbered (within outbox_poll_interval of the commit).
CREATE FUNCTION seqcast.head() RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_head bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM seqcast.outbox) THEN
        RAISE EXCEPTION 'seqcast.head: this snapshot sees messages staged by seqcast.publish() that are not numbered yet'
            USING ERRCODE = '40001',
                  HINT = 'retry the transaction: staged messages are numbered within milliseconds of their commit';
    END IF;
    SELECT c.head INTO v_head FROM seqcast.counter c WHERE c.id = 1;
    RETURN v_head;
END $$;

-- The same for one subscription key (p_request_id NULL: every key of the channel): only a
-- staged message of those keys makes it refuse, so a busy application elsewhere does not keep
-- this reader retrying. The number is the same global head; `since` is global too.
CREATE FUNCTION seqcast.head(p_channel text, p_request_id text) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_head bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM seqcast.outbox o
                WHERE o.channel = p_channel
                  AND (p_request_id IS NULL OR o.request_id = p_request_id)) THEN
        RAISE EXCEPTION 'seqcast.head: this snapshot sees messages of %/% staged by seqcast.publish() that are not numbered yet',
                p_channel, coalesce(p_request_id, '*')
            USING ERRCODE = '40001',
                  HINT = 'retry the transaction: staged messages are numbered within milliseconds of their commit';
    END IF;
    SELECT c.head INTO v_head FROM seqcast.counter c WHERE c.id = 1;
    RETURN v_head;
END $$;
