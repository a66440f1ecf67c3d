-- Order activity per profile: net spend in the programme's spend currency (tiers that qualify
-- by spend) and the points each order earned (per-period earning caps). Keyed like the ledger
-- (`order:<id>`, `refund:<source>/<event_id>`), so each order or refund counts once.
CREATE TABLE earn_activity (
    profile_id   TEXT NOT NULL,
    activity_key TEXT NOT NULL,
    occurred_at  BIGINT NOT NULL,
    spend_minor  BIGINT NOT NULL,
    points       BIGINT NOT NULL,
    PRIMARY KEY (profile_id, activity_key)
);

-- Profiles erased through ProfileService (random UUIDs, no personal data): feed events about
-- them that arrive after the erasure are skipped, so nothing is recreated for them.
CREATE TABLE erased_profiles (
    profile_id TEXT PRIMARY KEY,
    erased_at  BIGINT NOT NULL
);
