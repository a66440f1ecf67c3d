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
