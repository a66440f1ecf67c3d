-- Positions of ordered delta feeds (ApplyAggregatesRequest.feed, e.g. one ingest event log):
-- a positioned delta counts iff its position is above the feed's stored position, which the
-- same transaction raises to the call's highest. This replaces the per-delta `applied_deltas`
-- row (a text key, a heap row and an index entry per event) for forwarded deltas with one row
-- update per call. Deltas without a feed keep key idempotency (`prof_apply_aggregates`).
CREATE TABLE feed_positions (
    feed       TEXT PRIMARY KEY,
    position   BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The part both ApplyAggregates functions share. The deltas that count come as arrays `d_*`
-- (one element per delta, already moved to its live survivor `d_head`; engagement increments
-- as (delta ordinal, kind, n) against `d_ord`). They are summed per profile into order counts,
-- first / last order and last seen, spend per currency and engagement per kind; every profile
-- counted gets one version step and one changes-feed row (the feed lock taken just before).
-- Returns the profiles written with their new versions, sorted by id.
CREATE FUNCTION prof_fold_deltas(
    p_changes_lock BIGINT, p_updated_kind BIGINT, p_now BIGINT,
    d_ord BIGINT[], d_head TEXT[], d_at BIGINT[], d_orders BIGINT[], d_refunds BIGINT[],
    d_gc TEXT[], d_g BIGINT[], d_rc TEXT[], d_r BIGINT[],
    p_eng_delta BIGINT[], p_eng_kind TEXT[], p_eng_n BIGINT[]
) RETURNS TABLE (touched_ids TEXT[], touched_versions BIGINT[])
LANGUAGE plpgsql AS $fn$
DECLARE
    v_ids TEXT[];
    v_versions BIGINT[];
BEGIN
    WITH d AS (
        SELECT * FROM unnest(d_ord, d_head, d_at, d_orders, d_refunds, d_gc, d_g, d_rc, d_r)
             AS u(ord, head, at, orders, refunds, gc, g, rc, r)
    ), fold AS (
        SELECT d.head, SUM(d.orders)::BIGINT AS o, SUM(d.refunds)::BIGINT AS r,
               MIN(d.at) FILTER (WHERE d.orders > 0) AS fo,
               MAX(d.at) FILTER (WHERE d.orders > 0) AS lo,
               MAX(d.at) AS ls
        FROM d GROUP BY d.head
    ), upd AS (
        UPDATE profiles p SET
            order_count = p.order_count + f.o,
            refund_count = p.refund_count + f.r,
            first_order_at = CASE WHEN f.fo IS NOT NULL
                AND (p.first_order_at IS NULL OR f.fo < p.first_order_at)
                THEN f.fo ELSE p.first_order_at END,
            last_order_at = CASE WHEN f.lo IS NOT NULL
                AND (p.last_order_at IS NULL OR f.lo > p.last_order_at)
                THEN f.lo ELSE p.last_order_at END,
            last_seen_at = CASE WHEN p.last_seen_at IS NULL OR f.ls > p.last_seen_at
                THEN f.ls ELSE p.last_seen_at END,
            version = p.version + 1,
            updated_at = p_now
        FROM fold f WHERE p.id = f.head
        RETURNING p.id, p.version
    ), sp AS (
        INSERT INTO spend AS s (profile_id, currency, gross_minor, refunded_minor)
        SELECT m.head, m.cur, SUM(m.g)::BIGINT, SUM(m.r)::BIGINT FROM (
            SELECT d.head, d.gc AS cur, d.g, 0::BIGINT AS r FROM d WHERE d.gc IS NOT NULL
            UNION ALL
            SELECT d.head, d.rc, 0::BIGINT, d.r FROM d WHERE d.rc IS NOT NULL
        ) m GROUP BY m.head, m.cur
        ON CONFLICT (profile_id, currency) DO UPDATE SET
            gross_minor = s.gross_minor + excluded.gross_minor,
            refunded_minor = s.refunded_minor + excluded.refunded_minor
    ), en AS (
        INSERT INTO engagement AS e (profile_id, kind, count)
        SELECT d.head, x.kind, SUM(x.n)::BIGINT
        FROM unnest(p_eng_delta, p_eng_kind, p_eng_n) AS x(ord, kind, n)
        JOIN d ON d.ord = x.ord
        GROUP BY d.head, x.kind
        ON CONFLICT (profile_id, kind) DO UPDATE SET count = e.count + excluded.count
    )
    SELECT array_agg(upd.id ORDER BY upd.id), array_agg(upd.version ORDER BY upd.id)
    INTO v_ids, v_versions FROM upd;

    IF v_ids IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(p_changes_lock);
        INSERT INTO changes (profile_id, kind, merged_ids, changed_at)
        SELECT x.id, p_updated_kind, '', p_now
        FROM unnest(v_ids) WITH ORDINALITY AS x(id, ord) ORDER BY x.ord;
    END IF;
    RETURN QUERY SELECT COALESCE(v_ids, '{}'), COALESCE(v_versions, '{}');
END
$fn$;

-- 0002's key-deduplicated ApplyAggregates over the shared fold (the same contract: each key
-- new to applied_deltas counts once on the live survivor of its profile).
CREATE OR REPLACE FUNCTION prof_apply_aggregates(
    p_changes_lock BIGINT, p_updated_kind BIGINT, p_now BIGINT,
    p_key TEXT[], p_profile TEXT[], p_at BIGINT[], p_orders BIGINT[], p_refunds BIGINT[],
    p_gross_cur TEXT[], p_gross BIGINT[], p_ref_cur TEXT[], p_ref BIGINT[],
    p_eng_delta BIGINT[], p_eng_kind TEXT[], p_eng_n BIGINT[]
) RETURNS TABLE (fresh_count BIGINT, applied_count BIGINT, touched_ids TEXT[],
                 touched_versions BIGINT[])
LANGUAGE plpgsql AS $fn$
DECLARE
    v_req TEXT[];
    v_head TEXT[];
    v_fresh BIGINT;
    v_applied BIGINT;
    d_ord BIGINT[]; d_head TEXT[]; d_at BIGINT[]; d_orders BIGINT[]; d_refunds BIGINT[];
    d_gc TEXT[]; d_g BIGINT[]; d_rc TEXT[]; d_r BIGINT[];
BEGIN
    SELECT array_agg(h.req), array_agg(h.head) INTO v_req, v_head
    FROM prof_lock_heads(ARRAY(SELECT DISTINCT x FROM unnest(p_profile) AS x)) h
    WHERE h.erased_at IS NULL;

    WITH heads AS (
        SELECT * FROM unnest(v_req, v_head) AS h(req, head)
    ), fresh AS (
        INSERT INTO applied_deltas (idempotency_key, profile_id, applied_at)
        SELECT u.k, u.p, p_now FROM unnest(p_key, p_profile) AS u(k, p)
        ON CONFLICT DO NOTHING
        RETURNING idempotency_key
    ), d AS (
        SELECT u.ord, h.head, u.at, u.orders, u.refunds, u.gc, u.g, u.rc, u.r
        FROM unnest(p_key, p_profile, p_at, p_orders, p_refunds, p_gross_cur, p_gross,
                    p_ref_cur, p_ref) WITH ORDINALITY
             AS u(k, p, at, orders, refunds, gc, g, rc, r, ord)
        JOIN fresh f ON f.idempotency_key = u.k
        JOIN heads h ON h.req = u.p
    )
    SELECT (SELECT COUNT(*) FROM fresh), COUNT(*),
           array_agg(d.ord), array_agg(d.head), array_agg(d.at), array_agg(d.orders),
           array_agg(d.refunds), array_agg(d.gc), array_agg(d.g), array_agg(d.rc),
           array_agg(d.r)
    INTO v_fresh, v_applied, d_ord, d_head, d_at, d_orders, d_refunds, d_gc, d_g, d_rc, d_r
    FROM d;

    RETURN QUERY
    SELECT v_fresh, v_applied, f.touched_ids, f.touched_versions
    FROM prof_fold_deltas(p_changes_lock, p_updated_kind, p_now, d_ord, d_head, d_at,
                          d_orders, d_refunds, d_gc, d_g, d_rc, d_r,
                          p_eng_delta, p_eng_kind, p_eng_n) f;
END
$fn$;

-- ApplyAggregates for one feed (`prof_apply_aggregates` with `p_pos`, one position per delta,
-- in place of the key dedup). The feed's row is locked first (FOR UPDATE, created at 0 when
-- new), so two calls with overlapping pages of one feed run one after the other and count
-- each position once; the profile locks follow, as in every other write (no lock cycle: only
-- this function takes feed rows). A feed's first call (stored position 0) also records and
-- checks the keys in `applied_deltas`, so a page already delivered by key before its sender
-- switched to positions is not counted twice. Returns what prof_apply_aggregates returns
-- (`fresh_count` = deltas above the stored position, and with new keys on a first call).
CREATE FUNCTION prof_apply_feed_aggregates(
    p_changes_lock BIGINT, p_updated_kind BIGINT, p_now BIGINT, p_feed TEXT, p_pos BIGINT[],
    p_key TEXT[], p_profile TEXT[], p_at BIGINT[], p_orders BIGINT[], p_refunds BIGINT[],
    p_gross_cur TEXT[], p_gross BIGINT[], p_ref_cur TEXT[], p_ref BIGINT[],
    p_eng_delta BIGINT[], p_eng_kind TEXT[], p_eng_n BIGINT[]
) RETURNS TABLE (fresh_count BIGINT, applied_count BIGINT, touched_ids TEXT[],
                 touched_versions BIGINT[])
LANGUAGE plpgsql AS $fn$
DECLARE
    v_stored BIGINT;
    v_first BOOLEAN;
    v_top BIGINT;
    v_req TEXT[];
    v_head TEXT[];
    v_fresh BIGINT;
    v_applied BIGINT;
    d_ord BIGINT[]; d_head TEXT[]; d_at BIGINT[]; d_orders BIGINT[]; d_refunds BIGINT[];
    d_gc TEXT[]; d_g BIGINT[]; d_rc TEXT[]; d_r BIGINT[];
BEGIN
    SELECT f.position INTO v_stored FROM feed_positions f WHERE f.feed = p_feed FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO feed_positions (feed, position, updated_at) VALUES (p_feed, 0, p_now)
        ON CONFLICT (feed) DO NOTHING;
        SELECT f.position INTO v_stored FROM feed_positions f WHERE f.feed = p_feed FOR UPDATE;
    END IF;
    v_first := v_stored = 0;
    SELECT MAX(x) INTO v_top FROM unnest(p_pos) AS x;
    IF v_top IS NULL OR v_top <= v_stored THEN
        RETURN QUERY SELECT 0::BIGINT, 0::BIGINT, '{}'::TEXT[], '{}'::BIGINT[];
        RETURN;
    END IF;

    SELECT array_agg(h.req), array_agg(h.head) INTO v_req, v_head
    FROM prof_lock_heads(ARRAY(SELECT DISTINCT u.p FROM unnest(p_profile, p_pos) AS u(p, pos)
                               WHERE u.pos > v_stored)) h
    WHERE h.erased_at IS NULL;

    WITH heads AS (
        SELECT * FROM unnest(v_req, v_head) AS h(req, head)
    ), keyed AS (
        INSERT INTO applied_deltas (idempotency_key, profile_id, applied_at)
        SELECT u.k, u.p, p_now FROM unnest(p_key, p_profile, p_pos) AS u(k, p, pos)
        WHERE v_first AND u.pos > v_stored
        ON CONFLICT DO NOTHING
        RETURNING idempotency_key
    ), fresh AS (
        SELECT u.ord, u.p, u.at, u.orders, u.refunds, u.gc, u.g, u.rc, u.r
        FROM unnest(p_key, p_profile, p_at, p_orders, p_refunds, p_gross_cur, p_gross,
                    p_ref_cur, p_ref, p_pos) WITH ORDINALITY
             AS u(k, p, at, orders, refunds, gc, g, rc, r, pos, ord)
        WHERE u.pos > v_stored
          AND (NOT v_first OR u.k IN (SELECT keyed.idempotency_key FROM keyed))
    ), d AS (
        SELECT f.ord, h.head, f.at, f.orders, f.refunds, f.gc, f.g, f.rc, f.r
        FROM fresh f JOIN heads h ON h.req = f.p
    )
    SELECT (SELECT COUNT(*) FROM fresh), COUNT(*),
           array_agg(d.ord), array_agg(d.head), array_agg(d.at), array_agg(d.orders),
           array_agg(d.refunds), array_agg(d.gc), array_agg(d.g), array_agg(d.rc),
           array_agg(d.r)
    INTO v_fresh, v_applied, d_ord, d_head, d_at, d_orders, d_refunds, d_gc, d_g, d_rc, d_r
    FROM d;

    UPDATE feed_positions SET position = v_top, updated_at = p_now WHERE feed = p_feed;
    RETURN QUERY
    SELECT v_fresh, v_applied, f.touched_ids, f.touched_versions
    FROM prof_fold_deltas(p_changes_lock, p_updated_kind, p_now, d_ord, d_head, d_at,
                          d_orders, d_refunds, d_gc, d_g, d_rc, d_r,
                          p_eng_delta, p_eng_kind, p_eng_n) f;
END
$fn$;
