-- edp schema, version 1 (SQLite).
-- Times are seconds since the epoch (UTC), as REAL.

CREATE TABLE prefixes (
    bucket          TEXT NOT NULL,
    prefix          TEXT NOT NULL,
    last_generation INTEGER NOT NULL,
    PRIMARY KEY (bucket, prefix)
) WITHOUT ROWID;

CREATE TABLE batches (
    batch_id         TEXT PRIMARY KEY,
    bucket           TEXT NOT NULL,
    prefix           TEXT NOT NULL,
    generation       INTEGER NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    object_count     INTEGER NOT NULL,
    first_activity   REAL NOT NULL,
    last_activity    REAL NOT NULL,
    first_event_time REAL NOT NULL,
    last_event_time  REAL NOT NULL,
    deadline         REAL,
    deadline_trigger TEXT,
    trigger          TEXT,
    fired_at         REAL,
    event_id         TEXT,
    UNIQUE (bucket, prefix, generation)
);
CREATE UNIQUE INDEX batches_one_open ON batches (bucket, prefix) WHERE state = 'open';
CREATE INDEX batches_due ON batches (deadline) WHERE state = 'open';
CREATE INDEX batches_recent ON batches (fired_at) WHERE state = 'closed';

CREATE TABLE batch_objects (
    batch_id   TEXT NOT NULL,
    key        TEXT NOT NULL,
    size       INTEGER,
    etag       TEXT,
    sequencer  TEXT,
    event_time REAL NOT NULL,
    PRIMARY KEY (batch_id, key)
) WITHOUT ROWID;

CREATE TABLE key_memory (
    bucket    TEXT NOT NULL,
    key       TEXT NOT NULL,
    sequencer TEXT,
    seen_at   REAL NOT NULL,
    batch_id  TEXT,
    PRIMARY KEY (bucket, key)
) WITHOUT ROWID;
CREATE INDEX key_memory_seen ON key_memory (seen_at);

CREATE TABLE fingerprints (
    fingerprint TEXT PRIMARY KEY,
    seen_at     REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX fingerprints_seen ON fingerprints (seen_at);

CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    created_at REAL NOT NULL
);

CREATE TABLE deliveries (
    sink          TEXT NOT NULL,
    seq           INTEGER NOT NULL REFERENCES outbox (seq),
    event_id      TEXT NOT NULL,
    delivered_at  REAL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  REAL NOT NULL DEFAULT 0,
    parked        INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    PRIMARY KEY (sink, seq)
) WITHOUT ROWID;
CREATE INDEX deliveries_pending ON deliveries (sink, seq) WHERE delivered_at IS NULL;
CREATE INDEX deliveries_event ON deliveries (event_id);

CREATE TABLE dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    source      TEXT NOT NULL,
    location    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    body        TEXT NOT NULL
);

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE workers (
    worker_id    TEXT PRIMARY KEY,
    clock        REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    finished     INTEGER NOT NULL DEFAULT 0
);

-- Durable timers of other step observers (e.g. package-ready settle delays).
CREATE TABLE timers (
    kind    TEXT NOT NULL,
    key     TEXT NOT NULL,
    due_at  REAL NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE INDEX timers_due ON timers (kind, due_at);
