"""The write transaction of the SQLite store: loading a step's working set, saving it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from edp.core.batching import KeyMemory, OpenBatch
from edp.store.base import (
    DeadLetter,
    LoadRequest,
    StepWrite,
    Timer,
    WorkingState,
)

_CHUNK = 900  # stays far below SQLite's bound-variable limit
HEARTBEAT_SQL = (
    "INSERT INTO workers (worker_id, clock, heartbeat_at, held, held_until, finished)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (worker_id) DO UPDATE SET"
    " clock = max(clock, excluded.clock), heartbeat_at = excluded.heartbeat_at,"
    " held = excluded.held, held_until = excluded.held_until, finished = excluded.finished"
)
BATCH_COLUMNS = (
    "batch_id, bucket, prefix, generation, state, object_count, first_activity, last_activity,"
    " first_event_time, last_event_time, deadline, deadline_trigger, trigger, fired_at, event_id"
)


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _open_batch(row: Sequence[Any]) -> OpenBatch:
    return OpenBatch(row[0], row[1], row[2], row[3], row[5], row[6], row[7], row[8], row[9])


class SqliteTransaction:
    """A write transaction on a SQLite store (see :class:`~edp.store.base.Transaction`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def load(self, request: LoadRequest) -> WorkingState:
        """Load the open batches, generations, key memories and fingerprints asked for."""
        state = WorkingState()
        seen: set[str] = set()
        by_bucket: dict[str, list[str]] = {}
        for bucket, prefix in request.batch_keys:
            by_bucket.setdefault(bucket, []).append(prefix)
        for bucket, prefixes in by_bucket.items():
            for part in _chunks(prefixes):
                marks = ",".join("?" * len(part))
                for row in self.conn.execute(
                    f"SELECT {BATCH_COLUMNS} FROM batches WHERE state = 'open' "  # noqa: S608
                    f"AND bucket = ? AND prefix IN ({marks})",
                    (bucket, *part),
                ):
                    seen.add(row[0])
                    state.batches.append(_open_batch(row))
                for bucket_, prefix, generation in self.conn.execute(
                    f"SELECT bucket, prefix, last_generation FROM prefixes "  # noqa: S608
                    f"WHERE bucket = ? AND prefix IN ({marks})",
                    (bucket, *part),
                ):
                    state.generations[(bucket_, prefix)] = generation
        ids = list(request.batch_ids)
        for part in _chunks(ids):
            marks = ",".join("?" * len(part))
            for row in self.conn.execute(
                f"SELECT {BATCH_COLUMNS} FROM batches "  # noqa: S608
                f"WHERE state = 'open' AND batch_id IN ({marks})",
                tuple(part),
            ):
                if row[0] not in seen:
                    seen.add(row[0])
                    state.batches.append(_open_batch(row))
        if request.due_until is not None:
            sql = (
                f"SELECT {BATCH_COLUMNS} FROM batches WHERE state = 'open' "  # noqa: S608
                "AND deadline <= ? ORDER BY deadline, bucket, prefix"
            )
            params: tuple[Any, ...] = (request.due_until,)
            if request.due_limit is not None:
                sql += " LIMIT ?"
                params += (request.due_limit,)
            for row in self.conn.execute(sql, params):
                if row[0] not in seen:
                    seen.add(row[0])
                    state.batches.append(_open_batch(row))
        keys_by_bucket: dict[str, list[str]] = {}
        for bucket, key in request.object_keys:
            keys_by_bucket.setdefault(bucket, []).append(key)
        for bucket, keys in keys_by_bucket.items():
            for part in _chunks(keys):
                marks = ",".join("?" * len(part))
                for key, *memory in self.conn.execute(
                    "SELECT key, sequencer, seen_at, batch_id, event_time, etag, size"  # noqa: S608
                    f" FROM key_memory WHERE bucket = ? AND key IN ({marks})",
                    (bucket, *part),
                ):
                    state.keys[(bucket, key)] = KeyMemory(*memory)
        fingerprints = list(request.fingerprints)
        for part in _chunks(fingerprints):
            marks = ",".join("?" * len(part))
            state.fingerprints.update(
                row[0]
                for row in self.conn.execute(
                    f"SELECT fingerprint FROM fingerprints WHERE fingerprint IN ({marks})",  # noqa: S608
                    tuple(part),
                )
            )
        return state

    def save(self, write: StepWrite, *, sinks: Sequence[str], now: float) -> None:
        """Write a step: batches, objects, key memories, outbox and deliveries."""
        c = self.conn
        # Close first: a step may close a prefix's batch and open its successor.
        c.executemany(
            "INSERT INTO batches (batch_id, bucket, prefix, generation, state, object_count,"
            " first_activity, last_activity, first_event_time, last_event_time, trigger,"
            " fired_at, event_id) VALUES (?, ?, ?, ?, 'closed', ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (batch_id) DO UPDATE SET state = 'closed',"
            " object_count = excluded.object_count, last_activity = excluded.last_activity,"
            " last_event_time = excluded.last_event_time, deadline = NULL,"
            " deadline_trigger = NULL, trigger = excluded.trigger,"
            " fired_at = excluded.fired_at, event_id = excluded.event_id",
            write.closed_rows(),
        )
        c.executemany(
            "INSERT INTO batches (batch_id, bucket, prefix, generation, state, object_count,"
            " first_activity, last_activity, first_event_time, last_event_time, deadline,"
            " deadline_trigger) VALUES (?, ?, ?, ?, 'open', ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (batch_id) DO UPDATE SET object_count = excluded.object_count,"
            " last_activity = excluded.last_activity, last_event_time = excluded.last_event_time,"
            " deadline = excluded.deadline, deadline_trigger = excluded.deadline_trigger",
            write.open_rows(),
        )
        c.executemany(
            "INSERT INTO prefixes (bucket, prefix, last_generation) VALUES (?, ?, ?)"
            " ON CONFLICT (bucket, prefix) DO UPDATE SET"
            " last_generation = max(last_generation, excluded.last_generation)",
            write.generations(),
        )
        if write.objects:  # (none from a batcher for a store that keeps none)
            c.executemany(
                "INSERT INTO batch_objects (batch_id, key, size, etag, sequencer, event_time)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (batch_id, key) DO UPDATE SET"
                " size = excluded.size, etag = excluded.etag, sequencer = excluded.sequencer,"
                " event_time = excluded.event_time",
                write.objects,  # ObjectRecord tuples, in the columns' order
            )
        c.executemany(
            "INSERT INTO key_memory (bucket, key, sequencer, seen_at, batch_id, event_time,"
            " etag, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (bucket, key) DO UPDATE"
            " SET sequencer = excluded.sequencer, seen_at = excluded.seen_at,"
            " batch_id = excluded.batch_id, event_time = excluded.event_time,"
            " etag = excluded.etag, size = excluded.size",
            [(b, k, m.sequencer, m.seen_at, m.batch_id, m.event_time, m.etag, m.size)
             for (b, k), m in write.keys.items()],
        )
        c.executemany(
            "INSERT OR REPLACE INTO fingerprints (fingerprint, seen_at) VALUES (?, ?)",
            list(write.fingerprints.items()),
        )
        if write.closed:
            c.executemany(
                "INSERT INTO outbox (event_id, kind, payload, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (event_id) DO NOTHING",
                [(cb.event_id, write.outbox_kind, cb.payload, now) for cb in write.closed],
            )
            c.executemany(
                "INSERT OR IGNORE INTO deliveries (sink, seq, event_id)"
                " SELECT ?, seq, event_id FROM outbox WHERE event_id = ?",
                [(sink, cb.event_id) for cb in write.closed
                 for sink in (sinks if cb.sinks is None else cb.sinks)],
            )

    def add_outbox(
        self, *, event_id: str, kind: str, payload: str, sinks: Sequence[str], now: float
    ) -> bool:
        """Record one event and a pending delivery per sink; False if the id exists."""
        cur = self.conn.execute(
            "INSERT INTO outbox (event_id, kind, payload, created_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (event_id) DO NOTHING",
            (event_id, kind, payload, now),
        )
        if cur.rowcount == 0:
            return False
        seq = cur.lastrowid
        self.conn.executemany(
            "INSERT INTO deliveries (sink, seq, event_id) VALUES (?, ?, ?)",
            [(sink, seq, event_id) for sink in sinks],
        )
        return True

    def set_timer(self, kind: str, key: str, *, due_at: float, payload: str) -> bool:
        """Start a durable timer unless (kind, key) already runs."""
        cur = self.conn.execute(
            "INSERT INTO timers (kind, key, due_at, payload) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (kind, key) DO NOTHING",
            (kind, key, due_at, payload),
        )
        return cur.rowcount > 0

    def take_due_timers(self, kind: str, *, until: float, limit: int) -> list[Timer]:
        """Remove and return due timers of ``kind``, earliest first."""
        rows = self.conn.execute(
            "SELECT kind, key, due_at, payload FROM timers WHERE kind = ? AND due_at <= ?"
            " ORDER BY due_at, key LIMIT ?",
            (kind, until, limit),
        ).fetchall()
        self.conn.executemany(
            "DELETE FROM timers WHERE kind = ? AND key = ?", [(r[0], r[1]) for r in rows]
        )
        return [Timer(*row) for row in rows]

    def clear_timer(self, kind: str, key: str) -> None:
        """Remove the timer (kind, key) if it exists."""
        self.conn.execute("DELETE FROM timers WHERE kind = ? AND key = ?", (kind, key))

    def add_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Keep inputs that could not be decoded."""
        self.conn.executemany(
            "INSERT INTO dead_letters (received_at, source, location, reason, body)"
            " VALUES (?, ?, ?, ?, ?)",
            [(d.received_at, d.source, d.location, d.reason, d.body) for d in letters],
        )

    def heartbeat(
        self, worker_id: str, *, clock: float, now: float, held: float | None = None,
        held_until: float | None = None, finished: bool = False,
    ) -> None:
        """Publish a worker's clock (and hold) with this transaction."""
        self.conn.execute(HEARTBEAT_SQL, (worker_id, clock, now, held,
                                          None if held is None else held_until,
                                          int(finished)))

    def add_counters(self, counts: Mapping[str, int]) -> None:
        """Add to named counters."""
        self.conn.executemany(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            [(name, value) for name, value in counts.items() if value],
        )
