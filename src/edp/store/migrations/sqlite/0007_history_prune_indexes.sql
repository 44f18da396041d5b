-- history_retention: the events and dead letters to prune are found by their time.
CREATE INDEX outbox_created ON outbox (created_at);
CREATE INDEX dead_letters_received ON dead_letters (received_at);
