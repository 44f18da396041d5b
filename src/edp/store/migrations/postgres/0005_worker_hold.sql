-- A worker's hold (SPEC 4): while messages it received may come back later (after a
-- crash, a failed step or a lost receive, until the queue's visibility timeout ends),
-- it holds every worker's time-triggered firing at this time; NULL when it holds none.
-- Each heartbeat sets it anew (a worker whose heartbeat stops stops holding with it).
ALTER TABLE workers ADD COLUMN held double precision;
