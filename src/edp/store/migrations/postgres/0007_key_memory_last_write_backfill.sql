-- Key memories written before 0003 (by an edp of schema 1 or 2, also one still running
-- while the store was upgraded) have no last write: 0003 added the columns and left them
-- NULL, so a copy of such a key's last write without its sequencer (a backfill's listing
-- of an object seen live, a re-delivery that lost its sequencer) was counted again after
-- the upgrade, in a new batch. The write is still in the key's batch: those schemas wrote
-- every counted event's (event time, etag, size) to its batch_objects row and pointed the
-- key's memory at that batch. (Memories that edp writes since 0003 never have a batch
-- without an event time.)
UPDATE key_memory k SET event_time = o.event_time, etag = o.etag, size = o.size
FROM batch_objects o
WHERE k.event_time IS NULL AND k.batch_id IS NOT NULL
  AND o.batch_id = k.batch_id AND o.key = k.key;
