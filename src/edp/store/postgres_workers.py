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

    # -- replay workers (see edp.replay): a run is the set of workers with a
    # replay_progress row; it begins with the first to join and ends when its last
    # worker has applied and fired everything (end_run).
    def join_run(self, worker_id: str, *, now: float) -> tuple[bool, int]:
        """Join the replay run in progress (or begin one): whether this worker was a
        member already (restarted), and where its part resumes: after the last of its
        events queued or applied (-1: from the start; a new member's clock starts
        afresh)."""

        def work(conn: psycopg.Connection[Any]) -> tuple[bool, int]:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINISH_LOCK,))
            # One statement, one snapshot: an applying step moves events from the
            # queue to applied_seq atomically, so none is missed nor queued twice.
            row = conn.execute(
                "SELECT greatest(p.applied_seq, (SELECT max(q.seq) FROM replay_queue q"
                " WHERE q.worker_id = p.worker_id)) FROM replay_progress p"
                " WHERE p.worker_id = %s", (worker_id,)
            ).fetchone()
            if row is not None:
                conn.execute(HEARTBEAT_SQL, heartbeat_params(worker_id, -1e18, now))
                return True, int(row[0])
            conn.execute(
                "INSERT INTO replay_progress (worker_id, applied_seq, applied_clock)"
                " VALUES (%s, -1, %s)", (worker_id, -1e18)
            )
            conn.execute(
                "INSERT INTO workers (worker_id, clock, heartbeat_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (worker_id) DO UPDATE SET clock = excluded.clock,"
                " heartbeat_at = excluded.heartbeat_at, finished = false",
                (worker_id, -1e18, now),
            )
            return False, -1

        rejoined, done = self._run(work, pipeline=False)
        return bool(rejoined), int(done)

    def run_members(self) -> int:
        """How many workers joined the replay run in progress."""
        return int(self._rows("SELECT count(*) FROM replay_progress")[0][0])

    def stalled_members(self, *, now: float, timeout: float) -> list[str]:
        """Unfinished members of the run silent for longer than ``timeout``."""
        return [str(r[0]) for r in self._rows(
            "SELECT worker_id FROM replay_progress JOIN workers USING (worker_id)"
            " WHERE NOT finished AND heartbeat_at < %s ORDER BY worker_id", (now - timeout,)
        )]

    def finish_replay_worker(self, worker_id: str) -> bool:
        """Mark a run member finished; True when it is the run's last (it applies what
        is left, fires every open batch, then calls :meth:`end_run`)."""

        def work(conn: psycopg.Connection[Any]) -> bool:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINISH_LOCK,))
            conn.execute("UPDATE workers SET finished = true WHERE worker_id = %s", (worker_id,))
            row = conn.execute(
                "SELECT count(*) FROM replay_progress JOIN workers USING (worker_id)"
                " WHERE NOT finished"
            ).fetchone()
            return row is not None and int(row[0]) == 0

        return bool(self._run(work))

    def end_run(self) -> None:
        """The run is complete: the next worker to join begins a new one."""
        self._run(lambda conn: conn.execute("DELETE FROM replay_progress"))

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
