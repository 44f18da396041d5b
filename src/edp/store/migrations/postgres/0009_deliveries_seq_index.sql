-- history_retention deletes outbox rows: each delete checks the foreign key
-- deliveries.seq -> outbox.seq, which without an index on deliveries (seq) reads the whole
-- table (the primary key leads with the sink): a page of 500 events took 12 s with 400,000
-- deliveries, whatever the budget. (SQLite's store does not enforce foreign keys.)
CREATE INDEX deliveries_seq ON deliveries (seq);
