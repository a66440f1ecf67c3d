-- The event log carries its own dedup key and aggregate delta (fewer rows and index entries per
-- event than 0001's separate `event_keys` row and one `outbox` row per event).
--
-- events.payload_hash: the dedup key's payload hash while the key is remembered; the pruning
-- sets it to NULL once the event is older than the dedup window (the key is then forgotten and
-- the same (source, event_id) may be stored again). `events_key` is unique over remembered keys.
-- events.delta: the encoded AggregateDelta for ProfileService.ApplyAggregates (NULL when the
-- event counts nothing, e.g. a second ORDER_COMPLETED, or when it is a refund waiting in the
-- outbox for its order). The forwarder follows the log by `seq` from its cursor in
-- `feed_cursors` ('aggregates'); `seq` order is commit order because every commit appends
-- under the log advisory lock held to its end.
--
-- The outbox keeps only the exceptions: refunds waiting for their order (ready = 0, made ready
-- by the order's commit), deltas ProfileService refused (ready = 2) and rows written before
-- this migration.
ALTER TABLE events ADD COLUMN payload_hash BYTEA;
ALTER TABLE events ADD COLUMN delta BYTEA;

-- Each remembered key moves to the newest stored event with that key (keys whose event was
-- never stored, for an erased profile, are dropped: nothing of such an event was kept).
UPDATE events e SET payload_hash = k.payload_hash
FROM (SELECT DISTINCT ON (source, event_id) seq, source, event_id
      FROM events ORDER BY source, event_id, seq DESC) AS last
JOIN event_keys k ON k.source = last.source AND k.event_id = last.event_id
WHERE e.seq = last.seq;

CREATE UNIQUE INDEX events_key ON events (source, event_id) WHERE payload_hash IS NOT NULL;
DROP TABLE event_keys;

-- The deltas of the events already stored are in the outbox: the follower starts after them.
-- 'dedup_keys' is how far the pruning has walked the log.
INSERT INTO feed_cursors (feed, position, updated_at)
SELECT 'aggregates', COALESCE(MAX(seq), 0), 0 FROM events
ON CONFLICT (feed) DO NOTHING;
INSERT INTO feed_cursors (feed, position, updated_at) VALUES ('dedup_keys', 0, 0)
ON CONFLICT (feed) DO NOTHING;

-- A batch's append (src/store.rs, PgEventStore): `ingest_lookup` before the log lock, then
-- `ingest_append_looked_up` under it, then the producer's sequence and the batch result in the
-- same transaction. The key lookup is outside the lock so that one stream's commits overlap:
-- batch n+1 transfers its arrays and looks up its keys while batch n holds the lock, then waits
-- for it (`CommitTurn`).
--
-- `ingest_lookup`: the remembered keys among (p_source[i], p_event_id[i]): the 1-based
-- position, stored payload hash and profile id (primary-key-style probes; `OFFSET 0` keeps
-- the planner from a hash join over the whole log).
CREATE FUNCTION ingest_lookup(p_source TEXT[], p_event_id TEXT[])
RETURNS TABLE (o_n BIGINT, o_hash BYTEA, o_profile TEXT)
LANGUAGE sql STABLE AS $fn$
    SELECT u.n, e.payload_hash, e.profile_id
    FROM UNNEST(p_source, p_event_id) WITH ORDINALITY AS u(s, i, n)
    CROSS JOIN LATERAL (SELECT e.payload_hash, e.profile_id FROM events e
                        WHERE e.source = u.s AND e.event_id = u.i AND e.payload_hash IS NOT NULL
                        OFFSET 0) e
$fn$;

-- The rows of one append, given the positions whose keys are already remembered (`p_found`)
-- and the erased profiles: orders and refunds, the log rows with their deltas, waiting
-- refunds (`OFFSET 0` keeps the refunds' order checks as index probes instead of a hashed scan
-- of every order). Per event i: p_effect 0 = engagement, 1 = order, 2 = refund, 3 = full
-- refund; p_counted[i] is its delta when it counts in full (an order that is the first
-- completion of its order id, a full refund that is the first of its order, any engagement),
-- p_plain[i] a refund's delta that does not un-count the order. Raises
-- unique_violation when a key it was told is new is in the log after all.
CREATE FUNCTION ingest_write_rows(
    p_now BIGINT,
    p_source TEXT[], p_event_id TEXT[], p_hash BYTEA[], p_profile TEXT[], p_kind BIGINT[],
    p_name TEXT[], p_at BIGINT[], p_body BYTEA[], p_redacted TEXT[],
    p_key TEXT[], p_order TEXT[], p_effect BIGINT[], p_counted BYTEA[], p_plain BYTEA[],
    v_found BIGINT[], v_erased TEXT[]
) RETURNS VOID
LANGUAGE plpgsql AS $fn$
DECLARE
    v_new INT[];
    v_won TEXT[];
    v_won_orders TEXT[];
    v_first TEXT[];
BEGIN
    SELECT array_agg(n ORDER BY n) INTO v_new
    FROM generate_subscripts(p_source, 1) AS n
    WHERE n <> ALL(COALESCE(v_found, '{}')) AND p_profile[n] <> ALL(COALESCE(v_erased, '{}'));
    IF v_new IS NULL THEN
        RETURN;
    END IF;

    WITH ins AS (
        INSERT INTO orders (order_id, event_key, created_at)
        SELECT p_order[n], p_key[n], p_now FROM UNNEST(v_new) AS n WHERE p_effect[n] = 1
        ON CONFLICT DO NOTHING RETURNING order_id, event_key
    )
    SELECT array_agg(ins.event_key), array_agg(ins.order_id) INTO v_won, v_won_orders FROM ins;
    WITH ins AS (
        INSERT INTO full_refunds (order_id, event_key)
        SELECT p_order[n], p_key[n] FROM UNNEST(v_new) AS n WHERE p_effect[n] = 3
        ON CONFLICT DO NOTHING RETURNING event_key
    )
    SELECT array_agg(ins.event_key) INTO v_first FROM ins;

    INSERT INTO events (source, event_id, payload_hash, profile_id, kind, custom_name,
                        occurred_at, ingested_at, body, redacted, delta)
    SELECT p_source[n], p_event_id[n], p_hash[n], p_profile[n], p_kind[n], p_name[n],
           p_at[n], p_now, p_body[n], p_redacted[n],
           CASE
               WHEN p_effect[n] = 0 THEN p_counted[n]
               WHEN p_effect[n] = 1 THEN
                   CASE WHEN p_key[n] = ANY(v_won) THEN p_counted[n] END
               WHEN EXISTS (SELECT 1 FROM orders o WHERE o.order_id = p_order[n] OFFSET 0) THEN
                   CASE WHEN p_key[n] = ANY(v_first) THEN p_counted[n] ELSE p_plain[n] END
           END
    FROM UNNEST(v_new) AS n ORDER BY n;

    -- Refunds whose order is not counted yet wait in the outbox.
    INSERT INTO outbox (idempotency_key, delta, ready, order_id, created_at)
    SELECT p_key[n], CASE WHEN p_key[n] = ANY(v_first) THEN p_counted[n] ELSE p_plain[n] END,
           0, p_order[n], p_now
    FROM UNNEST(v_new) AS n
    WHERE p_effect[n] IN (2, 3)
      AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = p_order[n] OFFSET 0)
    ORDER BY n;
    IF v_won_orders IS NOT NULL THEN
        UPDATE outbox SET ready = 1 WHERE ready = 0 AND order_id = ANY(v_won_orders);
    END IF;
END;
$fn$;

-- The locked part of an append whose keys `ingest_lookup` looked up before the lock:
-- `p_found` are the positions it found. Takes the log lock (held to COMMIT), reads the
-- erased profiles and writes the rows. A key stored by another commit between the lookup and
-- the lock (a resend racing its original) makes the write fail with unique_violation; it is
-- then undone, looked up again under the lock and redone. Returns one row per key found only
-- by that second lookup (o_n = its position) and one per erased profile id (o_n = 0).
CREATE FUNCTION ingest_append_looked_up(
    p_lock BIGINT, p_now BIGINT,
    p_source TEXT[], p_event_id TEXT[], p_hash BYTEA[], p_profile TEXT[], p_kind BIGINT[],
    p_name TEXT[], p_at BIGINT[], p_body BYTEA[], p_redacted TEXT[],
    p_key TEXT[], p_order TEXT[], p_effect BIGINT[], p_counted BYTEA[], p_plain BYTEA[],
    p_found BIGINT[]
) RETURNS TABLE (o_n BIGINT, o_hash BYTEA, o_profile TEXT)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_erased TEXT[];
    v_found BIGINT[];
    v_found_hash BYTEA[];
    v_found_profile TEXT[];
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    SELECT array_agg(x.profile_id) INTO v_erased
    FROM erased_profiles x WHERE x.profile_id = ANY(p_profile);
    RETURN QUERY SELECT 0::BIGINT, NULL::BYTEA, x.p FROM UNNEST(v_erased) AS x(p);
    BEGIN
        PERFORM ingest_write_rows(p_now, p_source, p_event_id, p_hash, p_profile, p_kind,
            p_name, p_at, p_body, p_redacted, p_key, p_order, p_effect, p_counted, p_plain,
            COALESCE(p_found, '{}'), v_erased);
        RETURN;
    EXCEPTION WHEN unique_violation THEN
        NULL; -- undone with the block; looked up again below
    END;
    SELECT array_agg(l.o_n), array_agg(l.o_hash), array_agg(l.o_profile)
    INTO v_found, v_found_hash, v_found_profile
    FROM ingest_lookup(p_source, p_event_id) l;
    PERFORM ingest_write_rows(p_now, p_source, p_event_id, p_hash, p_profile, p_kind,
        p_name, p_at, p_body, p_redacted, p_key, p_order, p_effect, p_counted, p_plain,
        COALESCE(v_found, '{}'), v_erased);
    RETURN QUERY SELECT f.n, f.h, f.p FROM UNNEST(v_found, v_found_hash, v_found_profile) AS f(n, h, p)
    WHERE f.n <> ALL(COALESCE(p_found, '{}'));
END;
$fn$;

