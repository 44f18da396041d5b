-- edp schema, version 1 (PostgreSQL); mirrors sqlite/0001_initial.sql.
-- Times are seconds since the epoch (UTC), as double precision. Identifiers are
-- COLLATE "C": byte order, the same order as Python's, for ranges and lock order.
-- Rows of `prefixes` are the locks of the store: whoever changes the batches of a
-- (bucket, prefix) holds its row (SELECT ... FOR UPDATE), see edp/store/postgres_tx.py.

CREATE TABLE prefixes (
    bucket          text COLLATE "C" NOT NULL,
    prefix          text COLLATE "C" NOT NULL,
    last_generation integer NOT NULL,
    PRIMARY KEY (bucket, prefix)
);

CREATE TABLE batches (
    batch_id         text COLLATE "C" PRIMARY KEY,
    bucket           text COLLATE "C" NOT NULL,
    prefix           text COLLATE "C" NOT NULL,
    generation       integer NOT NULL,
    state            text NOT NULL CHECK (state IN ('open', 'closed')),
    object_count     integer NOT NULL,
    first_activity   double precision NOT NULL,
    last_activity    double precision NOT NULL,
    first_event_time double precision NOT NULL,
    last_event_time  double precision NOT NULL,
    deadline         double precision,
    deadline_trigger text,
    trigger          text,
    fired_at         double precision,
    event_id         text,
    UNIQUE (bucket, prefix, generation)
);
-- At most one open batch per prefix: the last line of defence against two workers
-- opening a batch for the same prefix.
CREATE UNIQUE INDEX batches_one_open ON batches (bucket, prefix) WHERE state = 'open';
CREATE INDEX batches_due ON batches (deadline) WHERE state = 'open';
CREATE INDEX batches_recent ON batches (fired_at) WHERE state = 'closed';

CREATE TABLE batch_objects (
    batch_id   text COLLATE "C" NOT NULL,
    key        text COLLATE "C" NOT NULL,
    size       bigint,
    etag       text,
    sequencer  text,
    event_time double precision NOT NULL,
    PRIMARY KEY (batch_id, key)
);

CREATE TABLE key_memory (
    bucket    text COLLATE "C" NOT NULL,
    key       text COLLATE "C" NOT NULL,
    sequencer text,
    seen_at   double precision NOT NULL,
    batch_id  text,
    PRIMARY KEY (bucket, key)
);
-- BRIN: seen_at follows insertion order closely, and prune is rare; a B-tree here
-- would cost every step a second index insert per key.
CREATE INDEX key_memory_seen ON key_memory USING brin (seen_at);

CREATE TABLE fingerprints (
    fingerprint text COLLATE "C" PRIMARY KEY,
    seen_at     double precision NOT NULL
);
CREATE INDEX fingerprints_seen ON fingerprints USING brin (seen_at);

CREATE TABLE outbox (
    seq        bigserial PRIMARY KEY,
    event_id   text COLLATE "C" NOT NULL UNIQUE,
    kind       text NOT NULL,
    payload    text NOT NULL,
    created_at double precision NOT NULL
);

CREATE TABLE deliveries (
    sink          text COLLATE "C" NOT NULL,
    seq           bigint NOT NULL REFERENCES outbox (seq),
    event_id      text COLLATE "C" NOT NULL,
    delivered_at  double precision,
    attempts      integer NOT NULL DEFAULT 0,
    next_attempt  double precision NOT NULL DEFAULT 0,
    parked        boolean NOT NULL DEFAULT false,
    last_error    text,
    -- A relay takes rows for a while (a lease) so that two workers do not send the
    -- same event at once; a lease ends early when its backend is gone.
    claimed_by    integer,
    claimed_until double precision,
    PRIMARY KEY (sink, seq)
);
CREATE INDEX deliveries_pending ON deliveries (sink, seq) WHERE delivered_at IS NULL;
CREATE INDEX deliveries_event ON deliveries (event_id);

CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    received_at double precision NOT NULL,
    source      text NOT NULL,
    location    text NOT NULL,
    reason      text NOT NULL,
    body        text NOT NULL
);

-- Counters are split in shards (one per store instance, at random) so that
-- workers adding to the same counter do not queue on one row; readers sum them.
CREATE TABLE counters (
    name  text COLLATE "C" NOT NULL,
    shard smallint NOT NULL,
    value bigint NOT NULL,
    PRIMARY KEY (name, shard)
);

CREATE TABLE workers (
    worker_id    text COLLATE "C" PRIMARY KEY,
    clock        double precision NOT NULL,
    heartbeat_at double precision NOT NULL,
    finished     boolean NOT NULL DEFAULT false
);

-- Durable timers of other step observers (e.g. package-ready settle delays).
CREATE TABLE timers (
    kind    text COLLATE "C" NOT NULL,
    key     text COLLATE "C" NOT NULL,
    due_at  double precision NOT NULL,
    payload text NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX timers_due ON timers (kind, due_at);
