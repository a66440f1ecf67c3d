-- Engagement counters of the built-in behaviour kinds move from `engagement` rows into the
-- profile row (one BIGINT column each, `eng_<kind>`), as in the PostgreSQL migration 0004: the
-- fold writes one row per profile instead of one more per (profile, kind). Other engagement
-- names stay in `engagement`. The list is `ROW_ENGAGEMENT` in src/row_engagement.rs.
ALTER TABLE profiles ADD COLUMN eng_product_viewed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN eng_cart_updated BIGINT NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN eng_cart_abandoned BIGINT NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN eng_searched BIGINT NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN eng_page_viewed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN eng_screen_viewed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN eng_app_opened BIGINT NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN eng_email_opened BIGINT NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN eng_email_clicked BIGINT NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN eng_push_clicked BIGINT NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN eng_review_submitted BIGINT NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN eng_survey_responded BIGINT NOT NULL DEFAULT 0;
ALTER TABLE profiles ADD COLUMN eng_custom BIGINT NOT NULL DEFAULT 0;

UPDATE profiles SET
    eng_product_viewed = COALESCE((SELECT SUM(e.count) FROM engagement e
        WHERE e.profile_id = profiles.id AND e.kind = 'product_viewed'), 0),
    eng_cart_updated = COALESCE((SELECT SUM(e.count) FROM engagement e
        WHERE e.profile_id = profiles.id AND e.kind = 'cart_updated'), 0),
    eng_cart_abandoned = COALESCE((SELECT SUM(e.count) FROM engagement e
        WHERE e.profile_id = profiles.id AND e.kind = 'cart_abandoned'), 0),
    eng_searched = COALESCE((SELECT SUM(e.count) FROM engagement e
        WHERE e.profile_id = profiles.id AND e.kind = 'searched'), 0),
    eng_page_viewed = COALESCE((SELECT SUM(e.count) FROM engagement e
        WHERE e.profile_id = profiles.id AND e.kind = 'page_viewed'), 0),
    eng_screen_viewed = COALESCE((SELECT SUM(e.count) FROM engagement e
        WHERE e.profile_id = profiles.id AND e.kind = 'screen_viewed'), 0),
    eng_app_opened = COALESCE((SELECT SUM(e.count) FROM engagement e
        WHERE e.profile_id = profiles.id AND e.kind = 'app_opened'), 0),
    eng_email_opened = COALESCE((SELECT SUM(e.count) FROM engagement e
        WHERE e.profile_id = profiles.id AND e.kind = 'email_opened'), 0),
    eng_email_clicked = COALESCE((SELECT SUM(e.count) FROM engagement e
        WHERE e.profile_id = profiles.id AND e.kind = 'email_clicked'), 0),
    eng_push_clicked = COALESCE((SELECT SUM(e.count) FROM engagement e
        WHERE e.profile_id = profiles.id AND e.kind = 'push_clicked'), 0),
    eng_review_submitted = COALESCE((SELECT SUM(e.count) FROM engagement e
        WHERE e.profile_id = profiles.id AND e.kind = 'review_submitted'), 0),
    eng_survey_responded = COALESCE((SELECT SUM(e.count) FROM engagement e
        WHERE e.profile_id = profiles.id AND e.kind = 'survey_responded'), 0),
    eng_custom = COALESCE((SELECT SUM(e.count) FROM engagement e
        WHERE e.profile_id = profiles.id AND e.kind = 'custom'), 0)
WHERE id IN (SELECT profile_id FROM engagement WHERE kind IN ('product_viewed', 'cart_updated', 'cart_abandoned', 'searched', 'page_viewed', 'screen_viewed', 'app_opened', 'email_opened', 'email_clicked', 'push_clicked', 'review_submitted', 'survey_responded', 'custom'));
DELETE FROM engagement WHERE kind IN ('product_viewed', 'cart_updated', 'cart_abandoned', 'searched', 'page_viewed', 'screen_viewed', 'app_opened', 'email_opened', 'email_clicked', 'push_clicked', 'review_submitted', 'survey_responded', 'custom');
