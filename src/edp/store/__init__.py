"""Stores: where batches, key memories, the outbox and dead letters live.

:mod:`edp.store.base` defines the port; :mod:`edp.store.sqlite` is the embedded
default (``sqlite:///path``, or ``sqlite:///:memory:`` as the in-memory store for
tests) and :mod:`edp.store.postgres` the production store (``postgresql://...``).
"""

from __future__ import annotations

import sqlite3
import sys
from types import ModuleType

from edp.errors import ConfigError, StoreError
from edp.redact import redact_text
from edp.store.base import Store
from edp.store.migrations import SchemaState, schema_state


def open_store(url: str, *, fast_unsafe: bool = False,
               idle_in_transaction: float | None = None) -> Store:
    """Open (and migrate) the store that ``url`` names.

    ``fast_unsafe`` trades durability for speed. SQLite: no journal, no sync, and no
    per-object rows or prune index (nobody would read them): only for throw-away stores
    such as a replay's temporary database. PostgreSQL: asynchronous
    commits (``synchronous_commit = off``): the database stays consistent, a server
    crash may forget the last commits; replays into PostgreSQL use it.

    ``idle_in_transaction`` (PostgreSQL): seconds after which the server ends a session
    left idle inside a transaction, releasing its locks (default 60; workers pass their
    ``worker_timeout``).
    """
    if url.startswith("sqlite:"):
        from edp.store.sqlite import SqliteStore

        return SqliteStore.from_url(url, fast_unsafe=fast_unsafe)
    if url.startswith(("postgresql:", "postgres:")):
        store: Store = _postgres().PostgresStore.from_url(
            url, fast_unsafe=fast_unsafe, idle_in_transaction=idle_in_transaction)
        return store
    raise _not_a_store_url(url)


def read_schema_state(url: str) -> SchemaState:
    """The schema version of the existing store ``url`` and its pending migrations, read
    without applying any (as :func:`open_store` would): a report on a store must not
    change it. ``StoreError`` when it cannot be read (no ``schema_migrations`` table)."""
    if url.startswith("sqlite:"):
        from edp.store.sqlite import applied_version, sqlite_path

        return schema_state("sqlite", applied_version(sqlite_path(url)))
    if url.startswith(("postgresql:", "postgres:")):
        return schema_state("postgres", _postgres().applied_version(url))
    raise _not_a_store_url(url)


def holds_edp_store(url: str) -> bool | None:
    """Whether the existing PostgreSQL database ``url`` holds an edp store; None when it
    cannot be asked."""
    held: bool | None = _postgres().holds_edp_store(url)
    return held


def _postgres() -> ModuleType:
    """The PostgreSQL store's module, or what to install for it."""
    try:
        from edp.store import postgres
    except ImportError as exc:
        raise ConfigError(
            f"database_url is a PostgreSQL URL but psycopg 3 is not installed ({exc}): "
            "run `pip install 'edp[postgres]'`"
        ) from None
    return postgres


def _not_a_store_url(url: str) -> ConfigError:
    return ConfigError(
        "database_url must start with sqlite:///, postgresql:// or postgres://, "
        f"got {redact_text(url)!r}"
    )


def is_outage(exc: BaseException) -> bool:
    """Whether a failed step means the store is unreachable or unusable (a lost
    connection, a file that cannot be opened, a transient conflict), not that its input
    is bad: input of such a step must come again whole, not be tried piece by piece."""
    psycopg = sys.modules.get("psycopg")
    lost = getattr(psycopg, "OperationalError", None) if psycopg is not None else None
    return isinstance(exc, StoreError | OSError | sqlite3.OperationalError) or (
        lost is not None and isinstance(exc, lost))


__all__ = ["SchemaState", "Store", "holds_edp_store", "is_outage", "open_store",
           "read_schema_state"]
