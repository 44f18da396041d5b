"""The workers' clocks on the PostgreSQL store (SPEC section 4).

Each worker publishes its clock in ``workers``; ``fire_floor`` is the lowest clock of
the other live, unfinished workers. Replay workers (see :mod:`edp.replay`) also keep
their progress through the shared queue in ``replay_progress``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

FINISH_LOCK = 0x65647002  # pg_advisory_xact_lock key of workers finishing

HEARTBEAT_SQL = (
    "INSERT INTO workers (worker_id, clock, heartbeat_at) VALUES (%s, %s, %s)"
    " ON CONFLICT (worker_id) DO UPDATE SET"
    " clock = greatest(workers.clock, excluded.clock),"
    " heartbeat_at = excluded.heartbeat_at, finished = false"
)


def heartbeat_params(worker_id: str, clock: float, now: float) -> tuple[Any, ...]:
    """The parameters of :data:`HEARTBEAT_SQL`."""
    return (worker_id, clock, now)


class WorkerClocks:
    """The worker methods of :class:`~edp.store.postgres.PostgresStore`."""

    # Provided by PostgresStore, which mixes this class in.
    _run: Callable[..., Any]
    _rows: Callable[..., list[Any]]

    def heartbeat(self, worker_id: str, *, clock: float, now: float) -> None:
        """Publish a worker's clock (it never goes back)."""
        self._run(lambda conn: conn.execute(
            HEARTBEAT_SQL, heartbeat_params(worker_id, clock, now)
        ))

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

    def resume_seq(self, worker_id: str) -> int:
        """Where a replay worker starting now resumes: the last of its queued events
        applied when it is an unfinished worker restarted (-1: none), else -1: a new
        run under an old name starts afresh (the earlier run's progress and clock are
        forgotten)."""

        def work(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                "SELECT p.applied_seq FROM workers w JOIN replay_progress p USING (worker_id)"
                " WHERE w.worker_id = %s AND NOT w.finished", (worker_id,)
            ).fetchone()
            if row is not None:
                return int(row[0])
            conn.execute("DELETE FROM replay_progress WHERE worker_id = %s", (worker_id,))
            conn.execute("UPDATE workers SET clock = %s WHERE worker_id = %s AND finished",
                         (-1e18, worker_id))
            return -1

        return int(self._run(work, pipeline=False))

    def finish_worker(self, worker_id: str) -> bool:
        """Mark a worker finished; True when no unfinished worker remains."""

        def work(conn: psycopg.Connection[Any]) -> bool:
            # Serialised, so that of two workers finishing at once exactly one sees
            # the other's mark and flushes.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINISH_LOCK,))
            conn.execute("UPDATE workers SET finished = true WHERE worker_id = %s", (worker_id,))
            row = conn.execute("SELECT count(*) FROM workers WHERE NOT finished").fetchone()
            return row is not None and int(row[0]) == 0

        return bool(self._run(work))


__all__ = ["HEARTBEAT_SQL", "WorkerClocks", "heartbeat_params"]
