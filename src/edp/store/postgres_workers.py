"""The workers' clocks on the PostgreSQL store (SPEC section 4), and their wake-ups.

Each worker publishes its clock in ``workers``; ``fire_floor`` is the lowest clock of
the other live, unfinished workers. For replay workers that take turns (see
:mod:`edp.replay`), a heartbeat that moves a clock wakes, through LISTEN/NOTIFY,
only the worker(s) now holding the lowest clock: the only ones that may go on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

FINISH_LOCK = 0x65647002  # pg_advisory_xact_lock key of workers finishing


def _channel(worker_id: str) -> str:
    """The NOTIFY channel that wakes one worker (identifiers are at most 63 bytes)."""
    return "edp_w_" + hashlib.md5(worker_id.encode(), usedforsecurity=False).hexdigest()


# Appended to a statement whose WITH defines `up`: notify the unfinished workers
# other than %s that hold the lowest clock among the workers other than %s.
_WAKE_LOWEST = (
    "SELECT pg_notify('edp_w_' || md5(w.worker_id), '') FROM workers w"
    " WHERE NOT w.finished AND w.worker_id <> %s AND w.clock = (SELECT min(clock)"
    " FROM workers WHERE NOT finished AND worker_id <> %s)"
)
HEARTBEAT_SQL = (
    "WITH old AS (SELECT clock, finished FROM workers WHERE worker_id = %s),"  # noqa: S608
    " up AS (INSERT INTO workers (worker_id, clock, heartbeat_at) VALUES (%s, %s, %s)"
    " ON CONFLICT (worker_id) DO UPDATE SET"
    " clock = greatest(workers.clock, excluded.clock),"
    " heartbeat_at = excluded.heartbeat_at, finished = false RETURNING clock) "
    + _WAKE_LOWEST
    + " AND EXISTS (SELECT 1 FROM up WHERE NOT EXISTS"
    " (SELECT 1 FROM old WHERE old.clock = up.clock AND NOT old.finished))"
)


def heartbeat_params(worker_id: str, clock: float, now: float) -> tuple[Any, ...]:
    """The parameters of :data:`HEARTBEAT_SQL`."""
    return (worker_id, worker_id, clock, now, worker_id, worker_id)


class WorkerClocks:
    """The worker methods of :class:`~edp.store.postgres.PostgresStore`."""

    # Provided by PostgresStore, which mixes this class in.
    _dsn: str
    _listener: psycopg.Connection[Any] | None
    _run: Callable[..., Any]
    _rows: Callable[..., list[Any]]

    def heartbeat(self, worker_id: str, *, clock: float, now: float) -> None:
        """Publish a worker's clock (it never goes back).

        When the clock moved, the unfinished worker(s) now holding the lowest clock
        are woken (see :meth:`wait_for_workers`): with conservative replay they are
        the only ones that may be able to go on. One statement, one round trip.
        """
        self._run(lambda conn: conn.execute(
            HEARTBEAT_SQL, heartbeat_params(worker_id, clock, now)
        ))

    def listen_workers(self, worker_id: str) -> None:
        """Start receiving the wake-ups of ``worker_id`` (see :meth:`wait_for_workers`)."""
        if self._listener is None or self._listener.closed:
            self._listener = psycopg.connect(self._dsn, autocommit=True)
            self._listener.execute(
                sql.SQL("LISTEN {}").format(sql.Identifier(_channel(worker_id)))
            )

    def wait_for_workers(self, timeout: float) -> bool:
        """Wait until this worker is woken by another's heartbeat or finish, or ``timeout``.

        Uses LISTEN/NOTIFY on a connection of its own, listening since
        :meth:`listen_workers`: a wake-up sent since then is not missed, so a
        check-then-wait loop never sleeps through a change. True when woken.
        """
        assert self._listener is not None, "call listen_workers first"
        woken = False
        for wait in (timeout, 0.0):  # the first wake-up, then whatever else is queued
            for _ in self._listener.notifies(timeout=wait, stop_after=None if wait == 0 else 1):
                woken = True
            if not woken:
                break
        return woken

    def worker_clocks(self, *, now: float, timeout: float) -> dict[str, float]:
        """The clocks of the live, unfinished workers."""
        rows = self._rows(
            "SELECT worker_id, clock FROM workers WHERE NOT finished AND heartbeat_at >= %s",
            (now - timeout,),
        )
        return {worker: float(clock) for worker, clock in rows}

    def worker_clock(self, worker_id: str) -> float | None:
        """The last clock a worker published."""
        rows = self._rows("SELECT clock FROM workers WHERE worker_id = %s", (worker_id,))
        return None if not rows else float(rows[0][0])

    def fire_floor(self, worker_id: str, *, now: float, timeout: float) -> float | None:
        """The lowest clock of the other live, unfinished workers."""
        value = self._rows(
            "SELECT min(clock) FROM workers WHERE worker_id <> %s AND NOT finished"
            " AND heartbeat_at >= %s",
            (worker_id, now - timeout),
        )[0][0]
        return None if value is None else float(value)

    def live_workers(self, *, now: float, timeout: float) -> int:
        """How many workers (finished or not) sent a heartbeat within ``timeout``."""
        return int(self._rows(
            "SELECT count(*) FROM workers WHERE heartbeat_at >= %s", (now - timeout,)
        )[0][0])

    def finish_worker(self, worker_id: str) -> bool:
        """Mark a worker finished; True when no unfinished worker remains."""

        def work(conn: psycopg.Connection[Any]) -> bool:
            # Serialised, so that of two workers finishing at once exactly one sees
            # the other's mark and flushes.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINISH_LOCK,))
            conn.execute("UPDATE workers SET finished = true WHERE worker_id = %s", (worker_id,))
            conn.execute(
                "WITH up AS (SELECT 1) " + _WAKE_LOWEST, (worker_id, worker_id)
            )
            row = conn.execute("SELECT count(*) FROM workers WHERE NOT finished").fetchone()
            return row is not None and int(row[0]) == 0

        return bool(self._run(work))


__all__ = ["HEARTBEAT_SQL", "WorkerClocks", "heartbeat_params"]
