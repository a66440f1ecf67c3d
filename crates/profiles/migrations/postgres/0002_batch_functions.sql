-- Server-side forms of the two calls IngestStream makes per batch (BatchResolve's writing part
-- and ApplyAggregates), so each costs one or two round trips and statements whose plans
-- PostgreSQL caches, with arrays instead of multi-row VALUES lists built per call.
--
-- Locks are the store's (src/store.rs): transaction-scoped advisory locks on
-- hashtextextended(key, 0), taken in hash order in one statement: `i:<type>:<ns>:<value>` for
-- identifiers, `p:<id>` for live profiles, and the changes-feed lock (passed in) taken last,
-- just before the feed rows, so sequence order is commit order.

-- Lookups of a few hundred keys are written as LATERAL primary-key probes (`OFFSET 0` keeps
-- the planner from flattening them into a hash join over the whole table, which it prefers
-- while the tables are small and which grows with them).

-- The survivor of each of `p_ids` (following merge aliases; missing ids are absent):
-- requested id, survivor id, its creation time and erasure.
CREATE FUNCTION prof_heads(p_ids TEXT[])
RETURNS TABLE (req TEXT, head TEXT, created_at BIGINT, erased_at BIGINT)
LANGUAGE sql STABLE AS $fn$
    WITH RECURSIVE c (req, cur, next, created_at, erased_at, depth) AS (
        SELECT r.id, p.id, p.merged_into, p.created_at, p.erased_at, 0
        FROM unnest(p_ids) AS r(id)
        CROSS JOIN LATERAL (SELECT * FROM profiles p WHERE p.id = r.id OFFSET 0) p
        UNION ALL
        SELECT c.req, p.id, p.merged_into, p.created_at, p.erased_at, c.depth + 1
        FROM c
        CROSS JOIN LATERAL (SELECT * FROM profiles p WHERE p.id = c.next OFFSET 0) p
        WHERE c.next IS NOT NULL AND c.depth < 64
    )
    SELECT c.req, c.cur, c.created_at, c.erased_at FROM c WHERE c.next IS NULL
$fn$;

-- Locks the live survivors of `p_ids` (`p:<id>`), re-reading until no merge slipped in between
-- the read and the lock; returns the stable picture (erased survivors included, not locked).
CREATE FUNCTION prof_lock_heads(p_ids TEXT[])
RETURNS TABLE (req TEXT, head TEXT, created_at BIGINT, erased_at BIGINT)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_locked TEXT[] := '{}';
    v_new TEXT[];
    v_req TEXT[];
    v_head TEXT[];
    v_created BIGINT[];
    v_erased BIGINT[];
BEGIN
    LOOP
        SELECT array_agg(h.req), array_agg(h.head), array_agg(h.created_at),
               array_agg(h.erased_at)
        INTO v_req, v_head, v_created, v_erased
        FROM prof_heads(p_ids) h;
        SELECT array_agg(DISTINCT x.h) INTO v_new
        FROM unnest(v_head, v_erased) AS x(h, e)
        WHERE x.e IS NULL AND NOT (x.h = ANY (v_locked));
        EXIT WHEN v_new IS NULL;
        PERFORM COUNT(pg_advisory_xact_lock(s.k))
        FROM (SELECT hashtextextended('p:' || x, 0) AS k FROM unnest(v_new) AS x ORDER BY 1) s;
        v_locked := v_locked || v_new;
    END LOOP;
    RETURN QUERY SELECT * FROM unnest(v_req, v_head, v_created, v_erased);
END
$fn$;

-- The part both ApplyAggregates functions share (this one and 0003's feed version). The deltas that count come as arrays `d_*`
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

-- ApplyAggregates in one call. The deltas come as parallel arrays, one element per delta
-- (keys already unique within the call); engagement increments as (delta ordinal, kind, n).
-- Each key new to applied_deltas is counted once on the live survivor of its profile (a delta
-- for a missing or erased profile is recorded but not counted); every profile counted gets one
-- version step and one changes-feed row. Returns how many keys were new, how many of those
-- were counted, and the profiles written with their new versions (sorted by id).
CREATE FUNCTION prof_apply_aggregates(
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

-- BatchResolve's reads, after its identifier locks: which keys are tombstoned (ordinals into
-- the arrays), the stored owner and link count of each known key, and the stable survivor
-- picture of those owners with the live survivors locked (as prof_lock_heads).
CREATE FUNCTION prof_resolve_read(
    p_lock_keys TEXT[], p_type BIGINT[], p_ns TEXT[], p_value TEXT[], p_hash TEXT[]
) RETURNS TABLE (tombstoned BIGINT[], k_ord BIGINT[], k_owner TEXT[], k_links BIGINT[],
                 h_req TEXT[], h_head TEXT[], h_created BIGINT[], h_erased BIGINT[])
LANGUAGE plpgsql AS $fn$
DECLARE
    v_tomb BIGINT[];
    v_ord BIGINT[];
    v_owner TEXT[];
    v_links BIGINT[];
BEGIN
    PERFORM COUNT(pg_advisory_xact_lock(s.k))
    FROM (SELECT DISTINCT hashtextextended(x, 0) AS k FROM unnest(p_lock_keys) AS x ORDER BY 1) s;
    SELECT array_agg(u.ord) INTO v_tomb
    FROM unnest(p_type, p_ns, p_hash) WITH ORDINALITY AS u(t, n, h, ord)
    WHERE EXISTS (SELECT 1 FROM tombstones ts
                  WHERE ts.id_type = u.t AND ts.namespace = u.n AND ts.value_hash = u.h
                  OFFSET 0);
    SELECT array_agg(u.ord), array_agg(i.profile_id), array_agg(i.links)
    INTO v_ord, v_owner, v_links
    FROM unnest(p_type, p_ns, p_value) WITH ORDINALITY AS u(t, n, v, ord)
    CROSS JOIN LATERAL (SELECT i.profile_id, i.links FROM identifiers i
                        WHERE i.id_type = u.t AND i.namespace = u.n AND i.stored_value = u.v
                        OFFSET 0) i;
    RETURN QUERY
    SELECT COALESCE(v_tomb, '{}'), COALESCE(v_ord, '{}'), COALESCE(v_owner, '{}'),
           COALESCE(v_links, '{}'),
           COALESCE(array_agg(h.req), '{}'), COALESCE(array_agg(h.head), '{}'),
           COALESCE(array_agg(h.created_at), '{}'), COALESCE(array_agg(h.erased_at), '{}')
    FROM prof_lock_heads(ARRAY(SELECT DISTINCT x FROM unnest(v_owner) AS x)) h;
END
$fn$;

-- Merges `p_loser` into `p_survivor` (the store's merge_profiles, same rules): identifiers,
-- traits (most recently set wins, the survivor's on a tie), consent history and merge records
-- move; spend, engagement and counts add up; first order takes the earlier time, last order
-- and last seen the later; the loser and its aliases point at the survivor.
CREATE FUNCTION prof_merge(
    p_loser TEXT, p_survivor TEXT, p_type BIGINT, p_ns TEXT, p_value TEXT, p_now BIGINT
) RETURNS VOID
LANGUAGE plpgsql AS $fn$
BEGIN
    UPDATE identifiers SET profile_id = p_survivor WHERE profile_id = p_loser;
    IF EXISTS (SELECT 1 FROM traits WHERE profile_id = p_loser) THEN
        DELETE FROM traits t WHERE t.profile_id = p_loser AND EXISTS (
            SELECT 1 FROM traits t2 WHERE t2.profile_id = p_survivor AND t2.name = t.name
            AND t2.updated_at >= t.updated_at);
        DELETE FROM traits t WHERE t.profile_id = p_survivor AND EXISTS (
            SELECT 1 FROM traits t2 WHERE t2.profile_id = p_loser AND t2.name = t.name);
        UPDATE traits SET profile_id = p_survivor WHERE profile_id = p_loser;
    END IF;
    UPDATE consents SET profile_id = p_survivor WHERE profile_id = p_loser;
    WITH moved AS (
        DELETE FROM spend WHERE profile_id = p_loser
        RETURNING currency, gross_minor, refunded_minor
    )
    INSERT INTO spend AS s (profile_id, currency, gross_minor, refunded_minor)
    SELECT p_survivor, m.currency, m.gross_minor, m.refunded_minor FROM moved m
    ON CONFLICT (profile_id, currency) DO UPDATE SET
        gross_minor = s.gross_minor + excluded.gross_minor,
        refunded_minor = s.refunded_minor + excluded.refunded_minor;
    WITH moved AS (
        DELETE FROM engagement WHERE profile_id = p_loser RETURNING kind, count
    )
    INSERT INTO engagement AS e (profile_id, kind, count)
    SELECT p_survivor, m.kind, m.count FROM moved m
    ON CONFLICT (profile_id, kind) DO UPDATE SET count = e.count + excluded.count;
    UPDATE profiles SET order_count = profiles.order_count + l.order_count,
        refund_count = profiles.refund_count + l.refund_count,
        first_order_at = CASE WHEN l.first_order_at IS NULL THEN profiles.first_order_at
            WHEN profiles.first_order_at IS NULL OR l.first_order_at < profiles.first_order_at
            THEN l.first_order_at ELSE profiles.first_order_at END,
        last_order_at = CASE WHEN l.last_order_at IS NULL THEN profiles.last_order_at
            WHEN profiles.last_order_at IS NULL OR l.last_order_at > profiles.last_order_at
            THEN l.last_order_at ELSE profiles.last_order_at END,
        last_seen_at = CASE WHEN l.last_seen_at IS NULL THEN profiles.last_seen_at
            WHEN profiles.last_seen_at IS NULL OR l.last_seen_at > profiles.last_seen_at
            THEN l.last_seen_at ELSE profiles.last_seen_at END
    FROM (SELECT order_count, refund_count, first_order_at, last_order_at, last_seen_at
          FROM profiles WHERE id = p_loser) AS l
    WHERE profiles.id = p_survivor;
    UPDATE profiles SET merged_into = p_survivor, updated_at = p_now, version = version + 1,
        order_count = 0, refund_count = 0
    WHERE id = p_loser OR merged_into = p_loser;
    UPDATE merges SET survivor_id = p_survivor WHERE survivor_id = p_loser;
    INSERT INTO merges (survivor_id, merged_id, via_type, via_namespace, via_value, merged_at)
    VALUES (p_survivor, p_loser, p_type, p_ns, p_value, p_now);
END
$fn$;

-- BatchResolve's writes, in the order the store's generic path makes them: new profiles, the
-- merges in plan order, identifiers attached (to the profile they end on), link counts, one
-- version step per set that wrote, then the changes-feed rows in set order. Returns the new
-- version of each stepped profile.
CREATE FUNCTION prof_resolve_write(
    p_changes_lock BIGINT, p_now BIGINT,
    p_new TEXT[],
    p_m_loser TEXT[], p_m_survivor TEXT[], p_m_type BIGINT[], p_m_ns TEXT[], p_m_value TEXT[],
    p_a_type BIGINT[], p_a_ns TEXT[], p_a_value TEXT[], p_a_profile TEXT[],
    p_b_type BIGINT[], p_b_ns TEXT[], p_b_value TEXT[], p_b_count BIGINT[],
    p_s_id TEXT[], p_s_count BIGINT[],
    p_c_profile TEXT[], p_c_kind BIGINT[], p_c_merged TEXT[]
) RETURNS TABLE (stepped_id TEXT, stepped_version BIGINT)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_ids TEXT[];
    v_versions BIGINT[];
BEGIN
    INSERT INTO profiles (id, created_at, updated_at, version)
    SELECT x, p_now, p_now, 0 FROM unnest(p_new) AS x;
    FOR i IN 1 .. COALESCE(array_length(p_m_loser, 1), 0) LOOP
        PERFORM prof_merge(p_m_loser[i], p_m_survivor[i], p_m_type[i], p_m_ns[i],
                           p_m_value[i], p_now);
    END LOOP;
    INSERT INTO identifiers (id_type, namespace, stored_value, profile_id, first_seen_at, links)
    SELECT u.t, u.n, u.v, u.p, p_now, 1
    FROM unnest(p_a_type, p_a_ns, p_a_value, p_a_profile) AS u(t, n, v, p)
    ON CONFLICT DO NOTHING;
    UPDATE identifiers i SET links = i.links + u.c
    FROM unnest(p_b_type, p_b_ns, p_b_value, p_b_count) AS u(t, n, v, c)
    WHERE i.id_type = u.t AND i.namespace = u.n AND i.stored_value = u.v;
    WITH stepped AS (
        UPDATE profiles p SET version = p.version + u.c, updated_at = p_now
        FROM unnest(p_s_id, p_s_count) AS u(id, c)
        WHERE p.id = u.id
        RETURNING p.id, p.version
    )
    SELECT array_agg(stepped.id), array_agg(stepped.version) INTO v_ids, v_versions
    FROM stepped;
    IF COALESCE(array_length(p_c_profile, 1), 0) > 0 THEN
        PERFORM pg_advisory_xact_lock(p_changes_lock);
        INSERT INTO changes (profile_id, kind, merged_ids, changed_at)
        SELECT u.p, u.k, u.m, p_now
        FROM unnest(p_c_profile, p_c_kind, p_c_merged) WITH ORDINALITY AS u(p, k, m, ord)
        ORDER BY u.ord;
    END IF;
    RETURN QUERY SELECT * FROM unnest(COALESCE(v_ids, '{}'), COALESCE(v_versions, '{}'));
END
$fn$;
