"""One daemon, several sources: each is received from at once, none waits for another's poll.

Two real folder sources (the local watcher) stand in for two queues: one stays empty,
so a receive on it waits the daemon's whole ``max_wait``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from edp.bootstrap import build_runtime
from edp.daemon import Daemon
from edp.sources.watch import FolderSource
from edp_testing import ListSink, settings
from integration.local.conftest import wait_until

pytestmark = pytest.mark.timeout(60)

MAX_WAIT = 60.0
"""Long enough that a source polled in turn behind the empty one would wait 30 s or more."""


def test_a_file_on_one_source_is_batched_while_another_source_waits(tmp_path: Path) -> None:
    # Given a daemon on two watched folders (the idle one first), one file per batch
    idle, busy = tmp_path / "idle", tmp_path / "busy"
    idle.mkdir()
    busy.mkdir()
    sources = [FolderSource(idle, bucket="idle", settle=0.1),
               FolderSource(busy, bucket="busy", settle=0.1)]
    sink = ListSink()
    cfg = settings(bucket_threshold_event_count=1, database_url=f"sqlite:///{tmp_path / 'd.db'}")
    started = threading.Event()
    daemons: list[Daemon] = []

    def work() -> None:  # SQLite connections belong to the thread that made them
        runtime = build_runtime(cfg, sinks=[sink], worker_id="fan-in")
        daemons.append(Daemon(runtime, sources, max_wait=MAX_WAIT))
        started.set()
        try:
            daemons[0].run()
        finally:
            runtime.close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    assert started.wait(10)
    time.sleep(1.0)  # both sources have reported themselves caught up and wait

    # When a file lands in the busy folder
    (busy / "lab" / "run-1").mkdir(parents=True)
    (busy / "lab" / "run-1" / "a.csv").write_text("x")

    # Then its batch is out long before the idle source's wait could end
    wait_until(lambda: sink.sent, timeout=10, what="the busy folder's batch")
    assert [(e["detail"]["bucket"], e["detail"]["prefix"]) for e in sink.sent] == [
        ("busy", "lab/run-1/")]

    # And the daemon stops promptly although a receive is still waiting
    stopping = time.monotonic()
    daemons[0].stop()
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert time.monotonic() - stopping < 10
