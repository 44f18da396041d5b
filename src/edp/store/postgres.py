"""The production store: PostgreSQL through psycopg 3 and a connection pool.

Any number of worker processes may share one database; see
:mod:`edp.store.postgres_tx` for how a step locks what it touches. Lost
connections, deadlocks and serialization failures are retried with backoff:
a write transaction is retried *whole* (see :class:`RetryingTransaction`), and
nothing is acknowledged to a source before its transaction committed.

``postgresql://user:pass@host:port/db?sslmode=...`` (any libpq URL) opens it;
opening migrates the schema under an advisory lock, so workers that start at
once do not migrate twice.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout
from tenacity import (
    RetryCallState,
    Retrying,
    before_sleep_log,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from edp.core.batching import ObjectRecord
from edp.errors import StoreError
from edp.redact import redact_text
from edp.store.base import (
    HISTORY_KIND,
    BatchRow,
    DeadLetter,
    HistoryPruned,
    OutboxEntry,
    ParkedDelivery,
    SinkSummary,
    Transaction,
    pick_batch,
)
from edp.store.migrations import (
    LIVE_WORKERS,
    latest_version,
    plan_upgrade,
    refuse_foreign,
    refuse_newer,
)
from edp.store.postgres_retry import LOST, RetryingTransaction
from edp.store.postgres_tx import BATCH_COLUMNS
from edp.store.postgres_workers import WorkerClocks, server_clock

log = logging.getLogger(__name__)
T = TypeVar("T")

IDLE_IN_TRANSACTION = 60.0
"""Seconds a session may sit idle inside a transaction before the server ends it
(``idle_in_transaction_session_timeout``); workers set ``worker_timeout``."""
POOL_WAIT_SLICE = 1.0
"""Seconds one try waits for a pooled connection while a stop may come (a daemon's
run, see PostgresStore.stop_retrying_on): the retries go on for retry_seconds in all.
(Only a daemon's main thread uses its pool, so a wait is long only in an outage.)"""
MIGRATION_LOCK = 0x65647001  # pg_advisory_xact_lock key of schema migrations ("edp" 1)


PARKED_SQL = (
    "SELECT d.sink, d.event_id, o.kind, o.payload, d.last_error, d.attempts FROM deliveries d"
    " JOIN outbox o ON o.seq = d.seq WHERE d.delivered_at IS NULL AND d.parked"
    " ORDER BY d.seq DESC, d.sink LIMIT %s"
)


def sink_summaries_sql(*, one: bool) -> str:
    """Known sinks with their delivery counts; ``one``: only the sink named by ``%s``
    (given twice)."""
    sinks, deliveries = ("WHERE name = %s", "WHERE sink = %s") if one else ("", "")
    return (
        "SELECT name, max(registered_at), sum(pending)::bigint, sum(parked)::bigint,"  # noqa: S608
        " sum(delivered)::bigint FROM (SELECT name, registered_at, 0 AS pending,"
        f" 0 AS parked, 0 AS delivered FROM sinks {sinks} UNION ALL"
        " SELECT sink, NULL, count(*) FILTER (WHERE delivered_at IS NULL AND NOT parked),"
        " count(*) FILTER (WHERE delivered_at IS NULL AND parked),"
        " count(*) FILTER (WHERE delivered_at IS NOT NULL)"
        f" FROM deliveries {deliveries} GROUP BY sink) AS s GROUP BY name ORDER BY name"
    )


PENDING_SQL = (
    "WITH picked AS (SELECT d.sink, d.seq FROM deliveries d"
    " WHERE d.sink = %s AND d.delivered_at IS NULL AND NOT d.parked"
    " AND d.next_attempt <= %s AND d.seq < coalesce((SELECT min(w.seq)"
    # The barrier (the first undelivered event that waits for its retry) names the sink
    # by parameter, not as d.sink: computed once, not once per candidate row.
    " FROM deliveries w WHERE w.sink = %s AND w.delivered_at IS NULL"
    " AND NOT w.parked AND w.next_attempt > %s), 9223372036854775807)"
    " AND (d.claimed_until IS NULL OR d.claimed_until <= %s"
    " OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = d.claimed_by))"
    " ORDER BY d.seq LIMIT %s FOR UPDATE OF d SKIP LOCKED)"
    " UPDATE deliveries d SET claimed_by = pg_backend_pid(), claimed_until = %s"
    " FROM picked JOIN outbox o ON o.seq = picked.seq"
    " WHERE d.sink = picked.sink AND d.seq = picked.seq"
    " RETURNING o.seq, o.event_id, o.kind, o.payload, o.created_at"
)
"""Lease the next pending deliveries of a sink (see :meth:`PostgresStore.pending`)."""


def pending_params(sink: str, *, limit: int, now: float, lease: float) -> tuple[Any, ...]:
    """The parameters of :data:`PENDING_SQL`."""
    return (sink, now, sink, now, now, limit, now + lease)


TCP_DEFAULTS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                "keepalives_count": 3, "tcp_user_timeout": 30000}
"""libpq connection parameters edp sets unless ``database_url`` sets them."""
SERVER_KEEPALIVES = {"tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10",
                     "tcp_keepalives_count": "3"}
"""The server's TCP keepalive for edp's sessions (ignored on a Unix socket)."""


class _OneMoreTry(stop_base):
    """Stop retrying once ``event`` is set and one more try failed (a stale pooled
    connection or a deadlock at a normal stop still gets its retry; an outage does not
    hold the stop for retry_seconds)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.seen_at: int | None = None

    def __call__(self, retry_state: RetryCallState) -> bool:
        if not self.event.is_set():
            return False
        if self.seen_at is None:
            self.seen_at = retry_state.attempt_number
        return retry_state.attempt_number > self.seen_at


def _reason(error: BaseException | None) -> str:
    """A server's or libpq's error on one line (libpq's hold line breaks and tabs),
    passwords masked."""
    return " ".join(redact_text(str(error)).split())


def holds_edp_store(url: str) -> bool | None:
    """Whether the PostgreSQL database ``url`` holds an edp store (a
    ``schema_migrations`` table and edp's ``batches``); None when it cannot be asked
    (opening it as a store then retries and says why)."""
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL"
                               " AND to_regclass('batches') IS NOT NULL").fetchone()
    except psycopg.Error:
        return None
    return None if row is None else bool(row[0])


def applied_version(url: str) -> int | None:
    """The highest migration version recorded in the PostgreSQL store ``url``, read in
    a read-only transaction, without opening it as a store (which would migrate it):
    ``edp db status`` must not change what it reports on."""
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.read_only = True
            row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    except psycopg.Error as exc:
        raise StoreError(f"cannot read the schema version of {redact_text(url)}: "
                         f"{_reason(exc)}") from None
    return None if row is None or row[0] is None else int(row[0])


class PostgresStore(WorkerClocks):
    """The PostgreSQL store (see :class:`~edp.store.base.Store`).

    ``retry_seconds`` bounds how long an operation is retried on lost connections,
    deadlocks and serialization failures; ``delivery_lease`` is how long a relay
    holds the outbox rows it took (a lease also ends when its connection is gone).
    ``fast_unsafe`` turns off ``synchronous_commit`` (a crash may lose the last
    commits, never corrupt the store).
    """

    def __init__(
        self,
        url: str,
        *,
        fast_unsafe: bool = False,
        pool_size: int = 4,
        retry_seconds: float = 30.0,
        delivery_lease: float = 60.0,
        idle_in_transaction: float | None = None,
    ) -> None:
        self.url = redact_text(url)
        self.keeps_objects = True
        self.shared = True
        self.retry_seconds = retry_seconds
        self._interrupt: threading.Event | None = None
        self.delivery_lease = delivery_lease
        self.local_clock = time.time
        # Counter rows are sharded per store so that workers do not queue on them.
        self.shard = random.randrange(64)
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            # libpq's message quotes the offending part, which may be the password.
            raise StoreError(
                f"database_url {self.url!r} is not a valid libpq URL or connection string"
                " (check the percent-encoding of its user name and password)"
            ) from None
        limit = IDLE_IN_TRANSACTION if idle_in_transaction is None else idle_in_transaction
        idle_ms = max(1000, min(int(limit * 1000), 2**31 - 1))
        kwargs: dict[str, Any] = {"autocommit": False}
        if "application_name" not in params:
            kwargs["application_name"] = "edp"
        # A server that vanishes without a word (a network partition, a host gone)
        # would leave a query waiting for hours (the kernel's keepalive defaults): the
        # connection counts as lost after ~25 s idle, or 30 s of data unacknowledged,
        # and is retried like any lost one. The URL's own values win.
        for name, value in TCP_DEFAULTS.items():
            if name not in params:
                kwargs[name] = value

        def configure(conn: psycopg.Connection[Any]) -> None:
            # Statements are prepared (psycopg does it after a few runs), but planned
            # for every run: a generic plan made while a table was small (a seq scan
            # of an empty key_memory) would stay for the connection's life where
            # statistics lag (autovacuum off or behind), and a step of 1 key and one
            # of 2,000 keys want different plans anyway.
            conn.execute("SET plan_cache_mode = force_custom_plan")
            # A worker frozen inside a step (SIGSTOP, a paused container, a VM stall)
            # keeps its prefix rows locked, and every other worker's step on those
            # prefixes would wait for it for as long as it is frozen: the server ends
            # a session idle in a transaction that long (its step is rolled back, its
            # input not acknowledged, so it comes again), and the others go on.
            conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                (str(idle_ms),))
            if fast_unsafe:
                conn.execute("SET synchronous_commit = off")
            # The server's side of the keepalive too: a worker whose host is lost sends
            # no FIN, and its session (its worker id's lock, see claim_worker_id) would
            # stay for the kernel's two hours; this way the server drops it in ~1 min.
            for name, value in SERVER_KEEPALIVES.items():
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))
            conn.commit()

        self._reach(url, kwargs, retry_seconds)
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url, min_size=1, max_size=pool_size, kwargs=kwargs, configure=configure,
            open=False, timeout=retry_seconds, name="edp",
        )
        try:
            self.pool.open(wait=True, timeout=retry_seconds)
            self.upgrade()
        except (psycopg.Error, OSError) as exc:
            self.pool.close()
            raise StoreError(
                f"cannot open PostgreSQL database {self.url}: {redact_text(str(exc))}"
            ) from None

    def _reach(self, url: str, kwargs: dict[str, Any], patience: float) -> None:
        """Connect once before the pool does: a server that answers "no" (no such
        database or role, authentication failed) is an error at once, naming why; one
        that does not answer (down, starting) is tried again for ``patience`` seconds,
        and the last reason is the error's. (The pool's own retries would wait it all
        out in either case, and end with only "pool initialization incomplete".)"""

        def connect() -> None:
            psycopg.connect(url, connect_timeout=10, **kwargs).close()

        def waiting(state: RetryCallState) -> None:
            # One warning that says why and for how long; each further try at debug (a
            # line per try, naming tenacity's wrapper, buried the final error).
            error = state.outcome.exception() if state.outcome is not None else None
            reason = _reason(error)
            if state.attempt_number == 1:
                log.warning("PostgreSQL database %s does not answer (%s): trying again for "
                            "up to %gs", self.url, reason, patience)
            else:
                log.debug("PostgreSQL database %s, try %d: %s", self.url,
                          state.attempt_number, reason)

        try:
            Retrying(
                retry=retry_if_exception(lambda exc: isinstance(exc, psycopg.OperationalError)
                                         and not _refused_for_good(str(exc))),
                stop=stop_after_delay(patience),
                wait=wait_random_exponential(multiplier=0.25, max=5.0),
                before_sleep=waiting,
                reraise=True,
            )(connect)
        except psycopg.OperationalError as exc:
            raise StoreError(f"cannot open PostgreSQL database {self.url}: "
                             f"{_reason(exc)}") from None

    @classmethod
    def from_url(cls, url: str, *, fast_unsafe: bool = False,
                 idle_in_transaction: float | None = None) -> PostgresStore:
        """Open ``postgresql://...`` (or ``postgres://...``)."""
        return cls(url, fast_unsafe=fast_unsafe, idle_in_transaction=idle_in_transaction)

    # -- plumbing -------------------------------------------------------------------
    def retrying(self) -> Retrying:
        """The retry policy: lost connections, deadlocks, serialization failures."""
        stop: stop_base = stop_after_delay(self.retry_seconds)
        if self._interrupt is not None:
            stop = stop | _OneMoreTry(self._interrupt)
        return Retrying(
            retry=retry_if_exception_type(LOST),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            stop=stop,
            before_sleep=self._log_retry,
            reraise=True,
        )

    def _log_retry(self, state: RetryCallState) -> None:
        # A wait for a pooled connection cut into slices (see stop_retrying_on) ends in
        # PoolTimeout every second of an outage: those at debug (the pool says at
        # warning why it cannot connect, and the first error of a step was said).
        error = state.outcome.exception() if state.outcome is not None else None
        sliced = isinstance(error, PoolTimeout) and self.pool_wait() is not None
        before_sleep_log(log, logging.DEBUG if sliced else logging.WARNING)(state)

    def stop_retrying_on(self, event: threading.Event | None) -> None:
        """See :meth:`~edp.store.base.Store.stop_retrying_on`. Until then, a wait for a
        pooled connection is cut into slices, so that the event is seen."""
        self._interrupt = event

    def getconn(self) -> psycopg.Connection[Any]:
        """A pooled connection, for work outside a retry loop: waited for as long as the
        retries last, or until a stop (see :meth:`stop_retrying_on`), then PoolTimeout."""
        for attempt in self.retrying():  # (PoolTimeout is a lost connection's error)
            with attempt:
                return self.pool.getconn(timeout=self.pool_wait())
        raise AssertionError("unreachable")  # pragma: no cover

    def pool_wait(self) -> float | None:
        """How long one try waits for a pooled connection (None: the pool's timeout)."""
        return None if self._interrupt is None else POOL_WAIT_SLICE

    def _run(self, work: Callable[[psycopg.Connection[Any]], T], *, pipeline: bool = True) -> T:
        """Run ``work`` in its own transaction, retried whole on transient errors.

        ``work`` runs in pipeline mode, with the COMMIT queued after it: a ``work``
        that only sends statements costs one round trip.
        """
        for attempt in self.retrying():
            with attempt, self.pool.connection(timeout=self.pool_wait()) as conn:
                if not pipeline:
                    return work(conn)
                with conn.pipeline():
                    result = work(conn)
                    conn.commit()
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        cur = self._run(lambda conn: conn.execute(sql, params))
        return cur.fetchall()

    # -- schema -------------------------------------------------------------------------
    def upgrade(self) -> list[int]:
        """Apply pending migrations under an advisory lock; returns the versions applied."""

        def work(conn: psycopg.Connection[Any]) -> list[int]:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
                " name text NOT NULL, applied_at double precision NOT NULL)"
            )
            row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
            current = row[0] if row else None
            ours = conn.execute("SELECT to_regclass('batches') IS NOT NULL").fetchone()
            refuse_foreign(bool(ours and ours[0]), current, self.url)
            refuse_newer("postgres", current, self.url)
            # (heartbeats are written by the server's clock, which this host's may not
            # read: an upgrade run from an operator's machine)
            pending = plan_upgrade("postgres", current, self.url, lambda since: conn.execute(
                LIVE_WORKERS.format("%s"), (since,)).fetchall(), lambda: server_clock(conn))
            applied = []
            for migration in pending:
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (%s, %s, %s)",
                    (migration.version, migration.name, time.time()),
                )
                log.info("applied migration %s to %s", migration.name, self.url)
                applied.append(migration.version)
            return applied

        return self._run(work, pipeline=False)

    def schema_version(self) -> tuple[int, int]:
        """(applied, latest) migration versions."""
        current = self._rows("SELECT max(version) FROM schema_migrations")[0][0]
        return int(current or 0), latest_version("postgres")

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A write transaction: commits on success, rolls back on error, retried whole."""
        tx = RetryingTransaction(self.pool, self.retrying, shard=self.shard,
                                 pool_wait=self.pool_wait)
        try:
            yield tx
        except BaseException:
            tx.rollback()
            raise
        tx.commit()

    # -- outbox -------------------------------------------------------------------------
    def pending(self, sink: str, *, limit: int, now: float) -> list[OutboxEntry]:
        """Take (lease) outbox events not yet delivered to ``sink``, oldest first, none
        past an undelivered one that waits for its retry (order per sink).

        Unlike SQLite's, these rows are then held for ``delivery_lease`` seconds, or
        until the taking connection is gone, so that concurrent relays do not send
        the same event twice; a later call returns the next ones.
        """
        rows = self._rows(PENDING_SQL, pending_params(sink, limit=limit, now=now,
                                                      lease=self.delivery_lease))
        return [OutboxEntry(*row) for row in sorted(rows)]

    def mark_delivered(self, sink: str, event_ids: Sequence[str], *, now: float) -> None:
        """Record that ``sink`` accepted these events."""
        self._run(lambda conn: conn.execute(
            "UPDATE deliveries SET delivered_at = %s, attempts = attempts + 1,"
            " last_error = NULL, claimed_by = NULL, claimed_until = NULL"
            " WHERE sink = %s AND event_id = ANY(%s::text[])",
            (now, sink, list(event_ids)),
        ))

    def mark_failed(
        self, sink: str, event_id: str, *, error: str, retry_at: float | None, now: float
    ) -> None:
        """Record a failed attempt; ``retry_at=None`` parks the event."""
        self._run(lambda conn: conn.execute(
            "UPDATE deliveries SET attempts = attempts + 1, last_error = %s,"
            " next_attempt = %s, parked = %s, claimed_by = NULL, claimed_until = NULL"
            " WHERE sink = %s AND event_id = %s",
            (error[:2000], retry_at or now, retry_at is None, sink, event_id),
        ))

    def next_timer_due(self) -> float | None:
        """The earliest ``due_at`` of any durable timer."""
        [(due,)] = self._rows("SELECT min(due_at) FROM timers", ())
        return None if due is None else float(due)

    def known_sinks(self) -> list[str]:
        """Names of the registered sinks and of every sink that has delivery rows."""
        return [row[0] for row in self._rows(
            "SELECT name FROM sinks UNION SELECT DISTINCT sink FROM deliveries ORDER BY 1", ()
        )]

    def registered_sinks(self) -> list[str]:
        """Names of the sinks workers registered at their start."""
        return [row[0] for row in self._rows("SELECT name FROM sinks ORDER BY 1")]

    def register_sinks(self, names: Sequence[str], *, now: float) -> None:
        """Record the sinks a long-running worker relays to."""
        if not names:
            return

        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute("INSERT INTO sinks (name, registered_at) SELECT n, %s"
                         " FROM unnest(%s::text[]) AS n ON CONFLICT (name) DO NOTHING",
                         (now, sorted(set(names))))

        self._run(work, pipeline=False)

    def requeue(self, event_id: str, sinks: Sequence[str]) -> bool:
        """Make ``event_id`` pending again for ``sinks``; False if it is unknown."""

        def work(conn: psycopg.Connection[Any]) -> bool:
            # (FOR SHARE: history pruning skips the row meanwhile, see prune_history)
            row = conn.execute("SELECT seq FROM outbox WHERE event_id = %s FOR SHARE",
                               (event_id,)).fetchone()
            if row is None:
                return False
            conn.execute(
                "INSERT INTO deliveries (sink, seq, event_id)"
                " SELECT s, %s, %s FROM unnest(%s::text[]) AS s"
                " ON CONFLICT (sink, seq) DO UPDATE SET delivered_at = NULL, next_attempt = 0,"
                " parked = false, claimed_by = NULL, claimed_until = NULL",
                (row[0], event_id, list(sinks)),
            )
            return True

        return self._run(work)

    def sink_summaries(self) -> list[SinkSummary]:
        """Every known sink with its delivery counts, by name."""
        return [SinkSummary(*row) for row in self._rows(sink_summaries_sql(one=False))]

    def parked_deliveries(self, *, limit: int = 20) -> list[ParkedDelivery]:
        """The latest deliveries refused for good, newest first."""
        return [ParkedDelivery(*row) for row in self._rows(PARKED_SQL, (limit,))]

    def forget_sink(self, name: str) -> SinkSummary | None:
        """Drop a sink's registration and delivery rows; what it held, or None."""

        def work(conn: psycopg.Connection[Any]) -> SinkSummary | None:
            row = conn.execute(sink_summaries_sql(one=True), (name, name)).fetchone()
            conn.execute("DELETE FROM sinks WHERE name = %s", (name,))
            conn.execute("DELETE FROM deliveries WHERE sink = %s", (name,))
            return None if row is None else SinkSummary(*row)

        return self._run(work, pipeline=False)

    # -- inspection -----------------------------------------------------------------------
    def get_batch(self, batch_id: str) -> BatchRow:
        """One batch by id, or by a unique id prefix."""
        if "\x00" in batch_id:  # (no PostgreSQL text holds one: no batch id has one)
            return pick_batch(batch_id, [])
        pattern = batch_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._rows(
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id = %s"  # noqa: S608
            f" UNION ALL (SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id LIKE %s"
            " AND batch_id <> %s ORDER BY batch_id LIMIT 2)",
            (batch_id, pattern, batch_id),
        )
        return pick_batch(batch_id, rows)

    def list_batches(self, *, state: str | None = None, limit: int = 50) -> list[BatchRow]:
        """Open batches by deadline, then recent closed batches, newest first."""
        out: list[BatchRow] = []
        if state in (None, "open"):
            out += self.open_batches_by_deadline(limit=limit)
        if state in (None, "closed"):
            rows = self._rows(
                f"SELECT {BATCH_COLUMNS} FROM batches WHERE state = 'closed'"  # noqa: S608
                " ORDER BY fired_at DESC, batch_id LIMIT %s",
                (limit,),
            )
            out += [BatchRow(*row) for row in rows]
        return out

    def open_batches_by_deadline(self, *, limit: int) -> list[BatchRow]:
        """The open batches with the earliest deadlines."""
        rows = self._rows(
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE state = 'open'"  # noqa: S608
            " ORDER BY deadline, bucket, prefix LIMIT %s",
            (limit,),
        )
        return [BatchRow(*row) for row in rows]

    def batch_objects(self, batch_id: str) -> list[ObjectRecord]:
        """The objects of one batch, by key."""
        rows = self._rows(
            "SELECT batch_id, key, size, etag, sequencer, event_time FROM batch_objects"
            " WHERE batch_id = %s ORDER BY key",
            (batch_id,),
        )
        return [ObjectRecord(*row) for row in rows]

    def outbox_events(self, *, limit: int = 50) -> list[OutboxEntry]:
        """The most recent outbox events, newest first."""
        rows = self._rows(
            "SELECT seq, event_id, kind, payload, created_at FROM outbox"
            " ORDER BY seq DESC LIMIT %s",
            (limit,),
        )
        return [OutboxEntry(*row) for row in rows]

    def dead_letters(self, *, limit: int = 50) -> list[DeadLetter]:
        """The most recent dead letters, newest first."""
        rows = self._rows(
            "SELECT source, location, reason, body, received_at, id FROM dead_letters"
            " ORDER BY id DESC LIMIT %s",
            (limit,),
        )
        return [DeadLetter(*row) for row in rows]

    def counters(self) -> dict[str, int]:
        """Every counter (the sum of its shards)."""
        rows = self._rows("SELECT name, sum(value) FROM counters GROUP BY name ORDER BY name")
        return {name: int(value) for name, value in rows}

    def stats(self) -> dict[str, int]:
        """Open and closed batches, pending and parked deliveries, dead letters."""
        row = self._rows(
            "SELECT (SELECT count(*) FROM batches WHERE state = 'open'),"
            " (SELECT count(*) FROM batches WHERE state = 'closed'),"
            " (SELECT count(*) FROM deliveries WHERE delivered_at IS NULL AND NOT parked),"
            " (SELECT count(*) FROM deliveries WHERE delivered_at IS NULL AND parked),"
            " (SELECT count(*) FROM dead_letters)"
        )[0]
        names = ("open_batches", "closed_batches", "pending_deliveries", "parked_deliveries",
                 "dead_letters")
        return {name: int(value) for name, value in zip(names, row, strict=True)}

    # -- housekeeping (the workers' clocks: see WorkerClocks) ------------------------------
    def prune(self, *, keys_before: float, keep_buckets: Sequence[str] = ()) -> int:
        """Forget key memories and fingerprints last seen before ``keys_before``; a key of
        a batch still open is kept (an overwrite of it must not count again, SPEC 3.3),
        and so is every key of ``keep_buckets``."""

        def work(conn: psycopg.Connection[Any]) -> int:
            # "Its batch is closed", not "its batch is not open": a row a step changes
            # meanwhile (the DELETE waits on its lock) is checked again as the step left
            # it, but against this statement's snapshot, in which a batch the step just
            # opened does not exist. (A step whose clock is behind by more than the
            # retention, a backlog's or a replay's, leaves seen_at old.)
            gone = conn.execute(
                "DELETE FROM key_memory WHERE seen_at < %s AND (batch_id IS NULL OR EXISTS ("
                "SELECT 1 FROM batches b WHERE b.batch_id = key_memory.batch_id"
                " AND b.state = 'closed')) AND bucket <> ALL(%s::text[])",
                (keys_before, sorted(set(keep_buckets))),
            ).rowcount
            gone += conn.execute(
                "DELETE FROM fingerprints WHERE seen_at < %s", (keys_before,)
            ).rowcount
            return gone

        return self._run(work, pipeline=False)

    def prune_history(self, *, before: float, limit: int) -> HistoryPruned:
        """Delete a page of delivered events, their fired batches and old dead letters."""

        def work(conn: psycopg.Connection[Any]) -> HistoryPruned:
            events = conn.execute(
                "SELECT seq, event_id FROM outbox o WHERE created_at < %s AND kind = %s"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = o.event_id"
                " AND d.delivered_at IS NULL)"
                " ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (before, HISTORY_KIND, limit),
            ).fetchall()
            # (a delivery an operator's reemit made pending meanwhile stays, and so does
            # its event)
            conn.execute("DELETE FROM deliveries WHERE event_id = ANY(%s)"
                         " AND delivered_at IS NOT NULL",
                         ([event_id for _, event_id in events],))
            gone = conn.execute(
                "DELETE FROM outbox o WHERE seq = ANY(%s) AND NOT EXISTS ("
                "SELECT 1 FROM deliveries d WHERE d.event_id = o.event_id)",
                ([seq for seq, _ in events],),
            ).rowcount
            batches = [row[0] for row in conn.execute(
                "SELECT batch_id FROM batches b WHERE state = 'closed' AND fired_at < %s"
                " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = b.event_id)"
                " ORDER BY fired_at LIMIT %s FOR UPDATE SKIP LOCKED", (before, limit),
            )]
            # (their keys' memories name no batch from now on: a memory naming a batch
            # the store does not hold is never pruned, see prune; one a step moved to
            # another batch meanwhile is checked again as the step left it. Locked in
            # (bucket, key) order first, the order of a step's own locks on key memories:
            # an UPDATE's join locks rows in whatever order its plan reads them, and a
            # step and a prune could each wait for a row the other holds.)
            conn.execute(
                "UPDATE key_memory k SET batch_id = NULL FROM (SELECT m.bucket, m.key"
                " FROM batch_objects o JOIN batches b ON b.batch_id = o.batch_id"
                " JOIN key_memory m ON m.bucket = b.bucket AND m.key = o.key"
                " AND m.batch_id = o.batch_id WHERE o.batch_id = ANY(%s)"
                " ORDER BY m.bucket, m.key FOR UPDATE OF m) u"
                " WHERE k.bucket = u.bucket AND k.key = u.key AND k.batch_id = ANY(%s)",
                (batches, batches),
            )
            conn.execute("DELETE FROM batch_objects WHERE batch_id = ANY(%s)", (batches,))
            conn.execute("DELETE FROM batches WHERE batch_id = ANY(%s)", (batches,))
            letters = conn.execute(
                "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters"
                " WHERE received_at < %s ORDER BY received_at LIMIT %s)", (before, limit),
            ).rowcount
            return HistoryPruned(gone, len(batches), letters,
                                 limit in (len(events), len(batches), letters))

        return self._run(work, pipeline=False)

    def close(self) -> None:
        """Close every pooled connection (a replay run's ending lock and this process's
        worker id are given up)."""
        self.release_ending()
        self.release_worker_id()
        self.pool.close()


_FOR_GOOD = ("does not exist", "password authentication failed", "no pg_hba.conf entry",
             "authentication failed", "SSL is not enabled on the server")
"""Parts of a server's FATAL answer that no retry changes (a server starting up, or
out of connection slots, is answered by a retry)."""


_CLIENT_FOR_GOOD = ("server does not support SSL", "root certificate file",
                    "certificate verify failed", "invalid sslmode value",
                    "could not open certificate file", "could not load private key")
"""Parts of libpq's own refusals (TLS settings the server or the files cannot meet) that
no retry changes."""


def _refused_for_good(reason: str) -> bool:
    return (("FATAL:" in reason and any(part in reason for part in _FOR_GOOD))
            or any(part in reason for part in _CLIENT_FOR_GOOD))


__all__ = ["PostgresStore"]
