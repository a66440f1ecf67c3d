-- Engagement counters of the built-in behaviour kinds move from `engagement` rows into the
-- profile row (one BIGINT column each, `eng_<kind>`). The fold that ApplyAggregates runs for
-- every page of deltas then writes one row per profile instead of one profile row plus one
-- engagement row per (profile, kind): in the ingest bench that was 0.47 engagement rows and
-- index entries per event. The profile row stays HOT-updatable (no index covers the counters).
-- Other engagement names (ApplyAggregates accepts any [a-z0-9_.] name) stay in `engagement`.
-- The list is `ROW_ENGAGEMENT` in src/row_engagement.rs; the two must agree.
ALTER TABLE profiles
    ADD COLUMN eng_product_viewed BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN eng_cart_updated BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN eng_cart_abandoned BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN eng_searched BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN eng_page_viewed BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN eng_screen_viewed BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN eng_app_opened BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN eng_email_opened BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN eng_email_clicked BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN eng_push_clicked BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN eng_review_submitted BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN eng_survey_responded BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN eng_custom BIGINT NOT NULL DEFAULT 0;

-- Existing counters move into their profile's row.
UPDATE profiles p SET
    eng_product_viewed = e.product_viewed,
    eng_cart_updated = e.cart_updated,
    eng_cart_abandoned = e.cart_abandoned,
    eng_searched = e.searched,
    eng_page_viewed = e.page_viewed,
    eng_screen_viewed = e.screen_viewed,
    eng_app_opened = e.app_opened,
    eng_email_opened = e.email_opened,
    eng_email_clicked = e.email_clicked,
    eng_push_clicked = e.push_clicked,
    eng_review_submitted = e.review_submitted,
    eng_survey_responded = e.survey_responded,
    eng_custom = e.custom
FROM (SELECT profile_id,
        COALESCE(SUM(count) FILTER (WHERE kind = 'product_viewed'), 0) AS product_viewed,
        COALESCE(SUM(count) FILTER (WHERE kind = 'cart_updated'), 0) AS cart_updated,
        COALESCE(SUM(count) FILTER (WHERE kind = 'cart_abandoned'), 0) AS cart_abandoned,
        COALESCE(SUM(count) FILTER (WHERE kind = 'searched'), 0) AS searched,
        COALESCE(SUM(count) FILTER (WHERE kind = 'page_viewed'), 0) AS page_viewed,
        COALESCE(SUM(count) FILTER (WHERE kind = 'screen_viewed'), 0) AS screen_viewed,
        COALESCE(SUM(count) FILTER (WHERE kind = 'app_opened'), 0) AS app_opened,
        COALESCE(SUM(count) FILTER (WHERE kind = 'email_opened'), 0) AS email_opened,
        COALESCE(SUM(count) FILTER (WHERE kind = 'email_clicked'), 0) AS email_clicked,
        COALESCE(SUM(count) FILTER (WHERE kind = 'push_clicked'), 0) AS push_clicked,
        COALESCE(SUM(count) FILTER (WHERE kind = 'review_submitted'), 0) AS review_submitted,
        COALESCE(SUM(count) FILTER (WHERE kind = 'survey_responded'), 0) AS survey_responded,
        COALESCE(SUM(count) FILTER (WHERE kind = 'custom'), 0) AS custom
      FROM engagement WHERE kind IN ('product_viewed', 'cart_updated', 'cart_abandoned', 'searched', 'page_viewed', 'screen_viewed', 'app_opened', 'email_opened', 'email_clicked', 'push_clicked', 'review_submitted', 'survey_responded', 'custom')
      GROUP BY profile_id) e
WHERE p.id = e.profile_id;
DELETE FROM engagement WHERE kind IN ('product_viewed', 'cart_updated', 'cart_abandoned', 'searched', 'page_viewed', 'screen_viewed', 'app_opened', 'email_opened', 'email_clicked', 'push_clicked', 'review_submitted', 'survey_responded', 'custom');

-- 0002's fold with the row counters: the built-in kinds' increments are summed per profile
-- into the profile row's update; only other names are upserted into `engagement`.
CREATE OR REPLACE FUNCTION prof_fold_deltas(
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
    ), x AS (
        SELECT d.head, e.kind, e.n
        FROM unnest(p_eng_delta, p_eng_kind, p_eng_n) AS e(ord, kind, n)
        JOIN d ON d.ord = e.ord
    ), ec AS (
        SELECT x.head,
               COALESCE(SUM(x.n) FILTER (WHERE x.kind = 'product_viewed'), 0)::BIGINT AS product_viewed,
               COALESCE(SUM(x.n) FILTER (WHERE x.kind = 'cart_updated'), 0)::BIGINT AS cart_updated,
               COALESCE(SUM(x.n) FILTER (WHERE x.kind = 'cart_abandoned'), 0)::BIGINT AS cart_abandoned,
               COALESCE(SUM(x.n) FILTER (WHERE x.kind = 'searched'), 0)::BIGINT AS searched,
               COALESCE(SUM(x.n) FILTER (WHERE x.kind = 'page_viewed'), 0)::BIGINT AS page_viewed,
               COALESCE(SUM(x.n) FILTER (WHERE x.kind = 'screen_viewed'), 0)::BIGINT AS screen_viewed,
               COALESCE(SUM(x.n) FILTER (WHERE x.kind = 'app_opened'), 0)::BIGINT AS app_opened,
               COALESCE(SUM(x.n) FILTER (WHERE x.kind = 'email_opened'), 0)::BIGINT AS email_opened,
               COALESCE(SUM(x.n) FILTER (WHERE x.kind = 'email_clicked'), 0)::BIGINT AS email_clicked,
               COALESCE(SUM(x.n) FILTER (WHERE x.kind = 'push_clicked'), 0)::BIGINT AS push_clicked,
               COALESCE(SUM(x.n) FILTER (WHERE x.kind = 'review_submitted'), 0)::BIGINT AS review_submitted,
               COALESCE(SUM(x.n) FILTER (WHERE x.kind = 'survey_responded'), 0)::BIGINT AS survey_responded,
               COALESCE(SUM(x.n) FILTER (WHERE x.kind = 'custom'), 0)::BIGINT AS custom
        FROM x GROUP BY x.head
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
            eng_product_viewed = p.eng_product_viewed + COALESCE(ec.product_viewed, 0),
            eng_cart_updated = p.eng_cart_updated + COALESCE(ec.cart_updated, 0),
            eng_cart_abandoned = p.eng_cart_abandoned + COALESCE(ec.cart_abandoned, 0),
            eng_searched = p.eng_searched + COALESCE(ec.searched, 0),
            eng_page_viewed = p.eng_page_viewed + COALESCE(ec.page_viewed, 0),
            eng_screen_viewed = p.eng_screen_viewed + COALESCE(ec.screen_viewed, 0),
            eng_app_opened = p.eng_app_opened + COALESCE(ec.app_opened, 0),
            eng_email_opened = p.eng_email_opened + COALESCE(ec.email_opened, 0),
            eng_email_clicked = p.eng_email_clicked + COALESCE(ec.email_clicked, 0),
            eng_push_clicked = p.eng_push_clicked + COALESCE(ec.push_clicked, 0),
            eng_review_submitted = p.eng_review_submitted + COALESCE(ec.review_submitted, 0),
            eng_survey_responded = p.eng_survey_responded + COALESCE(ec.survey_responded, 0),
            eng_custom = p.eng_custom + COALESCE(ec.custom, 0),
            version = p.version + 1,
            updated_at = p_now
        FROM fold f LEFT JOIN ec ON ec.head = f.head
        WHERE p.id = f.head
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
        SELECT x.head, x.kind, SUM(x.n)::BIGINT
        FROM x WHERE x.kind NOT IN ('product_viewed', 'cart_updated', 'cart_abandoned', 'searched', 'page_viewed', 'screen_viewed', 'app_opened', 'email_opened', 'email_clicked', 'push_clicked', 'review_submitted', 'survey_responded', 'custom')
        GROUP BY x.head, x.kind
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

-- 0002's merge with the row counters: the loser's are added to the survivor's and zeroed.
CREATE OR REPLACE FUNCTION prof_merge(
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
            THEN l.last_seen_at ELSE profiles.last_seen_at END,
        eng_product_viewed = profiles.eng_product_viewed + l.eng_product_viewed,
        eng_cart_updated = profiles.eng_cart_updated + l.eng_cart_updated,
        eng_cart_abandoned = profiles.eng_cart_abandoned + l.eng_cart_abandoned,
        eng_searched = profiles.eng_searched + l.eng_searched,
        eng_page_viewed = profiles.eng_page_viewed + l.eng_page_viewed,
        eng_screen_viewed = profiles.eng_screen_viewed + l.eng_screen_viewed,
        eng_app_opened = profiles.eng_app_opened + l.eng_app_opened,
        eng_email_opened = profiles.eng_email_opened + l.eng_email_opened,
        eng_email_clicked = profiles.eng_email_clicked + l.eng_email_clicked,
        eng_push_clicked = profiles.eng_push_clicked + l.eng_push_clicked,
        eng_review_submitted = profiles.eng_review_submitted + l.eng_review_submitted,
        eng_survey_responded = profiles.eng_survey_responded + l.eng_survey_responded,
        eng_custom = profiles.eng_custom + l.eng_custom
    FROM (SELECT * FROM profiles WHERE id = p_loser) AS l
    WHERE profiles.id = p_survivor;
    UPDATE profiles SET merged_into = p_survivor, updated_at = p_now, version = version + 1,
        order_count = 0, refund_count = 0,
        eng_product_viewed = 0,
        eng_cart_updated = 0,
        eng_cart_abandoned = 0,
        eng_searched = 0,
        eng_page_viewed = 0,
        eng_screen_viewed = 0,
        eng_app_opened = 0,
        eng_email_opened = 0,
        eng_email_clicked = 0,
        eng_push_clicked = 0,
        eng_review_submitted = 0,
        eng_survey_responded = 0,
        eng_custom = 0
    WHERE id = p_loser OR merged_into = p_loser;
    UPDATE merges SET survivor_id = p_survivor WHERE survivor_id = p_loser;
    INSERT INTO merges (survivor_id, merged_id, via_type, via_namespace, via_value, merged_at)
    VALUES (p_survivor, p_loser, p_type, p_ns, p_value, p_now);
END
$fn$;
