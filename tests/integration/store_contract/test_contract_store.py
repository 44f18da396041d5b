"""The Store protocol outside transactions, case by case, on every backend."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest

from edp.config import Settings
from edp.engine import Engine, Message
from edp.errors import NotFound
from edp.relay import Relay
from edp.sinks.base import Failure
from edp.store.base import (
    Floors,
    HistoryPruned,
    LoadRequest,
    OutboxEntry,
    StepWrite,
    Store,
)
from edp_testing import ListSink, eventbridge, wait_until
from integration.store_contract.contract_helpers import T0, batch, write_closed, write_open

pytestmark = pytest.mark.timeout(60)

def test_pending_gives_undelivered_events_oldest_first(store: Store) -> None:
    # Given three fired batches, delivered to sinks s1 and s2
    write_closed(store, batch("b-1", prefix="1/"), batch("b-2", prefix="2/"), sinks=("s1", "s2"))
    write_closed(store, batch("b-3", prefix="3/"), sinks=("s1", "s2"))
    # When s1 accepts the first one
    store.mark_delivered("s1", ["ev-b-1"], now=T0)
    # Then s1 still has the others, oldest first, and s2 all three
    assert [e.event_id for e in store.pending("s1", limit=10, now=T0)] == ["ev-b-2", "ev-b-3"]
    s2 = store.pending("s2", limit=2, now=T0)
    assert [e.event_id for e in s2] == ["ev-b-1", "ev-b-2"]
    assert s2[0].payload == '{"id": "ev-b-1"}' and s2[0].kind == "package-objects-ready"


def test_a_failed_delivery_waits_for_its_retry_and_a_parked_one_for_an_operator(
    store: Store,
) -> None:
    # Given two events for s1
    write_closed(store, batch("b-1", prefix="1/"), batch("b-2", prefix="2/"))
    # When one fails until +60 and the other for good
    store.mark_failed("s1", "ev-b-1", error="503", retry_at=T0 + 60, now=T0)
    store.mark_failed("s1", "ev-b-2", error="400", retry_at=None, now=T0)
    # Then neither is pending now; the first is again at +60; the second is parked
    assert store.pending("s1", limit=10, now=T0) == []
    assert [e.event_id for e in store.pending("s1", limit=10, now=T0 + 60)] == ["ev-b-1"]
    assert store.stats()["parked_deliveries"] == 1
    # and an operator can tell which (and why)
    [parked] = store.parked_deliveries()
    assert (parked.sink, parked.event_id, parked.error, parked.attempts) == (
        "s1", "ev-b-2", "400", 1)
    assert parked.payload == '{"id": "ev-b-2"}'


def three_events_the_first_failed_until(store: Store, retry_at: float) -> None:
    write_closed(store, batch("b-1", prefix="1/"), batch("b-2", prefix="2/"),
                 batch("b-3", prefix="3/"), sinks=("s1", "s2"))
    store.mark_failed("s1", "ev-b-1", error="503", retry_at=retry_at, now=T0)


def test_no_event_goes_out_past_one_that_waits_for_its_retry(store: Store) -> None:
    # Given three events for s1 and s2, the first of which failed on s1 until +60
    three_events_the_first_failed_until(store, T0 + 60)
    # Then on s1 the ones behind it wait too (order per sink); s2 is not held back
    assert store.pending("s1", limit=10, now=T0 + 1) == []
    assert [e.event_id for e in store.pending("s2", limit=10, now=T0 + 1)] == [
        "ev-b-1", "ev-b-2", "ev-b-3"]
    # And at +60 they go, in order
    assert [e.event_id for e in store.pending("s1", limit=10, now=T0 + 60)] == [
        "ev-b-1", "ev-b-2", "ev-b-3"]


def test_a_parked_event_holds_nothing_back(store: Store) -> None:
    # Given three events, the first of which failed, then was refused for good
    three_events_the_first_failed_until(store, T0 + 60)
    store.mark_failed("s1", "ev-b-1", error="400", retry_at=None, now=T0 + 1)
    # Then the others go at once
    assert [e.event_id for e in store.pending("s1", limit=10, now=T0 + 1)] == [
        "ev-b-2", "ev-b-3"]


def test_requeue_sends_a_delivered_event_again(store: Store) -> None:
    # Given an event delivered to s1
    write_closed(store, batch())
    store.mark_delivered("s1", ["ev-b-1"], now=T0)
    # When it is requeued for s1 and a new sink s3
    assert store.requeue("ev-b-1", ["s1", "s3"]) is True
    # Then both have it pending; an unknown id is refused
    assert [e.event_id for e in store.pending("s1", limit=5, now=T0)] == ["ev-b-1"]
    assert [e.event_id for e in store.pending("s3", limit=5, now=T0)] == ["ev-b-1"]
    assert store.requeue("nope", ["s1"]) is False


def test_get_batch_by_id_or_unique_prefix(store: Store) -> None:
    # Given batches whose ids share prefixes
    write_open(store, batch("abc-1", prefix="1/"), batch("abc-2", prefix="2/"),
               batch("abd_%", prefix="3/"))
    # Then a full id or unique prefix finds one; an ambiguous or unknown one does not
    assert store.get_batch("abc-1").prefix == "1/"
    assert store.get_batch("abd").batch_id == "abd_%"
    assert store.get_batch("abd_").batch_id == "abd_%"
    with pytest.raises(NotFound, match="ambiguous"):
        store.get_batch("abc")
    with pytest.raises(NotFound, match="no batch"):
        store.get_batch("ab_")
    with pytest.raises(NotFound, match="no batch"):
        store.get_batch("zzz")


def test_list_batches_open_by_deadline_then_closed_newest_first(store: Store) -> None:
    # Given two open batches and two closed ones
    write_open(store, batch("o-late", prefix="1/", last=T0 + 50))
    write_open(store, batch("o-soon", prefix="2/"))
    write_closed(store, batch("c-old", prefix="3/", last=T0))
    write_closed(store, batch("c-new", prefix="4/", last=T0 + 9))
    # Then the listings follow the contract
    assert [b.batch_id for b in store.list_batches()] == ["o-soon", "o-late", "c-new", "c-old"]
    assert [b.batch_id for b in store.list_batches(state="closed", limit=1)] == ["c-new"]
    assert [b.batch_id for b in store.open_batches_by_deadline(limit=1)] == ["o-soon"]
    row = store.get_batch("o-soon")
    assert (row.deadline, row.deadline_trigger, row.trigger) == (T0 + 300, "duration", None)


def test_outbox_events_newest_first(store: Store) -> None:
    # Given two fired batches
    write_closed(store, batch("b-1", prefix="1/"))
    write_closed(store, batch("b-2", prefix="2/"))
    # Then the outbox lists the newest first
    events = store.outbox_events(limit=5)
    assert [e.event_id for e in events] == ["ev-b-2", "ev-b-1"]
    assert events[0].seq > events[1].seq


def test_stats_count_batches_deliveries_and_dead_letters(store: Store) -> None:
    # Given one open and one closed batch delivered to two sinks, one of them parked
    write_open(store, batch("b-1", prefix="1/"))
    write_closed(store, batch("b-2", prefix="2/"), sinks=("s1", "s2"))
    store.mark_failed("s2", "ev-b-2", error="no", retry_at=None, now=T0)
    # Then the figures say so
    assert store.stats() == {"open_batches": 1, "closed_batches": 1, "pending_deliveries": 1,
                             "parked_deliveries": 1, "dead_letters": 0}


def test_heartbeats_publish_a_clock_that_never_goes_back(store: Store) -> None:
    # Given a worker that published 100, then 50
    store.heartbeat("w1", clock=100.0, now=T0)
    store.heartbeat("w1", clock=50.0, now=T0 + 1)
    # Then its clock is 100; an unknown worker has none
    assert store.worker_clock("w1") == 100.0
    assert store.worker_clock("w2") is None


def test_a_heartbeat_in_a_transaction_is_published_only_if_it_commits(store: Store) -> None:
    # Given a worker at 100
    store.heartbeat("w1", clock=100.0, now=T0)
    # When a step that publishes 300 fails, and then one that publishes 200 commits
    def failing_step() -> None:
        with store.transaction() as tx:
            tx.heartbeat("w1", clock=300.0, now=T0 + 1)
            raise RuntimeError("the step failed")

    with pytest.raises(RuntimeError):
        failing_step()
    assert store.worker_clock("w1") == 100.0
    with store.transaction() as tx:
        tx.heartbeat("w1", clock=200.0, now=T0 + 2)
        tx.heartbeat("w2", clock=50.0, now=T0 + 2)
    # Then the committed clocks count, and they never go back
    assert (store.worker_clock("w1"), store.worker_clock("w2")) == (200.0, 50.0)
    with store.transaction() as tx:
        tx.heartbeat("w1", clock=150.0, now=T0 + 3)
    assert store.worker_clock("w1") == 200.0
    assert store.fire_floor("w2", now=T0 + 3, timeout=60) == 200.0


def test_a_step_publishes_its_clock_with_its_commit(store: Store) -> None:
    # Given an engine
    engine = Engine(store, Settings(), sinks=["s1"], worker_id="w1")
    # When it runs a step of one event at T0 + 5, then one of an event at T0 + 6
    engine.process([Message(eventbridge("a/b/c.txt", T0 + 5), "m1")], now=T0 + 100)
    assert store.worker_clock("w1") == T0 + 5
    engine.process([Message(eventbridge("a/b/d.txt", T0 + 6), "m2")], now=T0 + 100)
    # Then each step published its event time as the worker's clock
    assert store.worker_clock("w1") == T0 + 6
    assert engine.clock == T0 + 6


def test_a_timer_tick_publishes_the_wall_clock_it_fired_at(store: Store) -> None:
    # Given an engine that has seen an event at T0 + 5
    engine = Engine(store, Settings(), sinks=["s1"], worker_id="w1")
    engine.process([Message(eventbridge("a/b/c.txt", T0 + 5), "m1")], now=T0 + 5)
    # When the caught-up worker ticks at T0 + 400 (the batch's quiet period is over)
    [fired] = engine.fire_due(now=T0 + 400)
    # Then the batch fired and the worker's published clock is T0 + 400
    assert fired.trigger.value == "duration"
    assert store.worker_clock("w1") == T0 + 400


def test_fire_floor_is_the_lowest_clock_of_the_other_live_unfinished_workers(
    store: Store,
) -> None:
    # Given me, a live worker at 200, a live one at 150 that finished, a silent one at 10
    store.heartbeat("me", clock=1.0, now=T0)
    store.heartbeat("live", clock=200.0, now=T0)
    store.heartbeat("done", clock=150.0, now=T0)
    store.finish_worker("done")
    store.heartbeat("silent", clock=10.0, now=T0 - 120)
    # Then only the live, unfinished other counts (silent for longer than the timeout)
    assert store.fire_floor("me", now=T0, timeout=60) == 200.0
    assert store.fire_floor("live", now=T0, timeout=60) == 1.0
    assert store.fire_floor("live", now=T0, timeout=600) == 1.0
    assert store.fire_floor("me", now=T0, timeout=600) == 10.0


def test_a_workers_hold_lowers_the_floor_until_a_heartbeat_without_one(store: Store) -> None:
    # Given a worker at clock 200 that holds firing at 50 (messages it received may come
    # again), with the step's transaction, and another at 300
    with store.transaction() as tx:
        tx.heartbeat("holding", clock=200.0, now=T0, held=50.0)
    store.heartbeat("other", clock=300.0, now=T0)
    # Then the others' floor is its hold, not its clock (its own floor is not)
    assert store.fire_floor("other", now=T0, timeout=60) == 50.0
    assert store.floors("other", now=T0, timeout=60) == Floors(clock=200.0, held=50.0)
    assert store.floors("holding", now=T0, timeout=60) == Floors(clock=300.0, held=None)
    assert store.fire_floor("holding", now=T0, timeout=60) == 300.0
    # And its clock stays 200 (a hold is not a clock going back), its hold is known
    assert store.worker_clock("holding") == 200.0
    assert store.worker_hold("holding") == 50.0 and store.worker_hold("other") is None
    # When its next heartbeat holds nothing, Then its clock is the floor again
    store.heartbeat("holding", clock=210.0, now=T0 + 1)
    assert store.fire_floor("other", now=T0 + 1, timeout=60) == 210.0
    assert store.worker_hold("holding") is None
    # And a hold above the clock does not raise the floor
    store.heartbeat("holding", clock=220.0, now=T0 + 2, held=500.0)
    assert store.fire_floor("other", now=T0 + 2, timeout=60) == 220.0


def test_a_hold_with_an_end_outlives_its_worker_until_then(store: Store) -> None:
    # Given a worker that published a hold at 50 until T0 + 100, then finished (a Lambda
    # container whose step was cut: what it held for comes back at T0 + 100)
    store.heartbeat("cut", clock=200.0, now=T0, held=50.0, held_until=T0 + 100)
    store.finish_worker("cut")
    store.heartbeat("other", clock=300.0, now=T0)
    # Then the others' floor is its hold, not its clock (it is finished), also once it
    # is silent for longer than worker_timeout
    assert store.floors("other", now=T0, timeout=60) == Floors(clock=None, held=50.0)
    assert store.floors("other", now=T0 + 99, timeout=60) == Floors(clock=None, held=50.0)
    # When the hold ends, Then nothing holds any more
    assert store.floors("other", now=T0 + 100, timeout=60) == Floors(clock=None, held=None)
    # And a hold without an end counts only while its worker is live
    store.heartbeat("live", clock=200.0, now=T0 + 100, held=60.0)
    assert store.fire_floor("other", now=T0 + 130, timeout=60) == 60.0
    assert store.fire_floor("other", now=T0 + 161, timeout=60) is None
    # And one with an end that passed does not count, even while its worker is live
    store.heartbeat("live", clock=200.0, now=T0 + 200, held=60.0, held_until=T0 + 210)
    assert store.floors("other", now=T0 + 211, timeout=60) == Floors(clock=200.0, held=None)


def test_a_retired_worker_holds_nothing_back(store: Store) -> None:
    # Given a worker live at clock 200 with a hold at 50 until T0 + 100
    store.heartbeat("replaced", clock=200.0, now=T0, held=50.0, held_until=T0 + 100)
    assert store.fire_floor("other", now=T0, timeout=60) == 50.0
    # When it is retired (its runtime was replaced), Then neither its clock nor its hold
    # holds the others back, and it is finished; its clock is kept
    store.retire_worker("replaced")
    assert store.floors("other", now=T0, timeout=60) == Floors(clock=None, held=None)
    assert store.worker_finished("replaced") is True
    assert store.worker_hold("replaced") is None
    assert store.worker_clock("replaced") == 200.0
    # And one retired with a hold to keep holds only that, until its end
    store.heartbeat("kept", clock=200.0, now=T0, held=50.0, held_until=T0 + 100)
    store.retire_worker("kept", held=70.0, held_until=T0 + 30)
    assert store.floors("other", now=T0 + 29, timeout=60) == Floors(clock=None, held=70.0)
    assert store.floors("other", now=T0 + 30, timeout=60) == Floors(clock=None, held=None)


def test_the_last_worker_to_finish_is_told_so(store: Store) -> None:
    # Given two workers
    store.heartbeat("a", clock=1.0, now=T0)
    store.heartbeat("b", clock=1.0, now=T0)
    # Then only the second to finish is the last; a heartbeat makes one unfinished again
    assert store.finish_worker("a") is False
    assert store.finish_worker("b") is True
    store.heartbeat("a", clock=2.0, now=T0)
    assert store.fire_floor("b", now=T0, timeout=60) == 2.0
    # And a step's heartbeat may mark its worker finished (a Lambda container caught up)
    with store.transaction() as tx:
        tx.heartbeat("a", clock=3.0, now=T0, finished=True)
    assert store.worker_finished("a") is True
    assert store.fire_floor("b", now=T0, timeout=60) is None
    assert store.worker_clock("a") == 3.0



def test_whether_a_workers_last_run_stopped_cleanly_is_known(store: Store) -> None:
    # (a daemon restarted after a crash in the middle of a step stays behind a while)
    assert store.worker_finished("w") is None
    store.heartbeat("w", clock=1.0, now=T0)
    assert store.worker_finished("w") is False
    store.finish_worker("w")
    assert store.worker_finished("w") is True
    store.heartbeat("w", clock=2.0, now=T0)
    assert store.worker_finished("w") is False


def test_prune_forgets_old_keys_and_fingerprints(store: Store) -> None:
    # Given key memories and fingerprints seen at T0 and T0 + 100
    from edp.core.batching import KeyMemory

    with store.transaction() as tx:
        tx.save(StepWrite(keys={("bkt", "old"): KeyMemory("01", T0), ("bkt", "new"): KeyMemory(
            "02", T0 + 100)}, fingerprints={"f-old": T0, "f-new": T0 + 100}), sinks=[], now=T0)
    # When what was seen before T0 + 50 is pruned
    gone = store.prune(keys_before=T0 + 50)
    # Then two rows went, and the recent ones remain
    with store.transaction() as tx:
        state = tx.load(LoadRequest(object_keys={("bkt", "old"), ("bkt", "new")},
                                    fingerprints={"f-old", "f-new"}))
    assert gone == 2
    assert set(state.keys) == {("bkt", "new")} and state.fingerprints == {"f-new"}


@pytest.mark.parametrize("sequencer", ["01", None], ids=["with-sequencer", "without"])
def test_a_key_seen_again_as_a_duplicate_is_remembered_from_then(
    store: Store, sequencer: str | None
) -> None:
    # Given a key written at T0 and delivered again 20 hours later (a duplicate)
    hour = 3600.0
    engine = Engine(store, Settings(database_url="sqlite:///:memory:",
                                    bucket_threshold_event_count=1), sinks=[], worker_id="w")
    again = eventbridge("i/e/a", T0, sequencer=sequencer)
    engine.process([Message(again, "m1")], now=T0)
    engine.process([Message(eventbridge("j/k/x", T0 + 20 * hour, sequencer="01"), "m2"),
                    Message(again, "m3")], now=T0)
    # When the worker prunes at T0 + 30 h (a retention of a day: forget before T0 + 6 h)
    engine.process([Message(eventbridge("j/k/y", T0 + 30 * hour, sequencer="01"), "m4")],
                   now=T0)
    engine.prune()
    # Then the key is still known: a third delivery is a duplicate, not a new batch
    report = engine.process([Message(again, "m5")], now=T0)
    assert report.counts["events.duplicate"] == 1 and report.fired == []


def test_prune_keeps_the_keys_of_the_buckets_it_is_told_to(store: Store) -> None:
    from edp.core.batching import KeyMemory

    with store.transaction() as tx:
        tx.save(StepWrite(keys={("folder", "k"): KeyMemory("01", T0),
                                ("s3", "k"): KeyMemory("01", T0)}), sinks=[], now=T0)
    assert store.prune(keys_before=T0 + 50, keep_buckets=["folder"]) == 1
    with store.transaction() as tx:
        state = tx.load(LoadRequest(object_keys={("folder", "k"), ("s3", "k")}))
    assert set(state.keys) == {("folder", "k")}


def test_prune_keeps_the_keys_of_a_batch_still_open(store: Store) -> None:
    # Given a batch open for days (a file every 12 h, a quiet period of 2 days) and a
    # closed one, both with keys last seen more than the retention (1 day) ago
    day = 86400.0
    cfg = Settings(database_url="sqlite:///:memory:", bucket_threshold_event_count=0,
                   bucket_threshold_duration=2 * day)
    engine = Engine(store, cfg, sinks=[], worker_id="w")
    files = [eventbridge("i/e/a", T0, sequencer="01"), eventbridge("j/k/a", T0, sequencer="01")]
    files += [eventbridge(f"i/e/f{n}", T0 + n * day / 2, sequencer="02") for n in range(1, 8)]
    engine.process([Message(e, f"line {i}") for i, e in enumerate(files)], now=T0)
    # (j/k/ fired by its quiet period; i/e/ is still open, its first key 3.5 days old)
    [closed] = store.list_batches(state="closed")
    assert closed.prefix == "j/k/"
    # When the worker prunes, then an overwrite of the open batch's first key comes
    assert engine.prune() == 1  # j/k/a only
    engine.process([Message(eventbridge("i/e/a", T0 + 3.6 * day, sequencer="09"), "m")],
                   now=T0)
    # Then the overwrite keeps the count (SPEC 3.3): 8 distinct keys, not 9
    [open_batch] = store.list_batches(state="open")
    assert (open_batch.prefix, open_batch.object_count) == ("i/e/", 8)


def test_a_copy_of_a_replaced_write_without_its_sequencer_is_a_duplicate_in_a_later_step(
    store: Store,
) -> None:
    # Given a key written twice with sequencers, in one step
    engine = Engine(store, Settings(database_url="sqlite:///:memory:"), sinks=[],
                    worker_id="w")
    engine.process([Message(eventbridge("i/e/a", T0, sequencer="01", etag="x"), "m1"),
                    Message(eventbridge("i/e/a", T0 + 10, sequencer="02", etag="y"), "m2")],
                   now=T0)
    # When the first write comes again without its sequencer, in a later step
    report = engine.process([Message(eventbridge("i/e/a", T0, etag="x"), "m3")], now=T0)
    # Then the store remembered it: a duplicate (SPEC 3.1), the batch's activity unmoved
    assert report.counts["events.duplicate"] == 1
    [batch] = store.list_batches(state="open")
    assert batch.last_activity == T0 + 10


def test_batches_due_at_one_instant_fire_by_bucket_then_prefix_across_pages(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given more batches due at the same instant than one page of the engine holds,
    # written in shuffled order
    import random

    import edp.engine

    monkeypatch.setattr(edp.engine, "PAGE", 4)
    names = [(bucket, f"p{n:02d}/x/") for bucket in ("b1", "b2") for n in range(7)]
    random.Random(5).shuffle(names)
    engine = Engine(store, Settings(database_url="sqlite:///:memory:"), sinks=[],
                    worker_id="w")
    engine.process([Message(eventbridge(prefix + "f", T0, bucket=bucket), f"line {i}")
                    for i, (bucket, prefix) in enumerate(names)], now=T0)
    # When the input ends
    fired = engine.finish(now=T0)
    # Then they fire in deadline order, ties by bucket then prefix, page after page
    assert [(r.bucket, r.prefix) for r in fired] == sorted(names)


def test_the_engine_emits_the_same_batches_on_every_backend(store: Store) -> None:
    # Given a small stream: a count batch, a re-delivery, quiet remainders
    cfg = Settings(database_url="sqlite:///:memory:", bucket_threshold_event_count=3)
    events = [eventbridge(f"i/e/f{i % 4}", T0 + i, sequencer=f"{i:04x}") for i in range(5)]
    events.append(eventbridge("i/e/f1", T0 + 1, sequencer="0001"))  # a re-delivery
    events.append(eventbridge("j/k/x", T0 + 2000, sequencer="9999"))
    engine = Engine(store, cfg, sinks=["out"], worker_id="w")
    # When it is processed in two steps, then finished
    engine.process([Message(e, f"line {i}") for i, e in enumerate(events[:3])], now=T0)
    engine.process([Message(e, f"line {i}") for i, e in enumerate(events[3:])], now=T0)
    engine.finish(now=T0)
    # Then the batches are these, whatever the backend
    got = [(b.prefix, b.object_count, b.trigger, b.fired_at)
           for b in store.list_batches(state="closed")]
    assert sorted(got) == [("i/e/", 2, "duration", T0 + 304), ("i/e/", 3, "count", T0 + 2),
                           ("j/k/", 1, "duration", T0 + 2300)]
    assert store.counters()["events.duplicate"] == 1
    assert math.isfinite(store.worker_clock("w") or math.inf)


def test_a_worker_without_sinks_records_its_events_for_the_sinks_a_started_worker_relays_to(
    store: Store,
) -> None:
    # Given a fresh store where a long-running worker with a webhook sink started and
    # has delivered nothing yet (no delivery rows at all)
    cfg = Settings(database_url="sqlite:///:memory:", bucket_threshold_event_count=1)
    Engine(store, cfg, sinks=["webhook", "stdout"], worker_id="worker").register(now=T0)
    assert store.known_sinks() == ["webhook"]  # (its stdout is no one else's to relay)
    # When a backfill with no sink settings fires a batch
    engine = Engine(store, cfg, sinks=[], worker_id="backfill")
    [ready] = engine.process([Message(eventbridge("i/e/a", T0), "m1")], now=T0).fired
    # Then the event waits for the worker's sink (it waited for none before)
    assert [e.event_id for e in store.pending("webhook", limit=10, now=T0 + 1)] == [
        ready.event_id]



def test_a_worker_printing_its_events_also_records_them_for_the_shared_sinks(
    store: Store,
) -> None:
    # Given a store where a worker relaying to a webhook and EventBridge started, and a
    # watcher printing its own folder's batches (its stdout is the sink
    # stdout@watcher/lab: bucket "lab")
    cfg = Settings(database_url="sqlite:///:memory:", bucket_threshold_event_count=1)
    Engine(store, cfg, sinks=["webhook", "eventbridge"], worker_id="worker").register(now=T0)
    Engine(store, cfg, sinks=["stdout@watcher/lab"], worker_id="watcher").register(now=T0)
    # When a worker whose only sinks are its stdout and log (edp run --stdout) fires a
    # batch, and a replay printing to stdout on the same store fires another
    engine = Engine(store, cfg, sinks=["stdout", "log"], worker_id="printing")
    [ready] = engine.process([Message(eventbridge("i/e/a", T0), "m1")], now=T0).fired
    replay = Engine(store, cfg, sinks=["stdout"], worker_id="replay", borrow_sinks=False)
    [replayed] = replay.process([Message(eventbridge("j/e/a", T0), "m1")], now=T0).fired
    # Then the worker's event waits for its own sinks and for the shared ones too; the
    # replay's for its stdout only
    for sink in ("stdout", "log", "webhook", "eventbridge"):
        assert ready.event_id in [e.event_id for e in store.pending(sink, limit=10,
                                                                     now=T0 + 1)], sink
    for sink in ("webhook", "eventbridge"):
        assert replayed.event_id not in [e.event_id for e in store.pending(
            sink, limit=10, now=T0 + 1)], sink
    # and neither goes to the watcher's stdout, which prints its bucket's batches only
    assert store.pending("stdout@watcher/lab", limit=10, now=T0 + 1) == []


def test_a_watchers_sinks_get_its_buckets_batches_whoever_fires_them(store: Store) -> None:
    # Given a watcher of bucket "lab" (its stdout and packager serve that bucket), and
    # another worker relaying to a webhook
    cfg = Settings(database_url="sqlite:///:memory:", bucket_threshold_event_count=0,
                   bucket_threshold_duration=10.0)
    mine = ("stdout@watcher/lab", "quilt-packager@watcher/lab")
    store.register_sinks(mine, now=T0)  # (as the watcher does at its start)
    # (a replay into the store fires a batch of "lab", and is done)
    replay = Engine(store, cfg, sinks=["stdout"], worker_id="replay", borrow_sinks=False)
    replay.process([Message(eventbridge("j/e/a", T0, bucket="lab"), "m3")], now=T0)
    assert len(replay.fire_due(now=T0 + 11)) == 1
    store.finish_worker("replay")
    # (the other worker is a watcher of bucket "elsewhere", also relaying to a webhook)
    other = Engine(store, cfg, sinks=["webhook", "stdout@other/elsewhere"], worker_id="other")
    other.register(now=T0)
    # When the other worker fires, by time, a batch of "lab" and one of another bucket
    other.process([Message(eventbridge("i/e/a", T0, bucket="lab"), "m1"),
                   Message(eventbridge("i/e/b", T0, bucket="bucket"), "m2")], now=T0)
    fired = {r.bucket: r for r in other.fire_due(now=T0 + 11)}
    # Then "lab"'s event waits for the watcher's sinks too, the other's does not, nor
    # the replay's (a replay keeps its events to itself)
    for sink in mine:
        assert [e.event_id for e in store.pending(sink, limit=10, now=T0 + 12)] == [
            fired["lab"].event_id], sink
    assert {e.event_id for e in store.pending("webhook", limit=10, now=T0 + 12)} == {
        fired["lab"].event_id, fired["bucket"].event_id}
    # and the firing watcher's own stdout gets neither (another bucket's batches)
    assert store.pending("stdout@other/elsewhere", limit=10, now=T0 + 12) == []


def test_a_worker_borrowing_sinks_learns_of_one_registered_after_it_started(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from edp import engine as engine_module

    monkeypatch.setattr(engine_module, "KNOWN_SINKS_RECHECK", (0.2, 0.2))
    cfg = Settings(database_url="sqlite:///:memory:", bucket_threshold_event_count=1)
    # Given a worker printing its events (edp run --stdout) that stepped before any
    # shared sink was known
    printing = Engine(store, cfg, sinks=["stdout"], worker_id="printing")
    printing.process([Message(eventbridge("i/e/a", T0), "m1")], now=T0)
    # When a worker relaying to a webhook starts, then one to SNS, and the printing
    # worker fires a batch after each (past the recheck)
    Engine(store, cfg, sinks=["webhook"], worker_id="w1").register(now=T0)
    time.sleep(0.3)
    [first] = printing.process([Message(eventbridge("j/e/a", T0), "m2")], now=T0).fired
    Engine(store, cfg, sinks=["sns"], worker_id="w2").register(now=T0)
    time.sleep(0.3)
    [second] = printing.process([Message(eventbridge("k/e/a", T0), "m3")], now=T0).fired
    # Then each event waits for the shared sinks known by then (read once per sink: a
    # shared store leases what it returns)
    webhook, sns = ([e.event_id for e in store.pending(sink, limit=10, now=T0 + 1)]
                    for sink in ("webhook", "sns"))
    assert first.event_id in webhook and second.event_id in webhook
    assert second.event_id in sns

def test_a_watchers_sinks_do_not_slow_the_look_for_a_shared_sink(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from edp import engine as engine_module

    monkeypatch.setattr(engine_module, "KNOWN_SINKS_RECHECK", (0.2, 30.0))
    cfg = Settings(database_url="sqlite:///:memory:", bucket_threshold_event_count=1)
    # Given a store that knows only a watcher's own sink, and a worker printing its
    # events that stepped (it knows no shared sink yet: it looks again soon)
    store.register_sinks(["stdout@watcher/lab"], now=T0)
    printing = Engine(store, cfg, sinks=["stdout"], worker_id="printing")
    printing.process([Message(eventbridge("i/e/a", T0), "m1")], now=T0)
    # When a worker relaying to a webhook starts, and the printing one fires a batch
    Engine(store, cfg, sinks=["webhook"], worker_id="w1").register(now=T0)
    time.sleep(0.3)
    [ready] = printing.process([Message(eventbridge("j/e/a", T0), "m2")], now=T0).fired
    # Then its event waits for the webhook (the watcher's sink did not count as a
    # shared one known, which would have meant looking again only after 30 s)
    assert ready.event_id in [e.event_id for e in store.pending("webhook", limit=10,
                                                                 now=T0 + 1)]


def test_an_operators_close_reaches_every_shared_sink_whatever_its_own(store: Store) -> None:
    # Given a store where a worker relaying to a webhook and SNS started, and an open
    # batch
    cfg = Settings(database_url="sqlite:///:memory:", bucket_threshold_event_count=0)
    worker = Engine(store, cfg, sinks=["webhook", "sns"], worker_id="worker")
    worker.register(now=T0)
    Engine(store, cfg, sinks=["stdout@watcher/bucket"], worker_id="watcher").register(now=T0)
    Engine(store, cfg, sinks=["stdout@elsewhere/lab"], worker_id="elsewhere").register(now=T0)
    worker.process([Message(eventbridge("i/e/a", T0), "m1")], now=T0)
    [batch_row] = store.list_batches(state="open")
    # When an operator whose only sink setting is an EventBridge bus closes it
    operator = Engine(store, cfg, sinks=["eventbridge"], worker_id="operator")
    ready = operator.close_batch(batch_row.batch_id, now=T0 + 5)
    # Then its event waits for the operator's sink and for the workers' sinks
    # (a watcher's stdout of its bucket too: an operator's close beside `edp watch`
    # comes out there; not a watcher's of another bucket)
    for sink in ("eventbridge", "webhook", "sns", "stdout@watcher/bucket"):
        assert [e.event_id for e in store.pending(sink, limit=10, now=T0 + 6)] == [
            ready.event_id], sink
    assert store.pending("stdout@elsewhere/lab", limit=10, now=T0 + 6) == []

def test_a_worker_without_sinks_records_its_events_for_the_sinks_others_relay_to(
    store: Store,
) -> None:
    # Given a store where a worker with an EventBridge sink emitted an event
    cfg = Settings(database_url="sqlite:///:memory:", bucket_threshold_event_count=1)
    Engine(store, cfg, sinks=["eventbridge"], worker_id="w1").process(
        [Message(eventbridge("i/e/a", T0), "m1")], now=T0)
    # When a process with no sink settings (a backfill from a laptop) fires a batch
    engine = Engine(store, cfg, sinks=[], worker_id="laptop")
    [ready] = engine.process([Message(eventbridge("j/k/b", T0), "m2")], now=T0).fired
    # Then its event waits for the workers' sink, instead of for no sink at all
    pending = [e.event_id for e in store.pending("eventbridge", limit=10, now=T0 + 1)]
    assert ready.event_id in pending


def _oversized(key: str) -> dict[str, object]:
    event = eventbridge(key, T0)
    event["detail"]["object"]["size"] = 10**20  # type: ignore[index]
    return event


@pytest.mark.parametrize("bad", [eventbridge("i/e/bad\x00", T0), _oversized("i/e/big"),
                                 eventbridge("i/e/" + "k" * 3000, T0),
                                 # 1,000 characters, 3,000 bytes, none repeated (PostgreSQL
                                 # compresses repeated ones below its index limit)
                                 eventbridge("i/e/" + "".join(chr(0x4E00 + n * 7)
                                                              for n in range(1000)), T0),
                                 eventbridge("i/e/x", T0, bucket="b" * 3000),
                                 b"not json \x00 with a NUL", "\x00",
                                 b'{"Records": [' + b", ".join([b"{}"] * 5000) + b"]}"],
                         ids=["nul-in-key", "size-out-of-range", "key-over-1024-characters",
                              "key-over-1024-bytes", "bucket-name-too-long", "nul-in-body",
                              "nul-body-text", "5000-bad-records"])
def test_an_event_no_backend_can_store_is_a_dead_letter_and_the_rest_goes_on(
    store: Store, bad: dict[str, object] | bytes | str
) -> None:
    # Given a step with an event no store can hold (a NUL in the key: PostgreSQL; a size
    # past 64 bits: both) among good events
    cfg = Settings(database_url="sqlite:///:memory:", bucket_threshold_event_count=2)
    engine = Engine(store, cfg, sinks=["out"], worker_id="w")
    messages = [Message(eventbridge("i/e/a", T0), "m1"), Message(bad, "m2"),
                Message(eventbridge("i/e/b", T0), "m3")]
    # When it is processed
    report = engine.process(messages, now=T0)
    # Then the step committed: the good events made their batch, the bad one is kept
    assert [(r.prefix, r.object_count) for r in report.fired] == [("i/e/", 2)]
    [letter] = store.dead_letters(limit=10)
    assert letter.location == "m2"
    # (a body of 5,000 bad records keeps a reason of a few lines, not of 5,000)
    assert len(letter.reason) < 5000 and "\x00" not in letter.body


@pytest.mark.parametrize(("body", "as_base64"), [
    (b"not json \x00 with a NUL", True), (b"\xff\xfe not UTF-8 \x80", True),
    ("a lone surrogate \udc80", True), ("plain text", False),
    ("caf\u00e9 \\u0000 (an escaped NUL, as text)", False),
], ids=["nul", "not-utf8", "lone-surrogate", "text", "escaped-nul-text"])
def test_a_dead_letter_keeps_the_body_it_was_given_byte_for_byte(
    store: Store, body: bytes | str, as_base64: bool
) -> None:
    import base64

    from edp.engine import BASE64_BODY

    # Given a message that cannot be decoded
    engine = Engine(store, Settings(database_url="sqlite:///:memory:"), sinks=["out"],
                    worker_id="w")
    engine.process([Message(body, "m1")], now=T0)
    # Then its dead letter holds the very bytes received: as text when they are UTF-8
    # text without a NUL, else as base64, and then the reason says so
    [letter] = store.dead_letters(limit=10)
    raw = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
    if as_base64:
        assert letter.body.startswith(BASE64_BODY), letter.body
        assert base64.b64decode(letter.body.removeprefix(BASE64_BODY)) == raw
        assert "body kept as base64" in letter.reason
    else:
        assert letter.body.encode() == raw and "base64" not in letter.reason


def test_a_batch_id_with_a_nul_is_not_found(store: Store) -> None:
    from edp.errors import NotFound

    with pytest.raises(NotFound):
        store.get_batch("ab\x00")


def test_package_ready_leases_reads_after_commit_and_emits_once(
    store: Store, tmp_path: Path
) -> None:
    from edp.core.envelopes import Origin
    from edp.quilt.ready import PackageReadyObserver, local_pointer_reader

    # Given a registry folder with a revision pointer, and two workers' observers
    pointer = ".quilt/named_packages/team/pkg/1700000000"
    (tmp_path / "reg" / pointer).parent.mkdir(parents=True)
    (tmp_path / "reg" / pointer).write_text("c" * 64)

    def engine(worker: str) -> Engine:
        observer = PackageReadyObserver(
            registries=["reg"], delay=10, origin=Origin("s", "a", "r"),
            reader=local_pointer_reader(tmp_path), lease=60,
        )
        return Engine(store, Settings(), sinks=["s1"], worker_id=worker, observers=[observer])

    first, second = engine("w1"), engine("w2")
    # When the pointer's event reaches one, and both look after the delay
    first.process([Message(eventbridge(pointer, T0, bucket="reg"), "m1")], now=T0)
    second.fire_due(now=T0 + 11)
    first.fire_due(now=T0 + 12)
    second.fire_due(now=T0 + 200)
    # Then one package-ready was recorded, and no timer is left
    events = [e for e in store.outbox_events() if e.kind == "package-ready"]
    assert len(events) == 1
    assert '"top-hash":"' + "c" * 64 + '"' in events[0].payload.replace(" ", "")
    assert store.next_timer_due() is None
    assert store.counters()["observer.emitted"] == 1


def test_prune_history_keeps_package_ready_events_so_a_revision_seen_again_is_not_sent_again(
    store: Store, tmp_path: Path
) -> None:
    from edp.core.envelopes import Origin
    from edp.quilt.ready import PackageReadyObserver, local_pointer_reader

    # Given a revision whose package-ready was emitted and delivered long ago
    pointer = ".quilt/named_packages/team/pkg/1700000000"
    (tmp_path / "reg" / pointer).parent.mkdir(parents=True)
    (tmp_path / "reg" / pointer).write_text("c" * 64)
    observer = PackageReadyObserver(registries=["reg"], delay=10, origin=Origin("s", "a", "r"),
                                    reader=local_pointer_reader(tmp_path))
    engine = Engine(store, Settings(), sinks=["s"], worker_id="w", observers=[observer])
    engine.process([Message(eventbridge(pointer, T0, bucket="reg"), "m1")], now=T0)
    engine.fire_due(now=T0 + 11)
    sink = ListSink("s")
    Relay(store, [sink]).deliver()
    assert [e["detail-type"] for e in sink.sent] == ["package-ready"]
    # When the history is pruned, then the pointer's event comes again (an edp watch of
    # the registry folder scans it at every start; a redriven queue message)
    store.prune_history(before=T0 + 7200, limit=500)
    engine.process([Message(eventbridge(pointer, T0, bucket="reg"), "m2")], now=T0 + 7200)
    engine.fire_due(now=T0 + 7211)
    # Then the revision is not announced again: the outbox still knows its event id
    assert Relay(store, [sink]).deliver().delivered == 0
    assert [e["detail-type"] for e in sink.sent] == ["package-ready"]


def test_a_forgotten_sink_is_no_longer_known_and_its_deliveries_are_gone(store: Store) -> None:
    from edp.store.base import SinkSummary

    # Given a registered webhook sink and an EventBridge sink, each with deliveries:
    # b-1 delivered to both, b-2 pending on the webhook, b-3 parked on it
    store.register_sinks(["webhook"], now=T0)
    write_closed(store, batch("b-1", prefix="1/"), batch("b-2", prefix="2/"),
                 batch("b-3", prefix="3/"), sinks=("webhook", "eventbridge"))
    store.mark_delivered("webhook", ["ev-b-1"], now=T0)
    store.mark_delivered("eventbridge", ["ev-b-1", "ev-b-2", "ev-b-3"], now=T0)
    store.mark_failed("webhook", "ev-b-3", error="410 Gone", retry_at=None, now=T0)
    # Then the summaries count them per sink
    assert store.sink_summaries() == [
        SinkSummary("eventbridge", None, 0, 0, 3),
        SinkSummary("webhook", T0, 1, 1, 1),
    ]
    # When the webhook is forgotten
    assert store.forget_sink("webhook") == SinkSummary("webhook", T0, 1, 1, 1)
    # Then it is no longer known, nothing waits for it, and the other sink is untouched
    assert store.known_sinks() == ["eventbridge"]
    assert store.pending("webhook", limit=10, now=T0 + 1) == []
    assert store.stats()["pending_deliveries"] == 0 and store.stats()["parked_deliveries"] == 0
    assert store.sink_summaries() == [SinkSummary("eventbridge", None, 0, 0, 3)]
    assert [e.event_id for e in store.outbox_events(limit=5)] == ["ev-b-3", "ev-b-2", "ev-b-1"]
    # And an unknown sink is None
    assert store.forget_sink("webhook") is None
    # And a sink registered without any delivery has zero counts
    store.register_sinks(["sns"], now=T0 + 5)
    assert store.forget_sink("sns") == SinkSummary("sns", T0 + 5, 0, 0, 0)


class _ByPrefix:
    """A sink that delivers, parks (refused for good) or fails (to retry) each event by
    the prefix of its batch."""

    name = "s"

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        answers = []
        for entry in entries:
            prefix = orjson.loads(entry.payload)["detail"]["prefix"]
            if prefix == "parked/p/":
                answers.append(Failure(entry.event_id, "refused", permanent=True))
            elif prefix == "pending/p/":
                answers.append(Failure(entry.event_id, "try again"))
        return answers


def test_prune_history_deletes_what_is_old_and_done_only(store: Store) -> None:
    # Given fired batches whose events were delivered, parked (refused for good) and
    # not yet delivered, an open batch and a dead letter, all of T0
    engine = Engine(store, Settings(database_url="sqlite:///:memory:",
                                    bucket_threshold_event_count=2), sinks=["s"],
                    worker_id="w")
    engine.process([Message(eventbridge(key, T0, sequencer="01"), f"m{i}") for i, key in
                    enumerate(["done/p/a", "done/p/b", "parked/p/a", "parked/p/b",
                               "pending/p/a", "pending/p/b", "open/p/a"])]
                   + [Message(b"garbage", "m9")], now=T0)
    Relay(store, [_ByPrefix()]).deliver()
    # When the history older than T0 + 1 is pruned
    pruned = store.prune_history(before=T0 + 1, limit=500)
    # Then the delivered batch and its event are gone, and the dead letter; the batch
    # whose event waits for delivery, the one whose event a sink refused (never
    # delivered: it waits for an operator) and the open one stay
    assert (pruned.events, pruned.batches, pruned.dead_letters, pruned.more) == (1, 1, 1, False)
    assert sorted(b.prefix for b in store.list_batches()) == ["open/p/", "parked/p/",
                                                               "pending/p/"]
    assert store.dead_letters() == []
    assert store.stats()["pending_deliveries"] == 1
    assert store.stats()["parked_deliveries"] == 1
    # and the pruned batches' keys are still known: their files sent again are
    # duplicates, not a new batch
    report = engine.process([Message(eventbridge("done/p/a", T0, sequencer="01"), "again")],
                            now=T0 + 2)
    assert report.counts["events.duplicate"] == 1
    # and their memories, naming no batch now, go with the key retention
    with store.transaction() as tx:
        state = tx.load(LoadRequest(object_keys={("bucket", "done/p/a")}))
    assert state.keys[("bucket", "done/p/a")].batch_id is None
    assert store.prune(keys_before=T0 + 1) >= 2
    # When the waiting event is delivered (its retry is due half a second later), then
    # what is left is pruned
    relay = Relay(store, [ListSink("s")])
    wait_until(lambda: relay.deliver().delivered == 1, timeout=10, what="the retry")
    assert store.prune_history(before=T0 + 1, limit=500).batches == 1
    # Then the open batch and the parked one are left
    assert sorted(b.prefix for b in store.list_batches()) == ["open/p/", "parked/p/"]


def test_prune_history_goes_a_page_at_a_time(store: Store) -> None:
    engine = Engine(store, Settings(database_url="sqlite:///:memory:",
                                    bucket_threshold_event_count=1), sinks=["s"],
                    worker_id="w")
    engine.process([Message(eventbridge(f"p{n}/x/a", T0), f"m{n}") for n in range(3)],
                   now=T0)
    Relay(store, [ListSink("s")]).deliver()
    first = store.prune_history(before=T0 + 1, limit=2)
    assert (first.events, first.batches, first.more) == (2, 2, True)
    second = store.prune_history(before=T0 + 1, limit=2)
    assert (second.events, second.batches, second.more) == (1, 1, False)
    assert store.list_batches() == []


def test_nothing_newer_than_the_history_retention_is_pruned(store: Store) -> None:
    engine = Engine(store, Settings(database_url="sqlite:///:memory:",
                                    bucket_threshold_event_count=1,
                                    history_retention=3600), sinks=["s"], worker_id="w")
    engine.process([Message(eventbridge("p/x/a", T0), "m1")], now=T0)
    Relay(store, [ListSink("s")]).deliver()
    assert engine.prune_history(now=T0 + 3599).batches == 0
    assert engine.prune_history(now=T0 + 3601).batches == 1
    # (and with the setting's default, 0, nothing ever is)
    keep_all = Engine(store, Settings(database_url="sqlite:///:memory:"), sinks=["s"],
                      worker_id="w2")
    engine.process([Message(eventbridge("q/x/a", T0), "m2")], now=T0)
    Relay(store, [ListSink("s")]).deliver()
    assert keep_all.prune_history(now=T0 + 10**9) == HistoryPruned()
