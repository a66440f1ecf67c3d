-- SegmentationService schema. Times are BIGINT µs since the Unix epoch; ids are TEXT;
-- money is BIGINT minor units of the reporting currency.

-- Feed positions, advanced in the same transaction as the fold they cover (exactly once).
CREATE TABLE seg_feed_cursors (
    feed   TEXT PRIMARY KEY,
    cursor TEXT NOT NULL
);

-- Every profile the service knows (from events or profile changes); erased ones are deleted.
CREATE TABLE seg_profiles (
    profile_id TEXT PRIMARY KEY,
    first_seen BIGINT NOT NULL
);

-- Merged-away ids and their survivor, so late events of a merged id land on the survivor.
CREATE TABLE seg_aliases (
    merged_id   TEXT PRIMARY KEY,
    survivor_id TEXT NOT NULL
);

-- Completed orders, first event per (profile, order id) wins. amount_minor is converted to the
-- reporting currency (0 with converted = 0 when no rate is configured).
CREATE TABLE seg_orders (
    profile_id     TEXT NOT NULL,
    order_id       TEXT NOT NULL,
    placed_at      BIGINT NOT NULL,
    amount_minor   BIGINT NOT NULL,
    discount_minor BIGINT NOT NULL,
    converted      BIGINT NOT NULL,
    PRIMARY KEY (profile_id, order_id)
);

-- Category spend per order (top-level category), reporting currency.
CREATE TABLE seg_order_lines (
    profile_id   TEXT NOT NULL,
    order_id     TEXT NOT NULL,
    category     TEXT NOT NULL,
    amount_minor BIGINT NOT NULL,
    PRIMARY KEY (profile_id, order_id, category)
);

-- Refunds by event (one row per refund event), joined to orders when features are built, so
-- a refund that arrives before its order still applies.
CREATE TABLE seg_refunds (
    profile_id   TEXT NOT NULL,
    refund_key   TEXT NOT NULL,
    order_id     TEXT NOT NULL,
    amount_minor BIGINT NOT NULL,
    full_refund  BIGINT NOT NULL,
    PRIMARY KEY (profile_id, refund_key)
);

-- Engagement counters per profile, UTC day and kind.
CREATE TABLE seg_engagement (
    profile_id TEXT NOT NULL,
    day        BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    n          BIGINT NOT NULL,
    PRIMARY KEY (profile_id, day, kind)
);

CREATE TABLE seg_segments (
    segment_id  TEXT PRIMARY KEY,
    definition  TEXT NOT NULL,
    kind        BIGINT NOT NULL,
    version     BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    deleted     BIGINT NOT NULL,
    last_run_id TEXT NOT NULL
);

CREATE TABLE seg_runs (
    run_id          TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    requested_by    TEXT NOT NULL,
    state           BIGINT NOT NULL,
    phase           BIGINT NOT NULL,
    processed       BIGINT NOT NULL,
    total           BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    start_time      BIGINT,
    finish_time     BIGINT,
    error_message   TEXT NOT NULL,
    data_as_of      BIGINT,
    outputs         TEXT NOT NULL,
    changes_cursor  TEXT NOT NULL,
    model           TEXT NOT NULL
);
CREATE INDEX seg_runs_by_created ON seg_runs (created_at);

-- Per-run score snapshot (retained runs only).
CREATE TABLE seg_run_scores (
    run_id          TEXT NOT NULL,
    profile_id      TEXT NOT NULL,
    r               BIGINT,
    f               BIGINT,
    m               BIGINT,
    rfm_name        TEXT,
    recency_days    DOUBLE PRECISION,
    frequency       BIGINT,
    monetary_minor  BIGINT,
    lifecycle       BIGINT,
    lifecycle_since BIGINT,
    clv             DOUBLE PRECISION,
    p_alive         DOUBLE PRECISION,
    exp_purchases   DOUBLE PRECISION,
    exp_aov         DOUBLE PRECISION,
    PRIMARY KEY (run_id, profile_id)
);

-- Per-run membership snapshot (retained runs only); cluster_index -1 for non-CLUSTER segments.
CREATE TABLE seg_run_members (
    run_id        TEXT NOT NULL,
    segment_id    TEXT NOT NULL,
    profile_id    TEXT NOT NULL,
    cluster_index BIGINT NOT NULL,
    PRIMARY KEY (run_id, segment_id, profile_id)
);

-- Real-time scores newer than the latest run (ScoreProfile, new orders); a run clears them.
CREATE TABLE seg_scores (
    profile_id      TEXT PRIMARY KEY,
    run_id          TEXT NOT NULL,
    scored_at       BIGINT NOT NULL,
    r               BIGINT,
    f               BIGINT,
    m               BIGINT,
    rfm_name        TEXT,
    recency_days    DOUBLE PRECISION,
    frequency       BIGINT,
    monetary_minor  BIGINT,
    lifecycle       BIGINT,
    lifecycle_since BIGINT,
    clv             DOUBLE PRECISION,
    p_alive         DOUBLE PRECISION,
    exp_purchases   DOUBLE PRECISION,
    exp_aov         DOUBLE PRECISION
);

-- Current memberships.
CREATE TABLE seg_memberships (
    segment_id    TEXT NOT NULL,
    profile_id    TEXT NOT NULL,
    cluster_index BIGINT NOT NULL,
    distance      DOUBLE PRECISION,
    entered_at    BIGINT NOT NULL,
    PRIMARY KEY (segment_id, profile_id)
);
CREATE INDEX seg_memberships_by_profile ON seg_memberships (profile_id);

-- Membership change log, appended in commit order (writers hold one advisory lock).
CREATE TABLE seg_changes (
    seq           BIGSERIAL PRIMARY KEY,
    change_id     TEXT NOT NULL,
    profile_id    TEXT NOT NULL,
    segment_id    TEXT NOT NULL,
    cluster_index BIGINT NOT NULL,
    change_type   BIGINT NOT NULL,
    reason        BIGINT NOT NULL,
    run_id        TEXT NOT NULL,
    occurred_at   BIGINT NOT NULL
);
