"""The long-running worker loop shared by ``edp run`` (SQS), ``edp watch`` and ``edp serve``.

A :class:`Source` hands out messages; the daemon feeds them to the engine, then
acknowledges them (only after the step committed), relays the outbox, and fires
due batches on time: when every source is caught up, the clock is the wall clock
and the loop never waits past the next deadline (SPEC section 4).

With several sources (queues), each is received from in a thread of its own
(:class:`_Feed`), so a long poll on one never delays another's messages; the engine,
its store and the acknowledgements stay on the daemon's thread, and a source is
received from again only after its last delivery was acknowledged (or abandoned).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from edp.bootstrap import Runtime
from edp.engine import BACKLOG_LAG, REDELIVERY_MARGIN, Message, StepReport
from edp.errors import EdpError, one_line
from edp.store import is_outage

log = logging.getLogger(__name__)

RECEIVE_MARGIN = 10.0
"""Seconds a receive may take beyond its wait when the network stalls (a source's
timeouts: connecting, and the answer of a long poll); the stop waits that long for a
feed's receive in flight."""


@dataclass(slots=True)
class Received:
    """The result of one receive: messages, whether the source is caught up, and receipts."""

    messages: list[Message]
    caught_up: bool
    receipts: list[Any] = field(default_factory=list)
    report: StepReport | None = None
    """What the engine made of ``messages`` (set before :meth:`Source.ack`)."""
    seen: float | None = None
    """When the receive returned (``time.monotonic()``), for a delivery a feed made."""
    message_receipts: list[Any] | None = None
    """The receipt of each message (aligned with ``messages``), from a source that can
    acknowledge part of a delivery (see :meth:`without`); ``None`` if it cannot."""

    def without(self, indices: Collection[int]) -> Received:
        """This delivery less the messages at ``indices``: acknowledging it leaves those
        to come again. Only for a source that gives :attr:`message_receipts`."""
        if self.message_receipts is None:
            raise ValueError("this source cannot acknowledge part of a delivery")
        dropped = {id(self.message_receipts[i]) for i in indices}
        kept = [i for i in range(len(self.messages)) if i not in indices]
        return Received(
            [self.messages[i] for i in kept],
            self.caught_up,
            receipts=[r for r in self.receipts if id(r) not in dropped],
            report=self.report,
            message_receipts=[self.message_receipts[i] for i in kept],
            seen=self.seen,
        )


class ReceiveFailed(EdpError):
    """A source could not receive (its queue is unreachable, the call timed out).

    ``maybe_taken``: the request may have reached the queue, which then hid what it
    handed out for the source's ``redelivery_delay`` (an answer lost on the way back);
    False when it surely did not (the connection was refused, the queue answered with
    an error). The daemon logs it in one line, without a traceback."""

    def __init__(self, message: str, *, maybe_taken: bool = True) -> None:
        super().__init__(message)
        self.maybe_taken = maybe_taken


class Source(Protocol):
    """Where messages come from. A message not acknowledged must come again later."""

    name: str

    def receive(self, *, wait: float) -> Received:
        """Return what is available, waiting at most ``wait`` seconds for something
        (raises :class:`ReceiveFailed` when the source cannot be reached)."""
        ...

    def ack(self, received: Received) -> None:
        """The engine committed ``received``: forget it (delete it from the queue)."""
        ...

    def close(self) -> None:
        """Release resources."""
        ...


CLAIM_CHECK = 10.0
"""Seconds between two checks that a daemon still holds its worker id."""


@dataclass(slots=True)
class DaemonStats:
    """Running totals, for logs and tests (feed threads count errors too: see
    :meth:`error`)."""

    steps: int = 0
    messages: int = 0
    fired: int = 0
    errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def error(self) -> None:
        """Count one error (from any thread)."""
        with self._lock:
            self.errors += 1


class Daemon:
    """Runs sources into an engine until stopped."""

    def __init__(
        self,
        runtime: Runtime,
        sources: Sequence[Source],
        *,
        max_wait: float = 20.0,
        error_backoff: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.runtime = runtime
        self.sources = list(sources)
        self.max_wait = max_wait
        self.error_backoff = error_backoff
        # The wall clock the store's workers share (the database server's on
        # PostgreSQL: see Store.wall_clock).
        self.clock = clock or runtime.store.wall_clock
        self.stop_event = threading.Event()
        self.stats = DaemonStats()
        self._caught_up = {source.name: False for source in self.sources}
        self._last_prune = -float("inf")
        self.inbox: queue.Queue[tuple[_Feed, Received]] = queue.Queue()
        self._feeds: list[_Feed] = []
        self._behind_until = -float("inf")  # (time.monotonic(); see _after_a_crash)
        # Received but neither processed nor acknowledged when the loop stopped (several
        # sources: a feed's delivery after the last round, or a long poll still open).
        self.abandoned = 0
        self._abandoned_lock = threading.Lock()
        self._unacknowledged: set[str] = set()  # sources whose last delivery failed
        self._store_out = False  # the last round failed for the store (see _last_relay)
        self._receive_failures: dict[str, int] = {}  # failed receives in a row, per source
        self._next_retry: float | None = None  # (the relay's clock: the store's, self.clock)
        self._relay_more = False  # the last relay pass stopped at its budget, pages left

    @property
    def stopped_cleanly(self) -> bool:
        """Whether the loop stopped with every received message processed and no hold
        running: only then may the worker be recorded as finished (see
        :meth:`_after_a_crash`: a worker that left messages behind, or that held for
        some on their way back, must hold for them again when it starts)."""
        return (self.abandoned == 0 and not self._unacknowledged and not self._store_out
                and self.runtime.engine.held(self.clock()) is None
                and not any(f.thread.is_alive() for f in self._feeds))

    def abandon(self, received: Received) -> None:
        """Count messages that were received and will come again (not acknowledged)."""
        with self._abandoned_lock:
            self.abandoned += len(received.messages)

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
        # Told to stop during an outage, the step (and the stop's own flush) stops
        # retrying the store: what it could not store comes again.
        self.runtime.store.stop_retrying_on(self.stop_event)
        try:
            return self._run()
        finally:
            self.runtime.store.stop_retrying_on(None)

    def _run(self) -> DaemonStats:
        fanned = len(self.sources) > 1
        # (first: a twin under this id would make the crash check below read its state)
        self._claim()
        self._after_a_crash()
        self.runtime.engine.register(now=self.clock())  # (before its first receive)
        if fanned:
            self._feeds = [_Feed(self, source) for source in self.sources]
            for feed in self._feeds:
                feed.thread.start()
        ended = False  # (the loop ended by a stop, not by an exception)
        claimed = time.monotonic()
        try:
            while not self.stop_event.is_set():
                if time.monotonic() - claimed >= CLAIM_CHECK:
                    claimed = time.monotonic()
                    self._keep_worker_id()
                try:
                    if fanned:
                        self.run_fanned_once()
                    else:
                        self.run_once()
                    self._store_out = False
                except Exception as exc:  # a boundary: log, back off, keep the worker alive
                    self._store_out = is_outage(exc)
                    self.stats.error()
                    if self._store_out:  # (no traceback: the reason says it all)
                        log.error("step failed, the store is unreachable (%s): unacknowledged "
                                  "input will come again", one_line(str(exc)))
                    else:
                        log.exception("step failed; unacknowledged input will come again")
                    self.stop_event.wait(self.error_backoff)
            self._last_relay()
            ended = True
        finally:
            self.stop_event.set()
            for source in self.sources:
                source.close()  # also ends a receive a feed is waiting in, where it can
            # A feed still in a long poll (SQS) ends with it (closing a folder or the
            # ingest source ends their receive at once): wait for that, as the one-source
            # loop finishes its receive. What it then received is not acknowledged and
            # comes again (counted as abandoned: the stop is then not clean).
            give_up = time.monotonic() + self.max_wait + RECEIVE_MARGIN + 1.0
            for feed in self._feeds:
                feed.thread.join(timeout=max(0.0, give_up - time.monotonic()))
            while True:  # deliveries no round took: they come again
                try:
                    self.abandon(self.inbox.get_nowait()[1])
                except queue.Empty:
                    break
            if not self.stopped_cleanly:
                log.warning("stopped with received messages not acknowledged (%d left after "
                            "the stop; sources whose last step failed: %s): they come again "
                            "after the queue's visibility timeout", self.abandoned,
                            ", ".join(sorted(self._unacknowledged)) or "none")
            elif ended:  # (not when an exception, a KeyboardInterrupt, ends the loop)
                self._finish()
        return self.stats

    def _claim(self) -> None:
        self.runtime.store.claim_worker_id(
            self.runtime.engine.worker_id, silent_for=self.runtime.settings.worker_timeout)

    def _keep_worker_id(self) -> None:
        """Check that this process still holds its worker id (its session may have been
        lost: a server restart, a partition), taking it back if it was lost; another
        process having taken it meanwhile ends this one (an EdpError), rather than
        two workers publishing one clock. An unreachable store is checked later."""
        try:
            self._claim()
        except EdpError:
            raise
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.debug("worker id not checked: the store is unreachable (%s)", exc)

    def _finish(self) -> None:
        """Stopping for good, cleanly: the other workers need not wait for this one's
        clock (not when received messages were left behind: then this worker must, at
        its next start, wait for them as after a crash, or a batch would be split)."""
        engine = self.runtime.engine
        try:
            engine.store.finish_worker(engine.worker_id)
        except Exception as exc:
            if not is_outage(exc):
                raise
            # (its next start then holds as after a crash: nothing is lost)
            log.warning("the store is unreachable, worker %s is not marked finished: %s",
                        engine.worker_id, one_line(str(exc)))

    def run_once(self) -> None:
        """One round: receive from every source, process, acknowledge, fire, relay.
        A source that cannot be reached counts as behind (what it holds is unknown);
        the round goes on (the outbox is still relayed), then backs off."""
        failed = False
        seen: float | None = None  # when the receives found the sources, at the earliest
        for source in self.sources:
            try:
                received = source.receive(wait=self._wait())
            except ReceiveFailed as exc:
                self.receive_failed(source, exc)
                failed = True
                continue
            at = self.clock()
            seen = at if seen is None else min(seen, at)
            self.receive_worked(source)
            self._work(source, received)
            if self.stop_event.is_set():
                break
        self._end_round(seen)
        if failed:
            self.stop_event.wait(self.error_backoff)

    def receive_failed(self, source: Source, exc: ReceiveFailed) -> None:
        """A receive failed: hold if it may have taken messages; count as behind; log
        in one line (the 1st, 2nd, 4th, 8th... failure in a row). Any thread."""
        if exc.maybe_taken:
            self.hold_for(source)
        self._caught_up[source.name] = False
        self.stats.error()
        failures = self._receive_failures.get(source.name, 0) + 1
        self._receive_failures[source.name] = failures
        if failures & (failures - 1) == 0:
            log.warning("%s (%d failed receive(s) in a row; trying again, firing by time "
                        "waits until it works)", exc, failures)

    def receive_worked(self, source: Source) -> None:
        """A receive worked: say so if it had failed before."""
        failures = self._receive_failures.pop(source.name, 0)
        if failures:
            log.info("receiving from %s again, after %d failed receive(s)", source.name,
                     failures)

    def run_fanned_once(self) -> None:
        """One round with several sources: work on what they delivered (waiting for the
        first delivery, never past the next deadline), at most one delivery per source,
        then fire and relay (so that busy sources never hold the relay back)."""
        # A source with a backlog delivers at once (its feed does not wait), so waiting
        # the whole max_wait then costs nothing.
        delivery = self._next_delivery(self._wait(backlog=self.max_wait))
        seen: float | None = None  # (see _end_round; a feed in a long poll sees all along)
        for _ in self._feeds:
            if delivery is None:
                break
            feed, received = delivery
            if received.seen is not None:
                at = self.clock() - (time.monotonic() - received.seen)
                seen = at if seen is None else min(seen, at)
            try:
                self._work(feed.source, received)
            finally:
                feed.delivered(received.caught_up)  # acknowledged, or abandoned
            if self.stop_event.is_set():
                delivery = None
                break
            delivery = self._next_delivery(0.0)
        if delivery is not None:  # a feed's next delivery already: first in the next round
            self.inbox.put(delivery)
        self._end_round(seen)

    def _work(self, source: Source, received: Received) -> None:
        """Run what a source delivered through the engine (one step), then acknowledge;
        a source whose delivery could not be (a failed step, a failed acknowledgement)
        is remembered until one succeeds: a stop meanwhile is not clean."""
        try:
            self._work_step(source, received)
        except BaseException as exc:
            if received.messages:
                self._unacknowledged.add(source.name)
                # The store is out: all of them come again, the store willing. (Not
                # for a step failing on its own input: it comes again and fails again,
                # until the redrive policy takes it; holding would stop firing that long.)
                if isinstance(exc, Exception) and is_outage(exc):
                    self.hold_for(source)
            raise
        self._unacknowledged.discard(source.name)

    def _work_step(self, source: Source, received: Received) -> None:
        self._caught_up[source.name] = received.caught_up
        if received.messages:
            try:
                received.report = self._step(source, received.messages)
            except Exception as exc:
                if (len(received.messages) < 2 or received.message_receipts is None
                        or is_outage(exc)):
                    raise  # all of it comes again
                # A step that fails for a reason a retry does not fix must not hold back
                # the messages received with the one that causes it (they would come
                # back together, fail together, and reach the queue's DLQ together).
                log.exception("a step of %d messages from %s failed; trying them one by one",
                              len(received.messages), source.name)
                # (No hold for those: they fail on their own, again and again until
                # the redrive policy takes them; holding would stop firing that long.)
                failed = self._one_by_one(source, received.messages)
                received.caught_up = self._caught_up[source.name]  # (a step may be behind)
                source.ack(received.without(failed))
                return
            received.caught_up = self._caught_up[source.name]
        source.ack(received)

    def _step(self, source: Source, messages: list[Message]) -> StepReport:
        report = self.runtime.engine.process(
            messages, now=self.clock(), caught_up=self._all_caught_up(),
            backlog_lag=BACKLOG_LAG,
        )
        if report.behind:  # old events: a backlog, whatever the source said
            self._caught_up[source.name] = False
        for letter in report.rejected:  # (kept in the store: `edp dead-letters`)
            log.warning("dead letter from %s, %s: %s", letter.source, letter.location,
                        letter.reason)
        self.stats.steps += 1
        self.stats.messages += len(messages)
        self.stats.fired += len(report.fired)
        return report

    def _one_by_one(self, source: Source, messages: list[Message]) -> list[int]:
        """One step per message; returns the indices of those whose step failed (they
        are not acknowledged: they come again, until the queue's redrive policy moves
        them to its DLQ). An outage raises: nothing more is acknowledged."""
        failed = []
        for index, message in enumerate(messages):
            try:
                self._step(source, [message])
            except Exception as exc:
                if is_outage(exc):
                    raise
                self.stats.error()
                log.exception("%s (%s) failed a step of its own; it will come again",
                              message.location, message.source)
                failed.append(index)
        return failed

    def _end_round(self, seen: float | None = None) -> None:
        """Fire what is due once every source is caught up; relay the outbox. (Behind
        and holding, publish the hold: a round whose receives failed has no step.)

        ``seen``: when this round's receives found the sources caught up. Nothing fires
        past it: a step that took long (a lock wait, a stalled database) leaves the
        queue unseen meanwhile, and files that arrived then may belong to a batch due
        in between; the next receive, at once since that deadline passed, brings them
        to it first."""
        engine = self.runtime.engine
        if self._all_caught_up():
            self.stats.fired += len(engine.fire_due(now=self.clock(), until=seen))
        elif engine.held(now := self.clock()) is not None:
            engine.beat(now=now)
        self._prune()  # (also while behind: a source may never go quiet)
        self._relay()

    def _next_delivery(self, wait: float) -> tuple[_Feed, Received] | None:
        """The next delivery of any feed, waiting up to ``wait`` (in short slices, so
        that :meth:`stop` is noticed)."""
        end = time.monotonic() + wait
        while True:
            try:
                return self.inbox.get(timeout=max(0.0, min(end - time.monotonic(), 0.5)))
            except queue.Empty:
                if time.monotonic() >= end or self.stop_event.is_set():
                    return None

    def _all_caught_up(self) -> bool:
        return all(self._caught_up.values()) and time.monotonic() >= self._behind_until

    def _after_a_crash(self) -> None:
        """A worker that did not stop cleanly last time (killed in the middle of a step)
        left what it had received invisible on its queue for a while (SQS: the
        visibility timeout). It stays behind that long: drained meanwhile, the queue
        would look caught up, the clock would move to the wall clock, and those files
        would come back late, applied at the wall clock, away from their batches."""
        engine = self.runtime.engine
        if engine.store.worker_finished(engine.worker_id) is not False:
            return
        grace = max((_redelivery_delay(s) for s in self.sources), default=0.0)
        if grace > 0:
            grace += self.REDELIVERY_MARGIN
            self._behind_until = time.monotonic() + grace
            # Its clock moved past nothing those messages held: hold firing there
            # (see Engine.hold), here and at the other workers; lower if its last run
            # held lower (killed while it held: what it held for may still be away).
            held = engine.store.worker_hold(engine.worker_id)
            engine.hold(now=self.clock(), seconds=grace,
                        at=engine.clock if held is None else min(engine.clock, held))
            log.warning("worker %s did not stop cleanly last time: it counts as behind, and "
                        "holds firing by time at its last clock, for %gs, until what it had "
                        "received can come again", engine.worker_id, grace)

    def hold_for(self, source: Source) -> None:
        """Messages received from ``source`` were not committed (a failed step or
        receive): they come again after its redelivery delay. Until then (and the
        receive that brings them) firing by time holds at the clock (Engine.hold),
        so that a batch they belong to is still open when they come. Any thread."""
        delay = _redelivery_delay(source)
        if delay > 0:
            engine, now = self.runtime.engine, self.clock()
            if engine.held(now) is None:  # (said once a hold, not at each extension)
                log.warning("holding firing by time for %gs: messages received from %s may "
                            "come again only then", delay + self.REDELIVERY_MARGIN, source.name)
            engine.hold(now=now, seconds=delay + self.REDELIVERY_MARGIN)

    def _wait(self, backlog: float = 0.0) -> float:
        """How long to wait (for a receive, or with several sources for a delivery):
        ``backlog`` while a source is not caught up, else never past the next deadline.

        A deadline already passed but held back by another worker's clock (SPEC
        section 4) must not make the loop spin: it then waits a short tick.
        """
        if self._relay_more:  # (the outbox is not through: back to it after a look)
            return 0.0  # (also while behind: a wait for a delivery may be max_wait)
        if not self._all_caught_up():
            return backlog
        wait = self.max_wait
        engine = self.runtime.engine
        if engine.has_peers or engine.store.shared:
            # The others fire a deadline only once this worker's clock has passed it,
            # and an idle worker publishes its clock (the wall clock) only between
            # receives: a long poll would hold their quiet batches back for its length.
            # (On a shared store also before a peer is seen: one may be starting.)
            wait = min(wait, self.PEER_BEAT)
        deadline = engine.next_deadline()
        if deadline is not None:
            remaining = deadline - self.clock()
            wait = min(wait, remaining if remaining > 0 else self.HELD_BACK_TICK)
        if self._next_retry is not None:  # a failed delivery is tried again on time
            wait = min(wait, max(self._next_retry - self.clock(), self.HELD_BACK_TICK))
        return wait

    HELD_BACK_TICK = 0.5
    """Seconds between checks while a passed deadline waits for other workers."""

    REDELIVERY_MARGIN = REDELIVERY_MARGIN
    """Seconds added to a source's redelivery delay after a crash or a failed step or
    receive: time for the receive that gets the files back, and its step (see
    :meth:`_after_a_crash`, :meth:`hold_for`)."""

    PEER_BEAT = 2.0
    """On a shared store (or with other live workers on it), the longest a caught-up
    worker waits (in a receive) before it publishes its clock again."""

    PRUNE_EVERY = 600.0
    """Seconds between prunings of key memories older than ``sequencer_retention`` (and
    of history older than ``history_retention``)."""

    HISTORY_BUDGET = 2.0
    """Seconds one pruning of history may take (its pages are transactions of their
    own, between which steps run on other workers); what is left goes a minute later."""

    PRUNE_AGAIN = 60.0
    """Seconds until the next pruning when history was left for lack of time."""

    def _prune(self) -> None:
        now = self.clock()
        if now - self._last_prune < self.PRUNE_EVERY:
            return
        self._last_prune = now
        # A watched folder reports every file again when it starts: its keys must stay
        # known, or files counted long ago would count again after a restart.
        keep = [b for s in self.sources for b in getattr(s, "remembered_buckets", ())]
        forgotten = self.runtime.engine.prune(keep_buckets=keep)
        if forgotten:
            log.info("pruned %d key memories older than the retention", forgotten)
        if not self.runtime.settings.history_retention:
            return
        history = self.runtime.engine.prune_history(now=self.runtime.store.wall_clock(),
                                                    budget=self.HISTORY_BUDGET)
        if history.events or history.batches or history.dead_letters:
            log.info("pruned history older than history_retention: %d events, %d batches,"
                     " %d dead letters%s", history.events, history.batches,
                     history.dead_letters, " (more left)" if history.more else "")
        if history.more:
            self._last_prune = now - self.PRUNE_EVERY + self.PRUNE_AGAIN

    def _last_relay(self) -> None:
        """Deliver the outbox once more before stopping, unless the store is out (the
        last round failed for it): its events wait in the outbox for the next start,
        which holds as after a crash (the stop is not clean: see stopped_cleanly)."""
        if self._store_out:
            log.warning("the store is unreachable: the outbox is delivered at the next start")
            return
        try:
            self._relay(at_stop=True)
            if self._relay_more:
                log.info("stopping with events still to deliver: they go at the next start")
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._store_out = True
            log.warning("the store became unreachable at the stop (%s): the outbox is "
                        "delivered at the next start", one_line(str(exc)))

    # A relay pass gives the loop back after this long (between pages), so a slow sink
    # working through a long outbox neither keeps input waiting nor a stop; the one at
    # the stop delivers for this long at most (the rest goes at the next start).
    RELAY_BUDGET = 5.0
    STOP_RELAY_BUDGET = 5.0

    def _relay(self, *, at_stop: bool = False) -> None:
        report = self.runtime.relay.deliver(
            budget=self.STOP_RELAY_BUDGET if at_stop else self.RELAY_BUDGET,
            stop=None if at_stop else self.stop_event)
        self._relay_more = report.more
        # A retry still ahead stays the wait's bound until it passed: a later deliver()
        # that sent nothing (the event still waits, and those behind it) reports none.
        ahead = [t for t in (report.next_retry, self._next_retry)
                 if t is not None and t > self.clock()]
        self._next_retry = min(ahead) if ahead else report.next_retry
        if report.failed:  # (the relay logged each failure, with its reason and retry)
            log.debug("outbox: %d deliveries failed, will retry", report.failed)


class _Feed:
    """Receives from one source in a thread of its own and hands each delivery to the
    daemon's inbox; receives again only after the daemon is done with the last one."""

    def __init__(self, daemon: Daemon, source: Source) -> None:
        self.daemon = daemon
        self.source = source
        self._done = threading.Event()
        self._caught_up = False
        self.thread = threading.Thread(target=self._run, name=f"edp-receive:{source.name}",
                                       daemon=True)

    def delivered(self, caught_up: bool) -> None:
        """The daemon acknowledged (or abandoned) the last delivery."""
        self._caught_up = caught_up
        self._done.set()

    def _run(self) -> None:
        daemon, stop = self.daemon, self.daemon.stop_event
        while not stop.is_set():
            try:
                # Until the source says it is caught up it is polled without waiting
                # (as the one-source loop does): the daemon's clock stays the event time
                # until every source is, so a long poll here would hold back due batches.
                received = self.source.receive(wait=daemon.max_wait if self._caught_up else 0.0)
            except ReceiveFailed as exc:
                daemon.receive_failed(self.source, exc)
                self._caught_up = False
                stop.wait(daemon.error_backoff)
                continue
            except Exception:  # a boundary: log, back off, keep receiving
                if stop.is_set():
                    return
                daemon.stats.error()
                log.exception("receive from %s failed; retrying", self.source.name)
                stop.wait(daemon.error_backoff)
                continue
            received.seen = time.monotonic()
            daemon.receive_worked(self.source)
            if stop.is_set():
                daemon.abandon(received)  # not acknowledged: it comes again
                return
            self._done.clear()
            daemon.inbox.put((self, received))
            while not self._done.wait(0.5):
                if stop.is_set():
                    return


def _redelivery_delay(source: Source) -> float:
    """How long messages received from ``source`` and not acknowledged stay away (0: they
    come again at once, or never leave: a folder, the ingest endpoint)."""
    return float(getattr(source, "redelivery_delay", 0.0))
