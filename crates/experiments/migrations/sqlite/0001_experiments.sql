-- ExperimentService schema (SQLite). Times are microseconds since the Unix epoch (BIGINT)
-- and ids are TEXT, so the same store code runs on PostgreSQL and SQLite.

-- One row per experiment. `definition` is the hex of the protobuf-encoded configuration
-- (clientele.v1.Experiment without output-only fields); lifecycle columns are authoritative.
CREATE TABLE experiments (
    key              TEXT PRIMARY KEY,
    definition       TEXT NOT NULL,
    status           BIGINT NOT NULL,
    version          BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    start_time       BIGINT,
    stop_time        BIGINT,
    released_variant BIGINT,
    stop_reason      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX experiments_status ON experiments (status, key);

-- Metrics are shared across experiments by key: the first definition fixes type, currency
-- and source, so RecordConversion can check a value's currency once for all experiments.
CREATE TABLE metric_defs (
    metric_key    TEXT PRIMARY KEY,
    metric_type   BIGINT NOT NULL,
    currency      TEXT NOT NULL,
    event_derived BIGINT NOT NULL,
    defined_by    TEXT NOT NULL
);

-- First exposure of each unit to each experiment: written once, never updated (sticky).
CREATE TABLE exposures (
    experiment_key   TEXT NOT NULL,
    unit_id          TEXT NOT NULL,
    variant_index    BIGINT NOT NULL,
    exposed_at       BIGINT NOT NULL,
    profile_id       TEXT NOT NULL,
    pre_period_value DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (experiment_key, unit_id)
);

-- Conversions, exactly once per idempotency key; `fingerprint` is the canonical request
-- used to tell a replay from a conflicting reuse of the key.
CREATE TABLE conversions (
    idempotency_key TEXT PRIMARY KEY,
    metric_key      TEXT NOT NULL,
    occurred_at     BIGINT NOT NULL,
    value_minor     BIGINT NOT NULL,
    currency        TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    recorded_at     BIGINT NOT NULL
);
CREATE INDEX conversions_metric ON conversions (metric_key, occurred_at);

-- The unit ids (by hash attribute) a conversion belongs to.
CREATE TABLE conversion_units (
    idempotency_key TEXT NOT NULL,
    attribute       TEXT NOT NULL,
    unit_id         TEXT NOT NULL,
    PRIMARY KEY (idempotency_key, attribute)
);
CREATE INDEX conversion_units_unit ON conversion_units (attribute, unit_id);
