-- Key memories written before 0002 (by an edp of schema 1, also one still running while
-- the store was upgraded) have no last write: 0002 added the columns and left them NULL,
-- so a copy of such a key's last write without its sequencer (a backfill's listing of an
-- object seen live, a re-delivery that lost its sequencer) was counted again after the
-- upgrade, in a new batch. The write is still in the key's batch: schema 1 wrote every
-- counted event's (event time, etag, size) to its batch_objects row and pointed the key's
-- memory at that batch. (Memories that edp writes since 0002 never have a batch without
-- an event time.)
UPDATE key_memory SET (event_time, etag, size) = (
    SELECT o.event_time, o.etag, o.size FROM batch_objects o
    WHERE o.batch_id = key_memory.batch_id AND o.key = key_memory.key
) WHERE event_time IS NULL AND batch_id IS NOT NULL;
