-- The key's last created event applied (its event time, etag and size): an event without
-- a sequencer equal to it is a duplicate (SPEC 3.1), such as a re-delivery that lost its
-- sequencer or a backfill's listing of an object already seen live.
ALTER TABLE key_memory ADD COLUMN event_time REAL;
ALTER TABLE key_memory ADD COLUMN etag TEXT;
ALTER TABLE key_memory ADD COLUMN size INTEGER;
