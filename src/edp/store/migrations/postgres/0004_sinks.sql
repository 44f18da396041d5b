-- The sinks long-running workers relay to, registered when they start: a process with
-- no sink of its own (a backfill from a laptop) records its events for them, also on a
-- store where no event was delivered yet (before, only sinks with delivery rows counted).
CREATE TABLE sinks (
    name          text COLLATE "C" PRIMARY KEY,
    registered_at double precision NOT NULL
);
