"""One write transaction on the PostgreSQL store: the working set of a step, locked.

Several workers may run steps on one database at once. What keeps them apart:

- the row of ``prefixes`` of each (bucket, prefix) is the lock of that prefix: its
  open batch, its generation and the key memories of its keys change only under
  it. :meth:`PostgresTransaction.load` inserts the missing rows, then locks all
  the step's rows with ``SELECT ... FOR UPDATE`` in one sorted order (byte order,
  the columns are ``COLLATE "C"``), so two steps wait for each other but never
  deadlock on them;
- due batches are taken with ``FOR UPDATE SKIP LOCKED`` on their prefix rows: a
  batch another worker holds is that worker's to fire or to extend;
- the unique indexes (one open batch per prefix, one outbox row per event id)
  are the last line of defence: a mistake aborts the step instead of doubling a batch.

Rows travel as one JSON document per statement (``jsonb_array_elements``): orjson
writes it in C and the server reads it in C, far cheaper than binding thousands of
array elements one by one; rows that cannot exist yet (new key memories, a key's
first object row in its batch) go by COPY, cheaper still. With pipelining, a step of
thousands of events costs a few round trips: locks and reads, the open batches, the
COPY of new rows (two short exchanges per table), then writes and COMMIT (one more
when due batches of other prefixes are taken).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson
import psycopg

from edp.core.batching import BatchKey, KeyMemory, OpenBatch
from edp.core.events import EventKind, ObjectEvent
from edp.store.base import (
    DeadLetter,
    LoadRequest,
    Queued,
    StepWrite,
    Timer,
    WorkingState,
)
from edp.store.postgres_workers import FINISH_LOCK, HEARTBEAT_SQL, heartbeat_params

APPLY_LOCK = 0x65647003  # pg_advisory_xact_lock key of the replay workers' applier

BATCH_COLUMNS = (
    "batch_id, bucket, prefix, generation, state, object_count, first_activity, last_activity,"
    " first_event_time, last_event_time, deadline, deadline_trigger, trigger, fired_at, event_id"
)
def _rows_of(*types: str) -> str:
    """A SELECT of the rows of a JSON array of arrays (%s), typed, in order."""
    columns = ", ".join(f"(r->>{i})::{kind}" for i, kind in enumerate(types))
    return (
        f"SELECT {columns} FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS j(r, n)"  # noqa: S608
        " ORDER BY n"
    )


def _json(rows: Iterable[Sequence[Any]]) -> str:
    """Rows as the JSON text that :func:`_rows_of` reads (floats round-trip exactly)."""
    return orjson.dumps(list(rows)).decode()


_PAIRS = _rows_of("text", "text")
_QUEUED = _rows_of("bigint", "float8", "text", "text", "bool", "float8", "text", "bigint", "text")
# Takes the first queued events below the floor, in queue order, and records how far
# each member's events (and the effective times) have been applied (only members
# queue, and their rows exist from join_run to end_run).
_TAKE = (
    "WITH taken AS (DELETE FROM replay_queue q USING (SELECT worker_id, seq FROM replay_queue"
    " WHERE eff_time < %s ORDER BY eff_time, worker_id, seq LIMIT %s) t"
    " WHERE q.worker_id = t.worker_id AND q.seq = t.seq RETURNING q.eff_time, q.worker_id,"
    " q.seq, q.bucket, q.key, q.deleted, q.event_time, q.etag, q.size, q.sequencer),"
    " progress AS (UPDATE replay_progress p SET"
    " applied_seq = greatest(p.applied_seq, t.seq),"
    " applied_clock = greatest(p.applied_clock, t.eff)"
    " FROM (SELECT worker_id, max(seq) AS seq, max(eff_time) AS eff FROM taken"
    " GROUP BY worker_id) t WHERE p.worker_id = t.worker_id)"
    " SELECT * FROM taken"
)
_OPEN = _rows_of("text", "text", "text", "int", "int", "float8", "float8", "float8", "float8",
                 "float8", "text")
_CLOSED = _rows_of("text", "text", "text", "int", "int", "float8", "float8", "float8", "float8",
                   "text", "float8", "text")


def _open_batch(row: Sequence[Any]) -> OpenBatch:
    return OpenBatch(row[0], row[1], row[2], row[3], row[5], row[6], row[7], row[8], row[9])


PLAIN_INSERT_KEYS = frozenset({"batch_objects_pkey", "key_memory_pkey"})
"""The primary keys that a plain insert of a row thought new may meet (see
:class:`PostgresTransaction`): the step then runs again with upserts."""
_OBJECTS_COPY = "COPY batch_objects (batch_id, key, size, etag, sequencer, event_time) FROM STDIN"
_OBJECTS_UPSERT = (
    "INSERT INTO batch_objects (batch_id, key, size, etag, sequencer, event_time)"
    f" {_rows_of('text', 'text', 'bigint', 'text', 'text', 'float8')}"
    " ON CONFLICT (batch_id, key) DO UPDATE SET size = excluded.size, etag = excluded.etag,"
    " sequencer = excluded.sequencer, event_time = excluded.event_time"
)
_KEYS_COPY = (
    "COPY key_memory (bucket, key, sequencer, seen_at, batch_id, event_time, etag, size)"
    " FROM STDIN"
)
_KEYS_UPSERT = (
    "INSERT INTO key_memory (bucket, key, sequencer, seen_at, batch_id, event_time, etag, size)"
    f" {_rows_of('text', 'text', 'text', 'float8', 'text', 'float8', 'text', 'bigint')}"
    " ON CONFLICT (bucket, key) DO UPDATE SET sequencer = excluded.sequencer,"
    " seen_at = excluded.seen_at, batch_id = excluded.batch_id,"
    " event_time = excluded.event_time, etag = excluded.etag, size = excluded.size"
)
_EVENTS_WITH_SINKS = _rows_of("text", "text", "jsonb")


def _outbox_sql(
    events: list[tuple[str, str, Sequence[str]]], kind: str, now: float
) -> tuple[str, Sequence[Any]]:
    """One statement: insert events (id, payload, sinks) in order, a delivery row per
    sink of each; counts the new ones (an event already there gets no new rows)."""
    return (
        "WITH t AS MATERIALIZED (SELECT * FROM"  # noqa: S608
        f" ({_EVENTS_WITH_SINKS}) AS r(e, pl, sinks)),"
        " ins AS (INSERT INTO outbox (event_id, kind, payload, created_at)"
        " SELECT e, %s, pl, %s FROM t ON CONFLICT (event_id) DO NOTHING"
        " RETURNING seq, event_id),"
        " del AS (INSERT INTO deliveries (sink, seq, event_id)"
        " SELECT s, ins.seq, ins.event_id FROM ins JOIN t ON t.e = ins.event_id"
        " CROSS JOIN LATERAL jsonb_array_elements_text(t.sinks) AS s)"
        " SELECT count(*) FROM ins",
        (_json(events), kind, now),
    )


class PostgresTransaction:
    """A write transaction on a PostgreSQL store (see :class:`~edp.store.base.Transaction`).

    ``conn`` is in a transaction already (psycopg opens one at the first statement);
    the store commits or rolls it back.
    """

    def __init__(
        self, conn: psycopg.Connection[Any], *, shard: int, plain_inserts: bool = True
    ) -> None:
        self.conn = conn
        self.shard = shard
        self.plain_inserts = plain_inserts
        self.reads: list[Any] = []
        """Every result read, in order: a retry replays the calls and compares these."""
        self.queued: list[tuple[str, Sequence[Any]]] = []
        self.copies: list[tuple[str, list[tuple[Any, ...]]]] = []
        """New rows, sent with COPY before the queued writes (about half the cost of an
        upsert of JSON rows, client and server: see docs/benchmarks.md)."""
        # What a load read of the step's keys, for cheaper writes: a key's memory
        # changes under its prefix's lock, and the load read every memory row of the
        # step's keys under it; a key's object row of a batch is written only with its
        # memory naming that batch, and prune keeps the memories of open batches. So a
        # key the load asked for and did not find has no memory row, and its object rows
        # exist only for the batch its memory named: the others are inserted by COPY,
        # without an upsert's conflict check (about half its cost). Where that does not
        # hold (workers, or runs, of different prefix depths while a batch stays open:
        # one key, two prefixes' locks), the primary key refuses the row and the step
        # runs again with upserts (``plain_inserts=False``, RetryingTransaction). Keys
        # no load asked for are always upserted.
        self.asked_keys: set[tuple[str, str]] = set()
        self.asked_names: set[str] = set()
        self.stored_keys: set[tuple[str, str]] = set()
        self.stored_objects: set[tuple[str, str]] = set()

    def _rows(self, cur: psycopg.Cursor[Any]) -> list[Any]:
        rows = cur.fetchall()
        self.reads.append(rows)
        return rows

    def _send(self, sql: str, params: Sequence[Any]) -> psycopg.Cursor[Any]:
        cur = self.conn.cursor()
        cur.execute(sql, params)
        return cur

    def queue(self, sql: str, params: Sequence[Any]) -> None:
        """Send a write with the next round trip (a read, or the commit)."""
        self.queued.append((sql, params))

    def send_queued(self) -> None:
        """Send the queued writes (call within a pipeline to batch them)."""
        queued, self.queued = self.queued, []
        for sql, params in queued:
            self.conn.execute(sql, params)

    def send_copies(self) -> None:
        """Send the queued new rows (call outside a pipeline: COPY cannot be in one)."""
        copies, self.copies = self.copies, []
        with self.conn.cursor() as cur:
            for statement, rows in copies:
                with cur.copy(statement) as copy:
                    for row in rows:
                        copy.write_row(row)

    def flush(self) -> None:
        """Send the queued writes now (the new rows' COPY, then one round trip)."""
        if self.copies:
            self.send_copies()
        if self.queued:
            with self.conn.pipeline():
                self.send_queued()

    # -- load -----------------------------------------------------------------------
    def load(self, request: LoadRequest) -> WorkingState:
        """Lock the step's prefixes (and keys), then load its working set.

        Two round trips: the locks and key memories in one pipeline, then the open
        batches of what was locked (read after the locks, so never stale).
        """
        self.flush()
        state = WorkingState()
        touched = set(request.batch_keys)
        if request.batch_ids:
            cur = self._send(
                "SELECT bucket, prefix FROM batches WHERE batch_id = ANY(%s::text[])"
                " AND state = 'open' ORDER BY bucket, prefix",
                (sorted(request.batch_ids),),
            )
            touched.update((b, p) for b, p in self._rows(cur))
        keys = sorted(touched)
        objects = sorted(request.object_keys)
        with self.conn.pipeline():
            lock = self._send_locks(keys) if keys else None
            due = self._send_due(request) if request.due_until is not None else None
            memory = self._send(
                "SELECT bucket, key, sequencer, seen_at, batch_id, event_time, etag, size"  # noqa: S608
                f" FROM key_memory WHERE (bucket, key) IN ({_PAIRS})"
                " ORDER BY bucket, key FOR UPDATE",
                (_json(objects),),
            ) if objects else None
            prints = self._send(
                "SELECT fingerprint FROM fingerprints WHERE fingerprint = ANY(%s::text[])"
                " ORDER BY fingerprint",
                (sorted(request.fingerprints),),
            ) if request.fingerprints else None
        # Read after the locks, so it reads what they hold; and out of the pipeline on
        # purpose: the server arms idle_in_transaction_session_timeout (see
        # PostgresStore) only after a query outside a pipeline (which psycopg ends with
        # a Sync, not a flush request): a worker frozen after its load would hold its
        # prefixes' locks for ever. One more round trip per step.
        mine = self._send_batches(keys) if keys else None
        if lock is not None:
            for bucket, prefix, generation in self._rows(lock):
                if generation > 0 and (bucket, prefix) in request.batch_keys:
                    state.generations[(bucket, prefix)] = generation
        due_keys = {(b, p) for b, p in self._rows(due)} if due is not None else set()
        if memory is not None:
            for bucket, key, *values in self._rows(memory):
                state.keys[(bucket, key)] = KeyMemory(*values)
            self.asked_keys.update(objects)
            self.asked_names.update(key for _, key in objects)
            self.stored_keys.update(state.keys)
            self.stored_objects.update(
                (m.batch_id, key) for (_, key), m in state.keys.items()
                if m.batch_id is not None
            )
        if prints is not None:
            state.fingerprints.update(row[0] for row in self._rows(prints))
        rows = self._rows(mine) if mine is not None else []
        others = sorted(due_keys - touched)
        if others:
            # Due batches of prefixes only the due query locked: read after that lock.
            rows += [
                row for row in self._rows(self._send_batches(others))
                if row[10] is not None and row[10] <= (request.due_until or -math.inf)
            ]
        state.batches = [_open_batch(row) for row in sorted(rows)]
        return state

    def _send_batches(self, keys: list[BatchKey]) -> psycopg.Cursor[Any]:
        return self._send(
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE state = 'open'"  # noqa: S608
            f" AND (bucket, prefix) IN ({_PAIRS}) ORDER BY batch_id",
            (_json(keys),),
        )

    def _send_locks(self, keys: list[BatchKey]) -> psycopg.Cursor[Any]:
        pairs = _json(keys)
        # Missing rows are inserted first, then every row is locked, in sorted order:
        # a concurrent insert of the same new prefix waits for ours, then both wait
        # on the row locks in the same order, so steps queue but never deadlock.
        self._send(
            "INSERT INTO prefixes (bucket, prefix, last_generation)"  # noqa: S608
            f" SELECT b, p, 0 FROM ({_PAIRS}) AS t(b, p)"
            " ON CONFLICT DO NOTHING",
            (pairs,),
        )
        return self._send(
            "SELECT bucket, prefix, last_generation FROM prefixes"  # noqa: S608
            f" WHERE (bucket, prefix) IN ({_PAIRS})"
            " ORDER BY bucket, prefix FOR UPDATE OF prefixes",
            (pairs,),
        )

    def _send_due(self, request: LoadRequest) -> psycopg.Cursor[Any]:
        # Never waits: a due batch whose prefix another step holds is that step's.
        sql = (
            "SELECT p.bucket, p.prefix FROM batches b JOIN prefixes p"
            " ON p.bucket = b.bucket AND p.prefix = b.prefix"
            " WHERE b.state = 'open' AND b.deadline <= %s ORDER BY b.deadline, b.bucket, b.prefix"
        )
        params: list[Any] = [request.due_until]
        if request.due_limit is not None:
            sql += " LIMIT %s"
            params.append(request.due_limit)
        return self._send(sql + " FOR UPDATE OF p SKIP LOCKED", params)

    # -- save -----------------------------------------------------------------------
    def save(self, write: StepWrite, *, sinks: Sequence[str], now: float) -> None:
        """Write a step: batches, objects, key memories, outbox and deliveries."""
        if write.closed:
            # Closed first: the next generation's open row may take the prefix's slot
            # in batches_one_open within the same step.
            self.queue(
                "INSERT INTO batches (batch_id, bucket, prefix, generation, state, object_count,"  # noqa: S608
                " first_activity, last_activity, first_event_time, last_event_time, trigger,"
                " fired_at, event_id) SELECT i, b, p, g, 'closed', n, fa, la, fe, le, tr, fi, e"
                f" FROM ({_CLOSED}) AS t(i, b, p, g, n, fa, la, fe, le, tr, fi, e)"
                " ON CONFLICT (batch_id) DO UPDATE SET state = 'closed',"
                " object_count = excluded.object_count, last_activity = excluded.last_activity,"
                " last_event_time = excluded.last_event_time, deadline = NULL,"
                " deadline_trigger = NULL, trigger = excluded.trigger,"
                " fired_at = excluded.fired_at, event_id = excluded.event_id",
                (_json(write.closed_rows()),),
            )
        if write.open_batches:
            self.queue(
                "INSERT INTO batches (batch_id, bucket, prefix, generation, state, object_count,"  # noqa: S608
                " first_activity, last_activity, first_event_time, last_event_time, deadline,"
                " deadline_trigger) SELECT i, b, p, g, 'open', n, fa, la, fe, le, d, dt"
                f" FROM ({_OPEN}) AS t(i, b, p, g, n, fa, la, fe, le, d, dt)"
                " ON CONFLICT (batch_id) DO UPDATE SET object_count = excluded.object_count,"
                " last_activity = excluded.last_activity,"
                " last_event_time = excluded.last_event_time, deadline = excluded.deadline,"
                " deadline_trigger = excluded.deadline_trigger",
                (_json(write.open_rows()),),
            )
        generations = write.generations()
        if generations:
            self.queue(
                "INSERT INTO prefixes (bucket, prefix, last_generation)"
                f" {_rows_of('text', 'text', 'int')}"
                " ON CONFLICT (bucket, prefix) DO UPDATE SET"
                " last_generation = greatest(prefixes.last_generation, excluded.last_generation)",
                (_json(generations),),
            )
        if write.objects:
            self._copy_or_upsert(
                ((o.batch_id, o.key, o.size, o.etag, o.sequencer, o.event_time)
                 for o in write.objects),
                lambda row: row[1] not in self.asked_names or row[:2] in self.stored_objects,
                self.stored_objects, _OBJECTS_COPY, _OBJECTS_UPSERT,
            )
        if write.keys:
            self._copy_or_upsert(
                ((b, k, m.sequencer, m.seen_at, m.batch_id, m.event_time, m.etag, m.size)
                 for (b, k), m in sorted(write.keys.items())),
                lambda row: row[:2] not in self.asked_keys or row[:2] in self.stored_keys,
                self.stored_keys, _KEYS_COPY, _KEYS_UPSERT,
            )
        if write.fingerprints:
            self.queue(
                "INSERT INTO fingerprints (fingerprint, seen_at)"
                f" {_rows_of('text', 'float8')}"
                " ON CONFLICT (fingerprint) DO UPDATE SET seen_at = excluded.seen_at",
                (_json(sorted(write.fingerprints.items())),),
            )
        if write.closed:
            self.queue(*_outbox_sql(
                [(c.event_id, c.payload, list(sinks if c.sinks is None else c.sinks))
                 for c in write.closed], write.outbox_kind, now
            ))

    def _copy_or_upsert(
        self, rows: Iterable[tuple[Any, ...]], known: Callable[[tuple[Any, ...]], bool],
        stored: set[tuple[str, str]], copy: str, upsert: str,
    ) -> None:
        """Rows that may exist (``known``; all of them without plain inserts) upserted,
        the others sent by COPY and remembered in ``stored`` (by their first two
        columns, the primary key)."""
        old: list[tuple[Any, ...]] = []
        new: list[tuple[Any, ...]] = []
        for row in rows:
            (old if not self.plain_inserts or known(row) else new).append(row)
        if new:
            self.copies.append((copy, new))
            stored.update((row[0], row[1]) for row in new)
        if old:
            self.queue(upsert, (_json(old),))

    def add_outbox(
        self, *, event_id: str, kind: str, payload: str, sinks: Sequence[str], now: float
    ) -> bool:
        """Record one event and a pending delivery per sink; False if the id exists."""
        self.flush()
        cur = self._send(*_outbox_sql([(event_id, payload, list(sinks))], kind, now))
        return bool(self._rows(cur)[0][0])

    # -- other writes -----------------------------------------------------------------
    def set_timer(self, kind: str, key: str, *, due_at: float, payload: str) -> bool:
        """Start a durable timer unless (kind, key) already runs."""
        self.flush()
        cur = self.conn.execute(
            "INSERT INTO timers (kind, key, due_at, payload) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (kind, key) DO NOTHING",
            (kind, key, due_at, payload),
        )
        self.reads.append(cur.rowcount)
        return cur.rowcount > 0

    def clear_timer(self, kind: str, key: str) -> None:
        """Remove the timer (kind, key) if it exists (sent with the next round trip)."""
        self.queue("DELETE FROM timers WHERE kind = %s AND key = %s", (kind, key))

    def take_due_timers(self, kind: str, *, until: float, limit: int) -> list[Timer]:
        """Remove and return due timers of ``kind``, earliest first (skipping locked ones)."""
        self.flush()
        cur = self.conn.execute(
            "DELETE FROM timers WHERE (kind, key) IN (SELECT kind, key FROM timers"
            " WHERE kind = %s AND due_at <= %s ORDER BY due_at, key LIMIT %s"
            " FOR UPDATE SKIP LOCKED) RETURNING kind, key, due_at, payload",
            (kind, until, limit),
        )
        rows = self._rows(cur)
        return [Timer(*row) for row in sorted(rows, key=lambda r: (r[2], r[1]))]

    def add_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Keep inputs that could not be decoded (in order)."""
        if not letters:
            return
        self.queue(
            "INSERT INTO dead_letters (received_at, source, location, reason, body)"
            f" {_rows_of('float8', 'text', 'text', 'text', 'text')}",
            (_json((d.received_at, d.source, d.location, d.reason, d.body) for d in letters),),
        )

    # -- the replay workers' queue (see edp.replay) ------------------------------------
    def queue_events(
        self, worker_id: str, events: Sequence[tuple[int, float, ObjectEvent]]
    ) -> None:
        """Queue a worker's events (sent with the commit); known (worker, seq) are kept."""
        if not events:
            return
        self.queue(
            "INSERT INTO replay_queue (worker_id, seq, eff_time, bucket, key, deleted,"  # noqa: S608
            " event_time, etag, size, sequencer) SELECT %s, s, t, b, k, d, et, e, z, q"
            f" FROM ({_QUEUED}) AS r(s, t, b, k, d, et, e, z, q) ON CONFLICT DO NOTHING",
            (worker_id, _json(
                (seq, eff, e.bucket, e.key, e.kind is EventKind.DELETED, e.time, e.etag,
                 e.size, e.sequencer) for seq, eff, e in events
            )),
        )

    def take_queued(self, *, limit: int, now: float, timeout: float) -> Queued | None:
        """The apply lock, then up to ``limit`` queued events below the workers' floor."""
        self.flush()
        with self.conn.pipeline():
            lock = self._send("SELECT pg_try_advisory_xact_lock(%s)", (APPLY_LOCK,))
            # Shared with other steps, exclusive for a worker joining a run: a joiner
            # sees whether the run has applied anything, and no step applies meanwhile.
            self._send("SELECT pg_advisory_xact_lock_shared(%s)", (FINISH_LOCK,))
            # Read once the lock is held (a pipeline runs in order): what the last
            # holder applied is committed and visible by then.
            # The run's live, unfinished members (not other workers on the database).
            floor = self._send(
                "SELECT min(w.clock) FROM workers w JOIN replay_progress p USING (worker_id)"
                " WHERE NOT w.finished AND w.heartbeat_at >= %s",
                (now - timeout,),
            )
            clock = self._send("SELECT max(applied_clock) FROM replay_progress", ())
        if not self._rows(lock)[0][0]:
            return None
        low = self._rows(floor)[0][0]
        high = self._rows(clock)[0][0]
        floor_value = math.inf if low is None else float(low)
        rows = self._rows(self._send(_TAKE, (floor_value, limit)))
        rows.sort(key=lambda r: (r[0], r[1], r[2]))
        created, deleted = EventKind.CREATED, EventKind.DELETED
        return Queued(
            events=[ObjectEvent(r[3], r[4], deleted if r[5] else created, r[6], r[7], r[8],
                                r[9]) for r in rows],
            floor=floor_value,
            clock=-math.inf if high is None else float(high),
        )

    def heartbeat(
        self, worker_id: str, *, clock: float, now: float, held: float | None = None,
        held_until: float | None = None, finished: bool = False,
    ) -> None:
        """Publish a worker's clock (and hold) with this transaction's commit."""
        self.queue(HEARTBEAT_SQL, heartbeat_params(worker_id, clock, now, held, held_until,
                                                     finished))

    def add_counters(self, counts: Mapping[str, int]) -> None:
        """Add to named counters (in this store's shard, names in sorted order)."""
        items = sorted((name, value) for name, value in counts.items() if value)
        if not items:
            return
        self.queue(
            "INSERT INTO counters (name, shard, value)"  # noqa: S608
            f" SELECT n, %s, v FROM ({_rows_of('text', 'bigint')}) AS t(n, v)"
            " ON CONFLICT (name, shard) DO UPDATE SET value = counters.value + excluded.value",
            (self.shard, _json(items)),
        )


__all__ = ["BATCH_COLUMNS", "PostgresTransaction"]
