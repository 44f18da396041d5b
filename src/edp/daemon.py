"""The long-running worker loop shared by ``edp run`` (SQS), ``edp watch`` and ``edp serve``.

A :class:`Source` hands out messages; the daemon feeds them to the engine, then
acknowledges them (only after the step committed), relays the outbox, and fires
due batches on time: when every source is caught up, the clock is the wall clock
and the loop never waits past the next deadline (SPEC section 4).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from edp.bootstrap import Runtime
from edp.engine import Message, StepReport

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Received:
    """The result of one receive: messages, whether the source is caught up, and receipts."""

    messages: list[Message]
    caught_up: bool
    receipts: list[Any] = field(default_factory=list)
    report: StepReport | None = None
    """What the engine made of ``messages`` (set before :meth:`Source.ack`)."""


class Source(Protocol):
    """Where messages come from. A message not acknowledged must come again later."""

    name: str

    def receive(self, *, wait: float) -> Received:
        """Return what is available, waiting at most ``wait`` seconds for something."""
        ...

    def ack(self, received: Received) -> None:
        """The engine committed ``received``: forget it (delete it from the queue)."""
        ...

    def close(self) -> None:
        """Release resources."""
        ...


@dataclass(slots=True)
class DaemonStats:
    """Running totals, for logs and tests."""

    steps: int = 0
    messages: int = 0
    fired: int = 0
    errors: int = 0


class Daemon:
    """Runs sources into an engine until stopped."""

    def __init__(
        self,
        runtime: Runtime,
        sources: Sequence[Source],
        *,
        max_wait: float = 20.0,
        error_backoff: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.sources = list(sources)
        self.max_wait = max_wait
        self.error_backoff = error_backoff
        self.clock = clock
        self.stop_event = threading.Event()
        self.stats = DaemonStats()
        self._caught_up = {source.name: False for source in self.sources}
        self._last_prune = -float("inf")

    def stop(self) -> None:
        """Ask the loop to finish its current step and exit."""
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop gracefully (main thread only)."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: finishing the current step, then stopping", signum)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> DaemonStats:
        """Loop until :meth:`stop`; then flush the outbox and close the sources."""
        try:
            while not self.stop_event.is_set():
                try:
                    self.run_once()
                except Exception:  # a boundary: log, back off, keep the worker alive
                    self.stats.errors += 1
                    log.exception("step failed; unacknowledged input will come again")
                    self.stop_event.wait(self.error_backoff)
            self._relay()
        finally:
            for source in self.sources:
                source.close()
        return self.stats

    def run_once(self) -> None:
        """One round: receive from every source, process, acknowledge, fire, relay."""
        engine = self.runtime.engine
        for source in self.sources:
            received = source.receive(wait=self._wait())
            self._caught_up[source.name] = received.caught_up
            if received.messages:
                report = engine.process(
                    received.messages, now=self.clock(), caught_up=self._all_caught_up()
                )
                received.report = report
                self.stats.steps += 1
                self.stats.messages += len(received.messages)
                self.stats.fired += len(report.fired)
            source.ack(received)
            if self.stop_event.is_set():
                break
        if self._all_caught_up():
            self.stats.fired += len(engine.fire_due(now=self.clock()))
            self._prune()
        self._relay()

    def _all_caught_up(self) -> bool:
        return all(self._caught_up.values())

    def _wait(self) -> float:
        """How long a receive may block: never past the next deadline.

        A deadline already passed but held back by another worker's clock (SPEC
        section 4) must not make the loop spin: it then waits a short tick.
        """
        if not self._all_caught_up():
            return 0.0
        wait = self.max_wait / max(1, len(self.sources))
        deadline = self.runtime.engine.next_deadline()
        if deadline is not None:
            remaining = deadline - self.clock()
            wait = min(wait, remaining if remaining > 0 else self.HELD_BACK_TICK)
        return wait

    HELD_BACK_TICK = 0.5
    """Seconds between checks while a passed deadline waits for other workers."""

    PRUNE_EVERY = 600.0
    """Seconds between prunings of key memories older than ``sequencer_retention``."""

    def _prune(self) -> None:
        now = self.clock()
        if now - self._last_prune < self.PRUNE_EVERY:
            return
        self._last_prune = now
        forgotten = self.runtime.engine.prune()
        if forgotten:
            log.info("pruned %d key memories older than the retention", forgotten)

    def _relay(self) -> None:
        report = self.runtime.relay.deliver()
        if report.errors:
            log.warning("outbox: %d deliveries failed, will retry", report.failed)
