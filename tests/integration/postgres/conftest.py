"""Fixtures of the PostgreSQL tests: a fresh database per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from integration.postgres.pg_testing import fresh_database, require_server


@pytest.fixture(scope="session")
def pg_server() -> None:
    """The test server is up (else skip, or fail under CI)."""
    require_server()


@pytest.fixture
def pg_url(pg_server: None) -> Iterator[str]:
    """The URL of a database created for this test and dropped after it."""
    with fresh_database() as url:
        yield url
