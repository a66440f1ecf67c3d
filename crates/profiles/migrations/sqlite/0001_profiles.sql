-- ProfileService schema (SQLite). Times are microseconds since the Unix epoch (BIGINT) and
-- ids are UUID text, so the same store code runs on PostgreSQL and SQLite.
CREATE TABLE profiles (
    id             TEXT PRIMARY KEY,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    version        BIGINT NOT NULL,
    merged_into    TEXT,
    erased_at      BIGINT,
    first_order_at BIGINT,
    last_order_at  BIGINT,
    last_seen_at   BIGINT,
    order_count    BIGINT NOT NULL DEFAULT 0,
    refund_count   BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX profiles_merged_into ON profiles (merged_into) WHERE merged_into IS NOT NULL;

CREATE TABLE identifiers (
    id_type       BIGINT NOT NULL,
    namespace     TEXT NOT NULL,
    stored_value  TEXT NOT NULL,
    profile_id    TEXT NOT NULL,
    first_seen_at BIGINT NOT NULL,
    links         BIGINT NOT NULL DEFAULT 1,
    PRIMARY KEY (id_type, namespace, stored_value)
);
CREATE INDEX identifiers_profile ON identifiers (profile_id);

CREATE TABLE traits (
    profile_id TEXT NOT NULL,
    name       TEXT NOT NULL,
    value      TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (profile_id, name)
);

CREATE TABLE consents (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    profile_id TEXT NOT NULL,
    purpose    BIGINT NOT NULL,
    status     BIGINT NOT NULL,
    decided_at BIGINT NOT NULL,
    source     TEXT NOT NULL
);
CREATE INDEX consents_profile ON consents (profile_id, purpose, decided_at);

CREATE TABLE spend (
    profile_id     TEXT NOT NULL,
    currency       TEXT NOT NULL,
    gross_minor    BIGINT NOT NULL DEFAULT 0,
    refunded_minor BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (profile_id, currency)
);

CREATE TABLE engagement (
    profile_id TEXT NOT NULL,
    kind       TEXT NOT NULL,
    count      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (profile_id, kind)
);

CREATE TABLE applied_deltas (
    idempotency_key TEXT PRIMARY KEY,
    profile_id      TEXT NOT NULL,
    applied_at      BIGINT NOT NULL
);

CREATE TABLE merges (
    survivor_id   TEXT NOT NULL,
    merged_id     TEXT NOT NULL,
    via_type      BIGINT NOT NULL,
    via_namespace TEXT NOT NULL,
    via_value     TEXT NOT NULL,
    merged_at     BIGINT NOT NULL
);
CREATE INDEX merges_survivor ON merges (survivor_id);

CREATE TABLE tombstones (
    id_type    BIGINT NOT NULL,
    namespace  TEXT NOT NULL,
    value_hash TEXT NOT NULL,
    erased_at  BIGINT NOT NULL,
    reason     TEXT NOT NULL,
    PRIMARY KEY (id_type, namespace, value_hash)
);

CREATE TABLE changes (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    profile_id   TEXT NOT NULL,
    kind         BIGINT NOT NULL,
    merged_ids   TEXT NOT NULL,
    changed_at   BIGINT NOT NULL
);
