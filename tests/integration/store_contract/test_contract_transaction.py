"""The Transaction protocol, case by case, on every backend (see conftest.BACKENDS)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from edp.core.batching import KeyMemory, ObjectRecord
from edp.store.base import DeadLetter, LoadRequest, StepWrite, Store
from integration.store_contract.contract_helpers import (
    T0,
    batch,
    closed,
    saved,
    write_closed,
    write_open,
)

pytestmark = pytest.mark.timeout(60)

def test_opening_migrates_to_the_latest_schema(store: Store) -> None:
    # Given a store just opened / Then its schema is the latest, and it names itself
    applied, latest = store.schema_version()
    assert applied == latest >= 1
    assert store.url.split(":", 1)[0] in {"sqlite", "postgresql"}


def test_reopening_keeps_the_state(store_url: str, opened: Callable[[], Store]) -> None:
    if store_url.endswith(":memory:"):
        pytest.skip("an in-memory store lives as long as its connection")
    # Given a batch saved, then the store closed
    first = opened()
    write_open(first, batch())
    first.close()
    # When the store is opened again
    again = opened()
    # Then the batch is there and the schema was not migrated twice
    assert again.get_batch("b-1").state == "open"
    assert again.schema_version()[0] == again.schema_version()[1]


def test_load_of_an_empty_store_is_empty(store: Store) -> None:
    # Given nothing stored / When a step asks for a prefix, a key and due batches
    with store.transaction() as tx:
        state = tx.load(LoadRequest(
            batch_keys={("bkt", "a/b/")}, object_keys={("bkt", "a/b/x")},
            fingerprints={"f"}, batch_ids={"nope"}, due_until=math.inf,
        ))
    # Then the working set is empty
    assert (state.batches, state.generations, state.keys, state.fingerprints) == ([], {}, {}, set())


MEMORY = KeyMemory("0a", T0, "b-1", T0 - 0.125, "9b2cf535f27731c974343645a3985328", 2**40)
"""A key memory with every field set (its last write's time, etag and size too)."""


def test_saved_state_loads_back(store: Store) -> None:
    # Given an open batch with a key memory and a fingerprint, saved
    b = batch(count=3, first=T0, last=T0 + 5)
    with store.transaction() as tx:
        tx.save(
            StepWrite(open_batches=[saved(b)], keys={("bkt", "a/b/x"): MEMORY},
                      fingerprints={"fp-1": T0}),
            sinks=[], now=T0,
        )
    # When a step asks for them
    with store.transaction() as tx:
        state = tx.load(LoadRequest(batch_keys={("bkt", "a/b/")},
                                    object_keys={("bkt", "a/b/x"), ("bkt", "a/b/y")},
                                    fingerprints={"fp-1", "fp-2"}))
    # Then it gets exactly what was saved
    assert state.batches == [b]
    assert state.generations == {("bkt", "a/b/"): 1}
    assert state.keys == {("bkt", "a/b/x"): MEMORY}
    assert state.fingerprints == {"fp-1"}


def test_a_step_can_close_a_stored_batch_and_open_the_next_generation(store: Store) -> None:
    # Given generation 1 open
    first = batch("b-1")
    write_open(store, first)
    # When one step fires it and opens generation 2 on the same prefix
    second = batch("b-2", generation=2, first=T0 + 10, last=T0 + 10)
    with store.transaction() as tx:
        tx.save(StepWrite(open_batches=[saved(second)], closed=[closed(first)]),
                sinks=["s1"], now=T0)
    # Then generation 1 is closed with its event, and generation 2 is the open one
    assert store.get_batch("b-1").state == "closed"
    assert store.get_batch("b-1").event_id == "ev-b-1"
    with store.transaction() as tx:
        state = tx.load(LoadRequest(batch_keys={("bkt", "a/b/")}))
    assert [b.batch_id for b in state.batches] == ["b-2"]
    assert state.generations == {("bkt", "a/b/"): 2}


def test_due_batches_load_up_to_the_clock_in_deadline_order(store: Store) -> None:
    # Given three open batches due at +100, +200, +300
    for i in (3, 1, 2):
        write_open(store, batch(f"b-{i}", prefix=f"p{i}/"), deadline=T0 + 100 * i)
    # When a step asks for what is due by +250, at most 1, then without limit
    with store.transaction() as tx:
        one = tx.load(LoadRequest(due_until=T0 + 250, due_limit=1))
        both = tx.load(LoadRequest(due_until=T0 + 250))
    # Then the earliest come, and nothing due later
    assert [b.batch_id for b in one.batches] == ["b-1"]
    assert sorted(b.batch_id for b in both.batches) == ["b-1", "b-2"]


def test_load_by_batch_id_gives_only_open_batches(store: Store) -> None:
    # Given one open and one closed batch
    write_open(store, batch("b-open", prefix="o/"))
    write_closed(store, batch("b-shut", prefix="c/"))
    # When a step asks for both by id
    with store.transaction() as tx:
        state = tx.load(LoadRequest(batch_ids={"b-open", "b-shut"}))
    # Then only the open one is in its working set
    assert [b.batch_id for b in state.batches] == ["b-open"]


def test_an_error_in_a_transaction_rolls_everything_back(store: Store) -> None:
    def failing_step() -> None:
        with store.transaction() as tx:
            tx.save(StepWrite(open_batches=[saved(batch())]), sinks=[], now=T0)
            tx.add_counters({"c": 1})
            raise RuntimeError("boom")

    # Given a step that writes, then fails
    with pytest.raises(RuntimeError):
        failing_step()
    # Then nothing of it is stored
    assert store.stats()["open_batches"] == 0
    assert store.counters() == {}


def test_objects_are_kept_per_batch_and_overwritten_by_key(store: Store) -> None:
    # Given two saves of the same key in one batch
    b = batch()
    for etag in ("e1", "e2"):
        with store.transaction() as tx:
            tx.save(StepWrite(open_batches=[saved(b)], objects=[
                ObjectRecord("b-1", "a/b/z", 2, etag, "02", T0),
                ObjectRecord("b-1", "a/b/a", 1, "e", "01", T0),
            ]), sinks=[], now=T0)
    # Then the batch lists each key once, by key, with the last write
    assert store.batch_objects("b-1") == [
        ObjectRecord("b-1", "a/b/a", 1, "e", "01", T0),
        ObjectRecord("b-1", "a/b/z", 2, "e2", "02", T0),
    ]


def test_add_outbox_refuses_an_existing_event_id(store: Store) -> None:
    # Given an event in the outbox
    with store.transaction() as tx:
        first = tx.add_outbox(event_id="e-1", kind="k", payload="{}", sinks=["s1"], now=T0)
    # When it is added again
    with store.transaction() as tx:
        again = tx.add_outbox(event_id="e-1", kind="k", payload="{}", sinks=["s1"], now=T0)
    # Then only the first counts, and one delivery is pending
    assert (first, again) == (True, False)
    assert [e.event_id for e in store.pending("s1", limit=10, now=T0)] == ["e-1"]


def test_timers_start_once_and_are_taken_when_due(store: Store) -> None:
    # Given three timers of one kind and one of another
    assert store.next_timer_due() is None
    with store.transaction() as tx:
        assert tx.set_timer("k", "late", due_at=T0 + 30, payload="3")
        assert tx.set_timer("k", "soon", due_at=T0 + 10, payload="1")
        assert tx.set_timer("k", "mid", due_at=T0 + 20, payload="2")
        assert tx.set_timer("other", "x", due_at=T0, payload="0")
        assert not tx.set_timer("k", "soon", due_at=T0 + 99, payload="again")
    assert store.next_timer_due() == T0  # the earliest of any kind: what wakes a worker
    # When the due ones are taken at +25, at most 5, then again
    with store.transaction() as tx:
        taken = tx.take_due_timers("k", until=T0 + 25, limit=5)
    with store.transaction() as tx:
        again = tx.take_due_timers("k", until=T0 + 25, limit=5)
        limited = tx.take_due_timers("k", until=T0 + 99, limit=0)
    # Then they come earliest first, once, with their payloads
    assert [(t.key, t.due_at, t.payload) for t in taken] == [
        ("soon", T0 + 10, "1"), ("mid", T0 + 20, "2")]
    assert again == [] and limited == []
    assert store.next_timer_due() == T0


def test_a_cleared_timer_is_gone_and_clearing_a_missing_one_is_harmless(store: Store) -> None:
    # Given two timers of kind k and one of another kind with the same key
    with store.transaction() as tx:
        tx.set_timer("k", "a", due_at=T0, payload="a")
        tx.set_timer("k", "b", due_at=T0, payload="b")
        tx.set_timer("other", "a", due_at=T0, payload="o")
    # When (k, a) is cleared, and a timer that does not exist
    with store.transaction() as tx:
        tx.clear_timer("k", "a")
        tx.clear_timer("k", "nope")
    # Then only (k, a) is gone; it can be started again
    with store.transaction() as tx:
        assert [t.key for t in tx.take_due_timers("k", until=T0, limit=9)] == ["b"]
        assert [t.payload for t in tx.take_due_timers("other", until=T0, limit=9)] == ["o"]
        assert tx.set_timer("k", "a", due_at=T0, payload="again")


def test_known_sinks_are_those_with_delivery_rows(store: Store) -> None:
    assert store.known_sinks() == []
    with store.transaction() as tx:
        tx.add_outbox(event_id="e1", kind="k", payload="{}", sinks=["sns", "eventbridge"], now=T0)
    assert store.known_sinks() == ["eventbridge", "sns"]


def test_dead_letters_are_kept_newest_first(store: Store) -> None:
    # Given two undecodable inputs kept in one step
    with store.transaction() as tx:
        tx.add_dead_letters([
            DeadLetter("replay", "line 1", "not JSON", "x", T0),
            DeadLetter("sqs", "message m-2", "unknown format", "{}", T0 + 1),
        ])
    # Then they list newest first, with ids, limited
    letters = store.dead_letters(limit=5)
    assert [(d.location, d.reason, d.body) for d in letters] == [
        ("message m-2", "unknown format", "{}"), ("line 1", "not JSON", "x")]
    assert letters[0].id is not None and letters[1].id is not None
    assert letters[0].id > letters[1].id
    assert len(store.dead_letters(limit=1)) == 1


def test_counters_add_up_across_steps(store: Store) -> None:
    # Given two steps adding to counters (zeros are not recorded)
    with store.transaction() as tx:
        tx.add_counters({"events.counted": 3, "messages": 4, "zero": 0})
    with store.transaction() as tx:
        tx.add_counters({"events.counted": 2})
    # Then the totals are the sums
    assert store.counters() == {"events.counted": 5, "messages": 4}
