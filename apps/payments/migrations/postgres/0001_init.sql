-- The payments schema on Postgres. Applied once, in order, by
-- PgStore::open (see schema_migrations), under an advisory lock so nodes
-- starting together take turns.
CREATE TABLE payments (
    id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    amount BIGINT NOT NULL,
    currency TEXT NOT NULL,
    reference TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    body BYTEA NOT NULL
);
CREATE TABLE idempotency_keys (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    response BYTEA NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE settled (
    id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL
);
-- lease_owner / lease_until: the process running an async batch, and until
-- when (ms since the epoch); past it any node's sweeper may claim it.
CREATE TABLE batches (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    total BIGINT NOT NULL,
    processed BIGINT NOT NULL,
    result TEXT,
    lease_owner TEXT,
    lease_until BIGINT NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE INDEX batches_pending ON batches (status, lease_until);
CREATE TABLE batch_bodies (
    id TEXT PRIMARY KEY REFERENCES batches (id),
    body BYTEA NOT NULL
);
