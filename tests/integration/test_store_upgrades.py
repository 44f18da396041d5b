"""Stores made by an older edp, with its data, upgraded by this one (SQLite, PostgreSQL).

Each test builds a store at an old schema version by applying only that version's
migration files, then writes rows as the edp of that schema wrote them.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edp.core.batching import KeyMemory
from edp.engine import Engine, Message
from edp.store import open_store
from edp.store.base import LoadRequest
from edp.store.migrations import latest_version, load_migrations
from edp_testing import T0, eventbridge, settings
from integration.postgres.pg_testing import fresh_database, require_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["sqlite", "postgres"])
def dialect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(dialect: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of ``dialect``: no edp schema yet."""
    if dialect == "sqlite":
        yield f"sqlite:///{tmp_path / 'edp.db'}"
    else:
        require_server()
        with fresh_database("upgrade") as pg_url:
            yield pg_url


def execute_as_old_edp(dialect: str, url: str, version: int,
                       rows: list[tuple[str, tuple[object, ...]]]) -> None:
    """Make the store an old edp's: the migrations up to ``version`` only, then ``rows``
    (statements with ``?`` placeholders and their parameters) as that edp wrote them."""
    migrations = [m for m in load_migrations(dialect) if m.version <= version]
    create = ("CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
              " name text NOT NULL, applied_at double precision NOT NULL)")
    if dialect == "sqlite":
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            for migration in migrations:
                conn.executescript(migration.sql)
            conn.execute(create)
            conn.executemany("INSERT INTO schema_migrations VALUES (?, ?, 0)",
                             [(m.version, m.name) for m in migrations])
            for sql, params in rows:
                conn.execute(sql, params)
            conn.commit()
        finally:
            conn.close()
        return
    import psycopg

    with psycopg.connect(url) as pg:
        for migration in migrations:
            pg.execute(migration.sql.encode())
        pg.execute(create)
        for migration in migrations:
            pg.execute("INSERT INTO schema_migrations VALUES (%s, %s, 0)",
                       (migration.version, migration.name))
        for sql, params in rows:
            pg.execute(sql.replace("?", "%s"), params)


# The last schema before key memories kept the key's last write (SQLite 0002, PostgreSQL
# 0003): an edp of it counted the object a/b/c.tif (sequencer 0A, at T0, etag e, size 1)
# in batch b-1 of prefix a/b/, which has fired.
BEFORE_LAST_WRITE = {"sqlite": 1, "postgres": 2}
# The last schema whose upgrade left those key memories without their last write.
BEFORE_BACKFILL = {"sqlite": 5, "postgres": 6}
A_FIRED_BATCH_OF_THE_FIRST_SCHEMA: list[tuple[str, tuple[object, ...]]] = [
    ("INSERT INTO prefixes VALUES ('bucket', 'a/b/', 1)", ()),
    ("INSERT INTO batches (batch_id, bucket, prefix, generation, state, object_count,"
     " first_activity, last_activity, first_event_time, last_event_time, trigger, fired_at,"
     " event_id) VALUES ('b-1', 'bucket', 'a/b/', 1, 'closed', 1, ?, ?, ?, ?, 'duration', ?,"
     " 'ev-1')", (T0, T0, T0, T0, T0 + 300)),
    ("INSERT INTO batch_objects VALUES ('b-1', 'a/b/c.tif', 1, 'e', '0A', ?)", (T0,)),
    ("INSERT INTO key_memory (bucket, key, sequencer, seen_at, batch_id)"
     " VALUES ('bucket', 'a/b/c.tif', '0A', ?, 'b-1')", (T0,)),
]


@pytest.mark.parametrize("upgraded", [False, True], ids=["first-schema", "upgraded-before"])
def test_key_memories_of_the_first_schema_get_their_last_write(
    dialect: str, url: str, upgraded: bool
) -> None:
    # Given a store of an edp whose key memories had no last write, which counted
    # a/b/c.tif in a batch that has fired (upgraded: then migrated by an edp that added
    # the columns and left them empty)
    version = (BEFORE_BACKFILL if upgraded else BEFORE_LAST_WRITE)[dialect]
    execute_as_old_edp(dialect, url, version, A_FIRED_BATCH_OF_THE_FIRST_SCHEMA)
    # When this edp opens (upgrades) it
    store = open_store(url)
    try:
        assert store.schema_version() == (latest_version(dialect), latest_version(dialect))
        # Then the key's memory knows its last write, from the key's batch
        with store.transaction() as tx:
            state = tx.load(LoadRequest(object_keys={("bucket", "a/b/c.tif")}))
        assert state.keys == {("bucket", "a/b/c.tif"): KeyMemory("0A", T0, "b-1", T0, "e", 1)}
        # and that write listed again without its sequencer (a backfill) is a duplicate
        # (SPEC 3.1), as it is for a store that saw it with this edp: it opens no batch
        engine = Engine(store, settings(bucket_prefix_depth=2), sinks=[], worker_id="w")
        report = engine.process([Message(eventbridge("a/b/c.tif", T0), "line 1")],
                                now=T0 + 400)
        assert report.counts["events.duplicate"] == 1
        assert engine.flush(now=T0 + 400) == []
        assert store.stats()["open_batches"] == 0
    finally:
        store.close()


def test_key_memories_without_their_batch_object_stay_without_a_last_write(
    dialect: str, url: str
) -> None:
    # Given an old store whose key memory names a batch without the key's object row
    # (and one of a key that no batch counted)
    execute_as_old_edp(dialect, url, BEFORE_LAST_WRITE[dialect], [
        ("INSERT INTO key_memory (bucket, key, sequencer, seen_at, batch_id)"
         " VALUES ('bucket', 'a/b/c.tif', '0A', ?, 'b-1')", (T0,)),
        ("INSERT INTO key_memory (bucket, key, sequencer, seen_at, batch_id)"
         " VALUES ('bucket', 'a/b/d.tif', '0B', ?, NULL)", (T0,)),
    ])
    # When this edp opens it
    store = open_store(url)
    try:
        # Then they load with no last write known, as before
        with store.transaction() as tx:
            state = tx.load(LoadRequest(object_keys={("bucket", "a/b/c.tif"),
                                                     ("bucket", "a/b/d.tif")}))
        assert state.keys == {("bucket", "a/b/c.tif"): KeyMemory("0A", T0, "b-1"),
                              ("bucket", "a/b/d.tif"): KeyMemory("0B", T0, None)}
    finally:
        store.close()


def test_an_upgrade_names_the_workers_still_beating_on_the_store(
    dialect: str, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an old store on which a worker beat a moment ago (maybe an older edp still
    # running), one that finished, and one silent for an hour
    now = time.time()
    execute_as_old_edp(dialect, url, BEFORE_BACKFILL[dialect], [
        ("INSERT INTO workers (worker_id, clock, heartbeat_at, finished)"
         " VALUES ('old-daemon', 0, ?, ?)", (now - 5, False)),
        ("INSERT INTO workers (worker_id, clock, heartbeat_at, finished)"
         " VALUES ('done', 0, ?, ?)", (now - 5, True)),
        ("INSERT INTO workers (worker_id, clock, heartbeat_at, finished)"
         " VALUES ('gone', 0, ?, ?)", (now - 3600, False)),
    ])
    # When this edp upgrades it
    with caplog.at_level(logging.WARNING, logger="edp.store.migrations"):
        open_store(url).close()
    # Then it warns that the live one may still write rows of its older schema
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert re.search(r"1 worker\(s\) beat on it: old-daemon \(\d+ s ago\)\.", warnings[0])
    assert "restart them with this one" in warnings[0]
    assert "done" not in warnings[0] and "gone" not in warnings[0]
    # and opening the upgraded store again says nothing (nothing is pending)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edp.store.migrations"):
        open_store(url).close()
    assert not caplog.records


def test_an_upgrade_of_postgresql_reads_the_heartbeats_by_the_server_s_clock(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_server()
    with fresh_database("upgrade") as url:
        # Given an old store on which a worker beat a moment ago by the server's clock
        # (the workers' shared clock, see wall_clock)
        now = time.time()
        execute_as_old_edp("postgres", url, BEFORE_BACKFILL["postgres"], [
            ("INSERT INTO workers (worker_id, clock, heartbeat_at, finished)"
             " VALUES ('old-daemon', 0, ?, false)", (now - 5,)),
        ])
        # When it is upgraded from a host whose clock runs an hour ahead (an operator's
        # machine running edp db upgrade)
        monkeypatch.setattr(time, "time", lambda: now + 3600)
        with caplog.at_level(logging.WARNING, logger="edp.store.migrations"):
            open_store(url).close()
    # Then the live worker is named, as beating seconds ago (by this host's clock it
    # beat an hour ago, and went unnamed)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert re.search(r"1 worker\(s\) beat on it: old-daemon \([0-9] s ago\)\.", warnings[0])
