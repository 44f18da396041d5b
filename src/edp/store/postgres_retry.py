"""A write transaction that survives lost connections and deadlocks by running again.

The engine drives a transaction call by call (``load``, then ``save``, ...), and
computes each call's arguments from the results of the previous ones, so the
store cannot simply re-run the engine's code. Instead
:class:`RetryingTransaction` records every call with everything it read. When a
call or the commit fails with a transient error (lost connection, deadlock,
serialization failure, admin shutdown), it takes a fresh connection, replays the
recorded calls and compares what they read now with what they read then:

- the same: the engine's decisions still hold, so the failed call (or the commit)
  is tried again and the caller never notices;
- different: another worker changed that state meanwhile; the step fails with a
  :class:`~edp.errors.StoreError` and nothing of it is committed, so the caller
  does not acknowledge its input and the step runs again later (re-delivered
  events are duplicates, which change nothing).

A connection lost *during* COMMIT leaves the outcome unknown to the client, not to
the server: the transaction's id, read before the COMMIT, is looked up with
``txid_status``. Committed, the step is done (nothing is replayed, so nothing is
written twice: dead letters and counters neither); aborted, it is replayed as
above; still in progress (the server has not yet noticed the lost connection), its
server process is terminated first, after which the answer is final.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool
from tenacity import Retrying

from edp.core.events import ObjectEvent
from edp.errors import TransactionConflict
from edp.store.base import DeadLetter, LoadRequest, Queued, StepWrite, Timer, WorkingState
from edp.store.postgres_tx import PLAIN_INSERT_KEYS, PostgresTransaction

LOST: tuple[type[psycopg.Error], ...] = (
    psycopg.OperationalError,
    # The server ended a session idle in its transaction too long (a frozen worker,
    # see PostgresStore): SQLSTATE 25P03, an InternalError, but the connection is
    # gone like any other lost one.
    psycopg.errors.IdleInTransactionSessionTimeout,
)
"""Errors after which the connection is gone and the transaction can run again."""

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryingTransaction:
    """A :class:`~edp.store.base.Transaction` on a pooled connection, retried whole."""

    def __init__(
        self,
        pool: ConnectionPool[psycopg.Connection[Any]],
        retrying: Callable[[], Retrying],
        *,
        shard: int,
        pool_wait: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.retrying = retrying
        self.shard = shard
        self.pool_wait = pool_wait
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any], int]] = []
        self.conn: psycopg.Connection[Any] | None = None
        self.tx: PostgresTransaction | None = None
        self.replays = 0
        self._old_reads: list[Any] = []
        self.plain_inserts = True
        """Whether the step's new rows are inserted plainly (see PostgresTransaction);
        turned off, for the rest of the step, by a row that existed after all."""

    # -- the Transaction protocol -------------------------------------------------------
    def load(self, request: LoadRequest) -> WorkingState:
        """Lock and load the step's working set."""
        result: WorkingState = self._call("load", request)
        return result

    def save(self, write: StepWrite, *, sinks: Sequence[str], now: float) -> None:
        """Write the step's changes and outbox events."""
        self._call("save", write, sinks=sinks, now=now)

    def add_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Keep inputs that could not be decoded."""
        self._call("add_dead_letters", letters)

    def add_counters(self, counts: Mapping[str, int]) -> None:
        """Add to named counters."""
        self._call("add_counters", dict(counts))

    def add_outbox(
        self, *, event_id: str, kind: str, payload: str, sinks: Sequence[str], now: float
    ) -> bool:
        """Record one event to deliver; False if its id exists."""
        result: bool = self._call(
            "add_outbox", event_id=event_id, kind=kind, payload=payload, sinks=sinks, now=now
        )
        return result

    def set_timer(self, kind: str, key: str, *, due_at: float, payload: str) -> bool:
        """Start a durable timer unless (kind, key) already runs."""
        result: bool = self._call("set_timer", kind, key, due_at=due_at, payload=payload)
        return result

    def take_due_timers(self, kind: str, *, until: float, limit: int) -> list[Timer]:
        """Remove and return due timers of ``kind``."""
        result: list[Timer] = self._call("take_due_timers", kind, until=until, limit=limit)
        return result

    def clear_timer(self, kind: str, key: str) -> None:
        """Remove the timer (kind, key) if it exists."""
        self._call("clear_timer", kind, key)

    def heartbeat(
        self, worker_id: str, *, clock: float, now: float, held: float | None = None,
        held_until: float | None = None, finished: bool = False,
    ) -> None:
        """Publish a worker's clock (and hold) with the commit."""
        self._call("heartbeat", worker_id, clock=clock, now=now, held=held,
                   held_until=held_until, finished=finished)

    def queue_events(
        self, worker_id: str, events: Sequence[tuple[int, float, ObjectEvent]]
    ) -> None:
        """Queue a replay worker's events."""
        self._call("queue_events", worker_id, events)

    def take_queued(self, *, limit: int, now: float, timeout: float) -> Queued | None:
        """Take the apply lock and the next queued events below the workers' floor."""
        result: Queued | None = self._call("take_queued", limit=limit, now=now, timeout=timeout)
        return result

    # -- end --------------------------------------------------------------------------------
    def commit(self) -> None:
        """Commit, replaying the transaction on a new connection if the link broke (and
        the server did not commit it: see the module's docstring)."""
        try:
            self._upserts_if_need_be(self._commit)
        except BaseException:
            self.rollback()  # (and the connection goes back to the pool)
            raise

    def _commit(self) -> None:
        # The transaction (id, server process) whose COMMIT went unanswered, if any
        unknown: tuple[int, int] | None = None
        for attempt in self.retrying():
            with attempt:
                if unknown is not None:
                    if self._committed(*unknown):
                        break
                    unknown = None  # aborted: replayed on the new connection below
                conn = self._connection()
                assert self.tx is not None
                try:
                    row = conn.execute("SELECT txid_current(), pg_backend_pid()").fetchone()
                    sent = None if row is None else (int(row[0]), int(row[1]))
                    self.tx.send_copies()
                    with conn.pipeline():  # the queued writes and COMMIT: one round trip
                        self.tx.send_queued()
                        unknown = sent
                        conn.commit()
                    unknown = None
                except LOST:
                    self._drop()
                    raise
        self._release()

    def _upserts_if_need_be(self, run: Callable[[], T]) -> T:
        """``run()``; if a plain insert of its step met an existing row: roll back, and
        ``run()`` again, which replays the step's calls with upserts first (as after a
        lost connection). Any other unique violation is a real conflict: it is raised."""
        try:
            return run()
        except psycopg.errors.UniqueViolation as exc:
            if not self.plain_inserts or exc.diag.constraint_name not in PLAIN_INSERT_KEYS:
                raise
            log.warning("a step's new row existed (%s: a key counted under two prefixes, by"
                        " workers or runs of different prefix depths?); it runs again with"
                        " upserts", exc.diag.constraint_name)
            self.plain_inserts = False
            self._drop()
        return run()

    def _committed(self, xid: int, pid: int) -> bool:
        """Whether the server committed transaction ``xid`` (False: it aborted). A
        transaction still in progress (its server process has not noticed the lost
        connection yet) is ended first: its process is terminated, which commits
        nothing more, and the answer is then final. Raises a lost-connection error, to
        be tried again, while the server cannot be asked."""
        with self.pool.connection(timeout=self.pool_wait()) as conn:
            try:
                row = conn.execute("SELECT txid_status(%s)", (xid,)).fetchone()
                if row is not None and row[0] == "in progress":
                    # (only the process still running that transaction: a pid reused
                    # meanwhile by another session is left alone)
                    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                 " WHERE pid = %s AND backend_xid::text::bigint = %s",
                                 (pid, xid % 2**32))
                    for _ in range(50):  # (it ends within moments)
                        row = conn.execute("SELECT txid_status(%s)", (xid,)).fetchone()
                        if row is None or row[0] != "in progress":
                            break
                        time.sleep(0.1)
            except psycopg.errors.InvalidParameterValue:
                # "transaction ID ... is in the future": a server that never saw it (a
                # replica promoted after a failover): not committed there
                conn.rollback()
                return False
        status = None if row is None else row[0]
        if status == "in progress":
            raise psycopg.OperationalError(
                f"transaction {xid}, whose COMMIT went unanswered, is still in progress")
        if status == "committed":
            log.warning("a step's COMMIT went unanswered but the server had committed it; "
                        "it is done")
            return True
        return False

    def rollback(self) -> None:
        """Roll back and give the connection back to the pool."""
        if self.conn is not None:
            try:
                self.conn.rollback()
            except psycopg.Error:
                log.debug("rollback failed; the connection is dropped", exc_info=True)
        self._release()

    # -- internals --------------------------------------------------------------------------
    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        # (a call may send the queued writes: see PostgresTransaction.flush)
        return self._upserts_if_need_be(lambda: self._try_call(name, *args, **kwargs))

    def _try_call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        for attempt in self.retrying():
            with attempt:
                self._connection()
                assert self.tx is not None
                try:
                    result = getattr(self.tx, name)(*args, **kwargs)
                except LOST:
                    self._drop()
                    raise
        assert self.tx is not None
        self.calls.append((name, args, kwargs, len(self.tx.reads)))
        return result

    def _connection(self) -> psycopg.Connection[Any]:
        """The transaction's connection; a new one replays the calls made so far."""
        if self.conn is not None:
            return self.conn
        conn = self.pool.getconn(timeout=self.pool_wait())
        tx = PostgresTransaction(conn, shard=self.shard, plain_inserts=self.plain_inserts)
        self.conn, self.tx = conn, tx
        if not self.calls:
            return conn
        before = self._old_reads
        self.replays += 1
        log.warning("replaying a transaction of %d calls after a transient error",
                    len(self.calls))
        try:
            for name, args, kwargs, _ in self.calls:
                getattr(tx, name)(*args, **kwargs)
        except LOST:
            self.rollback()  # keeps the reads of the first run to compare with
            raise
        if tx.reads != before:
            self.rollback()
            raise TransactionConflict(
                "the store changed while a step was being retried after a lost connection;"
                " the step was rolled back and must run again"
            )
        return conn

    def _drop(self) -> None:
        """Forget the failed connection (the pool discards it if it is broken)."""
        if self.tx is not None and self.calls:
            self._old_reads = self.tx.reads[: self.calls[-1][3]]
        elif self.tx is not None:
            self._old_reads = []
        self.rollback()

    def _release(self) -> None:
        if self.conn is not None:
            conn, self.conn, self.tx = self.conn, None, None
            self.pool.putconn(conn)


__all__ = ["RetryingTransaction", "TransactionConflict"]
