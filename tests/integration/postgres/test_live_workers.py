"""Live workers (``edp run``, ``edp serve``...) sharing one PostgreSQL database: the clock of
SPEC section 4 with several workers, through real engines on the test server."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from edp.bootstrap import build_runtime
from edp.daemon import Daemon
from edp.engine import Engine, Message
from edp.store import open_store
from edp.store.base import Store
from edp_testing import T0, ListSink, eventbridge, iso, run_engine, settings


def msgs(*events: dict[str, Any]) -> list[Message]:
    return [Message(e, f"message {i + 1}") for i, e in enumerate(events)]


@pytest.fixture
def stores(pg_url: str) -> Iterator[list[Store]]:
    opened = [open_store(pg_url) for _ in range(3)]
    yield opened
    for store in opened:
        store.close()


def emitted(store: Store) -> list[dict[str, Any]]:
    return [orjson.loads(e.payload)["detail"] for e in store.outbox_events(limit=10**6)]


def test_an_event_after_a_batch_deadline_waits_for_the_worker_behind(
    stores: list[Store],
) -> None:
    cfg = settings(bucket_threshold_duration=100, bucket_threshold_event_count=0)
    a = Engine(stores[0], cfg, sinks=["list"], worker_id="a")
    b = Engine(stores[1], cfg, sinks=["list"], worker_id="b")
    # Given worker B behind (its clock at T0) and worker A's batch due at T0 + 110
    b.process(msgs(eventbridge("y/1/a", T0, sequencer="01")), now=time.time())
    a.process(msgs(eventbridge("x/1/a", T0, sequencer="01"),
                   eventbridge("x/1/b", T0 + 10, sequencer="01")), now=time.time())

    # When A gets a file of the same prefix at T0 + 500, while B moves on (to T0 + 450,
    # no longer a quiet period behind) a little later
    def b_moves_on() -> None:
        time.sleep(0.5)
        b.process(msgs(eventbridge("y/1/b", T0 + 450, sequencer="01")), now=time.time())

    thread = threading.Thread(target=b_moves_on)
    thread.start()
    a.process(msgs(eventbridge("x/1/c", T0 + 500, sequencer="01")), now=time.time())
    thread.join(timeout=30)

    # Then A waited for B's clock: the first batch fired at its deadline with 2 files (by
    # either worker), and the late file opened the next one (it did not join a batch
    # past its deadline); B's own due batch fired too, each once
    assert sorted(
        (d["prefix"], d["object-count"], d["trigger"], d["last-event-time"])
        for d in emitted(stores[2])
    ) == [("x/1/", 2, "duration", iso(T0 + 10)), ("y/1/", 1, "duration", iso(T0))]
    [open_x] = [o for o in stores[2].list_batches(state="open") if o.prefix == "x/1/"]
    assert open_x.object_count == 1


def test_a_worker_that_stays_behind_holds_a_late_batch_back_only_so_long(
    stores: list[Store],
) -> None:
    cfg = settings(bucket_threshold_duration=100, bucket_threshold_event_count=0,
                   worker_timeout=1.5)
    a = Engine(stores[0], cfg, sinks=["list"], worker_id="a")
    stop = threading.Event()

    # Given worker B live (it keeps heartbeating) but with its clock stuck at T0
    def b_beats() -> None:
        while not stop.is_set():
            stores[1].heartbeat("b", clock=T0, now=time.time())
            stop.wait(0.2)

    thread = threading.Thread(target=b_beats)
    thread.start()
    try:
        a.process(msgs(eventbridge("x/1/a", T0 + 1, sequencer="01")), now=time.time())
        # When A gets a file past the batch's deadline
        report = a.process(msgs(eventbridge("x/1/b", T0 + 500, sequencer="01")),
                           now=time.time())
    finally:
        stop.set()
        thread.join(timeout=30)
    # Then, once the wait ran out, A fired the batch on its own clock: not merged
    assert [(r.object_count, r.trigger.value) for r in report.fired] == [(1, "duration")]
    assert [o.object_count for o in stores[2].list_batches(state="open")] == [1]


def test_an_idle_worker_behind_is_not_waited_for(
    stores: list[Store], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = settings(bucket_threshold_duration=100, bucket_threshold_event_count=0)
    a = Engine(stores[0], cfg, sinks=["list"], worker_id="a")
    # Given worker B live but idle (it last stepped 5 s ago, e.g. a Lambda container
    # between invocations), with its clock at T0
    stores[1].heartbeat("b", clock=T0, now=time.time() - 5)
    a.process(msgs(eventbridge("x/1/a", T0 + 1, sequencer="01")), now=time.time())
    # When A gets a file past the batch's deadline
    with caplog.at_level("WARNING", logger="edp.engine"):
        report = a.process(msgs(eventbridge("x/1/b", T0 + 500, sequencer="01")),
                           now=time.time())
    # Then A went on at once (B has nothing in flight: no wait ran out) and fired the
    # batch before the new file opened the next one
    assert "has not reached" not in caplog.text
    assert [(r.object_count, r.trigger.value) for r in report.fired] == [(1, "duration")]
    assert [o.object_count for o in stores[2].list_batches(state="open")] == [1]


def in_order_stream(count: int, *, seed: int) -> list[dict[str, Any]]:
    """Files written in bursts per prefix, with gaps longer than the quiet period."""
    rng = random.Random(seed)
    t = T0
    events = []
    for i in range(count):
        t += rng.choice([1, 2, 3, 150])
        prefix = f"inst/exp-{rng.randrange(3)}/"
        events.append(eventbridge(f"{prefix}f{i}", t, sequencer=f"{i:08d}"))
    return events


def test_two_workers_draining_a_backlog_emit_what_one_would(stores: list[Store]) -> None:
    # Given a backlog of in-order files, received in chunks of 10 by whichever of two
    # workers asks first (as two `edp run` on one SQS queue do). (Only the quiet period:
    # the workers race, so a chunk may be applied after the next one, and which files a
    # count trigger takes follows the order they are applied in, as on any SQS queue.)
    cfg = settings(bucket_threshold_duration=100, bucket_threshold_event_count=0)
    events = in_order_stream(300, seed=5)
    expected = Counter(
        (d["detail"]["prefix"], d["detail"]["object-count"], d["detail"]["trigger"])
        for d in run_engine(events, cfg)
    )
    chunks = [events[i:i + 10] for i in range(0, len(events), 10)]
    lock = threading.Lock()
    failures: list[BaseException] = []

    started = threading.Barrier(2)

    def worker(name: str, store: Store) -> None:
        engine = Engine(store, cfg, sinks=["list"], worker_id=name)
        engine.register(now=time.time())  # (as the daemon does when it starts)
        started.wait(timeout=30)
        try:
            while True:
                with lock:
                    if not chunks:
                        break
                    chunk = chunks.pop(0)
                engine.process(msgs(*chunk), now=time.time())
            engine.fire_due(now=time.time())
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(name, store))
               for name, store in (("a", stores[0]), ("b", stores[1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures
    # When both are caught up (the wall clock is past every deadline)
    Engine(stores[2], cfg, sinks=["list"], worker_id="a").fire_due(now=time.time())
    # Then they emitted the batches one worker emits: none merged, none split
    got = Counter((d["prefix"], d["object-count"], d["trigger"]) for d in emitted(stores[2]))
    assert got == expected


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return value


class WatchDaemon:
    """A live worker (``edp watch``: the real folder source, daemon and engine) on the
    test database, in a thread, whose receives may wait a minute."""

    def __init__(self, folder: Path, url: str, worker_id: str) -> None:
        from edp.sources.watch import FolderSource

        self.sink = ListSink()
        cfg = settings(database_url=url, bucket_threshold_duration=1,
                       bucket_threshold_event_count=0)
        self.runtime = build_runtime(cfg, sinks=[self.sink], worker_id=worker_id)
        source = FolderSource(folder, bucket=folder.name, settle=0.1)
        self.daemon = Daemon(self.runtime, [source], max_wait=60.0)
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(timeout=70)
        self.runtime.close()


def test_an_idle_worker_does_not_hold_another_workers_quiet_batch_back(
    tmp_path: Path, pg_url: str, stores: list[Store]
) -> None:
    pytest.importorskip("watchfiles", reason="the web extra (watchfiles) is not installed")
    busy, idle = tmp_path / "busy", tmp_path / "idle"
    busy.mkdir()
    idle.mkdir()
    # Given two live workers on one database, the idle one in a receive that may wait
    # a minute (an empty queue's long poll), after both published their clocks
    workers = [WatchDaemon(busy, pg_url, "busy"), WatchDaemon(idle, pg_url, "idle")]

    def sent() -> list[dict[str, Any]]:
        return [e for worker in workers for e in worker.sink.sent]

    for worker in workers:
        worker.thread.start()
    try:
        wait_for(lambda: all((stores[2].worker_clock(n) or 0) > T0 for n in ("busy", "idle")),
                 timeout=20, what="both workers' first clocks")
        # When a file lands on the other worker's side (quiet period 1 s)
        (busy / "lab" / "run-1").mkdir(parents=True)
        (busy / "lab" / "run-1" / "a.csv").write_text("x")
        # Then its batch fires within seconds: the idle worker keeps publishing its
        # clock while it waits, rather than once its long poll ends
        # (fired and sent by either: due batches are whoever's turn comes first)
        wait_for(lambda: sent(), timeout=15, what="the quiet batch")
    finally:
        for worker in workers:
            worker.stop()
    assert [(e["detail"]["prefix"], e["detail"]["trigger"]) for e in sent()] == [
        ("lab/run-1/", "duration")]
