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
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Protocol, TextIO, cast

from edp.bootstrap import Runtime, build_runtime
from edp.config import Settings
from edp.core.batching import Batcher
from edp.engine import LINE_SOURCE, StepReport, default_worker_id
from edp.errors import ConfigError, EdpError
from edp.relay import RelayReport
from edp.sinks import StdoutSink
from edp.sources.files import Decoded, decoding
from edp.web.figures import events_out


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


def _warn_of_earlier_batches(runtime: Runtime, stderr: TextIO) -> None:
    stats = runtime.store.stats()
    held = stats["open_batches"] + stats["closed_batches"]
    # (history_retention may have pruned every fired batch: the counters, and the key
    # memories, stay)
    fired = events_out(runtime.store.counters())
    if held or fired:
        what = (f"{held} batch(es)" if held else
                f"the key memories of {fired} batch(es), their history pruned,")
        stderr.write(
            f"edp replay: warning: the database already holds {what} of an "
            "earlier run; this replay continues from them (their key memories make "
            "re-sent events duplicates), so its output is not that of the stream "
            "alone: use a fresh database for that\n"
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
    single = settings.replay_workers == 1
    # Lines are decoded one chunk ahead, on the other core where it can be forked: the
    # child starts here, before the store opens its connections (and a pool's threads).
    with decoding(
        stream, size=settings.chunk_size, encoded=not settings.eventbridge_raw_keys,
        classify=Batcher(settings.rule_book()).classify if single else None,
    ) as chunks, tempfile.TemporaryDirectory(prefix="edp-replay-") as tmp:
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
            live=False,  # the stream's times are the clock, however far off the wall clock
        )
        summary = ReplaySummary()
        # (Several workers check once they know whether they begin a run: run_part.)
        if database_url is not None and single:
            _warn_of_earlier_batches(runtime, stderr)
            others = runtime.store.floors(
                runtime.engine.worker_id, now=time.time(), timeout=settings.worker_timeout
            ).clock
            if others is not None:
                stderr.write(
                    "edp replay: warning: other workers are live on this database; replays "
                    "side by side coordinate only with --workers N and --worker-id (while "
                    "they are live, the batches left open at the end stay open for them)\n"
                )
        try:
            if not single:
                run_part(runtime, chunks, summary, stderr)
                return summary
            output_error = ""
            for lines, events, decoded, prefixes in chunks:
                summary.lines += lines
                summary.record(
                    runtime.engine.process_decoded(
                        events, decoded, now=time.time(), prefixes=prefixes
                    ),
                    stderr,
                )
                output_error = _last_error(runtime.relay.deliver(), output_error)
            for ready in runtime.engine.finish(now=time.time()):
                summary.fired[ready.trigger.value] += 1
            output_error = _last_error(runtime.relay.deliver(), output_error)
            if output_error:
                # stdout could not take some events (closed pipe, full disk), at the end
                # or earlier (those wait for a retry the replay does not make): say so,
                # rather than exit 0 with events that exist nowhere.
                stats = runtime.store.stats()
                summary.undelivered = stats["pending_deliveries"] + stats["parked_deliveries"]
                if summary.undelivered:
                    summary.output_error = output_error
        finally:
            runtime.close()
        return summary


# -- several workers, one stream ----------------------------------------------------------
# Each of N processes replays one part of a stream (any split, each part in the
# stream's order) into one shared database; together they must emit what one
# replay of the whole stream emits. A batch's fate depends only on the events of
# its prefix and their times, so it is enough that events are applied in time
# order across workers and that nothing fires before every event that could
# still extend it was applied. A shared queue gives both:
#
# - each worker decodes its part and queues its events (Engine.enqueue), each
#   stamped with its *effective time*: the running maximum of the part's event
#   times up to it. Its *clock*, published with each chunk queued, is the
#   effective time of the last event it queued: the next one's is not lower;
# - whoever holds the apply lock (a PostgreSQL advisory lock; the others go on
#   queueing) takes the queued events whose effective time is below the lowest
#   clock of the live, unfinished workers (the floor), in (effective time, worker,
#   seq) order, and applies them as one engine step that fires nothing due after
#   the floor (Engine.process_queued): events of all parts, merged in time order;
# - a worker whose part is queued is finished and no longer holds the floor back;
#   the last to finish applies what is left and fires every open batch.
#
# Ties: events of equal effective time in different parts are applied in the
# order of their workers' ids, not necessarily the stream's. That changes nothing
# unless they belong to one prefix and their order matters (a marker, or the
# count threshold, between them). Time order: nobody knows the stream's order
# across parts, so a late event (earlier time than events before it in the
# stream, not a re-delivery) may be applied before them; event times that never
# decrease along the stream make the result exact. Duplicates (re-deliveries later
# in the stream) are fine: they carry their original's time and change nothing.
#
# Runs: the workers of one run are those with a replay_progress row (join_run);
# the run ends when its last worker has applied and fired everything (end_run), so
# a later run on the same database starts with fresh clocks. A member restarted
# rejoins and resumes after the last event it had queued (queued or applied, read
# in one snapshot).


class ReplayRoster(Protocol):
    """What a shared store offers replay workers beyond the Store port."""

    def join_run(self, worker_id: str, *, now: float, workers: int,
                 timeout: float | None = None) -> tuple[str, int]:
        """Join the run in progress or begin one: how (new, joined, rejoined, or
        ending: try again), and the last of its events queued or applied (-1: none)."""
        ...

    def run_members(self, *, now: float, timeout: float) -> int:
        """How many workers of the run in progress are live or finished."""
        ...

    def leave_run(self, worker_id: str) -> None:
        """Leave the run, if nothing of this worker was queued or applied."""
        ...

    def stalled_members(self, *, now: float, timeout: float) -> list[str]:
        """Unfinished members silent for longer than ``timeout``."""
        ...

    def queued_events(self) -> int:
        """How many events wait in the queue."""
        ...

    def finish_replay_worker(self, worker_id: str) -> bool:
        """Mark a member finished; True for the one that ends the run."""
        ...

    def end_run(self) -> None:
        """The run is complete (releases the ending lock)."""
        ...

    def release_ending(self) -> None:
        """Give up ending the run (a restarted member will)."""
        ...


ROSTER_METHODS = ("join_run", "run_members", "leave_run", "stalled_members", "queued_events",
                  "finish_replay_worker", "end_run", "release_ending")


def _publishable(clock: float) -> float:
    # A finite stand-in for "nothing queued yet".
    return max(clock, -1e18)


def run_part(
    runtime: Runtime, chunks: Iterator[Decoded], summary: ReplaySummary, stderr: TextIO
) -> None:
    """Replay one part of a stream (its decoded ``chunks``) as one of ``replay_workers``
    processes on one store.

    Every worker joins the run and waits until ``replay_workers`` have, so that none
    runs ahead of a late starter. A member killed and restarted with the same
    ``worker_id`` reads its part again and queues only what it had not queued yet.
    The run ends when its last member has applied everything, fired every open
    batch and seen every event delivered; the next worker to join then begins a new
    run (one arriving while a run ends waits for that).
    """
    settings, engine, store = runtime.settings, runtime.engine, runtime.store
    if not all(hasattr(store, name) for name in ROSTER_METHODS):
        raise ConfigError(
            "replay_workers > 1 needs a shared PostgreSQL store: pass --database-url "
            "postgresql://..."
        )
    if not settings.worker_id:
        raise ConfigError(
            "replay_workers > 1 needs a worker_id for each worker (--worker-id): a name "
            "that stays the same when the worker is restarted"
        )
    roster = cast(ReplayRoster, store)
    me, timeout, size = engine.worker_id, settings.worker_timeout, settings.chunk_size
    patience = max(60.0, timeout)
    started = time.monotonic()
    while True:
        how, done = roster.join_run(me, now=time.time(), workers=settings.replay_workers,
                                    timeout=timeout)
        if how != "ending":
            break
        if time.monotonic() - started > patience:
            raise EdpError(f"replay worker {me}: the previous run on this database has been "
                           f"ending for over {patience:g}s")
        time.sleep(0.2)
    if how == "rejoined":
        stderr.write(f"edp replay: worker {me} rejoins the run in progress on this database; "
                     f"its part resumes after its event {done + 1}\n")
    elif how == "new":
        _warn_of_earlier_batches(runtime, stderr)
    started = time.monotonic()
    while roster.run_members(now=time.time(), timeout=timeout) < settings.replay_workers:
        if time.monotonic() - started > timeout:
            roster.leave_run(me)  # (a restarted member with events queued stays one)
            raise EdpError(
                f"replay worker {me}: fewer than {settings.replay_workers} workers "
                f"joined within worker_timeout ({timeout:g}s)"
                + ("; this worker began a new run (if it was restarted after it had "
                   "finished its part of an earlier run, that run had completed: there is "
                   "nothing left to do)" if how == "new" else "")
            )
        time.sleep(0.1)
        store.heartbeat(me, clock=_publishable(-math.inf), now=time.time())
    clock, seq = -math.inf, 0
    delivered = time.monotonic()
    for lines, events, decoded, _ in chunks:
        summary.lines += lines
        # A chunk is queued whole, with its dead letters and counts, in one transaction:
        # one that a restarted worker had queued before (an event at or after its start
        # is; a chunk without events, when a later event is) is not queued again.
        queued_before = seq <= done
        rows = []
        for event in events:
            if event.time > clock:
                clock = event.time
            if seq > done:
                rows.append((seq, clock, event))
            seq += 1
        summary.record(decoded, stderr)
        if queued_before and not rows:
            continue
        # (still this process's: its session may have been lost)
        store.claim_worker_id(me, silent_for=timeout)
        # (a part's line numbers are the part's: its dead letters name the worker)
        decoded.rejected = [replace(letter, source=f"{LINE_SOURCE}:{me}")
                            for letter in decoded.rejected]
        engine.enqueue(rows, decoded, now=time.time(), clock=clock)
        # Apply a chunk when the lock is free (the others queue meanwhile).
        taken = engine.process_queued(now=time.time(), limit=size, publish=_publishable(clock))
        if taken is not None:
            summary.record(taken[1], stderr)
        if time.monotonic() - delivered > 0.5:  # delivery is not on the others' path
            runtime.relay.deliver()
            delivered = time.monotonic()
    store.heartbeat(me, clock=_publishable(clock), now=time.time())
    if not roster.finish_replay_worker(me):
        runtime.relay.deliver()
        stalled = roster.stalled_members(now=time.time(), timeout=timeout)
        if stalled:
            stderr.write(
                f"edp replay: warning: worker(s) {', '.join(stalled)} of this run have been "
                f"silent for over worker_timeout ({timeout:g}s) without finishing: the run "
                "completes (its last batches fire) only once each is restarted with its "
                "--worker-id and part\n"
            )
        return
    try:
        _end_run(runtime, roster, summary, stderr, patience)
    finally:
        roster.release_ending()  # (a no-op once end_run has released it)


def _end_run(runtime: Runtime, roster: ReplayRoster, summary: ReplaySummary, stderr: TextIO,
             patience: float) -> None:
    """The last worker: every member finished, nobody holds the floor back any more:
    apply what is queued, fire every open batch, deliver, end the run."""
    engine, size, me = runtime.engine, runtime.settings.chunk_size, runtime.engine.worker_id
    waiting = time.monotonic()
    while True:
        taken = engine.process_queued(now=time.time(), limit=size, beat=False)
        if taken is not None:
            summary.record(taken[1], stderr)
            if taken[0]:
                waiting = time.monotonic()
                continue
            if not roster.queued_events():
                break
        # A finished worker's last step still holds the apply lock, or a step was
        # rolled back: try again.
        if time.monotonic() - waiting > patience:
            raise EdpError(
                f"replay worker {me}: queued events could not be applied for over "
                f"{patience:g}s (the apply lock held by a stopped process?); restart this "
                "worker once it is gone"
            )
        time.sleep(0.02)
    for ready in engine.flush(now=time.time()):
        summary.fired[ready.trigger.value] += 1
    runtime.relay.deliver()
    pending = _drain(runtime)
    if pending:
        summary.undelivered = pending
        summary.output_error = ("the run stays open: restart this worker to deliver them "
                                "and end it")
        return
    roster.end_run()


def _last_error(report: RelayReport, before: str) -> str:
    """The latest delivery error so far."""
    return report.errors[-1] if report.errors else before


def _drain(runtime: Runtime) -> int:
    """The last worker waits until every event was delivered (by anyone): how many
    were not, after two minutes."""
    give_up = time.monotonic() + 120.0
    while True:
        stats = runtime.store.stats()
        if not stats["pending_deliveries"] or time.monotonic() > give_up:
            # (parked deliveries were refused for good: waiting does not help them)
            return stats["pending_deliveries"] + stats["parked_deliveries"]
        runtime.relay.deliver()
        time.sleep(0.05)
