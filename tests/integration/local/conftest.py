"""Fixtures of the local-mode tests: a watched folder run by the real daemon in a thread."""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edp.bootstrap import build_runtime
from edp.config import Settings
from edp.daemon import Daemon
from edp.sources.watch import FolderSource
from edp.store import Store, open_store
from edp_testing import ListSink, wait_until

_NEEDED = ("watchfiles", "starlette", "uvicorn", "prometheus_client", "httpx2")
_MISSING = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
if _MISSING and os.environ.get("CI"):
    raise pytest.UsageError(f"CI needs {', '.join(_MISSING)}: pip install -e '.[web,dev]'")
pytest.importorskip("watchfiles", reason="the web extra (watchfiles) is not installed")


class WatchRun:
    """``edp watch`` in a thread: the real FolderSource, Daemon, engine and SQLite store."""

    def __init__(self, root: Path, url: str, settings: Settings) -> None:
        self.root, self.url, self.settings = root, url, settings
        self.sink = ListSink()
        self.daemon: Daemon | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            source = FolderSource(self.root, bucket="lab",
                                  settle=self.settings.watch_settle_seconds,
                                  ignore=self.settings.watch_ignore,
                                  rules=self.settings.rule_book())
            runtime = build_runtime(self.settings, database_url=self.url, sinks=[self.sink],
                                    worker_id="watch-test")
            self.daemon = Daemon(runtime, [source], max_wait=0.2)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._ready.set()
        try:
            self.daemon.run()
        finally:
            runtime.close()

    def start(self) -> WatchRun:
        self._thread.start()
        assert self._ready.wait(10), "the daemon did not start"
        assert self.error is None
        return self

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        self._thread.join(timeout=15)
        assert not self._thread.is_alive(), "the daemon did not stop"

    def triggers(self) -> list[tuple[str, int, str]]:
        """(prefix, object-count, trigger) of every event delivered so far."""
        return [(e["detail"]["prefix"], e["detail"]["object-count"], e["detail"]["trigger"])
                for e in self.sink.sent]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "lab"
    folder.mkdir()
    return folder


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'edp.db'}"


@pytest.fixture
def reader(db_url: str) -> Iterator[Callable[[], Store]]:
    """Opens a store of this test's database from the test thread (closed at the end)."""
    opened: list[Store] = []

    def open_one() -> Store:
        opened.append(open_store(db_url))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def watch(root: Path, db_url: str) -> Iterator[Callable[..., WatchRun]]:
    """Starts watch runs over ``root`` (count 3, quiet 30 s, settle 0.3 s); stops them all."""
    runs: list[WatchRun] = []

    def start(**values: Any) -> WatchRun:
        config = {"database_url": db_url, "bucket_threshold_event_count": 3,
                  "bucket_threshold_duration": 30.0, "watch_settle_seconds": 0.3, **values}
        runs.append(WatchRun(root, db_url, Settings(**config)).start())
        return runs[-1]

    yield start
    for run in runs:
        if run._thread.is_alive():
            run.stop()


@pytest.fixture
def wait() -> Callable[..., Any]:
    """:func:`wait_until`, for tests (conftest modules are not importable by name)."""
    return wait_until
