-- When a worker's hold ends (epoch seconds). A hold with an end counts until then,
-- whether or not its worker is still live: what it holds for comes back at that time
-- whoever is there to receive it (a Lambda container that died mid-step publishes its
-- hold before the step). NULL: a hold published by code that did not set an end,
-- which counts while its worker is live, as before.
ALTER TABLE workers ADD COLUMN held_until REAL;
