"""The embedded store: SQLite, through the standard library's ``sqlite3``.

One :class:`SqliteStore` holds one connection; use one store per thread. Writers
take SQLite's write lock up front (``BEGIN IMMEDIATE``), so several processes may
share a file safely, one writer at a time. ``sqlite:///:memory:`` gives a private
in-memory store, the fake that unit tests use.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from edp.core.batching import ObjectKey, ObjectRecord
from edp.errors import EdpError, StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover (not on Windows)
    fcntl = None  # type: ignore[assignment]
from edp.store.base import (
    HISTORY_KIND,
    WORKER_ID_HOW,
    BatchRow,
    DeadLetter,
    Floors,
    HistoryPruned,
    OutboxEntry,
    ParkedDelivery,
    SinkSummary,
    lowest,
    pick_batch,
)
from edp.store.migrations import (
    LIVE_WORKERS,
    latest_version,
    plan_upgrade,
    refuse_foreign,
    refuse_newer,
)
from edp.store.sqlite_tx import BATCH_COLUMNS, SqliteTransaction


def sqlite_path(url: str) -> str:
    """The file of ``sqlite:///relative/path`` or ``sqlite:////absolute/path`` (or
    ``:memory:``)."""
    path = url.removeprefix("sqlite:").removeprefix("//")
    return path.removeprefix("/") if path.startswith("/") else path


def applied_version(path: str) -> int | None:
    """The highest migration version recorded in the SQLite store at ``path``, read
    without opening it as a store (which would migrate it): ``edp db status`` must not
    change what it reports on."""
    try:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the schema version of {path}: {exc}") from None
    return None if row is None or row[0] is None else int(row[0])


PARKED_SQL = (
    "SELECT d.sink, d.event_id, o.kind, o.payload, d.last_error, d.attempts FROM deliveries d"
    " JOIN outbox o ON o.seq = d.seq WHERE d.delivered_at IS NULL AND d.parked = 1"
    " ORDER BY d.seq DESC, d.sink LIMIT ?"
)


def sink_summaries_sql(*, one: bool) -> str:
    """Known sinks with their delivery counts; ``one``: only the sink named by ``?``
    (given twice)."""
    sinks, deliveries = ("WHERE name = ?", "WHERE sink = ?") if one else ("", "")
    return (
        "SELECT name, max(registered_at), sum(pending), sum(parked), sum(delivered) FROM ("  # noqa: S608
        f" SELECT name, registered_at, 0 AS pending, 0 AS parked, 0 AS delivered FROM sinks {sinks}"
        " UNION ALL SELECT sink, NULL, sum(delivered_at IS NULL AND parked = 0),"
        " sum(delivered_at IS NULL AND parked = 1), sum(delivered_at IS NOT NULL)"
        f" FROM deliveries {deliveries} GROUP BY sink) GROUP BY name ORDER BY name"
    )


PENDING_SQL = (
    "SELECT o.seq, o.event_id, o.kind, o.payload, o.created_at FROM deliveries d"
    " JOIN outbox o ON o.seq = d.seq WHERE d.sink = ? AND d.delivered_at IS NULL"
    " AND d.parked = 0 AND d.next_attempt <= ? AND d.seq < coalesce((SELECT"
    # The order barrier: the first undelivered event that waits for its retry. Without
    # the hint SQLite walks the primary key, i.e. every delivery ever made to the sink,
    # and a relay round grew with the store's history (1 ms a call at 14k deliveries).
    " min(w.seq) FROM deliveries w INDEXED BY deliveries_pending"
    " WHERE w.sink = ? AND w.delivered_at IS NULL"
    " AND w.parked = 0 AND w.next_attempt > ?), 9223372036854775807)"
    " ORDER BY d.seq LIMIT ?"
)
"""Parameters: sink, now, sink, now, limit."""


log = logging.getLogger(__name__)


def _open_beside(database: str, path: str) -> IO[bytes]:
    """``path`` opened for appending; when this creates it, with the database file's
    permissions rather than the umask's (on a group-writable store, the other users'
    processes must be able to lock it too)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return open(path, "ab")
    try:
        os.fchmod(fd, os.stat(database).st_mode & 0o666)
    except OSError:  # (a file system without modes: the umask's stay)
        log.debug("cannot give %s the permissions of %s", path, database, exc_info=True)
    return os.fdopen(fd, "ab")


class SqliteStore:
    """The SQLite store (see :class:`~edp.store.base.Store`)."""

    def __init__(self, path: str, *, fast_unsafe: bool = False) -> None:
        self.url = f"sqlite:///{path}"
        self.path = path
        self._claims: IO[bytes] | None = None  # the worker-id lock file (claim_worker_id)
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {path}: {exc}") from None
        # Steps of a throw-away store share one outer transaction (see _write); the
        # migrations below still commit on their own.
        self._outer = False
        self._broken: str | None = None
        self.keeps_objects = not fast_unsafe
        self.shared = False  # (several workers belong on PostgreSQL: docs/postgres.md)
        try:
            self._refuse_foreign_or_newer()  # (before the pragmas below change its file)
            self.conn.execute("PRAGMA foreign_keys = OFF")
            if fast_unsafe:
                self.conn.execute("PRAGMA page_size = 65536")
                self.conn.execute("PRAGMA journal_mode = OFF")
                self.conn.execute("PRAGMA synchronous = OFF")
                self.conn.execute("PRAGMA cache_size = -65536")
            elif path != ":memory:":
                self.conn.execute("PRAGMA journal_mode = WAL")
                self.conn.execute("PRAGMA synchronous = NORMAL")
            self.upgrade()
        except sqlite3.Error as exc:  # (not a database, locked, read-only, a disk error)
            self.conn.close()
            raise StoreError(f"cannot open SQLite database {path}: {exc}") from None
        except StoreError:
            self.conn.close()
            raise
        self._outer = fast_unsafe
        if fast_unsafe:
            # A throw-away store (a replay's temporary database) is never pruned and never
            # inspected: its per-object rows and the prune index would be written for
            # nobody (together about 40 % of a replay's time).
            self.conn.execute("DROP INDEX IF EXISTS key_memory_seen")

    @classmethod
    def from_url(cls, url: str, *, fast_unsafe: bool = False) -> SqliteStore:
        """Open ``sqlite:///relative/path``, ``sqlite:////absolute/path`` or ``sqlite:///:memory:``."""
        path = sqlite_path(url)
        if not path:
            raise StoreError(f"database_url {url!r} names no file")
        return cls(path, fast_unsafe=fast_unsafe)

    # -- schema -------------------------------------------------------------------
    def _refuse_foreign_or_newer(self) -> None:
        tables = {name for (name,) in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            " AND name IN ('schema_migrations', 'batches')")}
        if "schema_migrations" in tables:
            current = self.conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
            refuse_foreign("batches" in tables, current[0], self.url)
            refuse_newer("sqlite", current[0], self.url)

    def upgrade(self) -> list[int]:
        """Apply pending migrations; returns the versions applied."""
        with self._write() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            current = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
            pending = plan_upgrade("sqlite", current, self.url, lambda since: conn.execute(
                LIVE_WORKERS.format("?"), (since,)).fetchall())
            applied = []
            for migration in pending:
                for statement in migration.sql.split(";\n"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )
                applied.append(migration.version)
        return applied

    def schema_version(self) -> tuple[int, int]:
        """(applied, latest) migration versions."""
        current = self.conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
        return int(current or 0), latest_version("sqlite")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self._outer:
            # A throw-away store runs all steps in one long transaction (committed by
            # close()): a COMMIT per step was about 10 % of a replay's time, and nobody
            # else reads this database while the replay runs. Without a journal a failed
            # step cannot be undone, so the store refuses any further step rather than
            # build on its leftovers.
            if self._broken is not None:
                raise StoreError(
                    f"the replay's temporary store cannot go on after a failed step "
                    f"({self._broken}): it keeps no journal to undo that step's writes"
                )
            if not self.conn.in_transaction:
                self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException as exc:
                self._broken = f"{type(exc).__name__}: {exc}"
                raise
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            if self.conn.in_transaction:  # (SQLite may have rolled back already: disk full)
                self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[SqliteTransaction]:
        """A write transaction: commits on success, rolls back on error."""
        with self._write() as conn:
            yield SqliteTransaction(conn)

    # -- outbox -------------------------------------------------------------------
    def pending(self, sink: str, *, limit: int, now: float) -> list[OutboxEntry]:
        """Outbox events not yet delivered to ``sink`` and due for an attempt, oldest
        first, none past an undelivered one that waits for its retry (order per sink)."""
        rows = self.conn.execute(PENDING_SQL, (sink, now, sink, now, limit)).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def mark_delivered(self, sink: str, event_ids: Sequence[str], *, now: float) -> None:
        """Record that ``sink`` accepted these events."""
        with self._write() as conn:
            conn.executemany(
                "UPDATE deliveries SET delivered_at = ?, attempts = attempts + 1,"
                " last_error = NULL WHERE sink = ? AND event_id = ?",
                [(now, sink, event_id) for event_id in event_ids],
            )

    def mark_failed(
        self, sink: str, event_id: str, *, error: str, retry_at: float | None, now: float
    ) -> None:
        """Record a failed attempt; ``retry_at=None`` parks the event."""
        with self._write() as conn:
            conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?,"
                " next_attempt = ?, parked = ? WHERE sink = ? AND event_id = ?",
                (error[:2000], retry_at or now, 1 if retry_at is None else 0, sink, event_id),
            )

    def next_timer_due(self) -> float | None:
        """The earliest ``due_at`` of any durable timer."""
        row = self.conn.execute("SELECT min(due_at) FROM timers").fetchone()
        return None if row[0] is None else float(row[0])

    def wall_clock(self) -> float:
        """The local clock (one process, or processes of one machine, use the store)."""
        return time.time()

    def known_sinks(self) -> list[str]:
        """Names of the registered sinks and of every sink that has delivery rows."""
        return [row[0] for row in self.conn.execute(
            "SELECT name FROM sinks UNION SELECT DISTINCT sink FROM deliveries ORDER BY 1"
        )]

    def registered_sinks(self) -> list[str]:
        """Names of the sinks workers registered at their start."""
        return [row[0] for row in self.conn.execute("SELECT name FROM sinks ORDER BY 1")]

    def register_sinks(self, names: Sequence[str], *, now: float) -> None:
        """Record the sinks a long-running worker relays to."""
        with self._write() as conn:
            conn.executemany("INSERT INTO sinks (name, registered_at) VALUES (?, ?)"
                             " ON CONFLICT (name) DO NOTHING", [(n, now) for n in names])

    def requeue(self, event_id: str, sinks: Sequence[str]) -> bool:
        """Make ``event_id`` pending again for ``sinks``; False if it is unknown."""
        with self._write() as conn:
            row = conn.execute("SELECT seq FROM outbox WHERE event_id = ?", (event_id,)).fetchone()
            if row is None:
                return False
            conn.executemany(
                "INSERT INTO deliveries (sink, seq, event_id) VALUES (?, ?, ?)"
                " ON CONFLICT (sink, seq) DO UPDATE SET delivered_at = NULL, next_attempt = 0,"
                " parked = 0",
                [(sink, row[0], event_id) for sink in sinks],
            )
        return True

    def sink_summaries(self) -> list[SinkSummary]:
        """Every known sink with its delivery counts, by name."""
        return [SinkSummary(*row)
                for row in self.conn.execute(sink_summaries_sql(one=False))]

    def parked_deliveries(self, *, limit: int = 20) -> list[ParkedDelivery]:
        """The latest deliveries refused for good, newest first."""
        return [ParkedDelivery(*row) for row in self.conn.execute(PARKED_SQL, (limit,))]

    def forget_sink(self, name: str) -> SinkSummary | None:
        """Drop a sink's registration and delivery rows; what it held, or None."""
        with self._write() as conn:
            row = conn.execute(sink_summaries_sql(one=True), (name, name)).fetchone()
            conn.execute("DELETE FROM sinks WHERE name = ?", (name,))
            conn.execute("DELETE FROM deliveries WHERE sink = ?", (name,))
        return None if row is None else SinkSummary(*row)

    # -- inspection ---------------------------------------------------------------
    def get_batch(self, batch_id: str) -> BatchRow:
        """One batch by id, or by a unique id prefix."""
        rows = self.conn.execute(
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id >= ? AND batch_id < ?"  # noqa: S608
            " LIMIT 2",
            (batch_id, batch_id + "\uffff"),
        ).fetchall()
        return pick_batch(batch_id, rows)

    def list_batches(self, *, state: str | None = None, limit: int = 50) -> list[BatchRow]:
        """Open batches by deadline, then recent closed batches, newest first."""
        out: list[BatchRow] = []
        if state in (None, "open"):
            out += self.open_batches_by_deadline(limit=limit)
        if state in (None, "closed"):
            rows = self.conn.execute(
                f"SELECT {BATCH_COLUMNS} FROM batches WHERE state = 'closed'"  # noqa: S608
                " ORDER BY fired_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
            out += [BatchRow(*row) for row in rows]
        return out

    def open_batches_by_deadline(self, *, limit: int) -> list[BatchRow]:
        """The open batches with the earliest deadlines."""
        rows = self.conn.execute(
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE state = 'open'"  # noqa: S608
            " ORDER BY deadline, bucket, prefix LIMIT ?",
            (limit,),
        ).fetchall()
        return [BatchRow(*row) for row in rows]

    def batch_objects(self, batch_id: str) -> list[ObjectRecord]:
        """The objects of one batch, by key."""
        rows = self.conn.execute(
            "SELECT batch_id, key, size, etag, sequencer, event_time FROM batch_objects"
            " WHERE batch_id = ? ORDER BY key",
            (batch_id,),
        ).fetchall()
        return [ObjectRecord(*row) for row in rows]

    def outbox_events(self, *, limit: int = 50) -> list[OutboxEntry]:
        """The most recent outbox events, newest first."""
        rows = self.conn.execute(
            "SELECT seq, event_id, kind, payload, created_at FROM outbox"
            " ORDER BY seq DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [OutboxEntry(*row) for row in rows]

    def dead_letters(self, *, limit: int = 50) -> list[DeadLetter]:
        """The most recent dead letters, newest first."""
        rows = self.conn.execute(
            "SELECT source, location, reason, body, received_at, id FROM dead_letters"
            " ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def counters(self) -> dict[str, int]:
        """Every counter."""
        return dict(self.conn.execute("SELECT name, value FROM counters ORDER BY name"))

    def stats(self) -> dict[str, int]:
        """Open and closed batches, pending deliveries, dead letters."""
        one = self.conn.execute
        return {
            "open_batches": one("SELECT count(*) FROM batches WHERE state = 'open'").fetchone()[0],
            "closed_batches": one(
                "SELECT count(*) FROM batches WHERE state = 'closed'"
            ).fetchone()[0],
            "pending_deliveries": one(
                "SELECT count(*) FROM deliveries WHERE delivered_at IS NULL AND parked = 0"
            ).fetchone()[0],
            "parked_deliveries": one(
                "SELECT count(*) FROM deliveries WHERE delivered_at IS NULL AND parked = 1"
            ).fetchone()[0],
            "dead_letters": one("SELECT count(*) FROM dead_letters").fetchone()[0],
        }

    # -- workers and housekeeping -------------------------------------------------
    def heartbeat(
        self, worker_id: str, *, clock: float, now: float, held: float | None = None,
        held_until: float | None = None, finished: bool = False,
    ) -> None:
        """Publish a worker's clock (and hold)."""
        with self.transaction() as tx:
            tx.heartbeat(worker_id, clock=clock, now=now, held=held, held_until=held_until,
                         finished=finished)

    def retire_worker(
        self, worker_id: str, *, held: float | None = None, held_until: float | None = None
    ) -> None:
        """A worker that will not run again: finished, holding only ``held`` (if any)."""
        with self._write() as conn:
            conn.execute("UPDATE workers SET held = ?, held_until = ?, finished = 1"
                         " WHERE worker_id = ?",
                         (held, None if held is None else held_until, worker_id))

    def worker_clock(self, worker_id: str) -> float | None:
        """The last clock a worker published."""
        row = self.conn.execute(
            "SELECT clock FROM workers WHERE worker_id = ?", (worker_id,)
        ).fetchone()
        return None if row is None else float(row[0])

    def claim_worker_id(self, worker_id: str, *, silent_for: float | None = None) -> None:
        """Hold ``worker_id`` for this process's life (see
        :meth:`~edp.store.base.Store.claim_worker_id`): a POSIX record lock on one byte,
        chosen by the id, of ``<database>.workers`` beside the database. The system
        drops it when the process ends, killed or not, so a restart takes its id back at
        once; the same process may claim again. (POSIX locks belong to the process:
        closing one store drops the locks every store of the process took on that
        file; edp's processes claim with one store each.) (``silent_for`` is not needed: a
        process that holds the lock is alive. Not enforced for ``:memory:``, or where
        the system has no ``fcntl``.)"""
        if self.path == ":memory:" or fcntl is None:
            return
        offset = int.from_bytes(hashlib.blake2b(worker_id.encode(), digest_size=4).digest()) >> 2
        try:
            if self._claims is None:
                self._claims = _open_beside(self.path, f"{self.path}.workers")
            fcntl.lockf(self._claims, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES) or self._claims is None:
                # (a file system without POSIX locks, such as some NFS mounts, or a
                # lock file another user made: the id cannot be checked here)
                log.warning("worker id %r is not checked on this database: %s",
                            worker_id, exc)
                return
            raise EdpError(
                f"worker id {worker_id!r} is in use by another live process on this "
                f"database ({self.path}): give each worker its own worker_id ({WORKER_ID_HOW}), "
                "or stop the other process (an `edp watch` of the same "
                "folder runs under the same id)"
            ) from None

    def worker_finished(self, worker_id: str) -> bool | None:
        """Whether a worker's last run ended with :meth:`finish_worker`."""
        row = self.conn.execute(
            "SELECT finished FROM workers WHERE worker_id = ?", (worker_id,)
        ).fetchone()
        return None if row is None else bool(row[0])

    def worker_hold(self, worker_id: str) -> float | None:
        """The hold a worker published last."""
        row = self.conn.execute(
            "SELECT held FROM workers WHERE worker_id = ?", (worker_id,)
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def fire_floor(self, worker_id: str, *, now: float, timeout: float) -> float | None:
        """The lowest clock (or hold) of the other live, unfinished workers."""
        return lowest(*self.floors(worker_id, now=now, timeout=timeout))

    def floors(self, worker_id: str, *, now: float, timeout: float) -> Floors:
        """The other live, unfinished workers' lowest clock; the other workers' lowest
        hold that has not ended (one without an end: while its worker is live)."""
        row = self.conn.execute(
            "SELECT min(clock) FILTER (WHERE finished = 0 AND heartbeat_at >= :live),"
            " min(held) FILTER (WHERE held_until > :now OR (held_until IS NULL"
            " AND finished = 0 AND heartbeat_at >= :live))"
            " FROM workers WHERE worker_id != :me",
            {"live": now - timeout, "now": now, "me": worker_id},
        ).fetchone()
        return Floors(*(None if value is None else float(value) for value in row))

    def finish_worker(self, worker_id: str) -> bool:
        """Mark a worker finished; True when no unfinished worker remains."""
        with self._write() as conn:
            conn.execute("UPDATE workers SET finished = 1 WHERE worker_id = ?", (worker_id,))
            row = conn.execute("SELECT count(*) FROM workers WHERE finished = 0").fetchone()
        return int(row[0]) == 0

    def prune(self, *, keys_before: float, keep_buckets: Sequence[str] = ()) -> int:
        """Forget key memories and fingerprints last seen before ``keys_before``; a key of
        a batch still open is kept (an overwrite of it must not count again, SPEC 3.3),
        and so is every key of ``keep_buckets``."""
        with self._write() as conn:
            kept = sorted(set(keep_buckets))
            gone = conn.execute(
                # (as PostgreSQL's: a memory whose batch is closed, or that has none)
                "DELETE FROM key_memory WHERE seen_at < ? AND (batch_id IS NULL OR EXISTS ("  # noqa: S608
                "SELECT 1 FROM batches b WHERE b.batch_id = key_memory.batch_id"
                f" AND b.state = 'closed')) AND bucket NOT IN ({','.join('?' * len(kept))})",
                (keys_before, *kept),
            ).rowcount
            gone += conn.execute(
                "DELETE FROM fingerprints WHERE seen_at < ?", (keys_before,)
            ).rowcount
        return int(gone)

    def prune_history(self, *, before: float, limit: int) -> HistoryPruned:
        """Delete a page of delivered events, their fired batches and old dead letters."""
        with self._write() as conn:
            events = conn.execute(
                "SELECT seq, event_id FROM outbox o WHERE created_at < ? AND kind = ?"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = o.event_id"
                " AND d.delivered_at IS NULL) ORDER BY created_at LIMIT ?",
                (before, HISTORY_KIND, limit),
            ).fetchall()
            conn.executemany("DELETE FROM deliveries WHERE event_id = ?",
                             [(event_id,) for _, event_id in events])
            conn.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq, _ in events])
            batches = conn.execute(
                "SELECT batch_id, bucket FROM batches b WHERE state = 'closed' AND fired_at < ?"
                " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = b.event_id)"
                " ORDER BY fired_at LIMIT ?", (before, limit),
            ).fetchall()
            for batch_id, bucket in batches:
                # (its keys' memories name no batch from now on: a memory naming a batch
                # the store does not hold is never pruned, see prune)
                conn.executemany(
                    "UPDATE key_memory SET batch_id = NULL"
                    " WHERE bucket = ? AND key = ? AND batch_id = ?",
                    [(bucket, key, batch_id) for (key,) in conn.execute(
                        "SELECT key FROM batch_objects WHERE batch_id = ?", (batch_id,))],
                )
                conn.execute("DELETE FROM batch_objects WHERE batch_id = ?", (batch_id,))
                conn.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
            letters = conn.execute(
                "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters"
                " WHERE received_at < ? ORDER BY received_at LIMIT ?)", (before, limit),
            ).rowcount
        return HistoryPruned(len(events), len(batches), letters,
                             limit in (len(events), len(batches), letters))

    def stop_retrying_on(self, event: threading.Event | None) -> None:
        """Nothing to stop: SQLite's operations are not retried (see Store)."""

    def close(self) -> None:
        """Close the connection."""
        try:
            if self._outer:  # (once: closing twice is allowed)
                self._outer = False
                if self._broken is None and self.conn.in_transaction:
                    self.conn.execute("COMMIT")
                # (after a failed step: nothing is committed, the file is thrown away)
        finally:
            self.conn.close()
            if self._claims is not None:  # (its locks go with it)
                self._claims.close()
                self._claims = None


__all__ = ["ObjectKey", "SqliteStore", "SqliteTransaction"]
