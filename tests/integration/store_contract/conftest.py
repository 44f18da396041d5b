"""One store fixture over every backend: SQLite in memory, a SQLite file, PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edp.store import Store, open_store
from integration.postgres.pg_testing import fresh_database, require_server

BACKENDS = ["sqlite-memory", "sqlite-file", "postgres"]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty store of each backend."""
    if request.param == "sqlite-memory":
        yield "sqlite:///:memory:"
    elif request.param == "sqlite-file":
        yield f"sqlite:///{tmp_path / 'edp.db'}"
    else:
        require_server()
        with fresh_database("contract") as url:
            yield url


@pytest.fixture
def opened(store_url: str) -> Iterator[Callable[[], Store]]:
    """Open the store (again); every store opened is closed after the test."""
    stores: list[Store] = []

    def open_() -> Store:
        stores.append(open_store(store_url))
        return stores[-1]

    yield open_
    for store in stores:
        store.close()


@pytest.fixture
def store(opened: Callable[[], Store]) -> Store:
    """An empty, migrated store of each backend."""
    return opened()
