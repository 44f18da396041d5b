"""Operators' commands on a PostgreSQL database that holds no edp store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


def edp(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data")}
    env.pop("EDP_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "edp", *args], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


def tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                            " ORDER BY 1").fetchall()
    return [row[0] for row in rows]


def test_a_database_without_an_edp_store_is_refused_and_left_as_it_was(
    pg_url: str, tmp_path: Path
) -> None:
    # Given a database that is not an edp store (a mistyped name, another application's)
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE foo (x int)")
    for args in (("status",), ("db", "status"), ("db", "sinks"), ("batches",),
                 ("batches", "show", "abc"), ("dead-letters",)):
        # When an operator's command opens it
        result = edp(*args, "--database-url", pg_url, home=tmp_path)
        # Then it says so, with no traceback (it made edp's tables there and reported an
        # empty store)
        assert result.returncode == 1, (args, result.stderr)
        assert "no edp store in the PostgreSQL database" in result.stderr, args
        assert "Traceback" not in result.stderr
    assert tables(pg_url) == ["foo"]
    # while `edp db upgrade` makes it one, and the commands then read it
    assert edp("db", "upgrade", "--database-url", pg_url, home=tmp_path).returncode == 0
    assert "schema_migrations" in tables(pg_url)
    result = edp("db", "status", "--database-url", pg_url, home=tmp_path)
    assert result.returncode == 0, result.stderr
