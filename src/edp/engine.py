"""The engine: decodes input, runs the core over a working set, commits each step.

Every entry point (``edp replay``, the daemon, the Lambda handlers, the local
watcher, the ingest endpoint) feeds messages to one :class:`Engine`; none has a
batching logic of its own. A *step* is one call of :meth:`Engine.process` (one
chunk of replay lines, one SQS receive): its changes, the batches it closed and
their outbox events, its dead letters and counters commit in one transaction, so
a crash loses nothing that was acknowledged and doubles nothing.

The clock (SPEC section 4) is the engine's: while a source has a backlog it is the
newest event time processed so far; once the source is caught up it is the wall
clock, passed in by the caller as ``now``. A live worker's clock never runs more than
``clock_max_ahead`` seconds ahead of ``now``: an event dated later (a wrong clock at the
producer, a file's future mtime) counts, but moves the clock only that far.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, cast

import orjson

from edp.config import Settings
from edp.core.batching import Batcher, Changes, Outcome
from edp.core.envelopes import Origin, batch_event, format_time
from edp.core.events import BatchReady, ObjectEvent
from edp.core.rules import Skip
from edp.decode import decode_message
from edp.errors import (
    DecodeError,
    EdpError,
    TransactionConflict,
    is_unicode,
    join_reasons,
    one_line,
    shorten,
)
from edp.store.base import (
    ClosedBatch,
    DeadLetter,
    HistoryPruned,
    LoadRequest,
    QueueTransaction,
    SavedBatch,
    StepWrite,
    Store,
    Transaction,
    WorkingState,
    lowest,
)

log = logging.getLogger(__name__)

_COUNTED = Outcome.COUNTED

PAGE = 5000
"""Batches fired per transaction when many fall due at once."""

REDELIVERY_MARGIN = 5.0
"""Seconds added to a queue's visibility timeout in a hold (see :meth:`Engine.hold`): a
message comes back a little after its timeout, and is received a little after that."""

BACKLOG_LAG = 30.0
"""Seconds: a live worker's step holding an event older than this (by the wall clock)
is part of a backlog, whatever its source says (see :meth:`Engine.process`)."""


class Message(NamedTuple):
    """One raw input message and where it came from (for errors and dead letters)."""

    body: bytes | str | dict[str, Any]
    location: str
    source: str = "input"


@dataclass(slots=True)
class StepReport:
    """What one step did."""

    messages: int = 0
    events: int = 0
    fired: list[BatchReady] = field(default_factory=list)
    rejected: list[DeadLetter] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    behind: bool = False
    """The source said it was caught up, but the step's events are a backlog (see
    ``backlog_lag`` of :meth:`Engine.process`): the clock stayed at their times."""


class StepObserver(Protocol):
    """Work that rides on the engine's steps, in the same transaction.

    An observer sees every decoded event of a step (also those the batcher skips,
    such as ``.quilt/`` keys) and may write outbox events and durable timers through
    the transaction; :meth:`tick` fires its timers. ``clock`` is the engine's clock
    (SPEC section 4), ``now`` the wall clock. Slow I/O (network calls) belongs in
    :meth:`after_commit`, which runs once the step's transaction, and the locks it
    held, are gone.
    """

    def observe(
        self, tx: Transaction, events: Sequence[ObjectEvent], *, clock: float, now: float,
        sinks: Sequence[str],
    ) -> None:
        """Look at a step's events."""
        ...

    def tick(self, tx: Transaction, *, clock: float, now: float, sinks: Sequence[str]) -> int:
        """Fire what is due at ``clock``; return how many events were emitted."""
        ...

    def after_commit(self, store: Store, *, now: float, sinks: Sequence[str]) -> int:
        """After a step committed: do I/O outside any transaction, record its outcome in a
        transaction of its own; return how many events were emitted."""
        ...


def default_worker_id(prefix: str = "") -> str:
    """``host-pid`` (with an optional prefix): unique among live workers."""
    return f"{prefix}{socket.gethostname()}-{os.getpid()}"


def decode_messages(
    messages: Iterable[Message], *, now: float, eventbridge_keys_encoded: bool = True
) -> tuple[list[ObjectEvent], StepReport]:
    """Decode a step's messages: their object events, and a report holding a dead letter
    for each message that could not be decoded (whole or in part) and the counts of S3
    events ignored for their type. Pure: any process may run it for an engine."""
    report = StepReport()
    events: list[ObjectEvent] = []
    count_messages = 0
    for message in messages:
        count_messages += 1
        try:
            decoded = decode_message(
                message.body, location=message.location,
                eventbridge_keys_encoded=eventbridge_keys_encoded,
            )
        except DecodeError as exc:
            report.rejected.append(dead_letter(message, exc, now))
            continue
        events += decoded.events
        if decoded.ignored:
            for kind, count in decoded.ignored.items():
                report.counts[f"ignored.{kind}"] += count
        if decoded.errors:
            # One dead letter (and one reported line) per input message, however
            # many of its records were bad; the good records go on.
            reason = join_reasons([error.reason for error in decoded.errors])
            report.rejected.append(
                dead_letter(message, DecodeError(reason, location=message.location), now)
            )
    report.messages += count_messages
    report.events = len(events)
    return events, report


BASE64_BODY = "base64:"
"""Prefix of a dead letter's body kept as base64 (its reason says so too)."""


def body_text(body: bytes | str) -> str | None:
    """``body`` as text any store can keep, or None: not UTF-8, a lone surrogate, a NUL."""
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            return None
    elif not is_unicode(body):
        return None
    return None if "\x00" in body else body


LINE_SOURCE = "replay"
"""The source of messages that are lines of a JSON Lines file (``edp replay``)."""


def dead_letter(message: Message, error: DecodeError, now: float) -> DeadLetter:
    """The dead letter of a message that could not be decoded (a line's body without its
    line break: it separates lines, it is no part of one)."""
    body = message.body
    if message.source == LINE_SOURCE and isinstance(body, bytes):
        body = body.removesuffix(b"\n").removesuffix(b"\r")
    reason = error.reason
    if not isinstance(body, bytes | str):  # a JSON value (a Lambda's payload: any)
        try:
            text = orjson.dumps(body).decode()
        except TypeError:  # what orjson cannot write (an integer past 64 bits...)
            text = json.dumps(body, default=repr)
    elif (as_text := body_text(body)) is not None:
        text = as_text
    else:
        # Bytes that are not UTF-8 text, or hold a NUL (no PostgreSQL text can): kept
        # byte for byte, as base64, and the reason says so.
        raw = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
        text = BASE64_BODY + base64.b64encode(raw).decode("ascii")
        reason = f"{reason} (body kept as base64: not UTF-8 text)"
    return DeadLetter(
        source=message.source,
        location=one_line(error.location or message.location),
        reason=shorten(reason),
        body=text,
        received_at=now,
    )


_PRIVATE_SINKS = ("stdout", "log")
"""Sinks that are one process's own output: another process cannot relay to them (the
stdout of ``edp watch`` is a sink of its own, ``stdout@<worker id>/<bucket>``)."""
WORKER_SINK = "@"
"""A sink named ``<kind>@<worker id>/<bucket>`` is one worker's own and serves one bucket
(an ``edp watch``'s stdout and its packager, see edp.cli.watch): no other worker borrows
it, and whoever fires a batch of that bucket (that worker, another by time, an
operator) records its event for it (:meth:`Engine.sinks_for`)."""


def worker_sink(kind: str, worker_id: str, bucket: str) -> str:
    """The name of a worker's own sink of ``kind`` that serves ``bucket``."""
    return f"{kind}{WORKER_SINK}{worker_id}/{bucket}"


def served_bucket(name: str) -> str | None:
    """The bucket a worker's own sink serves; None for another sink (or a worker's sink
    named before sinks carried their bucket: ``stdout@<worker id>``)."""
    head, slash, bucket = name.rpartition("/")
    return bucket if slash and bucket and WORKER_SINK in head else None


KNOWN_SINKS_RECHECK = (2.0, 30.0)
"""Seconds between two looks at the store's sinks to borrow: while it knows none, and
once it knows some (one registered later is borrowed too)."""


class Engine:
    """Drives the pure core against a store. One engine per worker process."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        sinks: Sequence[str],
        worker_id: str | None = None,
        observers: Sequence[StepObserver] = (),
        clock_max_ahead: float | None = None,
        borrow_sinks: bool = True,
    ) -> None:
        self.store = store
        # False: this engine's events get delivery rows for its own sinks only, even when
        # none of them is shared (a replay's stdout: see :attr:`sinks`).
        self.borrow_sinks = borrow_sinks
        # How far an event's time may take the clock past the wall clock (``now``); None:
        # no bound (a replay, whose stream's times are its only clock). Live workers get
        # the clock_max_ahead setting (edp.bootstrap.build_runtime).
        self.clock_max_ahead = clock_max_ahead
        self.observers = tuple(observers)
        self.settings = settings
        self.rules = settings.rule_book()
        self.origin = Origin(settings.event_source, settings.account, settings.region)
        self.own_sinks = tuple(sinks)
        self._known_sinks: tuple[str, ...] = ()
        self._registered: tuple[str, ...] = ()  # (the workers' own sinks, see sinks_for)
        self._registered_checked = -math.inf
        self._known_checked = -math.inf
        self._warned_no_sink = False
        self.worker_id = worker_id or settings.worker_id or default_worker_id()
        resumed = store.worker_clock(self.worker_id)
        self.clock = resumed if resumed is not None else -math.inf
        self.has_peers = False
        """Whether another live worker was on the store at the last look (a daemon that
        is caught up then publishes its clock every few seconds: see edp.daemon)."""
        self.holding: float | None = None
        """The lowest hold, this worker's or another's, at the last look (see hold())."""
        self.fired_until = -math.inf
        """How far :meth:`fire_due` has fired by time (what any floor let it), so far."""
        self._held: float | None = None  # see hold()
        self._held_until = -math.inf
        self._hold_lock = threading.Lock()

    @property
    def sinks(self) -> tuple[str, ...]:
        """The sinks this engine's events get delivery rows for: its own, plus, when none
        of its own is shared (a process run without sink settings, such as a backfill
        from a laptop, or with only its own stdout or log, such as ``edp run --stdout``),
        the shared ones the store knows, that is those the workers relay to. Events with
        no delivery row for those would never be sent there by anyone. A watcher's
        stdout or packager (``<kind>@<worker id>/<bucket>``) is no destination for other
        workers' events: only those of its bucket reach it (:meth:`sinks_for`)."""
        if not self.borrow_sinks or any(name not in _PRIVATE_SINKS for name in self.own_sinks):
            return self.own_sinks
        borrowed = tuple(name for name in self._known() if WORKER_SINK not in name)
        if not borrowed and not self.own_sinks and not self._warned_no_sink:
            self._warned_no_sink = True
            log.warning("no sink is configured and the store knows none: events of "
                        "fired batches are kept in the outbox for no sink")
        return self.own_sinks + borrowed

    def _known(self) -> tuple[str, ...]:
        """The store's shared sinks (:meth:`_shared_sinks`), asked again only every few
        seconds (not at every step)."""
        checked = time.monotonic()
        borrowable = any(WORKER_SINK not in name for name in self._known_sinks)
        if checked - self._known_checked >= KNOWN_SINKS_RECHECK[borrowable]:
            self._known_checked = checked
            self._known_sinks = self._shared_sinks()
        return self._known_sinks

    def _event_sinks(self, bucket: str, sinks: Sequence[str]) -> tuple[str, ...] | None:
        """The sinks of an event of ``bucket`` when not the step's ``sinks`` (None): the
        step's, but for this worker's own sinks of other buckets (a watcher that fires
        another's batch by time), plus the other workers' own sinks of ``bucket``."""
        extra = self.sinks_for(bucket)
        kept = tuple(name for name in sinks if served_bucket(name) in (None, bucket))
        if not extra and len(kept) == len(sinks):
            return None
        return tuple(dict.fromkeys(kept + extra))

    def sinks_for(self, bucket: str) -> tuple[str, ...]:
        """Sinks a batch of ``bucket`` is recorded for besides :attr:`sinks`: the other
        workers' own sinks that serve that bucket (a watcher's, when this worker fires
        one of its batches by time). None for a replay (``borrow_sinks`` False)."""
        if not self.borrow_sinks:
            return ()
        checked = time.monotonic()
        if checked - self._registered_checked >= KNOWN_SINKS_RECHECK[bool(self._registered)]:
            # (a small table, asked again every 2 s while it names none, then every 30 s:
            # a watcher registers its sinks at its start)
            self._registered_checked = checked
            self._registered = tuple(name for name in self.store.registered_sinks()
                                     if name not in self.own_sinks and served_bucket(name))
        return tuple(name for name in self._registered if served_bucket(name) == bucket)

    def _shared_sinks(self) -> tuple[str, ...]:
        """The sinks the store knows that another process relays to (stdout and log
        belong to the process that printed them: they are no destination for another
        process's events), other than this engine's own."""
        return tuple(name for name in self.store.known_sinks()
                     if name not in _PRIVATE_SINKS and name not in self.own_sinks)

    # -- input --------------------------------------------------------------------
    def decode(
        self, messages: Iterable[Message], now: float
    ) -> tuple[list[ObjectEvent], StepReport]:
        """Decode messages; undecodable ones become dead letters in the report."""
        return decode_messages(
            messages, now=now, eventbridge_keys_encoded=not self.settings.eventbridge_raw_keys
        )

    def process(
        self, messages: Iterable[Message], *, now: float, caught_up: bool = False,
        backlog_lag: float | None = None,
    ) -> StepReport:
        """Run one step: decode, apply, fire what is due, commit.

        ``now`` is the wall clock (used for bookkeeping, and as the clock when
        ``caught_up`` says the source has no backlog). The step publishes the
        worker's clock (heartbeat) in its own transaction, and fires nothing due
        after the other workers' lowest clock (:meth:`Store.fire_floor`).

        ``backlog_lag``: a source's "caught up" is a guess (a queue's receive that
        came back less than full: SQS returns partial receives from a backlog too).
        With it, a step holding an event more than ``backlog_lag`` seconds older than
        ``now`` is part of a backlog whatever the source said: the clock stays at the
        events' times and the report says ``behind`` (the caller then counts the
        source as not caught up, whether or not it passed ``caught_up``).
        """
        events, report = self.decode(messages, now)
        return self.process_decoded(events, report, now=now, caught_up=caught_up,
                                    backlog_lag=backlog_lag)

    def process_decoded(
        self, events: list[ObjectEvent], report: StepReport, *, now: float,
        caught_up: bool = False, prefixes: Sequence[str | Skip] | None = None,
        backlog_lag: float | None = None, finish: bool = False,
    ) -> StepReport:
        """:meth:`process` of messages already decoded (by :func:`decode_messages`,
        possibly in another process): ``report`` holds their dead letters and counts;
        ``prefixes``, when given, each event's batch prefix or why it is not batched
        (``Batcher.classify`` under this engine's rules, run by whoever decoded them).

        ``finish``: a step that ends caught up marks the worker finished with its
        heartbeat, for a worker that holds nothing between its steps (a Lambda
        container): it holds no quiet batch back until its next step.
        """
        if (backlog_lag is not None and events
                and min(event.time for event in events) < now - backlog_lag):
            caught_up, report.behind = False, True
        floor = self._floor(now)
        with self.store.transaction() as tx:
            clock = self._apply(tx, events, report, now=now, caught_up=caught_up, floor=floor,
                                prefixes=prefixes, held=self.holding,
                                finish=finish and caught_up)
        return self._applied(clock, report, now)

    # -- several replay workers on one stream (see edp.replay) ----------------------
    def enqueue(
        self,
        events: Sequence[tuple[int, float, ObjectEvent]],
        report: StepReport,
        *,
        now: float,
        clock: float,
    ) -> None:
        """Queue decoded events, as (seq in this worker's part, effective time, event), for
        whichever worker applies them (:meth:`process_queued`); the messages' dead
        letters and counts commit with them, and the worker publishes ``clock``."""
        with self.store.transaction() as tx:
            cast(QueueTransaction, tx).queue_events(self.worker_id, events)
            tx.add_dead_letters(report.rejected)
            report.counts["dead_letters"] += len(report.rejected)
            report.counts["messages"] += report.messages
            tx.add_counters(report.counts)
            self._heartbeat(tx, clock, now)

    def process_queued(
        self, *, now: float, limit: int, publish: float | None = None, beat: bool = True
    ) -> tuple[int, StepReport] | None:
        """Apply up to ``limit`` queued events, in the queue's order, below the lowest
        clock of the live workers (and fire nothing due after it): how many were
        applied, and the step's report (whose ``events`` is 0: they were decoded, and
        counted, by whoever queued them). None when another worker holds the apply
        lock, or when the step lost its connection and could not be retried as it was
        (the events stay queued: the caller tries again). ``beat=False``: the step
        publishes no clock (a finished worker draining the queue stays finished).
        """
        before = self.clock
        try:
            with self.store.transaction() as tx:
                queued = cast(QueueTransaction, tx).take_queued(
                    limit=limit, now=now, timeout=self.settings.worker_timeout
                )
                if queued is None:
                    return None
                # The workers' engines share one clock: the newest effective time
                # applied. (This engine's own may be ahead: a worker publishes how far
                # it queued.)
                self.clock = queued.clock
                report = StepReport()
                clock = self._apply(tx, queued.events, report, now=now,
                                    floor=queued.floor, publish=publish, beat=beat)
        except TransactionConflict:
            # Retried on a new connection, the lock or the floor read otherwise (the
            # other workers went on meanwhile): nothing was applied.
            self.clock = before
            log.warning("a replay step lost its connection and was rolled back; retrying")
            return None
        return len(queued.events), self._applied(clock, report, now)

    def _apply(
        self,
        tx: Transaction,
        events: list[ObjectEvent],
        report: StepReport,
        *,
        now: float,
        floor: float,
        caught_up: bool = False,
        publish: float | None = None,
        beat: bool = True,
        prefixes: Sequence[str | Skip] | None = None,
        held: float | None = None,
        finish: bool = False,
    ) -> float:
        """The body of a step, in its transaction: returns the clock it ends at.

        ``held``: the lowest hold, this worker's or another's (see :meth:`hold`),
        already part of ``floor``."""
        clock = self.clock
        limit = math.inf if self.clock_max_ahead is None else now + self.clock_max_ahead
        end_clock = max([clock, *(e.time for e in events)])
        if end_clock > limit:
            end_clock = max(clock, limit)
            self._warn_ahead(events, limit, report)
        if caught_up:
            end_clock = max(end_clock, now)
        batcher = self._batcher()
        if prefixes is None:
            prefixes = [batcher.classify(event) for event in events]
        sinks = self.sinks
        state = tx.load(self._request(events, prefixes, min(end_clock, floor)))
        self._batcher(state, into=batcher)
        fired = report.fired
        fired += batcher.advance(min(clock, floor))
        outcomes: dict[Outcome | Skip, int] = {}
        apply, advance, overdue = batcher.apply, batcher.advance, batcher.fire_overdue
        for event, prefix in zip(events, prefixes, strict=True):
            if event.time > clock and clock < limit:
                clock = min(event.time, limit)
                fired += advance(min(clock, floor))
            if clock > floor and type(prefix) is not Skip:
                # Another worker's clock holds this prefix's batch back (SPEC 4), but
                # this event, at this worker's clock, comes after its deadline: it
                # fires first (at its deadline), as one worker would, rather than let
                # the event join it (a merge). (Lock order serialises the workers'
                # steps on a prefix: none has an event of it in flight meanwhile.)
                # While a worker holds (a message it received may come again, to any
                # worker), an event older than the clock is checked at its own time: it
                # may be one that came again, into the batch the hold kept open for it.
                early = overdue(event.bucket, prefix,
                                clock if held is None else min(clock, event.time))
                if early is not None:
                    fired.append(early)
            # (and counts as activity at its own time: at the clock, it would restart
            # its batch's quiet period, and later old files of the prefix would join a
            # batch one worker would have fired before them)
            result = apply(event, clock, prefix,
                           None if held is None or event.time >= clock else event.time)
            if isinstance(result, BatchReady):  # (a plain class: a cheap check)
                fired.append(result)
                outcome: Outcome | Skip = _COUNTED
            else:
                outcome = result
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        for result, count in outcomes.items():
            kind = "skipped" if isinstance(result, Skip) else "events"
            report.counts[f"{kind}.{result.value}"] += count
        if caught_up:
            clock = max(clock, now)
            report.fired += batcher.advance(min(clock, floor))
        for observer in self.observers:
            observer.observe(tx, events, clock=clock, now=now, sinks=sinks)
            report.counts["observer.emitted"] += observer.tick(
                tx, clock=min(clock, floor), now=now, sinks=sinks
            )
        tx.save(self._write(batcher.take_changes(), sinks), sinks=sinks, now=now)
        tx.add_dead_letters(report.rejected)
        report.counts["dead_letters"] += len(report.rejected)
        report.counts["messages"] += report.messages
        for ready in report.fired:
            report.counts[f"batches.{ready.trigger.value}"] += 1
        tx.add_counters(report.counts)
        if beat:
            self._heartbeat(tx, clock if publish is None else max(clock, publish), now,
                            finished=finish)
        return clock

    def _warn_ahead(self, events: Sequence[ObjectEvent], limit: float,
                    report: StepReport) -> None:
        """Count (and say once a step) the events dated past the clock's bound (none when
        only the resumed clock is past it)."""
        ahead = [event for event in events if event.time > limit]
        if not ahead:
            return
        report.counts["events.clock_ahead"] += len(ahead)
        first = ahead[0]
        log.warning(
            "%d event(s) dated more than clock_max_ahead (%gs) after this worker's wall "
            "clock, e.g. %s/%s at %s: they count, but move the clock only to %s",
            len(ahead), self.clock_max_ahead, first.bucket, first.key,
            format_time(first.time), format_time(limit),
        )

    def _applied(self, clock: float, report: StepReport, now: float) -> StepReport:
        """After a step committed."""
        self.clock = clock
        if self.observers:
            report.counts["observer.emitted"] += self._after_commit(now, self.sinks)
        self._log_fired(report.fired)
        return report

    # -- time ---------------------------------------------------------------------
    def register(self, *, now: float) -> None:
        """Publish this worker's clock before its first step (a live worker starting):
        from then on the other workers fire nothing by time past it (SPEC 4), even
        before it has committed anything."""
        self.beat(now=now)
        self.register_sinks(now=now)

    def beat(self, *, now: float, finished: bool = False) -> None:
        """Publish this worker's clock and hold (a heartbeat without a step);
        ``finished``: only its hold, its clock holding nobody back (see
        :meth:`edp.store.base.Store.floors`)."""
        self._heartbeat(self.store, self.clock, now, finished=finished)

    def register_sinks(self, *, now: float) -> None:
        """Record in the store the sinks this worker relays to, so that processes with
        none of their own record their events for them (see :attr:`sinks`)."""
        shared = [name for name in self.own_sinks if name not in _PRIVATE_SINKS]
        if shared:
            self.store.register_sinks(shared, now=now)

    def hold(self, *, now: float, seconds: float, at: float | None = None) -> None:
        """Messages this worker received, and did not commit, may come again, but not
        before ``seconds`` from ``now`` (an SQS queue's visibility timeout, after a
        crash, a failed step or a lost receive): until then nothing fires by time past
        ``at`` (default: the clock, which the lost messages had not moved), here or at
        any other worker (the hold is published with the heartbeat). Without it, the
        clock would move on with newer messages, and those coming again would find
        their batch fired (SPEC 4: a backlog never splits a batch). Holds add up: the
        lowest time, the latest end. Any thread may call it."""
        at = self.clock if at is None else at
        with self._hold_lock:
            self._held = at if self._held is None else min(self._held, at)
            self._held_until = max(self._held_until, now + seconds)

    def announce_hold(self, *, now: float, seconds: float, at: float) -> None:
        """Publish, in a transaction of its own, a hold for work about to begin whose
        input comes again only after ``seconds`` if the work does not commit (this
        process dies in it, or the store is lost): nothing fires by time past ``at``
        until then, unless the work commits, whose heartbeat publishes this worker's
        own holds only (:meth:`hold`; this one is not kept). For a worker that keeps no
        process between its steps (a Lambda container may die in one), where
        :meth:`hold` after a restart cannot be relied on."""
        own = self.held(now)  # (one that ended is not published again)
        with self._hold_lock:
            until = self._held_until
        held = at if own is None else min(own, at)
        self.store.heartbeat(self.worker_id, clock=self._published(max(self.clock, at)),
                             now=now, held=self._published(held),
                             held_until=max(until, now + seconds))

    def held(self, now: float) -> float | None:
        """The time this worker holds firing at (see :meth:`hold`), None if none."""
        with self._hold_lock:
            if self._held is not None and now >= self._held_until:
                self._held, self._held_until = None, -math.inf
            return self._held

    def fire_due(self, *, now: float, until: float | None = None) -> list[BatchReady]:
        """The source is caught up: the clock becomes ``now``; fire what is due.

        ``until``: the source was last seen caught up then (its last receive), not at
        ``now``: the clock goes no further (what arrived since, unseen, may belong to a
        batch due in between)."""
        self.clock = max(self.clock, now if until is None else min(now, until))
        limit = min(self.clock, self._floor(now))
        fired = self._fire_until(limit, now=now, publish=True)
        self.fired_until = max(self.fired_until, limit)
        return fired

    def finish(self, *, now: float) -> list[BatchReady]:
        """End of input (a single replay): fire every open batch at its own deadline,
        unless other workers are live on the store (their batches are not this
        replay's to close: it returns nothing). A worker silent for longer than
        ``worker_timeout`` does not count: its batches would never fire otherwise.
        """
        self._heartbeat(self.store, self.clock, now)
        self.store.finish_worker(self.worker_id)
        others = self.store.floors(
            self.worker_id, now=now, timeout=self.settings.worker_timeout
        ).clock  # (a hold of a worker that is gone fires nothing: nobody would later)
        if others is not None:
            return []
        return self.flush(now=now)

    def flush(self, *, now: float) -> list[BatchReady]:
        """Fire every open batch at its own deadline (the end of all input)."""
        return self._fire_until(math.inf, now=now)

    def _fire_until(
        self, limit: float, *, now: float, publish: bool = False
    ) -> list[BatchReady]:
        """Fire every batch due at ``limit``, in deadline order, a page per transaction.

        With ``publish`` each page also publishes the worker's clock (a finished replay
        worker flushing must not: a heartbeat would mark it unfinished again).
        """
        fired: list[BatchReady] = []
        sinks = self.sinks
        while True:
            with self.store.transaction() as tx:
                state = tx.load(LoadRequest(due_until=limit, due_limit=PAGE))
                batcher = self._batcher(state)
                page = batcher.advance(limit)
                tx.save(self._write(batcher.take_changes(), sinks), sinks=sinks, now=now)
                for observer in self.observers:
                    observer.tick(tx, clock=limit, now=now, sinks=sinks)
                tx.add_counters(Counter(f"batches.{r.trigger.value}" for r in page))
                if publish:
                    self._heartbeat(tx, self.clock, now)
            self._after_commit(now, sinks)
            fired += page
            if len(state.batches) < PAGE:
                break
        self._log_fired(fired)
        return fired

    def prune(self, *, keep_buckets: Sequence[str] = ()) -> int:
        """Forget key memories last seen more than ``sequencer_retention`` before the clock
        (except those of ``keep_buckets``).

        Long-running workers call this now and then; a replay never does (it keeps all).
        """
        if not math.isfinite(self.clock):
            return 0
        return self.store.prune(keys_before=self.clock - self.settings.sequencer_retention,
                                keep_buckets=keep_buckets)

    HISTORY_PAGE = 500
    """Rows of each kind one transaction of :meth:`prune_history` deletes at most."""

    def prune_history(self, *, now: float, budget: float | None = None) -> HistoryPruned:
        """Delete the history older than ``history_retention`` before ``now`` (the
        workers' wall clock; nothing when the setting is 0: keep all), a page per
        transaction, until none is left or ``budget`` seconds have passed (None: no
        limit; ``more`` says that some is left)."""
        retention = self.settings.history_retention
        if not retention:
            return HistoryPruned()
        started = time.monotonic()
        total = HistoryPruned()
        while True:
            total += self.store.prune_history(before=now - retention, limit=self.HISTORY_PAGE)
            if not total.more or (budget is not None and time.monotonic() - started >= budget):
                return total

    def next_deadline(self) -> float | None:
        """The earliest deadline of any open batch or observer timer, to wake the worker."""
        rows = self.store.open_batches_by_deadline(limit=1)
        candidates = [rows[0].deadline] if rows and rows[0].deadline is not None else []
        if self.observers:
            due = self.store.next_timer_due()
            if due is not None:
                candidates.append(due)
        return min(candidates, default=None)

    # -- operators ----------------------------------------------------------------
    def close_batch(self, batch_id: str, *, now: float) -> BatchReady:
        """Fire an open batch now, by hand (trigger ``manual``, event time = ``now``)."""
        row = self.store.get_batch(batch_id)
        if row.state != "open":
            raise EdpError(
                f"batch {row.batch_id} ({row.bucket}/{row.prefix}) is already closed "
                f"(trigger {row.trigger}); use `edp batches reemit` to send its event again"
            )
        sinks = self.operator_sinks(row.bucket)
        with self.store.transaction() as tx:
            state = tx.load(LoadRequest(batch_ids={row.batch_id}))
            batcher = self._batcher(state)
            ready = batcher.close(row.bucket, row.prefix, now, row.batch_id)
            if ready is None:
                raise EdpError(f"batch {row.batch_id} was closed by another worker meanwhile")
            tx.save(self._write(batcher.take_changes(), sinks), sinks=sinks, now=now)
            tx.add_counters({"batches.manual": 1})
        self._log_fired([ready])
        return ready

    def reemit(self, batch_id: str) -> str:
        """Send a closed batch's event again, with the same ``id``; returns the id."""
        row = self.store.get_batch(batch_id)
        if row.state != "closed" or row.event_id is None:
            raise EdpError(
                f"batch {row.batch_id} ({row.bucket}/{row.prefix}) is still open: "
                "close it first with `edp batches close`"
            )
        if not self.store.requeue(row.event_id, self.operator_sinks(row.bucket)):
            raise EdpError(f"the event of batch {row.batch_id} is not in the outbox")
        return row.event_id

    # -- internals ----------------------------------------------------------------
    def _after_commit(self, now: float, sinks: Sequence[str]) -> int:
        """Let the observers do their I/O now that the step's transaction is over
        (``sinks``: the step's, read once for it)."""
        return sum(
            observer.after_commit(self.store, now=now, sinks=sinks)
            for observer in self.observers
        )

    def operator_sinks(self, bucket: str) -> tuple[str, ...]:
        """Sinks for an operator's close or re-emit of a batch of ``bucket``, which must
        exist: this command's own, every shared sink the store knows (an operator's
        command often runs with some or none of the workers' sink settings, and its
        event must still reach every sink the workers relay to) and the workers' own
        sinks that serve ``bucket`` (a watcher's stdout and packager).
        """
        sinks = self.own_sinks + tuple(
            name for name in self._shared_sinks()
            if WORKER_SINK not in name or served_bucket(name) == bucket)
        if not sinks:
            raise EdpError(
                "no sink is configured here and the store knows no shared one (stdout and "
                "log belong to the process that prints them, so they do not count, except "
                "the stdout of an `edp watch` of this bucket on this store): configure one "
                "(jsonl_path, eventbridge_bus, sns_topic, webhook_url) so that the event is "
                "delivered"
            )
        return sinks

    @staticmethod
    def _request(
        events: Sequence[ObjectEvent], prefixes: Sequence[str | Skip], due_until: float
    ) -> LoadRequest:
        request = LoadRequest(due_until=due_until)
        batch_keys, object_keys = request.batch_keys, request.object_keys
        for event, prefix in zip(events, prefixes, strict=True):
            if type(prefix) is Skip:
                continue
            batch_keys.add((event.bucket, prefix))
            object_keys.add((event.bucket, event.key))
            if event.sequencer is None:
                request.fingerprints.add(event.fingerprint())
        return request

    def _batcher(
        self, state: WorkingState | None = None, *, into: Batcher | None = None
    ) -> Batcher:
        """A batcher (``into``, or a new one) seeded with a step's working set, if any
        (it records per-object rows only for a store that keeps them)."""
        batcher = into if into is not None else Batcher(
            self.rules, record_objects=self.store.keeps_objects
        )
        if state is None:
            return batcher
        batcher.seed(
            batches=state.batches,
            generations=state.generations,
            keys=state.keys,
            fingerprints=state.fingerprints,
        )
        return batcher

    def _write(self, changes: Changes, sinks: Sequence[str]) -> StepWrite:
        saved = []
        for batch in changes.open_batches:
            deadline, trigger = self.rules.for_bucket(batch.bucket).deadline(
                batch.first_activity, batch.last_activity
            )
            saved.append(SavedBatch(batch, deadline, trigger.value))
        closed = [
            ClosedBatch(
                batch=batch,
                trigger=ready.trigger.value,
                fired_at=ready.fired_at,
                event_id=ready.event_id,
                payload=orjson.dumps(batch_event(ready, self.origin)).decode(),
                sinks=self._event_sinks(batch.bucket, sinks),
            )
            for batch, ready in changes.closed
        ]
        return StepWrite.from_changes(changes, saved, closed)

    def _floor(self, now: float) -> float:
        """The time nothing may fire past: the other workers' lowest clock or hold, and
        this worker's own hold (which this call ends once its time is over). Sets
        :attr:`holding`: the lowest hold, own or another's (None if none)."""
        others = self.store.floors(
            self.worker_id, now=now, timeout=self.settings.worker_timeout
        )
        self.has_peers = others.clock is not None
        self.holding = lowest(self.held(now), others.held)
        floor = lowest(others.clock, self.holding)
        return math.inf if floor is None else floor

    def _heartbeat(self, into: Transaction | Store, clock: float, now: float, *,
                   finished: bool = False) -> None:
        """Publish this worker's ``clock`` and its hold, with a step's transaction or on
        its own (``finished``: and mark it finished)."""
        with self._hold_lock:
            held, until = self._held, self._held_until
        into.heartbeat(self.worker_id, clock=self._published(clock), now=now,
                       held=None if held is None else self._published(held),
                       held_until=None if held is None else until, finished=finished)

    @staticmethod
    def _published(clock: float) -> float:
        # A worker that has seen nothing yet must not hold others back forever,
        # nor claim to be ahead of them: it publishes the lowest finite time.
        return clock if math.isfinite(clock) else -1e18

    @staticmethod
    def _log_fired(fired: Sequence[BatchReady]) -> None:
        for ready in fired:
            log.info(
                "batch fired: bucket=%s prefix=%s batch_id=%s trigger=%s objects=%d",
                ready.bucket, ready.prefix, ready.batch_id, ready.trigger.value,
                ready.object_count,
            )


__all__ = [
    "BACKLOG_LAG",
    "REDELIVERY_MARGIN",
    "Engine",
    "Message",
    "Outcome",
    "StepObserver",
    "StepReport",
    "dead_letter",
    "decode_messages",
    "default_worker_id",
]
