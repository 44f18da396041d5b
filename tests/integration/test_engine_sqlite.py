"""The engine on a real SQLite file: outbox, relay, restarts, dead letters, timers."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from edp.core.events import ObjectEvent
from edp.engine import Engine, Message
from edp.errors import StoreError
from edp.relay import Relay
from edp.sinks.base import Failure
from edp.store import open_store
from edp.store.base import OutboxEntry, Store, Transaction
from edp.store.migrations import latest_version
from edp.store.sqlite import SqliteStore
from edp_testing import T0, ListSink, SlowSink, eventbridge, settings


def msgs(*events: dict[str, object]) -> list[Message]:
    return [Message(e, f"line {i + 1}") for i, e in enumerate(events)]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'edp.db'}"


@pytest.fixture(autouse=True)
def _close_stores(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The SQLite stores a test opens are closed after it (closing twice is harmless):
    an open connection left to the garbage collector is a ResourceWarning since Python
    3.13, reported under whichever test runs then."""
    opened: list[SqliteStore] = []
    real_init = SqliteStore.__init__

    def init(self: SqliteStore, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(SqliteStore, "__init__", init)
    yield
    for store in opened:
        store.close()


class Boom:
    """An observer that fails inside the step's transaction, like a crash would."""

    armed = True

    def observe(self, tx: Transaction, events: Sequence[ObjectEvent], *, clock: float,
                now: float, sinks: Sequence[str]) -> None:
        if self.armed:
            raise RuntimeError("crash in the middle of the step")

    def tick(self, tx: Transaction, *, clock: float, now: float, sinks: Sequence[str]) -> int:
        return 0

    def after_commit(self, store: Store, *, now: float, sinks: Sequence[str]) -> int:
        return 0


def test_a_failed_step_leaves_nothing_behind_and_a_retry_emits_once(url: str) -> None:
    cfg = settings(bucket_threshold_event_count=2)
    store = open_store(url)
    boom = Boom()
    engine = Engine(store, cfg, sinks=["list"], worker_id="w", observers=[boom])
    batch = msgs(eventbridge("i/e/a", T0, sequencer="01"), eventbridge("i/e/b", T0 + 1,
                                                                         sequencer="02"))
    with pytest.raises(RuntimeError):
        engine.process(batch, now=T0)
    # nothing was committed: no batch, no outbox row
    assert store.stats()["closed_batches"] == 0
    assert store.outbox_events() == []
    # the same input again (it was never acknowledged) is processed exactly once
    boom.armed = False
    engine.process(batch, now=T0)
    engine.process(batch, now=T0)  # a re-delivery after success: duplicates
    [event] = store.outbox_events()
    assert orjson.loads(event.payload)["detail"]["object-count"] == 2
    assert store.counters()["events.duplicate"] == 2


def test_relay_retries_failed_sinks_and_delivers_each_event_once_per_sink(url: str) -> None:
    store = open_store(url)
    good, flaky = ListSink("good"), ListSink("flaky")
    flaky.fail_next = 1
    clock = [T0]
    relay = Relay(store, [good, flaky], base_backoff=10, clock=lambda: clock[0])
    engine = Engine(store, settings(bucket_threshold_event_count=1), sinks=relay.sink_names,
                    worker_id="w")
    engine.process(msgs(eventbridge("i/e/a", T0), eventbridge("i/f/a", T0)), now=T0)
    first = relay.deliver()
    assert (first.delivered, first.failed) == (2, 2)
    assert len(good.sent) == 2 and flaky.sent == []
    assert relay.deliver().delivered == 0  # backing off: not due yet
    clock[0] += 11
    assert relay.deliver().delivered == 2
    assert [e["id"] for e in flaky.sent] == [e["id"] for e in good.sent]
    assert relay.deliver().delivered == 0
    assert store.stats()["pending_deliveries"] == 0


def test_a_relay_pass_with_a_budget_takes_turns_between_sinks_and_stops_on_request(
    url: str,
) -> None:
    import threading

    # Given 10 batch events for a slow sink and a fast one, one event a page
    store = open_store(url)
    slow, fast = SlowSink("slow", 0.05), ListSink("fast")
    relay = Relay(store, [slow, fast], page=1)
    engine = Engine(store, settings(bucket_threshold_event_count=1), sinks=relay.sink_names,
                    worker_id="w")
    fired = engine.process(msgs(*(eventbridge(f"i/e{i}/a", T0) for i in range(10))),
                           now=T0).fired
    # When a pass has a budget shorter than the slow sink's whole outbox
    first = relay.deliver(budget=0.12)
    # Then it stops with pages left, having served both sinks in turn (the fast sink
    # no longer waits for the slow one's whole outbox)
    assert first.more
    assert 0 < len(slow.sent) < 10
    assert len(fast.sent) >= len(slow.sent) - 1 > 0
    # And passes until none is left deliver the rest, each sink in the events' order
    while relay.deliver(budget=0.12).more:
        pass
    order = [b.event_id for b in fired]
    assert [e["id"] for e in slow.sent] == order
    assert [e["id"] for e in fast.sent] == order
    # And a pass asked to stop sends nothing more
    engine.process(msgs(eventbridge("i/late/a", T0 + 1)), now=T0 + 1)
    stop = threading.Event()
    stop.set()
    stopped = relay.deliver(stop=stop)
    assert stopped.more and stopped.delivered == 0
    assert relay.deliver().delivered == 2


def test_a_sink_whose_page_outlasts_the_budget_does_not_take_every_turn(url: str) -> None:
    # Given 6 batch events, a first sink whose single page takes longer than a pass's
    # budget (a packager, a slow webhook) and a fast one after it, one event a page
    store = open_store(url)
    slow, fast = SlowSink("slow", 0.1), ListSink("fast")
    relay = Relay(store, [slow, fast], page=1)
    engine = Engine(store, settings(bucket_threshold_event_count=1), sinks=relay.sink_names,
                    worker_id="w")
    engine.process(msgs(*(eventbridge(f"i/e{i}/a", T0) for i in range(6))), now=T0)
    # When the worker's passes each stop at that budget
    for _ in range(3):
        assert relay.deliver(budget=0.05).more
    # Then the fast sink had turns too: the pass after one that stopped begins where it
    # stopped (each pass began with the slow sink, and the fast one waited for its
    # whole outbox)
    assert len(slow.sent) >= 1 and len(fast.sent) >= 2


class RefusingSink(ListSink):
    """A sink that refuses every event for good (a webhook answering 404)."""

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        return [Failure(e.event_id, "HTTP 404", permanent=True) for e in entries]


def test_a_relay_keeps_no_memory_of_events_it_parked(url: str) -> None:
    # Given a long-running relay whose sink refuses every event for good
    store = open_store(url)
    refusing, flaky = RefusingSink("refusing"), ListSink("flaky")
    flaky.fail_next = 1
    clock = [T0]
    relay = Relay(store, [refusing, flaky], base_backoff=1, clock=lambda: clock[0])
    engine = Engine(store, settings(bucket_threshold_event_count=1), sinks=relay.sink_names,
                    worker_id="w")
    # When events are parked for it, and retried then delivered for the other
    for n in range(20):
        engine.process(msgs(eventbridge(f"i/e{n}/a", T0)), now=T0)
    assert relay.deliver().parked == 20
    clock[0] += 2
    assert relay.deliver().delivered == 20
    # Then every event is settled, and the relay remembers none of them: a worker
    # running for months does not grow with the events its sinks refused
    assert store.stats()["parked_deliveries"] == 20
    assert store.stats()["pending_deliveries"] == 0
    assert relay._attempts == {}


def test_reemit_sends_the_same_id_again(url: str) -> None:
    store = open_store(url)
    sink = ListSink()
    relay = Relay(store, [sink])
    engine = Engine(store, settings(bucket_threshold_event_count=1), sinks=["list"],
                    worker_id="w")
    [ready] = engine.process(msgs(eventbridge("i/e/a", T0)), now=T0).fired
    relay.deliver()
    assert engine.reemit(ready.batch_id[:6]) == ready.event_id
    relay.deliver()
    assert [e["id"] for e in sink.sent] == [ready.event_id, ready.event_id]



def test_restart_resumes_the_clock_and_the_open_batches(url: str) -> None:
    cfg = settings(bucket_threshold_duration=60)
    stream = [eventbridge(f"i/e/{n}", T0 + n * 10, sequencer=f"{n:04X}") for n in range(10)]
    stream += [eventbridge("i/z/a", T0 + 500, sequencer="FFFF")]

    def run(parts: list[list[dict[str, object]]]) -> list[tuple[object, ...]]:
        out: list[tuple[object, ...]] = []
        for part in parts:  # a new process for every part
            store = open_store(url)
            engine = Engine(store, cfg, sinks=["list"], worker_id="w")
            out += [(r.prefix, r.object_count, r.trigger.value, r.fired_at)
                    for r in engine.process(msgs(*part), now=T0).fired]
            store.close()
        return out

    split = run([stream[:4], stream[4:7], stream[7:]])
    Path(url.removeprefix("sqlite:///")).unlink()
    whole = run([stream])
    assert split == whole == [("i/e/", 10, "duration", T0 + 150)]


def test_dead_letters_keep_body_location_and_reason(url: str) -> None:
    store = open_store(url)
    engine = Engine(store, settings(), sinks=[], worker_id="w")
    report = engine.process([Message(b"{oops", "message id m-1", source="sqs:q"),
                             Message(eventbridge("i/e/a", T0), "message id m-2")], now=T0)
    assert report.events == 1
    [letter] = store.dead_letters()
    assert (letter.source, letter.location, letter.body) == ("sqs:q", "message id m-1", "{oops")
    assert letter.reason.startswith("not JSON")
    assert store.stats()["open_batches"] == 1


def test_fire_due_uses_the_wall_clock_when_caught_up(url: str) -> None:
    store = open_store(url)
    engine = Engine(store, settings(bucket_threshold_duration=30), sinks=["list"],
                    worker_id="w")
    # events of the last receive are applied at their own time (so a backlog's tail
    # never splits a batch), then the clock moves on to the wall clock
    engine.process(msgs(eventbridge("i/e/a", T0)), now=T0 + 1, caught_up=True)
    assert engine.clock == T0 + 1
    assert engine.next_deadline() == T0 + 30
    assert engine.fire_due(now=T0 + 29.5) == []
    [ready] = engine.fire_due(now=T0 + 31)
    assert (ready.trigger.value, ready.fired_at) == ("duration", T0 + 30)


def test_fire_due_says_how_far_it_fired_behind_a_peer(url: str) -> None:
    # Given a worker with an open batch and a live peer whose clock is behind
    store = open_store(url)
    engine = Engine(store, settings(bucket_threshold_duration=30), sinks=["list"],
                    worker_id="w")
    engine.process(msgs(eventbridge("i/e/a", T0)), now=T0 + 1, caught_up=True)
    store.heartbeat("peer", clock=T0 + 10, now=T0 + 40)
    # When it fires what is due at T0 + 40, Then it fired by time only up to the
    # peer's clock (an emit function that loses its store holds from there)
    assert engine.fire_due(now=T0 + 40) == []
    assert (engine.clock, engine.fired_until) == (T0 + 40, T0 + 10)
    store.close()


def test_a_replay_ends_firing_its_batches_despite_the_hold_of_a_worker_gone(
    tmp_path: Path,
) -> None:
    # Given a database where a worker that is gone left a hold that has not ended
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    store = open_store(url)
    now = time.time()
    store.heartbeat("gone", clock=T0, now=now, held=T0, held_until=now + 600)
    store.finish_worker("gone")
    # When a replay runs into it, Then it ends by firing its batch: nobody would later
    engine = Engine(store, settings(), sinks=["list"], worker_id="replay")
    engine.process(msgs(eventbridge("i/e/a", T0 + 5)), now=now)
    assert [r.prefix for r in engine.finish(now=now)] == ["i/e/"]
    store.close()


def test_a_hold_keeps_batches_open_here_and_at_the_other_workers_until_it_ends(
    url: str
) -> None:
    # Given two workers on one store, the first with an open batch (30 s quiet period)
    cfg = settings(bucket_threshold_duration=30)
    store_a, store_b = open_store(url), open_store(url)
    a = Engine(store_a, cfg, sinks=["list"], worker_id="a")
    b = Engine(store_b, cfg, sinks=["list"], worker_id="b")
    a.process(msgs(eventbridge("i/e/a", T0)), now=T0 + 1, caught_up=True)
    b.register(now=T0 + 1)
    # When the first holds (messages it received come again in 60 s) at its clock
    a.hold(now=T0 + 1, seconds=60)
    assert a.held(T0 + 1) == T0 + 1
    a.register(now=T0 + 1)  # (publishes it, as its next step would)
    # Then neither fires the batch when its deadline is past on the wall clock
    assert a.fire_due(now=T0 + 40) == []
    assert b.fire_due(now=T0 + 40) == []
    # And the file that comes again, older than the clock, to the *other* worker (whose
    # clock a newer file took past the batch's deadline) joins the batch
    b.process(msgs(eventbridge("i/f/x", T0 + 44)), now=T0 + 44)
    assert b.clock == T0 + 44
    b.process(msgs(eventbridge("i/e/b", T0 + 0.5)), now=T0 + 45)
    # When the hold ends and both clocks pass the deadlines, Then each batch fires once,
    # the first with both files
    assert a.held(T0 + 61) is None
    fired = b.fire_due(now=T0 + 120) + a.fire_due(now=T0 + 120) + b.fire_due(now=T0 + 121)
    assert sorted((r.prefix, r.object_count) for r in fired) == [("i/e/", 2), ("i/f/", 1)]
    store_a.close()
    store_b.close()


def test_files_that_come_back_during_a_hold_count_at_their_own_time(url: str) -> None:
    # Given a worker that applied a file of lab/p/, then held (the step holding two
    # more of its files failed: x, 10 s after the first, and new, 400 s after, past the
    # 300 s quiet period), and a file of lab/r/ took its clock to T0 + 500
    store = open_store(url)
    engine = Engine(store, settings(bucket_threshold_duration=300,
                                    bucket_threshold_event_count=0),
                    sinks=["list"], worker_id="w")
    wall = T0 + 100_000
    engine.process(msgs(eventbridge("lab/p/a", T0, sequencer="01")), now=wall)
    engine.hold(now=wall, seconds=65)
    engine.process(msgs(eventbridge("lab/r/y", T0 + 500, sequencer="04")), now=wall)
    # When the two come back, and the hold ends
    engine.process(msgs(eventbridge("lab/p/x", T0 + 10, sequencer="02"),
                        eventbridge("lab/p/new", T0 + 400, sequencer="03")), now=wall + 60)
    engine.fire_due(now=wall + 1000)
    # Then the batches are one worker's on the files in order: x joined the first
    # batch without restarting its quiet period at the clock, so new (past its
    # deadline) opened the next one
    closed = store.list_batches(state="closed", limit=10)
    assert sorted(sorted(o.key for o in store.batch_objects(b.batch_id)) for b in closed) == [
        ["lab/p/a", "lab/p/x"], ["lab/p/new"], ["lab/r/y"]]
    store.close()


@pytest.mark.parametrize("lag", [None, 30.0])
def test_a_receive_of_old_events_is_a_backlog_whatever_the_source_says(
    url: str, lag: float | None
) -> None:
    # Given a live engine (quiet period 10 s) draining an hour-old backlog whose first
    # receive came back less than full (SQS does that with a backlog too)
    store = open_store(url)
    engine = Engine(store, settings(bucket_threshold_duration=10,
                                    bucket_threshold_event_count=0),
                    sinks=["list"], worker_id="w")
    now = T0 + 3600
    first = engine.process(msgs(eventbridge("i/e/a", T0)), now=now, caught_up=True,
                           backlog_lag=lag)
    # When the next receive holds the next file, written 5 s after the first
    second = engine.process(msgs(eventbridge("i/e/b", T0 + 5)), now=now + 1,
                            backlog_lag=lag)
    fired = [(r.object_count, r.last_event_time) for r in
             [*first.fired, *second.fired, *engine.fire_due(now=now + 2),
              *engine.flush(now=now + 2)]]
    if lag is None:
        # Then taken at its word, the source moved the clock to the wall clock: the
        # first file's batch fired alone (split from the second)
        assert engine.clock >= now and not first.behind
        assert (1, T0) in fired
    else:
        # Then the step stayed a backlog: the clock at the event's time, nothing fired,
        # and the two files written 5 s apart are one batch
        assert first.behind and first.fired == []
        assert fired == [(2, T0 + 5)]


def test_one_old_event_in_a_receive_makes_it_a_backlog(url: str) -> None:
    # A receive of an unordered queue may mix live files with a backlog's: the old
    # one says there may be more behind it, so the source is not caught up
    engine = Engine(open_store(url), settings(), sinks=["list"], worker_id="w")
    now = T0 + 3600
    mixed = engine.process(msgs(eventbridge("i/e/new", now - 1), eventbridge("i/e/old", T0)),
                           now=now, caught_up=True, backlog_lag=30)
    live = engine.process(msgs(eventbridge("i/e/next", now)), now=now + 1, caught_up=True,
                          backlog_lag=30)
    assert (mixed.behind, live.behind) == (True, False)


@pytest.mark.parametrize("bound", [None, 60.0])
def test_a_live_engine_bounds_how_far_an_event_takes_the_clock(url: str,
                                                               bound: float | None) -> None:
    # Given an engine with a 300 s quiet period, with clock_max_ahead or (a replay's) none
    store = open_store(url)
    engine = Engine(store, settings(), sinks=["list"], worker_id="w", clock_max_ahead=bound)
    engine.process(msgs(eventbridge("i/e1/a", T0)), now=T0)
    # When an event dated in 9999 arrives 10 s later
    far = 253402300799.0  # 9999-12-31T23:59:59Z
    report = engine.process(msgs(eventbridge("i/e2/b", far)), now=T0 + 10)
    if bound is None:
        # Then without a bound the clock follows it (SPEC 4: a replay's stream is its clock)
        assert engine.clock == far
        assert [r.prefix for r in report.fired] == ["i/e1/"]
        return
    # Then with one the event counts, but moves the clock only to the wall clock + 60 s:
    # nothing fires early, and both batches fire by their quiet period in time
    assert engine.clock == T0 + 70 and report.fired == []
    assert report.counts["events.clock_ahead"] == 1
    assert engine.fire_due(now=T0 + 299) == []
    [first] = engine.fire_due(now=T0 + 301)
    assert (first.prefix, first.fired_at) == ("i/e1/", T0 + 300)
    [second] = engine.fire_due(now=T0 + 371)
    assert (second.prefix, second.fired_at, second.last_event_time) == ("i/e2/", T0 + 370, far)
    assert store.counters()["events.clock_ahead"] == 1
    store.close()


def test_a_live_engine_whose_clock_is_already_past_the_bound_goes_on(url: str) -> None:
    # Given a worker whose stored clock is far ahead (set before the bound existed, or a
    # wall clock that stepped back)
    store = open_store(url)
    far = 253402300799.0
    Engine(store, settings(), sinks=["list"], worker_id="w").process(
        msgs(eventbridge("i/e1/a", far)), now=T0)
    engine = Engine(store, settings(), sinks=["list"], worker_id="w", clock_max_ahead=60.0)
    # When it processes an ordinary event
    report = engine.process(msgs(eventbridge("i/e2/b", T0 + 1)), now=T0 + 1)
    # Then the step commits (the clock does not go back), and nothing is counted as ahead
    assert report.events == 1 and engine.clock == far
    assert "events.clock_ahead" not in store.counters()
    store.close()


def test_batch_objects_are_kept_for_inspection(url: str) -> None:
    store = open_store(url)
    engine = Engine(store, settings(), sinks=[], worker_id="w")
    engine.process(msgs(eventbridge("i/e/a", T0, sequencer="01", size=5),
                        eventbridge("i/e/a", T0 + 1, sequencer="02", size=7, etag="x")), now=T0)
    [row] = store.list_batches(state="open")
    [obj] = store.batch_objects(row.batch_id)
    assert (obj.key, obj.size, obj.etag, obj.sequencer, obj.event_time) == (
        "i/e/a", 7, "x", "02", T0 + 1)


def test_a_throw_away_store_batches_alike_without_object_rows(tmp_path: Path) -> None:
    # Given the same events on a kept store and on a throw-away one (a replay's scratch)
    stream = msgs(*(eventbridge(f"i/e/{n}", T0 + n, sequencer=f"{n + 1:02d}")
                    for n in range(5)),
                  eventbridge("i/e/0", T0 + 9, sequencer="01"))  # a duplicate
    kept = open_store(f"sqlite:///{tmp_path / 'kept.db'}")
    scratch = open_store(f"sqlite:///{tmp_path / 'scratch.db'}", fast_unsafe=True)
    reports = [Engine(s, settings(bucket_threshold_event_count=3), sinks=[], worker_id="w")
               .process(stream, now=T0) for s in (kept, scratch)]
    # Then both decide the same (key memories included: the duplicate is one on both)
    assert reports[0].fired == reports[1].fired
    assert reports[0].counts == reports[1].counts
    assert reports[1].counts["events.duplicate"] == 1
    # and only the kept store writes the rows that `edp batches show` reads
    [closed] = kept.list_batches(state="closed")
    assert len(kept.batch_objects(closed.batch_id)) == 3
    assert scratch.batch_objects(closed.batch_id) == []


def test_prune_forgets_old_key_memories(url: str) -> None:
    store = open_store(url)
    engine = Engine(store, settings(bucket_threshold_event_count=1), sinks=[], worker_id="w")
    engine.process(msgs(eventbridge("i/e/a", T0, sequencer="05")), now=T0)
    assert store.prune(keys_before=T0 + 1) == 1
    # after the retention an old sequencer is no longer recognised
    assert len(engine.process(msgs(eventbridge("i/e/a", T0 + 2, sequencer="05")),
                              now=T0).fired) == 1


def test_timers_are_durable_and_taken_once(url: str) -> None:
    store = open_store(url)
    with store.transaction() as tx:
        assert tx.set_timer("k", "a", due_at=10, payload="{}")
        assert not tx.set_timer("k", "a", due_at=5, payload="{}")
        tx.set_timer("k", "b", due_at=20, payload='{"x": 1}')
    store.close()
    store = open_store(url)
    with store.transaction() as tx:
        assert [t.key for t in tx.take_due_timers("k", until=15, limit=10)] == ["a"]
        assert tx.take_due_timers("k", until=15, limit=10) == []
        assert [t.payload for t in tx.take_due_timers("k", until=99, limit=10)] == ['{"x": 1}']


def test_schema_is_versioned(url: str) -> None:
    store = open_store(url)
    assert isinstance(store, SqliteStore)
    assert store.schema_version() == (latest_version("sqlite"),) * 2
    assert store.upgrade() == []


def test_a_database_of_the_first_schema_upgrades_with_its_key_memories(url: str) -> None:
    # Given a SQLite database created by the first migration, with a key memory
    import sqlite3

    from edp.core.batching import KeyMemory
    from edp.store.base import LoadRequest
    from edp.store.migrations import load_migrations

    [first] = [m for m in load_migrations("sqlite") if m.version == 1]
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    conn.executescript(first.sql)
    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                 " name TEXT NOT NULL, applied_at REAL NOT NULL)")
    conn.execute("INSERT INTO schema_migrations VALUES (1, ?, 0)", (first.name,))
    conn.execute("INSERT INTO key_memory (bucket, key, sequencer, seen_at, batch_id)"
                 " VALUES ('bkt', 'a/b/c', '0A', 5.0, 'b-1')")
    conn.commit()
    conn.close()
    # When a store opens it
    store = open_store(url)
    # Then it is at the latest version, and the key memory loads with no last write known
    assert store.schema_version() == (latest_version("sqlite"),) * 2
    with store.transaction() as tx:
        state = tx.load(LoadRequest(object_keys={("bkt", "a/b/c")}))
    assert state.keys == {("bkt", "a/b/c"): KeyMemory("0A", 5.0, "b-1")}
    store.close()


def test_engine_prune_keeps_the_retention_window(url: str) -> None:
    store = open_store(url)
    engine = Engine(store, settings(bucket_threshold_event_count=1), sinks=[], worker_id="w")
    day = 86400.0
    engine.process(msgs(eventbridge("i/e/old", T0, sequencer="01"),
                        eventbridge("i/e/new", T0 + day, sequencer="02")), now=T0)
    engine.process(msgs(eventbridge("i/e/x", T0 + day + 10, sequencer="03")), now=T0)
    assert engine.prune() == 1  # only the key last seen more than a day before the clock
    # the remembered key still recognises its duplicate; the forgotten one does not
    report = engine.process(msgs(eventbridge("i/e/new", T0 + day, sequencer="02"),
                                 eventbridge("i/e/old", T0, sequencer="01")), now=T0)
    assert report.counts["events.duplicate"] == 1


class SettleTimer:
    """An observer with a durable timer, like package-ready detection."""

    def observe(self, tx: Transaction, events: Sequence[ObjectEvent], *, clock: float,
                now: float, sinks: Sequence[str]) -> None:
        for event in events:
            tx.set_timer("settle", event.key, due_at=now + 5, payload="{}")

    def tick(self, tx: Transaction, *, clock: float, now: float, sinks: Sequence[str]) -> int:
        return len(tx.take_due_timers("settle", until=now, limit=100))

    def after_commit(self, store: Store, *, now: float, sinks: Sequence[str]) -> int:
        return 0


def test_observer_timers_wake_the_worker_too(url: str) -> None:
    store = open_store(url)
    engine = Engine(store, settings(bucket_threshold_duration=300), sinks=[],
                    worker_id="w", observers=[SettleTimer()])
    engine.process(msgs(eventbridge(".quilt/named_packages/u/p/1", T0)), now=T0 + 1,
                   caught_up=True)
    # nothing is batched (a .quilt/ key), but the observer's timer is the next wake-up
    assert store.stats()["open_batches"] == 0
    assert engine.next_deadline() == T0 + 6
    engine.process(msgs(eventbridge("i/e/a", T0 + 2)), now=T0 + 2, caught_up=True)
    assert engine.next_deadline() == T0 + 6  # earlier than the batch's T0 + 302


def test_package_ready_reads_pointers_outside_the_steps_transaction(tmp_path: Path) -> None:
    from edp.core.envelopes import Origin
    from edp.quilt.ready import PackageReadyObserver

    # Given a registry folder with one revision pointer, and an observer whose reader
    # notes whether a transaction is open on the store while it reads
    top_hash = "a" * 64
    pointer = ".quilt/named_packages/instrument/exp-1/1700000000"
    (tmp_path / "lab" / pointer).parent.mkdir(parents=True)
    (tmp_path / "lab" / pointer).write_text(top_hash)
    store = SqliteStore(str(tmp_path / "edp.db"))
    in_transaction: list[bool] = []

    def reader(bucket: str, key: str) -> str | None:
        in_transaction.append(store.conn.in_transaction)
        return (tmp_path / bucket / key).read_text()

    def observer() -> PackageReadyObserver:
        return PackageReadyObserver(registries=["lab"], delay=10, origin=Origin("s", "a", "r"),
                                    reader=reader, lease=60)

    engine = Engine(store, settings(), sinks=["list"], worker_id="w", observers=[observer()])
    # When the pointer's S3 event arrives, and the settle delay passes
    engine.process(msgs(eventbridge(pointer, T0, bucket="lab")), now=T0)
    engine.fire_due(now=T0 + 11)
    # Then the pointer was read once, with no transaction open, and package-ready recorded
    assert in_transaction == [False]
    [event] = [orjson.loads(e.payload) for e in store.outbox_events()
               if orjson.loads(e.payload)["detail-type"] == "package-ready"]
    assert event["detail"]["top-hash"] == top_hash
    assert store.next_timer_due() is None  # the lease was cleared

    # Given a worker that leased a due revision and died before reading it
    other = ".quilt/named_packages/instrument/exp-1/1700000100"
    (tmp_path / "lab" / other).write_text("b" * 64)
    dying = observer()
    engine = Engine(store, settings(), sinks=["list"], worker_id="w", observers=[dying])
    engine.process(msgs(eventbridge(other, T0 + 20, bucket="lab")), now=T0 + 20)
    with store.transaction() as tx:
        dying.tick(tx, clock=T0 + 31, now=T0 + 31, sinks=["list"])
    # When a new worker looks before the lease ends, and after
    engine = Engine(store, settings(), sinks=["list"], worker_id="w2", observers=[observer()])
    engine.fire_due(now=T0 + 31 + 59)
    before = len(store.outbox_events())
    engine.fire_due(now=T0 + 31 + 61)
    # Then the revision is emitted once, after the lease
    kinds = [orjson.loads(e.payload)["detail-type"] for e in store.outbox_events()]
    assert (before, kinds.count("package-ready")) == (1, 2)
    store.close()


def test_the_relay_query_reads_pending_deliveries_only(url: str) -> None:
    # Given a store whose sink has a long history of delivered events and a few pending
    # (and no ANALYZE statistics: edp never runs ANALYZE on its SQLite file)
    from edp.store.sqlite import PENDING_SQL

    store = SqliteStore.from_url(url)
    store.conn.executemany("INSERT INTO outbox (event_id, kind, payload, created_at)"
                           " VALUES (?, 'k', '{}', 0)", [(f"e{i}",) for i in range(5000)])
    store.conn.execute("INSERT INTO deliveries (sink, seq, event_id, delivered_at)"
                       " SELECT 's', seq, event_id, CASE WHEN seq > 4990 THEN NULL ELSE 1 END"
                       " FROM outbox")
    # When the relay's query is planned
    plan = [row[3] for row in store.conn.execute(
        "EXPLAIN QUERY PLAN " + PENDING_SQL, ("s", 10.0, "s", 10.0, 500))]
    # Then both the page and its order barrier search the pending index, never the
    # whole history (a relay round grew with every delivery ever made)
    searches = [step for step in plan if step.startswith(("SEARCH d", "SEARCH w", "SCAN"))]
    assert searches and all("deliveries_pending" in step for step in searches), plan
    assert len(store.pending("s", limit=500, now=10.0)) == 10


def test_a_throw_away_store_refuses_to_go_on_after_a_failed_step(tmp_path: Path) -> None:
    # Given a replay's throw-away store (no journal: a failed step cannot be undone)
    store = SqliteStore(str(tmp_path / "replay.db"), fast_unsafe=True)
    with store.transaction() as tx:
        tx.add_counters({"ok": 1})
    # When a step fails half-way
    def failing_step() -> None:
        with store.transaction() as tx:
            tx.add_counters({"half": 1})
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        failing_step()
    # Then any further step is refused, naming the first failure, instead of building
    # on what the failed step left behind; the store still closes
    with pytest.raises(StoreError, match=r"cannot go on after a failed step.*disk on fire"):
        store.heartbeat("w", clock=1.0, now=1.0)
    store.close()
    store.close()


def test_a_daemon_and_its_relay_read_the_wall_clock_their_store_shares(tmp_path: Path) -> None:
    from edp.bootstrap import build_runtime
    from edp.config import Settings
    from edp.daemon import Daemon

    # Given a worker's runtime on a store
    runtime = build_runtime(Settings(database_url=f"sqlite:///{tmp_path / 'clock.db'}"),
                            sinks=[])
    try:
        # Then its daemon's clock is the store's shared wall clock (the database
        # server's on PostgreSQL), unless a test gives another
        assert Daemon(runtime, []).clock == runtime.store.wall_clock
        assert abs(runtime.store.wall_clock() - time.time()) < 1
        # and so is its relay's, which times delivery leases: a relay whose machine's
        # clock runs ahead must not take another's lease early
        assert runtime.relay.clock == runtime.store.wall_clock
    finally:
        runtime.close()


def test_a_throw_away_store_finds_the_key_memories_of_earlier_steps(tmp_path: Path) -> None:
    # Given a replay's throw-away store (no journal, no per-object rows)
    store = open_store(f"sqlite:///{tmp_path / 'scratch.db'}", fast_unsafe=True)
    engine = Engine(store, settings(bucket_threshold_event_count=3), sinks=[], worker_id="w")
    engine.process(msgs(*(eventbridge(f"i/e/{n}", T0 + n, sequencer=f"{n + 1:02d}")
                          for n in range(2))), now=T0)
    # When later steps bring a re-delivery and an overwrite of keys of the first step
    duplicate = engine.process(msgs(eventbridge("i/e/0", T0 + 5, sequencer="01")), now=T0)
    overwrite = engine.process(msgs(eventbridge("i/e/1", T0 + 6, sequencer="09")), now=T0)
    # Then the first is a duplicate and the second does not count again (their
    # memories were found, and written over rather than inserted twice)
    assert duplicate.counts["events.duplicate"] == 1
    assert overwrite.counts["events.overwrite"] == 1
    assert not overwrite.fired
    assert len(engine.process(msgs(eventbridge("i/e/2", T0 + 7, sequencer="10")),
                              now=T0).fired) == 1
    store.close()


def test_a_throw_away_store_opened_on_key_memories_looks_them_up(tmp_path: Path) -> None:
    # Given a database that already holds a key's memory
    path = tmp_path / "scratch.db"
    kept = open_store(f"sqlite:///{path}")
    Engine(kept, settings(), sinks=[], worker_id="w").process(
        msgs(eventbridge("i/e/0", T0, sequencer="05")), now=T0)
    kept.close()
    # When it is opened as a throw-away store and the key comes again
    store = open_store(f"sqlite:///{path}", fast_unsafe=True)
    report = Engine(store, settings(), sinks=[], worker_id="w").process(
        msgs(eventbridge("i/e/0", T0 + 1, sequencer="05")), now=T0)
    # Then the memory was found: a duplicate
    assert report.counts["events.duplicate"] == 1
    store.close()
