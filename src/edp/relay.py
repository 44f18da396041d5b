"""The outbox relay: delivers pending outbox events to every sink, at least once.

Each (event, sink) pair is a delivery row. The relay sends pending rows in outbox
order, marks the delivered ones, and backs off (exponentially, with jitter) on the
ones that failed; a permanent failure parks the row for an operator to look at
(``edp status`` shows it; ``edp batches reemit`` sends it again).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edp.errors import SinkError
from edp.redact import redact_text
from edp.sinks.base import Failure, Sink
from edp.store.base import Store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RelayReport:
    """What one :meth:`Relay.deliver` call did."""

    delivered: int = 0
    failed: int = 0
    parked: int = 0
    errors: list[str] = field(default_factory=list)
    next_retry: float | None = None
    """When the earliest delivery that failed in this call is tried again (a worker
    waits no longer than that)."""
    more: bool = False
    """The call stopped at its budget or a stop with pages still to send."""


class Relay:
    """Moves outbox events to sinks."""

    def __init__(
        self,
        store: Store,
        sinks: Sequence[Sink],
        *,
        page: int = 500,
        base_backoff: float = 1.0,
        max_backoff: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.sinks = list(sinks)
        self.page = page
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.clock = clock
        self._attempts: dict[tuple[str, str], int] = {}
        # Where the last pass stopped at its budget: the next begins there, or a sink
        # whose single page outlasts the budget would take every pass's turn first and
        # the sinks after it would wait for its whole outbox.
        self._turn = 0

    @property
    def sink_names(self) -> list[str]:
        """Names of the sinks, as the outbox knows them."""
        return [sink.name for sink in self.sinks]

    def deliver(self, *, budget: float | None = None,
                stop: threading.Event | None = None) -> RelayReport:
        """Deliver every pending event that is due, a page per sink in turn, until none
        is left, or until ``budget`` seconds passed or ``stop`` is set (checked between
        pages: a worker's loop must come back to its input and to a stop while a slow
        sink works through a long backlog; ``report.more`` then says that pages remain)."""
        report = RelayReport()
        started = time.monotonic()
        turn = self._turn % len(self.sinks) if self.sinks else 0
        active = self.sinks[turn:] + self.sinks[:turn]
        pages = 0  # (a budget lets one page go at least: each pass makes progress)
        while active:
            for sink in list(active):
                if (pages and budget is not None and time.monotonic() - started >= budget) or (
                        stop is not None and stop.is_set()):
                    report.more = True
                    self._turn = self.sinks.index(sink)  # (its turn comes first next)
                    return report
                pages += 1
                if not self._page(sink, report):
                    active.remove(sink)
        return report

    def _page(self, sink: Sink, report: RelayReport) -> bool:
        """Send one page of ``sink``'s due deliveries; False when there was none or it
        failed (the rest waits for the backoff, in order)."""
        now = self.clock()
        # A sink's optional max_page (see Sink): pages sent within the lease.
        limit = min(self.page, getattr(sink, "max_page", self.page))
        entries = self.store.pending(sink.name, limit=limit, now=now)
        if not entries:
            return False
        try:
            failures = list(sink.send(entries))
        except SinkError as exc:
            failures = [Failure(entry.event_id, str(exc)) for entry in entries]
        except Exception as exc:  # a boundary: an odd answer or a sink's bug
            # must not stop the relay, nor leave the page unmarked (sent again
            # at once, every round): the page is retried after a backoff.
            log.exception("sink %s raised while sending %d events", sink.name,
                          len(entries))
            reason = f"{type(exc).__name__}: {exc}"
            failures = [Failure(entry.event_id, reason) for entry in entries]
        failed_ids = {f.event_id for f in failures}
        ok = [e.event_id for e in entries if e.event_id not in failed_ids]
        if ok:
            self.store.mark_delivered(sink.name, ok, now=now)
            report.delivered += len(ok)
            for event_id in ok:
                self._attempts.pop((sink.name, event_id), None)
        # One backoff for the page's failures: an event that waits keeps the
        # events behind it waiting too (the store returns none past it), and
        # they become due together, in order.
        retry_at = self._retry_at(sink.name, failures, now)
        retryable = [f for f in failures if not f.permanent]
        if retryable:  # one line for the page, not one per event
            report.next_retry = (retry_at if report.next_retry is None
                                 else min(report.next_retry, retry_at))
            first = retryable[0]
            log.warning(
                "sink %s failed %d event(s) (first %s, attempt %d), retry in %.1fs: %s",
                sink.name, len(retryable), first.event_id,
                self._attempts.get((sink.name, first.event_id), 0) + 1,
                retry_at - now, redact_text(first.error),
            )
        for failure in failures:
            self._fail(sink.name, failure.event_id, failure.error, failure.permanent,
                       now, retry_at)
            report.errors.append(f"{sink.name}: {failure.event_id}: {failure.error}")
            if failure.permanent:
                report.parked += 1
            else:
                report.failed += 1
        return not failures  # (keep order per sink: try the rest after the backoff)

    def _retry_at(self, sink: str, failures: Sequence[Failure], now: float) -> float:
        """When the page's retryable failures are tried again: backoff by the attempts
        of its first one (the event the others wait behind), with jitter."""
        first = next((f for f in failures if not f.permanent), None)
        attempts = 1 if first is None else self._attempts.get((sink, first.event_id), 0) + 1
        delay: float = min(self.max_backoff, self.base_backoff * 2.0 ** (attempts - 1))
        return now + delay * random.uniform(0.5, 1.0)  # jitter: workers not in lockstep

    def _fail(self, sink: str, event_id: str, error: str, permanent: bool, now: float,
              retry_at: float) -> None:
        if permanent:
            # (settled for good: nothing to count any more, and a worker that runs for
            # months must not keep an entry per event its sink refused)
            self._attempts.pop((sink, event_id), None)
            log.error("sink %s refused event %s for good: %s", sink, event_id,
                      redact_text(error))
            self.store.mark_failed(sink, event_id, error=error, retry_at=None, now=now)
            return
        self._attempts[(sink, event_id)] = self._attempts.get((sink, event_id), 0) + 1
        self.store.mark_failed(sink, event_id, error=error, retry_at=retry_at, now=now)
