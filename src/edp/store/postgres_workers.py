"""The workers' clocks on the PostgreSQL store (SPEC section 4).

Each worker publishes its clock in ``workers``; ``fire_floor`` is the lowest clock of
the other live, unfinished workers. Replay workers (see :mod:`edp.replay`) also keep
their progress through the shared queue in ``replay_progress``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool
from tenacity import Retrying

from edp.errors import EdpError
from edp.store.base import WORKER_ID_HOW, Floors, lowest

log = logging.getLogger(__name__)

FINISH_LOCK = 0x65647002  # pg_advisory_xact_lock key of workers finishing
ENDING_LOCK = 0x65647004  # pg_advisory_lock key held by the worker ending a replay run
CLAIM_PATIENCE = 5.0  # seconds a worker waits for its id to be free


def member_key(worker_id: str) -> int:
    """A worker id's 64-bit advisory lock key (one live process per id): the first 64
    bits of an MD5 of the id, signed as PostgreSQL's bigint."""
    unsigned = int(hashlib.md5(f"edp-worker:{worker_id}".encode(),
                               usedforsecurity=False).hexdigest()[:16], 16)
    return unsigned - 2**64 if unsigned >= 2**63 else unsigned

HEARTBEAT_SQL = (
    "INSERT INTO workers (worker_id, clock, heartbeat_at, held, held_until, finished)"
    " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (worker_id) DO UPDATE SET"
    " clock = greatest(workers.clock, excluded.clock),"
    " heartbeat_at = excluded.heartbeat_at, held = excluded.held,"
    " held_until = excluded.held_until, finished = excluded.finished"
)


def heartbeat_params(
    worker_id: str, clock: float, now: float, held: float | None = None,
    held_until: float | None = None, finished: bool = False,
) -> tuple[Any, ...]:
    """The parameters of :data:`HEARTBEAT_SQL`."""
    return (worker_id, clock, now, held, None if held is None else held_until, finished)


CLOCK_REFRESH = 60.0
"""Seconds between two measurements of the offset to the database server's clock."""


class WorkerClocks:
    """The worker methods of :class:`~edp.store.postgres.PostgresStore`."""

    # Provided by PostgresStore, which mixes this class in.
    _run: Callable[..., Any]
    _rows: Callable[..., list[Any]]
    getconn: Callable[[], psycopg.Connection[Any]]
    _clock_offset: float = 0.0
    _clock_measured: float = -math.inf
    local_clock: Callable[[], float]
    """This machine's clock (``time.time``; a test gives a skewed one)."""

    def wall_clock(self) -> float:
        """The database server's clock: the local clock plus an offset to the server's
        (``clock_timestamp()``), measured at most every minute from the midpoint of a
        round trip. Every live worker on the database then reads one clock, so a
        worker whose own clock runs ahead does not close batches early that another
        would still extend. When the server cannot be asked, the last offset stays."""
        local = self.local_clock()
        if local - self._clock_measured >= CLOCK_REFRESH or local < self._clock_measured:
            self._clock_measured = local
            try:
                before = self.local_clock()
                # (one try, bounded: a clock read must not wait out an outage)
                with self.pool.connection(timeout=2.0) as conn:
                    server = server_clock(conn)
                    conn.rollback()
                after = self.local_clock()
            except Exception as exc:  # noqa: BLE001  (a clock read must not fail a step)
                log.warning("cannot read the database server's clock (%s); the offset "
                            "stays %+.3f s", exc, self._clock_offset)
            else:
                self._clock_offset = float(server) - (before + after) / 2
                if abs(self._clock_offset) > 1.0:
                    log.info("this machine's clock is %+.3f s off the database server's; "
                             "edp uses the server's", -self._clock_offset)
            local = self.local_clock()
        return local + self._clock_offset

    def heartbeat(
        self, worker_id: str, *, clock: float, now: float, held: float | None = None,
        held_until: float | None = None, finished: bool = False,
    ) -> None:
        """Publish a worker's clock (it never goes back) and its hold."""
        self._run(lambda conn: conn.execute(
            HEARTBEAT_SQL, heartbeat_params(worker_id, clock, now, held, held_until, finished)
        ))

    def retire_worker(
        self, worker_id: str, *, held: float | None = None, held_until: float | None = None
    ) -> None:
        """A worker that will not run again: finished, holding only ``held`` (if any)."""
        self._run(lambda conn: conn.execute(
            "UPDATE workers SET held = %s, held_until = %s, finished = true"
            " WHERE worker_id = %s", (held, None if held is None else held_until, worker_id)
        ))

    def worker_clock(self, worker_id: str) -> float | None:
        """The last clock a worker published."""
        rows = self._rows("SELECT clock FROM workers WHERE worker_id = %s", (worker_id,))
        return None if not rows else float(rows[0][0])

    def worker_finished(self, worker_id: str) -> bool | None:
        """Whether a worker's last run ended with ``finish_worker``."""
        rows = self._rows("SELECT finished FROM workers WHERE worker_id = %s", (worker_id,))
        return None if not rows else bool(rows[0][0])

    def worker_hold(self, worker_id: str) -> float | None:
        """The hold a worker published last."""
        rows = self._rows("SELECT held FROM workers WHERE worker_id = %s", (worker_id,))
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    def fire_floor(self, worker_id: str, *, now: float, timeout: float) -> float | None:
        """The lowest clock (or hold) of the other live, unfinished workers."""
        return lowest(*self.floors(worker_id, now=now, timeout=timeout))

    def floors(self, worker_id: str, *, now: float, timeout: float) -> Floors:
        """The other live, unfinished workers' lowest clock; the other workers' lowest
        hold that has not ended (one without an end: while its worker is live)."""
        row = self._rows(
            "SELECT min(clock) FILTER (WHERE NOT finished AND heartbeat_at >= %s),"
            " min(held) FILTER (WHERE held_until > %s OR (held_until IS NULL"
            " AND NOT finished AND heartbeat_at >= %s))"
            " FROM workers WHERE worker_id <> %s",
            (now - timeout, now, now - timeout, worker_id),
        )[0]
        return Floors(*(None if value is None else float(value) for value in row))

    # -- replay workers (see edp.replay): a run is the set of workers with a
    # replay_progress row. It begins with the first to join; once every member has
    # finished, the last one *ends* it (holding ENDING_LOCK, a session lock: it dies
    # with its process) by applying what is left, firing every open batch and
    # deleting the rows (end_run). Nobody joins a run that is ending.
    _ending: psycopg.Connection[Any] | None = None
    _member: psycopg.Connection[Any] | None = None  # holds this process's worker id
    pool: ConnectionPool[psycopg.Connection[Any]]
    retrying: Callable[[], Retrying]

    def join_run(self, worker_id: str, *, now: float, workers: int,
                 timeout: float | None = None) -> tuple[str, int]:
        """Join the replay run in progress, or begin one: how (``new``: began a run,
        ``joined``, ``rejoined``: a member restarted, ``ending``: the last run is being
        ended, try again shortly), and where this worker's part resumes: after the last
        of its events queued or applied (-1: from the start). Raises
        :class:`~edp.errors.EdpError` when the run in progress cannot take it, or when
        another live process has this worker id."""
        self.claim_worker_id(worker_id, silent_for=timeout)

        def work(conn: psycopg.Connection[Any]) -> tuple[str, int]:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINISH_LOCK,))
            # One statement, one snapshot: an applying step moves events from the
            # queue to applied_seq atomically, so none is missed nor queued twice.
            members = {str(r[0]): (bool(r[1]), int(r[2])) for r in conn.execute(
                "SELECT p.worker_id, w.finished, greatest(p.applied_seq, (SELECT max(q.seq)"
                " FROM replay_queue q WHERE q.worker_id = p.worker_id))"
                " FROM replay_progress p JOIN workers w USING (worker_id)"
            ).fetchall()}
            if members and all(finished for finished, _ in members.values()):
                row = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (ENDING_LOCK,)
                                   ).fetchone()
                if not (row and row[0]):
                    return "ending", -1  # its last worker is at work
                if worker_id not in members:
                    raise EdpError(
                        f"a replay run on this database did not end: its last worker "
                        f"stopped while finishing it. Restart one of its workers "
                        f"({', '.join(sorted(members))}) with its --worker-id and part to "
                        "complete it, or use another database"
                    )
            if worker_id in members:
                conn.execute(HEARTBEAT_SQL, heartbeat_params(worker_id, -1e18, now))
                return "rejoined", members[worker_id][1]
            row = conn.execute("SELECT max(applied_clock) FROM replay_progress").fetchone()
            if members and row is not None and row[0] is not None and row[0] > -1e18:
                raise EdpError(
                    f"the replay run in progress on this database has applied events "
                    f"already (workers {', '.join(sorted(members))}): a worker joining now "
                    "would come too late. Check that every worker has the same --workers; "
                    "restart one of those with its --worker-id, or use another database"
                )
            if len(members) >= workers:
                raise EdpError(
                    f"the replay run in progress on this database already has "
                    f"{len(members)} workers ({', '.join(sorted(members))}) for "
                    f"--workers {workers}: restart one of those with its --worker-id, or "
                    "use another database"
                )
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
            return ("joined" if members else "new"), -1

        how, done = self._run(work, pipeline=False)
        return str(how), int(done)

    def run_members(self, *, now: float, timeout: float) -> int:
        """How many workers of the replay run in progress are live or finished (a
        member that went silent before finishing does not count as a partner)."""
        return int(self._rows(
            "SELECT count(*) FROM replay_progress JOIN workers USING (worker_id)"
            " WHERE finished OR heartbeat_at >= %s", (now - timeout,)
        )[0][0])

    def leave_run(self, worker_id: str) -> None:
        """Leave the run in progress, if nothing of this worker was queued or applied
        (a worker giving up before it began: it must not count as a partner later)."""

        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINISH_LOCK,))
            conn.execute(
                "DELETE FROM replay_progress p WHERE p.worker_id = %s AND p.applied_seq < 0"
                " AND NOT EXISTS (SELECT 1 FROM replay_queue q WHERE q.worker_id = %s)",
                (worker_id, worker_id),
            )

        self._run(work, pipeline=False)

    def stalled_members(self, *, now: float, timeout: float) -> list[str]:
        """Unfinished members of the run silent for longer than ``timeout``."""
        return [str(r[0]) for r in self._rows(
            "SELECT worker_id FROM replay_progress JOIN workers USING (worker_id)"
            " WHERE NOT finished AND heartbeat_at < %s ORDER BY worker_id", (now - timeout,)
        )]

    def queued_events(self) -> int:
        """How many events wait in the replay queue."""
        return int(self._rows("SELECT count(*) FROM replay_queue")[0][0])

    def finish_replay_worker(self, worker_id: str) -> bool:
        """Mark a run member finished; True when it is the one to end the run: every
        member finished, and it took the ending lock (in the same transaction, so a
        worker joining meanwhile sees either an unfinished run or an ending one)."""
        for attempt in self.retrying():
            with attempt:
                conn = self.pool.getconn()
                try:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINISH_LOCK,))
                    conn.execute("UPDATE workers SET finished = true WHERE worker_id = %s",
                                 (worker_id,))
                    row = conn.execute(
                        "SELECT count(*) FROM replay_progress JOIN workers USING (worker_id)"
                        " WHERE NOT finished"
                    ).fetchone()
                    ends = False
                    if row is not None and int(row[0]) == 0:
                        # A member restarted after finishing may end it instead: then
                        # this one has nothing left to do.
                        got = conn.execute("SELECT pg_try_advisory_lock(%s)",
                                           (ENDING_LOCK,)).fetchone()
                        ends = bool(got and got[0])
                    conn.commit()
                except BaseException:
                    conn.close()  # a session lock taken before the failure goes with it
                    self.pool.putconn(conn)
                    raise
                if ends:
                    self._ending = conn
                    return True
                self.pool.putconn(conn)
                return False
        raise AssertionError("unreachable")  # pragma: no cover

    def end_run(self) -> None:
        """The run is complete (every member finished, the queue empty): the next worker
        to join begins a new one. Releases the ending lock."""

        ending = self._ending
        if ending is None:
            raise EdpError("the replay run cannot end: this worker does not hold its lock")
        pid = ending.info.backend_pid

        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINISH_LOCK,))
            held = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND pid = %s AND classid = 0 AND objid = %s AND objsubid = 1",
                (pid, ENDING_LOCK),
            ).fetchone()
            if not (held and held[0]):
                raise EdpError(
                    "the replay run cannot end: the connection holding its ending lock was "
                    "lost (another member may be ending it); restart this worker to make sure"
                )
            row = conn.execute(
                "SELECT (SELECT count(*) FROM replay_progress JOIN workers USING (worker_id)"
                " WHERE NOT finished), (SELECT count(*) FROM replay_queue)"
            ).fetchone()
            if row is None or row[0] or row[1]:
                raise EdpError(
                    f"the replay run cannot end: {row and row[0]} worker(s) unfinished, "
                    f"{row and row[1]} event(s) still queued"
                )
            conn.execute("DELETE FROM replay_progress")

        try:
            self._run(work, pipeline=False)
        finally:
            self.release_ending()

    def claim_worker_id(self, worker_id: str, *, silent_for: float | None = None) -> None:
        """Hold, for this process's life, a session lock on ``worker_id``: two live
        processes under one id would share one clock (and, replaying, be taken for one
        member restarted, each queueing its part as the other's: events were lost). A
        killed process's lock goes with its connection.

        ``silent_for`` (``worker_timeout``): a holder whose worker has published no
        heartbeat for that long is taken for gone (a process cut off from the server,
        whose session the server still keeps): its session is ended and the lock
        taken. A live twin heartbeats: after that long, the claim is refused."""
        if self._member is not None:
            if self._still_held(self._member, worker_id):
                return
            log.warning("the session holding worker id %r was lost; taking it again",
                        worker_id)
            self.release_worker_id()
        conn = self.getconn()
        key = member_key(worker_id)
        started = time.monotonic()
        give_up = started + CLAIM_PATIENCE + (silent_for or 0.0)
        try:
            while True:
                held = self._try_lock(conn, key)
                if held or time.monotonic() > give_up:
                    break
                if (silent_for is not None and time.monotonic() > started + CLAIM_PATIENCE
                        and self._silent(conn, worker_id) > silent_for):
                    log.warning("worker id %r is held by a session whose worker has been "
                                "silent for over %gs: ending that session", worker_id,
                                silent_for)
                    unsigned = key % 2**64  # (pg_locks shows it as two 32-bit halves)
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE"
                        " locktype = 'advisory' AND granted AND objsubid = 1"
                        " AND classid::bigint = %s AND objid::bigint = %s",
                        (unsigned >> 32, unsigned & 0xFFFFFFFF))
                    conn.commit()
                time.sleep(0.2)  # (a process just killed: its session is on its way out)
        except BaseException:
            conn.close()
            self.pool.putconn(conn)
            raise
        if not held:
            self.pool.putconn(conn)
            raise EdpError(
                f"worker id {worker_id!r} is in use by another live process on this "
                f"database: give each worker its own worker_id ({WORKER_ID_HOW}); "
                "a worker restarted after a kill takes its id back once the server has seen "
                "the old process go (at once for a process killed; about a minute after "
                "its host was lost)"
            )
        self._member = conn

    @staticmethod
    def _silent(conn: psycopg.Connection[Any], worker_id: str) -> float:
        """Seconds since ``worker_id`` last published a heartbeat, by the server's clock
        (the workers' shared clock; inf: never)."""
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp()) - heartbeat_at"
                           " FROM workers WHERE worker_id = %s", (worker_id,)).fetchone()
        conn.commit()
        return math.inf if row is None or row[0] is None else float(row[0])

    @staticmethod
    def _try_lock(conn: psycopg.Connection[Any], key: int) -> bool:
        """Take the session advisory lock ``key`` if free (or already this session's:
        re-entrant, held until the session ends)."""
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        conn.commit()
        return bool(row and row[0])

    @classmethod
    def _still_held(cls, conn: psycopg.Connection[Any], worker_id: str) -> bool:
        """Whether ``conn``'s session is alive and holds ``worker_id``'s lock (taken again
        on it)."""
        try:
            return cls._try_lock(conn, member_key(worker_id))
        except psycopg.Error:
            return False

    def release_worker_id(self) -> None:
        """Give up this process's worker id (see :meth:`claim_worker_id`)."""
        conn, self._member = self._member, None
        if conn is None:
            return
        # The connection holds nothing but this lock (taken once per check: re-entrant),
        # so all its session locks go, and it goes back to the pool open: a closed one
        # makes psycopg's pool log a warning (at every clean stop of a daemon).
        try:
            conn.execute("SELECT pg_advisory_unlock_all()")
            conn.commit()
        except psycopg.Error:
            conn.close()  # (a lost session released its lock anyway)
        self.pool.putconn(conn)

    def release_ending(self) -> None:
        """Give up the ending lock (the run stays to be ended by a restarted member)."""
        conn, self._ending = self._ending, None
        if conn is None:
            return
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ENDING_LOCK,))
            conn.commit()
        except psycopg.Error:
            conn.close()  # a lost connection released the lock anyway
        self.pool.putconn(conn)

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


def server_clock(conn: psycopg.Connection[Any]) -> float:
    """The database server's clock, in epoch seconds, read on ``conn``."""
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
    assert row is not None
    return float(row[0])


__all__ = ["HEARTBEAT_SQL", "WorkerClocks", "heartbeat_params", "server_clock"]
