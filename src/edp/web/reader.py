"""Read access to the store for the web app, from one thread of its own.

Store objects are not shared between threads (a SQLite connection belongs to the
thread that opened it), and the engine's store lives in the daemon's thread. The
dashboard therefore reads through a :class:`StoreReader`: one worker thread that
opens its own store and runs every query, so request threads only wait on futures.
It also samples the counters every ``interval`` seconds into a
:class:`~edp.web.figures.Series` for the charts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from edp.config import Settings
from edp.errors import ConfigError, EdpError
from edp.store import Store, open_store
from edp.web.figures import Series

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreReader:
    """Runs read queries on a store opened in a dedicated thread."""

    def __init__(
        self,
        url: str,
        settings: Settings,
        *,
        interval: float = 5.0,
        extra_errors: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if url.endswith(":memory:"):
            raise ConfigError(
                "edp serve needs a store that two threads can open: give database_url a "
                "file (sqlite:///path/edp.db) or a PostgreSQL URL, not :memory:"
            )
        self.url = url
        self.settings = settings
        self.interval = interval
        self.extra_errors = extra_errors
        self.clock = clock
        self.series = Series()
        self._store: Store | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edp-reader")
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> None:
        """Open the store (in the reader thread) and start sampling."""
        self.submit(lambda store: None).result(timeout=60)
        self._sampler = threading.Thread(target=self._sample_loop, name="edp-sampler",
                                         daemon=True)
        self._sampler.start()

    def submit(self, query: Callable[[Store], T]) -> Future[T]:
        """Run ``query(store)`` in the reader thread."""
        return self._pool.submit(self._run, query)

    def sample(self) -> None:
        """Record one sample of the counters now (also done every ``interval``)."""
        self.submit(self._take_sample).result(timeout=60)

    def close(self) -> None:
        """Stop sampling and close the store."""
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)
        self._pool.submit(self._close_store).result(timeout=30)
        self._pool.shutdown(wait=True)

    def _run(self, query: Callable[[Store], T]) -> T:
        if self._store is None:
            self._store = open_store(self.url)
        return query(self._store)

    def _take_sample(self, store: Store) -> None:
        self.series.add(self.clock(), store.counters(), store.stats(), self.extra_errors())

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.submit(self._take_sample).result(timeout=60)
            except (EdpError, TimeoutError, RuntimeError) as exc:
                log.warning("sampling the store's counters failed: %s", exc)
            except Exception:  # a boundary: the charts miss one sample, the server lives on
                log.exception("sampling the store's counters failed")
            self._stop.wait(self.interval)

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


__all__ = ["StoreReader"]
