-- OfferService schema (SQLite). Times are microseconds since the Unix epoch (BIGINT) and
-- ids are TEXT, so the same store code runs on PostgreSQL and SQLite.

-- The points ledger: append-only, one row per entry, numbered 0, 1, 2, ... per profile.
-- `UNIQUE (profile_id, seq)` makes two concurrent writers of one ledger conflict even if the
-- per-profile advisory lock were bypassed. `body` is the JSON of the domain LedgerEntry, from
-- which the ledger is replayed; the other columns serve queries and the API.
CREATE TABLE ledger_entries (
    profile_id      TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    entry_id        TEXT NOT NULL UNIQUE,
    idem_key        TEXT NOT NULL,
    kind            BIGINT NOT NULL,
    points          BIGINT NOT NULL,
    balance_after   BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    order_id        TEXT NOT NULL DEFAULT '',
    meta            TEXT NOT NULL,
    body            TEXT NOT NULL,
    PRIMARY KEY (profile_id, seq)
);
CREATE INDEX ledger_entries_key ON ledger_entries (profile_id, idem_key);

-- Feed cursors of the consumers, advanced in the same transaction as the writes they cause.
CREATE TABLE consumer_cursors (
    consumer   TEXT PRIMARY KEY,
    cursor     TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The catalogue. `body` is the hex of the protobuf-encoded Offer without output-only fields;
-- counters and the budget limits live in columns so issuance can book the budget with one
-- conditional UPDATE.
CREATE TABLE offers (
    offer_id       TEXT PRIMARY KEY,
    body           TEXT NOT NULL,
    status         BIGINT NOT NULL,
    version        BIGINT NOT NULL,
    issued_count   BIGINT NOT NULL DEFAULT 0,
    redeemed_count BIGINT NOT NULL DEFAULT 0,
    cost_booked    BIGINT NOT NULL DEFAULT 0,
    max_issued     BIGINT,
    max_cost       BIGINT,
    cost_per_issue BIGINT NOT NULL DEFAULT 0,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);

-- Issued codes. `idem_key` is unique: a retried IssueOffer finds its original row.
CREATE TABLE issued_offers (
    issue_id        TEXT PRIMARY KEY,
    code            TEXT NOT NULL UNIQUE,
    offer_id        TEXT NOT NULL REFERENCES offers (offer_id),
    offer_version   BIGINT NOT NULL,
    profile_id      TEXT NOT NULL,
    status          BIGINT NOT NULL,
    idem_key        TEXT NOT NULL UNIQUE,
    fingerprint     TEXT NOT NULL,
    cost            BIGINT NOT NULL,
    issued_at       BIGINT NOT NULL,
    valid_until     BIGINT NOT NULL,
    redeem_key      TEXT,
    redeem_order_id TEXT,
    body            TEXT NOT NULL
);
CREATE INDEX issued_offers_profile ON issued_offers (profile_id, issued_at);
CREATE INDEX issued_offers_offer ON issued_offers (offer_id, status);

-- Triggers and what fired them: (trigger_id, source_key) records each membership change or
-- event at most once.
CREATE TABLE triggers (
    trigger_id    TEXT PRIMARY KEY,
    offer_id      TEXT NOT NULL,
    body          TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    issued_count  BIGINT NOT NULL DEFAULT 0,
    skipped_count BIGINT NOT NULL DEFAULT 0,
    deleted       BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE trigger_firings (
    trigger_id TEXT NOT NULL,
    source_key TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    issue_id   TEXT,
    fired_at   BIGINT NOT NULL,
    PRIMARY KEY (trigger_id, source_key)
);
