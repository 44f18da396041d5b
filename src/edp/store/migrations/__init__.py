"""Versioned schema migrations, one folder of numbered SQL files per backend.

A file ``NNNN_name.sql`` is migration ``NNNN``; a store applies, in order, every
migration above the highest version recorded in its ``schema_migrations`` table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

from edp.errors import StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str


def load_migrations(dialect: str) -> list[Migration]:
    """The migrations of ``dialect`` (``sqlite`` or ``postgres``), oldest first."""
    folder = resources.files(__package__).joinpath(dialect)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append(Migration(version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


@dataclass(frozen=True, slots=True)
class SchemaState:
    """Where a store's schema stands: the highest version applied (0: none) and the
    migrations of this edp above it, which the store's opening would apply."""

    applied: int
    pending: list[Migration]
    latest: int


def latest_version(dialect: str) -> int:
    """The highest migration version of ``dialect`` that this edp knows."""
    return max(m.version for m in load_migrations(dialect))


def schema_state(dialect: str, applied: int | None) -> SchemaState:
    """The :class:`SchemaState` of a ``dialect`` store whose ``schema_migrations`` table
    records ``applied`` as its highest version (None: no version)."""
    migrations = load_migrations(dialect)
    current = applied or 0
    return SchemaState(current, [m for m in migrations if m.version > current],
                       max(m.version for m in migrations))


def refuse_newer(dialect: str, applied: int | None, url: str) -> None:
    """Refuse a store whose schema is newer than this edp's migrations: an older worker
    would read and write tables whose meaning changed after it was written."""
    latest = latest_version(dialect)
    if applied is not None and applied > latest:
        from edp import __version__

        raise StoreError(
            f"the store {url} has schema version {applied}, newer than this edp"
            f" ({__version__}) knows (up to {latest}): run the edp that upgraded it, or a newer one"
        )


def refuse_foreign(has_edp_tables: bool, applied: object, url: str) -> None:
    """Refuse a database whose ``schema_migrations`` table records versions but which
    holds none of edp's tables: another application's (Rails and golang-migrate name
    theirs so too), whose versions edp must not take for its own."""
    if applied is not None and not has_edp_tables:
        raise StoreError(
            f"the database {url} has a schema_migrations table but no edp tables (another"
            " application's?): give edp a database of its own (on PostgreSQL, or a schema:"
            " add ?options=-csearch_path%3Dedp to the URL after CREATE SCHEMA edp)"
        )


LIVE_WITHIN = 300.0
"""Seconds since a worker's last heartbeat within which an upgrade names it as maybe
still running (daemons beat every few seconds; a worker silent longer is gone)."""

LIVE_WORKERS = ("SELECT worker_id, heartbeat_at FROM workers"
                " WHERE NOT finished AND heartbeat_at >= {} ORDER BY worker_id")
"""The workers an upgrade names (the ``workers`` table has these columns since
migration 1): format with the dialect's placeholder for the earliest heartbeat."""


def plan_upgrade(
    dialect: str, current: int | None, url: str,
    live_workers: Callable[[float], Sequence[tuple[str, float]]],
    clock: Callable[[], float] = time.time,
) -> list[Migration]:
    """The migrations of ``dialect`` above ``current`` (the store's highest version,
    None: a new store), after warning of the workers still beating on an existing store
    (``live_workers(since)``: the (id, last heartbeat) of those not finished that beat
    since then, by :data:`LIVE_WORKERS`; ``clock``: the clock their heartbeats are
    written by, the store's wall clock)."""
    pending = [m for m in load_migrations(dialect) if current is None or m.version > current]
    if current is not None and pending:
        now = clock()
        warn_of_live_workers(url, pending, live_workers(now - LIVE_WITHIN), now)
    return pending


def warn_of_live_workers(
    url: str, pending: Sequence[Migration], workers: Sequence[tuple[str, float]], now: float
) -> None:
    """Warn that ``pending`` migrations are applied to a store on which ``workers``
    (id, last heartbeat) still beat: if they run an older edp they go on writing rows as
    their schema did (nothing refuses a running worker) until they are restarted."""
    if not pending or not workers:
        return
    shown = ", ".join(f"{worker} ({max(now - beat, 0):.0f} s ago)"
                      for worker, beat in workers[:10])
    more = f" and {len(workers) - 10} more" if len(workers) > 10 else ""
    log.warning(
        "upgrading %s (%s) while %d worker(s) beat on it: %s%s. If they run an older edp,"
        " stop them or restart them with this one now: until then they write rows as their"
        " schema did (docs/postgres.md, 'Upgrading edp on a store with data')",
        url, ", ".join(m.name for m in pending), len(workers), shown, more,
    )
