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
from integration.store_contract.contract_helpers import batch, saved

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
            open_batches=[saved(batch("b-1"))],
            objects=[ObjectRecord("b-1", "a/b/f", 1, "e" + sequencer, sequencer, at)],
            keys={KEY: KeyMemory(sequencer, at, "b-1", at, "e" + sequencer, 1)},
        ), sinks=[], now=T0)


def test_prune_racing_a_step_keeps_the_memory_of_a_key_it_counts_in_an_open_batch(
    stores: list[PostgresStore], pg_url: str
) -> None:
    store, pruner = stores
    # Given key a/b/f remembered long ago, its batch gone (prune would forget it)
    with store.transaction() as tx:
        tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}, object_keys={KEY}))
        tx.save(StepWrite(keys={KEY: KeyMemory("01", T0 - 100, "b-old")}), sinks=[], now=T0)
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
            open_batches=[saved(batch("b-1"))],
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
