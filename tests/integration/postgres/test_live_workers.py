"""Live workers (``edp run``, ``edp serve``...) sharing one PostgreSQL database: the clock of
SPEC section 4 with several workers, through real engines on the test server."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from edp.bootstrap import build_runtime
from edp.daemon import Daemon
from edp.engine import Engine, Message
from edp.store import open_store
from edp.store.base import Store
from edp_testing import T0, ListSink, eventbridge, run_engine, settings, wait_until


def msgs(*events: dict[str, Any]) -> list[Message]:
    return [Message(e, f"message {i + 1}") for i, e in enumerate(events)]


@pytest.fixture
def stores(pg_url: str) -> Iterator[list[Store]]:
    opened = [open_store(pg_url) for _ in range(3)]
    yield opened
    for store in opened:
        store.close()


@pytest.fixture
def pair(stores: list[Store]) -> tuple[Engine, Engine]:
    """Workers a and b (quiet period 100 s, no count trigger) on the test database."""
    cfg = settings(bucket_threshold_duration=100, bucket_threshold_event_count=0)
    return (Engine(stores[0], cfg, sinks=["list"], worker_id="a"),
            Engine(stores[1], cfg, sinks=["list"], worker_id="b"))


def emitted(store: Store) -> list[dict[str, Any]]:
    return [orjson.loads(e.payload)["detail"] for e in store.outbox_events(limit=10**6)]


def test_an_event_after_a_batch_deadline_fires_it_first_though_another_worker_is_behind(
    stores: list[Store], pair: tuple[Engine, Engine],
) -> None:
    a, b = pair
    # Given worker B behind (its clock at T0) and worker A's batch due at T0 + 110,
    # which B's clock holds back (SPEC 4)
    b.process(msgs(eventbridge("y/1/a", T0, sequencer="01")), now=time.time())
    a.process(msgs(eventbridge("x/1/a", T0, sequencer="01"),
                   eventbridge("x/1/b", T0 + 10, sequencer="01")), now=time.time())
    # When A gets a file of the same prefix at T0 + 500
    report = a.process(msgs(eventbridge("x/1/c", T0 + 500, sequencer="01")),
                       now=time.time())
    # Then the batch fired first, at its deadline, with its 2 files (as one worker would
    # fire it), and the late file opened the next one: it did not join a batch past
    # its deadline. B's batch, which no event of A's touched, still waits for B's clock
    assert [(r.prefix, r.object_count, r.trigger.value, r.fired_at) for r in report.fired] \
        == [("x/1/", 2, "duration", T0 + 110)]
    assert sorted((o.prefix, o.object_count) for o in stores[2].list_batches(state="open")) \
        == [("x/1/", 1), ("y/1/", 1)]
    # and B fires its own once its clock is past the deadline
    fired = b.process(msgs(eventbridge("y/2/a", T0 + 450, sequencer="01")), now=time.time())
    assert [(r.prefix, r.object_count) for r in fired.fired] == [("y/1/", 1)]


def test_workers_whose_machine_clocks_disagree_do_not_split_a_batch(
    stores: list[Store],
) -> None:
    from edp.store.postgres import PostgresStore

    # Given two live workers (quiet period 4 s), B on a machine whose clock runs 5 s
    # ahead, each reading its store's wall clock as edp's daemon and Lambdas do
    cfg = settings(bucket_threshold_duration=4, bucket_threshold_event_count=0)
    a = Engine(stores[0], cfg, sinks=["list"], worker_id="a")
    b = Engine(stores[1], cfg, sinks=["list"], worker_id="b")
    assert isinstance(stores[1], PostgresStore)
    stores[1].local_clock = lambda: time.time() + 5.0
    written = time.time()
    # ... B caught up (a file of another prefix: its clock is its wall clock)
    b.process(msgs(eventbridge("y/1/a", written, sequencer="01")),
              now=stores[1].wall_clock(), caught_up=True)
    # When A gets a file of a prefix, and B the next file of it a moment later
    a.process(msgs(eventbridge("x/1/a", written, sequencer="01")),
              now=stores[0].wall_clock(), caught_up=True)
    report = b.process(msgs(eventbridge("x/1/b", written, sequencer="02")),
                       now=stores[1].wall_clock(), caught_up=True)
    # Then both files are in one batch: B's clock is the database server's, not its
    # machine's, which would have put the batch past its deadline and split it
    assert report.fired == []
    assert sorted((o.prefix, o.object_count) for o in stores[2].list_batches(state="open")) \
        == [("x/1/", 2), ("y/1/", 1)]


def test_a_worker_behind_does_not_move_a_shared_batchs_deadline_back(
    stores: list[Store], pair: tuple[Engine, Engine],
) -> None:
    a, b = pair
    # Given A's batch last active at T0 + 90 (due at T0 + 190)
    a.process(msgs(eventbridge("x/1/a", T0), eventbridge("x/1/b", T0 + 90)), now=time.time())
    # When B, whose clock is at T0 + 50, adds a file to it, and both move on to T0 + 170
    b.process(msgs(eventbridge("x/1/c", T0 + 50)), now=time.time())
    a.process(msgs(eventbridge("z/1/a", T0 + 160)), now=time.time())
    report = b.process(msgs(eventbridge("w/1/a", T0 + 170)), now=time.time())
    # Then the batch is still open, with its 3 files: its quiet period runs from its
    # latest activity, not from the clock of whoever came last (one worker would have
    # applied the late file at T0 + 90 too)
    assert report.fired == []
    [x] = [o for o in stores[2].list_batches(state="open") if o.prefix == "x/1/"]
    assert (x.object_count, x.deadline) == (3, T0 + 190)


def test_a_worker_that_started_holds_time_firing_back_before_its_first_step(
    stores: list[Store], pair: tuple[Engine, Engine],
) -> None:
    a, b = pair
    # Given worker A started (the daemon registers it before its first receive), with
    # nothing applied yet: its first receive may hold files of any time
    a.register(now=time.time())
    # When B's clock passes a batch's deadline (T0 + 100) by its own files
    report = b.process(msgs(eventbridge("x/1/a", T0), eventbridge("y/1/a", T0 + 500)),
                       now=time.time())
    # Then nothing fires by time: A's clock is not past it yet
    assert report.fired == []
    # ... until A has stepped past it
    stepped = a.process(msgs(eventbridge("z/1/a", T0 + 450)), now=time.time())
    assert [r.prefix for r in stepped.fired] == ["x/1/"]


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


@pytest.mark.parametrize("chunk", [1, 10, 40])
def test_two_workers_taking_turns_on_a_backlog_emit_what_one_would(
    stores: list[Store], chunk: int
) -> None:
    # Given a backlog of in-order files, received in turns by two workers (as two
    # `edp run` on one queue do), so that each one's clock lags the other's by a receive
    # (SPEC 4: nothing fires by time until both clocks are past its deadline)
    cfg = settings(bucket_threshold_duration=100, bucket_threshold_event_count=5)
    events = in_order_stream(300, seed=5)
    expected = Counter(
        (d["detail"]["prefix"], d["detail"]["object-count"], d["detail"]["trigger"])
        for d in run_engine(events, cfg)
    )
    workers = [Engine(store, cfg, sinks=["list"], worker_id=name)
               for name, store in (("a", stores[0]), ("b", stores[1]))]
    for turn, start in enumerate(range(0, len(events), chunk)):
        workers[turn % 2].process(msgs(*events[start:start + chunk]), now=time.time())
    # When both are caught up (the wall clock is past every deadline)
    for worker in workers:
        worker.fire_due(now=time.time())
    # Then they emitted the batches one worker emits: none merged (a file after a
    # batch's deadline, at a worker's clock, never joins it), none split
    got = Counter((d["prefix"], d["object-count"], d["trigger"]) for d in emitted(stores[2]))
    assert got == expected


class WatchDaemon:
    """A live worker (``edp watch``: the real folder source, daemon and engine) on the
    test database, in a thread, whose receives may wait a minute."""

    def __init__(self, folder: Path, url: str, worker_id: str, **values: Any) -> None:
        from edp.sources.watch import FolderSource

        self.sink = ListSink()
        cfg = settings(database_url=url, bucket_threshold_duration=1,
                       bucket_threshold_event_count=0, **values)
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
        wait_until(lambda: all((stores[2].worker_clock(n) or 0) > T0 for n in ("busy", "idle")),
                 timeout=20, what="both workers' first clocks")
        # When a file lands on the other worker's side (quiet period 1 s)
        (busy / "lab" / "run-1").mkdir(parents=True)
        (busy / "lab" / "run-1" / "a.csv").write_text("x")
        # Then its batch fires within seconds: the idle worker keeps publishing its
        # clock while it waits, rather than once its long poll ends
        # (fired and sent by either: due batches are whoever's turn comes first)
        wait_until(lambda: sent(), timeout=15, what="the quiet batch")
    finally:
        for worker in workers:
            worker.stop()
    assert [(e["detail"]["prefix"], e["detail"]["trigger"]) for e in sent()] == [
        ("lab/run-1/", "duration")]


def test_a_manual_close_racing_a_step_does_not_close_the_successor_of_its_batch(
    pg_url: str, stores: list[Store], pair: tuple[Engine, Engine]
) -> None:
    # Given batch X open on prefix p/1/, a session holding p/1/'s lock, worker b's step
    # waiting for it with a file past X's deadline (it fires X and opens X's successor),
    # and an operator's close of X, which read X open and waits for the lock after b
    import psycopg

    a, b = pair
    a.process(msgs(eventbridge("p/1/a", T0, sequencer="01")), now=T0)
    [x] = stores[0].list_batches(state="open")
    operator = Engine(stores[2], settings(bucket_threshold_duration=100,
                                          bucket_threshold_event_count=0),
                      sinks=["list"], worker_id="operator")

    def waiting() -> int:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname ="
                               " current_database() AND wait_event_type = 'Lock'").fetchone()
        return 0 if row is None else int(row[0])

    outcome: dict[str, object] = {}

    def close() -> None:
        try:
            outcome["ready"] = operator.close_batch(x.batch_id, now=T0 + 501)
        except Exception as exc:  # (what the operator is told)
            outcome["error"] = exc

    with psycopg.connect(pg_url) as blocker:
        blocker.execute("SELECT 1 FROM prefixes WHERE prefix = 'p/1/' FOR UPDATE")
        step = threading.Thread(target=b.process, args=(
            msgs(eventbridge("p/1/b", T0 + 500, sequencer="01")),), kwargs={"now": T0 + 500})
        step.start()
        wait_until(lambda: waiting() >= 1, what="b's step waiting for the prefix")
        closing = threading.Thread(target=close)
        closing.start()
        wait_until(lambda: waiting() >= 2, what="the operator waiting for the prefix")
        blocker.rollback()
    step.join(30)
    closing.join(30)
    # Then the operator is told X closed meanwhile, X closed by its quiet period, and
    # its successor stays open
    assert "closed by another worker meanwhile" in str(outcome.get("error")), outcome
    closed = stores[0].list_batches(state="closed")
    assert [(r.batch_id, r.trigger) for r in closed] == [(x.batch_id, "duration")]
    [y] = stores[0].list_batches(state="open")
    assert (y.generation, y.object_count) == (2, 1)


def test_a_second_live_worker_under_one_worker_id_is_refused(
    tmp_path: Path, pg_url: str, stores: list[Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("watchfiles", reason="the web extra (watchfiles) is not installed")
    from edp.errors import EdpError
    from edp.store import postgres_workers

    monkeypatch.setattr(postgres_workers, "CLAIM_PATIENCE", 0.5)
    # (an idle worker publishes its clock every PEER_BEAT: 0.5 s here, not 2 s)
    monkeypatch.setattr(Daemon, "PEER_BEAT", 0.5)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    # Given a live worker "edp-1" (the worker_id of a config file two processes share)
    worker = WatchDaemon(first, pg_url, "edp-1")
    worker.thread.start()
    # (its worker_timeout short, four beats of the first: it would take the id from a
    # worker silent that long)
    twin = WatchDaemon(second, pg_url, "edp-1", worker_timeout=2)
    ended: list[BaseException | None] = []

    def run_twin() -> None:
        try:
            twin.daemon.run()
            ended.append(None)
        except BaseException as exc:  # (what the test asserts on)
            ended.append(exc)

    thread = threading.Thread(target=run_twin, daemon=True)
    try:
        wait_until(lambda: (stores[2].worker_clock("edp-1") or 0) > T0, timeout=20,
                   what="the first worker's clock")
        # When a second worker starts under the same id
        thread.start()
        thread.join(timeout=20)
        # Then it is refused before its first receive (one clock for two workers would
        # let the others fire batches one of them may still extend)
        assert ended, "the second worker under one id was not refused: it runs"
        assert isinstance(ended[0], EdpError), ended
        assert "worker id 'edp-1' is in use by another live" in str(ended[0])
    finally:
        if thread.is_alive():
            twin.daemon.stop()
            thread.join(timeout=70)
        worker.stop()
        twin.runtime.close()
    # And once the first has stopped, the id is free again
    again = WatchDaemon(second, pg_url, "edp-1")
    again.thread.start()
    try:
        wait_until(lambda: again.daemon.runtime.store.worker_finished("edp-1") is False,
                   timeout=20, what="the id taken again")
    finally:
        again.stop()
