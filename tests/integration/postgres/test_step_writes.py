"""A step's per-event rows on PostgreSQL: plainly inserted when the step's load shows
they cannot exist, upserted otherwise; and prune, racing a step, never forgets the
memory of a key of an open batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from edp.core.batching import KeyMemory, ObjectRecord
from edp.engine import Engine, Message
from edp.errors import TransactionConflict
from edp.store.base import LoadRequest, StepWrite
from edp.store.postgres import PostgresStore
from edp_testing import T0, eventbridge, settings
from integration.store_contract.contract_helpers import batch, closed, saved

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

KEY = ("bkt", "a/b/f")


def msgs(*events: dict[str, Any]) -> list[Message]:
    return [Message(e, f"message {i + 1}") for i, e in enumerate(events)]


@pytest.fixture
def stores(pg_url: str) -> Iterator[list[PostgresStore]]:
    opened = [PostgresStore(pg_url, retry_seconds=10) for _ in range(2)]
    yield opened
    for store in opened:
        store.close()


def memory_of(pg_url: str, bucket: str, key: str) -> Any:
    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT batch_id, sequencer FROM key_memory WHERE bucket = %s"
                            " AND key = %s", (bucket, key)).fetchone()


def step_of_b1(store: PostgresStore, sequencer: str, at: float) -> None:
    """A step that loads KEY and counts a write of it into open batch b-1."""
    with store.transaction() as tx:
        tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}, object_keys={KEY}))
        tx.save(StepWrite(
            open_batches=[saved(batch("b-1", generation=2))],
            objects=[ObjectRecord("b-1", "a/b/f", 1, "e" + sequencer, sequencer, at)],
            keys={KEY: KeyMemory(sequencer, at, "b-1", at, "e" + sequencer, 1)},
        ), sinks=[], now=T0)


def test_prune_racing_a_step_keeps_the_memory_of_a_key_it_counts_in_an_open_batch(
    stores: list[PostgresStore], pg_url: str
) -> None:
    store, pruner = stores
    # Given key a/b/f remembered long ago, its batch closed (prune would forget it)
    with store.transaction() as tx:
        tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}, object_keys={KEY}))
        tx.save(StepWrite(closed=[closed(batch("b-old", first=T0 - 200, last=T0 - 100))],
                          keys={KEY: KeyMemory("01", T0 - 100, "b-old")}), sinks=[], now=T0)
    assert memory_of(pg_url, *KEY) == ("b-old", "01")
    # When a step whose clock is behind the pruner's by more than the retention (a
    # backlog, a replay into a live store) counts a new write of it into a new open
    # batch, while a live worker's prune runs (it waits on the key's row lock, then
    # checks the row again as the step left it)
    done: list[int] = []
    with store.transaction() as tx:
        tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}, object_keys={KEY}))
        pruning = threading.Thread(target=lambda: done.append(
            pruner.prune(keys_before=T0 + 86400)))
        pruning.start()
        time.sleep(1.0)  # (the prune's DELETE is waiting on the row's lock by then)
        tx.save(StepWrite(
            open_batches=[saved(batch("b-1", generation=2))],
            objects=[ObjectRecord("b-1", "a/b/f", 1, "e2", "02", T0)],
            keys={KEY: KeyMemory("02", T0, "b-1", T0, "e2", 1)},
        ), sinks=[], now=T0)
    pruning.join(timeout=30)
    assert done == [0]
    # Then the key's memory is kept, naming the open batch (forgotten, its next write
    # would count in b-1 a second time)
    assert memory_of(pg_url, *KEY) == ("b-1", "02")
    # And its next write, an overwrite in b-1, goes through
    step_of_b1(store, "03", T0 + 1)
    assert [(o.key, o.sequencer) for o in store.batch_objects("b-1")] == [("a/b/f", "03")]


def test_a_key_counted_under_two_prefix_depths_falls_back_to_upserts(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given two live workers on one store, of prefix depths 1 and 2 (a config change
    # rolling out, or reverted, while batches stay open)
    opened = [PostgresStore(pg_url, retry_seconds=10) for _ in range(2)]
    try:
        common = {"bucket_threshold_duration": 100, "bucket_threshold_event_count": 0}
        a = Engine(opened[0], settings(bucket_prefix_depth=1, **common), sinks=["list"],
                   worker_id="a")
        b = Engine(opened[1], settings(bucket_prefix_depth=2, **common), sinks=["list"],
                   worker_id="b")
        # When key x/1/f is counted by A in x/, by B in x/1/, then by A again in x/
        # (whose open batch holds the key's object row, while its memory names x/1/'s)
        a.process(msgs(eventbridge("x/1/f", T0, sequencer="01")), now=time.time())
        b.process(msgs(eventbridge("x/1/f", T0 + 1, sequencer="02")), now=time.time())
        a.process(msgs(eventbridge("x/1/f", T0 + 2, sequencer="03")), now=time.time())
        # Then A's step goes through (its plain insert met the row: it ran again with
        # upserts, and says so), and x/'s batch holds the key once, as last written
        assert "runs again with upserts" in caplog.text
        rows = {r.prefix: r for r in opened[0].list_batches(state="open")}
        assert [(o.key, o.sequencer) for o in opened[0].batch_objects(rows["x/"].batch_id)] \
            == [("x/1/f", "03")]
    finally:
        for store in opened:
            store.close()


def test_first_writes_of_a_key_under_two_prefixes_at_once_conflict_then_go_through(
    stores: list[PostgresStore], pg_url: str
) -> None:
    # Given two steps counting the same new key under different prefixes (workers of
    # different prefix depths): each holds its own prefix's lock, not the other's
    store, other = stores

    def step_of_a(tx: Any) -> None:
        tx.load(LoadRequest(batch_keys={("bkt", "a/")}, object_keys={KEY}))

    def save_of_a(tx: Any) -> None:
        tx.save(StepWrite(
            open_batches=[saved(batch("b-a", prefix="a/"))],
            objects=[ObjectRecord("b-a", "a/b/f", 1, "e", "03", T0)],
            keys={KEY: KeyMemory("03", T0, "b-a", T0, "e", 1)},
        ), sinks=[], now=T0)

    def racing_steps() -> None:
        with store.transaction() as tx:
            step_of_a(tx)
            with other.transaction() as tx_b:
                tx_b.load(LoadRequest(batch_keys={("bkt", "a/b/")}, object_keys={KEY}))
                tx_b.save(StepWrite(
                    open_batches=[saved(batch("b-ab"))],
                    objects=[ObjectRecord("b-ab", "a/b/f", 1, "e", "02", T0)],
                    keys={KEY: KeyMemory("02", T0, "b-ab", T0, "e", 1)},
                ), sinks=[], now=T0)
            save_of_a(tx)

    # When B's step commits the key's first memory between A's load (none) and commit
    with pytest.raises(TransactionConflict):
        racing_steps()
    # Then A's step is rolled back as a conflict (its load would read otherwise now:
    # its input is not acknowledged), nothing of it written
    assert memory_of(pg_url, *KEY) == ("b-ab", "02")
    # And run again, it goes through
    with store.transaction() as tx:
        step_of_a(tx)
        save_of_a(tx)
    assert memory_of(pg_url, *KEY) == ("b-a", "03")


ODD = ["a\tb\\N\n", "\\N", "\\.", "cr\rlf\n", "back\\slash\\", "ünïcødé/日本/🎉",
       "quote'\"", "comma,semi;", " lead and trail ", "\x7f\x01\x1f", "\b\f\v"]
TIMES = [T0 + 0.1, T0 + 1 / 3, 5e-324, 1.7976931348623157e308, 0.1 + 0.2, -0.0,
         2.0**53 + 1, 1e22, T0 + 2**-30, 123456789.123456789, 4.35]


def rows(url: str, sql: str) -> list[Any]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def write_odd(store: PostgresStore) -> None:
    """A step writing the ODD keys (their memories and object rows) into batch b-1."""
    with store.transaction() as tx:
        tx.load(LoadRequest(batch_keys={("bkt", "p/")},
                            object_keys={("bkt", k) for k in ODD}))
        tx.save(StepWrite(
            open_batches=[saved(batch("b-1", prefix="p/"))],
            objects=[ObjectRecord("b-1", k, i, "e" + k, "01", TIMES[i]) for i, k in enumerate(ODD)],
            keys={("bkt", k): KeyMemory("01", TIMES[-1 - i], "b-1", TIMES[i], "e" + k, i)
                  for i, k in enumerate(ODD)},
        ), sinks=[], now=T0)


def test_new_rows_by_copy_read_back_as_the_upserts_write_them(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edp.store import postgres_tx

    copied: list[str] = []
    send_copies = postgres_tx.PostgresTransaction.send_copies

    def spy(self: postgres_tx.PostgresTransaction) -> None:
        copied.extend(statement.split()[1] for statement, _ in self.copies)
        send_copies(self)

    monkeypatch.setattr(postgres_tx.PostgresTransaction, "send_copies", spy)
    objects = "SELECT key, size, etag, sequencer, event_time FROM batch_objects ORDER BY key"
    memories = ("SELECT key, sequencer, seen_at, batch_id, event_time, etag, size"
                " FROM key_memory ORDER BY key")
    store = PostgresStore(pg_url, retry_seconds=5)
    try:
        # Given keys with tabs, newlines, backslashes, "\N", non-ASCII, and odd floats,
        # written new (by COPY), then the same values again (known: upserted as JSON)
        write_odd(store)
        assert copied == ["batch_objects", "key_memory"]
        first = rows(pg_url, objects), rows(pg_url, memories)
        write_odd(store)
        assert copied == ["batch_objects", "key_memory"]  # (the second: no COPY)
        again = rows(pg_url, objects), rows(pg_url, memories)
    finally:
        store.close()
    # Then both store the same text and the same floats, exactly
    assert first == again
    assert sorted(r[0] for r in first[0]) == sorted(ODD)
    for key, _, _, _, event_time in first[0]:
        assert repr(event_time) == repr(TIMES[ODD.index(key)])


def two_depths(store: PostgresStore) -> None:
    """KEY's object row in a/'s batch b-a, its memory naming a/b/'s batch b-ab."""
    with store.transaction() as tx:
        tx.load(LoadRequest(batch_keys={("bkt", "a/")}, object_keys={KEY}))
        tx.save(StepWrite(open_batches=[saved(batch("b-a", prefix="a/"))],
                          objects=[ObjectRecord("b-a", "a/b/f", 1, "e", "01", T0)],
                          keys={KEY: KeyMemory("01", T0, "b-a", T0, "e", 1)}),
                sinks=[], now=T0)
    with store.transaction() as tx:
        tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}, object_keys={KEY}))
        tx.save(StepWrite(open_batches=[saved(batch("b-ab"))],
                          objects=[ObjectRecord("b-ab", "a/b/f", 1, "e", "02", T0 + 1)],
                          keys={KEY: KeyMemory("02", T0 + 1, "b-ab", T0 + 1, "e", 1)}),
                sinks=[], now=T0)


@pytest.mark.parametrize("then", ["add_outbox", "set_timer", "take_due_timers", "load",
                                  "commit"])
def test_a_new_row_that_exists_met_in_a_later_call_falls_back_to_upserts(
    pg_url: str, then: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = PostgresStore(pg_url, retry_seconds=5)
    try:
        # Given KEY counted in a/'s open batch, then in a/b/'s (two prefix depths)
        two_depths(store)
        # When a step counts it in a/'s again (its COPY meets the object row), and the
        # COPY is sent by a later call of the step, or by its commit
        with store.transaction() as tx:
            tx.load(LoadRequest(batch_keys={("bkt", "a/")}, object_keys={KEY}))
            tx.save(StepWrite(open_batches=[saved(batch("b-a", prefix="a/", count=1))],
                              objects=[ObjectRecord("b-a", "a/b/f", 1, "e", "03", T0 + 2)],
                              keys={KEY: KeyMemory("03", T0 + 2, "b-a", T0 + 2, "e", 1)}),
                    sinks=[], now=T0)
            if then == "add_outbox":
                assert tx.add_outbox(event_id="ev-x", kind="k", payload="{}", sinks=["s"],
                                     now=T0)
            elif then == "set_timer":
                assert tx.set_timer("t", "k", due_at=T0, payload="p")
            elif then == "take_due_timers":
                assert tx.take_due_timers("t", until=T0, limit=5) == []
            elif then == "load":
                state = tx.load(LoadRequest(batch_keys={("bkt", "z/")},
                                            object_keys={("bkt", "z/q")}))
                assert state.keys == {}
        # Then the step ran again with upserts and went through, whole
        assert "runs again with upserts" in caplog.text
        assert rows(pg_url, "SELECT batch_id, sequencer FROM batch_objects ORDER BY 1") == [
            ("b-a", "03"), ("b-ab", "02")]
        assert rows(pg_url, "SELECT batch_id, sequencer FROM key_memory") == [("b-a", "03")]
        if then == "add_outbox":
            assert rows(pg_url, "SELECT count(*) FROM deliveries") == [(1,)]
        stats = store.pool.get_stats()
        assert stats["pool_available"] == stats["pool_size"]
    finally:
        store.close()


def test_a_commit_failing_for_good_gives_its_connection_back(pg_url: str) -> None:
    # Given a store of a pool of 4
    store = PostgresStore(pg_url, retry_seconds=2)
    try:
        # When 5 steps fail at commit on a unique index that is no new row's (two open
        # batches of one prefix: the last line of defence)
        def bad_step(i: int) -> None:
            with store.transaction() as tx:
                tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}))
                tx.save(StepWrite(open_batches=[saved(batch(f"b-{i}-1")),
                                                saved(batch(f"b-{i}-2"))]),
                        sinks=[], now=T0)

        for i in range(5):
            with pytest.raises(psycopg.errors.UniqueViolation):
                bad_step(i)
        # Then each gave its connection back (else the 5th waits for the pool, and
        # fails with PoolTimeout, as every later step of the worker would)
        stats = store.pool.get_stats()
        assert stats["pool_available"] == stats["pool_size"]
    finally:
        store.close()


@pytest.fixture
def stoppable(pg_url: str) -> Iterator[tuple[PostgresStore, threading.Event]]:
    """A store that would retry a lost database for ten minutes, and the stop event of
    its worker (registered)."""
    store = PostgresStore(pg_url, retry_seconds=600)
    stop = threading.Event()
    store.stop_retrying_on(stop)
    yield store, stop
    _allow_connections(pg_url, True)
    store.close()


def test_a_store_told_to_stop_gives_up_on_a_lost_database_without_waiting_its_retries(
    pg_url: str, stoppable: tuple[PostgresStore, threading.Event]
) -> None:
    # Given a store that would retry a lost database for ten minutes, whose worker may
    # be told to stop
    store, stop = stoppable
    assert store.pending("s", limit=1, now=T0) == []
    # When the database becomes unreachable, and the worker is told to stop
    _allow_connections(pg_url, False)
    stop.set()
    # Then an operation and a step each fail after one more try (not after ten
    # minutes: the test's timeout would end it first)
    with pytest.raises(psycopg.OperationalError):
        store.pending("s", limit=1, now=T0)
    with pytest.raises(psycopg.OperationalError), store.transaction() as tx:
        tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}))
    # And once the stop is over and the database back, it works again
    store.stop_retrying_on(None)
    _allow_connections(pg_url, True)
    assert store.pending("s", limit=1, now=T0) == []


def _allow_connections(pg_url: str, allowed: bool, *, terminate: bool = True) -> None:
    from urllib.parse import urlsplit

    from integration.postgres.pg_testing import ADMIN_URL

    name = urlsplit(pg_url).path.lstrip("/")
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed and terminate:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE datname = %s", (name,))


def test_a_stop_during_a_commit_gone_unanswered_is_seen(
    pg_url: str, stoppable: tuple[PostgresStore, threading.Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edp.store.postgres_tx import PostgresTransaction

    # Given a store whose worker may be told to stop (it would retry for ten minutes)
    store, stop = stoppable
    send_queued = PostgresTransaction.send_queued

    def lost_before_commit(self: PostgresTransaction) -> None:
        # the database goes away just as the step's COMMIT is sent: its outcome unknown
        send_queued(self)
        _allow_connections(pg_url, False)

    assert store.pending("s", limit=1, now=T0) == []
    monkeypatch.setattr(PostgresTransaction, "send_queued", lost_before_commit)
    # When the worker is told to stop a moment after the COMMIT went unanswered
    threading.Timer(0.5, stop.set).start()
    # Then the step gives up (while it asks whether the COMMIT went through: not
    # after ten minutes, the test's timeout would end it first)
    with pytest.raises(psycopg.OperationalError), store.transaction() as tx:
        tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}))


def test_a_stop_while_the_worker_id_is_claimed_again_in_an_outage_is_seen(
    pg_url: str, stoppable: tuple[PostgresStore, threading.Event]
) -> None:
    # Given a worker holding its id (its session lock on a pooled connection), whose
    # worker may be told to stop
    store, stop = stoppable
    store.claim_worker_id("w1")
    # When the database goes away (its session with it), and the worker is told to
    # stop while the daemon's loop checks its id (Daemon._keep_worker_id, every
    # CLAIM_CHECK = 10 s)
    _allow_connections(pg_url, False)
    threading.Timer(0.5, stop.set).start()
    # Then the check gives up (not after the pool's ten minutes: the test's timeout
    # would end it first)
    with pytest.raises(psycopg.OperationalError):
        store.claim_worker_id("w1")


def test_a_worker_that_may_stop_logs_its_pool_waits_in_an_outage_at_debug(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    # Given a store whose worker may be told to stop (its pool waits cut into 1 s
    # slices), retrying for 3 s
    store = PostgresStore(pg_url, retry_seconds=3)
    store.stop_retrying_on(threading.Event())
    try:
        assert store.pending("s", limit=1, now=T0) == []
        # When the database is unreachable for an operation's whole retry time
        _allow_connections(pg_url, False)
        caplog.set_level(logging.DEBUG, logger="edp.store.postgres")
        with pytest.raises(psycopg.OperationalError):
            store.pending("s", limit=1, now=T0)
    finally:
        _allow_connections(pg_url, True)
        store.close()
    # Then the slices' ends were retried (at debug), and none said so at warning: one
    # line a second through an outage would bury what matters
    retries = [r for r in caplog.records
               if r.name == "edp.store.postgres" and "PoolTimeout" in r.getMessage()]
    assert retries
    assert {r.levelno for r in retries} == {logging.DEBUG}


@pytest.mark.parametrize("stopping", [False, True])
def test_a_stale_pooled_connection_at_a_stop_is_tried_once_more(
    pg_url: str, stopping: bool
) -> None:
    # Given a store whose worker may be told to stop, with a pooled connection the
    # server has ended (an idle timeout, a proxy, a failover)
    store = PostgresStore(pg_url, retry_seconds=10)
    stop = threading.Event()
    store.stop_retrying_on(stop)
    try:
        assert store.pending("s", limit=1, now=T0) == []
        with store.pool.connection() as conn:
            pid = conn.info.backend_pid
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # When the next operation runs, at a normal stop (SIGTERM: the last relay) or not
        if stopping:
            stop.set()
        # Then it is tried once more on a new connection, and works
        assert store.pending("s", limit=1, now=T0) == []
    finally:
        store.close()
