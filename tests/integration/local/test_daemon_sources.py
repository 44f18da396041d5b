"""One daemon, several sources: each is received from at once, none waits for another's poll.

Real folder sources (the local watcher) stand in for queues: an empty one makes a
receive wait the daemon's whole ``max_wait``, a full one always has a backlog.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from edp.bootstrap import build_runtime
from edp.daemon import Daemon, Received, Source
from edp.engine import Message
from edp.sinks.base import Failure
from edp.sources.watch import FolderSource
from edp.store.base import OutboxEntry
from edp.store.sqlite import SqliteStore
from edp_testing import ListSink, SlowSink, eventbridge, iso, settings
from integration.local.conftest import wait_until

pytestmark = pytest.mark.timeout(60)

MAX_WAIT = 60.0
"""Long enough that a source polled behind the empty one would wait 30 s or more."""


class DaemonRun:
    """The real daemon, engine and SQLite store in a thread, on ``sources``."""

    def __init__(self, tmp_path: Path, sources: Sequence[Source], sink: ListSink,
                 **values: Any) -> None:
        self.cfg = settings(database_url=f"sqlite:///{tmp_path / 'd.db'}", **values)
        self.sources, self.sink = sources, sink
        self.daemon: Daemon | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._work, daemon=True)

    def _work(self) -> None:  # SQLite connections belong to the thread that made them
        runtime = build_runtime(self.cfg, sinks=[self.sink], worker_id="fan-in")
        self.daemon = Daemon(runtime, self.sources, max_wait=MAX_WAIT)
        self._started.set()
        try:
            self.daemon.run()
        finally:
            runtime.close()

    def __enter__(self) -> DaemonRun:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.daemon is not None
        stopping = time.monotonic()
        self.daemon.stop()
        self._thread.join(timeout=15)
        assert not self._thread.is_alive(), "the daemon did not stop"
        self.stop_seconds = time.monotonic() - stopping


def folders(tmp_path: Path, *names: str) -> list[Path]:
    paths = [tmp_path / name for name in names]
    for path in paths:
        path.mkdir()
    return paths


def test_a_file_on_one_source_is_batched_while_another_source_waits(tmp_path: Path) -> None:
    # Given a daemon on two watched folders (the idle one first), one file per batch
    idle, busy = folders(tmp_path, "idle", "busy")
    sink = ListSink()
    run = DaemonRun(tmp_path, [FolderSource(idle, bucket="idle", settle=0.1),
                               FolderSource(busy, bucket="busy", settle=0.1)],
                    sink, bucket_threshold_event_count=1)
    with run:
        time.sleep(1.0)  # both sources have reported themselves caught up and wait

        # When a file lands in the busy folder
        (busy / "lab" / "run-1").mkdir(parents=True)
        (busy / "lab" / "run-1" / "a.csv").write_text("x")

        # Then its batch is out long before the idle source's wait could end
        wait_until(lambda: sink.sent, timeout=10, what="the busy folder's batch")
        assert [(e["detail"]["bucket"], e["detail"]["prefix"]) for e in sink.sent] == [
            ("busy", "lab/run-1/")]
    # And the daemon stopped promptly although a receive was still waiting
    assert run.stop_seconds < 10


def test_a_quiet_batch_fires_on_time_while_another_source_is_idle(tmp_path: Path) -> None:
    # Given a file written before the daemon starts, a 1 s quiet period, and an idle
    # second source whose receive may wait a minute
    busy, idle = folders(tmp_path, "busy", "idle")
    (busy / "lab" / "run-1").mkdir(parents=True)
    (busy / "lab" / "run-1" / "a.csv").write_text("x")
    sink = ListSink()
    run = DaemonRun(tmp_path, [FolderSource(busy, bucket="busy", settle=0.1),
                               FolderSource(idle, bucket="idle", settle=0.1)],
                    sink, bucket_threshold_duration=1)
    with run:
        # Then the batch fires by its quiet period, not after the idle source's long poll
        wait_until(lambda: sink.sent, timeout=10, what="the quiet batch")
    assert [(e["detail"]["prefix"], e["detail"]["trigger"]) for e in sink.sent] == [
        ("lab/run-1/", "duration")]


class CountingSink(ListSink):
    """Records how many messages the daemon had taken at each send."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[DaemonRun] = []
        self.messages_at_send: list[int] = []

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        daemon = self.runs[0].daemon
        assert daemon is not None
        self.messages_at_send.append(daemon.stats.messages)
        return super().send(entries)


def test_events_go_out_while_several_sources_have_a_backlog(tmp_path: Path) -> None:
    # Given two folders full of files (a backlog that takes 60 steps of 10 files) and
    # batches of 10 files
    first, second = folders(tmp_path, "first", "second")
    for root in (first, second):
        for run_number in range(30):
            folder = root / "lab" / f"run-{run_number:02d}"
            folder.mkdir(parents=True)
            for n in range(10):
                (folder / f"{n}.csv").write_text("x")
    time.sleep(0.2)  # settled
    sink = CountingSink()
    run = DaemonRun(tmp_path, [FolderSource(first, bucket="first", settle=0.1, chunk=10),
                               FolderSource(second, bucket="second", settle=0.1, chunk=10)],
                    sink, bucket_threshold_event_count=10)
    sink.runs.append(run)
    with run:
        wait_until(lambda: len(sink.sent) == 60, timeout=30, what="all 60 batches")
    # Then events went out all along (after every round of a delivery per source),
    # not once both backlogs were drained
    assert {e["detail"]["object-count"] for e in sink.sent} == {10}
    during = [m for m in sink.messages_at_send if m < 600]
    assert len(during) >= 20, sink.messages_at_send


class FlakySource(FolderSource):
    """A folder source whose first receive and first acknowledgement fail (a queue
    that is unreachable for a moment)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.receive_failures = self.ack_failures = 1

    def receive(self, *, wait: float) -> Received:
        if self.receive_failures:
            self.receive_failures -= 1
            raise OSError("queue unreachable")
        return super().receive(wait=wait)

    def ack(self, received: Received) -> None:
        if received.messages and self.ack_failures:
            self.ack_failures -= 1
            raise OSError("delete failed")
        super().ack(received)


def test_a_failing_receive_and_acknowledgement_lose_and_double_nothing(tmp_path: Path) -> None:
    # Given a source that fails its first receive and its first acknowledgement, beside
    # an idle one, and three files that make one batch
    flaky_root, idle = folders(tmp_path, "flaky", "idle")
    (flaky_root / "lab" / "run-1").mkdir(parents=True)
    for n in range(3):
        (flaky_root / "lab" / "run-1" / f"{n}.csv").write_text("x")
    flaky = FlakySource(flaky_root, bucket="flaky", settle=0.1)
    sink = ListSink()
    run = DaemonRun(tmp_path, [flaky, FolderSource(idle, bucket="idle", settle=0.1)], sink,
                    bucket_threshold_event_count=3)
    with run:
        # Then the files come again after each failure and make one batch, once
        wait_until(lambda: sink.sent, timeout=20, what="the batch")
        time.sleep(0.5)
    assert [(e["detail"]["object-count"], e["detail"]["trigger"]) for e in sink.sent] == [
        (3, "count")]
    assert run.daemon is not None and run.daemon.stats.errors == 2
    assert (flaky.receive_failures, flaky.ack_failures) == (0, 0)


class Scripted:
    """A queue whose receives follow a script of (delay, bodies, caught_up), then come
    back empty: real SQS returns partial receives ("caught up" by SPEC 4's rule) from a
    backlog too, which moto never does."""

    def __init__(self, name: str, script: list[tuple[float, list[dict[str, Any]], bool]]):
        self.name, self.script = name, list(script)

    def receive(self, *, wait: float) -> Received:
        if not self.script:
            time.sleep(min(wait, 0.05))
            return Received([], caught_up=True)
        delay, bodies, caught_up = self.script.pop(0)
        time.sleep(delay)
        return Received([Message(b, f"{self.name} message", source=self.name) for b in bodies],
                        caught_up=caught_up)

    def ack(self, received: Received) -> None:
        pass

    def close(self) -> None:
        pass


def partial_receives(name: str, old: float, *offsets: float) -> Scripted:
    """An hour-old backlog of lab/run-1/, one file per partial ("caught up") receive."""
    return Scripted(name, [(0.0, [eventbridge(f"lab/run-1/f{dt:g}", old + dt)], True)
                           for dt in offsets])


def test_a_backlog_received_in_partial_receives_is_batched_by_its_own_times(
    tmp_path: Path,
) -> None:
    # Given an hour-old backlog (quiet period 10 s): three files 5 s apart, then one
    # a minute later, delivered one per receive
    old = float(int(time.time()) - 3600)
    source = partial_receives("partial", old, 0, 5, 10, 70)
    sink = ListSink()
    run = DaemonRun(tmp_path, [source], sink, bucket_threshold_duration=10,
                    bucket_threshold_event_count=0)
    with run:
        wait_until(lambda: len(sink.sent) >= 2, timeout=20, what="the batches")
        time.sleep(0.3)
    # Then the batches are those of the files' own times, not of the wall clock (which
    # would fire the first file alone and keep the next three together)
    assert sorted((e["detail"]["first-event-time"], e["detail"]["object-count"])
                  for e in sink.sent) == [(iso(old), 3), (iso(old + 70), 1)]


def test_partial_receives_of_a_backlog_beside_another_source_are_batched_by_their_times(
    tmp_path: Path,
) -> None:
    # Given two queues: one with an hour-old backlog (three files 5 s apart, a receive
    # each, the second a second late), one empty (caught up at once)
    old = float(int(time.time()) - 3600)
    backlog = partial_receives("backlog", old, 0, 5, 10)
    backlog.script[1] = (1.0, *backlog.script[1][1:])
    empty = Scripted("empty", [(0.3, [], True)])
    sink = ListSink()
    run = DaemonRun(tmp_path, [backlog, empty], sink, bucket_threshold_duration=10,
                    bucket_threshold_event_count=0)
    with run:
        wait_until(lambda: sink.sent and not backlog.script, timeout=20, what="the batch")
        time.sleep(0.5)
    # Then the empty queue's "caught up" did not move the clock to the wall clock in
    # the middle of the other's backlog: the three files are one batch
    assert [(e["detail"]["first-event-time"], e["detail"]["object-count"])
            for e in sink.sent] == [(iso(old), 3)]


def test_key_memories_past_the_retention_are_pruned_while_a_source_is_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edp.store import open_store
    from edp.store.base import LoadRequest

    monkeypatch.setattr(Daemon, "PRUNE_EVERY", 0.0)  # (every round, not every 10 min)

    # Given a key seen long ago, and a source that only ever delivers old events (it
    # is never caught up), whose clock is now two days past that key
    old = float(int(time.time()) - 30 * 86400)
    source = Scripted("late", [(0.0, [eventbridge("lab/run-1/a", old)], True),
                               (0.0, [eventbridge("lab/run-2/b", old + 2 * 86400)], True),
                               (3.0, [eventbridge("lab/run-2/c", old + 2 * 86400)], True)])
    run = DaemonRun(tmp_path, [source], ListSink())
    with run:
        wait_until(lambda: run.daemon is not None and run.daemon.stats.messages == 2,
                   timeout=20, what="two messages")
        time.sleep(0.5)  # (the daemon waits in its next receive meanwhile)
        # Then the first key's memory was pruned (retention one day), though the
        # source never caught up; the second key's was kept
        store = open_store(run.cfg.database_url)
        try:
            with store.transaction() as tx:
                keys = tx.load(LoadRequest(object_keys={("bucket", "lab/run-1/a"),
                                                        ("bucket", "lab/run-2/b")})).keys
        finally:
            store.close()
    assert set(keys) == {("bucket", "lab/run-2/b")}


@pytest.mark.parametrize("late", [False, True])
def test_a_stop_that_leaves_received_messages_behind_is_not_clean(
    tmp_path: Path, late: bool
) -> None:
    # Given a daemon on two queues, one of whose receives (a long poll in flight when
    # the daemon is asked to stop) returns a message, or nothing, 3 s later
    script = [(3.0, [eventbridge("lab/run-1/f", time.time())] if late else [], True)]
    run = DaemonRun(tmp_path, [Scripted("slow", script), Scripted("idle", [])], ListSink())
    with run:
        time.sleep(0.3)
    # Then the message left behind is counted, and the stop is not clean (`edp run` then
    # does not record the worker as finished: its next start waits for the message)
    assert run.daemon is not None
    assert (run.daemon.abandoned, run.daemon.stopped_cleanly) == ((1, False) if late
                                                                  else (0, True))


def test_a_failed_delivery_is_tried_again_at_its_backoff_not_after_the_long_poll(
    tmp_path: Path,
) -> None:
    # Given a caught-up daemon whose receives wait a minute (an idle SQS queue's long
    # poll), and a sink that fails the first two tries of an event
    class LongPolling(Scripted):
        """Waits out every empty receive (8 s at most, so that the test can stop it),
        until the test has seen what it waits for (``done``: then it stops at once)."""

        done = threading.Event()

        def receive(self, *, wait: float) -> Received:
            if not self.script:
                self.done.wait(min(wait, 8.0))
                return Received([], caught_up=True)
            return super().receive(wait=wait)

    sink = ListSink()
    sink.fail_next = 2
    now = time.time()
    # (and more traffic just after the failure: a round whose deliver() sends nothing)
    source = LongPolling("queue", [(0.0, [eventbridge("lab/run-1/f", now)], True),
                                   (0.1, [eventbridge("lab/run-1/f", now)], True)])
    run = DaemonRun(tmp_path, [source], sink, bucket_threshold_event_count=1)
    with run:
        # Then the event arrives after the backoff (about 0.5-1 s, then 1-2 s), not a
        # long poll after each failure (16 s and more)
        wait_until(lambda: sink.sent, timeout=8, what="the event, after two retries")
        source.done.set()  # (the stop need not wait out the receive in progress)
    assert run.daemon is not None
    [event] = sink.sent
    assert event["detail"]["prefix"] == "lab/run-1/"


def test_a_stop_after_a_delivery_that_could_not_be_acknowledged_is_not_clean(
    tmp_path: Path,
) -> None:
    # Given one queue whose acknowledgement (SQS DeleteMessageBatch) fails
    class AckFails(Scripted):
        def ack(self, received: Received) -> None:
            if received.messages:
                raise OSError("the queue did not answer")

    source = AckFails("queue", [(0.0, [eventbridge("lab/run-1/f", time.time())], True)])
    run = DaemonRun(tmp_path, [source], ListSink())
    with run:
        wait_until(lambda: run.daemon is not None and run.daemon.stats.errors, timeout=10,
                   what="the failed acknowledgement")
    # Then the stop is not clean: the message comes again, and the next start waits for it
    assert run.daemon is not None and not run.daemon.stopped_cleanly


class Interrupted(Scripted):
    """A queue whose receive is interrupted (Ctrl-C where no signal handler stops the
    daemon gracefully: an embedding program, a test)."""

    def receive(self, *, wait: float) -> Received:
        raise KeyboardInterrupt


def test_a_daemon_stopped_by_an_exception_is_not_marked_finished(tmp_path: Path) -> None:
    # Given a worker whose loop ends with an exception (messages it received may be
    # on their way back: its next start must hold for them as after a crash)
    runtime = build_runtime(settings(database_url=f"sqlite:///{tmp_path / 'd.db'}"),
                            sinks=[ListSink()], worker_id="interrupted")
    daemon = Daemon(runtime, [Interrupted("q", [])], max_wait=0)
    try:
        with pytest.raises(KeyboardInterrupt):
            daemon.run()
        # Then it is not recorded as finished (a clean stop would be)
        assert runtime.store.worker_finished("interrupted") is False
    finally:
        runtime.close()


def test_a_daemon_stopped_cleanly_is_marked_finished(tmp_path: Path) -> None:
    # Given a worker with an idle queue, stopped (SIGTERM, Ctrl-C with the handlers)
    source = Scripted("q", [])
    run = DaemonRun(tmp_path, [source], ListSink())
    with run:
        time.sleep(0.3)
    # Then it is recorded as finished: the others need not wait for its clock
    store = build_runtime(run.cfg, sinks=[]).store
    try:
        assert store.worker_finished("fan-in") is True
    finally:
        store.close()


def test_a_message_that_becomes_a_dead_letter_is_said_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a queue whose receive holds a good event and an object key past S3's limit
    long_key = "lab/run-1/" + "x" * 1100
    source = Scripted("q", [(0.0, [eventbridge("lab/run-1/a", time.time()),
                                   eventbridge(long_key, time.time())], True)])
    # When the daemon takes it
    caplog.set_level("WARNING", logger="edp.daemon")
    run = DaemonRun(tmp_path, [source], ListSink())
    with run:
        wait_until(lambda: "dead letter" in caplog.text, what="the dead letter's log line")
    # Then the log says which message and why (not only `edp dead-letters`)
    assert "dead letter from q, q message: object key longer than 1024 bytes" in caplog.text


@pytest.mark.parametrize("queues", [1, 2])
def test_a_quiet_batch_does_not_fire_past_the_last_receive_after_a_slow_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, queues: int
) -> None:
    from edp.engine import Engine

    # Given a queue that delivers a file, then (its next receive) a second file of the
    # same prefix, uploaded with the first: it was in the queue all along, behind it
    # (quiet period 1 s); and a first step that takes 3 s (a lock wait, a stalled
    # database), so the quiet period passes while the worker knows nothing of the queue
    start = float(int(time.time()))
    source = Scripted("slow", [(0.0, [eventbridge("lab/run-1/a", start)], True),
                               (0.0, [eventbridge("lab/run-1/b", start)], True)])
    process = Engine.process
    steps = []

    def slow_first_step(self: Engine, *args: Any, **kwargs: Any) -> Any:
        report = process(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 1:
            time.sleep(3.0)
        return report

    monkeypatch.setattr(Engine, "process", slow_first_step)
    sink = ListSink()
    idle = [Scripted("idle", [])] if queues == 2 else []  # (another queue, caught up)
    run = DaemonRun(tmp_path, [source, *idle], sink, bucket_threshold_duration=1,
                    bucket_threshold_event_count=0)
    with run:
        wait_until(lambda: sink.sent and not source.script, timeout=20, what="the batch")
        time.sleep(2.0)
    # Then the file the worker received after its slow step joined the batch (which
    # fired only once a receive had found the queue caught up after the deadline),
    # rather than find it fired at the wall clock the slow step ended at
    assert [e["detail"]["object-count"] for e in sink.sent] == [2]


def test_a_slow_sink_with_a_long_outbox_holds_neither_new_input_nor_a_stop(
    tmp_path: Path,
) -> None:
    # Given a watched folder whose 100 files each fire a batch, and a sink that takes
    # 0.2 s per event (20 s for the whole outbox)
    (watched,) = folders(tmp_path, "lab")
    for i in range(100):
        (watched / f"p{i:03d}").mkdir()
        (watched / f"p{i:03d}" / "f.bin").write_bytes(b"x")
    sink = SlowSink("slow", 0.2, max_page=1)
    run = DaemonRun(tmp_path, [FolderSource(watched, bucket="lab", settle=0.1)], sink,
                    bucket_threshold_event_count=1, bucket_prefix_depth=1)

    def closed() -> int:
        with closing(sqlite3.connect(tmp_path / "d.db")) as conn:
            return int(conn.execute("SELECT count(*) FROM batches WHERE state = 'closed'")
                       .fetchone()[0])

    with run:
        wait_until(lambda: closed() >= 100 and len(sink.sent) >= 1, timeout=30)
        # When a new file lands while the outbox is being worked through
        (watched / "late").mkdir()
        (watched / "late" / "f.bin").write_bytes(b"x")
        # Then its batch fires before the outbox is through (the relay gives the loop
        # back between pages: it used to send all 100 first)
        wait_until(lambda: closed() >= 101, timeout=15)
        assert len(sink.sent) < 100
    # And the stop did not wait for the outbox either (the old loop sent it all, 20 s,
    # past the 15 s the test waits for a stop); what is left waits for the next start
    assert len(sink.sent) < 101
    assert run.daemon is not None and run.daemon.stopped_cleanly
    store = SqliteStore.from_url(run.cfg.database_url)
    try:
        assert store.stats()["pending_deliveries"] == 101 - len(sink.sent)
    finally:
        store.close()


class UnreachableSource:
    """A queue that cannot be reached (its receives fail: the daemon stays behind)."""

    name = "unreachable"

    def receive(self, *, wait: float) -> Received:
        from edp.daemon import ReceiveFailed

        time.sleep(0.05)
        raise ReceiveFailed("unreachable: connection refused", maybe_taken=False)

    def ack(self, received: Received) -> None:
        raise AssertionError("nothing was received")

    def close(self) -> None:
        pass


def test_a_relay_pass_that_stopped_at_its_budget_goes_on_at_once_while_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a daemon on two queues, one of them unreachable (so it is behind, and waits
    # for deliveries up to its whole max_wait), a folder whose 20 files each fire a
    # batch, and a sink that takes 0.05 s per event, with passes of 0.2 s
    monkeypatch.setattr(Daemon, "RELAY_BUDGET", 0.2)
    (watched,) = folders(tmp_path, "lab")
    for i in range(20):
        (watched / f"p{i:02d}").mkdir()
        (watched / f"p{i:02d}" / "f.bin").write_bytes(b"x")
    sink = SlowSink("slow", 0.05, max_page=1)
    run = DaemonRun(tmp_path, [FolderSource(watched, bucket="lab", settle=0.1),
                               UnreachableSource()], sink,
                    bucket_threshold_event_count=1, bucket_prefix_depth=1)
    with run:
        # Then the outbox goes out pass after pass (1 s of sending), not one pass per
        # max_wait (60 s: the wait for a delivery while behind)
        wait_until(lambda: len(sink.sent) >= 20, timeout=15, what="the whole outbox")


def test_a_daemon_prunes_history_older_than_the_history_retention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edp.store import open_store

    monkeypatch.setattr(Daemon, "PRUNE_EVERY", 0.0)  # (every round, not every 10 min)
    # Given a store holding a batch fired and recorded two hours ago, not yet delivered
    two_hours_ago = time.time() - 7200
    sink = ListSink()
    run = DaemonRun(tmp_path, [Scripted("idle", [])], sink, history_retention=3600,
                    bucket_threshold_event_count=1)
    earlier = build_runtime(run.cfg, sinks=[sink], worker_id="fan-in")
    earlier.engine.process([Message(eventbridge("lab/run-1/a", two_hours_ago), "m1")],
                           now=two_hours_ago)
    earlier.close()
    # When a daemon with a history retention of an hour runs on it
    with run:
        # Then it delivers the event first, and then prunes the batch and its event
        wait_until(lambda: sink.sent, timeout=10, what="the delivery")
        store = open_store(run.cfg.database_url)
        try:
            wait_until(lambda: store.list_batches() == [], timeout=10, what="the pruning")
            assert store.stats()["pending_deliveries"] == 0
        finally:
            store.close()
    assert [e["detail"]["prefix"] for e in sink.sent] == ["lab/run-1/"]
