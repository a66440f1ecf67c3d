-- Profiles merged into another through ProfileService (loser -> survivor, random UUIDs): the
-- loser's ledger, activity and issued offers moved to the survivor in the merge transaction;
-- feed events still naming the loser are applied to the survivor, and erasing the survivor
-- erases the loser too.
CREATE TABLE merged_profiles (
    loser_id    TEXT PRIMARY KEY,
    survivor_id TEXT NOT NULL,
    merged_at   BIGINT NOT NULL
);
CREATE INDEX merged_profiles_survivor ON merged_profiles (survivor_id);
