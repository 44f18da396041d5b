-- Several `edp replay` workers on parts of one stream (see edp.replay): each queues its
-- part's decoded events here, stamped with its effective time (the running maximum of
-- its part's event times); whoever holds the apply lock applies them in
-- (eff_time, worker_id, seq) order, below the lowest clock of the live workers.
CREATE TABLE replay_queue (
    worker_id  text COLLATE "C" NOT NULL,
    seq        bigint NOT NULL,          -- the event's index in its worker's part
    eff_time   double precision NOT NULL,
    bucket     text COLLATE "C" NOT NULL,
    key        text COLLATE "C" NOT NULL,
    deleted    boolean NOT NULL,
    event_time double precision NOT NULL,
    etag       text,
    size       bigint,
    sequencer  text,
    PRIMARY KEY (worker_id, seq)
);
CREATE INDEX replay_queue_order ON replay_queue (eff_time, worker_id, seq);

-- Per worker: the last of its events applied (a restarted worker does not queue them
-- again) and the newest effective time applied (the engines' shared clock).
CREATE TABLE replay_progress (
    worker_id     text COLLATE "C" PRIMARY KEY,
    applied_seq   bigint NOT NULL,
    applied_clock double precision NOT NULL
);
