"""A throw-away PostgreSQL database per test, on the server at 127.0.0.1:5432.

``EDP_TEST_POSTGRES_URL`` names the maintenance database to connect to (default
``postgresql://postgres@127.0.0.1:5432/postgres``). Without a server the tests
that need one skip with the reason, except under ``CI`` where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

from edp_testing import missing

ADMIN_URL = os.environ.get(
    "EDP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def server_problem() -> str | None:
    """Why the server cannot be used, or None."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed: pip install 'edp[postgres]'"
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"no PostgreSQL server at {ADMIN_URL}: {exc}".strip()
    return None


def require_server() -> None:
    """Skip (or fail under CI) when the server is missing."""
    problem = server_problem()
    if problem is not None:
        missing(problem)


def database_url(name: str) -> str:
    """The URL of database ``name`` on the test server."""
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))


@contextmanager
def fresh_database(label: str = "t") -> Iterator[str]:
    """Create a database of our own, yield its URL, drop it (and its sessions) after."""
    import psycopg

    name = f"edp_test_{label}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
