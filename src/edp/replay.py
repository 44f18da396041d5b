"""``edp replay``: the deterministic simulation of SPEC section 6.

Lines of a JSON Lines file are fed to the engine in file order, in chunks; the
clock is the newest event time (the wall clock is only used for bookkeeping:
heartbeats, dead-letter and outbox timestamps); at the end every open
batch fires at its deadline. Events go to stdout through the outbox, rejected
lines and a summary to stderr.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, TextIO, cast

from edp.bootstrap import Runtime, build_runtime
from edp.config import Settings
from edp.decode import decode_message
from edp.engine import Message, StepReport, default_worker_id
from edp.errors import ConfigError, DecodeError, EdpError
from edp.sinks import StdoutSink
from edp.sources.files import decoded_chunks


@dataclass(slots=True)
class ReplaySummary:
    """Totals of one replay."""

    lines: int = 0
    events: int = 0
    rejected: int = 0
    fired: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    undelivered: int = 0
    output_error: str = ""
    not_json: int = 0

    def record(self, report: StepReport, stderr: TextIO) -> None:
        """Add one step's figures; report its rejected lines on ``stderr``."""
        self.events += report.events
        self.counts.update(report.counts)
        for letter in report.rejected:
            self.rejected += 1
            self.not_json += letter.reason.startswith("not JSON")
            stderr.write(f"{letter.location}: {letter.reason}\n")
        self.fired.update(r.trigger.value for r in report.fired)

    def describe(self) -> str:
        """One line for stderr."""
        batches = sum(self.fired.values())
        by_trigger = ", ".join(f"{k} {v}" for k, v in sorted(self.fired.items()))
        skipped = {k.removeprefix("skipped."): v for k, v in sorted(self.counts.items())
                   if k.startswith("skipped.") and v}
        ignored = sum(v for k, v in self.counts.items() if k.startswith("ignored."))
        why = ", ".join(f"{reason} {count}" for reason, count in skipped.items())
        lines = self.lines
        fragments = lines > 1 and self.rejected == lines and 2 * self.not_json >= lines
        hint = ("; every line was rejected, most as not JSON: the input must be JSON Lines, "
                "one whole message per line" if fragments else "")
        return (
            f"edp replay: {self.lines} lines, {self.events} object events, "
            f"{batches} {'batch' if batches == 1 else 'batches'} ({by_trigger or 'none'}), "
            f"{self.rejected} rejected, {self.counts['events.duplicate']} duplicates, "
            f"{sum(skipped.values())} not batched{f' ({why})' if why else ''}, "
            f"{ignored} ignored by type{hint}"
        )


def run_replay(
    stream: BinaryIO,
    settings: Settings,
    *,
    stdout: BinaryIO,
    stderr: TextIO,
    database_url: str | None = None,
) -> ReplaySummary:
    """Replay ``stream`` and return its summary (the CLI chooses the exit status).

    With ``replay_workers`` > 1 this process is one of several replaying parts of
    one stream into one shared database (see :func:`run_part`).
    """
    with tempfile.TemporaryDirectory(prefix="edp-replay-") as tmp:
        url = database_url or f"sqlite:///{Path(tmp) / 'replay.db'}"
        runtime = build_runtime(
            settings,
            database_url=url,
            sinks=[StdoutSink(stdout)],
            # A stable worker_id matters only to a worker of several (to restart it);
            # a lone replay never borrows a daemon's.
            worker_id=(settings.worker_id if settings.replay_workers > 1 else None)
            or default_worker_id("replay-"),
            # A temporary store needs no durability at all. A PostgreSQL database keeps
            # its integrity with asynchronous commits (synchronous_commit off: a server
            # crash may forget the last steps, which a re-run replays with the same
            # ids), so replays into it do not wait for each step's WAL flush.
            fast_unsafe=database_url is None
            or database_url.startswith(("postgresql:", "postgres:")),
        )
        summary = ReplaySummary()
        if database_url is not None:
            # Checked before this worker registers: with several workers none has
            # applied anything before all registered, so only earlier runs count here.
            stats = runtime.store.stats()
            held = stats["open_batches"] + stats["closed_batches"]
            if held:
                stderr.write(
                    f"edp replay: warning: the database already holds {held} batch(es) of an "
                    "earlier run; this replay continues from them (their key memories make "
                    "re-sent events duplicates), so its output is not that of the stream "
                    "alone: use a fresh database for that\n"
                )
        if database_url is not None and settings.replay_workers == 1:
            others = runtime.store.fire_floor(
                runtime.engine.worker_id, now=time.time(), timeout=settings.worker_timeout
            )
            if others is not None:
                stderr.write(
                    "edp replay: warning: other workers are live on this database; replays "
                    "side by side coordinate only with --workers N and --worker-id\n"
                )
        try:
            if settings.replay_workers > 1:
                run_part(runtime, stream, summary, stderr)
                return summary
            # Lines are decoded one chunk ahead, on the other core where it can be forked.
            for lines, events, decoded in decoded_chunks(
                stream, size=settings.chunk_size, encoded=not settings.eventbridge_raw_keys
            ):
                summary.lines += lines
                summary.record(
                    runtime.engine.process_decoded(events, decoded, now=time.time()), stderr
                )
                runtime.relay.deliver()
            for ready in runtime.engine.finish(now=time.time()):
                summary.fired[ready.trigger.value] += 1
            report = runtime.relay.deliver()
            if report.errors:
                # stdout could not take the events (closed pipe, full disk): say so,
                # rather than exit 0 with events that exist nowhere.
                stats = runtime.store.stats()
                summary.undelivered = stats["pending_deliveries"] + stats["parked_deliveries"]
                summary.output_error = report.errors[-1]
        finally:
            runtime.close()
        return summary


# -- several workers, one stream ----------------------------------------------------------
# Each of N processes replays one part of a stream (any split, each part in the
# stream's order) into one shared database; together they must emit what one
# replay of the whole stream emits. A batch's fate depends only on the events of
# its prefix and their times, so it is enough that events are applied in time
# order across workers and that nothing fires before every event that could
# still extend it was applied. Conservative synchronisation gives both:
#
# - a worker's *clock* is the effective time of its next unapplied event (the
#   running maximum of its part's event times), published by each step's commit
#   (Transaction.heartbeat; store.heartbeat while it waits);
# - a worker applies an event only when its effective time is <= every other live,
#   unfinished worker's clock (store.fire_floor), else it waits for a heartbeat;
# - the engine fires only up to that same floor, so no batch fires early;
# - a finished worker no longer holds the others back; the last one flushes.
#
# Ties: events of equal time in different parts may be applied in either order.
# That changes nothing unless they belong to one prefix and their order matters
# (a marker, or the count threshold, between them): strictly increasing event
# times (per prefix) make the result exact. Duplicates (re-deliveries later in the
# stream) are fine: they carry their original's time and change nothing.


class WorkerRoster(Protocol):
    """What a shared store offers replay workers beyond the Store port."""

    def live_workers(self, *, now: float, timeout: float) -> int:
        """Workers (finished or not) with a heartbeat within ``timeout``."""
        ...

    def worker_clocks(self, *, now: float, timeout: float) -> dict[str, float]:
        """The clocks of the live, unfinished workers."""
        ...

    def listen_workers(self, worker_id: str) -> None:
        """Start receiving the wake-ups of ``worker_id``."""
        ...

    def wait_for_workers(self, timeout: float) -> bool:
        """Wait until woken by another worker's progress (True) or ``timeout`` (False)."""
        ...


class _Floor:
    """The lowest clock of the other live, unfinished workers, as last read.

    It is re-read when this worker is woken (a heartbeat wakes the workers that
    hold the lowest clock: only they may be able to go on) or after a while
    without news (so a silent worker stops counting after ``worker_timeout``).
    Clocks only rise, so a value read earlier is never above the store's
    ``fire_floor`` that the engine uses.
    """

    def __init__(self, roster: WorkerRoster, me: str, timeout: float) -> None:
        self.roster, self.me, self.timeout = roster, me, timeout
        self.value = math.inf
        self.refresh()

    def refresh(self) -> None:
        clocks = self.roster.worker_clocks(now=time.time(), timeout=self.timeout)
        clocks.pop(self.me, None)
        self.value = min(clocks.values(), default=math.inf)

    def wait(self, seconds: float) -> None:
        """Wait to be woken (or ``seconds``), then re-read."""
        self.roster.wait_for_workers(seconds)
        self.refresh()


@dataclass(slots=True)
class _Timed:
    message: Message
    time: float  # effective: the running maximum of event times up to this line


class _Part:
    """The lines of one part with their effective times, read ahead lazily."""

    def __init__(self, stream: BinaryIO, *, clock: float, encoded: bool, ahead: int) -> None:
        self.lines = enumerate(stream, start=1)
        self.clock = clock
        self.encoded = encoded
        self.ahead = ahead
        self.queue: deque[_Timed] = deque()
        self.done = False

    def fill(self) -> None:
        while not self.done and len(self.queue) < self.ahead:
            item = next(self.lines, None)
            if item is None:
                self.done = True
                break
            number, line = item
            if not line.strip():
                continue
            location = f"line {number}"
            try:
                decoded = decode_message(
                    line, location=location, eventbridge_keys_encoded=self.encoded
                )
            except DecodeError:
                pass  # the engine rejects it again and reports it
            else:
                self.clock = max([self.clock, *(e.time for e in decoded.events)])
            self.queue.append(_Timed(Message(line, location, source="replay"), self.clock))

    def next_time(self) -> float:
        """Effective time of the next line (+inf when none is left)."""
        self.fill()
        return self.queue[0].time if self.queue else math.inf

    def take(self, until: float, limit: int) -> list[Message]:
        """Up to ``limit`` next lines whose effective time is <= ``until``."""
        chunk: list[Message] = []
        while len(chunk) < limit:
            self.fill()
            if not self.queue or self.queue[0].time > until:
                break
            chunk.append(self.queue.popleft().message)
        return chunk


def _publishable(clock: float) -> float:
    # Finite stand-ins: nothing seen yet, or nothing left.
    return min(max(clock, -1e18), 1e18)


def run_part(runtime: Runtime, stream: BinaryIO, summary: ReplaySummary, stderr: TextIO) -> None:
    """Replay one part of a stream as one of ``replay_workers`` processes on one store.

    Every worker registers (publishes its clock) and waits until all
    ``replay_workers`` have, so that none runs ahead of a late starter. A worker
    killed and restarted with the same ``worker_id`` within ``worker_timeout``
    re-reads its part: what it had committed comes back as duplicates.
    """
    settings, engine, store = runtime.settings, runtime.engine, runtime.store
    if not all(hasattr(store, name) for name in ("live_workers", "worker_clocks",
                                                 "listen_workers", "wait_for_workers")):
        raise ConfigError(
            "replay_workers > 1 needs a shared PostgreSQL store: pass --database-url "
            "postgresql://..."
        )
    roster = cast(WorkerRoster, store)
    me, timeout = engine.worker_id, settings.worker_timeout
    part = _Part(stream, clock=engine.clock, encoded=not settings.eventbridge_raw_keys,
                 ahead=2 * settings.chunk_size)

    def publish() -> None:
        store.heartbeat(me, clock=_publishable(part.next_time()), now=time.time())

    roster.listen_workers(me)
    publish()
    started = time.monotonic()
    while roster.live_workers(now=time.time(), timeout=timeout) < settings.replay_workers:
        if time.monotonic() - started > timeout:
            raise EdpError(
                f"replay worker {me}: fewer than {settings.replay_workers} workers "
                f"registered within worker_timeout ({timeout:g}s)"
            )
        roster.wait_for_workers(0.2)
        publish()
    floor = _Floor(roster, me, timeout)
    beat = delivered = time.monotonic()
    while part.next_time() < math.inf:
        chunk = part.take(floor.value, settings.chunk_size)
        if not chunk:
            if time.monotonic() - beat > timeout / 4:
                publish()  # still alive, merely waiting
                beat = time.monotonic()
            floor.wait(min(1.0, timeout / 4))
            continue
        summary.lines += len(chunk)
        # The step publishes the time of this part's next line (its heartbeat rides
        # on the step's commit) and fires up to the floor just read: one commit a turn.
        report = engine.process(chunk, now=time.time(), floor=floor.value,
                                publish=_publishable(part.next_time()))
        summary.record(report, stderr)
        beat = time.monotonic()
        if beat - delivered > 0.5:  # delivery is not on the critical path of the others
            runtime.relay.deliver()
            delivered = time.monotonic()
    for ready in engine.finish(now=time.time()):
        summary.fired[ready.trigger.value] += 1
    runtime.relay.deliver()
    if store.fire_floor(me, now=time.time(), timeout=math.inf) is None:
        _drain(runtime)


def _drain(runtime: Runtime) -> None:
    """The last worker waits until every event was delivered (by anyone)."""
    give_up = time.monotonic() + 120.0
    while runtime.store.stats()["pending_deliveries"] and time.monotonic() < give_up:
        runtime.relay.deliver()
        time.sleep(0.05)
